//! Training: the CLI's training options, building the training step (memc-passes), and the
//! reference backend's training loop (the interpreter), which prints one JSON line per step.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use memc_ir::{DType, Graph, Tensor, ValueDef};
use memc_passes::manager::PassManager;
use memc_passes::remat::Policy;
use memc_passes::train::{self, Loss, Optimizer, TrainError, TrainOptions, TrainStats, Trainable};

/// The loss names of the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossArg {
    /// Mean cross-entropy of logits[:, :-1] against input_ids[:, 1:].
    NextTokenCe,
    /// transformers' causal-LM loss with labels: mean cross-entropy of logits[:, :-1] against
    /// labels[:, 1:] over the labels that are not -100 (train with --labels FILE.npy).
    CausalLm,
}

/// The optimizer names of the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OptimizerArg {
    /// torch.optim.SGD (with --momentum).
    Sgd,
    /// torch.optim.AdamW (betas 0.9/0.999, eps 1e-8 unless given).
    Adamw,
}

/// Options that shape the training program.
#[derive(Debug, Clone, Args)]
pub struct TrainProgramArgs {
    /// The loss.
    #[arg(long, value_enum, default_value = "next-token-ce")]
    pub loss: LossArg,
    /// The optimizer.
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerArg,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f64,
    /// AdamW betas, as B1,B2.
    #[arg(long, value_delimiter = ',', default_values_t = [0.9, 0.999])]
    pub betas: Vec<f64>,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Which weights are trained: `all`, `adapters` (the adapters of --reversible), or a
    /// regular expression searched in weight names. Default: `adapters` with --reversible
    /// (MEFT's setting), else `all`.
    #[arg(long)]
    pub trainable: Option<String>,
    /// Clip the global gradient norm to this value.
    #[arg(long, value_name = "MAX_NORM")]
    pub clip_grad_norm: Option<f64>,
    /// What the backward pass keeps: `auto` recomputes cheap forward values when that saves
    /// memory (a minimum cut; with --activation-budget, the fewest FLOPs within the budget);
    /// `full` keeps only each layer's input inside the layers (per-layer checkpointing);
    /// `none` keeps every value a gradient reads.
    #[arg(long, value_enum, default_value = "auto")]
    pub remat: RematArg,
    /// At most this much saved activation memory (with --remat auto): bytes (`1500000000`,
    /// `1.5GiB`, `800MB`) or a fraction of what the backward keeps without remat (`0.5`,
    /// `50%`). Below the smallest feasible budget (the layers' inputs and the minimum cut
    /// outside the layers, reported as `min_budget_bytes`) it is an error
    /// that names that budget.
    #[arg(long, value_name = "BYTES|FRACTION")]
    pub activation_budget: Option<String>,
    /// Compute the loss from the full `[B, S, V]` logits instead of the fused, chunked LM-head
    /// cross-entropy (which never holds them whole).
    #[arg(long)]
    pub no_fused_loss: bool,
    /// With --reversible: also output each reversible layer's reconstruction drift,
    /// max|x_reconstructed − x| / max|x| over its inputs, every step (keeps the inputs for
    /// the comparison), and warn when it passes --rev-check-threshold.
    #[arg(long)]
    pub rev_check: bool,
    /// The drift --rev-check warns past (default 1e-3 in f32, 5e-2 in bf16).
    #[arg(long, value_name = "X")]
    pub rev_check_threshold: Option<f64>,
    /// With --reversible: keep the reversible stack's activations (ordinary autodiff)
    /// instead of reconstructing them; the reference for gradients and memory.
    #[arg(long)]
    pub rev_store: bool,
    /// Compute dtype of the forward and backward passes (bf16 keeps f32 master weights and an
    /// f32 optimizer).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}

impl TrainProgramArgs {
    /// A flag given that only a training build reads (`None`: none), for the error without
    /// `--train`.
    pub fn training_only_flag(&self) -> Option<&'static str> {
        [
            (self.activation_budget.is_some(), "--activation-budget"),
            (self.clip_grad_norm.is_some(), "--clip-grad-norm"),
            (self.trainable.is_some(), "--trainable"),
            (self.rev_check, "--rev-check"),
            (self.rev_check_threshold.is_some(), "--rev-check-threshold"),
            (self.rev_store, "--rev-store"),
            (self.no_fused_loss, "--no-fused-loss"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }
}

/// Compute dtypes of the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// fp32 everywhere.
    F32,
    /// bf16 compute, fp32 master weights.
    Bf16,
}

/// Rematerialisation policies of the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RematArg {
    /// Keep every forward value the backward pass reads.
    None,
    /// Minimum-cut choice of what to keep; cheap ops are recomputed.
    Auto,
    /// Per-layer checkpointing: keep each layer's input, recompute the rest of the layer.
    Full,
}

