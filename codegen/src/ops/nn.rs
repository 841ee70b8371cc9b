//! Kernels of the neural-network ops: `softmax` and `log_softmax`, the norms (`layer_norm`,
//! `rms_norm`) and attention (an online softmax, nothing of size S×T stored) with its backward
//! ops (`attention_lse`, `attention_grad`), which recompute the scores row by row.

use memc_ir::{DType, Op, Scores};

use super::{Cx, F};
use crate::kernel::KernelError;

/// Kernels of [`Op::Softmax`], [`Op::LogSoftmax`], [`Op::LayerNorm`], [`Op::RmsNorm`],
/// [`Op::Attention`], [`Op::AttentionLse`] and [`Op::AttentionGrad`].
pub(super) fn emit(f: &mut F, cx: &Cx) -> Result<(), KernelError> {
    match &cx.node.op {
        Op::Softmax { axis } | Op::LogSoftmax { axis } => softmax(f, cx, *axis),
        Op::LayerNorm { axis, epsilon } => layer_norm(f, cx, *axis, *epsilon),
        Op::RmsNorm { axis, epsilon } => rms_norm(f, cx, *axis, *epsilon),
        Op::Attention(sc) => attention(f, cx, sc),
        Op::AttentionLse(sc) | Op::AttentionGrad { scores: sc, .. } => {
            attention_backward(f, cx, sc)
        }
        _ => unreachable!("`{}` is not a neural-network op", cx.node.op.name()),
    }
    Ok(())
}

/// `softmax` or `log_softmax` along `axis`: the row max, the sum of exponentials, the results.
fn softmax(f: &mut F, cx: &Cx, axis: usize) {
    let Cx {
        node,
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
        ..
    } = cx.clone();
    let log = matches!(node.op, Op::LogSoftmax { .. });
    let pdims: Vec<usize> = (0..xshape.len())
        .filter(|d| *d != axis)
        .map(|d| xshape[d])
        .collect();
    let ivs = f.parallel(&pdims);
    let full = |ivs: &[String], k: &str| -> Vec<String> {
        let mut idx = ivs.to_vec();
        idx.insert(axis, k.to_string());
        idx
    };
    let ninf = f.fconst(f64::NEG_INFINITY, at);
    let len = [xshape[axis]];
    // The row's sum may be reassociated (`fastmath<reassoc>`), so LLVM vectorises it: the
    // rounding changes within the interpreter's tolerance, and a row's result still does not
    // depend on how rows are split across threads. (The max stays exact: a NaN in the row
    // makes it NaN, and so every result, as in the interpreter.)
    let m = f.fold(&len, &ninf, at, &mut |f, r, acc| {
        let x = f.load(0, &full(&ivs, &r[0]), &xshape, xdt);
        f.v(&format!("arith.maximumf {acc}, {x} : {at}"))
    });
    let zero = f.fconst(0.0, at);
    let sum = f.fold(&len, &zero, at, &mut |f, r, acc| {
        let x = f.load(0, &full(&ivs, &r[0]), &xshape, xdt);
        let d = f.v(&format!("arith.subf {x}, {m} : {at}"));
        let e = f.v(&format!("math.exp {d} : {at}"));
        f.v(&format!("arith.addf {acc}, {e} fastmath<reassoc> : {at}"))
    });
    let logsum = if log {
        Some(f.v(&format!("math.log {sum} : {at}")))
    } else {
        None
    };
    f.each(&len, &mut |f, r| {
        let idx = full(&ivs, &r[0]);
        let x = f.load(0, &idx, &xshape, xdt);
        let d = f.v(&format!("arith.subf {x}, {m} : {at}"));
        let y = match &logsum {
            Some(ls) => f.v(&format!("arith.subf {d}, {ls} : {at}")),
            None => {
                let e = f.v(&format!("math.exp {d} : {at}"));
                f.v(&format!("arith.divf {e}, {sum} : {at}"))
            }
        };
        f.store(&y, out, &idx, &oshape, odt);
    });
    f.end_parallel(pdims.len());
}

