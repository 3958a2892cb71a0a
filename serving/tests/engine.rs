//! Scheduler and API behaviour on a tiny random-weight model: preemption, chunked prefill,
//! cancellation, stop conditions, seeds, log-probabilities and metrics.
#![allow(clippy::unwrap_used)] // Helpers shared by the tests below: failures should abort loudly.
mod common;

use std::time::Duration;

use candle_core::quantized::GgmlDType;
use common::tiny;
use keel_serving::{
    Engine, EngineBuilder, FinishReason, GenerateRequest, SamplingParams, StreamEvent,
};

fn builder(dir: &tempfile::TempDir) -> EngineBuilder {
    Engine::builder().model_path(tiny::write_gguf(dir.path(), 11, GgmlDType::F32, "llama"))
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams::greedy().max_tokens(n).ignore_eos(true)
}

async fn run(e: &Engine, prompt: &str, p: SamplingParams) -> keel_serving::Completion {
    e.generate(GenerateRequest::text(prompt).sampling(p))
        .unwrap()
        .collect()
        .await
        .unwrap()
}

const PROMPTS: [&str; 4] = ["hello world", "fox", "1 2 3", "what is this?"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_recomputes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = builder(&dir).build().unwrap();
    let mut want = Vec::new();
    for p in PROMPTS {
        want.push(run(&roomy, p, greedy(12)).await.tokens);
    }
    // 8 blocks of 4 tokens: each request needs 4 to 6 blocks alone, so four at once must
    // preempt one another.
    let tight = builder(&dir).block_size(4).kv_blocks(8).build().unwrap();
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            tight
                .generate(GenerateRequest::text(*p).sampling(greedy(12)))
                .unwrap()
        })
        .collect();
    let mut preempted = 0;
    for (s, w) in streams.into_iter().zip(&want) {
        let c = s.collect().await.unwrap();
        assert_eq!(&c.tokens, w);
        preempted += c.summary.timings.preemptions;
    }
    let m = tight.metrics();
    assert!(m.preemptions > 0 && preempted > 0, "{m:?}");
    assert_eq!(m.kv_blocks_in_use, 0);
    assert_eq!(tight.load().in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cache_reuses_blocks_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cached = builder(&dir).block_size(4).build().unwrap();
    let plain = builder(&dir)
        .block_size(4)
        .prefix_caching(false)
        .build()
        .unwrap();
    let system = "you are a careful assistant who answers in short sentences.";
    let prompts = [
        format!("{system} hello world"),
        format!("{system} hello world"),
        format!("{system} what is this?"),
    ];
    for p in &prompts {
        let a = run(&cached, p, greedy(10)).await;
        let b = run(&plain, p, greedy(10)).await;
        assert_eq!(a.tokens, b.tokens, "{p}");
    }
    // Concurrent requests sharing the prefix, one of them still running while the others
    // start, give the same tokens too.
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            cached
                .generate(GenerateRequest::text(p.as_str()).sampling(greedy(10)))
                .unwrap()
        })
        .collect();
    for (s, p) in streams.into_iter().zip(&prompts) {
        let got = s.collect().await.unwrap();
        assert_eq!(got.tokens, run(&plain, p, greedy(10)).await.tokens);
    }
    let m = cached.metrics();
    assert!(m.prefix_cached_tokens >= 12, "{m:?}");
    assert!(m.prefill_tokens < plain.metrics().prefill_tokens);
    assert_eq!(plain.metrics().prefix_cached_tokens, 0);
    assert_eq!(m.kv_blocks_in_use, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_prefill_gives_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let whole = builder(&dir).build().unwrap();
    let chunked = builder(&dir).max_batch_tokens(3).build().unwrap();
    let prompt = "a prompt long enough to need many chunks of three tokens each";
    let a = run(&whole, prompt, greedy(8)).await;
    let b = run(&chunked, prompt, greedy(8)).await;
    assert_eq!(a.tokens, b.tokens);
    assert!(chunked.metrics().steps > whole.metrics().steps);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_only_steps_leave_out_steps_with_prompt_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(&dir).build().unwrap();
    // One request: a prefill step that yields the first token, then three decode steps.
    let done = run(&e, "hello world", greedy(4)).await;
    assert_eq!(done.tokens.len(), 4);
    let m = e.metrics();
    assert_eq!(m.steps, 4);
    assert_eq!(m.decode_only_steps, 3);
    assert!(m.mean_decode_only_step > Duration::ZERO);
    assert!(m.decode_only_tokens_per_second > 0.0);
    // A second request whose prompt is fed in chunks of 3 alongside the first one's decoding:
    // those steps hold prompt tokens and are not decode-only.
    let chunked = builder(&dir).max_batch_tokens(4).build().unwrap();
    let long = chunked
        .generate(
            GenerateRequest::text("a long prompt that takes several chunks").sampling(greedy(2)),
        )
        .unwrap();
    let short = chunked
        .generate(GenerateRequest::text("fox").sampling(greedy(12)))
        .unwrap();
    let (long, short) = (
        long.collect().await.unwrap(),
        short.collect().await.unwrap(),
    );
    assert_eq!((long.tokens.len(), short.tokens.len()), (2, 12));
    let m = chunked.metrics();
    assert!(m.decode_only_steps < m.steps);
    assert!(m.decode_only_steps <= m.generated_tokens);
    assert!(m.decode_only_steps >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_equals_each_alone_under_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(&dir).build().unwrap();
    let mut alone = Vec::new();
    for p in PROMPTS {
        alone.push(run(&e, p, greedy(10)).await.tokens);
    }
    let streams: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            e.generate(GenerateRequest::text(*p).sampling(greedy(10)))
                .unwrap()
        })
        .collect();
    for (s, a) in streams.into_iter().zip(&alone) {
        assert_eq!(&s.collect().await.unwrap().tokens, a);
    }
    let m = e.metrics();
    assert!(m.mean_batch_size > 1.0, "{m:?}");
    assert_eq!(m.requests_finished, 8);
    assert!(m.mean_time_to_first_token > Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_and_frees_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(&dir).build().unwrap();
    let mut s = e
        .generate(GenerateRequest::text("hello").sampling(greedy(400)))
        .unwrap();
    assert!(matches!(s.next().await, Some(Ok(StreamEvent::Token(_)))));
    // The second token is sent after the first step's accounting is published.
    assert!(matches!(s.next().await, Some(Ok(StreamEvent::Token(_)))));
    assert!(e.metrics().kv_blocks_in_use > 0);
    drop(s);
    let mut waited = 0;
    while e.metrics().requests_cancelled == 0 || e.metrics().kv_blocks_in_use > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += 1;
        assert!(waited < 2000, "cancellation never freed the blocks");
    }
    assert_eq!(e.load().in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_stop_tokens_end_generation() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(&dir).build().unwrap();
    let full = run(&e, "hello", greedy(16)).await;
    assert_eq!(full.summary.finish_reason, FinishReason::Length);
    assert_eq!(full.summary.usage.completion_tokens, 16);
    assert_eq!(e.tokenizer().decode(&full.tokens).unwrap(), full.text);

    // Stop at the first occurrence of a 3rd-token id.
    let stop = full.tokens[2];
    let first = full.tokens.iter().position(|t| *t == stop).unwrap();
    let c = run(&e, "hello", greedy(16).stop_tokens([stop])).await;
    assert_eq!(c.summary.finish_reason, FinishReason::StopToken);
    assert_eq!(c.tokens, full.tokens[..first]);

    // Stop at a piece of text from the middle of the output.
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let (at, _) = chars[chars.len() / 2];
    let end = chars
        .get(chars.len() / 2 + 2)
        .map_or(full.text.len(), |c| c.0);
    let needle = &full.text[at..end];
    let cut = full.text.find(needle).unwrap();
    let c = run(&e, "hello", greedy(16).stop_strings([needle])).await;
    assert_eq!(c.summary.finish_reason, FinishReason::StopString);
    assert_eq!(c.text, full.text[..cut], "needle {needle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeds_reproduce_and_logprobs_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(&dir).build().unwrap();
    let sampled = |seed| {
        greedy(16)
            .temperature(1.5)
            .top_k(50)
            .top_p(0.95)
            .min_p(0.01)
            .seed(seed)
    };
    let a = run(&e, "hello", sampled(1)).await;
    let b = run(&e, "hello", sampled(1)).await;
    let c = run(&e, "hello", sampled(2)).await;
    assert_eq!(a.tokens, b.tokens);
    assert_ne!(
        a.tokens, c.tokens,
        "different seeds should differ over 16 tokens"
    );
    let p = run(
        &e,
        "hello",
        greedy(6).repetition_penalty(1.3).frequency_penalty(0.5),
    )
    .await;
    assert_eq!(p.tokens.len(), 6);

    let mut s = e
        .generate(GenerateRequest::text("hello").sampling(greedy(6).logprobs(3)))
        .unwrap();
    let mut n = 0;
    while let Some(ev) = s.next().await {
        if let StreamEvent::Token(d) = ev.unwrap() {
            let lp = d.logprob().unwrap();
            assert!(lp <= 0.0);
            let top = d.top_logprobs();
            assert_eq!(top.len(), 3);
            assert_eq!(
                top[0].token(),
                d.token(),
                "greedy picks the most likely token"
            );
            assert!((top[0].logprob() - lp).abs() < 1e-6);
            assert!(top.windows(2).all(|w| w[0].logprob() >= w[1].logprob()));
            n += 1;
        }
    }
    assert_eq!(n, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_accepted_requests() {
    let dir = tempfile::tempdir().unwrap();
    let e = builder(&dir).build().unwrap();
    let s = e
        .generate(GenerateRequest::text("hello").sampling(greedy(8)))
        .unwrap();
    e.shutdown().await;
    assert_eq!(s.collect().await.unwrap().tokens.len(), 8);
}
