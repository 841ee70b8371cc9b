//! VJPs of the linear-algebra ops: `matmul` (vector operands promoted as in the forward pass).

use memc_ir::{Op, ValueId};

use crate::build::Builder;

/// VJPs of [`Op::MatMul`].
pub(super) fn vjp(
    b: &mut Builder,
    op: &Op,
    x: &[ValueId],
    _y: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    Ok(match op {
        Op::MatMul => matmul_vjp(b, x[0], x[1], dy, wants)?,
        _ => unreachable!("`{}` is not a linear-algebra op", op.name()),
    })
}

fn matmul_vjp(
    b: &mut Builder,
    a: ValueId,
    w: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (sa, sw) = (b.shape(a), b.shape(w));
    // Promote vectors to matrices as the forward did, then undo at the end.
    let a2 = if sa.len() == 1 {
        b.reshape(a, vec![1, sa[0]])?
    } else {
        a
    };
    let w2 = if sw.len() == 1 {
        b.reshape(w, vec![sw[0], 1])?
    } else {
        w
    };
    let mut gshape = b.shape(dy);
    if sa.len() == 1 {
        gshape.insert(gshape.len() - if sw.len() == 1 { 0 } else { 1 }, 1);
    }
    if sw.len() == 1 {
        gshape.push(1);
    }
    let g2 = b.reshape(dy, gshape)?;
    let ga = if wants[0] {
        let wt = b.transpose_last2(w2)?;
        let full = b.op(Op::MatMul, &[g2, wt])?;
        let s = b.shape(a2);
        let r = b.unbroadcast(full, &s)?;
        Some(b.reshape(r, sa.clone())?)
    } else {
        None
    };
    let gw = if wants[1] && sa.len() >= 3 && sw.len() == 2 {
        // A weight shared by the whole batch: its gradient is one GEMM over every row of
        // the batch, aᵀ [K, rows]·dy [rows, N], not one per batch element summed after.
        let (k, n) = (sw[0], sw[1]);
        let a_rows = b.reshape(a2, vec![b.shape(a2).iter().product::<usize>() / k, k])?;
        let g_rows = b.reshape(g2, vec![b.shape(g2).iter().product::<usize>() / n, n])?;
        let at = b.transpose(a_rows, vec![1, 0])?;
        Some(b.op(Op::MatMul, &[at, g_rows])?)
    } else if wants[1] {
        let at = b.transpose_last2(a2)?;
        let full = b.op(Op::MatMul, &[at, g2])?;
        let s = b.shape(w2);
        let r = b.unbroadcast(full, &s)?;
        Some(b.reshape(r, sw)?)
    } else {
        None
    };
    Ok(vec![ga, gw])
}