/// Parses `--activation-budget` (see [`TrainProgramArgs::activation_budget`]).
pub fn parse_budget(text: &str) -> Result<memc_passes::remat::Budget> {
    memc_passes::remat::Budget::parse(text).map_err(|e| anyhow!("--activation-budget {e}"))
}

/// The library's training options for the CLI's arguments (every flag checked here, so the
/// library's errors never need to name one).
pub fn train_options(args: &TrainProgramArgs) -> Result<TrainOptions> {
    if args.betas.len() != 2 || args.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        bail!(
            "--betas takes two values in [0, 1), as B1,B2 (e.g. 0.9,0.999), got {:?}",
            args.betas
        );
    }
    let optimizer = match args.optimizer {
        OptimizerArg::Sgd => Optimizer::Sgd {
            momentum: args.momentum,
        },
        OptimizerArg::Adamw => Optimizer::AdamW {
            beta1: args.betas[0],
            beta2: args.betas[1],
            eps: args.eps,
        },
    };
    if let Some(c) = args.clip_grad_norm {
        if !(c > 0.0 && c.is_finite()) {
            bail!("--clip-grad-norm must be a positive number, got {c}");
        }
    }
    if let Some(t) = args.rev_check_threshold {
        if !(t > 0.0 && t.is_finite()) {
            bail!("--rev-check-threshold must be a positive number, got {t}");
        }
    }
    if !(args.eps > 0.0 && args.eps.is_finite()) {
        bail!("--eps must be a positive number, got {}", args.eps);
    }
    if !(0.0..1.0).contains(&args.momentum) {
        bail!("--momentum must be in [0, 1), got {}", args.momentum);
    }
    if args.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
        bail!("--betas must each be in [0, 1), got {:?}", args.betas);
    }
    Ok(TrainOptions {
        loss: match args.loss {
            LossArg::NextTokenCe => Loss::NextTokenCe,
            LossArg::CausalLm => Loss::CausalLm,
        },
        optimizer,
        clip_grad_norm: args.clip_grad_norm,
        trainable: args
            .trainable
            .as_deref()
            .map_or(Trainable::Default, Trainable::parse),
        fused_loss: !args.no_fused_loss,
        remat: match (args.remat, &args.activation_budget) {
            (RematArg::None, None) => None,
            (RematArg::Auto, None) => Some(Policy::MinCut),
            (RematArg::Full, None) => Some(Policy::Full),
            (RematArg::Auto, Some(b)) => Some(Policy::Budget(parse_budget(b)?)),
            (other, Some(_)) => bail!(
                "--activation-budget needs --remat auto (the default), not --remat {}",
                if other == RematArg::Full {
                    "full"
                } else {
                    "none"
                }
            ),
        },
        compute_dtype: match args.dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
        },
        rev_backward: if args.rev_store {
            train::RevBackward::Store
        } else {
            train::RevBackward::Reconstruct {
                check: args.rev_check,
            }
        },
        pipeline_chunks: None,
        grad_outputs: false,
        rev_check_threshold: args.rev_check_threshold,
        grad_accum: None,
    })
}

