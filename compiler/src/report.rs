//! Reports on a compiled graph: the machine-readable `--report-json` object (stable keys) and
//! the human `--report` table.

use std::fmt::Write;

use memc_ir::{Graph, ParamRole, ValueDef};
use serde_json::{json, Value};

/// Wall time of one compiler phase.
#[derive(Debug, Clone)]
pub struct PhaseTime {
    /// The phase (`import`, `verify`, ...).
    pub name: &'static str,
    /// Milliseconds.
    pub ms: f64,
}

/// The `--report-json` object. Keys: `model`, `op_counts`, `nodes`, `params`, `params_bytes`,
/// `constant_bytes`, `inputs`, `outputs`, `passes` (later issues add memory keys).
pub fn json_report(model: &str, g: &Graph, phases: &[PhaseTime]) -> Value {
    let io = |v: memc_ir::ValueId, name: &str| {
        let ty = &g.value(v).ty;
        json!({"name": name, "dtype": ty.dtype.name(), "shape": ty.shape})
    };
    let inputs: Vec<Value> = g
        .inputs()
        .iter()
        .map(|&v| match &g.value(v).def {
            ValueDef::Input { name } => io(v, name),
            _ => unreachable!("verified graph"),
        })
        .collect();
    let outputs: Vec<Value> = g.outputs().iter().map(|(n, v)| io(*v, n)).collect();
    let constant_bytes: usize = g
        .values()
        .iter()
        .filter(|v| {
            matches!(
                v.def,
                ValueDef::Param {
                    role: ParamRole::Constant,
                    ..
                } | ValueDef::Const(_)
            )
        })
        .map(|v| v.ty.bytes())
        .sum();
    json!({
        "model": model,
        "op_counts": g.op_counts(),
        "nodes": g.nodes().len(),
        "params": g.params_numel(),
        "params_bytes": g.params_bytes(),
        "constant_bytes": constant_bytes,
        "inputs": inputs,
        "outputs": outputs,
        "passes": phases.iter().map(|p| json!({"name": p.name, "ms": p.ms})).collect::<Vec<_>>(),
    })
}

/// A short human summary of a graph: sizes and op counts.
pub fn summary(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "graph: {} nodes, {} weight tensors ({} parameters, {} bytes)",
        g.nodes().len(),
        g.weights().count(),
        g.params_numel(),
        g.params_bytes()
    );
    for &v in g.inputs() {
        if let ValueDef::Input { name } = &g.value(v).def {
            let _ = writeln!(s, "  input  {name}: {}", g.value(v).ty);
        }
    }
    for (name, v) in g.outputs() {
        let _ = writeln!(s, "  output {name}: {}", g.value(*v).ty);
    }
    let counts: Vec<String> = g
        .op_counts()
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    let _ = writeln!(s, "  ops: {}", counts.join(", "));
    s
}
