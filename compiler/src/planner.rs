//! `memc plan`: given the memory of a device, find the fastest training step that fits.
//!
//! The levers searched are exact (results equal up to rounding): the microbatch and
//! gradient accumulation (`--grad-accum K`), what the backward keeps (`--remat none|auto|full`,
//! `--activation-budget` at fractions of the unrematerialised bytes and at the smallest
//! feasible budget), and with `--devices N` the processes, pipeline stages × replicas,
//! schedule and microbatches; and, only when `--allow` names them, those that change the
//! numerics (`bf16` compute, Mixture-of-Channels `moc`, `reversible` layers). The loss is always the fused, chunked
//! LM-head loss (`Planner::build_accum` says why). Each configuration's memory is its
//! training arena, computed by building its program and planning it (no kernel is generated
//! and nothing runs); its step time is the [`crate::cost`] model's prediction. The chosen
//! configuration's flags are written to a plan file that `memc compile --plan FILE` and `memc
//! train --plan FILE` read ([`expand_plan`]).

use crate::cost::{CostModel, Parts};
use crate::train::{DtypeArg, RematArg, TrainProgramArgs};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use memc_codegen::host::Work;
use memc_passes::pipeline::{Kind, Pass, ScheduleKind};
use memc_passes::remat::{Budget, Policy, RematError};
use memc_passes::train::{TrainError, TrainOptions};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Levers that change a model's numerics, which `memc plan` uses only when allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AllowArg {
    /// bf16 compute with f32 master weights (`--dtype bf16`).
    Bf16,
    /// Mixture-of-Channels FFNs keeping a quarter of the channels (`--moc-k 0.25`).
    Moc,
    /// Reversible layers, MEFT1 over every layer (`--reversible meft1`).
    Reversible,
}

/// `memc plan`'s arguments.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// What each device may hold for the training step's arena: bytes (`1500000000`,
    /// `1.5GiB`, `800MB`).
    #[arg(long, value_name = "BYTES")]
    pub memory: String,
    /// The batch of one optimizer step: ROWSxSEQ of the token input (e.g. 8x512).
    #[arg(long, value_name = "BxS")]
    pub global_batch: String,
    /// Devices to train on (one process each, launched by mpirun): with more than one, the
    /// processes the step runs as (one, or R dividing N with its own cores), the pipeline
    /// stages × data-parallel replicas, the schedule and the microbatches are searched, each
    /// process's arena being what must fit.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub devices: usize,
    /// Levers that change the numerics the plan may use: bf16, moc, reversible.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LEVERS")]
    pub allow: Vec<AllowArg>,
    /// Threads per process (default: the cores shared out over the processes, at most 4).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Other model inputs' dims at the global batch: NAME=DxD; repeatable.
    #[arg(long = "shape", value_name = "NAME=DxD")]
    pub shapes: Vec<String>,
    /// Write the plan here (the chosen flags, for `memc compile/train --plan FILE`).
    #[arg(short = 'o', value_name = "FILE", default_value = "memc-plan.json")]
    pub out: PathBuf,
    /// Draw every configuration's memory against its predicted step time, the Pareto front
    /// and the budget, as an SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print the result as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Measure again what the cost model's cache holds for this machine.
    #[arg(long)]
    pub recalibrate: bool,
    /// The training step's fixed options (loss, optimizer, clipping).
    #[command(flatten)]
    pub training: TrainProgramArgs,
}

/// What the backward keeps, as searched.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Remat {
    None,
    Auto,
    Fraction(f64),
    Full,
    /// The smallest feasible activation budget (its bytes once known).
    Min(Option<u64>),
}

/// One numerics variant of the model (the `--allow`ed levers it uses).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Variant {
    bf16: bool,
    moc: bool,
    reversible: bool,
}

/// A pipelined step's shape (`--devices` above 1).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Pipe {
    stages: usize,
    replicas: usize,
    microbatches: usize,
    schedule: ScheduleKind,
}

/// One configuration and what it costs.
#[derive(Debug, Clone)]
pub struct Candidate {
    variant: Variant,
    pipe: Option<Pipe>,
    accum: usize,
    remat: Remat,
    /// The training arena's bytes (per device).
    pub arena: u64,
    /// Predicted seconds per optimizer step.
    pub secs: f64,
    /// Of `secs`, by the kind of step (one process; a pipelined step's are not split).
    parts: Option<Parts>,
    /// Threads per process (those `secs` was predicted for).
    threads: usize,
}

impl Candidate {
    /// The flags that build this configuration (without the shapes and training options
    /// common to all).
    fn lever_flags(&self) -> Vec<String> {
        let mut f = vec![];
        if let Some(p) = self.pipe {
            f.extend([
                "--pipeline-stages".into(),
                p.stages.to_string(),
                "--data-parallel".into(),
                p.replicas.to_string(),
                "--microbatches".into(),
                p.microbatches.to_string(),
                "--schedule".into(),
                p.schedule.name().to_string(),
            ]);
        }
        if self.accum > 1 {
            f.extend(["--grad-accum".into(), self.accum.to_string()]);
        }
        match self.remat {
            Remat::None => f.extend(["--remat".into(), "none".into()]),
            Remat::Auto => {}
            Remat::Fraction(x) => f.extend(["--activation-budget".into(), format!("{x}")]),
            Remat::Full => f.extend(["--remat".into(), "full".into()]),
            Remat::Min(b) => f.extend([
                "--activation-budget".into(),
                b.map_or("min".into(), |b| b.to_string()),
            ]),
        }
        if self.variant.bf16 {
            f.extend(["--dtype".into(), "bf16".into()]);
        }
        if self.variant.moc {
            f.extend(["--moc-k".into(), "0.25".into()]);
        }
        if self.variant.reversible {
            f.extend(["--reversible".into(), "meft1".into()]);
        }
        f
    }

