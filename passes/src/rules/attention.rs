//! Attention recognition: the scaled dot-product attention the exporters decompose becomes one
//! `attention` op, with grouped-query head repetition folded in.
//!
//! ```text
//! attention:       P·v,  P = softmax(α·(q·kᵀ) + mask)               ==  attention[scale=α](q, k, v, mask)
//! attention-guard: where(isnan(P), 0, P)·v                          ==  the same
//! softcap:         P = softmax(c·tanh(α·(q·kᵀ)) + mask)             ==  attention[scale=α·c, softcap=c]
//! scalar-matmul:   (x·c)·y  ==  (x·y)·c  ==  x·(y·c)                 (c a one-element constant)
//! scalar-layout:   layout(x·c)  ==  layout(x)·c                      (transpose, reshape, expand)
//! attention-gqa:   attention(q, repeat_kv(k), repeat_kv(v), m)     ==  attention(q, k, v, m)
//! ```
//!
//! `α·(q·kᵀ)` is any chain of multiplications and divisions by one-element constants around
//! the product, so the eager spelling (`(q·kᵀ)·s`, `(q·kᵀ)/√d`) and the SDPA exports' (q and
//! kᵀ each scaled by `d^-1/4` before the product, which `scalar-matmul` pulls out) match the
//! same rule; α is the chain's product. `kᵀ` is whatever the exporter wrote; the rule names
//! `k` as `transpose(kᵀ, [0,1,3,2])` and the layout rules ([`super::layout`]) fold that
//! transpose into the exporter's. `repeat_kv` is
//! `reshape(expand(reshape(x, [B,Hk,1,T,D]), [B,Hk,g,T,D]), [B,Hk·g,T,D])`.

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use memc_ir::Attr;

use super::{add_attr, add_op, ints, merge, ops, scalar, ty};
use crate::egraph::{Memc, TypeAnalysis};

/// How many scalar multiplications and divisions may wrap `q·kᵀ`.
const SCALE_DEPTH: usize = 4;

/// The children of `class`'s e-nodes of the op `name`.
fn nodes<'a>(
    egraph: &'a EGraph<Memc, TypeAnalysis>,
    class: Id,
    name: &'a str,
) -> impl Iterator<Item = &'a [Id]> + 'a {
    ops(egraph, class)
        .filter(move |(op, _)| *op == name)
        .map(|(_, kids)| kids)
}

/// Every `(α, q, kᵀ)` with `class == α·(q·kᵀ)`, `q·kᵀ` a 4-D batched product.
fn scaled_products(
    egraph: &EGraph<Memc, TypeAnalysis>,
    class: Id,
    depth: usize,
) -> Vec<(f64, Id, Id)> {
    let mut out = vec![];
    for kids in nodes(egraph, class, "matmul") {
        if let &[q, kt] = kids {
            if ty(egraph, q).is_some_and(|t| t.shape.len() == 4)
                && ty(egraph, kt).is_some_and(|t| t.shape.len() == 4)
            {
                out.push((1.0, q, kt));
            }
        }
    }
    if depth == 0 {
        return out;
    }
    for (op, inverse) in [("mul", false), ("div", true)] {
        for kids in nodes(egraph, class, op) {
            let &[a, b] = kids else { continue };
            let sides: &[(Id, Id)] = if inverse {
                &[(a, b)]
            } else {
                &[(a, b), (b, a)]
            };
            for &(x, c) in sides {
                let Some(c) = scalar(egraph, c).filter(|c| *c != 0.0 && c.is_finite()) else {
                    continue;
                };
                let f = if inverse { 1.0 / c } else { c };
                for (alpha, q, kt) in scaled_products(egraph, x, depth - 1) {
                    out.push((alpha * f, q, kt));
                }
            }
        }
    }
    out
}

