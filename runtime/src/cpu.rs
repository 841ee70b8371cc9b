//! The cpu backend: one arena of exactly [`crate::program::Program::arena_bytes`], the generated host kernels
//! called through their uniform entry `void kernel(void **buffers)`, GEMMs on
//! [`crate::gemm`].

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::collections::HashMap;
use std::time::Instant;

use crate::finite::{self, Bad};
use crate::gemm::{matmul, GemmType};
use crate::program::{Buf, Checked, Native, Program, Slot, Step, Written};

/// A generated kernel's entry point.
pub type KernelFn = unsafe extern "C" fn(*const *mut u8);

/// Alignment of the arena's base (the plan aligns offsets to 256 bytes).
const ARENA_ALIGN: usize = 256;

/// One allocation of the plan's peak, zeroed.
pub struct Arena {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: an arena owns its allocation; `get` reads through `&self` and `set` writes through
// `&mut self`, so sharing `&Arena` between threads only reads, and moving it moves the
// allocation.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

impl Arena {
    /// Allocates `bytes` (at least one byte is reserved so the pointer is valid).
    pub fn new(bytes: u64) -> Arena {
        let bytes = bytes as usize;
        let layout = Layout::from_size_align(bytes.max(1), ARENA_ALIGN).expect("arena layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Arena { ptr, bytes }
    }

    /// Bytes allocated: the plan's peak.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A pointer `offset` bytes into the arena, for kernel arguments; panics past its end.
    fn at(&self, offset: u64) -> *mut u8 {
        assert!(
            offset as usize <= self.bytes,
            "offset {offset} is past the arena's {} bytes",
            self.bytes
        );
        // SAFETY: `offset` is within the allocation (checked above; one past the end is allowed).
        unsafe { self.ptr.add(offset as usize) }
    }

    /// A pointer to buffer `b`; panics when it does not lie inside the arena.
    fn buffer(&self, b: &Buf) -> *mut u8 {
        assert!(
            b.offset
                .checked_add(b.bytes)
                .is_some_and(|end| end <= self.bytes as u64),
            "a buffer of {} bytes at offset {} is past the arena's {} bytes",
            b.bytes,
            b.offset,
            self.bytes
        );
        self.at(b.offset)
    }

    /// The whole arena.
    fn all(&self) -> &[u8] {
        // SAFETY: `ptr` is an allocation of at least `bytes` zero-initialised bytes that this
        // arena owns; the borrow of `self` keeps it alive and unwritten.
        unsafe { std::slice::from_raw_parts(self.ptr, self.bytes) }
    }

    /// The whole arena, writable.
    fn all_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `all`; `&mut self` excludes every other borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.bytes) }
    }

    /// The byte range of `slot`; panics when it does not lie inside the arena.
    fn range(&self, slot: &Slot) -> std::ops::Range<usize> {
        let start = slot.offset as usize;
        let end = start.checked_add(slot.bytes() as usize);
        match end {
            Some(end) if end <= self.bytes => start..end,
            _ => panic!(
                "`{}` ({} bytes at offset {start}) is past the arena's {} bytes",
                slot.name,
                slot.bytes(),
                self.bytes
            ),
        }
    }

    /// The bytes of buffer `b` (bounds-checked: a buffer outside the arena panics).
    pub fn bytes_of(&self, b: &Buf) -> &[u8] {
        self.buffer(b);
        &self.all()[b.offset as usize..(b.offset + b.bytes) as usize]
    }

    /// The bytes of `slot` (bounds-checked: a slot outside the arena panics).
    pub fn get(&self, slot: &Slot) -> &[u8] {
        let r = self.range(slot);
        &self.all()[r]
    }

    /// Overwrites `slot` with `bytes` (exactly its size; bounds-checked).
    pub fn set(&mut self, slot: &Slot, bytes: &[u8]) {
        assert_eq!(
            bytes.len() as u64,
            slot.bytes(),
            "`{}`: wrong size",
            slot.name
        );
        let r = self.range(slot);
        self.all_mut()[r].copy_from_slice(bytes);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.bytes.max(1), ARENA_ALIGN).expect("arena layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, layout) }
    }
}

