//! Times the CPU attention steps (`memc_runtime::attention`) at a training shape:
//! `cargo run --release -p memc-runtime --example attention_bench [B H HK S D ITERS]`.
//! Defaults: the 8-layer d512 Llama's attention at 4 × 256 (8 heads, 4 KV heads, head dim 64),
//! causal, f32. Prints milliseconds per call of each part and a checksum of its output.
use memc_runtime::attention::{run, Part, Spec};
use memc_runtime::program::Dtype;
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|x| x.parse().expect("a number"))
        .collect();
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (b, h, hk, s, d, iters) = (
        get(0, 4),
        get(1, 8),
        get(2, 4),
        get(3, 256),
        get(4, 64),
        get(5, 20),
    );
    let mut seed = 12345u64;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_le_bytes()
            })
            .collect()
    };
    let q = rnd(b * h * s * d);
    let k = rnd(b * hk * s * d);
    let v = rnd(b * hk * s * d);
    let mask = 0f32.to_le_bytes().to_vec();
    let dy = rnd(b * h * s * d);
    let delta = rnd(b * h * s);
    let spec = |part| Spec {
        part,
        dtype: Dtype::F32,
        q: [b, h, s, d],
        k: [b, hk, s, d],
        dv: d,
        mask: vec![1],
        scale: 1.0 / (d as f32).sqrt(),
        softcap: 0.0,
        causal: true,
        window: 0,
    };
    let mut lse = vec![0u8; b * h * s * 4];
    run(&spec(Part::Lse), &[&q, &k, &mask], &mut lse);
    let parts = [
        Part::Forward,
        Part::Lse,
        Part::GradQ,
        Part::GradK,
        Part::GradV,
    ];
    for part in parts {
        let sp = spec(part);
        let ins: Vec<&[u8]> = match part {
            Part::Forward => vec![&q, &k, &v, &mask],
            Part::Lse => vec![&q, &k, &mask],
            _ => vec![&q, &k, &v, &mask, &lse, &dy, &delta],
        };
        let shapes = sp.shapes();
        let out_n: usize = shapes.last().unwrap().iter().product();
        let mut out = vec![0u8; out_n * 4];
        run(&sp, &ins, &mut out);
        let t = Instant::now();
        for _ in 0..iters {
            run(&sp, &ins, &mut out);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
        let sum: f64 = out
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .sum();
        println!("{part:?}: {ms:.3} ms  (checksum {sum:.6e})");
    }
}
