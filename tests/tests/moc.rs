//! Mixture-of-Channels (`--moc-k`): SwiGLU blocks become `moc_ffn`; the cpu backend's
//! kernels (top-k included) reproduce the reference backend; the example Llama trains with
//! K = d_ffn/4 close to dense; and the FFN's saved bytes per token drop at least 3× at
//! d_model 768, d_ffn 2048, K 384.

use memc_ir::{DType, Graph, Phase, Tensor};
use memc_passes::moc::{apply_moc, MocK};
use memc_passes::plan::plan;
use memc_tests::{adamw, build_adamw, examples, max_rel, train_args, train_reference, AUTO};

/// Reference-backend losses of `g` (a training program) over `steps` AdamW steps (lr 1e-2,
/// no weight decay) on `feeds`.
fn reference(
    g: Graph,
    feeds: &std::collections::HashMap<String, Tensor>,
    steps: usize,
) -> Vec<f64> {
    reference_with(g, feeds, steps, 1e-2, 0.0)
}

fn reference_with(
    mut g: Graph,
    feeds: &std::collections::HashMap<String, Tensor>,
    steps: usize,
    lr: f64,
    wd: f64,
) -> Vec<f64> {
    let mut out = vec![];
    for step in 1..=steps {
        let mut f = feeds.clone();
        let scalar = |v: f64| Tensor::from_f64(DType::F32, vec![], &[v]);
        f.insert("memc.lr".into(), scalar(lr));
        f.insert("memc.weight_decay".into(), scalar(wd));
        f.insert("memc.step".into(), scalar(step as f64));
        let r = memc_ir::run(&g, &f, &memc_ir::RunOptions { check_nan: true }).unwrap();
        for (p, t) in r.updates {
            g.set_param_data(p, t);
        }
        out.push(r.outputs[0].1.to_f64_vec()[0]);
    }
    out
}

#[test]
fn moc_llama_matches_on_both_backends_and_trains_close_to_dense() {
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let a = train_args(adamw(), None, AUTO);
    let program = |moc: bool| {
        let (mut g, inputs) = ex.import();
        memc_passes::canonicalize::canonicalize(&mut g, &Default::default()).unwrap();
        if moc {
            let s = apply_moc(&mut g, MocK::Ratio(0.25)).unwrap();
            assert_eq!((s.rewritten, s.k), (2, Some((32, 128))));
            assert!(memc_ir::print(&g).contains("moc_ffn("));
        }
        memc::train::build(&mut g, &a).unwrap();
        assert_eq!(
            g.op_counts().contains_key("top_k"),
            moc,
            "top_k in the program"
        );
        (g, inputs)
    };
    let (g, inputs) = program(true);
    // The cpu backend (generated kernels, top-k included) against the reference backend.
    let want = reference(g.clone(), &inputs, 3);
    let path = ex.path.with_extension("").join("inputs/input_ids.npy");
    let mut data = memc::train::Batches::open(&path).unwrap();
    let lopts = memc::train::LoopOptions {
        steps: 3,
        lr: 1e-2,
        weight_decay: 0.0,
        fixed: vec![],
        save: None,
        resume: None,
        layout: Default::default(),
        run: Default::default(),
        log: None,
        eval: None,
    };
    let cpu = memc::train::run_host(
        &mut g.clone(),
        &a,
        &mut data,
        &path.display().to_string(),
        &lopts,
        &ex.name,
    )
    .unwrap();
    eprintln!("moc: reference {want:?}, cpu {cpu:?}");
    assert!(max_rel(&cpu, &want) <= 1e-5, "{cpu:?} vs {want:?}");
    // 50 AdamW steps: the loss falls, and ends within 5% of dense training's.
    let moc = reference(g, &inputs, 50);
    let dense = reference(program(false).0, &inputs, 50);
    let (m, d) = (moc[49], dense[49]);
    eprintln!(
        "50 steps: moc {:.4} -> {m:.4}, dense {:.4} -> {d:.4}",
        moc[0], dense[0]
    );
    assert!(m < 0.8 * moc[0], "the MoC loss did not fall: {moc:?}");
    assert!((m - d).abs() <= 0.05 * d, "MoC ends at {m}, dense at {d}");
}

