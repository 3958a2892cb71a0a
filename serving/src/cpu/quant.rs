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

/// Rows packed together: the kernels produce this many output features at once.
pub(crate) const ROWS: usize = 16;

/// Bytes of one interleaved line: four values of each of the [`ROWS`] rows.
pub(crate) const LINE: usize = 4 * ROWS;

/// A quantized matrix as plain per-row arrays, one byte per value (the unsigned 4-bit quant,
/// or the signed 8-bit one). Loading and stacking work on this form; [`QMatrix::pack`] turns it
/// into the kernels' layout.
#[derive(Debug, Clone)]
pub(crate) struct PlainQ {
    pub(crate) qtype: QType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Scale per block, row-major.
    pub(crate) d: Vec<f32>,
    /// Offset term per block (see the module docs); empty for Q8_0.
    pub(crate) c: Vec<f32>,
    /// One byte per value, row-major.
    pub(crate) q: Vec<u8>,
}

impl PlainQ {
    /// Reads GGML blocks (`rows × cols / 32` of them, row-major).
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
        let mut m = Self {
            qtype,
            rows,
            cols,
            d: Vec::with_capacity(blocks),
            c: Vec::with_capacity(if qtype == QType::Q8_0 { 0 } else { blocks }),
            q: Vec::with_capacity(rows * cols),
        };
        for block in raw.chunks_exact(bb) {
            let scale = f16_at(block, 0);
            m.d.push(scale);
            let packed = match qtype {
                QType::Q4_0 => {
                    m.c.push(-8.0 * scale);
                    &block[2..]
                }
                QType::Q4_1 => {
                    m.c.push(f16_at(block, 2));
                    &block[4..]
                }
                QType::Q8_0 => {
                    m.q.extend_from_slice(&block[2..]);
                    continue;
                }
            };
            // GGML: byte j holds value j (low nibble) and value j + 16 (high nibble).
            m.q.extend(packed.iter().map(|b| b & 15));
            m.q.extend(packed.iter().map(|b| b >> 4));
        }
        Ok(m)
    }

    /// Quantizes f32 rows the way GGML's reference quantizers do (tests).
    #[cfg(test)]
    pub(crate) fn quantize(qtype: QType, rows: usize, cols: usize, values: &[f32]) -> Self {
        let mut m = Self {
            qtype,
            rows,
            cols,
            d: Vec::new(),
            c: Vec::new(),
            q: Vec::with_capacity(rows * cols),
        };
        for block in values.chunks_exact(QK).take(rows * cols / QK) {
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
                    m.q.extend(
                        block
                            .iter()
                            .map(|v| ((v * id + 8.5) as i32).clamp(0, 15) as u8),
                    );
                }
                QType::Q4_1 => {
                    let lo = block.iter().copied().fold(f32::INFINITY, f32::min);
                    let hi = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let dd = round_f16((hi - lo) / 15.0);
                    let id = if dd == 0.0 { 0.0 } else { 1.0 / dd };
                    m.d.push(dd);
                    m.c.push(round_f16(lo));
                    m.q.extend(
                        block
                            .iter()
                            .map(|v| (((v - lo) * id + 0.5) as i32).clamp(0, 15) as u8),
                    );
                }
                QType::Q8_0 => {
                    let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let dd = round_f16(amax / 127.0);
                    let id = if dd == 0.0 { 0.0 } else { 1.0 / dd };
                    m.d.push(dd);
                    m.q.extend(
                        block
                            .iter()
                            .map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
            }
        }
        m
    }

    /// `rows×cols format`, for messages.
    fn shape(&self) -> String {
        format!("{}x{} {}", self.rows, self.cols, self.qtype.name())
    }

    /// Stacks the rows of matrices of the same format and width.
    pub(crate) fn stack(parts: Vec<Self>) -> Result<Self, LayoutError> {
        let mut it = parts.into_iter();
        let Some(mut m) = it.next() else {
            return Err(LayoutError("nothing to stack".into()));
        };
        for p in it {
            if p.qtype != m.qtype || p.cols != m.cols {
                return Err(LayoutError(format!(
                    "cannot stack a {} matrix under a {} one",
                    p.shape(),
                    m.shape()
                )));
            }
            m.rows += p.rows;
            m.d.extend(p.d);
            m.c.extend(p.c);
            m.q.extend(p.q);
        }
        Ok(m)
    }

    /// `a` and `b` (same format and shape) as one matrix whose rows alternate in runs of `run`:
    /// rows `0..run` of `a`, then `0..run` of `b`, then `run..2·run` of `a`, and so on. A
    /// product with it puts the same runs of both side by side in every output row.
    pub(crate) fn interleave(a: &Self, b: &Self, run: usize) -> Result<Self, LayoutError> {
        if a.qtype != b.qtype || a.rows != b.rows || a.cols != b.cols {
            return Err(LayoutError(format!(
                "cannot pair a {} matrix with a {} one",
                a.shape(),
                b.shape()
            )));
        }
        if run == 0 || !a.rows.is_multiple_of(run) {
            return Err(LayoutError(format!(
                "{} rows do not split into runs of {run}",
                a.rows
            )));
        }
        let nb = a.cols / QK;
        let mut m = Self {
            qtype: a.qtype,
            rows: 2 * a.rows,
            cols: a.cols,
            d: Vec::with_capacity(2 * a.d.len()),
            c: Vec::with_capacity(2 * a.c.len()),
            q: Vec::with_capacity(2 * a.q.len()),
        };
        for r0 in (0..a.rows).step_by(run) {
            for src in [a, b] {
                m.d.extend_from_slice(&src.d[r0 * nb..(r0 + run) * nb]);
                if !src.c.is_empty() {
                    m.c.extend_from_slice(&src.c[r0 * nb..(r0 + run) * nb]);
                }
                m.q.extend_from_slice(&src.q[r0 * a.cols..(r0 + run) * a.cols]);
            }
        }
        Ok(m)
    }
}

