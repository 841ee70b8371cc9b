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
    /// Its simulation with each chunk's FLOPs as its passes' times (forward, input-gradient
    /// and weight-gradient passes a third each): unequal stages show in the bubble.
    pub flop_sim: Simulation,
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
        let kind = ScheduleKind::parse_named(&self.schedule).map_err(|e| anyhow!(e))?;
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
    let split = schedule.split_backward();
    let mean = partition.chunks.iter().map(|c| c.flops as f64).sum::<f64>()
        / partition.chunks.len().max(1) as f64;
    let time = |q: pipeline::Pass| {
        let third = partition.chunks[q.chunk].flops as f64 / 3.0 / mean.max(1.0);
        match q.kind {
            Kind::B if !split => 2.0 * third,
            _ => third,
        }
    };
    let flop_sim = pipeline::simulate_with(&schedule, &time, 0.0).map_err(|e| anyhow!(e))?;
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
        flop_sim,
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

    /// The report's `pipeline` object.
    pub fn json(&self) -> serde_json::Value {
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

/// Prefix of a node name that carries its chunk (`c3|...`), set by [`pipelined_program`].
fn chunk_tag(name: &str) -> Option<usize> {
    let rest = name.strip_prefix('c')?;
    let (k, _) = rest.split_once('|')?;
    k.parse().ok()
}

/// The training program of one microbatch for a pipelined step: the canonical forward graph
/// `g`'s layers cut into `stages × chunks_per_device` chunks, every forward node's name
/// tagged with its chunk (autodiff names each backward node after the forward node it
/// differentiates, so the tags carry over), built without rematerialisation and with
/// `grad:<name>` outputs.
pub fn pipelined_program(
    mut g: memc_ir::Graph,
    args: &crate::train::TrainProgramArgs,
    kind: ScheduleKind,
    stages: usize,
) -> Result<(memc_ir::Graph, Partition)> {
    let chunks = stages * kind.chunks_per_device();
    let part = memc_passes::partition::partition(&g, chunks)
        .map_err(|e| anyhow!("--pipeline-stages: {e}"))?;
    for (i, c) in part.node_chunk.iter().enumerate() {
        if let Some(c) = c {
            let n = memc_ir::NodeId(i as u32);
            let name = format!("c{c}|{}", g.node(n).name);
            g.set_name(n, name);
        }
    }
    let mut a = args.clone();
    a.remat = crate::train::RematArg::None;
    a.activation_budget = None;
    if a.clip_grad_norm.is_some() {
        bail!("--clip-grad-norm is not supported in a pipelined step yet");
    }
    crate::train::build_with(&mut g, &a, None, true)?;
    Ok((g, part))
}

/// What one pipelined step computed: the mean loss over the microbatches and each trained
/// weight's gradient of that mean.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// Mean of the microbatches' losses.
    pub loss: f64,
    /// `grad:<name>` → gradient (f64 values).
    pub grads: std::collections::BTreeMap<String, Vec<f64>>,
}

/// One pass's share of the program: its nodes, what it reads from other passes and what it
/// publishes.
#[derive(Debug, Default, Clone)]
struct PassNodes {
    nodes: Vec<memc_ir::NodeId>,
    external: Vec<memc_ir::ValueId>,
    publish: Vec<memc_ir::ValueId>,
}

/// The program cut into the schedule's passes.
struct PassPlan {
    passes: std::collections::HashMap<(Kind, usize), PassNodes>,
    /// Nodes that read another chunk's weight gradients (a tied head): run after the passes.
    late: Vec<memc_ir::NodeId>,
    /// Devices that read each published value (every device, for what late nodes read).
    consumers: std::collections::HashMap<memc_ir::ValueId, Vec<usize>>,
    /// The device computing each output (`None`: a late node, computed everywhere).
    output_device: std::collections::HashMap<memc_ir::ValueId, Option<usize>>,
}

