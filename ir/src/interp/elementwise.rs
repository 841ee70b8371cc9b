//! The elementwise ops' semantics: unary ops (in f64, integer `neg` wrapping), binary ops with
//! NumPy broadcasting, `where` and `cast`.

use super::{broadcast_strides, offsets, Arr, Data};
use crate::{BinaryOp, DType, Op, UnaryOp};

/// [`Op::Unary`], [`Op::Binary`], [`Op::Where`] and [`Op::Cast`]; `dt` and `shape` are the result's.
pub(super) fn eval(op: &Op, ins: &[&Arr], dt: DType, shape: &[usize]) -> Result<Data, String> {
    Ok(match op {
        Op::Unary(UnaryOp::IsNaN) => {
            Data::I(ins[0].f().iter().map(|v| v.is_nan() as i64).collect())
        }
        Op::Unary(UnaryOp::Not) => Data::I(ins[0].i().iter().map(|&v| (v == 0) as i64).collect()),
        Op::Unary(UnaryOp::Neg) if !dt.is_float() => {
            Data::I(ins[0].i().iter().map(|&v| v.wrapping_neg()).collect())
        }
        Op::Unary(u) => Data::F(ins[0].f().iter().map(|&v| unary(*u, v)).collect()),
        Op::Binary(b) => {
            let n = shape.iter().product();
            let (oa, ob) = (
                Idx::new(&ins[0].shape, shape),
                Idx::new(&ins[1].shape, shape),
            );
            binary(*b, ins[0], ins[1], n, &oa, &ob)?
        }
        Op::Where => {
            let n: usize = shape.iter().product();
            let oc = Idx::new(&ins[0].shape, shape);
            let (oa, ob) = (
                Idx::new(&ins[1].shape, shape),
                Idx::new(&ins[2].shape, shape),
            );
            let c = ins[0].i();
            match (&ins[1].data, &ins[2].data) {
                (Data::F(a), Data::F(b)) => Data::F(
                    (0..n)
                        .map(|k| {
                            if c[oc.at(k)] != 0 {
                                a[oa.at(k)]
                            } else {
                                b[ob.at(k)]
                            }
                        })
                        .collect(),
                ),
                (Data::I(a), Data::I(b)) => Data::I(
                    (0..n)
                        .map(|k| {
                            if c[oc.at(k)] != 0 {
                                a[oa.at(k)]
                            } else {
                                b[ob.at(k)]
                            }
                        })
                        .collect(),
                ),
                _ => unreachable!(),
            }
        }
        Op::Cast { to } => match (&ins[0].data, to.is_float()) {
            (Data::F(v), true) => Data::F(v.clone()),
            (Data::F(v), false) if *to == DType::Bool => {
                Data::I(v.iter().map(|&x| (x != 0.0) as i64).collect())
            }
            (Data::F(v), false) => Data::I(v.iter().map(|&x| x.trunc() as i64).collect()),
            (Data::I(v), true) => Data::F(v.iter().map(|&x| x as f64).collect()),
            (Data::I(v), false) => Data::I(v.clone()),
        },
        _ => unreachable!("`{}` is not an elementwise op", op.name()),
    })
}

fn unary(u: UnaryOp, x: f64) -> f64 {
    match u {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Reciprocal => 1.0 / x,
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Erf => libm::erf(x),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Gelu => 0.5 * x * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2)),
        UnaryOp::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryOp::Cos => x.cos(),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Not | UnaryOp::IsNaN => unreachable!(),
    }
}

/// `f(a, b)`, or NaN if either is NaN (as NumPy's `maximum`/`minimum`).
fn nan_or(a: f64, b: f64, f: fn(f64, f64) -> f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        f(a, b)
    }
}

/// Where element `k` of a broadcast result reads an operand: the same index, always index 0,
/// or a precomputed map.
enum Idx {
    Same,
    Scalar,
    Map(Vec<usize>),
}

impl Idx {
    fn new(shape: &[usize], out: &[usize]) -> Idx {
        if shape == out {
            Idx::Same
        } else if shape.iter().all(|&d| d == 1) {
            Idx::Scalar
        } else {
            Idx::Map(offsets(out, &broadcast_strides(shape, out), 0))
        }
    }

