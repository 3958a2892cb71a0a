//! CPU reference implementations of the CUDA kernels in `serving/kernels/`: the exact semantics
//! each kernel implements, the CPU path of the candle ops, and the oracle of `gpu_check`.
//!
//! Every function validates its inputs first and returns a typed error, so a bad shape or a
//! block table pointing outside the cache never reaches a kernel. Values travel as `f32`; with
//! [`Dtype::Bf16`], inputs are rounded to bf16 on entry and every output is rounded to bf16, as
//! the bf16 kernels load and store them (they compute in f32 in between).

use std::collections::HashSet;

use crate::error::{Error, Result};

/// The element type a kernel runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Dtype {
    /// 32-bit floats throughout.
    F32,
    /// bfloat16 in memory, f32 arithmetic.
    Bf16,
}

impl Dtype {
    /// Rounds `x` to this dtype (round to nearest, ties to even) and back to `f32`.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Self::F32 => x,
            Self::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    fn round_all(self, xs: &[f32]) -> Vec<f32> {
        xs.iter().map(|x| self.round(*x)).collect()
    }
}

/// Extra rounding a kernel applies to the values it produces, before storing them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Rounding {
    /// Values are stored as computed.
    #[default]
    None,
    /// Values are rounded through f16, as the engine does to K, V, Q and attention
    /// probabilities for parity with llama.cpp, which stores them in f16.
    F16,
}

impl Rounding {
    /// Applies the rounding to one value.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Self::None => x,
            Self::F16 => half::f16::from_f32(x).to_f32(),
        }
    }

    /// The code the kernels take for this rounding.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn code(self) -> i32 {
        match self {
            Self::None => 0,
            Self::F16 => 1,
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RopeStyle {
    /// Adjacent pairs `(2i, 2i + 1)` (llama.cpp's GGUF layout).
    Interleaved,
    /// Halves `(i, i + head_dim / 2)` (Hugging Face checkpoints, Qwen2).
    Halves,
}

impl RopeStyle {
    /// The code the kernels take for this style.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn code(self) -> i32 {
        match self {
            Self::Interleaved => 0,
            Self::Halves => 1,
        }
    }
}

/// The largest head dimension the attention kernel supports (8 values per lane of a warp).
pub const MAX_HEAD_DIM: usize = 256;

pub(crate) fn input_error(kernel: &'static str, reason: String) -> Error {
    Error::KernelInput { kernel, reason }
}

/// Fused residual add and RMSNorm over rows of `weight.len()` values.
///
/// For each row, `sum = round(x + delta)` and
/// `normed = round(sum * (1 / sqrt(mean(sum²) + eps)) * weight)`, where `round` is the dtype's
/// rounding; the norm is taken of the residual as stored. Returns `(sum, normed)`, each the
/// length of `x`.
///
/// # Errors
/// [`Error::KernelInput`] when `weight` is empty, `x` is not a whole number of rows, `delta`
/// differs in length from `x`, or `eps` is negative or not finite.
pub fn rms_norm_residual(
    dtype: Dtype,
    x: &[f32],
    delta: &[f32],
    weight: &[f32],
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_rms_norm(x.len(), delta.len(), weight.len(), eps)?;
    let hidden = weight.len();
    let w = dtype.round_all(weight);
    let mut sum = Vec::with_capacity(x.len());
    let mut normed = Vec::with_capacity(x.len());
    for (xr, dr) in x.chunks_exact(hidden).zip(delta.chunks_exact(hidden)) {
        let start = sum.len();
        let mut ss = 0f64;
        for (a, b) in xr.iter().zip(dr) {
            let s = dtype.round(dtype.round(*a) + dtype.round(*b));
            ss += f64::from(s) * f64::from(s);
            sum.push(s);
        }
        let inv = 1.0 / ((ss / hidden as f64) as f32 + eps).sqrt();
        for (s, w) in sum[start..].iter().zip(&w) {
            normed.push(dtype.round(s * inv * w));
        }
    }
    Ok((sum, normed))
}

pub(crate) fn check_rms_norm(x: usize, delta: usize, hidden: usize, eps: f32) -> Result<()> {
    const K: &str = "rms_norm_residual";
    if hidden == 0 {
        return Err(input_error(K, "the weight is empty".into()));
    }
    if !x.is_multiple_of(hidden) {
        return Err(input_error(
            K,
            format!("input of {x} values is not a whole number of rows of {hidden}"),
        ));
    }
    if delta != x {
        return Err(input_error(
            K,
            format!("residual of {delta} values does not match the input's {x}"),
        ));
    }
    if !eps.is_finite() || eps < 0.0 {
        return Err(input_error(K, format!("eps {eps} is not finite and >= 0")));
    }
    Ok(())
}

