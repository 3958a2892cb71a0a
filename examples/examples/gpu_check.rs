//! The GPU check (scripts/gpu-check runs it), in three parts:
//!
//! - `kernels`: every Keel CUDA kernel against its CPU reference on fresh random inputs at
//!   several sizes, and the device's copy bandwidth;
//! - `greedy`: greedy generation on the GPU equals the CPU for a SmolLM2-135M-shaped f32
//!   model with seeded random weights ([`keel_serving::RandomModel`]), through the engine,
//!   once with the host sampler and once with the device sampling kernel;
//! - `decode`: decode tokens/s through the engine at batch 1, 32 and 256 for SmolLM2-135M- and
//!   Llama-1B-shaped random-weight bf16 models, next to the memory-bandwidth floor.
//!
//! It prints a table per part and exits non-zero when a check fails.
//!
//! ```text
//! cargo run --release -p keel-examples --features cuda --example gpu_check -- \
//!     [--device 0] [--seed N] [--require-gpu] [--quick] [--only kernels|greedy|decode]...
//!     [--new-tokens 64]
//! ```
//!
//! Without a GPU (or built without the `cuda` feature) the kernel part runs the same checks
//! through the CPU path of the kernels' candle ops, and the greedy and decode parts run on the
//! CPU against itself on a tiny f32 model: that tests the harness, not the kernels, and it
//! says so. `--require-gpu` makes a missing GPU a failure instead.
//!
//! Error bounds are normwise: max |device − reference| / max |reference| per output. f32
//! kernels must agree within 1e-5, bf16 within 1e-2. Attention with f16-rounded probabilities
//! is checked at 2e-3: a probability within float noise of an f16 rounding boundary may round
//! the other way, which moves the output at f16, not f32, precision. Every out-of-place output
//! is filled with NaN before the kernel runs, so an element it fails to write fails the check.
#![allow(clippy::print_stdout)] // a CLI program reports on stdout

use std::time::Instant;

use anyhow::{Context, bail};
use keel_serving::cuda_kernels::{
    self as k, AttentionShape, BlockTables, Dtype, KernelDevice, RopeStyle, Rounding, SampleParams,
};
use keel_serving::{Device, Engine, GenerateRequest, RandomModel, SamplingParams, StreamEvent};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Kernels,
    Greedy,
    Decode,
}

struct Args {
    device: usize,
    seed: u64,
    require_gpu: bool,
    quick: bool,
    parts: Vec<Part>,
    new_tokens: usize,
}

fn parse() -> anyhow::Result<Args> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut a = Args {
        device: 0,
        seed: now,
        require_gpu: false,
        quick: false,
        parts: Vec::new(),
        new_tokens: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value()?.parse()?,
            "--seed" => a.seed = value()?.parse()?,
            "--require-gpu" => a.require_gpu = true,
            "--quick" => a.quick = true,
            "--new-tokens" => a.new_tokens = value()?.parse::<usize>()?.max(2),
            "--only" => a.parts.push(match value()?.as_str() {
                "kernels" => Part::Kernels,
                "greedy" => Part::Greedy,
                "decode" => Part::Decode,
                other => bail!("--only takes kernels, greedy or decode, not {other:?}"),
            }),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if a.parts.is_empty() {
        a.parts = vec![Part::Kernels, Part::Greedy, Part::Decode];
    }
    Ok(a)
}

/// SplitMix64: reproducible inputs from the printed seed.
struct Gen(u64);

