//! The async front of the engine: [`Engine`], its builder, and the per-request
//! [`GenerationStream`]. All model work happens on the engine's own thread (see `scheduler`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use tokio::sync::{mpsc as tmpsc, oneshot};

use crate::error::{Error, Result};
use crate::kv::KvCache;
use crate::loader::{Kernels, LoadOptions, RandomModel, Weights, load, resolve_model_path};
use crate::metrics::{EngineLoad, EngineMetrics, LoadCounters, MetricsState};
use crate::request::{Completion, GenerateRequest, Prompt, StreamEvent};
use crate::scheduler::{Command, NewSeq, Scheduler, SchedulerConfig};
use crate::tokenizer::{Specials, Tokenizer};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Device {
    /// The CPU (candle's CPU backend).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal: candle's CUDA backend with Keel's kernels. Needs the `cuda`
    /// feature, else [`Error::CudaUnavailable`]; a GPU that cannot be opened (no such
    /// ordinal, no driver) is [`Error::Cuda`].
    Cuda(usize),
}

impl Device {
    fn to_candle(self) -> Result<candle_core::Device> {
        match self {
            Self::Cpu => Ok(candle_core::Device::Cpu),
            Self::Cuda(ordinal) => crate::cuda::open(ordinal),
        }
    }
}

/// A description of the loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ModelInfo {
    /// Architecture name (`llama`, `mistral`, `qwen2`).
    pub architecture: String,
    /// Storage type of the projection weights, e.g. `Q4_1` or `F32`.
    pub weight_type: String,
    /// Transformer blocks.
    pub layers: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// The model's trained context length.
    pub context_length: usize,
    /// Bytes of KV cache one token occupies.
    pub kv_bytes_per_token: usize,
    /// Which kernels run the model: `candle`, or `keel-cpu/<isa> x<threads>` for our CPU
    /// kernels (e.g. `keel-cpu/avx2 x2`).
    pub kernels: String,
}

/// Configures and starts an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineBuilder {
    path: Option<PathBuf>,
    random: Option<RandomModel>,
    device: Device,
    block_size: usize,
    kv_blocks: usize,
    max_batch_tokens: usize,
    max_seqs: usize,
    max_context: Option<usize>,
    weights: Weights,
    kernels: Kernels,
    threads: Option<usize>,
    prefix_caching: bool,
    cuda_graphs: bool,
    pipelined_decode: bool,
}

impl EngineBuilder {
    /// Whether decode steps on a CUDA device run as captured CUDA graphs (default on): a step
    /// in which every running sequence decodes one token is then one graph launch instead of
    /// several hundred kernel launches. The first step of each batch shape runs eagerly while
    /// the graph is captured; if a capture fails, the engine says why in
    /// [`EngineMetrics::graphs_off`](crate::EngineMetrics::graphs_off) and runs eagerly from
    /// then on. No effect on the CPU.
    pub fn cuda_graphs(mut self, on: bool) -> Self {
        self.cuda_graphs = on;
        self
    }

    /// Whether decode steps are pipelined (default on): when every running sequence that wants
    /// a token gets it from the device sampler (Keel's kernel path: a CUDA device, or a bf16
    /// model on the CPU), the engine launches the next step from the picked ids where they are
    /// (a chain can start at a step with prefill chunks in it), before it
    /// reads them back, and streams, detokenizes and checks stop conditions for one step while
    /// the device runs the next. Each sequence's tokens, finish reason and usage are the same
    /// either way: a sequence known to end at a step (its `max_tokens`, the context limit) is
    /// left out of the step launched ahead, and one that ends otherwise (a stop token or stop
    /// string) or is cancelled leaves the batch at once, its row of the step ahead discarded,
    /// while the others go on pipelined. Requests that arrive meanwhile and sample on the
    /// device are admitted into the step launched ahead (their prompts as prefill chunks, under
    /// the same token budget and first-come-first-served order). The engine runs one step at a
    /// time whenever anything else is due (too few free KV blocks for the sequences that go on,
    /// a request that needs the host sampler, shutdown), and
    /// [`EngineMetrics::pipelined_steps`](crate::EngineMetrics::pipelined_steps) counts the
    /// steps launched ahead. On the CPU every step completes before the next is launched, so
    /// only the control flow changes; other models ignore the setting.
    pub fn pipelined_decode(mut self, on: bool) -> Self {
        self.pipelined_decode = on;
        self
    }

