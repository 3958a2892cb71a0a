//! The in-memory lineage graph: node and edge tables on chunked copy-on-write storage,
//! interned names, validity intervals, atomic commits, and node lookups.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::adj::{Adjacency, Dir};
use crate::change::{Batch, Change, Commit, NodeKey, NodeSpec};
use crate::cow::{ChunkMap, ChunkVec};
use crate::csr::Csr;
use crate::error::{Error, Result};
use crate::intern::{Interner, KeyIndex, Sym};
use crate::schema::{EdgeKind, Flow, NodeKind, Schema, Status, Transformation};
use crate::time::Timestamp;
use crate::typed::{Allows, AnyNodeId, EdgeMarker, Kind, NodeId};

pub(crate) const OPEN: u32 = u32::MAX;
const FLAG_PLACEHOLDER: u8 = 1;

#[derive(Debug, Clone)]
pub(crate) struct NodeRow {
    pub(crate) ns: Sym,
    pub(crate) name: Sym,
    pub(crate) owner: Sym,
    pub(crate) tags: u32,
    pub(crate) created: u32,
    pub(crate) extra: u32,
    pub(crate) kind: NodeKind,
    pub(crate) status: u8,
    pub(crate) flags: u8,
}

#[derive(Debug, Clone)]
pub(crate) struct EdgeRow {
    pub(crate) created: u32,
    pub(crate) kind: EdgeKind,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub(crate) struct NodeExtra {
    description: Option<String>,
    data_type: Option<String>,
    properties: serde_json::Map<String, serde_json::Value>,
}

/// Which version of the graph a query reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum At {
    /// The current graph.
    #[default]
    Latest,
    /// The graph as it stood after every commit recorded at or before this time.
    Time(Timestamp),
    /// Everything that ever existed, removed nodes and edges included.
    Cumulative,
}

/// A node and its metadata, resolved to owned values.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeInfo {
    /// The handle.
    pub id: AnyNodeId,
    /// The unique key (serialised as `namespace:name`).
    #[serde(serialize_with = "key_text")]
    pub key: NodeKey,
    /// The kind's display name.
    pub kind_name: String,
    /// The kind.
    #[serde(skip)]
    pub kind: NodeKind,
    /// Owner or team.
    pub owner: Option<String>,
    /// Tags set directly on the node (see [`crate::TagRules`] for propagated ones).
    pub tags: Vec<String>,
    /// Lifecycle status.
    pub status: Status,
    /// True for placeholders created for assets referenced but never declared.
    pub placeholder: bool,
    /// Description.
    pub description: Option<String>,
    /// Data type (fields).
    pub data_type: Option<String>,
    /// Free properties.
    pub properties: serde_json::Map<String, serde_json::Value>,
    /// Time of the commit that created the node.
    pub created_at: Timestamp,
    /// Time of the commit that removed it, if it was removed.
    pub removed_at: Option<Timestamp>,
}

/// An edge in its declared reading direction, resolved to keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct EdgeInfo {
    /// Source node key (serialised as `namespace:name`).
    #[serde(serialize_with = "key_text")]
    pub from: NodeKey,
    /// Edge kind.
    pub kind: EdgeKind,
    /// The kind's display name.
    pub kind_name: String,
    /// Target node key (serialised as `namespace:name`).
    #[serde(serialize_with = "key_text")]
    pub to: NodeKey,
    /// Column-lineage semantics, if any.
    pub transformation: Option<Transformation>,
    /// Time of the commit that created the edge.
    pub created_at: Timestamp,
    /// Time of the commit that removed it, if it was removed.
    pub removed_at: Option<Timestamp>,
}

/// What a commit did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CommitSummary {
    /// Log position of the commit.
    pub seq: u64,
    /// Nodes created.
    pub nodes_created: usize,
    /// Existing nodes whose metadata changed.
    pub nodes_updated: usize,
    /// Nodes removed.
    pub nodes_removed: usize,
    /// Edges created.
    pub edges_created: usize,
    /// Edges removed.
    pub edges_removed: usize,
    /// Placeholder nodes created for undeclared assets.
    pub placeholders: usize,
}

impl CommitSummary {
    pub(crate) fn add(&mut self, o: &CommitSummary) {
        self.seq = o.seq;
        self.nodes_created += o.nodes_created;
        self.nodes_updated += o.nodes_updated;
        self.nodes_removed += o.nodes_removed;
        self.edges_created += o.edges_created;
        self.edges_removed += o.edges_removed;
        self.placeholders += o.placeholders;
    }
}

/// What changed between two points in time, from [`LineageGraph::diff`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Diff {
    /// Nodes created in the interval.
    pub added_nodes: Vec<NodeKey>,
    /// Nodes removed in the interval.
    pub removed_nodes: Vec<NodeKey>,
    /// Nodes that existed before and whose metadata changed in the interval.
    pub updated_nodes: Vec<NodeKey>,
    /// Net metadata changes of nodes that existed before the interval, with the metadata
    /// before and after it (a value changed and changed back is not listed).
    pub metadata_changes: Vec<MetadataChange>,
    /// Edges created in the interval.
    pub added_edges: Vec<EdgeInfo>,
    /// Edges removed in the interval.
    pub removed_edges: Vec<EdgeInfo>,
}

/// The metadata of a node that can change over its life, as of some view.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metadata {
    /// Owner or team.
    pub owner: Option<String>,
    /// Tags set directly on the node.
    pub tags: Vec<String>,
    /// Lifecycle status.
    pub status: Status,
    /// True for placeholders created for assets referenced but never declared.
    pub placeholder: bool,
    /// Description.
    pub description: Option<String>,
    /// Data type (fields).
    pub data_type: Option<String>,
    /// Free properties.
    pub properties: serde_json::Map<String, serde_json::Value>,
}

impl Metadata {
    fn changed_fields(&self, other: &Metadata) -> Vec<MetaField> {
        let mut v = Vec::new();
        let mut check = |changed: bool, f: MetaField| {
            if changed {
                v.push(f);
            }
        };
        check(self.owner != other.owner, MetaField::Owner);
        check(self.tags != other.tags, MetaField::Tags);
        check(self.status != other.status, MetaField::Status);
        check(
            self.placeholder != other.placeholder,
            MetaField::Placeholder,
        );
        check(
            self.description != other.description,
            MetaField::Description,
        );
        check(self.data_type != other.data_type, MetaField::DataType);
        check(self.properties != other.properties, MetaField::Properties);
        v
    }
}

/// One part of a node's [`Metadata`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum MetaField {
    /// [`Metadata::owner`].
    Owner,
    /// [`Metadata::tags`].
    Tags,
    /// [`Metadata::status`].
    Status,
    /// [`Metadata::placeholder`].
    Placeholder,
    /// [`Metadata::description`].
    Description,
    /// [`Metadata::data_type`].
    DataType,
    /// [`Metadata::properties`].
    Properties,
}

