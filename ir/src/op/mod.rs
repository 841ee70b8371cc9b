//! The op set, its attributes and its shape inference.
//!
//! Ops are the forward ops PyTorch's ONNX exporters produce for transformers, after the frontend
//! has folded shape arithmetic away: shapes are static, so `Reshape`, `Expand` and `Slice` carry
//! their targets as attributes. Binary ops broadcast as NumPy does.
//!
//! Shape inference is split by op family, one file each, with the same families as the
//! interpreter (`interp/`), the VJPs (`memc_passes::autodiff`) and the kernels
//! (`memc_codegen::ops`): `elementwise` (unary and binary ops, `where`, `cast`), `layout`
//! (`reshape`, `transpose`, `slice`, `slice_scatter`, `concat`, `expand`, `trilu`), `gather`
//! (the gathers and their scatter transposes), `reduce` (reductions, `top_k`), `linalg`
//! (`matmul`), `nn` (softmaxes, norms, attention and its backward ops) and `blocks` (the block
//! ops, with their steps, [`Op::expansion`]). A new op of family F gets its variant, name and
//! attributes here and its shape inference in `op/F.rs`.

use std::collections::BTreeMap;

use crate::{DType, TensorType};

mod blocks;
mod elementwise;
mod gather;
mod layout;
mod linalg;
mod nn;
mod reduce;

/// Elementwise unary ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// -x
    Neg,
    /// e^x
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// 1/x
    Reciprocal,
    /// tanh x
    Tanh,
    /// The error function.
    Erf,
    /// 1/(1+e^-x)
    Sigmoid,
    /// cos x
    Cos,
    /// sin x
    Sin,
    /// Logical not (bool).
    Not,
    /// x is NaN → bool.
    IsNaN,
    /// x·sigmoid(x) (SiLU, Swish).
    Silu,
    /// x·Φ(x) = 0.5·x·(1 + erf(x/√2)) (exact GELU).
    Gelu,
    /// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) (GELU's tanh approximation).
    GeluTanh,
}

/// How the attention ops score query row `i` against key `j`: `r = q_i·k_j·scale`, soft-capped
/// to `softcap·tanh(r/softcap)` when `softcap > 0` (Gemma 2), plus the mask; and `-inf` where
/// `causal` hides a later key (`j > i + T − S`) or `window > 0` an older one
/// (`i + T − S − j ≥ window`: each query sees its last `window` keys). The attributes replace
/// the S×T masks exporters build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scores {
    /// The factor applied to `q·kᵀ`.
    pub scale: f32,
    /// The logit soft-cap (0: none).
    pub softcap: f32,
    /// Keys after the query are hidden.
    pub causal: bool,
    /// Keys this far behind the query or more are hidden (0: none).
    pub window: usize,
}

impl Scores {
    /// `q·kᵀ·scale` plus the mask, nothing else.
    pub fn scaled(scale: f32) -> Scores {
        Scores {
            scale,
            softcap: 0.0,
            causal: false,
            window: 0,
        }
    }

    /// Whether key `j` of `t` is hidden from query `i` of `s` by `causal` or `window` (the
    /// query's position among the keys is `i + t − s`).
    pub fn hides(&self, i: usize, j: usize, s: usize, t: usize) -> bool {
        let (qi, kj) = (i + t, j + s);
        (self.causal && kj > qi) || (self.window > 0 && qi >= kj + self.window)
    }

    /// The attributes as printed: `scale`, then `softcap`, `causal` and `window` when set.
    fn attrs(&self) -> Vec<(&'static str, Attr)> {
        let mut a = vec![("scale", Attr::Float(self.scale))];
        if self.softcap != 0.0 {
            a.push(("softcap", Attr::Float(self.softcap)));
        }
        if self.causal {
            a.push(("causal", Attr::Bool(true)));
        }
        if self.window != 0 {
            a.push(("window", Attr::Int(self.window as i64)));
        }
        a
    }
}

