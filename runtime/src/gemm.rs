//! Matrix products for the cpu backend, on the `gemm` crate's kernels (faer's; measured
//! 10–30% faster than `matrixmultiply` on the Llamas' shapes and 8% on the 8-layer step,
//! BENCHMARKS.md): NumPy `matmul` semantics (batched, broadcast batch dims, 1-D operands
//! promoted), f32 and f64, bf16 through f32 with the result rounded. A large product is split
//! across the runtime's own threads ([`crate::pool`]; no second thread pool competing for the
//! cores), by rows or by columns, whichever is larger.

use half::bf16;

/// Element types the GEMM accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmType {
    /// f32
    F32,
    /// f64
    F64,
    /// bf16 (computed in f32)
    BF16,
}

impl GemmType {
    /// The GEMM's type for a program's element type (`None`: not one it takes).
    pub fn of(t: crate::program::Dtype) -> Option<GemmType> {
        use crate::program::Dtype;
        match t {
            Dtype::F32 => Some(GemmType::F32),
            Dtype::F64 => Some(GemmType::F64),
            Dtype::Bf16 => Some(GemmType::BF16),
            _ => None,
        }
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The geometry of `a @ b` under NumPy `matmul` semantics (1-D operands promoted, batch dims
/// broadcast): shared by the cpu GEMMs, the cuda backend's cuBLAS calls and the program checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Rows of each product.
    pub m: usize,
    /// The contracted dim.
    pub k: usize,
    /// Columns of each product.
    pub n: usize,
    /// Products (the broadcast batch's size).
    pub count: usize,
    /// Matrices in `a` and in `b` (1 when an operand is broadcast over the whole batch).
    pub a_count: usize,
    /// See `a_count`.
    pub b_count: usize,
    batch: Vec<usize>,
    a_batch: Vec<usize>,
    b_batch: Vec<usize>,
    /// Operands stored transposed (see [`matmul`]).
    trans: (bool, bool),
}

impl Geometry {
    /// The geometry of `a @ b` for shapes `ash` and `bsh`, or `None` when they do not agree.
    pub fn of(ash: &[usize], bsh: &[usize]) -> Option<Geometry> {
        if ash.is_empty() || bsh.is_empty() {
            return None;
        }
        let a2 = if ash.len() == 1 {
            vec![1, ash[0]]
        } else {
            ash.to_vec()
        };
        let b2 = if bsh.len() == 1 {
            vec![bsh[0], 1]
        } else {
            bsh.to_vec()
        };
        let (m, k, k2, n) = (
            a2[a2.len() - 2],
            a2[a2.len() - 1],
            b2[b2.len() - 2],
            b2[b2.len() - 1],
        );
        if k != k2 {
            return None;
        }
        let (ab, bb) = (a2[..a2.len() - 2].to_vec(), b2[..b2.len() - 2].to_vec());
        let r = ab.len().max(bb.len());
        let dim = |s: &[usize], i: usize| {
            if i + s.len() >= r {
                s[i + s.len() - r]
            } else {
                1
            }
        };
        let mut batch = Vec::with_capacity(r);
        for i in 0..r {
            let (x, y) = (dim(&ab, i), dim(&bb, i));
            if x != y && x != 1 && y != 1 {
                return None;
            }
            batch.push(x.max(y));
        }
        Some(Geometry {
            m,
            k,
            n,
            count: batch.iter().product(),
            a_count: ab.iter().product(),
            b_count: bb.iter().product(),
            batch,
            a_batch: ab,
            b_batch: bb,
            trans: (false, false),
        })
    }

    /// For each product in order, the index of its `a` and `b` matrices.
    pub fn operands(&self) -> Vec<(usize, usize)> {
        let r = self.batch.len();
        let (sa, sb) = (strides(&self.a_batch), strides(&self.b_batch));
        let offset = |s: &[usize], st: &[usize], idx: &[usize]| -> usize {
            let lead = r - s.len();
            (0..s.len())
                .map(|d| if s[d] == 1 { 0 } else { idx[lead + d] * st[d] })
                .sum()
        };
        let mut idx = vec![0usize; r];
        let mut out = Vec::with_capacity(self.count);
        for _ in 0..self.count {
            out.push((
                offset(&self.a_batch, &sa, &idx),
                offset(&self.b_batch, &sb, &idx),
            ));
            for d in (0..r).rev() {
                idx[d] += 1;
                if idx[d] < self.batch[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
}

/// Whether `a @ b` is a valid matmul of shapes `ash` and `bsh` whose result has `out_numel`
/// elements: the runtime checks a program's GEMM steps with this before running them.
pub fn shapes_agree(ash: &[usize], bsh: &[usize], out_numel: u64) -> bool {
    Geometry::of(ash, bsh).is_some_and(|g| {
        (g.count as u64)
            .saturating_mul(g.m as u64)
            .saturating_mul(g.n as u64)
            == out_numel
    })
}

/// `out = a @ b` for row-major `a` (shape `ash`) and `b` (shape `bsh`), raw little-endian bytes.
/// The shapes must satisfy `memc_ir::Op::MatMul`'s typing rules (the verifier checks them).
///
/// `trans` says which operands are stored with their last two dims swapped (`a` as `[.., k, m]`,
/// `b` as `[.., n, k]`; the shapes given are the product's operands'): they are read through
/// strides, never copied.
pub fn matmul(
    t: GemmType,
    a: &[u8],
    ash: &[usize],
    b: &[u8],
    bsh: &[usize],
    out: &mut [u8],
    trans: (bool, bool),
) {
    let mut plan = Geometry::of(ash, bsh).expect("matmul shapes checked by the verifier");
    plan.trans = trans;
    match t {
        // f32 operands are used in place when aligned (arena buffers always are).
        GemmType::F32 => {
            let a = as_elems::<f32>(a).unwrap_or_else(|| to_f32(t, a).into());
            let b = as_elems::<f32>(b).unwrap_or_else(|| to_f32(t, b).into());
            // SAFETY: every bit pattern is a valid f32.
            match unsafe { out.align_to_mut::<f32>() } {
                (&mut [], o, &mut []) => plan.run(&a, &b, o),
                _ => {
                    let mut o = vec![0f32; out.len() / 4];
                    plan.run(&a, &b, &mut o);
                    from_f32(t, &o, out);
                }
            }
        }
        GemmType::BF16 => {
            let mut o = vec![0f32; out.len() / 2];
            plan.run(&to_f32(t, a), &to_f32(t, b), &mut o);
            from_f32(t, &o, out);
        }
        GemmType::F64 => {
            let f = |x: &[u8]| -> Vec<f64> {
                x.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect()
            };
            let mut o = vec![0f64; out.len() / 8];
            plan.run(&f(a), &f(b), &mut o);
            for (dst, v) in out.chunks_exact_mut(8).zip(o) {
                dst.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Products below this many multiply-adds are one call on one thread.
const PARALLEL_MIN: usize = 1 << 18;

/// Rows (or columns) per part of a large product, roughly (two parts at least, and at most
/// [`crate::pool::MAX_THREADS`]): the parts run across the pool's threads.
const PANEL: usize = 512;

/// `c = alpha·a·b + beta·c` for an m×k `a`, a k×n `b` and an m×n `c`, each given by its
/// (row, column) element strides; `beta = 0` does not read `c`. A large product is split
/// into parts of about [`PANEL`] rows (or columns, when there are more of them), each one
/// single-threaded `gemm` call, run across [`crate::pool`]'s threads; the parts depend on the
/// shape only, not on the thread count, so neither do the results.
///
/// # Safety
/// The pointers and strides must address valid, non-overlapping matrices (c writable).
#[allow(clippy::too_many_arguments)]
unsafe fn strided<T: Copy + PartialEq + Default + Send + Sync + 'static>(
    (m, k, n): (usize, usize, usize),
    alpha: T,
    (a, rsa, csa): (*const T, isize, isize),
    (b, rsb, csb): (*const T, isize, isize),
    beta: T,
    (c, rsc, csc): (*mut T, isize, isize),
) {
    let part = |m: usize, n: usize, a: *const T, b: *const T, c: *mut T| {
        // SAFETY: the caller's contract, for this block.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c,
                csc,
                rsc,
                beta != T::default(),
                a,
                csa,
                rsa,
                b,
                csb,
                rsb,
                beta,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    };
    if m.saturating_mul(n).saturating_mul(k) < PARALLEL_MIN {
        return part(m, n, a, b, c);
    }
    // Parts of about PANEL rows (or columns, when there are more of them), at least two and at
    // most MAX_THREADS, chosen from the shape alone: each element is computed by the same call
    // on one thread or many. (The `gemm` crate picks its blocking and kernels from a call's
    // shape, so a split that followed the thread count would round differently.)
    let by_rows = m >= n;
    let total = if by_rows { m } else { n };
    if total < 2 * 16 {
        return part(m, n, a, b, c);
    }
    let parts = (total / PANEL).clamp(2, crate::pool::MAX_THREADS);
    let size = total.div_ceil(parts).div_ceil(16) * 16;
    let (a, b, c) = (a as usize, b as usize, c as usize);
    crate::pool::parallel_for(total.div_ceil(size), &|t| {
        let (lo, len) = (t * size, size.min(total - t * size));
        let (a, b, c) = (a as *const T, b as *const T, c as *mut T);
        let lo = lo as isize;
        // SAFETY: the blocks are disjoint rows (or columns) of `c` and lie inside the
        // matrices the caller vouched for.
        unsafe {
            if by_rows {
                part(len, n, a.offset(lo * rsa), b, c.offset(lo * rsc))
            } else {
                part(m, len, a, b.offset(lo * csb), c.offset(lo * csc))
            }
        }
    });
}

/// `bytes` as a slice of `T` when it is aligned for `T` (little-endian host).
fn as_elems<T>(bytes: &[u8]) -> Option<std::borrow::Cow<'_, [T]>>
where
    [T]: ToOwned,
{
    // SAFETY: used for f32 only, for which every bit pattern is valid.
    match unsafe { bytes.align_to::<T>() } {
        (&[], x, &[]) => Some(std::borrow::Cow::Borrowed(x)),
        _ => None,
    }
}

impl Geometry {
    /// One GEMM per batch element (broadcast batch dims read the same operand).
    fn run<T>(&self, a: &[T], b: &[T], out: &mut [T])
    where
        T: Copy + PartialEq + Default + Send + Sync + 'static + From<u8>,
    {
        let (m, k, n) = (self.m, self.k, self.n);
        assert_eq!(out.len(), self.count * m * n);
        if self.count > 1 && self.b_count == 1 && self.a_count == self.count && !self.trans.0 {
            // A batch against one matrix (activations times a weight): the batch's rows are
            // contiguous, so this is one GEMM of count·m rows, the weight packed once.
            let single = Geometry {
                m: self.count * m,
                count: 1,
                a_count: 1,
                b_count: 1,
                batch: vec![],
                a_batch: vec![],
                b_batch: vec![],
                ..*self
            };
            return single.run(a, b, out);
        }
        for (bi, (ia, ib)) in self.operands().into_iter().enumerate() {
            let (oa, ob) = (ia * m * k, ib * k * n);
            // Row and column strides: row-major, or the transposed storage.
            let (rsa, csa) = if self.trans.0 { (1, m) } else { (k, 1) };
            let (rsb, csb) = if self.trans.1 { (1, k) } else { (n, 1) };
            // SAFETY: `a`, `b` and `out` hold m·k, k·n and m·n elements at these offsets (shapes
            // checked by the IR verifier), in either layout.
            unsafe {
                strided(
                    (m, k, n),
                    T::from(1),
                    (a.as_ptr().add(oa), rsa as isize, csa as isize),
                    (b.as_ptr().add(ob), rsb as isize, csb as isize),
                    T::default(),
                    (out.as_mut_ptr().add(bi * m * n), n as isize, 1),
                );
            }
        }
    }
}

fn to_f32(t: GemmType, x: &[u8]) -> Vec<f32> {
    match t {
        GemmType::BF16 => x
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => x
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    }
}

fn from_f32(t: GemmType, v: &[f32], out: &mut [u8]) {
    match t {
        GemmType::BF16 => {
            for (o, x) in out.chunks_exact_mut(2).zip(v) {
                o.copy_from_slice(&bf16::from_f32(*x).to_le_bytes());
            }
        }
        _ => {
            for (o, x) in out.chunks_exact_mut(4).zip(v) {
                o.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Threads at most.
pub use crate::pool::MAX_THREADS;

/// Runs the GEMMs and the runtime's parallel steps ([`crate::pool`]) on `n` threads (1 to
/// [`MAX_THREADS`]); the default is every core, up to [`MAX_THREADS`]. Takes effect only
/// before the first GEMM or parallel step of the process, so the drivers call it first thing.
pub fn set_threads(n: usize) -> Result<(), String> {
    crate::pool::set_threads(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn batched_broadcast_and_vectors() {
        // [2,1,2,2] x [3,2,1] -> [2,3,2,1]
        let a = bytes(&[1., 0., 0., 1., 2., 0., 0., 2.]);
        let b = bytes(&[1., 2., 3., 4., 5., 6.]);
        let mut out = vec![0u8; 12 * 4];
        matmul(
            GemmType::F32,
            &a,
            &[2, 1, 2, 2],
            &b,
            &[3, 2, 1],
            &mut out,
            (false, false),
        );
        assert_eq!(
            floats(&out),
            vec![1., 2., 3., 4., 5., 6., 2., 4., 6., 8., 10., 12.]
        );
        // [3] x [3,2] -> [2]
        let v = bytes(&[1., 2., 3.]);
        let m = bytes(&[1., 0., 0., 1., 1., 1.]);
        let mut out = vec![0u8; 8];
        matmul(
            GemmType::F32,
            &v,
            &[3],
            &m,
            &[3, 2],
            &mut out,
            (false, false),
        );
        assert_eq!(floats(&out), vec![4., 5.]);
    }

    #[test]
    fn transposed_operands_are_read_through_strides() {
        // a [2, 3, 2] (batched), b [2, 4]; stored transposed: a as [2, 2, 3], b as [4, 2].
        let a: Vec<f32> = (0..12).map(|x| x as f32 - 5.0).collect();
        let b: Vec<f32> = (0..8).map(|x| (x * x) as f32 * 0.5).collect();
        let t = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
            x.chunks(rows * cols)
                .flat_map(|m| (0..cols).flat_map(move |c| (0..rows).map(move |r| m[r * cols + c])))
                .collect()
        };
        let mut want = vec![0u8; 2 * 3 * 4 * 4];
        matmul(
            GemmType::F32,
            &bytes(&a),
            &[2, 3, 2],
            &bytes(&b),
            &[2, 4],
            &mut want,
            (false, false),
        );
        for (ta, tb) in [(true, false), (false, true), (true, true)] {
            let sa = if ta { t(&a, 3, 2) } else { a.clone() };
            let sb = if tb { t(&b, 2, 4) } else { b.clone() };
            let mut got = vec![0u8; want.len()];
            matmul(
                GemmType::F32,
                &bytes(&sa),
                &[2, 3, 2],
                &bytes(&sb),
                &[2, 4],
                &mut got,
                (ta, tb),
            );
            assert_eq!(floats(&got), floats(&want), "{ta} {tb}");
        }
    }

    /// Products large enough to be split into parts across the pool's threads (by rows when
    /// m ≥ n, by columns otherwise; operands plain or transposed, sizes not a multiple of the
    /// 16-row panels, a depth the `gemm` crate cuts into uneven chunks) match a naive f64
    /// product, and are bit for bit the same run to run (the parts depend on the shape only).
    #[test]
    fn split_products_match_a_naive_product() {
        let mut seed = 7u64;
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect()
        };
        for (m, k, n) in [(301, 67, 45), (37, 90, 403), (64, 688, 1100)] {
            let (a, b) = (rnd(m * k), rnd(k * n));
            for (ta, tb) in [(false, false), (true, true), (false, true), (true, false)] {
                // Stored as the transpose when asked: a as [k, m], b as [n, k].
                let at: Vec<f32> = (0..k * m).map(|e| a[(e % m) * k + e / m]).collect();
                let bt: Vec<f32> = (0..n * k).map(|e| b[(e % k) * n + e / k]).collect();
                let (sa, sb) = (if ta { &at } else { &a }, if tb { &bt } else { &b });
                let product = || {
                    let mut out = vec![0u8; m * n * 4];
                    let (a, b) = (bytes(sa), bytes(sb));
                    matmul(GemmType::F32, &a, &[m, k], &b, &[k, n], &mut out, (ta, tb));
                    out
                };
                let out = product();
                assert!(
                    out == product(),
                    "{m}x{k}x{n} {ta} {tb}: differs run to run"
                );
                let got = floats(&out);
                for r in 0..m {
                    for c in 0..n {
                        let want: f64 = (0..k)
                            .map(|p| a[r * k + p] as f64 * b[p * n + c] as f64)
                            .sum();
                        let x = got[r * n + c] as f64;
                        assert!(
                            (x - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "[{r},{c}] {x} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
