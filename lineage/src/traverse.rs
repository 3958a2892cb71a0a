//! Upstream and downstream walks with depth, kind and budget limits; bounded path
//! enumeration; subgraph extraction; cycle reporting.

use std::collections::HashSet;

use petgraph::visit::IntoNeighbors;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::csr::{Csr, HIDDEN};
use crate::error::Result;
use crate::graph::{At, EdgeInfo, LineageGraph, NodeInfo};
use crate::schema::{EdgeKind, NodeKind};
use crate::typed::AnyNodeId;

/// Which way to walk: against the data flow or along it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Direction {
    /// Towards sources (a service back to its training data).
    Upstream,
    /// Towards consumers (a dataset forward to models and services).
    Downstream,
}

/// Options for a walk: direction, limits, filters and the view to read.
#[derive(Debug, Clone, PartialEq)]
pub struct Walk {
    pub(crate) direction: Direction,
    pub(crate) max_depth: Option<u32>,
    pub(crate) node_kinds: Vec<NodeKind>,
    pub(crate) edge_kinds: Vec<EdgeKind>,
    pub(crate) max_nodes: Option<usize>,
    pub(crate) time_budget: Option<Duration>,
    pub(crate) at: At,
    pub(crate) report_cycles: bool,
}

impl Walk {
    /// An unlimited walk in `direction` over the latest graph.
    pub fn new(direction: Direction) -> Self {
        Self {
            direction,
            max_depth: None,
            node_kinds: Vec::new(),
            edge_kinds: Vec::new(),
            max_nodes: None,
            time_budget: None,
            at: At::Latest,
            report_cycles: true,
        }
    }

    /// An unlimited downstream walk.
    pub fn downstream() -> Self {
        Self::new(Direction::Downstream)
    }

    /// An unlimited upstream walk.
    pub fn upstream() -> Self {
        Self::new(Direction::Upstream)
    }

    /// Stops after `depth` hops.
    pub fn max_depth(mut self, depth: u32) -> Self {
        self.max_depth = Some(depth);
        self
    }

    /// Reports only nodes of these kinds (the walk still passes through others).
    pub fn node_kinds(mut self, kinds: impl IntoIterator<Item = NodeKind>) -> Self {
        self.node_kinds = kinds.into_iter().collect();
        self
    }

    /// Follows only edges of these kinds.
    pub fn edge_kinds(mut self, kinds: impl IntoIterator<Item = EdgeKind>) -> Self {
        self.edge_kinds = kinds.into_iter().collect();
        self
    }

    /// Stops after visiting `n` nodes; the result is then flagged partial.
    pub fn max_nodes(mut self, n: usize) -> Self {
        self.max_nodes = Some(n);
        self
    }

    /// Stops after `d` of wall time; the result is then flagged partial.
    pub fn time_budget(mut self, d: Duration) -> Self {
        self.time_budget = Some(d);
        self
    }

    /// Reads the graph as of a point in time (or cumulatively).
    pub fn at(mut self, at: At) -> Self {
        self.at = at;
        self
    }

    /// Whether to look for cycles among reached nodes (on by default; costs one more pass).
    pub fn report_cycles(mut self, on: bool) -> Self {
        self.report_cycles = on;
        self
    }
}

/// One node reached by a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Reached {
    /// The node.
    pub id: AnyNodeId,
    /// Hops from the start along the path recorded in `via`.
    pub depth: u32,
    /// The node it was reached from (`None` only for the start).
    pub via: Option<AnyNodeId>,
}

/// The result of a walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WalkResult {
    /// The start node.
    pub start: AnyNodeId,
    /// Nodes reached, start excluded, in breadth-first order.
    pub nodes: Vec<Reached>,
    /// True when a node or time budget cut the walk short.
    pub partial: bool,
    /// Cycles among the visited nodes: each is a strongly connected set (or a self-loop).
    pub cycles: Vec<Vec<AnyNodeId>>,
}

