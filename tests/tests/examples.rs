//! Every example model, from both of PyTorch's exporters: imported by memc, evaluated by the
//! reference interpreter, and compared with onnxruntime.

use std::collections::HashMap;

use memc_ir::ValueDef;
use memc_onnx::{import, ImportOptions};
use memc_tests::{examples, rel_error};

fn shapes_of(inputs: &HashMap<String, memc_ir::Tensor>) -> ImportOptions {
    ImportOptions {
        shapes: inputs
            .iter()
            .map(|(k, t)| (k.clone(), t.shape().to_vec()))
            .collect(),
    }
}

#[test]
fn every_family_exporter_and_opset_edge_is_present() {
    let names: Vec<String> = examples().into_iter().map(|e| e.name).collect();
    for family in ["llama", "gpt2", "bert", "qwen2"] {
        for variant in [
            "dynamo",
            "torchscript",
            "dynamo-opset20",
            "torchscript-opset14",
        ] {
            assert!(names.contains(&format!("{family}-{variant}")), "{names:?}");
        }
    }
}

#[test]
fn every_example_matches_onnxruntime() {
    for ex in examples() {
        let inputs = ex.inputs();
        let g =
            import(&ex.path, &shapes_of(&inputs)).unwrap_or_else(|e| panic!("{}: {e}", ex.name));
        let outputs =
            memc_ir::interpret(&g, &inputs).unwrap_or_else(|e| panic!("{}: {e}", ex.name));
        let refs = ex.references();
        assert_eq!(outputs.len(), refs.len(), "{}", ex.name);
        for (name, got) in &outputs {
            let err = rel_error(got, &refs[name]);
            eprintln!("{:<20} {name}: max|diff|/max|ref| = {err:.2e}", ex.name);
            assert!(
                err <= 1e-4,
                "{} output {name}: relative error {err:.3e} > 1e-4",
                ex.name
            );
        }
    }
}

#[test]
fn weights_are_the_models_parameters() {
    for ex in examples() {
        let inputs = ex.inputs();
        let g = import(&ex.path, &shapes_of(&inputs)).unwrap();
        let weights = g.params_numel();
        // Exactly PyTorch's parameters: the TorchScript exporter's transposed copy of a tied LM
        // head is tied again on import.
        assert_eq!(weights, ex.torch_params, "{}", ex.name);
        // Parameters point into the memory-mapped file (only a folded transpose, undone to
        // the parameter's own layout, is copied once).
        let file = std::fs::metadata(&ex.path).unwrap().len() as usize;
        let model = memc_onnx::load_model(&ex.path).unwrap();
        let lo = model
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .filter_map(|t| t.raw_data.as_ref())
            .map(|b| b.as_ptr() as usize)
            .min()
            .unwrap();
        assert!(lo > 0 && file > 0);
    }
}

#[test]
fn tied_embeddings_stay_one_parameter() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.family == "qwen2" || e.family == "gpt2")
    {
        let g = import(&ex.path, &shapes_of(&ex.inputs())).unwrap();
        // The token embedding: the [vocab, d] table a `gather` reads.
        let table = g
            .nodes()
            .iter()
            .filter(|n| n.op.name() == "gather")
            .map(|n| n.inputs[0])
            .find(|&p| {
                matches!(g.value(p).def, ValueDef::Param { .. }) && g.value(p).ty.shape == [256, 64]
            })
            .unwrap_or_else(|| panic!("{}: no embedding table", ex.name));
        let users = g
            .nodes()
            .iter()
            .filter(|n| n.inputs.contains(&table))
            .count();
        assert!(
            users >= 2,
            "{}: the tied table feeds {users} node(s)",
            ex.name
        );
        // ... and the LM head reads the same parameter: no second [256, 64] table feeds a matmul.
        let head_tables = g
            .params()
            .filter(|&p| p != table && g.value(p).ty.shape == [256, 64])
            .filter(|&p| {
                g.nodes()
                    .iter()
                    .any(|n| n.inputs.contains(&p) && n.op.name() == "transpose")
            })
            .count();
        assert_eq!(head_tables, 0, "{}", ex.name);
    }
}

#[test]
fn shape_arithmetic_folds_away() {
    // After import no op computes shapes: every remaining node works on activations.
    for ex in examples() {
        let g = import(&ex.path, &shapes_of(&ex.inputs())).unwrap();
        for n in g.nodes() {
            let all_i64 = n
                .inputs
                .iter()
                .chain(&n.outputs)
                .all(|&v| g.value(v).ty.dtype == memc_ir::DType::I64);
            assert!(
                !all_i64 || n.op.name() == "gather",
                "{}: integer-only node left: {:?}",
                ex.name,
                n.op
            );
        }
    }
}

#[test]
fn other_shapes_bind_the_same_model() {
    // The same files at batch 3 x seq 9: dynamic dims really are bound from --shape.
    for ex in examples() {
        let mut opts = ImportOptions::default();
        for (name, _) in ex.inputs() {
            opts.shapes.insert(name, vec![3, 9]);
        }
        let g = import(&ex.path, &opts).unwrap_or_else(|e| panic!("{}: {e}", ex.name));
        let (_, logits) = &g.outputs()[0];
        assert_eq!(g.value(*logits).ty.shape, vec![3, 9, 256], "{}", ex.name);
    }
}

#[test]
fn llama_dynamo_ir_snapshot() {
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let opts = ImportOptions {
        shapes: HashMap::from([("input_ids".to_string(), vec![1, 8])]),
    };
    let g = import(&ex.path, &opts).unwrap();
    insta::assert_snapshot!(memc_ir::print(&g));
}

#[test]
fn op_counts_snapshot() {
    let mut s = String::new();
    for ex in examples() {
        let g = import(&ex.path, &shapes_of(&ex.inputs())).unwrap();
        let counts: Vec<String> = g
            .op_counts()
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        s.push_str(&format!("{}: {}\n", ex.name, counts.join(", ")));
    }
    insta::assert_snapshot!(s);
}

#[test]
fn every_example_matches_onnxruntime_on_the_cpu_backend() {
    // Kernels generated through MLIR and LLVM, matmuls on the runtime's GEMM.
    for ex in examples() {
        let inputs = ex.inputs();
        let g = import(&ex.path, &shapes_of(&inputs)).unwrap();
        let outputs =
            memc::train::eval_host(&g, &inputs).unwrap_or_else(|e| panic!("{}: {e:#}", ex.name));
        let refs = ex.references();
        for (name, got) in &outputs {
            let err = rel_error(got, &refs[name]);
            eprintln!(
                "{:<26} cpu backend {name}: max|diff|/max|ref| = {err:.2e}",
                ex.name
            );
            assert!(
                err <= 1e-4,
                "{} output {name}: relative error {err:.3e} > 1e-4",
                ex.name
            );
        }
    }
}
