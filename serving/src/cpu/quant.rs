//! Block-quantized weight matrices in the layout our kernels read, 8-bit activations quantized
//! on the fly, and the plain scalar arithmetic every SIMD kernel is tested against.
//!
//! All three weight formats store blocks of 32 values with one scale `d` (GGML's Q4_0, Q4_1
//! and Q8_0). At load, [`QMatrix::from_ggml`] splits GGML's interleaved blocks into three flat
//! arrays: the scales as f32, a per-block offset `c`, and the packed quants. The kernels then
//! compute, for a weight row `w` and an activation row `a` quantized as `(da, qa)` per block,
//!
//! ```text
//! dot(w, a) = Σ_blocks  dw·da·Σ_j uw_j·qa_j  +  cw·sa
//! ```
//!
//! where `uw` are the *unsigned* stored quants (0..15 for the 4-bit formats) and `sa = da·Σ qa`.
//! Q4_1 stores `w = dw·u + m`, so `cw = m`; Q4_0 stores `w = dw·(u − 8)`, so `cw = −8·dw`;
//! Q8_0's quants are signed and `cw` is unused. Folding the offset into one float term per
//! block keeps the inner loop a pure unsigned×signed byte product for every format.

use half::f16;

/// Values per quantization block.
pub(crate) const QK: usize = 32;

/// The weight formats the CPU kernels multiply directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QType {
    /// 4-bit, `w = d·(u − 8)`.
    Q4_0,
    /// 4-bit with a minimum, `w = d·u + m`.
    Q4_1,
    /// 8-bit signed, `w = d·q`.
    Q8_0,
}

impl QType {
    /// Bytes of one block in a GGUF file.
    pub(crate) fn ggml_block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + QK / 2,
            Self::Q4_1 => 4 + QK / 2,
            Self::Q8_0 => 2 + QK,
        }
    }

    /// Bytes of one block's quants in our layout.
    pub(crate) fn quant_bytes(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 => QK / 2,
            Self::Q8_0 => QK,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q8_0 => "Q8_0",
        }
    }
}

/// Why raw bytes could not become a [`QMatrix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LayoutError(pub(crate) String);

/// A `rows × cols` weight matrix (one row per output feature) in our split layout.
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    pub(crate) qtype: QType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Blocks per row (`cols / 32`).
    pub(crate) nb: usize,
    /// Scale of every block, row-major.
    pub(crate) d: Vec<f32>,
    /// Per-block offset term (see the module docs); empty for Q8_0.
    pub(crate) c: Vec<f32>,
    /// Packed quants, `quant_bytes()` per block, row-major. For the 4-bit formats byte `j` of a
    /// block holds value `j` in its low nibble and value `j + 16` in its high nibble.
    pub(crate) qs: Vec<u8>,
}

