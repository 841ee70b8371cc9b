//! Rotary embedding recognition: Hugging Face's `apply_rotary_pos_emb` with `rotate_half`
//! becomes one `rope` op per rotated tensor (queries and keys).
//!
//! ```text
//! rope:  x·cos + concat(−x[.., D/2:], x[.., :D/2])·sin  ==  rope(x, cos, sin)
//! ```
//!
//! The two slices must be exactly the halves of x's last dim (unit steps, the whole of every
//! other dim), the concat must join them on the last dim with the negated upper half first,
//! and cos and sin must broadcast to x's shape. The interleaved (GPT-J) form is another
//! function and is left alone.

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};

use super::{add_op, commutations, ints, merge, ty};
use crate::egraph::{AttrLeaf, Memc, TypeAnalysis};
use memc_ir::Attr;

struct Rope {
    x: Var,
    cos: Var,
    sin: Var,
    axis: Var,
    /// (starts, ends, steps) of the lower and the upper half.
    lower: [Var; 3],
    upper: [Var; 3],
}

impl Applier<Memc, TypeAnalysis> for Rope {
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
        let shape: Vec<i64> = xt.shape.iter().map(|&d| d as i64).collect();
        let Some(&d) = shape.last() else {
            return vec![];
        };
        let last = shape.len() - 1;
        let half = |from: i64, to: i64| {
            let mut starts = vec![0; shape.len()];
            let mut ends = shape.clone();
            starts[last] = from;
            ends[last] = to;
            [starts, ends, vec![1; shape.len()]]
        };
        let matches = |vars: &[Var; 3], want: [Vec<i64>; 3]| {
            vars.iter()
                .zip(want)
                .all(|(v, w)| ints(egraph, subst[*v]) == Some(w))
        };
        let axis_ok = matches!(
            egraph[subst[self.axis]].data.attr,
            Some(AttrLeaf { value: Attr::Int(a), .. }) if a == last as i64
        );
        if d % 2 != 0
            || !axis_ok
            || !matches(&self.lower, half(0, d / 2))
            || !matches(&self.upper, half(d / 2, d))
        {
            return vec![];
        }
        // `merge` checks that cos and sin broadcast to x (the op's type is x's).
        let id = add_op(egraph, "rope", vec![x, subst[self.cos], subst[self.sin]]);
        merge(egraph, eclass, id)
    }
}

/// The rotary embedding rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let pattern = "(add* (mul* ?x ?cos) (mul* (concat ?axis (neg (slice ?us ?ue ?up ?x)) \
                   (slice ?ls ?le ?lp ?x)) ?sin))";
    let var = |v: &str| -> Var { v.parse().unwrap() };
    commutations(pattern)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let applier = Rope {
                x: var("?x"),
                cos: var("?cos"),
                sin: var("?sin"),
                axis: var("?axis"),
                lower: [var("?ls"), var("?le"), var("?lp")],
                upper: [var("?us"), var("?ue"), var("?up")],
            };
            let searcher: Pattern<Memc> = p.parse().expect("a valid pattern");
            Rewrite::new(format!("rope/{i}"), searcher, applier).expect("a valid rule")
        })
        .collect()
}
