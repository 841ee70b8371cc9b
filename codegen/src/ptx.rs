//! Device kernels: the same kernel modules as the host's, mapped to GPU blocks and threads and
//! lowered to PTX.
//!
//! 1. [`gpu_form`] maps each top-level `scf.parallel` of a kernel: its innermost dim is split
//!    into blocks of [`block_size`] threads (`block_x` × `thread_x`, with a bounds guard), the
//!    two dims before it go to `block_y` and `block_z` (when they fit the grid's limits), the
//!    rest stay sequential inside the kernel. memc writes the `#gpu.loop_dim_map` attributes
//!    itself because `gpu-map-parallel-loops` would put the innermost dim on `z` (at most 64
//!    threads). Sequential top-level code (the accumulating loops of scatters, rank-0 kernels)
//!    runs in a one-thread launch.
//! 2. MLIR's passes do the rest ([`GPU_LOWERING`]): `convert-parallel-loops-to-gpu`,
//!    `gpu-launch-sink-index-computations`, `gpu-kernel-outlining`, and in each `gpu.module`
//!    `convert-gpu-to-nvvm` (bare pointers; math functions become libdevice calls such as
//!    `__nv_expf`). The host side that remains is only `gpu.launch_func` ops: [`lower_gpu`]
//!    reads their grid, block and arguments, and translates each `gpu.module` to LLVM IR.
//! 3. [`ptx_module`] links every device function of a program and libdevice into one LLVM
//!    module, optimises it (`default<O2>`, with NVVMReflect) and emits PTX for `sm_XX` with
//!    inkwell's NVPTX target: one module per program, loaded once by the runtime.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use inkwell::context::Context as LlvmContext;
use inkwell::memory_buffer::MemoryBuffer;
use inkwell::module::{Linkage, Module as LlvmModule};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetTriple,
};
use inkwell::OptimizationLevel;
use melior::ir::Module;
use melior::pass::PassManager;
use melior::utility::parse_pass_pipeline;
use melior::Context;
use memc_runtime::program::Launch;

use crate::kernel::KernelError;

/// Threads per block along x for a dim of `extent` elements: 256, or the next power of two
/// (at least 32, one warp) for smaller dims.
pub fn block_size(extent: usize) -> usize {
    extent.next_power_of_two().clamp(32, 256)
}

/// The largest grid extent along y and z.
const GRID_YZ: usize = 65535;

/// The MLIR pipeline from mapped `scf.parallel` loops to `gpu.launch_func` + NVVM.
pub const GPU_LOWERING: &str = "builtin.module(func.func(convert-parallel-loops-to-gpu),\
func.func(gpu-launch-sink-index-computations),gpu-kernel-outlining,lower-affine,canonicalize,\
gpu.module(convert-scf-to-cf,arith-expand{include-bf16=true},expand-strided-metadata,lower-affine,\
convert-gpu-to-nvvm{use-bare-ptr-memref-call-conv=1}),reconcile-unrealized-casts)";

fn dim_map(processor: &str) -> String {
    format!("#gpu.loop_dim_map<processor = {processor}, map = (d0) -> (d0), bound = (d0) -> (d0)>")
}

fn braces(line: &str) -> i32 {
    line.chars()
        .map(|c| match c {
            '{' => 1,
            '}' => -1,
            _ => 0,
        })
        .sum()
}

/// The value of `%name = arith.constant N : index` in `lines`.
pub(crate) fn index_constant(lines: &[&str], name: &str) -> Option<usize> {
    let prefix = format!("{name} = arith.constant ");
    lines.iter().find_map(|l| {
        let rest = l.trim().strip_prefix(&prefix)?;
        rest.strip_suffix(" : index")?.trim().parse().ok()
    })
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect()
}

/// The induction variables, lower bounds, upper bounds and steps of an `scf.parallel`.
pub(crate) type ParallelHeader = (Vec<String>, Vec<String>, Vec<String>, Vec<String>);

/// Parses `scf.parallel (IVS) = (LBS) to (UBS) step (STEPS) {`.
pub(crate) fn parallel_header(line: &str) -> Option<ParallelHeader> {
    let rest = line.trim().strip_prefix("scf.parallel (")?;
    let (ivs, rest) = rest.split_once(") = (")?;
    let (lbs, rest) = rest.split_once(") to (")?;
    let (ubs, rest) = rest.split_once(") step (")?;
    let steps = rest.strip_suffix(") {")?;
    Some((list(ivs), list(lbs), list(ubs), list(steps)))
}