/// A node's net metadata change over a [`LineageGraph::diff`] interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetadataChange {
    /// The node (serialised as `namespace:name`).
    #[serde(serialize_with = "key_text")]
    pub key: NodeKey,
    /// Which parts differ between `before` and `after`.
    pub fields: Vec<MetaField>,
    /// Metadata at the start of the interval.
    pub before: Metadata,
    /// Metadata at its end.
    pub after: Metadata,
}

/// Heap bytes held by each part of a graph, from [`LineageGraph::memory_usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MemoryUsage {
    /// Node and edge tables (with their adjacency links).
    pub graph: usize,
    /// Interned names and the key index.
    pub names: usize,
    /// Tag sets, descriptions, properties, transformations, removal times.
    pub metadata: usize,
    /// The cached CSR read snapshot (0 until a query builds it).
    pub snapshot: usize,
    /// The in-memory log (0 when disabled).
    pub log: usize,
}

impl MemoryUsage {
    /// Sum of all parts.
    pub fn total(&self) -> usize {
        self.graph + self.names + self.metadata + self.snapshot + self.log
    }
}

/// A typed lineage graph of ML assets, kept in memory.
///
/// Every mutation is a [`Change`] applied through [`LineageGraph::commit`]; a commit applies
/// all its changes or none. Nodes and edges are never physically deleted: removal ends their
/// validity interval, which is what makes [`At::Time`] queries and [`LineageGraph::diff`] work.
/// Queries on [`At::Latest`] read a cached immutable CSR snapshot, rebuilt after a commit.
#[derive(Debug)]
pub struct LineageGraph {
    pub(crate) schema: Arc<Schema>,
    pub(crate) g: Adjacency,
    pub(crate) names: Interner,
    pub(crate) keys: KeyIndex,
    pub(crate) tagsets: Arc<TagSets>,
    pub(crate) extras: ChunkVec<NodeExtra>,
    pub(crate) transforms: ChunkMap<Transformation>,
    pub(crate) node_removed: ChunkMap<u32>,
    pub(crate) edge_removed: ChunkMap<u32>,
    pub(crate) commit_times: ChunkVec<Timestamp>,
    /// Every metadata change, oldest first, with the metadata it replaced.
    pub(crate) updates: ChunkVec<MetaUpdate>,
    pub(crate) log: Option<Vec<Commit>>,
    pub(crate) csr: OnceLock<Arc<Csr>>,
}

/// The distinct tag sets in use; rows point at one by index.
#[derive(Debug, Clone)]
pub(crate) struct TagSets {
    pub(crate) sets: Vec<Box<[Sym]>>,
    pub(crate) index: HashMap<Box<[Sym]>, u32>,
}

/// The metadata of a node row that can change after creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) owner: Sym,
    pub(crate) tags: u32,
    pub(crate) extra: u32,
    pub(crate) status: u8,
    pub(crate) flags: u8,
}

impl Meta {
    fn of(r: &NodeRow) -> Meta {
        Meta {
            owner: r.owner,
            tags: r.tags,
            extra: r.extra,
            status: r.status,
            flags: r.flags,
        }
    }
}

/// Commit `commit` changed node `node`'s metadata; `before` is what it replaced.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MetaUpdate {
    pub(crate) commit: u32,
    pub(crate) node: u32,
    pub(crate) before: Meta,
}

impl Default for LineageGraph {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for LineageGraph {
    /// Clones share storage with the original in chunks, so a clone is cheap and a write to
    /// either copies only the chunks it touches.
    fn clone(&self) -> Self {
        Self {
            schema: self.schema.clone(),
            g: self.g.clone(),
            names: self.names.clone(),
            keys: self.keys.clone(),
            tagsets: self.tagsets.clone(),
            extras: self.extras.clone(),
            transforms: self.transforms.clone(),
            node_removed: self.node_removed.clone(),
            edge_removed: self.edge_removed.clone(),
            commit_times: self.commit_times.clone(),
            updates: self.updates.clone(),
            log: self.log.clone(),
            csr: OnceLock::new(),
        }
    }
}

/// State of a node as seen while validating a commit.
#[derive(Clone, Copy)]
struct Pending {
    kind: NodeKind,
    live: bool,
    /// The node's index when the key was resolved in the graph as it stood before the
    /// commit, [`OPEN`] when an earlier change of the commit touched the key.
    id: u32,
}

/// The node indices [`LineageGraph::validate`] resolved for each link's two ends, when
/// neither end was touched by an earlier change of the same commit (else [`OPEN`]); applying
/// the commit to the same graph reuses them instead of looking the keys up again.
#[derive(Debug, Default)]
pub(crate) struct Resolved(Vec<(u32, u32)>);

impl LineageGraph {
    /// An empty graph with the default schema that keeps its log in memory.
    pub fn new() -> Self {
        Self::with_schema(Schema::default())
    }

    /// An empty graph with the given schema.
    pub fn with_schema(schema: Schema) -> Self {
        let empty: Box<[Sym]> = Box::new([]);
        let mut index = HashMap::new();
        index.insert(empty.clone(), 0);
        Self {
            schema: Arc::new(schema),
            g: Adjacency::default(),
            names: Interner::default(),
            keys: KeyIndex::default(),
            tagsets: Arc::new(TagSets {
                sets: vec![empty],
                index,
            }),
            extras: ChunkVec::default(),
            transforms: ChunkMap::default(),
            node_removed: ChunkMap::default(),
            edge_removed: ChunkMap::default(),
            commit_times: ChunkVec::default(),
            updates: ChunkVec::default(),
            log: Some(Vec::new()),
            csr: OnceLock::new(),
        }
    }

    /// Stops keeping committed changes in memory; [`LineageGraph::log`] then returns only
    /// what was kept before. Validity intervals (and so time travel and diffs) are kept
    /// regardless. A [`crate::LineageStore`] keeps the full log on disk instead.
    pub fn without_log(mut self) -> Self {
        self.log = None;
        self
    }

    /// Reserves room for `nodes` more nodes, `edges` more edges and `name_bytes` bytes of
    /// names, to avoid regrowth during bulk loads.
    pub fn reserve(&mut self, nodes: usize, edges: usize, name_bytes: usize) {
        self.g.reserve(nodes, edges);
        self.names.reserve(nodes, name_bytes);
        let g = &self.g;
        self.keys.reserve(nodes, |i| key_of(g, i));
    }

    /// The schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Committed changes kept in memory, oldest first (empty after [`Self::without_log`]).
    pub fn log(&self) -> &[Commit] {
        self.log.as_deref().unwrap_or(&[])
    }

    /// Number of commits applied so far.
    pub fn commit_count(&self) -> u64 {
        self.commit_times.len() as u64
    }

    /// Number of live nodes.
    pub fn node_count(&self) -> usize {
        self.g.node_count() - self.node_removed.len()
    }