/// A `rows × cols` weight matrix (one row per output feature) in the kernels' layout: rows in
/// groups of [`ROWS`] (16; the last group padded with zero rows), and within a group and a
/// block, the values interleaved so that one 64-byte line holds four consecutive values of
/// each of the sixteen rows. A kernel multiplies that line (or, on AVX2, each 32-byte half of
/// it, eight rows) by four activation bytes broadcast to every lane, and the lanes of its
/// integer result are the rows' partial dot products: no horizontal sums, and one scale
/// multiply serves every row of the line.
///
/// Per group `g` and block `b` (index `gb = g·nb + b`):
/// - `d[gb·16 + r]`: scale of row `16g + r` as f16 bits (GGML's own precision, so scales cost
///   the same memory traffic as in the file); `c[gb·16 + r]`: Q4_1's minimum, likewise (Q4_0's
///   offset `−8·d` is computed, Q8_0 has none);
/// - 4-bit: `qs[gb·256 ..][64·j + 4·r + e]` holds value `8j + e` of row `16g + r` in its low
///   nibble and value `8j + 4 + e` in its high nibble (`j < 4`, `e < 4`);
/// - 8-bit: `qs[gb·512 ..][64·k + 4·r + e]` holds value `4k + e` (`k < 8`).
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    pub(crate) qtype: QType,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    /// Blocks per row (`cols / 32`).
    pub(crate) nb: usize,
    pub(crate) d: Vec<u16>,
    /// Q4_1 only.
    pub(crate) c: Vec<u16>,
    pub(crate) qs: Vec<u8>,
}

impl QMatrix {
    /// Bytes of quants per (group, block).
    pub(crate) fn group_block_bytes(qtype: QType) -> usize {
        ROWS * qtype.quant_bytes()
    }

    /// Interleaves a plain matrix into the kernels' layout.
    pub(crate) fn pack(p: &PlainQ) -> Self {
        let nb = p.cols / QK;
        let groups = p.rows.div_ceil(ROWS);
        let gbb = Self::group_block_bytes(p.qtype);
        let four_bit = p.qtype != QType::Q8_0;
        let mins = p.qtype == QType::Q4_1;
        let mut m = Self {
            qtype: p.qtype,
            rows: p.rows,
            cols: p.cols,
            nb,
            d: vec![0; groups * nb * ROWS],
            c: if mins {
                vec![0; groups * nb * ROWS]
            } else {
                Vec::new()
            },
            qs: vec![0; groups * nb * gbb],
        };
        for r in 0..p.rows {
            let (g, lane) = (r / ROWS, r % ROWS);
            let row = &p.q[r * p.cols..(r + 1) * p.cols];
            for (b, src) in row.chunks_exact(QK).enumerate() {
                let gb = g * nb + b;
                m.d[gb * ROWS + lane] = f16::from_f32(p.d[r * nb + b]).to_bits();
                if mins {
                    m.c[gb * ROWS + lane] = f16::from_f32(p.c[r * nb + b]).to_bits();
                }
                let dst = &mut m.qs[gb * gbb..(gb + 1) * gbb];
                if four_bit {
                    for j in 0..4 {
                        let at = LINE * j + 4 * lane;
                        for e in 0..4 {
                            dst[at + e] = (src[8 * j + e] & 15) | ((src[8 * j + 4 + e] & 15) << 4);
                        }
                    }
                } else {
                    for k in 0..8 {
                        dst[LINE * k + 4 * lane..LINE * k + 4 * lane + 4]
                            .copy_from_slice(&src[4 * k..4 * k + 4]);
                    }
                }
            }
        }
        m
    }

