//! `apply_reversible`: makes a model's residual stack reversible with MEFT's couplings
//! (MEFT, "Make Pre-trained Model Reversible", NeurIPS 2023), on the canonical forward graph.
//!
//! The residual structure comes from the `residual` nodes the canonicalisation recognised: two
//! per layer, each one *sub-block* (attention, then the FFN) from its stream operand to the
//! next sub-block's input (the residual's result in pre-norm models, the norm of it in
//! post-norm ones such as BERT). With `h0` the first layer's input, `x1 = x2 = h0`, and per
//! reversible layer
//!
//! ```text
//! y1 = λ·x1 + F(x2)        y2 = β·x2 + G(y1)        (x1, x2) = switch ? (y2, y1) : (y1, y2)
//! ```
//!
//! | variant | F | G | λ | β | switch |
//! |---|---|---|---|---|---|
//! | MEFT1 | layer + adapter | adapter | 0.1 | 1 | yes |
//! | MEFT2 | adapter | layer + adapter | 1 | 0.1 | yes |
//! | MEFT3 | attention sub-block + adapter | FFN sub-block + adapter | 0.1 | 0.1 | no |
//!
//! "block + adapter" is `u + adapter(u)` with `u` the pre-trained block's output (a
//! sequential adapter); an adapter is `gelu(v·W_down + b_down)·W_up + b_up`, `W_down [d, r]`
//! and `W_up [r, d]` drawn from N(0, 0.02²) (seeded), biases zero, named
//! `memc.rev.<layer>.<f|g>.adapter.<down|up>.<weight|bias>` (so `--trainable adapters`
//! matches [`ADAPTERS`]). After the last reversible layer `(x1 + x2)/2` replaces the stack's
//! output; later layers stay ordinary. The couplings are `rev_couple` nodes (kept through
//! autodiff), which the training builder inverts in the backward pass
//! ([`crate::reconstruct`]); the pre-trained sub-blocks inside the stack are the same ops on
//! new operands, their `residual` marks lowered to `add` (the stack has no layers of its own
//! for rematerialisation).

use std::collections::{HashMap, HashSet};

use memc_ir::{
    BinaryOp, DType, Graph, NodeId, Op, ParamRole, Phase, Tensor, TensorType, UnaryOp, ValueId,
};

/// A regular expression matching the adapters' weight names (`--trainable adapters`).
pub const ADAPTERS: &str = r"^memc\.rev\..*\.adapter\.";

/// MEFT's three ways of making a layer reversible (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// F = layer + adapter, G = adapter, λ = 0.1, β = 1, streams switched.
    Meft1,
    /// F = adapter, G = layer + adapter, λ = 1, β = 0.1, streams switched.
    Meft2,
    /// F = attention + adapter, G = FFN + adapter, λ = β = 0.1.
    Meft3,
}

impl Variant {
    /// λ, β and whether the streams switch.
    pub fn coefficients(self) -> (f64, f64, bool) {
        match self {
            Variant::Meft1 => (0.1, 1.0, true),
            Variant::Meft2 => (1.0, 0.1, true),
            Variant::Meft3 => (0.1, 0.1, false),
        }
    }

    /// `meft1`, `meft2`, `meft3`.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Meft1 => "meft1",
            Variant::Meft2 => "meft2",
            Variant::Meft3 => "meft3",
        }
    }
}

/// How to make the stack reversible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevOptions {
    /// The coupling.
    pub variant: Variant,
    /// Make only the first this many layers reversible (`None`: all).
    pub layers: Option<usize>,
    /// The adapters' bottleneck width `r`.
    pub adapter_rank: usize,
    /// Seed of the adapters' initial weights.
    pub seed: u64,
}

/// What [`apply_reversible`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevStats {
    /// The coupling.
    pub variant: Variant,
    /// Layers made reversible.
    pub reversible_layers: usize,
    /// Layers of the model.
    pub layers: usize,
    /// Adapters added.
    pub adapters: usize,
    /// Their parameters (elements).
    pub adapter_params: usize,
    /// The model is post-norm (each sub-block ends with its norm, as in BERT).
    pub post_norm: bool,
}

