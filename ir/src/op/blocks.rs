//! The block ops (`swiglu_ffn`, `gelu_ffn`, `moc_ffn`, `rope`, `residual`, `rev_couple`,
//! `lm_head_ce`): their shape inference and their primitive steps ([`Op::expansion`]).

use super::{
    arity, broadcast_shapes, float_operand, loss_dtype, one, BinaryOp, Op, Operand, ReduceKind,
    UnaryOp,
};
use crate::{DType, TensorType};

/// [`Op::infer`] for [`Op::SwigluFfn`], [`Op::GeluFfn`], [`Op::MocFfn`], [`Op::Rope`],
/// [`Op::Residual`], [`Op::RevCouple`] and [`Op::LmHeadCe`].
pub(super) fn infer(op: &Op, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
    let arity = |n: usize| arity(op, inputs, n);
    match op {
        Op::MocFfn { k, .. } => {
            let y = Op::SwigluFfn.infer(inputs)?;
            let f = inputs[1].shape[1];
            if *k == 0 || *k > f {
                return Err(format!("`moc_ffn`: k = {k} must be in 1..={f}"));
            }
            Ok(y)
        }
        Op::LmHeadCe { weighted, .. } => {
            let fixed = if *weighted { 4 } else { 3 };
            if !(fixed..=fixed + 1).contains(&inputs.len()) {
                return Err(format!(
                    "`lm_head_ce` takes h, w, targets{} and an optional bias, got {} operands",
                    if *weighted { ", row weights" } else { "" },
                    inputs.len()
                ));
            }
            let (h, w, t) = (&inputs[0], &inputs[1], &inputs[2]);
            if *weighted {
                let r = &inputs[3];
                if r.dtype != loss_dtype(h.dtype)
                    || r.shape != [h.shape.first().copied().unwrap_or(0), 1]
                {
                    return Err(format!(
                        "`lm_head_ce`: the row weights must be {}[N, 1], got {r}",
                        loss_dtype(h.dtype)
                    ));
                }
            }
            if let Some(b) = inputs.get(fixed) {
                if b.dtype != h.dtype || b.shape != [w.shape.get(1).copied().unwrap_or(0)] {
                    return Err(format!(
                        "`lm_head_ce`: the bias must be {}[V], got {b}",
                        h.dtype
                    ));
                }
            }
            float_operand(op, h)?;
            if h.rank() != 2
                || w.dtype != h.dtype
                || w.rank() != 2
                || w.shape[0] != h.shape[1]
                || !matches!(t.dtype, DType::I64 | DType::I32)
                || t.shape != [h.shape[0], 1]
            {
                return Err(format!(
                    "`lm_head_ce` takes h [N, d], w [d, V] of h's dtype and integer targets [N, 1], got {h}, {w}, {t}"
                ));
            }
            one(TensorType::new(loss_dtype(h.dtype), vec![]))
        }
        Op::Residual => {
            arity(2)?;
            float_operand(op, &inputs[0])?;
            if inputs[0] != inputs[1] {
                return Err(format!(
                    "`residual`: the stream and the branch must have one type, got {} and {}",
                    inputs[0], inputs[1]
                ));
            }
            one(inputs[0].clone())
        }
        Op::RevCouple => {
            arity(3)?;
            float_operand(op, &inputs[0])?;
            if inputs[0] != inputs[1] || inputs[2].rank() != 0 || inputs[2].dtype != inputs[0].dtype
            {
                return Err(format!(
                    "`rev_couple` takes the stream and the branch of one type and a rank-0 scale of their dtype, got {}, {} and {}",
                    inputs[0], inputs[1], inputs[2]
                ));
            }
            one(inputs[0].clone())
        }
        Op::Rope => {
            arity(3)?;
            let x = &inputs[0];
            float_operand(op, x)?;
            if x.shape.last().is_none_or(|d| d % 2 != 0) {
                return Err(format!("`rope` needs an even last dim, got {x}"));
            }
            for t in &inputs[1..] {
                if t.dtype != x.dtype || broadcast_shapes(&x.shape, &t.shape)? != x.shape {
                    return Err(format!(
                        "`rope`: cos and sin must be {} broadcastable to {:?}, got {t}",
                        x.dtype, x.shape
                    ));
                }
            }
            one(x.clone())
        }
        Op::SwigluFfn | Op::GeluFfn { .. } => {
            let n = inputs.len();
            // A 4-operand `gelu_ffn` is gated (GeGLU): x, w_gate, w_up, w_down as SwiGLU's.
            let gated = n == 4;
            let bias = match (op, n) {
                (Op::SwigluFfn, 4) | (Op::GeluFfn { .. }, 3 | 4) => false,
                (Op::GeluFfn { .. }, 5) => true,
                _ => {
                    return Err(format!(
                        "`{}` takes {} operands, got {n}",
                        op.name(),
                        if *op == Op::SwigluFfn {
                            "4"
                        } else {
                            "3, 4 (gated) or 5"
                        }
                    ))
                }
            };
            let x = &inputs[0];
            float_operand(op, x)?;
            let d = *x.shape.last().ok_or("the FFN input must have rank ≥ 1")?;
            // (weight, rows) pairs; biases follow their weight.
            let (w_in, w_out): (Vec<&TensorType>, &TensorType) = match op {
                _ if gated => (vec![&inputs[1], &inputs[2]], &inputs[3]),
                _ if bias => (vec![&inputs[1]], &inputs[3]),
                _ => (vec![&inputs[1]], &inputs[2]),
            };
            let f = w_in[0].shape.get(1).copied().unwrap_or(0);
            for w in &w_in {
                if w.dtype != x.dtype || w.shape != [d, f] {
                    return Err(format!(
                        "`{}`: input weights must be {}[{d}, {f}], got {w}",
                        op.name(),
                        x.dtype
                    ));
                }
            }
            if w_out.dtype != x.dtype || w_out.rank() != 2 || w_out.shape[0] != f {
                return Err(format!(
                    "`{}`: the output weight must be {}[{f}, e], got {w_out}",
                    op.name(),
                    x.dtype
                ));
            }
            let e = w_out.shape[1];
            if bias {
                for (b, len) in [(&inputs[2], f), (&inputs[4], e)] {
                    if b.dtype != x.dtype || b.shape != [len] {
                        return Err(format!(
                            "`gelu_ffn`: a bias must be {}[{len}], got {b}",
                            x.dtype
                        ));
                    }
                }
            }
            let mut shape = x.shape.clone();
            *shape.last_mut().unwrap() = e;
            one(TensorType::new(x.dtype, shape))
        }
        _ => unreachable!("`{}` is not a block op", op.name()),
    }
}