    fn describe(&self) -> String {
        let f = self.lever_flags();
        let levers = if f.is_empty() {
            "(the defaults)".into()
        } else {
            f.join(" ")
        };
        let ranks = self.ranks();
        format!(
            "{levers} [{ranks} process{} × {} thread{}]",
            if ranks > 1 { "es" } else { "" },
            self.threads,
            if self.threads > 1 { "s" } else { "" }
        )
    }

    /// The processes the step runs as.
    fn ranks(&self) -> usize {
        self.pipe.map_or(1, |p| p.stages * p.replicas)
    }
}

/// Parses ROWSxSEQ.
fn parse_batch(text: &str) -> Result<(usize, usize)> {
    let bad = || anyhow!("--global-batch `{text}`: expected ROWSxSEQ (e.g. 8x512)");
    let (b, s) = text.split_once('x').ok_or_else(bad)?;
    let (b, s): (usize, usize) = (b.parse().map_err(|_| bad())?, s.parse().map_err(|_| bad())?);
    if b == 0 || s < 2 {
        bail!("--global-batch `{text}`: needs at least one row of two tokens");
    }
    Ok((b, s))
}

/// The accumulation counts searched: the powers of two dividing the batch's rows, and the
/// rows themselves (one row per microbatch).
fn accum_counts(rows: usize) -> Vec<usize> {
    let mut k: Vec<usize> = (0..usize::BITS)
        .map(|i| 1usize << i)
        .take_while(|&k| k <= rows)
        .filter(|&k| rows.is_multiple_of(k))
        .collect();
    if !k.contains(&rows) {
        k.push(rows);
    }
    k
}

