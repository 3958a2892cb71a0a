//! A disk error while the journal flushes, injected with `FaultInjector` (the crate's
//! `fault-injection` feature, turned on for these tests by the crate's dev-dependency on itself).
//!
//! These tests run with `ReopenPolicy::off()`, the fail-stop mode (`reopen_faults.rs` covers
//! the default, where the runtime reopens the journal itself). What must hold: the operations whose commits the failed flush covered get a typed error
//! naming the workflow and the operation, never `Ok`; the journal then stops, so nothing later
//! is reported done or read back from memory; the runtime answers every call with that error
//! instead of hanging or panicking; and once the directory is opened again every unfinished
//! workflow finishes with the right result, no step that was reported done runs again, and no
//! signal is lost or delivered twice.
//!
//! The injected failure comes after sled's own flush, in place of the file sync (what an
//! `fdatasync` failing with `EIO` looks like), so the writes of the failed flush are found on
//! disk by the next runtime; the tests rely on that where they say so.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::faults::{Faulty, Shared, reached, runs, seen, seen_ok};
use common::{id, start};
use keel_durable::{
    Context, Durability, Error, FaultInjector, ListFilter, ReopenPolicy, Runtime, RuntimeBuilder,
    StepError,
};

/// Makes step `step` of workflow `workflow` arm the injector from inside its closure, so the
/// flush that journals that very step fails.
#[derive(Clone)]
struct Trigger {
    faults: FaultInjector,
    workflow: &'static str,
    step: u64,
}

/// `chain(n, gate)`: `n` steps, `s{i}` returning `acc + i + 1`; with `gate`, a `recv("go")` of a
/// `u64` after `s0` that is added in. The result is `n (n + 1) / 2`, plus the signal's value.
fn chain(b: RuntimeBuilder, ledger: &Shared, trigger: Option<Trigger>) -> RuntimeBuilder {
    let ledger = Arc::clone(ledger);
    b.register("chain", move |ctx: Context, (n, gate): (u64, bool)| {
        let ledger = Arc::clone(&ledger);
        let trigger = trigger.clone();
        async move {
            let me = ctx.id().as_str().to_string();
            let mut acc = 0u64;
            for i in 0..n {
                let name = format!("s{i}");
                let r = ctx
                    .step(&name, || {
                        let (ledger, trigger) = (Arc::clone(&ledger), trigger.clone());
                        let (me, name) = (me.clone(), name.clone());
                        async move {
                            let v = acc + i + 1;
                            ledger.lock().unwrap().ran.push((me.clone(), name, v));
                            if let Some(t) = trigger
                                && t.workflow == me
                                && t.step == i
                            {
                                t.faults.fail_flush(0);
                            }
                            Ok::<_, StepError>(v)
                        }
                    })
                    .await;
                let seen = r.as_ref().copied().map_err(ToString::to_string);
                ledger.lock().unwrap().saw.push((me.clone(), name, seen));
                acc = r?;
                if gate && i == 0 {
                    let r = ctx.recv::<u64>("go").await;
                    let seen = r.as_ref().copied().map_err(ToString::to_string);
                    ledger
                        .lock()
                        .unwrap()
                        .saw
                        .push((me.clone(), "go".into(), seen));
                    acc += r?;
                }
            }
            Ok::<_, Error>(acc)
        }
    })
}

fn expected(n: u64, go: u64) -> u64 {
    n * (n + 1) / 2 + go
}

/// These tests are about fail-stop mode; `reopen_faults.rs` covers reopening.
fn builder(dir: &Path, durability: Durability) -> RuntimeBuilder {
    Runtime::builder(dir)
        .durability(durability)
        .reopen(ReopenPolicy::off())
        .concurrency(16)
}

impl Faulty {
    /// Opens the runtime that meets the failure: the `chain` workflow, the injector attached.
    async fn open(&self, trigger: Option<Trigger>) -> Runtime {
        let b = builder(self.path(), self.durability);
        start(chain(b, &self.ledger, trigger).fault_injector(&self.faults)).await
    }

