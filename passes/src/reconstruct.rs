//! `reconstruct`: the backward pass of a reversible stack by reconstruction (MEFT, "Make
//! Pre-trained Model Reversible", NeurIPS 2023). Runs on a training program after autodiff,
//! before rematerialisation.
//!
//! Each `rev_couple` node computes `y = s·a + f` with the branch `f` computed from the other
//! stream `b` (the latest stream value `f` depends on). Walking the couplings from the last to
//! the first, with the stack's final streams as the only forward values kept:
//!
//! 1. the branch's forward nodes (from `b` to `f`) are re-run on the reconstructed `b'`
//!    ([`Phase::Recompute`] clones);
//! 2. the stream is inverted: `a' = (y' − f')/s`, which reconstructs the layer's input;
//! 3. every backward read of those forward values (the branch's activations, `a`, `b`, `y`)
//!    reads the reconstruction instead, so the VJPs of the branches are taken on it.
//!
//! Nothing computed inside the stack is then read by the backward pass: the stack's saved
//! activations do not grow with depth. Each coupling's nodes go just before the first backward
//! node that reads them (a layer's working set is one layer). With `check`, the pass also
//! outputs each layer's reconstruction drift `max|x' − x| / max|x|` over its two inputs as
//! `memc.rev_drift.<layer>` (f32 scalars); that keeps the original inputs for the comparison.

use std::collections::{HashMap, HashSet};

use memc_ir::{BinaryOp, DType, Graph, NodeId, Op, Phase, ReduceKind, UnaryOp, ValueId};

use crate::build::Builder;

/// Prefix of the drift outputs of [`reconstruct`] with `check`.
pub const DRIFT_OUTPUT: &str = "memc.rev_drift.";

/// What [`reconstruct`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconstructStats {
    /// Couplings inverted.
    pub couplings: usize,
    /// Nodes added to re-run the branches and invert the streams.
    pub nodes: usize,
    /// Drift outputs added (one per reversible layer).
    pub drift_outputs: usize,
}

/// Why the reversible backward pass could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconstructError {
    /// A coupling is not one this pass can invert.
    #[error("`rev_couple` {node}: {why}")]
    Coupling {
        /// The coupling's name.
        node: String,
        /// Why.
        why: &'static str,
    },
    /// A node of the inversion could not be built (a memc bug).
    #[error("{0}")]
    Build(String),
}

impl From<String> for ReconstructError {
    fn from(msg: String) -> ReconstructError {
        ReconstructError::Build(msg)
    }
}

