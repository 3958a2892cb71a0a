//! Checkpoints: reopen from a checkpoint plus the log after it, and fall back to the whole
//! log when the checkpoint cannot be trusted.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

mod common;

use std::path::Path;

use keel_lineage::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_millis(s * 1000)
}

fn ds(name: &str) -> NodeSpec {
    NodeSpec::new(NodeKind::Dataset, "ns", name)
}

/// A history touching every table: fields, tags, owners, properties, column lineage,
/// removals, unlinks and metadata changes.
fn commits() -> Vec<Vec<Change>> {
    vec![
        vec![
            Change::Upsert(
                ds("a")
                    .owner("alice")
                    .tag("pii")
                    .description("orders")
                    .field(FieldSpec::new("email", Some("VARCHAR")).tag("pii")),
            ),
            Change::Upsert(ds("b").field(FieldSpec::new("domain", None))),
            Change::link(k("ns:b"), EdgeKind::DerivedFrom, k("ns:a")),
            Change::Link {
                from: k("ns:b#domain"),
                edge: EdgeKind::DerivedFrom,
                to: k("ns:a#email"),
                transformation: Some(
                    Transformation::new(TransformKind::Direct, Some("masked")).masking(true),
                ),
            },
        ],
        vec![
            Change::Upsert(ds("a").owner("bob").property("rows", serde_json::json!(5))),
            Change::Upsert(ds("c")),
            Change::link(k("ns:c"), EdgeKind::DerivedFrom, k("ns:b")),
        ],
        vec![
            Change::Remove { key: k("ns:c") },
            Change::RemoveTag {
                key: k("ns:a"),
                tag: "pii".into(),
            },
        ],
        vec![
            Change::Upsert(NodeSpec::new(NodeKind::Model, "ns", "c")),
            Change::Unlink {
                from: k("ns:b"),
                edge: EdgeKind::DerivedFrom,
                to: k("ns:a"),
            },
            Change::Insert(ds("d").status(Status::Deprecated)),
        ],
    ]
}

/// Everything a query can see, as text, so two graphs compare in one assertion.
fn state(g: &LineageGraph) -> String {
    let mut s = serde_json::to_string(&g.to_subgraph(At::Cumulative)).unwrap();
    s += &serde_json::to_string(&g.diff(t(0), t(100))).unwrap();
    for at in [t(1), t(2), t(3)] {
        s += &serde_json::to_string(&g.to_subgraph(At::Time(at))).unwrap();
    }
    s += &format!(
        "{} {} {} {:?}",
        g.commit_count(),
        g.node_count(),
        g.edge_count(),
        g.find(&k("ns:c")).map(|c| g.kind(c))
    );
    s
}

fn reference(n: usize) -> String {
    let mut g = LineageGraph::new();
    for (i, c) in commits().into_iter().take(n).enumerate() {
        g.commit_at(t(i as i64 + 1), c).unwrap();
    }
    state(&g)
}

fn commit_range(store: &LineageStore, from: usize, to: usize) {
    for (i, c) in commits().into_iter().enumerate().take(to).skip(from) {
        store.commit_at(t(i as i64 + 1), c).unwrap();
    }
}

fn corrupt_entry_zero(dir: &Path) {
    let db = common::open_sled(dir);
    let log = db.open_tree("log").unwrap();
    log.insert(0u64.to_be_bytes(), b"garbage".to_vec()).unwrap();
    db.flush().unwrap();
}

#[test]
fn reopen_loads_the_checkpoint_and_replays_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LineageStore::open(dir.path()).unwrap();
        commit_range(&store, 0, 2);
        assert_eq!(store.checkpoint().unwrap(), 2);
        commit_range(&store, 2, 4);
        assert_eq!(state(&store.read()), reference(4));
    }
    // Damage a commit the checkpoint covers: only a reopen that uses the checkpoint works.
    corrupt_entry_zero(dir.path());
    let store = LineageStore::open(dir.path()).unwrap();
    assert_eq!(state(&store.read()), reference(4));
    // The reopened store keeps committing and checkpointing on top.
    store
        .commit_at(t(9), vec![Change::Upsert(ds("e"))])
        .unwrap();
    assert_eq!(store.checkpoint().unwrap(), 5);
    drop(store);
    let store = LineageStore::open(dir.path()).unwrap();
    assert!(store.read().find(&k("ns:e")).is_ok());
    assert!(!dir.path().join("checkpoint.bin.tmp").exists());
}

#[test]
fn a_checkpoint_of_everything_reopens_without_replay() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LineageStore::open(dir.path()).unwrap();
        assert_eq!(store.checkpoint().unwrap(), 0);
        commit_range(&store, 0, 4);
        store.checkpoint().unwrap();
    }
    let store = LineageStore::open(dir.path()).unwrap();
    assert_eq!(state(&store.read()), reference(4));
}

