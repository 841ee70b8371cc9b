//! From lowered kernels to machine code: linking the kernels' LLVM IR into one module,
//! optimising it for the host CPU (LLVM's `default<O2>` pipeline: loop and SLP vectorisation),
//! and emitting executables: one object holding the kernels, the serialised program and a
//! `main` that calls the runtime's `memc_rt_main`, linked by the system C compiler driver
//! against `libmemc_runtime.a` (no LLVM or MLIR in the result).

use std::path::{Path, PathBuf};
use std::process::Command;

use inkwell::context::Context;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine,
};
use inkwell::{AddressSpace, OptimizationLevel};

use crate::kernel::KernelError;
use memc_runtime::program::Program;

/// The libraries a Rust static library needs on Linux (`rustc --print native-static-libs`).
const NATIVE_LIBS: &[&str] = &[
    "-ldl",
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-lc",
];

/// The runtime's static library file name.
pub const RUNTIME_LIB: &str = "libmemc_runtime.a";

pub(crate) fn llvm(kernel: &str, msg: impl ToString) -> KernelError {
    KernelError::Llvm {
        kernel: kernel.to_string(),
        msg: msg.to_string(),
    }
}

/// A target machine for this host's CPU (its name and features: AVX2, AVX-512, ...).
pub(crate) fn host_machine() -> Result<TargetMachine, KernelError> {
    Target::initialize_native(&InitializationConfig::default()).map_err(|e| llvm("host", e))?;
    target_machine()
}

/// [`host_machine`] once LLVM's native target is initialised (the shards' threads call this:
/// the initialisation itself is not thread-safe).
pub(crate) fn target_machine() -> Result<TargetMachine, KernelError> {
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(|e| llvm("host", e))?;
    target
        .create_target_machine(
            &triple,
            &TargetMachine::get_host_cpu_name().to_string(),
            &TargetMachine::get_host_cpu_features().to_string(),
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| llvm("host", format!("no target machine for {triple}")))
}

/// Links the LLVM IR of `kernels` (name, IR) into one module of `ctx`.
pub(crate) fn link_kernels<'c>(
    ctx: &'c Context,
    kernels: &[(String, String)],
) -> Result<Module<'c>, KernelError> {
    let module = ctx.create_module("memc.kernels");
    for (name, ir) in kernels {
        let m = ctx
            .create_module_from_ir(MemoryBuffer::create_from_memory_range_copy(
                ir.as_bytes(),
                name,
            ))
            .map_err(|e| llvm(name, e))?;
        module.link_in_module(m).map_err(|e| llvm(name, e))?;
    }
    Ok(module)
}

/// The LLVM pass pipeline kernels are optimised with.
pub(crate) const OPT_PIPELINE: &str = "default<O2>";

/// Runs LLVM's `default<O2>` pipeline on `module` for `machine`.
pub(crate) fn optimize(module: &Module, machine: &TargetMachine) -> Result<(), KernelError> {
    module.set_triple(&machine.get_triple());
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    module
        .run_passes(OPT_PIPELINE, machine, PassBuilderOptions::create())
        .map_err(|e| llvm("optimize", e))
}

/// Finds `libmemc_runtime.a`: `$MEMC_RUNTIME_LIB`, else beside the running `memc` (a cargo
/// build puts both in `target/<profile>/`), else one directory up (test binaries run from
/// `target/<profile>/deps/`).
pub fn find_runtime_lib() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("MEMC_RUNTIME_LIB") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("MEMC_RUNTIME_LIB={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join(RUNTIME_LIB);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(format!(
        "the memc runtime library {RUNTIME_LIB} is not beside {} (build it with `cargo build -p memc-runtime`, or set MEMC_RUNTIME_LIB)",
        exe.display()
    ))
}

/// What [`emit_executable`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Emitted {
    /// Size of the executable in bytes.
    pub exe_bytes: u64,
    /// Size of the embedded program (description and constants).
    pub program_bytes: u64,
    /// How many of the kernels the kernel cache already held ([`crate::objects`]).
    pub cached_kernels: usize,
    /// Generated kernels linked in.
    pub kernels: usize,
}

