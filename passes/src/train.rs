//! Turns a forward graph into a training step: loss, backward (B/W split), optional gradient
//! clipping and the optimizer update, all as graph ops.
//!
//! The step's graph reads three scalar f32 inputs besides the model's: `memc.lr`,
//! `memc.weight_decay` and `memc.step` (1-based, for Adam's bias correction), so one compiled
//! program serves any learning-rate schedule. It outputs `loss` and declares one
//! [`Graph::add_update`] per trained weight and per optimizer-state tensor.

use memc_ir::{
    BinaryOp, DType, Graph, Op, ParamRole, Phase, ReduceKind, TensorType, UnaryOp, ValueDef,
    ValueId,
};

use crate::autodiff::{differentiate, AutodiffError};
use crate::build::Builder;
use crate::reconstruct::{reconstruct, ReconstructStats};
use crate::remat::{rematerialize, Policy, RematError, RematStats};

/// The training loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Mean cross-entropy of `logits[:, :-1]` against `input_ids[:, 1:]` (Hugging Face's
    /// causal-LM loss with `labels=input_ids`).
    NextTokenCe,
    /// Hugging Face's causal-LM loss with labels: the mean cross-entropy of `logits[:, :-1]`
    /// against `labels[:, 1:]` over the positions whose label is not −100 (the ignore index:
    /// prompt tokens, padding). The labels are the program's input [`LABELS_INPUT`], of the
    /// token input's shape and type.
    CausalLm,
}

impl Loss {
    /// The loss's name in pass specs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Loss::NextTokenCe => "next-token-ce",
            Loss::CausalLm => "causal-lm",
        }
    }
}

/// The input carrying the labels of [`Loss::CausalLm`].
pub const LABELS_INPUT: &str = "memc.labels";

/// The label a position is left out of the loss with (transformers' `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// The optimizer, with PyTorch's semantics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.SGD` (dampening 0, no Nesterov): `g += wd·p; buf = momentum·buf + g;
    /// p -= lr·buf` (no buffer when momentum is 0).
    Sgd {
        /// Momentum factor.
        momentum: f64,
    },
    /// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments.
    AdamW {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Added to the denominator.
        eps: f64,
    },
}

/// Names of the step's scalar inputs.
pub const LR_INPUT: &str = "memc.lr";
/// Weight decay input.
pub const WEIGHT_DECAY_INPUT: &str = "memc.weight_decay";
/// 1-based step number input.
pub const STEP_INPUT: &str = "memc.step";
/// The scalar input a microbatch's gradient is scaled by before it is added to the sums
/// (`1/K`, or the microbatch's share of the step's kept labels) ([`accumulate_grads`]).
pub const ACCUM_SCALE_INPUT: &str = "memc.accum_scale";
/// The scalar input that applies the optimizer (1, the step's last microbatch) or only
/// accumulates (0) ([`accumulate_grads`]).
pub const APPLY_INPUT: &str = "memc.apply";
/// The prefix of the gradient sums' names (optimizer state: zero between steps).
pub const ACCUM_PREFIX: &str = "memc.accum:";

/// Which weights are trained.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Trainable {
    /// The adapters of reversible layers when the graph has couplings (MEFT's setting), else
    /// every float weight.
    #[default]
    Default,
    /// Every float weight.
    All,
    /// The adapters of reversible layers ([`crate::reversible::ADAPTERS`]).
    Adapters,
    /// The weights whose names this regular expression matches (searched, not anchored).
    Matching(String),
}

impl Trainable {
    /// `all`, `adapters`, `default`, or a regular expression.
    pub fn parse(text: &str) -> Trainable {
        match text {
            "default" => Trainable::Default,
            "all" => Trainable::All,
            "adapters" => Trainable::Adapters,
            re => Trainable::Matching(re.to_string()),
        }
    }

    /// The option's text ([`Trainable::parse`] gives it back).
    pub fn text(&self) -> &str {
        match self {
            Trainable::Default => "default",
            Trainable::All => "all",
            Trainable::Adapters => "adapters",
            Trainable::Matching(re) => re,
        }
    }

    /// The predicate on weight names, for a graph with or without reversible couplings.
    fn matcher(&self, reversible: bool) -> Result<Option<regex::Regex>, TrainError> {
        let re = match self {
            Trainable::All => return Ok(None),
            Trainable::Default if !reversible => return Ok(None),
            Trainable::Adapters if !reversible => return Err(TrainError::NoAdapters),
            Trainable::Default | Trainable::Adapters => crate::reversible::ADAPTERS,
            Trainable::Matching(re) => re,
        };
        regex::Regex::new(re)
            .map(Some)
            .map_err(|e| TrainError::BadTrainable(re.to_string(), e.to_string()))
    }
}

/// How to build the training step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// The loss.
    pub loss: Loss,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Clip the global gradient norm to this value (`torch.nn.utils.clip_grad_norm_`).
    pub clip_grad_norm: Option<f64>,
    /// Which weights are trained.
    pub trainable: Trainable,
    /// What the backward pass keeps and what it recomputes ([`crate::remat`]); `None` keeps
    /// every value a gradient reads.
    pub remat: Option<Policy>,
    /// Compute the loss with the fused, chunked LM-head cross-entropy (`lm_head_ce`) when
    /// the logits are one GEMM: the `[B, S, V]` logits are never held whole.
    pub fused_loss: bool,
    /// Compute dtype of the forward and backward passes; weights and the optimizer stay f32
    /// ([`crate::precision`]).
    pub compute_dtype: DType,
    /// The backward pass of reversible couplings (`rev_couple`, [`crate::reversible`]).
    pub rev_backward: RevBackward,
    /// Split the layers into this many pipeline chunks ([`crate::partition`]).
    pub pipeline_chunks: Option<usize>,
    /// Also output each trained weight's gradient as `grad:<name>` (after `loss`), for the
    /// pipelined runner that accumulates them over microbatches.
    pub grad_outputs: bool,
    /// With the reconstruction drift checked: the drift worth a warning when the step runs
    /// (`None`: [`crate::reconstruct::drift_threshold`]'s default for the compute dtype).
    pub rev_check_threshold: Option<f64>,
    /// Gradient accumulation over this many microbatches: the program runs one, adds its
    /// gradient (times [`ACCUM_SCALE_INPUT`]) into a persistent sum per weight, and applies
    /// the optimizer to the sum only when [`APPLY_INPUT`] is 1 ([`accumulate_grads`]).
    pub grad_accum: Option<usize>,
}

