//! Finding and loading model files: GGUF (quantized, via candle's reader) and safetensors with
//! `config.json`, into our [`Model`] and [`Tokenizer`], with typed errors for bad files.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QMatMul, gguf_file};
use candle_core::{DType, Device, Tensor};

use crate::cpu::quant::{PlainQ, QMatrix};
use crate::cpu::{self, CpuLayer, CpuModel, Proj};
use crate::error::{Error, Result};
use crate::model::{Arch, Layer, Linear, Model, ModelConfig, RopeStyle};
use crate::tokenizer::{Tokenizer, TokenizerParts};

/// The file name `scripts/fetch-model` downloads into `models/`.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Finds a model: the explicit path if given, else `KEEL_MODEL`, else `models/` (searched from
/// the current directory upwards, so tests and examples run from any workspace member find it).
///
/// # Errors
/// Returns [`Error::ModelNotFound`], naming `scripts/fetch-model`, when nothing exists.
pub fn resolve_model_path(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut searched = Vec::new();
    if let Some(p) = explicit {
        if p.exists() {
            return Ok(p.to_path_buf());
        }
        searched.push(p.display().to_string());
    } else if let Some(p) = std::env::var_os("KEEL_MODEL") {
        let p = PathBuf::from(p);
        if p.exists() {
            return Ok(p);
        }
        searched.push(format!("KEEL_MODEL={}", p.display()));
    } else {
        let mut dir = std::env::current_dir().ok();
        while let Some(d) = dir {
            let candidate = d.join("models").join(DEFAULT_MODEL_FILE);
            if candidate.exists() {
                return Ok(candidate);
            }
            searched.push(candidate.display().to_string());
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    Err(Error::ModelNotFound {
        searched: searched.join(", "),
    })
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads a model and its tokenizer from a `.gguf` file or a directory holding
/// `config.json`, `*.safetensors` and `tokenizer.json`.
pub(crate) fn load(
    path: &Path,
    device: &Device,
    options: LoadOptions,
) -> Result<(Model, Tokenizer)> {
    if path.is_dir() {
        load_safetensors_dir(path, device)
    } else {
        load_gguf(path, device, options)
    }
}

/// Which matrix kernels run a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Kernels {
    /// Keel's own CPU kernels where they apply: a GGUF model on the CPU, weights as stored,
    /// whose projections and token embedding are all Q4_0, Q4_1 or Q8_0 (AVX-512 VNNI or AVX2
    /// on x86-64 when the CPU has them, portable Rust otherwise). candle's tensors and kernels elsewhere.
    #[default]
    Auto,
    /// candle's tensors and kernels everywhere (for comparison, and for other devices).
    Candle,
}

/// How the engine asked for a model to be loaded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoadOptions {
    pub(crate) weights: Weights,
    pub(crate) kernels: Kernels,
    pub(crate) threads: usize,
}

/// Reads a GGUF header, mapping candle's errors to ours.
fn read_gguf(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    let file = File::open(path).map_err(io_err(path))?;
    let mut r = BufReader::new(file);
    let mut magic = [0u8; 8];
    if let Err(e) = r.read_exact(&mut magic) {
        return Err(Error::NotGguf {
            path: path.to_path_buf(),
            reason: format!("file is shorter than a GGUF header ({e})"),
        });
    }
    if &magic[..4] != b"GGUF" {
        return Err(Error::NotGguf {
            path: path.to_path_buf(),
            reason: format!("magic bytes are {:02x?}, expected \"GGUF\"", &magic[..4]),
        });
    }
    let version = u32::from_le_bytes([magic[4], magic[5], magic[6], magic[7]]);
    if !(1..=3).contains(&version) {
        return Err(Error::NotGguf {
            path: path.to_path_buf(),
            reason: format!("unsupported GGUF version {version}"),
        });
    }
    r.rewind().map_err(io_err(path))?;
    let content = gguf_file::Content::read(&mut r).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("unknown dtype") {
            Error::UnsupportedQuantization {
                tensor: "(header)".into(),
                dtype: msg,
            }
        } else {
            Error::Truncated {
                path: path.to_path_buf(),
                reason: msg,
            }
        }
    })?;
    Ok((content, r))
}