/// Why a model cannot be made reversible.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RevError {
    /// No residual layers were recognised.
    #[error("{0}; reversible layers need the residual blocks the canonicalisation recognises")]
    NoLayers(String),
    /// `--rev-layers` is out of range.
    #[error("{asked} reversible layers is outside 1..={layers} (the model has {layers} layers)")]
    TooManyLayers {
        /// Requested.
        asked: usize,
        /// Available.
        layers: usize,
    },
    /// `--adapter-rank` is out of range.
    #[error("an adapter rank of {rank} is outside 1..={d} (the model width)")]
    BadRank {
        /// Requested.
        rank: usize,
        /// Model width.
        d: usize,
    },
    /// Building the rewritten graph failed (a memc bug).
    #[error("making the layers reversible failed (a memc bug, please report it): {0}")]
    Build(String),
}

/// One residual sub-block: the forward nodes from `input` to `output`.
#[derive(Debug, Clone)]
struct SubBlock {
    input: ValueId,
    output: ValueId,
    nodes: Vec<NodeId>,
}

/// Rewrites `g`'s first layers into reversible couplings (see the module docs).
pub fn apply_reversible(g: &mut Graph, opts: &RevOptions) -> Result<RevStats, RevError> {
    let (subs, post_norm) = sub_blocks(g).map_err(RevError::NoLayers)?;
    let layers = subs.len() / 2;
    let n = opts.layers.unwrap_or(layers);
    if n == 0 || n > layers {
        return Err(RevError::TooManyLayers { asked: n, layers });
    }
    let h0 = subs[0].input;
    let ty = g.value(h0).ty.clone();
    let d = *ty.shape.last().unwrap_or(&0);
    if opts.adapter_rank == 0 || opts.adapter_rank > d {
        return Err(RevError::BadRank {
            rank: opts.adapter_rank,
            d,
        });
    }
    let first_new = g.nodes().len();
    let mut stats = RevStats {
        variant: opts.variant,
        reversible_layers: n,
        layers,
        adapters: 0,
        adapter_params: 0,
        post_norm,
    };
    let mut rng = Rng::new(opts.seed ^ 0x6d65_6674);
    let (lambda, beta, switch) = opts.variant.coefficients();
    let mut cx = Cx {
        g,
        rng: &mut rng,
        stats: &mut stats,
        rank: opts.adapter_rank,
    };
    let (mut x1, mut x2) = (h0, h0);
    for l in 0..n {
        let (attn, ffn) = (&subs[2 * l], &subs[2 * l + 1]);
        let tag = format!("rev{l}");
        let f = match opts.variant {
            Variant::Meft1 => {
                let u = cx.block(attn, x2, &tag)?;
                let u = cx.block(ffn, u, &tag)?;
                cx.with_adapter(u, &format!("memc.rev.{l}.f"))?
            }
            Variant::Meft2 => cx.adapter(x2, &format!("memc.rev.{l}.f"))?,
            Variant::Meft3 => {
                let u = cx.block(attn, x2, &tag)?;
                cx.with_adapter(u, &format!("memc.rev.{l}.f"))?
            }
        };
        let y1 = cx.couple(x1, f, lambda, &tag)?;
        let gv = match opts.variant {
            Variant::Meft1 => cx.adapter(y1, &format!("memc.rev.{l}.g"))?,
            Variant::Meft2 => {
                let u = cx.block(attn, y1, &tag)?;
                let u = cx.block(ffn, u, &tag)?;
                cx.with_adapter(u, &format!("memc.rev.{l}.g"))?
            }
            Variant::Meft3 => {
                let u = cx.block(ffn, y1, &tag)?;
                cx.with_adapter(u, &format!("memc.rev.{l}.g"))?
            }
        };
        let y2 = cx.couple(x2, gv, beta, &tag)?;
        (x1, x2) = if switch { (y2, y1) } else { (y1, y2) };
    }
    let sum = cx.node(Op::Binary(BinaryOp::Add), &[x1, x2], "rev.out")?;
    let half = cx.g.add_const(Tensor::from_f64(ty.dtype, vec![], &[0.5]));
    let out = cx.node(Op::Binary(BinaryOp::Mul), &[sum, half], "rev.out")?;
    // Everything that read the stack's last output reads (x1 + x2)/2.
    let old = subs[2 * n - 1].output;
    for i in 0..first_new {
        let node = NodeId(i as u32);
        if g.node(node).inputs.contains(&old) {
            let inputs = g
                .node(node)
                .inputs
                .iter()
                .map(|&v| if v == old { out } else { v })
                .collect();
            g.set_inputs(node, inputs);
        }
    }
    g.map_outputs(|v| if v == old { out } else { v });
    g.sort_topologically();
    g.compact();
    memc_ir::verify(g).map_err(|e| RevError::Build(e.to_string()))?;
    Ok(stats)
}

