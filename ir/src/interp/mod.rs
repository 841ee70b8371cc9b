//! The reference interpreter: the semantics of every op, the oracle for every later backend.
//!
//! Floating-point values are computed in f64 and rounded to the value's dtype after each op
//! (so f32 elementwise results are correctly rounded), and reductions, matmuls and
//! normalisations accumulate in f64. Integer values are i64 (i32 wraps, bool is 0/1).
//!
//! The semantics are split by op family, one file each, with the same families as shape
//! inference (`op/`), the VJPs (`memc_passes::autodiff`) and the kernels (`memc_codegen::ops`):
//! `elementwise`, `layout`, `gather`, `reduce`, `linalg`, `nn` and `blocks` (evaluated by their
//! steps). A new op of family F is evaluated in `interp/F.rs`.

use std::collections::HashMap;

use half::{bf16, f16};

use crate::{DType, Graph, Op, Tensor, ValueDef, ValueId};

mod blocks;
mod elementwise;
mod gather;
mod layout;
mod linalg;
mod nn;
mod reduce;

/// Largest single result the interpreter computes (it holds values as f64 or i64).
const INTERP_MAX_BYTES: usize = 16 << 30;

/// Why the interpreter could not evaluate the graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InterpError {
    /// A graph input has no value, or its value has the wrong type.
    #[error("input `{name}`: {msg}")]
    Input {
        /// The input's name.
        name: String,
        /// What is wrong.
        msg: String,
    },
    /// A parameter has no data (e.g. a graph parsed from text).
    #[error("param `{0}` has no data")]
    MissingParam(String),
    /// A result held a NaN ([`RunOptions::check_nan`]).
    #[error("node #{node} `{op}`{name} produced a non-finite value ({value}) in its {ty} result")]
    NonFinite {
        /// Node index.
        node: usize,
        /// Op name.
        op: &'static str,
        /// ` (name)` or empty.
        name: String,
        /// The first non-finite element.
        value: f64,
        /// The result's type.
        ty: String,
    },
    /// An op failed at run time (an index out of range, a division by zero).
    #[error("node #{node} `{op}`{name}: {msg}")]
    Op {
        /// Node index.
        node: usize,
        /// Op name.
        op: &'static str,
        /// ` (onnx name)` or empty.
        name: String,
        /// What went wrong.
        msg: String,
    },
}

#[derive(Clone, Debug)]
enum Data {
    F(Vec<f64>),
    I(Vec<i64>),
}

#[derive(Clone, Debug)]
struct Arr {
    dtype: DType,
    shape: Vec<usize>,
    data: Data,
}

impl Arr {
    fn from_tensor(t: &Tensor) -> Arr {
        let data = if t.dtype().is_float() {
            Data::F(t.to_f64_vec())
        } else {
            Data::I(t.to_i64_vec())
        };
        Arr {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            data,
        }
    }

    fn to_tensor(&self) -> Tensor {
        match &self.data {
            Data::F(v) => Tensor::from_f64(self.dtype, self.shape.clone(), v),
            Data::I(v) => Tensor::from_i64(self.dtype, self.shape.clone(), v),
        }
    }

    fn f(&self) -> &[f64] {
        match &self.data {
            Data::F(v) => v,
            Data::I(_) => {
                panic!("interpreter: float data expected (the verifier admits no such graph)")
            }
        }
    }

    fn i(&self) -> &[i64] {
        match &self.data {
            Data::I(v) => v,
            Data::F(_) => {
                panic!("interpreter: integer data expected (the verifier admits no such graph)")
            }
        }
    }

    /// A new array of `dtype`: floats rounded to the dtype, integers wrapped to it.
    fn new(dtype: DType, shape: Vec<usize>, data: Data) -> Arr {
        let data = match data {
            Data::F(v) => Data::F(match dtype {
                DType::F32 => v.into_iter().map(|x| x as f32 as f64).collect(),
                DType::F64 => v,
                DType::F16 => v.into_iter().map(|x| f16::from_f64(x).to_f64()).collect(),
                DType::BF16 => v.into_iter().map(|x| bf16::from_f64(x).to_f64()).collect(),
                _ => unreachable!("float data for {dtype}"),
            }),
            Data::I(v) => Data::I(match dtype {
                DType::I32 => v.into_iter().map(|x| x as i32 as i64).collect(),
                DType::I16 => v.into_iter().map(|x| x as i16 as i64).collect(),
                DType::Bool => v.into_iter().map(|x| (x != 0) as i64).collect(),
                _ => v,
            }),
        };
        Arr { dtype, shape, data }
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Strides that read `shape` as if broadcast to `out` (0 on broadcast dims).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = strides(shape);
    let off = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < off || shape[i - off] == 1 {
                0
            } else {
                s[i - off]
            }
        })
        .collect()
}

