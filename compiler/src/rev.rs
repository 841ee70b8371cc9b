//! `--reversible`: the CLI side of MEFT's reversible layers (memc-passes'
//! [`memc_passes::reversible`] makes the layers reversible and
//! [`memc_passes::reconstruct`] builds their backward pass). Here: the options, the
//! starting-point deviation the report states, and the drift check's threshold.

use std::collections::HashMap;

use anyhow::{anyhow, Result};
use clap::{Args, ValueEnum};
use memc_ir::{DType, Graph, Tensor, ValueDef};
use memc_passes::reversible::{apply_reversible, RevOptions, RevStats, Variant};

/// The couplings of the CLI (MEFT, "Make Pre-trained Model Reversible", NeurIPS 2023).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VariantArg {
    /// F = layer + adapter, G = adapter; λ 0.1, β 1, streams switched.
    Meft1,
    /// F = adapter, G = layer + adapter; λ 1, β 0.1, streams switched.
    Meft2,
    /// F = attention + adapter, G = FFN + adapter; λ = β = 0.1.
    Meft3,
}

/// Options that make the layers reversible.
#[derive(Debug, Clone, Args)]
pub struct RevArgs {
    /// Make the residual layers reversible (MEFT): the backward pass reconstructs each
    /// layer's inputs from its outputs instead of keeping activations. Trains the adapters
    /// only unless --trainable says otherwise.
    #[arg(long, value_enum, value_name = "meft1|meft2|meft3")]
    pub reversible: Option<VariantArg>,
    /// With --reversible: only the first N layers are reversible (the rest keep their
    /// activations as usual).
    #[arg(long, value_name = "N", requires = "reversible")]
    pub rev_layers: Option<usize>,
    /// With --reversible: the adapters' bottleneck width r.
    #[arg(long, value_name = "R", default_value_t = 8)]
    pub adapter_rank: usize,
    /// With --reversible: the seed of the adapters' N(0, 0.02²) initial weights.
    #[arg(long, value_name = "SEED", default_value_t = 0)]
    pub adapter_seed: u64,
}

/// What `--reversible` did, for the reports.
#[derive(Debug, Clone)]
pub struct RevReport {
    /// The rewrite's counts.
    pub stats: RevStats,
    /// ‖logits_reversible − logits_original‖₂ / ‖logits_original‖₂ at initialisation on a
    /// seeded random input, when the model is small enough for the reference interpreter.
    pub start_deviation: Option<f64>,
    /// The canonical model before the rewrite (the full fine-tuning baseline of the report).
    pub original: Graph,
    /// Saved activation bytes of the training program: by reconstruction, with the
    /// reversible model's activations stored, and full fine-tuning of the original model
    /// (filled by the driver when it builds a training program).
    pub saved_bytes: Option<(u64, u64, u64)>,
}

/// Forward FLOPs above which the starting-point deviation is not computed (the reference
/// interpreter runs the model twice).
const DEVIATION_FLOPS: u64 = 20_000_000_000;

/// Applies `--reversible` to the canonical graph `g`, if given.
pub fn apply(
    g: &mut Graph,
    args: &RevArgs,
    model: &str,
    pm: &mut memc_passes::manager::PassManager,
    quiet: bool,
) -> Result<Option<RevReport>> {
    let Some(v) = args.reversible else {
        return Ok(None);
    };
    let variant = match v {
        VariantArg::Meft1 => Variant::Meft1,
        VariantArg::Meft2 => Variant::Meft2,
        VariantArg::Meft3 => Variant::Meft3,
    };
    let original = g.clone();
    let opts = RevOptions {
        variant,
        layers: args.rev_layers,
        adapter_rank: args.adapter_rank,
        seed: args.adapter_seed,
    };
    let mut text = format!(
        "reversible{{variant={} adapter-rank={} seed={}",
        variant.name(),
        opts.adapter_rank,
        opts.seed
    );
    if let Some(l) = opts.layers {
        text += &format!(" layers={l}");
    }
    text += "}";
    let stats = pm.run(g, "reversible", text, |g| {
        apply_reversible(g, &opts).map_err(|e| anyhow!("{model}: {}", rev_error(&e)))
    })?;
    // `quiet` (memc plan): no report line, and no starting-point check (it runs the model).
    let start_deviation = if quiet {
        None
    } else {
        start_deviation(&original, g)?
    };
    let report = RevReport {
        stats,
        start_deviation,
        original,
        saved_bytes: None,
    };
    if !quiet {
        eprintln!("reversible: {}", report.line());
    }
    Ok(Some(report))
}

/// A reversible-layers error in terms of the CLI's flags.
fn rev_error(e: &memc_passes::reversible::RevError) -> String {
    use memc_passes::reversible::RevError;
    match e {
        RevError::NoLayers(_) => format!("--reversible: {e} (do not pass --no-canonicalize)"),
        RevError::TooManyLayers { asked, layers } => {
            format!("--rev-layers {asked} is outside 1..={layers} (the model has {layers} layers)")
        }
        RevError::BadRank { rank, d } => {
            format!("--adapter-rank {rank} is outside 1..={d} (the model width)")
        }
        e => e.to_string(),
    }
}

