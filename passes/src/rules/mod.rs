//! Rewrite rule families of the canonicalisation, one file each, and the helpers their
//! appliers share.

pub mod activations;
pub mod algebra;
pub mod attention;
pub mod ffn;
pub mod layout;
pub mod norms;
pub mod residual;
pub mod rope;

use egg::{EGraph, Id, Symbol};
use memc_ir::{Attr, TensorType};

use crate::egraph::{AttrLeaf, Memc, TypeAnalysis};

/// Every rule of every family.
pub fn all() -> Vec<egg::Rewrite<Memc, TypeAnalysis>> {
    let mut rules = norms::rules();
    rules.extend(activations::rules());
    rules.extend(ffn::rules());
    rules.extend(rope::rules());
    rules.extend(residual::rules());
    rules.extend(attention::rules());
    rules.extend(layout::rules());
    rules.extend(algebra::rules());
    rules
}

/// The op e-nodes of `class`: each op's name and children (attributes first).
pub(crate) fn ops(
    egraph: &EGraph<Memc, TypeAnalysis>,
    class: Id,
) -> impl Iterator<Item = (&str, &[Id])> {
    egraph[class].nodes.iter().filter_map(|n| match n {
        Memc::Op(name, kids) => Some((name.as_str(), kids.as_slice())),
        _ => None,
    })
}

/// The tensor type of class `id`.
pub(crate) fn ty(egraph: &EGraph<Memc, TypeAnalysis>, id: Id) -> Option<TensorType> {
    egraph[id].data.ty.clone()
}

/// The value of class `id` when it is a one-element constant.
pub(crate) fn scalar(egraph: &EGraph<Memc, TypeAnalysis>, id: Id) -> Option<f64> {
    egraph[id].data.scalar
}

/// The integer list of attribute class `id`.
pub(crate) fn ints(egraph: &EGraph<Memc, TypeAnalysis>, id: Id) -> Option<Vec<i64>> {
    match &egraph[id].data.attr {
        Some(AttrLeaf {
            value: Attr::Ints(v),
            ..
        }) => Some(v.clone()),
        _ => None,
    }
}

/// Adds the attribute leaf `name=value`.
pub(crate) fn add_attr(egraph: &mut EGraph<Memc, TypeAnalysis>, name: &str, value: Attr) -> Id {
    egraph.add(Memc::Attr(AttrLeaf {
        name: name.to_string(),
        value,
    }))
}

/// Adds the op `name` with `children` (attributes first).
pub(crate) fn add_op(egraph: &mut EGraph<Memc, TypeAnalysis>, name: &str, children: Vec<Id>) -> Id {
    egraph.add(Memc::Op(Symbol::from(name), children))
}

/// Merges `id` (a rewrite's result) into `eclass` when both have the same type: a rewrite
/// whose result the type analysis cannot type, or types differently, does not apply.
pub(crate) fn merge(egraph: &mut EGraph<Memc, TypeAnalysis>, eclass: Id, id: Id) -> Vec<Id> {
    let (a, b) = (ty(egraph, eclass), ty(egraph, id));
    if a.is_none() || a != b {
        return vec![];
    }
    if egraph.union(eclass, id) {
        vec![id]
    } else {
        vec![]
    }
}

/// Every operand order of a pattern's commutative ops: an op written `mul*` or `add*` stands
/// for both `(mul a b)` and `(mul b a)`. `"(mul* ?x (sigmoid ?x))"` gives `"(mul ?x (sigmoid
/// ?x))"` and `"(mul (sigmoid ?x) ?x)"`. Exporters pick either order, so rules list one.
pub(crate) fn commutations(pattern: &str) -> Vec<String> {
    #[derive(Clone)]
    enum Sexp {
        Atom(String),
        List(Vec<Sexp>),
    }
    fn parse(tokens: &mut std::iter::Peekable<std::vec::IntoIter<String>>) -> Sexp {
        match tokens.next().expect("a balanced pattern").as_str() {
            "(" => {
                let mut items = vec![];
                while tokens.peek().map(String::as_str) != Some(")") {
                    items.push(parse(tokens));
                }
                tokens.next();
                Sexp::List(items)
            }
            atom => Sexp::Atom(atom.to_string()),
        }
    }
    fn expand(e: &Sexp) -> Vec<String> {
        match e {
            Sexp::Atom(a) => vec![a.clone()],
            Sexp::List(items) => {
                let Some(Sexp::Atom(head)) = items.first() else {
                    panic!("a pattern list starts with an op name");
                };
                let (head, commutative) = match head.strip_suffix('*') {
                    Some(h) => (h.to_string(), true),
                    None => (head.clone(), false),
                };
                // Every combination of the operands' variants.
                let mut combos: Vec<Vec<String>> = vec![vec![]];
                for item in &items[1..] {
                    let variants = expand(item);
                    combos = combos
                        .iter()
                        .flat_map(|c| {
                            variants.iter().map(move |v| {
                                let mut c = c.clone();
                                c.push(v.clone());
                                c
                            })
                        })
                        .collect();
                }
                let mut out = vec![];
                for c in combos {
                    out.push(format!("({head} {})", c.join(" ")));
                    if commutative && c.len() == 2 {
                        out.push(format!("({head} {} {})", c[1], c[0]));
                    }
                }
                out
            }
        }
    }
    let spaced = pattern.replace('(', " ( ").replace(')', " ) ");
    let tokens: Vec<String> = spaced.split_whitespace().map(str::to_string).collect();
    let mut out = expand(&parse(&mut tokens.into_iter().peekable()));
    out.sort();
    out.dedup();
    out
}

/// Whether `a` is `b` up to f32 rounding (exporters store constants in the model's dtype).
pub(crate) fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() <= 1e-6 * b.abs().max(1e-30))
}

#[cfg(test)]
mod tests {
    #[test]
    fn commutations_list_every_operand_order() {
        assert_eq!(
            super::commutations("(mul* ?x (sigmoid ?x))"),
            vec!["(mul (sigmoid ?x) ?x)", "(mul ?x (sigmoid ?x))"]
        );
        assert_eq!(super::commutations("(add* (mul* ?a ?b) ?c)").len(), 4);
        assert_eq!(super::commutations("(add* ?a ?a)"), vec!["(add ?a ?a)"]);
    }
}
