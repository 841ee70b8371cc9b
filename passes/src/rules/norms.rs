//! Norm recognition: the decomposed RMSNorm the exporters write becomes one `rms_norm` op.
//!
//! ```text
//! rms-norm:        w · (x · 1/sqrt(mean(x^2) + eps))      ==  rms_norm(x, w)        (and its spellings)
//! layer-norm:      rms_norm(x - mean(x), w)               ==  layer_norm(x, w)
//! layer-norm-bias: layer_norm(x, w) + b                   ==  layer_norm(x, w, b)
//! ```
//!
//! A decomposed LayerNormalization (the TorchScript exporter below opset 17) is an RMSNorm of
//! the centred input, so it is recognised in two steps.
//!
//! The spellings: `x²` as `pow(x, 2)` or `x·x`; Hugging Face's fp32-upcast form (`x` cast to
//! f32, normalised, cast back before the scale); `1/sqrt` as `reciprocal(sqrt)`, `1 / sqrt`
//! (TorchScript) or a division of `x` by the `sqrt`; either operand order of each product. A rewrite fires only when the mean
//! runs over the trailing dims with `keep_dims`, `eps` is a constant scalar, and the scale
//! has the shape of the normalised dims (near-misses stay as they are).

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use memc_ir::Attr;

use super::merge;
use crate::egraph::{AttrLeaf, Memc, TypeAnalysis};

/// Builds `rms_norm` where a spelling of it matched.
struct RmsNorm {
    x: Var,
    w: Var,
    axes: Var,
    keep: Var,
    eps: Var,
    two: Option<Var>,
    one: Option<Var>,
    /// The fp32-upcast form: `?x` is `cast(x0)` and the normalised value is cast back to
    /// `x0`'s dtype (this var) before the scale.
    downcast: Option<Var>,
}

impl Applier<Memc, TypeAnalysis> for RmsNorm {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (mut x, w) = (subst[self.x], subst[self.w]);
        if let Some(to) = self.downcast {
            // x is the upcast of x0, and the result is cast back to x0's dtype.
            let Some(AttrLeaf {
                value: Attr::DType(back),
                ..
            }) = egraph[subst[to]].data.attr.clone()
            else {
                return vec![];
            };
            let x0 = egraph[x].nodes.iter().find_map(|n| match n {
                Memc::Op(name, kids) if name.as_str() == "cast" && kids.len() == 2 => Some(kids[1]),
                _ => None,
            });
            match x0 {
                Some(x0) if egraph[x0].data.ty.as_ref().map(|t| t.dtype) == Some(back) => x = x0,
                _ => return vec![],
            }
        }
        let (Some(xt), Some(wt), Some(yt)) = (
            egraph[x].data.ty.clone(),
            egraph[w].data.ty.clone(),
            egraph[eclass].data.ty.clone(),
        ) else {
            return vec![];
        };
        if let Some(two) = self.two {
            if egraph[subst[two]].data.scalar != Some(2.0) {
                return vec![];
            }
        }
        if let Some(one) = self.one {
            if egraph[subst[one]].data.scalar != Some(1.0) {
                return vec![];
            }
        }
        let Some(eps) = egraph[subst[self.eps]].data.scalar else {
            return vec![];
        };
        let keep = matches!(
            egraph[subst[self.keep]].data.attr,
            Some(AttrLeaf {
                value: Attr::Bool(true),
                ..
            })
        );
        let Some(AttrLeaf {
            value: Attr::Ints(axes),
            ..
        }) = egraph[subst[self.axes]].data.attr.clone()
        else {
            return vec![];
        };
        let rank = xt.shape.len();
        let Some(&first) = axes.first() else {
            return vec![];
        };
        let trailing = axes.iter().copied().eq(first..rank as i64);
        if !keep
            || !trailing
            || !xt.dtype.is_float()
            || wt.dtype != xt.dtype
            || wt.shape[..] != xt.shape[first as usize..]
            || yt != xt
        {
            return vec![];
        }
        let axis = egraph.add(Memc::Attr(AttrLeaf {
            name: "axis".into(),
            value: Attr::Int(first),
        }));
        let epsilon = egraph.add(Memc::Attr(AttrLeaf {
            name: "epsilon".into(),
            value: Attr::Float(eps as f32),
        }));
        let id = egraph.add(Memc::Op(
            Symbol::from("rms_norm"),
            vec![axis, epsilon, x, w],
        ));
        merge(egraph, eclass, id)
    }
}

/// Builds `layer_norm(x, w[, b])` from a recognised centred `rms_norm` (and a bias add).
struct LayerNorm {
    x: Var,
    w: Var,
    b: Option<Var>,
    axis: Var,
    eps: Var,
    axes: Option<Var>,
    keep: Option<Var>,
}

