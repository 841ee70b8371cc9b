//! The `memc` command line (the CLI documented in README.md). Every failure is one `error:` line on
//! stderr and exit code 2.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use memc_ir::{Graph, Tensor, ValueDef};

use memc_passes::manager::PassManager;

use crate::onnx::{self, ImportOptions};
use crate::pipe::PlanReport;
use crate::report::{self, PhaseTime};

/// memc: compile ONNX transformers into memory-lean training executables.
#[derive(Debug, Parser)]
#[command(name = "memc", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compile a model into an executable (-o), or print its IR, kernels, plan or reports.
    Compile(Box<CompileArgs>),
    /// Evaluate a model on `.npy` inputs with the reference interpreter.
    Eval(EvalArgs),
    /// Compile the training step and train on the reference backend: one JSON line per step.
    Train(Box<TrainCmdArgs>),
    /// Tokenise text (.txt or .jsonl of text or prompt/response records) with a Hugging Face
    /// tokenizer.json into input_ids.npy, labels.npy and attention_mask.npy.
    Data(crate::data::DataArgs),
    /// Find the fastest training step that fits a device's memory: searches gradient
    /// accumulation, recomputation and the loss's form (and, with --allow, bf16, MoC and
    /// reversible layers), prints the choice, the runners-up and the Pareto front, and writes
    /// the flags for memc compile/train --plan FILE.
    Plan(Box<crate::planner::PlanArgs>),
    /// (memc plan's transport probe, run under mpirun.)
    #[command(hide = true)]
    CommProbe,
    /// Run passes on textual IR: textual IR in, textual IR out.
    Opt(OptArgs),
    /// Generate, check and simulate a pipeline-parallel schedule; report per-device peak
    /// activation memory and the bubble rate.
    Schedule(ScheduleArgs),
    /// Check the code generation toolchain (MLIR 19, LLVM 19 host and NVPTX) and the CUDA driver.
    Toolchain,
}

#[derive(Debug, Args)]
pub(crate) struct ModelArgs {
    /// The ONNX model (from torch.onnx.export, dynamo or TorchScript).
    model: PathBuf,
    /// Bind an input's dims: NAME=DxD... (e.g. input_ids=2x16); repeatable.
    #[arg(long = "shape", value_name = "NAME=DxD")]
    shapes: Vec<String>,
    /// A Hugging Face checkpoint to bind to the model's parameters instead of the ONNX file's
    /// values: a model.safetensors, a sharded model.safetensors.index.json, or a model
    /// directory holding either (its config.json and other small files are copied into
    /// directories `--save` writes).
    #[arg(long, value_name = "PATH")]
    weights: Option<PathBuf>,
    /// Print the wall time of each compiler phase to stderr.
    #[arg(long)]
    time_passes: bool,
    /// Skip the e-graph canonicalisation (which recognises norms, activations, FFN blocks,
    /// residual connections and attention in the exporter's ops and rewrites them into
    /// `rms_norm`, `layer_norm`, `silu`, `gelu`, `gelu_tanh`, `swiglu_ffn`, `gelu_ffn`,
    /// `rope`, `residual` and `attention`, constant causal and window masks becoming
    /// attention's attributes).
    #[arg(long)]
    no_canonicalize: bool,
    /// Mixture-of-Channels: every gated FFN (SwiGLU, GeGLU) keeps only the K largest gate
    /// channels per token (a count, or a fraction of d_ffn such as 0.25); its backward keeps
    /// only those.
    #[arg(long, value_name = "K|RATIO")]
    moc_k: Option<String>,
    #[command(flatten)]
    rev: crate::rev::RevArgs,
    /// Import without the recognition, MoC and reversible lines on stderr (`memc plan`
    /// imports the model once per microbatch size).
    #[arg(skip)]
    quiet: bool,
}

impl ModelArgs {
    /// The model arguments of one of `memc plan`'s configurations: `moc_k` and MEFT1
    /// reversible layers over every layer when `reversible`, quiet.
    pub(crate) fn for_plan(
        model: PathBuf,
        shapes: Vec<String>,
        moc_k: Option<String>,
        reversible: bool,
    ) -> ModelArgs {
        ModelArgs {
            model,
            shapes,
            weights: None,
            time_passes: false,
            no_canonicalize: false,
            moc_k,
            rev: crate::rev::RevArgs {
                reversible: reversible.then_some(crate::rev::VariantArg::Meft1),
                rev_layers: None,
                adapter_rank: 8,
                adapter_seed: 0,
            },
            quiet: true,
        }
    }
}

/// The forward graph of `args` at `shapes` (imported, canonicalised, with MoC and reversible
/// layers as asked), for `memc plan`.
pub(crate) fn import_quiet(args: &ModelArgs, shapes: HashMap<String, Vec<usize>>) -> Result<Graph> {
    let mut timer = Timer {
        enabled: false,
        phases: vec![],
    };
    Ok(import(args, shapes, &mut timer, &mut PassManager::new())?.0)
}

