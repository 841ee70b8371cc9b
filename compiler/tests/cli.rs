//! The `memc` binary end to end: the main commands on an example model, and bad input of every
//! kind answered with one `error:` line and exit code 2, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use memc::onnx::proto::{
    tensor_proto::{DataLocation, DataType},
    tensor_shape_proto::{dimension::Value as Dim, Dimension},
    type_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use prost::Message;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn example(name: &str) -> PathBuf {
    root().join("examples/models").join(name)
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn memc<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Out {
    let o = Command::new(env!("CARGO_BIN_EXE_memc"))
        .args(args)
        .output()
        .unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Asserts a clean failure: exit 2, exactly one stderr line `error: ...` containing `want`.
fn fails_with<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S], want: &[&str]) {
    let o = memc(args);
    assert_eq!(o.code, 2, "args {args:?}\nstderr: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one error line expected, got:\n{}",
        o.stderr
    );
    assert!(lines[0].starts_with("error: "), "{}", lines[0]);
    for w in want {
        assert!(lines[0].contains(w), "`{w}` missing from: {}", lines[0]);
    }
}

/// `eval MODEL --input NAME=FILE --out DIR`.
fn eval_args(model: &Path, name: &str, file: &Path, out: &Path) -> Vec<String> {
    let input = format!("{name}={}", s(file));
    ["eval", s(model), "--input", &input, "--out", s(out)]
        .map(String::from)
        .to_vec()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn value_info(name: &str, elem: DataType, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(d.clone()),
                            denotation: None,
                        })
                        .collect(),
                }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(format!("/test/{op}")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// `y = x @ w` with x: f32[batch, 4] and w an initializer, as ONNX bytes.
fn matmul_model(w: TensorProto, extra: Vec<NodeProto>) -> Vec<u8> {
    let mut nodes = vec![node("MatMul", &["x", "w"], &["h"])];
    let out = if extra.is_empty() { "h" } else { "y" };
    nodes.extend(extra);
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: vec![w],
            input: vec![value_info(
                "x",
                DataType::Float,
                &[Dim::DimParam("batch".into()), Dim::DimValue(4)],
            )],
            output: vec![value_info(out, DataType::Float, &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn weight(data: TensorProto) -> TensorProto {
    TensorProto {
        name: Some("w".into()),
        dims: vec![4, 2],
        data_type: Some(DataType::Float as i32),
        ..data
    }
}

fn npy_f32(path: &Path, shape: &[usize], v: &[f32]) {
    let a = memc_runtime::npy::NpyArray {
        dtype: memc_runtime::npy::NpyDtype::F32,
        shape: shape.to_vec(),
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    std::fs::write(path, memc_runtime::npy::to_bytes(&a)).unwrap();
}

#[test]
fn eval_writes_outputs_matching_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let ids = example("llama-dynamo/inputs/input_ids.npy");
    let o = memc(&[
        "eval",
        s(&example("llama-dynamo.onnx")),
        "--input",
        &format!("input_ids={}", s(&ids)),
        "--out",
        s(dir.path()),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("logits: f32[2, 16, 256]"), "{}", o.stdout);
    let got = memc::io::read_tensor(&dir.path().join("logits.npy"))
        .unwrap()
        .to_f32_vec();
    let want = memc::io::read_tensor(&example("llama-dynamo/ref/logits.npy"))
        .unwrap()
        .to_f32_vec();
    let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |a, (g, w)| a.max((g - w).abs()));
    assert!(diff <= 1e-4 * scale, "{diff} vs {scale}");
}

#[test]
fn compile_emits_ir_and_report_json() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let model = example("gpt2-torchscript.onnx");
    let o = memc(&[
        "compile",
        s(&model),
        "--shape",
        "input_ids=1x8",
        "--emit",
        "ir",
        "--report-json",
        s(&report),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .starts_with("graph {\n  %0 = input \"input_ids\" : i64[1, 8]\n"),
        "{}",
        &o.stdout[..200]
    );
    let g = memc_ir::parse(&o.stdout).unwrap();
    memc_ir::verify(&g).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["op_counts"]["layer_norm"], 5);
    // The canonicalisation turns each layer's softmax attention into one op.
    assert_eq!(r["op_counts"]["attention"], 2);
    assert_eq!(r["op_counts"]["softmax"], serde_json::Value::Null);
    // GPT-2 tiny: exactly PyTorch's parameters (the exporter's copy of the tied head is re-tied).
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(example("manifest.json")).unwrap()).unwrap();
    let torch_params = manifest["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "gpt2-torchscript")
        .unwrap()["torch_params"]
        .as_u64()
        .unwrap();
    assert_eq!(r["params_bytes"].as_u64().unwrap(), 4 * torch_params);
}

#[test]
fn opt_round_trips_text() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("g.mir");
    std::fs::write(&f, "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = exp(%0) : f32[2]\n  %2 = neg(%0) : f32[2]\n  output \"y\" = %2\n}\n").unwrap();
    let o = memc(&["opt", s(&f), "--pass", "verify,dce"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout,
        "graph {\n  %0 = input \"x\" : f32[2]\n  %1 = neg(%0) : f32[2]\n  output \"y\" = %1\n}\n"
    );
    fails_with(&["opt", s(&f), "--pass", "frobnicate"], &["unknown pass"]);
}

#[test]
fn external_data_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let mut bytes = vec![0u8; 16]; // an offset, as exporters align tensors
    bytes.extend(w.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(dir.path().join("model.data"), &bytes).unwrap();
    let ext = |k: &str, v: &str| StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v.into()),
    };
    let t = weight(TensorProto {
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            ext("location", "model.data"),
            ext("offset", "16"),
            ext("length", "32"),
        ],
        ..Default::default()
    });
    let model = dir.path().join("model.onnx");
    std::fs::write(&model, matmul_model(t, vec![])).unwrap();
    let x = dir.path().join("x.npy");
    npy_f32(&x, &[1, 4], &[1., 1., 1., 1.]);
    let out = dir.path().join("out");
    let o = memc(&eval_args(&model, "x", &x, &out));
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        memc::io::read_tensor(&out.join("h.npy"))
            .unwrap()
            .to_f32_vec(),
        vec![12., 16.]
    );

    std::fs::remove_file(dir.path().join("model.data")).unwrap();
    fails_with(
        &["compile", s(&model), "--shape", "x=1x4", "--emit", "ir"],
        &[
            "initializer `w`",
            "model.data",
            "keep the data file next to the model",
        ],
    );
    std::fs::write(dir.path().join("model.data"), &bytes[..40]).unwrap();
    fails_with(
        &["compile", s(&model), "--shape", "x=1x4", "--emit", "ir"],
        &["initializer `w`", "truncated"],
    );
}

