//! Every bad input the issue names gives a typed error, and the engine keeps serving.
#![allow(clippy::unwrap_used)] // Helpers shared by the tests below: failures should abort loudly.
mod common;

use std::io::Write;
use std::time::Duration;

use candle_core::quantized::GgmlDType;
use common::tiny;
use keel_serving::{Engine, Error, GenerateRequest, SamplingParams, resolve_model_path};

fn load(path: &std::path::Path) -> Result<Engine, Error> {
    Engine::builder().model_path(path).kv_blocks(16).build()
}

#[test]
fn missing_model_names_the_fetch_script() {
    let dir = tempfile::tempdir().unwrap();
    let err = resolve_model_path(Some(&dir.path().join("nope.gguf"))).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }));
    assert!(err.to_string().contains("scripts/fetch-model"), "{err}");
    assert!(matches!(
        load(&dir.path().join("nope.gguf")),
        Err(Error::ModelNotFound { .. })
    ));
}

#[test]
fn non_gguf_file_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.gguf");
    std::fs::write(&p, b"this is not a model at all, just some text").unwrap();
    assert!(matches!(load(&p), Err(Error::NotGguf { .. })));
    let short = dir.path().join("short.gguf");
    std::fs::write(&short, b"GG").unwrap();
    assert!(matches!(load(&short), Err(Error::NotGguf { .. })));
}

#[test]
fn truncated_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let full = std::fs::read(tiny::write_gguf(dir.path(), 1, GgmlDType::Q8_0, "llama")).unwrap();
    for cut in [12, 200, full.len() / 2, full.len() - 10] {
        let p = dir.path().join(format!("cut{cut}.gguf"));
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&full[..cut])
            .unwrap();
        let r = load(&p);
        assert!(
            matches!(r, Err(Error::Truncated { .. })),
            "cut at {cut}: {r:?}"
        );
    }
}

#[test]
fn unsupported_architecture_and_quantization_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let r = load(&tiny::write_gguf(dir.path(), 1, GgmlDType::F32, "gpt2"));
    assert!(
        matches!(r, Err(Error::UnsupportedArchitecture { ref arch }) if arch == "gpt2"),
        "{r:?}"
    );
    let r = load(&tiny::write_gguf(dir.path(), 1, GgmlDType::Q8_1, "llama"));
    assert!(
        matches!(r, Err(Error::UnsupportedQuantization { .. })),
        "{r:?}"
    );
}

#[test]
fn cuda_without_the_feature_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let r = Engine::builder()
        .model_path(tiny::write_gguf(dir.path(), 1, GgmlDType::F32, "llama"))
        .device(keel_serving::Device::Cuda(0))
        .build();
    assert!(matches!(r, Err(Error::CudaUnavailable { ordinal: 0 })));
}

#[test]
fn zero_sized_settings_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny::write_gguf(dir.path(), 1, GgmlDType::F32, "llama");
    let r = Engine::builder().model_path(&p).kv_blocks(0).build();
    assert!(matches!(
        r,
        Err(Error::InvalidConfig {
            name: "kv_blocks",
            ..
        })
    ));
}

#[tokio::test]
async fn bad_requests_fail_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let e = Engine::builder()
        .model_path(tiny::write_gguf(dir.path(), 1, GgmlDType::F32, "llama"))
        .kv_blocks(8)
        .block_size(16)
        .build()
        .unwrap();
    assert_eq!(e.max_context(), 128);
    let long = "x".repeat(200);
    let r = e.generate(GenerateRequest::text(long));
    assert!(
        matches!(r, Err(Error::PromptTooLong { limit: 128, .. })),
        "{r:?}"
    );
    let r =
        e.generate(GenerateRequest::text("hi").sampling(SamplingParams::greedy().max_tokens(500)));
    assert!(matches!(r, Err(Error::PromptTooLong { .. })));
    for bad in [
        SamplingParams::default().temperature(f32::NAN),
        SamplingParams::default().top_p(1.5),
        SamplingParams::default().min_p(-0.1),
        SamplingParams::default().repetition_penalty(0.0),
        SamplingParams::default().max_tokens(0),
        SamplingParams::default().logprobs(1000),
        SamplingParams::default().stop_strings([""]),
    ] {
        let r = e.generate(GenerateRequest::text("hi").sampling(bad.clone()));
        assert!(
            matches!(r, Err(Error::InvalidSampling { .. })),
            "{bad:?}: {r:?}"
        );
    }
    assert!(matches!(
        e.generate(GenerateRequest::text("")),
        Err(Error::EmptyPrompt)
    ));
    assert!(matches!(
        e.generate(GenerateRequest::tokens([1, 2, 999_999])),
        Err(Error::UnknownToken { id: 999_999, .. })
    ));
    // A request that cannot finish in time fails alone.
    let slow = e
        .generate(
            GenerateRequest::text("hello")
                .sampling(SamplingParams::greedy().max_tokens(100).ignore_eos(true))
                .deadline(Duration::from_nanos(1)),
        )
        .unwrap();
    assert!(matches!(
        slow.collect().await,
        Err(Error::DeadlineExceeded { .. })
    ));
    let ok = e
        .generate(
            GenerateRequest::text("hello")
                .sampling(SamplingParams::greedy().max_tokens(3).ignore_eos(true)),
        )
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(ok.tokens.len(), 3);
    e.shutdown().await;
    assert!(matches!(
        e.generate(GenerateRequest::text("hello")),
        Err(Error::Shutdown)
    ));
    let m = e.metrics();
    assert_eq!(m.requests_failed, 1);
    assert_eq!(m.kv_blocks_in_use, 0);
}