impl Default for TrainOptions {
    /// PyTorch's defaults: next-token cross-entropy (fused), AdamW (0.9, 0.999, 1e-8), every
    /// weight trained, the minimum-cut rematerialisation, f32.
    fn default() -> TrainOptions {
        TrainOptions {
            loss: Loss::NextTokenCe,
            optimizer: Optimizer::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            clip_grad_norm: None,
            trainable: Trainable::Default,
            remat: Some(Policy::MinCut),
            fused_loss: true,
            compute_dtype: DType::F32,
            rev_backward: RevBackward::Reconstruct { check: false },
            pipeline_chunks: None,
            grad_outputs: false,
            rev_check_threshold: None,
            grad_accum: None,
        }
    }
}

impl TrainOptions {
    /// PyTorch's default weight decay for the optimizer: 0.01 for AdamW, 0 for SGD.
    pub fn default_weight_decay(&self) -> f64 {
        match self.optimizer {
            Optimizer::AdamW { .. } => 0.01,
            Optimizer::Sgd { .. } => 0.0,
        }
    }

    /// The drift the runtime warns past, when the reconstruction drift is checked.
    pub fn drift_threshold(&self) -> Option<f64> {
        (self.rev_backward == RevBackward::Reconstruct { check: true }).then(|| {
            crate::reconstruct::drift_threshold(self.rev_check_threshold, self.compute_dtype)
        })
    }
}

/// How the backward pass treats a reversible stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RevBackward {
    /// Reconstruct each layer's inputs from its outputs ([`crate::reconstruct`]); with
    /// `check`, also output each layer's reconstruction drift.
    Reconstruct {
        /// Output `memc.rev_drift.<layer>`.
        check: bool,
    },
    /// Ordinary autodiff: keep the activations (the reference the reconstruction is
    /// checked against).
    #[default]
    Store,
}

/// What the training build did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainStats {
    /// Trained weight tensors.
    pub trained_tensors: usize,
    /// Trained parameters (elements).
    pub trained_params: usize,
    /// Weights left frozen.
    pub frozen_tensors: usize,
    /// Nodes added for the backward pass (B and W).
    pub backward_nodes: usize,
    /// Nodes added for the optimizer step (clipping included).
    pub update_nodes: usize,
    /// What rematerialisation did, if it ran.
    pub remat: Option<RematStats>,
    /// The fused LM-head loss, when it was used.
    pub fused_loss: Option<FusedLoss>,
    /// What the reversible backward pass did, when the program has couplings.
    pub reconstruct: Option<ReconstructStats>,
    /// The pipeline chunks, with `pipeline_chunks`.
    pub partition: Option<crate::partition::Partition>,
}

/// How the fused LM-head loss ([`memc_ir::Op::LmHeadCe`]) was chunked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FusedLoss {
    /// Chunks of rows.
    pub chunks: usize,
    /// Bytes of the whole f32 logits `[N, V]` the plain loss holds (forward, then its
    /// log-probabilities for the backward pass).
    pub logits_bytes: u64,
    /// Bytes of one chunk's f32 logits, the most the fused loss holds at once.
    pub chunk_bytes: u64,
}

