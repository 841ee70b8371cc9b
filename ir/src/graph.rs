//! The graph: SSA values with static types, and nodes in program order.

use std::collections::BTreeMap;

use crate::{Op, Tensor, TensorType};

/// Index of a [`Value`] in its [`Graph`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

/// Index of a [`Node`] in its [`Graph`]; also its position in program order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl ValueId {
    /// The index as usize.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl NodeId {
    /// The index as usize.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// What a named tensor with data is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamRole {
    /// A model weight (an ONNX initializer): counted in `params_bytes`, may be trained.
    Weight,
    /// A constant too large to print inline (a folded mask, a rotary table): never trained.
    Constant,
    /// Optimizer state (momentum, Adam moments): persistent, updated every step.
    OptimizerState,
}

/// Which part of a training step a node belongs to. Printed as a suffix (`@b`) except for
/// the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Phase {
    /// The forward pass (and the loss).
    #[default]
    Forward,
    /// Backward "B": gradients with respect to activations.
    Backward,
    /// Backward "W": gradients with respect to weights (schedulable on their own).
    Weight,
    /// The optimizer step.
    Update,
    /// A forward value recomputed during the backward pass instead of being saved.
    Recompute,
}

impl Phase {
    /// The textual suffix (`""` for the forward pass).
    pub fn tag(self) -> &'static str {
        match self {
            Phase::Forward => "",
            Phase::Backward => "b",
            Phase::Weight => "w",
            Phase::Update => "u",
            Phase::Recompute => "r",
        }
    }

    /// Inverse of [`Phase::tag`] for the non-forward phases.
    pub fn from_tag(tag: &str) -> Option<Phase> {
        [
            Phase::Backward,
            Phase::Weight,
            Phase::Update,
            Phase::Recompute,
        ]
        .into_iter()
        .find(|p| p.tag() == tag)
    }
}

/// Where a value comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ValueDef {
    /// A graph input fed at run time.
    Input {
        /// The input's name (the ONNX graph input name).
        name: String,
    },
    /// A named tensor whose data lives outside the textual IR (the weights file).
    Param {
        /// Its name (the ONNX initializer name).
        name: String,
        /// Weight or large constant.
        role: ParamRole,
        /// The data; `None` when the graph came from text.
        data: Option<Tensor>,
    },
    /// A small constant printed inline.
    Const(Tensor),
    /// Output `index` of a node.
    Node {
        /// The defining node.
        node: NodeId,
        /// Which of its outputs.
        index: u32,
    },
}

/// An SSA value.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    /// Its static type.
    pub ty: TensorType,
    /// Its definition.
    pub def: ValueDef,
}

/// One operation applied to values.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// What it computes.
    pub op: Op,
    /// Operands.
    pub inputs: Vec<ValueId>,
    /// Results (each defined by this node).
    pub outputs: Vec<ValueId>,
    /// Where it came from (the ONNX node name), for error messages; not part of the text.
    pub name: String,
    /// The part of the training step it belongs to.
    pub phase: Phase,
    /// The pipeline chunk it belongs to, in a program split into chunks: set on the forward
    /// nodes by the pipeline split and kept by every pass that derives nodes from a node (its
    /// backward, its lowered steps, its recomputation); not part of the text.
    pub chunk: Option<u32>,
}

/// A tensor program: values, nodes in program order, named outputs.
#[derive(Debug, Clone, Default)]
pub struct Graph {
    values: Vec<Value>,
    nodes: Vec<Node>,
    inputs: Vec<ValueId>,
    outputs: Vec<(String, ValueId)>,
    /// State written back after a step: (param, its new value).
    updates: Vec<(ValueId, ValueId)>,
    /// Gradients computed but not yet consumed by an optimizer: (weight, its gradient). The
    /// autodiff pass declares them, the clip and optimizer passes read them.
    grads: Vec<(ValueId, ValueId)>,
}

impl PartialEq for Graph {
    /// Structural equality: ops, types, wiring, names of inputs/params/outputs. Node names
    /// and parameter data are ignored, as they are not part of the textual IR.
    fn eq(&self, other: &Graph) -> bool {
        fn strip(v: &Value) -> Value {
            let mut v = v.clone();
            if let ValueDef::Param { data, .. } = &mut v.def {
                *data = None;
            }
            v
        }
        self.inputs == other.inputs
            && self.outputs == other.outputs
            && self.updates == other.updates
            && self.grads == other.grads
            && self.values.len() == other.values.len()
            && self
                .values
                .iter()
                .zip(&other.values)
                .all(|(a, b)| strip(a) == strip(b))
            && self.nodes.len() == other.nodes.len()
            && self.nodes.iter().zip(&other.nodes).all(|(a, b)| {
                a.op == b.op && a.inputs == b.inputs && a.outputs == b.outputs && a.phase == b.phase
            })
    }
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Graph {
        Graph::default()
    }