impl QMatrix {
    /// Splits GGML blocks (`rows × cols / 32` of them, row-major) into our layout.
    pub(crate) fn from_ggml(
        qtype: QType,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> Result<Self, LayoutError> {
        if rows == 0 || cols == 0 || !cols.is_multiple_of(QK) {
            return Err(LayoutError(format!(
                "a {rows}x{cols} {} matrix: columns must be a positive multiple of {QK}",
                qtype.name()
            )));
        }
        let nb = cols / QK;
        let bb = qtype.ggml_block_bytes();
        let want = rows
            .checked_mul(nb)
            .and_then(|b| b.checked_mul(bb))
            .ok_or_else(|| LayoutError(format!("a {rows}x{cols} matrix overflows usize")))?;
        if raw.len() != want {
            return Err(LayoutError(format!(
                "a {rows}x{cols} {} matrix needs {want} bytes, got {}",
                qtype.name(),
                raw.len()
            )));
        }
        let blocks = rows * nb;
        let qb = qtype.quant_bytes();
        let mut d = Vec::with_capacity(blocks);
        let mut c = Vec::with_capacity(if qtype == QType::Q8_0 { 0 } else { blocks });
        let mut qs = Vec::with_capacity(blocks * qb);
        for block in raw.chunks_exact(bb) {
            let scale = f16_at(block, 0);
            d.push(scale);
            match qtype {
                QType::Q4_0 => {
                    c.push(-8.0 * scale);
                    qs.extend_from_slice(&block[2..]);
                }
                QType::Q4_1 => {
                    c.push(f16_at(block, 2));
                    qs.extend_from_slice(&block[4..]);
                }
                QType::Q8_0 => qs.extend_from_slice(&block[2..]),
            }
        }
        Ok(Self {
            qtype,
            rows,
            cols,
            nb,
            d,
            c,
            qs,
        })
    }

    /// Builds a matrix by quantizing f32 rows (tests).
    #[cfg(test)]
    pub(crate) fn quantize(qtype: QType, rows: usize, cols: usize, values: &[f32]) -> Self {
        let nb = cols / QK;
        let qb = qtype.quant_bytes();
        let mut m = Self {
            qtype,
            rows,
            cols,
            nb,
            d: Vec::with_capacity(rows * nb),
            c: Vec::new(),
            qs: Vec::with_capacity(rows * nb * qb),
        };
        for block in values.chunks_exact(QK).take(rows * nb) {
            match qtype {
                QType::Q4_0 => {
                    let amax = block
                        .iter()
                        .copied()
                        .fold(0f32, |a, v| if v.abs() > a.abs() { v } else { a });
                    let dd = round_f16(amax / -8.0);
                    let id = if dd == 0.0 { 0.0 } else { 1.0 / dd };
                    m.d.push(dd);
                    m.c.push(-8.0 * dd);
                    let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                    for j in 0..QK / 2 {
                        m.qs.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
                    }
                }
                QType::Q4_1 => {
                    let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let dd = round_f16((hi - lo) / 15.0);
                    let id = if dd == 0.0 { 0.0 } else { 1.0 / dd };
                    m.d.push(dd);
                    m.c.push(round_f16(lo));
                    let q = |v: f32| (((v - lo) * id + 0.5) as i32).clamp(0, 15) as u8;
                    for j in 0..QK / 2 {
                        m.qs.push(q(block[j]) | (q(block[j + QK / 2]) << 4));
                    }
                }
                QType::Q8_0 => {
                    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let dd = round_f16(amax / 127.0);
                    let id = if dd == 0.0 { 0.0 } else { 1.0 / dd };
                    m.d.push(dd);
                    for &v in block {
                        m.qs.push((v * id).round().clamp(-127.0, 127.0) as i8 as u8);
                    }
                }
            }
        }
        m
    }

    /// Writes row `r` as f32 into `out` (length `cols`); used for embedding lookups.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let qb = self.qtype.quant_bytes();
        for b in 0..self.nb {
            let i = r * self.nb + b;
            let q = &self.qs[i * qb..(i + 1) * qb];
            let o = &mut out[b * QK..(b + 1) * QK];
            let d = self.d[i];
            match self.qtype {
                QType::Q4_0 | QType::Q4_1 => {
                    let c = self.c[i];
                    for j in 0..QK / 2 {
                        o[j] = d * f32::from(q[j] & 15) + c;
                        o[j + QK / 2] = d * f32::from(q[j] >> 4) + c;
                    }
                }
                QType::Q8_0 => {
                    for j in 0..QK {
                        o[j] = d * f32::from(q[j] as i8);
                    }
                }
            }
        }
    }
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// Rounds through f16 and back (round to nearest even), as GGML stores its scales.
pub(crate) fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `rows` activation rows of `cols` values quantized to 8 bits per block of 32.
#[derive(Debug, Clone, Default)]
pub(crate) struct QActs {
    pub(crate) rows: usize,
    pub(crate) nb: usize,
    /// Scale per block (f16-rounded), row-major.
    pub(crate) d: Vec<f32>,
    /// `d · Σ q` per block (see [`quantize_block`]), row-major.
    pub(crate) s: Vec<f32>,
    pub(crate) qs: Vec<i8>,
}

impl QActs {
    /// Resizes the buffers for `rows × cols` (keeps the allocation).
    pub(crate) fn reset(&mut self, rows: usize, cols: usize) {
        self.rows = rows;
        self.nb = cols / QK;
        self.d.resize(rows * self.nb, 0.0);
        self.s.resize(rows * self.nb, 0.0);
        self.qs.resize(rows * cols, 0);
    }