/// A prepared step: the kernel's entry and its argument pointers, or a GEMM.
enum Ready {
    Kernel(KernelFn, Vec<*mut u8>),
    /// A kernel taking a row range over `0..rows` after its buffers, and the bytes its
    /// buffers span (how much work a call is).
    Split(KernelFn, Vec<*mut u8>, u64, u64),
    Gemm {
        t: GemmType,
        a: Buf,
        a_shape: Vec<usize>,
        b: Buf,
        b_shape: Vec<usize>,
        out: Buf,
        trans: (bool, bool),
    },
    /// A step the runtime implements ([`Native`]): its operands, then its result.
    Native(Native, Vec<Buf>),
}

/// A program ready to run on the CPU: its arena (constants loaded) and its steps.
pub struct Cpu {
    arena: Arena,
    steps: Vec<Ready>,
    labels: Vec<String>,
    profile: Option<HashMap<String, (f64, usize)>>,
    /// What each step writes, checked for NaNs after it when set ([`check_nan`]).
    check: Option<Vec<Vec<Written>>>,
    /// The index flag the gathers' kernels take.
    flag: IndexFlag,
    /// The steps that take it (in order) and the op each runs, for messages.
    index_checks: Vec<(usize, String)>,
    /// The program's evaluation step, on the same arena.
    eval: Option<Eval>,
}

/// Four `i64`s a gather's kernel sets when it meets an out-of-range index: hit, the index,
/// the axis, the axis's size. Heap-allocated, so its address is fixed for the kernels.
struct IndexFlag(*mut [i64; 4]);

impl IndexFlag {
    fn new() -> IndexFlag {
        IndexFlag(Box::into_raw(Box::new([0; 4])))
    }

    /// Takes what a kernel reported, clearing it.
    fn take(&self) -> Option<[i64; 4]> {
        // SAFETY: the allocation lives as long as `self`; no kernel runs during the call.
        unsafe {
            let v = self.0.read_volatile();
            (v[0] != 0).then(|| {
                self.0.write_volatile([0; 4]);
                v
            })
        }
    }
}

impl Drop for IndexFlag {
    fn drop(&mut self) {
        // SAFETY: allocated by `Box::into_raw` in `new`, freed once.
        drop(unsafe { Box::from_raw(self.0) })
    }
}

/// Whether `MEMC_CHECK_NAN` is set (to anything but `0`): compiled programs then check every
/// step's results for NaNs and stop at the first step that wrote one, naming its op, as the
/// reference backend does after every node. It costs a pass over every result.
pub fn check_nan() -> bool {
    std::env::var_os("MEMC_CHECK_NAN").is_some_and(|v| !v.is_empty() && v != "0")
}

// SAFETY: a `Cpu`'s step pointers point into its own arena (moved with it) and its kernels
// are plain functions keeping no state; it runs only through `&mut self`.
unsafe impl Send for Cpu {}

impl Cpu {
    /// Allocates the arena, writes the constants and binds every step to its kernel
    /// (`kernels[i]` is the entry of `program.kernels[i]`). The program is [`Checked`], so
    /// every buffer lies inside the arena (and `new` asserts it again where it takes a
    /// pointer). With `MEMC_PROFILE` set in the environment, time per kind of step is kept for
    /// [`Cpu::profile`] (`MEMC_PROFILE=shapes`: GEMMs apart by shape, and more rows).
    ///
    /// # Safety
    ///
    /// Each `kernels[i]` must be the entry point memc generated for `program.kernels[i]` of
    /// this program (in the uniform `void kernel(void **buffers)` ABI): [`Cpu::run`] calls it
    /// with its step's buffers (then, for a step with an `index_check`, a pointer to the four
    /// `i64`s of the index flag; and for a step with a row `range`, a pointer to `[lo, hi]`:
    /// the kernel then touches only those rows), and it must read and write only those.
    pub unsafe fn new(program: Checked<'_>, kernels: &[KernelFn]) -> Cpu {
        assert_eq!(
            kernels.len(),
            program.kernels.len(),
            "one entry per program kernel"
        );
        let mut arena = Arena::new(program.arena_bytes);
        for c in &program.consts {
            let at = c.blob_offset as usize;
            arena.set(&c.slot, &program.blob[at..at + c.slot.bytes() as usize]);
        }
        let flag = IndexFlag::new();
        let main = prepare(&program, kernels, &arena, &flag);
        let eval = match &program.eval {
            Some(e) => {
                let p = e
                    .resolve(&program)
                    .expect("a checked program's evaluation step resolves");
                let consts = p
                    .consts
                    .iter()
                    .map(|c| {
                        let at = c.blob_offset as usize;
                        (
                            c.slot.clone(),
                            p.blob[at..at + c.slot.bytes() as usize].to_vec(),
                        )
                    })
                    .collect();
                Some(Eval {
                    prepared: prepare(&p, kernels, &arena, &flag),
                    consts,
                })
            }
            None => None,
        };
        Cpu {
            arena,
            steps: main.steps,
            labels: main.labels,
            profile: std::env::var_os("MEMC_PROFILE").map(|_| HashMap::new()),
            check: (check_nan() && !program.results.is_empty()).then(|| program.results.clone()),
            flag,
            index_checks: main.index_checks,
            eval,
        }
    }

