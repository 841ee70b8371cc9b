//! The program format: what an emitted executable runs. `memc-codegen` produces it from a
//! planned, fused training (or inference) graph; the runtime executes it with no knowledge of
//! the IR. It names the arena size, every input, output, parameter and constant at its arena
//! offset, and the steps in order (a generated kernel with its buffers, or a GEMM).
//!
//! Serialised form ([`Program::to_bytes`]): the magic `MEMCPRG\0`, a little-endian `u32`
//! format version, the program as JSON (`u64` length first), the constants' bytes (`u64`
//! length first), and an FNV-1a 64 checksum of everything before it. [`Program::from_bytes`]
//! checks all of it, then [`Program::validate`] checks every buffer lies inside the arena, so
//! a corrupt executable fails with one clear error rather than writing out of bounds.

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// The first bytes of a serialised program.
pub const MAGIC: &[u8; 8] = b"MEMCPRG\0";
/// The format version this runtime reads.
pub const VERSION: u32 = 2;

/// Element types of program buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// One byte, 0 or 1.
    Bool,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::Bf16 | Dtype::I16 => 2,
            Dtype::Bool => 1,
        }
    }

    /// The safetensors / PyTorch name.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::I64 => "i64",
            Dtype::I32 => "i32",
            Dtype::I16 => "i16",
            Dtype::Bool => "bool",
        }
    }
}

/// A tensor at a fixed place in the arena.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// Its name (an input, output or parameter name; `%N` for internal values).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Byte offset in the arena.
    pub offset: u64,
}

impl Slot {
    /// Size in bytes.
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }

    fn describe(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.dtype.name(), dims.join("x"))
    }

    /// `f32[2x16]`-style type, for messages.
    pub fn type_string(&self) -> String {
        self.describe()
    }
}

/// What a parameter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A model weight (in the weights file and checkpoints; trained or frozen).
    Weight,
    /// Optimizer state (zero at the start; saved in checkpoints).
    OptimizerState,
}

/// Every element of input `input` must lie in `0..bound`: it indexes `table` (a gather's
/// rows, such as the token embedding's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexBound {
    /// The input's name.
    pub input: String,
    /// The exclusive upper bound.
    pub bound: u64,
    /// What it indexes, for messages (`the rows of model.embed_tokens.weight`).
    pub table: String,
}

/// How `--save DIR` writes a Hugging Face model directory beyond the weights' names (which are
/// the slots' names, the checkpoint's own when the model was compiled with `--weights`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckpointLayout {
    /// The element type a weight is stored in where it is not its slot's: a bf16 or f16
    /// checkpoint trains in f32 (its master weights go to the optimizer file).
    #[serde(default)]
    pub dtypes: std::collections::BTreeMap<String, Dtype>,
    /// Small files of the input model directory (`config.json`, tokenizer files) by file
    /// name, copied into every saved directory.
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, String>,
}

impl CheckpointLayout {
    /// Whether it says nothing (an f32 model without a model directory).
    pub fn is_empty(&self) -> bool {
        self.dtypes.is_empty() && self.files.is_empty()
    }
}

/// A parameter: lives in the arena for the whole run, loaded from the weights file (or zero).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Param {
    /// Where it lives; `slot.name` is the name in the weights file.
    pub slot: Slot,
    /// What it is.
    pub role: Role,
    /// The step writes it (a trained weight, optimizer state): what the training loop checks
    /// for non-finite values after every step.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub updated: bool,
}

/// A constant: its bytes are in the program's constant blob at `blob_offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Const {
    /// Where it lives.
    pub slot: Slot,
    /// Byte offset of its data in the blob.
    pub blob_offset: u64,
}

/// A buffer argument of a step: an arena range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Buf {
    /// Byte offset in the arena.
    pub offset: u64,
    /// Size in bytes.
    pub bytes: u64,
}

/// A result a step writes, for the check after every step that `MEMC_CHECK_NAN=1` turns on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Written {
    /// Its buffer.
    pub buf: Buf,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<usize>,
    /// The op that computes it, for messages: ``node #201 `attention_grad` ``.
    pub what: String,
}

impl Written {
    /// `f32[2, 4, 16, 16]`.
    pub fn type_string(&self) -> String {
        let dims: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        format!("{}[{}]", self.dtype.name(), dims.join(", "))
    }
}

