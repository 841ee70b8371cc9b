//! Tiled attention on the CPU: `attention`, `attention_lse` and each `attention_grad` as
//! blocks of queries against blocks of keys, the inner products as small GEMMs
//! (`matrixmultiply`, one thread each: on these 64 × 64 blocks with transposed operands it
//! measured 2–3× faster than the `gemm` crate the large products use), the softmax online (a running max and sum per query row), so nothing of
//! size S×T is ever stored. The cpu backend runs these instead of the generated row-wise
//! kernels, which remain the GPU mapping's source ([`crate::program::Native`]).
//!
//! The semantics are the reference interpreter's (`memc_ir`'s `attention` family): the score
//! of query row i and key j is `q_i·k_j·scale`, soft-capped (`c·tanh(s/c)`) when `softcap > 0`,
//! plus the mask (broadcast to [B, H, S, T]), and −∞ where the causal or window attributes hide
//! key j (the query sits at position `i + T − S` among the keys); a row with every score −∞
//! gives zeros. Query head h reads key/value head `h / (H / Hk)`.
//!
//! Work is split into independent tasks, each writing its own rows of the output: a block of
//! query rows of one head (forward, log-sum-exp, dq) or a block of keys of one key/value head
//! (dk, dv, summed over the head's query heads in a fixed order). Tasks run on
//! [`crate::pool`], so results do not depend on the number of threads. bf16 operands are
//! computed in f32, f64 ones in f64.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use crate::program::Dtype;

/// Query rows per block.
const BR: usize = 64;
/// Keys per block.
const BC: usize = 64;

/// Which attention op a step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// `attention`: q, k, v, mask → y [B, H, S, Dv].
    Forward,
    /// `attention_lse`: q, k, mask → the rows' log-sum-exp [B, H, S].
    Lse,
    /// `attention_grad` with respect to q: q, k, v, mask, lse, dy, delta → dq.
    GradQ,
    /// ... with respect to k → dk.
    GradK,
    /// ... with respect to v → dv.
    GradV,
}

/// One attention step: the op, the element type, the shapes and the score attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// The op.
    pub part: Part,
    /// Element type of every operand (f32, f64 or bf16).
    pub dtype: Dtype,
    /// q's shape [B, H, S, D].
    pub q: [usize; 4],
    /// k's shape [B, Hk, T, D].
    pub k: [usize; 4],
    /// v's last dim.
    pub dv: usize,
    /// The mask's shape (broadcast to [B, H, S, T]).
    pub mask: Vec<usize>,
    /// Factor on `q·k`.
    pub scale: f32,
    /// Soft-cap `c` (0: none).
    pub softcap: f32,
    /// Keys after the query's position are hidden.
    pub causal: bool,
    /// Only the last `window` keys up to the query's position are seen (0: all).
    pub window: usize,
}

impl Spec {
    /// The operands' shapes in step order, the output last.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        let [b, h, s, _] = self.q;
        let [_, hk, t, _] = self.k;
        let q = self.q.to_vec();
        let k = self.k.to_vec();
        let v = vec![b, hk, t, self.dv];
        let rows = vec![b, h, s];
        let y = vec![b, h, s, self.dv];
        let m = self.mask.clone();
        match self.part {
            Part::Forward => vec![q, k, v, m, y],
            Part::Lse => vec![q, k, m, rows],
            Part::GradQ | Part::GradK | Part::GradV => {
                let out = match self.part {
                    Part::GradQ => q.clone(),
                    Part::GradK => k.clone(),
                    _ => v.clone(),
                };
                vec![q, k, v, m, rows.clone(), y, rows, out]
            }
        }
    }

    /// Checks the shapes are an attention's and the buffers' sizes match them.
    pub fn check(&self, bytes: &[u64]) -> Result<(), String> {
        let [b, h, s, d] = self.q;
        let [kb, hk, t, kd] = self.k;
        if !matches!(self.dtype, Dtype::F32 | Dtype::F64 | Dtype::Bf16)
            || kb != b
            || kd != d
            || hk == 0
            || h % hk != 0
            || [b, h, s, d, t, self.dv].contains(&0)
            || self.mask.len() > 4
        {
            return Err("inconsistent attention shapes".into());
        }
        let full = [b, h, s, t];
        let lead = 4 - self.mask.len();
        if self
            .mask
            .iter()
            .enumerate()
            .any(|(i, &m)| m != 1 && m != full[lead + i])
        {
            return Err("the attention mask does not broadcast".into());
        }
        let shapes = self.shapes();
        if shapes.len() != bytes.len() {
            return Err(format!(
                "attention takes {} buffers, got {}",
                shapes.len(),
                bytes.len()
            ));
        }
        for (sh, &n) in shapes.iter().zip(bytes) {
            let want = sh
                .iter()
                .try_fold(self.dtype.size() as u64, |a, &x| a.checked_mul(x as u64));
            if want != Some(n) {
                return Err("an attention buffer has the wrong size".into());
            }
        }
        Ok(())
    }
}

