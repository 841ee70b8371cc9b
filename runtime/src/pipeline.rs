//! Pipelined training steps: a [`Program`] with a [`Pipeline`] runs as a [`Backend`] whose
//! `run` is one pipelined step, so the training loop, checkpoints and the executable's
//! command line work unchanged. This is memc's one pipeline executor: each pass program runs
//! on a backend of its own, the cpu backend's generated kernels ([`Pipelined::new`]) or any
//! other [`Backend`] a caller plugs in ([`Pipelined::with_backends`]; the compiler plugs in
//! the reference interpreter).
//!
//! One step: the weights are copied from the step's arena into every pass program that reads
//! them; one thread per device runs its passes in the schedule's order, each pass taking the
//! microbatch's slice of the model inputs and the `x.N` values other passes output (waiting
//! for them), and putting its outputs where their readers find them (a value is freed after its
//! last reader); the averaged values (loss, weight gradients) are summed as passes finish.
//! Then the update program runs once on the averages and the step's scalars, and the new
//! weights and optimizer state go back to the step's arena.
//!
//! With a [`Transport`] (one process per stage: MPI under `mpirun`, else the TCP [`Mesh`]
//! with torchrun's environment) this process runs only
//! its own stage's passes: values read on other stages are sent there, values computed there
//! are received; after the passes every rank sends the averaged values it computed to the
//! others, so each runs the late and update programs on the same sums and keeps the same
//! weights (rank 0 reports the step).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::cpu::{Arena, Cpu, KernelFn};
use crate::mesh::{Mesh, Replica, Transport};
use crate::program::{decode, encode};
use crate::program::{Pipeline, Program, Slot};
use crate::{Backend, RunError};

/// A backend for one pass program (see [`Pipelined::with_backends`]).
pub type PassBackend = Box<dyn Backend + Send>;

/// A pass program ready to run: its backend, and where its inputs come from.
struct Pass {
    cpu: PassBackend,
    program: Program,
    /// (slot in the step's arena, slot here) of each weight it reads.
    weights: Vec<(Slot, Slot)>,
}

/// The cpu backend's pipelined step (the name of earlier releases).
pub type PipelineCpu = Pipelined;

/// A pipelined training step (see the module docs).
pub struct Pipelined {
    step: Arena,
    interface: Program,
    spec: Pipeline,
    /// Each device's passes (index in `spec.passes`, pass).
    devices: Vec<Vec<(usize, Pass)>>,
    late: Option<Pass>,
    update: Pass,
    /// The most bytes the values in flight between passes took at once, last step.
    held_peak: u64,
    /// Bytes of the f64 sums of averaged values (per device), last step.
    sums_bytes: u64,
    timing: Timings,
    /// The other ranks, when each stage is a process; this process runs stage `mesh.rank()`.
    mesh: Option<Box<dyn Transport>>,
    /// The other replicas, with data parallelism.
    dp: Option<DataParallel>,
    /// Steps run (keys the messages of a step).
    steps: u64,
    /// The stage computing each exchanged or averaged value (outputs of passes).
    producer: HashMap<String, usize>,
    /// The stages reading each exchanged value (every stage for what the late program reads).
    consumers: HashMap<String, Vec<usize>>,
    /// How many reads of each exchanged value happen in this process per microbatch.
    local_readers: HashMap<String, u32>,
    /// The averaged values of the last step (mean over the microbatches), by name.
    means: HashMap<String, Vec<f64>>,
}

impl Pipelined {
    /// Prepares every pass program of `program` (which must have a pipeline) on the cpu
    /// backend with the kernel entry points `kernels` (in `program.kernels` order).
    ///
    /// # Safety
    ///
    /// As for [`Cpu::new`]: `kernels` are the entries memc generated for `program.kernels`.
    pub unsafe fn new(program: &Program, kernels: &[KernelFn]) -> Result<Pipelined, RunError> {
        // SAFETY: the caller's contract.
        unsafe { Pipelined::on_cpu(program, kernels, None) }
    }

    /// Prepares this rank's stage of `program` on the cpu backend, exchanging values with
    /// the other ranks through `mesh` (one rank per stage).
    ///
    /// # Safety
    ///
    /// As for [`Cpu::new`]: `kernels` are the entries memc generated for `program.kernels`.
    pub unsafe fn with_mesh(
        program: &Program,
        kernels: &[KernelFn],
        mesh: Box<dyn Transport>,
    ) -> Result<Pipelined, RunError> {
        // SAFETY: the caller's contract.
        unsafe { Pipelined::on_cpu(program, kernels, Some(mesh)) }
    }