/// The residual sub-blocks of `g`, two per layer, and whether the model is post-norm.
fn sub_blocks(g: &Graph) -> Result<(Vec<SubBlock>, bool), String> {
    let residuals: Vec<NodeId> = (0..g.nodes().len())
        .map(|i| NodeId(i as u32))
        .filter(|&n| g.node(n).phase == Phase::Forward && g.node(n).op == Op::Residual)
        .collect();
    if residuals.len() < 2 || !residuals.len().is_multiple_of(2) {
        return Err(format!(
            "found {} `residual` nodes, not two per layer",
            residuals.len()
        ));
    }
    let is_norm = |op: &Op| matches!(op, Op::LayerNorm { .. } | Op::RmsNorm { .. });
    let mut readers: HashMap<ValueId, Vec<NodeId>> = HashMap::new();
    for (i, node) in g.nodes().iter().enumerate() {
        for &v in &node.inputs {
            readers.entry(v).or_default().push(NodeId(i as u32));
        }
    }
    // Sub-block k ends where sub-block k+1's stream starts: the residual's result or its norm.
    let mut ends = vec![];
    let mut post_norm = None;
    for w in residuals.windows(2) {
        let (r, next) = (g.node(w[0]), g.node(w[1]));
        let start = next.inputs[0];
        let normed =
            match g.producer(start) {
                _ if start == r.outputs[0] => false,
                Some(p) if is_norm(&g.node(p).op) && g.node(p).inputs[0] == r.outputs[0] => true,
                _ => {
                    return Err(format!(
                    "the stream of residual `{}` does not start from residual `{}` or its norm \
                     (it is computed by `{}`)",
                    g.node_label(w[1]),
                    g.node_label(w[0]),
                    g.producer(start)
                        .map_or("an input".to_string(), |p| g.node(p).op.name().to_string())
                ))
                }
            };
        if *post_norm.get_or_insert(normed) != normed {
            return Err("the residual blocks mix pre-norm and post-norm".into());
        }
        ends.push(start);
    }
    let post_norm = post_norm.unwrap_or(false);
    let last = g.node(*residuals.last().unwrap()).outputs[0];
    let last_end = if post_norm {
        readers
            .get(&last)
            .into_iter()
            .flatten()
            .find(|&&p| is_norm(&g.node(p).op))
            .map(|&p| g.node(p).outputs[0])
            .ok_or("the last post-norm residual has no norm after it")?
    } else {
        last
    };
    ends.push(last_end);
    let subs = residuals
        .iter()
        .zip(ends)
        .map(|(&r, end)| {
            let input = g.node(r).inputs[0];
            SubBlock {
                input,
                output: end,
                nodes: between(g, &readers, input, end),
            }
        })
        .collect();
    Ok((subs, post_norm))
}

/// The forward nodes on a path from `from` to `to`, in program order.
pub(crate) fn between(
    g: &Graph,
    readers: &HashMap<ValueId, Vec<NodeId>>,
    from: ValueId,
    to: ValueId,
) -> Vec<NodeId> {
    let forward = |n: NodeId| g.node(n).phase == Phase::Forward;
    let mut below: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![from];
    while let Some(v) = stack.pop() {
        for &r in readers.get(&v).into_iter().flatten() {
            if forward(r) && below.insert(r) {
                stack.extend(&g.node(r).outputs);
            }
        }
    }
    let mut above: HashSet<NodeId> = HashSet::new();
    let mut stack = vec![to];
    while let Some(v) = stack.pop() {
        if let Some(p) = g.producer(v) {
            if forward(p) && above.insert(p) {
                stack.extend(&g.node(p).inputs);
            }
        }
    }
    let mut nodes: Vec<NodeId> = below.intersection(&above).copied().collect();
    nodes.sort();
    nodes
}