fn plan_passes(g: &memc_ir::Graph, schedule: &Schedule) -> PassPlan {
    use memc_ir::{NodeId, Phase, ValueId};
    use std::collections::{HashMap, HashSet};
    let chunks = schedule.chunks();
    let split = schedule.split_backward();
    let last = chunks - 1;
    // A node's chunk: its tag; an untagged backward node (the VJP of a node the training
    // builder added, such as a precision cast) takes the chunk of what it reads; the rest
    // (the loss) is the last chunk's.
    let mut chunk_of: Vec<usize> = Vec::with_capacity(g.nodes().len());
    for node in g.nodes() {
        let c = chunk_tag(&node.name).unwrap_or_else(|| match node.phase {
            Phase::Forward | Phase::Update => last,
            _ => node
                .inputs
                .iter()
                .find_map(|&v| g.producer(v).map(|p| chunk_of[p.index()]))
                .unwrap_or(last),
        });
        chunk_of.push(c.min(last));
    }
    let pass_of = |n: NodeId| -> Option<(Kind, usize)> {
        let node = g.node(n);
        let c = chunk_of[n.index()];
        match node.phase {
            Phase::Forward => Some((Kind::F, c)),
            Phase::Backward | Phase::Recompute => Some((Kind::B, c)),
            Phase::Weight if split => Some((Kind::W, c)),
            Phase::Weight => Some((Kind::B, c)),
            Phase::Update => None,
        }
    };
    // A pass may read what the schedule guarantees is done: F(c) any earlier forward;
    // B(c) any forward and the backwards of later chunks; W(c) also its own B. Anything
    // else (a weight gradient summed over two chunks) runs after the passes ("late").
    let allowed = |reader: (Kind, usize), producer: (Kind, usize)| -> bool {
        match (reader.0, producer.0) {
            _ if reader == producer => true,
            (Kind::F, Kind::F) => producer.1 <= reader.1,
            (Kind::B | Kind::W, Kind::F) => true,
            (Kind::B | Kind::W, Kind::B) => producer.1 >= reader.1,
            _ => false,
        }
    };
    let mut where_: HashMap<ValueId, Option<(Kind, usize)>> = HashMap::new(); // None = late
    let mut passes: HashMap<(Kind, usize), PassNodes> = HashMap::new();
    let mut late: Vec<NodeId> = vec![];
    // Forward nodes that read only weights, constants and inputs (weight casts of the
    // precision pass, the embedding lookup, masks, rotary tables) belong to no pass: each
    // pass (or the late nodes) that reads one computes it itself.
    let free = |n: NodeId| {
        g.node(n).phase == Phase::Forward
            && g.node(n).inputs.iter().all(|&v| g.producer(v).is_none())
    };
    let mut copied: HashSet<(Option<(Kind, usize)>, NodeId)> = HashSet::new();
    for i in 0..g.nodes().len() {
        let n = NodeId(i as u32);
        if free(n) {
            continue;
        }
        let Some(p) = pass_of(n) else { continue };
        let node = g.node(n);
        let is_late = node.inputs.iter().any(|v| match where_.get(v) {
            Some(None) => true,
            Some(Some(q)) => !allowed(p, *q),
            None => false,
        });
        let at = if is_late { None } else { Some(p) };
        for &o in &node.outputs {
            where_.insert(o, at);
        }
        let list = match at {
            Some(p) => &mut passes.entry(p).or_default().nodes,
            None => &mut late,
        };
        for &v in &node.inputs {
            if let Some(f) = g.producer(v).filter(|&f| free(f)) {
                if copied.insert((at, f)) {
                    list.push(f);
                }
            }
        }
        list.push(n);
    }
    let all: Vec<usize> = (0..schedule.stages).collect();
    let mut consumers: HashMap<ValueId, Vec<usize>> = HashMap::new();
    // Outputs (the loss, the gradients) are published where they are computed.
    for &(_, v) in g.outputs() {
        consumers.entry(v).or_default();
    }
    for (p, pn) in passes.iter_mut() {
        let mut ext = HashSet::new();
        for &n in &pn.nodes {
            for &v in &g.node(n).inputs {
                if let Some(Some(q)) = where_.get(&v) {
                    if q != p && ext.insert(v) {
                        pn.external.push(v);
                        let c = consumers.entry(v).or_default();
                        let d = schedule.device_of(p.1);
                        if !c.contains(&d) {
                            c.push(d);
                        }
                    }
                }
            }
        }
    }
    for &n in &late {
        for &v in &g.node(n).inputs {
            if matches!(where_.get(&v), Some(Some(_))) {
                consumers.insert(v, all.clone());
            }
        }
    }
    // A weight used on several devices (a tied or deduplicated weight) is updated on each:
    // its gradient goes to every device whose passes read it.
    let mut readers_of_param: HashMap<String, Vec<usize>> = HashMap::new();
    for ((_, c), pn) in &passes {
        let d = schedule.device_of(*c);
        for &n in &pn.nodes {
            for &v in &g.node(n).inputs {
                if let memc_ir::ValueDef::Param { name, .. } = &g.value(v).def {
                    let r = readers_of_param.entry(name.clone()).or_default();
                    if !r.contains(&d) {
                        r.push(d);
                    }
                }
            }
        }
    }
    for (name, v) in g.outputs() {
        if let Some(p) = name.strip_prefix("grad:") {
            if let Some(devices) = readers_of_param.get(p) {
                let c = consumers.entry(*v).or_default();
                for &d in devices {
                    if !c.contains(&d) {
                        c.push(d);
                    }
                }
            }
        }
    }
    for (p, pn) in passes.iter_mut() {
        for &n in &pn.nodes {
            for &o in &g.node(n).outputs {
                if consumers.contains_key(&o) && where_.get(&o) == Some(&Some(*p)) {
                    pn.publish.push(o);
                }
            }
        }
    }
    let output_device = g
        .outputs()
        .iter()
        .map(|&(_, v)| {
            (
                v,
                where_
                    .get(&v)
                    .copied()
                    .flatten()
                    .map(|p| schedule.device_of(p.1)),
            )
        })
        .collect();
    PassPlan {
        passes,
        late,
        consumers,
        output_device,
    }
}