/// The compute type: f32 (for f32 and bf16 operands) or f64.
trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn of(x: f32) -> Self;
    /// `exp`: as vectorisable arithmetic for f32 ([`crate::vmath::exp_f32`]), libm for f64.
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    /// Reads element `i` of `src` (element type `dt`).
    fn read(src: &[u8], dt: Dtype, i: usize) -> Self;
    /// Writes `x` as element `i` of `dst`.
    fn write(dst: &mut [u8], dt: Dtype, i: usize, x: Self);
    /// Elements `start..start + dst.len()` of `src` into `dst` (`add`: added to it).
    fn read_row(src: &[u8], dt: Dtype, start: usize, dst: &mut [Self], add: bool);
    /// `src` as elements `start..start + src.len()` of `dst`.
    fn write_row(dst: &mut [u8], dt: Dtype, start: usize, src: &[Self]);
    /// `c = a·b + beta·c` for `a` and `b` strided (row stride, column stride:
    /// matrixmultiply's convention) and `c` row-major [m × n].
    ///
    /// # Safety
    /// The pointers and strides must address valid m×k, k×n and m×n matrices.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        sa: (isize, isize),
        b: *const Self,
        sb: (isize, isize),
        beta: Self,
        c: *mut Self,
    );
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INF: f32 = f32::NEG_INFINITY;
    fn of(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn exp(self) -> f32 {
        crate::vmath::exp_f32(self)
    }
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    fn tanh(self) -> f32 {
        f32::tanh(self)
    }
    fn read(src: &[u8], dt: Dtype, i: usize) -> f32 {
        match dt {
            Dtype::Bf16 => {
                half::bf16::from_le_bytes(src[2 * i..2 * i + 2].try_into().unwrap()).to_f32()
            }
            _ => f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().unwrap()),
        }
    }
    fn write(dst: &mut [u8], dt: Dtype, i: usize, x: f32) {
        match dt {
            Dtype::Bf16 => {
                dst[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f32(x).to_le_bytes())
            }
            _ => dst[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes()),
        }
    }
    #[inline(always)]
    fn read_row(src: &[u8], dt: Dtype, start: usize, dst: &mut [f32], add: bool) {
        let n = dst.len();
        match dt {
            Dtype::Bf16 => {
                let src = &src[2 * start..2 * (start + n)];
                for (x, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    let y = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                    *x = if add { *x + y } else { y };
                }
            }
            _ => {
                let src = &src[4 * start..4 * (start + n)];
                for (x, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    let y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    *x = if add { *x + y } else { y };
                }
            }
        }
    }
    #[inline(always)]
    fn write_row(dst: &mut [u8], dt: Dtype, start: usize, src: &[f32]) {
        let n = src.len();
        match dt {
            Dtype::Bf16 => {
                let dst = &mut dst[2 * start..2 * (start + n)];
                for (c, &x) in dst.chunks_exact_mut(2).zip(src) {
                    c.copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
                }
            }
            _ => {
                let dst = &mut dst[4 * start..4 * (start + n)];
                for (c, &x) in dst.chunks_exact_mut(4).zip(src) {
                    c.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f32,
        (rsa, csa): (isize, isize),
        b: *const f32,
        (rsb, csb): (isize, isize),
        beta: f32,
        c: *mut f32,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            matrixmultiply::sgemm(
                m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, n as isize, 1,
            )
        }
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INF: f64 = f64::NEG_INFINITY;
    fn of(x: f32) -> f64 {
        x as f64
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
    fn read(src: &[u8], _: Dtype, i: usize) -> f64 {
        f64::from_le_bytes(src[8 * i..8 * i + 8].try_into().unwrap())
    }
    fn write(dst: &mut [u8], _: Dtype, i: usize, x: f64) {
        dst[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes())
    }
    fn read_row(src: &[u8], _: Dtype, start: usize, dst: &mut [f64], add: bool) {
        let src = &src[8 * start..8 * (start + dst.len())];
        for (x, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
            let y = f64::from_le_bytes(c.try_into().unwrap());
            *x = if add { *x + y } else { y };
        }
    }
    fn write_row(dst: &mut [u8], _: Dtype, start: usize, src: &[f64]) {
        let dst = &mut dst[8 * start..8 * (start + src.len())];
        for (c, &x) in dst.chunks_exact_mut(8).zip(src) {
            c.copy_from_slice(&x.to_le_bytes());
        }
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const f64,
        (rsa, csa): (isize, isize),
        b: *const f64,
        (rsb, csb): (isize, isize),
        beta: f64,
        c: *mut f64,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            matrixmultiply::dgemm(
                m, k, n, 1.0, a, rsa, csa, b, rsb, csb, beta, c, n as isize, 1,
            )
        }
    }
}

/// `c = a·b + beta·c` for row-major `c` [m × n]: `a` is row-major [m × k], or [k × m] holding
/// its transpose when `a_t`; `b` is [k × n], or [n × k] when `b_t` (the convention of
/// [`crate::gemm::matmul`]'s `trans`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn product<T: Real>(
    m: usize,
    k: usize,
    n: usize,
    (a, a_t): (&[T], bool),
    (b, b_t): (&[T], bool),
    beta: T,
    c: &mut [T],
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n);
    let sa = if a_t {
        (1, m as isize)
    } else {
        (k as isize, 1)
    };
    let sb = if b_t {
        (1, k as isize)
    } else {
        (n as isize, 1)
    };
    // SAFETY: the slices hold the matrices (asserted above) in the layouts the strides say.
    unsafe {
        T::gemm(
            m,
            k,
            n,
            a.as_ptr(),
            sa,
            b.as_ptr(),
            sb,
            beta,
            c.as_mut_ptr(),
        )
    }
}

