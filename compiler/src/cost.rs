//! `memc plan`'s cost model: a training step's time predicted from the times of its steps,
//! each measured on this machine, never from a whole candidate configuration run.
//!
//! - **GEMMs** are timed alone on the runtime's GEMM ([`memc_runtime::cost::time_gemm`]) at
//!   their shape, or, when larger than [`GEMM_CAP_FLOPS`], at the shape with its largest
//!   dimensions halved until under it, scaled by the FLOPs (the GEMM runs at its full rate
//!   well below the cap).
//!   A GEMM in a whole run is slower than alone (its operands not in cache): predictions
//!   scale the GEMMs by how much slower the calibration program's ran in its runs than
//!   each run again at once.
//! - **Attention** parts are timed alone ([`memc_runtime::cost::time_attention`]) with one
//!   sequence of the batch, scaled by the batch; those the calibration program runs (one
//!   sequence), where they ran in it.
//! - **Generated kernels** (elementwise, reductions, norms, layout copies) move bytes: each
//!   profile label's seconds per byte are measured once per model and compute type, by timing
//!   every step of one compiled program where it runs in whole runs of it
//!   ([`memc_runtime::cpu::Cpu::time_run`]: operands in cache or not as the steps before
//!   left them, the pool's threads woken as in training), each run from a training-like state
//!   ([`memc_runtime::cost::training_state`]), and dividing each label's time by its bytes.
//! - **The transport** (pipelined and data-parallel steps): one buffer sent back and forth
//!   between two ranks under `mpirun` ([`crate::planner`]'s probe).
//! - **Ranks sharing the machine** (`--devices N` on one machine's cores): a GEMM and a copy
//!   probe run in R threads at once against alone; each rank's GEMMs and kernels are scaled
//!   by the ratios ([`CostModel::contention`]).
//!
//! Times depend on the machine and the thread count: they are kept in one JSON file per
//! (CPU model, cores, threads) under `$MEMC_COST_CACHE` (default `~/.cache/memc/costs`; `off`
//! keeps nothing), so a second plan on the same machine measures only what is new.

use anyhow::{anyhow, Result};
use memc_codegen::host::{HostProgram, Work};
use memc_runtime::attention::Spec;
use memc_runtime::program::{Dtype, Step};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

/// A GEMM above this many FLOPs is timed at a smaller shape and scaled.
pub const GEMM_CAP_FLOPS: f64 = 1.0e9;
/// Runs per timing (after one warm-up); the fastest is kept.
const REPS: usize = 5;
/// Whole runs of the calibration program timed step by step (the first touching its pages);
/// each step's fastest is kept.
const RUNS: usize = 3;
/// The cache's format.
const VERSION: u32 = 3;

#[derive(Debug, Default, Serialize, Deserialize)]
struct Table {
    version: u32,
    machine: String,
    threads: usize,
    /// Seconds per GEMM, by its measured shape.
    gemm: BTreeMap<String, f64>,
    /// Seconds per attention part, by its measured spec.
    attention: BTreeMap<String, f64>,
    /// Seconds per byte of each generated kernel's label, by model and compute type.
    kernels: BTreeMap<String, BTreeMap<String, f64>>,
    /// How much slower each model's calibration program's GEMMs ran in its whole runs than
    /// run again at once, their operands in cache (as GEMMs are timed alone): the GEMMs of
    /// its predictions are scaled by it.
    #[serde(default)]
    gemm_in_run: BTreeMap<String, f64>,
    /// Bytes per second one rank sends another, by transport (`mpi`).
    #[serde(default)]
    transport: BTreeMap<String, f64>,
    /// The fastest times of the speed probes seen on this machine ([`CostModel::speed`]).
    #[serde(default)]
    probe: Option<Probe>,
}

/// The fastest times of two small reference workloads: a GEMM (compute) and a copy (memory);
/// 0 until seen.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct Probe {
    gemm: f64,
    copy: f64,
}

