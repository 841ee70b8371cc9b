//! Hostile but fair input (issue 21), as a table of command → the one error it must give:
//! index inputs out of range refused by every backend (the kernels clamp, so the runtime checks
//! first), constant indices past a position table refused at import, nonsense flag values,
//! unbounded schedule sizes, a checkpoint of another optimizer, importer nodes whose attributes
//! would panic or allocate without bound, standard output that cannot be written, and output
//! paths that are links, FIFOs or devices.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use memc_onnx::proto;
use memc_tests::root;

#[path = "../support/cmd.rs"]
mod cmd;
use cmd::{bin_dir, compile_exe, ok, run, scratch};

fn memc() -> Command {
    Command::new(bin_dir().join("memc"))
}

fn model(name: &str) -> PathBuf {
    root().join("examples/models").join(name)
}

/// Runs `cmd` and expects exit code 2 with a last stderr line `error: ...needle...` and no
/// panic.
fn refuses(cmd: &mut Command, needle: &str) {
    let out = run(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        out.status.code() == Some(2)
            && last.starts_with("error: ")
            && last.contains(needle)
            && !stderr.contains("panicked"),
        "{cmd:?}: expected exit 2 and `error: ...{needle}...`, got {:?}:\n{stderr}",
        out.status.code()
    );
}

/// A copy of checkpoint directory `from` at `to` whose first f32 tensor in `model.safetensors`
/// holds +∞ at element `at`; returns the tensor's name.
fn poisoned_copy(from: &Path, to: &Path, at: usize) -> String {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let path = to.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (name, start) = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, t)| t["dtype"] == "F32")
        .map(|(k, t)| (k.clone(), t["data_offsets"][0].as_u64().unwrap() as usize))
        .min_by_key(|(_, start)| *start)
        .unwrap();
    let at = 8 + n + start + 4 * at;
    bytes[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    name
}

/// Writes `ids` (int64, shape `shape`) as a `.npy`.
fn ids_file(path: &Path, shape: &[usize], ids: &[i64]) -> PathBuf {
    memc_runtime::npy::write(
        path,
        &memc_runtime::npy::NpyArray {
            dtype: memc_runtime::npy::NpyDtype::I64,
            shape: shape.to_vec(),
            data: ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
        },
    )
    .unwrap();
    path.to_path_buf()
}

