//! What callers send and receive: requests, streamed token deltas, and the final summary.

use std::time::Duration;

use crate::chat::ChatMessage;
use crate::sampling::{SamplingParams, TokenLogprob};

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Prompt {
    /// Plain text, tokenized without recognising special tokens.
    Text(String),
    /// Text whose special-token markup (e.g. `<|im_start|>`) becomes special tokens.
    Templated(String),
    /// A conversation rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// One generation request: a prompt, sampling parameters and an optional deadline.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub(crate) prompt: Prompt,
    pub(crate) sampling: SamplingParams,
    pub(crate) deadline: Option<Duration>,
}

impl GenerateRequest {
    fn with(prompt: Prompt) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            deadline: None,
        }
    }

    /// A plain-text prompt; special-token markup in it is treated as ordinary text.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self::with(Prompt::Text(prompt.into()))
    }

    /// A prompt whose special-token markup (such as `<|im_start|>`) is recognised, for
    /// prompts you rendered yourself from a trusted template.
    pub fn templated(prompt: impl Into<String>) -> Self {
        Self::with(Prompt::Templated(prompt.into()))
    }

    /// A conversation, rendered with the model's chat template.
    pub fn chat(messages: impl IntoIterator<Item = ChatMessage>) -> Self {
        Self::with(Prompt::Chat(messages.into_iter().collect()))
    }

    /// A prompt given as token ids.
    pub fn tokens(ids: impl IntoIterator<Item = u32>) -> Self {
        Self::with(Prompt::Tokens(ids.into_iter().collect()))
    }

    /// Sets the sampling parameters (default: greedy, 256 tokens).
    pub fn sampling(mut self, params: SamplingParams) -> Self {
        self.sampling = params;
        self
    }

    /// Fails the request with [`crate::Error::DeadlineExceeded`] if it has not finished within
    /// `timeout` of being submitted; its KV blocks are freed at that point.
    pub fn deadline(mut self, timeout: Duration) -> Self {
        self.deadline = Some(timeout);
        self
    }

    /// The request's sampling parameters.
    pub fn sampling_params(&self) -> &SamplingParams {
        &self.sampling
    }
}

/// One generated token and the text it completes.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenDelta {
    pub(crate) token: u32,
    pub(crate) text: String,
    pub(crate) logprob: Option<f32>,
    pub(crate) top_logprobs: Vec<TokenLogprob>,
}

impl TokenDelta {
    /// The token id.
    pub fn token(&self) -> u32 {
        self.token
    }

    /// Text released by this token. It may be empty (a multi-byte character is not complete
    /// yet, or text is held back because it may begin a stop string) and may carry text of
    /// earlier tokens once it is released.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The token's log-probability, when [`SamplingParams::logprobs`] asked for it.
    pub fn logprob(&self) -> Option<f32> {
        self.logprob
    }

    /// The most likely alternatives at this position, when asked for.
    pub fn top_logprobs(&self) -> &[TokenLogprob] {
        &self.top_logprobs
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FinishReason {
    /// The model produced an end-of-sequence token or one of the request's stop tokens.
    StopToken,
    /// The text produced one of the request's stop strings.
    StopString,
    /// `max_tokens` were generated, or the context is full.
    Length,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated (stop tokens excluded).
    pub completion_tokens: usize,
}

/// Where a finished request spent its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct Timings {
    /// From submission until the request first ran on the model.
    pub queued: Duration,
    /// From submission until its first generated token.
    pub time_to_first_token: Duration,
    /// From submission until it finished.
    pub total: Duration,
    /// How many times it was preempted (its KV cache dropped and recomputed later).
    pub preemptions: u32,
}

/// The last event of a successful request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Summary {
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Timings.
    pub timings: Timings,
    /// Text released only at the end (held back as a possible stop-string prefix, or an
    /// incomplete UTF-8 sequence); it follows the last [`TokenDelta`]'s text.
    pub trailing_text: String,
}

/// One item of a [`crate::GenerationStream`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum StreamEvent {
    /// A generated token.
    Token(TokenDelta),
    /// The request finished; no events follow.
    Done(Summary),
}

/// A whole generation, gathered by [`crate::GenerationStream::collect`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Completion {
    /// The generated text (cut before a stop string).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    /// Log-probabilities of the generated tokens, when asked for.
    pub logprobs: Vec<f32>,
    /// The final summary.
    pub summary: Summary,
}