/// `layer_norm` over the dims from `axis`: mean and variance, then the scaled (and biased)
/// normalised values. The statistics and the normalisation are computed in f64, as the
/// interpreter does: in f32 a row of large but finite values overflows its sum of squares, and
/// the result would be a silent zero where the interpreter's is finite.
fn layer_norm(f: &mut F, cx: &Cx, axis: usize, epsilon: f32) {
    let Cx {
        node,
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
        ..
    } = cx.clone();
    let outer: Vec<usize> = xshape[..axis].to_vec();
    let inner: Vec<usize> = xshape[axis..].to_vec();
    let count: usize = inner.iter().product();
    let ivs = f.parallel(&outer);
    let cat = |a: &[String], b: &[String]| -> Vec<String> { a.iter().chain(b).cloned().collect() };
    let zero = f.fconst(0.0, WIDE);
    let sum = f.fold(&inner, &zero, WIDE, &mut |f, r, acc| {
        let x = f.load(0, &cat(&ivs, r), &xshape, xdt);
        let x = widen(f, &x, at);
        f.v(&format!("arith.addf {acc}, {x} : {WIDE}"))
    });
    let cnt = f.fconst(count as f64, WIDE);
    let mean = f.v(&format!("arith.divf {sum}, {cnt} : {WIDE}"));
    let sq = f.fold(&inner, &zero, WIDE, &mut |f, r, acc| {
        let x = f.load(0, &cat(&ivs, r), &xshape, xdt);
        let x = widen(f, &x, at);
        let d = f.v(&format!("arith.subf {x}, {mean} : {WIDE}"));
        let d2 = f.v(&format!("arith.mulf {d}, {d} : {WIDE}"));
        f.v(&format!("arith.addf {acc}, {d2} : {WIDE}"))
    });
    let var = f.v(&format!("arith.divf {sq}, {cnt} : {WIDE}"));
    let eps = f.fconst(epsilon as f64, WIDE);
    let ve = f.v(&format!("arith.addf {var}, {eps} : {WIDE}"));
    let sd = f.v(&format!("math.sqrt {ve} : {WIDE}"));
    let one = f.fconst(1.0, WIDE);
    let rstd = f.v(&format!("arith.divf {one}, {sd} : {WIDE}"));
    let has_bias = node.inputs.len() == 3;
    f.each(&inner, &mut |f, r| {
        let idx = cat(&ivs, r);
        let x = f.load(0, &idx, &xshape, xdt);
        let x = widen(f, &x, at);
        let d = f.v(&format!("arith.subf {x}, {mean} : {WIDE}"));
        let xh = f.v(&format!("arith.mulf {d}, {rstd} : {WIDE}"));
        let s = f.load(1, r, &inner, xdt);
        let s = widen(f, &s, at);
        let mut y = f.v(&format!("arith.mulf {xh}, {s} : {WIDE}"));
        if has_bias {
            let b = f.load(2, r, &inner, xdt);
            let b = widen(f, &b, at);
            y = f.v(&format!("arith.addf {y}, {b} : {WIDE}"));
        }
        let y = narrow(f, &y, at);
        f.store(&y, out, &idx, &oshape, odt);
    });
    f.end_parallel(outer.len());
}

