//! A disk error with the default `ReopenPolicy`: the runtime closes the failed journal, opens
//! the directory again by itself and goes on, so every workflow finishes without the host
//! doing anything (`flush_faults.rs` and `write_faults.rs` cover fail-stop mode, with
//! reopening off). Failures are injected with `FaultInjector` (the `fault-injection` feature,
//! turned on for these tests by the crate's dev-dependency on itself).
//!
//! What must hold: the operation that met the failure gets `Error::JournalFailed` with its
//! context and is not reported done; no step reported done ever runs again (each step closure
//! checks, when it starts, that the code was never told it completed); every workflow ends
//! with the right result, and a handle taken before the failure returns it; `stats()` and
//! `issues()` say what happened; calls made while the journal is reopened get the retryable
//! `Error::Recovering`; and a failure that persists exhausts the attempts and leaves the
//! runtime failed with a typed error, after which a reopen by the host still finishes the work.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::faults::{Faulty, Shared, note, reached, runs, seen};
use common::{id, start};
use keel_durable::{
    Context, Durability, Error, FaultInjector, Handle, ReopenPolicy, Runtime, RuntimeBuilder,
    StepError, WorkflowId,
};

/// Makes step `step` of workflow `workflow` arm the injector from inside its closure, the
/// first time it runs (the step runs again after the reopen if its journaling failed).
#[derive(Clone)]
struct Trigger {
    workflow: &'static str,
    step: &'static str,
    arm: fn(&FaultInjector),
    armed: Arc<AtomicBool>,
}

impl Trigger {
    fn new(workflow: &'static str, step: &'static str, arm: fn(&FaultInjector)) -> Self {
        Self {
            workflow,
            step,
            arm,
            armed: Arc::default(),
        }
    }
}

/// Where a leaky workflow puts its `Context`, to keep the journal of its execution in use.
type Leak = Arc<Mutex<Option<Context>>>;

/// A step that records its run, and what the code saw. Its closure first records a
/// violation in `ran` under the step name `RERUN <name>` if the code was already told the
/// step completed: that is the one thing a reopen must never cause.
async fn step(
    ctx: &Context,
    t: &Faulty,
    trigger: Option<&Trigger>,
    name: &str,
    v: u64,
) -> Result<u64, Error> {
    let me = ctx.id().as_str().to_string();
    let r = ctx
        .step(name, || {
            let (ledger, faults, trigger) =
                (Arc::clone(&t.ledger), t.faults.clone(), trigger.cloned());
            let (me, name) = (me.clone(), name.to_string());
            async move {
                let done_before = seen(&ledger, &me, &name).iter().any(Result::is_ok);
                let mut l = ledger.lock().unwrap();
                if done_before {
                    l.ran.push((me.clone(), format!("RERUN {name}"), v));
                }
                l.ran.push((me.clone(), name.clone(), v));
                drop(l);
                if let Some(t) = trigger
                    && t.workflow == me
                    && t.step == name
                    && !t.armed.swap(true, Ordering::SeqCst)
                {
                    (t.arm)(&faults);
                }
                Ok::<_, StepError>(v)
            }
        })
        .await;
    note(&t.ledger, &me, name, &r);
    r
}

/// `chain(n, gate)`: `n` steps, `s{i}` returning `acc + i + 1`; with `gate`, a `recv("go")`
/// of a `u64` after `s0` that is added in. The result is `n (n + 1) / 2`, plus the signal.
/// `leaky(n)`: as `chain(n, true)`, but it first leaves a clone of its `Context` in `leak`.
fn workflows(t: &Arc<Faulty>, trigger: Option<Trigger>, leak: &Leak) -> RuntimeBuilder {
    let b = Runtime::builder(t.path())
        .durability(t.durability)
        .concurrency(16);
    let (t1, tr) = (Arc::clone(t), trigger);
    let b = b.register("chain", move |ctx: Context, (n, gate): (u64, bool)| {
        let (t, trigger) = (Arc::clone(&t1), tr.clone());
        async move { chain(&ctx, &t, trigger.as_ref(), n, gate).await }
    });
    let (t2, leak) = (Arc::clone(t), Arc::clone(leak));
    b.register("leaky", move |ctx: Context, n: u64| {
        let (t, leak) = (Arc::clone(&t2), Arc::clone(&leak));
        async move {
            leak.lock().unwrap().get_or_insert_with(|| ctx.clone());
            chain(&ctx, &t, None, n, true).await
        }
    })
}