    /// Number of live edges.
    pub fn edge_count(&self) -> usize {
        self.g.edge_count() - self.edge_removed.len()
    }

    /// Heap bytes held, by part.
    pub fn memory_usage(&self) -> MemoryUsage {
        MemoryUsage {
            graph: self.g.heap_bytes(),
            names: self.names.heap_bytes() + self.keys.heap_bytes(),
            metadata: self
                .tagsets
                .sets
                .iter()
                .map(|t| t.len() * 4 + 16)
                .sum::<usize>()
                * 2
                + self.tagsets.index.capacity() * 24
                + self.extras.heap_bytes()
                + self.transforms.heap_bytes()
                + self.node_removed.heap_bytes()
                + self.edge_removed.heap_bytes()
                + self.commit_times.heap_bytes()
                + self.updates.heap_bytes(),
            snapshot: self.csr.get().map_or(0, |c| c.heap_bytes()),
            log: self.log.as_ref().map_or(0, |l| {
                l.iter()
                    .map(|c| c.changes.len() * std::mem::size_of::<Change>())
                    .sum()
            }),
        }
    }

    // ----- commits -------------------------------------------------------------------

    /// Applies `changes` atomically, stamped with the current time.
    ///
    /// # Errors
    /// Any error from [`Self::commit_at`]; on error nothing is applied.
    pub fn commit(&mut self, changes: Vec<Change>) -> Result<CommitSummary> {
        self.commit_at(Timestamp::now(), changes)
    }

    /// Applies `changes` atomically, stamped with `time`. Times are made monotone: a time
    /// earlier than the previous commit's is recorded as the previous commit's time.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for an edge or removal naming a missing node,
    /// [`Error::SchemaViolation`] for an edge the schema does not allow,
    /// [`Error::KindMismatch`] for an upsert that changes a node's kind,
    /// [`Error::InvalidKey`], [`Error::UnknownKind`], [`Error::InvalidChange`] for malformed
    /// changes, [`Error::CapacityExceeded`] past `u32::MAX` items. On error nothing is applied.
    pub fn commit_at(&mut self, time: Timestamp, changes: Vec<Change>) -> Result<CommitSummary> {
        let resolved = self.validate(&changes)?;
        let time = self
            .commit_times
            .last()
            .map_or(time, |&last| time.max(last));
        Ok(self.apply_resolved(time, changes, &resolved))
    }

    /// Commits each batch atomically, in order (each batch with its own time, or now).
    ///
    /// # Errors
    /// The first failing batch's error; batches before it stay applied, the failing batch
    /// and those after it are not applied.
    pub fn apply(&mut self, batches: Vec<Batch>) -> Result<CommitSummary> {
        apply_batches(batches, |time, changes| self.commit_at(time, changes))
    }

    pub(crate) fn recorded_time(&self, time: Timestamp) -> Timestamp {
        self.commit_times
            .last()
            .map_or(time, |&last| time.max(last))
    }

    pub(crate) fn validate(&self, changes: &[Change]) -> Result<Resolved> {
        let mut resolved = Resolved(Vec::with_capacity(changes.len()));
        let mut pending: HashMap<&NodeKey, Pending> = HashMap::new();
        let mut owned: HashMap<NodeKey, Pending> = HashMap::new();
        let mut new_nodes = 0usize;
        let mut new_bytes = 0usize;
        let look = |pending: &HashMap<&NodeKey, Pending>,
                    owned: &HashMap<NodeKey, Pending>,
                    key: &NodeKey|
         -> Option<Pending> {
            if let Some(p) = pending.get(key).or_else(|| owned.get(key)) {
                return Some(*p);
            }
            let i = self.find_any(key)?;
            Some(Pending {
                kind: self.g.node(i)?.kind,
                live: !self.node_removed.contains_key(i),
                id: i,
            })
        };
        for ch in changes {
            resolved.0.push((OPEN, OPEN));
            match ch {
                Change::Upsert(spec) | Change::Insert(spec) => {
                    spec.key.validate()?;
                    if !self.schema.knows_node(spec.kind) {
                        return Err(Error::UnknownKind {
                            name: spec.kind.to_string(),
                        });
                    }
                    if let Some(p) = look(&pending, &owned, &spec.key)
                        && p.live
                    {
                        if p.kind != spec.kind {
                            return Err(Error::KindMismatch {
                                key: spec.key.to_string(),
                                existing: p.kind,
                                requested: spec.kind,
                            });
                        }
                        if matches!(ch, Change::Insert(_)) {
                            // The key is taken (before or earlier in this commit): an
                            // insert is a no-op, so its fields are not checked or counted.
                            continue;
                        }
                    }
                    if !spec.fields.is_empty()
                        && !self
                            .schema
                            .allows(spec.kind, EdgeKind::HasField, NodeKind::Field)
                    {
                        return Err(Error::InvalidChange {
                            reason: format!(
                                "{} {} cannot have fields",
                                self.schema.node_kind_name(spec.kind),
                                spec.key
                            ),
                        });
                    }
                    for f in &spec.fields {
                        if f.name.is_empty() {
                            return Err(Error::InvalidChange {
                                reason: format!("{} has a field with an empty name", spec.key),
                            });
                        }
                        let fk = NodeKey::field(spec.key.namespace(), spec.key.name(), &f.name);
                        if let Some(p) = look(&pending, &owned, &fk)
                            && p.kind != NodeKind::Field
                            && p.live
                        {
                            return Err(Error::KindMismatch {
                                key: fk.to_string(),
                                existing: p.kind,
                                requested: NodeKind::Field,
                            });
                        }
                        new_bytes += fk.name().len() + fk.namespace().len();
                        new_nodes += 1;
                        owned.insert(
                            fk,
                            Pending {
                                kind: NodeKind::Field,
                                live: true,
                                id: OPEN,
                            },
                        );
                    }
                    new_nodes += 1;
                    new_bytes += spec.key.name().len()
                        + spec.key.namespace().len()
                        + spec.owner.as_ref().map_or(0, String::len)
                        + spec.tags.iter().map(String::len).sum::<usize>();
                    pending.insert(
                        &spec.key,
                        Pending {
                            kind: spec.kind,
                            live: true,
                            id: OPEN,
                        },
                    );
                }
                Change::RemoveTag { key, .. } => {
                    look(&pending, &owned, key)
                        .filter(|p| p.live)
                        .ok_or_else(|| unknown(key))?;
                }
                Change::Remove { key } => {
                    let p = look(&pending, &owned, key)
                        .filter(|p| p.live)
                        .ok_or_else(|| unknown(key))?;
                    pending.insert(
                        key,
                        Pending {
                            kind: p.kind,
                            live: false,
                            id: OPEN,
                        },
                    );
                }
                Change::Link {
                    from,
                    edge,
                    to,
                    transformation,
                } => {
                    let a = look(&pending, &owned, from)
                        .filter(|p| p.live)
                        .ok_or_else(|| unknown(from))?;
                    let b = look(&pending, &owned, to)
                        .filter(|p| p.live)
                        .ok_or_else(|| unknown(to))?;
                    if !self.schema.knows_edge(*edge) {
                        return Err(Error::UnknownKind {
                            name: edge.to_string(),
                        });
                    }
                    if !self.schema.allows(a.kind, *edge, b.kind) {
                        return Err(Error::SchemaViolation {
                            from: from.to_string(),
                            from_kind: a.kind,
                            edge: *edge,
                            to: to.to_string(),
                            to_kind: b.kind,
                        });
                    }
                    if transformation.is_some()
                        && a.kind != NodeKind::Field
                        && b.kind != NodeKind::Field
                    {
                        return Err(Error::InvalidChange {
                            reason: format!(
                                "edge {from} -[{edge}]-> {to} has a transformation but touches no field"
                            ),
                        });
                    }
                    if let Some(r) = resolved.0.last_mut() {
                        *r = (a.id, b.id);
                    }
                }
                Change::Unlink { from, to, .. } => {
                    look(&pending, &owned, from).ok_or_else(|| unknown(from))?;
                    look(&pending, &owned, to).ok_or_else(|| unknown(to))?;
                }
            }
        }
        let edges_upper = changes
            .iter()
            .map(|c| match c {
                Change::Link { .. } => 1,
                Change::Upsert(s) | Change::Insert(s) => s.fields.len(),
                _ => 0,
            })
            .sum::<usize>();
        if self.g.node_count() + new_nodes >= (u32::MAX - 1) as usize
            || self.g.edge_count() + edges_upper >= (u32::MAX - 1) as usize
            || self.commit_times.len() >= (u32::MAX - 1) as usize
        {
            return Err(Error::CapacityExceeded {
                what: "nodes, edges or commits",
            });
        }
        if self.names.len() + new_nodes * 4 >= (u32::MAX - 1) as usize
            || new_bytes >= (u32::MAX / 2) as usize
        {
            return Err(Error::CapacityExceeded { what: "names" });
        }
        Ok(resolved)
    }

