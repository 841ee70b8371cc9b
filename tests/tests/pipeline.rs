//! Pipeline stage splits (`memc compile --pipeline-stages`): the layers cut into balanced
//! chunks, placed as each schedule places them, with each device's memory from the plan.

use std::collections::HashMap;

use memc::train::{OptimizerArg, RematArg};
use memc_tests::*;

fn depth16() -> memc_ir::Graph {
    let path = root().join("examples/models/depth/llama-L16.onnx");
    let opts = memc::onnx::ImportOptions {
        shapes: HashMap::from([("input_ids".to_string(), vec![2, 32])]),
    };
    let mut g = memc::onnx::import(&path, &opts).unwrap();
    memc_passes::canonicalize::canonicalize(&mut g, &Default::default()).unwrap();
    g
}

#[test]
fn chunks_cover_the_layers_in_order_balanced_by_cost() {
    let a = train_args(OptimizerArg::Adamw, 0.0, None, RematArg::Auto);
    for chunks in [1, 2, 3, 4, 8, 16] {
        let mut g = depth16();
        let stats = memc::train::build_pipelined(&mut g, &a, Some(chunks)).unwrap();
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
    b.dtype = memc::train::DtypeArg::Bf16;
    let mut g = depth16();
    let part = memc::train::build_pipelined(&mut g, &b, Some(4))
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
    let mut g = depth16();
    let err = memc::train::build_pipelined(&mut g, &a, Some(17)).unwrap_err();
    assert!(
        format!("{err:#}").contains("cannot split 16 layers into 17"),
        "{err:#}"
    );
}
