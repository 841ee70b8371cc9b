//! VJPs of the indexed ops: each gather's is its scatter transpose and each scatter's its gather;
//! indices get none.

use memc_ir::{Op, ValueId};

use crate::build::Builder;

/// VJPs of [`Op::Gather`], [`Op::GatherElements`], [`Op::GatherNd`], [`Op::ScatterAdd`],
/// [`Op::ScatterElementsAdd`] and [`Op::ScatterNdAdd`].
pub(super) fn vjp(
    b: &mut Builder,
    op: &Op,
    x: &[ValueId],
    _y: ValueId,
    dy: ValueId,
    _wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let xs = |b: &Builder, i: usize| b.shape(x[i]);
    Ok(match op {
        Op::Gather { axis } => {
            vec![
                Some(b.op(
                    Op::ScatterAdd {
                        axis: *axis,
                        shape: xs(b, 0),
                    },
                    &[dy, x[1]],
                )?),
                None,
            ]
        }
        Op::GatherElements { axis } => {
            vec![
                Some(b.op(
                    Op::ScatterElementsAdd {
                        axis: *axis,
                        shape: xs(b, 0),
                    },
                    &[dy, x[1]],
                )?),
                None,
            ]
        }
        Op::GatherNd => vec![
            Some(b.op(Op::ScatterNdAdd { shape: xs(b, 0) }, &[dy, x[1]])?),
            None,
        ],
        Op::ScatterAdd { axis, .. } => {
            vec![Some(b.op(Op::Gather { axis: *axis }, &[dy, x[1]])?), None]
        }
        Op::ScatterElementsAdd { axis, .. } => {
            vec![
                Some(b.op(Op::GatherElements { axis: *axis }, &[dy, x[1]])?),
                None,
            ]
        }
        Op::ScatterNdAdd { .. } => vec![Some(b.op(Op::GatherNd, &[dy, x[1]])?), None],
        _ => unreachable!("`{}` is not a gather or scatter", op.name()),
    })
}
