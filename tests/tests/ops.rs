//! ONNX op conformance: one small model per op and opset variant (`examples/ops/make.py`),
//! imported by memc and evaluated by the reference interpreter, against onnxruntime.

use std::collections::HashMap;

use memc_ir::{DType, Tensor};
use memc_onnx::{import, ImportOptions};
use memc_tests::root;

fn npys(dir: &std::path::Path) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        m.insert(
            p.file_stem().unwrap().to_string_lossy().to_string(),
            memc::io::read_tensor(&p).unwrap(),
        );
    }
    m
}

#[test]
fn every_op_case_matches_onnxruntime() {
    let dir = root().join("examples/ops");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "only {} op cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let result = (|| -> Result<(), String> {
            let g = import(&dir.join(format!("{name}.onnx")), &ImportOptions::default())
                .map_err(|e| e.to_string())?;
            let inputs = npys(&dir.join(name).join("inputs"));
            let outputs = memc_ir::interpret(&g, &inputs).map_err(|e| e.to_string())?;
            let refs = npys(&dir.join(name).join("ref"));
            for (out, got) in &outputs {
                let want = refs
                    .get(out)
                    .ok_or(format!("no reference for output {out}"))?;
                let got = memc::io::tensor_of(memc::io::npy_of(got));
                if got.ty() != want.ty() {
                    return Err(format!(
                        "output {out}: memc gives {} but onnxruntime {}",
                        got.ty(),
                        want.ty()
                    ));
                }
                if want.dtype().is_float() {
                    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
                    let scale = w
                        .iter()
                        .filter(|v| v.is_finite())
                        .fold(1f32, |a, v| a.max(v.abs()));
                    // f16 results are compared at f16's precision.
                    let tol = if want.dtype() == DType::F16 {
                        1e-3
                    } else {
                        1e-5
                    } * scale;
                    for (k, (a, b)) in g.iter().zip(&w).enumerate() {
                        let same = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol;
                        if !same {
                            return Err(format!("output {out}[{k}]: memc {a} vs onnxruntime {b}"));
                        }
                    }
                } else if got.to_i64_vec() != want.to_i64_vec() {
                    return Err(format!("output {out}: integer values differ"));
                }
            }
            Ok(())
        })();
        match result {
            Ok(()) => eprintln!("ok   {name}"),
            Err(e) => {
                eprintln!("FAIL {name}: {e}");
                failures.push(format!("{name}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