#[test]
fn hostile_commands_give_one_clear_error() {
    let dir = scratch("hostile");
    let llama = model("llama-dynamo.onnx");
    let data = model("llama-dynamo/inputs/input_ids.npy");
    let mut ids: Vec<i64> = (0..32).collect();
    ids[19] = 256;
    let vocab = ids_file(&dir.join("vocab.npy"), &[2, 16], &ids);
    ids[19] = -257;
    let negative = ids_file(&dir.join("negative.npy"), &[2, 16], &ids);
    let mut tt = vec![0i64; 32];
    tt[0] = 5;
    let token_types = ids_file(&dir.join("tt.npy"), &[2, 16], &tt);

    let train_exe = dir.join("llama-adamw");
    compile_exe(&llama, &train_exe, &["--train", "--optimizer", "adamw"]);
    let sgd_exe = dir.join("llama-sgd");
    compile_exe(&llama, &sgd_exe, &["--train", "--optimizer", "sgd"]);
    let infer_exe = dir.join("llama-infer");
    ok(memc()
        .arg("compile")
        .arg(&llama)
        .args(["--shape", "input_ids=2x16", "-o"])
        .arg(&infer_exe));
    let bert_exe = dir.join("bert-infer");
    ok(memc()
        .arg("compile")
        .arg(model("bert-dynamo.onnx"))
        .args([
            "--shape",
            "input_ids=2x16",
            "--shape",
            "token_type_ids=2x16",
        ])
        .args(["--shape", "attention_mask=2x16", "-o"])
        .arg(&bert_exe));
    // RoBERTa computes its position ids in the graph (a cumulative sum over the tokens that
    // are not padding): 80 tokens run past its 66-row position table, which no up-front
    // check of the inputs sees; the gathers' kernels report it.
    let roberta = root().join("examples/zoo/roberta-eager-dynamo.onnx");
    let roberta_shapes = [
        "--shape",
        "input_ids=1x80",
        "--shape",
        "attention_mask=1x80",
    ];
    let roberta_ids = ids_file(&dir.join("roberta-ids.npy"), &[1, 80], &[5; 80]);
    let roberta_mask = ids_file(&dir.join("roberta-mask.npy"), &[1, 80], &[1; 80]);
    let roberta_inputs = [
        format!("input_ids={}", roberta_ids.display()),
        format!("attention_mask={}", roberta_mask.display()),
    ];
    let roberta_exe = dir.join("roberta-infer");
    ok(memc()
        .arg("compile")
        .arg(&roberta)
        .args(roberta_shapes)
        .arg("-o")
        .arg(&roberta_exe));
    let roberta_eval = |backend: &str| {
        let mut c = memc();
        c.arg("eval").arg(&roberta).args(roberta_shapes);
        for i in &roberta_inputs {
            c.arg("--input").arg(i);
        }
        c.args(["--backend", backend, "--out"])
            .arg(dir.join(format!("ro-{backend}")));
        c
    };
    let sgd_dir = dir.join("sgd-ckpt");
    ok(Command::new(&sgd_exe)
        .arg("train")
        .arg("--data")
        .arg(&data)
        .args(["--steps", "1", "--save"])
        .arg(&sgd_dir));

    let memc_train = |extra: &[&str]| {
        let mut c = memc();
        c.arg("train")
            .arg(&llama)
            .arg("--data")
            .arg(&data)
            .args(extra);
        c
    };
    let exe_train = |extra: &[&str]| {
        let mut c = Command::new(&train_exe);
        c.arg("train").arg("--data").arg(&data).args(extra);
        c
    };
    let sgd_train = |extra: &[&str]| {
        let mut c = Command::new(&sgd_exe);
        c.arg("train").arg("--data").arg(&data).args(extra);
        c
    };
    let poisoned = dir.join("poisoned-ckpt");
    let poisoned_name = poisoned_copy(&sgd_dir, &poisoned, 3);
    let poisoned_needle =
        format!("the trained weight `{poisoned_name}` holds inf at [0, 3] before the first step");
    let check_nan = |mut c: Command| {
        c.env("MEMC_CHECK_NAN", "1");
        c
    };
    let cases: Vec<(&str, Command, &str)> = vec![
        // Indices computed in the graph, out of range: every backend refuses.
        (
            "RoBERTa at 80 positions of 66, reference",
            roberta_eval("ref"),
            "`gather`: index 66 is out of range for dim 0 of size 66",
        ),
        (
            "RoBERTa at 80 positions of 66, cpu backend",
            roberta_eval("cpu"),
            "is out of range for dim",
        ),
        (
            "RoBERTa at 80 positions of 66, executable",
            {
                let mut c = Command::new(&roberta_exe);
                c.arg("infer");
                for i in &roberta_inputs {
                    c.arg("--input").arg(i);
                }
                c.arg("--out").arg(dir.join("ro-exe"));
                c
            },
            "is out of range for dim",
        ),
        // Non-finite values: every backend stops at the same step (the reference at the
        // first node whose result holds a NaN; compiled programs at a NaN loss or a
        // non-finite weight after the update, or, with MEMC_CHECK_NAN=1, at the first kernel
        // that wrote a NaN, named as the reference names a node).
        (
            "SGD at lr 1e12, reference",
            memc_train(&["--optimizer", "sgd", "--lr", "1e12", "--steps", "3"]),
            "step 2: node #",
        ),
        (
            "SGD at lr 1e12, cpu backend",
            memc_train(&["--optimizer", "sgd", "--lr", "1e12", "--steps", "3", "--backend", "cpu"]),
            "step 2: the loss is NaN. The weights in memory hold this step's update and nothing was saved",
        ),
        (
            "SGD at lr 1e12, executable",
            sgd_train(&["--lr", "1e12", "--steps", "3"]),
            "step 2: the loss is NaN",
        ),
        (
            "SGD at lr 1e12, cpu backend, MEMC_CHECK_NAN=1",
            check_nan(memc_train(&[
                "--optimizer", "sgd", "--lr", "1e12", "--steps", "3", "--backend", "cpu",
            ])),
            "produced a non-finite value (NaN) in its f32[",
        ),
        (
            "SGD at lr 1e12, executable, MEMC_CHECK_NAN=1",
            check_nan(sgd_train(&["--lr", "1e12", "--steps", "3"])),
            "produced a non-finite value (NaN) in its f32[",
        ),
        (
            "AdamW at lr 3.4e38: the update overflows, the loss is finite; reference",
            memc_train(&["--optimizer", "adamw", "--lr", "3.4e38", "--steps", "2"]),
            "step 1: node #",
        ),
        (
            "AdamW at lr 3.4e38: the update overflows, the loss is finite; executable",
            exe_train(&["--lr", "3.4e38", "--steps", "2"]),
            "step 1: the update left NaN in `",
        ),
        (
            "AdamW at lr 3.4e38, executable, MEMC_CHECK_NAN=1",
            check_nan(exe_train(&["--lr", "3.4e38", "--steps", "2"])),
            "step 1: node #",
        ),
        (
            "a learning rate past f32",
            exe_train(&["--lr", "1e39"]),
            "--lr 1e39 does not fit the program's f32 scalar",
        ),
        (
            "a checkpoint holding an infinity, executable",
            {
                let mut c = sgd_train(&["--steps", "1", "--resume"]);
                c.arg(&poisoned);
                c
            },
            &poisoned_needle,
        ),
        // Index inputs out of range: every backend refuses, naming the input and position.
        (
            "token id = vocab, reference",
            {
                let mut c = memc();
                c.arg("eval")
                    .arg(&llama)
                    .arg("--input")
                    .arg(format!("input_ids={}", vocab.display()));
                c.arg("--out").arg(dir.join("o1"));
                c
            },
            "index 256 is out of range",
        ),
        (
            "token id = vocab, cpu backend",
            {
                let mut c = memc();
                c.arg("eval")
                    .arg(&llama)
                    .arg("--input")
                    .arg(format!("input_ids={}", vocab.display()));
                c.args(["--backend", "cpu", "--out"]).arg(dir.join("o2"));
                c
            },
            "input `input_ids`: 256 at position [1, 3] is outside 0..256",
        ),
        (
            "token id below -vocab, executable",
            {
                let mut c = Command::new(&infer_exe);
                c.arg("infer")
                    .arg("--input")
                    .arg(format!("input_ids={}", negative.display()));
                c.arg("--out").arg(dir.join("o3"));
                c
            },
            "-257 at position [1, 3] is outside 0..256",
        ),
        (
            "token type 5 of 2, executable",
            {
                let mut c = Command::new(&bert_exe);
                c.arg("infer");
                for (n, f) in [
                    ("input_ids", model("bert-dynamo/inputs/input_ids.npy")),
                    ("token_type_ids", token_types.clone()),
                    (
                        "attention_mask",
                        model("bert-dynamo/inputs/attention_mask.npy"),
                    ),
                ] {
                    c.arg("--input").arg(format!("{n}={}", f.display()));
                }
                c.arg("--out").arg(dir.join("o4"));
                c
            },
            "input `token_type_ids`: 5 at position [0, 0] is outside 0..2",
        ),
        (
            "a sequence past GPT-2's position table",
            {
                let mut c = memc();
                c.arg("compile")
                    .arg(model("gpt2-dynamo.onnx"))
                    .args(["--shape", "input_ids=1x100"]);
                c
            },
            "outside the 64 rows of `model.transformer.wpe.weight`",
        ),
        (
            "GPT-2 at 100000 × 100000 tokens: the mask's run-time CumSum, said why",
            {
                let mut c = memc();
                c.arg("compile")
                    .arg(model("gpt2-dynamo.onnx"))
                    .args(["--shape", "input_ids=100000x100000"]);
                c
            },
            "100000×100000 triangle (40 GB), so it takes at most 8192",
        ),
        // Nonsense values.
        (
            "negative learning rate",
            memc_train(&["--lr=-1"]),
            "--lr must be a finite number ≥ 0",
        ),
        (
            "zero steps",
            memc_train(&["--steps", "0"]),
            "--steps must be at least 1",
        ),
        (
            "executable: negative learning rate",
            exe_train(&["--lr", "-1"]),
            "--lr must be a finite number ≥ 0",
        ),
        (
            "executable: zero steps",
            exe_train(&["--steps", "0"]),
            "--steps must be at least 1",
        ),
        (
            "executable: NaN weight decay",
            exe_train(&["--weight-decay", "nan"]),
            "--weight-decay must be a finite number ≥ 0",
        ),
        (
            "a training flag without --train",
            {
                let mut c = memc();
                c.arg("compile").arg(&llama).args([
                    "--shape",
                    "input_ids=2x16",
                    "--activation-budget",
                    "0.5",
                ]);
                c
            },
            "--activation-budget shapes a training step: add --train",
        ),
        (
            "NaN drift threshold",
            {
                let mut c = memc();
                c.arg("compile")
                    .arg(&llama)
                    .args(["--shape", "input_ids=2x16", "--train"]);
                c.args(["--reversible", "meft1", "--rev-check-threshold", "nan"]);
                c
            },
            "--rev-check-threshold must be a positive number",
        ),
        (
            "an SGD checkpoint resumed by an AdamW executable",
            {
                let mut c = exe_train(&["--steps", "1", "--resume"]);
                c.arg(&sgd_dir);
                c
            },
            "saved by a program with another optimizer",
        ),
        // Bounded work.
        (
            "a billion microbatches",
            {
                let mut c = memc();
                c.arg("compile")
                    .arg(&llama)
                    .args(["--shape", "input_ids=8x16", "--train"]);
                c.args(["--pipeline-stages", "2", "--microbatches", "1000000000"]);
                c
            },
            "past what memc schedules",
        ),
        (
            "a schedule of 1000 stages × 10000 microbatches",
            {
                let mut c = memc();
                c.args([
                    "schedule",
                    "--stages",
                    "1000",
                    "--microbatches",
                    "10000",
                    "--schedule",
                    "1f1b",
                ]);
                c
            },
            "past what memc schedules",
        ),
        // Standard output that cannot be written.
        (
            "--emit ir onto a full device",
            {
                let mut c = memc();
                c.arg("compile")
                    .arg(&llama)
                    .args(["--shape", "input_ids=2x16", "--emit", "ir"]);
                c.stdout(Stdio::from(std::fs::File::create("/dev/full").unwrap()));
                c
            },
            "cannot write to standard output: No space left on device",
        ),
        (
            "executable info onto a full device",
            {
                let mut c = Command::new(&infer_exe);
                c.arg("info");
                c.stdout(Stdio::from(std::fs::File::create("/dev/full").unwrap()));
                c
            },
            "cannot write to standard output: No space left on device",
        ),
    ];
    for (what, mut cmd, needle) in cases {
        eprintln!("{what}");
        refuses(&mut cmd, needle);
    }
}

