//! Kernels of the elementwise ops: none here, they run in the fused kernels that
//! [`crate::kernel`] generates (and so do `expand`, a broadcast, and the block ops, once lowered
//! to their steps).

use super::{Cx, F};
use crate::kernel::KernelError;

/// An elementwise op ([`memc_ir::Op::Unary`], `Binary`, `Where`, `Cast`), `expand` or a block op:
/// an error.
pub(super) fn emit(_f: &mut F, cx: &Cx) -> Result<(), KernelError> {
    let other = &cx.node.op;
    Err(cx.unsupported(format!(
        "`{}` is elementwise: use the fused kernel generator",
        other.name()
    )))
}