#[test]
fn bad_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    fails_with(
        &["compile", s(&empty), "--emit", "ir"],
        &["empty.onnx", "not a valid ONNX model", "the file is empty"],
    );

    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(
        &garbage,
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    fails_with(
        &["compile", s(&garbage), "--emit", "ir"],
        &["garbage.onnx", "not a valid ONNX model"],
    );

    let full = std::fs::read(example("llama-dynamo.onnx")).unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    fails_with(
        &[
            "compile",
            s(&truncated),
            "--shape",
            "input_ids=1x8",
            "--emit",
            "ir",
        ],
        &["truncated.onnx", "not a valid ONNX model"],
    );

    let missing = dir.path().join("nope.onnx");
    fails_with(
        &["compile", s(&missing), "--emit", "ir"],
        &["nope.onnx", "cannot read the model"],
    );
}

#[test]
fn unsupported_op_names_node_op_and_opset() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("einsum.onnx");
    let w = weight(TensorProto {
        float_data: vec![0.5; 8],
        ..Default::default()
    });
    std::fs::write(
        &model,
        matmul_model(w, vec![node("Einsum", &["h"], &["y"])]),
    )
    .unwrap();
    fails_with(
        &["compile", s(&model), "--shape", "x=1x4", "--emit", "ir"],
        &[
            "einsum.onnx",
            "node `/test/Einsum`",
            "(Einsum, opset 17)",
            "not supported",
        ],
    );
}

#[test]
fn dynamic_dims_need_a_shape() {
    let m = example("llama-dynamo.onnx");
    fails_with(
        &["compile", s(&m), "--emit", "ir"],
        &[
            "input `input_ids`",
            "dim 0 (`batch`) is dynamic",
            "--shape input_ids=NxN",
        ],
    );
    fails_with(
        &["compile", s(&m), "--shape", "input_ids=2", "--emit", "ir"],
        &["--shape gives 1 dims but the model declares 2"],
    );
    fails_with(
        &["compile", s(&m), "--shape", "ids=2x3", "--emit", "ir"],
        &["does not have (inputs: input_ids)"],
    );
    fails_with(
        &["compile", s(&m), "--shape", "input_ids=2xq", "--emit", "ir"],
        &["`q` is not a dimension"],
    );
}

#[test]
fn inputs_of_the_wrong_shape_or_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let m = example("llama-dynamo.onnx");
    let floats = dir.path().join("floats.npy");
    npy_f32(&floats, &[2, 16], &[0.0; 32]);
    fails_with(
        &eval_args(&m, "input_ids", &floats, dir.path()),
        &[
            "floats.npy",
            "must be i64[2, 16]",
            "holds f32[2, 16]",
            "astype(np.int64)",
        ],
    );
    let ids = example("llama-dynamo/inputs/input_ids.npy");
    fails_with(
        &[
            "eval",
            s(&m),
            "--shape",
            "input_ids=3x16",
            "--input",
            &format!("input_ids={}", s(&ids)),
            "--out",
            s(dir.path()),
        ],
        &["must be i64[3, 16]", "holds i64[2, 16]"],
    );
    fails_with(
        &["eval", s(&m), "--out", s(dir.path())],
        &["input `input_ids`", "dynamic"],
    );
    let bert = example("bert-dynamo.onnx");
    let bert_ids = example("bert-dynamo/inputs/input_ids.npy");
    fails_with(
        &[
            "eval",
            s(&bert),
            "--shape",
            "input_ids=2x16",
            "--input",
            &format!("input_ids={}", s(&bert_ids)),
            "--out",
            s(dir.path()),
        ],
        &[
            "input `token_type_ids` (i64[2, 16]) has no value",
            "--input token_type_ids=FILE.npy",
        ],
    );
}

#[test]
fn malformed_npy_files() {
    let dir = tempfile::tempdir().unwrap();
    let m = example("llama-dynamo.onnx");
    let bad = dir.path().join("bad.npy");
    std::fs::write(&bad, b"\x93NUMPY\x01\x00garbage").unwrap();
    fails_with(
        &eval_args(&m, "input_ids", &bad, dir.path()),
        &["bad.npy", "not a valid .npy file"],
    );
    std::fs::write(&bad, b"not numpy at all").unwrap();
    fails_with(
        &eval_args(&m, "input_ids", &bad, dir.path()),
        &["bad.npy", "magic"],
    );
    let short = dir.path().join("short.npy");
    let good = std::fs::read(example("llama-dynamo/inputs/input_ids.npy")).unwrap();
    std::fs::write(&short, &good[..good.len() - 8]).unwrap();
    fails_with(
        &eval_args(&m, "input_ids", &short, dir.path()),
        &["short.npy", "needs 256 data bytes"],
    );
    fails_with(
        &[
            "eval",
            s(&m),
            "--input",
            "input_ids",
            "--out",
            s(dir.path()),
        ],
        &["expected NAME=FILE.npy"],
    );
}

