//! `memc data`: text to training arrays with a Hugging Face tokenizer.json, against the ids
//! the Python `tokenizers` package gives (`examples/data/make_tokenizer.py` wrote the
//! bundled tokenizer and the expected arrays), its errors, and the whole flow a user runs:
//! text → `memc data` → fine-tune with labels → a checkpoint transformers loads.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../support/cmd.rs"]
mod cmd;
use cmd::{bin_dir, ok, run, scratch};

fn data() -> PathBuf {
    memc_tests::root().join("examples/data")
}

fn memc() -> Command {
    Command::new(bin_dir().join("memc"))
}

fn array(path: &Path) -> (Vec<usize>, Vec<f64>) {
    let t = memc::io::read_tensor(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (t.shape().to_vec(), t.to_f64_vec())
}

fn memc_data(text: &str, out: &Path, extra: &[&str]) -> String {
    let o = run(memc()
        .arg("data")
        .arg("--tokenizer")
        .arg(data().join("tokenizer.json"))
        .arg("--text")
        .arg(data().join(text))
        .args(["--seq", "32", "--out"])
        .arg(out)
        .args(extra));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "memc data {text}: {err}");
    err
}

/// Packed text and padded prompt/response records give exactly the Python package's ids,
/// labels (−100 over prompts and padding) and attention masks.
#[test]
fn memc_data_gives_the_python_tokenizers_ids() {
    let dir = scratch("data");
    for (text, expected) in [("sample.txt", "packed"), ("sft.jsonl", "sft")] {
        let out = dir.join(expected);
        let said = memc_data(text, &out, &[]);
        eprint!("{said}");
        assert!(said.contains("rows of 32 tokens"), "{said}");
        for name in ["input_ids", "labels", "attention_mask"] {
            let got = array(&out.join(format!("{name}.npy")));
            let want = array(&data().join(format!("expected/{expected}/{name}.npy")));
            assert_eq!(got, want, "{text}: {name}");
        }
    }
    // The other layout of each: packed records keep the prompt masking, padded text rows.
    let out = dir.join("sft-packed");
    memc_data("sft.jsonl", &out, &["--layout", "pack"]);
    let (shape, labels) = array(&out.join("labels.npy"));
    let (_, sft_labels) = array(&data().join("expected/sft/labels.npy"));
    let kept = |v: &[f64]| v.iter().filter(|&&l| l != -100.0).count();
    assert_eq!(shape[1], 32);
    assert!(
        kept(&labels) >= kept(&sft_labels),
        "packing drops no response token"
    );
    let out = dir.join("text-padded");
    memc_data("sample.txt", &out, &["--layout", "pad"]);
    let (shape, _) = array(&out.join("input_ids.npy"));
    assert_eq!(shape, [20, 32], "one row per line");
}

/// A tokenizer that cannot be read, text with no tokens, a record of the wrong form, a row
/// too short to predict anything, an unknown token: one clear error line each.
#[test]
fn bad_text_and_tokenizers_are_one_clear_error() {
    let dir = scratch("data-errors");
    let fails = |args: &[&std::ffi::OsStr], want: &str| {
        let o = run(memc().arg("data").args(args));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].contains(want),
            "{args:?}: expected `{want}` in {err}"
        );
    };
    let tok = data().join("tokenizer.json");
    let bad_tok = dir.join("tokenizer.json");
    std::fs::write(&bad_tok, "{\"model\": 3}").unwrap();
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let wrong = dir.join("wrong.jsonl");
    std::fs::write(
        &wrong,
        "{\"text\": \"ok\"}\n{\"prompt\": \"only a prompt\"}\n",
    )
    .unwrap();
    let out = dir.join("out");
    let sample = data().join("sample.txt");
    let args = |t: &Path, text: &Path, extra: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "--tokenizer".into(),
            t.into(),
            "--text".into(),
            text.into(),
            "--seq".into(),
            "32".into(),
            "--out".into(),
            out.clone().into(),
        ];
        v.extend(extra.iter().map(|&e| e.into()));
        v
    };
    let check = |a: Vec<std::ffi::OsString>, want: &str| {
        let refs: Vec<&std::ffi::OsStr> = a.iter().map(|s| s.as_os_str()).collect();
        fails(&refs, want);
    };
    check(
        args(&bad_tok, &sample, &[]),
        "not a tokenizer memc can read",
    );
    check(
        args(&dir.join("none.json"), &sample, &[]),
        "not a tokenizer memc can read",
    );
    check(args(&tok, &empty, &[]), "gives no tokens to learn from");
    check(args(&tok, &wrong, &[]), "wrong.jsonl:2: expected an object");
    check(args(&tok, &dir.join("missing.txt"), &[]), "cannot read");
    check(
        args(&tok, &sample, &["--eos", "<nope>"]),
        "has no such token",
    );
    let mut short = args(&tok, &sample, &[]);
    short[5] = "1".into();
    check(short, "a row needs at least 2 tokens");
    let mut prompts_only = args(&tok, &data().join("sft.jsonl"), &[]);
    prompts_only[5] = "8".into();
    check(
        prompts_only,
        "every record's prompt fills the 8 tokens of a row",
    );
}

/// The README's flow: `memc data` on prompt/response records, GPT-2 fine-tuned from its
/// checkpoint on them with the labels and mask (the loss falls), saved, and the saved
/// directory loaded by transformers with the logits memc computes.
#[test]
fn text_to_a_fine_tuned_checkpoint_transformers_loads() {
    let dir = scratch("data-flow");
    let arrays = dir.join("sft");
    memc_data("sft.jsonl", &arrays, &[]);
    let models = memc_tests::root().join("examples/models");
    let saved = dir.join("saved");
    let out = ok(memc()
        .arg("train")
        .arg(models.join("gpt2-dynamo.onnx"))
        .arg("--weights")
        .arg(models.join("gpt2-hf"))
        .args([
            "--shape",
            "input_ids=8x32",
            "--backend",
            "cpu",
            "--steps",
            "6",
        ])
        .args([
            "--lr",
            "3e-3",
            "--lr-schedule",
            "linear",
            "--warmup-steps",
            "1",
        ])
        .arg("--data")
        .arg(arrays.join("input_ids.npy"))
        .arg("--labels")
        .arg(arrays.join("labels.npy"))
        .arg("--attention-mask")
        .arg(arrays.join("attention_mask.npy"))
        .arg("--save")
        .arg(&saved));
    let losses: Vec<f64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[1], "the loss falls: {losses:?}");
    let has = Command::new("python3")
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        eprintln!(
            "skipped the transformers check: python3 with torch and transformers is not installed"
        );
        return;
    }
    let o = run(Command::new("python3")
        .arg(memc_tests::root().join("scripts/hf-roundtrip.py"))
        .arg(&saved)
        .arg(models.join("gpt2-dynamo.onnx"))
        .arg(arrays.join("input_ids.npy"))
        .arg("--memc")
        .arg(bin_dir().join("memc")));
    let text = String::from_utf8_lossy(&o.stdout);
    eprintln!("{text}");
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
