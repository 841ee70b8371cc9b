//! Reverse-mode automatic differentiation over the IR. Every op's vector-Jacobian product is
//! built from IR ops, so the backward pass is an ordinary graph that every later pass (remat,
//! planning, codegen) handles like the forward pass.
//!
//! [`differentiate`] appends the backward nodes for `d loss / d wrt` and marks them
//! [`Phase::Backward`] ("B": gradients with respect to activations) or [`Phase::Weight`] ("W":
//! nodes needed only for weight gradients), the split pipeline schedules rely on.

use std::collections::{HashMap, HashSet};

use memc_ir::{BinaryOp, Graph, Op, Phase, ReduceKind, UnaryOp, ValueId};

use crate::build::{BResult, Builder};

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
    let lt = &g.value(loss).ty;
    if !lt.dtype.is_float() || lt.rank() != 0 {
        return Err(AutodiffError::BadLoss(lt.to_string()));
    }
    for &w in wrt {
        if !g.value(w).ty.dtype.is_float() {
            return Err(AutodiffError::NotFloat(w.0));
        }
    }
    let n_forward = g.nodes().len();
    let requires = requires_grad(g, wrt);
    // Nodes on a path from `wrt` to the loss, in reverse program order.
    let mut needed: HashSet<ValueId> = HashSet::from([loss]);
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
    let one = g.add_const(memc_ir::Tensor::from_f64(
        g.value(loss).ty.dtype,
        vec![],
        &[1.0],
    ));
    adjoint.insert(loss, one);
    let first_backward = g.nodes().len();
    for i in order {
        let node = g.nodes()[i].clone();
        let Some(&dy) = adjoint.get(&node.outputs[0]) else {
            continue;
        };
        let mut b = Builder::new(g, Phase::Backward, node.name.clone());
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
    let some = |v: BResult| v.map(Some);
    let xs = |b: &Builder, i: usize| b.shape(x[i]);
    Ok(match op {
        Op::Unary(u) => vec![match u {
            UnaryOp::Not | UnaryOp::IsNaN => None,
            UnaryOp::Neg => some(b.neg(dy))?,
            UnaryOp::Exp => some(b.mul(dy, y))?,
            UnaryOp::Log => some(b.div(dy, x[0]))?,
            UnaryOp::Sqrt => {
                let h = b.mul_scalar(dy, 0.5)?;
                some(b.div(h, y))?
            }
            UnaryOp::Reciprocal => {
                let yy = b.mul(y, y)?;
                let t = b.mul(dy, yy)?;
                some(b.neg(t))?
            }
            UnaryOp::Tanh => {
                let yy = b.mul(y, y)?;
                let one_minus = {
                    let n = b.neg(yy)?;
                    b.add_scalar(n, 1.0)?
                };
                some(b.mul(dy, one_minus))?
            }
            UnaryOp::Erf => {
                let xx = b.mul(x[0], x[0])?;
                let n = b.neg(xx)?;
                let e = b.unary(UnaryOp::Exp, n)?;
                let s = b.mul_scalar(e, 2.0 / std::f64::consts::PI.sqrt())?;
                some(b.mul(dy, s))?
            }
            UnaryOp::Sigmoid => {
                let n = b.neg(y)?;
                let one_minus = b.add_scalar(n, 1.0)?;
                let d = b.mul(y, one_minus)?;
                some(b.mul(dy, d))?
            }
            UnaryOp::Silu => {
                // σ(x)·(1 + x·(1 − σ(x))): reads x only, so only x is saved.
                let s = b.unary(UnaryOp::Sigmoid, x[0])?;
                let n = b.neg(s)?;
                let one_minus = b.add_scalar(n, 1.0)?;
                let t = b.mul(x[0], one_minus)?;
                let t = b.add_scalar(t, 1.0)?;
                let d = b.mul(s, t)?;
                some(b.mul(dy, d))?
            }
            UnaryOp::Gelu => {
                // Φ(x) + x·φ(x) = 0.5·(1 + erf(x/√2)) + x·exp(−x²/2)/√(2π).
                let r = b.mul_scalar(x[0], std::f64::consts::FRAC_1_SQRT_2)?;
                let e = b.unary(UnaryOp::Erf, r)?;
                let e = b.add_scalar(e, 1.0)?;
                let cdf = b.mul_scalar(e, 0.5)?;
                let xx = b.mul(x[0], x[0])?;
                let h = b.mul_scalar(xx, -0.5)?;
                let p = b.unary(UnaryOp::Exp, h)?;
                let p = b.mul_scalar(p, 1.0 / (2.0 * std::f64::consts::PI).sqrt())?;
                let xp = b.mul(x[0], p)?;
                let d = b.add(cdf, xp)?;
                some(b.mul(dy, d))?
            }
            UnaryOp::GeluTanh => {
                // t = tanh(c·(x + k·x³)):  0.5·(1 + t) + 0.5·x·(1 − t²)·c·(1 + 3k·x²).
                let (c, k) = ((2.0 / std::f64::consts::PI).sqrt(), 0.044715);
                let xx = b.mul(x[0], x[0])?;
                let kxx = b.mul_scalar(xx, k)?;
                let inner = b.add_scalar(kxx, 1.0)?;
                let u = b.mul(x[0], inner)?;
                let u = b.mul_scalar(u, c)?;
                let t = b.unary(UnaryOp::Tanh, u)?;
                let tt = b.mul(t, t)?;
                let n = b.neg(tt)?;
                let sech2 = b.add_scalar(n, 1.0)?;
                let du = b.mul_scalar(xx, 3.0 * k)?;
                let du = b.add_scalar(du, 1.0)?;
                let du = b.mul_scalar(du, 0.5 * c)?;
                let a = b.mul(x[0], sech2)?;
                let a = b.mul(a, du)?;
                let half = b.add_scalar(t, 1.0)?;
                let half = b.mul_scalar(half, 0.5)?;
                let d = b.add(half, a)?;
                some(b.mul(dy, d))?
            }
            UnaryOp::Cos => {
                let s = b.unary(UnaryOp::Sin, x[0])?;
                let t = b.mul(dy, s)?;
                some(b.neg(t))?
            }
            UnaryOp::Sin => {
                let c = b.unary(UnaryOp::Cos, x[0])?;
                some(b.mul(dy, c))?
            }
        }],
        Op::Binary(op) => binary_vjp(b, *op, x, y, dy, wants)?,
        Op::Where => {
            let zero = b.scalar(b.dtype(dy), 0.0);
            let ga = if wants[1] {
                let w = b.op(Op::Where, &[x[0], dy, zero])?;
                Some(b.unbroadcast(w, &xs(b, 1))?)
            } else {
                None
            };
            let gb = if wants[2] {
                let w = b.op(Op::Where, &[x[0], zero, dy])?;
                Some(b.unbroadcast(w, &xs(b, 2))?)
            } else {
                None
            };
            vec![None, ga, gb]
        }
        Op::Cast { .. } => {
            let from = b.dtype(x[0]);
            vec![if from.is_float() {
                Some(b.cast(dy, from)?)
            } else {
                None
            }]
        }
        Op::MatMul => matmul_vjp(b, x[0], x[1], dy, wants)?,
        Op::LmHeadCe { chunk } => lm_head_ce_vjp(b, x, dy, *chunk, wants)?,
        // x + f with one type: the gradient flows to both unchanged.
        Op::Residual => vec![wants[0].then_some(dy), wants[1].then_some(dy)],
        // s·a + f: the stream's gradient is scaled, the branch's is dy, the scale is constant.
        Op::RevCouple => vec![
            if wants[0] {
                Some(b.op(Op::Binary(BinaryOp::Mul), &[dy, x[2]])?)
            } else {
                None
            },
            wants[1].then_some(dy),
            None,
        ],
        // Integer indices: no gradient.
        Op::TopK { .. } => vec![None],
        Op::SwigluFfn | Op::GeluFfn { .. } | Op::MocFfn { .. } | Op::Rope => {
            return Err(format!(
                "`{}` has no VJP of its own: lower the blocks first (memc_passes::blocks::lower)",
                op.name()
            ))
        }
        Op::Softmax { axis } => {
            let gy = b.mul(dy, y)?;
            let s = b.reduce(ReduceKind::Sum, gy, vec![*axis], true)?;
            let d = b.sub(dy, s)?;
            vec![Some(b.mul(y, d)?)]
        }
        Op::LogSoftmax { axis } => {
            let s = b.reduce(ReduceKind::Sum, dy, vec![*axis], true)?;
            let p = b.unary(UnaryOp::Exp, y)?;
            let ps = b.mul(p, s)?;
            vec![Some(b.sub(dy, ps)?)]
        }
        Op::LayerNorm { axis, epsilon } => layer_norm_vjp(b, x, dy, *axis, *epsilon, wants)?,
        Op::RmsNorm { axis, epsilon } => rms_norm_vjp(b, x, dy, *axis, *epsilon, wants)?,
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            return Err(format!(
                "`{}` is part of attention's backward pass; second derivatives are not supported",
                op.name()
            ))
        }
        Op::Attention { scale } if !wants[3] => attention_flash_vjp(b, x, y, dy, *scale, wants)?,
        Op::Attention { scale } => attention_vjp(b, x, dy, *scale as f64, wants)?,
        Op::Reduce {
            kind,
            axes,
            keep_dims,
        } => {
            let shape = xs(b, 0);
            let kept: Vec<usize> = shape
                .iter()
                .enumerate()
                .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
                .collect();
            let _ = keep_dims;
            let gk = b.reshape(dy, kept.clone())?;
            vec![Some(match kind {
                ReduceKind::Sum => b.expand(gk, shape)?,
                ReduceKind::Mean => {
                    let count: usize = axes.iter().map(|&a| shape[a]).product();
                    let e = b.expand(gk, shape)?;
                    b.mul_scalar(e, 1.0 / count as f64)?
                }
                ReduceKind::Max => {
                    // Ties share the gradient evenly, as torch.amax does.
                    let yk = b.reshape(y, kept)?;
                    let eq = b.binary(BinaryOp::Equal, x[0], yk)?;
                    let mask = b.cast(eq, b.dtype(x[0]))?;
                    let count = b.reduce(ReduceKind::Sum, mask, axes.clone(), true)?;
                    let share = b.div(gk, count)?;
                    b.mul(mask, share)?
                }
            })]
        }
        Op::Gather { axis } => {
            vec![
                Some(b.op(
                    Op::ScatterAdd {
                        axis: *axis,
                        shape: xs(b, 0),
                    },
                    &[dy, x[1]],
                )?),
                None,
            ]
        }
        Op::GatherElements { axis } => {
            vec![
                Some(b.op(
                    Op::ScatterElementsAdd {
                        axis: *axis,
                        shape: xs(b, 0),
                    },
                    &[dy, x[1]],
                )?),
                None,
            ]
        }
        Op::GatherNd => vec![
            Some(b.op(Op::ScatterNdAdd { shape: xs(b, 0) }, &[dy, x[1]])?),
            None,
        ],
        Op::ScatterAdd { axis, .. } => {
            vec![Some(b.op(Op::Gather { axis: *axis }, &[dy, x[1]])?), None]
        }
        Op::ScatterElementsAdd { axis, .. } => {
            vec![
                Some(b.op(Op::GatherElements { axis: *axis }, &[dy, x[1]])?),
                None,
            ]
        }
        Op::ScatterNdAdd { .. } => vec![Some(b.op(Op::GatherNd, &[dy, x[1]])?), None],
        Op::Reshape { .. } => vec![Some(b.reshape(dy, xs(b, 0))?)],
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            vec![Some(b.transpose(dy, inv)?)]
        }
        Op::Slice { starts, steps, .. } => {
            vec![Some(b.op(
                Op::SliceScatter {
                    shape: xs(b, 0),
                    starts: starts.clone(),
                    steps: steps.clone(),
                },
                &[dy],
            )?)]
        }
        Op::SliceScatter { starts, steps, .. } => {
            let src = xs(b, 0);
            let ends = (0..src.len())
                .map(|k| {
                    if src[k] == 0 {
                        starts[k]
                    } else {
                        starts[k] + (src[k] - 1) * steps[k] + 1
                    }
                })
                .collect();
            vec![Some(b.op(
                Op::Slice {
                    starts: starts.clone(),
                    ends,
                    steps: steps.clone(),
                },
                &[dy],
            )?)]
        }
        Op::Concat { axis } => {
            let out = b.shape(y);
            let mut at = 0;
            let mut grads = Vec::with_capacity(x.len());
            for (i, &xi) in x.iter().enumerate() {
                let len = b.shape(xi)[*axis];
                if wants[i] {
                    let mut starts = vec![0; out.len()];
                    let mut ends = out.clone();
                    starts[*axis] = at;
                    ends[*axis] = at + len;
                    grads.push(Some(b.op(
                        Op::Slice {
                            starts,
                            ends,
                            steps: vec![1; out.len()],
                        },
                        &[dy],
                    )?));
                } else {
                    grads.push(None);
                }
                at += len;
            }
            grads
        }
        Op::Expand { .. } => vec![Some(b.unbroadcast(dy, &xs(b, 0))?)],
        Op::Trilu { upper, k } => vec![Some(b.op(
            Op::Trilu {
                upper: *upper,
                k: *k,
            },
            &[dy],
        )?)],
    })
}

