//! Residual recognition: the add that joins a sub-block's output to the stream it read
//! becomes `residual(stream, branch)`, so the rewrites that restructure layers (reversible
//! couplings) find the residual stream without re-deriving it.
//!
//! ```text
//! residual:  x + f  ==  residual(x, f)   (f a sub-block's output projection, computed from x)
//! ```
//!
//! `f` qualifies when its class holds a `swiglu_ffn`/`gelu_ffn`/`attention`, or a projection
//! (a GEMM by a weight matrix), possibly behind bias adds and layout ops (at most
//! [`PROJECTION_DEPTH`]; a sandwich norm over it, Gemma 2), or the sum of two such (parallel attention and FFN, GPT-NeoX and
//! Phi), so a layer whose attention or FFN is not recognised still has its residuals; and
//! `x` is read by `f`'s computation (searched through at most [`READ_LIMIT`] classes). Both operands have one type (no broadcasting). Adds of
//! embeddings, biases or masks stay `add`.

use std::collections::HashSet;

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};

use super::{add_op, merge, ops, ty};
use crate::egraph::{Memc, TypeAnalysis};

/// How many GEMM, bias-add and layout ops may separate `attention` from the branch's output.
pub const PROJECTION_DEPTH: usize = 8;
/// How many classes the search for the stream inside the branch visits at most.
pub const READ_LIMIT: usize = 4096;

/// Whether `class` is a sub-block's output: an FFN, or attention behind a projection (GEMMs,
/// layout ops and bias adds, never another residual add).
fn is_branch(egraph: &EGraph<Memc, TypeAnalysis>, class: Id, depth: usize) -> bool {
    let rank = |c: Id| ty(egraph, c).map(|t| t.shape.len());
    ops(egraph, class).any(|(name, kids)| match (name, kids) {
        ("swiglu_ffn" | "gelu_ffn" | "attention", _) => true,
        // A projection: a GEMM by a weight matrix (attention's output projection, an FFN's
        // down projection, recognised or not).
        ("matmul", &[_, w]) if rank(w) == Some(2) => true,
        _ if depth == 0 => false,
        ("add", &[a, b]) => {
            (rank(b) == Some(1) && is_branch(egraph, a, depth - 1))
                || (rank(a) == Some(1) && is_branch(egraph, b, depth - 1))
                // Parallel sub-blocks (GPT-NeoX, Phi): attention + FFN, both from the stream.
                || (is_branch(egraph, a, depth - 1) && is_branch(egraph, b, depth - 1))
        }
        ("matmul", &[a, _]) => is_branch(egraph, a, depth - 1),
        // Sandwich norms (Gemma 2): the sub-block's output is normalised before the add.
        ("rms_norm" | "layer_norm", kids) => kids
            .iter()
            .find(|&&c| ty(egraph, c).is_some())
            .is_some_and(|&x| is_branch(egraph, x, depth - 1)),
        ("reshape" | "transpose", &[_, x]) => is_branch(egraph, x, depth - 1),
        _ => false,
    })
}

/// Whether `x` is among the classes `from` is computed from.
fn reads(egraph: &EGraph<Memc, TypeAnalysis>, from: Id, x: Id) -> bool {
    let (x, mut stack, mut seen) = (egraph.find(x), vec![from], HashSet::new());
    while let Some(c) = stack.pop() {
        let c = egraph.find(c);
        if c == x {
            return true;
        }
        if seen.len() >= READ_LIMIT || !seen.insert(c) {
            continue;
        }
        for (_, kids) in ops(egraph, c) {
            stack.extend(kids);
        }
    }
    false
}

struct Residual {
    x: Var,
    f: Var,
}

impl Applier<Memc, TypeAnalysis> for Residual {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (x, f) = (subst[self.x], subst[self.f]);
        let (Some(xt), Some(ft)) = (ty(egraph, x), ty(egraph, f)) else {
            return vec![];
        };
        if xt != ft
            || !xt.dtype.is_float()
            || egraph.find(x) == egraph.find(f)
            || !is_branch(egraph, f, PROJECTION_DEPTH)
            || !reads(egraph, f, x)
        {
            return vec![];
        }
        let id = add_op(egraph, "residual", vec![x, f]);
        merge(egraph, eclass, id)
    }
}

/// The residual rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let var = |v: &str| -> Var { v.parse().unwrap() };
    [
        ("residual", "(add ?x ?f)"),
        ("residual-swapped", "(add ?f ?x)"),
    ]
    .into_iter()
    .map(|(name, p)| {
        let searcher: Pattern<Memc> = p.parse().expect("a valid pattern");
        let applier = Residual {
            x: var("?x"),
            f: var("?f"),
        };
        Rewrite::new(name, searcher, applier).expect("a valid rule")
    })
    .collect()
}
