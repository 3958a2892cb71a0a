//! Durable timers and signals: deadlines survive restarts, signals are buffered and
//! delivered once, and many sleeping workflows need no task each.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::time::{Duration, SystemTime};

use common::{builder, id, start, stop};
use keel_durable::{Context, Error, ListFilter, WorkflowStatus};

fn sleeper(
    ms: u64,
) -> impl Fn(
    Context,
    (),
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, Error>> + Send>>
+ Send
+ Sync
+ 'static {
    move |ctx: Context, (): ()| {
        Box::pin(async move {
            let t0 = ctx.now().await?;
            ctx.sleep(Duration::from_millis(ms)).await?;
            let t1 = ctx.now().await?;
            Ok(t1.duration_since(t0).unwrap_or_default().as_millis() as u64)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_survives_restart_and_fires_when_overdue() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(builder(dir.path()).register("sleep", sleeper(300))).await;
    rt.start("sleep", &id("s"), &()).await.unwrap();
    while rt.history(&id("s")).unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
    // Stay down past the deadline; the reopened runtime must fire it at once.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rt = start(builder(dir.path()).register("sleep", sleeper(300))).await;
    let slept: u64 = rt.handle(&id("s")).unwrap().result().await.unwrap();
    assert!(slept >= 300, "woke after {slept} ms");
    let hist = rt.history(&id("s")).unwrap();
    assert_eq!(
        hist.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["now", "sleep", "now"]
    );
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_sleepers_complete() {
    let dir = tempfile::tempdir().unwrap();
    // A concurrency of 8 proves sleeping workflows hold no execution slot: 2000 of them
    // sleep at once and all wake.
    let rt = start(
        builder(dir.path())
            .concurrency(8)
            .register("sleep", sleeper(200)),
    )
    .await;
    let mut handles = Vec::new();
    for i in 0..2000 {
        handles.push(rt.start("sleep", &id(&format!("s{i}")), &()).await.unwrap());
    }
    for h in &handles {
        let slept: u64 = h.result().await.unwrap();
        assert!(slept >= 200);
    }
    drop(handles);
    let done = rt
        .list(&ListFilter::new().status(WorkflowStatus::Succeeded))
        .unwrap();
    assert_eq!(done.len(), 2000);
    stop(rt).await;
}

/// `sleep_until` a future time survives a restart: the reopened runtime fires it, and the
/// workflow's journaled clock is at or past the deadline when it wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_until_a_future_time_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wf = |ctx: Context, (): ()| async move {
        let t0 = ctx.now().await?;
        let deadline = t0 + Duration::from_millis(300);
        ctx.sleep_until(deadline).await?;
        let t1 = ctx.now().await?;
        // Whether the wake came at or after the deadline, by the journaled clock.
        Ok::<_, Error>(t1 >= deadline)
    };
    let rt = start(builder(dir.path()).register("wf", wf)).await;
    rt.start("wf", &id("u"), &()).await.unwrap();
    while rt.history(&id("u")).unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
    let rt = start(builder(dir.path()).register("wf", wf)).await;
    let on_time: bool = rt.handle(&id("u")).unwrap().result().await.unwrap();
    assert!(on_time, "woke before its deadline");
    let kinds: Vec<String> = rt
        .history(&id("u"))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["now", "sleep", "now"]);
    stop(rt).await;
}

/// A `recv_timeout` deadline is journaled before the wait, so it survives a restart: with no
/// signal the reopened workflow times out (`None`); with a signal sent after the restart it
/// gets the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_timeout_deadlines_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wf = |ctx: Context, ms: u64| async move {
        ctx.recv_timeout::<u32>("go", Duration::from_millis(ms))
            .await
    };
    let rt = start(builder(dir.path()).register("wf", wf)).await;
    // "short" times out with nobody signalling; "long" waits a minute, which no test run
    // reaches, for a signal that comes after the restart.
    rt.start("wf", &id("short"), &200u64).await.unwrap();
    rt.start("wf", &id("long"), &60_000u64).await.unwrap();
    for w in ["short", "long"] {
        while rt.history(&id(w)).unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop(rt).await;
    let rt = start(builder(dir.path()).register("wf", wf)).await;
    let short: Option<u32> = rt.handle(&id("short")).unwrap().result().await.unwrap();
    assert_eq!(short, None);
    rt.signal(&id("long"), "go", &5u32).await.unwrap();
    let long: Option<u32> = rt.handle(&id("long")).unwrap().result().await.unwrap();
    assert_eq!(long, Some(5));
    // One deadline each, journaled before the restart and reused after it.
    for w in ["short", "long"] {
        let deadlines = rt
            .history(&id(w))
            .unwrap()
            .into_iter()
            .filter(|e| e.kind.contains("deadline"))
            .count();
        assert_eq!(deadlines, 1, "{w}");
    }
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleep_until_past_time_returns_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(
        builder(dir.path()).register("wf", |ctx: Context, (): ()| async move {
            ctx.sleep_until(SystemTime::UNIX_EPOCH).await?;
            Ok::<_, Error>(1u8)
        }),
    )
    .await;
    let v: u8 = rt
        .start("wf", &id("w"), &())
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(v, 1);
    stop(rt).await;
}

