//! Deterministic helpers and versioning: replay sees the journaled `now`, `random` and
//! `uuid`, and version markers keep old executions on their old path.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{builder, id, start, stop};
use keel_durable::{Context, Error, RuntimeBuilder, StepError};

type Seen = Arc<Mutex<Vec<(SystemTime, u64, String)>>>;

fn helpers(b: RuntimeBuilder, seen: &Seen) -> RuntimeBuilder {
    let seen = Arc::clone(seen);
    b.register("wf", move |ctx: Context, (): ()| {
        let seen = Arc::clone(&seen);
        async move {
            let t = ctx.now().await?;
            let r = ctx.random().await?;
            let u = ctx.uuid().await?;
            seen.lock().unwrap().push((t, r, u.clone()));
            ctx.recv::<()>("go").await?;
            Ok::<_, Error>(u)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn now_random_uuid_replay_identically() {
    let dir = tempfile::tempdir().unwrap();
    let seen: Seen = Arc::default();
    let rt = start(helpers(builder(dir.path()), &seen)).await;
    rt.start("wf", &id("d"), &()).await.unwrap();
    while seen.lock().unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let rt = start(helpers(builder(dir.path()), &seen)).await;
    rt.signal(&id("d"), "go", &()).await.unwrap();
    let u: String = rt.handle(&id("d")).unwrap().result().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 2, "{seen:?}");
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    assert_eq!(u, seen[0].2);
    assert_eq!(u.len(), 36);
    assert_eq!(&u[14..15], "4", "{u}");
    stop(rt).await;
}

fn v1(b: RuntimeBuilder) -> RuntimeBuilder {
    b.register("wf", |ctx: Context, (): ()| async move {
        ctx.step("a", || async { Ok::<_, StepError>(()) }).await?;
        ctx.step("x", || async { Ok::<_, StepError>(()) }).await?;
        ctx.recv::<()>("go").await?;
        Ok::<_, Error>(0u32)
    })
}

fn v2(b: RuntimeBuilder) -> RuntimeBuilder {
    b.register("wf", |ctx: Context, (): ()| async move {
        ctx.step("a", || async { Ok::<_, StepError>(()) }).await?;
        let v = ctx.version("add-audit", 0, 1).await?;
        if v >= 1 {
            ctx.step("audit", || async { Ok::<_, StepError>(()) })
                .await?;
        }
        ctx.step("x", || async { Ok::<_, StepError>(()) }).await?;
        ctx.recv::<()>("go").await?;
        Ok::<_, Error>(v)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_markers_keep_old_executions_on_the_old_path() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(v1(builder(dir.path()))).await;
    rt.start("wf", &id("old"), &()).await.unwrap();
    while rt.history(&id("old")).unwrap().len() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;

    let rt = start(v2(builder(dir.path()))).await;
    rt.start("wf", &id("new"), &()).await.unwrap();
    while rt.history(&id("new")).unwrap().len() < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in ["old", "new"] {
        rt.signal(&id(w), "go", &()).await.unwrap();
    }
    let old: u32 = rt.handle(&id("old")).unwrap().result().await.unwrap();
    let new: u32 = rt.handle(&id("new")).unwrap().result().await.unwrap();
    assert_eq!((old, new), (0, 1));
    let names = |w: &str| -> Vec<String> {
        rt.history(&id(w))
            .unwrap()
            .into_iter()
            .map(|e| format!("{} {}", e.kind, e.name))
            .collect()
    };
    assert_eq!(names("old"), ["step a", "step x", "signal go"]);
    assert_eq!(
        names("new"),
        [
            "step a",
            "version add-audit",
            "step audit",
            "step x",
            "signal go"
        ]
    );
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_support_for_a_recorded_version_is_nondeterminism() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(v2(builder(dir.path()))).await;
    rt.start("wf", &id("w"), &()).await.unwrap();
    while rt.history(&id("w")).unwrap().len() < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
    let rt = start(
        builder(dir.path()).register("wf", |ctx: Context, (): ()| async move {
            ctx.step("a", || async { Ok::<_, StepError>(()) }).await?;
            ctx.version("add-audit", 2, 2).await
        }),
    )
    .await;
    let e = rt
        .handle(&id("w"))
        .unwrap()
        .result::<u32>()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("diverged"), "{e}");
    stop(rt).await;
}
