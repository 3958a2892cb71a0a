//! Child workflows, and cancellation with compensation (sagas) across parent and children.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{builder, id, start, stop};
use keel_durable::{Context, Error, ListFilter, RuntimeBuilder, StepError, WorkflowStatus};

fn saga(b: RuntimeBuilder) -> RuntimeBuilder {
    b.register("double", |ctx: Context, x: u32| async move {
        ctx.step("calc", || async move { Ok::<_, StepError>(x * 2) })
            .await
    })
    .register("parent", |ctx: Context, x: u32| async move {
        let a: u32 = ctx.child("double", &x).await?;
        let b: u32 = ctx.child("double", &a).await?;
        Ok::<_, Error>(b)
    })
    .register("booking", |ctx: Context, (): ()| async move {
        ctx.step("reserve", || async { Ok::<_, StepError>(()) })
            .await?;
        match ctx.recv::<()>("confirm").await {
            Ok(()) => Ok("confirmed".to_string()),
            Err(Error::Cancelled { .. }) => {
                ctx.step("release", || async { Ok::<_, StepError>(()) })
                    .await?;
                Ok("compensated".to_string())
            }
            Err(e) => Err(e),
        }
    })
    .register("trip", |ctx: Context, (): ()| async move {
        let child = ctx.start_child("booking", &()).await?;
        match ctx.wait_child::<String>(&child).await {
            Err(Error::Cancelled { .. }) => {
                // Cancellation reached us; the child was cancelled too and compensates.
                let r = ctx.wait_child::<String>(&child).await;
                ctx.step("refund", || async { Ok::<_, StepError>(()) })
                    .await?;
                Ok::<_, Error>(format!("{r:?}"))
            }
            other => other,
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_run_and_return_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(saga(builder(dir.path()))).await;
    let v: u32 = rt
        .start("parent", &id("p"), &3u32)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(v, 12);
    let kids = rt.list(&ListFilter::new().name("double")).unwrap();
    assert_eq!(kids.len(), 2);
    assert!(kids.iter().all(|k| k.parent.as_ref() == Some(&id("p"))));
    let kinds: Vec<_> = rt
        .history(&id("p"))
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["child-start", "child-result", "child-start", "child-result"]
    );
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_runs_compensation() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(saga(builder(dir.path()))).await;
    let h = rt.start("booking", &id("b"), &()).await.unwrap();
    while rt.history(&id("b")).unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rt.cancel(&id("b")).await.unwrap();
    assert!(matches!(
        h.result::<String>().await,
        Err(Error::Cancelled { .. })
    ));
    let info = rt.status(&id("b")).unwrap();
    assert_eq!(info.status, WorkflowStatus::Cancelled);
    assert!(info.cancel_requested);
    let kinds: Vec<_> = rt
        .history(&id("b"))
        .unwrap()
        .into_iter()
        .map(|e| format!("{} {}", e.kind, e.name))
        .collect();
    assert_eq!(kinds, ["step reserve", "cancelled ", "step release"]);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(saga(builder(dir.path()))).await;
    let h = rt.start("trip", &id("t"), &()).await.unwrap();
    let child = id("t/0");
    while rt.status(&child).map(|c| c.status).ok() != Some(WorkflowStatus::Running)
        || rt.history(&child).unwrap().is_empty()
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    rt.cancel(&id("t")).await.unwrap();
    assert!(matches!(
        h.result::<String>().await,
        Err(Error::Cancelled { .. })
    ));
    assert_eq!(rt.status(&child).unwrap().status, WorkflowStatus::Cancelled);
    let child_hist: Vec<_> = rt
        .history(&child)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        child_hist.contains(&"release".to_string()),
        "{child_hist:?}"
    );
    let parent_hist: Vec<_> = rt
        .history(&id("t"))
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        parent_hist.contains(&"refund".to_string()),
        "{parent_hist:?}"
    );
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_of_unknown_or_finished_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(saga(builder(dir.path()))).await;
    assert!(matches!(
        rt.cancel(&id("none")).await,
        Err(Error::NotFound { .. })
    ));
    let _: u32 = rt
        .start("double", &id("d"), &1u32)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    rt.cancel(&id("d")).await.unwrap();
    assert_eq!(
        rt.status(&id("d")).unwrap().status,
        WorkflowStatus::Succeeded
    );
    stop(rt).await;
}
