//! AVX2 + FMA + F16C kernels (x86-64). Each function is compiled for those CPU features, so
//! calling it is `unsafe` wherever they are not statically known: callers reach them only
//! through [`super::kernels`] after run-time detection. Memory accesses are bounds-checked per
//! row or guarded by the loop bounds next to each `unsafe` load.
//!
//! The quantized kernel multiplies one half of a group of sixteen weight rows (interleaved by
//! [`QMatrix::pack`]; a 32-byte vector is half of each 64-byte line, eight rows) by up to four
//! activation rows per pass over the blocks, so each weight block is unpacked once and used
//! for every activation row (prefill and batched decode), and each scale multiply and
//! accumulation serves eight rows at once.

use std::arch::x86_64::*;

use super::kernels::Dst;
use super::quant::{LINE, QActs, QK, QMatrix, QType, ROWS};

/// Rows one 256-bit vector serves: half of a [`ROWS`] group.
const HALF: usize = 8;

/// How far ahead of the block being multiplied the kernel prefetches weights, in bytes:
/// decode streams every weight from memory once, and the hardware prefetcher alone leaves
/// one core at about 60% of the bandwidth it reaches with these hints.
const PREFETCH_BYTES: usize = 2048;

/// Horizontal sum of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Half `half` (rows `16g + 8·half ..`, eight output features) of row group `g` times
/// activation rows `a0..a0 + C`: returns the eight dot products for each of the `C` activation
/// rows. `super::kernels` checks every shape before calling; the group's and the activation
/// rows' slices are cut once here, and the loop reads inside them through raw pointers.
/// The first half prefetches the group's weights; the second finds them in cache.
///
/// The loop takes one 32-byte weight vector at a time (unpacked to low and high nibbles for
/// 4-bit weights) and multiplies it into every activation row's accumulator, so a block holds
/// only two weight vectors, `C` integer sums and `C` float sums in registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group<const C: usize, const NIBBLES: bool>(
    w: &QMatrix,
    g: usize,
    half: usize,
    x: &QActs,
    a0: usize,
) -> [[f32; HALF]; C] {
    let nb = w.nb;
    let gbb = QMatrix::group_block_bytes(w.qtype);
    let wq = &w.qs[g * nb * gbb..(g + 1) * nb * gbb];
    let wd = &w.d[g * nb * ROWS..(g + 1) * nb * ROWS];
    let mins = w.qtype == QType::Q4_1;
    let wc = if mins {
        &w.c[g * nb * ROWS..(g + 1) * nb * ROWS]
    } else {
        &[][..]
    };
    // Activation rows `a0..a0 + C`, each `nb` blocks: quants, scales and block sums.
    let xq = x.qs[a0 * nb * QK..(a0 + C) * nb * QK].as_ptr();
    let xd = x.d[a0 * nb..(a0 + C) * nb].as_ptr();
    let xs = x.s[a0 * nb..(a0 + C) * nb].as_ptr();
    // Four activation bytes `4k..4k + 4` of block `b` of row `c`, broadcast to every lane.
    let bcast = |c: usize, b: usize, k: usize| {
        // SAFETY: `c < C`, `b < nb` and `k < 8`, so the four bytes at
        // `(c·nb + b)·32 + 4k` lie inside the `C·nb·32` bytes `xq` was cut to.
        _mm256_set1_epi32(unsafe {
            xq.add((c * nb + b) * QK + 4 * k)
                .cast::<i32>()
                .read_unaligned()
        })
    };
    let scale_d = |c: usize, b: usize| {
        // SAFETY: `c < C` and `b < nb` index inside the `C·nb` scales `xd` was cut to.
        _mm256_set1_ps(unsafe { *xd.add(c * nb + b) })
    };
    let scale_s = |c: usize, b: usize| {
        // SAFETY: `c < C` and `b < nb` index inside the `C·nb` block sums `xs` was cut to.
        _mm256_set1_ps(unsafe { *xs.add(c * nb + b) })
    };
    let minus8 = _mm256_set1_ps(-8.0);
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        let blk = &wq[b * gbb..(b + 1) * gbb];
        if half == 0 {
            // A hint only: addresses past the end are never dereferenced.
            let ahead = wq.as_ptr().wrapping_add(b * gbb + PREFETCH_BYTES);
            for line in (0..gbb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
        }
        let sc = b * ROWS + HALF * half;
        // SAFETY: `wd` holds `nb * 16` f16 values and `half < 2`, so 8 at `sc` are in bounds.
        let dv = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wd[sc..sc + HALF].as_ptr().cast())) };
        if NIBBLES {
            // Eight products of at most 2·15·127 each fit an i16 lane (30480 < 32767).
            let mut sum = [zero; C];
            for j in 0..4 {
                let at = LINE * j + 32 * half;
                // SAFETY: `blk` holds 256 bytes; 32 at `at` (j < 4, half < 2) are in bounds.
                let raw = unsafe { _mm256_loadu_si256(blk[at..at + 32].as_ptr().cast()) };
                let lo = _mm256_and_si256(raw, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                for (c, s) in sum.iter_mut().enumerate() {
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, bcast(c, b, 2 * j)),
                        _mm256_maddubs_epi16(hi, bcast(c, b, 2 * j + 1)),
                    );
                    *s = _mm256_add_epi16(*s, p);
                }
            }
            let cv = if mins {
                // SAFETY: `wc` holds `nb * 16` f16 values, so 8 at `sc` are in bounds.
                unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wc[sc..sc + HALF].as_ptr().cast())) }
            } else {
                _mm256_mul_ps(dv, minus8)
            };
            for (c, a) in acc.iter_mut().enumerate() {
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[c], ones));
                *a = _mm256_fmadd_ps(_mm256_mul_ps(f, dv), scale_d(c, b), *a);
                *a = _mm256_fmadd_ps(cv, scale_s(c, b), *a);
            }
        } else {
            let mut sum = [zero; C];
            for k in 0..8 {
                let at = LINE * k + 32 * half;
                // SAFETY: `blk` holds 512 bytes; 32 at `at` (k < 8, half < 2) are in bounds.
                let wk = unsafe { _mm256_loadu_si256(blk[at..at + 32].as_ptr().cast()) };
                // Signed × signed: |w| × (a with w's sign); one product pair is at most
                // 2·128·127 = 32512, so it fits before widening.
                let mag = _mm256_sign_epi8(wk, wk);
                for (c, s) in sum.iter_mut().enumerate() {
                    let p = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(bcast(c, b, k), wk));
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                }
            }
            for (c, a) in acc.iter_mut().enumerate() {
                let f = _mm256_cvtepi32_ps(sum[c]);
                *a = _mm256_fmadd_ps(_mm256_mul_ps(f, dv), scale_d(c, b), *a);
            }
        }
    }
    let mut out = [[0f32; HALF]; C];
    for c in 0..C {
        // SAFETY: `out[c]` is an array of 8 floats.
        unsafe { _mm256_storeu_ps(out[c].as_mut_ptr(), acc[c]) };
    }
    out
}

