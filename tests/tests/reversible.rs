//! Reversible layers (MEFT, `--reversible`): exact gradients by reconstruction, activation
//! memory independent of depth, drift measured, adapters fine-tune.

use std::collections::HashMap;

use memc_ir::{DType, Graph, Tensor};
use memc_passes::reversible::{apply_reversible, RevOptions, Variant};
use memc_tests::*;

const VARIANTS: [Variant; 3] = [Variant::Meft1, Variant::Meft2, Variant::Meft3];

/// The example's canonical forward graph made reversible, and its inputs.
fn reversible(
    ex: &Example,
    variant: Variant,
    layers: Option<usize>,
) -> (Graph, HashMap<String, Tensor>) {
    let (mut g, inputs) = ex.import();
    memc_passes::canonicalize::canonicalize(&mut g, &Default::default())
        .unwrap_or_else(|e| panic!("{}: {e}", ex.name));
    apply_reversible(
        &mut g,
        &RevOptions {
            variant,
            layers,
            adapter_rank: 8,
            seed: 0,
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", ex.name));
    (g, inputs)
}

fn sgd_options(trainable: &str, store: bool, check: bool) -> TrainOptions {
    let mut a = train_args(sgd(0.0), None, AUTO);
    a.trainable = Trainable::parse(trainable);
    a.rev_backward = if store {
        RevBackward::Store
    } else {
        RevBackward::Reconstruct { check }
    };
    a
}

fn feeds(inputs: &HashMap<String, Tensor>, lr: f64, step: usize) -> HashMap<String, Tensor> {
    let mut f = inputs.clone();
    let scalar = |v: f64| Tensor::from_f64(DType::F32, vec![], &[v]);
    f.insert("memc.lr".into(), scalar(lr));
    f.insert("memc.weight_decay".into(), scalar(0.0));
    f.insert("memc.step".into(), scalar(step as f64));
    f
}

/// Runs one step and returns the loss and each trained weight's gradient (by name), read
/// back from SGD's update `p − lr·g` (lr 1, no momentum or decay).
fn one_step_gradients(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
) -> (f64, HashMap<String, Vec<f64>>) {
    let r = memc_ir::run(
        g,
        &feeds(inputs, 1.0, 1),
        &memc_ir::RunOptions { check_nan: true },
    )
    .unwrap();
    let mut grads = HashMap::new();
    for (p, t) in &r.updates {
        let memc_ir::ValueDef::Param {
            name,
            data: Some(old),
            ..
        } = &g.value(*p).def
        else {
            continue;
        };
        let (old, new) = (old.to_f64_vec(), t.to_f64_vec());
        grads.insert(
            name.clone(),
            old.iter().zip(&new).map(|(a, b)| a - b).collect(),
        );
    }
    (r.outputs[0].1.to_f64_vec()[0], grads)
}

/// Bytes of the forward values the backward pass reads that the reversible stack computed
/// (its nodes are named `rev<layer>/...` and `memc.rev.<layer>...`), and the bytes of one
/// stream.
fn saved_from_the_stack(g: &Graph) -> (u64, u64) {
    let mut kept = std::collections::HashSet::new();
    let mut stream = 0;
    for node in g.nodes() {
        if node.name.starts_with("rev") && node.name.contains("/couple") {
            stream = g.value(node.outputs[0]).ty.bytes() as u64;
        }
        if node.phase == memc_ir::Phase::Forward {
            continue;
        }
        for &v in &node.inputs {
            if let Some(p) = g.producer(v) {
                let p = g.node(p);
                if p.phase == memc_ir::Phase::Forward
                    && ((p.name.starts_with("rev") && !p.name.starts_with("rev.out"))
                        || p.name.starts_with("memc.rev"))
                {
                    kept.insert(v);
                }
            }
        }
    }
    (
        kept.iter().map(|&v| g.value(v).ty.bytes() as u64).sum(),
        stream,
    )
}

#[test]
fn gradients_by_reconstruction_equal_stored_activations_on_every_example() {
    let mut worst_all = 0f64;
    for ex in examples() {
        for variant in VARIANTS {
            for layers in [None, Some(1)] {
                let (g0, inputs) = reversible(&ex, variant, layers);
                let build = |store: bool| {
                    let mut g = g0.clone();
                    memc::train::build(&mut g, &sgd_options("all", store, false))
                        .unwrap_or_else(|e| panic!("{}: {e:#}", ex.name));
                    g
                };
                let (rec, stored) = (build(false), build(true));
                // The backward pass keeps at most the stack's final two streams' worth of
                // what the stack computed (the streams, or what they are cheaply recomputed
                // from), whatever its depth.
                let (kept, stream) = saved_from_the_stack(&rec);
                assert!(
                    stream > 0 && kept <= 2 * stream,
                    "{} {variant:?} {layers:?}: the backward pass keeps {kept} bytes of the stack (a stream is {stream})",
                    ex.name
                );
                let (l_rec, g_rec) = one_step_gradients(&rec, &inputs);
                let (l_st, g_st) = one_step_gradients(&stored, &inputs);
                assert_eq!(l_rec, l_st, "{}: the forward pass is the same", ex.name);
                assert_eq!(g_rec.len(), g_st.len());
                let mut worst = 0f64;
                for (name, want) in &g_st {
                    let got = &g_rec[name];
                    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
                    let err = got
                        .iter()
                        .zip(want)
                        .fold(0f64, |m, (a, b)| m.max((a - b).abs()))
                        / scale;
                    worst = worst.max(err);
                }
                eprintln!(
                    "{:<28} {:<6} layers {:<4} {} gradients, worst relative difference {worst:.2e}",
                    ex.name,
                    variant.name(),
                    layers.map_or("all".into(), |n| n.to_string()),
                    g_st.len()
                );
                assert!(
                    worst <= 1e-3,
                    "{} {variant:?}: gradients differ by {worst:.2e}",
                    ex.name
                );
                worst_all = worst_all.max(worst);
            }
        }
    }
    eprintln!("worst relative gradient difference over every example and variant: {worst_all:.2e}");
}

/// The 2/4/8/16-layer Llamas of one width (`examples/models/depth/`, from
/// `scripts/gen-big-llama.py --hidden 32 --heads 4 --kv-heads 2 --ffn 64 --vocab 128`).
fn depth_model(layers: usize, rev: Option<Variant>) -> Graph {
    let path = root().join(format!("examples/models/depth/llama-L{layers}.onnx"));
    let mut g = canonical_model(&path, &[4, 32]);
    if let Some(variant) = rev {
        apply_reversible(
            &mut g,
            &RevOptions {
                variant,
                layers: None,
                adapter_rank: 8,
                seed: 0,
            },
        )
        .unwrap();
    }
    g
}

#[test]
fn saved_activations_do_not_grow_with_depth() {
    for variant in VARIANTS {
        let mut rows = vec![];
        for layers in [2, 4, 8, 16] {
            let mut plain = depth_model(layers, None);
            let mut rev = depth_model(layers, Some(variant));
            memc::train::build(&mut plain, &sgd_options("all", false, false)).unwrap();
            let mut stored = rev.clone();
            memc::train::build(&mut rev, &sgd_options("adapters", false, false)).unwrap();
            memc::train::build(&mut stored, &sgd_options("adapters", true, false)).unwrap();
            let saved = |g: &Graph| memc_passes::plan::plan(g).saved_activation_bytes;
            rows.push((layers, saved(&plain), saved(&stored), saved(&rev)));
        }
        for (layers, plain, stored, rev) in &rows {
            eprintln!(
                "{:<6} {layers:>2} layers: saved activations {rev:>8} bytes reversible, {stored:>8} stored, {plain:>8} full fine-tuning ({:.1}% less)",
                variant.name(),
                100.0 * (1.0 - *rev as f64 / *plain as f64)
            );
        }
        let (min, max) = rows
            .iter()
            .fold((u64::MAX, 0), |(lo, hi), r| (lo.min(r.3), hi.max(r.3)));
        assert!(
            max as f64 <= 1.03 * min as f64,
            "{variant:?}: reversible saved activations vary with depth: {rows:?}"
        );
        // The stored (ordinary autodiff) and full fine-tuning figures grow with depth.
        assert!(
            rows[3].1 > 4 * rows[0].1 && rows[3].2 > 4 * rows[0].2,
            "{rows:?}"
        );
        assert!(rows[3].3 * 10 < rows[3].1, "{rows:?}");
    }
}

fn cpu_losses(g: &mut Graph, a: &TrainOptions, steps: usize, lr: f64) -> Vec<f64> {
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let path = ex.path.with_extension("").join("inputs/input_ids.npy");
    let mut data = memc::train::Batches::open(&path).unwrap();
    let lopts = memc::train::LoopOptions {
        steps,
        lr,
        weight_decay: 0.0,
        fixed: vec![],
        save: None,
        resume: None,
        layout: Default::default(),
        run: Default::default(),
        log: None,
        eval: None,
    };
    memc::train::run_host(
        g,
        a,
        &mut data,
        &path.display().to_string(),
        &lopts,
        "llama",
    )
    .unwrap()
}

#[test]
fn the_cpu_backend_reconstructs_like_the_reference_and_adapters_fine_tune() {
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    for variant in VARIANTS {
        let (g0, inputs) = reversible(&ex, variant, None);
        let mut a = train_args(adamw(), None, AUTO);
        a.trainable = Trainable::Adapters;
        let mut g = g0.clone();
        memc::train::build(&mut g, &a).unwrap();
        // Reference backend, 3 steps.
        let mut reference = vec![];
        let mut gr = g.clone();
        for step in 1..=3 {
            let r = memc_ir::run(&gr, &feeds(&inputs, 1e-2, step), &Default::default()).unwrap();
            for (p, t) in r.updates {
                gr.set_param_data(p, t);
            }
            reference.push(r.outputs[0].1.to_f64_vec()[0]);
        }
        let mut gc = g.clone();
        let cpu = cpu_losses(&mut gc, &a, 3, 1e-2);
        let err = max_rel(&cpu, &reference);
        eprintln!(
            "{:<6} cpu vs reference over 3 AdamW steps: {err:.2e}",
            variant.name()
        );
        assert!(err <= 1e-5, "{variant:?}: {cpu:?} vs {reference:?}");
        // Adapters only, 50 steps on the cpu backend: the loss falls.
        let losses = cpu_losses(&mut g, &a, 50, 1e-2);
        eprintln!(
            "{:<6} adapters only, 50 AdamW steps (lr 1e-2): loss {:.4} -> {:.4}",
            variant.name(),
            losses[0],
            losses[49]
        );
        assert!(losses[49] < 0.9 * losses[0], "{variant:?}: {losses:?}");
    }
}

#[test]
fn the_drift_check_measures_each_layer() {
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let (g0, inputs) = reversible(&ex, Variant::Meft3, None);
    for (dtype, bound) in [(memc_ir::DType::F32, 1e-3), (memc_ir::DType::BF16, 50.0)] {
        let mut a = sgd_options("adapters", false, true);
        a.compute_dtype = dtype;
        let mut g = g0.clone();
        memc::train::build(&mut g, &a).unwrap();
        let r = memc_ir::run(&g, &feeds(&inputs, 0.1, 1), &Default::default()).unwrap();
        let drift: Vec<f64> = r
            .outputs
            .iter()
            .filter(|(n, _)| n.starts_with(memc_passes::reconstruct::DRIFT_OUTPUT))
            .map(|(_, t)| t.to_f64_vec()[0])
            .collect();
        eprintln!("{dtype:?}: drift per layer {drift:?}");
        assert_eq!(drift.len(), 2);
        assert!(drift
            .iter()
            .all(|d| d.is_finite() && *d >= 0.0 && *d <= bound));
        if dtype == memc_ir::DType::BF16 {
            // bf16 rounding, divided by 0.1 twice per layer, shows.
            assert!(drift[0] > 1e-2, "{drift:?}");
        } else {
            assert!(
                drift.iter().any(|&d| d > 0.0),
                "f32 inversion is not exact: {drift:?}"
            );
        }
    }
}

#[test]
fn reversible_rewrite_snapshots() {
    let path = root().join("examples/models/depth/llama-L2.onnx");
    for variant in VARIANTS {
        let mut g = canonical_model(&path, &[1, 8]);
        let stats = apply_reversible(
            &mut g,
            &RevOptions {
                variant,
                layers: None,
                adapter_rank: 8,
                seed: 0,
            },
        )
        .unwrap();
        assert_eq!((stats.reversible_layers, stats.adapters), (2, 4));
        insta::assert_snapshot!(
            format!("reversible_llama_l2_{}", variant.name()),
            format!("// --reversible {}\n{}", variant.name(), memc_ir::print(&g))
        );
    }
}
