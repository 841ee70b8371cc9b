//! VJPs of the block ops that keep their own: `residual`, `rev_couple` and the chunked
//! `lm_head_ce`; the other blocks (`swiglu_ffn`, `gelu_ffn`, `moc_ffn`, `rope`) are lowered to
//! their steps before autodiff.

use memc_ir::{BinaryOp, Op, ReduceKind, ValueId};

use crate::build::Builder;

/// VJPs of [`Op::LmHeadCe`], [`Op::Residual`] and [`Op::RevCouple`]; the other blocks are an
/// error.
pub(super) fn vjp(
    b: &mut Builder,
    op: &Op,
    x: &[ValueId],
    _y: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    Ok(match op {
        Op::LmHeadCe { chunk, weighted } => lm_head_ce_vjp(b, x, dy, *chunk, *weighted, wants)?,
        // x + f with one type: the gradient flows to both unchanged.
        Op::Residual => vec![wants[0].then_some(dy), wants[1].then_some(dy)],
        // s·a + f: the stream's gradient is scaled, the branch's is dy, the scale is constant.
        Op::RevCouple => vec![
            if wants[0] {
                Some(b.op(Op::Binary(BinaryOp::Mul), &[dy, x[2]])?)
            } else {
                None
            },
            wants[1].then_some(dy),
            None,
        ],
        Op::SwigluFfn | Op::GeluFfn { .. } | Op::MocFfn { .. } | Op::Rope => {
            return Err(format!(
                "`{}` has no VJP of its own: lower the blocks first (memc_passes::blocks::lower)",
                op.name()
            ))
        }
        _ => unreachable!("`{}` is not a block op", op.name()),
    })
}

/// Rows `r0..r1` (of `width` columns) of a matrix.
fn rows(r0: usize, r1: usize, width: usize) -> Op {
    Op::Slice {
        starts: vec![r0, 0],
        ends: vec![r1, width],
        steps: vec![1, 1],
    }
}

/// A chunk of the LM head: the rows `hk` of `h` that `slice` takes, and their logits
/// `hk·w (+ bias)` in the loss dtype `acc`.
fn chunk_logits(
    b: &mut Builder,
    h: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
    slice: Op,
    acc: memc_ir::DType,
) -> Result<(ValueId, ValueId), String> {
    let hk = b.op(slice, &[h])?;
    let logits = b.op(Op::MatMul, &[hk, w])?;
    let logits = match bias {
        Some(bias) => b.add(logits, bias)?,
        None => logits,
    };
    Ok((hk, b.cast(logits, acc)?))
}

/// `lm_head_ce`'s operands: h, w, the targets, the rows' weights (weighted) and the bias
/// (when given), and the bias's operand index.
fn head_operands(
    x: &[ValueId],
    weighted: bool,
) -> (
    ValueId,
    ValueId,
    ValueId,
    Option<ValueId>,
    Option<ValueId>,
    usize,
) {
    let at = if weighted { 4 } else { 3 };
    (
        x[0],
        x[1],
        x[2],
        weighted.then(|| x[3]),
        x.get(at).copied(),
        at,
    )
}