/// A pointer to the output that tasks write disjoint rows of.
struct Out(*mut u8, usize);
// SAFETY: tasks write disjoint element ranges (each its own rows).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Runs `spec` on its operands `ins` (in [`Spec::shapes`] order, without the output),
/// writing `out`. The caller has checked the sizes ([`Spec::check`]).
pub fn run(spec: &Spec, ins: &[&[u8]], out: &mut [u8]) {
    match spec.dtype {
        Dtype::F64 => run_typed::<f64>(spec, ins, out),
        _ => run_typed::<f32>(spec, ins, out),
    }
}

/// The geometry shared by every task.
struct Geo<'a> {
    spec: &'a Spec,
    h: usize,
    s: usize,
    d: usize,
    hk: usize,
    t: usize,
    dv: usize,
    /// The mask's element strides over [B, H, S, T] (0 where broadcast).
    mstride: [usize; 4],
}

impl Geo<'_> {
    /// Whether every key of `j0..j1` is hidden from every query of `i0..i1`.
    fn block_hidden(&self, i0: usize, i1: usize, j0: usize, j1: usize) -> bool {
        let sp = self.spec;
        (sp.causal && j0 + self.s > (i1 - 1) + self.t)
            || (sp.window > 0 && i0 + self.t >= (j1 - 1) + self.s + sp.window)
    }

    /// Scores of query rows `i0..i0+br` of head (bq, hq) against keys `j0..j0+bc` in place of
    /// the raw products `sc` (row-major br × bc); returns the soft-cap derivatives in `dcap`
    /// when there is a soft-cap.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn scores<T: Real>(
        &self,
        mask: &[u8],
        bq: usize,
        hq: usize,
        i0: usize,
        br: usize,
        j0: usize,
        bc: usize,
        sc: &mut [T],
        dcap: &mut [T],
    ) {
        let sp = self.spec;
        let scale = T::of(sp.scale);
        let cap = T::of(sp.softcap);
        let [mb, mh, mi, mj] = self.mstride;
        for r in 0..br {
            let i = i0 + r;
            let row = &mut sc[r * bc..(r + 1) * bc];
            if sp.softcap > 0.0 {
                for (x, dc) in row.iter_mut().zip(&mut dcap[r * bc..(r + 1) * bc]) {
                    let th = (*x * scale / cap).tanh();
                    *x = cap * th;
                    *dc = T::ONE - th * th;
                }
            } else {
                row.iter_mut().for_each(|x| *x = *x * scale);
            }
            let mrow = bq * mb + hq * mh + i * mi;
            match mj {
                0 => {
                    let m = T::read(mask, sp.dtype, mrow);
                    row.iter_mut().for_each(|x| *x = *x + m);
                }
                1 => T::read_row(mask, sp.dtype, mrow + j0, row, true),
                _ => {
                    for (c, x) in row.iter_mut().enumerate() {
                        *x = *x + T::read(mask, sp.dtype, mrow + (j0 + c) * mj);
                    }
                }
            }
            // Key j is hidden from query i when it lies after the query's position
            // (j + S > i + T, causal) or `window` or more before it (i + T ≥ j + S + window):
            // the visible keys are `first..end`, as columns of this block `c0..c1`.
            let q1 = i + self.t + 1;
            let end = if sp.causal {
                q1.saturating_sub(self.s)
            } else {
                usize::MAX
            };
            let first = if sp.window > 0 {
                q1.saturating_sub(self.s + sp.window)
            } else {
                0
            };
            let c0 = first.saturating_sub(j0).min(bc);
            let c1 = end.saturating_sub(j0).min(bc).max(c0);
            row[..c0].fill(T::NEG_INF);
            row[c1..].fill(T::NEG_INF);
        }
    }

    /// Rows `base..base+n` (each `w` wide) of the [.., rows, w] operand `src`, into `dst`.
    #[inline(always)]
    fn load<T: Real>(&self, src: &[u8], base: usize, n: usize, w: usize, dst: &mut [T]) {
        T::read_row(src, self.spec.dtype, base * w, &mut dst[..n * w], false);
    }
}

