//! The crate's error type: one [`Error`] for loading models, tokenizing, and serving requests.

use std::path::PathBuf;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No model file was found at the explicit path, in `KEEL_MODEL`, or under `models/`.
    #[error(
        "model not found (looked in: {searched}); run `scripts/fetch-model` to download SmolLM2-135M-Instruct into models/, or set KEEL_MODEL"
    )]
    ModelNotFound {
        /// The places that were searched, separated by commas.
        searched: String,
    },
    /// The model file could not be read.
    #[error("cannot read model file {path:?}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a GGUF file (wrong magic number or unsupported version).
    #[error("{path:?} is not a GGUF file: {reason}")]
    NotGguf {
        /// The file involved.
        path: PathBuf,
        /// What was wrong with its header.
        reason: String,
    },
    /// The file is shorter than its header says, or a section of it is corrupt.
    #[error("model file {path:?} is truncated or corrupt: {reason}")]
    Truncated {
        /// The file involved.
        path: PathBuf,
        /// What could not be read.
        reason: String,
    },
    /// The model's architecture is not a llama-family architecture this crate runs.
    #[error("unsupported model architecture {arch:?} (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture {
        /// The architecture named by the file.
        arch: String,
    },
    /// A weight uses a quantization or dtype this crate cannot run.
    #[error("tensor {tensor:?} uses unsupported quantization or dtype {dtype}")]
    UnsupportedQuantization {
        /// The tensor involved.
        tensor: String,
        /// The dtype or quantization, as the file names it.
        dtype: String,
    },
    /// A required hyper-parameter or tensor is missing or has the wrong shape.
    #[error("invalid model: {reason}")]
    InvalidModel {
        /// What is missing or inconsistent.
        reason: String,
    },
    /// The tokenizer could not be built from the model's vocabulary.
    #[error("invalid tokenizer: {reason}")]
    InvalidTokenizer {
        /// What is missing or inconsistent.
        reason: String,
    },
    /// The model's chat template is not one this crate knows how to apply.
    #[error("unsupported chat template (known: ChatML, Llama 3): {snippet:?}")]
    UnsupportedChatTemplate {
        /// The start of the template.
        snippet: String,
    },
    /// A token id outside the vocabulary was given to the tokenizer.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownToken {
        /// The offending id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// The prompt does not fit the model's context (or the engine's KV cache).
    #[error(
        "prompt of {prompt_tokens} tokens plus {max_tokens} new tokens exceeds the limit of {limit} tokens"
    )]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens requested.
        max_tokens: usize,
        /// The largest total the engine accepts.
        limit: usize,
    },
    /// The prompt is empty after tokenization.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter {name}: {reason}")]
    InvalidSampling {
        /// The parameter's name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// An engine setting is out of range.
    #[error("invalid engine configuration {name}: {reason}")]
    InvalidConfig {
        /// The setting's name.
        name: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A GPU device was requested but the crate was built without the `cuda` feature.
    #[error(
        "CUDA device {ordinal} requested but keel-serving was built without the `cuda` feature"
    )]
    CudaUnavailable {
        /// The requested device ordinal.
        ordinal: usize,
    },
    /// The engine has been shut down and accepts no new requests.
    #[error("the engine is shut down")]
    Shutdown,
    /// The request passed its deadline before it finished.
    #[error("request {id} passed its deadline")]
    DeadlineExceeded {
        /// The request's id.
        id: u64,
    },
    /// The model thread failed while running a request's batch.
    #[error("model execution failed: {reason}")]
    Execution {
        /// What the tensor backend reported.
        reason: String,
    },
    // --- replica pool variants (owned by serving/src/pool) ---
    /// The pool has no replica that could take the request (none at all, or all draining).
    #[error("the pool has no replicas to serve the request")]
    NoReplicas,
    /// Every replica in the pool is ejected or unhealthy.
    #[error("all {ejected} replicas are ejected or unhealthy")]
    AllEjected {
        /// How many replicas are out of service.
        ejected: usize,
    },
    /// Every eligible replica is at its in-flight limit; nothing was queued.
    #[error("every replica is at capacity; retry after {retry_after:?}")]
    Overloaded {
        /// A hint for when a place is likely to free up.
        retry_after: std::time::Duration,
    },
    /// The request's deadline passed in the pool (before the first token or mid-stream).
    #[error("request deadline of {deadline:?} exceeded")]
    PoolDeadlineExceeded {
        /// The deadline the request had.
        deadline: std::time::Duration,
    },
    /// The replica serving the request failed (and a retry, if allowed, failed too).
    #[error("{replica} failed")]
    ReplicaFailed {
        /// The replica that failed last.
        replica: crate::pool::ReplicaId,
        /// What it reported.
        #[source]
        source: crate::pool::ReplicaError,
    },
    /// The replica is not a member of the pool or registry.
    #[error("{replica} is not a member")]
    UnknownReplica {
        /// The replica asked for.
        replica: crate::pool::ReplicaId,
    },
    /// The pool has been shut down.
    #[error("the pool is shut down")]
    PoolShutDown,
    /// A pool setting is out of range.
    #[error("invalid pool configuration: {reason}")]
    InvalidPoolConfig {
        /// What is wrong.
        reason: String,
    },
    // --- end of replica pool variants ---
    // --- kernel variants (owned by serving/src/cuda) ---
    /// A kernel was given shapes, sizes or parameters it does not support.
    #[error("kernel {kernel}: {reason}")]
    KernelInput {
        /// The kernel involved.
        kernel: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A block table or cache slot points outside the KV cache.
    #[error("kernel {kernel}: {what} {index} is outside the cache of {limit} {what}s")]
    CacheIndexOutOfRange {
        /// The kernel involved.
        kernel: &'static str,
        /// `"block"` or `"slot"`.
        what: &'static str,
        /// The offending block or slot.
        index: usize,
        /// How many blocks or slots the cache has.
        limit: usize,
    },
    /// The GPU ran out of memory.
    #[error("CUDA device {ordinal} is out of memory ({reason})")]
    DeviceOutOfMemory {
        /// The device's ordinal.
        ordinal: usize,
        /// What the driver reported.
        reason: String,
    },
    /// A CUDA driver call, copy or kernel launch failed.
    #[error("CUDA device {ordinal} failed: {reason}")]
    Cuda {
        /// The device's ordinal.
        ordinal: usize,
        /// What the driver reported.
        reason: String,
    },
    // --- end of kernel variants ---
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Wraps a tensor-backend failure, keeping candle's types out of our public API.
pub(crate) fn exec(e: candle_core::Error) -> Error {
    Error::Execution {
        reason: e.to_string(),
    }
}

/// Wraps a tensor-backend failure that happened while building the model.
pub(crate) fn invalid_model(e: candle_core::Error) -> Error {
    Error::InvalidModel {
        reason: e.to_string(),
    }
}
