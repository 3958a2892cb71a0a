//! Engine metrics: cumulative counters and latency sums updated by the model thread once per
//! step, and a lock-free load signal for balancers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A point-in-time copy of an engine's metrics.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct EngineMetrics {
    /// Requests accepted by the model thread.
    pub requests_started: u64,
    /// Requests that finished with a summary.
    pub requests_finished: u64,
    /// Requests dropped by their caller before finishing.
    pub requests_cancelled: u64,
    /// Requests that failed (deadline, execution error).
    pub requests_failed: u64,
    /// Times a running sequence was preempted because KV blocks ran out.
    pub preemptions: u64,
    /// Scheduler steps run.
    pub steps: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Prompt (and recomputed) tokens run through the model.
    pub prefill_tokens: u64,
    /// Prompt tokens whose keys and values came from the prefix cache instead of prefill.
    pub prefix_cached_tokens: u64,
    /// Mean time from submission to first running on the model.
    pub mean_queue_time: Duration,
    /// Mean time to first token.
    pub mean_time_to_first_token: Duration,
    /// Mean time between consecutive tokens of one request.
    pub mean_inter_token_latency: Duration,
    /// Generated tokens per second of model-busy time.
    pub decode_tokens_per_second: f64,
    /// Steps in which every sequence fed exactly one token and got the next one back: no
    /// prompt or recomputed tokens shared the step.
    pub decode_only_steps: u64,
    /// Mean wall time of those steps (scheduling, the forward pass, sampling, streaming).
    pub mean_decode_only_step: Duration,
    /// Tokens generated in those steps per second of their time: the aggregate decode rate of
    /// the running batch, with prefill excluded (`mean_inter_token_latency` includes the
    /// waits of decoding sequences behind other requests' prompt chunks).
    pub decode_only_tokens_per_second: f64,
    /// Mean sequences per step.
    pub mean_batch_size: f64,
    /// Mean fraction of `max_seqs` occupied per step.
    pub batch_occupancy: f64,
    /// KV blocks in use now.
    pub kv_blocks_in_use: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Sequences running now.
    pub running: usize,
    /// Requests waiting to be admitted now.
    pub waiting: usize,
    /// Decode-step shapes captured as CUDA graphs (the `cuda` feature on a GPU).
    pub graph_captures: u64,
    /// Decode steps served by a captured graph.
    pub graph_replays: u64,
    /// Steps launched from the previous step's device-picked ids before the host read those ids
    /// back (decode rows, with prefill chunks of requests admitted into them) (pipelined decode, [`EngineBuilder::pipelined_decode`](crate::EngineBuilder::pipelined_decode)).
    pub pipelined_steps: u64,
    /// Why captured decode steps turned off, if a capture failed (the engine then runs every
    /// step eagerly).
    pub graphs_off: Option<String>,
}

/// The running sums behind [`EngineMetrics`]; owned by the model thread behind a mutex.
#[derive(Debug, Default)]
pub(crate) struct MetricsState {
    pub(crate) m: EngineMetrics,
    pub(crate) queue_sum: Duration,
    pub(crate) queue_n: u64,
    pub(crate) ttft_sum: Duration,
    pub(crate) ttft_n: u64,
    pub(crate) itl_sum: Duration,
    pub(crate) itl_n: u64,
    pub(crate) busy: Duration,
    pub(crate) decode_only_busy: Duration,
    pub(crate) decode_only_tokens: u64,
    pub(crate) batch_sum: u64,
    pub(crate) occupancy_sum: f64,
}

fn mean(sum: Duration, n: u64) -> Duration {
    if n == 0 {
        Duration::ZERO
    } else {
        sum / u32::try_from(n).unwrap_or(u32::MAX)
    }
}

/// `n` per second of `time` (0 before any time has passed).
fn per_second(n: u64, time: Duration) -> f64 {
    let secs = time.as_secs_f64();
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

impl MetricsState {
    pub(crate) fn new(kv_blocks: usize) -> Self {
        Self {
            m: EngineMetrics {
                kv_blocks_total: kv_blocks,
                ..EngineMetrics::default()
            },
            ..Self::default()
        }
    }

    pub(crate) fn snapshot(&self) -> EngineMetrics {
        let mut m = self.m.clone();
        m.mean_queue_time = mean(self.queue_sum, self.queue_n);
        m.mean_time_to_first_token = mean(self.ttft_sum, self.ttft_n);
        m.mean_inter_token_latency = mean(self.itl_sum, self.itl_n);
        m.decode_tokens_per_second = per_second(m.generated_tokens, self.busy);
        m.mean_decode_only_step = mean(self.decode_only_busy, m.decode_only_steps);
        m.decode_only_tokens_per_second =
            per_second(self.decode_only_tokens, self.decode_only_busy);
        if m.steps > 0 {
            m.mean_batch_size = self.batch_sum as f64 / m.steps as f64;
            m.batch_occupancy = self.occupancy_sum / m.steps as f64;
        }
        m
    }
}

/// An engine's instantaneous load, for balancers such as a power-of-two-choices pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct EngineLoad {
    /// Requests submitted and not yet finished.
    pub in_flight: u64,
    /// Prompt tokens still to be prefilled.
    pub queued_prefill_tokens: u64,
    /// Tokens still to be generated, at most (sum of remaining `max_tokens`).
    pub outstanding_decode_tokens: u64,
}

/// The atomics behind [`EngineLoad`].
#[derive(Debug, Default)]
pub(crate) struct LoadCounters {
    pub(crate) in_flight: AtomicU64,
    pub(crate) queued_prefill_tokens: AtomicU64,
    pub(crate) outstanding_decode_tokens: AtomicU64,
}

impl LoadCounters {
    pub(crate) fn snapshot(&self) -> EngineLoad {
        EngineLoad {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued_prefill_tokens: self.queued_prefill_tokens.load(Ordering::Relaxed),
            outstanding_decode_tokens: self.outstanding_decode_tokens.load(Ordering::Relaxed),
        }
    }
}
