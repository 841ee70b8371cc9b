//! memc-runtime: the thin runtime linked into emitted executables. It depends on no other
//! workspace crate. Today it holds `.npy` reading and writing and the CUDA driver probe; the
//! program format, arena and backends arrive with the codegen issues.

#![warn(missing_docs)]

pub mod cuda;
pub mod gemm;
pub mod npy;
