//! Which initializers are the model's parameters, and which parameter each one is.
//!
//! PyTorch trains its `nn.Parameter`s; an ONNX file holds initializers, some of them parameters
//! under their state-dict names, some parameters folded by the exporter (a linear layer's weight
//! stored transposed under a made-up name), some buffers (rotary `inv_freq`) and folded constants
//! (causal masks, cos/sin tables at fixed shapes). [`provenance`] sorts them, in this order:
//!
//! 1. **What the exporter recorded.** The dynamo exporter writes the exported program's graph
//!    signature (`pkg.torch.export.ExportedProgram.graph_signature`: each placeholder is a
//!    `PARAMETER`, `BUFFER`, `CONSTANT_TENSOR` or `USER_INPUT`, with its state-dict target) and,
//!    on every node, the FX node it came from (`pkg.torch.onnx.fx_node`, whose arguments name
//!    the placeholders the node read) and its module scopes (`pkg.torch.onnx.name_scopes`). An
//!    initializer named as a parameter's target is that parameter; a folded initializer read by
//!    a node whose FX node read exactly one parameter placeholder the node does not read by name
//!    is that parameter (the same parameter again when the exporter also kept it by name: a
//!    tied LM head stored a second time, transposed) (transposed when the FX node is `aten.linear` and the ONNX node a
//!    `MatMul`: the ONNX operand is `Wᵀ`). With a signature, every other initializer is frozen:
//!    buffers, and constants the exporter folded.
//! 2. **Module scopes.** A folded initializer that is a `MatMul`'s right operand inside module
//!    scope `M` (the dynamo scopes above, or the TorchScript exporter's node names
//!    `/M/with/slashes/MatMul`) is `M.weight`, transposed, when no initializer is already named
//!    `M.weight`. This names TorchScript's `onnx::MatMul_N` weights.
//! 3. **How the graph uses it** (no signature: TorchScript records no buffers). A float
//!    initializer of more than one element is a parameter when it meets data: a node combines
//!    it, or what layout ops, gathers and scalar arithmetic made of it, with a value computed
//!    from the model's inputs. A buffer such as `inv_freq` only meets position ids made from
//!    shapes (`Range`) before it becomes a cos/sin table, so it is not one.
//!
//! A recorded parameter the exporter folded into an expression (Gemma's `1 + w` norms: the
//! exporter's optimizer records on the value `add_N` that it was `folded_from` the parameter
//! and a constant; older files without that record: it is read inside module `M` whose
//! parameter `M.weight` no initializer carries) is
//! trained as its folded value under the initializer's own name and marked
//! [`Origin::FoldedExpression`], since the expression cannot be undone from the file alone.

use std::collections::{HashMap, HashSet};

use crate::proto;

const SIGNATURE_KEY: &str = "pkg.torch.export.ExportedProgram.graph_signature";
const FX_NODE_KEY: &str = "pkg.torch.onnx.fx_node";
const SCOPES_KEY: &str = "pkg.torch.onnx.name_scopes";
const FOLDED_FROM_KEY: &str = "pkg.onnxscript.optimizer.folded_from";

/// How one initializer enters the graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The parameter `name` (its PyTorch state-dict name), stored transposed when `transposed`
    /// (the initializer is `nameᵀ`).
    Parameter {
        /// The parameter's state-dict name.
        name: String,
        /// Whether the initializer holds the transpose of the parameter.
        transposed: bool,
        /// Why it is this parameter (for the report).
        how: &'static str,
    },
    /// A parameter folded by the exporter into an expression memc cannot undo; trained as the
    /// folded value under the initializer's name.
    FoldedExpression {
        /// The parameter it was folded from.
        of: String,
    },
    /// Not a parameter: a buffer, or a constant the exporter folded.
    Frozen {
        /// Why (for the report).
        why: &'static str,
    },
}

