//! Pipeline stage splits (`memc compile --pipeline-stages`): the layers cut into balanced
//! chunks, placed as each schedule places them, with each device's memory from the plan.

use std::collections::HashMap;

use memc_tests::*;

fn depth16() -> memc_ir::Graph {
    let path = root().join("examples/models/depth/llama-L16.onnx");
    canonical_model(&path, &[2, 32])
}

#[test]
fn chunks_cover_the_layers_in_order_balanced_by_cost() {
    let a = train_args(adamw(), None, AUTO);
    for chunks in [1, 2, 3, 4, 8, 16] {
        let mut g = depth16();
        let stats = memc::train::build_with(&mut g, &a, Some(chunks), false).unwrap();
        let part = stats.partition.unwrap();
        assert_eq!(part.layers, 16);
        assert_eq!(part.chunks.len(), chunks);
        let mut next = 0;
        for c in &part.chunks {
            assert_eq!(c.layers.0, next, "contiguous");
            assert!(c.layers.1 > c.layers.0, "a chunk has a layer");
            next = c.layers.1;
        }
        assert_eq!(next, 16);
        assert!(part.chunks[0].embedding && part.chunks[chunks - 1].head);
        // Every saved activation belongs to one chunk: the chunks' bytes add up to the plan's.
        let saved: u64 = part.chunks.iter().map(|c| c.saved_bytes).sum();
        assert_eq!(saved, memc_passes::plan::plan(&g).saved_activation_bytes);
        // Balanced: no chunk costs more than the average plus one layer (the largest unit).
        let total: u64 = part.chunks.iter().map(|c| c.flops).sum();
        let max = part.chunks.iter().map(|c| c.flops).max().unwrap();
        let one_layer = part
            .chunks
            .iter()
            .map(|c| c.flops / (c.layers.1 - c.layers.0) as u64)
            .max()
            .unwrap();
        eprintln!(
            "{chunks:>2} chunks: layers {:?}, max {max} FLOPs vs mean {}",
            part.chunks.iter().map(|c| c.layers).collect::<Vec<_>>(),
            total / chunks as u64
        );
        assert!(
            max <= total / chunks as u64 + 2 * one_layer,
            "{max} vs {total}/{chunks}"
        );
        // Weights: every weight is read by some chunk; only a tied one by two.
        let weights: u64 = part.chunks.iter().map(|c| c.weight_bytes).sum();
        assert!(weights >= g.params_bytes() as u64);
    }
    // In bf16 every weight is read through a cast: it still belongs to the chunk using it.
    let mut b = a.clone();
    b.compute_dtype = memc_ir::DType::BF16;
    let mut g = depth16();
    let part = memc::train::build_with(&mut g, &b, Some(4), false)
        .unwrap()
        .partition
        .unwrap();
    assert!(
        part.chunks
            .iter()
            .all(|c| c.weight_bytes > 0 && c.state_bytes > 0),
        "{part:?}"
    );
    let weights: u64 = part.chunks.iter().map(|c| c.weight_bytes).sum();
    assert!(weights >= g.params_bytes() as u64);
    // In bf16 as in f32, every node but a shared weight's gradient sum runs in a pass (the
    // weight casts are computed by each pass that reads them, their VJPs go with their
    // chunk). Under 1F1B those sums run in backward passes too.
    let path = root().join("examples/models/depth/llama-L4.onnx");
    let g4 = canonical_model(&path, &[1, 16]);
    let (program, _) =
        memc::pipe::pipelined_program(g4, &b, memc_passes::pipeline::ScheduleKind::OneFOneB, 2)
            .unwrap();
    let schedule =
        memc_passes::pipeline::generate(memc_passes::pipeline::ScheduleKind::OneFOneB, 2, 4)
            .unwrap();
    assert_eq!(memc::pipe::late_node_count(&program, &schedule), 0);
    let mut g = depth16();
    let err = memc::train::build_with(&mut g, &a, Some(17), false).unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot split 16 layers into 17"),
        "{err:#}"
    );
}

/// The full-batch program's loss and gradients (reference interpreter).
fn full_batch(path: &std::path::Path, ids: &memc_ir::Tensor) -> (f64, HashMap<String, Vec<f64>>) {
    let mut g = canonical_model(path, ids.shape());
    let mut a = train_args(sgd(0.0), None, None);
    a.trainable = Trainable::Default;
    memc::train::build_with(&mut g, &a, None, true).unwrap();
    let mut feeds = HashMap::from([("input_ids".to_string(), ids.clone())]);
    for (n, v) in [
        ("memc.lr", 0.0),
        ("memc.weight_decay", 0.0),
        ("memc.step", 1.0),
    ] {
        feeds.insert(
            n.to_string(),
            memc_ir::Tensor::from_f64(memc_ir::DType::F32, vec![], &[v]),
        );
    }
    let r = memc_ir::run(&g, &feeds, &Default::default()).unwrap();
    let loss = r.outputs[0].1.to_f64_vec()[0];
    let grads = r.outputs[1..]
        .iter()
        .map(|(n, t)| (n.clone(), t.to_f64_vec()))
        .collect();
    (loss, grads)
}

#[test]
fn pipelined_steps_equal_the_full_batch_step_for_every_schedule() {
    let all = memc_passes::pipeline::ScheduleKind::ALL.map(|k| k.name());
    check_pipelined(
        &root().join("examples/models/depth/llama-L4.onnx"),
        &all,
        128,
    );
    // GPT-2 ties the LM head to the embedding: two chunks' weight gradients are summed.
    check_pipelined(
        &root().join("examples/models/gpt2-dynamo.onnx"),
        &["gpipe", "1f1b", "zb-h1"],
        256,
    );
}

