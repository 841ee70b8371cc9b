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

/// The one output writer: lets `write` fill the file `path` names.
///
/// - A regular file (or a new one) is written to a temporary file beside it
///   (`.NAME.tmpPID.N`, unique to this process and call), synced and renamed into place; on
///   any error the temporary file is removed and `path` is untouched. Temporary files of this
///   naming left by a writer whose process is gone are removed first.
/// - A symbolic link is followed: its target is what gets replaced (the link stays).
/// - A FIFO, character device or socket (`/dev/stdout`, a pipe) is written directly.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<(), RunError> {
    let io = |source| RunError::Io {
        path: path.display().to_string(),
        source,
    };
    // What `path` finally is (links followed): a pipe or device is written in place.
    if let Ok(m) = std::fs::metadata(path) {
        if !m.is_file() && !m.is_dir() {
            return write(path).map_err(io);
        }
    }
    let target = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => resolve_link(path).map_err(io)?,
        _ => path.to_path_buf(),
    };
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    remove_stale_temporaries(&dir, &name);
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp{}.{n}", std::process::id()));
    let result = write(&tmp)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, &target));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Where a symbolic link finally points (its target need not exist yet).
fn resolve_link(path: &Path) -> std::io::Result<std::path::PathBuf> {
    let mut at = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let next = std::fs::read_link(&at)?;
                at = match at.parent() {
                    Some(d) if next.is_relative() => d.join(next),
                    _ => next,
                };
            }
            _ => return Ok(at),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

