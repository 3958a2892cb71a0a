//! AVX2 + FMA + F16C kernels (x86-64). Each function is compiled for those CPU features, so
//! calling it is `unsafe` wherever they are not statically known: callers reach them only
//! through [`super::kernels`] after run-time detection. Memory accesses are bounds-checked per
//! row or guarded by the loop bounds next to each `unsafe` load.
//!
//! The quantized tile multiplies `R` weight rows by `C` activation rows per pass over the
//! blocks, so each weight block is unpacked once and used `C` times (prefill and batched
//! decode), and each activation block is loaded once for `R` rows.

use std::arch::x86_64::*;

use super::quant::{QActs, QK, QMatrix, QType};

/// Horizontal sum of eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Computes `out[(r0 + r - base) * stride + a0 + c]` for `r < R`, `c < C`. Every slice is
/// bounds-checked once per tile, so bad coordinates panic instead of reading out of bounds;
/// `super::kernels` checks shapes before calling, so they never do.
#[inline]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)] // The tile's coordinates; one call site.
fn tile<const R: usize, const C: usize, const NIBBLES: bool>(
    w: &QMatrix,
    r0: usize,
    x: &QActs,
    a0: usize,
    out: &mut [f32],
    base: usize,
    stride: usize,
) {
    let nb = w.nb;
    let qb = if NIBBLES { QK / 2 } else { QK };
    let ones = _mm256_set1_epi16(1);
    let low = _mm_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let wrows: [&[u8]; R] =
        std::array::from_fn(|r| &w.qs[(r0 + r) * nb * qb..(r0 + r + 1) * nb * qb]);
    let wd: [&[f32]; R] = std::array::from_fn(|r| &w.d[(r0 + r) * nb..(r0 + r + 1) * nb]);
    let xrows: [&[i8]; C] =
        std::array::from_fn(|c| &x.qs[(a0 + c) * nb * QK..(a0 + c + 1) * nb * QK]);
    let xd: [&[f32]; C] = std::array::from_fn(|c| &x.d[(a0 + c) * nb..(a0 + c + 1) * nb]);
    for b in 0..nb {
        let mut wv = [_mm256_setzero_si256(); R];
        let mut wabs = [_mm256_setzero_si256(); R];
        for r in 0..R {
            let p = wrows[r][b * qb..].as_ptr();
            if NIBBLES {
                // SAFETY: `wrows[r]` holds `nb * 16` bytes, so 16 bytes at block `b < nb` are
                // in bounds; unaligned loads are allowed.
                let bytes = unsafe { _mm_loadu_si128(p.cast()) };
                let lo = _mm_and_si128(bytes, low);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), low);
                wv[r] = _mm256_set_m128i(hi, lo);
            } else {
                // SAFETY: `wrows[r]` holds `nb * 32` bytes; 32 at block `b < nb` are in bounds.
                wv[r] = unsafe { _mm256_loadu_si256(p.cast()) };
                wabs[r] = _mm256_sign_epi8(wv[r], wv[r]);
            }
        }
        for c in 0..C {
            // SAFETY: `xrows[c]` holds `nb * 32` bytes; 32 at block `b < nb` are in bounds.
            let av = unsafe { _mm256_loadu_si256(xrows[c][b * QK..].as_ptr().cast()) };
            let da = xd[c][b];
            for r in 0..R {
                let prod = if NIBBLES {
                    _mm256_maddubs_epi16(wv[r], av)
                } else {
                    _mm256_maddubs_epi16(wabs[r], _mm256_sign_epi8(av, wv[r]))
                };
                let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(prod, ones));
                acc[r][c] = _mm256_fmadd_ps(sum, _mm256_set1_ps(wd[r][b] * da), acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let mut v = hsum(acc[r][c]);
            if NIBBLES {
                let wc = &w.c[(r0 + r) * nb..(r0 + r + 1) * nb];
                let xs = &x.s[(a0 + c) * nb..(a0 + c + 1) * nb];
                v += wc.iter().zip(xs).map(|(a, b)| a * b).sum::<f32>();
            }
            out[(r0 + r - base) * stride + a0 + c] = v;
        }
    }
}

/// Rows `r0..r1` of `w` times every activation row, written feature-major into `out`
/// (`out[(r - r0) * x.rows + a]`). Callable only where AVX2 and FMA are known to exist.
#[target_feature(enable = "avx2,fma")]
pub(super) fn matmul_rows(w: &QMatrix, x: &QActs, r0: usize, r1: usize, out: &mut [f32]) {
    match w.qtype {
        QType::Q4_0 | QType::Q4_1 => rows_for::<true>(w, x, r0, r1, out),
        QType::Q8_0 => rows_for::<false>(w, x, r0, r1, out),
    }
}

#[target_feature(enable = "avx2,fma")]
fn rows_for<const NIBBLES: bool>(
    w: &QMatrix,
    x: &QActs,
    r0: usize,
    r1: usize,
    out: &mut [f32],
) {
    let t = x.rows;
    let mut r = r0;
    // The loop bounds keep `r + R <= r1` and `a + C <= t`; the caller checked the rest.
    while r + 4 <= r1 {
        let mut a = 0;
        while a + 4 <= t {
            tile::<4, 4, NIBBLES>(w, r, x, a, out, r0, t);
            a += 4;
        }
        match t - a {
            0 => {}
            1 => tile::<4, 1, NIBBLES>(w, r, x, a, out, r0, t),
            2 => tile::<4, 2, NIBBLES>(w, r, x, a, out, r0, t),
            _ => tile::<4, 3, NIBBLES>(w, r, x, a, out, r0, t),
        }
        r += 4;
    }
    while r < r1 {
        let mut a = 0;
        while a + 4 <= t {
            tile::<1, 4, NIBBLES>(w, r, x, a, out, r0, t);
            a += 4;
        }
        while a < t {
            tile::<1, 1, NIBBLES>(w, r, x, a, out, r0, t);
            a += 1;
        }
        r += 1;
    }
}

/// `Σ q[i] · k[i]` with `k` in f16. Callable only where AVX2, FMA and F16C exist.
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
