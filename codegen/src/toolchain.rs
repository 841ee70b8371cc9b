//! A smoke check of the MLIR 19 and LLVM 19 toolchain that every later kernel depends on.

use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use inkwell::OptimizationLevel;
use melior::ir::Module;
use melior::pass::{self, PassManager};

/// What went wrong while exercising the toolchain.
#[derive(Debug, thiserror::Error)]
pub enum ToolchainError {
    /// MLIR rejected a module or a pass failed.
    #[error("MLIR: {0}")]
    Mlir(String),
    /// LLVM could not create a target or emit code.
    #[error("LLVM: {0}")]
    Llvm(String),
}

/// Sizes of what the check produced, for a human-readable summary.
#[derive(Debug, Clone)]
pub struct ToolchainReport {
    /// Textual MLIR after lowering to the LLVM dialect.
    pub lowered_mlir: String,
    /// Bytes of the x86-64 object emitted by LLVM.
    pub host_object_bytes: usize,
    /// PTX text emitted by LLVM's NVPTX backend.
    pub ptx: String,
}

const SMOKE_MLIR: &str = r#"
func.func @axpy(%a: f32, %x: memref<?xf32>, %y: memref<?xf32>) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %n = memref.dim %x, %c0 : memref<?xf32>
  scf.parallel (%i) = (%c0) to (%n) step (%c1) {
    %xi = memref.load %x[%i] : memref<?xf32>
    %yi = memref.load %y[%i] : memref<?xf32>
    %p = arith.mulf %a, %xi : f32
    %s = arith.addf %p, %yi : f32
    memref.store %s, %y[%i] : memref<?xf32>
    scf.reduce
  }
  return
}
"#;

const SMOKE_LLVM: &str = r#"
target datalayout = "e-i64:64-i128:128-v16:16-v32:32-n16:32:64"
define void @scale(ptr %p, float %a) {
  %v = load float, ptr %p
  %r = fmul float %v, %a
  store float %r, ptr %p
  ret void
}
"#;

/// Builds, verifies and lowers an MLIR module (scf.parallel → LLVM dialect) with melior, then
/// compiles LLVM IR to an x86-64 object and to PTX (sm_90) with inkwell.
pub fn check() -> Result<ToolchainReport, ToolchainError> {
    let lowered_mlir = lower_smoke_mlir()?;
    let host_object_bytes = emit(
        &TargetMachine::get_default_triple(),
        "x86-64",
        "",
        FileType::Object,
    )?
    .len();
    let ptx_bytes = emit(
        &TargetTriple::create("nvptx64-nvidia-cuda"),
        "sm_90",
        "+ptx80",
        FileType::Assembly,
    )?;
    let ptx = String::from_utf8_lossy(&ptx_bytes).into_owned();
    Ok(ToolchainReport {
        lowered_mlir,
        host_object_bytes,
        ptx,
    })
}

fn lower_smoke_mlir() -> Result<String, ToolchainError> {
    let context = crate::kernel::mlir_context();
    let mut module = Module::parse(&context, SMOKE_MLIR)
        .ok_or_else(|| ToolchainError::Mlir("the smoke module did not parse".into()))?;
    if !module.as_operation().verify() {
        return Err(ToolchainError::Mlir(
            "the smoke module did not verify".into(),
        ));
    }
    let pm = PassManager::new(&context);
    pm.add_pass(pass::transform::create_canonicalizer());
    pm.add_pass(pass::conversion::create_scf_to_control_flow());
    pm.add_pass(pass::conversion::create_to_llvm());
    pm.add_pass(pass::conversion::create_reconcile_unrealized_casts());
    pm.run(&mut module)
        .map_err(|e| ToolchainError::Mlir(format!("lowering failed: {e}")))?;
    Ok(module.as_operation().to_string())
}

fn emit(
    triple: &TargetTriple,
    cpu: &str,
    features: &str,
    file_type: FileType,
) -> Result<Vec<u8>, ToolchainError> {
    Target::initialize_all(&InitializationConfig::default());
    let target = Target::from_triple(triple).map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    let machine = target
        .create_target_machine(
            triple,
            cpu,
            features,
            OptimizationLevel::Default,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| ToolchainError::Llvm(format!("no target machine for {triple}")))?;
    let context = inkwell::context::Context::create();
    let buffer = inkwell::memory_buffer::MemoryBuffer::create_from_memory_range_copy(
        SMOKE_LLVM.as_bytes(),
        "smoke",
    );
    let module = context
        .create_module_from_ir(buffer)
        .map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    module.set_triple(triple);
    let out = machine
        .write_to_memory_buffer(&module, file_type)
        .map_err(|e| ToolchainError::Llvm(e.to_string()))?;
    Ok(out.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    #[test]
    fn toolchain_lowers_mlir_and_emits_host_and_ptx_code() {
        let report = super::check().expect("toolchain");
        assert!(
            report.lowered_mlir.contains("llvm.func @axpy"),
            "{}",
            report.lowered_mlir
        );
        assert!(report.host_object_bytes > 0);
        assert!(report.ptx.contains(".target sm_90"), "{}", report.ptx);
        assert!(
            report.ptx.contains("mul.rn.f32") || report.ptx.contains("mul.f32"),
            "{}",
            report.ptx
        );
    }
}
