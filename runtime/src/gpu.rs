//! The cuda backend: the program's PTX module loaded once per GPU ([`Gpu`]), one device
//! allocation of exactly [`Program::arena_bytes`] per program, every generated kernel
//! launched with its planned buffers, GEMMs on cuBLAS (f32, or bf16 inputs and outputs with
//! f32 accumulation on tensor cores), all on one stream per lane. A pipelined step's pass
//! programs share their GPU's module and run on their stage's lane (stream), so the stages
//! of one process overlap on one GPU. cudarc loads libcuda and libcublas at run time, so
//! building needs no CUDA and a machine without a driver gets one clear error.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{result as cu, sys as cu_sys, CudaContext, CudaStream};

use crate::finite;
use crate::gemm::Geometry;
use crate::program::{Buf, Dtype, Launch, Program, Slot, Step, Written};
use crate::{Backend, RunError};

fn err(what: &str, e: impl std::fmt::Debug) -> RunError {
    RunError::Cuda(format!("{what}: {e:?}"))
}

/// One GEMM call (row-major `out = a @ b` as cuBLAS's column-major `outᵀ = bᵀ aᵀ`), possibly
/// strided-batched.
struct Gemm {
    dtype: Dtype,
    m: i32,
    n: i32,
    k: i32,
    a: u64,
    b: u64,
    c: u64,
    stride_a: i64,
    stride_b: i64,
    batch: i32,
    /// `a` stored as row-major `[k, m]` (a transposed view), `b` as `[n, k]`.
    a_t: bool,
    b_t: bool,
}

enum Ready {
    Launch {
        f: cu_sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        /// The device pointers passed (one per kernel parameter); only read through `ptrs`,
        /// held here so they live as long as the step.
        _params: Box<[u64]>,
        /// `cuLaunchKernel`'s argument array: pointers into `params`, built once.
        ptrs: Vec<*mut c_void>,
    },
    Gemm(Vec<Gemm>),
}

impl Ready {
    fn launch(f: cu_sys::CUfunction, grid: [u32; 3], block: [u32; 3], params: Vec<u64>) -> Ready {
        let mut params = params.into_boxed_slice();
        // The boxed slice never moves or changes size, so these pointers stay valid.
        let ptrs = params
            .iter_mut()
            .map(|v| v as *mut u64 as *mut c_void)
            .collect();
        Ready::Launch {
            f,
            grid: (grid[0], grid[1], grid[2]),
            block: (block[0], block[1], block[2]),
            _params: params,
            ptrs,
        }
    }
}

/// One GPU opened for a program: its context, the program's PTX module (loaded once: the
/// pass programs of a pipelined step index the step program's kernels) and one stream with
/// its cuBLAS handle per lane (a pipeline stage, or the one lane of a single program).
pub struct Gpu {
    ctx: Arc<CudaContext>,
    module: cu_sys::CUmodule,
    arch: String,
    launches: Vec<Vec<Launch>>,
    functions: Mutex<HashMap<String, Function>>,
    lanes: Mutex<HashMap<u32, Arc<Lane>>>,
}

/// A kernel's entry in the loaded module.
#[derive(Clone, Copy)]
struct Function(cu_sys::CUfunction);

// SAFETY: a CUfunction is a handle into the module, valid in its context from any thread
// (every use binds the context to the calling thread first).
unsafe impl Send for Function {}

// SAFETY: the module handle is only used to look functions up, under `functions`' lock;
// the context and streams are cudarc's thread-safe handles.
unsafe impl Send for Gpu {}
// SAFETY: as above.
unsafe impl Sync for Gpu {}

/// One stream and the cuBLAS handle bound to it.
struct Lane {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
}

/// The GPU a process's lane `stage` runs on, among `count` devices: a process launched by
/// `mpirun` or `srun` (its rank's index on its node `local_rank`) takes one device per
/// process on the node; a process alone spreads its stages over the devices, several stages
/// sharing one as streams when there are fewer devices than stages.
pub fn ordinal(stage: usize, local_rank: Option<usize>, count: usize) -> usize {
    match local_rank {
        Some(r) => r % count.max(1),
        None => stage % count.max(1),
    }
}

