//! Fused elementwise kernels, built through MLIR and LLVM and run by LLVM's JIT, against the
//! reference interpreter on random inputs.

use std::collections::HashMap;

use memc_codegen::fuse::fuse;
use memc_codegen::jit::with_host_jit;
use memc_codegen::kernel::{elementwise_mlir, lower};
use memc_ir::{
    interpret, BinaryOp, DType, Graph, Op, Tensor, TensorType, UnaryOp, ValueDef, ValueId,
};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn random(r: &mut Rng, ty: &TensorType) -> Tensor {
    let n = ty.numel();
    match ty.dtype {
        DType::Bool => Tensor::from_i64(
            DType::Bool,
            ty.shape.clone(),
            &(0..n).map(|_| (r.next() < 0.5) as i64).collect::<Vec<_>>(),
        ),
        DType::I64 | DType::I32 => Tensor::from_i64(
            ty.dtype,
            ty.shape.clone(),
            &(0..n)
                .map(|_| (r.next() * 20.0) as i64 - 10)
                .collect::<Vec<_>>(),
        ),
        d => Tensor::from_f64(
            d,
            ty.shape.clone(),
            &(0..n).map(|_| r.next() * 4.0 - 2.0).collect::<Vec<_>>(),
        ),
    }
}

/// Runs every elementwise kernel of `g` through the JIT and compares each kernel output with the
/// interpreter's value (graph outputs are the kernels' outputs in these tests).
fn check(g: &Graph, tol: f64) {
    let mut r = Rng(42);
    let feeds: HashMap<String, Tensor> = g
        .inputs()
        .iter()
        .map(|&v| match &g.value(v).def {
            ValueDef::Input { name } => (name.clone(), random(&mut r, &g.value(v).ty)),
            _ => unreachable!(),
        })
        .collect();
    check_with(g, tol, feeds)
}

/// [`check`] on the inputs `feeds`.
fn check_with(g: &Graph, tol: f64, feeds: HashMap<String, Tensor>) {
    let want: HashMap<ValueId, Tensor> = {
        let out = interpret(g, &feeds).unwrap();
        g.outputs()
            .iter()
            .zip(out)
            .map(|((_, v), (_, t))| (*v, t))
            .collect()
    };
    // Buffers by value: inputs and constants first, kernel results as they are computed.
    let mut store: HashMap<ValueId, Vec<u8>> = HashMap::new();
    for (i, v) in g.values().iter().enumerate() {
        let id = ValueId(i as u32);
        match &v.def {
            ValueDef::Input { name } => drop(store.insert(id, feeds[name].bytes().to_vec())),
            ValueDef::Const(t) => drop(store.insert(id, t.bytes().to_vec())),
            _ => {}
        }
    }
    let kernels = fuse(g);
    for k in &kernels {
        let ops: Vec<&str> = k.nodes.iter().map(|&n| g.node(n).op.name()).collect();
        assert!(k.elementwise, "these graphs are all elementwise: {ops:?}");
    }
    let mut lowered = Vec::new();
    for (n, k) in kernels.iter().enumerate() {
        let name = format!("k{n}");
        let mlir = elementwise_mlir(g, k, &name).unwrap();
        let l = lower(&mlir, &name, k.inputs.len() + k.outputs.len())
            .unwrap_or_else(|e| panic!("{e}\n{mlir}"));
        lowered.push((name, l.llvm_ir));
    }
    with_host_jit(&lowered, |call| {
        for (n, k) in kernels.iter().enumerate() {
            let mut bufs: Vec<Vec<u8>> = k.inputs.iter().map(|v| store[v].clone()).collect();
            for &v in &k.outputs {
                bufs.push(vec![0u8; g.value(v).ty.bytes()]);
            }
            let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
            call(&format!("k{n}"), &ptrs);
            for (j, &v) in k.outputs.iter().enumerate() {
                store.insert(v, bufs[k.inputs.len() + j].clone());
            }
        }
    })
    .unwrap();
    for (&v, t) in &want {
        let ty = g.value(v).ty.clone();
        let got = Tensor::from_bytes(ty.clone(), store[&v].clone().into()).unwrap();
        let (a, b) = (got.to_f64_vec(), t.to_f64_vec());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let ok = x == y || (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (1.0 + y.abs());
            assert!(
                ok,
                "output %{} [{i}] ({ty}): kernels {x} vs interpreter {y}",
                v.0
            );
        }
    }
}

fn graph(
    inputs: &[(&str, DType, &[usize])],
    build: impl FnOnce(&mut Graph, &[ValueId]) -> Vec<ValueId>,
) -> Graph {
    let mut g = Graph::new();
    let xs: Vec<ValueId> = inputs
        .iter()
        .map(|(n, d, s)| g.add_input(*n, TensorType::new(*d, s.to_vec())))
        .collect();
    for (i, v) in build(&mut g, &xs).into_iter().enumerate() {
        g.add_output(format!("y{i}"), v);
    }
    memc_ir::verify(&g).unwrap();
    g
}

