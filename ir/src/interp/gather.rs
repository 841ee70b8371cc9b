//! The indexed ops' semantics: the gathers (`gather`, `gather_elements`, `gather_nd`; negative
//! indices count from the end, others out of range are errors) and their transposes, the
//! scatters (`scatter_add`, `scatter_elements_add`, `scatter_nd_add`).

use super::{offsets, scatter, strides, take, Arr, Data};
use crate::Op;

/// [`Op::Gather`], [`Op::GatherElements`], [`Op::GatherNd`], [`Op::ScatterAdd`],
/// [`Op::ScatterElementsAdd`] and [`Op::ScatterNdAdd`]; `shape` is the result's.
pub(super) fn eval(op: &Op, ins: &[&Arr], shape: &[usize]) -> Result<Data, String> {
    Ok(match op {
        Op::Gather { axis } => {
            let (x, idx) = (&ins[0], ins[1].i());
            let dim = x.shape[*axis] as i64;
            let inner: usize = x.shape[axis + 1..].iter().product();
            let outer: usize = x.shape[..*axis].iter().product();
            let mut offs = Vec::with_capacity(outer * idx.len() * inner);
            for o in 0..outer {
                for &i in idx {
                    let j = if i < 0 { i + dim } else { i };
                    if !(0..dim).contains(&j) {
                        return Err(format!(
                            "index {i} is out of range for dim {axis} of size {dim}"
                        ));
                    }
                    let base = (o * dim as usize + j as usize) * inner;
                    offs.extend(base..base + inner);
                }
            }
            take(&x.data, &offs)
        }
        Op::GatherElements { axis } => {
            let (x, idx) = (&ins[0], ins[1].i());
            let xs = strides(&x.shape);
            let dim = x.shape[*axis] as i64;
            let pos = offsets(shape, &strides(&x.shape), 0);
            let mut offs = Vec::with_capacity(idx.len());
            let out_strides = strides(shape);
            for (k, &i) in idx.iter().enumerate() {
                let j = if i < 0 { i + dim } else { i };
                if !(0..dim).contains(&j) {
                    return Err(format!(
                        "index {i} is out of range for dim {axis} of size {dim}"
                    ));
                }
                let coord = (k / out_strides[*axis]) % shape[*axis];
                offs.push(pos[k] - coord * xs[*axis] + j as usize * xs[*axis]);
            }
            take(&x.data, &offs)
        }
        Op::GatherNd => {
            let (x, idx) = (&ins[0], ins[1].i());
            let q = *ins[1].shape.last().expect("checked by infer");
            let xs = strides(&x.shape);
            let inner: usize = x.shape[q..].iter().product();
            let tuples: usize = ins[1].shape[..ins[1].shape.len() - 1].iter().product();
            let mut offs = Vec::with_capacity(tuples * inner);
            for t in 0..tuples {
                let mut base = 0;
                for k in 0..q {
                    let (i, d) = (idx[t * q + k], x.shape[k] as i64);
                    let j = if i < 0 { i + d } else { i };
                    if !(0..d).contains(&j) {
                        return Err(format!("index {i} is out of range for dim {k} of size {d}"));
                    }
                    base += j as usize * xs[k];
                }
                offs.extend(base..base + inner);
            }
            take(&x.data, &offs)
        }
        Op::ScatterAdd { axis, .. } => {
            let idx = ins[1].i();
            let dim = shape[*axis] as i64;
            let inner: usize = shape[axis + 1..].iter().product();
            let outer: usize = shape[..*axis].iter().product();
            let mut dst = Vec::with_capacity(outer * idx.len() * inner);
            for o in 0..outer {
                for &i in idx {
                    let j = normalise_index(i, dim, *axis)?;
                    let base = (o * dim as usize + j) * inner;
                    dst.extend(base..base + inner);
                }
            }
            scatter(&ins[0].data, &dst, shape.iter().product())
        }
        Op::ScatterElementsAdd { axis, .. } => {
            let idx = ins[1].i();
            let os = strides(shape);
            let ishape = &ins[1].shape;
            let is = strides(ishape);
            let pos = offsets(ishape, &os, 0);
            let dim = shape[*axis] as i64;
            let mut dst = Vec::with_capacity(idx.len());
            for (k, &i) in idx.iter().enumerate() {
                let j = normalise_index(i, dim, *axis)?;
                let coord = (k / is[*axis]) % ishape[*axis];
                dst.push(pos[k] - coord * os[*axis] + j * os[*axis]);
            }
            scatter(&ins[0].data, &dst, shape.iter().product())
        }
        Op::ScatterNdAdd { .. } => {
            let idx = ins[1].i();
            let ishape = &ins[1].shape;
            let q = ishape[ishape.len() - 1];
            let os = strides(shape);
            let inner: usize = shape[q..].iter().product();
            let tuples: usize = ishape[..ishape.len() - 1].iter().product();
            let mut dst = Vec::with_capacity(tuples * inner);
            for t in 0..tuples {
                let mut base = 0;
                for k in 0..q {
                    base += normalise_index(idx[t * q + k], shape[k] as i64, k)? * os[k];
                }
                dst.extend(base..base + inner);
            }
            scatter(&ins[0].data, &dst, shape.iter().product())
        }
        _ => unreachable!("`{}` is not a gather or scatter", op.name()),
    })
}

/// An index along `axis` of size `dim`, negative counting from the end.
fn normalise_index(i: i64, dim: i64, axis: usize) -> Result<usize, String> {
    let j = if i < 0 { i + dim } else { i };
    if (0..dim).contains(&j) {
        Ok(j as usize)
    } else {
        Err(format!(
            "index {i} is out of range for dim {axis} of size {dim}"
        ))
    }
}