/// The error for `program` compiled without device code.
pub(crate) fn without_ptx(program: &Program) -> RunError {
    RunError::Usage(format!(
        "{} was compiled without PTX kernels: recompile with memc compile --target all (or --target cuda), or use --backend cpu",
        program.model
    ))
}

impl Gpu {
    /// Opens GPU `ordinal` and loads `program`'s PTX module. Fails with a clear error when
    /// there is no driver or device, or when the program was compiled without device code.
    pub fn open(program: &Program, ordinal: usize) -> Result<Arc<Gpu>, RunError> {
        let device = program
            .device
            .as_ref()
            .ok_or_else(|| without_ptx(program))?;
        crate::cuda::init().map_err(|e| RunError::Cuda(e.to_string()))?;
        let ctx =
            CudaContext::new(ordinal).map_err(|e| err(&format!("opening GPU {ordinal}"), e))?;
        ctx.bind_to_thread()
            .map_err(|e| err(&format!("binding GPU {ordinal}"), e))?;
        let ptx = CString::new(device.ptx.as_str()).map_err(|e| err("PTX", e))?;
        // SAFETY: the context is current; the image is a NUL-terminated PTX.
        let module = unsafe { cu::module::load_data(ptx.as_ptr() as *const c_void) }
            .map_err(|e| err(&format!("loading the {} PTX module", device.arch), e))?;
        Ok(Arc::new(Gpu {
            ctx,
            module,
            arch: device.arch.clone(),
            launches: device.launches.clone(),
            functions: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
        }))
    }

    /// The number of GPUs the driver sees (an error without a driver).
    pub fn count() -> Result<usize, RunError> {
        crate::cuda::init().map_err(|e| RunError::Cuda(e.to_string()))?;
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| err("counting GPUs", e))
    }

    /// This GPU's index.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    fn bind(&self) -> Result<(), RunError> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| err(&format!("binding GPU {}", self.ctx.ordinal()), e))
    }

    fn function(&self, name: &str) -> Result<Function, RunError> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&f) = functions.get(name) {
            return Ok(f);
        }
        let c = CString::new(name).map_err(|e| err("kernel name", e))?;
        // SAFETY: `module` is loaded in this context, which the caller bound.
        let f = unsafe { cu::module::get_function(self.module, c) }
            .map_err(|e| err(&format!("kernel `{name}` in the {} module", self.arch), e))?;
        functions.insert(name.to_string(), Function(f));
        Ok(Function(f))
    }

    /// Lane `lane`'s stream and cuBLAS handle (made on first use).
    fn lane(&self, lane: u32) -> Result<Arc<Lane>, RunError> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = lanes.get(&lane) {
            return Ok(l.clone());
        }
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| err(&format!("a stream on GPU {}", self.ctx.ordinal()), e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| err("cuBLAS", e))?;
        let l = Arc::new(Lane { stream, blas });
        lanes.insert(lane, l.clone());
        Ok(l)
    }
}

// SAFETY: the raw pointers `Cuda` holds (kernel handles, `cuLaunchKernel` argument arrays
// pointing into its own boxed parameters) are valid from any thread, and every entry point
// binds the GPU's context to the calling thread first; one thread uses a `Cuda` at a time.
unsafe impl Send for Cuda {}

impl Drop for Gpu {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // SAFETY: every program using the module holds this `Gpu`, so none is left.
            let _ = unsafe { cu::module::unload(self.module) };
        }
    }
}

/// A device allocation, freed when dropped (with its context bound to the thread).
struct Alloc(u64);

impl Alloc {
    fn new(bytes: usize, what: impl FnOnce() -> String) -> Result<Alloc, RunError> {
        // SAFETY: plain allocation in the current context.
        unsafe { cu::malloc_sync(bytes) }
            .map(Alloc)
            .map_err(|e| err(&what(), e))
    }
}

impl Drop for Alloc {
    fn drop(&mut self) {
        // No work on the allocation may be pending (an arena dropped on an error path may
        // still be being zeroed): the context's work is waited for first.
        let _ = cu::ctx::synchronize();
        // SAFETY: allocated in `new`; nothing is pending on it.
        let _ = unsafe { cu::free_sync(self.0) };
    }
}

