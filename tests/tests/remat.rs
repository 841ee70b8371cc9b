//! Rematerialisation policies: the minimum cut, per-layer checkpointing (`--remat full`) and
//! activation budgets. Budgets hold, losses are bitwise unchanged by any choice, infeasible
//! budgets name the smallest feasible one, and on one layer the minimum cut is within 5% of
//! the exact 0/1 program's recomputed FLOPs at the same memory.

use memc_ir::{Graph, Phase};
use memc_passes::plan::{flops, plan};
use memc_tests::{
    adamw, build_adamw, examples, reference_losses, root, train_args, training_program, Budget,
    Policy, TrainOptions, AUTO, FULL,
};

/// (saved activation bytes, recomputed FLOPs) of `g`'s training step under `policy`.
fn cost(g: &Graph, policy: Option<Policy>) -> Result<(u64, u64), String> {
    cost_and_floor(g, policy).map(|(b, f, _)| (b, f))
}

/// [`cost`] and the smallest feasible budget.
fn cost_and_floor(g: &Graph, policy: Option<Policy>) -> Result<(u64, u64, u64), String> {
    let mut g = g.clone();
    let stats = build_adamw(&mut g, policy)?;
    memc_ir::verify(&g).map_err(|e| e.to_string())?;
    let p = plan(&g);
    let floor = stats.remat.and_then(|r| r.min_budget_bytes).unwrap_or(0);
    Ok((
        p.saved_activation_bytes,
        flops(&g, &[Phase::Recompute]),
        floor,
    ))
}

#[test]
fn one_layer_min_cut_is_near_the_exact_optimum_and_budgets_trade_memory_for_flops() {
    let path = root().join("tests/passes/remat/llama_one_layer.mir");
    let g = memc_ir::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (none, _) = cost(&g, None).unwrap();
    let (b_mc, f_mc) = cost(&g, Some(Policy::MinCut)).unwrap();
    let (b_full, f_full) = cost(&g, Some(Policy::Full)).unwrap();
    let (b_ex, f_ex) = cost(&g, Some(Policy::Exact(Budget::Bytes(b_mc)))).unwrap();
    eprintln!("none {none} B; min-cut {b_mc} B {f_mc} FLOPs; exact at that budget {b_ex} B {f_ex} FLOPs; full {b_full} B {f_full} FLOPs");
    assert!(b_ex <= b_mc);
    assert!(
        f_mc as f64 <= 1.05 * f_ex as f64,
        "the minimum cut recomputes {f_mc} FLOPs, the exact program {f_ex}"
    );
    // Full checkpointing keeps what the backward reads outside the layers; a budget keeps
    // the minimum cut's choice there, so at full's memory it recomputes fewer FLOPs.
    let (_, _, floor) = cost_and_floor(&g, Some(Policy::MinCut)).unwrap();
    let (b_at_full, f_at_full) = cost(&g, Some(Policy::Budget(Budget::Bytes(b_full)))).unwrap();
    eprintln!("smallest budget {floor} B; at full's memory: {b_at_full} B, {f_at_full} FLOPs");
    assert!(floor < b_full && b_at_full <= b_full && f_at_full < f_full);
    // A sweep from the smallest budget to no remat: within budget, FLOPs never rise with the
    // budget.
    let mut last = u64::MAX;
    for k in 0..=6 {
        let budget = floor + (none - floor) * k / 6;
        let (b, f) = cost(&g, Some(Policy::Budget(Budget::Bytes(budget)))).unwrap();
        eprintln!("budget {budget}: saved {b} B, recomputed {f} FLOPs");
        assert!(b <= budget, "saved {b} > budget {budget}");
        assert!(f <= last, "{f} FLOPs at budget {budget}");
        last = f;
    }
    assert_eq!(last, 0, "the no-remat budget recomputes nothing");
    // Below it: an error naming the smallest feasible budget.
    let err = cost(&g, Some(Policy::Budget(Budget::Bytes(floor - 1)))).unwrap_err();
    assert!(
        err.contains(&format!("the smallest feasible one, {floor} bytes")),
        "{err}"
    );
}

/// AdamW with `remat`, or the minimum cut under an activation `budget` (bytes or a
/// fraction, as `--activation-budget` takes it).
fn with_budget(remat: Option<Policy>, budget: Option<&str>) -> TrainOptions {
    let remat = match budget {
        Some(b) => Some(Policy::Budget(Budget::parse(b).unwrap())),
        None => remat,
    };
    train_args(adamw(), None, remat)
}

#[test]
fn every_policy_keeps_the_losses_bitwise_and_budgets_hold() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && !e.name.contains("opset"))
    {
        let want = reference_losses(&ex, &with_budget(None, None), 1e-3, 0.01, 2);
        let (g, _) = training_program(&ex, &with_budget(None, None));
        let none = plan(&g).saved_activation_bytes;
        for (remat, budget) in [(FULL, None), (AUTO, Some("0.5")), (AUTO, Some("80%"))] {
            let a = with_budget(remat.clone(), budget);
            let (g, _) = training_program(&ex, &a);
            let saved = plan(&g).saved_activation_bytes;
            if let Some(f) = budget {
                let f: f64 = match f.strip_suffix('%') {
                    Some(p) => p.parse::<f64>().unwrap() / 100.0,
                    None => f.parse().unwrap(),
                };
                assert!(
                    saved as f64 <= f * none as f64,
                    "{}: {saved} bytes saved over a budget of {f} × {none}",
                    ex.name
                );
            }
            eprintln!(
                "{:<14} {remat:?} {budget:?}: saved {saved} of {none} bytes",
                ex.name
            );
            let got = reference_losses(&ex, &a, 1e-3, 0.01, 2);
            assert_eq!(got, want, "{} {remat:?} {budget:?}", ex.name);
        }
    }
}