/// The origin of every float initializer with more than one element.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// Whether the exporter recorded a parameter signature (rule 1 applied).
    pub recorded: bool,
    /// By initializer name.
    pub inits: HashMap<String, Origin>,
    /// The parameters the signature lists (empty without one), sorted by name.
    pub signature_params: Vec<String>,
}

impl Provenance {
    /// The origin of initializer `name` (`None`: not a float tensor of several elements, a
    /// constant whatever the rules say).
    pub fn of(&self, name: &str) -> Option<&Origin> {
        self.inits.get(name)
    }
}

/// One placeholder of the exported program's signature.
#[derive(Debug, Clone)]
struct Placeholder {
    kind: String,
    target: String,
}

/// Parses the signature's `# inputs` section: `NAME: KIND target='TARGET' ...` lines.
fn parse_signature(text: &str) -> HashMap<String, Placeholder> {
    let mut out = HashMap::new();
    let mut in_inputs = false;
    for line in text.lines() {
        let line = line.trim();
        if let Some(section) = line.strip_prefix('#') {
            in_inputs = section.trim() == "inputs";
            continue;
        }
        if !in_inputs {
            continue;
        }
        let Some((name, rest)) = line.split_once(": ") else {
            continue;
        };
        let kind = rest
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let target = rest
            .split_once("target='")
            .and_then(|(_, t)| t.split_once('\''))
            .map(|(t, _)| t.to_string())
            .unwrap_or_default();
        out.insert(name.to_string(), Placeholder { kind, target });
    }
    out
}

/// An FX node's target op and the `%names` among its arguments.
fn parse_fx_node(text: &str) -> (String, Vec<String>) {
    let target = text
        .split_once("target=")
        .and_then(|(_, t)| t.split_once(']'))
        .map(|(t, _)| t.to_string())
        .unwrap_or_default();
    let args = text.split_once("](").map(|(_, a)| a).unwrap_or_default();
    let names = args
        .split('%')
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    (target, names)
}

fn meta<'a>(props: &'a [proto::StringStringEntryProto], key: &str) -> Option<&'a str> {
    props.iter().find(|p| p.key() == key).map(|p| p.value())
}

/// The innermost module scope of a node: the dynamo exporter's recorded scopes, else the
/// TorchScript exporter's node name (`/model/layers.0/self_attn/q_proj/MatMul`).
fn module_scope(node: &proto::NodeProto) -> Option<String> {
    if let Some(scopes) = meta(&node.metadata_props, SCOPES_KEY) {
        // A Python list: ['', 'model', 'model.layers.0', ..., 'linear']; the last is the FX
        // node itself, the one before the innermost module.
        let items: Vec<&str> = scopes
            .trim_matches(|c| c == '[' || c == ']')
            .split(", ")
            .map(|s| s.trim_matches('\''))
            .collect();
        return (items.len() >= 2)
            .then(|| items[items.len() - 2].to_string())
            .filter(|s| !s.is_empty());
    }
    let name = node.name();
    let parts: Vec<&str> = name.split('/').collect();
    if !name.starts_with('/') || parts.len() < 3 {
        return None;
    }
    Some(parts[1..parts.len() - 1].join("."))
}

/// Whether a tensor of `dims` (as a file claims them: any values) has at most one element.
fn at_most_one(dims: &[i64]) -> bool {
    dims.iter()
        .try_fold(1i64, |n, &d| n.checked_mul(d))
        .is_some_and(|n| n <= 1)
}

/// Ops through which a tensor is still "the parameter" for rule 3: layout, casts, gathers.
const PASS_THROUGH: &[&str] = &[
    "Cast",
    "CastLike",
    "Transpose",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Expand",
    "Identity",
    "Flatten",
    "Gather",
];

/// Elementwise ops through which a tensor stays "the parameter" when the other operand is a
/// constant scalar (Gemma's `w + 1`).
const SCALAR_ARITH: &[&str] = &["Add", "Sub", "Mul", "Div"];

