//! Named queues: the concurrency limit holds, the rate limit spaces starts, queued
//! workflows survive restarts, and a queued workflow can be cancelled before it starts.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{builder, id, start, stop};
use keel_durable::{
    Context, Error, QueueConfig, RuntimeBuilder, StartOptions, StepError, WorkflowStatus,
};

#[derive(Default)]
struct Probe {
    active: AtomicUsize,
    max: AtomicUsize,
    starts: Mutex<Vec<Instant>>,
}

/// Registers `work`: a step that records how many run at once, then waits for signal `go`
/// when its input is true.
fn with_probe(b: RuntimeBuilder, probe: &Arc<Probe>) -> RuntimeBuilder {
    let p = Arc::clone(probe);
    b.register("work", move |ctx: Context, wait: bool| {
        let p = Arc::clone(&p);
        async move {
            ctx.step("run", || {
                let p = Arc::clone(&p);
                async move {
                    p.starts.lock().unwrap().push(Instant::now());
                    let now = p.active.fetch_add(1, Ordering::SeqCst) + 1;
                    p.max.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    p.active.fetch_sub(1, Ordering::SeqCst);
                    Ok::<_, StepError>(())
                }
            })
            .await?;
            if wait {
                ctx.recv::<()>("go").await?;
            }
            Ok::<_, Error>(())
        }
    })
}

fn q(opts: &str) -> StartOptions {
    StartOptions::new().queue(opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let b = with_probe(builder(dir.path()), &probe).queue("q", QueueConfig::new(2).unwrap());
    let rt = start(b).await;
    let mut hs = Vec::new();
    for i in 0..8 {
        hs.push(
            rt.start_with("work", &id(&format!("w{i}")), &false, q("q"))
                .await
                .unwrap(),
        );
    }
    for h in &hs {
        h.result::<()>().await.unwrap();
    }
    assert!(probe.max.load(Ordering::SeqCst) <= 2);
    assert_eq!(probe.starts.lock().unwrap().len(), 8);
    drop(hs);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_holds_back_starts_beyond_the_bucket() {
    // One start a day: the bucket holds one token, so exactly one workflow starts and the rest
    // wait for a refill that no test outlives. No wall-clock bound is asserted: however slow
    // the machine, the second token is a day away.
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let cfg = QueueConfig::new(100)
        .unwrap()
        .rate_limit(QueueConfig::MIN_RATE)
        .unwrap();
    let rt = start(with_probe(builder(dir.path()), &probe).queue("r", cfg)).await;
    let mut hs = Vec::new();
    for i in 0..4 {
        hs.push(
            rt.start_with("work", &id(&format!("w{i}")), &false, q("r"))
                .await
                .unwrap(),
        );
    }
    // Whichever got the token finishes; the others stay enqueued.
    let mut done = None;
    while done.is_none() {
        for (i, h) in hs.iter().enumerate() {
            if h.status().unwrap().status == WorkflowStatus::Succeeded {
                done = Some(i);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(probe.starts.lock().unwrap().len(), 1);
    for (i, h) in hs.iter().enumerate() {
        if Some(i) != done {
            assert_eq!(h.status().unwrap().status, WorkflowStatus::Enqueued, "w{i}");
        }
    }
    drop(hs);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_workflows_all_start_as_tokens_refill() {
    // Five a second with a bucket of five: the eight start over about a second, and all finish.
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let cfg = QueueConfig::new(100).unwrap().rate_limit(5.0).unwrap();
    let rt = start(with_probe(builder(dir.path()), &probe).queue("r", cfg)).await;
    let mut hs = Vec::new();
    for i in 0..8 {
        hs.push(
            rt.start_with("work", &id(&format!("w{i}")), &false, q("r"))
                .await
                .unwrap(),
        );
    }
    for h in &hs {
        h.result::<()>().await.unwrap();
    }
    assert_eq!(probe.starts.lock().unwrap().len(), 8);
    drop(hs);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_workflows_survive_restart_and_slots_are_held_while_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let make = |p: &Arc<Probe>| {
        with_probe(builder(dir.path()), p).queue("one", QueueConfig::new(1).unwrap())
    };
    let rt = start(make(&probe)).await;
    rt.start_with("work", &id("a"), &true, q("one"))
        .await
        .unwrap();
    rt.start_with("work", &id("b"), &false, q("one"))
        .await
        .unwrap();
    rt.start_with("work", &id("c"), &false, q("one"))
        .await
        .unwrap();
    while rt.history(&id("a")).unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // "a" waits for a signal and keeps the only slot, so the others stay enqueued.
    assert_eq!(
        rt.status(&id("b")).unwrap().status,
        WorkflowStatus::Enqueued
    );
    rt.cancel(&id("c")).await.unwrap();
    assert_eq!(
        rt.status(&id("c")).unwrap().status,
        WorkflowStatus::Cancelled
    );
    stop(rt).await;

    let rt = start(make(&probe)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        rt.status(&id("b")).unwrap().status,
        WorkflowStatus::Enqueued
    );
    rt.signal(&id("a"), "go", &()).await.unwrap();
    rt.handle(&id("a")).unwrap().result::<()>().await.unwrap();
    rt.handle(&id("b")).unwrap().result::<()>().await.unwrap();
    assert_eq!(probe.starts.lock().unwrap().len(), 2, "c must never run");
    stop(rt).await;
}

#[test]
fn queue_config_is_validated() {
    assert!(matches!(QueueConfig::new(0), Err(Error::InvalidConfig(_))));
    let q = QueueConfig::new(1).unwrap();
    assert!(matches!(q.rate_limit(0.0), Err(Error::InvalidConfig(_))));
    assert!(matches!(
        q.rate_limit(f64::NAN),
        Err(Error::InvalidConfig(_))
    ));
    // Rates so low that the wait would overflow the clock are refused, not a panic later.
    for tiny in [1e-300, 1e-20, QueueConfig::MIN_RATE / 2.0] {
        assert!(
            matches!(q.rate_limit(tiny), Err(Error::InvalidConfig(_))),
            "{tiny}"
        );
    }
    assert!(q.rate_limit(QueueConfig::MIN_RATE).is_ok());
}
