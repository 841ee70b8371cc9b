//! Algebraic identities: ops that leave their operand unchanged disappear.
//!
//! ```text
//! mul-one:          x · 1            ==  x      (either side; when the product has x's type)
//! add-zero:         x + 0            ==  x      (either side; likewise)
//! reshape-same:     reshape[shape(x)](x)  ==  x
//! expand-same:      expand[shape(x)](x)   ==  x
//! cast-same:        cast[dtype(x)](x)     ==  x
//! transpose-id:     transpose[0,1,..](x)  ==  x
//! ```
//! Constant folding happens at import (the importer folds every node whose operands are all
//! constant), so it has no rule here.

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};

use super::{ints, merge, scalar};
use crate::egraph::{Memc, TypeAnalysis};

/// `eclass == x` when the optional scalar is `value` and the optional perm is the identity
/// (the types must agree: [`merge`] checks).
struct Identity {
    x: Var,
    scalar: Option<(Var, f64)>,
    perm: Option<Var>,
}

impl Applier<Memc, TypeAnalysis> for Identity {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        if let Some((v, want)) = self.scalar {
            if scalar(egraph, subst[v]) != Some(want) {
                return vec![];
            }
        }
        if let Some(p) = self.perm {
            match ints(egraph, subst[p]) {
                Some(p) if p.iter().enumerate().all(|(i, &d)| d == i as i64) => {}
                _ => return vec![],
            }
        }
        merge(egraph, eclass, subst[self.x])
    }
}

/// The identity rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let var = |v: &str| -> Var { v.parse().unwrap() };
    let rule = |name: &str, pattern: &str, scalar: Option<(&str, f64)>, perm: bool| {
        Rewrite::new(
            name,
            pattern.parse::<Pattern<Memc>>().expect("a valid pattern"),
            Identity {
                x: var("?x"),
                scalar: scalar.map(|(v, x)| (var(v), x)),
                perm: perm.then(|| var("?p")),
            },
        )
        .expect("a valid rule")
    };
    vec![
        rule("mul-one", "(mul ?x ?c)", Some(("?c", 1.0)), false),
        rule("mul-one-swapped", "(mul ?c ?x)", Some(("?c", 1.0)), false),
        rule("add-zero", "(add ?x ?c)", Some(("?c", 0.0)), false),
        rule("add-zero-swapped", "(add ?c ?x)", Some(("?c", 0.0)), false),
        rule("reshape-same", "(reshape ?s ?x)", None, false),
        rule("expand-same", "(expand ?s ?x)", None, false),
        rule("cast-same", "(cast ?t ?x)", None, false),
        rule("transpose-id", "(transpose ?p ?x)", None, true),
    ]
}