    /// Quantizes one row in place. `round_sum` mirrors GGML's Q8_1 (which stores the block sum
    /// in f16, used with Q4_1 weights); Q8_0 activations keep it exact.
    pub(crate) fn quantize_row(&mut self, row: usize, x: &[f32], round_sum: bool) {
        let nb = self.nb;
        for b in 0..nb {
            let src = &x[b * QK..(b + 1) * QK];
            let dst = &mut self.qs[(row * nb + b) * QK..(row * nb + b + 1) * QK];
            let (d, s) = quantize_block(src, dst, round_sum);
            self.d[row * nb + b] = d;
            self.s[row * nb + b] = s;
        }
    }

    /// Quantizes `rows` rows of `cols` values.
    #[cfg(test)]
    pub(crate) fn quantize(x: &[f32], rows: usize, cols: usize, round_sum: bool) -> Self {
        let mut a = Self::default();
        a.reset(rows, cols);
        for r in 0..rows {
            a.quantize_row(r, &x[r * cols..(r + 1) * cols], round_sum);
        }
        a
    }
}

/// Quantizes one block: scale `amax/127` (stored f16-rounded), values rounded half to even
/// after scaling by `127/amax`, as GGML's vectorised quantizer does. Returns `(d, d·Σq)`.
pub(crate) fn quantize_block(src: &[f32], dst: &mut [i8], round_sum: bool) -> (f32, f32) {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in dst.iter_mut().zip(src) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    let dr = round_f16(d);
    // Q8_1 keeps GGML's f16 `d·Σq` (unrounded `d`); otherwise the sum serves the Q4_0 offset
    // term, which must use the same rounded scale as the main product to stay exact.
    let s = if round_sum {
        round_f16(d * sum as f32)
    } else {
        dr * sum as f32
    };
    (dr, s)
}

/// Whether activations for weights of this type keep an f16-rounded block sum (GGML pairs
/// Q4_1 with Q8_1, the others with Q8_0).
pub(crate) fn rounds_sum(qtype: QType) -> bool {
    qtype == QType::Q4_1
}

#[cfg(test)]
/// The reference dot product of weight row `r` with activation row `a`: plain scalar code in
/// GGML's order of operations, the oracle for every kernel.
pub(crate) fn dot_ref(w: &QMatrix, r: usize, x: &QActs, a: usize) -> f32 {
    let qb = w.qtype.quant_bytes();
    let mut total = 0f32;
    for b in 0..w.nb {
        let i = r * w.nb + b;
        let j = a * x.nb + b;
        let q = &w.qs[i * qb..(i + 1) * qb];
        let y = &x.qs[j * QK..(j + 1) * QK];
        let part = match w.qtype {
            QType::Q4_0 => {
                let mut s = 0i32;
                for k in 0..QK / 2 {
                    s += (i32::from(q[k] & 15) - 8) * i32::from(y[k]);
                    s += (i32::from(q[k] >> 4) - 8) * i32::from(y[k + QK / 2]);
                }
                w.d[i] * x.d[j] * s as f32
            }
            QType::Q4_1 => {
                let mut s = 0i32;
                for k in 0..QK / 2 {
                    s += i32::from(q[k] & 15) * i32::from(y[k]);
                    s += i32::from(q[k] >> 4) * i32::from(y[k + QK / 2]);
                }
                w.d[i] * x.d[j] * s as f32 + w.c[i] * x.s[j]
            }
            QType::Q8_0 => {
                let mut s = 0i32;
                for k in 0..QK {
                    s += i32::from(q[k] as i8) * i32::from(y[k]);
                }
                w.d[i] * x.d[j] * s as f32
            }
        };
        total += part;
    }
    total
}
