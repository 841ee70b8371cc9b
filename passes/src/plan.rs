//! The static memory plan of a program: an execution order chosen to keep peak memory low,
//! liveness, and an offset for every buffer in one arena (best-fit over sizes and lifetimes,
//! as XLA's heap simulator does). The arena size is the peak, exact in bytes.
//!
//! The order is the best (lowest peak of live bytes) of three candidates: program order, a
//! greedy list schedule, and program order with each optimizer update run as soon as its
//! gradient exists. Every value gets a buffer except an optimizer update's result, which is
//! written into the buffer of the weight or state it replaces (the order puts it after every
//! other reader of that buffer), and, with [`plan_steps`], values that never leave their fused
//! kernel. Parameters, optimizer state, inputs and constants live for the whole step.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;

use memc_ir::{Graph, NodeId, Op, ParamRole, Phase, ValueDef, ValueId};

/// Buffers start at multiples of this many bytes (what GPU libraries expect) and are padded to
/// it; the padding is part of the planned (and allocated) bytes.
pub const ALIGN: u64 = 256;

/// What a buffer holds, for the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Model weights.
    Parameters,
    /// Weight gradients (the values the optimizer reads).
    Gradients,
    /// Optimizer state.
    OptimizerState,
    /// Forward values kept for the backward pass.
    SavedActivations,
    /// Everything else computed during the step.
    Transient,
    /// Inputs and constants.
    Constants,
}

impl Category {
    /// All categories, in report order.
    pub const ALL: [Category; 6] = [
        Category::Parameters,
        Category::Gradients,
        Category::OptimizerState,
        Category::SavedActivations,
        Category::Transient,
        Category::Constants,
    ];

    /// The report name.
    pub fn name(self) -> &'static str {
        match self {
            Category::Parameters => "parameters",
            Category::Gradients => "gradients",
            Category::OptimizerState => "optimizer_state",
            Category::SavedActivations => "saved_activations",
            Category::Transient => "transient",
            Category::Constants => "inputs_and_constants",
        }
    }
}

/// One buffer of the arena.
#[derive(Debug, Clone, PartialEq)]
pub struct Buffer {
    /// The value it holds.
    pub value: ValueId,
    /// Byte offset in the arena (a multiple of [`ALIGN`]).
    pub offset: u64,
    /// Bytes reserved (the value's size rounded up to [`ALIGN`]).
    pub size: u64,
    /// First step (index into [`Plan::order`]) at which it is live; 0 for persistent values.
    pub start: usize,
    /// Last step at which it is live (inclusive).
    pub end: usize,
    /// What it holds.
    pub category: Category,
}

/// The plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Nodes in execution order.
    pub order: Vec<NodeId>,
    /// Steps of the plan (one per node, or one per fused kernel with [`plan_steps`]); buffer
    /// lifetimes count in steps.
    pub steps: usize,
    /// Every buffer, sorted by value id.
    pub buffers: Vec<Buffer>,
    /// Values written into another value's buffer: (update result, target), by value.
    pub aliases: Vec<(ValueId, ValueId)>,
    /// The arena size: the step's peak memory, in bytes.
    pub peak_bytes: u64,
    /// The most bytes live at one step (the arena without fragmentation).
    pub max_live_bytes: u64,
    /// The step where live bytes peak.
    pub peak_step: usize,
    /// Live bytes per category at the peak step.
    pub at_peak: HashMap<Category, u64>,
    /// Bytes of every buffer per category (not all live at once).
    pub totals: HashMap<Category, u64>,
    /// Forward values kept for the backward pass, in bytes (unpadded): the values produced by
    /// forward nodes and read by later phases.
    pub saved_activation_bytes: u64,
}

