//! The graph as a petgraph graph: a borrowed view that implements petgraph's visit traits
//! over the node and edge tables, showing only what is valid in one [`At`] view.

use petgraph::visit::{
    self, Data, EdgeCount, EdgeIndexable, GraphBase, GraphProp, GraphRef, IntoEdgeReferences,
    IntoEdges, IntoEdgesDirected, IntoNeighbors, IntoNeighborsDirected, IntoNodeIdentifiers,
    IntoNodeReferences, NodeCount, NodeIndexable, VisitMap, Visitable,
};
use serde::Serialize;

use crate::adj::{self, Dir};
use crate::graph::{At, EdgeInfo, LineageGraph};
use crate::schema::{EdgeKind, NodeKind};
use crate::typed::AnyNodeId;

/// A handle to an edge: its position in the graph's edge table.
///
/// Like node handles, edge handles are stable for the life of a graph (removal ends an
/// edge's validity instead of deleting it) and only meaningful for the graph that made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct EdgeId(pub(crate) u32);

impl EdgeId {
    /// The handle's position in the graph's edge table.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// A [`LineageGraph`] seen as a petgraph graph, as of one [`At`] view.
///
/// It implements petgraph's visit traits (`GraphBase`, `IntoNeighbors`,
/// `IntoNeighborsDirected`, `IntoEdges`, `IntoEdgesDirected`, `IntoEdgeReferences`,
/// `IntoNodeIdentifiers`, `IntoNodeReferences`, `NodeIndexable`, `NodeCount`, `EdgeCount`,
/// `Visitable`, `Data`, `GraphProp`), so petgraph's traversals and algorithms (`Dfs`, `Bfs`,
/// `Topo`, `tarjan_scc`, `kosaraju_scc`, `has_path_connecting`, `toposort`,
/// `all_simple_paths`, ...) run on the graph itself, without a copy.
///
/// - Node ids are [`AnyNodeId`]s and edge ids are [`EdgeId`]s; node weights are
///   [`NodeKind`]s and edge weights [`EdgeKind`]s.
/// - Edges point along the data flow, from source to consumer, whatever their declared
///   direction: `Outgoing` neighbours are downstream, `Incoming` ones upstream (wrap the view
///   in `petgraph::visit::Reversed` to walk upstream with a forward algorithm).
/// - Only nodes and edges valid in the view are visible: a node or edge created after the
///   view's time, or removed at or before it, does not appear, and neither does an edge
///   with an end that is not visible. Placeholder nodes (undeclared datasets) are nodes like
///   any other. [`At::Cumulative`] shows everything that ever existed.
/// - Node indices are the table positions, so `node_bound` counts hidden nodes too and the
///   ids are not compact: algorithms that need `NodeCompactIndexable` do not apply.
/// - Neighbours are listed newest edge first, as in petgraph's `Graph`; parallel edges give
///   repeated neighbours.
/// - petgraph 0.8's `tarjan_scc` and `depth_first_search` (so `is_cyclic_directed` too)
///   recurse once per node along a path, so on a lineage chain tens of thousands of nodes
///   deep they can overflow a thread's stack; prefer `kosaraju_scc` and `toposort`, which,
///   like `Dfs`, `Bfs`, `has_path_connecting` and `all_simple_paths`, are iterative.
///
/// The view borrows the graph, so it is as immutable as the graph it reads; take it from a
/// [`crate::Snapshot`] to run an algorithm while a [`crate::LineageStore`] keeps committing.
///
/// ```
/// use keel_lineage::{edges, nodes, At, Change, LineageGraph, NodeKind, NodeSpec, Timestamp};
/// use petgraph::algo::{has_path_connecting, kosaraju_scc, toposort};
/// use petgraph::visit::Dfs;
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut g = LineageGraph::new();
/// let raw = g.upsert::<nodes::Dataset>(NodeSpec::new(NodeKind::Dataset, "s3", "raw"))?;
/// let clean = g.upsert::<nodes::Dataset>(NodeSpec::new(NodeKind::Dataset, "s3", "clean"))?;
/// let mv = g.upsert::<nodes::ModelVersion>(NodeSpec::new(NodeKind::ModelVersion, "ml", "m@1"))?;
/// g.connect(clean, edges::DerivedFrom, raw)?;
/// g.connect(mv, edges::TrainedOn, clean)?;
///
/// let view = g.petgraph_view();
/// // Data flows raw -> clean -> m@1.
/// assert!(has_path_connecting(view, raw.erase(), mv.erase(), None));
/// assert_eq!(toposort(view, None).ok(), Some(vec![raw.erase(), clean.erase(), mv.erase()]));
/// assert!(kosaraju_scc(view).iter().all(|scc| scc.len() == 1));
///
/// let mut dfs = Dfs::new(view, raw.erase());
/// let mut reached = 0;
/// while dfs.next(view).is_some() {
///     reached += 1;
/// }
/// assert_eq!(reached, 3);
///
/// // Removing the model hides it and its edge from the latest view, not from the past.
/// let before = Timestamp::now();
/// g.commit_at(before.plus_minutes(1), vec![Change::Remove { key: g.key(mv)? }])?;
/// assert!(!has_path_connecting(g.petgraph_view(), raw.erase(), mv.erase(), None));
/// assert!(has_path_connecting(g.petgraph_view_at(At::Time(before)), raw.erase(), mv.erase(), None));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Copy)]
pub struct GraphView<'a> {
    g: &'a LineageGraph,
    at: At,
    /// Commits visible in the view (see [`LineageGraph::horizon`]).
    h: u32,
}

