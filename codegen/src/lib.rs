//! memc-codegen: kernel construction in MLIR (melior), lowering, and LLVM
//! target code generation (inkwell) for the host and NVPTX.
//!
//! Kernels are the groups of `memc_passes::fuse` (re-exported as [`fuse`]); [`kernel`] builds fused elementwise kernels and
//! [`ops`] every other op as MLIR, lowers them with MLIR's passes and translates them to LLVM
//! IR; [`host`] turns a planned, fused graph into the runtime's program format and
//! [`pipeline`] a pipelined step into one; [`reference`] runs a graph on the interpreter
//! behind the same format; [`jit`] runs
//! the kernels in-process and [`link`] emits executables; [`toolchain::check`] proves the
//! MLIR/LLVM toolchain (x86-64 and NVPTX).

#![warn(missing_docs)]

pub use memc_passes::fuse;
mod cores;
pub mod host;
pub mod jit;
pub mod kernel;
pub mod link;
pub mod objects;
pub mod ops;
pub mod pipeline;
pub mod ptx;
pub mod reference;
pub mod threads;
pub mod toolchain;