/// Lanes of the row reductions below: a fixed count, so sums do not depend on the vector width
/// the code was compiled for ([`crate::vmath::simd`]).
const LANES: usize = 16;

/// The largest element of `row` (−∞ for an empty row; NaNs are passed over).
#[inline(always)]
fn row_max<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::NEG_INF; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut mx = T::NEG_INF;
    for &x in chunks.remainder().iter().chain(&lanes) {
        if x > mx {
            mx = x;
        }
    }
    mx
}

/// `row[c] = exp(row[c] − shift)`; returns the sum of the new row.
#[inline(always)]
fn exp_shifted_sum<T: Real>(row: &mut [T], shift: T) -> T {
    let mut lanes = [T::ZERO; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, x) in lanes.iter_mut().zip(c) {
            *x = (*x - shift).exp();
            *s = *s + *x;
        }
    }
    let mut sum = T::ZERO;
    for x in chunks.into_remainder() {
        *x = (*x - shift).exp();
        sum = sum + *x;
    }
    lanes.iter().fold(sum, |a, &s| a + s)
}

/// `row[c] = exp(row[c] − lse)`, the probabilities from scores and their row's log-sum-exp
/// (zeros for a row whose lse is −∞: every key hidden). The exponent is clamped at 0 (a NaN
/// kept): `lse` was rounded when stored, so `s − lse` can come out above 0, and with large
/// scores `p` would overflow where it is at most 1.
#[inline(always)]
fn probabilities<T: Real>(row: &mut [T], lse: T) {
    if lse == T::NEG_INF {
        row.fill(T::ZERO);
    } else {
        row.iter_mut().for_each(|x| {
            let e = *x - lse;
            *x = if e > T::ZERO { T::ZERO } else { e }.exp()
        });
    }
}