/// Sorts the graph's float initializers of more than one element (see the module docs).
pub fn provenance(graph: &proto::GraphProto) -> Provenance {
    // In file order, so every rule's choices are the same run to run.
    let float_init: Vec<&str> = graph
        .initializer
        .iter()
        .filter(|t| {
            let float = matches!(
                proto::tensor_proto::DataType::try_from(t.data_type()),
                Ok(proto::tensor_proto::DataType::Float
                    | proto::tensor_proto::DataType::Double
                    | proto::tensor_proto::DataType::Float16
                    | proto::tensor_proto::DataType::Bfloat16)
            );
            float && !at_most_one(&t.dims)
        })
        .map(|t| t.name())
        .collect();
    let is_float_init: HashSet<&str> = float_init.iter().copied().collect();
    let init_names: HashSet<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let signature = meta(&graph.metadata_props, SIGNATURE_KEY).map(parse_signature);
    let mut prov = Provenance {
        recorded: signature.is_some(),
        ..Default::default()
    };
    // The nodes reading each value, once (the rules below ask per initializer).
    let mut consumers: HashMap<&str, Vec<&proto::NodeProto>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let readers = |name: &str| consumers.get(name).map_or(&[][..], Vec::as_slice);
    let right_operand = |name: &str| {
        readers(name)
            .iter()
            .any(|n| n.op_type() == "MatMul" && n.input.get(1).map(String::as_str) == Some(name))
    };
    // Module scope rule (2): folded initializers read by a MatMul as its right operand.
    let scope_weight = |name: &str| -> Option<String> {
        readers(name).iter().find_map(|n| {
            let right = n.op_type() == "MatMul" && n.input.get(1).map(String::as_str) == Some(name);
            if !right {
                return None;
            }
            let weight = format!("{}.weight", module_scope(n)?);
            (!init_names.contains(weight.as_str())).then_some(weight)
        })
    };

    if let Some(sig) = &signature {
        let params: HashSet<&str> = sig
            .values()
            .filter(|p| p.kind == "PARAMETER")
            .map(|p| p.target.as_str())
            .collect();
        prov.signature_params = sig
            .values()
            .filter(|p| p.kind == "PARAMETER")
            .map(|p| p.target.clone())
            .collect();
        prov.signature_params.sort();
        // Parameters no initializer carries by name: folded by the exporter.
        let missing: HashSet<&str> = params
            .iter()
            .copied()
            .filter(|t| !init_names.contains(t))
            .collect();
        let mut taken: HashSet<String> = HashSet::new();
        // Each node's FX node, parsed once: its target and the parameters it read.
        let fx: Vec<Option<(String, Vec<&str>)>> = graph
            .node
            .iter()
            .map(|n| {
                let (target, args) = parse_fx_node(meta(&n.metadata_props, FX_NODE_KEY)?);
                let read = args
                    .iter()
                    .filter_map(|a| sig.get(a))
                    .filter(|p| p.kind == "PARAMETER")
                    .map(|p| p.target.as_str())
                    .collect();
                Some((target, read))
            })
            .collect();
        let with_fx = || {
            graph
                .node
                .iter()
                .zip(&fx)
                .filter_map(|(n, f)| f.as_ref().map(|(t, read)| (n, t, read)))
        };
        // Tied parameters the exporter stored once: the name the first node reading the
        // initializer knew it by (a tied embedding is read as the embedding first).
        let mut first_name: HashMap<&str, &str> = HashMap::new();
        for (node, _, read) in with_fx() {
            for input in &node.input {
                let input = input.as_str();
                if !params.contains(input) || first_name.contains_key(input) {
                    continue;
                }
                let alias: Vec<&str> = read
                    .iter()
                    .copied()
                    .filter(|t| missing.contains(t))
                    .collect();
                let known = match (read.contains(&input), alias.as_slice()) {
                    (false, [other]) => other,
                    _ => input,
                };
                first_name.insert(input, known);
            }
        }
        for &name in &float_init {
            if params.contains(name) {
                let known = first_name.get(name).copied().unwrap_or(name);
                taken.insert(known.to_string());
                prov.inits.insert(
                    name.to_string(),
                    Origin::Parameter {
                        name: known.to_string(),
                        transposed: false,
                        how: if known == name {
                            "a parameter in the exporter's signature"
                        } else {
                            "a parameter in the exporter's signature, tied to the one stored under this initializer's name"
                        },
                    },
                );
            }
        }
        // Rule 1 by FX node: the folded initializer read by a node whose FX node read one
        // missing parameter placeholder.
        for (node, target, read) in with_fx() {
            // Parameters the FX node read that this node does not read by name: a missing
            // one, or a tied one the exporter also stored folded (a tied LM head, transposed).
            let mut placeholders: Vec<&str> = read
                .iter()
                .copied()
                .filter(|t| !node.input.iter().any(|i| i == t))
                .collect();
            if placeholders.len() > 1 {
                // `aten.linear(x, w, b)` as MatMul then Add: the folded one is the missing one.
                placeholders.retain(|p| missing.contains(p));
            }
            let folded: Vec<(usize, &str)> = node
                .input
                .iter()
                .enumerate()
                .filter(|(_, i)| is_float_init.contains(i.as_str()) && !params.contains(i.as_str()))
                .map(|(k, i)| (k, i.as_str()))
                .collect();
            if let ([param], [(k, init)]) = (placeholders.as_slice(), folded.as_slice()) {
                if prov.inits.contains_key(*init) {
                    continue;
                }
                let transposed =
                    target.contains("aten.linear") && node.op_type() == "MatMul" && *k == 1;
                taken.insert(param.to_string());
                prov.inits.insert(
                    init.to_string(),
                    Origin::Parameter {
                        name: param.to_string(),
                        transposed,
                        how: "folded by the exporter from this parameter (its FX node)",
                    },
                );
            }
        }
        // What the exporter's optimizer recorded it folded each value from
        // (`pkg.onnxscript.optimizer.folded_from` on the value's `value_info`).
        let folded_from: HashMap<&str, Vec<String>> = graph
            .value_info
            .iter()
            .filter_map(|vi| {
                let list = meta(&vi.metadata_props, FOLDED_FROM_KEY)?;
                let names = list
                    .trim_matches(|c| c == '[' || c == ']')
                    .split(", ")
                    .map(|s| s.trim_matches('\'').to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
                Some((vi.name(), names))
            })
            .collect();
        // Rule 2, then folded expressions, else frozen.
        for &name in &float_init {
            if prov.inits.contains_key(name) {
                continue;
            }
            let sources: &[String] = folded_from.get(name).map_or(&[], Vec::as_slice);
            let recorded: Vec<&str> = sources
                .iter()
                .map(String::as_str)
                .filter(|s| params.contains(s))
                .collect();
            let origin = if let ([of], true) = (recorded.as_slice(), sources.len() > 1) {
                // Folded from one parameter and constants: an expression of it.
                taken.insert(of.to_string());
                Origin::FoldedExpression { of: of.to_string() }
            } else if let ([of], true) = (recorded.as_slice(), right_operand(name)) {
                // Folded from the parameter alone and multiplied by: its transpose.
                taken.insert(of.to_string());
                Origin::Parameter {
                    name: of.to_string(),
                    transposed: true,
                    how: "folded by the exporter from this parameter alone (its record), a MatMul weight",
                }
            } else if let Some(w) =
                scope_weight(name).filter(|w| missing.contains(w.as_str()) && !taken.contains(w))
            {
                taken.insert(w.clone());
                Origin::Parameter {
                    name: w,
                    transposed: true,
                    how: "a MatMul weight inside the parameter's module",
                }
            } else if let Some(of) = readers(name)
                .iter()
                .copied()
                .filter_map(module_scope)
                .map(|s| format!("{s}.weight"))
                .find(|w| missing.contains(w.as_str()) && !taken.contains(w))
            {
                taken.insert(of.clone());
                Origin::FoldedExpression { of }
            } else {
                let buffer = sig
                    .values()
                    .any(|p| p.target == name && p.kind != "PARAMETER");
                Origin::Frozen {
                    why: if buffer {
                        "a buffer in the exporter's signature"
                    } else {
                        "a constant the exporter folded (no parameter in its signature)"
                    },
                }
            };
            prov.inits.insert(name.to_string(), origin);
        }
        // A tied embedding the export renamed after the LM head everywhere (its placeholder
        // is read by no FX node): the one parameter no initializer and no FX node names is
        // the table a `Gather` reads that other nodes read too, stored under the embedding's
        // name as Hugging Face stores tied weights.
        let read: HashSet<&str> = with_fx()
            .flat_map(|(_, _, read)| read.iter().copied())
            .collect();
        let unread: Vec<&&str> = missing
            .iter()
            .filter(|t| !read.contains(**t) && !taken.contains(**t))
            .collect();
        if let [embedding] = unread.as_slice() {
            let tables: HashSet<&str> = graph
                .node
                .iter()
                .filter(|n| n.op_type() == "Gather")
                .filter_map(|n| n.input.first().map(String::as_str))
                .filter(|t| params.contains(t))
                .filter(|t| readers(t).len() > 1)
                .collect();
            if let [table] = tables.into_iter().collect::<Vec<_>>().as_slice() {
                if let Some(Origin::Parameter { name, how, .. }) = prov.inits.get_mut(*table) {
                    *name = embedding.to_string();
                    *how = "the tied embedding the exporter stored under the LM head's name";
                }
            }
        }
        return prov;
    }

    // No signature: rule 3 decides, rule 2 names.
    let meets = meets_data(graph);
    for &name in &float_init {
        let origin = if !meets.contains(name) {
            Origin::Frozen {
                why: "meets no data: only shape-derived values (a buffer such as a rotary table)",
            }
        } else if let Some(w) = scope_weight(name) {
            Origin::Parameter {
                name: w,
                transposed: true,
                how: "a MatMul weight inside the parameter's module (the exporter's node names)",
            }
        } else {
            Origin::Parameter {
                name: name.to_string(),
                transposed: false,
                how: "meets data in the graph",
            }
        };
        prov.inits.insert(name.to_string(), origin);
    }
    prov
}

/// The initializers that meet data (rule 3).
fn meets_data(graph: &proto::GraphProto) -> HashSet<&str> {
    let inits: HashMap<&str, &proto::TensorProto> =
        graph.initializer.iter().map(|t| (t.name(), t)).collect();
    // Values computed from the model's inputs (not from their shapes alone).
    let mut data: HashSet<&str> = graph
        .input
        .iter()
        .map(|i| i.name())
        .filter(|n| !inits.contains_key(n))
        .collect();
    let mut scalar: HashSet<&str> = inits
        .iter()
        .filter(|(_, t)| at_most_one(&t.dims))
        .map(|(n, _)| *n)
        .collect();
    for n in &graph.node {
        let from_shape = matches!(n.op_type(), "Shape" | "Size");
        if !from_shape && n.input.iter().any(|i| data.contains(i.as_str())) {
            data.extend(n.output.iter().map(String::as_str));
        }
        if n.op_type() == "Constant"
            && n.attribute.iter().any(|a| {
                a.name() == "value_float"
                    || a.name() == "value_int"
                    || a.t.as_ref().is_some_and(|t| at_most_one(&t.dims))
            })
        {
            scalar.extend(n.output.iter().map(String::as_str));
        }
    }
    let mut consumers: HashMap<&str, Vec<&proto::NodeProto>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            consumers.entry(i.as_str()).or_default().push(n);
        }
    }
    let mut out = HashSet::new();
    for name in inits.keys() {
        // Follow the initializer through pass-through ops until it meets data.
        let mut stack = vec![*name];
        let mut seen: HashSet<&str> = HashSet::new();
        'walk: while let Some(v) = stack.pop() {
            if !seen.insert(v) {
                continue;
            }
            for n in consumers.get(v).into_iter().flatten() {
                let others = n.input.iter().filter(|i| i.as_str() != v && !i.is_empty());
                let mut others_data = others.clone().any(|i| data.contains(i.as_str()));
                if n.op_type() == "Gather" && n.input.first().map(String::as_str) != Some(v) {
                    others_data = others_data || data.contains(v);
                }
                if others_data {
                    out.insert(*name);
                    break 'walk;
                }
                let through = PASS_THROUGH.contains(&n.op_type())
                    || (SCALAR_ARITH.contains(&n.op_type())
                        && others.clone().all(|i| scalar.contains(i.as_str())));
                if through {
                    stack.extend(n.output.iter().map(String::as_str));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(name: &str, dims: &[i64]) -> proto::TensorProto {
        proto::TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(proto::tensor_proto::DataType::Float as i32),
            ..Default::default()
        }
    }

    fn node(op: &str, name: &str, inputs: &[&str], output: &str) -> proto::NodeProto {
        proto::NodeProto {
            op_type: Some(op.into()),
            name: Some(name.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    /// Without a signature (TorchScript): a weight meets data; a rotary `inv_freq` only meets
    /// position ids made from shapes; a position table gathered at such ids still meets data
    /// after the gather; a `MatMul` weight with a made-up name is named by its node's scope.
    #[test]
    fn usage_decides_without_a_signature() {
        let graph = proto::GraphProto {
            input: vec![proto::ValueInfoProto {
                name: Some("x".into()),
                ..Default::default()
            }],
            initializer: vec![
                init("onnx::MatMul_7", &[4, 4]),
                init("rotary.inv_freq", &[2]),
                init("wpe.weight", &[8, 4]),
            ],
            node: vec![
                node("Shape", "/Shape", &["x"], "shape"),
                node("Range", "/Range", &["shape", "shape", "shape"], "pos"),
                node("Unsqueeze", "/rotary/Unsqueeze", &["rotary.inv_freq"], "f1"),
                node("MatMul", "/rotary/MatMul", &["f1", "pos"], "freqs"),
                node("Cos", "/rotary/Cos", &["freqs"], "cos"),
                node("Mul", "/rotary/Mul", &["x", "cos"], "xr"),
                node("Gather", "/wpe/Gather", &["wpe.weight", "pos"], "pe"),
                node("Add", "/Add", &["xr", "pe"], "h"),
                node(
                    "MatMul",
                    "/layers.0/q_proj/MatMul",
                    &["h", "onnx::MatMul_7"],
                    "q",
                ),
            ],
            ..Default::default()
        };
        let p = provenance(&graph);
        assert!(!p.recorded);
        assert!(matches!(
            p.of("rotary.inv_freq"),
            Some(Origin::Frozen { .. })
        ));
        assert!(
            matches!(p.of("wpe.weight"), Some(Origin::Parameter { name, transposed: false, .. }) if name == "wpe.weight")
        );
        assert!(
            matches!(p.of("onnx::MatMul_7"), Some(Origin::Parameter { name, transposed: true, .. }) if name == "layers.0.q_proj.weight")
        );
    }

    #[test]
    fn signature_and_fx_nodes_parse() {
        let sig = parse_signature(
            "\n# inputs\np_w: PARAMETER target='m.w'\nb_f: BUFFER target='m.f' persistent=False\nids: USER_INPUT\n\n# outputs\nout: USER_OUTPUT\n",
        );
        assert_eq!(sig["p_w"].kind, "PARAMETER");
        assert_eq!(sig["p_w"].target, "m.w");
        assert_eq!(sig["b_f"].target, "m.f");
        assert_eq!(sig["ids"].kind, "USER_INPUT");
        assert!(!sig.contains_key("out"));
        let (t, args) = parse_fx_node(
            "%linear : [num_users=1] = call_function[target=torch.ops.aten.linear.default](args = (%mul_4, %p_w), kwargs = {})",
        );
        assert_eq!(t, "torch.ops.aten.linear.default");
        assert_eq!(args, ["mul_4", "p_w"]);
    }
}
