//! Walks, limits, budgets, cycles, paths and subgraphs.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::time::Duration;

use keel_lineage::*;

fn k(s: &str) -> NodeKey {
    NodeKey::parse(s).unwrap()
}

/// A chain of datasets `ns:d0 <- ns:d1 <- ... <- ns:d{n-1}` (each derived from the previous).
fn chain(n: usize) -> LineageGraph {
    let mut g = LineageGraph::new();
    let mut ch: Vec<Change> = (0..n)
        .map(|i| Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", format!("d{i}"))))
        .collect();
    for i in 1..n {
        ch.push(Change::link(
            k(&format!("ns:d{i}")),
            EdgeKind::DerivedFrom,
            k(&format!("ns:d{}", i - 1)),
        ));
    }
    g.commit(ch).unwrap();
    g
}

fn keys(g: &LineageGraph, r: &WalkResult) -> Vec<String> {
    r.ids().map(|i| g.key(i).unwrap().to_string()).collect()
}

#[test]
fn depth_and_direction() {
    let g = chain(6);
    let d0 = g.find(&k("ns:d0")).unwrap();
    let d5 = g.find(&k("ns:d5")).unwrap();
    let r = g.walk(d0, &Walk::downstream().max_depth(2)).unwrap();
    assert_eq!(keys(&g, &r), vec!["ns:d1", "ns:d2"]);
    assert_eq!(r.nodes[1].depth, 2);
    assert!(!r.partial);
    let r = g.walk(d5, &Walk::upstream()).unwrap();
    assert_eq!(r.nodes.len(), 5);
    assert_eq!(r.path_to(d0).unwrap().len(), 6);
    assert!(g.walk(d0, &Walk::upstream()).unwrap().nodes.is_empty());
}

#[test]
fn node_and_time_budgets_give_partial_results() {
    let g = chain(50);
    let d0 = g.find(&k("ns:d0")).unwrap();
    let r = g.walk(d0, &Walk::downstream().max_nodes(10)).unwrap();
    assert!(r.partial);
    assert!(r.nodes.len() <= 10);
    let r = g
        .walk(d0, &Walk::downstream().time_budget(Duration::ZERO))
        .unwrap();
    assert!(r.nodes.len() <= 49);
    let full = g
        .walk(d0, &Walk::downstream().time_budget(Duration::from_secs(60)))
        .unwrap();
    assert!(!full.partial);
    assert_eq!(full.nodes.len(), 49);
}

#[test]
fn kind_and_edge_filters() {
    let mut g = LineageGraph::new();
    g.commit(vec![
        Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "raw")),
        Change::Upsert(NodeSpec::new(NodeKind::Workflow, "ns", "etl")),
        Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "clean")),
        Change::Upsert(NodeSpec::new(NodeKind::ModelVersion, "ns", "m@1")),
        Change::link(k("ns:etl"), EdgeKind::Reads, k("ns:raw")),
        Change::link(k("ns:etl"), EdgeKind::Writes, k("ns:clean")),
        Change::link(k("ns:m@1"), EdgeKind::TrainedOn, k("ns:clean")),
    ])
    .unwrap();
    let raw = g.find(&k("ns:raw")).unwrap();
    let r = g
        .walk(
            raw,
            &Walk::downstream().node_kinds([NodeKind::ModelVersion]),
        )
        .unwrap();
    assert_eq!(keys(&g, &r), vec!["ns:m@1"]);
    let r = g
        .walk(raw, &Walk::downstream().edge_kinds([EdgeKind::Reads]))
        .unwrap();
    assert_eq!(keys(&g, &r), vec!["ns:etl"]);
}

