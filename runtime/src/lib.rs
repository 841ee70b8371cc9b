//! memc-runtime: the thin runtime linked into emitted executables. It depends on no other
//! workspace crate and links no LLVM or MLIR: `memc compile -o` links its static library
//! (`libmemc_runtime.a`) with the generated kernels and the serialised program.
//!
//! - [`program`]: the program format (arena size, buffers, steps), produced by memc-codegen.
//! - [`cpu`]: the arena and the cpu backend (generated kernels, GEMMs on [`gemm`], tiled
//!   [`attention`]).
//! - [`gpu`]: the cuda backend (the PTX module, cuBLAS GEMMs, one device arena), through
//!   cudarc with dynamic loading: building needs no CUDA, running needs a driver.
//! - [`pipeline`]: pipelined training steps (one thread per pipeline stage, or one process
//!   per stage and data-parallel replica, each holding its share, exchanging values over
//!   [`mpi`] through the [`transport`] interface).
//! - [`pool`]: the worker threads that run a step's independent tasks across cores.
//! - [`session`]: the training loop, inference and the command line of emitted executables.
//! - [`weights`]: safetensors weights and atomic checkpoints; [`npy`]: `.npy` files.

#![warn(missing_docs)]

pub mod attention;
pub mod cost;
pub mod cpu;
pub mod cuda;
pub mod finite;
pub mod gemm;
pub mod gpu;
pub mod mpi;
pub mod npy;
pub mod pipeline;
pub mod pool;
pub mod program;
pub mod schedule;
pub mod session;
pub mod transport;
pub mod vmath;
pub mod weights;

/// Where a program runs: the cpu backend ([`cpu::Cpu`]) or the cuda backend
/// ([`gpu::Cuda`]). The training loop, inference and checkpoints are written against this.
pub trait Backend {
    /// `cpu` or `cuda`.
    fn name(&self) -> &'static str;
    /// Bytes of the one arena allocation (the plan's peak).
    fn arena_bytes(&self) -> u64;
    /// Overwrites `slot` with `bytes` (exactly its size).
    fn set(&mut self, slot: &program::Slot, bytes: &[u8]) -> Result<(), RunError>;
    /// A copy of `slot`'s bytes.
    fn get(&mut self, slot: &program::Slot) -> Result<Vec<u8>, RunError>;
    /// Runs every step of the program once.
    fn run(&mut self) -> Result<(), RunError>;
    /// The first element of `slot` that is `bad` (its flat index and value). The default
    /// copies the slot out ([`Backend::get`]); the cpu backend reads its arena in place.
    fn first_bad(
        &mut self,
        slot: &program::Slot,
        bad: finite::Bad,
    ) -> Result<Option<(usize, f64)>, RunError> {
        Ok(finite::first(&self.get(slot)?, slot.dtype, bad))
    }
    /// Time per kind of step, when `MEMC_PROFILE` is set.
    fn profile(&self) -> Option<String>;
    /// Whether this process keeps `slot` (a weight or optimizer state). One rank of a
    /// distributed step keeps only its share: [`Backend::set`] drops what it does not keep
    /// and [`Backend::get`] refuses it.
    fn holds(&self, _slot: &program::Slot) -> bool {
        true
    }
    /// How checkpoints are split over the processes of a distributed step (`None`: this
    /// process holds everything and writes every file).
    fn shards(&self) -> Result<Option<Shards>, RunError> {
        Ok(None)
    }
    /// Returns once every process of a distributed step has called it (at once without).
    fn barrier(&mut self) -> Result<(), RunError> {
        Ok(())
    }
    /// Tells the other processes of a distributed step that this one failed, so the job
    /// ends instead of waiting for it (nothing without).
    fn abort(&self) {}
    /// Whether [`Backend::evaluate`] can run (checked before a run that validates).
    fn can_evaluate(&self) -> bool {
        false
    }
    /// Runs the program's evaluation step ([`program::Program::eval`]) once on the same
    /// arena; backends without one refuse.
    fn evaluate(&mut self) -> Result<(), RunError> {
        Err(RunError::Usage(format!(
            "an evaluation step (--val-data) runs on the cpu backend; the {} backend has none yet",
            self.name()
        )))
    }
}

/// Which process of a distributed step saves each weight and piece of optimizer state
/// ([`Backend::shards`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shards {
    /// This process's rank.
    pub rank: usize,
    /// The ranks.
    pub ranks: usize,
    /// The rank saving each weight and piece of optimizer state, by name.
    pub saver: std::collections::BTreeMap<String, usize>,
}

/// Why a run failed: each is one line naming the file or input and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad command-line use.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A malformed `.npy` file.
    #[error(transparent)]
    Npy(#[from] npy::NpyError),
    /// The embedded program is corrupt.
    #[error(transparent)]
    Program(#[from] program::ProgramError),
    /// A weights file or checkpoint that does not fit the program.
    #[error("{path}: {msg}")]
    Weights {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Data that does not fit the program.
    #[error("{path}: {msg}")]
    Data {
        /// The file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The cuda backend failed (no driver, no device, a driver or cuBLAS error).
    #[error("cuda backend: {0}")]
    Cuda(String),
    /// A step wrote a NaN where the check after every step (`MEMC_CHECK_NAN=1`) looked.
    #[error("{what} produced a non-finite value ({value}) in its {ty} result{at}")]
    NonFinite {
        /// The op that wrote it ([`program::Written::what`]).
        what: String,
        /// The result's type.
        ty: String,
        /// The value.
        value: f64,
        /// ` at [i, j, ..]`, or empty.
        at: String,
    },
    /// A gather's kernel met an index out of range (one computed in the graph: inputs are
    /// checked before the step).
    #[error("{what}: index {index} is out of range for dim {axis} of size {size}")]
    IndexOutOfRange {
        /// The op ([`program::Step::Kernel`]'s `index_check`).
        what: String,
        /// The index.
        index: i64,
        /// The indexed dim.
        axis: i64,
        /// Its size.
        size: i64,
    },
    /// Training diverged.
    #[error("{model}: step {step}: {msg}")]
    Diverged {
        /// The model.
        model: String,
        /// The step.
        step: u64,
        /// What happened and what to do.
        msg: String,
    },
    /// A step failed.
    #[error("step {step}: {cause}")]
    Step {
        /// The step.
        step: u64,
        /// Why (shown in the message, so not an error `source`, which would repeat it).
        cause: Box<RunError>,
    },
}
