//! VJPs of the layout ops: `reshape`, `transpose`, `slice` and `slice_scatter` (each other's
//! transposes), `concat`, `expand` and `trilu`.

use memc_ir::{Op, ValueId};

use crate::build::Builder;

/// VJPs of [`Op::Reshape`], [`Op::Transpose`], [`Op::Slice`], [`Op::SliceScatter`],
/// [`Op::Concat`], [`Op::Expand`] and [`Op::Trilu`].
pub(super) fn vjp(
    b: &mut Builder,
    op: &Op,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let xs = |b: &Builder, i: usize| b.shape(x[i]);
    Ok(match op {
        Op::Reshape { .. } => vec![Some(b.reshape(dy, xs(b, 0))?)],
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![Some(b.transpose(dy, inv)?)]
        }
        Op::Slice { starts, steps, .. } => {
            vec![Some(b.op(
                Op::SliceScatter {
                    shape: xs(b, 0),
                    starts: starts.clone(),
                    steps: steps.clone(),
                },
                &[dy],
            )?)]
        }
        Op::SliceScatter { starts, steps, .. } => {
            let src = xs(b, 0);
            let ends = (0..src.len())
                .map(|k| {
                    if src[k] == 0 {
                        starts[k]
                    } else {
                        starts[k] + (src[k] - 1) * steps[k] + 1
                    }
                })
                .collect();
            vec![Some(b.op(
                Op::Slice {
                    starts: starts.clone(),
                    ends,
                    steps: steps.clone(),
                },
                &[dy],
            )?)]
        }
        Op::Concat { axis } => {
            let out = b.shape(y);
            let mut at = 0;
            let mut grads = Vec::with_capacity(x.len());
            for (i, &xi) in x.iter().enumerate() {
                let len = b.shape(xi)[*axis];
                if wants[i] {
                    let mut starts = vec![0; out.len()];
                    let mut ends = out.clone();
                    starts[*axis] = at;
                    ends[*axis] = at + len;
                    grads.push(Some(b.op(
                        Op::Slice {
                            starts,
                            ends,
                            steps: vec![1; out.len()],
                        },
                        &[dy],
                    )?));
                } else {
                    grads.push(None);
                }
                at += len;
            }
            grads
        }
        Op::Expand { .. } => vec![Some(b.unbroadcast(dy, &xs(b, 0))?)],
        Op::Trilu { upper, k } => vec![Some(b.op(
            Op::Trilu {
                upper: *upper,
                k: *k,
            },
            &[dy],
        )?)],
        _ => unreachable!("`{}` is not a layout op", op.name()),
    })
}
