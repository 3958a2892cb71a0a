//! The kernel interface the forward pass calls: quantized matrix products, f16 key/value
//! arithmetic and conversions, each dispatched once per call to the best instruction set the
//! CPU reports at run time (on x86-64, AVX-512 VNNI for the matrix products where the CPU has
//! it, AVX2 + FMA + F16C for the rest and on older CPUs; elsewhere portable Rust).

use std::sync::OnceLock;

use super::pool::Pool;
use super::quant::{LINE, QActs, QK, QMatrix, QType, ROWS};

/// The instruction set the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 AVX2 with FMA and F16C.
    Avx2,
    /// x86-64 AVX-512 F, BW and VNNI (with AVX2, FMA and F16C) for the matrix products; the
    /// other kernels run their AVX2 code.
    Avx512,
}

impl Isa {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512vnni",
        }
    }

    /// Every instruction set this CPU can run, from portable up to [`detected`]'s choice.
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let mut v = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                v.push(Self::Avx2);
            }
            if has_avx2() && has_avx512() {
                v.push(Self::Avx512);
            }
        }
        v
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vnni")
}

/// The best instruction set this CPU supports. `KEEL_CPU_KERNELS=portable` or `=avx2` caps
/// it (for comparisons and tests); a cap the CPU cannot run falls back to what it can.
pub(crate) fn detected() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("KEEL_CPU_KERNELS").unwrap_or_default();
        if cap == "portable" {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                if cap != "avx2" && has_avx512() {
                    return Isa::Avx512;
                }
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Rows `r0..r1` of `w` times every row of `x`, token-major over those rows:
/// `out[a * (r1 - r0) + (r - r0)]`. `r0` must start a row group (a multiple of 16). Shapes that
/// do not fit leave `out` untouched and return `false`.
#[cfg(test)]
pub(crate) fn matmul_rows(
    isa: Isa,
    w: &QMatrix,
    x: &QActs,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) -> bool {
    if r0 > r1 || out.len() < (r1 - r0) * x.rows {
        return false;
    }
    let dst = Dst::new(out, r1 - r0, r0);
    // SAFETY: `dst` is this call's only writer, over `out`, which it borrows exclusively.
    unsafe { rows_into(isa, w, x, r0, r1, &dst) }
}

/// Rows `r0..r1` of `w` times every row of `x`, written through `dst`; `false` (nothing
/// written) when the shapes do not fit.
///
/// # Safety
/// No other thread may write or read rows `r0..r1` of `dst` during the call (the tasks of one
/// product each own their rows).
unsafe fn rows_into(isa: Isa, w: &QMatrix, x: &QActs, r0: usize, r1: usize, dst: &Dst) -> bool {
    if x.nb != w.nb
        || r0 > r1
        || r1 > w.rows
        || !r0.is_multiple_of(ROWS)
        || !dst.covers(r0, r1, x.rows)
        || x.qs.len() < x.rows * x.nb * QK
        || x.d.len() < x.rows * x.nb
        || x.s.len() < x.rows * x.nb
        || x.sums.len() < x.rows * x.nb
    {
        return false;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced by `detected` after checking AVX2, FMA and
        // F16C (tests use it only when `detected` returns it), and the shapes were checked;
        // the caller owns rows `r0..r1` of `dst`.
        Isa::Avx2 => unsafe { super::avx2::matmul_rows(w, x, r0, r1, dst) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only produced by `detected` (and `Isa::available`) after
        // checking AVX-512 F, BW and VNNI besides AVX2, FMA and F16C; the shapes were checked;
        // the caller owns rows `r0..r1` of `dst`.
        Isa::Avx512 => unsafe { super::avx512::matmul_rows(w, x, r0, r1, dst) },
        // SAFETY: the caller owns rows `r0..r1` of `dst`.
        _ => unsafe { portable_rows(w, x, r0, r1, dst) },
    }
    true
}

/// Where the kernels of one matrix product write: token-major, `out[a * stride + (r - first)]`
/// for activation row `a` and weight row `r`. The product's tasks share one `Dst`, each writing
/// only the weight rows it was given, so results go straight to their place with no transpose
/// and no element is touched by two tasks.
#[derive(Clone, Copy)]
pub(super) struct Dst<'a> {
    ptr: *mut f32,
    len: usize,
    stride: usize,
    first: usize,
    _out: std::marker::PhantomData<&'a ()>,
}

// SAFETY: a `Dst` points into a buffer it borrows mutably for `'a` (so the buffer outlives
// every task using it and nobody else touches it); the tasks sharing it write disjoint rows,
// which `put`'s contract requires.
unsafe impl Send for Dst<'_> {}
// SAFETY: as above.
unsafe impl Sync for Dst<'_> {}

impl<'a> Dst<'a> {
    fn new(out: &'a mut [f32], stride: usize, first: usize) -> Self {
        Self {
            ptr: out.as_mut_ptr(),
            len: out.len(),
            stride,
            first,
            _out: std::marker::PhantomData,
        }
    }

    /// Whether rows `r0..r1` of `t` activation rows fall inside the buffer.
    fn covers(&self, r0: usize, r1: usize, t: usize) -> bool {
        r0 >= self.first
            && r1 - self.first <= self.stride
            && (t == 0 || (t - 1) * self.stride + (r1 - self.first) <= self.len)
    }

    /// Writes a kernel's results for weight rows `base..base + L` (those below `end`) and
    /// activation rows `a0..a0 + res.len()`. Positions outside the buffer are dropped.
    ///
    /// # Safety
    /// The calling task must own rows `base..min(base + L, end)`: no other thread writes or
    /// reads them during the product.
    #[inline]
    pub(super) unsafe fn put<const L: usize>(
        &self,
        base: usize,
        end: usize,
        a0: usize,
        res: &[[f32; L]],
    ) {
        let n = L.min(end.saturating_sub(base));
        if base < self.first {
            return;
        }
        for (c, col) in res.iter().enumerate() {
            let at = (a0 + c) * self.stride + (base - self.first);
            if at + n <= self.len {
                // SAFETY: `at + n <= len` keeps the copy inside the borrowed buffer, and the
                // caller owns these rows, so no other thread accesses them.
                unsafe { std::ptr::copy_nonoverlapping(col.as_ptr(), self.ptr.add(at), n) };
            }
        }
    }
}

/// The reference kernel, on any CPU.
///
/// # Safety
/// As [`Dst::put`]: the caller owns rows `r0..r1` of `dst`.
unsafe fn portable_rows(w: &QMatrix, x: &QActs, r0: usize, r1: usize, dst: &Dst) {
    let nb = w.nb;
    let t = x.rows;
    let gbb = QMatrix::group_block_bytes(w.qtype);
    let four_bit = w.qtype != QType::Q8_0;
    for g in r0 / ROWS..r1.div_ceil(ROWS) {
        for a in 0..t {
            let mut acc = [0f32; ROWS];
            for b in 0..nb {
                let blk = &w.qs[(g * nb + b) * gbb..(g * nb + b + 1) * gbb];
                let j = x.at(a, b);
                let y = &x.qs[j * QK..(j + 1) * QK];
                let mut isum = [0i32; ROWS];
                for k in 0..QK / 4 {
                    for (lane, s) in isum.iter_mut().enumerate() {
                        for e in 0..4 {
                            let v = if four_bit {
                                let byte = blk[LINE * (k / 2) + 4 * lane + e];
                                i32::from(if k % 2 == 0 { byte & 15 } else { byte >> 4 })
                            } else {
                                i32::from(blk[LINE * k + 4 * lane + e] as i8)
                            };
                            *s += v * i32::from(y[4 * k + e]);
                        }
                    }
                }
                let (da, sa) = (x.d[j], x.s[j]);
                for (lane, v) in acc.iter_mut().enumerate() {
                    let (d, c) = w.scales(g * ROWS + lane, b);
                    *v += isum[lane] as f32 * d * da;
                    if four_bit {
                        *v += c * sa;
                    }
                }
            }
            // SAFETY: the caller owns rows `r0..r1`, which hold this group's rows below `r1`.
            unsafe { dst.put(g * ROWS, r1, a, &[acc]) };
        }
    }
}

/// Weight rows per parallel task: about four tasks per thread to balance them, but never so
/// little work that handing a task over costs more than it saves (at least ~2k block products,
/// a few microseconds).
fn rows_per_task(rows: usize, nb: usize, t: usize, threads: usize) -> usize {
    let by_balance = rows.div_ceil(threads * 4);
    let min_rows = 2048usize.div_ceil((nb * t).max(1));
    by_balance.max(min_rows).min(rows).div_ceil(ROWS) * ROWS
}

/// `y = x · wᵀ` for all rows of `x`: `out[a * w.rows + r]` (token-major), using the pool.
/// Each task's kernel writes its rows of every activation row straight into `out`.
pub(crate) fn matmul(pool: &Pool, isa: Isa, w: &QMatrix, x: &QActs, out: &mut [f32]) {
    let chunk = rows_per_task(w.rows, w.nb, x.rows, pool.threads());
    matmul_then(pool, isa, w, x, out, chunk, &|_, _| {});
}

/// Weight rows per task of [`matmul_then`]: [`matmul`]'s choice rounded up to a multiple of
/// `align` (itself rounded up to a multiple of 16), so a task's rows hold whole runs of it.
pub(crate) fn task_rows(w: &QMatrix, t: usize, threads: usize, align: usize) -> usize {
    let align = align.max(1).div_ceil(ROWS) * ROWS;
    rows_per_task(w.rows, w.nb, t, threads).div_ceil(align) * align
}

/// The rows a task of [`matmul_then`] has just computed, for every activation row, while
/// they are still in its core's cache.
pub(crate) struct Computed<'a> {
    dst: &'a Dst<'a>,
    r0: usize,
    r1: usize,
    t: usize,
}

