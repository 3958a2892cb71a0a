//! Group commit: concurrent workflows share flushes in both durability modes, and every
//! step is still journaled exactly once. Also a property test of replay from any prefix.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{builder, id, open_stopped_journal, start, stop};
use keel_durable::{Context, Durability, Error, StepError, WorkflowStatus};
use proptest::prelude::*;

async fn run_many(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(
        builder(dir.path())
            .durability(durability)
            .concurrency(64)
            .register("ten", |ctx: Context, x: u64| async move {
                let mut acc = x;
                for i in 0..10u64 {
                    acc = ctx
                        .step(
                            &format!("s{i}"),
                            || async move { Ok::<_, StepError>(acc + i) },
                        )
                        .await?;
                }
                Ok::<_, Error>(acc)
            }),
    )
    .await;
    let mut hs = Vec::new();
    for i in 0..64u64 {
        hs.push(rt.start("ten", &id(&format!("w{i}")), &i).await.unwrap());
    }
    for (i, h) in hs.iter().enumerate() {
        assert_eq!(h.result::<u64>().await.unwrap(), i as u64 + 45);
    }
    for i in 0..64 {
        assert_eq!(rt.history(&id(&format!("w{i}"))).unwrap().len(), 10);
    }
    let s = rt.stats();
    // 64 starts + 640 steps + 64 results each wait for a flush; concurrent ones share.
    assert!(s.commits >= 768, "{s:?}");
    assert!(s.flushes < s.commits, "no flush was shared: {s:?}");
    drop(hs);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workflows_share_flushes_process_crash() {
    run_many(Durability::ProcessCrash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workflows_share_flushes_power_loss() {
    run_many(Durability::PowerLoss).await;
}

/// Runs one workflow of 20 steps alone on `rt` and returns the committer's counters.
async fn lone_workflow(dir: &std::path::Path) -> keel_durable::JournalStats {
    let rt = start(builder(dir).durability(Durability::PowerLoss).register(
        "twenty",
        |ctx: Context, (): ()| async move {
            let mut acc = 0u64;
            for i in 0..20u64 {
                acc = ctx
                    .step(
                        &format!("s{i}"),
                        || async move { Ok::<_, StepError>(acc + i) },
                    )
                    .await?;
            }
            Ok::<_, Error>(acc)
        },
    ))
    .await;
    let h = rt.start("twenty", &id("lone"), &()).await.unwrap();
    assert_eq!(h.result::<u64>().await.unwrap(), 190);
    assert_eq!(rt.history(&id("lone")).unwrap().len(), 20);
    let s = rt.stats();
    drop(h);
    stop(rt).await;
    // Reopening finds every step journaled: nothing of the lone workflow's runs again.
    let rt = start(
        builder(dir).register("twenty", |_: Context, (): ()| async move {
            Err::<u64, _>("must not run: the workflow had finished")
        }),
    )
    .await;
    let again: u64 = rt.handle(&id("lone")).unwrap().result().await.unwrap();
    assert_eq!(again, 190);
    stop(rt).await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_workflow_flushes_on_its_own_thread() {
    let dir = tempfile::tempdir().unwrap();
    let s = lone_workflow(dir.path()).await;
    // The start, 20 steps and the result each waited for a flush. With nothing else
    // committing, the committing task flushes itself instead of waking the committer thread.
    assert!(s.commits >= 22, "{s:?}");
    assert!(s.inline_flushes > 0, "{s:?}");
    assert!(s.inline_flushes <= s.flushes, "{s:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_current_thread_runtime_leaves_flushes_to_the_committer() {
    let dir = tempfile::tempdir().unwrap();
    let s = lone_workflow(dir.path()).await;
    // A current-thread runtime cannot move its other tasks away while a flush blocks, so
    // every flush runs on the committer thread.
    assert!(s.commits >= 22, "{s:?}");
    assert_eq!(s.inline_flushes, 0, "{s:?}");
    assert!(s.flushes > 0, "{s:?}");
}

/// Runs an `n`-step workflow, truncates its journal to the first `k` entries (as if the
/// process died right after step `k - 1` was journaled), reopens, and checks that exactly
/// the steps at `k..n` run again and the result is unchanged.
fn replay_from_prefix(n: u32, k: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let runs: Arc<Vec<AtomicU32>> = Arc::new((0..n).map(|_| AtomicU32::new(0)).collect());
        let make = |runs: &Arc<Vec<AtomicU32>>| {
            let runs = Arc::clone(runs);
            builder(dir.path()).register("wf", move |ctx: Context, n: u32| {
                let runs = Arc::clone(&runs);
                async move {
                    let mut acc = 1u64;
                    for i in 0..n {
                        let runs = Arc::clone(&runs);
                        acc = ctx
                            .step(&format!("s{i}"), || {
                                let runs = Arc::clone(&runs);
                                async move {
                                    runs[i as usize].fetch_add(1, Ordering::SeqCst);
                                    Ok::<_, StepError>(
                                        acc.wrapping_mul(31).wrapping_add(u64::from(i)),
                                    )
                                }
                            })
                            .await?;
                    }
                    Ok::<_, Error>(acc)
                }
            })
        };
        let rt = start(make(&runs)).await;
        let first: u64 = rt
            .start("wf", &id("p"), &n)
            .await
            .unwrap()
            .result()
            .await
            .unwrap();
        stop(rt).await;
        {
            let db = open_stopped_journal(dir.path());
            let mut prefix = b"e/p\0".to_vec();
            let keys: Vec<_> = db.scan_prefix(&prefix).keys().map(|k| k.unwrap()).collect();
            for key in keys.iter().skip(k as usize) {
                db.remove(key).unwrap();
            }
            prefix = b"w/p".to_vec();
            let mut rec: serde_json::Value =
                serde_json::from_slice(&db.get(&prefix).unwrap().unwrap()).unwrap();
            rec["status"] = "Running".into();
            rec["output"] = serde_json::Value::Null;
            db.insert(&prefix, serde_json::to_vec(&rec).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        let rt = start(make(&runs)).await;
        let h = rt.handle(&id("p")).unwrap();
        let second: u64 = h.result().await.unwrap();
        assert_eq!(first, second);
        assert_eq!(
            rt.status(&id("p")).unwrap().status,
            WorkflowStatus::Succeeded
        );
        for (i, r) in runs.iter().enumerate() {
            let expected = if (i as u32) < k { 1 } else { 2 };
            assert_eq!(
                r.load(Ordering::SeqCst),
                expected,
                "step {i} with prefix {k} of {n}"
            );
        }
        drop(h);
        stop(rt).await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn replaying_any_prefix_gives_the_same_result((n, k) in (1u32..12).prop_flat_map(|n| (Just(n), 0..=n))) {
        replay_from_prefix(n, k);
    }
}
