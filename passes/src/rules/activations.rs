//! Activation recognition: SiLU and GELU (exact and tanh forms) as the exporters spell them
//! become one elementwise op each, whose VJP reads only the input.
//!
//! ```text
//! silu:        x · sigmoid(x)                                   ==  silu(x)
//! gelu-erf:    x · 0.5 · (1 + erf(x / √2))                      ==  gelu(x)        (x·(1/√2) too)
//! gelu-tanh:   x · 0.5 · (1 + tanh(√(2/π) · (x + 0.044715·x³)))  ==  gelu_tanh(x)   (x³ = pow(x, 3) or x·(x·x))
//! ```
//!
//! Products and sums match in either operand order, and the GELU product in each grouping
//! ((x·0.5)·p, (x·p)·0.5, x·(p·0.5), (x·p)/2). Every constant is checked (to f32 rounding):
//! a GELU with another coefficient is left alone.

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};

use super::{add_op, close, commutations, merge, scalar, ty};
use crate::egraph::{Memc, TypeAnalysis};

/// Builds `op(x)` when every named constant has its value.
struct Activation {
    op: &'static str,
    x: Var,
    constants: Vec<(Var, f64)>,
}

impl Applier<Memc, TypeAnalysis> for Activation {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        if !self
            .constants
            .iter()
            .all(|&(v, want)| close(scalar(egraph, subst[v]), want))
        {
            return vec![];
        }
        let x = subst[self.x];
        if !ty(egraph, x).is_some_and(|t| t.dtype.is_float()) {
            return vec![];
        }
        let id = add_op(egraph, self.op, vec![x]);
        merge(egraph, eclass, id)
    }
}

/// One row of the rule table: name, pattern (`mul*`/`add*` for either order), op, and the
/// constants with their values.
type Row = (String, String, &'static str, Vec<(&'static str, f64)>);

/// The activation rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let sqrt2 = std::f64::consts::SQRT_2;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    // (rule name, pattern with `mul*`/`add*` for either order, op, constants)
    let erf_forms = [
        ("div", "(erf (div ?x ?s))", ("?s", sqrt2)),
        ("mul", "(erf (mul* ?x ?s))", ("?s", 1.0 / sqrt2)),
    ];
    let mut table: Vec<Row> = vec![(
        "silu".into(),
        "(mul* ?x (sigmoid ?x))".into(),
        "silu",
        vec![],
    )];
    let groupings = [
        ("x-half", "(mul* (mul* ?x ?h) P)", ("?h", 0.5)),
        ("x-p", "(mul* (mul* ?x P) ?h)", ("?h", 0.5)),
        ("p-half", "(mul* ?x (mul* P ?h))", ("?h", 0.5)),
        ("div-two", "(div (mul* ?x P) ?h)", ("?h", 2.0)),
    ];
    for (g_name, grouping, half) in groupings {
        for (e_name, erf, s) in erf_forms {
            let p = format!("(add* {erf} ?one)");
            table.push((
                format!("gelu-erf/{e_name}/{g_name}"),
                grouping.replace('P', &p),
                "gelu",
                vec![half, s, ("?one", 1.0)],
            ));
        }
        // x³ as pow(x, 3) (dynamo) or x·(x·x) (TorchScript's decomposition of tanh GELU).
        for (cube_name, cube, three) in [
            ("pow", "(pow ?x ?three)", true),
            ("mul", "(mul* ?x (mul ?x ?x))", false),
        ] {
            let tanh = format!("(add* (tanh (mul* (add* ?x (mul* {cube} ?k)) ?c)) ?one)");
            let mut checks = vec![half, ("?k", 0.044715), ("?c", c), ("?one", 1.0)];
            if three {
                checks.push(("?three", 3.0));
            }
            table.push((
                format!("gelu-tanh/{cube_name}/{g_name}"),
                grouping.replace('P', &tanh),
                "gelu_tanh",
                checks,
            ));
        }
    }
    let mut out = vec![];
    for (name, pattern, op, constants) in table {
        for (i, p) in commutations(&pattern).into_iter().enumerate() {
            let applier = Activation {
                op,
                x: "?x".parse().unwrap(),
                constants: constants
                    .iter()
                    .map(|&(v, x)| (v.parse().unwrap(), x))
                    .collect(),
            };
            let searcher: Pattern<Memc> = p.parse().expect("a valid pattern");
            out.push(Rewrite::new(format!("{name}/{i}"), searcher, applier).expect("a valid rule"));
        }
    }
    out
}