impl Plan {
    /// Live bytes per category at every step, for plots.
    pub fn timeline(&self) -> Vec<[u64; 6]> {
        let n = self.steps.max(1);
        let mut t = vec![[0u64; 6]; n];
        for b in &self.buffers {
            let c = Category::ALL.iter().position(|&c| c == b.category).unwrap();
            for row in &mut t[b.start..=b.end.min(n - 1)] {
                row[c] += b.size;
            }
        }
        t
    }
}

fn padded(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(ALIGN) * ALIGN
}

/// Plans `g`'s memory: order, liveness and arena offsets.
pub fn plan(g: &Graph) -> Plan {
    let steps: Vec<Vec<NodeId>> = schedule(g).into_iter().map(|n| vec![n]).collect();
    plan_steps(g, &steps)
}

/// Whether `node` is a `transpose` that swaps the last two dims and nothing else: what a GEMM
/// can read through strides, so the memory plan makes it a view when only GEMMs read it.
pub fn transposed_view(g: &Graph, node: NodeId) -> bool {
    let Op::Transpose { perm } = &g.node(node).op else {
        return false;
    };
    let r = perm.len();
    r >= 2
        && (0..r).all(|d| {
            perm[d]
                == match r - d {
                    2 => r - 1,
                    1 => r - 2,
                    _ => d,
                }
        })
}

/// The nodes reading each value.
fn readers_of(g: &Graph) -> HashMap<ValueId, Vec<NodeId>> {
    let mut readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for (i, n) in g.nodes().iter().enumerate() {
        for &v in &n.inputs {
            readers.entry(v).or_default().push(NodeId(i as u32));
        }
    }
    readers
}