/// Rewrites the backward pass of every `rev_couple` of `g` (see the module docs). A program
/// without couplings is left alone.
pub fn reconstruct(g: &mut Graph, check: bool) -> Result<ReconstructStats, ReconstructError> {
    let forward = |g: &Graph, n: NodeId| g.node(n).phase == Phase::Forward;
    let couples: Vec<NodeId> = (0..g.nodes().len())
        .map(|i| NodeId(i as u32))
        .filter(|&n| forward(g, n) && g.node(n).op == Op::RevCouple)
        .collect();
    let mut stats = ReconstructStats::default();
    if couples.is_empty() {
        return Ok(stats);
    }
    let first_new = g.nodes().len();
    let streams: HashSet<ValueId> = couples
        .iter()
        .flat_map(|&c| [g.node(c).outputs[0], g.node(c).inputs[0]])
        .collect();
    let mut readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for (i, node) in g.nodes().iter().enumerate() {
        for &v in &node.inputs {
            readers.entry(v).or_default().push(NodeId(i as u32));
        }
    }
    let position = |g: &Graph, v: ValueId| g.producer(v).map_or(-1, |p| p.index() as i64);
    // Forward value → its reconstruction, and each coupling's new nodes.
    let mut known: HashMap<ValueId, ValueId> = HashMap::new();
    let mut subst: HashMap<ValueId, ValueId> = HashMap::new();
    let mut groups: Vec<Vec<NodeId>> = vec![];
    // (layer input, its reconstruction) pairs for the drift check, per coupling.
    let mut inverted: Vec<(usize, ValueId, ValueId)> = vec![];
    for (k, &c) in couples.iter().enumerate().rev() {
        let label = g.node_label(c);
        let node = g.node(c).clone();
        let (a, f, s, y) = (
            node.inputs[0],
            node.inputs[1],
            node.inputs[2],
            node.outputs[0],
        );
        // The driving stream: the latest stream value the branch depends on.
        let mut seen = HashSet::new();
        let mut stack = vec![f];
        let mut driver: Option<ValueId> = None;
        while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            if streams.contains(&v) {
                if driver.is_none_or(|d| position(g, v) > position(g, d)) {
                    driver = Some(v);
                }
                continue;
            }
            if let Some(p) = g.producer(v) {
                if forward(g, p) {
                    stack.extend(&g.node(p).inputs);
                }
            }
        }
        let b = driver.ok_or_else(|| ReconstructError::Coupling {
            node: label.clone(),
            why: "its branch depends on no stream of the reversible stack",
        })?;
        let y_r = *known.get(&y).unwrap_or(&y);
        let b_r = *known.get(&b).unwrap_or(&b);
        let mut group = vec![];
        let mut clone: HashMap<ValueId, ValueId> = HashMap::from([(b, b_r)]);
        for n in crate::reversible::between(g, &readers, b, f) {
            let nd = g.node(n).clone();
            let inputs: Vec<ValueId> = nd
                .inputs
                .iter()
                .map(|v| *clone.get(v).unwrap_or(v))
                .collect();
            let types = nd.outputs.iter().map(|&o| g.value(o).ty.clone()).collect();
            let outs = g.add_node_typed(nd.op.clone(), &inputs, types, nd.name.clone());
            let id = g.producer(outs[0]).unwrap();
            g.set_phase(id, Phase::Recompute);
            g.set_chunk(id, nd.chunk);
            group.push(id);
            for (&o, &cv) in nd.outputs.iter().zip(&outs) {
                clone.insert(o, cv);
            }
        }
        let f_r = *clone.get(&f).ok_or_else(|| ReconstructError::Coupling {
            node: node.name.clone(),
            why: "its branch is not computed from its stream",
        })?;
        let a_r = match known.get(&a) {
            Some(&r) => r,
            None => {
                let before = g.nodes().len();
                let mut bld = Builder::new(g, Phase::Recompute, format!("{}/inverse", node.name));
                let diff = bld.binary(BinaryOp::Sub, y_r, f_r)?;
                let r = bld.binary(BinaryOp::Div, diff, s)?;
                group.extend((before..g.nodes().len()).map(|i| NodeId(i as u32)));
                known.insert(a, r);
                inverted.push((k / 2, a, r));
                r
            }
        };
        for (v, r) in clone {
            if subst.insert(v, r).is_some_and(|old| old != r) {
                return Err(ReconstructError::Coupling {
                    node: node.name.clone(),
                    why: "a value of its branch belongs to another coupling's too",
                });
            }
        }
        subst.insert(a, a_r);
        subst.insert(y, y_r);
        stats.nodes += group.len();
        groups.push(group);
    }
    stats.couplings = couples.len();
    // Backward reads see the reconstructions.
    for i in 0..first_new {
        let n = NodeId(i as u32);
        if forward(g, n) {
            continue;
        }
        let inputs: Vec<ValueId> = g
            .node(n)
            .inputs
            .iter()
            .map(|v| *subst.get(v).unwrap_or(v))
            .collect();
        if inputs != g.node(n).inputs {
            g.set_inputs(n, inputs);
        }
    }
    if check {
        // One drift per layer (two couplings), over both of its inputs, first layer first.
        let layers = couples.len().div_ceil(2);
        for layer in 0..layers {
            let chunk: Vec<(ValueId, ValueId)> = inverted
                .iter()
                .filter(|(l, _, _)| *l == layer)
                .map(|&(_, x, r)| (x, r))
                .collect();
            let before = g.nodes().len();
            let mut bld = Builder::new(g, Phase::Backward, format!("rev_drift.{layer}"));
            let mut worst: Option<ValueId> = None;
            for &(x, r) in &chunk {
                let abs_max = |bld: &mut Builder, v: ValueId| -> Result<ValueId, String> {
                    let neg = bld.unary(UnaryOp::Neg, v)?;
                    let abs = bld.binary(BinaryOp::Max, v, neg)?;
                    let rank = bld.shape(abs).len();
                    let m = bld.op(
                        Op::Reduce {
                            kind: ReduceKind::Max,
                            axes: (0..rank).collect(),
                            keep_dims: false,
                        },
                        &[abs],
                    )?;
                    bld.op(Op::Cast { to: DType::F32 }, &[m])
                };
                let diff = bld.binary(BinaryOp::Sub, r, x)?;
                let num = abs_max(&mut bld, diff)?;
                let den = abs_max(&mut bld, x)?;
                let d = bld.binary(BinaryOp::Div, num, den)?;
                worst = Some(match worst {
                    None => d,
                    Some(w) => bld.binary(BinaryOp::Max, w, d)?,
                });
            }
            let w = worst.expect("a layer inverts at least one input");
            g.add_output(format!("{DRIFT_OUTPUT}{layer}"), w);
            stats.drift_outputs += 1;
            stats.nodes += g.nodes().len() - before;
        }
    }
    // Each coupling's nodes just before the first old node that reads one of its values; the
    // topological sort then moves anything a group needs from a later group ahead of it.
    let mut first_reader: Vec<(usize, usize)> = vec![];
    for (k, group) in groups.iter().enumerate() {
        let outs: HashSet<ValueId> = group
            .iter()
            .flat_map(|&n| g.node(n).outputs.clone())
            .collect();
        let at = (0..first_new)
            .find(|&i| g.nodes()[i].inputs.iter().any(|v| outs.contains(v)))
            .unwrap_or(first_new);
        first_reader.push((at, k));
    }
    first_reader.sort();
    let in_group: HashSet<NodeId> = groups.iter().flatten().copied().collect();
    let mut order: Vec<NodeId> = Vec::with_capacity(g.nodes().len());
    let mut next = first_reader.into_iter().peekable();
    for i in 0..g.nodes().len() {
        while let Some(&(at, k)) = next.peek() {
            if at != i {
                break;
            }
            order.extend(&groups[k]);
            next.next();
        }
        if !in_group.contains(&NodeId(i as u32)) {
            order.push(NodeId(i as u32));
        }
    }
    for (_, k) in next {
        order.extend(&groups[k]);
    }
    g.reorder_nodes(&order);
    g.sort_topologically();
    g.compact();
    Ok(stats)
}

/// The reconstruction drift worth a warning: `given`, else 1e-3 in f32 and 5e-2 in half
/// precision.
pub fn drift_threshold(given: Option<f64>, dtype: memc_ir::DType) -> f64 {
    given.unwrap_or(if dtype == memc_ir::DType::F32 {
        1e-3
    } else {
        5e-2
    })
}
