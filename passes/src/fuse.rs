//! Fusion: groups a program's nodes into kernels. Chains of elementwise nodes over one
//! iteration space become one kernel (one pass over memory), and a float reduction of such a
//! chain's result joins it (the chain is evaluated inside the reduction loop); every other
//! node is a kernel of its own (GEMMs go to a GEMM library, layout ops to copies,
//! normalisations to their own kernels).
//!
//! An elementwise node joins the kernel of an operand's producer when that producer is
//! elementwise, has the same result shape, and the operand has no other reader and is not an
//! output (an update's result may be: the kernel also stores it, as an optimizer's new moments
//! feed the parameter's update). Every member but a kernel's last then feeds no node outside
//! the kernel, so kernels are convex (no path leaves a kernel and comes back) and can run in
//! the program's order.

use std::collections::{HashMap, HashSet};

use memc_ir::{Graph, NodeId, Op, ValueId};

/// One kernel: its nodes in program order, the values it reads from outside, and the values
/// it writes that are read outside (or are outputs or updates).
#[derive(Debug, Clone, PartialEq)]
pub struct Kernel {
    /// Member nodes in program order.
    pub nodes: Vec<NodeId>,
    /// Values read from outside the kernel, in first-use order.
    pub inputs: Vec<ValueId>,
    /// Values written for use outside the kernel.
    pub outputs: Vec<ValueId>,
    /// Whether the kernel is generated from its fused nodes (an elementwise loop, possibly
    /// ending in a reduction); otherwise it is one non-elementwise node.
    pub elementwise: bool,
}

/// Whether `op` computes each result element from the same-index (broadcast) operand elements.
pub fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } | Op::Expand { .. }
    )
}

/// Groups `g`'s nodes into kernels, in program order.
pub fn fuse(g: &Graph) -> Vec<Kernel> {
    let n = g.nodes().len();
    let mut readers_of: HashMap<ValueId, Vec<usize>> = HashMap::new();
    for (i, node) in g.nodes().iter().enumerate() {
        for &v in &node.inputs {
            let r = readers_of.entry(v).or_default();
            if r.last() != Some(&i) {
                r.push(i);
            }
        }
    }
    // Outputs and update results: live to the end of the step.
    let outputs: HashSet<ValueId> = g.outputs().iter().map(|&(_, o)| o).collect();
    let updated: HashSet<ValueId> = g.updates().iter().map(|&(_, u)| u).collect();
    let escaping: HashSet<ValueId> = outputs.union(&updated).copied().collect();
    let escapes = |v: ValueId| escaping.contains(&v);
    // An update's result (an optimizer's new moment) may also feed a later elementwise node of
    // its kernel (the parameter's own update): one pass reads the gradient and the state once
    // and writes each new value, where separate kernels read them again. Not a reduction: a
    // reduction kernel stores one result, its own.
    let joinable = |v: ValueId, reduction: bool| {
        !outputs.contains(&v) && (!updated.contains(&v) || !reduction)
    };
    let mut group_of: Vec<usize> = (0..n).collect();
    let mut groups: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    for i in 0..n {
        let node = &g.nodes()[i];
        // An elementwise chain may end in a reduction of its result (one pass over memory).
        let reduction =
            matches!(node.op, Op::Reduce { .. }) && g.value(node.inputs[0]).ty.dtype.is_float();
        if !is_elementwise(&node.op) && !reduction {
            continue;
        }
        let shape = &g.value(node.inputs[0]).ty.shape;
        let shape = if reduction {
            shape
        } else {
            &g.value(node.outputs[0]).ty.shape
        };
        for &v in &node.inputs {
            let Some(p) = g.producer(v) else { continue };
            let p = p.index();
            let producer = &g.nodes()[p];
            let fusable = is_elementwise(&producer.op)
                && &g.value(v).ty.shape == shape
                && readers_of.get(&v).is_some_and(|r| r.len() == 1)
                && joinable(v, reduction)
                && group_of[p] != group_of[i]
                && !raises_memory(g, &readers_of, &escaping, &groups, &group_of, i, v);
            if fusable {
                let (from, into) = (group_of[i], group_of[p]);
                let moved = std::mem::take(&mut groups[from]);
                for &m in &moved {
                    group_of[m] = into;
                }
                groups[into].extend(moved);
            }
        }
    }
    let mut kernels: Vec<(usize, Kernel)> = Vec::new();
    for (gi, members) in groups.into_iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let mut nodes = members;
        nodes.sort_unstable();
        let inside: Vec<ValueId> = nodes
            .iter()
            .flat_map(|&m| g.nodes()[m].outputs.clone())
            .collect();
        let mut inputs = Vec::new();
        for &m in &nodes {
            for &v in &g.nodes()[m].inputs {
                if !inside.contains(&v) && !inputs.contains(&v) {
                    inputs.push(v);
                }
            }
        }
        let outputs: Vec<ValueId> = inside
            .iter()
            .copied()
            .filter(|&v| {
                escapes(v)
                    || readers_of
                        .get(&v)
                        .is_some_and(|r| r.iter().any(|&k| group_of[k] != gi))
            })
            .collect();
        let elementwise = is_elementwise(&g.nodes()[nodes[0]].op);
        debug_assert!(
            elementwise || nodes.len() == 1,
            "only elementwise chains fuse"
        );
        kernels.push((
            nodes[0],
            Kernel {
                nodes: nodes.into_iter().map(|m| NodeId(m as u32)).collect(),
                inputs,
                outputs,
                elementwise,
            },
        ));
    }
    order_kernels(
        g,
        kernels.into_iter().map(|(_, k)| k).collect(),
        &readers_of,
    )
}