/// `rms_norm` over the dims from `axis`: the mean square, then the scaled normalised values,
/// in f64 as [`layer_norm`].
fn rms_norm(f: &mut F, cx: &Cx, axis: usize, epsilon: f32) {
    let Cx {
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
        ..
    } = cx.clone();
    let outer: Vec<usize> = xshape[..axis].to_vec();
    let inner: Vec<usize> = xshape[axis..].to_vec();
    let count: usize = inner.iter().product();
    let ivs = f.parallel(&outer);
    let cat = |a: &[String], b: &[String]| -> Vec<String> { a.iter().chain(b).cloned().collect() };
    let zero = f.fconst(0.0, WIDE);
    let sq = f.fold(&inner, &zero, WIDE, &mut |f, r, acc| {
        let x = f.load(0, &cat(&ivs, r), &xshape, xdt);
        let x = widen(f, &x, at);
        let x2 = f.v(&format!("arith.mulf {x}, {x} : {WIDE}"));
        f.v(&format!("arith.addf {acc}, {x2} : {WIDE}"))
    });
    let cnt = f.fconst(count as f64, WIDE);
    let ms = f.v(&format!("arith.divf {sq}, {cnt} : {WIDE}"));
    let eps = f.fconst(epsilon as f64, WIDE);
    let me = f.v(&format!("arith.addf {ms}, {eps} : {WIDE}"));
    let sd = f.v(&format!("math.sqrt {me} : {WIDE}"));
    let one = f.fconst(1.0, WIDE);
    let r = f.v(&format!("arith.divf {one}, {sd} : {WIDE}"));
    f.each(&inner, &mut |f, ri| {
        let idx = cat(&ivs, ri);
        let x = f.load(0, &idx, &xshape, xdt);
        let x = widen(f, &x, at);
        let xh = f.v(&format!("arith.mulf {x}, {r} : {WIDE}"));
        let s = f.load(1, ri, &inner, xdt);
        let s = widen(f, &s, at);
        let y = f.v(&format!("arith.mulf {xh}, {s} : {WIDE}"));
        let y = narrow(f, &y, at);
        f.store(&y, out, &idx, &oshape, odt);
    });
    f.end_parallel(outer.len());
}

/// The norms' arithmetic type.
const WIDE: &str = "f64";

/// `x` (of arithmetic type `at`) as f64.
fn widen(f: &mut F, x: &str, at: &str) -> String {
    if at == WIDE {
        x.to_string()
    } else {
        f.v(&format!("arith.extf {x} : {at} to {WIDE}"))
    }
}

/// `x` (f64) rounded to arithmetic type `at`.
fn narrow(f: &mut F, x: &str, at: &str) -> String {
    if at == WIDE {
        x.to_string()
    } else {
        f.v(&format!("arith.truncf {x} : {WIDE} to {at}"))
    }
}

