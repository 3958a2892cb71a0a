//! Plain value types of the public API: IDs, statuses, filters, options and policies.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The identity of a workflow, and its idempotency key.
///
/// Starting a workflow under an ID that already exists returns the existing workflow
/// instead of running it twice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkflowId(String);

impl WorkflowId {
    /// Validates and wraps an ID.
    ///
    /// # Errors
    /// [`Error::InvalidId`] if the ID is empty, longer than 512 bytes, or contains a NUL byte
    /// (the journal uses NUL as a key separator).
    pub fn new(id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > 512 {
            Some("it is longer than 512 bytes")
        } else if id.contains('\0') {
            Some("it contains a NUL byte")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::InvalidId { id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub(crate) fn from_trusted(id: String) -> Self {
        Self(id)
    }
}

impl fmt::Display for WorkflowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Where a workflow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum WorkflowStatus {
    /// Waiting in a queue for a concurrency slot or a rate-limit token.
    Enqueued,
    /// Started and not finished: executing, sleeping, or waiting for a signal or a child.
    Running,
    /// Returned `Ok`.
    Succeeded,
    /// Returned an error, panicked, or diverged from its journal.
    Failed,
    /// Cancelled with [`Runtime::cancel`](crate::Runtime::cancel) and then finished.
    Cancelled,
}

impl WorkflowStatus {
    /// Whether the workflow has finished (succeeded, failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// How much a completed step survives.
///
/// If a flush fails in either mode, the commits it covers return
/// [`Error::JournalFailed`](crate::Error::JournalFailed) and are not reported done, and that
/// journal takes no more writes (see that error for why it does not retry); by default the
/// runtime then opens the directory again by itself (see [`ReopenPolicy`]).
///
/// Both modes use group commit: one flush runs at a time, and it covers every completion
/// journaled before it started. Concurrent completions queue for a committer thread, which
/// flushes once for all of them, so concurrent workflows share the cost of each flush. A
/// completion with nothing else in flight (a workflow running alone) is flushed by its own
/// task instead, inside [`tokio::task::block_in_place`] so the executor's other tasks move to
/// another thread meanwhile; this saves two thread switches per step. On a current-thread
/// tokio runtime, which cannot move tasks away, the committer thread always flushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Durability {
    /// Survives a crash or `kill -9` of the process, not necessarily a power loss.
    ///
    /// Each commit runs sled's `flush()`, which writes the log to the page cache and starts
    /// writeback with `sync_file_range`; the kernel owns the data once it returns.
    /// After a power loss the last few hundred milliseconds of commits may be lost.
    #[default]
    ProcessCrash,
    /// Survives a power loss as well.
    ///
    /// Each commit runs sled's `flush()` and then `fdatasync` on sled's log file, so the
    /// commit is on stable storage when the step is reported done. sled's other files are
    /// written once and never changed in place; each is `fsync`ed (with the directory that
    /// names it) once, when the journal opens or, for the blobs sled creates for very large
    /// values, at the first flush after it appears. Opening a journal in this mode also syncs
    /// everything before recovery reads it, so nothing recovered after a crash (a write that
    /// reached the kernel but whose commit was never reported done) is acted on before it is
    /// durable.
    PowerLoss,
}

/// What [`Runtime::list`](crate::Runtime::list) returns; all set fields must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    status: Option<WorkflowStatus>,
    name: Option<String>,
    created_after: Option<SystemTime>,
    created_before: Option<SystemTime>,
}

impl ListFilter {
    /// A filter that matches every workflow.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only workflows in this status.
    pub fn status(mut self, status: WorkflowStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only workflows registered under this name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Only workflows created at or after this time.
    pub fn created_after(mut self, t: SystemTime) -> Self {
        self.created_after = Some(t);
        self
    }

    /// Only workflows created before this time.
    pub fn created_before(mut self, t: SystemTime) -> Self {
        self.created_before = Some(t);
        self
    }

    pub(crate) fn matches(&self, info: &WorkflowInfo) -> bool {
        self.status.is_none_or(|s| s == info.status)
            && self.name.as_deref().is_none_or(|n| n == info.name)
            && self.created_after.is_none_or(|t| info.created_at >= t)
            && self.created_before.is_none_or(|t| info.created_at < t)
    }
}

/// A summary of one workflow, as [`Runtime::status`](crate::Runtime::status) and
/// [`Runtime::list`](crate::Runtime::list) report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowInfo {
    /// The workflow's ID.
    pub id: WorkflowId,
    /// The registered name it runs.
    pub name: String,
    /// Its status.
    pub status: WorkflowStatus,
    /// When it was started.
    pub created_at: SystemTime,
    /// When its record last changed.
    pub updated_at: SystemTime,
    /// The queue it was started on, if any.
    pub queue: Option<String>,
    /// The parent workflow, if it is a child.
    pub parent: Option<WorkflowId>,
    /// Whether cancellation was requested.
    pub cancel_requested: bool,
    /// The error message, if it failed.
    pub error: Option<String>,
}

/// One entry of a workflow's journal, as [`Runtime::history`](crate::Runtime::history) returns it.
///
/// Its `Display` form is one human-readable line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Position in the workflow's journal, from 0.
    pub index: u64,
    /// The kind of operation: `step`, `sleep`, `signal`, `signal-deadline`, `now`, `random`,
    /// `uuid`, `version`, `child-start`, `child-result` or `cancelled`.
    pub kind: String,
    /// The step name, signal name, change ID, child workflow name (for `child-start`) or
    /// child ID (for `child-result`) the entry is about; empty for the others.
    pub name: String,
    /// The journaled value as JSON text.
    pub detail: String,
}

impl fmt::Display for HistoryEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} {} {:?} -> {}",
            self.index, self.kind, self.name, self.detail
        )
    }
}

