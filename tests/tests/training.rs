//! Training programs on every example model: PyTorch's loss trajectories reproduced, the
//! memory plan's invariants, saved activations against PyTorch eager, the B/W split, and
//! rematerialisation that never changes a loss.

use std::collections::HashMap;

use memc::train::Batches;
use memc_ir::Phase;
use memc_passes::plan::{plan, ALIGN};
use memc_tests::{
    adamw, examples, max_rel, reference_losses as losses, sgd, train_args as args, train_reference,
    training_program as program, Example, TrainOptions, AUTO,
};

/// `steps` AdamW steps (lr 1e-3, weight decay 0.01) on the cpu backend, on the example's batch.
fn cpu_losses(ex: &Example, a: &TrainOptions, steps: usize) -> Vec<f64> {
    let (mut g, _) = program(ex, a);
    let path = ex.path.with_extension("").join("inputs/input_ids.npy");
    let mut data = Batches::open(&path).unwrap();
    let opts = memc::train::LoopOptions {
        steps,
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
    memc::train::run_host(
        &mut g,
        a,
        &mut data,
        &path.display().to_string(),
        &opts,
        &ex.name,
    )
    .unwrap()
}

#[test]
fn every_example_reproduces_pytorch_losses() {
    let runs = [
        ("sgd", sgd(0.0), None, 0.1, 0.0),
        ("sgd_momentum", sgd(0.9), None, 0.1, 0.0),
        ("adamw", adamw(), None, 1e-3, 0.01),
        ("adamw_clip", adamw(), Some(1.0), 1e-3, 0.01),
    ];
    for ex in examples() {
        let want = train_reference(&ex);
        for (key, opt, clip, lr, wd) in runs {
            let got = losses(&ex, &args(opt, clip, AUTO), lr, wd, 5);
            let want: Vec<f64> = want[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            let err = max_rel(&got, &want);
            eprintln!(
                "{:<28} {key:<13} max relative loss error {err:.2e}",
                ex.name
            );
            assert!(
                err <= 1e-5,
                "{} {key}: memc {got:?} vs PyTorch {want:?}",
                ex.name
            );
        }
    }
}

#[test]
fn rematerialisation_never_changes_a_loss() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && !e.name.contains("opset"))
    {
        let none = losses(&ex, &args(adamw(), None, None), 1e-3, 0.01, 2);
        let auto = losses(&ex, &args(adamw(), None, AUTO), 1e-3, 0.01, 2);
        assert_eq!(none, auto, "{}: bitwise equal losses expected", ex.name);
    }
}

#[test]
fn memc_saves_no_more_activation_bytes_than_pytorch() {
    for ex in examples() {
        let (g, _) = program(&ex, &args(adamw(), None, AUTO));
        let p = plan(&g);
        let torch = train_reference(&ex)["saved_activation_bytes"]
            .as_u64()
            .unwrap();
        eprintln!(
            "{:<28} saved activations: memc {} bytes, PyTorch eager {torch} bytes",
            ex.name, p.saved_activation_bytes
        );
        assert!(
            p.saved_activation_bytes <= torch,
            "{}: memc saves {} > PyTorch {torch}",
            ex.name,
            p.saved_activation_bytes
        );
    }
}