fn op(g: &mut Graph, op: Op, ins: &[ValueId]) -> ValueId {
    g.add_node(op, ins, "").unwrap()[0]
}

#[test]
fn float_unary_and_binary_chain_with_broadcasting() {
    let g = graph(
        &[
            ("x", DType::F32, &[2, 3, 4]),
            ("y", DType::F32, &[4]),
            ("z", DType::F32, &[3, 1]),
        ],
        |g, x| {
            let a = op(g, Op::Binary(BinaryOp::Mul), &[x[0], x[1]]);
            let b = op(g, Op::Unary(UnaryOp::Erf), &[a]);
            let c = op(g, Op::Unary(UnaryOp::Tanh), &[x[0]]);
            let d = op(g, Op::Binary(BinaryOp::Add), &[b, c]);
            let e = op(g, Op::Binary(BinaryOp::Div), &[d, x[2]]);
            let f = op(g, Op::Unary(UnaryOp::Sigmoid), &[e]);
            let h = op(g, Op::Binary(BinaryOp::Max), &[f, x[1]]);
            let i = op(g, Op::Unary(UnaryOp::Exp), &[h]);
            let j = op(g, Op::Binary(BinaryOp::Sub), &[i, x[2]]);
            vec![op(g, Op::Unary(UnaryOp::Neg), &[j])]
        },
    );
    check(&g, 1e-6);
}

#[test]
fn masks_select_casts_and_pow() {
    let g = graph(
        &[
            ("x", DType::F32, &[2, 5]),
            ("m", DType::Bool, &[2, 1]),
            ("i", DType::I64, &[5]),
        ],
        |g, x| {
            let two = g.add_const(Tensor::from_i64(DType::I64, vec![], &[2]));
            let sq = op(g, Op::Binary(BinaryOp::Pow), &[x[0], two]);
            let nan = op(g, Op::Unary(UnaryOp::IsNaN), &[sq]);
            let not = op(g, Op::Unary(UnaryOp::Not), &[nan]);
            let both = op(g, Op::Binary(BinaryOp::And), &[not, x[1]]);
            let fi = op(g, Op::Cast { to: DType::F32 }, &[x[2]]);
            let less = op(g, Op::Binary(BinaryOp::Less), &[x[0], fi]);
            let sel = op(g, Op::Where, &[both, sq, fi]);
            let sel2 = op(g, Op::Where, &[less, sel, x[0]]);
            let rec = op(g, Op::Unary(UnaryOp::Reciprocal), &[sel2]);
            let ints = op(g, Op::Cast { to: DType::I64 }, &[rec]);
            vec![op(g, Op::Cast { to: DType::F32 }, &[ints])]
        },
    );
    check(&g, 1e-6);
}

#[test]
fn bf16_rounds_after_every_op() {
    let g = graph(
        &[("x", DType::BF16, &[3, 7]), ("y", DType::BF16, &[7])],
        |g, x| {
            let a = op(g, Op::Binary(BinaryOp::Mul), &[x[0], x[1]]);
            let b = op(g, Op::Binary(BinaryOp::Add), &[a, x[0]]);
            let c = op(g, Op::Unary(UnaryOp::Sqrt), &[b]);
            vec![op(g, Op::Cast { to: DType::F32 }, &[c])]
        },
    );
    check(&g, 1e-6);
}

#[test]
fn rank0_and_expand() {
    let g = graph(
        &[("x", DType::F32, &[]), ("y", DType::F32, &[1, 3])],
        |g, x| {
            let a = op(g, Op::Expand { shape: vec![2, 3] }, &[x[1]]);
            let b = op(g, Op::Binary(BinaryOp::Mul), &[a, x[0]]);
            vec![op(g, Op::Unary(UnaryOp::Cos), &[b])]
        },
    );
    check(&g, 1e-6);
}

/// The MLIR and LLVM IR of two small kernels, reviewed: SiLU times a broadcast row (the SwiGLU
/// gate) in f32, and a bf16 add (computed in f32, rounded by integer ops).
#[test]
fn kernel_text_snapshots() {
    let silu = graph(
        &[("g", DType::F32, &[2, 8]), ("u", DType::F32, &[8])],
        |g, x| {
            let s = op(g, Op::Unary(UnaryOp::Sigmoid), &[x[0]]);
            let a = op(g, Op::Binary(BinaryOp::Mul), &[x[0], s]);
            vec![op(g, Op::Binary(BinaryOp::Mul), &[a, x[1]])]
        },
    );
    let add = graph(
        &[("a", DType::BF16, &[4]), ("b", DType::BF16, &[4])],
        |g, x| vec![op(g, Op::Binary(BinaryOp::Add), &[x[0], x[1]])],
    );
    for (name, g) in [("silu_mul", &silu), ("bf16_add", &add)] {
        let kernels: Vec<_> = fuse(g).into_iter().filter(|k| k.elementwise).collect();
        assert_eq!(kernels.len(), 1);
        let k = &kernels[0];
        let mlir = elementwise_mlir(g, k, name).unwrap();
        let lowered = lower(&mlir, name, k.inputs.len() + k.outputs.len()).unwrap();
        insta::assert_snapshot!(format!("{name}_mlir"), mlir);
        insta::assert_snapshot!(format!("{name}_llvm"), lowered.llvm_ir);
    }
}

