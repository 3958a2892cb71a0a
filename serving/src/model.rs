//! The llama-family transformer: hyper-parameters, weights, and our own batched forward pass
//! over a paged KV cache (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU).

use candle_core::quantized::QMatMul;
use candle_core::{D, DType, Device, Module, Tensor};
use std::sync::{Mutex, PoisonError};

use crate::cpu::CpuModel;
use crate::cuda::cuda_kernels::SampleParams;
use crate::cuda::cuda_kernels::{self as kernels, AttentionShape, BlockTables, Rounding};
use crate::cuda::graph::{self, StepIds};
use crate::cuda::ops;
use crate::error::{Error, Result, exec};
use crate::kv::{KvCache, KvLayout};

/// The model families this crate runs; they differ only in details of the same block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub(crate) fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "mistral" => Ok(Self::Mistral),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(Error::UnsupportedArchitecture {
                arch: other.to_string(),
            }),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How rotary embeddings pair up the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeStyle {
    /// Adjacent pairs `(2i, 2i+1)`: llama.cpp's GGUF conversion permutes Q and K for this.
    Interleaved,
    /// Halves `(i, i + d/2)`: Hugging Face checkpoints and Qwen2 GGUFs.
    Halves,
}

/// Hyper-parameters of one model, read from GGUF metadata or `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ModelConfig {
    pub(crate) arch: Arch,
    pub(crate) hidden: usize,
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) intermediate: usize,
    pub(crate) vocab: usize,
    pub(crate) rms_eps: f64,
    pub(crate) rope_theta: f32,
    pub(crate) rope_style: RopeStyle,
    pub(crate) context: usize,
}

impl ModelConfig {
    /// Checks the relations the forward pass relies on, so bad files fail at load time.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::InvalidModel { reason });
        if self.hidden == 0 || self.layers == 0 || self.heads == 0 || self.kv_heads == 0 {
            return bad(format!("zero-sized hyper-parameter in {self:?}"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} attention heads is not a multiple of {} key/value heads",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head dimension {} must be even", self.head_dim));
        }
        if self.vocab == 0 || self.context == 0 || self.intermediate == 0 {
            return bad("vocabulary, context and feed-forward sizes must be positive".into());
        }
        Ok(())
    }

    pub(crate) fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// A projection: quantized (candle's `QMatMul`) or dense, with an optional bias.
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) weight: QMatMul,
    pub(crate) bias: Option<Tensor>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.weight.forward(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// One transformer block's weights.
#[derive(Debug)]
pub(crate) struct Layer {
    pub(crate) attn_norm: Tensor,
    pub(crate) wq: Linear,
    pub(crate) wk: Linear,
    pub(crate) wv: Linear,
    pub(crate) wo: Linear,
    pub(crate) ffn_norm: Tensor,
    pub(crate) w_gate: Linear,
    pub(crate) w_up: Linear,
    pub(crate) w_down: Linear,
}

/// A loaded model: its configuration and the weights in the form one of the two forward
/// passes reads.
#[derive(Debug)]
pub(crate) struct Model {
    pub(crate) config: ModelConfig,
    /// A short name for the weights' storage type, e.g. `Q4_1` or `F32`.
    pub(crate) weight_type: String,
    imp: Imp,
}

#[derive(Debug)]
enum Imp {
    /// candle tensors and candle's matmuls: any device, any weight type candle reads.
    Candle(Box<CandleModel>),
    /// Our CPU kernels over plain buffers (Q4_0, Q4_1 and Q8_0 weights on the CPU).
    Cpu(Box<CpuModel>),
}

/// The candle-tensor form of a model.
#[derive(Debug)]
pub(crate) struct CandleModel {
    config: ModelConfig,
    embedding: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    output: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// The activations' dtype (the embedding's): f32, or bf16 on the kernel path.
    dtype: DType,
    path: CandlePath,
    /// Captured decode steps (see `cuda::graph`): on by default on a CUDA device, off on the
    /// CPU, where tests turn them on to run steps through the graphs' fixed buffers.
    graphs: Option<Mutex<graph::DecodeGraphs>>,
    /// Page-locked buffers for reading picked ids back without waiting for the stream (used
    /// on a GPU only; see `ops::start_read`).
    readback: ops::Readback,
}

/// Which of the candle-tensor forward passes runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CandlePath {
    /// candle's ops throughout, in f32 (the CPU path: its numerics are what the llama.cpp
    /// parity tests pin down).
    Ops,
    /// Keel's kernels (`crate::cuda::ops`) for the fused residual add and RMSNorm, in-place
    /// rotary embedding, the KV-cache write and paged decode attention; candle for the
    /// matmuls, the embedding lookup, SwiGLU and prefill attention. Chosen on a CUDA device,
    /// and for bf16 models (the `Ops` path is f32 only), where on the CPU the kernels' CPU
    /// references run; tests force it on the CPU to check the wiring.
    Kernels,
}

/// What a step returns for one sequence that wants a token.
#[derive(Debug)]
pub(crate) enum RowOutput {
    /// Its logits, for the host sampler.
    Logits(Vec<f32>),
    /// The token the device sampler picked (only ids cross to the host).
    Token(u32),
}

/// Where a launched step's input token ids come from ([`Model::launch_step`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum StepTokens<'a> {
    /// Host values: prompts, and tokens the host has read back or sampled.
    Host(&'a [u32]),
    /// The ids an earlier launched step picked, fed to this step on the device without being
    /// read back: one per sequence of a decode step, sequence `k` taking row `rows[k]` of
    /// `ids` (`rows: None` is the identity: the same sequences in the same order). The pipelined
    /// loop selects rows when some of the earlier step's sequences have left the batch.
    Picked {
        ids: &'a DeviceIds,
        rows: Option<&'a [u32]>,
    },
    /// A mixed step, fed partly from an earlier launched step's picked ids and partly from the
    /// host: one entry of `rows` per sequence, in batch order, `Some(r)` for a sequence that
    /// decodes one token, row `r` of `ids`, and `None` for one whose tokens are the next
    /// `len` of `host` (a prefill chunk). The ids are concatenated with an upload of `host` and
    /// gathered into batch order on the device, without reading them back (`DeviceIds::mix`).
    Mixed {
        ids: &'a DeviceIds,
        rows: &'a [Option<u32>],
        host: &'a [u32],
    },
}

/// Token ids a launched step's device sampler picked, still on the model's device (a `[rows]`
/// u32 tensor). The pipelined decode loop feeds them to the next step with
/// [`StepTokens::Picked`] before it reads them back with [`DeviceIds::collect`].
#[derive(Debug)]
pub(crate) struct DeviceIds {
    ids: Tensor,
    /// Their copy to the host, queued right behind the step that picked them.
    read: ops::IdsRead,
}

impl DeviceIds {
    /// How many ids: one per sequence of the step that picked them.
    pub(crate) fn len(&self) -> usize {
        self.ids.elem_count()
    }

    /// Reads the ids back to the host: the one call of a pipelined step that waits for the
    /// device. On a GPU their copy was queued right behind the step that picked them, into
    /// page-locked memory, so this waits for that step only, not for a step launched after it
    /// (`ops::start_read`).
    pub(crate) fn collect(&self) -> Result<Vec<u32>> {
        self.read.wait()
    }

    /// The ids at `rows`, in that order, as a new `[rows.len()]` tensor on the same device,
    /// without reading them back: [`DeviceIds::mix`] with every sequence decoding and no host
    /// tokens.
    ///
    /// # Errors
    /// [`Error::Execution`] when a row is out of range, and the device's errors.
    pub(crate) fn select(&self, rows: &[u32]) -> Result<Tensor> {
        let rows: Vec<Option<u32>> = rows.iter().copied().map(Some).collect();
        self.mix(&rows, &vec![1; rows.len()], &[])
    }

    /// The token ids of a mixed step (`StepTokens::Mixed`), in batch order, as a new tensor on
    /// the same device, without reading the picked ids back: `host` is uploaded (an
    /// asynchronous copy) and concatenated after the picked ids, and one gather (candle's
    /// `index_select`, queued on the stream) puts each sequence's tokens in its place. The
    /// gather's indices are built and checked on the host: sequence `k` takes row `rows[k]`
    /// of the picked ids, or, when `rows[k]` is `None`, its next `lens[k]` host tokens.
    ///
    /// # Errors
    /// [`Error::Execution`] when a row is out of range, a picked row would feed more than one
    /// token, or the host tokens do not match the chunks; and the device's errors.
    pub(crate) fn mix(&self, rows: &[Option<u32>], lens: &[usize], host: &[u32]) -> Result<Tensor> {
        let device = self.ids.device();
        let bad = |reason: String| Err(Error::Execution { reason });
        let n = self.len();
        if rows.len() != lens.len() {
            return bad(format!(
                "{} token sources for {} sequences",
                rows.len(),
                lens.len()
            ));
        }
        let mut index = Vec::with_capacity(lens.iter().sum());
        let mut next_host = 0usize;
        for (&row, &len) in rows.iter().zip(lens) {
            match row {
                Some(r) if (r as usize) < n && len == 1 => index.push(r),
                Some(r) => {
                    return bad(format!(
                        "row {r} of {n} picked ids cannot feed a chunk of {len} tokens"
                    ));
                }
                None => {
                    for k in next_host..next_host + len {
                        let Ok(at) = u32::try_from(n + k) else {
                            return bad(format!("host token {k} is out of range"));
                        };
                        index.push(at);
                    }
                    next_host += len;
                }
            }
        }
        if next_host != host.len() {
            return bad(format!(
                "{} host tokens for chunks of {next_host}",
                host.len()
            ));
        }
        let err = |e: candle_core::Error| ops::backend_error(e, device);
        let index = Tensor::from_slice(&index, index.len(), device).map_err(err)?;
        let all = if host.is_empty() {
            self.ids.clone()
        } else {
            let up = Tensor::from_slice(host, host.len(), device).map_err(err)?;
            Tensor::cat(&[&self.ids, &up], 0).map_err(err)?
        };
        all.index_select(&index, 0).map_err(err)
    }
}