/// The CLI's training options for the library ([`train_options`]), checked against the graph:
/// the reversible-layer flags need reversible layers.
pub fn options_for(g: &Graph, args: &TrainProgramArgs) -> Result<TrainOptions> {
    let reversible = g.nodes().iter().any(|n| n.op == memc_ir::Op::RevCouple);
    if !reversible && (args.rev_check || args.rev_store) {
        bail!(
            "--{} needs --reversible",
            if args.rev_check {
                "rev-check"
            } else {
                "rev-store"
            }
        );
    }
    if args.rev_check && args.rev_store {
        bail!("--rev-check measures the reconstruction, which --rev-store turns off");
    }
    train_options(args)
}

/// Builds the training step into `g` (which holds the forward graph).
pub fn build(g: &mut Graph, opts: &TrainOptions) -> Result<TrainStats> {
    build_managed(g, opts, &mut PassManager::new())
}

/// [`build`], also splitting the layers into `chunks` pipeline chunks
/// ([`memc_passes::partition`]) and, with `grad_outputs`, outputting every trained weight's
/// gradient as `grad:<name>` (the pipelined runner's program, [`crate::pipe`]).
pub fn build_with(
    g: &mut Graph,
    opts: &TrainOptions,
    chunks: Option<usize>,
    grad_outputs: bool,
) -> Result<TrainStats> {
    let opts = TrainOptions {
        pipeline_chunks: chunks,
        grad_outputs,
        ..opts.clone()
    };
    build_managed(g, &opts, &mut PassManager::new())
}

/// [`build`] through `pm` (dumps, timing); errors in terms of the CLI's flags.
pub fn build_managed(
    g: &mut Graph,
    opts: &TrainOptions,
    pm: &mut PassManager,
) -> Result<TrainStats> {
    train::build_training_with(g, opts, pm).map_err(build_error)
}

/// A training build's error in terms of the CLI's flags.
pub fn build_error(e: TrainError) -> anyhow::Error {
    match e {
        TrainError::NoLogits(_) => anyhow!("--loss next-token-ce: {e}"),
        TrainError::NothingTrainable(_) => anyhow!("--trainable: {e}"),
        TrainError::NoAdapters => {
            anyhow!(
                "--trainable adapters needs --reversible (only reversible layers have adapters)"
            )
        }
        TrainError::BadTrainable(re, msg) => {
            anyhow!("--trainable `{re}` is not a regular expression: {msg}")
        }
        TrainError::Partition(p) => crate::pipe::partition_error(&p),
        TrainError::Remat(r) => remat_error(&r),
        e => anyhow!(e),
    }
}

/// A rematerialisation error in terms of the CLI's flags.
pub fn remat_error(e: &memc_passes::remat::RematError) -> anyhow::Error {
    use memc_passes::remat::RematError;
    match e {
        RematError::Infeasible { min, .. } => anyhow!("{e}; pass --activation-budget {min} or more"),
        RematError::NoLayers => anyhow!(
            "{e}: --remat full and --activation-budget have nothing to checkpoint; use --remat auto, or compile without --no-canonicalize"
        ),
        RematError::AllReversible => anyhow!(
            "{e}: drop --remat full and --activation-budget, or make only the first layers reversible with --rev-layers N"
        ),
        e => anyhow!("{e}"),
    }
}

/// Training data: an integer `[rows, seq]` array, served `batch` rows at a time, cycling (the
/// runtime's reader, giving IR tensors).
pub struct Batches(pub memc_runtime::session::Batches);

impl Batches {
    /// Reads and checks a `.npy` file of token ids.
    pub fn open(path: &Path) -> Result<Batches> {
        Ok(Batches(memc_runtime::session::Batches::open(path)?))
    }

    /// Rows and columns.
    pub fn shape(&self) -> (usize, usize) {
        self.0.shape()
    }

    /// Checks that every token id lies in `0..vocab`.
    pub fn check_vocab(&self, vocab: usize, path: &str) -> Result<()> {
        Ok(self.0.check_vocab(vocab, path)?)
    }

    /// The next `batch` rows (wrapping around the file), as `dtype` (i64 or i32).
    pub fn next_batch(&mut self, batch: usize, dtype: DType) -> Tensor {
        let ids = self.0.next_batch(batch);
        Tensor::from_i64(dtype, vec![batch, ids.len() / batch.max(1)], &ids)
    }
}

