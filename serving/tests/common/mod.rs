//! Shared helpers for tests that need the real model.
#![allow(dead_code)] // Each test file uses a different subset of these helpers.
#![allow(clippy::unwrap_used)] // Test setup: a failure should abort the test loudly.

pub(crate) mod tiny;

use std::path::PathBuf;

use keel_serving::cuda_kernels::Dtype;
use keel_serving::{Engine, EngineBuilder, RandomModel, resolve_model_path};

/// The real test model; fails the test (never skips it) when the file is absent.
pub(crate) fn model_path() -> PathBuf {
    match resolve_model_path(None) {
        Ok(p) => p,
        Err(e) => panic!(
            "this test needs the real model: run `scripts/fetch-model` from the repository root \
             (or set KEEL_MODEL). {e}"
        ),
    }
}

/// An engine on the real model with a small KV pool, so tests stay light.
pub(crate) fn engine() -> Engine {
    Engine::builder()
        .model_path(model_path())
        .kv_blocks(128)
        .build()
        .expect("the real model loads")
}

#[derive(serde::Deserialize)]
pub(crate) struct Reference {
    pub(crate) max_tokens: usize,
    pub(crate) generations: Vec<Generation>,
    pub(crate) tokenizations: Vec<Tokenization>,
}

#[derive(serde::Deserialize)]
pub(crate) struct Generation {
    pub(crate) name: String,
    pub(crate) prompt: String,
    pub(crate) prompt_tokens: Vec<u32>,
    pub(crate) greedy_tokens: Vec<u32>,
    pub(crate) greedy_text: String,
    pub(crate) steps: Vec<Step>,
}

#[derive(serde::Deserialize)]
pub(crate) struct Step {
    pub(crate) top2: Vec<u32>,
    pub(crate) margin: f64,
}

/// Below this log-probability margin between llama.cpp's top two tokens, float rounding
/// differences between two correct implementations may flip the greedy choice.
pub(crate) const TIE_MARGIN: f64 = 0.05;

/// Checks `ours` against llama.cpp's greedy tokens, token for token. At a near-tie (margin
/// under [`TIE_MARGIN`]) either tied token is accepted and comparison stops, since the
/// continuations legitimately diverge. Returns whether the whole sequence was compared.
pub(crate) fn check_greedy(ours: &[u32], g: &Generation) -> bool {
    assert!(
        ours.len() >= g.greedy_tokens.len(),
        "{}: generated {} tokens, llama.cpp {}",
        g.name,
        ours.len(),
        g.greedy_tokens.len()
    );
    for (k, (want, step)) in g.greedy_tokens.iter().zip(&g.steps).enumerate() {
        if step.margin < TIE_MARGIN {
            assert!(
                step.top2.contains(&ours[k]),
                "{}: token {k} is {}, llama.cpp's near-tie was between {:?}",
                g.name,
                ours[k],
                step.top2
            );
            return false;
        }
        assert_eq!(
            ours[k],
            *want,
            "{}: token {k} differs from llama.cpp (ours {:?}, llama.cpp {:?})",
            g.name,
            &ours[..=k],
            &g.greedy_tokens[..=k]
        );
    }
    true
}

#[derive(serde::Deserialize)]
pub(crate) struct Tokenization {
    pub(crate) text: String,
    pub(crate) tokens: Vec<u32>,
}

/// The llama.cpp reference outputs recorded by `tests/fixtures/make_fixtures.py`.
pub(crate) fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/llama_cpp_reference.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture exists");
    serde_json::from_str(&text).expect("fixture parses")
}

/// An engine builder for a tiny bf16 random model (hidden 64, 2 layers, vocabulary 300), which
/// runs Keel's kernel path through the kernels' CPU references: the device sampler and
/// pipelined decode, without a GPU.
pub(crate) fn kernel_path_builder() -> EngineBuilder {
    let spec = RandomModel::llama(64, 2, 4, 2, 96, 300)
        .unwrap()
        .seed(21)
        .dtype(Dtype::Bf16);
    Engine::builder().random_model(spec).threads(2).max_seqs(8)
}