/// Nodes of `g` that no pass of `schedule` can run (they read another chunk's weight
/// gradients, as a tied head's gradient sum does) and that therefore run after the passes;
/// 0 for untied models (a diagnostic the tests check).
pub fn late_node_count(g: &memc_ir::Graph, schedule: &Schedule) -> usize {
    plan_passes(g, schedule).late.len()
}

/// How passes hand values to each other: within one process (a shared store) or between
/// processes ([`TcpExchange`]).
pub trait Exchange: Sync {
    /// Makes `t`, value `v` of microbatch `mb`, available to the devices `to` (and locally).
    fn publish(
        &self,
        mb: usize,
        v: memc_ir::ValueId,
        t: &memc_ir::Tensor,
        to: &[usize],
    ) -> Result<()>;
    /// Waits for value `v` of microbatch `mb`.
    fn wait(&self, mb: usize, v: memc_ir::ValueId) -> Result<memc_ir::Tensor>;
    /// The value if it is here, without waiting.
    fn get(&self, mb: usize, v: memc_ir::ValueId) -> Option<memc_ir::Tensor>;
    /// Wakes every waiter with an error (a device failed).
    fn fail(&self);
    /// Which device publishes each value, and its type (so a value can come from another
    /// process, and a wait can fail at once when that process is gone).
    fn expect_from(
        &self,
        _producers: std::collections::HashMap<memc_ir::ValueId, (usize, memc_ir::TensorType)>,
    ) {
    }
}

/// The in-process exchange: one store per microbatch, waited on with a condition variable.
pub struct SharedExchange {
    stores: std::sync::Mutex<std::collections::HashMap<(usize, memc_ir::ValueId), memc_ir::Tensor>>,
    ready: std::sync::Condvar,
    failed: std::sync::atomic::AtomicBool,
}

impl SharedExchange {
    /// An empty exchange.
    pub fn new() -> SharedExchange {
        SharedExchange {
            stores: Default::default(),
            ready: Default::default(),
            failed: Default::default(),
        }
    }

    fn insert(&self, mb: usize, v: memc_ir::ValueId, t: memc_ir::Tensor) {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((mb, v), t);
        self.ready.notify_all();
    }
}

impl Default for SharedExchange {
    fn default() -> Self {
        SharedExchange::new()
    }
}

impl Exchange for SharedExchange {
    fn publish(
        &self,
        mb: usize,
        v: memc_ir::ValueId,
        t: &memc_ir::Tensor,
        _: &[usize],
    ) -> Result<()> {
        self.insert(mb, v, t.clone());
        Ok(())
    }

    fn wait(&self, mb: usize, v: memc_ir::ValueId) -> Result<memc_ir::Tensor> {
        let mut store = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.failed.load(std::sync::atomic::Ordering::SeqCst) {
                bail!("another device or rank failed");
            }
            if let Some(t) = store.get(&(mb, v)) {
                return Ok(t.clone());
            }
            store = self.ready.wait(store).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn get(&self, mb: usize, v: memc_ir::ValueId) -> Option<memc_ir::Tensor> {
        self.stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(mb, v))
            .cloned()
    }

    fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        let _s = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        self.ready.notify_all();
    }
}

/// Runs one training step of `g` (from [`pipelined_program`]) with one thread per device,
/// each running its passes in `schedule`'s exact order on the reference interpreter:
/// forward passes hand activations to the next chunk, backward passes gradients to the
/// previous one (through a shared per-microbatch store, waited on), weight-gradient passes
/// run where the schedule put them. `feeds[j]` holds microbatch `j`'s inputs. Gradients
/// that combine several chunks' weight gradients (a tied embedding) are summed after the
/// passes, as a data-parallel all-reduce would.
pub fn run_step(
    g: &memc_ir::Graph,
    schedule: &Schedule,
    feeds: &[std::collections::HashMap<String, memc_ir::Tensor>],
) -> Result<StepResult> {
    let ex = SharedExchange::new();
    let devices: Vec<usize> = (0..schedule.stages).collect();
    let r = run_devices(g, schedule, feeds, &devices, &ex)?;
    Ok(StepResult {
        loss: r.loss.ok_or_else(|| anyhow!("the loss was not computed"))?,
        grads: r.grads,
    })
}

