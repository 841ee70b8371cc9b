//! Lowering a pipelined training step to the runtime's program format: the microbatch
//! program cut into the schedule's passes ([`memc_passes::stages`]), each pass a program of
//! its own, the gradient sums over chunks ("late") one more and the optimizer one per stage and
//! replica ([`optimizer_shards`]: each stage updates the weights it reads, each replica a share
//! of them), all under one
//! step program whose [`Pipeline`] the runtime's executor
//! ([`memc_runtime::pipeline::Pipelined`]) runs. How each pass program is produced is the
//! caller's choice: generated kernels ([`crate::host::lower`]) or an interface for the
//! reference interpreter ([`crate::host::interface`], [`crate::reference`]).
//!
//! Values cross passes under typed keys ([`ExchangeKey`]); the program format spells them
//! `x.N`.

use std::collections::{HashMap, HashSet};

use memc_ir::{Graph, NodeId, ParamRole, Phase, ValueDef, ValueId};
use memc_passes::pipeline::{Kind, Schedule};
use memc_passes::stages::StagePlan;
use memc_runtime::program::{Param, Pipeline, Program, Slot, SubProgram, Training};

use crate::host::HostProgram;
use crate::kernel::KernelError;

/// The key of a value exchanged between passes: the value of the microbatch program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExchangeKey(pub ValueId);

impl ExchangeKey {
    /// Its name in pass programs (`x.N`).
    pub fn name(self) -> String {
        format!("x.{}", self.0 .0)
    }

    /// The key a pass program's input or output name stands for, if it is one.
    pub fn parse(name: &str) -> Option<ExchangeKey> {
        name.strip_prefix("x.")?
            .parse()
            .ok()
            .map(|n| ExchangeKey(ValueId(n)))
    }
}

/// The step a pipelined program runs, per replica: `rows` rows of the token input, and the
/// data-parallel `replicas` its optimizer is sharded over (1: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepShape {
    /// Rows of the token input (one replica's share of the batch).
    pub rows: usize,
    /// Data-parallel replicas.
    pub replicas: usize,
}

/// The optimizer's nodes of each (stage, replica), as [`optimizer_shards`] cuts them.
type Shards = Vec<((usize, usize), Vec<NodeId>)>;

/// One pass's graph, as [`lower`] cut it: its label (`F0`, `B1`, `W1`, `late`, `U0`, `U0.1`) and
/// the sub-graph its program runs.
pub struct PassGraph {
    /// The label.
    pub label: String,
    /// The sub-graph.
    pub graph: Graph,
}

fn err(model: &str, msg: impl std::fmt::Display) -> KernelError {
    KernelError::Link(format!("{model}: {msg}"))
}

/// The sub-graph of `g` made of `nodes` (in order): operands computed by nodes outside it
/// become inputs named by their [`ExchangeKey`], model inputs keep their names, weights and optimizer state
/// become data-less params of the same name (their values come from the step at run time),
/// constants keep their data; `outputs` are named by their keys; `updates` (of `g`) whose
/// values it computes are kept.
pub fn extract(g: &Graph, nodes: &[NodeId], outputs: &[ValueId]) -> Graph {
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
            ValueDef::Node { .. } => sub.add_input(ExchangeKey(v).name(), val.ty.clone()),
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
        let id = NodeId(sub.nodes().len() as u32 - 1);
        sub.set_phase(id, node.phase);
        for (&o, new) in node.outputs.iter().zip(outs) {
            map.insert(o, new);
        }
    }
    for &v in outputs {
        let m = operand(&mut sub, &mut map, v);
        sub.add_output(ExchangeKey(v).name(), m);
    }
    for &(p, v) in g.updates() {
        if let (Some(&pm), Some(&vm)) = (map.get(&p), map.get(&v)) {
            sub.add_update(pm, vm);
        }
    }
    sub
}

