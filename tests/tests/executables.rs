//! Emitted executables (`memc compile -o OUT`), run as a user runs them: every example
//! model's inference against onnxruntime, its training against the reference backend, bf16
//! against f32, checkpoints that resume exactly, an arena of exactly the planned size, no LLVM
//! in the result, and one clear error line for every kind of bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use memc_tests::{
    adamw, examples, max_rel, reference_losses, train_args, Example, TrainOptions, AUTO,
};

#[path = "../support/cmd.rs"]
mod cmd;
use cmd::{bin_dir, fails, ok, run, scratch};

fn input_file(ex: &Example, name: &str) -> PathBuf {
    ex.path
        .with_extension("")
        .join("inputs")
        .join(format!("{name}.npy"))
}

/// `memc compile EX -o DIR/NAME` with the example's input shapes and `extra` options.
fn compile(ex: &Example, out: &Path, extra: &[&str]) {
    let mut cmd = Command::new(bin_dir().join("memc"));
    cmd.arg("compile").arg(&ex.path).arg("-o").arg(out);
    for (name, t) in ex.inputs() {
        let dims: Vec<String> = t.shape().iter().map(|d| d.to_string()).collect();
        cmd.arg("--shape").arg(format!("{name}={}", dims.join("x")));
    }
    cmd.args(extra);
    ok(&mut cmd);
    assert!(out.is_file() && out.with_extension("safetensors").is_file());
}

/// `OUT train` on the example's batch (its other inputs held fixed); the JSON lines.
fn train(ex: &Example, exe: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut cmd = Command::new(exe);
    cmd.arg("train")
        .arg("--data")
        .arg(input_file(ex, "input_ids"));
    for name in ex.inputs().keys().filter(|n| *n != "input_ids") {
        cmd.arg("--input")
            .arg(format!("{name}={}", input_file(ex, name).display()));
    }
    cmd.args(extra);
    json_lines(&ok(&mut cmd))
}

/// Each line of `out` as JSON (the step lines of a training run).
fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

fn losses(lines: &[serde_json::Value]) -> Vec<f64> {
    lines.iter().map(|l| l["loss"].as_f64().unwrap()).collect()
}

fn adamw_clipped() -> TrainOptions {
    train_args(adamw(), Some(1.0), AUTO)
}

const ADAMW: &[&str] = &["--train", "--optimizer", "adamw", "--clip-grad-norm", "1.0"];