/// A ratio of speeds per kind of work: how fast the machine runs now against the fastest it
/// was seen to (a measurement taken now times this is what it takes at full speed), or how
/// much slower a rank runs beside others ([`CostModel::contention`]).
#[derive(Debug, Clone, Copy)]
pub struct Speed {
    /// GEMMs and attention.
    pub compute: f64,
    /// Generated kernels.
    pub memory: f64,
}

/// What calibration measured in this run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Measured {
    /// GEMM shapes timed.
    pub gemms: usize,
    /// Attention parts timed.
    pub attentions: usize,
    /// Programs whose kernels were timed.
    pub programs: usize,
    /// Seconds spent measuring.
    pub secs: f64,
}

impl Measured {
    /// Adds what another cost model measured.
    pub fn add(&mut self, other: &Measured) {
        self.gemms += other.gemms;
        self.attentions += other.attentions;
        self.programs += other.programs;
        self.secs += other.secs;
    }
}

/// A GEMM this run measured: its key, element type, measured shapes and transposes.
type FreshGemm = (String, Dtype, Vec<usize>, Vec<usize>, (bool, bool));

/// A predicted time by the kind of step, in seconds.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Parts {
    /// The GEMMs.
    pub gemm: f64,
    /// The attention parts.
    pub attention: f64,
    /// The generated kernels.
    pub kernels: f64,
}

impl Parts {
    /// The whole time.
    pub fn total(&self) -> f64 {
        self.gemm + self.attention + self.kernels
    }

    /// The whole time with GEMMs and attention scaled by `s.compute` and kernels by
    /// `s.memory`.
    pub fn total_at(&self, s: Speed) -> f64 {
        (self.gemm + self.attention) * s.compute + self.kernels * s.memory
    }

    /// Every part times `k`.
    pub fn scaled(self, k: f64) -> Parts {
        Parts {
            gemm: self.gemm * k,
            attention: self.attention * k,
            kernels: self.kernels * k,
        }
    }
}

/// The cost model of this machine at one thread count.
pub struct CostModel {
    table: Table,
    file: Option<PathBuf>,
    dirty: bool,
    /// What this run measured, to measure once more ([`CostModel::remeasure`]).
    fresh_gemms: Vec<FreshGemm>,
    fresh_attention: Vec<(String, Spec)>,
    /// What this run measured (the rest came from the cache).
    pub measured: Measured,
}

/// This machine, for the cache: the CPU's model name and its cores.
pub fn machine() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{name}, {cores} cores")
}

fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("MEMC_COST_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/memc/costs")),
    }
}

/// An attention part's key in the table: the part for one sequence of its batch, that part,
/// and the batch.
fn one_sequence(spec: &Spec) -> (String, Spec, usize) {
    let batch = spec.q[0].max(1);
    let mut one = spec.clone();
    one.q[0] = 1;
    one.k[0] = 1;
    if one.mask.len() == 4 && one.mask[0] == batch {
        one.mask[0] = 1;
    }
    (format!("{one:?}"), one, batch)
}

/// The compute probe: seconds for a 384³ f32 GEMM (fastest of three).
fn probe_gemm() -> f64 {
    memc_runtime::cost::time_gemm(Dtype::F32, &[384, 384], &[384, 384], (false, false), 3)
        .unwrap_or(0.0)
}

/// The memory probe: seconds per byte of a 32 MiB copy (fastest of three).
fn probe_copy() -> f64 {
    memc_runtime::cost::time_copy(32 << 20, 3)
}

/// Keeps `now` in `best` when faster (`best` 0: none seen yet).
fn keep_best(best: &mut f64, now: f64) {
    if *best <= 0.0 || now < *best {
        *best = now;
    }
}

/// `best / now`, at most 1 (1 when nothing was measured).
fn speed_ratio(best: f64, now: f64) -> f64 {
    if now > 0.0 {
        (best / now).min(1.0)
    } else {
        1.0
    }
}

fn flops(a: &[usize], b: &[usize]) -> f64 {
    let g = memc_runtime::gemm::Geometry::of(a, b).expect("a GEMM of the program");
    2.0 * (g.count * g.m * g.k * g.n) as f64
}

