//! Rematerialisation: choose which forward values the backward pass keeps and recompute the
//! rest from them. Three policies ([`Policy`]):
//!
//! - **Minimum cut** (the default, the formulation of PyTorch's min-cut partitioner). Each
//!   forward value `v` becomes an edge `v_in → v_out` whose capacity is its size: cutting it
//!   means saving `v`. Values the backward pass reads are joined to the sink. Values made by
//!   ops that are not worth recomputing (matmuls, softmax, norms, attention) are joined to the
//!   source, so they can only be saved. Cheap ops (elementwise, layout, gathers, reductions)
//!   join their operands' `out` to their own `in`: a value recomputed needs its operands.
//!   Parameters, inputs and constants are free. The minimum cut is the smallest set of bytes
//!   to save.
//! - **Full** (per-layer checkpointing, Hugging Face's `gradient_checkpointing`): only each
//!   layer's input is kept inside the layers ([`layers`]); everything else a layer's backward
//!   reads, GEMMs and attention included, is recomputed from it. What the backward reads
//!   outside the layers (embeddings, the LM head, the loss) is kept, as eager PyTorch does.
//! - **Budget**: at most `B` bytes of saved activations, at the fewest recomputed FLOPs. Each
//!   layer's input is kept (so recomputation never crosses a layer boundary and its working
//!   set is one layer), outside the layers the minimum cut's choice (the smallest feasible
//!   budget is these bytes, below full's); the rest of the budget is shared among
//!   the layers in proportion to what each would keep without remat, and each layer's choice
//!   is an exact 0/1 program ([`good_lp`] with the pure-Rust `microlp` solver): binary
//!   `save_v` and `recompute_v` for each value of the layer; a value the backward reads is
//!   saved or recomputed; a recomputed value's operands in the layer are saved or recomputed;
//!   `Σ bytes·save ≤ B_layer`; minimise `Σ flops·recompute` (then bytes).
//!
//! Every other value the backward pass reads is recomputed there (phase
//! [`Phase::Recompute`]), each clone just before its first reader. Recomputed values are the
//! same ops on the same operands, so losses are bitwise unchanged.

use std::collections::{HashMap, HashSet, VecDeque};

use memc_ir::{Graph, NodeId, Op, Phase, ValueId};

/// What the backward pass keeps (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// The minimum cut: cheap ops recomputed, GEMMs, norms and attention kept.
    MinCut,
    /// Per-layer checkpointing: only layer inputs kept inside the layers.
    Full,
    /// At most this many bytes of saved activations, fewest recomputed FLOPs.
    Budget(Budget),
    /// The per-layer 0/1 programs alone, without the other candidates [`Policy::Budget`]
    /// compares them with: the exact optimum of the per-layer formulation (for comparisons).
    Exact(Budget),
}

/// An activation budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Bytes.
    Bytes(u64),
    /// A fraction of the bytes saved without rematerialisation.
    Fraction(f64),
}

impl Policy {
    /// The remat pass's options as text (`policy=budget budget=0.5`).
    pub fn text(&self) -> String {
        match self {
            Policy::MinCut => "policy=auto".into(),
            Policy::Full => "policy=full".into(),
            Policy::Budget(b) => format!("policy=auto budget={}", b.text()),
            Policy::Exact(b) => format!("policy=exact budget={}", b.text()),
        }
    }
}

/// A budget that is neither bytes nor a fraction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither bytes (1500000000, 1.5GiB, 800MB) nor a fraction in (0, 1] (0.5, 50%)")]
pub struct BadBudget(pub String);