#[test]
fn output_paths_that_are_links_and_fifos_are_written_through() {
    let dir = scratch("hostile-writers");
    let llama = model("llama-dynamo.onnx");
    let report = |path: &Path| {
        ok(memc()
            .arg("compile")
            .arg(&llama)
            .args(["--shape", "input_ids=2x16", "--report-json"])
            .arg(path));
    };
    // A symbolic link: its target is replaced, the link stays.
    let target = dir.join("real.json");
    std::fs::write(&target, "old").unwrap();
    let link = dir.join("link.json");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).unwrap();
    report(&link);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let text = std::fs::read_to_string(&target).unwrap();
    assert!(text.contains("peak_bytes"), "{text}");
    // An executable onto a link: linked into a temporary beside the target, renamed there.
    let exe_target = dir.join("real-exe");
    std::fs::write(&exe_target, "old").unwrap();
    let exe_link = dir.join("exe-link");
    let _ = std::fs::remove_file(&exe_link);
    std::os::unix::fs::symlink(&exe_target, &exe_link).unwrap();
    ok(memc()
        .arg("compile")
        .arg(&llama)
        .args(["--shape", "input_ids=2x16", "-o"])
        .arg(&exe_link));
    assert!(std::fs::symlink_metadata(&exe_link)
        .unwrap()
        .file_type()
        .is_symlink());
    ok(Command::new(&exe_link).arg("info"));
    // A FIFO: written directly (a temporary file and a rename would replace it).
    let fifo = dir.join("fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    report(&fifo);
    assert!(reader.join().unwrap().contains("peak_bytes"));
    assert!(
        !std::fs::metadata(&fifo).unwrap().is_file(),
        "the FIFO was replaced"
    );
    // A temporary file of a writer that is gone is cleaned up; nothing of ours is left.
    let stale = dir.join(".out.json.tmp999999999.0");
    std::fs::write(&stale, "partial").unwrap();
    report(&dir.join("out.json"));
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "{names:?}");
}