impl LineageGraph {
    /// The latest graph as a petgraph graph; see [`GraphView`].
    pub fn petgraph_view(&self) -> GraphView<'_> {
        self.petgraph_view_at(At::Latest)
    }

    /// The graph as of `at`, as a petgraph graph; see [`GraphView`].
    pub fn petgraph_view_at(&self, at: At) -> GraphView<'_> {
        GraphView {
            g: self,
            at,
            h: self.horizon(at),
        }
    }
}

impl<'a> GraphView<'a> {
    /// The graph this view reads.
    pub fn graph(&self) -> &'a LineageGraph {
        self.g
    }

    /// The view's point in time.
    pub fn at(&self) -> At {
        self.at
    }

    /// Whether a node is visible in this view.
    pub fn contains_node(&self, id: AnyNodeId) -> bool {
        self.g.node_visible(id.0, self.at, self.h)
    }

    /// Whether an edge is visible in this view.
    pub fn contains_edge(&self, id: EdgeId) -> bool {
        self.edge_ok(id.0)
    }

    /// The `(source, target)` of a visible edge, in data-flow order.
    pub fn endpoints(&self, id: EdgeId) -> Option<(AnyNodeId, AnyNodeId)> {
        if !self.edge_ok(id.0) {
            return None;
        }
        let (s, t) = self.g.g.endpoints(id.0)?;
        Some((AnyNodeId(s), AnyNodeId(t)))
    }

    /// A visible edge with its keys, declared direction and transformation.
    pub fn edge_info(&self, id: EdgeId) -> Option<EdgeInfo> {
        if !self.edge_ok(id.0) {
            return None;
        }
        self.g.edge_info(id.0)
    }

    /// Whether edge `e` and both its ends are valid in the view.
    #[inline]
    fn edge_ok(&self, e: u32) -> bool {
        self.g.edge_visible(e, self.at, self.h)
            && self.g.g.endpoints(e).is_some_and(|(s, t)| {
                self.g.node_visible(s, self.at, self.h) && self.g.node_visible(t, self.at, self.h)
            })
    }

    fn list(self, n: AnyNodeId, dir: Dir) -> Edges<'a> {
        Edges {
            view: self,
            inner: self.g.g.edges_of(n.0, dir),
            dir,
            node: n.0,
        }
    }
}

/// An edge of a [`GraphView`]: petgraph's `EdgeRef` for the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewEdge<'a> {
    id: EdgeId,
    source: AnyNodeId,
    target: AnyNodeId,
    kind: &'a EdgeKind,
}

impl ViewEdge<'_> {
    /// The edge's kind.
    pub fn kind(&self) -> EdgeKind {
        *self.kind
    }
}

impl<'a> visit::EdgeRef for ViewEdge<'a> {
    type NodeId = AnyNodeId;
    type EdgeId = EdgeId;
    type Weight = EdgeKind;

    fn source(&self) -> AnyNodeId {
        self.source
    }

    fn target(&self) -> AnyNodeId {
        self.target
    }

    fn weight(&self) -> &EdgeKind {
        self.kind
    }

    fn id(&self) -> EdgeId {
        self.id
    }
}

/// The visible edges of one adjacency list of a [`GraphView`].
#[derive(Clone)]
pub struct Edges<'a> {
    view: GraphView<'a>,
    inner: adj::Edges<'a>,
    dir: Dir,
    node: u32,
}