/// Flat input offsets for every output index of `out` (row-major), given per-dim strides.
fn offsets(out: &[usize], strides: &[usize], base: usize) -> Vec<usize> {
    let n: usize = out.iter().product();
    let mut res = Vec::with_capacity(n);
    if n == 0 {
        return res;
    }
    let mut idx = vec![0usize; out.len()];
    let mut off = base;
    for _ in 0..n {
        res.push(off);
        for d in (0..out.len()).rev() {
            idx[d] += 1;
            off += strides[d];
            if idx[d] < out[d] {
                break;
            }
            off -= strides[d] * out[d];
            idx[d] = 0;
        }
    }
    res
}

fn take(data: &Data, offs: &[usize]) -> Data {
    match data {
        Data::F(v) => Data::F(offs.iter().map(|&o| v[o]).collect()),
        Data::I(v) => Data::I(offs.iter().map(|&o| v[o]).collect()),
    }
}

/// Evaluates one op on tensors (used by the interpreter and by constant folding).
/// The operands must satisfy [`Op::infer`].
fn eval(op: &Op, ins: &[&Arr]) -> Result<Arr, String> {
    let out_ty = {
        let tys: Vec<_> = ins
            .iter()
            .map(|a| crate::TensorType::new(a.dtype, a.shape.clone()))
            .collect();
        op.infer(&tys)?.remove(0)
    };
    let operand_types: Vec<crate::TensorType> = ins
        .iter()
        .map(|a| crate::TensorType::new(a.dtype, a.shape.clone()))
        .collect();
    if let Some(steps) = op.expansion(&operand_types) {
        return blocks::eval_steps(ins, steps);
    }
    let (dt, shape) = (out_ty.dtype, out_ty.shape);
    let data = match op {
        Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast { .. } => {
            elementwise::eval(op, ins, dt, &shape)?
        }
        Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::Slice { .. }
        | Op::SliceScatter { .. }
        | Op::Concat { .. }
        | Op::Expand { .. }
        | Op::Trilu { .. } => layout::eval(op, ins, &shape)?,
        Op::Gather { .. }
        | Op::GatherElements { .. }
        | Op::GatherNd
        | Op::ScatterAdd { .. }
        | Op::ScatterElementsAdd { .. }
        | Op::ScatterNdAdd { .. } => gather::eval(op, ins, &shape)?,
        Op::Reduce { .. } | Op::TopK { .. } => reduce::eval(op, ins)?,
        Op::MatMul => linalg::eval(op, ins, &shape)?,
        Op::Softmax { .. }
        | Op::LogSoftmax { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::Attention { .. }
        | Op::AttentionLse { .. }
        | Op::AttentionGrad { .. } => nn::eval(op, ins, &shape)?,
        Op::SwigluFfn
        | Op::GeluFfn { .. }
        | Op::MocFfn { .. }
        | Op::Rope
        | Op::Residual
        | Op::RevCouple
        | Op::LmHeadCe { .. } => {
            unreachable!("blocks are evaluated by their steps")
        }
    };
    Ok(Arr::new(dt, shape, data))
}

/// `out = zeros(n)`, then `out[dst[k]] += src[k]`.
fn scatter(src: &Data, dst: &[usize], n: usize) -> Data {
    match src {
        Data::F(v) => {
            let mut out = vec![0.0; n];
            for (k, &d) in dst.iter().enumerate() {
                out[d] += v[k];
            }
            Data::F(out)
        }
        Data::I(v) => {
            let mut out = vec![0i64; n];
            for (k, &d) in dst.iter().enumerate() {
                out[d] = out[d].wrapping_add(v[k]);
            }
            Data::I(out)
        }
    }
}

/// Evaluates one op on constant tensors (constant folding uses this).
pub fn eval_op(op: &Op, inputs: &[&Tensor]) -> Result<Tensor, String> {
    let arrs: Vec<Arr> = inputs.iter().map(|t| Arr::from_tensor(t)).collect();
    let arrs: Vec<&Arr> = arrs.iter().collect();
    eval(op, &arrs).map(|a| a.to_tensor())
}

/// Runs the graph on named inputs and returns its named outputs in order. Values are freed
/// after their last use.
pub fn interpret(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, InterpError> {
    run(g, inputs, &RunOptions::default()).map(|r| r.outputs)
}

/// How [`run`] evaluates.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Fail at the first node whose float result holds a NaN. (Infinities are legitimate in
    /// intermediate values, e.g. `-inf` attention masks before a softmax.)
    pub check_nan: bool,
}

/// What one evaluation of a graph produced.
#[derive(Debug, Clone)]
pub struct Run {
    /// Named outputs in order.
    pub outputs: Vec<(String, Tensor)>,
    /// New values of updated params, in the graph's update order.
    pub updates: Vec<(ValueId, Tensor)>,
}

/// Runs the graph (outputs and state updates). Values are freed after their last use.
pub fn run(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    opts: &RunOptions,
) -> Result<Run, InterpError> {
    let mut vals: Vec<Option<Arr>> = vec![None; g.values().len()];
    for (i, v) in g.values().iter().enumerate() {
        match &v.def {
            ValueDef::Input { name } => {
                let t = inputs.get(name).ok_or_else(|| InterpError::Input {
                    name: name.clone(),
                    msg: "no value given".into(),
                })?;
                if t.ty() != &v.ty {
                    return Err(InterpError::Input {
                        name: name.clone(),
                        msg: format!("expected {} but got {}", v.ty, t.ty()),
                    });
                }
                vals[i] = Some(Arr::from_tensor(t));
            }
            ValueDef::Param { name, data, role } => {
                vals[i] = Some(match (data, role) {
                    (Some(t), _) => Arr::from_tensor(t),
                    // Optimizer state starts at zero.
                    (None, crate::ParamRole::OptimizerState) => {
                        let zeros = vec![0.0; v.ty.numel()];
                        Arr::new(v.ty.dtype, v.ty.shape.clone(), Data::F(zeros))
                    }
                    (None, _) => return Err(InterpError::MissingParam(name.clone())),
                });
            }
            ValueDef::Const(t) => vals[i] = Some(Arr::from_tensor(t)),
            ValueDef::Node { .. } => {}
        }
    }
    let mut last_use = vec![usize::MAX; g.values().len()];
    for (ni, n) in g.nodes().iter().enumerate() {
        for &v in &n.inputs {
            last_use[v.index()] = ni;
        }
    }
    for (_, v) in g.outputs() {
        last_use[v.index()] = usize::MAX;
    }
    for &(_, v) in g.updates() {
        last_use[v.index()] = usize::MAX;
    }
    for (ni, n) in g.nodes().iter().enumerate() {
        let too_big = n
            .outputs
            .iter()
            .map(|&o| &g.value(o).ty)
            .find(|t| t.checked_bytes().is_none_or(|b| b > INTERP_MAX_BYTES));
        let op_error = |msg: String| InterpError::Op {
            node: ni,
            op: n.op.name(),
            name: if n.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", n.name)
            },
            msg,
        };
        if let Some(t) = too_big {
            return Err(op_error(format!(
                "the result {t} is larger than the reference interpreter handles (16 GiB)"
            )));
        }
        let ins: Vec<&Arr> = n
            .inputs
            .iter()
            .map(|v| vals[v.index()].as_ref().expect("verified graph"))
            .collect();
        let out = eval(&n.op, &ins).map_err(op_error)?;
        if opts.check_nan {
            if let Data::F(v) = &out.data {
                if let Some(bad) = v.iter().find(|x| x.is_nan()) {
                    return Err(InterpError::NonFinite {
                        node: ni,
                        op: n.op.name(),
                        name: if n.name.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", n.name)
                        },
                        value: *bad,
                        ty: g.value(n.outputs[0]).ty.to_string(),
                    });
                }
            }
        }
        vals[n.outputs[0].index()] = Some(out);
        for &v in &n.inputs {
            if last_use[v.index()] == ni {
                vals[v.index()] = None;
            }
        }
    }
    let value = |v: ValueId| vals[v.index()].as_ref().expect("computed").to_tensor();
    Ok(Run {
        outputs: g
            .outputs()
            .iter()
            .map(|(name, v)| (name.clone(), value(*v)))
            .collect(),
        updates: g.updates().iter().map(|&(p, v)| (p, value(v))).collect(),
    })
}
