//! A disk error while the journal *writes* (sled refuses an insert or a batch), injected with
//! `FaultInjector::fail_write` (the crate's `fault-injection` feature, turned on for these
//! tests by the crate's dev-dependency on itself). `flush_faults.rs` covers failed flushes.
//!
//! These tests run with `ReopenPolicy::off()`, the fail-stop mode (`reopen_faults.rs` covers
//! the default, where the runtime reopens the journal itself). The design (see
//! `Error::JournalFailed` and `docs/durable.md`) is the same as for a failed flush: the operation whose write failed gets `Error::JournalFailed` naming the
//! journal, the workflow and the operation, and is not reported done; the journal takes no
//! more writes, so every other operation on that runtime gets the same error and runs
//! nothing; executions in flight are abandoned, not recorded as failed; and once the
//! directory is opened again every unfinished workflow, the one whose write failed and the
//! others alike, runs to completion with the right result.
//!
//! An injected write failure applies nothing, so after it the journal must hold none of the
//! refused write; each test reopens the directory *without a worker* first and inspects the
//! journal before anything can run, so a logical change that was split over several writes
//! (and so half-applied) would show.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::faults::{Faulty, Shared, note, reached, runs, seen, seen_ok};
use common::{id, start};
use keel_durable::{
    Context, Durability, Error, FaultInjector, ListFilter, ReopenPolicy, Runtime, RuntimeBuilder,
    StepError, WorkflowStatus,
};

/// Makes step `step` of workflow `workflow` arm the write fault from inside its closure:
/// `after` more writes succeed (the step's own journaling is the first of them), then one fails.
#[derive(Clone)]
struct Trigger {
    faults: FaultInjector,
    workflow: &'static str,
    step: &'static str,
    after: u64,
}

impl Trigger {
    fn fire(&self, workflow: &str, step: &str) {
        if self.workflow == workflow && self.step == step {
            self.faults.fail_write(self.after);
        }
    }
}

/// A step that records its run in the ledger and returns `v`, and what the code saw.
async fn step(
    ctx: &Context,
    ledger: &Shared,
    trigger: Option<&Trigger>,
    name: &str,
    v: u64,
) -> Result<u64, Error> {
    let me = ctx.id().as_str().to_string();
    let r = ctx
        .step(name, || {
            let (ledger, trigger) = (Arc::clone(ledger), trigger.cloned());
            let (me, name) = (me.clone(), name.to_string());
            async move {
                ledger
                    .lock()
                    .unwrap()
                    .ran
                    .push((me.clone(), name.clone(), v));
                if let Some(t) = trigger {
                    t.fire(&me, &name);
                }
                Ok::<_, StepError>(v)
            }
        })
        .await;
    note(ledger, &me, name, &r);
    r
}

/// Registers the three workflows the tests use:
/// - `chain(n, gate)`: `n` steps, `s{i}` returning `acc + i + 1`; with `gate`, a `recv("go")`
///   of a `u64` after `s0` that is added in. The result is `n (n + 1) / 2`, plus the signal.
/// - `parent(x)`: step `s0`, step `arm`, then child `kid(x)` (at position 2), returning the
///   child's output plus 1.
/// - `kid(x)`: with `x == 0`, waits for `recv("go")` and returns it; otherwise step `k`
///   returning `10 x`.
fn workflows(b: RuntimeBuilder, ledger: &Shared, trigger: Option<&Trigger>) -> RuntimeBuilder {
    let (l, t) = (Arc::clone(ledger), trigger.cloned());
    let b = b.register("chain", move |ctx: Context, (n, gate): (u64, bool)| {
        let (ledger, trigger) = (Arc::clone(&l), t.clone());
        async move {
            let me = ctx.id().as_str().to_string();
            let mut acc = 0u64;
            for i in 0..n {
                acc = step(
                    &ctx,
                    &ledger,
                    trigger.as_ref(),
                    &format!("s{i}"),
                    acc + i + 1,
                )
                .await?;
                if gate && i == 0 {
                    let r = ctx.recv::<u64>("go").await;
                    note(&ledger, &me, "go", &r);
                    acc += r?;
                }
            }
            Ok::<_, Error>(acc)
        }
    });
    let (l, t) = (Arc::clone(ledger), trigger.cloned());
    let b = b.register("parent", move |ctx: Context, x: u64| {
        let (ledger, trigger) = (Arc::clone(&l), t.clone());
        async move {
            let me = ctx.id().as_str().to_string();
            step(&ctx, &ledger, trigger.as_ref(), "s0", 1).await?;
            step(&ctx, &ledger, trigger.as_ref(), "arm", 2).await?;
            let r = ctx.child::<u64, u64>("kid", &x).await;
            note(&ledger, &me, "kid", &r);
            Ok::<_, Error>(r? + 1)
        }
    });
    let l = Arc::clone(ledger);
    b.register("kid", move |ctx: Context, x: u64| {
        let ledger = Arc::clone(&l);
        async move {
            if x == 0 {
                let r = ctx.recv::<u64>("go").await;
                note(&ledger, ctx.id().as_str(), "go", &r);
                return r;
            }
            step(&ctx, &ledger, None, "k", 10 * x).await
        }
    })
}