/// The device side of the same kernels, reviewed: SiLU·row mapped to blocks and threads (the
/// MLIR the gpu passes start from), and the PTX of the bf16 add for sm_90.
#[test]
fn device_text_snapshots() {
    let silu = graph(
        &[("g", DType::F32, &[2, 8]), ("u", DType::F32, &[8])],
        |g, x| {
            let s = op(g, Op::Unary(UnaryOp::Sigmoid), &[x[0]]);
            let a = op(g, Op::Binary(BinaryOp::Mul), &[x[0], s]);
            vec![op(g, Op::Binary(BinaryOp::Mul), &[a, x[1]])]
        },
    );
    let k = &fuse(&silu)[0];
    let mlir = elementwise_mlir(&silu, k, "silu_mul").unwrap();
    insta::assert_snapshot!(
        "silu_mul_gpu_mlir",
        memc_codegen::ptx::gpu_form(&mlir, "silu_mul").unwrap()
    );
    let add = graph(
        &[("a", DType::BF16, &[300]), ("b", DType::BF16, &[300])],
        |g, x| vec![op(g, Op::Binary(BinaryOp::Add), &[x[0], x[1]])],
    );
    let k = &fuse(&add)[0];
    let mlir = elementwise_mlir(&add, k, "bf16_add").unwrap();
    let ctx = memc_codegen::kernel::Lowerer::new();
    let d = memc_codegen::ptx::lower_gpu(ctx.context(), &mlir, "bf16_add").unwrap();
    assert_eq!(d.launches.len(), 1);
    assert_eq!(
        d.launches[0].grid,
        [2, 1, 1],
        "300 elements in blocks of 256"
    );
    assert_eq!(d.launches[0].block, [256, 1, 1]);
    assert_eq!(d.launches[0].args, vec![0, 1, 2]);
    let libdevice = memc_codegen::ptx::find_libdevice().unwrap();
    let ptx = memc_codegen::ptx::ptx_module(&d.llvm_ir, 90, &libdevice).unwrap();
    insta::assert_snapshot!("bf16_add_ptx", ptx);
}

#[test]
fn chains_ending_in_reductions() {
    for (kind, axes, keep) in [
        (memc_ir::ReduceKind::Mean, vec![2], true),
        (memc_ir::ReduceKind::Sum, vec![0, 2], false),
        (memc_ir::ReduceKind::Max, vec![1], true),
        (memc_ir::ReduceKind::Max, vec![0, 2], false),
        (memc_ir::ReduceKind::Sum, vec![0, 1, 2], false),
    ] {
        let g = graph(
            &[("x", DType::F32, &[2, 3, 5]), ("w", DType::F32, &[5])],
            |g, x| {
                let sq = op(g, Op::Binary(BinaryOp::Mul), &[x[0], x[0]]);
                let sc = op(g, Op::Binary(BinaryOp::Mul), &[sq, x[1]]);
                vec![op(
                    g,
                    Op::Reduce {
                        kind,
                        axes: axes.clone(),
                        keep_dims: keep,
                    },
                    &[sc],
                )]
            },
        );
        assert_eq!(
            fuse(&g).len(),
            1,
            "the chain and its reduction are one kernel"
        );
        check(&g, 1e-5);
    }
}

