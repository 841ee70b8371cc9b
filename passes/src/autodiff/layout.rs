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
            // A transposed weight's gradient is a product (`xᵀ·dy`): (AB)ᵀ = BᵀAᵀ gives the
            // weight's own gradient from one GEMM reading transposed views, not a GEMM and
            // a transpose copy.
            if let Some(d) = transposed_product(b, dy, perm)? {
                return Ok(vec![Some(d)]);
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

/// `(A·B)ᵀ` as `Bᵀ·Aᵀ` when `dy` is a matrix product and `perm` swaps a matrix's dims.
fn transposed_product(
    b: &mut Builder,
    dy: ValueId,
    perm: &[usize],
) -> Result<Option<ValueId>, String> {
    if perm != [1, 0] {
        return Ok(None);
    }
    let Some(n) = b.g.producer(dy) else {
        return Ok(None);
    };
    let node = b.g.node(n);
    if node.op != Op::MatMul || b.shape(dy).len() != 2 {
        return Ok(None);
    }
    let (x, y) = (node.inputs[0], node.inputs[1]);
    let (yt, xt) = (b.transpose(y, vec![1, 0])?, b.transpose(x, vec![1, 0])?);
    Ok(Some(b.op(Op::MatMul, &[yt, xt])?))
}