#[test]
fn cycles_and_self_loops_are_tolerated_and_reported() {
    let mut g = LineageGraph::new();
    g.commit(vec![
        Change::Upsert(NodeSpec::new(NodeKind::Workflow, "ns", "job")),
        Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "t")),
        Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "u")),
        // The job reads and writes the same table.
        Change::link(k("ns:job"), EdgeKind::Reads, k("ns:t")),
        Change::link(k("ns:job"), EdgeKind::Writes, k("ns:t")),
        Change::link(k("ns:u"), EdgeKind::DerivedFrom, k("ns:t")),
        Change::link(k("ns:u"), EdgeKind::DerivedFrom, k("ns:u")),
    ])
    .unwrap();
    let t = g.find(&k("ns:t")).unwrap();
    let job = g.find(&k("ns:job")).unwrap();
    let u = g.find(&k("ns:u")).unwrap();
    let r = g.walk(t, &Walk::downstream()).unwrap();
    assert_eq!(r.nodes.len(), 2);
    assert!(r.cycles.contains(&{
        let mut c = vec![t, job];
        c.sort();
        c
    }));
    assert!(r.cycles.contains(&vec![u]));
    let p = g.paths(t, u, 10, 100).unwrap();
    assert_eq!(p.paths, vec![vec![t, u]]);
}

#[test]
fn all_paths_are_bounded() {
    // A diamond ladder: 2^5 paths from s to the end.
    let mut g = LineageGraph::new();
    let mut ch = vec![Change::Upsert(NodeSpec::new(NodeKind::Dataset, "ns", "n0"))];
    for i in 1..=5 {
        for side in ["a", "b"] {
            ch.push(Change::Upsert(NodeSpec::new(
                NodeKind::Dataset,
                "ns",
                format!("{side}{i}"),
            )));
            ch.push(Change::link(
                k(&format!("ns:{side}{i}")),
                EdgeKind::DerivedFrom,
                k(&format!("ns:n{}", i - 1)),
            ));
        }
        ch.push(Change::Upsert(NodeSpec::new(
            NodeKind::Dataset,
            "ns",
            format!("n{i}"),
        )));
        for side in ["a", "b"] {
            ch.push(Change::link(
                k(&format!("ns:n{i}")),
                EdgeKind::DerivedFrom,
                k(&format!("ns:{side}{i}")),
            ));
        }
    }
    g.commit(ch).unwrap();
    let s = g.find(&k("ns:n0")).unwrap();
    let e = g.find(&k("ns:n5")).unwrap();
    let all = g.paths(s, e, 100, 1000).unwrap();
    assert_eq!(all.paths.len(), 32);
    assert!(!all.partial);
    let few = g.paths(s, e, 100, 3).unwrap();
    assert_eq!(few.paths.len(), 3);
    assert!(few.partial);
    // Exactly as many paths as allowed is complete; none allowed is cut short.
    let exact = g.paths(s, e, 100, 32).unwrap();
    assert_eq!((exact.paths.len(), exact.partial), (32, false));
    let none = g.paths(s, e, 100, 0).unwrap();
    assert_eq!((none.paths.len(), none.partial), (0, true));
    assert!(
        all.paths
            .iter()
            .all(|p| p.first() == Some(&s) && p.last() == Some(&e))
    );
    assert!(g.paths(s, e, 4, 1000).unwrap().paths.is_empty());
}

#[test]
fn subgraph_and_exports() {
    let g = chain(3);
    let d0 = g.find(&k("ns:d0")).unwrap();
    let sg = g.subgraph(d0, &Walk::downstream()).unwrap();
    assert_eq!(sg.nodes.len(), 3);
    assert_eq!(sg.edges.len(), 2);
    let dot = sg.to_dot();
    assert!(dot.starts_with("digraph lineage {"));
    assert!(dot.contains("\"ns:d1\" -> \"ns:d0\" [label=\"derived-from\"]"));
    let mm = sg.to_mermaid();
    assert!(mm.starts_with("flowchart LR"));
    assert_eq!(mm.matches("-->|derived-from|").count(), 2);
    let json: serde_json::Value = serde_json::from_str(&sg.to_json()).unwrap();
    assert_eq!(json["nodes"].as_array().unwrap().len(), 3);
    assert_eq!(json["edges"][0]["kind_name"], "derived-from");
    assert_eq!(json["edges"][0]["from"], "ns:d1");
    assert_eq!(json["nodes"][0]["key"], "ns:d0");
    assert_eq!(g.to_subgraph(At::Latest).nodes.len(), 3);
}

#[test]
fn unknown_start_is_an_error() {
    let g = chain(2);
    let other = chain(5);
    let foreign = other.find(&k("ns:d4")).unwrap();
    assert!(matches!(
        g.walk(foreign, &Walk::downstream()),
        Err(Error::UnknownNode { .. })
    ));
}
