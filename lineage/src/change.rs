//! Node keys and the change events that make up the append-only log.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::schema::{EdgeKind, NodeKind, Status, Transformation};
use crate::time::Timestamp;

/// A node's unique key: an OpenLineage-style namespace plus a name.
///
/// Written as `namespace:name`; fields are `namespace:dataset#field`. Namespaces may contain
/// `:` themselves (`hive://localhost:9083`), so parsing splits at the last `:`.
// Serialised as a two-element array `[namespace, name]`: keys are most of a log entry, and
// the array form is shorter and faster to parse than an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "(String, String)", into = "(String, String)")]
pub struct NodeKey {
    namespace: String,
    name: String,
}

impl NodeKey {
    /// A key from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of field `field` of dataset `dataset` in `namespace`.
    pub fn field(namespace: impl Into<String>, dataset: &str, field: &str) -> Self {
        Self::new(namespace, format!("{dataset}#{field}"))
    }

    /// Parses `namespace:name`, splitting at the last `:`.
    ///
    /// # Errors
    /// [`Error::InvalidKey`] if there is no `:` or either part is empty.
    pub fn parse(s: &str) -> Result<Self> {
        let (ns, name) = s.rsplit_once(':').ok_or_else(|| Error::InvalidKey {
            key: s.to_owned(),
            reason: "expected namespace:name",
        })?;
        let key = Self::new(ns, name);
        key.validate()?;
        Ok(key)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.namespace.is_empty() || self.name.is_empty() {
            return Err(Error::InvalidKey {
                key: self.to_string(),
                reason: "namespace and name must be non-empty",
            });
        }
        Ok(())
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The name (for fields, `dataset#field`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// For a field key, the key of its dataset and the field name.
    pub fn split_field(&self) -> Option<(NodeKey, &str)> {
        let (ds, f) = self.name.rsplit_once('#')?;
        Some((NodeKey::new(self.namespace.clone(), ds), f))
    }
}

impl From<(String, String)> for NodeKey {
    fn from((namespace, name): (String, String)) -> Self {
        Self { namespace, name }
    }
}

impl From<NodeKey> for (String, String) {
    fn from(k: NodeKey) -> Self {
        (k.namespace, k.name)
    }
}

impl fmt::Display for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

/// A typed column of a dataset or feature table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSpec {
    pub(crate) name: String,
    pub(crate) data_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
}

impl FieldSpec {
    /// A field with a name and an optional type.
    pub fn new(name: impl Into<String>, data_type: Option<&str>) -> Self {
        Self {
            name: name.into(),
            data_type: data_type.map(str::to_owned),
            tags: Vec::new(),
            description: None,
        }
    }

    /// Adds a tag such as `pii`.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// The field's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What to create or update for one node. Applying a spec to an existing node merges it:
/// given values replace, tags and fields are added, absent values stay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub(crate) key: NodeKey,
    pub(crate) kind: NodeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) owner: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) data_type: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub(crate) properties: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) fields: Vec<FieldSpec>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) placeholder: bool,
}

impl NodeSpec {
    /// A spec for the node `namespace:name` of the given kind.
    pub fn new(kind: NodeKind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self::with_key(kind, NodeKey::new(namespace, name))
    }

    /// A spec for an existing key.
    pub fn with_key(kind: NodeKind, key: NodeKey) -> Self {
        Self {
            key,
            kind,
            owner: None,
            tags: Vec::new(),
            status: None,
            description: None,
            data_type: None,
            properties: serde_json::Map::new(),
            fields: Vec::new(),
            placeholder: false,
        }
    }

    /// Sets the owner or team.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Sets the lifecycle status.
    pub fn status(mut self, status: Status) -> Self {
        self.status = Some(status);
        self
    }

    /// Sets the description.
    pub fn description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }

    /// Sets the data type (for fields).
    pub fn data_type(mut self, t: impl Into<String>) -> Self {
        self.data_type = Some(t.into());
        self
    }

    /// Sets a free JSON property.
    pub fn property(mut self, name: impl Into<String>, value: serde_json::Value) -> Self {
        self.properties.insert(name.into(), value);
        self
    }

    /// Adds a field (datasets and feature tables only); each becomes a [`NodeKind::Field`]
    /// node `namespace:name#field` linked by `has-field`.
    pub fn field(mut self, field: FieldSpec) -> Self {
        self.fields.push(field);
        self
    }

    /// Flags the node as a placeholder for an asset referenced but never declared.
    pub fn placeholder(mut self) -> Self {
        self.placeholder = true;
        self
    }

    /// The key.
    pub fn key(&self) -> &NodeKey {
        &self.key
    }

    /// The kind.
    pub fn kind(&self) -> NodeKind {
        self.kind
    }
}

/// One change in the append-only log. A commit applies a list of changes atomically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Change {
    /// Creates a node or merges metadata into it (reviving it if it was removed).
    Upsert(NodeSpec),
    /// Creates a node (with its fields) only if no live node has its key; otherwise does
    /// nothing, leaving the existing node's metadata as it is. Refused with
    /// [`Error::KindMismatch`] if the live node has another kind.
    Insert(NodeSpec),
    /// Removes a tag from a node.
    RemoveTag {
        /// The node.
        key: NodeKey,
        /// The tag to remove.
        tag: String,
    },
    /// Ends a node's validity, and that of every edge touching it.
    Remove {
        /// The node.
        key: NodeKey,
    },
    /// Adds an edge `from -[edge]-> to` (a no-op if it already holds; a given
    /// transformation is merged into the existing one).
    Link {
        /// Source node, in the triple's reading direction.
        from: NodeKey,
        /// Edge kind.
        edge: EdgeKind,
        /// Target node.
        to: NodeKey,
        /// Column-lineage semantics, for edges touching fields.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transformation: Option<Transformation>,
    },
    /// Ends the validity of the edge `from -[edge]-> to`.
    Unlink {
        /// Source node.
        from: NodeKey,
        /// Edge kind.
        edge: EdgeKind,
        /// Target node.
        to: NodeKey,
    },
}

impl Change {
    /// A link without a transformation.
    pub fn link(from: NodeKey, edge: EdgeKind, to: NodeKey) -> Self {
        Change::Link {
            from,
            edge,
            to,
            transformation: None,
        }
    }
}

/// One committed batch of changes, as kept in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    pub(crate) seq: u64,
    pub(crate) time: Timestamp,
    pub(crate) changes: Vec<Change>,
}

impl Commit {
    /// Position in the log, from 0.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Recorded time (never earlier than the previous commit's).
    pub fn time(&self) -> Timestamp {
        self.time
    }

    /// The changes, in order.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }
}

/// A batch of changes ready to commit, with where it came from (for error messages).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub(crate) origin: String,
    pub(crate) time: Option<Timestamp>,
    pub(crate) changes: Vec<Change>,
}

impl Batch {
    /// A batch from `origin` (a file name and event index, for example).
    pub fn new(origin: impl Into<String>, time: Option<Timestamp>, changes: Vec<Change>) -> Self {
        Self {
            origin: origin.into(),
            time,
            changes,
        }
    }

    /// Where the batch came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The event time, if the source gave one.
    pub fn time(&self) -> Option<Timestamp> {
        self.time
    }

    /// The changes.
    pub fn changes(&self) -> &[Change] {
        &self.changes
    }
}