/// Saved activation bytes of a one-block model at batch 4 × 128: embedding, `ffn` (`none`,
/// `dense` or `moc`), a residual add, LM head; d_model 768, d_ffn 2048.
fn saved(ffn: &str) -> u64 {
    let body = match ffn {
        "none" => "  %7 = add(%6, %6) : f32[4, 128, 768]\n".to_string(),
        op => format!(
            "  %7 = {op}(%6, %2, %3, %4){} : f32[4, 128, 768]\n",
            if op == "moc_ffn" { " {k = 384}" } else { "" }
        ),
    };
    let src = format!(
        "graph {{
  %0 = input \"input_ids\" : i64[4, 128]
  %1 = param \"embed\" : f32[512, 768]
  %2 = param \"gate\" : f32[768, 2048]
  %3 = param \"up\" : f32[768, 2048]
  %4 = param \"down\" : f32[2048, 768]
  %5 = param \"head\" : f32[768, 512]
  %6 = gather(%1, %0) {{axis = 0}} : f32[4, 128, 768]
{body}  %8 = add(%6, %7) : f32[4, 128, 768]
  %9 = matmul(%8, %5) : f32[4, 128, 512]
  output \"logits\" = %9
}}
"
    );
    let mut g = memc_ir::parse(&src).unwrap();
    build_adamw(&mut g, Some(memc_passes::remat::Policy::MinCut)).unwrap();
    assert!(g
        .nodes()
        .iter()
        .all(|n| n.phase != Phase::Forward || !matches!(n.op, memc_ir::Op::MocFfn { .. })));
    plan(&g).saved_activation_bytes
}

#[test]
fn moc_keeps_a_third_or_less_of_the_ffn_bytes_at_d768() {
    let base = saved("none");
    let dense = saved("swiglu_ffn") - base;
    let moc = saved("moc_ffn") - base;
    let tokens = 4 * 128;
    // Both keep the block's input x (d_model floats per token) for the weight gradients; the
    // block's own activations are the rest: G and U (dense) against the K selected gate and
    // up values and their i32 indices (MoC).
    let x = tokens * 768 * 4;
    eprintln!(
        "FFN saved bytes per token: dense {}, MoC (K 384 of 2048) {} ({:.2}x less); without the \
         input both keep: dense {}, MoC {} ({:.2}x less)",
        dense / tokens,
        moc / tokens,
        dense as f64 / moc as f64,
        (dense - x) / tokens,
        (moc - x) / tokens,
        (dense - x) as f64 / (moc - x) as f64
    );
    assert!(dense - x >= 3 * (moc - x), "dense {dense} vs MoC {moc}");
    assert!(dense >= 2 * moc, "dense {dense} vs MoC {moc}");
}

#[test]
fn moc_training_reproduces_pytorch() {
    // examples/train_fixtures.py's `adamw_moc_k32`: PyTorch's SwiGLU MLPs with the top-32
    // gate mask, AdamW (lr 1e-3, weight decay 0.01), 5 steps.
    for ex in examples()
        .into_iter()
        .filter(|e| matches!(e.family.as_str(), "llama" | "qwen2") && !e.name.contains("opset"))
    {
        let want: Vec<f64> = train_reference(&ex)["adamw_moc_k32"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let (mut g, inputs) = ex.import();
        memc_passes::canonicalize::canonicalize(&mut g, &Default::default()).unwrap();
        apply_moc(&mut g, MocK::Count(32)).unwrap();
        let a = train_args(adamw(), None, AUTO);
        memc::train::build(&mut g, &a).unwrap();
        let got = reference_with(g, &inputs, want.len(), 1e-3, 0.01);
        let err = max_rel(&got, &want);
        eprintln!("{:<20} MoC k 32 vs PyTorch: {err:.2e}", ex.name);
        assert!(err <= 1e-4, "{}: {got:?} vs {want:?}", ex.name);
    }
}

#[test]
fn moc_rewrite_and_its_steps_snapshot() {
    let path = memc_tests::root().join("tests/passes/moc/swiglu_block.mir");
    let mut g = memc_ir::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let stats = apply_moc(&mut g, MocK::Ratio(0.25)).unwrap();
    assert_eq!(stats.k, Some((8, 32)));
    let rewritten = memc_ir::print(&g);
    memc_passes::blocks::lower_blocks(&mut g).unwrap();
    memc_ir::verify(&g).unwrap();
    insta::assert_snapshot!(
        "moc_swiglu_block",
        format!(
            "// --moc-k 0.25\n{rewritten}\n// lowered (lower-blocks)\n{}",
            memc_ir::print(&g)
        )
    );
}