/// A program ready to run on a GPU.
pub struct Cuda {
    // Fields drop in order: the allocations before the GPU (its context and module).
    steps: Vec<Ready>,
    lane: Arc<Lane>,
    _arena: Alloc,
    _flag: Alloc,
    /// Dropped after the allocations, so the context outlives them.
    gpu: Arc<Gpu>,
    base: u64,
    bytes: u64,
    labels: Vec<String>,
    profile: Option<HashMap<String, (f64, usize)>>,
    /// With `MEMC_CHECK_NAN` ([`crate::cpu::check_nan`]), what each of `steps` writes: a
    /// program step's results after its last launch.
    check: Option<Vec<Vec<Written>>>,
    /// The gathers' index flag (four `i64`s, its own allocation: the arena stays the plan's
    /// size), and for each of `steps` the op whose kernel sets it (after its last launch).
    flag: u64,
    index_checks: Vec<Option<String>>,
}

/// The GEMM calls of `out = a @ b` (NumPy semantics, batch dims broadcast): one
/// strided-batched call when each operand is fully batched or not batched at all, else one
/// call per product.
fn gemms(
    base: u64,
    dtype: Dtype,
    (a, ash, a_t): (&Buf, &[usize], bool),
    (b, bsh, b_t): (&Buf, &[usize], bool),
    out: &Buf,
) -> Vec<Gemm> {
    let g = Geometry::of(ash, bsh).expect("a validated program's GEMM shapes agree");
    let size = dtype.size() as u64;
    let (m, k, n) = (g.m, g.k, g.n);
    let one = |ia: usize, ib: usize, bi: usize, sa: i64, sb: i64, count: usize| Gemm {
        dtype,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        a: base + a.offset + (ia * m * k) as u64 * size,
        b: base + b.offset + (ib * k * n) as u64 * size,
        c: base + out.offset + (bi * m * n) as u64 * size,
        stride_a: sa,
        stride_b: sb,
        batch: count as i32,
        a_t,
        b_t,
    };
    let uniform = |c: usize| c == g.count || c == 1;
    if uniform(g.a_count) && uniform(g.b_count) {
        let sa = if g.a_count == 1 { 0 } else { (m * k) as i64 };
        let sb = if g.b_count == 1 { 0 } else { (k * n) as i64 };
        return vec![one(0, 0, 0, sa, sb, g.count)];
    }
    g.operands()
        .into_iter()
        .enumerate()
        .map(|(bi, (ia, ib))| one(ia, ib, bi, 0, 0, 1))
        .collect()
}

impl Cuda {
    /// Opens GPU 0, loads the program's PTX module, allocates the arena and writes the
    /// constants. Fails with a clear error when there is no driver or device, or when the
    /// program was compiled without device code.
    pub fn new(program: &Program) -> Result<Cuda, RunError> {
        Cuda::on(&Gpu::open(program, 0)?, program, 0)
    }