async fn chain(
    ctx: &Context,
    t: &Faulty,
    trigger: Option<&Trigger>,
    n: u64,
    gate: bool,
) -> Result<u64, Error> {
    let me = ctx.id().as_str().to_string();
    let mut acc = 0u64;
    for i in 0..n {
        acc = step(ctx, t, trigger, &format!("s{i}"), acc + i + 1).await?;
        if gate && i == 0 {
            let r = ctx.recv::<u64>("go").await;
            note(&t.ledger, &me, "go", &r);
            acc += r?;
        }
    }
    Ok(acc)
}

fn expected(n: u64, go: u64) -> u64 {
    n * (n + 1) / 2 + go
}

/// Opens a runtime with the default reopen policy (or `policy`), the injector attached and a
/// worker running.
async fn open(t: &Arc<Faulty>, trigger: Option<Trigger>, policy: Option<ReopenPolicy>) -> Runtime {
    let b = workflows(t, trigger, &Leak::default()).fault_injector(&t.faults);
    start(match policy {
        Some(p) => b.reopen(p),
        None => b,
    })
    .await
}

/// Asserts that no step closure ran after the code was told its step completed.
fn assert_no_step_reported_done_ran_again(ledger: &Shared) {
    let reran: Vec<_> = runs(ledger)
        .into_keys()
        .filter(|(_, s)| s.starts_with("RERUN"))
        .collect();
    assert!(reran.is_empty(), "steps reported done ran again: {reran:?}");
}

/// Asserts `e` carries the injected failure (an `io::Error` of kind `Other`) as its root.
fn assert_injected(e: &Error) {
    let storage = std::error::Error::source(e).expect("a source");
    let io = std::error::Error::source(storage)
        .and_then(|s| s.downcast_ref::<std::io::Error>())
        .expect("an io::Error under the StorageError");
    assert_eq!(io.kind(), std::io::ErrorKind::Other);
    assert!(io.to_string().contains("injected"), "{io}");
}

/// The issue messages, without workflow.
fn runtime_issues(rt: &Runtime) -> Vec<String> {
    rt.issues()
        .into_iter()
        .filter(|i| i.workflow.is_none())
        .map(|i| i.message)
        .collect()
}

/// Waits until `rt.stats().reopens` reaches `n`.
async fn reopened(rt: &Runtime, n: u64) {
    for _ in 0..2000 {
        if rt.stats().reopens >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "the journal was not reopened {n} time(s): {:?}",
        rt.issues()
    );
}

/// Calls `f` until it returns something other than `Error::Recovering`.
async fn retry<T, F, Fut>(mut f: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    for _ in 0..2000 {
        match f().await {
            Err(Error::Recovering { .. }) => tokio::time::sleep(Duration::from_millis(5)).await,
            r => return r,
        }
    }
    panic!("the journal stayed in recovery");
}

/// Starts `chain(steps, false)` under `w0..wN`, keeping every handle the host got.
async fn start_all(rt: &Runtime, n: usize, steps: u64) -> Vec<(WorkflowId, Option<Handle>)> {
    let mut out = Vec::new();
    for w in 0..n {
        let wid = id(&format!("w{w}"));
        // A start that meets the failure is not done; the host retries it below, and the ID
        // makes that safe.
        let h = rt.start("chain", &wid, &(steps, false)).await.ok();
        out.push((wid, h));
    }
    out
}

/// Every workflow finishes with the right result, through the handle the host held from
/// before the failure where it has one; a start that failed is retried (idempotent by ID).
async fn finish_all(rt: &Runtime, started: Vec<(WorkflowId, Option<Handle>)>, steps: u64) {
    for (wid, h) in started {
        let h = match h {
            Some(h) => h,
            None => retry(|| async { rt.start("chain", &wid, &(steps, false)).await })
                .await
                .unwrap(),
        };
        let out = h.result::<u64>().await;
        assert_eq!(out.unwrap(), expected(steps, 0), "{wid}");
    }
}