impl Budget {
    /// Parses bytes (`1500000000`, `1.5GiB`, `800MB`) or a fraction of the bytes saved
    /// without rematerialisation (`0.5`, `50%`).
    pub fn parse(text: &str) -> Result<Budget, BadBudget> {
        let t = text.trim();
        let bad = || BadBudget(text.to_string());
        if let Some(p) = t.strip_suffix('%') {
            let f: f64 = p.trim().parse().map_err(|_| bad())?;
            return (f > 0.0 && f <= 100.0)
                .then_some(Budget::Fraction(f / 100.0))
                .ok_or_else(bad);
        }
        let units = [
            ("KiB", 1u64 << 10),
            ("MiB", 1 << 20),
            ("GiB", 1 << 30),
            ("KB", 1_000),
            ("MB", 1_000_000),
            ("GB", 1_000_000_000),
            ("B", 1),
        ];
        for (suffix, scale) in units {
            if let Some(n) = t.strip_suffix(suffix) {
                let x: f64 = n.trim().parse().map_err(|_| bad())?;
                return (x >= 0.0 && x.is_finite())
                    .then(|| Budget::Bytes((x * scale as f64).round() as u64))
                    .ok_or_else(bad);
            }
        }
        if let Ok(b) = t.parse::<u64>() {
            return Ok(Budget::Bytes(b));
        }
        let f: f64 = t.parse().map_err(|_| bad())?;
        (f > 0.0 && f <= 1.0)
            .then_some(Budget::Fraction(f))
            .ok_or_else(bad)
    }

    /// The budget as text ([`Budget::parse`] gives it back).
    pub fn text(&self) -> String {
        match self {
            Budget::Bytes(b) => b.to_string(),
            Budget::Fraction(f) => f.to_string(),
        }
    }
}

/// Why the pass could not apply a policy.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RematError {
    /// The budget is below what must be kept.
    #[error(
        "the activation budget of {budget} bytes is below the smallest feasible one, {min} bytes \
         (each layer's input and the minimum cut's choice outside the layers are kept)"
    )]
    Infeasible {
        /// The budget asked for.
        budget: u64,
        /// The smallest feasible budget.
        min: u64,
    },
    /// The graph has no layers to checkpoint.
    #[error(
        "no transformer layers were recognised (no residual connection around an attention \
         or softmax), so there is no layer to checkpoint"
    )]
    NoLayers,
    /// Every layer is reversible: its backward pass reconstructs instead of keeping.
    #[error(
        "every layer is reversible, so no layer is left to checkpoint (reversible layers \
         reconstruct their activations instead)"
    )]
    AllReversible,
    /// The solver failed.
    #[error("the 0/1 program of layer {layer} failed: {msg}")]
    Solver {
        /// Which layer.
        layer: usize,
        /// The solver's message.
        msg: String,
    },
}

/// What the pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RematStats {
    /// Bytes the backward pass would keep without rematerialisation.
    pub saved_bytes_before: u64,
    /// Bytes it keeps after.
    pub saved_bytes_after: u64,
    /// Nodes cloned into the backward pass.
    pub recomputed_nodes: usize,
    /// The budget in bytes, under [`Policy::Budget`].
    pub budget_bytes: Option<u64>,
    /// The smallest feasible budget (the layer boundaries and, outside the layers, the
    /// minimum cut's choice), when the graph has layers.
    pub min_budget_bytes: Option<u64>,
    /// Layers found ([`layers`]).
    pub layers: usize,
}

const INF: u64 = u64::MAX / 4;

/// Whether recomputing `op` in the backward pass is cheaper than keeping its result (the
/// minimum cut's rule).
pub fn recomputable(op: &Op) -> bool {
    !matches!(
        op,
        Op::MatMul
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Attention { .. }
            | Op::LmHeadCe { .. }
            | Op::TopK { .. }
    )
}

/// One transformer layer of a forward graph: its input (the residual stream it starts from),
/// its output, and the forward values in between.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// The stream operand of the layer's attention `residual`.
    pub input: ValueId,
    /// The next layer's input, or the last `residual`'s result for the last layer.
    pub output: ValueId,
    /// Forward values computed from `input` on the way to `output` (both excluded).
    pub body: Vec<ValueId>,
}

