//! memc-codegen: fusion into kernels, kernel construction in MLIR (melior), lowering, and LLVM
//! target code generation (inkwell) for the host and NVPTX.
//!
//! [`fuse`] groups a program into kernels; [`kernel`] builds fused elementwise kernels and
//! [`ops`] every other op as MLIR, lowers them with MLIR's passes and translates them to LLVM
//! IR; [`host`] turns a planned, fused graph into the runtime's program format; [`jit`] runs
//! the kernels in-process and [`link`] emits executables; [`toolchain::check`] proves the
//! MLIR/LLVM toolchain (x86-64 and NVPTX).

#![warn(missing_docs)]

pub mod fuse;
pub mod host;
pub mod jit;
pub mod kernel;
pub mod link;
pub mod ops;
pub mod ptx;
pub mod toolchain;