/// Rows `r0..r1` of `w` (`r0` a multiple of 16) times every activation row, written through
/// `dst`. Callable only where AVX2, FMA and F16C are known to exist, with shapes checked, by
/// a caller that owns rows `r0..r1` of `dst` (see [`Dst::put`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(w: &QMatrix, x: &QActs, r0: usize, r1: usize, dst: &Dst) {
    match w.qtype {
        QType::Q4_0 | QType::Q4_1 => rows_for::<true>(w, x, r0, r1, dst),
        QType::Q8_0 => rows_for::<false>(w, x, r0, r1, dst),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn rows_for<const NIBBLES: bool>(w: &QMatrix, x: &QActs, r0: usize, r1: usize, dst: &Dst) {
    let t = x.rows;
    // SAFETY: `matmul_rows`'s caller owns rows `r0..r1`, and every `base` below is in them.
    let put = |base: usize, a0: usize, res: &[[f32; HALF]]| unsafe { dst.put(base, r1, a0, res) };
    for g in r0 / ROWS..r1.div_ceil(ROWS) {
        for half in 0..ROWS / HALF {
            let base = g * ROWS + HALF * half;
            if base >= r1 {
                break; // Only padding rows are left in this group.
            }
            let mut a = 0;
            while a + 4 <= t {
                put(base, a, &group::<4, NIBBLES>(w, g, half, x, a));
                a += 4;
            }
            match t - a {
                0 => {}
                1 => put(base, a, &group::<1, NIBBLES>(w, g, half, x, a)),
                2 => put(base, a, &group::<2, NIBBLES>(w, g, half, x, a)),
                _ => put(base, a, &group::<3, NIBBLES>(w, g, half, x, a)),
            }
        }
    }
}

/// `Σ q[i] · k[i]` with `k` in f16. Callable only where AVX2, FMA and F16C exist.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_f16(q: &[f32], k: &[u16]) -> f32 {
    let n = q.len().min(k.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements of both slices are in bounds.
        let (qv, kv) = unsafe {
            (
                _mm256_loadu_ps(q[i..].as_ptr()),
                _mm256_cvtph_ps(_mm_loadu_si128(k[i..].as_ptr().cast())),
            )
        };
        acc = _mm256_fmadd_ps(qv, kv, acc);
        i += 8;
    }
    let mut s = hsum(acc);
    for j in i..n {
        s += q[j] * half::f16::from_bits(k[j]).to_f32();
    }
    s
}