#[test]
fn a_damaged_checkpoint_is_ignored_and_the_log_replayed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LineageStore::open(dir.path()).unwrap();
        commit_range(&store, 0, 3);
        store.checkpoint().unwrap();
        commit_range(&store, 3, 4);
    }
    let path = dir.path().join("checkpoint.bin");
    let good = std::fs::read(&path).unwrap();
    for damage in [
        {
            let mut b = good.clone();
            let mid = b.len() / 2;
            b[mid] ^= 0x40;
            b
        },
        good[..good.len() - 9].to_vec(),
        b"KEELCKPT".to_vec(),
        Vec::new(),
    ] {
        std::fs::write(&path, &damage).unwrap();
        let store = LineageStore::open(dir.path()).unwrap();
        assert_eq!(state(&store.read()), reference(4));
    }
}

#[test]
fn a_checkpoint_from_another_log_is_ignored() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    {
        let store = LineageStore::open(one.path()).unwrap();
        commit_range(&store, 0, 2);
        store.checkpoint().unwrap();
    }
    {
        let store = LineageStore::open(two.path()).unwrap();
        store
            .commit_at(t(1), vec![Change::Upsert(ds("other"))])
            .unwrap();
        store
            .commit_at(t(2), vec![Change::Upsert(ds("other2"))])
            .unwrap();
    }
    std::fs::copy(
        one.path().join("checkpoint.bin"),
        two.path().join("checkpoint.bin"),
    )
    .unwrap();
    let store = LineageStore::open(two.path()).unwrap();
    let g = store.read();
    assert_eq!(g.node_count(), 2);
    assert!(g.find(&k("ns:other2")).is_ok());
    assert!(g.find(&k("ns:a")).is_err());
}

#[test]
fn a_checkpoint_taken_while_writers_commit_reopens_to_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = std::sync::Arc::new(LineageStore::open(dir.path()).unwrap());
        store.commit(vec![Change::Upsert(ds("root"))]).unwrap();
        let writer = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..30 {
                    store
                        .commit(vec![
                            Change::Upsert(ds(&format!("d{i}"))),
                            Change::link(
                                k(&format!("ns:d{i}")),
                                EdgeKind::DerivedFrom,
                                k("ns:root"),
                            ),
                        ])
                        .unwrap();
                }
            })
        };
        let mut covered = Vec::new();
        for _ in 0..5 {
            covered.push(store.checkpoint().unwrap());
        }
        writer.join().unwrap();
        assert!(covered.windows(2).all(|w| w[0] <= w[1]));
    }
    let store = LineageStore::open(dir.path()).unwrap();
    let g = store.read();
    assert_eq!(
        (g.commit_count(), g.node_count(), g.edge_count()),
        (31, 31, 30)
    );
}

#[test]
fn a_long_history_leaves_a_checkpoint_and_a_short_one_does_not() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LineageStore::open(dir.path()).unwrap();
        store.commit(vec![Change::Upsert(ds("small"))]).unwrap();
    }
    drop(LineageStore::open(dir.path()).unwrap());
    assert!(!dir.path().join("checkpoint.bin").exists());
    {
        let store = LineageStore::open(dir.path()).unwrap();
        let per_commit = 10_000;
        for c in 0..AUTO_CHECKPOINT_CHANGES.div_ceil(per_commit) {
            let changes = (0..per_commit)
                .map(|i| Change::Upsert(ds(&format!("d{c}_{i}"))))
                .collect();
            store.commit(changes).unwrap();
        }
    }
    let reopened = LineageStore::open(dir.path()).unwrap();
    assert!(dir.path().join("checkpoint.bin").exists());
    let nodes = reopened.read().node_count();
    drop(reopened);
    // The checkpoint covers everything: the next open loads it and sees the same graph.
    let again = LineageStore::open(dir.path()).unwrap();
    assert_eq!(again.read().node_count(), nodes);
    assert!(again.read().find(&k("ns:small")).is_ok());
}

#[test]
fn commits_checkpoint_on_their_own_once_enough_changes_are_uncovered() {
    let dir = tempfile::tempdir().unwrap();
    let store = LineageStore::open(dir.path()).unwrap();
    store.commit(vec![Change::Upsert(ds("first"))]).unwrap();
    assert!(!dir.path().join("checkpoint.bin").exists());
    let per_commit = 10_000;
    for c in 0..AUTO_CHECKPOINT_CHANGES.div_ceil(per_commit) {
        let changes = (0..per_commit)
            .map(|i| Change::Upsert(ds(&format!("e{c}_{i}"))))
            .collect();
        store.commit(changes).unwrap();
    }
    assert!(dir.path().join("checkpoint.bin").exists());
    let nodes = store.read().node_count();
    drop(store);
    let again = LineageStore::open(dir.path()).unwrap();
    assert_eq!(again.read().node_count(), nodes);
    assert!(again.read().find(&k("ns:first")).is_ok());
}