/// The layers of a forward graph, found from its `residual` nodes (kept until after this
/// pass by the training builder): the residual stream. A residual whose branch computes an
/// attention (a recognised `attention`, or any `softmax`: an attention the rules did not
/// recognise is still a layer's) starts a layer at its stream operand.
pub fn layers(g: &Graph) -> Vec<Layer> {
    /// Whether the branch `v`, computed from the stream `x`, holds an attention.
    fn attends(g: &Graph, v: ValueId, x: ValueId) -> bool {
        let (mut stack, mut seen) = (vec![v], HashSet::new());
        while let Some(v) = stack.pop() {
            if v == x || !seen.insert(v) || seen.len() > 100_000 {
                continue;
            }
            let Some(p) = g.producer(v) else { continue };
            let n = g.node(p);
            if matches!(n.op, Op::Attention { .. } | Op::Softmax { .. }) {
                return true;
            }
            stack.extend(n.inputs.iter().copied());
        }
        false
    }
    let forward = |n: &memc_ir::Node| n.phase == Phase::Forward;
    let residuals: Vec<&memc_ir::Node> = g
        .nodes()
        .iter()
        .filter(|n| forward(n) && n.op == Op::Residual)
        .collect();
    let inputs: Vec<ValueId> = residuals
        .iter()
        .filter(|n| attends(g, n.inputs[1], n.inputs[0]))
        .map(|n| n.inputs[0])
        .collect();
    let Some(last) = residuals.last() else {
        return vec![];
    };
    let mut outputs: Vec<ValueId> = inputs[1.min(inputs.len())..].to_vec();
    outputs.push(last.outputs[0]);
    // Forward consumers of each value, for the descendant sweeps.
    let mut readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for (i, n) in g.nodes().iter().enumerate() {
        if forward(n) {
            for &v in &n.inputs {
                readers.entry(v).or_default().push(NodeId(i as u32));
            }
        }
    }
    inputs
        .iter()
        .zip(&outputs)
        .map(|(&input, &output)| {
            let mut below = HashSet::from([input]);
            let mut queue = VecDeque::from([input]);
            while let Some(v) = queue.pop_front() {
                for &r in readers.get(&v).into_iter().flatten() {
                    for &o in &g.node(r).outputs {
                        if below.insert(o) {
                            queue.push_back(o);
                        }
                    }
                }
            }
            let mut above = HashSet::from([output]);
            let mut stack = vec![output];
            while let Some(v) = stack.pop() {
                if let Some(p) = g.producer(v) {
                    if forward(g.node(p)) {
                        for &i in &g.node(p).inputs {
                            if above.insert(i) {
                                stack.push(i);
                            }
                        }
                    }
                }
            }
            let mut body: Vec<ValueId> = below
                .intersection(&above)
                .copied()
                .filter(|&v| v != input && v != output)
                .collect();
            body.sort();
            Layer {
                input,
                output,
                body,
            }
        })
        .collect()
}

