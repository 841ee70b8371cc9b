//! `memc compile --pipeline-stages P --microbatches M --schedule S`: the training program's
//! layers split into pipeline chunks ([`memc_passes::partition`]), placed on devices as the
//! schedule places them (device `s` holds chunk `s`; interleaved 1F1B chunks `s` and `p + s`;
//! the V shapes `s` and `2p − 1 − s`), and each device's memory from the plan: its weights,
//! their gradients and optimizer state, and the activation bytes its chunks keep for the
//! microbatches the schedule has in flight (the schedule replayed with unit costs, each
//! forward of chunk `c` holding `c`'s saved bytes until its weight-gradient pass, or its
//! backward when the backward is not split).

use anyhow::{anyhow, bail, Result};
use clap::Args;
use memc_passes::partition::Partition;
use memc_passes::pipeline::{self, Costs, Kind, Schedule, ScheduleKind, Simulation};

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
}

/// A pipeline plan: the schedule, its simulation, the chunks and each device's memory.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    /// The schedule.
    pub schedule: Schedule,
    /// Its unit-cost simulation.
    pub sim: Simulation,
    /// The chunks.
    pub partition: Partition,
    /// Per device: (chunks, weight bytes, gradient + optimizer bytes, activation peak bytes).
    pub devices: Vec<Device>,
}

/// One device's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its chunks.
    pub chunks: Vec<usize>,
    /// Its layers (union of its chunks').
    pub layers: Vec<(usize, usize)>,
    /// Weights its chunks read.
    pub weight_bytes: u64,
    /// Their gradients and optimizer state.
    pub state_bytes: u64,
    /// The most activation bytes held at once under the schedule.
    pub activation_peak_bytes: u64,
}

impl PipelineArgs {
    /// The schedule kind and the number of chunks to cut, when pipelining was asked for.
    pub fn chunks(&self) -> Result<Option<(ScheduleKind, usize)>> {
        let Some(p) = self.pipeline_stages else {
            return Ok(None);
        };
        if p == 0 {
            bail!("--pipeline-stages must be at least 1");
        }
        let kind = ScheduleKind::parse(&self.schedule).ok_or_else(|| {
            anyhow!(
                "--schedule `{}` is not a schedule (gpipe, 1f1b, interleaved, zb-h1, v-min, v-half, v-zb)",
                self.schedule
            )
        })?;
        Ok(Some((kind, p * kind.chunks_per_device())))
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
    let sim = pipeline::simulate(&schedule, &Costs::default()).map_err(|e| anyhow!(e))?;
    let mut devices: Vec<Device> = (0..p)
        .map(|_| Device {
            chunks: vec![],
            layers: vec![],
            weight_bytes: 0,
            state_bytes: 0,
            activation_peak_bytes: 0,
        })
        .collect();
    for (c, chunk) in partition.chunks.iter().enumerate() {
        let d = &mut devices[schedule.device_of(c)];
        d.chunks.push(c);
        d.layers.push(chunk.layers);
        d.weight_bytes += chunk.weight_bytes;
        d.state_bytes += chunk.state_bytes;
    }
    // Replay: +saved bytes at a forward's start, − at its W's end (B's without a split).
    let release = if schedule.split_backward() {
        Kind::W
    } else {
        Kind::B
    };
    let mut events: Vec<Vec<(f64, i8, i64)>> = vec![vec![]; p];
    for t in &sim.passes {
        let bytes = partition.chunks[t.pass.chunk].saved_bytes as i64;
        if t.pass.kind == Kind::F {
            events[t.device].push((t.start, 1, bytes));
        } else if t.pass.kind == release {
            events[t.device].push((t.end, 0, -bytes));
        }
    }
    for (d, ev) in events.iter_mut().enumerate() {
        ev.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (mut live, mut peak) = (0i64, 0i64);
        for &(_, _, b) in ev.iter() {
            live += b;
            peak = peak.max(live);
        }
        devices[d].activation_peak_bytes = peak as u64;
    }
    Ok(PipelinePlan {
        schedule,
        sim,
        partition,
        devices,
    })
}

impl PipelinePlan {
    fn device_of_chunk(
        &self,
        want: impl Fn(&memc_passes::partition::Chunk) -> bool,
    ) -> Option<usize> {
        self.partition
            .chunks
            .iter()
            .position(want)
            .map(|c| self.schedule.device_of(c))
    }

    /// Lines for `--report`.
    pub fn lines(&self) -> Vec<String> {
        let s = &self.schedule;
        let mut out = vec![format!(
            "pipeline: {} on {} stages, {} microbatches: {} layers in {} chunks; embedding on device {}, LM head on device {}; bubble {:.3} (unit costs)",
            s.kind.name(),
            s.stages,
            s.microbatches,
            self.partition.layers,
            self.partition.chunks.len(),
            self.device_of_chunk(|c| c.embedding).unwrap_or(0),
            self.device_of_chunk(|c| c.head).unwrap_or(0),
            self.sim.bubble_rate
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

    /// The report's `pipeline` object.
    pub fn json(&self) -> serde_json::Value {
        let s = &self.schedule;
        serde_json::json!({
            "schedule": s.kind.name(),
            "stages": s.stages,
            "microbatches": s.microbatches,
            "layers": self.partition.layers,
            "bubble_rate": self.sim.bubble_rate,
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
