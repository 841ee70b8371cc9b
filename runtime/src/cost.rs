//! Timing of the steps the runtime runs itself, one at a time, for `memc plan`'s cost model:
//! a GEMM of given shapes and an attention part of a given [`Spec`] on buffers of small numbers, and
//! ([`crate::cpu::Cpu::time_steps`]) every step of a compiled program alone. The cost model
//! (the compiler's `cost` module) composes these into a predicted step time; it never times a
//! whole candidate configuration.

use crate::attention::Spec;
use crate::gemm::{matmul, GemmType};
use crate::program::Dtype;
use std::time::Instant;

/// The fastest of `reps` calls of `f` (at least one) after one warm-up call: a step's own
/// time, without what other work on a shared machine adds to some runs (the cost model adds
/// what a real run adds to every step separately).
pub fn min_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn elem_bytes(t: Dtype) -> usize {
    match t {
        Dtype::F64 | Dtype::I64 => 8,
        Dtype::F16 | Dtype::Bf16 => 2,
        _ => 4,
    }
}

/// Seconds for `a @ b` (`a_shape`, `b_shape` as in [`crate::program::Step::Gemm`], `trans`
/// its stored-transposed flags) on the GEMM library with the pool's threads: the fastest of
/// `reps` runs on buffers of small numbers. `None` for shapes the GEMM does not take.
pub fn time_gemm(
    dtype: Dtype,
    a_shape: &[usize],
    b_shape: &[usize],
    trans: (bool, bool),
    reps: usize,
) -> Option<f64> {
    let t = GemmType::of(dtype)?;
    let geometry = crate::gemm::Geometry::of(a_shape, b_shape)?;
    let e = elem_bytes(dtype);
    let numel = |s: &[usize]| s.iter().product::<usize>();
    let out_numel = geometry.count * geometry.m * geometry.n;
    // Buffers of f32 (or wider) alignment, as the arena gives, holding small numbers in
    // every byte (0x3c: 0.0115 as f32 or bf16): zeroed memory would be read from the zero
    // page, which stays in cache, and time the GEMM faster than on real operands.
    let buf = |n: usize| vec![0x3c3c_3c3c_3c3c_3c3cu64; (n * e).div_ceil(8)];
    let (a, b, mut o) = (buf(numel(a_shape)), buf(numel(b_shape)), buf(out_numel));
    let bytes = |v: &Vec<u64>, n: usize| -> &[u8] {
        // SAFETY: a u64 buffer viewed as its bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), n * e) }
    };
    let (sa, sb) = (bytes(&a, numel(a_shape)), bytes(&b, numel(b_shape)));
    // SAFETY: as above, mutably, and `o` outlives the slice.
    let so = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr().cast::<u8>(), out_numel * e) };
    Some(min_secs(reps, || {
        matmul(t, sa, a_shape, sb, b_shape, so, trans)
    }))
}

/// Seconds for one attention part of `spec` (the runtime's tiled attention, with the pool's
/// threads): the fastest of `reps` runs on operands of small numbers.
pub fn time_attention(spec: &Spec, reps: usize) -> f64 {
    let e = elem_bytes(spec.dtype);
    let shapes = spec.shapes();
    let mut bufs: Vec<Vec<u8>> = shapes
        .iter()
        .map(|s| vec![0x3cu8; s.iter().product::<usize>() * e])
        .collect();
    let mut out = bufs.pop().expect("operands and a result");
    let ins: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
    min_secs(reps, || crate::attention::run(spec, &ins, &mut out))
}

/// Seconds per byte the pipelined executor spends on each output of a pass besides running
/// it: copying it out of the pass's arena and adding it into its f32 sum (an averaged
/// value; [`crate::pipeline`]), timed on `bytes` of f32 with one thread.
pub fn time_pass_output(bytes: usize, reps: usize) -> f64 {
    let src = vec![0x3cu8; bytes];
    let mut acc = vec![0f32; bytes / 4];
    let t = min_secs(reps, || {
        let out = src.to_vec();
        crate::pipeline::accumulate(&mut acc, Dtype::F32, &out);
        std::hint::black_box(&acc);
    });
    t / bytes.max(1) as f64
}

/// Seconds per byte of copying `bytes` (a pass's weights into its arena at each step).
pub fn time_copy(bytes: usize, reps: usize) -> f64 {
    let src = vec![0x3cu8; bytes];
    let mut dst = vec![0u8; bytes];
    let t = min_secs(reps, || {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    });
    t / bytes.max(1) as f64
}