/// Run-time hyper-parameters of the loop.
pub struct LoopOptions {
    /// Steps to run.
    pub steps: usize,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// The model's other inputs, held fixed across steps: (name, `.npy` file).
    pub fixed: Vec<(String, std::path::PathBuf)>,
    /// Write a Hugging Face model directory here at the end.
    pub save: Option<std::path::PathBuf>,
    /// Continue from a directory `save` wrote (weights, optimizer state, step and data).
    pub resume: Option<std::path::PathBuf>,
    /// How that directory stores the weights (`crate::checkpoint::apply`).
    pub layout: memc_runtime::program::CheckpointLayout,
    /// Epochs, learning-rate schedule, data order, periodic checkpoints, progress bar.
    pub run: memc_runtime::session::RunOptions,
    /// Also write every step's JSON line here (`--log`).
    pub log: Option<std::path::PathBuf>,
    /// The forward graph, for an evaluation step (`--val-data`; [`attach_eval`]).
    pub eval: Option<Graph>,
}

/// Adds the evaluation step of `forward` (the model before the training step was built) to
/// `host`, laid out in its arena ([`memc_codegen::host::lower_eval`]).
pub fn attach_eval(
    host: &mut memc_codegen::host::HostProgram,
    forward: &Graph,
    opts: &TrainOptions,
    model: &str,
) -> Result<()> {
    let mut g = forward.clone();
    memc_passes::train::build_eval(&mut g, opts)
        .map_err(|e| anyhow!("{model}: the evaluation step: {e}"))?;
    let eval = memc_codegen::host::lower_eval(&g, model, &host.program)
        .map_err(|e| anyhow!("{model}: the evaluation step: {e}"))?;
    host.attach_eval(eval);
    host.program
        .validate()
        .map_err(|e| anyhow!("{model}: the evaluation step: {e}"))?;
    Ok(())
}

/// The program's token input (`input_ids` when the model has one, else its only input other
/// than the `memc.*` scalars) and the other model inputs (fed fixed values, e.g. BERT's
/// attention mask).
pub fn token_input(g: &Graph, model: &str) -> Result<((String, memc_ir::TensorType), Vec<String>)> {
    let mut inputs: Vec<(String, memc_ir::TensorType)> = g
        .inputs()
        .iter()
        .filter_map(|&v| match &g.value(v).def {
            ValueDef::Input { name } if !name.starts_with("memc.") => {
                Some((name.clone(), g.value(v).ty.clone()))
            }
            _ => None,
        })
        .collect();
    let names: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
    let at = match memc_passes::train::token_input(&names) {
        Some(n) => names.iter().position(|&m| m == n).expect("a candidate"),
        None if inputs.is_empty() => bail!("{model}: the training program has no data input"),
        None => bail!(
            "{model}: the model takes inputs {} and none is `input_ids`: training feeds token ids to `input_ids`",
            names.join(", ")
        ),
    };
    let (name, ty) = inputs.remove(at);
    if ty.shape.len() != 2 || !matches!(ty.dtype, DType::I64 | DType::I32) {
        bail!("{model}: the token input `{name}` is {ty}, not an integer [batch, seq]");
    }
    Ok(((name, ty), inputs.into_iter().map(|(n, _)| n).collect()))
}

/// The vocabulary size: the smallest table a `gather` indexes with the token ids.
pub fn vocab_size(g: &Graph, ids: &str) -> Option<usize> {
    let v = g
        .inputs()
        .iter()
        .copied()
        .find(|&v| matches!(&g.value(v).def, ValueDef::Input { name } if name == ids))?;
    g.nodes()
        .iter()
        .filter_map(|n| match n.op {
            memc_ir::Op::Gather { axis } if n.inputs[1] == v => {
                Some(g.value(n.inputs[0]).ty.shape[axis])
            }
            _ => None,
        })
        .min()
}