/// The top-level statements of a function body: a line and, when it opens a region,
/// everything up to its close; `None` when the regions do not balance.
pub(crate) fn statements<'a, 'b>(body: &'b [&'a str]) -> Option<Vec<&'b [&'a str]>> {
    let mut stmts = vec![];
    let mut i = 0;
    while i < body.len() {
        let mut depth = braces(body[i]);
        let mut j = i + 1;
        while depth > 0 && j < body.len() {
            depth += braces(body[j]);
            j += 1;
        }
        if depth != 0 {
            return None;
        }
        stmts.push(&body[i..j]);
        i = j;
    }
    Some(stmts)
}

/// The kernel `mlir` (one `func.func @name`, as [`crate::kernel::elementwise_mlir`] and
/// [`crate::ops::op_mlir`] write it) with its loops mapped to GPU blocks and threads (see the
/// module docs).
pub fn gpu_form(mlir: &str, name: &str) -> Result<String, KernelError> {
    let err = |msg: String| KernelError::Unsupported {
        kernel: name.to_string(),
        msg: format!("GPU mapping: {msg}"),
    };
    let lines: Vec<&str> = mlir.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("func.func @"))
        .ok_or_else(|| err("no func.func".into()))?;
    let end = lines
        .iter()
        .rposition(|l| l.trim() == "return")
        .ok_or_else(|| err("no return".into()))?;
    let body = &lines[start + 1..end];
    let mut out = String::new();
    for l in &lines[..=start] {
        let _ = writeln!(out, "{l}");
    }
    out += "  %memc_c0 = arith.constant 0 : index\n  %memc_c1 = arith.constant 1 : index\n";
    let stmts = statements(body).ok_or_else(|| err("unbalanced regions".into()))?;
    let mut sequential: Vec<&[&str]> = vec![];
    let flush = |out: &mut String, seq: &mut Vec<&[&str]>| {
        if seq.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "  scf.parallel (%memc_one) = (%memc_c0) to (%memc_c1) step (%memc_c1) {{"
        );
        for s in seq.drain(..) {
            for l in s {
                let _ = writeln!(out, "  {l}");
            }
        }
        let _ = writeln!(
            out,
            "    scf.reduce\n  }} {{mapping = [{}]}}",
            dim_map("block_x")
        );
    };
    for (n, stmt) in stmts.iter().enumerate() {
        let first = stmt[0];
        if stmt.len() == 1 && first.contains(" = arith.constant ") {
            let _ = writeln!(out, "{first}");
            continue;
        }
        let Some((ivs, lbs, ubs, steps)) = parallel_header(first) else {
            sequential.push(stmt);
            continue;
        };
        flush(&mut out, &mut sequential);
        if lbs.iter().any(|l| l != "%c0") || steps.iter().any(|s| s != "%c1") {
            return Err(err(
                "a parallel loop that does not start at 0 with step 1".into()
            ));
        }
        let last = stmt[stmt.len() - 1];
        let reduce = stmt[stmt.len() - 2];
        if last.trim() != "}" || reduce.trim() != "scf.reduce" {
            return Err(err("a parallel loop with a reduction".into()));
        }
        let extents: Vec<usize> = ubs
            .iter()
            .map(|u| index_constant(&lines, u))
            .collect::<Option<_>>()
            .ok_or_else(|| err("a parallel loop with non-constant bounds".into()))?;
        let r = ivs.len();
        let n_last = extents[r - 1];
        let t = block_size(n_last);
        let blocks = n_last.div_ceil(t);
        let _ = writeln!(
            out,
            "  %memc_gn{n} = arith.constant {blocks} : index\n  %memc_gt{n} = arith.constant {t} : index"
        );
        let mut outer_ivs: Vec<String> = ivs[..r - 1].to_vec();
        outer_ivs.push(format!("%memc_gb{n}"));
        let mut outer_ubs: Vec<String> = ubs[..r - 1].to_vec();
        outer_ubs.push(format!("%memc_gn{n}"));
        let mut mapping: Vec<String> = (0..r - 1)
            .map(|d| {
                let p = match r - 1 - d {
                    1 if extents[d] <= GRID_YZ => "block_y",
                    2 if extents[d] <= GRID_YZ => "block_z",
                    _ => "sequential",
                };
                dim_map(p)
            })
            .collect();
        mapping.push(dim_map("block_x"));
        let zeros = vec!["%memc_c0"; r].join(", ");
        let ones = vec!["%memc_c1"; r].join(", ");
        let _ = writeln!(
            out,
            "  scf.parallel ({}) = ({zeros}) to ({}) step ({ones}) {{",
            outer_ivs.join(", "),
            outer_ubs.join(", ")
        );
        let _ = writeln!(
            out,
            "  scf.parallel (%memc_gt{n}i) = (%memc_c0) to (%memc_gt{n}) step (%memc_c1) {{"
        );
        let _ = writeln!(
            out,
            "    %memc_gs{n} = arith.muli %memc_gb{n}, %memc_gt{n} : index\n    {} = arith.addi %memc_gs{n}, %memc_gt{n}i : index\n    %memc_gin{n} = arith.cmpi ult, {}, {} : index\n    scf.if %memc_gin{n} {{",
            ivs[r - 1],
            ivs[r - 1],
            ubs[r - 1]
        );
        for l in &stmt[1..stmt.len() - 2] {
            let _ = writeln!(out, "    {l}");
        }
        let _ = writeln!(
            out,
            "    }}\n    scf.reduce\n  }} {{mapping = [{}]}}\n    scf.reduce\n  }} {{mapping = [{}]}}",
            dim_map("thread_x"),
            mapping.join(", ")
        );
    }
    flush(&mut out, &mut sequential);
    for l in &lines[end..] {
        let _ = writeln!(out, "{l}");
    }
    Ok(out)
}