/// A max reduction (vectorised as `maxnumf` beside an "any NaN" flag) is NaN exactly where a
/// reduced row holds a NaN, as the interpreter's; −∞ rows stay −∞.
#[test]
fn max_reductions_keep_nans() {
    let mut xs: Vec<f64> = (0..4 * 40).map(|i| ((i * 37) % 23) as f64 - 11.0).collect();
    xs[40 + 17] = f64::NAN; // row 1
    xs[3 * 40..4 * 40]
        .iter_mut()
        .for_each(|x| *x = f64::INFINITY); // row 3: −∞ once negated
    xs[2 * 40 + 39] = f64::NAN; // row 2, last element
    let n = xs.len();
    let g = graph(&[("x", DType::F32, &[n])], |g, x| {
        let r = op(g, Op::Reshape { shape: vec![4, 40] }, &[x[0]]);
        let e = op(g, Op::Unary(UnaryOp::Neg), &[r]);
        vec![op(
            g,
            Op::Reduce {
                kind: memc_ir::ReduceKind::Max,
                axes: vec![1],
                keep_dims: false,
            },
            &[e],
        )]
    });
    let kernels = fuse(&g);
    let red = kernels.last().unwrap();
    let mlir = elementwise_mlir(&g, red, "k0").unwrap();
    let l = lower(&mlir, "k0", red.inputs.len() + red.outputs.len()).unwrap();
    // The reshape's result, negated then reduced.
    let mut bufs: Vec<Vec<u8>> = vec![
        xs.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect(),
        vec![0u8; 16],
    ];
    with_host_jit(&[("k0".to_string(), l.llvm_ir)], |call| {
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        call("k0", &ptrs);
    })
    .unwrap();
    let got: Vec<f32> = bufs[1]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let row_max = |r: usize| -> f32 {
        (0..40)
            .map(|j| -(xs[r * 40 + j] as f32))
            .fold(f32::NEG_INFINITY, f32::max)
    };
    assert_eq!(got[0], row_max(0), "{got:?}");
    assert!(got[1].is_nan() && got[2].is_nan(), "{got:?}");
    assert_eq!(got[3], f32::NEG_INFINITY, "{got:?}");
    assert_eq!(red.inputs.len(), 1);
    // The same as a kernel of its own (`reduce_max`), over either axis.
    let x = Tensor::from_f64(DType::F32, vec![4, 40], &xs);
    for axes in [vec![1], vec![0]] {
        check_op(
            Op::Reduce {
                kind: memc_ir::ReduceKind::Max,
                axes,
                keep_dims: true,
            },
            &[TensorType::new(DType::F32, vec![4, 40])],
            0.0,
            &[(0, x.clone())],
        );
    }
}

/// Runs the kernel of `g`'s one node on `args`: its result (of type `ty`, `bytes` long) and,
/// for a gather, the index flag it leaves.
fn run_op(g: &Graph, args: &[Tensor], ty: &TensorType, bytes: usize) -> (Tensor, [i64; 4]) {
    let node = g.producer(g.outputs()[0].1).unwrap();
    let flagged = memc_codegen::ops::takes_index_flag(&g.node(node).op);
    let mlir = memc_codegen::ops::op_mlir(g, node, "k").unwrap();
    let n = memc_codegen::ops::kernel_args(g, node);
    let l = lower(&mlir, "k", n).unwrap_or_else(|e| panic!("{e}\n{mlir}"));
    let mut bufs: Vec<Vec<u8>> = args.iter().map(|t| t.bytes().to_vec()).collect();
    bufs.push(vec![0u8; bytes]);
    if flagged {
        bufs.push(vec![0u8; 32]);
    }
    with_host_jit(&[("k".to_string(), l.llvm_ir)], |call| {
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        call("k", &ptrs);
    })
    .unwrap();
    let mut flag = [0i64; 4];
    if flagged {
        let f = bufs.pop().unwrap();
        for (k, c) in f.chunks_exact(8).enumerate() {
            flag[k] = i64::from_le_bytes(c.try_into().unwrap());
        }
    }
    let got = Tensor::from_bytes(ty.clone(), bufs.pop().unwrap().into()).unwrap();
    (got, flag)
}

/// A single-op graph's generated kernel (`ops::op_mlir`) on random inputs (and `extra`
/// constants) against the interpreter.
fn check_op(op: Op, inputs: &[TensorType], tol: f64, fixed: &[(usize, Tensor)]) {
    let mut r = Rng(7);
    let args: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, ty)| {
            fixed
                .iter()
                .find(|(k, _)| *k == i)
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| random(&mut r, ty))
        })
        .collect();
    let mut g = Graph::new();
    let ins: Vec<ValueId> = args.iter().map(|t| g.add_const(t.clone())).collect();
    let y = g.add_node(op.clone(), &ins, "").unwrap()[0];
    g.add_output("y", y);
    let refs: Vec<&Tensor> = args.iter().collect();
    let want = memc_ir::eval_op(&op, &refs).unwrap();
    let (got, flag) = run_op(&g, &args, want.ty(), want.bytes().len());
    assert_eq!(flag, [0; 4], "{}: the index flag is set", op.name());
    for (i, (x, y)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
        assert!(
            *x == y || (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (1.0 + y.abs()),
            "{} [{i}]: kernel {x} vs interpreter {y}",
            op.name()
        );
    }
    // The cpu backend's own implementation, where the runtime has one (tiled attention).
    if let Some(memc_runtime::program::Native::Attention(spec)) =
        memc_codegen::host::native(&g, g.node(g.producer(y).unwrap()))
    {
        let bytes: Vec<u64> = args
            .iter()
            .map(|t| t.bytes().len() as u64)
            .chain([want.bytes().len() as u64])
            .collect();
        spec.check(&bytes).unwrap();
        let ins: Vec<&[u8]> = args.iter().map(|t| &t.bytes()[..]).collect();
        let mut out = vec![0u8; want.bytes().len()];
        memc_runtime::attention::run(&spec, &ins, &mut out);
        let got = Tensor::from_bytes(want.ty().clone(), out.into()).unwrap();
        for (i, (x, y)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
            assert!(
                *x == y || (x.is_nan() && y.is_nan()) || (x - y).abs() <= tol * (1.0 + y.abs()),
                "{} [{i}]: tiled {x} vs interpreter {y}",
                op.name()
            );
        }
    }
}