    /// Value `k` of row `r` as stored: the unsigned 4-bit quant, or the signed 8-bit one.
    pub(crate) fn value(&self, r: usize, k: usize) -> i32 {
        let (g, lane) = (r / ROWS, r % ROWS);
        let (b, kk) = (k / QK, k % QK);
        let gb = g * self.nb + b;
        let gbb = Self::group_block_bytes(self.qtype);
        let block = &self.qs[gb * gbb..(gb + 1) * gbb];
        let (grp, e) = (kk / 4, kk % 4);
        match self.qtype {
            QType::Q4_0 | QType::Q4_1 => {
                let byte = block[LINE * (grp / 2) + 4 * lane + e];
                i32::from(if grp % 2 == 0 { byte & 15 } else { byte >> 4 })
            }
            QType::Q8_0 => i32::from(block[LINE * grp + 4 * lane + e] as i8),
        }
    }

    /// Scale and offset term of block `b` of row `r`.
    pub(crate) fn scales(&self, r: usize, b: usize) -> (f32, f32) {
        let i = ((r / ROWS) * self.nb + b) * ROWS + r % ROWS;
        let d = f16::from_bits(self.d[i]).to_f32();
        let c = match self.qtype {
            QType::Q4_0 => -8.0 * d,
            QType::Q4_1 => f16::from_bits(self.c[i]).to_f32(),
            QType::Q8_0 => 0.0,
        };
        (d, c)
    }

