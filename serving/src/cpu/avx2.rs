//! AVX2 + FMA + F16C kernels (x86-64). Each function is compiled for those CPU features, so
//! calling it is `unsafe` wherever they are not statically known: callers reach them only
//! through [`super::kernels`] after run-time detection. Memory accesses are bounds-checked per
//! row or guarded by the loop bounds next to each `unsafe` load.
//!
//! The quantized kernels multiply row groups of sixteen weight rows (interleaved by
//! [`QMatrix::pack`]; a 32-byte vector is half of each 64-byte line, eight rows) by a tile of
//! activation rows per pass over the blocks, so each weight block is unpacked once and used
//! for every row of the tile, and each scale multiply and accumulation serves eight rows at
//! once. 4-bit weights with several activation rows take the whole group and three activation
//! rows per pass ([`group2`]: each broadcast of activation bytes feeds both halves); one
//! activation row (decode) and 8-bit weights take one half and up to four rows ([`group`]).
//! On Zen 3 the vector units retire about three integer operations per cycle, so what bounds
//! these loops is the count of widening, adding and scaling operations per multiply, not the
//! multiplies themselves; those two tile shapes measured fastest for their formats.

use std::arch::x86_64::*;

use super::kernels::Dst;
use super::quant::{LINE, QActs, QK, QMatrix, QType, ROWS};

/// Rows one 256-bit vector serves: half of a [`ROWS`] group.
const HALF: usize = 8;

/// Activation rows per tile of [`group2`].
const TILE2: usize = 3;

/// Activation rows multiplied by all of a task's weight rows before the next rows start: 48
/// rows of 576 values are 27 KiB of quants, about a core's L1 data cache.
const ROW_SLICE: usize = 48;

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

/// Row group `g`'s quants, scales and Q4_1 minimums (the scales again for the other formats),
/// and every activation block's quants, scales and sums, cut to their lengths once and handed
/// to a kernel loop as raw pointers (the loops index inside them).
struct Tile {
    wq: *const u8,
    wd: *const u16,
    wc: *const u16,
    xq: *const i8,
    xd: *const f32,
    xs: *const f32,
}

impl Tile {
    #[inline]
    fn new(w: &QMatrix, g: usize, x: &QActs) -> Self {
        let (nb, t) = (w.nb, x.rows);
        let gbb = QMatrix::group_block_bytes(w.qtype);
        let wd = w.d[g * nb * ROWS..(g + 1) * nb * ROWS].as_ptr();
        Self {
            wq: w.qs[g * nb * gbb..(g + 1) * nb * gbb].as_ptr(),
            wd,
            wc: if w.qtype == QType::Q4_1 {
                w.c[g * nb * ROWS..(g + 1) * nb * ROWS].as_ptr()
            } else {
                wd
            },
            xq: x.qs[..nb * t * QK].as_ptr(),
            xd: x.d[..nb * t].as_ptr(),
            xs: x.s[..nb * t].as_ptr(),
        }
    }
}

