//! Pipelined decode (`EngineBuilder::pipelined_decode`): when every running sequence decodes
//! one device-sampled token, the engine launches the next step from the picked ids before it
//! reads them back. A bf16 random model runs Keel's kernel path on the CPU (the kernels' CPU
//! references), where every step completes before the next is launched but the control flow
//! is the one a GPU runs. These tests check that pipelining changes no request's tokens, finish
//! reason or usage, and that steps really were launched ahead (`pipelined_steps`).
#![allow(clippy::unwrap_used)] // Test set-up: failures should abort loudly.

mod common;

use keel_serving::{
    Completion, Engine, EngineBuilder, EngineMetrics, FinishReason, GenerateRequest,
    GenerationStream, SamplingParams, StreamEvent, Usage,
};

fn builder(pipelined: bool) -> EngineBuilder {
    common::kernel_path_builder().pipelined_decode(pipelined)
}

fn prompt(i: u32, len: u32) -> Vec<u32> {
    (0..len).map(|k| (k * 37 + i * 11 + 5) % 300).collect()
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams::greedy()
        .max_tokens(max_tokens)
        .ignore_eos(true)
}

fn seeded(seed: u64, max_tokens: usize) -> SamplingParams {
    SamplingParams::greedy()
        .temperature(1.5)
        .top_k(40)
        .top_p(0.95)
        .seed(seed)
        .max_tokens(max_tokens)
        .ignore_eos(true)
}

/// What pipelining must not change about a request.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    tokens: Vec<u32>,
    finish: FinishReason,
    usage: Usage,
}

fn outcome(c: &Completion) -> Outcome {
    Outcome {
        tokens: c.tokens.clone(),
        finish: c.summary.finish_reason,
        usage: c.summary.usage,
    }
}

type Request = (Vec<u32>, SamplingParams);

fn submit(e: &Engine, (prompt, params): &Request) -> GenerationStream {
    e.generate(GenerateRequest::tokens(prompt.clone()).sampling(params.clone()))
        .unwrap()
}

/// Runs `requests` at once on an engine from `b`; returns each request's outcome and the
/// engine's metrics once it has shut down.
async fn run_all(b: EngineBuilder, requests: &[Request]) -> (Vec<Outcome>, EngineMetrics) {
    let e = b.build().unwrap();
    let streams: Vec<_> = requests.iter().map(|r| submit(&e, r)).collect();
    let mut out = Vec::new();
    for s in streams {
        out.push(outcome(&s.collect().await.unwrap()));
    }
    e.shutdown().await;
    (out, e.metrics())
}

/// The check: `requests` give the same outcomes with pipelining on and off, steps were
/// launched ahead only with it on, and no blocks stay in use. Returns both runs' outcomes and
/// metrics (on, off).
async fn check(
    b: impl Fn(bool) -> EngineBuilder,
    requests: &[Request],
) -> (Vec<Outcome>, EngineMetrics, EngineMetrics) {
    let (on, m_on) = run_all(b(true), requests).await;
    let (off, m_off) = run_all(b(false), requests).await;
    assert_eq!(on, off);
    assert!(m_on.pipelined_steps > 0, "nothing was pipelined: {m_on:?}");
    assert_eq!(m_off.pipelined_steps, 0);
    for m in [&m_on, &m_off] {
        assert_eq!(m.kv_blocks_in_use, 0, "{m:?}");
        assert_eq!(m.requests_finished, requests.len() as u64);
        assert_eq!(m.requests_failed, 0);
        // Discarded rows are not counted: every generated token is in some completion.
        let completions: usize = on.iter().map(|o| o.usage.completion_tokens).sum();
        let stops = on
            .iter()
            .filter(|o| o.finish == FinishReason::StopToken)
            .count();
        assert_eq!(m.generated_tokens, (completions + stops) as u64, "{m:?}");
    }
    (on, m_on, m_off)
}

/// A prompt and a token its greedy run produces a few tokens in, to end a request on.
async fn stop_probe() -> (Vec<u32>, u32) {
    let probe = builder(false).build().unwrap();
    let stop_prompt = prompt(4, 7);
    let first = submit(&probe, &(stop_prompt.clone(), greedy(16)))
        .collect()
        .await
        .unwrap();
    (stop_prompt, first.tokens[5])
}