impl Computed<'_> {
    /// Weight rows `r0..r1` (see [`Computed::rows`]) of activation row `a`; empty when `a` is
    /// not one of the product's rows.
    pub(crate) fn row(&self, a: usize) -> &[f32] {
        let d = self.dst;
        if a >= self.t || !d.covers(self.r0, self.r1, self.t) {
            return &[];
        }
        let at = a * d.stride + (self.r0 - d.first);
        // SAFETY: `covers` keeps `at + (r1 − r0)` inside the borrowed buffer. This task owns
        // rows `r0..r1` (no other thread writes or reads them during the product) and has
        // finished writing them, and the slice lives no longer than the task's call.
        unsafe { std::slice::from_raw_parts(d.ptr.add(at), self.r1 - self.r0) }
    }

    /// The first and one-past-last weight rows computed.
    pub(crate) fn rows(&self) -> (usize, usize) {
        (self.r0, self.r1)
    }
}

/// [`matmul`] in tasks of `chunk` weight rows (a multiple of 16; see [`task_rows`]): task `i`
/// computes rows `i·chunk..` of every activation row and then calls `then(i, &computed)`, so
/// work that reads only those rows fuses into the task (it reads them from cache, and the
/// product needs no separate pass over the pool).
pub(crate) fn matmul_then(
    pool: &Pool,
    isa: Isa,
    w: &QMatrix,
    x: &QActs,
    out: &mut [f32],
    chunk: usize,
    then: &(dyn Fn(usize, &Computed<'_>) + Sync),
) {
    let t = x.rows;
    let n = w.rows;
    let chunk = chunk.max(1).div_ceil(ROWS) * ROWS;
    let dst = Dst::new(&mut out[..n * t], n, 0);
    pool.run(n.div_ceil(chunk), &|i| {
        let r0 = i * chunk;
        let r1 = (r0 + chunk).min(n);
        // SAFETY: task `i` alone writes rows `r0..r1` (the tasks' row ranges are disjoint).
        let ok = unsafe { rows_into(isa, w, x, r0, r1, &dst) };
        debug_assert!(ok);
        then(
            i,
            &Computed {
                dst: &dst,
                r0,
                r1,
                t,
            },
        );
    });
}

/// Quantizes one block of 32 values to bytes: `q = round_half_even(v · 127 / amax)`, on the
/// detected instruction set. Returns `(amax, Σ q)`; both paths give identical bytes.
#[cfg(test)]
pub(crate) fn quantize_ints(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    match detected() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 and FMA were detected.
        Isa::Avx2 | Isa::Avx512 if src.len() == QK && dst.len() == QK => unsafe {
            super::avx2::quantize_ints(src, dst)
        },
        _ => portable_quantize_ints(src, dst),
    }
}

/// [`super::quant::quantize_block`] on the detected instruction set: the AVX2 path keeps the
/// f16 roundings of the scale and sum in F16C registers; both give identical results.
pub(crate) fn quantize_block(src: &[f32], dst: &mut [i8], round_sum: bool) -> (f32, f32, i32) {
    match detected() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2, FMA and F16C were detected.
        Isa::Avx2 | Isa::Avx512 if src.len() >= QK && dst.len() >= QK => unsafe {
            super::avx2::quantize_block(src, dst, round_sum)
        },
        _ => portable_quantize_block(src, dst, round_sum),
    }
}

