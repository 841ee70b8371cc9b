//! Rewrite rule families of the canonicalisation, one file each.

pub mod norms;
