//! memc-passes: graph-to-graph passes. Filled by later issues (autodiff, canonicalisation, ...).

#![warn(missing_docs)]

pub use egg;