/// Why a training step cannot be built. The messages name the graph's problem, never a
/// command-line flag (the driver maps its flags onto [`TrainOptions`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainError {
    /// The model has no output the loss can use.
    #[error("the next-token loss needs an output of shape [batch, seq, vocab] computed from an integer input of shape [batch, seq] (`input_ids`): {0}")]
    NoLogits(String),
    /// No weight is trainable.
    #[error("no weight is trainable (the model's weights are named like `{0}`)")]
    NothingTrainable(String),
    /// The adapters were asked for but the graph has no reversible layers.
    #[error("only reversible layers have adapters to train, and the graph has none")]
    NoAdapters,
    /// The trainable-weights expression does not parse.
    #[error("`{0}` is not a regular expression: {1}")]
    BadTrainable(String, String),
    /// A gradient pass ran before the loss or autodiff pass.
    #[error("{0}")]
    Order(&'static str),
    /// Differentiation failed.
    #[error(transparent)]
    Autodiff(#[from] AutodiffError),
    /// Building the loss or optimizer failed (a bug in memc).
    #[error("building the training step failed: {0}")]
    Build(String),
    /// Lowering the blocks failed.
    #[error("building the training step failed: {0}")]
    Lower(#[from] crate::blocks::LowerError),
    /// The reversible backward pass could not be built.
    #[error("building the training step failed: {0}")]
    Reconstruct(#[from] crate::reconstruct::ReconstructError),
    /// Lowering to the compute dtype failed.
    #[error("building the training step failed: {0}")]
    Precision(#[from] crate::precision::PrecisionError),
    /// The rematerialisation policy cannot be applied.
    #[error(transparent)]
    Remat(#[from] RematError),
    /// The layers cannot be split into the pipeline chunks asked for.
    #[error("pipeline partition: {0}")]
    Partition(crate::partition::PartitionError),
    /// The pass manager stopped (a dump could not be written, or a pass broke the graph).
    #[error(transparent)]
    Pass(#[from] crate::manager::PassError),
}

/// What the loss pass built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossStats {
    /// The fused LM-head loss, when it was used.
    pub fused: Option<FusedLoss>,
}

crate::pass_stats! {
    LossStats,
    fn summary(&self) -> String {
        match &self.fused {
            Some(f) => format!(
                "fused LM-head cross-entropy in {} chunks ({} of {} logit bytes at once)",
                f.chunks, f.chunk_bytes, f.logits_bytes
            ),
            None => "cross-entropy over the whole logits".into(),
        }
    }
}

/// Adds the loss to the forward graph `g` and makes it the only output, `loss`: the fused,
/// chunked LM-head cross-entropy when `fused` and the logits are one GEMM, else the plain
/// next-token cross-entropy.
pub fn add_loss(g: &mut Graph, loss: Loss, fused: bool) -> Result<LossStats, TrainError> {
    let (ids, logits) = find_logits(g)?;
    // The targets: the token ids, or the labels (with the rows' weights: 1/count where kept).
    let labels = match loss {
        Loss::NextTokenCe => None,
        Loss::CausalLm => {
            if g.inputs().iter().any(
                |&v| matches!(&g.value(v).def, ValueDef::Input { name } if name == LABELS_INPUT),
            ) {
                return Err(TrainError::Build(format!(
                    "the model already has an input `{LABELS_INPUT}`"
                )));
            }
            Some(g.add_input(LABELS_INPUT, g.value(ids).ty.clone()))
        }
    };
    let head = if fused { lm_head(g, logits) } else { None };
    let (loss, fused) = match head {
        Some((h, w, bias)) => {
            let (loss, f) =
                fused_next_token_ce(g, ids, labels, h, w, bias).map_err(TrainError::Build)?;
            (loss, Some(f))
        }
        None => (
            next_token_ce(g, ids, labels, logits).map_err(TrainError::Build)?,
            None,
        ),
    };
    g.clear_outputs();
    g.add_output(LOSS_OUTPUT, loss);
    Ok(LossStats { fused })
}

/// The input that carries the token ids, among `candidates` (input names): `input_ids` when
/// it is one of them (Hugging Face's name), else the only candidate; `None` when neither
/// rule picks one. Every part of memc that needs the token input decides with this rule.
pub fn token_input<'a>(candidates: &[&'a str]) -> Option<&'a str> {
    match candidates {
        [one] => Some(one),
        many => many.iter().copied().find(|&n| n == TOKEN_INPUT),
    }
}

/// Hugging Face's name of the token input.
pub const TOKEN_INPUT: &str = "input_ids";

/// The name of the training step's loss output.
pub const LOSS_OUTPUT: &str = "loss";

/// What the autodiff pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AutodiffStats {
    /// Trained weight tensors.
    pub trained_tensors: usize,
    /// Trained parameters (elements).
    pub trained_params: usize,
    /// Weights left frozen.
    pub frozen_tensors: usize,
    /// Nodes added for the backward pass (B and W).
    pub backward_nodes: usize,
}

crate::pass_stats! {
    AutodiffStats,
    fn summary(&self) -> String {
        format!(
            "{} weights trained ({} parameters), {} frozen; {} backward nodes",
            self.trained_tensors, self.trained_params, self.frozen_tensors, self.backward_nodes
        )
    }
}

fn param_name(g: &Graph, v: ValueId) -> String {
    match &g.value(v).def {
        ValueDef::Param { name, .. } => name.clone(),
        _ => unreachable!("weights are params"),
    }
}

/// Differentiates the `loss` output with respect to the trainable float weights (B and W
/// phases, [`crate::autodiff`]) and declares each gradient on the graph ([`Graph::add_grad`]).
pub fn autodiff(g: &mut Graph, trainable: &Trainable) -> Result<AutodiffStats, TrainError> {
    let loss = g
        .outputs()
        .iter()
        .find(|(n, _)| n == LOSS_OUTPUT)
        .map(|&(_, v)| v)
        .ok_or(TrainError::Order(
            "autodiff differentiates the `loss` output: run the loss pass first",
        ))?;
    let reversible = g.nodes().iter().any(|n| n.op == Op::RevCouple);
    let matcher = trainable.matcher(reversible)?;
    let weights: Vec<ValueId> = g
        .weights()
        .filter(|&w| g.value(w).ty.dtype.is_float())
        .collect();
    let trained: Vec<ValueId> = weights
        .iter()
        .copied()
        .filter(|&w| {
            matcher
                .as_ref()
                .is_none_or(|r| r.is_match(&param_name(g, w)))
        })
        .collect();
    if trained.is_empty() {
        let example = weights
            .first()
            .map(|&w| param_name(g, w))
            .unwrap_or_default();
        return Err(TrainError::NothingTrainable(example));
    }
    let before = g.nodes().len();
    // The fused LM-head loss computes its gradients with the loss (each chunk's logits once);
    // the loss output moves to the new loss value and the `lm_head_ce` node goes.
    let grads = match crate::autodiff::differentiate_fused_loss(g, loss, &trained)? {
        Some((new_loss, grads)) => {
            g.map_outputs(|v| if v == loss { new_loss } else { v });
            grads
        }
        None => differentiate(g, loss, &trained)?,
    };
    let backward_nodes = g.nodes().len() - before;
    for &(p, gr) in &grads {
        g.add_grad(p, gr);
    }
    let stats = AutodiffStats {
        trained_tensors: grads.len(),
        trained_params: grads.iter().map(|&(p, _)| g.value(p).ty.numel()).sum(),
        frozen_tensors: weights.len() - trained.len(),
        backward_nodes,
    };
    g.compact();
    Ok(stats)
}

/// Nodes a gradient pass added.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Nodes added.
    pub nodes: usize,
}

