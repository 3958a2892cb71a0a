//! The engine picks tokens with the sampling kernel where the logits are (Keel's kernel path:
//! a bf16 model runs it on the CPU through the kernels' CPU references, as a GPU runs the CUDA
//! kernels), and on the host for requests that need penalties or log-probabilities. Both must
//! give the same greedy tokens, and a seed must repeat its output.
#![allow(clippy::unwrap_used)] // Test set-up: failures should abort loudly.

mod common;

use keel_serving::{Completion, Engine, GenerateRequest, SamplingParams};

fn engine() -> Engine {
    common::kernel_path_builder().build().unwrap()
}

async fn run(e: &Engine, prompt: &[u32], p: SamplingParams) -> Completion {
    e.generate(GenerateRequest::tokens(prompt.to_vec()).sampling(p))
        .unwrap()
        .collect()
        .await
        .unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        (0..9).map(|i| (i * 37 + 5) % 300).collect(),
        vec![17, 4],
        (0..23).map(|i| (i * 11 + 200) % 300).collect(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_host_sampling_agree_on_greedy_tokens() {
    let e = engine();
    assert_eq!(e.model_info().kernels, "keel-reference");
    let greedy = SamplingParams::greedy().max_tokens(12).ignore_eos(true);
    for p in prompts() {
        // Log-probabilities keep the request on the host sampler.
        let host = run(&e, &p, greedy.clone().logprobs(1)).await;
        let device = run(&e, &p, greedy.clone()).await;
        assert_eq!(host.tokens.len(), 12);
        assert_eq!(device.tokens, host.tokens, "prompt {p:?}");
        assert_eq!(host.logprobs.len(), 12);
        assert!(device.logprobs.is_empty());
    }
    // Together in one batch, mixing both kinds, the tokens stay the same.
    let mut streams = Vec::new();
    for (i, p) in prompts().iter().enumerate() {
        let params = if i % 2 == 0 {
            greedy.clone()
        } else {
            greedy.clone().logprobs(1)
        };
        streams.push(
            e.generate(GenerateRequest::tokens(p.clone()).sampling(params))
                .unwrap(),
        );
    }
    for (s, p) in streams.into_iter().zip(prompts()) {
        let alone = run(&e, &p, greedy.clone()).await;
        assert_eq!(
            s.collect().await.unwrap().tokens,
            alone.tokens,
            "prompt {p:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_repeats_its_output_on_the_device_sampler() {
    let e = engine();
    let hot = |seed| {
        SamplingParams::greedy()
            .temperature(1.5)
            .top_k(40)
            .top_p(0.95)
            .seed(seed)
            .max_tokens(16)
            .ignore_eos(true)
    };
    let p = &prompts()[0];
    let a = run(&e, p, hot(7)).await;
    let b = run(&e, p, hot(7)).await;
    assert_eq!(a.tokens.len(), 16);
    assert_eq!(a.tokens, b.tokens);
    // A different seed draws differently (at temperature 1.5 over 40 candidates, sixteen
    // equal draws in a row would be a broken generator).
    let c = run(&e, p, hot(8)).await;
    assert_ne!(a.tokens, c.tokens);
    // Penalties move the request to the host sampler, which still runs and repeats too.
    let pen = |seed| hot(seed).repetition_penalty(1.3);
    assert_eq!(
        run(&e, p, pen(7)).await.tokens,
        run(&e, p, pen(7)).await.tokens
    );
}