/// One step of the program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Step {
    /// A generated kernel (`void kernel(void **buffers)`): inputs, then outputs.
    Kernel {
        /// Index in [`Program::kernels`] (and in the executable's kernel table).
        kernel: u32,
        /// The buffers passed, in order.
        args: Vec<Buf>,
        /// What it computes, for profiles (`fused elementwise`, `softmax`, ...).
        label: String,
        /// The runtime's own implementation, which the cpu backend runs instead of the
        /// kernel (the cuda backend runs the kernel's GPU mapping).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        native: Option<Native>,
        /// The extent of the host kernel's outermost parallel dim when the kernel takes a row
        /// range (a pointer to `[lo, hi]` as `i64`s after its buffers): the cpu backend splits
        /// `0..range` across threads. `None`: the kernel runs whole, on one thread.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        range: Option<u64>,
        /// A gather's kernel: it takes the runtime's index flag (four `i64`s: hit, index,
        /// axis, size) after its buffers, set when an index was out of range; the op, for the
        /// message (``node #24 `gather` ``).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index_check: Option<String>,
    },
    /// `out = a @ b` (NumPy matmul semantics) on the CPU GEMM library.
    Gemm {
        /// Element type of `a`, `b` and `out`.
        dtype: Dtype,
        /// Left operand.
        a: Buf,
        /// Its shape.
        a_shape: Vec<usize>,
        /// Right operand.
        b: Buf,
        /// Its shape.
        b_shape: Vec<usize>,
        /// The result.
        out: Buf,
        /// `a` is stored with its last two dims swapped (row-major `[.., k, m]`): a transpose
        /// the memory plan made a view of its operand.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        a_t: bool,
        /// `b` is stored with its last two dims swapped (row-major `[.., n, k]`).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        b_t: bool,
    },
}

/// A step the runtime implements itself on the CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Native {
    /// Tiled attention ([`crate::attention`]).
    Attention(crate::attention::Spec),
}

/// One launch of a device function: grid and block dims and, for each kernel parameter, the
/// index of the buffer (in its step's `args`) it points to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    /// The PTX entry's name.
    pub function: String,
    /// Blocks in x, y, z.
    pub grid: [u32; 3],
    /// Threads per block in x, y, z.
    pub block: [u32; 3],
    /// Buffer index per parameter.
    pub args: Vec<u32>,
}

/// The device code of a program: one PTX module and each kernel's launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The target (`sm_90`).
    pub arch: String,
    /// The PTX module (every kernel of the program).
    pub ptx: String,
    /// Launches of each kernel, indexed like [`Program::kernels`].
    pub launches: Vec<Vec<Launch>>,
}

/// What a training program needs beyond inference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Training {
    /// The input fed with token ids from `--data`.
    pub data_input: String,
    /// The output holding the step's loss (a scalar).
    pub loss_output: String,
    /// The vocabulary size, when known: token ids must lie in `0..vocab`.
    pub vocab: Option<u64>,
    /// The learning-rate input, if the program has one.
    pub lr_input: Option<String>,
    /// The weight-decay input, if any.
    pub weight_decay_input: Option<String>,
    /// The step-counter input (1-based; AdamW's bias correction reads it), if any.
    pub step_input: Option<String>,
    /// The optimizer, for messages and defaults (`sgd`, `adamw`).
    pub optimizer: String,
    /// Weight decay used when `--weight-decay` is not given.
    pub default_weight_decay: f64,
    /// Scalar outputs reported on every step's line as the `rev_drift` array (the
    /// reconstruction drift of each reversible layer, `--rev-check`).
    pub drift_outputs: Vec<String>,
    /// Warn when a drift passes this.
    pub drift_threshold: Option<f64>,
    /// The labels input of transformers' causal-LM loss (`--loss causal-lm`: the data's shape
    /// and type, −100 left out of the loss), fed from `--labels` or, without it, the ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels_input: Option<String>,
    /// Gradient accumulation (`--grad-accum K`): the program runs one of the step's K
    /// microbatches, and these inputs scale its gradient and apply the optimizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accum: Option<Accum>,
}

/// How a program accumulates gradients over a step's microbatches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accum {
    /// Microbatches per optimizer step.
    pub microbatches: u32,
    /// The scalar each microbatch's gradient is scaled by (its share of the step's loss).
    pub scale_input: String,
    /// The scalar that applies the optimizer (1 on the last microbatch, else 0).
    pub apply_input: String,
}

/// A pipelined training step (`memc compile --train --pipeline-stages`): the step's batch is
/// cut into microbatches, and each pass of the schedule (a chunk's forward `F`, input-gradient
/// `B` or weight-gradient `W` for one microbatch) runs its own program on the device the
/// schedule gives it ([`crate::pipeline::PipelineCpu`]: one thread per device).
///
/// The enclosing [`Program`] is the step's interface: the whole batch's inputs, the loss, and
/// every weight and optimizer state (its arena holds only those); it has no steps of its own.
/// Sub-programs name the values they exchange `x.N`: a pass's inputs are the microbatch's
/// slice of the model inputs (by name) and `x.N` values other passes output; `averaged`
/// values (the loss, weight gradients) are summed over the microbatches, divided by their
/// number and fed to `update` (the optimizer, and gradient sums over chunks of a weight read
/// by several), whose inputs are those and the step's scalars (`memc.lr`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The schedule's name (`1f1b`, `v-half`, ...).
    pub schedule: String,
    /// Devices (pipeline stages).
    pub stages: u32,
    /// Microbatches per step.
    pub microbatches: u32,
    /// The pass programs.
    pub passes: Vec<SubProgram>,
    /// Each device's passes in the schedule's order: (index in `passes`, microbatch).
    pub order: Vec<Vec<(u32, u32)>>,
    /// Nodes that read several chunks' weight gradients (a tied embedding's gradient sum),
    /// run once per microbatch after the passes, like a pass whose outputs are averaged.
    #[serde(default)]
    pub late: Option<SubProgram>,
    /// The optimizer, run once per step after the passes: one program per (stage, replica)
    /// that updates weights (`device` the stage, `shard` the replica). A stage updates the
    /// weights its passes read, each of its replicas a share of them and only that share's
    /// optimizer state (ZeRO stage 1), the new weights then sent to the stage's other
    /// replicas.
    pub updates: Vec<SubProgram>,
    /// Values averaged over the microbatches (outputs of passes, inputs of `update`).
    pub averaged: Vec<String>,
    /// The averaged value that is the loss.
    pub loss: String,
    /// Replicas of the pipeline (data parallelism): each reads its slice of every batch (the
    /// program's data input is one replica's rows) and the averaged values are averaged across
    /// replicas too; launched as `stages × data_parallel` ranks.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub data_parallel: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A program inside a [`Pipeline`]: its kernel indices refer to the enclosing program's
