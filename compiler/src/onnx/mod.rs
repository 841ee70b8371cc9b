//! The ONNX frontend: a model file from PyTorch's exporters (dynamo, opset 18+, or
//! TorchScript, opset 14–17) into a forward [`Graph`] with static shapes.
//!
//! The file is memory-mapped and decoded by prost from the mapping, so initializers'
//! `raw_data` point into the mapping: parameters are never copied. Dynamic input dims are bound
//! from [`ImportOptions::shapes`]; every other shape is inferred by memc itself (the file's
//! `value_info` is not trusted), and shape arithmetic (`Shape → Gather → Concat → Reshape`,
//! masks from `Range`/`Less`/`Where`) folds to constants as it is met, by the reference
//! interpreter. Nodes are converted per op family in [`ops`].

mod load;
mod ops;
#[allow(missing_docs, clippy::all)]
mod proto;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memc_ir::{DType, Graph, ParamRole, Tensor, TensorType, ValueId};

pub use load::load_model;

/// What the importer needs besides the file.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Full shapes for graph inputs by name (`--shape input_ids=2x16`); symbolic dims shared
    /// with other inputs (`batch`, `seq`) are bound from them too.
    pub shapes: HashMap<String, Vec<usize>>,
}

/// Why a model could not be imported. Each message is one line naming the file, and the node
/// and op where there is one, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file could not be read.
    #[error("{path}: cannot read the model: {source}")]
    Io {
        /// The model file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The bytes are not an ONNX model.
    #[error("{path}: not a valid ONNX model ({msg}); re-export it with torch.onnx.export")]
    Malformed {
        /// The model file.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// A graph input cannot be given a static type.
    #[error("{path}: input `{input}`: {msg}")]
    Input {
        /// The model file.
        path: PathBuf,
        /// The input's name.
        input: String,
        /// What is wrong and what to do.
        msg: String,
    },
    /// An initializer's data cannot be loaded.
    #[error("{path}: initializer `{tensor}`: {msg}")]
    Tensor {
        /// The model file.
        path: PathBuf,
        /// The initializer's name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// A node cannot be converted: an unsupported op, attribute or shape.
    #[error("{path}: node `{node}` ({domain}{op}, opset {opset}): {msg}")]
    Node {
        /// The model file.
        path: PathBuf,
        /// The node's name.
        node: String,
        /// `""` for the default domain, else `domain::`.
        domain: String,
        /// The op type.
        op: String,
        /// The opset of the node's domain.
        opset: i64,
        /// What is wrong and what to do.
        msg: String,
    },
    /// The built graph does not verify (a frontend bug).
    #[error("{path}: the imported graph is invalid (a memc bug, please report it): {source}")]
    Verify {
        /// The model file.
        path: PathBuf,
        /// The verifier's findings.
        source: memc_ir::VerifyError,
    },
}

/// A value during import: folded to a constant, or computed by the graph.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    Const(Tensor),
    Ir(ValueId),
}

/// Constants with more elements than this become [`ParamRole::Constant`] params rather than
/// inline literals, to keep the textual IR readable.
const INLINE_CONST_MAX: usize = 64;

/// Import state: the graph being built and what each ONNX value name means.
pub(crate) struct Ctx {
    pub(crate) g: Graph,
    env: HashMap<String, Val>,
    /// Materialised constants, keyed by data identity, so a constant used twice is one value.
    consts: HashMap<(usize, usize, TensorType), ValueId>,
    n_const_params: usize,
    pub(crate) opset: i64,
}

impl Ctx {
    pub(crate) fn ty(&self, v: &Val) -> TensorType {
        match v {
            Val::Const(t) => t.ty().clone(),
            Val::Ir(id) => self.g.value(*id).ty.clone(),
        }
    }

    /// The graph value for `v`, materialising a constant once.
    pub(crate) fn ir(&mut self, v: &Val) -> ValueId {
        match v {
            Val::Ir(id) => *id,
            Val::Const(t) => {
                let key = (t.bytes().as_ptr() as usize, t.bytes().len(), t.ty().clone());
                if let Some(&id) = self.consts.get(&key) {
                    return id;
                }
                let id = if t.numel() <= INLINE_CONST_MAX {
                    self.g.add_const(t.clone())
                } else {
                    self.n_const_params += 1;
                    let name = format!("memc.const.{}", self.n_const_params - 1);
                    self.g
                        .add_param(name, ParamRole::Constant, t.ty().clone(), Some(t.clone()))
                };
                self.consts.insert(key, id);
                id
            }
        }
    }

    /// Applies `op`: folded by the interpreter when every operand is constant, else a node.
    pub(crate) fn emit(
        &mut self,
        op: memc_ir::Op,
        operands: &[Val],
        name: &str,
    ) -> Result<Val, String> {
        if operands.iter().all(|v| matches!(v, Val::Const(_))) {
            let ts: Vec<&Tensor> = operands
                .iter()
                .map(|v| match v {
                    Val::Const(t) => t,
                    Val::Ir(_) => unreachable!(),
                })
                .collect();
            return memc_ir::eval_op(&op, &ts).map(Val::Const);
        }
        let ids: Vec<ValueId> = operands.iter().map(|v| self.ir(v)).collect();
        let out = self.g.add_node(op, &ids, name)?;
        Ok(Val::Ir(out[0]))
    }
}

/// Maps an ONNX `TensorProto.DataType` code to memc's dtype.
pub(crate) fn dtype_of(code: i32) -> Result<DType, String> {
    use proto::tensor_proto::DataType as D;
    match D::try_from(code) {
        Ok(D::Float) => Ok(DType::F32),
        Ok(D::Float16) => Ok(DType::F16),
        Ok(D::Bfloat16) => Ok(DType::BF16),
        Ok(D::Int64) => Ok(DType::I64),
        Ok(D::Int32) => Ok(DType::I32),
        Ok(D::Bool) => Ok(DType::Bool),
        Ok(d) => Err(format!(
            "element type {} is not supported (memc handles float, float16, bfloat16, int64, int32, bool)",
            d.as_str_name()
        )),
        Err(_) => Err(format!("unknown element type code {code}")),
    }
}

/// Imports an ONNX model file into a verified forward graph.
pub fn import(path: &Path, opts: &ImportOptions) -> Result<Graph, ImportError> {
    let model = load_model(path)?;
    import_model(path, &model, opts)
}

pub(crate) fn import_model(
    path: &Path,
    model: &proto::ModelProto,
    opts: &ImportOptions,
) -> Result<Graph, ImportError> {
    let p = || path.to_path_buf();
    let malformed = |msg: &str| ImportError::Malformed {
        path: p(),
        msg: msg.into(),
    };
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| malformed("it has no graph"))?;
    if graph.node.is_empty() && graph.output.is_empty() {
        return Err(malformed("its graph is empty"));
    }
    let mut opsets = HashMap::new();
    for o in &model.opset_import {
        let d = o.domain();
        opsets.insert(
            if d == "ai.onnx" {
                String::new()
            } else {
                d.to_string()
            },
            o.version(),
        );
    }
    let opset = *opsets
        .get("")
        .ok_or_else(|| malformed("it imports no default-domain opset"))?;
    let mut ctx = Ctx {
        g: Graph::new(),
        env: HashMap::new(),
        consts: HashMap::new(),
        n_const_params: 0,
        opset,
    };

    // Initializers: float tensors with more than one element are weights; integer and scalar
    // ones are constants (shape operands, indices, exporter-made scalars) and may fold.
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut ext = load::ExternalData::new(base_dir);
    for init in &graph.initializer {
        let name = init.name().to_string();
        let t = load::tensor(init, &mut ext).map_err(|msg| ImportError::Tensor {
            path: p(),
            tensor: name.clone(),
            msg,
        })?;
        let v = if t.dtype().is_float() && t.numel() > 1 {
            Val::Ir(
                ctx.g
                    .add_param(name.clone(), ParamRole::Weight, t.ty().clone(), Some(t)),
            )
        } else {
            Val::Const(t)
        };
        ctx.env.insert(name, v);
    }

    bind_inputs(path, graph, opts, &mut ctx)?;

    for node in &graph.node {
        let domain = node.domain();
        let node_opset = opsets.get(domain).copied().unwrap_or(0);
        let err = |msg: String| ImportError::Node {
            path: p(),
            node: node.name().to_string(),
            domain: if domain.is_empty() {
                String::new()
            } else {
                format!("{domain}::")
            },
            op: node.op_type().to_string(),
            opset: node_opset,
            msg,
        };
        if !domain.is_empty() && domain != "ai.onnx" {
            return Err(err(format!(
                "ops of domain `{domain}` are not supported; export with torch.onnx.export using the default ONNX domain (and inline model-local functions with onnx.inliner)"
            )));
        }
        let mut inputs = Vec::with_capacity(node.input.len());
        for name in &node.input {
            if name.is_empty() {
                inputs.push(None);
                continue;
            }
            let v = ctx.env.get(name).cloned().ok_or_else(|| {
                err(format!("input `{name}` is not produced by any earlier node, initializer or graph input (the graph is not topologically sorted or is truncated)"))
            })?;
            inputs.push(Some(v));
        }
        let outs = ops::convert(&mut ctx, node, &inputs).map_err(err)?;
        for (name, v) in node.output.iter().zip(outs) {
            if !name.is_empty() {
                ctx.env.insert(name.clone(), v);
            }
        }
    }

    for out in &graph.output {
        let name = out.name();
        let v = ctx
            .env
            .get(name)
            .cloned()
            .ok_or_else(|| malformed(&format!("graph output `{name}` is never computed")))?;
        let id = ctx.ir(&v);
        ctx.g.add_output(name, id);
    }
    ctx.g.compact();
    memc_ir::verify(&ctx.g).map_err(|source| ImportError::Verify { path: p(), source })?;
    Ok(ctx.g)
}

