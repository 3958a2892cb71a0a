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
async fn rate_limit_spaces_starts() {
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
    let starts = probe.starts.lock().unwrap().clone();
    let first = *starts.iter().min().unwrap();
    let last = *starts.iter().max().unwrap();
    // A bucket of 5 tokens refilled at 5/s: starts 6..8 need at least 3 * 200 ms of refill.
    // This is a lower bound the limiter guarantees, so load cannot make it flaky.
    assert!(
        last - first >= Duration::from_millis(550),
        "{:?}",
        last - first
    );
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
}
