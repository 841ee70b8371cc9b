//! `partition`: cuts a training program's layers into pipeline chunks balanced by cost
//! (`memc compile --pipeline-stages`). Runs inside the training builder after
//! rematerialisation, while the `residual` nodes still mark the layers ([`crate::remat::layers`]).
//!
//! Units are the layers; what comes before the first layer (the embedding, masks, rotary
//! tables) joins the first chunk and what comes after the last (the final norm, the LM head,
//! the loss) the last. A layer's cost is the FLOPs of its forward nodes times three (its
//! backward is about twice its forward); the contiguous split into `chunks` minimises the most
//! expensive chunk (dynamic programming over the cut points). Each chunk then reports its
//! layers, cost, the weights its forward nodes read (a tied embedding counts in both chunks
//! that read it) and the activation bytes its backward keeps per microbatch (forward values a
//! non-forward node reads, by producer).

use std::collections::{HashMap, HashSet};

use memc_ir::{Graph, NodeId, ParamRole, Phase, ValueDef, ValueId};

/// One chunk of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Its layers, `first..end` (0-based).
    pub layers: (usize, usize),
    /// Forward and backward FLOPs per microbatch (3 × forward).
    pub flops: u64,
    /// Bytes of the weights its forward nodes read.
    pub weight_bytes: u64,
    /// Bytes of the gradients and optimizer state of its trained weights.
    pub state_bytes: u64,
    /// Activation bytes its backward pass keeps per microbatch.
    pub saved_bytes: u64,
    /// It holds the embedding (the nodes before the first layer).
    pub embedding: bool,
    /// It holds the LM head and the loss (the nodes after the last layer).
    pub head: bool,
}

/// The chunks, in forward order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Layers found.
    pub layers: usize,
    /// The chunks.
    pub chunks: Vec<Chunk>,
    /// The chunk of each forward node of the partitioned graph (by node index; `None` for
    /// the other phases): the prologue in the first chunk, the epilogue in the last.
    pub node_chunk: Vec<Option<usize>>,
}

/// Why a program cannot be partitioned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartitionError {
    /// The program has reversible couplings.
    #[error("reversible layers are not split into pipeline stages yet")]
    Reversible,
    /// No layers were recognised.
    #[error("no transformer layers were recognised (no residual connection around an attention or softmax), so there is nothing to split into pipeline stages")]
    NoLayers,
    /// More chunks than layers.
    #[error("cannot split {layers} layers into {chunks} pipeline chunks (a chunk needs at least one layer)")]
    TooManyChunks {
        /// Layers found.
        layers: usize,
        /// Chunks asked for.
        chunks: usize,
    },
}