struct Cx<'a> {
    g: &'a mut Graph,
    rng: &'a mut Rng,
    stats: &'a mut RevStats,
    rank: usize,
}

impl Cx<'_> {
    fn node(&mut self, op: Op, inputs: &[ValueId], name: &str) -> Result<ValueId, RevError> {
        let out = self
            .g
            .add_node(op, inputs, name)
            .map_err(|e| RevError::Build(format!("{name}: {e}")))?;
        Ok(out[0])
    }

    /// The pre-trained sub-block applied to `x` (its nodes cloned with `x` for its input).
    fn block(&mut self, sb: &SubBlock, x: ValueId, tag: &str) -> Result<ValueId, RevError> {
        let mut map: HashMap<ValueId, ValueId> = HashMap::from([(sb.input, x)]);
        for &n in &sb.nodes {
            let node = self.g.node(n).clone();
            let inputs: Vec<ValueId> = node
                .inputs
                .iter()
                .map(|v| *map.get(v).unwrap_or(v))
                .collect();
            let op = match node.op {
                Op::Residual => Op::Binary(BinaryOp::Add),
                op => op,
            };
            let out = self
                .g
                .add_node(op, &inputs, format!("{tag}/{}", node.name))
                .map_err(|e| RevError::Build(format!("{}: {e}", node.name)))?;
            for (o, c) in node.outputs.iter().zip(out) {
                map.insert(*o, c);
            }
        }
        Ok(map[&sb.output])
    }

    /// `u + adapter(u)`.
    fn with_adapter(&mut self, u: ValueId, name: &str) -> Result<ValueId, RevError> {
        let a = self.adapter(u, name)?;
        self.node(Op::Binary(BinaryOp::Add), &[u, a], name)
    }

    /// `gelu(x·W_down + b_down)·W_up + b_up`.
    fn adapter(&mut self, x: ValueId, name: &str) -> Result<ValueId, RevError> {
        let ty = self.g.value(x).ty.clone();
        let d = *ty.shape.last().unwrap();
        let r = self.rank;
        let weight = |cx: &mut Cx, part: &str, shape: Vec<usize>, random: bool| {
            let numel: usize = shape.iter().product();
            let values: Vec<f64> = (0..numel)
                .map(|_| if random { 0.02 * cx.rng.normal() } else { 0.0 })
                .collect();
            cx.stats.adapter_params += numel;
            let t = Tensor::from_f64(ty.dtype, shape.clone(), &values);
            cx.g.add_param(
                format!("{name}.adapter.{part}"),
                ParamRole::Weight,
                TensorType::new(ty.dtype, shape),
                Some(t),
            )
        };
        let w1 = weight(self, "down.weight", vec![d, r], true);
        let b1 = weight(self, "down.bias", vec![r], false);
        let w2 = weight(self, "up.weight", vec![r, d], true);
        let b2 = weight(self, "up.bias", vec![d], false);
        self.stats.adapters += 1;
        let h = self.node(Op::MatMul, &[x, w1], name)?;
        let h = self.node(Op::Binary(BinaryOp::Add), &[h, b1], name)?;
        let h = self.node(Op::Unary(UnaryOp::Gelu), &[h], name)?;
        let h = self.node(Op::MatMul, &[h, w2], name)?;
        self.node(Op::Binary(BinaryOp::Add), &[h, b2], name)
    }

    /// `s·a + f` as a `rev_couple`.
    fn couple(&mut self, a: ValueId, f: ValueId, s: f64, tag: &str) -> Result<ValueId, RevError> {
        let dtype: DType = self.g.value(a).ty.dtype;
        let s = self.g.add_const(Tensor::from_f64(dtype, vec![], &[s]));
        self.node(Op::RevCouple, &[a, f, s], &format!("{tag}/couple"))
    }
}

/// SplitMix64 with Box–Muller normals: deterministic adapter weights (and the driver's
/// starting-point probe inputs) for a seed.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}