/// What [`run_devices`] computed here: the mean loss if a device here computes it, and the
/// mean gradients of the weights whose gradients are computed here.
#[derive(Debug, Clone)]
pub struct LocalResult {
    /// Mean loss, when the last chunk runs here.
    pub loss: Option<f64>,
    /// `grad:<name>` → mean gradient.
    pub grads: std::collections::BTreeMap<String, Vec<f64>>,
}

/// Runs the passes of `devices` (one thread each) for one step, exchanging values through
/// `ex`, then the late nodes and the outputs available here.
pub fn run_devices(
    g: &memc_ir::Graph,
    schedule: &Schedule,
    feeds: &[std::collections::HashMap<String, memc_ir::Tensor>],
    devices: &[usize],
    ex: &dyn Exchange,
) -> Result<LocalResult> {
    use memc_ir::{NodeId, Tensor, ValueDef, ValueId};
    use std::collections::HashMap;
    let m = schedule.microbatches;
    if feeds.len() != m {
        bail!(
            "{} microbatches of inputs for a schedule of {m}",
            feeds.len()
        );
    }
    let plan = plan_passes(g, schedule);
    let split = schedule.split_backward();
    ex.expect_from(
        plan.passes
            .iter()
            .flat_map(|((_, c), pn)| {
                pn.publish
                    .iter()
                    .map(move |&v| (v, (schedule.device_of(*c), g.value(v).ty.clone())))
            })
            .collect(),
    );
    let mut fixed: HashMap<ValueId, Tensor> = HashMap::new();
    for (i, v) in g.values().iter().enumerate() {
        match &v.def {
            ValueDef::Param { data: Some(t), .. } | ValueDef::Const(t) => {
                fixed.insert(ValueId(i as u32), t.clone());
            }
            _ => {}
        }
    }
    let input_name: HashMap<ValueId, String> = g
        .inputs()
        .iter()
        .filter_map(|&v| match &g.value(v).def {
            ValueDef::Input { name } => Some((v, name.clone())),
            _ => None,
        })
        .collect();
    let eval = |n: NodeId, get: &dyn Fn(ValueId) -> Option<Tensor>| -> Result<Tensor> {
        let node = g.node(n);
        let args: Vec<Tensor> = node
            .inputs
            .iter()
            .map(|&v| {
                get(v).ok_or_else(|| anyhow!("node `{}`: operand %{} missing", node.name, v.0))
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = args.iter().collect();
        memc_ir::eval_op(&node.op, &refs).map_err(|e| anyhow!("node `{}`: {e}", node.name))
    };
    let source = |v: ValueId, mb: usize| -> Option<Tensor> {
        fixed
            .get(&v)
            .cloned()
            .or_else(|| input_name.get(&v).and_then(|n| feeds[mb].get(n).cloned()))
    };
    let run_device = |d: usize| -> Result<()> {
        // Values a pass computed that later passes of the same chunk read stay here.
        let mut local: HashMap<(usize, usize), HashMap<ValueId, Tensor>> = HashMap::new();
        for pass in &schedule.devices[d] {
            let key = (pass.kind, pass.chunk);
            let done = if split { Kind::W } else { Kind::B };
            let Some(pn) = plan.passes.get(&key) else {
                if pass.kind == done {
                    local.remove(&(pass.chunk, pass.mb));
                }
                continue;
            };
            let mut ext: HashMap<ValueId, Tensor> = HashMap::new();
            for &v in &pn.external {
                ext.insert(v, ex.wait(pass.mb, v)?);
            }
            let mine = local.entry((pass.chunk, pass.mb)).or_default();
            for &n in &pn.nodes {
                let t = {
                    let get = |v: ValueId| {
                        mine.get(&v)
                            .or_else(|| ext.get(&v))
                            .cloned()
                            .or_else(|| source(v, pass.mb))
                    };
                    eval(n, &get)?
                };
                mine.insert(g.node(n).outputs[0], t);
            }
            for &v in &pn.publish {
                ex.publish(pass.mb, v, &mine[&v], &plan.consumers[&v])?;
            }
            // The chunk's last pass for this microbatch frees what it kept.
            if pass.kind == done {
                local.remove(&(pass.chunk, pass.mb));
            }
        }
        Ok(())
    };
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = devices
            .iter()
            .map(|&d| {
                let run = &run_device;
                s.spawn(move || {
                    // A panicking worker still wakes the others (the guard fails the
                    // exchange unless the worker returned Ok).
                    struct Guard<'a>(&'a dyn Exchange, bool);
                    impl Drop for Guard<'_> {
                        fn drop(&mut self) {
                            if !self.1 {
                                self.0.fail();
                            }
                        }
                    }
                    let mut guard = Guard(ex, false);
                    let r = run(d);
                    guard.1 = r.is_ok();
                    r
                })
            })
            .collect();
        let mut first = Ok(());
        for h in handles {
            let r = h
                .join()
                .map_err(|_| anyhow!("a pipeline worker panicked"))?;
            if first.is_ok() {
                first = r;
            }
        }
        first
    })?;
    // Late nodes (gradients summed over chunks), then the outputs computed here.
    let mut loss = None;
    let mut grads: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for mb in 0..m {
        let mut late_values: HashMap<ValueId, Tensor> = HashMap::new();
        for &n in &plan.late {
            let mut args = HashMap::new();
            for &v in &g.node(n).inputs {
                if late_values.contains_key(&v) || source(v, mb).is_some() {
                    continue;
                }
                args.insert(v, ex.wait(mb, v)?);
            }
            let t = {
                let get = |v: ValueId| {
                    late_values
                        .get(&v)
                        .or_else(|| args.get(&v))
                        .cloned()
                        .or_else(|| source(v, mb))
                };
                eval(n, &get)?
            };
            late_values.insert(g.node(n).outputs[0], t);
        }
        for (name, v) in g.outputs() {
            // Computed here, computed elsewhere and sent here (wait for it), or neither.
            let t = match plan.output_device.get(v).copied().flatten() {
                None => late_values.get(v).cloned(),
                Some(d) if devices.contains(&d) => ex.get(mb, *v),
                Some(_)
                    if plan
                        .consumers
                        .get(v)
                        .is_some_and(|c| c.iter().any(|d| devices.contains(d))) =>
                {
                    Some(ex.wait(mb, *v)?)
                }
                Some(_) => None,
            };
            let Some(t) = t else {
                continue;
            };
            let t = t.to_f64_vec();
            if name == "loss" {
                *loss.get_or_insert(0.0) += t[0] / m as f64;
            } else if name.starts_with("grad:") {
                let acc = grads
                    .entry(name.clone())
                    .or_insert_with(|| vec![0.0; t.len()]);
                for (a, x) in acc.iter_mut().zip(&t) {
                    *a += x / m as f64;
                }
            }
        }
    }
    Ok(LocalResult { loss, grads })
}