/// `attention`: one row of queries per parallel iteration, one pass over the keys (the online
/// softmax), then a division by the row sum.
fn attention(f: &mut F, cx: &Cx, scores: &Scores) {
    let Cx {
        tys,
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
        ..
    } = cx.clone();
    // One row of queries per parallel iteration, one pass over the keys (the online
    // softmax), then a division by the row sum. Nothing of size S×T is stored.
    let (kshape, _) = tys[1].clone();
    let (vshape, _) = tys[2].clone();
    let (mshape, mdt) = tys[3].clone();
    let (h, hk, t, dv) = (xshape[1], kshape[1], kshape[2], vshape[3]);
    let ivs = f.parallel(&xshape[..3]);
    let grp = f.index(h / hk);
    let kh = f.v(&format!("arith.divui {}, {grp} : index", ivs[1]));
    let scale_c = f.fconst(scores.scale as f64, at);
    let sh = ScoreShapes {
        q: &xshape,
        k: &kshape,
        mask: &mshape,
        mask_arg: 3,
        dt: xdt,
        mask_dt: mdt,
        at,
        scores,
    };
    let score = |f: &mut F, j: &str| -> String {
        attention_score(f, &sh, &scale_c, [&ivs[0], &ivs[1], &ivs[2]], &kh, j).0
    };
    // One pass with the online softmax: a running max m and sum l; when a score
    // raises the max, the row accumulated so far is rescaled by exp(m_old - m_new).
    let ninf = f.fconst(f64::NEG_INFINITY, at);
    let zero = f.fconst(0.0, at);
    let orow = |c: &str| {
        vec![
            ivs[0].clone(),
            ivs[1].clone(),
            ivs[2].clone(),
            c.to_string(),
        ]
    };
    f.each(&[dv], &mut |f, c| {
        let z = f.fconst(0.0, at);
        f.store(&z, out, &orow(&c[0]), &oshape, odt);
    });
    let ub = f.index(t);
    f.next += 1;
    let n = f.next;
    let (j, m, l) = (format!("%r{n}"), format!("%m{n}"), format!("%l{n}"));
    let res = format!("%online{n}");
    f.line(&format!(
        "{res}:2 = scf.for {j} = %c0 to {ub} step %c1 iter_args({m} = {ninf}, {l} = {zero}) -> ({at}, {at}) {{"
    ));
    f.indent += 1;
    let sc = score(f, &j);
    let m_new = f.v(&format!("arith.maximumf {m}, {sc} : {at}"));
    // While every score so far is -inf the row stays empty (p = 0, no rescale).
    let dead = f.v(&format!("arith.cmpf oeq, {m_new}, {ninf} : {at}"));
    let dm = f.v(&format!("arith.subf {m}, {m_new} : {at}"));
    let ec = f.v(&format!("math.exp {dm} : {at}"));
    let one = f.fconst(1.0, at);
    let corr = f.v(&format!("arith.select {dead}, {one}, {ec} : {at}"));
    let ds = f.v(&format!("arith.subf {sc}, {m_new} : {at}"));
    let ep = f.v(&format!("math.exp {ds} : {at}"));
    let z = f.fconst(0.0, at);
    let p = f.v(&format!("arith.select {dead}, {z}, {ep} : {at}"));
    f.each(&[dv], &mut |f, c| {
        let vv = f.load(
            2,
            &[ivs[0].clone(), kh.clone(), j.clone(), c[0].clone()],
            &vshape,
            xdt,
        );
        let o = f.load(out, &orow(&c[0]), &oshape, odt);
        let oc = f.v(&format!("arith.mulf {o}, {corr} : {at}"));
        let pv = f.v(&format!("arith.mulf {p}, {vv} : {at}"));
        let no = f.v(&format!("arith.addf {oc}, {pv} : {at}"));
        f.store(&no, out, &orow(&c[0]), &oshape, odt);
    });
    let lc = f.v(&format!("arith.mulf {l}, {corr} : {at}"));
    let l_new = f.v(&format!("arith.addf {lc}, {p} : {at}"));
    f.line(&format!("scf.yield {m_new}, {l_new} : {at}, {at}"));
    f.indent -= 1;
    f.line("}");
    let (max, sum) = (format!("{res}#0"), format!("{res}#1"));
    // A row of -inf scores has no distribution: zeros, as the NaN guard gives.
    let dead = f.v(&format!("arith.cmpf oeq, {max}, {ninf} : {at}"));
    let one = f.fconst(1.0, at);
    let inv = f.v(&format!("arith.divf {one}, {sum} : {at}"));
    let z = f.fconst(0.0, at);
    let inv = f.v(&format!("arith.select {dead}, {z}, {inv} : {at}"));
    f.each(&[dv], &mut |f, c| {
        let o = f.load(out, &orow(&c[0]), &oshape, odt);
        let y = f.v(&format!("arith.mulf {o}, {inv} : {at}"));
        f.store(&y, out, &orow(&c[0]), &oshape, odt);
    });
    f.end_parallel(3);
}

