//! Vector math for the runtime's own loops ([`crate::attention`]): `exp` as arithmetic that
//! the loop vectoriser can widen (libm's `expf` is an opaque scalar call that stops it), and
//! [`simd`], which runs a closure compiled for the CPU's vector units (AVX-512 or AVX2 with
//! FMA, found at run time) so the same source vectorises as wide as the machine allows: the
//! runtime library itself is built for the baseline x86-64.

/// `exp` for f32 as arithmetic, the algorithm the generated host kernels inline
/// (`codegen/src/kernel.rs`, `EXPF`): n = round(x·log₂e) by the 1.5·2²³ trick,
/// r = x − n·ln 2 in two parts, Cephes' degree-6 polynomial, then scaled by 2ⁿ in two halves
/// so results down to the subnormals are right. Within 2 ulp of libm; `exp(−∞) = 0`,
/// `exp(+∞) = +∞` (and above 88.72), NaN stays NaN; below −110 the result is 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LO: f32 = -110.0;
    const HI: f32 = 88.722_84;
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let nf = (xc * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = (xc - nf * 0.693_359_4) - nf * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes' 5.0000001201e-1, which rounds to 0.5 in f32
    let y = p * (r * r) + r + 1.0;
    // NaN converts to 0 here, and `y` is already NaN.
    let n = nf as i32;
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    let z = y * s1 * s2;
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else {
        z
    }
}

/// Work to run compiled for the CPU's vector units ([`simd`]). `run` must be
/// `#[inline(always)]`, as must the loops it calls, so that they are compiled inside the
/// wide-vector function rather than once for the baseline.
pub trait Vectorised {
    /// What `run` returns.
    type Out;
    /// Does the work.
    fn run(self) -> Self::Out;
}

/// Runs `work`, compiled for AVX-512 (F, VL, BW, DQ) or else AVX2 with FMA when this CPU has
/// them: its `#[inline(always)]` loops are vectorised that wide. The result is the same
/// either way up to the order of floating-point sums, which the callers fix (fixed lane
/// counts), so it does not depend on the CPU. `MEMC_NO_SIMD` set: the baseline code.
#[inline(always)]
pub fn simd<W: Vectorised>(work: W) -> W::Out {
    #[cfg(target_arch = "x86_64")]
    {
        match level() {
            // SAFETY: the CPU has the features the callee is compiled for (checked by `level`).
            Level::Avx512 => return unsafe { avx512(work) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { avx2(work) },
            Level::Base => {}
        }
    }
    work.run()
}

#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Base,
    Avx2,
    Avx512,
}

/// The widest vector level this CPU has (checked once).
#[cfg(target_arch = "x86_64")]
fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::env::var_os("MEMC_NO_SIMD").is_some() {
            Level::Base
        } else if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            Level::Avx512
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            Level::Avx2
        } else {
            Level::Base
        }
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
fn avx512<W: Vectorised>(work: W) -> W::Out {
    work.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2<W: Vectorised>(work: W) -> W::Out {
    work.run()
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    /// Within 2 ulp of libm over the range softmax uses, exact at the edges.
    #[test]
    fn exp_matches_libm() {
        for i in -40000..=25000 {
            let x = i as f32 * 0.00355;
            let (got, want) = (exp_f32(x), x.exp());
            let ulp = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulp <= 2, "exp({x}) = {got}, libm {want}");
        }
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        let sub = exp_f32(-100.0);
        assert!(sub > 0.0 && (sub - (-100f32).exp()).abs() <= f32::from_bits(1));
    }
}
