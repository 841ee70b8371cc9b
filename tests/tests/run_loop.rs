//! The training loop a fine-tuning run needs (issue 23), in `memc train` and emitted
//! executables alike: learning-rate schedules that follow transformers' schedulers value for
//! value (fixtures from `examples/train_fixtures.py`), epochs, shuffled data, periodic
//! checkpoints that resume exactly, a log file, and a progress bar on terminals only.

use std::path::{Path, PathBuf};
use std::process::Command;

use memc_tests::{examples, Example};

#[path = "../support/cmd.rs"]
mod cmd;
use cmd::{bin_dir, compile_exe, fails, ok, run, scratch};

fn example(name: &str) -> Example {
    examples().into_iter().find(|e| e.name == name).unwrap()
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn field(lines: &[serde_json::Value], key: &str) -> Vec<f64> {
    lines.iter().map(|l| l[key].as_f64().unwrap()).collect()
}

fn fixture(ex: &Example, key: &str) -> Vec<f64> {
    memc_tests::train_reference(ex)[key]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `{key}` in train_ref.json", ex.name))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// The fixture's masked labels (`examples/train_fixtures.py`'s `masked_labels`), by row.
fn fixture_labels(ex: &Example) -> Vec<Vec<i64>> {
    memc_tests::train_reference(ex)["masked_labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        })
        .collect()
}

fn ids(ex: &Example) -> PathBuf {
    ex.path.with_extension("").join("inputs/input_ids.npy")
}

fn worst_rel(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-30))
        .fold(0.0, f64::max)
}

const SCHEDULES: [(&str, &str); 2] = [
    ("linear", "adamw_linear_warmup"),
    ("cosine", "adamw_cosine_warmup"),
];

/// 5 AdamW steps (lr 1e-3, weight decay 0.01) under each schedule with 2 warmup steps, on the
/// example's batch: the rate of every step equals transformers' (1e-12) and the losses follow
/// PyTorch's within 1e-5 on the reference backend and 1e-4 on the cpu backend and in
/// executables. Llama (untied head) and GPT-2 (tied head).
#[test]
fn lr_schedules_follow_transformers() {
    let dir = scratch("schedules");
    for name in ["llama-dynamo", "gpt2-dynamo"] {
        let ex = example(name);
        let exe = dir.join(name);
        compile_exe(&ex.path, &exe, &["--train", "--optimizer", "adamw"]);
        for (schedule, key) in SCHEDULES {
            let want = fixture(&ex, key);
            let want_lr = fixture(&ex, &format!("{key}_lrs"));
            let flags = [
                "--steps",
                "5",
                "--lr",
                "1e-3",
                "--weight-decay",
                "0.01",
                "--lr-schedule",
                schedule,
                "--warmup-steps",
                "2",
            ];
            let mut runs: Vec<(String, Vec<serde_json::Value>, f64)> = vec![];
            for backend in ["ref", "cpu"] {
                let out = ok(Command::new(bin_dir().join("memc"))
                    .arg("train")
                    .arg(&ex.path)
                    .args(["--shape", "input_ids=2x16", "--optimizer", "adamw"])
                    .arg("--data")
                    .arg(ids(&ex))
                    .args(["--backend", backend])
                    .args(flags));
                let tol = if backend == "ref" { 1e-5 } else { 1e-4 };
                runs.push((
                    format!("memc train --backend {backend}"),
                    json_lines(&out),
                    tol,
                ));
            }
            let out = ok(Command::new(&exe)
                .arg("train")
                .arg("--data")
                .arg(ids(&ex))
                .args(flags));
            runs.push(("executable".into(), json_lines(&out), 1e-4));
            for (who, lines, tol) in runs {
                let lr = worst_rel(&field(&lines, "lr")[2..], &want_lr[2..]);
                assert!(
                    lr <= 1e-12 && field(&lines, "lr")[0] == 0.0,
                    "{name} {schedule} {who}: rates {:?} vs {want_lr:?}",
                    field(&lines, "lr")
                );
                let err = worst_rel(&field(&lines, "loss"), &want);
                eprintln!("{name} {schedule:<7} {who:<28} losses within {err:.1e} of PyTorch's");
                assert!(
                    err <= tol,
                    "{name} {schedule} {who}: {:?} vs {want:?}",
                    field(&lines, "loss")
                );
            }
        }
    }
}

fn write_rows(path: &Path, rows: usize, vocab: i64) {
    let v: Vec<i64> = (0..rows * 16)
        .map(|i| (i as i64 * 7919 + 13) % vocab)
        .collect();
    memc::io::write_tensor(
        path,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![rows, 16], &v),
    )
    .unwrap();
}