    /// Applies changes already checked by [`Self::validate`]; cannot fail.
    pub(crate) fn apply_validated(
        &mut self,
        time: Timestamp,
        changes: Vec<Change>,
    ) -> CommitSummary {
        self.apply_resolved(time, changes, &Resolved::default())
    }

    /// Applies changes that [`Self::validate`] checked against this graph's current state
    /// (or a clone of it), reusing the link ends it resolved.
    pub(crate) fn apply_resolved(
        &mut self,
        time: Timestamp,
        changes: Vec<Change>,
        resolved: &Resolved,
    ) -> CommitSummary {
        let c = self.commit_times.len() as u32;
        self.commit_times.push(time);
        self.csr = OnceLock::new();
        let mut s = CommitSummary {
            seq: u64::from(c),
            ..CommitSummary::default()
        };
        for (k, ch) in changes.iter().enumerate() {
            match ch {
                Change::Upsert(spec) => self.upsert_with_fields(c, spec, &mut s),
                Change::Insert(spec) => {
                    if self.find_live(&spec.key).is_none() {
                        self.upsert_with_fields(c, spec, &mut s);
                    }
                }
                Change::RemoveTag { key, tag } => {
                    if let (Some(i), Some(t)) = (self.find_live(key), self.names.get(tag))
                        && let Some(cur) = self.g.node(i).map(Meta::of)
                    {
                        let set: Vec<Sym> = self
                            .tagset(cur.tags)
                            .iter()
                            .copied()
                            .filter(|&x| x != t)
                            .collect();
                        let tags = self.intern_tagset(set);
                        if tags != cur.tags {
                            self.set_meta(c, i, Meta { tags, ..cur });
                            s.nodes_updated += 1;
                        }
                    }
                }
                Change::Remove { key } => {
                    if let Some(i) = self.find_live(key) {
                        self.node_removed.insert(i, c);
                        s.nodes_removed += 1;
                        let incident: Vec<u32> = self
                            .g
                            .edges_of(i, Dir::Out)
                            .chain(self.g.edges_of(i, Dir::In))
                            .map(|(e, _, _)| e)
                            .collect();
                        for e in incident {
                            if !self.edge_removed.contains_key(e) {
                                self.edge_removed.insert(e, c);
                                s.edges_removed += 1;
                            }
                        }
                    }
                }
                Change::Link {
                    from,
                    edge,
                    to,
                    transformation,
                } => {
                    let ends = match resolved.0.get(k) {
                        Some(&(a, b)) if a != OPEN && b != OPEN => (Some(a), Some(b)),
                        _ => (self.find_live(from), self.find_live(to)),
                    };
                    if let (Some(a), Some(b)) = ends {
                        self.link_ids(c, a, *edge, b, transformation.as_ref(), &mut s);
                    }
                }
                Change::Unlink { from, edge, to } => {
                    if let (Some(a), Some(b)) = (self.find_live(from), self.find_live(to)) {
                        let (src, dst) = self.flow_pair(*edge, a, b);
                        let ids: Vec<u32> = self
                            .g
                            .edges_connecting(src, dst)
                            .into_iter()
                            .filter(|&e| {
                                self.g.edge(e).is_some_and(|r| r.kind == *edge)
                                    && !self.edge_removed.contains_key(e)
                            })
                            .collect();
                        for e in ids {
                            self.edge_removed.insert(e, c);
                            s.edges_removed += 1;
                        }
                    }
                }
            }
        }
        if let Some(log) = &mut self.log {
            log.push(Commit {
                seq: u64::from(c),
                time,
                changes,
            });
        }
        s
    }

    /// Upserts a node and the fields its spec lists, linking each by `has-field`.
    fn upsert_with_fields(&mut self, c: u32, spec: &NodeSpec, s: &mut CommitSummary) {
        let id = self.upsert_node(c, spec, s);
        for f in &spec.fields {
            let mut fs = NodeSpec::with_key(
                NodeKind::Field,
                NodeKey::field(spec.key.namespace(), spec.key.name(), &f.name),
            );
            fs.data_type.clone_from(&f.data_type);
            fs.tags.clone_from(&f.tags);
            fs.description.clone_from(&f.description);
            fs.placeholder = spec.placeholder;
            let fid = self.upsert_node(c, &fs, s);
            self.link_ids(c, id, EdgeKind::HasField, fid, None, s);
        }
    }

    /// Replaces node `i`'s metadata in commit `c`, recording what it replaced so that
    /// as-of views can read it back.
    fn set_meta(&mut self, c: u32, i: u32, new: Meta) {
        let Some(row) = self.g.node_mut(i) else {
            return;
        };
        let before = Meta::of(row);
        row.owner = new.owner;
        row.tags = new.tags;
        row.extra = new.extra;
        row.status = new.status;
        row.flags = new.flags;
        self.updates.push(MetaUpdate {
            commit: c,
            node: i,
            before,
        });
    }

