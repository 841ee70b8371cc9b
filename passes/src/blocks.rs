//! `lower_blocks`: block ops back into the primitive ops they stand for.
//!
//! The canonicalisation recognises whole feed-forward blocks (`swiglu_ffn`, `gelu_ffn`) and
//! rotary embeddings (`rope`) so that the memory rewrites and the reports see them as blocks. Training and code generation
//! work on their steps ([`Op::expansion`]): the GEMMs stay cuBLAS/host GEMMs, the activation
//! is one elementwise op (`silu`, `gelu`, `gelu_tanh`) that fuses with its neighbours, and the
//! rematerialisation pass sees the gate and up projections as ordinary tensors it may keep or
//! recompute (a fused FFN op would have to choose once for every budget).
//!
//! Each block's steps take its place in program order; results are unchanged (the
//! interpreter evaluates a block by the same steps).

use std::collections::HashMap;

use memc_ir::{Graph, NodeId, Op, Operand, ValueId};

/// Why blocks could not be lowered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LowerError {
    /// A step of a block did not fit its operands (a memc bug).
    #[error("lowering `{op}` ({node}): {msg}")]
    Step {
        /// The block op.
        op: &'static str,
        /// The block node's name.
        node: String,
        /// What did not fit.
        msg: String,
    },
    /// A block's result is written back as a state update.
    #[error("a block's result is a state update; lower blocks before building training")]
    UpdatedBlock,
    /// The lowered graph does not verify (a memc bug).
    #[error("lowering blocks produced an invalid graph (a memc bug): {0}")]
    Invalid(String),
}

/// Replaces every block op of `g` by its steps and returns how many were replaced; `g` is
/// left compacted when any was.
pub fn lower_blocks(g: &mut Graph) -> Result<usize, LowerError> {
    lower_blocks_where(g, |_| true)
}

/// [`lower_blocks`] for the block ops `which` accepts (the training builder keeps `residual`
/// until rematerialisation has used it to find the layers). Each step takes its block's phase.
pub fn lower_blocks_where(g: &mut Graph, which: impl Fn(&Op) -> bool) -> Result<usize, LowerError> {
    let original = g.nodes().len();
    let mut spliced: HashMap<usize, Vec<NodeId>> = HashMap::new();
    let mut replaced: HashMap<ValueId, ValueId> = HashMap::new();
    for i in 0..original {
        let label = g.node_label(NodeId(i as u32));
        let node = g.node(NodeId(i as u32)).clone();
        let types: Vec<_> = node.inputs.iter().map(|&v| g.value(v).ty.clone()).collect();
        let Some(steps) = node.op.expansion(&types).filter(|_| which(&node.op)) else {
            continue;
        };
        let mut results: Vec<ValueId> = vec![];
        let mut ids = vec![];
        for (k, (op, operands)) in steps.into_iter().enumerate() {
            let args: Vec<ValueId> = operands
                .iter()
                .map(|o| match *o {
                    Operand::Input(j) => node.inputs[j],
                    Operand::Step(j) => results[j],
                })
                .collect();
            ids.push(NodeId(g.nodes().len() as u32));
            let out = g
                .add_node(op, &args, format!("{}/{k}", node.name))
                .map_err(|msg| LowerError::Step {
                    op: node.op.name(),
                    node: label.clone(),
                    msg,
                })?;
            g.set_phase(*ids.last().unwrap(), node.phase);
            g.set_chunk(*ids.last().unwrap(), node.chunk);
            results.push(out[0]);
        }
        replaced.insert(node.outputs[0], *results.last().expect("a block has steps"));
        spliced.insert(i, ids);
    }
    if spliced.is_empty() {
        return Ok(0);
    }
    if g.updates().iter().any(|(_, v)| replaced.contains_key(v)) {
        return Err(LowerError::UpdatedBlock);
    }
    for i in 0..g.nodes().len() {
        let n = NodeId(i as u32);
        let inputs: Vec<ValueId> = g
            .node(n)
            .inputs
            .iter()
            .map(|v| *replaced.get(v).unwrap_or(v))
            .collect();
        if inputs != g.node(n).inputs {
            g.set_inputs(n, inputs);
        }
    }
    g.map_outputs(|v| *replaced.get(&v).unwrap_or(&v));
    // The steps go where the block was; the block itself (now unread) is dropped by `compact`.
    let mut order = Vec::with_capacity(g.nodes().len());
    for i in 0..original {
        if let Some(ids) = spliced.get(&i) {
            order.extend(ids);
        }
        order.push(NodeId(i as u32));
    }
    g.reorder_nodes(&order);
    g.compact();
    memc_ir::verify(g).map_err(|e| LowerError::Invalid(e.to_string()))?;
    Ok(spliced.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_become_their_steps_in_place_with_the_same_results() {
        let src = "graph {
  %0 = input \"x\" : f32[2, 3, 4]
  %1 = param \"wg\" : f32[4, 6]
  %2 = param \"wu\" : f32[4, 6]
  %3 = param \"wd\" : f32[6, 4]
  %4 = param \"b1\" : f32[6]
  %5 = param \"b2\" : f32[4]
  %6 = swiglu_ffn(%0, %1, %2, %3) : f32[2, 3, 4]
  %7 = gelu_ffn(%6, %1, %4, %3, %5) {tanh = true} : f32[2, 3, 4]
  %8 = add(%7, %6) : f32[2, 3, 4]
  output \"y\" = %8
}
";
        let mut g = memc_ir::parse(src).unwrap();
        let before = g.clone();
        assert_eq!(lower_blocks(&mut g).unwrap(), 2);
        let text = memc_ir::print(&g);
        assert!(!text.contains("_ffn"), "{text}");
        assert!(
            text.contains("silu(") && text.contains("gelu_tanh("),
            "{text}"
        );
        assert_eq!(lower_blocks(&mut g).unwrap(), 0);
        // Same values as the blocks (random data for every input and param).
        let mut rng = 1u64;
        let mut feeds = HashMap::new();
        for (name, shape) in [
            ("x", vec![2, 3, 4]),
            ("wg", vec![4, 6]),
            ("wu", vec![4, 6]),
            ("wd", vec![6, 4]),
            ("b1", vec![6]),
            ("b2", vec![4]),
        ] {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = (0..n)
                .map(|_| {
                    rng = rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((rng >> 33) as f32 / (1u64 << 31) as f32) - 0.5
                })
                .collect();
            feeds.insert(
                name.to_string(),
                memc_ir::Tensor::from_f32(memc_ir::DType::F32, shape, &data),
            );
        }
        let run = |g: &Graph| {
            let mut g = g.clone();
            for v in 0..g.values().len() {
                let v = ValueId(v as u32);
                if let memc_ir::ValueDef::Param { name, .. } = &g.value(v).def {
                    let t = feeds[name.as_str()].clone();
                    g.set_param_data(v, t);
                }
            }
            let x = HashMap::from([("x".to_string(), feeds["x"].clone())]);
            memc_ir::interpret(&g, &x).unwrap().remove(0).1
        };
        assert_eq!(run(&before), run(&g));
    }
}

/// What `lower-blocks` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lowered(pub usize);

crate::pass_stats! {
    Lowered,
    fn summary(&self) -> String {
        format!("{} blocks lowered", self.0)
    }
}

/// Lowers every block op of `g` but those in `keep`.
pub fn lower_blocks_keeping(g: &mut Graph, keep: &[Op]) -> Result<Lowered, LowerError> {
    crate::blocks::lower_blocks_where(g, |op| !keep.contains(op)).map(Lowered)
}
