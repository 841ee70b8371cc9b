//! Algebraic identities: ops that leave their operand unchanged disappear.
//!
//! ```text
//! mul-one:          x · 1            ==  x      (either side; when the product has x's type)
//! add-zero:         x + 0            ==  x      (either side; likewise)
//! reshape-same:     reshape[shape(x)](x)  ==  x
//! expand-same:      expand[shape(x)](x)   ==  x
//! cast-same:        cast[dtype(x)](x)     ==  x
//! transpose-id:     transpose[0,1,..](x)  ==  x
//! and-true:         x && true             ==  expand[shape](x)   (true a constant of all trues)
//! where-expand:     where(expand(m), a, b)  ==  expand(where(m, a, b))   (a, b one-element)
//! attention-mask-expand:  attention(q, k, v, expand(m))  ==  attention(q, k, v, m)
//! ```
//!
//! The last three keep a padding mask at its own size: the dynamo exporter's BERT mask is
//! `where(all_true[1,1,S,1] && pad[B,1,1,S], 0, min)`, `[B, 1, S, S]` as written, `[B, 1, 1, S]`
//! after them (attention broadcasts its mask).
//! Constant folding happens at import (the importer folds every node whose operands are all
//! constant), so it has no rule here.

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};

use memc_ir::{Attr, DType};

use super::{add_attr, add_op, ints, merge, scalar, ty};
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

/// `x && c == expand[shape](x)` (or `x` when the shapes agree) for `c` a constant of all trues.
struct AndTrue {
    x: Var,
    c: Var,
}

impl Applier<Memc, TypeAnalysis> for AndTrue {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, c) = (subst[self.x], subst[self.c]);
        let (Some(xt), Some(ct), Some(out)) = (ty(egraph, x), ty(egraph, c), ty(egraph, eclass))
        else {
            return vec![];
        };
        if egraph[c].data.splat != Some(1.0) || ct.dtype != DType::Bool || xt.dtype != DType::Bool {
            return vec![];
        }
        if xt.shape == out.shape {
            return merge(egraph, eclass, x);
        }
        let shape = add_attr(
            egraph,
            "shape",
            Attr::Ints(out.shape.iter().map(|&d| d as i64).collect()),
        );
        let id = add_op(egraph, "expand", vec![shape, x]);
        merge(egraph, eclass, id)
    }
}

/// `where(expand[s](m), a, b) == expand[s](where(m, a, b))` for one-element `a` and `b`.
struct WhereExpand {
    s: Var,
    m: Var,
    a: Var,
    b: Var,
}

impl Applier<Memc, TypeAnalysis> for WhereExpand {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let one = |id: Id| ty(egraph, id).is_some_and(|t| t.shape.iter().product::<usize>() == 1);
        if !one(subst[self.a]) || !one(subst[self.b]) {
            return vec![];
        }
        let w = add_op(
            egraph,
            "where",
            vec![subst[self.m], subst[self.a], subst[self.b]],
        );
        let id = add_op(egraph, "expand", vec![subst[self.s], w]);
        merge(egraph, eclass, id)
    }
}

/// `attention(q, k, v, expand(m)) == attention(q, k, v, m)`: the op broadcasts its mask
/// (its type inference refuses a mask that does not broadcast, and `merge` checks the type).
struct MaskExpand {
    attrs: Vec<Var>,
    operands: [Var; 4],
}

impl Applier<Memc, TypeAnalysis> for MaskExpand {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let mut kids: Vec<Id> = self.attrs.iter().map(|&a| subst[a]).collect();
        kids.extend(self.operands.iter().map(|&v| subst[v]));
        let id = add_op(egraph, "attention", kids);
        merge(egraph, eclass, id)
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
    let mut out = vec![
        rule("mul-one", "(mul ?x ?c)", Some(("?c", 1.0)), false),
        rule("mul-one-swapped", "(mul ?c ?x)", Some(("?c", 1.0)), false),
        rule("add-zero", "(add ?x ?c)", Some(("?c", 0.0)), false),
        rule("add-zero-swapped", "(add ?c ?x)", Some(("?c", 0.0)), false),
        rule("reshape-same", "(reshape ?s ?x)", None, false),
        rule("expand-same", "(expand ?s ?x)", None, false),
        rule("cast-same", "(cast ?t ?x)", None, false),
        rule("transpose-id", "(transpose ?p ?x)", None, true),
    ];
    let pattern = |p: &str| p.parse::<Pattern<Memc>>().expect("a valid pattern");
    for (name, p) in [
        ("and-true", "(and ?x ?c)"),
        ("and-true-swapped", "(and ?c ?x)"),
    ] {
        let applier = AndTrue {
            x: var("?x"),
            c: var("?c"),
        };
        out.push(Rewrite::new(name, pattern(p), applier).expect("a valid rule"));
    }
    out.push(
        Rewrite::new(
            "where-expand",
            pattern("(where (expand ?s ?m) ?a ?b)"),
            WhereExpand {
                s: var("?s"),
                m: var("?m"),
                a: var("?a"),
                b: var("?b"),
            },
        )
        .expect("a valid rule"),
    );
    for (name, attrs) in [
        ("attention-mask-expand", &["?scale"][..]),
        ("attention-mask-expand-softcap", &["?scale", "?softcap"][..]),
    ] {
        let p = format!("(attention {} ?q ?k ?v (expand ?s ?m))", attrs.join(" "));
        let applier = MaskExpand {
            attrs: attrs.iter().map(|a| var(a)).collect(),
            operands: ["?q", "?k", "?v", "?m"].map(var),
        };
        out.push(Rewrite::new(name, pattern(&p), applier).expect("a valid rule"));
    }
    out
}