/// A kernel lowered for the GPU: its launches and the LLVM IR (NVVM) of its device functions.
#[derive(Debug, Clone)]
pub struct DeviceKernel {
    /// The launches, in order.
    pub launches: Vec<Launch>,
    /// LLVM IR of each launched function's module.
    pub llvm_ir: Vec<String>,
}

/// Maps, lowers and translates kernel `name` (MLIR as the host path gets it) for the GPU.
pub fn lower_gpu(context: &Context, mlir: &str, name: &str) -> Result<DeviceKernel, KernelError> {
    let err = |msg: String| KernelError::Mlir {
        kernel: name.to_string(),
        msg,
    };
    let mapped = gpu_form(mlir, name)?;
    let mut module = Module::parse(context, &mapped)
        .ok_or_else(|| err(format!("the mapped module does not parse:\n{mapped}")))?;
    if !module.as_operation().verify() {
        return Err(err(format!("the mapped module does not verify:\n{mapped}")));
    }
    let pm = PassManager::new(context);
    parse_pass_pipeline(pm.as_operation_pass_manager(), GPU_LOWERING)
        .map_err(|e| err(e.to_string()))?;
    pm.run(&mut module)
        .map_err(|e| err(format!("GPU lowering failed: {e}")))?;
    let text = module.as_operation().to_string();
    if let Some(d) = std::env::var_os("MEMC_DUMP_DEVICE_IR") {
        let _ = std::fs::write(Path::new(&d).join(format!("{name}.mapped.mlir")), &mapped);
        let _ = std::fs::write(Path::new(&d).join(format!("{name}.gpu.mlir")), &text);
    }
    let lines: Vec<&str> = text.lines().collect();
    let host_end = lines
        .iter()
        .position(|l| l.trim_start().starts_with("gpu.module @"))
        .unwrap_or(lines.len());
    let host = &lines[..host_end];
    let mut launches = vec![];
    for l in host {
        let l = l.trim();
        if l.starts_with("func.func")
            || l.starts_with("%")
            || l == "return"
            || l == "}"
            || l.starts_with("module")
        {
            continue;
        }
        let Some(rest) = l.strip_prefix("gpu.launch_func") else {
            return Err(err(format!("host code left after GPU mapping: `{l}`")));
        };
        let parse = || -> Option<Launch> {
            // `@MODULE::@FUNCTION`: every outlined function is renamed after its (unique)
            // module below.
            let (module, rest) = rest.trim().split_once("::@")?;
            let (_, rest) = rest.split_once(" blocks in (")?;
            let function = module.trim_start_matches('@');
            let (grid, rest) = rest.split_once(") threads in (")?;
            let (block, rest) = rest.split_once(")")?;
            let dims = |s: &str| -> Option<[u32; 3]> {
                let v: Vec<u32> = list(s)
                    .iter()
                    .map(|n| index_constant(host, n).map(|x| x as u32))
                    .collect::<Option<_>>()?;
                v.try_into().ok()
            };
            let args = match rest.split_once("args(") {
                Some((_, a)) => a
                    .trim_end_matches(')')
                    .split(", %")
                    .map(|a| {
                        let a = a.trim_start_matches('%');
                        a.strip_prefix("arg")?.split(' ').next()?.parse().ok()
                    })
                    .collect::<Option<Vec<u32>>>()?,
                None => vec![],
            };
            Some(Launch {
                function: function.trim().to_string(),
                grid: dims(grid)?,
                block: dims(block)?,
                args,
            })
        };
        launches.push(parse().ok_or_else(|| err(format!("unexpected launch `{l}`")))?);
    }
    // Each gpu.module, as a builtin module, translated to LLVM IR.
    let mut llvm_ir = vec![];
    let mut i = host_end;
    while i < lines.len() {
        if !lines[i].trim_start().starts_with("gpu.module @") {
            i += 1;
            continue;
        }
        let mut depth = braces(lines[i]);
        let mut j = i + 1;
        while depth > 0 && j < lines.len() {
            depth += braces(lines[j]);
            j += 1;
        }
        let module_name = lines[i]
            .trim_start()
            .trim_start_matches("gpu.module @")
            .trim_end_matches(" {")
            .to_string();
        let mut m = String::from("module {\n");
        for l in &lines[i + 1..j - 1] {
            // The kernel function takes its module's name (outlining reuses one name).
            if let Some(rest) = l.trim_start().strip_prefix("llvm.func @") {
                if l.contains("nvvm.kernel") {
                    let (_, args) = rest.split_once('(').unwrap_or(("", rest));
                    m += &format!("  llvm.func @{module_name}({args}\n");
                    continue;
                }
            }
            m += l;
            m.push('\n');
        }
        m += "}\n";
        let device = Module::parse(context, &m)
            .ok_or_else(|| err(format!("the device module does not parse:\n{m}")))?;
        let llvm = LlvmContext::create();
        // SAFETY: as in the host path: MLIR translates into a context we own and inkwell's
        // module takes ownership of the result.
        let raw = unsafe {
            mlir_sys::mlirTranslateModuleToLLVMIR(
                device.as_operation().to_raw(),
                llvm.raw() as *mut _,
            )
        };
        if raw.is_null() {
            return Err(err(
                "translation of the device module to LLVM IR failed".into()
            ));
        }
        let lm: LlvmModule = unsafe { LlvmModule::new(raw as *mut _) };
        llvm_ir.push(lm.print_to_string().to_string());
        i = j;
    }
    Ok(DeviceKernel { launches, llvm_ir })
}

