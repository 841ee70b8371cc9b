//! VJPs of the neural-network ops: `softmax`, `log_softmax`, the norms (statistics recomputed from
//! x) and attention (flash-style through `attention_lse`/`attention_grad` unless the mask needs a
//! gradient); attention's backward ops have none (no second derivatives).

use memc_ir::{Op, ReduceKind, UnaryOp, ValueId};

use crate::build::Builder;

/// VJPs of [`Op::Softmax`], [`Op::LogSoftmax`], [`Op::LayerNorm`], [`Op::RmsNorm`] and
/// [`Op::Attention`]; [`Op::AttentionLse`] and [`Op::AttentionGrad`] are an error.
pub(super) fn vjp(
    b: &mut Builder,
    op: &Op,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    Ok(match op {
        Op::Softmax { axis } => {
            let gy = b.mul(dy, y)?;
            let s = b.reduce(ReduceKind::Sum, gy, vec![*axis], true)?;
            let d = b.sub(dy, s)?;
            vec![Some(b.mul(y, d)?)]
        }
        Op::LogSoftmax { axis } => {
            let s = b.reduce(ReduceKind::Sum, dy, vec![*axis], true)?;
            let p = b.unary(UnaryOp::Exp, y)?;
            let ps = b.mul(p, s)?;
            vec![Some(b.sub(dy, ps)?)]
        }
        Op::LayerNorm { axis, epsilon } => layer_norm_vjp(b, x, dy, *axis, *epsilon, wants)?,
        Op::RmsNorm { axis, epsilon } => rms_norm_vjp(b, x, dy, *axis, *epsilon, wants)?,
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            return Err(format!(
                "`{}` is part of attention's backward pass; second derivatives are not supported",
                op.name()
            ))
        }
        Op::Attention(sc) if !wants[3] => attention_flash_vjp(b, x, y, dy, *sc, wants)?,
        Op::Attention(sc) if *sc == memc_ir::Scores::scaled(sc.scale) => {
            attention_vjp(b, x, dy, sc.scale as f64, wants)?
        }
        Op::Attention(_) => {
            return Err(
                "a trained attention mask with soft-capping, causal or window attributes has no \
                 gradient in memc; keep the mask constant"
                    .into(),
            )
        }
        _ => unreachable!("`{}` is not a neural-network op", op.name()),
    })
}

/// Attention's VJP when the mask needs no gradient (the usual case): the row log-sum-exp is
/// recomputed from q, k and the mask, delta = Σ dy·y, and each of dq, dk, dv is one
/// `attention_grad` op that recomputes the probabilities row by row: nothing of size S×T
/// exists in the forward or the backward pass.
fn attention_flash_vjp(
    b: &mut Builder,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    scores: memc_ir::Scores,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let lse = b.op(Op::AttentionLse(scores), &[x[0], x[1], x[3]])?;
    let dyy = b.mul(dy, y)?;
    let delta = b.reduce(ReduceKind::Sum, dyy, vec![3], false)?;
    let mut out = vec![];
    for (wrt, &want) in wants.iter().enumerate().take(3) {
        out.push(if want {
            Some(b.op(
                Op::AttentionGrad { scores, wrt },
                &[x[0], x[1], x[2], x[3], lse, dy, delta],
            )?)
        } else {
            None
        });
    }
    out.push(None);
    Ok(out)
}

/// Attention's VJP when the mask needs a gradient: recomputes the probabilities from q, k and the mask (nothing of size
/// S×T is kept from the forward pass; the backward pass holds it transiently):
/// p = softmax(q·kᵀ·scale + mask), dv = pᵀ·dy, ds = p ⊙ (dy·vᵀ − rowsum(dy·vᵀ ⊙ p)),
/// dq = ds·k·scale, dk = dsᵀ·q·scale; grouped key/value heads sum their query heads' terms.
fn attention_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    scale: f64,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (qs, ks, vs) = (b.shape(x[0]), b.shape(x[1]), b.shape(x[2]));
    let (bsz, h, hk, t) = (qs[0], qs[1], ks[1], ks[2]);
    let group = h / hk;
    let repeat = |b: &mut Builder, v: ValueId, s: &[usize]| -> Result<ValueId, String> {
        if group == 1 {
            return Ok(v);
        }
        let r = b.reshape(v, vec![bsz, hk, 1, t, s[3]])?;
        let e = b.expand(r, vec![bsz, hk, group, t, s[3]])?;
        b.reshape(e, vec![bsz, h, t, s[3]])
    };
    let fold = |b: &mut Builder, g: ValueId, s: &[usize]| -> Result<ValueId, String> {
        if group == 1 {
            return Ok(g);
        }
        let r = b.reshape(g, vec![bsz, hk, group, t, s[3]])?;
        b.reduce(ReduceKind::Sum, r, vec![2], false)
    };
    let kr = repeat(b, x[1], &ks)?;
    let vr = repeat(b, x[2], &vs)?;
    let kt = b.transpose_last2(kr)?;
    let qk = b.op(Op::MatMul, &[x[0], kt])?;
    let sc = b.mul_scalar(qk, scale)?;
    let s = b.add(sc, x[3])?;
    let p0 = b.op(Op::Softmax { axis: 3 }, &[s])?;
    let nan = b.unary(UnaryOp::IsNaN, p0)?;
    let zero = b.scalar(b.dtype(p0), 0.0);
    let p = b.op(Op::Where, &[nan, zero, p0])?;
    let dv = if wants[2] {
        let pt = b.transpose_last2(p)?;
        let g = b.op(Op::MatMul, &[pt, dy])?;
        Some(fold(b, g, &vs)?)
    } else {
        None
    };
    let need_ds = wants[0] || wants[1] || wants[3];
    let ds = if need_ds {
        let vt = b.transpose_last2(vr)?;
        let dp = b.op(Op::MatMul, &[dy, vt])?;
        let dpp = b.mul(dp, p)?;
        let rs = b.reduce(ReduceKind::Sum, dpp, vec![3], true)?;
        let c = b.sub(dp, rs)?;
        Some(b.mul(p, c)?)
    } else {
        None
    };
    let dq = match ds.filter(|_| wants[0]) {
        Some(ds) => {
            let g = b.op(Op::MatMul, &[ds, kr])?;
            Some(b.mul_scalar(g, scale)?)
        }
        None => None,
    };
    let dk = match ds.filter(|_| wants[1]) {
        Some(ds) => {
            let dst = b.transpose_last2(ds)?;
            let g = b.op(Op::MatMul, &[dst, x[0]])?;
            let g = b.mul_scalar(g, scale)?;
            Some(fold(b, g, &ks)?)
        }
        None => None,
    };
    let dm = match ds.filter(|_| wants[3]) {
        Some(ds) => {
            let ms = b.shape(x[3]);
            Some(b.unbroadcast(ds, &ms)?)
        }
        None => None,
    };
    Ok(vec![dq, dk, dv, dm])
}