/// Every `(α, softcap, q, kᵀ)` with `class == softcap·tanh(α·(q·kᵀ)/softcap)`, or `class ==
/// α·(q·kᵀ)` with softcap 0: logit soft-capping is `c·tanh(y)` with `y` a scaled product.
fn capped_products(egraph: &EGraph<Memc, TypeAnalysis>, class: Id) -> Vec<(f64, f64, Id, Id)> {
    let mut out: Vec<(f64, f64, Id, Id)> = scaled_products(egraph, class, SCALE_DEPTH)
        .into_iter()
        .map(|(a, q, kt)| (a, 0.0, q, kt))
        .collect();
    for kids in nodes(egraph, class, "mul") {
        let &[a, b] = kids else { continue };
        for (t, c) in [(a, b), (b, a)] {
            let Some(c) = scalar(egraph, c).filter(|c| *c > 0.0 && c.is_finite()) else {
                continue;
            };
            for tk in nodes(egraph, t, "tanh") {
                for (alpha, q, kt) in scaled_products(egraph, tk[0], SCALE_DEPTH) {
                    // c·tanh(α·qk) = c·tanh((α·c)·qk / c): scale α·c, softcap c.
                    out.push((alpha * c, c, q, kt));
                }
            }
        }
    }
    out
}

/// `attention` from `softmax(scores)·v`, `scores = α·(q·kᵀ) + mask` (soft-capped or not).
struct Sdpa {
    scores: Var,
    v: Var,
    zero: Option<Var>,
}

impl Applier<Memc, TypeAnalysis> for Sdpa {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        if let Some(z) = self.zero {
            if scalar(egraph, subst[z]) != Some(0.0) {
                return vec![];
            }
        }
        let (scores, v) = (subst[self.scores], subst[self.v]);
        let (Some(vt), Some(yt)) = (ty(egraph, v), ty(egraph, eclass)) else {
            return vec![];
        };
        // (α·(q·kᵀ), mask) pairs: the mask is the other operand of an add.
        let mut found = vec![];
        for kids in nodes(egraph, scores, "add") {
            if let &[a, b] = kids {
                for (s, m) in [(a, b), (b, a)] {
                    for (alpha, cap, q, kt) in capped_products(egraph, s) {
                        found.push((alpha, cap, q, kt, m));
                    }
                }
            }
        }
        for (alpha, cap, q, kt, mask) in found {
            let (Some(qt), Some(ktt), Some(mt)) = (ty(egraph, q), ty(egraph, kt), ty(egraph, mask))
            else {
                continue;
            };
            let ok = ktt.shape[..2] == qt.shape[..2]
                && ktt.shape[2] == qt.shape[3]
                && vt.shape.len() == 4
                && vt.shape[..2] == qt.shape[..2]
                && vt.shape[2] == ktt.shape[3]
                && mt.dtype == qt.dtype
                && yt.shape == [qt.shape[0], qt.shape[1], qt.shape[2], vt.shape[3]];
            if !ok {
                continue;
            }
            let perm = add_attr(egraph, "perm", Attr::Ints(vec![0, 1, 3, 2]));
            let k = add_op(egraph, "transpose", vec![perm, kt]);
            let mut kids = vec![add_attr(egraph, "scale", Attr::Float(alpha as f32))];
            if cap > 0.0 {
                kids.push(add_attr(egraph, "softcap", Attr::Float(cap as f32)));
            }
            kids.extend([q, k, v, mask]);
            let id = add_op(egraph, "attention", kids);
            let merged = merge(egraph, eclass, id);
            if !merged.is_empty() {
                return merged;
            }
        }
        vec![]
    }
}

/// `op(.., x·c, ..) == op(.., x, ..)·c` for a one-element constant `c`.
struct PullScalar {
    /// The rewritten op's pattern with `?x` in place of `x·c`.
    inner: Pattern<Memc>,
    c: Var,
}

impl Applier<Memc, TypeAnalysis> for PullScalar {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let c = subst[self.c];
        // One element (what `scalar` holds) broadcasts to any result; the product must keep
        // the op's type (`merge` checks).
        if scalar(egraph, c).is_none() {
            return vec![];
        }
        let inner = egraph.add_instantiation(&self.inner.ast, subst);
        if ty(egraph, inner).is_none() {
            return vec![];
        }
        let id = add_op(egraph, "mul", vec![inner, c]);
        merge(egraph, eclass, id)
    }
}

/// Folds `repeat_kv` of k and v into the attention.
struct Gqa {
    /// The attention's attribute children (scale, and softcap when present).
    attrs: Vec<Var>,
    q: Var,
    k: Var,
    v: Var,
    mask: Var,
    shapes: [Var; 6],
}