    /// Checks that the failed runtime's shutdown reports the failure, drops it, and opens the
    /// directory again without the injector. Every handle of `failed` must be dropped first:
    /// handles keep the runtime, and so the journal's lock, alive.
    async fn reopen(&self, failed: Runtime) -> Runtime {
        assert_failed(&failed.shutdown().await.unwrap_err(), self.path(), &[]);
        drop(failed);
        start(chain(
            builder(self.path(), self.durability),
            &self.ledger,
            None,
        ))
        .await
    }
}

/// Asserts that `n` step closures are in the ledger, each of which ran exactly once.
fn assert_each_step_ran_once(ledger: &Shared, n: usize) {
    let runs = runs(ledger);
    for ((w, s), k) in &runs {
        assert_eq!(*k, 1, "step {s} of {w} ran {k} times");
    }
    assert_eq!(runs.len(), n);
}

/// Asserts `e` is the journal failure, naming `dir`, with an `io::Error` as its root cause.
fn assert_failed(e: &Error, dir: &Path, context_has: &[&str]) {
    let Error::JournalFailed { path, context, .. } = e else {
        panic!("expected JournalFailed, got {e:?}");
    };
    assert_eq!(path, dir, "{e}");
    for part in context_has {
        assert!(context.contains(part), "context {context:?} lacks {part:?}");
    }
    let storage = std::error::Error::source(e).expect("a source");
    let io = std::error::Error::source(storage)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("an io::Error under the StorageError");
    assert_eq!(io.kind(), std::io::ErrorKind::Other);
    assert!(io.to_string().contains("injected"), "{io}");
}