/// The [`Scores`] attributes: `scale`, and `softcap`, `causal` and `window` when present.
fn scores(
    attrs: &BTreeMap<String, Attr>,
    get: &mut dyn FnMut(&str) -> Result<Attr, String>,
) -> Result<Scores, String> {
    let float = |a: Attr, k: &str| match a {
        Attr::Float(e) => Ok(e),
        _ => Err(format!("attribute `{k}` must be a float")),
    };
    let mut s = Scores::scaled(float(get("scale")?, "scale")?);
    if attrs.contains_key("softcap") {
        s.softcap = float(get("softcap")?, "softcap")?;
        if !(s.softcap > 0.0 && s.softcap.is_finite()) {
            return Err("attribute `softcap` must be positive".into());
        }
    }
    if attrs.contains_key("causal") {
        s.causal = match get("causal")? {
            Attr::Bool(b) => b,
            _ => return Err("attribute `causal` must be a bool".into()),
        };
    }
    if attrs.contains_key("window") {
        s.window = match get("window")? {
            Attr::Int(w) if w >= 0 => w as usize,
            _ => return Err("attribute `window` must be a count".into()),
        };
    }
    Ok(s)
}

/// Elementwise binary ops with NumPy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a * b
    Mul,
    /// a / b (integer division truncates toward zero)
    Div,
    /// a ^ b (b may have another numeric dtype; the result has a's)
    Pow,
    /// a == b → bool
    Equal,
    /// a < b → bool
    Less,
    /// a <= b → bool
    LessEqual,
    /// a > b → bool
    Greater,
    /// a >= b → bool
    GreaterEqual,
    /// max(a, b) (NaN if either is NaN)
    Max,
    /// min(a, b) (NaN if either is NaN)
    Min,
    /// a && b (bool)
    And,
}

/// Reductions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceKind {
    /// Σ
    Sum,
    /// Σ / n
    Mean,
    /// max
    Max,
}

