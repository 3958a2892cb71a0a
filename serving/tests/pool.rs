//! The replica pool through its public API: picking, retries, admission control, health,
//! draining, shutdown and metrics, with a scriptable test double and tokio's paused clock.

mod pool_support;

use std::sync::Arc;
use std::time::Duration;

use keel_serving::{
    EndpointStatus, Error, Pool, PoolRequest, PoolStream, Replica, ReplicaErrorKind, ReplicaEvent,
    ReplicaState, Reservation,
};
use pool_support::{Behaviour, FAST, builder, fakes, id, req, slow};

fn assert_send_sync<T: Send + Sync>() {}
fn assert_send<T: Send>() {}

#[test]
fn public_types_are_send_and_sync() {
    assert_send_sync::<Pool>();
    assert_send_sync::<Reservation>();
    assert_send_sync::<keel_serving::Registry>();
    assert_send_sync::<keel_serving::PoolStats>();
    assert_send_sync::<keel_serving::LoadTracker>();
    assert_send::<PoolStream>();
    assert_send::<keel_serving::RegistryWatch>();
    assert_send::<keel_serving::TokenStream>();
    let pool = Pool::builder().build().unwrap();
    let fut = pool.generate(req());
    fn is_send<F: Send>(_: &F) {}
    is_send(&fut);
}

