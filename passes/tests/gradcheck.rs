//! Every op's VJP against central finite differences, in f64, on randomised shapes and values.
//!
//! Each case builds `loss = sum(op(x...) * w)` with a random weight `w`, differentiates it with
//! respect to every float operand, and compares each gradient element with
//! `(loss(x + h) - loss(x - h)) / 2h`.

use std::collections::HashMap;

use memc_ir::{
    interpret, verify, BinaryOp, DType, Graph, Op, ReduceKind, Tensor, TensorType, UnaryOp, ValueId,
};
use memc_passes::autodiff::differentiate;
use memc_passes::build::Builder;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn shape(&mut self, rank: usize) -> Vec<usize> {
        (0..rank).map(|_| 1 + self.below(4)).collect()
    }
}

/// How an operand is sampled.
#[derive(Clone, Copy)]
enum Dist {
    /// Uniform in [-2, 2].
    Any,
    /// Uniform in [0.5, 2].
    Positive,
}

/// Builds a case's op from its operands.
type BuildFn = dyn Fn(&mut Builder, &[ValueId]) -> ValueId;

struct Case {
    name: String,
    /// Float operands (differentiated).
    operands: Vec<(Vec<usize>, Dist)>,
    /// Builds the op from the operands.
    build: Box<BuildFn>,
    /// Finite-difference step and tolerance (f64 unless the case rounds through f32).
    h: f64,
    tol: f64,
}

fn case(
    name: impl Into<String>,
    operands: Vec<(Vec<usize>, Dist)>,
    build: impl Fn(&mut Builder, &[ValueId]) -> ValueId + 'static,
) -> Case {
    Case {
        name: name.into(),
        operands,
        build: Box::new(build),
        h: 1e-6,
        tol: 1e-6,
    }
}

fn random_tensor(rng: &mut Rng, shape: &[usize], dist: Dist) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| match dist {
            Dist::Any => rng.uniform(-2.0, 2.0),
            Dist::Positive => rng.uniform(0.5, 2.0),
        })
        .collect();
    Tensor::from_f64(DType::F64, shape.to_vec(), &v)
}

fn run_case(c: &Case, rng: &mut Rng) {
    let mut g = Graph::new();
    let xs: Vec<ValueId> = c
        .operands
        .iter()
        .enumerate()
        .map(|(i, (s, _))| g.add_input(format!("x{i}"), TensorType::new(DType::F64, s.clone())))
        .collect();
    let mut b = Builder::new(&mut g, memc_ir::Phase::Forward, "case");
    let y = (c.build)(&mut b, &xs);
    let ys = b.shape(y);
    let w = b.g.add_const(random_tensor(rng, &ys, Dist::Any));
    let yw = b.mul(y, w).unwrap();
    let loss = b
        .reduce(ReduceKind::Sum, yw, (0..ys.len()).collect(), false)
        .unwrap();
    g.add_output("loss", loss);
    // Blocks become their steps first, as in `build_training` (`residual`, `rev_couple` and
    // `lm_head_ce` keep their own VJPs); lowering renumbers values, inputs first.
    memc_passes::blocks::lower_blocks_where(&mut g, |op| {
        !matches!(op, Op::Residual | Op::RevCouple | Op::LmHeadCe { .. })
    })
    .unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let (loss, xs) = (g.outputs()[0].1, g.inputs().to_vec());
    let grads = differentiate(&mut g, loss, &xs).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    for (i, &(_, gv)) in grads.iter().enumerate() {
        g.add_output(format!("grad{i}"), gv);
    }
    verify(&g).unwrap_or_else(|e| panic!("{}: {e}\n{}", c.name, memc_ir::print(&g)));

    let mut feeds: HashMap<String, Tensor> = HashMap::new();
    for (i, (s, d)) in c.operands.iter().enumerate() {
        feeds.insert(format!("x{i}"), random_tensor(rng, s, *d));
    }
    let out = interpret(&g, &feeds).unwrap_or_else(|e| panic!("{}: {e}", c.name));
    let analytic: HashMap<ValueId, Vec<f64>> = grads
        .iter()
        .enumerate()
        .map(|(i, &(x, _))| (x, out[i + 1].1.to_f64_vec()))
        .collect();
    let loss_at =
        |feeds: &HashMap<String, Tensor>| interpret(&g, feeds).unwrap()[0].1.to_f64_vec()[0];
    for (i, (s, _)) in c.operands.iter().enumerate() {
        let name = format!("x{i}");
        let base = feeds[&name].to_f64_vec();
        let an = analytic
            .get(&xs[i])
            .cloned()
            .unwrap_or_else(|| vec![0.0; base.len()]);
        for j in 0..base.len() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut f = feeds.clone();
                f.insert(name.clone(), Tensor::from_f64(DType::F64, s.clone(), &v));
                loss_at(&f)
            };
            let fd = (at(c.h) - at(-c.h)) / (2.0 * c.h);
            let err = (fd - an[j]).abs();
            assert!(
                err <= c.tol * (1.0 + fd.abs()),
                "{}: d loss / d x{i}[{j}]: autodiff {} vs finite differences {fd} (shapes {:?})\n{}",
                c.name,
                an[j],
                c.operands.iter().map(|o| o.0.clone()).collect::<Vec<_>>(),
                memc_ir::print(&g)
            );
        }
    }
}

