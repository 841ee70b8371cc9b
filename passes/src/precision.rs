//! Compute precision: rewrites an f32 forward graph to compute in bf16 (or f16) while the
//! weights stay f32 ("master weights"). Each float weight is read through one `cast` to the
//! compute dtype, float constants are converted, every float result becomes the compute dtype,
//! and float outputs are cast back to f32. Autodiff then gives f32 weight gradients (the
//! `cast`'s VJP) and the optimizer updates the f32 weights.

use std::collections::HashMap;

use memc_ir::{DType, Graph, Op, ParamRole, Tensor, TensorType, ValueDef, ValueId};

/// What the pass did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrecisionStats {
    /// Weights read through a cast.
    pub cast_weights: usize,
    /// Nodes whose results changed dtype.
    pub converted_nodes: usize,
}

/// Why a graph could not be lowered to a compute dtype.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrecisionError {
    /// The compute dtype is not a float type.
    #[error("compute dtype {0} is not a float type")]
    NotFloat(DType),
    /// A node's types do not fit the new precision.
    #[error("node `{node}` ({op}): {msg}")]
    Node {
        /// The node's name.
        node: String,
        /// Its op.
        op: &'static str,
        /// What does not fit.
        msg: String,
    },
    /// A cast could not be added (a memc bug).
    #[error("{0}")]
    Cast(String),
}

impl From<String> for PrecisionError {
    fn from(msg: String) -> PrecisionError {
        PrecisionError::Cast(msg)
    }
}

/// Rewrites `g` to compute in `dtype` (see the module docs). Errors name the node whose types
/// do not fit the new precision.
pub fn lower_precision(g: &mut Graph, dtype: DType) -> Result<PrecisionStats, PrecisionError> {
    if !matches!(dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(PrecisionError::NotFloat(dtype));
    }
    if dtype == DType::F32 {
        return Ok(PrecisionStats::default());
    }
    let narrow = |d: DType| if d == DType::F32 { dtype } else { d };
    let mut out = Graph::new();
    let mut map: HashMap<ValueId, ValueId> = HashMap::new();
    let mut stats = PrecisionStats::default();
    for &v in g.inputs() {
        let val = g.value(v);
        let ValueDef::Input { name } = &val.def else {
            unreachable!("inputs are inputs")
        };
        let id = out.add_input(name.clone(), val.ty.clone());
        map.insert(
            v,
            if val.ty.dtype == DType::F32 {
                out.add_node(Op::Cast { to: dtype }, &[id], "memc.precision")?[0]
            } else {
                id
            },
        );
    }
    // Params and constants keep their ids' order; weights are cast on first use below.
    for (i, val) in g.values().iter().enumerate() {
        let v = ValueId(i as u32);
        match &val.def {
            ValueDef::Param { name, role, data } => {
                let id = match (role, val.ty.dtype) {
                    (ParamRole::Constant, DType::F32) => {
                        let ty = TensorType::new(dtype, val.ty.shape.clone());
                        let data = data
                            .as_ref()
                            .map(|t| Tensor::from_f32(dtype, t.shape().to_vec(), &t.to_f32_vec()));
                        out.add_param(name.clone(), ParamRole::Constant, ty, data)
                    }
                    _ => {
                        let id = out.add_param(name.clone(), *role, val.ty.clone(), data.clone());
                        if val.ty.dtype == DType::F32 && *role == ParamRole::Weight {
                            stats.cast_weights += 1;
                            out.add_node(
                                Op::Cast { to: dtype },
                                &[id],
                                format!("memc.precision.{name}"),
                            )?[0]
                        } else {
                            id
                        }
                    }
                };
                map.insert(v, id);
            }
            ValueDef::Const(t) if t.dtype() == DType::F32 => {
                map.insert(
                    v,
                    out.add_const(Tensor::from_f32(dtype, t.shape().to_vec(), &t.to_f32_vec())),
                );
            }
            ValueDef::Const(t) => {
                map.insert(v, out.add_const(t.clone()));
            }
            _ => {}
        }
    }
    for (i, node) in g.nodes().iter().enumerate() {
        let label = g.node_label(memc_ir::NodeId(i as u32));
        let inputs: Vec<ValueId> = node.inputs.iter().map(|v| map[v]).collect();
        let op = match &node.op {
            Op::Cast { to } => Op::Cast { to: narrow(*to) },
            other => other.clone(),
        };
        let results = out
            .add_node(op, &inputs, node.name.clone())
            .map_err(|msg| PrecisionError::Node {
                node: label,
                op: node.op.name(),
                msg,
            })?;
        if let Some(&r) = results.first() {
            let new = out.producer(r).expect("a node result");
            out.set_chunk(new, node.chunk);
        }
        if results
            .iter()
            .zip(&node.outputs)
            .any(|(&r, &o)| out.value(r).ty != g.value(o).ty)
        {
            stats.converted_nodes += 1;
        }
        for (&o, r) in node.outputs.iter().zip(results) {
            map.insert(o, r);
        }
    }
    for (name, v) in g.outputs() {
        let r = map[v];
        let r = if out.value(r).ty.dtype == dtype && g.value(*v).ty.dtype == DType::F32 {
            out.add_node(Op::Cast { to: DType::F32 }, &[r], "memc.precision.output")?[0]
        } else {
            r
        };
        out.add_output(name.clone(), r);
    }
    for &(p, v) in g.updates() {
        out.add_update(map[&p], map[&v]);
    }
    out.compact();
    *g = out;
    Ok(stats)
}
