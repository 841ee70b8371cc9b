//! The textual IR: `print(parse(print(g))) == print(g)` on random graphs, and one clear error
//! per malformed text.

use memc_ir::{
    parse, print, verify, BinaryOp, DType, Graph, Op, ParamRole, Phase, ReduceKind, Tensor,
    TensorType, UnaryOp, ValueId,
};
use proptest::prelude::*;

/// A small deterministic generator (SplitMix64) driving graph construction from a seed.
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
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())].clone()
    }
}

fn random_const(r: &mut Rng, ty: TensorType) -> Tensor {
    let n = ty.numel();
    let specials = [
        0.0,
        -0.0,
        1.5,
        -2.25,
        1e-7,
        3.4e38,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.1,
    ];
    if ty.dtype.is_float() {
        let splat = r.below(3) == 0;
        let first = r.pick(&specials);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if splat {
                    first
                } else {
                    r.pick(&specials) * (r.below(100) as f32 - 50.0)
                }
            })
            .collect();
        Tensor::from_f32(ty.dtype, ty.shape, &v)
    } else {
        let v: Vec<i64> = (0..n).map(|_| r.below(7) as i64 - 3).collect();
        Tensor::from_i64(ty.dtype, ty.shape, &v)
    }
}

/// Builds a random valid graph: candidate ops are tried on random operands and kept when shape
/// inference accepts them.
fn random_graph(seed: u64) -> Graph {
    let mut r = Rng(seed);
    let mut g = Graph::new();
    let dims = [1usize, 2, 3, 4];
    let mut vals: Vec<ValueId> = Vec::new();
    for k in 0..1 + r.below(2) {
        let shape: Vec<usize> = (0..1 + r.below(3)).map(|_| r.pick(&dims)).collect();
        let name = if k == 0 {
            "x \"quoted\" \\ path/ä".to_string()
        } else {
            format!("in{k}")
        };
        vals.push(g.add_input(
            name,
            TensorType::new(r.pick(&[DType::F32, DType::F16, DType::BF16]), shape),
        ));
    }
    for k in 0..r.below(3) {
        let shape: Vec<usize> = (0..r.below(3)).map(|_| r.pick(&dims)).collect();
        let ty = TensorType::new(r.pick(&DType::ALL), shape);
        vals.push(g.add_const(random_const(&mut r, ty.clone())));
        let role = [
            ParamRole::Weight,
            ParamRole::Constant,
            ParamRole::OptimizerState,
        ][k % 3];
        vals.push(g.add_param(format!("p.{k}"), role, ty, None));
    }
    let unary = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Sigmoid,
        UnaryOp::Silu,
        UnaryOp::Gelu,
        UnaryOp::GeluTanh,
        UnaryOp::Not,
        UnaryOp::IsNaN,
        UnaryOp::Sqrt,
    ];
    let binary = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
        BinaryOp::Less,
        BinaryOp::Equal,
        BinaryOp::And,
        BinaryOp::Max,
        BinaryOp::GreaterEqual,
    ];
    for _ in 0..r.below(24) {
        let a = r.pick(&vals);
        let b = r.pick(&vals);
        let ta = g.value(a).ty.clone();
        let rank = ta.rank();
        let axis = r.below(rank.max(1));
        let op = match r.below(14) {
            0 => Op::Unary(r.pick(&unary)),
            1 | 2 => Op::Binary(r.pick(&binary)),
            3 => Op::Cast {
                to: r.pick(&DType::ALL),
            },
            4 => Op::Softmax { axis },
            5 => Op::Reduce {
                kind: r.pick(&[ReduceKind::Sum, ReduceKind::Mean, ReduceKind::Max]),
                axes: vec![axis],
                keep_dims: r.below(2) == 0,
            },
            6 => Op::Transpose {
                perm: (0..rank).rev().collect(),
            },
            7 => Op::Reshape {
                shape: vec![ta.numel()],
            },
            8 => Op::Slice {
                starts: vec![0; rank],
                ends: ta.shape.clone(),
                steps: (0..rank).map(|_| 1 + r.below(2)).collect(),
            },
            9 => Op::Concat { axis },
            10 => Op::Expand {
                shape: std::iter::once(2).chain(ta.shape.iter().copied()).collect(),
            },
            11 => Op::Trilu {
                upper: r.below(2) == 0,
                k: r.below(3) as i64 - 1,
            },
            12 => Op::LayerNorm {
                axis,
                epsilon: 1e-5,
            },
            _ => Op::MatMul,
        };
        let operands: Vec<ValueId> = match &op {
            Op::Binary(_) | Op::MatMul | Op::Concat { .. } => vec![a, b],
            Op::LayerNorm { .. } => {
                let p = g.add_param(
                    format!("ln{}", g.values().len()),
                    ParamRole::Weight,
                    TensorType::new(ta.dtype, ta.shape[axis..].to_vec()),
                    None,
                );
                vec![a, p]
            }
            _ => vec![a],
        };
        if let Ok(out) = g.add_node(op, &operands, "") {
            let phases = [
                Phase::Forward,
                Phase::Backward,
                Phase::Weight,
                Phase::Update,
                Phase::Recompute,
            ];
            g.set_phase(g.producer(out[0]).unwrap(), r.pick(&phases));
            vals.extend(out);
        }
    }
    for k in 0..1 + r.below(3) {
        g.add_output(format!("out{k}"), r.pick(&vals));
    }
    // Optimizer-style updates: a weight or state param takes a value of its type.
    let params: Vec<ValueId> = g.params().collect();
    for p in params {
        let role = match &g.value(p).def {
            memc_ir::ValueDef::Param { role, .. } => *role,
            _ => unreachable!(),
        };
        if role == ParamRole::Constant {
            continue;
        }
        let ty = g.value(p).ty.clone();
        if let Some(&v) = vals
            .iter()
            .find(|&&v| g.value(v).ty == ty && g.producer(v).is_some())
        {
            g.add_update(p, v);
        }
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn printing_round_trips(seed in any::<u64>()) {
        let g = random_graph(seed);
        verify(&g).unwrap();
        let text = print(&g);
        let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        verify(&parsed).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(print(&parsed), text.clone());
        // The parsed graph is in canonical order: parsing its text gives the same graph.
        prop_assert_eq!(&parse(&print(&parsed)).unwrap(), &parsed);
        // Compaction keeps the text of what outputs depend on.
        let mut compacted = parsed.clone();
        compacted.compact();
        verify(&compacted).unwrap();
        prop_assert_eq!(print(&parse(&print(&compacted)).unwrap()), print(&compacted));
    }
}

