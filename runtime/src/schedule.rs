//! How a training run moves through its steps: the learning-rate schedule (transformers'
//! `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
//! `get_cosine_schedule_with_warmup`, value for value) and the order the data's rows are
//! read in (`--shuffle --seed S`: a fresh permutation each pass over the data, from the seed
//! and the pass alone, so a resumed run reads exactly the rows it would have).

/// The shape of a learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrKind {
    /// The base rate (after the warmup).
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half a cosine down to 0 at the last step.
    Cosine,
}

impl LrKind {
    /// Reads `constant`, `linear` or `cosine`.
    pub fn parse(s: &str) -> Result<LrKind, String> {
        match s {
            "constant" => Ok(LrKind::Constant),
            "linear" => Ok(LrKind::Linear),
            "cosine" => Ok(LrKind::Cosine),
            _ => Err(format!(
                "--lr-schedule `{s}`: expected constant, linear or cosine"
            )),
        }
    }

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            LrKind::Constant => "constant",
            LrKind::Linear => "linear",
            LrKind::Cosine => "cosine",
        }
    }
}

/// A learning-rate schedule over a run of `total` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Its shape.
    pub kind: LrKind,
    /// Steps of linear warmup from 0.
    pub warmup: u64,
    /// The run's optimizer steps (the decay reaches 0 there).
    pub total: u64,
}

impl LrSchedule {
    /// The base rate's multiplier for the update of step `step` (1 for the first update):
    /// transformers' `LambdaLR` factor at `current_step = step - 1` (the scheduler steps after
    /// the optimizer, so the first update uses the factor of step 0: 0 under a warmup).
    pub fn factor(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1) as f64;
        let (warmup, total) = (self.warmup as f64, self.total as f64);
        if s < warmup {
            return s / warmup.max(1.0);
        }
        match self.kind {
            LrKind::Constant => 1.0,
            LrKind::Linear => ((total - s) / (total - warmup).max(1.0)).max(0.0),
            LrKind::Cosine => {
                let progress = (s - warmup) / (total - warmup).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// The order a run reads the rows of its data in: position `p` (rows read before) is row
/// `p mod rows` of pass `p / rows` over the data, in file order or, shuffled, in that pass's
/// permutation (Fisher–Yates driven by SplitMix64 seeded from the seed and the pass).
#[derive(Debug, Clone)]
pub struct RowOrder {
    rows: usize,
    seed: Option<u64>,
    /// The pass whose permutation `perm` holds.
    pass: Option<u64>,
    perm: Vec<u32>,
}

impl RowOrder {
    /// File order over `rows` rows, or shuffled each pass with `seed`.
    pub fn new(rows: usize, seed: Option<u64>) -> RowOrder {
        RowOrder {
            rows,
            seed,
            pass: None,
            perm: vec![],
        }
    }

    /// The row read at position `p`.
    pub fn row(&mut self, p: u64) -> usize {
        let (pass, at) = (p / self.rows as u64, (p % self.rows as u64) as usize);
        let Some(seed) = self.seed else {
            return at;
        };
        if self.pass != Some(pass) {
            self.perm = permutation(self.rows, seed, pass);
            self.pass = Some(pass);
        }
        self.perm[at] as usize
    }
}

/// SplitMix64's next value.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A permutation of `0..n` from `seed` and `pass` alone.
fn permutation(n: usize, seed: u64, pass: u64) -> Vec<u32> {
    let mut state = seed ^ pass.wrapping_mul(0xd1b5_4a32_d192_ed03);
    let mut perm: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        // Lemire's multiply-shift: uniform enough for data order, no division.
        let j = ((splitmix(&mut state) as u128 * (i as u128 + 1)) >> 64) as usize;
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers_formulas() {
        let s = |kind, warmup, total| LrSchedule {
            kind,
            warmup,
            total,
        };
        // get_linear_schedule_with_warmup(opt, 2, 5): factors at current_step 0..5.
        let lin: Vec<f64> = (1..=5).map(|k| s(LrKind::Linear, 2, 5).factor(k)).collect();
        assert_eq!(lin, [0.0, 0.5, 1.0, 2.0 / 3.0, 1.0 / 3.0]);
        // No warmup: the first update at the full rate.
        assert_eq!(s(LrKind::Linear, 0, 4).factor(1), 1.0);
        assert_eq!(s(LrKind::Linear, 0, 4).factor(5), 0.0);
        let cos: Vec<f64> = (1..=5).map(|k| s(LrKind::Cosine, 1, 5).factor(k)).collect();
        assert_eq!(cos[0], 0.0);
        assert_eq!(cos[1], 1.0);
        assert!((cos[3] - 0.5).abs() < 1e-15, "{cos:?}");
        // Its end (a run never goes past it: the formula would rise again, as transformers').
        assert_eq!(s(LrKind::Cosine, 1, 5).factor(6), 0.0);
        let con: Vec<f64> = (1..=4)
            .map(|k| s(LrKind::Constant, 2, 4).factor(k))
            .collect();
        assert_eq!(con, [0.0, 0.5, 1.0, 1.0]);
        assert!(LrKind::parse("step")
            .unwrap_err()
            .contains("constant, linear or cosine"));
    }

    #[test]
    fn shuffled_passes_are_permutations_fixed_by_seed_and_pass() {
        let mut a = RowOrder::new(10, Some(7));
        let pass0: Vec<usize> = (0..10).map(|p| a.row(p)).collect();
        let pass1: Vec<usize> = (10..20).map(|p| a.row(p)).collect();
        for pass in [&pass0, &pass1] {
            let mut s = pass.clone();
            s.sort();
            assert_eq!(s, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(pass0, pass1);
        assert_ne!(pass0, (0..10).collect::<Vec<_>>());
        // A fresh order (a resumed run) reads the same rows from any position.
        let mut b = RowOrder::new(10, Some(7));
        assert_eq!(b.row(13), pass1[3]);
        assert_eq!(b.row(2), pass0[2]);
        let mut c = RowOrder::new(10, Some(8));
        assert_ne!((0..10).map(|p| c.row(p)).collect::<Vec<_>>(), pass0);
        let mut plain = RowOrder::new(3, None);
        assert_eq!(
            (0..7).map(|p| plain.row(p)).collect::<Vec<_>>(),
            [0, 1, 2, 0, 1, 2, 0]
        );
    }
}
