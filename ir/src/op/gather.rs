//! Shape inference of the indexed ops: the gathers (`gather`, `gather_elements`, `gather_nd`) and
//! their transposes, the scatters (`scatter_add`, `scatter_elements_add`, `scatter_nd_add`).

use super::{arity, check_axis, int_indices, one, Op};
use crate::TensorType;

/// [`Op::infer`] for [`Op::Gather`], [`Op::GatherElements`], [`Op::GatherNd`],
/// [`Op::ScatterAdd`], [`Op::ScatterElementsAdd`] and [`Op::ScatterNdAdd`].
pub(super) fn infer(op: &Op, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
    let arity = |n: usize| arity(op, inputs, n);
    match op {
        Op::Gather { axis } => {
            arity(2)?;
            let (d, i) = (&inputs[0], &inputs[1]);
            check_axis(*axis, d.rank())?;
            int_indices(i)?;
            let mut shape = d.shape[..*axis].to_vec();
            shape.extend_from_slice(&i.shape);
            shape.extend_from_slice(&d.shape[axis + 1..]);
            one(TensorType::new(d.dtype, shape))
        }
        Op::GatherElements { axis } => {
            arity(2)?;
            let (d, i) = (&inputs[0], &inputs[1]);
            check_axis(*axis, d.rank())?;
            int_indices(i)?;
            if i.rank() != d.rank() {
                return Err("`gather_elements` indices must have the data's rank".into());
            }
            for k in 0..d.rank() {
                if k != *axis && i.shape[k] > d.shape[k] {
                    return Err(format!(
                        "`gather_elements` indices dim {k} exceeds the data's"
                    ));
                }
            }
            one(TensorType::new(d.dtype, i.shape.clone()))
        }
        Op::GatherNd => {
            arity(2)?;
            let (d, i) = (&inputs[0], &inputs[1]);
            int_indices(i)?;
            let q = *i
                .shape
                .last()
                .ok_or("`gather_nd` indices need at least one dim")?;
            if q > d.rank() {
                return Err(format!(
                    "`gather_nd` index tuples of length {q} exceed the data's rank {}",
                    d.rank()
                ));
            }
            let mut shape = i.shape[..i.rank() - 1].to_vec();
            shape.extend_from_slice(&d.shape[q..]);
            one(TensorType::new(d.dtype, shape))
        }
        Op::ScatterAdd { axis, shape } => {
            arity(2)?;
            let (u, i) = (&inputs[0], &inputs[1]);
            int_indices(i)?;
            check_axis(*axis, shape.len())?;
            let mut want = shape[..*axis].to_vec();
            want.extend_from_slice(&i.shape);
            want.extend_from_slice(&shape[axis + 1..]);
            if u.shape != want {
                return Err(format!("`scatter_add` updates must be {want:?}, got {u}"));
            }
            one(TensorType::new(u.dtype, shape.clone()))
        }
        Op::ScatterElementsAdd { axis, shape } => {
            arity(2)?;
            let (u, i) = (&inputs[0], &inputs[1]);
            int_indices(i)?;
            check_axis(*axis, shape.len())?;
            let fits = u.shape == i.shape
                && i.rank() == shape.len()
                && (0..shape.len()).all(|k| k == *axis || i.shape[k] <= shape[k]);
            if !fits {
                return Err(format!(
                    "`scatter_elements_add` updates {u} and indices {i} do not fit {shape:?}"
                ));
            }
            one(TensorType::new(u.dtype, shape.clone()))
        }
        Op::ScatterNdAdd { shape } => {
            arity(2)?;
            let (u, i) = (&inputs[0], &inputs[1]);
            int_indices(i)?;
            let q = *i
                .shape
                .last()
                .ok_or("`scatter_nd_add` indices need at least one dim")?;
            if q > shape.len() {
                return Err(format!(
                    "`scatter_nd_add` index tuples of length {q} exceed rank {}",
                    shape.len()
                ));
            }
            let mut want = i.shape[..i.rank() - 1].to_vec();
            want.extend_from_slice(&shape[q..]);
            if u.shape != want {
                return Err(format!(
                    "`scatter_nd_add` updates must be {want:?}, got {u}"
                ));
            }
            one(TensorType::new(u.dtype, shape.clone()))
        }
        _ => unreachable!("`{}` is not a gather or scatter", op.name()),
    }
}
