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
        let gate_up = Proj::paired(gate, up)?;
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

/// A llama-family model with seeded random weights, built in memory instead of read from a
/// file: for GPU checks and decode benchmarks that need a model's shape and cost, not its
/// answers (`gpu_check` compares greedy output on the GPU with the CPU on one, and times
/// decoding on the SmolLM2- and Llama-1B-shaped ones). Give it to
/// [`EngineBuilder::random_model`](crate::EngineBuilder::random_model).
///
/// The weights depend only on the shape, the dtype and the seed, never on the device or the
/// number of threads. All are uniform: the token embedding with standard deviation 0.02 (as
/// Hugging Face initialises llama), each projection with standard deviation `1/√fan_in`, so
/// that every block moves the residual stream about as much as a trained one does (with 0.02
/// throughout, the tied embedding dominates and greedy decoding just repeats the last token);
/// norm weights are 1 and the output projection is tied to the embedding, as in SmolLM2 and
/// Llama 3.2 1B. The tokenizer is byte-level BPE with no merges: the first 256 ids are the bytes,
/// the rest stand for themselves as `<|random-N|>` and are never produced by encoding text.
///
/// ```
/// use keel_serving::{Engine, GenerateRequest, RandomModel, SamplingParams};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let model = RandomModel::llama(64, 2, 4, 2, 128, 300)?.seed(7);
/// let engine = Engine::builder().random_model(model).kv_blocks(16).build()?;
/// assert_eq!(engine.model_info().architecture, "llama");
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RandomModel {
    config: ModelConfig,
    dtype: crate::cuda::cuda_kernels::Dtype,
    seed: u64,
}

impl RandomModel {
    /// SmolLM2-135M's shape: hidden 576, 30 layers, 9 heads (3 key/value heads) of 64,
    /// feed-forward 1536, vocabulary 49,152, rope θ 100,000.
    pub fn smollm2_135m() -> Self {
        Self::preset(576, 30, 9, 3, 1536, 49_152, 100_000.0)
    }

    /// Llama-3.2-1B's shape: hidden 2048, 16 layers, 32 heads (8 key/value heads) of 64,
    /// feed-forward 8192, vocabulary 128,256, rope θ 500,000 (without Llama 3's rope scaling).
    pub fn llama_1b() -> Self {
        Self::preset(2048, 16, 32, 8, 8192, 128_256, 500_000.0)
    }

    fn preset(
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
        vocab: usize,
        rope_theta: f32,
    ) -> Self {
        Self {
            config: ModelConfig {
                arch: Arch::Llama,
                hidden,
                layers,
                heads,
                kv_heads,
                head_dim: hidden / heads,
                intermediate,
                vocab,
                rms_eps: 1e-5,
                rope_theta,
                rope_style: RopeStyle::Halves,
                context: 2048,
            },
            dtype: crate::cuda::cuda_kernels::Dtype::F32,
            seed: 0,
        }
    }

    /// A llama of any shape: `hidden` split into `heads` heads, `kv_heads` key/value heads,
    /// `layers` blocks, a feed-forward of `intermediate`, a vocabulary of `vocab`; f32,
    /// seed 0, a context of 2048.
    ///
    /// # Errors
    /// [`Error::InvalidModel`] when a size is zero, `heads` does not divide `hidden` into
    /// heads of an even size, `kv_heads` does not divide `heads`, or `vocab` is below 256
    /// (the byte tokens).
    pub fn llama(
        hidden: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
        vocab: usize,
    ) -> Result<Self> {
        if heads == 0 || !hidden.is_multiple_of(heads) {
            return Err(Error::InvalidModel {
                reason: format!("hidden size {hidden} is not a whole number of {heads} heads"),
            });
        }
        if vocab < 256 {
            return Err(Error::InvalidModel {
                reason: format!("vocabulary of {vocab}: the byte tokens alone take 256"),
            });
        }
        let m = Self::preset(
            hidden,
            layers,
            heads,
            kv_heads,
            intermediate,
            vocab,
            10_000.0,
        );
        m.config.validate()?;
        Ok(m)
    }