/// The mean loss and averaged values (`x.N`: the gradients) of one pipelined step of
/// `program` on the runtime's pipelined executor, every pass on the reference interpreter.
fn run_step(
    program: &memc_ir::Graph,
    schedule: &memc_passes::pipeline::Schedule,
    args: &TrainOptions,
    ids: &[i64],
    rows: usize,
    seq: usize,
) -> Step {
    use memc_runtime::pipeline::{PassBackend, Pipelined};
    use memc_runtime::Backend;
    let (host, graphs) = memc::pipe::lower_pipeline(
        program,
        schedule,
        args,
        rows,
        1,
        "model",
        memc::pipe::PassTarget::Reference,
    )
    .unwrap();
    let p = &host.program;
    let mut make = |label: &str,
                    sub: &memc_runtime::program::Program|
     -> Result<PassBackend, memc_runtime::RunError> {
        let g = &graphs.iter().find(|x| x.label == label).unwrap().graph;
        Ok(Box::new(memc_codegen::reference::Reference::new(
            g.clone(),
            sub,
        )))
    };
    let mut pipe = Pipelined::with_backends(p, &mut make, None).unwrap();
    let weights: HashMap<&str, &memc_ir::Tensor> = program
        .values()
        .iter()
        .filter_map(|v| match &v.def {
            memc_ir::ValueDef::Param {
                name,
                data: Some(t),
                ..
            } => Some((name.as_str(), t)),
            _ => None,
        })
        .collect();
    for q in &p.params {
        if let Some(t) = weights.get(q.slot.name.as_str()) {
            pipe.set(&q.slot, t.bytes()).unwrap();
        } else {
            pipe.set(&q.slot, &vec![0u8; q.slot.bytes() as usize])
                .unwrap();
        }
    }
    for s in &p.inputs {
        let bytes: Vec<u8> = match s.name.as_str() {
            "memc.step" => 1f32.to_le_bytes().to_vec(),
            n if n.starts_with("memc.") => 0f32.to_le_bytes().to_vec(),
            _ => {
                assert_eq!(ids.len(), rows * seq);
                ids.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        };
        pipe.set(s, &bytes).unwrap();
    }
    pipe.run().unwrap();
    let loss_name = &p.pipeline.as_ref().unwrap().loss;
    Step {
        loss: pipe.means()[loss_name][0],
        grads: pipe.means().clone(),
    }
}

/// What one pipelined step computed.
struct Step {
    loss: f64,
    grads: HashMap<String, Vec<f64>>,
}

fn check_pipelined(path: &std::path::Path, schedules: &[&str], vocab: i64) {
    use memc_passes::pipeline::{generate, ScheduleKind};
    let (m, rows, seq) = (4usize, 1usize, 16usize);
    let ids: Vec<i64> = (0..m * rows * seq)
        .map(|i| (i as i64 * 37 + 11) % vocab)
        .collect();
    let all = memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![m * rows, seq], &ids);
    let (want_loss, want) = full_batch(path, &all);
    let mut feeds = vec![];
    for j in 0..m {
        let mut f = HashMap::new();
        let part = &ids[j * rows * seq..(j + 1) * rows * seq];
        f.insert(
            "input_ids".to_string(),
            memc_ir::Tensor::from_i64(memc_ir::DType::I64, vec![rows, seq], part),
        );
        for (n, v) in [
            ("memc.lr", 0.0),
            ("memc.weight_decay", 0.0),
            ("memc.step", 1.0),
        ] {
            f.insert(
                n.to_string(),
                memc_ir::Tensor::from_f64(memc_ir::DType::F32, vec![], &[v]),
            );
        }
        feeds.push(f);
    }
    let a = train_args(sgd(0.0), None, AUTO);
    for &name in schedules {
        let kind = ScheduleKind::parse(name).unwrap();
        let g = canonical_model(path, &[rows, seq]);
        let (program, part) = memc::pipe::pipelined_program(g, &a, kind, 2).unwrap();
        let schedule = generate(kind, 2, m).unwrap();
        let got = run_step(&program, &schedule, &a, &ids, m * rows, seq);
        let grad_value: HashMap<String, u32> = program
            .outputs()
            .iter()
            .map(|(n, v)| (n.clone(), v.0))
            .collect();
        let loss_err = (got.loss - want_loss).abs() / want_loss.abs();
        let mut worst = 0f64;
        for (n, w) in &want {
            let x = &got.grads[&format!("x.{}", grad_value[n])];
            let scale = w.iter().fold(0f64, |a, b| a.max(b.abs())).max(1e-30);
            worst = worst.max(x.iter().zip(w).fold(0f64, |a, (p, q)| a.max((p - q).abs())) / scale);
        }
        eprintln!(
            "{} {name:<12} {} chunks on 2 devices, {m} microbatches: loss {:.6} vs {:.6} ({loss_err:.1e}), worst gradient {worst:.1e}",
            path.file_name().unwrap().to_string_lossy(),
            part.chunks.len(),
            got.loss,
            want_loss
        );
        assert!(
            loss_err <= 1e-5 && worst <= 1e-4,
            "{name}: loss {loss_err:e}, gradients {worst:e}"
        );
    }
}
