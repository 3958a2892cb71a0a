//! Node and edge kinds, the schema of allowed (from-kind, edge, to-kind) triples, and the
//! small value types attached to nodes and edges (status, transformations).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The kind of a node. Built-in kinds cover the ML lifecycle; [`NodeKind::Custom`] kinds are
/// defined with [`Schema::define_node_kind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum NodeKind {
    /// A table, file or topic.
    Dataset,
    /// A column of a dataset or feature table.
    Field,
    /// A feature definition.
    Feature,
    /// A table of features.
    FeatureTable,
    /// A model family.
    Model,
    /// One trained version of a model.
    ModelVersion,
    /// An evaluation of a model version.
    Evaluation,
    /// A job or pipeline.
    Workflow,
    /// One run of a workflow.
    Run,
    /// A production deployment.
    Service,
    /// A user-defined kind; the number is its slot in the [`Schema`].
    Custom(u8),
}

impl NodeKind {
    /// Every built-in kind.
    pub const BUILTIN: [NodeKind; 10] = [
        NodeKind::Dataset,
        NodeKind::Field,
        NodeKind::Feature,
        NodeKind::FeatureTable,
        NodeKind::Model,
        NodeKind::ModelVersion,
        NodeKind::Evaluation,
        NodeKind::Workflow,
        NodeKind::Run,
        NodeKind::Service,
    ];

    pub(crate) fn code(self) -> u8 {
        match self {
            NodeKind::Dataset => 0,
            NodeKind::Field => 1,
            NodeKind::Feature => 2,
            NodeKind::FeatureTable => 3,
            NodeKind::Model => 4,
            NodeKind::ModelVersion => 5,
            NodeKind::Evaluation => 6,
            NodeKind::Workflow => 7,
            NodeKind::Run => 8,
            NodeKind::Service => 9,
            NodeKind::Custom(n) => 16u8.saturating_add(n),
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<NodeKind> {
        match c {
            16.. => Some(NodeKind::Custom(c - 16)),
            _ => NodeKind::BUILTIN.into_iter().find(|k| k.code() == c),
        }
    }

    /// The built-in kind's name (`"Dataset"`), or `"Custom"`.
    pub fn name(self) -> &'static str {
        match self {
            NodeKind::Dataset => "Dataset",
            NodeKind::Field => "Field",
            NodeKind::Feature => "Feature",
            NodeKind::FeatureTable => "FeatureTable",
            NodeKind::Model => "Model",
            NodeKind::ModelVersion => "ModelVersion",
            NodeKind::Evaluation => "Evaluation",
            NodeKind::Workflow => "Workflow",
            NodeKind::Run => "Run",
            NodeKind::Service => "Service",
            NodeKind::Custom(_) => "Custom",
        }
    }

    /// Parses a built-in kind name, case-insensitively.
    pub fn parse_builtin(s: &str) -> Option<NodeKind> {
        NodeKind::BUILTIN
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeKind::Custom(n) => write!(f, "Custom({n})"),
            k => f.write_str(k.name()),
        }
    }
}

/// The kind of an edge. Edges are declared in the natural reading direction of the triple
/// (`Feature derived-from Dataset`); [`Schema::flow`] says which way data flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum EdgeKind {
    /// `derived` derived-from `source` (also field-to-field column lineage).
    DerivedFrom,
    /// `ModelVersion` trained-on a dataset, feature, feature table or field.
    TrainedOn,
    /// `Evaluation` evaluates `ModelVersion`.
    Evaluates,
    /// `Service` serves `ModelVersion`.
    Serves,
    /// `Workflow`/`Run` reads a dataset or feature table.
    Reads,
    /// `Workflow`/`Run` writes a dataset, feature, feature table, model version or evaluation.
    Writes,
    /// `Run` instance-of `Workflow`.
    InstanceOf,
    /// `ModelVersion` version-of `Model`.
    VersionOf,
    /// `Dataset`/`FeatureTable` has-field `Field`.
    HasField,
    /// A user-defined edge kind; the number is its slot in the [`Schema`].
    Custom(u8),
}

/// Which way data flows along an edge, relative to its declared direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Flow {
    /// Data flows from the edge's `from` node to its `to` node (`Workflow writes Dataset`).
    Forward,
    /// Data flows from `to` to `from` (`Feature derived-from Dataset`).
    Reverse,
}

impl EdgeKind {
    /// Every built-in edge kind.
    pub const BUILTIN: [EdgeKind; 9] = [
        EdgeKind::DerivedFrom,
        EdgeKind::TrainedOn,
        EdgeKind::Evaluates,
        EdgeKind::Serves,
        EdgeKind::Reads,
        EdgeKind::Writes,
        EdgeKind::InstanceOf,
        EdgeKind::VersionOf,
        EdgeKind::HasField,
    ];