/// Lowers the pipelined step: `g` is the microbatch program (forward nodes tagged by chunk),
/// `stages` its cut into `schedule`'s passes ([`memc_passes::stages::split`]); each pass, the
/// gradient sums and the optimizer become programs through `lower_pass`; the step's program
/// holds one replica's inputs (`shape.rows` rows of the token input), the loss, every weight
/// and optimizer state, `training` and the pipeline. Returns it with each pass's graph (in the
/// order of the pipeline's passes, then `late`, then the updates); `shape` gives the rows and
/// the data-parallel replicas the optimizer is sharded over. The kernels of the parts are
/// shared ([`HostProgram::combine`]).
pub fn lower(
    g: &Graph,
    schedule: &Schedule,
    stages: &StagePlan,
    training: Training,
    shape: StepShape,
    model: &str,
    lower_pass: &mut dyn FnMut(&Graph) -> Result<HostProgram, KernelError>,
) -> Result<(HostProgram, Vec<PassGraph>), KernelError> {
    let StepShape { rows, replicas } = shape;
    let plan = stages;
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
    let verify = |sub: &Graph, what: &str| -> Result<(), KernelError> {
        memc_ir::verify(sub).map_err(|e| err(model, format!("pipelined pass {what}: {e}")))
    };
    let mut graphs: Vec<PassGraph> = vec![];
    // The passes.
    let mut published: HashSet<ValueId> = HashSet::new();
    let mut parts = vec![];
    let mut subs: Vec<(String, u32)> = vec![];
    for &k in &keys {
        let pn = &plan.passes[&k];
        let sub = extract(g, &pn.nodes, &pn.publish);
        verify(&sub, &label(k))?;
        published.extend(pn.publish.iter().copied());
        parts.push(lower_pass(&sub).map_err(|e| err(model, format!("pass {}: {e}", label(k))))?);
        subs.push((label(k), schedule.device_of(k.1) as u32));
        graphs.push(PassGraph {
            label: label(k),
            graph: sub,
        });
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
        // The gradient sums run on other stages than the weights' own, whose copies only a
        // stage's replicas keep up to date: the sums may read no trained weight.
        let trained: HashSet<&str> = g
            .updates()
            .iter()
            .filter_map(|&(p, _)| match &g.value(p).def {
                ValueDef::Param { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        for v in sub.values() {
            if let ValueDef::Param { name, .. } = &v.def {
                if trained.contains(name.as_str()) {
                    return Err(err(
                        model,
                        format!("the gradient sums over chunks read the trained weight `{name}` (a memc bug)"),
                    ));
                }
            }
        }
        published.extend(outs.iter().copied());
        let p = lower_pass(&sub).map_err(|e| err(model, format!("the gradient sums: {e}")))?;
        graphs.push(PassGraph {
            label: "late".into(),
            graph: sub,
        });
        Some(p)
    };
    let has_late = late.is_some();
    parts.extend(late);
    let loss_v = g
        .outputs()
        .first()
        .map(|&(_, v)| v)
        .ok_or_else(|| err(model, "the training program has no loss"))?;
    let mut averaged = vec![ExchangeKey(loss_v)];
    let groups =
        optimizer_shards(g, plan, schedule, &updates, replicas).map_err(|e| err(model, e))?;
    let mut update_subs: Vec<(String, u32, u32)> = vec![];
    for ((stage, shard), nodes) in &groups {
        let label = if replicas > 1 {
            format!("U{stage}.{shard}")
        } else {
            format!("U{stage}")
        };
        let update = extract(g, nodes, &[]);
        verify(&update, &label)?;
        for &v in update.inputs() {
            if let ValueDef::Input { name } = &update.value(v).def {
                if let Some(k) = ExchangeKey::parse(name) {
                    if !averaged.contains(&k) {
                        averaged.push(k);
                    }
                }
            }
        }
        parts.push(
            lower_pass(&update).map_err(|e| err(model, format!("the optimizer ({label}): {e}")))?,
        );
        update_subs.push((label.clone(), *stage as u32, *shard as u32));
        graphs.push(PassGraph {
            label,
            graph: update,
        });
    }
    for a in &averaged {
        if !published.contains(&a.0) {
            return Err(err(
                model,
                format!(
                    "no pass outputs `{}`, which the optimizer reads (a memc bug)",
                    a.name()
                ),
            ));
        }
    }
    // The step's interface: the whole batch, the loss, every weight and optimizer state.
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
            return Err(err(
                model,
                format!("a pipelined step feeds only token ids; the model also takes `{name}`"),
            ));
        }
        inputs.push(place(name, crate::host::dtype(ty.dtype), shape));
    }
    let loss_ty = &g.value(loss_v).ty;
    let outputs = vec![place(
        &training.loss_output,
        crate::host::dtype(loss_ty.dtype),
        loss_ty.shape.clone(),
    )];
    let mut params: Vec<Param> = vec![];
    let mut seen: HashMap<String, usize> = HashMap::new();
    for p in &parts {
        for q in &p.program.params {
            match seen.get(&q.slot.name) {
                // The pass that updates a weight need not be the first that reads it.
                Some(&i) => params[i].updated |= q.updated,
                None => {
                    seen.insert(q.slot.name.clone(), params.len());
                    params.push(Param {
                        slot: place(&q.slot.name, q.slot.dtype, q.slot.shape.clone()),
                        role: q.role,
                        updated: q.updated,
                    });
                }
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
        eval: None,
        checkpoint: Default::default(),
        index_bounds: vec![],
        results: vec![],
        blob: vec![],
    };
    let (mut host, programs) = HostProgram::combine(top, parts);
    let mut programs = programs.into_iter();
    let passes: Vec<SubProgram> = subs
        .into_iter()
        .zip(programs.by_ref())
        .map(|((label, device), (program, blob))| SubProgram {
            label,
            device,
            shard: 0,
            program,
            blob,
        })
        .collect();
    let late = has_late.then(|| {
        let (program, blob) = programs.next().expect("the gradient sums");
        SubProgram {
            label: "late".into(),
            device: 0,
            shard: 0,
            program,
            blob,
        }
    });
    let updates: Vec<SubProgram> = update_subs
        .into_iter()
        .zip(programs)
        .map(|((label, device, shard), (program, blob))| SubProgram {
            label,
            device,
            shard,
            program,
            blob,
        })
        .collect();
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
        updates,
        averaged: averaged.iter().map(|a| a.name()).collect(),
        loss: ExchangeKey(loss_v).name(),
        data_parallel: replicas as u32,
    }));
    host.program.validate().map_err(|e| err(model, e))?;
    Ok((host, graphs))
}