/// Attention (multi-head and grouped-query, a causal mask with -inf and a fully masked row)
/// and RMSNorm kernels match the interpreter.
#[test]
fn attention_and_rms_norm_kernels() {
    let ty = |s: &[usize]| TensorType::new(DType::F32, s.to_vec());
    let (s, t) = (5, 7);
    let mut mask = vec![0.0; s * t];
    for i in 0..s {
        for j in 0..t {
            if j > i + 2 || i == 3 {
                mask[i * t + j] = f64::NEG_INFINITY;
            }
        }
    }
    let mask = Tensor::from_f64(DType::F32, vec![1, 1, s, t], &mask);
    for (h, hk) in [(2, 2), (4, 2), (3, 1)] {
        check_op(
            Op::Attention(memc_ir::Scores::scaled(0.35)),
            &[
                ty(&[2, h, s, 8]),
                ty(&[2, hk, t, 8]),
                ty(&[2, hk, t, 6]),
                ty(&[1, 1, s, t]),
            ],
            1e-5,
            &[(3, mask.clone())],
        );
    }
    // The backward ops, against the interpreter on random operands.
    for (h, hk) in [(2, 2), (4, 2)] {
        let (q, k, v) = (ty(&[2, h, s, 8]), ty(&[2, hk, t, 8]), ty(&[2, hk, t, 6]));
        check_op(
            Op::AttentionLse(memc_ir::Scores::scaled(0.35)),
            &[q.clone(), k.clone(), ty(&[1, 1, s, t])],
            1e-5,
            &[(2, mask.clone())],
        );
        for wrt in 0..3 {
            check_op(
                Op::AttentionGrad {
                    scores: memc_ir::Scores::scaled(0.35),
                    wrt,
                },
                &[
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    ty(&[1, 1, s, t]),
                    ty(&[2, h, s]),
                    ty(&[2, h, s, 6]),
                    ty(&[2, h, s]),
                ],
                1e-5,
                &[(3, mask.clone())],
            );
        }
    }
    // The score attributes: soft-capping, causal and window masking (no mask tensor: a
    // rank-0 zero), more keys than queries; forward and backward kernels.
    let capped = memc_ir::Scores {
        scale: 0.35,
        softcap: 2.0,
        causal: true,
        window: 3,
    };
    let zero = Tensor::from_f64(DType::F32, Vec::<usize>::new(), &[0.0]);
    for sc in [
        capped,
        memc_ir::Scores {
            window: 0,
            ..capped
        },
        memc_ir::Scores {
            softcap: 0.0,
            ..capped
        },
    ] {
        let (h, hk) = (4, 2);
        let (q, k, v) = (ty(&[2, h, s, 8]), ty(&[2, hk, t, 8]), ty(&[2, hk, t, 6]));
        check_op(
            Op::Attention(sc),
            &[q.clone(), k.clone(), v.clone(), ty(&[])],
            1e-5,
            &[(3, zero.clone())],
        );
        check_op(
            Op::AttentionLse(sc),
            &[q.clone(), k.clone(), ty(&[])],
            1e-5,
            &[(2, zero.clone())],
        );
        for wrt in 0..3 {
            check_op(
                Op::AttentionGrad { scores: sc, wrt },
                &[
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    ty(&[]),
                    ty(&[2, h, s]),
                    ty(&[2, h, s, 6]),
                    ty(&[2, h, s]),
                ],
                1e-5,
                &[(3, zero.clone())],
            );
        }
    }
    check_op(
        Op::RmsNorm {
            axis: 2,
            epsilon: 1e-6,
        },
        &[ty(&[2, 3, 16]), ty(&[16])],
        1e-5,
        &[],
    );
}