    pub(crate) fn code(self) -> u8 {
        match self {
            EdgeKind::DerivedFrom => 0,
            EdgeKind::TrainedOn => 1,
            EdgeKind::Evaluates => 2,
            EdgeKind::Serves => 3,
            EdgeKind::Reads => 4,
            EdgeKind::Writes => 5,
            EdgeKind::InstanceOf => 6,
            EdgeKind::VersionOf => 7,
            EdgeKind::HasField => 8,
            EdgeKind::Custom(n) => 16u8.saturating_add(n),
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<EdgeKind> {
        match c {
            16.. => Some(EdgeKind::Custom(c - 16)),
            _ => EdgeKind::BUILTIN.into_iter().find(|k| k.code() == c),
        }
    }

    /// The built-in kind's name in kebab case (`"derived-from"`), or `"custom"`.
    pub fn name(self) -> &'static str {
        match self {
            EdgeKind::DerivedFrom => "derived-from",
            EdgeKind::TrainedOn => "trained-on",
            EdgeKind::Evaluates => "evaluates",
            EdgeKind::Serves => "serves",
            EdgeKind::Reads => "reads",
            EdgeKind::Writes => "writes",
            EdgeKind::InstanceOf => "instance-of",
            EdgeKind::VersionOf => "version-of",
            EdgeKind::HasField => "has-field",
            EdgeKind::Custom(_) => "custom",
        }
    }

    /// Parses a built-in edge kind name (`"derived-from"`).
    pub fn parse_builtin(s: &str) -> Option<EdgeKind> {
        EdgeKind::BUILTIN.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for EdgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EdgeKind::Custom(n) => write!(f, "custom({n})"),
            k => f.write_str(k.name()),
        }
    }
}

/// Lifecycle status of an asset.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// In use.
    #[default]
    Active,
    /// Still available but scheduled for removal.
    Deprecated,
    /// No longer available.
    Retired,
}

impl Status {
    pub(crate) fn code(self) -> u8 {
        match self {
            Status::Active => 0,
            Status::Deprecated => 1,
            Status::Retired => 2,
        }
    }

    pub(crate) fn from_code(c: u8) -> Status {
        match c {
            1 => Status::Deprecated,
            2 => Status::Retired,
            _ => Status::Active,
        }
    }
}

/// OpenLineage transformation type of a column-lineage edge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TransformKind {
    /// The output value is computed from the input value.
    #[default]
    Direct,
    /// The input influences the output without flowing into it (join keys, filters, sorts).
    Indirect,
}

/// OpenLineage transformation semantics carried by a field-level edge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Transformation {
    kind: TransformKind,
    subtype: Option<String>,
    masking: bool,
}

impl Transformation {
    /// A transformation of the given type, with an optional subtype such as `IDENTITY`,
    /// `AGGREGATION`, `JOIN` or `FILTER`.
    pub fn new(kind: TransformKind, subtype: Option<&str>) -> Self {
        Self {
            kind,
            subtype: subtype.map(|s| s.to_ascii_uppercase()),
            masking: false,
        }
    }

    /// `DIRECT/IDENTITY`.
    pub fn identity() -> Self {
        Self::new(TransformKind::Direct, Some("IDENTITY"))
    }

    /// Marks the transformation as masking (hashing, redaction): it stops `pii` propagation.
    pub fn masking(mut self, masking: bool) -> Self {
        self.masking = masking;
        self
    }

    /// DIRECT or INDIRECT.
    pub fn kind(&self) -> TransformKind {
        self.kind
    }

    /// The subtype, upper-cased (`IDENTITY`, `AGGREGATION`, `JOIN`, ...).
    pub fn subtype(&self) -> Option<&str> {
        self.subtype.as_deref()
    }

    /// Whether the transformation masks its input.
    pub fn is_masking(&self) -> bool {
        self.masking
    }

    /// Combines two transformations on the same input: DIRECT wins, masking only if both mask.
    pub(crate) fn merge(&self, other: &Transformation) -> Transformation {
        if self.kind == TransformKind::Direct && other.kind == TransformKind::Indirect {
            return Transformation {
                masking: self.masking && other.masking,
                ..self.clone()
            };
        }
        if other.kind == TransformKind::Direct && self.kind == TransformKind::Indirect {
            return Transformation {
                masking: self.masking && other.masking,
                ..other.clone()
            };
        }
        let subtype = match (&self.subtype, &other.subtype) {
            (Some(a), Some(b)) if a != b => Some(format!("{a},{b}")),
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        Transformation {
            kind: self.kind,
            subtype,
            masking: self.masking && other.masking,
        }
    }
}

/// The set of allowed (from-kind, edge, to-kind) triples plus user-defined kinds.
///
/// [`Schema::default`] allows the built-in ML lifecycle triples; extend it with
/// [`Schema::define_node_kind`], [`Schema::define_edge_kind`] and [`Schema::allow`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    custom_nodes: Vec<String>,
    custom_edges: Vec<(String, Flow)>,
    allowed: BTreeSet<(NodeKind, EdgeKind, NodeKind)>,
}