/// The optimizer's nodes cut into one program per (stage, replica): ZeRO stage 1 at tensor
/// granularity (as PyTorch's `ZeroRedundancyOptimizer` partitions parameters). Each trained
/// weight's update, with the optimizer state it reads and writes, goes to every stage whose
/// passes read the weight (a tied weight is updated on each, from the same gradient, to the
/// same bits) and, within a stage, to one replica: the weights in decreasing size, each to
/// the replica holding the fewest bytes so far. Returns the groups in (stage, replica)
/// order, each group's nodes in program order; groups that would be empty are left out.
fn optimizer_shards(
    g: &Graph,
    plan: &StagePlan,
    schedule: &Schedule,
    updates: &[NodeId],
    replicas: usize,
) -> Result<Shards, String> {
    let stages = schedule.stages;
    let is_update: HashSet<NodeId> = updates.iter().copied().collect();
    // The optimizer nodes each value depends on (its backward slice inside the optimizer).
    let slice = |v: ValueId| -> HashSet<NodeId> {
        let mut seen = HashSet::new();
        let mut todo: Vec<ValueId> = vec![v];
        while let Some(v) = todo.pop() {
            if let Some(n) = g.producer(v).filter(|n| is_update.contains(n)) {
                if seen.insert(n) {
                    todo.extend(g.node(n).inputs.iter().copied());
                }
            }
        }
        seen
    };
    let param_name = |v: ValueId| match &g.value(v).def {
        ValueDef::Param { name, role, .. } => Some((name.clone(), *role)),
        _ => None,
    };
    // Trained weights and their slices; then each piece of optimizer state joins the weight
    // whose update reads its new value.
    let mut weights: Vec<(String, HashSet<NodeId>, u64)> = vec![];
    for &(p, v) in g.updates() {
        if let Some((name, ParamRole::Weight)) = param_name(p) {
            weights.push((name, slice(v), g.value(p).ty.bytes() as u64));
        }
    }
    for &(p, v) in g.updates() {
        let Some((name, role)) = param_name(p) else {
            continue;
        };
        if role == ParamRole::Weight {
            continue;
        }
        let producer = g.producer(v).filter(|n| is_update.contains(n));
        let owner = weights
            .iter_mut()
            .find(|w| producer.is_some_and(|n| w.1.contains(&n)))
            .ok_or_else(|| {
                format!("optimizer state `{name}` is not read by any weight's update (a memc bug)")
            })?;
        owner.1.extend(slice(v));
        owner.2 += g.value(p).ty.bytes() as u64;
    }
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        weights[b]
            .2
            .cmp(&weights[a].2)
            .then(weights[a].0.cmp(&weights[b].0))
    });
    let mut load = vec![vec![0u64; replicas.max(1)]; stages];
    let mut groups: HashMap<(usize, usize), HashSet<NodeId>> = HashMap::new();
    for i in order {
        let (name, nodes, bytes) = &weights[i];
        // The stages whose passes read the weight (the gradient sums read none).
        let on = plan
            .param_devices
            .get(name)
            .cloned()
            .unwrap_or_else(|| vec![0]);
        for d in on {
            let shard = (0..replicas.max(1))
                .min_by_key(|&k| (load[d][k], k))
                .expect("one replica");
            load[d][shard] += bytes;
            groups.entry((d, shard)).or_default().extend(nodes);
        }
    }
    let mut out: Vec<((usize, usize), Vec<NodeId>)> = groups
        .into_iter()
        .map(|(k, set)| {
            let mut v: Vec<NodeId> = set.into_iter().collect();
            v.sort();
            (k, v)
        })
        .collect();
    out.sort_by_key(|(k, _)| *k);
    Ok(out)
}