/// `out[i] += p · v[i]` with `v` in f16. Callable only where AVX2, FMA and F16C exist.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn axpy_f16(out: &mut [f32], p: f32, v: &[u16]) {
    let n = out.len().min(v.len());
    let pv = _mm256_set1_ps(p);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements of both slices are in bounds.
        unsafe {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v[i..].as_ptr().cast()));
            let o = _mm256_loadu_ps(out[i..].as_ptr());
            _mm256_storeu_ps(out[i..].as_mut_ptr(), _mm256_fmadd_ps(pv, vv, o));
        }
        i += 8;
    }
    for j in i..n {
        out[j] += p * half::f16::from_bits(v[j]).to_f32();
    }
}

/// Converts f32 to f16 bits (round to nearest even). Callable only where AVX2 and F16C exist.
#[target_feature(enable = "avx2,f16c")]
pub(super) fn to_f16(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements of both slices are in bounds.
        unsafe {
            let v = _mm256_loadu_ps(src[i..].as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst[i..].as_mut_ptr().cast(), h);
        }
        i += 8;
    }
    for j in i..n {
        dst[j] = half::f16::from_f32(src[j]).to_bits();
    }
}

/// Quantizes 32 values to bytes, `round_half_even(v · 127 / amax)`, returning `(amax, Σ q)`.
/// Callable only where AVX2 and FMA exist; `src` and `dst` hold at least 32 values.
#[target_feature(enable = "avx2,fma")]
pub(super) fn quantize_ints(src: &[f32], dst: &mut [i8]) -> (f32, i32) {
    let src = &src[..QK];
    let dst = &mut dst[..QK];
    let sign = _mm256_set1_ps(-0.0);
    // SAFETY: `src` holds 32 floats; the four loads cover them exactly.
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src[8 * i..].as_ptr()) });
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for x in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *x));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    let amax = _mm_cvtss_f32(m4);
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    // `cvtps` rounds with the default MXCSR mode, nearest-even, like `round_ties_even`.
    let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)));
    let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
    let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b01_00_11_10>(s4));
    let s4 = _mm_add_epi32(s4, _mm_shuffle_epi32::<0b10_11_00_01>(s4));
    let sum = _mm_cvtsi128_si32(s4);
    // Pack to bytes: i32 -> i16 -> i8 (saturating, values are within ±127), then undo the
    // lane interleaving the 256-bit packs introduce.
    let w01 = _mm256_packs_epi32(q[0], q[1]);
    let w23 = _mm256_packs_epi32(q[2], q[3]);
    let b = _mm256_packs_epi16(w01, w23);
    let b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `dst` holds 32 bytes.
    unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), b) };
    (amax, sum)
}

