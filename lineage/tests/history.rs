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

fn meta_history() -> LineageGraph {
    let mut g = LineageGraph::new();
    g.commit_at(
        t(10),
        vec![Change::Upsert(
            NodeSpec::new(NodeKind::Dataset, "ns", "a")
                .owner("alice")
                .tag("pii")
                .description("raw orders")
                .property("rows", serde_json::json!(10)),
        )],
    )
    .unwrap();
    g.commit_at(
        t(20),
        vec![
            Change::Upsert(
                NodeSpec::new(NodeKind::Dataset, "ns", "a")
                    .owner("bob")
                    .tag("tier-1")
                    .property("rows", serde_json::json!(20)),
            ),
            Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "b").owner("carol")),
        ],
    )
    .unwrap();
    g.commit_at(
        t(30),
        vec![
            Change::RemoveTag {
                key: k("ns:a"),
                tag: "pii".into(),
            },
            Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "a").status(Status::Deprecated)),
        ],
    )
    .unwrap();
    g
}

/// Owner, tags, status and rows property of `ns:a` in view `at`.
fn meta_of(g: &LineageGraph, at: At) -> (Option<String>, Vec<String>, Status, i64) {
    let i = g.info_at(g.find(&k("ns:a")).unwrap(), at).unwrap();
    let rows = i.properties["rows"].as_i64().unwrap();
    (i.owner, i.tags, i.status, rows)
}

fn check_meta(g: &LineageGraph, at: At, owner: &str, tags: &[&str], status: Status, rows: i64) {
    let want = (
        Some(owner.to_owned()),
        tags.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        status,
        rows,
    );
    assert_eq!(meta_of(g, at), want, "at {at:?}");
}

#[test]
fn as_of_views_answer_metadata() {
    let g = meta_history();
    check_meta(&g, At::Time(t(10)), "alice", &["pii"], Status::Active, 10);
    check_meta(&g, At::Time(t(15)), "alice", &["pii"], Status::Active, 10);
    check_meta(
        &g,
        At::Time(t(20)),
        "bob",
        &["pii", "tier-1"],
        Status::Active,
        20,
    );
    check_meta(
        &g,
        At::Time(t(30)),
        "bob",
        &["tier-1"],
        Status::Deprecated,
        20,
    );
    check_meta(&g, At::Latest, "bob", &["tier-1"], Status::Deprecated, 20);
    // Unchanged parts carry through every version.
    let a = g.find(&k("ns:a")).unwrap();
    assert_eq!(
        g.info_at(a, At::Time(t(25)))
            .unwrap()
            .description
            .as_deref(),
        Some("raw orders")
    );
    // A node created later reports the metadata it was created with.
    let b = g.find(&k("ns:b")).unwrap();
    assert_eq!(
        g.info_at(b, At::Time(t(5))).unwrap().owner.as_deref(),
        Some("carol")
    );
    // Exported subgraphs of a past view carry that view's metadata.
    let sub = g.to_subgraph(At::Time(t(15)));
    assert_eq!(sub.nodes.len(), 1);
    assert_eq!(sub.nodes[0].owner.as_deref(), Some("alice"));
}

#[test]
fn diff_lists_metadata_changes() {
    let g = meta_history();
    let d = g.diff(t(10), t(20));
    assert_eq!(d.added_nodes, vec![k("ns:b")]);
    assert_eq!(d.metadata_changes.len(), 1);
    let c = &d.metadata_changes[0];
    assert_eq!(c.key, k("ns:a"));
    assert_eq!(
        c.fields,
        vec![MetaField::Owner, MetaField::Tags, MetaField::Properties]
    );
    assert_eq!(c.before.owner.as_deref(), Some("alice"));
    assert_eq!(c.after.owner.as_deref(), Some("bob"));
    assert_eq!(c.after.properties["rows"], serde_json::json!(20));

    let d = g.diff(t(20), t(30));
    assert_eq!(
        d.metadata_changes[0].fields,
        vec![MetaField::Tags, MetaField::Status]
    );
    assert_eq!(d.metadata_changes[0].before.status, Status::Active);
    assert_eq!(d.metadata_changes[0].after.status, Status::Deprecated);
    // Over the whole history, the net change of `a` is listed once; `b` is new, not changed.
    let d = g.diff(t(10), t(30));
    assert_eq!(d.metadata_changes.len(), 1);
    assert_eq!(d.metadata_changes[0].before.tags, vec!["pii"]);
    assert_eq!(d.metadata_changes[0].after.tags, vec!["tier-1"]);
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["metadata_changes"][0]["key"], "ns:a");
}

#[test]
fn a_change_undone_in_the_interval_is_not_a_metadata_change() {
    let mut g = meta_history();
    g.commit_at(
        t(40),
        vec![Change::Upsert(
            NodeSpec::new(NodeKind::Dataset, "ns", "b").owner("dave"),
        )],
    )
    .unwrap();
    g.commit_at(
        t(50),
        vec![Change::Upsert(
            NodeSpec::new(NodeKind::Dataset, "ns", "b").owner("carol"),
        )],
    )
    .unwrap();
    let d = g.diff(t(30), t(50));
    assert_eq!(d.updated_nodes, vec![k("ns:b")]);
    assert!(d.metadata_changes.is_empty());
    assert_eq!(g.diff(t(30), t(40)).metadata_changes.len(), 1);
}

#[test]
fn metadata_history_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LineageStore::open(dir.path()).unwrap();
        for c in meta_history().log() {
            store.commit_at(c.time(), c.changes().to_vec()).unwrap();
        }
    }
    let store = LineageStore::open(dir.path()).unwrap();
    let g = store.read();
    check_meta(&g, At::Time(t(15)), "alice", &["pii"], Status::Active, 10);
    check_meta(&g, At::Latest, "bob", &["tier-1"], Status::Deprecated, 20);
    assert_eq!(g.diff(t(10), t(30)).metadata_changes.len(), 1);
}

#[test]
fn info_at_refuses_a_foreign_handle() {
    let g = meta_history();
    let mut big = LineageGraph::new();
    for i in 0..5 {
        big.commit(vec![Change::Upsert(NodeSpec::new(
            NodeKind::Dataset,
            "ns",
            format!("x{i}"),
        ))])
        .unwrap();
    }
    let foreign = big.find(&k("ns:x4")).unwrap();
    assert!(matches!(
        g.info_at(foreign, At::Time(t(15))),
        Err(Error::UnknownNode { .. })
    ));
}
