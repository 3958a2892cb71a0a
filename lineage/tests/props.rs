//! Property tests: impact sets equal reachability, and adding an edge never shrinks a
//! downstream set.
#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::collections::{BTreeSet, VecDeque};

use keel_lineage::*;
use proptest::prelude::*;

fn k(i: usize) -> NodeKey {
    NodeKey::new("p", format!("d{i}"))
}

/// Builds a dataset graph from `(derived, source)` pairs; edges flow source -> derived.
fn build(n: usize, edges: &[(usize, usize)]) -> LineageGraph {
    let mut g = LineageGraph::new();
    let mut ch: Vec<Change> = (0..n)
        .map(|i| Change::Upsert(NodeSpec::with_key(NodeKind::Dataset, k(i))))
        .collect();
    for &(a, b) in edges {
        ch.push(Change::link(k(a), EdgeKind::DerivedFrom, k(b)));
    }
    g.commit(ch).unwrap();
    g
}

fn reachable(n: usize, edges: &[(usize, usize)], start: usize) -> BTreeSet<usize> {
    let mut adj = vec![Vec::new(); n];
    for &(derived, source) in edges {
        adj[source].push(derived);
    }
    let mut seen = BTreeSet::new();
    let mut q = VecDeque::from([start]);
    while let Some(x) = q.pop_front() {
        for &y in &adj[x] {
            if y != start && seen.insert(y) {
                q.push_back(y);
            }
        }
    }
    seen
}

fn index_of(g: &LineageGraph, id: AnyNodeId) -> usize {
    g.key(id).unwrap().name()[1..].parse().unwrap()
}

fn graph_strategy() -> impl Strategy<Value = (usize, Vec<(usize, usize)>, usize)> {
    (2usize..30).prop_flat_map(|n| (Just(n), prop::collection::vec((0..n, 0..n), 0..80), 0..n))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn impact_set_equals_reachability((n, edges, start) in graph_strategy()) {
        let g = build(n, &edges);
        let s = g.find(&k(start)).unwrap();
        let expected = reachable(n, &edges, start);
        for change in [ProposedChange::Retire(s), ProposedChange::Deprecate(s)] {
            let set = g.impact_set(&change, &Budget::unlimited()).unwrap();
            let got: BTreeSet<usize> = set.iter().map(|(id, _, _)| index_of(&g, id)).filter(|&i| i != start).collect();
            prop_assert_eq!(&got, &expected);
            prop_assert!(!set.is_partial());
        }
        let walked: BTreeSet<usize> = g.walk(s, &Walk::downstream()).unwrap().ids().map(|id| index_of(&g, id)).collect();
        prop_assert_eq!(&walked, &expected);
    }

    #[test]
    fn adding_an_edge_never_shrinks_a_downstream_set(
        (n, edges, start) in graph_strategy(),
        extra in (0usize..30, 0usize..30),
    ) {
        let (a, b) = (extra.0 % n, extra.1 % n);
        let before = build(n, &edges);
        let mut more = edges.clone();
        more.push((a, b));
        let after = build(n, &more);
        let set = |g: &LineageGraph| -> BTreeSet<usize> {
            let s = g.find(&k(start)).unwrap();
            g.walk(s, &Walk::downstream()).unwrap().ids().map(|id| index_of(g, id)).collect()
        };
        let (x, y) = (set(&before), set(&after));
        prop_assert!(x.is_subset(&y));
    }

    #[test]
    fn impact_distances_follow_their_paths((n, edges, start) in graph_strategy()) {
        let g = build(n, &edges);
        let s = g.find(&k(start)).unwrap();
        let r = g.impact(&ProposedChange::Retire(s)).unwrap();
        for a in &r.affected {
            prop_assert_eq!(a.path.len() as u32, a.distance + 1);
            prop_assert_eq!(a.path.first().map(String::as_str), Some(r.root.as_str()));
            prop_assert_eq!(a.path.last(), Some(&a.key));
        }
    }
}