impl Applier<Memc, TypeAnalysis> for LayerNorm {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, w) = (subst[self.x], subst[self.w]);
        let (Some(xt), Some(wt), Some(yt)) = (
            egraph[x].data.ty.clone(),
            egraph[w].data.ty.clone(),
            egraph[eclass].data.ty.clone(),
        ) else {
            return vec![];
        };
        let Some(AttrLeaf {
            value: Attr::Int(axis),
            ..
        }) = egraph[subst[self.axis]].data.attr.clone()
        else {
            return vec![];
        };
        if let (Some(axes), Some(keep)) = (self.axes, self.keep) {
            let keep = matches!(
                egraph[subst[keep]].data.attr,
                Some(AttrLeaf {
                    value: Attr::Bool(true),
                    ..
                })
            );
            let axes_ok = matches!(
                &egraph[subst[axes]].data.attr,
                Some(AttrLeaf { value: Attr::Ints(a), .. }) if a.iter().copied().eq(axis..xt.shape.len() as i64)
            );
            if !keep || !axes_ok {
                return vec![];
            }
        }
        if yt != xt || wt.shape[..] != xt.shape[axis as usize..] {
            return vec![];
        }
        let mut children = vec![subst[self.axis], subst[self.eps], x, w];
        if let Some(b) = self.b {
            let b = subst[b];
            if egraph[b].data.ty.as_ref() != Some(&wt) {
                return vec![];
            }
            children.push(b);
        }
        let id = egraph.add(Memc::Op(Symbol::from("layer_norm"), children));
        merge(egraph, eclass, id)
    }
}

/// Every spelling of RMSNorm and LayerNorm (see the module docs), as rules.
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let squares = [
        ("pow", "(pow ?x ?two)", true),
        ("mul", "(mul ?x ?x)", false),
    ];
    let mut out = vec![];
    for (sq_name, sq, has_two) in squares {
        let mean = format!("(reduce_mean ?axes ?keep {sq})");
        let sd = format!("(sqrt (add {mean} ?eps))");
        let normed = [
            ("recip", format!("(mul ?x (reciprocal {sd}))"), false),
            (
                "recip-swapped",
                format!("(mul (reciprocal {sd}) ?x)"),
                false,
            ),
            ("one-div", format!("(mul ?x (div ?one {sd}))"), true),
            ("one-div-swapped", format!("(mul (div ?one {sd}) ?x)"), true),
            ("div", format!("(div ?x {sd})"), false),
        ];
        for (n_name, n, has_one) in &normed {
            for (w_name, pattern, downcast) in [
                ("w-first", format!("(mul ?w {n})"), false),
                ("w-last", format!("(mul {n} ?w)"), false),
                ("upcast/w-first", format!("(mul ?w (cast ?to {n}))"), true),
                ("upcast/w-last", format!("(mul (cast ?to {n}) ?w)"), true),
            ] {
                let name = format!("rms-norm/{sq_name}/{n_name}/{w_name}");
                let searcher: Pattern<Memc> = pattern.parse().expect("a valid pattern");
                let applier = RmsNorm {
                    x: "?x".parse().unwrap(),
                    w: "?w".parse().unwrap(),
                    axes: "?axes".parse().unwrap(),
                    keep: "?keep".parse().unwrap(),
                    eps: "?eps".parse().unwrap(),
                    two: has_two.then(|| "?two".parse().unwrap()),
                    one: has_one.then(|| "?one".parse().unwrap()),
                    downcast: downcast.then(|| "?to".parse().unwrap()),
                };
                out.push(Rewrite::new(name, searcher, applier).expect("a valid rule"));
            }
        }
    }
    let var = |v: &str| -> Var { v.parse().unwrap() };
    let layer = |name: &str, pattern: &str, bias: bool, centred: bool| {
        Rewrite::new(
            name,
            pattern.parse::<Pattern<Memc>>().expect("a valid pattern"),
            LayerNorm {
                x: var("?x"),
                w: var("?w"),
                b: bias.then(|| var("?b")),
                axis: var("?axis"),
                eps: var("?eps"),
                axes: centred.then(|| var("?axes")),
                keep: centred.then(|| var("?keep")),
            },
        )
        .expect("a valid rule")
    };
    out.push(layer(
        "layer-norm",
        "(rms_norm ?axis ?eps (sub ?x (reduce_mean ?axes ?keep ?x)) ?w)",
        false,
        true,
    ));
    out.push(layer(
        "layer-norm-bias",
        "(add (layer_norm ?axis ?eps ?x ?w) ?b)",
        true,
        false,
    ));
    out.push(layer(
        "layer-norm-bias-swapped",
        "(add ?b (layer_norm ?axis ?eps ?x ?w))",
        true,
        false,
    ));
    out
}
