//! Reverse-mode automatic differentiation over the IR. Every op's vector-Jacobian product is
//! built from IR ops, so the backward pass is an ordinary graph that every later pass (remat,
//! planning, codegen) handles like the forward pass.
//!
//! [`differentiate`] appends the backward nodes for `d loss / d wrt` and marks them
//! [`Phase::Backward`] ("B": gradients with respect to activations) or [`Phase::Weight`] ("W":
//! nodes needed only for weight gradients), the split pipeline schedules rely on.
//!
//! The VJP rules are split by op family, one file each, with the same families as shape
//! inference and the interpreter (`memc_ir`) and the kernels (`memc_codegen::ops`):
//! `elementwise`, `layout`, `gather`, `reduce`, `linalg`, `nn` and `blocks`. A new op of
//! family F gets its VJP in `autodiff/F.rs`.

use std::collections::{HashMap, HashSet};

use memc_ir::{Graph, Op, Phase, ValueId};

use crate::build::Builder;

mod blocks;
mod elementwise;
mod gather;
mod layout;
mod linalg;
mod nn;
mod reduce;

/// Why a graph cannot be differentiated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AutodiffError {
    /// The loss is not a float scalar.
    #[error("the loss must be a float scalar, got {0}")]
    BadLoss(String),
    /// A gradient was requested for a non-float value.
    #[error("cannot differentiate with respect to %{0}, which is not a float tensor")]
    NotFloat(u32),
    /// Building a VJP failed (a bug in memc).
    #[error("node #{node} `{op}`: building its gradient failed: {msg}")]
    Vjp {
        /// Node index.
        node: usize,
        /// Op name.
        op: &'static str,
        /// The shape error.
        msg: String,
    },
}

/// Appends the backward pass of `loss` to `g` and returns `(wrt[i], gradient)` for every value
/// in `wrt` the loss depends on (others get no entry). A value used several times (a tied
/// parameter) gets one gradient: the sum.
pub fn differentiate(
    g: &mut Graph,
    loss: ValueId,
    wrt: &[ValueId],
) -> Result<Vec<(ValueId, ValueId)>, AutodiffError> {
    check_wrt(g, loss, wrt)?;
    let one = g.add_const(memc_ir::Tensor::from_f64(
        g.value(loss).ty.dtype,
        vec![],
        &[1.0],
    ));
    let first_backward = g.nodes().len();
    backward(g, &[(loss, one)], wrt, first_backward)
}

/// [`differentiate`] for a loss that is the result of `lm_head_ce` (the fused LM-head loss):
/// the loss and its gradients are computed together, chunk by chunk, so no chunk's logits are
/// computed twice (`blocks::lm_head_ce_with_grads`), then the backward pass continues from
/// the head's operands. Returns the new loss value (the caller makes it the output in place of
/// the `lm_head_ce` result, which is then unread) and the gradients, or `None` when `loss` is
/// not an `lm_head_ce` result.
#[allow(clippy::type_complexity)]
pub fn differentiate_fused_loss(
    g: &mut Graph,
    loss: ValueId,
    wrt: &[ValueId],
) -> Result<Option<(ValueId, Vec<(ValueId, ValueId)>)>, AutodiffError> {
    let Some(node_id) = g.producer(loss) else {
        return Ok(None);
    };
    let node = g.node(node_id).clone();
    let Op::LmHeadCe { chunk, weighted } = node.op else {
        return Ok(None);
    };
    check_wrt(g, loss, wrt)?;
    let requires = requires_grad(g, wrt);
    let wants: Vec<bool> = node.inputs.iter().map(|v| requires.contains(v)).collect();
    let first_backward = g.nodes().len();
    let loss_dtype = g.value(loss).ty.dtype;
    let mut b = Builder::for_node(g, Phase::Backward, node_id);
    let (new_loss, grads) =
        blocks::lm_head_ce_with_grads(&mut b, &node.inputs, chunk, weighted, loss_dtype, &wants)
            .map_err(|msg| AutodiffError::Vjp {
                node: node_id.index(),
                op: node.op.name(),
                msg,
            })?;
    let seeds: Vec<(ValueId, ValueId)> = node
        .inputs
        .iter()
        .zip(grads)
        .filter_map(|(&x, gx)| Some((x, gx?)))
        .collect();
    let grads = backward(g, &seeds, wrt, first_backward)?;
    Ok(Some((new_loss, grads)))
}

/// The loss is a float scalar and every `wrt` a float tensor.
fn check_wrt(g: &Graph, loss: ValueId, wrt: &[ValueId]) -> Result<(), AutodiffError> {
    let lt = &g.value(loss).ty;
    if !lt.dtype.is_float() || lt.rank() != 0 {
        return Err(AutodiffError::BadLoss(lt.to_string()));
    }
    for &w in wrt {
        if !g.value(w).ty.dtype.is_float() {
            return Err(AutodiffError::NotFloat(w.0));
        }
    }
    Ok(())
}

