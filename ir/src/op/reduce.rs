//! Shape inference of the reductions along axes: `reduce_sum`, `reduce_mean`, `reduce_max` and
//! `top_k`'s indices.

use super::{arity, check_axis, float_operand, one, Op, ReduceKind};
use crate::{DType, TensorType};

/// [`Op::infer`] for [`Op::Reduce`] and [`Op::TopK`].
pub(super) fn infer(op: &Op, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
    let arity = |n: usize| arity(op, inputs, n);
    match op {
        Op::Reduce {
            kind,
            axes,
            keep_dims,
        } => {
            arity(1)?;
            let x = &inputs[0];
            if x.dtype == DType::Bool || (*kind == ReduceKind::Mean && !x.dtype.is_float()) {
                return Err(format!("`{}` does not take {}", op.name(), x.dtype));
            }
            if axes.windows(2).any(|w| w[0] >= w[1]) {
                return Err("reduction axes must be sorted and unique".into());
            }
            for &a in axes {
                check_axis(a, x.rank())?;
            }
            let shape = x
                .shape
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| match (axes.contains(&i), keep_dims) {
                    (false, _) => Some(d),
                    (true, true) => Some(1),
                    (true, false) => None,
                })
                .collect::<Vec<_>>();
            one(TensorType::new(x.dtype, shape))
        }
        Op::TopK { k } => {
            arity(1)?;
            let x = &inputs[0];
            float_operand(op, x)?;
            match x.shape.last() {
                Some(&n) if (1..=n).contains(k) => {
                    let mut shape = x.shape.clone();
                    *shape.last_mut().unwrap() = *k;
                    // 16-bit indices whenever they fit (MoC keeps them for backward).
                    let dtype = if n <= i16::MAX as usize {
                        DType::I16
                    } else {
                        DType::I32
                    };
                    one(TensorType::new(dtype, shape))
                }
                _ => Err(format!(
                    "`top_k`: k = {k} must be in 1..={:?}",
                    x.shape.last()
                )),
            }
        }
        _ => unreachable!("`{}` is not a reduction", op.name()),
    }
}