impl WalkResult {
    /// The reached node ids.
    pub fn ids(&self) -> impl Iterator<Item = AnyNodeId> + '_ {
        self.nodes.iter().map(|r| r.id)
    }

    /// The path from the start to `id` (both included), following `via` links.
    pub fn path_to(&self, id: AnyNodeId) -> Option<Vec<AnyNodeId>> {
        let mut path = vec![id];
        let mut cur = id;
        let mut guard = 0;
        while cur != self.start {
            let r = self.nodes.iter().find(|r| r.id == cur)?;
            cur = r.via?;
            path.push(cur);
            guard += 1;
            if guard > self.nodes.len() {
                return None;
            }
        }
        path.reverse();
        Some(path)
    }
}

/// Simple paths between two nodes, from [`LineageGraph::paths`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Paths {
    /// Each path lists node ids from the source to the target.
    pub paths: Vec<Vec<AnyNodeId>>,
    /// True when `max_paths` cut the enumeration short.
    pub partial: bool,
}

/// A lineage subgraph with resolved metadata, ready to export.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Subgraph {
    /// The nodes.
    pub nodes: Vec<NodeInfo>,
    /// Edges between them, in declared direction.
    pub edges: Vec<EdgeInfo>,
    /// True when the walk that produced it was cut short.
    pub partial: bool,
}

pub(crate) fn kind_codes(kinds: &[EdgeKind]) -> [bool; 256] {
    let mut allowed = [kinds.is_empty(); 256];
    for k in kinds {
        allowed[k.code() as usize] = true;
    }
    allowed
}