/// Rotary position embedding applied in place to `x`, a `[tokens, heads, head_dim]` tensor
/// (queries or keys), token `t` being at position `positions[t]`.
///
/// `cos` and `sin` are `[rows, head_dim / 2]` tables (row `p` holds `cos(p·θᵢ)`, `sin(p·θᵢ)`).
/// For each pair `(a, b)` chosen by `style` and frequency `i`:
/// `a' = a·cos − b·sin`, `b' = a·sin + b·cos`, each product rounded separately (no fused
/// multiply-add), then `rounding`, then the dtype's rounding.
///
/// # Errors
/// [`Error::KernelInput`] when `head_dim` is zero or odd, `heads` is zero, the lengths of `x`,
/// `positions`, `cos` and `sin` do not agree, or a position is outside the tables.
#[allow(clippy::too_many_arguments)] // One argument per kernel parameter, as the kernel takes them.
pub fn rope(
    dtype: Dtype,
    x: &mut [f32],
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    style: RopeStyle,
    rounding: Rounding,
) -> Result<()> {
    check_rope(x.len(), heads, head_dim, positions, cos.len(), sin.len())?;
    let half = head_dim / 2;
    for v in x.iter_mut() {
        *v = dtype.round(*v);
    }
    for (t, tok) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let p = positions[t] as usize;
        let (c_row, s_row) = (&cos[p * half..][..half], &sin[p * half..][..half]);
        for row in tok.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (ia, ib) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (a, b, c, s) = (row[ia], row[ib], c_row[i], s_row[i]);
                row[ia] = dtype.round(rounding.apply(a * c - b * s));
                row[ib] = dtype.round(rounding.apply(a * s + b * c));
            }
        }
    }
    Ok(())
}

pub(crate) fn check_rope(
    x: usize,
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    cos: usize,
    sin: usize,
) -> Result<()> {
    const K: &str = "rope";
    if heads == 0 || head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(input_error(
            K,
            format!("{heads} heads of dimension {head_dim}: need at least one head of even size"),
        ));
    }
    if x != positions.len() * heads * head_dim {
        return Err(input_error(
            K,
            format!(
                "{x} values is not {} tokens of {heads} heads of {head_dim}",
                positions.len()
            ),
        ));
    }
    let half = head_dim / 2;
    if cos != sin || !cos.is_multiple_of(half) {
        return Err(input_error(
            K,
            format!("cos ({cos}) and sin ({sin}) tables are not both [rows, {half}]"),
        ));
    }
    let rows = cos / half;
    if let Some(p) = positions.iter().find(|p| **p as usize >= rows) {
        return Err(input_error(
            K,
            format!("position {p} is outside the rope tables of {rows} positions"),
        ));
    }
    Ok(())
}

/// Writes rows of new keys or values into the paged cache: `src` row `t` (of `dim` values)
/// goes to cache row `slots[t]`, after `rounding` and the dtype's rounding. A slot is
/// `block * block_size + offset`, as the engine's block tables give it.
///
/// # Errors
/// [`Error::CacheIndexOutOfRange`] when a slot is outside the cache; [`Error::KernelInput`]
/// when `dim` is zero, the lengths do not agree, or two tokens name the same slot (which would
/// race on the GPU).
pub fn kv_write(
    dtype: Dtype,
    cache: &mut [f32],
    dim: usize,
    src: &[f32],
    slots: &[u32],
    rounding: Rounding,
) -> Result<()> {
    check_kv_write(cache.len(), dim, src.len(), slots)?;
    for (row, &slot) in src.chunks_exact(dim).zip(slots) {
        let dst = &mut cache[slot as usize * dim..][..dim];
        for (d, s) in dst.iter_mut().zip(row) {
            *d = dtype.round(rounding.apply(dtype.round(*s)));
        }
    }
    Ok(())
}