crate::pass_stats! {
    UpdateStats,
    fn summary(&self) -> String {
        format!("{} nodes", self.nodes)
    }
}

/// Scales the declared gradients so that their global norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`).
pub fn clip_grads(g: &mut Graph, max_norm: f64) -> Result<UpdateStats, TrainError> {
    if g.grads().is_empty() {
        return Err(TrainError::Order(
            "clip scales the declared gradients: run the autodiff pass first",
        ));
    }
    let before = g.nodes().len();
    let grads = g.take_grads();
    let mut b = Builder::new(g, Phase::Update, "optimizer");
    let clipped = clip(&mut b, &grads, max_norm).map_err(TrainError::Build)?;
    for (p, gr) in clipped {
        g.add_grad(p, gr);
    }
    Ok(UpdateStats {
        nodes: g.nodes().len() - before,
    })
}

/// Gradient accumulation (`accumulate`): each declared gradient `g` of a weight `p` becomes
/// `sum + g·scale`, where `sum` is a persistent f32 tensor `memc.accum:<p>` (optimizer
/// state, zero at the start) and `scale` the input [`ACCUM_SCALE_INPUT`]; the sum's update is
/// 0 when [`APPLY_INPUT`] is 1 and the new sum otherwise. The optimizer pass then gates every
/// other update by the same input (weights and optimizer state change only on the step's
/// last microbatch), so K runs with scales summing to 1 make the whole batch's step.
pub fn accumulate_grads(g: &mut Graph) -> Result<UpdateStats, TrainError> {
    if g.grads().is_empty() {
        return Err(TrainError::Order(
            "accumulate sums the declared gradients: run the autodiff pass first",
        ));
    }
    let before = g.nodes().len();
    let scale = scalar_input(g, ACCUM_SCALE_INPUT);
    let apply = scalar_input(g, APPLY_INPUT);
    let grads = g.take_grads();
    let mut b = Builder::new(g, Phase::Update, "accumulate");
    let half = b.scalar(DType::F32, 0.5);
    let applying = b
        .binary(BinaryOp::Greater, apply, half)
        .map_err(TrainError::Build)?;
    let mut sums = vec![];
    for &(p, gr) in &grads {
        let name = param_name(b.g, p);
        let build = |b: &mut Builder| -> Result<(ValueId, ValueId), String> {
            // The sum in f32 (or f64 for f64 weights), whatever the weight's type.
            let dt = b.dtype(p);
            let acc = if dt == DType::F64 { dt } else { DType::F32 };
            let ty = TensorType::new(acc, b.shape(p));
            let sum = b.g.add_param(
                format!("{ACCUM_PREFIX}{name}"),
                ParamRole::OptimizerState,
                ty,
                None,
            );
            let gr = b.cast(gr, acc)?;
            let s = b.cast(scale, acc)?;
            let part = b.mul(gr, s)?;
            let total = b.add(sum, part)?;
            let zero = b.scalar(acc, 0.0);
            let next = b.op(Op::Where, &[applying, zero, total])?;
            b.g.add_update(sum, next);
            Ok((p, b.cast(total, dt)?))
        };
        sums.push(build(&mut b).map_err(TrainError::Build)?);
    }
    for (p, total) in sums {
        g.add_grad(p, total);
    }
    Ok(UpdateStats {
        nodes: g.nodes().len() - before,
    })
}

/// With gradient accumulation ([`APPLY_INPUT`] among the inputs), every update but the
/// gradient sums' keeps its target unless the input is 1.
fn gate_updates(g: &mut Graph) -> Result<(), String> {
    let Some(apply) = g
        .inputs()
        .iter()
        .copied()
        .find(|&v| matches!(&g.value(v).def, ValueDef::Input { name } if name == APPLY_INPUT))
    else {
        return Ok(());
    };
    let updates: Vec<(ValueId, ValueId)> = g.updates().to_vec();
    let mut b = Builder::new(g, Phase::Update, "accumulate");
    let half = b.scalar(DType::F32, 0.5);
    let applying = b.binary(BinaryOp::Greater, apply, half)?;
    let mut gated = vec![];
    for (target, new) in updates {
        if param_name(b.g, target).starts_with(ACCUM_PREFIX) {
            gated.push((target, new));
            continue;
        }
        gated.push((target, b.op(Op::Where, &[applying, new, target])?));
    }
    g.set_updates(gated);
    Ok(())
}

/// The scalar f32 input `name`, added when missing.
fn scalar_input(g: &mut Graph, name: &str) -> ValueId {
    g.inputs()
        .iter()
        .copied()
        .find(|&v| matches!(&g.value(v).def, ValueDef::Input { name: n } if n == name))
        .unwrap_or_else(|| g.add_input(name, TensorType::new(DType::F32, vec![])))
}

/// The evaluation step of a training run (`--eval`): the forward graph `g` with the training
/// loss (`opts`' loss and compute dtype), no gradients and no optimizer, blocks lowered. Its
/// weights are the training step's, by name.
pub fn build_eval(g: &mut Graph, opts: &TrainOptions) -> Result<(), TrainError> {
    crate::blocks::lower_blocks_keeping(g, &[]).map_err(TrainError::Lower)?;
    crate::precision::lower_precision(g, opts.compute_dtype).map_err(TrainError::Precision)?;
    add_loss(g, opts.loss, opts.fused_loss)?;
    crate::blocks::lower_blocks_keeping(g, &[]).map_err(TrainError::Lower)?;
    g.compact();
    Ok(())
}