/// Builds the object of `program` and its generated `kernels` (name, LLVM IR; a lowered
/// program's `HostProgram::lowered`): the kernels optimised for this CPU, the serialised
/// program, the kernel table and `main`; links it with `runtime_lib` into the executable
/// `out` (written beside it and renamed into place). Needs a C compiler driver (`cc`, or
/// `$CC`).
pub fn emit_executable(
    program: &Program,
    kernels: &[(String, String)],
    out: &Path,
    runtime_lib: &Path,
) -> Result<Emitted, KernelError> {
    let machine = host_machine()?;
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    // The kernels are optimised and compiled on every core, each into its own object (or
    // found in the kernel cache); the main module declares them.
    let names = &program.kernels;
    if let Some(name) = names.iter().find(|n| !kernels.iter().any(|(k, _)| k == *n)) {
        return Err(llvm(name, "the kernel's entry is missing"));
    }
    // Dropping `objects` removes its temporary objects, on every path out.
    let objects = crate::objects::compile_objects(kernels, &tmp)?;
    let ctx = Context::create();
    let module = ctx.create_module("memc.main");
    let program = program.to_bytes();
    let ptr = ctx.ptr_type(AddressSpace::default());
    let i64t = ctx.i64_type();
    let i32t = ctx.i32_type();

    let bytes = ctx.const_string(&program, false);
    let g_program = module.add_global(bytes.get_type(), None, "memc_program");
    g_program.set_initializer(&bytes);
    g_program.set_constant(true);
    g_program.set_linkage(Linkage::Private);
    g_program.set_alignment(16);

    let mut entries = Vec::with_capacity(names.len());
    for name in names {
        // Every entry is `void(ptr)`: the runtime's `KernelFn`.
        let f = module.add_function(
            name,
            ctx.void_type().fn_type(&[ptr.into()], false),
            Some(Linkage::External),
        );
        entries.push(f.as_global_value().as_pointer_value());
    }
    let table = ptr.const_array(&entries);
    let g_table = module.add_global(table.get_type(), None, "memc_kernels");
    g_table.set_initializer(&table);
    g_table.set_constant(true);
    g_table.set_linkage(Linkage::Private);

    let rt_main = module.add_function(
        "memc_rt_main",
        i32t.fn_type(
            &[
                i32t.into(),
                ptr.into(),
                ptr.into(),
                i64t.into(),
                ptr.into(),
                i64t.into(),
            ],
            false,
        ),
        Some(Linkage::External),
    );
    let main = module.add_function(
        "main",
        i32t.fn_type(&[i32t.into(), ptr.into()], false),
        None,
    );
    let b = ctx.create_builder();
    b.position_at_end(ctx.append_basic_block(main, "entry"));
    let argc = main.get_nth_param(0).expect("argc");
    let argv = main.get_nth_param(1).expect("argv");
    let ret = b
        .build_call(
            rt_main,
            &[
                argc.into(),
                argv.into(),
                g_program.as_pointer_value().into(),
                i64t.const_int(program.len() as u64, false).into(),
                g_table.as_pointer_value().into(),
                i64t.const_int(entries.len() as u64, false).into(),
            ],
            "ret",
        )
        .map_err(|e| llvm("main", e))?
        .try_as_basic_value();
    let inkwell::values::ValueKind::Basic(ret) = ret else {
        return Err(llvm("main", "memc_rt_main returns nothing"));
    };
    b.build_return(Some(&ret)).map_err(|e| llvm("main", e))?;
    module.verify().map_err(|e| llvm("main", e))?;
    optimize(&module, &machine)?;

    let obj = tmp.with_extension("o");
    let written = machine
        .write_to_memory_buffer(&module, FileType::Object)
        .map_err(|e| llvm("object", e))?;
    std::fs::write(&obj, written.as_slice()).map_err(|e| {
        let _ = std::fs::remove_file(&obj);
        KernelError::Link(format!("cannot write {}: {e}", obj.display()))
    })?;
    // The executable goes through the runtime's one output writer: linked into a temporary
    // file beside `out` (or a link's target), then renamed into place.
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let linked = memc_runtime::weights::write_atomically_with(out, |tmp| {
        let output = Command::new(&cc)
            .arg("-o")
            .arg(tmp)
            .arg(&obj)
            .args(&objects.paths)
            .arg(runtime_lib)
            .args(["-Wl,--gc-sections", "-Wl,--strip-debug"])
            .args(NATIVE_LIBS)
            .output()
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot run the C compiler driver `{cc}` to link the executable: {e} (install gcc or clang, or set CC)"
                ))
            })?;
        if output.status.success() {
            return Ok(());
        }
        // The line that says why: a full disk first (the driver's own summary, `collect2:
        // error: ld returned 1 exit status`, would hide it), then the first error.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = |pat: &[&str]| stderr.lines().find(|l| pat.iter().any(|p| l.contains(p)));
        let why = line(&["No space left", "Disk quota"])
            .or_else(|| line(&["final link failed", "cannot open output file"]))
            .or_else(|| line(&["error", "undefined"]))
            .unwrap_or(stderr.lines().next().unwrap_or("no output"));
        Err(std::io::Error::other(format!(
            "`{cc}` failed to link the executable: {why}"
        )))
    });
    let _ = std::fs::remove_file(&obj);
    let cached_kernels = objects.cached;
    drop(objects);
    linked.map_err(|e| KernelError::Link(e.to_string()))?;
    let exe_bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(Emitted {
        exe_bytes,
        program_bytes: program.len() as u64,
        kernels: entries.len(),
        cached_kernels,
    })
}