/// Waits until every workflow in `ids` (as `WorkflowId` displays them) is listed as abandoned.
async fn abandoned(rt: &Runtime, ids: &BTreeSet<String>) {
    for _ in 0..2000 {
        let listed: BTreeSet<String> = rt
            .issues()
            .into_iter()
            .filter(|i| i.message.contains("abandoned"))
            .filter_map(|i| i.workflow.map(|w| format!("{w:?}")))
            .collect();
        if ids.is_subset(&listed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "not every workflow of {ids:?} was abandoned: {:?}",
        rt.issues()
    );
}

async fn a_failed_step_flush_stops_the_journal_and_reopening_resumes(durability: Durability) {
    let t = Faulty::new(durability);
    let (ledger, faults) = (&t.ledger, &t.faults);
    let trigger = Trigger {
        faults: faults.clone(),
        workflow: "victim",
        step: 1,
    };
    let rt = t.open(Some(trigger)).await;
    let workflows = ["victim", "a", "b", "c"];
    for w in workflows {
        rt.start("chain", &id(w), &(4u64, true)).await.unwrap();
    }
    for w in workflows {
        reached(ledger, w, "s0").await;
    }
    // The victim's step s1 arms the injector, so the flush that journals s1 fails. The
    // handle is taken first: once the journal has failed, the runtime answers no queries.
    let victim = rt.handle(&id("victim")).unwrap();
    rt.signal(&id("victim"), "go", &100u64).await.unwrap();
    let e = victim.result::<u64>().await.unwrap_err();
    assert_failed(&e, t.path(), &[]);
    assert_eq!(faults.fired(), 1);
    assert_eq!(rt.stats().failed_flushes, 1);
    // The result reports the failure at once; the execution ends on its own, abandoned.
    abandoned(&rt, &BTreeSet::from(["\"victim\"".to_string()])).await;

    // The step whose flush failed was reported as that error, with context, and never as done.
    let s1 = seen(ledger, "victim", "s1");
    assert_eq!(s1.len(), 1, "{s1:?}");
    let message = s1[0].as_ref().unwrap_err();
    assert!(
        message.contains("journaling step \"s1\" at position 2 of workflow \"victim\""),
        "{message}"
    );
    // The abandoned execution ran nothing after the error: no s2 closure, no s2 seen.
    assert_eq!(runs(ledger).get(&("victim".into(), "s2".into())), None);
    assert!(seen(ledger, "victim", "s2").is_empty());

    // The runtime stays up and answers every call with the failure, at once.
    let r = rt.signal(&id("a"), "go", &1u64).await.unwrap_err();
    assert_failed(&r, t.path(), &["workflow \"a\""]);
    assert_failed(&rt.status(&id("a")).unwrap_err(), t.path(), &[]);
    assert_failed(&rt.history(&id("b")).unwrap_err(), t.path(), &[]);
    assert_failed(&rt.list(&ListFilter::new()).unwrap_err(), t.path(), &[]);
    let r = rt.start("chain", &id("late"), &(1u64, false)).await;
    assert_failed(&r.unwrap_err(), t.path(), &["late"]);
    assert_failed(&rt.cancel(&id("c")).await.unwrap_err(), t.path(), &[]);
    let r = rt.handle(&id("a")).unwrap_err();
    assert_failed(&r, t.path(), &[]);
    let issues = rt.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.workflow.as_deref() == Some("victim") && i.message.contains("abandoned")),
        "{issues:?}"
    );
    // Nothing was reported failed: an abandoned execution is not a failed workflow.
    assert!(
        issues
            .iter()
            .all(|i| !i.message.contains("recording the result failed"))
    );
    let ok_before = seen_ok(ledger);
    drop(victim);
    let rt = t.reopen(rt).await;
    for w in ["a", "b", "c"] {
        rt.signal(&id(w), "go", &1u64).await.unwrap();
    }
    for w in workflows {
        let go = if w == "victim" { 100 } else { 1 };
        let out: u64 = rt.handle(&id(w)).unwrap().result().await.unwrap();
        assert_eq!(out, expected(4, go), "{w}");
    }
    // s1's write reached sled's log before the injected failure, so the new runtime found it
    // and replayed it: every step's closure ran exactly once, the failed one included.
    assert_each_step_ran_once(ledger, 4 * workflows.len());
    // What the code saw succeed before the failure it sees again, with the same values.
    let ok_after = seen_ok(ledger);
    for (k, v) in &ok_before {
        assert_eq!(ok_after.get(k), Some(v), "{k:?}");
    }
    assert_eq!(seen(ledger, "victim", "s1")[1], Ok(103));
    let h = rt.history(&id("victim")).unwrap();
    assert_eq!(h.len(), 5, "{h:?}");
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_flush_stops_the_journal_and_reopening_resumes_process_crash() {
    a_failed_step_flush_stops_the_journal_and_reopening_resumes(Durability::ProcessCrash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_flush_stops_the_journal_and_reopening_resumes_power_loss() {
    a_failed_step_flush_stops_the_journal_and_reopening_resumes(Durability::PowerLoss).await;
}

/// Many workflows share flushes when one fails: whatever was reported done survives, the
/// rest is replayed or run again, and every workflow finishes with the right result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_flush_loses_no_step_reported_done() {
    const WORKFLOWS: usize = 12;
    const STEPS: u64 = 50;
    let t = Faulty::new(Durability::PowerLoss);
    let (ledger, faults) = (&t.ledger, &t.faults);
    let rt = t.open(None).await;
    // Each workflow needs at least STEPS + 2 flushes of its own (its commits are sequential),
    // so the 41st flush comes before any of them can finish.
    faults.fail_flush(40);
    let mut handles = Vec::new();
    for w in 0..WORKFLOWS {
        let name = format!("w{w}");
        match rt.start("chain", &id(&name), &(STEPS, false)).await {
            Ok(h) => handles.push(Some(h)),
            Err(e @ Error::JournalFailed { .. }) => {
                assert!(e.to_string().contains(&name), "{e}");
                handles.push(None);
            }
            Err(e) => panic!("start {name}: {e}"),
        }
    }
    let mut failed = 0;
    for h in handles.iter().flatten() {
        match h.result::<u64>().await {
            Ok(v) => assert_eq!(v, expected(STEPS, 0)),
            Err(Error::JournalFailed { .. }) => failed += 1,
            Err(e) => panic!("{}: {e}", h.id()),
        }
    }
    assert!(failed > 0, "the flush failure reached no workflow");
    assert_eq!(faults.fired(), 1);
    // A result reports the failure at once; the executions end on their own, each abandoned.
    let started: BTreeSet<String> = handles
        .iter()
        .flatten()
        .map(|h| h.id().to_string())
        .collect();
    abandoned(&rt, &started).await;
    let ok_before = seen_ok(ledger);
    let errs_before: BTreeSet<(String, String)> = ledger
        .lock()
        .unwrap()
        .saw
        .iter()
        .filter(|(_, _, r)| r.is_err())
        .map(|(w, s, _)| (w.clone(), s.clone()))
        .collect();
    assert!(!errs_before.is_empty());
    // No workflow went on after an error: each saw at most one, at its last operation.
    for (w, s) in &errs_before {
        let l = ledger.lock().unwrap();
        let last = l.saw.iter().rev().find(|(x, _, _)| x == w).unwrap();
        assert_eq!((&last.0, &last.1), (w, s));
    }
    drop(handles);
    let rt = t.reopen(rt).await;
    for w in 0..WORKFLOWS {
        // Idempotent: a start that failed may or may not have reached the disk.
        let h = rt
            .start("chain", &id(&format!("w{w}")), &(STEPS, false))
            .await
            .unwrap();
        assert_eq!(h.result::<u64>().await.unwrap(), expected(STEPS, 0));
    }
    let runs = runs(ledger);
    assert_eq!(runs.len(), WORKFLOWS * STEPS as usize);
    for (k, v) in &ok_before {
        // Reported done before the failure, so journaled: replayed, never run again.
        assert_eq!(runs.get(k), Some(&1), "step {k:?} reported done ran again");
        assert_eq!(seen_ok(ledger).get(k), Some(v));
    }
    for (k, n) in &runs {
        // A step can run a second time only if its commit did not return `Ok`.
        assert!(*n <= 2, "{k:?} ran {n} times");
        assert!(*n == 1 || !ok_before.contains_key(k), "{k:?}");
    }
    rt.shutdown().await.unwrap();
}

/// Taking a signal from the buffer and journaling its delivery is one batch; a failed flush
/// of that batch neither loses the signal nor lets it be delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_whose_delivery_flush_fails_is_delivered_exactly_once_after_reopen() {
    let t = Faulty::new(Durability::PowerLoss);
    let (ledger, faults) = (&t.ledger, &t.faults);
    let rt = t.open(None).await;
    rt.start("chain", &id("w"), &(2u64, true)).await.unwrap();
    reached(ledger, "w", "s0").await;
    // The signal's own flush succeeds; the next one, which journals its delivery, fails.
    faults.fail_flush(1);
    rt.signal(&id("w"), "go", &7u64).await.unwrap();
    let e = rt
        .handle(&id("w"))
        .unwrap()
        .result::<u64>()
        .await
        .unwrap_err();
    assert_failed(&e, t.path(), &[]);
    abandoned(&rt, &BTreeSet::from(["\"w\"".to_string()])).await;
    let go = seen(ledger, "w", "go");
    assert_eq!(go.len(), 1, "{go:?}");
    assert!(
        go[0]
            .as_ref()
            .unwrap_err()
            .contains("journaling signal \"go\" at position 1 of workflow \"w\""),
        "{go:?}"
    );
    assert_failed(&rt.pending_signals(&id("w")).unwrap_err(), t.path(), &[]);
    let rt = t.reopen(rt).await;
    assert_eq!(
        rt.handle(&id("w")).unwrap().result::<u64>().await.unwrap(),
        expected(2, 7)
    );
    let delivered = rt
        .history(&id("w"))
        .unwrap()
        .iter()
        .filter(|e| e.kind == "signal")
        .count();
    assert_eq!(delivered, 1);
    assert!(rt.pending_signals(&id("w")).unwrap().is_empty());
    assert_eq!(seen(ledger, "w", "go").last(), Some(&Ok(7)));
    rt.shutdown().await.unwrap();
}

/// A start whose flush fails does not run; after a reopen, starting the ID again runs the
/// workflow once, whether or not the first start reached the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_flush_fails_runs_once_after_reopen() {
    let t = Faulty::new(Durability::ProcessCrash);
    let (ledger, faults) = (&t.ledger, &t.faults);
    let rt = t.open(None).await;
    faults.fail_flush(0);
    let e = rt
        .start("chain", &id("w"), &(3u64, false))
        .await
        .unwrap_err();
    assert_failed(&e, t.path(), &["the start of workflow \"w\""]);
    // Give a worker that wrongly picked the workflow up a moment to show it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(ledger.lock().unwrap().ran.is_empty());
    let rt = t.reopen(rt).await;
    let h = rt.start("chain", &id("w"), &(3u64, false)).await.unwrap();
    assert_eq!(h.result::<u64>().await.unwrap(), expected(3, 0));
    assert_each_step_ran_once(ledger, 3);
    rt.shutdown().await.unwrap();
}
