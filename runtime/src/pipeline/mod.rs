//! Pipelined training steps: a [`Program`] with a [`Pipeline`] runs as a [`Backend`] whose
//! `run` is one pipelined step, so the training loop, checkpoints and the executable's
//! command line work unchanged. This is memc's one pipeline executor: each pass program runs
//! on a backend of its own, the cpu backend's generated kernels ([`Pipelined::new`]) or any
//! other [`Backend`] a caller plugs in ([`Pipelined::with_backends`]; the compiler plugs in
//! the reference interpreter).
//!
//! One step: the weights are copied from where they live (an optimizer program's arena, or the
//! step arena) into every pass program that reads them; one thread per device runs its passes
//! in the schedule's order, each pass taking the microbatch's slice of the model inputs and the
//! `x.N` values other passes output (waiting for them), and putting its outputs where their
//! readers find them (a value is freed after its last reader); the averaged values (loss,
//! weight gradients) are summed in f32 as passes finish (as PyTorch accumulates gradients). Then the optimizer programs run once
//! on the averages and the step's scalars, each updating the weights and optimizer state it
//! keeps in place.
//!
//! With a [`Transport`] (one process per stage and replica, launched by `mpirun` or `srun`;
//! MPI carries the messages) this process holds only its share ([`share`]): its stage's
//! passes, its (stage, replica) optimizer program and the weights its passes read. Values
//! read on other stages are sent there; after the passes each averaged value goes to the
//! stages whose optimizer reads it (the loss to all). With data-parallel replicas each
//! gradient is then summed on the replica that updates its weight (ZeRO stage 1), which
//! sends the new weight to the stage's other replicas. Rank 0 reports the step.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::cpu::{Arena, Cpu, KernelFn};
use crate::program::{decode, encode};
use crate::program::{Pipeline, Program, Slot};
use crate::transport::Transport;
use crate::{Backend, RunError};

/// A backend for one pass program (see [`Pipelined::with_backends`]).
pub type PassBackend = Box<dyn Backend + Send>;

mod share;

pub use share::{planned, planned_at, processes, Planned};
use share::{Home, Share};

/// A pass program ready to run: its backend, and where its inputs come from.
struct Pass {
    cpu: PassBackend,
    program: Program,
    /// Where each weight it reads lives in this process, and its slot here.
    weights: Vec<(Home, Slot)>,
}

/// The cpu backend's pipelined step (the name of earlier releases).
pub type PipelineCpu = Pipelined;

/// A pipelined training step (see the module docs).
pub struct Pipelined {
    /// The step's inputs, its loss and the weights kept outside the optimizer programs
    /// (laid out by `share.step`).
    step: Arena,
    interface: Program,
    spec: Pipeline,
    /// What this process holds and runs.
    share: Share,
    /// Each device's passes (index in `spec.passes`, pass).
    devices: Vec<Vec<(usize, Pass)>>,
    late: Option<Pass>,
    /// This process's optimizer programs (`share.updates`); each keeps the weights and
    /// optimizer state it updates in its own arena.
    updates: Vec<Pass>,
    /// The most bytes the values in flight between passes held at once, last step.
    held_peak: u64,
    /// Bytes of the f32 sums of averaged values in the last step, once the gradient sums
    /// (`late`) have added theirs (the most they hold: data parallelism then drops some).
    sums_bytes: u64,
    timing: Timings,
    /// The job when each stage of each replica is a process: this one runs stage `stage`
    /// of replica `replica`.
    job: Option<Job>,
    /// Steps run (keys the messages of a step).
    steps: u64,
    /// The stage computing each exchanged or averaged value (outputs of passes).
    producer: HashMap<String, usize>,
    /// The stages reading each exchanged value (for what the late program reads, the stages
    /// running it).
    consumers: HashMap<String, Vec<usize>>,
    /// How many reads of each exchanged value happen in this process per microbatch.
    local_readers: HashMap<String, u32>,
    /// The averaged values each stage needs (what its optimizer programs read, the loss).
    needs: Vec<std::collections::HashSet<String>>,
    /// The averaged values of the last step (mean over every replica's microbatches), by
    /// name.
    means: HashMap<String, Vec<f64>>,
    /// Barriers passed (each names its messages).
    barriers: u64,
}

/// One process per stage and replica: the job's transport and this process's place.
struct Job {
    transport: Arc<dyn Transport>,
    stages: usize,
    replicas: usize,
    stage: usize,
    replica: usize,
}

impl Job {
    /// The rank of `stage` of this process's replica.
    fn in_replica(&self, stage: usize) -> usize {
        self.replica * self.stages + stage
    }

    /// The rank of this process's stage in `replica`.
    fn in_stage(&self, replica: usize) -> usize {
        replica * self.stages + self.stage
    }
}

impl Pipelined {
    /// Prepares every pass program of `program` (which must have a pipeline) on the cpu
    /// backend with the kernel entry points `kernels` (in `program.kernels` order).
    ///
    /// # Safety
    ///
    /// As for [`Cpu::new`]: `kernels` are the entries memc generated for `program.kernels`.
    pub unsafe fn new(program: &Program, kernels: &[KernelFn]) -> Result<Pipelined, RunError> {
        let mut make = |_: &str, p: &Program| -> Result<PassBackend, RunError> {
            // SAFETY: every pass's kernels index the step program's table, whose entries the
            // caller vouched for.
            Ok(Box::new(unsafe { Cpu::new(p.checked()?, kernels) }))
        };
        Pipelined::with_backends(program, &mut make, None)
    }

