//! Steps: journaling, replay after restart, retries, timeouts, panics, idempotent start,
//! and the status/list/history queries.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{builder, id, start, stop};
use keel_durable::{Context, Error, ListFilter, RetryPolicy, StepError, WorkflowStatus};

fn fast() -> RetryPolicy {
    RetryPolicy::default().backoff(Duration::from_millis(1), 2.0, Duration::from_millis(4))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_steps_are_not_rerun_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let make = |runs: Arc<AtomicU32>| {
        builder(dir.path()).register("wf", move |ctx: Context, n: u32| {
            let runs = Arc::clone(&runs);
            async move {
                let a: u32 = ctx
                    .step("first", || {
                        let runs = Arc::clone(&runs);
                        async move {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, StepError>(n * 2)
                        }
                    })
                    .await?;
                let b: u32 = ctx.recv("go").await?;
                Ok::<_, Error>(a + b)
            }
        })
    };
    let rt = start(make(Arc::clone(&runs))).await;
    let h = rt.start("wf", &id("w1"), &21u32).await.unwrap();
    // Wait until the first step is journaled, then "crash" (drop the execution mid-wait).
    while rt.history(&id("w1")).unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(h);
    stop(rt).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let rt = start(make(Arc::clone(&runs))).await;
    rt.signal(&id("w1"), "go", &1u32).await.unwrap();
    let out: u32 = rt.handle(&id("w1")).unwrap().result().await.unwrap();
    assert_eq!(out, 43);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the journaled step ran again"
    );
    let hist = rt.history(&id("w1")).unwrap();
    let kinds: Vec<_> = hist.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["step", "signal"]);
    assert!(hist[0].to_string().contains("\"first\""), "{}", hist[0]);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_until_success_then_journals_once() {
    let dir = tempfile::tempdir().unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let t = Arc::clone(&tries);
    let rt = start(
        builder(dir.path()).register("wf", move |ctx: Context, (): ()| {
            let t = Arc::clone(&t);
            async move {
                ctx.step_with("flaky", fast().max_attempts(5), || {
                    let t = Arc::clone(&t);
                    async move {
                        if t.fetch_add(1, Ordering::SeqCst) < 3 {
                            Err(StepError::retryable("not yet"))
                        } else {
                            Ok(7u8)
                        }
                    }
                })
                .await
            }
        }),
    )
    .await;
    let out: u8 = rt
        .start("wf", &id("r"), &())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(out, 7);
    assert_eq!(tries.load(Ordering::SeqCst), 4);
    stop(rt).await;
}