/// kernels, its constants to `blob` (a range of the enclosing program's blob).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubProgram {
    /// `F3`, `B3`, `W3` (pass of chunk 3) or `update`.
    pub label: String,
    /// The device running it.
    pub device: u32,
    /// The data-parallel replica running it (an optimizer shard; 0 for the passes).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub shard: u32,
    /// The program (its `kernels` and `blob` are empty; see [`SubProgram::resolve`]).
    pub program: Program,
    /// Its constants' byte range in the enclosing program's blob.
    pub blob: [u64; 2],
}

impl Program {
    /// Where the buffers the step keeps between runs end: its weights and optimizer state,
    /// inputs and constants (the planner places them first); an evaluation step lives above.
    pub fn kept_bytes(&self) -> u64 {
        self.params
            .iter()
            .map(|q| &q.slot)
            .chain(&self.inputs)
            .chain(self.consts.iter().map(|c| &c.slot))
            .map(|s| s.offset + s.bytes())
            .max()
            .unwrap_or(0)
    }

    /// The loss output of a training or evaluation step (`loss`), if it has one.
    pub fn loss(&self) -> Option<&Slot> {
        self.output("loss")
    }
}

impl SubProgram {
    /// The program with its kernel names and constants filled in from `outer`.
    pub fn resolve(&self, outer: &Program) -> Result<Program, ProgramError> {
        let [start, end] = self.blob;
        let blob = outer
            .blob
            .get(start as usize..end as usize)
            .filter(|_| start <= end)
            .ok_or_else(|| {
                ProgramError::Corrupt(format!(
                    "pass `{}`'s constants lie outside the blob",
                    self.label
                ))
            })?;
        let mut p = self.program.clone();
        p.kernels = outer.kernels.clone();
        p.blob = blob.to_vec();
        if p.pipeline.is_some() {
            return Err(ProgramError::Corrupt(format!(
                "pass `{}` holds a pipeline of its own",
                self.label
            )));
        }
        p.validate().map_err(|e| match e {
            ProgramError::Corrupt(m) => {
                ProgramError::Corrupt(format!("pass `{}`: {m}", self.label))
            }
            e => e,
        })?;
        Ok(p)
    }
}

impl Pipeline {
    /// Checks that the step can run and computes what it says, given the sub-programs
    /// resolved against `outer` (the step's program): every pass runs once per microbatch
    /// on its own device, every exchanged value has one producer of the reader's size
    /// (its readers are counted from the passes' inputs at run time), averaged values and weights agree in size
    /// with where they go, and the devices' orders cannot wait on each other for ever (a
    /// dry run).
    fn check(&self, outer: &Program) -> Result<(), ProgramError> {
        if self.data_parallel == 0 {
            return Err(ProgramError::Corrupt("zero data-parallel replicas".into()));
        }
        let passes: Vec<Program> = self
            .passes
            .iter()
            .map(|p| p.resolve(outer))
            .collect::<Result<_, _>>()?;
        let late = self.late.as_ref().map(|p| p.resolve(outer)).transpose()?;
        let updates: Vec<Program> = self
            .updates
            .iter()
            .map(|p| p.resolve(outer))
            .collect::<Result<_, _>>()?;
        self.agrees(outer, &passes, late.as_ref(), &updates)
            .map_err(ProgramError::Corrupt)
    }

