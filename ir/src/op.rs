//! The op set, its attributes and its shape inference.
//!
//! Ops are the forward ops PyTorch's ONNX exporters produce for transformers, after the frontend
//! has folded shape arithmetic away: shapes are static, so `Reshape`, `Expand` and `Slice` carry
//! their targets as attributes. Binary ops broadcast as NumPy does.

use std::collections::BTreeMap;

use crate::{DType, TensorType};

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
    /// Scaled dot-product attention, `softmax(q·kᵀ·scale + mask)·v` over the last dim
    /// (a row whose softmax is undefined, all `-inf`, gives zeros). Inputs q `[B, H, S, D]`,
    /// k `[B, Hk, T, D]`, v `[B, Hk, T, Dv]` and an additive mask broadcastable to
    /// `[B, H, S, T]`; `H` is a multiple of `Hk` (grouped-query attention: query head `h`
    /// reads key/value head `h / (H / Hk)`). Result `[B, H, S, Dv]`.
    Attention {
        /// The factor applied to `q·kᵀ`.
        scale: f32,
    },
    /// The row-wise log-sum-exp of attention's scores, `log Σ_j exp(q·kᵀ·scale + mask)`
    /// (`-inf` for a fully masked row): inputs q, k and mask as for
    /// [`Op::Attention`]; result `[B, H, S]`. Part of attention's backward pass.
    AttentionLse {
        /// As in [`Op::Attention`].
        scale: f32,
    },
    /// One gradient of attention, recomputing the probabilities row by row from the saved
    /// log-sum-exp (no S×T tensor): inputs q, k, v, mask, lse (`[B, H, S]`), dy (`[B, H, S,
    /// Dv]`) and delta = Σ_c dy·y (`[B, H, S]`); `wrt` 0 gives dq, 1 dk, 2 dv.
    AttentionGrad {
        /// As in [`Op::Attention`].
        scale: f32,
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
    /// (integers) and optionally a bias `[V]` added to the logits; result a scalar (f32 for
    /// half inputs, else h's dtype; [`loss_dtype`]). Its
    /// VJP recomputes each chunk's logits.
    LmHeadCe {
        /// Rows per chunk.
        chunk: usize,
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
        use Operand::{Input, Step};
        match self {
            Op::Residual => Some(vec![(Op::Binary(BinaryOp::Add), vec![Input(0), Input(1)])]),
            Op::RevCouple => Some(vec![
                (Op::Binary(BinaryOp::Mul), vec![Input(0), Input(2)]),
                (Op::Binary(BinaryOp::Add), vec![Step(0), Input(1)]),
            ]),
            Op::MocFfn { k } => {
                let mut shape = operands[0].shape.clone();
                let last = shape.len().checked_sub(1)?;
                shape[last] = operands[1].shape[1];
                Some(vec![
                    (Op::MatMul, vec![Input(0), Input(1)]),
                    (Op::MatMul, vec![Input(0), Input(2)]),
                    (Op::TopK { k: *k }, vec![Step(0)]),
                    (Op::GatherElements { axis: last }, vec![Step(0), Step(2)]),
                    (Op::GatherElements { axis: last }, vec![Step(1), Step(2)]),
                    (Op::Unary(UnaryOp::Silu), vec![Step(3)]),
                    (Op::Binary(BinaryOp::Mul), vec![Step(5), Step(4)]),
                    (
                        Op::ScatterElementsAdd { axis: last, shape },
                        vec![Step(6), Step(2)],
                    ),
                    (Op::MatMul, vec![Step(7), Input(3)]),
                ])
            }
            Op::LmHeadCe { chunk } => {
                // Per chunk: rows of h, their logits (in f32), log-probabilities, the targets'.
                let (n, d) = (operands[0].shape[0], operands[0].shape[1]);
                let f32_logits = loss_dtype(operands[0].dtype) != operands[0].dtype;
                let mut steps = vec![];
                let mut picked = vec![];
                for r0 in (0..n).step_by((*chunk).max(1)) {
                    let r1 = (r0 + chunk).min(n);
                    let rows = |width: usize| Op::Slice {
                        starts: vec![r0, 0],
                        ends: vec![r1, width],
                        steps: vec![1, 1],
                    };
                    steps.push((rows(d), vec![Input(0)]));
                    steps.push((Op::MatMul, vec![Step(steps.len() - 1), Input(1)]));
                    if operands.len() == 4 {
                        steps.push((
                            Op::Binary(BinaryOp::Add),
                            vec![Step(steps.len() - 1), Input(3)],
                        ));
                    }
                    if f32_logits {
                        steps.push((Op::Cast { to: DType::F32 }, vec![Step(steps.len() - 1)]));
                    }
                    steps.push((Op::LogSoftmax { axis: 1 }, vec![Step(steps.len() - 1)]));
                    let logp = steps.len() - 1;
                    steps.push((rows(1), vec![Input(2)]));
                    steps.push((
                        Op::GatherElements { axis: 1 },
                        vec![Step(logp), Step(steps.len() - 1)],
                    ));
                    picked.push(Step(steps.len() - 1));
                }
                steps.push((Op::Concat { axis: 0 }, picked));
                steps.push((
                    Op::Reduce {
                        kind: ReduceKind::Mean,
                        axes: vec![0, 1],
                        keep_dims: false,
                    },
                    vec![Step(steps.len() - 1)],
                ));
                steps.push((Op::Unary(UnaryOp::Neg), vec![Step(steps.len() - 1)]));
                Some(steps)
            }
            Op::Rope => {
                let shape = &operands.first()?.shape;
                let (last, d) = (shape.len().checked_sub(1)?, *shape.last()?);
                let half = |from: usize, to: usize| {
                    let mut starts = vec![0; shape.len()];
                    let mut ends = shape.clone();
                    starts[last] = from;
                    ends[last] = to;
                    Op::Slice {
                        starts,
                        ends,
                        steps: vec![1; shape.len()],
                    }
                };
                Some(vec![
                    (half(0, d / 2), vec![Input(0)]),
                    (half(d / 2, d), vec![Input(0)]),
                    (Op::Unary(UnaryOp::Neg), vec![Step(1)]),
                    (Op::Concat { axis: last }, vec![Step(2), Step(0)]),
                    (Op::Binary(BinaryOp::Mul), vec![Step(3), Input(2)]),
                    (Op::Binary(BinaryOp::Mul), vec![Input(0), Input(1)]),
                    (Op::Binary(BinaryOp::Add), vec![Step(5), Step(4)]),
                ])
            }
            Op::SwigluFfn => Some(vec![
                (Op::MatMul, vec![Input(0), Input(1)]),
                (Op::MatMul, vec![Input(0), Input(2)]),
                (Op::Unary(UnaryOp::Silu), vec![Step(0)]),
                (Op::Binary(BinaryOp::Mul), vec![Step(2), Step(1)]),
                (Op::MatMul, vec![Step(3), Input(3)]),
            ]),
            Op::GeluFfn { tanh } => {
                let act = Op::Unary(if *tanh {
                    UnaryOp::GeluTanh
                } else {
                    UnaryOp::Gelu
                });
                Some(if operands.len() == 5 {
                    vec![
                        (Op::MatMul, vec![Input(0), Input(1)]),
                        (Op::Binary(BinaryOp::Add), vec![Step(0), Input(2)]),
                        (act, vec![Step(1)]),
                        (Op::MatMul, vec![Step(2), Input(3)]),
                        (Op::Binary(BinaryOp::Add), vec![Step(3), Input(4)]),
                    ]
                } else {
                    vec![
                        (Op::MatMul, vec![Input(0), Input(1)]),
                        (act, vec![Step(0)]),
                        (Op::MatMul, vec![Step(1), Input(2)]),
                    ]
                })
            }
            _ => None,
        }
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
            Op::LmHeadCe { chunk } => vec![("chunk", Attr::Int(*chunk as i64))],
            Op::TopK { k } | Op::MocFfn { k } => vec![("k", Attr::Int(*k as i64))],
            Op::Attention { scale } | Op::AttentionLse { scale } => {
                vec![("scale", Attr::Float(*scale))]
            }
            Op::AttentionGrad { scale, wrt } => vec![
                ("scale", Attr::Float(*scale)),
                ("wrt", Attr::Int(*wrt as i64)),
            ],
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
                    .map(|x| {
                        usize::try_from(x).map_err(|_| format!("attribute `{key}` must be ≥ 0"))
                    })
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
                },
                "lm_head_ce" => Op::LmHeadCe {
                    chunk: match uint(get("chunk")?, "chunk")? {
                        0 => return Err("attribute `chunk` must be ≥ 1".into()),
                        c => c,
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
                "attention_lse" => Op::AttentionLse {
                    scale: match get("scale")? {
                        Attr::Float(e) => e,
                        _ => return Err("attribute `scale` must be a float".into()),
                    },
                },
                "attention_grad" => Op::AttentionGrad {
                    scale: match get("scale")? {
                        Attr::Float(e) => e,
                        _ => return Err("attribute `scale` must be a float".into()),
                    },
                    wrt: match uint(get("wrt")?, "wrt")? {
                        w @ 0..=2 => w,
                        _ => return Err("attribute `wrt` must be 0, 1 or 2".into()),
                    },
                },
                "attention" => Op::Attention {
                    scale: match get("scale")? {
                        Attr::Float(e) => e,
                        _ => return Err("attribute `scale` must be a float".into()),
                    },
                },
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
        let arity = |n: usize| -> Result<(), String> {
            if inputs.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "`{}` takes {n} operand(s), got {}",
                    self.name(),
                    inputs.len()
                ))
            }
        };
        let one = |t: TensorType| Ok(vec![t]);
        match self {
            Op::Unary(u) => {
                arity(1)?;
                let x = &inputs[0];
                match u {
                    UnaryOp::Not if x.dtype != DType::Bool => {
                        Err("`not` needs a bool operand".into())
                    }
                    UnaryOp::Not => one(x.clone()),
                    UnaryOp::IsNaN if x.dtype.is_float() => {
                        one(TensorType::new(DType::Bool, x.shape.clone()))
                    }
                    UnaryOp::Neg if x.dtype != DType::Bool => one(x.clone()),
                    _ if x.dtype.is_float() => one(x.clone()),
                    _ => Err(format!(
                        "`{}` needs a float operand, got {}",
                        self.name(),
                        x.dtype
                    )),
                }
            }
            Op::Binary(b) => {
                arity(2)?;
                let (a, c) = (&inputs[0], &inputs[1]);
                let shape = broadcast_shapes(&a.shape, &c.shape)?;
                match b {
                    BinaryOp::Pow => {
                        if a.dtype == DType::Bool || c.dtype == DType::Bool {
                            return Err("`pow` needs numeric operands".into());
                        }
                        one(TensorType::new(a.dtype, shape))
                    }
                    _ if a.dtype != c.dtype => Err(format!(
                        "`{}` operands differ in dtype: {} vs {}",
                        self.name(),
                        a.dtype,
                        c.dtype
                    )),
                    BinaryOp::And if a.dtype != DType::Bool => {
                        Err("`and` needs bool operands".into())
                    }
                    BinaryOp::And | BinaryOp::Equal => one(TensorType::new(DType::Bool, shape)),
                    BinaryOp::Less
                    | BinaryOp::LessEqual
                    | BinaryOp::Greater
                    | BinaryOp::GreaterEqual => {
                        if a.dtype == DType::Bool {
                            return Err(format!("`{}` needs numeric operands", self.name()));
                        }
                        one(TensorType::new(DType::Bool, shape))
                    }
                    _ if a.dtype == DType::Bool => {
                        Err(format!("`{}` needs numeric operands", self.name()))
                    }
                    _ => one(TensorType::new(a.dtype, shape)),
                }
            }
            Op::Where => {
                arity(3)?;
                let (c, a, b) = (&inputs[0], &inputs[1], &inputs[2]);
                if c.dtype != DType::Bool {
                    return Err(format!("`where` condition must be bool, got {}", c.dtype));
                }
                if a.dtype != b.dtype {
                    return Err(format!(
                        "`where` branches differ in dtype: {} vs {}",
                        a.dtype, b.dtype
                    ));
                }
                let s = broadcast_shapes(&broadcast_shapes(&c.shape, &a.shape)?, &b.shape)?;
                one(TensorType::new(a.dtype, s))
            }
            Op::Cast { to } => {
                arity(1)?;
                one(TensorType::new(*to, inputs[0].shape.clone()))
            }
            Op::MatMul => {
                arity(2)?;
                matmul_type(&inputs[0], &inputs[1]).map(|t| vec![t])
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => {
                arity(1)?;
                let x = &inputs[0];
                float_operand(self, x)?;
                check_axis(*axis, x.rank())?;
                one(x.clone())
            }
            Op::LayerNorm { axis, .. } | Op::RmsNorm { axis, .. } => {
                // x, a scale and (layer_norm only) a bias, both of the normalised dims' shape.
                let bias = matches!(self, Op::LayerNorm { .. });
                let max = if bias { 3 } else { 2 };
                if !(2..=max).contains(&inputs.len()) {
                    return Err(format!(
                        "`{}` takes {} operands, got {}",
                        self.name(),
                        if bias { "2 or 3" } else { "2" },
                        inputs.len()
                    ));
                }
                let x = &inputs[0];
                float_operand(self, x)?;
                check_axis(*axis, x.rank())?;
                for p in &inputs[1..] {
                    if p.dtype != x.dtype || p.shape[..] != x.shape[*axis..] {
                        return Err(format!(
                            "`{}` {} must be {}{:?}, got {p}",
                            self.name(),
                            if bias { "scale/bias" } else { "scale" },
                            x.dtype,
                            &x.shape[*axis..]
                        ));
                    }
                }
                one(x.clone())
            }
            Op::Attention { .. } => {
                if inputs.len() != 4 {
                    return Err(format!(
                        "`attention` takes q, k, v and a mask, got {} operands",
                        inputs.len()
                    ));
                }
                let (q, k, v, m) = (&inputs[0], &inputs[1], &inputs[2], &inputs[3]);
                float_operand(self, q)?;
                let ok = q.rank() == 4
                    && k.rank() == 4
                    && v.rank() == 4
                    && k.dtype == q.dtype
                    && v.dtype == q.dtype
                    && m.dtype == q.dtype
                    && k.shape[0] == q.shape[0]
                    && v.shape[0] == q.shape[0]
                    && k.shape[1] > 0
                    && q.shape[1] % k.shape[1] == 0
                    && v.shape[1] == k.shape[1]
                    && k.shape[3] == q.shape[3]
                    && v.shape[2] == k.shape[2];
                if !ok {
                    return Err(format!("`attention` needs q [B,H,S,D], k [B,Hk,T,D], v [B,Hk,T,Dv] with H a multiple of Hk, got {q}, {k}, {v}"));
                }
                let scores = [q.shape[0], q.shape[1], q.shape[2], k.shape[2]];
                if broadcast_shapes(&m.shape, &scores).ok().as_deref() != Some(&scores[..]) {
                    return Err(format!(
                        "`attention` mask {m} does not broadcast to {scores:?}"
                    ));
                }
                one(TensorType::new(
                    q.dtype,
                    vec![q.shape[0], q.shape[1], q.shape[2], v.shape[3]],
                ))
            }
            Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
                let lse = matches!(self, Op::AttentionLse { .. });
                let want = if lse { 3 } else { 7 };
                if inputs.len() != want {
                    return Err(format!(
                        "`{}` takes {want} operands, got {}",
                        self.name(),
                        inputs.len()
                    ));
                }
                let (q, k) = (&inputs[0], &inputs[1]);
                let (v, m) = if lse {
                    (&inputs[1], &inputs[2])
                } else {
                    (&inputs[2], &inputs[3])
                };
                // The attention these belong to must be well typed.
                let y = Op::Attention { scale: 1.0 }.infer(&[
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    m.clone(),
                ])?;
                let rows = TensorType::new(q.dtype, q.shape[..3].to_vec());
                if lse {
                    return one(rows);
                }
                if inputs[4] != rows || inputs[6] != rows || inputs[5] != y[0] {
                    return Err(format!(
                        "`attention_grad` needs lse and delta {rows} and dy {}, got {}, {} and {}",
                        y[0], inputs[4], inputs[6], inputs[5]
                    ));
                }
                let Op::AttentionGrad { wrt, .. } = self else {
                    unreachable!()
                };
                one(inputs[*wrt].clone())
            }
            Op::TopK { k } => {
                arity(1)?;
                let x = &inputs[0];
                float_operand(self, x)?;
                match x.shape.last() {
                    Some(&n) if (1..=n).contains(k) => {
                        let mut shape = x.shape.clone();
                        *shape.last_mut().unwrap() = *k;
                        // 16-bit indices whenever they fit (MoC keeps them for backward).
                        let dtype = if n <= i16::MAX as usize {
                            DType::I16
                        } else {
                            DType::I32
                        };
                        one(TensorType::new(dtype, shape))
                    }
                    _ => Err(format!(
                        "`top_k`: k = {k} must be in 1..={:?}",
                        x.shape.last()
                    )),
                }
            }
            Op::MocFfn { k } => {
                let y = Op::SwigluFfn.infer(inputs)?;
                let f = inputs[1].shape[1];
                if *k == 0 || *k > f {
                    return Err(format!("`moc_ffn`: k = {k} must be in 1..={f}"));
                }
                Ok(y)
            }
            Op::LmHeadCe { .. } => {
                if !(3..=4).contains(&inputs.len()) {
                    return Err(format!(
                        "`lm_head_ce` takes h, w, targets and an optional bias, got {} operands",
                        inputs.len()
                    ));
                }
                let (h, w, t) = (&inputs[0], &inputs[1], &inputs[2]);
                if let Some(b) = inputs.get(3) {
                    if b.dtype != h.dtype || b.shape != [w.shape.get(1).copied().unwrap_or(0)] {
                        return Err(format!(
                            "`lm_head_ce`: the bias must be {}[V], got {b}",
                            h.dtype
                        ));
                    }
                }
                float_operand(self, h)?;
                if h.rank() != 2
                    || w.dtype != h.dtype
                    || w.rank() != 2
                    || w.shape[0] != h.shape[1]
                    || !matches!(t.dtype, DType::I64 | DType::I32)
                    || t.shape != [h.shape[0], 1]
                {
                    return Err(format!(
                        "`lm_head_ce` takes h [N, d], w [d, V] of h's dtype and integer targets [N, 1], got {h}, {w}, {t}"
                    ));
                }
                one(TensorType::new(loss_dtype(h.dtype), vec![]))
            }
            Op::Residual => {
                arity(2)?;
                float_operand(self, &inputs[0])?;
                if inputs[0] != inputs[1] {
                    return Err(format!(
                        "`residual`: the stream and the branch must have one type, got {} and {}",
                        inputs[0], inputs[1]
                    ));
                }
                one(inputs[0].clone())
            }
            Op::RevCouple => {
                arity(3)?;
                float_operand(self, &inputs[0])?;
                if inputs[0] != inputs[1]
                    || inputs[2].rank() != 0
                    || inputs[2].dtype != inputs[0].dtype
                {
                    return Err(format!(
                        "`rev_couple` takes the stream and the branch of one type and a rank-0 scale of their dtype, got {}, {} and {}",
                        inputs[0], inputs[1], inputs[2]
                    ));
                }
                one(inputs[0].clone())
            }
            Op::Rope => {
                arity(3)?;
                let x = &inputs[0];
                float_operand(self, x)?;
                if x.shape.last().is_none_or(|d| d % 2 != 0) {
                    return Err(format!("`rope` needs an even last dim, got {x}"));
                }
                for t in &inputs[1..] {
                    if t.dtype != x.dtype || broadcast_shapes(&x.shape, &t.shape)? != x.shape {
                        return Err(format!(
                            "`rope`: cos and sin must be {} broadcastable to {:?}, got {t}",
                            x.dtype, x.shape
                        ));
                    }
                }
                one(x.clone())
            }
            Op::SwigluFfn | Op::GeluFfn { .. } => {
                let n = inputs.len();
                let bias = match (self, n) {
                    (Op::SwigluFfn, 4) | (Op::GeluFfn { .. }, 3) => false,
                    (Op::GeluFfn { .. }, 5) => true,
                    _ => {
                        return Err(format!(
                            "`{}` takes {} operands, got {n}",
                            self.name(),
                            if *self == Op::SwigluFfn {
                                "4"
                            } else {
                                "3 or 5"
                            }
                        ))
                    }
                };
                let x = &inputs[0];
                float_operand(self, x)?;
                let d = *x.shape.last().ok_or("the FFN input must have rank ≥ 1")?;
                // (weight, rows) pairs; biases follow their weight.
                let (w_in, w_out): (Vec<&TensorType>, &TensorType) = match self {
                    Op::SwigluFfn => (vec![&inputs[1], &inputs[2]], &inputs[3]),
                    _ if bias => (vec![&inputs[1]], &inputs[3]),
                    _ => (vec![&inputs[1]], &inputs[2]),
                };
                let f = w_in[0].shape.get(1).copied().unwrap_or(0);
                for w in &w_in {
                    if w.dtype != x.dtype || w.shape != [d, f] {
                        return Err(format!(
                            "`{}`: input weights must be {}[{d}, {f}], got {w}",
                            self.name(),
                            x.dtype
                        ));
                    }
                }
                if w_out.dtype != x.dtype || w_out.rank() != 2 || w_out.shape[0] != f {
                    return Err(format!(
                        "`{}`: the output weight must be {}[{f}, e], got {w_out}",
                        self.name(),
                        x.dtype
                    ));
                }
                let e = w_out.shape[1];
                if bias {
                    for (b, len) in [(&inputs[2], f), (&inputs[4], e)] {
                        if b.dtype != x.dtype || b.shape != [len] {
                            return Err(format!(
                                "`gelu_ffn`: a bias must be {}[{len}], got {b}",
                                x.dtype
                            ));
                        }
                    }
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().unwrap() = e;
                one(TensorType::new(x.dtype, shape))
            }
            Op::Reduce {
                kind,
                axes,
                keep_dims,
            } => {
                arity(1)?;
                let x = &inputs[0];
                if x.dtype == DType::Bool || (*kind == ReduceKind::Mean && !x.dtype.is_float()) {
                    return Err(format!("`{}` does not take {}", self.name(), x.dtype));
                }
                if axes.windows(2).any(|w| w[0] >= w[1]) {
                    return Err("reduction axes must be sorted and unique".into());
                }
                for &a in axes {
                    check_axis(a, x.rank())?;
                }
                let shape = x
                    .shape
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &d)| match (axes.contains(&i), keep_dims) {
                        (false, _) => Some(d),
                        (true, true) => Some(1),
                        (true, false) => None,
                    })
                    .collect::<Vec<_>>();
                one(TensorType::new(x.dtype, shape))
            }
            Op::Gather { axis } => {
                arity(2)?;
                let (d, i) = (&inputs[0], &inputs[1]);
                check_axis(*axis, d.rank())?;
                int_indices(i)?;
                let mut shape = d.shape[..*axis].to_vec();
                shape.extend_from_slice(&i.shape);
                shape.extend_from_slice(&d.shape[axis + 1..]);
                one(TensorType::new(d.dtype, shape))
            }
            Op::GatherElements { axis } => {
                arity(2)?;
                let (d, i) = (&inputs[0], &inputs[1]);
                check_axis(*axis, d.rank())?;
                int_indices(i)?;
                if i.rank() != d.rank() {
                    return Err("`gather_elements` indices must have the data's rank".into());
                }
                for k in 0..d.rank() {
                    if k != *axis && i.shape[k] > d.shape[k] {
                        return Err(format!(
                            "`gather_elements` indices dim {k} exceeds the data's"
                        ));
                    }
                }
                one(TensorType::new(d.dtype, i.shape.clone()))
            }
            Op::GatherNd => {
                arity(2)?;
                let (d, i) = (&inputs[0], &inputs[1]);
                int_indices(i)?;
                let q = *i
                    .shape
                    .last()
                    .ok_or("`gather_nd` indices need at least one dim")?;
                if q > d.rank() {
                    return Err(format!(
                        "`gather_nd` index tuples of length {q} exceed the data's rank {}",
                        d.rank()
                    ));
                }
                let mut shape = i.shape[..i.rank() - 1].to_vec();
                shape.extend_from_slice(&d.shape[q..]);
                one(TensorType::new(d.dtype, shape))
            }
            Op::Reshape { shape } => {
                arity(1)?;
                let x = &inputs[0];
                let t = TensorType::new(x.dtype, shape.clone());
                if t.checked_bytes().is_none() || t.numel() != x.numel() {
                    return Err(format!(
                        "cannot reshape {x} ({} elements) to {:?}",
                        x.numel(),
                        shape
                    ));
                }
                one(t)
            }
            Op::Transpose { perm } => {
                arity(1)?;
                let x = &inputs[0];
                let mut seen = vec![false; x.rank()];
                if perm.len() != x.rank()
                    || perm
                        .iter()
                        .any(|&p| p >= x.rank() || std::mem::replace(&mut seen[p], true))
                {
                    return Err(format!(
                        "{:?} is not a permutation of {} dims",
                        perm,
                        x.rank()
                    ));
                }
                one(TensorType::new(
                    x.dtype,
                    perm.iter().map(|&p| x.shape[p]).collect::<Vec<_>>(),
                ))
            }
            Op::Slice {
                starts,
                ends,
                steps,
            } => {
                arity(1)?;
                let x = &inputs[0];
                let r = x.rank();
                if starts.len() != r || ends.len() != r || steps.len() != r {
                    return Err(format!(
                        "`slice` needs starts, ends and steps for all {r} dims"
                    ));
                }
                let mut shape = Vec::with_capacity(r);
                for k in 0..r {
                    if steps[k] == 0 || starts[k] > ends[k] || ends[k] > x.shape[k] {
                        return Err(format!(
                            "`slice` dim {k}: {}..{} step {} is not within 0..{}",
                            starts[k], ends[k], steps[k], x.shape[k]
                        ));
                    }
                    shape.push((ends[k] - starts[k]).div_ceil(steps[k]));
                }
                one(TensorType::new(x.dtype, shape))
            }
            Op::Concat { axis } => {
                let first = inputs
                    .first()
                    .ok_or("`concat` needs at least one operand")?;
                check_axis(*axis, first.rank())?;
                let mut shape = first.shape.clone();
                for t in &inputs[1..] {
                    if t.dtype != first.dtype || t.rank() != first.rank() {
                        return Err(format!("`concat` operands differ: {first} vs {t}"));
                    }
                    for k in 0..t.rank() {
                        if k != *axis && t.shape[k] != first.shape[k] {
                            return Err(format!(
                                "`concat` operands differ outside axis {axis}: {first} vs {t}"
                            ));
                        }
                    }
                    shape[*axis] = shape[*axis]
                        .checked_add(t.shape[*axis])
                        .ok_or("`concat` result is too large")?;
                }
                one(TensorType::new(first.dtype, shape))
            }
            Op::Expand { shape } => {
                arity(1)?;
                let x = &inputs[0];
                let b = broadcast_shapes(&x.shape, shape)?;
                if &b != shape {
                    return Err(format!("cannot expand {x} to {shape:?}"));
                }
                one(TensorType::new(x.dtype, b))
            }
            Op::Trilu { .. } => {
                arity(1)?;
                if inputs[0].rank() < 2 {
                    return Err("`trilu` needs at least 2 dims".into());
                }
                one(inputs[0].clone())
            }
            Op::ScatterAdd { axis, shape } => {
                arity(2)?;
                let (u, i) = (&inputs[0], &inputs[1]);
                int_indices(i)?;
                check_axis(*axis, shape.len())?;
                let mut want = shape[..*axis].to_vec();
                want.extend_from_slice(&i.shape);
                want.extend_from_slice(&shape[axis + 1..]);
                if u.shape != want {
                    return Err(format!("`scatter_add` updates must be {want:?}, got {u}"));
                }
                one(TensorType::new(u.dtype, shape.clone()))
            }
            Op::ScatterElementsAdd { axis, shape } => {
                arity(2)?;
                let (u, i) = (&inputs[0], &inputs[1]);
                int_indices(i)?;
                check_axis(*axis, shape.len())?;
                let fits = u.shape == i.shape
                    && i.rank() == shape.len()
                    && (0..shape.len()).all(|k| k == *axis || i.shape[k] <= shape[k]);
                if !fits {
                    return Err(format!(
                        "`scatter_elements_add` updates {u} and indices {i} do not fit {shape:?}"
                    ));
                }
                one(TensorType::new(u.dtype, shape.clone()))
            }
            Op::ScatterNdAdd { shape } => {
                arity(2)?;
                let (u, i) = (&inputs[0], &inputs[1]);
                int_indices(i)?;
                let q = *i
                    .shape
                    .last()
                    .ok_or("`scatter_nd_add` indices need at least one dim")?;
                if q > shape.len() {
                    return Err(format!(
                        "`scatter_nd_add` index tuples of length {q} exceed rank {}",
                        shape.len()
                    ));
                }
                let mut want = i.shape[..i.rank() - 1].to_vec();
                want.extend_from_slice(&shape[q..]);
                if u.shape != want {
                    return Err(format!(
                        "`scatter_nd_add` updates must be {want:?}, got {u}"
                    ));
                }
                one(TensorType::new(u.dtype, shape.clone()))
            }
            Op::SliceScatter {
                shape,
                starts,
                steps,
            } => {
                arity(1)?;
                let x = &inputs[0];
                let r = shape.len();
                if x.rank() != r || starts.len() != r || steps.len() != r {
                    return Err(format!(
                        "`slice_scatter` needs starts and steps for all {r} dims of {x}"
                    ));
                }
                for k in 0..r {
                    let fits = steps[k] > 0
                        && (x.shape[k] == 0 || starts[k] + (x.shape[k] - 1) * steps[k] < shape[k]);
                    if !fits {
                        return Err(format!(
                            "`slice_scatter` dim {k}: {} values from {} step {} exceed {}",
                            x.shape[k], starts[k], steps[k], shape[k]
                        ));
                    }
                }
                one(TensorType::new(x.dtype, shape.clone()))
            }
        }
    }
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

