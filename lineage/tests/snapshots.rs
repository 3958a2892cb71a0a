//! Snapshots: a reader's view never changes under it, readers see whole commits, and clones
//! that share storage stay independent.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keel_lineage::*;
use proptest::prelude::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

fn ds(name: &str) -> NodeSpec {
    NodeSpec::new(NodeKind::Dataset, "ns", name)
}

fn downstream_keys(g: &LineageGraph, from: &str) -> Vec<String> {
    let id = g.find(&k(from)).unwrap();
    let mut v: Vec<String> = g
        .walk(id, &Walk::downstream())
        .unwrap()
        .ids()
        .map(|i| g.key(i).unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_held_snapshot_keeps_its_view_while_a_writer_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = LineageStore::open(dir.path()).unwrap();
    store
        .commit(vec![
            Change::Upsert(ds("a").owner("alice").tag("pii")),
            Change::Upsert(ds("b")),
            Change::link(k("ns:b"), EdgeKind::DerivedFrom, k("ns:a")),
        ])
        .unwrap();
    let before = store.read();
    // The writer is not held up by the snapshot: these commits return while it is alive.
    store
        .commit(vec![
            Change::Upsert(ds("c")),
            Change::link(k("ns:c"), EdgeKind::DerivedFrom, k("ns:b")),
            Change::Upsert(ds("a").owner("bob").status(Status::Deprecated)),
            Change::RemoveTag {
                key: k("ns:a"),
                tag: "pii".into(),
            },
        ])
        .unwrap();
    store
        .commit(vec![Change::Remove { key: k("ns:b") }])
        .unwrap();
    let after = store.read();

    assert_eq!(before.commit_count(), 1);
    assert_eq!((before.node_count(), before.edge_count()), (2, 1));
    assert!(matches!(
        before.find(&k("ns:c")),
        Err(Error::UnknownNode { .. })
    ));
    let a = before.info(before.find(&k("ns:a")).unwrap()).unwrap();
    assert_eq!(a.owner.as_deref(), Some("alice"));
    assert_eq!(a.tags, vec!["pii"]);
    assert_eq!(a.status, Status::Active);
    assert_eq!(downstream_keys(&before, "ns:a"), vec!["ns:b"]);

    assert_eq!(after.commit_count(), 3);
    assert_eq!((after.node_count(), after.edge_count()), (2, 0));
    let a = after.info(after.find(&k("ns:a")).unwrap()).unwrap();
    assert_eq!(a.owner.as_deref(), Some("bob"));
    assert!(a.tags.is_empty());
    assert_eq!(a.status, Status::Deprecated);
    assert!(downstream_keys(&after, "ns:a").is_empty());
    // The old snapshot is still whole after the newer one was read.
    assert_eq!(downstream_keys(&before, "ns:a"), vec!["ns:b"]);
}

#[test]
fn a_refused_commit_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = LineageStore::open(dir.path()).unwrap();
    store.commit(vec![Change::Upsert(ds("a"))]).unwrap();
    let r = store.commit(vec![
        Change::Upsert(ds("b")),
        Change::link(k("ns:b"), EdgeKind::Serves, k("ns:a")),
    ]);
    assert!(matches!(r, Err(Error::SchemaViolation { .. })));
    let g = store.read();
    assert_eq!((g.commit_count(), g.node_count()), (1, 1));
}

/// Batch `i` adds a chain of `WIDTH` datasets hanging off the root and stamps the root with
/// `batch = i`, so a reader can tell exactly what a whole prefix of batches looks like.
const WIDTH: usize = 6;

fn batch(i: usize) -> Vec<Change> {
    let mut v = vec![Change::Upsert(
        ds("root").property("batch", serde_json::json!(i)),
    )];
    let mut prev = "ns:root".to_owned();
    for j in 0..WIDTH {
        let name = format!("b{i}_{j}");
        v.push(Change::Upsert(ds(&name)));
        v.push(Change::link(
            k(&format!("ns:{name}")),
            EdgeKind::DerivedFrom,
            k(&prev),
        ));
        prev = format!("ns:{name}");
    }
    v
}