impl std::fmt::Debug for Edges<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edges")
            .field("node", &self.node)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl<'a> Iterator for Edges<'a> {
    type Item = ViewEdge<'a>;

    fn next(&mut self) -> Option<ViewEdge<'a>> {
        for (e, other, row) in self.inner.by_ref() {
            if !self.view.edge_ok(e) {
                continue;
            }
            let (source, target) = match self.dir {
                Dir::Out => (self.node, other),
                Dir::In => (other, self.node),
            };
            return Some(ViewEdge {
                id: EdgeId(e),
                source: AnyNodeId(source),
                target: AnyNodeId(target),
                kind: &row.kind,
            });
        }
        None
    }
}

/// The visible neighbours of a node in a [`GraphView`], one per visible edge.
#[derive(Debug, Clone)]
pub struct Neighbors<'a> {
    edges: Edges<'a>,
}

impl Iterator for Neighbors<'_> {
    type Item = AnyNodeId;

    fn next(&mut self) -> Option<AnyNodeId> {
        let e = self.edges.next()?;
        Some(match self.edges.dir {
            Dir::Out => e.target,
            Dir::In => e.source,
        })
    }
}

/// Every visible edge of a [`GraphView`], in table order.
#[derive(Debug, Clone)]
pub struct EdgeReferences<'a> {
    view: GraphView<'a>,
    next: u32,
}

impl<'a> Iterator for EdgeReferences<'a> {
    type Item = ViewEdge<'a>;

    fn next(&mut self) -> Option<ViewEdge<'a>> {
        let g = &self.view.g.g;
        while (self.next as usize) < g.edge_count() {
            let e = self.next;
            self.next += 1;
            if !self.view.edge_ok(e) {
                continue;
            }
            let ((s, t), row) = (g.endpoints(e)?, g.edge(e)?);
            return Some(ViewEdge {
                id: EdgeId(e),
                source: AnyNodeId(s),
                target: AnyNodeId(t),
                kind: &row.kind,
            });
        }
        None
    }
}

/// Every visible node of a [`GraphView`] with its kind, in table order.
#[derive(Debug, Clone)]
pub struct NodeReferences<'a> {
    view: GraphView<'a>,
    next: u32,
}

impl<'a> Iterator for NodeReferences<'a> {
    type Item = (AnyNodeId, &'a NodeKind);

    fn next(&mut self) -> Option<Self::Item> {
        let g = self.view.g;
        while (self.next as usize) < g.g.node_count() {
            let i = self.next;
            self.next += 1;
            if g.node_visible(i, self.view.at, self.view.h) {
                return Some((AnyNodeId(i), &g.g.node(i)?.kind));
            }
        }
        None
    }
}

/// Every visible node id of a [`GraphView`], in table order.
#[derive(Debug, Clone)]
pub struct NodeIdentifiers<'a> {
    nodes: NodeReferences<'a>,
}

impl Iterator for NodeIdentifiers<'_> {
    type Item = AnyNodeId;

    fn next(&mut self) -> Option<AnyNodeId> {
        self.nodes.next().map(|(id, _)| id)
    }
}

/// The visited set petgraph's traversals keep for a [`GraphView`]: one bit per node index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VisitSet {
    words: Vec<u64>,
}

impl VisitSet {
    pub(crate) fn with_bound(n: usize) -> Self {
        Self {
            words: vec![0; n.div_ceil(64)],
        }
    }

    pub(crate) fn reset(&mut self, n: usize) {
        self.words.clear();
        self.words.resize(n.div_ceil(64), 0);
    }
}

impl VisitMap<AnyNodeId> for VisitSet {
    /// Marks `a` visited; true if it was not visited before. An index beyond the set's
    /// bound (a node from another graph) grows the set rather than panicking.
    fn visit(&mut self, a: AnyNodeId) -> bool {
        let (w, bit) = (a.index() / 64, 1u64 << (a.index() % 64));
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        let fresh = self.words[w] & bit == 0;
        self.words[w] |= bit;
        fresh
    }

    fn is_visited(&self, a: &AnyNodeId) -> bool {
        self.words
            .get(a.index() / 64)
            .is_some_and(|w| w & (1u64 << (a.index() % 64)) != 0)
    }