#[test]
fn bad_budgets_and_policies_say_what_to_do() {
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let run = |a: &TrainOptions| {
        let (mut g, _) = ex.import();
        memc_passes::canonicalize::canonicalize(&mut g, &Default::default()).unwrap();
        memc::train::build(&mut g, a).map(|_| ())
    };
    let err = run(&with_budget(AUTO, Some("1000"))).unwrap_err();
    assert!(
        format!("{err:#}").contains("below the smallest feasible one"),
        "{err:#}"
    );
    // Budgets that are neither bytes nor a fraction are refused when parsed (the CLI's
    // --activation-budget errors are tested in compiler/tests/cli.rs).
    for bad in ["lots", "1.5", "-3MB", "150%"] {
        assert!(Budget::parse(bad).is_err(), "{bad}");
    }
    // Zero bytes is a budget, and below what must be kept.
    let err = run(&with_budget(AUTO, Some("0"))).unwrap_err();
    assert!(
        format!("{err:#}").contains("pass --activation-budget"),
        "{err:#}"
    );
    // Without canonicalisation there are no recognised layers to checkpoint.
    let (mut g, _) = ex.import();
    let err = memc::train::build(&mut g, &with_budget(FULL, None)).unwrap_err();
    assert!(
        format!("{err:#}").contains("no transformer layers"),
        "{err:#}"
    );
    // Units.
    for (text, bytes) in [
        ("1.5GiB", 1_610_612_736u64),
        ("800MB", 800_000_000),
        ("4096", 4096),
    ] {
        assert_eq!(Budget::parse(text).unwrap(), Budget::Bytes(bytes), "{text}");
    }
    assert_eq!(Budget::parse("50%").unwrap(), Budget::Fraction(0.5));
}

#[test]
fn the_fused_loss_never_holds_the_logits_and_trains_like_the_plain_one() {
    for ex in examples()
        .into_iter()
        .filter(|e| e.exporter == "dynamo" && !e.name.contains("opset"))
    {
        let fused = train_args(adamw(), None, AUTO);
        let mut plain = fused.clone();
        plain.fused_loss = false;
        let (g, inputs) = training_program(&ex, &fused);
        let ids = &inputs["input_ids"];
        let (bsz, seq) = (ids.shape()[0], ids.shape()[1]);
        let (gp, _) = training_program(&ex, &plain);
        // The vocabulary: the plain program's log-probabilities' last dim.
        let vocab = gp
            .nodes()
            .iter()
            .find(|n| matches!(n.op, memc_ir::Op::LogSoftmax { .. }))
            .map(|n| *gp.value(n.outputs[0]).ty.shape.last().unwrap())
            .unwrap();
        let n = bsz * (seq - 1);
        // Every exponential over the vocabulary, forward or backward (a (log-)softmax, or the
        // fused loss's log-sum-exp and probabilities), sees one chunk.
        let largest = g
            .nodes()
            .iter()
            .filter(|n| {
                matches!(
                    n.op,
                    memc_ir::Op::LogSoftmax { .. }
                        | memc_ir::Op::Softmax { .. }
                        | memc_ir::Op::Unary(memc_ir::UnaryOp::Exp)
                )
            })
            .map(|n| g.value(n.inputs[0]).ty.clone())
            .filter(|t| t.shape.last() == Some(&vocab))
            .map(|t| t.numel())
            .max()
            .unwrap();
        eprintln!(
            "{:<14} largest exponential over the vocabulary: {largest} elements (whole logits: {})",
            ex.name,
            n * vocab
        );
        assert!(
            largest <= n * vocab / 2,
            "{}: an exponential over {largest} elements ≥ half the logits ({})",
            ex.name,
            n * vocab
        );
        // And the plain loss keeps more.
        assert!(plan(&g).saved_activation_bytes < plan(&gp).saved_activation_bytes);
        let a = reference_losses(&ex, &fused, 1e-3, 0.01, 3);
        let b = reference_losses(&ex, &plain, 1e-3, 0.01, 3);
        let err = memc_tests::max_rel(&a, &b);
        assert!(err <= 1e-5, "{}: {a:?} vs {b:?}", ex.name);
    }
}

#[test]
fn remat_choices_keep_the_cpu_backend_losses_bitwise() {
    let ex = examples()
        .into_iter()
        .find(|e| e.name == "llama-dynamo")
        .unwrap();
    let path = ex.path.with_extension("").join("inputs/input_ids.npy");
    let run = |a: &TrainOptions| {
        let (mut g, _) = training_program(&ex, a);
        let mut data = memc::train::Batches::open(&path).unwrap();
        let lopts = memc::train::LoopOptions {
            steps: 3,
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
            &lopts,
            &ex.name,
        )
        .unwrap()
    };
    let want = run(&with_budget(None, None));
    for (remat, budget) in [(FULL, None), (AUTO, Some("0.4"))] {
        let got = run(&with_budget(remat.clone(), budget));
        assert_eq!(got, want, "{remat:?} {budget:?}");
    }
}
