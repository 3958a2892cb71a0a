//! A tiny random-weight llama-family model written to disk in both formats the engine loads:
//! a Hugging Face directory (config.json, model.safetensors, tokenizer.json) and GGUF files
//! with a chosen weight type. The GGUF's Q and K rows are permuted the way llama.cpp's
//! converter does, so both files describe the same function.
#![allow(dead_code)] // Not every test file uses every helper.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub(crate) const HIDDEN: usize = 256;
pub(crate) const LAYERS: usize = 2;
pub(crate) const HEADS: usize = 4;
pub(crate) const KV_HEADS: usize = 2;
pub(crate) const HEAD_DIM: usize = HIDDEN / HEADS;
pub(crate) const FFN: usize = 512;
pub(crate) const CONTEXT: usize = 512;

/// Byte tokens (GPT-2 byte-to-char mapping), a few merges, and three special tokens.
pub(crate) struct Vocab {
    pub(crate) tokens: Vec<String>,
    pub(crate) types: Vec<i32>,
    pub(crate) merges: Vec<String>,
}

fn byte_chars() -> Vec<char> {
    let mut extra = 0u32;
    (0..256u32)
        .map(|b| {
            let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
            if printable {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

pub(crate) fn vocab() -> Vocab {
    let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    let mut types = vec![1; 256];
    let mut merges = Vec::new();
    for (a, b) in [
        ("h", "e"),
        ("l", "l"),
        ("he", "ll"),
        ("\u{120}", "w"),
        ("o", "r"),
    ] {
        merges.push(format!("{a} {b}"));
        tokens.push(format!("{a}{b}"));
        types.push(1);
    }
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(s.to_string());
        types.push(3);
    }
    Vocab {
        tokens,
        types,
        merges,
    }
}

pub(crate) const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Hugging Face-named f32 weights.
pub(crate) fn weights(seed: u64) -> HashMap<String, Tensor> {
    let mut rng = Lcg(seed);
    let n_vocab = vocab().tokens.len();
    let mut t = |shape: (usize, usize), scale: f32| {
        let v: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.next() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    };
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        t((n_vocab, HIDDEN), 1.0),
    );
    let s = 1.0 / (HIDDEN as f32).sqrt();
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        w.insert(
            format!("{p}.self_attn.q_proj.weight"),
            t((HIDDEN, HIDDEN), s * 2.0),
        );
        w.insert(
            format!("{p}.self_attn.k_proj.weight"),
            t((KV_HEADS * HEAD_DIM, HIDDEN), s * 2.0),
        );
        w.insert(
            format!("{p}.self_attn.v_proj.weight"),
            t((KV_HEADS * HEAD_DIM, HIDDEN), s),
        );
        w.insert(
            format!("{p}.self_attn.o_proj.weight"),
            t((HIDDEN, HIDDEN), s),
        );
        w.insert(format!("{p}.mlp.gate_proj.weight"), t((FFN, HIDDEN), s));
        w.insert(format!("{p}.mlp.up_proj.weight"), t((FFN, HIDDEN), s));
        w.insert(
            format!("{p}.mlp.down_proj.weight"),
            t((HIDDEN, FFN), 1.0 / (FFN as f32).sqrt()),
        );
        w.insert(
            format!("{p}.input_layernorm.weight"),
            (t((1, HIDDEN), 0.1) + 1.0).unwrap().flatten_all().unwrap(),
        );
        w.insert(
            format!("{p}.post_attention_layernorm.weight"),
            (t((1, HIDDEN), 0.1) + 1.0).unwrap().flatten_all().unwrap(),
        );
    }
    w.insert(
        "model.norm.weight".to_string(),
        (t((1, HIDDEN), 0.1) + 1.0).unwrap().flatten_all().unwrap(),
    );
    w.insert("lm_head.weight".to_string(), t((n_vocab, HIDDEN), s * 4.0));
    w
}

/// Writes the Hugging Face directory form; returns its path.
pub(crate) fn write_hf(dir: &Path, seed: u64, model_type: &str) -> PathBuf {
    let d = dir.join(format!("hf-{model_type}"));
    std::fs::create_dir_all(&d).unwrap();
    let mut w = weights(seed);
    if model_type == "qwen2" {
        let mut rng = Lcg(seed ^ 0xb1a5);
        for l in 0..LAYERS {
            for (n, size) in [
                ("q", HIDDEN),
                ("k", KV_HEADS * HEAD_DIM),
                ("v", KV_HEADS * HEAD_DIM),
            ] {
                let v: Vec<f32> = (0..size).map(|_| rng.next() * 0.1).collect();
                w.insert(
                    format!("model.layers.{l}.self_attn.{n}_proj.bias"),
                    Tensor::from_vec(v, size, &Device::Cpu).unwrap(),
                );
            }
        }
    }
    candle_core::safetensors::save(&w, d.join("model.safetensors")).unwrap();
    let v = vocab();
    let config = serde_json::json!({
        "model_type": model_type,
        "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "intermediate_size": FFN,
        "vocab_size": v.tokens.len(),
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT,
        "tie_word_embeddings": false
    });
    std::fs::write(d.join("config.json"), config.to_string()).unwrap();
    let vocab_map: serde_json::Map<String, serde_json::Value> = v.tokens[..v.tokens.len() - 3]
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let n = v.tokens.len();
    let added: Vec<serde_json::Value> = (n - 3..n)
        .map(|i| serde_json::json!({"id": i, "content": v.tokens[i], "special": true}))
        .collect();
    let tok = serde_json::json!({
        "added_tokens": added,
        "pre_tokenizer": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab_map, "merges": v.merges},
    });
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let cfg = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE});
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    d
}