/// Trains on the reference backend (the interpreter behind the program interface,
/// [`memc_codegen::reference`]) with the runtime's training loop, printing one JSON line per
/// step (`peak_bytes`: the memory plan's peak); returns the losses. The weights are written
/// back into `g` at the end.
pub fn run_reference(
    g: &mut Graph,
    args: &TrainOptions,
    data: &mut Batches,
    data_path: &str,
    opts: &LoopOptions,
    model: &str,
) -> Result<Vec<f64>> {
    let mut host = memc_codegen::host::interface(g, model)?;
    host.program.training = Some(training_info(g, args, model)?);
    host.program.checkpoint = opts.layout.clone();
    let exec = Exec::Reference(g.clone(), memc_passes::plan::plan(g).peak_bytes);
    run_program(g, &host, data, data_path, opts, model, exec)
}

/// Tensors by name, as bytes.
type NamedBytes = Vec<(String, Vec<u8>)>;

/// What runs a lowered program's steps ([`run_program`]).
pub enum Exec<'a> {
    /// Its generated kernels on the cpu backend.
    Kernels,
    /// The reference interpreter on this graph (the program is its interface), reporting
    /// these bytes as its arena (the graph's planned peak).
    Reference(Graph, u64),
    /// A pipelined program's passes on the reference interpreter, given each pass's graph.
    Passes(&'a [memc_codegen::pipeline::PassGraph]),
}

/// What the runtime needs to train `g` (a training program built with `opts`): its token
/// input, loss output, vocabulary, `memc.*` scalar inputs, the optimizer's default weight
/// decay and the drift check.
pub fn training_info(
    g: &Graph,
    opts: &TrainOptions,
    model: &str,
) -> Result<memc_runtime::program::Training> {
    let ((data_input, _), _) = token_input(g, model)?;
    let has = |n: &str| {
        g.inputs()
            .iter()
            .any(|&v| matches!(&g.value(v).def, ValueDef::Input { name } if name == n))
            .then(|| n.to_string())
    };
    Ok(memc_runtime::program::Training {
        vocab: vocab_size(g, &data_input).map(|v| v as u64),
        data_input,
        loss_output: g
            .outputs()
            .first()
            .map(|(n, _)| n.clone())
            .ok_or_else(|| anyhow!("{model}: the training program has no loss output"))?,
        lr_input: has(train::LR_INPUT),
        weight_decay_input: has(train::WEIGHT_DECAY_INPUT),
        step_input: has(train::STEP_INPUT),
        optimizer: match opts.optimizer {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::AdamW { .. } => "adamw",
        }
        .to_string(),
        default_weight_decay: opts.default_weight_decay(),
        drift_outputs: g
            .outputs()
            .iter()
            .filter(|(n, _)| n.starts_with(memc_passes::reconstruct::DRIFT_OUTPUT))
            .map(|(n, _)| n.clone())
            .collect(),
        drift_threshold: opts.drift_threshold(),
        labels_input: has(train::LABELS_INPUT),
        accum: match (
            opts.grad_accum,
            has(train::ACCUM_SCALE_INPUT),
            has(train::APPLY_INPUT),
        ) {
            (Some(k), Some(scale_input), Some(apply_input)) => Some(memc_runtime::program::Accum {
                microbatches: k as u32,
                scale_input,
                apply_input,
            }),
            _ => None,
        },
    })
}

/// The cpu backend's program ([`memc_codegen::host::lower`]); with `training`, the
/// runtime's training description is filled in.
pub fn host_program(
    g: &Graph,
    model: &str,
    training: Option<&TrainOptions>,
) -> Result<memc_codegen::host::HostProgram> {
    let mut host = memc_codegen::host::lower(g, model)?;
    if let Some(args) = training {
        host.program.training = Some(training_info(g, args, model)?);
    }
    Ok(host)
}

/// The parameters of `g` that have data, by name.
fn param_data(g: &Graph) -> HashMap<&str, &Tensor> {
    g.values()
        .iter()
        .filter_map(|v| match &v.def {
            ValueDef::Param {
                name,
                data: Some(t),
                ..
            } => Some((name.as_str(), t)),
            _ => None,
        })
        .collect()
}

