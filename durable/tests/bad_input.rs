//! Bad inputs and faults: a second opener, a journal from a newer format, corrupt records,
//! signals and files, payloads that no longer deserialise (inputs, step outputs, signals),
//! unregistered names, replay divergence.
//! Each yields a typed error, and the other workflows keep running.

#![allow(clippy::unwrap_used)] // helpers in tests: a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::time::Duration;

use common::{builder, id, open_stopped_journal, start, stop};
use keel_durable::{Context, Error, RuntimeBuilder, StartOptions, StepError, WorkflowStatus};

/// A workflow that runs step `first` and then waits for signal `go`.
fn waiting(b: RuntimeBuilder) -> RuntimeBuilder {
    b.register("wait", |ctx: Context, x: u32| async move {
        let a: u32 = ctx
            .step("first", || async move { Ok::<_, StepError>(x) })
            .await?;
        let b: u32 = ctx.recv("go").await?;
        Ok::<_, Error>(a + b)
    })
}

/// Runs `wait` as `w` until its first step is journaled, then stops the runtime.
async fn leave_waiting(dir: &Path) {
    let rt = start(waiting(builder(dir))).await;
    rt.start("wait", &id("w"), &1u32).await.unwrap();
    while rt.history(&id("w")).unwrap().is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop(rt).await;
}

/// Writes raw key/values into the journal's sled database while no runtime holds it.
fn poke(dir: &Path, entries: &[(&[u8], &[u8])]) {
    let db = open_stopped_journal(dir);
    for (k, v) in entries {
        db.insert(*k, *v).unwrap();
    }
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_opener_gets_already_open() {
    let dir = tempfile::tempdir().unwrap();
    let rt = builder(dir.path()).open().await.unwrap();
    let second = builder(dir.path()).open().await;
    match second {
        Err(e @ Error::AlreadyOpen { .. }) => {
            assert!(e.to_string().contains("already open"), "{e}");
        }
        other => panic!("expected AlreadyOpen, got {other:?}"),
    }
    drop(rt);
    // Once the first runtime is gone, the directory opens again.
    let again = builder(dir.path()).open().await.unwrap();
    drop(again);
}

/// sled's own lock on the journal files, still held by something closing them (in the field:
/// a previous runtime of this process whose flush or flusher thread has not finished), is
/// waited for briefly rather than failing the open; held for good, it is a storage error that
/// says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_still_closing_is_waited_for_then_reported() {
    let dir = tempfile::tempdir().unwrap();
    stop(builder(dir.path()).open().await.unwrap()).await;
    let held = open_stopped_journal(dir.path());
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(held);
    });
    let rt = builder(dir.path())
        .open()
        .await
        .expect("opens once the files are released");
    release.join().unwrap();
    stop(rt).await;

    let held = open_stopped_journal(dir.path());
    match builder(dir.path()).open().await {
        Err(e @ Error::Storage { .. }) => {
            let text = format!("{e}: {:?}", std::error::Error::source(&e));
            assert!(text.contains("opening journal"), "{text}");
            assert!(text.contains("lock"), "{text}");
        }
        other => panic!("expected a storage error, got {other:?}"),
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runtimes_on_two_paths_do_not_interfere() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(waiting(builder(d1.path()))).await;
    let b = start(waiting(builder(d2.path()))).await;
    a.start("wait", &id("w"), &1u32).await.unwrap();
    b.start("wait", &id("w"), &10u32).await.unwrap();
    a.signal(&id("w"), "go", &1u32).await.unwrap();
    b.signal(&id("w"), "go", &2u32).await.unwrap();
    assert_eq!(
        a.handle(&id("w")).unwrap().result::<u32>().await.unwrap(),
        2
    );
    assert_eq!(
        b.handle(&id("w")).unwrap().result::<u32>().await.unwrap(),
        12
    );
    stop(a).await;
    stop(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(builder(dir.path()).open().await.unwrap());
    poke(dir.path(), &[(b"m/format", &99u32.to_be_bytes())]);
    let r = builder(dir.path()).open().await;
    assert!(
        matches!(
            r,
            Err(Error::UnsupportedFormat {
                found: 99,
                supported: 1,
                ..
            })
        ),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_database_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    leave_waiting(dir.path()).await;
    let db = dir.path().join("journal").join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0xA5u8; len.max(4096)]).unwrap();
    let conf = dir.path().join("journal").join("conf");
    std::fs::write(&conf, b"not a sled config").unwrap();
    let r = builder(dir.path()).open().await;
    assert!(
        matches!(r, Err(Error::Corrupt { .. } | Error::Storage { .. })),
        "{r:?}"
    );
}

