//! `compact_constants`: folded constants stored once and as small as their content allows.
//!
//! Exporters build masks and tables from shape arithmetic that the importer folds into
//! constants, often one copy per layer and always at the full batch shape (a causal mask at
//! batch 8 × seq 1024 is an `[8, 1, 1024, 1024]` tensor, 32 MiB in f32, in every layer). This
//! pass
//! 1. merges constants with the same type and bytes into one value, and
//! 2. shrinks every constant to size 1 along each dim over which all its slices are equal,
//!    restoring the shape with an `expand` node (elementwise: it fuses into its readers, so
//!    the full-size tensor is never stored).
//!
//! Values and results are unchanged; only where bytes live changes.

use std::collections::HashMap;

use memc_ir::{Graph, NodeId, Op, ParamRole, Tensor, TensorType, ValueDef, ValueId};

/// What [`compact_constants`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConstStats {
    /// Bytes of all constants before.
    pub bytes_before: u64,
    /// Bytes of all constants after.
    pub bytes_after: u64,
    /// Constants merged into an identical one.
    pub merged: usize,
    /// Constants shrunk along broadcast dims.
    pub shrunk: usize,
}

/// Constants smaller than this are left alone (an `expand` would cost more than it saves).
const MIN_BYTES: usize = 4096;

/// `t` shrunk to size 1 along `dim` if every slice along `dim` equals the first.
fn squeeze_dim(t: &Tensor, dim: usize) -> Option<Tensor> {
    let shape = t.shape();
    if shape[dim] <= 1 {
        return None;
    }
    let elem = t.dtype().size();
    let inner: usize = shape[dim + 1..].iter().product::<usize>() * elem;
    let outer: usize = shape[..dim].iter().product();
    let bytes = t.bytes();
    let step = inner * shape[dim];
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        let base = o * step;
        let first = &bytes[base..base + inner];
        for i in 1..shape[dim] {
            if &bytes[base + i * inner..base + (i + 1) * inner] != first {
                return None;
            }
        }
        out.extend_from_slice(first);
    }
    let mut small = shape.to_vec();
    small[dim] = 1;
    Tensor::from_bytes(TensorType::new(t.dtype(), small), out.into()).ok()
}

