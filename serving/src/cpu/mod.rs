//! Our own CPU path: quantized matrix kernels (Q4_0, Q4_1, Q8_0 weights times activations
//! quantized to 8 bits on the fly), a worker pool, and a forward pass over plain buffers with
//! fused steps, used by default for GGUF models on the CPU whose weights are in those formats.
//!
//! The forward pass mirrors the numerics llama.cpp uses on the CPU, so greedy output matches
//! it token for token: activations are quantized per block of 32 before every projection
//! (Q8_1-style block sums for Q4_1 weights), keys and values live in the cache as f16, queries
//! and attention probabilities are rounded to f16 before their products.
//!
//! `unsafe` is allowed in this module only: the SIMD kernels in `avx2` and the worker pool's
//! lending of a borrowed closure to its threads. Every block has a SAFETY comment.

mod attn;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod kernels;
mod pool;
pub(crate) mod quant;

use std::sync::{Mutex, PoisonError};

use kernels::Isa;
use pool::Pool;
use quant::{PlainQ, QActs, QK, QMatrix, QType, rounds_sum};

use crate::error::{Error, Result};
use crate::model::{ModelConfig, RowOutput, SeqStep, rope_table};

/// One projection: the weight matrix and an optional bias.
#[derive(Debug)]
pub(crate) struct Proj {
    pub(crate) w: QMatrix,
    pub(crate) bias: Option<Vec<f32>>,
}

/// One transformer block for the CPU path. Q, K and V are one matrix (their rows stacked), and
/// so are the gate and up projections (their rows interleaved in runs of 32, see
/// [`Proj::paired`]), so each takes one pass over the activations.
#[derive(Debug)]
pub(crate) struct CpuLayer {
    pub(crate) attn_norm: Vec<f32>,
    pub(crate) qkv: Proj,
    pub(crate) wo: Proj,
    pub(crate) ffn_norm: Vec<f32>,
    pub(crate) gate_up: Proj,
    pub(crate) down: Proj,
}

impl Proj {
    /// Packs one weight matrix with its optional bias.
    pub(crate) fn new(w: &PlainQ, bias: Option<Vec<f32>>) -> Self {
        Self {
            w: QMatrix::pack(w),
            bias,
        }
    }

    /// Stacks the rows of projections with the same weight format into one and packs it
    /// (biases follow, with zeros for parts that have none).
    pub(crate) fn stacked(parts: Vec<(PlainQ, Option<Vec<f32>>)>) -> Result<Self> {
        let any_bias = parts.iter().any(|p| p.1.is_some());
        let mut bias = Vec::new();
        let mut mats = Vec::with_capacity(parts.len());
        for (w, b) in parts {
            if any_bias {
                bias.extend(b.unwrap_or_else(|| vec![0.0; w.rows]));
            }
            mats.push(w);
        }
        let w = PlainQ::stack(mats).map_err(|e| Error::InvalidModel { reason: e.0 })?;
        Ok(Self::new(&w, any_bias.then_some(bias)))
    }

    /// The gate and up projections as one matrix whose rows alternate in runs of 32 (one
    /// activation block): each task of the product then holds both halves of whole blocks of
    /// the down projection's input, and gates and quantizes them itself ([`gate_and_down_acts`]).
    pub(crate) fn paired(
        gate: (PlainQ, Option<Vec<f32>>),
        up: (PlainQ, Option<Vec<f32>>),
    ) -> Result<Self> {
        let w = PlainQ::interleave(&gate.0, &up.0, QK)
            .map_err(|e| Error::InvalidModel { reason: e.0 })?;
        let bias = match (gate.1, up.1) {
            (None, None) => None,
            (g, u) => {
                let rows = gate.0.rows;
                let (g, u) = (
                    g.unwrap_or_else(|| vec![0.0; rows]),
                    u.unwrap_or_else(|| vec![0.0; rows]),
                );
                if g.len() != rows || u.len() != rows {
                    return Err(Error::InvalidModel {
                        reason: "a gate or up bias does not match its projection".into(),
                    });
                }
                let mut b = Vec::with_capacity(2 * rows);
                for (gs, us) in g.chunks(QK).zip(u.chunks(QK)) {
                    b.extend_from_slice(gs);
                    b.extend_from_slice(us);
                }
                Some(b)
            }
        };
        Ok(Self::new(&w, bias))
    }
}