    /// The arena.
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// The arena, to write inputs and parameters.
    pub fn arena_mut(&mut self) -> &mut Arena {
        &mut self.arena
    }

    /// Runs every step once. With [`check_nan`] set, the first step whose result holds a NaN
    /// stops the run (the steps before it have run).
    pub fn run(&mut self) -> Result<(), crate::RunError> {
        exec(
            &self.arena,
            &self.steps,
            &self.labels,
            &self.index_checks,
            &self.flag,
            self.profile.as_mut(),
            self.check.as_ref(),
        )
    }

    /// Runs the program's evaluation step once, on the same arena: its constants written,
    /// then its steps (the training step's working region is reused; the weights are read
    /// where the training step keeps them).
    pub fn evaluate(&mut self) -> Result<(), crate::RunError> {
        let Some(e) = &self.eval else {
            return Err(crate::RunError::Usage(
                "the program was compiled without an evaluation step: recompile with memc compile --train --eval".into(),
            ));
        };
        for (slot, bytes) in &e.consts {
            self.arena.set(slot, bytes);
        }
        exec(
            &self.arena,
            &e.prepared.steps,
            &e.prepared.labels,
            &e.prepared.index_checks,
            &self.flag,
            self.profile.as_mut(),
            None,
        )
    }

    /// Each step's time in one whole run, in seconds: the steps run in order, as in training
    /// (each reads what the steps before it wrote, in cache or not, as it will in a real
    /// step), each timed where it runs (`memc plan`'s calibration, [`crate::cost`]). Index
    /// checks are not made.
    ///
    /// With `again`, each GEMM is then run once more at once, its operands now in cache, and
    /// timed too (a GEMM writes its result without reading it, so running it twice changes
    /// nothing): the second time is what a GEMM timed alone takes
    /// ([`crate::cost::time_gemm`]), measured at the same moment as the first.
    pub fn time_run(&mut self, again: bool) -> Vec<(f64, Option<f64>)> {
        let mut out = Vec::with_capacity(self.steps.len());
        for i in 0..self.steps.len() {
            let gemm = again && matches!(self.steps[i], Ready::Gemm { .. });
            let time = || {
                let t0 = Instant::now();
                // Out-of-range indices are clamped by their kernels; the flag is cleared
                // unread.
                let _ = exec(
                    &self.arena,
                    &self.steps[i..i + 1],
                    &self.labels[i..i + 1],
                    &[],
                    &self.flag,
                    None,
                    None,
                );
                t0.elapsed().as_secs_f64()
            };
            let first = time();
            out.push((first, gemm.then(time)));
        }
        out
    }

    /// Time per kind of step (most first), when `MEMC_PROFILE` is set: the table printed at
    /// the end of a run.
    pub fn profile(&self) -> Option<String> {
        let p = self.profile.as_ref()?;
        let mut rows: Vec<(&String, &(f64, usize))> = p.iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let total: f64 = rows.iter().map(|r| r.1 .0).sum();
        let mut out = format!("profile: {total:.1} ms in kernels\n");
        for (name, (ms, calls)) in rows.iter().take(if shapes() { 60 } else { 12 }) {
            out += &format!(
                "  {name:<24} {ms:>10.3} ms {:>5.1}% {calls:>7} calls\n",
                100.0 * ms / total.max(1e-9)
            );
        }
        Some(out)
    }
}

/// Whether `MEMC_PROFILE=shapes`: the profile tells GEMMs apart by their shapes.
fn shapes() -> bool {
    std::env::var_os("MEMC_PROFILE").is_some_and(|v| v == "shapes")
}

/// Buffers spanning fewer bytes than this run on one thread: waking the pool costs more.
const SPLIT_BYTES: u64 = 1 << 18;