/// Nodes whose attributes or operands would make the importer panic or allocate without
/// bound: each is one error naming the node.
#[test]
fn the_importer_refuses_malformed_nodes() {
    fn init(name: &str, dims: &[i64], values: &[f32]) -> proto::TensorProto {
        proto::TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(proto::tensor_proto::DataType::Float as i32),
            float_data: values.to_vec(),
            ..Default::default()
        }
    }
    fn int_attr(name: &str, i: i64) -> proto::AttributeProto {
        proto::AttributeProto {
            name: Some(name.into()),
            i: Some(i),
            r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
            ..Default::default()
        }
    }
    let model = |node: proto::NodeProto, inits: Vec<proto::TensorProto>| proto::ModelProto {
        ir_version: Some(10),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(18),
        }],
        graph: Some(proto::GraphProto {
            output: node
                .output
                .iter()
                .map(|o| proto::ValueInfoProto {
                    name: Some(o.clone()),
                    ..Default::default()
                })
                .collect(),
            node: vec![node],
            initializer: inits,
            ..Default::default()
        }),
        ..Default::default()
    };
    let node = |op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<proto::AttributeProto>| {
        proto::NodeProto {
            op_type: Some(op.into()),
            name: Some(format!("bad_{op}")),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            attribute: attrs,
            ..Default::default()
        }
    };
    let x = || init("x", &[4], &[1.0, 2.0, 3.0, 4.0]);
    let cases = [
        (
            model(
                node(
                    "Split",
                    &["x"],
                    &["a", "b"],
                    vec![int_attr("num_outputs", -1)],
                ),
                vec![x()],
            ),
            "num_outputs = -1, but the node has 2 outputs",
        ),
        (
            model(
                node(
                    "Split",
                    &["x"],
                    &["a", "b"],
                    vec![int_attr("num_outputs", 1 << 40)],
                ),
                vec![x()],
            ),
            "num_outputs = 1099511627776, but the node has 2 outputs",
        ),
        (
            model(
                node("Concat", &["s", "x"], &["y"], vec![int_attr("axis", 0)]),
                vec![init("s", &[], &[1.0]), x()],
            ),
            "operand 1 has rank 1, operand 0 has rank 0",
        ),
    ];
    let mut future = model(
        node("Concat", &["x", "x"], &["y"], vec![int_attr("axis", 0)]),
        vec![x()],
    );
    future.opset_import[0].version = Some(99);
    let cases = cases
        .into_iter()
        .chain([(future, "default-domain opset 99")]);
    for (m, needle) in cases {
        let err = memc_onnx::import_model(Path::new("hostile.onnx"), &m, &Default::default())
            .expect_err(needle)
            .to_string();
        assert!(err.contains(needle), "{err}");
    }
}