/// A run with shuffled epochs, a cosine schedule and periodic checkpoints: `--resume` from a
/// checkpoint (the newest complete one of the directory, an interrupted one passed over)
/// continues bit for bit; the oldest checkpoints go; `--epochs` sets the run's length;
/// `--log` gets every line (a resumed run adds to it); flags that would change the run on
/// resume, and flags that make no sense together, are one clear error each.
#[test]
fn periodic_checkpoints_resume_shuffled_scheduled_runs_exactly() {
    let dir = scratch("run-loop");
    let ex = example("llama-dynamo");
    let exe = dir.join("llama");
    compile_exe(&ex.path, &exe, &["--train", "--optimizer", "adamw"]);
    let data = dir.join("ids.npy");
    write_rows(&data, 7, 128);
    let save = dir.join("run");
    let log = dir.join("log.jsonl");
    let base = |extra: &[&str]| {
        let mut c = Command::new(&exe);
        c.arg("train").arg("--data").arg(&data).args([
            "--lr",
            "1e-2",
            "--shuffle",
            "--seed",
            "5",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
        ]);
        c.args(extra);
        c
    };
    // 2 epochs of 7 rows, 2 rows a step: 7 steps.
    let whole = json_lines(&ok(base(&["--epochs", "2"])
        .arg("--save")
        .arg(&save)
        .args(["--save-every", "2", "--keep-last", "2"])
        .arg("--log")
        .arg(&log)));
    assert_eq!(whole.len(), 7);
    assert_eq!(
        json_lines(&std::fs::read_to_string(&log).unwrap()),
        whole,
        "--log has every line"
    );
    let kept: Vec<String> = memc_runtime::weights::checkpoints(&save)
        .into_iter()
        .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept, ["checkpoint-6", "checkpoint-7"]);
    // An unshuffled run reads other rows: the shuffle is real.
    let plain = json_lines(&ok(Command::new(&exe)
        .arg("train")
        .arg("--data")
        .arg(&data)
        .args([
            "--lr",
            "1e-2",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
            "--epochs",
            "2",
        ])));
    assert_ne!(field(&plain, "loss"), field(&whole, "loss"));
    // Resume from step 6 for the last epoch's last step: bit for bit.
    let rest = json_lines(&ok(base(&[
        "--epochs",
        "2",
        "--log",
        log.to_str().unwrap(),
    ])
    .arg("--resume")
    .arg(save.join("checkpoint-6"))));
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["loss"], whole[6]["loss"]);
    assert_eq!(rest[0]["lr"], whole[6]["lr"]);
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 8);
    // A save cut short (no trainer_state.json) is passed over: --resume DIR takes step 7,
    // where the schedule ended.
    let cut = save.join("checkpoint-9");
    std::fs::create_dir_all(&cut).unwrap();
    std::fs::write(cut.join("model.safetensors"), b"partial").unwrap();
    fails(
        base(&["--steps", "1"]).arg("--resume").arg(&save),
        "schedule ended at step 7",
    );
    // Differing flags on resume.
    fails(
        Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(&data)
            .args([
                "--lr-schedule",
                "linear",
                "--warmup-steps",
                "1",
                "--shuffle",
                "--seed",
                "5",
            ])
            .arg("--resume")
            .arg(save.join("checkpoint-6")),
        "the run was trained with --lr-schedule cosine --warmup-steps 1",
    );
    fails(
        Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(&data)
            .args(["--lr-schedule", "cosine", "--warmup-steps", "1"])
            .arg("--resume")
            .arg(save.join("checkpoint-6")),
        "shuffled (--shuffle --seed 5)",
    );
    fails(
        base(&["--epochs", "2"])
            .arg("--resume")
            .arg(dir.join("nothing")),
        "no complete checkpoint here",
    );
    // Another length for the decaying schedule, or another batch (so other rows).
    fails(
        base(&["--epochs", "3"])
            .arg("--resume")
            .arg(save.join("checkpoint-6")),
        "schedule ends at step 7, --epochs 3 at step 11",
    );
    let one_row = dir.join("llama-1x16");
    ok(Command::new(bin_dir().join("memc"))
        .arg("compile")
        .arg(&ex.path)
        .args([
            "--shape",
            "input_ids=1x16",
            "--train",
            "--optimizer",
            "adamw",
            "-o",
        ])
        .arg(&one_row));
    fails(
        Command::new(&one_row)
            .arg("train")
            .arg("--data")
            .arg(&data)
            .args([
                "--lr",
                "1e-2",
                "--shuffle",
                "--seed",
                "5",
                "--lr-schedule",
                "cosine",
            ])
            .args(["--warmup-steps", "1", "--steps", "1"])
            .arg("--resume")
            .arg(save.join("checkpoint-6")),
        "the run read 12 rows in 6 steps, this one reads 1 a step",
    );
    // Flags that make no sense together.
    let cases: [(&[&str], &str); 6] = [
        (&["--steps", "2", "--epochs", "1"], "pass one"),
        (&["--save-every", "2"], "pass --save DIR too"),
        (&["--seed", "1"], "pass --shuffle too"),
        (
            &["--lr-schedule", "step"],
            "expected constant, linear or cosine",
        ),
        (&["--epochs", "0"], "--epochs must be at least 1"),
        (&["--shuffle=yes"], "--shuffle takes no value"),
    ];
    for (flags, want) in cases {
        fails(
            Command::new(&exe)
                .arg("train")
                .arg("--data")
                .arg(&data)
                .args(flags),
            want,
        );
    }
    // memc train reads the same flags and runs the same loop: its checkpoints resume the
    // executable's run (same program, same data order).
    let out = ok(Command::new(bin_dir().join("memc"))
        .arg("train")
        .arg(&ex.path)
        .args([
            "--shape",
            "input_ids=2x16",
            "--optimizer",
            "adamw",
            "--backend",
            "cpu",
        ])
        .arg("--data")
        .arg(&data)
        .args([
            "--lr",
            "1e-2",
            "--shuffle",
            "--seed",
            "5",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
            "--epochs",
            "2",
        ])
        .arg("--resume")
        .arg(save.join("checkpoint-6")));
    let memc_rest = json_lines(&out);
    assert_eq!(memc_rest.len(), 1);
    let (a, b) = (
        memc_rest[0]["loss"].as_f64().unwrap(),
        whole[6]["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-5 * b.abs(), "{a} vs {b}");
    let o = run(Command::new(bin_dir().join("memc"))
        .arg("train")
        .arg(&ex.path)
        .args(["--shape", "input_ids=2x16", "--steps", "2", "--epochs", "1"])
        .arg("--data")
        .arg(&data));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--epochs"));
}

/// The progress bar is drawn on a terminal's stderr (a pseudo-terminal here) and never into
/// a pipe, where the JSON lines stay alone on stdout.
#[test]
fn progress_bar_on_terminals_only() {
    let dir = scratch("progress");
    let ex = example("llama-dynamo");
    let exe = dir.join("llama");
    compile_exe(&ex.path, &exe, &["--train", "--optimizer", "adamw"]);
    let data = dir.join("ids.npy");
    write_rows(&data, 4, 128);
    let piped = run(Command::new(&exe)
        .arg("train")
        .arg("--data")
        .arg(&data)
        .args(["--steps", "3"]));
    assert!(piped.status.success());
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(!err.contains("ETA") && !err.contains("step 3/3"), "{err}");
    // Python's pty module gives the executable a terminal for all three streams.
    let script =
        "import os, pty, sys\nsys.exit(os.waitstatus_to_exitcode(pty.spawn(sys.argv[1:])))\n";
    let tty = ok(Command::new("python3")
        .args(["-c", script])
        .arg(&exe)
        .arg("train")
        .arg("--data")
        .arg(&data)
        .args(["--steps", "3"]));
    assert!(
        tty.contains("step 3/3") && tty.contains("tokens/s"),
        "{tty}"
    );
    assert_eq!(tty.matches("\"loss\":").count(), 3, "{tty}");
}

fn write_labels(path: &Path, rows: &[Vec<i64>]) {
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    memc::io::write_tensor(
        path,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![rows.len(), rows[0].len()], &flat),
    )
    .unwrap();
}