/// Applies `policy` in place (see the module docs).
pub fn rematerialize(g: &mut Graph, policy: &Policy) -> Result<RematStats, RematError> {
    let forward_value = |g: &Graph, v: ValueId| {
        g.producer(v)
            .is_some_and(|p| g.node(p).phase == Phase::Forward)
    };
    // Forward values read outside the forward pass.
    let mut needed = Vec::new();
    let mut is_needed = HashSet::new();
    for node in g.nodes() {
        if node.phase != Phase::Forward {
            for &v in &node.inputs {
                if forward_value(g, v) && is_needed.insert(v) {
                    needed.push(v);
                }
            }
        }
    }
    let size = |g: &Graph, v: ValueId| g.value(v).ty.bytes() as u64;
    let saved_bytes_before = needed.iter().map(|&v| size(g, v)).sum();
    let layers = layers(g);
    // The floor every budget keeps: each layer boundary (layer inputs, the last layer's
    // output) unless it is free to recompute (an embedding lookup of the inputs), and
    // outside the layers the minimum cut's choice. Full checkpointing (Hugging Face's) keeps
    // every boundary and, outside the layers, everything the backward pass reads.
    let in_layer: HashMap<ValueId, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.body.iter().map(move |&v| (v, i)))
        .collect();
    let cut = min_cut(g, &needed);
    let mut floor: HashSet<ValueId> = cut
        .iter()
        .copied()
        .filter(|v| !in_layer.contains_key(v))
        .collect();
    let mut full: HashSet<ValueId> = needed
        .iter()
        .copied()
        .filter(|v| !in_layer.contains_key(v))
        .collect();
    for l in &layers {
        for v in [l.input, l.output] {
            full.insert(v);
            if !free(g, v) {
                floor.insert(v);
            }
        }
    }
    let floor_bytes = cost(g, &floor, &needed).0;
    let mut stats = RematStats {
        saved_bytes_before,
        layers: layers.len(),
        min_budget_bytes: (!layers.is_empty()).then_some(floor_bytes),
        ..RematStats::default()
    };
    let choose = |budget: u64, exact: bool| -> Result<HashSet<ValueId>, RematError> {
        // Share what the layers may keep in proportion to what each keeps without remat.
        let layer_needed: Vec<u64> = layers
            .iter()
            .map(|l| {
                l.body
                    .iter()
                    .filter(|v| is_needed.contains(v))
                    .map(|&v| size(g, v))
                    .sum()
            })
            .collect();
        let total: u64 = layer_needed.iter().sum::<u64>().max(1);
        let spare = budget - floor_bytes;
        let mut saved = floor.clone();
        for (i, l) in layers.iter().enumerate() {
            let share = (spare as u128 * layer_needed[i] as u128 / total as u128) as u64;
            let keep = solve_layer(g, l, &is_needed, share)
                .map_err(|msg| RematError::Solver { layer: i, msg })?;
            saved.extend(keep);
        }
        if exact {
            return Ok(saved);
        }
        // The per-layer programs fix each layer's share and boundary; the minimum cut and
        // keeping everything are candidates too: the fewest recomputed FLOPs within the
        // budget wins (then the fewest bytes).
        let everything: HashSet<ValueId> = needed.iter().copied().collect();
        Ok([saved, cut.clone(), everything]
            .into_iter()
            .map(|s| (cost(g, &s, &needed), s))
            .filter(|((bytes, _), _)| *bytes <= budget)
            .min_by_key(|((bytes, flops), _)| (*flops, *bytes))
            .map(|(_, s)| s)
            .expect("the per-layer choice fits the budget"))
    };
    let saved: HashSet<ValueId> = match policy {
        // The cut sets the memory; at that memory, the fewest recomputed FLOPs.
        Policy::MinCut if layers.is_empty() => cut.clone(),
        Policy::MinCut => match cost(g, &cut, &needed).0 {
            bytes if bytes < floor_bytes => cut.clone(),
            bytes => choose(bytes, false)?,
        },
        Policy::Full | Policy::Budget(_) | Policy::Exact(_) if layers.is_empty() => {
            return Err(if g.nodes().iter().any(|n| n.op == Op::RevCouple) {
                RematError::AllReversible
            } else {
                RematError::NoLayers
            })
        }
        Policy::Full => full.clone(),
        Policy::Budget(b) | Policy::Exact(b) => {
            let budget = match *b {
                Budget::Bytes(x) => x,
                Budget::Fraction(f) => (f * saved_bytes_before as f64).floor() as u64,
            };
            stats.budget_bytes = Some(budget);
            if budget < floor_bytes {
                return Err(RematError::Infeasible {
                    budget,
                    min: floor_bytes,
                });
            }
            choose(budget, matches!(policy, Policy::Exact(_)))?
        }
    };
    Ok(stats_after(g, saved, stats))
}

