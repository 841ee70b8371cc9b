//! Weights and checkpoints as safetensors files: loading into a program's arena (every tensor
//! checked against the program by name, dtype and shape) and saving atomically (a temporary
//! file renamed into place, so an interrupted save never leaves a truncated checkpoint).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::program::{Dtype, Program, Role, Slot};
use crate::{Backend, RunError};

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

/// What [`load_dir`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Loaded {
    /// Tensors loaded.
    pub tensors: usize,
    /// Whether the directory held the optimizer state.
    pub optimizer_state: bool,
    /// Steps taken.
    pub step: Option<u64>,
    /// What the checkpoint recorded of its run.
    pub run: RunState,
    /// The directory read (the newest complete `checkpoint-N` of a directory of them).
    pub dir: std::path::PathBuf,
}

/// What a checkpoint records of its run in [`STATE_FILE`] (transformers' names where it has
/// them), so a resumed run continues it exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunState {
    /// Optimizer steps taken (`global_step`).
    pub step: u64,
    /// Rows of the data read.
    pub rows_consumed: u64,
    /// The run's length in steps, where its learning-rate schedule ends (`max_steps`).
    pub max_steps: Option<u64>,
    /// The schedule's name (`constant`, `linear`, `cosine`) and its warmup steps.
    pub lr_schedule: Option<(String, u64)>,
    /// The seed of the shuffled data order (`None`: file order).
    pub shuffle_seed: Option<u64>,
}

/// The prefix of the gradient sums of a program that accumulates gradients (the passes'
/// `train::ACCUM_PREFIX`).
const ACCUM_PREFIX: &str = "memc.accum:";

/// Whether `name` is state that is zero between steps (gradient sums): not saved, and zero
/// on resume.
fn zero_between_steps(name: &str) -> bool {
    name.starts_with(ACCUM_PREFIX)
}

