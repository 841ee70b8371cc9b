//! Running host kernels in-process through LLVM's JIT: for checking kernels against the
//! reference interpreter without building an executable.

use inkwell::context::Context;
use inkwell::execution_engine::JitFunction;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::targets::{InitializationConfig, Target};
use inkwell::OptimizationLevel;

use crate::kernel::KernelError;

type Entry = unsafe extern "C" fn(*const *mut u8);

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

/// The C math functions lowered kernels may call (an emitted executable links libm).
fn libm() -> [(&'static str, usize); 16] {
    [
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

/// Links the LLVM IR of `kernels` (name, IR) into one module, JIT-compiles it, and gives `f`
/// a way to call any kernel. Fails if a kernel needs a symbol other than libm's.
pub fn with_host_jit<R>(
    kernels: &[(String, String)],
    f: impl FnOnce(&Call) -> R,
) -> Result<R, KernelError> {
    let llvm = |kernel: &str, msg: String| KernelError::Llvm {
        kernel: kernel.to_string(),
        msg,
    };
    Target::initialize_native(&InitializationConfig::default()).map_err(|e| llvm("jit", e))?;
    let ctx = Context::create();
    let module = ctx.create_module("memc.kernels");
    for (name, ir) in kernels {
        let m = ctx
            .create_module_from_ir(MemoryBuffer::create_from_memory_range_copy(
                ir.as_bytes(),
                name,
            ))
            .map_err(|e| llvm(name, e.to_string()))?;
        module
            .link_in_module(m)
            .map_err(|e| llvm(name, e.to_string()))?;
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
    let call = |name: &str, bufs: &[*mut u8]| {
        // SAFETY: every kernel has the entry `void name(void **buffers)`; the caller passes one
        // live buffer of the right size per kernel argument.
        let entry: JitFunction<Entry> =
            unsafe { engine.get_function(name) }.unwrap_or_else(|e| panic!("kernel `{name}`: {e}"));
        unsafe { entry.call(bufs.as_ptr()) };
    };
    Ok(f(&call))
}
