//! The crate's error type.

use std::path::PathBuf;

use crate::schema::{EdgeKind, NodeKind};

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An edge whose (from-kind, edge, to-kind) triple the schema does not allow.
    #[error(
        "edge {from:?} -[{edge}]-> {to:?} breaks the schema: {from_kind} -[{edge}]-> {to_kind} is not allowed"
    )]
    SchemaViolation {
        /// Key of the source node.
        from: String,
        /// Kind of the source node.
        from_kind: NodeKind,
        /// The refused edge kind.
        edge: EdgeKind,
        /// Key of the target node.
        to: String,
        /// Kind of the target node.
        to_kind: NodeKind,
    },
    /// A query or change named a node key that is not in the graph.
    #[error("node {key:?} is not in the graph")]
    UnknownNode {
        /// The key that was asked for.
        key: String,
    },
    /// A node key exists with another kind than the one requested.
    #[error("node {key:?} is a {existing}, not a {requested}")]
    KindMismatch {
        /// The key involved.
        key: String,
        /// Kind stored in the graph.
        existing: NodeKind,
        /// Kind the caller asked for.
        requested: NodeKind,
    },
    /// A node key that cannot be parsed or is empty.
    #[error("node key {key:?} is invalid: {reason}")]
    InvalidKey {
        /// The offending key text.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A kind name that neither the built-in set nor the schema defines.
    #[error("kind {name:?} is not defined in the schema")]
    UnknownKind {
        /// The unknown name.
        name: String,
    },
    /// A change that is invalid on its own (for example a transformation on a non-field edge).
    #[error("invalid change: {reason}")]
    InvalidChange {
        /// Why the change was refused.
        reason: String,
    },
    /// A file or string that is not well-formed JSON.
    #[error("{origin}: malformed JSON at line {line}, column {column}: {message}")]
    MalformedJson {
        /// The file (or other origin) being read.
        origin: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// An OpenLineage event or dbt manifest entry that breaks its format's schema.
    #[error("{origin}: event {index} is invalid: {reason}")]
    InvalidEvent {
        /// The file (or other origin) being read.
        origin: String,
        /// Index of the event (or manifest entry) in its origin.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading a file failed.
    #[error("cannot read {path:?}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying IO error.
        #[source]
        source: std::io::Error,
    },
    /// Another [`LineageStore`](crate::LineageStore), in this process or another, holds the
    /// store at this path.
    #[error("lineage store {path:?} is locked by another open store")]
    Locked {
        /// The store's directory.
        path: PathBuf,
    },
    /// The embedded database failed.
    #[error("lineage store failed while {action}")]
    Storage {
        /// What the store was doing.
        action: &'static str,
        /// The underlying cause.
        #[source]
        source: StorageError,
    },
    /// A store whose content cannot be decoded.
    #[error("lineage store entry {entry} is corrupt: {reason}")]
    CorruptStore {
        /// Log sequence number (or meta key) of the bad entry.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The store was created with a schema that differs from the one given to open it.
    #[error("lineage store schema differs from the schema given to open it")]
    SchemaMismatch,
    /// A batch (one OpenLineage event, one dbt manifest) was refused; nothing of it was applied.
    #[error("{origin} was not applied")]
    Batch {
        /// Where the batch came from (file and event index).
        origin: String,
        /// Why it was refused.
        #[source]
        source: Box<Error>,
    },
    /// A counter ran out of room (more than `u32::MAX` nodes, edges or commits).
    #[error("graph capacity exceeded: {what}")]
    CapacityExceeded {
        /// What overflowed.
        what: &'static str,
    },
}

/// An error from the embedded key-value store, kept as our own type so the
/// storage engine stays an implementation detail.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    message: String,
}

impl StorageError {
    pub(crate) fn new(e: impl std::fmt::Display) -> Self {
        Self {
            message: e.to_string(),
        }
    }
}

impl Error {
    pub(crate) fn json(origin: &str, e: &serde_json::Error) -> Self {
        Error::MalformedJson {
            origin: origin.to_owned(),
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        }
    }

    pub(crate) fn storage(action: &'static str, e: impl std::fmt::Display) -> Self {
        Error::Storage {
            action,
            source: StorageError::new(e),
        }
    }
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
