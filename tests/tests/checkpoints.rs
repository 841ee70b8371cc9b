//! Hugging Face checkpoints in and out, run as a user runs them: `--weights` binds a checkpoint
//! saved with other weights than the exported ones (so matching by value cannot be what
//! passes) to either exporter's file, five AdamW steps agree with PyTorch's
//! (`examples/hf_fixtures.py`), and `--save DIR` writes a directory with the input's exact
//! tensor names, shapes and element types that resumes bitwise and loads back with
//! transformers (`scripts/hf-roundtrip.py`, where torch is installed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use memc_tests::{examples, max_rel, root};
use safetensors::SafeTensors;

#[path = "../support/cmd.rs"]
mod cmd;
use cmd::{bin_dir, compile_exe, fails, ok, run, scratch};

/// The causal-LM families `examples/hf_fixtures.py` saved checkpoints of.
const FAMILIES: [&str; 3] = ["llama", "qwen2", "gpt2"];

fn models() -> PathBuf {
    root().join("examples/models")
}

fn ids(family: &str) -> PathBuf {
    models().join(format!("{family}-dynamo/inputs/input_ids.npy"))
}

fn memc() -> Command {
    Command::new(bin_dir().join("memc"))
}

/// Every tensor of a safetensors file: name → (dtype, shape, values as f64).
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let dtype = match t.dtype() {
                safetensors::Dtype::F32 => memc_runtime::program::Dtype::F32,
                safetensors::Dtype::BF16 => memc_runtime::program::Dtype::Bf16,
                safetensors::Dtype::F16 => memc_runtime::program::Dtype::F16,
                d => panic!("{name}: {d:?}"),
            };
            let values = memc_runtime::program::decode(dtype, t.data());
            (
                name,
                (format!("{:?}", t.dtype()), t.shape().to_vec(), values),
            )
        })
        .collect()
}