impl LineageGraph {
    /// Walks from `start` per `walk`. Cycles and self-loops are visited once and reported.
    ///
    /// # Errors
    /// [`crate::Error::UnknownNode`] if `start` is not in the view.
    pub fn walk(&self, start: impl Into<AnyNodeId>, walk: &Walk) -> Result<WalkResult> {
        let start = start.into();
        let csr = self.csr_for(walk.at);
        if csr
            .node_kind
            .get(start.index())
            .is_none_or(|&k| k == HIDDEN)
        {
            return Err(crate::Error::UnknownNode {
                key: self
                    .key(start)
                    .map_or_else(|_| start.to_string(), |k| k.to_string()),
            });
        }
        let edge_ok = kind_codes(&walk.edge_kinds);
        let mut node_ok = [walk.node_kinds.is_empty(); 256];
        for k in &walk.node_kinds {
            node_ok[k.code() as usize] = true;
        }
        let began = Instant::now();
        let n = csr.len();
        let mut seen = vec![false; n];
        seen[start.index()] = true;
        let mut order: Vec<Reached> = vec![Reached {
            id: start,
            depth: 0,
            via: None,
        }];
        let mut head = 0;
        let mut partial = false;
        let max_depth = walk.max_depth.unwrap_or(u32::MAX);
        let max_nodes = walk.max_nodes.unwrap_or(usize::MAX);
        'outer: while head < order.len() {
            let cur = order[head];
            head += 1;
            if head % 1024 == 0
                && let Some(b) = walk.time_budget
                && began.elapsed() > b
            {
                partial = head < order.len();
                break;
            }
            if cur.depth >= max_depth {
                continue;
            }
            let (ts, ks) = match walk.direction {
                Direction::Downstream => csr.out(cur.id.0),
                Direction::Upstream => csr.inc(cur.id.0),
            };
            for (&t, &k) in ts.iter().zip(ks) {
                if !edge_ok[k as usize] || seen[t as usize] {
                    continue;
                }
                if order.len() > max_nodes {
                    partial = true;
                    break 'outer;
                }
                seen[t as usize] = true;
                order.push(Reached {
                    id: AnyNodeId(t),
                    depth: cur.depth + 1,
                    via: Some(cur.id),
                });
            }
        }
        let cycles = if walk.report_cycles {
            let members: Vec<u32> = order.iter().map(|r| r.id.0).collect();
            cycles_among(&csr, &members, &seen, &edge_ok, walk.direction)
        } else {
            Vec::new()
        };
        let nodes = order
            .into_iter()
            .skip(1)
            .filter(|r| node_ok[csr.node_kind[r.id.index()] as usize])
            .collect();
        Ok(WalkResult {
            start,
            nodes,
            partial,
            cycles,
        })
    }

    /// Simple paths from `from` to `to` along the data flow in the latest graph, at most
    /// `max_depth` hops long, stopping after `max_paths` paths (then flagged `partial`).
    ///
    /// This is petgraph's `all_simple_paths` run on [`LineageGraph::petgraph_view`]; parallel
    /// edges give repeated paths, as they do there.
    ///
    /// # Errors
    /// [`crate::Error::UnknownNode`] for handles from another graph.
    pub fn paths(
        &self,
        from: impl Into<AnyNodeId>,
        to: impl Into<AnyNodeId>,
        max_depth: u32,
        max_paths: usize,
    ) -> Result<Paths> {
        let (from, to) = (from.into(), to.into());
        self.row(from)?;
        self.row(to)?;
        // petgraph's enumeration, on the latest view: its iterator stops at `max_depth` hops
        // and is lazy, so asking for one path more than allowed tells whether the limit cut
        // the enumeration short without enumerating the rest.
        let Some(intermediate) = max_depth.checked_sub(1) else {
            return Ok(Paths {
                paths: Vec::new(),
                partial: false,
            });
        };
        let mut paths: Vec<Vec<AnyNodeId>> = petgraph::algo::all_simple_paths::<
            Vec<AnyNodeId>,
            _,
            std::collections::hash_map::RandomState,
        >(
            self.petgraph_view(),
            from,
            to,
            0,
            Some(intermediate as usize),
        )
        .take(max_paths.saturating_add(1))
        .collect();
        let partial = paths.len() > max_paths;
        paths.truncate(max_paths);
        Ok(Paths { paths, partial })
    }

    /// The subgraph a walk reaches (start included), with every visible edge among its nodes.
    ///
    /// # Errors
    /// As [`Self::walk`].
    pub fn subgraph(&self, start: impl Into<AnyNodeId>, walk: &Walk) -> Result<Subgraph> {
        let start = start.into();
        let w = self.walk(start, &walk.clone().node_kinds([]).report_cycles(false))?;
        let mut ids: Vec<u32> = std::iter::once(start.0)
            .chain(w.ids().map(|i| i.0))
            .collect();
        ids.sort_unstable();
        Ok(self.subgraph_of(&ids, walk.at, w.partial))
    }

    /// The whole graph in a view, as a subgraph.
    pub fn to_subgraph(&self, at: At) -> Subgraph {
        let ids: Vec<u32> = self.nodes(at).into_iter().map(|i| i.0).collect();
        self.subgraph_of(&ids, at, false)
    }

    pub(crate) fn subgraph_of(&self, ids: &[u32], at: At, partial: bool) -> Subgraph {
        let set: HashSet<u32> = ids.iter().copied().collect();
        let h = self.horizon(at);
        let mut edges = Vec::new();
        for &i in ids {
            let mut out: Vec<u32> = self
                .g
                .edges_of(i, crate::adj::Dir::Out)
                .filter(|(_, t, _)| set.contains(t))
                .map(|(e, _, _)| e)
                .filter(|&e| self.edge_visible(e, at, h))
                .collect();
            out.sort_unstable();
            edges.extend(out.into_iter().filter_map(|e| self.edge_info(e)));
        }
        Subgraph {
            nodes: ids
                .iter()
                .filter_map(|&i| self.info_at(AnyNodeId(i), at).ok())
                .collect(),
            edges,
            partial,
        }
    }
}

