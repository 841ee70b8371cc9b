//! Kernels of the linear-algebra ops: none here, `matmul` runs on the runtime's GEMM library.

use memc_ir::Op;

use super::{Cx, F};
use crate::kernel::KernelError;

/// [`Op::MatMul`]: an error (it runs on the GEMM library).
pub(super) fn emit(_f: &mut F, cx: &Cx) -> Result<(), KernelError> {
    match &cx.node.op {
        Op::MatMul => {
            Err(cx.unsupported("`matmul` runs on the GEMM library, not a generated kernel".into()))
        }
        _ => unreachable!("`{}` is not a linear-algebra op", cx.node.op.name()),
    }
}
