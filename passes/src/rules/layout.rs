//! Layout rules: transposes and reshapes that cancel or compose fold away.
//!
//! ```text
//! transpose-transpose:  transpose[p1](transpose[p2](x))  ==  transpose[p2∘p1](x)   (x when the identity)
//! batch-transpose:      reshape[B,H,D,T](transpose[0,2,1](reshape[B·H,T,D](x)))  ==  transpose[0,1,3,2](x)
//! ```

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use memc_ir::Attr;

use super::{add_attr, add_op, ints, merge, ty};
use crate::egraph::{Memc, TypeAnalysis};

struct ComposeTransposes {
    outer: Var,
    inner: Var,
    x: Var,
}

impl Applier<Memc, TypeAnalysis> for ComposeTransposes {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (Some(p1), Some(p2)) = (
            ints(egraph, subst[self.outer]),
            ints(egraph, subst[self.inner]),
        ) else {
            return vec![];
        };
        if p1.len() != p2.len() || p1.iter().any(|&i| i < 0 || i as usize >= p2.len()) {
            return vec![];
        }
        let p: Vec<i64> = p1.iter().map(|&i| p2[i as usize]).collect();
        let x = subst[self.x];
        let id = if p.iter().enumerate().all(|(i, &d)| d == i as i64) {
            x
        } else {
            let perm = add_attr(egraph, "perm", Attr::Ints(p));
            add_op(egraph, "transpose", vec![perm, x])
        };
        merge(egraph, eclass, id)
    }
}

struct BatchTranspose {
    outer: Var,
    perm: Var,
    inner: Var,
    x: Var,
}

impl Applier<Memc, TypeAnalysis> for BatchTranspose {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let x = subst[self.x];
        let Some(xt) = ty(egraph, x) else {
            return vec![];
        };
        if xt.shape.len() != 4 {
            return vec![];
        }
        let s: Vec<i64> = xt.shape.iter().map(|&d| d as i64).collect();
        let ok = ints(egraph, subst[self.inner]) == Some(vec![s[0] * s[1], s[2], s[3]])
            && ints(egraph, subst[self.perm]) == Some(vec![0, 2, 1])
            && ints(egraph, subst[self.outer]) == Some(vec![s[0], s[1], s[3], s[2]]);
        if !ok {
            return vec![];
        }
        let perm = add_attr(egraph, "perm", Attr::Ints(vec![0, 1, 3, 2]));
        let id = add_op(egraph, "transpose", vec![perm, x]);
        merge(egraph, eclass, id)
    }
}

/// The layout rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let var = |v: &str| -> Var { v.parse().unwrap() };
    vec![
        Rewrite::new(
            "transpose-transpose",
            "(transpose ?p1 (transpose ?p2 ?x))"
                .parse::<Pattern<Memc>>()
                .unwrap(),
            ComposeTransposes {
                outer: var("?p1"),
                inner: var("?p2"),
                x: var("?x"),
            },
        )
        .unwrap(),
        Rewrite::new(
            "batch-transpose",
            "(reshape ?s1 (transpose ?p (reshape ?s2 ?x)))"
                .parse::<Pattern<Memc>>()
                .unwrap(),
            BatchTranspose {
                outer: var("?s1"),
                perm: var("?p"),
                inner: var("?s2"),
                x: var("?x"),
            },
        )
        .unwrap(),
    ]
}