fn portable_quantize_block(src: &[f32], dst: &mut [i8], round_sum: bool) -> (f32, f32, i32) {
    let (amax, sum) = portable_quantize_ints(src, dst);
    let (d, s) = super::quant::block_scales(amax, sum, round_sum);
    (d, s, sum)
}

fn portable_quantize_ints(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in dst.iter_mut().zip(src) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (amax, sum)
}

/// `Σ x[i]²` accumulated in f64 (as GGML's RMSNorm does), in eight lanes (lane `i mod 8`
/// takes element `i`) added in a fixed order, so every instruction set returns the same bits.
pub(crate) fn sum_squares(isa: Isa, x: &[f32]) -> f64 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 and FMA were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::sum_squares(x) },
        _ => {
            let mut lanes = [0f64; 8];
            let body = x.len() / 8 * 8;
            for chunk in x[..body].chunks_exact(8) {
                for (l, v) in lanes.iter_mut().zip(chunk) {
                    *l += f64::from(*v) * f64::from(*v);
                }
            }
            let l: [f64; 4] = std::array::from_fn(|k| lanes[k] + lanes[k + 4]);
            let mut s = (l[0] + l[2]) + (l[1] + l[3]);
            for v in &x[body..] {
                s += f64::from(*v) * f64::from(*v);
            }
            s
        }
    }
}

/// `out[i] = silu(gate[i]) · up[i]` (SwiGLU's gating).
pub(crate) fn silu_mul(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 and FMA were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::silu_mul(gate, up, out) },
        _ => {
            for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    }
}

/// `x[i] = e^(x[i] − max)` in place; returns the sum (softmax's numerator and denominator).
pub(crate) fn exp_sub_sum(isa: Isa, x: &mut [f32], max: f32) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 and FMA were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::exp_sub_sum(x, max) },
        _ => {
            let mut sum = 0f32;
            for v in x.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            sum
        }
    }
}

/// `x[i] = f16_round(x[i] / d)`.
pub(crate) fn div_round_f16(isa: Isa, x: &mut [f32], d: f32) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 and F16C were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::div_round_f16(x, d) },
        _ => {
            for v in x.iter_mut() {
                *v = half::f16::from_f32(*v / d).to_f32();
            }
        }
    }
}

/// The index of the first largest value of `x`, as the host sampler's greedy pick defines it:
/// a scan that moves only to a strictly larger value, so NaNs are never picked once a number
/// leads (and a NaN in front stays the answer), and an empty row gives 0.
pub(crate) fn argmax(isa: Isa, x: &[f32]) -> u32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 was detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::argmax(x) },
        _ => argmax_scalar(x),
    }
}

/// [`argmax`] one value at a time.
pub(crate) fn argmax_scalar(x: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// `x[i] = f16_round(x[i])` (dividing by one is exact, so this is [`div_round_f16`] by 1).
pub(crate) fn round_to_f16(isa: Isa, x: &mut [f32]) {
    div_round_f16(isa, x, 1.0);
}

/// One query head `q` attending over the keys and values at `slots` of an f16 cache whose rows
/// are `kvd` wide, starting at column `off`: scaled scores, softmax with probabilities rounded
/// to f16 (as llama.cpp's CPU path rounds them), and their weighted sum of values into `out`.
/// `scores` is scratch of `slots.len()` values. Slots were checked against the cache.
#[allow(clippy::too_many_arguments)] // The head's view of the paged cache.
pub(crate) fn attend_head(
    isa: Isa,
    q: &[f32],
    kc: &[u16],
    vc: &[u16],
    slots: &[u32],
    off: usize,
    kvd: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2, FMA and F16C were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe {
            super::avx2::attend_head(q, kc, vc, slots, off, kvd, scale, scores, out)
        },
        _ => {
            let hd = q.len();
            let mut max = f32::NEG_INFINITY;
            for (s, &slot) in scores.iter_mut().zip(slots) {
                let at = slot as usize * kvd + off;
                *s = dot_f16(isa, q, &kc[at..at + hd]) * scale;
                max = max.max(*s);
            }
            let sum = exp_sub_sum(isa, scores, max);
            div_round_f16(isa, scores, sum);
            out.fill(0.0);
            for (&p, &slot) in scores.iter().zip(slots) {
                let at = slot as usize * kvd + off;
                axpy_f16(isa, out, p, &vc[at..at + hd]);
            }
        }
    }
}