/// The value of `key: N` in `OUT info`.
fn info_number(exe: &Path, key: &str) -> u64 {
    let info = ok(Command::new(exe).arg("info"));
    let line = info
        .lines()
        .find(|l| l.starts_with(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{info}"));
    line[key.len() + 2..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_example_executable_infers_like_onnxruntime() {
    let dir = scratch("infer");
    for ex in examples() {
        let exe = dir.join(&ex.name);
        compile(&ex, &exe, &[]);
        let out = dir.join(format!("{}-out", ex.name));
        let mut cmd = Command::new(&exe);
        cmd.arg("infer").arg("--out").arg(&out);
        for name in ex.inputs().keys() {
            cmd.arg("--input")
                .arg(format!("{name}={}", input_file(&ex, name).display()));
        }
        ok(&mut cmd);
        for (name, want) in ex.references() {
            let got = memc::io::read_tensor(&out.join(format!("{name}.npy"))).unwrap();
            let err = memc_tests::rel_error(&got, &want);
            eprintln!(
                "{:<28} executable vs onnxruntime `{name}`: {err:.2e}",
                ex.name
            );
            assert!(err <= 1e-4, "{}: `{name}` differs by {err:.3e}", ex.name);
        }
    }
}

#[test]
fn every_example_executable_trains_like_the_reference_backend() {
    let dir = scratch("train");
    for ex in examples() {
        let exe = dir.join(&ex.name);
        compile(&ex, &exe, ADAMW);
        let lines = train(&ex, &exe, &["--steps", "3", "--lr", "1e-3"]);
        let got = losses(&lines);
        let want = reference_losses(&ex, &adamw_clipped(), 1e-3, 0.01, 3);
        let err = max_rel(&got, &want);
        eprintln!(
            "{:<28} executable vs reference backend, 3 AdamW steps: {err:.2e}",
            ex.name
        );
        assert!(err <= 1e-5, "{}: {got:?} vs {want:?}", ex.name);
        // One arena of exactly the planned bytes: `info`, every step line and the compile
        // report agree.
        let arena = info_number(&exe, "arena_bytes");
        for l in &lines {
            assert_eq!(l["peak_bytes"].as_u64(), Some(arena), "{}", ex.name);
            assert_eq!(l["backend"], "cpu");
        }
        let report = dir.join(format!("{}.json", ex.name));
        let mut cmd = Command::new(bin_dir().join("memc"));
        cmd.arg("compile").arg(&ex.path).args(ADAMW);
        cmd.arg("--shape").arg("input_ids=2x16");
        for name in ex.inputs().keys().filter(|n| *n != "input_ids") {
            cmd.arg("--shape").arg(format!("{name}=2x16"));
        }
        ok(cmd.arg("--report-json").arg(&report));
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(
            r["cpu_backend"]["arena_bytes"].as_u64(),
            Some(arena),
            "{}",
            ex.name
        );
    }
}

#[test]
fn bf16_executable_tracks_f32() {
    let dir = scratch("bf16");
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && !e.name.contains("opset") && e.family != "bert")
    {
        let exe = dir.join(&ex.name);
        compile(
            &ex,
            &exe,
            &["--train", "--optimizer", "adamw", "--dtype", "bf16"],
        );
        let half = losses(&train(&ex, &exe, &["--steps", "20", "--lr", "1e-3"]));
        let f32_args = TrainOptions {
            compute_dtype: memc_ir::DType::F32,
            ..train_args(adamw(), None, AUTO)
        };
        let full = reference_losses(&ex, &f32_args, 1e-3, 0.01, 20);
        let err = max_rel(&half, &full);
        eprintln!(
            "{:<28} bf16 executable vs f32 over 20 AdamW steps: {err:.2e}",
            ex.name
        );
        assert!(err <= 0.02, "{}: {half:?} vs {full:?}", ex.name);
    }
}

#[test]
fn checkpoints_resume_exactly() {
    let dir = scratch("resume");
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let exe = dir.join("llama");
    compile(&ex, &exe, ADAMW);
    let straight = losses(&train(&ex, &exe, &["--steps", "6"]));
    let ckpt = dir.join("ckpt");
    let metrics = dir.join("metrics.jsonl");
    let first = train(
        &ex,
        &exe,
        &[
            "--steps",
            "4",
            "--save",
            ckpt.to_str().unwrap(),
            "--metrics",
            metrics.to_str().unwrap(),
        ],
    );
    let logged: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(losses(&logged), losses(&first));
    let resumed = train(
        &ex,
        &exe,
        &["--steps", "2", "--resume", ckpt.to_str().unwrap()],
    );
    assert_eq!(resumed[0]["step"], 5);
    assert_eq!(losses(&first), straight[..4]);
    // Weights, AdamW moments and the step count (bias correction) all come back.
    assert_eq!(losses(&resumed), straight[4..], "resumed vs uninterrupted");
    // A Hugging Face model directory: the weights under the checkpoint's names, the
    // optimizer state apart, the step and data position last.
    let names: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(names.iter().any(|n| n == f), "{f} in {names:?}");
    }
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 4);
    assert_eq!(state["rows_consumed"], 8);
    assert!(
        !names.iter().any(|n| n.contains(".tmp")),
        "no temporary files are left behind: {names:?}"
    );
    // The single-file form is refused before any step.
    let file = dir.join("ckpt.safetensors");
    let out = Command::new(&exe)
        .args([
            "train",
            "--data",
            input_file(&ex, "input_ids").to_str().unwrap(),
        ])
        .args(["--steps", "1", "--save", file.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("pass a directory") && out.stdout.is_empty(),
        "{err}"
    );
}

#[test]
fn executables_link_no_llvm_and_stay_small() {
    let dir = scratch("size");
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "gpt2-dynamo")
        .unwrap();
    let exe = dir.join("gpt2");
    compile(&ex, &exe, ADAMW);
    let size = std::fs::metadata(&exe).unwrap().len();
    assert!(size < 16 << 20, "{size} bytes");
    let ldd = ok(Command::new("ldd").arg(&exe));
    for lib in ["LLVM", "MLIR", "libstdc++"] {
        assert!(!ldd.contains(lib), "{lib} linked:\n{ldd}");
    }
}

#[test]
fn bad_inputs_give_one_clear_error() {
    let dir = scratch("errors");
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let exe = dir.join("llama");
    compile(&ex, &exe, ADAMW);
    let ids = input_file(&ex, "input_ids");
    let data = ["--data", ids.to_str().unwrap()];
    let train_cmd = |extra: &[&str]| {
        let mut c = Command::new(&exe);
        c.arg("train").args(data).args(extra);
        c
    };

    // The embedded program: one flipped byte is caught by the checksum.
    let mut bytes = std::fs::read(&exe).unwrap();
    let magic: Vec<u8> = memc_runtime::program::MAGIC
        .iter()
        .copied()
        .chain(memc_runtime::program::VERSION.to_le_bytes())
        .collect();
    let at = bytes
        .windows(magic.len())
        .position(|w| w == magic)
        .expect("the program is embedded");
    bytes[at + 100] ^= 0x20;
    let corrupt = dir.join("corrupt");
    std::fs::write(&corrupt, &bytes).unwrap();
    std::fs::copy(
        exe.with_extension("safetensors"),
        corrupt.with_extension("safetensors"),
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&corrupt, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    fails(
        Command::new(&corrupt).arg("info"),
        "embedded program is corrupt",
    );

    // Weights and checkpoints.
    let truncated = dir.join("truncated.safetensors");
    let w = std::fs::read(exe.with_extension("safetensors")).unwrap();
    std::fs::write(&truncated, &w[..w.len() / 2]).unwrap();
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    std::fs::write(broken.join("trainer_state.json"), "{\"global_step\": 1}").unwrap();
    fails(
        &mut train_cmd(&["--resume", broken.to_str().unwrap()]),
        "not a valid safetensors file",
    );
    fails(
        &mut train_cmd(&["--resume", dir.to_str().unwrap()]),
        "trainer_state.json",
    );
    fails(
        &mut train_cmd(&["--weights", truncated.to_str().unwrap()]),
        "truncated.safetensors",
    );
    let other = examples()
        .into_iter()
        .find(|e| e.name == "gpt2-dynamo")
        .unwrap();
    let gpt2 = dir.join("gpt2");
    compile(&other, &gpt2, &[]);
    let gpt2_train = dir.join("gpt2-train");
    compile(&other, &gpt2_train, ADAMW);
    let gpt2_dir = dir.join("gpt2-ckpt");
    ok(Command::new(&gpt2_train)
        .args([
            "train",
            "--data",
            input_file(&other, "input_ids").to_str().unwrap(),
        ])
        .args(["--steps", "1", "--save", gpt2_dir.to_str().unwrap()]));
    fails(
        &mut train_cmd(&["--resume", gpt2_dir.to_str().unwrap()]),
        "is missing: the directory was not saved for this program",
    );
    fails(
        &mut train_cmd(&["--weights", dir.join("nope.safetensors").to_str().unwrap()]),
        "nope.safetensors",
    );

    // Data and arguments.
    let floats = dir.join("floats.npy");
    memc::io::write_tensor(
        &floats,
        &memc_ir::Tensor::from_f64(memc_ir::DType::F32, vec![2, 16], &[0.0; 32]),
    )
    .unwrap();
    fails(
        Command::new(&exe).arg("train").arg("--data").arg(&floats),
        "must be a non-empty integer array",
    );
    let huge = dir.join("huge.npy");
    memc::io::write_tensor(
        &huge,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![2, 16], &[1_000_000; 32]),
    )
    .unwrap();
    fails(
        Command::new(&exe).arg("train").arg("--data").arg(&huge),
        "outside the model's vocabulary",
    );
    let short = dir.join("short.npy");
    memc::io::write_tensor(
        &short,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![2, 8], &[1; 16]),
    )
    .unwrap();
    fails(
        Command::new(&exe).arg("train").arg("--data").arg(&short),
        "compiled for 16",
    );
    fails(
        &mut train_cmd(&["--backend", "cuda"]),
        "compiled without PTX kernels: recompile with memc compile --target all",
    );
    fails(
        &mut train_cmd(&["--backend", "tpu"]),
        "expected cpu or cuda",
    );
    // An executable with PTX kernels on a machine without a GPU driver.
    let both = dir.join("llama-all");
    compile(&ex, &both, &[ADAMW, &["--target", "all"]].concat());
    assert!(ok(Command::new(&both).arg("info")).contains("kind: training"));
    if memc_runtime::cuda::probe().is_err() {
        fails(
            Command::new(&both)
                .arg("train")
                .args(data)
                .args(["--backend", "cuda"]),
            "no usable CUDA driver",
        );
    }
    fails(&mut train_cmd(&["--steps", "many"]), "not a valid number");
    fails(
        &mut train_cmd(&["--bogus"]),
        "unexpected argument `--bogus`",
    );
    fails(Command::new(&exe).arg("fly"), "unknown command `fly`");
    fails(
        Command::new(&exe)
            .arg("infer")
            .arg("--out")
            .arg(dir.join("o")),
        "compiled for training",
    );
    fails(
        Command::new(&gpt2).arg("train").arg("--data").arg(&ids),
        "compiled for inference",
    );
    fails(
        Command::new(&gpt2)
            .arg("infer")
            .arg("--out")
            .arg(dir.join("o"))
            .arg("--input")
            .arg(format!("input_ids={}", short.display())),
        "input `input_ids` is i64[2x16]",
    );
}