/// transformers' causal-LM loss with labels: 5 AdamW steps under the linear schedule with
/// prompt-like positions labelled −100 follow PyTorch's `model(input_ids, labels=labels)`
/// within 1e-5 on the reference backend and 1e-4 on the cpu backend and in executables
/// compiled with `--loss causal-lm` (the fused LM-head loss for Llama, its tied head for
/// GPT-2; and the unfused loss); an attention mask of the kept positions gives the same
/// losses; without `--labels` such an executable trains on the ids like `next-token-ce`.
#[test]
fn masked_labels_follow_transformers() {
    let dir = scratch("labels");
    for name in ["llama-dynamo", "gpt2-dynamo"] {
        let ex = example(name);
        let rows = fixture_labels(&ex);
        let labels = dir.join(format!("{name}-labels.npy"));
        write_labels(&labels, &rows);
        let mask = dir.join(format!("{name}-mask.npy"));
        let mask_rows: Vec<Vec<i64>> = rows
            .iter()
            .map(|r| r.iter().map(|&l| (l != -100) as i64).collect())
            .collect();
        write_labels(&mask, &mask_rows);
        // The cosine schedule with labels, on the reference backend.
        let cosine = field(
            &json_lines(&ok(Command::new(bin_dir().join("memc"))
                .arg("train")
                .arg(&ex.path)
                .args(["--optimizer", "adamw", "--backend", "ref"])
                .args(["--steps", "5", "--lr", "1e-3", "--lr-schedule", "cosine"])
                .args(["--warmup-steps", "2", "--data"])
                .arg(ids(&ex))
                .arg("--labels")
                .arg(&labels))),
            "loss",
        );
        let err = worst_rel(&cosine, &fixture(&ex, "adamw_labels_cosine_warmup"));
        assert!(err <= 1e-5, "{name} labels, cosine: {err}");
        let want = fixture(&ex, "adamw_labels_linear_warmup");
        let flags = [
            "--steps",
            "5",
            "--lr",
            "1e-3",
            "--lr-schedule",
            "linear",
            "--warmup-steps",
            "2",
        ];
        let exe = dir.join(name);
        compile_exe(
            &ex.path,
            &exe,
            &["--train", "--optimizer", "adamw", "--loss", "causal-lm"],
        );
        let mut runs: Vec<(String, String, f64)> = vec![];
        for (backend, extra) in [
            ("ref", None),
            ("cpu", None),
            ("cpu", Some("--no-fused-loss")),
        ] {
            let out = ok(Command::new(bin_dir().join("memc"))
                .arg("train")
                .arg(&ex.path)
                .args(["--shape", "input_ids=2x16", "--optimizer", "adamw"])
                .arg("--data")
                .arg(ids(&ex))
                .arg("--labels")
                .arg(&labels)
                .args(["--backend", backend])
                .args(extra)
                .args(flags));
            let tol = if backend == "ref" { 1e-5 } else { 1e-4 };
            runs.push((
                format!("memc train --backend {backend} {}", extra.unwrap_or("")),
                out,
                tol,
            ));
        }
        let exe_run = |extra: &[&str]| {
            ok(Command::new(&exe)
                .arg("train")
                .arg("--data")
                .arg(ids(&ex))
                .args(extra)
                .args(flags))
        };
        runs.push((
            "executable --labels".into(),
            exe_run(&["--labels", labels.to_str().unwrap()]),
            1e-4,
        ));
        runs.push((
            "executable --attention-mask".into(),
            exe_run(&["--attention-mask", mask.to_str().unwrap()]),
            1e-4,
        ));
        for (who, out, tol) in runs {
            let err = worst_rel(&field(&json_lines(&out), "loss"), &want);
            eprintln!("{name} {who:<36} losses within {err:.1e} of PyTorch's");
            assert!(err <= tol, "{name} {who}: {out} vs {want:?}");
        }
        // No labels: the ids are the labels (the plain next-token trajectory).
        let plain = json_lines(&exe_run(&[]));
        let err = worst_rel(&field(&plain, "loss"), &fixture(&ex, "adamw_linear_warmup"));
        assert!(err <= 1e-4, "{name} without --labels: {err}");
    }
}