    fn flow_pair(&self, edge: EdgeKind, from: u32, to: u32) -> (u32, u32) {
        match self.schema.flow(edge) {
            Flow::Forward => (from, to),
            Flow::Reverse => (to, from),
        }
    }

    fn link_ids(
        &mut self,
        c: u32,
        from: u32,
        edge: EdgeKind,
        to: u32,
        t: Option<&Transformation>,
        s: &mut CommitSummary,
    ) {
        let (src, dst) = self.flow_pair(edge, from, to);
        let existing = self.g.edges_connecting(src, dst).into_iter().find(|&e| {
            self.g.edge(e).is_some_and(|r| r.kind == edge) && !self.edge_removed.contains_key(e)
        });
        let id = match existing {
            Some(e) => e,
            None => {
                s.edges_created += 1;
                self.g.add_edge(
                    src,
                    dst,
                    EdgeRow {
                        created: c,
                        kind: edge,
                    },
                )
            }
        };
        if let Some(t) = t {
            let merged = match self.transforms.get(id) {
                Some(old) => old.merge(t),
                None => t.clone(),
            };
            self.transforms.insert(id, merged);
        }
    }

    fn intern(&mut self, s: &str) -> Sym {
        // Validation bounded the total size, so interning cannot run out of room here.
        self.names.intern(s).unwrap_or(Sym::NONE)
    }

    fn upsert_node(&mut self, c: u32, spec: &NodeSpec, s: &mut CommitSummary) -> u32 {
        let ns = self.intern(spec.key.namespace());
        let name = self.intern(spec.key.name());
        let owner = spec.owner.as_deref().map(|o| self.intern(o));
        let tag_syms: Vec<Sym> = spec.tags.iter().map(|t| self.intern(t)).collect();
        let g = &self.g;
        let found = self.keys.get(ns, name, |i| key_of(g, i));
        let live = found.filter(|&i| !self.node_removed.contains_key(i));
        let has_extra =
            spec.description.is_some() || spec.data_type.is_some() || !spec.properties.is_empty();
        match live.and_then(|i| Some((i, Meta::of(self.g.node(i)?)))) {
            Some((i, cur)) => {
                let mut new = cur;
                if let Some(o) = owner {
                    new.owner = o;
                }
                if !tag_syms.is_empty() {
                    let mut set: Vec<Sym> = self.tagset(cur.tags).to_vec();
                    set.extend(tag_syms);
                    new.tags = self.intern_tagset(set);
                }
                if let Some(st) = spec.status {
                    new.status = st.code();
                }
                if !spec.placeholder {
                    new.flags &= !FLAG_PLACEHOLDER;
                }
                if has_extra {
                    // Extras are versioned, not edited in place: an as-of view of an earlier
                    // commit still points at the old one.
                    let old = self.extras.get(cur.extra as usize);
                    let mut x = old.cloned().unwrap_or_default();
                    if spec.description.is_some() {
                        x.description.clone_from(&spec.description);
                    }
                    if spec.data_type.is_some() {
                        x.data_type.clone_from(&spec.data_type);
                    }
                    for (k, v) in &spec.properties {
                        x.properties.insert(k.clone(), v.clone());
                    }
                    if old != Some(&x) {
                        new.extra = self.extras.push(x) as u32;
                    }
                }
                if new != cur {
                    self.set_meta(c, i, new);
                    s.nodes_updated += 1;
                }
                i
            }
            None => {
                let extra = if has_extra {
                    self.extras.push(NodeExtra {
                        description: spec.description.clone(),
                        data_type: spec.data_type.clone(),
                        properties: spec.properties.clone(),
                    }) as u32
                } else {
                    OPEN
                };
                let tags = self.intern_tagset(tag_syms);
                let row = NodeRow {
                    ns,
                    name,
                    owner: owner.unwrap_or(Sym::NONE),
                    tags,
                    created: c,
                    extra,
                    kind: spec.kind,
                    status: spec.status.unwrap_or_default().code(),
                    flags: if spec.placeholder {
                        FLAG_PLACEHOLDER
                    } else {
                        0
                    },
                };
                let id = self.g.add_node(row);
                let g = &self.g;
                match found {
                    // A removed node with this key: the key now names the new node.
                    Some(old) => self.keys.replace(ns, name, old, id, |i| key_of(g, i)),
                    None => self.keys.insert(ns, name, id, |i| key_of(g, i)),
                }
                s.nodes_created += 1;
                if spec.placeholder {
                    s.placeholders += 1;
                }
                id
            }
        }
    }

    fn intern_tagset(&mut self, mut set: Vec<Sym>) -> u32 {
        set.sort_unstable();
        set.dedup();
        if let Some(&i) = self.tagsets.index.get(set.as_slice()) {
            return i;
        }
        // A new tag set copies the table once per commit that adds one; distinct sets are
        // few next to nodes.
        let t = Arc::make_mut(&mut self.tagsets);
        let b: Box<[Sym]> = set.into_boxed_slice();
        let i = t.sets.len() as u32;
        t.sets.push(b.clone());
        t.index.insert(b, i);
        i
    }

    pub(crate) fn tagset(&self, i: u32) -> &[Sym] {
        self.tagsets.sets.get(i as usize).map_or(&[], |b| b)
    }

    // ----- lookups ---------------------------------------------------------------------

    fn find_any(&self, key: &NodeKey) -> Option<u32> {
        let ns = self.names.get(key.namespace())?;
        let name = self.names.get(key.name())?;
        self.keys.get(ns, name, |i| key_of(&self.g, i))
    }

    fn find_live(&self, key: &NodeKey) -> Option<u32> {
        self.find_any(key)
            .filter(|i| !self.node_removed.contains_key(*i))
    }

    /// The live node with this key.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] if there is none.
    pub fn find(&self, key: &NodeKey) -> Result<AnyNodeId> {
        self.find_live(key)
            .map(AnyNodeId)
            .ok_or_else(|| unknown(key))
    }

    /// The live node with this textual key (`namespace:name` or `namespace:dataset#field`).
    /// Because namespaces may contain `:`, every split point is tried, last first.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if the text has no `:`, [`Error::UnknownNode`] if no node matches.
    pub fn find_str(&self, key: &str) -> Result<AnyNodeId> {
        let parsed = NodeKey::parse(key)?;
        if let Some(i) = self.find_live(&parsed) {
            return Ok(AnyNodeId(i));
        }
        for (pos, _) in key.match_indices(':').rev() {
            let k = NodeKey::new(&key[..pos], &key[pos + 1..]);
            if let Some(i) = self.find_live(&k) {
                return Ok(AnyNodeId(i));
            }
        }
        Err(Error::UnknownNode {
            key: key.to_owned(),
        })
    }