    fn agrees(
        &self,
        outer: &Program,
        passes: &[Program],
        late: Option<&Program>,
        updates: &[Program],
    ) -> Result<(), String> {
        let m = self.microbatches as usize;
        if m == 0 || self.order.len() != self.stages as usize {
            return Err("the pipeline has no microbatches or not one order per stage".into());
        }
        // Producers of exchanged and averaged values, with their sizes.
        let mut producer: std::collections::HashMap<&str, (usize, u64)> = Default::default();
        for (k, p) in passes.iter().enumerate() {
            for o in &p.outputs {
                if producer.insert(&o.name, (k, o.bytes())).is_some() {
                    return Err(format!("`{}` is computed by two passes", o.name));
                }
            }
        }
        let mut late_outputs: std::collections::HashMap<&str, u64> = Default::default();
        let labelled = self.passes.iter().map(|x| x.label.as_str()).zip(passes);
        for (label, p) in labelled.chain(late.map(|l| ("late", l))) {
            for s in p.inputs.iter().filter(|s| s.name.starts_with("x.")) {
                if producer
                    .get(s.name.as_str())
                    .is_none_or(|&(_, b)| b != s.bytes())
                {
                    return Err(format!(
                        "pass `{label}` reads `{}`, which no pass computes at its size",
                        s.name
                    ));
                }
            }
            for s in p.inputs.iter().filter(|s| !s.name.starts_with("x.")) {
                let ok = outer
                    .input(&s.name)
                    .is_some_and(|o| o.bytes() == s.bytes() || o.bytes() == s.bytes() * m as u64);
                if !ok {
                    return Err(format!(
                        "pass `{label}` reads input `{}`, which the step does not give in {m} microbatches of its size",
                        s.name
                    ));
                }
            }
        }
        if let Some(l) = late {
            for o in &l.outputs {
                late_outputs.insert(&o.name, o.bytes());
            }
        }
        // Averaged values: computed by a pass or the late program, read by the update or
        // the loss.
        let size_of = |name: &str| {
            producer
                .get(name)
                .map(|p| p.1)
                .or_else(|| late_outputs.get(name).copied())
        };
        for name in &self.averaged {
            if size_of(name).is_none() {
                return Err(format!("averaged value `{name}` is computed by no pass"));
            }
        }
        for (u, update) in self.updates.iter().zip(updates) {
            if u.device >= self.stages || u.shard >= self.data_parallel {
                return Err(format!(
                    "optimizer `{}` runs on stage {} of replica {}, outside the pipeline",
                    u.label, u.device, u.shard
                ));
            }
            if self
                .updates
                .iter()
                .filter(|v| (v.device, v.shard) == (u.device, u.shard))
                .count()
                > 1
            {
                return Err(format!(
                    "two optimizer programs run on stage {} of replica {}",
                    u.device, u.shard
                ));
            }
            for s in &update.inputs {
                let ok = if self.averaged.contains(&s.name) {
                    size_of(&s.name) == Some(s.bytes())
                } else {
                    outer.input(&s.name).is_some_and(|o| o.bytes() == s.bytes())
                };
                if !ok {
                    return Err(format!(
                        "the optimizer's input `{}` does not match its source",
                        s.name
                    ));
                }
            }
        }
        let loss = outer
            .training
            .as_ref()
            .and_then(|t| outer.output(&t.loss_output));
        if !self.averaged.contains(&self.loss)
            || loss.is_none_or(|l| size_of(&self.loss) != Some(l.bytes()))
        {
            return Err("the pipeline's loss does not match the step's".into());
        }
        // Weights: one size everywhere.
        for p in passes.iter().chain(late).chain(updates) {
            for q in &p.params {
                let ok = outer
                    .params
                    .iter()
                    .any(|o| o.slot.name == q.slot.name && o.slot.bytes() == q.slot.bytes());
                if !ok {
                    return Err(format!(
                        "`{}` is not a parameter of the step at that size",
                        q.slot.name
                    ));
                }
            }
        }
        // Every pass once per microbatch, on its device; the orders run to the end.
        let mut seen = vec![vec![false; m]; passes.len()];
        for (d, order) in self.order.iter().enumerate() {
            for &(k, mb) in order {
                let (k, mb) = (k as usize, mb as usize);
                if k >= passes.len() || mb >= m || self.passes[k].device as usize != d {
                    return Err(format!("device {d}'s order names a pass it does not run"));
                }
                if std::mem::replace(&mut seen[k][mb], true) {
                    return Err(format!(
                        "pass `{}` runs twice for microbatch {mb}",
                        self.passes[k].label
                    ));
                }
            }
        }
        if seen.iter().flatten().any(|x| !x) {
            return Err("the pipeline's order leaves a pass out".into());
        }
        let mut done: std::collections::HashSet<(&str, usize)> = Default::default();
        let mut next = vec![0usize; self.order.len()];
        loop {
            let mut progressed = false;
            for (d, order) in self.order.iter().enumerate() {
                while let Some(&(k, mb)) = order.get(next[d]) {
                    let p = &passes[k as usize];
                    let ready = p
                        .inputs
                        .iter()
                        .filter(|s| s.name.starts_with("x."))
                        .all(|s| done.contains(&(s.name.as_str(), mb as usize)));
                    if !ready {
                        break;
                    }
                    for o in &p.outputs {
                        done.insert((o.name.as_str(), mb as usize));
                    }
                    next[d] += 1;
                    progressed = true;
                }
            }
            if !progressed {
                break;
            }
        }
        if next.iter().zip(&self.order).any(|(n, o)| *n < o.len()) {
            return Err("the devices' orders wait on each other for ever".into());
        }
        Ok(())
    }
}