    fn push_value(&mut self, ty: TensorType, def: ValueDef) -> ValueId {
        let id = ValueId(self.values.len() as u32);
        self.values.push(Value { ty, def });
        id
    }

    /// Adds a graph input.
    pub fn add_input(&mut self, name: impl Into<String>, ty: TensorType) -> ValueId {
        let id = self.push_value(ty, ValueDef::Input { name: name.into() });
        self.inputs.push(id);
        id
    }

    /// Adds a named tensor whose data is kept outside the textual IR.
    pub fn add_param(
        &mut self,
        name: impl Into<String>,
        role: ParamRole,
        ty: TensorType,
        data: Option<Tensor>,
    ) -> ValueId {
        self.push_value(
            ty,
            ValueDef::Param {
                name: name.into(),
                role,
                data,
            },
        )
    }

    /// Adds an inline constant.
    pub fn add_const(&mut self, t: Tensor) -> ValueId {
        self.push_value(t.ty().clone(), ValueDef::Const(t))
    }

    /// Appends a node whose output types are inferred; errors if the operands are invalid.
    pub fn add_node(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        name: impl Into<String>,
    ) -> Result<Vec<ValueId>, String> {
        let tys: Vec<TensorType> = inputs.iter().map(|&v| self.value(v).ty.clone()).collect();
        let out = op.infer(&tys)?;
        if let Some(t) = out.iter().find(|t| t.checked_bytes().is_none()) {
            return Err(format!("result shape {:?} is too large", t.shape));
        }
        Ok(self.add_node_typed(op, inputs, out, name))
    }

