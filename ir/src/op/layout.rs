//! Shape inference of the layout ops: `reshape`, `transpose`, `slice` and its transpose
//! `slice_scatter`, `concat`, `expand` and `trilu`.

use super::{arity, broadcast_shapes, check_axis, one, Op};
use crate::TensorType;

/// [`Op::infer`] for [`Op::Reshape`], [`Op::Transpose`], [`Op::Slice`], [`Op::Concat`],
/// [`Op::Expand`], [`Op::Trilu`] and [`Op::SliceScatter`].
pub(super) fn infer(op: &Op, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
    let arity = |n: usize| arity(op, inputs, n);
    match op {
        Op::Reshape { shape } => {
            arity(1)?;
            let x = &inputs[0];
            let t = TensorType::new(x.dtype, shape.clone());
            if t.checked_bytes().is_none() || t.numel() != x.numel() {
                return Err(format!(
                    "cannot reshape {x} ({} elements) to {:?}",
                    x.numel(),
                    shape
                ));
            }
            one(t)
        }
        Op::Transpose { perm } => {
            arity(1)?;
            let x = &inputs[0];
            let mut seen = vec![false; x.rank()];
            if perm.len() != x.rank()
                || perm
                    .iter()
                    .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
            {
                return Err(format!(
                    "{:?} is not a permutation of {} dims",
                    perm,
                    x.rank()
                ));
            }
            one(TensorType::new(
                x.dtype,
                perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>(),
            ))
        }
        Op::Slice {
            starts,
            ends,
            steps,
        } => {
            arity(1)?;
            let x = &inputs[0];
            let r = x.rank();
            if starts.len() != r || ends.len() != r || steps.len() != r {
                return Err(format!(
                    "`slice` needs starts, ends and steps for all {r} dims"
                ));
            }
            let mut shape = Vec::with_capacity(r);
            for k in 0..r {
                if steps[k] == 0 || starts[k] > ends[k] || ends[k] > x.shape[k] {
                    return Err(format!(
                        "`slice` dim {k}: {}..{} step {} is not within 0..{}",
                        starts[k], ends[k], steps[k], x.shape[k]
                    ));
                }
                shape.push((ends[k] - starts[k]).div_ceil(steps[k]));
            }
            one(TensorType::new(x.dtype, shape))
        }
        Op::Concat { axis } => {
            let first = inputs
                .first()
                .ok_or("`concat` needs at least one operand")?;
            check_axis(*axis, first.rank())?;
            let mut shape = first.shape.clone();
            for t in &inputs[1..] {
                if t.dtype != first.dtype || t.rank() != first.rank() {
                    return Err(format!("`concat` operands differ: {first} vs {t}"));
                }
                for k in 0..t.rank() {
                    if k != *axis && t.shape[k] != first.shape[k] {
                        return Err(format!(
                            "`concat` operands differ outside axis {axis}: {first} vs {t}"
                        ));
                    }
                }
                shape[*axis] = shape[*axis]
                    .checked_add(t.shape[*axis])
                    .ok_or("`concat` result is too large")?;
            }
            one(TensorType::new(first.dtype, shape))
        }
        Op::Expand { shape } => {
            arity(1)?;
            let x = &inputs[0];
            let b = broadcast_shapes(&x.shape, shape)?;
            if &b != shape {
                return Err(format!("cannot expand {x} to {shape:?}"));
            }
            one(TensorType::new(x.dtype, b))
        }
        Op::Trilu { .. } => {
            arity(1)?;
            if inputs[0].rank() < 2 {
                return Err("`trilu` needs at least 2 dims".into());
            }
            one(inputs[0].clone())
        }
        Op::SliceScatter {
            shape,
            starts,
            steps,
        } => {
            arity(1)?;
            let x = &inputs[0];
            let r = shape.len();
            if x.rank() != r || starts.len() != r || steps.len() != r {
                return Err(format!(
                    "`slice_scatter` needs starts and steps for all {r} dims of {x}"
                ));
            }
            for k in 0..r {
                let fits = steps[k] > 0
                    && (x.shape[k] == 0 || starts[k] + (x.shape[k] - 1) * steps[k] < shape[k]);
                if !fits {
                    return Err(format!(
                        "`slice_scatter` dim {k}: {} values from {} step {} exceed {}",
                        x.shape[k], starts[k], steps[k], shape[k]
                    ));
                }
            }
            one(TensorType::new(x.dtype, shape.clone()))
        }
        _ => unreachable!("`{}` is not a layout op", op.name()),
    }
}