/// Runs a one-step workflow whose step always fails in the given way and returns the error.
async fn failing_step(
    policy: RetryPolicy,
    fail: impl Fn(u32) -> Result<u8, StepError> + Send + Sync + Clone + 'static,
    slow: bool,
) -> (Error, u32) {
    let dir = tempfile::tempdir().unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let t = Arc::clone(&tries);
    let rt = start(
        builder(dir.path()).register("wf", move |ctx: Context, (): ()| {
            let t = Arc::clone(&t);
            let fail = fail.clone();
            async move {
                ctx.step_with("s", policy, || {
                    let n = t.fetch_add(1, Ordering::SeqCst);
                    let fail = fail.clone();
                    async move {
                        if slow {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                        }
                        fail(n)
                    }
                })
                .await
            }
        }),
    )
    .await;
    let err = rt
        .start("wf", &id("f"), &())
        .await
        .unwrap()
        .result::<u8>()
        .await
        .unwrap_err();
    let info = rt.status(&id("f")).unwrap();
    assert_eq!(info.status, WorkflowStatus::Failed);
    stop(rt).await;
    (err, tries.load(Ordering::SeqCst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_max_attempts() {
    let (err, n) = failing_step(
        fast().max_attempts(3),
        |_| Err(StepError::retryable("down")),
        false,
    )
    .await;
    assert_eq!(n, 3);
    assert!(
        err.to_string().contains("after 3 attempt(s): down"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_are_not_retried() {
    let (err, n) = failing_step(
        fast().max_attempts(5),
        |_| Err(StepError::permanent("bad request")),
        false,
    )
    .await;
    assert_eq!(n, 1);
    assert!(matches!(err, Error::WorkflowFailed { .. }));
    assert!(err.to_string().contains("bad request"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_step_is_a_failed_attempt() {
    let (err, n) = failing_step(fast().max_attempts(2), |_| panic!("boom"), false).await;
    assert_eq!(n, 2);
    assert!(err.to_string().contains("step panicked: boom"), "{err}");
}

/// A closure that panics before it even returns its future is a failed attempt too: it is
/// retried, and the step succeeds once an attempt does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closure_panicking_before_its_future_is_a_failed_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let tries = Arc::new(AtomicU32::new(0));
    let t = Arc::clone(&tries);
    let rt = start(
        builder(dir.path()).register("wf", move |ctx: Context, (): ()| {
            let t = Arc::clone(&t);
            async move {
                ctx.step_with("s", fast().max_attempts(3), || {
                    let n = t.fetch_add(1, Ordering::SeqCst);
                    assert!(n >= 2, "no future on attempt {n}");
                    async move { Ok::<_, StepError>(n) }
                })
                .await
            }
        }),
    )
    .await;
    let v: u32 = rt
        .start("wf", &id("p"), &())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(v, 2);
    assert_eq!(tries.load(Ordering::SeqCst), 3);
    stop(rt).await;
}

/// The worker never runs more executions at once than `RuntimeBuilder::concurrency` allows,
/// and it does use them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_runs_at_most_its_concurrency_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let running = Arc::new(AtomicU32::new(0));
    let most = Arc::new(AtomicU32::new(0));
    let (g, r, m) = (Arc::clone(&gate), Arc::clone(&running), Arc::clone(&most));
    let b = builder(dir.path())
        .concurrency(2)
        .register("held", move |ctx: Context, (): ()| {
            let (g, r, m) = (Arc::clone(&g), Arc::clone(&r), Arc::clone(&m));
            async move {
                ctx.step("wait", || {
                    let (g, r, m) = (Arc::clone(&g), Arc::clone(&r), Arc::clone(&m));
                    async move {
                        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                        m.fetch_max(now, Ordering::SeqCst);
                        // Held until the test lets it go.
                        g.acquire().await.unwrap().forget();
                        r.fetch_sub(1, Ordering::SeqCst);
                        Ok::<_, StepError>(())
                    }
                })
                .await
            }
        });
    let rt = start(b).await;
    let mut hs = Vec::new();
    for i in 0..6 {
        hs.push(rt.start("held", &id(&format!("h{i}")), &()).await.unwrap());
    }
    while running.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // However long this waits, no third execution can start while two are held.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(most.load(Ordering::SeqCst), 2);
    gate.add_permits(6);
    for h in &hs {
        h.result::<()>().await.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), 2);
    drop(hs);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_time_out() {
    let policy = fast()
        .max_attempts(2)
        .attempt_timeout(Duration::from_millis(20));
    let (err, n) = failing_step(policy, |_| Ok(1), true).await;
    assert_eq!(n, 2);
    assert!(err.to_string().contains("timed out"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_is_idempotent_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let r = Arc::clone(&runs);
    let b = builder(dir.path())
        .register("wf", move |_ctx: Context, x: u32| {
            r.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Error>(x + 1) }
        })
        .register(
            "other",
            |_ctx: Context, x: u32| async move { Ok::<_, Error>(x) },
        );
    let rt = start(b).await;
    let a: u32 = rt
        .start("wf", &id("same"), &1u32)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    let b: u32 = rt
        .start("wf", &id("same"), &100u32)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!((a, b), (2, 2));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let conflict = rt.start("other", &id("same"), &1u32).await;
    assert!(
        matches!(conflict, Err(Error::IdConflict { .. })),
        "{conflict:?}"
    );
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_status_and_name() {
    let dir = tempfile::tempdir().unwrap();
    let b = builder(dir.path())
        .register(
            "ok",
            |_ctx: Context, (): ()| async move { Ok::<_, Error>(()) },
        )
        .register("bad", |_ctx: Context, (): ()| async move {
            Err::<(), _>(StepError::permanent("nope"))
        })
        .register("wait", |ctx: Context, (): ()| async move {
            ctx.recv::<()>("never").await
        });
    let rt = start(b).await;
    let before = std::time::SystemTime::now() - Duration::from_secs(1);
    for i in 0..3 {
        rt.start("ok", &id(&format!("ok{i}")), &())
            .await
            .unwrap()
            .result::<()>()
            .await
            .unwrap();
    }
    let _ = rt
        .start("bad", &id("bad"), &())
        .await
        .unwrap()
        .result::<()>()
        .await;
    rt.start("wait", &id("wait"), &()).await.unwrap();
    let count = |f: ListFilter| rt.list(&f).unwrap().len();
    assert_eq!(count(ListFilter::new()), 5);
    assert_eq!(
        count(ListFilter::new().status(WorkflowStatus::Succeeded)),
        3
    );
    assert_eq!(count(ListFilter::new().status(WorkflowStatus::Failed)), 1);
    assert_eq!(count(ListFilter::new().status(WorkflowStatus::Running)), 1);
    assert_eq!(count(ListFilter::new().name("ok")), 3);
    assert_eq!(count(ListFilter::new().created_after(before)), 5);
    assert_eq!(count(ListFilter::new().created_before(before)), 0);
    let bad = rt.status(&id("bad")).unwrap();
    assert_eq!(bad.error.as_deref(), Some("nope"));
    assert!(matches!(
        rt.status(&id("missing")),
        Err(Error::NotFound { .. })
    ));
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_workflow_fails_and_others_continue() {
    let dir = tempfile::tempdir().unwrap();
    let b = builder(dir.path())
        .register("panic", |_ctx: Context, (): ()| async move {
            if true {
                panic!("workflow bug");
            }
            Ok::<(), Error>(())
        })
        .register(
            "ok",
            |_ctx: Context, x: u8| async move { Ok::<_, Error>(x) },
        );
    let rt = start(b).await;
    let e = rt
        .start("panic", &id("p"), &())
        .await
        .unwrap()
        .result::<()>()
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("workflow panicked: workflow bug"),
        "{e}"
    );
    let ok: u8 = rt
        .start("ok", &id("o"), &5u8)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(ok, 5);
    stop(rt).await;
}

/// One observation of the workflow below: which operation, whether `is_replaying` was true
/// just before it, and (for steps) whether its closure ran.
type Seen = Arc<std::sync::Mutex<Vec<(&'static str, bool, bool)>>>;

fn observed(b: keel_durable::RuntimeBuilder, seen: &Seen) -> keel_durable::RuntimeBuilder {
    let seen = Arc::clone(seen);
    b.register("wf", move |ctx: Context, (): ()| {
        let seen = Arc::clone(&seen);
        async move {
            let note = |what, replaying, ran| seen.lock().unwrap().push((what, replaying, ran));
            for name in ["a", "b"] {
                let replaying = ctx.is_replaying();
                let ran = Arc::new(AtomicU32::new(0));
                ctx.step(name, || {
                    let ran = Arc::clone(&ran);
                    async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, StepError>(())
                    }
                })
                .await?;
                note(name, replaying, ran.load(Ordering::SeqCst) > 0);
            }
            let replaying = ctx.is_replaying();
            ctx.recv::<()>("go").await?;
            note("recv", replaying, false);
            let replaying = ctx.is_replaying();
            ctx.step("c", || async { Ok::<_, StepError>(()) }).await?;
            note("c", replaying, true);
            Ok::<_, Error>(())
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_replaying_tells_replayed_steps_from_fresh_ones() {
    let dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let rt = start(observed(builder(dir.path()), &seen)).await;
    rt.start("wf", &id("r"), &()).await.unwrap();
    while rt.history(&id("r")).unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
    // The first execution ran both steps fresh and then suspended in `recv`.
    assert_eq!(
        *seen.lock().unwrap(),
        [("a", false, true), ("b", false, true)]
    );
    seen.lock().unwrap().clear();

    let rt = start(observed(builder(dir.path()), &seen)).await;
    rt.signal(&id("r"), "go", &()).await.unwrap();
    rt.handle(&id("r")).unwrap().result::<()>().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    // Recovery may suspend once more before the signal lands; in every execution a step is
    // replayed exactly when its closure did not run.
    for (what, replaying, ran) in &seen {
        if *what != "recv" {
            assert_eq!(*replaying, !ran, "{what} in {seen:?}");
        }
    }
    // The last execution replayed "a" and "b" and caught up at the signal.
    assert_eq!(
        seen[seen.len() - 4..],
        [
            ("a", true, false),
            ("b", true, false),
            ("recv", false, false),
            ("c", false, true)
        ]
    );
    stop(rt).await;
}
