//! `--pipeline-stages P --microbatches M --schedule S`: the options, the microbatch program
//! (the canonical forward graph cut into chunks, [`memc_passes::partition`], its forward
//! nodes given their chunk, then built into a training step) and the report of each device's memory
//! ([`memc_passes::stages::memory_plan`]). Cutting into the schedule's passes is
//! [`memc_passes::stages`], lowering `memc_codegen::pipeline`, running the runtime's
//! executor (`memc_runtime::pipeline::Pipelined`).

use anyhow::{anyhow, bail, Result};
use clap::Args;
use memc_passes::partition::Partition;
use memc_passes::pipeline::{self, ScheduleKind};
pub use memc_passes::stages::{late_node_count, Device, PipelinePlan};

/// Pipeline options of `memc compile`.
#[derive(Debug, Clone, Args)]
pub struct PipelineArgs {
    /// With --train: split the layers into pipeline stages (devices) and report each
    /// device's memory under the schedule (the --shape batch is one microbatch).
    #[arg(long, value_name = "P")]
    pub pipeline_stages: Option<usize>,
    /// Microbatches per step (with --pipeline-stages; default 2P).
    #[arg(long, value_name = "M", requires = "pipeline_stages")]
    pub microbatches: Option<usize>,
    /// gpipe, 1f1b, interleaved, zb-h1, v-min, v-half or v-zb (with --pipeline-stages).
    #[arg(long, value_name = "S", default_value = "1f1b")]
    pub schedule: String,
    /// Replicas of the pipeline (data parallelism, with --pipeline-stages): each step's batch
    /// is cut into D slices, one per replica, and the gradients are averaged across them;
    /// launched as P × D ranks (mpirun -n P·D).
    #[arg(long, value_name = "D")]
    pub data_parallel: Option<usize>,
    /// Gradient accumulation: each optimizer step runs K microbatches of the --shape batch's
    /// rows / K, the memory sized for one, adding their gradients into one sum per weight,
    /// and applies the optimizer once (with --pipeline-stages: the pipeline's microbatches).
    #[arg(long, value_name = "K", conflicts_with = "microbatches")]
    pub grad_accum: Option<usize>,
}

impl PipelineArgs {
    /// `--grad-accum K` as what it runs: with `--pipeline-stages`, the pipeline's K
    /// microbatches; else the training program accumulates over K microbatches itself
    /// (returned: the program is built for one microbatch, `--shape`'s rows / K).
    pub fn resolve_grad_accum(&mut self) -> Result<Option<usize>> {
        if self.data_parallel.is_some() && self.pipeline_stages.is_none() {
            bail!("--data-parallel replicates a pipelined step: pass --pipeline-stages P");
        }
        match (self.grad_accum, self.pipeline_stages) {
            (Some(0), _) => bail!("--grad-accum must be at least 1"),
            (Some(k), Some(_)) => {
                self.microbatches = Some(k);
                Ok(None)
            }
            (Some(k), None) if k > 1 => Ok(Some(k)),
            _ => Ok(None),
        }
    }

    /// The schedule kind and the number of chunks to cut, when pipelining was asked for.
    pub fn chunks(&self) -> Result<Option<(ScheduleKind, usize)>> {
        let Some(p) = self.pipeline_stages else {
            return Ok(None);
        };
        if p == 0 {
            bail!("--pipeline-stages must be at least 1");
        }
        if self.data_parallel == Some(0) {
            bail!("--data-parallel must be at least 1");
        }
        let kind =
            ScheduleKind::parse_named(&self.schedule).map_err(|e| anyhow!("--schedule {e}"))?;
        Ok(Some((kind, p * kind.chunks_per_device())))
    }
}

/// A partition error in terms of the CLI's flags.
pub fn partition_error(e: &memc_passes::partition::PartitionError) -> anyhow::Error {
    use memc_passes::partition::PartitionError;
    match e {
        PartitionError::Reversible => anyhow!(
            "--pipeline-stages: reversible layers (--reversible) are not split into pipeline stages yet; compile without --reversible"
        ),
        PartitionError::TooManyChunks { .. } => anyhow!("--pipeline-stages: {e}; use fewer stages"),
        PartitionError::NoLayers => anyhow!("--pipeline-stages: {e}"),
    }
}

/// Plans the pipeline of `partition` under `args`' schedule.
pub fn plan(args: &PipelineArgs, kind: ScheduleKind, partition: Partition) -> Result<PipelinePlan> {
    let p = args.pipeline_stages.expect("pipelining was asked for");
    let m = args.microbatches.unwrap_or(2 * p);
    if m == 0 {
        bail!("--microbatches must be at least 1");
    }
    let schedule =
        pipeline::generate(kind, p, m).map_err(|e| anyhow!("--schedule {}: {e}", kind.name()))?;
    memc_passes::stages::memory_plan(schedule, partition).map_err(|e| anyhow!(e))
}

/// The `--report` lines and the report's `pipeline` object.
pub trait PlanReport {
    /// Lines for `--report`.
    fn lines(&self) -> Vec<String>;
    /// The report's `pipeline` object.
    fn json(&self) -> serde_json::Value;
}