/// Merges identical constants and shrinks broadcast ones (see the module docs).
pub fn compact_constants(g: &mut Graph) -> ConstStats {
    let mut stats = ConstStats::default();
    let consts: Vec<ValueId> = (0..g.values().len())
        .map(|i| ValueId(i as u32))
        .filter(|&v| g.constant(v).is_some())
        .collect();
    stats.bytes_before = consts
        .iter()
        .map(|&v| g.constant(v).unwrap().bytes().len() as u64)
        .sum();

    // 1. One value per distinct (type, bytes).
    let mut first: HashMap<(TensorType, &[u8]), ValueId> = HashMap::new();
    let mut replace: HashMap<ValueId, ValueId> = HashMap::new();
    for &v in &consts {
        let t = g.constant(v).unwrap();
        if t.bytes().len() < MIN_BYTES {
            continue;
        }
        match first.entry((t.ty().clone(), t.bytes())) {
            std::collections::hash_map::Entry::Occupied(e) => {
                replace.insert(v, *e.get());
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(v);
            }
        }
    }
    stats.merged = replace.len();
    let kept: Vec<ValueId> = consts
        .iter()
        .copied()
        .filter(|v| !replace.contains_key(v))
        .collect();

    // 2. Shrink broadcast dims behind an `expand`.
    let mut new_nodes: Vec<NodeId> = vec![];
    for v in kept {
        let t = g.constant(v).unwrap().clone();
        if t.bytes().len() < MIN_BYTES {
            continue;
        }
        let mut small = t.clone();
        for d in 0..t.shape().len() {
            if let Some(s) = squeeze_dim(&small, d) {
                small = s;
            }
        }
        if small.shape() == t.shape() {
            continue;
        }
        let name = match &g.value(v).def {
            ValueDef::Param { name, .. } => format!("{name}.b"),
            _ => format!("memc.const.v{}", v.0),
        };
        let compact = if small.bytes().len() >= MIN_BYTES {
            g.add_param(name, ParamRole::Constant, small.ty().clone(), Some(small))
        } else {
            g.add_const(small)
        };
        let expand = g
            .add_node(
                Op::Expand {
                    shape: t.shape().to_vec(),
                },
                &[compact],
                "",
            )
            .expect("expand of a shrunk constant to its shape is well typed")[0];
        new_nodes.push(g.producer(expand).expect("a node result"));
        for target in replace.values_mut() {
            if *target == v {
                *target = expand;
            }
        }
        replace.insert(v, expand);
        stats.shrunk += 1;
    }
    if replace.is_empty() {
        stats.bytes_after = stats.bytes_before;
        return stats;
    }
    for i in 0..g.nodes().len() {
        let n = NodeId(i as u32);
        if new_nodes.contains(&n) {
            continue;
        }
        let inputs = &g.node(n).inputs;
        if inputs.iter().any(|x| replace.contains_key(x)) {
            let new: Vec<ValueId> = inputs
                .iter()
                .map(|x| *replace.get(x).unwrap_or(x))
                .collect();
            g.set_inputs(n, new);
        }
    }
    g.map_outputs(|v| *replace.get(&v).unwrap_or(&v));
    // The expands (which read only constants) run first.
    let mut order = new_nodes.clone();
    order.extend(
        (0..g.nodes().len() as u32)
            .map(NodeId)
            .filter(|n| !new_nodes.contains(n)),
    );
    g.reorder_nodes(&order);
    g.compact();
    stats.bytes_after = (0..g.values().len())
        .filter_map(|i| g.constant(ValueId(i as u32)))
        .map(|t| t.bytes().len() as u64)
        .sum();
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use memc_ir::{BinaryOp, DType};

    #[test]
    fn merges_and_shrinks_masks() {
        let mut g = Graph::new();
        let x = g.add_input("x", TensorType::new(DType::F32, vec![4, 1, 32, 32]));
        // A causal mask repeated over the batch, twice (two "layers").
        let mut mask = vec![];
        for _ in 0..4 {
            for i in 0..32 {
                for j in 0..32 {
                    mask.push(if j > i { -1e9 } else { 0.0 });
                }
            }
        }
        let t = Tensor::from_f64(DType::F32, vec![4, 1, 32, 32], &mask);
        let m1 = g.add_param("m1", ParamRole::Constant, t.ty().clone(), Some(t.clone()));
        let m2 = g.add_param("m2", ParamRole::Constant, t.ty().clone(), Some(t));
        let a = g.add_node(Op::Binary(BinaryOp::Add), &[x, m1], "").unwrap()[0];
        let b = g.add_node(Op::Binary(BinaryOp::Add), &[a, m2], "").unwrap()[0];
        g.add_output("y", b);
        let feeds = HashMap::from([(
            "x".to_string(),
            Tensor::from_f64(DType::F32, vec![4, 1, 32, 32], &vec![0.5; 4096]),
        )]);
        let want = memc_ir::interpret(&g, &feeds).unwrap();
        let stats = compact_constants(&mut g);
        memc_ir::verify(&g).unwrap();
        assert_eq!(stats.merged, 1);
        assert_eq!(stats.shrunk, 1);
        assert_eq!(stats.bytes_before, 2 * 4 * 32 * 32 * 4);
        assert_eq!(stats.bytes_after, 32 * 32 * 4);
        assert_eq!(g.op_counts().get("expand"), Some(&1));
        let got = memc_ir::interpret(&g, &feeds).unwrap();
        assert_eq!(got[0].1.bytes(), want[0].1.bytes());
    }

    #[test]
    fn leaves_distinct_constants_alone() {
        let mut g = Graph::new();
        let x = g.add_input("x", TensorType::new(DType::F32, vec![2, 2048]));
        let v: Vec<f64> = (0..4096).map(|i| i as f64).collect();
        let t = Tensor::from_f64(DType::F32, vec![2, 2048], &v);
        let c = g.add_param("c", ParamRole::Constant, t.ty().clone(), Some(t));
        let y = g.add_node(Op::Binary(BinaryOp::Mul), &[x, c], "").unwrap()[0];
        g.add_output("y", y);
        let before = memc_ir::print(&g);
        let stats = compact_constants(&mut g);
        assert_eq!((stats.merged, stats.shrunk), (0, 0));
        assert_eq!(memc_ir::print(&g), before);
    }
}