/// Plans `g` for a given sequence of steps, each running a group of nodes at once (a fused
/// kernel). A value produced and consumed within one group, and not an output or an update,
/// gets no buffer. The groups must be in an order where every operand is computed by an
/// earlier (or the same) group and every update runs after the other readers of its target;
/// program order of fused kernels is such an order.
pub fn plan_steps(g: &Graph, steps: &[Vec<NodeId>]) -> Plan {
    let n = steps.len();
    let mut step_of = vec![usize::MAX; g.nodes().len()];
    for (s, group) in steps.iter().enumerate() {
        for node in group {
            step_of[node.index()] = s;
        }
    }
    let order: Vec<NodeId> = steps.iter().flatten().copied().collect();
    let last = n.saturating_sub(1);
    // Values that never leave their group need no buffer.
    let mut leaves = vec![false; g.values().len()];
    for (i, node) in g.nodes().iter().enumerate() {
        for &v in &node.inputs {
            if g.producer(v)
                .is_none_or(|p| step_of[p.index()] != step_of[i])
            {
                leaves[v.index()] = true;
            }
        }
    }
    for &(_, v) in g.outputs() {
        leaves[v.index()] = true;
    }
    for &(p, v) in g.updates() {
        leaves[p.index()] = true;
        leaves[v.index()] = true;
    }

    // Update results share their target's buffer.
    let mut alias_of: HashMap<ValueId, ValueId> =
        g.updates().iter().map(|&(p, v)| (v, p)).collect();
    // A reshape that is a step of its own is a view: its result shares its operand's buffer
    // (a value is never written after it is computed), so it costs no memory and no kernel.
    // So is a transpose of the last two dims that only GEMMs read: they read the operand's
    // buffer through strides (`transposed_view`). Only for operands that are node results
    // with a buffer of their own (a weight's transpose would see its in-place update).
    let readers = readers_of(g);
    let outputs: std::collections::HashSet<ValueId> = g.outputs().iter().map(|&(_, v)| v).collect();
    let mut views: Vec<(ValueId, ValueId)> = vec![];
    let mut transposed: std::collections::HashSet<ValueId> = Default::default();
    for group in steps {
        let &[node] = &group[..] else { continue };
        let nd = g.node(node);
        let (x, y) = (nd.inputs[0], nd.outputs[0]);
        let transpose = match nd.op {
            Op::Reshape { .. } => false,
            Op::Transpose { .. } if transposed_view(g, node) => {
                let gemms_only = readers
                    .get(&y)
                    .is_some_and(|rs| rs.iter().all(|&r| matches!(g.node(r).op, Op::MatMul)));
                if !gemms_only || outputs.contains(&y) {
                    continue;
                }
                true
            }
            _ => continue,
        };
        if alias_of.contains_key(&y) || transposed.contains(&x) {
            continue;
        }
        let root = views.iter().find(|&&(v, _)| v == x).map_or(x, |&(_, r)| r);
        if matches!(g.value(root).def, ValueDef::Node { .. }) && !alias_of.contains_key(&root) {
            views.push((y, root));
            if transpose {
                transposed.insert(y);
            }
        }
    }
    alias_of.extend(views.iter().copied());
    let mut end = vec![0usize; g.values().len()];
    let mut used_later = vec![false; g.values().len()];
    for &node in &order {
        let s = step_of[node.index()];
        let nd = g.node(node);
        for &v in &nd.inputs {
            end[v.index()] = end[v.index()].max(s);
            if nd.phase != Phase::Forward {
                used_later[v.index()] = true;
            }
        }
    }
    for (_, v) in g.outputs() {
        end[v.index()] = last;
    }
    // A view keeps its operand's buffer alive as long as itself.
    for &(v, root) in &views {
        end[root.index()] = end[root.index()].max(end[v.index()]);
        used_later[root.index()] |= used_later[v.index()];
    }
    let gradients: Vec<bool> = {
        let mut is = vec![false; g.values().len()];
        for &node in &order {
            let nd = g.node(node);
            if nd.phase == Phase::Update {
                for &v in &nd.inputs {
                    if let Some(p) = g.producer(v) {
                        if matches!(g.node(p).phase, Phase::Backward | Phase::Weight) {
                            is[v.index()] = true;
                        }
                    }
                }
            }
        }
        is
    };

    let mut buffers = Vec::new();
    let mut saved_activation_bytes = 0u64;
    for (i, v) in g.values().iter().enumerate() {
        let id = ValueId(i as u32);
        let internal = matches!(v.def, ValueDef::Node { .. }) && !leaves[i];
        if alias_of.contains_key(&id) || internal {
            continue;
        }
        let size = padded(v.ty.bytes());
        let (start, stop, category) = match &v.def {
            ValueDef::Param {
                role: ParamRole::Weight,
                ..
            } => (0, last, Category::Parameters),
            ValueDef::Param {
                role: ParamRole::OptimizerState,
                ..
            } => (0, last, Category::OptimizerState),
            ValueDef::Param {
                role: ParamRole::Constant,
                ..
            }
            | ValueDef::Const(_)
            | ValueDef::Input { .. } => (0, last, Category::Constants),
            ValueDef::Node { node, .. } => {
                let s = step_of[node.index()];
                let phase = g.node(*node).phase;
                let category = if phase == Phase::Forward && used_later[i] {
                    saved_activation_bytes += v.ty.bytes() as u64;
                    Category::SavedActivations
                } else if gradients[i] {
                    Category::Gradients
                } else {
                    Category::Transient
                };
                (s, end[i].max(s), category)
            }
        };
        buffers.push(Buffer {
            value: id,
            offset: 0,
            size,
            start,
            end: stop,
            category,
        });
    }
    let peak_bytes = assign_offsets(&mut buffers);

    let mut live = vec![0u64; n.max(1)];
    for b in &buffers {
        for l in &mut live[b.start..=b.end.min(n.max(1) - 1)] {
            *l += b.size;
        }
    }
    let (peak_step, &max_live_bytes) = live
        .iter()
        .enumerate()
        .max_by_key(|&(s, l)| (*l, Reverse(s)))
        .unwrap();
    let mut at_peak = HashMap::new();
    let mut totals = HashMap::new();
    for b in &buffers {
        *totals.entry(b.category).or_insert(0) += b.size;
        if b.start <= peak_step && peak_step <= b.end {
            *at_peak.entry(b.category).or_insert(0) += b.size;
        }
    }
    Plan {
        order,
        steps: n,
        buffers,
        aliases: {
            // In value order: the plan's text is the same on every run.
            let mut a: Vec<(ValueId, ValueId)> = alias_of.into_iter().collect();
            a.sort();
            a
        },
        peak_bytes,
        max_live_bytes,
        peak_step,
        at_peak,
        totals,
        saved_activation_bytes,
    }
}