/// The prefix of a periodic checkpoint's directory (`checkpoint-500`, as transformers' Trainer
/// names them).
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// The periodic checkpoints in `dir`: (step, path), oldest first, complete or not.
pub fn checkpoints(dir: &Path) -> Vec<(u64, std::path::PathBuf)> {
    let mut out: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            e.path().is_dir().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The directory `--resume DIR` reads: `DIR` when it is a complete checkpoint (its
/// [`STATE_FILE`], written last, is there), else the newest complete `DIR/checkpoint-N`
/// (an interrupted save leaves no state file, so it is passed over).
pub fn resume_dir(dir: &Path) -> Result<std::path::PathBuf, RunError> {
    let newest = checkpoints(dir)
        .into_iter()
        .rev()
        .find(|(_, p)| p.join(STATE_FILE).is_file());
    if dir.join(STATE_FILE).is_file() {
        // A directory saved at the end of one run and holding a later run's periodic
        // checkpoints: the furthest step.
        let own = std::fs::read_to_string(dir.join(STATE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["global_step"].as_u64());
        return Ok(match (own, newest) {
            (Some(s), Some((n, p))) if n > s => p,
            _ => dir.to_path_buf(),
        });
    }
    newest
        .map(|(_, p)| p)
        .ok_or_else(|| RunError::Weights {
            path: dir.display().to_string(),
            msg: format!(
                "no complete checkpoint here: neither {STATE_FILE} nor a {CHECKPOINT_PREFIX}N directory holding one (written last, so a save cut short has none)"
            ),
        })
}

/// Removes the complete periodic checkpoints of `dir` but the newest `keep` (transformers'
/// `save_total_limit`), oldest first; `current` (the one just written) always stays, and a
/// save cut short (no state file) is not counted.
pub fn prune_checkpoints(dir: &Path, keep: usize, current: &Path) -> Result<(), RunError> {
    let all: Vec<_> = checkpoints(dir)
        .into_iter()
        .filter(|(_, p)| p.join(STATE_FILE).is_file())
        .collect();
    let mut excess = all.len().saturating_sub(keep);
    for (_, p) in &all {
        if excess == 0 {
            break;
        }
        if p == current {
            continue;
        }
        excess -= 1;
        std::fs::remove_dir_all(p).map_err(|source| RunError::Io {
            path: p.display().to_string(),
            source,
        })?;
    }
    Ok(())
}

/// Safetensors files mapped, not read (path shown, mapping): each tensor is copied into the
/// arena, then its pages are let go, so loading holds about one tensor beyond the arena (the
/// plan's bytes).
pub fn map_files(paths: &[std::path::PathBuf]) -> Result<Vec<(String, memmap2::Mmap)>, RunError> {
    paths
        .iter()
        .map(|path| {
            let io = |source| RunError::Io {
                path: path.display().to_string(),
                source,
            };
            // Opening a FIFO would wait for a writer: weights are regular files.
            if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
                return Err(RunError::Weights {
                    path: path.display().to_string(),
                    msg: "not a regular file".into(),
                });
            }
            let f = std::fs::File::open(path).map_err(io)?;
            // SAFETY: the mapping is read-only and private; memc replaces weight and checkpoint
            // files by renaming a new file into place, never by writing into a file a reader maps.
            let map = unsafe { memmap2::Mmap::map(&f) }.map_err(io)?;
            Ok((path.display().to_string(), map))
        })
        .collect()
}

/// Each mapped file's safetensors header, checked.
pub fn parse_files(files: &[(String, memmap2::Mmap)]) -> Result<Vec<SafeTensors<'_>>, RunError> {
    files
        .iter()
        .map(|(path, map)| {
            SafeTensors::deserialize(map).map_err(|e| RunError::Weights {
                path: path.clone(),
                msg: format!("not a valid safetensors file: {e}"),
            })
        })
        .collect()
}

/// Tensor `name` in the first file that has it: (file index, tensor).
fn find<'a>(parsed: &'a [SafeTensors<'a>], name: &str) -> Option<(usize, TensorView<'a>)> {
    parsed
        .iter()
        .enumerate()
        .find_map(|(k, st)| st.tensor(name).ok().map(|t| (k, t)))
}

/// The runtime's element type of a stored one.
fn stored_dtype(d: StDtype) -> Option<Dtype> {
    [
        Dtype::F32,
        Dtype::F64,
        Dtype::F16,
        Dtype::Bf16,
        Dtype::I64,
        Dtype::I32,
        Dtype::I16,
        Dtype::Bool,
    ]
    .into_iter()
    .find(|x| st_dtype(*x) == d)
}

/// Copies tensor `t` (`name` in mapped file `file`) into `slot`: its shape must be the slot's;
/// a float tensor of another float type is converted (bf16/f16 checkpoints, f32 masters).
fn copy_into(
    arena: &mut dyn Backend,
    slot: &Slot,
    name: &str,
    file: &(String, memmap2::Mmap),
    t: &TensorView,
) -> Result<(), RunError> {
    let is_float = |d: Dtype| matches!(d, Dtype::F32 | Dtype::F64 | Dtype::F16 | Dtype::Bf16);
    let from = stored_dtype(t.dtype());
    let convertible =
        from.is_some_and(|f| f == slot.dtype || (is_float(f) && is_float(slot.dtype)));
    if t.shape() != slot.shape.as_slice() || !convertible {
        return Err(RunError::Weights {
            path: file.0.clone(),
            msg: format!(
                "tensor `{name}` is {:?}{:?}, the program expects {}",
                t.dtype(),
                t.shape(),
                slot.type_string()
            ),
        });
    }
    match from {
        Some(f) if f != slot.dtype => arena.set(
            slot,
            &crate::program::encode(slot.dtype, &crate::program::decode(f, t.data())),
        )?,
        _ => arena.set(slot, t.data())?,
    }
    release(&file.1, t.data());
    Ok(())
}

/// The first tensor of `parsed` not in `used`, as the error `msg(file, name)` gives.
fn refuse_unused(
    files: &[(String, memmap2::Mmap)],
    parsed: &[SafeTensors],
    used: &std::collections::HashSet<String>,
    msg: impl Fn(&str, &str) -> String,
) -> Result<(), RunError> {
    for ((path, _), st) in files.iter().zip(parsed) {
        if let Some(name) = st.names().into_iter().find(|n| !used.contains(*n)) {
            return Err(RunError::Weights {
                path: path.clone(),
                msg: msg(path, name),
            });
        }
    }
    Ok(())
}

/// Loads the weights file `path` (an executable's `OUT.safetensors`, or one like it) into the
/// arena: every weight (trained or frozen) of the program must be in the file with its shape;
/// a tensor that is not a weight of the program is an error (the file belongs to another
/// model). Returns the tensors loaded.
pub fn load(path: &Path, program: &Program, arena: &mut dyn Backend) -> Result<usize, RunError> {
    load_weights(
        &[path.to_path_buf()],
        path,
        program,
        arena,
        |_| true,
        "the file was not written for this program",
    )
}

/// Sets each weight whose name `pick` accepts from the tensor of that name in the files
/// `paths` (`shown` in messages): a weight with no tensor, or a tensor no weight takes, is an
/// error naming it, `hint` saying what that means. Returns the tensors set.
fn load_weights(
    paths: &[std::path::PathBuf],
    shown: &Path,
    program: &Program,
    arena: &mut dyn Backend,
    pick: impl Fn(&str) -> bool,
    hint: &str,
) -> Result<usize, RunError> {
    let files = map_files(paths)?;
    let parsed = parse_files(&files)?;
    let mut used = std::collections::HashSet::new();
    for p in program
        .params
        .iter()
        .filter(|p| p.role == Role::Weight && pick(&p.slot.name))
    {
        let (k, t) = find(&parsed, &p.slot.name).ok_or_else(|| RunError::Weights {
            path: shown.display().to_string(),
            msg: format!(
                "there is no tensor `{}` ({}): {hint}",
                p.slot.name,
                p.slot.type_string()
            ),
        })?;
        copy_into(arena, &p.slot, &p.slot.name, &files[k], &t)?;
        used.insert(p.slot.name.clone());
    }
    refuse_unused(&files, &parsed, &used, |_, name| {
        format!("tensor `{name}` is no weight of this program: {hint}")
    })?;
    Ok(used.len())
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
///
/// A distributed step ([`Backend::shards`]) is saved as Hugging Face shards checkpoints:
/// each rank writes the tensors it saves as its own shard of each file
/// (`model-0000i-of-0000n.safetensors`, `optimizer-...`, under per-process temporary names),
/// all called together; rank 0 then writes the indexes (`model.safetensors.index.json`, ...,
/// after a barrier, so they name only complete shards) and last the state file.
pub fn save_dir(
    dir: &Path,
    program: &Program,
    arena: &mut dyn Backend,
    run: &RunState,
) -> Result<(), RunError> {
    check_dir_form(dir, "--save")?;
    std::fs::create_dir_all(dir).map_err(|source| RunError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let shards = arena.shards()?;
    let rank = shards.as_ref().map_or(0, |s| s.rank);
    // The state file marks a complete directory: gone until everything else is written, so
    // an interrupted save over an earlier one is never taken for complete (and no rank
    // writes before it is gone).
    if rank == 0 {
        remove_if_present(&dir.join(STATE_FILE))?;
    }
    arena.barrier()?;
    // Each tensor's file kind ([`MODEL_FILE`], [`ADAPTERS_FILE`], [`OPTIMIZER_FILE`]), its
    // stored slot and the rank that writes it.
    let saver = |name: &str| shards.as_ref().map_or(0, |s| s.saver[name]);
    let mut kinds: [Vec<(Slot, Option<Dtype>, usize)>; 3] = Default::default();
    for p in program
        .params
        .iter()
        .filter(|p| !zero_between_steps(&p.slot.name))
    {
        let r = saver(&p.slot.name);
        match p.role {
            Role::OptimizerState => kinds[2].push((p.slot.clone(), None, r)),
            Role::Weight if added_by_memc(&p.slot.name) => kinds[1].push((p.slot.clone(), None, r)),
            Role::Weight => match program.checkpoint.dtypes.get(&p.slot.name) {
                Some(&d) if d != p.slot.dtype => {
                    let master = Slot {
                        name: format!("{MASTER}{}", p.slot.name),
                        ..p.slot.clone()
                    };
                    kinds[2].push((master, None, r));
                    kinds[0].push((p.slot.clone(), Some(d), r));
                }
                _ => kinds[0].push((p.slot.clone(), None, r)),
            },
        }
    }
    let pt = || HashMap::from([("format".to_string(), "pt".to_string())]);
    let bases = ["model", "adapters", "optimizer"];
    // The ranks writing each kind, in rank order: the writer of shard i of n.
    let writers: Vec<Vec<usize>> = kinds
        .iter()
        .map(|kind| {
            let mut w: Vec<usize> = kind.iter().map(|t| t.2).collect();
            w.sort();
            w.dedup();
            w
        })
        .collect();
    let file = |k: usize, r: usize| match &shards {
        None => format!("{}.safetensors", bases[k]),
        Some(_) => {
            let i = writers[k].iter().position(|&w| w == r).expect("a writer");
            format!(
                "{}-{:05}-of-{:05}.safetensors",
                bases[k],
                i + 1,
                writers[k].len()
            )
        }
    };
    for (k, kind) in kinds.iter().enumerate() {
        if writers[k].contains(&rank) {
            let mut tensors: Vec<(Slot, Vec<u8>)> = vec![];
            for (slot, narrow, _) in kind.iter().filter(|t| t.2 == rank) {
                let source = Slot {
                    name: slot
                        .name
                        .strip_prefix(MASTER)
                        .unwrap_or(&slot.name)
                        .to_string(),
                    ..slot.clone()
                };
                let bytes = arena.get(&source)?;
                tensors.push(match narrow {
                    Some(d) => (
                        Slot {
                            dtype: *d,
                            ..slot.clone()
                        },
                        crate::program::encode(*d, &crate::program::decode(slot.dtype, &bytes)),
                    ),
                    None => (slot.clone(), bytes),
                });
            }
            let views: Vec<(Slot, &[u8])> =
                tensors.iter().map(|(s, b)| (s.clone(), &b[..])).collect();
            save_tensors(&dir.join(file(k, rank)), &views, pt())?;
        }
        if rank == 0 {
            // An index an earlier, sharded save left goes (a new one is written once every
            // rank has written its shard), and so do files of this kind the save does not
            // name.
            if shards.is_none() || kind.is_empty() {
                remove_if_present(&dir.join(format!("{}.safetensors.index.json", bases[k])))?;
            }
            let named = writers[k].iter().map(|&r| file(k, r)).collect();
            remove_stale_files(dir, bases[k], &named)?;
        }
    }
    arena.barrier()?;
    if rank != 0 {
        return Ok(());
    }
    for (k, kind) in kinds.iter().enumerate() {
        if shards.is_none() || kind.is_empty() {
            continue;
        }
        let total: u64 = kind
            .iter()
            .map(|(s, d, _)| {
                s.shape.iter().product::<usize>() as u64 * d.unwrap_or(s.dtype).size() as u64
            })
            .sum();
        let map: serde_json::Map<String, serde_json::Value> = kind
            .iter()
            .map(|(s, _, r)| (s.name.clone(), file(k, *r).into()))
            .collect();
        let text = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": map,
        });
        write_atomically(
            &dir.join(format!("{}.safetensors.index.json", bases[k])),
            format!("{text:#}\n").as_bytes(),
        )?;
    }
    for (name, text) in &program.checkpoint.files {
        write_atomically(&dir.join(name), text.as_bytes())?;
    }
    let mut state = serde_json::json!({
        "global_step": run.step,
        "rows_consumed": run.rows_consumed,
        "memc_model": program.model,
    });
    if let Some(m) = run.max_steps {
        state["max_steps"] = m.into();
    }
    if let Some((kind, warmup)) = &run.lr_schedule {
        state["lr_scheduler_type"] = kind.as_str().into();
        state["warmup_steps"] = (*warmup).into();
    }
    if let Some(seed) = run.shuffle_seed {
        state["shuffle_seed"] = seed.into();
    }
    write_atomically(&dir.join(STATE_FILE), format!("{state:#}\n").as_bytes())
}

/// Removes the files of kind `base` in `dir` (`BASE.safetensors`, `BASE-*-of-*.safetensors`)
/// that are not `keep`: what an earlier save with another layout left.
fn remove_stale_files(
    dir: &Path,
    base: &str,
    keep: &std::collections::HashSet<String>,
) -> Result<(), RunError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let single = format!("{base}.safetensors");
    let shard = format!("{base}-");
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name == single
            || (name.starts_with(&shard)
                && name.ends_with(".safetensors")
                && name.contains("-of-"));
        if ours && !keep.contains(&name) {
            remove_if_present(&e.path())?;
        }
    }
    Ok(())
}

