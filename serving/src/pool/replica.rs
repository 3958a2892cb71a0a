//! The replica abstraction: what the pool needs from an in-process engine, a test double or a
//! remote endpoint, and the cheap load signal each one exposes.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

/// A boxed, `Send` future, as returned by the object-safe [`Replica`] and [`Discovery`] traits.
///
/// [`Discovery`]: crate::Discovery
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The identity of a replica inside a pool and a discovery source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplicaId(u64);

impl ReplicaId {
    /// Wraps a raw id.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw id.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "replica-{}", self.0)
    }
}

/// A generation request as the pool sees it: generic enough for any backend.
///
/// The pool reads only [`prompt_tokens`](Self::prompt_tokens), [`max_tokens`](Self::max_tokens)
/// and [`deadline`](Self::deadline); the rest is passed through to the replica.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolRequest {
    prompt: String,
    prompt_tokens: u32,
    max_tokens: u32,
    deadline: Option<Duration>,
    temperature: f32,
    seed: Option<u64>,
}

impl PoolRequest {
    /// A greedy request for at most `max_tokens` new tokens after `prompt`.
    ///
    /// The prompt length in tokens is estimated as one token per four bytes until
    /// [`with_prompt_tokens`](Self::with_prompt_tokens) gives the real count.
    pub fn new(prompt: impl Into<String>, max_tokens: u32) -> Self {
        let prompt = prompt.into();
        let estimate = u32::try_from(prompt.len() / 4 + 1).unwrap_or(u32::MAX);
        Self {
            prompt,
            prompt_tokens: estimate,
            max_tokens,
            deadline: None,
            temperature: 0.0,
            seed: None,
        }
    }

    /// Sets the prompt length in tokens, used only as a load hint.
    #[must_use]
    pub fn with_prompt_tokens(mut self, tokens: u32) -> Self {
        self.prompt_tokens = tokens;
        self
    }

    /// Sets the end-to-end deadline, measured from the call to [`Pool::generate`](crate::Pool::generate).
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets the sampling temperature (0 is greedy), passed through to the replica.
    #[must_use]
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets the sampling seed, passed through to the replica.
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The prompt text.
    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// The prompt length in tokens (an estimate unless set explicitly).
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt_tokens
    }

    /// The most new tokens to generate.
    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// The end-to-end deadline, if one was set.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The sampling temperature (0 is greedy).
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// The sampling seed, if one was set.
    pub fn seed(&self) -> Option<u64> {
        self.seed
    }
}

/// One item of a replica's output stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaEvent {
    /// A newly generated piece of text (one token, or more when a token completes a character).
    Token {
        /// The text delta.
        text: String,
    },
    /// The request finished normally; no more events follow.
    Finished {
        /// How many tokens were generated in total.
        output_tokens: u32,
    },
}

/// Why a replica could not serve a request, as the pool classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplicaErrorKind {
    /// The replica is down, unreachable or shutting down; another replica may succeed.
    Unavailable,
    /// The replica's own queue is full; another replica may succeed.
    Overloaded,
    /// The replica failed while serving (crash, backend error, truncated stream).
    Failed,
    /// The replica's code panicked; the pool caught it.
    Panicked,
    /// The replica did not produce a first token within the pool's first-token timeout.
    TimedOut,
    /// The request itself is invalid; no replica will accept it, so it is never retried.
    Rejected,
}

impl ReplicaErrorKind {
    /// Whether another replica might serve the same request.
    pub fn is_retryable(self) -> bool {
        !matches!(self, Self::Rejected)
    }

    /// Whether this failure counts against the replica's health.
    pub fn counts_against_health(self) -> bool {
        matches!(
            self,
            Self::Unavailable | Self::Failed | Self::Panicked | Self::TimedOut
        )
    }
}

impl fmt::Display for ReplicaErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Unavailable => "unavailable",
            Self::Overloaded => "overloaded",
            Self::Failed => "failed",
            Self::Panicked => "panicked",
            Self::TimedOut => "timed out before the first token",
            Self::Rejected => "rejected the request",
        };
        f.write_str(s)
    }
}

/// A failure reported by (or on behalf of) one replica.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ReplicaError {
    kind: ReplicaErrorKind,
    message: String,
}

