//! The lifecycle scenario end to end on the real model (small evaluation set, short outputs),
//! with crashes and resumes, plus the bad inputs: missing model, foreign or damaged data dirs,
//! and a data dir already in use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use keel_examples::lifecycle::{
    self, BurstConfig, MARKER_FILE, Options, Outcome, Report, Step, Summary,
};
use keel_lineage::{At, Change, Direction, EdgeKind, LineageStore, NodeKey, NodeKind, Status};

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("models")
        .join(keel_serving::DEFAULT_MODEL_FILE);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model first (the lifecycle test serves the real model)",
        p.display()
    );
    p
}

fn small(dir: &Path) -> Options {
    let mut o = Options::new(dir);
    o.model = Some(model());
    o.eval_cases = 2;
    o.eval_max_tokens = 5;
    o.burst = BurstConfig {
        requests: 4,
        concurrency: 4,
        max_tokens: 5,
    };
    o.replicas = 2;
    o
}

fn finished(r: &Report) -> &Summary {
    match &r.outcome {
        Outcome::Finished(s) => s,
        other => panic!("expected the workflow to finish, got {other:?}"),
    }
}

/// Upserts per node key across the whole lineage log, not counting status-only updates.
fn registrations(store: &LineageStore) -> BTreeMap<String, usize> {
    let n = store.read().commit_count();
    let mut out = BTreeMap::new();
    for commit in store.log(0, n).expect("read the lineage log") {
        for change in commit.changes() {
            if let Change::Upsert(spec) = change {
                let json = serde_json::to_value(spec).expect("spec serialises");
                let status_only = json.get("status").is_some() && json.get("owner").is_none();
                if !status_only {
                    *out.entry(spec.key().to_string()).or_default() += 1;
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ships_v1_then_v2_through_crashes_and_a_durable_approval() {
    let model = model();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");

    // A: a replica fails evaluation requests (the step retries), then the process "dies"
    // right after the evaluation is journaled.
    let mut a = small(&dir);
    a.eval_faults = 2;
    a.crash_after = Some(Step::Evaluate);
    let ra = lifecycle::run(&a).await.expect("run A");
    assert_eq!(ra.outcome, Outcome::Crashed(Step::Evaluate));
    assert_eq!(ra.workflow, "ship-assistant-v1");
    assert_eq!(
        ra.ran(),
        [Step::RegisterData, Step::RegisterModel, Step::Evaluate]
    );

    // B: resumes; nothing before the crash runs again; stops waiting for approval.
    let rb = lifecycle::run(&small(&dir)).await.expect("run B");
    assert_eq!(rb.outcome, Outcome::AwaitingApproval);
    assert!(rb.resumed);
    assert_eq!(
        rb.replayed(),
        [Step::RegisterData, Step::RegisterModel, Step::Evaluate]
    );
    assert_eq!(rb.ran(), [Step::RecordEvaluation, Step::Impact]);

    // C: approves, and dies right after the approval is journaled.
    let mut c = small(&dir);
    c.approve = true;
    c.approver = "alice".into();
    c.crash_after = Some(Step::Approval);
    let rc = lifecycle::run(&c).await.expect("run C");
    assert_eq!(rc.outcome, Outcome::Crashed(Step::Approval));
    assert_eq!(rc.ran(), [Step::Approval]);

    // D: without --approve, the journaled approval is not lost: the workflow deploys v1.
    let rd = lifecycle::run(&small(&dir)).await.expect("run D");
    let s1 = finished(&rd);
    assert_eq!(rd.ran(), [Step::Deploy, Step::Burst, Step::Report]);
    assert!(rd.replayed().contains(&Step::Approval));
    assert_eq!(s1.version, 1);
    assert_eq!(s1.approval.by, "alice");
    assert_eq!(
        s1.evaluation.attempts, 2,
        "the failed evaluation was retried"
    );
    assert_eq!(s1.evaluation.cases.len(), 2);
    assert!(s1.evaluation.cases.iter().all(|c| c.tokens > 0));
    assert_eq!(s1.deploy.previous, None);
    assert_eq!(s1.deploy.added.len(), 2);
    assert_eq!(s1.burst.succeeded, 4, "{:?}", s1.burst);
    assert!(s1.burst.p50_ms > 0 && s1.burst.p50_ms <= s1.burst.p99_ms);
    assert!(
        s1.lineage.violations.is_empty(),
        "{:?}",
        s1.lineage.violations
    );
    assert!(s1.lineage.tree.contains("ml:smollm2-135m-instruct@v1"));
    assert!(s1.lineage.tree.contains("shop:customers"));
    for f in &s1.lineage.files {
        let text = std::fs::read_to_string(f).expect("exported file");
        assert!(text.contains("prod:assistant"), "{f}");
    }
    // The proposed field drop breaks the feature and the model trained on it.
    let field_drop = &s1.impact[1];
    assert!(
        field_drop.change.contains("shop:customers#country"),
        "{field_drop:?}"
    );
    assert!(field_drop.breaks >= 3, "{field_drop:?}");

    // E: the next run finds v1 served and ships v2, draining v1's replicas.
    let mut e = small(&dir);
    e.approve = true;
    let re = lifecycle::run(&e).await.expect("run E");
    let s2 = finished(&re);
    assert!(!re.resumed);
    assert_eq!(
        re.ran(),
        Step::ALL,
        "a fresh workflow runs every step once, even though it re-runs after the approval wakes it"
    );
    assert!(re.replayed().is_empty(), "{:?}", re.steps);
    assert_eq!(re.workflow, "ship-assistant-v2");
    assert_eq!(s2.version, 2);
    assert_eq!(s2.deploy.previous, Some(1));
    assert_eq!(s2.deploy.drained, ["replica-100", "replica-101"]);
    assert_eq!(s2.deploy.added, ["replica-200", "replica-201"]);
    assert!(s2.impact[0].change.contains("@v2"), "{:?}", s2.impact[0]);
    // With v1 in production, the field drop now breaks the tier-1 service.
    let field_drop = &s2.impact[1];
    assert!(
        field_drop
            .services
            .iter()
            .any(|s| s.contains("prod:assistant") && s.contains("breaks")),
        "{field_drop:?}"
    );
    assert_eq!(field_drop.max_severity.as_deref(), Some("critical"));
    assert!(
        s2.burst
            .per_replica
            .iter()
            .all(|(r, _)| r.starts_with("replica-2")),
        "only v2 serves after the rollout: {:?}",
        s2.burst.per_replica
    );
    assert!(
        s2.lineage.violations.is_empty(),
        "{:?}",
        s2.lineage.violations
    );
    assert!(s2.serving != s1.serving);

    // Lineage: nothing registered twice; the service serves v2 only; v1 is deprecated.
    let store = LineageStore::open(dir.join("lineage")).expect("reopen lineage");
    let regs = registrations(&store);
    let twice: Vec<_> = regs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "registered more than once: {twice:?}");
    for key in [
        "shop:customers",
        "features:assistant_training",
        "ml:smollm2-135m-instruct@v1",
        "ml:smollm2-135m-instruct@v2",
        "eval:smollm2-135m-instruct@v1.assistant-smoke",
        "eval:smollm2-135m-instruct@v2.assistant-smoke",
    ] {
        assert_eq!(regs.get(key), Some(&1), "{key}");
    }
    let g = store.read();
    let svc = g.find(&NodeKey::new("prod", "assistant")).expect("service");
    let served: Vec<String> = g
        .edges(svc, Direction::Upstream, At::Latest)
        .expect("edges")
        .into_iter()
        .filter(|e| e.kind == EdgeKind::Serves)
        .map(|e| e.to.to_string())
        .collect();
    assert_eq!(served, ["ml:smollm2-135m-instruct@v2"]);
    let v1 = g
        .find(&NodeKey::new("ml", "smollm2-135m-instruct@v1"))
        .expect("v1");
    let info = g.info(v1).expect("v1 info");
    assert_eq!(info.status, Status::Deprecated);
    assert_eq!(info.kind, NodeKind::ModelVersion);
    drop(g);
    drop(store);
    assert!(model.exists());
}

fn write_marker(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(MARKER_FILE), text).expect("marker");
}

fn with_dummy_model(dir: &Path) -> Options {
    let fake = dir.parent().expect("parent").join("fake.gguf");
    std::fs::write(&fake, b"not a model").expect("fake model");
    let mut o = Options::new(dir);
    o.model = Some(fake);
    o
}

async fn error_of(opts: &Options) -> String {
    match lifecycle::run(opts).await {
        Ok(r) => panic!("expected an error, got {r:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn a_missing_model_names_the_fetch_script() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut o = Options::new(tmp.path().join("data"));
    o.model = Some(tmp.path().join("nowhere.gguf"));
    let e = error_of(&o).await;
    assert!(e.contains("scripts/fetch-model"), "{e}");
    assert!(!o.data_dir.exists(), "nothing is created without a model");
}

#[tokio::test]
async fn a_data_dir_from_another_version_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    write_marker(&dir, r#"{"app":"keel-lifecycle","format":99}"#);
    let e = error_of(&with_dummy_model(&dir)).await;
    assert!(e.contains("format 99") && e.contains("format 1"), "{e}");
}

#[tokio::test]
async fn a_corrupt_marker_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    write_marker(&dir, "{ garbage");
    let e = error_of(&with_dummy_model(&dir)).await;
    assert!(e.contains("corrupt"), "{e}");
}

#[tokio::test]
async fn a_foreign_directory_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("notes.txt"), "mine").expect("file");
    let e = error_of(&with_dummy_model(&dir)).await;
    assert!(e.contains("not a lifecycle data dir"), "{e}");
}

#[tokio::test]
async fn a_damaged_lineage_store_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    write_marker(&dir, r#"{"app":"keel-lifecycle","format":1}"#);
    std::fs::create_dir_all(dir.join("lineage")).expect("mkdir");
    std::fs::write(dir.join("lineage").join("conf"), b"\xff\xfe garbage").expect("conf");
    std::fs::write(dir.join("lineage").join("db"), b"\x00\x01 not a sled file").expect("db");
    let e = error_of(&with_dummy_model(&dir)).await;
    assert!(e.contains("lineage store"), "{e}");
}

#[tokio::test]
async fn a_second_copy_on_the_same_journal_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    write_marker(&dir, r#"{"app":"keel-lifecycle","format":1}"#);
    let held = keel_durable::Runtime::builder(dir.join("journal"))
        .open()
        .await
        .expect("the other copy opens the journal");
    let e = error_of(&with_dummy_model(&dir)).await;
    assert!(
        e.contains("another lifecycle run") && e.contains("journal"),
        "{e}"
    );
    held.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_second_copy_on_the_same_lineage_store_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("data");
    write_marker(&dir, r#"{"app":"keel-lifecycle","format":1}"#);
    let held = LineageStore::open(dir.join("lineage")).expect("the other copy opens lineage");
    let e = error_of(&with_dummy_model(&dir)).await;
    assert!(e.contains("lineage store") && e.contains("locked"), "{e}");
    drop(held);
}

#[test]
fn steps_parse_by_name_and_number() {
    assert_eq!("evaluate".parse::<Step>().expect("name"), Step::Evaluate);
    assert_eq!("3".parse::<Step>().expect("number"), Step::Evaluate);
    assert_eq!("9".parse::<Step>().expect("number"), Step::Report);
    let e = "0".parse::<Step>().expect_err("zero").to_string();
    assert!(e.contains("out of range"), "{e}");
    let e = "deploy-now"
        .parse::<Step>()
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("register-data"), "{e}");
}
