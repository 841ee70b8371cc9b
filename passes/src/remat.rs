//! Rematerialisation: choose which forward values the backward pass keeps and recompute the
//! rest from them, by a minimum cut over the forward graph (the formulation of PyTorch's
//! min-cut partitioner).
//!
//! Each forward value `v` becomes an edge `v_in → v_out` whose capacity is its size: cutting
//! it means saving `v`. Values the backward pass reads are joined to the sink. Values made by
//! ops that are not worth recomputing (matmuls, softmax, norms) are joined to the source, so
//! they can only be saved. Cheap ops (elementwise, layout, gathers, reductions) join their
//! operands' `out` to their own `in`: a value recomputed needs its operands. Parameters,
//! inputs and constants are free. The minimum cut is the smallest set of bytes to save; every
//! other value the backward pass reads is recomputed there (phase [`Phase::Recompute`]).

use std::collections::{HashMap, VecDeque};

use memc_ir::{Graph, NodeId, Op, Phase, ValueId};

/// What the pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RematStats {
    /// Bytes the backward pass would keep without rematerialisation.
    pub saved_bytes_before: u64,
    /// Bytes it keeps after.
    pub saved_bytes_after: u64,
    /// Nodes cloned into the backward pass.
    pub recomputed_nodes: usize,
}

const INF: u64 = u64::MAX / 4;

/// Whether recomputing `op` in the backward pass is cheaper than keeping its result.
pub fn recomputable(op: &Op) -> bool {
    !matches!(
        op,
        Op::MatMul
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Attention { .. }
    )
}

/// Applies the minimum-cut policy in place (see the module docs).
pub fn rematerialize(g: &mut Graph) -> RematStats {
    let n_nodes = g.nodes().len();
    let forward_value = |g: &Graph, v: ValueId| {
        g.producer(v)
            .is_some_and(|p| g.node(p).phase == Phase::Forward)
    };
    // Forward values read outside the forward pass.
    let mut needed = Vec::new();
    for node in g.nodes() {
        if node.phase != Phase::Forward {
            for &v in &node.inputs {
                if forward_value(g, v) && !needed.contains(&v) {
                    needed.push(v);
                }
            }
        }
    }
    let size = |g: &Graph, v: ValueId| g.value(v).ty.bytes() as u64;
    let saved_bytes_before = needed.iter().map(|&v| size(g, v)).sum();

    // Flow network over forward values: in = 2k, out = 2k + 1, source, sink.
    let fwd: Vec<ValueId> = (0..g.values().len() as u32)
        .map(ValueId)
        .filter(|&v| forward_value(g, v))
        .collect();
    let index: HashMap<ValueId, usize> = fwd.iter().enumerate().map(|(k, &v)| (v, k)).collect();
    let (source, sink) = (2 * fwd.len(), 2 * fwd.len() + 1);
    let mut net = FlowNet::new(2 * fwd.len() + 2);
    for (k, &v) in fwd.iter().enumerate() {
        net.add(2 * k, 2 * k + 1, size(g, v).max(1));
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
    for &v in &needed {
        net.add(2 * index[&v] + 1, sink, INF);
    }
    net.max_flow(source, sink);
    let reach = net.reachable(source);
    let saved: Vec<bool> = (0..fwd.len())
        .map(|k| reach[2 * k] && !reach[2 * k + 1])
        .collect();
    let is_saved = |v: ValueId| index.get(&v).is_some_and(|&k| saved[k]);

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
        let mut kept = Vec::new();
        for node in g.nodes() {
            if node.phase != Phase::Forward {
                for &v in &node.inputs {
                    if forward_value(g, v) && !kept.contains(&v) {
                        kept.push(v);
                    }
                }
            }
        }
        kept.iter().map(|&v| size(g, v)).sum()
    };
    RematStats {
        saved_bytes_before,
        saved_bytes_after,
        recomputed_nodes,
    }
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