/// Gives every graph input a static type: declared dims, `--shape`, or symbolic dims bound
/// through another input's `--shape`.
fn bind_inputs(
    path: &Path,
    graph: &proto::GraphProto,
    opts: &ImportOptions,
    ctx: &mut Ctx,
) -> Result<(), ImportError> {
    use proto::tensor_shape_proto::dimension::Value as Dim;
    use proto::type_proto::Value as Ty;
    let err = |input: &str, msg: String| ImportError::Input {
        path: path.to_path_buf(),
        input: input.to_string(),
        msg,
    };
    struct Decl<'a> {
        name: &'a str,
        dtype: DType,
        dims: Vec<Option<Dim>>,
    }
    let mut decls = Vec::new();
    for inp in &graph.input {
        let name = inp.name();
        if ctx.env.contains_key(name) {
            continue; // older exporters list initializers as inputs too
        }
        let tensor = match inp.r#type.as_ref().and_then(|t| t.value.as_ref()) {
            Some(Ty::TensorType(t)) => t,
            _ => return Err(err(name, "only tensor inputs are supported".into())),
        };
        let dtype = dtype_of(tensor.elem_type()).map_err(|m| err(name, m))?;
        let shape = tensor
            .shape
            .as_ref()
            .ok_or_else(|| err(name, "the model declares no shape (rank) for it".into()))?;
        let dims = shape.dim.iter().map(|d| d.value.clone()).collect();
        decls.push(Decl { name, dtype, dims });
    }
    for name in opts.shapes.keys() {
        if !decls.iter().any(|d| d.name == name) {
            let known: Vec<&str> = decls.iter().map(|d| d.name).collect();
            return Err(err(
                name,
                format!(
                    "--shape names an input the model does not have (inputs: {})",
                    known.join(", ")
                ),
            ));
        }
    }
    // Bind symbols from the inputs given explicitly.
    let mut symbols: HashMap<String, usize> = HashMap::new();
    for d in &decls {
        let Some(given) = opts.shapes.get(d.name) else {
            continue;
        };
        if given.len() != d.dims.len() {
            return Err(err(
                d.name,
                format!(
                    "--shape gives {} dims but the model declares {}",
                    given.len(),
                    d.dims.len()
                ),
            ));
        }
        for (k, (dim, &g)) in d.dims.iter().zip(given).enumerate() {
            match dim {
                Some(Dim::DimValue(v)) if *v != g as i64 => {
                    return Err(err(
                        d.name,
                        format!("--shape gives {g} for dim {k}, which the model fixes to {v}"),
                    ));
                }
                Some(Dim::DimParam(s)) => {
                    if let Some(&prev) = symbols.get(s) {
                        if prev != g {
                            return Err(err(
                                d.name,
                                format!("dim `{s}` is bound to both {prev} and {g} by --shape"),
                            ));
                        }
                    }
                    symbols.insert(s.clone(), g);
                }
                _ => {}
            }
        }
    }
    for d in decls {
        let mut shape = Vec::with_capacity(d.dims.len());
        for (k, dim) in d.dims.iter().enumerate() {
            let v = match (opts.shapes.get(d.name), dim) {
                (Some(given), _) => given[k],
                (None, Some(Dim::DimValue(v))) if *v >= 0 => *v as usize,
                (None, Some(Dim::DimParam(s))) if symbols.contains_key(s) => symbols[s],
                (None, dim) => {
                    let what = match dim {
                        Some(Dim::DimParam(s)) => format!("dim {k} (`{s}`)"),
                        _ => format!("dim {k}"),
                    };
                    return Err(err(
                        d.name,
                        format!(
                            "{what} is dynamic; bind it with --shape {}={}",
                            d.name,
                            example_shape(&d.dims)
                        ),
                    ));
                }
            };
            shape.push(v);
        }
        let id = ctx.g.add_input(d.name, TensorType::new(d.dtype, shape));
        ctx.env.insert(d.name.to_string(), Val::Ir(id));
    }
    Ok(())
}

fn example_shape(dims: &[Option<proto::tensor_shape_proto::dimension::Value>]) -> String {
    use proto::tensor_shape_proto::dimension::Value as Dim;
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Some(Dim::DimValue(v)) if *v >= 0 => v.to_string(),
            _ => "N".into(),
        })
        .collect();
    if parts.is_empty() {
        "<scalar>".into()
    } else {
        parts.join("x")
    }
}
