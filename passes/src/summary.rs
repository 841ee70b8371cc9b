//! `describe`: what the canonicalisation recognised, layer by layer, in a forward graph. Each
//! layer ([`crate::remat::layers`]: the residual stream) gets its attention (heads, key/value
//! heads), FFN kind, norms and residual form; what is left unrecognised is named, with the
//! transforms it rules out, so the driver can report and warn.

use std::collections::HashSet;

use memc_ir::{BinaryOp, Graph, NodeId, Op, ValueId};

/// A layer's attention, as recognised.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionBlock {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Its scores' attributes (causal, window, soft-cap), as `--report` prints them.
    pub scores: memc_ir::Scores,
    /// Whether its mask is still a tensor with the query and key dims (S×T).
    pub full_mask: bool,
}

impl AttentionBlock {
    /// `causal`, `window W`, `softcap C` and `S×T mask`, as they apply.
    pub fn notes(&self) -> Vec<String> {
        let mut v = vec![];
        if self.scores.causal {
            v.push("causal".to_string());
        }
        if self.scores.window > 0 {
            v.push(format!("window {}", self.scores.window));
        }
        if self.scores.softcap > 0.0 {
            v.push(format!("softcap {}", self.scores.softcap));
        }
        if self.full_mask {
            v.push("S×T mask".to_string());
        }
        v
    }

    /// `mha` (one key/value head per query head), `mqa` (one for all) or `gqa`.
    pub fn kind(&self) -> &'static str {
        if self.kv_heads == self.heads {
            "mha"
        } else if self.kv_heads == 1 {
            "mqa"
        } else {
            "gqa"
        }
    }
}

/// One layer's blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerBlocks {
    /// The recognised attention (`None` when the layer's softmax was not recognised as one).
    pub attention: Option<AttentionBlock>,
    /// `swiglu`, `geglu`, `gelu`, `relu`, `moc` or `unrecognised`.
    pub ffn: &'static str,
    /// The FFN's gate and up projections are one fused GEMM (its weight is sliced).
    pub ffn_fused_gate_up: bool,
    /// `rms_norm`, `layer_norm`, `mixed` or `none`.
    pub norm: &'static str,
    /// Norms of the residual stream in the layer (q/k norms not counted).
    pub norms: usize,
    /// Norms over attention heads (Qwen 3's q and k norms).
    pub qk_norms: usize,
    /// `pre-norm`, `post-norm`, `sandwich` or `parallel`.
    pub residual: &'static str,
    /// Nodes left unrecognised (a softmax that is not an attention, an FFN that is no block).
    pub unrecognised: Vec<String>,
}

/// Something the rules did not recognise, and what that rules out.
#[derive(Debug, Clone, PartialEq)]
pub struct Unrecognised {
    /// What (`layer 0 attention`).
    pub what: String,
    /// Its nodes.
    pub nodes: Vec<String>,
    /// The transforms or savings it rules out.
    pub rules_out: &'static str,
}

/// What [`describe`] found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Recognition {
    /// The layers, in order.
    pub layers: Vec<LayerBlocks>,
    /// What is left unrecognised.
    pub unrecognised: Vec<Unrecognised>,
}

fn node_name(g: &Graph, n: NodeId) -> String {
    format!("{} ({})", g.node_label(n), g.node(n).op.name())
}

fn is_norm(op: &Op) -> bool {
    matches!(op, Op::RmsNorm { .. } | Op::LayerNorm { .. })
}

/// Whether `v` is a one-element constant equal to 0.
fn is_zero(g: &Graph, v: ValueId) -> bool {
    g.constant(v)
        .is_some_and(|t| t.numel() == 1 && t.dtype().is_float() && t.to_f64_vec()[0] == 0.0)
}

