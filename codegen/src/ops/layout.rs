//! Kernels of the layout ops: `transpose`, `slice` and `slice_scatter`, `concat`, `reshape` (a
//! copy; the runtime aliases instead) and `trilu`.

use memc_ir::Op;

use super::{memref, zero_fill, Cx, F};
use crate::kernel::{storage, KernelError};

/// Kernels of [`Op::Transpose`], [`Op::Slice`], [`Op::SliceScatter`], [`Op::Concat`],
/// [`Op::Reshape`] and [`Op::Trilu`].
pub(super) fn emit(f: &mut F, cx: &Cx) -> Result<(), KernelError> {
    let Cx {
        node,
        tys,
        out,
        oshape,
        odt,
        xshape,
        xdt,
        ..
    } = cx.clone();
    match &cx.node.op {
        Op::Transpose { perm } => {
            let ivs = f.parallel(&oshape);
            let mut idx = vec![String::new(); xshape.len()];
            for (j, &p) in perm.iter().enumerate() {
                idx[p] = ivs[j].clone();
            }
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::Slice { starts, steps, .. } | Op::SliceScatter { starts, steps, .. } => {
            let scatter = matches!(node.op, Op::SliceScatter { .. });
            if scatter {
                zero_fill(f, out, &oshape, odt);
            }
            // Iterate over the small side; the large side is indexed at start + i·step.
            let (small, large) = if scatter {
                (&xshape, &oshape)
            } else {
                (&oshape, &xshape)
            };
            let ivs = f.parallel(small);
            let mut big = Vec::new();
            for (d, iv) in ivs.iter().enumerate() {
                let st = f.index(steps[d]);
                let s0 = f.index(starts[d]);
                let m = f.v(&format!("arith.muli {iv}, {st} : index"));
                big.push(f.v(&format!("arith.addi {m}, {s0} : index")));
            }
            if scatter {
                let x = f.v(&format!(
                    "memref.load %a0[{}] : {}",
                    ivs.join(", "),
                    memref(&xshape, xdt)
                ));
                f.line(&format!(
                    "memref.store {x}, %a{out}[{}] : {}",
                    big.join(", "),
                    memref(large, odt)
                ));
            } else {
                let x = f.v(&format!(
                    "memref.load %a0[{}] : {}",
                    big.join(", "),
                    memref(large, xdt)
                ));
                f.line(&format!(
                    "memref.store {x}, %a{out}[{}] : {}",
                    ivs.join(", "),
                    memref(&oshape, odt)
                ));
            }
            f.end_parallel(small.len());
        }
        Op::Concat { axis } => {
            let mut offset = 0;
            for (i, (s, d)) in tys[..out].iter().enumerate() {
                let ivs = f.parallel(s);
                let mut oidx = ivs.clone();
                let o = f.index(offset);
                oidx[*axis] = f.v(&format!("arith.addi {}, {o} : index", ivs[*axis]));
                let x = f.v(&format!(
                    "memref.load %a{i}[{}] : {}",
                    ivs.join(", "),
                    memref(s, *d)
                ));
                f.line(&format!(
                    "memref.store {x}, %a{out}[{}] : {}",
                    oidx.join(", "),
                    memref(&oshape, odt)
                ));
                f.end_parallel(s.len());
                offset += s[*axis];
            }
        }
        Op::Reshape { .. } => {
            // A copy over the flat element order (the runtime aliases instead).
            let ivs = f.parallel(&oshape);
            let flat = linear(f, &ivs, &oshape);
            let xi = delinear(f, &flat, &xshape);
            f.copy((0, &xi, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::Trilu { upper, k } => {
            let ivs = f.parallel(&oshape);
            let r = oshape.len();
            let i = f.v(&format!("arith.index_cast {} : index to i64", ivs[r - 2]));
            let j = f.v(&format!("arith.index_cast {} : index to i64", ivs[r - 1]));
            let d = f.v(&format!("arith.subi {j}, {i} : i64"));
            let kk = f.v(&format!("arith.constant {k} : i64"));
            let keep = f.v(&format!(
                "arith.cmpi {}, {d}, {kk} : i64",
                if *upper { "sge" } else { "sle" }
            ));
            let x = f.v(&format!(
                "memref.load %a0[{}] : {}",
                ivs.join(", "),
                memref(&xshape, xdt)
            ));
            let z = if xdt.is_float() {
                f.fconst(0.0, storage(xdt))
            } else {
                f.v(&format!("arith.constant 0 : {}", storage(xdt)))
            };
            let y = f.v(&format!("arith.select {keep}, {x}, {z} : {}", storage(xdt)));
            f.line(&format!(
                "memref.store {y}, %a{out}[{}] : {}",
                ivs.join(", "),
                memref(&oshape, odt)
            ));
            f.end_parallel(r);
        }
        _ => unreachable!("`{}` is not a layout op", cx.node.op.name()),
    }
    Ok(())
}

/// The row-major linear index of `ivs` in `shape`.
fn linear(f: &mut F, ivs: &[String], shape: &[usize]) -> String {
    let mut acc = "%c0".to_string();
    for (iv, &d) in ivs.iter().zip(shape) {
        let n = f.index(d);
        let m = f.v(&format!("arith.muli {acc}, {n} : index"));
        acc = f.v(&format!("arith.addi {m}, {iv} : index"));
    }
    acc
}

/// The multi-index of linear index `flat` in `shape`.
fn delinear(f: &mut F, flat: &str, shape: &[usize]) -> Vec<String> {
    let mut idx = vec![String::new(); shape.len()];
    let mut rest = flat.to_string();
    for d in (0..shape.len()).rev() {
        let n = f.index(shape[d]);
        idx[d] = f.v(&format!("arith.remui {rest}, {n} : index"));
        rest = f.v(&format!("arith.divui {rest}, {n} : index"));
    }
    idx
}
