//! Shape inference of the elementwise ops: unary and binary ops (NumPy broadcasting), `where`
//! and `cast`.

use super::{arity, broadcast_shapes, one, BinaryOp, Op, UnaryOp};
use crate::{DType, TensorType};

/// [`Op::infer`] for [`Op::Unary`], [`Op::Binary`], [`Op::Where`] and [`Op::Cast`].
pub(super) fn infer(op: &Op, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
    let arity = |n: usize| arity(op, inputs, n);
    match op {
        Op::Unary(u) => {
            arity(1)?;
            let x = &inputs[0];
            match u {
                UnaryOp::Not if x.dtype != DType::Bool => Err("`not` needs a bool operand".into()),
                UnaryOp::Not => one(x.clone()),
                UnaryOp::IsNaN if x.dtype.is_float() => {
                    one(TensorType::new(DType::Bool, x.shape.clone()))
                }
                UnaryOp::Neg if x.dtype != DType::Bool => one(x.clone()),
                _ if x.dtype.is_float() => one(x.clone()),
                _ => Err(format!(
                    "`{}` needs a float operand, got {}",
                    op.name(),
                    x.dtype
                )),
            }
        }
        Op::Binary(b) => {
            arity(2)?;
            let (a, c) = (&inputs[0], &inputs[1]);
            let shape = broadcast_shapes(&a.shape, &c.shape)?;
            match b {
                BinaryOp::Pow => {
                    if a.dtype == DType::Bool || c.dtype == DType::Bool {
                        return Err("`pow` needs numeric operands".into());
                    }
                    one(TensorType::new(a.dtype, shape))
                }
                _ if a.dtype != c.dtype => Err(format!(
                    "`{}` operands differ in dtype: {} vs {}",
                    op.name(),
                    a.dtype,
                    c.dtype
                )),
                BinaryOp::And if a.dtype != DType::Bool => Err("`and` needs bool operands".into()),
                BinaryOp::And | BinaryOp::Equal => one(TensorType::new(DType::Bool, shape)),
                BinaryOp::Less
                | BinaryOp::LessEqual
                | BinaryOp::Greater
                | BinaryOp::GreaterEqual => {
                    if a.dtype == DType::Bool {
                        return Err(format!("`{}` needs numeric operands", op.name()));
                    }
                    one(TensorType::new(DType::Bool, shape))
                }
                _ if a.dtype == DType::Bool => {
                    Err(format!("`{}` needs numeric operands", op.name()))
                }
                _ => one(TensorType::new(a.dtype, shape)),
            }
        }
        Op::Where => {
            arity(3)?;
            let (c, a, b) = (&inputs[0], &inputs[1], &inputs[2]);
            if c.dtype != DType::Bool {
                return Err(format!("`where` condition must be bool, got {}", c.dtype));
            }
            if a.dtype != b.dtype {
                return Err(format!(
                    "`where` branches differ in dtype: {} vs {}",
                    a.dtype, b.dtype
                ));
            }
            let s = broadcast_shapes(&broadcast_shapes(&c.shape, &a.shape)?, &b.shape)?;
            one(TensorType::new(a.dtype, s))
        }
        Op::Cast { to } => {
            arity(1)?;
            one(TensorType::new(*to, inputs[0].shape.clone()))
        }
        _ => unreachable!("`{}` is not an elementwise op", op.name()),
    }
}
