//! Reversible layers (MEFT, `--reversible`): exact gradients by reconstruction, activation
//! memory independent of depth, drift measured, adapters fine-tune.

use std::collections::HashMap;

use memc::train::{OptimizerArg, RematArg, TrainProgramArgs};
use memc_ir::{DType, Graph, Tensor};
use memc_passes::reversible::{apply_reversible, RevOptions, Variant};
use memc_tests::*;

const VARIANTS: [Variant; 3] = [Variant::Meft1, Variant::Meft2, Variant::Meft3];

/// The example's canonical forward graph made reversible, and its inputs.
fn reversible(ex: &Example, variant: Variant, layers: Option<usize>) -> (Graph, HashMap<String, Tensor>) {
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

fn sgd(trainable: &str, store: bool, check: bool) -> TrainProgramArgs {
    let mut a = train_args(OptimizerArg::Sgd, 0.0, None, RematArg::Auto);
    a.trainable = Some(trainable.into());
    a.rev_store = store;
    a.rev_check = check;
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