/// The shapes a GEMM is timed at: its own, or its largest dims (rows, the contraction,
/// columns, the batch) halved until it is under [`GEMM_CAP_FLOPS`].
fn reduced(a: &[usize], b: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    if a.len() < 2 || b.len() < 2 {
        return (a, b);
    }
    while flops(&a, &b) > GEMM_CAP_FLOPS {
        let (ra, rb) = (a.len(), b.len());
        // Candidates: m (a[-2]), k (a[-1] = b[-2]), n (b[-1]), a's and b's batch dims.
        let mut dims = vec![(a[ra - 2], 0usize), (a[ra - 1], 1), (b[rb - 1], 2)];
        if ra > 2 && a[0] > 1 && (rb == 2 || b[0] == a[0] || b[0] == 1) {
            dims.push((a[0], 3));
        }
        let (size, which) = dims.into_iter().max().expect("candidates");
        if size < 128 {
            break;
        }
        let half = size.div_ceil(2);
        match which {
            0 => a[ra - 2] = half,
            1 => {
                a[ra - 1] = half;
                b[rb - 2] = half;
            }
            2 => b[rb - 1] = half,
            _ => {
                if rb > 2 && b[0] == a[0] {
                    b[0] = half;
                }
                a[0] = half;
            }
        }
    }
    (a, b)
}

impl CostModel {
    /// The model for `threads` threads (the pool is set to them), with what the cache holds.
    pub fn open(threads: usize, recalibrate: bool) -> Result<CostModel> {
        memc_runtime::gemm::set_threads(threads).map_err(|e| anyhow!(e))?;
        let machine = machine();
        let file = cache_dir().map(|d| {
            let name: String = format!("{machine}-t{threads}")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            d.join(format!("{name}.json"))
        });
        let fresh = || Table {
            version: VERSION,
            machine: machine.clone(),
            threads,
            ..Table::default()
        };
        let table = match (&file, recalibrate) {
            (Some(f), false) => std::fs::read(f)
                .ok()
                .and_then(|b| serde_json::from_slice::<Table>(&b).ok())
                .filter(|t| t.version == VERSION && t.machine == machine && t.threads == threads)
                .unwrap_or_else(fresh),
            _ => fresh(),
        };
        Ok(CostModel {
            table,
            file,
            dirty: false,
            fresh_gemms: vec![],
            fresh_attention: vec![],
            measured: Measured::default(),
        })
    }

    /// Where the measurements are kept (`None`: `MEMC_COST_CACHE=off`).
    pub fn file(&self) -> Option<&PathBuf> {
        self.file.as_ref()
    }

    /// Writes what this run measured to the cache (a cache that cannot be written is
    /// skipped: it only saves time).
    pub fn save(&mut self) {
        let (Some(f), true) = (&self.file, self.dirty) else {
            return;
        };
        let Ok(text) = serde_json::to_vec_pretty(&self.table) else {
            return;
        };
        if f.parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && memc_runtime::weights::write_atomically_with(f, |p| std::fs::write(p, &text)).is_ok()
        {
            self.dirty = false;
        }
    }

    /// Bytes per second through `transport`, if measured.
    pub fn transport(&self, transport: &str) -> Option<f64> {
        self.table.transport.get(transport).copied()
    }

    /// Keeps a measured transport bandwidth.
    pub fn set_transport(&mut self, transport: &str, bytes_per_sec: f64) {
        self.table
            .transport
            .insert(transport.to_string(), bytes_per_sec);
        self.dirty = true;
    }

    /// Seconds per byte of a pipelined pass's output handled by the executor (copied out,
    /// added into its sum) and of a copy (weights into a pass's arena), measured once.
    pub fn pass_rates(&mut self) -> (f64, f64) {
        for (key, f) in [
            (
                "pass-output",
                memc_runtime::cost::time_pass_output as fn(usize, usize) -> f64,
            ),
            ("copy", memc_runtime::cost::time_copy),
        ] {
            if !self.table.transport.contains_key(key) {
                let t0 = Instant::now();
                let rate = f(32 << 20, REPS);
                self.table.transport.insert(key.to_string(), rate);
                self.dirty = true;
                self.measured.secs += t0.elapsed().as_secs_f64();
            }
        }
        (
            self.table.transport["pass-output"],
            self.table.transport["copy"],
        )
    }