/// One sequence's slice of a batched forward step.
#[derive(Debug, Clone)]
pub(crate) struct SeqStep {
    /// Position of the first new token (tokens before it are already in the cache).
    pub(crate) start_pos: usize,
    /// Number of new tokens this step.
    pub(crate) len: usize,
    /// Cache slot of every position `0..start_pos + len`, from the sequence's block table.
    pub(crate) slots: Vec<u32>,
    /// Whether the caller needs logits for the last new token.
    pub(crate) want_logits: bool,
}

impl Model {
    #[allow(clippy::too_many_arguments)] // A plain constructor over the parts the loaders produce.
    pub(crate) fn new(
        config: ModelConfig,
        embedding: Tensor,
        layers: Vec<Layer>,
        norm: Tensor,
        output: Linear,
        weight_type: String,
        device: Device,
    ) -> Result<Self> {
        config.validate()?;
        let (cos, sin) = rope_table(&config);
        let half = config.head_dim / 2;
        let table = |v: Vec<f32>| {
            Tensor::from_vec(v, (config.context, half), &device)
                .map_err(crate::error::invalid_model)
        };
        let (cos, sin) = (table(cos)?, table(sin)?);
        let dtype = embedding.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidModel {
                reason: format!("activations in {dtype:?}; the engine runs f32 or bf16"),
            });
        }
        let path = if device.is_cuda() || dtype != DType::F32 {
            CandlePath::Kernels
        } else {
            CandlePath::Ops
        };
        Ok(Self {
            config: config.clone(),
            weight_type,
            imp: Imp::Candle(Box::new(CandleModel {
                config,
                embedding,
                layers,
                norm,
                output,
                cos,
                sin,
                graphs: device
                    .is_cuda()
                    .then(|| Mutex::new(graph::DecodeGraphs::default())),
                device,
                dtype,
                path,
                readback: ops::Readback::default(),
            })),
        })
    }

    /// Turns captured decode steps on or off (the kernel path only; see `cuda::graph`).
    pub(crate) fn set_decode_graphs(&mut self, on: bool) {
        if let Imp::Candle(m) = &mut self.imp {
            m.graphs = (on && m.path == CandlePath::Kernels)
                .then(|| Mutex::new(graph::DecodeGraphs::default()));
        }
    }

    /// The graph cache's counters and why graphs turned off, if they did (`None` without
    /// graphs).
    pub(crate) fn graph_report(&self) -> Option<(graph::GraphStats, Option<String>)> {
        match &self.imp {
            Imp::Candle(m) => m.graphs.as_ref().map(|g| {
                let g = g.lock().unwrap_or_else(PoisonError::into_inner);
                (g.stats(), g.disabled().map(str::to_string))
            }),
            Imp::Cpu(_) => None,
        }
    }

    /// A model for our CPU kernels.
    pub(crate) fn cpu(cpu: CpuModel, config: ModelConfig, weight_type: String) -> Self {
        Self {
            config,
            weight_type,
            imp: Imp::Cpu(Box::new(cpu)),
        }
    }

    /// How the KV cache is held for this model: f16 in host memory (our CPU kernels), or
    /// candle tensors of the dtype its forward pass writes. (The name predates the tensors'
    /// dtype; the scheduler passes the answer straight to `KvCache::new`.)
    pub(crate) fn host_kv(&self) -> KvLayout {
        match &self.imp {
            Imp::Cpu(_) => KvLayout::Host,
            Imp::Candle(m) => KvLayout::Tensors(match m.path {
                CandlePath::Ops => DType::F32,
                CandlePath::Kernels => m.dtype,
            }),
        }
    }

    /// Which kernels run the model, for reports: `candle`, `keel-cuda` (candle's matmuls
    /// with Keel's CUDA kernels), `keel-reference` (the same pass on the CPU through the
    /// kernels' CPU references) or `keel-cpu/<isa> x<threads>`.
    pub(crate) fn kernels(&self) -> String {
        match &self.imp {
            Imp::Candle(m) => match m.path {
                CandlePath::Ops => "candle".into(),
                CandlePath::Kernels if m.device.is_cuda() => "keel-cuda".into(),
                CandlePath::Kernels => "keel-reference".into(),
            },
            Imp::Cpu(m) => m.describe(),
        }
    }

    /// Runs the candle-tensor model through Keel's kernels even on the CPU (their CPU
    /// references), so tests can check the kernel path's wiring without a GPU.
    #[cfg(test)]
    pub(crate) fn force_kernel_path(&mut self) {
        if let Imp::Candle(m) = &mut self.imp {
            m.path = CandlePath::Kernels;
        }
    }

    /// Whether [`Model::forward_step`] can pick tokens where the logits are: Keel's kernel
    /// path, whose sampling kernel runs on the CUDA device (and as its CPU reference on the CPU).
    pub(crate) fn samples_on_device(&self) -> bool {
        matches!(&self.imp, Imp::Candle(m) if m.path == CandlePath::Kernels)
    }

    /// Whether [`Model::launch_step`] can run: a step launched with its tokens picked on the
    /// device and left there, so the next step can be launched from them before the host reads
    /// them (pipelined decode). True on Keel's kernel path, on a CUDA device and on the CPU
    /// (through the kernels' CPU references, where every call completes before it returns, so
    /// the control flow is the same and only the overlap is missing).
    pub(crate) fn can_chain(&self) -> bool {
        self.samples_on_device()
    }

    /// Launches a step in which every sequence that wants its token (`SeqStep::want_logits`)
    /// gets it from the device sampler (`sample` holds one setting per wanting sequence, in
    /// order; at least one wants), and returns the picked ids, one row per wanting sequence,
    /// without reading them back ([`DeviceIds::collect`] does). Needs [`Model::can_chain`].
    /// With [`StepTokens::Picked`] every sequence decodes one token, the one the earlier step
    /// picked for it; with [`StepTokens::Mixed`] some do, and the others are fed host tokens
    /// (prefill chunks, which may not want a token).
    ///
    /// # Errors
    /// [`Error::Execution`] when the model cannot launch steps or the step is not of that
    /// form, and the forward pass's errors.
    pub(crate) fn launch_step(
        &self,
        tokens: StepTokens<'_>,
        seqs: &[SeqStep],
        cache: &mut KvCache,
        sample: &[SampleParams],
    ) -> Result<DeviceIds> {
        let bad = |reason: String| Err(Error::Execution { reason });
        let m = match &self.imp {
            Imp::Candle(m) if m.path == CandlePath::Kernels => m,
            _ => return bad("this model cannot launch steps ahead of reading their tokens".into()),
        };
        let wanting = seqs.iter().filter(|s| s.want_logits).count();
        if sample.len() != wanting || wanting == 0 || seqs.iter().any(|s| s.len == 0) {
            return bad(format!(
                "a launched step needs every one of its {} sequences to take a token, some to \
                 want one, and one sampling setting for each that does ({wanting} want, got {} \
                 settings)",
                seqs.len(),
                sample.len()
            ));
        }
        // Picked ids taken by row, when the step feeds a subset of the earlier step's rows.
        let selected;
        let ids = match tokens {
            StepTokens::Host(ids) => StepIds::Host(ids),
            StepTokens::Mixed {
                ids: picked,
                rows,
                host,
            } => {
                // Host tokens are checked here, as `kernel_logits` checks a host-fed step's.
                check_tokens(&self.config, host)?;
                let lens: Vec<usize> = seqs.iter().map(|s| s.len).collect();
                selected = picked.mix(rows, &lens, host)?;
                StepIds::Device(&selected)
            }
            StepTokens::Picked { ids: picked, rows } => {
                let fed = rows.map_or(picked.len(), <[u32]>::len);
                if fed != seqs.len()
                    || seqs.is_empty()
                    || seqs.iter().any(|s| s.len != 1 || !s.want_logits)
                {
                    return bad(format!(
                        "{fed} picked ids cannot feed a step of {} sequences that does not \
                         decode one token each",
                        seqs.len()
                    ));
                }
                match rows {
                    None => StepIds::Device(&picked.ids),
                    Some(rows) => {
                        selected = picked.select(rows)?;
                        StepIds::Device(&selected)
                    }
                }
            }
        };
        // Nothing from here to the return waits for a GPU, so the host goes back to its own
        // work (the previous step's tokens) while this step runs:
        // - the checks and the index arrays (positions, slots, block tables) use host values
        //   only; picked ids are never read (see `kernel_logits` on the vocabulary check);
        // - every upload is an asynchronous host-to-device copy (pageable memory is staged and
        //   the call returns), picked ids reach a graph's fixed buffer with a device-to-device
        //   copy kernel (`ops::copy_u32`), and an eager step reads them where they are; rows
        //   are selected with candle's `index_select`, a queued gather kernel whose row
        //   indices were checked on the host (`DeviceIds::select`); a mixed step's host tokens
        //   are uploaded, concatenated after the picked ids (a queued copy) and gathered into
        //   batch order the same way (`DeviceIds::mix`);
        // - the kernels, candle's ops and cuBLAS matmuls, a graph launch and the copy of its
        //   output, and the sampling kernel are queued on the stream;
        // - there is no `to_vec*`, `to_scalar` or move to the CPU on this path.
        // The exception is the first step of a new decode-graph shape: its warm-up run
        // synchronizes once before the capture (`DecodeGraphs::step`).
        let Some(logits) = m.kernel_logits(ids, seqs, cache)? else {
            return bad("a launched step has no tokens".into());
        };
        let ids = ops::sample_on_device(&logits, sample)?;
        // The copy back is queued now, before anything else goes on the stream, so reading
        // these ids never waits for the step launched from them.
        let read = ops::start_read(&ids, &m.readback);
        Ok(DeviceIds { ids, read })
    }

    /// Whether [`Model::forward_step`] can pick greedy tokens where the logits are: on the
    /// device with the kernel path, and in Keel's CPU kernels, which read the argmax off their
    /// logits buffer instead of copying the row out for the host sampler.
    pub(crate) fn picks_greedy(&self) -> bool {
        self.samples_on_device() || matches!(&self.imp, Imp::Cpu(_))
    }

    /// [`Model::forward`], with the tokens of some sequences picked by the device sampler:
    /// `sample` holds one entry per sequence with `want_logits`, in order, `Some` for those to
    /// sample on the device (which needs [`Model::samples_on_device`]). Only their ids come back;
    /// the others get their logits.
    pub(crate) fn forward_step(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        cache: &mut KvCache,
        sample: &[Option<SampleParams>],
    ) -> Result<Vec<RowOutput>> {
        let wanted = seqs.iter().filter(|s| s.want_logits).count();
        if sample.len() != wanted {
            return Err(Error::Execution {
                reason: format!(
                    "{} sampling settings for {wanted} sequences that want a token",
                    sample.len()
                ),
            });
        }
        let on_device = sample.iter().any(Option::is_some);
        let m = match &self.imp {
            Imp::Candle(m) if on_device && m.path == CandlePath::Kernels => m,
            Imp::Cpu(m) if on_device => {
                if sample.iter().flatten().any(|p| !p.is_greedy()) {
                    return Err(Error::Execution {
                        reason: "the CPU kernels pick greedy tokens only; other settings \
                                 sample on the host"
                            .into(),
                    });
                }
                let greedy: Vec<bool> = sample.iter().map(Option::is_some).collect();
                return m.forward_picking(tokens, seqs, &mut host_kv(cache)?, &greedy);
            }
            _ if on_device => {
                return Err(Error::Execution {
                    reason: "this model samples on the host only".into(),
                });
            }
            _ => {
                let rows = self.forward(tokens, seqs, cache)?;
                return Ok(rows.into_iter().map(RowOutput::Logits).collect());
            }
        };
        let Some(logits) = m.kernel_logits(StepIds::Host(tokens), seqs, cache)? else {
            return Ok(Vec::new());
        };
        let err = |e: candle_core::Error| ops::backend_error(e, &m.device);
        let (dev_rows, host_rows): (Vec<u32>, Vec<u32>) =
            (0..wanted as u32).partition(|&i| sample[i as usize].is_some());
        let params: Vec<SampleParams> = sample.iter().flatten().copied().collect();
        let pick = |rows: &[u32]| {
            Tensor::from_slice(rows, rows.len(), &m.device)
                .and_then(|idx| logits.index_select(&idx, 0))
                .map_err(err)
        };
        let ids = if dev_rows.len() == wanted {
            ops::sample(&logits, &params)?
        } else {
            ops::sample(&pick(&dev_rows)?, &params)?
        };
        let mut host = if host_rows.is_empty() {
            Vec::new()
        } else {
            pick(&host_rows)?.to_vec2::<f32>().map_err(err)?
        }
        .into_iter();
        let mut ids = ids.into_iter();
        let mut out = Vec::with_capacity(wanted);
        for s in sample {
            let row = match s {
                Some(_) => ids.next().map(RowOutput::Token),
                None => host.next().map(RowOutput::Logits),
            };
            out.push(row.ok_or_else(|| Error::Execution {
                reason: "the sampler returned fewer rows than the step has".into(),
            })?);
        }
        Ok(out)
    }

    /// Runs one batched step: `tokens` holds every sequence's new tokens back to back, in the
    /// order of `seqs`. Writes the new keys and values into `cache` and returns one row of
    /// logits for every sequence with `want_logits`, in order.
    pub(crate) fn forward(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        match &self.imp {
            Imp::Candle(m) => match m.path {
                CandlePath::Ops => {
                    check_step(&m.config, tokens, seqs, cache.slot_count())?;
                    m.forward_inner(tokens, seqs, cache).map_err(exec)
                }
                CandlePath::Kernels => m.forward_kernels(tokens, seqs, cache),
            },
            Imp::Cpu(m) => m.forward(tokens, seqs, &mut host_kv(cache)?),
        }
    }
}