/// Python's site-packages directories (where PyPI's CUDA packages live).
fn site_packages() -> Vec<PathBuf> {
    let script =
        "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))";
    std::process::Command::new("python3")
        .args(["-c", script])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The first of `$VAR`, `fixed` and `rel` under each site-packages directory that exists.
fn find_tool(var: &str, fixed: &[&str], rel: &[&str], what: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{var}={} is not a file", p.display()))
        };
    }
    let mut candidates: Vec<PathBuf> = fixed.iter().map(PathBuf::from).collect();
    for dir in site_packages() {
        candidates.extend(rel.iter().map(|r| dir.join(r)));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        format!("{what} was not found (install PyPI's nvidia-cuda-nvcc, e.g. with scripts/setup.sh, or a CUDA toolkit, or set {var})")
    })
}

/// Where libdevice is: `$MEMC_LIBDEVICE`, a CUDA toolkit, or PyPI's `nvidia-cuda-nvcc`.
pub fn find_libdevice() -> Result<PathBuf, String> {
    find_tool(
        "MEMC_LIBDEVICE",
        &["/usr/local/cuda/nvvm/libdevice/libdevice.10.bc"],
        &[
            "nvidia/cu13/nvvm/libdevice/libdevice.10.bc",
            "nvidia/cuda_nvcc/nvvm/libdevice/libdevice.10.bc",
        ],
        "libdevice.10.bc",
    )
}