#[tokio::test(start_paused = true)]
async fn streams_tokens_and_counts_the_request() {
    let f = fakes(2, FAST);
    let pool = builder(&f).build().unwrap();
    let out = pool.generate(req()).await.unwrap().collect().await.unwrap();
    assert_eq!(out.text, "t0 t1 t2 ");
    assert_eq!(out.output_tokens, 3);
    let s = pool.stats();
    assert_eq!((s.picks, s.successes, s.replica_failures), (1, 1, 0));
    assert_eq!(s.latency.count, 1);
    assert_eq!(s.in_flight, 0);
    assert!(s.latency.p50 >= Duration::from_millis(25), "{s:?}");
    assert_eq!(f[0].calls() + f[1].calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn two_replicas_always_compare_both() {
    let f = fakes(2, FAST);
    let pool = builder(&f).build().unwrap();
    // Make replica 0 look busy from its own load signal.
    let _busy: Vec<_> = (0..5).map(|_| f[0].tracker().begin(10, 10)).collect();
    for _ in 0..50 {
        let r = pool.reserve().unwrap();
        assert_eq!(r.replica(), id(1));
    }
}

#[tokio::test(start_paused = true)]
async fn same_seed_same_picks() {
    let picks = |seed| {
        let f = fakes(8, FAST);
        let mut b = Pool::builder().seed(seed);
        for (i, r) in f.iter().enumerate() {
            b = b.replica(id(i as u64), r.clone() as Arc<dyn Replica>);
        }
        let pool = b.build().unwrap();
        (0..100)
            .map(|_| pool.reserve().unwrap().replica())
            .collect::<Vec<_>>()
    };
    assert_eq!(picks(9), picks(9));
    assert_ne!(picks(9), picks(10));
}

#[tokio::test(start_paused = true)]
async fn in_flight_spreads_evenly() {
    let f = fakes(16, FAST);
    let pool = builder(&f).build().unwrap();
    let held: Vec<_> = (0..16 * 20).map(|_| pool.reserve().unwrap()).collect();
    let loads: Vec<u32> = pool.stats().replicas.iter().map(|r| r.in_flight).collect();
    let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
    assert!(max - min <= 3, "{loads:?}");
    drop(held);
    assert_eq!(pool.stats().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn retried_once_on_another_replica_before_the_first_token() {
    for bad in [
        Behaviour::Unavailable,
        Behaviour::PanicSync,
        Behaviour::PanicAsync,
        Behaviour::EndEarly(0),
        Behaviour::Overloaded,
    ] {
        let f = vec![pool_support::Fake::new(bad), pool_support::Fake::new(FAST)];
        let pool = builder(&f).build().unwrap();
        for _ in 0..10 {
            let out = pool.generate(req()).await.unwrap().collect().await.unwrap();
            assert_eq!(out.replica, id(1), "{bad:?}");
        }
        let s = pool.stats();
        assert_eq!(s.successes, 10, "{bad:?}");
        assert_eq!(s.retries, f[0].calls(), "{bad:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_lone_failing_replica_gives_a_typed_error() {
    for (bad, kind) in [
        (Behaviour::Unavailable, ReplicaErrorKind::Unavailable),
        (Behaviour::PanicSync, ReplicaErrorKind::Panicked),
        (Behaviour::PanicAsync, ReplicaErrorKind::Panicked),
        (Behaviour::EndEarly(0), ReplicaErrorKind::Failed),
        (Behaviour::Reject, ReplicaErrorKind::Rejected),
    ] {
        let f = fakes(1, bad);
        let pool = builder(&f).build().unwrap();
        match pool.generate(req()).await {
            Err(Error::ReplicaFailed { replica, source }) => {
                assert_eq!(replica, id(0));
                assert_eq!(source.kind(), kind, "{bad:?}");
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_rejected_request_is_not_retried_and_does_not_hurt_health() {
    let f = vec![
        pool_support::Fake::new(Behaviour::Reject),
        pool_support::Fake::new(Behaviour::Reject),
    ];
    let pool = builder(&f).failure_threshold(1).build().unwrap();
    for _ in 0..5 {
        assert!(matches!(
            pool.generate(req()).await,
            Err(Error::ReplicaFailed { .. })
        ));
    }
    let s = pool.stats();
    assert_eq!((s.retries, s.ejections), (0, 0));
    assert_eq!(f[0].calls() + f[1].calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn never_retried_after_tokens_were_streamed() {
    let f = vec![
        pool_support::Fake::new(Behaviour::FailAfter(2)),
        pool_support::Fake::new(Behaviour::FailAfter(2)),
    ];
    let pool = builder(&f).build().unwrap();
    let mut stream = pool.generate(req()).await.unwrap();
    let mut text = String::new();
    let err = loop {
        match stream.next().await.unwrap() {
            Ok(ReplicaEvent::Token { text: t }) => text.push_str(&t),
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(text, "t0 t1 ");
    assert!(matches!(err, Error::ReplicaFailed { .. }));
    assert!(stream.next().await.is_none());
    assert_eq!(pool.stats().retries, 0);
    assert_eq!(f[0].calls() + f[1].calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_hanging_replica_times_out_and_the_request_moves_on() {
    let f = vec![
        pool_support::Fake::new(Behaviour::Hang),
        pool_support::Fake::new(FAST),
    ];
    let pool = builder(&f)
        .first_token_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    for _ in 0..4 {
        let out = pool.generate(req()).await.unwrap().collect().await.unwrap();
        assert_eq!(out.replica, id(1));
    }
    assert!(f[0].calls() >= 1);
}

#[tokio::test(start_paused = true)]
async fn deadlines_end_hung_requests() {
    let f = fakes(1, Behaviour::Hang);
    let pool = builder(&f).build().unwrap();
    let r = pool
        .generate(req().with_deadline(Duration::from_secs(1)))
        .await;
    assert!(
        matches!(r, Err(Error::PoolDeadlineExceeded { .. })),
        "{r:?}"
    );

    // Hung after the first token: the stream reports the deadline instead of waiting forever.
    f[0].set(Behaviour::HangAfter(1));
    let mut s = pool
        .generate(req().with_deadline(Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(matches!(
        s.next().await,
        Some(Ok(ReplicaEvent::Token { .. }))
    ));
    assert!(matches!(
        s.next().await,
        Some(Err(Error::PoolDeadlineExceeded { .. }))
    ));
    assert_eq!(pool.stats().deadline_exceeded, 2);
    // A short deadline is the caller's choice, not the replica's failure.
    assert_eq!(pool.stats().replica_failures, 0);
    assert!(matches!(
        pool.generate(req().with_deadline(Duration::ZERO)).await,
        Err(Error::PoolDeadlineExceeded { .. })
    ));
    assert_eq!(f[0].calls(), 2, "a zero deadline reaches no replica");
}

#[tokio::test(start_paused = true)]
async fn saturated_pool_fails_fast_with_a_retry_hint() {
    let f = fakes(2, FAST);
    let pool = builder(&f).max_in_flight_per_replica(2).build().unwrap();
    let held: Vec<_> = (0..4).map(|_| pool.reserve().unwrap()).collect();
    match pool.generate(req()).await {
        Err(Error::Overloaded { retry_after }) => {
            assert!(retry_after >= Duration::from_millis(10));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(pool.reserve(), Err(Error::Overloaded { .. })));
    assert_eq!(pool.stats().overloaded, 2);
    drop(held);
    assert!(pool.generate(req()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn zero_replicas() {
    let pool = Pool::builder().build().unwrap();
    assert!(matches!(pool.generate(req()).await, Err(Error::NoReplicas)));
    assert!(matches!(pool.reserve(), Err(Error::NoReplicas)));
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_eject_then_a_probe_lets_it_back() {
    let f = vec![
        pool_support::Fake::new(Behaviour::Unavailable),
        pool_support::Fake::new(FAST),
        pool_support::Fake::new(FAST),
    ];
    let pool = builder(&f)
        .failure_threshold(2)
        .ejection_backoff(Duration::from_secs(1), Duration::from_secs(8))
        .build()
        .unwrap();
    while pool.stats().ejections == 0 {
        pool.generate(req()).await.unwrap().collect().await.unwrap();
    }
    assert_eq!(pool.stats().replicas[0].state, ReplicaState::Ejected);
    let before = f[0].calls();
    for _ in 0..20 {
        pool.generate(req()).await.unwrap().collect().await.unwrap();
    }
    assert_eq!(f[0].calls(), before, "an ejected replica got traffic");

    // After the backoff, one probe (when the picker draws it); it fails, so the backoff doubles.
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..50 {
        pool.generate(req()).await.unwrap().collect().await.unwrap();
        if f[0].calls() > before {
            break;
        }
    }
    assert_eq!(f[0].calls(), before + 1, "exactly one probe");
    assert_eq!(pool.stats().replicas[0].state, ReplicaState::Ejected);
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..10 {
        pool.generate(req()).await.unwrap().collect().await.unwrap();
    }
    assert_eq!(
        f[0].calls(),
        before + 1,
        "probed before the doubled backoff"
    );

    // It recovers; the next probe succeeds and it serves again.
    f[0].set(FAST);
    tokio::time::advance(Duration::from_secs(1)).await;
    let mut back = false;
    for _ in 0..50 {
        let out = pool.generate(req()).await.unwrap().collect().await.unwrap();
        if out.replica == id(0) {
            back = true;
            break;
        }
    }
    assert!(back);
    assert_eq!(pool.stats().replicas[0].state, ReplicaState::Serving);
}

#[tokio::test(start_paused = true)]
async fn all_ejected_and_the_ejection_cap() {
    let f = fakes(4, Behaviour::Unavailable);
    let pool = builder(&f)
        .failure_threshold(1)
        .max_ejected_fraction(0.5)
        .build()
        .unwrap();
    for _ in 0..20 {
        let _ = pool.generate(req()).await;
    }
    let ejected = pool
        .stats()
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Ejected)
        .count();
    assert_eq!(ejected, 2, "the cap is half of four");

    let f = fakes(2, Behaviour::Unavailable);
    let pool = builder(&f)
        .failure_threshold(1)
        .max_ejected_fraction(1.0)
        .build()
        .unwrap();
    for _ in 0..4 {
        let _ = pool.generate(req()).await;
    }
    assert!(matches!(
        pool.generate(req()).await,
        Err(Error::AllEjected { ejected: 2 })
    ));
}

#[tokio::test(start_paused = true)]
async fn latency_outliers_are_ejected() {
    let f = vec![
        pool_support::Fake::new(slow(10)),
        pool_support::Fake::new(slow(10)),
        pool_support::Fake::new(slow(10)),
        pool_support::Fake::new(slow(200)),
    ];
    let pool = builder(&f)
        .latency_outliers(Some(3.0), Duration::from_millis(50))
        .build()
        .unwrap();
    // Enough concurrent requests that every replica gets a latency sample.
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.generate(req()).await?.collect().await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert!(pool.stats().replicas.iter().all(|r| r.successes > 0));
    assert_eq!(pool.eject_outliers(), vec![id(3)]);
    assert_eq!(pool.stats().replicas[3].state, ReplicaState::Ejected);
}

#[tokio::test(start_paused = true)]
async fn draining_finishes_in_flight_work_and_takes_nothing_new() {
    let f = fakes(2, slow(100));
    let pool = builder(&f).build().unwrap();
    let s = pool.generate(req()).await.unwrap();
    let victim = s.replica();
    let drain = tokio::spawn({
        let pool = pool.clone();
        async move { pool.drain(victim).await }
    });
    tokio::task::yield_now().await;
    assert!(!drain.is_finished());
    assert_eq!(
        pool.stats()
            .replicas
            .iter()
            .find(|r| r.id == victim)
            .unwrap()
            .state,
        ReplicaState::Draining
    );
    for _ in 0..5 {
        let r = pool.reserve().unwrap();
        assert_ne!(r.replica(), victim);
    }
    // The in-flight request completes normally; then the drain finishes and removes it.
    let out = s.collect().await.unwrap();
    assert_eq!(out.replica, victim);
    drain.await.unwrap().unwrap();
    assert!(!pool.replica_ids().contains(&victim));
    assert!(matches!(
        pool.drain(victim).await,
        Err(Error::UnknownReplica { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_and_refuses_new_work() {
    let f = fakes(2, slow(100));
    let pool = builder(&f).build().unwrap();
    let s = pool.generate(req()).await.unwrap();
    let stop = tokio::spawn({
        let pool = pool.clone();
        async move { pool.shutdown().await }
    });
    tokio::task::yield_now().await;
    assert!(matches!(
        pool.generate(req()).await,
        Err(Error::PoolShutDown)
    ));
    assert!(!stop.is_finished());
    s.collect().await.unwrap();
    stop.await.unwrap();
    assert_eq!(pool.stats().successes, 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_stream_cancels_and_releases() {
    let f = fakes(1, slow(100));
    let pool = builder(&f).build().unwrap();
    let s = pool.generate(req()).await.unwrap();
    assert_eq!(pool.stats().in_flight, 1);
    drop(s);
    let st = pool.stats();
    assert_eq!(st.in_flight, 0);
    assert_eq!(st.replicas[0].cancelled, 1);
    // The replica saw the cancellation and released its own load too.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(f[0].tracker().load().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn status_changes_take_effect_at_once() {
    let f = fakes(3, FAST);
    let pool = builder(&f).build().unwrap();
    pool.set_status(id(0), EndpointStatus::Unhealthy).unwrap();
    pool.set_status(id(1), EndpointStatus::Draining).unwrap();
    for _ in 0..20 {
        assert_eq!(pool.reserve().unwrap().replica(), id(2));
    }
    pool.set_status(id(2), EndpointStatus::Unhealthy).unwrap();
    assert!(matches!(pool.reserve(), Err(Error::NoReplicas)));
    assert!(matches!(
        pool.set_status(id(9), EndpointStatus::Serving),
        Err(Error::UnknownReplica { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn invalid_configuration_is_rejected() {
    let bad = [
        Pool::builder().max_in_flight_per_replica(0),
        Pool::builder().failure_threshold(0),
        Pool::builder().max_ejected_fraction(1.5),
        Pool::builder().max_ejected_fraction(f64::NAN),
        Pool::builder().latency_outliers(Some(0.5), Duration::ZERO),
        Pool::builder().latency_outliers(Some(f64::INFINITY), Duration::ZERO),
        Pool::builder().default_deadline(Duration::ZERO),
        Pool::builder().ejection_backoff(Duration::from_secs(2), Duration::from_secs(1)),
    ];
    for b in bad {
        assert!(matches!(b.build(), Err(Error::InvalidPoolConfig { .. })));
    }
}

#[test]
fn discovery_without_a_runtime_is_an_error() {
    let r = Pool::builder()
        .discovery(keel_serving::StaticDiscovery::default())
        .build();
    assert!(matches!(r, Err(Error::InvalidPoolConfig { .. })));
}

#[tokio::test(start_paused = true)]
async fn reservations_report_outcomes() {
    let f = fakes(1, FAST);
    let pool = builder(&f).failure_threshold(1).build().unwrap();
    let r = pool.reserve().unwrap();
    assert!(!r.is_probe());
    r.succeed(Duration::from_millis(5));
    let r = pool.reserve().unwrap();
    r.fail(&keel_serving::ReplicaError::new(
        ReplicaErrorKind::Failed,
        "by hand",
    ));
    let s = pool.stats();
    assert_eq!((s.successes, s.replica_failures, s.picks), (1, 1, 2));
    // A single replica is never ejected under the default cap.
    assert_eq!(s.ejections, 0);
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_all_complete_and_metrics_add_up() {
    let f = fakes(4, FAST);
    let pool = builder(&f).build().unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                pool.generate(PoolRequest::new(format!("prompt {i}"), 3))
                    .await?
                    .collect()
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let s = pool.stats();
    assert_eq!(s.successes, 200);
    assert_eq!(s.replicas.iter().map(|r| r.successes).sum::<u64>(), 200);
    assert_eq!(s.latency.count, 200);
    assert_eq!(s.ttft.count, 200);
    assert!(s.replicas.iter().all(|r| r.picks > 20), "{s:?}");
}
