//! The neural-network ops' semantics: `softmax`, `log_softmax`, the norms (`layer_norm`,
//! `rms_norm`; f64 statistics) and attention with its backward ops (`attention_lse`,
//! `attention_grad`).

use super::{broadcast_strides, offsets, Arr, Data};
use crate::{Op, Scores};

/// [`Op::Softmax`], [`Op::LogSoftmax`], [`Op::LayerNorm`], [`Op::RmsNorm`], [`Op::Attention`],
/// [`Op::AttentionLse`] and [`Op::AttentionGrad`]; `shape` is the result's.
pub(super) fn eval(op: &Op, ins: &[&Arr], shape: &[usize]) -> Result<Data, String> {
    Ok(match op {
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
        Op::Attention(sc) => attention(ins, sc),
        Op::AttentionLse(sc) | Op::AttentionGrad { scores: sc, .. } => {
            attention_backward(op, ins, sc)
        }
        _ => unreachable!("`{}` is not a neural-network op", op.name()),
    })
}

/// One score of [`Scores`] from the dot product `dot` and the mask value `m`, with
/// d score / d(dot·scale) (the soft-cap's derivative, 1 without one).
fn score(sc: &Scores, dot: f64, m: f64, hidden: bool) -> (f64, f64) {
    if hidden {
        return (f64::NEG_INFINITY, 0.0);
    }
    let r = dot * sc.scale as f64;
    if sc.softcap > 0.0 {
        let c = sc.softcap as f64;
        let t = (r / c).tanh();
        (c * t + m, 1.0 - t * t)
    } else {
        (r + m, 1.0)
    }
}

/// Attention's forward pass: one row of scores at a time, a fully masked row giving zeros.
fn attention(ins: &[&Arr], sc: &Scores) -> Data {
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
                    let mv = m[moff[((bi * h + hi) * s + i) * t + j]];
                    *r = score(sc, dot, mv, sc.hides(i, j, s, t)).0;
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

/// `attention_lse` (`op` is [`Op::AttentionLse`]) or one `attention_grad`, recomputing the
/// scores row by row.
fn attention_backward(op: &Op, ins: &[&Arr], sc: &Scores) -> Data {
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
    // The score and its soft-cap derivative.
    let score = |bi: usize, hi: usize, i: usize, j: usize| -> (f64, f64) {
        let qo = ((bi * h + hi) * s + i) * d;
        let ko = ((bi * hk + hi / group) * t + j) * d;
        let dot: f64 = (0..d).map(|c| q[qo + c] * k[ko + c]).sum();
        let mv = m[moff[((bi * h + hi) * s + i) * t + j]];
        score(sc, dot, mv, sc.hides(i, j, s, t))
    };
    match grad {
        None => {
            let mut out = Vec::with_capacity(b * h * s);
            for bi in 0..b {
                for hi in 0..h {
                    for i in 0..s {
                        let row: Vec<f64> = (0..t).map(|j| score(bi, hi, i, j).0).collect();
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
                            let (sj, dcap) = score(bi, hi, i, j);
                            // p = exp(s − lse) ≤ 1: lse was rounded to its storage type, so
                            // s − lse can come out above 0; it is clamped there (NaN kept).
                            let p = if lse[r] == f64::NEG_INFINITY {
                                0.0
                            } else {
                                let e = sj - lse[r];
                                (if e > 0.0 { 0.0 } else { e }).exp()
                            };
                            let vo = ((bi * hk + kh) * t + j) * dv;
                            let dp: f64 = (0..dv).map(|c| dy[r * dv + c] * v[vo + c]).sum();
                            let ds = p * (dp - delta[r]) * dcap * sc.scale as f64;
                            let ko = ((bi * hk + kh) * t + j) * d;
                            match wrt {
                                0 => (0..d).for_each(|c| out[r * d + c] += ds * k[ko + c]),
                                1 => (0..d).for_each(|c| out[ko + c] += ds * q[r * d + c]),
                                _ => (0..dv).for_each(|c| out[vo + c] += p * dy[r * dv + c]),
                            }
                        }
                    }
                }
            }
            Data::F(out)
        }
    }
}