    /// The live node with this key, checked to be of kind `K`.
    ///
    /// # Errors
    /// [`Error::UnknownNode`], or [`Error::KindMismatch`] if it has another kind.
    pub fn get<K: Kind>(&self, key: &NodeKey) -> Result<NodeId<K>> {
        let id = self.find(key)?;
        self.typed(id)
    }

    /// Checks an untyped handle's kind and returns the typed handle.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a foreign handle, [`Error::KindMismatch`] for another kind.
    pub fn typed<K: Kind>(&self, id: AnyNodeId) -> Result<NodeId<K>> {
        let row = self.row(id)?;
        if row.kind != K::KIND {
            return Err(Error::KindMismatch {
                key: self.key_string(id.0),
                existing: row.kind,
                requested: K::KIND,
            });
        }
        Ok(NodeId::new(id.0))
    }

    pub(crate) fn row(&self, id: AnyNodeId) -> Result<&NodeRow> {
        self.g.node(id.0).ok_or_else(|| Error::UnknownNode {
            key: id.to_string(),
        })
    }

    pub(crate) fn key_of_idx(&self, i: u32) -> NodeKey {
        match self.g.node(i) {
            Some(r) => NodeKey::new(self.names.resolve(r.ns), self.names.resolve(r.name)),
            None => NodeKey::new("?", format!("n{i}")),
        }
    }

    pub(crate) fn key_string(&self, i: u32) -> String {
        self.key_of_idx(i).to_string()
    }

    /// The key of a node.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a handle from another graph.
    pub fn key(&self, id: impl Into<AnyNodeId>) -> Result<NodeKey> {
        let id = id.into();
        self.row(id)?;
        Ok(self.key_of_idx(id.0))
    }

    /// The kind of a node.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a handle from another graph.
    pub fn kind(&self, id: impl Into<AnyNodeId>) -> Result<NodeKind> {
        Ok(self.row(id.into())?.kind)
    }

    pub(crate) fn owner_of(&self, i: u32) -> Option<&str> {
        let r = self.g.node(i)?;
        (!r.owner.is_none()).then(|| self.names.resolve(r.owner))
    }

    pub(crate) fn status_of(&self, i: u32) -> Status {
        self.g
            .node(i)
            .map_or(Status::Active, |r| Status::from_code(r.status))
    }

    pub(crate) fn has_tag(&self, i: u32, tag: Sym) -> bool {
        self.g
            .node(i)
            .is_some_and(|r| self.tagset(r.tags).contains(&tag))
    }

    pub(crate) fn tags_of(&self, i: u32) -> Vec<String> {
        self.g
            .node(i)
            .map(|r| self.tag_names(r.tags))
            .unwrap_or_default()
    }

    fn tag_names(&self, set: u32) -> Vec<String> {
        self.tagset(set)
            .iter()
            .map(|&t| self.names.resolve(t).to_owned())
            .collect()
    }

    pub(crate) fn property_of(&self, i: u32, name: &str) -> Option<&serde_json::Value> {
        let r = self.g.node(i)?;
        self.extras.get(r.extra as usize)?.properties.get(name)
    }

    pub(crate) fn is_live_node(&self, i: u32) -> bool {
        (i as usize) < self.g.node_count() && !self.node_removed.contains_key(i)
    }

    /// The metadata each node updated after horizon `h` had at `h` (its state before the
    /// first update at or after `h`); nodes not in the map have their current metadata.
    fn metas_before(&self, h: u32) -> HashMap<u32, Meta> {
        let from = self.updates.partition_point(|u| u.commit < h);
        let mut out = HashMap::new();
        for k in from..self.updates.len() {
            if let Some(u) = self.updates.get(k) {
                out.entry(u.node).or_insert(u.before);
            }
        }
        out
    }

    /// Node `i`'s metadata in view `at`.
    pub(crate) fn meta_at(&self, i: u32, at: At) -> Option<Metadata> {
        let r = self.g.node(i)?;
        let m = match at {
            At::Latest | At::Cumulative => Meta::of(r),
            At::Time(_) => {
                // A node the view predates reads as it stood at the end of its creating
                // commit.
                let h = self.horizon(at).max(r.created + 1);
                let from = self.updates.partition_point(|u| u.commit < h);
                (from..self.updates.len())
                    .filter_map(|k| self.updates.get(k))
                    .find(|u| u.node == i)
                    .map_or_else(|| Meta::of(r), |u| u.before)
            }
        };
        Some(self.resolve_meta(m))
    }

    fn resolve_meta(&self, m: Meta) -> Metadata {
        let x = self.extras.get(m.extra as usize);
        Metadata {
            owner: (!m.owner.is_none()).then(|| self.names.resolve(m.owner).to_owned()),
            tags: self.tag_names(m.tags),
            status: Status::from_code(m.status),
            placeholder: m.flags & FLAG_PLACEHOLDER != 0,
            description: x.and_then(|x| x.description.clone()),
            data_type: x.and_then(|x| x.data_type.clone()),
            properties: x.map(|x| x.properties.clone()).unwrap_or_default(),
        }
    }

    /// Everything known about a node, with its current metadata.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a handle from another graph.
    pub fn info(&self, id: impl Into<AnyNodeId>) -> Result<NodeInfo> {
        self.info_at(id, At::Latest)
    }

    /// Everything known about a node, with its metadata (owner, tags, status, description,
    /// data type, properties) as it stood in view `at`. A node that did not exist yet at
    /// that time reports the metadata it was created with.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a handle from another graph.
    pub fn info_at(&self, id: impl Into<AnyNodeId>, at: At) -> Result<NodeInfo> {
        let id = id.into();
        let r = self.row(id)?;
        let m = self.meta_at(id.0, at).unwrap_or_default();
        Ok(self.info_with(id, r, m))
    }

    fn info_with(&self, id: AnyNodeId, r: &NodeRow, m: Metadata) -> NodeInfo {
        NodeInfo {
            id,
            key: self.key_of_idx(id.0),
            kind_name: self.schema.node_kind_name(r.kind).to_owned(),
            kind: r.kind,
            owner: m.owner,
            tags: m.tags,
            status: m.status,
            placeholder: m.placeholder,
            description: m.description,
            data_type: m.data_type,
            properties: m.properties,
            created_at: self.time_of(r.created),
            removed_at: self.node_removed.get(id.0).map(|&c| self.time_of(c)),
        }
    }

    pub(crate) fn time_of(&self, c: u32) -> Timestamp {
        self.commit_times
            .get(c as usize)
            .copied()
            .unwrap_or(Timestamp::EPOCH)
    }

    /// Number of commits visible in a view.
    pub(crate) fn horizon(&self, at: At) -> u32 {
        match at {
            At::Latest | At::Cumulative => self.commit_times.len() as u32,
            At::Time(t) => self.commit_times.partition_point(|&x| x <= t) as u32,
        }
    }