#[test]
fn parse_errors_name_the_line() {
    let cases = [
        (
            "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = frob(%0) : f32[2]\n}",
            "line 3: unknown op `frob`",
        ),
        (
            "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = neg(%7) : f32[2]\n}",
            "line 3: `%7` is not defined, found `%7`",
        ),
        (
            "graph {\n  %0 = input \"x\" : f33[2]\n}",
            "line 2: expected a dtype (f32, f16, bf16, i64, i32, bool), found `f33`",
        ),
        (
            "graph {\n  %0 = const [1, 2] : i64[3]\n}",
            "line 2: 2 values for a constant of type i64[3]",
        ),
        (
            "graph {\n  %0 = input \"x\" : f32[2]\n  %0 = input \"y\" : f32[2]\n}",
            "line 3: `%0` is defined twice",
        ),
        (
            "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = softmax(%0) : f32[2]\n}",
            "line 3: op `softmax` needs attribute `axis`",
        ),
        (
            "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = neg(%0) {axis = 1} : f32[2]\n}",
            "line 3: op `neg` has no attribute `axis`",
        ),
        (
            "graph {\n  %0 = input \"x : f32[2]\n}",
            "line 2: unterminated string",
        ),
        (
            "graph {\n  %0 = input \"x\" : f32[2]\n",
            "line 2: expected `%N = ...`, `output`, `update`, `grad` or `}`, found end of input",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(parse(text).unwrap_err().to_string(), want, "{text}");
    }
}

#[test]
fn printer_output_is_stable() {
    let text = r#"graph {
  %0 = input "x" : f32[2, 3]
  %1 = param "w" : f32[3, 4]
  %2 = param const "memc.const.0" : bool[2, 4]
  %3 = const splat(0.5) : f32[4]
  %4 = const [1e-5, -inf, NaN] : f32[3]
  %5 = matmul(%0, %1) : f32[2, 4]
  %6 = mul(%5, %3) : f32[2, 4]
  %7 = reduce_mean(%6) {axes = [1], keep_dims = true} : f32[2, 1]
  output "y" = %7
}
"#;
    let g = parse(text).unwrap();
    verify(&g).unwrap();
    assert_eq!(print(&g), text);
}

#[test]
fn declared_gradients_round_trip_and_are_checked() {
    let text = "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = param \"w\" : f32[2]\n  %2 = mul(%0, %1) : f32[2]\n  output \"y\" = %2\n  grad %1 = %2\n}\n";
    let g = parse(text).unwrap();
    assert_eq!(g.grads().len(), 1);
    assert_eq!(memc_ir::print(&g), text);
    memc_ir::verify(&g).unwrap();
    // Only a weight has a gradient, of its own type.
    let bad = text.replace("grad %1 = %2", "grad %0 = %2");
    let err = memc_ir::verify(&parse(&bad).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("grad target %0 is not a weight"), "{err}");
}