#[test]
fn memory_plans_are_consistent() {
    for ex in examples().into_iter().filter(|e| !e.name.contains("opset")) {
        for remat in [None, AUTO] {
            let (g, _) = program(&ex, &args(adamw(), Some(1.0), remat));
            let p = plan(&g);
            // The order is topological, and updates come after every other reader of their target.
            let mut step = vec![usize::MAX; g.nodes().len()];
            for (s, n) in p.order.iter().enumerate() {
                step[n.index()] = s;
            }
            for (s, n) in p.order.iter().enumerate() {
                for &v in &g.node(*n).inputs {
                    if let Some(prod) = g.producer(v) {
                        assert!(
                            step[prod.index()] < s,
                            "{}: operand used before it is computed",
                            ex.name
                        );
                    }
                }
            }
            for &(target, v) in g.updates() {
                let w = step[g.producer(v).unwrap().index()];
                for (i, node) in g.nodes().iter().enumerate() {
                    if node.inputs.contains(&target) {
                        assert!(
                            step[i] <= w,
                            "{}: a reader of an updated buffer runs after its update",
                            ex.name
                        );
                    }
                }
            }
            // Buffers are aligned, inside the arena, and never overlap while both are live.
            let mut peak = 0;
            for b in &p.buffers {
                assert_eq!(b.offset % ALIGN, 0);
                assert!(b.size >= g.value(b.value).ty.bytes() as u64);
                peak = peak.max(b.offset + b.size);
            }
            assert_eq!(
                peak, p.peak_bytes,
                "{}: the arena is exactly the peak",
                ex.name
            );
            assert!(p.max_live_bytes <= p.peak_bytes);
            for (i, a) in p.buffers.iter().enumerate() {
                for b in &p.buffers[i + 1..] {
                    let live_together = a.start <= b.end && b.start <= a.end;
                    let share_bytes = a.offset < b.offset + b.size && b.offset < a.offset + a.size;
                    assert!(
                        !(live_together && share_bytes),
                        "{}: %{} and %{} overlap",
                        ex.name,
                        a.value.0,
                        b.value.0
                    );
                }
            }
            // Every read happens while the buffer is live (aliases live in their target).
            let buffer_of: HashMap<_, _> = p.buffers.iter().map(|b| (b.value, b)).collect();
            for (s, n) in p.order.iter().enumerate() {
                for &v in &g.node(*n).inputs {
                    if let Some(b) = buffer_of.get(&v) {
                        assert!(
                            b.start <= s && s <= b.end,
                            "{}: %{} read outside its lifetime",
                            ex.name,
                            v.0
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn backward_is_split_into_b_and_w() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && !e.name.contains("opset"))
    {
        let (g, _) = program(&ex, &args(sgd(0.0), None, None));
        let phase_of = |v| g.producer(v).map(|p| g.node(p).phase);
        let (mut b, mut w) = (0, 0);
        for node in g.nodes() {
            match node.phase {
                Phase::Backward => {
                    b += 1;
                    // Nothing on the activation-gradient chain waits for a weight gradient.
                    for &v in &node.inputs {
                        assert_ne!(
                            phase_of(v),
                            Some(Phase::Weight),
                            "{}: a B node reads a W result",
                            ex.name
                        );
                    }
                }
                Phase::Weight => w += 1,
                _ => {}
            }
        }
        assert!(b > 0 && w > 0, "{}: B {b}, W {w}", ex.name);
        // Every weight's gradient is produced in W (matmul weight grads) or reads only B values.
        let weights = g.weights().count();
        assert!(weights > 0);
    }
}

#[test]
fn training_data_batches_cycle() {
    let dir = std::env::temp_dir().join(format!("memc-batches-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ids.npy");
    let ids = memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![3, 2], &[1, 2, 3, 4, 5, 6]);
    memc::io::write_tensor(&path, &ids).unwrap();
    let mut b = Batches::open(&path).unwrap();
    assert_eq!(
        b.next_batch(2, memc_ir::DType::I64).to_i64_vec(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        b.next_batch(2, memc_ir::DType::I64).to_i64_vec(),
        vec![5, 6, 1, 2]
    );
}

#[test]
fn cpu_backend_reproduces_the_reference_losses() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && e.family != "bert" && !e.name.contains("opset"))
    {
        let a = args(adamw(), Some(1.0), AUTO);
        let reference = losses(&ex, &a, 1e-3, 0.01, 3);
        let cpu = cpu_losses(&ex, &a, 3);
        let err = max_rel(&cpu, &reference);
        eprintln!(
            "{:<14} cpu backend vs reference: max relative loss difference {err:.2e}",
            ex.name
        );
        assert!(
            err <= 1e-5,
            "{}: cpu {cpu:?} vs reference {reference:?}",
            ex.name
        );
    }
}

#[test]
fn bf16_training_tracks_f32() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && e.family != "bert" && !e.name.contains("opset"))
    {
        let f32_args = args(adamw(), None, AUTO);
        let bf16_args = TrainOptions {
            compute_dtype: memc_ir::DType::BF16,
            ..f32_args.clone()
        };
        let full = losses(&ex, &f32_args, 1e-3, 0.01, 20);
        let half = losses(&ex, &bf16_args, 1e-3, 0.01, 20);
        let err = max_rel(&half, &full);
        eprintln!("{:<14} bf16 vs f32 over 20 AdamW steps (reference backend): max relative loss difference {err:.2e}", ex.name);
        assert!(err <= 0.02, "{}: bf16 {half:?} vs f32 {full:?}", ex.name);
        assert!(
            half[19] < half[0] * 0.8,
            "{}: bf16 training does not learn: {half:?}",
            ex.name
        );
        if ex.family == "llama" {
            // The cpu backend's bf16 kernels (f32 arithmetic, bf16 rounding) agree too.
            let cpu = cpu_losses(&ex, &bf16_args, 20);
            let err = max_rel(&cpu, &full);
            eprintln!(
                "{:<14} bf16 on the cpu backend vs f32: max relative loss difference {err:.2e}",
                ex.name
            );
            assert!(err <= 0.02, "{}: cpu bf16 {cpu:?} vs f32 {full:?}", ex.name);
        }
    }
}

#[test]
fn cpu_backend_runs_in_one_arena_of_the_planned_size() {
    // The plan over fused kernels: buffers never overlap while live, the arena is exactly the
    // peak, and the cpu backend allocates exactly that arena (and still trains correctly:
    // `cpu_backend_reproduces_the_reference_losses`).
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && !e.name.contains("opset"))
    {
        let (g, _) = program(&ex, &args(adamw(), Some(1.0), AUTO));
        let (ordered, kernels, p) = memc_codegen::host::layout(&g);
        memc_ir::verify(&ordered).unwrap();
        assert_eq!(p.steps, kernels.len());
        for (i, a) in p.buffers.iter().enumerate() {
            for b in &p.buffers[i + 1..] {
                let live_together = a.start <= b.end && b.start <= a.end;
                let share_bytes = a.offset < b.offset + b.size && b.offset < a.offset + a.size;
                assert!(
                    !(live_together && share_bytes),
                    "{}: %{} and %{} overlap",
                    ex.name,
                    a.value.0,
                    b.value.0
                );
            }
        }
        assert_eq!(
            p.buffers.iter().map(|b| b.offset + b.size).max().unwrap(),
            p.peak_bytes
        );
        let host = memc::train::host_program(&g, &ex.name, None).unwrap();
        assert_eq!(host.program.arena_bytes, p.peak_bytes);
        let bytes = host
            .with_kernels(|k| {
                // SAFETY: `k` are the JIT entries of this program's kernels.
                unsafe { memc_runtime::cpu::Cpu::new(host.program.checked().unwrap(), k) }
                    .arena()
                    .bytes()
            })
            .unwrap();
        assert_eq!(bytes as u64, p.peak_bytes, "{}", ex.name);
        let node_plan = plan(&g);
        eprintln!(
            "{:<14} arena over {} fused kernels: {} bytes (node-level plan: {} bytes)",
            ex.name,
            kernels.len(),
            p.peak_bytes,
            node_plan.peak_bytes
        );
        // Fusion never raises the peak above the unfused plan.
        assert!(p.peak_bytes <= node_plan.peak_bytes, "{}", ex.name);
    }
}

/// At a realistic size (the 8-layer depth Llama at 8 × 512: 4088 loss rows in chunks, every
/// layer's gradients accumulated), the arena the cpu backend allocates is the plan over the
/// fused kernels and never above the unfused node-level plan; the same for per-layer
/// checkpoints.
#[test]
fn fusion_never_raises_the_peak_at_realistic_sizes() {
    let path = memc_tests::root().join("examples/models/depth/llama-L8.onnx");
    for remat in [AUTO, memc_tests::FULL] {
        let mut g = memc_tests::canonical_model(&path, &[8, 512]);
        memc::train::build(&mut g, &args(adamw(), Some(1.0), remat.clone())).unwrap();
        let (_, kernels, p) = memc_codegen::host::layout(&g);
        let node_plan = plan(&g);
        eprintln!(
            "llama-L8 8x512 {remat:?}: arena {} bytes over {} kernels, node-level plan {} bytes",
            p.peak_bytes,
            kernels.len(),
            node_plan.peak_bytes
        );
        assert!(p.peak_bytes <= node_plan.peak_bytes, "{remat:?}");
    }
}
