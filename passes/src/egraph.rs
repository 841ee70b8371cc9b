//! The e-graph view of a graph: an egg language mirroring the IR, graph ↔ e-graph conversion,
//! a type analysis, and DAG-aware extraction.
//!
//! Every IR op is an [`Memc::Op`] e-node named like the op in textual IR (`add`,
//! `reduce_mean`, `softmax`), whose children are its attributes (as [`AttrLeaf`] leaves, in
//! [`Op::attrs`] order) followed by its operands. Values that enter the graph from outside
//! (inputs, params, constants) are [`Memc::Value`] leaves named `%N`. Rules are written in
//! that syntax: `(mul ?x (sigmoid ?x))`, `(softmax axis=3 ?s)`.
//!
//! [`TypeAnalysis`] gives every e-class its tensor type (from [`Op::infer`]), so rules can
//! check shapes and rewrites that would change a type are caught when classes merge.
//! [`extract`] picks one node per needed class minimising the total cost of the chosen
//! DAG, counting a shared class once (egg's `Extractor` counts trees).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

use egg::{Analysis, DidMerge, EGraph, Id, Language, RecExpr, Symbol};
use memc_ir::{Attr, DType, Graph, Op, TensorType, ValueDef, ValueId};

/// An attribute as an e-graph leaf: `name=value` (`axis=3`, `axes=[2]`, `epsilon=1e-6`,
/// `to=f32`, `keep_dims=true`).
#[derive(Debug, Clone, PartialEq)]
pub struct AttrLeaf {
    /// The attribute's name.
    pub name: String,
    /// Its value.
    pub value: Attr,
}

impl AttrLeaf {
    fn text(&self) -> String {
        let v = match &self.value {
            Attr::Int(i) => i.to_string(),
            Attr::Float(f) => format!("{f:?}"),
            Attr::Bool(b) => b.to_string(),
            Attr::Ints(v) => format!(
                "[{}]",
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Attr::DType(d) => d.name().to_string(),
        };
        format!("{}={v}", self.name)
    }
}

impl fmt::Display for AttrLeaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

impl FromStr for AttrLeaf {
    type Err = String;

    fn from_str(s: &str) -> Result<AttrLeaf, String> {
        let (name, v) = s.split_once('=').ok_or("not name=value")?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err("not an attribute name".into());
        }
        let value = if let Some(list) = v.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let items: Result<Vec<i64>, _> = list
                .split(',')
                .filter(|x| !x.is_empty())
                .map(|x| x.parse::<i64>())
                .collect();
            Attr::Ints(items.map_err(|e| e.to_string())?)
        } else if let Ok(i) = v.parse::<i64>() {
            Attr::Int(i)
        } else if v == "true" || v == "false" {
            Attr::Bool(v == "true")
        } else if let Some(d) = DType::from_name(v) {
            Attr::DType(d)
        } else {
            Attr::Float(v.parse::<f32>().map_err(|e| e.to_string())?)
        };
        Ok(AttrLeaf {
            name: name.to_string(),
            value,
        })
    }
}

impl Eq for AttrLeaf {}

impl std::hash::Hash for AttrLeaf {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.text().hash(h)
    }
}

impl PartialOrd for AttrLeaf {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for AttrLeaf {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.text().cmp(&other.text())
    }
}

/// A value from outside the e-graph: `%N`, the graph's value id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueRef(pub u32);

impl fmt::Display for ValueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0)
    }
}

impl FromStr for ValueRef {
    type Err = String;

    fn from_str(s: &str) -> Result<ValueRef, String> {
        s.strip_prefix('%')
            .and_then(|n| n.parse().ok())
            .map(ValueRef)
            .ok_or_else(|| "not %N".into())
    }
}

mod lang {
    // The macro cannot carry docs on variants; they are described on the enum.
    #![allow(missing_docs)]
    use super::{AttrLeaf, ValueRef};
    use egg::{define_language, Id, Symbol};

    define_language! {
        /// memc's IR as an e-graph language (see the module docs): `Value` is an input, param
        /// or constant of the graph (`%N`), `Attr` an attribute (`axis=3`), `Op` an op with
        /// its attributes first, then its operands.
        pub enum Memc {
            Value(ValueRef),
            Attr(AttrLeaf),
            Op(Symbol, Vec<Id>),
        }
    }
}
pub use lang::Memc;