/// y = x·r·s with r = (mean(x²) + eps)^-½ over the normalised dims:
/// dx = r·(g - x̂·mean(g·x̂)) with g = dy·s and x̂ = x·r; ds = Σ_lead dy·x̂.
fn rms_norm_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    axis: usize,
    eps: f32,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let shape = b.shape(x[0]);
    let norm_axes: Vec<usize> = (axis..shape.len()).collect();
    let lead_axes: Vec<usize> = (0..axis).collect();
    let sq = b.mul(x[0], x[0])?;
    let ms = b.reduce(ReduceKind::Mean, sq, norm_axes.clone(), true)?;
    let me = b.add_scalar(ms, eps as f64)?;
    let sd = b.unary(UnaryOp::Sqrt, me)?;
    let r = b.unary(UnaryOp::Reciprocal, sd)?;
    let xhat = b.mul(x[0], r)?;
    let gx = if wants[0] {
        let g = b.mul(dy, x[1])?;
        let gx_xhat = b.mul(g, xhat)?;
        let m = b.reduce(ReduceKind::Mean, gx_xhat, norm_axes, true)?;
        let t = b.mul(xhat, m)?;
        let d = b.sub(g, t)?;
        Some(b.mul(d, r)?)
    } else {
        None
    };
    let gscale = if wants[1] {
        let p = b.mul(dy, xhat)?;
        Some(b.reduce(ReduceKind::Sum, p, lead_axes, false)?)
    } else {
        None
    };
    Ok(vec![gx, gscale])
}

fn layer_norm_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    axis: usize,
    eps: f32,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let shape = b.shape(x[0]);
    let norm_axes: Vec<usize> = (axis..shape.len()).collect();
    let lead_axes: Vec<usize> = (0..axis).collect();
    // Recompute the statistics from x (PyTorch saves mean and rstd; they are small).
    let mean = b.reduce(ReduceKind::Mean, x[0], norm_axes.clone(), true)?;
    let xc = b.sub(x[0], mean)?;
    let sq = b.mul(xc, xc)?;
    let var = b.reduce(ReduceKind::Mean, sq, norm_axes.clone(), true)?;
    let ve = b.add_scalar(var, eps as f64)?;
    let sd = b.unary(UnaryOp::Sqrt, ve)?;
    let rstd = b.unary(UnaryOp::Reciprocal, sd)?;
    let xhat = b.mul(xc, rstd)?;
    let gx = if wants[0] {
        let gxhat = b.mul(dy, x[1])?;
        let m1 = b.reduce(ReduceKind::Mean, gxhat, norm_axes.clone(), true)?;
        let gx_xhat = b.mul(gxhat, xhat)?;
        let m2 = b.reduce(ReduceKind::Mean, gx_xhat, norm_axes.clone(), true)?;
        let t1 = b.sub(gxhat, m1)?;
        let t2 = b.mul(xhat, m2)?;
        let t = b.sub(t1, t2)?;
        Some(b.mul(t, rstd)?)
    } else {
        None
    };
    let gscale = if wants[1] {
        let p = b.mul(dy, xhat)?;
        Some(b.reduce(ReduceKind::Sum, p, lead_axes.clone(), false)?)
    } else {
        None
    };
    let mut out = vec![gx, gscale];
    if x.len() == 3 {
        out.push(if wants[2] {
            Some(b.reduce(ReduceKind::Sum, dy, lead_axes, false)?)
        } else {
            None
        });
    }
    Ok(out)
}
