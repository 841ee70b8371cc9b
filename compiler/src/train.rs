//! Training: the CLI's training options, building the training step (memc-passes), and the
//! reference backend's training loop (the interpreter), which prints one JSON line per step.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use clap::{Args, ValueEnum};
use memc_ir::{DType, Graph, Tensor, ValueDef};
use memc_passes::train::{self, Loss, Optimizer, TrainOptions, TrainStats};

/// The loss names of the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LossArg {
    /// Mean cross-entropy of logits[:, :-1] against input_ids[:, 1:].
    NextTokenCe,
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
    #[arg(long, value_delimiter = ',', num_args = 2, default_values_t = [0.9, 0.999])]
    pub betas: Vec<f64>,
    /// AdamW epsilon.
    #[arg(long, default_value_t = 1e-8)]
    pub eps: f64,
    /// Which weights are trained: `all`, or a regular expression searched in weight names.
    #[arg(long, default_value = "all")]
    pub trainable: String,
    /// Clip the global gradient norm to this value.
    #[arg(long, value_name = "MAX_NORM")]
    pub clip_grad_norm: Option<f64>,
    /// What the backward pass keeps: `auto` recomputes cheap forward values when that saves
    /// memory (a minimum cut); `none` keeps every value a gradient reads.
    #[arg(long, value_enum, default_value = "auto")]
    pub remat: RematArg,
    /// Compute dtype of the forward and backward passes (bf16 keeps f32 master weights and an
    /// f32 optimizer).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
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
}

/// Builds the training step into `g` (which holds the forward graph).
pub fn build(g: &mut Graph, args: &TrainProgramArgs) -> Result<TrainStats> {
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
    let regex = if args.trainable == "all" {
        None
    } else {
        Some(regex::Regex::new(&args.trainable).map_err(|e| {
            anyhow!(
                "--trainable `{}` is not a regular expression: {e}",
                args.trainable
            )
        })?)
    };
    let trainable = |name: &str| regex.as_ref().is_none_or(|r| r.is_match(name));
    let opts = TrainOptions {
        loss: match args.loss {
            LossArg::NextTokenCe => Loss::NextTokenCe,
        },
        optimizer,
        clip_grad_norm: args.clip_grad_norm,
        trainable: &trainable,
        rematerialize: args.remat == RematArg::Auto,
        compute_dtype: match args.dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
        },
    };
    let stats = train::build_training(g, &opts)?;
    memc_ir::verify(g).map_err(|e| {
        anyhow!("the training program is invalid (a memc bug, please report it): {e}")
    })?;
    Ok(stats)
}

/// Training data: an integer `[rows, seq]` array, served `batch` rows at a time, cycling.
pub struct Batches {
    rows: usize,
    seq: usize,
    ids: Vec<i64>,
    next: usize,
}

impl Batches {
    /// Reads and checks a `.npy` file of token ids.
    pub fn open(path: &Path) -> Result<Batches> {
        let t = crate::io::read_tensor(path)?;
        if !matches!(t.dtype(), DType::I64 | DType::I32)
            || t.shape().len() != 2
            || t.shape()[0] == 0
        {
            bail!(
                "{}: training data must be a non-empty integer array of shape [rows, seq] (token ids), got {}",
                path.display(),
                t.ty()
            );
        }
        Ok(Batches {
            rows: t.shape()[0],
            seq: t.shape()[1],
            ids: t.to_i64_vec(),
            next: 0,
        })
    }

    /// Rows and columns.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.seq)
    }

    /// Checks that every token id lies in `0..vocab` (kernels clamp indices; the data must not
    /// rely on that).
    pub fn check_vocab(&self, vocab: usize, path: &str) -> Result<()> {
        if let Some(k) = self
            .ids
            .iter()
            .position(|&t| t < 0 || t as u64 >= vocab as u64)
        {
            bail!(
                "{path}: token id {} at row {}, column {} is outside the model's vocabulary (0..{vocab})",
                self.ids[k],
                k / self.seq,
                k % self.seq
            );
        }
        Ok(())
    }

    /// The next `batch` rows (wrapping around the file), as `dtype` (i64 or i32).
    pub fn next_batch(&mut self, batch: usize, dtype: DType) -> Tensor {
        let mut out = Vec::with_capacity(batch * self.seq);
        for _ in 0..batch {
            out.extend_from_slice(&self.ids[self.next * self.seq..(self.next + 1) * self.seq]);
            self.next = (self.next + 1) % self.rows;
        }
        Tensor::from_i64(dtype, vec![batch, self.seq], &out)
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
    /// Planned peak bytes, reported on every line.
    pub peak_bytes: Option<u64>,
}