/// PyTorch's 5 AdamW losses recorded in `examples/models/FILE`.
fn pytorch_adamw(file: &str) -> Vec<f64> {
    let text = std::fs::read_to_string(models().join(file)).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    reference["adamw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn weights_from_either_exporter_train_like_pytorch_and_save_the_checkpoints_layout() {
    let dir = scratch("hf-train");
    for family in FAMILIES {
        let hf = models().join(format!("{family}-hf"));
        let want = pytorch_adamw(&format!("{family}-hf-trained.json"));
        let input = tensors(&hf.join("model.safetensors"));
        let trained = tensors(&models().join(format!("{family}-hf-trained.safetensors")));
        for exporter in ["dynamo", "torchscript"] {
            let name = format!("{family}-{exporter}");
            let out = dir.join(&name);
            let stdout = ok(memc()
                .arg("train")
                .arg(models().join(format!("{name}.onnx")))
                .arg("--weights")
                .arg(&hf)
                .arg("--data")
                .arg(ids(family))
                .args([
                    "--optimizer",
                    "adamw",
                    "--lr",
                    "1e-3",
                    "--steps",
                    "5",
                    "--save",
                ])
                .arg(&out));
            let got = losses(&stdout);
            let err = max_rel(&got, &want);
            eprintln!("{name:<20} --weights {family}-hf, 5 AdamW steps vs PyTorch: {err:.1e}");
            assert!(err <= 1e-5, "{name}: {got:?} vs PyTorch {want:?}");
            // The saved directory: the input checkpoint's exact names, shapes and types, the
            // values PyTorch has after the same steps (well below one step, 1e-3).
            let saved = tensors(&out.join("model.safetensors"));
            assert_eq!(
                saved.keys().collect::<Vec<_>>(),
                input.keys().collect::<Vec<_>>(),
                "{name}: saved keys"
            );
            let mut worst = 0.0f64;
            for (k, (dtype, shape, values)) in &saved {
                assert_eq!((dtype, shape), (&input[k].0, &input[k].1), "{name}: {k}");
                let d = values
                    .iter()
                    .zip(&trained[k].2)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                worst = worst.max(d);
            }
            eprintln!(
                "{name:<20} saved weights vs PyTorch's after 5 steps: max |diff| {worst:.1e}"
            );
            assert!(
                worst <= 1e-4,
                "{name}: saved weights off PyTorch's by {worst}"
            );
            assert_eq!(
                std::fs::read_to_string(out.join("config.json")).unwrap(),
                std::fs::read_to_string(hf.join("config.json")).unwrap(),
                "{name}: config.json copied"
            );
            assert!(
                out.join("optimizer.safetensors").exists()
                    && out.join("trainer_state.json").exists()
            );
        }
    }
}

/// At fixed shapes the dynamo exporter stores the causal mask and the rotary cos/sin tables as
/// initializers: they are frozen, so the step trains PyTorch's parameters and its trajectory.
#[test]
fn fixed_shape_dynamo_exports_train_only_the_parameters() {
    let dir = scratch("static");
    let model = models().join("static/llama-dynamo-static.onnx");
    let report = dir.join("report.json");
    ok(memc()
        .arg("compile")
        .arg(&model)
        .args(["--train", "--report-json"])
        .arg(&report));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let llama = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    assert_eq!(r["training"]["trained_params"], llama.torch_params);
    let frozen: Vec<&str> = r["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["parameter"].as_bool().unwrap())
        .map(|p| p["why"].as_str().unwrap())
        .collect();
    assert_eq!(
        frozen.len(),
        3,
        "the mask and the cos/sin tables: {frozen:?}"
    );
    let stdout = ok(memc()
        .arg("train")
        .arg(&model)
        .arg("--data")
        .arg(ids("llama"))
        .args(["--optimizer", "adamw", "--lr", "1e-3", "--steps", "5"]));
    let want = pytorch_adamw("llama-dynamo/train_ref.json");
    let err = max_rel(&losses(&stdout), &want);
    assert!(err <= 1e-5, "fixed-shape export vs PyTorch: {err:.1e}");
}

#[test]
fn without_weights_the_parameters_take_the_checkpoints_names() {
    // Without --weights, the ONNX file's parameters are named as the Hugging Face checkpoint
    // names them (the wrapper's prefix dropped, folded transposes resolved), both exporters.
    for ex in examples()
        .into_iter()
        .filter(|e| FAMILIES.contains(&e.family.as_str()))
    {
        let mut g = memc_onnx::import(
            &ex.path,
            &memc_onnx::ImportOptions {
                shapes: [("input_ids".to_string(), vec![2, 16])].into(),
            },
        )
        .unwrap();
        let model = memc_onnx::load_model(&ex.path).unwrap();
        let prov = memc_onnx::provenance::provenance(model.graph.as_ref().unwrap());
        memc::checkpoint::apply(&mut g, &prov, None, &ex.name).unwrap();
        let mut names: Vec<String> = g
            .weights()
            .filter_map(|w| match &g.value(w).def {
                memc_ir::ValueDef::Param { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect();
        names.sort();
        let want: Vec<String> =
            tensors(&models().join(format!("{}-hf/model.safetensors", ex.family)))
                .into_keys()
                .collect();
        assert_eq!(names, want, "{}", ex.name);
    }
}

#[test]
fn executables_fine_tune_a_bf16_checkpoint_and_resume_bitwise() {
    let dir = scratch("hf-bf16");
    let hf = models().join("llama-hf-bf16");
    let exe = dir.join("llama");
    compile_exe(
        &models().join("llama-torchscript.onnx"),
        &exe,
        &[
            "--train",
            "--optimizer",
            "adamw",
            "--weights",
            hf.to_str().unwrap(),
        ],
    );
    let train = |extra: &[&str]| {
        ok(Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(ids("llama"))
            .args(extra))
    };
    let (a, b, straight) = (dir.join("a"), dir.join("b"), dir.join("straight"));
    let first = train(&["--steps", "3", "--save", a.to_str().unwrap()]);
    let rest = train(&[
        "--steps",
        "2",
        "--resume",
        a.to_str().unwrap(),
        "--save",
        b.to_str().unwrap(),
    ]);
    let all = train(&["--steps", "5", "--save", straight.to_str().unwrap()]);
    let resumed: Vec<f64> = losses(&first).into_iter().chain(losses(&rest)).collect();
    assert_eq!(resumed, losses(&all), "resumed vs uninterrupted");
    // Bitwise: the bf16 weights, and the f32 master weights and moments beside them.
    for f in ["model.safetensors", "optimizer.safetensors"] {
        assert_eq!(
            std::fs::read(b.join(f)).unwrap(),
            std::fs::read(straight.join(f)).unwrap(),
            "{f}"
        );
    }
    // Stored as the input stored it: bf16, the same names and shapes.
    let input = tensors(&hf.join("model.safetensors"));
    let saved = tensors(&b.join("model.safetensors"));
    assert_eq!(saved.len(), input.len());
    for (k, (dtype, shape, _)) in &saved {
        assert_eq!((dtype.as_str(), shape), ("BF16", &input[k].1), "{k}");
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 5);
}

#[test]
fn sharded_checkpoints_bind_like_one_file() {
    let dir = scratch("hf-sharded");
    let eval = |weights: &Path, out: &Path| {
        ok(memc()
            .arg("eval")
            .arg(models().join("llama-dynamo.onnx"))
            .args(["--shape", "input_ids=2x16", "--input"])
            .arg(format!("input_ids={}", ids("llama").display()))
            .arg("--weights")
            .arg(weights)
            .arg("--out")
            .arg(out));
        std::fs::read(out.join("logits.npy")).unwrap()
    };
    let one = eval(&models().join("llama-hf"), &dir.join("one"));
    let index = models().join("llama-hf-sharded/model.safetensors.index.json");
    assert_eq!(eval(&index, &dir.join("index")), one);
    assert_eq!(
        eval(&models().join("llama-hf-sharded"), &dir.join("dir")),
        one
    );
}

#[test]
fn a_checkpoint_that_does_not_fit_is_one_clear_error() {
    let dir = scratch("hf-errors");
    let compile = |weights: &Path| {
        let mut c = memc();
        c.arg("compile")
            .arg(models().join("llama-dynamo.onnx"))
            .args(["--shape", "input_ids=2x16", "--weights"])
            .arg(weights);
        c
    };
    // Another architecture: every unbound parameter and tensor listed.
    fails(
        &mut compile(&models().join("gpt2-hf")),
        "bind to no checkpoint tensor: `model.embed_tokens.weight` [256, 64]",
    );
    fails(
        &mut compile(&models().join("qwen2-hf")),
        "checkpoint tensors bind to no parameter: `model.layers.0.self_attn.k_proj.bias`",
    );
    // Another size: the tensor named.
    let bytes = std::fs::read(models().join("llama-hf/model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let small = vec![0u8; 128 * 64 * 4];
    for (name, v) in views.iter_mut() {
        if name == "model.embed_tokens.weight" {
            *v = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![128, 64],
                &small,
            )
            .unwrap();
        }
    }
    let wrong = dir.join("wrong.safetensors");
    safetensors::serialize_to_file(views, None, &wrong).unwrap();
    fails(
        &mut compile(&wrong),
        "tensor `model.embed_tokens.weight` is [128, 64], the model's parameter is [256, 64]",
    );
    fails(&mut compile(&dir.join("missing")), "missing");
    fails(&mut compile(&dir), "has no model.safetensors");
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails(&mut compile(&truncated), "not a valid safetensors file");
}

/// `scripts/hf-roundtrip.py`: a directory an emitted executable saved loads with
/// `AutoModelForCausalLM.from_pretrained` (no missing or unexpected keys) and gives memc's
/// logits. Runs where Python has torch and transformers (`scripts/setup.sh --python`).
#[test]
fn saved_directories_load_with_transformers() {
    let has = Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!("skipped: python3 with torch and transformers is not installed");
        return;
    }
    let dir = scratch("hf-roundtrip");
    for (family, exporter) in [
        ("llama", "dynamo"),
        ("qwen2", "torchscript"),
        ("gpt2", "dynamo"),
    ] {
        let model = models().join(format!("{family}-{exporter}.onnx"));
        let exe = dir.join(family);
        ok(memc()
            .arg("compile")
            .arg(&model)
            .args([
                "--shape",
                "input_ids=2x16",
                "--train",
                "--optimizer",
                "adamw",
                "--weights",
            ])
            .arg(models().join(format!("{family}-hf")))
            .arg("-o")
            .arg(&exe));
        let saved = dir.join(format!("{family}-saved"));
        ok(Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(ids(family))
            .args(["--steps", "3", "--save"])
            .arg(&saved));
        let out = run(Command::new("python3")
            .arg(root().join("scripts/hf-roundtrip.py"))
            .arg(&saved)
            .arg(&model)
            .arg(ids(family))
            .arg("--memc")
            .arg(bin_dir().join("memc")));
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{text}");
        assert!(
            out.status.success(),
            "{family}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Reversible layers' adapters are weights memc added: they go to `adapters.safetensors`,
/// so the saved `model.safetensors` is still exactly the base checkpoint's key set.
#[test]
fn reversible_adapters_are_saved_apart_from_the_base_checkpoint() {
    let dir = scratch("hf-adapters");
    let out = dir.join("saved");
    ok(memc()
        .arg("train")
        .arg(models().join("llama-dynamo.onnx"))
        .args(["--reversible", "meft1", "--weights"])
        .arg(models().join("llama-hf"))
        .arg("--data")
        .arg(ids("llama"))
        .args(["--optimizer", "adamw", "--steps", "2", "--save"])
        .arg(&out));
    let base = tensors(&models().join("llama-hf/model.safetensors"));
    let saved = tensors(&out.join("model.safetensors"));
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        base.keys().collect::<Vec<_>>()
    );
    let adapters = tensors(&out.join("adapters.safetensors"));
    assert!(!adapters.is_empty() && adapters.keys().all(|k| k.starts_with("memc.rev.")));
}

/// `memc train --save DIR` then `--resume DIR` continues bit for bit (cpu backend).
#[test]
fn memc_train_resumes_a_saved_directory() {
    let dir = scratch("hf-resume");
    let train = |extra: &[&str]| {
        losses(&ok(memc()
            .arg("train")
            .arg(models().join("qwen2-torchscript.onnx"))
            .arg("--weights")
            .arg(models().join("qwen2-hf"))
            .arg("--data")
            .arg(ids("qwen2"))
            .args(["--optimizer", "adamw", "--backend", "cpu"])
            .args(extra)))
    };
    let (a, straight) = (dir.join("a"), dir.join("straight"));
    let all = train(&["--steps", "4", "--save", straight.to_str().unwrap()]);
    let first = train(&["--steps", "2", "--save", a.to_str().unwrap()]);
    let rest = train(&["--steps", "2", "--resume", a.to_str().unwrap()]);
    assert_eq!([first, rest].concat(), all);
}

/// An executable compiled once, without `--weights`, binds a Hugging Face checkpoint at run
/// time by name (its weights carry the checkpoint's names): PyTorch's trajectory from it; a
/// checkpoint of another model is one error naming the missing tensor.
#[test]
fn executables_bind_a_checkpoint_at_run_time() {
    let dir = scratch("hf-runtime");
    let exe = dir.join("llama");
    compile_exe(
        &models().join("llama-torchscript.onnx"),
        &exe,
        &["--train", "--optimizer", "adamw"],
    );
    let train = |weights: &Path| {
        let mut c = Command::new(&exe);
        c.arg("train")
            .arg("--data")
            .arg(ids("llama"))
            .args(["--steps", "5", "--weights"])
            .arg(weights);
        c
    };
    let got = losses(&ok(&mut train(&models().join("llama-hf"))));
    let want = pytorch_adamw("llama-hf-trained.json");
    assert!(max_rel(&got, &want) <= 1e-5, "{got:?} vs PyTorch {want:?}");
    let sharded = losses(&ok(&mut train(
        &models().join("llama-hf-sharded/model.safetensors.index.json"),
    )));
    assert_eq!(sharded, got);
    fails(
        &mut train(&models().join("qwen2-hf")),
        "there is no tensor `lm_head.weight`",
    );
}
