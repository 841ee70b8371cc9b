//! Kernels that the cpu backend runs on several threads: a kernel whose work is one top-level
//! `scf.parallel` gets a row range argument, and its outermost parallel dim runs only over
//! that range, so the runtime ([`memc_runtime::pool`]) can split the dim into tasks.
//!
//! The split form adds a last argument `%memc_range: memref<2xindex>` (the buffers array's
//! entry after the kernel's own, holding `[lo, hi]`) and bounds the first dim of the parallel
//! loop by it. Only kernels whose other top-level statements are single-line and write nothing
//! (constants, loads) are split, so running disjoint ranges on different threads computes
//! exactly what one call over the whole dim does: `scf.parallel` promises its iterations are
//! independent (scatters keep colliding dims in sequential loops inside it). The GPU mapping
//! ([`crate::ptx`]) reads the unsplit kernel.

use std::fmt::Write;

use crate::ptx::{index_constant, parallel_header, statements};

/// `mlir` (the kernel `name`, one `func.func`) in its split form and the extent of the dim it
/// splits, or `None` when the kernel is not one parallel loop over at least two rows.
pub fn split_form(mlir: &str, name: &str) -> Option<(String, u64)> {
    let lines: Vec<&str> = mlir.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with(&format!("func.func @{name}(")))?;
    let end = lines.iter().rposition(|l| l.trim() == "return")?;
    let stmts = statements(&lines[start + 1..end])?;
    let mut parallel = None;
    for (n, stmt) in stmts.iter().enumerate() {
        if stmt.len() == 1 {
            let l = stmt[0];
            if l.contains("memref.store") || l.contains("call ") || l.contains('{') {
                return None;
            }
            continue;
        }
        if parallel.is_some() {
            return None;
        }
        let (ivs, lbs, ubs, steps) = parallel_header(stmt[0])?;
        let reduce = stmt[stmt.len() - 2].trim();
        if lbs[0] != "%c0" || steps[0] != "%c1" || reduce != "scf.reduce" || ivs.is_empty() {
            return None;
        }
        parallel = Some((n, ubs[0].clone()));
    }
    let (at, ub) = parallel?;
    let extent = index_constant(&lines, &ub)? as u64;
    if extent < 2 {
        return None;
    }
    // The signature: one more memref argument.
    let sig = lines[start];
    let close = sig.rfind(") {")?;
    let mut out = String::new();
    for l in &lines[..start] {
        let _ = writeln!(out, "{l}");
    }
    let _ = writeln!(
        out,
        "{}, %memc_range: memref<2xindex>{}",
        &sig[..close],
        &sig[close..]
    );
    let _ = writeln!(
        out,
        "  %memc_r0 = arith.constant 0 : index\n  %memc_r1 = arith.constant 1 : index\n  \
         %memc_lo = memref.load %memc_range[%memc_r0] : memref<2xindex>\n  \
         %memc_hi = memref.load %memc_range[%memc_r1] : memref<2xindex>"
    );
    for (n, stmt) in stmts.iter().enumerate() {
        for (k, l) in stmt.iter().enumerate() {
            if n == at && k == 0 {
                // Bound the first dim: `= (%c0, ...) to (UB, ...)` becomes `(%memc_lo, ...)`
                // to `(%memc_hi, ...)`.
                let (ivs, mut lbs, mut ubs, steps) = parallel_header(l)?;
                lbs[0] = "%memc_lo".into();
                ubs[0] = "%memc_hi".into();
                let indent = &l[..l.len() - l.trim_start().len()];
                let _ = writeln!(
                    out,
                    "{indent}scf.parallel ({}) = ({}) to ({}) step ({}) {{",
                    ivs.join(", "),
                    lbs.join(", "),
                    ubs.join(", "),
                    steps.join(", ")
                );
            } else {
                let _ = writeln!(out, "{l}");
            }
        }
    }
    for l in &lines[end..] {
        let _ = writeln!(out, "{l}");
    }
    Some((out, extent))
}

#[cfg(test)]
mod tests {
    use super::split_form;

    const KERNEL: &str = "func.func @k(%a0: memref<4x8xf32>, %a1: memref<4x8xf32>) {
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %n0 = arith.constant 4 : index
  %n1 = arith.constant 8 : index
  scf.parallel (%i0, %i1) = (%c0, %c0) to (%n0, %n1) step (%c1, %c1) {
    %t1 = memref.load %a0[%i0, %i1] : memref<4x8xf32>
    memref.store %t1, %a1[%i0, %i1] : memref<4x8xf32>
    scf.reduce
  }
  return
}
";

    #[test]
    fn one_parallel_loop_is_split_on_its_first_dim() {
        let (m, n) = split_form(KERNEL, "k").unwrap();
        assert_eq!(n, 4);
        assert!(m.contains(
            "func.func @k(%a0: memref<4x8xf32>, %a1: memref<4x8xf32>, %memc_range: memref<2xindex>) {"
        ));
        assert!(m.contains(
            "scf.parallel (%i0, %i1) = (%memc_lo, %c0) to (%memc_hi, %n1) step (%c1, %c1) {"
        ));
    }

    #[test]
    fn sequential_top_level_work_is_not_split() {
        // A second top-level loop (a scatter's zero fill, then its accumulation).
        let two = KERNEL.replace(
            "  return\n",
            &format!(
                "{}  return\n",
                &KERNEL[KERNEL.find("  scf.parallel").unwrap()..KERNEL.find("  return").unwrap()]
            ),
        );
        assert!(split_form(&two, "k").is_none());
        let store = KERNEL.replace(
            "  return\n",
            "  %z = arith.constant 0.0 : f32\n  memref.store %z, %a1[%c0, %c0] : memref<4x8xf32>\n  return\n",
        );
        assert!(split_form(&store, "k").is_none());
        let one_row = KERNEL.replace("%n0 = arith.constant 4", "%n0 = arith.constant 1");
        assert!(split_form(&one_row, "k").is_none());
    }
}
