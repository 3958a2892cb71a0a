//! Property tests for the picker, through the public API: it never picks an ineligible replica,
//! and it spreads load within the bounds power of two choices promises.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

mod pool_support;

use std::sync::Arc;
use std::time::Duration;

use keel_serving::{
    EndpointStatus, Error, Policy, Pool, Replica, ReplicaError, ReplicaErrorKind, ReplicaId,
};
use pool_support::{FAST, Fake, id};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Condition {
    Serving,
    Draining,
    Unhealthy,
    Ejected,
    Removed,
    Full,
}

fn condition() -> impl Strategy<Value = Condition> {
    prop_oneof![
        3 => Just(Condition::Serving),
        1 => Just(Condition::Draining),
        1 => Just(Condition::Unhealthy),
        1 => Just(Condition::Ejected),
        1 => Just(Condition::Removed),
        1 => Just(Condition::Full),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop::sample::select(Policy::ALL.to_vec())
}

const LIMIT: u32 = 4;

/// Builds a pool whose replicas are in the given conditions, using only the public API.
fn pool_in(
    conditions: &[Condition],
    policy: Policy,
    seed: u64,
    limit: u32,
) -> (Pool, Vec<keel_serving::Reservation>) {
    let mut b = Pool::builder()
        .seed(seed)
        .policy(policy)
        .failure_threshold(1)
        .max_ejected_fraction(1.0)
        .ejection_backoff(Duration::from_secs(3600), Duration::from_secs(3600))
        .max_in_flight_per_replica(limit);
    for i in 0..conditions.len() {
        b = b.replica(id(i as u64), Fake::new(FAST) as Arc<dyn Replica>);
    }
    let pool = b.build().unwrap();
    let ids = pool.replica_ids();
    let mut held = Vec::new();
    // Eject or fill a replica by making it the only serving one for a moment.
    for (i, c) in conditions.iter().enumerate() {
        if matches!(c, Condition::Ejected | Condition::Full) {
            for (j, other) in ids.iter().enumerate() {
                let s = if i == j {
                    EndpointStatus::Serving
                } else {
                    EndpointStatus::Draining
                };
                pool.set_status(*other, s).unwrap();
            }
            if *c == Condition::Ejected {
                let r = pool.reserve().unwrap();
                r.fail(&ReplicaError::new(ReplicaErrorKind::Failed, "injected"));
            } else {
                for _ in 0..limit {
                    held.push(pool.reserve().unwrap());
                }
            }
        }
    }
    for (i, c) in conditions.iter().enumerate() {
        let rid = id(i as u64);
        match c {
            Condition::Draining => pool.set_status(rid, EndpointStatus::Draining).unwrap(),
            Condition::Unhealthy => pool.set_status(rid, EndpointStatus::Unhealthy).unwrap(),
            Condition::Removed => pool.remove_replica(rid).unwrap(),
            _ => pool.set_status(rid, EndpointStatus::Serving).unwrap(),
        }
    }
    (pool, held)
}

fn eligible(conditions: &[Condition], r: ReplicaId) -> bool {
    conditions.get(r.get() as usize) == Some(&Condition::Serving)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn never_picks_an_ineligible_replica(
        conditions in prop::collection::vec(condition(), 0..24),
        policy in policy(),
        seed in any::<u64>(),
    ) {
        let (pool, _held) = pool_in(&conditions, policy, seed, LIMIT);
        let serving = conditions.iter().filter(|c| **c == Condition::Serving).count();
        let mut picked = Vec::new();
        // Fill every serving replica to its limit: each pick must be eligible, and the pool
        // must refuse exactly when all eligible places are taken.
        for _ in 0..serving * LIMIT as usize {
            let r = pool.reserve();
            prop_assert!(r.is_ok(), "{:?}", r.err());
            let r = r.unwrap();
            prop_assert!(eligible(&conditions, r.replica()), "picked {} in {:?}", r.replica(), conditions);
            picked.push(r);
        }
        let refused = pool.reserve();
        prop_assert!(refused.is_err());
        let any_full = conditions.contains(&Condition::Full) || serving > 0;
        match refused.unwrap_err() {
            Error::Overloaded { .. } => prop_assert!(any_full),
            Error::AllEjected { .. } | Error::NoReplicas => prop_assert!(serving == 0 && !conditions.contains(&Condition::Full)),
            other => prop_assert!(false, "unexpected {other:?}"),
        }
    }

    #[test]
    fn p2c_spreads_held_requests_evenly(
        n in 2usize..40,
        per_replica in 1usize..30,
        seed in any::<u64>(),
    ) {
        let conditions = vec![Condition::Serving; n];
        let (pool, _) = pool_in(&conditions, Policy::PowerOfTwoChoices, seed, 1024);
        let held: Vec<_> = (0..n * per_replica).map(|_| pool.reserve().unwrap()).collect();
        let loads: Vec<u32> = pool.stats().replicas.iter().map(|r| r.in_flight).collect();
        let max = *loads.iter().max().unwrap() as usize;
        // With two choices the heaviest replica exceeds the mean by O(log log n): 3 covers
        // n < 40 comfortably. (A uniform random picker exceeds it by O(sqrt(m log n / n)).)
        prop_assert!(max <= per_replica + 3, "{loads:?}");
        drop(held);
    }
}
