//! The in-process [`Engine`] as a pool [`Replica`].

use std::sync::Arc;
use std::time::Duration;

use super::replica::{
    BoxFuture, Load, LoadTracker, PoolRequest, Replica, ReplicaError, ReplicaErrorKind,
    ReplicaEvent, TokenStream,
};
use crate::{ChatMessage, Engine, Error, GenerateRequest, SamplingParams, StreamEvent};

/// How an [`EngineReplica`] turns a [`PoolRequest`]'s prompt into the engine's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum PromptFormat {
    /// A single user message through the model's chat template when it has one, else plain text.
    #[default]
    Chat,
    /// The prompt as plain text, no template.
    Text,
}

/// Wraps an [`Engine`] so a [`Pool`](crate::Pool) can balance over it.
///
/// The load signal is the engine's own (in-flight requests, queued prefill tokens, outstanding
/// decode tokens) plus a peak-EWMA of the end-to-end latency the engine reports per request.
#[derive(Debug, Clone)]
pub struct EngineReplica {
    engine: Arc<Engine>,
    format: PromptFormat,
    latency: Arc<LoadTracker>,
}

impl EngineReplica {
    /// Wraps `engine`, sending prompts through its chat template ([`PromptFormat::Chat`]).
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            format: PromptFormat::Chat,
            latency: LoadTracker::new(Duration::from_secs(10)),
        }
    }

    /// Chooses how prompts are formatted.
    #[must_use]
    pub fn with_format(mut self, format: PromptFormat) -> Self {
        self.format = format;
        self
    }

    /// The wrapped engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn request(&self, r: &PoolRequest) -> GenerateRequest {
        let base = match self.format {
            PromptFormat::Chat if self.engine.tokenizer().chat_template().is_some() => {
                GenerateRequest::chat([ChatMessage::user(r.prompt())])
            }
            _ => GenerateRequest::text(r.prompt()),
        };
        let mut sampling = SamplingParams::greedy().max_tokens(r.max_tokens() as usize);
        if r.temperature() > 0.0 {
            sampling = sampling.temperature(r.temperature());
        }
        if let Some(seed) = r.seed() {
            sampling = sampling.seed(seed);
        }
        let req = base.sampling(sampling);
        match r.deadline() {
            Some(d) => req.deadline(d),
            None => req,
        }
    }
}

/// Sorts an engine error into what the pool needs to know: is the request at fault (never
/// retried), is the engine gone (retry elsewhere), or did it fail.
fn classify(e: &Error) -> ReplicaError {
    let kind = match e {
        Error::Shutdown => ReplicaErrorKind::Unavailable,
        Error::InvalidSampling { .. }
        | Error::EmptyPrompt
        | Error::PromptTooLong { .. }
        | Error::UnknownToken { .. }
        | Error::UnsupportedChatTemplate { .. } => ReplicaErrorKind::Rejected,
        _ => ReplicaErrorKind::Failed,
    };
    ReplicaError::new(kind, e.to_string())
}

impl Replica for EngineReplica {
    fn generate(
        &self,
        request: PoolRequest,
    ) -> BoxFuture<'static, Result<TokenStream, ReplicaError>> {
        let submitted = self.engine.generate(self.request(&request));
        let latency = Arc::clone(&self.latency);
        Box::pin(async move {
            let mut engine_stream = submitted.map_err(|e| classify(&e))?;
            let (tx, stream) = TokenStream::channel(16);
            // Forward on a task so the caller's stream is a plain `TokenStream`; dropping the
            // caller's end makes `send` fail, which drops the engine's stream and so cancels
            // the request inside the engine.
            tokio::spawn(async move {
                while let Some(ev) = engine_stream.next().await {
                    let out = match ev {
                        Ok(StreamEvent::Token(d)) => Ok(ReplicaEvent::Token {
                            text: d.text().to_owned(),
                        }),
                        Ok(StreamEvent::Done(summary)) => {
                            if !summary.trailing_text.is_empty() {
                                let text = summary.trailing_text.clone();
                                if !tx.send(Ok(ReplicaEvent::Token { text })).await {
                                    return;
                                }
                            }
                            latency.observe_latency(summary.timings.total);
                            let n =
                                u32::try_from(summary.usage.completion_tokens).unwrap_or(u32::MAX);
                            let _ = tx
                                .send(Ok(ReplicaEvent::Finished { output_tokens: n }))
                                .await;
                            return;
                        }
                        Err(e) => Err(classify(&e)),
                    };
                    let failed = out.is_err();
                    if !tx.send(out).await || failed {
                        return;
                    }
                }
            });
            Ok(stream)
        })
    }

    fn load(&self) -> Load {
        let l = self.engine.load();
        Load {
            in_flight: u32::try_from(l.in_flight).unwrap_or(u32::MAX),
            queued_prefill_tokens: l.queued_prefill_tokens,
            outstanding_decode_tokens: l.outstanding_decode_tokens,
            peak_ewma_latency: self.latency.load().peak_ewma_latency,
        }
    }
}