/// Applies the optimizer of `g` (its update nodes) to the gradients of a pipelined step
/// (`grads`: `grad:<name>` → values), with the step's scalar inputs (`memc.lr`, ...); the
/// weights and optimizer state of `g` take their new values.
pub fn apply_updates(
    g: &mut memc_ir::Graph,
    grads: &std::collections::BTreeMap<String, Vec<f64>>,
    scalars: &std::collections::HashMap<String, memc_ir::Tensor>,
) -> Result<()> {
    use memc_ir::{Phase, Tensor, ValueDef, ValueId};
    use std::collections::HashMap;
    let mut store: HashMap<ValueId, Tensor> = HashMap::new();
    for (name, v) in g.outputs() {
        if let Some(values) = grads.get(name) {
            let ty = &g.value(*v).ty;
            store.insert(*v, Tensor::from_f64(ty.dtype, ty.shape.clone(), values));
        }
    }
    for (i, v) in g.values().iter().enumerate() {
        let id = ValueId(i as u32);
        let t = match &v.def {
            ValueDef::Param { data: Some(t), .. } | ValueDef::Const(t) => t.clone(),
            ValueDef::Param { data: None, .. } => {
                Tensor::from_f64(v.ty.dtype, v.ty.shape.clone(), &vec![0.0; v.ty.numel()])
            }
            ValueDef::Input { name } => match scalars.get(name) {
                Some(t) => t.clone(),
                None => continue,
            },
            ValueDef::Node { .. } => continue,
        };
        store.entry(id).or_insert(t);
    }
    // Update chains whose gradient is not here (another process owns the weight) are skipped.
    for node in g.nodes() {
        if node.phase != Phase::Update {
            continue;
        }
        let Some(args) = node
            .inputs
            .iter()
            .map(|v| store.get(v))
            .collect::<Option<Vec<&Tensor>>>()
        else {
            continue;
        };
        let t =
            memc_ir::eval_op(&node.op, &args).map_err(|e| anyhow!("node `{}`: {e}", node.name))?;
        store.insert(node.outputs[0], t);
    }
    let updates: Vec<(ValueId, ValueId)> = g.updates().to_vec();
    for (p, v) in updates {
        let Some(t) = store.get(&v).cloned() else {
            continue;
        };
        if t.to_f32_vec().iter().any(|x| !x.is_finite()) {
            let name = match &g.value(p).def {
                ValueDef::Param { name, .. } => name.clone(),
                _ => String::new(),
            };
            bail!("the update of `{name}` is not finite (lower --lr)");
        }
        g.set_param_data(p, t);
    }
    Ok(())
}