fn binary_vjp(
    b: &mut Builder,
    op: BinaryOp,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (sa, sb) = (b.shape(x[0]), b.shape(x[1]));
    let (ga, gb): (Option<ValueId>, Option<ValueId>) = match op {
        BinaryOp::Equal
        | BinaryOp::Less
        | BinaryOp::LessEqual
        | BinaryOp::Greater
        | BinaryOp::GreaterEqual
        | BinaryOp::And => (None, None),
        BinaryOp::Add => (Some(dy), Some(dy)),
        BinaryOp::Sub => (Some(dy), if wants[1] { Some(b.neg(dy)?) } else { None }),
        BinaryOp::Mul => (
            if wants[0] {
                Some(b.mul(dy, x[1])?)
            } else {
                None
            },
            if wants[1] {
                Some(b.mul(dy, x[0])?)
            } else {
                None
            },
        ),
        BinaryOp::Div => (
            if wants[0] {
                Some(b.div(dy, x[1])?)
            } else {
                None
            },
            if wants[1] {
                let t = b.mul(dy, y)?;
                let q = b.div(t, x[1])?;
                Some(b.neg(q)?)
            } else {
                None
            },
        ),
        BinaryOp::Pow => {
            let dt = b.dtype(x[0]);
            let e = b.cast(x[1], dt)?;
            let ga = if wants[0] {
                let em1 = b.add_scalar(e, -1.0)?;
                let p = b.binary(BinaryOp::Pow, x[0], em1)?;
                let t = b.mul(p, e)?;
                Some(b.mul(dy, t)?)
            } else {
                None
            };
            let gb = if wants[1] && b.dtype(x[1]).is_float() {
                let l = b.unary(UnaryOp::Log, x[0])?;
                let t = b.mul(y, l)?;
                Some(b.mul(dy, t)?)
            } else {
                None
            };
            (ga, gb)
        }
        BinaryOp::Max | BinaryOp::Min => {
            // Ties split the gradient in half, as torch.maximum/minimum do.
            let (win, lose) = if op == BinaryOp::Max {
                (BinaryOp::Greater, BinaryOp::Less)
            } else {
                (BinaryOp::Less, BinaryOp::Greater)
            };
            let dt = b.dtype(dy);
            let zero = b.scalar(dt, 0.0);
            let half = b.mul_scalar(dy, 0.5)?;
            let eq = b.binary(BinaryOp::Equal, x[0], x[1])?;
            let side = |b: &mut Builder, cmp: BinaryOp| -> BResult {
                let w = b.binary(cmp, x[0], x[1])?;
                let tie = b.op(Op::Where, &[eq, half, zero])?;
                b.op(Op::Where, &[w, dy, tie])
            };
            (
                if wants[0] { Some(side(b, win)?) } else { None },
                if wants[1] { Some(side(b, lose)?) } else { None },
            )
        }
    };
    let ga = match ga {
        Some(v) if wants[0] => Some(b.unbroadcast(v, &sa)?),
        _ => None,
    };
    let gb = match gb {
        Some(v) if wants[1] => Some(b.unbroadcast(v, &sb)?),
        _ => None,
    };
    Ok(vec![ga, gb])
}

