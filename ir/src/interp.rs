//! The reference interpreter: the semantics of every op, the oracle for every later backend.
//!
//! Floating-point values are computed in f64 and rounded to the value's dtype after each op
//! (so f32 elementwise results are correctly rounded), and reductions, matmuls and
//! normalisations accumulate in f64. Integer values are i64 (i32 wraps, bool is 0/1).

use std::collections::HashMap;

use half::{bf16, f16};

use crate::op::broadcast_shapes;
use crate::{BinaryOp, DType, Graph, Op, ReduceKind, Tensor, UnaryOp, ValueDef, ValueId};

/// Largest single result the interpreter computes (it holds values as f64 or i64).
const INTERP_MAX_BYTES: usize = 16 << 30;

/// Why the interpreter could not evaluate the graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    /// A graph input has no value, or its value has the wrong type.
    #[error("input `{name}`: {msg}")]
    Input {
        /// The input's name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A parameter has no data (e.g. a graph parsed from text).
    #[error("param `{0}` has no data")]
    MissingParam(String),
    /// A result held a NaN ([`RunOptions::check_nan`]).
    #[error("node #{node} `{op}`{name} produced a non-finite value ({value}) in its {ty} result")]
    NonFinite {
        /// Node index.
        node: usize,
        /// Op name.
        op: &'static str,
        /// ` (name)` or empty.
        name: String,
        /// The first non-finite element.
        value: f64,
        /// The result's type.
        ty: String,
    },
    /// An op failed at run time (an index out of range, a division by zero).
    #[error("node #{node} `{op}`{name}: {msg}")]
    Op {
        /// Node index.
        node: usize,
        /// Op name.
        op: &'static str,
        /// ` (onnx name)` or empty.
        name: String,
        /// What went wrong.
        msg: String,
    },
}

#[derive(Clone, Debug)]
enum Data {
    F(Vec<f64>),
    I(Vec<i64>),
}

#[derive(Clone, Debug)]
struct Arr {
    dtype: DType,
    shape: Vec<usize>,
    data: Data,
}

impl Arr {
    fn from_tensor(t: &Tensor) -> Arr {
        let data = if t.dtype().is_float() {
            Data::F(t.to_f64_vec())
        } else {
            Data::I(t.to_i64_vec())
        };
        Arr {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data,
        }
    }

    fn to_tensor(&self) -> Tensor {
        match &self.data {
            Data::F(v) => Tensor::from_f64(self.dtype, self.shape.clone(), v),
            Data::I(v) => Tensor::from_i64(self.dtype, self.shape.clone(), v),
        }
    }

    fn f(&self) -> &[f64] {
        match &self.data {
            Data::F(v) => v,
            Data::I(_) => {
                panic!("interpreter: float data expected (the verifier admits no such graph)")
            }
        }
    }

    fn i(&self) -> &[i64] {
        match &self.data {
            Data::I(v) => v,
            Data::F(_) => {
                panic!("interpreter: integer data expected (the verifier admits no such graph)")
            }
        }
    }

    /// A new array of `dtype`: floats rounded to the dtype, integers wrapped to it.
    fn new(dtype: DType, shape: Vec<usize>, data: Data) -> Arr {
        let data = match data {
            Data::F(v) => Data::F(match dtype {
                DType::F32 => v.into_iter().map(|x| x as f32 as f64).collect(),
                DType::F64 => v,
                DType::F16 => v.into_iter().map(|x| f16::from_f64(x).to_f64()).collect(),
                DType::BF16 => v.into_iter().map(|x| bf16::from_f64(x).to_f64()).collect(),
                _ => unreachable!("float data for {dtype}"),
            }),
            Data::I(v) => Data::I(match dtype {
                DType::I32 => v.into_iter().map(|x| x as i32 as i64).collect(),
                DType::I16 => v.into_iter().map(|x| x as i16 as i64).collect(),
                DType::Bool => v.into_iter().map(|x| (x != 0) as i64).collect(),
                _ => v,
            }),
        };
        Arr { dtype, shape, data }
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides that read `shape` as if broadcast to `out` (0 on broadcast dims).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < off || shape[i - off] == 1 {
                0
            } else {
                s[i - off]
            }
        })
        .collect()
}

/// Flat input offsets for every output index of `out` (row-major), given per-dim strides.
fn offsets(out: &[usize], strides: &[usize], base: usize) -> Vec<usize> {
    let n: usize = out.iter().product();
    let mut res = Vec::with_capacity(n);
    if n == 0 {
        return res;
    }
    let mut idx = vec![0usize; out.len()];
    let mut off = base;
    for _ in 0..n {
        res.push(off);
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < out[d] {
                break;
            }
            off -= strides[d] * out[d];
            idx[d] = 0;
        }
    }
    res
}