fn unary(u: UnaryOp) -> impl Fn(&mut Builder, &[ValueId]) -> ValueId {
    move |b, x| b.unary(u, x[0]).unwrap()
}

fn binary(op: BinaryOp) -> impl Fn(&mut Builder, &[ValueId]) -> ValueId {
    move |b, x| b.binary(op, x[0], x[1]).unwrap()
}

/// One randomised instance of every differentiable op.
fn cases(r: &mut Rng) -> Vec<Case> {
    use Dist::*;
    let mut v = Vec::new();
    let rank = 1 + r.below(3);
    let s = r.shape(rank);
    for (u, d) in [
        (UnaryOp::Neg, Any),
        (UnaryOp::Exp, Any),
        (UnaryOp::Log, Positive),
        (UnaryOp::Sqrt, Positive),
        (UnaryOp::Reciprocal, Positive),
        (UnaryOp::Tanh, Any),
        (UnaryOp::Erf, Any),
        (UnaryOp::Sigmoid, Any),
        (UnaryOp::Silu, Any),
        (UnaryOp::Gelu, Any),
        (UnaryOp::GeluTanh, Any),
        (UnaryOp::Cos, Any),
        (UnaryOp::Sin, Any),
    ] {
        v.push(case(format!("{u:?}"), vec![(s.clone(), d)], unary(u)));
    }
    // Binary ops with broadcasting: [a, b, c] against [c], [b, 1] or the same shape.
    let full = r.shape(3);
    let other = match r.below(3) {
        0 => vec![full[2]],
        1 => vec![full[1], 1],
        _ => full.clone(),
    };
    for (op, d) in [
        (BinaryOp::Add, Any),
        (BinaryOp::Sub, Any),
        (BinaryOp::Mul, Any),
        (BinaryOp::Div, Positive),
        (BinaryOp::Max, Any),
        (BinaryOp::Min, Any),
    ] {
        v.push(case(
            format!("{op:?} {full:?} {other:?}"),
            vec![(full.clone(), d), (other.clone(), d)],
            binary(op),
        ));
        v.push(case(
            format!("{op:?} {other:?} {full:?}"),
            vec![(other.clone(), d), (full.clone(), d)],
            binary(op),
        ));
    }
    v.push(case(
        "Pow float exponent",
        vec![(full.clone(), Positive), (other.clone(), Any)],
        binary(BinaryOp::Pow),
    ));
    v.push(case(
        "Pow integer exponent",
        vec![(full.clone(), Any)],
        |b, x| {
            let e = b.g.add_const(Tensor::from_i64(DType::I64, vec![], &[3]));
            b.binary(BinaryOp::Pow, x[0], e).unwrap()
        },
    ));
    let cond: Vec<i64> = (0..full.iter().product::<usize>())
        .map(|_| r.below(2) as i64)
        .collect();
    let cond_shape = full.clone();
    v.push(case(
        "Where",
        vec![(full.clone(), Any), (other.clone(), Any)],
        move |b, x| {
            let c =
                b.g.add_const(Tensor::from_i64(DType::Bool, cond_shape.clone(), &cond));
            b.op(Op::Where, &[c, x[0], x[1]]).unwrap()
        },
    ));
    let mut cast = case("Cast f64 -> f32 -> f64", vec![(s.clone(), Any)], |b, x| {
        let f = b.cast(x[0], DType::F32).unwrap();
        b.cast(f, DType::F64).unwrap()
    });
    (cast.h, cast.tol) = (1e-2, 1e-4);
    v.push(cast);

    // MatMul: plain, batched with broadcasting, and vector operands.
    let (m, k, n) = (1 + r.below(4), 1 + r.below(4), 1 + r.below(4));
    v.push(case(
        "MatMul",
        vec![(vec![m, k], Any), (vec![k, n], Any)],
        binary_op(Op::MatMul),
    ));
    v.push(case(
        "MatMul batched",
        vec![(vec![2, 1, m, k], Any), (vec![3, k, n], Any)],
        binary_op(Op::MatMul),
    ));
    v.push(case(
        "MatMul vector-matrix",
        vec![(vec![k], Any), (vec![2, k, n], Any)],
        binary_op(Op::MatMul),
    ));
    v.push(case(
        "MatMul matrix-vector",
        vec![(vec![m, k], Any), (vec![k], Any)],
        binary_op(Op::MatMul),
    ));

    let t = r.shape(3);
    let axis = r.below(3);
    v.push(case(
        format!("Softmax axis {axis}"),
        vec![(t.clone(), Any)],
        move |b, x| b.op(Op::Softmax { axis }, &[x[0]]).unwrap(),
    ));
    v.push(case(
        format!("LogSoftmax axis {axis}"),
        vec![(t.clone(), Any)],
        move |b, x| b.op(Op::LogSoftmax { axis }, &[x[0]]).unwrap(),
    ));
    let lshape: Vec<usize> = t.iter().map(|&d| d + 1).collect();
    let la = r.below(3);
    let norm = lshape[la..].to_vec();
    v.push(case(
        format!("LayerNorm axis {la} with bias"),
        vec![
            (lshape.clone(), Any),
            (norm.clone(), Any),
            (norm.clone(), Any),
        ],
        move |b, x| {
            b.op(
                Op::LayerNorm {
                    axis: la,
                    epsilon: 1e-5,
                },
                &[x[0], x[1], x[2]],
            )
            .unwrap()
        },
    ));
    v.push(case(
        format!("LayerNorm axis {la}"),
        vec![(lshape.clone(), Any), (norm.clone(), Any)],
        move |b, x| {
            b.op(
                Op::LayerNorm {
                    axis: la,
                    epsilon: 1e-5,
                },
                &[x[0], x[1]],
            )
            .unwrap()
        },
    ));
    for (h, hk) in [(2, 2), (4, 2)] {
        let (bq, sq, tk, d, dv) = (
            1 + r.below(2),
            1 + r.below(3),
            1 + r.below(3),
            1 + r.below(3),
            1 + r.below(3),
        );
        v.push(case(
            format!("Attention H {h} Hk {hk}"),
            vec![
                (vec![bq, h, sq, d], Any),
                (vec![bq, hk, tk, d], Any),
                (vec![bq, hk, tk, dv], Any),
                (vec![1, 1, sq, tk], Any),
            ],
            move |b, x| {
                b.op(
                    Op::Attention(memc_ir::Scores::scaled(0.7)),
                    &[x[0], x[1], x[2], x[3]],
                )
                .unwrap()
            },
        ));
    }
    for (h, hk) in [(2, 1), (4, 2)] {
        let (bq, sq, tk, d, dv) = (
            1 + r.below(2),
            1 + r.below(3),
            2 + r.below(3),
            1 + r.below(3),
            1 + r.below(3),
        );
        // A constant causal-style mask (with -inf): the flash path (attention_lse and
        // attention_grad) differentiates q, k and v.
        let mask: Vec<f64> = (0..sq * tk)
            .map(|e| {
                if e % tk > e / tk + 1 {
                    f64::NEG_INFINITY
                } else {
                    0.1 * (e % 3) as f64
                }
            })
            .collect();
        v.push(case(
            format!("Attention (constant mask) H {h} Hk {hk}"),
            vec![
                (vec![bq, h, sq, d], Any),
                (vec![bq, hk, tk, d], Any),
                (vec![bq, hk, tk, dv], Any),
            ],
            move |b, x| {
                let m = b.g.add_const(memc_ir::Tensor::from_f64(
                    memc_ir::DType::F64,
                    vec![1, 1, sq, tk],
                    &mask,
                ));
                b.op(
                    Op::Attention(memc_ir::Scores::scaled(0.7)),
                    &[x[0], x[1], x[2], m],
                )
                .unwrap()
            },
        ));
    }
    {
        // Soft-capped, causal and windowed scores (no mask tensor: a rank-0 zero), more keys
        // than queries: the flash path's gradients through the cap's tanh.
        let (bq, sq, tk, d, dv) = (1 + r.below(2), 2 + r.below(2), 4, 1 + r.below(3), 2);
        v.push(case(
            format!("Attention (softcap, causal, window) S {sq} T {tk}"),
            vec![
                (vec![bq, 2, sq, d], Any),
                (vec![bq, 1, tk, d], Any),
                (vec![bq, 1, tk, dv], Any),
            ],
            move |b, x| {
                let m = b.g.add_const(memc_ir::Tensor::from_f64(
                    memc_ir::DType::F64,
                    Vec::<usize>::new(),
                    &[0.0],
                ));
                let sc = memc_ir::Scores {
                    scale: 0.7,
                    softcap: 1.5,
                    causal: true,
                    window: 2,
                };
                b.op(Op::Attention(sc), &[x[0], x[1], x[2], m]).unwrap()
            },
        ));
    }
    v.push(case(
        format!("RmsNorm axis {la}"),
        vec![(lshape.clone(), Any), (norm.clone(), Any)],
        move |b, x| {
            b.op(
                Op::RmsNorm {
                    axis: la,
                    epsilon: 1e-5,
                },
                &[x[0], x[1]],
            )
            .unwrap()
        },
    ));
    // Blocks (lowered to their steps) and the ops with their own block VJPs.
    let (n, d, f, e) = (
        2 + r.below(4),
        3 + r.below(3),
        4 + r.below(4),
        2 + r.below(3),
    );
    v.push(case(
        "Residual",
        vec![(vec![n, d], Any), (vec![n, d], Any)],
        |b, x| b.op(Op::Residual, &[x[0], x[1]]).unwrap(),
    ));
    v.push(case(
        "RevCouple",
        vec![(vec![n, d], Any), (vec![n, d], Any)],
        |b, x| {
            let s = b.scalar(b.dtype(x[0]), 0.1);
            b.op(Op::RevCouple, &[x[0], x[1], s]).unwrap()
        },
    ));
    v.push(case(
        "SwigluFfn",
        vec![
            (vec![2, n, d], Any),
            (vec![d, f], Any),
            (vec![d, f], Any),
            (vec![f, e], Any),
        ],
        |b, x| b.op(Op::SwigluFfn, x).unwrap(),
    ));
    v.push(case(
        format!("MocFfn k {}", f / 2),
        vec![
            (vec![2, n, d], Any),
            (vec![d, f], Any),
            (vec![d, f], Any),
            (vec![f, e], Any),
        ],
        move |b, x| {
            b.op(
                Op::MocFfn {
                    k: f / 2,
                    gelu: None,
                },
                x,
            )
            .unwrap()
        },
    ));
    for tanh in [false, true] {
        v.push(case(
            format!("GeluFfn tanh {tanh} with biases"),
            vec![
                (vec![n, d], Any),
                (vec![d, f], Any),
                (vec![f], Any),
                (vec![f, e], Any),
                (vec![e], Any),
            ],
            move |b, x| b.op(Op::GeluFfn { tanh }, x).unwrap(),
        ));
        v.push(case(
            format!("GeluFfn tanh {tanh}"),
            vec![(vec![n, d], Any), (vec![d, f], Any), (vec![f, e], Any)],
            move |b, x| b.op(Op::GeluFfn { tanh }, x).unwrap(),
        ));
    }
    v.push(case(
        "Rope",
        vec![
            (vec![2, n, 2 * d], Any),
            (vec![n, 2 * d], Any),
            (vec![n, 2 * d], Any),
        ],
        |b, x| b.op(Op::Rope, x).unwrap(),
    ));
    let rows = 3 + r.below(5);
    let vocab = 3 + r.below(6);
    let targets: Vec<i64> = (0..rows).map(|_| r.below(vocab) as i64).collect();
    for bias in [false, true] {
        let t = targets.clone();
        let mut operands = vec![(vec![rows, d], Any), (vec![d, vocab], Any)];
        if bias {
            operands.push((vec![vocab], Any));
        }
        v.push(case(
            format!("LmHeadCe chunk 2 of {rows} rows, bias {bias}"),
            operands,
            move |b, x| {
                let t =
                    b.g.add_const(Tensor::from_i64(DType::I64, vec![rows, 1], &t));
                let mut ops = vec![x[0], x[1], t];
                ops.extend(x.get(2));
                let y = b
                    .op(
                        Op::LmHeadCe {
                            chunk: 2,
                            weighted: false,
                        },
                        &ops,
                    )
                    .unwrap();
                b.reshape(y, vec![1]).unwrap()
            },
        ));
        // Weighted rows (the causal-LM loss's masked mean): one row left out, the others
        // at weights that need not sum to 1.
        let t = targets.clone();
        let weights: Vec<f64> = (0..rows)
            .map(|i| {
                if i == 1 {
                    0.0
                } else {
                    0.25 + 0.5 * (i % 3) as f64
                }
            })
            .collect();
        let mut operands = vec![(vec![rows, d], Any), (vec![d, vocab], Any)];
        if bias {
            operands.push((vec![vocab], Any));
        }
        v.push(case(
            format!("LmHeadCe weighted chunk 2 of {rows} rows, bias {bias}"),
            operands,
            move |b, x| {
                let t =
                    b.g.add_const(Tensor::from_i64(DType::I64, vec![rows, 1], &t));
                let acc = memc_ir::loss_dtype(b.dtype(x[0]));
                let r =
                    b.g.add_const(Tensor::from_f64(acc, vec![rows, 1], &weights));
                let mut ops = vec![x[0], x[1], t, r];
                ops.extend(x.get(2));
                let y = b
                    .op(
                        Op::LmHeadCe {
                            chunk: 2,
                            weighted: true,
                        },
                        &ops,
                    )
                    .unwrap();
                b.reshape(y, vec![1]).unwrap()
            },
        ));
    }
    for kind in [ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max] {
        let axes: Vec<usize> = (0..3).filter(|_| r.below(2) == 0).collect();
        let axes = if axes.is_empty() { vec![1] } else { axes };
        let keep_dims = r.below(2) == 0;
        v.push(case(
            format!("{kind:?} {axes:?} keep {keep_dims}"),
            vec![(t.clone(), Any)],
            move |b, x| {
                b.op(
                    Op::Reduce {
                        kind,
                        axes: axes.clone(),
                        keep_dims,
                    },
                    &[x[0]],
                )
                .unwrap()
            },
        ));
    }

    // Indexing ops and their transposes, with random (also negative and repeated) indices.
    let ga = r.below(3);
    let dim = t[ga] as i64;
    let idx: Vec<i64> = (0..4)
        .map(|_| r.below(dim as usize) as i64 - if r.below(2) == 0 { dim } else { 0 })
        .collect();
    let idx2 = idx.clone();
    v.push(case(
        format!("Gather axis {ga}"),
        vec![(t.clone(), Any)],
        move |b, x| {
            let i =
                b.g.add_const(Tensor::from_i64(DType::I64, vec![2, 2], &idx2));
            b.op(Op::Gather { axis: ga }, &[x[0], i]).unwrap()
        },
    ));
    let mut scat_shape = t[..ga].to_vec();
    scat_shape.extend([2, 2]);
    scat_shape.extend_from_slice(&t[ga + 1..]);
    let t2 = t.clone();
    v.push(case(
        format!("ScatterAdd axis {ga}"),
        vec![(scat_shape, Any)],
        move |b, x| {
            let i =
                b.g.add_const(Tensor::from_i64(DType::I64, vec![2, 2], &idx));
            b.op(
                Op::ScatterAdd {
                    axis: ga,
                    shape: t2.clone(),
                },
                &[x[0], i],
            )
            .unwrap()
        },
    ));
    let eidx: Vec<i64> = (0..t.iter().product::<usize>())
        .map(|_| r.below(t[ga]) as i64)
        .collect();
    let (t3, e2) = (t.clone(), eidx.clone());
    v.push(case(
        format!("GatherElements axis {ga}"),
        vec![(t.clone(), Any)],
        move |b, x| {
            let i = b.g.add_const(Tensor::from_i64(DType::I64, t3.clone(), &e2));
            b.op(Op::GatherElements { axis: ga }, &[x[0], i]).unwrap()
        },
    ));
    let t4 = t.clone();
    v.push(case(
        format!("ScatterElementsAdd axis {ga}"),
        vec![(t.clone(), Any)],
        move |b, x| {
            let i =
                b.g.add_const(Tensor::from_i64(DType::I64, t4.clone(), &eidx));
            b.op(
                Op::ScatterElementsAdd {
                    axis: ga,
                    shape: t4.clone(),
                },
                &[x[0], i],
            )
            .unwrap()
        },
    ));
    let nd: Vec<i64> = (0..3)
        .flat_map(|_| [r.below(t[0]) as i64, r.below(t[1]) as i64])
        .collect();
    let nd2 = nd.clone();
    v.push(case("GatherNd", vec![(t.clone(), Any)], move |b, x| {
        let i =
            b.g.add_const(Tensor::from_i64(DType::I64, vec![3, 2], &nd2));
        b.op(Op::GatherNd, &[x[0], i]).unwrap()
    }));
    let t5 = t.clone();
    v.push(case(
        "ScatterNdAdd",
        vec![(vec![3, t[2]], Any)],
        move |b, x| {
            let i = b.g.add_const(Tensor::from_i64(DType::I64, vec![3, 2], &nd));
            b.op(Op::ScatterNdAdd { shape: t5.clone() }, &[x[0], i])
                .unwrap()
        },
    ));

    // Layout ops.
    let total: usize = t.iter().product();
    v.push(case("Reshape", vec![(t.clone(), Any)], move |b, x| {
        b.reshape(x[0], vec![total]).unwrap()
    }));
    let mut perm = vec![0, 1, 2];
    for i in (1..3).rev() {
        perm.swap(i, r.below(i + 1));
    }
    v.push(case(
        format!("Transpose {perm:?}"),
        vec![(t.clone(), Any)],
        move |b, x| b.op(Op::Transpose { perm: perm.clone() }, &[x[0]]).unwrap(),
    ));
    let big: Vec<usize> = t.iter().map(|&d| d + 3).collect();
    let starts: Vec<usize> = big.iter().map(|&d| r.below(d - 1)).collect();
    let steps: Vec<usize> = (0..3).map(|_| 1 + r.below(2)).collect();
    let ends: Vec<usize> = big
        .iter()
        .zip(&starts)
        .map(|(&d, &s)| s + 1 + r.below(d - s))
        .collect();
    let (s2, e2, st2) = (starts.clone(), ends.clone(), steps.clone());
    v.push(case("Slice", vec![(big.clone(), Any)], move |b, x| {
        b.op(
            Op::Slice {
                starts: s2.clone(),
                ends: e2.clone(),
                steps: st2.clone(),
            },
            &[x[0]],
        )
        .unwrap()
    }));
    let sliced: Vec<usize> = (0..3)
        .map(|k| (ends[k] - starts[k]).div_ceil(steps[k]))
        .collect();
    let big2 = big.clone();
    v.push(case("SliceScatter", vec![(sliced, Any)], move |b, x| {
        b.op(
            Op::SliceScatter {
                shape: big2.clone(),
                starts: starts.clone(),
                steps: steps.clone(),
            },
            &[x[0]],
        )
        .unwrap()
    }));
    let ca = r.below(3);
    let mut t_other = t.clone();
    t_other[ca] += 1;
    v.push(case(
        format!("Concat axis {ca}"),
        vec![(t.clone(), Any), (t_other.clone(), Any), (t.clone(), Any)],
        move |b, x| b.op(Op::Concat { axis: ca }, &[x[0], x[1], x[2]]).unwrap(),
    ));
    let target = vec![2, t[0], 3, t[2]];
    v.push(case(
        "Expand",
        vec![(vec![t[0], 1, t[2]], Any)],
        move |b, x| b.expand(x[0], target.clone()).unwrap(),
    ));
    let (upper, kk) = (r.below(2) == 0, r.below(3) as i64 - 1);
    v.push(case(
        format!("Trilu upper {upper} k {kk}"),
        vec![(vec![2, 3, 4], Any)],
        move |b, x| b.op(Op::Trilu { upper, k: kk }, &[x[0]]).unwrap(),
    ));
    v
}