/// The multi-process exchange (one process per pipeline stage, torchrun's conventions):
/// values go to the ranks that read them over the runtime's [`memc_runtime::mesh::Mesh`]
/// (TCP, rank `r` on `MASTER_PORT + 1 + r`), keyed by step and microbatch; what this rank
/// publishes or receives stays in a local store for its other readers.
pub struct TcpExchange {
    mesh: memc_runtime::mesh::Mesh,
    step: std::sync::atomic::AtomicU64,
    local: SharedExchange,
    /// The rank publishing each value and its type.
    producers:
        std::sync::Mutex<std::collections::HashMap<memc_ir::ValueId, (usize, memc_ir::TensorType)>>,
    /// Held while a value is received, so that two readers here take it from the mesh once.
    receiving: std::sync::Mutex<()>,
}

/// The torchrun environment of this process ([`memc_runtime::mesh::RankEnv`]).
pub use memc_runtime::mesh::RankEnv;

/// Reads the torchrun environment ([`RankEnv::from_env`]) as an `anyhow` result.
pub fn rank_env() -> Result<Option<RankEnv>> {
    RankEnv::from_env().map_err(|e| anyhow!(e))
}

/// Keys of one step's values in the local store: steps are kept apart so that a peer
/// already in the next step cannot be confused with this one.
const STEP_STRIDE: usize = 1 << 32;

impl TcpExchange {
    /// Connects to every peer (retrying for up to `timeout`).
    pub fn connect(env: &RankEnv, timeout: std::time::Duration) -> Result<TcpExchange> {
        Ok(TcpExchange {
            mesh: memc_runtime::mesh::Mesh::connect(env, timeout)?,
            step: Default::default(),
            local: SharedExchange::new(),
            producers: Default::default(),
            receiving: Default::default(),
        })
    }

    /// Starts step `step` (1-based): what earlier steps left is dropped.
    pub fn begin_step(&self, step: usize) {
        self.step
            .store(step as u64, std::sync::atomic::Ordering::SeqCst);
        self.local
            .stores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(k, _), _| *k >= step * STEP_STRIDE);
    }

    /// Tells every peer that this rank failed (they stop waiting for it); best effort.
    pub fn abort(&self) {
        self.mesh.abort();
    }

    fn key(&self, mb: usize) -> usize {
        self.step.load(std::sync::atomic::Ordering::SeqCst) as usize * STEP_STRIDE + mb
    }
}

impl Exchange for TcpExchange {
    fn publish(
        &self,
        mb: usize,
        v: memc_ir::ValueId,
        t: &memc_ir::Tensor,
        to: &[usize],
    ) -> Result<()> {
        self.local.insert(self.key(mb), v, t.clone());
        let step = self.step.load(std::sync::atomic::Ordering::SeqCst);
        for &r in to.iter().filter(|&&r| r != self.mesh.rank()) {
            self.mesh
                .send(r, step, mb as u32, &format!("%{}", v.0), t.bytes())?;
        }
        Ok(())
    }

    fn wait(&self, mb: usize, v: memc_ir::ValueId) -> Result<memc_ir::Tensor> {
        if let Some(t) = self.local.get(self.key(mb), v) {
            return Ok(t);
        }
        let from = self
            .producers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&v)
            .cloned();
        match from {
            Some((r, ty)) if r != self.mesh.rank() => {
                let _one = self.receiving.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(t) = self.local.get(self.key(mb), v) {
                    return Ok(t);
                }
                let step = self.step.load(std::sync::atomic::Ordering::SeqCst);
                let bytes = self.mesh.recv(r, step, mb as u32, &format!("%{}", v.0))?;
                let t = memc_ir::Tensor::from_bytes(ty, bytes.into())
                    .map_err(|e| anyhow!("%{} of microbatch {mb} from rank {r}: {e}", v.0))?;
                self.local.insert(self.key(mb), v, t.clone());
                Ok(t)
            }
            _ => self.local.wait(self.key(mb), v),
        }
    }

    fn get(&self, mb: usize, v: memc_ir::ValueId) -> Option<memc_ir::Tensor> {
        self.local.get(self.key(mb), v)
    }

    fn fail(&self) {
        self.local.fail();
    }

    fn expect_from(
        &self,
        producers: std::collections::HashMap<memc_ir::ValueId, (usize, memc_ir::TensorType)>,
    ) {
        *self.producers.lock().unwrap_or_else(|e| e.into_inner()) = producers;
    }
}

/// The exchange name of value `v` in pass programs (`x.N`).
fn key(v: memc_ir::ValueId) -> String {
    format!("x.{}", v.0)
}