/// Writes `g`'s weights (and optimizer state that has data) into the program's arena.
fn load_params(
    g: &Graph,
    program: &memc_runtime::program::Program,
    backend: &mut dyn memc_runtime::Backend,
) -> Result<()> {
    let data = param_data(g);
    for p in &program.params {
        if let Some(t) = data.get(p.slot.name.as_str()) {
            backend.set(&p.slot, t.bytes())?;
        }
    }
    Ok(())
}

/// Writes `g`'s weights as the safetensors file an emitted executable reads.
pub fn write_weights(
    g: &Graph,
    program: &memc_runtime::program::Program,
    path: &Path,
) -> Result<u64> {
    let data = param_data(g);
    let mut tensors = vec![];
    for p in &program.params {
        if p.role != memc_runtime::program::Role::Weight {
            continue;
        }
        let t = data
            .get(p.slot.name.as_str())
            .ok_or_else(|| anyhow!("weight `{}` has no data", p.slot.name))?;
        tensors.push((p.slot.clone(), &t.bytes()[..]));
    }
    let bytes = tensors.iter().map(|(_, b)| b.len() as u64).sum();
    memc_runtime::weights::save_tensors(
        path,
        &tensors,
        HashMap::from([("memc.model".to_string(), program.model.clone())]),
    )?;
    Ok(bytes)
}

/// Trains on the cpu backend (kernels generated through MLIR and LLVM and JIT-compiled, GEMMs
/// on the runtime's library, one arena sized by the plan) with the runtime's training loop,
/// as an emitted executable does, printing one JSON line per step (`peak_bytes` is the
/// arena's size); returns the losses. The weights are written back into `g` at the end.
pub fn run_host(
    g: &mut Graph,
    args: &TrainOptions,
    data: &mut Batches,
    data_path: &str,
    opts: &LoopOptions,
    model: &str,
) -> Result<Vec<f64>> {
    let t0 = Instant::now();
    let mut host = host_program(g, model, Some(args)).map_err(|e| anyhow!("{model}: {e:#}"))?;
    host.program.checkpoint = opts.layout.clone();
    if let Some(forward) = &opts.eval {
        attach_eval(&mut host, forward, args, model)?;
    }
    eprintln!(
        "compiled {} kernels for the host in {:.1} s; arena {} bytes",
        host.kernel_count(),
        t0.elapsed().as_secs_f64(),
        host.program.arena_bytes
    );
    run_program(g, &host, data, data_path, opts, model, Exec::Kernels)
}

