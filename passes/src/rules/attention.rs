//! Attention recognition: the scaled dot-product attention the exporters decompose becomes one
//! `attention` op, with grouped-query head repetition folded in.
//!
//! ```text
//! attention:      where(isnan(P), 0, P)·v,  P = softmax((q·a)·(kᵀ·b) + mask)  ==  attention[scale=a·b](q, k, v, mask)
//! attention-bare: softmax((q·a)·(kᵀ·b) + mask)·v                           ==  attention[scale=a·b](q, k, v, mask)
//! attention-gqa:  attention(q, repeat_kv(k), repeat_kv(v), m)              ==  attention(q, k, v, m)
//! ```
//!
//! `kᵀ` is whatever the exporter wrote; the rule names `k` as `transpose(kᵀ, [0,1,3,2])` and
//! the layout rules ([`super::layout`]) fold that transpose into the exporter's. `repeat_kv`
//! is `reshape(expand(reshape(x, [B,Hk,1,T,D]), [B,Hk,g,T,D]), [B,Hk·g,T,D])`.

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use memc_ir::Attr;

use super::{add_attr, add_op, ints, merge, scalar, ty};
use crate::egraph::{Memc, TypeAnalysis};

struct Sdpa {
    q: Var,
    kt: Var,
    v: Var,
    mask: Var,
    a: Var,
    b: Var,
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
        let (q, kt, v, mask) = (
            subst[self.q],
            subst[self.kt],
            subst[self.v],
            subst[self.mask],
        );
        let (Some(a), Some(b)) = (scalar(egraph, subst[self.a]), scalar(egraph, subst[self.b]))
        else {
            return vec![];
        };
        if let Some(z) = self.zero {
            if scalar(egraph, subst[z]) != Some(0.0) {
                return vec![];
            }
        }
        let (Some(qt), Some(ktt), Some(vt), Some(yt)) = (
            ty(egraph, q),
            ty(egraph, kt),
            ty(egraph, v),
            ty(egraph, eclass),
        ) else {
            return vec![];
        };
        let ok = qt.shape.len() == 4
            && ktt.shape.len() == 4
            && vt.shape.len() == 4
            && ktt.shape[..2] == qt.shape[..2]
            && ktt.shape[2] == qt.shape[3]
            && vt.shape[..2] == qt.shape[..2]
            && vt.shape[2] == ktt.shape[3]
            && yt.shape == [qt.shape[0], qt.shape[1], qt.shape[2], vt.shape[3]];
        if !ok {
            return vec![];
        }
        let perm = add_attr(egraph, "perm", Attr::Ints(vec![0, 1, 3, 2]));
        let k = add_op(egraph, "transpose", vec![perm, kt]);
        let scale = add_attr(egraph, "scale", Attr::Float((a * b) as f32));
        let id = add_op(egraph, "attention", vec![scale, q, k, v, mask]);
        merge(egraph, eclass, id)
    }
}

/// Folds `repeat_kv` of k and v into the attention.
struct Gqa {
    scale: Var,
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
        let id = add_op(
            egraph,
            "attention",
            vec![subst[self.scale], subst[self.q], k, v, subst[self.mask]],
        );
        merge(egraph, eclass, id)
    }
}

/// The attention rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let var = |v: &str| -> Var { v.parse().unwrap() };
    let scores = "(add (matmul (mul ?q ?a) (mul ?kt ?b)) ?mask)";
    let sm = format!("(softmax axis=3 {scores})");
    let mut out = vec![];
    for (name, pattern, guarded) in [
        (
            "attention",
            format!("(matmul (where (is_nan {sm}) ?zero {sm}) ?v)"),
            true,
        ),
        ("attention-bare", format!("(matmul {sm} ?v)"), false),
    ] {
        out.push(
            Rewrite::new(
                name,
                pattern.parse::<Pattern<Memc>>().expect("a valid pattern"),
                Sdpa {
                    q: var("?q"),
                    kt: var("?kt"),
                    v: var("?v"),
                    mask: var("?mask"),
                    a: var("?a"),
                    b: var("?b"),
                    zero: guarded.then(|| var("?zero")),
                },
            )
            .expect("a valid rule"),
        );
    }
    let repeat = |x: &str, a: &str, b: &str, c: &str| {
        format!("(reshape {a} (expand {b} (reshape {c} {x})))")
    };
    let pattern = format!(
        "(attention ?scale ?q {} {} ?mask)",
        repeat("?k", "?s0", "?s1", "?s2"),
        repeat("?v", "?s3", "?s4", "?s5")
    );
    out.push(
        Rewrite::new(
            "attention-gqa",
            pattern.parse::<Pattern<Memc>>().expect("a valid pattern"),
            Gqa {
                scale: var("?scale"),
                q: var("?q"),
                k: var("?k"),
                v: var("?v"),
                mask: var("?mask"),
                shapes: ["?s0", "?s1", "?s2", "?s3", "?s4", "?s5"].map(var),
            },
        )
        .expect("a valid rule"),
    );
    out
}