/// The step's scalar inputs, added the first time they are asked for.
fn step_inputs(g: &mut Graph) -> Scalars {
    Scalars {
        lr: scalar_input(g, LR_INPUT),
        wd: scalar_input(g, WEIGHT_DECAY_INPUT),
        step: scalar_input(g, STEP_INPUT),
    }
}

/// Consumes the declared gradients: one optimizer update per trained weight (and its state)
/// reading the step's scalar inputs; with `grad_outputs`, each gradient is also an output
/// `grad:<name>`. Removes what the step no longer reads.
pub fn add_optimizer(
    g: &mut Graph,
    optimizer: &Optimizer,
    grad_outputs: bool,
) -> Result<UpdateStats, TrainError> {
    if g.grads().is_empty() {
        return Err(TrainError::Order(
            "the optimizer updates the weights from their declared gradients: run the autodiff pass first",
        ));
    }
    let before = g.nodes().len();
    let scalars = step_inputs(g);
    let grads = g.take_grads();
    let mut b = Builder::new(g, Phase::Update, "optimizer");
    for &(p, grad) in &grads {
        let name = param_name(b.g, p);
        update(&mut b, optimizer, &scalars, p, grad, &name).map_err(TrainError::Build)?;
    }
    gate_updates(g).map_err(TrainError::Build)?;
    let nodes = g.nodes().len() - before;
    if grad_outputs {
        for &(p, gr) in &grads {
            let name = param_name(g, p);
            g.add_output(format!("{GRAD_OUTPUT_PREFIX}{name}"), gr);
        }
    }
    g.compact();
    Ok(UpdateStats { nodes })
}

/// The prefix of the gradient outputs of [`add_optimizer`] with `grad_outputs`.
pub const GRAD_OUTPUT_PREFIX: &str = "grad:";

/// Builds the training step in place (see the module docs), verifying after every pass.
pub fn build_training(g: &mut Graph, opts: &TrainOptions) -> Result<TrainStats, TrainError> {
    build_training_with(g, opts, &mut crate::manager::PassManager::new())
}

/// [`build_training`] through `pm` (dumps, timing): the passes `lower-blocks` (all blocks but
/// `residual` and `rev_couple`), `precision`, `loss`, `autodiff`, `clip`, `optimizer`,
/// `reconstruct`, `remat`, `partition` and `lower-blocks`, each from the pass table.
pub fn build_training_with(
    g: &mut Graph,
    opts: &TrainOptions,
    pm: &mut crate::manager::PassManager,
) -> Result<TrainStats, TrainError> {
    // Blocks become their steps; `residual` stays (its VJP is the identity to both operands)
    // until rematerialisation has found the layers with it, `rev_couple` until the backward
    // pass has inverted it.
    pm.run(
        g,
        "lower-blocks",
        "lower-blocks{keep=residual,rev_couple}".into(),
        |g| {
            crate::blocks::lower_blocks_keeping(g, &[Op::Residual, Op::RevCouple])
                .map_err(TrainError::Lower)
        },
    )?;
    let dtype = opts.compute_dtype;
    pm.run(
        g,
        "precision",
        format!("precision{{dtype={}}}", dtype.name()),
        |g| crate::precision::lower_precision(g, dtype).map_err(TrainError::Precision),
    )?;
    let loss = pm.run(
        g,
        "loss",
        match opts.loss {
            Loss::NextTokenCe => format!("loss{{fused={}}}", opts.fused_loss),
            l => format!("loss{{fused={} kind={}}}", opts.fused_loss, l.name()),
        },
        |g| add_loss(g, opts.loss, opts.fused_loss),
    )?;
    let ad = pm.run(
        g,
        "autodiff",
        format!("autodiff{{trainable={}}}", opts.trainable.text()),
        |g| autodiff(g, &opts.trainable),
    )?;
    let mut update_nodes = 0;
    if opts.grad_accum.is_some() {
        update_nodes += pm
            .run(g, "accumulate", "accumulate".into(), accumulate_grads)?
            .nodes;
    }
    if let Some(max_norm) = opts.clip_grad_norm {
        update_nodes += pm
            .run(g, "clip", format!("clip{{max-norm={max_norm}}}"), |g| {
                clip_grads(g, max_norm)
            })?
            .nodes;
    }
    update_nodes += pm
        .run(
            g,
            "optimizer",
            format!(
                "optimizer{{{}}}",
                optimizer_text(&opts.optimizer, opts.grad_outputs)
            ),
            |g| add_optimizer(g, &opts.optimizer, opts.grad_outputs),
        )?
        .nodes;
    let has_couplings = g.nodes().iter().any(|n| n.op == Op::RevCouple);
    let reconstruct = match opts.rev_backward {
        RevBackward::Reconstruct { check } if has_couplings => Some(pm.run(
            g,
            "reconstruct",
            format!("reconstruct{{check={check}}}"),
            |g| reconstruct(g, check).map_err(TrainError::Reconstruct),
        )?),
        _ => None,
    };
    let remat = match &opts.remat {
        Some(policy) => Some(
            pm.run(g, "remat", format!("remat{{{}}}", policy.text()), |g| {
                rematerialize(g, policy).map_err(TrainError::Remat)
            })?,
        ),
        None => None,
    };
    let partition = match opts.pipeline_chunks {
        Some(c) => Some(
            pm.run(g, "partition", format!("partition{{chunks={c}}}"), |g| {
                crate::partition::partition(g, c).map_err(TrainError::Partition)
            })?,
        ),
        None => None,
    };
    pm.run(g, "lower-blocks", "lower-blocks".into(), |g| {
        crate::blocks::lower_blocks_keeping(g, &[]).map_err(TrainError::Lower)
    })?;
    Ok(TrainStats {
        trained_tensors: ad.trained_tensors,
        trained_params: ad.trained_params,
        frozen_tensors: ad.frozen_tensors,
        backward_nodes: ad.backward_nodes,
        update_nodes,
        remat,
        fused_loss: loss.fused,
        reconstruct,
        partition,
    })
}