/// Attention for consecutive key/value heads and their query groups: `q` holds the query
/// heads of key/value heads `off / hd ..` (`group` heads each, `hd` values per head, one after
/// another), key/value head `j` of the call sits at columns `off + j·hd` of the cache rows, and
/// each query head attends as [`attend_head`] does, into `out` (same shape as `q`). Where the
/// SIMD path applies (`hd` a multiple of 16) each cached key and value row is read once for
/// every head of the call; the results equal [`attend_head`]'s bit for bit either way.
/// `scores` is scratch of at least `(q.len() / hd) · slots.len()` values.
#[allow(clippy::too_many_arguments)] // The heads' view of the paged cache.
pub(crate) fn attend_heads(
    isa: Isa,
    q: &[f32],
    hd: usize,
    group: usize,
    kc: &[u16],
    vc: &[u16],
    slots: &[u32],
    off: usize,
    kvd: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (hd, group) = (hd.max(1), group.max(1));
    let heads = q.len() / hd;
    let kvh = heads / group;
    let ctx = slots.len();
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && hd.is_multiple_of(16) {
        use super::avx2::attend_heads as simd;
        let (s, o) = (&mut scores[..heads * ctx], &mut out[..heads * hd]);
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2, FMA and F16C were detected, `hd`
        // is a multiple of 16, and the slices hold the `kvh·group` heads passed.
        let done = unsafe {
            match group {
                1 => {
                    simd::<1>(q, hd, kvh, kc, vc, slots, off, kvd, scale, s, o);
                    true
                }
                2 => {
                    simd::<2>(q, hd, kvh, kc, vc, slots, off, kvd, scale, s, o);
                    true
                }
                3 => {
                    simd::<3>(q, hd, kvh, kc, vc, slots, off, kvd, scale, s, o);
                    true
                }
                4 => {
                    simd::<4>(q, hd, kvh, kc, vc, slots, off, kvd, scale, s, o);
                    true
                }
                _ => false,
            }
        };
        if done {
            return;
        }
        // Larger groups: each key/value head's query heads, four at a time.
        for j in 0..kvh {
            let mut h = 0;
            while h < group {
                let n = (group - h).min(4);
                let at = (j * group + h) * hd;
                let (q, o) = (&q[at..at + n * hd], &mut out[at..at + n * hd]);
                let (s, off) = (&mut scores[..n * ctx], off + j * hd);
                // SAFETY: as above, for the `n` heads of key/value head `j`.
                unsafe {
                    match n {
                        4 => simd::<4>(q, hd, 1, kc, vc, slots, off, kvd, scale, s, o),
                        3 => simd::<3>(q, hd, 1, kc, vc, slots, off, kvd, scale, s, o),
                        2 => simd::<2>(q, hd, 1, kc, vc, slots, off, kvd, scale, s, o),
                        _ => simd::<1>(q, hd, 1, kc, vc, slots, off, kvd, scale, s, o),
                    }
                }
                h += n;
            }
        }
        return;
    }
    for h in 0..heads {
        let (q, o) = (&q[h * hd..(h + 1) * hd], &mut out[h * hd..(h + 1) * hd]);
        let off = off + (h / group) * hd;
        attend_head(
            isa,
            q,
            kc,
            vc,
            slots,
            off,
            kvd,
            scale,
            &mut scores[..ctx],
            o,
        );
    }
}

/// `Σ q[i] · k[i]` with `k` in f16 bits.
pub(crate) fn dot_f16(isa: Isa, q: &[f32], k: &[u16]) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2, FMA and F16C were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::dot_f16(q, k) },
        _ => q
            .iter()
            .zip(k)
            .map(|(a, b)| a * half::f16::from_bits(*b).to_f32())
            .sum(),
    }
}

/// `out[i] += p · v[i]` with `v` in f16 bits.
pub(crate) fn axpy_f16(isa: Isa, out: &mut [f32], p: f32, v: &[u16]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2, FMA and F16C were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::axpy_f16(out, p, v) },
        _ => {
            for (o, b) in out.iter_mut().zip(v) {
                *o += p * half::f16::from_bits(*b).to_f32();
            }
        }
    }
}

/// Asks for `x`'s cache lines ahead of a later write or read (a hint: nothing changes, and
/// the portable path does nothing).
pub(crate) fn prefetch(isa: Isa, x: &[u16]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 was detected; the lines are `x`'s.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::prefetch_row(x.as_ptr(), 2 * x.len()) },
        _ => {}
    }
}