/// Describes the layers of the forward graph `g` (see the module docs).
pub fn describe(g: &Graph) -> Recognition {
    let layers = crate::remat::layers(g);
    let mut out = Recognition::default();
    if layers.is_empty() {
        let softmax: Vec<String> = (0..g.nodes().len())
            .map(|i| NodeId(i as u32))
            .filter(|&n| matches!(g.node(n).op, Op::Softmax { .. }))
            .map(|n| node_name(g, n))
            .collect();
        // A softmax without layers around it is an attention the rules missed; a graph
        // without one is no transformer (nothing to say).
        if !softmax.is_empty() {
            out.unrecognised.push(Unrecognised {
                what: "transformer layers (no residual connection around an attention or softmax)"
                    .into(),
                nodes: softmax,
                rules_out: "--remat full, --activation-budget, --reversible and --pipeline-stages",
            });
        }
        return out;
    }
    let d = g.value(layers[0].input).ty.shape.last().copied();
    let post_norm_model = g
        .producer(layers[0].output)
        .is_some_and(|p| is_norm(&g.node(p).op));
    let count = layers.len();
    for (i, layer) in layers.iter().enumerate() {
        let mut values: Vec<ValueId> = layer.body.clone();
        values.push(layer.output);
        let mut nodes: Vec<NodeId> = values.iter().filter_map(|&v| g.producer(v)).collect();
        if i + 1 == count && post_norm_model {
            // The last post-norm layer ends in the norm after its residual.
            if let Some(p) = (0..g.nodes().len())
                .map(|k| NodeId(k as u32))
                .find(|&k| is_norm(&g.node(k).op) && g.node(k).inputs[0] == layer.output)
            {
                nodes.push(p);
            }
        }
        let set: HashSet<NodeId> = nodes.iter().copied().collect();
        let mut nodes: Vec<NodeId> = set.into_iter().collect();
        nodes.sort();
        let ops = || nodes.iter().map(|&n| (n, g.node(n)));
        let attention = ops().find_map(|(_, n)| match n.op {
            Op::Attention(scores) => Some(AttentionBlock {
                heads: g.value(n.inputs[0]).ty.shape[1],
                kv_heads: g.value(n.inputs[1]).ty.shape[1],
                scores,
                full_mask: {
                    let m = &g.value(n.inputs[3]).ty.shape;
                    m.len() >= 2 && m[m.len() - 2] > 1 && m[m.len() - 1] > 1
                },
            }),
            _ => None,
        });
        let mut unrecognised = vec![];
        if attention.is_none() {
            let softmax: Vec<String> = ops()
                .filter(|(_, n)| matches!(n.op, Op::Softmax { .. }))
                .map(|(k, _)| node_name(g, k))
                .collect();
            unrecognised.extend(softmax.iter().cloned());
            out.unrecognised.push(Unrecognised {
                what: format!("layer {i} attention"),
                nodes: softmax,
                rules_out:
                    "flash-style attention (the S×S probabilities are kept for the backward pass)",
            });
        }
        let ffn = ops()
            .find_map(|(_, n)| match n.op {
                Op::SwigluFfn => Some("swiglu"),
                Op::GeluFfn { .. } if n.inputs.len() == 4 => Some("geglu"),
                Op::GeluFfn { .. } => Some("gelu"),
                Op::MocFfn { .. } => Some("moc"),
                _ => None,
            })
            .or_else(|| {
                ops()
                    .any(|(_, n)| {
                        n.op == Op::Binary(BinaryOp::Max) && n.inputs.iter().any(|&v| is_zero(g, v))
                    })
                    .then_some("relu")
            })
            .unwrap_or("unrecognised");
        if ffn == "unrecognised" {
            out.unrecognised.push(Unrecognised {
                what: format!("layer {i} FFN"),
                nodes: vec![],
                rules_out: "--moc-k (no gated FFN block)",
            });
        }
        let ffn_fused_gate_up = ops().any(|(_, n)| {
            matches!(n.op, Op::SwigluFfn | Op::GeluFfn { .. } | Op::MocFfn { .. })
                && n.inputs.len() == 4
                && g.producer(n.inputs[1])
                    .is_some_and(|p| matches!(g.node(p).op, Op::Slice { .. }))
        });
        let (mut norms, mut qk_norms, mut kinds) = (0, 0, HashSet::new());
        for (_, n) in ops().filter(|(_, n)| is_norm(&n.op)) {
            let x = &g.value(n.inputs[0]).ty;
            if x.shape.last().copied() != d || x.rank() != g.value(layer.input).ty.rank() {
                qk_norms += 1;
            } else {
                norms += 1;
                kinds.insert(n.op.name());
            }
        }
        let norm = match kinds.len() {
            0 => "none",
            1 if kinds.contains("rms_norm") => "rms_norm",
            1 => "layer_norm",
            _ => "mixed",
        };
        let residuals: Vec<&memc_ir::Node> = ops()
            .filter(|(_, n)| n.op == Op::Residual)
            .map(|(_, n)| n)
            .collect();
        let normed = |v: ValueId| g.producer(v).is_some_and(|p| is_norm(&g.node(p).op));
        let residual = if residuals.len() == 1 {
            "parallel"
        } else if residuals.iter().any(|r| normed(r.inputs[1])) {
            "sandwich"
        } else if residuals.len() >= 2 && normed(residuals[1].inputs[0]) {
            "post-norm"
        } else {
            "pre-norm"
        };
        out.layers.push(LayerBlocks {
            attention,
            ffn,
            ffn_fused_gate_up,
            norm,
            norms,
            qk_norms,
            residual,
            unrecognised,
        });
    }
    out
}
