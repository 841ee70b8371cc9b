//! Shared helpers for memc's end-to-end tests: the example models, their inputs and their
//! onnxruntime references (written by `examples/export.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memc_ir::Tensor;

pub use memc_passes::remat::{Budget, Policy};
pub use memc_passes::train::{Optimizer, RevBackward, TrainOptions, Trainable};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One example model from `examples/models/manifest.json`.
#[derive(Debug, Clone)]
pub struct Example {
    /// `llama-dynamo`, `bert-torchscript`, ...
    pub name: String,
    /// `llama`, `gpt2`, `bert`, `qwen2`.
    pub family: String,
    /// `dynamo` or `torchscript`.
    pub exporter: String,
    /// The `.onnx` file.
    pub path: PathBuf,
    /// PyTorch's parameter count (tied weights once).
    pub torch_params: usize,
}

/// Every example model.
pub fn examples() -> Vec<Example> {
    let dir = root().join("examples/models");
    let text =
        std::fs::read_to_string(dir.join("manifest.json")).expect("examples/models/manifest.json");
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    m["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Example {
            name: e["name"].as_str().unwrap().to_string(),
            family: e["family"].as_str().unwrap().to_string(),
            exporter: e["exporter"].as_str().unwrap().to_string(),
            path: dir.join(e["file"].as_str().unwrap()),
            torch_params: e["torch_params"].as_u64().unwrap() as usize,
        })
        .collect()
}

/// Every `.npy` file of `dir`, by file stem.
pub fn read_dir_npys(dir: &Path) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        m.insert(name, memc::io::read_tensor(&p).unwrap());
    }
    m
}

impl Example {
    /// The inputs the references were computed from, by input name.
    pub fn inputs(&self) -> HashMap<String, Tensor> {
        read_dir_npys(&self.path.with_extension("").join("inputs"))
    }

    /// The forward graph, imported with its inputs' shapes (not canonicalized), and the
    /// inputs.
    pub fn import(&self) -> (memc_ir::Graph, HashMap<String, Tensor>) {
        let inputs = self.inputs();
        let opts = memc_onnx::ImportOptions {
            shapes: inputs
                .iter()
                .map(|(k, t)| (k.clone(), t.shape().to_vec()))
                .collect(),
        };
        let g =
            memc_onnx::import(&self.path, &opts).unwrap_or_else(|e| panic!("{}: {e}", self.name));
        (g, inputs)
    }

    /// onnxruntime's outputs, by output name.
    pub fn references(&self) -> HashMap<String, Tensor> {
        read_dir_npys(&self.path.with_extension("").join("ref"))
    }
}

/// `max|got - want| / max|want|`.
pub fn rel_error(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape(), want.shape());
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let diff = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    let scale = w.iter().map(|b| b.abs() as f64).fold(0.0, f64::max);
    diff / scale
}

/// Training options as the CLI's defaults, with these choices.
pub fn train_args(optimizer: Optimizer, clip: Option<f64>, remat: Option<Policy>) -> TrainOptions {
    TrainOptions {
        optimizer,
        clip_grad_norm: clip,
        remat,
        ..TrainOptions::default()
    }
}

/// `torch.optim.SGD` with this momentum.
pub fn sgd(momentum: f64) -> Optimizer {
    Optimizer::Sgd { momentum }
}

/// `torch.optim.AdamW` with PyTorch's defaults.
pub fn adamw() -> Optimizer {
    Optimizer::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    }
}

/// The minimum-cut rematerialisation (the driver's default).
pub const AUTO: Option<Policy> = Some(Policy::MinCut);
/// Per-layer checkpointing.
pub const FULL: Option<Policy> = Some(Policy::Full);

/// PyTorch's training fixture of the example (`examples/train_fixtures.py`).
pub fn train_reference(ex: &Example) -> serde_json::Value {
    let path = ex.path.with_extension("").join("train_ref.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The example's training program (imported with its inputs' shapes, canonicalized) and one batch of its inputs.
pub fn training_program(
    ex: &Example,
    a: &TrainOptions,
) -> (memc_ir::Graph, HashMap<String, memc_ir::Tensor>) {
    let (mut g, inputs) = ex.import();
    // As the driver does by default: rms_norm, layer_norm and attention recognised.
    memc_passes::canonicalize::canonicalize(&mut g, &Default::default())
        .unwrap_or_else(|e| panic!("{}: {e}", ex.name));
    memc::train::build(&mut g, a).unwrap_or_else(|e| panic!("{}: {e:#}", ex.name));
    (g, inputs)
}

/// Runs `steps` steps on the reference backend (the interpreter), on the example's fixed batch (all its inputs) and returns the losses.
pub fn reference_losses(
    ex: &Example,
    a: &TrainOptions,
    lr: f64,
    wd: f64,
    steps: usize,
) -> Vec<f64> {
    let (mut g, inputs) = training_program(ex, a);
    interpreter_losses(&mut g, &inputs, lr, wd, steps)
}

/// Runs `steps` steps of the training program `g` on the interpreter with the fixed batch
/// `inputs`, updating its weights, and returns the losses.
pub fn interpreter_losses(
    g: &mut memc_ir::Graph,
    inputs: &HashMap<String, memc_ir::Tensor>,
    lr: f64,
    wd: f64,
    steps: usize,
) -> Vec<f64> {
    let mut out = Vec::new();
    for step in 1..=steps {
        let mut feeds = inputs.clone();
        let scalar = |v: f64| memc_ir::Tensor::from_f64(memc_ir::DType::F32, vec![], &[v]);
        feeds.insert("memc.lr".into(), scalar(lr));
        feeds.insert("memc.weight_decay".into(), scalar(wd));
        feeds.insert("memc.step".into(), scalar(step as f64));
        let r = memc_ir::run(g, &feeds, &memc_ir::RunOptions { check_nan: true }).unwrap();
        for (p, t) in r.updates {
            g.set_param_data(p, t);
        }
        out.push(r.outputs[0].1.to_f64_vec()[0]);
    }
    out
}

/// `max |got - want| / |want|` over paired losses.
pub fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / b.abs())
        .fold(0.0, f64::max)
}

/// Builds the training step of a textual-IR graph with the passes' API directly: next-token
/// loss (fused), AdamW with PyTorch's defaults, every weight trained, fp32, `remat`.
pub fn build_adamw(
    g: &mut memc_ir::Graph,
    remat: Option<memc_passes::remat::Policy>,
) -> Result<memc_passes::train::TrainStats, String> {
    let opts = TrainOptions {
        trainable: Trainable::All,
        remat,
        ..train_args(adamw(), None, None)
    };
    memc_passes::train::build_training(g, &opts).map_err(|e| e.to_string())
}

/// The model at `path` with `input_ids` bound to `dims`, imported and canonicalized as the
/// driver does.
pub fn canonical_model(path: &Path, dims: &[usize]) -> memc_ir::Graph {
    let opts = memc_onnx::ImportOptions {
        shapes: HashMap::from([("input_ids".to_string(), dims.to_vec())]),
    };
    let mut g =
        memc_onnx::import(path, &opts).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    memc_passes::canonicalize::canonicalize(&mut g, &Default::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    g
}