/// Splits `g` (a training program whose `residual` nodes are not lowered yet) into `chunks`
/// contiguous chunks of layers (see the module docs).
pub fn partition(g: &Graph, chunks: usize) -> Result<Partition, PartitionError> {
    if g.nodes().iter().any(|n| n.op == memc_ir::Op::RevCouple) {
        return Err(PartitionError::Reversible);
    }
    let layers = crate::remat::layers(g);
    if layers.is_empty() {
        return Err(PartitionError::NoLayers);
    }
    if chunks == 0 || chunks > layers.len() {
        return Err(PartitionError::TooManyChunks {
            layers: layers.len(),
            chunks,
        });
    }
    let forward = |n: NodeId| g.node(n).phase == Phase::Forward;
    // Which layer each forward value belongs to: a layer's body and its output; before the
    // first layer `None` (prologue), after the last `Some(len)` (epilogue).
    let mut layer_of: HashMap<ValueId, usize> = HashMap::new();
    for (i, l) in layers.iter().enumerate() {
        for &v in l.body.iter().chain([&l.output]) {
            layer_of.entry(v).or_insert(i);
        }
    }
    let last_output = layers.last().unwrap().output;
    // Descendants of the last layer's output are the epilogue.
    let mut epilogue: HashSet<ValueId> = HashSet::new();
    let mut frontier = vec![last_output];
    let mut readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for (i, n) in g.nodes().iter().enumerate() {
        if forward(NodeId(i as u32)) {
            for &v in &n.inputs {
                readers.entry(v).or_default().push(NodeId(i as u32));
            }
        }
    }
    while let Some(v) = frontier.pop() {
        for &r in readers.get(&v).into_iter().flatten() {
            for &o in &g.node(r).outputs {
                if !layer_of.contains_key(&o) && epilogue.insert(o) {
                    frontier.push(o);
                }
            }
        }
    }
    let n_layers = layers.len();
    // Unit of each forward node: 0 prologue, 1..=L layers, L + 1 epilogue.
    let unit_of_node = |n: NodeId| -> usize {
        let o = g.node(n).outputs[0];
        match layer_of.get(&o) {
            Some(&l) => l + 1,
            None if epilogue.contains(&o) => n_layers + 1,
            None => 0,
        }
    };
    let units = n_layers + 2;
    let is_weight = |v: ValueId| {
        matches!(
            g.value(v).def,
            ValueDef::Param {
                role: ParamRole::Weight,
                ..
            }
        )
    };
    let mut unit_flops = vec![0u64; units];
    let mut unit_saved = vec![0u64; units];
    let mut unit_weights: Vec<HashSet<ValueId>> = vec![HashSet::new(); units];
    let mut saved_seen = HashSet::new();
    // Forward nodes computed from weights and constants alone (a weight's transpose or
    // cast): they are outside the layers, and the weights they read belong to the units of
    // the nodes that read their results.
    let mut weight_only = vec![false; g.nodes().len()];
    for (i, n) in g.nodes().iter().enumerate() {
        weight_only[i] = forward(NodeId(i as u32))
            && n.inputs.iter().all(|&v| match g.producer(v) {
                Some(p) => weight_only[p.index()],
                None => !matches!(g.value(v).def, ValueDef::Input { .. }),
            });
    }
    let mut use_units: Vec<HashSet<usize>> = vec![HashSet::new(); g.nodes().len()];
    for i in (0..g.nodes().len()).rev() {
        if !weight_only[i] {
            continue;
        }
        let mut units = HashSet::new();
        for o in &g.node(NodeId(i as u32)).outputs {
            for &r in readers.get(o).into_iter().flatten() {
                if weight_only[r.index()] {
                    units.extend(use_units[r.index()].iter().copied());
                } else if forward(r) {
                    units.insert(unit_of_node(r));
                }
            }
        }
        use_units[i] = units;
    }
    for (i, n) in g.nodes().iter().enumerate() {
        let id = NodeId(i as u32);
        if forward(id) {
            let u = unit_of_node(id);
            unit_flops[u] += 3 * crate::plan::node_flops(g, id);
            for &v in &n.inputs {
                if is_weight(v) {
                    if weight_only[i] && !use_units[i].is_empty() {
                        for &w in &use_units[i] {
                            unit_weights[w].insert(v);
                        }
                    } else {
                        unit_weights[u].insert(v);
                    }
                }
            }
        } else {
            for &v in &n.inputs {
                if let Some(p) = g.producer(v) {
                    if forward(p) && saved_seen.insert(v) {
                        unit_saved[unit_of_node(p)] += g.value(v).ty.bytes() as u64;
                    }
                }
            }
        }
    }
    // A weight no forward node reads (the fused LM-head loss's head: its forward runs with its
    // gradients, `autodiff::differentiate_fused_loss`) belongs to the unit of the forward
    // values its readers derive from, and those readers count as that unit's forward work
    // (3× their FLOPs, as forward nodes do).
    let read_forward: HashSet<ValueId> = unit_weights.iter().flatten().copied().collect();
    let mut derived: Vec<Option<usize>> = Vec::with_capacity(g.nodes().len());
    for (i, n) in g.nodes().iter().enumerate() {
        let id = NodeId(i as u32);
        let unit = if forward(id) {
            Some(unit_of_node(id))
        } else {
            let producers = || n.inputs.iter().filter_map(|&v| g.producer(v));
            producers()
                .find(|&p| forward(p))
                .map(unit_of_node)
                .or_else(|| producers().find_map(|p| derived[p.index()]))
        };
        derived.push(unit);
        if forward(id) {
            continue;
        }
        let Some(u) = unit else { continue };
        // The weight itself, or the precision pass's `cast` of it (in either phase: passes
        // compute the casts they read).
        let weight_behind = |v: ValueId| -> Option<ValueId> {
            if is_weight(v) {
                return Some(v);
            }
            let p = g.node(g.producer(v)?);
            let w = *p.inputs.first()?;
            (matches!(p.op, memc_ir::Op::Cast { .. }) && is_weight(w)).then_some(w)
        };
        let own: Vec<ValueId> = n
            .inputs
            .iter()
            .filter_map(|&v| weight_behind(v))
            .filter(|w| !read_forward.contains(w))
            .collect();
        if !own.is_empty() {
            unit_weights[u].extend(own);
            unit_flops[u] += 3 * crate::plan::node_flops(g, id);
        }
    }
    // Gradient and optimizer-state bytes per trained weight: the weight's own size for its
    // gradient, plus every optimizer-state tensor named after it.
    let name = |v: ValueId| match &g.value(v).def {
        ValueDef::Param { name, .. } => name.clone(),
        _ => String::new(),
    };
    let updated: HashSet<ValueId> = g.updates().iter().map(|&(p, _)| p).collect();
    let states: Vec<(String, u64)> = g
        .values()
        .iter()
        .filter_map(|v| match &v.def {
            ValueDef::Param {
                name,
                role: ParamRole::OptimizerState,
                ..
            } => Some((name.clone(), v.ty.bytes() as u64)),
            _ => None,
        })
        .collect();
    let state_bytes = |w: ValueId| -> u64 {
        if !updated.contains(&w) {
            return 0;
        }
        let n = name(w);
        let own = [
            format!("adamw.exp_avg.{n}"),
            format!("adamw.exp_avg_sq.{n}"),
            format!("sgd.momentum.{n}"),
        ];
        g.value(w).ty.bytes() as u64
            + states
                .iter()
                .filter(|(s, _)| own.contains(s))
                .map(|(_, b)| b)
                .sum::<u64>()
    };
    // Balanced contiguous split of the layers; the prologue and epilogue ride with the first
    // and last chunk.
    let cost_of = |a: usize, b: usize| -> u64 {
        // layers a..b (0-based), as units a+1..=b
        let mut c: u64 = unit_flops[a + 1..=b].iter().sum();
        if a == 0 {
            c += unit_flops[0];
        }
        if b == n_layers {
            c += unit_flops[n_layers + 1];
        }
        c
    };
    let inf = u64::MAX;
    // best[k][b]: the smallest max cost splitting layers 0..b into k chunks; cut[k][b] its
    // last chunk's start.
    let mut best = vec![vec![inf; n_layers + 1]; chunks + 1];
    let mut cut = vec![vec![0usize; n_layers + 1]; chunks + 1];
    best[0][0] = 0;
    for k in 1..=chunks {
        for b in k..=n_layers {
            for a in (k - 1)..b {
                if best[k - 1][a] == inf {
                    continue;
                }
                let c = best[k - 1][a].max(cost_of(a, b));
                if c < best[k][b] {
                    best[k][b] = c;
                    cut[k][b] = a;
                }
            }
        }
    }
    let mut bounds = vec![];
    let mut b = n_layers;
    for k in (1..=chunks).rev() {
        let a = cut[k][b];
        bounds.push((a, b));
        b = a;
    }
    bounds.reverse();
    let chunk_of_unit = |u: usize| -> usize {
        if u == 0 {
            return 0;
        }
        if u == n_layers + 1 {
            return bounds.len() - 1;
        }
        bounds
            .iter()
            .position(|&(a, b)| u > a && u <= b)
            .expect("every layer is in a chunk")
    };
    let mut node_chunk: Vec<Option<usize>> = (0..g.nodes().len())
        .map(|i| {
            let id = NodeId(i as u32);
            forward(id).then(|| chunk_of_unit(unit_of_node(id)))
        })
        .collect();
    // Nodes computed from weights alone (a weight's transpose or cast) sit outside the
    // layers; each belongs to the chunk of its readers when they agree, so the gradient
    // through it (a weight's gradient) is computed where the weight is used.
    for i in (0..g.nodes().len()).rev() {
        if !weight_only[i] {
            continue;
        }
        let chunks: HashSet<Option<usize>> = g
            .node(NodeId(i as u32))
            .outputs
            .iter()
            .flat_map(|o| readers.get(o).into_iter().flatten())
            .map(|r| node_chunk[r.index()])
            .collect();
        if let (1, Some(&Some(c))) = (chunks.len(), chunks.iter().next()) {
            node_chunk[i] = Some(c);
        }
    }
    let chunks = bounds
        .into_iter()
        .map(|(a, b)| {
            let mut units: Vec<usize> = (a + 1..=b).collect();
            if a == 0 {
                units.push(0);
            }
            if b == n_layers {
                units.push(n_layers + 1);
            }
            let weights: HashSet<ValueId> = units
                .iter()
                .flat_map(|&u| unit_weights[u].iter().copied())
                .collect();
            Chunk {
                layers: (a, b),
                flops: cost_of(a, b),
                weight_bytes: weights.iter().map(|&w| g.value(w).ty.bytes() as u64).sum(),
                state_bytes: weights.iter().map(|&w| state_bytes(w)).sum(),
                saved_bytes: units.iter().map(|&u| unit_saved[u]).sum(),
                embedding: a == 0,
                head: b == n_layers,
            }
        })
        .collect();
    Ok(Partition {
        layers: n_layers,
        chunks,
        node_chunk,
    })
}