/// [`Op::expansion`]: the primitive steps of a block op, `None` for every other op.
pub(super) fn expansion(op: &Op, operands: &[TensorType]) -> Option<Vec<(Op, Vec<Operand>)>> {
    use Operand::{Input, Step};
    match op {
        Op::Residual => Some(vec![(Op::Binary(BinaryOp::Add), vec![Input(0), Input(1)])]),
        Op::RevCouple => Some(vec![
            (Op::Binary(BinaryOp::Mul), vec![Input(0), Input(2)]),
            (Op::Binary(BinaryOp::Add), vec![Step(0), Input(1)]),
        ]),
        Op::MocFfn { k, gelu } => {
            let act = match gelu {
                None => UnaryOp::Silu,
                Some(false) => UnaryOp::Gelu,
                Some(true) => UnaryOp::GeluTanh,
            };
            let mut shape = operands[0].shape.clone();
            let last = shape.len().checked_sub(1)?;
            shape[last] = operands[1].shape[1];
            Some(vec![
                (Op::MatMul, vec![Input(0), Input(1)]),
                (Op::MatMul, vec![Input(0), Input(2)]),
                (Op::TopK { k: *k }, vec![Step(0)]),
                (Op::GatherElements { axis: last }, vec![Step(0), Step(2)]),
                (Op::GatherElements { axis: last }, vec![Step(1), Step(2)]),
                (Op::Unary(act), vec![Step(3)]),
                (Op::Binary(BinaryOp::Mul), vec![Step(5), Step(4)]),
                (
                    Op::ScatterElementsAdd { axis: last, shape },
                    vec![Step(6), Step(2)],
                ),
                (Op::MatMul, vec![Step(7), Input(3)]),
            ])
        }
        Op::LmHeadCe { chunk, weighted } => {
            // Per chunk: rows of h, their logits (in f32), log-probabilities, the targets'
            // (times the rows' weights, weighted).
            let (n, d) = (operands[0].shape[0], operands[0].shape[1]);
            let f32_logits = loss_dtype(operands[0].dtype) != operands[0].dtype;
            let bias = if *weighted { 4 } else { 3 };
            let mut steps = vec![];
            let mut picked = vec![];
            for r0 in (0..n).step_by((*chunk).max(1)) {
                let r1 = (r0 + chunk).min(n);
                let rows = |width: usize| Op::Slice {
                    starts: vec![r0, 0],
                    ends: vec![r1, width],
                    steps: vec![1, 1],
                };
                steps.push((rows(d), vec![Input(0)]));
                steps.push((Op::MatMul, vec![Step(steps.len() - 1), Input(1)]));
                if operands.len() == bias + 1 {
                    steps.push((
                        Op::Binary(BinaryOp::Add),
                        vec![Step(steps.len() - 1), Input(bias)],
                    ));
                }
                if f32_logits {
                    steps.push((Op::Cast { to: DType::F32 }, vec![Step(steps.len() - 1)]));
                }
                steps.push((Op::LogSoftmax { axis: 1 }, vec![Step(steps.len() - 1)]));
                let logp = steps.len() - 1;
                steps.push((rows(1), vec![Input(2)]));
                steps.push((
                    Op::GatherElements { axis: 1 },
                    vec![Step(logp), Step(steps.len() - 1)],
                ));
                if *weighted {
                    let gathered = steps.len() - 1;
                    steps.push((rows(1), vec![Input(3)]));
                    steps.push((
                        Op::Binary(BinaryOp::Mul),
                        vec![Step(gathered), Step(steps.len() - 1)],
                    ));
                }
                picked.push(Step(steps.len() - 1));
            }
            steps.push((Op::Concat { axis: 0 }, picked));
            steps.push((
                Op::Reduce {
                    kind: if *weighted {
                        ReduceKind::Sum
                    } else {
                        ReduceKind::Mean
                    },
                    axes: vec![0, 1],
                    keep_dims: false,
                },
                vec![Step(steps.len() - 1)],
            ));
            steps.push((Op::Unary(UnaryOp::Neg), vec![Step(steps.len() - 1)]));
            Some(steps)
        }
        Op::Rope => {
            let shape = &operands.first()?.shape;
            let (last, d) = (shape.len().checked_sub(1)?, *shape.last()?);
            let half = |from: usize, to: usize| {
                let mut starts = vec![0; shape.len()];
                let mut ends = shape.clone();
                starts[last] = from;
                ends[last] = to;
                Op::Slice {
                    starts,
                    ends,
                    steps: vec![1; shape.len()],
                }
            };
            Some(vec![
                (half(0, d / 2), vec![Input(0)]),
                (half(d / 2, d), vec![Input(0)]),
                (Op::Unary(UnaryOp::Neg), vec![Step(1)]),
                (Op::Concat { axis: last }, vec![Step(2), Step(0)]),
                (Op::Binary(BinaryOp::Mul), vec![Step(3), Input(2)]),
                (Op::Binary(BinaryOp::Mul), vec![Input(0), Input(1)]),
                (Op::Binary(BinaryOp::Add), vec![Step(5), Step(4)]),
            ])
        }
        Op::SwigluFfn => Some(vec![
            (Op::MatMul, vec![Input(0), Input(1)]),
            (Op::MatMul, vec![Input(0), Input(2)]),
            (Op::Unary(UnaryOp::Silu), vec![Step(0)]),
            (Op::Binary(BinaryOp::Mul), vec![Step(2), Step(1)]),
            (Op::MatMul, vec![Step(3), Input(3)]),
        ]),
        Op::GeluFfn { tanh } => {
            let act = Op::Unary(if *tanh {
                UnaryOp::GeluTanh
            } else {
                UnaryOp::Gelu
            });
            Some(if operands.len() == 4 {
                // Gated (GeGLU): (gelu(x·w_gate) ⊙ (x·w_up))·w_down.
                vec![
                    (Op::MatMul, vec![Input(0), Input(1)]),
                    (Op::MatMul, vec![Input(0), Input(2)]),
                    (act, vec![Step(0)]),
                    (Op::Binary(BinaryOp::Mul), vec![Step(2), Step(1)]),
                    (Op::MatMul, vec![Step(3), Input(3)]),
                ]
            } else if operands.len() == 5 {
                vec![
                    (Op::MatMul, vec![Input(0), Input(1)]),
                    (Op::Binary(BinaryOp::Add), vec![Step(0), Input(2)]),
                    (act, vec![Step(1)]),
                    (Op::MatMul, vec![Step(2), Input(3)]),
                    (Op::Binary(BinaryOp::Add), vec![Step(3), Input(4)]),
                ]
            } else {
                vec![
                    (Op::MatMul, vec![Input(0), Input(1)]),
                    (act, vec![Step(0)]),
                    (Op::MatMul, vec![Step(1), Input(2)]),
                ]
            })
        }
        _ => None,
    }
}