/// A graph operation. All ops have one output today; nodes allow several.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Elementwise unary op.
    Unary(UnaryOp),
    /// Elementwise binary op with broadcasting.
    Binary(BinaryOp),
    /// `where(cond, a, b)`: a where cond, else b; all three broadcast.
    Where,
    /// Convert to another dtype.
    Cast {
        /// Target dtype.
        to: DType,
    },
    /// NumPy matmul: batched over leading dims (broadcast), 1-D operands promoted.
    MatMul,
    /// Softmax along one axis.
    Softmax {
        /// The normalised axis.
        axis: usize,
    },
    /// Log-softmax along one axis.
    LogSoftmax {
        /// The normalised axis.
        axis: usize,
    },
    /// `(x - mean) / sqrt(var + eps) * scale (+ bias)` over dims `axis..rank`; inputs x, scale
    /// and optionally bias, both of shape `x.shape[axis..]`.
    LayerNorm {
        /// First normalised dim.
        axis: usize,
        /// Added to the variance.
        epsilon: f32,
    },
    /// `x / sqrt(mean(x², dims axis..rank) + eps) * scale`; inputs x and scale (of shape
    /// `x.shape[axis..]`). What the canonicalisation recognises in Llama's and Qwen's norms.
    RmsNorm {
        /// First normalised dim.
        axis: usize,
        /// Added to the mean square.
        epsilon: f32,
    },
    /// Scaled dot-product attention, `softmax(s)·v` over the last dim with the scores `s`
    /// of [`Scores`] (a row whose softmax is undefined, all `-inf`, gives zeros). Inputs q
    /// `[B, H, S, D]`, k `[B, Hk, T, D]`, v `[B, Hk, T, Dv]` and an additive mask
    /// broadcastable to `[B, H, S, T]` (a rank-0 zero when the causal and window attributes
    /// say everything); `H` is a multiple of `Hk` (grouped-query attention: query head `h`
    /// reads key/value head `h / (H / Hk)`). Result `[B, H, S, Dv]`.
    Attention(Scores),
    /// The row-wise log-sum-exp of attention's scores, `log Σ_j exp(s_j)` (`-inf` for a fully
    /// masked row): inputs q, k and mask as for [`Op::Attention`]; result `[B, H, S]`. Part
    /// of attention's backward pass.
    AttentionLse(Scores),
    /// One gradient of attention, recomputing the probabilities row by row from the saved
    /// log-sum-exp (no S×T tensor): inputs q, k, v, mask, lse (`[B, H, S]`), dy (`[B, H, S,
    /// Dv]`) and delta = Σ_c dy·y (`[B, H, S]`); `wrt` 0 gives dq, 1 dk, 2 dv.
    AttentionGrad {
        /// As in [`Op::Attention`].
        scores: Scores,
        /// Which operand's gradient.
        wrt: usize,
    },
    /// A SwiGLU feed-forward block, `(silu(x·w_gate) ⊙ (x·w_up))·w_down`: inputs x
    /// `[.., d]`, w_gate and w_up `[d, f]`, w_down `[f, e]`; result `[.., e]`. What the
    /// canonicalisation recognises in Llama's and Qwen's MLPs; lowered back to GEMMs and
    /// elementwise ops ([`Op::expansion`]) before autodiff and code generation.
    SwigluFfn,
    /// A GELU feed-forward block, `gelu(x·w1 + b1)·w2 + b2` (biases optional: inputs x, w1
    /// `[d, f]`, [b1 `[f]`,] w2 `[f, e]`[, b2 `[e]`], i.e. 3 or 5 operands); result `[.., e]`.
    /// With 4 operands it is gated (GeGLU, Gemma's MLP): `(gelu(x·w_gate) ⊙ (x·w_up))·w_down`,
    /// operands as [`Op::SwigluFfn`].
    GeluFfn {
        /// The tanh approximation of GELU instead of the exact (erf) one.
        tanh: bool,
    },
    /// Rotary position embedding with `rotate_half`: `x·cos + rotate_half(x)·sin`, where
    /// `rotate_half(x) = concat(−x[.., D/2:], x[.., :D/2])` on the last dim (D even). Inputs x,
    /// and cos and sin broadcastable to x's shape; result x's type. A block like the FFNs:
    /// lowered to its steps before autodiff and code generation.
    Rope,
    /// A residual connection, `x + f`: inputs the stream x and the branch f computed from it
    /// (an attention or FFN sub-block's output), of one type. Marks the residual structure
    /// for the rewrites that need it (reversible layers); lowered to `add`.
    Residual,
    /// One half of a reversible (MEFT) coupling, `s·a + f`: inputs the stream a, the branch f
    /// computed from the other stream (both of one type) and the scale s (a rank-0 constant
    /// of their dtype); result a's type. Marks the coupling so the training builder can invert
    /// it in the backward pass (`a = (y − f)/s`) instead of keeping the layer's activations
    /// (`memc_passes::reversible`); lowered to `mul` and `add`.
    RevCouple,
    /// The LM head's cross-entropy, fused and chunked: `−mean_n log_softmax(h·w)[n, t_n]`
    /// computed `chunk` rows of `h` at a time, so the `[N, V]` logits are never held whole
    /// (in f32 when `h` is a half type). Inputs h `[N, d]`, w `[d, V]`, the targets `[N, 1]`
    /// (integers), with `weighted` the rows' weights `[N, 1]` (in the result's dtype), and
    /// optionally a bias `[V]` added to the logits; result a scalar (f32 for half inputs,
    /// else h's dtype; [`loss_dtype`]). Weighted, the loss is `−Σ_n r_n·log_softmax(h·w)[n,
    /// t_n]` instead of the mean: a masked mean when `r` is the kept rows' `1/count` and 0
    /// elsewhere (labels of −100 ignored, as transformers' causal-LM loss). Its VJP
    /// recomputes each chunk's logits.
    LmHeadCe {
        /// Rows per chunk.
        chunk: usize,
        /// Whether the rows' weights follow the targets.
        weighted: bool,
    },
    /// The indices of the `k` largest values along the last dim, largest first, ties to the
    /// lower index (`torch.topk(x, k, sorted=True)`'s indices); result `[.., k]`, i16 when
    /// the dim has at most 32,767 entries, else i32.
    TopK {
        /// How many.
        k: usize,
    },
    /// A Mixture-of-Channels SwiGLU block: `(silu(g) ⊙ topk_mask(g) ⊙ u)·w_down` with
    /// `g = x·w_gate`, `u = x·w_up` and the mask keeping the `k` largest gate values per
    /// token. Operands as [`Op::SwigluFfn`]. Its steps gather the `k` selected gate and up
    /// values, so autodiff keeps only those and their indices.
    MocFfn {
        /// Channels kept per token.
        k: usize,
        /// The gate's activation: `None` SiLU (SwiGLU), `Some(tanh)` GELU (GeGLU, a gated
        /// [`Op::GeluFfn`]; `tanh` as there). Printed as `gelu_tanh` only when GELU.
        gelu: Option<bool>,
    },
    /// Reduction over `axes` (sorted, unique).
    Reduce {
        /// Sum, mean or max.
        kind: ReduceKind,
        /// Reduced dims.
        axes: Vec<usize>,
        /// Keep reduced dims as size 1.
        keep_dims: bool,
    },
    /// `data.take(indices, axis)`: out shape = data[..axis] ++ indices ++ data[axis+1..];
    /// negative indices count from the end.
    Gather {
        /// Indexed dim of data.
        axis: usize,
    },
    /// ONNX GatherElements: out[i] = data[i with i[axis] = indices[i]].
    GatherElements {
        /// Indexed dim.
        axis: usize,
    },
    /// ONNX GatherND with batch_dims 0: the last dim of `indices` (q) indexes the first q dims
    /// of data; out shape = indices[..-1] ++ data[q..]. Negative indices count from the end.
    GatherNd,
    /// Same elements, new shape.
    Reshape {
        /// Output shape.
        shape: Vec<usize>,
    },
    /// Permute dims: out dim i is input dim `perm[i]`.
    Transpose {
        /// The permutation.
        perm: Vec<usize>,
    },
    /// Strided window on every dim: `starts[i]..ends[i]` step `steps[i]` (steps ≥ 1).
    Slice {
        /// First index per dim.
        starts: Vec<usize>,
        /// One past the last index per dim.
        ends: Vec<usize>,
        /// Stride per dim.
        steps: Vec<usize>,
    },
    /// Join inputs along one dim.
    Concat {
        /// The joined dim.
        axis: usize,
    },
    /// Broadcast to a shape (NumPy rules).
    Expand {
        /// Output shape.
        shape: Vec<usize>,
    },
    /// Keep the upper (or lower) triangle of the last two dims, zero elsewhere.
    Trilu {
        /// Upper triangle if true.
        upper: bool,
        /// Diagonal offset.
        k: i64,
    },
    /// The transpose of `gather`: `out = zeros(shape)`, then for every index position
    /// `out[.., indices[i], ..] += updates[.., i, ..]` along `axis`. Operands: updates, indices.
    ScatterAdd {
        /// Scattered dim of the result.
        axis: usize,
        /// Result shape.
        shape: Vec<usize>,
    },
    /// The transpose of `gather_elements`: `out = zeros(shape)`, `out[i with i[axis] =
    /// indices[i]] += updates[i]`. Operands: updates, indices (same shape).
    ScatterElementsAdd {
        /// Scattered dim.
        axis: usize,
        /// Result shape.
        shape: Vec<usize>,
    },
    /// The transpose of `gather_nd`: `out = zeros(shape)`, `out[indices[t]] += updates[t]`.
    /// Operands: updates, indices.
    ScatterNdAdd {
        /// Result shape.
        shape: Vec<usize>,
    },
    /// The transpose of `slice`: `zeros(shape)` with the operand written at
    /// `starts[k] + i * steps[k]` in every dim k.
    SliceScatter {
        /// Result shape.
        shape: Vec<usize>,
        /// First index per dim.
        starts: Vec<usize>,
        /// Stride per dim.
        steps: Vec<usize>,
    },
}