/// Cycles among `members` (the nodes a walk reached, `member` marking them by index):
/// petgraph's `kosaraju_scc` on the subgraph they induce through edges of allowed kinds, in
/// the walk's direction. [`Reach`] presents that subgraph to petgraph straight from the CSR
/// snapshot, so nothing is copied and the node order follows the walk.
/// Not `tarjan_scc`: petgraph's is recursive, and a long lineage chain overflows the stack,
/// while `kosaraju_scc` runs on petgraph's iterative depth-first walks.
fn cycles_among(
    csr: &Csr,
    members: &[u32],
    member: &[bool],
    edge_ok: &[bool; 256],
    dir: Direction,
) -> Vec<Vec<AnyNodeId>> {
    let reach = Reach {
        csr,
        members,
        member,
        edge_ok,
        dir,
    };
    let mut out: Vec<Vec<AnyNodeId>> = petgraph::algo::kosaraju_scc(reach)
        .into_iter()
        .filter(|c| match c[..] {
            [v] => reach.neighbors(v).any(|t| t == v),
            _ => true,
        })
        .map(|mut c| {
            c.sort_unstable();
            c
        })
        .collect();
    out.sort();
    out
}

/// The subgraph a walk reached, as petgraph sees it: the `members`, and the CSR edges of
/// allowed kinds between them, oriented along the walk (`Outgoing` is the walk's direction).
#[derive(Clone, Copy)]
struct Reach<'a> {
    csr: &'a Csr,
    members: &'a [u32],
    member: &'a [bool],
    edge_ok: &'a [bool; 256],
    dir: Direction,
}

impl<'a> Reach<'a> {
    fn list(self, v: AnyNodeId, d: petgraph::Direction) -> ReachNeighbors<'a> {
        let forward = matches!(
            (self.dir, d),
            (Direction::Downstream, petgraph::Direction::Outgoing)
                | (Direction::Upstream, petgraph::Direction::Incoming)
        );
        let (ts, ks) = if self.member.get(v.index()).is_some_and(|&m| m) {
            if forward {
                self.csr.out(v.0)
            } else {
                self.csr.inc(v.0)
            }
        } else {
            (&[][..], &[][..])
        };
        ReachNeighbors {
            reach: self,
            ts: ts.iter(),
            ks: ks.iter(),
        }
    }
}

struct ReachNeighbors<'a> {
    reach: Reach<'a>,
    ts: std::slice::Iter<'a, u32>,
    ks: std::slice::Iter<'a, u8>,
}

impl Iterator for ReachNeighbors<'_> {
    type Item = AnyNodeId;

    fn next(&mut self) -> Option<AnyNodeId> {
        loop {
            let (&t, &k) = (self.ts.next()?, self.ks.next()?);
            if self.reach.edge_ok[k as usize]
                && self.reach.member.get(t as usize).is_some_and(|&m| m)
            {
                return Some(AnyNodeId(t));
            }
        }
    }
}

impl petgraph::visit::GraphBase for Reach<'_> {
    type NodeId = AnyNodeId;
    type EdgeId = ();
}

impl petgraph::visit::GraphRef for Reach<'_> {}

impl petgraph::visit::Visitable for Reach<'_> {
    type Map = crate::view::VisitSet;

    fn visit_map(&self) -> crate::view::VisitSet {
        crate::view::VisitSet::with_bound(self.csr.len())
    }

    fn reset_map(&self, map: &mut crate::view::VisitSet) {
        map.reset(self.csr.len());
    }
}

impl<'a> petgraph::visit::IntoNeighbors for Reach<'a> {
    type Neighbors = ReachNeighbors<'a>;

    fn neighbors(self, v: AnyNodeId) -> ReachNeighbors<'a> {
        self.list(v, petgraph::Direction::Outgoing)
    }
}

impl<'a> petgraph::visit::IntoNeighborsDirected for Reach<'a> {
    type NeighborsDirected = ReachNeighbors<'a>;

    fn neighbors_directed(self, v: AnyNodeId, d: petgraph::Direction) -> ReachNeighbors<'a> {
        self.list(v, d)
    }
}

impl<'a> petgraph::visit::IntoNodeIdentifiers for Reach<'a> {
    type NodeIdentifiers =
        std::iter::Map<std::iter::Copied<std::slice::Iter<'a, u32>>, fn(u32) -> AnyNodeId>;

    fn node_identifiers(self) -> Self::NodeIdentifiers {
        self.members
            .iter()
            .copied()
            .map(AnyNodeId as fn(u32) -> AnyNodeId)
    }
}