/// The fused LM-head loss's VJP, chunk by chunk like its forward: each chunk's logits are
/// recomputed, `g = (softmax − onehot(target))·dy/N` (weighted: `·dy·r_n` per row),
/// `dh = g·wᵀ` (concatenated), `dw = Σ hᵀ·g` and the bias's `Σ g` (accumulated in f32, or
/// f64 for f64). No `[N, V]` tensor is formed.
fn lm_head_ce_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    chunk: usize,
    weighted: bool,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (h, w, t, r, bias, bias_at) = head_operands(x, weighted);
    let mut db = None;
    let (n, d) = (b.shape(h)[0], b.shape(h)[1]);
    let vocab = b.shape(w)[1];
    let dt = b.dtype(h);
    let scale = b.mul_scalar(dy, 1.0 / n as f64)?;
    let wt = if wants[0] {
        Some(b.transpose(w, vec![1, 0])?)
    } else {
        None
    };
    let acc = memc_ir::loss_dtype(dt);
    let one = b.scalar(acc, 1.0);
    let (mut dh, mut dw) = (vec![], None);
    for r0 in (0..n).step_by(chunk.max(1)) {
        let r1 = (r0 + chunk).min(n);
        let rows = |width: usize| rows(r0, r1, width);
        let (hk, logits) = chunk_logits(b, h, w, bias, rows(d), acc)?;
        let p = b.op(Op::Softmax { axis: 1 }, &[logits])?;
        let tk = b.op(rows(1), &[t])?;
        let ones = b.expand(one, vec![r1 - r0, 1])?;
        let onehot = b.op(
            Op::ScatterElementsAdd {
                axis: 1,
                shape: vec![r1 - r0, vocab],
            },
            &[ones, tk],
        )?;
        let diff = b.sub(p, onehot)?;
        let gk = match r {
            Some(r) => {
                let rk = b.op(rows(1), &[r])?;
                let rk = b.mul(rk, dy)?;
                b.mul(diff, rk)?
            }
            None => b.mul(diff, scale)?,
        };
        if bias.is_some() && wants[bias_at] {
            let part = b.reduce(ReduceKind::Sum, gk, vec![0], false)?;
            db = Some(match db {
                Some(acc) => b.add(acc, part)?,
                None => part,
            });
        }
        let gk = b.cast(gk, dt)?;
        if let Some(wt) = wt {
            dh.push(b.op(Op::MatMul, &[gk, wt])?);
        }
        if wants[1] {
            let hkt = b.transpose(hk, vec![1, 0])?;
            let part = b.op(Op::MatMul, &[hkt, gk])?;
            let part = b.cast(part, acc)?;
            dw = Some(match dw {
                Some(acc) => b.add(acc, part)?,
                None => part,
            });
        }
    }
    head_grads(b, wants[0], dh, dw, db, w, bias, weighted)
}

/// `lm_head_ce`'s operand gradients from the per-chunk pieces: `dh` the chunks' row blocks
/// (concatenated, when wanted and there are any), `dw` and `db` the f32 accumulations cast back
/// to the weight's and bias's dtypes; the targets (and the rows' weights, `weighted`) get
/// none.
#[allow(clippy::too_many_arguments)]
fn head_grads(
    b: &mut Builder,
    wants_dh: bool,
    dh: Vec<ValueId>,
    dw: Option<ValueId>,
    db: Option<ValueId>,
    w: ValueId,
    bias: Option<ValueId>,
    weighted: bool,
) -> Result<Vec<Option<ValueId>>, String> {
    let dh = match (wants_dh, dh.len()) {
        (false, _) | (_, 0) => None,
        (true, 1) => Some(dh[0]),
        (true, _) => Some(b.op(Op::Concat { axis: 0 }, &dh)?),
    };
    let dw = match dw {
        Some(acc) => Some(b.cast(acc, b.dtype(w))?),
        None => None,
    };
    let mut out = vec![dh, dw, None];
    if weighted {
        out.push(None);
    }
    if let Some(bias) = bias {
        out.push(match db {
            Some(acc) => Some(b.cast(acc, b.dtype(bias))?),
            None => None,
        });
    }
    Ok(out)
}