/// The backward pass from `seeds` (values and their gradients): every node on a path from
/// `wrt` to a seeded value gets its VJP, in reverse program order; nodes from
/// `first_backward` on are split into B and W ([`split_b_w`]).
fn backward(
    g: &mut Graph,
    seeds: &[(ValueId, ValueId)],
    wrt: &[ValueId],
    first_backward: usize,
) -> Result<Vec<(ValueId, ValueId)>, AutodiffError> {
    let n_forward = seeds
        .iter()
        .filter_map(|&(v, _)| g.producer(v))
        .map(|p| p.index() + 1)
        .max()
        .unwrap_or(0);
    let requires = requires_grad(g, wrt);
    // Nodes on a path from `wrt` to a seed, in reverse program order.
    let mut needed: HashSet<ValueId> = seeds.iter().map(|&(v, _)| v).collect();
    let mut order = Vec::new();
    for i in (0..n_forward).rev() {
        let node = &g.nodes()[i];
        if node.outputs.iter().any(|o| needed.contains(o))
            && node.outputs.iter().any(|o| requires.contains(o))
        {
            order.push(i);
            for &v in &node.inputs {
                if requires.contains(&v) {
                    needed.insert(v);
                }
            }
        }
    }

    let mut adjoint: HashMap<ValueId, ValueId> = HashMap::new();
    for &(v, gv) in seeds {
        let total = match adjoint.get(&v) {
            Some(&prev) => {
                let mut b = Builder::new(g, Phase::Backward, "seed");
                b.add(prev, gv).map_err(|msg| AutodiffError::Vjp {
                    node: first_backward,
                    op: "add",
                    msg,
                })?
            }
            None => gv,
        };
        adjoint.insert(v, total);
    }
    for i in order {
        let node = g.nodes()[i].clone();
        let Some(&dy) = adjoint.get(&node.outputs[0]) else {
            continue;
        };
        let mut b = Builder::for_node(g, Phase::Backward, memc_ir::NodeId(i as u32));
        let wants: Vec<bool> = node.inputs.iter().map(|v| requires.contains(v)).collect();
        let grads =
            vjp(&mut b, &node.op, &node.inputs, node.outputs[0], dy, &wants).map_err(|msg| {
                AutodiffError::Vjp {
                    node: i,
                    op: node.op.name(),
                    msg,
                }
            })?;
        for ((&x, gx), want) in node.inputs.iter().zip(grads).zip(wants) {
            let (Some(gx), true) = (gx, want) else {
                continue;
            };
            let total = match adjoint.get(&x) {
                Some(&prev) => b.add(prev, gx).map_err(|msg| AutodiffError::Vjp {
                    node: i,
                    op: node.op.name(),
                    msg,
                })?,
                None => gx,
            };
            adjoint.insert(x, total);
        }
    }
    let grads: Vec<(ValueId, ValueId)> = wrt
        .iter()
        .filter_map(|&w| adjoint.get(&w).map(|&gw| (w, gw)))
        .collect();
    let activation_grads: Vec<ValueId> = adjoint
        .iter()
        .filter(|(k, _)| !wrt.contains(k))
        .map(|(_, &v)| v)
        .collect();
    split_b_w(g, first_backward, &activation_grads);
    Ok(grads)
}

/// Values that depend on any of `wrt` through float ops.
fn requires_grad(g: &Graph, wrt: &[ValueId]) -> HashSet<ValueId> {
    let mut req: HashSet<ValueId> = wrt.iter().copied().collect();
    for node in g.nodes() {
        if node.inputs.iter().any(|v| req.contains(v)) {
            for &o in &node.outputs {
                if g.value(o).ty.dtype.is_float() {
                    req.insert(o);
                }
            }
        }
    }
    req
}

/// Marks the backward nodes that only weight gradients need as [`Phase::Weight`]; the rest
/// (every ancestor of a gradient with respect to an activation) stay [`Phase::Backward`].
fn split_b_w(g: &mut Graph, first_backward: usize, activation_grads: &[ValueId]) {
    let n = g.nodes().len();
    let mut in_b = vec![false; n];
    let mut stack: Vec<usize> = activation_grads
        .iter()
        .filter_map(|&v| g.producer(v).map(|p| p.index()))
        .filter(|&p| p >= first_backward)
        .collect();
    while let Some(i) = stack.pop() {
        if in_b[i] {
            continue;
        }
        in_b[i] = true;
        for &v in &g.nodes()[i].inputs {
            if let Some(p) = g.producer(v) {
                if p.index() >= first_backward && !in_b[p.index()] {
                    stack.push(p.index());
                }
            }
        }
    }
    for (i, &b) in in_b.iter().enumerate().skip(first_backward) {
        g.set_phase(
            memc_ir::NodeId(i as u32),
            if b { Phase::Backward } else { Phase::Weight },
        );
    }
}

/// The gradients of `op`'s operands given the gradient `dy` of its result `y`; `None` for
/// operands that have none (indices, masks) or are not wanted.
fn vjp(
    b: &mut Builder,
    op: &Op,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    match op {
        Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } => {
            elementwise::vjp(b, op, x, y, dy, wants)
        }
        Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::SliceScatter { .. }
        | Op::Concat { .. }
        | Op::Expand { .. }
        | Op::Trilu { .. } => layout::vjp(b, op, x, y, dy, wants),
        Op::Gather { .. }
        | Op::GatherElements { .. }
        | Op::GatherNd
        | Op::ScatterAdd { .. }
        | Op::ScatterElementsAdd { .. }
        | Op::ScatterNdAdd { .. } => gather::vjp(b, op, x, y, dy, wants),
        Op::Reduce { .. } | Op::TopK { .. } => reduce::vjp(b, op, x, y, dy, wants),
        Op::MatMul => linalg::vjp(b, op, x, y, dy, wants),
        Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::Attention { .. }
        | Op::AttentionLse { .. }
        | Op::AttentionGrad { .. } => nn::vjp(b, op, x, y, dy, wants),
        Op::SwigluFfn
        | Op::GeluFfn { .. }
        | Op::MocFfn { .. }
        | Op::Rope
        | Op::Residual
        | Op::RevCouple
        | Op::LmHeadCe { .. } => blocks::vjp(b, op, x, y, dy, wants),
    }
}