#[test]
fn reversible_executables_report_their_drift() {
    // `--reversible --rev-check` compiled into an executable: every step's line carries one
    // drift per layer; in bf16 the drift passes the default threshold and the run warns.
    let dir = scratch("reversible");
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    for (dtype, warns) in [("f32", false), ("bf16", true)] {
        let exe = dir.join(format!("llama-{dtype}"));
        compile(
            &ex,
            &exe,
            &[
                "--train",
                "--reversible",
                "meft3",
                "--rev-check",
                "--dtype",
                dtype,
            ],
        );
        let mut cmd = Command::new(&exe);
        cmd.arg("train")
            .arg("--data")
            .arg(input_file(&ex, "input_ids"))
            .args(["--steps", "2", "--lr", "1e-2"]);
        let out = run(&mut cmd);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let d = v["rev_drift"].as_array().unwrap();
            assert_eq!(d.len(), 2, "{line}");
            if !warns {
                assert!(d.iter().all(|x| x.as_f64().unwrap() < 1e-3), "{line}");
            }
        }
        assert_eq!(
            stderr.contains("reconstruction drift past"),
            warns,
            "{dtype}: {stderr}"
        );
    }
}

/// Every tensor of a safetensors file (weights or a checkpoint) as f64 values, by name.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let values = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("{name}: {d:?}"),
            };
            (name, values)
        })
        .collect()
}