#[test]
fn kernels_print_as_mlir_llvm_and_ptx() {
    let m = example("llama-dynamo.onnx");
    // PTX of every kernel, one module.
    let o = memc(&[
        "compile",
        s(&m),
        "--shape",
        "input_ids=1x8",
        "--emit",
        "ptx",
        "--sm",
        "80",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains(".target sm_80") && o.stdout.contains(".visible .entry memc_k0_kernel("),
        "{}",
        &o.stdout[..400]
    );
    fails_with(
        &[
            "compile",
            s(&m),
            "--shape",
            "input_ids=1x8",
            "--target",
            "tpu",
        ],
        &["invalid value 'tpu'", "possible values: cpu, cuda, all"],
    );
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_memc"))
        .args([
            "compile",
            s(&m),
            "--shape",
            "input_ids=1x8",
            "--emit",
            "ptx",
        ])
        .env("MEMC_LIBDEVICE", "/nonexistent/libdevice.10.bc")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("error: ")
            && stderr.contains("MEMC_LIBDEVICE=/nonexistent/libdevice.10.bc is not a file"),
        "{stderr}"
    );
    // MLIR and LLVM IR of the fused kernels.
    let o = memc(&[
        "compile",
        s(&m),
        "--shape",
        "input_ids=1x4",
        "--emit",
        "mlir",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("scf.parallel") && o.stdout.contains("func.func @memc_k1("),
        "{}",
        &o.stdout[..400]
    );
    let o = memc(&[
        "compile",
        s(&m),
        "--shape",
        "input_ids=1x4",
        "--train",
        "--emit",
        "llvm",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("define void @memc_k1(ptr %0)"),
        "{}",
        &o.stdout[..400]
    );
}

#[test]
fn gelu_of_opset_20_in_both_modes() {
    use memc::onnx::proto::{attribute_proto::AttributeType, AttributeProto};
    let dir = tempfile::tempdir().unwrap();
    let w: Vec<f32> = vec![0.5, -1.0, 1.5, 0.25, -2.0, 0.75, 1.0, -0.5];
    let x = dir.path().join("x.npy");
    npy_f32(&x, &[1, 4], &[1.0, -0.5, 2.0, 0.25]);
    let h: Vec<f64> = (0..2)
        .map(|j| {
            [1.0, -0.5, 2.0, 0.25]
                .iter()
                .enumerate()
                .map(|(k, v)| v * w[k * 2 + j] as f64)
                .sum()
        })
        .collect();
    for mode in ["none", "tanh"] {
        let mut gelu = node("Gelu", &["h"], &["y"]);
        gelu.attribute.push(AttributeProto {
            name: Some("approximate".into()),
            r#type: Some(AttributeType::String as i32),
            s: Some(mode.as_bytes().to_vec().into()),
            ..Default::default()
        });
        let mut bytes = matmul_model(
            weight(TensorProto {
                float_data: w.clone(),
                ..Default::default()
            }),
            vec![gelu],
        );
        // Gelu exists from opset 20: patch the model's opset.
        let mut m = ModelProto::decode(&bytes[..]).unwrap();
        m.opset_import[0].version = Some(20);
        bytes = m.encode_to_vec();
        let model = dir.path().join(format!("gelu-{mode}.onnx"));
        std::fs::write(&model, bytes).unwrap();
        let out = dir.path().join(mode);
        let o = memc(&eval_args(&model, "x", &x, &out));
        assert_eq!(o.code, 0, "{}", o.stderr);
        let got = memc::io::read_tensor(&out.join("y.npy"))
            .unwrap()
            .to_f32_vec();
        for (g, &v) in got.iter().zip(&h) {
            let want = if mode == "none" {
                0.5 * v * (1.0 + libm_erf(v / std::f64::consts::SQRT_2))
            } else {
                0.5 * v
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh())
            };
            assert!((*g as f64 - want).abs() < 1e-6, "{mode}: {g} vs {want}");
        }
    }
}

/// erf by its Maclaurin series (|x| < 3 here), to keep the test independent of memc's libm.
fn libm_erf(x: f64) -> f64 {
    let mut sum = 0.0;
    let mut term = x;
    for n in 0..60 {
        sum += term / (2 * n + 1) as f64;
        term *= -x * x / (n + 1) as f64;
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn check_flag_fails_beyond_the_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let m = example("llama-dynamo.onnx");
    let ids = example("llama-dynamo/inputs/input_ids.npy");
    let refs = example("llama-dynamo/ref");
    let args = |tol: &'static str| -> Vec<String> {
        [
            "eval",
            s(&m),
            "--input",
            &format!("input_ids={}", s(&ids)),
            "--out",
            s(dir.path()),
            "--check",
            s(&refs),
            "--tolerance",
            tol,
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let ok = memc(&args("1e-4").iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        ok.stdout
            .contains("check logits: max|out - ref| / max|ref| = "),
        "{}",
        ok.stdout
    );
    fails_with(
        &args("1e-12").iter().map(String::as_str).collect::<Vec<_>>(),
        &["differ from the references", "> 1e-12"],
    );
}

#[test]
fn dump_ir_writes_a_parsable_file_per_pass() {
    let dir = tempfile::tempdir().unwrap();
    let m = example("qwen2-dynamo.onnx");
    let o = memc(&[
        "compile",
        s(&m),
        "--shape",
        "input_ids=1x4",
        "--dump-ir",
        s(dir.path()),
        "--train",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // One file per pass, numbered in running order: the import, the canonicalisation,
    // then every pass of the training build.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "00-import.mir",
            "01-canonicalize.mir",
            "02-lower-blocks.mir",
            "03-precision.mir",
            "04-loss.mir",
            "05-autodiff.mir",
            "06-optimizer.mir",
            "07-remat.mir",
            "08-lower-blocks.mir"
        ]
    );
    for (file, has_attention) in [
        ("00-import.mir", false),
        ("01-canonicalize.mir", true),
        ("07-remat.mir", true),
        ("08-lower-blocks.mir", true),
    ] {
        let text = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let g = memc_ir::parse(&text).unwrap();
        memc_ir::verify(&g).unwrap();
        assert_eq!(memc_ir::print(&g), text, "{file}");
        assert_eq!(text.contains("attention("), has_attention, "{file}");
    }
}

fn lines_json(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_prints_one_json_line_per_step() {
    let m = example("gpt2-dynamo.onnx");
    let data = example("gpt2-dynamo/inputs/input_ids.npy");
    let o = memc(&[
        "train",
        s(&m),
        "--data",
        s(&data),
        "--steps",
        "3",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let steps = lines_json(&o.stdout);
    assert_eq!(steps.len(), 3);
    for (i, line) in steps.iter().enumerate() {
        assert_eq!(line["step"], i + 1);
        assert_eq!(line["tokens"], 32);
        assert!(line["loss"].as_f64().unwrap() > 0.0 && line["step_ms"].as_f64().is_some());
        assert!(line["peak_bytes"].as_u64().unwrap() > 0);
    }
    // PyTorch's SGD trajectory (examples/train_fixtures.py).
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(example("gpt2-dynamo/train_ref.json")).unwrap(),
    )
    .unwrap();
    for (line, w) in steps.iter().zip(want["sgd"].as_array().unwrap()) {
        let (a, b) = (line["loss"].as_f64().unwrap(), w.as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * b.abs(), "{a} vs {b}");
    }
}

#[test]
fn compile_train_reports_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let svg = dir.path().join("plan.svg");
    let m = example("llama-dynamo.onnx");
    let o = memc(&[
        "compile",
        s(&m),
        "--shape",
        "input_ids=2x16",
        "--train",
        "--optimizer",
        "adamw",
        "--report",
        "--report-json",
        s(&report),
        "--plot",
        s(&svg),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("memory plan: peak "), "{}", o.stdout);
    assert!(
        o.stdout
            .contains("saved activations (forward values read by the backward pass): "),
        "{}",
        o.stdout
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    for key in [
        "params_bytes",
        "grads_bytes",
        "optimizer_bytes",
        "saved_activation_bytes",
        "peak_bytes",
        "recompute_flops",
        "flops",
    ] {
        assert!(r[key].is_u64(), "{key} missing: {r}");
    }
    // The cpu backend's arena is reported, and a training run allocates exactly that.
    let arena = r["cpu_backend"]["arena_bytes"].as_u64().unwrap();
    let data = example("llama-dynamo/inputs/input_ids.npy");
    let o2 = memc(&[
        "train",
        s(&m),
        "--data",
        s(&data),
        "--steps",
        "1",
        "--optimizer",
        "adamw",
        "--backend",
        "cpu",
    ]);
    assert_eq!(o2.code, 0, "{}", o2.stderr);
    assert_eq!(
        lines_json(&o2.stdout)[0]["peak_bytes"].as_u64().unwrap(),
        arena
    );
    // AdamW keeps two moments per weight; weights and their gradients have equal sizes.
    assert_eq!(
        r["optimizer_bytes"].as_u64().unwrap(),
        2 * r["grads_bytes"].as_u64().unwrap()
    );
    assert!(
        r["peak_bytes"].as_u64().unwrap()
            >= r["params_bytes"].as_u64().unwrap() + r["optimizer_bytes"].as_u64().unwrap()
    );
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("saved_activations"));
    // --emit plan lists every buffer.
    let o = memc(&[
        "compile",
        s(&m),
        "--shape",
        "input_ids=2x16",
        "--train",
        "--emit",
        "plan",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.starts_with("plan { peak_bytes = "));
    assert!(
        o.stdout.contains(" saved_activations\n")
            && o.stdout.contains(" @w\n")
            && o.stdout.contains(" @u\n")
    );
}

#[test]
fn bad_training_input() {
    let dir = tempfile::tempdir().unwrap();
    let m = example("llama-dynamo.onnx");
    let data = example("llama-dynamo/inputs/input_ids.npy");
    // A model without a [batch, seq, vocab] output.
    let mm = dir.path().join("mm.onnx");
    std::fs::write(
        &mm,
        matmul_model(
            weight(TensorProto {
                float_data: vec![0.5; 8],
                ..Default::default()
            }),
            vec![],
        ),
    )
    .unwrap();
    fails_with(
        &["compile", s(&mm), "--shape", "x=2x4", "--train"],
        &[
            "mm.onnx",
            "--loss next-token-ce: the next-token loss needs an output of shape [batch, seq, vocab]",
        ],
    );
    // An unknown optimizer (clap's message, on one line).
    fails_with(
        &["train", s(&m), "--data", s(&data), "--optimizer", "lion"],
        &["invalid value 'lion'", "possible values: sgd, adamw"],
    );
    // Data of the wrong dtype, rank or sequence length.
    let floats = dir.path().join("f.npy");
    npy_f32(&floats, &[2, 16], &[0.0; 32]);
    fails_with(
        &["train", s(&m), "--data", s(&floats)],
        &[
            "f.npy",
            "integer array of shape [rows, seq]",
            "float32[2x16]",
        ],
    );
    let flat = dir.path().join("flat.npy");
    memc::io::write_tensor(
        &flat,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![8], &[1; 8]),
    )
    .unwrap();
    fails_with(
        &["train", s(&m), "--data", s(&flat)],
        &["flat.npy", "integer array of shape [rows, seq]"],
    );
    fails_with(
        &[
            "train",
            s(&m),
            "--data",
            s(&data),
            "--shape",
            "input_ids=2x8",
        ],
        &["rows of 16 tokens", "compiled for 8"],
    );
    // A step that produces NaN names the step and the first non-finite tensor.
    fails_with(
        &[
            "train",
            s(&m),
            "--data",
            s(&data),
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--steps",
            "5",
        ],
        &["step ", "non-finite"],
    );
    // Token ids outside the vocabulary (kernels would clamp them silently).
    let big = dir.path().join("big.npy");
    let mut ids = memc::io::read_tensor(&data).unwrap().to_i64_vec();
    ids[19] = 256;
    memc::io::write_tensor(
        &big,
        &memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![2, 16], &ids),
    )
    .unwrap();
    fails_with(
        &["train", s(&m), "--data", s(&big), "--backend", "cpu"],
        &[
            "big.npy",
            "token id 256 at row 1, column 3",
            "vocabulary (0..256)",
        ],
    );
    // A model with inputs besides the token ids: they are given with --input.
    let bert = example("bert-dynamo.onnx");
    fails_with(
        &[
            "train",
            s(&bert),
            "--data",
            s(&example("bert-dynamo/inputs/input_ids.npy")),
        ],
        &["token_type_ids", "--input token_type_ids=FILE.npy"],
    );
    // --trainable that matches nothing, or is not a regex.
    fails_with(
        &[
            "train",
            s(&m),
            "--data",
            s(&data),
            "--trainable",
            "^nothing$",
        ],
        &["--trainable: no weight is trainable"],
    );
    fails_with(
        &["train", s(&m), "--data", s(&data), "--trainable", "("],
        &["not a regular expression"],
    );
}

#[test]
fn trainable_regex_freezes_the_rest() {
    let m = example("llama-dynamo.onnx");
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let o = memc(&[
        "compile",
        s(&m),
        "--shape",
        "input_ids=2x16",
        "--train",
        "--trainable",
        "norm",
        "--report-json",
        s(&report),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    // Llama has 5 RMSNorm weights of 64 elements.
    assert_eq!(r["training"]["trained_tensors"], 5);
    assert_eq!(r["training"]["trained_params"], 5 * 64);
    assert_eq!(r["grads_bytes"].as_u64().unwrap(), 5 * 256);
}

#[test]
fn schedule_reports_memory_and_bubbles_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (svg, trace) = (dir.path().join("s.svg"), dir.path().join("t.json"));
    let o = memc(&[
        "schedule",
        "--stages",
        "4",
        "--microbatches",
        "16",
        "--schedule",
        "v-min",
        "--json",
        "--svg",
        s(&svg),
        "--trace",
        s(&trace),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let j: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(
        j["peak_activation_microbatches"],
        serde_json::json!([2.0, 2.0, 2.0, 2.0])
    );
    assert!(j["bubble_rate"].as_f64().unwrap() <= 0.11);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    assert_eq!(t["traceEvents"].as_array().unwrap().len(), 4 * 2 * 16 * 3);
    let base = ["schedule", "--stages", "4", "--microbatches", "8"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|x| x.to_string()).collect()
    };
    fails_with(&with(&["--schedule", "zigzag"]), &["zigzag", "v-half"]);
    fails_with(
        &with(&["--schedule", "1f1b", "--costs", "1,2"]),
        &["--costs", "4 values"],
    );
    fails_with(
        &with(&["--schedule", "1f1b", "--costs", "1,0,1,0"]),
        &["--costs"],
    );
    fails_with(
        &[
            "schedule",
            "--stages",
            "0",
            "--microbatches",
            "8",
            "--schedule",
            "1f1b",
        ],
        &["at least 1"],
    );
}

#[test]
fn training_flags_take_comma_lists_and_budgets() {
    let model = example("llama-dynamo.onnx");
    let m = s(&model);
    let ok = memc(&[
        "compile",
        m,
        "--shape",
        "input_ids=2x16",
        "--train",
        "--betas",
        "0.9,0.95",
        "--activation-budget",
        "60%",
        "--emit",
        "ir",
    ]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    fails_with(
        &[
            "compile",
            m,
            "--shape",
            "input_ids=2x16",
            "--train",
            "--betas",
            "0.9",
        ],
        &["--betas", "two values"],
    );
    fails_with(
        &[
            "compile",
            m,
            "--shape",
            "input_ids=2x16",
            "--train",
            "--activation-budget",
            "lots",
        ],
        &["--activation-budget", "lots"],
    );
    fails_with(
        &[
            "compile",
            m,
            "--shape",
            "input_ids=2x16",
            "--train",
            "--activation-budget",
            "10",
        ],
        &["smallest feasible", "--activation-budget"],
    );
    fails_with(
        &["compile", m, "--shape", "input_ids=2x16", "--moc-k", "0"],
        &["--moc-k"],
    );
}

#[test]
fn reversible_layers_report_and_reject_bad_options() {
    let model = example("llama-dynamo.onnx");
    let m = s(&model);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let ok = memc(&[
        "compile",
        m,
        "--shape",
        "input_ids=2x16",
        "--train",
        "--reversible",
        "meft3",
        "--report-json",
        s(&json),
    ]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(
        ok.stderr.contains("reversible: meft3 on 2 of 2 layers"),
        "{}",
        ok.stderr
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rev = &r["reversible"];
    assert_eq!(rev["variant"], "meft3");
    assert_eq!(rev["layers"], 2);
    assert_eq!(rev["adapters"], 4);
    assert_eq!(rev["backward"]["couplings"], 4);
    let dev = rev["start_deviation"].as_f64().unwrap();
    assert!(dev > 0.0 && dev < 1.0, "{dev}");
    // Adapters only by default (MEFT's setting).
    assert_eq!(r["training"]["trained_params"], rev["adapter_params"]);
    // Memory beside the baselines: the plan's own figure, less than full fine-tuning's.
    let saved = &rev["saved_activation_bytes"];
    assert_eq!(saved["reconstruct"], r["saved_activation_bytes"]);
    assert!(saved["reconstruct"].as_u64().unwrap() < saved["stored"].as_u64().unwrap());
    assert!(saved["stored"].as_u64().unwrap() <= saved["full_fine_tuning"].as_u64().unwrap() * 2);
    assert!(saved["reconstruct"].as_u64().unwrap() < saved["full_fine_tuning"].as_u64().unwrap());
    assert_eq!(r["training"]["remat"]["layers"], 0);

    let base = ["compile", m, "--shape", "input_ids=2x16"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|x| x.to_string()).collect()
    };
    fails_with(
        &with(&["--reversible", "meft1", "--rev-layers", "3"]),
        &["--rev-layers 3", "1..=2"],
    );
    fails_with(
        &with(&["--reversible", "meft2", "--adapter-rank", "0"]),
        &["--adapter-rank 0"],
    );
    fails_with(
        &with(&["--reversible", "meft3", "--no-canonicalize"]),
        &["--reversible", "residual"],
    );
    fails_with(
        &with(&["--train", "--trainable", "adapters"]),
        &["--trainable adapters", "--reversible"],
    );
    fails_with(
        &with(&["--train", "--rev-check"]),
        &["--rev-check needs --reversible"],
    );

    // Training with the drift check: one drift per layer on every step's line.
    let data = example("llama-dynamo/inputs/input_ids.npy");
    let t = memc(&[
        "train",
        m,
        "--data",
        s(&data),
        "--steps",
        "2",
        "--reversible",
        "meft1",
        "--rev-check",
    ]);
    assert_eq!(t.code, 0, "{}", t.stderr);
    for line in lines_json(&t.stdout) {
        let d = line["rev_drift"].as_array().unwrap();
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|x| x.as_f64().unwrap() < 1e-3), "{line}");
    }
}

#[test]
fn pipeline_stages_report_each_devices_memory() {
    let model = root().join("examples/models/depth/llama-L8.onnx");
    let m = s(&model);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("p.json");
    for (schedule, chunks, head_device) in [("1f1b", 4, 3), ("v-half", 8, 0), ("interleaved", 8, 3)]
    {
        let o = memc(&[
            "compile",
            m,
            "--shape",
            "input_ids=2x32",
            "--train",
            "--pipeline-stages",
            "4",
            "--microbatches",
            "8",
            "--schedule",
            schedule,
            "--report",
            "--report-json",
            s(&json),
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(
            o.stdout
                .contains(&format!("pipeline: {schedule} on 4 stages")),
            "{}",
            o.stdout
        );
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let p = &r["pipeline"];
        assert_eq!(p["chunks"].as_array().unwrap().len(), chunks);
        assert_eq!(p["embedding_device"], 0);
        assert_eq!(p["head_device"], head_device, "{schedule}");
        let devices = p["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 4);
        if schedule == "1f1b" {
            // Device s keeps p − s microbatches of its chunk's activations.
            for (d, dev) in devices.iter().enumerate() {
                let c = &p["chunks"][d];
                assert_eq!(
                    dev["activation_peak_bytes"].as_u64().unwrap(),
                    (4 - d as u64) * c["saved_bytes_per_microbatch"].as_u64().unwrap()
                );
            }
        }
    }
    fails_with(
        &[
            "compile",
            m,
            "--shape",
            "input_ids=2x32",
            "--train",
            "--pipeline-stages",
            "9",
        ],
        &["cannot split 8 layers into 9"],
    );
    fails_with(
        &[
            "compile",
            m,
            "--shape",
            "input_ids=2x32",
            "--pipeline-stages",
            "2",
        ],
        &["--pipeline-stages", "--train"],
    );
    let out = tempfile::tempdir().unwrap();
    let exe = out.path().join("exe");
    fails_with(
        &[
            "compile",
            m,
            "--shape",
            "input_ids=2x32",
            "--train",
            "--pipeline-stages",
            "2",
            "--microbatches",
            "3",
            "-o",
            s(&exe),
        ],
        &["--microbatches 3 does not divide the batch of 2 rows"],
    );
    assert!(!exe.exists(), "nothing written on errors");
    let o = memc(&[
        "compile",
        m,
        "--shape",
        "input_ids=2x32",
        "--train",
        "--reversible",
        "meft1",
        "--rev-layers",
        "2",
        "--pipeline-stages",
        "2",
    ]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let last = o.stderr.lines().last().unwrap();
    assert!(
        last.starts_with("error: ") && last.contains("not split into pipeline stages"),
        "{last}"
    );
    fails_with(
        &[
            "compile",
            m,
            "--shape",
            "input_ids=2x32",
            "--train",
            "--pipeline-stages",
            "2",
            "--schedule",
            "zz",
        ],
        &["--schedule `zz`"],
    );
}

#[test]
fn pipelined_training_matches_plain_training() {
    let model = root().join("examples/models/depth/llama-L4.onnx");
    let m = s(&model);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ids.npy");
    write_ids_8x16(&data);
    let base = [
        "train",
        m,
        "--data",
        s(&data),
        "--shape",
        "input_ids=8x16",
        "--steps",
        "3",
        "--lr",
        "1e-2",
    ];
    let losses = |extra: &[&str]| -> Vec<f64> {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let o = memc(&args);
        assert_eq!(o.code, 0, "{}", o.stderr);
        lines_json(&o.stdout)
            .iter()
            .map(|l| l["loss"].as_f64().unwrap())
            .collect()
    };
    let plain = losses(&[]);
    for schedule in ["1f1b", "zb-h1", "v-zb", "interleaved"] {
        let piped = losses(&[
            "--pipeline-stages",
            "2",
            "--microbatches",
            "4",
            "--schedule",
            schedule,
        ]);
        for (a, b) in piped.iter().zip(&plain) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{schedule}: {piped:?} vs {plain:?}"
            );
        }
    }
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--pipeline-stages", "2", "--microbatches", "3"]);
    fails_with(&args, &["--microbatches 3 does not divide"]);
    // The cpu backend: each pass a compiled program, one thread per device.
    for schedule in ["v-half", "gpipe"] {
        let piped = losses(&[
            "--pipeline-stages",
            "2",
            "--microbatches",
            "4",
            "--schedule",
            schedule,
            "--backend",
            "cpu",
        ]);
        for (a, b) in piped.iter().zip(&plain) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "cpu {schedule}: {piped:?} vs {plain:?}"
            );
        }
    }
}

/// `mpirun -n N memc train ... --pipeline-stages P [--data-parallel D]`: one process per stage
/// and replica over MPI, on the reference interpreter and on compiled pass programs, gives the
/// single process's losses within 1e-6 (Llama under 1F1B and V-Half, GPT-2's tied head under
/// ZB-H1, P = 2 × D = 1, 2 × 2 and 1 × 2); a stopped rank is named by its peer once
/// MEMC_RANK_TIMEOUT passes; a job of the wrong size and torchrun's variables are one error
/// line each.
#[test]
fn pipelined_training_across_processes_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ids.npy");
    write_ids_8x16(&data);
    let llama = "examples/models/depth/llama-L4.onnx";
    let cases = [
        (llama, "1f1b", "ref", 2, 1),
        (llama, "v-half", "ref", 2, 1),
        // GPT-2's tied head: two stages' weight gradients summed on both.
        ("examples/models/gpt2-dynamo.onnx", "zb-h1", "ref", 2, 1),
        ("examples/models/gpt2-dynamo.onnx", "zb-h1", "ref", 1, 2),
        // Compiled pass programs.
        (llama, "v-half", "cpu", 2, 1),
        (llama, "1f1b", "cpu", 2, 2),
    ];
    let args = |model: &str, schedule: &str, backend: &str, p: usize, m: usize, d: usize| {
        let mut a: Vec<String> = [
            "train",
            s(&root().join(model)),
            "--data",
            s(&data),
            "--shape",
            "input_ids=8x16",
            "--steps",
            "3",
            "--lr",
            "1e-2",
            "--pipeline-stages",
            &p.to_string(),
            "--microbatches",
            &m.to_string(),
            "--schedule",
            schedule,
            "--backend",
            backend,
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        if d > 1 {
            a.extend(["--data-parallel".to_string(), d.to_string()]);
        }
        a
    };
    let mpirun = |n: usize| {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &n.to_string(),
        ]);
        c
    };
    for (model, schedule, backend, p, d) in cases {
        // The whole batch in one process, in microbatches of the same size (the replicas'
        // microbatches together).
        let one: Vec<f64> = {
            let o = memc(&args(model, schedule, backend, p, 4, 1));
            assert_eq!(o.code, 0, "{}", o.stderr);
            lines_json(&o.stdout)
                .iter()
                .map(|l| l["loss"].as_f64().unwrap())
                .collect()
        };
        let o = mpirun(p * d)
            .arg(env!("CARGO_BIN_EXE_memc"))
            .args(args(model, schedule, backend, p, 4 / d, d))
            .output()
            .expect("mpirun is missing: run scripts/setup.sh (it installs Open MPI)");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        let lines = lines_json(&String::from_utf8_lossy(&o.stdout));
        let mpi: Vec<f64> = lines.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
        assert_eq!(mpi.len(), 3, "rank 0 prints the losses: {lines:?}");
        assert!(lines.iter().all(|l| l["pipeline"]["world_size"] == p * d));
        for (a, b) in mpi.iter().zip(&one) {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{model} {schedule} {backend} {p}×{d} under mpirun: {mpi:?} vs {one:?}"
            );
        }
        if backend == "cpu" {
            // Each rank allocates what its share plans.
            let ranks: Vec<&str> = err
                .lines()
                .filter(|l| l.contains(" bytes allocated, "))
                .collect();
            assert_eq!(ranks.len(), p * d, "{err}");
            for l in ranks {
                let (_, rest) = l.split_once("): ").unwrap();
                let (got, rest) = rest.split_once(" bytes allocated, ").unwrap();
                let (want, _) = rest.split_once(" planned").unwrap();
                assert_eq!(got, want, "{l}");
            }
        }
    }
    // A rank that stops (rank 1 runs 1 step of 3): rank 0 names it once MEMC_RANK_TIMEOUT
    // passes, and the job ends.
    let base = args(llama, "1f1b", "ref", 2, 4, 1);
    let mut short = base.clone();
    let at = short.iter().position(|a| a == "--steps").unwrap() + 1;
    short[at] = "1".into();
    let started = std::time::Instant::now();
    let o = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-x",
            "MEMC_RANK_TIMEOUT",
        ])
        .env("MEMC_RANK_TIMEOUT", "3")
        .args(["-n", "1"])
        .arg(env!("CARGO_BIN_EXE_memc"))
        .args(&base)
        .args([":", "-n", "1"])
        .arg(env!("CARGO_BIN_EXE_memc"))
        .args(&short)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("rank 0: rank 1 sent nothing for 3 s")
            && started.elapsed() < std::time::Duration::from_secs(90),
        "{err}"
    );
    // A job of another size than stages × replicas.
    let o = mpirun(3)
        .arg(env!("CARGO_BIN_EXE_memc"))
        .args(&base)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("the MPI job has 3 ranks, but the program has 2 pipeline stages"),
        "{err}"
    );
    // torchrun's variables without MPI.
    let o = Command::new(env!("CARGO_BIN_EXE_memc"))
        .args(&base)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines()
            .last()
            .unwrap()
            .contains("WORLD_SIZE is set (torchrun's launch): launch memc's ranks with mpirun"),
        "{err}"
    );
}