/// Global decreasing-size best-fit: buffers are placed largest first, each in the smallest gap
/// between buffers whose lifetimes overlap its own (or on top). Buffers live for the whole
/// step are stacked at the bottom first. Returns the arena size.
/// Gives each buffer an offset (persistent ones first, then the others first-fit by size
/// into the gaps their lifetimes allow) and returns the arena size.
pub fn assign_offsets(buffers: &mut [Buffer]) -> u64 {
    let last = buffers.iter().map(|b| b.end).max().unwrap_or(0);
    let whole = |b: &Buffer| b.start == 0 && b.end == last;
    let mut idx: Vec<usize> = (0..buffers.len()).collect();
    idx.sort_by_key(|&i| {
        (
            !whole(&buffers[i]),
            Reverse(buffers[i].size),
            Reverse(buffers[i].end - buffers[i].start),
            buffers[i].start,
            i,
        )
    });
    let mut base = 0u64;
    let mut arena = 0u64;
    // Placed buffers in offset order, so the gaps can be read off in one pass.
    let mut placed: Vec<(u64, u64, usize, usize)> = Vec::with_capacity(buffers.len()); // (offset, end offset, start, end)
    for i in idx {
        let (s, e, size) = (buffers[i].start, buffers[i].end, buffers[i].size);
        if whole(&buffers[i]) {
            buffers[i].offset = base;
            base += size;
            arena = arena.max(base);
            continue;
        }
        let mut best: Option<(u64, u64)> = None; // (gap size, offset)
        let mut cursor = base;
        for &(lo, hi, bs, be) in &placed {
            if bs > e || be < s {
                continue;
            }
            if lo > cursor && lo - cursor >= size && best.is_none_or(|(g, _)| lo - cursor < g) {
                best = Some((lo - cursor, cursor));
            }
            cursor = cursor.max(hi);
        }
        let offset = best.map_or(cursor, |(_, o)| o);
        buffers[i].offset = offset;
        arena = arena.max(offset + size);
        let at = placed.partition_point(|p| p.0 < offset);
        placed.insert(at, (offset, offset + size, s, e));
    }
    arena
}

/// Execution order: the candidate with the lowest peak of live bytes among the program order,
/// a greedy list schedule that runs, among ready nodes, the one that adds the fewest live bytes,
/// and a list schedule that runs optimizer updates as soon as their gradient is ready (freeing
/// it). Every optimizer update of a buffer runs after the buffer's other readers.
fn schedule(g: &Graph) -> Vec<NodeId> {
    let n = g.nodes().len();
    let program: Vec<NodeId> = (0..n).map(|i| NodeId(i as u32)).collect();
    let mut best = (live_peak(g, &program), program);
    let greedy = greedy_order(g);
    let eager = eager_update_order(g);
    for candidate in [greedy, eager] {
        let peak = live_peak(g, &candidate);
        if peak < best.0 {
            best = (peak, candidate);
        }
    }
    best.1
}