/// Reads only the tokenizer from a GGUF file (fast: no weights are loaded).
pub(crate) fn gguf_tokenizer(path: &Path) -> Result<Tokenizer> {
    let (content, _) = read_gguf(path)?;
    tokenizer_from_gguf(&content.metadata)
}

type Meta = HashMap<String, gguf_file::Value>;

fn meta_u32(m: &Meta, key: &str) -> Result<Option<u32>> {
    match m.get(key) {
        None => Ok(None),
        Some(v) => v
            .to_u32()
            .or_else(|_| v.to_u64().map(|x| x as u32))
            .map(Some)
            .map_err(|_| Error::InvalidModel {
                reason: format!("metadata {key} is not an integer"),
            }),
    }
}

fn meta_req(m: &Meta, key: &str) -> Result<usize> {
    meta_u32(m, key)?
        .map(|v| v as usize)
        .ok_or_else(|| Error::InvalidModel {
            reason: format!("metadata key {key} is missing"),
        })
}

fn meta_f32(m: &Meta, key: &str) -> Option<f32> {
    m.get(key).and_then(|v| v.to_f32().ok())
}

fn meta_str<'a>(m: &'a Meta, key: &str) -> Option<&'a str> {
    m.get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

fn meta_bool(m: &Meta, key: &str) -> Option<bool> {
    m.get(key).and_then(|v| v.to_bool().ok())
}