    #[inline]
    fn at(&self, k: usize) -> usize {
        match self {
            Idx::Same => k,
            Idx::Scalar => 0,
            Idx::Map(m) => m[k],
        }
    }
}

fn binary(b: BinaryOp, a: &Arr, c: &Arr, n: usize, oa: &Idx, ob: &Idx) -> Result<Data, String> {
    let cmp = |f: &dyn Fn(usize) -> bool| Data::I((0..n).map(|k| f(k) as i64).collect());
    Ok(match (&a.data, &c.data) {
        (Data::F(x), Data::F(y)) => {
            let (x, y) = (|k: usize| x[oa.at(k)], |k: usize| y[ob.at(k)]);
            match b {
                BinaryOp::Add => Data::F((0..n).map(|k| x(k) + y(k)).collect()),
                BinaryOp::Sub => Data::F((0..n).map(|k| x(k) - y(k)).collect()),
                BinaryOp::Mul => Data::F((0..n).map(|k| x(k) * y(k)).collect()),
                BinaryOp::Div => Data::F((0..n).map(|k| x(k) / y(k)).collect()),
                BinaryOp::Pow => Data::F((0..n).map(|k| x(k).powf(y(k))).collect()),
                BinaryOp::Equal => cmp(&|k| x(k) == y(k)),
                BinaryOp::Less => cmp(&|k| x(k) < y(k)),
                BinaryOp::LessEqual => cmp(&|k| x(k) <= y(k)),
                BinaryOp::Greater => cmp(&|k| x(k) > y(k)),
                BinaryOp::GreaterEqual => cmp(&|k| x(k) >= y(k)),
                BinaryOp::Max => Data::F((0..n).map(|k| nan_or(x(k), y(k), f64::max)).collect()),
                BinaryOp::Min => Data::F((0..n).map(|k| nan_or(x(k), y(k), f64::min)).collect()),
                BinaryOp::And => unreachable!(),
            }
        }
        (Data::F(x), Data::I(y)) => {
            // Only `pow` mixes dtypes: a float base with an integer exponent.
            Data::F(
                (0..n)
                    .map(|k| x[oa.at(k)].powf(y[ob.at(k)] as f64))
                    .collect(),
            )
        }
        (Data::I(x), Data::F(y)) => Data::I(
            (0..n)
                .map(|k| (x[oa.at(k)] as f64).powf(y[ob.at(k)]) as i64)
                .collect(),
        ),
        (Data::I(x), Data::I(y)) => {
            let (x, y) = (|k: usize| x[oa.at(k)], |k: usize| y[ob.at(k)]);
            match b {
                BinaryOp::Add => Data::I((0..n).map(|k| x(k).wrapping_add(y(k))).collect()),
                BinaryOp::Sub => Data::I((0..n).map(|k| x(k).wrapping_sub(y(k))).collect()),
                BinaryOp::Mul => Data::I((0..n).map(|k| x(k).wrapping_mul(y(k))).collect()),
                BinaryOp::Div => {
                    if (0..n).any(|k| y(k) == 0) {
                        return Err("integer division by zero".into());
                    }
                    Data::I((0..n).map(|k| x(k).wrapping_div(y(k))).collect())
                }
                BinaryOp::Pow => Data::I(
                    (0..n)
                        .map(|k| x(k).wrapping_pow(y(k).clamp(0, u32::MAX as i64) as u32))
                        .collect(),
                ),
                BinaryOp::Equal => cmp(&|k| x(k) == y(k)),
                BinaryOp::Less => cmp(&|k| x(k) < y(k)),
                BinaryOp::LessEqual => cmp(&|k| x(k) <= y(k)),
                BinaryOp::Greater => cmp(&|k| x(k) > y(k)),
                BinaryOp::GreaterEqual => cmp(&|k| x(k) >= y(k)),
                BinaryOp::Max => Data::I((0..n).map(|k| x(k).max(y(k))).collect()),
                BinaryOp::Min => Data::I((0..n).map(|k| x(k).min(y(k))).collect()),
                BinaryOp::And => cmp(&|k| x(k) != 0 && y(k) != 0),
            }
        }
    })
}