fn expected(n: u64, go: u64) -> u64 {
    n * (n + 1) / 2 + go
}

impl Faulty {
    fn builder(&self, trigger: Option<&Trigger>) -> RuntimeBuilder {
        // These tests are about fail-stop mode; `reopen_faults.rs` covers reopening.
        let b = Runtime::builder(self.path())
            .durability(self.durability)
            .reopen(ReopenPolicy::off())
            .concurrency(16);
        workflows(b, &self.ledger, trigger)
    }

    /// Opens a runtime with the injector attached and a worker running.
    async fn open(&self, trigger: Option<&Trigger>) -> Runtime {
        start(self.builder(trigger).fault_injector(&self.faults)).await
    }

    /// Checks that the failed runtime's shutdown reports the failure, drops it, and opens the
    /// directory again with no injector and *no worker*, so the journal can be inspected
    /// before anything runs; [`run`] starts the worker. Every handle of `failed` must be
    /// dropped first: handles keep the runtime, and so the journal's lock, alive.
    async fn reopen_idle(&self, failed: Runtime) -> Runtime {
        assert_failed(&failed.shutdown().await.unwrap_err(), self.path(), &[]);
        drop(failed);
        self.builder(None).open().await.unwrap()
    }
}

/// Starts the worker of a runtime opened by [`Faulty::reopen_idle`].
fn run(rt: &Runtime) {
    tokio::spawn(rt.worker().unwrap().run());
}

/// Asserts `e` is the journal failure, naming `dir`, with the injected write failure (an
/// `io::Error` of kind `Other`) as its root cause, and `context_has` in its context.
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
    assert!(io.to_string().contains("injected write failure"), "{io}");
}

/// Asserts that the injector refused exactly one write and failed no flush: the tests are
/// about the write path, and must not pass because a flush failed instead.
fn assert_one_write_failed(t: &Faulty, rt: &Runtime) {
    assert_eq!(t.faults.fired_writes(), 1, "the armed write never came");
    assert_eq!(t.faults.fired(), 0);
    assert_eq!(rt.stats().failed_flushes, 0);
}