/// Parses `--moc-k`: an integer count or a fraction in (0, 1).
fn parse_moc_k(text: &str) -> Result<memc_passes::moc::MocK> {
    memc_passes::moc::MocK::parse(text).map_err(|e| anyhow!("--moc-k {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Emit {
    /// Textual IR of the forward graph.
    Ir,
    /// The program's kernels: fused elementwise kernels as MLIR (func/arith/math/scf/memref).
    Mlir,
    /// The fused kernels lowered through MLIR and translated to LLVM IR.
    Llvm,
    /// Every kernel of the program as one PTX module (NVPTX, `--sm`).
    Ptx,
    /// Memory plan: execution order and every buffer's offset, size and lifetime.
    Plan,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TargetArg {
    /// Host kernels only.
    Cpu,
    /// Host kernels and PTX kernels (the runtime needs its cpu side for data and weights).
    Cuda,
    /// Host kernels and PTX kernels.
    All,
}

#[derive(Debug, Args)]
struct CompileArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Write the executable OUT (generated kernels, the program, the runtime) and
    /// OUT.safetensors (the weights).
    #[arg(short = 'o', value_name = "OUT")]
    out: Option<PathBuf>,
    /// Print a stage of the compilation to stdout.
    #[arg(long, value_enum)]
    emit: Option<Emit>,
    /// Print a human-readable report.
    #[arg(long)]
    report: bool,
    /// Write the machine-readable report (stable keys) to FILE.
    #[arg(long, value_name = "FILE")]
    report_json: Option<PathBuf>,
    /// Write the textual IR after every pass into DIR.
    #[arg(long, value_name = "DIR")]
    dump_ir: Option<PathBuf>,
    /// Build the training step (loss, backward, optimizer) rather than inference.
    #[arg(long)]
    train: bool,
    /// With --train -o: also an evaluation step (forward and loss, no gradients) in the same
    /// arena, for OUT train --val-data.
    #[arg(long, requires = "train")]
    eval: bool,
    #[command(flatten)]
    pipeline: crate::pipe::PipelineArgs,
    /// Which backends the executable (-o) carries code for; cuda and all add PTX kernels.
    #[arg(long, value_enum, default_value = "cpu")]
    target: TargetArg,
    /// The GPU architecture of the PTX kernels (sm_XX).
    #[arg(long, default_value_t = 90)]
    sm: u32,
    /// Draw live bytes over program steps, stacked by category, as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    #[command(flatten)]
    training: crate::train::TrainProgramArgs,
}

#[derive(Debug, Args)]
struct TrainCmdArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    training: crate::train::TrainProgramArgs,
    /// Token ids: an integer .npy of shape [rows, seq]; each step takes the next batch of rows.
    /// Without --shape, one batch is the whole file.
    #[arg(long, value_name = "FILE.npy")]
    data: PathBuf,
    /// The model's other inputs (such as BERT's token_type_ids and attention_mask):
    /// NAME=FILE.npy, held fixed across steps; repeatable.
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    inputs: Vec<String>,
    /// Optimizer steps to run (more steps, for a resumed run).
    #[arg(long, default_value_t = 10, conflicts_with = "epochs")]
    steps: usize,
    /// Train for E passes over the data's rows instead (ceil(E × rows / rows per step) steps
    /// in all; a resumed run goes on to that end).
    #[arg(long, value_name = "E")]
    epochs: Option<u64>,
    /// Learning rate (the schedule's peak).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Learning-rate schedule, as transformers' get_{constant,linear,cosine}_schedule_with_warmup.
    #[arg(long, value_name = "constant|linear|cosine")]
    lr_schedule: Option<String>,
    /// Steps of linear warmup from 0.
    #[arg(long, value_name = "N")]
    warmup_steps: Option<u64>,
    /// Read the rows in a fresh random order each epoch (exact across --resume).
    #[arg(long)]
    shuffle: bool,
    /// The shuffle's seed (default 42).
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Write a checkpoint every N steps (and at the last) as SAVE/checkpoint-STEP; --resume SAVE
    /// takes the newest complete one.
    #[arg(long, value_name = "N")]
    save_every: Option<u64>,
    /// Keep only the newest K periodic checkpoints.
    #[arg(long, value_name = "K")]
    keep_last: Option<usize>,
    /// Also write every step's JSON line to this file.
    #[arg(long, value_name = "FILE.jsonl")]
    log: Option<PathBuf>,
    /// Per-token labels of the data's shape (transformers' causal-LM loss: -100 is left out,
    /// e.g. prompt tokens); implies --loss causal-lm.
    #[arg(long, value_name = "FILE.npy")]
    labels: Option<PathBuf>,
    /// Per-token attention mask of the data's shape (1 token, 0 padding): fed to a model's
    /// attention_mask input; padding is left out of the loss.
    #[arg(long, value_name = "FILE.npy", conflicts_with = "pad_id")]
    attention_mask: Option<PathBuf>,
    /// The padding token: positions holding it are masked and left out of the loss.
    #[arg(long, value_name = "P")]
    pad_id: Option<i64>,
    /// Validation data (token ids of the data's row length): its loss by an evaluation step
    /// (forward and loss, no gradients) in the training arena (--backend cpu).
    #[arg(long, value_name = "FILE.npy")]
    val_data: Option<PathBuf>,
    /// The validation data's labels (-100 left out).
    #[arg(long, value_name = "FILE.npy", requires = "val_data")]
    val_labels: Option<PathBuf>,
    /// Evaluate every N steps (and after the last; default: after the last only).
    #[arg(long, value_name = "N", requires = "val_data")]
    eval_every: Option<u64>,
    /// Weight decay (default: 0.01 for AdamW, 0 for SGD, as in PyTorch).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Where to run.
    #[arg(long, value_enum, default_value = "ref")]
    backend: Backend,
    /// Threads for the cpu backend's GEMMs, 1 to 4 (default: every physical core, up to 4).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// At the end, write a Hugging Face model directory here: model.safetensors (the
    /// checkpoint's names, shapes and element types), optimizer.safetensors,
    /// trainer_state.json, and config.json and the other small files of a --weights directory.
    #[arg(long, value_name = "DIR")]
    save: Option<PathBuf>,
    /// Continue from a directory --save wrote: its weights, optimizer state, step count and
    /// data position (bit for bit an uninterrupted run).
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    pipeline: crate::pipe::PipelineArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// The reference interpreter.
    Ref,
    /// Host kernels generated through MLIR and LLVM (JIT-compiled), GEMMs on a CPU library.
    Cpu,
    /// Emitted PTX kernels (not yet available).
    Cuda,
}

#[derive(Debug, Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A graph input: NAME=FILE.npy; repeatable. Dynamic dims are bound from the arrays.
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    inputs: Vec<String>,
    /// Directory for the outputs, one `<output name>.npy` each.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Where to run.
    #[arg(long, value_enum, default_value = "ref")]
    backend: Backend,
    /// Compare every output with DIR/<output name>.npy (e.g. onnxruntime's) and fail if
    /// max|out - ref| > tolerance * max|ref|.
    #[arg(long, value_name = "DIR")]
    check: Option<PathBuf>,
    /// Relative tolerance for --check.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
}

#[derive(Debug, Args)]
struct OptArgs {
    /// Textual IR (`-` for stdin).
    file: Option<PathBuf>,
    /// Passes to run in order, in MLIR's syntax: `NAME` or `NAME{key=value ...}`,
    /// comma-separated; repeatable (`memc opt --list-passes` lists them and their options).
    /// The graph is verified after every pass.
    #[arg(long = "pass", value_name = "PIPELINE")]
    passes: Vec<String>,
    /// List every pass with its options.
    #[arg(long)]
    list_passes: bool,
    /// Write the textual IR after every pass into DIR (`NN-pass.mir`).
    #[arg(long, value_name = "DIR")]
    dump_ir: Option<PathBuf>,
    /// Print each pass's wall time and statistics to stderr.
    #[arg(long)]
    time_passes: bool,
}

#[derive(Debug, Args)]
struct ScheduleArgs {
    /// Pipeline stages (devices).
    #[arg(long)]
    stages: usize,
    /// Microbatches per step.
    #[arg(long)]
    microbatches: usize,
    /// gpipe, 1f1b, interleaved, zb-h1, v-min, v-half or v-zb.
    #[arg(long)]
    schedule: String,
    /// Pass costs F,B,W,COMM (time units; COMM between devices).
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 1.0, 1.0, 0.0])]
    costs: Vec<f64>,
    /// Print the result as JSON: `peak_activation_microbatches` (per device, in units of one
    /// 1F1B stage's activations for one microbatch), `bubble_rate`, `makespan`, ...
    #[arg(long)]
    json: bool,
    /// Draw the schedule as SVG.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Write a Chrome/Perfetto trace (JSON).
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
}

fn schedule(args: ScheduleArgs) -> Result<()> {
    use memc_passes::pipeline::{self, Costs, ScheduleKind};
    let kind = ScheduleKind::parse_named(&args.schedule).map_err(|e| anyhow!("--schedule {e}"))?;
    if args.costs.len() != 4
        || args.costs.iter().any(|c| !(c.is_finite() && *c >= 0.0))
        || args.costs[..3].iter().any(|&c| c <= 0.0)
    {
        bail!(
            "--costs takes 4 values F,B,W,COMM, positive (COMM may be 0), got {:?}",
            args.costs
        );
    }
    let costs = Costs {
        f: args.costs[0],
        b: args.costs[1],
        w: args.costs[2],
        comm: args.costs[3],
    };
    let s = pipeline::generate(kind, args.stages, args.microbatches).map_err(|e| {
        anyhow!(
            "--stages {}, --microbatches {}: {e}",
            args.stages,
            args.microbatches
        )
    })?;
    let sim = pipeline::simulate(&s, &costs).map_err(|e| anyhow!("{e}"))?;
    if let Some(path) = &args.svg {
        write_file(path, &pipeline::svg(&s, &sim))?;
    }
    if let Some(path) = &args.trace {
        write_file(path, &pipeline::trace(&s, &sim))?;
    }
    if args.json {
        let devices: Vec<Vec<String>> = s
            .devices
            .iter()
            .map(|d| {
                d.iter()
                    .map(|p| format!("{:?}{}.{}", p.kind, p.chunk, p.mb))
                    .collect()
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "schedule": kind.name(),
                "stages": s.stages,
                "microbatches": s.microbatches,
                "chunks": s.chunks(),
                "split_backward": s.split_backward(),
                "costs": {"f": costs.f, "b": costs.b, "w": costs.w, "comm": costs.comm},
                "peak_activation_microbatches": sim.peak_activation,
                "bubble_rate": sim.bubble_rate,
                "makespan": sim.makespan,
                "order": devices,
            })
        );
    } else {
        println!(
            "{}: {} stages, {} microbatches, {} chunks{}; makespan {:.2}, bubble rate {:.4}",
            kind.name(),
            s.stages,
            s.microbatches,
            s.chunks(),
            if s.split_backward() {
                ", B/W split"
            } else {
                ""
            },
            sim.makespan,
            sim.bubble_rate
        );
        for (d, peak) in sim.peak_activation.iter().enumerate() {
            println!(
                "  device {d}: peak activations {peak} microbatch-stages, {} passes",
                s.devices[d].len()
            );
        }
    }
    Ok(())
}