/// Scratch buffers reused across steps (the forward pass runs on the model thread only).
#[derive(Debug, Default)]
struct Scratch {
    x: Vec<f32>,
    acts: QActs,
    /// The down projection's input, written while the gate/up product still reads `acts`.
    down_acts: QActs,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    ffn: Vec<f32>,
    logits: Vec<f32>,
}

/// A model held for the CPU kernels.
#[derive(Debug)]
pub(crate) struct CpuModel {
    config: ModelConfig,
    isa: Isa,
    pool: Pool,
    embedding: QMatrix,
    /// `None` when the output projection is the embedding (tied weights).
    output: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<CpuLayer>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    scratch: Mutex<Scratch>,
}

impl CpuModel {
    pub(crate) fn new(
        config: ModelConfig,
        embedding: QMatrix,
        output: Option<QMatrix>,
        norm: Vec<f32>,
        layers: Vec<CpuLayer>,
        threads: usize,
    ) -> Result<Self> {
        let c = &config;
        let bad = |reason: String| Err(Error::InvalidModel { reason });
        let q_rows = c.heads * c.head_dim + 2 * c.kv_dim();
        if embedding.cols != c.hidden || embedding.rows < c.vocab {
            return bad(format!(
                "token embedding is {}x{}, expected {}x{}",
                embedding.rows, embedding.cols, c.vocab, c.hidden
            ));
        }
        if let Some(o) = &output
            && (o.cols != c.hidden || o.rows < c.vocab)
        {
            return bad(format!("output projection is {}x{}", o.rows, o.cols));
        }
        if norm.len() != c.hidden || layers.len() != c.layers {
            return bad("output norm or layer count does not match the configuration".into());
        }
        for (i, l) in layers.iter().enumerate() {
            let shapes = [
                (&l.qkv.w, q_rows, c.hidden),
                (&l.wo.w, c.hidden, c.heads * c.head_dim),
                (&l.gate_up.w, 2 * c.intermediate, c.hidden),
                (&l.down.w, c.hidden, c.intermediate),
            ];
            for (w, rows, cols) in shapes {
                if w.rows != rows || w.cols != cols {
                    return bad(format!(
                        "layer {i}: a projection is {}x{}, expected {rows}x{cols}",
                        w.rows, w.cols
                    ));
                }
            }
            if l.attn_norm.len() != c.hidden || l.ffn_norm.len() != c.hidden {
                return bad(format!("layer {i}: norm weights of the wrong length"));
            }
        }
        let (cos, sin) = rope_table(c);
        let pool = Pool::new(threads).map_err(|e| Error::Execution {
            reason: format!("cannot start the CPU worker threads: {e}"),
        })?;
        Ok(Self {
            config,
            isa: kernels::detected(),
            pool,
            embedding,
            output,
            norm,
            layers,
            cos,
            sin,
            scratch: Mutex::new(Scratch::default()),
        })
    }

    /// The instruction set in use and the worker threads, for reports.
    pub(crate) fn describe(&self) -> String {
        format!("keel-cpu/{} x{}", self.isa.name(), self.pool.threads())
    }

