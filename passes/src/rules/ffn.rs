//! Feed-forward block recognition: the MLP of each layer becomes one `swiglu_ffn` or
//! `gelu_ffn` op (run after [`super::activations`] has named the activation).
//!
//! ```text
//! swiglu-ffn:     (silu(x·wg) ⊙ (x·wu))·wd            ==  swiglu_ffn(x, wg, wu, wd)
//! gelu-ffn:       gelu(x·w1 + b1)·w2 + b2              ==  gelu_ffn[tanh=false](x, w1, b1, w2, b2)
//! gelu-ffn-tanh:  gelu_tanh(x·w1 + b1)·w2 + b2         ==  gelu_ffn[tanh=true](x, w1, b1, w2, b2)
//! (and both without biases)
//! ```
//!
//! The weights must be matrices and the biases vectors of the projections' widths; the two
//! SwiGLU projections must read the same `x` (the e-graph's classes make that a match on the
//! same value). GPT-2's flattening reshapes around each GEMM fold away first
//! ([`super::layout`]).

use egg::{Applier, EGraph, Id, Pattern, PatternAst, Rewrite, Subst, Symbol, Var};
use memc_ir::Attr;

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
    let table: [Row; 5] = [
        (
            "swiglu-ffn",
            "(matmul (mul* (silu (matmul ?x ?wg)) (matmul ?x ?wu)) ?wd)",
            "swiglu_ffn",
            None,
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
    out
}