/// Half `half` (rows `16g + 8·half ..`, eight output features) of row group `g` times
/// activation rows `a0..a0 + C`: returns the eight dot products for each of the `C` activation
/// rows. `super::kernels` checks every shape before calling (`a0 + C <= x.rows`, the buffers
/// cover `x.rows × nb` blocks, `g` is a group of `w`). The first half prefetches the group's
/// weights; the second finds them in cache.
///
/// Activations are block-major ([`QActs`]), so block `b` of the tile's rows is one run of
/// `32·C` bytes and `C` scales at `b·t + a0`: one pointer per block, everything else a constant
/// offset, which leaves the sixteen vector registers to the arithmetic. The loop takes one
/// 32-byte weight vector at a time (unpacked to low and high nibbles for 4-bit weights) and
/// multiplies it into every activation row's integer sum.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group<const C: usize, const NIBBLES: bool>(
    w: &QMatrix,
    g: usize,
    half: usize,
    x: &QActs,
    a0: usize,
) -> [[f32; HALF]; C] {
    let (nb, t, gbb) = (w.nb, x.rows, QMatrix::group_block_bytes(w.qtype));
    let mins = w.qtype == QType::Q4_1;
    let Tile {
        wq,
        wd,
        wc,
        xq,
        xd,
        xs,
    } = Tile::new(w, g, x);
    let minus8 = _mm256_set1_ps(-8.0);
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        // The tile's entries for block `b`: index `b·t + a0 + c` for `c < C`.
        let j = b * t + a0;
        // SAFETY: `b < nb` and `a0 + C <= t`, so the `32·C` bytes at `32·j` lie inside the
        // `nb·t·32` bytes `xq` was cut to.
        let q = unsafe { xq.add(j * QK) };
        // Four activation bytes `4k..4k + 4` of row `c`, broadcast to every lane.
        // SAFETY: `c < C` and `k < 8`: inside the tile's bytes (see above).
        let bcast = |c: usize, k: usize| unsafe {
            _mm256_set1_epi32(q.add(c * QK + 4 * k).cast::<i32>().read_unaligned())
        };
        // SAFETY: `j + c < nb·t`, inside the scales `xd` and `xs` were cut to.
        let scale_d = |c: usize| unsafe { _mm256_set1_ps(*xd.add(j + c)) };
        // SAFETY: as above.
        let scale_s = |c: usize| unsafe { _mm256_set1_ps(*xs.add(j + c)) };
        // SAFETY: `b < nb`: the block's `gbb` bytes lie inside the group's `nb·gbb`.
        let blk = unsafe { wq.add(b * gbb + 32 * half) };
        if half == 0 {
            // A hint only: addresses past the end are never dereferenced.
            let ahead = wq.wrapping_add(b * gbb + PREFETCH_BYTES);
            for line in (0..gbb).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
            }
        }
        let sc = b * ROWS + HALF * half;
        // SAFETY: `wd` holds `nb * 16` f16 values and `half < 2`, so 8 at `sc` are in bounds.
        let dv = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wd.add(sc).cast())) };
        if NIBBLES {
            // Eight products of at most 2·15·127 each fit an i16 lane (30480 < 32767).
            let mut sum = [_mm256_setzero_si256(); C];
            for jj in 0..4 {
                // SAFETY: 32 bytes at `64·jj` of this half's start lie inside the 256-byte
                // block (`jj < 4`, `half < 2`).
                let raw = unsafe { _mm256_loadu_si256(blk.add(LINE * jj).cast()) };
                let lo = _mm256_and_si256(raw, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                for (c, s) in sum.iter_mut().enumerate() {
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo, bcast(c, 2 * jj)),
                        _mm256_maddubs_epi16(hi, bcast(c, 2 * jj + 1)),
                    );
                    *s = if jj == 0 { p } else { _mm256_add_epi16(*s, p) };
                }
            }
            let cv = if mins {
                // SAFETY: `wc` holds `nb * 16` f16 values, so 8 at `sc` are in bounds.
                unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wc.add(sc).cast())) }
            } else {
                _mm256_mul_ps(dv, minus8)
            };
            for (c, a) in acc.iter_mut().enumerate() {
                let f = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[c], ones));
                *a = _mm256_fmadd_ps(_mm256_mul_ps(f, dv), scale_d(c), *a);
                *a = _mm256_fmadd_ps(cv, scale_s(c), *a);
            }
        } else {
            let mut sum = [_mm256_setzero_si256(); C];
            for k in 0..8 {
                // SAFETY: 32 bytes at `64·k` of this half's start lie inside the 512-byte
                // block (`k < 8`, `half < 2`).
                let wk = unsafe { _mm256_loadu_si256(blk.add(LINE * k).cast()) };
                // Signed × signed: |w| × (a with w's sign); one product pair is at most
                // 2·128·127 = 32512, so it fits before widening.
                let mag = _mm256_sign_epi8(wk, wk);
                for (c, s) in sum.iter_mut().enumerate() {
                    let p = _mm256_maddubs_epi16(mag, _mm256_sign_epi8(bcast(c, k), wk));
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(p, ones));
                }
            }
            for (c, a) in acc.iter_mut().enumerate() {
                let f = _mm256_cvtepi32_ps(sum[c]);
                *a = _mm256_fmadd_ps(_mm256_mul_ps(f, dv), scale_d(c), *a);
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

/// A whole row group `g` (sixteen output features, both halves) times activation rows
/// `a0..a0 + C`, for tiles of several activation rows: each broadcast of four activation bytes
/// then feeds two multiplies (one per half) instead of one. Same contract as [`group`]. It
/// prefetches nothing: with several activation rows per weight block the loop is bound by
/// arithmetic, and prefetching the next group measured no faster.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn group2<const C: usize, const NIBBLES: bool>(
    w: &QMatrix,
    g: usize,
    x: &QActs,
    a0: usize,
) -> [[f32; ROWS]; C] {
    let (nb, t, gbb) = (w.nb, x.rows, QMatrix::group_block_bytes(w.qtype));
    let mins = w.qtype == QType::Q4_1;
    let Tile {
        wq,
        wd,
        wc,
        xq,
        xd,
        xs,
    } = Tile::new(w, g, x);
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = [[_mm256_setzero_ps(); 2]; C];
    for b in 0..nb {
        let j = b * t + a0;
        // SAFETY: `b < nb` and `a0 + C <= t`, so the `32·C` bytes at `32·j` lie inside the
        // `nb·t·32` bytes `xq` was cut to.
        let q = unsafe { xq.add(j * QK) };
        // SAFETY: `c < C` and `k < 8`: inside the tile's bytes (see above).
        let bcast = |c: usize, k: usize| unsafe {
            _mm256_set1_epi32(q.add(c * QK + 4 * k).cast::<i32>().read_unaligned())
        };
        // SAFETY: `b < nb`: the block's `gbb` bytes lie inside the group's `nb·gbb`.
        let blk = unsafe { wq.add(b * gbb) };
        let mut f = [[_mm256_setzero_ps(); 2]; C];
        if NIBBLES {
            let mut sum = [[_mm256_setzero_si256(); 2]; C];
            for jj in 0..4 {
                // SAFETY: 64 bytes at `64·jj` lie inside the 256-byte block (`jj < 4`).
                let raw = unsafe {
                    [
                        _mm256_loadu_si256(blk.add(LINE * jj).cast()),
                        _mm256_loadu_si256(blk.add(LINE * jj + 32).cast()),
                    ]
                };
                let lo = [_mm256_and_si256(raw[0], low), _mm256_and_si256(raw[1], low)];
                let hi = [
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw[0]), low),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw[1]), low),
                ];
                for (c, s) in sum.iter_mut().enumerate() {
                    let (bl, bh) = (bcast(c, 2 * jj), bcast(c, 2 * jj + 1));
                    for h in 0..2 {
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo[h], bl),
                            _mm256_maddubs_epi16(hi[h], bh),
                        );
                        s[h] = if jj == 0 {
                            p
                        } else {
                            _mm256_add_epi16(s[h], p)
                        };
                    }
                }
            }
            for c in 0..C {
                for h in 0..2 {
                    f[c][h] = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[c][h], ones));
                }
            }
        } else {
            let mut sum = [[_mm256_setzero_si256(); 2]; C];
            for k in 0..8 {
                // SAFETY: 64 bytes at `64·k` lie inside the 512-byte block (`k < 8`).
                let wk = unsafe {
                    [
                        _mm256_loadu_si256(blk.add(LINE * k).cast()),
                        _mm256_loadu_si256(blk.add(LINE * k + 32).cast()),
                    ]
                };
                let mag = [
                    _mm256_sign_epi8(wk[0], wk[0]),
                    _mm256_sign_epi8(wk[1], wk[1]),
                ];
                for (c, s) in sum.iter_mut().enumerate() {
                    let a = bcast(c, k);
                    for h in 0..2 {
                        let p = _mm256_maddubs_epi16(mag[h], _mm256_sign_epi8(a, wk[h]));
                        s[h] = _mm256_add_epi32(s[h], _mm256_madd_epi16(p, ones));
                    }
                }
            }
            for c in 0..C {
                for h in 0..2 {
                    f[c][h] = _mm256_cvtepi32_ps(sum[c][h]);
                }
            }
        }
        for h in 0..2 {
            let sc = b * ROWS + HALF * h;
            // SAFETY: `wd` and `wc` hold `nb * 16` f16 values, so 8 at `sc` are in bounds.
            let dv = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wd.add(sc).cast())) };
            let cv = if mins {
                // SAFETY: as above.
                unsafe { _mm256_cvtph_ps(_mm_loadu_si128(wc.add(sc).cast())) }
            } else {
                _mm256_mul_ps(dv, _mm256_set1_ps(-8.0))
            };
            for c in 0..C {
                // SAFETY: `j + c < nb·t`, inside the scales `xd` and `xs` were cut to.
                let (da, sa) = unsafe { (*xd.add(j + c), *xs.add(j + c)) };
                let a = &mut acc[c][h];
                *a = _mm256_fmadd_ps(_mm256_mul_ps(f[c][h], dv), _mm256_set1_ps(da), *a);
                if NIBBLES {
                    *a = _mm256_fmadd_ps(cv, _mm256_set1_ps(sa), *a);
                }
            }
        }
    }
    let mut out = [[0f32; ROWS]; C];
    for c in 0..C {
        for h in 0..2 {
            // SAFETY: `out[c]` is an array of 16 floats; 8 at `8h` are in bounds.
            unsafe { _mm256_storeu_ps(out[c][HALF * h..].as_mut_ptr(), acc[c][h]) };
        }
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
    // SAFETY: as above.
    let put2 = |g: usize, a0: usize, res: &[[f32; ROWS]]| unsafe { dst.put(g * ROWS, r1, a0, res) };
    if NIBBLES && t >= 2 {
        // Long batches (prefill) go through the task's groups a slice of activation rows at a
        // time, so the slice stays in the core's caches while the weights stream past it.
        for a_lo in (0..t).step_by(ROW_SLICE) {
            let a_hi = (a_lo + ROW_SLICE).min(t);
            for g in r0 / ROWS..r1.div_ceil(ROWS) {
                let mut a = a_lo;
                while a + TILE2 <= a_hi {
                    put2(g, a, &group2::<TILE2, NIBBLES>(w, g, x, a));
                    a += TILE2;
                }
                match a_hi - a {
                    0 => {}
                    1 => put2(g, a, &group2::<1, NIBBLES>(w, g, x, a)),
                    _ => put2(g, a, &group2::<2, NIBBLES>(w, g, x, a)),
                }
            }
        }
        return;
    }
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

/// `f16(x)` back to f32, rounding to nearest even (as `half::f16::from_f32` does).
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn round_f16(x: f32) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
        _mm_set_ss(x),
    )))
}