/// Parses `NAME=2x16` into a name and dims.
fn parse_shape(s: &str) -> Result<(String, Vec<usize>)> {
    let (name, dims) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--shape `{s}`: expected NAME=DxD (e.g. input_ids=2x16)"))?;
    let dims: Vec<usize> = if dims.is_empty() {
        vec![]
    } else {
        dims.split('x')
            .map(|d| d.parse::<usize>().map_err(|_| anyhow!("--shape `{s}`: `{d}` is not a dimension; expected NAME=DxD (e.g. input_ids=2x16)")))
            .collect::<Result<_>>()?
    };
    let numel = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|&n| n < (1 << 40));
    if numel.is_none() {
        bail!("--shape `{s}`: the shape is too large");
    }
    Ok((name.to_string(), dims))
}

pub(crate) fn shapes(args: &ModelArgs) -> Result<HashMap<String, Vec<usize>>> {
    let mut m = HashMap::new();
    for s in &args.shapes {
        let (name, dims) = parse_shape(s)?;
        if m.insert(name.clone(), dims).is_some() {
            bail!("--shape gives input `{name}` twice");
        }
    }
    Ok(m)
}

struct Timer {
    enabled: bool,
    phases: Vec<PhaseTime>,
}

impl Timer {
    fn time<T>(&mut self, name: &'static str, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = f();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if self.enabled {
            eprintln!("time: {name:<10} {ms:>10.1} ms");
        }
        self.phases.push(PhaseTime { name, ms });
        r
    }
}

/// Loads, imports and verifies the model, then runs the model passes through `pm`:
/// canonicalize (unless `--no-canonicalize`), moc (`--moc-k`) and reversible (`--reversible`);
/// `pm` dumps the imported graph first.
fn import(
    args: &ModelArgs,
    shapes: HashMap<String, Vec<usize>>,
    timer: &mut Timer,
    pm: &mut PassManager,
) -> Result<(
    Graph,
    Option<crate::rev::RevReport>,
    memc_passes::summary::Recognition,
    crate::checkpoint::Parameters,
)> {
    let model = timer.time("load", || onnx::load_model(&args.model))?;
    let opts = ImportOptions { shapes };
    let mut g = timer.time("import", || onnx::import_model(&args.model, &model, &opts))?;
    // The parameters' checkpoint names, and their values from --weights.
    let prov = onnx::provenance::provenance(model.graph.as_ref().expect("load_model checks"));
    let weights = args
        .weights
        .as_deref()
        .map(crate::checkpoint::Weights::open)
        .transpose()?;
    let params = timer.time("weights", || {
        crate::checkpoint::apply(
            &mut g,
            &prov,
            weights.as_ref(),
            &args.model.display().to_string(),
        )
    })?;
    if let Some(w) = &weights {
        eprintln!(
            "weights: bound {} tensors of {} to the model's parameters",
            params.bound,
            w.path.display()
        );
    }
    timer
        .time("verify", || memc_ir::verify(&g))
        .map_err(|e| anyhow!("{}: {e}", args.model.display()))?;
    pm.dump(&g, "import")?;
    let name = args.model.display().to_string();
    if !args.no_canonicalize {
        let spec = memc_passes::table::spec("canonicalize", &[])?;
        timer
            .time("canonicalize", || pm.run_spec(&mut g, &spec))
            .map_err(|e| anyhow!("{name}: {e}"))?;
    }
    // What was recognised, before MoC and reversible layers restructure the blocks.
    let recognition = memc_passes::summary::describe(&g);
    // With --no-canonicalize nothing is recognised by request: no warnings.
    for u in recognition
        .unrecognised
        .iter()
        .filter(|_| !args.no_canonicalize && !args.quiet)
    {
        eprintln!(
            "warning: {name}: {} not recognised{}; this rules out {}",
            u.what,
            match u.nodes.len() {
                0 => String::new(),
                _ => format!(" (nodes {})", u.nodes.join(", ")),
            },
            u.rules_out
        );
    }
    if let Some(text) = &args.moc_k {
        let k = parse_moc_k(text)?;
        let stats = pm.run(&mut g, "moc", format!("moc{{k={text}}}"), |g| {
            memc_passes::moc::apply_moc(g, k).map_err(|e| anyhow!("{name}: --moc-k: {e}"))
        })?;
        if stats.rewritten == 0 && !args.quiet {
            eprintln!(
                "warning: {name}: --moc-k: no gated FFN (SwiGLU `swiglu_ffn` or GeGLU, a gated `gelu_ffn`) in the model, nothing rewritten{}; MoC applies to gated FFNs only",
                if stats.left_dense > 0 {
                    format!(" ({} ungated FFNs left dense)", stats.left_dense)
                } else {
                    String::new()
                }
            );
        }
        if let Some((k, f)) = stats.k.filter(|_| !args.quiet) {
            eprintln!(
                "moc: {} gated FFNs -> moc_ffn, keeping {k} of {f} channels per token{}",
                stats.rewritten,
                if stats.left_dense > 0 {
                    format!("; {} ungated FFNs left dense", stats.left_dense)
                } else {
                    String::new()
                }
            );
        }
    }
    if timer.enabled {
        if let Some((anon, file)) = resident_memory() {
            let mib = |b: u64| b as f64 / 1048576.0;
            eprintln!(
                "memory: {:.1} MiB anonymous, {:.1} MiB of mapped files resident",
                mib(anon),
                mib(file)
            );
        }
    }
    let rev = crate::rev::apply(&mut g, &args.rev, &name, pm, args.quiet)?;
    Ok((g, rev, recognition, params))
}

/// Resident memory of this process, split into anonymous (copied or computed) and
/// file-backed (memory-mapped model) bytes, from /proc on Linux.
fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kb("RssAnon:")? * 1024, kb("RssFile:")? * 1024))
}