    /// Prepares the passes of `program` (this rank's share only, with a `job` transport:
    /// rank `r` runs stage `r mod P` of replica `r / P`), each on the backend `make` returns
    /// for it: `make(label, pass program)` is called for every pass run here, the gradient
    /// sums (`late`) and this process's optimizer programs.
    pub fn with_backends(
        program: &Program,
        make: &mut dyn FnMut(&str, &Program) -> Result<PassBackend, RunError>,
        job: Option<Arc<dyn Transport>>,
    ) -> Result<Pipelined, RunError> {
        Pipelined::build(program, make, job)
    }

    /// Opens `program`'s pipelined step with `make`'s pass backends: in this process alone,
    /// or, launched by `mpirun` or `srun` ([`crate::transport::RankEnv`]), as this rank's
    /// share of one process per stage and replica over MPI (the job must have stages ×
    /// replicas ranks).
    pub fn open(
        program: &Program,
        make: &mut dyn FnMut(&str, &Program) -> Result<PassBackend, RunError>,
    ) -> Result<Pipelined, RunError> {
        let stages = program.pipeline.as_ref().map_or(0, |p| p.stages);
        let replicas = program.pipeline.as_ref().map_or(1, |p| p.data_parallel);
        let job: Option<Arc<dyn Transport>> =
            match crate::transport::RankEnv::from_env().map_err(RunError::Usage)? {
                Some(_) => Some(Arc::new(crate::mpi::Mpi::init(
                    stages as usize,
                    replicas as usize,
                )?)),
                None => None,
            };
        Pipelined::with_backends(program, make, job)
    }

    /// [`Pipelined::open`] on the cpu backend's generated kernels.
    ///
    /// # Safety
    ///
    /// As for [`Cpu::new`]: `kernels` are the entries memc generated for `program.kernels`.
    pub unsafe fn open_cpu(program: &Program, kernels: &[KernelFn]) -> Result<Pipelined, RunError> {
        Pipelined::open(program, &mut |_,
                                       p: &Program|
         -> Result<PassBackend, RunError> {
            // SAFETY: the caller's contract, for every pass.
            Ok(Box::new(unsafe { Cpu::new(p.checked()?, kernels) }))
        })
    }

    /// [`Pipelined::open`] on the cuda backend: each stage's passes run on that stage's
    /// stream ([`crate::gpu::Cuda::on`]), on the GPU [`crate::gpu::ordinal`] picks (a
    /// process of an `mpirun` or `srun` job takes one GPU per process on its node; a process
    /// alone spreads its stages over the GPUs it sees, as streams of one GPU when it has
    /// one), so the stages of one process overlap; the gradient sums over chunks run on a
    /// lane of their own and each optimizer program on its stage's. Values between passes go
    /// through host memory (and MPI between processes).
    pub fn open_cuda(program: &Program) -> Result<Pipelined, RunError> {
        let spec = program
            .pipeline
            .as_ref()
            .ok_or_else(|| RunError::Usage("not a pipelined program".into()))?;
        if program.device.is_none() {
            return Err(crate::gpu::without_ptx(program));
        }
        let place = crate::transport::RankEnv::from_env()
            .map_err(RunError::Usage)?
            .map(|e| e.local.unwrap_or(e.rank));
        let count = crate::gpu::Gpu::count()?;
        if count == 0 {
            return Err(RunError::Cuda(
                "the CUDA driver sees no GPU (use --backend cpu)".into(),
            ));
        }
        let lanes: HashMap<&str, u32> = spec
            .passes
            .iter()
            .chain(&spec.updates)
            .map(|s| (s.label.as_str(), s.device))
            .chain(spec.late.as_ref().map(|s| (s.label.as_str(), spec.stages)))
            .collect();
        let mut gpus: HashMap<usize, Arc<crate::gpu::Gpu>> = HashMap::new();
        Pipelined::open(program, &mut |label,
                                       p: &Program|
         -> Result<PassBackend, RunError> {
            let lane = *lanes.get(label).ok_or_else(|| {
                RunError::Usage(format!(
                    "pass `{label}` is not in the pipeline (a memc bug)"
                ))
            })?;
            let at = crate::gpu::ordinal(lane as usize, place, count);
            let gpu = match gpus.get(&at) {
                Some(g) => g.clone(),
                None => {
                    let g = crate::gpu::Gpu::open(program, at)?;
                    gpus.insert(at, g.clone());
                    g
                }
            };
            Ok(Box::new(crate::gpu::Cuda::on(&gpu, p, lane)?))
        })
    }

    /// The mean over every replica's microbatches of each averaged value (the loss, the
    /// weight gradients) in the last step, by name: those this process summed (with data
    /// parallelism, a gradient's mean is on the replica that updates its weight).
    pub fn means(&self) -> &HashMap<String, Vec<f64>> {
        &self.means
    }

