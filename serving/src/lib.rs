//! An in-process LLM engine on candle: load a llama-family model, submit requests from async
//! code, and stream tokens back, with continuous batching over a paged KV cache.
//!
//! An [`Engine`] owns one model (GGUF, quantized, or safetensors), its [`Tokenizer`], a paged
//! KV cache and a scheduler running on the engine's own thread, so tokio's workers never run
//! model code. [`Engine::generate`] takes a [`GenerateRequest`] (prompt, [`SamplingParams`],
//! optional deadline) and returns a [`GenerationStream`] of [`StreamEvent`]s: one
//! [`TokenDelta`] per token, then a [`Summary`] with the [`FinishReason`], [`Usage`] and
//! [`Timings`]. Requests join the running batch at the next step; long prompts are prefilled
//! in chunks within a per-step token budget; when KV blocks run out the newest sequence is
//! preempted and recomputed later.
//!
//! ```no_run
//! use keel_serving::{ChatMessage, Engine, GenerateRequest, SamplingParams};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! # rt.block_on(async {
//! // Finds models/SmolLM2-135M-Instruct.Q4_1.gguf (run scripts/fetch-model) or $KEEL_MODEL.
//! let engine = Engine::builder().build()?;
//! let request = GenerateRequest::chat([ChatMessage::user("Name three primary colors.")])
//!     .sampling(SamplingParams::greedy().max_tokens(32));
//! let mut stream = engine.generate(request)?;
//! while let Some(event) = stream.next().await {
//!     match event? {
//!         keel_serving::StreamEvent::Token(delta) => print!("{}", delta.text()),
//!         keel_serving::StreamEvent::Done(summary) => println!("\n{:?}", summary.finish_reason),
//!         _ => {}
//!     }
//! }
//! engine.shutdown().await;
//! # Ok::<(), keel_serving::Error>(())
//! # })?;
//! # Ok(())
//! # }
//! ```
//!
//! # Replica pool
//! A [`Pool`] spreads requests over many replicas (anything that implements [`Replica`]; an
//! [`EngineReplica`] wraps an [`Engine`]) by power of two choices over each replica's cheap
//! [`Load`] signal. Membership follows a [`Discovery`] source ([`StaticDiscovery`] or the
//! in-process [`Registry`] with heartbeats); failing or slow replicas are ejected and probed
//! back; [`Pool::drain`] lets in-flight work finish; when every replica is saturated the pool
//! fails fast with [`Error::Overloaded`]. A request is retried on another replica only before
//! its first token. [`SimConfig`] runs the same policies in a discrete-event simulation at
//! fleet scale. See [`Pool`] for a runnable example with a test-double replica.
//!
//! # Models
//! Llama 2/3, SmolLM/SmolLM2, Mistral and Qwen2, with hyper-parameters read from GGUF
//! metadata or `config.json`. GGUF weights stay quantized. On the CPU, Q4_0, Q4_1 and Q8_0
//! models run on Keel's own kernels ([`Kernels::Auto`]: AVX-512 VNNI or AVX2 when the CPU has
//! it, portable Rust otherwise, on [`EngineBuilder::threads`] threads); Q5 and K-quant files,
//! and other devices, run through candle's quantized matmul. Safetensors (f32/f16/bf16) run in f32.
//! The tokenizer comes from the GGUF vocabulary or `tokenizer.json`; chat requests use the
//! model's template ([`ChatTemplate`]). [`resolve_model_path`] finds models. A
//! [`RandomModel`] (seeded random weights of a given shape, f32 or bf16) stands in for a file
//! where only the shape matters: GPU checks and benchmarks.
//!
//! # Feature flags
//! - `cuda` (off by default): candle's CUDA backend and Keel's own kernels
//!   ([`cuda_kernels`]), compiled with nvcc at build time (`scripts/cuda-env`, docs/cuda.md).
//!   An engine on [`Device::Cuda`] runs candle's matmuls with Keel's kernels for the fused
//!   residual add and RMSNorm, rotary embedding, the KV-cache write and paged decode
//!   attention, and its fused sampling kernel picks tokens for requests without penalties
//!   or log-probabilities, so only ids cross to the host; decode steps run as captured CUDA
//!   graphs and are pipelined (the next step is launched before the host reads and streams
//!   this one's tokens; [`EngineBuilder::pipelined_decode`]). Without the feature nothing
//!   CUDA-related is compiled and asking for [`Device::Cuda`] returns
//!   [`Error::CudaUnavailable`]; the kernels' CPU references are always available.
//!
//! # Guarantees
//! - [`Engine`] and [`GenerationStream`] are `Send + Sync`/`Send`; share the engine in an `Arc`.
//! - Dropping a stream cancels its request and frees its KV blocks at the next step.
//! - A failing request (deadline, bad input) never stops the engine serving others.
//! - With weights as stored ([`Weights::AsStored`]), greedy output does not depend on what
//!   else is in the batch.
// `unsafe` is denied everywhere except the CPU kernel module (SIMD intrinsics and the worker
// pool's scoped jobs) and the CUDA launches (serving/src/cuda/gpu.rs, only with the `cuda`
// feature), which allow it per block, each with a SAFETY comment.
#![deny(unsafe_code)]

mod chat;
#[allow(unsafe_code)] // SIMD kernels and the scoped worker pool; see the module's docs.
mod cpu;
mod cuda;
mod engine;
mod error;
mod kv;
mod loader;
mod metrics;
mod model;
mod pool;
mod request;
mod sampling;
mod scheduler;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, Role};
pub use cuda::cuda_kernels;
pub use engine::{Device, Engine, EngineBuilder, GenerationStream, ModelInfo};
pub use error::{Error, Result};
pub use loader::{DEFAULT_MODEL_FILE, Kernels, RandomModel, Weights, resolve_model_path};
pub use metrics::{EngineLoad, EngineMetrics};
pub use pool::{
    BoxFuture, Discovery, DiscoveryError, DiscoveryEvent, EndpointStatus, EngineReplica,
    LatencySummary, Load, LoadTicket, LoadTracker, Policy, Pool, PoolBuilder, PoolOutput,
    PoolRequest, PoolStats, PoolStream, PromptFormat, Registry, RegistryWatch, Replica,
    ReplicaError, ReplicaErrorKind, ReplicaEvent, ReplicaId, ReplicaState, ReplicaStats,
    Reservation, SimConfig, SimPolicyReport, SimReport, StaticDiscovery, TokenSender, TokenStream,
};
pub use request::{
    Completion, FinishReason, GenerateRequest, StreamEvent, Summary, Timings, TokenDelta, Usage,
};
pub use sampling::{MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob};
pub use tokenizer::{Specials, Tokenizer};