    /// One batched step (see `Model::forward`), over the f16 cache in `kv`.
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        kv: &mut attn::HostKv<'_>,
    ) -> Result<Vec<Vec<f32>>> {
        let rows = self.forward_picking(tokens, seqs, kv, &[])?;
        Ok(rows
            .into_iter()
            .filter_map(|r| match r {
                RowOutput::Logits(l) => Some(l),
                RowOutput::Token(_) => None,
            })
            .collect())
    }

    /// [`CpuModel::forward`], with the greedy token picked here for the rows whose entry in
    /// `greedy` is `true` (one entry per sequence that wants logits, in order; missing entries
    /// count as `false`): the pick reads the kept logits buffer, so those rows' logits are
    /// never copied out.
    pub(crate) fn forward_picking(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        kv: &mut attn::HostKv<'_>,
        greedy: &[bool],
    ) -> Result<Vec<RowOutput>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let h = c.hidden;
        let qd = c.heads * c.head_dim;
        let kvd = c.kv_dim();
        let mut guard = self.scratch.lock().unwrap_or_else(PoisonError::into_inner);
        let s = &mut *guard;
        // Per-token bookkeeping: position, cache slot, and which sequence it belongs to.
        let mut positions = Vec::with_capacity(t);
        let mut write_slots = Vec::with_capacity(t);
        let mut owner = Vec::with_capacity(t);
        let mut logit_rows = Vec::new();
        for (i, sq) in seqs.iter().enumerate() {
            for k in 0..sq.len {
                let p = sq.start_pos + k;
                let slot = *sq.slots.get(p).ok_or_else(|| Error::Execution {
                    reason: format!("sequence {i} has no cache slot for position {p}"),
                })?;
                if slot as usize >= kv.slots() {
                    return Err(Error::Execution {
                        reason: format!("cache slot {slot} is outside the cache"),
                    });
                }
                positions.push(p);
                write_slots.push(slot);
                owner.push(i);
            }
            if sq.want_logits {
                logit_rows.push(positions.len() - 1);
            }
        }
        if positions.len() != t {
            return Err(Error::Execution {
                reason: format!("{t} tokens but the sequences cover {}", positions.len()),
            });
        }
        if let Some(&p) = positions.iter().find(|p| **p >= c.context) {
            return Err(Error::Execution {
                reason: format!("position {p} is beyond the context of {}", c.context),
            });
        }
        s.x.resize(t * h, 0.0);
        for (i, &tok) in tokens.iter().enumerate() {
            if tok as usize >= c.vocab {
                return Err(Error::Execution {
                    reason: format!("token id {tok} is outside the vocabulary"),
                });
            }
            self.embedding
                .dequantize_row(tok as usize, &mut s.x[i * h..(i + 1) * h]);
        }
        let eps = c.rms_eps as f32;
        for (li, layer) in self.layers.iter().enumerate() {
            // The cache rows this layer writes, asked for now: the write comes after the norm
            // and the QKV product, by which time they are in cache instead of stalling it.
            let (kc, vc) = &kv.layers[li];
            for &slot in &write_slots {
                let at = slot as usize * kvd;
                kernels::prefetch(self.isa, &kc[at..at + kvd]);
                kernels::prefetch(self.isa, &vc[at..at + kvd]);
            }
            // Attention block.
            norm_quantize(
                &self.pool,
                self.isa,
                &s.x,
                &layer.attn_norm,
                t,
                eps,
                layer.qkv.w.qtype,
                &mut s.acts,
            );
            let width = qd + 2 * kvd;
            s.qkv.resize(t * width, 0.0);
            self.project(&layer.qkv, &s.acts, &mut s.qkv);
            attn::rope_and_store(
                self.isa,
                c,
                &mut s.qkv,
                &positions,
                &write_slots,
                &self.cos,
                &self.sin,
                kv,
                li,
            );
            s.attn.resize(t * qd, 0.0);
            attn::attention(
                &self.pool,
                self.isa,
                c,
                &s.qkv,
                &positions,
                &owner,
                seqs,
                kv,
                li,
                &mut s.attn,
            );
            let attn_out = &s.attn;
            quantize_with(
                &self.pool,
                &mut s.acts,
                t,
                qd,
                rounds_sum(layer.wo.w.qtype),
                &|a, b, buf| buf.copy_from_slice(&attn_out[a * qd + b * QK..a * qd + (b + 1) * QK]),
            );
            s.proj.resize(t * h, 0.0);
            self.project(&layer.wo, &s.acts, &mut s.proj);
            for (x, p) in s.x.iter_mut().zip(&s.proj) {
                *x += p;
            }
            // Feed-forward block.
            norm_quantize(
                &self.pool,
                self.isa,
                &s.x,
                &layer.ffn_norm,
                t,
                eps,
                layer.gate_up.w.qtype,
                &mut s.acts,
            );
            let inter = c.intermediate;
            s.ffn.resize(t * 2 * inter, 0.0);
            gate_and_down_acts(
                &self.pool,
                self.isa,
                &layer.gate_up,
                &s.acts,
                &mut s.ffn,
                rounds_sum(layer.down.w.qtype),
                &mut s.down_acts,
            );
            self.project(&layer.down, &s.down_acts, &mut s.proj);
            for (x, p) in s.x.iter_mut().zip(&s.proj) {
                *x += p;
            }
        }
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = logit_rows.len();
        let mut last = Vec::with_capacity(n * h);
        for &r in &logit_rows {
            last.extend_from_slice(&s.x[r * h..(r + 1) * h]);
        }
        let out_w = self.output.as_ref().unwrap_or(&self.embedding);
        norm_quantize(
            &self.pool,
            self.isa,
            &last,
            &self.norm,
            n,
            eps,
            out_w.qtype,
            &mut s.acts,
        );
        // The output head writes into a buffer kept across steps. A fresh one is megabytes that
        // the allocator may hand back as new pages every step: in a bare decode loop (nothing
        // else allocating) that was 1,100 page faults and 3 ms of a 23 ms 16-stream step.
        s.logits.resize(n * out_w.rows, 0.0);
        kernels::matmul(&self.pool, self.isa, out_w, &s.acts, &mut s.logits);
        let isa = self.isa;
        Ok(s.logits
            .chunks_exact(out_w.rows)
            .enumerate()
            .map(|(i, row)| {
                let row = &row[..c.vocab];
                if greedy.get(i).copied().unwrap_or(false) {
                    RowOutput::Token(kernels::argmax(isa, row))
                } else {
                    RowOutput::Logits(row.to_vec())
                }
            })
            .collect())
    }

    fn project(&self, p: &Proj, acts: &QActs, out: &mut [f32]) {
        kernels::matmul(&self.pool, self.isa, &p.w, acts, out);
        if let Some(b) = &p.bias {
            for row in out.chunks_exact_mut(p.w.rows) {
                for (o, v) in row.iter_mut().zip(b) {
                    *o += v;
                }
            }
        }
    }
}

