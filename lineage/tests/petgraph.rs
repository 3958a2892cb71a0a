//! The graph as a petgraph graph: petgraph's algorithms on `GraphView` agree with the crate's
//! own walks, and nodes and edges outside a view's validity are invisible to it.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::collections::{BTreeSet, HashSet};

use keel_lineage::*;
use petgraph::Direction::{Incoming, Outgoing};
use petgraph::algo::{has_path_connecting, kosaraju_scc, tarjan_scc, toposort};
use petgraph::visit::{
    Bfs, Dfs, EdgeCount, EdgeRef, IntoEdgeReferences, IntoEdgesDirected, IntoNeighborsDirected,
    IntoNodeIdentifiers, NodeCount, Reversed, Walker,
};
use proptest::prelude::*;

fn k(i: usize) -> NodeKey {
    NodeKey::new("p", format!("d{i}"))
}

/// A dataset graph from `(derived, source)` pairs (edges flow source -> derived); then the
/// `unlink`ed pairs' edges are ended in a second commit and the `remove`d nodes in a third.
/// Returns the graph and the node ids by position.
fn build(
    n: usize,
    edges: &[(usize, usize)],
    unlink: &[(usize, usize)],
    remove: &[usize],
) -> (LineageGraph, Vec<AnyNodeId>) {
    let mut g = LineageGraph::new();
    let mut ch: Vec<Change> = (0..n)
        .map(|i| Change::Upsert(NodeSpec::with_key(NodeKind::Dataset, k(i))))
        .collect();
    for &(a, b) in edges {
        ch.push(Change::link(k(a), EdgeKind::DerivedFrom, k(b)));
    }
    g.commit_at(Timestamp::from_millis(1_000), ch).unwrap();
    let ids = (0..n).map(|i| g.find(&k(i)).unwrap()).collect();
    let unlink: BTreeSet<&(usize, usize)> = unlink.iter().collect();
    let ch: Vec<Change> = unlink
        .into_iter()
        .map(|&(a, b)| Change::Unlink {
            from: k(a),
            edge: EdgeKind::DerivedFrom,
            to: k(b),
        })
        .collect();
    g.commit_at(Timestamp::from_millis(2_000), ch).unwrap();
    let remove: BTreeSet<usize> = remove.iter().copied().collect();
    let ch: Vec<Change> = remove
        .into_iter()
        .map(|i| Change::Remove { key: k(i) })
        .collect();
    g.commit_at(Timestamp::from_millis(3_000), ch).unwrap();
    (g, ids)
}

/// A node count, `(derived, source)` pairs, positions in that list to unlink, nodes to remove.
type Case = (usize, Vec<(usize, usize)>, Vec<usize>, Vec<usize>);

fn strategy() -> impl Strategy<Value = Case> {
    (2usize..25).prop_flat_map(|n| {
        (
            Just(n),
            prop::collection::vec((0..n, 0..n), 0..70),
            prop::collection::vec(0usize..70, 0..12),
            prop::collection::vec(0..n, 0..3),
        )
    })
}

