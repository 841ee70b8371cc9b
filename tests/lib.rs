//! Shared helpers for memc's end-to-end tests: the example models, their inputs and their
//! onnxruntime references (written by `examples/export.py`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memc_ir::Tensor;

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

fn read_dir_npys(dir: &Path) -> HashMap<String, Tensor> {
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