/// Whether fusing node `i` into the group `into` of its operand `v`'s producer would hold
/// more memory than it saves. The fused kernel runs at `i`, so the external inputs of
/// `into` that nothing after `into` reads stay live until `i` instead of being freed at
/// `into`'s last member; when other nodes run in between (allocating their results), that
/// extension counts against the `v` buffer fusion saves. An accumulation over chunks
/// (`((g1 + g2) + g3) + ...`, each `gk` a GEMM's result) thus stays a chain of adds instead of
/// one kernel holding every `gk`.
fn raises_memory(
    g: &Graph,
    readers_of: &HashMap<ValueId, Vec<usize>>,
    escaping: &HashSet<ValueId>,
    groups: &[Vec<usize>],
    group_of: &[usize],
    i: usize,
    v: ValueId,
) -> bool {
    let Some(p) = g.producer(v) else {
        return false;
    };
    let (into, from) = (&groups[group_of[p.index()]], group_of[i]);
    let Some(&last) = into.iter().max() else {
        return false;
    };
    let gi = group_of[last];
    let foreign_between = (last + 1..i).any(|k| group_of[k] != gi && group_of[k] != from);
    if !foreign_between {
        return false;
    }
    let mut extended = 0usize;
    let mut seen = Vec::new();
    for &m in into {
        for &x in &g.nodes()[m].inputs {
            // Inputs, weights, constants, outputs and updates live for the whole step anyway.
            let Some(p) = g.producer(x) else { continue };
            if group_of[p.index()] == gi || seen.contains(&x) || escaping.contains(&x) {
                continue;
            }
            seen.push(x);
            // Held longer only if no later node outside the group reads it anyway.
            let read_later = readers_of
                .get(&x)
                .is_some_and(|r| r.iter().any(|&k| k > last && group_of[k] != gi));
            if !read_later {
                extended += g.value(x).ty.bytes();
            }
        }
    }
    // An escaping `v` keeps its buffer whether fused or not: fusing saves nothing.
    let saved = if escaping.contains(&v) {
        0
    } else {
        g.value(v).ty.bytes()
    };
    extended > saved
}