fn binary_op(op: Op) -> impl Fn(&mut Builder, &[ValueId]) -> ValueId {
    move |b, x| b.op(op.clone(), &[x[0], x[1]]).unwrap()
}

#[test]
fn every_vjp_matches_finite_differences() {
    for seed in 0..8 {
        let mut rng = Rng(seed);
        for c in cases(&mut rng) {
            run_case(&c, &mut rng);
        }
    }
}

#[test]
fn tied_use_gets_one_summed_gradient() {
    // y = x * x + x: dy/dx = 2x + 1 through three uses of one value.
    let mut g = Graph::new();
    let x = g.add_input("x", TensorType::new(DType::F64, [3]));
    let mut b = Builder::new(&mut g, memc_ir::Phase::Forward, "");
    let xx = b.mul(x, x).unwrap();
    let y = b.add(xx, x).unwrap();
    let loss = b.reduce(ReduceKind::Sum, y, vec![0], false).unwrap();
    let grads = differentiate(&mut g, loss, &[x]).unwrap();
    assert_eq!(grads.len(), 1);
    g.add_output("g", grads[0].1);
    let feeds = HashMap::from([(
        "x".to_string(),
        Tensor::from_f64(DType::F64, vec![3], &[1.0, -2.0, 0.5]),
    )]);
    assert_eq!(
        interpret(&g, &feeds).unwrap()[0].1.to_f64_vec(),
        vec![3.0, -3.0, 2.0]
    );
}