/// Removes `path` if it exists.
fn remove_if_present(path: &Path) -> Result<(), RunError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RunError::Io {
            path: path.display().to_string(),
            source: e,
        }),
        _ => Ok(()),
    }
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
    let dir = &resume_dir(dir)?;
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
    let mut paths: Vec<std::path::PathBuf> = vec![];
    for base in ["model", "adapters", "optimizer"] {
        let index = dir.join(format!("{base}.safetensors.index.json"));
        if index.exists() {
            paths.extend(index_files(&index)?);
        } else if dir.join(format!("{base}.safetensors")).exists() {
            paths.push(dir.join(format!("{base}.safetensors")));
        }
    }
    let files = map_files(&paths)?;
    let parsed = parse_files(&files)?;
    let number = |k: &str| -> Result<Option<u64>, RunError> {
        match &state[k] {
            serde_json::Value::Null => Ok(None),
            v => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad_state(&format!("`{k}` is not a count"))),
        }
    };
    let run = RunState {
        step,
        rows_consumed: number("rows_consumed")?.unwrap_or(0),
        max_steps: number("max_steps")?,
        lr_schedule: match (&state["lr_scheduler_type"], number("warmup_steps")?) {
            (serde_json::Value::String(k), w) => Some((k.clone(), w.unwrap_or(0))),
            (serde_json::Value::Null, _) => None,
            _ => return Err(bad_state("`lr_scheduler_type` is not a name")),
        },
        shuffle_seed: number("shuffle_seed")?,
    };
    let mut loaded = Loaded {
        step: Some(step),
        run,
        dir: dir.to_path_buf(),
        ..Default::default()
    };
    let mut used = std::collections::HashSet::new();
    for p in program
        .params
        .iter()
        .filter(|p| !zero_between_steps(&p.slot.name))
    {
        let master = format!("{MASTER}{}", p.slot.name);
        let (name, (k, t)) = match (find(&parsed, &master), find(&parsed, &p.slot.name)) {
            (Some(found), bare) => {
                // The weight beside its master copy is the same value, narrowed.
                if bare.is_some() {
                    used.insert(p.slot.name.clone());
                }
                (master, found)
            }
            (None, Some(found)) => (p.slot.name.clone(), found),
            (None, None) if p.role == Role::OptimizerState => {
                return Err(RunError::Weights {
                    path: dir.join(OPTIMIZER_FILE).display().to_string(),
                    msg: format!(
                        "optimizer state `{}` is missing: the directory was saved by a program with another optimizer (or by Hugging Face: start from it with --weights instead)",
                        p.slot.name
                    ),
                });
            }
            (None, None) => {
                return Err(RunError::Weights {
                    path: dir.display().to_string(),
                    msg: format!(
                        "tensor `{}` ({}) is missing: the directory was not saved for this program",
                        p.slot.name,
                        p.slot.type_string()
                    ),
                });
            }
        };
        // A rank of a distributed step reads only its share.
        if arena.holds(&p.slot) {
            copy_into(arena, &p.slot, &name, &files[k], &t)?;
            loaded.tensors += 1;
        }
        used.insert(name);
        loaded.optimizer_state |= p.role == Role::OptimizerState;
    }
    refuse_unused(&files, &parsed, &used, |path, name| {
        if path.ends_with(OPTIMIZER_FILE) {
            format!("tensor `{name}` is not optimizer state of this program (the directory was saved with another optimizer or model)")
        } else {
            format!("tensor `{name}` is not a parameter of this program (the directory belongs to another model)")
        }
    })?;
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
    load_weights(
        &checkpoint_files(path)?,
        path,
        program,
        arena,
        |name| !added_by_memc(name),
        "is it a checkpoint of this model?",
    )
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
    index_files(&i)
}

