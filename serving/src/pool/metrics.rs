//! Pool and per-replica metrics: lock-free counters and log-linear latency histograms, read as
//! plain snapshots.
//!
//! Hot-path counters live on each replica's slot, so concurrent requests to different replicas
//! write to different cache lines; pool totals are sums taken when a snapshot is read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::replica::ReplicaId;

/// Sub-buckets per power of two: eight gives a relative error under 12.5%.
const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Values (in microseconds) below this are counted exactly.
const LINEAR: u64 = 1 << (SUB_BITS + 1);
/// Enough buckets for any `u64` microsecond value.
const BUCKETS: usize = LINEAR as usize + (64 - SUB_BITS as usize - 1) * SUB;

/// A concurrent histogram of durations, in microseconds, with log-linear buckets.
#[derive(Debug)]
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= SUB_BITS + 1
    let sub = ((us >> (exp - SUB_BITS)) as usize) & (SUB - 1);
    LINEAR as usize + (exp - SUB_BITS - 1) as usize * SUB + sub
}

/// The smallest value that falls into bucket `b`.
fn bucket_floor(b: usize) -> u64 {
    if b < LINEAR as usize {
        return b as u64;
    }
    let k = b - LINEAR as usize;
    let exp = (k / SUB) as u32 + SUB_BITS + 1;
    if exp >= 64 {
        return u64::MAX;
    }
    let sub = (k % SUB) as u64;
    (1u64 << exp) | (sub << (exp - SUB_BITS))
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Histogram {
    pub(crate) fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(b) = self.buckets.get(bucket_of(us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds this histogram's counts into `into` (which has `BUCKETS` entries).
    pub(crate) fn add_to(&self, into: &mut [u64]) {
        for (acc, b) in into.iter_mut().zip(self.buckets.iter()) {
            *acc += b.load(Ordering::Relaxed);
        }
    }

    pub(crate) fn summary(&self) -> LatencySummary {
        let mut counts = vec![0; BUCKETS];
        self.add_to(&mut counts);
        LatencySummary::from_counts(&counts)
    }
}

pub(crate) fn empty_counts() -> Vec<u64> {
    vec![0; BUCKETS]
}

/// Records into a plain (single-owner) bucket array made by [`empty_counts`].
pub(crate) fn record_into(counts: &mut [u64], d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    if let Some(b) = counts.get_mut(bucket_of(us)) {
        *b += 1;
    }
}

/// Latency percentiles read from a histogram (each within 12.5% of the true value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Largest sample (bucket upper bound).
    pub max: Duration,
}

impl LatencySummary {
    pub(crate) fn from_counts(counts: &[u64]) -> Self {
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return Self::default();
        }
        let at = |q: f64| -> Duration {
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (b, &c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return Duration::from_micros(mid(b));
                }
            }
            Duration::ZERO
        };
        let max_bucket = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        Self {
            count,
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(bucket_floor(max_bucket + 1).saturating_sub(1)),
        }
    }
}

/// A representative value of bucket `b`: its midpoint.
fn mid(b: usize) -> u64 {
    let lo = bucket_floor(b);
    let hi = bucket_floor(b + 1);
    lo + (hi.saturating_sub(lo)) / 2
}

/// Counters kept per replica slot.
#[derive(Debug, Default)]
pub(crate) struct SlotCounters {
    pub(crate) successes: AtomicU64,
    pub(crate) failures: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) ejections: AtomicU64,
    pub(crate) latency: Histogram,
    pub(crate) ttft: Histogram,
}

/// Where a replica stands in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReplicaState {
    /// Taking new requests.
    Serving,
    /// Ejected by outlier detection until its backoff ends and a probe succeeds.
    Ejected,
    /// Marked unhealthy by its discovery source.
    Unhealthy,
    /// Finishing its in-flight requests and taking no new ones.
    Draining,
}

/// A snapshot of one replica's metrics.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReplicaStats {
    /// The replica.
    pub id: ReplicaId,
    /// Its state when the snapshot was taken.
    pub state: ReplicaState,
    /// Requests the pool sent it, retries included (successes + failures + cancelled +
    /// in flight).
    pub picks: u64,
    /// Requests it finished.
    pub successes: u64,
    /// Requests it failed (before or after the first token).
    pub failures: u64,
    /// Requests whose caller dropped the stream before the end.
    pub cancelled: u64,
    /// Requests in flight through this pool.
    pub in_flight: u32,
    /// Times it was ejected.
    pub ejections: u64,
    /// End-to-end latency of its successful requests.
    pub latency: LatencySummary,
    /// Time to first token of its requests.
    pub ttft: LatencySummary,
}

/// A snapshot of the whole pool's metrics.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Requests that reached a replica (retries counted once per attempt).
    pub picks: u64,
    /// Requests finished successfully.
    pub successes: u64,
    /// Replica failures seen by the pool, retried or not.
    pub replica_failures: u64,
    /// Requests retried on a second replica after the first failed before its first token.
    pub retries: u64,
    /// Requests refused with `Overloaded`.
    pub overloaded: u64,
    /// Requests that passed their deadline.
    pub deadline_exceeded: u64,
    /// Requests refused because no replica was eligible (none, all ejected or draining).
    pub unavailable: u64,
    /// Requests in flight.
    pub in_flight: u64,
    /// Ejections so far.
    pub ejections: u64,
    /// Errors returned by the discovery source.
    pub discovery_errors: u64,
    /// End-to-end latency of successful requests, across replicas.
    pub latency: LatencySummary,
    /// Time to first token, across replicas.
    pub ttft: LatencySummary,
    /// Per-replica snapshots, ordered by id (replicas removed from the pool are not listed).
    pub replicas: Vec<ReplicaStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotone_and_tight() {
        let mut prev = 0;
        for us in [
            0u64,
            1,
            15,
            16,
            17,
            100,
            1_000,
            123_456,
            10_000_000,
            u64::MAX,
        ] {
            let b = bucket_of(us);
            assert!(b >= prev && b < BUCKETS, "{us}");
            prev = b;
            assert!(bucket_floor(b) <= us);
            if b + 1 < BUCKETS {
                assert!(us < bucket_floor(b + 1), "{us}");
            }
        }
    }

    #[test]
    fn percentiles_within_resolution() {
        let h = Histogram::default();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        let near = |d: Duration, want: u64| {
            let got = d.as_secs_f64() * 1000.0;
            (got - want as f64).abs() / want as f64 <= 0.125
        };
        assert!(near(s.p50, 500), "{s:?}");
        assert!(near(s.p99, 990), "{s:?}");
        assert!(near(s.p999, 999), "{s:?}");
    }
}