/// A write is refused while twelve workflows are busy: without the host reopening anything,
/// every workflow finishes with the right result, each through the handle the host took
/// before the failure, no step reported done runs again, and the runtime says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_among_busy_workflows_heals_without_the_host() {
    const WORKFLOWS: usize = 12;
    const STEPS: u64 = 30;
    let t = Arc::new(Faulty::new(Durability::ProcessCrash));
    // w5's step s15 arms the fault from inside its closure: the next write is refused.
    let trigger = Trigger::new("w5", "s15", |f| f.fail_write(0));
    let rt = open(&t, Some(trigger), None).await;
    let started = start_all(&rt, WORKFLOWS, STEPS).await;
    assert!(
        started.iter().all(|(_, h)| h.is_some()),
        "no start can meet the failure"
    );
    finish_all(&rt, started, STEPS).await;

    assert_eq!(t.faults.fired_writes(), 1);
    assert_eq!(t.faults.fired(), 0);
    let stats = rt.stats();
    assert!(stats.reopens >= 1, "{stats:?}");
    assert_eq!(stats.failed_flushes, 0);
    assert_no_step_reported_done_ran_again(&t.ledger);
    // Every step ran, at most twice (once more only if its journaling did not return `Ok`).
    let runs = runs(&t.ledger);
    assert_eq!(runs.len(), WORKFLOWS * STEPS as usize);
    assert!(runs.values().all(|n| *n <= 2), "{runs:?}");
    // w5's s15 met the failure (its write, or the stopped journal) with its context.
    let s15 = seen(&t.ledger, "w5", "s15");
    let first = s15[0].as_ref().unwrap_err();
    assert!(
        first.contains("journaling step \"s15\" at position 15 of workflow \"w5\""),
        "{first}"
    );
    assert_eq!(s15.last(), Some(&Ok(expected(16, 0))));
    // The runtime says what happened: w5's execution was abandoned, not failed, and the
    // journal was reopened after the injected failure.
    let issues = rt.issues();
    assert!(
        issues
            .iter()
            .any(|i| i.workflow.as_deref() == Some("w5") && i.message.contains("abandoned")),
        "{issues:?}"
    );
    assert!(
        runtime_issues(&rt).iter().any(|m| m.contains("reopened as generation 1")
            && m.contains("injected write failure")),
        "{issues:?}"
    );
    rt.shutdown().await.unwrap();
}

/// A flush fails while twelve workflows share flushes: as for a refused write, everything
/// finishes without the host, through the handles it held, and nothing reported done reruns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_flush_among_busy_workflows_heals_without_the_host() {
    const WORKFLOWS: usize = 12;
    const STEPS: u64 = 50;
    let t = Arc::new(Faulty::new(Durability::PowerLoss));
    let rt = open(&t, None, None).await;
    // Each workflow needs at least STEPS + 2 flushes of its own, so the 41st comes before
    // any of them can finish.
    t.faults.fail_flush(40);
    let started = start_all(&rt, WORKFLOWS, STEPS).await;
    finish_all(&rt, started, STEPS).await;

    assert_eq!(t.faults.fired(), 1);
    let stats = rt.stats();
    assert!(stats.reopens >= 1, "{stats:?}");
    assert_eq!(stats.failed_flushes, 1, "{stats:?}");
    assert_no_step_reported_done_ran_again(&t.ledger);
    let runs = runs(&t.ledger);
    assert_eq!(runs.len(), WORKFLOWS * STEPS as usize);
    assert!(runs.values().all(|n| *n <= 2), "{runs:?}");
    // Some operation met the failed flush, with its workflow and operation named.
    let errors: Vec<String> = t
        .ledger
        .lock()
        .unwrap()
        .saw
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().err().cloned())
        .collect();
    // The flush's waiters get the failure, unless the reopen aborted their executions first
    // (they are abandoned then, and listed as such).
    let abandoned = rt.issues().iter().any(|i| i.message.contains("abandoned"));
    assert!(
        !errors.is_empty() || abandoned,
        "the failed flush reached no workflow"
    );
    for e in &errors {
        // Named either by the flush it waited on ("journaling step ...") or by the check of
        // the failed journal ("step ... of workflow ..."), depending on which it met first.
        assert!(e.contains("step \"s"), "{e}");
    }
    assert!(
        runtime_issues(&rt)
            .iter()
            .any(|m| m.contains("reopened as generation 1")),
        "{:?}",
        rt.issues()
    );
    rt.shutdown().await.unwrap();
}

