//! Drives one engine with N concurrent requests of a configurable input and output length,
//! and reports throughput, time to first token and latency percentiles, and batch occupancy.
//!
//! ```text
//! cargo run --release -p keel-examples --example serve_bench -- \
//!     [--model PATH] [--requests 16] [--concurrency 16] [--input-tokens 50] [--output-tokens 50]
//!     [--max-seqs 32] [--max-batch-tokens 256] [--dequantize] [--kernels auto|candle] [--threads N]
//!     [--same-prompt] [--no-prefix-cache]
//!     [--floor]   (also measure the machine's memory read bandwidth, the decode ceiling, and
//!                  the AVX2 byte-multiply rate, the batched kernels' compute ceiling)
//! ```
#![allow(clippy::print_stdout)] // a CLI program reports on stdout

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_serving::{
    Engine, GenerateRequest, Kernels, SamplingParams, Specials, StreamEvent, Weights,
};

struct Args {
    model: Option<String>,
    requests: usize,
    concurrency: usize,
    input: usize,
    output: usize,
    max_seqs: usize,
    max_batch_tokens: usize,
    dequantize: bool,
    candle: bool,
    threads: Option<usize>,
    floor: bool,
    same_prompt: bool,
    no_prefix_cache: bool,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        model: None,
        requests: 16,
        concurrency: 16,
        input: 50,
        output: 50,
        max_seqs: 32,
        max_batch_tokens: 256,
        dequantize: false,
        candle: false,
        threads: None,
        floor: false,
        same_prompt: false,
        no_prefix_cache: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(val()?),
            "--requests" => a.requests = val()?.parse()?,
            "--concurrency" => a.concurrency = val()?.parse()?,
            "--input-tokens" => a.input = val()?.parse()?,
            "--output-tokens" => a.output = val()?.parse()?,
            "--max-seqs" => a.max_seqs = val()?.parse()?,
            "--max-batch-tokens" => a.max_batch_tokens = val()?.parse()?,
            "--dequantize" => a.dequantize = true,
            "--kernels" => {
                a.candle = match val()?.as_str() {
                    "auto" => false,
                    "candle" => true,
                    other => bail!("--kernels takes auto or candle, not {other}"),
                }
            }
            "--threads" => a.threads = Some(val()?.parse()?),
            "--floor" => a.floor = true,
            "--same-prompt" => a.same_prompt = true,
            "--no-prefix-cache" => a.no_prefix_cache = true,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.requests == 0 || a.concurrency == 0 || a.input == 0 || a.output == 0 {
        bail!("counts must be positive");
    }
    Ok(a)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Peak resident set size of this process, from /proc (Linux only).
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let a = parse()?;
    let blocks = (a.concurrency.min(a.max_seqs) * (a.input + a.output)).div_ceil(16) + 16;
    let mut b = Engine::builder()
        .kv_blocks(blocks)
        .max_seqs(a.max_seqs)
        .max_batch_tokens(a.max_batch_tokens)
        .weights(if a.dequantize {
            Weights::Dequantized
        } else {
            Weights::AsStored
        });
    if a.candle {
        b = b.kernels(Kernels::Candle);
    }
    if let Some(n) = a.threads {
        b = b.threads(n);
    }
    if a.no_prefix_cache {
        b = b.prefix_caching(false);
    }
    if let Some(m) = &a.model {
        b = b.model_path(m);
    }
    let load_started = Instant::now();
    let engine = match b.build() {
        Ok(e) => Arc::new(e),
        Err(e @ keel_serving::Error::ModelNotFound { .. }) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
        Err(e) => return Err(e.into()),
    };
    let load_time = load_started.elapsed();
    let info = engine.model_info().clone();
    let base = "Once upon a time, in a small village by the sea, there lived an old fisherman who told \
                stories about the storms he had seen, the ships he had saved and the friends he had lost. ";
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < a.input {
        text.push_str(base);
        ids = engine.tokenizer().encode(&text, Specials::Plain)?;
    }
    ids.truncate(a.input);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    let results = rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency));
        let mut tasks = Vec::new();
        for i in 0..a.requests {
            let engine = engine.clone();
            let sem = sem.clone();
            let mut prompt = ids.clone();
            // Vary the first token so requests are not identical, unless asked to share the
            // whole prompt (what the prefix cache is for).
            if !a.same_prompt {
                prompt[0] = ids[i % ids.len()];
            }
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await?;
                let t0 = Instant::now();
                let req = GenerateRequest::tokens(prompt).sampling(
                    SamplingParams::greedy()
                        .max_tokens(a.output)
                        .ignore_eos(true),
                );
                let mut s = engine.generate(req)?;
                let mut ttft = None;
                let mut n = 0usize;
                // Gaps between this request's tokens as they arrive here (the client's view).
                let (mut last, mut gaps) = (None::<Instant>, Vec::new());
                while let Some(ev) = s.next().await {
                    match ev? {
                        StreamEvent::Token(_) => {
                            let now = Instant::now();
                            ttft.get_or_insert_with(|| now - t0);
                            if let Some(l) = last {
                                gaps.push(now - l);
                            }
                            last = Some(now);
                            n += 1;
                        }
                        StreamEvent::Done(_) => break,
                        _ => {}
                    }
                }
                anyhow::Ok((ttft.unwrap_or_default(), t0.elapsed(), n, gaps))
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await??);
        }
        anyhow::Ok(out)
    })?;
    let wall = started.elapsed();
    let m = engine.metrics();
    let mut gaps: Vec<Duration> = results.iter().flat_map(|r| r.3.iter().copied()).collect();
    gaps.sort();
    let mut ttfts: Vec<Duration> = results.iter().map(|r| r.0).collect();
    let mut lats: Vec<Duration> = results.iter().map(|r| r.1).collect();
    ttfts.sort();
    lats.sort();
    let generated: usize = results.iter().map(|r| r.2).sum();
    println!(
        "serve_bench: {} ({}{}, {} kernels), {} requests, concurrency {}, {} in / {} out tokens",
        info.architecture,
        info.weight_type,
        if a.dequantize {
            ", dequantized to f32"
        } else {
            ""
        },
        info.kernels,
        a.requests,
        a.concurrency,
        a.input,
        a.output
    );
    println!("  model load           {:>9.2} s", load_time.as_secs_f64());
    println!("  wall time            {:>9.2} s", wall.as_secs_f64());
    println!(
        "  output tokens/s      {:>9.1}",
        generated as f64 / wall.as_secs_f64()
    );
    println!(
        "  requests/s           {:>9.2}",
        a.requests as f64 / wall.as_secs_f64()
    );
    println!(
        "  TTFT p50 / p99       {:>9.0} / {:.0} ms",
        ms(pct(&ttfts, 0.5)),
        ms(pct(&ttfts, 0.99))
    );
    println!(
        "  latency p50 / p99    {:>9.0} / {:.0} ms",
        ms(pct(&lats, 0.5)),
        ms(pct(&lats, 0.99))
    );
    println!(
        "  mean batch size      {:>9.2} sequences/step (occupancy {:.0}% of max_seqs {})",
        m.mean_batch_size,
        m.batch_occupancy * 100.0,
        a.max_seqs
    );
    println!(
        "  inter-token latency  {:>9.1} ms (engine mean); client p50 / p99 {:.1} / {:.1} ms",
        ms(m.mean_inter_token_latency),
        ms(pct(&gaps, 0.5)),
        ms(pct(&gaps, 0.99))
    );
    println!(
        "  decode-only steps    {:>9} of {} steps, {:.1} ms each: {:.0} tokens/s aggregate",
        m.decode_only_steps,
        m.steps,
        ms(m.mean_decode_only_step),
        m.decode_only_tokens_per_second
    );
    println!("  preemptions          {:>9}", m.preemptions);
    println!(
        "  prefix-cached tokens {:>9} of {} prompt tokens",
        m.prefix_cached_tokens,
        a.requests * a.input
    );
    println!(
        "  KV cache             {:>9.1} KiB per token, {:.1} MiB per {}-token sequence",
        info.kv_bytes_per_token as f64 / 1024.0,
        (info.kv_bytes_per_token * (a.input + a.output)) as f64 / (1 << 20) as f64,
        a.input + a.output
    );
    if let Some(rss) = peak_rss_mib() {
        println!("  peak RSS             {:>9.0} MiB", rss);
    }
    rt.block_on(engine.shutdown());
    if a.floor {
        let threads = a
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let path = keel_serving::resolve_model_path(a.model.as_deref().map(std::path::Path::new))?;
        let bytes = std::fs::metadata(&path)?.len() as f64;
        // Two reads: one far larger than any cache (DRAM), and one of the model's own size read
        // over and over, which a decode step's weight stream can at best match (it also gets
        // whatever share of the file the last-level cache keeps between steps).
        let dram = read_bandwidth(threads, 512 << 20, 5);
        let gbs = read_bandwidth(threads, bytes as usize, 20);
        let single = 1e3 / ms(m.mean_inter_token_latency);
        println!(
            "  memory read          {:>9.1} GB/s with {threads} threads (best of 5, 512 MiB: DRAM)",
            dram
        );
        println!(
            "  model-sized read     {:>9.1} GB/s with {threads} threads (best of 20, {:.1} MB)",
            gbs,
            bytes / 1e6
        );
        println!(
            "  decode ceiling       {:>9.0} tokens/s (every weight byte read once per step, at the model-sized rate)",
            gbs * 1e9 / bytes
        );
        println!(
            "  engine decode        {:>9.0} tokens/s per stream = {:.0}% of the ceiling",
            single,
            100.0 * single * bytes / (gbs * 1e9)
        );
        if let Some((peak, mixed)) = byte_multiply_rates(threads) {
            println!(
                "  vpmaddubsw peak      {:>9.0} G multiply-adds/s with {threads} threads (independent multiplies only)",
                peak
            );
            println!(
                "  with an add each     {:>9.0} G multiply-adds/s (each multiply's result added into an accumulator)",
                mixed
            );
        }
    }
    Ok(())
}