/// A compiled program.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Program {
    /// The source model, for messages.
    pub model: String,
    /// Arena size: the memory plan's peak, in bytes.
    pub arena_bytes: u64,
    /// Symbol names of the generated kernels, indexed by [`Step::Kernel::kernel`].
    pub kernels: Vec<String>,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Named inputs (model inputs, and `memc.*` scalars in training programs).
    pub inputs: Vec<Slot>,
    /// Named outputs.
    pub outputs: Vec<Slot>,
    /// Parameters.
    pub params: Vec<Param>,
    /// Constants.
    pub consts: Vec<Const>,
    /// Present in training programs.
    pub training: Option<Training>,
    /// Device code, when compiled for the cuda backend.
    #[serde(default)]
    pub device: Option<Device>,
    /// A pipelined training step's passes (then `steps` is empty).
    #[serde(default)]
    pub pipeline: Option<Box<Pipeline>>,
    /// A training program's evaluation step (`memc compile --train --eval`): the forward pass
    /// and the loss, no gradients, run in this program's arena on its weights (same offsets)
    /// and the region the step uses only while it runs ([`SubProgram::resolve`] gives it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<Box<SubProgram>>,
    /// How a saved model directory stores the weights (`--save DIR`).
    #[serde(default, skip_serializing_if = "CheckpointLayout::is_empty")]
    pub checkpoint: CheckpointLayout,
    /// Inputs used as gather indices and the range their elements must lie in: kernels clamp
    /// an index for memory safety, the runtime refuses the input before running instead.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index_bounds: Vec<IndexBound>,
    /// What each step writes (one list per step, or none at all): the results the
    /// non-finite check (`MEMC_CHECK_NAN=1`) reads after the step, and the op it names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<Vec<Written>>,
    /// The constants' bytes (serialised after the JSON).
    #[serde(skip)]
    pub blob: Vec<u8>,
}

/// A program that passed [`Program::validate`] (every slot and step buffer inside the arena,
/// every constant inside the blob, every kernel present, GEMM shapes matching their buffers):
/// the only way to get one is [`Program::checked`], so holding one is the proof backends rely
/// on.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a>(&'a Program);

impl std::ops::Deref for Checked<'_> {
    type Target = Program;
    fn deref(&self) -> &Program {
        self.0
    }
}

/// A program that cannot be read or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    /// The bytes are not a program of this format.
    #[error("the embedded program is corrupt: {0} (recompile with memc compile -o)")]
    Corrupt(String),
    /// The program is of another format version.
    #[error("the embedded program has format version {found}, this runtime reads version {VERSION} (recompile with this memc)")]
    Version {
        /// The version found.
        found: u32,
    },
}

