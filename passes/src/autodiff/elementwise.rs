//! VJPs of the elementwise ops: unary ops, binary ops (gradients summed over broadcast dims),
//! `where` and `cast`.

use memc_ir::{BinaryOp, Op, UnaryOp, ValueId};

use crate::build::{BResult, Builder};

/// VJPs of [`Op::Unary`], [`Op::Binary`], [`Op::Where`] and [`Op::Cast`].
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
        Op::Unary(u) => vec![unary_vjp(b, *u, x, y, dy)?],
        Op::Binary(op) => binary_vjp(b, *op, x, y, dy, wants)?,
        Op::Where => {
            let zero = b.scalar(b.dtype(dy), 0.0);
            let ga = if wants[1] {
                let w = b.op(Op::Where, &[x[0], dy, zero])?;
                Some(b.unbroadcast(w, &xs(b, 1))?)
            } else {
                None
            };
            let gb = if wants[2] {
                let w = b.op(Op::Where, &[x[0], zero, dy])?;
                Some(b.unbroadcast(w, &xs(b, 2))?)
            } else {
                None
            };
            vec![None, ga, gb]
        }
        Op::Cast { .. } => {
            let from = b.dtype(x[0]);
            vec![if from.is_float() {
                Some(b.cast(dy, from)?)
            } else {
                None
            }]
        }
        _ => unreachable!("`{}` is not an elementwise op", op.name()),
    })
}

/// The gradient of a unary op's operand (`None` for `not` and `is_nan`).
fn unary_vjp(
    b: &mut Builder,
    u: UnaryOp,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
) -> Result<Option<ValueId>, String> {
    let some = |v: BResult| v.map(Some);
    Ok(match u {
        UnaryOp::Not | UnaryOp::IsNaN => None,
        UnaryOp::Neg => some(b.neg(dy))?,
        UnaryOp::Exp => some(b.mul(dy, y))?,
        UnaryOp::Log => some(b.div(dy, x[0]))?,
        UnaryOp::Sqrt => {
            let h = b.mul_scalar(dy, 0.5)?;
            some(b.div(h, y))?
        }
        UnaryOp::Reciprocal => {
            let yy = b.mul(y, y)?;
            let t = b.mul(dy, yy)?;
            some(b.neg(t))?
        }
        UnaryOp::Tanh => {
            let yy = b.mul(y, y)?;
            let one_minus = {
                let n = b.neg(yy)?;
                b.add_scalar(n, 1.0)?
            };
            some(b.mul(dy, one_minus))?
        }
        UnaryOp::Erf => {
            let xx = b.mul(x[0], x[0])?;
            let n = b.neg(xx)?;
            let e = b.unary(UnaryOp::Exp, n)?;
            let s = b.mul_scalar(e, 2.0 / std::f64::consts::PI.sqrt())?;
            some(b.mul(dy, s))?
        }
        UnaryOp::Sigmoid => {
            let n = b.neg(y)?;
            let one_minus = b.add_scalar(n, 1.0)?;
            let d = b.mul(y, one_minus)?;
            some(b.mul(dy, d))?
        }
        UnaryOp::Silu => {
            // σ(x)·(1 + x·(1 − σ(x))): reads x only, so only x is saved.
            let s = b.unary(UnaryOp::Sigmoid, x[0])?;
            let n = b.neg(s)?;
            let one_minus = b.add_scalar(n, 1.0)?;
            let t = b.mul(x[0], one_minus)?;
            let t = b.add_scalar(t, 1.0)?;
            let d = b.mul(s, t)?;
            some(b.mul(dy, d))?
        }
        UnaryOp::Gelu => {
            // Φ(x) + x·φ(x) = 0.5·(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π).
            let r = b.mul_scalar(x[0], std::f64::consts::FRAC_1_SQRT_2)?;
            let e = b.unary(UnaryOp::Erf, r)?;
            let e = b.add_scalar(e, 1.0)?;
            let cdf = b.mul_scalar(e, 0.5)?;
            let xx = b.mul(x[0], x[0])?;
            let h = b.mul_scalar(xx, -0.5)?;
            let p = b.unary(UnaryOp::Exp, h)?;
            let p = b.mul_scalar(p, 1.0 / (2.0 * std::f64::consts::PI).sqrt())?;
            let xp = b.mul(x[0], p)?;
            let d = b.add(cdf, xp)?;
            some(b.mul(dy, d))?
        }
        UnaryOp::GeluTanh => {
            // t = tanh(c·(x + k·x³)):  0.5·(1 + t) + 0.5·x·(1 − t²)·c·(1 + 3k·x²).
            let (c, k) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
            let xx = b.mul(x[0], x[0])?;
            let kxx = b.mul_scalar(xx, k)?;
            let inner = b.add_scalar(kxx, 1.0)?;
            let u = b.mul(x[0], inner)?;
            let u = b.mul_scalar(u, c)?;
            let t = b.unary(UnaryOp::Tanh, u)?;
            let tt = b.mul(t, t)?;
            let n = b.neg(tt)?;
            let sech2 = b.add_scalar(n, 1.0)?;
            let du = b.mul_scalar(xx, 3.0 * k)?;
            let du = b.add_scalar(du, 1.0)?;
            let du = b.mul_scalar(du, 0.5 * c)?;
            let a = b.mul(x[0], sech2)?;
            let a = b.mul(a, du)?;
            let half = b.add_scalar(t, 1.0)?;
            let half = b.mul_scalar(half, 0.5)?;
            let d = b.add(half, a)?;
            some(b.mul(dy, d))?
        }
        UnaryOp::Cos => {
            let s = b.unary(UnaryOp::Sin, x[0])?;
            let t = b.mul(dy, s)?;
            some(b.neg(t))?
        }
        UnaryOp::Sin => {
            let c = b.unary(UnaryOp::Cos, x[0])?;
            some(b.mul(dy, c))?
        }
    })
}

