//! `canonicalize`: recognise whole blocks in whatever ops an exporter wrote, through an
//! e-graph ([`crate::egraph`]) and the rule families of [`crate::rules`]. Today: RMSNorm and
//! decomposed LayerNorm ([`crate::rules::norms`]), scaled dot-product attention with masks
//! and grouped-query heads ([`crate::rules::attention`]), and the transposes around them
//! ([`crate::rules::layout`]).
//!
//! The graph is loaded into an e-graph (shared values stay shared), the rules run to
//! saturation or to the limits (e-nodes and iterations, never wall time, so the result does not
//! depend on the machine's load), and the cheapest DAG is extracted
//! and stored back. Results are unchanged up to rounding (a fused op rounds once where its
//! decomposition rounded per op); the tests check the logits of every example.

use std::collections::BTreeMap;
use std::time::Duration;

use egg::{Id, Runner, StopReason};
use memc_ir::Graph;

use crate::egraph::{extract, load, store};

/// No wall-time limit (egg compares the elapsed time with it; it never adds to an instant).
const UNLIMITED: Duration = Duration::from_secs(1 << 40);

/// Limits that keep the canonicalisation bounded.
#[derive(Debug, Clone)]
pub struct Limits {
    /// E-nodes at most.
    pub nodes: usize,
    /// Rule iterations at most.
    pub iterations: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            nodes: 500_000,
            iterations: 16,
        }
    }
}

/// Why the canonicalisation failed (each a memc bug: the rules keep types and values).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonError {
    /// No term could be extracted for a root.
    #[error("{0}")]
    Extract(String),
    /// The extracted terms could not be stored back as a graph.
    #[error("{0}")]
    Store(String),
    /// The stored graph does not verify.
    #[error("canonicalize produced an invalid graph (a memc bug): {0}")]
    Invalid(String),
}

/// What [`canonicalize`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CanonStats {
    /// Graph nodes before.
    pub nodes_before: usize,
    /// Graph nodes after.
    pub nodes_after: usize,
    /// Rule iterations run.
    pub iterations: usize,
    /// E-nodes at the end.
    pub egraph_nodes: usize,
    /// Why the rules stopped (`saturated` unless a limit was hit).
    pub stop: String,
    /// Ops of each recognised kind in the result (`rms_norm`: 5).
    pub recognised: BTreeMap<String, usize>,
    /// Constant attention masks replaced by `causal`/`window` attributes
    /// ([`crate::masks::fold_masks`]).
    pub masks_folded: usize,
}

/// The ops the canonicalisation introduces.
pub const RECOGNISED: &[&str] = &[
    "rms_norm",
    "layer_norm",
    "attention",
    "swiglu_ffn",
    "gelu_ffn",
    "silu",
    "gelu",
    "gelu_tanh",
    "rope",
    "residual",
];

/// Rewrites `g` (a forward graph) in place (see the module docs), then folds its constant
/// attention masks into attributes ([`crate::masks::fold_masks`]).
pub fn canonicalize(g: &mut Graph, limits: &Limits) -> Result<CanonStats, CanonError> {
    let mut stats = rewrite(g, limits)?;
    stats.masks_folded = crate::masks::fold_masks(g);
    if stats.masks_folded > 0 {
        stats.nodes_after = g.nodes().len();
        memc_ir::verify(g).map_err(|e| CanonError::Invalid(e.to_string()))?;
    }
    Ok(stats)
}

/// The e-graph rewrite.
fn rewrite(g: &mut Graph, limits: &Limits) -> Result<CanonStats, CanonError> {
    let before = g.nodes().len();
    let loaded = load(g);
    let roots: Vec<Id> = loaded.roots.iter().map(|r| r.1).collect();
    let runner = Runner::default()
        .with_egraph(loaded.egraph)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        // egg's default stops after 5 s; the result must not depend on the machine's load.
        .with_time_limit(UNLIMITED)
        .run(&crate::rules::all());
    let stop = match &runner.stop_reason {
        Some(StopReason::Saturated) | None => "saturated".to_string(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(StopReason::TimeLimit(s)) => format!("time limit ({s:.1} s)"),
        Some(StopReason::Other(s)) => s.clone(),
    };
    let applied: usize = runner
        .iterations
        .iter()
        .map(|i| i.applied.values().sum::<usize>())
        .sum();
    // What is reported when the graph stays exactly as it was (node order included).
    let unchanged = CanonStats {
        nodes_before: before,
        nodes_after: before,
        iterations: runner.iterations.len(),
        egraph_nodes: runner.egraph.total_number_of_nodes(),
        stop: stop.clone(),
        recognised: BTreeMap::new(),
        masks_folded: 0,
    };
    if applied == 0 {
        return Ok(unchanged);
    }
    let chosen = extract(&runner.egraph, &roots).map_err(CanonError::Extract)?;
    let out = store(g, &runner.egraph, &chosen, &loaded.roots).map_err(CanonError::Store)?;
    memc_ir::verify(&out).map_err(|e| CanonError::Invalid(e.to_string()))?;
    if out.op_counts() == g.op_counts() {
        // Only equalities that neither recognise nor remove anything applied (a scalar
        // moved through a product).
        return Ok(unchanged);
    }
    let counts = out.op_counts();
    let recognised = RECOGNISED
        .iter()
        .filter_map(|&k| counts.get(k).map(|&n| (k.to_string(), n)))
        .collect();
    let stats = CanonStats {
        nodes_before: before,
        nodes_after: out.nodes().len(),
        iterations: runner.iterations.len(),
        egraph_nodes: runner.egraph.total_number_of_nodes(),
        stop,
        recognised,
        masks_folded: 0,
    };
    *g = out;
    Ok(stats)
}