    /// Which matrix kernels run the model (default [`Kernels::Auto`]).
    pub fn kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Whether sequences that start with the same tokens share the KV blocks of that prefix
    /// (default on): a later request skips the prefill of every whole block of its prompt
    /// that a finished or running one already computed. `EngineMetrics::prefix_cached_tokens`
    /// counts the tokens saved.
    pub fn prefix_caching(mut self, on: bool) -> Self {
        self.prefix_caching = on;
        self
    }

    /// Threads the CPU kernels use, the model thread included (default: the machine's
    /// available parallelism). Give each engine its share when several run in one process.
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = Some(n);
        self
    }

    /// How to hold projection weights (default [`Weights::AsStored`]).
    pub fn weights(mut self, weights: Weights) -> Self {
        self.weights = weights;
        self
    }

    /// Loads the model at `path` (a `.gguf` file or a safetensors directory) instead of
    /// searching `KEEL_MODEL` and `models/`.
    pub fn model_path(mut self, path: impl AsRef<Path>) -> Self {
        self.path = Some(path.as_ref().to_path_buf());
        self
    }

    /// Runs a model with seeded random weights instead of loading one (for GPU checks and
    /// benchmarks without model files); [`EngineBuilder::model_path`], [`EngineBuilder::weights`]
    /// and [`EngineBuilder::kernels`] are then ignored.
    pub fn random_model(mut self, model: RandomModel) -> Self {
        self.random = Some(model);
        self
    }

    /// The device to run on (default CPU).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Tokens per KV-cache block (default 16).
    pub fn block_size(mut self, n: usize) -> Self {
        self.block_size = n;
        self
    }

    /// KV-cache blocks in the pool (default 256, i.e. 4096 tokens at block size 16).
    pub fn kv_blocks(mut self, n: usize) -> Self {
        self.kv_blocks = n;
        self
    }

    /// Token budget of one scheduler step: decodes plus prefill chunks (default 256).
    pub fn max_batch_tokens(mut self, n: usize) -> Self {
        self.max_batch_tokens = n;
        self
    }

    /// Most sequences running at once (default 32).
    pub fn max_seqs(mut self, n: usize) -> Self {
        self.max_seqs = n;
        self
    }

    /// Caps prompt plus generated tokens per request (default: the model's context, bounded
    /// by the KV pool's capacity).
    pub fn max_context(mut self, n: usize) -> Self {
        self.max_context = Some(n);
        self
    }

    /// Loads the model and starts the engine's model thread. This reads the whole model, so
    /// from async code call it inside `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    /// [`Error::ModelNotFound`] and the loader's errors for bad files,
    /// [`Error::CudaUnavailable`] without the `cuda` feature, [`Error::Cuda`] or
    /// [`Error::DeviceOutOfMemory`] from the GPU, and [`Error::InvalidConfig`] for zero-sized
    /// settings.
    pub fn build(self) -> Result<Engine> {
        for (name, v) in [
            ("block_size", self.block_size),
            ("kv_blocks", self.kv_blocks),
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_seqs", self.max_seqs),
            ("threads", self.threads.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(Error::InvalidConfig {
                    name,
                    reason: "must be at least 1".into(),
                });
            }
        }
        let device = self.device.to_candle()?;
        let (model, tokenizer) = match &self.random {
            Some(random) => random.build(&device)?,
            None => {
                let path = resolve_model_path(self.path.as_deref())?;
                let threads = self.threads.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                });
                let options = LoadOptions {
                    weights: self.weights,
                    kernels: self.kernels,
                    threads,
                };
                load(&path, &device, options)?
            }
        };
        let mut model = model;
        if device.is_cuda() {
            model.set_decode_graphs(self.cuda_graphs);
        }
        let c = &model.config;
        let capacity = self.block_size * self.kv_blocks;
        let max_context = self
            .max_context
            .unwrap_or(c.context)
            .min(c.context)
            .min(capacity);
        if max_context == 0 {
            return Err(Error::InvalidConfig {
                name: "max_context",
                reason: "must be at least 1".into(),
            });
        }
        let info = ModelInfo {
            architecture: c.arch.name().to_string(),
            weight_type: model.weight_type.clone(),
            layers: c.layers,
            hidden_size: c.hidden,
            heads: c.heads,
            kv_heads: c.kv_heads,
            vocab_size: c.vocab,
            context_length: c.context,
            kv_bytes_per_token: KvCache::bytes_per_token(c.layers, c.kv_dim(), model.host_kv()),
            kernels: model.kernels(),
        };
        let tokenizer = Arc::new(tokenizer);
        let metrics = Arc::new(Mutex::new(MetricsState::new(self.kv_blocks)));
        let load = Arc::new(LoadCounters::default());
        let (tx, rx) = mpsc::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let sched = Scheduler::new(
            model,
            SchedulerConfig {
                block_size: self.block_size,
                kv_blocks: self.kv_blocks,
                max_batch_tokens: self.max_batch_tokens,
                max_seqs: self.max_seqs,
                max_context,
                prefix_caching: self.prefix_caching,
                pipelined_decode: self.pipelined_decode,
            },
            tokenizer.clone(),
            metrics.clone(),
            load.clone(),
            &device,
        )?;
        std::thread::Builder::new()
            .name("keel-serving-model".into())
            .spawn(move || {
                sched.run(rx);
                let _ = done_tx.send(());
            })
            .map_err(|e| Error::Execution {
                reason: format!("cannot start the model thread: {e}"),
            })?;
        Ok(Engine {
            tx: Mutex::new(tx),
            tokenizer,
            info,
            metrics,
            load,
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            done: Mutex::new(Some(done_rx)),
            max_context,
        })
    }
}