/// The sub-graph of `g` made of `nodes` (in order): operands computed by nodes outside it
/// become inputs named [`key`], model inputs keep their names, weights and optimizer state
/// become data-less params of the same name (their values come from the step at run time),
/// constants keep their data; `outputs` are named by [`key`]; `updates` (of `g`) whose
/// values it computes are kept.
fn extract(
    g: &memc_ir::Graph,
    nodes: &[memc_ir::NodeId],
    outputs: &[memc_ir::ValueId],
) -> memc_ir::Graph {
    use memc_ir::{Graph, ParamRole, ValueDef, ValueId};
    use std::collections::HashMap;
    let mut sub = Graph::new();
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let operand = |sub: &mut Graph, map: &mut HashMap<ValueId, ValueId>, v: ValueId| -> ValueId {
        if let Some(&m) = map.get(&v) {
            return m;
        }
        let val = g.value(v);
        let new = match &val.def {
            ValueDef::Input { name } => sub.add_input(name.clone(), val.ty.clone()),
            ValueDef::Param { name, role, data } => sub.add_param(
                name.clone(),
                *role,
                val.ty.clone(),
                if *role == ParamRole::Constant {
                    data.clone()
                } else {
                    None
                },
            ),
            ValueDef::Const(t) => sub.add_const(t.clone()),
            ValueDef::Node { .. } => sub.add_input(key(v), val.ty.clone()),
        };
        map.insert(v, new);
        new
    };
    for &n in nodes {
        let node = g.node(n);
        let ins: Vec<ValueId> = node
            .inputs
            .iter()
            .map(|&v| operand(&mut sub, &mut map, v))
            .collect();
        let tys = node
            .outputs
            .iter()
            .map(|&o| g.value(o).ty.clone())
            .collect();
        let outs = sub.add_node_typed(node.op.clone(), &ins, tys, node.name.clone());
        let id = memc_ir::NodeId(sub.nodes().len() as u32 - 1);
        sub.set_phase(id, node.phase);
        for (&o, new) in node.outputs.iter().zip(outs) {
            map.insert(o, new);
        }
    }
    for &v in outputs {
        let m = operand(&mut sub, &mut map, v);
        sub.add_output(key(v), m);
    }
    for &(p, v) in g.updates() {
        if let (Some(&pm), Some(&vm)) = (map.get(&p), map.get(&v)) {
            sub.add_update(pm, vm);
        }
    }
    sub
}

