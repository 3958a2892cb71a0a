//! A typed graph of ML assets and their lineage, with column-level impact analysis,
//! governance checks, time travel and an embedded durable store.
//!
//! A [`LineageGraph`] holds nodes (datasets, fields, features, models, model versions,
//! evaluations, workflows, runs, services, or user kinds) keyed by `namespace:name`
//! ([`NodeKey`]), and edges whose (from-kind, edge, to-kind) triples a [`Schema`] allows.
//! Every mutation is a [`Change`] in an append-only log, applied atomically by
//! [`LineageGraph::commit`]; nodes and edges carry validity intervals, so queries can read the
//! latest graph, the graph as of a time, or everything that ever existed ([`At`]).
//! [`LineageGraph::walk`] walks upstream or downstream with limits ([`Walk`]);
//! [`LineageGraph::impact`] turns a [`ProposedChange`] into an [`ImpactReport`].
//! [`LineageStore`] makes the graph durable in an embedded database and hands readers an
//! immutable [`Snapshot`] of it.
//!
//! The graph is built on petgraph: its node and edge tables are laid out like petgraph's
//! `Graph` (in copy-on-write chunks that snapshots share), and [`GraphView`], from
//! [`LineageGraph::petgraph_view`], implements petgraph's visit traits, so petgraph's
//! algorithms (`Dfs`, `Bfs`, `kosaraju_scc`, `has_path_connecting`, `toposort`,
//! `all_simple_paths`, ...) run on a graph or a snapshot directly. Path enumeration and cycle
//! reporting use them; budgeted walks and impact analysis run on a compact CSR snapshot.
//!
//! Typed handles ([`NodeId`]) make wrong edges fail to compile: `graph.connect(service,
//! edges::Serves, dataset)` does not build, because a service serves model versions.
//!
//! ```
//! use keel_lineage::{
//!     edges, nodes, FieldSpec, Impact, LineageGraph, NodeKey, NodeKind, NodeSpec,
//!     ProposedChange, Transformation, Walk,
//! };
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut g = LineageGraph::new();
//! let orders = g.upsert::<nodes::Dataset>(
//!     NodeSpec::new(NodeKind::Dataset, "shop", "orders")
//!         .owner("data-eng")
//!         .field(FieldSpec::new("customer_email", Some("VARCHAR")).tag("pii")),
//! )?;
//! let features = g.upsert::<nodes::Dataset>(
//!     NodeSpec::new(NodeKind::Dataset, "shop", "features")
//!         .field(FieldSpec::new("email_domain", Some("VARCHAR"))),
//! )?;
//! let email = g.get::<nodes::Field>(&NodeKey::field("shop", "orders", "customer_email"))?;
//! let domain = g.get::<nodes::Field>(&NodeKey::field("shop", "features", "email_domain"))?;
//! g.derive_field(domain, email, Transformation::identity())?;
//! g.connect(features, edges::DerivedFrom, orders)?;
//! let mv = g.upsert::<nodes::ModelVersion>(NodeSpec::new(NodeKind::ModelVersion, "ml", "churn@3"))?;
//! g.connect(mv, edges::TrainedOn, domain)?;
//! let svc = g.upsert::<nodes::Service>(NodeSpec::new(NodeKind::Service, "prod", "churn-api").tag("tier-1"))?;
//! g.connect(svc, edges::Serves, mv)?;
//!
//! // Which models and services consume orders.customer_email?
//! let report = g.impact(&ProposedChange::DropField(email))?;
//! assert!(report.affected.iter().any(|a| a.key == "prod:churn-api" && a.impact == Impact::Breaks));
//! assert_eq!(report.services[0].tier.as_deref(), Some("tier-1"));
//!
//! // Walk a service back to its training data.
//! let up = g.walk(svc, &Walk::upstream())?;
//! assert!(up.ids().any(|id| id == email.erase()));
//! # Ok(())
//! # }
//! ```
//!
//! # Feature flags
//! None.
//!
//! # Guarantees
//! - Every public type is `Send + Sync`; a [`LineageStore`] can be shared across threads.
//! - Readers of a [`LineageStore`] never wait for a writer: [`LineageStore::read`] returns a
//!   [`Snapshot`] that keeps its view while later commits are published, and a reader sees a
//!   commit whole or not at all.
//! - Metadata is versioned like structure: [`LineageGraph::info_at`] answers as of a time, and
//!   [`LineageGraph::diff`] lists metadata changes.
//! - A commit applies entirely or not at all; an OpenLineage event or a dbt manifest is one
//!   commit, so a bad event leaves the graph unchanged.
//! - [`LineageStore::commit`] returns only after the commit is flushed to disk; reopening
//!   replays every committed change (after loading the last [`LineageStore::checkpoint`],
//!   when one matches the log).
//! - Library code does not panic on bad input; cycles and self-loops are visited once.
#![forbid(unsafe_code)]

mod adj;
mod change;
mod checkpoint;
mod codec;
mod cow;
mod csr;
mod dbt;
mod discovery;
mod error;
mod export;
mod governance;
mod graph;
mod impact;
mod intern;
mod openlineage;
mod schema;
mod store;
mod time;
mod traverse;
mod typed;
mod view;

pub use change::{Batch, Change, Commit, FieldSpec, NodeKey, NodeSpec};
pub use dbt::parse_dbt_manifest;
pub use discovery::Search;
pub use error::{Error, Result, StorageError};
pub use governance::{
    FnPolicy, NoDeprecatedUpstream, PiiHasOwner, Policy, PropagatedTags, Propagation,
    ServedModelsEvaluated, TagRule, TagRules, Violation,
};
pub use graph::{
    At, CommitSummary, Diff, EdgeInfo, LineageGraph, MemoryUsage, MetaField, Metadata,
    MetadataChange, NodeInfo,
};
pub use impact::{
    AffectedNode, Budget, Impact, ImpactReport, ImpactSet, ImpactSummary, OwnerNotice,
    ProposedChange, ServiceHit, Severity,
};
pub use openlineage::{OpenLineageOptions, parse_openlineage, resolve_marquez_templates};
pub use schema::{EdgeKind, Flow, NodeKind, Schema, Status, TransformKind, Transformation};
pub use store::{AUTO_CHECKPOINT_CHANGES, LineageStore, Snapshot};
pub use time::Timestamp;
pub use traverse::{Direction, Paths, Reached, Subgraph, Walk, WalkResult};
pub use typed::{Allows, AnyNodeId, EdgeMarker, Kind, NodeId, edges, nodes};
pub use view::{
    EdgeId, EdgeReferences, Edges, GraphView, Neighbors, NodeIdentifiers, NodeReferences, ViewEdge,
    VisitSet,
};