fn approvals(
    ctx: Context,
    n: u32,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<String>, Error>> + Send>> {
    Box::pin(async move {
        let mut got = Vec::new();
        for _ in 0..n {
            got.push(ctx.recv::<String>("approval").await?);
        }
        Ok(got)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_buffered_ordered_and_delivered_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(builder(dir.path()).register("approve", approvals)).await;
    rt.start("approve", &id("a"), &3u32).await.unwrap();
    rt.signal(&id("a"), "approval", &"one".to_string())
        .await
        .unwrap();
    rt.signal(&id("a"), "approval", &"two".to_string())
        .await
        .unwrap();
    while rt.history(&id("a")).unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
    let rt = start(builder(dir.path()).register("approve", approvals)).await;
    rt.signal(&id("a"), "approval", &"three".to_string())
        .await
        .unwrap();
    let got: Vec<String> = rt.handle(&id("a")).unwrap().result().await.unwrap();
    assert_eq!(got, ["one", "two", "three"]);
    let late = rt.signal(&id("a"), "approval", &"four".to_string()).await;
    assert!(matches!(late, Err(Error::Finished { .. })), "{late:?}");
    let missing = rt.signal(&id("nobody"), "approval", &"x".to_string()).await;
    assert!(matches!(missing, Err(Error::NotFound { .. })));
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_timeout_gives_none_then_value() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(
        builder(dir.path()).register("wf", |ctx: Context, (): ()| async move {
            let first = ctx
                .recv_timeout::<u8>("x", Duration::from_millis(50))
                .await?;
            let second = ctx.recv_timeout::<u8>("x", Duration::from_secs(60)).await?;
            Ok::<_, Error>((first, second))
        }),
    )
    .await;
    let h = rt.start("wf", &id("w"), &()).await.unwrap();
    // Wait for the first timeout to be journaled, then send.
    while rt.history(&id("w")).unwrap().len() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rt.signal(&id("w"), "x", &9u8).await.unwrap();
    let v: (Option<u8>, Option<u8>) = h.result().await.unwrap();
    assert_eq!(v, (None, Some(9)));
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_signal_with_timeout_replays_as_received() {
    let dir = tempfile::tempdir().unwrap();
    let make = || {
        builder(dir.path()).register("wf", |ctx: Context, (): ()| async move {
            let got = ctx
                .recv_timeout::<()>("ping", Duration::from_secs(60))
                .await?;
            ctx.recv::<()>("hold").await?;
            Ok::<_, Error>(got.is_some())
        })
    };
    let rt = start(make()).await;
    rt.start("wf", &id("u"), &()).await.unwrap();
    rt.signal(&id("u"), "ping", &()).await.unwrap();
    while rt.history(&id("u")).unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
    // After a restart the journaled `()` must still read as a received signal.
    let rt = start(make()).await;
    rt.signal(&id("u"), "hold", &()).await.unwrap();
    let got: bool = rt.handle(&id("u")).unwrap().result().await.unwrap();
    assert!(got);
    stop(rt).await;
}

fn gated(
    ctx: Context,
    (): (),
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u32>, Error>> + Send>> {
    Box::pin(async move {
        ctx.recv::<()>("gate").await?;
        let first = ctx.recv::<u32>("a").await?;
        let second = ctx.recv::<u32>("a").await?;
        Ok(vec![first, second])
    })
}

fn pending(rt: &keel_durable::Runtime, wf: &str) -> Vec<String> {
    rt.pending_signals(&id(wf))
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_signals_lists_what_is_buffered_in_send_order() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(builder(dir.path()).register("gated", gated)).await;
    rt.start("gated", &id("g"), &()).await.unwrap();
    assert!(pending(&rt, "g").is_empty());
    rt.signal(&id("g"), "a", &1u32).await.unwrap();
    rt.signal(&id("g"), "extra", &"kept".to_string())
        .await
        .unwrap();
    rt.signal(&id("g"), "a", &2u32).await.unwrap();
    // The workflow waits for "gate", so all three stay buffered, listed in the order sent.
    assert_eq!(
        pending(&rt, "g"),
        [r#""a" -> 1"#, r#""extra" -> "kept""#, r#""a" -> 2"#]
    );
    // A name with a NUL byte is refused and buffers nothing.
    let bad = rt.signal(&id("g"), "a\0b", &3u32).await;
    assert!(
        matches!(bad, Err(Error::InvalidSignalName { .. })),
        "{bad:?}"
    );
    assert_eq!(pending(&rt, "g").len(), 3);
    stop(rt).await;

    // Buffered signals survive a restart; once received they leave the list and show in the
    // history instead, and a signal nobody receives stays listed after the workflow ends.
    let rt = start(builder(dir.path()).register("gated", gated)).await;
    assert_eq!(pending(&rt, "g").len(), 3);
    rt.signal(&id("g"), "gate", &()).await.unwrap();
    let got: Vec<u32> = rt.handle(&id("g")).unwrap().result().await.unwrap();
    assert_eq!(got, [1, 2]);
    assert_eq!(pending(&rt, "g"), [r#""extra" -> "kept""#]);
    let received = rt
        .history(&id("g"))
        .unwrap()
        .iter()
        .filter(|e| e.kind == "signal")
        .count();
    assert_eq!(received, 3);
    let missing = rt.pending_signals(&id("nobody"));
    assert!(
        matches!(missing, Err(Error::NotFound { .. })),
        "{missing:?}"
    );
    stop(rt).await;
}
