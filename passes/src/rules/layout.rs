//! Layout rules: transposes and reshapes that cancel or compose fold away.
//!
//! ```text
//! transpose-transpose:  transpose[p1](transpose[p2](x))  ==  transpose[p2∘p1](x)   (x when the identity)
//! batch-transpose:      reshape[B,H,D,T](transpose[0,2,1](reshape[B·H,T,D](x)))  ==  transpose[0,1,3,2](x)
//! reshape-reshape:      reshape[s](reshape[t](x))      ==  reshape[s](x)
//! matmul-reshape:       reshape[s](x)·w                ==  reshape[s'](x·w)       (w a matrix; s keeps x's last dim)
//! bias-reshape:         reshape[s](m) + b              ==  reshape[s](m + b)      (b a vector; s keeps m's last dim)
//! ```
//!
//! The last two undo the flattening GPT-2's `Conv1D` (and other exporters' `Gemm`s) put
//! around every projection (`[B, S, d] → [B·S, d]`), so a block reads as the same
//! GEMMs on `[B, S, d]` whichever way it was exported.

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

/// `reshape[s](x)` with `s` and `x`'s shape ending in the same dim `d`, and `w` a `[d, n]`
/// matrix (`bias` false), or `b` a `[d]` vector (`bias` true).
struct ThroughReshape {
    s: Var,
    x: Var,
    other: Var,
    bias: bool,
}

impl Applier<Memc, TypeAnalysis> for ThroughReshape {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, other) = (subst[self.x], subst[self.other]);
        let (Some(s), Some(xt), Some(ot)) = (
            ints(egraph, subst[self.s]),
            ty(egraph, x),
            ty(egraph, other),
        ) else {
            return vec![];
        };
        let Some(&d) = xt.shape.last() else {
            return vec![];
        };
        if s.len() < 2 || xt.shape.len() < 2 || s.last() != Some(&(d as i64)) {
            return vec![];
        }
        let id = if self.bias {
            if ot.shape != [d] {
                return vec![];
            }
            let sum = add_op(egraph, "add", vec![x, other]);
            let shape = add_attr(egraph, "shape", Attr::Ints(s));
            add_op(egraph, "reshape", vec![shape, sum])
        } else {
            if ot.shape.len() != 2 || ot.shape[0] != d {
                return vec![];
            }
            let mut s2 = s;
            *s2.last_mut().unwrap() = ot.shape[1] as i64;
            let product = add_op(egraph, "matmul", vec![x, other]);
            let shape = add_attr(egraph, "shape", Attr::Ints(s2));
            add_op(egraph, "reshape", vec![shape, product])
        };
        merge(egraph, eclass, id)
    }
}

/// `reshape[s](reshape[t](x)) == reshape[s](x)`.
struct ReshapeReshape {
    s: Var,
    x: Var,
}

impl Applier<Memc, TypeAnalysis> for ReshapeReshape {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let id = add_op(egraph, "reshape", vec![subst[self.s], subst[self.x]]);
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
        Rewrite::new(
            "reshape-reshape",
            "(reshape ?s (reshape ?t ?x))"
                .parse::<Pattern<Memc>>()
                .unwrap(),
            ReshapeReshape {
                s: var("?s"),
                x: var("?x"),
            },
        )
        .unwrap(),
        Rewrite::new(
            "matmul-reshape",
            "(matmul (reshape ?s ?x) ?w)"
                .parse::<Pattern<Memc>>()
                .unwrap(),
            ThroughReshape {
                s: var("?s"),
                x: var("?x"),
                other: var("?w"),
                bias: false,
            },
        )
        .unwrap(),
        Rewrite::new(
            "bias-reshape",
            "(add (reshape ?s ?x) ?b)".parse::<Pattern<Memc>>().unwrap(),
            ThroughReshape {
                s: var("?s"),
                x: var("?x"),
                other: var("?b"),
                bias: true,
            },
        )
        .unwrap(),
        Rewrite::new(
            "bias-reshape-swapped",
            "(add ?b (reshape ?s ?x))".parse::<Pattern<Memc>>().unwrap(),
            ThroughReshape {
                s: var("?s"),
                x: var("?x"),
                other: var("?b"),
                bias: true,
            },
        )
        .unwrap(),
    ]
}