fn matmul_vjp(
    b: &mut Builder,
    a: ValueId,
    w: ValueId,
    dy: ValueId,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (sa, sw) = (b.shape(a), b.shape(w));
    // Promote vectors to matrices as the forward did, then undo at the end.
    let a2 = if sa.len() == 1 {
        b.reshape(a, vec![1, sa[0]])?
    } else {
        a
    };
    let w2 = if sw.len() == 1 {
        b.reshape(w, vec![sw[0], 1])?
    } else {
        w
    };
    let mut gshape = b.shape(dy);
    if sa.len() == 1 {
        gshape.insert(gshape.len() - if sw.len() == 1 { 0 } else { 1 }, 1);
    }
    if sw.len() == 1 {
        gshape.push(1);
    }
    let g2 = b.reshape(dy, gshape)?;
    let ga = if wants[0] {
        let wt = b.transpose_last2(w2)?;
        let full = b.op(Op::MatMul, &[g2, wt])?;
        let s = b.shape(a2);
        let r = b.unbroadcast(full, &s)?;
        Some(b.reshape(r, sa)?)
    } else {
        None
    };
    let gw = if wants[1] {
        let at = b.transpose_last2(a2)?;
        let full = b.op(Op::MatMul, &[at, g2])?;
        let s = b.shape(w2);
        let r = b.unbroadcast(full, &s)?;
        Some(b.reshape(r, sw)?)
    } else {
        None
    };
    Ok(vec![ga, gw])
}