    /// The weights' and activations' dtype (default f32). bf16 runs on Keel's kernels: on a
    /// CUDA device the kernels themselves, on the CPU their slow reference implementations.
    pub fn dtype(mut self, dtype: crate::cuda::cuda_kernels::Dtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The seed the weights are drawn from (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The trained context length the rope tables cover (default 2048).
    ///
    /// # Errors
    /// [`Error::InvalidModel`] when `context` is zero.
    pub fn context(mut self, context: usize) -> Result<Self> {
        self.config.context = context;
        self.config.validate()?;
        Ok(self)
    }

    /// Parameters (the tied embedding counted once).
    pub fn parameters(&self) -> usize {
        let c = &self.config;
        let per_layer = c.hidden * (c.heads * c.head_dim)
            + 2 * c.hidden * c.kv_dim()
            + (c.heads * c.head_dim) * c.hidden
            + 3 * c.hidden * c.intermediate
            + 2 * c.hidden;
        c.vocab * c.hidden + c.layers * per_layer + c.hidden
    }

    /// Builds the model and its tokenizer on `device`.
    pub(crate) fn build(&self, device: &Device) -> Result<(Model, Tokenizer)> {
        let c = &self.config;
        let dtype = match self.dtype {
            crate::cuda::cuda_kernels::Dtype::Bf16 => DType::BF16,
            _ => DType::F32,
        };
        // Every tensor gets its own stream of numbers, keyed by its index, so the weights do
        // not depend on the order or the threads that draw them.
        let mut next = 0u64;
        // Uniform in ±a has standard deviation a/√3; `std` is the one wanted.
        let mut tensor = |shape: (usize, usize), std: f32| -> Result<Tensor> {
            next += 1;
            random_tensor(self.seed, next, shape, std * 3f32.sqrt(), dtype, device)
        };
        let fan_in = |n: usize| 1.0 / (n as f32).sqrt();
        let q_dim = c.heads * c.head_dim;
        let ones = || Tensor::ones(c.hidden, dtype, device).map_err(crate::error::invalid_model);
        let lin = |w: Tensor| Linear {
            weight: QMatMul::Tensor(w),
            bias: None,
        };
        let embedding = tensor((c.vocab, c.hidden), 0.02)?;
        let mut layers = Vec::with_capacity(c.layers);
        let (h, i) = (fan_in(c.hidden), fan_in(c.intermediate));
        for _ in 0..c.layers {
            layers.push(Layer {
                attn_norm: ones()?,
                wq: lin(tensor((q_dim, c.hidden), h)?),
                wk: lin(tensor((c.kv_dim(), c.hidden), h)?),
                wv: lin(tensor((c.kv_dim(), c.hidden), h)?),
                wo: lin(tensor((c.hidden, q_dim), fan_in(q_dim))?),
                ffn_norm: ones()?,
                w_gate: lin(tensor((c.intermediate, c.hidden), h)?),
                w_up: lin(tensor((c.intermediate, c.hidden), h)?),
                w_down: lin(tensor((c.hidden, c.intermediate), i)?),
            });
        }
        let output = lin(embedding.clone());
        let model = Model::new(
            c.clone(),
            embedding,
            layers,
            ones()?,
            output,
            format!("{dtype:?}").to_uppercase(),
            device.clone(),
        )?;
        Ok((model, random_tokenizer(c.vocab)?))
    }
}

/// Values drawn per fixed-size chunk, each chunk its own SplitMix64 stream.
const RANDOM_CHUNK: usize = 1 << 20;

/// A `[rows, cols]` tensor uniform in `±scale`, from stream `index` of `seed`, drawn on the
/// host (in parallel over chunks) and moved to `device`.
fn random_tensor(
    seed: u64,
    index: u64,
    (rows, cols): (usize, usize),
    scale: f32,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = rows * cols;
    let mut values = vec![0f32; n];
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(n.div_ceil(RANDOM_CHUNK));
    let per_thread = n.div_ceil(RANDOM_CHUNK).div_ceil(threads.max(1)) * RANDOM_CHUNK;
    std::thread::scope(|s| {
        for (t, part) in values.chunks_mut(per_thread.max(1)).enumerate() {
            s.spawn(move || {
                for (k, chunk) in part.chunks_mut(RANDOM_CHUNK).enumerate() {
                    let chunk_index = (t * per_thread / RANDOM_CHUNK + k) as u64;
                    let mut state = seed
                        ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03)
                        ^ chunk_index.wrapping_mul(0x8cb9_2ba7_2f3d_8dd7);
                    for v in chunk {
                        *v = (uniform(&mut state) * 2.0 - 1.0) * scale;
                    }
                }
            });
        }
    });
    let t = Tensor::from_vec(values, (rows, cols), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .and_then(|t| t.to_device(device));
    t.map_err(|e| match device.location() {
        candle_core::DeviceLocation::Cpu => crate::error::invalid_model(e),
        _ => crate::cuda::ops::backend_error(e, device),
    })
}

/// The next SplitMix64 value of `state` as a float in `[0, 1)`.
fn uniform(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

/// A byte-level tokenizer for a random model: the 256 byte tokens, then placeholders.
fn random_tokenizer(vocab: usize) -> Result<Tokenizer> {
    let chars = crate::tokenizer::gpt2_byte_chars();
    let mut tokens: Vec<String> = chars.iter().map(char::to_string).collect();
    tokens.extend((256..vocab).map(|i| format!("<|random-{i}|>")));
    Tokenizer::from_parts(TokenizerParts {
        model: "gpt2".into(),
        tokens,
        ..TokenizerParts::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Engine, GenerateRequest, SamplingParams};

    fn greedy(engine: &Engine, prompt: &[u32], n: usize) -> Vec<u32> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let request = GenerateRequest::tokens(prompt.iter().copied())
            .sampling(SamplingParams::greedy().max_tokens(n).ignore_eos(true));
        rt.block_on(async {
            engine
                .generate(request)
                .unwrap()
                .collect()
                .await
                .unwrap()
                .tokens
        })
    }

    fn engine(spec: RandomModel) -> Engine {
        Engine::builder()
            .random_model(spec)
            .kv_blocks(32)
            .build()
            .unwrap()
    }

    #[test]
    fn a_random_model_engine_generates_deterministically_by_seed() {
        let spec = RandomModel::llama(64, 2, 4, 2, 96, 320).unwrap().seed(11);
        let a = engine(spec.clone());
        let info = a.model_info();
        assert_eq!(
            (
                info.hidden_size,
                info.layers,
                info.heads,
                info.kv_heads,
                info.vocab_size
            ),
            (64, 2, 4, 2, 320)
        );
        assert_eq!(info.weight_type, "F32");
        assert_eq!(info.kernels, "candle");
        let prompt = [1, 200, 300, 7, 7, 42];
        let first = greedy(&a, &prompt, 10);
        assert_eq!(first.len(), 10);
        assert!(first.iter().all(|t| (*t as usize) < 320));
        // Not a degenerate model that repeats one token.
        let distinct: std::collections::HashSet<_> = first.iter().collect();
        assert!(distinct.len() >= 4, "{first:?}");
        assert_eq!(greedy(&engine(spec.clone()), &prompt, 10), first);
        assert_ne!(greedy(&engine(spec.seed(12)), &prompt, 10), first);
        // Text round-trips through the byte-level tokenizer.
        let ids = a
            .tokenizer()
            .encode("héllo", crate::Specials::Plain)
            .unwrap();
        assert_eq!(a.tokenizer().decode(&ids).unwrap(), "héllo");
    }

    #[test]
    fn presets_have_the_published_shapes() {
        let smol = RandomModel::smollm2_135m();
        let c = &smol.config;
        assert_eq!(
            (
                c.hidden,
                c.layers,
                c.heads,
                c.kv_heads,
                c.head_dim,
                c.intermediate,
                c.vocab
            ),
            (576, 30, 9, 3, 64, 1536, 49_152)
        );
        // SmolLM2-135M has 134.5M parameters with its tied embedding.
        assert_eq!(smol.parameters(), 134_515_008);
        let llama = RandomModel::llama_1b();
        assert_eq!((llama.config.hidden, llama.config.kv_dim()), (2048, 512));
        // Llama-3.2-1B: 1.236B.
        assert_eq!(llama.parameters(), 1_235_814_400);
    }

    #[test]
    fn bad_random_shapes_are_typed_errors() {
        for r in [
            RandomModel::llama(64, 2, 5, 1, 96, 300),
            RandomModel::llama(64, 2, 4, 3, 96, 300),
            RandomModel::llama(64, 0, 4, 2, 96, 300),
            RandomModel::llama(64, 2, 4, 2, 96, 100),
            RandomModel::llama(64, 2, 0, 2, 96, 300),
        ] {
            assert!(matches!(r, Err(Error::InvalidModel { .. })));
        }
        assert!(matches!(
            RandomModel::smollm2_135m().context(0),
            Err(Error::InvalidModel { .. })
        ));
    }

    #[test]
    fn random_weights_do_not_depend_on_the_threads() {
        // Two chunks, drawn by one thread or by two.
        let n = RANDOM_CHUNK + 5;
        let t = random_tensor(3, 1, (1, n), 1.0, DType::F32, &Device::Cpu).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut state = 3 ^ 0xd1b5_4a32_d192_ed03u64 ^ 0x8cb9_2ba7_2f3d_8dd7;
        let want = uniform(&mut state) * 2.0 - 1.0;
        assert_eq!(v[RANDOM_CHUNK], want, "the second chunk's stream");
        assert!(v.iter().all(|x| x.abs() <= 1.0));
        assert_ne!(v[0], v[RANDOM_CHUNK]);
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_cuda_engine_without_the_feature_is_a_typed_error() {
        let r = Engine::builder()
            .random_model(RandomModel::llama(64, 1, 4, 2, 96, 300).unwrap())
            .device(crate::Device::Cuda(0))
            .build();
        assert!(matches!(r, Err(Error::CudaUnavailable { ordinal: 0 })));
    }
}