    /// # Safety
    ///
    /// As for [`Cpu::new`].
    unsafe fn on_cpu(
        program: &Program,
        kernels: &[KernelFn],
        mesh: Option<Box<dyn Transport>>,
    ) -> Result<Pipelined, RunError> {
        let mut make = |_: &str, p: &Program| -> Result<PassBackend, RunError> {
            // SAFETY: every pass's kernels index the step program's table, whose entries the
            // caller vouched for.
            Ok(Box::new(unsafe { Cpu::new(p.checked()?, kernels) }))
        };
        Pipelined::with_backends(program, &mut make, mesh)
    }

    /// Prepares the passes of `program` (this rank's stage only, with a `mesh`), each on the
    /// backend `make` returns for it: `make(label, pass program)` is called for every pass
    /// run here, the gradient sums (`late`) and the optimizer (`update`).
    pub fn with_backends(
        program: &Program,
        make: &mut dyn FnMut(&str, &Program) -> Result<PassBackend, RunError>,
        mesh: Option<Box<dyn Transport>>,
    ) -> Result<Pipelined, RunError> {
        Pipelined::build(program, make, mesh)
    }

    /// Opens `program`'s pipelined step with `make`'s pass backends: in this process alone,
    /// or, launched by `mpirun` (over MPI) or with torchrun's environment (RANK, WORLD_SIZE,
    /// MASTER_ADDR, MASTER_PORT; over the TCP mesh), as this rank's stage of one process per
    /// stage (the world must be the program's stage count; mesh peers are waited for up to
    /// two minutes).
    pub fn open(
        program: &Program,
        make: &mut dyn FnMut(&str, &Program) -> Result<PassBackend, RunError>,
    ) -> Result<Pipelined, RunError> {
        let stages = program.pipeline.as_ref().map_or(0, |p| p.stages);
        let replicas = program.pipeline.as_ref().map_or(1, |p| p.data_parallel);
        let job: Option<std::sync::Arc<dyn Transport>> =
            match crate::mesh::RankEnv::from_env().map_err(RunError::Usage)? {
                Some(env) if env.mpi => Some(std::sync::Arc::new(crate::mpi::Mpi::init(
                    stages as usize,
                    replicas as usize,
                )?)),
                Some(env) => {
                    check_world(env.world, stages, replicas)?;
                    Some(std::sync::Arc::new(Mesh::connect(
                        &env,
                        std::time::Duration::from_secs(120),
                    )?))
                }
                None if replicas > 1 => {
                    return Err(RunError::Usage(format!(
                        "{}: compiled for {replicas} data-parallel replicas of {stages} pipeline stages: launch {} ranks (mpirun -n {})",
                        program.model,
                        stages * replicas,
                        stages * replicas
                    )))
                }
                None => None,
            };
        let Some(job) = job else {
            return Pipelined::with_backends(program, make, None);
        };
        let p = stages as usize;
        let replica = job.rank() / p;
        let view: Box<dyn Transport> = Box::new(Replica {
            inner: job.clone(),
            base: replica * p,
            size: p,
        });
        let mut pipe = Pipelined::with_backends(program, make, Some(view))?;
        if replicas > 1 {
            pipe.dp = Some(DataParallel {
                transport: job,
                replicas: replicas as usize,
                replica,
                stages: p,
            });
        }
        Ok(pipe)
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

    /// The mean over the microbatches of each averaged value (the loss, the weight
    /// gradients) in the last step, by name.
    pub fn means(&self) -> &HashMap<String, Vec<f64>> {
        &self.means
    }

    /// This process's rank (0 without a mesh).
    pub fn rank(&self) -> usize {
        self.mesh.as_ref().map_or(0, |m| m.rank())
    }

    fn build(
        program: &Program,
        make: &mut dyn FnMut(&str, &Program) -> Result<PassBackend, RunError>,
        mesh: Option<Box<dyn Transport>>,
    ) -> Result<Pipelined, RunError> {
        let spec = *program
            .pipeline
            .clone()
            .ok_or_else(|| RunError::Usage("not a pipelined program".into()))?;
        let by_name: HashMap<&str, &Slot> = program
            .params
            .iter()
            .map(|p| (p.slot.name.as_str(), &p.slot))
            .collect();
        let mut prepare = |sub: &crate::program::SubProgram| -> Result<Pass, RunError> {
            let p = sub.resolve(program)?;
            let mut weights = vec![];
            for q in &p.params {
                let outer = by_name.get(q.slot.name.as_str()).ok_or_else(|| {
                    RunError::Program(crate::program::ProgramError::Corrupt(format!(
                        "pass `{}` reads `{}`, which the step does not hold",
                        sub.label, q.slot.name
                    )))
                })?;
                weights.push(((*outer).clone(), q.slot.clone()));
            }
            Ok(Pass {
                cpu: make(&sub.label, &p)?,
                program: p,
                weights,
            })
        };
        if let Some(m) = &mesh {
            check_world(m.world(), spec.stages, 1)?;
        }
        let here = |d: usize| mesh.as_ref().is_none_or(|m| m.rank() == d);
        let mut producer = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut local_readers: HashMap<String, u32> = HashMap::new();
        let all: Vec<usize> = (0..spec.stages as usize).collect();
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
        if let Some(late) = &spec.late {
            for i in late
                .program
                .inputs
                .iter()
                .filter(|i| i.name.starts_with("x."))
            {
                consumers.insert(i.name.clone(), all.clone());
                *local_readers.entry(i.name.clone()).or_default() += 1;
            }
        }
        let mut devices: Vec<Vec<(usize, Pass)>> = (0..spec.stages).map(|_| Vec::new()).collect();
        for (k, sub) in spec.passes.iter().enumerate() {
            let d = devices.get_mut(sub.device as usize).ok_or_else(|| {
                RunError::Usage(format!("pass `{}` is on a missing device", sub.label))
            })?;
            if here(sub.device as usize) {
                d.push((k, prepare(sub)?));
            }
        }
        let late = spec.late.as_ref().map(&mut prepare).transpose()?;
        let update = prepare(&spec.update)?;
        let timing = Timings {
            devices: vec![Timing::default(); spec.stages as usize],
            ..Timings::default()
        };
        Ok(Pipelined {
            means: HashMap::new(),
            timing,
            step: Arena::new(program.arena_bytes),
            interface: program.clone(),
            spec,
            devices,
            late,
            update,
            held_peak: 0,
            sums_bytes: 0,
            mesh,
            dp: None,
            steps: 0,
            producer,
            consumers,
            local_readers,
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

/// This rank's place among the data-parallel replicas: the job's transport, and which
/// replica it runs (its stage's peers are the same stage of every replica).
struct DataParallel {
    transport: std::sync::Arc<dyn Transport>,
    replicas: usize,
    replica: usize,
    stages: usize,
}

impl DataParallel {
    /// Replaces each of `sums` (this replica's, by name) with the sum over every replica's,
    /// added in replica order so every replica gets the same bits; `names` in a fixed order.
    fn all_reduce(
        &self,
        step: u64,
        names: &[String],
        sums: &mut HashMap<String, Vec<f64>>,
    ) -> Result<(), RunError> {
        let stage = self.transport.rank() % self.stages;
        let peer = |k: usize| k * self.stages + stage;
        // Distinct from the replica's own messages, which use real microbatches and MAX.
        let tag = u32::MAX - 1;
        for name in names {
            let Some(mine) = sums.get(name) else {
                continue;
            };
            let bytes: Vec<u8> = mine.iter().flat_map(|x| x.to_le_bytes()).collect();
            for k in (0..self.replicas).filter(|&k| k != self.replica) {
                self.transport.send(peer(k), step, tag, name, &bytes)?;
            }
            let mut total = vec![0f64; mine.len()];
            for k in 0..self.replicas {
                let part = if k == self.replica {
                    bytes.clone()
                } else {
                    self.transport.recv(peer(k), step, tag, name)?
                };
                if part.len() != bytes.len() {
                    return Err(RunError::Usage(format!(
                        "replica {k} sent {} bytes of `{name}`, this one has {}",
                        part.len(),
                        bytes.len()
                    )));
                }
                for (t, c) in total.iter_mut().zip(part.chunks_exact(8)) {
                    *t += f64::from_le_bytes(c.try_into().expect("8 bytes"));
                }
            }
            sums.insert(name.clone(), total);
        }
        Ok(())
    }
}

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
type Sums = HashMap<String, Vec<f64>>;

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
        self.update.cpu.name()
    }

    /// Every program's arena (the step's, each pass's, the late and update programs'), plus
    /// the most the values in flight between passes held at once and the gradient sums, in
    /// the last step.
    fn arena_bytes(&self) -> u64 {
        self.step.bytes() as u64
            + self
                .devices
                .iter()
                .flatten()
                .map(|(_, p)| p.cpu.arena_bytes())
                .sum::<u64>()
            + self.late.as_ref().map_or(0, |l| l.cpu.arena_bytes())
            + self.update.cpu.arena_bytes()
            + self.held_peak
            + self.sums_bytes
    }

    fn set(&mut self, slot: &Slot, bytes: &[u8]) -> Result<(), RunError> {
        self.step.set(slot, bytes);
        Ok(())
    }

    fn get(&mut self, slot: &Slot) -> Result<Vec<u8>, RunError> {
        Ok(self.step.get(slot).to_vec())
    }

    fn run(&mut self) -> Result<(), RunError> {
        self.steps += 1;
        let r = self.one_step();
        if let (Err(_), Some(mesh)) = (&r, &self.mesh) {
            mesh.abort();
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
        let (mesh, step_no) = (self.mesh.as_ref(), self.steps);
        let me = self.rank();
        let here = |d: usize| mesh.is_none() || d == me;
        let (producer, consumers) = (&self.producer, &self.consumers);
        let step = &self.step;
        let interface = &self.interface;
        for pass in self
            .devices
            .iter_mut()
            .flatten()
            .map(|(_, p)| p)
            .chain(self.late.as_mut())
        {
            for (outer, inner) in &pass.weights {
                pass.cpu.set(inner, step.get(outer))?;
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
                    let bytes = match mesh {
                        // From another rank: the first reader here receives it and
                        // leaves it for the others.
                        Some(mesh) if !here(from) => match store.try_take(mb, &slot.name) {
                            Some(b) => b,
                            None => {
                                let b = mesh.recv(from, step_no, mb, &slot.name)?;
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
                let outer = interface.input(&slot.name).ok_or_else(|| {
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
                    let v = decode(slot.dtype, &bytes);
                    let acc = sums
                        .entry(slot.name.clone())
                        .or_insert_with(|| vec![0.0; v.len()]);
                    for (a, x) in acc.iter_mut().zip(&v) {
                        *a += x;
                    }
                }
                if let Some(mesh) = mesh {
                    for &c in consumers.get(&slot.name).into_iter().flatten() {
                        if c != me {
                            mesh.send(c, step_no, mb, &slot.name, &bytes)?;
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
        self.sums_bytes = 0;
        for (d, t, part) in results {
            timings[d] = t;
            self.sums_bytes += part.values().map(|v| 8 * v.len() as u64).sum::<u64>();
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
        // Each rank's averaged values to the others: every rank then runs the same late and
        // update programs on the same sums (late outputs are computed on every rank).
        if let Some(mesh) = mesh {
            for name in &self.spec.averaged {
                let Some(&from) = producer.get(name) else {
                    continue;
                };
                if from == me {
                    let v = sums.get(name).ok_or_else(|| {
                        RunError::Usage(format!("no pass here computed `{name}` (a memc bug)"))
                    })?;
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    for r in (0..mesh.world()).filter(|&r| r != me) {
                        mesh.send(r, step_no, u32::MAX, name, &bytes)?;
                    }
                } else {
                    let b = mesh.recv(from, step_no, u32::MAX, name)?;
                    let v = b
                        .chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect();
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
        // Data parallelism: every replica's sums added up, the means taken over all of their
        // microbatches.
        let m = match &self.dp {
            Some(dp) => {
                dp.all_reduce(step_no, &self.spec.averaged, &mut sums)?;
                m * dp.replicas
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
            Ok(s.iter().map(|x| x / m as f64).collect())
        };
        // The optimizer on the averages.
        let update = &mut self.update;
        for slot in &update.program.inputs {
            let bytes = if averaged.contains(&slot.name.as_str()) {
                let b = encode(slot.dtype, &mean(&slot.name)?);
                if b.len() as u64 != slot.bytes() {
                    return Err(RunError::Usage(format!(
                        "`{}`: {} bytes of sums for {} (a rank sent a malformed value)",
                        slot.name,
                        b.len(),
                        slot.type_string()
                    )));
                }
                b
            } else {
                let outer = interface.input(&slot.name).ok_or_else(|| {
                    RunError::Usage(format!(
                        "update input `{}` is not an input of the step",
                        slot.name
                    ))
                })?;
                self.step.get(outer).to_vec()
            };
            update.cpu.set(slot, &bytes)?;
        }
        for (outer, inner) in &update.weights {
            update.cpu.set(inner, self.step.get(outer))?;
        }
        let t0 = Instant::now();
        update.cpu.run()?;
        self.timing.update += t0.elapsed().as_secs_f64();
        for (outer, inner) in &update.weights {
            let bytes = update.cpu.get(inner)?;
            self.step.set(outer, &bytes);
        }
        let training = self
            .interface
            .training
            .as_ref()
            .ok_or_else(|| RunError::Usage("a pipelined program trains".into()))?;
        let loss = self
            .interface
            .output(&training.loss_output)
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
            .map(|(k, v)| (k, v.into_iter().map(|x| x / m as f64).collect()))
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
        if let Some(p) = self.update.cpu.profile() {
            out += &format!("optimizer: {p}");
        }
        Some(out)
    }
}