fn run_typed<T: Real>(spec: &Spec, ins: &[&[u8]], out: &mut [u8]) {
    let [b, h, s, d] = spec.q;
    let [_, hk, t, _] = spec.k;
    let lead = 4 - spec.mask.len();
    let mut mstride = [0usize; 4];
    let mut acc = 1;
    for k in (0..spec.mask.len()).rev() {
        if spec.mask[k] != 1 {
            mstride[lead + k] = acc;
        }
        acc *= spec.mask[k];
    }
    let geo = Geo {
        spec,
        h,
        s,
        d,
        hk,
        t,
        dv: spec.dv,
        mstride,
    };
    let size = spec.dtype.size();
    let o = Out(out.as_mut_ptr(), out.len());
    let o = &o;
    // Task `n` writes elements `start .. start + len` of the output, and nothing else.
    let part = |start: usize, len: usize| -> &mut [u8] {
        assert!((start + len) * size <= o.1);
        // SAFETY: in bounds (asserted); tasks' ranges are disjoint, and `out` is borrowed
        // mutably for the whole call.
        unsafe { std::slice::from_raw_parts_mut(o.0.add(start * size), len * size) }
    };
    let qblocks = s.div_ceil(BR);
    let kblocks = t.div_ceil(BC);
    match spec.part {
        Part::Forward | Part::Lse | Part::GradQ => {
            let w = match spec.part {
                Part::Forward => spec.dv,
                Part::Lse => 1,
                _ => d,
            };
            crate::pool::parallel_for(b * h * qblocks, &|task| {
                let (bh, qb) = (task / qblocks, task % qblocks);
                let i0 = qb * BR;
                let row0 = bh * s + i0;
                let out = part(row0 * w, BR.min(s - i0) * w);
                crate::vmath::simd(Task::<T> {
                    geo: &geo,
                    ins,
                    b: bh / h,
                    head: bh % h,
                    first: i0,
                    out,
                    query: true,
                    real: PhantomData,
                })
            })
        }
        Part::GradK | Part::GradV => {
            let w = if spec.part == Part::GradK { d } else { spec.dv };
            crate::pool::parallel_for(b * hk * kblocks, &|task| {
                let (bk, kb) = (task / kblocks, task % kblocks);
                let j0 = kb * BC;
                let out = part((bk * t + j0) * w, BC.min(t - j0) * w);
                crate::vmath::simd(Task::<T> {
                    geo: &geo,
                    ins,
                    b: bk / hk,
                    head: bk % hk,
                    first: j0,
                    out,
                    query: false,
                    real: PhantomData,
                })
            })
        }
    }
}

/// One task: a block of query rows ([`query_block`]) or of keys ([`key_block`]), run through
/// [`crate::vmath::simd`].
struct Task<'a, T> {
    geo: &'a Geo<'a>,
    ins: &'a [&'a [u8]],
    b: usize,
    head: usize,
    first: usize,
    out: &'a mut [u8],
    query: bool,
    real: PhantomData<T>,
}

impl<T: Real> crate::vmath::Vectorised for Task<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let Task {
            geo,
            ins,
            b,
            head,
            first,
            out,
            query,
            ..
        } = self;
        if query {
            query_block::<T>(geo, ins, b, head, first, out)
        } else {
            key_block::<T>(geo, ins, b, head, first, out)
        }
    }
}