fn group(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The training options of the user's flags with a candidate's levers.
fn options(base: &TrainOptions, c: &Candidate) -> TrainOptions {
    TrainOptions {
        remat: match c.remat {
            Remat::None => None,
            Remat::Auto => Some(Policy::MinCut),
            Remat::Full => Some(Policy::Full),
            Remat::Fraction(x) => Some(Policy::Budget(Budget::Fraction(x))),
            Remat::Min(b) => Some(Policy::Budget(Budget::Bytes(b.unwrap_or(0)))),
        },
        fused_loss: true,
        compute_dtype: if c.variant.bf16 {
            memc_ir::DType::BF16
        } else {
            memc_ir::DType::F32
        },
        grad_accum: (c.accum > 1).then_some(c.accum),
        ..base.clone()
    }
}

impl Search {
    /// Both searches' configurations, the fastest that fits chosen again.
    fn merge(self, other: Search, memory: u64) -> Search {
        let mut all = self.all;
        all.extend(other.all);
        Search::new(
            all,
            memory,
            self.builds + other.builds,
            self.secs + other.secs,
        )
    }

    /// The configurations searched, with the fastest predicted that fits `memory` (the
    /// smaller arena between equals) chosen.
    fn new(all: Vec<Candidate>, memory: u64, builds: usize, secs: f64) -> Search {
        let chosen = (0..all.len())
            .filter(|&i| all[i].arena <= memory)
            .min_by(|&a, &b| {
                all[a]
                    .secs
                    .total_cmp(&all[b].secs)
                    .then(all[a].arena.cmp(&all[b].arena))
            });
        Search {
            all,
            chosen,
            builds,
            secs,
        }
    }
}

/// One accumulation count's configurations with their steps, and the programs built.
type Built = (Vec<(Candidate, Vec<Work>)>, usize);

/// The plan's result: what was searched and chosen.
struct Search {
    all: Vec<Candidate>,
    chosen: Option<usize>,
    builds: usize,
    secs: f64,
}

/// Runs `memc plan`.
pub fn run(args: PlanArgs) -> Result<()> {
    let model = args.model.display().to_string();
    let memory = match Budget::parse(&args.memory) {
        Ok(Budget::Bytes(b)) => b,
        _ => bail!(
            "--memory `{}`: expected bytes (1500000000, 1.5GiB, 800MB)",
            args.memory
        ),
    };
    let (rows, seq) = parse_batch(&args.global_batch)?;
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let t = &args.training;
    if t.remat != RematArg::Auto
        || t.activation_budget.is_some()
        || t.dtype != DtypeArg::F32
        || t.no_fused_loss
    {
        bail!("memc plan chooses --remat, --activation-budget and --dtype itself and keeps the fused loss: leave out --remat, --activation-budget, --dtype and --no-fused-loss");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    // The processes a step may run as: every R dividing N (one process, or a pipeline of R
    // ranks on R of the devices), each with the cores shared out over its ranks. Fewest
    // first: the runtime's threads start at the first count timed, and later counts may
    // only be lower.
    let threads_of = |ranks: usize| {
        args.threads
            .unwrap_or((cores / ranks).clamp(1, memc_runtime::gemm::MAX_THREADS))
    };
    let layouts: Vec<usize> = (1..=args.devices)
        .filter(|r| args.devices.is_multiple_of(*r))
        .collect();
    let started = Instant::now();
    let allow = |a: AllowArg| args.allow.contains(&a);
    let mut variants = vec![];
    for bf16 in [false, true]
        .into_iter()
        .filter(|&b| !b || allow(AllowArg::Bf16))
    {
        for moc in [false, true]
            .into_iter()
            .filter(|&b| !b || allow(AllowArg::Moc))
        {
            for reversible in [false, true]
                .into_iter()
                .filter(|&b| !b || allow(AllowArg::Reversible))
            {
                variants.push(Variant {
                    bf16,
                    moc,
                    reversible,
                });
            }
        }
    }
    let planner = Planner {
        args: &args,
        model: model.clone(),
        size: std::fs::metadata(&args.model)
            .with_context(|| model.clone())?
            .len(),
        rows,
        seq,
    };
    let mut search = Search::new(vec![], memory, 0, 0.0);
    let mut measured = crate::cost::Measured::default();
    let mut caches = vec![];
    for &ranks in &layouts {
        let threads = threads_of(ranks);
        let mut cost = CostModel::open(threads, args.recalibrate)?;
        if ranks > 1 && cost.transport("mpi").is_none() {
            let t0 = Instant::now();
            let bw = probe_transport(args.devices)?;
            cost.set_transport("mpi", bw);
            cost.measured.secs += t0.elapsed().as_secs_f64();
        }
        let searched = |cost: &mut CostModel| {
            if ranks > 1 {
                planner.search_pipelined(&variants, ranks, threads, memory, cost)
            } else {
                planner.search(&variants, threads, memory, cost)
            }
        };
        let mut found = searched(&mut cost)?;
        // What this run measured is measured again and the search repeated on the faster
        // times (nothing new to measure then): one slow spell of a shared machine skews less.
        if cost.remeasure() {
            found = searched(&mut cost)?;
        }
        cost.save();
        measured.add(&cost.measured);
        caches.extend(cost.file().map(|f| f.display().to_string()));
        search = search.merge(found, memory);
    }
    let Some(chosen) = search.chosen else {
        return Err(planner.infeasible(&search, memory));
    };
    let front = pareto(&search.all);
    let best = &search.all[chosen];
    let mut ranked: Vec<usize> = (0..search.all.len())
        .filter(|&i| search.all[i].arena <= memory && i != chosen)
        .collect();
    ranked.sort_by(|&a, &b| search.all[a].secs.total_cmp(&search.all[b].secs));
    // Two configurations with the same arena and time are one (a budget above what the
    // backward keeps anyway): the runners-up show the first.
    let mut seen = vec![(best.arena, best.secs.to_bits())];
    ranked.retain(|&i| {
        let key = (search.all[i].arena, search.all[i].secs.to_bits());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
    let common = planner.common_flags();
    let mut train_flags = common.clone();
    train_flags.extend(best.lever_flags());
    let mut compile_flags = vec!["--train".to_string()];
    compile_flags.extend(train_flags.iter().cloned());
    let threads = best.threads;
    let ranks = best.ranks();
    train_flags.extend(["--threads".into(), threads.to_string()]);
    let row = |c: &Candidate| {
        serde_json::json!({
            "flags": c.lever_flags(),
            "arena_bytes": c.arena,
            "predicted_step_ms": (c.secs * 1e5).round() / 100.0,
            "fits": c.arena <= memory,
            "processes": c.ranks(),
            "threads": c.threads,
            "predicted_parts_ms": c.parts.map(|p| serde_json::json!({
                "gemm": (p.gemm * 1e5).round() / 100.0,
                "attention": (p.attention * 1e5).round() / 100.0,
                "kernels": (p.kernels * 1e5).round() / 100.0,
            })),
        })
    };
    let plan = serde_json::json!({
        "model": model,
        "global_batch": [rows, seq],
        "memory_bytes": memory,
        "devices": args.devices,
        "processes": ranks,
        "threads": threads,
        "machine": crate::cost::machine(),
        "chosen": row(best),
        "compile_flags": compile_flags,
        "train_flags": train_flags,
        "runners_up": ranked.iter().take(4).map(|&i| row(&search.all[i])).collect::<Vec<_>>(),
        "pareto_front": front.iter().map(|&i| row(&search.all[i])).collect::<Vec<_>>(),
        "searched": search.all.len(),
        "candidates": search.all.iter().map(row).collect::<Vec<_>>(),
        "search_secs": (search.secs * 1e3).round() / 1e3,
        "calibration": {
            "gemms": measured.gemms,
            "attention_parts": measured.attentions,
            "programs": measured.programs,
            "secs": (measured.secs * 1e3).round() / 1e3,
            "cache": caches,
        },
    });
    let text = serde_json::to_string_pretty(&plan)? + "\n";
    memc_runtime::weights::write_atomically_with(&args.out, |p| std::fs::write(p, &text))
        .map_err(|e| anyhow!("{e}"))?;
    if let Some(svg) = &args.plot {
        let drawn = plot_svg(&search.all, &front, chosen, memory, &model);
        memc_runtime::weights::write_atomically_with(svg, |p| std::fs::write(p, &drawn))
            .map_err(|e| anyhow!("{e}"))?;
    }
    if args.json {
        println!("{}", serde_json::to_string(&plan)?);
        return Ok(());
    }
    let fits = search.all.iter().filter(|c| c.arena <= memory).count();
    println!(
        "memc plan: {model}, global batch {rows}x{seq}, at most {} bytes per device, {} device{}, {cores} core{}",
        group(memory),
        args.devices,
        if args.devices > 1 { "s" } else { "" },
        if cores > 1 { "s" } else { "" }
    );
    println!(
        "cost model: measured {} GEMM shapes, {} attention parts and the kernels of {} programs in {:.1} s{}",
        measured.gemms,
        measured.attentions,
        measured.programs,
        measured.secs,
        if caches.is_empty() {
            String::new()
        } else {
            format!("; the rest from {}", caches.join(", "))
        }
    );
    println!(
        "searched {} configurations ({} programs built and planned) in {:.2} s: {fits} fit",
        search.all.len(),
        search.builds,
        search.secs
    );
    println!("chosen: {}", best.describe());
    let (count, per) = match best.pipe {
        Some(p) => (p.microbatches, rows / p.replicas / p.microbatches),
        None => (best.accum, rows / best.accum),
    };
    println!(
        "  arena {} bytes per device; predicted step {:.3} s ({count} microbatch{} of {per}x{seq}{})",
        group(best.arena),
        best.secs,
        if count > 1 { "es" } else { "" },
        match best.pipe {
            Some(p) => format!(
                " per replica; {} stage{} × {} replica{}, {}",
                p.stages,
                if p.stages > 1 { "s" } else { "" },
                p.replicas,
                if p.replicas > 1 { "s" } else { "" },
                p.schedule.name()
            ),
            None => String::new(),
        }
    );
    if !ranked.is_empty() {
        println!("runners-up:");
        for &i in ranked.iter().take(4) {
            let c = &search.all[i];
            println!(
                "  {:>15} bytes  {:>8.3} s  {}",
                group(c.arena),
                c.secs,
                c.describe()
            );
        }
    }
    println!("Pareto front (arena bytes against predicted step time, every configuration):");
    for &i in &front {
        let c = &search.all[i];
        println!(
            "  {:>15} bytes  {:>8.3} s  {}{}",
            group(c.arena),
            c.secs,
            c.describe(),
            if c.arena > memory {
                "  (over the budget)"
            } else {
                ""
            }
        );
    }
    let launch = if ranks > 1 {
        format!("mpirun -n {ranks} ")
    } else {
        String::new()
    };
    println!(
        "wrote {}: memc compile {model} --plan {} -o OUT; {launch}OUT train --data ... --threads {threads} (planned in {:.1} s)",
        args.out.display(),
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The indices of the configurations no other beats in both memory and time, by memory.
fn pareto(all: &[Candidate]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..all.len()).collect();
    idx.sort_by(|&a, &b| {
        all[a]
            .arena
            .cmp(&all[b].arena)
            .then(all[a].secs.total_cmp(&all[b].secs))
    });
    let mut front = vec![];
    let mut best = f64::INFINITY;
    for i in idx {
        if all[i].secs < best {
            best = all[i].secs;
            front.push(i);
        }
    }
    front
}

struct Planner<'a> {
    args: &'a PlanArgs,
    model: String,
    /// The model file's bytes (part of the cost model's name for its kernels).
    size: u64,
    rows: usize,
    seq: usize,
}

impl Planner<'_> {
    /// The model's forward graph for microbatches of `rows / accum` rows, with `variant`'s
    /// model passes.
    fn forward(&self, variant: Variant, accum: usize) -> Result<memc_ir::Graph> {
        let model_args = crate::cli::ModelArgs::for_plan(
            self.args.model.clone(),
            self.shapes(),
            variant.moc.then(|| "0.25".to_string()),
            variant.reversible,
        );
        let mut import_shapes = crate::cli::shapes(&model_args)?;
        if accum > 1 {
            import_shapes = crate::cli::accum_shapes(import_shapes, accum, &self.model)?;
        }
        crate::cli::import_quiet(&model_args, import_shapes)
    }

    /// The `--shape`s of the global batch: the user's, and the token input's.
    fn shapes(&self) -> Vec<String> {
        let mut shapes = self.args.shapes.clone();
        if !shapes.iter().any(|s| s.starts_with("input_ids=")) {
            shapes.push(format!("input_ids={}x{}", self.rows, self.seq));
        }
        shapes
    }

    /// The shapes and training flags every configuration shares, as `memc compile` takes them.
    fn common_flags(&self) -> Vec<String> {
        let t = &self.args.training;
        fn name(v: impl ValueEnum) -> String {
            v.to_possible_value()
                .map(|p| p.get_name().to_string())
                .unwrap_or_default()
        }
        let mut f = vec![];
        for s in self.shapes() {
            f.extend(["--shape".into(), s]);
        }
        f.extend(["--loss".into(), name(t.loss)]);
        f.extend(["--optimizer".into(), name(t.optimizer)]);
        f.extend(["--momentum".into(), t.momentum.to_string()]);
        f.extend([
            "--betas".into(),
            format!(
                "{},{}",
                t.betas[0],
                t.betas.get(1).copied().unwrap_or(0.999)
            ),
        ]);
        f.extend(["--eps".into(), t.eps.to_string()]);
        if let Some(tr) = &t.trainable {
            f.extend(["--trainable".into(), tr.clone()]);
        }
        if let Some(c) = t.clip_grad_norm {
            f.extend(["--clip-grad-norm".into(), c.to_string()]);
        }
        f
    }

    /// Builds `c`'s program and plans it: its arena and steps, or `None` when the
    /// configuration cannot be built (a budget below the smallest feasible, remat of a fully
    /// reversible stack). `Remat::Min(None)` learns its bytes here.
    fn build(
        &self,
        forward: &memc_ir::Graph,
        base: &TrainOptions,
        c: &mut Candidate,
    ) -> Result<Option<Vec<Work>>> {
        let mut g = forward.clone();
        let opts = options(base, c);
        let mut pm = memc_passes::manager::PassManager::new();
        match memc_passes::train::build_training_with(&mut g, &opts, &mut pm) {
            Ok(_) => {}
            Err(TrainError::Remat(RematError::Infeasible { min, .. })) => {
                if let Remat::Min(None) = c.remat {
                    c.remat = Remat::Min(Some(min));
                    return self.build(forward, base, c);
                }
                return Ok(None);
            }
            Err(TrainError::Remat(_)) => return Ok(None),
            Err(e) => bail!("{}: {}", self.model, crate::train::build_error(e)),
        }
        let (arena, work) = memc_codegen::host::work(&g);
        c.arena = arena;
        Ok(Some(work))
    }

    /// Every single-process configuration at one accumulation count, built and planned (no
    /// time predicted yet): the candidates with their steps, and how many were built.
    fn build_accum(&self, variant: Variant, accum: usize, threads: usize) -> Result<Built> {
        let forward = self.forward(variant, accum)?;
        let base = crate::train::options_for(&forward, &self.args.training)?;
        let remats = [
            Remat::Min(None),
            Remat::Full,
            Remat::Fraction(0.25),
            Remat::Fraction(0.5),
            Remat::Fraction(0.75),
            Remat::Auto,
            Remat::None,
        ];
        let (mut out, mut builds) = (vec![], 0);
        // The loss is the fused, chunked one: the whole logits (`--no-fused-loss`) are not
        // searched. They take more memory, measured slower on every configuration tried
        // (BENCHMARKS.md, "memc plan"), and their kernels over logits larger than the cache
        // run slower per byte than the fused loss's, which calibrate the cost model.
        for remat in remats {
            let mut c = Candidate {
                variant,
                pipe: None,
                accum,
                remat,
                arena: 0,
                secs: 0.0,
                parts: None,
                threads,
            };
            builds += 1;
            if let Some(work) = self.build(&forward, &base, &mut c)? {
                out.push((c, work));
            }
        }
        Ok((out, builds))
    }

    /// Measures the kernels of `variant`'s program at the smallest microbatch (one row),
    /// once per model and compute type (the cache keeps them); the seconds it took.
    fn calibrate(&self, variant: Variant, cost: &mut CostModel) -> Result<f64> {
        let id = self.kernel_id(variant);
        if cost.has_kernels(&id) {
            return Ok(0.0);
        }
        let t0 = Instant::now();
        let accum = *accum_counts(self.rows).last().expect("at least 1");
        let forward = self.forward(variant, accum)?;
        let base = crate::train::options_for(&forward, &self.args.training)?;
        eprintln!(
            "plan: measuring the kernels of {} (one {} program at {}x{}, each step where it runs)",
            self.model,
            if variant.bf16 { "bf16" } else { "f32" },
            self.rows / accum,
            self.seq
        );
        let c = Candidate {
            variant,
            pipe: None,
            accum,
            remat: Remat::Auto,
            arena: 0,
            secs: 0.0,
            parts: None,
            threads: 1,
        };
        let mut g = forward;
        memc_passes::train::build_training_with(
            &mut g,
            &options(&base, &c),
            &mut memc_passes::manager::PassManager::new(),
        )
        .map_err(|e| anyhow!("{}: {}", self.model, crate::train::build_error(e)))?;
        let host = memc_codegen::host::lower(&g, &self.model)
            .map_err(|e| anyhow!("{}: {e}", self.model))?;
        cost.calibrate_kernels(&id, &host)?;
        Ok(t0.elapsed().as_secs_f64())
    }

    fn search(
        &self,
        variants: &[Variant],
        threads: usize,
        memory: u64,
        cost: &mut CostModel,
    ) -> Result<Search> {
        let t0 = Instant::now();
        let mut all = vec![];
        let mut builds = 0;
        let mut calibration = 0.0;
        let accums = accum_counts(self.rows);
        for &variant in variants {
            let id = self.kernel_id(variant);
            // Every configuration is built: the arena is not monotone in any one lever (at small
            // sizes the whole logits can take less than the fused loss's chunks), so no
            // bound prunes exactly. The largest accumulation's program calibrates the kernels;
            // then each accumulation count is imported and built on a thread of its own.
            calibration += self.calibrate(variant, cost)?;
            let built: Vec<Result<Built>> = std::thread::scope(|scope| {
                let handles: Vec<_> = accums
                    .iter()
                    .map(|&accum| scope.spawn(move || self.build_accum(variant, accum, threads)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow!("a planning thread panicked")))
                    })
                    .collect()
            });
            for b in built {
                let (cands, n) = b?;
                builds += n;
                for (mut c, work) in cands {
                    let parts = cost.predict_parts(&id, &work)?.scaled(c.accum as f64);
                    c.secs = parts.total();
                    c.parts = Some(parts);
                    all.push(c);
                }
            }
        }
        Ok(Search::new(
            all,
            memory,
            builds,
            t0.elapsed().as_secs_f64() - calibration,
        ))
    }

    /// The cost model's name for the kernels of `variant` of this model and batch.
    fn kernel_id(&self, variant: Variant) -> String {
        format!(
            "{}:{}:{}x{}:{}",
            self.args
                .model
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            self.size,
            self.rows,
            self.seq,
            if variant.bf16 { "bf16" } else { "f32" }
        )
    }

    /// `--devices N`: every pipeline of P stages × D replicas with P·D = N, under 1F1B, ZB-H1,
    /// V-Half and V-Min (one stage: 1F1B), P, 2P and 4P microbatches per replica, and no,
    /// automatic or per-layer recomputation. Each rank's bytes are what the pipelined
    /// executor allocates for it ([`memc_runtime::pipeline::processes`], its passes planned
    /// without their kernels' code); the step's time is the schedule replayed with each pass's
    /// predicted time, values between stages and the replicas' gradient sums sent at the
    /// measured transport's rate, and the slowest rank's optimizer shard.
    fn search_pipelined(
        &self,
        variants: &[Variant],
        devices: usize,
        threads: usize,
        memory: u64,
        cost: &mut CostModel,
    ) -> Result<Search> {
        let t0 = Instant::now();
        let bw = cost.transport("mpi").unwrap_or(f64::INFINITY);
        let (mut all, mut builds, mut calibration) = (vec![], 0, 0.0);
        let mut refused: Option<anyhow::Error> = None;
        for &variant in variants {
            let id = self.kernel_id(variant);
            calibration += self.calibrate(variant, cost)?;
            for stages in (1..=devices).filter(|&p| devices.is_multiple_of(p)) {
                let replicas = devices / stages;
                let mut counts = vec![stages, 2 * stages, 4 * stages];
                counts.dedup();
                for microbatches in counts {
                    if !self.rows.is_multiple_of(replicas * microbatches) {
                        continue;
                    }
                    let forward = self.forward(variant, replicas * microbatches)?;
                    let base = crate::train::options_for(&forward, &self.args.training)?;
                    let kinds = if stages == 1 {
                        vec![ScheduleKind::OneFOneB]
                    } else {
                        vec![
                            ScheduleKind::OneFOneB,
                            ScheduleKind::ZbH1,
                            ScheduleKind::VHalf,
                            ScheduleKind::VMin,
                        ]
                    };
                    for schedule in kinds {
                        for remat in [Remat::None, Remat::Auto, Remat::Full] {
                            let mut c = Candidate {
                                variant,
                                pipe: Some(Pipe {
                                    stages,
                                    replicas,
                                    microbatches,
                                    schedule,
                                }),
                                accum: 1,
                                remat,
                                arena: 0,
                                secs: 0.0,
                                parts: None,
                                threads,
                            };
                            builds += 1;
                            match self.evaluate_pipe(&forward, &base, &mut c, cost, &id, bw) {
                                Ok(()) => all.push(c),
                                Err(e) => {
                                    refused.get_or_insert(e);
                                }
                            }
                        }
                    }
                }
            }
        }
        if all.is_empty() {
            if let Some(e) = refused {
                return Err(e.context(format!(
                    "--devices {devices}: no pipelined step could be built"
                )));
            }
        }
        Ok(Search::new(
            all,
            memory,
            builds,
            t0.elapsed().as_secs_f64() - calibration,
        ))
    }

    /// A pipelined candidate's largest rank arena and predicted step time.
    fn evaluate_pipe(
        &self,
        forward: &memc_ir::Graph,
        base: &TrainOptions,
        c: &mut Candidate,
        cost: &mut CostModel,
        id: &str,
        bw: f64,
    ) -> Result<()> {
        let pipe = c.pipe.expect("a pipelined candidate");
        // Every rank runs beside the others on this machine's cores.
        let shared = cost.contention(pipe.stages * pipe.replicas);
        let opts = options(base, c);
        let (program, _) =
            crate::pipe::pipelined_program(forward.clone(), &opts, pipe.schedule, pipe.stages)?;
        let schedule =
            memc_passes::pipeline::generate(pipe.schedule, pipe.stages, pipe.microbatches)
                .map_err(|e| anyhow!(e))?;
        let (host, _) = crate::pipe::lower_pipeline(
            &program,
            &schedule,
            &opts,
            self.rows / pipe.replicas,
            pipe.replicas,
            &self.model,
            crate::pipe::PassTarget::Plan,
        )?;
        let ranks: Vec<memc_runtime::pipeline::Planned> =
            memc_runtime::pipeline::processes(&host.program)?
                .into_iter()
                .filter_map(|(_, p)| p.at.is_some().then_some(p))
                .collect();
        c.arena = ranks.iter().map(|p| p.total).max().unwrap_or(0);
        let pl = host.program.pipeline.as_ref().expect("a pipelined program");
        // Each pass run: its steps, then the executor copies every output out of the pass's
        // arena (and adds the averaged ones, its weight gradients, into their sums). Each
        // step: every pass's weights copied into its arena.
        let (per_output, per_copy) = cost.pass_rates();
        let mut secs_of = std::collections::HashMap::new();
        let mut weight_copies = vec![0.0; pipe.stages];
        for sp in &pl.passes {
            let out: u64 = sp.program.outputs.iter().map(|o| o.bytes()).sum();
            let run = cost
                .predict_parts(id, &Work::of_program(&sp.program))?
                .total_at(shared);
            secs_of.insert(sp.label.clone(), run + out as f64 * per_output);
            let weights: u64 = sp
                .program
                .params
                .iter()
                .filter(|q| q.role == memc_runtime::program::Role::Weight)
                .map(|q| q.slot.bytes())
                .sum();
            if let Some(w) = weight_copies.get_mut(sp.device as usize) {
                *w += weights as f64 * per_copy;
            }
        }
        let weight_copies = weight_copies.into_iter().fold(0.0, f64::max);
        // What crosses between stages: one microbatch's hidden states.
        let comm = hidden_bytes(forward) as f64 / bw;
        let label = |p: Pass| {
            let k = match p.kind {
                Kind::F => "F",
                Kind::B => "B",
                Kind::W => "W",
            };
            format!("{k}{}", p.chunk)
        };
        let sim = memc_passes::pipeline::simulate_with(
            &schedule,
            &|p| secs_of.get(&label(p)).copied().unwrap_or(0.0),
            comm,
        )
        .map_err(|e| anyhow!("{e}"))?;
        let late = match &pl.late {
            Some(l) => {
                cost.predict_parts(id, &Work::of_program(&l.program))?
                    .total_at(shared)
                    * pipe.microbatches as f64
            }
            None => 0.0,
        };
        let mut update: f64 = 0.0;
        for u in &pl.updates {
            update = update.max(
                cost.predict_parts(id, &Work::of_program(&u.program))?
                    .total_at(shared),
            );
        }
        // Replicas exchange their gradient sums and the updated weights of their shards.
        let most = |f: fn(&memc_runtime::pipeline::Planned) -> u64| {
            ranks.iter().map(f).max().unwrap_or(0) as f64
        };
        let replicas = if pipe.replicas > 1 {
            (2.0 * most(|p| p.gradient_sums) + most(|p| p.weights)) / bw
        } else {
            0.0
        };
        c.secs = weight_copies + sim.makespan + late + update + replicas;
        Ok(())
    }

    /// The error for a budget nothing fits: the smallest memory any configuration reaches and
    /// its levers, and what the levers `--allow` did not name would reach.
    fn infeasible(&self, search: &Search, memory: u64) -> anyhow::Error {
        let Some(min) = search.all.iter().min_by_key(|c| c.arena) else {
            return anyhow!(
                "{}: no configuration could be built for --global-batch {}x{}",
                self.model,
                self.rows,
                self.seq
            );
        };
        let mut more = vec![];
        for (lever, v) in [
            (AllowArg::Bf16, "bf16"),
            (AllowArg::Moc, "moc"),
            (AllowArg::Reversible, "reversible"),
        ] {
            if self.args.allow.contains(&lever) || min.pipe.is_some() {
                continue;
            }
            let variant = Variant {
                bf16: lever == AllowArg::Bf16,
                moc: lever == AllowArg::Moc,
                reversible: lever == AllowArg::Reversible,
            };
            let reached = (|| -> Result<Option<u64>> {
                let forward = self.forward(variant, min.accum)?;
                let base = crate::train::options_for(&forward, &self.args.training)?;
                let mut c = Candidate {
                    variant,
                    remat: if variant.reversible {
                        Remat::Auto
                    } else {
                        min.remat
                    },
                    ..min.clone()
                };
                Ok(self.build(&forward, &base, &mut c)?.map(|_| c.arena))
            })();
            if let Ok(Some(b)) = reached {
                if b < min.arena {
                    more.push(format!("--allow {v} reaches {} bytes", group(b)));
                }
            }
        }
        anyhow!(
            "{}: no configuration fits --memory {} bytes per device: the smallest arena any reaches is {} bytes, with {}{}; give at least that much memory",
            self.model,
            group(memory),
            group(min.arena),
            min.describe(),
            if more.is_empty() {
                String::new()
            } else {
                format!(" ({})", more.join(", "))
            }
        )
    }
}

/// The bytes of one microbatch's hidden states (the embedding's output), which a pipeline
/// sends from stage to stage.
fn hidden_bytes(g: &memc_ir::Graph) -> u64 {
    g.nodes()
        .iter()
        .find(|n| {
            matches!(n.op, memc_ir::Op::Gather { .. })
                && matches!(&g.value(n.inputs[1]).def, memc_ir::ValueDef::Input { name } if name == "input_ids")
        })
        .map_or(0, |n| g.value(n.outputs[0]).ty.bytes() as u64)
}

/// Measures the transport pipelined steps use: `mpirun -n 2 memc comm-probe` ([`comm_probe`]).
fn probe_transport(devices: usize) -> Result<f64> {
    let exe = std::env::current_exe().context("memc's own path")?;
    let mut cmd = std::process::Command::new("mpirun");
    // SAFETY: geteuid only reads the process's user id.
    if unsafe { libc::geteuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    let out = cmd
        .args(["--oversubscribe", "-n", "2"])
        .arg(exe)
        .arg("comm-probe")
        .output()
        .map_err(|e| anyhow!("--devices {devices}: measuring the transport needs mpirun (Open MPI) on the PATH: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["bytes_per_sec"].as_f64())
        .ok_or_else(|| {
            anyhow!(
                "--devices {devices}: the transport probe (mpirun -n 2 memc comm-probe) failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("no output")
            )
        })
}

/// `memc comm-probe` (hidden; run by `memc plan --devices N` under `mpirun -n 2`): rank 0
/// sends 32 MiB to rank 1 and back five times after a first round, and prints the bytes per
/// second one way as JSON.
pub fn comm_probe() -> Result<()> {
    use memc_runtime::transport::Transport;
    let mpi = memc_runtime::mpi::Mpi::init(2, 1).map_err(|e| anyhow!("comm-probe: {e}"))?;
    let bytes = vec![0x3cu8; 32 << 20];
    let rounds = 6u64;
    let mut t0 = Instant::now();
    for i in 0..rounds {
        if i == 1 {
            t0 = Instant::now();
        }
        if mpi.rank() == 0 {
            mpi.send(1, i, 0, "probe", &bytes)?;
            mpi.recv(1, i, 0, "probe")?;
        } else {
            let b = mpi.recv(0, i, 0, "probe")?;
            mpi.send(0, i, 0, "probe", &b)?;
        }
    }
    if mpi.rank() == 0 {
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"bytes_per_sec": 2.0 * (rounds - 1) as f64 * bytes.len() as f64 / secs})
        );
    }
    Ok(())
}

/// An SVG of every configuration's arena against its predicted step time: the Pareto front
/// joined, the chosen one marked, the budget as a vertical line.
fn plot_svg(all: &[Candidate], front: &[usize], chosen: usize, memory: u64, title: &str) -> String {
    let (w, h, m) = (720.0, 440.0, 70.0);
    let max_b = all.iter().map(|c| c.arena).max().unwrap_or(1).max(memory) as f64 * 1.05;
    let max_t = all.iter().map(|c| c.secs).fold(0.0, f64::max) * 1.1;
    let min_t = all.iter().map(|c| c.secs).fold(f64::INFINITY, f64::min) * 0.9;
    let x = |b: u64| m + (w - 2.0 * m) * b as f64 / max_b;
    let y = |t: f64| h - m - (h - 2.0 * m) * (t - min_t) / (max_t - min_t).max(1e-9);
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;");
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{m}\" y=\"24\" font-size=\"14\">memc plan: {}</text>\n",
        esc(title)
    );
    s += &format!(
        "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/><line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - m, w - m, h - m, h - m
    );
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">arena bytes per device (max {:.2} GB)</text>\n<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">predicted step (s), {:.2} to {:.2}</text>\n",
        w / 2.0, h - 30.0, max_b / 1e9, h / 2.0, h / 2.0, min_t, max_t
    );
    let bx = x(memory);
    s += &format!(
        "<line x1=\"{bx:.1}\" y1=\"{m}\" x2=\"{bx:.1}\" y2=\"{}\" stroke=\"red\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{}\" fill=\"red\">--memory</text>\n",
        h - m, bx + 4.0, m + 12.0
    );
    let pts: Vec<String> = front
        .iter()
        .map(|&i| format!("{:.1},{:.1}", x(all[i].arena), y(all[i].secs)))
        .collect();
    s += &format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n",
        pts.join(" ")
    );
    for (i, c) in all.iter().enumerate() {
        let (cx, cy) = (x(c.arena), y(c.secs));
        let (r, fill) = if i == chosen {
            (7.0, "#d62728")
        } else if front.contains(&i) {
            (4.5, "#1f77b4")
        } else {
            (3.0, "#999999")
        };
        s += &format!(
            "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"{r}\" fill=\"{fill}\"><title>{}: {} bytes, {:.3} s</title></circle>\n",
            esc(&c.describe()),
            c.arena,
            c.secs
        );
    }
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#d62728\">chosen: {}</text>\n</svg>\n",
        m + 8.0,
        m + 12.0,
        esc(&all[chosen].describe())
    );
    s
}