/// Token ids `[rows, seq]` in 0..128 as an int64 `.npy` file.
fn write_ids(path: &Path, rows: usize, seq: usize) {
    let ids: Vec<i64> = (0..rows * seq)
        .map(|i| ((i * 37 + 11) % 128) as i64)
        .collect();
    memc_runtime::npy::write(
        path,
        &memc_runtime::npy::NpyArray {
            dtype: memc_runtime::npy::NpyDtype::I64,
            shape: vec![rows, seq],
            data: ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
    )
    .unwrap();
}

#[test]
fn pipelined_executables_train_like_the_whole_batch_for_every_schedule() {
    let dir = scratch("pipelined");
    let data = dir.join("ids.npy");
    write_ids(&data, 8, 16);
    let memc_compile = |model: &str, out: &Path, extra: &[&str]| {
        let mut cmd = Command::new(bin_dir().join("memc"));
        cmd.arg("compile")
            .arg(memc_tests::root().join(model))
            .args(["--shape", "input_ids=8x16", "--train", "-o"])
            .arg(out)
            .args(extra);
        ok(&mut cmd);
    };
    let run_train = |exe: &Path, extra: &[&str]| -> Vec<serde_json::Value> {
        ok(Command::new(exe)
            .arg("train")
            .arg("--data")
            .arg(&data)
            .args(extra))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
    };
    // Gradients: one SGD step with lr 1 moves each weight by minus its gradient (the mean over
    // the microbatches for a pipelined step); the checkpoints after it must agree.
    let llama = "examples/models/depth/llama-L4.onnx";
    let plain = dir.join("plain");
    memc_compile(llama, &plain, &["--optimizer", "sgd"]);
    let w0 = tensors(&plain.with_extension("safetensors"));
    let sgd_step = |exe: &Path, name: &str| {
        let ckpt = dir.join(format!("{name}.ckpt"));
        let lines = run_train(
            exe,
            &[
                "--steps",
                "1",
                "--lr",
                "1",
                "--save",
                ckpt.to_str().unwrap(),
            ],
        );
        (
            lines[0]["loss"].as_f64().unwrap(),
            tensors(&ckpt.join("model.safetensors")),
        )
    };
    let (loss, want) = sgd_step(&plain, "plain");
    // Two stages, four microbatches.
    let piped = |optimizer: &'static str, schedule: &'static str| {
        [
            "--optimizer",
            optimizer,
            "--pipeline-stages",
            "2",
            "--microbatches",
            "4",
            "--schedule",
            schedule,
        ]
    };
    for schedule in memc_passes::pipeline::ScheduleKind::ALL.map(|k| k.name()) {
        let exe = dir.join(schedule);
        memc_compile(llama, &exe, &piped("sgd", schedule));
        let info = ok(Command::new(&exe).arg("info"));
        assert!(
            info.contains(&format!(
                "pipeline: {schedule} on 2 stages × 1 data-parallel replicas, 4 microbatches"
            )),
            "{info}"
        );
        let (got_loss, got) = sgd_step(&exe, schedule);
        assert!(
            (got_loss - loss).abs() <= 1e-5 * loss.abs(),
            "{schedule}: loss {got_loss} vs {loss}"
        );
        for (name, w) in &want {
            if !w0.contains_key(name) {
                continue; // optimizer state
            }
            let g = &got[name];
            let step: f64 = w
                .iter()
                .zip(&w0[name])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            let err: f64 = w
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                err <= 1e-4 * step.max(1e-6),
                "{schedule}: gradient of `{name}`: {err} off a step of {step}"
            );
        }
    }
    // AdamW over several steps, a tied head (GPT-2: its embedding's gradient summed over the
    // first and last chunks after the passes), checkpoints that resume exactly.
    for (model, schedule) in [
        (llama, "v-half"),
        ("examples/models/gpt2-dynamo.onnx", "zb-h1"),
    ] {
        let name = model.rsplit('/').next().unwrap().replace(".onnx", "");
        let plain = dir.join(format!("{name}-adamw"));
        memc_compile(model, &plain, &["--optimizer", "adamw"]);
        let exe = dir.join(format!("{name}-{schedule}"));
        memc_compile(model, &exe, &piped("adamw", schedule));
        let lr = ["--lr", "1e-2"];
        let want = losses(&run_train(&plain, &[&lr[..], &["--steps", "4"]].concat()));
        let ckpt = dir.join(format!("{name}.resume"));
        let first = run_train(
            &exe,
            &[&lr[..], &["--steps", "2", "--save", ckpt.to_str().unwrap()]].concat(),
        );
        assert_eq!(first[0]["pipeline"]["schedule"], schedule);
        let resumed = run_train(
            &exe,
            &[
                &lr[..],
                &["--steps", "2", "--resume", ckpt.to_str().unwrap()],
            ]
            .concat(),
        );
        let got: Vec<f64> = losses(&first).into_iter().chain(losses(&resumed)).collect();
        assert!(
            max_rel(&got, &want) <= 1e-5,
            "{name} {schedule}: {got:?} vs {want:?}"
        );
        fails(
            Command::new(&exe)
                .args(["train", "--backend", "cuda", "--data"])
                .arg(&data),
            "compiled without PTX kernels: recompile with memc compile --target all",
        );
        // With device code (one PTX module for every pass): the cpu backend trains as
        // before, bit for bit; the cuda backend needs a GPU (scripts/gpu-check.sh runs it).
        let both = dir.join(format!("{name}-{schedule}-all"));
        memc_compile(
            model,
            &both,
            &[&piped("adamw", schedule)[..], &["--target", "all"]].concat(),
        );
        let again = run_train(&both, &[&lr[..], &["--steps", "2"]].concat());
        assert_eq!(
            losses(&again),
            losses(&first),
            "{name} {schedule} --target all"
        );
        if memc_runtime::cuda::probe().is_err() {
            fails(
                Command::new(&both)
                    .args(["train", "--backend", "cuda", "--data"])
                    .arg(&data),
                "no usable CUDA driver",
            );
        }
    }
}

