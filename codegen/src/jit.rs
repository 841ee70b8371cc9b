//! Running host kernels in-process through LLVM's JIT: for checking kernels against the
//! reference interpreter without building an executable.

use inkwell::attributes::AttributeLoc;
use inkwell::context::Context;
use inkwell::targets::TargetMachine;
use inkwell::OptimizationLevel;
use memc_runtime::cpu::KernelFn;

use crate::kernel::KernelError;
use crate::link::{host_machine, link_kernels, optimize};

#[link(name = "m")]
extern "C" {
    fn expf(x: f32) -> f32;
    fn logf(x: f32) -> f32;
    fn sqrtf(x: f32) -> f32;
    fn tanhf(x: f32) -> f32;
    fn erff(x: f32) -> f32;
    fn cosf(x: f32) -> f32;
    fn sinf(x: f32) -> f32;
    fn powf(x: f32, y: f32) -> f32;
    fn exp(x: f64) -> f64;
    fn log(x: f64) -> f64;
    fn sqrt(x: f64) -> f64;
    fn tanh(x: f64) -> f64;
    fn erf(x: f64) -> f64;
    fn cos(x: f64) -> f64;
    fn sin(x: f64) -> f64;
    fn pow(x: f64, y: f64) -> f64;
}

/// `__truncsfbf2`, the compiler-rt helper LLVM calls to round f32 to bf16 on CPUs without
/// a bf16 instruction (MLIR expands the conversion to integer ops, but LLVM's optimiser folds
/// them back into one `fptrunc`): round to nearest even, NaN kept quiet. The bf16 result is
/// returned in the low 16 bits of an SSE register, as the ABI for `__bf16` has it.
extern "C" fn truncsfbf2(x: f32) -> f32 {
    f32::from_bits(half::bf16::from_f32(x).to_bits() as u32)
}

/// The C math functions lowered kernels may call (an emitted executable links libm), and the
/// bf16 rounding helper.
fn libm() -> [(&'static str, usize); 17] {
    [
        ("__truncsfbf2", truncsfbf2 as *const () as usize),
        ("expf", expf as *const () as usize),
        ("logf", logf as *const () as usize),
        ("sqrtf", sqrtf as *const () as usize),
        ("tanhf", tanhf as *const () as usize),
        ("erff", erff as *const () as usize),
        ("cosf", cosf as *const () as usize),
        ("sinf", sinf as *const () as usize),
        ("powf", powf as *const () as usize),
        ("exp", exp as *const () as usize),
        ("log", log as *const () as usize),
        ("sqrt", sqrt as *const () as usize),
        ("tanh", tanh as *const () as usize),
        ("erf", erf as *const () as usize),
        ("cos", cos as *const () as usize),
        ("sin", sin as *const () as usize),
        ("pow", pow as *const () as usize),
    ]
}

/// Calls a JIT-compiled kernel by name with its buffers (inputs, then outputs).
pub type Call<'a> = dyn Fn(&str, &[*mut u8]) + 'a;

/// Links the LLVM IR of `kernels` (name, IR) into one module, optimises it for the host
/// (as emitted executables are), JIT-compiles it, and gives `f` a way to call any kernel.
/// Fails if a kernel needs a symbol other than libm's.
pub fn with_host_jit<R>(
    kernels: &[(String, String)],
    f: impl FnOnce(&Call) -> R,
) -> Result<R, KernelError> {
    with_host_kernels(kernels, |entries| {
        let call = |name: &str, bufs: &[*mut u8]| {
            let at = kernels
                .iter()
                .position(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("no kernel `{name}`"));
            // SAFETY: every kernel has the entry `void name(void **buffers)`; the caller
            // passes one live buffer of the right size per kernel argument.
            unsafe { entries[at](bufs.as_ptr()) };
        };
        f(&call)
    })
}

/// As [`with_host_jit`], giving `f` the entry points of `kernels` in order (what
/// [`memc_runtime::cpu::Cpu::new`] takes).
pub fn with_host_kernels<R>(
    kernels: &[(String, String)],
    f: impl FnOnce(&[KernelFn]) -> R,
) -> Result<R, KernelError> {
    let llvm = |kernel: &str, msg: String| KernelError::Llvm {
        kernel: kernel.to_string(),
        msg,
    };
    let machine = host_machine()?;
    let ctx = Context::create();
    let module = link_kernels(&ctx, kernels)?;
    // The JIT generates code for a generic CPU unless each function names the host's, as
    // emitted executables do (their target machine is the host's).
    let cpu = TargetMachine::get_host_cpu_name().to_string();
    let features = TargetMachine::get_host_cpu_features().to_string();
    for func in module.get_functions() {
        if func.count_basic_blocks() > 0 {
            for (k, v) in [("target-cpu", &cpu), ("target-features", &features)] {
                func.add_attribute(AttributeLoc::Function, ctx.create_string_attribute(k, v));
            }
        }
    }
    optimize(&module, &machine)?;
    // Declared so that the JIT can map it: code generation may call it (see `truncsfbf2`).
    if module.get_function("__truncsfbf2").is_none() {
        let f32t = ctx.f32_type();
        module.add_function("__truncsfbf2", f32t.fn_type(&[f32t.into()], false), None);
    }
    let engine = module
        .create_jit_execution_engine(OptimizationLevel::Default)
        .map_err(|e| llvm("jit", e.to_string()))?;
    let table = libm();
    for func in module.get_functions() {
        let name = func.get_name().to_string_lossy().to_string();
        if func.count_basic_blocks() > 0 || name.starts_with("llvm.") {
            continue;
        }
        let (_, addr) = table
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| llvm("jit", format!("unresolved symbol `{name}`")))?;
        engine.add_global_mapping(&func, *addr);
    }
    let mut entries = Vec::with_capacity(kernels.len());
    for (name, _) in kernels {
        let addr = engine
            .get_function_address(name)
            .map_err(|e| llvm(name, e.to_string()))?;
        // SAFETY: every kernel has the entry `void name(void **buffers)`.
        entries.push(unsafe { std::mem::transmute::<usize, KernelFn>(addr) });
    }
    Ok(f(&entries))
}
