//! VJPs of the reductions: `reduce_sum`, `reduce_mean`, `reduce_max` (ties share the gradient) and
//! `top_k` (integer indices: none).

use memc_ir::{BinaryOp, Op, ReduceKind, ValueId};

use crate::build::Builder;

/// VJPs of [`Op::Reduce`] and [`Op::TopK`].
pub(super) fn vjp(
    b: &mut Builder,
    op: &Op,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    _wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let xs = |b: &Builder, i: usize| b.shape(x[i]);
    Ok(match op {
        // Integer indices: no gradient.
        Op::TopK { .. } => vec![None],
        Op::Reduce {
            kind,
            axes,
            keep_dims,
        } => {
            let shape = xs(b, 0);
            let kept: Vec<usize> = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            let _ = keep_dims;
            let gk = b.reshape(dy, kept.clone())?;
            vec![Some(match kind {
                ReduceKind::Sum => b.expand(gk, shape)?,
                ReduceKind::Mean => {
                    let count: usize = axes.iter().map(|&a| shape[a]).product();
                    let e = b.expand(gk, shape)?;
                    b.mul_scalar(e, 1.0 / count as f64)?
                }
                ReduceKind::Max => {
                    // Ties share the gradient evenly, as torch.amax does.
                    let yk = b.reshape(y, kept)?;
                    let eq = b.binary(BinaryOp::Equal, x[0], yk)?;
                    let mask = b.cast(eq, b.dtype(x[0]))?;
                    let count = b.reduce(ReduceKind::Sum, mask, axes.clone(), true)?;
                    let share = b.div(gk, count)?;
                    b.mul(mask, share)?
                }
            })]
        }
        _ => unreachable!("`{}` is not a reduction", op.name()),
    })
}
