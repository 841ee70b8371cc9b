//! The layout ops' semantics: `reshape`, `transpose`, `slice` and its transpose `slice_scatter`,
//! `concat`, `expand` and `trilu`.

use super::{broadcast_strides, offsets, scatter, strides, take, Arr, Data};
use crate::Op;

/// [`Op::Reshape`], [`Op::Transpose`], [`Op::Slice`], [`Op::Concat`], [`Op::Expand`],
/// [`Op::Trilu`] and [`Op::SliceScatter`]; `shape` is the result's.
pub(super) fn eval(op: &Op, ins: &[&Arr], shape: &[usize]) -> Result<Data, String> {
    Ok(match op {
        Op::Reshape { .. } => ins[0].data.clone(),
        Op::Transpose { perm } => {
            let s = strides(&ins[0].shape);
            let ps: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
            take(&ins[0].data, &offsets(shape, &ps, 0))
        }
        Op::Slice { starts, steps, .. } => {
            let s = strides(&ins[0].shape);
            let base = starts.iter().zip(&s).map(|(a, b)| a * b).sum();
            let ss: Vec<usize> = steps.iter().zip(&s).map(|(a, b)| a * b).collect();
            take(&ins[0].data, &offsets(shape, &ss, base))
        }
        Op::Concat { axis } => {
            let outer: usize = shape[..*axis].iter().product();
            let mut out = match ins[0].data {
                Data::F(_) => Data::F(Vec::new()),
                Data::I(_) => Data::I(Vec::new()),
            };
            for o in 0..outer {
                for a in ins {
                    let chunk: usize = a.shape[*axis..].iter().product();
                    match (&mut out, &a.data) {
                        (Data::F(d), Data::F(s)) => {
                            d.extend_from_slice(&s[o * chunk..(o + 1) * chunk])
                        }
                        (Data::I(d), Data::I(s)) => {
                            d.extend_from_slice(&s[o * chunk..(o + 1) * chunk])
                        }
                        _ => unreachable!(),
                    }
                }
            }
            out
        }
        Op::Expand { .. } => take(
            &ins[0].data,
            &offsets(shape, &broadcast_strides(&ins[0].shape, shape), 0),
        ),
        Op::Trilu { upper, k } => {
            let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
            let keep = |e: usize| {
                let (i, j) = (((e / cols) % rows) as i64, (e % cols) as i64);
                if *upper {
                    j - i >= *k
                } else {
                    j - i <= *k
                }
            };
            match &ins[0].data {
                Data::F(v) => Data::F(
                    v.iter()
                        .enumerate()
                        .map(|(e, &x)| if keep(e) { x } else { 0.0 })
                        .collect(),
                ),
                Data::I(v) => Data::I(
                    v.iter()
                        .enumerate()
                        .map(|(e, &x)| if keep(e) { x } else { 0 })
                        .collect(),
                ),
            }
        }
        Op::SliceScatter { starts, steps, .. } => {
            let os = strides(shape);
            let base = starts.iter().zip(&os).map(|(a, b)| a * b).sum();
            let ss: Vec<usize> = steps.iter().zip(&os).map(|(a, b)| a * b).collect();
            let dst = offsets(&ins[0].shape, &ss, base);
            scatter(&ins[0].data, &dst, shape.iter().product())
        }
        _ => unreachable!("`{}` is not a layout op", op.name()),
    })
}