impl RevReport {
    /// One line for stderr and `--report`.
    pub fn line(&self) -> String {
        let s = &self.stats;
        let (l, b, switch) = s.variant.coefficients();
        format!(
            "{} on {} of {} layers (λ {l}, β {b}{}), {} adapters ({} parameters); starting-point deviation {}",
            s.variant.name(),
            s.reversible_layers,
            s.layers,
            if switch { ", streams switched" } else { "" },
            s.adapters,
            s.adapter_params,
            match self.start_deviation {
                Some(d) => format!("{d:.3e} (relative L2 of the logits vs the original model)"),
                None => "not measured (the model is too large for the reference interpreter)".into(),
            }
        )
    }

    /// Builds the two baselines of [`RevReport::saved_bytes`] next to `reconstruct_bytes`:
    /// the reversible model `rev` (before training was built) with its activations stored,
    /// and the original model with every weight trained.
    pub fn measure_baselines(
        &mut self,
        rev: &Graph,
        opts: &memc_passes::train::TrainOptions,
        reconstruct_bytes: u64,
    ) -> Result<()> {
        use memc_passes::train::{RevBackward, TrainOptions, Trainable};
        let saved = |mut g: Graph, a: &TrainOptions| -> Result<u64> {
            crate::train::build(&mut g, a)?;
            Ok(memc_passes::plan::plan(&g).saved_activation_bytes)
        };
        let stored = TrainOptions {
            rev_backward: RevBackward::Store,
            ..opts.clone()
        };
        let full = TrainOptions {
            trainable: Trainable::All,
            rev_backward: RevBackward::Reconstruct { check: false },
            ..opts.clone()
        };
        self.saved_bytes = Some((
            reconstruct_bytes,
            saved(rev.clone(), &stored)?,
            saved(self.original.clone(), &full)?,
        ));
        Ok(())
    }

    /// The report's line on memory, when measured.
    pub fn memory_line(&self) -> Option<String> {
        let (r, s, f) = self.saved_bytes?;
        Some(format!(
            "reversible memory: saved activations {r} bytes by reconstruction, {s} with the activations stored, {f} for full fine-tuning of the original model ({:.1}% less)",
            100.0 * (1.0 - r as f64 / f.max(1) as f64)
        ))
    }

    /// The report's `reversible` object.
    pub fn json(&self) -> serde_json::Value {
        let s = &self.stats;
        let (l, b, switch) = s.variant.coefficients();
        serde_json::json!({
            "saved_activation_bytes": self.saved_bytes.map(|(r, st, f)| serde_json::json!({
                "reconstruct": r, "stored": st, "full_fine_tuning": f,
            })),
            "variant": s.variant.name(),
            "layers": s.reversible_layers,
            "model_layers": s.layers,
            "lambda": l,
            "beta": b,
            "switch": switch,
            "post_norm": s.post_norm,
            "adapters": s.adapters,
            "adapter_params": s.adapter_params,
            "start_deviation": self.start_deviation,
        })
    }
}

/// The relative L2 difference of the first float output of `rev` and `original` on one seeded
/// random input: token ids uniform over the table they index, other integer inputs ones,
/// float inputs N(0, 1).
fn start_deviation(original: &Graph, rev: &Graph) -> Result<Option<f64>> {
    let mut lowered = original.clone();
    memc_passes::blocks::lower_blocks(&mut lowered).map_err(|e| anyhow!(e))?;
    if memc_passes::plan::flops(&lowered, &[memc_ir::Phase::Forward]) > DEVIATION_FLOPS {
        return Ok(None);
    }
    let mut rng = memc_passes::reversible::Rng::new(0x5eed);
    let mut feeds = HashMap::new();
    for &v in original.inputs() {
        let ValueDef::Input { name } = &original.value(v).def else {
            continue;
        };
        let ty = &original.value(v).ty;
        let n = ty.numel();
        let t = if ty.dtype.is_float() {
            let x: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            Tensor::from_f64(ty.dtype, ty.shape.clone(), &x)
        } else if ty.dtype == DType::Bool {
            Tensor::from_i64(ty.dtype, ty.shape.clone(), &vec![1; n])
        } else {
            match crate::train::vocab_size(original, name) {
                Some(vocab) => {
                    let ids: Vec<i64> = (0..n)
                        .map(|_| (rng.uniform() * vocab as f64) as i64)
                        .collect();
                    Tensor::from_i64(ty.dtype, ty.shape.clone(), &ids)
                }
                None => Tensor::from_i64(ty.dtype, ty.shape.clone(), &vec![1; n]),
            }
        };
        feeds.insert(name.clone(), t);
    }
    let first_float = |g: &Graph, out: &memc_ir::Run| -> Option<Vec<f64>> {
        g.outputs()
            .iter()
            .zip(&out.outputs)
            .find(|((_, v), _)| g.value(*v).ty.dtype.is_float())
            .map(|(_, (_, t))| t.to_f64_vec())
    };
    let run = |g: &Graph| -> Result<Option<Vec<f64>>> {
        let out = memc_ir::run(g, &feeds, &Default::default()).map_err(|e| anyhow!(e))?;
        Ok(first_float(g, &out))
    };
    let (Some(a), Some(b)) = (run(original)?, run(rev)?) else {
        return Ok(None);
    };
    let norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    Ok(Some(diff / norm.max(f64::MIN_POSITIVE)))
}