/// The optimizer pass's options as text (`kind=adamw beta1=0.9 ...`).
pub fn optimizer_text(o: &Optimizer, grad_outputs: bool) -> String {
    let mut s = match *o {
        Optimizer::Sgd { momentum } => format!("kind=sgd momentum={momentum}"),
        Optimizer::AdamW { beta1, beta2, eps } => {
            format!("kind=adamw beta1={beta1} beta2={beta2} eps={eps}")
        }
    };
    if grad_outputs {
        s += " grad-outputs=true";
    }
    s
}

/// The integer `[batch, seq]` input and the `[batch, seq, vocab]` float output.
fn find_logits(g: &Graph) -> Result<(ValueId, ValueId), TrainError> {
    let ids: Vec<ValueId> = g
        .inputs()
        .iter()
        .copied()
        .filter(|&v| {
            matches!(g.value(v).ty.dtype, DType::I64 | DType::I32) && g.value(v).ty.rank() == 2
        })
        .collect();
    let names: Vec<&str> = ids
        .iter()
        .map(|&v| match &g.value(v).def {
            ValueDef::Input { name } => name.as_str(),
            _ => "",
        })
        .collect();
    let ids = token_input(&names)
        .and_then(|n| names.iter().position(|&m| m == n))
        .map(|i| ids[i])
        .ok_or_else(|| {
            TrainError::NoLogits("the model has no single integer [batch, seq] input".into())
        })?;
    let (bsz, seq) = (g.value(ids).ty.shape[0], g.value(ids).ty.shape[1]);
    if seq < 2 {
        return Err(TrainError::NoLogits(format!(
            "the sequence length is {seq}; next-token prediction needs at least 2"
        )));
    }
    let fits = |v: ValueId| {
        let t = &g.value(v).ty;
        t.dtype.is_float() && t.rank() == 3 && t.shape[0] == bsz && t.shape[1] == seq
    };
    let outs: Vec<&(String, ValueId)> = g.outputs().iter().filter(|(_, v)| fits(*v)).collect();
    let logits = match outs.as_slice() {
        [one] => one.1,
        many => many
            .iter()
            .find(|(n, _)| n == "logits")
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let shapes: Vec<String> = g
                    .outputs()
                    .iter()
                    .map(|(n, v)| format!("`{n}` {}", g.value(*v).ty))
                    .collect();
                TrainError::NoLogits(format!("outputs are {}", shapes.join(", ")))
            })?,
    };
    Ok((ids, logits))
}

/// `-mean(log_softmax(logits[:, :-1])[targets])` with targets `ids[:, 1:]`, in f32.
/// The shifted labels' targets `[rows, 1]` with ignored positions set to 0, and each row's
/// weight in the loss `[rows, 1]` (in `acc`): `1/count` where the label is kept, else 0.
fn kept_targets(
    b: &mut Builder,
    labels: ValueId,
    rows: usize,
    acc: DType,
) -> Result<(ValueId, ValueId), String> {
    let (bsz, seq) = (b.shape(labels)[0], b.shape(labels)[1]);
    let t = b.op(
        Op::Slice {
            starts: vec![0, 1],
            ends: vec![bsz, seq],
            steps: vec![1, 1],
        },
        &[labels],
    )?;
    let t = b.reshape(t, vec![rows, 1])?;
    let ignore = b.scalar(b.dtype(labels), IGNORE_INDEX as f64);
    let skip = b.binary(BinaryOp::Equal, t, ignore)?;
    let zero_t = b.scalar(b.dtype(labels), 0.0);
    let safe = b.op(Op::Where, &[skip, zero_t, t])?;
    let (zero, one) = (b.scalar(acc, 0.0), b.scalar(acc, 1.0));
    let keep = b.op(Op::Where, &[skip, zero, one])?;
    let count = b.reduce(ReduceKind::Sum, keep, vec![0, 1], false)?;
    // A batch with no kept label weighs nothing (the training loop refuses a whole step of
    // them; an accumulated microbatch may have none).
    let count = b.binary(BinaryOp::Max, count, one)?;
    let weights = b.binary(BinaryOp::Div, keep, count)?;
    Ok((safe, weights))
}