/// The f16 host cache the CPU kernels run on.
fn host_kv(cache: &mut KvCache) -> Result<crate::cpu::HostKv<'_>> {
    cache.host().ok_or_else(|| Error::Execution {
        reason: "the CPU kernels need a host KV cache".into(),
    })
}

/// Checks a step before candle's own forward pass indexes with it: the sequences cover the
/// tokens exactly, every position has a cache slot inside the cache and lies inside the
/// context, and every token is in the vocabulary. (The kernel paths check the same inside.)
fn check_step(c: &ModelConfig, tokens: &[u32], seqs: &[SeqStep], slots: usize) -> Result<()> {
    let bad = |reason: String| Err(Error::Execution { reason });
    let covered: usize = seqs.iter().map(|s| s.len).sum();
    if covered != tokens.len() {
        return bad(format!(
            "{} tokens but the sequences cover {covered}",
            tokens.len()
        ));
    }
    for (i, s) in seqs.iter().enumerate() {
        let ctx = s.start_pos.saturating_add(s.len);
        if ctx > c.context {
            return bad(format!(
                "sequence {i} reaches position {ctx}, beyond the context of {}",
                c.context
            ));
        }
        let Some(named) = s.slots.get(..ctx) else {
            return bad(format!(
                "sequence {i}: {} cache slots for a context of {ctx}",
                s.slots.len()
            ));
        };
        if let Some(slot) = named.iter().find(|&&slot| slot as usize >= slots) {
            return bad(format!(
                "sequence {i}: cache slot {slot} is outside the cache of {slots}"
            ));
        }
    }
    check_tokens(c, tokens)
}

/// Checks that every token id is in the vocabulary.
fn check_tokens(c: &ModelConfig, tokens: &[u32]) -> Result<()> {
    match tokens.iter().find(|&&t| t as usize >= c.vocab) {
        Some(tok) => Err(Error::Execution {
            reason: format!("token id {tok} is outside the vocabulary of {}", c.vocab),
        }),
        None => Ok(()),
    }
}