/// Attention's VJP when the mask needs no gradient (the usual case): the row log-sum-exp is
/// recomputed from q, k and the mask, delta = Σ dy·y, and each of dq, dk, dv is one
/// `attention_grad` op that recomputes the probabilities row by row: nothing of size S×T
/// exists in the forward or the backward pass.
fn attention_flash_vjp(
    b: &mut Builder,
    x: &[ValueId],
    y: ValueId,
    dy: ValueId,
    scale: f32,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let lse = b.op(Op::AttentionLse { scale }, &[x[0], x[1], x[3]])?;
    let dyy = b.mul(dy, y)?;
    let delta = b.reduce(ReduceKind::Sum, dyy, vec![3], false)?;
    let mut out = vec![];
    for (wrt, &want) in wants.iter().enumerate().take(3) {
        out.push(if want {
            Some(b.op(
                Op::AttentionGrad { scale, wrt },
                &[x[0], x[1], x[2], x[3], lse, dy, delta],
            )?)
        } else {
            None
        });
    }
    out.push(None);
    Ok(out)
}

/// Attention's VJP when the mask needs a gradient: recomputes the probabilities from q, k and the mask (nothing of size
/// S×T is kept from the forward pass; the backward pass holds it transiently):
/// p = softmax(q·kᵀ·scale + mask), dv = pᵀ·dy, ds = p ⊙ (dy·vᵀ − rowsum(dy·vᵀ ⊙ p)),
/// dq = ds·k·scale, dk = dsᵀ·q·scale; grouped key/value heads sum their query heads' terms.
fn attention_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    scale: f64,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (qs, ks, vs) = (b.shape(x[0]), b.shape(x[1]), b.shape(x[2]));
    let (bsz, h, hk, t) = (qs[0], qs[1], ks[1], ks[2]);
    let group = h / hk;
    let repeat = |b: &mut Builder, v: ValueId, s: &[usize]| -> Result<ValueId, String> {
        if group == 1 {
            return Ok(v);
        }
        let r = b.reshape(v, vec![bsz, hk, 1, t, s[3]])?;
        let e = b.expand(r, vec![bsz, hk, group, t, s[3]])?;
        b.reshape(e, vec![bsz, h, t, s[3]])
    };
    let fold = |b: &mut Builder, g: ValueId, s: &[usize]| -> Result<ValueId, String> {
        if group == 1 {
            return Ok(g);
        }
        let r = b.reshape(g, vec![bsz, hk, group, t, s[3]])?;
        b.reduce(ReduceKind::Sum, r, vec![2], false)
    };
    let kr = repeat(b, x[1], &ks)?;
    let vr = repeat(b, x[2], &vs)?;
    let kt = b.transpose_last2(kr)?;
    let qk = b.op(Op::MatMul, &[x[0], kt])?;
    let sc = b.mul_scalar(qk, scale)?;
    let s = b.add(sc, x[3])?;
    let p0 = b.op(Op::Softmax { axis: 3 }, &[s])?;
    let nan = b.unary(UnaryOp::IsNaN, p0)?;
    let zero = b.scalar(b.dtype(p0), 0.0);
    let p = b.op(Op::Where, &[nan, zero, p0])?;
    let dv = if wants[2] {
        let pt = b.transpose_last2(p)?;
        let g = b.op(Op::MatMul, &[pt, dy])?;
        Some(fold(b, g, &vs)?)
    } else {
        None
    };
    let need_ds = wants[0] || wants[1] || wants[3];
    let ds = if need_ds {
        let vt = b.transpose_last2(vr)?;
        let dp = b.op(Op::MatMul, &[dy, vt])?;
        let dpp = b.mul(dp, p)?;
        let rs = b.reduce(ReduceKind::Sum, dpp, vec![3], true)?;
        let c = b.sub(dp, rs)?;
        Some(b.mul(p, c)?)
    } else {
        None
    };
    let dq = match ds.filter(|_| wants[0]) {
        Some(ds) => {
            let g = b.op(Op::MatMul, &[ds, kr])?;
            Some(b.mul_scalar(g, scale)?)
        }
        None => None,
    };
    let dk = match ds.filter(|_| wants[1]) {
        Some(ds) => {
            let dst = b.transpose_last2(ds)?;
            let g = b.op(Op::MatMul, &[dst, x[0]])?;
            let g = b.mul_scalar(g, scale)?;
            Some(fold(b, g, &ks)?)
        }
        None => None,
    };
    let dm = match ds.filter(|_| wants[3]) {
        Some(ds) => {
            let ms = b.shape(x[3]);
            Some(b.unbroadcast(ds, &ms)?)
        }
        None => None,
    };
    Ok(vec![dq, dk, dv, dm])
}