    pub(crate) fn node_visible(&self, i: u32, at: At, h: u32) -> bool {
        let Some(r) = self.g.node(i) else {
            return false;
        };
        match at {
            At::Cumulative => true,
            _ => r.created < h && self.node_removed.get(i).is_none_or(|&rm| rm >= h),
        }
    }

    pub(crate) fn edge_visible(&self, e: u32, at: At, h: u32) -> bool {
        let Some(r) = self.g.edge(e) else {
            return false;
        };
        match at {
            At::Cumulative => true,
            _ => r.created < h && self.edge_removed.get(e).is_none_or(|&rm| rm >= h),
        }
    }

    pub(crate) fn edge_info(&self, e: u32) -> Option<EdgeInfo> {
        let (src, dst) = self.g.endpoints(e)?;
        let w = self.g.edge(e)?;
        let (from, to) = match self.schema.flow(w.kind) {
            Flow::Forward => (src, dst),
            Flow::Reverse => (dst, src),
        };
        Some(EdgeInfo {
            from: self.key_of_idx(from),
            kind: w.kind,
            kind_name: self.schema.edge_kind_name(w.kind).to_owned(),
            to: self.key_of_idx(to),
            transformation: self.transforms.get(e).cloned(),
            created_at: self.time_of(w.created),
            removed_at: self.edge_removed.get(e).map(|&c| self.time_of(c)),
        })
    }

    pub(crate) fn transformation(&self, e: u32) -> Option<&Transformation> {
        self.transforms.get(e)
    }

    /// Edges touching a node in a view, in their declared direction. `Downstream` lists
    /// edges along which data flows out of the node, `Upstream` those it flows in by.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a handle from another graph.
    pub fn edges(
        &self,
        id: impl Into<AnyNodeId>,
        dir: crate::Direction,
        at: At,
    ) -> Result<Vec<EdgeInfo>> {
        let id = id.into();
        self.row(id)?;
        let h = self.horizon(at);
        let pd = match dir {
            crate::Direction::Downstream => Dir::Out,
            crate::Direction::Upstream => Dir::In,
        };
        let mut out: Vec<u32> = self
            .g
            .edges_of(id.0, pd)
            .map(|(e, _, _)| e)
            .filter(|&e| self.edge_visible(e, at, h))
            .collect();
        out.sort_unstable();
        Ok(out.into_iter().filter_map(|e| self.edge_info(e)).collect())
    }

    /// Every node visible in a view.
    pub fn nodes(&self, at: At) -> Vec<AnyNodeId> {
        let h = self.horizon(at);
        (0..self.g.node_count() as u32)
            .filter(|&i| self.node_visible(i, at, h))
            .map(AnyNodeId)
            .collect()
    }

    /// What changed after `from` up to and including `to` (by recorded commit time).
    pub fn diff(&self, from: Timestamp, to: Timestamp) -> Diff {
        let lo = self.horizon(At::Time(from));
        let hi = self.horizon(At::Time(to));
        let in_range = |c: u32| c >= lo && c < hi;
        let mut d = Diff::default();
        for (i, r) in self.g.node_rows().enumerate() {
            let i = i as u32;
            if in_range(r.created) {
                d.added_nodes.push(self.key_of_idx(i));
            }
            if self.node_removed.get(i).is_some_and(|&c| in_range(c)) {
                d.removed_nodes.push(self.key_of_idx(i));
            }
        }
        let first = self.updates.partition_point(|u| u.commit < lo);
        let mut updated: Vec<u32> = (first..self.updates.len())
            .filter_map(|k| self.updates.get(k))
            .take_while(|u| u.commit < hi)
            .map(|u| u.node)
            .filter(|&i| self.g.node(i).is_some_and(|r| r.created < lo))
            .collect();
        updated.sort_unstable();
        updated.dedup();
        let before = self.metas_before(lo);
        let after = self.metas_before(hi);
        for &i in &updated {
            let Some(r) = self.g.node(i) else { continue };
            let old = before.get(&i).copied().unwrap_or_else(|| Meta::of(r));
            let new = after.get(&i).copied().unwrap_or_else(|| Meta::of(r));
            let (old, new) = (self.resolve_meta(old), self.resolve_meta(new));
            if old != new {
                d.metadata_changes.push(MetadataChange {
                    key: self.key_of_idx(i),
                    fields: old.changed_fields(&new),
                    before: old,
                    after: new,
                });
            }
        }
        d.updated_nodes = updated.into_iter().map(|i| self.key_of_idx(i)).collect();
        for (e, (_, _, r)) in self.g.edge_rows().enumerate() {
            let e = e as u32;
            if in_range(r.created) {
                d.added_edges.extend(self.edge_info(e));
            }
            if self.edge_removed.get(e).is_some_and(|&c| in_range(c)) {
                d.removed_edges.extend(self.edge_info(e));
            }
        }
        d
    }

    // ----- snapshots -------------------------------------------------------------------

    /// The immutable CSR snapshot of the latest graph (built on first use after a commit).
    pub(crate) fn snapshot(&self) -> Arc<Csr> {
        self.csr
            .get_or_init(|| Arc::new(Csr::build(self, At::Latest)))
            .clone()
    }

    pub(crate) fn csr_for(&self, at: At) -> Arc<Csr> {
        match at {
            At::Latest => self.snapshot(),
            _ => Arc::new(Csr::build(self, at)),
        }
    }

    // ----- typed API -------------------------------------------------------------------

    /// Creates or updates a node of kind `K` (the spec's kind is replaced by `K`).
    ///
    /// # Errors
    /// As [`Self::commit`].
    pub fn upsert<K: Kind>(&mut self, mut spec: NodeSpec) -> Result<NodeId<K>> {
        spec.kind = K::KIND;
        let key = spec.key.clone();
        self.commit(vec![Change::Upsert(spec)])?;
        self.get::<K>(&key)
    }

    /// Creates or updates a node of any kind (dynamic API).
    ///
    /// # Errors
    /// As [`Self::commit`].
    pub fn upsert_dyn(&mut self, spec: NodeSpec) -> Result<AnyNodeId> {
        let key = spec.key.clone();
        self.commit(vec![Change::Upsert(spec)])?;
        self.find(&key)
    }

    /// Creates a node of kind `K` unless a live node already has its key, and returns the
    /// handle either way. An existing node is returned as it is: the spec's metadata and
    /// fields are not merged into it, and no commit is recorded. Inside a batch, use
    /// [`Change::Insert`], which makes the same decision atomically with the batch.
    ///
    /// # Errors
    /// [`Error::KindMismatch`] if the live node with this key has another kind; otherwise as
    /// [`Self::commit`].
    pub fn insert<K: Kind>(&mut self, mut spec: NodeSpec) -> Result<NodeId<K>> {
        spec.kind = K::KIND;
        let id = self.insert_dyn(spec)?;
        self.typed(id)
    }