/// Where ptxas is: `$MEMC_PTXAS`, a CUDA toolkit, or PyPI's `nvidia-cuda-nvcc`.
pub fn find_ptxas() -> Result<PathBuf, String> {
    find_tool(
        "MEMC_PTXAS",
        &["/usr/local/cuda/bin/ptxas"],
        &["nvidia/cu13/bin/ptxas", "nvidia/cuda_nvcc/bin/ptxas"],
        "ptxas",
    )
}

/// Assembles `ptx` with ptxas for `arch` (`sm_90a`) and returns its verbose report (registers,
/// spills per kernel), or its errors.
pub fn ptxas(ptx: &str, arch: &str) -> Result<String, String> {
    let tool = find_ptxas()?;
    let dir = std::env::temp_dir().join(format!("memc-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let src = dir.join(format!("{n}.ptx"));
    std::fs::write(&src, ptx).map_err(|e| e.to_string())?;
    let out = std::process::Command::new(&tool)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(src.with_extension("cubin"))
        .output()
        .map_err(|e| format!("{}: {e}", tool.display()))?;
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(src.with_extension("cubin"));
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// Links the device functions (`llvm_ir`, from [`lower_gpu`]) and `libdevice` into one module,
/// optimises it and emits PTX for `sm_{sm}` (PTX ISA 8.0).
pub fn ptx_module(llvm_ir: &[String], sm: u32, libdevice: &Path) -> Result<String, KernelError> {
    let llvm = |msg: String| KernelError::Llvm {
        kernel: "ptx".into(),
        msg,
    };
    Target::initialize_nvptx(&InitializationConfig::default());
    let triple = TargetTriple::create("nvptx64-nvidia-cuda");
    let target = Target::from_triple(&triple).map_err(|e| llvm(e.to_string()))?;
    let machine = target
        .create_target_machine(
            &triple,
            &format!("sm_{sm}"),
            "+ptx80",
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| llvm(format!("no NVPTX target machine for sm_{sm}")))?;
    let ctx = LlvmContext::create();
    let module = ctx.create_module("memc.device");
    module.set_triple(&triple);
    module.set_data_layout(&machine.get_target_data().get_data_layout());
    let mut kernels = vec![];
    for (n, ir) in llvm_ir.iter().enumerate() {
        if let Some(d) = std::env::var_os("MEMC_DUMP_DEVICE_IR") {
            let _ = std::fs::write(Path::new(&d).join(format!("device{n}.ll")), ir);
        }
        let m = ctx
            .create_module_from_ir(MemoryBuffer::create_from_memory_range_copy(
                ir.as_bytes(),
                &format!("device{n}"),
            ))
            .map_err(|e| llvm(e.to_string()))?;
        m.set_triple(&triple);
        m.set_data_layout(&machine.get_target_data().get_data_layout());
        for f in m.get_functions() {
            if f.count_basic_blocks() > 0 {
                kernels.push(f.get_name().to_string_lossy().to_string());
            }
        }
        module.link_in_module(m).map_err(|e| llvm(e.to_string()))?;
    }
    if module
        .get_functions()
        .any(|f| f.count_basic_blocks() == 0 && f.get_name().to_string_lossy().starts_with("__nv_"))
    {
        let lib = LlvmModule::parse_bitcode_from_path(libdevice, &ctx)
            .map_err(|e| llvm(format!("{}: {e}", libdevice.display())))?;
        lib.set_triple(&triple);
        lib.set_data_layout(&machine.get_target_data().get_data_layout());
        module
            .link_in_module(lib)
            .map_err(|e| llvm(e.to_string()))?;
    }
    // Only the kernels are entry points: everything else may be inlined and dropped.
    for f in module.get_functions() {
        let name = f.get_name().to_string_lossy().to_string();
        if f.count_basic_blocks() > 0 && !kernels.contains(&name) {
            f.set_linkage(Linkage::Internal);
        }
    }
    module
        .run_passes("default<O2>", &machine, PassBuilderOptions::create())
        .map_err(|e| llvm(e.to_string()))?;
    let ptx = machine
        .write_to_memory_buffer(&module, FileType::Assembly)
        .map_err(|e| llvm(e.to_string()))?;
    Ok(String::from_utf8_lossy(ptx.as_slice()).into_owned())
}