/// [`quantize_ints`] plus the block's f16-rounded scale and sum term, as
/// `super::quant::block_scales` computes them: `(d, s, Σq)`. The same arithmetic, repeated
/// here so the two f16 roundings stay in registers: through `half`'s run-time dispatch a
/// block took 47 to 52 ns against 13 ns this way (one core, this session's AMD EPYC). A test
/// holds both to the same bits. Callable only where AVX2, FMA and F16C exist; `src` and `dst`
/// hold at least 32 values.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quantize_block(src: &[f32], dst: &mut [i8], round_sum: bool) -> (f32, f32, i32) {
    let (amax, sum) = quantize_ints(src, dst);
    let d = amax / 127.0;
    let dr = round_f16(d);
    let s = if round_sum {
        round_f16(d * sum as f32)
    } else {
        dr * sum as f32
    };
    (dr, s, sum)
}

/// Quantizes 32 values to bytes, `round_half_even(v · 127 / amax)`, returning `(amax, Σ q)`.
/// Callable only where AVX2 and FMA exist; `src` and `dst` hold at least 32 values.
#[inline]
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

/// `Σ x[i]²` in f64 with eight lanes, lane `i mod 8` taking element `i` (the products of
/// f32 values are exact in f64), the lanes added in [`super::kernels::sum_squares`]'s fixed
/// order, then the tail. Callable only where AVX2 and FMA exist.
#[target_feature(enable = "avx2,fma")]
pub(super) fn sum_squares(x: &[f32]) -> f64 {
    let n = x.len();
    let (mut lo, mut hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: `i + 8 <= n` elements are in bounds.
        let v = unsafe { _mm256_loadu_ps(x[i..].as_ptr()) };
        let a = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let b = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
        lo = _mm256_fmadd_pd(a, a, lo);
        hi = _mm256_fmadd_pd(b, b, hi);
        i += 8;
    }
    // Lanes k and k + 4, then (0 + 2) + (1 + 3), as the portable path adds them.
    let l = _mm256_add_pd(lo, hi);
    let h = _mm_add_pd(_mm256_castpd256_pd128(l), _mm256_extractf128_pd::<1>(l));
    let mut s = _mm_cvtsd_f64(h) + _mm_cvtsd_f64(_mm_unpackhi_pd(h, h));
    for v in &x[i..] {
        s += f64::from(*v) * f64::from(*v);
    }
    s
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

/// The largest of `x` (`-inf` when empty or all NaN), eight lanes at a time: the value of a
/// sequential `f32::max` fold, which ignores NaN (a maximum is exact in any order). Callable
/// only where AVX2 exists.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn max_of(x: &[f32]) -> f32 {
    let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        // SAFETY: `c` holds 8 floats. `maxps` returns its second operand when either is NaN,
        // so a NaN lane keeps the running maximum.
        m = _mm256_max_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, m);
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), m) };
    let mut max = f32::NEG_INFINITY;
    for v in lanes.iter().chain(chunks.remainder()) {
        max = max.max(*v);
    }
    max
}