/// A pipelined training step compiled for the cpu backend (`memc compile --train
/// --pipeline-stages ... -o`, `memc train --backend cpu --pipeline-stages`): `g` is the
/// microbatch program ([`pipelined_program`]), cut into the schedule's passes as the
/// reference runner cuts it; each pass becomes a program of its own (planned, fused,
/// generated), the optimizer (with any gradient sum over chunks) another, run on the
/// microbatch averages; the step's program holds the whole batch's inputs (`rows` rows of
/// the token input), the loss, every weight and optimizer state, and the pipeline
/// ([`memc_runtime::program::Pipeline`]). Its kernels are shared by every pass.
#[cfg(feature = "codegen")]
pub fn host_pipeline(
    g: &memc_ir::Graph,
    schedule: &Schedule,
    args: &crate::train::TrainProgramArgs,
    rows: usize,
    model: &str,
) -> Result<memc_codegen::host::HostProgram> {
    use memc_ir::{NodeId, Phase, ValueDef, ValueId};
    use memc_runtime::program::{Param, Pipeline, Program, Slot, SubProgram};
    use std::collections::{HashMap, HashSet};
    let plan = plan_passes(g, schedule);
    let mut keys: Vec<(Kind, usize)> = plan.passes.keys().copied().collect();
    keys.sort();
    let index: HashMap<(Kind, usize), usize> =
        keys.iter().enumerate().map(|(i, &k)| (k, i)).collect();
    let label = |(k, c): (Kind, usize)| {
        format!(
            "{}{c}",
            match k {
                Kind::F => "F",
                Kind::B => "B",
                Kind::W => "W",
            }
        )
    };
    let verify = |sub: &memc_ir::Graph, what: &str| -> Result<()> {
        memc_ir::verify(sub).map_err(|e| anyhow!("{model}: pipelined pass {what}: {e}"))
    };
    // The passes.
    let mut published: HashSet<ValueId> = HashSet::new();
    let mut parts = vec![];
    let mut subs: Vec<(String, u32)> = vec![];
    for &k in &keys {
        let pn = &plan.passes[&k];
        let sub = extract(g, &pn.nodes, &pn.publish);
        verify(&sub, &label(k))?;
        published.extend(pn.publish.iter().copied());
        parts.push(
            crate::train::host_program(&sub, model, None)
                .map_err(|e| anyhow!("{model}: pass {}: {e:#}", label(k)))?,
        );
        subs.push((label(k), schedule.device_of(k.1) as u32));
    }
    // The optimizer, after the gradient sums that read several chunks' weight gradients.
    let updates: Vec<NodeId> = (0..g.nodes().len() as u32)
        .map(NodeId)
        .filter(|&n| g.node(n).phase == Phase::Update)
        .collect();
    // Nodes reading several chunks' weight gradients (a tied weight's gradient sum): run per
    // microbatch after the passes; what the optimizer reads from them is averaged.
    let late = if plan.late.is_empty() {
        None
    } else {
        let inside: HashSet<ValueId> = plan
            .late
            .iter()
            .flat_map(|&n| g.node(n).outputs.iter().copied())
            .collect();
        let mut outs: Vec<ValueId> = vec![];
        for &n in &updates {
            for &v in &g.node(n).inputs {
                if inside.contains(&v) && !outs.contains(&v) {
                    outs.push(v);
                }
            }
        }
        let sub = extract(g, &plan.late, &outs);
        verify(&sub, "late")?;
        published.extend(outs.iter().copied());
        Some(
            crate::train::host_program(&sub, model, None)
                .map_err(|e| anyhow!("{model}: the gradient sums: {e:#}"))?,
        )
    };
    let update = extract(g, &updates, &[]);
    verify(&update, "update")?;
    let loss_v = g
        .outputs()
        .first()
        .map(|&(_, v)| v)
        .ok_or_else(|| anyhow!("{model}: the training program has no loss"))?;
    let mut averaged = vec![key(loss_v)];
    for &v in update.inputs() {
        if let ValueDef::Input { name } = &update.value(v).def {
            if name.starts_with("x.") {
                averaged.push(name.clone());
            }
        }
    }
    for a in &averaged {
        let v = ValueId(a[2..].parse().expect("x.N"));
        if !published.contains(&v) {
            bail!("{model}: no pass outputs `{a}`, which the optimizer reads (a memc bug)");
        }
    }
    let has_late = late.is_some();
    parts.extend(late);
    parts.push(
        crate::train::host_program(&update, model, None)
            .map_err(|e| anyhow!("{model}: the optimizer: {e:#}"))?,
    );
    // The step's interface: the whole batch, the loss, every weight and optimizer state.
    let training = crate::train::training_info(g, args, model)?;
    let mut offset = 0u64;
    let mut place = |name: &str, dtype, shape: Vec<usize>| {
        let s = Slot {
            name: name.to_string(),
            dtype,
            shape,
            offset,
        };
        offset = (offset + s.bytes()).next_multiple_of(256);
        s
    };
    let mut inputs = vec![];
    for &v in g.inputs() {
        let ValueDef::Input { name } = &g.value(v).def else {
            continue;
        };
        let ty = &g.value(v).ty;
        let mut shape = ty.shape.clone();
        if *name == training.data_input {
            shape[0] = rows;
        } else if !name.starts_with("memc.") {
            bail!("{model}: a pipelined step feeds only token ids; the model also takes `{name}`");
        }
        inputs.push(place(name, memc_codegen::host::dtype(ty.dtype), shape));
    }
    let loss_ty = &g.value(loss_v).ty;
    let outputs = vec![place(
        &training.loss_output,
        memc_codegen::host::dtype(loss_ty.dtype),
        loss_ty.shape.clone(),
    )];
    let mut params = vec![];
    let mut seen = HashSet::new();
    for p in &parts {
        for q in &p.program.params {
            if seen.insert(q.slot.name.clone()) {
                params.push(Param {
                    slot: place(&q.slot.name, q.slot.dtype, q.slot.shape.clone()),
                    role: q.role,
                });
            }
        }
    }
    let top = Program {
        model: model.to_string(),
        arena_bytes: offset,
        kernels: vec![],
        steps: vec![],
        inputs,
        outputs,
        params,
        consts: vec![],
        training: Some(training),
        device: None,
        pipeline: None,
        blob: vec![],
    };
    let (mut host, programs) = memc_codegen::host::HostProgram::combine(top, parts);
    let mut programs = programs.into_iter();
    let passes: Vec<SubProgram> = subs
        .into_iter()
        .zip(programs.by_ref())
        .map(|((label, device), (program, blob))| SubProgram {
            label,
            device,
            program,
            blob,
        })
        .collect();
    let late = has_late.then(|| {
        let (program, blob) = programs.next().expect("the gradient sums");
        SubProgram {
            label: "late".into(),
            device: 0,
            program,
            blob,
        }
    });
    let (program, blob) = programs.next().expect("the optimizer");
    let order = schedule
        .devices
        .iter()
        .map(|d| {
            d.iter()
                .filter_map(|p| {
                    index
                        .get(&(p.kind, p.chunk))
                        .map(|&i| (i as u32, p.mb as u32))
                })
                .collect()
        })
        .collect();
    host.program.pipeline = Some(Box::new(Pipeline {
        schedule: schedule.kind.name().to_string(),
        stages: schedule.stages as u32,
        microbatches: schedule.microbatches as u32,
        passes,
        order,
        late,
        update: SubProgram {
            label: "update".into(),
            device: 0,
            program,
            blob,
        },
        averaged,
        loss: key(loss_v),
    }));
    host.program
        .validate()
        .map_err(|e| anyhow!("{model}: {e}"))?;
    Ok(host)
}
