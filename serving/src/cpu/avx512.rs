//! AVX-512 VNNI kernels for the quantized matrix products (x86-64 with AVX-512 F, BW and
//! VNNI). Everything else the forward pass needs (quantization, exp, the f16 helpers,
//! attention) stays on the AVX2 code, which every such CPU also runs.
//!
//! One 64-byte line of [`QMatrix`]'s layout holds four consecutive values of each of a
//! group's sixteen rows, so one `vpdpbusd` against four broadcast activation bytes adds four
//! products into each row's 32-bit lane: a whole group's partial dot products in one
//! instruction, with no widening steps in between (AVX2 needs `vpmaddubsw`, an add and a
//! `vpmaddwd` for half as many rows). `vpdpbusd` multiplies unsigned by signed bytes: the 4-bit
//! quants are unsigned already, and 8-bit weights are made unsigned by flipping their sign bit
//! (`w + 128`), the excess `128·Σa` subtracted exactly from the integer sum through the
//! activations' block sums ([`QActs::sums`]).
//!
//! Each function is compiled for those CPU features, so calling it is `unsafe` wherever they
//! are not statically known: callers reach them only through [`super::kernels`] after run-time
//! detection. Memory accesses are bounds-checked per slice or guarded by the loop bounds next
//! to each `unsafe` load.

use std::arch::x86_64::*;

use super::kernels::Dst;
use super::quant::{LINE, QActs, QK, QMatrix, QType, ROWS};

/// How far ahead of the block being multiplied the kernel prefetches weights, in bytes (as on
/// AVX2: decode streams every weight from memory once).
const PREFETCH_BYTES: usize = 2048;

/// Activation rows multiplied per pass over a group's weights. Each weight line is loaded and
/// unpacked once per pass, so wider tiles spend fewer instructions per product; six keeps the
/// accumulators, the unpacked block and the constants within the 32 vector registers.
const TILE: usize = 6;
// `rows_for` spells out the remainders below a full tile.
const _: () = assert!(TILE == 6);

/// Four activation bytes `4k..4k + 4` of a block, broadcast to all sixteen lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn bcast(a: &[i8; QK], k: usize) -> __m512i {
    let b = &a[4 * k..4 * k + 4];
    _mm512_set1_epi32(i32::from_le_bytes([
        b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8,
    ]))
}

