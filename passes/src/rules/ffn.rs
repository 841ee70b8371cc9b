//! Feed-forward block recognition: the MLP of each layer becomes one `swiglu_ffn` or
//! `gelu_ffn` op (run after [`super::activations`] has named the activation).
//!
//! ```text
//! swiglu-ffn:     (silu(x·wg) ⊙ (x·wu))·wd            ==  swiglu_ffn(x, wg, wu, wd)
//! geglu-ffn:      (gelu(x·wg) ⊙ (x·wu))·wd            ==  gelu_ffn[tanh=false](x, wg, wu, wd)   (gated)
//! gelu-ffn:       gelu(x·w1 + b1)·w2 + b2              ==  gelu_ffn[tanh=false](x, w1, b1, w2, b2)
//! gelu-ffn-tanh:  gelu_tanh(x·w1 + b1)·w2 + b2         ==  gelu_ffn[tanh=true](x, w1, b1, w2, b2)
//! (and both without biases; geglu-ffn-tanh with gelu_tanh)
//! slice-matmul:   (x·W)[.., a:b]                       ==  x·W[:, a:b]           (W a matrix)
//! ```
//!
//! `slice-matmul` splits a fused projection (Phi-3's gate/up, `chunk(2)` of one GEMM) into
//! one GEMM per slice of the weight, so the gated rules match it as two projections; the
//! weight's slices are `slice` ops on the parameter, so its gradient is the slices' sum.
//!
//! The weights must be matrices and the biases vectors of the projections' widths; the two
//! SwiGLU projections must read the same `x` (the e-graph's classes make that a match on the
//! same value). GPT-2's flattening reshapes around each GEMM fold away first
//! ([`super::layout`]).

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use memc_ir::Attr;

use super::ints;

use super::{add_attr, add_op, commutations, merge, ty};
use crate::egraph::{Memc, TypeAnalysis};

/// Builds `op(x, weights..)` when the weights are matrices and the biases vectors.
struct Ffn {
    op: &'static str,
    tanh: Option<bool>,
    operands: Vec<(Var, usize)>,
}

impl Applier<Memc, TypeAnalysis> for Ffn {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let mut children = vec![];
        if let Some(t) = self.tanh {
            children.push(add_attr(egraph, "tanh", Attr::Bool(t)));
        }
        for &(v, rank) in &self.operands {
            let id = subst[v];
            match ty(egraph, id) {
                Some(t) if t.dtype.is_float() && (rank == 0 || t.shape.len() == rank) => {
                    children.push(id)
                }
                _ => return vec![],
            }
        }
        // `merge` checks the block's type (which `Op::infer` derives, checking every
        // operand's shape) against the matched value's.
        let id = add_op(egraph, self.op, children);
        merge(egraph, eclass, id)
    }
}

/// `(x·W)[.., a:b] == x·W[:, a:b]`: a slice of the last axis only, W a matrix.
struct SliceMatmul {
    x: Var,
    w: Var,
    starts: Var,
    ends: Var,
    steps: Var,
}

impl Applier<Memc, TypeAnalysis> for SliceMatmul {
    fn apply_one(
        &self,
        egraph: &mut EGraph<Memc, TypeAnalysis>,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<Memc>>,
        _rule: Symbol,
    ) -> Vec<Id> {
        let (Some(wt), Some(yt)) = (ty(egraph, subst[self.w]), ty(egraph, subst[self.x])) else {
            return vec![];
        };
        let (Some(starts), Some(ends), Some(steps)) = (
            ints(egraph, subst[self.starts]),
            ints(egraph, subst[self.ends]),
            ints(egraph, subst[self.steps]),
        ) else {
            return vec![];
        };
        let r = starts.len();
        if wt.shape.len() != 2 || r < 2 || yt.shape.len() != r {
            return vec![];
        }
        // Every axis but the last taken whole.
        let Some(full) = ty(egraph, eclass) else {
            return vec![];
        };
        let whole =
            (0..r - 1).all(|i| starts[i] == 0 && steps[i] == 1 && full.shape[i] as i64 == ends[i]);
        if !whole || steps[r - 1] != 1 {
            return vec![];
        }
        let cols = |v: i64| Attr::Ints(vec![0, v]);
        let ws = vec![
            add_attr(egraph, "starts", cols(starts[r - 1])),
            add_attr(
                egraph,
                "ends",
                Attr::Ints(vec![wt.shape[0] as i64, ends[r - 1]]),
            ),
            add_attr(egraph, "steps", Attr::Ints(vec![1, 1])),
            subst[self.w],
        ];
        let w = add_op(egraph, "slice", ws);
        let id = add_op(egraph, "matmul", vec![subst[self.x], w]);
        merge(egraph, eclass, id)
    }
}

