//! The e-graph canonicalisation on every example model (its textual cases,
//! `tests/passes/canonicalize/*.mir`, run with every pass's in `tests/passes.rs`):
//! (one norm op per norm of the model, one `attention` and one FFN block per layer, logits
//! unchanged), and training through the recognised ops on the cpu backend.

use std::collections::HashMap;

use memc_passes::canonicalize::{canonicalize, Limits};
use memc_tests::{
    adamw, examples, max_rel, reference_losses, train_args, train_reference, training_program, AUTO,
};

#[test]
fn every_example_gets_its_blocks_and_the_same_logits() {
    for ex in examples() {
        let (mut g, inputs) = ex.import();
        let stats = canonicalize(&mut g, &Limits::default()).unwrap();
        // Llama and Qwen2: 2 layers × 2 RMSNorms + the final norm. GPT-2 has 5 LayerNorms
        // (ln_1, ln_2 per layer, ln_f) and BERT 6 (embeddings, 2 per layer, the MLM head's
        // transform): native from opset 17, decomposed at opset 14 and recognised.
        let (rms, layer) = match ex.family.as_str() {
            "llama" | "qwen2" => (5, 0),
            "gpt2" => (0, 5),
            _ => (0, 6),
        };
        let count = |k: &str| stats.recognised.get(k).copied().unwrap_or(0);
        assert_eq!(
            (count("rms_norm"), count("layer_norm")),
            (rms, layer),
            "{}",
            ex.name
        );
        // One attention and one FFN block per layer, masks and grouped-query heads included.
        assert_eq!(count("attention"), 2, "{}", ex.name);
        let (ffn, standalone) = match ex.family.as_str() {
            "llama" | "qwen2" => (("swiglu_ffn", 2), ("silu", 0)),
            "gpt2" => (("gelu_ffn", 2), ("gelu_tanh", 0)),
            // BERT's MLM head transform is dense → GELU → LayerNorm: a GELU outside an FFN.
            _ => (("gelu_ffn", 2), ("gelu", 1)),
        };
        assert_eq!(count(ffn.0), ffn.1, "{}: {:?}", ex.name, stats.recognised);
        assert_eq!(count(standalone.0), standalone.1, "{}", ex.name);
        // Rotary embeddings on queries and keys (Llama, Qwen2), and two residual connections
        // per layer (around attention and around the FFN; pre-norm and post-norm alike).
        let rope = if ffn.0 == "swiglu_ffn" { 4 } else { 0 };
        assert_eq!(count("rope"), rope, "{}", ex.name);
        assert_eq!(count("residual"), 4, "{}: {:?}", ex.name, stats.recognised);
        for op in ["sigmoid", "erf", "tanh"] {
            assert!(
                !g.op_counts().contains_key(op),
                "{}: a `{op}` is left",
                ex.name
            );
        }
        assert!(
            !g.op_counts().contains_key("softmax"),
            "{}: a softmax is left",
            ex.name
        );
        assert_eq!(stats.stop, "saturated", "{}", ex.name);
        let out = memc_ir::interpret(&g, &inputs).unwrap();
        for (name, want) in ex.references() {
            let got = &out.iter().find(|(n, _)| *n == name).unwrap().1;
            let err = memc_tests::rel_error(got, &want);
            assert!(err <= 1e-5, "{}: `{name}` differs by {err:.2e}", ex.name);
        }
        eprintln!(
            "{:<28} {} -> {} nodes, {:?}",
            ex.name, stats.nodes_before, stats.nodes_after, stats.recognised
        );
    }
}

#[test]
fn canonicalized_models_train_like_pytorch_on_both_backends() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.family != "bert" && !e.name.contains("opset"))
    {
        let a = train_args(adamw(), None, AUTO);
        // `training_program` canonicalizes, as the driver does.
        let (mut g, _) = training_program(&ex, &a);
        assert!(g.op_counts().contains_key("attention"));
        let want: Vec<f64> = train_reference(&ex)["adamw"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let reference = reference_losses(&ex, &a, 1e-3, 0.01, want.len());
        // cpu backend (the attention, norm and attention-backward kernels).
        let path = ex.path.with_extension("").join("inputs/input_ids.npy");
        let mut data = memc::train::Batches::open(&path).unwrap();
        let lopts = memc::train::LoopOptions {
            steps: want.len(),
            lr: 1e-3,
            weight_decay: 0.01,
            fixed: vec![],
            save: None,
            resume: None,
            layout: Default::default(),
            run: Default::default(),
            log: None,
            eval: None,
        };
        let cpu = memc::train::run_host(
            &mut g,
            &a,
            &mut data,
            &path.display().to_string(),
            &lopts,
            &ex.name,
        )
        .unwrap();
        let (e_ref, e_cpu) = (max_rel(&reference, &want), max_rel(&cpu, &want));
        eprintln!(
            "{:<14} canonicalized, vs PyTorch: reference {e_ref:.2e}, cpu {e_cpu:.2e}",
            ex.name
        );
        assert!(
            e_ref <= 1e-4 && e_cpu <= 1e-4,
            "{}: {reference:?} / {cpu:?} vs {want:?}",
            ex.name
        );
    }
}

/// Import folds the same op on the same constants once: the exporters repeat each layer's
/// mask arithmetic (`Where(mask, 0, -inf)` per layer), and every copy was a separate constant
/// of batch × seq × seq elements. No two constants (of more than 64 elements) of an imported example are equal.
#[test]
fn every_example_imports_each_large_folded_constant_once() {
    for ex in examples() {
        let (g, _) = ex.import();
        let mut seen: HashMap<(&memc_ir::TensorType, &[u8]), String> = HashMap::new();
        for v in g.values() {
            let memc_ir::ValueDef::Param {
                name,
                role: memc_ir::ParamRole::Constant,
                data: Some(t),
            } = &v.def
            else {
                continue;
            };
            if t.numel() <= 64 {
                continue;
            }
            if let Some(first) = seen.insert((t.ty(), &t.bytes()[..]), name.clone()) {
                panic!("{}: constants `{first}` and `{name}` are equal", ex.name);
            }
        }
    }
}