impl Default for Schema {
    fn default() -> Self {
        use EdgeKind as E;
        use NodeKind as N;
        let mut allowed = BTreeSet::new();
        let data = [N::Dataset, N::Field, N::Feature, N::FeatureTable];
        for a in data {
            for b in data {
                allowed.insert((a, E::DerivedFrom, b));
            }
            allowed.insert((N::ModelVersion, E::TrainedOn, a));
        }
        allowed.insert((N::Evaluation, E::Evaluates, N::ModelVersion));
        allowed.insert((N::Evaluation, E::DerivedFrom, N::Dataset));
        allowed.insert((N::Service, E::Serves, N::ModelVersion));
        for job in [N::Workflow, N::Run] {
            for d in [N::Dataset, N::FeatureTable, N::Feature, N::ModelVersion] {
                allowed.insert((job, E::Reads, d));
            }
            for d in [
                N::Dataset,
                N::FeatureTable,
                N::Feature,
                N::ModelVersion,
                N::Evaluation,
            ] {
                allowed.insert((job, E::Writes, d));
            }
        }
        allowed.insert((N::Run, E::InstanceOf, N::Workflow));
        allowed.insert((N::ModelVersion, E::VersionOf, N::Model));
        allowed.insert((N::Dataset, E::HasField, N::Field));
        allowed.insert((N::FeatureTable, E::HasField, N::Field));
        Schema {
            custom_nodes: Vec::new(),
            custom_edges: Vec::new(),
            allowed,
        }
    }
}

impl Schema {
    /// Defines a user node kind, or returns the existing one with that name.
    ///
    /// # Errors
    /// [`Error::CapacityExceeded`] after 200 custom kinds.
    pub fn define_node_kind(&mut self, name: &str) -> Result<NodeKind> {
        if let Some(i) = self.custom_nodes.iter().position(|n| n == name) {
            return Ok(NodeKind::Custom(i as u8));
        }
        if self.custom_nodes.len() >= 200 {
            return Err(Error::CapacityExceeded {
                what: "custom node kinds",
            });
        }
        self.custom_nodes.push(name.to_owned());
        Ok(NodeKind::Custom((self.custom_nodes.len() - 1) as u8))
    }

    /// Defines a user edge kind with its data-flow direction, or returns the existing one.
    ///
    /// # Errors
    /// [`Error::CapacityExceeded`] after 200 custom kinds.
    pub fn define_edge_kind(&mut self, name: &str, flow: Flow) -> Result<EdgeKind> {
        if let Some(i) = self.custom_edges.iter().position(|(n, _)| n == name) {
            return Ok(EdgeKind::Custom(i as u8));
        }
        if self.custom_edges.len() >= 200 {
            return Err(Error::CapacityExceeded {
                what: "custom edge kinds",
            });
        }
        self.custom_edges.push((name.to_owned(), flow));
        Ok(EdgeKind::Custom((self.custom_edges.len() - 1) as u8))
    }

    /// Allows the triple `from -[edge]-> to`.
    pub fn allow(&mut self, from: NodeKind, edge: EdgeKind, to: NodeKind) -> &mut Self {
        self.allowed.insert((from, edge, to));
        self
    }

    /// Whether the triple is allowed.
    pub fn allows(&self, from: NodeKind, edge: EdgeKind, to: NodeKind) -> bool {
        self.allowed.contains(&(from, edge, to))
    }

    /// The data-flow direction of an edge kind.
    pub fn flow(&self, edge: EdgeKind) -> Flow {
        match edge {
            EdgeKind::Writes | EdgeKind::VersionOf | EdgeKind::HasField => Flow::Forward,
            EdgeKind::Custom(n) => self
                .custom_edges
                .get(usize::from(n))
                .map_or(Flow::Forward, |(_, f)| *f),
            _ => Flow::Reverse,
        }
    }

    /// The display name of a node kind (custom kinds by their defined name).
    pub fn node_kind_name(&self, kind: NodeKind) -> &str {
        match kind {
            NodeKind::Custom(n) => self
                .custom_nodes
                .get(usize::from(n))
                .map_or("Custom", String::as_str),
            k => k.name(),
        }
    }

    /// The display name of an edge kind (custom kinds by their defined name).
    pub fn edge_kind_name(&self, kind: EdgeKind) -> &str {
        match kind {
            EdgeKind::Custom(n) => self
                .custom_edges
                .get(usize::from(n))
                .map_or("custom", |(s, _)| s.as_str()),
            k => k.name(),
        }
    }

    /// Resolves a node kind by built-in or custom name.
    ///
    /// # Errors
    /// [`Error::UnknownKind`] if no kind has that name.
    pub fn node_kind(&self, name: &str) -> Result<NodeKind> {
        if let Some(k) = NodeKind::parse_builtin(name) {
            return Ok(k);
        }
        self.custom_nodes
            .iter()
            .position(|n| n == name)
            .map(|i| NodeKind::Custom(i as u8))
            .ok_or_else(|| Error::UnknownKind {
                name: name.to_owned(),
            })
    }

    pub(crate) fn knows_node(&self, k: NodeKind) -> bool {
        match k {
            NodeKind::Custom(n) => usize::from(n) < self.custom_nodes.len(),
            _ => true,
        }
    }

    pub(crate) fn knows_edge(&self, k: EdgeKind) -> bool {
        match k {
            EdgeKind::Custom(n) => usize::from(n) < self.custom_edges.len(),
            _ => true,
        }
    }
}