fn take(data: &Data, offs: &[usize]) -> Data {
    match data {
        Data::F(v) => Data::F(offs.iter().map(|&o| v[o]).collect()),
        Data::I(v) => Data::I(offs.iter().map(|&o| v[o]).collect()),
    }
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

/// Evaluates one op on tensors (used by the interpreter and by constant folding).
/// The operands must satisfy [`Op::infer`].
fn eval(op: &Op, ins: &[&Arr]) -> Result<Arr, String> {
    let out_ty = {
        let tys: Vec<_> = ins
            .iter()
            .map(|a| crate::TensorType::new(a.dtype, a.shape.clone()))
            .collect();
        op.infer(&tys)?.remove(0)
    };
    let operand_types: Vec<crate::TensorType> = ins
        .iter()
        .map(|a| crate::TensorType::new(a.dtype, a.shape.clone()))
        .collect();
    if let Some(steps) = op.expansion(&operand_types) {
        // A block: its steps, each rounded to the dtype as the lowered program would.
        let mut done: Vec<Arr> = vec![];
        for (step, operands) in steps {
            let args: Vec<&Arr> = operands
                .iter()
                .map(|o| match *o {
                    crate::Operand::Input(i) => ins[i],
                    crate::Operand::Step(i) => &done[i],
                })
                .collect();
            let r = eval(&step, &args)?;
            done.push(r);
        }
        return Ok(done.pop().expect("a block has steps"));
    }
    let (dt, shape) = (out_ty.dtype, out_ty.shape);
    let data = match op {
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
                Idx::new(&ins[0].shape, &shape),
                Idx::new(&ins[1].shape, &shape),
            );
            binary(*b, ins[0], ins[1], n, &oa, &ob)?
        }
        Op::Where => {
            let n: usize = shape.iter().product();
            let oc = Idx::new(&ins[0].shape, &shape);
            let (oa, ob) = (
                Idx::new(&ins[1].shape, &shape),
                Idx::new(&ins[2].shape, &shape),
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
        Op::MatMul => matmul(ins[0], ins[1], &shape),
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let log = matches!(op, Op::LogSoftmax { .. });
            let x = ins[0].f();
            let (len, inner) = (shape[*axis], shape[axis + 1..].iter().product::<usize>());
            let mut out = vec![0.0; x.len()];
            for o in 0..x.len() / (len * inner).max(1) {
                for i in 0..inner {
                    let at = |k: usize| o * len * inner + k * inner + i;
                    let m = (0..len).map(|k| x[at(k)]).fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = (0..len).map(|k| (x[at(k)] - m).exp()).sum();
                    for k in 0..len {
                        out[at(k)] = if log {
                            x[at(k)] - m - s.ln()
                        } else {
                            (x[at(k)] - m).exp() / s
                        };
                    }
                }
            }
            Data::F(out)
        }
        Op::LayerNorm { axis, epsilon } => {
            let x = ins[0].f();
            let n: usize = shape[*axis..].iter().product();
            let scale = ins[1].f();
            let bias = ins.get(2).map(|b| b.f());
            let mut out = vec![0.0; x.len()];
            for (row, o) in x.chunks(n.max(1)).zip(out.chunks_mut(n.max(1))) {
                let mean = row.iter().sum::<f64>() / n as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
                let rstd = 1.0 / (var + *epsilon as f64).sqrt();
                for k in 0..row.len() {
                    o[k] = (row[k] - mean) * rstd * scale[k] + bias.map_or(0.0, |b| b[k]);
                }
            }
            Data::F(out)
        }
        Op::Attention { scale } => {
            let (q, k, v) = (ins[0].f(), ins[1].f(), ins[2].f());
            let (qs, ks, vs) = (&ins[0].shape, &ins[1].shape, &ins[2].shape);
            let (b, h, s, d) = (qs[0], qs[1], qs[2], qs[3]);
            let (hk, t, dv) = (ks[1], ks[2], vs[3]);
            let group = h / hk;
            let scores = [b, h, s, t];
            let moff = offsets(&scores, &broadcast_strides(&ins[3].shape, &scores), 0);
            let m = ins[3].f();
            let mut out = vec![0.0; b * h * s * dv];
            let mut row = vec![0.0; t];
            for bi in 0..b {
                for hi in 0..h {
                    let kh = hi / group;
                    for i in 0..s {
                        let qo = ((bi * h + hi) * s + i) * d;
                        let mut max = f64::NEG_INFINITY;
                        for (j, r) in row.iter_mut().enumerate() {
                            let ko = ((bi * hk + kh) * t + j) * d;
                            let dot: f64 = (0..d).map(|c| q[qo + c] * k[ko + c]).sum();
                            *r = dot * *scale as f64 + m[moff[((bi * h + hi) * s + i) * t + j]];
                            max = max.max(*r);
                        }
                        let sum: f64 = row.iter().map(|r| (r - max).exp()).sum();
                        let oo = ((bi * h + hi) * s + i) * dv;
                        if max == f64::NEG_INFINITY || !sum.is_finite() {
                            continue; // an all -inf row: zeros (the NaN guard's result)
                        }
                        for (j, r) in row.iter().enumerate() {
                            let p = (r - max).exp() / sum;
                            let vo = ((bi * hk + kh) * t + j) * dv;
                            for c in 0..dv {
                                out[oo + c] += p * v[vo + c];
                            }
                        }
                    }
                }
            }
            Data::F(out)
        }
        Op::AttentionLse { scale } | Op::AttentionGrad { scale, .. } => {
            let grad = match op {
                Op::AttentionGrad { wrt, .. } => Some(*wrt),
                _ => None,
            };
            let (q, k) = (ins[0].f(), ins[1].f());
            let (qs, ks) = (&ins[0].shape, &ins[1].shape);
            let mi = if grad.is_some() { 3 } else { 2 };
            let (b, h, s, d) = (qs[0], qs[1], qs[2], qs[3]);
            let (hk, t) = (ks[1], ks[2]);
            let group = h / hk;
            let scores = [b, h, s, t];
            let moff = offsets(&scores, &broadcast_strides(&ins[mi].shape, &scores), 0);
            let m = ins[mi].f();
            let score = |bi: usize, hi: usize, i: usize, j: usize| -> f64 {
                let qo = ((bi * h + hi) * s + i) * d;
                let ko = ((bi * hk + hi / group) * t + j) * d;
                let dot: f64 = (0..d).map(|c| q[qo + c] * k[ko + c]).sum();
                dot * *scale as f64 + m[moff[((bi * h + hi) * s + i) * t + j]]
            };
            match grad {
                None => {
                    let mut out = Vec::with_capacity(b * h * s);
                    for bi in 0..b {
                        for hi in 0..h {
                            for i in 0..s {
                                let row: Vec<f64> = (0..t).map(|j| score(bi, hi, i, j)).collect();
                                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                                out.push(if max == f64::NEG_INFINITY {
                                    max
                                } else {
                                    max + row.iter().map(|r| (r - max).exp()).sum::<f64>().ln()
                                });
                            }
                        }
                    }
                    Data::F(out)
                }
                Some(wrt) => {
                    let (v, lse, dy, delta) = (ins[2].f(), ins[4].f(), ins[5].f(), ins[6].f());
                    let dv = ins[2].shape[3];
                    let mut out = vec![0.0; ins[wrt].shape.iter().product()];
                    for bi in 0..b {
                        for hi in 0..h {
                            let kh = hi / group;
                            for i in 0..s {
                                let r = (bi * h + hi) * s + i;
                                for j in 0..t {
                                    let p = if lse[r] == f64::NEG_INFINITY {
                                        0.0
                                    } else {
                                        (score(bi, hi, i, j) - lse[r]).exp()
                                    };
                                    let vo = ((bi * hk + kh) * t + j) * dv;
                                    let dp: f64 = (0..dv).map(|c| dy[r * dv + c] * v[vo + c]).sum();
                                    let ds = p * (dp - delta[r]) * *scale as f64;
                                    let ko = ((bi * hk + kh) * t + j) * d;
                                    match wrt {
                                        0 => (0..d).for_each(|c| out[r * d + c] += ds * k[ko + c]),
                                        1 => (0..d).for_each(|c| out[ko + c] += ds * q[r * d + c]),
                                        _ => {
                                            (0..dv).for_each(|c| out[vo + c] += p * dy[r * dv + c])
                                        }
                                    }
                                }
                            }
                        }
                    }
                    Data::F(out)
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
        Op::SwigluFfn
        | Op::GeluFfn { .. }
        | Op::MocFfn { .. }
        | Op::Rope
        | Op::Residual
        | Op::RevCouple
        | Op::LmHeadCe { .. } => {
            unreachable!("blocks are evaluated by their steps")
        }
        Op::RmsNorm { axis, epsilon } => {
            let x = ins[0].f();
            let n: usize = shape[*axis..].iter().product();
            let scale = ins[1].f();
            let mut out = vec![0.0; x.len()];
            for (row, o) in x.chunks(n.max(1)).zip(out.chunks_mut(n.max(1))) {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / n as f64;
                let r = 1.0 / (ms + *epsilon as f64).sqrt();
                for k in 0..row.len() {
                    o[k] = row[k] * r * scale[k];
                }
            }
            Data::F(out)
        }
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
            let pos = offsets(&shape, &strides(&x.shape), 0);
            let mut offs = Vec::with_capacity(idx.len());
            let out_strides = strides(&shape);
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
        Op::Reshape { .. } => ins[0].data.clone(),
        Op::Transpose { perm } => {
            let s = strides(&ins[0].shape);
            let ps: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
            take(&ins[0].data, &offsets(&shape, &ps, 0))
        }
        Op::Slice { starts, steps, .. } => {
            let s = strides(&ins[0].shape);
            let base = starts.iter().zip(&s).map(|(a, b)| a * b).sum();
            let ss: Vec<usize> = steps.iter().zip(&s).map(|(a, b)| a * b).collect();
            take(&ins[0].data, &offsets(&shape, &ss, base))
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
            &offsets(&shape, &broadcast_strides(&ins[0].shape, &shape), 0),
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
            let os = strides(&shape);
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
            let os = strides(&shape);
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
        Op::SliceScatter { starts, steps, .. } => {
            let os = strides(&shape);
            let base = starts.iter().zip(&os).map(|(a, b)| a * b).sum();
            let ss: Vec<usize> = steps.iter().zip(&os).map(|(a, b)| a * b).collect();
            let dst = offsets(&ins[0].shape, &ss, base);
            scatter(&ins[0].data, &dst, shape.iter().product())
        }
    };
    Ok(Arr::new(dt, shape, data))
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

/// `out = zeros(n)`, then `out[dst[k]] += src[k]`.
fn scatter(src: &Data, dst: &[usize], n: usize) -> Data {
    match src {
        Data::F(v) => {
            let mut out = vec![0.0; n];
            for (k, &d) in dst.iter().enumerate() {
                out[d] += v[k];
            }
            Data::F(out)
        }
        Data::I(v) => {
            let mut out = vec![0i64; n];
            for (k, &d) in dst.iter().enumerate() {
                out[d] = out[d].wrapping_add(v[k]);
            }
            Data::I(out)
        }
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

fn matmul(a: &Arr, b: &Arr, out_shape: &[usize]) -> Data {
    // Promote 1-D operands to matrices, as NumPy does.
    let ash = if a.shape.len() == 1 {
        vec![1, a.shape[0]]
    } else {
        a.shape.clone()
    };
    let bsh = if b.shape.len() == 1 {
        vec![b.shape[0], 1]
    } else {
        b.shape.clone()
    };
    let (m, k, n) = (ash[ash.len() - 2], ash[ash.len() - 1], bsh[bsh.len() - 1]);
    let batch =
        broadcast_shapes(&ash[..ash.len() - 2], &bsh[..bsh.len() - 2]).expect("checked by infer");
    let abase = offsets(
        &batch,
        &broadcast_strides(&ash[..ash.len() - 2], &batch)
            .iter()
            .map(|s| s * m * k)
            .collect::<Vec<_>>(),
        0,
    );
    let bbase = offsets(
        &batch,
        &broadcast_strides(&bsh[..bsh.len() - 2], &batch)
            .iter()
            .map(|s| s * k * n)
            .collect::<Vec<_>>(),
        0,
    );
    let (x, y) = (a.f(), b.f());
    let mut out = Vec::with_capacity(out_shape.iter().product());
    let mut bt = vec![0.0; k * n];
    for (&ao, &bo) in abase.iter().zip(&bbase) {
        for kk in 0..k {
            for j in 0..n {
                bt[j * k + kk] = y[bo + kk * n + j];
            }
        }
        for i in 0..m {
            let row = &x[ao + i * k..ao + (i + 1) * k];
            for j in 0..n {
                let col = &bt[j * k..(j + 1) * k];
                out.push(row.iter().zip(col).map(|(p, q)| p * q).sum::<f64>());
            }
        }
    }
    Data::F(out)
}

/// Evaluates one op on constant tensors (constant folding uses this).
pub fn eval_op(op: &Op, inputs: &[&Tensor]) -> Result<Tensor, String> {
    let arrs: Vec<Arr> = inputs.iter().map(|t| Arr::from_tensor(t)).collect();
    let arrs: Vec<&Arr> = arrs.iter().collect();
    eval(op, &arrs).map(|a| a.to_tensor())
}

/// Runs the graph on named inputs and returns its named outputs in order. Values are freed
/// after their last use.
pub fn interpret(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, InterpError> {
    run(g, inputs, &RunOptions::default()).map(|r| r.outputs)
}

/// How [`run`] evaluates.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Fail at the first node whose float result holds a NaN. (Infinities are legitimate in
    /// intermediate values, e.g. `-inf` attention masks before a softmax.)
    pub check_nan: bool,
}

/// What one evaluation of a graph produced.
#[derive(Debug, Clone)]
pub struct Run {
    /// Named outputs in order.
    pub outputs: Vec<(String, Tensor)>,
    /// New values of updated params, in the graph's update order.
    pub updates: Vec<(ValueId, Tensor)>,
}

/// Runs the graph (outputs and state updates). Values are freed after their last use.
pub fn run(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run, InterpError> {
    let mut vals: Vec<Option<Arr>> = vec![None; g.values().len()];
    for (i, v) in g.values().iter().enumerate() {
        match &v.def {
            ValueDef::Input { name } => {
                let t = inputs.get(name).ok_or_else(|| InterpError::Input {
                    name: name.clone(),
                    msg: "no value given".into(),
                })?;
                if t.ty() != &v.ty {
                    return Err(InterpError::Input {
                        name: name.clone(),
                        msg: format!("expected {} but got {}", v.ty, t.ty()),
                    });
                }
                vals[i] = Some(Arr::from_tensor(t));
            }
            ValueDef::Param { name, data, role } => {
                vals[i] = Some(match (data, role) {
                    (Some(t), _) => Arr::from_tensor(t),
                    // Optimizer state starts at zero.
                    (None, crate::ParamRole::OptimizerState) => {
                        let zeros = vec![0.0; v.ty.numel()];
                        Arr::new(v.ty.dtype, v.ty.shape.clone(), Data::F(zeros))
                    }
                    (None, _) => return Err(InterpError::MissingParam(name.clone())),
                });
            }
            ValueDef::Const(t) => vals[i] = Some(Arr::from_tensor(t)),
            ValueDef::Node { .. } => {}
        }
    }
    let mut last_use = vec![usize::MAX; g.values().len()];
    for (ni, n) in g.nodes().iter().enumerate() {
        for &v in &n.inputs {
            last_use[v.index()] = ni;
        }
    }
    for (_, v) in g.outputs() {
        last_use[v.index()] = usize::MAX;
    }
    for &(_, v) in g.updates() {
        last_use[v.index()] = usize::MAX;
    }
    for (ni, n) in g.nodes().iter().enumerate() {
        let too_big = n
            .outputs
            .iter()
            .map(|&o| &g.value(o).ty)
            .find(|t| t.checked_bytes().is_none_or(|b| b > INTERP_MAX_BYTES));
        let op_error = |msg: String| InterpError::Op {
            node: ni,
            op: n.op.name(),
            name: if n.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", n.name)
            },
            msg,
        };
        if let Some(t) = too_big {
            return Err(op_error(format!(
                "the result {t} is larger than the reference interpreter handles (16 GiB)"
            )));
        }
        let ins: Vec<&Arr> = n
            .inputs
            .iter()
            .map(|v| vals[v.index()].as_ref().expect("verified graph"))
            .collect();
        let out = eval(&n.op, &ins).map_err(op_error)?;
        if opts.check_nan {
            if let Data::F(v) = &out.data {
                if let Some(bad) = v.iter().find(|x| x.is_nan()) {
                    return Err(InterpError::NonFinite {
                        node: ni,
                        op: n.op.name(),
                        name: if n.name.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", n.name)
                        },
                        value: *bad,
                        ty: g.value(n.outputs[0]).ty.to_string(),
                    });
                }
            }
        }
        vals[n.outputs[0].index()] = Some(out);
        for &v in &n.inputs {
            if last_use[v.index()] == ni {
                vals[v.index()] = None;
            }
        }
    }
    let value = |v: ValueId| vals[v.index()].as_ref().expect("computed").to_tensor();
    Ok(Run {
        outputs: g
            .outputs()
            .iter()
            .map(|(name, v)| (name.clone(), value(*v)))
            .collect(),
        updates: g.updates().iter().map(|&(p, v)| (p, value(v))).collect(),
    })
}