/// Waits until every workflow in `ids` is listed as abandoned by `rt.issues()`, and checks
/// that no workflow was recorded as failed because of the journal.
async fn abandoned(rt: &Runtime, ids: &[&str]) {
    let want: BTreeSet<&str> = ids.iter().copied().collect();
    for _ in 0..2000 {
        let issues = rt.issues();
        assert!(
            issues
                .iter()
                .all(|i| !i.message.contains("recording the result failed")),
            "{issues:?}"
        );
        let listed: BTreeSet<&str> = issues
            .iter()
            .filter(|i| i.message.contains("abandoned"))
            .filter_map(|i| i.workflow.as_deref())
            .collect();
        if want.iter().all(|w| listed.contains(w)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!(
        "not every workflow of {ids:?} was abandoned: {:?}",
        rt.issues()
    );
}

/// The journal of `w` as `kind name` strings.
fn journal(rt: &Runtime, w: &str) -> Vec<String> {
    rt.history(&id(w))
        .unwrap()
        .iter()
        .map(|e| format!("{} {}", e.kind, e.name))
        .collect()
}

/// A step's journaling is refused (a lone `insert`) while three other workflows wait for a
/// signal. The step's caller gets the typed error naming the workflow, the step and its
/// position; nothing of the step is journaled; the workflow is abandoned, not failed; the other
/// workflows get the same error on this runtime; after a reopen all four finish correctly and
/// only the step whose journaling failed runs a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_step_write_applies_nothing_and_every_workflow_finishes_after_reopen() {
    let t = Faulty::new(Durability::ProcessCrash);
    let ledger = &t.ledger;
    let trigger = Trigger {
        faults: t.faults.clone(),
        workflow: "victim",
        step: "s1",
        after: 0,
    };
    let rt = t.open(Some(&trigger)).await;
    let workflows = ["victim", "a", "b", "c"];
    let mut victim = None;
    for w in workflows {
        let h = rt.start("chain", &id(w), &(4u64, true)).await.unwrap();
        if w == "victim" {
            victim = Some(h);
        }
    }
    for w in workflows {
        reached(ledger, w, "s0").await;
    }
    // The victim's step s1 arms the fault, so the write that journals s1 is refused. (The
    // handle is taken before: once the journal has failed, `Runtime::handle` fails too.)
    let victim = victim.unwrap();
    rt.signal(&id("victim"), "go", &100u64).await.unwrap();
    let e = victim.result::<u64>().await.unwrap_err();
    assert_failed(&e, t.path(), &["workflow \"victim\""]);
    assert_one_write_failed(&t, &rt);
    abandoned(&rt, &["victim"]).await;

    // The step's caller got the error with its context, once, and never `Ok`.
    let s1 = seen(ledger, "victim", "s1");
    assert_eq!(s1.len(), 1, "{s1:?}");
    let message = s1[0].as_ref().unwrap_err();
    assert!(
        message.contains("journaling step \"s1\" at position 2 of workflow \"victim\""),
        "{message}"
    );
    // Nothing ran after the error.
    assert_eq!(runs(ledger).get(&("victim".into(), "s2".into())), None);
    // The other workflows meet the stopped journal too, each error naming its workflow.
    let r = rt.signal(&id("a"), "go", &1u64).await.unwrap_err();
    assert_failed(&r, t.path(), &["workflow \"a\""]);
    assert_failed(&rt.status(&id("b")).unwrap_err(), t.path(), &[]);
    let r = rt.start("chain", &id("late"), &(1u64, false)).await;
    assert_failed(&r.unwrap_err(), t.path(), &["workflow \"late\""]);
    let ok_before = seen_ok(ledger);
    drop(victim);

    let rt = t.reopen_idle(rt).await;
    // None of the refused write is on disk: the victim's journal ends at the signal, and it is
    // still running (abandoned, not failed); the others are where they were.
    assert_eq!(journal(&rt, "victim"), ["step s0", "signal go"]);
    assert_eq!(
        rt.status(&id("victim")).unwrap().status,
        WorkflowStatus::Running
    );
    for w in ["a", "b", "c"] {
        assert_eq!(journal(&rt, w), ["step s0"], "{w}");
    }
    assert!(
        matches!(rt.status(&id("late")), Err(Error::NotFound { .. })),
        "the start refused by the stopped journal left a record"
    );
    run(&rt);
    for w in ["a", "b", "c"] {
        rt.signal(&id(w), "go", &1u64).await.unwrap();
    }
    for w in workflows {
        let go = if w == "victim" { 100 } else { 1 };
        let out: u64 = rt.handle(&id(w)).unwrap().result().await.unwrap();
        assert_eq!(out, expected(4, go), "{w}");
    }
    // s1's outcome never reached the journal, so it ran again; every other step ran once.
    let runs = runs(ledger);
    assert_eq!(runs.len(), 4 * workflows.len());
    for ((w, s), n) in &runs {
        let want = if (w.as_str(), s.as_str()) == ("victim", "s1") {
            2
        } else {
            1
        };
        assert_eq!(*n, want, "step {s} of {w}");
    }
    let ok_after = seen_ok(ledger);
    for (k, v) in &ok_before {
        assert_eq!(ok_after.get(k), Some(v), "{k:?}");
    }
    assert_eq!(seen(ledger, "victim", "s1").last(), Some(&Ok(103)));
    assert_eq!(rt.history(&id("victim")).unwrap().len(), 5);
    rt.shutdown().await.unwrap();
}

/// Taking a signal from the buffer and journaling its delivery is one two-key batch; when
/// that batch is refused, neither half is applied: the signal is still buffered and no
/// delivery is journaled. After a reopen it is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_signal_delivery_batch_applies_neither_half() {
    let t = Faulty::new(Durability::PowerLoss);
    let ledger = &t.ledger;
    let rt = t.open(None).await;
    let h = rt.start("chain", &id("w"), &(2u64, true)).await.unwrap();
    reached(ledger, "w", "s0").await;
    // The signal's own write succeeds; the next one, the delivery batch, is refused.
    t.faults.fail_write(1);
    // The workflow can take the signal as soon as it is written, before its flush completes;
    // the send then fails too, with the stopped journal (the signal's write was applied, and
    // sled writes it out when the failed runtime closes, so it is still found below).
    match rt.signal(&id("w"), "go", &7u64).await {
        Ok(()) => {}
        Err(e) => assert_failed(&e, t.path(), &["workflow \"w\""]),
    }
    let e = h.result::<u64>().await.unwrap_err();
    assert_failed(&e, t.path(), &["workflow \"w\""]);
    assert_one_write_failed(&t, &rt);
    abandoned(&rt, &["w"]).await;
    let go = seen(ledger, "w", "go");
    assert_eq!(go.len(), 1, "{go:?}");
    let message = go[0].as_ref().unwrap_err();
    assert!(
        message.contains("journaling signal \"go\" at position 1 of workflow \"w\""),
        "{message}"
    );
    drop(h);

    let rt = t.reopen_idle(rt).await;
    let pending = rt.pending_signals(&id("w")).unwrap();
    assert_eq!(
        pending.len(),
        1,
        "the signal was taken from the buffer: {pending:?}"
    );
    assert_eq!(
        (pending[0].name.as_str(), pending[0].value.as_str()),
        ("go", "7")
    );
    assert_eq!(journal(&rt, "w"), ["step s0"], "the delivery was journaled");
    run(&rt);
    let out: u64 = rt.handle(&id("w")).unwrap().result().await.unwrap();
    assert_eq!(out, expected(2, 7));
    assert_eq!(journal(&rt, "w"), ["step s0", "signal go", "step s1"]);
    assert!(rt.pending_signals(&id("w")).unwrap().is_empty());
    assert_eq!(runs(ledger).values().copied().collect::<Vec<_>>(), [1, 1]);
    rt.shutdown().await.unwrap();
}