    /// This process's rank (0 in one process).
    pub fn rank(&self) -> usize {
        self.job.as_ref().map_or(0, |j| j.transport.rank())
    }

    /// What this process planned to allocate ([`planned_at`]).
    pub fn planned(&self) -> Result<Planned, RunError> {
        planned_at(
            &self.interface,
            self.job.as_ref().map(|j| (j.stage, j.replica)),
        )
    }

    fn build(
        program: &Program,
        make: &mut dyn FnMut(&str, &Program) -> Result<PassBackend, RunError>,
        transport: Option<Arc<dyn Transport>>,
    ) -> Result<Pipelined, RunError> {
        let spec = *program
            .pipeline
            .clone()
            .ok_or_else(|| RunError::Usage("not a pipelined program".into()))?;
        let (p, d) = (spec.stages as usize, spec.data_parallel as usize);
        let job = match transport {
            Some(t) => {
                check_world(t.world(), spec.stages, spec.data_parallel)?;
                let r = t.rank();
                Some(Job {
                    transport: t,
                    stages: p,
                    replicas: d,
                    stage: r % p,
                    replica: r / p,
                })
            }
            None if d > 1 => {
                return Err(RunError::Usage(format!(
                    "{}: compiled for {d} data-parallel replicas of {p} pipeline stages: launch {} ranks (mpirun -n {})",
                    program.model,
                    p * d,
                    p * d
                )))
            }
            None => None,
        };
        let share = share::share(program, job.as_ref().map(|j| (j.stage, j.replica)))?;
        let mut prepare = |sub: &crate::program::SubProgram| -> Result<Pass, RunError> {
            let prog = sub.resolve(program)?;
            let mut weights = vec![];
            for q in &prog.params {
                let home = share
                    .homes
                    .get(q.slot.name.as_str())
                    .and_then(|h| h.first())
                    .ok_or_else(|| {
                        RunError::Program(crate::program::ProgramError::Corrupt(format!(
                            "pass `{}` reads `{}`, which this process does not keep",
                            sub.label, q.slot.name
                        )))
                    })?;
                weights.push((home.clone(), q.slot.clone()));
            }
            Ok(Pass {
                cpu: make(&sub.label, &prog)?,
                program: prog,
                weights,
            })
        };
        let here = |d: usize| job.as_ref().is_none_or(|j| j.stage == d);
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut local_readers: HashMap<String, u32> = HashMap::new();
        for sub in &spec.passes {
            let d = sub.device as usize;
            for o in &sub.program.outputs {
                producer.insert(o.name.clone(), d);
            }
            for i in sub
                .program
                .inputs
                .iter()
                .filter(|i| i.name.starts_with("x."))
            {
                let c = consumers.entry(i.name.clone()).or_default();
                if !c.contains(&d) {
                    c.push(d);
                }
                if here(d) {
                    *local_readers.entry(i.name.clone()).or_default() += 1;
                }
            }
        }
        // The gradient sums over chunks run on the stages whose optimizer reads them.
        let late_stages = share::late_stages(&spec);
        let runs_late = share::runs_late(&spec, job.as_ref().map(|j| (j.stage, j.replica)));
        if let Some(late) = &spec.late {
            for i in late
                .program
                .inputs
                .iter()
                .filter(|i| i.name.starts_with("x."))
            {
                let c = consumers.entry(i.name.clone()).or_default();
                for &d in &late_stages {
                    if !c.contains(&d) {
                        c.push(d);
                    }
                }
                if runs_late {
                    *local_readers.entry(i.name.clone()).or_default() += 1;
                }
            }
        }
        let mut devices: Vec<Vec<(usize, Pass)>> = (0..p).map(|_| Vec::new()).collect();
        for &k in &share.passes {
            let sub = &spec.passes[k];
            let d = devices.get_mut(sub.device as usize).ok_or_else(|| {
                RunError::Usage(format!("pass `{}` is on a missing device", sub.label))
            })?;
            d.push((k, prepare(sub)?));
        }
        let late = spec
            .late
            .as_ref()
            .filter(|_| runs_late)
            .map(&mut prepare)
            .transpose()?;
        let updates = share
            .updates
            .iter()
            .map(|&k| {
                let sub = &spec.updates[k];
                let prog = sub.resolve(program)?;
                Ok(Pass {
                    cpu: make(&sub.label, &prog)?,
                    program: prog,
                    weights: vec![],
                })
            })
            .collect::<Result<Vec<Pass>, RunError>>()?;
        let timing = Timings {
            devices: vec![Timing::default(); p],
            ..Timings::default()
        };
        Ok(Pipelined {
            means: HashMap::new(),
            timing,
            step: Arena::new(share.step_bytes),
            needs: share::needs(&spec),
            share,
            interface: program.clone(),
            spec,
            devices,
            late,
            updates,
            held_peak: 0,
            sums_bytes: 0,
            job,
            steps: 0,
            producer,
            consumers,
            local_readers,
            barriers: 0,
        })
    }

    /// The bytes of weight or optimizer state `name` (from its first home).
    fn read_home(&mut self, home: &Home) -> Result<Vec<u8>, RunError> {
        Ok(match home {
            Home::Step(s) => self.step.get(s).to_vec(),
            Home::Update(k, s) => self.updates[*k].cpu.get(s)?,
        })
    }
}