/// The IR op an [`Memc::Op`] node stands for, with its operand children.
pub fn op_of(node: &Memc, attr_of: impl Fn(Id) -> Option<AttrLeaf>) -> Option<(Op, Vec<Id>)> {
    let Memc::Op(name, children) = node else {
        return None;
    };
    let mut attrs = BTreeMap::new();
    let mut operands = vec![];
    for &c in children {
        match attr_of(c) {
            Some(a) if operands.is_empty() => {
                attrs.insert(a.name, a.value);
            }
            _ => operands.push(c),
        }
    }
    let op = Op::from_parts(name.as_str(), &attrs).ok()?;
    Some((op, operands))
}

/// Per e-class facts: its type, the attribute when the class is an attribute leaf, and the
/// value when the class is a one-element constant (rules read epsilons and exponents).
#[derive(Debug, Clone, PartialEq)]
pub struct ClassData {
    /// The tensor type of the class's value (`None` for attribute leaves).
    pub ty: Option<TensorType>,
    /// The attribute, for attribute classes.
    pub attr: Option<AttrLeaf>,
    /// The value of a one-element constant.
    pub scalar: Option<f64>,
    /// The value of a constant whose elements are all equal (bools as 0 and 1), of any size.
    pub splat: Option<f64>,
}

/// Types every e-class from the graph's values and [`Op::infer`].
#[derive(Debug, Clone, Default)]
pub struct TypeAnalysis {
    /// Types of the graph's outside values.
    pub values: HashMap<u32, TensorType>,
    /// Values of its one-element constants.
    pub scalars: HashMap<u32, f64>,
    /// Values of its constants whose elements are all equal.
    pub splats: HashMap<u32, f64>,
}

impl Analysis<Memc> for TypeAnalysis {
    type Data = ClassData;

    fn make(egraph: &mut EGraph<Memc, Self>, enode: &Memc) -> ClassData {
        match enode {
            Memc::Value(v) => ClassData {
                ty: egraph.analysis.values.get(&v.0).cloned(),
                attr: None,
                scalar: egraph.analysis.scalars.get(&v.0).copied(),
                splat: egraph.analysis.splats.get(&v.0).copied(),
            },
            Memc::Attr(a) => ClassData {
                ty: None,
                attr: Some(a.clone()),
                scalar: None,
                splat: None,
            },
            Memc::Op(..) => {
                let ty = op_of(enode, |c| egraph[c].data.attr.clone()).and_then(|(op, ins)| {
                    let tys: Option<Vec<TensorType>> =
                        ins.iter().map(|&c| egraph[c].data.ty.clone()).collect();
                    op.infer(&tys?).ok()?.into_iter().next()
                });
                ClassData {
                    ty,
                    attr: None,
                    scalar: None,
                    splat: None,
                }
            }
        }
    }

    fn merge(&mut self, a: &mut ClassData, b: ClassData) -> DidMerge {
        debug_assert!(
            a.ty.is_none() || b.ty.is_none() || a.ty == b.ty,
            "a rewrite merged values of types {:?} and {:?}",
            a.ty,
            b.ty
        );
        let mut changed = false;
        if a.ty.is_none() && b.ty.is_some() {
            a.ty = b.ty;
            changed = true;
        }
        if a.splat.is_none() && b.splat.is_some() {
            a.splat = b.splat;
            changed = true;
        }
        if a.scalar.is_none() && b.scalar.is_some() {
            a.scalar = b.scalar;
            changed = true;
        }
        DidMerge(changed, true)
    }
}

/// The e-graph memc rewrites.
pub type MemcGraph = EGraph<Memc, TypeAnalysis>;

/// A graph loaded into an e-graph: the classes of its outputs, in order.
pub struct Loaded {
    /// The e-graph.
    pub egraph: MemcGraph,
    /// Output name and class, in the graph's order.
    pub roots: Vec<(String, Id)>,
}