/// The program's one data input (token ids), checked against the data's row length; every
/// other input must be a `memc.*` scalar.
fn data_input(g: &Graph, data: &Batches, model: &str) -> Result<(String, memc_ir::TensorType)> {
    let inputs: Vec<(String, memc_ir::TensorType)> = g
        .inputs()
        .iter()
        .filter_map(|&v| match &g.value(v).def {
            ValueDef::Input { name } if !name.starts_with("memc.") => {
                Some((name.clone(), g.value(v).ty.clone()))
            }
            _ => None,
        })
        .collect();
    match inputs.as_slice() {
        [one] => {
            let (name, ty) = one;
            if data.shape().1 != ty.shape[1] {
                bail!(
                    "training data has rows of {} tokens but the program was compiled for {} (--shape {name}={}x{})",
                    data.shape().1,
                    ty.shape[1],
                    ty.shape[0],
                    data.shape().1
                );
            }
            Ok(one.clone())
        }
        [] => bail!("{model}: the training program has no data input"),
        many => {
            let names: Vec<&str> = many.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "{model}: the model takes inputs {}, but memc train feeds only token ids from --data; train a model whose only input is the token ids",
                names.join(", ")
            )
        }
    }
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

/// Trains on the reference backend, printing one JSON line per step; returns the losses.
pub fn run_reference(
    g: &mut Graph,
    data: &mut Batches,
    opts: &LoopOptions,
    model: &str,
) -> Result<Vec<f64>> {
    let (name, ty) = data_input(g, data, model)?;
    let (batch, seq) = (ty.shape[0], ty.shape[1]);
    let scalar = |v: f64| Tensor::from_f64(DType::F32, vec![], &[v]);
    let run_opts = memc_ir::RunOptions { check_nan: true };
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 1..=opts.steps {
        let t0 = Instant::now();
        let ids = data.next_batch(batch, ty.dtype);
        let feeds = HashMap::from([
            (name.clone(), ids),
            (train::LR_INPUT.to_string(), scalar(opts.lr)),
            (
                train::WEIGHT_DECAY_INPUT.to_string(),
                scalar(opts.weight_decay),
            ),
            (train::STEP_INPUT.to_string(), scalar(step as f64)),
        ]);
        let out =
            memc_ir::run(g, &feeds, &run_opts).map_err(|e| anyhow!("{model}: step {step}: {e}"))?;
        let loss = out.outputs[0].1.to_f64_vec()[0];
        if !loss.is_finite() {
            bail!("{model}: step {step}: the loss is {loss}");
        }
        for (p, t) in &out.updates {
            if t.to_f32_vec().iter().any(|x| !x.is_finite()) {
                let name = match &g.value(*p).def {
                    ValueDef::Param { name, .. } => name.clone(),
                    _ => unreachable!("updates target params"),
                };
                bail!("{model}: step {step}: the update of `{name}` is not finite (lower --lr or use --clip-grad-norm)");
            }
        }
        for (p, t) in out.updates {
            g.set_param_data(p, t);
        }
        losses.push(loss);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut line = serde_json::json!({"step": step, "loss": loss, "tokens": batch * seq, "step_ms": (ms * 1000.0).round() / 1000.0});
        if let Some(p) = opts.peak_bytes {
            line["peak_bytes"] = p.into();
        }
        println!("{line}");
    }
    Ok(losses)
}

/// The cpu backend's kernel sequence and memory plan: `g`'s nodes put in the memory plan's
/// order (which runs optimizer updates as soon as their gradients exist), fused into kernels
/// in that order, and planned over those kernels (values inside a kernel need no buffer).
/// Returns the reordered graph (same values), the kernels and the plan.
#[cfg(feature = "codegen")]
pub fn host_layout(
    g: &Graph,
) -> (
    Graph,
    Vec<memc_codegen::fuse::Kernel>,
    memc_passes::plan::Plan,
) {
    let mut ordered = g.clone();
    ordered.reorder_nodes(&memc_passes::plan::plan(g).order);
    let kernels = memc_codegen::fuse::fuse(&ordered);
    let steps: Vec<Vec<memc_ir::NodeId>> = kernels.iter().map(|k| k.nodes.clone()).collect();
    let plan = memc_passes::plan::plan_steps(&ordered, &steps);
    (ordered, kernels, plan)
}

/// The cpu backend's program (see [`host_layout`]): returns it with the graph it runs (`g`
/// reordered; value ids unchanged) and its arena size (the plan's peak).
#[cfg(feature = "codegen")]
pub fn host_program(g: &Graph) -> Result<(memc_codegen::host::HostProgram, Graph, u64)> {
    let (ordered, kernels, plan) = host_layout(g);
    let mut layout = memc_codegen::host::Layout {
        arena_bytes: plan.peak_bytes,
        offsets: Default::default(),
    };
    for b in &plan.buffers {
        layout.offsets.insert(b.value, b.offset);
    }
    for &(v, target) in &plan.aliases {
        let at = layout.offsets[&target];
        layout.offsets.insert(v, at);
    }
    let program = memc_codegen::host::HostProgram::compile(&ordered, kernels, layout)?;
    Ok((program, ordered, plan.peak_bytes))
}