/// Program order, except that each optimizer-update node runs right after the last
/// non-update node it depends on (its gradient), and update nodes that depend on no gradient
/// (`β1·m`, `p·(1 − lr·wd)`) run right before their first consumer. Gradients are then freed
/// as soon as they are produced.
fn eager_update_order(g: &Graph) -> Vec<NodeId> {
    let n = g.nodes().len();
    let is_update = |i: usize| g.nodes()[i].phase == Phase::Update;
    let preds_of = |i: usize| {
        g.nodes()[i]
            .inputs
            .iter()
            .filter_map(|&v| g.producer(v))
            .map(|p| p.index())
    };
    // Key: where in program order a node wants to run (fractional positions as (index, 1)).
    let mut key: Vec<Option<usize>> = vec![None; n];
    for i in 0..n {
        key[i] = if is_update(i) {
            preds_of(i).filter_map(|p| key[p]).max()
        } else {
            Some(i)
        };
    }
    let mut succs: Vec<Vec<usize>> = vec![Vec::new(); n];
    for i in 0..n {
        for p in preds_of(i) {
            succs[p].push(i);
        }
    }
    for i in (0..n).rev() {
        if key[i].is_none() {
            key[i] = Some(succs[i].iter().filter_map(|&s| key[s]).min().unwrap_or(n));
        }
    }
    let (mut preds, succs) = dependencies(g);
    let prio = |i: usize| (key[i].unwrap(), !is_update(i), i);
    let mut heap: BinaryHeap<Reverse<(usize, bool, usize)>> = (0..n)
        .filter(|&i| preds[i] == 0)
        .map(|i| Reverse(prio(i)))
        .collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse((_, _, i))) = heap.pop() {
        order.push(NodeId(i as u32));
        for &s in &succs[i] {
            preds[s] -= 1;
            if preds[s] == 0 {
                heap.push(Reverse(prio(s)));
            }
        }
    }
    order
}

/// Predecessor counts and successor lists: data dependencies plus [`update_edges`].
fn dependencies(g: &Graph) -> (Vec<usize>, Vec<Vec<usize>>) {
    let n = g.nodes().len();
    let mut preds = vec![0usize; n];
    let mut succs: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, node) in g.nodes().iter().enumerate() {
        for &v in &node.inputs {
            if let Some(p) = g.producer(v) {
                succs[p.index()].push(i);
                preds[i] += 1;
            }
        }
    }
    for (a, b) in update_edges(g) {
        succs[a].push(b);
        preds[b] += 1;
    }
    (preds, succs)
}

/// Extra ordering edges: an update's producer runs after every other reader of its target.
fn update_edges(g: &Graph) -> Vec<(usize, usize)> {
    let mut edges = Vec::new();
    for &(p, v) in g.updates() {
        let Some(writer) = g.producer(v) else {
            continue;
        };
        for (i, node) in g.nodes().iter().enumerate() {
            if i != writer.index() && node.inputs.contains(&p) {
                edges.push((i, writer.index()));
            }
        }
    }
    edges
}

fn node_bytes(g: &Graph, node: usize) -> i64 {
    g.nodes()[node]
        .outputs
        .iter()
        .map(|&o| padded(g.value(o).ty.bytes()) as i64)
        .sum()
}

fn is_persistent(g: &Graph, v: ValueId) -> bool {
    !matches!(g.value(v).def, ValueDef::Node { .. })
}