/// Work split across threads never changes results: one executable trains to the same losses,
/// bit for bit, on one thread and on two, at a size where the kernels split into row ranges,
/// attention runs in several query and key blocks and the GEMMs are threaded.
#[test]
fn thread_count_does_not_change_losses() {
    let dir = scratch("threads");
    let data = dir.join("ids.npy");
    write_ids(&data, 8, 128);
    let exe = dir.join("llama");
    let mut cmd = Command::new(bin_dir().join("memc"));
    cmd.arg("compile")
        .arg(memc_tests::root().join("examples/models/llama-dynamo.onnx"))
        .args([
            "--shape",
            "input_ids=8x128",
            "--train",
            "--optimizer",
            "adamw",
            "-o",
        ])
        .arg(&exe);
    ok(&mut cmd);
    let run = |threads: &str| {
        let out = ok(Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(&data)
            .args(["--steps", "3", "--threads", threads]));
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|l| l["loss"].as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let (one, two) = (run("1"), run("2"));
    assert_eq!(one.len(), 3);
    assert_eq!(one, two, "losses on 1 and 2 threads");
    assert_eq!(run("2"), two, "losses run to run");
}

/// The kernel cache: a second compile of the same model takes every kernel from the cache and
/// emits the same executable; an unusable cache directory (a file in its place) or a disabled
/// cache compiles everything and still emits it.
#[test]
fn kernel_cache_reuses_every_kernel_and_changes_nothing() {
    let dir = scratch("kernel-cache");
    let cache = dir.join("cache");
    let model = memc_tests::root().join("examples/models/llama-dynamo.onnx");
    let compile = |out: &Path, cache: &Path| -> String {
        let o = run(Command::new(bin_dir().join("memc"))
            .env("MEMC_KERNEL_CACHE", cache)
            .arg("compile")
            .arg(&model)
            .args(["--shape", "input_ids=2x16", "--train", "-o"])
            .arg(out));
        let stderr = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(o.status.success(), "{stderr}");
        stderr
    };
    let cached = |stderr: &str| -> (usize, usize) {
        let (_, rest) = stderr.split_once("bytes: ").expect(stderr);
        let (n, rest) = rest.split_once(" generated kernels (").expect(stderr);
        let (hits, _) = rest.split_once(" from the kernel cache").expect(stderr);
        (n.parse().unwrap(), hits.parse().unwrap())
    };
    let (cold, warm) = (dir.join("cold"), dir.join("warm"));
    let (n, hits) = cached(&compile(&cold, &cache));
    assert!(
        n > 0 && hits == 0,
        "a fresh cache holds nothing: {n} kernels, {hits} hits"
    );
    let entries = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(entries, n, "one object per kernel in the cache");
    assert_eq!(cached(&compile(&warm, &cache)), (n, n));
    assert_eq!(std::fs::read(&cold).unwrap(), std::fs::read(&warm).unwrap());
    // A file where the cache directory should be, and the cache turned off.
    let blocked = dir.join("blocked");
    std::fs::write(&blocked, b"not a directory").unwrap();
    for (cache, out) in [(blocked.as_path(), "b"), (Path::new("off"), "c")] {
        let out = dir.join(out);
        assert_eq!(cached(&compile(&out, cache)), (n, 0));
        assert_eq!(std::fs::read(&cold).unwrap(), std::fs::read(&out).unwrap());
    }
    assert!(
        std::fs::read_dir(&dir).unwrap().flatten().all(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            !name.contains(".tmp") && !name.ends_with(".o")
        }),
        "no temporary objects left beside the executables"
    );
}

