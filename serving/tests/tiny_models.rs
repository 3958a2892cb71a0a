//! Loading both file formats and several weight types, on a tiny random-weight model written
//! by the test itself (no download needed).
#![allow(clippy::unwrap_used)] // Helpers shared by the tests below: failures should abort loudly.
mod common;

use candle_core::quantized::GgmlDType;
use common::tiny;
use keel_serving::{ChatMessage, Engine, GenerateRequest, SamplingParams, Specials, Tokenizer};

fn engine(path: &std::path::Path) -> Engine {
    Engine::builder()
        .model_path(path)
        .kv_blocks(64)
        .build()
        .unwrap()
}

async fn greedy(e: &Engine, prompt: &str, n: usize) -> Vec<u32> {
    let r = GenerateRequest::text(prompt)
        .sampling(SamplingParams::greedy().max_tokens(n).ignore_eos(true));
    e.generate(r).unwrap().collect().await.unwrap().tokens
}

#[tokio::test]
async fn safetensors_and_gguf_f32_agree_token_for_token() {
    let dir = tempfile::tempdir().unwrap();
    let hf = engine(&tiny::write_hf(dir.path(), 7, "llama"));
    let gg = engine(&tiny::write_gguf(dir.path(), 7, GgmlDType::F32, "llama"));
    assert_eq!(hf.model_info().architecture, "llama");
    assert_eq!(gg.model_info().kv_heads, tiny::KV_HEADS);
    for prompt in [
        "hello world",
        "a longer prompt, with punctuation and digits 123",
    ] {
        let a = greedy(&hf, prompt, 12).await;
        let b = greedy(&gg, prompt, 12).await;
        assert_eq!(a.len(), 12);
        assert_eq!(a, b, "prompt {prompt:?}");
    }
}

#[tokio::test]
async fn quantized_gguf_types_load_and_run() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
        GgmlDType::F16,
    ] {
        let e = engine(&tiny::write_gguf(dir.path(), 3, dtype, "llama"));
        assert_eq!(e.model_info().weight_type, format!("{dtype:?}"));
        assert_eq!(greedy(&e, "hello", 5).await.len(), 5, "{dtype:?}");
    }
}

#[tokio::test]
async fn qwen2_config_with_biases_runs() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny::write_hf(dir.path(), 5, "qwen2"));
    assert_eq!(e.model_info().architecture, "qwen2");
    assert_eq!(greedy(&e, "hello", 4).await.len(), 4);
}

#[test]
fn tokenizer_json_and_gguf_vocab_agree() {
    let dir = tempfile::tempdir().unwrap();
    let a = Tokenizer::from_file(tiny::write_hf(dir.path(), 1, "llama").join("tokenizer.json"))
        .unwrap();
    let b = Tokenizer::from_file(tiny::write_gguf(dir.path(), 1, GgmlDType::F32, "llama")).unwrap();
    for text in [
        "hello world",
        "<|im_start|>user\nhello<|im_end|>",
        "ünïcödé 🎉",
    ] {
        for sp in [Specials::Parse, Specials::Plain] {
            let ta = a.encode(text, sp).unwrap();
            assert_eq!(ta, b.encode(text, sp).unwrap());
            if sp == Specials::Plain {
                assert_eq!(a.decode(&ta).unwrap(), text);
            }
        }
    }
    // "hello" uses the merges h+e, l+l, he+ll.
    let hello = a.encode("hello", Specials::Plain).unwrap();
    assert_eq!(
        hello,
        vec![a.token_id("hell").unwrap(), a.token_id("o").unwrap()]
    );
    assert_eq!(
        a.encode("<|im_end|>", Specials::Parse).unwrap(),
        vec![a.token_id("<|im_end|>").unwrap()]
    );
    assert!(a.encode("<|im_end|>", Specials::Plain).unwrap().len() > 1);
}

#[tokio::test]
async fn chat_requests_use_the_template() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&tiny::write_gguf(dir.path(), 2, GgmlDType::F32, "llama"));
    let req = GenerateRequest::chat([ChatMessage::user("hello")]);
    let toks = e.prompt_tokens(&req).unwrap();
    let text = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(toks, e.tokenizer().encode(text, Specials::Parse).unwrap());
}

#[tokio::test]
async fn dequantized_weights_run_and_agree_on_the_first_token() {
    let dir = tempfile::tempdir().unwrap();
    // Expanded weights skip the 8-bit activation rounding, so only near-identical logits are
    // expected: check they run and agree with the quantized path on the first greedy token.
    let path = tiny::write_gguf(dir.path(), 9, GgmlDType::Q8_0, "llama");
    let q = engine(&path);
    let d = Engine::builder()
        .model_path(&path)
        .kv_blocks(64)
        .weights(keel_serving::Weights::Dequantized)
        .build()
        .unwrap();
    let a = greedy(&q, "hello world", 6).await;
    let b = greedy(&d, "hello world", 6).await;
    assert_eq!(b.len(), 6);
    assert_eq!(a[0], b[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_tokens_picked_by_the_cpu_kernels_equal_the_host_samplers() {
    // Greedy requests on Keel's CPU kernels get their token from the kernels' argmax over the
    // logits buffer; asking for log-probabilities sends the row to the host sampler instead.
    // Both must pick the same tokens, alone and in a batch.
    let dir = tempfile::tempdir().unwrap();
    let file =
        tiny::write_gguf_embedding(dir.path(), 11, GgmlDType::Q4_1, GgmlDType::Q8_0, "llama");
    let e = engine(&file);
    assert!(
        e.model_info().kernels.starts_with("keel-cpu"),
        "{}",
        e.model_info().kernels
    );
    let prompts = [
        "hello",
        "a longer prompt, with punctuation 42",
        "zz",
        "the end",
    ];
    let run = |prompt: &str, host: bool| {
        let mut p = SamplingParams::greedy().max_tokens(10).ignore_eos(true);
        if host {
            p = p.logprobs(0);
        }
        e.generate(GenerateRequest::text(prompt).sampling(p))
            .unwrap()
    };
    let mut picked = Vec::new();
    let mut hosted = Vec::new();
    for prompt in prompts {
        picked.push(run(prompt, false));
        hosted.push(run(prompt, true));
    }
    for (i, (a, b)) in picked.into_iter().zip(hosted).enumerate() {
        let (a, b) = (a.collect().await.unwrap(), b.collect().await.unwrap());
        assert_eq!(a.tokens.len(), 10);
        assert!(a.logprobs.is_empty());
        assert_eq!(b.logprobs.len(), 10);
        assert_eq!(a.tokens, b.tokens, "prompt {i}");
        assert_eq!(
            a.tokens,
            greedy(&e, prompts[i], 10).await,
            "prompt {i} alone"
        );
    }
}