fn next_token_ce(
    g: &mut Graph,
    ids: ValueId,
    labels: Option<ValueId>,
    logits: ValueId,
) -> Result<ValueId, String> {
    let (bsz, seq, vocab) = {
        let s = &g.value(logits).ty.shape;
        (s[0], s[1], s[2])
    };
    let mut b = Builder::new(g, Phase::Forward, "loss");
    let logits = b.cast(logits, DType::F32)?;
    let shifted = b.op(
        Op::Slice {
            starts: vec![0, 0, 0],
            ends: vec![bsz, seq - 1, vocab],
            steps: vec![1; 3],
        },
        &[logits],
    )?;
    let logp = b.op(Op::LogSoftmax { axis: 2 }, &[shifted])?;
    if let Some(labels) = labels {
        // Σ over the kept positions of log p(target), divided by their count.
        let logp = b.reshape(logp, vec![bsz * (seq - 1), vocab])?;
        let (targets, weights) = kept_targets(&mut b, labels, bsz * (seq - 1), DType::F32)?;
        let picked = b.op(Op::GatherElements { axis: 1 }, &[logp, targets])?;
        let weighted = b.mul(picked, weights)?;
        let total = b.reduce(ReduceKind::Sum, weighted, vec![0, 1], false)?;
        return b.neg(total);
    }
    let targets = b.op(
        Op::Slice {
            starts: vec![0, 1],
            ends: vec![bsz, seq],
            steps: vec![1, 1],
        },
        &[ids],
    )?;
    let targets = b.reshape(targets, vec![bsz, seq - 1, 1])?;
    let picked = b.op(Op::GatherElements { axis: 2 }, &[logp, targets])?;
    let mean = b.reduce(ReduceKind::Mean, picked, vec![0, 1, 2], false)?;
    b.neg(mean)
}

/// The LM head: `logits = h·w (+ b)` with `w` a matrix, `b` a vector, and the logits read by
/// nothing else: (h, w, b).
fn lm_head(g: &Graph, logits: ValueId) -> Option<(ValueId, ValueId, Option<ValueId>)> {
    let only_reader = |v: ValueId| g.nodes().iter().filter(|m| m.inputs.contains(&v)).count() == 1;
    let mut p = g.producer(logits)?;
    // Under bf16 the output is the f32 cast of the head's result.
    if let Op::Cast { .. } = g.node(p).op {
        let inner = g.node(p).inputs[0];
        if !only_reader(inner) {
            return None;
        }
        p = g.producer(inner)?;
    }
    // A bias (BERT's MLM decoder).
    let mut bias = None;
    if g.node(p).op == Op::Binary(BinaryOp::Add) {
        let (a, c) = (g.node(p).inputs[0], g.node(p).inputs[1]);
        let (m, b) = if g.value(c).ty.rank() == 1 {
            (a, c)
        } else {
            (c, a)
        };
        if g.value(b).ty.rank() != 1 || !only_reader(m) {
            return None;
        }
        bias = Some(b);
        p = g.producer(m)?;
    }
    let n = g.node(p);
    let (h, w) = (n.inputs.first().copied()?, n.inputs.get(1).copied()?);
    let readers = g
        .nodes()
        .iter()
        .filter(|m| m.inputs.contains(&logits))
        .count();
    (n.op == Op::MatMul
        && readers == 0
        && g.value(w).ty.rank() == 2
        && g.value(h).ty.rank() == 3
        && bias.is_none_or(|b| g.value(b).ty.shape == [g.value(w).ty.shape[1]]))
    .then_some((h, w, bias))
}

/// Rows per chunk at least, for GEMM efficiency: thin chunks stream the whole `[d, V]` head
/// weight three times each (logits, dh, dw) for little arithmetic. 256 rather than 128: 9%
/// faster steps for the 4-layer d256 Llama at 4 × 128 (8% more arena), 5% for the 8-layer d512
/// (`scripts/bench-cpu-real.py`, BENCHMARKS.md).
const GEMM_ROWS: usize = 256;
/// A chunk's logits are kept under this when [`GEMM_ROWS`] rows would exceed it (huge
/// vocabularies), down to [`MIN_ROWS`].
const CHUNK_BYTES: usize = 64 << 20;
/// Rows per chunk at the very least.
const MIN_ROWS: usize = 16;

/// Next-token cross-entropy through the fused, chunked `lm_head_ce`: chunks of about `N·d/V`
/// rows (a chunk's logits about the size of `h`), but at least [`GEMM_ROWS`] rows so the
/// chunks' GEMMs run at full speed, unless that many rows of logits would exceed
/// [`CHUNK_BYTES`]; and at least two chunks, so the whole logits are never held.
fn fused_next_token_ce(
    g: &mut Graph,
    ids: ValueId,
    labels: Option<ValueId>,
    h: ValueId,
    w: ValueId,
    bias: Option<ValueId>,
) -> Result<(ValueId, FusedLoss), String> {
    let (bsz, seq, d) = {
        let s = &g.value(h).ty.shape;
        (s[0], s[1], s[2])
    };
    let vocab = g.value(w).ty.shape[1];
    let n = bsz * (seq - 1);
    let chunks = vocab.div_ceil(d.max(1)).clamp(1, n);
    let by_h = n.div_ceil(chunks);
    let gemm_rows = GEMM_ROWS.min((CHUNK_BYTES / (vocab * 4).max(1)).max(MIN_ROWS));
    let chunk = by_h.max(gemm_rows).clamp(1, n);
    // Never the whole logits at once: at least two chunks.
    let chunk = if chunk >= n && n > 1 {
        n.div_ceil(2)
    } else {
        chunk
    };
    let mut b = Builder::new(g, Phase::Forward, "loss");
    let shifted = b.op(
        Op::Slice {
            starts: vec![0, 0, 0],
            ends: vec![bsz, seq - 1, d],
            steps: vec![1; 3],
        },
        &[h],
    )?;
    let rows = b.reshape(shifted, vec![n, d])?;
    let mut operands = match labels {
        Some(labels) => {
            let acc = memc_ir::loss_dtype(b.dtype(h));
            let (targets, weights) = kept_targets(&mut b, labels, n, acc)?;
            vec![rows, w, targets, weights]
        }
        None => {
            let targets = b.op(
                Op::Slice {
                    starts: vec![0, 1],
                    ends: vec![bsz, seq],
                    steps: vec![1, 1],
                },
                &[ids],
            )?;
            let targets = b.reshape(targets, vec![n, 1])?;
            vec![rows, w, targets]
        }
    };
    operands.extend(bias);
    let loss = b.op(
        Op::LmHeadCe {
            chunk,
            weighted: labels.is_some(),
        },
        &operands,
    )?;
    let stats = FusedLoss {
        chunks: n.div_ceil(chunk),
        logits_bytes: (n * vocab * 4) as u64,
        chunk_bytes: (chunk * vocab * 4) as u64,
    };
    Ok((loss, stats))
}

