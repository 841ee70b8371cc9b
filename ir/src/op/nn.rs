//! Shape inference of the neural-network ops: `softmax`, `log_softmax`, the norms (`layer_norm`,
//! `rms_norm`) and attention with its backward ops (`attention_lse`, `attention_grad`).

use super::{arity, broadcast_shapes, check_axis, float_operand, one, Op, Scores};
use crate::TensorType;

/// [`Op::infer`] for [`Op::Softmax`], [`Op::LogSoftmax`], [`Op::LayerNorm`], [`Op::RmsNorm`],
/// [`Op::Attention`], [`Op::AttentionLse`] and [`Op::AttentionGrad`].
pub(super) fn infer(op: &Op, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
    let arity = |n: usize| arity(op, inputs, n);
    match op {
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            arity(1)?;
            let x = &inputs[0];
            float_operand(op, x)?;
            check_axis(*axis, x.rank())?;
            one(x.clone())
        }
        Op::LayerNorm { axis, .. } | Op::RmsNorm { axis, .. } => {
            // x, a scale and (layer_norm only) a bias, both of the normalised dims' shape.
            let bias = matches!(op, Op::LayerNorm { .. });
            let max = if bias { 3 } else { 2 };
            if !(2..=max).contains(&inputs.len()) {
                return Err(format!(
                    "`{}` takes {} operands, got {}",
                    op.name(),
                    if bias { "2 or 3" } else { "2" },
                    inputs.len()
                ));
            }
            let x = &inputs[0];
            float_operand(op, x)?;
            check_axis(*axis, x.rank())?;
            for p in &inputs[1..] {
                if p.dtype != x.dtype || p.shape[..] != x.shape[*axis..] {
                    return Err(format!(
                        "`{}` {} must be {}{:?}, got {p}",
                        op.name(),
                        if bias { "scale/bias" } else { "scale" },
                        x.dtype,
                        &x.shape[*axis..]
                    ));
                }
            }
            one(x.clone())
        }
        Op::Attention { .. } => {
            if inputs.len() != 4 {
                return Err(format!(
                    "`attention` takes q, k, v and a mask, got {} operands",
                    inputs.len()
                ));
            }
            let (q, k, v, m) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
            float_operand(op, q)?;
            let ok = q.rank() == 4
                && k.rank() == 4
                && v.rank() == 4
                && k.dtype == q.dtype
                && v.dtype == q.dtype
                && m.dtype == q.dtype
                && k.shape[0] == q.shape[0]
                && v.shape[0] == q.shape[0]
                && k.shape[1] > 0
                && q.shape[1] % k.shape[1] == 0
                && v.shape[1] == k.shape[1]
                && k.shape[3] == q.shape[3]
                && v.shape[2] == k.shape[2];
            if !ok {
                return Err(format!("`attention` needs q [B,H,S,D], k [B,Hk,T,D], v [B,Hk,T,Dv] with H a multiple of Hk, got {q}, {k}, {v}"));
            }
            let scores = [q.shape[0], q.shape[1], q.shape[2], k.shape[2]];
            if broadcast_shapes(&m.shape, &scores).ok().as_deref() != Some(&scores[..]) {
                return Err(format!(
                    "`attention` mask {m} does not broadcast to {scores:?}"
                ));
            }
            one(TensorType::new(
                q.dtype,
                vec![q.shape[0], q.shape[1], q.shape[2], v.shape[3]],
            ))
        }
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            let lse = matches!(op, Op::AttentionLse { .. });
            let want = if lse { 3 } else { 7 };
            if inputs.len() != want {
                return Err(format!(
                    "`{}` takes {want} operands, got {}",
                    op.name(),
                    inputs.len()
                ));
            }
            let (q, k) = (&inputs[0], &inputs[1]);
            let (v, m) = if lse {
                (&inputs[1], &inputs[2])
            } else {
                (&inputs[2], &inputs[3])
            };
            // The attention these belong to must be well typed.
            let y = Op::Attention(Scores::scaled(1.0)).infer(&[
                q.clone(),
                k.clone(),
                v.clone(),
                m.clone(),
            ])?;
            let rows = TensorType::new(q.dtype, q.shape[..3].to_vec());
            if lse {
                return one(rows);
            }
            if inputs[4] != rows || inputs[6] != rows || inputs[5] != y[0] {
                return Err(format!(
                    "`attention_grad` needs lse and delta {rows} and dy {}, got {}, {} and {}",
                    y[0], inputs[4], inputs[6], inputs[5]
                ));
            }
            let Op::AttentionGrad { wrt, .. } = op else {
                unreachable!()
            };
            one(inputs[*wrt].clone())
        }
        _ => unreachable!("`{}` is not a neural-network op", op.name()),
    }
}
