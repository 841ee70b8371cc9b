//! The verifier: every structural and typing invariant of a [`Graph`], all errors at once.

use std::collections::HashSet;

use crate::{Graph, ValueDef, ValueId};

/// Every invariant the graph breaks, one line each.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the graph is invalid ({} error(s)):\n  {}", .errors.len(), .errors.join("\n  "))]
pub struct VerifyError {
    /// One message per broken invariant.
    pub errors: Vec<String>,
}

/// Checks that values are defined before use, node output types equal what the op infers,
/// value definitions are consistent, parameter/constant data matches its type, and input,
/// parameter and output names are unique.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    let mut errors = Vec::new();
    let n_values = g.values().len();
    let valid = |v: ValueId| v.index() < n_values;

    let mut names = HashSet::new();
    for (i, v) in g.values().iter().enumerate() {
        match &v.def {
            ValueDef::Input { name } => {
                if !g.inputs().contains(&ValueId(i as u32)) {
                    errors.push(format!(
                        "%{i}: input `{name}` is not in the graph's input list"
                    ));
                }
                if !names.insert(name.clone()) {
                    errors.push(format!("%{i}: name `{name}` is used twice"));
                }
            }
            ValueDef::Param { name, data, .. } => {
                if !names.insert(name.clone()) {
                    errors.push(format!("%{i}: name `{name}` is used twice"));
                }
                if let Some(t) = data {
                    if t.ty() != &v.ty {
                        errors.push(format!(
                            "%{i}: param `{name}` is declared {} but its data is {}",
                            v.ty,
                            t.ty()
                        ));
                    }
                }
            }
            ValueDef::Const(t) => {
                if t.ty() != &v.ty {
                    errors.push(format!(
                        "%{i}: constant is declared {} but its data is {}",
                        v.ty,
                        t.ty()
                    ));
                }
            }
            ValueDef::Node { node, index } => {
                let ok = g
                    .nodes()
                    .get(node.index())
                    .and_then(|n| n.outputs.get(*index as usize))
                    .is_some_and(|&o| o.index() == i);
                if !ok {
                    errors.push(format!(
                        "%{i}: claims to be output {index} of node #{} which does not define it",
                        node.0
                    ));
                }
            }
        }
    }
    for &v in g.inputs() {
        if !valid(v) || !matches!(g.value(v).def, ValueDef::Input { .. }) {
            errors.push(format!("graph input %{} is not an input value", v.0));
        }
    }

    for (ni, node) in g.nodes().iter().enumerate() {
        let here = || {
            if node.name.is_empty() {
                format!("node #{ni} `{}`", node.op.name())
            } else {
                format!("node #{ni} `{}` ({})", node.op.name(), node.name)
            }
        };
        let mut operands_ok = true;
        for &v in &node.inputs {
            if !valid(v) {
                errors.push(format!("{}: operand %{} does not exist", here(), v.0));
                operands_ok = false;
                continue;
            }
            if let ValueDef::Node { node: def, .. } = g.value(v).def {
                if def.index() >= ni {
                    errors.push(format!(
                        "{}: operand %{} is used before it is defined",
                        here(),
                        v.0
                    ));
                }
            }
        }
        for (k, &o) in node.outputs.iter().enumerate() {
            let ok = valid(o)
                && matches!(g.value(o).def, ValueDef::Node { node, index } if node.index() == ni && index as usize == k);
            if !ok {
                errors.push(format!(
                    "{}: result {k} (%{}) is not defined by this node",
                    here(),
                    o.0
                ));
                operands_ok = false;
            }
        }
        if !operands_ok {
            continue;
        }
        let tys: Vec<_> = node.inputs.iter().map(|&v| g.value(v).ty.clone()).collect();
        match node.op.infer(&tys) {
            Err(e) => errors.push(format!("{}: {e}", here())),
            Ok(expected) => {
                let actual: Vec<_> = node
                    .outputs
                    .iter()
                    .map(|&o| g.value(o).ty.clone())
                    .collect();
                if expected != actual {
                    let show = |ts: &[crate::TensorType]| {
                        ts.iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    errors.push(format!(
                        "{}: results are typed {} but the op gives {}",
                        here(),
                        show(&actual),
                        show(&expected)
                    ));
                }
            }
        }
    }

    let mut updated = HashSet::new();
    for &(p, v) in g.updates() {
        if !valid(p) || !valid(v) {
            errors.push(format!(
                "update %{} = %{} refers to a missing value",
                p.0, v.0
            ));
            continue;
        }
        let target = g.value(p);
        match &target.def {
            ValueDef::Param {
                role: crate::ParamRole::Weight | crate::ParamRole::OptimizerState,
                name,
                ..
            } => {
                if target.ty != g.value(v).ty {
                    errors.push(format!(
                        "update of `{name}`: {} is assigned a {}",
                        target.ty,
                        g.value(v).ty
                    ));
                }
                if !updated.insert(p) {
                    errors.push(format!("`{name}` is updated twice"));
                }
            }
            _ => errors.push(format!(
                "update target %{} is not a weight or optimizer state",
                p.0
            )),
        }
    }
    let mut with_grad = HashSet::new();
    for &(p, v) in g.grads() {
        if !valid(p) || !valid(v) {
            errors.push(format!(
                "grad %{} = %{} refers to a missing value",
                p.0, v.0
            ));
            continue;
        }
        match &g.value(p).def {
            ValueDef::Param {
                role: crate::ParamRole::Weight,
                name,
                ..
            } => {
                if g.value(p).ty != g.value(v).ty {
                    errors.push(format!(
                        "gradient of `{name}`: {} has a gradient of type {}",
                        g.value(p).ty,
                        g.value(v).ty
                    ));
                }
                if !with_grad.insert(p) {
                    errors.push(format!("`{name}` has two gradients"));
                }
            }
            _ => errors.push(format!("grad target %{} is not a weight", p.0)),
        }
    }
    let mut out_names = HashSet::new();
    for (name, v) in g.outputs() {
        if !valid(*v) {
            errors.push(format!("output `{name}` refers to missing value %{}", v.0));
        }
        if !out_names.insert(name) {
            errors.push(format!("output name `{name}` is used twice"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(VerifyError { errors })
    }
}