struct Scalars {
    lr: ValueId,
    wd: ValueId,
    step: ValueId,
}

/// `clip_grad_norm_`: scale every gradient by `min(max_norm / (‖g‖ + 1e-6), 1)`.
fn clip(
    b: &mut Builder,
    grads: &[(ValueId, ValueId)],
    max_norm: f64,
) -> Result<Vec<(ValueId, ValueId)>, String> {
    let mut total = None;
    for &(_, gr) in grads {
        let sq = b.mul(gr, gr)?;
        let axes = (0..b.shape(sq).len()).collect();
        let s = b.reduce(ReduceKind::Sum, sq, axes, false)?;
        let s = b.cast(s, DType::F32)?;
        total = Some(match total {
            Some(t) => b.add(t, s)?,
            None => s,
        });
    }
    let total = total.ok_or("no gradients")?;
    let norm = b.unary(UnaryOp::Sqrt, total)?;
    let denom = b.add_scalar(norm, 1e-6)?;
    let max = b.scalar(DType::F32, max_norm);
    let coef = b.div(max, denom)?;
    let one = b.scalar(DType::F32, 1.0);
    let coef = b.binary(BinaryOp::Min, coef, one)?;
    grads
        .iter()
        .map(|&(p, gr)| {
            let c = b.cast(coef, b.dtype(gr))?;
            Ok((p, b.mul(gr, c)?))
        })
        .collect()
}

/// An optimizer-state tensor shaped like `p`. It has no data: state starts at zero, which
/// backends materialise at the first step (no zeros are allocated at compile time).
fn state(b: &mut Builder, p: ValueId, name: String) -> ValueId {
    let ty = b.g.value(p).ty.clone();
    b.g.add_param(name, ParamRole::OptimizerState, ty, None)
}

fn update(
    b: &mut Builder,
    opt: &Optimizer,
    s: &Scalars,
    p: ValueId,
    grad: ValueId,
    name: &str,
) -> Result<(), String> {
    let dt = b.dtype(p);
    let lr = b.cast(s.lr, dt)?;
    let wd = b.cast(s.wd, dt)?;
    match *opt {
        Optimizer::Sgd { momentum } => {
            // L2 weight decay folded into the gradient, as torch.optim.SGD does.
            let decay = b.mul(p, wd)?;
            let gr = b.add(grad, decay)?;
            let direction = if momentum != 0.0 {
                let buf = state(b, p, format!("sgd.momentum.{name}"));
                let kept = b.mul_scalar(buf, momentum)?;
                let new_buf = b.add(kept, gr)?;
                b.g.add_update(buf, new_buf);
                new_buf
            } else {
                gr
            };
            let delta = b.mul(direction, lr)?;
            let new_p = b.sub(p, delta)?;
            b.g.add_update(p, new_p);
        }
        Optimizer::AdamW { beta1, beta2, eps } => {
            let m = state(b, p, format!("adamw.exp_avg.{name}"));
            let v = state(b, p, format!("adamw.exp_avg_sq.{name}"));
            // The scalars first, so that the tensor work below is one chain that fusion makes
            // one pass over p, m, v and the gradient. 1 − lr·wd:
            let lw = b.mul(lr, wd)?;
            let keep = {
                let n = b.neg(lw)?;
                b.add_scalar(n, 1.0)?
            };
            // bias corrections 1 − βᵗ, computed in f32 like PyTorch's scalar math
            let bc = |b: &mut Builder, beta: f64| -> Result<ValueId, String> {
                let base = b.scalar(DType::F32, beta);
                let pw = b.binary(BinaryOp::Pow, base, s.step)?;
                let n = b.neg(pw)?;
                let c = b.add_scalar(n, 1.0)?;
                b.cast(c, dt)
            };
            let bc1 = bc(b, beta1)?;
            let bc2 = bc(b, beta2)?;
            let sbc2 = b.unary(UnaryOp::Sqrt, bc2)?;
            let step_size = b.div(lr, bc1)?;
            // p ← p·(1 − lr·wd)
            let decayed = b.mul(p, keep)?;
            // m ← β1·m + (1−β1)·g ;  v ← β2·v + (1−β2)·g²
            let m1 = b.mul_scalar(m, beta1)?;
            let g1 = b.mul_scalar(grad, 1.0 - beta1)?;
            let new_m = b.add(m1, g1)?;
            let v1 = b.mul_scalar(v, beta2)?;
            let gg = b.mul(grad, grad)?;
            let g2 = b.mul_scalar(gg, 1.0 - beta2)?;
            let new_v = b.add(v1, g2)?;
            // p ← p − lr/bc1 · m / (√v/√bc2 + eps)
            let sv = b.unary(UnaryOp::Sqrt, new_v)?;
            let denom = b.div(sv, sbc2)?;
            let denom = b.add_scalar(denom, eps)?;
            let ratio = b.div(new_m, denom)?;
            let delta = b.mul(ratio, step_size)?;
            let new_p = b.sub(decayed, delta)?;
            b.g.add_update(p, new_p);
            b.g.add_update(m, new_m);
            b.g.add_update(v, new_v);
        }
    }
    Ok(())
}