fn binary_vjp(
    b: &mut Builder,
    op: BinaryOp,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (sa, sb) = (b.shape(x[0]), b.shape(x[1]));
    let (ga, gb): (Option<ValueId>, Option<ValueId>) = match op {
        BinaryOp::Equal
        | BinaryOp::Less
        | BinaryOp::LessEqual
        | BinaryOp::Greater
        | BinaryOp::GreaterEqual
        | BinaryOp::And => (None, None),
        BinaryOp::Add => (Some(dy), Some(dy)),
        BinaryOp::Sub => (Some(dy), if wants[1] { Some(b.neg(dy)?) } else { None }),
        BinaryOp::Mul => (
            if wants[0] {
                Some(b.mul(dy, x[1])?)
            } else {
                None
            },
            if wants[1] {
                Some(b.mul(dy, x[0])?)
            } else {
                None
            },
        ),
        BinaryOp::Div => (
            if wants[0] {
                Some(b.div(dy, x[1])?)
            } else {
                None
            },
            if wants[1] {
                let t = b.mul(dy, y)?;
                let q = b.div(t, x[1])?;
                Some(b.neg(q)?)
            } else {
                None
            },
        ),
        BinaryOp::Pow => {
            let dt = b.dtype(x[0]);
            let e = b.cast(x[1], dt)?;
            let ga = if wants[0] {
                let em1 = b.add_scalar(e, -1.0)?;
                let p = b.binary(BinaryOp::Pow, x[0], em1)?;
                let t = b.mul(p, e)?;
                Some(b.mul(dy, t)?)
            } else {
                None
            };
            let gb = if wants[1] && b.dtype(x[1]).is_float() {
                let l = b.unary(UnaryOp::Log, x[0])?;
                let t = b.mul(y, l)?;
                Some(b.mul(dy, t)?)
            } else {
                None
            };
            (ga, gb)
        }
        BinaryOp::Max | BinaryOp::Min => {
            // Ties split the gradient in half, as torch.maximum/minimum do.
            let (win, lose) = if op == BinaryOp::Max {
                (BinaryOp::Greater, BinaryOp::Less)
            } else {
                (BinaryOp::Less, BinaryOp::Greater)
            };
            let dt = b.dtype(dy);
            let zero = b.scalar(dt, 0.0);
            let half = b.mul_scalar(dy, 0.5)?;
            let eq = b.binary(BinaryOp::Equal, x[0], x[1])?;
            let side = |b: &mut Builder, cmp: BinaryOp| -> BResult {
                let w = b.binary(cmp, x[0], x[1])?;
                let tie = b.op(Op::Where, &[eq, half, zero])?;
                b.op(Op::Where, &[w, dy, tie])
            };
            (
                if wants[0] { Some(side(b, win)?) } else { None },
                if wants[1] { Some(side(b, lose)?) } else { None },
            )
        }
    };
    let ga = match ga {
        Some(v) if wants[0] => Some(b.unbroadcast(v, &sa)?),
        _ => None,
    };
    let gb = match gb {
        Some(v) if wants[1] => Some(b.unbroadcast(v, &sb)?),
        _ => None,
    };
    Ok(vec![ga, gb])
}