/// A bounded field-level mutation run (what a structure-aware fuzzer does, deterministic and
/// short enough for every CI run): attributes, dims, operand lists and op types of real
/// exports are mutated and imported; every mutant gives a graph or an error, never a panic.
#[test]
fn field_mutations_never_panic_the_importer() {
    let files = [
        "llama-dynamo.onnx",
        "gpt2-torchscript.onnx",
        "bert-dynamo.onnx",
    ];
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let evil = [
        -1i64,
        0,
        1,
        2,
        -2,
        i64::MAX,
        i64::MIN,
        1 << 40,
        -(1 << 40),
        65536,
        7,
    ];
    let shapes = std::collections::HashMap::from([
        ("input_ids".to_string(), vec![2, 16]),
        ("token_type_ids".to_string(), vec![2, 16]),
        ("attention_mask".to_string(), vec![2, 16]),
    ]);
    let opts = memc_onnx::ImportOptions { shapes };
    let mut panics = vec![];
    let mut imported = 0;
    for file in files {
        let path = model(file);
        let base = memc_onnx::load_model(&path).unwrap();
        for round in 0..400 {
            let mut m = base.clone();
            let g = m.graph.as_mut().unwrap();
            let what;
            let k = (next() as usize) % g.node.len();
            let node = &mut g.node[k];
            match next() % 6 {
                0 if !node.attribute.is_empty() => {
                    let a = (next() as usize) % node.attribute.len();
                    let v = evil[(next() as usize) % evil.len()];
                    let name = node.name().to_string();
                    let attr = &mut node.attribute[a];
                    attr.i = Some(v);
                    for x in attr.ints.iter_mut() {
                        *x = v;
                    }
                    what = format!("node {name} attribute {} = {v}", attr.name());
                }
                1 if !node.input.is_empty() => {
                    node.input.pop();
                    what = format!("node {} loses its last operand", node.name());
                }
                2 => {
                    let other = g.node[(next() as usize) % g.node.len()]
                        .op_type()
                        .to_string();
                    let node = &mut g.node[k];
                    what = format!("node {} becomes a {other}", node.name());
                    node.op_type = Some(other);
                }
                3 if !node.input.is_empty() && !g.initializer.is_empty() => {
                    let i = (next() as usize) % node.input.len();
                    let init = g.initializer[(next() as usize) % g.initializer.len()]
                        .name()
                        .to_string();
                    let node = &mut g.node[k];
                    what = format!("node {} reads {init} as operand {i}", node.name());
                    node.input[i] = init;
                }
                4 if !g.initializer.is_empty() => {
                    let t = (next() as usize) % g.initializer.len();
                    let v = evil[(next() as usize) % evil.len()];
                    let init = &mut g.initializer[t];
                    if let Some(d) = init.dims.first_mut() {
                        *d = v;
                    }
                    what = format!("initializer {} dim 0 = {v}", init.name());
                }
                _ => {
                    let v = evil[(next() as usize) % evil.len()];
                    node.attribute.push(proto::AttributeProto {
                        name: Some("axis".into()),
                        i: Some(v),
                        r#type: Some(proto::attribute_proto::AttributeType::Int as i32),
                        ..Default::default()
                    });
                    what = format!("node {} gets axis = {v}", node.name());
                }
            }
            let result =
                std::panic::catch_unwind(|| memc_onnx::import_model(&path, &m, &opts).map(|_| ()));
            match result {
                Err(_) => panics.push(format!("{file} #{round}: {what}")),
                Ok(Ok(())) => imported += 1,
                Ok(Err(_)) => {}
            }
        }
    }
    eprintln!(
        "{} mutants imported, the rest refused with an error",
        imported
    );
    assert!(
        panics.is_empty(),
        "the importer panicked on:\n{}",
        panics.join("\n")
    );
}