fn matmul_type(a: &TensorType, b: &TensorType) -> Result<TensorType, String> {
    if !a.dtype.is_float() || a.dtype != b.dtype {
        return Err(format!(
            "`matmul` needs two float operands of one dtype, got {} and {}",
            a.dtype, b.dtype
        ));
    }
    if a.rank() == 0 || b.rank() == 0 {
        return Err("`matmul` operands must have at least 1 dim".into());
    }
    let ka = a.shape[a.rank() - 1];
    let kb = if b.rank() == 1 {
        b.shape[0]
    } else {
        b.shape[b.rank() - 2]
    };
    if ka != kb {
        return Err(format!("`matmul` inner dims differ: {a} x {b}"));
    }
    let batch_a = if a.rank() > 2 {
        &a.shape[..a.rank() - 2]
    } else {
        &[][..]
    };
    let batch_b = if b.rank() > 2 {
        &b.shape[..b.rank() - 2]
    } else {
        &[][..]
    };
    let mut shape = broadcast_shapes(batch_a, batch_b)?;
    if a.rank() >= 2 {
        shape.push(a.shape[a.rank() - 2]);
    }
    if b.rank() >= 2 {
        shape.push(b.shape[b.rank() - 1]);
    }
    Ok(TensorType::new(a.dtype, shape))
}
