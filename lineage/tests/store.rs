//! The durable store: flush on commit, rebuild on open, corruption.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

mod common;

use keel_lineage::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_millis(s * 1000)
}

#[test]
fn committed_changes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LineageStore::open(dir.path()).unwrap();
        store
            .commit_at(
                t(1),
                vec![
                    Change::Upsert(
                        NodeSpec::new(NodeKind::Dataset, "ns", "a")
                            .owner("eng")
                            .field(FieldSpec::new("x", Some("INT"))),
                    ),
                    Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "b")),
                    Change::link(k("ns:b"), EdgeKind::DerivedFrom, k("ns:a")),
                ],
            )
            .unwrap();
        store
            .commit_at(
                t(2),
                vec![Change::Unlink {
                    from: k("ns:b"),
                    edge: EdgeKind::DerivedFrom,
                    to: k("ns:a"),
                }],
            )
            .unwrap();
        // A refused commit writes nothing.
        assert!(
            store
                .commit(vec![Change::link(k("ns:a"), EdgeKind::Serves, k("ns:b"))])
                .is_err()
        );
        assert_eq!(store.read().commit_count(), 2);
    }
    let store = LineageStore::open(dir.path()).unwrap();
    let g = store.read();
    assert_eq!(g.commit_count(), 2);
    let a = g.find(&k("ns:a")).unwrap();
    assert_eq!(g.info(a).unwrap().owner.as_deref(), Some("eng"));
    assert_eq!(g.fields_of(a).unwrap().len(), 1);
    assert_eq!(
        g.walk(a, &Walk::downstream().at(At::Time(t(1))))
            .unwrap()
            .nodes
            .len(),
        2
    );
    assert_eq!(g.walk(a, &Walk::downstream()).unwrap().nodes.len(), 1);
    drop(g);
    let log = store.log(0, 10).unwrap();
    assert_eq!(log.len(), 2);
    assert_eq!(log[1].time(), t(2));
    assert_eq!(log[0].changes().len(), 3);
}

#[test]
fn corrupt_log_entries_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LineageStore::open(dir.path()).unwrap();
        store
            .commit(vec![Change::Upsert(NodeSpec::new(
                NodeKind::Dataset,
                "ns",
                "a",
            ))])
            .unwrap();
    }
    {
        // Write a garbage entry where the next commit would go.
        let db = common::open_sled(dir.path());
        let log = db.open_tree("log").unwrap();
        log.insert(1u64.to_be_bytes(), b"{not json".to_vec())
            .unwrap();
        db.flush().unwrap();
    }
    let r = LineageStore::open(dir.path());
    assert!(matches!(r, Err(Error::CorruptStore { ref entry, .. }) if entry == "1"));
}

#[test]
fn garbage_database_files_are_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("conf"), b"\xff\xfe garbage").unwrap();
    std::fs::write(dir.path().join("db"), vec![0xAB; 4096]).unwrap();
    let r = LineageStore::open(dir.path());
    assert!(
        matches!(r, Err(Error::Storage { .. } | Error::CorruptStore { .. })),
        "{r:?}"
    );
}

#[test]
fn schema_mismatch_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    drop(LineageStore::open(dir.path()).unwrap());
    let mut other = Schema::default();
    other.define_node_kind("Notebook").unwrap();
    assert!(matches!(
        LineageStore::open_with_schema(dir.path(), other),
        Err(Error::SchemaMismatch)
    ));
}

#[test]
fn readers_share_the_store_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(LineageStore::open(dir.path()).unwrap());
    store
        .commit(vec![Change::Upsert(NodeSpec::new(
            NodeKind::Dataset,
            "ns",
            "root",
        ))])
        .unwrap();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..20 {
                store
                    .commit(vec![
                        Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", format!("d{i}"))),
                        Change::link(k(&format!("ns:d{i}")), EdgeKind::DerivedFrom, k("ns:root")),
                    ])
                    .unwrap();
            }
        })
    };
    for _ in 0..20 {
        let g = store.read();
        let root = g.find(&k("ns:root")).unwrap();
        let n = g.walk(root, &Walk::downstream()).unwrap().nodes.len();
        assert_eq!(n + 1, g.node_count());
    }
    writer.join().unwrap();
    assert_eq!(store.read().node_count(), 21);
}

#[test]
fn a_second_open_of_the_same_store_is_locked_and_the_lock_ends_with_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let first = LineageStore::open(dir.path()).unwrap();
    let second = LineageStore::open(dir.path());
    assert!(
        matches!(&second, Err(Error::Locked { path }) if path == dir.path()),
        "{second:?}"
    );
    // The first store is untouched by the refused open.
    first
        .commit(vec![Change::Upsert(NodeSpec::new(
            NodeKind::Dataset,
            "ns",
            "a",
        ))])
        .unwrap();
    drop(first);
    // sled releases its own lock from background threads; give it a moment, as a restarting
    // host would.
    let mut reopened = LineageStore::open(dir.path());
    for _ in 0..100 {
        if !matches!(reopened, Err(Error::Locked { .. })) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        reopened = LineageStore::open(dir.path());
    }
    let reopened = reopened.unwrap();
    assert!(reopened.read().find_str("ns:a").is_ok());
}
