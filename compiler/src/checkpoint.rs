//! Hugging Face checkpoints: the names the model's parameters take (those of a saved model
//! directory) and `--weights PATH`, which binds a checkpoint's tensors to the parameters.
//!
//! [`apply`] is the one entry point. The importer has named each parameter as PyTorch does
//! (`memc_onnx::provenance`: recorded names, folded transposes undone); here the wrapper
//! module's prefix is dropped (`model.model.layers.0...` of a wrapper holding a
//! `LlamaForCausalLM` is the checkpoint's `model.layers.0...`), and with `--weights` every
//! parameter is bound to a checkpoint tensor:
//!
//! 1. by name (with the prefix dropped or kept, whichever names more of the checkpoint);
//! 2. as a tied alias: a parameter the checkpoint stores under the name of a parameter the
//!    exporter merged into it (a tied LM head stored once as `model.embed_tokens.weight`),
//!    when exactly one unbound tensor of its shape has such a name;
//! 3. by exact value, the last resort.
//!
//! Bound parameters take the checkpoint's names and values (converted to f32 from bf16 or
//! f16; the layout remembers the stored type, so a saved directory stores it again).
//! Parameters left unbound and tensors bound to nothing are one error listing them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memc_ir::{DType, Graph, ParamRole, Tensor, TensorType, ValueDef, ValueId};
use memc_onnx::provenance::{Origin, Provenance};
use memc_runtime::program::{CheckpointLayout, Dtype};
use safetensors::tensor::TensorView;

/// Files of an input model directory that are weights, not copied into saved directories.
const WEIGHT_FILES: &[&str] = &[
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".onnx",
    ".gguf",
    ".index.json",
    ".h5",
    ".msgpack",
];

/// Small files (`config.json`, tokenizer files) larger than this are not copied.
const COPY_MAX_BYTES: u64 = 64 << 20;

/// A checkpoint opened for binding: its safetensors files, mapped (headers checked).
pub struct Weights {
    /// What the user passed, for messages.
    pub path: PathBuf,
    /// The model directory, when PATH was one (its small files are copied on save).
    dir: Option<PathBuf>,
    files: Vec<(String, memmap2::Mmap)>,
}

impl Weights {
    /// Opens a `model.safetensors`, a sharded `model.safetensors.index.json`, or a directory
    /// holding either.
    pub fn open(path: &Path) -> Result<Weights> {
        if path.is_dir()
            && !path.join("model.safetensors").exists()
            && !path.join("model.safetensors.index.json").exists()
        {
            bail!(
                "--weights {}: the directory has no model.safetensors or model.safetensors.index.json",
                path.display()
            );
        }
        let files = memc_runtime::weights::checkpoint_files(path)
            .and_then(|f| memc_runtime::weights::map_files(&f))
            .map_err(|e| anyhow!("--weights: {e}"))?;
        memc_runtime::weights::parse_files(&files).map_err(|e| anyhow!("--weights: {e}"))?;
        Ok(Weights {
            path: path.to_path_buf(),
            dir: path.is_dir().then(|| path.to_path_buf()),
            files,
        })
    }

    /// Every tensor by name, each file's header parsed once.
    fn tensors(&self) -> BTreeMap<String, TensorView<'_>> {
        let parsed = memc_runtime::weights::parse_files(&self.files).expect("checked on open");
        parsed.iter().flat_map(|st| st.tensors()).collect()
    }

    /// The small files of the model directory, by name.
    fn small_files(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let Some(dir) = &self.dir else {
            return Ok(out);
        };
        for entry in std::fs::read_dir(dir)
            .with_context(|| format!("--weights: cannot list {}", dir.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata()?;
            if !meta.is_file()
                || meta.len() > COPY_MAX_BYTES
                || WEIGHT_FILES.iter().any(|s| name.ends_with(s))
            {
                continue;
            }
            if let Ok(text) = std::fs::read_to_string(entry.path()) {
                out.insert(name, text);
            }
        }
        Ok(out)
    }
}

/// What [`apply`] decided, for the report.
#[derive(Debug, Clone, Default)]
pub struct Parameters {
    /// The saved directory's layout (stored element types, copied files).
    pub layout: CheckpointLayout,
    /// Every weight and frozen initializer: (name, trained by default, why).
    pub notes: Vec<(String, bool, String)>,
    /// Tensors bound from `--weights` (0 without it).
    pub bound: usize,
}

fn dtype_of(d: safetensors::Dtype) -> Option<(DType, Dtype)> {
    match d {
        safetensors::Dtype::F32 => Some((DType::F32, Dtype::F32)),
        safetensors::Dtype::F16 => Some((DType::F16, Dtype::F16)),
        safetensors::Dtype::BF16 => Some((DType::BF16, Dtype::Bf16)),
        safetensors::Dtype::F64 => Some((DType::F64, Dtype::F64)),
        _ => None,
    }
}