/// The injector stays attached across a reopen: a refused write heals, then a failed flush
/// heals too. A signal whose flush failed got `JournalFailed` but reached the disk, so it is
/// delivered once after the reopen (sending it again would deliver it twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_failure_after_healing_heals_too() {
    let t = Arc::new(Faulty::new(Durability::ProcessCrash));
    let rt = open(&t, None, None).await;
    let workflows = ["victim", "a", "b", "c"];
    let mut handles = Vec::new();
    for w in workflows {
        handles.push(rt.start("chain", &id(w), &(4u64, true)).await.unwrap());
    }
    for w in workflows {
        reached(&t.ledger, w, "s0").await;
    }
    // The signal's own write is refused.
    t.faults.fail_write(0);
    let e = rt.signal(&id("victim"), "go", &100u64).await.unwrap_err();
    let Error::JournalFailed { context, .. } = &e else {
        panic!("expected JournalFailed, got {e:?}");
    };
    assert!(
        context.contains("signal \"go\" for workflow \"victim\""),
        "{context}"
    );
    assert_injected(&e);
    reopened(&rt, 1).await;
    // Refused writes apply nothing, so the signal is not there; sending it again is right.
    assert!(rt.pending_signals(&id("victim")).unwrap().is_empty());
    retry(|| async { rt.signal(&id("victim"), "go", &100u64).await })
        .await
        .unwrap();

    // The next flush, the one that covers this signal, fails after its write reached sled.
    t.faults.fail_flush(0);
    let e = retry(|| async { rt.signal(&id("a"), "go", &1u64).await })
        .await
        .unwrap_err();
    assert!(matches!(e, Error::JournalFailed { .. }), "{e:?}");
    reopened(&rt, 2).await;
    let pending = retry(|| async { rt.pending_signals(&id("a")) })
        .await
        .unwrap();
    let history = rt.history(&id("a")).unwrap();
    let delivered = history.iter().filter(|e| e.kind == "signal").count();
    assert_eq!(pending.len() + delivered, 1, "{pending:?} {history:?}");
    for w in ["b", "c"] {
        retry(|| async { rt.signal(&id(w), "go", &1u64).await })
            .await
            .unwrap();
    }
    for (w, h) in workflows.iter().zip(handles) {
        let go = if *w == "victim" { 100 } else { 1 };
        assert_eq!(h.result::<u64>().await.unwrap(), expected(4, go), "{w}");
    }
    assert_eq!((t.faults.fired_writes(), t.faults.fired()), (1, 1));
    let stats = rt.stats();
    assert_eq!((stats.reopens, stats.failed_flushes), (2, 1), "{stats:?}");
    assert!(
        runtime_issues(&rt)
            .iter()
            .any(|m| m.contains("reopened as generation 2")),
        "{:?}",
        rt.issues()
    );
    assert_no_step_reported_done_ran_again(&t.ledger);
    rt.shutdown().await.unwrap();
}