impl CandleModel {
    fn forward_inner(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        cache: &mut KvCache,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let mut positions = Vec::with_capacity(t);
        let mut write_slots = Vec::with_capacity(t);
        let mut logit_rows = Vec::new();
        let mut offset = 0usize;
        for s in seqs {
            for i in 0..s.len {
                positions.push((s.start_pos + i) as u32);
                write_slots.push(s.slots[s.start_pos + i]);
            }
            offset += s.len;
            if s.want_logits {
                logit_rows.push((offset - 1) as u32);
            }
        }
        let dev = &self.device;
        let ids = Tensor::from_slice(tokens, t, dev)?;
        let pos = Tensor::from_slice(&positions, t, dev)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let write_idx = Tensor::from_slice(&write_slots, (t, 1), dev)?
            .broadcast_as((t, c.kv_dim()))?
            .contiguous()?;
        // Gather indices per sequence are shared by all layers, so build them once.
        // Sequences with several new tokens (prefill chunks) get their own attention. Decoding
        // sequences (one new token) are grouped by context length rounded up to
        // DECODE_BUCKET, and each group is one batched attention with the padding keys masked
        // out. A sequence's padding depends only on its own length, so its result does not
        // depend on what else is in the batch.
        let mut gathers = Vec::new();
        let mut buckets: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        let mut starts = Vec::with_capacity(seqs.len());
        let mut off = 0usize;
        for (i, s) in seqs.iter().enumerate() {
            starts.push(off);
            off += s.len;
            let ctx = s.start_pos + s.len;
            if s.len == 1 {
                buckets
                    .entry(ctx.div_ceil(DECODE_BUCKET) * DECODE_BUCKET)
                    .or_default()
                    .push(i);
            } else {
                let idx = Tensor::from_slice(&s.slots[..ctx], ctx, dev)?;
                let mask = causal_mask(s.start_pos, s.len, dev)?;
                gathers.push((i, idx, mask));
            }
        }
        let mut groups = Vec::with_capacity(buckets.len());
        // Row order of the concatenated attention outputs: prefill sequences, then groups.
        let mut order: Vec<usize> = gathers.iter().map(|g| g.0).collect();
        for (bucket, members) in &buckets {
            let bucket = *bucket;
            let n = members.len();
            let mut idx = Vec::with_capacity(n * bucket);
            let mut mask = vec![0f32; n * bucket];
            let mut rows = Vec::with_capacity(n);
            for (j, &i) in members.iter().enumerate() {
                let s = &seqs[i];
                let ctx = s.start_pos + 1;
                idx.extend_from_slice(&s.slots[..ctx]);
                idx.extend(std::iter::repeat_n(s.slots[0], bucket - ctx));
                mask[j * bucket + ctx..(j + 1) * bucket].fill(f32::NEG_INFINITY);
                rows.push(starts[i] as u32);
                order.push(i);
            }
            groups.push(DecodeGroup {
                n,
                bucket,
                rows: Tensor::from_vec(rows, n, dev)?,
                idx: Tensor::from_vec(idx, n * bucket, dev)?,
                mask: Tensor::from_vec(mask, (n, 1, 1, bucket), dev)?,
            });
        }
        // Map each sequence's rows back to the batch's token order.
        let (perm, identity) = batch_permutation(seqs, &order);
        let perm = Tensor::from_vec(perm, t, dev)?;

        let mut x = self.embedding.index_select(&ids, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let q = layer.wq.forward(&h)?.reshape((t, c.heads, c.head_dim))?;
            let k = layer.wk.forward(&h)?.reshape((t, c.kv_heads, c.head_dim))?;
            let v = layer.wv.forward(&h)?;
            let q = f16_round(&rope(&q, &cos, &sin, c.rope_style)?)?;
            let k = f16_round(&rope(&k, &cos, &sin, c.rope_style)?.reshape((t, c.kv_dim()))?)?;
            let v = f16_round(&v)?;
            let (kc, vc) = cache.layer(li)?;
            kc.scatter_set(&write_idx, &k.contiguous()?, 0)?;
            vc.scatter_set(&write_idx, &v.contiguous()?, 0)?;
            let mut outs = Vec::with_capacity(gathers.len() + groups.len());
            for (i, idx, mask) in &gathers {
                let qs = q.narrow(0, starts[*i], seqs[*i].len)?;
                let ks = kc.index_select(idx, 0)?;
                let vs = vc.index_select(idx, 0)?;
                outs.push(self.attention(&qs, &ks, &vs, mask)?);
            }
            for g in &groups {
                outs.push(self.decode_attention(&q, kc, vc, g)?);
            }
            let attn = Tensor::cat(&outs, 0)?;
            let attn = if identity {
                attn
            } else {
                attn.index_select(&perm, 0)?
            };
            x = (x + layer.wo.forward(&attn)?)?;
            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate = layer.w_gate.forward(&h)?.silu()?;
            let up = layer.w_up.forward(&h)?;
            x = (x + layer.w_down.forward(&(gate * up)?)?)?;
        }
        if logit_rows.is_empty() {
            return Ok(Vec::new());
        }
        let n = logit_rows.len();
        let rows = Tensor::from_slice(&logit_rows, n, dev)?;
        let last = x.index_select(&rows, 0)?;
        let last = rms_norm(&last, &self.norm, c.rms_eps)?;
        let logits = self.output.forward(&last)?.to_dtype(DType::F32)?;
        logits.to_vec2::<f32>()
    }

