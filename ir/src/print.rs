//! The textual IR printer. The format (one value or node per line):
//!
//! ```text
//! graph {
//!   %0 = input "input_ids" : i64[2, 16]
//!   %1 = param "embed.weight" : f32[256, 64]
//!   %2 = param const "memc.const.0" : bool[1, 1, 16, 16]
//!   %3 = const [0.5] : f32[]
//!   %4 = gather(%1, %0) {axis = 0} : f32[2, 16, 64]
//!   %5 = neg(%4) : f32[2, 16, 64] @b
//!   output "hidden" = %4
//!   update %1 = %5
//!   grad %1 = %5
//! }
//! ```
//!
//! Values are numbered in printing order (inputs, params and constants, node results), so the
//! text is deterministic and `print(parse(print(g))) == print(g)`.

use std::fmt::Write;

use crate::{Attr, DType, Graph, ParamRole, Tensor, ValueDef};

/// Prints a graph as textual IR.
pub fn print(g: &Graph) -> String {
    print_annotated(g, &|_| None)
}

/// Prints a graph as textual IR with a `// note` after each node `note` has one for (a pass's
/// results, such as the fused kernel a node belongs to). The notes are comments: the text
/// parses back to the same graph.
pub fn print_annotated(g: &Graph, note: &dyn Fn(crate::NodeId) -> Option<String>) -> String {
    let mut num = vec![u32::MAX; g.values().len()];
    let mut next = 0u32;
    let mut name = |v: crate::ValueId, num: &mut Vec<u32>| -> u32 {
        if num[v.index()] == u32::MAX {
            num[v.index()] = next;
            next += 1;
        }
        num[v.index()]
    };
    let mut s = String::from("graph {\n");
    for &v in g.inputs() {
        let i = name(v, &mut num);
        if let ValueDef::Input { name } = &g.value(v).def {
            let _ = writeln!(s, "  %{i} = input {} : {}", quote(name), g.value(v).ty);
        }
    }
    for (idx, v) in g.values().iter().enumerate() {
        let id = crate::ValueId(idx as u32);
        match &v.def {
            ValueDef::Param { name: n, role, .. } => {
                let i = name(id, &mut num);
                let kind = match role {
                    ParamRole::Weight => "param",
                    ParamRole::Constant => "param const",
                    ParamRole::OptimizerState => "param state",
                };
                let _ = writeln!(s, "  %{i} = {kind} {} : {}", quote(n), v.ty);
            }
            ValueDef::Const(t) => {
                let i = name(id, &mut num);
                let _ = writeln!(s, "  %{i} = const {} : {}", literal(t), v.ty);
            }
            _ => {}
        }
    }
    for (node_index, node) in g.nodes().iter().enumerate() {
        let outs: Vec<String> = node
            .outputs
            .iter()
            .map(|&o| format!("%{}", name(o, &mut num)))
            .collect();
        let ins: Vec<String> = node
            .inputs
            .iter()
            .map(|&v| {
                if v.index() < num.len() && num[v.index()] != u32::MAX {
                    format!("%{}", num[v.index()])
                } else {
                    format!("%?{}", v.0)
                }
            })
            .collect();
        let _ = write!(
            s,
            "  {} = {}({})",
            outs.join(", "),
            node.op.name(),
            ins.join(", ")
        );
        let attrs = node.op.attrs();
        if !attrs.is_empty() {
            let parts: Vec<String> = attrs
                .iter()
                .map(|(k, a)| format!("{k} = {}", attr(a)))
                .collect();
            let _ = write!(s, " {{{}}}", parts.join(", "));
        }
        let tys: Vec<String> = node
            .outputs
            .iter()
            .map(|&o| g.value(o).ty.to_string())
            .collect();
        let _ = write!(s, " : {}", tys.join(", "));
        if node.phase != crate::Phase::Forward {
            let _ = write!(s, " @{}", node.phase.tag());
        }
        if let Some(n) = note(crate::NodeId(node_index as u32)) {
            let _ = write!(s, "  // {n}");
        }
        s.push('\n');
    }
    for (n, v) in g.outputs() {
        let i = if num[v.index()] == u32::MAX {
            format!("?{}", v.0)
        } else {
            num[v.index()].to_string()
        };
        let _ = writeln!(s, "  output {} = %{i}", quote(n));
    }
    let show = |v: crate::ValueId| {
        if v.index() < num.len() && num[v.index()] != u32::MAX {
            format!("%{}", num[v.index()])
        } else {
            format!("%?{}", v.0)
        }
    };
    for &(p, v) in g.updates() {
        let _ = writeln!(s, "  update {} = {}", show(p), show(v));
    }
    for &(p, v) in g.grads() {
        let _ = writeln!(s, "  grad {} = {}", show(p), show(v));
    }
    s.push_str("}\n");
    s
}

/// A string literal with `"` and `\` escaped (and newlines as `\n`).
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn attr(a: &Attr) -> String {
    match a {
        Attr::Int(v) => v.to_string(),
        Attr::Float(f) => float(*f),
        Attr::Bool(b) => b.to_string(),
        Attr::Ints(v) => format!(
            "[{}]",
            v.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Attr::DType(d) => d.name().to_string(),
    }
}

/// Shortest text that parses back to the same f32 (`1.0`, `1e-5`, `inf`, `NaN`).
pub(crate) fn float(f: f32) -> String {
    format!("{f:?}")
}

fn literal(t: &Tensor) -> String {
    let items: Vec<String> = if t.dtype() == DType::F64 {
        t.to_f64_vec()
            .into_iter()
            .map(|v| format!("{v:?}"))
            .collect()
    } else if t.dtype().is_float() {
        t.to_f32_vec().into_iter().map(float).collect()
    } else if t.dtype() == DType::Bool {
        t.to_i64_vec()
            .into_iter()
            .map(|v| (v != 0).to_string())
            .collect()
    } else {
        t.to_i64_vec().into_iter().map(|v| v.to_string()).collect()
    };
    if items.len() > 1 && items.iter().all(|x| x == &items[0]) {
        return format!("splat({})", items[0]);
    }
    format!("[{}]", items.join(", "))
}