    /// The machine's speed now ([`Speed`]): the probes timed (a 384³ GEMM, a 32 MiB copy,
    /// the fastest of three each, a few milliseconds) against the fastest times this machine
    /// has shown them (kept with the cache). A shared machine has slow spells of seconds to
    /// minutes, under other tenants' work; a calibration taken in one would skew every
    /// prediction it feeds, so each measurement is scaled by the speed measured just before
    /// it.
    fn speed(&mut self) -> Speed {
        let compute = self.compute_speed();
        let copy = probe_copy();
        let best = &mut self.table.probe.get_or_insert_default().copy;
        keep_best(best, copy);
        Speed {
            compute,
            memory: speed_ratio(*best, copy),
        }
    }

    /// [`CostModel::speed`]'s compute part alone (the GEMM probe), before a GEMM or an
    /// attention part is timed.
    fn compute_speed(&mut self) -> f64 {
        let gemm = probe_gemm();
        let best = &mut self.table.probe.get_or_insert_default().gemm;
        keep_best(best, gemm);
        speed_ratio(*best, gemm)
    }

    /// How much slower one rank's work runs while `ranks` ranks share this machine (each on
    /// this model's threads): the GEMM and copy probes run alone, then in `ranks` threads at
    /// once, the fastest of three rounds each; `compute` and `memory` are together / alone
    /// (at least 1). Ranks on one machine share its cache and memory bandwidth (and, on a
    /// virtual machine, maybe the cores' other hardware threads), which the cost model's
    /// times, measured with the machine to themselves, do not see. Kept in the cache.
    pub fn contention(&mut self, ranks: usize) -> Speed {
        let key = |k: &str| format!("contention-{k}-{ranks}");
        if let (Some(&c), Some(&m)) = (
            self.table.transport.get(&key("compute")),
            self.table.transport.get(&key("memory")),
        ) {
            return Speed {
                compute: c,
                memory: m,
            };
        }
        let t0 = Instant::now();
        let ratio = |f: &(dyn Fn() -> f64 + Sync)| {
            let (mut alone, mut together) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..3 {
                alone = alone.min(f());
                together = together.min(memc_runtime::cost::time_together(ranks, f));
            }
            if alone > 0.0 && together.is_finite() {
                (together / alone).max(1.0)
            } else {
                1.0
            }
        };
        let speed = Speed {
            compute: ratio(&probe_gemm),
            memory: ratio(&probe_copy),
        };
        self.table.transport.insert(key("compute"), speed.compute);
        self.table.transport.insert(key("memory"), speed.memory);
        self.dirty = true;
        self.measured.secs += t0.elapsed().as_secs_f64();
        speed
    }

    /// Measures once more, seconds later, every GEMM and attention part this run measured,
    /// keeping the faster time: a shared machine's slow spells last seconds, and a table
    /// measured in one would skew every prediction it feeds. Returns whether anything was.
    pub fn remeasure(&mut self) -> bool {
        let t0 = Instant::now();
        let again = !self.fresh_gemms.is_empty() || !self.fresh_attention.is_empty();
        for (key, dtype, a, b, trans) in std::mem::take(&mut self.fresh_gemms) {
            let speed = self.compute_speed();
            if let Some(t) = memc_runtime::cost::time_gemm(dtype, &a, &b, trans, REPS) {
                let t = t * speed;
                let e = self.table.gemm.entry(key).or_insert(t);
                *e = e.min(t);
            }
        }
        for (key, spec) in std::mem::take(&mut self.fresh_attention) {
            let speed = self.compute_speed();
            let t = memc_runtime::cost::time_attention(&spec, REPS) * speed;
            let e = self.table.attention.entry(key).or_insert(t);
            *e = e.min(t);
        }
        self.measured.secs += t0.elapsed().as_secs_f64();
        again
    }

