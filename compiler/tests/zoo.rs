//! Every memory transform on every causal model of the zoo (`examples/zoo/`, see
//! `scripts/export-zoo.py`), through the `memc` binary as a user runs it: one training step
//! on the reference backend per file and transform, and the cpu backend (compiled kernels) on
//! one file per family. Recognition, logits and trajectories are checked in
//! `tests/tests/zoo.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// (file, family, expected blocks) of every exported causal zoo model memc imports.
fn causal_zoo() -> Vec<(PathBuf, String, Value)> {
    let dir = root().join("examples/zoo");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    m["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == "ok" && e["expected"]["attention"]["causal"] == true)
        .map(|e| {
            (
                dir.join(e["file"].as_str().unwrap()),
                e["family"].as_str().unwrap().to_string(),
                e["expected"].clone(),
            )
        })
        .collect()
}

/// `memc train FILE` for one step with `extra`; the step's JSON line, or the error.
fn step(file: &Path, backend: &str, extra: &[&str]) -> Result<(Value, String), String> {
    let data = file.with_extension("").join("inputs/input_ids.npy");
    let o = Command::new(env!("CARGO_BIN_EXE_memc"))
        .arg("train")
        .arg(file)
        .args([
            "--shape",
            "input_ids=2x16",
            "--steps",
            "1",
            "--backend",
            backend,
        ])
        .arg("--data")
        .arg(&data)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    if !o.status.success() {
        return Err(stderr.lines().last().unwrap_or("").to_string());
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    let line = stdout.lines().last().ok_or("no output")?;
    let v: Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if !v["loss"].as_f64().is_some_and(f64::is_finite) {
        return Err(format!("loss {}", v["loss"]));
    }
    Ok((v, stderr))
}

const TRANSFORMS: &[&[&str]] = &[
    &["--remat", "full"],
    &["--activation-budget", "0.5"],
    &["--reversible", "meft1"],
    &["--reversible", "meft2"],
    &["--reversible", "meft3"],
    &["--moc-k", "0.5"],
    &["--pipeline-stages", "2", "--microbatches", "2"],
];

#[test]
fn every_transform_trains_a_step_on_every_causal_zoo_model() {
    let zoo = causal_zoo();
    assert!(zoo.len() >= 40, "{} causal zoo files", zoo.len());
    let mut failures = vec![];
    for (file, _, expected) in &zoo {
        let name = file.file_stem().unwrap().to_string_lossy();
        let gated = matches!(expected["ffn"].as_str(), Some("swiglu" | "geglu"));
        let mut row = vec![];
        for t in TRANSFORMS {
            match step(file, "ref", t) {
                Ok((_, stderr)) => {
                    // MoC rewrites every gated FFN and says so; elsewhere it warns.
                    if t[0] == "--moc-k" {
                        let said = if gated {
                            "moc: 2 gated FFNs"
                        } else {
                            "warning:"
                        };
                        if !stderr.contains(said) {
                            failures
                                .push(format!("{name} {}: no `{said}` in {stderr}", t.join(" ")));
                        }
                    }
                    row.push("ok");
                }
                Err(e) => {
                    failures.push(format!("{name} {}: {e}", t.join(" ")));
                    row.push("FAIL");
                }
            }
        }
        eprintln!("{name:<32} {}", row.join(" "));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The compiled cpu backend on one export of each family, per-layer checkpoints and MoC where
/// it applies: the same loss as the reference backend.
#[test]
fn the_cpu_backend_trains_one_model_of_each_family() {
    let mut seen = std::collections::HashSet::new();
    let mut failures = vec![];
    for (file, family, expected) in causal_zoo() {
        let name = file.file_stem().unwrap().to_string_lossy().to_string();
        if !name.ends_with("-eager-torchscript") || !seen.insert(family) {
            continue;
        }
        let mut args = vec!["--remat", "full"];
        if matches!(expected["ffn"].as_str(), Some("swiglu" | "geglu")) {
            args.extend(["--moc-k", "0.5"]);
        }
        match (step(&file, "cpu", &args), step(&file, "ref", &args)) {
            (Ok((cpu, _)), Ok((r, _))) => {
                let (a, b) = (cpu["loss"].as_f64().unwrap(), r["loss"].as_f64().unwrap());
                eprintln!("{name:<32} cpu {a:.7} ref {b:.7}");
                if (a - b).abs() > 1e-5 * b.abs() {
                    failures.push(format!("{name}: cpu loss {a} vs reference {b}"));
                }
            }
            (c, r) => failures.push(format!("{name}: cpu {:?} / ref {:?}", c.err(), r.err())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Logits on the cpu backend against onnxruntime's: every export of the encoders (BERT,
/// RoBERTa: padding masks, token types, RoBERTa's run-time CumSum of position ids) and one
/// export of every other family.
#[test]
fn logits_match_onnxruntime_on_the_cpu_backend() {
    let dir = root().join("examples/zoo");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let out = std::env::temp_dir().join(format!("memc-zoo-enc-{}", std::process::id()));
    let mut n = 0;
    for e in m["models"].as_array().unwrap() {
        let encoder = e["expected"]["attention"]["causal"] == false;
        if e["status"] != "ok"
            || !(encoder
                || e["name"].as_str().unwrap().ends_with("-sdpa-dynamo")
                || e["name"] == "gemma2-eager-dynamo")
        {
            continue;
        }
        let file = dir.join(e["file"].as_str().unwrap());
        let base = file.with_extension("");
        let mut args: Vec<String> = vec!["eval".into(), file.display().to_string()];
        for name in e["inputs"].as_array().unwrap() {
            let name = name.as_str().unwrap();
            args.push("--input".into());
            args.push(format!(
                "{name}={}",
                base.join("inputs").join(format!("{name}.npy")).display()
            ));
        }
        args.extend([
            "--backend".into(),
            "cpu".into(),
            "--out".into(),
            out.display().to_string(),
        ]);
        args.extend(["--check".into(), base.join("ref").display().to_string()]);
        let o = Command::new(env!("CARGO_BIN_EXE_memc"))
            .args(&args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{}: {}",
            e["name"],
            String::from_utf8_lossy(&o.stderr)
        );
        let line = stdout
            .lines()
            .find(|l| l.starts_with("check logits"))
            .unwrap();
        let err: f64 = line
            .split(" = ")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        eprintln!(
            "{:<32} cpu vs onnxruntime {err:.1e}",
            e["name"].as_str().unwrap()
        );
        assert!(err <= 1e-4, "{}: {line}", e["name"]);
        n += 1;
    }
    assert_eq!(
        n,
        8 + 14,
        "BERT and RoBERTa, 4 exports each, and one of each other family"
    );
    let _ = std::fs::remove_dir_all(&out);
}