/// An attribute value in the textual IR.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f32),
    /// A boolean.
    Bool(bool),
    /// A list of integers.
    Ints(Vec<i64>),
    /// A dtype.
    DType(DType),
}

const UNARY: [(UnaryOp, &str); 15] = [
    (UnaryOp::Neg, "neg"),
    (UnaryOp::Exp, "exp"),
    (UnaryOp::Log, "log"),
    (UnaryOp::Sqrt, "sqrt"),
    (UnaryOp::Reciprocal, "reciprocal"),
    (UnaryOp::Tanh, "tanh"),
    (UnaryOp::Erf, "erf"),
    (UnaryOp::Sigmoid, "sigmoid"),
    (UnaryOp::Cos, "cos"),
    (UnaryOp::Sin, "sin"),
    (UnaryOp::Not, "not"),
    (UnaryOp::IsNaN, "is_nan"),
    (UnaryOp::Silu, "silu"),
    (UnaryOp::Gelu, "gelu"),
    (UnaryOp::GeluTanh, "gelu_tanh"),
];

const BINARY: [(BinaryOp, &str); 13] = [
    (BinaryOp::Add, "add"),
    (BinaryOp::Sub, "sub"),
    (BinaryOp::Mul, "mul"),
    (BinaryOp::Div, "div"),
    (BinaryOp::Pow, "pow"),
    (BinaryOp::Equal, "equal"),
    (BinaryOp::Less, "less"),
    (BinaryOp::LessEqual, "less_equal"),
    (BinaryOp::Greater, "greater"),
    (BinaryOp::GreaterEqual, "greater_equal"),
    (BinaryOp::Max, "max"),
    (BinaryOp::Min, "min"),
    (BinaryOp::And, "and"),
];

