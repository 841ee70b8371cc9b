//! The elementwise ops' semantics: unary ops (in f64, integer `neg` wrapping), binary ops with
//! NumPy broadcasting, `where` and `cast`.

use super::{broadcast_strides, Arr, Data};
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
        Op::Binary(b) => binary(*b, ins[0], ins[1], shape)?,
        Op::Where => {
            let s = [0, 1, 2].map(|i| broadcast_strides(&ins[i].shape, shape));
            let c = ins[0].i();
            let pick = |k: [usize; 3]| c[k[0]] != 0;
            match (&ins[1].data, &ins[2].data) {
                (Data::F(a), Data::F(b)) => {
                    Data::F(map_broadcast(shape, [&s[0], &s[1], &s[2]], |k| {
                        if pick(k) {
                            a[k[1]]
                        } else {
                            b[k[2]]
                        }
                    }))
                }
                (Data::I(a), Data::I(b)) => {
                    Data::I(map_broadcast(shape, [&s[0], &s[1], &s[2]], |k| {
                        if pick(k) {
                            a[k[1]]
                        } else {
                            b[k[2]]
                        }
                    }))
                }
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

/// `f` of every element of a broadcast result of `shape` (row-major), given where it reads each
/// of the `K` operands (their flat offsets; `strides` are the operands' per-dim strides against
/// `shape`, 0 where broadcast). The walk goes row by row with running offsets: no index vector
/// per element.
fn map_broadcast<const K: usize, R>(
    shape: &[usize],
    strides: [&[usize]; K],
    mut f: impl FnMut([usize; K]) -> R,
) -> Vec<R> {
    let n: usize = shape.iter().product();
    let mut out = Vec::with_capacity(n);
    if n == 0 {
        return out;
    }
    let Some((&inner, outer)) = shape.split_last() else {
        out.push(f([0; K]));
        return out;
    };
    let step: [usize; K] = std::array::from_fn(|i| strides[i][outer.len()]);
    let mut idx = vec![0usize; outer.len()];
    let mut base = [0usize; K];
    loop {
        for j in 0..inner {
            out.push(f(std::array::from_fn(|i| base[i] + j * step[i])));
        }
        // The next row: the outer dims' odometer.
        let mut d = outer.len();
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            for i in 0..K {
                base[i] += strides[i][d];
            }
            if idx[d] < outer[d] {
                break;
            }
            for i in 0..K {
                base[i] -= strides[i][d] * outer[d];
            }
            idx[d] = 0;
        }
    }
}

fn binary(b: BinaryOp, a: &Arr, c: &Arr, shape: &[usize]) -> Result<Data, String> {
    let (sa, sb) = (
        broadcast_strides(&a.shape, shape),
        broadcast_strides(&c.shape, shape),
    );
    // `f(x, y)` of every pair of elements the broadcast result pairs up.
    fn zip<X: Copy, Y: Copy, R>(
        shape: &[usize],
        (x, sa): (&[X], &[usize]),
        (y, sb): (&[Y], &[usize]),
        f: impl Fn(X, Y) -> R,
    ) -> Vec<R> {
        map_broadcast(shape, [sa, sb], |[i, j]| f(x[i], y[j]))
    }
    Ok(match (&a.data, &c.data) {
        (Data::F(x), Data::F(y)) => {
            let (x, y) = ((&x[..], &sa[..]), (&y[..], &sb[..]));
            match b {
                BinaryOp::Add => Data::F(zip(shape, x, y, |a, b| a + b)),
                BinaryOp::Sub => Data::F(zip(shape, x, y, |a, b| a - b)),
                BinaryOp::Mul => Data::F(zip(shape, x, y, |a, b| a * b)),
                BinaryOp::Div => Data::F(zip(shape, x, y, |a, b| a / b)),
                BinaryOp::Pow => Data::F(zip(shape, x, y, f64::powf)),
                BinaryOp::Equal => Data::I(zip(shape, x, y, |a, b| (a == b) as i64)),
                BinaryOp::Less => Data::I(zip(shape, x, y, |a, b| (a < b) as i64)),
                BinaryOp::LessEqual => Data::I(zip(shape, x, y, |a, b| (a <= b) as i64)),
                BinaryOp::Greater => Data::I(zip(shape, x, y, |a, b| (a > b) as i64)),
                BinaryOp::GreaterEqual => Data::I(zip(shape, x, y, |a, b| (a >= b) as i64)),
                BinaryOp::Max => Data::F(zip(shape, x, y, |a, b| nan_or(a, b, f64::max))),
                BinaryOp::Min => Data::F(zip(shape, x, y, |a, b| nan_or(a, b, f64::min))),
                BinaryOp::And => unreachable!(),
            }
        }
        // Only `pow` mixes dtypes: a float base with an integer exponent.
        (Data::F(x), Data::I(y)) => {
            Data::F(zip(shape, (x, &sa), (y, &sb), |a, b| a.powf(b as f64)))
        }
        (Data::I(x), Data::F(y)) => Data::I(zip(shape, (x, &sa), (y, &sb), |a, b| {
            (a as f64).powf(b) as i64
        })),
        (Data::I(x), Data::I(y)) => {
            let (x, y) = ((&x[..], &sa[..]), (&y[..], &sb[..]));
            match b {
                BinaryOp::Add => Data::I(zip(shape, x, y, i64::wrapping_add)),
                BinaryOp::Sub => Data::I(zip(shape, x, y, i64::wrapping_sub)),
                BinaryOp::Mul => Data::I(zip(shape, x, y, i64::wrapping_mul)),
                BinaryOp::Div => {
                    // Every element of a broadcast operand is read at least once.
                    if shape.iter().product::<usize>() > 0 && y.0.contains(&0) {
                        return Err("integer division by zero".into());
                    }
                    Data::I(zip(shape, x, y, i64::wrapping_div))
                }
                BinaryOp::Pow => Data::I(zip(shape, x, y, |a, b| {
                    a.wrapping_pow(b.clamp(0, u32::MAX as i64) as u32)
                })),
                BinaryOp::Equal => Data::I(zip(shape, x, y, |a, b| (a == b) as i64)),
                BinaryOp::Less => Data::I(zip(shape, x, y, |a, b| (a < b) as i64)),
                BinaryOp::LessEqual => Data::I(zip(shape, x, y, |a, b| (a <= b) as i64)),
                BinaryOp::Greater => Data::I(zip(shape, x, y, |a, b| (a > b) as i64)),
                BinaryOp::GreaterEqual => Data::I(zip(shape, x, y, |a, b| (a >= b) as i64)),
                BinaryOp::Max => Data::I(zip(shape, x, y, i64::max)),
                BinaryOp::Min => Data::I(zip(shape, x, y, i64::min)),
                BinaryOp::And => Data::I(zip(shape, x, y, |a, b| (a != 0 && b != 0) as i64)),
            }
        }
    })
}