/// Runs a split kernel over rows `0..rows`: in one call when the kernel is small, else in
/// row ranges across [`crate::pool`]'s threads (a few ranges per thread, for balance).
fn run_split(f: KernelFn, ptrs: &[*mut u8], rows: u64, bytes: u64) {
    struct Args<'a>(&'a [*mut u8]);
    // SAFETY: the kernel's tasks write disjoint rows of its buffers (the split form's
    // contract, `memc_codegen::threads`), so sharing the pointers between threads is sound.
    unsafe impl Sync for Args<'_> {}
    let call = |lo: u64, hi: u64, args: &Args| {
        let range = [lo as i64, hi as i64];
        let mut all = args.0.to_vec();
        all.push(range.as_ptr() as *mut u8);
        // SAFETY: the caller of `Cpu::new` vouched for the kernel; it reads `[lo, hi]` after
        // its buffers, a sub-range of its parallel dim.
        unsafe { f(all.as_ptr()) }
    };
    let args = Args(ptrs);
    let threads = crate::pool::threads() as u64;
    if threads <= 1 || bytes < SPLIT_BYTES {
        return call(0, rows, &args);
    }
    let tasks = rows.min(4 * threads);
    crate::pool::parallel_for(tasks as usize, &|t| {
        let t = t as u64;
        call(t * rows / tasks, (t + 1) * rows / tasks, &args)
    });
}

/// Runs `steps` once on `arena` (see [`Cpu::run`]).
#[allow(clippy::too_many_arguments)]
fn exec(
    arena: &Arena,
    steps: &[Ready],
    labels: &[String],
    index_checks: &[(usize, String)],
    flag: &IndexFlag,
    mut profile: Option<&mut HashMap<String, (f64, usize)>>,
    check: Option<&Vec<Vec<Written>>>,
) -> Result<(), crate::RunError> {
    flag.take();
    let mut next_check = 0;
    for (n, step) in steps.iter().enumerate() {
        let t0 = profile.is_some().then(Instant::now);
        match step {
            // SAFETY: each buffer was checked to lie inside the arena in `new`, whose
            // caller vouched that `f` touches only its step's buffers.
            Ready::Kernel(f, ptrs) => unsafe { f(ptrs.as_ptr()) },
            Ready::Split(f, ptrs, rows, bytes) => run_split(*f, ptrs, *rows, *bytes),
            Ready::Gemm {
                t,
                a,
                a_shape,
                b,
                b_shape,
                out,
                trans,
            } => {
                // SAFETY: `buffer` checks that each lies inside the arena; the plan gives a
                // GEMM's operands and result disjoint buffers.
                let (sa, sb, so) = unsafe {
                    (
                        std::slice::from_raw_parts(arena.buffer(a), a.bytes as usize),
                        std::slice::from_raw_parts(arena.buffer(b), b.bytes as usize),
                        std::slice::from_raw_parts_mut(arena.buffer(out), out.bytes as usize),
                    )
                };
                matmul(*t, sa, a_shape, sb, b_shape, so, *trans);
            }
            Ready::Native(Native::Attention(spec), args) => {
                let (out, ins) = args.split_last().expect("operands and a result");
                // SAFETY: `buffer` checks that each lies inside the arena; the plan gives a
                // step's result a buffer disjoint from its operands'.
                let ins: Vec<&[u8]> = ins
                    .iter()
                    .map(|b| unsafe {
                        std::slice::from_raw_parts(arena.buffer(b), b.bytes as usize)
                    })
                    .collect();
                let out = unsafe {
                    std::slice::from_raw_parts_mut(arena.buffer(out), out.bytes as usize)
                };
                crate::attention::run(spec, &ins, out);
            }
        }
        if let (Some(t0), Some(p)) = (t0, profile.as_deref_mut()) {
            let e = p.entry(labels[n].clone()).or_insert((0.0, 0));
            e.0 += t0.elapsed().as_secs_f64() * 1e3;
            e.1 += 1;
        }
        if index_checks.get(next_check).is_some_and(|c| c.0 == n) {
            let what = &index_checks[next_check].1;
            next_check += 1;
            if let Some([_, index, axis, size]) = flag.take() {
                return Err(crate::RunError::IndexOutOfRange {
                    what: what.clone(),
                    index,
                    axis,
                    size,
                });
            }
        }
        if let Some(check) = check {
            for w in &check[n] {
                let bytes = arena.bytes_of(&w.buf);
                if let Some((k, value)) = finite::first(bytes, w.dtype, Bad::Nan) {
                    return Err(crate::RunError::NonFinite {
                        what: w.what.clone(),
                        ty: w.type_string(),
                        value,
                        at: format!(" at {:?}", finite::position(&w.shape, k)),
                    });
                }
            }
        }
    }
    Ok(())
}