    /// Prepares `program` on `gpu` (whose module holds `program`'s kernels: its own, or
    /// the pipelined step's whose pass it is), running on lane `lane`'s stream: allocates its
    /// arena and writes its constants.
    pub fn on(gpu: &Arc<Gpu>, program: &Program, lane: u32) -> Result<Cuda, RunError> {
        gpu.bind()?;
        let lane = gpu.lane(lane)?;
        let stream = lane.stream.clone();
        let bytes = program.arena_bytes.max(1);
        let arena = Alloc::new(bytes as usize, || {
            format!("allocating the {bytes}-byte arena on GPU {} (the plan's peak; use --remat auto or a smaller batch)", gpu.ordinal())
        })?;
        let base = arena.0;
        // SAFETY: `base` holds `bytes` bytes.
        unsafe { cu::memset_d8_async(base, 0, bytes as usize, stream.cu_stream()) }
            .map_err(|e| err("zeroing the arena", e))?;
        let flag_alloc = Alloc::new(32, || "allocating the index flag".into())?;
        let flag = flag_alloc.0;
        let mut index_checks: Vec<Option<String>> = Vec::with_capacity(program.steps.len());
        let mut steps = Vec::with_capacity(program.steps.len());
        let mut labels = Vec::with_capacity(program.steps.len());
        let mut checks: Vec<Vec<Written>> = Vec::with_capacity(program.steps.len());
        for (n, step) in program.steps.iter().enumerate() {
            let written = program.results.get(n).cloned().unwrap_or_default();
            match step {
                Step::Kernel {
                    kernel,
                    args,
                    label,
                    index_check,
                    ..
                } => {
                    let launches = gpu.launches.get(*kernel as usize).ok_or_else(|| {
                        RunError::Usage(format!(
                            "{}: kernel {kernel} is not in the {} module (recompile)",
                            program.model, gpu.arch
                        ))
                    })?;
                    for l in launches {
                        let f = gpu.function(&l.function)?;
                        let mut params = Vec::with_capacity(l.args.len());
                        for &i in &l.args {
                            params.push(match args.get(i as usize) {
                                Some(b) => base + b.offset,
                                // The index flag, after the buffers.
                                None if i as usize == args.len() => flag,
                                None => {
                                    return Err(RunError::Usage(format!(
                                        "{}: kernel `{}` reads buffer {i} of {} (recompile)",
                                        program.model,
                                        l.function,
                                        args.len()
                                    )))
                                }
                            });
                        }
                        steps.push(Ready::launch(f.0, l.grid, l.block, params));
                        labels.push(label.clone());
                        checks.push(vec![]);
                        index_checks.push(None);
                    }
                    if let Some(last) = checks.last_mut() {
                        *last = written;
                    }
                    if let Some(last) = index_checks.last_mut() {
                        last.clone_from(index_check);
                    }
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
                    steps.push(Ready::Gemm(gemms(
                        base,
                        *dtype,
                        (a, a_shape, *a_t),
                        (b, b_shape, *b_t),
                        out,
                    )));
                    labels.push("matmul".into());
                    checks.push(written);
                    index_checks.push(None);
                }
            }
        }
        let mut cuda = Cuda {
            gpu: gpu.clone(),
            lane,
            _arena: arena,
            _flag: flag_alloc,
            base,
            bytes,
            steps,
            labels,
            profile: std::env::var_os("MEMC_PROFILE").map(|_| HashMap::new()),
            check: crate::cpu::check_nan().then_some(checks),
            flag,
            index_checks,
        };
        for c in &program.consts {
            let at = c.blob_offset as usize;
            cuda.set(&c.slot, &program.blob[at..at + c.slot.bytes() as usize])?;
        }
        Ok(cuda)
    }

    fn gemm(blas: &CudaBlas, g: &Gemm) -> Result<(), RunError> {
        let (t, compute, algo) = match g.dtype {
            Dtype::Bf16 => (
                blas_sys::cudaDataType::CUDA_R_16BF,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
            ),
            Dtype::F64 => (
                blas_sys::cudaDataType::CUDA_R_64F,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_64F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ),
            _ => (
                blas_sys::cudaDataType::CUDA_R_32F,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ),
        };
        let (one32, zero32, one64, zero64) = (1f32, 0f32, 1f64, 0f64);
        let (alpha, beta) = if g.dtype == Dtype::F64 {
            (
                &one64 as *const f64 as *const c_void,
                &zero64 as *const f64 as *const c_void,
            )
        } else {
            (
                &one32 as *const f32 as *const c_void,
                &zero32 as *const f32 as *const c_void,
            )
        };
        // Row-major C[m,n] = A[m,k] B[k,n] is column-major Cᵀ[n,m] = Bᵀ[n,k] Aᵀ[k,m]: row-major
        // B is column-major Bᵀ (leading dim n), row-major A is Aᵀ (leading dim k). An operand
        // stored transposed (row-major B as [n,k], A as [k,m]) is column-major B or A itself,
        // so cuBLAS transposes it (leading dims k and m).
        let (n_op, t_op) = (
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
        );
        let (op_b, ld_b) = if g.b_t { (t_op, g.k) } else { (n_op, g.n) };
        let (op_a, ld_a) = if g.a_t { (t_op, g.m) } else { (n_op, g.k) };
        // SAFETY: the pointers lie in the arena (validated program) and the handle's stream is
        // the backend's stream.
        unsafe {
            blas::gemm_strided_batched_ex(
                *blas.handle(),
                op_b,
                op_a,
                g.n,
                g.m,
                g.k,
                alpha,
                g.b as *const c_void,
                t,
                ld_b,
                g.stride_b,
                g.a as *const c_void,
                t,
                ld_a,
                g.stride_a,
                beta,
                g.c as *mut c_void,
                t,
                g.n,
                (g.m as i64) * (g.n as i64),
                g.batch,
                compute,
                algo,
            )
        }
        .map_err(|e| err("cuBLAS GEMM", e))
    }
}