/// Forward, log-sum-exp or dq for query rows `i0..` of head (bq, hq): `out` holds exactly
/// those rows.
#[inline(always)]
fn query_block<T: Real>(g: &Geo, ins: &[&[u8]], bq: usize, hq: usize, i0: usize, out: &mut [u8]) {
    let sp = g.spec;
    let br = BR.min(g.s - i0);
    let kh = hq / (g.h / g.hk);
    let row0 = (bq * g.h + hq) * g.s + i0; // first row among [B·H·S]
    let (q, k) = (ins[0], ins[1]);
    let (mask, v) = match sp.part {
        Part::Lse => (ins[2], None),
        _ => (ins[3], Some(ins[2])),
    };
    let krow0 = (bq * g.hk + kh) * g.t;
    let mut qt = vec![T::ZERO; br * g.d];
    g.load(q, row0, br, g.d, &mut qt);
    let mut kt = vec![T::ZERO; BC * g.d];
    let mut vt = vec![T::ZERO; BC * g.dv];
    let mut sc = vec![T::ZERO; br * BC];
    let mut dcap = vec![T::ONE; br * BC];
    match sp.part {
        Part::Forward | Part::Lse => {
            let mut m = vec![T::NEG_INF; br];
            let mut l = vec![T::ZERO; br];
            let mut acc = vec![T::ZERO; br * g.dv];
            for j0 in (0..g.t).step_by(BC) {
                let bc = BC.min(g.t - j0);
                if g.block_hidden(i0, i0 + br, j0, j0 + bc) {
                    continue;
                }
                g.load(k, krow0 + j0, bc, g.d, &mut kt);
                product(br, g.d, bc, (&qt, false), (&kt, true), T::ZERO, &mut sc);
                g.scores(mask, bq, hq, i0, br, j0, bc, &mut sc, &mut dcap);
                for r in 0..br {
                    let row = &mut sc[r * bc..(r + 1) * bc];
                    let mx = row_max(row);
                    let mx = if mx > m[r] { mx } else { m[r] };
                    if mx == T::NEG_INF {
                        // Every score so far is −∞: the row stays empty.
                        row.fill(T::ZERO);
                        continue;
                    }
                    let corr = (m[r] - mx).exp();
                    l[r] = l[r] * corr + exp_shifted_sum(row, mx);
                    m[r] = mx;
                    if corr != T::ONE {
                        acc[r * g.dv..(r + 1) * g.dv]
                            .iter_mut()
                            .for_each(|a| *a = *a * corr);
                    }
                }
                if sp.part == Part::Forward {
                    g.load(v.unwrap(), krow0 + j0, bc, g.dv, &mut vt);
                    product(br, bc, g.dv, (&sc, false), (&vt, false), T::ONE, &mut acc);
                }
            }
            if sp.part == Part::Lse {
                for r in 0..br {
                    let lse = if m[r] == T::NEG_INF {
                        T::NEG_INF
                    } else {
                        m[r] + l[r].ln()
                    };
                    T::write(out, sp.dtype, r, lse);
                }
            } else {
                for r in 0..br {
                    // A row of −∞ scores has no distribution: zeros.
                    let inv = if m[r] == T::NEG_INF {
                        T::ZERO
                    } else {
                        T::ONE / l[r]
                    };
                    let row = &mut acc[r * g.dv..(r + 1) * g.dv];
                    row.iter_mut().for_each(|y| *y = *y * inv);
                }
                T::write_row(out, sp.dtype, 0, &acc[..br * g.dv]);
            }
        }
        _ => {
            // dq = Σ_j ds_ij k_j with ds = p·(dy·v_j − delta)·scale·dcap.
            let (lse, dy, delta) = (ins[4], ins[5], ins[6]);
            let mut lt = vec![T::ZERO; br];
            let mut dt = vec![T::ZERO; br];
            g.load(lse, row0, br, 1, &mut lt);
            g.load(delta, row0, br, 1, &mut dt);
            let mut dyt = vec![T::ZERO; br * g.dv];
            g.load(dy, row0, br, g.dv, &mut dyt);
            let mut dp = vec![T::ZERO; br * BC];
            let mut dq = vec![T::ZERO; br * g.d];
            for j0 in (0..g.t).step_by(BC) {
                let bc = BC.min(g.t - j0);
                if g.block_hidden(i0, i0 + br, j0, j0 + bc) {
                    continue;
                }
                g.load(k, krow0 + j0, bc, g.d, &mut kt);
                g.load(v.unwrap(), krow0 + j0, bc, g.dv, &mut vt);
                product(br, g.d, bc, (&qt, false), (&kt, true), T::ZERO, &mut sc);
                g.scores(mask, bq, hq, i0, br, j0, bc, &mut sc, &mut dcap);
                product(br, g.dv, bc, (&dyt, false), (&vt, true), T::ZERO, &mut dp);
                grad_scores(sp, br, bc, &lt, &dt, &mut sc, &dp, &dcap);
                product(br, bc, g.d, (&sc, false), (&kt, false), T::ONE, &mut dq);
            }
            T::write_row(out, sp.dtype, 0, &dq);
        }
    }
}