fn greedy_order(g: &Graph) -> Vec<NodeId> {
    let n = g.nodes().len();
    let (mut preds, succs) = dependencies(g);
    let mut readers_left: HashMap<ValueId, usize> = HashMap::new();
    for node in g.nodes() {
        let mut seen = Vec::new();
        for &v in &node.inputs {
            if !seen.contains(&v) {
                seen.push(v);
                *readers_left.entry(v).or_insert(0) += 1;
            }
        }
    }
    let kept: std::collections::HashSet<ValueId> = g
        .outputs()
        .iter()
        .map(|&(_, v)| v)
        .chain(g.updates().iter().map(|&(_, v)| v))
        .collect();
    let delta = |readers_left: &HashMap<ValueId, usize>, i: usize| -> i64 {
        let node = &g.nodes()[i];
        let mut freed = 0i64;
        let mut seen = Vec::new();
        for &v in &node.inputs {
            if seen.contains(&v) || is_persistent(g, v) || kept.contains(&v) {
                continue;
            }
            seen.push(v);
            if readers_left.get(&v) == Some(&1) {
                freed += padded(g.value(v).ty.bytes()) as i64;
            }
        }
        node_bytes(g, i) - freed
    };
    let mut heap: BinaryHeap<Reverse<(i64, usize)>> = (0..n)
        .filter(|&i| preds[i] == 0)
        .map(|i| Reverse((delta(&readers_left, i), i)))
        .collect();
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse((d, i))) = heap.pop() {
        if done[i] {
            continue;
        }
        let now = delta(&readers_left, i);
        if now != d {
            heap.push(Reverse((now, i)));
            continue;
        }
        done[i] = true;
        order.push(NodeId(i as u32));
        let mut seen = Vec::new();
        for &v in &g.nodes()[i].inputs {
            if !seen.contains(&v) {
                seen.push(v);
                *readers_left.get_mut(&v).unwrap() -= 1;
            }
        }
        for &s in &succs[i] {
            preds[s] -= 1;
            if preds[s] == 0 {
                heap.push(Reverse((delta(&readers_left, s), s)));
            }
        }
    }
    debug_assert_eq!(order.len(), n, "the graph has a cycle");
    order
}

/// The most bytes of node results live at once under `order` (persistent values excluded,
/// as they are the same under every order).
fn live_peak(g: &Graph, order: &[NodeId]) -> u64 {
    let n = order.len();
    let mut step_of = vec![0usize; g.nodes().len()];
    for (s, node) in order.iter().enumerate() {
        step_of[node.index()] = s;
    }
    let mut end = vec![0usize; g.values().len()];
    for (s, node) in order.iter().enumerate() {
        for &v in &g.node(*node).inputs {
            end[v.index()] = end[v.index()].max(s);
        }
    }
    for (_, v) in g.outputs() {
        end[v.index()] = n;
    }
    let mut delta = vec![0i64; n + 2];
    for (i, v) in g.values().iter().enumerate() {
        if let ValueDef::Node { node, .. } = v.def {
            let s = step_of[node.index()];
            let e = end[i].max(s);
            delta[s] += padded(v.ty.bytes()) as i64;
            delta[e + 1] -= padded(v.ty.bytes()) as i64;
        }
    }
    let mut live = 0i64;
    let mut peak = 0i64;
    for d in delta {
        live += d;
        peak = peak.max(live);
    }
    peak as u64
}