impl Backend for Cuda {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn arena_bytes(&self) -> u64 {
        self.bytes
    }

    fn set(&mut self, slot: &Slot, bytes: &[u8]) -> Result<(), RunError> {
        assert_eq!(
            bytes.len() as u64,
            slot.bytes(),
            "`{}`: wrong size",
            slot.name
        );
        self.gpu.bind()?;
        let stream = &self.lane.stream;
        // SAFETY: the slot lies in the arena; the copy completes before `bytes` is released
        // (the stream is synchronised).
        unsafe { cu::memcpy_htod_async(self.base + slot.offset, bytes, stream.cu_stream()) }
            .map_err(|e| err(&format!("writing `{}`", slot.name), e))?;
        stream.synchronize().map_err(|e| err("synchronize", e))
    }

    fn get(&mut self, slot: &Slot) -> Result<Vec<u8>, RunError> {
        self.gpu.bind()?;
        let stream = &self.lane.stream;
        let mut out = vec![0u8; slot.bytes() as usize];
        // SAFETY: as in `set`.
        unsafe { cu::memcpy_dtoh_async(&mut out, self.base + slot.offset, stream.cu_stream()) }
            .map_err(|e| err(&format!("reading `{}`", slot.name), e))?;
        stream.synchronize().map_err(|e| err("synchronize", e))?;
        Ok(out)
    }

    fn run(&mut self) -> Result<(), RunError> {
        self.gpu.bind()?;
        let Cuda {
            lane,
            steps,
            labels,
            profile,
            check,
            base,
            flag,
            index_checks,
            ..
        } = self;
        let (stream, blas) = (&lane.stream, &lane.blas);
        let cu_stream = stream.cu_stream();
        // SAFETY: `flag` holds 32 bytes.
        unsafe { cu::memset_d8_async(*flag, 0, 32, cu_stream) }
            .map_err(|e| err("clearing the index flag", e))?;
        for (n, step) in steps.iter_mut().enumerate() {
            let t0 = profile.is_some().then(Instant::now);
            match step {
                Ready::Launch {
                    f,
                    grid,
                    block,
                    ptrs,
                    ..
                } => {
                    // SAFETY: each parameter is a device pointer into the arena, as the kernel
                    // expects (bare-pointer convention); `ptrs` points into the step's params.
                    unsafe { cu::launch_kernel(*f, *grid, *block, 0, cu_stream, ptrs) }
                        .map_err(|e| err(&format!("launching step {n} ({})", labels[n]), e))?;
                }
                Ready::Gemm(calls) => {
                    for g in calls.iter() {
                        Cuda::gemm(blas, g)?;
                    }
                }
            }
            if let (Some(t0), Some(p)) = (t0, profile.as_mut()) {
                stream.synchronize().map_err(|e| err("synchronize", e))?;
                let e = p.entry(labels[n].clone()).or_insert((0.0, 0));
                e.0 += t0.elapsed().as_secs_f64() * 1e3;
                e.1 += 1;
            }
            if let Some(what) = &index_checks[n] {
                let mut host = [0u8; 32];
                // SAFETY: `flag` holds 32 bytes.
                unsafe { cu::memcpy_dtoh_async(&mut host[..], *flag, cu_stream) }
                    .map_err(|e| err("reading the index flag", e))?;
                stream.synchronize().map_err(|e| err("synchronize", e))?;
                let v: Vec<i64> = host
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                if v[0] != 0 {
                    return Err(RunError::IndexOutOfRange {
                        what: what.clone(),
                        index: v[1],
                        axis: v[2],
                        size: v[3],
                    });
                }
            }
            for w in check.as_ref().map_or(&[][..], |c| &c[n][..]) {
                let mut host = vec![0u8; w.buf.bytes as usize];
                // SAFETY: the buffer lies inside the arena (the program is checked).
                unsafe { cu::memcpy_dtoh_async(&mut host, *base + w.buf.offset, cu_stream) }
                    .map_err(|e| err(&format!("reading the result of step {n}"), e))?;
                stream.synchronize().map_err(|e| err("synchronize", e))?;
                if let Some((k, value)) = finite::first(&host, w.dtype, finite::Bad::Nan) {
                    return Err(RunError::NonFinite {
                        what: w.what.clone(),
                        ty: w.type_string(),
                        value,
                        at: format!(" at {:?}", finite::position(&w.shape, k)),
                    });
                }
            }
        }
        stream
            .synchronize()
            .map_err(|e| err("running the program", e))
    }