/// The index of the first largest value (see `kernels::argmax`): [`max_of`] for the largest
/// number, then a pass for the first lane equal to it. A NaN in front is the scalar scan's
/// answer, kept here. Callable only where AVX2 exists.
#[target_feature(enable = "avx2")]
pub(super) fn argmax(x: &[f32]) -> u32 {
    if x.first().is_none_or(|v| v.is_nan()) {
        return 0;
    }
    // `x[0]` is a number, so `max` is one of `x`'s numbers.
    let max = max_of(x);
    let mv = _mm256_set1_ps(max);
    let mut i = 0;
    while i + 8 <= x.len() {
        // SAFETY: `i + 8 <= x.len()`.
        let v = unsafe { _mm256_loadu_ps(x[i..].as_ptr()) };
        let hit = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, mv));
        if hit != 0 {
            return (i + hit.trailing_zeros() as usize) as u32;
        }
        i += 8;
    }
    // The maximum is in the tail (`max` came from some element, and equal values compare
    // equal, so the scan ends here at the latest).
    x[i..]
        .iter()
        .position(|v| *v == max)
        .map_or(0, |k| (i + k) as u32)
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
        *v = round_f16(*v / d);
    }
}

/// Cache positions ahead of the one being read whose key (or value) row is prefetched: the
/// rows of a sequence sit in scattered blocks, which the hardware prefetcher follows poorly.
const ATTN_AHEAD: usize = 16;