/// The gate/up product ([`Proj::paired`] rows) of `acts` into `ffn`, with SiLU gating and the
/// quantization of the result for the down projection fused into each task of the product:
/// a task that computed rows `64k..64m` holds the gate and up halves of blocks `k..m` of every
/// row, and writes exactly those blocks of `down`. The values are those of a separate pass.
fn gate_and_down_acts(
    pool: &Pool,
    isa: Isa,
    gate_up: &Proj,
    acts: &QActs,
    ffn: &mut [f32],
    round: bool,
    down: &mut QActs,
) {
    let (t, pair) = (acts.rows, 2 * QK);
    let inter = gate_up.w.rows / 2;
    let chunk = kernels::task_rows(&gate_up.w, t, pool.threads(), pair);
    down.reset(t, inter);
    let spans: Vec<Mutex<quant::BlockSpan<'_>>> = down
        .spans(chunk / pair)
        .into_iter()
        .map(Mutex::new)
        .collect();
    let bias = gate_up.bias.as_deref();
    kernels::matmul_then(pool, isa, &gate_up.w, acts, ffn, chunk, &|task, done| {
        let Some(span) = spans.get(task) else {
            return;
        };
        let r0 = done.rows().0;
        let mut span = span.lock().unwrap_or_else(PoisonError::into_inner);
        span.fill(round, &|a, b, buf| {
            // Block `b` of the gated row: its gate at rows `64b..64b + 32`, its up after.
            // (The spans are cut to the tasks' rows, so the block is always there.)
            let at = pair * b;
            let Some(pair_vals) = at
                .checked_sub(r0)
                .and_then(|off| done.row(a).get(off..off + pair))
            else {
                return;
            };
            let (g, u) = pair_vals.split_at(QK);
            match bias.and_then(|bias| bias.get(at..at + pair)) {
                None => kernels::silu_mul(isa, g, u, buf),
                Some(bias) => {
                    let gb: [f32; QK] = std::array::from_fn(|k| g[k] + bias[k]);
                    let ub: [f32; QK] = std::array::from_fn(|k| u[k] + bias[QK + k]);
                    kernels::silu_mul(isa, &gb, &ub, buf);
                }
            }
        });
    });
}

/// RMSNorm of each of `t` rows of `x`, scaled by `w`, quantized straight into `acts` for a
/// projection of format `target` (the normalised rows are never stored whole).
#[allow(clippy::too_many_arguments)] // One fused step of the forward pass.
fn norm_quantize(
    pool: &Pool,
    isa: Isa,
    x: &[f32],
    w: &[f32],
    t: usize,
    eps: f32,
    target: QType,
    acts: &mut QActs,
) {
    let h = w.len();
    let scales: Vec<f32> = (0..t)
        .map(|r| {
            let row = &x[r * h..(r + 1) * h];
            // Sum of squares in f64, as GGML accumulates it.
            let ss = kernels::sum_squares(isa, row);
            1.0 / ((ss / h as f64) as f32 + eps).sqrt()
        })
        .collect();
    quantize_with(pool, acts, t, h, rounds_sum(target), &|a, b, buf| {
        let (row, g) = (&x[a * h + b * QK..][..QK], &w[b * QK..][..QK]);
        let scale = scales[a];
        for k in 0..QK {
            buf[k] = row[k] * scale * g[k];
        }
    });
}