/// Turns scores `sc` (br × bc) into `ds = p·(dp − delta)·scale·dcap` with `p = exp(s − lse)`
/// (0 for a row whose lse is −∞).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_scores<T: Real>(
    sp: &Spec,
    br: usize,
    bc: usize,
    lse: &[T],
    delta: &[T],
    sc: &mut [T],
    dp: &[T],
    dcap: &[T],
) {
    let scale = T::of(sp.scale);
    for r in 0..br {
        let row = &mut sc[r * bc..(r + 1) * bc];
        probabilities(row, lse[r]);
        let (dp, dcap) = (&dp[r * bc..(r + 1) * bc], &dcap[r * bc..(r + 1) * bc]);
        for ((x, &dp), &dc) in row.iter_mut().zip(dp).zip(dcap) {
            *x = *x * (dp - delta[r]) * scale * dc;
        }
    }
}

/// dk or dv for keys `j0..` of key/value head (bq, kh), summed over the head's query heads
/// and every query block: `out` holds exactly those rows.
#[inline(always)]
fn key_block<T: Real>(g: &Geo, ins: &[&[u8]], bq: usize, kh: usize, j0: usize, out: &mut [u8]) {
    let sp = g.spec;
    let bc = BC.min(g.t - j0);
    let group = g.h / g.hk;
    let (q, k, v, mask, lse, dy, delta) = (ins[0], ins[1], ins[2], ins[3], ins[4], ins[5], ins[6]);
    let krow0 = (bq * g.hk + kh) * g.t + j0;
    let want_k = sp.part == Part::GradK;
    let mut kt = vec![T::ZERO; bc * g.d];
    let mut vt = vec![T::ZERO; bc * g.dv];
    g.load(k, krow0, bc, g.d, &mut kt);
    if want_k {
        g.load(v, krow0, bc, g.dv, &mut vt);
    }
    let w = if want_k { g.d } else { g.dv };
    let mut acc = vec![T::ZERO; bc * w];
    let mut qt = vec![T::ZERO; BR * g.d];
    let mut dyt = vec![T::ZERO; BR * g.dv];
    let mut sc = vec![T::ZERO; BR * bc];
    let mut dp = vec![T::ZERO; BR * bc];
    let mut dcap = vec![T::ONE; BR * bc];
    let mut lt = vec![T::ZERO; BR];
    let mut dt = vec![T::ZERO; BR];
    for gi in 0..group {
        let hq = kh * group + gi;
        for i0 in (0..g.s).step_by(BR) {
            let br = BR.min(g.s - i0);
            if g.block_hidden(i0, i0 + br, j0, j0 + bc) {
                continue;
            }
            let row0 = (bq * g.h + hq) * g.s + i0;
            g.load(q, row0, br, g.d, &mut qt);
            g.load(lse, row0, br, 1, &mut lt);
            g.load(dy, row0, br, g.dv, &mut dyt);
            product(br, g.d, bc, (&qt, false), (&kt, true), T::ZERO, &mut sc);
            g.scores(mask, bq, hq, i0, br, j0, bc, &mut sc, &mut dcap);
            if want_k {
                // dk_j += Σ_i ds_ij q_i.
                g.load(delta, row0, br, 1, &mut dt);
                product(br, g.dv, bc, (&dyt, false), (&vt, true), T::ZERO, &mut dp);
                grad_scores(sp, br, bc, &lt, &dt, &mut sc, &dp, &dcap);
                product(bc, br, g.d, (&sc, true), (&qt, false), T::ONE, &mut acc);
            } else {
                // dv_j += Σ_i p_ij dy_i.
                for r in 0..br {
                    probabilities(&mut sc[r * bc..(r + 1) * bc], lt[r]);
                }
                product(bc, br, g.dv, (&sc, true), (&dyt, false), T::ONE, &mut acc);
            }
        }
    }
    T::write_row(out, sp.dtype, 0, &acc);
}
