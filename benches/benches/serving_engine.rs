//! The serving engine on the real model (SmolLM2-135M-Instruct Q4_1): prefill of a 50-token
//! prompt, single-stream decode, and aggregate decode with 16 concurrent streams, beside plain
//! candle 0.11's `quantized_llama` on the same file as the peer measured in the same run.
//!
//! Run: `cargo bench -p keel-benches --bench serving_engine` (after `scripts/fetch-model`).
#![allow(missing_docs)] // criterion_main! generates an undocumented main.
#![allow(clippy::unwrap_used)] // A bench aborts loudly on setup failure.

use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel_serving::{Engine, GenerateRequest, SamplingParams, Specials};

const PROMPT_TOKENS: usize = 50;
const DECODE_TOKENS: usize = 32;

fn prompt(engine: &Engine, salt: usize) -> Vec<u32> {
    let text = format!(
        "Request {salt}: the history of the printing press begins in the fifteenth century, when \
         movable type changed how books were made, sold and read across Europe, and the ideas \
         they carried spread faster than ever before, reshaping religion, science and politics."
    );
    let text = format!("{text} {text}");
    let mut ids = engine.tokenizer().encode(&text, Specials::Plain).unwrap();
    ids.truncate(PROMPT_TOKENS);
    assert_eq!(ids.len(), PROMPT_TOKENS);
    ids
}

fn bench(c: &mut Criterion) {
    let path = match keel_serving::resolve_model_path(None) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("serving_engine bench skipped: {e}");
            return;
        }
    };
    // No prefix cache: every iteration feeds the same prompt, and a cached prefix would turn
    // the prefill measured below into two tokens' work.
    let engine = Engine::builder()
        .model_path(&path)
        .kv_blocks(256)
        .prefix_caching(false)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut file = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut file).unwrap();
    let mut candle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
    let p0 = prompt(&engine, 0);

    let mut g = c.benchmark_group("serving_engine/prefill_50");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    g.throughput(Throughput::Elements(PROMPT_TOKENS as u64));
    g.bench_function("keel", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let req = GenerateRequest::tokens(p0.clone())
                    .sampling(SamplingParams::greedy().max_tokens(1));
                let c = rt
                    .block_on(engine.generate(req).unwrap().collect())
                    .unwrap();
                total += c.summary.timings.time_to_first_token;
            }
            total
        })
    });
    g.bench_function("candle_quantized_llama", |b| {
        b.iter(|| {
            let x = Tensor::new(p0.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            candle.forward(&x, 0).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("serving_engine/decode");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements((DECODE_TOKENS - 1) as u64));
    g.bench_function(BenchmarkId::new("keel", "1_stream"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let req = GenerateRequest::tokens(p0.clone()).sampling(
                    SamplingParams::greedy()
                        .max_tokens(DECODE_TOKENS)
                        .ignore_eos(true),
                );
                let c = rt
                    .block_on(engine.generate(req).unwrap().collect())
                    .unwrap();
                total += c.summary.timings.total - c.summary.timings.time_to_first_token;
            }
            total
        })
    });
    g.bench_function(
        BenchmarkId::new("candle_quantized_llama", "1_stream"),
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let x = Tensor::new(p0.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let mut logits = candle.forward(&x, 0).unwrap();
                    let start = Instant::now();
                    for i in 0..DECODE_TOKENS - 1 {
                        let next = logits
                            .squeeze(0)
                            .unwrap()
                            .argmax(0)
                            .unwrap()
                            .to_scalar::<u32>()
                            .unwrap();
                        let x = Tensor::new(&[next], &Device::Cpu)
                            .unwrap()
                            .unsqueeze(0)
                            .unwrap();
                        logits = candle.forward(&x, PROMPT_TOKENS + i).unwrap();
                    }
                    total += start.elapsed();
                }
                total
            })
        },
    );
    g.finish();

    // Aggregate throughput, prefill included, for 1 and 16 concurrent streams: the ratio shows
    // what batching buys (16 matrix-vector products become one matrix-matrix product).
    let mut g = c.benchmark_group("serving_engine/end_to_end");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for streams in [1usize, 16] {
        let prompts: Vec<Vec<u32>> = (0..streams).map(|i| prompt(&engine, i)).collect();
        g.throughput(Throughput::Elements((streams * DECODE_TOKENS) as u64));
        g.bench_with_input(BenchmarkId::new("keel", streams), &streams, |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    let handles: Vec<_> = prompts
                        .iter()
                        .map(|p| {
                            let req = GenerateRequest::tokens(p.clone()).sampling(
                                SamplingParams::greedy()
                                    .max_tokens(DECODE_TOKENS)
                                    .ignore_eos(true),
                            );
                            engine.generate(req).unwrap().collect()
                        })
                        .collect();
                    for h in handles {
                        h.await.unwrap();
                    }
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