fn tokenizer_from_gguf(m: &Meta) -> Result<Tokenizer> {
    let bad = |reason: &str| Error::InvalidTokenizer {
        reason: reason.to_string(),
    };
    let model = meta_str(m, "tokenizer.ggml.model")
        .ok_or_else(|| bad("tokenizer.ggml.model is missing"))?
        .to_string();
    let list = |key: &str| -> Result<Vec<gguf_file::Value>> {
        Ok(m.get(key)
            .map(|v| v.to_vec().cloned())
            .transpose()
            .map_err(|_| bad(&format!("{key} is not an array")))?
            .unwrap_or_default())
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        list(key)?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| bad(&format!("{key} holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let merges = strings("tokenizer.ggml.merges")?;
    let types = list("tokenizer.ggml.token_type")?
        .iter()
        .map(|v| v.to_i32().or_else(|_| v.to_u32().map(|x| x as i32)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| bad("tokenizer.ggml.token_type holds a non-integer"))?;
    let scores = list("tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.to_f32().unwrap_or(0.0))
        .collect();
    Tokenizer::from_parts(TokenizerParts {
        model,
        pre: meta_str(m, "tokenizer.ggml.pre").map(str::to_string),
        tokens,
        types,
        scores,
        merges,
        bos: meta_u32(m, "tokenizer.ggml.bos_token_id")?,
        eos: meta_u32(m, "tokenizer.ggml.eos_token_id")?,
        add_bos: meta_bool(m, "tokenizer.ggml.add_bos_token"),
        add_space_prefix: meta_bool(m, "tokenizer.ggml.add_space_prefix"),
        chat_template: meta_str(m, "tokenizer.chat_template").map(str::to_string),
        split_digits: None,
    })
}

/// How projection weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Weights {
    /// Keep each weight in the file's type and multiply with candle's quantized kernels
    /// (least memory; the default, and what the llama.cpp parity tests check).
    #[default]
    AsStored,
    /// Expand quantized weights to f32 at load and multiply with dense kernels: about 8x the
    /// memory of a 4-bit file, but batched steps become true matrix products. Activations are
    /// no longer rounded to 8 bits, so greedy output may differ from llama.cpp at near-ties.
    Dequantized,
}

fn matmul(
    q: candle_core::quantized::QTensor,
    weights: Weights,
    device: &Device,
) -> Result<QMatMul> {
    match weights {
        Weights::AsStored => QMatMul::from_qtensor(q).map_err(crate::error::invalid_model),
        Weights::Dequantized => Ok(QMatMul::Tensor(dense(q, device)?)),
    }
}

fn load_gguf(path: &Path, device: &Device, options: LoadOptions) -> Result<(Model, Tokenizer)> {
    let weights = options.weights;
    let (content, mut r) = read_gguf(path)?;
    let m = &content.metadata;
    let arch_name = meta_str(m, "general.architecture").ok_or_else(|| Error::InvalidModel {
        reason: "general.architecture is missing".into(),
    })?;
    let arch = Arch::parse(arch_name)?;
    let a = arch.name();
    let hidden = meta_req(m, &format!("{a}.embedding_length"))?;
    let heads = meta_req(m, &format!("{a}.attention.head_count"))?;
    let head_dim = match meta_u32(m, &format!("{a}.attention.key_length"))? {
        Some(v) => v as usize,
        None => hidden / heads.max(1),
    };
    let tokens_len = m
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map_or(0, Vec::len);
    let vocab = meta_u32(m, &format!("{a}.vocab_size"))?.map_or(tokens_len, |v| v as usize);
    let config = ModelConfig {
        arch,
        hidden,
        layers: meta_req(m, &format!("{a}.block_count"))?,
        heads,
        kv_heads: meta_u32(m, &format!("{a}.attention.head_count_kv"))?
            .map_or(heads, |v| v as usize),
        head_dim,
        intermediate: meta_req(m, &format!("{a}.feed_forward_length"))?,
        vocab,
        rms_eps: f64::from(
            meta_f32(m, &format!("{a}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        ),
        rope_theta: meta_f32(m, &format!("{a}.rope.freq_base")).unwrap_or(10_000.0),
        rope_style: match arch {
            Arch::Qwen2 => RopeStyle::Halves,
            Arch::Llama | Arch::Mistral => RopeStyle::Interleaved,
        },
        context: meta_req(m, &format!("{a}.context_length"))?,
    };
    config.validate()?;
    let tokenizer = tokenizer_from_gguf(m)?;
    if options.kernels == Kernels::Auto
        && weights == Weights::AsStored
        && device.is_cpu()
        && let Some(model) = load_gguf_cpu(&content, &mut r, path, &config, options.threads)?
    {
        return Ok((model, tokenizer));
    }

    let mut weight_type = None;
    let names_with_bias = arch == Arch::Qwen2;
    let linear = |r: &mut BufReader<File>,
                  name: &str,
                  bias: bool,
                  wt: &mut Option<String>|
     -> Result<Linear> {
        let q = qtensor_named(&content, r, path, &format!("{name}.weight"), device)?;
        if wt.is_none() {
            *wt = Some(format!("{:?}", q.dtype()));
        }
        let weight = matmul(q, weights, device)?;
        let bias = if bias {
            Some(dense(
                qtensor_named(&content, r, path, &format!("{name}.bias"), device)?,
                device,
            )?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    };
    let mut layers = Vec::with_capacity(config.layers);
    for i in 0..config.layers {
        let p = format!("blk.{i}");
        let attn_norm = dense(
            qtensor_named(
                &content,
                &mut r,
                path,
                &format!("{p}.attn_norm.weight"),
                device,
            )?,
            device,
        )?;
        let ffn_norm = dense(
            qtensor_named(
                &content,
                &mut r,
                path,
                &format!("{p}.ffn_norm.weight"),
                device,
            )?,
            device,
        )?;
        layers.push(Layer {
            attn_norm,
            wq: linear(
                &mut r,
                &format!("{p}.attn_q"),
                names_with_bias,
                &mut weight_type,
            )?,
            wk: linear(
                &mut r,
                &format!("{p}.attn_k"),
                names_with_bias,
                &mut weight_type,
            )?,
            wv: linear(
                &mut r,
                &format!("{p}.attn_v"),
                names_with_bias,
                &mut weight_type,
            )?,
            wo: linear(&mut r, &format!("{p}.attn_output"), false, &mut weight_type)?,
            ffn_norm,
            w_gate: linear(&mut r, &format!("{p}.ffn_gate"), false, &mut weight_type)?,
            w_up: linear(&mut r, &format!("{p}.ffn_up"), false, &mut weight_type)?,
            w_down: linear(&mut r, &format!("{p}.ffn_down"), false, &mut weight_type)?,
        });
    }
    let norm = dense(
        qtensor_named(&content, &mut r, path, "output_norm.weight", device)?,
        device,
    )?;
    let embd = qtensor_named(&content, &mut r, path, "token_embd.weight", device)?;
    let embedding = embd
        .dequantize(device)
        .map_err(crate::error::invalid_model)?;
    // Models with tied embeddings (SmolLM2) have no `output.weight`: reuse the embedding.
    let output_q = if content.tensor_infos.contains_key("output.weight") {
        qtensor_named(&content, &mut r, path, "output.weight", device)?
    } else {
        embd
    };
    let output = Linear {
        weight: matmul(output_q, weights, device)?,
        bias: None,
    };
    let (rows, cols) = embedding.dims2().map_err(crate::error::invalid_model)?;
    if cols != config.hidden || rows < config.vocab.min(tokenizer.vocab_size()) {
        return Err(Error::InvalidModel {
            reason: format!(
                "token embedding is {rows}x{cols}, expected {}x{}",
                config.vocab, config.hidden
            ),
        });
    }
    let model = Model::new(
        config,
        embedding,
        layers,
        norm,
        output,
        weight_type.unwrap_or_else(|| "F32".into()),
        device.clone(),
    )?;
    Ok((model, tokenizer))
}

/// Loads a GGUF model for our CPU kernels, or returns `None` when a projection or the
/// embedding is in a format they do not multiply (the caller falls back to candle).
fn load_gguf_cpu(
    content: &gguf_file::Content,
    r: &mut BufReader<File>,
    path: &Path,
    config: &ModelConfig,
    threads: usize,
) -> Result<Option<Model>> {
    let mut names = vec!["token_embd.weight".to_string()];
    if content.tensor_infos.contains_key("output.weight") {
        names.push("output.weight".into());
    }
    const PROJ: [&str; 7] = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ];
    for i in 0..config.layers {
        for p in PROJ {
            names.push(format!("blk.{i}.{p}.weight"));
        }
    }
    let mut first = None;
    for n in &names {
        let Some(info) = content.tensor_infos.get(n) else {
            return Err(Error::InvalidModel {
                reason: format!("tensor {n} is missing"),
            });
        };
        if cpu::qtype_of(info.ggml_dtype).is_none() {
            return Ok(None);
        }
        if first.is_none() && n.starts_with("blk.") {
            first = Some(format!("{:?}", info.ggml_dtype));
        }
    }
    let cpu_dev = Device::Cpu;
    let matrix = |r: &mut BufReader<File>, name: &str| -> Result<PlainQ> {
        let q = qtensor_named(content, r, path, name, &cpu_dev)?;
        let bad = |reason: String| Error::InvalidModel {
            reason: format!("tensor {name}: {reason}"),
        };
        let qtype = cpu::qtype_of(q.dtype()).ok_or_else(|| bad("unexpected type".into()))?;
        let (rows, cols) = q.shape().dims2().map_err(|e| bad(e.to_string()))?;
        let raw = q.data().map_err(|e| bad(e.to_string()))?;
        PlainQ::from_ggml(qtype, rows, cols, &raw).map_err(|e| bad(e.0))
    };
    let vector = |r: &mut BufReader<File>, name: &str| -> Result<Vec<f32>> {
        let t = dense(qtensor_named(content, r, path, name, &cpu_dev)?, &cpu_dev)?;
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(crate::error::invalid_model)
    };
    let bias = config.arch == Arch::Qwen2;
    let mut layers = Vec::with_capacity(config.layers);
    for i in 0..config.layers {
        let p = format!("blk.{i}");
        let proj = |r: &mut BufReader<File>, name: &str, with_bias: bool| {
            let w = matrix(r, &format!("{p}.{name}.weight"))?;
            let b = if with_bias {
                Some(vector(r, &format!("{p}.{name}.bias"))?)
            } else {
                None
            };
            Ok::<_, Error>((w, b))
        };
        let q = proj(r, "attn_q", bias)?;
        let k = proj(r, "attn_k", bias)?;
        let v = proj(r, "attn_v", bias)?;
        let wo = proj(r, "attn_output", false)?;
        let gate = proj(r, "ffn_gate", false)?;
        let up = proj(r, "ffn_up", false)?;
        let down = proj(r, "ffn_down", false)?;
        let mixed = q.0.qtype != k.0.qtype || q.0.qtype != v.0.qtype || gate.0.qtype != up.0.qtype;
        if mixed {
            // Mixed formats inside one stack: leave the model to candle.
            return Ok(None);
        }
        let qkv = Proj::stacked(vec![q, k, v])?;
        let gate_up = Proj::stacked(vec![gate, up])?;
        let wo = Proj::new(&wo.0, wo.1);
        let down = Proj::new(&down.0, down.1);
        layers.push(CpuLayer {
            attn_norm: vector(r, &format!("{p}.attn_norm.weight"))?,
            qkv,
            wo,
            ffn_norm: vector(r, &format!("{p}.ffn_norm.weight"))?,
            gate_up,
            down,
        });
    }
    let norm = vector(r, "output_norm.weight")?;
    let embedding = QMatrix::pack(&matrix(r, "token_embd.weight")?);
    let output = if content.tensor_infos.contains_key("output.weight") {
        Some(QMatrix::pack(&matrix(r, "output.weight")?))
    } else {
        None
    };
    let cpu = CpuModel::new(config.clone(), embedding, output, norm, layers, threads)?;
    Ok(Some(Model::cpu(
        cpu,
        config.clone(),
        first.unwrap_or_else(|| "Q8_0".into()),
    )))
}

fn qtensor_named(
    content: &gguf_file::Content,
    r: &mut BufReader<File>,
    path: &Path,
    name: &str,
    device: &Device,
) -> Result<candle_core::quantized::QTensor> {
    let Some(info) = content.tensor_infos.get(name) else {
        return Err(Error::InvalidModel {
            reason: format!("tensor {name} is missing"),
        });
    };
    match info.ggml_dtype {
        GgmlDType::F32
        | GgmlDType::F16
        | GgmlDType::BF16
        | GgmlDType::Q4_0
        | GgmlDType::Q4_1
        | GgmlDType::Q5_0
        | GgmlDType::Q5_1
        | GgmlDType::Q8_0
        | GgmlDType::Q2K
        | GgmlDType::Q3K
        | GgmlDType::Q4K
        | GgmlDType::Q5K
        | GgmlDType::Q6K => {}
        other => {
            return Err(Error::UnsupportedQuantization {
                tensor: name.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    }
    content
        .tensor(r, name, device)
        .map_err(|e| Error::Truncated {
            path: path.to_path_buf(),
            reason: format!("tensor {name}: {e}"),
        })
}

fn dense(q: candle_core::quantized::QTensor, device: &Device) -> Result<Tensor> {
    q.dequantize(device).map_err(crate::error::invalid_model)
}

/// The subset of Hugging Face's `config.json` that llama-family models need.
#[derive(Debug, serde::Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    #[serde(default)]
    rms_norm_eps: Option<f64>,
    #[serde(default)]
    rope_theta: Option<f32>,
    #[serde(default)]
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
}

fn load_safetensors_dir(dir: &Path, device: &Device) -> Result<(Model, Tokenizer)> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(io_err(&cfg_path))?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| Error::InvalidModel {
        reason: format!("{}: {e}", cfg_path.display()),
    })?;
    let arch = Arch::parse(hf.model_type.as_deref().unwrap_or("llama"))?;
    let config = ModelConfig {
        arch,
        hidden: hf.hidden_size,
        layers: hf.num_hidden_layers,
        heads: hf.num_attention_heads,
        kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim: hf
            .head_dim
            .unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
        intermediate: hf.intermediate_size,
        vocab: hf.vocab_size,
        rms_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        rope_style: RopeStyle::Halves,
        context: hf.max_position_embeddings.unwrap_or(4096),
    };
    config.validate()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::InvalidModel {
            reason: format!("no .safetensors files in {}", dir.display()),
        });
    }
    let mut tensors = HashMap::new();
    let mut weight_type = None;
    for f in &files {
        let map = candle_core::safetensors::load(f, device).map_err(|e| Error::Truncated {
            path: f.clone(),
            reason: e.to_string(),
        })?;
        tensors.extend(map);
    }
    let mut take = |name: &str| -> Result<Tensor> {
        let t = tensors.remove(name).ok_or_else(|| Error::InvalidModel {
            reason: format!("tensor {name} is missing"),
        })?;
        match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => {}
            other => {
                return Err(Error::UnsupportedQuantization {
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        }
        if weight_type.is_none() {
            weight_type = Some(format!("{:?}", t.dtype()).to_uppercase());
        }
        t.to_dtype(DType::F32).map_err(crate::error::invalid_model)
    };
    let bias = arch == Arch::Qwen2;
    let lin =
        |take: &mut dyn FnMut(&str) -> Result<Tensor>, name: &str, b: bool| -> Result<Linear> {
            Ok(Linear {
                weight: QMatMul::Tensor(take(&format!("{name}.weight"))?),
                bias: if b {
                    Some(take(&format!("{name}.bias"))?)
                } else {
                    None
                },
            })
        };
    let mut layers = Vec::with_capacity(config.layers);
    for i in 0..config.layers {
        let p = format!("model.layers.{i}");
        layers.push(Layer {
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            wq: lin(&mut take, &format!("{p}.self_attn.q_proj"), bias)?,
            wk: lin(&mut take, &format!("{p}.self_attn.k_proj"), bias)?,
            wv: lin(&mut take, &format!("{p}.self_attn.v_proj"), bias)?,
            wo: lin(&mut take, &format!("{p}.self_attn.o_proj"), false)?,
            ffn_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
            w_gate: lin(&mut take, &format!("{p}.mlp.gate_proj"), false)?,
            w_up: lin(&mut take, &format!("{p}.mlp.up_proj"), false)?,
            w_down: lin(&mut take, &format!("{p}.mlp.down_proj"), false)?,
        });
    }
    let norm = take("model.norm.weight")?;
    let embedding = take("model.embed_tokens.weight")?;
    let output_w = if hf.tie_word_embeddings.unwrap_or(false) {
        embedding.clone()
    } else {
        match take("lm_head.weight") {
            Ok(t) => t,
            Err(Error::InvalidModel { .. }) => embedding.clone(),
            Err(e) => return Err(e),
        }
    };
    let output = Linear {
        weight: QMatMul::Tensor(output_w),
        bias: None,
    };
    let tokenizer = tokenizer_json(&dir.join("tokenizer.json"), dir)?;
    let model = Model::new(
        config,
        embedding,
        layers,
        norm,
        output,
        weight_type.unwrap_or_else(|| "F32".into()),
        device.clone(),
    )?;
    Ok((model, tokenizer))
}

/// Reads a Hugging Face `tokenizer.json` (BPE model) and, if present, the chat template from
/// `tokenizer_config.json` next to it.
pub(crate) fn tokenizer_json(path: &Path, dir: &Path) -> Result<Tokenizer> {
    let bad = |reason: String| Error::InvalidTokenizer { reason };
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let model = &v["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "tokenizer.json model type {:?} is not supported (BPE only)",
            model["type"]
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("tokenizer.json has no model.vocab".into()))?;
    let mut size = vocab.len();
    let added = v["added_tokens"].as_array().cloned().unwrap_or_default();
    for a in &added {
        if let Some(id) = a["id"].as_u64() {
            size = size.max(id as usize + 1);
        }
    }
    let mut tokens = vec![String::new(); size];
    let mut types = vec![1i32; size];
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("token {tok:?} has a non-integer id")))?
            as usize;
        if id >= size {
            return Err(bad(format!("token id {id} is out of range")));
        }
        tokens[id] = tok.clone();
    }
    for a in &added {
        if let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) {
            tokens[id as usize] = content.to_string();
            types[id as usize] = if a["special"].as_bool() == Some(true) {
                3
            } else {
                4
            };
        }
    }
    let merges = model["merges"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| match m {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) => {
                        Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let pre = v["pre_tokenizer"].to_string();
    let split_digits = pre.contains("\"individual_digits\":true");
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let special_id = |key: &str| -> Option<u32> {
        let name = cfg.as_ref()?.get(key)?;
        let name = name.as_str().or_else(|| name.get("content")?.as_str())?;
        tokens.iter().position(|t| t == name).map(|i| i as u32)
    };
    let bos = special_id("bos_token");
    let eos = special_id("eos_token");
    let chat_template = cfg
        .as_ref()
        .and_then(|c| c.get("chat_template")?.as_str().map(str::to_string));
    Tokenizer::from_parts(TokenizerParts {
        model: "gpt2".into(),
        pre: None,
        tokens,
        types,
        scores: Vec::new(),
        merges,
        bos,
        eos,
        add_bos: Some(false),
        add_space_prefix: Some(false),
        chat_template,
        split_digits: Some(split_digits),
    })
}