/// Runs a lowered training program with the runtime's training loop, its steps run as `exec`
/// says (see [`run_host`], [`run_reference`]). A pipelined program runs on the runtime's
/// pipelined executor, in this process or as this rank's share (launched by `mpirun`; rank 0
/// reports), each pass on the cpu backend or the reference interpreter.
pub fn run_program(
    g: &mut Graph,
    host: &memc_codegen::host::HostProgram,
    data: &mut Batches,
    data_path: &str,
    opts: &LoopOptions,
    model: &str,
    exec: Exec,
) -> Result<Vec<f64>> {
    use memc_runtime::pipeline::{PassBackend, Pipelined};
    let program = &host.program;
    let mut cfg = memc_runtime::session::TrainConfig {
        steps: opts.steps as u64,
        lr: opts.lr,
        weight_decay: Some(opts.weight_decay),
        start_step: 0,
        save: opts.save.clone(),
        metrics: None,
        run: opts.run.clone(),
        resumed: None,
    };
    let (losses, trained) = host
        .with_kernels(|kernels| -> Result<(Vec<f64>, NamedBytes)> {
            let mut cpu: Box<dyn memc_runtime::Backend> =
                match (&program.pipeline, exec) {
                    (_, Exec::Reference(graph, bytes)) => Box::new(
                        memc_codegen::reference::Reference::new(graph, program)
                            .checked()
                            .reporting(bytes),
                    ),
                    (Some(_), Exec::Passes(graphs)) => {
                        let mut make = |label: &str,
                                    p: &memc_runtime::program::Program|
                     -> Result<PassBackend, memc_runtime::RunError> {
                        let g = graphs.iter().find(|x| x.label == label).ok_or_else(|| {
                            memc_runtime::RunError::Usage(format!("no graph for pass `{label}`"))
                        })?;
                        Ok(Box::new(memc_codegen::reference::Reference::new(
                            g.graph.clone(),
                            p,
                        )))
                    };
                        Box::new(Pipelined::open(program, &mut make)?)
                    }
                    // SAFETY: `kernels` are the JIT-compiled entries of this program's own kernels.
                    _ => unsafe { memc_runtime::session::open_backend("cpu", program, kernels)? },
                };
            let rank = memc_runtime::transport::RankEnv::from_env()
                .ok()
                .flatten()
                .filter(|_| program.pipeline.is_some())
                .map_or(0, |e| e.rank);
            // On any failure a rank of a distributed step tells the others, so the job ends
            // instead of waiting for it.
            let mut run = || -> Result<Vec<f64>> {
                load_params(g, program, cpu.as_mut())?;
                cfg.metrics = opts.log.clone().filter(|_| rank == 0);
                cfg.run.progress &= rank == 0;
                if let Some(dir) = &opts.resume {
                    let loaded = memc_runtime::weights::load_dir(dir, program, cpu.as_mut())?;
                    cfg.start_step = loaded.step.unwrap_or(0);
                    cfg.resumed = Some(loaded);
                }
                let (mut quiet, mut stdout) = (std::io::sink(), std::io::stdout().lock());
                Ok(memc_runtime::session::train(
                    program,
                    cpu.as_mut(),
                    &mut data.0,
                    data_path,
                    &opts.fixed,
                    &cfg,
                    if rank != 0 { &mut quiet } else { &mut stdout },
                )?)
            };
            let losses = run();
            if losses.is_err() {
                cpu.abort();
            }
            let losses = losses?;
            if let Some(p) = cpu.profile() {
                eprint!("{p}");
            }
            // (A rank of a distributed step has only its share.)
            let held: Vec<&memc_runtime::program::Param> = program
                .params
                .iter()
                .filter(|p| cpu.holds(&p.slot))
                .collect();
            let trained = held
                .into_iter()
                .map(|p| Ok((p.slot.name.clone(), cpu.get(&p.slot)?)))
                .collect::<Result<_>>()?;
            Ok((losses, trained))
        })
        .map_err(|e| anyhow!("{model}: {e}"))??;
    let ids: HashMap<String, memc_ir::ValueId> = g
        .values()
        .iter()
        .enumerate()
        .filter_map(|(i, v)| match &v.def {
            ValueDef::Param { name, .. } => Some((name.clone(), memc_ir::ValueId(i as u32))),
            _ => None,
        })
        .collect();
    for (name, bytes) in trained {
        let v = ids[&name];
        let ty = g.value(v).ty.clone();
        g.set_param_data(
            v,
            Tensor::from_bytes(ty, bytes.into()).expect("sized by type"),
        );
    }
    Ok(losses)
}

/// Runs a program once on the cpu backend and returns its named outputs.
pub fn eval_host(
    g: &Graph,
    feeds: &std::collections::HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let host = host_program(g, "model", None)?;
    let program = &host.program;
    let out = host.with_kernels(|kernels| -> Result<Vec<(String, Tensor)>> {
        // SAFETY: `kernels` are the JIT-compiled entries of this program's own kernels.
        let mut cpu = unsafe { memc_runtime::cpu::Cpu::new(program.checked()?, kernels) };
        load_params(g, program, &mut cpu)?;
        for s in &program.inputs {
            let t = feeds
                .get(&s.name)
                .ok_or_else(|| anyhow!("input `{}` has no value", s.name))?;
            memc_runtime::session::check_indices(program, s, t.bytes(), "--input")?;
            cpu.arena_mut().set(s, t.bytes());
        }
        cpu.run()?;
        Ok(g.outputs()
            .iter()
            .zip(&program.outputs)
            .map(|((name, v), s)| {
                (
                    name.clone(),
                    Tensor::from_bytes(g.value(*v).ty.clone(), cpu.arena().get(s).to_vec().into())
                        .expect("sized by type"),
                )
            })
            .collect())
    })??;
    Ok(out)
}