/// A signal that was sent to a workflow and not yet received, as
/// [`Runtime::pending_signals`](crate::Runtime::pending_signals) returns it.
///
/// Its `Display` form is one human-readable line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingSignal {
    /// The signal's name, as passed to [`Runtime::signal`](crate::Runtime::signal).
    pub name: String,
    /// The value as JSON text.
    pub value: String,
}

impl fmt::Display for PendingSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} -> {}", self.name, self.value)
    }
}

/// Options for [`Runtime::start_with`](crate::Runtime::start_with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartOptions {
    pub(crate) queue: Option<String>,
}

impl StartOptions {
    /// Default options: no queue, the workflow is dispatched at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the workflow through a named queue configured on the builder.
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queue = Some(name.into());
        self
    }
}

/// Limits of a named queue; see [`RuntimeBuilder::queue`](crate::RuntimeBuilder::queue).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueConfig {
    pub(crate) concurrency: usize,
    pub(crate) per_second: Option<f64>,
}

impl QueueConfig {
    /// The lowest rate [`QueueConfig::rate_limit`] accepts: one start a day.
    pub const MIN_RATE: f64 = 1.0 / 86_400.0;

    /// At most `concurrency` workflows of the queue started and unfinished at once.
    ///
    /// A workflow holds its slot while it sleeps or waits, until it finishes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `concurrency` is zero.
    pub fn new(concurrency: usize) -> Result<Self> {
        if concurrency == 0 {
            return Err(Error::InvalidConfig(
                "queue concurrency must be at least 1".into(),
            ));
        }
        Ok(Self {
            concurrency,
            per_second: None,
        })
    }

    /// At most `per_second` starts per second (a token bucket holding one second's worth).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless `per_second` is finite and at least
    /// [`QueueConfig::MIN_RATE`] (one start a day).
    pub fn rate_limit(mut self, per_second: f64) -> Result<Self> {
        if !(per_second.is_finite() && per_second >= Self::MIN_RATE) {
            return Err(Error::InvalidConfig(format!(
                "queue rate {per_second} must be finite and at least {} starts per second (one a day)",
                Self::MIN_RATE
            )));
        }
        self.per_second = Some(per_second);
        Ok(self)
    }
}