/// The runtime's element type for an IR dtype.
fn runtime_dtype(d: DType) -> Option<Dtype> {
    match d {
        DType::F32 => Some(Dtype::F32),
        DType::F16 => Some(Dtype::F16),
        DType::BF16 => Some(Dtype::Bf16),
        DType::F64 => Some(Dtype::F64),
        _ => None,
    }
}

/// `name` without the wrapper's `prefix`.
fn stripped(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_string()
}

/// Names the weights as a checkpoint does and, with `weights`, binds them (module docs).
pub fn apply(
    g: &mut Graph,
    prov: &Provenance,
    weights: Option<&Weights>,
    model: &str,
) -> Result<Parameters> {
    let params: Vec<(ValueId, String)> = g
        .weights()
        .filter_map(|id| match &g.value(id).def {
            ValueDef::Param {
                name,
                role: ParamRole::Weight,
                ..
            } => Some((id, name.clone())),
            _ => None,
        })
        .collect();
    // The wrapper's prefix: the first component every parameter name the exporter recorded
    // shares (PyTorch's names, signature and folded ones alike).
    let mut torch_names: Vec<&str> = prov.signature_params.iter().map(String::as_str).collect();
    for origin in prov.inits.values() {
        if let Origin::Parameter { name, .. } = origin {
            torch_names.push(name);
        }
    }
    let common = torch_names
        .first()
        .and_then(|n| n.split_once('.'))
        .map(|(first, _)| format!("{first}."))
        .filter(|p| torch_names.len() > 1 && torch_names.iter().all(|n| n.starts_with(p.as_str())));
    let folded: HashMap<&str, &str> = prov
        .inits
        .iter()
        .filter_map(|(init, o)| match o {
            Origin::FoldedExpression { of } => Some((init.as_str(), of.as_str())),
            _ => None,
        })
        .collect();
    let index = weights.map(Weights::tensors).unwrap_or_default();
    // Keep the prefix or drop it, whichever names more of the checkpoint (dropped without one).
    let prefix = match (&common, weights) {
        (Some(p), Some(_)) => {
            let hits = |strip: bool| {
                params
                    .iter()
                    .filter(|(_, n)| {
                        index.contains_key(&if strip { stripped(n, p) } else { n.clone() })
                    })
                    .count()
            };
            (hits(true) >= hits(false)).then(|| p.clone())
        }
        (p, _) => p.clone(),
    };
    let rename = |n: &str| -> String {
        if folded.contains_key(n) || n.starts_with("memc.") {
            return n.to_string();
        }
        prefix
            .as_deref()
            .map_or_else(|| n.to_string(), |p| stripped(n, p))
    };

    let mut out = Parameters::default();
    let Some(w) = weights else {
        for (id, name) in &params {
            set_name(g, *id, rename(name));
        }
        out.notes = notes(g, prov, &rename);
        return Ok(out);
    };

    // Names the exporter merged into another parameter (tied weights): signature parameters
    // no parameter of the graph is named.
    let standing: HashSet<&str> = prov
        .inits
        .values()
        .filter_map(|o| match o {
            Origin::Parameter { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    let merged: HashSet<String> = prov
        .signature_params
        .iter()
        .filter(|n| !standing.contains(n.as_str()))
        .map(|n| rename(n))
        .collect();
    let ignorable: HashSet<String> = prov
        .inits
        .iter()
        .filter(|(_, o)| matches!(o, Origin::Frozen { .. }))
        .map(|(n, _)| rename(n))
        .collect();

    let mut used: HashSet<String> = HashSet::new();
    let mut unbound: Vec<String> = vec![];
    let mut bind = |g: &mut Graph,
                    id: ValueId,
                    key: &str,
                    used: &mut HashSet<String>|
     -> Result<()> {
        let t = &index[key];
        let want = g.value(id).ty.clone();
        if t.shape() != want.shape.as_slice() {
            bail!(
                "--weights {}: tensor `{key}` is {:?}, the model's parameter is {:?} (is it a checkpoint of another model?)",
                w.path.display(),
                t.shape(),
                want.shape
            );
        }
        let (from_ir, from_rt) = dtype_of(t.dtype()).ok_or_else(|| {
            anyhow!(
                "--weights {}: tensor `{key}` is {:?}, not a float type",
                w.path.display(),
                t.dtype()
            )
        })?;
        let to = runtime_dtype(want.dtype)
            .ok_or_else(|| anyhow!("--weights: parameter `{key}` is not a float tensor"))?;
        let data = if from_ir == want.dtype {
            bytes::Bytes::copy_from_slice(t.data())
        } else {
            memc_runtime::program::encode(to, &memc_runtime::program::decode(from_rt, t.data()))
                .into()
        };
        if from_rt != to {
            out.layout.dtypes.insert(key.to_string(), from_rt);
        }
        g.set_param_data(
            id,
            Tensor::from_bytes(TensorType::new(want.dtype, want.shape.clone()), data)
                .expect("same size"),
        );
        set_name(g, id, key.to_string());
        used.insert(key.to_string());
        out.bound += 1;
        Ok(())
    };
    // 1. By name.
    let mut left = vec![];
    for (id, name) in &params {
        let key = rename(name);
        if index.contains_key(&key) && !used.contains(&key) {
            bind(g, *id, &key, &mut used)?;
        } else {
            left.push((*id, name.clone()));
        }
    }
    // 2. Tied aliases, 3. exact values.
    for (id, name) in left {
        let shape = g.value(id).ty.shape.clone();
        let open: Vec<&String> = index
            .keys()
            .filter(|k| !used.contains(*k) && index[*k].shape() == shape.as_slice())
            .collect();
        let aliases: Vec<&&String> = open
            .iter()
            .filter(|k| merged.contains(k.as_str()))
            .collect();
        if let [key] = aliases.as_slice() {
            let key = (**key).clone();
            bind(g, id, &key, &mut used)?;
            continue;
        }
        if let Some(of) = folded.get(name.as_str()) {
            unbound.push(format!(
                "`{name}` (the exporter's optimizer folded `{}` into an expression such as Gemma's `1 + w`, which cannot be undone from the file; export with torch.onnx.export(..., dynamo=True, optimize=False))",
                rename(of)
            ));
            continue;
        }
        let mine = match &g.value(id).def {
            ValueDef::Param { data: Some(d), .. } => d.to_f32_vec(),
            _ => vec![],
        };
        let same: Vec<&&String> = open
            .iter()
            .filter(|k| {
                let t = &index[k.as_str()];
                dtype_of(t.dtype()).is_some_and(|(_, rt)| {
                    memc_runtime::program::decode(rt, t.data())
                        .iter()
                        .zip(&mine)
                        .all(|(a, b)| *a as f32 == *b)
                })
            })
            .collect();
        if let [key] = same.as_slice() {
            let key = (**key).clone();
            bind(g, id, &key, &mut used)?;
            continue;
        }
        unbound.push(format!("`{}` {:?}", rename(&name), shape));
    }
    let extra: Vec<&String> = index
        .keys()
        .filter(|k| !used.contains(*k) && !ignorable.contains(*k))
        .collect();
    if !unbound.is_empty() || !extra.is_empty() {
        let list = |v: Vec<String>| {
            let n = v.len();
            let mut s: Vec<String> = v.into_iter().take(8).collect();
            if n > 8 {
                s.push(format!("and {} more", n - 8));
            }
            s.join(", ")
        };
        let mut parts = vec![];
        if !unbound.is_empty() {
            parts.push(format!(
                "{} parameters of {model} bind to no checkpoint tensor: {}",
                unbound.len(),
                list(unbound)
            ));
        }
        if !extra.is_empty() {
            parts.push(format!(
                "{} checkpoint tensors bind to no parameter: {}",
                extra.len(),
                list(extra.into_iter().map(|k| format!("`{k}`")).collect())
            ));
        }
        bail!(
            "--weights {}: {} (is it a checkpoint of this model's architecture and size?)",
            w.path.display(),
            parts.join("; ")
        );
    }
    out.layout.files = w.small_files()?;
    out.notes = notes(g, prov, &rename);
    Ok(out)
}

fn set_name(g: &mut Graph, id: ValueId, new: String) {
    if let ValueDef::Param { name, .. } = &mut g.value_mut(id).def {
        *name = new;
    }
}

/// Every weight (trained by default) and frozen initializer with why.
fn notes(
    g: &Graph,
    prov: &Provenance,
    rename: &dyn Fn(&str) -> String,
) -> Vec<(String, bool, String)> {
    let mut out = vec![];
    let mut how: HashMap<String, String> = HashMap::new();
    for (init, o) in &prov.inits {
        match o {
            Origin::Parameter {
                name,
                transposed,
                how: h,
            } => {
                let t = if *transposed {
                    format!(" (`{init}` is its transpose)")
                } else {
                    String::new()
                };
                how.insert(rename(name), format!("{h}{t}"));
            }
            Origin::FoldedExpression { of } => {
                how.insert(init.clone(), format!("the parameter `{}` folded into an expression by the exporter; trained as folded", rename(of)));
            }
            Origin::Frozen { why } => out.push((init.clone(), false, why.to_string())),
        }
    }
    for id in g.weights() {
        if let ValueDef::Param {
            name,
            role: ParamRole::Weight,
            ..
        } = &g.value(id).def
        {
            let why = how
                .get(name)
                .cloned()
                .unwrap_or_else(|| "a parameter".into());
            out.push((name.clone(), true, why));
        }
    }
    out.sort();
    out
}
