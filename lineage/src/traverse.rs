//! Upstream and downstream walks with depth, kind and budget limits; bounded path
//! enumeration; subgraph extraction; cycle reporting.

use std::collections::HashSet;
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

    /// Simple paths from `from` to `to` along the data flow, at most `max_depth` hops long,
    /// stopping after `max_paths` paths.
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
        let csr = self.snapshot();
        let mut paths = Vec::new();
        let mut partial = false;
        let mut on_path = vec![false; csr.len()];
        // Iterative DFS: a stack of (node, next-edge cursor).
        let mut stack: Vec<(u32, usize)> = vec![(from.0, 0)];
        on_path[from.index()] = true;
        while let Some(&(node, cursor)) = stack.last() {
            let (ts, _) = csr.out(node);
            if node == to.0 && stack.len() > 1 {
                paths.push(stack.iter().map(|&(n, _)| AnyNodeId(n)).collect());
                if paths.len() >= max_paths {
                    partial = true;
                    break;
                }
                on_path[node as usize] = false;
                stack.pop();
                continue;
            }
            if cursor >= ts.len() || stack.len() > max_depth as usize {
                on_path[node as usize] = false;
                stack.pop();
                continue;
            }
            let next = ts[cursor];
            if let Some(top) = stack.last_mut() {
                top.1 += 1;
            }
            if !on_path[next as usize] {
                on_path[next as usize] = true;
                stack.push((next, 0));
            }
        }
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

/// Tarjan's strongly connected components, iteratively, restricted to `members`.
fn cycles_among(
    csr: &Csr,
    members: &[u32],
    member: &[bool],
    edge_ok: &[bool; 256],
    dir: Direction,
) -> Vec<Vec<AnyNodeId>> {
    let adj = |v: u32| match dir {
        Direction::Downstream => csr.out(v),
        Direction::Upstream => csr.inc(v),
    };
    let mut index = std::collections::HashMap::<u32, (u32, u32)>::with_capacity(members.len());
    let mut on_stack = HashSet::new();
    let mut stack: Vec<u32> = Vec::new();
    let mut next = 0u32;
    let mut out = Vec::new();
    for &root in members {
        if index.contains_key(&root) {
            continue;
        }
        let mut call: Vec<(u32, usize)> = vec![(root, 0)];
        index.insert(root, (next, next));
        next += 1;
        stack.push(root);
        on_stack.insert(root);
        while let Some(&(v, cur)) = call.last() {
            let (ts, ks) = adj(v);
            if cur < ts.len() {
                let (w, k) = (ts[cur], ks[cur]);
                if let Some(top) = call.last_mut() {
                    top.1 += 1;
                }
                if !edge_ok[k as usize] || !member[w as usize] {
                    continue;
                }
                if let Some(&(wi, _)) = index.get(&w) {
                    if on_stack.contains(&w)
                        && let Some(e) = index.get_mut(&v)
                    {
                        e.1 = e.1.min(wi);
                    }
                } else {
                    index.insert(w, (next, next));
                    next += 1;
                    stack.push(w);
                    on_stack.insert(w);
                    call.push((w, 0));
                }
                continue;
            }
            call.pop();
            let (vi, vl) = index[&v];
            if let Some(&(p, _)) = call.last()
                && let Some(e) = index.get_mut(&p)
            {
                e.1 = e.1.min(vl);
            }
            if vi == vl {
                let mut comp = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack.remove(&w);
                    comp.push(AnyNodeId(w));
                    if w == v {
                        break;
                    }
                }
                let self_loop = comp.len() == 1 && {
                    let (ts, ks) = adj(v);
                    ts.iter()
                        .zip(ks)
                        .any(|(&t, &k)| t == v && edge_ok[k as usize])
                };
                if comp.len() > 1 || self_loop {
                    comp.sort_unstable();
                    out.push(comp);
                }
            }
        }
    }
    out.sort();
    out
}
