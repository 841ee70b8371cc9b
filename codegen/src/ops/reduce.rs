//! Kernels of the reductions: `reduce_sum`, `reduce_mean`, `reduce_max` (one parallel iteration
//! per result element, a sequential fold over the reduced dims) and `top_k` (each element's rank
//! in its row, no sort).

use memc_ir::{Op, ReduceKind};

use super::{Cx, F};
use crate::kernel::{storage, KernelError};

/// Kernels of [`Op::Reduce`] and [`Op::TopK`].
pub(super) fn emit(f: &mut F, cx: &Cx) -> Result<(), KernelError> {
    let Cx {
        out,
        oshape,
        odt,
        xshape,
        xdt,
        at,
        ..
    } = cx.clone();
    match &cx.node.op {
        Op::Reduce {
            kind,
            axes,
            keep_dims,
        } => {
            let kept: Vec<usize> = (0..xshape.len()).filter(|d| !axes.contains(d)).collect();
            let red: Vec<usize> = axes.iter().map(|&a| xshape[a]).collect();
            let pdims: Vec<usize> = kept.iter().map(|&d| xshape[d]).collect();
            let ivs = f.parallel(&pdims);
            let float = xdt.is_float();
            let init = match (kind, float) {
                (ReduceKind::Max, true) => f.fconst(f64::NEG_INFINITY, at),
                (ReduceKind::Max, false) => f.v(&format!("arith.constant {} : {at}", i64::MIN)),
                (_, true) => f.fconst(0.0, at),
                (_, false) => f.v(&format!("arith.constant 0 : {at}")),
            };
            let index = |rivs: &[String]| -> Vec<String> {
                let mut idx = Vec::with_capacity(xshape.len());
                let (mut kp, mut kr) = (0, 0);
                for d in 0..xshape.len() {
                    if axes.contains(&d) {
                        idx.push(rivs[kr].clone());
                        kr += 1;
                    } else {
                        idx.push(ivs[kp].clone());
                        kp += 1;
                    }
                }
                idx
            };
            // Float sums may be reassociated and a float max runs as `maxnum` (`maxnum`), so
            // LLVM vectorises both; a second pass flags a NaN, which makes the max NaN, exactly
            // as the interpreter's.
            let acc = f.fold(&red, &init, at, &mut |f, rivs, acc| {
                let x = f.load(0, &index(rivs), &xshape, xdt);
                match (kind, float) {
                    (ReduceKind::Max, true) => f.v(&maxnum(acc, &x, at)),
                    (ReduceKind::Max, false) => f.v(&format!("arith.maxsi {acc}, {x} : {at}")),
                    (_, true) => f.v(&format!("arith.addf {acc}, {x} fastmath<reassoc> : {at}")),
                    (_, false) => f.v(&format!("arith.addi {acc}, {x} : {at}")),
                }
            });
            let acc = if *kind == ReduceKind::Max && float {
                let none = f.v("arith.constant false");
                let any_nan = f.fold(&red, &none, "i1", &mut |f, rivs, acc| {
                    let x = f.load(0, &index(rivs), &xshape, xdt);
                    let u = f.v(&format!("arith.cmpf uno, {x}, {x} : {at}"));
                    f.v(&format!("arith.ori {acc}, {u} : i1"))
                });
                let nan = f.fconst(f64::NAN, at);
                f.v(&format!("arith.select {any_nan}, {nan}, {acc} : {at}"))
            } else {
                acc
            };
            let result = if *kind == ReduceKind::Mean {
                let count: usize = red.iter().product();
                let c = f.fconst(count as f64, at);
                f.v(&format!("arith.divf {acc}, {c} : {at}"))
            } else {
                acc
            };
            let mut oidx = Vec::new();
            let mut kp = 0;
            for d in 0..xshape.len() {
                if axes.contains(&d) {
                    if *keep_dims {
                        oidx.push("%c0".to_string());
                    }
                } else {
                    oidx.push(ivs[kp].clone());
                    kp += 1;
                }
            }
            f.store(&result, out, &oidx, &oshape, odt);
            f.end_parallel(pdims.len());
        }
        Op::TopK { k } => {
            // Each element's rank in its row, rank(c) = #{c' : x[c'] > x[c] or (x[c'] = x[c]
            // and c' < c)}; element c is written at out[rank(c)] when rank(c) < k (ranks are
            // distinct, so no two iterations write one place). No sort: every element of
            // every row is an independent parallel iteration (on a GPU, a thread per element,
            // a row spread over the threads of a block), n compares each.
            let n = *xshape.last().unwrap_or(&1);
            let ivs = f.parallel(&xshape);
            let (row, c) = ivs.split_at(ivs.len() - 1);
            let full = |row: &[String], c: &str| -> Vec<String> {
                let mut v = row.to_vec();
                v.push(c.to_string());
                v
            };
            let kk = f.index(*k);
            let xc = f.load(0, &ivs, &xshape, xdt);
            let rank = f.fold(&[n], "%c0", "index", &mut |f, o, acc| {
                let xo = f.load(0, &full(row, &o[0]), &xshape, xdt);
                let gt = f.v(&format!("arith.cmpf ogt, {xo}, {xc} : {at}"));
                let eq = f.v(&format!("arith.cmpf oeq, {xo}, {xc} : {at}"));
                let lower = f.v(&format!("arith.cmpi ult, {}, {} : index", o[0], c[0]));
                let tie = f.v(&format!("arith.andi {eq}, {lower} : i1"));
                let before = f.v(&format!("arith.ori {gt}, {tie} : i1"));
                let inc = f.v(&format!("arith.select {before}, %c1, %c0 : index"));
                f.v(&format!("arith.addi {acc}, {inc} : index"))
            });
            let keep = f.v(&format!("arith.cmpi ult, {rank}, {kk} : index"));
            f.line(&format!("scf.if {keep} {{"));
            f.indent += 1;
            let ci = f.v(&format!(
                "arith.index_cast {} : index to {}",
                c[0],
                storage(odt)
            ));
            f.store(&ci, out, &full(row, &rank), &oshape, odt);
            f.indent -= 1;
            f.line("}");
            f.end_parallel(xshape.len());
        }
        _ => unreachable!("`{}` is not a reduction", cx.node.op.name()),
    }
    Ok(())
}

/// `max(acc, x)` ignoring NaNs and the sign of zero, as LLVM's `maxnum` with the flags that let
/// its loop vectoriser treat a fold of them as a max reduction. (MLIR's `arith.maxnumf` is
/// expanded into compares and selects by `arith-expand`, which LLVM does not recognise.) The
/// callers flag NaNs on their own.
pub(crate) fn maxnum(acc: &str, x: &str, ty: &str) -> String {
    format!(
        "llvm.intr.maxnum({acc}, {x}) {{fastmathFlags = #llvm.fastmath<nnan, nsz>}} : ({ty}, {ty}) -> {ty}"
    )
}