/// `examples/hostile/` (made by `scripts/hostile-models.py`, with what onnx's checker and
/// onnxruntime did with each file in `expected.json`): memc refuses every file either of them
/// refuses, each for its own reason, without reading outside the model's directory. Then what
/// the script cannot commit: a symbolic link out of the directory and a FIFO as external data,
/// and a sharded checkpoint index naming files outside its directory.
#[test]
fn model_files_are_refused_where_onnx_and_onnxruntime_refuse_them() {
    let dir = root().join("examples/hostile");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let why = std::collections::HashMap::from([
        (
            "external-parent",
            "is not a relative path inside the model's directory",
        ),
        (
            "external-absolute",
            "is not a relative path inside the model's directory",
        ),
        (
            "external-past-end",
            "the data file is truncated or belongs to another model",
        ),
        ("raw-data-short", "needs 4194304 bytes but has 16"),
        ("negative-dim", "negative dim -4"),
        ("huge-no-data", "initializer `x`"),
        ("split-num-outputs", "num_outputs = -1"),
        ("concat-ranks", "operand 1 has rank 1, operand 0 has rank 0"),
        ("transpose-perm", "is not a permutation"),
        ("reshape-two-unknowns", "invalid target shape [-1, -1]"),
        ("attribute-type", "axis"),
        (
            "undefined-operand",
            "input `nowhere` is not produced by any earlier node",
        ),
        ("defined-twice", "output `y` is already defined"),
        ("opset-99", "default-domain opset 99"),
        ("gather-constant-index", "index 7 is out of range"),
    ]);
    let cases = expected["cases"].as_object().unwrap();
    assert_eq!(cases.len(), why.len(), "a reason for every case");
    for (name, outcome) in cases {
        let refused = ["onnx_checker", "onnxruntime"]
            .iter()
            .any(|tool| outcome[tool]["refused"] == true);
        assert!(
            refused,
            "{name}: neither tool refuses it; it is not a hostile case"
        );
        let path = dir.join(format!("{name}.onnx"));
        let err = memc_onnx::import(&path, &Default::default())
            .map(|_| ())
            .expect_err(name)
            .to_string();
        assert!(err.contains(why[name.as_str()]), "{name}: {err}");
    }

    // A symbolic link in the model's directory to a file outside it, and a FIFO.
    let work = scratch("hostile-links");
    let m = memc_onnx::load_model(&dir.join("external-past-end.onnx")).unwrap();
    let with_location = |location: &str| {
        let mut m = m.clone();
        let t = &mut m.graph.as_mut().unwrap().initializer[0];
        for kv in &mut t.external_data {
            match kv.key() {
                "location" => kv.value = Some(location.into()),
                "offset" => kv.value = Some("0".into()),
                _ => {}
            }
        }
        m
    };
    std::os::unix::fs::symlink(model("llama-dynamo.onnx"), work.join("link.bin")).unwrap();
    let err = memc_onnx::import_model(
        &work.join("m.onnx"),
        &with_location("link.bin"),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("outside the model's directory"), "{err}");
    let fifo = work.join("fifo.bin");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let err = memc_onnx::import_model(
        &work.join("m.onnx"),
        &with_location("fifo.bin"),
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("is not a regular file"), "{err}");
    // A file inside the directory reached through a link inside it is fine.
    std::fs::copy(dir.join("hostile-data.bin"), work.join("data.bin")).unwrap();
    std::os::unix::fs::symlink(work.join("data.bin"), work.join("alias.bin")).unwrap();
    memc_onnx::import_model(
        &work.join("m.onnx"),
        &with_location("alias.bin"),
        &Default::default(),
    )
    .unwrap();

    // A sharded checkpoint's index naming shards outside its directory.
    for (shard, needle) in [
        (
            "../llama-dynamo.onnx",
            "which is not a file beside the index",
        ),
        ("/etc/hostname", "which is not a file beside the index"),
        ("link.bin", "which is not a file beside the index"),
    ] {
        let index = work.join("model.safetensors.index.json");
        std::fs::write(
            &index,
            serde_json::json!({"weight_map": {"w": shard}}).to_string(),
        )
        .unwrap();
        let err = memc_runtime::weights::checkpoint_files(&index)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{shard}: {err}");
    }
}