/// Labels and masks that cannot be trained on are one clear error each: a program compiled
/// with the next-token loss, labels of another shape or outside the vocabulary, a batch with
/// nothing left in the loss, a mask and a padding token together.
#[test]
fn bad_labels_are_one_clear_error() {
    let dir = scratch("bad-labels");
    let ex = example("llama-dynamo");
    let plain = dir.join("plain");
    compile_exe(&ex.path, &plain, &["--train", "--optimizer", "adamw"]);
    let exe = dir.join("labelled");
    compile_exe(
        &ex.path,
        &exe,
        &["--train", "--optimizer", "adamw", "--loss", "causal-lm"],
    );
    let good = dir.join("good.npy");
    write_labels(&good, &[vec![5; 16], vec![7; 16]]);
    let train = |e: &Path, extra: &[&str]| {
        let mut c = Command::new(e);
        c.arg("train").arg("--data").arg(ids(&ex)).args(extra);
        c
    };
    fails(
        &mut train(&plain, &["--labels", good.to_str().unwrap()]),
        "recompile with --loss causal-lm",
    );
    fails(
        &mut train(&plain, &["--pad-id", "0"]),
        "recompile with --loss causal-lm",
    );
    let short = dir.join("short.npy");
    write_labels(&short, &[vec![5; 8], vec![7; 8]]);
    fails(
        &mut train(&exe, &["--labels", short.to_str().unwrap()]),
        "one value per token",
    );
    let outside = dir.join("outside.npy");
    let mut row = vec![5; 16];
    row[3] = 4096;
    write_labels(&outside, &[row, vec![7; 16]]);
    fails(
        &mut train(&exe, &["--labels", outside.to_str().unwrap()]),
        "4096 at row 0, column 3 is not a token id in 0..256 or -100",
    );
    let none = dir.join("none.npy");
    let mut r0 = vec![-100; 16];
    r0[0] = 3; // the first column is never a target
    write_labels(&none, &[r0, vec![-100; 16]]);
    fails(
        &mut train(&exe, &["--labels", none.to_str().unwrap()]),
        "step 1: no position of its 2 rows is left in the loss",
    );
    fails(
        &mut train(
            &exe,
            &["--attention-mask", good.to_str().unwrap(), "--pad-id", "0"],
        ),
        "pass one",
    );
    let bad_mask = dir.join("bad-mask.npy");
    write_labels(&bad_mask, &[vec![1; 16], vec![2; 16]]);
    fails(
        &mut train(&exe, &["--attention-mask", bad_mask.to_str().unwrap()]),
        "is not 0 or 1",
    );
    // A pipelined step does not take labels yet: said at compile time.
    let o = run(Command::new(bin_dir().join("memc"))
        .arg("compile")
        .arg(&ex.path)
        .args([
            "--shape",
            "input_ids=4x16",
            "--train",
            "--loss",
            "causal-lm",
            "--pipeline-stages",
            "2",
            "-o",
        ])
        .arg(dir.join("piped")));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains("not supported in a pipelined step (--pipeline-stages, --grad-accum) yet"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Gradient accumulation (`--grad-accum K`): K microbatches per optimizer step, each run of
/// the program one microbatch (its arena sized for it), give the whole batch's step, for
/// K = 2 and 4, in `memc train` (reference and cpu backends) and in an executable, whose
/// `info` shows the microbatch input; with masked labels, transformers' accumulation (each
/// microbatch weighted by its share of the step's kept labels) follows PyTorch's losses.
#[test]
fn grad_accumulation_equals_the_full_batch_step() {
    let dir = scratch("accum");
    let ex = example("llama-dynamo");
    let data = dir.join("ids.npy");
    write_rows(&data, 8, 128);
    let memc_train = |backend: &str, extra: &[&str]| {
        json_lines(&ok(Command::new(bin_dir().join("memc"))
            .arg("train")
            .arg(&ex.path)
            .args([
                "--shape",
                "input_ids=4x16",
                "--optimizer",
                "adamw",
                "--lr",
                "1e-2",
            ])
            .args(["--steps", "3", "--backend", backend])
            .arg("--data")
            .arg(&data)
            .args(extra)))
    };
    for backend in ["ref", "cpu"] {
        let whole = field(&memc_train(backend, &[]), "loss");
        for k in ["2", "4"] {
            let got = field(&memc_train(backend, &["--grad-accum", k]), "loss");
            let err = worst_rel(&got, &whole);
            eprintln!("--backend {backend} --grad-accum {k}: losses within {err:.1e} of the whole batch's");
            assert!(err <= 1e-5, "{backend} K={k}: {got:?} vs {whole:?}");
        }
    }
    let exe = dir.join("accum2");
    ok(Command::new(bin_dir().join("memc"))
        .arg("compile")
        .arg(&ex.path)
        .args([
            "--shape",
            "input_ids=4x16",
            "--train",
            "--optimizer",
            "adamw",
            "--grad-accum",
            "2",
            "-o",
        ])
        .arg(&exe));
    let info = ok(Command::new(&exe).arg("info"));
    assert!(
        info.contains("gradient accumulation: 2 microbatches")
            && info.contains("input input_ids: i64[2x16]"),
        "{info}"
    );
    let got = field(
        &json_lines(&ok(Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(&data)
            .args(["--steps", "3", "--lr", "1e-2"]))),
        "loss",
    );
    let whole = field(&memc_train("cpu", &[]), "loss");
    assert!(worst_rel(&got, &whole) <= 1e-5, "{got:?} vs {whole:?}");
    // Clipping applies to the summed gradient (the whole batch's norm); the sums are not
    // saved, so a checkpoint of one resumes in the other.
    let clipped = |extra: &[&str]| {
        let mut a = vec!["--clip-grad-norm", "0.5"];
        a.extend_from_slice(extra);
        field(&memc_train("cpu", &a), "loss")
    };
    let whole_dir = dir.join("whole");
    let accum_dir = dir.join("accum");
    let w = clipped(&["--save", whole_dir.to_str().unwrap()]);
    let a = clipped(&["--grad-accum", "2", "--save", accum_dir.to_str().unwrap()]);
    assert!(worst_rel(&a, &w) <= 1e-5, "clipped: {a:?} vs {w:?}");
    let next_w = clipped(&["--resume", accum_dir.to_str().unwrap()]);
    let next_a = clipped(&["--grad-accum", "2", "--resume", whole_dir.to_str().unwrap()]);
    assert!(
        worst_rel(&next_a, &next_w) <= 1e-5,
        "{next_a:?} vs {next_w:?}"
    );
    // Masked labels, 2 microbatches of 1 row: the loss over the kept labels of both rows.
    let rows = fixture_labels(&ex);
    let labels = dir.join("labels.npy");
    write_labels(&labels, &rows);
    let out = ok(Command::new(bin_dir().join("memc"))
        .arg("train")
        .arg(&ex.path)
        .args([
            "--optimizer",
            "adamw",
            "--backend",
            "cpu",
            "--grad-accum",
            "2",
        ])
        .args([
            "--steps",
            "5",
            "--lr",
            "1e-3",
            "--lr-schedule",
            "linear",
            "--warmup-steps",
            "2",
        ])
        .arg("--data")
        .arg(ids(&ex))
        .arg("--labels")
        .arg(&labels));
    let err = worst_rel(
        &field(&json_lines(&out), "loss"),
        &fixture(&ex, "adamw_labels_linear_warmup"),
    );
    assert!(err <= 1e-5, "labels, --grad-accum 2: {err}");
    let o = run(Command::new(bin_dir().join("memc"))
        .arg("train")
        .arg(&ex.path)
        .args(["--shape", "input_ids=4x16", "--grad-accum", "3"])
        .arg("--data")
        .arg(&data));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does not divide the batch of 4 rows"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A model that takes an attention mask (BERT) gets each batch's from `--attention-mask`: the
/// run equals one with the same mask fed as a fixed input and the masked positions' labels
/// set to −100 by hand.
#[test]
fn attention_mask_feeds_the_models_input() {
    let dir = scratch("bert-mask");
    let ex = example("bert-dynamo");
    let inputs = ex.path.with_extension("").join("inputs");
    let mask = inputs.join("attention_mask.npy");
    let (shape, m) = {
        let t = memc::io::read_tensor(&mask).unwrap();
        (t.shape().to_vec(), t.to_f64_vec())
    };
    let ids_t = memc::io::read_tensor(&inputs.join("input_ids.npy"))
        .unwrap()
        .to_f64_vec();
    let labels: Vec<Vec<i64>> = ids_t
        .chunks(shape[1])
        .zip(m.chunks(shape[1]))
        .map(|(r, k)| {
            r.iter()
                .zip(k)
                .map(|(&t, &k)| if k == 0.0 { -100 } else { t as i64 })
                .collect()
        })
        .collect();
    let by_hand = dir.join("labels.npy");
    write_labels(&by_hand, &labels);
    let train = |extra: &[&std::ffi::OsStr]| {
        field(
            &json_lines(&ok(Command::new(bin_dir().join("memc"))
                .arg("train")
                .arg(&ex.path)
                .args([
                    "--optimizer",
                    "adamw",
                    "--backend",
                    "cpu",
                    "--steps",
                    "3",
                    "--data",
                ])
                .arg(inputs.join("input_ids.npy"))
                .arg("--input")
                .arg(format!(
                    "token_type_ids={}",
                    inputs.join("token_type_ids.npy").display()
                ))
                .args(extra))),
            "loss",
        )
    };
    let fed = train(&["--attention-mask".as_ref(), mask.as_os_str()]);
    let fixed = format!("attention_mask={}", mask.display());
    let hand = train(&[
        "--input".as_ref(),
        fixed.as_ref(),
        "--labels".as_ref(),
        by_hand.as_os_str(),
    ]);
    assert_eq!(fed, hand);
}

/// A validation loss (`--val-data`): the evaluation step (forward and loss, no gradients)
/// runs inside the training arena (the executable's arena is the same with and without it),
/// leaves training untouched (the same losses bit for bit), and on the training batch itself
/// gives the next step's training loss; with labels too; `memc train --backend cpu` builds
/// it; what cannot evaluate says so in one line.
#[test]
fn validation_loss_inside_the_training_arena() {
    let dir = scratch("validation");
    let ex = example("llama-dynamo");
    let plain = dir.join("plain");
    compile_exe(&ex.path, &plain, &["--train", "--optimizer", "adamw"]);
    let exe = dir.join("eval");
    compile_exe(
        &ex.path,
        &exe,
        &["--train", "--optimizer", "adamw", "--eval"],
    );
    let arena = |e: &Path| -> String {
        ok(Command::new(e).arg("info"))
            .lines()
            .find(|l| l.starts_with("arena_bytes:"))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        arena(&plain),
        arena(&exe),
        "the evaluation step needs no more memory"
    );
    assert!(ok(Command::new(&exe).arg("info")).contains("evaluation step (--val-data)"));
    let log = dir.join("log.jsonl");
    let train = |e: &Path, extra: &[&str]| {
        json_lines(&ok(Command::new(e)
            .arg("train")
            .arg("--data")
            .arg(ids(&ex))
            .args(["--steps", "3", "--lr", "1e-2"])
            .args(extra)))
    };
    let val = ids(&ex);
    let lines = train(
        &exe,
        &[
            "--val-data",
            val.to_str().unwrap(),
            "--eval-every",
            "1",
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let steps: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    let vals: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("val_loss").is_some())
        .collect();
    assert_eq!((steps.len(), vals.len()), (3, 3));
    let without = train(&plain, &[]);
    assert_eq!(
        steps.iter().map(|l| l["loss"].clone()).collect::<Vec<_>>(),
        without
            .iter()
            .map(|l| l["loss"].clone())
            .collect::<Vec<_>>(),
        "evaluating changes no training step"
    );
    for k in 0..2 {
        let (v, next) = (
            vals[k]["val_loss"].as_f64().unwrap(),
            steps[k + 1]["loss"].as_f64().unwrap(),
        );
        assert!(
            (v - next).abs() <= 1e-5 * next.abs(),
            "step {}: {v} vs {next}",
            k + 1
        );
        assert_eq!(vals[k]["val_tokens"], 30);
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 6);
    // With labels: the masked loss of the validation rows.
    let rows = fixture_labels(&ex);
    let labels = dir.join("labels.npy");
    write_labels(&labels, &rows);
    let labelled = dir.join("labelled");
    compile_exe(
        &ex.path,
        &labelled,
        &[
            "--train",
            "--optimizer",
            "adamw",
            "--loss",
            "causal-lm",
            "--eval",
        ],
    );
    let l = labels.to_str().unwrap();
    let lines = train(
        &labelled,
        &[
            "--labels",
            l,
            "--val-data",
            val.to_str().unwrap(),
            "--val-labels",
            l,
            "--eval-every",
            "2",
        ],
    );
    let (s, v): (Vec<_>, Vec<_>) = lines.iter().partition(|l| l.get("loss").is_some());
    assert_eq!(v.len(), 2, "steps 2 and 3 (the last)");
    let (vl, next) = (
        v[0]["val_loss"].as_f64().unwrap(),
        s[2]["loss"].as_f64().unwrap(),
    );
    assert!((vl - next).abs() <= 1e-5 * next.abs(), "{vl} vs {next}");
    assert_eq!(v[0]["val_tokens"], 22);
    // memc train builds the step for --val-data on the cpu backend.
    let out = ok(Command::new(bin_dir().join("memc"))
        .arg("train")
        .arg(&ex.path)
        .args([
            "--optimizer",
            "adamw",
            "--backend",
            "cpu",
            "--steps",
            "2",
            "--lr",
            "1e-2",
        ])
        .arg("--data")
        .arg(ids(&ex))
        .arg("--val-data")
        .arg(&val));
    let lines = json_lines(&out);
    assert!(
        lines.last().unwrap()["val_loss"].as_f64().is_some(),
        "{out}"
    );
    // A model with other inputs (BERT: token types and the attention mask, fixed): they are
    // written before each evaluation, so the validation loss is again the next step's.
    let bert = example("bert-dynamo");
    let inputs = bert.path.with_extension("").join("inputs");
    let out = ok(Command::new(bin_dir().join("memc"))
        .arg("train")
        .arg(&bert.path)
        .args([
            "--optimizer",
            "adamw",
            "--backend",
            "cpu",
            "--steps",
            "2",
            "--lr",
            "1e-2",
        ])
        .args(["--eval-every", "1", "--data"])
        .arg(inputs.join("input_ids.npy"))
        .arg("--val-data")
        .arg(inputs.join("input_ids.npy"))
        .arg("--input")
        .arg(format!(
            "token_type_ids={}",
            inputs.join("token_type_ids.npy").display()
        ))
        .arg("--input")
        .arg(format!(
            "attention_mask={}",
            inputs.join("attention_mask.npy").display()
        )));
    let lines = json_lines(&out);
    let (s, v): (Vec<_>, Vec<_>) = lines.iter().partition(|l| l.get("loss").is_some());
    let (vl, next) = (
        v[0]["val_loss"].as_f64().unwrap(),
        s[1]["loss"].as_f64().unwrap(),
    );
    assert!(
        (vl - next).abs() <= 1e-5 * next.abs(),
        "BERT: {vl} vs {next}"
    );
    // What cannot evaluate.
    fails(
        Command::new(&plain)
            .arg("train")
            .arg("--data")
            .arg(ids(&ex))
            .arg("--val-data")
            .arg(&val),
        "compiled without an evaluation step: recompile with memc compile --train --eval",
    );
    fails(
        Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(ids(&ex))
            .args(["--eval-every", "2"]),
        "evaluate --val-data: pass it",
    );
    let short = dir.join("short.npy");
    memc::io::write_tensor(
        &short,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![1, 16], &[3; 16]),
    )
    .unwrap();
    fails(
        Command::new(&exe)
            .arg("train")
            .arg("--data")
            .arg(ids(&ex))
            .arg("--val-data")
            .arg(&short),
        "fewer than one evaluation batch of 2",
    );
    let o = run(Command::new(bin_dir().join("memc"))
        .arg("train")
        .arg(&ex.path)
        .arg("--data")
        .arg(ids(&ex))
        .arg("--val-data")
        .arg(&val));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("runs on the cpu backend"));
}