/// How a step is retried; see [`Context::step_with`](crate::Context::step_with).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) initial_interval: Duration,
    pub(crate) multiplier: f64,
    pub(crate) max_interval: Duration,
    pub(crate) jitter: f64,
    pub(crate) attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// Three attempts, 100 ms doubling up to 10 s, 20 % jitter, no per-attempt timeout.
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_interval: Duration::from_millis(100),
            multiplier: 2.0,
            max_interval: Duration::from_secs(10),
            jitter: 0.2,
            attempt_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// A policy that runs the step once and never retries.
    pub fn no_retry() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Total attempts including the first (at least 1; 0 is treated as 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Exponential backoff: wait `initial` after the first failure, multiply by `multiplier`
    /// (at least 1) after each further failure, never wait more than `max`.
    pub fn backoff(mut self, initial: Duration, multiplier: f64, max: Duration) -> Self {
        self.initial_interval = initial;
        self.multiplier = if multiplier.is_finite() {
            multiplier.max(1.0)
        } else {
            1.0
        };
        self.max_interval = max;
        self
    }

    /// Random jitter as a fraction of each wait (clamped to 0..=1): a wait `w` becomes a
    /// uniform draw from `w * (1 - jitter) ..= w`.
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Abandons an attempt that runs longer than `timeout` and counts it as a retryable failure.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// The wait before attempt `attempt + 1` with jitter drawn from `random`, 64 uniformly
    /// random bits (the runtime's generator, [`splitmix64`]); this is what a retry sleeps.
    pub(crate) fn jittered_delay(&self, attempt: u32, random: u64) -> Duration {
        self.delay(attempt, unit_interval(random))
    }

    /// The wait before attempt `attempt + 1` with jitter applied, for a uniform draw `r` in
    /// `0..1`.
    pub(crate) fn delay(&self, attempt: u32, r: f64) -> Duration {
        let base = self.base_delay(attempt);
        // Not `Duration::mul_f64`, which panics when the product rounds past `Duration::MAX`.
        Duration::try_from_secs_f64(base.as_secs_f64() * (1.0 - self.jitter * r)).unwrap_or(base)
    }

    /// The wait before attempt `attempt + 1` (after `attempt` failures, from 1), before jitter.
    pub(crate) fn base_delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX));
        let secs = self.initial_interval.as_secs_f64() * exp;
        // `max_interval` near `Duration::MAX` rounds up as an `f64` to more seconds than a
        // `Duration` holds, and `from_secs_f64` would panic on it; such a wait is the maximum.
        match Duration::try_from_secs_f64(secs) {
            Ok(d) => d.min(self.max_interval),
            Err(_) => self.max_interval,
        }
    }
}

/// Whether and how the runtime opens its journal directory again by itself after a disk
/// error; see [`RuntimeBuilder::reopen`](crate::RuntimeBuilder::reopen).
///
/// A journal stops for good at its first failed write or flush
/// ([`Error::JournalFailed`](crate::Error::JournalFailed)). With reopening on (the default),
/// the runtime's worker then abandons the executions in flight, waits for every user of the
/// failed journal to let go of it, closes it, opens the same directory again (keeping the
/// directory lock all the while) and recovers every unfinished workflow from disk, as
/// [`RuntimeBuilder::open`](crate::RuntimeBuilder::open) does.
///
/// Attempt `n` starts after a wait of `min(initial × 2^(n−1), max)`. An attempt fails if the
/// failed journal is still in use a second after the wait (a [`Context`](crate::Context)
/// kept outside its workflow keeps it open), if the directory does not open, or if the
/// reopened journal fails again before any flush of it succeeded; the count starts over once
/// a reopened journal has flushed. After `max_attempts` failed attempts the runtime stays
/// failed, as with [`ReopenPolicy::off`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReopenPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
}

