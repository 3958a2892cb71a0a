//! The engine against llama.cpp on the real model: tokenization and greedy output, token for
//! token, alone and batched together.
#![allow(clippy::unwrap_used)] // Helpers shared by the tests below: failures should abort loudly.
mod common;

use keel_serving::{GenerateRequest, SamplingParams, Specials, Tokenizer};

#[test]
fn tokenization_matches_llama_cpp() {
    let tok = Tokenizer::from_file(common::model_path()).unwrap();
    let r = common::reference();
    for t in &r.tokenizations {
        assert_eq!(
            tok.encode(&t.text, Specials::Plain).unwrap(),
            t.tokens,
            "text {:?}",
            t.text
        );
        assert_eq!(
            tok.decode(&t.tokens).unwrap(),
            t.text,
            "round trip of {:?}",
            t.text
        );
    }
    for g in &r.generations {
        assert_eq!(
            tok.encode(&g.prompt, Specials::Parse).unwrap(),
            g.prompt_tokens,
            "prompt {}",
            g.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_matches_llama_cpp_alone_and_batched() {
    let engine = common::engine();
    let r = common::reference();
    let request = |g: &common::Generation| {
        GenerateRequest::tokens(g.prompt_tokens.clone())
            .sampling(SamplingParams::greedy().max_tokens(r.max_tokens))
    };
    // Alone, one after another.
    let mut alone = Vec::new();
    for g in &r.generations {
        let c = engine
            .generate(request(g))
            .unwrap()
            .collect()
            .await
            .unwrap();
        if common::check_greedy(&c.tokens, g) {
            assert_eq!(c.text, g.greedy_text, "greedy text of {}", g.name);
        }
        alone.push(c.tokens);
    }
    // All at once: one batch of different lengths.
    let streams: Vec<_> = r
        .generations
        .iter()
        .map(|g| engine.generate(request(g)).unwrap())
        .collect();
    for (s, (g, a)) in streams.into_iter().zip(r.generations.iter().zip(&alone)) {
        let c = s.collect().await.unwrap();
        assert_eq!(&c.tokens, a, "batched tokens of {}", g.name);
    }
    assert!(engine.metrics().mean_batch_size > 1.0);
    engine.shutdown().await;
}