    fn profile(&self) -> Option<String> {
        let p = self.profile.as_ref()?;
        let mut rows: Vec<_> = p.iter().collect();
        rows.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
        let total: f64 = rows.iter().map(|r| r.1 .0).sum();
        let mut out = format!("profile (cuda, synchronised per step): {total:.1} ms\n");
        for (name, (ms, calls)) in rows.iter().take(12) {
            out += &format!(
                "  {name:<24} {ms:>10.3} ms {:>5.1}% {calls:>7} calls\n",
                100.0 * ms / total.max(1e-9)
            );
        }
        Some(out)
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // The allocations free themselves next, in this context, with no work pending.
        let _ = self.gpu.bind();
        let _ = self.lane.stream.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(offset: u64, shape: &[usize]) -> Buf {
        Buf {
            offset,
            bytes: shape.iter().product::<usize>() as u64 * 4,
        }
    }

    #[test]
    fn each_process_or_stage_takes_a_gpu() {
        // A process alone spreads its stages (lanes) over the GPUs, sharing them when fewer.
        let alone: Vec<usize> = (0..5).map(|s| ordinal(s, None, 2)).collect();
        assert_eq!(alone, [0, 1, 0, 1, 0]);
        assert!((0..4).all(|s| ordinal(s, None, 1) == 0));
        // A rank of an mpirun or srun job takes its node-local rank's GPU, whatever its stage.
        assert_eq!(ordinal(1, Some(5), 8), 5);
        assert_eq!(ordinal(0, Some(5), 4), 1);
        // One visible GPU per rank (CUDA_VISIBLE_DEVICES set by the launcher).
        assert_eq!(ordinal(1, Some(3), 1), 0);
        assert_eq!(ordinal(2, None, 0), 0);
    }

    #[test]
    fn gemm_calls_follow_numpy_broadcasting() {
        // [2,3,4,5] @ [5,6]: the weight is shared: one strided call with stride 0 for b.
        let (a, b, o) = (
            buf(0, &[2, 3, 4, 5]),
            buf(1000, &[5, 6]),
            buf(2000, &[2, 3, 4, 6]),
        );
        let g = gemms(
            0,
            Dtype::F32,
            (&a, &[2, 3, 4, 5], false),
            (&b, &[5, 6], false),
            &o,
        );
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].batch, g[0].stride_a, g[0].stride_b), (6, 20, 0));
        assert_eq!((g[0].m, g[0].k, g[0].n), (4, 5, 6));
        // [2,1,4,5] @ [1,3,5,6]: both broadcast along different dims: one call per product,
        // reading the right matrices.
        let (a, b) = (buf(0, &[2, 1, 4, 5]), buf(1000, &[1, 3, 5, 6]));
        let g = gemms(
            0,
            Dtype::F32,
            (&a, &[2, 1, 4, 5], false),
            (&b, &[1, 3, 5, 6], false),
            &o,
        );
        assert_eq!(g.len(), 6);
        let a_mats: Vec<u64> = g.iter().map(|c| c.a / (20 * 4)).collect();
        let b_mats: Vec<u64> = g.iter().map(|c| (c.b - 1000) / (30 * 4)).collect();
        assert_eq!(a_mats, vec![0, 0, 0, 1, 1, 1]);
        assert_eq!(b_mats, vec![0, 1, 2, 0, 1, 2]);
        assert!(g
            .iter()
            .enumerate()
            .all(|(i, c)| c.c == 2000 + (i * 24 * 4) as u64));
    }
}