/// A process killed while sled wrote a snapshot leaves `snap.<lsn>.generating`, partial or
/// empty; sled 0.34 would pick it as the newest snapshot and refuse to open. The open removes
/// it, sled reads the previous snapshot and the log, and the workflow is there, still waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_snapshot_left_by_a_crash_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    leave_waiting(dir.path()).await;
    let db_dir = dir.path().join("journal");
    for (name, bytes) in [
        ("snap.FFFFFFFFFFFFFFFF.generating", &b""[..]),
        ("snap.FFFFFFFFFFFFFFFE.generating", &b"half a snapshot"[..]),
    ] {
        std::fs::write(db_dir.join(name), bytes).unwrap();
    }
    let rt = start(waiting(builder(dir.path()))).await;
    assert_eq!(rt.status(&id("w")).unwrap().status, WorkflowStatus::Running);
    let left: Vec<String> = std::fs::read_dir(&db_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".generating"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    rt.signal(&id("w"), "go", &2u32).await.unwrap();
    let out: u32 = rt.handle(&id("w")).unwrap().result().await.unwrap();
    assert_eq!(out, 3);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_records_are_reported_and_others_run() {
    let dir = tempfile::tempdir().unwrap();
    leave_waiting(dir.path()).await;
    poke(
        dir.path(),
        &[
            (b"w/broken", b"{not json"),
            // A second workflow whose journal entry is damaged.
            (
                b"w/hurt",
                br#"{"name":"wait","input":1,"status":"Running","created_ms":1,"updated_ms":1,"seq":0,"queue":null,"parent":null,"cancel_requested":false,"output":null,"error":null}"#,
            ),
            (b"e/hurt\0\0\0\0\0\0\0\0\0", b"\xff\xfe"),
        ],
    );
    let rt = start(waiting(builder(dir.path()))).await;
    rt.signal(&id("w"), "go", &5u32).await.unwrap();
    assert_eq!(
        rt.handle(&id("w")).unwrap().result::<u32>().await.unwrap(),
        6
    );
    // The damaged workflow is reported, not dropped: its record is still there.
    let issues = loop {
        let issues = rt.issues();
        if issues.len() >= 2 {
            break issues;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.contains("broken") && t.contains("does not parse")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|t| t.contains("hurt") && t.contains("corrupt")),
        "{text:?}"
    );
    assert!(matches!(
        rt.status(&id("broken")),
        Err(Error::Corrupt { .. })
    ));
    assert_eq!(
        rt.status(&id("hurt")).unwrap().status,
        WorkflowStatus::Running
    );
    assert!(matches!(
        rt.history(&id("hurt")),
        Err(Error::Corrupt { .. })
    ));
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_step_output_type_fails_with_payload_error() {
    let dir = tempfile::tempdir().unwrap();
    leave_waiting(dir.path()).await;
    // New code reads step "first" as a String, but the journal holds a number.
    let rt = start(
        builder(dir.path()).register("wait", |ctx: Context, _x: u32| async move {
            let a: String = ctx
                .step("first", || async { Ok::<_, StepError>("x".into()) })
                .await?;
            Ok::<_, Error>(a)
        }),
    )
    .await;
    let e = rt
        .handle(&id("w"))
        .unwrap()
        .result::<String>()
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("step \\\"first\\\"") || e.to_string().contains("first"),
        "{e}"
    );
    assert!(e.to_string().contains("does not deserialise"), "{e}");
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_input_type_fails_with_payload_error() {
    let dir = tempfile::tempdir().unwrap();
    leave_waiting(dir.path()).await;
    let rt = start(
        builder(dir.path()).register("wait", |_ctx: Context, x: Vec<String>| async move {
            Ok::<_, Error>(x.len())
        }),
    )
    .await;
    let e = rt
        .handle(&id("w"))
        .unwrap()
        .result::<usize>()
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("the workflow input does not deserialise"),
        "{e}"
    );
    assert_eq!(rt.status(&id("w")).unwrap().status, WorkflowStatus::Failed);
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_divergence_is_nondeterminism_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    leave_waiting(dir.path()).await;
    let rt = start(
        builder(dir.path()).register("wait", |ctx: Context, x: u32| async move {
            // Swallowing the error does not help: the workflow still fails.
            let _ = ctx
                .step("renamed", || async move { Ok::<_, StepError>(x) })
                .await;
            Ok::<_, Error>(0u32)
        }),
    )
    .await;
    let e = rt
        .handle(&id("w"))
        .unwrap()
        .result::<u32>()
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("diverged at position 0"), "{msg}");
    assert!(
        msg.contains("step \"first\"") && msg.contains("step \"renamed\""),
        "{msg}"
    );
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_name_in_journal_is_reported_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    leave_waiting(dir.path()).await;
    let rt = start(
        builder(dir.path()).register(
            "other",
            |_c: Context, x: u8| async move { Ok::<_, Error>(x) },
        ),
    )
    .await;
    let issues = rt.issues();
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0].workflow.as_deref(), Some("w"));
    assert!(
        issues[0].message.contains("\"wait\" is not registered"),
        "{}",
        issues[0]
    );
    let v: u8 = rt
        .start("other", &id("o"), &3u8)
        .await
        .unwrap()
        .result()
        .await
        .unwrap();
    assert_eq!(v, 3);
    stop(rt).await;
    // Nothing was dropped: with the workflow registered again it finishes.
    let rt = start(waiting(builder(dir.path()))).await;
    rt.signal(&id("w"), "go", &1u32).await.unwrap();
    assert_eq!(
        rt.handle(&id("w")).unwrap().result::<u32>().await.unwrap(),
        2
    );
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_ids_and_queues_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(waiting(builder(dir.path()))).await;
    let r = rt.start("nope", &id("x"), &()).await;
    assert!(
        matches!(r, Err(Error::UnknownWorkflow { ref name }) if name == "nope"),
        "{r:?}"
    );
    let r = rt
        .start_with("wait", &id("x"), &1u32, StartOptions::new().queue("q"))
        .await;
    assert!(matches!(r, Err(Error::UnknownQueue { .. })), "{r:?}");
    assert!(matches!(
        keel_durable::WorkflowId::new(""),
        Err(Error::InvalidId { .. })
    ));
    // `/` is for children: a host-started "x/0" would take the ID of x's first child.
    let r = rt.start("wait", &id("x/0"), &1u32).await;
    assert!(
        matches!(r, Err(Error::InvalidId { ref id, .. }) if id == "x/0"),
        "{r:?}"
    );
    assert!(matches!(rt.status(&id("x/0")), Err(Error::NotFound { .. })));
    assert!(matches!(rt.worker(), Err(Error::WorkerRunning)));
    stop(rt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_directory_is_a_storage_error() {
    let dir = tempfile::tempdir().unwrap();
    // A regular file where the journal directory should be: every disk operation fails.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let r = builder(&file).open().await;
    match r {
        Err(e @ Error::Storage { .. }) => {
            assert!(e.to_string().contains("not-a-dir"), "{e}");
            assert!(std::error::Error::source(&e).is_some());
        }
        other => panic!("expected Storage, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_or_retyped_signals_fail_only_their_workflow() {
    let dir = tempfile::tempdir().unwrap();
    let rt = start(waiting(builder(dir.path()))).await;
    for w in ["retyped", "damaged", "fine"] {
        rt.start("wait", &id(w), &1u32).await.unwrap();
    }
    for w in ["retyped", "damaged", "fine"] {
        while rt.history(&id(w)).unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stop(rt).await;
    // A buffered signal whose bytes are not JSON (its key as `Runtime::signal` lays it out).
    poke(
        dir.path(),
        &[(b"s/damaged\0go\0\0\0\0\0\0\0\0\x01", b"{nope")],
    );

    let rt = start(waiting(builder(dir.path()))).await;
    let listed = rt.pending_signals(&id("damaged"));
    assert!(matches!(listed, Err(Error::Corrupt { .. })), "{listed:?}");
    // A value of another type than the workflow asks for (a changed signal type).
    rt.signal(&id("retyped"), "go", &"five".to_string())
        .await
        .unwrap();
    rt.signal(&id("fine"), "go", &5u32).await.unwrap();
    assert_eq!(
        rt.handle(&id("fine"))
            .unwrap()
            .result::<u32>()
            .await
            .unwrap(),
        6
    );
    let retyped = rt.handle(&id("retyped")).unwrap().result::<u32>().await;
    match retyped {
        Err(Error::WorkflowFailed { message, .. }) => {
            assert!(message.contains("does not deserialise"), "{message}");
        }
        other => panic!("expected the retyped signal to fail the workflow, got {other:?}"),
    }
    let damaged = rt.handle(&id("damaged")).unwrap().result::<u32>().await;
    match damaged {
        Err(Error::WorkflowFailed { message, .. }) => {
            assert!(message.contains("corrupt"), "{message}");
        }
        other => panic!("expected the damaged signal to fail the workflow, got {other:?}"),
    }
    // Nothing was silently dropped: the damaged signal is still in the journal.
    assert!(matches!(
        rt.pending_signals(&id("damaged")),
        Err(Error::Corrupt { .. })
    ));
    stop(rt).await;
}