/// Removes `.NAME.tmpPID.N` files in `dir` whose writing process no longer exists (only where
/// `/proc` tells; elsewhere nothing is removed).
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp");
    let (Ok(entries), true) = (std::fs::read_dir(dir), Path::new("/proc/self").exists()) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('.').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The weights of a saved model directory (Hugging Face's file name).
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state and f32 master weights of a saved model directory.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Weights memc added to the model (reversible layers' adapters, named `memc.*`).
pub const ADAPTERS_FILE: &str = "adapters.safetensors";
/// The step count and data position of a saved model directory; written last, so a directory
/// that has it is complete.
pub const STATE_FILE: &str = "trainer_state.json";
/// The prefix of a master weight's name in [`OPTIMIZER_FILE`].
const MASTER: &str = "master.";

/// Whether weight `name` is one memc added (saved to [`ADAPTERS_FILE`]).
fn added_by_memc(name: &str) -> bool {
    name.starts_with("memc.")
}

/// Refuses the single-file checkpoint form: checkpoints are model directories.
pub fn check_dir_form(dir: &Path, flag: &str) -> Result<(), RunError> {
    if dir.extension().is_some_and(|e| e == "safetensors") || dir.is_file() {
        return Err(RunError::Usage(format!(
            "{flag} {}: checkpoints are model directories now (model.safetensors, optimizer.safetensors, trainer_state.json); pass a directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes a Hugging Face model directory: [`MODEL_FILE`] (the model's weights under their
/// names, in the checkpoint's element types), [`ADAPTERS_FILE`] (weights memc added, when
/// there are any), [`OPTIMIZER_FILE`] (optimizer state, and the f32 master weights of weights
/// stored in a narrower type, so resuming is bitwise), the files the program carries
/// (`config.json`, ...), and last [`STATE_FILE`] (`global_step`, `rows_consumed`). Every
/// file is written to a temporary name and renamed.
pub fn save_dir(
    dir: &Path,
    program: &Program,
    arena: &mut dyn Backend,
    step: u64,
    rows_consumed: u64,
) -> Result<(), RunError> {
    check_dir_form(dir, "--save")?;
    std::fs::create_dir_all(dir).map_err(|source| RunError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    // The state file marks a complete directory: gone until everything else is written, so
    // an interrupted save over an earlier one is never taken for complete.
    match std::fs::remove_file(dir.join(STATE_FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(RunError::Io {
                path: dir.join(STATE_FILE).display().to_string(),
                source: e,
            })
        }
        _ => {}
    }
    let mut model = vec![];
    let mut adapters = vec![];
    let mut optimizer = vec![];
    for p in &program.params {
        let bytes = arena.get(&p.slot)?;
        match p.role {
            Role::OptimizerState => optimizer.push((p.slot.clone(), bytes)),
            Role::Weight if added_by_memc(&p.slot.name) => adapters.push((p.slot.clone(), bytes)),
            Role::Weight => match program.checkpoint.dtypes.get(&p.slot.name) {
                Some(&d) if d != p.slot.dtype => {
                    let narrow =
                        crate::program::encode(d, &crate::program::decode(p.slot.dtype, &bytes));
                    let master = Slot {
                        name: format!("{MASTER}{}", p.slot.name),
                        ..p.slot.clone()
                    };
                    optimizer.push((master, bytes));
                    model.push((
                        Slot {
                            dtype: d,
                            ..p.slot.clone()
                        },
                        narrow,
                    ));
                }
                _ => model.push((p.slot.clone(), bytes)),
            },
        }
    }
    let pt = || HashMap::from([("format".to_string(), "pt".to_string())]);
    let write = |name: &str, tensors: &[(Slot, Vec<u8>)]| {
        let views: Vec<(Slot, &[u8])> = tensors.iter().map(|(s, b)| (s.clone(), &b[..])).collect();
        save_tensors(&dir.join(name), &views, pt())
    };
    write(MODEL_FILE, &model)?;
    // A file this program has nothing for is removed, not left from an earlier save.
    for (name, tensors) in [(ADAPTERS_FILE, &adapters), (OPTIMIZER_FILE, &optimizer)] {
        if tensors.is_empty() {
            match std::fs::remove_file(dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(RunError::Io {
                        path: dir.join(name).display().to_string(),
                        source: e,
                    })
                }
                _ => {}
            }
        } else {
            write(name, tensors)?;
        }
    }
    for (name, text) in &program.checkpoint.files {
        write_atomically(&dir.join(name), text.as_bytes())?;
    }
    let state = serde_json::json!({
        "global_step": step,
        "rows_consumed": rows_consumed,
        "memc_model": program.model,
    });
    write_atomically(&dir.join(STATE_FILE), format!("{state:#}\n").as_bytes())
}

/// Reads a directory [`save_dir`] wrote into the arena: every weight (its master copy where
/// the optimizer file has one), the optimizer state and the step count. A tensor missing, of
/// another shape, or one the program does not have is an error naming it.
pub fn load_dir(
    dir: &Path,
    program: &Program,
    arena: &mut dyn Backend,
) -> Result<Loaded, RunError> {
    check_dir_form(dir, "--resume")?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|source| RunError::Io {
        path: state_path.display().to_string(),
        source,
    })?;
    let bad_state = |msg: &str| RunError::Weights {
        path: state_path.display().to_string(),
        msg: msg.to_string(),
    };
    let state: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad_state(&format!("not JSON: {e}")))?;
    let step = state["global_step"]
        .as_u64()
        .ok_or_else(|| bad_state("no `global_step` count"))?;
    let mut files: Vec<(String, memmap2::Mmap)> = vec![];
    for name in [MODEL_FILE, ADAPTERS_FILE, OPTIMIZER_FILE] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let f = std::fs::File::open(&path).map_err(|source| RunError::Io {
            path: path.display().to_string(),
            source,
        })?;
        // SAFETY: read-only private mapping of a file memc replaces only by renaming.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| RunError::Io {
            path: path.display().to_string(),
            source,
        })?;
        files.push((path.display().to_string(), map));
    }
    let parsed = files
        .iter()
        .map(|(path, map)| {
            SafeTensors::deserialize(map).map_err(|e| RunError::Weights {
                path: path.clone(),
                msg: format!("not a valid safetensors file: {e}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let find = |name: &str| {
        files
            .iter()
            .zip(&parsed)
            .find_map(|((path, _), st)| st.tensor(name).ok().map(|t| (path.clone(), t)))
    };
    let mut loaded = Loaded {
        step: Some(step),
        ..Default::default()
    };
    let mut used = std::collections::HashSet::new();
    for p in &program.params {
        let master = format!("{MASTER}{}", p.slot.name);
        let (path, t, name) = match find(&master) {
            Some((path, t)) => (path, t, master),
            None => match find(&p.slot.name) {
                Some((path, t)) => (path, t, p.slot.name.clone()),
                None if p.role == Role::OptimizerState => {
                    return Err(RunError::Weights {
                        path: dir.join(OPTIMIZER_FILE).display().to_string(),
                        msg: format!(
                            "optimizer state `{}` is missing: the directory was saved by a program with another optimizer (or by Hugging Face: start from it with --weights instead)",
                            p.slot.name
                        ),
                    })
                }
                None => {
                    return Err(RunError::Weights {
                        path: dir.display().to_string(),
                        msg: format!(
                        "tensor `{}` ({}) is missing: the directory was not saved for this program",
                        p.slot.name,
                        p.slot.type_string()
                    ),
                    })
                }
            },
        };
        if t.shape() != p.slot.shape.as_slice() {
            return Err(RunError::Weights {
                path,
                msg: format!(
                    "tensor `{name}` is {:?}, the program expects {}",
                    t.shape(),
                    p.slot.type_string()
                ),
            });
        }
        let bytes = if t.dtype() == st_dtype(p.slot.dtype) {
            t.data().to_vec()
        } else {
            let from = [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::F64]
                .into_iter()
                .find(|d| st_dtype(*d) == t.dtype())
                .filter(|_| {
                    matches!(
                        p.slot.dtype,
                        Dtype::F32 | Dtype::F16 | Dtype::Bf16 | Dtype::F64
                    )
                })
                .ok_or_else(|| RunError::Weights {
                    path: path.clone(),
                    msg: format!(
                        "tensor `{name}` is {:?}, the program expects {}",
                        t.dtype(),
                        p.slot.type_string()
                    ),
                })?;
            crate::program::encode(p.slot.dtype, &crate::program::decode(from, t.data()))
        };
        arena.set(&p.slot, &bytes)?;
        used.insert(name);
        loaded.tensors += 1;
        loaded.optimizer_state |= p.role == Role::OptimizerState;
    }
    for ((path, _), st) in files.iter().zip(&parsed) {
        for name in st.names() {
            let master_of = name.strip_prefix(MASTER).unwrap_or(name);
            if !used.contains(name) && !program.params.iter().any(|p| p.slot.name == master_of) {
                return Err(RunError::Weights {
                    path: path.clone(),
                    msg: if path.ends_with(OPTIMIZER_FILE) {
                        format!("tensor `{name}` is not optimizer state of this program (the directory was saved with another optimizer or model)")
                    } else {
                        format!("tensor `{name}` is not a parameter of this program (the directory belongs to another model)")
                    },
                });
            }
        }
    }
    Ok(loaded)
}

/// Binds a Hugging Face checkpoint (a model directory, a `model.safetensors.index.json` or a
/// `model.safetensors`) to the program's weights by name (the program's weights carry the
/// checkpoint's names, `memc compile` gives them): each weight that memc did not add is set
/// from the tensor of its name, converted from bf16/f16; a weight the checkpoint lacks, a
/// tensor of another shape, or a tensor no weight has is an error naming it. Returns the
/// tensors bound.
pub fn load_checkpoint(
    path: &Path,
    program: &Program,
    arena: &mut dyn Backend,
) -> Result<usize, RunError> {
    let bad = |p: &Path, msg: String| RunError::Weights {
        path: p.display().to_string(),
        msg,
    };
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |source| RunError::Io { path: p, source }
    };
    let files = checkpoint_files(path)?;
    let mut maps = vec![];
    for f in &files {
        let file = std::fs::File::open(f).map_err(io(f))?;
        // SAFETY: a read-only private mapping of a checkpoint that is only read.
        maps.push(unsafe { memmap2::Mmap::map(&file) }.map_err(io(f))?);
    }
    let parsed = maps
        .iter()
        .zip(&files)
        .map(|(m, f)| {
            SafeTensors::deserialize(m)
                .map_err(|e| bad(f, format!("not a valid safetensors file: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut bound = 0;
    let mut names = std::collections::HashSet::new();
    for p in program
        .params
        .iter()
        .filter(|p| p.role == Role::Weight && !added_by_memc(&p.slot.name))
    {
        let Some((f, t)) = files
            .iter()
            .zip(&parsed)
            .find_map(|(f, st)| st.tensor(&p.slot.name).ok().map(|t| (f, t)))
        else {
            return Err(bad(
                path,
                format!(
                    "the checkpoint has no tensor `{}` ({}): is it a checkpoint of this model?",
                    p.slot.name,
                    p.slot.type_string()
                ),
            ));
        };
        if t.shape() != p.slot.shape.as_slice() {
            return Err(bad(
                f,
                format!(
                    "tensor `{}` is {:?}, the program's weight is {}",
                    p.slot.name,
                    t.shape(),
                    p.slot.type_string()
                ),
            ));
        }
        let from = [Dtype::F32, Dtype::F16, Dtype::Bf16, Dtype::F64]
            .into_iter()
            .find(|d| st_dtype(*d) == t.dtype())
            .ok_or_else(|| {
                bad(
                    f,
                    format!(
                        "tensor `{}` is {:?}, not a float type",
                        p.slot.name,
                        t.dtype()
                    ),
                )
            })?;
        let bytes = if from == p.slot.dtype {
            t.data().to_vec()
        } else {
            crate::program::encode(p.slot.dtype, &crate::program::decode(from, t.data()))
        };
        arena.set(&p.slot, &bytes)?;
        names.insert(p.slot.name.as_str());
        bound += 1;
    }
    for (f, st) in files.iter().zip(&parsed) {
        if let Some(extra) = st.names().into_iter().find(|n| !names.contains(*n)) {
            return Err(bad(f, format!("tensor `{extra}` binds to no weight of this program (is it a checkpoint of this model?)")));
        }
    }
    Ok(bound)
}

/// The safetensors files of a Hugging Face checkpoint: a directory's `model.safetensors` or the
/// shards its `model.safetensors.index.json` names, an index's shards, or the file itself.
pub fn checkpoint_files(path: &Path) -> Result<Vec<std::path::PathBuf>, RunError> {
    let index = if path.is_dir() {
        let i = path.join("model.safetensors.index.json");
        i.exists().then_some(i)
    } else {
        path.to_string_lossy()
            .ends_with(".index.json")
            .then(|| path.to_path_buf())
    };
    let Some(i) = index else {
        return Ok(vec![if path.is_dir() {
            path.join(MODEL_FILE)
        } else {
            path.to_path_buf()
        }]);
    };
    let bad = |msg: String| RunError::Weights {
        path: i.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(&i).map_err(|source| RunError::Io {
        path: i.display().to_string(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let dir = i.parent().unwrap_or(Path::new("."));
    let mut files: Vec<_> = map
        .values()
        .filter_map(|x| x.as_str())
        .map(|x| dir.join(x))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}