impl Default for ReopenPolicy {
    /// Eight attempts, waiting 10 ms before the first and doubling up to 2 s (about 2.5 s of
    /// waiting in all before the runtime gives up).
    fn default() -> Self {
        Self {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl ReopenPolicy {
    /// The default policy; see [`ReopenPolicy::default`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Never reopen: the first disk error stops the runtime (fail-stop) until the host drops
    /// it and opens the directory again.
    pub fn off() -> Self {
        Self {
            max_attempts: 0,
            ..Self::default()
        }
    }

    /// How many reopen attempts in a row before giving up; 0 turns reopening off.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    /// Waits `initial` before the first attempt, doubling after each failed one, never more
    /// than `max` (raised to `initial` if it is smaller).
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// Whether the runtime reopens its journal at all.
    pub fn is_enabled(&self) -> bool {
        self.max_attempts > 0
    }

    /// The wait before attempt `attempt` (from 1).
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(63);
        let factor = 1u32.checked_shl(doublings.min(31)).unwrap_or(u32::MAX);
        self.initial_backoff
            .checked_mul(factor)
            .unwrap_or(self.max_backoff)
            .min(self.max_backoff)
    }
}

/// The error a step's closure returns: a message and whether retrying may help.
///
/// Any `std::error::Error` converts into a retryable `StepError` with `?`.
/// Use [`StepError::permanent`] for failures that retrying cannot fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    message: String,
    retryable: bool,
}

impl StepError {
    /// A failure that may succeed on another attempt.
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: true,
        }
    }

    /// A failure that stops retries at once.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            message: message.to_string(),
            retryable: false,
        }
    }

    /// Whether another attempt may help.
    pub fn is_retryable(&self) -> bool {
        self.retryable
    }

    /// The failure's message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for StepError {
    fn from(e: E) -> Self {
        Self::retryable(e)
    }
}

