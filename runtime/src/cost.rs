//! Timing of the steps the runtime runs itself, one at a time, for `memc plan`'s cost model:
//! a GEMM of given shapes and an attention part of a given [`Spec`] on zeroed buffers, and
//! ([`crate::cpu::Cpu::time_steps`]) every step of a compiled program alone. The cost model
//! (the compiler's `cost` module) composes these into a predicted step time; it never times a
//! whole candidate configuration.

use crate::attention::Spec;
use crate::gemm::{matmul, GemmType};
use crate::program::Dtype;
use std::time::Instant;

/// The median wall time of `reps` calls of `f` (at least one) after one warm-up call.
pub fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn elem_bytes(t: Dtype) -> usize {
    match t {
        Dtype::F64 | Dtype::I64 => 8,
        Dtype::F16 | Dtype::Bf16 => 2,
        _ => 4,
    }
}

/// Seconds for `a @ b` (`a_shape`, `b_shape` as in [`crate::program::Step::Gemm`], `trans`
/// its stored-transposed flags) on the GEMM library with the pool's threads: the median of
/// `reps` runs on zeroed buffers. `None` for shapes the GEMM does not take.
pub fn time_gemm(
    dtype: Dtype,
    a_shape: &[usize],
    b_shape: &[usize],
    trans: (bool, bool),
    reps: usize,
) -> Option<f64> {
    let t = match dtype {
        Dtype::F32 => GemmType::F32,
        Dtype::F64 => GemmType::F64,
        Dtype::Bf16 => GemmType::BF16,
        _ => return None,
    };
    let geometry = crate::gemm::Geometry::of(a_shape, b_shape)?;
    let e = elem_bytes(dtype);
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let out_numel = geometry.count * geometry.m * geometry.n;
    // Buffers of f32 (or wider) alignment, as the arena gives.
    let buf = |n: usize| vec![0u64; (n * e).div_ceil(8)];
    let (a, b, mut o) = (buf(numel(a_shape)), buf(numel(b_shape)), buf(out_numel));
    let bytes = |v: &Vec<u64>, n: usize| -> &[u8] {
        // SAFETY: a u64 buffer viewed as its bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), n * e) }
    };
    let (sa, sb) = (bytes(&a, numel(a_shape)), bytes(&b, numel(b_shape)));
    // SAFETY: as above, mutably, and `o` outlives the slice.
    let so = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<u8>(), out_numel * e) };
    Some(median_secs(reps, || {
        matmul(t, sa, a_shape, sb, b_shape, so, trans)
    }))
}

/// Seconds for one attention part of `spec` (the runtime's tiled attention, with the pool's
/// threads): the median of `reps` runs on zeroed operands.
pub fn time_attention(spec: &Spec, reps: usize) -> f64 {
    let e = elem_bytes(spec.dtype);
    let shapes = spec.shapes();
    let mut bufs: Vec<Vec<u8>> = shapes
        .iter()
        .map(|s| vec![0u8; s.iter().product::<usize>() * e])
        .collect();
    let mut out = bufs.pop().expect("operands and a result");
    let ins: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
    median_secs(reps, || crate::attention::run(spec, &ins, &mut out))
}