/// `attention_lse` or `attention_grad`: their shared setup (the scale and −∞ constants, the
/// score), then `attention_lse`'s row log-sum-exp or the gradient ([`attention_grad`]).
fn attention_backward(f: &mut F, cx: &Cx, scores: &Scores) {
    let Cx {
        node,
        tys,
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
        ..
    } = cx.clone();
    let wrt = match &node.op {
        Op::AttentionGrad { wrt, .. } => Some(*wrt),
        _ => None,
    };
    let (kshape, _) = tys[1].clone();
    let mi = if wrt.is_some() { 3 } else { 2 };
    let (mshape, mdt) = tys[mi].clone();
    let (h, hk, t) = (xshape[1], kshape[1], kshape[2]);
    let group = h / hk;
    let scale_c = f.fconst(scores.scale as f64, at);
    let ninf = f.fconst(f64::NEG_INFINITY, at);
    let sh = ScoreShapes {
        q: &xshape,
        k: &kshape,
        mask: &mshape,
        mask_arg: mi,
        dt: xdt,
        mask_dt: mdt,
        at,
        scores,
    };
    // The score of query row (b, h, i) against key j, and its soft-cap derivative.
    let score = |f: &mut F, bq: &str, hq: &str, i: &str, kh: &str, j: &str| {
        attention_score(f, &sh, &scale_c, [bq, hq, i], kh, j)
    };
    match wrt {
        None => {
            // log Σ_j exp(s_j): the row max, then the sum of exponentials.
            let ivs = f.parallel(&xshape[..3]);
            let grp = f.index(group);
            let kh = f.v(&format!("arith.divui {}, {grp} : index", ivs[1]));
            let max = f.fold(&[t], &ninf, at, &mut |f, j, acc| {
                let s = score(f, &ivs[0], &ivs[1], &ivs[2], &kh, &j[0]).0;
                f.v(&format!("arith.maximumf {acc}, {s} : {at}"))
            });
            let dead = f.v(&format!("arith.cmpf oeq, {max}, {ninf} : {at}"));
            let zero = f.fconst(0.0, at);
            let sum = f.fold(&[t], &zero, at, &mut |f, j, acc| {
                let s = score(f, &ivs[0], &ivs[1], &ivs[2], &kh, &j[0]).0;
                let e = f.v(&format!("arith.subf {s}, {max} : {at}"));
                let p = f.v(&format!("math.exp {e} : {at}"));
                f.v(&format!("arith.addf {acc}, {p} : {at}"))
            });
            let l = f.v(&format!("math.log {sum} : {at}"));
            let lse = f.v(&format!("arith.addf {max}, {l} : {at}"));
            let lse = f.v(&format!("arith.select {dead}, {ninf}, {lse} : {at}"));
            f.store(&lse, out, &ivs, &oshape, odt);
            f.end_parallel(3);
        }
        Some(wrt) => attention_grad(f, cx, wrt, &scale_c, &ninf, &score),
    }
}

/// A recomputed attention score: `(f, b, h, i, kh, j)` gives query row (b, h, i)'s score against
/// key j of key/value head kh, and the soft-cap's derivative when there is one.
type Score<'a> = dyn Fn(&mut F, &str, &str, &str, &str, &str) -> (String, Option<String>) + 'a;