/// Rewrites the backward pass to keep `saved` and recompute the rest; completes `stats`.
fn stats_after(g: &mut Graph, saved: HashSet<ValueId>, mut stats: RematStats) -> RematStats {
    let n_nodes = g.nodes().len();
    let forward_value = |g: &Graph, v: ValueId| {
        g.producer(v)
            .is_some_and(|p| g.node(p).phase == Phase::Forward)
    };
    let size = |g: &Graph, v: ValueId| g.value(v).ty.bytes() as u64;
    let is_saved = |v: ValueId| saved.contains(&v);

    // Rewrite backward reads of unsaved values to recomputed clones.
    let mut clone_of: HashMap<ValueId, ValueId> = HashMap::new();
    let mut recomputed_nodes = 0;
    let mut emitted_before: Vec<(usize, Vec<NodeId>)> = Vec::new();
    for i in 0..n_nodes {
        if g.nodes()[i].phase == Phase::Forward {
            continue;
        }
        let inputs = g.nodes()[i].inputs.clone();
        let mut new_inputs = Vec::with_capacity(inputs.len());
        let mut fresh = Vec::new();
        for v in inputs {
            if forward_value(g, v) && !is_saved(v) {
                new_inputs.push(materialize(g, v, &is_saved, &mut clone_of, &mut fresh));
            } else {
                new_inputs.push(v);
            }
        }
        recomputed_nodes += fresh.len();
        g.set_inputs(NodeId(i as u32), new_inputs);
        if !fresh.is_empty() {
            emitted_before.push((i, fresh));
        }
    }
    // Put each clone just before its first reader.
    let mut order: Vec<NodeId> = Vec::with_capacity(g.nodes().len());
    let mut pending = emitted_before.into_iter().peekable();
    for i in 0..n_nodes {
        if let Some((at, _)) = pending.peek() {
            if *at == i {
                order.extend(pending.next().unwrap().1);
            }
        }
        order.push(NodeId(i as u32));
    }
    g.reorder_nodes(&order);
    g.compact();
    let saved_bytes_after = {
        let mut kept = HashSet::new();
        for node in g.nodes() {
            if node.phase != Phase::Forward {
                for &v in &node.inputs {
                    if forward_value(g, v) {
                        kept.insert(v);
                    }
                }
            }
        }
        kept.iter().map(|&v| size(g, v)).sum()
    };
    stats.saved_bytes_after = saved_bytes_after;
    stats.recomputed_nodes = recomputed_nodes;
    stats
}

/// What keeping `saved` costs: the bytes the backward pass then keeps and the FLOPs it
/// recomputes (the values it reads that are not kept, and their unkept forward operands).
pub fn cost(g: &Graph, saved: &HashSet<ValueId>, needed: &[ValueId]) -> (u64, u64) {
    let forward = |v: ValueId| {
        g.producer(v)
            .is_some_and(|p| g.node(p).phase == Phase::Forward)
    };
    let (mut kept, mut recomputed) = (HashSet::new(), HashSet::new());
    let mut stack: Vec<ValueId> = needed.to_vec();
    while let Some(v) = stack.pop() {
        if !forward(v) {
            continue;
        }
        if saved.contains(&v) {
            kept.insert(v);
        } else if recomputed.insert(v) {
            stack.extend(&g.node(g.producer(v).unwrap()).inputs);
        }
    }
    let bytes = kept.iter().map(|&v| g.value(v).ty.bytes() as u64).sum();
    let flops = recomputed
        .iter()
        .map(|&v| crate::plan::node_flops(g, g.producer(v).unwrap()))
        .sum();
    (bytes, flops)
}

/// Whether `v` is recomputed from inputs, params and constants alone by ops the minimum cut
/// recomputes (an embedding lookup): keeping it saves nothing worth its bytes.
fn free(g: &Graph, v: ValueId) -> bool {
    match g.producer(v) {
        None => true,
        Some(p) => {
            let n = g.node(p);
            n.phase == Phase::Forward && recomputable(&n.op) && n.inputs.iter().all(|&u| free(g, u))
        }
    }
}