/// Row group `g` (sixteen output features) times activation rows `a0..a0 + C`: the sixteen
/// dot products for each of the `C` activation rows. Slices are bounds-checked once per call;
/// `super::kernels` checks shapes before calling.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn group<const C: usize, const NIBBLES: bool>(
    w: &QMatrix,
    g: usize,
    x: &QActs,
    a0: usize,
) -> [[f32; ROWS]; C] {
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
    // Activations are block-major: entry `(a, b)` is at `b·t + a` (see `QActs::at`).
    let t = x.rows;
    let xq = x.qs[..nb * t * QK].as_chunks::<QK>().0;
    let (xd, xs, xsum) = (&x.d[..nb * t], &x.s[..nb * t], &x.sums[..nb * t]);
    let low = _mm512_set1_epi8(0x0f);
    let flip = _mm512_set1_epi8(i8::MIN);
    let minus8 = _mm512_set1_ps(-8.0);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); C];
    for b in 0..nb {
        let blk = &wq[b * gbb..(b + 1) * gbb];
        // A hint only: addresses past the end are never dereferenced.
        let ahead = wq.as_ptr().wrapping_add(b * gbb + PREFETCH_BYTES);
        for line in (0..gbb).step_by(LINE) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line).cast());
        }
        let sc = &wd[b * ROWS..(b + 1) * ROWS];
        // SAFETY: `sc` holds exactly 16 f16 values (32 bytes).
        let dv = unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(sc.as_ptr().cast())) };
        let mut wv = [zero; 8];
        if NIBBLES {
            for j in 0..4 {
                let line = &blk[LINE * j..LINE * (j + 1)];
                // SAFETY: `line` holds exactly 64 bytes.
                let raw = unsafe { _mm512_loadu_si512(line.as_ptr().cast()) };
                wv[2 * j] = _mm512_and_si512(raw, low);
                wv[2 * j + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
            }
        } else {
            for (k, v) in wv.iter_mut().enumerate() {
                let line = &blk[LINE * k..LINE * (k + 1)];
                // SAFETY: `line` holds exactly 64 bytes.
                let raw = unsafe { _mm512_loadu_si512(line.as_ptr().cast()) };
                *v = _mm512_xor_si512(raw, flip);
            }
        }
        let cv = if !NIBBLES {
            _mm512_setzero_ps()
        } else if mins {
            let cs = &wc[b * ROWS..(b + 1) * ROWS];
            // SAFETY: `cs` holds exactly 16 f16 values (32 bytes).
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(cs.as_ptr().cast())) }
        } else {
            _mm512_mul_ps(dv, minus8)
        };
        for (c, acc) in acc.iter_mut().enumerate() {
            let j = b * t + a0 + c;
            let a = &xq[j];
            // 8-bit weights were offset by +128: start the sum at −128·Σa so it ends exact.
            // Every partial sum stays far inside i32 (32 products of at most 255·128).
            let init = if NIBBLES {
                zero
            } else {
                _mm512_set1_epi32(-128 * xsum[j])
            };
            // Two chains of four, so consecutive `vpdpbusd`s do not wait on each other.
            let mut lo = _mm512_dpbusd_epi32(init, wv[0], bcast(a, 0));
            let mut hi = _mm512_dpbusd_epi32(zero, wv[1], bcast(a, 1));
            for k in (2..8).step_by(2) {
                lo = _mm512_dpbusd_epi32(lo, wv[k], bcast(a, k));
                hi = _mm512_dpbusd_epi32(hi, wv[k + 1], bcast(a, k + 1));
            }
            let f = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
            *acc = _mm512_fmadd_ps(_mm512_mul_ps(f, dv), _mm512_set1_ps(xd[j]), *acc);
            if NIBBLES {
                *acc = _mm512_fmadd_ps(cv, _mm512_set1_ps(xs[j]), *acc);
            }
        }
    }
    let mut out = [[0f32; ROWS]; C];
    for c in 0..C {
        // SAFETY: `out[c]` is an array of 16 floats.
        unsafe { _mm512_storeu_ps(out[c].as_mut_ptr(), acc[c]) };
    }
    out
}

/// Rows `r0..r1` of `w` (`r0` a multiple of 16) times every activation row, written through
/// `dst`. Callable only where AVX-512 F, BW and VNNI, AVX2, FMA and F16C are known to exist,
/// with shapes checked, by a caller that owns rows `r0..r1` of `dst` (see [`Dst::put`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn matmul_rows(w: &QMatrix, x: &QActs, r0: usize, r1: usize, dst: &Dst) {
    match w.qtype {
        QType::Q4_0 | QType::Q4_1 => rows_for::<true>(w, x, r0, r1, dst),
        QType::Q8_0 => rows_for::<false>(w, x, r0, r1, dst),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn rows_for<const NIBBLES: bool>(w: &QMatrix, x: &QActs, r0: usize, r1: usize, dst: &Dst) {
    let t = x.rows;
    // SAFETY: `matmul_rows`'s caller owns rows `r0..r1`, and every group below is in them.
    let put = |g: usize, a0: usize, res: &[[f32; ROWS]]| unsafe { dst.put(g * ROWS, r1, a0, res) };
    for g in r0 / ROWS..r1.div_ceil(ROWS) {
        let mut a = 0;
        while a + TILE <= t {
            put(g, a, &group::<TILE, NIBBLES>(w, g, x, a));
            a += TILE;
        }
        match t - a {
            0 => {}
            1 => put(g, a, &group::<1, NIBBLES>(w, g, x, a)),
            2 => put(g, a, &group::<2, NIBBLES>(w, g, x, a)),
            3 => put(g, a, &group::<3, NIBBLES>(w, g, x, a)),
            4 => put(g, a, &group::<4, NIBBLES>(w, g, x, a)),
            _ => put(g, a, &group::<5, NIBBLES>(w, g, x, a)),
        }
    }
}
