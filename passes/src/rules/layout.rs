//! Layout rules: transposes and reshapes that cancel or compose fold away.
//!
//! ```text
//! transpose-transpose:  transpose[p1](transpose[p2](x))  ==  transpose[p2∘p1](x)   (x when the identity)
//! batch-transpose:      reshape[B,H,D,T](transpose[0,2,1](reshape[B·H,T,D](x)))  ==  transpose[0,1,3,2](x)
//! reshape-reshape:      reshape[s](reshape[t](x))      ==  reshape[s](x)
//! matmul-reshape:       reshape[s](x)·w                ==  reshape[s'](x·w)       (w a matrix; s keeps x's last dim)
//! bias-reshape:         reshape[s](m) + b              ==  reshape[s](m + b)      (b a vector; s keeps m's last dim)
//! add-reshape:          reshape[s](x) + y              ==  reshape[s](x + reshape[shape(x)](y))   (y of the sum's type)
//!
//! norm-reshape:         norm[axis=r-1](reshape[s](x), ..)  ==  reshape[s](norm[axis=rank(x)-1](x, ..))   (s keeps the last dim)
//! max-reshape:          max(reshape[s](x), c)          ==  reshape[s](max(x, c))  (c a one-element constant: ReLU)
//! ```
//!
//! `add-reshape`, `norm-reshape` and `max-reshape` bring a sub-block run on a flattened
//! stream (OPT's FFN runs on `[B·S, d]`) back to the stream's own shape, where the residual
//! rule sees it.
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

/// `reshape[s](x) + y == reshape[s](x + reshape[shape(x)](y))`, y of the sum's type.
struct AddReshape {
    s: Var,
    x: Var,
    y: Var,
}

impl Applier<Memc, TypeAnalysis> for AddReshape {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, y) = (subst[self.x], subst[self.y]);
        let (Some(xt), Some(yt), Some(out)) = (ty(egraph, x), ty(egraph, y), ty(egraph, eclass))
        else {
            return vec![];
        };
        if yt != out || xt.shape == out.shape || xt.dtype != out.dtype {
            return vec![];
        }
        let back = add_attr(
            egraph,
            "shape",
            Attr::Ints(xt.shape.iter().map(|&d| d as i64).collect()),
        );
        let y2 = add_op(egraph, "reshape", vec![back, y]);
        let sum = add_op(egraph, "add", vec![x, y2]);
        let id = add_op(egraph, "reshape", vec![subst[self.s], sum]);
        merge(egraph, eclass, id)
    }
}

/// `op(reshape[s](x), rest..) == reshape[s](op(x, rest..))` for a norm over the last axis
/// (`norm`) or `max` with a one-element constant, when `s` keeps `x`'s last dim.
struct OutOfReshape {
    op: &'static str,
    s: Var,
    x: Var,
    rest: Vec<Var>,
    /// A norm's `axis` and `epsilon` attributes (`None` for `max`).
    norm: Option<(Var, Var)>,
}

impl Applier<Memc, TypeAnalysis> for OutOfReshape {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let x = subst[self.x];
        let (Some(xt), Some(out), Some(s)) = (
            ty(egraph, x),
            ty(egraph, eclass),
            ints(egraph, subst[self.s]),
        ) else {
            return vec![];
        };
        if xt.shape.is_empty() || s.last().copied() != xt.shape.last().map(|&d| d as i64) {
            return vec![];
        }
        let mut kids = vec![];
        if let Some((axis, eps)) = self.norm {
            // The norm must cover the last axis only (its weights' shapes then agree, which
            // `merge`'s type check confirms).
            let axis = match &egraph[subst[axis]].data.attr {
                Some(crate::egraph::AttrLeaf {
                    value: Attr::Int(a),
                    ..
                }) => *a,
                _ => return vec![],
            };
            if axis + 1 != out.shape.len() as i64 {
                return vec![];
            }
            kids.push(add_attr(
                egraph,
                "axis",
                Attr::Int(xt.shape.len() as i64 - 1),
            ));
            kids.push(subst[eps]);
        }
        kids.push(x);
        for &r in &self.rest {
            kids.push(subst[r]);
        }
        if self.norm.is_none() && super::scalar(egraph, subst[self.rest[0]]).is_none() {
            return vec![];
        }
        let inner = add_op(egraph, self.op, kids);
        let id = add_op(egraph, "reshape", vec![subst[self.s], inner]);
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
            "max-reshape",
            "(max (reshape ?s ?x) ?c)".parse::<Pattern<Memc>>().unwrap(),
            OutOfReshape {
                op: "max",
                s: var("?s"),
                x: var("?x"),
                rest: vec![var("?c")],
                norm: None,
            },
        )
        .unwrap(),
        Rewrite::new(
            "layer-norm-reshape",
            "(layer_norm ?axis ?eps (reshape ?s ?x) ?w ?b)"
                .parse::<Pattern<Memc>>()
                .unwrap(),
            OutOfReshape {
                op: "layer_norm",
                s: var("?s"),
                x: var("?x"),
                rest: vec![var("?w"), var("?b")],
                norm: Some((var("?axis"), var("?eps"))),
            },
        )
        .unwrap(),
        Rewrite::new(
            "rms-norm-reshape",
            "(rms_norm ?axis ?eps (reshape ?s ?x) ?w)"
                .parse::<Pattern<Memc>>()
                .unwrap(),
            OutOfReshape {
                op: "rms_norm",
                s: var("?s"),
                x: var("?x"),
                rest: vec![var("?w")],
                norm: Some((var("?axis"), var("?eps"))),
            },
        )
        .unwrap(),
        Rewrite::new(
            "add-reshape",
            "(add (reshape ?s ?x) ?y)".parse::<Pattern<Memc>>().unwrap(),
            AddReshape {
                s: var("?s"),
                x: var("?x"),
                y: var("?y"),
            },
        )
        .unwrap(),
        Rewrite::new(
            "add-reshape-swapped",
            "(add ?y (reshape ?s ?x))".parse::<Pattern<Memc>>().unwrap(),
            AddReshape {
                s: var("?s"),
                x: var("?x"),
                y: var("?y"),
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