/// `attention_grad`'s `wrt` (0: dq, 1: dk, 2: dv) from the recomputed probabilities, given the
/// emitted scale and −∞ constants and the score.
fn attention_grad(f: &mut F, cx: &Cx, wrt: usize, scale_c: &str, ninf: &str, score: &Score) {
    let Cx {
        tys,
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
        ..
    } = cx.clone();
    let (kshape, _) = tys[1].clone();
    let (h, hk, t, d) = (xshape[1], kshape[1], kshape[2], xshape[3]);
    let group = h / hk;
    let (vshape, _) = tys[2].clone();
    let (rshape, _) = tys[4].clone();
    let (yshape, _) = tys[5].clone();
    let dv = vshape[3];
    // p, and ds = p·(dy·v_j − delta)·scale, for row (bq, hq, i) and key j.
    let probs = |f: &mut F, bq: &str, hq: &str, i: &str, kh: &str, j: &str| -> (String, String) {
        let row = [bq.to_string(), hq.to_string(), i.to_string()];
        let lse = f.load(4, &row, &rshape, xdt);
        let dead = f.v(&format!("arith.cmpf oeq, {lse}, {ninf} : {at}"));
        let (s, dcap) = score(f, bq, hq, i, kh, j);
        let e = f.v(&format!("arith.subf {s}, {lse} : {at}"));
        // p ≤ 1: the stored lse is rounded, so s − lse can come out above 0 (NaN kept).
        let zero = f.fconst(0.0, at);
        let e = f.v(&format!("arith.minimumf {e}, {zero} : {at}"));
        let ex = f.v(&format!("math.exp {e} : {at}"));
        let p = f.v(&format!("arith.select {dead}, {zero}, {ex} : {at}"));
        let dp = f.fold(&[dv], &zero, at, &mut |f, c, acc| {
            let g = f.load(
                5,
                &[bq.into(), hq.into(), i.into(), c[0].clone()],
                &yshape,
                xdt,
            );
            let vv = f.load(
                2,
                &[bq.into(), kh.into(), j.into(), c[0].clone()],
                &vshape,
                xdt,
            );
            let pr = f.v(&format!("arith.mulf {g}, {vv} : {at}"));
            f.v(&format!("arith.addf {acc}, {pr} : {at}"))
        });
        let delta = f.load(6, &row, &rshape, xdt);
        let c = f.v(&format!("arith.subf {dp}, {delta} : {at}"));
        let pc = f.v(&format!("arith.mulf {p}, {c} : {at}"));
        let mut ds = f.v(&format!("arith.mulf {pc}, {scale_c} : {at}"));
        if let Some(dcap) = dcap {
            ds = f.v(&format!("arith.mulf {ds}, {dcap} : {at}"));
        }
        (p, ds)
    };
    let zero_row = |f: &mut F, idx3: &[String], n: usize| {
        f.each(&[n], &mut |f, c| {
            let z = f.fconst(0.0, at);
            let mut idx = idx3.to_vec();
            idx.push(c[0].clone());
            f.store(&z, out, &idx, &oshape, odt);
        });
    };
    let acc_row = |f: &mut F,
                   idx3: &[String],
                   n: usize,
                   w: &str,
                   src: usize,
                   sidx3: &[String],
                   sshape: &[usize]| {
        f.each(&[n], &mut |f, c| {
            let mut idx = idx3.to_vec();
            idx.push(c[0].clone());
            let mut sidx = sidx3.to_vec();
            sidx.push(c[0].clone());
            let o = f.load(out, &idx, &oshape, odt);
            let x = f.load(src, &sidx, sshape, xdt);
            let wx = f.v(&format!("arith.mulf {w}, {x} : {at}"));
            let no = f.v(&format!("arith.addf {o}, {wx} : {at}"));
            f.store(&no, out, &idx, &oshape, odt);
        });
    };
    if wrt == 0 {
        // dq row i: Σ_j ds_ij k_j.
        let ivs = f.parallel(&xshape[..3]);
        let grp = f.index(group);
        let kh = f.v(&format!("arith.divui {}, {grp} : index", ivs[1]));
        zero_row(f, &ivs, d);
        f.each(&[t], &mut |f, j| {
            let (_, ds) = probs(f, &ivs[0], &ivs[1], &ivs[2], &kh, &j[0]);
            let kidx = [ivs[0].clone(), kh.clone(), j[0].clone()];
            acc_row(f, &ivs, d, &ds, 1, &kidx, &kshape);
        });
        f.end_parallel(3);
    } else {
        // dk or dv row j of key/value head kh: Σ over the group's query heads
        // and the query rows.
        let ivs = f.parallel(&kshape[..3]);
        let n = if wrt == 1 { d } else { dv };
        zero_row(f, &ivs, n);
        let grp = f.index(group);
        let base = f.v(&format!("arith.muli {}, {grp} : index", ivs[1]));
        f.each(&[group, xshape[2]], &mut |f, gi| {
            let hq = f.v(&format!("arith.addi {base}, {} : index", gi[0]));
            let (p, ds) = probs(f, &ivs[0], &hq, &gi[1], &ivs[1], &ivs[2]);
            let row = [ivs[0].clone(), hq.clone(), gi[1].clone()];
            if wrt == 1 {
                acc_row(f, &ivs, n, &ds, 0, &row, &xshape);
            } else {
                acc_row(f, &ivs, n, &p, 5, &row, &yshape);
            }
        });
        f.end_parallel(3);
    }
}