impl PlanReport for PipelinePlan {
    fn lines(&self) -> Vec<String> {
        let s = &self.schedule;
        let mut out = vec![format!(
            "pipeline: {} on {} stages, {} microbatches: {} layers in {} chunks; embedding on device {}, LM head on device {}; bubble {:.3} (unit costs), {:.3} (each chunk's FLOPs as its passes' times)",
            s.kind.name(),
            s.stages,
            s.microbatches,
            self.partition.layers,
            self.partition.chunks.len(),
            self.device_of_chunk(|c| c.embedding).unwrap_or(0),
            self.device_of_chunk(|c| c.head).unwrap_or(0),
            self.sim.bubble_rate,
            self.flop_sim.bubble_rate
        )];
        for (i, d) in self.devices.iter().enumerate() {
            let layers: Vec<String> = d.layers.iter().map(|(a, b)| format!("{a}..{b}")).collect();
            let flops: u64 = d
                .chunks
                .iter()
                .map(|&c| self.partition.chunks[c].flops)
                .sum();
            out.push(format!(
                "  device {i}: chunks {:?} (layers {}), {:.3} GFLOP per microbatch; weights {} bytes, gradients + optimizer {} bytes, activations at most {} bytes; peak {} bytes",
                d.chunks,
                layers.join(", "),
                flops as f64 / 1e9,
                d.weight_bytes,
                d.state_bytes,
                d.activation_peak_bytes,
                d.weight_bytes + d.state_bytes + d.activation_peak_bytes
            ));
        }
        out
    }

    fn json(&self) -> serde_json::Value {
        let s = &self.schedule;
        serde_json::json!({
            "schedule": s.kind.name(),
            "stages": s.stages,
            "microbatches": s.microbatches,
            "layers": self.partition.layers,
            "bubble_rate": self.sim.bubble_rate,
            "bubble_rate_flops": self.flop_sim.bubble_rate,
            "embedding_device": self.device_of_chunk(|c| c.embedding),
            "head_device": self.device_of_chunk(|c| c.head),
            "chunks": self.partition.chunks.iter().enumerate().map(|(i, c)| serde_json::json!({
                "device": s.device_of(i),
                "layers": [c.layers.0, c.layers.1],
                "flops": c.flops,
                "weight_bytes": c.weight_bytes,
                "state_bytes": c.state_bytes,
                "saved_bytes_per_microbatch": c.saved_bytes,
                "embedding": c.embedding,
                "head": c.head,
            })).collect::<Vec<_>>(),
            "devices": self.devices.iter().map(|d| serde_json::json!({
                "chunks": d.chunks,
                "weight_bytes": d.weight_bytes,
                "state_bytes": d.state_bytes,
                "activation_peak_bytes": d.activation_peak_bytes,
                "peak_bytes": d.weight_bytes + d.state_bytes + d.activation_peak_bytes,
            })).collect::<Vec<_>>(),
        })
    }
}

/// The training program of one microbatch for a pipelined step: the canonical forward graph
/// `g`'s layers cut into `stages × chunks_per_device` chunks, every forward node given its
/// chunk ([`memc_ir::Node::chunk`]; autodiff gives each backward node the chunk of the
/// forward node it differentiates, recomputation the chunk of the node it recomputes), built
/// under `opts`' recomputation policy and with `grad:<name>` outputs.
pub fn pipelined_program(
    mut g: memc_ir::Graph,
    opts: &memc_passes::train::TrainOptions,
    kind: ScheduleKind,
    stages: usize,
) -> Result<(memc_ir::Graph, Partition)> {
    let chunks = stages * kind.chunks_per_device();
    let part = memc_passes::partition::partition(&g, chunks).map_err(|e| partition_error(&e))?;
    memc_passes::stages::tag_chunks(&mut g, &part);
    if opts.clip_grad_norm.is_some() {
        bail!("--clip-grad-norm is not supported in a pipelined step (--pipeline-stages, --grad-accum) yet");
    }
    if opts.loss == memc_passes::train::Loss::CausalLm {
        bail!("--loss causal-lm (labels) is not supported in a pipelined step (--pipeline-stages, --grad-accum) yet");
    }
    crate::train::build_with(&mut g, opts, None, true)?;
    Ok((g, part))
}

/// Where the passes of a lowered pipelined step run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassTarget {
    /// Generated kernels on the cpu backend.
    Cpu,
    /// The reference interpreter ([`memc_codegen::reference`]).
    Reference,
    /// Nothing: the cpu programs without their kernels' code, to plan (`memc plan`).
    Plan,
}

/// Lowers the microbatch program `g` ([`pipelined_program`]) under `schedule` into the step
/// program the runtime's executor runs (its optimizer sharded over `replicas` data-parallel
/// replicas), its passes lowered for `target`; returns it with each
/// pass's graph (which the reference interpreter runs).
pub fn lower_pipeline(
    g: &memc_ir::Graph,
    schedule: &pipeline::Schedule,
    opts: &memc_passes::train::TrainOptions,
    rows: usize,
    replicas: usize,
    model: &str,
    target: PassTarget,
) -> Result<(
    memc_codegen::host::HostProgram,
    Vec<memc_codegen::pipeline::PassGraph>,
)> {
    let stages = memc_passes::stages::split(g, schedule);
    let training = crate::train::training_info(g, opts, model)?;
    let mut lower_pass = |sub: &memc_ir::Graph| match target {
        PassTarget::Cpu => memc_codegen::host::lower(sub, model),
        PassTarget::Reference => memc_codegen::host::interface(sub, model),
        PassTarget::Plan => memc_codegen::host::plan_only(sub, model),
    };
    Ok(memc_codegen::pipeline::lower(
        g,
        schedule,
        &stages,
        training,
        memc_codegen::pipeline::StepShape { rows, replicas },
        model,
        &mut lower_pass,
    )?)
}