/// y = x·r·s with r = (mean(x²) + eps)^-½ over the normalised dims:
/// dx = r·(g - x̂·mean(g·x̂)) with g = dy·s and x̂ = x·r; ds = Σ_lead dy·x̂.
fn rms_norm_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    axis: usize,
    eps: f32,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let shape = b.shape(x[0]);
    let norm_axes: Vec<usize> = (axis..shape.len()).collect();
    let lead_axes: Vec<usize> = (0..axis).collect();
    let sq = b.mul(x[0], x[0])?;
    let ms = b.reduce(ReduceKind::Mean, sq, norm_axes.clone(), true)?;
    let me = b.add_scalar(ms, eps as f64)?;
    let sd = b.unary(UnaryOp::Sqrt, me)?;
    let r = b.unary(UnaryOp::Reciprocal, sd)?;
    let xhat = b.mul(x[0], r)?;
    let gx = if wants[0] {
        let g = b.mul(dy, x[1])?;
        let gx_xhat = b.mul(g, xhat)?;
        let m = b.reduce(ReduceKind::Mean, gx_xhat, norm_axes, true)?;
        let t = b.mul(xhat, m)?;
        let d = b.sub(g, t)?;
        Some(b.mul(d, r)?)
    } else {
        None
    };
    let gscale = if wants[1] {
        let p = b.mul(dy, xhat)?;
        Some(b.reduce(ReduceKind::Sum, p, lead_axes, false)?)
    } else {
        None
    };
    Ok(vec![gx, gscale])
}