/// The ids a crate walk reaches from `s` (start excluded), or `None` if `s` is not visible.
fn walked(g: &LineageGraph, s: AnyNodeId, w: Walk) -> Option<BTreeSet<AnyNodeId>> {
    g.walk(s, &w).ok().map(|r| r.ids().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn petgraph_reachability_equals_the_crates_walks(
        (n, edges, unlink, remove) in strategy(),
    ) {
        let unlink: Vec<(usize, usize)> =
            unlink.iter().filter_map(|&i| edges.get(i).copied()).collect();
        let (g, ids) = build(n, &edges, &unlink, &remove);
        for at in [At::Latest, At::Time(Timestamp::from_millis(1_500)), At::Cumulative] {
            let view = g.petgraph_view_at(at);
            let visible: BTreeSet<AnyNodeId> = view.node_identifiers().collect();
            prop_assert_eq!(view.node_count(), visible.len());
            prop_assert_eq!(&visible, &g.nodes(at).into_iter().collect());
            for &s in &ids {
                let Some(down) = walked(&g, s, Walk::downstream().at(at)) else {
                    prop_assert!(!visible.contains(&s));
                    prop_assert_eq!(view.neighbors_directed(s, Outgoing).count(), 0);
                    continue;
                };
                let up = walked(&g, s, Walk::upstream().at(at)).unwrap();
                // Dfs and Bfs along the data flow, Dfs against it through `Reversed`.
                let dfs: BTreeSet<AnyNodeId> =
                    Dfs::new(view, s).iter(view).filter(|&x| x != s).collect();
                let bfs: BTreeSet<AnyNodeId> =
                    Bfs::new(view, s).iter(view).filter(|&x| x != s).collect();
                let rev = Reversed(view);
                let back: BTreeSet<AnyNodeId> =
                    Dfs::new(rev, s).iter(rev).filter(|&x| x != s).collect();
                prop_assert_eq!(&dfs, &down);
                prop_assert_eq!(&bfs, &down);
                prop_assert_eq!(&back, &up);
                for &t in &visible {
                    if t != s {
                        prop_assert_eq!(has_path_connecting(view, s, t, None), down.contains(&t));
                    }
                }
            }
        }
    }

    #[test]
    fn sccs_contain_every_reported_cycle((n, edges, unlink, remove) in strategy()) {
        let unlink: Vec<(usize, usize)> =
            unlink.iter().filter_map(|&i| edges.get(i).copied()).collect();
        let (g, ids) = build(n, &edges, &unlink, &remove);
        prop_assert_eq!(ids.len(), n);
        let view = g.petgraph_view();
        let sccs: Vec<HashSet<AnyNodeId>> =
            tarjan_scc(view).into_iter().map(|c| c.into_iter().collect()).collect();
        let mut kosaraju: Vec<Vec<AnyNodeId>> = kosaraju_scc(view);
        let mut tarjan: Vec<Vec<AnyNodeId>> = tarjan_scc(view);
        for c in kosaraju.iter_mut().chain(tarjan.iter_mut()) {
            c.sort();
        }
        kosaraju.sort();
        tarjan.sort();
        prop_assert_eq!(&kosaraju, &tarjan);
        let mut cyclic = false;
        for s in view.node_identifiers() {
            for dir in [Walk::downstream(), Walk::upstream()] {
                for cycle in g.walk(s, &dir).unwrap().cycles {
                    cyclic = true;
                    prop_assert!(
                        sccs.iter().any(|c| cycle.iter().all(|x| c.contains(x))),
                        "cycle {:?} is in no strongly connected component", cycle
                    );
                    if let [single] = cycle[..] {
                        prop_assert!(view.neighbors_directed(single, Outgoing).any(|t| t == single));
                    }
                }
            }
        }
        // A cycle-free view sorts topologically, and a cyclic one does not.
        prop_assert_eq!(toposort(view, None).is_ok(), !cyclic);
    }
}

/// Every simple path from `at` to `to` of at most `left` more hops, by brute force over the
/// `(derived, source)` pairs.
fn brute_paths(
    edges: &[(usize, usize)],
    path: &mut Vec<usize>,
    to: usize,
    left: u32,
    out: &mut Vec<Vec<usize>>,
) {
    let Some(&at) = path.last() else { return };
    if left == 0 {
        return;
    }
    for &(derived, source) in edges {
        if source != at || path.contains(&derived) && derived != to {
            continue;
        }
        if derived == to {
            if !path.contains(&to) {
                out.push(path.iter().copied().chain([to]).collect());
            }
            continue;
        }
        path.push(derived);
        brute_paths(edges, path, to, left - 1, out);
        path.pop();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn paths_are_every_simple_path_up_to_the_depth(
        (n, edges) in (2usize..8).prop_flat_map(|n| (Just(n), prop::collection::vec((0..n, 0..n), 0..16))),
        from in 0usize..8,
        to in 0usize..8,
        depth in 0u32..5,
    ) {
        let (from, to) = (from % n, to % n);
        let (g, ids) = build(n, &edges, &[], &[]);
        // Linking a pair again is a no-op, so the graph has one edge per distinct pair.
        let distinct: Vec<(usize, usize)> =
            edges.iter().copied().collect::<BTreeSet<_>>().into_iter().collect();
        let mut want = Vec::new();
        if from != to {
            brute_paths(&distinct, &mut vec![from], to, depth, &mut want);
        }
        want.sort();
        let p = g.paths(ids[from], ids[to], depth, usize::MAX - 1).unwrap();
        prop_assert!(!p.partial);
        let mut got: Vec<Vec<usize>> = p
            .paths
            .iter()
            .map(|path| path.iter().map(|id| ids.iter().position(|x| x == id).unwrap()).collect())
            .collect();
        got.sort();
        prop_assert_eq!(got, want);
    }
}

/// raw -> clean -> model, with one extra edge raw -> model; the model and the extra edge are
/// removed later, and a second model is added after that.
fn removal_fixture() -> (LineageGraph, [AnyNodeId; 4]) {
    let mut g = LineageGraph::new();
    let ds = |name: &str| Change::Upsert(NodeSpec::new(NodeKind::Dataset, "s3", name));
    let mv = |name: &str| Change::Upsert(NodeSpec::new(NodeKind::ModelVersion, "ml", name));
    let key = |s: &str| NodeKey::parse(s).unwrap();
    g.commit_at(
        Timestamp::from_millis(1_000),
        vec![
            ds("raw"),
            ds("clean"),
            mv("m@1"),
            Change::link(key("s3:clean"), EdgeKind::DerivedFrom, key("s3:raw")),
            Change::link(key("ml:m@1"), EdgeKind::TrainedOn, key("s3:clean")),
            Change::link(key("ml:m@1"), EdgeKind::TrainedOn, key("s3:raw")),
        ],
    )
    .unwrap();
    let first = ["s3:raw", "s3:clean", "ml:m@1"].map(|s| g.find_str(s).unwrap());
    g.commit_at(
        Timestamp::from_millis(2_000),
        vec![Change::Unlink {
            from: key("ml:m@1"),
            edge: EdgeKind::TrainedOn,
            to: key("s3:raw"),
        }],
    )
    .unwrap();
    g.commit_at(
        Timestamp::from_millis(3_000),
        vec![Change::Remove { key: key("ml:m@1") }],
    )
    .unwrap();
    g.commit_at(
        Timestamp::from_millis(4_000),
        vec![
            mv("m@2"),
            Change::link(key("ml:m@2"), EdgeKind::TrainedOn, key("s3:clean")),
        ],
    )
    .unwrap();
    let m2 = g.find_str("ml:m@2").unwrap();
    (g, [first[0], first[1], first[2], m2])
}

/// The edges of a view as (source, target) pairs, sorted.
fn edge_pairs(view: GraphView<'_>) -> Vec<(AnyNodeId, AnyNodeId)> {
    let mut v: Vec<_> = view
        .edge_references()
        .map(|e| (e.source(), e.target()))
        .collect();
    v.sort();
    v
}

#[test]
fn each_view_shows_only_what_is_valid_in_it() {
    let (g, [raw, clean, m1, m2]) = removal_fixture();
    let check = |at: At, nodes: &[AnyNodeId], edges: &[(AnyNodeId, AnyNodeId)]| {
        let view = g.petgraph_view_at(at);
        let got: Vec<AnyNodeId> = view.node_identifiers().collect();
        assert_eq!(got, nodes, "nodes at {at:?}");
        assert_eq!(view.node_count(), nodes.len(), "node count at {at:?}");
        assert_eq!(edge_pairs(view), edges, "edges at {at:?}");
        assert_eq!(view.edge_count(), edges.len(), "edge count at {at:?}");
        for &(s, t) in edges {
            assert!(view.neighbors_directed(s, Outgoing).any(|x| x == t));
            assert!(view.neighbors_directed(t, Incoming).any(|x| x == s));
        }
    };
    let t = |ms| At::Time(Timestamp::from_millis(ms));
    check(t(500), &[], &[]);
    check(
        t(1_000),
        &[raw, clean, m1],
        &[(raw, clean), (raw, m1), (clean, m1)],
    );
    check(t(2_000), &[raw, clean, m1], &[(raw, clean), (clean, m1)]);
    check(t(3_000), &[raw, clean], &[(raw, clean)]);
    check(At::Latest, &[raw, clean, m2], &[(raw, clean), (clean, m2)]);
    check(
        At::Cumulative,
        &[raw, clean, m1, m2],
        &[(raw, clean), (raw, m1), (clean, m1), (clean, m2)],
    );
}

#[test]
fn removed_edges_and_nodes_are_invisible_to_the_latest_view() {
    let (g, [raw, clean, m1, m2]) = removal_fixture();
    let view = g.petgraph_view();
    assert!(!view.contains_node(m1));
    assert_eq!(view.neighbors_directed(m1, Incoming).count(), 0);
    assert!(!has_path_connecting(view, raw, m1, None));
    assert!(has_path_connecting(view, raw, m2, None));
    let edges: Vec<ViewEdge<'_>> = view.edges_directed(raw, Outgoing).collect();
    assert_eq!(edges.len(), 1);
    assert_eq!(edges[0].target(), clean);
    assert_eq!(*edges[0].weight(), EdgeKind::DerivedFrom);
    // Every edge the cumulative view has but the latest lacks is hidden by id as well.
    let all = g.petgraph_view_at(At::Cumulative);
    let hidden: Vec<EdgeId> = all
        .edge_references()
        .map(|e| e.id())
        .filter(|&e| !view.contains_edge(e))
        .collect();
    assert_eq!(hidden.len(), 2);
    for e in hidden {
        assert_eq!(view.endpoints(e), None);
        assert_eq!(view.edge_info(e), None);
        let info = all.edge_info(e).unwrap();
        assert!(info.removed_at.is_some());
    }
    // The paths the crate enumerates (with petgraph) follow the latest view too.
    assert_eq!(g.paths(raw, m1, 5, 10).unwrap().paths, Vec::<Vec<_>>::new());
    assert_eq!(
        g.paths(raw, m2, 5, 10).unwrap().paths,
        vec![vec![raw, clean, m2]]
    );
}

#[test]
fn placeholder_nodes_are_ordinary_nodes_of_the_view() {
    let mut g = LineageGraph::new();
    let event = r#"{
        "eventType": "COMPLETE", "eventTime": "2024-01-01T00:00:00Z",
        "producer": "https://example.com/test",
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
        "run": {"runId": "r1"}, "job": {"namespace": "etl", "name": "load"},
        "inputs": [], "outputs": [{"namespace": "db", "name": "out",
            "facets": {"columnLineage": {"fields": {"a": {"inputFields": [
                {"namespace": "db", "name": "undeclared", "field": "x"}]}}}}}]
    }"#;
    let events = parse_openlineage(event, "event", &OpenLineageOptions::default()).unwrap();
    g.apply(events).unwrap();
    let x = g.find_str("db:undeclared#x").unwrap();
    let a = g.find_str("db:out#a").unwrap();
    assert!(g.info(x).unwrap().placeholder);
    let view = g.petgraph_view();
    assert!(view.contains_node(x));
    assert!(has_path_connecting(view, x, a, None));
    let down = walked(&g, x, Walk::downstream()).unwrap();
    let dfs: BTreeSet<AnyNodeId> = Dfs::new(view, x).iter(view).filter(|&y| y != x).collect();
    assert_eq!(dfs, down);
}

#[test]
fn foreign_handles_do_not_panic() {
    let (g, _) = removal_fixture();
    let big = {
        let mut h = LineageGraph::new();
        let ch = (0..50)
            .map(|i| Change::Upsert(NodeSpec::with_key(NodeKind::Dataset, k(i))))
            .collect();
        h.commit(ch).unwrap();
        h
    };
    let foreign = big.find(&k(49)).unwrap();
    let view = g.petgraph_view();
    assert!(!view.contains_node(foreign));
    assert_eq!(view.neighbors_directed(foreign, Outgoing).count(), 0);
    let mut dfs = Dfs::new(view, foreign);
    assert_eq!(dfs.next(view), Some(foreign));
    assert_eq!(dfs.next(view), None);
}

#[test]
fn a_snapshots_view_keeps_its_version_while_the_store_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = LineageStore::open(dir.path()).unwrap();
    let ds = |i: usize| Change::Upsert(NodeSpec::with_key(NodeKind::Dataset, k(i)));
    let link = |a: usize, b: usize| Change::link(k(a), EdgeKind::DerivedFrom, k(b));
    store
        .commit(vec![ds(0), ds(1), ds(2), link(1, 0), link(2, 1)])
        .unwrap();
    let snap = store.read();
    let [d0, d1, d2] = [0, 1, 2].map(|i| snap.find(&k(i)).unwrap());
    // After the snapshot, d2 feeds d0 and d0 stops feeding d1: the order turns around.
    store.commit(vec![link(0, 2)]).unwrap();
    store
        .commit(vec![Change::Unlink {
            from: k(1),
            edge: EdgeKind::DerivedFrom,
            to: k(0),
        }])
        .unwrap();
    let old = snap.petgraph_view();
    assert_eq!(edge_pairs(old), vec![(d0, d1), (d1, d2)]);
    assert_eq!(toposort(old, None).unwrap(), vec![d0, d1, d2]);
    assert!(has_path_connecting(old, d0, d2, None));
    let now = store.read();
    let new = now.petgraph_view();
    assert_eq!(edge_pairs(new), vec![(d1, d2), (d2, d0)]);
    assert_eq!(toposort(new, None).unwrap(), vec![d1, d2, d0]);
    assert!(!has_path_connecting(new, d0, d2, None));
    // Closing the loop shows up in a fresh snapshot only.
    store.commit(vec![link(1, 0)]).unwrap();
    assert!(toposort(now.petgraph_view(), None).is_ok());
    let cyclic = store.read();
    assert_eq!(tarjan_scc(cyclic.petgraph_view()).len(), 1);
}

#[test]
fn a_deep_cycle_is_reported_without_recursing() {
    // A ring of 20 000 datasets: petgraph's recursive tarjan_scc would overflow a test
    // thread's stack on it, so the crate's cycle report must not use it.
    let n = 20_000;
    let mut ch: Vec<Change> = (0..n)
        .map(|i| Change::Upsert(NodeSpec::with_key(NodeKind::Dataset, k(i))))
        .collect();
    ch.extend((0..n).map(|i| Change::link(k((i + 1) % n), EdgeKind::DerivedFrom, k(i))));
    let mut g = LineageGraph::new();
    g.commit(ch).unwrap();
    let s = g.find(&k(0)).unwrap();
    for dir in [Walk::downstream(), Walk::upstream()] {
        let r = g.walk(s, &dir).unwrap();
        assert_eq!(r.nodes.len(), n - 1);
        assert_eq!(r.cycles.len(), 1);
        assert_eq!(r.cycles[0].len(), n);
    }
    let view = g.petgraph_view();
    assert_eq!(kosaraju_scc(view).len(), 1);
    assert!(toposort(view, None).is_err());
    let last = g.find(&k(n - 1)).unwrap();
    assert!(has_path_connecting(view, s, last, None));
}