/// Orders the kernels: each after the kernels computing its operands and, since an update
/// writes its target's buffer in place, each update after every other kernel reading the
/// target; otherwise by their last nodes' program order (a kernel whose members interleave
/// with another's, such as a parameter's update fused after a recomputation that still
/// reads the parameter, must not overtake it).
fn order_kernels(
    g: &Graph,
    kernels: Vec<Kernel>,
    readers_of: &HashMap<ValueId, Vec<usize>>,
) -> Vec<Kernel> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut kernel_of = vec![0usize; g.nodes().len()];
    for (k, kernel) in kernels.iter().enumerate() {
        for &n in &kernel.nodes {
            kernel_of[n.index()] = k;
        }
    }
    let mut after: Vec<HashSet<usize>> = vec![HashSet::new(); kernels.len()];
    for (k, kernel) in kernels.iter().enumerate() {
        for &v in &kernel.inputs {
            if let Some(p) = g.producer(v) {
                after[kernel_of[p.index()]].insert(k);
            }
        }
    }
    for &(target, v) in g.updates() {
        let Some(p) = g.producer(v) else { continue };
        let u = kernel_of[p.index()];
        for &r in readers_of.get(&target).into_iter().flatten() {
            if kernel_of[r] != u {
                after[kernel_of[r]].insert(u);
            }
        }
    }
    let mut waiting = vec![0usize; kernels.len()];
    for next in &after {
        for &k in next {
            waiting[k] += 1;
        }
    }
    let key = |k: usize| kernels[k].nodes.last().map_or(0, |n| n.index());
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> = (0..kernels.len())
        .filter(|&k| waiting[k] == 0)
        .map(|k| Reverse((key(k), k)))
        .collect();
    let mut order = Vec::with_capacity(kernels.len());
    while let Some(Reverse((_, k))) = ready.pop() {
        order.push(k);
        for &next in &after[k] {
            waiting[next] -= 1;
            if waiting[next] == 0 {
                ready.push(Reverse((key(next), next)));
            }
        }
    }
    assert_eq!(
        order.len(),
        kernels.len(),
        "fused kernels depend on each other in a cycle (a memc bug)"
    );
    let mut slots: Vec<Option<Kernel>> = kernels.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|k| slots[k].take().unwrap())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use memc_ir::{BinaryOp, DType, ParamRole, Phase, Tensor, TensorType};

    /// A parameter read (by a fused chain) after its update's chain has started: the chain
    /// that reads it must run before the kernel that writes the update in place.
    #[test]
    fn an_update_waits_for_every_reader_of_its_target() {
        let ty = TensorType::new(DType::F32, vec![4]);
        let mut g = Graph::new();
        let x = g.add_input("x", ty.clone());
        let p = g.add_param("p", ParamRole::Weight, ty.clone(), None);
        let c = g.add_const(Tensor::from_f64(DType::F32, vec![], &[0.5]));
        let add = |g: &mut Graph, op: BinaryOp, a: ValueId, b: ValueId, phase: Phase| {
            let v = g.add_node(Op::Binary(op), &[a, b], "n").unwrap()[0];
            g.set_phase(g.producer(v).unwrap(), phase);
            v
        };
        let a = add(&mut g, BinaryOp::Add, x, p, Phase::Forward); // #0
        let t = add(&mut g, BinaryOp::Mul, p, c, Phase::Update); // #1
        let r = add(&mut g, BinaryOp::Add, a, p, Phase::Recompute); // #2 reads p
        let u = add(&mut g, BinaryOp::Sub, p, t, Phase::Update); // #3 the update
        let out = add(&mut g, BinaryOp::Mul, r, r, Phase::Recompute); // #4
        g.add_output("out", out);
        g.add_update(p, u);
        let kernels = fuse(&g);
        let position = |n: u32| {
            kernels
                .iter()
                .position(|k| k.nodes.contains(&NodeId(n)))
                .unwrap()
        };
        assert_eq!(position(1), position(3), "the update chain fuses");
        assert!(
            position(2) < position(3),
            "the reader of p runs before p is overwritten: {kernels:?}"
        );
    }
}