/// Maps 64 uniformly random bits to a uniform draw in `0..1` (from the top 53 bits, an
/// `f64`'s precision, so every value is exact and 1 is never reached).
pub(crate) fn unit_interval(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// One step of splitmix64: advances `state` and returns the next 64 random bits. Small, fast,
/// and good enough for jitter and journaled random values; not for anything secret.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(crate) fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopen_backoff_doubles_up_to_its_cap_without_overflowing() {
        let p = ReopenPolicy::new().backoff(Duration::from_millis(10), Duration::from_millis(50));
        let waits: Vec<u128> = (1..=5).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 50, 50]);
        let huge = ReopenPolicy::new().backoff(Duration::MAX / 2, Duration::MAX);
        assert_eq!(huge.delay(u32::MAX), Duration::MAX);
        assert_eq!(
            ReopenPolicy::new()
                .backoff(Duration::from_secs(2), Duration::ZERO)
                .delay(3),
            Duration::from_secs(2)
        );
        assert!(!ReopenPolicy::off().is_enabled() && ReopenPolicy::default().is_enabled());
        assert!(!ReopenPolicy::new().max_attempts(0).is_enabled());
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy::default().backoff(
            Duration::from_millis(10),
            2.0,
            Duration::from_millis(50),
        );
        assert_eq!(p.base_delay(1), Duration::from_millis(10));
        assert_eq!(p.base_delay(2), Duration::from_millis(20));
        assert_eq!(p.base_delay(3), Duration::from_millis(40));
        assert_eq!(p.base_delay(4), Duration::from_millis(50));
        assert_eq!(p.base_delay(400), Duration::from_millis(50));
        // A cap beyond what an `f64` of seconds converts back into a `Duration` is no panic.
        let p = RetryPolicy::default().backoff(Duration::from_secs(1), 2.0, Duration::MAX);
        assert_eq!(p.base_delay(3), Duration::from_secs(4));
        assert_eq!(p.base_delay(64), Duration::from_secs(1 << 63));
        assert_eq!(p.base_delay(65), Duration::MAX);
        assert_eq!(p.base_delay(u32::MAX), Duration::MAX);
        assert_eq!(p.delay(u32::MAX, 0.0), Duration::MAX);
        let p = p.jitter(0.5);
        assert_eq!(p.delay(3, 0.0), Duration::from_secs(4));
        assert_eq!(p.delay(3, 0.5), Duration::from_secs(3));
        assert!(p.delay(u32::MAX, 0.5) < Duration::MAX);
    }

    /// The jittered wait is `base * (1 - jitter * r)` for a uniform `r` in `0..1`, where
    /// `base = min(initial * multiplier^(attempt - 1), max)`: within `[base * (1 - jitter),
    /// base]`, and spread over that band. The draws come from the runtime's own generator with
    /// a fixed seed, so the test is deterministic; the bounds it checks hold for any draws, and
    /// the spread it checks holds with a margin of many standard deviations for any good
    /// generator, so neither can flake.
    #[test]
    fn jittered_backoff_stays_within_its_bounds_and_varies() {
        const SAMPLES: u32 = 4000;
        let initial = Duration::from_millis(100);
        let cap = Duration::from_secs(1);
        // Worked out apart from `base_delay`: 100, 200, 400, 800 ms, then the 1 s cap.
        let base = |attempt: u32| (initial * 2u32.pow(attempt - 1)).min(cap);
        let one_ns = Duration::from_nanos(1);
        for jitter in [0.2, 0.5, 1.0] {
            let p = RetryPolicy::default()
                .backoff(initial, 2.0, cap)
                .jitter(jitter);
            let mut rng = 0x5EED_u64;
            let mut mean_before = Duration::ZERO;
            for attempt in 1..=7 {
                let hi = base(attempt);
                assert_eq!(p.base_delay(attempt), hi, "attempt {attempt}");
                let lo = hi.mul_f64(1.0 - jitter);
                let band = hi - lo;
                assert!(band > Duration::ZERO);
                let mut distinct = std::collections::BTreeSet::new();
                let (mut least, mut most, mut total) = (Duration::MAX, Duration::ZERO, 0u128);
                for _ in 0..SAMPLES {
                    let d = p.jittered_delay(attempt, splitmix64(&mut rng));
                    // One nanosecond of slack for the rounding of `f64` seconds.
                    assert!(
                        d + one_ns >= lo && d <= hi,
                        "attempt {attempt}, jitter {jitter}: {d:?} outside [{lo:?}, {hi:?}]"
                    );
                    distinct.insert(d);
                    least = least.min(d);
                    most = most.max(d);
                    total += d.as_nanos();
                }
                // It varies: nearly every draw gives its own wait...
                assert!(
                    distinct.len() > (SAMPLES as usize) * 9 / 10,
                    "attempt {attempt}, jitter {jitter}: {} distinct waits",
                    distinct.len()
                );
                // ...reaching both ends of the band (each within 1 % of it; a uniform draw
                // misses a 1 % end in 4000 tries with probability 0.99^4000, about 1e-17)...
                assert!(least.saturating_sub(lo) < band / 100, "{least:?} vs {lo:?}");
                assert!(hi - most < band / 100, "{most:?} vs {hi:?}");
                // ...and centred on its middle (the mean of 4000 uniform draws is within 0.05
                // of the band's middle unless it is 10 standard deviations off).
                let mean = Duration::from_nanos(
                    u64::try_from(total / u128::from(SAMPLES)).unwrap_or(u64::MAX),
                );
                let middle = lo + band / 2;
                let off = mean.abs_diff(middle);
                assert!(
                    off < band / 20,
                    "attempt {attempt}: mean {mean:?}, middle {middle:?}"
                );
                // The waits grow with the base, up to the cap (where the band stays put).
                if attempt > 1 && hi > base(attempt - 1) {
                    assert!(
                        mean > mean_before,
                        "attempt {attempt}: {mean:?} <= {mean_before:?}"
                    );
                }
                mean_before = mean;
            }
        }
        // Without jitter every wait is exactly the base; the same seed gives the same waits.
        let p = RetryPolicy::default()
            .backoff(initial, 2.0, cap)
            .jitter(0.0);
        let mut rng = 7u64;
        for attempt in 1..=7 {
            for _ in 0..100 {
                assert_eq!(
                    p.jittered_delay(attempt, splitmix64(&mut rng)),
                    base(attempt)
                );
            }
        }
        let p = RetryPolicy::default();
        let draws = |seed: u64| {
            let mut rng = seed;
            (1..=50)
                .map(|a| p.jittered_delay(a % 8 + 1, splitmix64(&mut rng)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draws(42), draws(42));
        assert_ne!(draws(42), draws(43));
        // The draw covers `0..1` and never reaches 1, so the wait never drops below the band.
        assert_eq!(unit_interval(0), 0.0);
        assert!(unit_interval(u64::MAX) < 1.0);
        assert!(unit_interval(u64::MAX) > 1.0 - 1e-15);
        assert_eq!(unit_interval(1 << 63), 0.5);
    }

    #[test]
    fn ids_are_validated() {
        assert!(WorkflowId::new("a").is_ok());
        assert!(matches!(WorkflowId::new(""), Err(Error::InvalidId { .. })));
        assert!(matches!(
            WorkflowId::new("a\0b"),
            Err(Error::InvalidId { .. })
        ));
    }
}