impl ReplicaError {
    /// A failure of the given kind with a human-readable explanation.
    pub fn new(kind: ReplicaErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// How the pool classifies this failure.
    pub fn kind(&self) -> ReplicaErrorKind {
        self.kind
    }

    /// The explanation.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The receiving end of a replica's output: [`ReplicaEvent`]s, ending with
/// [`ReplicaEvent::Finished`] or an error. Dropping it cancels the request.
#[derive(Debug)]
pub struct TokenStream {
    rx: mpsc::Receiver<Result<ReplicaEvent, ReplicaError>>,
}

/// The sending end of a [`TokenStream`], held by the replica's producer.
#[derive(Debug, Clone)]
pub struct TokenSender {
    tx: mpsc::Sender<Result<ReplicaEvent, ReplicaError>>,
}

impl TokenStream {
    /// A bounded channel (at least one slot) connecting a producer to the pool.
    pub fn channel(capacity: usize) -> (TokenSender, TokenStream) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (TokenSender { tx }, TokenStream { rx })
    }

    /// The next event, or `None` once the producer has gone away.
    ///
    /// A stream that ends without [`ReplicaEvent::Finished`] was cut short by the replica.
    pub async fn next(&mut self) -> Option<Result<ReplicaEvent, ReplicaError>> {
        self.rx.recv().await
    }
}

impl TokenSender {
    /// Sends one event, waiting for space; returns `false` if the stream was dropped (cancelled).
    pub async fn send(&self, event: Result<ReplicaEvent, ReplicaError>) -> bool {
        self.tx.send(event).await.is_ok()
    }

    /// Whether the consumer has dropped the stream, i.e. the request was cancelled.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A snapshot of a replica's load, cheap to take on every pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    /// Requests accepted and not yet finished.
    pub in_flight: u32,
    /// Prompt tokens accepted but not yet prefilled.
    pub queued_prefill_tokens: u64,
    /// Tokens still to be decoded for accepted requests (counted at their `max_tokens`).
    pub outstanding_decode_tokens: u64,
    /// Peak-EWMA of end-to-end request latency: jumps up to a slow sample at once and decays
    /// back towards faster samples, so a replica that turns slow is avoided immediately.
    pub peak_ewma_latency: Duration,
}

/// Prefill is a batched matrix product, so one queued prompt token costs about this fraction of a
/// decode step; the ratio is a heuristic for small models on one accelerator.
const PREFILL_TOKENS_PER_DECODE_TOKEN: u64 = 8;

impl Load {
    /// The picker's cost: pending work times the observed speed, an estimate (in arbitrary units
    /// proportional to time) of how long a new request would wait behind what is already there.
    ///
    /// Pending work counts one unit per in-flight request (plus one for the new request), one
    /// per outstanding decode token, and one per eight queued prompt tokens.
    /// A replica with no latency samples yet is weighted by 1 µs, so a fresh replica is preferred
    /// only while it is also less busy.
    pub fn cost(&self) -> u64 {
        let work = 1
            + u64::from(self.in_flight)
            + self.outstanding_decode_tokens
            + self.queued_prefill_tokens / PREFILL_TOKENS_PER_DECODE_TOKEN;
        let speed = u64::try_from(self.peak_ewma_latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        work.saturating_mul(speed)
    }
}

/// A lock-free helper that maintains a [`Load`] for a replica implementation.
///
/// An implementor calls [`LoadTracker::begin`] when it accepts a request and reports progress
/// on the returned [`LoadTicket`]; dropping the ticket (on success, error, cancellation or panic
/// unwinding) removes whatever the request still counted, so the signal never leaks.
#[derive(Debug)]
pub struct LoadTracker {
    in_flight: AtomicU32,
    prefill: AtomicU64,
    decode: AtomicU64,
    ewma_ns: AtomicU64,
    last_sample_ns: AtomicU64,
    decay_ns: f64,
    origin: Instant,
}

impl LoadTracker {
    /// A tracker whose latency EWMA decays with time constant `decay` (Finagle uses 10 s).
    pub fn new(decay: Duration) -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicU32::new(0),
            prefill: AtomicU64::new(0),
            decode: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(0),
            last_sample_ns: AtomicU64::new(0),
            decay_ns: (decay.as_nanos() as f64).max(1.0),
            origin: Instant::now(),
        })
    }

    /// The current load.
    pub fn load(&self) -> Load {
        Load {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued_prefill_tokens: self.prefill.load(Ordering::Relaxed),
            outstanding_decode_tokens: self.decode.load(Ordering::Relaxed),
            peak_ewma_latency: Duration::from_nanos(self.ewma_ns.load(Ordering::Relaxed)),
        }
    }

    /// Counts a newly accepted request of `prompt_tokens` prompt tokens and at most
    /// `max_tokens` new tokens.
    pub fn begin(self: &Arc<Self>, prompt_tokens: u32, max_tokens: u32) -> LoadTicket {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.prefill
            .fetch_add(u64::from(prompt_tokens), Ordering::Relaxed);
        self.decode
            .fetch_add(u64::from(max_tokens), Ordering::Relaxed);
        LoadTicket {
            tracker: Arc::clone(self),
            prefill_left: u64::from(prompt_tokens),
            decode_left: u64::from(max_tokens),
            started: Instant::now(),
        }
    }

    /// Folds one latency sample into the peak-EWMA.
    pub fn observe_latency(&self, latency: Duration) {
        let now_ns = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let sample = latency.as_nanos() as f64;
        let last = self.last_sample_ns.swap(now_ns, Ordering::Relaxed);
        let elapsed = now_ns.saturating_sub(last) as f64;
        let weight = (-elapsed / self.decay_ns).exp();
        // A lost update under a race only skews one sample of a heuristic, so a CAS loop
        // on the value alone (not on the value and the timestamp together) is enough.
        let _ = self
            .ewma_ns
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let old = old as f64;
                let new = if sample > old {
                    sample
                } else {
                    old * weight + sample * (1.0 - weight)
                };
                Some(new as u64)
            });
    }
}