    /// The forward pass on Keel's kernels (`CandlePath::Kernels`). Same batch semantics as
    /// `forward_inner`: decoding sequences share one paged-attention launch that reads the
    /// cache through their block tables (no gather, no padding), prefill chunks attend with
    /// candle's ops in f32 over their gathered cache rows, and every residual add is fused
    /// into the RMSNorm that follows it.
    fn forward_kernels(
        &self,
        tokens: &[u32],
        seqs: &[SeqStep],
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>> {
        match self.kernel_logits(StepIds::Host(tokens), seqs, cache)? {
            Some(logits) => logits
                .to_vec2::<f32>()
                .map_err(|e| ops::backend_error(e, &self.device)),
            None => Ok(Vec::new()),
        }
    }

    /// The kernel path's step up to the logits, `[rows, vocab]` f32 on the model's device
    /// (`None` when no sequence wants logits). A step in which every sequence decodes one token
    /// and wants its logits goes through the model's captured CUDA graphs when it has them
    /// ([`CandleModel::graphs`]); every other step runs eagerly.
    fn kernel_logits(
        &self,
        tokens: StepIds<'_>,
        seqs: &[SeqStep],
        cache: &mut KvCache,
    ) -> Result<Option<Tensor>> {
        let dev = &self.device;
        let err = |e: candle_core::Error| ops::backend_error(e, dev);
        let t = tokens.len();
        if t == 0 {
            return Ok(None);
        }
        // The ids index the embedding table. Host ids are checked here; ids that a launched
        // step's sampling kernel picked are in the vocabulary by construction (the kernel writes
        // a column index of its `[rows, vocab]` logits), and checking them would mean reading
        // them back, which is what pipelined decode avoids.
        if let StepIds::Host(ids) = tokens {
            check_tokens(&self.config, ids)?;
        }
        let bs = cache.block_size();
        let bad = |reason: String| Error::Execution { reason };
        let mut positions = Vec::with_capacity(t);
        let mut write_slots = Vec::with_capacity(t);
        let mut logit_rows = Vec::new();
        let mut starts = Vec::with_capacity(seqs.len());
        let mut prefill = Vec::new();
        let mut decode = Vec::new();
        let mut decode_rows = Vec::new();
        let mut tables = Vec::new();
        let mut offset = 0usize;
        for (i, s) in seqs.iter().enumerate() {
            let ctx = s.start_pos + s.len;
            let slots = s.slots.get(..ctx).ok_or_else(|| {
                bad(format!(
                    "sequence {i}: {} cache slots for a context of {ctx}",
                    s.slots.len()
                ))
            })?;
            positions.extend((s.start_pos..ctx).map(|p| p as u32));
            write_slots.extend_from_slice(&slots[s.start_pos..]);
            starts.push(offset);
            if s.len == 1 {
                // The scheduler's slots come from the block table (`KvCache::slots`), so a
                // block's first slot names the block.
                let table: Vec<u32> = slots
                    .iter()
                    .step_by(bs)
                    .map(|slot| slot / bs as u32)
                    .collect();
                decode.push(i);
                decode_rows.push(offset as u32);
                tables.push((table, ctx));
            } else if s.len > 1 {
                let idx = Tensor::from_slice(slots, ctx, dev).map_err(err)?;
                prefill.push((i, idx, causal_mask(s.start_pos, s.len, dev).map_err(err)?));
            }
            offset += s.len;
            if s.want_logits && s.len > 0 {
                logit_rows.push((offset - 1) as u32);
            }
        }
        if offset != t {
            return Err(bad(format!(
                "{t} tokens for sequences of {offset} new tokens"
            )));
        }
        let width = graph::width_bucket(tables.iter().map(|(tb, _)| tb.len()).max().unwrap_or(1));
        if let Some(graphs) = &self.graphs
            && decode.len() == seqs.len()
            && decode.len() == t
            && logit_rows.len() == t
            // A graph's attention holds the whole bucket (an eager step only its longest
            // context), so very long contexts stay eager.
            && ops::attention_fits(self.config.head_dim, width * bs)
        {
            let key = graph::GraphKey {
                sequences: t,
                width,
                cache: cache.layer(0).map_err(err)?.0.id(),
            };
            let inputs = graph::DecodeInputs {
                tokens,
                positions: &positions,
                slots: &write_slots,
                tables: &tables,
                block_size: bs,
            };
            let cache: &KvCache = cache;
            let run = |b: &graph::StepBuffers| -> Result<Tensor> {
                let step = KernelStep {
                    ids: b.ids.clone(),
                    positions: b.positions.clone(),
                    write_slots: b.slots.clone(),
                    starts: (0..t).collect(),
                    prefill: Vec::new(),
                    decoding: Some((b.tables.clone(), Some(b.on_device.clone()), None)),
                    perm: None,
                    logits: Rows::All,
                };
                self.run_layers(&step, seqs, cache)?
                    .ok_or_else(|| bad("a decode step wants every sequence's logits".into()))
            };
            let mut graphs = graphs.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(logits) = graphs.step(dev, key, &inputs, &run)? {
                return Ok(Some(logits));
            }
        }
        let decoding = if decode.is_empty() {
            None
        } else {
            let refs: Vec<(&[u32], usize)> =
                tables.iter().map(|(t, n)| (t.as_slice(), *n)).collect();
            let bt = BlockTables::new(&refs, bs)?;
            let on_device = ops::DeviceTables::upload(&bt, dev)?;
            let rows = if decode.len() == t {
                None
            } else {
                let n = decode_rows.len();
                Some(Tensor::from_vec(decode_rows, n, dev).map_err(err)?)
            };
            Some((bt, on_device, rows))
        };
        // Attention outputs come out prefill sequences first, then the decoding ones; map
        // each sequence's rows back to the batch's token order.
        let order: Vec<usize> = prefill
            .iter()
            .map(|p| p.0)
            .chain(decode.iter().copied())
            .collect();
        let (perm, identity) = batch_permutation(seqs, &order);
        let perm = if identity {
            None
        } else {
            Some(Tensor::from_vec(perm, t, dev).map_err(err)?)
        };
        let logits = if logit_rows.is_empty() {
            Rows::Nothing
        } else {
            let n = logit_rows.len();
            Rows::Pick(Tensor::from_slice(&logit_rows, n, dev).map_err(err)?)
        };
        let ids = match tokens {
            StepIds::Host(ids) => Tensor::from_slice(ids, t, dev).map_err(err)?,
            StepIds::Device(ids) => ids.clone(),
        };
        let step = KernelStep {
            ids,
            // Every layer reads the same positions and slots: one upload each for the step.
            positions: ops::Indices::upload(&positions, dev)?,
            write_slots: ops::Indices::upload(&write_slots, dev)?,
            starts,
            prefill,
            decoding,
            perm,
            logits,
        };
        self.run_layers(&step, seqs, cache)
    }

    /// The layers and the output head of a kernel-path step over its device-side inputs.
    fn run_layers(
        &self,
        st: &KernelStep,
        seqs: &[SeqStep],
        cache: &KvCache,
    ) -> Result<Option<Tensor>> {
        let c = &self.config;
        let dev = &self.device;
        let err = |e: candle_core::Error| ops::backend_error(e, dev);
        let t = st.ids.elem_count();
        let shape = AttentionShape::new(c.heads, c.kv_heads, c.head_dim, cache.block_size())?
            .rounding(Rounding::F16);
        let style = match c.rope_style {
            RopeStyle::Interleaved => kernels::RopeStyle::Interleaved,
            RopeStyle::Halves => kernels::RopeStyle::Halves,
        };
        let eps = c.rms_eps as f32;
        let mut x = self.embedding.index_select(&st.ids, 0).map_err(err)?;
        // The residual add still owed to `x`: each block's output is added by the fused norm
        // that opens the next block (the first adds zeros).
        let mut delta = x.zeros_like().map_err(err)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let (sum, h) = ops::rms_norm_residual(&x, &delta, &layer.attn_norm, eps)?;
            x = sum;
            let q = layer.wq.forward(&h).map_err(err)?;
            let k = layer.wk.forward(&h).map_err(err)?;
            let v = layer.wv.forward(&h).map_err(err)?;
            let q = q.reshape((t, c.heads, c.head_dim)).map_err(err)?;
            let k3 = k.reshape((t, c.kv_heads, c.head_dim)).map_err(err)?;
            // Q and K are rounded through f16 as llama.cpp stores them, as the CPU paths do.
            let pos = &st.positions;
            ops::rope_inplace(&q, pos, &self.cos, &self.sin, style, Rounding::F16)?;
            ops::rope_inplace(&k3, pos, &self.cos, &self.sin, style, Rounding::F16)?;
            let (kc, vc) = cache.layer(li).map_err(err)?;
            ops::kv_write(kc, &k, &st.write_slots, Rounding::None)?;
            ops::kv_write(vc, &v, &st.write_slots, Rounding::F16)?;
            let mut outs = Vec::with_capacity(st.prefill.len() + 1);
            for (i, idx, mask) in &st.prefill {
                let f32 = |t: Tensor| t.to_dtype(DType::F32);
                let run = || -> candle_core::Result<Tensor> {
                    let qs = f32(q.narrow(0, st.starts[*i], seqs[*i].len)?)?;
                    let ks = f32(kc.index_select(idx, 0)?)?;
                    let vs = f32(vc.index_select(idx, 0)?)?;
                    self.attention(&qs, &ks, &vs, mask)?.to_dtype(self.dtype)
                };
                outs.push(run().map_err(err)?);
            }
            if let Some((bt, on_device, rows)) = &st.decoding {
                let qd = match rows {
                    None => q.clone(),
                    Some(rows) => q.index_select(rows, 0).map_err(err)?,
                };
                let out = ops::paged_attention(&qd, kc, vc, &shape, bt, on_device.as_ref())?;
                outs.push(out);
            }
            let attn = if outs.len() == 1 {
                outs.swap_remove(0)
            } else {
                Tensor::cat(&outs, 0).map_err(err)?
            };
            let attn = match &st.perm {
                None => attn,
                Some(perm) => attn.index_select(perm, 0).map_err(err)?,
            };
            let o = layer.wo.forward(&attn).map_err(err)?;
            let (sum, h) = ops::rms_norm_residual(&x, &o, &layer.ffn_norm, eps)?;
            x = sum;
            let mlp = || -> candle_core::Result<Tensor> {
                let gate = layer.w_gate.forward(&h)?.silu()?;
                let up = layer.w_up.forward(&h)?;
                layer.w_down.forward(&(gate * up)?)
            };
            delta = mlp().map_err(err)?;
        }
        let (x, delta) = match &st.logits {
            Rows::Nothing => return Ok(None),
            Rows::All => (x, delta),
            Rows::Pick(rows) => {
                let pick = |t: &Tensor| t.index_select(rows, 0).map_err(err);
                (pick(&x)?, pick(&delta)?)
            }
        };
        let (_, last) = ops::rms_norm_residual(&x, &delta, &self.norm, eps)?;
        let logits = self
            .output
            .forward(&last)
            .and_then(|l| l.to_dtype(DType::F32))
            .map_err(err)?;
        Ok(Some(logits))
    }

