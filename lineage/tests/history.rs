//! The append-only log, validity intervals, as-of views and diffs.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use keel_lineage::*;

fn t(s: i64) -> Timestamp {
    Timestamp::from_millis(s * 1000)
}

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

fn build() -> LineageGraph {
    let mut g = LineageGraph::new();
    g.commit_at(
        t(10),
        vec![
            Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "a")),
            Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "b")),
            Change::link(k("ns:b"), EdgeKind::DerivedFrom, k("ns:a")),
        ],
    )
    .unwrap();
    g.commit_at(
        t(20),
        vec![
            Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "c")),
            Change::link(k("ns:c"), EdgeKind::DerivedFrom, k("ns:b")),
            Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "a").owner("eng")),
        ],
    )
    .unwrap();
    g.commit_at(
        t(30),
        vec![Change::Unlink {
            from: k("ns:b"),
            edge: EdgeKind::DerivedFrom,
            to: k("ns:a"),
        }],
    )
    .unwrap();
    g
}

fn downstream(g: &LineageGraph, at: At) -> Vec<String> {
    let a = g.find(&k("ns:a")).unwrap();
    let mut v: Vec<String> = g
        .walk(a, &Walk::downstream().at(at))
        .unwrap()
        .ids()
        .map(|i| g.key(i).unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn as_of_latest_and_cumulative_views() {
    let g = build();
    assert_eq!(downstream(&g, At::Time(t(15))), vec!["ns:b"]);
    assert_eq!(downstream(&g, At::Time(t(25))), vec!["ns:b", "ns:c"]);
    assert!(downstream(&g, At::Latest).is_empty());
    assert_eq!(downstream(&g, At::Cumulative), vec!["ns:b", "ns:c"]);
    assert_eq!(g.nodes(At::Time(t(15))).len(), 2);
    assert_eq!(g.nodes(At::Time(t(5))).len(), 0);
    assert_eq!(g.log().len(), 3);
    assert_eq!(g.log()[1].time(), t(20));
}

#[test]
fn diff_lists_what_changed() {
    let g = build();
    let d = g.diff(t(10), t(20));
    assert_eq!(d.added_nodes, vec![k("ns:c")]);
    assert_eq!(d.updated_nodes, vec![k("ns:a")]);
    assert_eq!(d.added_edges.len(), 1);
    assert!(d.removed_edges.is_empty());
    let d = g.diff(t(20), t(30));
    assert_eq!(d.removed_edges.len(), 1);
    assert_eq!(d.removed_edges[0].from, k("ns:b"));
    assert_eq!(d.removed_edges[0].removed_at, Some(t(30)));
    let all = g.diff(t(0), t(100));
    assert_eq!(all.added_nodes.len(), 3);
}

#[test]
fn removed_nodes_end_their_edges_and_can_be_revived() {
    let mut g = build();
    g.commit_at(t(40), vec![Change::Remove { key: k("ns:b") }])
        .unwrap();
    assert!(matches!(g.find(&k("ns:b")), Err(Error::UnknownNode { .. })));
    assert_eq!(g.edge_count(), 0);
    let d = g.diff(t(30), t(40));
    assert_eq!(d.removed_nodes, vec![k("ns:b")]);
    assert_eq!(d.removed_edges.len(), 1);
    g.commit_at(
        t(50),
        vec![Change::Upsert(NodeSpec::new(NodeKind::Model, "ns", "b"))],
    )
    .unwrap();
    assert_eq!(
        g.kind(g.find(&k("ns:b")).unwrap()).unwrap(),
        NodeKind::Model
    );
    // The old dataset is still visible in the past.
    let old = g.nodes(At::Time(t(35)));
    assert!(
        old.iter()
            .any(|&i| g.key(i).unwrap() == k("ns:b") && g.kind(i).unwrap() == NodeKind::Dataset)
    );
}

#[test]
fn commit_times_are_monotone() {
    let mut g = LineageGraph::new();
    g.commit_at(
        t(10),
        vec![Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "a"))],
    )
    .unwrap();
    g.commit_at(
        t(5),
        vec![Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "b"))],
    )
    .unwrap();
    assert_eq!(g.log()[1].time(), t(10));
}