/// The shards a safetensors index (`weight_map`) names: files beside it (or, for an index
/// that is a symbolic link, beside its target), each once.
fn index_files(i: &Path) -> Result<Vec<std::path::PathBuf>, RunError> {
    let bad = |msg: String| RunError::Weights {
        path: i.display().to_string(),
        msg,
    };
    let text = std::fs::read_to_string(i).map_err(|source| RunError::Io {
        path: i.display().to_string(),
        source,
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = v["weight_map"]
        .as_object()
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let dir = i.parent().unwrap_or(Path::new("."));
    // The index is untrusted input: the shards it names must be files of its own directory
    // (or, for an index that is a symbolic link as in a Hugging Face cache, of its target's).
    let roots: Vec<std::path::PathBuf> = [
        dir.canonicalize().ok(),
        i.canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut files = vec![];
    for name in map.values() {
        let name = name
            .as_str()
            .ok_or_else(|| bad(format!("`weight_map` holds {name}, not a file name")))?;
        let plain = Path::new(name)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        let file = dir.join(name);
        let inside = file
            .canonicalize()
            .is_ok_and(|real| roots.iter().any(|r| real.starts_with(r)));
        if name.is_empty() || !plain || (file.exists() && !inside) {
            return Err(bad(format!(
                "`weight_map` names `{name}`, which is not a file beside the index"
            )));
        }
        files.push(file);
    }
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("memc-weights-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn checkpoint(dir: &Path, step: u64, complete: bool) -> std::path::PathBuf {
        let p = dir.join(format!("{CHECKPOINT_PREFIX}{step}"));
        std::fs::create_dir_all(&p).unwrap();
        if complete {
            std::fs::write(p.join(STATE_FILE), format!("{{\"global_step\": {step}}}")).unwrap();
        }
        p
    }

    #[test]
    fn resume_takes_the_furthest_complete_checkpoint() {
        let d = fresh("resume");
        assert!(resume_dir(&d).is_err());
        checkpoint(&d, 2, true);
        let four = checkpoint(&d, 4, true);
        checkpoint(&d, 6, false); // cut short
        assert_eq!(resume_dir(&d).unwrap(), four);
        // The directory itself saved at step 3: checkpoint-4 is further.
        std::fs::write(d.join(STATE_FILE), "{\"global_step\": 3}").unwrap();
        assert_eq!(resume_dir(&d).unwrap(), four);
        std::fs::write(d.join(STATE_FILE), "{\"global_step\": 9}").unwrap();
        assert_eq!(resume_dir(&d).unwrap(), d);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn pruning_keeps_the_newest_and_the_one_just_written() {
        let d = fresh("prune");
        for s in [2, 4, 6] {
            checkpoint(&d, s, true);
        }
        let cut = checkpoint(&d, 7, false);
        prune_checkpoints(&d, 2, &d.join("checkpoint-6")).unwrap();
        let left: Vec<u64> = checkpoints(&d).into_iter().map(|(s, _)| s).collect();
        assert_eq!(
            left,
            [4, 6, 7],
            "the oldest complete one goes; a save cut short is not counted"
        );
        assert!(cut.exists());
        // A resumed run writing checkpoint-3 beside a stale checkpoint-6: it stays.
        let three = checkpoint(&d, 3, true);
        prune_checkpoints(&d, 1, &three).unwrap();
        let left: Vec<u64> = checkpoints(&d).into_iter().map(|(s, _)| s).collect();
        assert_eq!(left, [3, 7]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