/// Adds the ops of `g` (a forward graph: no updates) to a fresh e-graph; shared values stay
/// shared (one class per value).
pub fn load(g: &Graph) -> Loaded {
    let mut analysis = TypeAnalysis::default();
    for (i, v) in g.values().iter().enumerate() {
        if !matches!(v.def, ValueDef::Node { .. }) {
            analysis.values.insert(i as u32, v.ty.clone());
        }
        let data = match &v.def {
            ValueDef::Const(t) => Some(t),
            ValueDef::Param {
                role: memc_ir::ParamRole::Constant,
                data: Some(t),
                ..
            } => Some(t),
            _ => None,
        };
        // Splats of up to 65,536 elements (masks' all-true parts); bigger constants are
        // weights, not read here. A one-element float splat is also a scalar.
        if let Some(t) = data.filter(|t| t.numel() <= 1 << 16) {
            let v = t.to_f64_vec();
            if !v.is_empty() && v.iter().all(|&x| x == v[0]) {
                analysis.splats.insert(i as u32, v[0]);
                if v.len() == 1 && t.dtype().is_float() {
                    analysis.scalars.insert(i as u32, v[0]);
                }
            }
        }
    }
    let mut egraph = MemcGraph::new(analysis);
    let mut class: HashMap<ValueId, Id> = HashMap::new();
    fn id_of(class: &mut HashMap<ValueId, Id>, egraph: &mut MemcGraph, v: ValueId) -> Id {
        *class
            .entry(v)
            .or_insert_with(|| egraph.add(Memc::Value(ValueRef(v.0))))
    }
    for node in g.nodes() {
        let mut children: Vec<Id> = node
            .op
            .attrs()
            .into_iter()
            .map(|(name, value)| {
                egraph.add(Memc::Attr(AttrLeaf {
                    name: name.to_string(),
                    value,
                }))
            })
            .collect();
        for &v in &node.inputs {
            children.push(id_of(&mut class, &mut egraph, v));
        }
        let id = egraph.add(Memc::Op(Symbol::from(node.op.name()), children));
        class.insert(node.outputs[0], id);
    }
    let roots = g
        .outputs()
        .iter()
        .map(|(name, v)| (name.clone(), id_of(&mut class, &mut egraph, *v)))
        .collect();
    egraph.rebuild();
    Loaded { egraph, roots }
}

/// The cost of one e-node: what the extraction minimises (summed once per chosen class).
pub fn node_cost(node: &Memc) -> f64 {
    match node {
        Memc::Value(_) | Memc::Attr(_) => 0.0,
        Memc::Op(name, _) => match name.as_str() {
            // Recognised blocks are worth more than the ops they replace.
            "rms_norm" | "layer_norm" | "silu" | "gelu" | "attention" => 1.0,
            // The same `add`, named: preferred to the bare op.
            "residual" => 0.9,
            // Layout ops cost memory traffic but no arithmetic.
            "reshape" | "expand" => 0.5,
            _ => 1.0,
        },
    }
}

/// Extracts the cheapest DAG for `roots`: each class's best node is chosen by the size of
/// the set of classes it needs (shared classes counted once), iterated to a fixed point.
pub fn extract(egraph: &MemcGraph, roots: &[Id]) -> Result<HashMap<Id, Memc>, String> {
    // Classes with their children first (a depth-first post-order; cycles, which rewrites
    // may create, are cut where the search meets them), so a few sweeps reach the fixed point.
    let mut order: Vec<Id> = Vec::with_capacity(egraph.number_of_classes());
    let mut seen: HashSet<Id> = HashSet::new();
    for class in egraph.classes() {
        if !seen.insert(class.id) {
            continue;
        }
        let mut stack: Vec<(Id, Vec<Id>)> = vec![(class.id, kids_of(egraph, class.id))];
        while let Some((c, kids)) = stack.last_mut() {
            match kids.pop() {
                Some(k) => {
                    if seen.insert(k) {
                        let next = kids_of(egraph, k);
                        stack.push((k, next));
                    }
                }
                None => {
                    order.push(*c);
                    stack.pop();
                }
            }
        }
    }
    // Reachable classes as sets: a node's cost counts each class of its sub-DAG once.
    let mut best: HashMap<Id, (f64, HashSet<Id>, Memc)> = HashMap::new();
    let mut changed = true;
    let mut rounds = 0;
    while changed && rounds < 32 {
        changed = false;
        rounds += 1;
        for &id in &order {
            let class = &egraph[id];
            for node in &class.nodes {
                let kids: Vec<Id> = node.children().iter().map(|&c| egraph.find(c)).collect();
                if !kids.iter().all(|k| best.contains_key(k)) {
                    continue;
                }
                let mut set: HashSet<Id> = HashSet::new();
                for k in &kids {
                    set.insert(*k);
                    set.extend(best[k].1.iter().copied());
                }
                if set.contains(&class.id) {
                    continue; // a cycle through this class
                }
                let cost: f64 =
                    node_cost(node) + set.iter().map(|c| node_cost(&best[c].2)).sum::<f64>();
                let better = match best.get(&class.id) {
                    None => true,
                    Some((old, _, _)) => cost + 1e-9 < *old,
                };
                if better {
                    best.insert(class.id, (cost, set, node.clone()));
                    changed = true;
                }
            }
        }
    }
    let mut out = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|&r| egraph.find(r)).collect();
    while let Some(c) = stack.pop() {
        if out.contains_key(&c) {
            continue;
        }
        // The loaded graph's own nodes are acyclic, so every needed class has a choice; a
        // miss would be a rule that broke that (a memc bug), reported rather than panicking.
        let node = best.get(&c).map(|b| b.2.clone()).ok_or_else(|| {
            format!("e-class {c} has no acyclic choice after {rounds} sweeps (a memc bug)")
        })?;
        stack.extend(node.children().iter().map(|&k| egraph.find(k)));
        out.insert(c, node);
    }
    Ok(out)
}

