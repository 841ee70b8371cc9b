//! Kernels to object files: every kernel its own LLVM module, optimised and compiled on as
//! many threads as the machine has cores (each thread takes the next kernel when done with
//! one, so one large kernel does not hold the others back), and kept in a cache addressed by
//! content, so a kernel compiled once (by any model, any run) is not compiled again.
//!
//! The cache key is a SHA-256 of everything that decides the object: memc's version, LLVM's
//! version, the target machine (triple, CPU name, features), the optimisation levels and the
//! kernel's LLVM IR. Entries are written to a temporary file and renamed, so concurrent
//! compiles share the cache safely. The directory is `$MEMC_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/memc/kernels`, else `$HOME/.cache/memc/kernels`; `MEMC_KERNEL_CACHE=off`
//! disables it. A cache that cannot be written is skipped, never an error.

use std::path::{Path, PathBuf};

use inkwell::context::Context;
use inkwell::targets::{FileType, TargetMachine};
use sha2::{Digest, Sha256};

use crate::kernel::KernelError;
use crate::link::{link_kernels, llvm, optimize, target_machine, OPT_PIPELINE};

/// Turns off LLVM's loop strength reduction for the code generated from now on in this process
/// (LLVM reads the option when it builds each code generation pipeline). On the generated
/// kernels' nested index loops it was over half of x86 code generation's time (the 12-layer
/// d768 Llama's 145 kernels: 2.9 s -> 2.5 s for `memc compile -o`) for no measurable step
/// time (4- and 8-layer Llamas: the same times within noise, identical losses). Executables
/// that also carry PTX compile it before their host objects, with the option untouched.
fn without_loop_strength_reduction() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let args = [c"memc".as_ptr(), c"-disable-lsr".as_ptr()];
        // SAFETY: two valid NUL-terminated strings that outlive the call; LLVM copies what
        // it keeps. Called once per process.
        unsafe {
            llvm_sys::support::LLVMParseCommandLineOptions(
                args.len() as i32,
                args.as_ptr(),
                std::ptr::null(),
            )
        };
    });
}

/// The object files of a program's kernels.
pub struct Objects {
    /// One object per kernel, in the kernels' order (in the cache, or temporary).
    pub paths: Vec<PathBuf>,
    /// The temporary ones among `paths` (removed when the `Objects` is dropped, linked or
    /// not).
    pub temporary: Vec<PathBuf>,
    /// How many kernels the cache already held.
    pub cached: usize,
}

impl Drop for Objects {
    fn drop(&mut self) {
        for p in &self.temporary {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The kernel cache's directory (see the module docs), or `None` when disabled.
pub fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("MEMC_KERNEL_CACHE") {
        Some(v) if v == "off" || v == "0" || v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|d| d.join("memc").join("kernels")),
    }
}

/// Optimises and compiles `kernels` (name, LLVM IR) into one object each: from the cache when
/// it holds the kernel, else compiled (and stored there) or written as `TMP.kN.o`. On an error
/// no temporary object is left behind. The caller has initialised LLVM's native target
/// ([`crate::link::host_machine`]).
pub fn compile_objects(kernels: &[(String, String)], tmp: &Path) -> Result<Objects, KernelError> {
    without_loop_strength_reduction();
    let cache = cache_dir().filter(|d| std::fs::create_dir_all(d).is_ok());
    let machine_id = {
        let m = target_machine()?;
        let (major, minor, patch) = inkwell::support::get_llvm_version();
        format!(
            "memc {} llvm {major}.{minor}.{patch} {} {} {} {OPT_PIPELINE} codegen-O3 no-lsr",
            env!("CARGO_PKG_VERSION"),
            m.get_triple(),
            m.get_cpu(),
            m.get_feature_string().to_string_lossy(),
        )
    };
    // Each kernel: (object, temporary, from the cache).
    let compile_one = |machine: &mut Result<TargetMachine, KernelError>,
                       i: usize|
     -> Result<(PathBuf, bool, bool), KernelError> {
        let machine = machine.as_ref().map_err(|e| llvm("host", e.to_string()))?;
        let kernel = &kernels[i];
        let key = cache.as_ref().map(|dir| {
            let mut h = Sha256::new();
            h.update(machine_id.as_bytes());
            h.update([0]);
            h.update(kernel.1.as_bytes());
            let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            dir.join(format!("{hex}.o"))
        });
        if let Some(path) = key.as_ref().filter(|p| p.is_file()) {
            return Ok((path.clone(), false, true));
        }
        let ctx = Context::create();
        let module = link_kernels(&ctx, std::slice::from_ref(kernel))?;
        optimize(&module, machine)?;
        let object = machine
            .write_to_memory_buffer(&module, FileType::Object)
            .map_err(|e| llvm(&kernel.0, e))?;
        let bytes = object.as_slice();
        // Into the cache (temporary file, then renamed), else a temporary object.
        if let Some(path) = &key {
            let mut part = path.as_os_str().to_owned();
            part.push(format!(".tmp{}.{i}", std::process::id()));
            let part = PathBuf::from(part);
            if std::fs::write(&part, bytes)
                .and_then(|_| std::fs::rename(&part, path))
                .is_ok()
            {
                return Ok((path.clone(), false, false));
            }
            let _ = std::fs::remove_file(&part);
        }
        let obj = tmp.with_extension(format!("k{i}.o"));
        std::fs::write(&obj, bytes)
            .map(|_| (obj.clone(), true, false))
            .map_err(|e| llvm(&kernel.0, format!("cannot write {}: {e}", obj.display())))
    };
    let done = crate::cores::for_each_index(
        kernels.len(),
        usize::MAX,
        target_machine,
        compile_one,
        || Err(llvm("object", "a compiler thread panicked")),
    );
    let mut slots: Vec<Option<PathBuf>> = vec![None; kernels.len()];
    let mut objects = Objects {
        paths: vec![],
        temporary: vec![],
        cached: 0,
    };
    let mut first_error: Option<(usize, KernelError)> = None;
    for (i, r) in done.into_iter().enumerate() {
        match r {
            Ok((path, temporary, hit)) => {
                if temporary {
                    objects.temporary.push(path.clone());
                }
                objects.cached += hit as usize;
                slots[i] = Some(path);
            }
            Err(e) => {
                if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                    first_error = Some((i, e));
                }
            }
        }
    }
    if let Some((_, e)) = first_error {
        return Err(e);
    }
    objects.paths = slots.into_iter().flatten().collect();
    if objects.paths.len() != kernels.len() {
        return Err(llvm("object", "a kernel was not compiled (a memc bug)"));
    }
    Ok(objects)
}
