//! Kernels of the indexed ops: the gathers (`gather`, `gather_elements`, `gather_nd`) and their
//! scatter transposes (`scatter_add`, `scatter_elements_add`, `scatter_nd_add`), which run the
//! dims where updates may collide sequentially.

use memc_ir::{DType, Op};

use super::{arith, zero_fill, Cx, F};
use crate::kernel::KernelError;

/// Kernels of [`Op::Gather`], [`Op::GatherElements`], [`Op::GatherNd`], [`Op::ScatterAdd`],
/// [`Op::ScatterElementsAdd`] and [`Op::ScatterNdAdd`].
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
        Op::Gather { axis } => {
            let (ishape, idt) = tys[1].clone();
            let ivs = f.parallel(&oshape);
            let k = f.index_operand(
                1,
                &ivs[*axis..*axis + ishape.len()],
                &ishape,
                idt,
                (*axis, xshape[*axis]),
            );
            let mut idx: Vec<String> = ivs[..*axis].to_vec();
            idx.push(k);
            idx.extend_from_slice(&ivs[*axis + ishape.len()..]);
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::GatherElements { axis } => {
            let (ishape, idt) = tys[1].clone();
            let ivs = f.parallel(&oshape);
            let k = f.index_operand(1, &ivs, &ishape, idt, (*axis, xshape[*axis]));
            let mut idx = ivs.clone();
            idx[*axis] = k;
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::GatherNd => {
            let (ishape, idt) = tys[1].clone();
            let q = *ishape.last().unwrap();
            let lead = ishape.len() - 1;
            let ivs = f.parallel(&oshape);
            let mut idx = Vec::new();
            for (k, &dim) in xshape.iter().enumerate().take(q) {
                let kk = f.index(k);
                let mut ii: Vec<String> = ivs[..lead].to_vec();
                ii.push(kk);
                idx.push(f.index_operand(1, &ii, &ishape, idt, (k, dim)));
            }
            idx.extend_from_slice(&ivs[lead..]);
            f.copy((0, &idx, &xshape, xdt), (out, &ivs, &oshape, odt));
            f.end_parallel(oshape.len());
        }
        Op::ScatterAdd { axis, .. } | Op::ScatterElementsAdd { axis, .. } => {
            let elements = matches!(node.op, Op::ScatterElementsAdd { .. });
            let (ishape, idt) = tys[1].clone();
            zero_fill(f, out, &oshape, odt);
            // Updates may land on one element only through the indexed dims: those run
            // sequentially (a deterministic order), every other dim in parallel.
            let seq: Vec<usize> = if elements {
                vec![*axis]
            } else {
                (*axis..*axis + ishape.len()).collect()
            };
            scatter_loops(f, &xshape, &seq, &mut |f, ivs| {
                let idx = if elements {
                    let k = f.index_operand(1, ivs, &ishape, idt, (*axis, oshape[*axis]));
                    let mut idx = ivs.to_vec();
                    idx[*axis] = k;
                    idx
                } else {
                    let k = f.index_operand(
                        1,
                        &ivs[*axis..*axis + ishape.len()],
                        &ishape,
                        idt,
                        (*axis, oshape[*axis]),
                    );
                    let mut idx: Vec<String> = ivs[..*axis].to_vec();
                    idx.push(k);
                    idx.extend_from_slice(&ivs[*axis + ishape.len()..]);
                    idx
                };
                accumulate(f, ivs, &idx, &xshape, xdt, out, &oshape, odt);
            });
        }
        Op::ScatterNdAdd { .. } => {
            let (ishape, idt) = tys[1].clone();
            let q = *ishape.last().unwrap();
            let lead = ishape.len() - 1;
            zero_fill(f, out, &oshape, odt);
            let seq: Vec<usize> = (0..lead).collect();
            scatter_loops(f, &xshape, &seq, &mut |f, ivs| {
                let mut idx = Vec::new();
                for (k, &dim) in oshape.iter().enumerate().take(q) {
                    let kk = f.index(k);
                    let mut ii: Vec<String> = ivs[..lead].to_vec();
                    ii.push(kk);
                    idx.push(f.index_operand(1, &ii, &ishape, idt, (k, dim)));
                }
                idx.extend_from_slice(&ivs[lead..]);
                accumulate(f, ivs, &idx, &xshape, xdt, out, &oshape, odt);
            });
        }
        _ => unreachable!("`{}` is not a gather or scatter", cx.node.op.name()),
    }
    Ok(())
}

/// Loops over `shape` for a scatter: `scf.parallel` over every dim not in `seq` (updates there
/// never collide), `scf.for` over the dims in `seq` inside it; `body` gets the induction
/// variables in `shape`'s order.
fn scatter_loops(
    f: &mut F,
    shape: &[usize],
    seq: &[usize],
    body: &mut dyn FnMut(&mut F, &[String]),
) {
    let par: Vec<usize> = (0..shape.len()).filter(|d| !seq.contains(d)).collect();
    let pext: Vec<usize> = par.iter().map(|&d| shape[d]).collect();
    let sext: Vec<usize> = seq.iter().map(|&d| shape[d]).collect();
    let pivs = f.parallel(&pext);
    f.each(&sext, &mut |f, sivs| {
        let mut ivs = vec![String::new(); shape.len()];
        for (k, &d) in par.iter().enumerate() {
            ivs[d] = pivs[k].clone();
        }
        for (k, &d) in seq.iter().enumerate() {
            ivs[d] = sivs[k].clone();
        }
        body(f, &ivs);
    });
    f.end_parallel(pext.len());
}

/// `out[oidx] += x[xidx]`.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    f: &mut F,
    xidx: &[String],
    oidx: &[String],
    xshape: &[usize],
    xdt: DType,
    out: usize,
    oshape: &[usize],
    odt: DType,
) {
    let x = f.load(0, xidx, xshape, xdt);
    let prev = f.load(out, oidx, oshape, odt);
    let add = if xdt.is_float() {
        "arith.addf"
    } else {
        "arith.addi"
    };
    let s = f.v(&format!("{add} {prev}, {x} : {}", arith(xdt)));
    f.store(&s, out, oidx, oshape, odt);
}