    /// Attention for a group of decoding sequences padded to one context length.
    fn decode_attention(
        &self,
        q: &Tensor,
        kc: &Tensor,
        vc: &Tensor,
        g: &DecodeGroup,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let group = c.heads / c.kv_heads;
        let q = q
            .index_select(&g.rows, 0)?
            .reshape((g.n, c.kv_heads, group, c.head_dim))?;
        let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
            cache
                .index_select(&g.idx, 0)?
                .reshape((g.n, g.bucket, c.kv_heads, c.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let k = gather(kc)?;
        let v = gather(vc)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&g.mask)?;
        let probs = f16_round(&softmax_last(&scores)?)?;
        probs.matmul(&v)?.reshape((g.n, c.heads * c.head_dim))
    }

    /// Grouped-query attention of one sequence's new queries over its cached keys and values.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (len, _, _) = q.dims3()?;
        let ctx = k.dim(0)?;
        let group = c.heads / c.kv_heads;
        // Heads sharing one key/value head are adjacent, so folding them into the query-row
        // dimension lets one batched matmul per key/value head serve the whole group.
        let q = q
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c.kv_heads, group * len, c.head_dim))?;
        let k = k
            .reshape((ctx, c.kv_heads, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let v = v
            .reshape((ctx, c.kv_heads, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?;
        let scores = scores
            .reshape((c.kv_heads, group, len, ctx))?
            .broadcast_add(mask)?;
        let probs = f16_round(&softmax_last(&scores)?.reshape((c.kv_heads, group * len, ctx))?)?;
        let out = probs.matmul(&v)?; // [kv_heads, group*len, head_dim]
        out.reshape((c.heads, len, c.head_dim))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((len, c.heads * c.head_dim))
    }
}

/// A kernel-path step's inputs on the model's device, shared by every layer.
struct KernelStep {
    /// One token id per row of the batch.
    ids: Tensor,
    positions: ops::Indices,
    write_slots: ops::Indices,
    /// Each sequence's first row in the batch.
    starts: Vec<usize>,
    /// Prefilling sequences: their index, cache rows to gather, and causal mask.
    prefill: Vec<(usize, Tensor, Tensor)>,
    /// Decoding sequences' block tables, their device copy, and the rows of their queries
    /// (`None` when every row decodes).
    decoding: Option<(BlockTables, Option<ops::DeviceTables>, Option<Tensor>)>,
    /// Batch row of each attention output row; `None` when they are in order.
    perm: Option<Tensor>,
    logits: Rows,
}

/// Which rows of a step get logits.
enum Rows {
    Nothing,
    /// Every row, in order.
    All,
    Pick(Tensor),
}

/// Decoding sequences are padded to a multiple of this many positions to share one attention.
const DECODE_BUCKET: usize = 32;

/// Decoding sequences whose contexts round up to the same length.
#[derive(Debug)]
struct DecodeGroup {
    n: usize,
    bucket: usize,
    /// Row of each member's query in the step's token order.
    rows: Tensor,
    /// Cache slots, `bucket` per member (padding repeats the first slot).
    idx: Tensor,
    /// `[n, 1, 1, bucket]`: 0 for real positions, -inf for padding.
    mask: Tensor,
}

/// Rotary angle tables `[context, head_dim/2]` (cos, sin): angle `p · θ^(−2i/d)`.
pub(crate) fn rope_table(c: &ModelConfig) -> (Vec<f32>, Vec<f32>) {
    let half = c.head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f32 / c.head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(c.context * half);
    let mut sin = Vec::with_capacity(c.context * half);
    for p in 0..c.context {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}

/// Applies rotary embeddings to `x` of shape `[t, heads, head_dim]`; `cos`/`sin` are `[t, head_dim/2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, style: RopeStyle) -> candle_core::Result<Tensor> {
    let (t, h, d) = x.dims3()?;
    let half = d / 2;
    let cos = cos.reshape((t, 1, half, 1))?;
    let sin = sin.reshape((t, 1, half, 1))?;
    match style {
        RopeStyle::Interleaved => {
            let x = x.reshape((t, h, half, 2))?;
            let a = x.narrow(3, 0, 1)?;
            let b = x.narrow(3, 1, 1)?;
            let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
            Tensor::cat(&[ra, rb], 3)?.reshape((t, h, d))
        }
        RopeStyle::Halves => {
            let x = x.reshape((t, h, 2, half))?;
            let cos = cos.reshape((t, 1, 1, half))?;
            let sin = sin.reshape((t, 1, 1, half))?;
            let a = x.narrow(2, 0, 1)?;
            let b = x.narrow(2, 1, 1)?;
            let ra = (a.broadcast_mul(&cos)? - b.broadcast_mul(&sin)?)?;
            let rb = (a.broadcast_mul(&sin)? + b.broadcast_mul(&cos)?)?;
            Tensor::cat(&[ra, rb], 2)?.reshape((t, h, d))
        }
    }
}

fn f16_round(x: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Additive mask `[len, start + len]`: query `i` (at position `start + i`) sees keys `0..=start + i`.
fn causal_mask(start: usize, len: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let ctx = start + len;
    let mut m = vec![0f32; len * ctx];
    for i in 0..len {
        for j in (start + i + 1)..ctx {
            m[i * ctx + j] = f32::NEG_INFINITY;
        }
    }
    Tensor::from_vec(m, (len, ctx), dev)
}

/// Where each token of the batch (sequences in `seqs` order) lands when the sequences are
/// processed in `order`: the row of the reordered batch for every original row, and whether
/// that is the identity (nothing to permute).
fn batch_permutation(seqs: &[SeqStep], order: &[usize]) -> (Vec<u32>, bool) {
    let mut out_start = vec![0usize; seqs.len()];
    let mut pos = 0usize;
    for &i in order {
        out_start[i] = pos;
        pos += seqs[i].len;
    }
    let perm: Vec<u32> = seqs
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            let base = out_start[i];
            (0..s.len).map(move |k| (base + k) as u32)
        })
        .collect();
    let identity = perm.iter().enumerate().all(|(k, p)| *p as usize == k);
    (perm, identity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RandomModel;
    use crate::cuda::cuda_kernels::Dtype;
    use crate::kv::blocks_for;

    const BLOCK: usize = 4;

    fn tiny(seed: u64) -> RandomModel {
        RandomModel::llama(64, 2, 4, 2, 96, 300).unwrap().seed(seed)
    }

    fn model(spec: &RandomModel, kernels: bool) -> Model {
        let (mut m, _) = spec.build(&Device::Cpu).unwrap();
        if kernels {
            m.force_kernel_path();
        }
        m
    }

    /// A host cache of `blocks` blocks laid out for `m`.
    fn cache_for(m: &Model, blocks: usize) -> KvCache {
        let c = &m.config;
        KvCache::new(
            c.layers,
            blocks,
            BLOCK,
            c.kv_dim(),
            &Device::Cpu,
            m.host_kv(),
        )
        .unwrap()
    }

    /// One sequence of the little scheduler below: its tokens, how many are in the cache, and
    /// its block table.
    struct Seq {
        tokens: Vec<u32>,
        computed: usize,
        blocks: Vec<u32>,
    }

    /// Runs `prompts` the way the scheduler does (the first prompt prefills in chunks of 3
    /// while the others decode, blocks handed out in a scrambled order so block tables are not
    /// contiguous) and returns every step's logits and the greedy tokens.
    fn run(m: &Model, prompts: &[Vec<u32>], new_tokens: usize) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
        let c = &m.config;
        let mut cache =
            KvCache::new(c.layers, 32, BLOCK, c.kv_dim(), &Device::Cpu, m.host_kv()).unwrap();
        let mut free: Vec<u32> = (0..32).map(|i| (i * 7) % 32).collect();
        let mut seqs: Vec<Seq> = prompts
            .iter()
            .map(|p| Seq {
                tokens: p.clone(),
                computed: 0,
                blocks: Vec::new(),
            })
            .collect();
        let mut all_logits = Vec::new();
        let target: Vec<usize> = prompts.iter().map(|p| p.len() + new_tokens).collect();
        while seqs.iter().zip(&target).any(|(s, t)| s.tokens.len() < *t) {
            let mut tokens = Vec::new();
            let mut steps = Vec::new();
            let mut who = Vec::new();
            for (i, s) in seqs.iter_mut().enumerate() {
                if s.tokens.len() >= target[i] {
                    continue;
                }
                let len = (s.tokens.len() - s.computed).min(if i == 0 { 3 } else { 64 });
                let need = blocks_for(s.computed + len, BLOCK);
                while s.blocks.len() < need {
                    s.blocks.push(free.pop().unwrap());
                }
                tokens.extend_from_slice(&s.tokens[s.computed..s.computed + len]);
                steps.push(SeqStep {
                    start_pos: s.computed,
                    len,
                    slots: cache.slots(&s.blocks, s.computed + len),
                    want_logits: s.computed + len == s.tokens.len(),
                });
                who.push(i);
            }
            let logits = m.forward(&tokens, &steps, &mut cache).unwrap();
            let mut rows = logits.into_iter();
            for (step, &i) in steps.iter().zip(&who) {
                seqs[i].computed += step.len;
                if step.want_logits {
                    let row = rows.next().unwrap();
                    let best = row
                        .iter()
                        .enumerate()
                        .fold(
                            (0, f32::NEG_INFINITY),
                            |b, (k, v)| if *v > b.1 { (k, *v) } else { b },
                        )
                        .0;
                    seqs[i].tokens.push(best as u32);
                    all_logits.push(row);
                }
            }
        }
        let generated = seqs
            .iter()
            .zip(prompts)
            .map(|(s, p)| s.tokens[p.len()..].to_vec())
            .collect();
        (all_logits, generated)
    }

    fn rel_err(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
        assert_eq!(a.len(), b.len());
        let scale = b
            .iter()
            .flatten()
            .fold(0f64, |m, x| m.max(f64::from(x.abs())));
        let diff = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())));
        diff / scale
    }

    fn prompts() -> Vec<Vec<u32>> {
        vec![
            (0..11).map(|i| (i * 37 + 5) % 300).collect(),
            vec![17],
            (0..6).map(|i| (i * 11 + 200) % 300).collect(),
        ]
    }

    #[test]
    fn decode_graphs_give_the_eager_logits_through_their_fixed_buffers() {
        // On the CPU a "replay" reruns the step over the graph's fixed buffers, so this checks
        // that the buffers carry every per-step input (tokens, positions, slots, padded block
        // tables, context lengths) across batch sizes and width buckets. The CUDA capture
        // itself is checked by gpu_check.
        let spec = tiny(5);
        let eager = model(&spec, true);
        let mut graphed = model(&spec, true);
        assert!(graphed.graph_report().is_none());
        graphed.set_decode_graphs(true);
        let (la, ta) = run(&eager, &prompts(), 12);
        let (lb, tb) = run(&graphed, &prompts(), 12);
        assert_eq!(ta, tb);
        assert_eq!(la, lb, "graph steps changed the logits");
        let (stats, off) = graphed.graph_report().unwrap();
        assert_eq!(off, None);
        // Batches of 3, 2 and 1 decoding sequences, and tables growing past a width bucket.
        assert!(stats.captures >= 3, "{stats:?}");
        assert!(stats.replays >= 5, "{stats:?}");
        // Graphs are only for the kernel path.
        let mut plain = model(&spec, false);
        plain.set_decode_graphs(true);
        assert!(plain.graph_report().is_none());
    }

    #[test]
    fn kernel_path_matches_the_candle_path_on_the_cpu() {
        let spec = tiny(3);
        let plain = model(&spec, false);
        let keel = model(&spec, true);
        assert_eq!(plain.kernels(), "candle");
        assert_eq!(keel.kernels(), "keel-reference");
        let (la, ta) = run(&plain, &prompts(), 8);
        let (lb, tb) = run(&keel, &prompts(), 8);
        assert_eq!(ta, tb);
        // f64 accumulation in the references against candle's f32 sums; Q, K, V and the
        // probabilities are f16-rounded on both paths.
        let e = rel_err(&lb, &la);
        assert!(e < 1e-4, "kernel path logits differ from candle's by {e:e}");
        assert!(ta.iter().all(|t| t.len() == 8));
        // The comparison means something only if the model does not just repeat a token.
        let distinct: std::collections::HashSet<_> = ta.iter().flatten().collect();
        assert!(distinct.len() >= 8, "{ta:?}");
    }

    #[test]
    fn kernel_path_output_does_not_depend_on_the_batch() {
        let keel = model(&tiny(5), true);
        let all = prompts();
        let (_, together) = run(&keel, &all, 6);
        for (i, p) in all.iter().enumerate() {
            let (_, alone) = run(&keel, std::slice::from_ref(p), 6);
            assert_eq!(alone[0], together[i], "prompt {i}");
        }
    }

    #[test]
    fn random_weights_depend_on_the_seed_only() {
        let one = |seed| run(&model(&tiny(seed), false), &prompts()[..1], 4).0;
        assert_eq!(one(9), one(9));
        assert_ne!(one(9), one(10));
    }

    #[test]
    fn bf16_runs_on_the_kernel_path_near_f32() {
        let spec = tiny(4);
        let f32_model = model(&spec, false);
        let bf16 = model(&spec.clone().dtype(Dtype::Bf16), false);
        assert_eq!(bf16.kernels(), "keel-reference");
        assert_eq!(bf16.host_kv(), KvLayout::Tensors(DType::BF16));
        assert_eq!(bf16.weight_type, "BF16");
        // One step from the same prompt, so the two see the same tokens.
        let (la, _) = run(&f32_model, &prompts()[..1], 1);
        let (lb, _) = run(&bf16, &prompts()[..1], 1);
        let e = rel_err(&lb, &la);
        assert!(e < 5e-2, "bf16 logits differ from f32 by {e:e}");
        assert!(e > 0.0, "bf16 should round something");
    }

    #[test]
    fn bad_steps_are_typed_errors_on_the_kernel_path() {
        let m = model(&tiny(1), true);
        let c = &m.config;
        let mut cache =
            KvCache::new(c.layers, 4, BLOCK, c.kv_dim(), &Device::Cpu, m.host_kv()).unwrap();
        // Too few slots for the context.
        let short = SeqStep {
            start_pos: 0,
            len: 2,
            slots: vec![0],
            want_logits: true,
        };
        assert!(matches!(
            m.forward(&[1, 2], &[short], &mut cache),
            Err(Error::Execution { .. })
        ));
        // A decode step whose block lies outside the cache.
        let outside = SeqStep {
            start_pos: 1,
            len: 1,
            slots: vec![0, 1],
            want_logits: true,
        };
        let outside_far = SeqStep {
            slots: vec![40, 41],
            ..outside.clone()
        };
        assert!(m.forward(&[3], &[outside], &mut cache).is_ok());
        assert!(matches!(
            m.forward(&[3], &[outside_far], &mut cache),
            Err(Error::CacheIndexOutOfRange { .. })
        ));
    }

    #[test]
    fn steps_fed_from_picked_ids_give_the_host_fed_tokens() {
        // Two sequences decode eight greedy tokens each. One model feeds every step the ids the
        // host read back; the other launches each decode step from the previous step's ids on
        // the device (`StepTokens::Picked`), eagerly and through decode graphs (whose fixed ids
        // buffer is then filled device to device), and reads them only afterwards.
        let spec = tiny(8);
        let prompts = [prompts()[0].clone(), prompts()[2].clone()];
        let greedy = [SampleParams::greedy(); 2];
        let c = model(&spec, false).config.clone();
        let new_cache = |m: &Model| {
            KvCache::new(c.layers, 16, BLOCK, c.kv_dim(), &Device::Cpu, m.host_kv()).unwrap()
        };
        let steps_at = |lens: [usize; 2], cache: &KvCache| -> Vec<SeqStep> {
            lens.iter()
                .enumerate()
                .map(|(i, &len)| {
                    // Sequence i owns blocks 8i.. so tables never overlap.
                    let table: Vec<u32> = (0..8).map(|b| (8 * i + b) as u32).collect();
                    SeqStep {
                        start_pos: len - 1,
                        len: 1,
                        slots: cache.slots(&table, len),
                        want_logits: true,
                    }
                })
                .collect()
        };
        let prefill = |m: &Model, cache: &mut KvCache| -> Vec<u32> {
            let mut tokens = Vec::new();
            let mut steps = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                tokens.extend_from_slice(p);
                let table: Vec<u32> = (0..8).map(|b| (8 * i + b) as u32).collect();
                steps.push(SeqStep {
                    start_pos: 0,
                    len: p.len(),
                    slots: cache.slots(&table, p.len()),
                    want_logits: true,
                });
            }
            let ids = m.launch_step(StepTokens::Host(&tokens), &steps, cache, &greedy);
            ids.unwrap().collect().unwrap()
        };
        let host_fed = {
            let m = model(&spec, true);
            let mut cache = new_cache(&m);
            let mut last = prefill(&m, &mut cache);
            let mut out = vec![last.clone()];
            for k in 0..8 {
                let lens = [prompts[0].len() + k + 1, prompts[1].len() + k + 1];
                let steps = steps_at(lens, &cache);
                let rows = m.forward_step(&last, &steps, &mut cache, &[Some(greedy[0]); 2]);
                last = rows
                    .unwrap()
                    .into_iter()
                    .map(|r| match r {
                        RowOutput::Token(t) => t,
                        RowOutput::Logits(_) => panic!("expected a device pick"),
                    })
                    .collect();
                out.push(last.clone());
            }
            out
        };
        // With `swap`, every launched step lists the two sequences in the other order from the
        // step before, so each takes its token from the other row (`rows: Some([1, 0])`).
        for (graphs, swap) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut m = model(&spec, true);
            m.set_decode_graphs(graphs);
            assert!(m.can_chain());
            let mut cache = new_cache(&m);
            let mut out = vec![prefill(&m, &mut cache)];
            let first = steps_at([prompts[0].len() + 1, prompts[1].len() + 1], &cache);
            let mut flight = m
                .launch_step(StepTokens::Host(&out[0]), &first, &mut cache, &greedy)
                .unwrap();
            // Whether the step in flight lists the sequences in reverse order.
            let mut reversed = false;
            let in_order = |mut ids: Vec<u32>, reversed: bool| {
                if reversed {
                    ids.reverse();
                }
                ids
            };
            for k in 1..8 {
                let lens = [prompts[0].len() + k + 1, prompts[1].len() + k + 1];
                let mut steps = steps_at(lens, &cache);
                let rows = swap.then_some(&[1, 0][..]);
                if swap && k % 2 == 1 {
                    steps.reverse();
                }
                let picked = StepTokens::Picked { ids: &flight, rows };
                let next = m.launch_step(picked, &steps, &mut cache, &greedy).unwrap();
                out.push(in_order(flight.collect().unwrap(), reversed));
                flight = next;
                reversed = swap && k % 2 == 1;
            }
            out.push(in_order(flight.collect().unwrap(), reversed));
            assert_eq!(out, host_fed, "graphs {graphs}, swap {swap}");
            if graphs {
                let (stats, off) = m.graph_report().unwrap();
                assert_eq!(off, None);
                assert!(stats.replays >= 6, "{stats:?}");
            }
        }
        // The distinct tokens show the comparison means something.
        let distinct: std::collections::HashSet<_> = host_fed.iter().flatten().collect();
        assert!(distinct.len() >= 6, "{host_fed:?}");
    }

    #[test]
    fn launched_steps_of_the_wrong_form_are_typed_errors() {
        let m = model(&tiny(9), true);
        let c = &m.config;
        let mut cache =
            KvCache::new(c.layers, 8, BLOCK, c.kv_dim(), &Device::Cpu, m.host_kv()).unwrap();
        let greedy = SampleParams::greedy();
        let prefill = SeqStep {
            start_pos: 0,
            len: 2,
            slots: vec![0, 1],
            want_logits: true,
        };
        let picked = m
            .launch_step(
                StepTokens::Host(&[3, 4]),
                std::slice::from_ref(&prefill),
                &mut cache,
                &[greedy],
            )
            .unwrap();
        assert_eq!(picked.len(), 1);
        let decode = SeqStep {
            start_pos: 2,
            len: 1,
            slots: vec![0, 1, 2],
            want_logits: true,
        };
        let bad = [
            // Picked ids feed one token per sequence, not a prefill chunk.
            (
                StepTokens::Picked {
                    ids: &picked,
                    rows: None,
                },
                vec![prefill.clone()],
                vec![greedy],
            ),
            // One id for two sequences.
            (
                StepTokens::Picked {
                    ids: &picked,
                    rows: None,
                },
                vec![decode.clone(), decode.clone()],
                vec![greedy; 2],
            ),
            // Row selection: a row the picked ids do not have, and two rows for one sequence.
            (
                StepTokens::Picked {
                    ids: &picked,
                    rows: Some(&[1]),
                },
                vec![decode.clone()],
                vec![greedy],
            ),
            (
                StepTokens::Picked {
                    ids: &picked,
                    rows: Some(&[0, 0]),
                },
                vec![decode.clone()],
                vec![greedy],
            ),
            // No sequences at all.
            (
                StepTokens::Picked {
                    ids: &picked,
                    rows: Some(&[]),
                },
                vec![],
                vec![],
            ),
            // A sampling setting missing, and a sequence that wants no token.
            (StepTokens::Host(&[5]), vec![decode.clone()], vec![]),
            (
                StepTokens::Host(&[5]),
                vec![SeqStep {
                    want_logits: false,
                    ..decode.clone()
                }],
                vec![greedy],
            ),
            // A host token outside the vocabulary.
            (
                StepTokens::Host(&[c.vocab as u32]),
                vec![decode.clone()],
                vec![greedy],
            ),
            // Mixed steps: a picked row feeding a chunk, a row out of range, host tokens that
            // do not match the chunks, one outside the vocabulary, and no sequence wanting.
            (
                StepTokens::Mixed {
                    ids: &picked,
                    rows: &[Some(0)],
                    host: &[],
                },
                vec![prefill.clone()],
                vec![greedy],
            ),
            (
                StepTokens::Mixed {
                    ids: &picked,
                    rows: &[Some(1), None],
                    host: &[5, 6],
                },
                vec![decode.clone(), prefill.clone()],
                vec![greedy; 2],
            ),
            (
                StepTokens::Mixed {
                    ids: &picked,
                    rows: &[Some(0), None],
                    host: &[5],
                },
                vec![decode.clone(), prefill.clone()],
                vec![greedy; 2],
            ),
            (
                StepTokens::Mixed {
                    ids: &picked,
                    rows: &[Some(0), None],
                    host: &[5, c.vocab as u32],
                },
                vec![decode.clone(), prefill.clone()],
                vec![greedy; 2],
            ),
            (
                StepTokens::Mixed {
                    ids: &picked,
                    rows: &[None],
                    host: &[5, 6],
                },
                vec![SeqStep {
                    want_logits: false,
                    ..prefill.clone()
                }],
                vec![],
            ),
        ];
        for (tokens, steps, params) in bad {
            assert!(
                matches!(
                    m.launch_step(tokens, &steps, &mut cache, &params),
                    Err(Error::Execution { .. })
                ),
                "{tokens:?} {steps:?}"
            );
        }
        // Selecting rows directly: out of range is a typed error, in range keeps the ids.
        assert!(matches!(
            picked.select(&[0, 1]),
            Err(Error::Execution { .. })
        ));
        let ids = picked.collect().unwrap();
        let twice = picked.select(&[0, 0]).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(twice, [ids[0], ids[0]]);
        // Mixing: each sequence's tokens in batch order, picked rows and host chunks
        // interleaved.
        let mixed = picked
            .mix(&[None, Some(0), None], &[2, 1, 1], &[7, 8, 9])
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(mixed, [7, 8, ids[0], 9]);
        // A well-formed step still runs, and candle's own path cannot launch steps at all.
        assert!(
            m.launch_step(
                StepTokens::Picked {
                    ids: &picked,
                    rows: None
                },
                std::slice::from_ref(&decode),
                &mut cache,
                &[greedy]
            )
            .is_ok()
        );
        let plain = model(&tiny(9), false);
        assert!(!plain.can_chain());
        let mut plain_cache = cache_for(&plain, 8);
        assert!(matches!(
            plain.launch_step(
                StepTokens::Host(&[5]),
                &[decode],
                &mut plain_cache,
                &[greedy]
            ),
            Err(Error::Execution { .. })
        ));
    }

    #[test]
    fn device_sampling_picks_per_row_and_returns_the_other_rows_logits() {
        let m = model(&tiny(6), true);
        assert!(m.samples_on_device());
        let c = &m.config;
        let cache = || KvCache::new(c.layers, 8, BLOCK, c.kv_dim(), &Device::Cpu, m.host_kv());
        // Two sequences prefilled in one step, both wanting a token.
        let steps = vec![
            SeqStep {
                start_pos: 0,
                len: 3,
                slots: vec![0, 1, 2],
                want_logits: true,
            },
            SeqStep {
                start_pos: 0,
                len: 2,
                slots: vec![BLOCK as u32, BLOCK as u32 + 1],
                want_logits: true,
            },
        ];
        let tokens = [5, 9, 17, 40, 41];
        let logits = m.forward(&tokens, &steps, &mut cache().unwrap()).unwrap();
        let best =
            |row: &[f32]| (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as u32;
        let greedy = Some(SampleParams::greedy());
        // Both rows on the device, then the first on the device and the second on the host.
        let out = m
            .forward_step(&tokens, &steps, &mut cache().unwrap(), &[greedy, greedy])
            .unwrap();
        let ids: Vec<u32> = out
            .iter()
            .map(|r| match r {
                RowOutput::Token(t) => *t,
                RowOutput::Logits(_) => panic!("a row asked for the device came back as logits"),
            })
            .collect();
        assert_eq!(ids, vec![best(&logits[0]), best(&logits[1])]);
        let out = m
            .forward_step(&tokens, &steps, &mut cache().unwrap(), &[greedy, None])
            .unwrap();
        assert!(matches!(&out[0], RowOutput::Token(t) if *t == best(&logits[0])));
        assert!(matches!(&out[1], RowOutput::Logits(l) if *l == logits[1]));
        // Hot sampling with a draw near 1 and near 0 picks from the kept candidates.
        let hot = |u| Some(SampleParams::new(1.0, 5, 1.0, 0.0, u).unwrap());
        for u in [0.0, 0.999] {
            let out = m
                .forward_step(&tokens, &steps, &mut cache().unwrap(), &[hot(u), hot(u)])
                .unwrap();
            for (r, row) in out.iter().zip(&logits) {
                let RowOutput::Token(t) = r else {
                    panic!("expected a token")
                };
                let mut top: Vec<u32> = (0..row.len() as u32).collect();
                top.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]));
                assert!(top[..5].contains(t), "token {t} is not among the top 5");
            }
        }
        // The settings must match the sequences that want a token.
        assert!(matches!(
            m.forward_step(&tokens, &steps, &mut cache().unwrap(), &[greedy]),
            Err(Error::Execution { .. })
        ));
        // A model without the kernel path samples on the host only.
        let plain = model(&tiny(6), false);
        assert!(!plain.samples_on_device());
        let mut plain_cache = cache_for(&plain, 8);
        assert!(matches!(
            plain.forward_step(&tokens, &steps, &mut plain_cache, &[greedy, None]),
            Err(Error::Execution { .. })
        ));
        let host = plain
            .forward_step(&tokens, &steps, &mut plain_cache, &[None, None])
            .unwrap();
        assert!(host.iter().all(|r| matches!(r, RowOutput::Logits(_))));
    }

    #[test]
    fn bad_steps_are_typed_errors_on_the_candle_path() {
        let m = model(&tiny(2), false);
        let c = &m.config;
        let mut cache =
            KvCache::new(c.layers, 4, BLOCK, c.kv_dim(), &Device::Cpu, m.host_kv()).unwrap();
        let good = SeqStep {
            start_pos: 0,
            len: 2,
            slots: vec![0, 1],
            want_logits: true,
        };
        let bad_steps = [
            // Too few slots for the context.
            (
                vec![1, 2],
                SeqStep {
                    slots: vec![0],
                    ..good.clone()
                },
            ),
            // A slot outside the cache.
            (
                vec![1, 2],
                SeqStep {
                    slots: vec![0, 4 * BLOCK as u32],
                    ..good.clone()
                },
            ),
            // Tokens the sequences do not cover.
            (vec![1, 2, 3], good.clone()),
            // A token outside the vocabulary.
            (vec![1, c.vocab as u32], good.clone()),
            // Positions beyond the context.
            (
                vec![1, 2],
                SeqStep {
                    start_pos: c.context - 1,
                    ..good.clone()
                },
            ),
        ];
        for (tokens, step) in bad_steps {
            assert!(
                matches!(
                    m.forward(&tokens, std::slice::from_ref(&step), &mut cache),
                    Err(Error::Execution { .. })
                ),
                "{tokens:?} {step:?}"
            );
        }
        // The cache still serves a well-formed step afterwards.
        assert_eq!(m.forward(&[1, 2], &[good], &mut cache).unwrap().len(), 1);
    }
}