/// Floating-point operations of one node (multiply-adds count 2).
pub fn node_flops(g: &Graph, node: NodeId) -> u64 {
    let nd = g.node(node);
    let out = &g.value(nd.outputs[0]).ty;
    match &nd.op {
        Op::MatMul => {
            let a = &g.value(nd.inputs[0]).ty;
            let k = *a.shape.last().unwrap_or(&1) as u64;
            2 * k * out.numel() as u64
        }
        Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::LayerNorm { .. } => 5 * out.numel() as u64,
        Op::RmsNorm { .. } => 4 * out.numel() as u64,
        Op::AttentionLse { .. } => {
            let q = &g.value(nd.inputs[0]).ty.shape;
            let k = &g.value(nd.inputs[1]).ty.shape;
            let rows = (q[0] * q[1] * q[2] * k[2]) as u64;
            2 * rows * q[3] as u64 + 3 * rows
        }
        Op::Attention { .. } | Op::AttentionGrad { .. } => {
            // q·kᵀ and p·v: 2·B·H·S·T·(D + Dv), plus the softmax.
            let q = &g.value(nd.inputs[0]).ty.shape;
            let k = &g.value(nd.inputs[1]).ty.shape;
            let v = &g.value(nd.inputs[2]).ty.shape;
            let rows = (q[0] * q[1] * q[2] * k[2]) as u64;
            2 * rows * (q[3] + v[3]) as u64 + 5 * rows
        }
        Op::SwigluFfn | Op::GeluFfn { .. } => {
            // The steps' GEMMs (2·rows·d·f per input projection, 2·rows·f·e for the output
            // one) and elementwise ops.
            let ty = |i: usize| &g.value(nd.inputs[i]).ty;
            let x = ty(0);
            let d = *x.shape.last().unwrap_or(&1) as u64;
            let rows = x.numel() as u64 / d.max(1);
            let f = ty(1).shape[1] as u64;
            let e = *out.shape.last().unwrap_or(&1) as u64;
            let projections = if nd.inputs.len() == 4 { 2 } else { 1 };
            2 * rows * f * (projections * d + e) + 3 * rows * f + rows * e
        }
        Op::Rope => 3 * out.numel() as u64,
        Op::TopK { .. } => {
            // The kernel ranks each element against its row.
            let x = &g.value(nd.inputs[0]).ty;
            x.numel() as u64 * *x.shape.last().unwrap_or(&1) as u64
        }
        Op::MocFfn { k, .. } => {
            let x = &g.value(nd.inputs[0]).ty;
            let d = *x.shape.last().unwrap_or(&1) as u64;
            let rows = x.numel() as u64 / d.max(1);
            let f = g.value(nd.inputs[1]).ty.shape[1] as u64;
            let e = *out.shape.last().unwrap_or(&1) as u64;
            2 * rows * f * (2 * d + e) + rows * f * f + 3 * rows * *k as u64
        }
        Op::Residual => out.numel() as u64,
        Op::RevCouple => 2 * out.numel() as u64,
        Op::LmHeadCe { .. } => {
            let h = &g.value(nd.inputs[0]).ty.shape;
            let v = g.value(nd.inputs[1]).ty.shape[1] as u64;
            let n = h[0] as u64;
            2 * n * h[1] as u64 * v + 5 * n * v
        }
        Op::Reduce { .. } => g.value(nd.inputs[0]).ty.numel() as u64,
        Op::Unary(_) | Op::Binary(_) | Op::Where => out.numel() as u64,
        _ => 0,
    }
}

/// Total floating-point operations of the nodes in `phases`.
pub fn flops(g: &Graph, phases: &[Phase]) -> u64 {
    (0..g.nodes().len())
        .map(|i| NodeId(i as u32))
        .filter(|&n| phases.contains(&g.node(n).phase))
        .map(|n| node_flops(g, n))
        .sum()
}

/// The plan as text (`memc compile --emit plan`, the `plan` pass): the execution order and every buffer (value, type, offset, size, live steps,
/// category). Value numbers are those of the textual IR.
pub fn text(g: &Graph, plan: &Plan) -> String {
    let mut s = format!(
        "plan {{ peak_bytes = {}, steps = {} }}\n",
        plan.peak_bytes, plan.steps
    );
    for (step, &n) in plan.order.iter().enumerate() {
        let node = g.node(n);
        let outs: Vec<String> = node.outputs.iter().map(|o| format!("%{}", o.0)).collect();
        let tag = if node.phase == Phase::Forward {
            String::new()
        } else {
            format!(" @{}", node.phase.tag())
        };
        let _ = writeln!(
            s,
            "  step {step}: {} = {}{tag}",
            outs.join(", "),
            node.op.name()
        );
    }
    for b in &plan.buffers {
        let _ = writeln!(
            s,
            "  buffer %{} : {} offset {} size {} live {}..{} {}",
            b.value.0,
            g.value(b.value).ty,
            b.offset,
            b.size,
            b.start,
            b.end,
            b.category.name()
        );
    }
    for (v, target) in &plan.aliases {
        let _ = writeln!(s, "  alias %{} -> %{}", v.0, target.0);
    }
    s
}