/// Creating a child's record and journaling its start in the parent is one batch; when it is
/// refused, neither the child nor the start exists. After a reopen the child runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_child_start_batch_creates_neither_the_child_nor_its_start() {
    let t = Faulty::new(Durability::ProcessCrash);
    let ledger = &t.ledger;
    // The parent's step `arm` arms the fault: its own journaling succeeds, the child start fails.
    let trigger = Trigger {
        faults: t.faults.clone(),
        workflow: "p",
        step: "arm",
        after: 1,
    };
    let rt = t.open(Some(&trigger)).await;
    let h = rt.start("parent", &id("p"), &4u64).await.unwrap();
    let e = h.result::<u64>().await.unwrap_err();
    assert_failed(&e, t.path(), &["workflow \"p\""]);
    assert_one_write_failed(&t, &rt);
    abandoned(&rt, &["p"]).await;
    let kid = seen(ledger, "p", "kid");
    assert_eq!(kid.len(), 1, "{kid:?}");
    let message = kid[0].as_ref().unwrap_err();
    assert!(
        message.contains("journaling child-start \"kid\" at position 2 of workflow \"p\""),
        "{message}"
    );
    assert_eq!(runs(ledger).get(&("p/2".into(), "k".into())), None);
    drop(h);

    let rt = t.reopen_idle(rt).await;
    assert_eq!(journal(&rt, "p"), ["step s0", "step arm"]);
    assert!(
        matches!(rt.status(&id("p/2")), Err(Error::NotFound { .. })),
        "the child's record exists without its start"
    );
    let listed: Vec<String> = rt
        .list(&ListFilter::new())
        .unwrap()
        .iter()
        .map(|i| i.id.as_str().to_string())
        .collect();
    assert_eq!(listed, ["p"]);
    run(&rt);
    let out: u64 = rt.handle(&id("p")).unwrap().result().await.unwrap();
    assert_eq!(out, 41);
    assert_eq!(
        journal(&rt, "p"),
        ["step s0", "step arm", "child-start kid", "child-result p/2"]
    );
    let runs = runs(ledger);
    assert_eq!(runs.len(), 3, "{runs:?}");
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    rt.shutdown().await.unwrap();
}