/// Compiles `model` (from the repository root) at 8 × 16 tokens into the pipelined
/// executable `exe` training with AdamW: `stages` stages, `m` microbatches, `d` data-parallel
/// replicas.
fn compile_pipelined(model: &str, exe: &Path, schedule: &str, stages: usize, m: usize, d: usize) {
    ok(Command::new(bin_dir().join("memc"))
        .arg("compile")
        .arg(memc_tests::root().join(model))
        .args([
            "--shape",
            "input_ids=8x16",
            "--train",
            "--optimizer",
            "adamw",
            "-o",
        ])
        .arg(exe)
        .args(["--pipeline-stages", &stages.to_string()])
        .args(["--microbatches", &m.to_string()])
        .args(["--data-parallel", &d.to_string(), "--schedule", schedule]));
}

/// Each rank's planned bytes as `OUT info` states them: [total, weights, optimizer state].
fn planned(exe: &Path) -> Vec<[u64; 3]> {
    let info = ok(Command::new(exe).arg("info"));
    info.lines()
        .filter(|l| l.starts_with("planned, rank "))
        .map(|l| {
            let (_, rest) = l.split_once("): ").unwrap();
            let (total, rest) = rest.split_once(" bytes (weights ").unwrap();
            let (weights, rest) = rest.split_once(", optimizer state ").unwrap();
            let (state, _) = rest.split_once(',').unwrap();
            [total, weights, state].map(|x| x.parse().unwrap())
        })
        .collect()
}