/// A bounded byte-level mutation run over the fuzz target's seeds (`fuzz/seeds/`, the
/// regression inputs of every crash the fuzzer found included), in every CI run: each seed as
/// it is, then mutants (bit flips, extreme bytes, truncations, insertions, duplicated ranges)
/// through `memc_onnx::import_bytes`, the fuzz target's entry (protobuf decoding, initializer
/// loading, shape binding, every op converter, folding, verification). Every input gives a
/// graph or an error, never a panic.
#[test]
fn byte_mutations_never_panic_the_loader() {
    let seeds = root().join("fuzz/seeds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&seeds)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "{} seeds", files.len());
    assert!(files.iter().any(|f| f
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("regress-")));
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let opts = memc_onnx::ImportOptions {
        shapes: std::collections::HashMap::from([("input_ids".to_string(), vec![1, 8])]),
    };
    // `MEMC_MUTANTS=N` runs N per seed (longer local runs); CI runs 150.
    let rounds: usize = std::env::var("MEMC_MUTANTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(150);
    let mut panics = vec![];
    let mut runs = 0;
    for file in &files {
        let seed = std::fs::read(file).unwrap();
        for round in 0..rounds {
            let mut m = seed.clone();
            let what = if round == 0 {
                "as it is".to_string()
            } else {
                let at = (next() as usize) % m.len().max(1);
                match next() % 5 {
                    0 => {
                        m[at] ^= 1 << (next() % 8);
                        format!("bit flip at {at}")
                    }
                    1 => {
                        m[at] = [0x00, 0xff, 0x7f, 0x80][(next() % 4) as usize];
                        format!("extreme byte at {at}")
                    }
                    2 => {
                        m.truncate(at);
                        format!("truncated at {at}")
                    }
                    3 => {
                        let bytes: Vec<u8> = (0..1 + next() % 8).map(|_| next() as u8).collect();
                        m.splice(at..at, bytes);
                        format!("bytes inserted at {at}")
                    }
                    _ => {
                        let len = ((next() as usize) % 64).min(m.len() - at);
                        let chunk = m[at..at + len].to_vec();
                        m.splice(at..at, chunk);
                        format!("{len} bytes at {at} repeated")
                    }
                }
            };
            runs += 1;
            let r = std::panic::catch_unwind(|| memc_onnx::import_bytes(&m, &opts).map(|_| ()));
            if r.is_err() {
                panics.push(format!("{}: {what}", file.display()));
            }
        }
    }
    assert!(
        panics.is_empty(),
        "{} of {runs} inputs panicked: {panics:#?}",
        panics.len()
    );
}
