//! memc-codegen: fusion into kernels, kernel construction in MLIR (melior), lowering, and LLVM
//! target code generation (inkwell) for the host and NVPTX.
//!
//! The kernel path is filled by the codegen issues; today this crate proves the toolchain:
//! [`toolchain::check`] builds, verifies and lowers an MLIR module and compiles LLVM IR for
//! x86-64 and NVPTX.

#![warn(missing_docs)]

pub mod toolchain;