/// Prefetches the `bytes` bytes of a cache row from `row` on. A hint only: it never faults.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn prefetch_row(row: *const u16, bytes: usize) {
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
/// least `kvh·M·slots.len()`; `hd` must be a multiple of 16 and every slot's row inside both
/// caches (the caller checks both; checked again here once, and the call writes nothing
/// otherwise), so the loops read through unchecked pointers. Callable only where AVX2, FMA and
/// F16C exist.
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
    // Every row the loops below read through raw pointers, checked once here: slot `s`'s
    // heads are the `width` values at `s·kvd + off` of both caches.
    let top = slots.iter().map(|&s| s as usize).max().unwrap_or(0);
    let fits = |c: &[u16]| top * kvd + off + width <= c.len();
    if !hd.is_multiple_of(16) || !fits(kc) || !fits(vc) {
        return;
    }
    let (kp, vp, qp) = (kc.as_ptr(), vc.as_ptr(), q.as_ptr());
    for (p, &slot) in slots.iter().enumerate() {
        if let Some(&next) = slots.get(p + ATTN_AHEAD) {
            // The values of the same row too: the value pass below then finds them in cache
            // instead of waiting on memory at every position.
            let at = next as usize * kvd + off;
            prefetch_row(kp.wrapping_add(at), 2 * width);
            prefetch_row(vp.wrapping_add(at), 2 * width);
        }
        let at = slot as usize * kvd + off;
        for j in 0..kvh {
            // SAFETY: `at + width` is inside `kc` (checked above) and `j·hd + hd <= width`;
            // query head `jM + h` is inside `q` (`heads·hd` values).
            let (k, qj) = unsafe { (kp.add(at + j * hd), qp.add(j * M * hd)) };
            let mut acc = [_mm256_setzero_ps(); M];
            // Sixteen dimensions per turn, each lane's products still added in order.
            for i in (0..hd).step_by(16) {
                // SAFETY: `i + 16 <= hd`: inside the head's keys and each query head.
                unsafe {
                    let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(i).cast()));
                    let k1 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(i + 8).cast()));
                    for (h, a) in acc.iter_mut().enumerate() {
                        let qh = qj.add(h * hd + i);
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qh), k0, *a);
                        *a = _mm256_fmadd_ps(_mm256_loadu_ps(qh.add(8)), k1, *a);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                scores[(j * M + h) * ctx + p] = hsum(*a) * scale;
            }
        }
    }
    for sh in scores.chunks_exact_mut(ctx.max(1)) {
        let max = max_of(sh);
        let sum = exp_sub_sum(sh, max);
        div_round_f16(sh, sum);
    }
    let sp = scores.as_ptr();
    // Values, sixteen dimensions of a group's heads at a time.
    for j in 0..kvh {
        for d in (0..hd).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; M];
            for (p, &slot) in slots.iter().enumerate() {
                // SAFETY: the row is inside `vc` (checked above) and `j·hd + d + 16 <= width`;
                // `(jM + h)·ctx + p` is inside `scores` (`heads·ctx` values).
                unsafe {
                    let v = vp.add(slot as usize * kvd + off + j * hd + d);
                    let v0 = _mm256_cvtph_ps(_mm_loadu_si128(v.cast()));
                    let v1 = _mm256_cvtph_ps(_mm_loadu_si128(v.add(8).cast()));
                    for (h, a) in acc.iter_mut().enumerate() {
                        let pv = _mm256_set1_ps(*sp.add((j * M + h) * ctx + p));
                        a[0] = _mm256_fmadd_ps(pv, v0, a[0]);
                        a[1] = _mm256_fmadd_ps(pv, v1, a[1]);
                    }
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