/// llama.cpp's converter reorders each head's Q/K rows from halves to interleaved pairs.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = w.dims2().unwrap();
    let hd = out / heads;
    w.reshape((heads, 2, hd / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

/// Writes the GGUF form with projection weights stored as `dtype`; `arch` names the
/// architecture in the metadata (tests use it to check unsupported architectures).
pub(crate) fn write_gguf(dir: &Path, seed: u64, dtype: GgmlDType, arch: &str) -> PathBuf {
    write_gguf_embedding(dir, seed, dtype, GgmlDType::F32, arch)
}

/// [`write_gguf`] with the token embedding stored as `embedding` (Keel's CPU kernels take a
/// model whose embedding is quantized too, as in released GGUF files).
pub(crate) fn write_gguf_embedding(
    dir: &Path,
    seed: u64,
    dtype: GgmlDType,
    embedding: GgmlDType,
    arch: &str,
) -> PathBuf {
    let path = dir.join(format!("tiny-{arch}-{dtype:?}-{embedding:?}.gguf"));
    let w = weights(seed);
    let q = |t: &Tensor, d: GgmlDType| QTensor::quantize(t, d).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    tensors.push((
        "token_embd.weight".into(),
        q(&w["model.embed_tokens.weight"], embedding),
    ));
    tensors.push(("output.weight".into(), q(&w["lm_head.weight"], dtype)));
    tensors.push((
        "output_norm.weight".into(),
        q(&w["model.norm.weight"], GgmlDType::F32),
    ));
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let b = format!("blk.{l}");
        let wq = permute(&w[&format!("{p}.self_attn.q_proj.weight")], HEADS);
        let wk = permute(&w[&format!("{p}.self_attn.k_proj.weight")], KV_HEADS);
        tensors.push((format!("{b}.attn_q.weight"), q(&wq, dtype)));
        tensors.push((format!("{b}.attn_k.weight"), q(&wk, dtype)));
        tensors.push((
            format!("{b}.attn_v.weight"),
            q(&w[&format!("{p}.self_attn.v_proj.weight")], dtype),
        ));
        tensors.push((
            format!("{b}.attn_output.weight"),
            q(&w[&format!("{p}.self_attn.o_proj.weight")], dtype),
        ));
        tensors.push((
            format!("{b}.ffn_gate.weight"),
            q(&w[&format!("{p}.mlp.gate_proj.weight")], dtype),
        ));
        tensors.push((
            format!("{b}.ffn_up.weight"),
            q(&w[&format!("{p}.mlp.up_proj.weight")], dtype),
        ));
        tensors.push((
            format!("{b}.ffn_down.weight"),
            q(&w[&format!("{p}.mlp.down_proj.weight")], dtype),
        ));
        tensors.push((
            format!("{b}.attn_norm.weight"),
            q(&w[&format!("{p}.input_layernorm.weight")], GgmlDType::F32),
        ));
        tensors.push((
            format!("{b}.ffn_norm.weight"),
            q(
                &w[&format!("{p}.post_attention_layernorm.weight")],
                GgmlDType::F32,
            ),
        ));
    }
    let v = vocab();
    let s = |x: &str| Value::String(x.to_string());
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (format!("{arch}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{arch}.context_length"), Value::U32(CONTEXT as u32)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(HIDDEN as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(FFN as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(v.tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(v.types.iter().map(|t| Value::I32(*t)).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(v.merges.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32((v.tokens.len() - 3) as u32),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32((v.tokens.len() - 1) as u32),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        ("tokenizer.chat_template".into(), s(CHAT_TEMPLATE)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(&path).unwrap();
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    path
}