/// `e^x` for eight lanes: Cody–Waite range reduction `x = n·ln2 + r` and a degree-6 polynomial
/// for `e^r` (within 2 ulp of `f32::exp` over the clamped range), scaled by `2^n` through the
/// exponent bits. Inputs are clamped to [−87.3, 88.7], where results stay normal.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.7),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // ln 2 split in two so `n · ln2` is exact in the first part.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_2e-3f32,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

/// `out[i] = silu(gate[i]) · up[i]`, `silu(g) = g / (1 + e^−g)`. Callable only where AVX2 and
/// FMA exist.
#[target_feature(enable = "avx2,fma")]
pub(super) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements of all three slices are in bounds.
        unsafe {
            let g = _mm256_loadu_ps(gate[i..].as_ptr());
            let u = _mm256_loadu_ps(up[i..].as_ptr());
            let e = exp8(_mm256_xor_ps(g, sign));
            let v = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), u);
            _mm256_storeu_ps(out[i..].as_mut_ptr(), v);
        }
        i += 8;
    }
    for j in i..n {
        out[j] = gate[j] / (1.0 + (-gate[j]).exp()) * up[j];
    }
}

/// `x[i] = e^(x[i] − max)` in place, returning the sum. Callable only where AVX2 and FMA exist.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn exp_sub_sum(x: &mut [f32], max: f32) -> f32 {
    let n = x.len();
    let m = _mm256_set1_ps(max);
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements are in bounds.
        unsafe {
            let v = exp8(_mm256_sub_ps(_mm256_loadu_ps(x[i..].as_ptr()), m));
            acc = _mm256_add_ps(acc, v);
            _mm256_storeu_ps(x[i..].as_mut_ptr(), v);
        }
        i += 8;
    }
    let mut sum = hsum(acc);
    for v in &mut x[i..] {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// `x[i] = f16_round(x[i] / d)` (softmax normalisation with llama.cpp's f16 probabilities).
/// Callable only where AVX2 and F16C exist.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) fn div_round_f16(x: &mut [f32], d: f32) {
    let n = x.len();
    let dv = _mm256_set1_ps(d);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements are in bounds.
        unsafe {
            let v = _mm256_div_ps(_mm256_loadu_ps(x[i..].as_ptr()), dv);
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(x[i..].as_mut_ptr(), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    for v in &mut x[i..] {
        *v = half::f16::from_f32(*v / d).to_f32();
    }
}

/// Cache positions ahead of the one being read whose key (or value) row is prefetched: the
/// rows of a sequence sit in scattered blocks, which the hardware prefetcher follows poorly.
const ATTN_AHEAD: usize = 4;

/// Prefetches the `bytes` bytes of a cache row from `row` on. A hint only: it never faults.
#[inline]
#[target_feature(enable = "avx2")]
fn prefetch_row(row: *const u16, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(row.cast::<i8>().wrapping_add(line));
    }
}

/// Attention of `kvh` consecutive key/value heads' query groups, `M` query heads each (`q`:
/// `kvh·M·hd` values, group after group; key/value head `j` is at columns `off + j·hd` of the
/// cache rows), every head attending exactly as [`attend_head`] does, into `out` (same shape
/// as `q`). Each position's cached key and value rows are read once for all the heads, the
/// next rows prefetched, and the sums kept in registers. Per head, every float operation and
/// its order are `attend_head`'s, so the results are bit-identical. `scores` is scratch of at
/// least `kvh·M·slots.len()`; `hd` must be a multiple of 16 (the caller checks it with the
/// shapes). Callable only where AVX2, FMA and F16C exist.
#[allow(clippy::too_many_arguments)] // The heads' view of the paged cache.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn attend_heads<const M: usize>(
    q: &[f32],
    hd: usize,
    kvh: usize,
    kc: &[u16],
    vc: &[u16],
    slots: &[u32],
    off: usize,
    kvd: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let ctx = slots.len();
    let heads = kvh * M;
    let width = kvh * hd;
    let q = &q[..heads * hd];
    let scores = &mut scores[..heads * ctx];
    let out = &mut out[..heads * hd];
    for (p, &slot) in slots.iter().enumerate() {
        if let Some(&next) = slots.get(p + ATTN_AHEAD) {
            prefetch_row(
                kc.as_ptr().wrapping_add(next as usize * kvd + off),
                2 * width,
            );
        }
        let at = slot as usize * kvd + off;
        let row = &kc[at..at + width];
        for j in 0..kvh {
            let k = &row[j * hd..(j + 1) * hd];
            let qj = &q[j * M * hd..(j + 1) * M * hd];
            let mut acc = [_mm256_setzero_ps(); M];
            for i in (0..hd).step_by(8) {
                // SAFETY: `i + 8 <= hd = k.len()`.
                let kv = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(k[i..i + 8].as_ptr().cast())) };
                for (h, a) in acc.iter_mut().enumerate() {
                    // SAFETY: `h·hd + i + 8 <= M·hd = qj.len()`.
                    let qv = unsafe { _mm256_loadu_ps(qj[h * hd + i..h * hd + i + 8].as_ptr()) };
                    *a = _mm256_fmadd_ps(qv, kv, *a);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                scores[(j * M + h) * ctx + p] = hsum(*a) * scale;
            }
        }
    }
    for sh in scores.chunks_exact_mut(ctx.max(1)) {
        let max = sh.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        let sum = exp_sub_sum(sh, max);
        div_round_f16(sh, sum);
    }
    // Values, sixteen dimensions of a group's heads at a time.
    for j in 0..kvh {
        for d in (0..hd).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for (p, &slot) in slots.iter().enumerate() {
                if j == 0
                    && d == 0
                    && let Some(&next) = slots.get(p + ATTN_AHEAD)
                {
                    prefetch_row(
                        vc.as_ptr().wrapping_add(next as usize * kvd + off),
                        2 * width,
                    );
                }
                let at = slot as usize * kvd + off + j * hd + d;
                let v = &vc[at..at + 16];
                // SAFETY: `v` holds 16 values, two groups of 8.
                let (v0, v1) = unsafe {
                    (
                        _mm256_cvtph_ps(_mm_loadu_si128(v[..8].as_ptr().cast())),
                        _mm256_cvtph_ps(_mm_loadu_si128(v[8..].as_ptr().cast())),
                    )
                };
                for (h, a) in acc.iter_mut().enumerate() {
                    let pv = _mm256_set1_ps(scores[(j * M + h) * ctx + p]);
                    a[0] = _mm256_fmadd_ps(pv, v0, a[0]);
                    a[1] = _mm256_fmadd_ps(pv, v1, a[1]);
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let at = (j * M + h) * hd + d;
                let o = &mut out[at..at + 16];
                // SAFETY: `o` holds 16 floats, two groups of 8.
                unsafe {
                    _mm256_storeu_ps(o[..8].as_mut_ptr(), a[0]);
                    _mm256_storeu_ps(o[8..].as_mut_ptr(), a[1]);
                }
            }
        }
    }
}

/// One query head's attention over its sequence's cached keys and values (f16), through the
/// slot list: scores, softmax with f16-rounded probabilities, weighted sum into `out`. One call
/// per head keeps the per-key work inlined. Callable only where AVX2, FMA and F16C exist.
#[allow(clippy::too_many_arguments)] // The head's view of the paged cache.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn attend_head(
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
    let hd = q.len();
    let mut max = f32::NEG_INFINITY;
    for (s, &slot) in scores.iter_mut().zip(slots) {
        let at = slot as usize * kvd + off;
        *s = dot_f16(q, &kc[at..at + hd]) * scale;
        max = max.max(*s);
    }
    let sum = exp_sub_sum(scores, max);
    div_round_f16(scores, sum);
    out.fill(0.0);
    for (&p, &slot) in scores.iter().zip(slots) {
        let at = slot as usize * kvd + off;
        axpy_f16(out, p, &vc[at..at + hd]);
    }
}