const REDUCE: [(ReduceKind, &str); 3] = [
    (ReduceKind::Sum, "reduce_sum"),
    (ReduceKind::Mean, "reduce_mean"),
    (ReduceKind::Max, "reduce_max"),
];

fn usizes(v: &[usize]) -> Attr {
    Attr::Ints(v.iter().map(|&x| x as i64).collect())
}

/// An operand of one step of [`Op::expansion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// The block's operand `i`.
    Input(usize),
    /// The result of step `i` (an earlier one).
    Step(usize),
}

impl Op {
    /// The primitive steps a block op (`swiglu_ffn`, `gelu_ffn`, `moc_ffn`, `rope`,
    /// `residual`, `lm_head_ce`) stands for, given
    /// its operands' types; the last step's result is the block's. `None` for every other op. The
    /// interpreter evaluates blocks by these steps and the lowering pass emits them, so the
    /// two cannot disagree.
    pub fn expansion(&self, operands: &[TensorType]) -> Option<Vec<(Op, Vec<Operand>)>> {
        blocks::expansion(self, operands)
    }

    /// The op's name in the textual IR and in reports (`add`, `matmul`, `layer_norm`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Unary(u) => UNARY.iter().find(|(x, _)| x == u).unwrap().1,
            Op::Binary(b) => BINARY.iter().find(|(x, _)| x == b).unwrap().1,
            Op::Reduce { kind, .. } => REDUCE.iter().find(|(x, _)| x == kind).unwrap().1,
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::MatMul => "matmul",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::SwigluFfn => "swiglu_ffn",
            Op::Rope => "rope",
            Op::Residual => "residual",
            Op::RevCouple => "rev_couple",
            Op::LmHeadCe { .. } => "lm_head_ce",
            Op::TopK { .. } => "top_k",
            Op::MocFfn { .. } => "moc_ffn",
            Op::GeluFfn { .. } => "gelu_ffn",
            Op::Attention { .. } => "attention",
            Op::AttentionLse { .. } => "attention_lse",
            Op::AttentionGrad { .. } => "attention_grad",
            Op::Gather { .. } => "gather",
            Op::GatherElements { .. } => "gather_elements",
            Op::GatherNd => "gather_nd",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Expand { .. } => "expand",
            Op::Trilu { .. } => "trilu",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::ScatterElementsAdd { .. } => "scatter_elements_add",
            Op::ScatterNdAdd { .. } => "scatter_nd_add",
            Op::SliceScatter { .. } => "slice_scatter",
        }
    }

    /// The attributes, in printing order.
    pub fn attrs(&self) -> Vec<(&'static str, Attr)> {
        match self {
            Op::Unary(_)
            | Op::Binary(_)
            | Op::Where
            | Op::MatMul
            | Op::GatherNd
            | Op::SwigluFfn
            | Op::Rope
            | Op::Residual
            | Op::RevCouple => vec![],
            Op::GeluFfn { tanh } => vec![("tanh", Attr::Bool(*tanh))],
            Op::LmHeadCe { chunk, weighted } => {
                let mut a = vec![("chunk", Attr::Int(*chunk as i64))];
                if *weighted {
                    a.push(("weighted", Attr::Bool(true)));
                }
                a
            }
            Op::TopK { k } => vec![("k", Attr::Int(*k as i64))],
            Op::MocFfn { k, gelu } => {
                let mut a = vec![("k", Attr::Int(*k as i64))];
                if let Some(t) = gelu {
                    a.push(("gelu_tanh", Attr::Bool(*t)));
                }
                a
            }
            Op::Attention(s) | Op::AttentionLse(s) => s.attrs(),
            Op::AttentionGrad { scores, wrt } => {
                let mut a = scores.attrs();
                a.push(("wrt", Attr::Int(*wrt as i64)));
                a
            }
            Op::Cast { to } => vec![("to", Attr::DType(*to))],
            Op::Softmax { axis } | Op::LogSoftmax { axis } | Op::Concat { axis } => {
                vec![("axis", Attr::Int(*axis as i64))]
            }
            Op::Gather { axis } | Op::GatherElements { axis } => {
                vec![("axis", Attr::Int(*axis as i64))]
            }
            Op::LayerNorm { axis, epsilon } | Op::RmsNorm { axis, epsilon } => {
                vec![
                    ("axis", Attr::Int(*axis as i64)),
                    ("epsilon", Attr::Float(*epsilon)),
                ]
            }
            Op::Reduce {
                axes, keep_dims, ..
            } => {
                vec![
                    ("axes", usizes(axes)),
                    ("keep_dims", Attr::Bool(*keep_dims)),
                ]
            }
            Op::Reshape { shape } | Op::Expand { shape } => vec![("shape", usizes(shape))],
            Op::Transpose { perm } => vec![("perm", usizes(perm))],
            Op::Slice {
                starts,
                ends,
                steps,
            } => {
                vec![
                    ("starts", usizes(starts)),
                    ("ends", usizes(ends)),
                    ("steps", usizes(steps)),
                ]
            }
            Op::Trilu { upper, k } => vec![("upper", Attr::Bool(*upper)), ("k", Attr::Int(*k))],
            Op::ScatterAdd { axis, shape } | Op::ScatterElementsAdd { axis, shape } => {
                vec![("axis", Attr::Int(*axis as i64)), ("shape", usizes(shape))]
            }
            Op::ScatterNdAdd { shape } => vec![("shape", usizes(shape))],
            Op::SliceScatter {
                shape,
                starts,
                steps,
            } => {
                vec![
                    ("shape", usizes(shape)),
                    ("starts", usizes(starts)),
                    ("steps", usizes(steps)),
                ]
            }
        }
    }

    /// Builds an op from its textual name and attributes; the error says what is wrong.
    pub fn from_parts(name: &str, attrs: &BTreeMap<String, Attr>) -> Result<Op, String> {
        let mut used = 0usize;
        let mut get = |key: &str| -> Result<Attr, String> {
            used += 1;
            attrs
                .get(key)
                .cloned()
                .ok_or_else(|| format!("op `{name}` needs attribute `{key}`"))
        };
        let op = if let Some((u, _)) = UNARY.iter().find(|(_, n)| *n == name) {
            Op::Unary(*u)
        } else if let Some((b, _)) = BINARY.iter().find(|(_, n)| *n == name) {
            Op::Binary(*b)
        } else if let Some((kind, _)) = REDUCE.iter().find(|(_, n)| *n == name) {
            Op::Reduce {
                kind: *kind,
                axes: uints(get("axes")?, "axes")?,
                keep_dims: boolean(get("keep_dims")?, "keep_dims")?,
            }
        } else {
            match name {
                "where" => Op::Where,
                "matmul" => Op::MatMul,
                "swiglu_ffn" => Op::SwigluFfn,
                "rope" => Op::Rope,
                "residual" => Op::Residual,
                "rev_couple" => Op::RevCouple,
                "top_k" => Op::TopK {
                    k: uint(get("k")?, "k")?,
                },
                "moc_ffn" => Op::MocFfn {
                    k: uint(get("k")?, "k")?,
                    gelu: if attrs.contains_key("gelu_tanh") {
                        Some(boolean(get("gelu_tanh")?, "gelu_tanh")?)
                    } else {
                        None
                    },
                },
                "lm_head_ce" => Op::LmHeadCe {
                    chunk: match uint(get("chunk")?, "chunk")? {
                        0 => return Err("attribute `chunk` must be ≥ 1".into()),
                        c => c,
                    },
                    weighted: if attrs.contains_key("weighted") {
                        boolean(get("weighted")?, "weighted")?
                    } else {
                        false
                    },
                },
                "gelu_ffn" => Op::GeluFfn {
                    tanh: boolean(get("tanh")?, "tanh")?,
                },
                "gather_nd" => Op::GatherNd,
                "cast" => match get("to")? {
                    Attr::DType(to) => Op::Cast { to },
                    _ => return Err("attribute `to` must be a dtype".into()),
                },
                "softmax" => Op::Softmax {
                    axis: uint(get("axis")?, "axis")?,
                },
                "log_softmax" => Op::LogSoftmax {
                    axis: uint(get("axis")?, "axis")?,
                },
                "concat" => Op::Concat {
                    axis: uint(get("axis")?, "axis")?,
                },
                "gather" => Op::Gather {
                    axis: uint(get("axis")?, "axis")?,
                },
                "gather_elements" => Op::GatherElements {
                    axis: uint(get("axis")?, "axis")?,
                },
                "layer_norm" => Op::LayerNorm {
                    axis: uint(get("axis")?, "axis")?,
                    epsilon: match get("epsilon")? {
                        Attr::Float(e) => e,
                        _ => return Err("attribute `epsilon` must be a float".into()),
                    },
                },
                "attention_lse" => Op::AttentionLse(scores(attrs, &mut get)?),
                "attention_grad" => Op::AttentionGrad {
                    scores: scores(attrs, &mut get)?,
                    wrt: match uint(get("wrt")?, "wrt")? {
                        w @ 0..=2 => w,
                        _ => return Err("attribute `wrt` must be 0, 1 or 2".into()),
                    },
                },
                "attention" => Op::Attention(scores(attrs, &mut get)?),
                "rms_norm" => Op::RmsNorm {
                    axis: uint(get("axis")?, "axis")?,
                    epsilon: match get("epsilon")? {
                        Attr::Float(e) => e,
                        _ => return Err("attribute `epsilon` must be a float".into()),
                    },
                },
                "reshape" => Op::Reshape {
                    shape: uints(get("shape")?, "shape")?,
                },
                "expand" => Op::Expand {
                    shape: uints(get("shape")?, "shape")?,
                },
                "transpose" => Op::Transpose {
                    perm: uints(get("perm")?, "perm")?,
                },
                "slice" => Op::Slice {
                    starts: uints(get("starts")?, "starts")?,
                    ends: uints(get("ends")?, "ends")?,
                    steps: uints(get("steps")?, "steps")?,
                },
                "trilu" => Op::Trilu {
                    upper: boolean(get("upper")?, "upper")?,
                    k: int(get("k")?, "k")?,
                },
                "scatter_add" => Op::ScatterAdd {
                    axis: uint(get("axis")?, "axis")?,
                    shape: uints(get("shape")?, "shape")?,
                },
                "scatter_elements_add" => Op::ScatterElementsAdd {
                    axis: uint(get("axis")?, "axis")?,
                    shape: uints(get("shape")?, "shape")?,
                },
                "scatter_nd_add" => Op::ScatterNdAdd {
                    shape: uints(get("shape")?, "shape")?,
                },
                "slice_scatter" => Op::SliceScatter {
                    shape: uints(get("shape")?, "shape")?,
                    starts: uints(get("starts")?, "starts")?,
                    steps: uints(get("steps")?, "steps")?,
                },
                _ => return Err(format!("unknown op `{name}`")),
            }
        };
        if used != attrs.len() {
            let known: Vec<&str> = op.attrs().iter().map(|(k, _)| *k).collect();
            if let Some(extra) = attrs.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(format!("op `{name}` has no attribute `{extra}`"));
            }
        }
        Ok(op)
    }

    /// Output types for the given input types, or why the inputs are invalid.
    pub fn infer(&self, inputs: &[TensorType]) -> Result<Vec<TensorType>, String> {
        match self {
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } => {
                elementwise::infer(self, inputs)
            }
            Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::Slice { .. }
            | Op::SliceScatter { .. }
            | Op::Concat { .. }
            | Op::Expand { .. }
            | Op::Trilu { .. } => layout::infer(self, inputs),
            Op::Gather { .. }
            | Op::GatherElements { .. }
            | Op::GatherNd
            | Op::ScatterAdd { .. }
            | Op::ScatterElementsAdd { .. }
            | Op::ScatterNdAdd { .. } => gather::infer(self, inputs),
            Op::Reduce { .. } | Op::TopK { .. } => reduce::infer(self, inputs),
            Op::MatMul => linalg::infer(self, inputs),
            Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Attention { .. }
            | Op::AttentionLse { .. }
            | Op::AttentionGrad { .. } => nn::infer(self, inputs),
            Op::SwigluFfn
            | Op::GeluFfn { .. }
            | Op::MocFfn { .. }
            | Op::Rope
            | Op::Residual
            | Op::RevCouple
            | Op::LmHeadCe { .. } => blocks::infer(self, inputs),
        }
    }
}