impl Gen {
    fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        ((self.u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }

    fn below(&mut self, n: usize) -> usize {
        (self.u64() % n.max(1) as u64) as usize
    }
}

/// One row of the report.
struct Row {
    kernel: &'static str,
    dtype: &'static str,
    size: String,
    error: f64,
    bound: f64,
    note: String,
}

impl Row {
    fn ok(&self) -> bool {
        self.error <= self.bound
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        _ => "bf16",
    }
}

fn bound(d: Dtype) -> f64 {
    match d {
        Dtype::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// Normwise relative error; NaN anywhere in the device output (a poisoned, unwritten
/// element) counts as infinite.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() || got.iter().any(|x| x.is_nan()) {
        return f64::INFINITY;
    }
    let scale = want
        .iter()
        .fold(0f64, |m, x| m.max(f64::from(x.abs())))
        .max(1e-30);
    let diff = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
    diff / scale
}

fn rope_tables(positions: usize, head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for i in 0..half {
            let a = p as f32 / theta.powf((2 * i) as f32 / head_dim as f32);
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

fn check_rms(
    dev: &KernelDevice,
    g: &mut Gen,
    rows: &mut Vec<Row>,
    quick: bool,
) -> anyhow::Result<()> {
    let sizes: &[(usize, usize)] = if quick {
        &[(1, 576), (7, 100)]
    } else {
        &[(1, 576), (7, 100), (32, 2048), (256, 4096)]
    };
    for &(r, h) in sizes {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let (x, d, w) = (g.vec(r * h, 4.0), g.vec(r * h, 4.0), g.vec(h, 1.0));
            let (gs, gn) = dev.rms_norm_residual(dtype, &x, &d, &w, 1e-5)?;
            let (ws, wn) = k::rms_norm_residual(dtype, &x, &d, &w, 1e-5)?;
            rows.push(Row {
                kernel: "rms_norm_residual",
                dtype: dtype_name(dtype),
                size: format!("{r}x{h}"),
                error: rel_err(&gs, &ws).max(rel_err(&gn, &wn)),
                bound: bound(dtype),
                note: String::new(),
            });
        }
    }
    Ok(())
}

fn check_rope(
    dev: &KernelDevice,
    g: &mut Gen,
    rows: &mut Vec<Row>,
    quick: bool,
) -> anyhow::Result<()> {
    let sizes: &[(usize, usize, usize)] = if quick {
        &[(1, 9, 64), (5, 3, 80)]
    } else {
        &[(1, 9, 64), (5, 3, 80), (32, 32, 64), (256, 8, 128)]
    };
    for &(t, h, d) in sizes {
        let (cos, sin) = rope_tables(4096, d, 10_000.0);
        for dtype in [Dtype::F32, Dtype::Bf16] {
            for (style, rounding) in [
                (RopeStyle::Interleaved, Rounding::None),
                (RopeStyle::Halves, Rounding::F16),
            ] {
                let pos: Vec<u32> = (0..t).map(|_| g.below(4096) as u32).collect();
                let x = g.vec(t * h * d, 2.0);
                let (mut a, mut b) = (x.clone(), x);
                dev.rope(dtype, &mut a, h, d, &pos, &cos, &sin, style, rounding)?;
                k::rope(dtype, &mut b, h, d, &pos, &cos, &sin, style, rounding)?;
                rows.push(Row {
                    kernel: "rope",
                    dtype: dtype_name(dtype),
                    size: format!("{t}x{h}x{d}"),
                    error: rel_err(&a, &b),
                    bound: bound(dtype),
                    note: format!("{style:?}, rounding {rounding:?}"),
                });
            }
        }
    }
    Ok(())
}

fn check_kv(
    dev: &KernelDevice,
    g: &mut Gen,
    rows: &mut Vec<Row>,
    quick: bool,
) -> anyhow::Result<()> {
    let sizes: &[(usize, usize, usize)] = if quick {
        &[(1, 192, 256), (9, 64, 64)]
    } else {
        &[
            (1, 192, 256),
            (9, 64, 64),
            (256, 192, 8192),
            (512, 1024, 16384),
        ]
    };
    for &(t, dim, cache_rows) in sizes {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            // Distinct random slots: a partial shuffle of the cache's rows.
            let mut all: Vec<u32> = (0..cache_rows as u32).collect();
            for i in 0..t {
                let j = i + g.below(cache_rows - i);
                all.swap(i, j);
            }
            let slots = &all[..t];
            let src = g.vec(t * dim, 3.0);
            let cache = g.vec(cache_rows * dim, 3.0);
            // The whole cache comes back, so rows the kernel must not touch are compared too.
            let (mut a, mut b) = (
                cache.clone(),
                cache.iter().map(|v| dtype.round(*v)).collect::<Vec<_>>(),
            );
            dev.kv_write(dtype, &mut a, dim, &src, slots, Rounding::F16)?;
            k::kv_write(dtype, &mut b, dim, &src, slots, Rounding::F16)?;
            rows.push(Row {
                kernel: "kv_write",
                dtype: dtype_name(dtype),
                size: format!("{t} rows of {dim} into {cache_rows}"),
                error: rel_err(&a, &b),
                bound: bound(dtype),
                note: "rounding F16".into(),
            });
        }
    }
    Ok(())
}

fn check_attention(
    dev: &KernelDevice,
    g: &mut Gen,
    rows: &mut Vec<Row>,
    quick: bool,
) -> anyhow::Result<()> {
    // (heads, kv_heads, head_dim): SmolLM2-135M, Llama-3.2-1B, a 128-wide head without GQA.
    let models: &[(usize, usize, usize)] = &[(9, 3, 64), (32, 8, 64), (8, 8, 128)];
    let batches: &[(usize, usize)] = if quick {
        &[(1, 40), (3, 300)]
    } else {
        &[(1, 40), (32, 2048), (256, 1024)]
    };
    let block_size = 16;
    for &(heads, kv_heads, hd) in models {
        for &(seqs, max_len) in batches {
            let lens: Vec<usize> = (0..seqs).map(|_| 1 + g.below(max_len)).collect();
            let blocks: usize = lens.iter().map(|l| l.div_ceil(block_size)).sum::<usize>() + 8;
            let mut ids: Vec<u32> = (0..blocks as u32).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, g.below(i + 1));
            }
            let mut next = ids.into_iter();
            let tables: Vec<Vec<u32>> = lens
                .iter()
                .map(|l| next.by_ref().take(l.div_ceil(block_size)).collect())
                .collect();
            let seq_refs: Vec<(&[u32], usize)> = tables
                .iter()
                .zip(&lens)
                .map(|(t, l)| (t.as_slice(), *l))
                .collect();
            let bt = BlockTables::new(&seq_refs, block_size)?;
            let kv_dim = kv_heads * hd;
            let kc = g.vec(blocks * block_size * kv_dim, 1.0);
            let vc = g.vec(blocks * block_size * kv_dim, 1.0);
            let q = g.vec(seqs * heads * hd, 1.0);
            for dtype in [Dtype::F32, Dtype::Bf16] {
                for rounding in [Rounding::None, Rounding::F16] {
                    if dtype == Dtype::Bf16 && rounding == Rounding::F16 {
                        continue;
                    }
                    let shape =
                        AttentionShape::new(heads, kv_heads, hd, block_size)?.rounding(rounding);
                    let got = dev.paged_attention(dtype, &shape, &q, &kc, &vc, &bt)?;
                    let want = k::paged_attention(dtype, &shape, &q, &kc, &vc, &bt)?;
                    let bound = if rounding == Rounding::F16 {
                        2e-3
                    } else {
                        bound(dtype)
                    };
                    rows.push(Row {
                        kernel: "paged_attention",
                        dtype: dtype_name(dtype),
                        size: format!("{seqs} seqs <= {max_len}, {heads}/{kv_heads}x{hd}"),
                        error: rel_err(&got, &want),
                        bound,
                        note: format!("probabilities {rounding:?}"),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Whether `got` is what the reference picks for `p` with its draw or top-p nudged by 1e-4:
/// a draw within float noise of a boundary between two tokens may land on either.
fn near_boundary(
    logits: &[f32],
    vocab: usize,
    dtype: Dtype,
    p: (f32, u32, f32, f32, f32),
    got: u32,
) -> bool {
    let (t, top_k, top_p, min_p, u) = p;
    let nudges = [(-1e-4f32, 0f32), (1e-4, 0.0), (0.0, -1e-4), (0.0, 1e-4)];
    nudges.iter().any(|(du, dp)| {
        let u = (u + du).clamp(0.0, 0.999_999);
        let top_p = (top_p + dp).clamp(1e-6, 1.0);
        SampleParams::new(t, top_k, top_p, min_p, u)
            .and_then(|sp| k::sample(dtype, logits, vocab, &[sp]))
            .is_ok_and(|ids| ids[0] == got)
    })
}

fn check_sampling(
    dev: &KernelDevice,
    g: &mut Gen,
    rows: &mut Vec<Row>,
    quick: bool,
) -> anyhow::Result<()> {
    let sizes: &[(usize, usize)] = if quick {
        &[(1, 1000), (4, 49_152)]
    } else {
        &[(1, 49_152), (32, 49_152), (256, 49_152), (8, 128_256)]
    };
    for &(seqs, vocab) in sizes {
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let logits = g.vec(seqs * vocab, 8.0);
            let settings: [(f32, u32, f32, f32); 5] = [
                (0.0, 0, 1.0, 0.0),
                (1.0, 0, 1.0, 0.0),
                (0.7, 50, 1.0, 0.0),
                (0.9, 0, 0.9, 0.0),
                (1.1, 40, 0.95, 0.05),
            ];
            for (t, top_k, top_p, min_p) in settings {
                let raw: Vec<(f32, u32, f32, f32, f32)> = (0..seqs)
                    .map(|_| (t, top_k, top_p, min_p, (g.f32() + 1.0) * 0.5 * 0.999_99))
                    .collect();
                let params: Vec<SampleParams> = raw
                    .iter()
                    .map(|p| SampleParams::new(p.0, p.1, p.2, p.3, p.4))
                    .collect::<Result<_, _>>()?;
                let got = dev.sample(dtype, &logits, vocab, &params)?;
                let want = k::sample(dtype, &logits, vocab, &params)?;
                let mut exact = 0;
                let mut boundary = 0;
                let mut wrong = 0;
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    if a == b {
                        exact += 1;
                    } else if t > 0.0
                        && near_boundary(&logits[i * vocab..][..vocab], vocab, dtype, raw[i], *a)
                    {
                        boundary += 1;
                    } else {
                        wrong += 1;
                    }
                }
                rows.push(Row {
                    kernel: "sample",
                    dtype: dtype_name(dtype),
                    size: format!("{seqs}x{vocab}"),
                    error: wrong as f64,
                    bound: 0.0,
                    note: format!(
                        "T {t} k {top_k} p {top_p} min_p {min_p}: {exact} equal, {boundary} at a boundary, {wrong} wrong"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Without a GPU, the greedy and decode parts run on the CPU against itself on this tiny
/// f32 model: that tests the harness, not the kernels.
fn harness_model() -> RandomModel {
    RandomModel::llama(64, 2, 4, 2, 128, 512).expect("a valid shape")
}

/// One greedy run's tokens and, per token, the gap between the two most likely tokens'
/// log-probabilities (when asked for).
struct Greedy {
    tokens: Vec<u32>,
    gaps: Vec<f32>,
}

/// Runs every prompt at once on `engine`, greedily, `new` tokens each.
/// With `logprobs` the engine samples on the host (and the gaps are known); without, on the
/// kernel path it picks each token with the device sampling kernel.
async fn greedy_runs(
    engine: &Engine,
    prompts: &[Vec<u32>],
    new: usize,
    logprobs: bool,
) -> anyhow::Result<Vec<Greedy>> {
    let mut streams = Vec::new();
    for p in prompts {
        let params = SamplingParams::greedy().max_tokens(new).ignore_eos(true);
        let params = if logprobs { params.logprobs(2) } else { params };
        streams.push(engine.generate(GenerateRequest::tokens(p.clone()).sampling(params))?);
    }
    let mut out = Vec::new();
    for mut s in streams {
        let mut g = Greedy {
            tokens: Vec::new(),
            gaps: Vec::new(),
        };
        while let Some(ev) = s.next().await {
            if let StreamEvent::Token(d) = ev? {
                g.tokens.push(d.token());
                let top = d.top_logprobs();
                g.gaps.push(match top {
                    [a, b, ..] => (a.logprob() - b.logprob()).abs(),
                    _ => f32::INFINITY,
                });
            }
        }
        out.push(g);
    }
    Ok(out)
}

/// Part (b): greedy tokens on the GPU equal the CPU's for a SmolLM2-shaped f32 random model.
/// A divergence counts as a failure unless the CPU's two best tokens were within 1e-3 in
/// log-probability at that step (a near-tie that float summation order may break either way).
fn check_greedy(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    target: Device,
) -> anyhow::Result<(String, bool)> {
    let spec = match target {
        Device::Cpu => harness_model(),
        _ => RandomModel::smollm2_135m(),
    }
    .seed(args.seed);
    let mut g = Gen(args.seed ^ 0x5eed);
    let lens: &[usize] = if args.quick {
        &[5, 33]
    } else {
        &[1, 5, 17, 33, 64, 100]
    };
    let new = if args.quick { 16 } else { 32 };
    let build = |device, graphs, pipelined| {
        Engine::builder()
            .random_model(spec.clone())
            .device(device)
            .kv_blocks(256)
            .max_seqs(lens.len())
            .cuda_graphs(graphs)
            .pipelined_decode(pipelined)
            .build()
    };
    let t = Instant::now();
    let cpu = build(Device::Cpu, false, false)?;
    let gpu = build(target, true, true)?;
    let serial = build(target, true, false)?;
    let eager = build(target, false, true)?;
    let vocab = cpu.model_info().vocab_size;
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .map(|&n| (0..n).map(|_| g.below(vocab) as u32).collect())
        .collect();
    println!(
        "greedy: {} parameters, kernels cpu {:?} gpu {:?}",
        spec.parameters(),
        cpu.model_info().kernels,
        gpu.model_info().kernels
    );
    let want = rt.block_on(greedy_runs(&cpu, &prompts, new, true))?;
    let mut ok = true;
    let mut lines = Vec::new();
    // The GPU four times: sampling on the host (log-probabilities asked for), then on the
    // device, both with decode steps as CUDA graphs and pipelined; then the device sampler
    // with graphs one step at a time (pipelining off), and with every step launched eagerly.
    for (label, engine, logprobs) in [
        ("host sampler, graphs", &gpu, true),
        ("device sampler, graphs, pipelined", &gpu, false),
        ("device sampler, graphs, one step at a time", &serial, false),
        ("device sampler, eager, pipelined", &eager, false),
    ] {
        lines.push(format!("  gpu, {label}:"));
        let got = rt.block_on(greedy_runs(engine, &prompts, new, logprobs))?;
        for ((w, gt), n) in want.iter().zip(&got).zip(lens) {
            let same = w
                .tokens
                .iter()
                .zip(&gt.tokens)
                .take_while(|(a, b)| a == b)
                .count();
            let verdict = if same == w.tokens.len() && w.tokens.len() == gt.tokens.len() {
                "equal".to_string()
            } else if w.gaps.get(same).is_some_and(|gap| *gap < 1e-3) {
                format!(
                    "equal for {same} tokens, then a near-tie (gap {:.1e})",
                    w.gaps[same]
                )
            } else {
                ok = false;
                format!(
                    "DIFFERENT after {same} tokens (gap {:.1e}): cpu {:?} gpu {:?}",
                    w.gaps.get(same).copied().unwrap_or(f32::NAN),
                    &w.tokens[same..(same + 4).min(w.tokens.len())],
                    &gt.tokens[same..(same + 4).min(gt.tokens.len())]
                )
            };
            lines.push(format!("    prompt of {n:>3} tokens, {new} new: {verdict}"));
        }
    }
    // The graphs must have served the decode steps (on a GPU; the CPU has none).
    let m = gpu.metrics();
    let graphs = if target == Device::Cpu {
        "no graphs on the CPU".to_string()
    } else if let Some(why) = &m.graphs_off {
        ok = false;
        format!("FAIL: graphs turned off: {why}")
    } else if m.graph_replays == 0 {
        ok = false;
        "FAIL: no decode step ran as a graph".to_string()
    } else {
        format!(
            "{} shapes captured, {} steps replayed",
            m.graph_captures, m.graph_replays
        )
    };
    lines.push(format!("  cuda graphs: {graphs}"));
    // The device sampler's run must have pipelined its decode steps (the CPU's f32 model runs
    // candle's path, which has none).
    let pipelined = if target == Device::Cpu {
        "not on the CPU's candle path".to_string()
    } else if m.pipelined_steps == 0 {
        ok = false;
        "FAIL: no decode step was launched ahead".to_string()
    } else {
        format!("{} steps launched ahead", m.pipelined_steps)
    };
    lines.push(format!("  pipelined decode: {pipelined}"));
    println!("{}", lines.join("\n"));
    let summary = format!(
        "{} prompts, {} ({:.1} s)",
        prompts.len(),
        if ok { "ok" } else { "FAIL" },
        t.elapsed().as_secs_f64()
    );
    Ok((summary, ok))
}

/// One row of the decode table.
struct DecodeRow {
    model: &'static str,
    /// Whether decode steps ran as CUDA graphs.
    graphs: bool,
    /// Whether decode steps were pipelined (launched before the previous step's ids were read).
    pipelined: bool,
    batch: usize,
    tokens_per_s: f64,
    ms_per_step: f64,
    floor_tokens_per_s: Option<f64>,
}

/// Part (c): decode tokens/s through the engine for bf16 random models at several batch
/// sizes, next to the bandwidth floor (weights plus the KV cache read per step, at the copy
/// bandwidth `bw`).
fn decode_bench(
    args: &Args,
    rt: &tokio::runtime::Runtime,
    bw: Option<f64>,
    target: Device,
) -> anyhow::Result<Vec<DecodeRow>> {
    let batches: &[usize] = if args.quick { &[1, 32] } else { &[1, 32, 256] };
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let (prompt, new) = (16usize, args.new_tokens);
    let mut rows = Vec::new();
    // (name, model, layers, key/value width) for the floor's KV bytes.
    let models = match target {
        Device::Cpu => vec![("harness", harness_model(), 2usize, 32usize)],
        _ => vec![
            (
                "SmolLM2-135M",
                RandomModel::smollm2_135m().dtype(Dtype::Bf16),
                30,
                192,
            ),
            (
                "Llama-1B",
                RandomModel::llama_1b().dtype(Dtype::Bf16),
                16,
                512,
            ),
        ],
    };
    // Each model with decode steps as pipelined CUDA graphs at every batch size; then, at the
    // small batches, where launch overhead and the host's share of a step matter most, graphs
    // one step at a time (pipelining off) and pipelined eager launches (not on the CPU: no
    // graphs).
    let small_batches: &[usize] = if args.quick { &[1] } else { &[1, 32] };
    let mut runs = Vec::new();
    for (name, spec, layers, kv_dim) in models {
        runs.push((name, spec.clone(), layers, kv_dim, true, true, batches));
        if target != Device::Cpu {
            runs.push((
                name,
                spec.clone(),
                layers,
                kv_dim,
                true,
                false,
                small_batches,
            ));
            runs.push((name, spec, layers, kv_dim, false, true, small_batches));
        }
    }
    for (name, spec, layers, kv_dim, graphs, pipelined, batches) in runs {
        let spec = spec.seed(args.seed);
        let params = spec.parameters();
        let t = Instant::now();
        let block = 16;
        let per_seq = (prompt + new).div_ceil(block) + 1;
        let engine = Engine::builder()
            .random_model(spec)
            .device(target)
            .block_size(block)
            .kv_blocks(max_batch * per_seq + 16)
            .max_seqs(max_batch)
            .max_batch_tokens(max_batch * prompt)
            .prefix_caching(false)
            .cuda_graphs(graphs)
            .pipelined_decode(pipelined)
            .build()?;
        println!(
            "decode: {name} ({params} parameters, {}, kernels {:?}, graphs {graphs}, pipelined {pipelined}) built in {:.1} s",
            engine.model_info().weight_type,
            engine.model_info().kernels,
            t.elapsed().as_secs_f64()
        );
        let mut g = Gen(args.seed ^ 0xdec0de);
        let vocab = engine.model_info().vocab_size;
        let run = |batch: usize, new: usize, g: &mut Gen| -> anyhow::Result<(f64, f64)> {
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|_| (0..prompt).map(|_| g.below(vocab) as u32).collect())
                .collect();
            let done = rt.block_on(async {
                let mut streams = Vec::new();
                for p in &prompts {
                    let params = SamplingParams::greedy().max_tokens(new).ignore_eos(true);
                    streams.push(
                        engine.generate(GenerateRequest::tokens(p.clone()).sampling(params))?,
                    );
                }
                let mut out = Vec::new();
                for s in streams {
                    out.push(s.collect().await?);
                }
                anyhow::Ok(out)
            })?;
            // Every sequence decodes in the same steps: from the last first token to the last
            // token is `new - 1` steps of the whole batch.
            let first = done
                .iter()
                .map(|c| c.summary.timings.time_to_first_token)
                .max()
                .unwrap_or_default();
            let last = done
                .iter()
                .map(|c| c.summary.timings.total)
                .max()
                .unwrap_or_default();
            let secs = (last.saturating_sub(first)).as_secs_f64().max(1e-9);
            let steps = (new - 1) as f64;
            Ok(((batch as f64 * steps) / secs, secs / steps * 1e3))
        };
        run(1, 4, &mut g)?; // warm-up: module loads, cuBLAS handles, allocations
        for &batch in batches {
            let (tps, ms) = run(batch, new, &mut g)?;
            // Bytes a step must move: every bf16 weight once, plus each sequence's K and V
            // (bf16) at its mean context length.
            let mean_ctx = (prompt + new / 2) as f64;
            let kv = batch as f64 * mean_ctx * (layers * kv_dim * 2 * 2) as f64;
            let bytes = params as f64 * 2.0 + kv;
            rows.push(DecodeRow {
                model: name,
                graphs,
                pipelined,
                batch,
                tokens_per_s: tps,
                ms_per_step: ms,
                floor_tokens_per_s: bw.map(|bw| batch as f64 * bw / bytes),
            });
            println!("  batch {batch:>3}: {tps:>9.0} tokens/s, {ms:>7.2} ms/step");
        }
        let m = engine.metrics();
        if graphs && target != Device::Cpu {
            println!(
                "  cuda graphs: {} shapes captured, {} steps replayed{}",
                m.graph_captures,
                m.graph_replays,
                m.graphs_off
                    .as_ref()
                    .map_or(String::new(), |why| format!(", TURNED OFF: {why}"))
            );
        }
        if pipelined {
            println!(
                "  pipelined decode: {} steps launched ahead",
                m.pipelined_steps
            );
        }
        drop(engine);
    }
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    println!(
        "gpu_check: seed {} (rerun with --seed {} to repeat)",
        args.seed, args.seed
    );
    let dev = match KernelDevice::cuda(args.device) {
        Ok(d) => {
            println!("device: CUDA {}", args.device);
            d
        }
        Err(e) if args.require_gpu => bail!("no GPU: {e}"),
        Err(e) => {
            println!("device: CPU ({e}); this tests the harness, not the kernels");
            KernelDevice::cpu()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut g = Gen(args.seed);
    let mut rows = Vec::new();
    let start = Instant::now();
    let kernels = args.parts.contains(&Part::Kernels);
    if kernels {
        check_rms(&dev, &mut g, &mut rows, args.quick)?;
        check_rope(&dev, &mut g, &mut rows, args.quick)?;
        check_kv(&dev, &mut g, &mut rows, args.quick)?;
        check_attention(&dev, &mut g, &mut rows, args.quick)?;
        check_sampling(&dev, &mut g, &mut rows, args.quick)?;
    }
    let kernel_secs = start.elapsed().as_secs_f64();

    // The bandwidth floor's denominator, for (a)'s report and (c)'s table.
    let bandwidth = if dev.is_cuda() && (kernels || args.parts.contains(&Part::Decode)) {
        let bytes = if args.quick { 256 << 20 } else { 1 << 30 };
        dev.copy_bandwidth(bytes, 2)?; // warm-up
        Some(dev.copy_bandwidth(bytes, 10)?)
    } else {
        None
    };

    // Without a GPU (and without --require-gpu) the engine parts run on the CPU on a tiny
    // model, which tests the harness.
    let target = if dev.is_cuda() {
        Device::Cuda(args.device)
    } else {
        Device::Cpu
    };

    // (b) Greedy generation on the GPU equals the CPU for a random-weight model.
    let greedy = if args.parts.contains(&Part::Greedy) {
        Some(check_greedy(&args, &rt, target)?)
    } else {
        None
    };

    // (c) Decode throughput next to the bandwidth floor.
    let decode = if args.parts.contains(&Part::Decode) {
        Some(decode_bench(&args, &rt, bandwidth, target)?)
    } else {
        None
    };

    let mut failed = 0;
    if kernels {
        println!();
        println!(
            "{:<18} {:<5} {:<34} {:>10} {:>8}  {:<4} note",
            "kernel", "dtype", "size", "error", "bound", "ok"
        );
        for r in &rows {
            println!(
                "{:<18} {:<5} {:<34} {:>10.2e} {:>8.0e}  {:<4} {}",
                r.kernel,
                r.dtype,
                r.size,
                r.error,
                r.bound,
                if r.ok() { "ok" } else { "FAIL" },
                r.note
            );
        }
        println!();
        failed = rows.iter().filter(|r| !r.ok()).count();
        println!(
            "kernels: {} checks, {failed} failed ({kernel_secs:.1} s)",
            rows.len()
        );
        match bandwidth {
            Some(bw) => {
                println!("copy bandwidth: {:.0} GB/s (read + write)", bw / 1e9);
                // bf16 weights that every decode step must read, at batch 1.
                for (name, params) in [
                    ("SmolLM2-135M", RandomModel::smollm2_135m().parameters()),
                    ("Llama-1B", RandomModel::llama_1b().parameters()),
                ] {
                    let bytes = params as f64 * 2.0;
                    println!(
                        "  {name}: {:.0} MB of bf16 weights per step, floor {:.0} us/step = {:.0} tokens/s at batch 1",
                        bytes / 1e6,
                        bytes / bw * 1e6,
                        bw / bytes
                    );
                }
            }
            None => println!("copy bandwidth: not measured on the CPU"),
        }
    }
    let mut greedy_failed = false;
    if let Some((summary, ok)) = &greedy {
        println!("greedy GPU = CPU: {summary}");
        greedy_failed = !ok;
    }
    if let Some(decode) = &decode {
        println!();
        println!(
            "{:<14} {:>6} {:>9} {:>5} {:>12} {:>9} {:>14} {:>8}   (Keel engine, random weights (bf16 on a GPU), 16-token prompts, {} new tokens, greedy on the device: token ids to the host each step)",
            "model",
            "graphs",
            "pipelined",
            "batch",
            "tokens/s",
            "ms/step",
            "floor tok/s",
            "of floor",
            args.new_tokens
        );
        for r in decode {
            let (floor, share) = match r.floor_tokens_per_s {
                Some(f) => (
                    format!("{f:.0}"),
                    format!("{:.1}%", 100.0 * r.tokens_per_s / f),
                ),
                None => ("-".into(), "-".into()),
            };
            println!(
                "{:<14} {:>6} {:>9} {:>5} {:>12.0} {:>9.2} {:>14} {:>8}",
                r.model,
                if r.graphs { "yes" } else { "no" },
                if r.pipelined { "yes" } else { "no" },
                r.batch,
                r.tokens_per_s,
                r.ms_per_step,
                floor,
                share
            );
        }
    }
    if failed > 0 {
        bail!("{failed} kernel checks failed");
    }
    if greedy_failed {
        bail!("greedy generation on the GPU differs from the CPU");
    }
    Ok(())
}