/// `memc compile|train ... --plan FILE`: the plan's flags in place of `--plan FILE`, after
/// checking that the plan was made for this model and that no flag it sets is also given.
pub fn expand_plan(argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let sub = argv.get(1).and_then(|s| s.to_str()).unwrap_or("");
    let at = argv
        .iter()
        .position(|a| a == "--plan" || a.to_str().is_some_and(|s| s.starts_with("--plan=")));
    let Some(at) = at else {
        return Ok(argv);
    };
    if sub != "compile" && sub != "train" {
        bail!("--plan is read by memc compile and memc train");
    }
    let (path, width) = match argv[at].to_str().and_then(|s| s.strip_prefix("--plan=")) {
        Some(p) => (PathBuf::from(p), 1),
        None => (
            argv.get(at + 1)
                .map(PathBuf::from)
                .ok_or_else(|| anyhow!("--plan needs a FILE (written by memc plan)"))?,
            2,
        ),
    };
    let file = path.display().to_string();
    let text = std::fs::read_to_string(&path).with_context(|| format!("--plan {file}"))?;
    let plan: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("--plan {file}: not a plan written by memc plan ({e})"))?;
    let key = if sub == "compile" {
        "compile_flags"
    } else {
        "train_flags"
    };
    let flags: Vec<String> = plan[key]
        .as_array()
        .and_then(|a| a.iter().map(|v| v.as_str().map(String::from)).collect())
        .ok_or_else(|| anyhow!("--plan {file}: not a plan written by memc plan (no {key})"))?;
    let model = plan["model"].as_str().unwrap_or_default();
    let same = |a: &Path| {
        std::fs::canonicalize(a)
            .ok()
            .is_some_and(|x| std::fs::canonicalize(model).ok().is_some_and(|y| x == y))
    };
    let rest: Vec<&OsString> = argv
        .iter()
        .enumerate()
        .filter(|&(i, _)| i < at || i >= at + width)
        .map(|(_, a)| a)
        .collect();
    if !rest.iter().skip(2).any(|a| same(Path::new(a))) {
        bail!("--plan {file} was made for {model}: plan this model with memc plan first");
    }
    for f in flags.iter().filter(|f| f.starts_with("--")) {
        if f != "--shape"
            && rest.iter().any(|a| {
                a.to_str()
                    .is_some_and(|s| s == f || s.starts_with(&format!("{f}=")))
            })
        {
            bail!("--plan {file} sets {f}: leave it out, or plan again");
        }
    }
    if rest.iter().any(|a| {
        a.to_str()
            .is_some_and(|s| s == "--shape" || s.starts_with("--shape="))
    }) {
        bail!("--plan {file} sets the shapes (--shape): leave them out, or plan again");
    }
    let mut out: Vec<OsString> = rest.into_iter().cloned().collect();
    out.extend(flags.into_iter().map(OsString::from));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulation_counts_divide_the_rows() {
        assert_eq!(accum_counts(8), vec![1, 2, 4, 8]);
        assert_eq!(accum_counts(6), vec![1, 2, 6]);
        assert_eq!(accum_counts(1), vec![1]);
    }

    #[test]
    fn the_front_keeps_what_nothing_beats() {
        let c = |arena, secs| Candidate {
            variant: Variant {
                bf16: false,
                moc: false,
                reversible: false,
            },
            pipe: None,
            accum: 1,
            remat: Remat::Auto,
            arena,
            secs,
            parts: None,
            threads: 1,
        };
        let all = vec![c(10, 5.0), c(20, 4.0), c(30, 4.5), c(40, 1.0)];
        assert_eq!(pareto(&all), vec![0, 1, 3]);
    }
}