    /// Whether `model`'s kernels have been measured.
    pub fn has_kernels(&self, model: &str) -> bool {
        self.table.kernels.contains_key(model)
    }

    /// Measures each generated kernel of `host` (a compiled program of the model `model`)
    /// where it runs in whole runs of the program, and keeps each label's seconds per byte
    /// (and the time of each attention part of one sequence it runs).
    /// Every run starts from the same training-like state
    /// ([`memc_runtime::cost::training_state`]): runs repeated on what earlier runs left
    /// drift (the optimizer applied to stale gradients) until the weights overflow, and
    /// kernels time several times slower on NaNs than on what training meets.
    pub fn calibrate_kernels(&mut self, model: &str, host: &HostProgram) -> Result<()> {
        let t0 = Instant::now();
        let program = &host.program;
        let state = memc_runtime::cost::training_state(program);
        let times = host
            .with_kernels(|kernels| -> Result<Vec<(f64, f64)>> {
                // SAFETY: `kernels` are the JIT-compiled entries of this program's own kernels.
                let mut cpu = unsafe { memc_runtime::cpu::Cpu::new(program.checked()?, kernels) };
                let reset = |cpu: &mut memc_runtime::cpu::Cpu| {
                    for (slot, bytes) in &state {
                        cpu.arena_mut().set(slot, bytes);
                    }
                };
                // The first run touches every page (a page never written reads as the zero
                // page, always in cache, which would time kernels fast), which slows some of
                // its steps: each step's fastest run is kept. The last run times each GEMM
                // again at once. (A whole run of the 12-layer d768 Llama's 1 x 1024 program
                // takes seconds.)
                // Each run is scaled by the machine's speed just before it: generated kernels
                // (memory-bound) by the copy probe's, GEMMs and attention by the GEMM's.
                let memory_bound: Vec<bool> = program
                    .steps
                    .iter()
                    .map(|s| matches!(s, Step::Kernel { native: None, .. }))
                    .collect();
                let mut steps = vec![(f64::INFINITY, f64::INFINITY); program.steps.len()];
                for run in 0..RUNS {
                    reset(&mut cpu);
                    let speed = self.speed();
                    let times = cpu.time_run(run + 1 == RUNS);
                    for ((s, (t, again)), &mem) in steps.iter_mut().zip(times).zip(&memory_bound) {
                        let k = if mem { speed.memory } else { speed.compute };
                        s.0 = s.0.min(t * k);
                        if let Some(a) = again {
                            s.1 = s.1.min(a * k);
                        }
                    }
                }
                Ok(steps)
            })
            .map_err(|e| anyhow!("{e}"))??;
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        let mut attention: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        let (mut ran, mut again) = (0.0, 0.0);
        for (step, (t, warm)) in program.steps.iter().zip(times) {
            // Each GEMM where it ran and run again at once.
            if let Step::Gemm { .. } = step {
                ran += t;
                again += warm;
            }
            // The attention parts of one sequence, as they run in a whole step (the table's
            // parts timed alone otherwise).
            if let Step::Kernel {
                native: Some(memc_runtime::program::Native::Attention(spec)),
                ..
            } = step
            {
                let (key, _, batch) = one_sequence(spec);
                if batch == 1 {
                    let e = attention.entry(key).or_default();
                    e.0 += t;
                    e.1 += 1;
                }
            }
            if let Step::Kernel {
                args,
                label,
                native: None,
                ..
            } = step
            {
                let bytes: u64 = args.iter().map(|b| b.bytes).sum();
                let e = sums.entry(label.clone()).or_default();
                e.0 += t;
                e.1 += bytes as f64;
            }
        }
        let total = sums
            .values()
            .fold((0.0, 0.0), |a, v| (a.0 + v.0, a.1 + v.1));
        let mut rates: BTreeMap<String, f64> = sums
            .into_iter()
            .map(|(l, (t, b))| (l, t / b.max(1.0)))
            .collect();
        rates.insert(String::new(), total.0 / total.1.max(1.0));
        for (key, (t, n)) in attention {
            self.table.attention.insert(key, t / n as f64);
        }
        self.table.gemm_in_run.insert(
            model.to_string(),
            if again > 0.0 {
                (ran / again).clamp(1.0, 2.0)
            } else {
                1.0
            },
        );
        self.table.kernels.insert(model.to_string(), rates);
        self.dirty = true;
        self.measured.programs += 1;
        self.measured.secs += t0.elapsed().as_secs_f64();
        Ok(())
    }