/// Checks that `g` is exactly the state after batches `0..=b` for some `b`, and returns it.
fn whole_prefix(g: &LineageGraph) -> usize {
    let root = g.find(&k("ns:root")).unwrap();
    let info = g.info(root).unwrap();
    let b = info.properties["batch"].as_u64().unwrap() as usize;
    assert_eq!(g.commit_count(), b as u64 + 1);
    assert_eq!(g.node_count(), 1 + WIDTH * (b + 1));
    assert_eq!(g.edge_count(), WIDTH * (b + 1));
    let reached = g.walk(root, &Walk::downstream()).unwrap().nodes.len();
    assert_eq!(reached, WIDTH * (b + 1));
    b
}

#[test]
fn concurrent_readers_always_see_whole_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LineageStore::open(dir.path()).unwrap());
    store.commit(batch(0)).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                loop {
                    // Read the flag first: the last snapshot after it is set is complete.
                    let finished = done.load(Ordering::Acquire);
                    let b = whole_prefix(&store.read());
                    if seen.last() != Some(&b) {
                        seen.push(b);
                    }
                    if finished {
                        return seen;
                    }
                }
            })
        })
        .collect();
    for i in 1..40 {
        store.commit(batch(i)).unwrap();
    }
    done.store(true, Ordering::Release);
    for r in readers {
        let seen = r.join().unwrap();
        // Snapshots only move forward, and the last one is the final state.
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&39));
    }
}

#[derive(Debug, Clone)]
enum Op {
    Node(u8, Option<u8>),
    Link(u8, u8),
    Unlink(u8, u8),
    Remove(u8),
    Tag(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..12, proptest::option::of(0u8..3)).prop_map(|(n, o)| Op::Node(n, o)),
        (0u8..12, 0u8..12).prop_map(|(a, b)| Op::Link(a, b)),
        (0u8..12, 0u8..12).prop_map(|(a, b)| Op::Unlink(a, b)),
        (0u8..12).prop_map(Op::Remove),
        (0u8..12).prop_map(Op::Tag),
    ]
}

fn key(n: u8) -> NodeKey {
    NodeKey::new("ns", format!("n{n}"))
}

fn change(op: &Op) -> Change {
    match *op {
        Op::Node(n, owner) => {
            let mut s = NodeSpec::with_key(NodeKind::Dataset, key(n));
            if let Some(o) = owner {
                s = s.owner(format!("o{o}"));
            }
            Change::Upsert(s)
        }
        Op::Link(a, b) => Change::link(key(a), EdgeKind::DerivedFrom, key(b)),
        Op::Unlink(a, b) => Change::Unlink {
            from: key(a),
            edge: EdgeKind::DerivedFrom,
            to: key(b),
        },
        Op::Remove(n) => Change::Remove { key: key(n) },
        Op::Tag(n) => Change::Upsert(NodeSpec::with_key(NodeKind::Dataset, key(n)).tag("t")),
    }
}

/// Commits the ops in batches of three at times 1, 2, ..., skipping refused batches.
fn build(commits: &[Vec<Op>]) -> LineageGraph {
    let mut g = LineageGraph::new();
    for (t, ops) in commits.iter().enumerate() {
        let _ = g.commit_at(
            Timestamp::from_millis(t as i64 + 1),
            ops.iter().map(change).collect(),
        );
    }
    g
}

fn state(g: &LineageGraph) -> String {
    serde_json::to_string(&g.to_subgraph(At::Cumulative)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A clone taken after each commit still equals a graph built from just the commits
    /// before it, however the original changes afterwards: writes never leak into storage
    /// a clone shares.
    #[test]
    fn clones_are_isolated_from_later_commits(
        commits in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..24)
    ) {
        let mut g = LineageGraph::new();
        let mut clones = Vec::new();
        for (t, ops) in commits.iter().enumerate() {
            let _ = g.commit_at(
                Timestamp::from_millis(t as i64 + 1),
                ops.iter().map(change).collect(),
            );
            clones.push(g.clone());
        }
        for (i, c) in clones.iter().enumerate() {
            prop_assert_eq!(state(c), state(&build(&commits[..=i])));
        }
    }
}