/// One process per stage of each replica: the world must be stages × replicas.
fn check_world(world: usize, stages: u32, replicas: u32) -> Result<(), RunError> {
    if world == (stages * replicas) as usize {
        return Ok(());
    }
    Err(RunError::Usage(if replicas == 1 {
        format!(
            "WORLD_SIZE {world} must equal the program's {stages} pipeline stages (one process per stage)"
        )
    } else {
        format!(
            "WORLD_SIZE {world} must equal the program's {stages} pipeline stages × {replicas} data-parallel replicas"
        )
    }))
}

/// Adds up the sums of `name` that every replica holds (this process's for its own
/// replica, received for the others), in replica order so every replica adding them gets
/// the same bits.
fn sum_replicas(job: &Job, step: u64, name: &str, mine: &[f32]) -> Result<Vec<f32>, RunError> {
    let mut total = vec![0f32; mine.len()];
    for k in 0..job.replicas {
        if k == job.replica {
            total.iter_mut().zip(mine).for_each(|(t, x)| *t += x);
            continue;
        }
        let b = job.transport.recv(job.in_stage(k), step, REPLICAS, name)?;
        if b.len() != 4 * mine.len() {
            return Err(RunError::Usage(format!(
                "replica {k} sent {} bytes of `{name}`, this one has {}",
                b.len(),
                4 * mine.len()
            )));
        }
        accumulate(&mut total, crate::program::Dtype::F32, &b);
    }
    Ok(total)
}

