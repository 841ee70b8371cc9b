//! Weights and checkpoints as safetensors files: loading into a program's arena (every tensor
//! checked against the program by name, dtype and shape) and saving atomically (a temporary
//! file renamed into place, so an interrupted save never leaves a truncated checkpoint).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::program::{Dtype, Program, Role, Slot};
use crate::{Backend, RunError};

/// The metadata key holding the number of optimizer steps a checkpoint has taken.
pub const STEP_KEY: &str = "memc.step";

fn st_dtype(d: Dtype) -> StDtype {
    match d {
        Dtype::F32 => StDtype::F32,
        Dtype::F64 => StDtype::F64,
        Dtype::F16 => StDtype::F16,
        Dtype::Bf16 => StDtype::BF16,
        Dtype::I64 => StDtype::I64,
        Dtype::I32 => StDtype::I32,
        Dtype::I16 => StDtype::I16,
        Dtype::Bool => StDtype::BOOL,
    }
}

/// What [`load`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Tensors loaded.
    pub tensors: usize,
    /// Whether the file held the optimizer state.
    pub optimizer_state: bool,
    /// Steps taken, from a checkpoint's metadata.
    pub step: Option<u64>,
}

/// Loads `path` into the arena: every weight (trained or frozen) of the program must be in
/// the file with its dtype and shape; optimizer state is loaded when present (all of it or
/// none); a tensor the program does not have is an error (the file belongs to another model).
pub fn load(path: &Path, program: &Program, arena: &mut dyn Backend) -> Result<Loaded, RunError> {
    let file = path.display().to_string();
    let bad = |msg: String| RunError::Weights {
        path: file.clone(),
        msg,
    };
    // The file is mapped, not read: each tensor is copied into the arena, then its pages are
    // let go, so loading holds about one tensor beyond the arena (the plan's bytes).
    let io = |source| RunError::Io {
        path: file.clone(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the mapping is read-only and private; memc replaces weight and checkpoint files
    // by renaming a new file into place, never by writing into the file a reader maps.
    let bytes = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    let mut loaded = Loaded::default();
    let state: Vec<_> = program
        .params
        .iter()
        .filter(|p| p.role == Role::OptimizerState)
        .collect();
    let has_state = state.iter().any(|p| st.tensor(&p.slot.name).is_ok());
    for p in &program.params {
        if p.role == Role::OptimizerState && !has_state {
            continue;
        }
        let t = st.tensor(&p.slot.name).map_err(|_| {
            bad(format!(
                "tensor `{}` ({}) is missing: the file was not written for this program",
                p.slot.name,
                p.slot.type_string()
            ))
        })?;
        if t.dtype() != st_dtype(p.slot.dtype) || t.shape() != p.slot.shape.as_slice() {
            return Err(bad(format!(
                "tensor `{}` is {:?}{:?}, the program expects {}",
                p.slot.name,
                t.dtype(),
                t.shape(),
                p.slot.type_string()
            )));
        }
        arena.set(&p.slot, t.data())?;
        release(&bytes, t.data());
        loaded.tensors += 1;
    }
    loaded.optimizer_state = has_state;
    for name in st.names() {
        if !program.params.iter().any(|p| p.slot.name == name) {
            return Err(bad(format!(
                "tensor `{name}` is not a parameter of this program (the file belongs to another model)"
            )));
        }
    }
    let (_, meta) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
    if let Some(s) = meta.metadata().as_ref().and_then(|m| m.get(STEP_KEY)) {
        loaded.step = Some(
            s.parse()
                .map_err(|_| bad(format!("metadata {STEP_KEY} = `{s}` is not a step count")))?,
        );
    }
    Ok(loaded)
}

/// Lets the pages of `part` (a slice of the mapping `map`) go from this process's memory; they
/// are read from the file again if touched.
fn release(map: &memmap2::Mmap, part: &[u8]) {
    let offset = part.as_ptr() as usize - map.as_ptr() as usize;
    // SAFETY: `DontNeed` on a private read-only file mapping only drops resident pages, which
    // are read back from the file on the next access; the range lies inside the mapping.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, part.len())
    };
}

/// Writes the parameters of `roles` from the arena to `path` atomically, with `metadata`.
pub fn save(
    path: &Path,
    program: &Program,
    arena: &mut dyn Backend,
    roles: &[Role],
    metadata: HashMap<String, String>,
) -> Result<(), RunError> {
    let mut data = vec![];
    for p in program.params.iter().filter(|p| roles.contains(&p.role)) {
        data.push((p.slot.clone(), arena.get(&p.slot)?));
    }
    let tensors: Vec<(Slot, &[u8])> = data.iter().map(|(s, b)| (s.clone(), &b[..])).collect();
    save_tensors(path, &tensors, metadata)
}

/// Writes tensors (named and typed by their slots) to `path` atomically, with `metadata`.
pub fn save_tensors(
    path: &Path,
    tensors: &[(Slot, &[u8])],
    metadata: HashMap<String, String>,
) -> Result<(), RunError> {
    let bad = |e: safetensors::SafeTensorError| RunError::Weights {
        path: path.display().to_string(),
        msg: e.to_string(),
    };
    let views = tensors
        .iter()
        .map(|(s, bytes)| {
            TensorView::new(st_dtype(s.dtype), s.shape.clone(), bytes).map(|v| (s.name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(bad)?;
    // Streamed into the file tensor by tensor: no second copy of every weight in memory.
    let mut failed = None;
    let written = write_atomically_with(path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(e) => e,
            e => {
                let msg = e.to_string();
                failed = Some(e);
                std::io::Error::other(msg)
            }
        })
    });
    match (written, failed) {
        (Err(_), Some(e)) => Err(bad(e)),
        (r, _) => r,
    }
}

/// Writes `bytes` to a temporary file beside `path`, syncs it and renames it into place.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RunError> {
    write_atomically_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// Lets `write` create and fill a temporary file beside `path` (`PATH.tmpPID`), syncs it and
/// renames it into place; on any error the temporary file is removed and `path` is untouched.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<(), RunError> {
    let io = |source| RunError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let result = write(&tmp)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}