/// Quantizes `rows` rows of `cols` values into `acts`, block `b` of row `a` produced by
/// `src(a, b, buf)` (so a norm or a gating fuses into the pass). Large batches split by block
/// ranges across the pool; each task owns its blocks of every row.
fn quantize_with(
    pool: &Pool,
    acts: &mut QActs,
    rows: usize,
    cols: usize,
    round: bool,
    src: &(dyn Fn(usize, usize, &mut [f32; QK]) + Sync),
) {
    acts.reset(rows, cols);
    let nb = cols / QK;
    // A block takes tens of nanoseconds; below a few hundred, handing work over costs more.
    let tasks = if rows * nb >= 256 {
        2 * pool.threads()
    } else {
        1
    };
    let spans: Vec<Mutex<quant::BlockSpan<'_>>> = acts
        .spans(nb.div_ceil(tasks.clamp(1, nb.max(1))))
        .into_iter()
        .map(Mutex::new)
        .collect();
    pool.run(spans.len(), &|i| {
        spans[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .fill(round, src);
    });
}

/// Whether a GGUF tensor type can be multiplied by these kernels.
pub(crate) fn qtype_of(dtype: candle_core::quantized::GgmlDType) -> Option<QType> {
    use candle_core::quantized::GgmlDType as G;
    match dtype {
        G::Q4_0 => Some(QType::Q4_0),
        G::Q4_1 => Some(QType::Q4_1),
        G::Q8_0 => Some(QType::Q8_0),
        _ => None,
    }
}

pub(crate) use attn::HostKv;

#[cfg(test)]
mod tests {
    use super::*;

    fn values(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn fused_gating_equals_separate_products_then_silu_then_quantization() {
        let mut seed = 99u64;
        let pool = Pool::new(2).unwrap();
        let isa = kernels::detected();
        let (inter, hidden) = (160, 64);
        for qtype in [QType::Q4_1, QType::Q8_0] {
            for biased in [false, true] {
                let gate =
                    PlainQ::quantize(qtype, inter, hidden, &values(&mut seed, inter * hidden));
                let up = PlainQ::quantize(qtype, inter, hidden, &values(&mut seed, inter * hidden));
                let (gb, ub) = (values(&mut seed, inter), values(&mut seed, inter));
                let bias = |b: &Vec<f32>| biased.then(|| b.clone());
                let paired =
                    Proj::paired((gate.clone(), bias(&gb)), (up.clone(), bias(&ub))).unwrap();
                for t in [1, 3, 16] {
                    let x = QActs::quantize(&values(&mut seed, t * hidden), t, hidden, true);
                    let round = rounds_sum(qtype);
                    let mut ffn = vec![0f32; t * 2 * inter];
                    let mut down = QActs::default();
                    gate_and_down_acts(&pool, isa, &paired, &x, &mut ffn, round, &mut down);
                    // The same values the plain way: both products, biases, SiLU, quantize.
                    let (mut g, mut u) = (vec![0f32; t * inter], vec![0f32; t * inter]);
                    kernels::matmul(&pool, isa, &QMatrix::pack(&gate), &x, &mut g);
                    kernels::matmul(&pool, isa, &QMatrix::pack(&up), &x, &mut u);
                    let mut gated = vec![0f32; t * inter];
                    for a in 0..t {
                        let r = a * inter..(a + 1) * inter;
                        if biased {
                            g[r.clone()].iter_mut().zip(&gb).for_each(|(v, b)| *v += b);
                            u[r.clone()].iter_mut().zip(&ub).for_each(|(v, b)| *v += b);
                        }
                        kernels::silu_mul(isa, &g[r.clone()], &u[r.clone()], &mut gated[r]);
                    }
                    let want = QActs::quantize(&gated, t, inter, round);
                    let what = format!("{qtype:?} biased={biased} t={t}");
                    assert_eq!(down.qs, want.qs, "{what}");
                    assert_eq!(down.d, want.d, "{what}");
                    assert_eq!(down.s, want.s, "{what}");
                    assert_eq!(down.sums, want.sums, "{what}");
                }
            }
        }
        // Projections that cannot pair are a typed error, not a panic.
        let gate = PlainQ::quantize(QType::Q4_1, 64, hidden, &values(&mut seed, 64 * hidden));
        let up = PlainQ::quantize(QType::Q4_1, 32, hidden, &values(&mut seed, 32 * hidden));
        assert!(matches!(
            Proj::paired((gate.clone(), None), (up, None)),
            Err(Error::InvalidModel { .. })
        ));
        assert!(matches!(
            Proj::paired((gate.clone(), Some(vec![0.0; 3])), (gate, None)),
            Err(Error::InvalidModel { .. })
        ));
    }
}