/// The minimum cut's choice of values to keep (see the module docs).
fn min_cut(g: &Graph, needed: &[ValueId]) -> HashSet<ValueId> {
    let size = |v: ValueId| g.value(v).ty.bytes() as u64;
    // Flow network over forward values: in = 2k, out = 2k + 1, source, sink.
    let fwd: Vec<ValueId> = (0..g.values().len() as u32)
        .map(ValueId)
        .filter(|&v| {
            g.producer(v)
                .is_some_and(|p| g.node(p).phase == Phase::Forward)
        })
        .collect();
    let index: HashMap<ValueId, usize> = fwd.iter().enumerate().map(|(k, &v)| (v, k)).collect();
    let (source, sink) = (2 * fwd.len(), 2 * fwd.len() + 1);
    let mut net = FlowNet::new(2 * fwd.len() + 2);
    for (k, &v) in fwd.iter().enumerate() {
        net.add(2 * k, 2 * k + 1, size(v).max(1));
        let node = g.node(g.producer(v).unwrap());
        if recomputable(&node.op) {
            for &u in &node.inputs {
                if let Some(&ku) = index.get(&u) {
                    net.add(2 * ku + 1, 2 * k, INF);
                }
            }
        } else {
            net.add(source, 2 * k, INF);
        }
    }
    for &v in needed {
        net.add(2 * index[&v] + 1, sink, INF);
    }
    net.max_flow(source, sink);
    let reach = net.reachable(source);
    fwd.iter()
        .enumerate()
        .filter(|&(k, _)| reach[2 * k] && !reach[2 * k + 1])
        .map(|(_, &v)| v)
        .collect()
}

/// The values of `layer` to keep within `budget` bytes at the fewest recomputed FLOPs: an
/// exact 0/1 program (see the module docs).
fn solve_layer(
    g: &Graph,
    layer: &Layer,
    needed: &HashSet<ValueId>,
    budget: u64,
) -> Result<Vec<ValueId>, String> {
    use good_lp::{constraint, variable, Expression, Solution, SolverModel};
    let body: HashSet<ValueId> = layer.body.iter().copied().collect();
    let mut vars = good_lp::ProblemVariables::new();
    let save: HashMap<ValueId, good_lp::Variable> = layer
        .body
        .iter()
        .map(|&v| (v, vars.add(variable().binary())))
        .collect();
    let recompute: HashMap<ValueId, good_lp::Variable> = layer
        .body
        .iter()
        .map(|&v| (v, vars.add(variable().binary())))
        .collect();
    let bytes = |v: ValueId| g.value(v).ty.bytes() as f64;
    let flops = |v: ValueId| crate::plan::node_flops(g, g.producer(v).unwrap()) as f64;
    // Bytes only break ties between choices of equal FLOPs.
    let total_bytes: f64 = layer.body.iter().map(|&v| bytes(v)).sum::<f64>().max(1.0);
    let objective: Expression = layer
        .body
        .iter()
        .map(|&v| (flops(v) + 1.0) * recompute[&v] + (bytes(v) / total_bytes) * save[&v])
        .sum();
    let mut problem = vars.minimise(objective).using(good_lp::microlp);
    let budget_expr: Expression = layer.body.iter().map(|&v| bytes(v) * save[&v]).sum();
    problem = problem.with(constraint!(budget_expr <= budget as f64));
    for &v in &layer.body {
        if needed.contains(&v) {
            problem = problem.with(constraint!(save[&v] + recompute[&v] >= 1));
        }
        for &u in &g.node(g.producer(v).unwrap()).inputs {
            if body.contains(&u) {
                problem = problem.with(constraint!(save[&u] + recompute[&u] >= recompute[&v]));
            }
        }
    }
    let solution = problem.solve().map_err(|e| e.to_string())?;
    Ok(layer
        .body
        .iter()
        .copied()
        .filter(|v| solution.value(save[v]) > 0.5)
        .collect())
}