fn layer_norm_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    axis: usize,
    eps: f32,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let shape = b.shape(x[0]);
    let norm_axes: Vec<usize> = (axis..shape.len()).collect();
    let lead_axes: Vec<usize> = (0..axis).collect();
    // Recompute the statistics from x (PyTorch saves mean and rstd; they are small).
    let mean = b.reduce(ReduceKind::Mean, x[0], norm_axes.clone(), true)?;
    let xc = b.sub(x[0], mean)?;
    let sq = b.mul(xc, xc)?;
    let var = b.reduce(ReduceKind::Mean, sq, norm_axes.clone(), true)?;
    let ve = b.add_scalar(var, eps as f64)?;
    let sd = b.unary(UnaryOp::Sqrt, ve)?;
    let rstd = b.unary(UnaryOp::Reciprocal, sd)?;
    let xhat = b.mul(xc, rstd)?;
    let gx = if wants[0] {
        let gxhat = b.mul(dy, x[1])?;
        let m1 = b.reduce(ReduceKind::Mean, gxhat, norm_axes.clone(), true)?;
        let gx_xhat = b.mul(gxhat, xhat)?;
        let m2 = b.reduce(ReduceKind::Mean, gx_xhat, norm_axes.clone(), true)?;
        let t1 = b.sub(gxhat, m1)?;
        let t2 = b.mul(xhat, m2)?;
        let t = b.sub(t1, t2)?;
        Some(b.mul(t, rstd)?)
    } else {
        None
    };
    let gscale = if wants[1] {
        let p = b.mul(dy, xhat)?;
        Some(b.reduce(ReduceKind::Sum, p, lead_axes.clone(), false)?)
    } else {
        None
    };
    let mut out = vec![gx, gscale];
    if x.len() == 3 {
        out.push(if wants[2] {
            Some(b.reduce(ReduceKind::Sum, dy, lead_axes, false)?)
        } else {
            None
        });
    }
    Ok(out)
}