/// Where an attention kernel's q, k and mask are (operand index `mask_arg` for the mask).
struct ScoreShapes<'a> {
    q: &'a [usize],
    k: &'a [usize],
    mask: &'a [usize],
    mask_arg: usize,
    dt: DType,
    mask_dt: DType,
    at: &'a str,
    scores: &'a Scores,
}

/// `q[b, h, i, :]·k[b, kh, j, :]·scale`, soft-capped, `+ mask[b, h, i, j]` (the mask
/// broadcast), `-inf` where the causal or window attributes hide key j ([`Scores`]): the score
/// every attention kernel (forward, log-sum-exp, gradients) recomputes; with the soft-cap's
/// derivative `1 − tanh²` when there is one.
fn attention_score(
    f: &mut F,
    sh: &ScoreShapes,
    scale: &str,
    [b, h, i]: [&str; 3],
    kh: &str,
    j: &str,
) -> (String, Option<String>) {
    let at = sh.at;
    let zero = f.fconst(0.0, at);
    let dot = f.fold(&[sh.q[3]], &zero, at, &mut |f, c, acc| {
        let qv = f.load(
            0,
            &[b.into(), h.into(), i.into(), c[0].clone()],
            sh.q,
            sh.dt,
        );
        let kv = f.load(
            1,
            &[b.into(), kh.into(), j.into(), c[0].clone()],
            sh.k,
            sh.dt,
        );
        let pr = f.v(&format!("arith.mulf {qv}, {kv} : {at}"));
        f.v(&format!("arith.addf {acc}, {pr} : {at}"))
    });
    let mut sc = f.v(&format!("arith.mulf {dot}, {scale} : {at}"));
    let mut dcap = None;
    if sh.scores.softcap > 0.0 {
        let c = f.fconst(sh.scores.softcap as f64, at);
        let x = f.v(&format!("arith.divf {sc}, {c} : {at}"));
        let t = f.v(&format!("math.tanh {x} : {at}"));
        sc = f.v(&format!("arith.mulf {t}, {c} : {at}"));
        let one = f.fconst(1.0, at);
        let t2 = f.v(&format!("arith.mulf {t}, {t} : {at}"));
        dcap = Some(f.v(&format!("arith.subf {one}, {t2} : {at}")));
    }
    let full = [b, h, i, j];
    let lead = 4 - sh.mask.len();
    let midx: Vec<String> = (0..sh.mask.len())
        .map(|k| {
            if sh.mask[k] == 1 {
                "%c0".to_string()
            } else {
                full[lead + k].to_string()
            }
        })
        .collect();
    let m = f.load(sh.mask_arg, &midx, sh.mask, sh.mask_dt);
    let mut s = f.v(&format!("arith.addf {sc}, {m} : {at}"));
    let (causal, window) = (sh.scores.causal, sh.scores.window);
    if causal || window > 0 {
        // The query's position among the keys is i + T − S: compare i + T with j + S.
        let (tt, ss) = (f.index(sh.k[2]), f.index(sh.q[2]));
        let qi = f.v(&format!("arith.addi {i}, {tt} : index"));
        let kj = f.v(&format!("arith.addi {j}, {ss} : index"));
        let mut hidden = None;
        if causal {
            hidden = Some(f.v(&format!("arith.cmpi ugt, {kj}, {qi} : index")));
        }
        if window > 0 {
            let w = f.index(window);
            let jw = f.v(&format!("arith.addi {kj}, {w} : index"));
            let old = f.v(&format!("arith.cmpi uge, {qi}, {jw} : index"));
            hidden = Some(match hidden {
                Some(c) => f.v(&format!("arith.ori {c}, {old} : i1")),
                None => old,
            });
        }
        let ninf = f.fconst(f64::NEG_INFINITY, at);
        let hidden = hidden.expect("causal or window");
        s = f.v(&format!("arith.select {hidden}, {ninf}, {s} : {at}"));
    }
    (s, dcap)
}