/// Attention at sizes that span several of the tiled implementation's query and key blocks
/// (more keys than queries, grouped heads), in f32, f64 and bf16: the generated kernels and
/// the cpu backend's tiled attention both match the interpreter, with a random additive mask
/// (one row fully masked), and with causal, window and soft-cap attributes. The gradients get
/// a consistent log-sum-exp and delta (`Σ dy·y`), as in training.
#[test]
fn tiled_attention_across_blocks() {
    let (b, h, hk, s, t, d, dv) = (2, 4, 2, 70, 150, 16, 8);
    for (dt, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-9), (DType::BF16, 2e-2)] {
        let ty = |sh: &[usize]| TensorType::new(dt, sh.to_vec());
        let mut r = Rng(11);
        let mut mask: Vec<f64> = (0..s * t)
            .map(|_| {
                if r.next() < 0.2 {
                    f64::NEG_INFINITY
                } else {
                    r.next() - 0.5
                }
            })
            .collect();
        mask[5 * t..6 * t]
            .iter_mut()
            .for_each(|m| *m = f64::NEG_INFINITY);
        let mask = Tensor::from_f64(dt, vec![1, 1, s, t], &mask);
        let zero = Tensor::from_f64(dt, Vec::<usize>::new(), &[0.0]);
        let plain = memc_ir::Scores::scaled(0.25);
        let windowed = memc_ir::Scores {
            scale: 0.25,
            softcap: 3.0,
            causal: true,
            window: 40,
        };
        let causal = memc_ir::Scores {
            causal: true,
            ..plain
        };
        let (q, k, v, dy) = (
            random(&mut r, &ty(&[b, h, s, d])),
            random(&mut r, &ty(&[b, hk, t, d])),
            random(&mut r, &ty(&[b, hk, t, dv])),
            random(&mut r, &ty(&[b, h, s, dv])),
        );
        let types =
            |ts: &[&Tensor]| -> Vec<TensorType> { ts.iter().map(|t| t.ty().clone()).collect() };
        let fixed = |ts: &[&Tensor]| -> Vec<(usize, Tensor)> {
            ts.iter()
                .enumerate()
                .map(|(i, t)| (i, (*t).clone()))
                .collect()
        };
        for (sc, m) in [(plain, &mask), (windowed, &zero), (causal, &zero)] {
            let fwd = [&q, &k, &v, m];
            check_op(Op::Attention(sc), &types(&fwd), tol, &fixed(&fwd));
            let lse_in = [&q, &k, m];
            check_op(Op::AttentionLse(sc), &types(&lse_in), tol, &fixed(&lse_in));
            let lse = memc_ir::eval_op(&Op::AttentionLse(sc), &lse_in).unwrap();
            let y = memc_ir::eval_op(&Op::Attention(sc), &fwd).unwrap();
            let delta: Vec<f64> = dy
                .to_f64_vec()
                .chunks(dv)
                .zip(y.to_f64_vec().chunks(dv))
                .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
                .collect();
            let delta = Tensor::from_f64(dt, vec![b, h, s], &delta);
            let grad_in = [&q, &k, &v, m, &lse, &dy, &delta];
            for wrt in 0..3 {
                check_op(
                    Op::AttentionGrad { scores: sc, wrt },
                    &types(&grad_in),
                    tol,
                    &fixed(&grad_in),
                );
            }
        }
    }
}

/// Host kernels compute f32 `exp` as inlined arithmetic (`kernel::vector_math`): within 2 ulp
/// of libm across the range, exact at the edges (−∞ → 0, +∞ and overflow → +∞, NaN stays NaN,
/// deep underflow → 0, subnormal results within one subnormal step).
#[test]
fn exp_as_arithmetic_matches_libm() {
    let mut xs: Vec<f32> = (-25000..=25000).map(|i| i as f32 * 0.00355).collect();
    xs.extend([
        f32::NEG_INFINITY,
        f32::INFINITY,
        f32::NAN,
        -1000.0,
        -110.5,
        -103.0,
        -95.0,
        -87.5,
        88.7,
        88.73,
        89.0,
        0.0,
        -0.0,
        1e-30,
        -1e-30,
    ]);
    let n = xs.len();
    let g = graph(&[("x", DType::F32, &[n])], |g, x| {
        vec![op(g, Op::Unary(UnaryOp::Exp), &[x[0]])]
    });
    let kernels = fuse(&g);
    let mlir = elementwise_mlir(&g, &kernels[0], "k0").unwrap();
    let l = lower(&mlir, "k0", 2).unwrap();
    assert!(
        !l.llvm_ir.contains("@expf("),
        "exp is not a libm call on the host"
    );
    let mut bufs: Vec<Vec<u8>> = vec![
        xs.iter().flat_map(|x| x.to_le_bytes()).collect(),
        vec![0u8; 4 * n],
    ];
    with_host_jit(&[("k0".to_string(), l.llvm_ir)], |call| {
        let ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        call("k0", &ptrs);
    })
    .unwrap();
    for (i, c) in bufs[1].chunks_exact(4).enumerate() {
        let got = f32::from_le_bytes(c.try_into().unwrap());
        let want = xs[i].exp();
        let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
        assert!(
            (got.is_nan() && want.is_nan()) || got == want || ulps <= 2,
            "exp({}) = {got}, libm {want} ({ulps} ulp)",
            xs[i]
        );
    }
}

/// Values a diverging step produces: NaN, ±∞, numbers whose squares overflow f32, zeros and
/// ordinary values, in every pattern across two operands.
fn hostile_values(n: usize, shift: usize) -> Vec<f64> {
    let pool = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        3.0e30,
        -2.0e25,
        0.0,
        -0.0,
        1.5,
        -0.75,
        1.0e-30,
        88.0,
        -104.0,
    ];
    (0..n).map(|i| pool[(i * 5 + shift) % pool.len()]).collect()
}