/// A signal and a cancellation whose writes are refused: the caller's error names the
/// workflow and the operation, and nothing is applied. The cancellation is one write for the
/// parent and its child, so neither is marked; once the journal is healthy, both are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_signal_and_cancel_writes_name_the_workflow_and_apply_nothing() {
    let t = Faulty::new(Durability::ProcessCrash);
    let ledger = &t.ledger;
    let rt = t.open(None).await;
    // `parent(0)` waits for its child, which waits for a signal.
    let h = rt.start("parent", &id("p"), &0u64).await.unwrap();
    reached(ledger, "p", "arm").await;
    for _ in 0..2000 {
        if rt.status(&id("p/2")).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Starting an existing ID again waits for a flush covering every write so far, so the
    // child's start is durable before the fault is armed; both workflows are now waiting.
    rt.start("parent", &id("p"), &0u64).await.unwrap();
    assert!(rt.status(&id("p/2")).is_ok(), "the child never started");
    t.faults.fail_write(0);
    let e = rt.signal(&id("p/2"), "go", &5u64).await.unwrap_err();
    assert_failed(
        &e,
        t.path(),
        &["journaling signal \"go\" for workflow \"p/2\""],
    );
    assert_one_write_failed(&t, &rt);
    drop(h);
    let rt = t.reopen_idle(rt).await;
    assert!(rt.pending_signals(&id("p/2")).unwrap().is_empty());
    rt.shutdown().await.unwrap();
    drop(rt);

    // Again, with the injector on the new runtime: this time the cancellation is refused.
    let rt = t.open(None).await;
    t.faults.fail_write(0);
    let e = rt.cancel(&id("p")).await.unwrap_err();
    assert_failed(
        &e,
        t.path(),
        &["journaling the cancellation of workflow \"p\""],
    );
    assert_eq!(t.faults.fired_writes(), 2);
    let rt = t.reopen_idle(rt).await;
    for w in ["p", "p/2"] {
        let info = rt.status(&id(w)).unwrap();
        assert!(!info.cancel_requested, "{w} was marked cancelled");
        assert_eq!(info.status, WorkflowStatus::Running, "{w}");
    }
    assert!(rt.pending_signals(&id("p/2")).unwrap().is_empty());
    run(&rt);
    // A healthy journal takes the same write, for both workflows at once.
    rt.cancel(&id("p")).await.unwrap();
    for w in ["p", "p/2"] {
        assert!(rt.status(&id(w)).unwrap().cancel_requested, "{w}");
    }
    for w in ["p", "p/2"] {
        let e = rt
            .handle(&id(w))
            .unwrap()
            .result::<u64>()
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Cancelled { .. }), "{w}: {e:?}");
        let info = rt.status(&id(w)).unwrap();
        assert_eq!(info.status, WorkflowStatus::Cancelled, "{w}");
    }
    // The signal that was refused was never delivered: the child's `recv` returned the
    // cancellation in the end, and before it at most the journal's failure, seen by the
    // execution that the failure abandoned (when the child was waiting as the write failed);
    // never the value. The parent's steps ran once.
    let go = seen(ledger, "p/2", "go");
    let Some((last, before)) = go.split_last() else {
        panic!("the child never returned from recv");
    };
    assert!(
        last.as_ref().is_err_and(|e| e.contains("cancelled")),
        "{go:?}"
    );
    assert!(before.len() <= 1, "{go:?}");
    assert!(
        before.iter().all(|g| g
            .as_ref()
            .is_err_and(|e| e.contains("failed while") && e.contains("the operation is not done"))),
        "{go:?}"
    );
    assert!(runs(ledger).values().all(|n| *n == 1));
    rt.shutdown().await.unwrap();
}