/// Greedy and seeded requests of different lengths, one ending on a stop token and one that
/// needs the host sampler (log-probabilities, so no step chains while it runs).
async fn mixed_requests() -> Vec<Request> {
    let (stop_prompt, stop) = stop_probe().await;
    vec![
        (prompt(0, 9), greedy(12)),
        (prompt(1, 3), greedy(5)),
        (prompt(2, 17), seeded(7, 20)),
        (
            prompt(3, 6),
            seeded(8, 9).temperature(0.8).top_k(0).top_p(0.9),
        ),
        (stop_prompt, greedy(16).stop_tokens([stop])),
        (prompt(5, 4), greedy(4).logprobs(1)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_changes_no_tokens_finish_reasons_or_usage() {
    let requests = mixed_requests().await;
    let (out, _, _) = check(builder, &requests).await;
    // The scenarios happened: sequences ended at different steps, one on its stop token.
    let lengths: Vec<usize> = out.iter().map(|o| o.usage.completion_tokens).collect();
    assert_eq!(lengths[..4], [12, 5, 20, 9]);
    assert_eq!(out[4].finish, FinishReason::StopToken);
    assert!(lengths[4] <= 5, "{:?}", out[4]);
    // Pipelining is on by default.
    let (_, m) = run_all(common::kernel_path_builder(), &[(prompt(6, 5), greedy(6))]).await;
    assert!(m.pipelined_steps > 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelining_crosses_block_boundaries() {
    // Two-token blocks: the step run ahead takes a new block every other step.
    let requests = mixed_requests().await;
    check(|on| builder(on).block_size(2), &requests).await;
}

/// Whether the chain survived everything but admissions: a chain starts with the first
/// decode-only step after a step with prefill, and every other decode-only step must have been
/// launched ahead. (Prefill steps are the steps that are not decode-only; here nothing else
/// stops a chain: no host sampler, no shutdown before the end, a pool with room.) Sequences
/// ending or being cancelled must not cost a step.
fn assert_chain_survives(m: &EngineMetrics) {
    let prefill_steps = m.steps - m.decode_only_steps;
    assert!(
        m.pipelined_steps + prefill_steps >= m.decode_only_steps,
        "the chain stopped other than for an admission: {m:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_survives_requests_ending_at_different_steps() {
    // Six requests of different lengths, greedy and seeded, one ending on a stop token.
    let (stop_prompt, stop) = stop_probe().await;
    let requests = vec![
        (prompt(0, 9), greedy(4)),
        (prompt(1, 3), greedy(9)),
        (prompt(2, 17), seeded(7, 14)),
        (prompt(3, 6), seeded(8, 6).temperature(0.8)),
        (stop_prompt, greedy(20).stop_tokens([stop])),
        (prompt(5, 4), greedy(24)),
    ];
    let (out, on, _) = check(builder, &requests).await;
    let lengths: Vec<usize> = out.iter().map(|o| o.usage.completion_tokens).collect();
    assert_eq!(lengths[..4], [4, 9, 14, 6]);
    assert_eq!(lengths[5], 24);
    assert_eq!(out[4].finish, FinishReason::StopToken);
    assert_chain_survives(&on);
    // From the scenario: the longest request (24 tokens, the first from its prefill) runs in
    // 23 decode steps, the first of which starts the chain, so 22 are launched ahead if
    // every request is prefilled in one step. The requests may reach the engine over several
    // steps; each later step with prefill stops the chain and costs two of those steps (it
    // runs synchronously, and the decode step after it starts a new chain). No slack beyond
    // that: endings (max_tokens, the stop token) must cost nothing.
    let prefill_steps = on.steps - on.decode_only_steps;
    let longest_decode_steps = 23;
    assert!(
        on.pipelined_steps + 1 + 2 * (prefill_steps - 1) >= longest_decode_steps,
        "{on:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_exactly_large_enough_needs_no_more_for_the_chain() {
    // Each request needs blocks for 9 + 16 - 1 = 24 positions (six blocks of four) to finish
    // one step at a time, and the pool holds exactly that for both. The step ahead never needs
    // more: a sequence known to end at the step in flight (its `max_tokens`) is left out of it,
    // and one that goes on needs the same block for its next step either way. (A pool that
    // cannot hold the step ahead is the scheduler's unit test: the chain falls back and the
    // synchronous step preempts.)
    let b = |on| builder(on).block_size(4).kv_blocks(12);
    let requests = vec![(prompt(0, 9), greedy(16)), (prompt(1, 9), seeded(3, 16))];
    let (_, on, off) = check(b, &requests).await;
    assert_eq!(on.preemptions, 0);
    assert_eq!(off.preemptions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_does_not_disturb_the_others() {
    let requests = [
        (prompt(0, 9), greedy(40)),
        (prompt(1, 5), greedy(24)),
        (prompt(2, 12), seeded(11, 24)),
    ];
    let mut runs = Vec::new();
    for on in [true, false] {
        let e = builder(on).build().unwrap();
        let mut streams: Vec<_> = requests.iter().map(|r| submit(&e, r)).collect();
        // Read three tokens of the first request, then drop its stream mid-generation.
        let mut first = Vec::new();
        while first.len() < 3 {
            match streams[0].next().await.unwrap().unwrap() {
                StreamEvent::Token(t) => first.push(t.token()),
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(streams.remove(0));
        let mut rest = Vec::new();
        for s in streams {
            rest.push(outcome(&s.collect().await.unwrap()));
        }
        e.shutdown().await;
        runs.push((first, rest, e.metrics()));
    }
    let (on, off) = (&runs[0], &runs[1]);
    assert_eq!(on.0, off.0);
    assert_eq!(on.1, off.1);
    for (_, _, m) in &runs {
        assert_eq!(m.requests_cancelled, 1, "{m:?}");
        assert_eq!(m.requests_finished, 2);
        assert_eq!(m.kv_blocks_in_use, 0);
    }
    // The cancellation did not stop the chain for the others.
    assert_chain_survives(&on.2);
    assert!(on.2.pipelined_steps > 0);
    assert_eq!(off.2.pipelined_steps, 0);
}

/// Runs `first` with pipelining on, then off; each wave is submitted once the first request
/// has streamed `at` tokens. Returns each run's outcomes (in submission order) and metrics.
async fn with_waves(
    first: &[Request],
    waves: &[Vec<Request>],
    at: &[usize],
    budget: usize,
) -> Vec<(Vec<Outcome>, EngineMetrics)> {
    let mut runs = Vec::new();
    for on in [true, false] {
        let e = builder(on).max_batch_tokens(budget).build().unwrap();
        let mut streams: Vec<_> = first.iter().map(|r| submit(&e, r)).collect();
        let mut seen = Vec::new();
        for (wave, &at) in waves.iter().zip(at) {
            while seen.len() < at {
                if let StreamEvent::Token(t) = streams[0].next().await.unwrap().unwrap() {
                    seen.push(t.token());
                }
            }
            streams.extend(wave.iter().map(|r| submit(&e, r)));
        }
        let mut out = Vec::new();
        for (i, s) in streams.into_iter().enumerate() {
            let mut o = outcome(&s.collect().await.unwrap());
            if i == 0 {
                o.tokens = [seen.clone(), o.tokens].concat();
            }
            out.push(o);
        }
        e.shutdown().await;
        runs.push((out, e.metrics()));
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_mid_chain_joins_and_nothing_changes() {
    // Let the first request decode a while (a chain is running), then add two more.
    let early = [(prompt(0, 9), greedy(30)), (prompt(1, 4), seeded(5, 30))];
    let late = vec![(prompt(2, 20), greedy(10)), (prompt(3, 3), seeded(6, 12))];
    let runs = with_waves(&early, &[late], &[6], 256).await;
    assert_eq!(runs[0].0, runs[1].0);
    assert_eq!(runs[0].0[0].tokens.len(), 30);
    assert!(runs[0].1.pipelined_steps > 0);
    assert_eq!(runs[1].1.pipelined_steps, 0);
    assert_eq!(runs[0].1.requests_finished, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_of_requests_join_the_chain_without_stopping_it() {
    // Two requests decode while three waves arrive, each after the first request has streamed
    // some tokens. The first request runs longest, so some sequence always goes on and the
    // chain has no reason to stop before the end: each wave is admitted into a step launched
    // ahead (a 30-token prompt over two of them, with a budget of 16 tokens a step).
    let first = [(prompt(0, 9), greedy(64)), (prompt(1, 4), seeded(5, 40))];
    let waves = [
        vec![(prompt(2, 20), greedy(10)), (prompt(3, 3), seeded(6, 12))],
        vec![(prompt(4, 13), seeded(9, 8))],
        vec![(prompt(5, 6), greedy(14)), (prompt(6, 30), greedy(6))],
    ];
    let at = [6, 14, 22];
    let runs = with_waves(&first, &waves, &at, 16).await;
    let ((on, m_on), (off, m_off)) = (&runs[0], &runs[1]);
    assert_eq!(on, off);
    let lengths: Vec<usize> = on.iter().map(|o| o.usage.completion_tokens).collect();
    assert_eq!(lengths, [64, 40, 10, 12, 8, 14, 6]);
    for m in [m_on, m_off] {
        assert_eq!(m.requests_finished, 7, "{m:?}");
        assert_eq!(m.kv_blocks_in_use, 0);
        assert_eq!(m.generated_tokens, 154);
        assert_eq!(m.prefill_tokens, 9 + 4 + 20 + 3 + 13 + 6 + 30);
    }
    assert_eq!(m_off.pipelined_steps, 0);
    // The chain never stops for admissions: the first step (the first prefill) starts it and
    // every later step must be launched ahead. Slack of one step for the first two requests
    // reaching the model thread a turn apart. (Without admissions into the chain, each wave
    // costs two steps: its prefill runs synchronously and the next step starts a new chain.)
    let slack = 1;
    assert!(
        m_on.pipelined_steps + 1 + slack >= m_on.steps,
        "the chain stopped: {m_on:?}"
    );
}