    /// Creates a node of any kind unless a live node already has its key (dynamic API); see
    /// [`Self::insert`].
    ///
    /// # Errors
    /// As [`Self::insert`].
    pub fn insert_dyn(&mut self, spec: NodeSpec) -> Result<AnyNodeId> {
        if let Some(id) = self.existing_for_insert(&spec)? {
            return Ok(id);
        }
        let key = spec.key.clone();
        self.commit(vec![Change::Insert(spec)])?;
        self.find(&key)
    }

    /// The live node an insert of `spec` would return instead of creating one.
    pub(crate) fn existing_for_insert(&self, spec: &NodeSpec) -> Result<Option<AnyNodeId>> {
        let Some(i) = self.find_live(&spec.key) else {
            return Ok(None);
        };
        let existing = self.row(AnyNodeId(i))?.kind;
        if existing != spec.kind {
            return Err(Error::KindMismatch {
                key: spec.key.to_string(),
                existing,
                requested: spec.kind,
            });
        }
        Ok(Some(AnyNodeId(i)))
    }

    /// Adds the edge `from -[E]-> to`; only compiles for triples the built-in schema allows.
    ///
    /// ```compile_fail
    /// use keel_lineage::{LineageGraph, NodeSpec, NodeKind, nodes, edges};
    /// let mut g = LineageGraph::new();
    /// let ds = g.upsert::<nodes::Dataset>(NodeSpec::new(NodeKind::Dataset, "ns", "d")).unwrap();
    /// let svc = g.upsert::<nodes::Service>(NodeSpec::new(NodeKind::Service, "ns", "s")).unwrap();
    /// g.connect(svc, edges::Serves, ds).unwrap(); // a service serves model versions, not datasets
    /// ```
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for handles from another graph or removed nodes.
    pub fn connect<F: Kind, E: Allows<F, T>, T: Kind>(
        &mut self,
        from: NodeId<F>,
        _edge: E,
        to: NodeId<T>,
    ) -> Result<()> {
        self.connect_dyn(from.erase(), E::KIND, to.erase(), None)
    }

    /// Adds a column-lineage edge `to` derived-from `from` between two fields.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for handles from another graph or removed nodes.
    pub fn derive_field(
        &mut self,
        derived: NodeId<crate::nodes::Field>,
        source: NodeId<crate::nodes::Field>,
        transformation: Transformation,
    ) -> Result<()> {
        self.connect_dyn(
            derived.erase(),
            <crate::edges::DerivedFrom as EdgeMarker>::KIND,
            source.erase(),
            Some(transformation),
        )
    }

    /// Adds an edge between any two nodes, checked against the schema at run time.
    ///
    /// # Errors
    /// As [`Self::commit`].
    pub fn connect_dyn(
        &mut self,
        from: AnyNodeId,
        edge: EdgeKind,
        to: AnyNodeId,
        transformation: Option<Transformation>,
    ) -> Result<()> {
        let from = self.key(from)?;
        let to = self.key(to)?;
        self.commit(vec![Change::Link {
            from,
            edge,
            to,
            transformation,
        }])?;
        Ok(())
    }

    /// Sets a node's lifecycle status.
    ///
    /// # Errors
    /// As [`Self::commit`].
    pub fn set_status(&mut self, id: impl Into<AnyNodeId>, status: Status) -> Result<()> {
        let id = id.into();
        let kind = self.kind(id)?;
        let key = self.key(id)?;
        self.commit(vec![Change::Upsert(
            NodeSpec::with_key(kind, key).status(status),
        )])?;
        Ok(())
    }

    /// Removes a node (ends its validity and that of its edges).
    ///
    /// # Errors
    /// As [`Self::commit`].
    pub fn remove(&mut self, id: impl Into<AnyNodeId>) -> Result<()> {
        let key = self.key(id)?;
        self.commit(vec![Change::Remove { key }])?;
        Ok(())
    }

    /// Live fields of a dataset or feature table, in creation order.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] for a handle from another graph.
    pub fn fields_of(&self, id: impl Into<AnyNodeId>) -> Result<Vec<AnyNodeId>> {
        let id = id.into();
        self.row(id)?;
        let mut v: Vec<AnyNodeId> = self
            .g
            .edges_of(id.0, Dir::Out)
            .filter(|&(e, _, r)| r.kind == EdgeKind::HasField && !self.edge_removed.contains_key(e))
            .map(|(_, t, _)| AnyNodeId(t))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Live (not removed) edges leaving `i`, as (edge, other end, kind).
    pub(crate) fn live_edges_out(&self, i: u32) -> impl Iterator<Item = (u32, u32, EdgeKind)> + '_ {
        self.live_edges(i, Dir::Out)
    }

    /// Live (not removed) edges entering `i`, as (edge, other end, kind).
    pub(crate) fn live_edges_in(&self, i: u32) -> impl Iterator<Item = (u32, u32, EdgeKind)> + '_ {
        self.live_edges(i, Dir::In)
    }

    fn live_edges(&self, i: u32, dir: Dir) -> impl Iterator<Item = (u32, u32, EdgeKind)> + '_ {
        self.g
            .edges_of(i, dir)
            .filter(|&(e, _, _)| !self.edge_removed.contains_key(e))
            .map(|(e, other, r)| (e, other, r.kind))
    }

    pub(crate) fn all_node_indices(&self) -> std::ops::Range<u32> {
        0..self.g.node_count() as u32
    }
}

impl KeyIndex {
    pub(crate) fn replace(
        &mut self,
        ns: Sym,
        name: Sym,
        old: u32,
        new: u32,
        key_of: impl Fn(u32) -> (Sym, Sym),
    ) {
        // Removing and re-inserting keeps probing sequences intact because the slot is
        // overwritten in place: same key, same hash, same position.
        self.overwrite(old, new, ns, name, key_of);
    }
}

pub(crate) fn key_of(g: &Adjacency, i: u32) -> (Sym, Sym) {
    g.node(i).map_or((Sym::NONE, Sym::NONE), |r| (r.ns, r.name))
}

fn key_text<S: serde::Serializer>(k: &NodeKey, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(k)
}

fn unknown(key: &NodeKey) -> Error {
    Error::UnknownNode {
        key: key.to_string(),
    }
}

/// Commits `batches` one at a time through `commit`, stamping each with its own time (or
/// now) and naming its origin in the first error, which stops the loop.
pub(crate) fn apply_batches(
    batches: Vec<Batch>,
    mut commit: impl FnMut(Timestamp, Vec<Change>) -> Result<CommitSummary>,
) -> Result<CommitSummary> {
    let mut total = CommitSummary::default();
    for b in batches {
        let origin = b.origin;
        let s = commit(b.time.unwrap_or_else(Timestamp::now), b.changes)
            .map_err(|e| with_origin(e, &origin))?;
        total.add(&s);
    }
    Ok(total)
}

pub(crate) fn with_origin(e: Error, origin: &str) -> Error {
    Error::Batch {
        origin: origin.to_owned(),
        source: Box::new(e),
    }
}
