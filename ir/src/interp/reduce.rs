//! The reductions' semantics: `reduce_sum`, `reduce_mean`, `reduce_max` (f64 accumulation, NaN
//! propagating) and `top_k`'s indices.

use super::{broadcast_strides, offsets, Arr, Data};
use crate::{Op, ReduceKind};

/// [`Op::Reduce`] and [`Op::TopK`].
pub(super) fn eval(op: &Op, ins: &[&Arr]) -> Result<Data, String> {
    Ok(match op {
        Op::Reduce { kind, axes, .. } => {
            let x = &ins[0];
            let kept: Vec<usize> = x
                .shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            let n_out: usize = kept.iter().product();
            let dst = offsets(&x.shape, &broadcast_strides(&kept, &x.shape), 0);
            let count: usize = axes.iter().map(|&a| x.shape[a]).product();
            match (&x.data, kind) {
                (Data::F(v), ReduceKind::Max) => {
                    let mut acc = vec![f64::NEG_INFINITY; n_out];
                    for (k, &d) in dst.iter().enumerate() {
                        acc[d] = if v[k].is_nan() || acc[d].is_nan() {
                            f64::NAN
                        } else {
                            acc[d].max(v[k])
                        };
                    }
                    Data::F(acc)
                }
                (Data::F(v), _) => {
                    let mut acc = vec![0.0; n_out];
                    for (k, &d) in dst.iter().enumerate() {
                        acc[d] += v[k];
                    }
                    if *kind == ReduceKind::Mean {
                        acc.iter_mut().for_each(|a| *a /= count as f64);
                    }
                    Data::F(acc)
                }
                (Data::I(v), ReduceKind::Max) => {
                    let mut acc = vec![i64::MIN; n_out];
                    for (k, &d) in dst.iter().enumerate() {
                        acc[d] = acc[d].max(v[k]);
                    }
                    Data::I(acc)
                }
                (Data::I(v), _) => {
                    let mut acc = vec![0i64; n_out];
                    for (k, &d) in dst.iter().enumerate() {
                        acc[d] = acc[d].wrapping_add(v[k]);
                    }
                    Data::I(acc)
                }
            }
        }
        Op::TopK { k } => {
            let x = ins[0].f();
            let n = *ins[0].shape.last().unwrap();
            let mut out = Vec::with_capacity(x.len() / n.max(1) * k);
            for row in x.chunks(n.max(1)) {
                let mut order: Vec<usize> = (0..n).collect();
                // Largest first, ties to the lower index (a stable sort on descending values).
                order.sort_by(|&a, &b| {
                    row[b]
                        .partial_cmp(&row[a])
                        .unwrap_or(std::cmp::Ordering::Equal)
                });
                out.extend(order[..*k].iter().map(|&i| i as i64));
            }
            Data::I(out)
        }
        _ => unreachable!("`{}` is not a reduction", op.name()),
    })
}
