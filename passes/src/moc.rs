//! `apply_moc`: Mixture-of-Channels. Every recognised gated FFN (`swiglu_ffn`, and the gated
//! GELU `gelu_ffn` with 4 operands, GeGLU) becomes a `moc_ffn` that keeps the `k` largest gate
//! channels per token (Mixture-of-Channels, arXiv 2511.09323); ungated FFNs (`gelu_ffn` with
//! 3 or 5 operands) stay dense and are counted so the report can say so.
//!
//! The block's steps ([`memc_ir::Op::expansion`]) gather the selected gate and up values, so
//! the backward pass keeps `k` values of each and their indices (i32) per token instead of
//! the `d_ffn`-wide gate and up projections.

use memc_ir::{Graph, NodeId, Op};

/// How many channels to keep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MocK {
    /// This many.
    Count(usize),
    /// This fraction of `d_ffn` (rounded, at least 1).
    Ratio(f64),
}

/// A `k` that is neither a count nor a fraction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither a channel count (384) nor a fraction of d_ffn in (0, 1) (0.25)")]
pub struct BadK(pub String);

impl MocK {
    /// A positive count (`384`) or a fraction of `d_ffn` in (0, 1) (`0.25`).
    pub fn parse(text: &str) -> Result<MocK, BadK> {
        if let Ok(k) = text.trim().parse::<usize>() {
            if k > 0 {
                return Ok(MocK::Count(k));
            }
        }
        match text.trim().parse::<f64>() {
            Ok(r) if r > 0.0 && r < 1.0 => Ok(MocK::Ratio(r)),
            _ => Err(BadK(text.to_string())),
        }
    }
}

/// Why MoC could not rewrite a graph.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MocError {
    /// The channels kept are not within the FFN's width.
    #[error("keeping {keep} channels is outside 1..={d_ffn} (d_ffn of node `{node}`)")]
    OutOfRange {
        /// Channels asked for.
        keep: usize,
        /// The FFN's width.
        d_ffn: usize,
        /// The FFN node's name.
        node: String,
    },
    /// The rewritten graph does not verify (a memc bug).
    #[error("MoC produced an invalid graph (a memc bug): {0}")]
    Invalid(String),
}

/// What [`apply_moc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MocStats {
    /// Gated FFN blocks (`swiglu_ffn`, 4-operand `gelu_ffn`) rewritten.
    pub rewritten: usize,
    /// Channels kept per token, of how many (of the first rewritten block).
    pub k: Option<(usize, usize)>,
    /// FFN blocks left dense (`gelu_ffn`), which MoC does not apply to.
    pub left_dense: usize,
}

/// Rewrites `g`'s gated FFN blocks (see the module docs).
pub fn apply_moc(g: &mut Graph, k: MocK) -> Result<MocStats, MocError> {
    let mut stats = MocStats::default();
    for i in 0..g.nodes().len() {
        let n = NodeId(i as u32);
        let gelu = match g.node(n).op {
            Op::SwigluFfn => None,
            Op::GeluFfn { tanh } if g.node(n).inputs.len() == 4 => Some(tanh),
            Op::GeluFfn { .. } => {
                stats.left_dense += 1;
                continue;
            }
            _ => continue,
        };
        let f = g.value(g.node(n).inputs[1]).ty.shape[1];
        let keep = match k {
            MocK::Count(c) => c,
            MocK::Ratio(r) => ((r * f as f64).round() as usize).max(1),
        };
        if keep == 0 || keep > f {
            return Err(MocError::OutOfRange {
                keep,
                d_ffn: f,
                node: g.node_label(n),
            });
        }
        g.set_op(n, Op::MocFfn { k: keep, gelu });
        stats.rewritten += 1;
        stats.k.get_or_insert((keep, f));
    }
    memc_ir::verify(g).map_err(|e| MocError::Invalid(e.to_string()))?;
    Ok(stats)
}