/// FNV-1a, 64-bit.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Program {
    /// The serialised program (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a program serialises");
        let mut out = Vec::with_capacity(8 + 4 + 16 + json.len() + self.blob.len() + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u64).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(self.blob.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.blob);
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Reads and validates a serialised program.
    pub fn from_bytes(bytes: &[u8]) -> Result<Program, ProgramError> {
        let corrupt = |m: &str| ProgramError::Corrupt(m.to_string());
        if bytes.len() < 8 + 4 + 8 + 8 + 8 || &bytes[..8] != MAGIC {
            return Err(corrupt("missing the MEMCPRG magic"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(ProgramError::Version { found: version });
        }
        let (body, sum) = bytes.split_at(bytes.len() - 8);
        if fnv1a(body) != u64::from_le_bytes(sum.try_into().unwrap()) {
            return Err(corrupt("checksum mismatch"));
        }
        let u64_at = |at: usize| -> Result<u64, ProgramError> {
            body.get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .ok_or_else(|| corrupt("truncated"))
        };
        let json_len = u64_at(12)? as usize;
        let json = body
            .get(20..20usize.saturating_add(json_len))
            .ok_or_else(|| corrupt("truncated program description"))?;
        let mut program: Program = serde_json::from_slice(json)
            .map_err(|e| ProgramError::Corrupt(format!("program description: {e}")))?;
        let blob_at = 20 + json_len;
        let blob_len = u64_at(blob_at)? as usize;
        let blob = body
            .get(blob_at + 8..(blob_at + 8).saturating_add(blob_len))
            .ok_or_else(|| corrupt("truncated constants"))?;
        if blob_at + 8 + blob_len != body.len() {
            return Err(corrupt("trailing bytes after the constants"));
        }
        program.blob = blob.to_vec();
        program.validate()?;
        Ok(program)
    }

    /// The program as [`Checked`]: validated, so that backends can rely on it.
    pub fn checked(&self) -> Result<Checked<'_>, ProgramError> {
        self.validate()?;
        Ok(Checked(self))
    }

    /// Checks every buffer lies inside the arena, every kernel index exists, every constant
    /// lies inside the blob and the training inputs exist.
    pub fn validate(&self) -> Result<(), ProgramError> {
        let bad = |m: String| Err(ProgramError::Corrupt(m));
        let inside = |offset: u64, bytes: u64| {
            offset
                .checked_add(bytes)
                .is_some_and(|end| end <= self.arena_bytes)
        };
        let slots = self
            .inputs
            .iter()
            .chain(&self.outputs)
            .chain(self.params.iter().map(|p| &p.slot))
            .chain(self.consts.iter().map(|c| &c.slot));
        for s in slots {
            if !inside(s.offset, s.bytes()) {
                return bad(format!("`{}` lies outside the arena", s.name));
            }
        }
        for c in &self.consts {
            let end = c.blob_offset.checked_add(c.slot.bytes());
            if end.is_none_or(|e| e > self.blob.len() as u64) {
                return bad(format!("constant `{}` lies outside the blob", c.slot.name));
            }
        }
        for (n, step) in self.steps.iter().enumerate() {
            let bufs: Vec<&Buf> = match step {
                Step::Kernel {
                    kernel,
                    args,
                    native,
                    range,
                    ..
                } => {
                    if *kernel as usize >= self.kernels.len() {
                        return bad(format!("step {n} calls kernel {kernel}, which is missing"));
                    }
                    if *range == Some(0) {
                        return bad(format!("step {n}: an empty row range"));
                    }
                    if let Some(Native::Attention(spec)) = native {
                        let bytes: Vec<u64> = args.iter().map(|b| b.bytes).collect();
                        spec.check(&bytes)
                            .map_err(|e| ProgramError::Corrupt(format!("step {n}: {e}")))?;
                    }
                    args.iter().collect()
                }
                Step::Gemm {
                    dtype,
                    a,
                    a_shape,
                    b,
                    b_shape,
                    out,
                    ..
                } => {
                    let numel = |s: &[usize]| (s.iter().product::<usize>() * dtype.size()) as u64;
                    if a_shape.is_empty()
                        || b_shape.is_empty()
                        || numel(a_shape) != a.bytes
                        || numel(b_shape) != b.bytes
                        || !matches!(dtype, Dtype::F32 | Dtype::F64 | Dtype::Bf16)
                        || !crate::gemm::shapes_agree(
                            a_shape,
                            b_shape,
                            out.bytes / dtype.size() as u64,
                        )
                    {
                        return bad(format!("step {n}: inconsistent matmul operands"));
                    }
                    vec![a, b, out]
                }
            };
            if let Some(b) = bufs.iter().find(|b| !inside(b.offset, b.bytes)) {
                return bad(format!(
                    "step {n}: buffer at {}+{} lies outside the arena",
                    b.offset, b.bytes
                ));
            }
        }
        if !self.results.is_empty() && self.results.len() != self.steps.len() {
            return bad(format!(
                "{} step results for {} steps",
                self.results.len(),
                self.steps.len()
            ));
        }
        for (n, w) in self
            .results
            .iter()
            .enumerate()
            .flat_map(|(n, r)| r.iter().map(move |w| (n, w)))
        {
            let numel = w
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            if numel.and_then(|e| e.checked_mul(w.dtype.size() as u64)) != Some(w.buf.bytes)
                || !inside(w.buf.offset, w.buf.bytes)
            {
                return bad(format!(
                    "step {n}: result {} does not fit its buffer",
                    w.what
                ));
            }
        }
        if let Some(d) = &self.device {
            if d.launches.len() != self.kernels.len() {
                return bad("the device code does not cover every kernel".into());
            }
            for step in &self.steps {
                if let Step::Kernel {
                    kernel,
                    args,
                    index_check,
                    ..
                } = step
                {
                    for l in &d.launches[*kernel as usize] {
                        // The index flag comes after the buffers.
                        let n = args.len() + usize::from(index_check.is_some());
                        if l.args.iter().any(|&a| a as usize >= n) {
                            return bad(format!(
                                "launch of `{}` names a missing buffer",
                                l.function
                            ));
                        }
                    }
                }
            }
        }
        if let Some(pl) = &self.pipeline {
            pl.check(self)?;
        }
        if let Some(e) = &self.eval {
            let p = e.resolve(self)?;
            if p.arena_bytes > self.arena_bytes {
                return bad(format!(
                    "the evaluation step needs {} bytes of the {}-byte arena",
                    p.arena_bytes, self.arena_bytes
                ));
            }
            for q in &p.params {
                let same = self.params.iter().any(|o| {
                    o.slot.name == q.slot.name
                        && o.slot.offset == q.slot.offset
                        && o.slot.bytes() == q.slot.bytes()
                });
                if !same {
                    return bad(format!(
                        "the evaluation step's weight `{}` is not the training step's",
                        q.slot.name
                    ));
                }
            }
            if self.pipeline.is_some() || p.loss().is_none() {
                return bad("an evaluation step of a pipelined program, or without a loss".into());
            }
            // Everything but its weights lies above what the training step keeps between
            // runs (its weights, optimizer state, inputs and constants).
            let kept = self.kept_bytes();
            let weight = |offset: u64, bytes: u64| {
                p.params
                    .iter()
                    .any(|q| q.slot.offset == offset && q.slot.bytes() == bytes)
            };
            let mut bufs: Vec<(u64, u64)> = p
                .inputs
                .iter()
                .chain(&p.outputs)
                .chain(p.consts.iter().map(|c| &c.slot))
                .map(|s| (s.offset, s.bytes()))
                .collect();
            for step in &p.steps {
                match step {
                    Step::Kernel { args, .. } => {
                        bufs.extend(args.iter().map(|b| (b.offset, b.bytes)))
                    }
                    Step::Gemm { a, b, out, .. } => {
                        bufs.extend([a, b, out].iter().map(|x| (x.offset, x.bytes)))
                    }
                }
            }
            if let Some(&(o, n)) = bufs.iter().find(|&&(o, n)| o < kept && !weight(o, n)) {
                return bad(format!(
                    "the evaluation step's buffer at {o} ({n} bytes) lies in what the training step keeps (below {kept})"
                ));
            }
        }
        if let Some(t) = &self.training {
            let names = [
                Some(&t.data_input),
                t.lr_input.as_ref(),
                t.weight_decay_input.as_ref(),
                t.step_input.as_ref(),
                t.labels_input.as_ref(),
                t.accum.as_ref().map(|a| &a.scale_input),
                t.accum.as_ref().map(|a| &a.apply_input),
            ];
            for name in names.into_iter().flatten() {
                if self.input(name).is_none() {
                    return bad(format!("training input `{name}` is missing"));
                }
            }
            if let (Some(l), Some(d)) = (
                t.labels_input.as_ref().and_then(|n| self.input(n)),
                self.input(&t.data_input),
            ) {
                if l.shape != d.shape || l.dtype != d.dtype {
                    return bad(format!(
                        "the labels `{}` are {}, the data `{}` {}",
                        l.name,
                        l.type_string(),
                        d.name,
                        d.type_string()
                    ));
                }
            }
            for name in std::iter::once(&t.loss_output).chain(&t.drift_outputs) {
                if self.output(name).is_none() {
                    return bad(format!("output `{name}` is missing"));
                }
            }
        }
        Ok(())
    }

    /// The input called `name`.
    pub fn input(&self, name: &str) -> Option<&Slot> {
        self.inputs.iter().find(|s| s.name == name)
    }

    /// The output called `name`.
    pub fn output(&self, name: &str) -> Option<&Slot> {
        self.outputs.iter().find(|s| s.name == name)
    }

    /// Bytes of the parameters of `role`.
    pub fn param_bytes(&self, role: Role) -> u64 {
        self.params
            .iter()
            .filter(|p| p.role == role)
            .map(|p| p.slot.bytes())
            .sum()
    }
}