/// An in-process LLM engine: one model, a paged KV cache, and a continuous-batching scheduler
/// on a dedicated thread. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct Engine {
    // A Mutex keeps `Engine: Sync` on every supported toolchain; sends are brief.
    tx: Mutex<mpsc::Sender<Command>>,
    tokenizer: Arc<Tokenizer>,
    info: ModelInfo,
    metrics: Arc<Mutex<MetricsState>>,
    load: Arc<LoadCounters>,
    closed: AtomicBool,
    next_id: AtomicU64,
    done: Mutex<Option<oneshot::Receiver<()>>>,
    max_context: usize,
}

impl Engine {
    /// A builder with default settings; the model is found by [`crate::resolve_model_path`]
    /// unless [`EngineBuilder::model_path`] is set.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            path: None,
            random: None,
            device: Device::Cpu,
            block_size: 16,
            kv_blocks: 256,
            max_batch_tokens: 256,
            max_seqs: 32,
            max_context: None,
            weights: Weights::AsStored,
            kernels: Kernels::Auto,
            threads: None,
            prefix_caching: true,
            cuda_graphs: true,
            pipelined_decode: true,
        }
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// What was loaded.
    pub fn model_info(&self) -> &ModelInfo {
        &self.info
    }

    /// The most prompt plus generated tokens one request may use.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Turns a request's prompt into token ids as [`Engine::generate`] will.
    ///
    /// # Errors
    /// [`Error::UnsupportedChatTemplate`] for a chat request on a model without a template we
    /// know, and tokenizer errors.
    pub fn prompt_tokens(&self, request: &GenerateRequest) -> Result<Vec<u32>> {
        match &request.prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, Specials::Plain),
            Prompt::Templated(t) => self.tokenizer.encode(t, Specials::Parse),
            Prompt::Chat(msgs) => {
                let tpl = self.tokenizer.chat_template().ok_or_else(|| {
                    Error::UnsupportedChatTemplate {
                        snippet: "(the model has no chat template)".into(),
                    }
                })?;
                self.tokenizer.encode(&tpl.apply(msgs), Specials::Parse)
            }
            Prompt::Tokens(ids) => {
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.info.vocab_size) {
                    return Err(Error::UnknownToken {
                        id,
                        vocab_size: self.info.vocab_size,
                    });
                }
                Ok(ids.clone())
            }
        }
    }

    /// Submits a request; tokens arrive on the returned stream. The request joins the running
    /// batch at the engine's next step. Dropping the stream cancels the request and frees its
    /// KV blocks. This does no model work and never blocks on the model thread.
    ///
    /// # Errors
    /// [`Error::Shutdown`] after [`Engine::shutdown`], [`Error::InvalidSampling`],
    /// [`Error::EmptyPrompt`], [`Error::PromptTooLong`] when prompt plus `max_tokens`
    /// exceeds [`Engine::max_context`], and tokenizer errors.
    pub fn generate(&self, request: GenerateRequest) -> Result<GenerationStream> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        request.sampling.validate()?;
        let tokens = self.prompt_tokens(&request)?;
        if tokens.is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let max_tokens = request.sampling.max_tokens;
        if tokens.len() + max_tokens > self.max_context {
            return Err(Error::PromptTooLong {
                prompt_tokens: tokens.len(),
                max_tokens,
                limit: self.max_context,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (etx, erx) = tmpsc::unbounded_channel();
        let now = Instant::now();
        let seq = NewSeq {
            id,
            tokens,
            params: request.sampling,
            deadline: request.deadline.map(|d| now + d),
            submitted: now,
            events: etx,
        };
        self.load.in_flight.fetch_add(1, Ordering::Relaxed);
        let sent = self
            .tx
            .lock()
            .map_err(|_| Error::Shutdown)?
            .send(Command::Submit(Box::new(seq)));
        if sent.is_err() {
            self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::Shutdown);
        }
        Ok(GenerationStream {
            id,
            rx: erx,
            finished: false,
        })
    }

    /// A snapshot of the engine's metrics.
    pub fn metrics(&self) -> EngineMetrics {
        match self.metrics.lock() {
            Ok(m) => m.snapshot(),
            Err(p) => p.into_inner().snapshot(),
        }
    }

    /// The engine's current load, read from atomics (cheap enough for every request).
    pub fn load(&self) -> EngineLoad {
        self.load.snapshot()
    }

    /// Stops accepting requests, lets the requests already submitted finish, and waits for
    /// the model thread to exit. Later calls to [`Engine::generate`] fail with
    /// [`Error::Shutdown`].
    pub async fn shutdown(&self) {
        self.closed.store(true, Ordering::Release);
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Command::Shutdown);
        }
        let done = self.done.lock().ok().and_then(|mut d| d.take());
        if let Some(done) = done {
            let _ = done.await;
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Dropping must not block: tell the model thread to finish what it has and exit.
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(Command::Shutdown);
        }
    }
}

