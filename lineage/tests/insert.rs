//! Insert-if-absent: create a node only when its key is free, atomically within a commit.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use keel_lineage::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

fn ds(name: &str) -> NodeSpec {
    NodeSpec::new(NodeKind::Dataset, "ns", name)
}

#[test]
fn insert_creates_once_and_then_returns_the_existing_node_unchanged() {
    let mut g = LineageGraph::new();
    let a = g
        .insert::<nodes::Dataset>(ds("a").owner("alice").field(FieldSpec::new("x", None)))
        .unwrap();
    assert_eq!(g.commit_count(), 1);
    assert_eq!(g.fields_of(a).unwrap().len(), 1);
    let again = g
        .insert::<nodes::Dataset>(ds("a").owner("bob").field(FieldSpec::new("y", None)))
        .unwrap();
    assert_eq!(again, a);
    // Nothing was merged and nothing was committed.
    assert_eq!(g.commit_count(), 1);
    assert_eq!(g.info(a).unwrap().owner.as_deref(), Some("alice"));
    assert_eq!(g.fields_of(a).unwrap().len(), 1);
    // An upsert still merges.
    g.upsert::<nodes::Dataset>(ds("a").owner("bob")).unwrap();
    assert_eq!(g.info(a).unwrap().owner.as_deref(), Some("bob"));
}

#[test]
fn insert_of_a_key_held_by_another_kind_is_refused() {
    let mut g = LineageGraph::new();
    g.insert::<nodes::Dataset>(ds("a")).unwrap();
    let r = g.insert::<nodes::Model>(NodeSpec::new(NodeKind::Model, "ns", "a"));
    assert!(matches!(
        r,
        Err(Error::KindMismatch {
            existing: NodeKind::Dataset,
            requested: NodeKind::Model,
            ..
        })
    ));
    let r = g.commit(vec![Change::Insert(NodeSpec::new(
        NodeKind::Model,
        "ns",
        "a",
    ))]);
    assert!(matches!(r, Err(Error::KindMismatch { .. })));
    assert_eq!(g.commit_count(), 1);
}

#[test]
fn inserts_in_one_commit_are_decided_in_order() {
    let mut g = LineageGraph::new();
    g.commit(vec![Change::Upsert(ds("old").owner("o1"))])
        .unwrap();
    let s = g
        .commit(vec![
            Change::Insert(ds("new").owner("first")),
            Change::Insert(ds("new").owner("second")),
            Change::Insert(ds("old").owner("ignored")),
            Change::Upsert(ds("up").owner("u1")),
            Change::Insert(ds("up").owner("ignored")),
            // The inserted node can be linked in the same commit.
            Change::link(k("ns:new"), EdgeKind::DerivedFrom, k("ns:old")),
        ])
        .unwrap();
    assert_eq!(
        (s.nodes_created, s.nodes_updated, s.edges_created),
        (2, 0, 1)
    );
    let owner = |key: &str| g.info(g.find(&k(key)).unwrap()).unwrap().owner;
    assert_eq!(owner("ns:new").as_deref(), Some("first"));
    assert_eq!(owner("ns:old").as_deref(), Some("o1"));
    assert_eq!(owner("ns:up").as_deref(), Some("u1"));
}

#[test]
fn a_failing_commit_applies_none_of_its_inserts() {
    let mut g = LineageGraph::new();
    let r = g.commit(vec![
        Change::Insert(ds("a")),
        Change::link(k("ns:a"), EdgeKind::DerivedFrom, k("ns:missing")),
    ]);
    assert!(matches!(r, Err(Error::UnknownNode { .. })));
    assert!(g.find(&k("ns:a")).is_err());
    assert_eq!(g.commit_count(), 0);
}

#[test]
fn insert_revives_a_removed_key_as_a_new_node() {
    let mut g = LineageGraph::new();
    let a = g.insert::<nodes::Dataset>(ds("a")).unwrap();
    g.remove(a).unwrap();
    let b = g.insert::<nodes::Dataset>(ds("a").owner("new")).unwrap();
    assert_ne!(a, b);
    assert_eq!(g.info(b).unwrap().owner.as_deref(), Some("new"));
}

#[test]
fn store_insert_is_durable_and_atomic_across_threads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = std::sync::Arc::new(LineageStore::open(dir.path()).unwrap());
        let ids: Vec<AnyNodeId> = (0..4)
            .map(|n| {
                let store = store.clone();
                std::thread::spawn(move || {
                    store
                        .insert(ds("shared").owner(format!("thread{n}")))
                        .unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
        // Only the winning insert was committed.
        assert_eq!(store.read().commit_count(), 1);
        store.commit(vec![Change::Insert(ds("batched"))]).unwrap();
    }
    let store = LineageStore::open(dir.path()).unwrap();
    let g = store.read();
    assert_eq!(g.node_count(), 2);
    assert!(g.find(&k("ns:batched")).is_ok());
    let id = store.insert(ds("shared")).unwrap();
    assert_eq!(store.read().commit_count(), 2);
    assert!(g.info(id).unwrap().owner.unwrap().starts_with("thread"));
}

#[test]
fn insert_refuses_bad_keys_and_unknown_kinds() {
    let mut g = LineageGraph::new();
    assert!(matches!(
        g.insert_dyn(NodeSpec::new(NodeKind::Dataset, "", "a")),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        g.insert_dyn(NodeSpec::new(NodeKind::Custom(9), "ns", "a")),
        Err(Error::UnknownKind { .. })
    ));
    assert_eq!(g.commit_count(), 0);
}