/// Compiled kernels give NaN and ±∞ exactly where the interpreter does (maxima, minima,
/// comparisons, selects, reductions, the transcendental functions), so a non-finite value is
/// neither swallowed nor made up by code generation.
#[test]
fn non_finite_values_propagate_as_in_the_interpreter() {
    use memc_ir::ReduceKind;
    let shape = [4usize, 12];
    let n = 48;
    let g = graph(
        &[("x", DType::F32, &shape), ("y", DType::F32, &shape)],
        |g, x| {
            let mut outs = vec![];
            for u in [
                UnaryOp::Neg,
                UnaryOp::Exp,
                UnaryOp::Log,
                UnaryOp::Sqrt,
                UnaryOp::Reciprocal,
                UnaryOp::Tanh,
                UnaryOp::Erf,
                UnaryOp::Sigmoid,
                UnaryOp::Silu,
                UnaryOp::Gelu,
                UnaryOp::GeluTanh,
                UnaryOp::IsNaN,
            ] {
                outs.push(op(g, Op::Unary(u), &[x[0]]));
            }
            for b in [
                BinaryOp::Add,
                BinaryOp::Sub,
                BinaryOp::Mul,
                BinaryOp::Div,
                BinaryOp::Pow,
                BinaryOp::Max,
                BinaryOp::Min,
                BinaryOp::Equal,
                BinaryOp::Less,
                BinaryOp::GreaterEqual,
            ] {
                outs.push(op(g, Op::Binary(b), &[x[0], x[1]]));
            }
            let less = op(g, Op::Binary(BinaryOp::Less), &[x[0], x[1]]);
            outs.push(op(g, Op::Where, &[less, x[0], x[1]]));
            // Reductions at the end of a fused chain (a chain's last node).
            for kind in [ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max] {
                let neg = op(g, Op::Unary(UnaryOp::Neg), &[x[0]]);
                let r = Op::Reduce {
                    kind,
                    axes: vec![1],
                    keep_dims: false,
                };
                outs.push(op(g, r, &[neg]));
            }
            outs
        },
    );
    let feeds = HashMap::from([
        (
            "x".to_string(),
            Tensor::from_f64(DType::F32, shape.to_vec(), &hostile_values(n, 0)),
        ),
        (
            "y".to_string(),
            Tensor::from_f64(DType::F32, shape.to_vec(), &hostile_values(n, 7)),
        ),
    ]);
    check_with(&g, 1e-6, feeds);
    // The kernels of their own: reductions, softmax and log-softmax over rows with NaN and ±∞.
    let x = Tensor::from_f64(DType::F32, shape.to_vec(), &hostile_values(n, 3));
    let reduce = |kind, axis| Op::Reduce {
        kind,
        axes: vec![axis],
        keep_dims: true,
    };
    for op in [
        Op::Softmax { axis: 1 },
        Op::LogSoftmax { axis: 1 },
        reduce(ReduceKind::Sum, 1),
        reduce(ReduceKind::Mean, 0),
        reduce(ReduceKind::Max, 1),
    ] {
        check_op(
            op,
            &[TensorType::new(DType::F32, shape.to_vec())],
            1e-6,
            &[(0, x.clone())],
        );
    }
}

/// The norms' statistics do not overflow where the interpreter's (f64) do not: a row of
/// values near 1e20 (its sum of squares is past f32's range) normalises to the interpreter's
/// finite result, not to zeros.
#[test]
fn norms_of_large_rows_match_the_interpreter() {
    let (rows, d) = (3usize, 64usize);
    let xs: Vec<f64> = (0..rows * d)
        .map(|i| {
            (1.0 + (i % 7) as f64)
                * 10f64.powi(18 + (i % 3) as i32)
                * if i % 2 == 0 { 1.0 } else { -1.0 }
        })
        .collect();
    let x = Tensor::from_f64(DType::F32, vec![rows, d], &xs);
    let w = Tensor::from_f64(
        DType::F32,
        vec![d],
        &(0..d).map(|i| 0.5 + i as f64 / 64.0).collect::<Vec<_>>(),
    );
    let b = Tensor::from_f64(DType::F32, vec![d], &vec![0.25; d]);
    let ty = TensorType::new(DType::F32, vec![rows, d]);
    let wt = TensorType::new(DType::F32, vec![d]);
    check_op(
        Op::RmsNorm {
            axis: 1,
            epsilon: 1e-6,
        },
        &[ty.clone(), wt.clone()],
        1e-6,
        &[(0, x.clone()), (1, w.clone())],
    );
    check_op(
        Op::LayerNorm {
            axis: 1,
            epsilon: 1e-5,
        },
        &[ty, wt.clone(), wt],
        1e-6,
        &[(0, x), (1, w), (2, b)],
    );
}