/// The fused LM-head loss and its gradients in one pass over the chunks, for a training step
/// whose loss is `lm_head_ce`'s result (its gradient is 1): each chunk's logits are computed
/// once, then its log-sum-exp (`max + log Σ exp(l − max)`), its loss `Σ (lse − l_target)` and
/// `g = (exp(l − lse) − onehot(target))/N` (the target compared with a column index, so the
/// whole of `g` is one elementwise kernel), `dh = g·wᵀ` (concatenated), `dw = Σ hᵀ·g` and the
/// bias's `Σ g`, accumulated in f32 (f64 for f64). Nothing of `[N, V]` is formed and, unlike
/// [`lm_head_ce_vjp`], no chunk's logits are computed twice. Returns the loss (the mean over the
/// rows, as `lm_head_ce`'s) and the operands' gradients.
#[allow(clippy::too_many_arguments)]
pub(super) fn lm_head_ce_with_grads(
    b: &mut Builder,
    x: &[ValueId],
    chunk: usize,
    weighted: bool,
    loss_dtype: memc_ir::DType,
    wants: &[bool],
) -> Result<(ValueId, Vec<Option<ValueId>>), String> {
    let (h, w, t, r, bias, bias_at) = head_operands(x, weighted);
    let (n, d) = (b.shape(h)[0], b.shape(h)[1]);
    let vocab = b.shape(w)[1];
    let dt = b.dtype(h);
    let acc = memc_ir::loss_dtype(dt);
    let grads = wants[0] || wants[1] || (bias.is_some() && wants[bias_at]);
    let wt = if wants[0] {
        Some(b.transpose(w, vec![1, 0])?)
    } else {
        None
    };
    let tdt = b.dtype(t);
    let columns: Vec<i64> = (0..vocab as i64).collect();
    // The column indices, a named constant (it is as long as the vocabulary).
    let columns = b.g.add_param(
        "memc.loss.columns",
        memc_ir::ParamRole::Constant,
        memc_ir::TensorType::new(tdt, vec![1, vocab]),
        Some(memc_ir::Tensor::from_i64(tdt, vec![1, vocab], &columns)),
    );
    let inv_n = b.scalar(acc, 1.0 / n as f64);
    let zero = b.scalar(acc, 0.0);
    let (mut total, mut dh, mut dw, mut db) = (None, vec![], None, None);
    let sum = |b: &mut Builder, acc: Option<ValueId>, part: ValueId| -> Result<ValueId, String> {
        match acc {
            Some(a) => b.add(a, part),
            None => Ok(part),
        }
    };
    for r0 in (0..n).step_by(chunk.max(1)) {
        let r1 = (r0 + chunk).min(n);
        let rows = |width: usize| rows(r0, r1, width);
        let (hk, logits) = chunk_logits(b, h, w, bias, rows(d), acc)?;
        let max = b.reduce(ReduceKind::Max, logits, vec![1], true)?;
        let shifted = b.sub(logits, max)?;
        let e = b.unary(memc_ir::UnaryOp::Exp, shifted)?;
        let s = b.reduce(ReduceKind::Sum, e, vec![1], true)?;
        let ls = b.unary(memc_ir::UnaryOp::Log, s)?;
        let lse = b.add(ls, max)?;
        let tk = b.op(rows(1), &[t])?;
        let picked = b.op(Op::GatherElements { axis: 1 }, &[logits, tk])?;
        let nll = b.sub(lse, picked)?;
        // Each row's weight in the loss: 1/N, or the given one.
        let rk = match r {
            Some(r) => b.op(rows(1), &[r])?,
            None => inv_n,
        };
        let nll = match r {
            Some(_) => b.mul(nll, rk)?,
            None => nll,
        };
        let part = b.reduce(ReduceKind::Sum, nll, vec![0, 1], false)?;
        total = Some(sum(b, total, part)?);
        if !grads {
            continue;
        }
        let centred = b.sub(logits, lse)?;
        let p = b.unary(memc_ir::UnaryOp::Exp, centred)?;
        let p = b.mul(p, rk)?;
        let hit = b.binary(BinaryOp::Equal, columns, tk)?;
        let target = b.op(Op::Where, &[hit, rk, zero])?;
        let gk = b.sub(p, target)?;
        if bias.is_some() && wants[bias_at] {
            let part = b.reduce(ReduceKind::Sum, gk, vec![0], false)?;
            db = Some(sum(b, db, part)?);
        }
        let gk = b.cast(gk, dt)?;
        if let Some(wt) = wt {
            dh.push(b.op(Op::MatMul, &[gk, wt])?);
        }
        if wants[1] {
            let hkt = b.transpose(hk, vec![1, 0])?;
            let part = b.op(Op::MatMul, &[hkt, gk])?;
            let part = b.cast(part, acc)?;
            dw = Some(sum(b, dw, part)?);
        }
    }
    let total = total.ok_or("an lm_head_ce without rows")?;
    let loss = match r {
        Some(_) => total,
        None => b.mul(total, inv_n)?,
    };
    let loss = b.cast(loss, loss_dtype)?;
    Ok((
        loss,
        head_grads(b, wants[0], dh, dw, db, w, bias, weighted)?,
    ))
}