/// One row of the rule table: name, pattern (`mul*`/`add*` for either order), op, `tanh`
/// attribute, and the operands with their rank (0: any).
type Row = (
    &'static str,
    &'static str,
    &'static str,
    Option<bool>,
    &'static [(&'static str, usize)],
);

/// The FFN rules (see the module docs).
pub fn rules() -> Vec<Rewrite<Memc, TypeAnalysis>> {
    let table: [Row; 7] = [
        (
            "swiglu-ffn",
            "(matmul (mul* (silu (matmul ?x ?wg)) (matmul ?x ?wu)) ?wd)",
            "swiglu_ffn",
            None,
            &[("?x", 0), ("?wg", 2), ("?wu", 2), ("?wd", 2)],
        ),
        (
            "geglu-ffn",
            "(matmul (mul* (gelu (matmul ?x ?wg)) (matmul ?x ?wu)) ?wd)",
            "gelu_ffn",
            Some(false),
            &[("?x", 0), ("?wg", 2), ("?wu", 2), ("?wd", 2)],
        ),
        (
            "geglu-ffn-tanh",
            "(matmul (mul* (gelu_tanh (matmul ?x ?wg)) (matmul ?x ?wu)) ?wd)",
            "gelu_ffn",
            Some(true),
            &[("?x", 0), ("?wg", 2), ("?wu", 2), ("?wd", 2)],
        ),
        (
            "gelu-ffn",
            "(add* (matmul (gelu (add* (matmul ?x ?w1) ?b1)) ?w2) ?b2)",
            "gelu_ffn",
            Some(false),
            &[("?x", 0), ("?w1", 2), ("?b1", 1), ("?w2", 2), ("?b2", 1)],
        ),
        (
            "gelu-ffn-tanh",
            "(add* (matmul (gelu_tanh (add* (matmul ?x ?w1) ?b1)) ?w2) ?b2)",
            "gelu_ffn",
            Some(true),
            &[("?x", 0), ("?w1", 2), ("?b1", 1), ("?w2", 2), ("?b2", 1)],
        ),
        (
            "gelu-ffn-no-bias",
            "(matmul (gelu (matmul ?x ?w1)) ?w2)",
            "gelu_ffn",
            Some(false),
            &[("?x", 0), ("?w1", 2), ("?w2", 2)],
        ),
        (
            "gelu-ffn-tanh-no-bias",
            "(matmul (gelu_tanh (matmul ?x ?w1)) ?w2)",
            "gelu_ffn",
            Some(true),
            &[("?x", 0), ("?w1", 2), ("?w2", 2)],
        ),
    ];
    let mut out = vec![];
    for (name, pattern, op, tanh, operands) in table {
        for (i, p) in commutations(pattern).into_iter().enumerate() {
            let applier = Ffn {
                op,
                tanh,
                operands: operands
                    .iter()
                    .map(|&(v, r)| (v.parse().unwrap(), r))
                    .collect(),
            };
            let searcher: Pattern<Memc> = p.parse().expect("a valid pattern");
            out.push(Rewrite::new(format!("{name}/{i}"), searcher, applier).expect("a valid rule"));
        }
    }
    let var = |v: &str| -> Var { v.parse().unwrap() };
    out.push(
        Rewrite::new(
            "slice-matmul",
            "(slice ?starts ?ends ?steps (matmul ?x ?w))"
                .parse::<Pattern<Memc>>()
                .expect("a valid pattern"),
            SliceMatmul {
                x: var("?x"),
                w: var("?w"),
                starts: var("?starts"),
                ends: var("?ends"),
                steps: var("?steps"),
            },
        )
        .expect("a valid rule"),
    );
    out
}