/// A workflow's last write, its outcome, is refused: the workflow is not recorded as done
/// (or failed) but abandoned, and after a reopen it replays to the same result without
/// running any step again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_outcome_write_leaves_the_workflow_to_finish_after_reopen() {
    let t = Faulty::new(Durability::PowerLoss);
    let ledger = &t.ledger;
    let trigger = Trigger {
        faults: t.faults.clone(),
        workflow: "w",
        step: "s2",
        after: 1,
    };
    let rt = t.open(Some(&trigger)).await;
    let h = rt.start("chain", &id("w"), &(3u64, false)).await.unwrap();
    let e = h.result::<u64>().await.unwrap_err();
    assert_failed(&e, t.path(), &["workflow \"w\""]);
    assert_one_write_failed(&t, &rt);
    abandoned(&rt, &["w"]).await;
    // The code itself saw every step succeed; only the outcome's write failed.
    assert_eq!(seen_ok(ledger).len(), 3);
    let issues = rt.issues();
    assert!(
        issues.iter().any(|i| i
            .message
            .contains("recording the outcome of workflow \"w\"")),
        "{issues:?}"
    );
    drop(h);

    let rt = t.reopen_idle(rt).await;
    let info = rt.status(&id("w")).unwrap();
    assert_eq!(info.status, WorkflowStatus::Running);
    assert_eq!(journal(&rt, "w"), ["step s0", "step s1", "step s2"]);
    run(&rt);
    let out: u64 = rt.handle(&id("w")).unwrap().result().await.unwrap();
    assert_eq!(out, expected(3, 0));
    let runs = runs(ledger);
    assert_eq!(runs.len(), 3);
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    rt.shutdown().await.unwrap();
}

/// A start whose record cannot be written creates nothing; starting the ID again after a
/// reopen runs the workflow once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_write_fails_creates_nothing() {
    let t = Faulty::new(Durability::ProcessCrash);
    let ledger = &t.ledger;
    let rt = t.open(None).await;
    t.faults.fail_write(0);
    let e = rt
        .start("chain", &id("w"), &(3u64, false))
        .await
        .unwrap_err();
    assert_failed(&e, t.path(), &["the start of workflow \"w\""]);
    assert_one_write_failed(&t, &rt);
    let rt = t.reopen_idle(rt).await;
    assert!(matches!(rt.status(&id("w")), Err(Error::NotFound { .. })));
    assert!(rt.list(&ListFilter::new()).unwrap().is_empty());
    run(&rt);
    let h = rt.start("chain", &id("w"), &(3u64, false)).await.unwrap();
    assert_eq!(h.result::<u64>().await.unwrap(), expected(3, 0));
    let runs = runs(ledger);
    assert_eq!(runs.len(), 3);
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    rt.shutdown().await.unwrap();
}

