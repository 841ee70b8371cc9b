//! Timing of the steps the runtime runs itself, one at a time, for `memc plan`'s cost model:
//! a GEMM of given shapes and an attention part of a given [`Spec`] on buffers of small numbers, and
//! the training-like state every step of a compiled program is timed on
//! ([`training_state`], [`crate::cpu::Cpu::time_run`]). The cost model
//! (the compiler's `cost` module) composes these into a predicted step time; it never times a
//! whole candidate configuration.

use crate::attention::Spec;
use crate::gemm::{matmul, GemmType};
use crate::program::{encode, Dtype, Program, Role, Slot};
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

/// The slowest of `threads` threads each running `f` at once (started together): what one
/// rank's work takes while the other ranks on the machine run theirs.
pub fn time_together(threads: usize, f: &(dyn Fn() -> f64 + Sync)) -> f64 {
    let start = std::sync::Barrier::new(threads.max(1));
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.max(1))
            .map(|_| {
                scope.spawn(|| {
                    start.wait();
                    f()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    })
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

/// Values like a training step's for every parameter and input of `program`, to time its
/// steps on (`memc plan`'s calibration): weights small and varied (uniform in ±0.05, as
/// initialisations give), optimizer state zero (as at the first step), token ids and labels
/// spread over the vocabulary, the learning rate 1e-4, the step 1, a microbatch's scale
/// `1/K` with the optimizer applied, every other input 1. Constant or stale values would
/// time some kernels on what training never meets (NaNs from a zero step count slow the
/// exponentials several times; equal weights give equal logits).
pub fn training_state(program: &Program) -> Vec<(Slot, Vec<u8>)> {
    // A fixed pseudo-random sequence (xorshift), so calibrations are repeatable.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let numel = |s: &Slot| s.shape.iter().product::<usize>();
    let mut out = vec![];
    for p in &program.params {
        let values: Vec<f64> = match p.role {
            Role::Weight => (0..numel(&p.slot)).map(|_| 0.1 * next() - 0.05).collect(),
            Role::OptimizerState => vec![0.0; numel(&p.slot)],
        };
        out.push((p.slot.clone(), encode(p.slot.dtype, &values)));
    }
    let t = program.training.as_ref();
    let is = |name: &str, field: Option<&String>| field.is_some_and(|f| f == name);
    for s in &program.inputs {
        let n = numel(s);
        let bound = program
            .index_bounds
            .iter()
            .find(|b| b.input == s.name)
            .map(|b| b.bound)
            .or_else(|| {
                t.filter(|t| s.name == t.data_input || is(&s.name, t.labels_input.as_ref()))
                    .and_then(|t| t.vocab)
            });
        let values: Vec<f64> = if let Some(bound) = bound {
            (0..n).map(|_| (next() * bound as f64).floor()).collect()
        } else if t.is_some_and(|t| is(&s.name, t.lr_input.as_ref())) {
            vec![1e-4; n]
        } else if t.is_some_and(|t| is(&s.name, t.weight_decay_input.as_ref())) {
            vec![0.01; n]
        } else if let Some(a) = t
            .and_then(|t| t.accum.as_ref())
            .filter(|a| a.scale_input == s.name)
        {
            vec![1.0 / a.microbatches.max(1) as f64; n]
        } else {
            vec![1.0; n]
        };
        out.push((s.clone(), encode(s.dtype, &values)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::{decode, IndexBound, Param, Training};

    #[test]
    fn calibration_runs_on_a_training_like_state() {
        let mut p = crate::program::tests::sample();
        let slot = |name: &str, dtype, shape: Vec<usize>| Slot {
            name: name.into(),
            dtype,
            shape,
            offset: 0,
        };
        p.inputs = vec![
            slot("ids", Dtype::I64, vec![4, 8]),
            slot("memc.lr", Dtype::F32, vec![]),
            slot("memc.step", Dtype::F32, vec![]),
        ];
        p.index_bounds = vec![IndexBound {
            input: "ids".into(),
            bound: 50,
            table: "the rows of emb".into(),
        }];
        p.params.push(Param {
            slot: slot("adam.m", Dtype::F32, vec![16]),
            role: Role::OptimizerState,
            updated: true,
        });
        p.training = Some(Training {
            data_input: "ids".into(),
            loss_output: "y".into(),
            vocab: Some(50),
            lr_input: Some("memc.lr".into()),
            weight_decay_input: None,
            step_input: Some("memc.step".into()),
            optimizer: "adamw".into(),
            default_weight_decay: 0.0,
            drift_outputs: vec![],
            drift_threshold: None,
            labels_input: None,
            accum: None,
        });
        let state = training_state(&p);
        let of = |name: &str| {
            let (s, b) = state.iter().find(|(s, _)| s.name == name).unwrap();
            assert_eq!(b.len() as u64, s.bytes(), "{name}");
            decode(s.dtype, b)
        };
        let w = of("w");
        assert!(w.iter().all(|x| x.abs() <= 0.05), "{w:?}");
        assert!(w.iter().any(|&x| x != w[0]), "weights vary");
        assert!(of("adam.m").iter().all(|&x| x == 0.0));
        let ids = of("ids");
        assert!(ids
            .iter()
            .all(|&x| (0.0..50.0).contains(&x) && x.fract() == 0.0));
        assert!(ids.iter().any(|&x| x != ids[0]), "ids vary");
        assert_eq!(of("memc.lr"), [1e-4f32 as f64]);
        assert_eq!(
            of("memc.step"),
            [1.0],
            "a first step: no NaN from bias correction"
        );
        // The same state every time: calibrations are repeatable.
        assert_eq!(training_state(&p), state);
    }
}
