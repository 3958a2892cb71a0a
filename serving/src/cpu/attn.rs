//! Rotary embeddings, the f16 key/value cache write, and attention over the paged cache for
//! the CPU path. Queries and probabilities are rounded to f16 before their products, keys and
//! values are stored as f16, as llama.cpp's CPU path does.

use super::kernels::{self, Isa};
use super::pool::Pool;
use crate::model::{ModelConfig, RopeStyle, SeqStep};

/// The engine's f16 key/value cache, one `(keys, values)` pair of `slots × kv_dim` per layer.
#[derive(Debug)]
pub(crate) struct HostKv<'a> {
    pub(crate) layers: &'a mut [(Vec<u16>, Vec<u16>)],
    pub(crate) kv_dim: usize,
}

impl HostKv<'_> {
    /// Cache slots per layer.
    pub(crate) fn slots(&self) -> usize {
        self.layers
            .first()
            .map_or(0, |(k, _)| k.len() / self.kv_dim.max(1))
    }
}

/// Rotates pairs of `x` (one head) by the angles of one position.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = x.len() / 2;
    match style {
        RopeStyle::Interleaved => {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        RopeStyle::Halves => {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// For every token row of `qkv` (`[q | k | v]`): applies rotary embeddings to its query and
/// key heads, rounds the query to f16 in place, and writes key and value to the cache at the
/// token's slot as f16. Slots were checked against the cache by the caller.
#[allow(clippy::too_many_arguments)] // One fused pass over everything a token needs.
pub(super) fn rope_and_store(
    isa: Isa,
    c: &ModelConfig,
    qkv: &mut [f32],
    positions: &[usize],
    slots: &[u32],
    cos: &[f32],
    sin: &[f32],
    kv: &mut HostKv<'_>,
    layer: usize,
) {
    let hd = c.head_dim;
    let half = hd / 2;
    let qd = c.heads * hd;
    let kvd = kv.kv_dim;
    let width = qd + 2 * kvd;
    let (kc, vc) = &mut kv.layers[layer];
    for (i, row) in qkv.chunks_exact_mut(width).enumerate() {
        let p = positions[i];
        let (cs, sn) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        let (q, rest) = row.split_at_mut(qd);
        let (k, v) = rest.split_at_mut(kvd);
        for head in q.chunks_exact_mut(hd) {
            rotate(head, cs, sn, c.rope_style);
        }
        kernels::round_to_f16(isa, q);
        for head in k.chunks_exact_mut(hd) {
            rotate(head, cs, sn, c.rope_style);
        }
        let at = slots[i] as usize * kvd;
        kernels::to_f16(isa, k, &mut kc[at..at + kvd]);
        kernels::to_f16(isa, v, &mut vc[at..at + kvd]);
    }
}

/// Causal attention of every token's query heads over its sequence's cached keys and values,
/// written to `out` (`t × heads·head_dim`). One task serves a token's query heads for all its
/// key/value heads when there are enough tokens to keep every thread busy (each cache row is
/// then read once, whole), else one task per (token, key/value head).
#[allow(clippy::too_many_arguments)] // The step's bookkeeping, shared by every layer.
pub(super) fn attention(
    pool: &Pool,
    isa: Isa,
    c: &ModelConfig,
    qkv: &[f32],
    positions: &[usize],
    owner: &[usize],
    seqs: &[SeqStep],
    kv: &HostKv<'_>,
    layer: usize,
    out: &mut [f32],
) {
    let hd = c.head_dim;
    let group = c.heads / c.kv_heads;
    let qd = c.heads * hd;
    let kvd = kv.kv_dim;
    let width = qd + 2 * kvd;
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let (kc, vc) = &kv.layers[layer];
    let per_task = if positions.len() >= 2 * pool.threads() {
        c.kv_heads
    } else {
        1
    };
    let tasks_per_token = c.kv_heads / per_task;
    pool.run_chunks(out, per_task * group * hd, &|task, dst| {
        let i = task / tasks_per_token;
        let g = (task % tasks_per_token) * per_task;
        let ctx = positions[i] + 1;
        let slots = &seqs[owner[i]].slots[..ctx];
        let mut scores = vec![0f32; per_task * group * ctx];
        let q = &qkv[i * width + g * group * hd..i * width + (g + per_task) * group * hd];
        let (off, s) = (g * hd, &mut scores);
        kernels::attend_heads(isa, q, hd, group, kc, vc, slots, off, kvd, scale, s, dst);
    });
}
