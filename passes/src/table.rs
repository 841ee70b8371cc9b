//! The pass table: every pass memc has, declared once ([`PASSES`]). Each entry parses its
//! options and calls the pass's typed function; `memc opt --list-passes` prints the table and
//! `memc opt --pass NAME{key=value ...}` runs its entries ([`crate::manager`]).
//!
//! To add a pass: write it in its own module as `fn(&mut Graph, typed options) -> Result<Stats,
//! Error>`, implement [`PassStats`] for its statistics (`pass_stats!`), add an entry here, and
//! add text cases under `tests/passes/<name>/`.

use memc_ir::{DType, Graph, NodeId, Op};

use crate::manager::{
    Line, OptKind, OptionDecl, Options, PassDecl, PassError, PassSpec, PassStats,
};
use crate::pass_stats;

const fn opt(
    key: &'static str,
    kind: OptKind,
    default: Option<&'static str>,
    doc: &'static str,
) -> OptionDecl {
    OptionDecl {
        key,
        kind,
        default,
        doc,
    }
}

/// Every pass, in the order a training build runs them (analyses last).
pub static PASSES: &[PassDecl] = &[
    PassDecl {
        name: "verify",
        summary: "check every invariant of the graph (the manager also verifies after every pass)",
        options: &[],
        run: |_, _| Ok(Box::new(Line(String::new()))),
    },
    PassDecl {
        name: "dce",
        summary: "remove what no output or update reads; renumber values canonically",
        options: &[],
        run: |g, _| {
            let before = g.nodes().len();
            g.compact();
            Ok(Box::new(Line(format!(
                "{before} -> {} nodes",
                g.nodes().len()
            ))))
        },
    },
    PassDecl {
        name: "canonicalize",
        summary: "recognise norms, activations, FFNs, rotary embeddings, residuals and attention (e-graph)",
        options: &[
            opt("iterations", OptKind::Count, Some("16"), "rule iterations at most"),
            opt("nodes", OptKind::Count, Some("500000"), "e-nodes at most"),
        ],
        run: |g, o| {
            let limits = crate::canonicalize::Limits {
                iterations: o.count("iterations").unwrap_or(16),
                nodes: o.count("nodes").unwrap_or(500_000),
            };
            crate::canonicalize::canonicalize(g, &limits)
                .map_err(|e| PassError::failed("canonicalize", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "compact-constants",
        summary: "merge identical constants and shrink them along broadcast dims",
        options: &[],
        run: |g, _| Ok(Box::new(crate::consts::compact_constants(g))),
    },
    PassDecl {
        name: "moc",
        summary: "Mixture-of-Channels: SwiGLU FFNs keep the top-k gate channels per token",
        options: &[opt(
            "k",
            OptKind::Text,
            None,
            "channels kept: a count (384) or a fraction of d_ffn (0.25)",
        )],
        run: |g, o| {
            let text = o.text("k").ok_or_else(|| o.bad("k", "", "a value"))?;
            let k = crate::moc::MocK::parse(text)
                .map_err(|e| o.bad("k", text, e.to_string()))?;
            crate::moc::apply_moc(g, k)
                .map_err(|e| PassError::failed("moc", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "reversible",
        summary: "make the residual layers reversible (MEFT couplings with adapters)",
        options: &[
            opt("variant", OptKind::Choice(&["meft1", "meft2", "meft3"]), Some("meft1"), "the coupling"),
            opt("layers", OptKind::Count, None, "only the first N layers (default: all)"),
            opt("adapter-rank", OptKind::Count, Some("8"), "the adapters' bottleneck width"),
            opt("seed", OptKind::Count, Some("0"), "seed of the adapters' initial weights"),
        ],
        run: |g, o| {
            use crate::reversible::{apply_reversible, RevOptions, Variant};
            let variant = match o.text("variant") {
                Some("meft2") => Variant::Meft2,
                Some("meft3") => Variant::Meft3,
                _ => Variant::Meft1,
            };
            let opts = RevOptions {
                variant,
                layers: o.count("layers"),
                adapter_rank: o.count("adapter-rank").unwrap_or(8),
                seed: o.count("seed").unwrap_or(0) as u64,
            };
            apply_reversible(g, &opts)
                .map_err(|e| PassError::failed("reversible", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "lower-blocks",
        summary: "replace block ops (attention, FFNs, norms, residual, ...) by their steps",
        options: &[opt(
            "keep",
            OptKind::Text,
            None,
            "block ops to keep, comma-separated (residual,rev_couple)",
        )],
        run: |g, o| {
            let keep = match o.text("keep") {
                Some(list) => list
                    .split(',')
                    .map(|name| {
                        block_op(name).ok_or_else(|| {
                            o.bad("keep", name, "block op names (residual, rev_couple, ...)")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                None => vec![],
            };
            crate::blocks::lower_blocks_keeping(g, &keep)
                .map_err(|e| PassError::failed("lower-blocks", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "accumulate",
        summary: "gradient accumulation: each gradient added into a persistent sum, the optimizer's updates gated by `memc.apply`",
        options: &[],
        run: |g, _| {
            crate::train::accumulate_grads(g)
                .map_err(|e| PassError::failed("accumulate", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "precision",
        summary: "compute in a lower precision with f32 master weights and optimizer",
        options: &[opt("dtype", OptKind::Choice(&["f32", "bf16", "f16"]), Some("bf16"), "compute dtype")],
        run: |g, o| {
            let dtype = match o.text("dtype") {
                Some("f32") => DType::F32,
                Some("f16") => DType::F16,
                _ => DType::BF16,
            };
            crate::precision::lower_precision(g, dtype)
                .map_err(|e| PassError::failed("precision", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "loss",
        summary: "add the next-token cross-entropy; it becomes the only output, `loss`",
        options: &[
            opt(
                "fused",
                OptKind::Bool,
                Some("true"),
                "the chunked LM-head loss that never holds the logits, when the head is one GEMM",
            ),
            opt(
                "kind",
                OptKind::Choice(&["next-token-ce", "causal-lm"]),
                Some("next-token-ce"),
                "the targets: the token ids, or the `memc.labels` input (-100 ignored)",
            ),
        ],
        run: |g, o| {
            let kind = match o.text("kind") {
                Some("causal-lm") => crate::train::Loss::CausalLm,
                _ => crate::train::Loss::NextTokenCe,
            };
            crate::train::add_loss(g, kind, o.flag("fused"))
                .map_err(|e| PassError::failed("loss", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "autodiff",
        summary: "differentiate `loss` (backward split into B and W) and declare each weight's gradient",
        options: &[opt(
            "trainable",
            OptKind::Text,
            Some("default"),
            "all, adapters, default (adapters when reversible, else all) or a regex of weight names",
        )],
        run: |g, o| {
            let t = crate::train::Trainable::parse(o.text("trainable").unwrap_or("default"));
            crate::train::autodiff(g, &t)
                .map_err(|e| PassError::failed("autodiff", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "clip",
        summary: "scale the declared gradients to a global norm of at most max-norm",
        options: &[opt("max-norm", OptKind::Number, Some("1"), "the largest global norm")],
        run: |g, o| {
            let m = o.number("max-norm").unwrap_or(1.0);
            if m <= 0.0 {
                return Err(o.bad("max-norm", &m.to_string(), "a positive number"));
            }
            crate::train::clip_grads(g, m)
                .map_err(|e| PassError::failed("clip", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "optimizer",
        summary: "update every weight with a declared gradient (SGD or AdamW as graph ops)",
        options: &[
            opt("kind", OptKind::Choice(&["adamw", "sgd"]), Some("adamw"), "the optimizer"),
            opt("beta1", OptKind::Number, Some("0.9"), "AdamW's first-moment decay"),
            opt("beta2", OptKind::Number, Some("0.999"), "AdamW's second-moment decay"),
            opt("eps", OptKind::Number, Some("1e-8"), "AdamW's epsilon"),
            opt("momentum", OptKind::Number, Some("0"), "SGD's momentum"),
            opt("grad-outputs", OptKind::Bool, Some("false"), "also output each gradient as `grad:<weight>`"),
        ],
        run: |g, o| {
            let num = |k: &str| o.number(k).unwrap_or(0.0);
            let optimizer = match o.text("kind") {
                Some("sgd") => crate::train::Optimizer::Sgd {
                    momentum: num("momentum"),
                },
                _ => crate::train::Optimizer::AdamW {
                    beta1: num("beta1"),
                    beta2: num("beta2"),
                    eps: num("eps"),
                },
            };
            crate::train::add_optimizer(g, &optimizer, o.flag("grad-outputs"))
                .map_err(|e| PassError::failed("optimizer", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "reconstruct",
        summary: "backward of reversible couplings from their outputs instead of saved activations",
        options: &[opt("check", OptKind::Bool, Some("false"), "also output each layer's reconstruction drift")],
        run: |g, o| {
            crate::reconstruct::reconstruct(g, o.flag("check"))
                .map_err(|e| PassError::failed("reconstruct", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "remat",
        summary: "choose what the backward keeps and recompute the rest",
        options: &[
            opt("policy", OptKind::Choice(&["auto", "full", "exact"]), Some("auto"), "auto: minimum cut (fewest FLOPs within budget); full: per-layer checkpoints; exact: per-layer programs only"),
            opt("budget", OptKind::Text, None, "saved-activation budget: bytes (1.5GiB) or a fraction (0.5)"),
        ],
        run: |g, o| {
            use crate::remat::{Budget, Policy};
            let budget = match o.text("budget") {
                Some(t) => Some(Budget::parse(t).map_err(|e| o.bad("budget", t, e.to_string()))?),
                None => None,
            };
            let policy = match (o.text("policy"), budget) {
                (Some("full"), None) => Policy::Full,
                (Some("full"), Some(_)) => {
                    return Err(o.bad("budget", o.text("budget").unwrap_or(""), "no budget with policy=full"))
                }
                (Some("exact"), Some(b)) => Policy::Exact(b),
                (Some("exact"), None) => return Err(o.bad("budget", "", "a budget with policy=exact")),
                (_, Some(b)) => Policy::Budget(b),
                (_, None) => Policy::MinCut,
            };
            crate::remat::rematerialize(g, &policy)
                .map_err(|e| PassError::failed("remat", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "partition",
        summary: "split the layers of a training program into balanced pipeline chunks (analysis)",
        options: &[opt("chunks", OptKind::Count, Some("2"), "how many chunks")],
        run: |g, o| {
            crate::partition::partition(g, o.count("chunks").unwrap_or(2))
                .map_err(|e| PassError::failed("partition", e))
                .map(boxed)
        },
    },
    PassDecl {
        name: "fusion",
        summary: "group nodes into kernels (elementwise chains and their reductions) (analysis)",
        options: &[],
        run: |g, _| Ok(Box::new(Fusion(crate::fuse::fuse(g)))),
    },
    PassDecl {
        name: "plan",
        summary: "order the nodes and place every buffer in one arena (analysis)",
        options: &[],
        run: |g, _| Ok(Box::new(crate::plan::plan(g))),
    },
];

/// A pass's statistics behind the table's uniform return type.
fn boxed<T: PassStats>(stats: T) -> Box<dyn PassStats> {
    Box::new(stats)
}

/// The block op named `name` (as printed), for `lower-blocks{keep=...}`.
fn block_op(name: &str) -> Option<Op> {
    match name {
        "residual" => Some(Op::Residual),
        "rev_couple" => Some(Op::RevCouple),
        _ => None,
    }
}

/// The kernels of the `fusion` pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Fusion(pub Vec<crate::fuse::Kernel>);

pass_stats! {Fusion,
    fn summary(&self) -> String {
        let fused = self.0.iter().filter(|k| k.elementwise).count();
        format!("{} kernels, {fused} generated from fused nodes", self.0.len())
    }
    fn render(&self, g: &Graph) -> Option<String> {
        let mut kernel_of = vec![None; g.nodes().len()];
        for (i, k) in self.0.iter().enumerate() {
            for n in &k.nodes {
                kernel_of[n.index()] = Some((i, k.elementwise));
            }
        }
        Some(memc_ir::print_annotated(g, &|n: NodeId| {
            kernel_of[n.index()].map(|(i, e)| format!("kernel {i}{}", if e { " (fused)" } else { "" }))
        }))
    }
}

fn commented(text: &str) -> String {
    text.lines().map(|l| format!("// {l}\n")).collect()
}

pass_stats! {crate::plan::Plan,
    fn summary(&self) -> String {
        format!("peak {} bytes over {} steps", self.peak_bytes, self.steps)
    }
    fn render(&self, g: &Graph) -> Option<String> {
        Some(memc_ir::print(g) + &commented(&crate::plan::text(g, self)))
    }
}

pass_stats! {crate::partition::Partition,
    fn summary(&self) -> String {
        format!("{} layers in {} chunks", self.layers, self.chunks.len())
    }
    fn render(&self, g: &Graph) -> Option<String> {
        let mut table = String::new();
        for (i, c) in self.chunks.iter().enumerate() {
            table += &format!(
                "chunk {i}: layers {}..{}, {} flops, {} weight bytes, {} state bytes, {} saved bytes{}{}\n",
                c.layers.0, c.layers.1, c.flops, c.weight_bytes, c.state_bytes, c.saved_bytes,
                if c.embedding { ", embedding" } else { "" },
                if c.head { ", head" } else { "" },
            );
        }
        let annotated = memc_ir::print_annotated(g, &|n: NodeId| {
            self.node_chunk.get(n.index()).copied().flatten().map(|c| format!("chunk {c}"))
        });
        Some(annotated + &commented(&table))
    }
}

pass_stats! {crate::canonicalize::CanonStats, fn summary(&self) -> String {
    format!(
        "{} -> {} nodes, {} iterations ({}), recognised {:?}{}",
        self.nodes_before, self.nodes_after, self.iterations, self.stop, self.recognised,
        match self.masks_folded {
            0 => String::new(),
            n => format!(", {n} attention masks folded into causal/window attributes"),
        }
    )
}}

pass_stats! {crate::consts::ConstStats, fn summary(&self) -> String {
    format!(
        "constants {} -> {} bytes ({} merged, {} shrunk)",
        self.bytes_before, self.bytes_after, self.merged, self.shrunk
    )
}}

pass_stats! {crate::moc::MocStats, fn summary(&self) -> String {
    let k = self.k.map(|(k, f)| format!(", keeping {k} of {f} channels")).unwrap_or_default();
    format!("{} swiglu_ffn -> moc_ffn{k}; {} FFNs left dense", self.rewritten, self.left_dense)
}}

pass_stats! {crate::reversible::RevStats, fn summary(&self) -> String {
    format!(
        "{} of {} layers reversible ({}), {} adapters ({} parameters)",
        self.reversible_layers, self.layers, self.variant.name(), self.adapters, self.adapter_params
    )
}}

pass_stats! {crate::precision::PrecisionStats, fn summary(&self) -> String {
    format!("{} weights cast, {} nodes converted", self.cast_weights, self.converted_nodes)
}}

pass_stats! {crate::reconstruct::ReconstructStats, fn summary(&self) -> String {
    format!(
        "{} couplings inverted ({} nodes), {} drift outputs",
        self.couplings, self.nodes, self.drift_outputs
    )
}}

pass_stats! {crate::remat::RematStats, fn summary(&self) -> String {
    format!(
        "saved activations {} -> {} bytes, {} nodes recomputed, {} layers",
        self.saved_bytes_before, self.saved_bytes_after, self.recomputed_nodes, self.layers
    )
}}

/// The pass `name` of the table with `options` (`key=value` pairs), checked.
pub fn spec(name: &str, options: &[(&str, &str)]) -> Result<PassSpec, PassError> {
    let decl = lookup(name)?;
    let mut o = Options::none(decl);
    for (k, v) in options {
        o.set(k, v)?;
    }
    Ok(PassSpec { decl, options: o })
}

/// The table's entry for `name`.
pub fn lookup(name: &str) -> Result<&'static PassDecl, PassError> {
    PASSES
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| PassError::UnknownPass {
            name: name.to_string(),
            available: PASSES.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
        })
}

/// Parses a pipeline in MLIR's syntax: passes separated by commas, each with optional
/// `{key=value ...}` options (separated by spaces; a bare key is `key=true`).
pub fn parse_pipeline(text: &str) -> Result<Vec<PassSpec>, PassError> {
    let syntax = |msg: &str| PassError::Syntax {
        text: text.to_string(),
        msg: msg.to_string(),
    };
    let mut specs = vec![];
    let mut rest = text.trim();
    while !rest.is_empty() {
        let end = rest.find([',', '{']).unwrap_or(rest.len());
        let name = rest[..end].trim();
        if name.is_empty() {
            return Err(syntax("a pass name is missing"));
        }
        if let Some((a, _)) = name.split_once(char::is_whitespace) {
            return Err(syntax(&format!("expected `,` after `{a}`")));
        }
        let decl = lookup(name)?;
        let mut options = Options::none(decl);
        rest = &rest[end..];
        if let Some(body) = rest.strip_prefix('{') {
            let close = body
                .find('}')
                .ok_or_else(|| syntax("an option list `{` is not closed"))?;
            for item in body[..close].split_whitespace() {
                let (k, v) = item.split_once('=').unwrap_or((item, "true"));
                if k.is_empty() || v.is_empty() {
                    return Err(syntax(&format!("option `{item}` is not key=value")));
                }
                options.set(k, v)?;
            }
            rest = &body[close + 1..];
        }
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
            if rest.is_empty() {
                return Err(syntax("the pipeline ends with a comma"));
            }
        } else if !rest.is_empty() {
            return Err(syntax(&format!("expected `,` before `{rest}`")));
        }
        specs.push(PassSpec { decl, options });
    }
    Ok(specs)
}

/// `--list-passes`: every pass with its summary and options.
pub fn list() -> String {
    let mut s = String::new();
    for p in PASSES {
        s += &format!("{:<18} {}\n", p.name, p.summary);
        for o in p.options {
            let default = o
                .default
                .map(|d| format!(" (default {d})"))
                .unwrap_or_default();
            s += &format!(
                "    {:<14} {}: {}{default}\n",
                o.key,
                o.kind.describe(),
                o.doc
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::PassError;

    #[test]
    fn names_are_unique_and_the_summaries_one_line() {
        let mut names: Vec<&str> = super::PASSES.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), super::PASSES.len());
        assert!(super::PASSES.iter().all(|p| !p.summary.contains('\n')));
    }

    #[test]
    fn options_are_checked() {
        let decl = lookup("remat").unwrap();
        let mut o = Options::none(decl);
        assert!(o.set("policy", "full").is_ok());
        assert!(o.set("nope", "1").is_err());
        assert_eq!(o.display(), "remat{policy=full}");
    }

    #[test]
    fn pipelines_parse_in_mlir_syntax() {
        let p = parse_pipeline("dce, remat{policy=full},lower-blocks{keep=residual,rev_couple}")
            .unwrap();
        let names: Vec<String> = p.iter().map(|s| s.options.display()).collect();
        assert_eq!(
            names,
            [
                "dce",
                "remat{policy=full}",
                "lower-blocks{keep=residual,rev_couple}"
            ]
        );
        assert_eq!(p[1].options.text("policy"), Some("full"));
        assert!(matches!(
            parse_pipeline("nope"),
            Err(PassError::UnknownPass { .. })
        ));
        assert!(matches!(
            parse_pipeline("remat{polcy=full}"),
            Err(PassError::UnknownOption { .. })
        ));
        assert!(matches!(
            parse_pipeline("remat{policy=most}"),
            Err(PassError::BadValue { .. })
        ));
        for bad in ["dce,", "remat{policy=full", ",dce", "dce dce"] {
            assert!(
                matches!(parse_pipeline(bad), Err(PassError::Syntax { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn every_declared_default_fits_its_kind() {
        for p in crate::table::PASSES {
            for o in p.options {
                if let Some(d) = o.default {
                    assert!(o.kind.check(d), "{}: {}", p.name, o.key);
                }
            }
        }
    }
}
