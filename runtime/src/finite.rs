//! Finding non-finite values in tensors' bytes: what the training loop checks after every step
//! (the weights after the update: an infinity or a NaN there is always an error) and what
//! `MEMC_CHECK_NAN=1` checks after every kernel (a NaN: an infinity in an intermediate can be
//! meant, such as a mask's −∞). The reference interpreter checks the same after every node,
//! so the compiled backends stop where it stops.

use crate::program::Dtype;

/// Which values count as bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// NaN only.
    Nan,
    /// NaN or ±∞.
    NonFinite,
}

/// The first bad element of `bytes` (elements of `dtype`): its index and value. Integer and
/// boolean tensors have none.
pub fn first(bytes: &[u8], dtype: Dtype, bad: Bad) -> Option<(usize, f64)> {
    // Each element's exponent bits (and whether the mantissa is zero, which tells ∞ from NaN).
    fn scan<const N: usize>(
        bytes: &[u8],
        bad: Bad,
        exp_all_ones: impl Fn([u8; N]) -> Option<bool>,
        value: impl Fn([u8; N]) -> f64,
    ) -> Option<(usize, f64)> {
        // Blocks without a bad element are skipped with a branch-free scan, which vectorises.
        const BLOCK: usize = 1024;
        let is_bad = |c: [u8; N]| match exp_all_ones(c) {
            Some(nan) => nan || bad == Bad::NonFinite,
            None => false,
        };
        for (b, block) in bytes.chunks(BLOCK * N).enumerate() {
            let any = block
                .chunks_exact(N)
                .fold(false, |acc, c| acc | is_bad(c.try_into().expect("N bytes")));
            if any {
                let (i, c) = block
                    .chunks_exact(N)
                    .enumerate()
                    .find(|(_, c)| is_bad((*c).try_into().expect("N bytes")))
                    .expect("a bad element in this block");
                return Some((b * BLOCK + i, value(c.try_into().expect("N bytes"))));
            }
        }
        None
    }
    match dtype {
        Dtype::F32 => scan::<4>(
            bytes,
            bad,
            |c| {
                let x = u32::from_le_bytes(c);
                (x & 0x7f80_0000 == 0x7f80_0000).then_some(x & 0x007f_ffff != 0)
            },
            |c| f32::from_le_bytes(c) as f64,
        ),
        Dtype::F64 => scan::<8>(
            bytes,
            bad,
            |c| {
                let x = u64::from_le_bytes(c);
                let e = 0x7ff0_0000_0000_0000;
                (x & e == e).then_some(x & 0x000f_ffff_ffff_ffff != 0)
            },
            f64::from_le_bytes,
        ),
        Dtype::Bf16 => scan::<2>(
            bytes,
            bad,
            |c| {
                let x = u16::from_le_bytes(c);
                (x & 0x7f80 == 0x7f80).then_some(x & 0x007f != 0)
            },
            |c| f32::from_bits((u16::from_le_bytes(c) as u32) << 16) as f64,
        ),
        Dtype::F16 => scan::<2>(
            bytes,
            bad,
            |c| {
                let x = u16::from_le_bytes(c);
                (x & 0x7c00 == 0x7c00).then_some(x & 0x03ff != 0)
            },
            |c| {
                if u16::from_le_bytes(c) & 0x03ff != 0 {
                    f64::NAN
                } else if c[1] & 0x80 != 0 {
                    f64::NEG_INFINITY
                } else {
                    f64::INFINITY
                }
            },
        ),
        Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::Bool => None,
    }
}

/// `[i, j, ..]`: the position of flat index `k` in `shape`.
pub fn position(shape: &[usize], k: usize) -> Vec<usize> {
    let mut at = vec![0; shape.len()];
    let mut rest = k;
    for d in (0..shape.len()).rev() {
        at[d] = rest % shape[d].max(1);
        rest /= shape[d].max(1);
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn finds_the_first_bad_element_of_each_type() {
        let mut v = vec![1.0f32; 5000];
        v[3001] = f32::INFINITY;
        v[4000] = f32::NAN;
        let b = f32s(&v);
        assert_eq!(
            first(&b, Dtype::F32, Bad::NonFinite),
            Some((3001, f64::INFINITY))
        );
        let (i, x) = first(&b, Dtype::F32, Bad::Nan).unwrap();
        assert!(i == 4000 && x.is_nan());
        assert_eq!(
            first(&f32s(&[f32::MAX, -0.0]), Dtype::F32, Bad::NonFinite),
            None
        );
        let d: Vec<u8> = [1.0, f64::NEG_INFINITY]
            .iter()
            .flat_map(|x: &f64| x.to_le_bytes())
            .collect();
        assert_eq!(
            first(&d, Dtype::F64, Bad::NonFinite),
            Some((1, f64::NEG_INFINITY))
        );
        assert_eq!(first(&d, Dtype::F64, Bad::Nan), None);
        // bf16: 1.0, −∞, NaN.
        let h: Vec<u8> = [0x3f80u16, 0xff80, 0x7fc0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            first(&h, Dtype::Bf16, Bad::NonFinite),
            Some((1, f64::NEG_INFINITY))
        );
        assert_eq!(first(&h, Dtype::Bf16, Bad::Nan).map(|p| p.0), Some(2));
        // f16: 1.0, +∞, NaN.
        let h: Vec<u8> = [0x3c00u16, 0x7c00, 0x7e00]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert_eq!(
            first(&h, Dtype::F16, Bad::NonFinite),
            Some((1, f64::INFINITY))
        );
        assert_eq!(first(&h, Dtype::F16, Bad::Nan).map(|p| p.0), Some(2));
        assert_eq!(first(&[0xff; 16], Dtype::I64, Bad::NonFinite), None);
        assert_eq!(position(&[2, 3, 4], 17), vec![1, 1, 1]);
    }
}