/// A write is refused while many workflows are busy: whatever was reported done survives and
/// is never run again, every error names its workflow and operation, no workflow goes on
/// after one, and after a reopen every workflow, the one whose write failed and the others,
/// runs to completion with the right result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_among_busy_workflows_loses_no_step_reported_done() {
    const WORKFLOWS: usize = 12;
    const STEPS: u64 = 30;
    let t = Faulty::new(Durability::ProcessCrash);
    let ledger = &t.ledger;
    // Workflow w5's step s15 arms the fault from inside its closure: the next write, whoever
    // makes it (w5's own journaling of s15 or another workflow's), is refused.
    let trigger = Trigger {
        faults: t.faults.clone(),
        workflow: "w5",
        step: "s15",
        after: 0,
    };
    let rt = t.open(Some(&trigger)).await;
    let mut handles = Vec::new();
    for w in 0..WORKFLOWS {
        let name = format!("w{w}");
        match rt.start("chain", &id(&name), &(STEPS, false)).await {
            Ok(h) => handles.push(h),
            Err(e) => assert_failed(&e, t.path(), &[format!("workflow \"{name}\"").as_str()]),
        }
    }
    let mut failed = Vec::new();
    for h in &handles {
        match h.result::<u64>().await {
            Ok(v) => assert_eq!(v, expected(STEPS, 0)),
            Err(e) => {
                assert_failed(&e, t.path(), &[format!("workflow {}", h.id()).as_str()]);
                failed.push(h.id().as_str().to_string());
            }
        }
    }
    // w5 cannot finish: its s15 either met the refused write or the stopped journal.
    assert!(failed.iter().any(|w| w == "w5"), "{failed:?}");
    assert_one_write_failed(&t, &rt);
    // A failed result means the handle could not read the journal, not that the workflow
    // was cut short. Every one whose execution was cut short (it ran some of its steps but
    // not all) is abandoned; one still queued for the worker when the journal failed has no
    // execution to abandon, and one that ran every step may have finished before the failure
    // (its outcome is checked after the reopen below).
    let mut steps_run: BTreeMap<String, u64> = BTreeMap::new();
    for (w, _) in runs(ledger).into_keys() {
        *steps_run.entry(w).or_default() += 1;
    }
    let failed: Vec<&str> = failed
        .iter()
        .map(String::as_str)
        .filter(|w| steps_run.get(*w).is_some_and(|n| *n < STEPS))
        .collect();
    abandoned(&rt, &failed).await;
    let ok_before = seen_ok(ledger);
    {
        let l = ledger.lock().unwrap();
        let errors: Vec<_> = l.saw.iter().filter(|(_, _, r)| r.is_err()).collect();
        assert!(
            errors
                .iter()
                .any(|(w, op, _)| (w.as_str(), op.as_str()) == ("w5", "s15")),
            "{errors:?}"
        );
        for (w, op, r) in errors {
            // Each error names its workflow and the operation it met the failure in...
            let message = r.as_ref().unwrap_err();
            assert!(message.contains(&format!("workflow \"{w}\"")), "{message}");
            assert!(message.contains(&format!("step \"{op}\"")), "{message}");
            // ...and is the last thing its workflow saw.
            let last = l.saw.iter().rev().find(|(x, _, _)| x == w).unwrap();
            assert_eq!((&last.0, &last.1), (w, op));
        }
    }
    drop(handles);

    let rt = t.reopen_idle(rt).await;
    run(&rt);
    for w in 0..WORKFLOWS {
        // Idempotent: a start that failed may or may not have reached the disk.
        let h = rt
            .start("chain", &id(&format!("w{w}")), &(STEPS, false))
            .await
            .unwrap();
        assert_eq!(h.result::<u64>().await.unwrap(), expected(STEPS, 0), "w{w}");
    }
    let runs = runs(ledger);
    assert_eq!(runs.len(), WORKFLOWS * STEPS as usize);
    for (k, v) in &ok_before {
        assert_eq!(runs.get(k), Some(&1), "step {k:?} reported done ran again");
        assert_eq!(seen_ok(ledger).get(k), Some(v));
    }
    for (k, n) in &runs {
        // A step can run a second time only if its journaling did not return `Ok`.
        assert!(*n <= 2, "{k:?} ran {n} times");
        assert!(*n == 1 || !ok_before.contains_key(k), "{k:?}");
    }
    rt.shutdown().await.unwrap();
}