/// `mpirun -n P OUT train ...`: the ranks of a pipelined executable talk over MPI (libmpi
/// loaded at run time; `scripts/setup.sh` installs Open MPI), rank 0 prints the single-process
/// losses within 1e-6 (Llama V-Half, GPT-2's tied head under ZB-H1, Llama 1F1B on 3 ranks),
/// and a job of another size than the stages is one error line.
#[test]
fn pipelined_executables_run_under_mpirun() {
    let mpirun = ["mpirun", "/usr/bin/mpirun"]
        .into_iter()
        .find(|m| {
            Command::new(m)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("mpirun is missing: run scripts/setup.sh (it installs Open MPI)");
    let dir = scratch("mpirun");
    let data = dir.join("ids.npy");
    // Three batches: steps read different rows (a resume must find its place).
    write_ids(&data, 24, 16);
    // `mpirun -n N EXE train ... --steps S --lr 1e-2` (callers add to it).
    let train = |n: usize, exe: &Path, steps: &str| {
        let mut c = Command::new(mpirun);
        // Root in containers; more ranks than cores; ranks sharing cores yield when idle.
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--mca",
            "mpi_yield_when_idle",
            "1",
        ])
        .args(["-n", &n.to_string()])
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .arg(exe)
        .args(["train", "--threads", "1", "--data"])
        .arg(&data)
        .args(["--steps", steps, "--lr", "1e-2"]);
        c
    };
    let launch = |n: usize, exe: &Path, steps: &str| train(n, exe, steps).output().unwrap();
    for (model, schedule, stages) in [
        ("examples/models/depth/llama-L4.onnx", "v-half", 2usize),
        ("examples/models/gpt2-dynamo.onnx", "zb-h1", 2),
        ("examples/models/depth/llama-L4.onnx", "1f1b", 3),
    ] {
        let exe = dir.join(format!("{schedule}-{stages}"));
        compile_pipelined(model, &exe, schedule, stages, 4, 1);
        let want = losses(&json_lines(&ok(Command::new(&exe)
            .args(["train", "--threads", "1", "--data"])
            .arg(&data)
            .args(["--steps", "3", "--lr", "1e-2"]))));
        let out = launch(stages, &exe, "3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{model} {schedule}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Only rank 0 prints (mpirun gathers every rank's standard output).
        let lines: Vec<serde_json::Value> = json_lines(&stdout);
        assert_eq!(lines.len(), 3, "{stdout}");
        assert_eq!(lines[0]["pipeline"]["world_size"], stages);
        let got = losses(&lines);
        assert!(
            max_rel(&got, &want) <= 1e-6,
            "{model} {schedule}: {got:?} vs {want:?}"
        );
    }
    let out = launch(3, &dir.join("v-half-2"), "1");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("the MPI job has 3 ranks, but the program has 2 pipeline stages"),
        "{stderr}"
    );
    // Pipeline × data parallel: P × D ranks, each replica on its slice of every batch, the
    // gradients averaged across replicas: the losses of the whole batch in one process
    // (the same microbatch size) within 1e-6; a checkpoint after 2 steps resumes to the same
    // third step; a single process of a replicated program is one error line.
    for (model, schedule, stages, replicas) in [
        (
            "examples/models/depth/llama-L4.onnx",
            "v-half",
            2usize,
            2usize,
        ),
        ("examples/models/depth/llama-L4.onnx", "1f1b", 1, 2),
        ("examples/models/gpt2-dynamo.onnx", "zb-h1", 2, 2),
    ] {
        let compile = |name: &str, m: usize, d: usize| {
            let exe = dir.join(name);
            compile_pipelined(model, &exe, schedule, stages, m, d);
            exe
        };
        let tag = format!("{schedule}-{stages}x{replicas}");
        let whole = compile(&format!("{tag}-whole"), 2 * replicas, 1);
        let dp = compile(&tag, 2, replicas);
        let want = losses(&json_lines(&ok(Command::new(&whole)
            .args(["train", "--threads", "1", "--data"])
            .arg(&data)
            .args(["--steps", "3", "--lr", "1e-2"]))));
        let out = launch(stages * replicas, &dp, "3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{tag}: {stderr}");
        // Each rank allocates exactly its planned share (`OUT info`, the compile report):
        // its stage's weights, and with replicas a share of the stage's optimizer state that
        // the replicas' shares add up to (ZeRO stage 1).
        let plan = planned(&dp);
        assert_eq!(plan.len(), stages * replicas);
        for (r, p) in plan.iter().enumerate() {
            let line = format!(
                "rank {r} (stage {} of replica {}): {} bytes allocated, {} planned",
                r % stages,
                r / stages,
                p[0],
                p[0]
            );
            assert!(stderr.contains(&line), "{tag}: no `{line}` in {stderr}");
        }
        let one = planned(&whole);
        for s in 0..stages {
            let state: u64 = (0..replicas).map(|k| plan[k * stages + s][2]).sum();
            assert_eq!(
                state, one[s][2],
                "{tag}: stage {s}'s optimizer state over replicas"
            );
            for k in 0..replicas {
                assert_eq!(
                    plan[k * stages + s][1],
                    one[s][1],
                    "{tag}: stage {s}'s weights"
                );
                if replicas > 1 {
                    assert!(
                        plan[k * stages + s][2] < one[s][2],
                        "{tag}: a shard of the state"
                    );
                }
            }
        }
        let lines: Vec<serde_json::Value> = json_lines(&stdout);
        assert_eq!(lines.len(), 3, "{stdout}");
        assert_eq!(lines[0]["pipeline"]["data_parallel"], replicas);
        assert_eq!(lines[0]["tokens"], 8 * 16);
        let got = losses(&lines);
        assert!(max_rel(&got, &want) <= 1e-6, "{tag}: {got:?} vs {want:?}");
        if stages == 2 && schedule == "v-half" {
            let ckpt = dir.join(format!("{tag}-ckpt"));
            ok(train(4, &dp, "2").arg("--save").arg(&ckpt));
            let resumed = json_lines(&ok(train(4, &dp, "1").arg("--resume").arg(&ckpt)));
            assert_eq!(resumed[0]["step"], 3);
            let r = losses(&resumed)[0];
            assert!(
                (r - got[2]).abs() <= 1e-6 * got[2].abs(),
                "{tag}: resumed {r} vs {}",
                got[2]
            );
            // Saved as Hugging Face shards, one per rank that saves something, with indexes
            // naming every tensor; a single process resumes from them to the same step.
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(ckpt.join("model.safetensors.index.json")).unwrap(),
            )
            .unwrap();
            let map = index["weight_map"].as_object().unwrap();
            assert!(map.contains_key("lm_head.weight"), "{index}");
            let files: std::collections::BTreeSet<&str> =
                map.values().map(|v| v.as_str().unwrap()).collect();
            assert_eq!(
                files.into_iter().collect::<Vec<_>>(),
                [
                    "model-00001-of-00002.safetensors",
                    "model-00002-of-00002.safetensors"
                ]
            );
            let optimizer = std::fs::read_dir(&ckpt)
                .unwrap()
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("optimizer-0000")
                })
                .count();
            assert_eq!(optimizer, 4, "each rank saves its optimizer shard");
            assert!(!ckpt.join("model.safetensors").exists());
            let single: Vec<serde_json::Value> = json_lines(&ok(Command::new(&whole)
                .args(["train", "--threads", "1", "--data"])
                .arg(&data)
                .args(["--steps", "1", "--lr", "1e-2", "--resume"])
                .arg(&ckpt)));
            let r = losses(&single)[0];
            assert!(
                (r - got[2]).abs() <= 1e-6 * got[2].abs(),
                "{tag}: one process resumed {r} vs {}",
                got[2]
            );
            // A shard only one rank reads holds a tensor of the wrong shape: that rank fails
            // naming it and tells the others, so the job ends at once (they would otherwise
            // wait MEMC_RANK_TIMEOUT for it).
            let index: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(ckpt.join("optimizer.safetensors.index.json")).unwrap(),
            )
            .unwrap();
            let name = "adamw.exp_avg.lm_head.weight";
            let file = ckpt.join(index["weight_map"][name].as_str().unwrap());
            let bytes = std::fs::read(&file).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let short = [0u8; 12];
            let tensors: Vec<(String, safetensors::tensor::TensorView)> = st
                .tensors()
                .into_iter()
                .map(|(n, t)| match n == name {
                    true => (
                        n,
                        safetensors::tensor::TensorView::new(t.dtype(), vec![3], &short).unwrap(),
                    ),
                    false => (n, t),
                })
                .collect();
            safetensors::serialize_to_file(tensors, None, &file).unwrap();
            let started = std::time::Instant::now();
            let out = train(4, &dp, "1")
                .arg("--resume")
                .arg(&ckpt)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success()
                    && stderr.contains(&format!("tensor `{name}` is F32[3]"))
                    && started.elapsed() < std::time::Duration::from_secs(60),
                "{tag}: {stderr}"
            );
            let single = run(Command::new(&dp)
                .args(["train", "--data"])
                .arg(&data)
                .args(["--steps", "1"]));
            let err = String::from_utf8_lossy(&single.stderr);
            assert!(
                single.status.code() == Some(2)
                    && err.contains("compiled for 2 data-parallel replicas of 2 pipeline stages: launch 4 ranks"),
                "{err}"
            );
        }
    }
    // A rank that stops sending (rank 1 runs 1 step of 3, then waits to finalise): rank 0
    // names it once MEMC_RANK_TIMEOUT passes, and the job ends; no hang.
    let exe = dir.join("v-half-2");
    let started = std::time::Instant::now();
    let out = Command::new(mpirun)
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-x",
            "MEMC_RANK_TIMEOUT",
        ])
        .env("MEMC_RANK_TIMEOUT", "3")
        .args(["-n", "1"])
        .arg(&exe)
        .args(["train", "--threads", "1", "--data"])
        .arg(&data)
        .args(["--steps", "3", ":", "-n", "1"])
        .arg(&exe)
        .args(["train", "--threads", "1", "--data"])
        .arg(&data)
        .args(["--steps", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("rank 0: rank 1 sent nothing for 3 s")
            && started.elapsed() < std::time::Duration::from_secs(60),
        "{stderr}"
    );
    // A rank killed mid-run (SIGKILL after 3 s of a long run): mpirun ends the job, naming
    // the rank; no hang.
    let started = std::time::Instant::now();
    let out = Command::new(mpirun)
        .args(["--allow-run-as-root", "--oversubscribe", "-n", "1"])
        .arg(&exe)
        .args(["train", "--threads", "1", "--data"])
        .arg(&data)
        .args([
            "--steps", "100000", ":", "-n", "1", "timeout", "-s", "KILL", "3",
        ])
        .arg(&exe)
        .args(["train", "--threads", "1", "--data"])
        .arg(&data)
        .args(["--steps", "100000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("process rank 1")
            && stderr.contains("signal 9")
            && started.elapsed() < std::time::Duration::from_secs(60),
        "{stderr}"
    );
}