    fn unvisit(&mut self, a: AnyNodeId) -> bool {
        let bit = 1u64 << (a.index() % 64);
        match self.words.get_mut(a.index() / 64) {
            Some(w) if *w & bit != 0 => {
                *w &= !bit;
                true
            }
            _ => false,
        }
    }
}

impl GraphBase for GraphView<'_> {
    type NodeId = AnyNodeId;
    type EdgeId = EdgeId;
}

impl GraphRef for GraphView<'_> {}

impl Data for GraphView<'_> {
    type NodeWeight = NodeKind;
    type EdgeWeight = EdgeKind;
}

impl GraphProp for GraphView<'_> {
    type EdgeType = petgraph::Directed;
}

impl NodeIndexable for GraphView<'_> {
    fn node_bound(&self) -> usize {
        self.g.g.node_count()
    }

    fn to_index(&self, a: AnyNodeId) -> usize {
        a.index()
    }

    fn from_index(&self, i: usize) -> AnyNodeId {
        AnyNodeId(i as u32)
    }
}

impl EdgeIndexable for GraphView<'_> {
    fn edge_bound(&self) -> usize {
        self.g.g.edge_count()
    }

    fn to_index(&self, a: EdgeId) -> usize {
        a.index()
    }

    fn from_index(&self, i: usize) -> EdgeId {
        EdgeId(i as u32)
    }
}

impl NodeCount for GraphView<'_> {
    /// The number of visible nodes; counting them costs a pass over the node table for an
    /// [`At::Time`] view.
    fn node_count(&self) -> usize {
        match self.at {
            At::Cumulative => self.g.g.node_count(),
            At::Latest => self
                .g
                .g
                .node_count()
                .saturating_sub(self.g.node_removed.len()),
            At::Time(_) => self.node_identifiers().count(),
        }
    }
}

impl EdgeCount for GraphView<'_> {
    /// The number of visible edges; counting them costs a pass over the edge table.
    fn edge_count(&self) -> usize {
        self.edge_references().count()
    }
}

impl Visitable for GraphView<'_> {
    type Map = VisitSet;

    fn visit_map(&self) -> VisitSet {
        VisitSet::with_bound(self.node_bound())
    }

    fn reset_map(&self, map: &mut VisitSet) {
        map.reset(self.node_bound());
    }
}

impl<'a> IntoNeighbors for GraphView<'a> {
    type Neighbors = Neighbors<'a>;

    fn neighbors(self, a: AnyNodeId) -> Neighbors<'a> {
        Neighbors {
            edges: self.list(a, Dir::Out),
        }
    }
}

impl<'a> IntoNeighborsDirected for GraphView<'a> {
    type NeighborsDirected = Neighbors<'a>;

    fn neighbors_directed(self, a: AnyNodeId, d: petgraph::Direction) -> Neighbors<'a> {
        Neighbors {
            edges: self.list(a, dir_of(d)),
        }
    }
}

impl<'a> IntoEdgeReferences for GraphView<'a> {
    type EdgeRef = ViewEdge<'a>;
    type EdgeReferences = EdgeReferences<'a>;

    fn edge_references(self) -> EdgeReferences<'a> {
        EdgeReferences {
            view: self,
            next: 0,
        }
    }
}

impl<'a> IntoEdges for GraphView<'a> {
    type Edges = Edges<'a>;

    fn edges(self, a: AnyNodeId) -> Edges<'a> {
        self.list(a, Dir::Out)
    }
}

impl<'a> IntoEdgesDirected for GraphView<'a> {
    type EdgesDirected = Edges<'a>;

    fn edges_directed(self, a: AnyNodeId, d: petgraph::Direction) -> Edges<'a> {
        self.list(a, dir_of(d))
    }
}

impl<'a> IntoNodeIdentifiers for GraphView<'a> {
    type NodeIdentifiers = NodeIdentifiers<'a>;

    fn node_identifiers(self) -> NodeIdentifiers<'a> {
        NodeIdentifiers {
            nodes: self.node_references(),
        }
    }
}

impl<'a> IntoNodeReferences for GraphView<'a> {
    type NodeRef = (AnyNodeId, &'a NodeKind);
    type NodeReferences = NodeReferences<'a>;

    fn node_references(self) -> NodeReferences<'a> {
        NodeReferences {
            view: self,
            next: 0,
        }
    }
}

fn dir_of(d: petgraph::Direction) -> Dir {
    match d {
        petgraph::Direction::Outgoing => Dir::Out,
        petgraph::Direction::Incoming => Dir::In,
    }
}