/// Writes a report, plot or plan file with the runtime's one output writer (temporary file
/// and rename; through symbolic links; FIFOs and devices written directly).
fn write_file(path: &Path, text: &str) -> Result<()> {
    memc_runtime::weights::write_atomically(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn compile(mut args: CompileArgs) -> Result<()> {
    let accum = args.pipeline.resolve_grad_accum()?;
    let model = args.model.model.display().to_string();
    // A pipelined executable's limits, before any work.
    if let (Some(p), Some(_)) = (args.pipeline.pipeline_stages, &args.out) {
        replica_shapes(
            shapes(&args.model)?,
            args.pipeline.microbatches.unwrap_or(2 * p),
            args.pipeline.data_parallel,
            &model,
        )?;
    }
    let mut timer = Timer {
        enabled: args.model.time_passes,
        phases: vec![],
    };
    let mut pm = PassManager::new()
        .dump_to(args.dump_ir.clone())
        .timed(args.model.time_passes);
    let mut import_shapes = shapes(&args.model)?;
    if let Some(k) = accum {
        if !args.train {
            bail!("--grad-accum accumulates a training step's gradients: add --train");
        }
        import_shapes = accum_shapes(import_shapes, k, &model)?;
    }
    let (mut g, mut rev, recognition, params) =
        import(&args.model, import_shapes, &mut timer, &mut pm)?;
    // The reversible model before training is built, for the report's baselines.
    let rev_model = (rev.is_some() && args.train && (args.report || args.report_json.is_some()))
        .then(|| g.clone());
    // The model's ops as canonicalised (blocks included), for the report; then blocks are
    // lowered to the ops training and code generation work on (`build` lowers them itself).
    let model_ops = g.op_counts();
    let canonical_ir = (args.emit == Some(Emit::Ir) && !args.train).then(|| memc_ir::print(&g));
    if !args.train {
        let spec = memc_passes::table::spec("lower-blocks", &[])?;
        timer
            .time("lower-blocks", || pm.run_spec(&mut g, &spec))
            .map_err(|e| anyhow!("{model}: {e}"))?;
    }
    let mut train_stats = None;
    let pipe = args.pipeline.chunks()?;
    if pipe.is_some() && !args.train {
        bail!("--pipeline-stages splits a training step: add --train");
    }
    if let (Some(flag), false) = (args.training.training_only_flag(), args.train) {
        bail!("{flag} shapes a training step: add --train");
    }
    let mut train_opts = None;
    if args.eval && pipe.is_some() {
        bail!("--eval: a pipelined step has no evaluation step yet");
    }
    if args.eval && args.out.is_none() {
        bail!("--eval adds an evaluation step to an executable: pass -o OUT");
    }
    let forward = args.eval.then(|| g.clone());
    if args.train {
        let opts = memc_passes::train::TrainOptions {
            pipeline_chunks: pipe.map(|(_, c)| c),
            grad_accum: accum,
            ..crate::train::options_for(&g, &args.training)?
        };
        let stats = timer
            .time("train", || {
                crate::train::build_managed(&mut g, &opts, &mut pm)
            })
            .map_err(|e| anyhow!("{model}: {e:#}"))?;
        train_stats = Some(stats);
        train_opts = Some(opts);
    }
    let pipeline_plan = match (
        pipe,
        train_stats
            .as_ref()
            .and_then(|t: &memc_passes::train::TrainStats| t.partition.clone()),
    ) {
        (Some((kind, _)), Some(part)) => Some(
            crate::pipe::plan(&args.pipeline, kind, part).map_err(|e| anyhow!("{model}: {e:#}"))?,
        ),
        _ => None,
    };
    let plan = timer.time("plan", || memc_passes::plan::plan(&g));
    if let (Some(r), Some(m)) = (rev.as_mut(), &rev_model) {
        timer
            .time("baselines", || {
                r.measure_baselines(
                    m,
                    train_opts.as_ref().expect("a training build"),
                    plan.saved_activation_bytes,
                )
            })
            .map_err(|e| anyhow!("{model}: {e:#}"))?;
    }
    // The plan that runs: over the fused kernels, in their order (what the cpu backend and
    // executables allocate, exactly). The report states it; the node-level plan above is
    // the one fusion must not exceed.
    let (ordered, kernels, run_plan) = timer.time("fuse", || memc_codegen::host::layout(&g));
    match args.emit {
        Some(Emit::Ir) => print!("{}", canonical_ir.unwrap_or_else(|| memc_ir::print(&g))),
        Some(Emit::Plan) => print!("{}", report::plan_text(&ordered, &run_plan)),
        Some(e @ (Emit::Mlir | Emit::Llvm)) => {
            emit_kernels(&g, e == Emit::Llvm).map_err(|e| anyhow!("{model}: {e}"))?
        }
        Some(Emit::Ptx) => print!(
            "{}",
            emit_ptx(&g, &model, args.sm).map_err(|e| anyhow!("{model}: {e:#}"))?
        ),
        _ => {}
    }
    let mut rank_plan: Vec<(String, memc_runtime::pipeline::Planned)> = vec![];
    if let (Some(out), Some((kind, _))) = (&args.out, pipe) {
        let shapes = shapes(&args.model)?;
        rank_plan = timer
            .time("emit", || emit_pipelined(&args, kind, shapes, out, &model))
            .map_err(|e| anyhow!("{e:#}"))?;
    } else if let Some(out) = &args.out {
        timer
            .time("emit", || {
                emit_executable(
                    &g,
                    out,
                    &model,
                    train_opts.as_ref(),
                    (args.target != TargetArg::Cpu).then_some(args.sm),
                    &params.layout,
                    forward.as_ref(),
                )
            })
            .map_err(|e| anyhow!("{model}: {e:#}"))?;
    }
    if let Some(path) = &args.plot {
        write_file(path, &report::plan_svg(&run_plan, &model))?;
    }
    if args.report {
        print!("{}", report::summary(&g));
        print!("{}", report::layers_text(&recognition));
        if let Some(r) = &rev {
            println!("reversible: {}", r.line());
            if let Some(m) = r.memory_line() {
                println!("{m}");
            }
        }
        if let Some(t) = &train_stats {
            println!(
                "training: {} weight tensors trained ({} parameters), {} frozen; {} backward nodes, {} optimizer nodes",
                t.trained_tensors, t.trained_params, t.frozen_tensors, t.backward_nodes, t.update_nodes
            );
            print!("{}", report::parameters_text(&parameter_rows(&g, &params)));
            if let Some(r) = &t.remat {
                let budget = r
                    .budget_bytes
                    .map(|b| format!(" (budget {b} bytes)"))
                    .unwrap_or_default();
                let min = r
                    .min_budget_bytes
                    .map(|b| format!("; the smallest feasible budget is {b} bytes"))
                    .unwrap_or_default();
                println!(
                    "remat: saved activations {} -> {} bytes{budget}, {} nodes recomputed, {} layers{min}",
                    r.saved_bytes_before, r.saved_bytes_after, r.recomputed_nodes, r.layers
                );
            }
            if let Some(r) = &t.reconstruct {
                println!(
                    "reversible backward: {} couplings inverted ({} nodes re-run or inverting){}",
                    r.couplings,
                    r.nodes,
                    if r.drift_outputs > 0 {
                        format!("; {} drift outputs (--rev-check)", r.drift_outputs)
                    } else {
                        String::new()
                    }
                );
            }
            if let Some(p) = &pipeline_plan {
                for line in p.lines() {
                    println!("{line}");
                }
                for (who, b) in &rank_plan {
                    println!(
                        "  {who}: {} bytes allocated by the executable: weights {}, optimizer state {}, gradient sums (f32) {}, working arenas {}",
                        b.total, b.weights, b.optimizer_state, b.gradient_sums, b.working
                    );
                }
            }
            if let Some(f) = &t.fused_loss {
                println!(
                    "loss: fused LM-head cross-entropy in {} chunks: at most {} bytes of logits at once instead of {} ({} bytes not held)",
                    f.chunks,
                    f.chunk_bytes,
                    f.logits_bytes,
                    f.logits_bytes - f.chunk_bytes
                );
            }
        }
        print!("{}", report::plan_table(&ordered, &run_plan));
        println!(
            "cpu backend: {} kernels after fusion, one arena of {} bytes (the plan above; the node-level plan before fusion: {} bytes)",
            kernels.len(),
            run_plan.peak_bytes,
            plan.peak_bytes
        );
    }
    if let Some(path) = &args.report_json {
        let mut r = report::json_report(&model, &g, &model_ops, &timer.phases);
        if let Some(obj) = r.as_object_mut() {
            obj.insert("layers".into(), report::layers_json(&recognition));
        }
        if let (Some(obj), serde_json::Value::Object(p)) =
            (r.as_object_mut(), report::plan_json(&ordered, &run_plan))
        {
            obj.extend(p);
            obj.insert(
                "node_plan_peak_bytes".into(),
                serde_json::json!(plan.peak_bytes),
            );
            obj.insert(
                "cpu_backend".into(),
                serde_json::json!({"arena_bytes": run_plan.peak_bytes, "kernels": kernels.len()}),
            );
            if let Some(p) = &pipeline_plan {
                let mut j = p.json();
                if !rank_plan.is_empty() {
                    j["processes"] = rank_plan
                        .iter()
                        .map(|(who, b)| {
                            serde_json::json!({
                                "process": who,
                                "stage": b.at.map(|a| a.0),
                                "replica": b.at.map(|a| a.1),
                                "total_bytes": b.total,
                                "weight_bytes": b.weights,
                                "optimizer_state_bytes": b.optimizer_state,
                                "gradient_sum_bytes": b.gradient_sums,
                                "working_bytes": b.working,
                            })
                        })
                        .collect();
                }
                obj.insert("pipeline".into(), j);
            }
            if let Some(r) = &rev {
                let mut j = r.json();
                if let Some(rc) = train_stats.as_ref().and_then(|t| t.reconstruct.as_ref()) {
                    j["backward"] = serde_json::json!({
                        "couplings": rc.couplings,
                        "nodes": rc.nodes,
                        "drift_outputs": rc.drift_outputs,
                    });
                } else if train_stats.is_some() {
                    j["backward"] = serde_json::json!("stored");
                }
                obj.insert("reversible".into(), j);
            }
            if train_stats.is_some() {
                obj.insert(
                    "parameters".into(),
                    report::parameters_json(&parameter_rows(&g, &params)),
                );
            }
            if let Some(t) = &train_stats {
                obj.insert(
                    "training".into(),
                    serde_json::json!({"trained_tensors": t.trained_tensors, "trained_params": t.trained_params,
                        "frozen_tensors": t.frozen_tensors, "backward_nodes": t.backward_nodes, "update_nodes": t.update_nodes,
                        "remat": t.remat.as_ref().map(|r| serde_json::json!({
                            "saved_bytes_before": r.saved_bytes_before,
                            "saved_bytes_after": r.saved_bytes_after,
                            "recomputed_nodes": r.recomputed_nodes,
                            "layers": r.layers,
                            "budget_bytes": r.budget_bytes,
                            "min_budget_bytes": r.min_budget_bytes,
                        })),
                        "fused_loss": t.fused_loss.map(|f| serde_json::json!({
                            "chunks": f.chunks,
                            "logits_bytes": f.logits_bytes,
                            "chunk_bytes": f.chunk_bytes,
                            "bytes_not_held": f.logits_bytes - f.chunk_bytes,
                        }))}),
                );
            }
        }
        write_file(path, &(serde_json::to_string_pretty(&r)? + "\n"))?;
    }
    Ok(())
}

/// Every weight and frozen initializer of the training graph `g`: whether it is trained (has a
/// gradient, or an update once the optimizer consumed the gradients) and why it is a parameter or not (`crate::checkpoint::apply`'s notes).
fn parameter_rows(g: &Graph, params: &crate::checkpoint::Parameters) -> Vec<report::ParamRow> {
    let trained: std::collections::HashSet<&str> = g
        .grads()
        .iter()
        .chain(g.updates())
        .filter_map(|(w, _)| match &g.value(*w).def {
            ValueDef::Param { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    params
        .notes
        .iter()
        .map(|(name, weight, why)| report::ParamRow {
            name: name.clone(),
            trained: trained.contains(name.as_str()),
            weight: *weight,
            why: why.clone(),
        })
        .collect()
}

/// `-o OUT`: the executable OUT (kernels, program and runtime) and OUT.safetensors.
fn emit_executable(
    g: &Graph,
    out: &Path,
    model: &str,
    training: Option<&memc_passes::train::TrainOptions>,
    sm: Option<u32>,
    layout: &memc_runtime::program::CheckpointLayout,
    forward: Option<&Graph>,
) -> Result<()> {
    let t0 = Instant::now();
    let mut host = crate::train::host_program(g, model, training)?;
    host.program.checkpoint = layout.clone();
    if let (Some(f), Some(opts)) = (forward, training) {
        crate::train::attach_eval(&mut host, f, opts, model)?;
    }
    if let Some(sm) = sm {
        let libdevice = memc_codegen::ptx::find_libdevice().map_err(|e| anyhow!(e))?;
        host.compile_device(sm, &libdevice)?;
    }
    let lib = memc_codegen::link::find_runtime_lib().map_err(|e| anyhow!(e))?;
    let mut weights = out.as_os_str().to_owned();
    weights.push(".safetensors");
    let weights = PathBuf::from(weights);
    // The weights are written (mostly copying and waiting on the disk) while the kernels
    // compile.
    let (emitted, weight_bytes) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| crate::train::write_weights(g, &host.program, &weights));
        let emitted = memc_codegen::link::emit_executable(&host.program, host.lowered(), out, &lib);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the thread writing the weights panicked")));
        (emitted, written)
    });
    let (emitted, weight_bytes) = match (emitted, weight_bytes) {
        (Ok(e), Ok(w)) => (e, w),
        (Err(e), w) => {
            if w.is_ok() {
                let _ = std::fs::remove_file(&weights);
            }
            return Err(e.into());
        }
        (Ok(_), Err(e)) => {
            let _ = std::fs::remove_file(out);
            return Err(e);
        }
    };
    let gemms = host
        .program
        .steps
        .iter()
        .filter(|s| matches!(s, memc_runtime::program::Step::Gemm { .. }))
        .count();
    eprintln!(
        "wrote {} ({} bytes: {} generated kernels ({} from the kernel cache), {gemms} GEMMs, {}-byte program; arena {} bytes) and {} ({weight_bytes} bytes of weights) in {:.1} s",
        out.display(),
        emitted.exe_bytes,
        emitted.kernels,
        emitted.cached_kernels,
        emitted.program_bytes,
        host.program.arena_bytes,
        weights.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `-o OUT --pipeline-stages P`: the pipelined step ([`crate::pipe::lower_pipeline`]) as an
/// executable, and OUT.safetensors.
fn emit_pipelined(
    args: &CompileArgs,
    kind: memc_passes::pipeline::ScheduleKind,
    shapes: HashMap<String, Vec<usize>>,
    out: &Path,
    model: &str,
) -> Result<Vec<(String, memc_runtime::pipeline::Planned)>> {
    let t0 = Instant::now();
    let stages = args.pipeline.pipeline_stages.expect("checked");
    let m = args.pipeline.microbatches.unwrap_or(2 * stages);
    let (shapes, rows) = replica_shapes(shapes, m, args.pipeline.data_parallel, model)?;
    let mut timer = Timer {
        enabled: false,
        phases: vec![],
    };
    let (g, _, _, params) = import(
        &args.model,
        shapes,
        &mut timer,
        &mut PassManager::new().timed(args.model.time_passes),
    )?;
    let opts = crate::train::options_for(&g, &args.training)?;
    let (program, _) = crate::pipe::pipelined_program(g, &opts, kind, stages)
        .map_err(|e| anyhow!("{model}: {e:#}"))?;
    let schedule = memc_passes::pipeline::generate(kind, stages, m).map_err(|e| anyhow!(e))?;
    let (mut host, _) = crate::pipe::lower_pipeline(
        &program,
        &schedule,
        &opts,
        rows,
        args.pipeline.data_parallel.unwrap_or(1),
        model,
        crate::pipe::PassTarget::Cpu,
    )?;
    host.program.checkpoint = params.layout;
    if args.target != TargetArg::Cpu {
        // One PTX module for every pass's kernels: the cuda backend loads it once per GPU.
        let libdevice = memc_codegen::ptx::find_libdevice().map_err(|e| anyhow!(e))?;
        host.compile_device(args.sm, &libdevice)?;
    }
    let lib = memc_codegen::link::find_runtime_lib().map_err(|e| anyhow!(e))?;
    let emitted = memc_codegen::link::emit_executable(&host.program, host.lowered(), out, &lib)?;
    let mut weights = out.as_os_str().to_owned();
    weights.push(".safetensors");
    let weights = PathBuf::from(weights);
    let weight_bytes = crate::train::write_weights(&program, &host.program, &weights)?;
    let pl = host.program.pipeline.as_ref().expect("a pipeline");
    eprintln!(
        "wrote {} ({} bytes: {} pass programs of a {} schedule on {stages} stages, {m} microbatches, {} generated kernels, {}-byte program) and {} ({weight_bytes} bytes of weights) in {:.1} s",
        out.display(),
        emitted.exe_bytes,
        pl.passes.len(),
        kind.name(),
        emitted.kernels,
        emitted.program_bytes,
        weights.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(memc_runtime::pipeline::processes(&host.program)?)
}

/// With `--grad-accum K` (no pipeline): the shapes of one microbatch, the token input's
/// rows / K.
pub(crate) fn accum_shapes(
    shapes: HashMap<String, Vec<usize>>,
    k: usize,
    model: &str,
) -> Result<HashMap<String, Vec<usize>>> {
    let (shapes, _, _) =
        micro_shapes(shapes, k, model).map_err(|e| anyhow!("--grad-accum {k}: {e}"))?;
    Ok(shapes)
}

/// With `--data-parallel D`, one replica's share: the shapes to import the microbatch
/// program with and the rows of one replica's step (the batch's `1/D`).
fn replica_shapes(
    shapes: HashMap<String, Vec<usize>>,
    m: usize,
    replicas: Option<usize>,
    model: &str,
) -> Result<(HashMap<String, Vec<usize>>, usize)> {
    let d = replicas.unwrap_or(1);
    let (shapes, rows, name) = micro_shapes(shapes, m * d, model).map_err(|e| {
        if d > 1 {
            anyhow!("--data-parallel {d} × --microbatches {m}: {e}")
        } else {
            e
        }
    })?;
    let _ = name;
    Ok((shapes, rows / d))
}

/// The token input's shape cut into `m` microbatches of rows: the shapes to import the
/// microbatch program with, the batch's rows and the token input's name.
fn micro_shapes(
    mut shapes: HashMap<String, Vec<usize>>,
    m: usize,
    model: &str,
) -> Result<(HashMap<String, Vec<usize>>, usize, String)> {
    let names: Vec<&str> = shapes.keys().map(String::as_str).collect();
    let Some(name) = memc_passes::train::token_input(&names).map(str::to_string) else {
        bail!("{model}: pass --shape NAME=BxS for the token input")
    };
    let dims = shapes[&name].clone();
    if dims.len() != 2 {
        bail!("{model}: the token input `{name}` must be [batch, seq], got {dims:?}");
    }
    let (rows, seq) = (dims[0], dims[1]);
    if m == 0 || rows % m != 0 {
        bail!("--microbatches {m} does not divide the batch of {rows} rows (--shape {name}={rows}x{seq})");
    }
    shapes.insert(name.clone(), vec![rows / m, seq]);
    Ok((shapes, rows, name))
}

/// `--emit ptx`: the program's PTX module.
fn emit_ptx(g: &Graph, model: &str, sm: u32) -> Result<String> {
    let mut host = crate::train::host_program(g, model, None)?;
    let libdevice = memc_codegen::ptx::find_libdevice().map_err(|e| anyhow!(e))?;
    host.compile_device(sm, &libdevice)?;
    Ok(host.program.device.expect("compiled").ptx)
}

/// `--emit mlir|llvm`: every generated kernel of the cpu backend's program, in order (matrix
/// products, which run on the GEMM library, as a comment).
fn emit_kernels(g: &Graph, llvm: bool) -> Result<()> {
    use memc_codegen::{kernel, ops};
    let (ordered, kernels, _) = memc_codegen::host::layout(g);
    let lowerer = kernel::Lowerer::new();
    for (n, k) in kernels.iter().enumerate() {
        let name = format!("memc_k{n}");
        let node = ordered.node(k.nodes[0]);
        let (mlir, args, what) = if k.elementwise {
            (
                kernel::elementwise_mlir(&ordered, k, &name)?,
                k.inputs.len() + k.outputs.len(),
                format!("{} fused node(s)", k.nodes.len()),
            )
        } else if matches!(node.op, memc_ir::Op::MatMul) {
            let ty = &ordered.value(node.outputs[0]).ty;
            println!("// kernel {name}: `matmul` -> {ty} (a GEMM on the runtime's library)\n");
            continue;
        } else {
            (
                ops::op_mlir(&ordered, k.nodes[0], &name)?,
                ops::kernel_args(&ordered, k.nodes[0]),
                format!("`{}`", node.op.name()),
            )
        };
        if llvm {
            print!("{}", lowerer.lower(&mlir, &name, args)?.llvm_ir);
        } else {
            println!("// kernel {name}: {what}\n{mlir}");
        }
    }
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    if args.backend == Backend::Cuda {
        bail!("--backend cuda: not available yet in this memc; use --backend cpu or ref");
    }
    let mut given: HashMap<String, (PathBuf, Tensor)> = HashMap::new();
    for (name, file) in fixed_inputs(&args.inputs)? {
        let t = crate::io::read_tensor(&file)?;
        given.insert(name, (file, t));
    }
    // Dynamic dims not bound by --shape are bound by the arrays given.
    let mut shapes = shapes(&args.model)?;
    for (name, (_, t)) in &given {
        shapes
            .entry(name.clone())
            .or_insert_with(|| t.shape().to_vec());
    }
    let model = args.model.model.display().to_string();
    // An --input the model lacks is reported by the importer (it checks --shape names).
    let mut timer = Timer {
        enabled: args.model.time_passes,
        phases: vec![],
    };
    let (mut g, _, _, _) = import(
        &args.model,
        shapes,
        &mut timer,
        &mut PassManager::new().timed(args.model.time_passes),
    )?;
    memc_passes::blocks::lower_blocks(&mut g).map_err(|e| anyhow!("{model}: {e}"))?;
    let mut feeds = HashMap::new();
    for &v in g.inputs() {
        let ValueDef::Input { name } = &g.value(v).def else {
            unreachable!()
        };
        let ty = &g.value(v).ty;
        let (file, t) = given.remove(name).ok_or_else(|| {
            anyhow!("{model}: input `{name}` ({ty}) has no value; pass --input {name}=FILE.npy")
        })?;
        if t.ty() != ty {
            bail!(
                "{}: input `{name}` must be {ty} but the file holds {} (convert with numpy: a.astype(np.{}).reshape({:?}))",
                file.display(),
                t.ty(),
                numpy_name(ty.dtype),
                ty.shape
            );
        }
        feeds.insert(name.clone(), t);
    }
    let outputs = match args.backend {
        Backend::Cpu => timer
            .time("cpu", || crate::train::eval_host(&g, &feeds))
            .map_err(|e| anyhow!("{model}: {e:#}"))?,
        _ => timer
            .time("interpret", || memc_ir::interpret(&g, &feeds))
            .map_err(|e| anyhow!("{model}: {e}"))?,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    print!("{}", report::summary(&g));
    for (name, t) in &outputs {
        let file = args.out.join(format!("{}.npy", sanitize(name)));
        crate::io::write_tensor(&file, t)?;
        let v = t.to_f32_vec();
        let n = v.len().max(1) as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        let head: Vec<String> = v.iter().take(4).map(|x| format!("{x:.4}")).collect();
        println!(
            "{name}: {} mean {mean:.5} std {std:.5} [{} ...] -> {}",
            t.ty(),
            head.join(", "),
            file.display()
        );
    }
    if let Some(dir) = &args.check {
        let mut worst = 0.0f64;
        for (name, t) in &outputs {
            let file = dir.join(format!("{}.npy", sanitize(name)));
            let want = crate::io::read_tensor(&file)?;
            if want.shape() != t.shape() {
                bail!(
                    "{}: reference is {:?} but output `{name}` is {:?}",
                    file.display(),
                    want.shape(),
                    t.shape()
                );
            }
            let err = relative_error(&t.to_f32_vec(), &want.to_f32_vec());
            println!(
                "check {name}: max|out - ref| / max|ref| = {err:.3e} against {}",
                file.display()
            );
            worst = worst.max(err);
        }
        if worst.is_nan() || worst > args.tolerance {
            bail!(
                "outputs differ from the references in {}: relative error {worst:.3e} > {:e}",
                dir.display(),
                args.tolerance
            );
        }
    }
    Ok(())
}

/// `max|a - b| / max|b|` (0 when both are all zero).
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, |m, d| if d.is_nan() { f64::NAN } else { m.max(d) });
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn train(mut args: TrainCmdArgs) -> Result<()> {
    let accum = args.pipeline.resolve_grad_accum()?;
    if let Some(n) = args.threads {
        memc_runtime::gemm::set_threads(n).map_err(|e| anyhow!(e))?;
    }
    if args.backend == Backend::Cuda {
        bail!("--backend cuda: not available yet in this memc; use --backend cpu or ref");
    }
    let model = args.model.model.display().to_string();
    let mut data = crate::train::Batches::open(&args.data)?;
    let mut shapes = shapes(&args.model)?;
    if shapes.is_empty() {
        // Without --shape, one batch is the whole data file.
        let decoded = onnx::load_model(&args.model.model)?;
        let graph = decoded.graph.as_ref().expect("load_model checks");
        let inits: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name()).collect();
        let inputs: Vec<&str> = graph
            .input
            .iter()
            .map(|i| i.name())
            .filter(|n| !inits.contains(n))
            .collect();
        let Some(name) = memc_passes::train::token_input(&inputs) else {
            bail!(
                "{model}: pass --shape NAME=BxS for the token input (inputs: {})",
                inputs.join(", ")
            );
        };
        let (rows, seq) = data.shape();
        shapes.insert(name.to_string(), vec![rows, seq]);
    }
    let mut timer = Timer {
        enabled: args.model.time_passes,
        phases: vec![],
    };
    if let Some((kind, _)) = args.pipeline.chunks()? {
        return train_pipelined(&args, kind, shapes, &mut data, &mut timer, &model);
    }
    let shapes = match accum {
        Some(k) => accum_shapes(shapes, k, &model)?,
        None => shapes,
    };
    let (mut g, _, _, params) = import(
        &args.model,
        shapes,
        &mut timer,
        &mut PassManager::new().timed(args.model.time_passes),
    )?;
    let opts = memc_passes::train::TrainOptions {
        grad_accum: accum,
        ..train_options(&g, &args)?
    };
    if args.val_data.is_some() && args.backend != Backend::Cpu {
        bail!("--val-data: the evaluation step runs on the cpu backend (--backend cpu) and in executables (memc compile --train --eval)");
    }
    let forward = args.val_data.is_some().then(|| g.clone());
    timer
        .time("train", || crate::train::build(&mut g, &opts))
        .map_err(|e| anyhow!("{model}: {e:#}"))?;
    let weight_decay = args.weight_decay.unwrap_or(opts.default_weight_decay());
    if let Some(vocab) = g.inputs().iter().find_map(|&v| match &g.value(v).def {
        ValueDef::Input { name } if !name.starts_with("memc.") => {
            crate::train::vocab_size(&g, name)
        }
        _ => None,
    }) {
        data.check_vocab(vocab, &args.data.display().to_string())?;
    }
    let loop_opts = crate::train::LoopOptions {
        steps: args.steps,
        lr: args.lr,
        weight_decay,
        fixed: fixed_inputs(&args.inputs)?,
        save: args.save.clone(),
        resume: args.resume.clone(),
        layout: params.layout,
        run: run_options(&args)?,
        log: args.log.clone(),
        eval: forward,
    };
    let run = match args.backend {
        Backend::Cpu => crate::train::run_host,
        _ => crate::train::run_reference,
    };
    let data_path = args.data.display().to_string();
    run(&mut g, &opts, &mut data, &data_path, &loop_opts, &model)?;
    Ok(())
}

/// `--input NAME=FILE.npy` of `memc eval` and `memc train` (the executables' parser).
fn fixed_inputs(given: &[String]) -> Result<Vec<(String, PathBuf)>> {
    Ok(memc_runtime::session::parse_inputs(
        given.iter().map(String::as_str),
    )?)
}

fn numpy_name(d: memc_ir::DType) -> &'static str {
    match d {
        memc_ir::DType::F32 | memc_ir::DType::BF16 => "float32",
        memc_ir::DType::F16 => "float16",
        memc_ir::DType::F64 => "float64",
        memc_ir::DType::I64 => "int64",
        memc_ir::DType::I32 => "int32",
        memc_ir::DType::I16 => "int16",
        memc_ir::DType::Bool => "bool_",
    }
}

/// An output name as a file name (exporter names may hold `/` or `:`).
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `memc train --pipeline-stages`: each step's batch split into microbatches and run as the
/// runtime's pipelined step ([`memc_runtime::pipeline::Pipelined`]), each pass on the
/// reference interpreter or as generated kernels (`--backend cpu`), in one process or one
/// process per stage and replica (launched by `mpirun` or `srun`).
fn train_pipelined(
    args: &TrainCmdArgs,
    kind: memc_passes::pipeline::ScheduleKind,
    shapes: HashMap<String, Vec<usize>>,
    data: &mut crate::train::Batches,
    timer: &mut Timer,
    model: &str,
) -> Result<()> {
    let stages = args.pipeline.pipeline_stages.expect("checked");
    let m = args.pipeline.microbatches.unwrap_or(2 * stages);
    let (shapes, rows) = replica_shapes(shapes, m, args.pipeline.data_parallel, model)?;
    let (g, _, _, params) = import(
        &args.model,
        shapes,
        timer,
        &mut PassManager::new().timed(args.model.time_passes),
    )?;
    let opts = train_options(&g, args)?;
    if args.val_data.is_some() {
        bail!("--val-data: a pipelined step has no evaluation step yet");
    }
    let (mut program, _) = crate::pipe::pipelined_program(g, &opts, kind, stages)
        .map_err(|e| anyhow!("{model}: {e:#}"))?;
    let schedule = memc_passes::pipeline::generate(kind, stages, m).map_err(|e| anyhow!(e))?;
    let ((data_name, _), others) = crate::train::token_input(&program, model)?;
    if !others.is_empty() {
        bail!(
            "{model}: a pipelined step feeds only token ids; the model also takes {}",
            others.join(", ")
        );
    }
    if let Some(vocab) = crate::train::vocab_size(&program, &data_name) {
        data.check_vocab(vocab, &args.data.display().to_string())?;
    }
    let wd = args.weight_decay.unwrap_or(opts.default_weight_decay());
    train_pipelined_on(
        args,
        &opts,
        &mut program,
        &schedule,
        rows,
        wd,
        data,
        model,
        &params.layout,
    )
}

/// The training program's options for `memc train`: labels, an attention mask or a padding
/// token take transformers' causal-LM loss (`--loss causal-lm`), the one that reads them.
fn train_options(g: &Graph, args: &TrainCmdArgs) -> Result<memc_passes::train::TrainOptions> {
    let mut opts = crate::train::options_for(g, &args.training)?;
    if args.labels.is_some() || args.attention_mask.is_some() || args.pad_id.is_some() {
        opts.loss = memc_passes::train::Loss::CausalLm;
    }
    Ok(opts)
}

/// The run's epochs, schedule, data order, periodic checkpoints and progress bar, from
/// `memc train`'s flags (the executables' `OUT train` reads the same ones).
fn run_options(args: &TrainCmdArgs) -> Result<memc_runtime::session::RunOptions> {
    Ok(memc_runtime::session::RunOptions::from_flags(
        args.lr_schedule.as_deref(),
        args.warmup_steps,
        args.shuffle,
        args.seed,
        args.epochs,
        args.save_every,
        args.keep_last,
        true,
    )?
    .with_data(
        args.labels.clone(),
        args.attention_mask.clone(),
        args.pad_id,
    )
    .with_validation(
        args.val_data.clone(),
        args.val_labels.clone(),
        args.eval_every,
    ))
}

/// Lowers the pipelined step for `--backend` and trains it with the runtime's loop.
#[allow(clippy::too_many_arguments)]
fn train_pipelined_on(
    args: &TrainCmdArgs,
    opts: &memc_passes::train::TrainOptions,
    program: &mut Graph,
    schedule: &memc_passes::pipeline::Schedule,
    rows: usize,
    weight_decay: f64,
    data: &mut crate::train::Batches,
    model: &str,
    layout: &memc_runtime::program::CheckpointLayout,
) -> Result<()> {
    use crate::pipe::PassTarget;
    let target = match args.backend {
        Backend::Cpu => PassTarget::Cpu,
        _ => PassTarget::Reference,
    };
    let t0 = Instant::now();
    let replicas = args.pipeline.data_parallel.unwrap_or(1);
    let (mut host, graphs) =
        crate::pipe::lower_pipeline(program, schedule, opts, rows, replicas, model, target)?;
    host.program.checkpoint = layout.clone();
    if target == PassTarget::Cpu {
        let pl = host.program.pipeline.as_ref().expect("a pipeline");
        eprintln!(
            "compiled {} pass programs and the optimizer ({} kernels) for the host in {:.1} s",
            pl.passes.len(),
            host.program.kernels.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    let opts = crate::train::LoopOptions {
        steps: args.steps,
        lr: args.lr,
        weight_decay,
        fixed: fixed_inputs(&args.inputs)?,
        save: args.save.clone(),
        resume: args.resume.clone(),
        layout: layout.clone(),
        run: run_options(args)?,
        log: args.log.clone(),
        eval: None,
    };
    let exec = match target {
        PassTarget::Cpu => crate::train::Exec::Kernels,
        PassTarget::Reference => crate::train::Exec::Passes(&graphs),
        PassTarget::Plan => unreachable!("memc train lowers its passes to run them"),
    };
    crate::train::run_program(
        program,
        &host,
        data,
        &args.data.display().to_string(),
        &opts,
        model,
        exec,
    )?;
    Ok(())
}

fn opt(args: OptArgs) -> Result<()> {
    if args.list_passes {
        print!("{}", memc_passes::table::list());
        return Ok(());
    }
    let Some(path) = &args.file else {
        bail!("memc opt needs a textual IR file (`-` for stdin), or --list-passes");
    };
    let file = path.display().to_string();
    let mut specs = vec![];
    for p in &args.passes {
        specs.extend(memc_passes::table::parse_pipeline(p).map_err(|e| anyhow!("--pass: {e}"))?);
    }
    let text = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {file}"))?
    };
    let mut g = memc_ir::parse(&text).map_err(|e| anyhow!("{file}: {e}"))?;
    memc_ir::verify(&g).map_err(|e| anyhow!("{file}: {e}"))?;
    let mut pm = PassManager::new()
        .dump_to(args.dump_ir.clone())
        .timed(args.time_passes);
    let mut last = None;
    for spec in &specs {
        let stats = pm
            .run_spec(&mut g, spec)
            .map_err(|e| anyhow!("{file}: {e}"))?;
        if !args.time_passes {
            let line = stats.summary();
            if !line.is_empty() {
                eprintln!("{}: {line}", spec.decl.name);
            }
        }
        last = Some(stats);
    }
    let out = last
        .and_then(|s| s.render(&g))
        .unwrap_or_else(|| memc_ir::print(&g));
    print!("{out}");
    Ok(())
}

fn toolchain() -> Result<()> {
    let r = memc_codegen::toolchain::check()?;
    println!(
        "MLIR 19: scf.parallel kernel lowered to the LLVM dialect ({} lines)",
        r.lowered_mlir.lines().count()
    );
    println!("LLVM 19: x86-64 object of {} bytes", r.host_object_bytes);
    let target = r
        .ptx
        .lines()
        .find(|l| l.starts_with(".target"))
        .unwrap_or("?");
    println!(
        "LLVM 19: NVPTX assembly of {} bytes ({target})",
        r.ptx.len()
    );
    match memc_runtime::cuda::probe() {
        Ok(name) => println!("CUDA: device 0 is {name}"),
        Err(e) => println!("CUDA: {e}"),
    }
    Ok(())
}

/// Runs the CLI on parsed arguments.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Compile(a) => compile(*a),
        Command::Eval(a) => eval(a),
        Command::Train(a) => train(*a),
        Command::Data(a) => {
            let w = crate::data::run(&a)?;
            if w.dropped > 0 {
                eprintln!(
                    "warning: {} of {} records dropped: their prompt fills the {} tokens of a row (use a longer --seq)",
                    w.dropped, w.records, a.seq
                );
            }
            eprintln!(
                "{}: {} records → {} rows of {} tokens ({} tokens, {} of them in the loss, {:.1}% padding); wrote {}/{{input_ids,labels,attention_mask}}.npy",
                a.text.display(),
                w.records,
                w.rows,
                a.seq,
                w.tokens,
                w.targets,
                100.0 * (1.0 - w.tokens as f64 / (w.rows * a.seq).max(1) as f64),
                a.out.display()
            );
            Ok(())
        }
        Command::Plan(a) => crate::planner::run(*a),
        Command::CommProbe => crate::planner::comm_probe(),
        Command::Opt(a) => opt(a),
        Command::Schedule(a) => schedule(a),
        Command::Toolchain => toolchain(),
    }
}

/// The `memc` entry point: parses arguments, runs, prints one error line and exits 2 on
/// failure.
pub fn main() -> ! {
    // Die quietly on a closed pipe (`memc ... | head`), as command-line tools do, instead of
    // failing a write.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Import folds large constants (masks, rotary tables) through the interpreter, one
    // freshly allocated tensor per op: with glibc's defaults each large allocation is its own
    // mapping, zeroed page by page and unmapped on free (45% of a 12-layer import in page
    // faults). Serving them from the heap, which keeps freed memory for reuse, avoids that.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    let argv = match crate::planner::expand_plan(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            std::process::exit(2)
        }
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's message, folded onto one line.
            let text = e.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
                .collect();
            let msg = lines.join("; ");
            eprintln!(
                "{}",
                if msg.starts_with("error:") {
                    msg
                } else {
                    format!("error: {msg}")
                }
            );
            std::process::exit(2)
        }
    };
    memc_runtime::session::exit_on_output_errors();
    match run(cli) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            std::process::exit(2)
        }
    }
}