    /// Appends a node with the given output types, unchecked (the verifier checks them).
    pub fn add_node_typed(
        &mut self,
        op: Op,
        inputs: &[ValueId],
        output_types: Vec<TensorType>,
        name: impl Into<String>,
    ) -> Vec<ValueId> {
        let node = NodeId(self.nodes.len() as u32);
        let outputs: Vec<ValueId> = output_types
            .into_iter()
            .enumerate()
            .map(|(i, ty)| {
                self.push_value(
                    ty,
                    ValueDef::Node {
                        node,
                        index: i as u32,
                    },
                )
            })
            .collect();
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: outputs.clone(),
            name: name.into(),
            phase: Phase::Forward,
            chunk: None,
        });
        outputs
    }

    /// Replaces a node's op (the verifier checks the result: the new op must give the node's
    /// result types).
    pub fn set_op(&mut self, n: NodeId, op: Op) {
        self.nodes[n.index()].op = op;
    }

    /// Replaces a node's operands (the verifier checks the result).
    pub fn set_inputs(&mut self, n: NodeId, inputs: Vec<ValueId>) {
        self.nodes[n.index()].inputs = inputs;
    }

    /// Puts the nodes in `order` (a permutation of all node ids; the verifier checks that it
    /// is topological).
    pub fn reorder_nodes(&mut self, order: &[NodeId]) {
        assert_eq!(
            order.len(),
            self.nodes.len(),
            "reorder_nodes needs a permutation"
        );
        let mut old: Vec<Option<Node>> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(Some)
            .collect();
        for (new_index, &n) in order.iter().enumerate() {
            let node = old[n.index()]
                .take()
                .expect("reorder_nodes needs a permutation");
            for (k, &o) in node.outputs.iter().enumerate() {
                self.values[o.index()].def = ValueDef::Node {
                    node: NodeId(new_index as u32),
                    index: k as u32,
                };
            }
            self.nodes.push(node);
        }
    }

    /// Reorders the nodes so every node comes after the producers of its operands, keeping
    /// the current order otherwise: each node is preceded by those of its (transitive)
    /// producers that came later (a depth-first walk in program order). Passes that append
    /// nodes read by earlier ones call this before [`Graph::compact`].
    pub fn sort_topologically(&mut self) {
        let n = self.nodes.len();
        let mut state = vec![0u8; n]; // 0 new, 1 open, 2 emitted
        let mut order = Vec::with_capacity(n);
        for root in 0..n {
            if state[root] != 0 {
                continue;
            }
            let mut stack = vec![(root, 0usize)];
            state[root] = 1;
            while let Some(top) = stack.len().checked_sub(1) {
                let (node, next) = stack[top];
                if let Some(&v) = self.nodes[node].inputs.get(next) {
                    stack[top].1 += 1;
                    if let ValueDef::Node { node: p, .. } = self.values[v.index()].def {
                        if state[p.index()] == 0 {
                            state[p.index()] = 1;
                            stack.push((p.index(), 0));
                        }
                    }
                } else {
                    stack.pop();
                    state[node] = 2;
                    order.push(NodeId(node as u32));
                }
            }
        }
        self.reorder_nodes(&order);
    }

    /// Renames a node (names are for messages and passes that tag nodes; not in the text).
    pub fn set_name(&mut self, n: NodeId, name: impl Into<String>) {
        self.nodes[n.index()].name = name.into();
    }

    /// Sets the pipeline chunk of a node ([`Node::chunk`]).
    pub fn set_chunk(&mut self, n: NodeId, chunk: Option<u32>) {
        self.nodes[n.index()].chunk = chunk;
    }

    /// Node `n`'s pipeline chunk ([`Node::chunk`]), for a node derived from it.
    pub fn chunk_of(&self, n: NodeId) -> Option<u32> {
        self.nodes[n.index()].chunk
    }

    /// Sets the phase of a node.
    pub fn set_phase(&mut self, n: NodeId, phase: Phase) {
        self.nodes[n.index()].phase = phase;
    }

    /// Replaces a param's data (e.g. with the weights after an optimizer step).
    pub fn set_param_data(&mut self, v: ValueId, t: Tensor) {
        if let ValueDef::Param { data, .. } = &mut self.values[v.index()].def {
            *data = Some(t);
        }
    }

    /// Removes every named output (e.g. to replace a model's outputs by a training loss).
    pub fn clear_outputs(&mut self) {
        self.outputs.clear();
    }

    /// Declares that after a step `param` takes the value `value` (an optimizer update).
    pub fn add_update(&mut self, param: ValueId, value: ValueId) {
        self.updates.push((param, value));
    }

    /// State updates in order: (param, new value).
    pub fn updates(&self) -> &[(ValueId, ValueId)] {
        &self.updates
    }

    /// Replaces the state updates (e.g. to gate them behind a condition).
    pub fn set_updates(&mut self, updates: Vec<(ValueId, ValueId)>) {
        self.updates = updates;
    }

    /// Declares `grad` as the gradient of the loss with respect to the weight `param`.
    pub fn add_grad(&mut self, param: ValueId, grad: ValueId) {
        self.grads.push((param, grad));
    }

    /// Declared gradients in order: (weight, gradient).
    pub fn grads(&self) -> &[(ValueId, ValueId)] {
        &self.grads
    }

    /// Removes and returns the declared gradients (the optimizer consumes them).
    pub fn take_grads(&mut self) -> Vec<(ValueId, ValueId)> {
        std::mem::take(&mut self.grads)
    }

    /// The node defining `v`, if a node does.
    pub fn producer(&self, v: ValueId) -> Option<NodeId> {
        match self.values[v.index()].def {
            ValueDef::Node { node, .. } => Some(node),
            _ => None,
        }
    }

    /// Makes every output that names `v` name `f(v)` instead (a pass replacing values).
    pub fn map_outputs(&mut self, f: impl Fn(ValueId) -> ValueId) {
        for (_, v) in &mut self.outputs {
            *v = f(*v);
        }
    }

    /// Names a value as a graph output.
    pub fn add_output(&mut self, name: impl Into<String>, v: ValueId) {
        self.outputs.push((name.into(), v));
    }

    /// A value; panics on an id from another graph.
    pub fn value(&self, v: ValueId) -> &Value {
        &self.values[v.index()]
    }

    /// Mutable access to a value (e.g. to attach parameter data).
    pub fn value_mut(&mut self, v: ValueId) -> &mut Value {
        &mut self.values[v.index()]
    }

    /// A node; panics on an id from another graph.
    pub fn node(&self, n: NodeId) -> &Node {
        &self.nodes[n.index()]
    }

    /// The data of `v` when it is a compile-time constant: a literal or a constant param.
    pub fn constant(&self, v: ValueId) -> Option<&Tensor> {
        match &self.value(v).def {
            ValueDef::Const(t) => Some(t),
            ValueDef::Param {
                role: ParamRole::Constant,
                data: Some(t),
                ..
            } => Some(t),
            _ => None,
        }
    }

    /// How messages name node `n`: its name, or `%N` (its first result) when it has none
    /// (nodes a rewrite created), so no message names a node with an empty string.
    pub fn node_label(&self, n: NodeId) -> String {
        let node = self.node(n);
        match node.name.as_str() {
            "" => node
                .outputs
                .first()
                .map_or_else(|| format!("#{}", n.index()), |v| format!("%{}", v.0)),
            s => s.to_string(),
        }
    }

    /// All values, indexed by [`ValueId`].
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// All nodes in program order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Graph inputs in order.
    pub fn inputs(&self) -> &[ValueId] {
        &self.inputs
    }

    /// Named graph outputs in order.
    pub fn outputs(&self) -> &[(String, ValueId)] {
        &self.outputs
    }

    /// Ids of every parameter value, in id order.
    pub fn params(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.values
            .iter()
            .enumerate()
            .filter(|(_, v)| matches!(v.def, ValueDef::Param { .. }))
            .map(|(i, _)| ValueId(i as u32))
    }

    /// Ids of the [`ParamRole::Weight`] parameters (the model's weights), in id order.
    pub fn weights(&self) -> impl Iterator<Item = ValueId> + '_ {
        self.params().filter(|&p| {
            matches!(
                self.value(p).def,
                ValueDef::Param {
                    role: ParamRole::Weight,
                    ..
                }
            )
        })
    }

    /// Number of weight elements (PyTorch's parameter count).
    pub fn params_numel(&self) -> usize {
        self.weights().map(|p| self.value(p).ty.numel()).sum()
    }

    /// Bytes of all weights.
    pub fn params_bytes(&self) -> usize {
        self.weights().map(|p| self.value(p).ty.bytes()).sum()
    }

    /// How many nodes of each op name the graph has.
    pub fn op_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for n in &self.nodes {
            *m.entry(n.op.name()).or_insert(0) += 1;
        }
        m
    }

    /// Removes nodes and params/consts that no output depends on, and renumbers values in
    /// canonical order: inputs, then params and consts (in their current order), then node
    /// outputs in program order. Textual IR is printed in this order.
    pub fn compact(&mut self) {
        let mut live = vec![false; self.values.len()];
        for &(_, v) in &self.outputs {
            live[v.index()] = true;
        }
        for &(p, v) in self.updates.iter().chain(&self.grads) {
            live[p.index()] = true;
            live[v.index()] = true;
        }
        let mut keep_node = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| live[o.index()]) {
                keep_node[i] = true;
                for &v in &n.inputs {
                    live[v.index()] = true;
                }
            }
        }
        let mut order: Vec<ValueId> = self.inputs.clone();
        order.extend(
            self.values
                .iter()
                .enumerate()
                .filter(|(i, v)| {
                    live[*i] && matches!(v.def, ValueDef::Param { .. } | ValueDef::Const(_))
                })
                .map(|(i, _)| ValueId(i as u32)),
        );
        for (i, n) in self.nodes.iter().enumerate() {
            if keep_node[i] {
                order.extend(&n.outputs);
            }
        }
        let mut remap = vec![ValueId(u32::MAX); self.values.len()];
        for (new, old) in order.iter().enumerate() {
            remap[old.index()] = ValueId(new as u32);
        }
        let old_values = std::mem::take(&mut self.values);
        let old_nodes = std::mem::take(&mut self.nodes);
        let mut values: Vec<Option<Value>> = old_values.into_iter().map(Some).collect();
        self.values = order
            .iter()
            .map(|o| values[o.index()].take().unwrap())
            .collect();
        let mut new_id = 0u32;
        for (i, mut n) in old_nodes.into_iter().enumerate() {
            if !keep_node[i] {
                continue;
            }
            n.inputs.iter_mut().for_each(|v| *v = remap[v.index()]);
            n.outputs.iter_mut().for_each(|v| *v = remap[v.index()]);
            for (k, &o) in n.outputs.iter().enumerate() {
                self.values[o.index()].def = ValueDef::Node {
                    node: NodeId(new_id),
                    index: k as u32,
                };
            }
            self.nodes.push(n);
            new_id += 1;
        }
        self.inputs.iter_mut().for_each(|v| *v = remap[v.index()]);
        self.outputs
            .iter_mut()
            .for_each(|(_, v)| *v = remap[v.index()]);
        self.updates
            .iter_mut()
            .chain(self.grads.iter_mut())
            .for_each(|(p, v)| {
                *p = remap[p.index()];
                *v = remap[v.index()];
            });
    }
}