/// The bytes of f32 values.
fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Adds the values `bytes` holds (of type `dtype`) into `acc`, in f32 (as PyTorch accumulates
/// gradients over microbatches); f32 values are read in place.
pub(crate) fn accumulate(acc: &mut [f32], dtype: crate::program::Dtype, bytes: &[u8]) {
    if dtype == crate::program::Dtype::F32 {
        for (a, c) in acc.iter_mut().zip(bytes.chunks_exact(4)) {
            *a += f32::from_le_bytes(c.try_into().expect("4 bytes"));
        }
    } else {
        for (a, x) in acc.iter_mut().zip(decode(dtype, bytes)) {
            *a += x as f32;
        }
    }
}

/// Message tags (the microbatch field) of what is not a microbatch's value: averaged
/// values within a replica, across replicas, updated weights across replicas, barriers.
const STAGES: u32 = u32::MAX;
const REPLICAS: u32 = u32::MAX - 1;
const WEIGHTS: u32 = u32::MAX - 2;
const BARRIER: u32 = u32::MAX - 3;

/// Seconds one device spent computing and waiting in one step, and when it finished (then
/// summed over steps, `end` as the time it sat idle after its last pass).
#[derive(Debug, Default, Clone, Copy)]
struct Timing {
    busy: f64,
    waiting: f64,
    end: f64,
}

/// Time spent in the steps so far.
#[derive(Debug, Default)]
struct Timings {
    devices: Vec<Timing>,
    passes: f64,
    late: f64,
    update: f64,
    steps: u64,
}

/// Averaged outputs summed over microbatches, by name.
type Sums = HashMap<String, Vec<f32>>;

/// The error of a worker woken because another failed.
const WOKEN: &str = "another pipeline worker failed";

/// Values in flight between passes, keyed by (microbatch, name), each freed after its last
/// reader.
struct Store {
    values: Mutex<StoreState>,
    ready: Condvar,
    failed: AtomicBool,
}

/// A value's bytes and how many readers have yet to take it.
type Held = (Arc<Vec<u8>>, u32);

#[derive(Default)]
struct StoreState {
    map: HashMap<(u32, String), Held>,
    held: u64,
    peak: u64,
}

impl Store {
    fn put(&self, mb: u32, name: &str, bytes: Vec<u8>, readers: u32) {
        let mut s = self.values.lock().unwrap_or_else(|e| e.into_inner());
        s.held += bytes.len() as u64;
        s.peak = s.peak.max(s.held);
        s.map
            .insert((mb, name.to_string()), (Arc::new(bytes), readers));
        self.ready.notify_all();
    }

    fn take(&self, mb: u32, name: &str) -> Result<Arc<Vec<u8>>, RunError> {
        let key = (mb, name.to_string());
        let mut s = self.values.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.failed.load(Ordering::SeqCst) {
                return Err(RunError::Usage(WOKEN.into()));
            }
            if let Some((bytes, left)) = s.map.get_mut(&key) {
                let bytes = bytes.clone();
                *left = left.saturating_sub(1);
                if *left == 0 {
                    s.map.remove(&key);
                    s.held -= bytes.len() as u64;
                }
                return Ok(bytes);
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The value if it is here (counting one read), without waiting.
    fn try_take(&self, mb: u32, name: &str) -> Option<Arc<Vec<u8>>> {
        let key = (mb, name.to_string());
        let mut s = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let (bytes, left) = s.map.get_mut(&key)?;
        let bytes = bytes.clone();
        *left = left.saturating_sub(1);
        if *left == 0 {
            s.map.remove(&key);
            s.held -= bytes.len() as u64;
        }
        Some(bytes)
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        let _guard = self.values.lock().unwrap_or_else(|e| e.into_inner());
        self.ready.notify_all();
    }
}

/// The bytes of `slot` (of a microbatch program) taken from the whole step's `outer` slot:
/// all of it when the sizes agree, else microbatch `mb`'s rows.
fn slice<'a>(step: &'a Arena, outer: &Slot, slot: &Slot, mb: usize, m: usize) -> Option<&'a [u8]> {
    let all = step.get(outer);
    let n = slot.bytes() as usize;
    if all.len() == n {
        Some(all)
    } else if all.len() == n * m {
        Some(&all[mb * n..(mb + 1) * n])
    } else {
        None
    }
}

impl Backend for Pipelined {
    fn name(&self) -> &'static str {
        self.late
            .as_ref()
            .or(self.updates.first())
            .or(self.devices.iter().flatten().map(|(_, p)| p).next())
            .map_or("cpu", |p| p.cpu.name())
    }

    /// Every arena this process allocated (the step's, each of its passes', the gradient
    /// sums' and its optimizer programs') and the f32 sums of averaged values in the last
    /// step (after the gradient sums, their most): what [`Pipelined::planned`] says it allocates. The values in flight
    /// between passes are in the profile.
    fn arena_bytes(&self) -> u64 {
        self.step.bytes() as u64
            + self
                .devices
                .iter()
                .flatten()
                .map(|(_, p)| p.cpu.arena_bytes())
                .sum::<u64>()
            + self.late.as_ref().map_or(0, |l| l.cpu.arena_bytes())
            + self
                .updates
                .iter()
                .map(|u| u.cpu.arena_bytes())
                .sum::<u64>()
            + self.sums_bytes
    }

    fn set(&mut self, slot: &Slot, bytes: &[u8]) -> Result<(), RunError> {
        if bytes.len() as u64 != slot.bytes() {
            return Err(RunError::Usage(format!(
                "`{}`: {} bytes for {}",
                slot.name,
                bytes.len(),
                slot.type_string()
            )));
        }
        if let Some(homes) = self.share.homes.get(&slot.name) {
            for h in homes {
                match h {
                    Home::Step(s) => self.step.set(s, bytes),
                    Home::Update(k, s) => self.updates[*k].cpu.set(s, bytes)?,
                }
            }
            return Ok(());
        }
        if let Some(s) = self.share.step.get(&slot.name) {
            self.step.set(s, bytes);
            return Ok(());
        }
        if self
            .interface
            .params
            .iter()
            .any(|p| p.slot.name == slot.name)
        {
            // Another rank keeps it.
            return Ok(());
        }
        Err(RunError::Usage(format!(
            "`{}` is not a value of the pipelined step",
            slot.name
        )))
    }

    fn get(&mut self, slot: &Slot) -> Result<Vec<u8>, RunError> {
        if let Some(h) = self.share.homes.get(&slot.name).and_then(|h| h.first()) {
            let h = h.clone();
            return self.read_home(&h);
        }
        if let Some(s) = self.share.step.get(&slot.name) {
            return Ok(self.step.get(s).to_vec());
        }
        Err(RunError::Usage(format!(
            "rank {} does not keep `{}` (another rank's share of the step)",
            self.rank(),
            slot.name
        )))
    }

    fn holds(&self, slot: &Slot) -> bool {
        self.share.homes.contains_key(&slot.name) || self.share.step.contains_key(&slot.name)
    }

    fn shards(&self) -> Result<Option<crate::Shards>, RunError> {
        let Some(job) = self.job.as_ref() else {
            return Ok(None);
        };
        Ok(Some(crate::Shards {
            rank: job.transport.rank(),
            ranks: job.stages * job.replicas,
            saver: share::savers(&self.interface)?,
        }))
    }

    fn abort(&self) {
        if let Some(job) = &self.job {
            job.transport.abort();
        }
    }

    /// Every rank tells rank 0, which answers each once all have.
    fn barrier(&mut self) -> Result<(), RunError> {
        let Some(job) = &self.job else {
            return Ok(());
        };
        self.barriers += 1;
        let name = format!("memc.barrier.{}", self.barriers);
        let (t, world) = (&job.transport, job.stages * job.replicas);
        if t.rank() == 0 {
            for r in 1..world {
                t.recv(r, self.steps, BARRIER, &name)?;
            }
            for r in 1..world {
                t.send(r, self.steps, BARRIER, &name, &[])?;
            }
        } else {
            t.send(0, self.steps, BARRIER, &name, &[])?;
            t.recv(0, self.steps, BARRIER, &name)?;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), RunError> {
        self.steps += 1;
        let r = self.one_step();
        if let (Err(_), Some(job)) = (&r, &self.job) {
            job.transport.abort();
        }
        if r.is_ok() && self.steps == 1 {
            if let Some(job) = &self.job {
                let planned = self.planned()?;
                // One write, so the ranks' lines do not interleave on a shared stderr.
                let line = format!(
                    "rank {} (stage {} of replica {}): {} bytes allocated, {} planned (weights {}, optimizer state {}, gradient sums {}, working {})\n",
                    job.transport.rank(),
                    job.stage,
                    job.replica,
                    self.arena_bytes(),
                    planned.total,
                    planned.weights,
                    planned.optimizer_state,
                    planned.gradient_sums,
                    planned.working
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            }
        }
        r
    }

    fn profile(&self) -> Option<String> {
        self.report()
    }
}

impl Pipelined {
    fn one_step(&mut self) -> Result<(), RunError> {
        let m = self.spec.microbatches as usize;
        let step_no = self.steps;
        let job = self.job.as_ref();
        let net = job.map(|j| j.transport.as_ref());
        let me = job.map_or(0, |j| j.stage);
        // Stage `d`'s rank in this replica.
        let rank_of = |d: usize| job.map_or(d, |j| j.in_replica(d));
        let here = |d: usize| job.is_none_or(|j| j.stage == d);
        let (producer, consumers) = (&self.producer, &self.consumers);
        let step = &self.step;
        let local = &self.share.step;
        // The weights each pass reads, from where they live here.
        let updates = &mut self.updates;
        for pass in self
            .devices
            .iter_mut()
            .flatten()
            .map(|(_, p)| p)
            .chain(self.late.as_mut())
        {
            for (home, inner) in &pass.weights {
                match home {
                    Home::Step(s) => pass.cpu.set(inner, step.get(s))?,
                    Home::Update(k, s) => {
                        let b = updates[*k].cpu.get(s)?;
                        pass.cpu.set(inner, &b)?
                    }
                }
            }
        }
        let readers = &self.local_readers;
        let averaged: Vec<&str> = self.spec.averaged.iter().map(String::as_str).collect();
        let store = Store {
            values: Mutex::new(StoreState::default()),
            ready: Condvar::new(),
            failed: AtomicBool::new(false),
        };
        let order = &self.spec.order;
        // Adds the averaged outputs into `sums` (each device its own: no lock while
        // summing); returns the seconds spent waiting for other passes' values.
        let run_pass = |pass: &mut Pass, mb: u32, sums: &mut Sums| -> Result<f64, RunError> {
            let mut waited = 0.0;
            for slot in &pass.program.inputs {
                if slot.name.starts_with("x.") {
                    let t0 = Instant::now();
                    let from = producer.get(&slot.name).copied().unwrap_or(me);
                    let bytes = match net {
                        // From another rank: the first reader here receives it and
                        // leaves it for the others.
                        Some(net) if !here(from) => match store.try_take(mb, &slot.name) {
                            Some(b) => b,
                            None => {
                                let b = net.recv(rank_of(from), step_no, mb, &slot.name)?;
                                let left = readers.get(&slot.name).copied().unwrap_or(1);
                                if left > 1 {
                                    store.put(mb, &slot.name, b.clone(), left - 1);
                                }
                                Arc::new(b)
                            }
                        },
                        _ => store.take(mb, &slot.name)?,
                    };
                    waited += t0.elapsed().as_secs_f64();
                    if bytes.len() as u64 != slot.bytes() {
                        return Err(RunError::Usage(format!(
                            "`{}` of microbatch {mb}: {} bytes arrived for {}",
                            slot.name,
                            bytes.len(),
                            slot.type_string()
                        )));
                    }
                    pass.cpu.set(slot, &bytes)?;
                    continue;
                }
                let outer = local.get(&slot.name).ok_or_else(|| {
                    RunError::Usage(format!("input `{}` is not an input of the step", slot.name))
                })?;
                let bytes = slice(step, outer, slot, mb as usize, m).ok_or_else(|| {
                    RunError::Usage(format!(
                        "input `{}`: {} does not split into {m} microbatches of {}",
                        slot.name,
                        outer.type_string(),
                        slot.type_string()
                    ))
                })?;
                pass.cpu.set(slot, bytes)?;
            }
            pass.cpu.run()?;
            for slot in &pass.program.outputs {
                let bytes = pass.cpu.get(slot)?;
                if averaged.contains(&slot.name.as_str()) {
                    let n = slot.shape.iter().product();
                    let acc = sums
                        .entry(slot.name.clone())
                        .or_insert_with(|| vec![0.0; n]);
                    accumulate(acc, slot.dtype, &bytes);
                }
                if let Some(net) = net {
                    for &c in consumers.get(&slot.name).into_iter().flatten() {
                        if c != me {
                            net.send(rank_of(c), step_no, mb, &slot.name, &bytes)?;
                        }
                    }
                }
                if let Some(&r) = readers.get(slot.name.as_str()) {
                    store.put(mb, &slot.name, bytes, r);
                }
            }
            Ok(waited)
        };
        let step_start = Instant::now();
        let run_device = |d: usize,
                          passes: &mut Vec<(usize, Pass)>|
         -> Result<(usize, Timing, Sums), RunError> {
            let mut t = Timing::default();
            let mut sums = Sums::new();
            for &(k, mb) in &order[d] {
                let (_, pass) = passes
                    .iter_mut()
                    .find(|(i, _)| *i == k as usize)
                    .ok_or_else(|| RunError::Usage(format!("pass {k} is not on device {d}")))?;
                let t0 = Instant::now();
                let waited = run_pass(pass, mb, &mut sums)?;
                t.waiting += waited;
                t.busy += t0.elapsed().as_secs_f64() - waited;
            }
            t.end = step_start.elapsed().as_secs_f64();
            Ok((d, t, sums))
        };
        let results = std::thread::scope(|s| -> Result<Vec<(usize, Timing, Sums)>, RunError> {
            let handles: Vec<_> = self
                .devices
                .iter_mut()
                .enumerate()
                .filter(|(d, _)| here(*d))
                .map(|(d, passes)| {
                    let (run, store) = (&run_device, &store);
                    s.spawn(move || {
                        // A failing or panicking worker wakes the others.
                        struct Guard<'a>(&'a Store, bool);
                        impl Drop for Guard<'_> {
                            fn drop(&mut self) {
                                if !self.1 {
                                    self.0.fail();
                                }
                            }
                        }
                        let mut guard = Guard(store, false);
                        let r = run(d, passes);
                        guard.1 = r.is_ok();
                        r
                    })
                })
                .collect();
            let mut results = vec![];
            let mut errors = vec![];
            for h in handles {
                match h.join() {
                    Ok(Ok(r)) => results.push(r),
                    Ok(Err(e)) => errors.push(e),
                    Err(_) => errors.push(RunError::Usage("a pipeline worker panicked".into())),
                }
            }
            // The failure itself, not the other workers' "another worker failed".
            match errors.iter().position(|e| e.to_string() != WOKEN) {
                Some(i) => Err(errors.swap_remove(i)),
                None => errors.pop().map_or(Ok(results), Err),
            }
        })?;
        let mut sums = Sums::new();
        let mut timings = vec![Timing::default(); self.spec.stages as usize];
        for (d, t, part) in results {
            timings[d] = t;
            for (name, v) in part {
                match sums.get_mut(&name) {
                    Some(acc) => acc.iter_mut().zip(&v).for_each(|(a, x)| *a += x),
                    None => drop(sums.insert(name, v)),
                }
            }
        }
        let passes_done = step_start.elapsed().as_secs_f64();
        for (d, (acc, t)) in self.timing.devices.iter_mut().zip(&timings).enumerate() {
            if here(d) {
                acc.busy += t.busy;
                acc.waiting += t.waiting;
                acc.end += passes_done - t.end;
            }
        }
        self.timing.passes += passes_done;
        self.timing.steps += 1;
        // Within the replica: each averaged value from the stage computing it to the stages
        // whose optimizer programs read it (the loss to every stage).
        if let Some(job) = job {
            for name in &self.spec.averaged {
                let Some(&from) = producer.get(name) else {
                    continue;
                };
                if from == me {
                    let v = sums.get(name).ok_or_else(|| {
                        RunError::Usage(format!("no pass here computed `{name}` (a memc bug)"))
                    })?;
                    let bytes = f32s(v);
                    for d in (0..job.stages).filter(|&d| d != me && self.needs[d].contains(name)) {
                        job.transport
                            .send(rank_of(d), step_no, STAGES, name, &bytes)?;
                    }
                } else if self.needs[me].contains(name) {
                    let b = job.transport.recv(rank_of(from), step_no, STAGES, name)?;
                    let mut v = vec![0f32; b.len() / 4];
                    accumulate(&mut v, crate::program::Dtype::F32, &b);
                    sums.insert(name.clone(), v);
                }
            }
        }
        if let Some(late) = self.late.as_mut() {
            let t0 = Instant::now();
            for mb in 0..m as u32 {
                run_pass(late, mb, &mut sums)?;
            }
            self.timing.late += t0.elapsed().as_secs_f64();
        }
        self.sums_bytes = sums.values().map(|v| 4 * v.len() as u64).sum();
        // Across replicas: the loss summed on every replica; each gradient summed on the
        // replica whose optimizer program reads it (ZeRO stage 1), and dropped elsewhere.
        let m = match job.filter(|j| j.replicas > 1) {
            Some(job) => {
                for name in &self.spec.averaged {
                    let Some(mine) = sums.get(name) else {
                        continue;
                    };
                    if *name == self.spec.loss {
                        let b = f32s(mine);
                        for k in (0..job.replicas).filter(|&k| k != job.replica) {
                            job.transport
                                .send(job.in_stage(k), step_no, REPLICAS, name, &b)?;
                        }
                        let total = sum_replicas(job, step_no, name, mine)?;
                        sums.insert(name.clone(), total);
                        continue;
                    }
                    let owners: Vec<usize> = self
                        .spec
                        .updates
                        .iter()
                        .filter(|u| {
                            u.device as usize == me
                                && u.program.inputs.iter().any(|i| i.name == *name)
                        })
                        .map(|u| u.shard as usize)
                        .collect();
                    let mut total = None;
                    for &owner in &owners {
                        if owner == job.replica {
                            total = Some(sum_replicas(job, step_no, name, mine)?);
                        } else {
                            job.transport.send(
                                job.in_stage(owner),
                                step_no,
                                REPLICAS,
                                name,
                                &f32s(mine),
                            )?;
                        }
                    }
                    match total {
                        Some(t) => drop(sums.insert(name.clone(), t)),
                        None => drop(sums.remove(name)),
                    }
                }
                m * job.replicas
            }
            None => m,
        };
        self.held_peak = store
            .values
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .peak;
        let mean = |name: &str| -> Result<Vec<f64>, RunError> {
            let s = sums.get(name).ok_or_else(|| {
                RunError::Usage(format!("no pass computed `{name}` (a memc bug)"))
            })?;
            Ok(s.iter().map(|&x| x as f64 / m as f64).collect())
        };
        // This process's optimizer programs on the averages; each updates the weights and
        // optimizer state in its arena.
        let t0 = Instant::now();
        for update in self.updates.iter_mut() {
            for slot in &update.program.inputs {
                if averaged.contains(&slot.name.as_str()) {
                    let b = encode(slot.dtype, &mean(&slot.name)?);
                    if b.len() as u64 != slot.bytes() {
                        return Err(RunError::Usage(format!(
                            "`{}`: {} bytes of sums for {} (a rank sent a malformed value)",
                            slot.name,
                            b.len(),
                            slot.type_string()
                        )));
                    }
                    update.cpu.set(slot, &b)?;
                } else {
                    let outer = local.get(&slot.name).ok_or_else(|| {
                        RunError::Usage(format!(
                            "update input `{}` is not an input of the step",
                            slot.name
                        ))
                    })?;
                    update.cpu.set(slot, step.get(outer))?;
                }
            }
            update.cpu.run()?;
        }
        self.timing.update += t0.elapsed().as_secs_f64();
        // Across replicas: each stage's weights from the replica that updated them.
        if let Some(job) = job.filter(|j| j.replicas > 1) {
            for (k, u) in self.spec.updates.iter().enumerate() {
                if u.device as usize != me {
                    continue;
                }
                for q in u
                    .program
                    .params
                    .iter()
                    .filter(|q| q.role == crate::program::Role::Weight)
                {
                    if u.shard as usize == job.replica {
                        let local_k = self
                            .share
                            .updates
                            .iter()
                            .position(|&x| x == k)
                            .expect("this replica's optimizer program runs here");
                        let b = self.updates[local_k].cpu.get(&q.slot)?;
                        for r in (0..job.replicas).filter(|&r| r != job.replica) {
                            job.transport.send(
                                job.in_stage(r),
                                step_no,
                                WEIGHTS,
                                &q.slot.name,
                                &b,
                            )?;
                        }
                    } else {
                        let b = job.transport.recv(
                            job.in_stage(u.shard as usize),
                            step_no,
                            WEIGHTS,
                            &q.slot.name,
                        )?;
                        if b.len() as u64 != q.slot.bytes() {
                            return Err(RunError::Usage(format!(
                                "replica {} sent {} bytes of `{}`, a {}",
                                u.shard,
                                b.len(),
                                q.slot.name,
                                q.slot.type_string()
                            )));
                        }
                        for h in self.share.homes.get(&q.slot.name).into_iter().flatten() {
                            if let Home::Step(s) = h {
                                self.step.set(s, &b);
                            }
                        }
                    }
                }
            }
        }
        let training = self
            .interface
            .training
            .as_ref()
            .ok_or_else(|| RunError::Usage("a pipelined program trains".into()))?;
        let loss = self
            .share
            .step
            .get(&training.loss_output)
            .ok_or_else(|| RunError::Usage("the step has no loss output".into()))?
            .clone();
        let l = encode(loss.dtype, &mean(&self.spec.loss)?);
        if l.len() as u64 != loss.bytes() {
            return Err(RunError::Usage(
                "the loss does not match the step's (a memc bug)".into(),
            ));
        }
        self.step.set(&loss, &l);
        self.means = sums
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().map(|x| x as f64 / m as f64).collect()))
            .collect();
        Ok(())
    }

    /// With `MEMC_PROFILE` set: each device's time computing, waiting for other devices'
    /// values and idle after its last pass (the measured bubbles), and the late and update
    /// programs' time, summed over the steps.
    fn report(&self) -> Option<String> {
        std::env::var_os("MEMC_PROFILE")?;
        let t = &self.timing;
        let ms = |s: f64| s * 1e3;
        let mut out = format!(
            "pipeline profile ({} steps, {}): passes {:.1} ms, gradient sums {:.1} ms, optimizer {:.1} ms\n",
            t.steps,
            self.spec.schedule,
            ms(t.passes),
            ms(t.late),
            ms(t.update)
        );
        out += &format!(
            "  values in flight between passes: at most {} bytes (last step)\n",
            self.held_peak
        );
        for (d, x) in t.devices.iter().enumerate() {
            out += &format!(
                "  device {d}: computing {:.1} ms, waiting {:.1} ms, done early by {:.1} ms; idle {:.1}% of the passes' time\n",
                ms(x.busy),
                ms(x.waiting),
                ms(x.end),
                100.0 * (1.0 - x.busy / t.passes.max(1e-12))
            );
        }
        for (k, pass) in self.devices.iter().flatten() {
            if let Some(p) = pass.cpu.profile() {
                out += &format!("pass {}: {p}", self.spec.passes[*k].label);
            }
        }
        for (k, u) in self.share.updates.iter().zip(&self.updates) {
            if let Some(p) = u.cpu.profile() {
                out += &format!("optimizer {}: {p}", self.spec.updates[*k].label);
            }
        }
        Some(out)
    }
}
