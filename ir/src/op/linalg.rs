//! Shape inference of the linear-algebra ops: `matmul` (NumPy semantics: batched over leading
//! dims with broadcasting, 1-D operands promoted).

use super::{arity, broadcast_shapes, Op};
use crate::TensorType;

/// [`Op::infer`] for [`Op::MatMul`].
pub(super) fn infer(op: &Op, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
    let arity = |n: usize| arity(op, inputs, n);
    match op {
        Op::MatMul => {
            arity(2)?;
            matmul_type(&inputs[0], &inputs[1]).map(|t| vec![t])
        }
        _ => unreachable!("`{}` is not a linear-algebra op", op.name()),
    }
}

fn matmul_type(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if !a.dtype.is_float() || a.dtype != b.dtype {
        return Err(format!(
            "`matmul` needs two float operands of one dtype, got {} and {}",
            a.dtype, b.dtype
        ));
    }
    if a.rank() == 0 || b.rank() == 0 {
        return Err("`matmul` operands must have at least 1 dim".into());
    }
    let ka = a.shape[a.rank() - 1];
    let kb = if b.rank() == 1 {
        b.shape[0]
    } else {
        b.shape[b.rank() - 2]
    };
    if ka != kb {
        return Err(format!("`matmul` inner dims differ: {a} x {b}"));
    }
    let batch_a = if a.rank() > 2 {
        &a.shape[..a.rank() - 2]
    } else {
        &[][..]
    };
    let batch_b = if b.rank() > 2 {
        &b.shape[..b.rank() - 2]
    } else {
        &[][..]
    };
    let mut shape = broadcast_shapes(batch_a, batch_b)?;
    if a.rank() >= 2 {
        shape.push(a.shape[a.rank() - 2]);
    }
    if b.rank() >= 2 {
        shape.push(b.shape[b.rank() - 1]);
    }
    Ok(TensorType::new(a.dtype, shape))
}
