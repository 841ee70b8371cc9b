//! `stages`: a pipelined training program cut into the schedule's passes. Every node of the
//! microbatch program (built with its forward nodes' chunks set, see [`tag_chunks`]) goes
//! to the pass that runs it: forward nodes to their chunk's F pass, input-gradient and
//! recomputation nodes to its B pass, weight-gradient nodes to its W pass (or B when the
//! schedule does not split the backward). A pass may read only what the schedule guarantees
//! is done; nodes that read more (a tied weight's gradient summed over two chunks) run after
//! the passes ("late"). Each pass lists the values it reads from other passes and the values
//! it publishes, with the devices that read them. The optimizer's nodes belong to no pass.
//!
//! [`memory_plan`] places the chunks on devices as the schedule places them (device `s` holds
//! chunk `s`; interleaved 1F1B chunks `s` and `p + s`; the V shapes `s` and `2p − 1 − s`) and
//! gives each device's memory: its weights, their gradients and optimizer state, and the
//! activation bytes its chunks keep for the microbatches the schedule has in flight (the
//! schedule replayed with unit costs, each forward of chunk `c` holding `c`'s saved bytes
//! until its weight-gradient pass, or its backward when the backward is not split).

use std::collections::{HashMap, HashSet};

use memc_ir::{Graph, NodeId, Phase, ValueDef, ValueId};

use crate::partition::Partition;
use crate::pipeline::{self, Costs, Kind, Schedule, Simulation};

/// Sets the chunk ([`memc_ir::Node::chunk`]) of every forward node of `g` that `partition`
/// places; the passes that derive nodes from a node (autodiff, block lowering, precision,
/// recomputation) give them its chunk.
pub fn tag_chunks(g: &mut Graph, partition: &Partition) {
    for (i, c) in partition.node_chunk.iter().enumerate() {
        if let Some(c) = c {
            g.set_chunk(NodeId(i as u32), Some(*c as u32));
        }
    }
}

/// One pass's share of the program: its nodes, what it reads from other passes and what it
/// publishes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PassNodes {
    /// Its nodes, in program order (forward nodes that read only weights, constants and
    /// inputs are copied into every pass that reads them).
    pub nodes: Vec<NodeId>,
    /// Values it reads that other passes compute.
    pub external: Vec<ValueId>,
    /// Values it computes that other passes (or the outputs) read.
    pub publish: Vec<ValueId>,
}

/// The program cut into the schedule's passes.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    /// Each (pass kind, chunk)'s nodes.
    pub passes: HashMap<(Kind, usize), PassNodes>,
    /// Nodes that read another chunk's weight gradients (a tied head): run after the passes.
    pub late: Vec<NodeId>,
    /// Devices that read each published value (every device, for what late nodes read).
    pub consumers: HashMap<ValueId, Vec<usize>>,
    /// The device computing each output (`None`: a late node, computed everywhere).
    pub output_device: HashMap<ValueId, Option<usize>>,
    /// The devices whose passes read each parameter, by name.
    pub param_devices: HashMap<String, Vec<usize>>,
}

/// Cuts `g`, a microbatch training program whose forward nodes carry their chunk, into
/// `schedule`'s passes (see the module docs).
pub fn split(g: &Graph, schedule: &Schedule) -> StagePlan {
    let chunks = schedule.chunks();
    let split = schedule.split_backward();
    let last = chunks - 1;
    // A node's chunk: its own ([`memc_ir::Node::chunk`]); a backward node without one (the VJP
    // of a node the training builder added, such as a precision cast) takes the chunk of what
    // it reads; the rest (the loss) is the last chunk's.
    let mut chunk_of: Vec<usize> = Vec::with_capacity(g.nodes().len());
    for node in g.nodes() {
        let c = node
            .chunk
            .map(|c| c as usize)
            .unwrap_or_else(|| match node.phase {
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
    let mut param_devices: HashMap<String, Vec<usize>> = HashMap::new();
    for ((_, c), pn) in &passes {
        let d = schedule.device_of(*c);
        for &n in &pn.nodes {
            for &v in &g.node(n).inputs {
                if let ValueDef::Param { name, .. } = &g.value(v).def {
                    let r = param_devices.entry(name.clone()).or_default();
                    if !r.contains(&d) {
                        r.push(d);
                    }
                }
            }
        }
    }
    for (name, v) in g.outputs() {
        if let Some(p) = name.strip_prefix(crate::train::GRAD_OUTPUT_PREFIX) {
            if let Some(devices) = param_devices.get(p) {
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
    StagePlan {
        passes,
        late,
        consumers,
        output_device,
        param_devices,
    }
}

/// Nodes of `g` that no pass of `schedule` can run (they read another chunk's weight
/// gradients, as a tied head's gradient sum does) and that therefore run after the passes;
/// 0 for untied models (a diagnostic the tests check).
pub fn late_node_count(g: &Graph, schedule: &Schedule) -> usize {
    split(g, schedule).late.len()
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

/// Plans the pipeline of `partition` under `schedule` (see the module docs): each device's
/// chunks, weights, their state and the most activation bytes it holds at once.
pub fn memory_plan(
    schedule: Schedule,
    partition: Partition,
) -> Result<PipelinePlan, crate::pipeline::ScheduleError> {
    let p = schedule.stages;
    let sim = pipeline::simulate(&schedule, &Costs::default())?;
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
    let flop_sim = pipeline::simulate_with(&schedule, &time, 0.0)?;
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
    /// The device of the first chunk `want` picks (the embedding's, the head's).
    pub fn device_of_chunk(
        &self,
        want: impl Fn(&crate::partition::Chunk) -> bool,
    ) -> Option<usize> {
        self.partition
            .chunks
            .iter()
            .position(want)
            .map(|c| self.schedule.device_of(c))
    }
}