    fn gemm_secs(&mut self, dtype: Dtype, a: &[usize], b: &[usize], trans: (bool, bool)) -> f64 {
        let (ra, rb) = reduced(a, b);
        let key = format!("{dtype:?} {ra:?}x{rb:?} {}{}", trans.0 as u8, trans.1 as u8);
        let t = match self.table.gemm.get(&key) {
            Some(&t) => t,
            None => {
                let t0 = Instant::now();
                let speed = self.compute_speed();
                let t = memc_runtime::cost::time_gemm(dtype, &ra, &rb, trans, REPS).unwrap_or(0.0)
                    * speed;
                self.table.gemm.insert(key.clone(), t);
                self.fresh_gemms
                    .push((key, dtype, ra.clone(), rb.clone(), trans));
                self.dirty = true;
                self.measured.gemms += 1;
                self.measured.secs += t0.elapsed().as_secs_f64();
                t
            }
        };
        t * flops(a, b) / flops(&ra, &rb).max(1.0)
    }

    fn attention_secs(&mut self, spec: &Spec) -> f64 {
        let (key, one, batch) = one_sequence(spec);
        let t = match self.table.attention.get(&key) {
            Some(&t) => t,
            None => {
                let t0 = Instant::now();
                let speed = self.compute_speed();
                let t = memc_runtime::cost::time_attention(&one, REPS) * speed;
                self.table.attention.insert(key.clone(), t);
                self.fresh_attention.push((key, one.clone()));
                self.dirty = true;
                self.measured.attentions += 1;
                self.measured.secs += t0.elapsed().as_secs_f64();
                t
            }
        };
        t * batch as f64
    }

    /// Seconds for one run of the program whose steps are `work`, of the model `model` (whose
    /// kernels must have been calibrated), by the kind of step: the sums of its steps' times.
    pub fn predict_parts(&mut self, model: &str, work: &[Work]) -> Result<Parts> {
        let rates = self
            .table
            .kernels
            .get(model)
            .ok_or_else(|| anyhow!("the cost model has no kernel times for {model}"))?
            .clone();
        let fallback = rates.get("").copied().unwrap_or(0.0);
        let in_run = self.table.gemm_in_run.get(model).copied().unwrap_or(1.0);
        let mut parts = Parts::default();
        for w in work {
            match w {
                Work::Gemm {
                    dtype,
                    a_shape,
                    b_shape,
                    trans,
                } => parts.gemm += in_run * self.gemm_secs(*dtype, a_shape, b_shape, *trans),
                Work::Native(memc_runtime::program::Native::Attention(spec)) => {
                    parts.attention += self.attention_secs(spec)
                }
                Work::Kernel { label, bytes } => {
                    parts.kernels += rates.get(label).copied().unwrap_or(fallback) * *bytes as f64
                }
            }
        }
        Ok(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_gemms_are_timed_under_the_cap_at_their_proportions() {
        let (a, b) = reduced(&[8, 512, 512], &[512, 1408]);
        assert!(flops(&a, &b) <= GEMM_CAP_FLOPS, "{a:?} {b:?}");
        assert_eq!(a[a.len() - 1], b[0], "the contraction stays shared");
        // Small ones are timed as they are.
        assert_eq!(reduced(&[64, 64], &[64, 64]), (vec![64, 64], vec![64, 64]));
        // A batched product with a batched right operand halves both batches.
        let (a, b) = reduced(&[64, 1024, 64], &[64, 64, 1024]);
        assert_eq!(a[0], b[0]);
        assert!(flops(&a, &b) <= GEMM_CAP_FLOPS);
    }
}