fn kids_of(egraph: &MemcGraph, c: Id) -> Vec<Id> {
    let mut kids: Vec<Id> = egraph[c]
        .nodes
        .iter()
        .flat_map(|n| n.children().iter().map(|&k| egraph.find(k)))
        .collect();
    kids.sort();
    kids.dedup();
    kids
}

/// Rebuilds a graph from `chosen` (from [`extract`]): `g`'s inputs, params and constants are
/// kept, the chosen ops are emitted in dependency order, and the outputs are `roots`.
pub fn store(
    g: &Graph,
    egraph: &MemcGraph,
    chosen: &HashMap<Id, Memc>,
    roots: &[(String, Id)],
) -> Result<Graph, String> {
    let mut out = g.clone();
    out.clear_outputs();
    let mut value: HashMap<Id, ValueId> = HashMap::new();
    // Iterative post-order over the chosen DAG.
    for (_, root) in roots {
        let root = egraph.find(*root);
        let mut stack = vec![(root, false)];
        while let Some((c, expanded)) = stack.pop() {
            if value.contains_key(&c) {
                continue;
            }
            let node = &chosen[&c];
            match node {
                Memc::Value(v) => {
                    value.insert(c, ValueId(v.0));
                }
                Memc::Attr(_) => {}
                Memc::Op(..) if !expanded => {
                    stack.push((c, true));
                    for &k in node.children() {
                        let k = egraph.find(k);
                        if !value.contains_key(&k) {
                            stack.push((k, false));
                        }
                    }
                }
                Memc::Op(..) => {
                    let (op, operands) = op_of(node, |k| egraph[k].data.attr.clone())
                        .ok_or_else(|| format!("e-node {node} is not an IR op"))?;
                    let ins: Vec<ValueId> =
                        operands.iter().map(|&k| value[&egraph.find(k)]).collect();
                    let v = out
                        .add_node(op, &ins, "")
                        .map_err(|e| format!("extracted {node}: {e}"))?[0];
                    value.insert(c, v);
                }
            }
        }
    }
    for (name, root) in roots {
        out.add_output(name.clone(), value[&egraph.find(*root)]);
    }
    out.compact();
    Ok(out)
}

/// `expr`'s text, for tests and messages.
pub fn show(expr: &RecExpr<Memc>) -> String {
    expr.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use memc_ir::{BinaryOp, UnaryOp};

    #[test]
    fn attr_leaves_round_trip() {
        for s in [
            "axis=3",
            "axes=[1,2]",
            "epsilon=1e-6",
            "to=bf16",
            "keep_dims=true",
            "shape=[]",
        ] {
            let a: AttrLeaf = s.parse().unwrap();
            assert_eq!(a.to_string().parse::<AttrLeaf>().unwrap(), a, "{s}");
        }
        assert!("%3".parse::<AttrLeaf>().is_err());
    }

    #[test]
    fn load_and_store_keep_sharing_and_results() {
        let mut g = Graph::new();
        let x = g.add_input("x", TensorType::new(DType::F32, vec![2, 8]));
        let s = g.add_node(Op::Unary(UnaryOp::Sigmoid), &[x], "").unwrap()[0];
        let m = g.add_node(Op::Binary(BinaryOp::Mul), &[x, s], "").unwrap()[0];
        let r = g
            .add_node(
                Op::Reduce {
                    kind: memc_ir::ReduceKind::Sum,
                    axes: vec![1],
                    keep_dims: true,
                },
                &[m],
                "",
            )
            .unwrap()[0];
        g.add_output("m", m);
        g.add_output("r", r);
        let loaded = load(&g);
        let roots: Vec<Id> = loaded.roots.iter().map(|r| r.1).collect();
        let chosen = extract(&loaded.egraph, &roots).unwrap();
        let back = store(&g, &loaded.egraph, &chosen, &loaded.roots).unwrap();
        memc_ir::verify(&back).unwrap();
        let mut want = g.clone();
        want.compact();
        assert_eq!(memc_ir::print(&back), memc_ir::print(&want));
    }
}