/// Attention's backward at scores near 1e11, where the stored (f32) log-sum-exp is off by
/// thousands: `p = exp(s − lse)` is clamped at 1 in the interpreter, the generated kernels and
/// the cpu backend's tiled attention alike, so a zero upstream gradient gives zero gradients
/// (unclamped, `p` overflows and `∞ · 0` is a NaN the interpreter and the kernels disagreed on).
#[test]
fn attention_grad_at_huge_scores_stays_finite() {
    let (b, h, s, d) = (1usize, 2usize, 5usize, 8usize);
    let ty = |sh: &[usize]| TensorType::new(DType::F32, sh.to_vec());
    let mut r = Rng(3);
    let mut big = |n: usize| -> Vec<f64> { (0..n).map(|_| (r.next() + 0.5) * 3.0e5).collect() };
    let q = Tensor::from_f64(DType::F32, vec![b, h, s, d], &big(b * h * s * d));
    let k = Tensor::from_f64(DType::F32, vec![b, h, s, d], &big(b * h * s * d));
    let v = Tensor::from_f64(DType::F32, vec![b, h, s, d], &big(b * h * s * d));
    let zero = Tensor::from_f64(DType::F32, Vec::<usize>::new(), &[0.0]);
    let sc = memc_ir::Scores::scaled(0.35);
    let lse = memc_ir::eval_op(&Op::AttentionLse(sc), &[&q, &k, &zero]).unwrap();
    assert!(lse.to_f64_vec().iter().all(|x| x.is_finite() && *x > 1e10));
    let dy = Tensor::from_f64(DType::F32, vec![b, h, s, d], &vec![0.0; b * h * s * d]);
    let delta = Tensor::from_f64(DType::F32, vec![b, h, s], &vec![0.0; b * h * s]);
    for wrt in 0..3 {
        let op = Op::AttentionGrad { scores: sc, wrt };
        let args = [&q, &k, &v, &zero, &lse, &dy, &delta];
        let want = memc_ir::eval_op(&op, &args).unwrap();
        assert!(
            want.to_f64_vec().iter().all(|x| *x == 0.0),
            "interpreter, wrt {wrt}"
        );
        check_op(
            op,
            &[
                ty(&[b, h, s, d]),
                ty(&[b, h, s, d]),
                ty(&[b, h, s, d]),
                ty(&[]),
                ty(&[b, h, s]),
                ty(&[b, h, s, d]),
                ty(&[b, h, s]),
            ],
            0.0,
            &args
                .iter()
                .enumerate()
                .map(|(i, t)| (i, (*t).clone()))
                .collect::<Vec<_>>(),
        );
    }
}

/// The gathers' kernels against the interpreter, negative indices included, and with an index
/// out of range: the interpreter refuses it, the kernel clamps it (no access outside its
/// buffers) and reports it in the index flag (hit, index, axis, size), which the runtime turns
/// into the same refusal.
#[test]
fn gathers_report_indices_out_of_range() {
    let table = Tensor::from_f64(
        DType::F32,
        vec![5, 3],
        &(0..15).map(|i| i as f64 * 0.5 - 2.0).collect::<Vec<_>>(),
    );
    let ty = |d, s: &[usize]| TensorType::new(d, s.to_vec());
    let idx = |d, s: &[usize], v: &[i64]| Tensor::from_i64(d, s.to_vec(), v);
    let cases = [
        (
            Op::Gather { axis: 0 },
            idx(DType::I64, &[2, 2], &[0, 4, -1, 2]),
            idx(DType::I64, &[2, 2], &[0, 5, -1, 2]),
            [1, 5, 0, 5],
        ),
        (
            Op::Gather { axis: 1 },
            idx(DType::I32, &[2], &[2, -3]),
            idx(DType::I32, &[2], &[2, -4]),
            [1, -4, 1, 3],
        ),
        (
            Op::GatherElements { axis: 0 },
            idx(DType::I64, &[2, 3], &[0, 1, 4, -5, 3, 2]),
            idx(DType::I64, &[2, 3], &[0, 1, 4, 7, 3, 2]),
            [1, 7, 0, 5],
        ),
        (
            Op::GatherNd,
            idx(DType::I64, &[2, 2], &[4, 2, -5, 0]),
            idx(DType::I64, &[2, 2], &[4, 3, 0, 0]),
            [1, 3, 1, 3],
        ),
    ];
    for (op, good, bad, flag) in cases {
        let ity = good.ty().clone();
        check_op(
            op.clone(),
            &[ty(DType::F32, &[5, 3]), ity],
            0.0,
            &[(0, table.clone()), (1, good.clone())],
        );
        let err = memc_ir::eval_op(&op, &[&table, &bad]).unwrap_err();
        assert!(err.contains("out of range"), "{}: {err}", op.name());
        let want = memc_ir::eval_op(&op, &[&table, &good]).unwrap();
        let mut g = Graph::new();
        let ins = [g.add_const(table.clone()), g.add_const(bad.clone())];
        let y = g.add_node(op.clone(), &ins, "").unwrap()[0];
        g.add_output("y", y);
        let (_, got) = run_op(&g, &[table.clone(), bad], want.ty(), want.bytes().len());
        assert_eq!(got, flag, "{}", op.name());
    }
}