/// While the failed journal is still in use (here, by a `Context` the workflow leaked), the
/// runtime cannot reopen it: calls return the retryable `Error::Recovering` naming the
/// directory, the attempt and the failure, the attempt fails and says why, and once the
/// reference is dropped the next attempt reopens the journal and the workflow finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_during_a_reopen_get_a_retryable_error_and_a_held_journal_delays_it() {
    let t = Arc::new(Faulty::new(Durability::ProcessCrash));
    let leak = Leak::default();
    let policy = ReopenPolicy::new()
        .max_attempts(4)
        .backoff(Duration::from_millis(10), Duration::from_millis(10));
    let b = workflows(&t, None, &leak)
        .fault_injector(&t.faults)
        .reopen(policy);
    let rt = start(b).await;
    let h = rt.start("leaky", &id("l"), &3u64).await.unwrap();
    reached(&t.ledger, "l", "s0").await;
    t.faults.fail_write(0);
    let e = rt.signal(&id("l"), "go", &5u64).await.unwrap_err();
    assert!(matches!(e, Error::JournalFailed { .. }), "{e:?}");

    // The leaked context holds the failed journal, so every call now gets `Recovering`.
    let e = rt.status(&id("l")).unwrap_err();
    let Error::Recovering { path, attempt, .. } = &e else {
        panic!("expected Recovering, got {e:?}");
    };
    assert_eq!(path, t.path());
    assert!(*attempt >= 1, "{e}");
    assert_injected(&e);
    let e = rt.signal(&id("l"), "go", &5u64).await.unwrap_err();
    assert!(matches!(e, Error::Recovering { .. }), "{e:?}");
    let e = rt
        .start("chain", &id("late"), &(1u64, false))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Recovering { .. }), "{e:?}");
    // The first attempt gives up waiting for the journal to be released, and says why.
    for _ in 0..2000 {
        if runtime_issues(&rt)
            .iter()
            .any(|m| m.contains("still in use"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        runtime_issues(&rt)
            .iter()
            .any(|m| m.contains("reopen attempt 1") && m.contains("still in use by 1 holder")),
        "{:?}",
        rt.issues()
    );
    assert_eq!(rt.stats().reopens, 0);
    // Letting go of it lets the next attempt reopen the journal.
    let leaked = leak.lock().unwrap().take();
    drop(leaked);
    reopened(&rt, 1).await;
    retry(|| async { rt.signal(&id("l"), "go", &5u64).await })
        .await
        .unwrap();
    assert_eq!(h.result::<u64>().await.unwrap(), expected(3, 5));
    assert_eq!(rt.stats().reopens, 1);
    assert_no_step_reported_done_ran_again(&t.ledger);
    // The workflow left its new context in the slot; the runtime shuts down all the same.
    rt.shutdown().await.unwrap();
    drop(leak.lock().unwrap().take());
}

#[derive(Clone, Copy, Debug)]
enum Persisting {
    Writes,
    Flushes,
}

/// A disk that does not come back: every reopened journal fails before any flush of it
/// succeeds (the workflow's replay journals its step `s1` again, and that fails), so the
/// attempts run out, and the runtime stays failed and says so with a typed error. Once the
/// disk is back, the host's reopen finishes the work.
async fn a_failure_that_persists_exhausts_the_attempts(kind: Persisting) {
    let t = Arc::new(Faulty::new(Durability::ProcessCrash));
    let policy = ReopenPolicy::new()
        .max_attempts(3)
        .backoff(Duration::from_millis(1), Duration::from_millis(4));
    let arm: fn(&FaultInjector) = match kind {
        Persisting::Writes => |f| f.fail_every_write(),
        Persisting::Flushes => |f| f.fail_every_flush(),
    };
    let rt = open(&t, Some(Trigger::new("w", "s1", arm)), Some(policy)).await;
    let h = rt.start("chain", &id("w"), &(10u64, false)).await.unwrap();
    // The held handle waits across the attempts and then reports the failure.
    let e = h.result::<u64>().await.unwrap_err();
    let Error::JournalFailed { path, context, .. } = &e else {
        panic!("{kind:?}: expected JournalFailed, got {e:?}");
    };
    assert_eq!(path, t.path());
    assert!(
        context.contains("gave up opening it again after 3 failed attempt(s)"),
        "{kind:?}: {context}"
    );
    assert!(
        context.contains("failed again before any flush"),
        "{kind:?}: {context}"
    );
    assert_injected(&e);
    let e = rt.status(&id("w")).unwrap_err();
    assert!(matches!(e, Error::JournalFailed { .. }), "{kind:?}: {e:?}");
    let e = rt
        .start("chain", &id("late"), &(1u64, false))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::JournalFailed { .. }), "{kind:?}: {e:?}");
    assert_eq!(
        rt.stats().reopens,
        3,
        "{kind:?}: every reopen opened, then failed"
    );
    assert!(
        runtime_issues(&rt).iter().any(|m| m.contains("gave up")),
        "{kind:?}: {:?}",
        rt.issues()
    );
    // The workflow met the failure once per journal generation: at s1 every time when
    // writes are refused. When flushes fail, each step's write reached sled before its flush
    // failed, so the next generation replays it and fails at the step after (a reopened
    // journal trusts what the disk gives back, as after a crash); ten steps are enough work
    // for every attempt to meet the failure.
    let errors: Vec<_> = t
        .ledger
        .lock()
        .unwrap()
        .saw
        .iter()
        .filter(|(_, _, r)| r.is_err())
        .map(|(_, op, _)| op.clone())
        .collect();
    let want = match kind {
        Persisting::Writes => ["s1", "s1", "s1", "s1"],
        Persisting::Flushes => ["s1", "s2", "s3", "s4"],
    };
    assert_eq!(errors, want, "{kind:?}");
    assert!(matches!(
        rt.shutdown().await,
        Err(Error::JournalFailed { .. })
    ));
    drop((h, rt));

    // The disk is back: the host opens the directory again and the workflow finishes.
    t.faults.disarm();
    let rt = open(&t, None, None).await;
    let h = rt.handle(&id("w")).unwrap();
    assert_eq!(
        h.result::<u64>().await.unwrap(),
        expected(10, 0),
        "{kind:?}"
    );
    assert_no_step_reported_done_ran_again(&t.ledger);
    rt.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_failure_that_persists_exhausts_the_attempts() {
    a_failure_that_persists_exhausts_the_attempts(Persisting::Writes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_failure_that_persists_exhausts_the_attempts() {
    a_failure_that_persists_exhausts_the_attempts(Persisting::Flushes).await;
}

/// A sequence number that cannot be taken stops the journal like a failed write: the start
/// that met it gets `JournalFailed`, and the runtime reopens the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sequence_number_stops_the_journal_and_heals() {
    let t = Arc::new(Faulty::new(Durability::ProcessCrash));
    let rt = open(&t, None, None).await;
    t.faults.fail_sequence(0);
    let e = rt
        .start("chain", &id("w"), &(2u64, false))
        .await
        .unwrap_err();
    let Error::JournalFailed { context, .. } = &e else {
        panic!("expected JournalFailed, got {e:?}");
    };
    assert!(context.contains("the start of workflow \"w\""), "{context}");
    assert_injected(&e);
    assert_eq!(t.faults.fired_sequences(), 1);
    reopened(&rt, 1).await;
    let h = retry(|| async { rt.start("chain", &id("w"), &(2u64, false)).await })
        .await
        .unwrap();
    assert_eq!(h.result::<u64>().await.unwrap(), expected(2, 0));
    rt.shutdown().await.unwrap();
}

/// With reopening off the runtime stays failed, as in fail-stop mode, and never reopens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_reopening_off_the_runtime_stays_failed() {
    let t = Arc::new(Faulty::new(Durability::ProcessCrash));
    let rt = open(&t, None, Some(ReopenPolicy::off())).await;
    let h = rt.start("chain", &id("w"), &(2u64, true)).await.unwrap();
    reached(&t.ledger, "w", "s0").await;
    t.faults.fail_write(0);
    assert!(rt.signal(&id("w"), "go", &1u64).await.is_err());
    let e = h.result::<u64>().await.unwrap_err();
    assert!(matches!(e, Error::JournalFailed { .. }), "{e:?}");
    let e = rt.status(&id("w")).unwrap_err();
    assert!(matches!(e, Error::JournalFailed { .. }), "{e:?}");
    assert_eq!(rt.stats().reopens, 0);
    assert!(rt.shutdown().await.is_err());
}