impl Applier<Memc, TypeAnalysis> for Gqa {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (k, v) = (subst[self.k], subst[self.v]);
        let (Some(kt), Some(vt)) = (ty(egraph, k), ty(egraph, v)) else {
            return vec![];
        };
        let sh: Vec<Option<Vec<i64>>> = self
            .shapes
            .iter()
            .map(|&s| ints(egraph, subst[s]))
            .collect();
        let repeat_of = |x: &[usize],
                         outer: &Option<Vec<i64>>,
                         ex: &Option<Vec<i64>>,
                         inner: &Option<Vec<i64>>|
         -> bool {
            let (Some(outer), Some(ex), Some(inner)) = (outer, ex, inner) else {
                return false;
            };
            if x.len() != 4 || inner.len() != 5 || ex.len() != 5 || outer.len() != 4 {
                return false;
            }
            let x: Vec<i64> = x.iter().map(|&d| d as i64).collect();
            let g = ex[2];
            *inner == [x[0], x[1], 1, x[2], x[3]]
                && *ex == [x[0], x[1], g, x[2], x[3]]
                && *outer == [x[0], x[1] * g, x[2], x[3]]
        };
        if !repeat_of(&kt.shape, &sh[0], &sh[1], &sh[2])
            || !repeat_of(&vt.shape, &sh[3], &sh[4], &sh[5])
        {
            return vec![];
        }
        let mut kids: Vec<Id> = self.attrs.iter().map(|&a| subst[a]).collect();
        kids.extend([subst[self.q], k, v, subst[self.mask]]);
        let id = add_op(egraph, "attention", kids);
        merge(egraph, eclass, id)
    }
}

/// The attention rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let var = |v: &str| -> Var { v.parse().unwrap() };
    let pattern = |p: &str| p.parse::<Pattern<Memc>>().expect("a valid pattern");
    let sm = "(softmax axis=3 ?scores)";
    let mut out = vec![];
    for (name, p, guarded) in [
        (
            "attention-guard",
            format!("(matmul (where (is_nan {sm}) ?zero {sm}) ?v)"),
            true,
        ),
        ("attention", format!("(matmul {sm} ?v)"), false),
    ] {
        let applier = Sdpa {
            scores: var("?scores"),
            v: var("?v"),
            zero: guarded.then(|| var("?zero")),
        };
        out.push(Rewrite::new(name, pattern(&p), applier).expect("a valid rule"));
    }
    for (name, from, to) in [
        (
            "scalar-matmul-left",
            "(matmul (mul ?x ?c) ?y)",
            "(matmul ?x ?y)",
        ),
        (
            "scalar-matmul-left-swapped",
            "(matmul (mul ?c ?x) ?y)",
            "(matmul ?x ?y)",
        ),
        (
            "scalar-matmul-right",
            "(matmul ?y (mul ?x ?c))",
            "(matmul ?y ?x)",
        ),
        (
            "scalar-matmul-right-swapped",
            "(matmul ?y (mul ?c ?x))",
            "(matmul ?y ?x)",
        ),
        (
            "scalar-transpose",
            "(transpose ?p (mul ?x ?c))",
            "(transpose ?p ?x)",
        ),
        (
            "scalar-reshape",
            "(reshape ?p (mul ?x ?c))",
            "(reshape ?p ?x)",
        ),
        ("scalar-expand", "(expand ?p (mul ?x ?c))", "(expand ?p ?x)"),
    ] {
        let applier = PullScalar {
            inner: pattern(to),
            c: var("?c"),
        };
        out.push(Rewrite::new(name, pattern(from), applier).expect("a valid rule"));
    }
    let repeat = |x: &str, a: &str, b: &str, c: &str| {
        format!("(reshape {a} (expand {b} (reshape {c} {x})))")
    };
    for (name, attrs) in [
        ("attention-gqa", &["?scale"][..]),
        ("attention-gqa-softcap", &["?scale", "?softcap"][..]),
    ] {
        let p = format!(
            "(attention {} ?q {} {} ?mask)",
            attrs.join(" "),
            repeat("?k", "?s0", "?s1", "?s2"),
            repeat("?v", "?s3", "?s4", "?s5")
        );
        out.push(
            Rewrite::new(
                name,
                pattern(&p),
                Gqa {
                    attrs: attrs.iter().map(|a| var(a)).collect(),
                    q: var("?q"),
                    k: var("?k"),
                    v: var("?v"),
                    mask: var("?mask"),
                    shapes: ["?s0", "?s1", "?s2", "?s3", "?s4", "?s5"].map(var),
                },
            )
            .expect("a valid rule"),
        );
    }
    out
}
