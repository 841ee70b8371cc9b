//! `memc plan`'s cost model: a training step's time predicted from the times of its steps,
//! each measured on this machine, never from a whole candidate configuration run.
//!
//! - **GEMMs** are timed alone on the runtime's GEMM ([`memc_runtime::cost::time_gemm`]) at
//!   their shape, or, when larger than [`GEMM_CAP_FLOPS`], at the shape with its largest
//!   dimensions halved until under it, scaled by the FLOPs (the GEMM runs at its full rate
//!   well below the cap).
//! - **Attention** parts are timed alone ([`memc_runtime::cost::time_attention`]) with one
//!   sequence of the batch, scaled by the batch.
//! - **Generated kernels** (elementwise, reductions, norms, layout copies) move bytes: each
//!   profile label's seconds per byte are measured once per model and compute type, by running
//!   every step of one compiled program alone ([`memc_runtime::cpu::Cpu::time_steps`]) and
//!   dividing each label's time by its bytes.
//! - **Each step's overhead in a run** (the pool's threads woken for it, operands not left in
//!   cache by a repetition): that program's run as a whole, less the sum of its steps alone,
//!   divided by its steps. This is the one whole-program time calibration takes: a constant
//!   of the machine and model, never a candidate's time.
//! - **The transport** (pipelined and data-parallel steps): one buffer sent back and forth
//!   between two ranks under `mpirun` ([`crate::planner`]'s probe).
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
/// The cache's format.
const VERSION: u32 = 2;

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
    /// Seconds each step costs beyond its time alone (waking the threads, operands not in
    /// cache), by model and compute type.
    #[serde(default)]
    step_overhead: BTreeMap<String, f64>,
    /// Bytes per second one rank sends another, by transport (`mpi`).
    #[serde(default)]
    transport: BTreeMap<String, f64>,
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

/// A GEMM this run measured: its key, element type, measured shapes and transposes.
type FreshGemm = (String, Dtype, Vec<usize>, Vec<usize>, (bool, bool));

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

    /// Measures once more, seconds later, every GEMM and attention part this run measured,
    /// keeping the faster time: a shared machine's slow spells last seconds, and a table
    /// measured in one would skew every prediction it feeds. Returns whether anything was.
    pub fn remeasure(&mut self) -> bool {
        let t0 = Instant::now();
        let again = !self.fresh_gemms.is_empty() || !self.fresh_attention.is_empty();
        for (key, dtype, a, b, trans) in std::mem::take(&mut self.fresh_gemms) {
            if let Some(t) = memc_runtime::cost::time_gemm(dtype, &a, &b, trans, REPS) {
                let e = self.table.gemm.entry(key).or_insert(t);
                *e = e.min(t);
            }
        }
        for (key, spec) in std::mem::take(&mut self.fresh_attention) {
            let t = memc_runtime::cost::time_attention(&spec, REPS);
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

    /// Measures each generated kernel of `host` (a compiled program of the model `model`) by
    /// running every step alone, and keeps each label's seconds per byte.
    pub fn calibrate_kernels(&mut self, model: &str, host: &HostProgram) -> Result<()> {
        let t0 = Instant::now();
        let program = &host.program;
        let times = host
            .with_kernels(|kernels| -> Result<(Vec<f64>, f64)> {
                // SAFETY: `kernels` are the JIT-compiled entries of this program's own kernels.
                let mut cpu = unsafe { memc_runtime::cpu::Cpu::new(program.checked()?, kernels) };
                // Real pages under every buffer, as in training: the weights and optimizer
                // state small numbers, the rest written by one run (memory never written is
                // read from the zero page, always in cache, which would time kernels fast).
                for p in &program.params {
                    cpu.arena_mut()
                        .set(&p.slot, &vec![0x3c; p.slot.bytes() as usize]);
                }
                let _ = cpu.run();
                let first = cpu.time_steps(REPS);
                // Two whole runs (the first a warm-up): a whole run of the 12-layer d768
                // Llama's 1 x 1024 program takes seconds.
                let whole = memc_runtime::cost::min_secs(1, || {
                    // An index the arena's zeros or stale values give is clamped by its
                    // kernel; the error the run reports for it is no concern here.
                    let _ = cpu.run();
                });
                // A second round, seconds later, each step keeping its faster time (see
                // `remeasure`).
                let steps = cpu
                    .time_steps(REPS)
                    .into_iter()
                    .zip(first)
                    .map(|(a, b)| a.min(b))
                    .collect();
                Ok((steps, whole))
            })
            .map_err(|e| anyhow!("{e}"))??;
        let (times, whole) = times;
        let alone: f64 = times.iter().sum();
        self.table.step_overhead.insert(
            model.to_string(),
            ((whole - alone) / times.len().max(1) as f64).max(0.0),
        );
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (step, t) in program.steps.iter().zip(times) {
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
                let t = memc_runtime::cost::time_gemm(dtype, &ra, &rb, trans, REPS).unwrap_or(0.0);
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
        let batch = spec.q[0].max(1);
        let mut one = spec.clone();
        one.q[0] = 1;
        one.k[0] = 1;
        if one.mask.len() == 4 && one.mask[0] == batch {
            one.mask[0] = 1;
        }
        let key = format!("{one:?}");
        let t = match self.table.attention.get(&key) {
            Some(&t) => t,
            None => {
                let t0 = Instant::now();
                let t = memc_runtime::cost::time_attention(&one, REPS);
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
    /// kernels must have been calibrated): the sum of its steps' times.
    pub fn predict(&mut self, model: &str, work: &[Work]) -> Result<f64> {
        let rates = self
            .table
            .kernels
            .get(model)
            .ok_or_else(|| anyhow!("the cost model has no kernel times for {model}"))?
            .clone();
        let fallback = rates.get("").copied().unwrap_or(0.0);
        let overhead = self.table.step_overhead.get(model).copied().unwrap_or(0.0);
        let mut secs = overhead * work.len() as f64;
        for w in work {
            secs += match w {
                Work::Gemm {
                    dtype,
                    a_shape,
                    b_shape,
                    trans,
                } => self.gemm_secs(*dtype, a_shape, b_shape, *trans),
                Work::Native(memc_runtime::program::Native::Attention(spec)) => {
                    self.attention_secs(spec)
                }
                Work::Kernel { label, bytes } => {
                    rates.get(label).copied().unwrap_or(fallback) * *bytes as f64
                }
            };
        }
        Ok(secs)
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