/// The value `v` as available in the backward pass: itself when saved or free, else a clone of
/// its producer over materialised operands (memoised). New nodes are appended to `fresh` in
/// dependency order.
fn materialize(
    g: &mut Graph,
    v: ValueId,
    is_saved: &dyn Fn(ValueId) -> bool,
    clone_of: &mut HashMap<ValueId, ValueId>,
    fresh: &mut Vec<NodeId>,
) -> ValueId {
    let Some(p) = g.producer(v) else { return v };
    if g.node(p).phase != Phase::Forward || is_saved(v) {
        return v;
    }
    if let Some(&c) = clone_of.get(&v) {
        return c;
    }
    let node = g.node(p).clone();
    let inputs: Vec<ValueId> = node
        .inputs
        .iter()
        .map(|&u| materialize(g, u, is_saved, clone_of, fresh))
        .collect();
    let types = node
        .outputs
        .iter()
        .map(|&o| g.value(o).ty.clone())
        .collect();
    let outs = g.add_node_typed(node.op.clone(), &inputs, types, node.name.clone());
    let new = g.producer(outs[0]).unwrap();
    g.set_phase(new, Phase::Recompute);
    g.set_chunk(new, node.chunk);
    fresh.push(new);
    for (&o, &c) in node.outputs.iter().zip(&outs) {
        clone_of.insert(o, c);
    }
    clone_of[&v]
}

/// A max-flow network (Dinic's algorithm).
struct FlowNet {
    head: Vec<Vec<usize>>,
    to: Vec<usize>,
    cap: Vec<u64>,
}

impl FlowNet {
    fn new(n: usize) -> FlowNet {
        FlowNet {
            head: vec![Vec::new(); n],
            to: Vec::new(),
            cap: Vec::new(),
        }
    }

    fn add(&mut self, a: usize, b: usize, c: u64) {
        self.head[a].push(self.to.len());
        self.to.push(b);
        self.cap.push(c);
        self.head[b].push(self.to.len());
        self.to.push(a);
        self.cap.push(0);
    }

    fn levels(&self, s: usize) -> Vec<i64> {
        let mut level = vec![-1i64; self.head.len()];
        level[s] = 0;
        let mut q = VecDeque::from([s]);
        while let Some(u) = q.pop_front() {
            for &e in &self.head[u] {
                if self.cap[e] > 0 && level[self.to[e]] < 0 {
                    level[self.to[e]] = level[u] + 1;
                    q.push_back(self.to[e]);
                }
            }
        }
        level
    }

    fn push(&mut self, u: usize, t: usize, f: u64, level: &[i64], it: &mut [usize]) -> u64 {
        if u == t {
            return f;
        }
        while it[u] < self.head[u].len() {
            let e = self.head[u][it[u]];
            let v = self.to[e];
            if self.cap[e] > 0 && level[v] == level[u] + 1 {
                let d = self.push(v, t, f.min(self.cap[e]), level, it);
                if d > 0 {
                    self.cap[e] -= d;
                    self.cap[e ^ 1] += d;
                    return d;
                }
            }
            it[u] += 1;
        }
        0
    }

    fn max_flow(&mut self, s: usize, t: usize) -> u64 {
        let mut flow = 0;
        loop {
            let level = self.levels(s);
            if level[t] < 0 {
                return flow;
            }
            let mut it = vec![0; self.head.len()];
            loop {
                let f = self.push(s, t, INF, &level, &mut it);
                if f == 0 {
                    break;
                }
                flow += f;
            }
        }
    }

    /// Vertices reachable from `s` in the residual network (the source side of the cut).
    fn reachable(&self, s: usize) -> Vec<bool> {
        self.levels(s).into_iter().map(|l| l >= 0).collect()
    }
}
