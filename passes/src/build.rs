//! A small graph builder for passes that emit many nodes (autodiff, losses, optimizers): typed
//! helpers that add nodes in one phase and report shape errors as pass errors.

use memc_ir::{BinaryOp, DType, Graph, Op, Phase, ReduceKind, Tensor, UnaryOp, ValueId};

/// Adds nodes to a graph, all in one [`Phase`]. Shape errors are bugs in the calling pass, so
/// they are returned as strings for the pass to wrap.
pub struct Builder<'g> {
    /// The graph being extended.
    pub g: &'g mut Graph,
    /// Phase given to every node added.
    pub phase: Phase,
    /// Name given to every node added (for error messages).
    pub name: String,
    /// Pipeline chunk given to every node added ([`memc_ir::Node::chunk`]).
    pub chunk: Option<u32>,
}

/// Result of a builder call.
pub type BResult = Result<ValueId, String>;

impl<'g> Builder<'g> {
    /// A builder adding `phase` nodes to `g`.
    pub fn new(g: &'g mut Graph, phase: Phase, name: impl Into<String>) -> Builder<'g> {
        Builder {
            g,
            phase,
            name: name.into(),
            chunk: None,
        }
    }

    /// A builder adding `phase` nodes derived from node `origin` (its name and chunk).
    pub fn for_node(g: &'g mut Graph, phase: Phase, origin: memc_ir::NodeId) -> Builder<'g> {
        let (name, chunk) = (g.node(origin).name.clone(), g.chunk_of(origin));
        Builder {
            g,
            phase,
            name,
            chunk,
        }
    }

    /// Adds one node and returns its (first) result.
    pub fn op(&mut self, op: Op, inputs: &[ValueId]) -> BResult {
        let out = self.g.add_node(op, inputs, self.name.clone())?;
        let node = self.g.producer(out[0]).expect("a node result");
        self.g.set_phase(node, self.phase);
        self.g.set_chunk(node, self.chunk);
        Ok(out[0])
    }

    /// The shape of a value.
    pub fn shape(&self, v: ValueId) -> Vec<usize> {
        self.g.value(v).ty.shape.clone()
    }

    /// The dtype of a value.
    pub fn dtype(&self, v: ValueId) -> DType {
        self.g.value(v).ty.dtype
    }

    /// A scalar constant of `dtype`.
    pub fn scalar(&mut self, dtype: DType, v: f64) -> ValueId {
        self.g.add_const(Tensor::from_f64(dtype, vec![], &[v]))
    }

    /// A unary op.
    pub fn unary(&mut self, u: UnaryOp, x: ValueId) -> BResult {
        self.op(Op::Unary(u), &[x])
    }

    /// A binary op.
    pub fn binary(&mut self, b: BinaryOp, x: ValueId, y: ValueId) -> BResult {
        self.op(Op::Binary(b), &[x, y])
    }

    /// x + y
    pub fn add(&mut self, x: ValueId, y: ValueId) -> BResult {
        self.binary(BinaryOp::Add, x, y)
    }

    /// x - y
    pub fn sub(&mut self, x: ValueId, y: ValueId) -> BResult {
        self.binary(BinaryOp::Sub, x, y)
    }

    /// x * y
    pub fn mul(&mut self, x: ValueId, y: ValueId) -> BResult {
        self.binary(BinaryOp::Mul, x, y)
    }

    /// x / y
    pub fn div(&mut self, x: ValueId, y: ValueId) -> BResult {
        self.binary(BinaryOp::Div, x, y)
    }

    /// x * c for a scalar constant c.
    pub fn mul_scalar(&mut self, x: ValueId, c: f64) -> BResult {
        let s = self.scalar(self.dtype(x), c);
        self.mul(x, s)
    }

    /// x + c for a scalar constant c.
    pub fn add_scalar(&mut self, x: ValueId, c: f64) -> BResult {
        let s = self.scalar(self.dtype(x), c);
        self.add(x, s)
    }

    /// -x
    pub fn neg(&mut self, x: ValueId) -> BResult {
        self.unary(UnaryOp::Neg, x)
    }

    /// A reduction.
    pub fn reduce(
        &mut self,
        kind: ReduceKind,
        x: ValueId,
        axes: Vec<usize>,
        keep_dims: bool,
    ) -> BResult {
        if axes.is_empty() {
            return Ok(x);
        }
        self.op(
            Op::Reduce {
                kind,
                axes,
                keep_dims,
            },
            &[x],
        )
    }

    /// Reshape (no node when the shape is unchanged).
    pub fn reshape(&mut self, x: ValueId, shape: Vec<usize>) -> BResult {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.op(Op::Reshape { shape }, &[x])
    }

    /// Broadcast to `shape` (no node when unchanged).
    pub fn expand(&mut self, x: ValueId, shape: Vec<usize>) -> BResult {
        if self.shape(x) == shape {
            return Ok(x);
        }
        self.op(Op::Expand { shape }, &[x])
    }

    /// Permute dims (no node for the identity; a transpose of a transpose is one, of its
    /// operand).
    pub fn transpose(&mut self, x: ValueId, perm: Vec<usize>) -> BResult {
        if let Some(n) = self.g.producer(x) {
            if let Op::Transpose { perm: inner } = &self.g.node(n).op {
                let composed: Vec<usize> = perm.iter().map(|&p| inner[p]).collect();
                let operand = self.g.node(n).inputs[0];
                return self.transpose(operand, composed);
            }
        }
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.op(Op::Transpose { perm }, &[x])
    }

    /// Swap the last two dims.
    pub fn transpose_last2(&mut self, x: ValueId) -> BResult {
        let r = self.shape(x).len();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.transpose(x, perm)
    }

    /// Convert to `dtype` (no node when unchanged).
    pub fn cast(&mut self, x: ValueId, to: DType) -> BResult {
        if self.dtype(x) == to {
            return Ok(x);
        }
        self.op(Op::Cast { to }, &[x])
    }

    /// Sums `x` (a broadcast result) down to `shape`: the adjoint of NumPy broadcasting.
    pub fn unbroadcast(&mut self, x: ValueId, shape: &[usize]) -> BResult {
        let xs = self.shape(x);
        if xs == shape {
            return Ok(x);
        }
        let lead = xs.len() - shape.len();
        let axes: Vec<usize> = (0..xs.len())
            .filter(|&i| i < lead || (shape[i - lead] == 1 && xs[i] != 1))
            .collect();
        let summed = self.reduce(ReduceKind::Sum, x, axes, true)?;
        self.reshape(summed, shape.to_vec())
    }
}