/// One request's share of a [`LoadTracker`]; see [`LoadTracker::begin`].
#[derive(Debug)]
pub struct LoadTicket {
    tracker: Arc<LoadTracker>,
    prefill_left: u64,
    decode_left: u64,
    started: Instant,
}

impl LoadTicket {
    /// The prompt has been prefilled: its tokens no longer count as queued.
    pub fn prefilled(&mut self) {
        let n = std::mem::take(&mut self.prefill_left);
        self.tracker.prefill.fetch_sub(n, Ordering::Relaxed);
    }

    /// One token was decoded.
    pub fn decoded(&mut self) {
        if self.decode_left > 0 {
            self.decode_left -= 1;
            self.tracker.decode.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The request finished successfully: records its latency and releases its load.
    pub fn finish(self) {
        self.tracker.observe_latency(self.started.elapsed());
    }
}

impl Drop for LoadTicket {
    fn drop(&mut self) {
        self.tracker
            .prefill
            .fetch_sub(self.prefill_left, Ordering::Relaxed);
        self.tracker
            .decode
            .fetch_sub(self.decode_left, Ordering::Relaxed);
        self.tracker.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend the pool can send requests to: an in-process engine, a test double or a client
/// for a remote endpoint.
///
/// Implementors guarantee:
/// - [`generate`](Self::generate) returns promptly (it enqueues; it does not run the request to
///   completion), and the stream it returns ends with [`ReplicaEvent::Finished`] or an `Err`.
///   A stream that simply ends is treated as a failure of the replica.
/// - Dropping the [`TokenStream`] cancels the request and frees its resources.
/// - [`load`](Self::load) is cheap and never blocks: it is called on every pick, possibly from
///   many threads at once. [`LoadTracker`] provides a ready-made lock-free implementation.
///
/// The pool protects itself from implementors that break these rules: a panic in `generate` is
/// caught and reported as [`ReplicaErrorKind::Panicked`], and a replica that never answers is cut
/// off by the first-token timeout and the request deadline.
pub trait Replica: Send + Sync + 'static {
    /// Starts a request and returns its output stream.
    fn generate(
        &self,
        request: PoolRequest,
    ) -> BoxFuture<'static, Result<TokenStream, ReplicaError>>;

    /// The replica's current load.
    fn load(&self) -> Load;
}

impl fmt::Debug for dyn Replica {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replica")
            .field("load", &self.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_grows_with_work_and_latency() {
        let idle = Load::default();
        let busy = Load {
            in_flight: 3,
            ..Load::default()
        };
        let slow = Load {
            peak_ewma_latency: Duration::from_millis(5),
            ..Load::default()
        };
        assert!(idle.cost() < busy.cost());
        assert!(idle.cost() < slow.cost());
    }

    #[tokio::test(start_paused = true)]
    async fn ticket_releases_everything_on_drop() {
        let t = LoadTracker::new(Duration::from_secs(10));
        let mut ticket = t.begin(40, 10);
        assert_eq!(t.load().in_flight, 1);
        ticket.prefilled();
        ticket.decoded();
        assert_eq!(t.load().queued_prefill_tokens, 0);
        assert_eq!(t.load().outstanding_decode_tokens, 9);
        drop(ticket);
        let l = t.load();
        assert_eq!((l.in_flight, l.outstanding_decode_tokens), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let t = LoadTracker::new(Duration::from_secs(1));
        t.observe_latency(Duration::from_millis(100));
        assert_eq!(t.load().peak_ewma_latency, Duration::from_millis(100));
        tokio::time::advance(Duration::from_secs(1)).await;
        t.observe_latency(Duration::from_millis(10));
        let after = t.load().peak_ewma_latency;
        assert!(after < Duration::from_millis(100) && after > Duration::from_millis(10));
    }
}