/// `values` as little-endian elements of `dtype` (rounded to nearest).
pub fn encode(dtype: Dtype, values: &[f64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for &v in values {
        match dtype {
            Dtype::F32 => out.extend((v as f32).to_le_bytes()),
            Dtype::F64 => out.extend(v.to_le_bytes()),
            Dtype::F16 => out.extend(f16::from_f64(v).to_le_bytes()),
            Dtype::Bf16 => out.extend(bf16::from_f64(v).to_le_bytes()),
            Dtype::I64 => out.extend((v as i64).to_le_bytes()),
            Dtype::I32 => out.extend((v as i32).to_le_bytes()),
            Dtype::I16 => out.extend((v as i16).to_le_bytes()),
            Dtype::Bool => out.push((v != 0.0) as u8),
        }
    }
    out
}

/// Little-endian elements of `dtype` as f64.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Vec<f64> {
    let c = dtype.size();
    bytes
        .chunks_exact(c)
        .map(|b| match dtype {
            Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::F64 => f64::from_le_bytes(b.try_into().unwrap()),
            Dtype::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f64(),
            Dtype::Bf16 => bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
            Dtype::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::I16 => i16::from_le_bytes(b.try_into().unwrap()) as f64,
            Dtype::Bool => (b[0] != 0) as u8 as f64,
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Program {
        let slot = |name: &str, offset| Slot {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![2, 2],
            offset,
        };
        Program {
            model: "m.onnx".into(),
            arena_bytes: 64,
            kernels: vec!["memc_k0".into()],
            steps: vec![
                Step::Kernel {
                    kernel: 0,
                    args: vec![
                        Buf {
                            offset: 0,
                            bytes: 16,
                        },
                        Buf {
                            offset: 16,
                            bytes: 16,
                        },
                    ],
                    label: "fused elementwise".into(),
                    native: None,
                    range: None,
                    index_check: None,
                },
                Step::Gemm {
                    dtype: Dtype::F32,
                    a: Buf {
                        offset: 0,
                        bytes: 16,
                    },
                    a_shape: vec![2, 2],
                    b: Buf {
                        offset: 32,
                        bytes: 16,
                    },
                    b_shape: vec![2, 2],
                    out: Buf {
                        offset: 48,
                        bytes: 16,
                    },
                    a_t: false,
                    b_t: false,
                },
            ],
            inputs: vec![slot("x", 0)],
            outputs: vec![slot("y", 48)],
            params: vec![Param {
                slot: slot("w", 32),
                role: Role::Weight,
                updated: true,
            }],
            consts: vec![Const {
                slot: slot("%3", 16),
                blob_offset: 0,
            }],
            training: None,
            device: None,
            pipeline: None,
            eval: None,
            checkpoint: Default::default(),
            index_bounds: vec![],
            results: vec![],
            blob: vec![7; 16],
        }
    }

    #[test]
    fn round_trips() {
        let p = sample();
        assert_eq!(Program::from_bytes(&p.to_bytes()).unwrap(), p);
    }

    #[test]
    fn rejects_corruption() {
        let bytes = sample().to_bytes();
        for at in [0, 9, 30, bytes.len() - 20, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            assert!(Program::from_bytes(&b).is_err(), "flip at {at}");
        }
        assert!(Program::from_bytes(&bytes[..bytes.len() - 3]).is_err());
        let mut out_of_arena = sample();
        out_of_arena.arena_bytes = 60;
        let e = Program::from_bytes(&out_of_arena.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("outside the arena"), "{e}");
        let mut bad_gemm = sample();
        if let Step::Gemm { b_shape, .. } = &mut bad_gemm.steps[1] {
            *b_shape = vec![4, 1];
        }
        let e = Program::from_bytes(&bad_gemm.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("matmul"), "{e}");
    }

    /// A step of two passes (the sample as each, its constant in the outer blob) and an
    /// optimizer.
    pub(crate) fn pipelined() -> Program {
        // F0: x -> x.1; F1: x.1 -> x.2 (the loss, averaged); the optimizer reads x.2.
        let sub = |input: &str, output: &str| {
            let mut p = sample();
            p.kernels.clear();
            p.blob.clear();
            p.inputs[0].name = input.into();
            p.outputs[0].name = output.into();
            p
        };
        let pass = |label: &str, device, program| SubProgram {
            label: label.into(),
            device,
            shard: 0,
            program,
            blob: [0, 16],
        };
        let mut p = sample();
        p.steps.clear();
        p.consts.clear();
        p.training = Some(Training {
            data_input: "x".into(),
            loss_output: "y".into(),
            vocab: None,
            lr_input: None,
            weight_decay_input: None,
            step_input: None,
            optimizer: "sgd".into(),
            default_weight_decay: 0.0,
            drift_outputs: vec![],
            drift_threshold: None,
            labels_input: None,
            accum: None,
        });
        p.pipeline = Some(Box::new(Pipeline {
            schedule: "1f1b".into(),
            stages: 2,
            microbatches: 2,
            passes: vec![
                pass("F0", 0, sub("x", "x.1")),
                pass("F1", 1, sub("x.1", "x.2")),
            ],
            order: vec![vec![(0, 0), (0, 1)], vec![(1, 0), (1, 1)]],
            late: None,
            updates: vec![pass("U0", 0, sub("x.2", "z"))],
            averaged: vec!["x.2".into()],
            loss: "x.2".into(),
            data_parallel: 1,
        }));
        p
    }

    #[test]
    fn pipelines_round_trip_and_reject_corruption() {
        let p = pipelined();
        let back = Program::from_bytes(&p.to_bytes()).unwrap();
        assert_eq!(back, p);
        let sub = back.pipeline.as_ref().unwrap().passes[1]
            .resolve(&back)
            .unwrap();
        assert_eq!((sub.kernels.len(), sub.blob.len()), (1, 16));
        let mut bad = pipelined();
        bad.pipeline.as_mut().unwrap().order[1].push((7, 0));
        let e = Program::from_bytes(&bad.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("a pass it does not run"), "{e}");
        let mut bad = pipelined();
        bad.pipeline.as_mut().unwrap().passes[0].blob = [8, 64];
        let e = Program::from_bytes(&bad.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("`F0`'s constants"), "{e}");
        let mut bad = pipelined();
        bad.pipeline.as_mut().unwrap().updates[0]
            .program
            .arena_bytes = 8;
        let e = Program::from_bytes(&bad.to_bytes()).unwrap_err();
        assert!(e.to_string().contains("pass `U0`"), "{e}");
        assert_eq!(e.to_string().matches("corrupt").count(), 1, "{e}");
        // What would panic, hang or average wrongly at run time.
        type Corrupt = fn(&mut Pipeline);
        let cases: [(&str, Corrupt); 7] = [
            ("runs twice", |p| p.order[0] = vec![(0, 0), (0, 0)]),
            ("outside the pipeline", |p| p.updates[0].shard = 1),
            ("two optimizer programs", |p| {
                let u = p.updates[0].clone();
                p.updates.push(u)
            }),
            ("leaves a pass out", |p| {
                p.order[1].pop().map(drop).unwrap_or(())
            }),
            ("does not run", |p| p.order.swap(0, 1)),
            ("wait on each other", |p| {
                p.passes[0].program.inputs[0].name = "x.2".into()
            }),
            ("no pass computes", |p| {
                p.passes[1].program.inputs[0].shape = vec![2, 3]
            }),
        ];
        for (want, corrupt) in cases {
            let mut bad = pipelined();
            corrupt(bad.pipeline.as_mut().unwrap());
            let e = Program::from_bytes(&bad.to_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
