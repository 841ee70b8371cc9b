//! memc-codegen: fusion into kernels, kernel construction in MLIR (melior), lowering, and LLVM
//! target code generation (inkwell) for the host and NVPTX.
//!
//! Today: [`fuse`] groups a program into kernels; [`kernel`] builds fused elementwise kernels
//! as MLIR, lowers them with MLIR's passes, translates them to LLVM IR and compiles them for
//! the host; [`toolchain::check`] proves the MLIR/LLVM toolchain (x86-64 and NVPTX).

#![warn(missing_docs)]

pub mod fuse;
pub mod host;
pub mod jit;
pub mod kernel;
pub mod ops;
pub mod toolchain;