/// The compute ceiling of the AVX2 byte kernels on this machine: `threads` threads each run
/// eight independent chains of `vpmaddubsw` (32 multiply-adds each) on a broadcast operand, alone
/// and with each result added into an accumulator (the kernels' shape), in G multiply-adds/s.
/// `None` without AVX2.
fn byte_multiply_rates(threads: usize) -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return None;
        }
        let rate = |mixed: bool| {
            let n = 20_000_000usize;
            let t0 = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads.max(1) {
                    // SAFETY: AVX2 was detected above.
                    s.spawn(move || std::hint::black_box(unsafe { multiply_chains(n, mixed) }));
                }
            });
            (threads.max(1) * n * 8 * 32) as f64 / t0.elapsed().as_secs_f64() / 1e9
        };
        Some((rate(false), rate(true)))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = threads;
        None
    }
}

/// Eight independent `vpmaddubsw` chains, `n` rounds; with `mixed`, each product is added into
/// its chain's accumulator instead of feeding the next multiply.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn multiply_chains(n: usize, mixed: bool) -> i64 {
    use std::arch::x86_64::*;
    let words: [i32; 32] = std::array::from_fn(|i| i as i32 + 1);
    let a = _mm256_set1_epi8(3);
    let mut acc = [_mm256_set1_epi16(1); 8];
    if mixed {
        for i in 0..n {
            for (k, v) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_epi32(words[k * 4 + (i & 3)]);
                *v = _mm256_add_epi16(*v, _mm256_maddubs_epi16(a, b));
            }
        }
    } else {
        for i in 0..n {
            for (k, v) in acc.iter_mut().enumerate() {
                let b = _mm256_set1_epi32(words[k * 4 + (i & 3)]);
                *v = _mm256_maddubs_epi16(*v, b);
            }
        }
    }
    acc.iter()
        .map(|v| i64::from(_mm256_extract_epi16::<0>(*v)))
        .sum()
}

/// A STREAM-style read: `threads` threads each sum their share of a buffer of `bytes`; the
/// best of `passes` passes, in GB/s. The physical floor a memory-bound decode step cannot beat.
fn read_bandwidth(threads: usize, bytes: usize, passes: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = f64::MAX;
    let mut sink = 0u64;
    for _ in 0..passes {
        let t0 = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|part| {
                    // A plain wrapping sum: the compiler vectorises it with several accumulators.
                    s.spawn(move || part.iter().fold(0u64, |a, v| a.wrapping_add(*v)))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0u64, u64::wrapping_add)
        });
        best = best.min(t0.elapsed().as_secs_f64());
        sink = sink.wrapping_add(total);
    }
    std::hint::black_box(sink);
    (words * 8) as f64 / best / 1e9
}
