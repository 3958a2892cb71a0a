//! Per-replica health: consecutive-failure and latency-outlier ejection with exponential
//! backoff, and the single probe request that lets an ejected replica back in.
//!
//! All state is atomics on the replica's slot; the pool-wide cap on ejected replicas is one
//! counter updated with compare-and-swap, touched only when a replica is ejected or returns.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// What a picker may do with a replica as far as health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Eligibility {
    /// Healthy.
    Ok,
    /// Ejected, its backoff is over and no probe is in flight: one request may probe it.
    ProbeReady,
    /// Ejected.
    No,
}

/// What a failure did to a replica's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureOutcome {
    /// Below the threshold.
    Counted,
    /// Reached the threshold: eject it (if the cap allows).
    Eject,
    /// A probe failed: the replica stays ejected, with a longer backoff.
    ProbeFailed,
}

#[derive(Debug, Default)]
pub(crate) struct Health {
    consecutive_failures: AtomicU32,
    /// How many backoffs in a row: each ejection doubles the next one, each successful probe
    /// halves it again.
    level: AtomicU32,
    /// Nanoseconds since the pool's origin until which the replica is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    probing: AtomicBool,
}

impl Health {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Acquire) != 0
    }

    /// `now_ns` is called only for an ejected replica, so the common case reads no clock.
    pub(crate) fn eligibility(&self, now_ns: impl FnOnce() -> u64) -> Eligibility {
        let until = self.ejected_until.load(Ordering::Acquire);
        if until == 0 {
            Eligibility::Ok
        } else if now_ns() >= until && !self.probing.load(Ordering::Acquire) {
            Eligibility::ProbeReady
        } else {
            Eligibility::No
        }
    }

    /// Claims the one probe slot; false if another request got it first.
    pub(crate) fn claim_probe(&self) -> bool {
        self.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// A probe ended without an outcome (cancelled): let another request probe.
    pub(crate) fn release_probe(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// Records a success; returns true when it was a probe that brought the replica back.
    pub(crate) fn on_success(&self, was_probe: bool) -> bool {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if was_probe {
            let _ = self
                .level
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(l / 2));
            self.ejected_until.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            return true;
        }
        false
    }

    pub(crate) fn on_failure(&self, was_probe: bool, threshold: u32) -> FailureOutcome {
        if was_probe {
            return FailureOutcome::ProbeFailed;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold && !self.is_ejected() {
            FailureOutcome::Eject
        } else {
            FailureOutcome::Counted
        }
    }

    /// Ejects (or re-ejects) until `now + backoff`, doubling the backoff each time.
    pub(crate) fn eject(&self, now_ns: u64, base: Duration, max: Duration) {
        let level = self.level.fetch_add(1, Ordering::Relaxed).min(30);
        let backoff = base.saturating_mul(1u32 << level).min(max);
        let until = now_ns
            .saturating_add(u64::try_from(backoff.as_nanos()).unwrap_or(u64::MAX))
            .max(1);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejected_until.store(until, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    /// Clears the ejection (when the replica is replaced or removed).
    pub(crate) fn clear(&self) -> bool {
        self.ejected_until.swap(0, Ordering::AcqRel) != 0
    }
}

/// Takes one of the pool's ejection places if fewer than `floor(fraction × members)` replicas
/// are ejected; the cap keeps a fleet-wide problem (say, a bad deploy of the load balancer's
/// own config) from ejecting everything.
pub(crate) fn reserve_ejection(ejected: &AtomicUsize, members: usize, fraction: f64) -> bool {
    let cap = (fraction * members as f64).floor() as usize;
    ejected
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
            (cur < cap).then_some(cur + 1)
        })
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_then_backoff_then_probe() {
        let h = Health::default();
        assert_eq!(h.on_failure(false, 2), FailureOutcome::Counted);
        assert_eq!(h.on_failure(false, 2), FailureOutcome::Eject);
        h.eject(1_000, Duration::from_nanos(100), Duration::from_secs(1));
        assert_eq!(h.eligibility(|| 1_050), Eligibility::No);
        assert_eq!(h.eligibility(|| 1_100), Eligibility::ProbeReady);
        assert!(h.claim_probe());
        assert!(!h.claim_probe());
        assert_eq!(h.eligibility(|| 1_100), Eligibility::No);
        // A failed probe doubles the backoff.
        h.eject(2_000, Duration::from_nanos(100), Duration::from_secs(1));
        assert_eq!(h.eligibility(|| 2_150), Eligibility::No);
        assert_eq!(h.eligibility(|| 2_200), Eligibility::ProbeReady);
        assert!(h.claim_probe());
        assert!(h.on_success(true));
        assert_eq!(h.eligibility(|| 0), Eligibility::Ok);
    }

    #[test]
    fn cap_on_ejections() {
        let e = AtomicUsize::new(0);
        assert!(reserve_ejection(&e, 4, 0.5));
        assert!(reserve_ejection(&e, 4, 0.5));
        assert!(!reserve_ejection(&e, 4, 0.5));
        assert!(!reserve_ejection(&AtomicUsize::new(0), 1, 0.5));
    }
}