/// Token ids `[8, 16]` (deterministic, below 128) as an int64 `.npy`.
fn write_ids_8x16(path: &Path) {
    let ids: Vec<i64> = (0..8 * 16).map(|i| (i * 37 + 11) % 128).collect();
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    let mut header = "{'descr': '<i8', 'fortran_order': False, 'shape': (8, 16), }".to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for x in ids {
        bytes.extend(x.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn train_feeds_the_models_other_inputs_from_input_files() {
    // BERT takes token_type_ids and attention_mask besides the token ids: both backends
    // train it with them held fixed, with the same losses.
    let bert = example("bert-dynamo.onnx");
    let dir = example("bert-dynamo/inputs");
    let mut losses = vec![];
    for backend in ["ref", "cpu"] {
        let o = memc(&[
            "train",
            s(&bert),
            "--data",
            s(&dir.join("input_ids.npy")),
            "--input",
            &format!(
                "token_type_ids={}",
                dir.join("token_type_ids.npy").display()
            ),
            "--input",
            &format!(
                "attention_mask={}",
                dir.join("attention_mask.npy").display()
            ),
            "--steps",
            "2",
            "--backend",
            backend,
        ]);
        assert_eq!(o.code, 0, "{backend}: {}", o.stderr);
        let lines = lines_json(&o.stdout);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["backend"], backend);
        losses.push(lines[1]["loss"].as_f64().unwrap());
    }
    assert!(
        (losses[0] - losses[1]).abs() <= 1e-4 * losses[0].abs(),
        "{losses:?}"
    );
}

#[test]
fn opt_lists_runs_dumps_and_times_every_pass_of_the_table() {
    // --list-passes names every pass of the table with its options.
    let o = memc(&["opt", "--list-passes"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for p in memc_passes::table::PASSES {
        assert!(
            o.stdout.lines().any(|l| l.starts_with(p.name)),
            "{} missing from:\n{}",
            p.name,
            o.stdout
        );
    }
    assert!(o.stdout.contains("policy"), "{}", o.stdout);
    // A training build from text, pass by pass, in MLIR's syntax and with repeated --pass;
    // one dump per pass; the analyses render their results as comments that parse back.
    let dir = tempfile::tempdir().unwrap();
    let f = root().join("tests/passes/loss/tiny_lm_fused.mir");
    let dumps = dir.path().join("dumps");
    let o = memc(&[
        "opt",
        s(&f),
        "--pass",
        "loss{fused=false},autodiff{trainable=all}",
        "--pass",
        "optimizer{kind=sgd momentum=0.9},lower-blocks,plan",
        "--dump-ir",
        s(&dumps),
        "--time-passes",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let g = memc_ir::parse(&o.stdout).unwrap();
    memc_ir::verify(&g).unwrap();
    assert!(o.stdout.contains("// plan { peak_bytes = "), "{}", o.stdout);
    assert!(o.stderr.contains("time: optimizer{"), "{}", o.stderr);
    let mut files: Vec<String> = std::fs::read_dir(&dumps)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "00-loss.mir",
            "01-autodiff.mir",
            "02-optimizer.mir",
            "03-lower-blocks.mir",
            "04-plan.mir"
        ]
    );
    // Bad pipelines: one line naming the pass or option.
    fails_with(
        &["opt", s(&f), "--pass", "remat{policy=most}"],
        &["remat", "policy=most", "one of auto, full, exact"],
    );
    fails_with(
        &["opt", s(&f), "--pass", "remat{polcy=full}"],
        &["no option `polcy`"],
    );
    fails_with(&["opt", s(&f), "--pass", "loss,"], &["ends with a comma"]);
    fails_with(
        &["opt", s(&f), "--pass", "optimizer"],
        &["run the autodiff pass first"],
    );
}

/// `Dropout` in inference mode is the identity (`Relu` is `max(x, 0)`); active dropout (a
/// constant true `training_mode` with a non-zero ratio) is one clear error.
#[test]
fn dropout_and_relu_import() {
    use memc::onnx::proto::{attribute_proto::AttributeType, AttributeProto};
    let constant = |out: &str, attr: AttributeProto| NodeProto {
        op_type: Some("Constant".into()),
        name: Some(format!("/test/{out}")),
        output: vec![out.into()],
        attribute: vec![attr],
        ..Default::default()
    };
    let ratio = constant(
        "r",
        AttributeProto {
            name: Some("value_float".into()),
            r#type: Some(AttributeType::Float as i32),
            f: Some(0.1),
            ..Default::default()
        },
    );
    let training = |on: i64| {
        constant(
            "t",
            AttributeProto {
                name: Some("value_int".into()),
                r#type: Some(AttributeType::Int as i32),
                i: Some(on),
                ..Default::default()
            },
        )
    };
    let w = weight(TensorProto {
        float_data: (0..8).map(|v| v as f32 - 3.0).collect(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("dropout.onnx");
    let nodes = |on: i64| {
        vec![
            ratio.clone(),
            training(on),
            node("Relu", &["h"], &["a"]),
            node("Dropout", &["a", "r", "t"], &["y"]),
        ]
    };
    std::fs::write(&model, matmul_model(w.clone(), nodes(0))).unwrap();
    let o = memc(&["compile", s(&model), "--shape", "x=1x4", "--emit", "ir"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("max("), "{}", o.stdout);
    std::fs::write(&model, matmul_model(w, nodes(1))).unwrap();
    fails_with(
        &["compile", s(&model), "--shape", "x=1x4", "--emit", "ir"],
        &["Dropout", "active dropout", "model.eval()"],
    );
}

/// `--threads`: the cpu backend's GEMMs on 1 or 2 threads give identical losses (the threads
/// split rows and columns, never a sum); out of range is one error.
#[test]
fn threads_change_speed_not_results() {
    let m = example("llama-dynamo.onnx");
    let data = example("llama-dynamo/inputs/input_ids.npy");
    let run = |t: &str| {
        let o = memc(&[
            "train",
            s(&m),
            "--data",
            s(&data),
            "--steps",
            "2",
            "--backend",
            "cpu",
            "--threads",
            t,
        ]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        o.stdout
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(run("1"), run("2"));
    fails_with(
        &["train", s(&m), "--data", s(&data), "--threads", "9"],
        &["--threads 9", "1 to 4"],
    );
}