    /// Writes row `r` as f32 into `out` (length `cols`); used for embedding lookups.
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for b in 0..self.nb {
            let (d, c) = self.scales(r, b);
            for k in 0..QK {
                out[b * QK + k] = d * self.value(r, b * QK + k) as f32 + c;
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

/// `rows` activation rows of `cols` values quantized to 8 bits per block of 32, stored
/// block-major: block `b` of every row comes before block `b + 1` of any, so entry `(a, b)`
/// sits at index [`QActs::at`]`(a, b) = b·rows + a` of `d`, `s` and `sums` and its 32 quants at
/// `qs[32·at(a, b)..]`. A kernel multiplying one weight block by a tile of activation rows then
/// finds the tile's bytes and scales at fixed offsets from one pointer, and a block range of all
/// rows is one contiguous piece, which is how quantization splits across threads.
#[derive(Debug, Clone, Default)]
pub(crate) struct QActs {
    pub(crate) rows: usize,
    pub(crate) nb: usize,
    /// Scale per block (f16-rounded).
    pub(crate) d: Vec<f32>,
    /// `d · Σ q` per block (see [`quantize_block`]).
    pub(crate) s: Vec<f32>,
    /// `Σ q` per block, exact (the AVX-512 kernel's offset for 8-bit weights).
    pub(crate) sums: Vec<i32>,
    pub(crate) qs: Vec<i8>,
}

impl QActs {
    /// Resizes the buffers for `rows × cols` (keeps the allocation).
    pub(crate) fn reset(&mut self, rows: usize, cols: usize) {
        self.rows = rows;
        self.nb = cols / QK;
        self.d.resize(rows * self.nb, 0.0);
        self.s.resize(rows * self.nb, 0.0);
        self.sums.resize(rows * self.nb, 0);
        self.qs.resize(rows * cols, 0);
    }

    /// Index of block `b` of row `a` in `d`, `s` and `sums` (its quants start at 32 times it).
    #[inline]
    pub(crate) fn at(&self, a: usize, b: usize) -> usize {
        b * self.rows + a
    }

    /// Quantizes one row in place (tests; the forward pass fills [`BlockSpan`]s). `round_sum`
    /// mirrors GGML's Q8_1 (which stores the block sum in f16, used with Q4_1 weights); Q8_0
    /// activations keep it exact.
    #[cfg(test)]
    pub(crate) fn quantize_row(&mut self, row: usize, x: &[f32], round_sum: bool) {
        for b in 0..self.nb {
            let j = self.at(row, b);
            let src = &x[b * QK..(b + 1) * QK];
            let dst = &mut self.qs[j * QK..(j + 1) * QK];
            let (d, s, sum) = quantize_block(src, dst, round_sum);
            self.d[j] = d;
            self.s[j] = s;
            self.sums[j] = sum;
        }
    }

    /// The buffers of consecutive runs of `blocks_per_span` blocks of every row, each for one
    /// thread to fill (see [`BlockSpan::fill`]); the spans never overlap.
    pub(crate) fn spans(&mut self, blocks_per_span: usize) -> Vec<BlockSpan<'_>> {
        let per = blocks_per_span.max(1);
        let n = self.rows * per;
        let rows = self.rows;
        let mut out = Vec::new();
        if n == 0 {
            return out;
        }
        let parts = self
            .qs
            .chunks_mut(n * QK)
            .zip(self.d.chunks_mut(n))
            .zip(self.s.chunks_mut(n))
            .zip(self.sums.chunks_mut(n));
        for (i, (((qs, d), s), sums)) in parts.enumerate() {
            out.push(BlockSpan {
                rows,
                b0: i * per,
                qs,
                d,
                s,
                sums,
            });
        }
        out
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

/// Blocks `b0..` of every row of a [`QActs`] (as many as its buffers hold), lent to one thread.
#[derive(Debug)]
pub(crate) struct BlockSpan<'a> {
    rows: usize,
    /// The first block of the span.
    b0: usize,
    qs: &'a mut [i8],
    d: &'a mut [f32],
    s: &'a mut [f32],
    sums: &'a mut [i32],
}

impl BlockSpan<'_> {
    /// Blocks in the span.
    fn blocks(&self) -> usize {
        self.d.len() / self.rows.max(1)
    }

    /// Quantizes every row's blocks of the span: `src(a, b, buf)` writes the 32 values of block
    /// `b` of row `a` (with whatever transform the caller fuses in) into `buf`.
    pub(crate) fn fill(
        &mut self,
        round_sum: bool,
        src: &(dyn Fn(usize, usize, &mut [f32; QK]) + Sync),
    ) {
        let mut buf = [0f32; QK];
        for k in 0..self.blocks() {
            for a in 0..self.rows {
                src(a, self.b0 + k, &mut buf);
                let j = k * self.rows + a;
                let dst = &mut self.qs[j * QK..(j + 1) * QK];
                let (d, s, sum) = quantize_block(&buf, dst, round_sum);
                self.d[j] = d;
                self.s[j] = s;
                self.sums[j] = sum;
            }
        }
    }
}

/// Quantizes one block: scale `amax/127` (stored f16-rounded), values rounded half to even
/// after scaling by `127/amax`, as GGML's vectorised quantizer does. Returns `(d, d·Σq, Σq)`.
/// Runs on the detected instruction set ([`super::kernels::quantize_block`]); every path
/// gives the same bits as [`block_scales`] over [`super::kernels::quantize_ints`].
pub(crate) fn quantize_block(src: &[f32], dst: &mut [i8], round_sum: bool) -> (f32, f32, i32) {
    super::kernels::quantize_block(src, dst, round_sum)
}

/// A block's stored scale and sum term from its `amax` and `Σq`: `(round_f16(amax/127), s)`.
pub(crate) fn block_scales(amax: f32, sum: i32, round_sum: bool) -> (f32, f32) {
    let d = amax / 127.0;
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
    let mut total = 0f32;
    for b in 0..w.nb {
        let j = x.at(a, b);
        let y = &x.qs[j * QK..(j + 1) * QK];
        let (d, c) = w.scales(r, b);
        let mut s = 0i32;
        for (k, yk) in y.iter().enumerate() {
            let v = w.value(r, b * QK + k);
            let v = if w.qtype == QType::Q4_0 { v - 8 } else { v };
            s += v * i32::from(*yk);
        }
        total += d * x.d[j] * s as f32;
        if w.qtype == QType::Q4_1 {
            total += c * x.s[j];
        }
    }
    total
}
