//! memc: the compiler driver. The ONNX frontend ([`onnx`]), `.npy` ↔ tensor conversion
//! ([`io`]), reports ([`report`]) and the CLI ([`cli`]) live here; graph passes are in
//! `memc-passes`, code generation in `memc-codegen`.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod cli;
pub mod cost;
pub mod data;
pub mod io;
/// The ONNX frontend (the `memc-onnx` crate).
pub use memc_onnx as onnx;
pub mod pipe;
pub mod planner;
pub mod report;
pub mod rev;
pub mod train;