/// A program's steps bound to their kernels and buffers in `arena`.
struct Prepared {
    steps: Vec<Ready>,
    labels: Vec<String>,
    index_checks: Vec<(usize, String)>,
}

/// The evaluation step: its steps and its constants (written before each run: they live in
/// the region the training step reuses).
struct Eval {
    prepared: Prepared,
    consts: Vec<(Slot, Vec<u8>)>,
}

/// Binds `program`'s steps to `kernels` and to their buffers in `arena` (see [`Cpu::new`]).
fn prepare(program: &Program, kernels: &[KernelFn], arena: &Arena, flag: &IndexFlag) -> Prepared {
    let by_shape = shapes();
    let mut index_checks = vec![];
    let mut steps = Vec::with_capacity(program.steps.len());
    let mut labels = Vec::with_capacity(program.steps.len());
    for step in &program.steps {
        match step {
            Step::Kernel {
                args,
                label,
                native: Some(native),
                ..
            } => {
                for b in args {
                    arena.buffer(b);
                }
                steps.push(Ready::Native(native.clone(), args.clone()));
                labels.push(label.clone());
            }
            Step::Kernel {
                kernel,
                args,
                label,
                native: None,
                range,
                index_check,
            } => {
                let mut ptrs: Vec<*mut u8> = args.iter().map(|b| arena.buffer(b)).collect();
                if let Some(what) = index_check {
                    ptrs.push(flag.0.cast());
                    index_checks.push((steps.len(), what.clone()));
                }
                let f = kernels[*kernel as usize];
                if by_shape {
                    let bytes: u64 = args.iter().map(|b| b.bytes).sum();
                    labels.push(format!("{label} k{kernel} ({} MB)", bytes >> 20));
                } else {
                    labels.push(label.clone());
                }
                steps.push(match range {
                    Some(rows) => {
                        let bytes = args.iter().map(|b| b.bytes).sum();
                        Ready::Split(f, ptrs, *rows, bytes)
                    }
                    None => Ready::Kernel(f, ptrs),
                });
            }
            Step::Gemm {
                dtype,
                a,
                a_shape,
                b,
                b_shape,
                out,
                a_t,
                b_t,
            } => {
                // A checked program's GEMMs are f32, f64 or bf16.
                let t = GemmType::of(*dtype).unwrap_or(GemmType::F32);
                steps.push(Ready::Gemm {
                    t,
                    a: *a,
                    a_shape: a_shape.clone(),
                    b: *b,
                    b_shape: b_shape.clone(),
                    out: *out,
                    trans: (*a_t, *b_t),
                });
                labels.push(if by_shape {
                    format!("matmul {a_shape:?}x{b_shape:?}")
                } else {
                    "matmul".into()
                });
            }
        }
    }
    Prepared {
        steps,
        labels,
        index_checks,
    }
}

impl crate::Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn arena_bytes(&self) -> u64 {
        self.arena.bytes() as u64
    }

    fn set(&mut self, slot: &Slot, bytes: &[u8]) -> Result<(), crate::RunError> {
        self.arena.set(slot, bytes);
        Ok(())
    }

    fn get(&mut self, slot: &Slot) -> Result<Vec<u8>, crate::RunError> {
        Ok(self.arena.get(slot).to_vec())
    }

    fn run(&mut self) -> Result<(), crate::RunError> {
        Cpu::run(self)
    }

    fn can_evaluate(&self) -> bool {
        self.eval.is_some()
    }

    fn evaluate(&mut self) -> Result<(), crate::RunError> {
        Cpu::evaluate(self)
    }

    fn first_bad(
        &mut self,
        slot: &Slot,
        bad: Bad,
    ) -> Result<Option<(usize, f64)>, crate::RunError> {
        // Read in place: no copy of the weights.
        Ok(finite::first(self.arena.get(slot), slot.dtype, bad))
    }

    fn profile(&self) -> Option<String> {
        Cpu::profile(self)
    }
}