// The attribute readers of `Op::from_parts`.
fn int(a: Attr, key: &str) -> Result<i64, String> {
    match a {
        Attr::Int(v) => Ok(v),
        _ => Err(format!("attribute `{key}` must be an integer")),
    }
}
fn uint(a: Attr, key: &str) -> Result<usize, String> {
    usize::try_from(int(a, key)?).map_err(|_| format!("attribute `{key}` must be ≥ 0"))
}
fn uints(a: Attr, key: &str) -> Result<Vec<usize>, String> {
    match a {
        Attr::Ints(v) => v
            .into_iter()
            .map(|x| usize::try_from(x).map_err(|_| format!("attribute `{key}` must be ≥ 0")))
            .collect(),
        _ => Err(format!("attribute `{key}` must be a list of integers")),
    }
}
fn boolean(a: Attr, key: &str) -> Result<bool, String> {
    match a {
        Attr::Bool(v) => Ok(v),
        _ => Err(format!("attribute `{key}` must be true or false")),
    }
}

/// `Ok` when `op` has `n` operands, else the error [`Op::infer`] reports.
fn arity(op: &Op, inputs: &[TensorType], n: usize) -> Result<(), String> {
    if inputs.len() == n {
        Ok(())
    } else {
        Err(format!(
            "`{}` takes {n} operand(s), got {}",
            op.name(),
            inputs.len()
        ))
    }
}

/// A single result of type `t`.
fn one(t: TensorType) -> Result<Vec<TensorType>, String> {
    Ok(vec![t])
}

/// The dtype `lm_head_ce` computes its logits and loss in: f32 for half inputs, else the
/// input's (f32 or f64).
pub fn loss_dtype(h: DType) -> DType {
    match h {
        DType::BF16 | DType::F16 => DType::F32,
        other => other,
    }
}

fn float_operand(op: &Op, x: &TensorType) -> Result<(), String> {
    if x.dtype.is_float() {
        Ok(())
    } else {
        Err(format!(
            "`{}` needs a float operand, got {}",
            op.name(),
            x.dtype
        ))
    }
}

fn int_indices(i: &TensorType) -> Result<(), String> {
    match i.dtype {
        DType::I64 | DType::I32 | DType::I16 => Ok(()),
        d => Err(format!("indices must be i64 or i32, got {d}")),
    }
}

fn check_axis(axis: usize, rank: usize) -> Result<(), String> {
    if axis < rank {
        Ok(())
    } else {
        Err(format!("axis {axis} is out of range for rank {rank}"))
    }
}

/// NumPy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let da = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let db = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(format!("shapes {a:?} and {b:?} do not broadcast")),
        };
    }
    Ok(out)
}