/// The fused LM-head loss's VJP, chunk by chunk like its forward: each chunk's logits are
/// recomputed, `g = (softmax − onehot(target))·dy/N`, `dh = g·wᵀ` (concatenated),
/// `dw = Σ hᵀ·g` and the bias's `Σ g` (accumulated in f32, or f64 for f64). No `[N, V]`
/// tensor is formed.
fn lm_head_ce_vjp(
    b: &mut Builder,
    x: &[ValueId],
    dy: ValueId,
    chunk: usize,
    wants: &[bool],
) -> Result<Vec<Option<ValueId>>, String> {
    let (h, w, t, bias) = (x[0], x[1], x[2], x.get(3).copied());
    let mut db = None;
    let (n, d) = (b.shape(h)[0], b.shape(h)[1]);
    let vocab = b.shape(w)[1];
    let dt = b.dtype(h);
    let scale = b.mul_scalar(dy, 1.0 / n as f64)?;
    let wt = if wants[0] {
        Some(b.transpose(w, vec![1, 0])?)
    } else {
        None
    };
    let acc = memc_ir::loss_dtype(dt);
    let one = b.scalar(acc, 1.0);
    let (mut dh, mut dw) = (vec![], None);
    for r0 in (0..n).step_by(chunk.max(1)) {
        let r1 = (r0 + chunk).min(n);
        let rows = |width: usize| Op::Slice {
            starts: vec![r0, 0],
            ends: vec![r1, width],
            steps: vec![1, 1],
        };
        let hk = b.op(rows(d), &[h])?;
        let logits = b.op(Op::MatMul, &[hk, w])?;
        let logits = match bias {
            Some(bias) => b.add(logits, bias)?,
            None => logits,
        };
        let logits = b.cast(logits, acc)?;
        let p = b.op(Op::Softmax { axis: 1 }, &[logits])?;
        let tk = b.op(rows(1), &[t])?;
        let ones = b.expand(one, vec![r1 - r0, 1])?;
        let onehot = b.op(
            Op::ScatterElementsAdd {
                axis: 1,
                shape: vec![r1 - r0, vocab],
            },
            &[ones, tk],
        )?;
        let diff = b.sub(p, onehot)?;
        let gk = b.mul(diff, scale)?;
        if bias.is_some() && wants[3] {
            let part = b.reduce(ReduceKind::Sum, gk, vec![0], false)?;
            db = Some(match db {
                Some(acc) => b.add(acc, part)?,
                None => part,
            });
        }
        let gk = b.cast(gk, dt)?;
        if let Some(wt) = wt {
            dh.push(b.op(Op::MatMul, &[gk, wt])?);
        }
        if wants[1] {
            let hkt = b.transpose(hk, vec![1, 0])?;
            let part = b.op(Op::MatMul, &[hkt, gk])?;
            let part = b.cast(part, acc)?;
            dw = Some(match dw {
                Some(acc) => b.add(acc, part)?,
                None => part,
            });
        }
    }
    let dh = if wants[0] {
        Some(if dh.len() == 1 {
            dh[0]
        } else {
            b.op(Op::Concat { axis: 0 }, &dh)?
        })
    } else {
        None
    };
    let dw = match dw {
        Some(acc) => Some(b.cast(acc, b.dtype(w))?),
        None => None,
    };
    let mut out = vec![dh, dw, None];
    if let Some(bias) = bias {
        out.push(match db {
            Some(acc) => Some(b.cast(acc, b.dtype(bias))?),
            None => None,
        });
    }
    Ok(out)
}