/// f32 to f16 bits, rounding to nearest even.
pub(crate) fn to_f16(isa: Isa, src: &[f32], dst: &mut [u16]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` and `Isa::Avx512` imply AVX2 and F16C were detected.
        Isa::Avx2 | Isa::Avx512 => unsafe { super::avx2::to_f16(src, dst) },
        _ => {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = half::f16::from_f32(*s).to_bits();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::quant::{PlainQ, QActs, QMatrix, QType, dot_ref, rounds_sum};
    use super::*;

    /// A small deterministic generator (xorshift), so failures replay.
    pub(crate) struct Rng(u64);
    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub(crate) fn f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub(crate) fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f32()).collect()
        }
    }

    fn isas() -> Vec<Isa> {
        Isa::available()
    }

    fn check(qtype: QType, rows: usize, cols: usize, t: usize, seed: u64) {
        let mut rng = Rng::new(seed);
        let w = QMatrix::pack(&PlainQ::quantize(qtype, rows, cols, &rng.vec(rows * cols)));
        let xs: Vec<f32> = rng.vec(t * cols).iter().map(|v| v * 3.0).collect();
        let x = QActs::quantize(&xs, t, cols, rounds_sum(qtype));
        let pool = Pool::new(2).unwrap();
        for isa in isas() {
            let mut out = vec![f32::NAN; t * rows];
            matmul(&pool, isa, &w, &x, &mut out);
            for a in 0..t {
                for r in 0..rows {
                    let want = dot_ref(&w, r, &x, a);
                    let got = out[a * rows + r];
                    // Bound: f32 rounding over `cols` products of magnitude <= |d_w d_a| 127*15.
                    let tol = 1e-6 * (cols as f32) * 3.0 + 1e-5 * want.abs();
                    assert!(
                        (got - want).abs() <= tol,
                        "{qtype:?} {rows}x{cols} t={t} {isa:?} row {r} act {a}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_match_the_reference_at_many_shapes() {
        let mut seed = 1;
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            // Row counts below, at and across the 8-row half and the 16-row group; activation
            // counts across the AVX2 tile of 4 and the AVX-512 tile of 6.
            let shapes = [
                (1, 32),
                (3, 64),
                (8, 32),
                (9, 96),
                (17, 160),
                (40, 64),
                (64, 576),
            ];
            for (rows, cols) in shapes {
                for t in [1, 2, 3, 4, 5, 6, 7, 9, 11, 13] {
                    check(qtype, rows, cols, t, seed);
                    seed += 1;
                }
            }
        }
    }

    #[test]
    fn kernels_match_at_model_shapes() {
        check(QType::Q4_1, 1536, 576, 1, 99);
        check(QType::Q4_1, 576, 1536, 6, 100);
        check(QType::Q8_0, 300, 576, 2, 101);
        // Batches longer than the AVX2 kernel's row slice, ending inside a tile.
        check(QType::Q4_1, 48, 576, 100, 102);
        check(QType::Q4_0, 17, 64, 49, 103);
        check(QType::Q8_0, 33, 96, 50, 104);
    }

    #[test]
    fn q8_0_weights_at_minus_128_multiply_exactly() {
        // A GGUF file may hold −128 (the quantizer never writes it), which has no positive
        // counterpart in a byte: every path must still multiply it exactly.
        let (rows, cols, t) = (19, 64, 7);
        let mut rng = Rng::new(21);
        let mut m = PlainQ::quantize(QType::Q8_0, rows, cols, &rng.vec(rows * cols));
        for (i, q) in m.q.iter_mut().enumerate() {
            if i % 3 == 0 {
                *q = 0x80;
            }
        }
        let w = QMatrix::pack(&m);
        let x = QActs::quantize(&rng.vec(t * cols), t, cols, false);
        let pool = Pool::new(2).unwrap();
        for isa in isas() {
            let mut out = vec![f32::NAN; t * rows];
            matmul(&pool, isa, &w, &x, &mut out);
            for a in 0..t {
                for r in 0..rows {
                    let want = dot_ref(&w, r, &x, a);
                    let got = out[a * rows + r];
                    assert!(
                        (got - want).abs() <= 1e-4 + 1e-5 * want.abs(),
                        "{isa:?} row {r} act {a}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_range_is_written_token_major_and_nothing_else() {
        // Rows 16..37 of a 40-row matrix (a partial last group) for 5 activation rows: each
        // path writes exactly `out[a * 21 + (r - 16)]`, and a guard element past the end stays.
        let (rows, cols, t, r0, r1) = (40, 96, 5, 16, 37);
        let mut rng = Rng::new(77);
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let w = QMatrix::pack(&PlainQ::quantize(qtype, rows, cols, &rng.vec(rows * cols)));
            let x = QActs::quantize(&rng.vec(t * cols), t, cols, rounds_sum(qtype));
            for isa in isas() {
                let width = r1 - r0;
                let mut out = vec![f32::NAN; t * width + 1];
                out[t * width] = 7.0;
                assert!(matmul_rows(isa, &w, &x, r0, r1, &mut out[..]));
                assert_eq!(out[t * width], 7.0, "{isa:?} wrote past the range");
                for a in 0..t {
                    for r in r0..r1 {
                        let want = dot_ref(&w, r, &x, a);
                        let got = out[a * width + (r - r0)];
                        assert!(
                            (got - want).abs() <= 1e-4 + 1e-5 * want.abs(),
                            "{qtype:?} {isa:?} row {r} act {a}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused_without_writing() {
        let w = QMatrix::pack(&PlainQ::quantize(QType::Q4_1, 4, 64, &[0.5; 256]));
        let x = QActs::quantize(&[0.25; 32], 1, 32, true);
        let mut out = vec![7.0; 4];
        for isa in isas() {
            assert!(!matmul_rows(isa, &w, &x, 0, 4, &mut out));
            assert!(out.iter().all(|v| *v == 7.0));
        }
        let x = QActs::quantize(&[0.25; 64], 1, 64, true);
        assert!(!matmul_rows(Isa::Portable, &w, &x, 0, 5, &mut out));
        assert!(!matmul_rows(Isa::Portable, &w, &x, 0, 4, &mut out[..3]));
        assert!(!matmul_rows(Isa::Portable, &w, &x, 1, 4, &mut out));
        assert!(matmul_rows(Isa::Portable, &w, &x, 0, 4, &mut out));
    }

    #[test]
    fn ggml_layout_round_trips_and_rejects_wrong_sizes() {
        let mut rng = Rng::new(7);
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let rows = 11;
            let vals = rng.vec(rows * 64);
            let m = PlainQ::quantize(qtype, rows, 64, &vals);
            // Re-encode as GGML blocks and read back.
            let mut raw = Vec::new();
            for i in 0..m.d.len() {
                let q = &m.q[i * 32..(i + 1) * 32];
                match qtype {
                    QType::Q8_0 => {
                        raw.extend_from_slice(&half::f16::from_f32(m.d[i]).to_le_bytes());
                        raw.extend_from_slice(q);
                    }
                    QType::Q4_0 | QType::Q4_1 => {
                        raw.extend_from_slice(&half::f16::from_f32(m.d[i]).to_le_bytes());
                        if qtype == QType::Q4_1 {
                            raw.extend_from_slice(&half::f16::from_f32(m.c[i]).to_le_bytes());
                        }
                        raw.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
                    }
                }
            }
            let back = PlainQ::from_ggml(qtype, rows, 64, &raw).unwrap();
            assert_eq!(back.q, m.q, "{qtype:?}");
            assert_eq!(back.d, m.d);
            let packed = QMatrix::pack(&back);
            let mut row = vec![0f32; 64];
            for r in 0..rows {
                packed.dequantize_row(r, &mut row);
                for (k, (a, b)) in row.iter().zip(&vals[r * 64..]).enumerate() {
                    let tol = if qtype == QType::Q8_0 { 0.01 } else { 0.15 };
                    assert!(
                        (a - b).abs() < tol,
                        "{qtype:?} row {r} value {k}: {a} vs {b}"
                    );
                }
            }
            assert!(PlainQ::from_ggml(qtype, rows, 64, &raw[1..]).is_err());
            assert!(PlainQ::from_ggml(qtype, rows, 60, &raw).is_err());
            assert!(PlainQ::from_ggml(qtype, 0, 64, &[]).is_err());
        }
    }

    #[test]
    fn block_quantization_is_identical_on_every_path() {
        let mut rng = Rng::new(11);
        for scale in [0.0f32, 1e-7, 1e-3, 0.37, 1.0, 40.0, 6.5e4] {
            let src: Vec<f32> = rng.vec(QK).iter().map(|v| v * scale).collect();
            let (mut a, mut b) = (vec![0i8; QK], vec![0i8; QK]);
            let pa = portable_quantize_ints(&src, &mut a);
            let pb = quantize_ints(&src, &mut b);
            assert_eq!(pa, pb);
            assert_eq!(a, b);
            for round in [false, true] {
                let (da, sa, qa) = portable_quantize_block(&src, &mut a, round);
                let (db, sb, qb) = quantize_block(&src, &mut b, round);
                assert_eq!(
                    (da.to_bits(), sa.to_bits(), qa),
                    (db.to_bits(), sb.to_bits(), qb)
                );
                assert_eq!(a, b);
            }
            // Halfway cases round to even.
            let mut src = vec![0f32; QK];
            src[0] = 127.0;
            src[1] = 2.5;
            src[2] = -3.5;
            let mut q = vec![0i8; QK];
            let (amax, sum) = quantize_ints(&src, &mut q);
            assert_eq!((amax, q[0], q[1], q[2]), (127.0, 127, 2, -4));
            assert_eq!(sum, 127 + 2 - 4);
        }
    }

    #[test]
    fn quantizing_by_block_spans_across_the_pool_equals_row_by_row() {
        let pool = Pool::new(2).unwrap();
        let mut rng = Rng::new(12);
        // Batches below and above the split threshold, block counts that do not divide evenly.
        for (rows, cols) in [(1, 32), (3, 96), (16, 576), (17, 1536), (40, 160)] {
            let x: Vec<f32> = rng.vec(rows * cols).iter().map(|v| v * 5.0).collect();
            for round in [false, true] {
                let want = QActs::quantize(&x, rows, cols, round);
                let mut got = QActs::default();
                // Poison a previous, larger use of the buffers.
                got.reset(rows + 3, cols + 64);
                got.qs.fill(99);
                super::super::quantize_with(&pool, &mut got, rows, cols, round, &|a, b, buf| {
                    buf.copy_from_slice(&x[a * cols + b * QK..a * cols + (b + 1) * QK]);
                });
                assert_eq!((got.rows, got.nb), (want.rows, want.nb));
                assert_eq!(got.qs[..rows * cols], want.qs[..], "{rows}x{cols}");
                assert_eq!(got.d[..rows * cols / QK], want.d[..]);
                assert_eq!(got.s[..rows * cols / QK], want.s[..]);
                assert_eq!(got.sums[..rows * cols / QK], want.sums[..]);
            }
        }
    }

    #[test]
    fn sums_of_squares_are_identical_on_every_path_and_near_the_plain_sum() {
        let mut rng = Rng::new(13);
        for n in [0, 1, 7, 8, 9, 31, 576, 1000] {
            let x: Vec<f32> = rng.vec(n).iter().map(|v| v * 30.0).collect();
            let plain: f64 = x.iter().map(|v| f64::from(*v) * f64::from(*v)).sum();
            let got: Vec<f64> = isas().into_iter().map(|isa| sum_squares(isa, &x)).collect();
            for g in &got {
                assert_eq!(g.to_bits(), got[0].to_bits(), "n={n}: {got:?}");
                assert!(
                    (g - plain).abs() <= 1e-12 * plain.max(1.0),
                    "n={n}: {g} vs {plain}"
                );
            }
        }
    }

    #[test]
    fn vector_exp_and_silu_stay_within_a_few_ulp_of_libm() {
        let mut rng = Rng::new(5);
        for isa in isas() {
            for scale in [0.1f32, 3.0, 20.0, 90.0] {
                let gate: Vec<f32> = rng.vec(203).iter().map(|v| v * scale).collect();
                let up = rng.vec(203);
                let mut got = vec![0f32; 203];
                silu_mul(isa, &gate, &up, &mut got);
                for ((g, u), o) in gate.iter().zip(&up).zip(&got) {
                    let want = g / (1.0 + (-g).exp()) * u;
                    assert!(
                        (o - want).abs() <= 4e-7 * want.abs() + 1e-30,
                        "{g}: {o} vs {want}"
                    );
                }
                let mut x = gate.clone();
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = exp_sub_sum(isa, &mut x, max);
                let mut want_sum = 0f32;
                for (v, g) in x.iter().zip(&gate) {
                    let want = (g - max).exp();
                    want_sum += want;
                    // Below e^-87.3 the vector path clamps; both are negligible there.
                    if g - max > -87.0 {
                        assert!((v - want).abs() <= 4e-7 * want, "{g}: {v} vs {want}");
                    }
                }
                assert!((sum - want_sum).abs() <= 1e-5 * want_sum);
            }
        }
    }

    #[test]
    fn attention_heads_agree_across_paths_and_with_a_plain_softmax() {
        let mut rng = Rng::new(9);
        let (hd, kvd, slots_n) = (64usize, 192usize, 40usize);
        let kf = rng.vec(slots_n * kvd);
        let vf = rng.vec(slots_n * kvd);
        let (mut kc, mut vc) = (vec![0u16; kf.len()], vec![0u16; vf.len()]);
        to_f16(Isa::Portable, &kf, &mut kc);
        to_f16(Isa::Portable, &vf, &mut vc);
        let q = rng.vec(hd);
        let slots: Vec<u32> = (0..23u32).map(|i| (i * 7) % slots_n as u32).collect();
        let off = 64;
        let mut want = vec![0f32; hd];
        // Plain f64 softmax over the same f16 inputs, probabilities rounded to f16.
        let h = |b: u16| f64::from(half::f16::from_bits(b).to_f32());
        let sc: Vec<f64> = slots
            .iter()
            .map(|&s| {
                let at = s as usize * kvd + off;
                (0..hd)
                    .map(|d| f64::from(q[d]) * h(kc[at + d]))
                    .sum::<f64>()
                    * 0.125
            })
            .collect();
        let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
        for (s, &slot) in sc.iter().zip(&slots) {
            let p = f64::from(half::f16::from_f64((s - m).exp() / z).to_f32());
            let at = slot as usize * kvd + off;
            for d in 0..hd {
                want[d] += (p * h(vc[at + d])) as f32;
            }
        }
        for isa in isas() {
            let mut scores = vec![0f32; slots.len()];
            let mut out = vec![f32::NAN; hd];
            attend_head(
                isa,
                &q,
                &kc,
                &vc,
                &slots,
                off,
                kvd,
                0.125,
                &mut scores,
                &mut out,
            );
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 2e-3, "{isa:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn grouped_heads_equal_one_head_at_a_time_bit_for_bit() {
        // The grouped path must not change a single bit (greedy parity with llama.cpp rests
        // on it): group sizes on and off the specialised ones, one and several key/value heads
        // per call (starting past column 0), head sizes on and off the 16-wide SIMD path,
        // short and long contexts.
        let mut rng = Rng::new(31);
        for hd in [16usize, 40, 64] {
            for (group, kvh) in [
                (1usize, 1usize),
                (3, 1),
                (3, 2),
                (2, 3),
                (4, 2),
                (5, 1),
                (9, 2),
            ] {
                let kvd = (kvh + 1) * hd;
                let slots_n = 70;
                let kf = rng.vec(slots_n * kvd);
                let vf = rng.vec(slots_n * kvd);
                let (mut kc, mut vc) = (vec![0u16; kf.len()], vec![0u16; vf.len()]);
                to_f16(Isa::Portable, &kf, &mut kc);
                to_f16(Isa::Portable, &vf, &mut vc);
                let heads = group * kvh;
                for ctx in [1usize, 5, 33, 70] {
                    let q: Vec<f32> = rng.vec(heads * hd).iter().map(|v| v * 4.0).collect();
                    let slots: Vec<u32> = (0..ctx as u32).map(|i| (i * 13 + 5) % 70).collect();
                    for isa in isas() {
                        let mut want = vec![f32::NAN; heads * hd];
                        let mut scores = vec![0f32; ctx];
                        for h in 0..heads {
                            attend_head(
                                isa,
                                &q[h * hd..(h + 1) * hd],
                                &kc,
                                &vc,
                                &slots,
                                hd + (h / group) * hd,
                                kvd,
                                0.3,
                                &mut scores,
                                &mut want[h * hd..(h + 1) * hd],
                            );
                        }
                        let mut got = vec![f32::NAN; heads * hd];
                        let mut scores = vec![0f32; heads * ctx];
                        attend_heads(
                            isa,
                            &q,
                            hd,
                            group,
                            &kc,
                            &vc,
                            &slots,
                            hd,
                            kvd,
                            0.3,
                            &mut scores,
                            &mut got,
                        );
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{isa:?} hd {hd} group {group} x{kvh} ctx {ctx}");
                    }
                }
            }
        }
    }

    #[test]
    fn interleaved_pairs_put_each_run_of_both_side_by_side() {
        let mut rng = Rng::new(17);
        for qtype in [QType::Q4_0, QType::Q4_1, QType::Q8_0] {
            let (rows, cols) = (96, 64);
            let a = PlainQ::quantize(qtype, rows, cols, &rng.vec(rows * cols));
            let b = PlainQ::quantize(qtype, rows, cols, &rng.vec(rows * cols));
            let m = QMatrix::pack(&PlainQ::interleave(&a, &b, 32).unwrap());
            let (pa, pb) = (QMatrix::pack(&a), QMatrix::pack(&b));
            assert_eq!(m.rows, 2 * rows);
            let (mut got, mut want) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..2 * rows {
                // Row r is row 32·(r / 64) + r % 32 of a (even runs) or b (odd runs).
                let src = 32 * (r / 64) + r % 32;
                m.dequantize_row(r, &mut got);
                if (r / 32) % 2 == 0 { &pa } else { &pb }.dequantize_row(src, &mut want);
                assert_eq!(got, want, "{qtype:?} row {r}");
            }
            // Shapes that do not pair, and runs that do not divide the rows, are refused.
            let small = PlainQ::quantize(qtype, 32, cols, &rng.vec(32 * cols));
            assert!(PlainQ::interleave(&a, &small, 32).is_err());
            assert!(PlainQ::interleave(&a, &b, 0).is_err());
            assert!(PlainQ::interleave(&a, &b, 40).is_err());
        }
        let q8 = PlainQ::quantize(QType::Q8_0, 32, 64, &rng.vec(32 * 64));
        let q4 = PlainQ::quantize(QType::Q4_0, 32, 64, &rng.vec(32 * 64));
        assert!(PlainQ::interleave(&q8, &q4, 32).is_err());
    }

    #[test]
    fn fused_tasks_see_exactly_the_rows_they_computed() {
        let mut rng = Rng::new(23);
        let pool = Pool::new(2).unwrap();
        let (rows, cols) = (320, 96);
        let w = QMatrix::pack(&PlainQ::quantize(
            QType::Q4_1,
            rows,
            cols,
            &rng.vec(rows * cols),
        ));
        for t in [1, 5, 16] {
            let x = QActs::quantize(&rng.vec(t * cols), t, cols, true);
            let mut want = vec![0f32; t * rows];
            matmul(&pool, detected(), &w, &x, &mut want);
            let chunk = task_rows(&w, t, pool.threads(), 64);
            assert!(chunk.is_multiple_of(64));
            let seen = std::sync::Mutex::new(vec![f32::NAN; t * rows]);
            let mut got = vec![0f32; t * rows];
            matmul_then(&pool, detected(), &w, &x, &mut got, chunk, &|task, done| {
                let (r0, r1) = done.rows();
                assert_eq!(r0, task * chunk);
                assert_eq!(r1, (r0 + chunk).min(rows));
                let mut seen = seen.lock().unwrap();
                for a in 0..t {
                    let row = done.row(a);
                    assert_eq!(row.len(), r1 - r0);
                    seen[a * rows + r0..a * rows + r1].copy_from_slice(row);
                }
                assert!(done.row(t).is_empty());
            });
            assert_eq!(got, want, "t={t}");
            assert_eq!(
                seen.into_inner().unwrap(),
                want,
                "t={t}: what the tasks saw"
            );
        }
    }

    #[test]
    fn argmax_picks_the_first_largest_on_every_path() {
        let mut rng = Rng::new(41);
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for n in [0, 1, 7, 8, 9, 31, 64, 1000, 49_152] {
            rows.push(rng.vec(n));
        }
        // Ties (the first one wins), NaNs before and after the maximum, a NaN in front (the
        // scalar scan never leaves it), infinities, signed zeros, and all equal values.
        let mut tie = rng.vec(100);
        tie[37] = 5.0;
        tie[38] = 5.0;
        tie[90] = 5.0;
        rows.push(tie);
        let mut nans = rng.vec(77);
        nans[3] = f32::NAN;
        nans[50] = 9.0;
        nans[60] = f32::NAN;
        rows.push(nans);
        let mut lead = rng.vec(40);
        lead[0] = f32::NAN;
        lead[20] = 100.0;
        rows.push(lead);
        rows.push(vec![f32::NEG_INFINITY; 19]);
        let mut inf = rng.vec(33);
        inf[32] = f32::INFINITY;
        rows.push(inf);
        rows.push(vec![-0.0, 0.0, -0.0, 0.0, 0.0, -0.0, 0.0, -0.0, 0.0, 0.0]);
        rows.push(vec![2.5; 24]);
        for row in &rows {
            let want = argmax_scalar(row);
            // The scan as the host sampler writes it.
            let plain = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
            assert_eq!(want as usize, plain);
            for isa in isas() {
                assert_eq!(argmax(isa, row), want, "{isa:?} on {} values", row.len());
            }
        }
    }

    #[test]
    fn f16_helpers_agree_with_portable() {
        let mut rng = Rng::new(3);
        for n in [1usize, 7, 8, 9, 64, 67] {
            let q = rng.vec(n);
            let kf = rng.vec(n);
            let mut k = vec![0u16; n];
            to_f16(Isa::Portable, &kf, &mut k);
            for isa in isas() {
                let mut k2 = vec![0u16; n];
                to_f16(isa, &kf, &mut k2);
                assert_eq!(k, k2);
                let a = dot_f16(isa, &q, &k);
                let b = dot_f16(Isa::Portable, &q, &k);
                assert!((a - b).abs() < 1e-5 * n as f32, "{a} vs {b}");
                let (mut r1, mut r2) = (q.clone(), q.clone());
                div_round_f16(isa, &mut r1, 0.7);
                div_round_f16(Isa::Portable, &mut r2, 0.7);
                assert_eq!(r1, r2);
                let mut o1 = q.clone();
                let mut o2 = q.clone();
                axpy_f16(isa, &mut o1, 0.3, &k);
                axpy_f16(Isa::Portable, &mut o2, 0.3, &k);
                for (x, y) in o1.iter().zip(&o2) {
                    assert!((x - y).abs() < 1e-6);
                }
            }
        }
    }
}