/// The events of one request: [`StreamEvent::Token`]s, then one [`StreamEvent::Done`], or an
/// error. Dropping it cancels the request.
#[derive(Debug)]
pub struct GenerationStream {
    id: u64,
    rx: tmpsc::UnboundedReceiver<Result<StreamEvent>>,
    finished: bool,
}

impl GenerationStream {
    /// The engine-assigned request id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event, or `None` after the last one.
    ///
    /// # Errors
    /// Yields `Some(Err(..))` once for a failed request: [`Error::DeadlineExceeded`],
    /// [`Error::Execution`] (also when the engine stopped before the request finished).
    pub async fn next(&mut self) -> Option<Result<StreamEvent>> {
        if self.finished {
            return None;
        }
        match self.rx.recv().await {
            Some(ev) => {
                if matches!(ev, Ok(StreamEvent::Done(_)) | Err(_)) {
                    self.finished = true;
                }
                Some(ev)
            }
            None => {
                self.finished = true;
                Some(Err(Error::Execution {
                    reason: "the engine stopped before the request finished".into(),
                }))
            }
        }
    }

    /// Waits for the whole generation.
    ///
    /// # Errors
    /// The request's error, as for [`GenerationStream::next`].
    pub async fn collect(mut self) -> Result<Completion> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut logprobs = Vec::new();
        while let Some(ev) = self.next().await {
            match ev? {
                StreamEvent::Token(d) => {
                    text.push_str(d.text());
                    tokens.push(d.token());
                    if let Some(lp) = d.logprob() {
                        logprobs.push(lp);
                    }
                }
                StreamEvent::Done(summary) => {
                    text.push_str(&summary.trailing_text);
                    return Ok(Completion {
                        text,
                        tokens,
                        logprobs,
                        summary,
                    });
                }
            }
        }
        Err(Error::Execution {
            reason: "the stream ended without a summary".into(),
        })
    }
}
