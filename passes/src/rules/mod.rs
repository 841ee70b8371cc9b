//! Rewrite rule families of the canonicalisation, one file each, and the helpers their
//! appliers share.

pub mod algebra;
pub mod attention;
pub mod layout;
pub mod norms;

use egg::{EGraph, Id, Symbol};
use memc_ir::{Attr, TensorType};

use crate::egraph::{AttrLeaf, Memc, TypeAnalysis};

/// Every rule of every family.
pub fn all() -> Vec<egg::Rewrite<Memc, TypeAnalysis>> {
    let mut rules = norms::rules();
    rules.extend(attention::rules());
    rules.extend(layout::rules());
    rules.extend(algebra::rules());
    rules
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
