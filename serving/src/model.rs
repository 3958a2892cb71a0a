//! The llama-family transformer: hyper-parameters, weights, and our own batched forward pass
//! over a paged KV cache (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU).

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Tensor};

use crate::cpu::CpuModel;
use crate::error::{Error, Result, exec};
use crate::kv::KvCache;

/// The model families this crate runs; they differ only in details of the same block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(Error::UnsupportedArchitecture {
                arch: other.to_string(),
            }),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's GGUF conversion permutes Q and K for this.
    Interleaved,
    /// Halves `(i, i + d/2)`: Hugging Face checkpoints and Qwen2 GGUFs.
    Halves,
}

/// Hyper-parameters of one model, read from GGUF metadata or `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelConfig {
    pub(crate) arch: Arch,
    pub(crate) hidden: usize,
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) intermediate: usize,
    pub(crate) vocab: usize,
    pub(crate) rms_eps: f64,
    pub(crate) rope_theta: f32,
    pub(crate) rope_style: RopeStyle,
    pub(crate) context: usize,
}

impl ModelConfig {
    /// Checks the relations the forward pass relies on, so bad files fail at load time.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidModel { reason });
        if self.hidden == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad(format!("zero-sized hyper-parameter in {self:?}"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if self.vocab == 0 || self.context == 0 || self.intermediate == 0 {
            return bad("vocabulary, context and feed-forward sizes must be positive".into());
        }
        Ok(())
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A projection: quantized (candle's `QMatMul`) or dense, with an optional bias.
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) weight: QMatMul,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// One transformer block's weights.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) wq: Linear,
    pub(crate) wk: Linear,
    pub(crate) wv: Linear,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Tensor,
    pub(crate) w_gate: Linear,
    pub(crate) w_up: Linear,
    pub(crate) w_down: Linear,
}

/// A loaded model: its configuration and the weights in the form one of the two forward
/// passes reads.
#[derive(Debug)]
pub(crate) struct Model {
    pub(crate) config: ModelConfig,
    /// A short name for the weights' storage type, e.g. `Q4_1` or `F32`.
    pub(crate) weight_type: String,
    imp: Imp,
}

#[derive(Debug)]
enum Imp {
    /// candle tensors and candle's matmuls: any device, any weight type candle reads.
    Candle(Box<CandleModel>),
    /// Our CPU kernels over plain buffers (Q4_0, Q4_1 and Q8_0 weights on the CPU).
    Cpu(Box<CpuModel>),
}

/// The candle-tensor form of a model.
#[derive(Debug)]
pub(crate) struct CandleModel {
    config: ModelConfig,
    embedding: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One sequence's slice of a batched forward step.
#[derive(Debug, Clone)]
pub(crate) struct SeqStep {
    /// Position of the first new token (tokens before it are already in the cache).
    pub(crate) start_pos: usize,
    /// Number of new tokens this step.
    pub(crate) len: usize,
    /// Cache slot of every position `0..start_pos + len`, from the sequence's block table.
    pub(crate) slots: Vec<u32>,
    /// Whether the caller needs logits for the last new token.
    pub(crate) want_logits: bool,
}

impl Model {
    #[allow(clippy::too_many_arguments)] // A plain constructor over the parts the loaders produce.
    pub(crate) fn new(
        config: ModelConfig,
        embedding: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: Linear,
        weight_type: String,
        device: Device,
    ) -> Result<Self> {
        config.validate()?;
        let (cos, sin) = rope_table(&config);
        let half = config.head_dim / 2;
        let table = |v: Vec<f32>| {
            Tensor::from_vec(v, (config.context, half), &device)
                .map_err(crate::error::invalid_model)
        };
        let (cos, sin) = (table(cos)?, table(sin)?);
        Ok(Self {
            config: config.clone(),
            weight_type,
            imp: Imp::Candle(Box::new(CandleModel {
                config,
                embedding,
                layers,
                norm,
                output,
                cos,
                sin,
                device,
            })),
        })
    }

    /// A model for our CPU kernels.
    pub(crate) fn cpu(cpu: CpuModel, config: ModelConfig, weight_type: String) -> Self {
        Self {
            config,
            weight_type,
            imp: Imp::Cpu(Box::new(cpu)),
        }
    }

    /// Whether the KV cache should hold f16 values in host memory (our CPU path) rather than
    /// candle tensors.
    pub(crate) fn host_kv(&self) -> bool {
        matches!(self.imp, Imp::Cpu(_))
    }

    /// Which kernels run the model, for reports: `candle` or `keel-cpu/<isa> x<threads>`.
    pub(crate) fn kernels(&self) -> String {
        match &self.imp {
            Imp::Candle(_) => "candle".into(),
            Imp::Cpu(m) => m.describe(),
        }
    }

    /// Runs one batched step: `tokens` holds every sequence's new tokens back to back, in the
    /// order of `seqs`. Writes the new keys and values into `cache` and returns one row of
    /// logits for every sequence with `want_logits`, in order.
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        match &self.imp {
            Imp::Candle(m) => m.forward_inner(tokens, seqs, cache).map_err(exec),
            Imp::Cpu(m) => {
                let mut kv = cache.host().ok_or_else(|| Error::Execution {
                    reason: "the CPU kernels need a host KV cache".into(),
                })?;
                m.forward(tokens, seqs, &mut kv)
            }
        }
    }
}

impl CandleModel {
    fn forward_inner(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        cache: &mut KvCache,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let mut positions = Vec::with_capacity(t);
        let mut write_slots = Vec::with_capacity(t);
        let mut logit_rows = Vec::new();
        let mut offset = 0usize;
        for s in seqs {
            for i in 0..s.len {
                positions.push((s.start_pos + i) as u32);
                write_slots.push(s.slots[s.start_pos + i]);
            }
            offset += s.len;
            if s.want_logits {
                logit_rows.push((offset - 1) as u32);
            }
        }
        let dev = &self.device;
        let ids = Tensor::from_slice(tokens, t, dev)?;
        let pos = Tensor::from_slice(&positions, t, dev)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let write_idx = Tensor::from_slice(&write_slots, (t, 1), dev)?
            .broadcast_as((t, c.kv_dim()))?
            .contiguous()?;
        // Gather indices per sequence are shared by all layers, so build them once.
        // Sequences with several new tokens (prefill chunks) get their own attention. Decoding
        // sequences (one new token) are grouped by context length rounded up to
        // DECODE_BUCKET, and each group is one batched attention with the padding keys masked
        // out. A sequence's padding depends only on its own length, so its result does not
        // depend on what else is in the batch.
        let mut gathers = Vec::new();
        let mut buckets: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        let mut starts = Vec::with_capacity(seqs.len());
        let mut off = 0usize;
        for (i, s) in seqs.iter().enumerate() {
            starts.push(off);
            off += s.len;
            let ctx = s.start_pos + s.len;
            if s.len == 1 {
                buckets
                    .entry(ctx.div_ceil(DECODE_BUCKET) * DECODE_BUCKET)
                    .or_default()
                    .push(i);
            } else {
                let idx = Tensor::from_slice(&s.slots[..ctx], ctx, dev)?;
                let mask = causal_mask(s.start_pos, s.len, dev)?;
                gathers.push((i, idx, mask));
            }
        }
        let mut groups = Vec::with_capacity(buckets.len());
        // Row order of the concatenated attention outputs: prefill sequences, then groups.
        let mut order: Vec<usize> = gathers.iter().map(|g| g.0).collect();
        for (bucket, members) in &buckets {
            let bucket = *bucket;
            let n = members.len();
            let mut idx = Vec::with_capacity(n * bucket);
            let mut mask = vec![0f32; n * bucket];
            let mut rows = Vec::with_capacity(n);
            for (j, &i) in members.iter().enumerate() {
                let s = &seqs[i];
                let ctx = s.start_pos + 1;
                idx.extend_from_slice(&s.slots[..ctx]);
                idx.extend(std::iter::repeat_n(s.slots[0], bucket - ctx));
                mask[j * bucket + ctx..(j + 1) * bucket].fill(f32::NEG_INFINITY);
                rows.push(starts[i] as u32);
                order.push(i);
            }
            groups.push(DecodeGroup {
                n,
                bucket,
                rows: Tensor::from_vec(rows, n, dev)?,
                idx: Tensor::from_vec(idx, n * bucket, dev)?,
                mask: Tensor::from_vec(mask, (n, 1, 1, bucket), dev)?,
            });
        }
        // Map each sequence's rows back to the batch's token order.
        let mut out_start = vec![0usize; seqs.len()];
        let mut pos = 0usize;
        for &i in &order {
            out_start[i] = pos;
            pos += seqs[i].len;
        }
        let perm: Vec<u32> = seqs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                let base = out_start[i];
                (0..s.len).map(move |k| (base + k) as u32)
            })
            .collect();
        let identity = perm.iter().enumerate().all(|(k, p)| *p as usize == k);
        let perm = Tensor::from_vec(perm, t, dev)?;

        let mut x = self.embedding.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let q = layer.wq.forward(&h)?.reshape((t, c.heads, c.head_dim))?;
            let k = layer.wk.forward(&h)?.reshape((t, c.kv_heads, c.head_dim))?;
            let v = layer.wv.forward(&h)?;
            let q = f16_round(&rope(&q, &cos, &sin, c.rope_style)?)?;
            let k = f16_round(&rope(&k, &cos, &sin, c.rope_style)?.reshape((t, c.kv_dim()))?)?;
            let v = f16_round(&v)?;
            let (kc, vc) = cache.layer(li)?;
            kc.scatter_set(&write_idx, &k.contiguous()?, 0)?;
            vc.scatter_set(&write_idx, &v.contiguous()?, 0)?;
            let mut outs = Vec::with_capacity(gathers.len() + groups.len());
            for (i, idx, mask) in &gathers {
                let qs = q.narrow(0, starts[*i], seqs[*i].len)?;
                let ks = kc.index_select(idx, 0)?;
                let vs = vc.index_select(idx, 0)?;
                outs.push(self.attention(&qs, &ks, &vs, mask)?);
            }
            for g in &groups {
                outs.push(self.decode_attention(&q, kc, vc, g)?);
            }
            let attn = Tensor::cat(&outs, 0)?;
            let attn = if identity {
                attn
            } else {
                attn.index_select(&perm, 0)?
            };
            x = (x + layer.wo.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate = layer.w_gate.forward(&h)?.silu()?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = logit_rows.len();
        let rows = Tensor::from_slice(&logit_rows, n, dev)?;
        let last = x.index_select(&rows, 0)?;
        let last = rms_norm(&last, &self.norm, c.rms_eps)?;
        let logits = self.output.forward(&last)?.to_dtype(DType::F32)?;
        logits.to_vec2::<f32>()
    }

    /// Attention for a group of decoding sequences padded to one context length.
    fn decode_attention(
        &self,
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        g: &DecodeGroup,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let group = c.heads / c.kv_heads;
        let q = q
            .index_select(&g.rows, 0)?
            .reshape((g.n, c.kv_heads, group, c.head_dim))?;
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(&g.idx, 0)?
                .reshape((g.n, g.bucket, c.kv_heads, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = gather(kc)?;
        let v = gather(vc)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&g.mask)?;
        let probs = f16_round(&softmax_last(&scores)?)?;
        probs.matmul(&v)?.reshape((g.n, c.heads * c.head_dim))
    }

    /// Grouped-query attention of one sequence's new queries over its cached keys and values.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (len, _, _) = q.dims3()?;
        let ctx = k.dim(0)?;
        let group = c.heads / c.kv_heads;
        // Heads sharing one key/value head are adjacent, so folding them into the query-row
        // dimension lets one batched matmul per key/value head serve the whole group.
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c.kv_heads, group * len, c.head_dim))?;
        let k = k
            .reshape((ctx, c.kv_heads, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let v = v
            .reshape((ctx, c.kv_heads, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = scores
            .reshape((c.kv_heads, group, len, ctx))?
            .broadcast_add(mask)?;
        let probs = f16_round(&softmax_last(&scores)?.reshape((c.kv_heads, group * len, ctx))?)?;
        let out = probs.matmul(&v)?; // [kv_heads, group*len, head_dim]
        out.reshape((c.heads, len, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((len, c.heads * c.head_dim))
    }
}

/// Decoding sequences are padded to a multiple of this many positions to share one attention.
const DECODE_BUCKET: usize = 32;

/// Decoding sequences whose contexts round up to the same length.
#[derive(Debug)]
struct DecodeGroup {
    n: usize,
    bucket: usize,
    /// Row of each member's query in the step's token order.
    rows: Tensor,
    /// Cache slots, `bucket` per member (padding repeats the first slot).
    idx: Tensor,
    /// `[n, 1, 1, bucket]`: 0 for real positions, -inf for padding.
    mask: Tensor,
}

/// Rotary angle tables `[context, head_dim/2]` (cos, sin): angle `p · θ^(−2i/d)`.
pub(crate) fn rope_table(c: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let half = c.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / c.head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(c.context * half);
    let mut sin = Vec::with_capacity(c.context * half);
    for p in 0..c.context {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Applies rotary embeddings to `x` of shape `[t, heads, head_dim]`; `cos`/`sin` are `[t, head_dim/2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> candle_core::Result<Tensor> {
    let (t, h, d) = x.dims3()?;
    let half = d / 2;
    let cos = cos.reshape((t, 1, half, 1))?;
    let sin = sin.reshape((t, 1, half, 1))?;
    match style {
        RopeStyle::Interleaved => {
            let x = x.reshape((t, h, half, 2))?;
            let a = x.narrow(3, 0, 1)?;
            let b = x.narrow(3, 1, 1)?;
            let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
            Tensor::cat(&[ra, rb], 3)?.reshape((t, h, d))
        }
        RopeStyle::Halves => {
            let x = x.reshape((t, h, 2, half))?;
            let cos = cos.reshape((t, 1, 1, half))?;
            let sin = sin.reshape((t, 1, 1, half))?;
            let a = x.narrow(2, 0, 1)?;
            let b = x.narrow(2, 1, 1)?;
            let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
            Tensor::cat(&[ra, rb], 2)?.reshape((t, h, d))
        }
    }
}

fn f16_round(x: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Additive mask `[len, start + len]`: query `i` (at position `start + i`) sees keys `0..=start + i`.
fn causal_mask(start: usize, len: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let ctx = start + len;
    let mut m = vec![0f32; len * ctx];
    for i in 0..len {
        for j in (start + i + 1)..ctx {
            m[i * ctx + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (len, ctx), dev)
}