pub(crate) fn check_kv_write(cache: usize, dim: usize, src: usize, slots: &[u32]) -> Result<()> {
    const K: &str = "kv_write";
    if dim == 0 || !cache.is_multiple_of(dim) {
        return Err(input_error(
            K,
            format!("cache of {cache} values is not rows of {dim}"),
        ));
    }
    if src != slots.len() * dim {
        return Err(input_error(
            K,
            format!("{src} new values is not {} rows of {dim}", slots.len()),
        ));
    }
    let rows = cache / dim;
    let mut seen = HashSet::with_capacity(slots.len());
    for &s in slots {
        if s as usize >= rows {
            return Err(Error::CacheIndexOutOfRange {
                kernel: K,
                what: "slot",
                index: s as usize,
                limit: rows,
            });
        }
        if !seen.insert(s) {
            return Err(input_error(K, format!("slot {s} is written twice")));
        }
    }
    Ok(())
}

/// The geometry of decode attention: heads, key/value heads, head size and cache block size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    scale: f32,
    rounding: Rounding,
}

impl AttentionShape {
    /// Attention with `heads` query heads sharing `kv_heads` key/value heads (query head `h`
    /// reads key/value head `h / (heads / kv_heads)`), heads of `head_dim`, over a cache of
    /// blocks of `block_size` positions. The score scale is `1 / sqrt(head_dim)` and
    /// probabilities are not rounded; see [`AttentionShape::rounding`].
    ///
    /// # Errors
    /// [`Error::KernelInput`] when a size is zero, `heads` is not a multiple of `kv_heads`, or
    /// `head_dim` exceeds [`MAX_HEAD_DIM`].
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize, block_size: usize) -> Result<Self> {
        const K: &str = "paged_attention";
        if heads == 0 || kv_heads == 0 || head_dim == 0 || block_size == 0 {
            return Err(input_error(
                K,
                format!(
                    "zero size in heads {heads}, kv_heads {kv_heads}, head_dim {head_dim}, block_size {block_size}"
                ),
            ));
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(input_error(
                K,
                format!("{heads} heads is not a multiple of {kv_heads} key/value heads"),
            ));
        }
        if head_dim > MAX_HEAD_DIM {
            return Err(input_error(
                K,
                format!("head dimension {head_dim} exceeds {MAX_HEAD_DIM}"),
            ));
        }
        Ok(Self {
            heads,
            kv_heads,
            head_dim,
            block_size,
            scale: 1.0 / (head_dim as f32).sqrt(),
            rounding: Rounding::None,
        })
    }

    /// Rounds the attention probabilities (after the softmax, before the weighted sum of
    /// values), as the engine does with [`Rounding::F16`].
    pub fn rounding(mut self, rounding: Rounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Query heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Values per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Positions per cache block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn scale(&self) -> f32 {
        self.scale
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn probability_rounding(&self) -> Rounding {
        self.rounding
    }

    /// Values per cache row (`kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Block tables and context lengths of a batch of decoding sequences, padded to one width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTables {
    /// `[sequences, width]`, row-major; padding entries are 0 and never read.
    flat: Vec<u32>,
    width: usize,
    context_lens: Vec<u32>,
}

impl BlockTables {
    /// One sequence per entry: its block table (block ids in position order) and its context
    /// length (positions to attend to, the new token's included).
    ///
    /// # Errors
    /// [`Error::KernelInput`] when there are no sequences, a context length is zero, or a
    /// table has fewer than `ceil(context_len / block_size)` blocks.
    pub fn new(sequences: &[(&[u32], usize)], block_size: usize) -> Result<Self> {
        const K: &str = "paged_attention";
        if sequences.is_empty() || block_size == 0 {
            return Err(input_error(K, "no sequences, or a zero block size".into()));
        }
        let width = sequences
            .iter()
            .map(|(t, _)| t.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let mut flat = vec![0u32; sequences.len() * width];
        let mut context_lens = Vec::with_capacity(sequences.len());
        for (i, (table, len)) in sequences.iter().enumerate() {
            if *len == 0 || len.div_ceil(block_size) > table.len() {
                return Err(input_error(
                    K,
                    format!(
                        "sequence {i}: context of {len} positions with {} blocks of {block_size}",
                        table.len()
                    ),
                ));
            }
            let len = u32::try_from(*len)
                .map_err(|_| input_error(K, format!("sequence {i}: context {len} too long")))?;
            flat[i * width..][..table.len()].copy_from_slice(table);
            context_lens.push(len);
        }
        Ok(Self {
            flat,
            width,
            context_lens,
        })
    }

    /// Tables already laid out `[sequences, width]` (padding entries are never read), with
    /// their context lengths; checked as [`BlockTables::new`] checks.
    pub(crate) fn from_parts(
        flat: Vec<u32>,
        width: usize,
        context_lens: Vec<u32>,
        block_size: usize,
    ) -> Result<Self> {
        if width == 0 || flat.len() != width * context_lens.len() {
            return Err(input_error(
                "paged_attention",
                format!(
                    "{} table entries for {} sequences of width {width}",
                    flat.len(),
                    context_lens.len()
                ),
            ));
        }
        let rows: Vec<(&[u32], usize)> = flat
            .chunks_exact(width)
            .zip(&context_lens)
            .map(|(t, &n)| (t, n as usize))
            .collect();
        Self::with_width(&rows, block_size, width)
    }

    /// [`BlockTables::new`] padded to `width` entries per sequence (at least the longest
    /// table), so that batches of different shapes share one layout.
    pub(crate) fn with_width(
        sequences: &[(&[u32], usize)],
        block_size: usize,
        width: usize,
    ) -> Result<Self> {
        let mut t = Self::new(sequences, block_size)?;
        if width < t.width {
            return Err(input_error(
                "paged_attention",
                format!(
                    "a width of {width} is below the longest table ({})",
                    t.width
                ),
            ));
        }
        if width > t.width {
            let mut flat = vec![0u32; t.len() * width];
            for (dst, src) in flat
                .chunks_exact_mut(width)
                .zip(t.flat.chunks_exact(t.width))
            {
                dst[..t.width].copy_from_slice(src);
            }
            t.flat = flat;
            t.width = width;
        }
        Ok(t)
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.context_lens.len()
    }

    /// Whether there are no sequences (never true for a constructed value).
    pub fn is_empty(&self) -> bool {
        self.context_lens.is_empty()
    }

    /// The longest context in the batch.
    pub fn max_context(&self) -> usize {
        self.context_lens.iter().copied().max().unwrap_or(0) as usize
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn flat(&self) -> &[u32] {
        &self.flat
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn context_lens(&self) -> &[u32] {
        &self.context_lens
    }

    /// Cache row of position `j` of sequence `s`.
    fn slot(&self, s: usize, j: usize, block_size: usize) -> usize {
        self.flat[s * self.width + j / block_size] as usize * block_size + j % block_size
    }

    /// Checks every block the batch reads against a cache of `blocks` blocks.
    pub(crate) fn check_blocks(&self, block_size: usize, blocks: usize) -> Result<()> {
        for (s, len) in self.context_lens.iter().enumerate() {
            let used = (*len as usize).div_ceil(block_size);
            for &b in &self.flat[s * self.width..][..used] {
                if b as usize >= blocks {
                    return Err(Error::CacheIndexOutOfRange {
                        kernel: "paged_attention",
                        what: "block",
                        index: b as usize,
                        limit: blocks,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Decode attention over a paged cache: one query per sequence (`q` is
/// `[sequences, heads, head_dim]`), keys and values read through the block tables from caches
/// of `[blocks * block_size, kv_heads * head_dim]`. Returns `[sequences, heads * head_dim]`.
///
/// For sequence `s` with context `n`, head `h` and its key/value head `g`:
/// `score_j = dot(q[s,h], k[slot(j), g]) · scale` for `j < n`,
/// `p_j = rounding(exp(score_j − max) / Σ exp(score_i − max))`, `out = Σ p_j · v[slot(j), g]`,
/// then the dtype's rounding.
///
/// # Errors
/// [`Error::CacheIndexOutOfRange`] when a table names a block outside the cache;
/// [`Error::KernelInput`] when the lengths of `q` or the caches do not fit `shape`.
pub fn paged_attention(
    dtype: Dtype,
    shape: &AttentionShape,
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    tables: &BlockTables,
) -> Result<Vec<f32>> {
    check_paged_attention(shape, q.len(), k_cache.len(), v_cache.len(), tables)?;
    let (hd, kv_dim) = (shape.head_dim, shape.kv_dim());
    let group = shape.heads / shape.kv_heads;
    let q = dtype.round_all(q);
    let mut out = Vec::with_capacity(q.len());
    let mut scores = Vec::new();
    for s in 0..tables.len() {
        let n = tables.context_lens[s] as usize;
        for h in 0..shape.heads {
            let g = h / group;
            let qrow = &q[(s * shape.heads + h) * hd..][..hd];
            scores.clear();
            for j in 0..n {
                let base = tables.slot(s, j, shape.block_size) * kv_dim + g * hd;
                let dot: f64 = qrow
                    .iter()
                    .zip(&k_cache[base..base + hd])
                    .map(|(a, b)| f64::from(*a) * f64::from(dtype.round(*b)))
                    .sum();
                scores.push(dot as f32 * shape.scale);
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f64;
            for x in scores.iter_mut() {
                *x = (*x - max).exp();
                sum += f64::from(*x);
            }
            let sum = sum as f32;
            for x in scores.iter_mut() {
                *x = shape.rounding.apply(*x / sum);
            }
            let mut acc = vec![0f64; hd];
            for (j, p) in scores.iter().enumerate() {
                let base = tables.slot(s, j, shape.block_size) * kv_dim + g * hd;
                for (a, v) in acc.iter_mut().zip(&v_cache[base..base + hd]) {
                    *a += f64::from(*p) * f64::from(dtype.round(*v));
                }
            }
            out.extend(acc.into_iter().map(|a| dtype.round(a as f32)));
        }
    }
    Ok(out)
}

/// Checks a paged-attention call against `shape` and the caches' sizes.
pub(crate) fn check_paged_attention(
    shape: &AttentionShape,
    q: usize,
    k_cache: usize,
    v_cache: usize,
    tables: &BlockTables,
) -> Result<()> {
    const K: &str = "paged_attention";
    let want = tables.len() * shape.heads * shape.head_dim;
    if q != want {
        return Err(input_error(
            K,
            format!(
                "query of {q} values is not {} sequences of {} heads of {}",
                tables.len(),
                shape.heads,
                shape.head_dim
            ),
        ));
    }
    let block_len = shape.block_size * shape.kv_dim();
    if k_cache != v_cache || k_cache == 0 || !k_cache.is_multiple_of(block_len) {
        return Err(input_error(
            K,
            format!(
                "key ({k_cache}) and value ({v_cache}) caches are not both whole blocks of {} rows of {}",
                shape.block_size,
                shape.kv_dim()
            ),
        ));
    }
    tables.check_blocks(shape.block_size, k_cache / block_len)
}

/// One sequence's sampling settings and its uniform random draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    u: f32,
}

impl SampleParams {
    /// Greedy: the first token with the largest logit.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            u: 0.0,
        }
    }

    /// Sampling at `temperature` (0 = greedy) with the filters off (`top_k` 0 means all
    /// tokens, `top_p` 1 and `min_p` 0 keep everything), picking with the uniform draw `u`.
    ///
    /// # Errors
    /// [`Error::KernelInput`] when `temperature` is negative or not finite, `top_p` is not in
    /// `(0, 1]`, `min_p` is not in `[0, 1]`, or `u` is not in `[0, 1)`.
    pub fn new(temperature: f32, top_k: u32, top_p: f32, min_p: f32, u: f32) -> Result<Self> {
        const K: &str = "sample";
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(input_error(K, format!("temperature {temperature}")));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(input_error(K, format!("top_p {top_p} is not in (0, 1]")));
        }
        if !(0.0..=1.0).contains(&min_p) {
            return Err(input_error(K, format!("min_p {min_p} is not in [0, 1]")));
        }
        if !(0.0..1.0).contains(&u) {
            return Err(input_error(K, format!("u {u} is not in [0, 1)")));
        }
        Ok(Self {
            temperature,
            top_k,
            top_p,
            min_p,
            u,
        })
    }

    /// Whether these settings pick the largest logit (temperature 0).
    pub(crate) fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The five words the kernel reads per sequence.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // Only the CUDA launches read it.
    pub(crate) fn words(&self) -> [u32; 5] {
        [
            self.temperature.to_bits(),
            self.top_k,
            self.top_p.to_bits(),
            self.min_p.to_bits(),
            self.u.to_bits(),
        ]
    }
}

/// Picks one token per sequence from `logits` (`[params.len(), vocab]`).
///
/// Greedy (temperature 0): the first index of the largest non-NaN logit (0 if all are NaN).
/// Otherwise the candidates are the finite logits, scaled `z = logit · (1 / temperature)` and
/// ordered by `z` descending, then token id ascending. Keep the first `top_k` (when non-zero);
/// with `wᵢ = exp(zᵢ − max z)`, keep the shortest prefix whose `Σ w` reaches `top_p` of the kept
/// total, and cut it at the first `w < min_p` (keeping at least one). Then walk the kept
/// candidates in order and return the first whose cumulative `Σ w` reaches `u` times their
/// total. With no finite logit, fall back to greedy. This is the CPU sampler's order and rule,
/// so a draw `u` picks the same token on either path, up to float summation order.
///
/// # Errors
/// [`Error::KernelInput`] when `vocab` is zero or `logits` is not `params.len()` rows of it.
pub fn sample(
    dtype: Dtype,
    logits: &[f32],
    vocab: usize,
    params: &[SampleParams],
) -> Result<Vec<u32>> {
    check_sample(logits.len(), vocab, params.len())?;
    Ok(logits
        .chunks_exact(vocab)
        .zip(params)
        .map(|(row, p)| sample_row(&dtype.round_all(row), p))
        .collect())
}

pub(crate) fn check_sample(logits: usize, vocab: usize, rows: usize) -> Result<()> {
    if vocab == 0 || rows == 0 || logits != rows * vocab {
        return Err(input_error(
            "sample",
            format!("{logits} logits is not {rows} rows of a vocabulary of {vocab}"),
        ));
    }
    Ok(())
}

fn argmax(row: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, l) in row.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| *l > b) {
            best = Some((i, *l));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

fn sample_row(row: &[f32], p: &SampleParams) -> u32 {
    if p.temperature == 0.0 {
        return argmax(row);
    }
    let inv_t = 1.0 / p.temperature;
    let mut cand: Vec<(u32, f32)> = row
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .map(|(i, l)| (i as u32, l * inv_t))
        .collect();
    if cand.is_empty() {
        return argmax(row);
    }
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 {
        cand.truncate(p.top_k as usize);
    }
    let max = cand[0].1;
    let w: Vec<f64> = cand
        .iter()
        .map(|(_, z)| f64::from((z - max).exp()))
        .collect();
    let kept: f64 = w.iter().sum();
    let mut keep = w.len();
    if p.top_p < 1.0 {
        let target = f64::from(p.top_p) * kept;
        let mut acc = 0.0;
        for (i, x) in w.iter().enumerate() {
            acc += x;
            if acc >= target {
                keep = i + 1;
                break;
            }
        }
    }
    if p.min_p > 0.0 {
        let n = w.iter().take_while(|x| **x >= f64::from(p.min_p)).count();
        keep = keep.min(n.max(1));
    }
    let total: f64 = w[..keep].iter().sum();
    let r = f64::from(p.u) * total;
    let mut acc = 0.0;
    for i in 0..keep {
        acc += w[i];
        if acc >= r && acc > 0.0 {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_codes_match_the_kernels() {
        assert_eq!(Rounding::None.code(), 0);
        assert_eq!(Rounding::F16.code(), 1);
        assert_eq!(RopeStyle::Interleaved.code(), 0);
        assert_eq!(RopeStyle::Halves.code(), 1);
    }

    use crate::sampling::Rng;

    /// The kernel's sampling rule is the engine's CPU sampler's: with the sampler's own
    /// uniform draw, both pick the same token.
    #[test]
    fn sample_agrees_with_the_engine_sampler() {
        use crate::sampling::{Sampler, SamplingParams as Engine};
        let mut rng = Rng::new(99);
        let mut mismatches = 0;
        for case in 0..400u64 {
            let vocab = 50 + (case as usize % 7) * 37;
            let logits: Vec<f32> = (0..vocab)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 12.0)
                .collect();
            let (t, k, p, m) = match case % 4 {
                0 => (1.0, 0, 1.0, 0.0),
                1 => (0.7, 20, 1.0, 0.0),
                2 => (1.3, 0, 0.8, 0.0),
                _ => (0.9, 40, 0.95, 0.02),
            };
            let engine = Engine::default()
                .temperature(t)
                .top_k(k as usize)
                .top_p(p)
                .min_p(m)
                .seed(case);
            let want = Sampler::new(case)
                .sample(&engine, &mut logits.clone(), &[])
                .token;
            let u = Rng::new(case).next_f64() as f32;
            let params = SampleParams::new(t, k, p, m, u).unwrap();
            let got = sample(Dtype::F32, &logits, vocab, &[params]).unwrap()[0];
            if got != want {
                mismatches += 1;
            }
        }
        // The engine sums normalised f32 probabilities, the reference f64 weights, so a draw
        // that lands within rounding of a boundary may differ; none should at this size.
        assert_eq!(mismatches, 0);
    }

    /// A line-by-line port of kernels/sampling.cu's algorithm (thresholds found by bisection
    /// over 64-bit order keys, f32 masses), to show it picks what the sort-based reference
    /// picks. The GPU differs only in the order its block reductions add the masses.
    fn bisection_sample(row: &[f32], p: &SampleParams) -> u32 {
        fn key_of(z: f32, i: usize) -> u64 {
            let b = z.to_bits();
            let ordered = if b & 0x8000_0000 != 0 {
                !b
            } else {
                b | 0x8000_0000
            };
            (u64::from(ordered) << 32) | u64::from(u32::MAX - i as u32)
        }
        let argmax = || {
            let best = row
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, l)| key_of(*l, i))
                .max()
                .unwrap_or(0);
            if best == 0 { 0 } else { u32::MAX - best as u32 }
        };
        if p.temperature == 0.0 {
            return argmax();
        }
        let inv_t = 1.0 / p.temperature;
        let cands: Vec<(u64, f32)> = row
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (key_of(l * inv_t, i), l * inv_t))
            .collect();
        if cands.is_empty() {
            return argmax();
        }
        let m = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let count = |t: u64| cands.iter().filter(|c| c.0 >= t).count() as u64;
        let mass = |t: u64| -> f32 {
            cands
                .iter()
                .filter(|c| c.0 >= t)
                .map(|c| (c.1 - m).exp())
                .sum()
        };
        let largest = |mut lo: u64, target: f32| {
            let mut hi = u64::MAX;
            while lo < hi {
                let mid = lo + (hi - lo) / 2 + 1;
                let w = mass(mid);
                if w >= target && w > 0.0 {
                    lo = mid
                } else {
                    hi = mid - 1
                }
            }
            lo
        };
        let mut lo = 0u64;
        if p.top_k > 0 && u64::from(p.top_k) < cands.len() as u64 {
            let mut hi = u64::MAX;
            while lo < hi {
                let mid = lo + (hi - lo) / 2 + 1;
                if count(mid) >= u64::from(p.top_k) {
                    lo = mid
                } else {
                    hi = mid - 1
                }
            }
        }
        let kept = mass(lo);
        if p.top_p < 1.0 {
            lo = largest(lo, p.top_p * kept);
        }
        if p.min_p > 0.0 {
            let smallest = cands
                .iter()
                .filter(|c| c.0 >= lo && (c.1 - m).exp() >= p.min_p)
                .map(|c| c.0)
                .min()
                .unwrap_or(u64::MAX);
            if smallest != u64::MAX && smallest > lo {
                lo = smallest;
            }
        }
        let total = mass(lo);
        let pick = largest(lo, p.u * total);
        u32::MAX - pick as u32
    }

    #[test]
    fn the_kernels_bisection_picks_what_the_sorted_reference_picks() {
        let mut rng = Rng::new(5);
        let mut mismatches = 0;
        for case in 0..300u32 {
            let vocab = 20 + (case as usize % 5) * 61;
            let mut logits: Vec<f32> = (0..vocab)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 10.0)
                .collect();
            // Ties, and logits that are not candidates.
            logits[3] = logits[7];
            if case % 3 == 0 {
                logits[1] = f32::NEG_INFINITY;
                logits[2] = f32::NAN;
            }
            let (t, k, tp, mp) = match case % 5 {
                0 => (0.0, 0, 1.0, 0.0),
                1 => (1.0, 0, 1.0, 0.0),
                2 => (0.6, 7, 1.0, 0.0),
                3 => (1.4, 0, 0.7, 0.0),
                _ => (1.0, 30, 0.9, 0.1),
            };
            let u = rng.next_f64() as f32 * 0.999;
            let p = SampleParams::new(t, k, tp, mp, u).unwrap();
            if bisection_sample(&logits, &p) != sample_row(&logits, &p) {
                mismatches += 1;
            }
        }
        // f32 against f64 sums can only disagree for a draw within rounding of a boundary.
        assert!(mismatches <= 1, "{mismatches} of 300 differ");
    }

    #[test]
    fn sample_words_round_trip() {
        let p = SampleParams::new(0.7, 40, 0.9, 0.05, 0.25).unwrap();
        let w = p.words();
        assert_eq!(f32::from_bits(w[0]), 0.7);
        assert_eq!(w[1], 40);
        assert_eq!(f32::from_bits(w[4]), 0.25);
    }
}