/// Writes params (optimizer state stays zero) and constants into a fresh arena.
#[cfg(feature = "codegen")]
fn load_arena(g: &Graph, arena: &mut memc_codegen::host::Arena) {
    for (i, v) in g.values().iter().enumerate() {
        if let ValueDef::Param { data: Some(t), .. } | ValueDef::Const(t) = &v.def {
            arena.set(memc_ir::ValueId(i as u32), t.bytes());
        }
    }
}

/// Trains on the cpu backend (kernels generated through MLIR and LLVM, GEMMs on the runtime's
/// library, one arena sized by the plan), printing one JSON line per step (`peak_bytes` is
/// the arena's size); returns the losses. The weights are written back into `g` at the end.
#[cfg(feature = "codegen")]
pub fn run_host(
    g: &mut Graph,
    data: &mut Batches,
    opts: &LoopOptions,
    model: &str,
) -> Result<Vec<f64>> {
    let (name, ty) = data_input(g, data, model)?;
    let (batch, seq) = (ty.shape[0], ty.shape[1]);
    let t0 = Instant::now();
    let (program, ordered, peak) = host_program(g).map_err(|e| anyhow!("{model}: {e:#}"))?;
    eprintln!(
        "compiled {} kernels for the host in {:.1} s; arena {peak} bytes",
        program.kernel_count(),
        t0.elapsed().as_secs_f64()
    );
    let input_of = |n: &str| {
        g.inputs()
            .iter()
            .copied()
            .find(|&v| matches!(&g.value(v).def, ValueDef::Input { name } if name == n))
    };
    let ids_v = input_of(&name).expect("data_input found it");
    let scalars = [
        (input_of(train::LR_INPUT), opts.lr),
        (input_of(train::WEIGHT_DECAY_INPUT), opts.weight_decay),
    ];
    let step_v = input_of(train::STEP_INPUT);
    let loss_v = g.outputs()[0].1;
    let targets: Vec<memc_ir::ValueId> = g.updates().iter().map(|&(t, _)| t).collect();
    let mut arena = program.arena(&ordered);
    assert_eq!(arena.bytes() as u64, peak);
    load_arena(g, &mut arena);
    let f32_bytes = |v: f64| (v as f32).to_le_bytes();
    let losses = program
        .with_steps(&ordered, |run| -> Result<Vec<f64>> {
            let mut losses = Vec::with_capacity(opts.steps);
            for step in 1..=opts.steps {
                let t = Instant::now();
                let ids = data.next_batch(batch, ty.dtype);
                arena.set(ids_v, ids.bytes());
                for (v, x) in scalars {
                    if let Some(v) = v {
                        arena.set(v, &f32_bytes(x));
                    }
                }
                if let Some(v) = step_v {
                    arena.set(v, &f32_bytes(step as f64));
                }
                // Updates are written in place into the weights' and state's buffers.
                run(&mut arena);
                let loss = f32::from_le_bytes(arena.get(loss_v)[..4].try_into().unwrap()) as f64;
                if !loss.is_finite() {
                    bail!("{model}: step {step}: the loss is {loss}");
                }
                losses.push(loss);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let line = serde_json::json!({"step": step, "loss": loss, "tokens": batch * seq, "step_ms": (ms * 1000.0).round() / 1000.0, "backend": "cpu", "peak_bytes": peak});
                println!("{line}");
            }
            Ok(losses)
        })
        .map_err(|e| anyhow!("{model}: {e}"))??;
    for target in targets {
        let ty = g.value(target).ty.clone();
        g.set_param_data(
            target,
            Tensor::from_bytes(ty, arena.get(target).to_vec().into()).expect("sized by type"),
        );
    }
    Ok(losses)
}

/// Runs a program once on the cpu backend and returns its named outputs.
#[cfg(feature = "codegen")]
pub fn eval_host(
    g: &Graph,
    feeds: &std::collections::HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let (program, ordered, _) = host_program(g)?;
    let mut arena = program.arena(&ordered);
    load_arena(g, &mut arena);
    for &v in g.inputs() {
        if let ValueDef::Input { name } = &g.value(v).def {
            let t = feeds
                .get(name)
                .ok_or_else(|| anyhow!("input `{name}` has no value"))?;
            arena.set(v, t.bytes());
        }
    }
    program.with_steps(&ordered, |run| run(&mut arena))?;
    Ok(g.outputs()
        .iter()
        .map(|(name, v)| {
            (
                name.clone(),
                Tensor::from_bytes(g.value(*v).ty.clone(), arena.get(*v).to_vec().into())
                    .expect("sized by type"),
            )
        })
        .collect())
}
