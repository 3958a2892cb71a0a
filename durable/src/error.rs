//! The crate's error type.

use std::path::PathBuf;

use crate::types::WorkflowId;

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Another `Runtime` (in this process or another) holds the journal directory.
    #[error(
        "journal {path:?} is already open in another runtime or process (lock file {lock:?} is held)"
    )]
    AlreadyOpen {
        /// The journal directory.
        path: PathBuf,
        /// The lock file that is held.
        lock: PathBuf,
    },
    /// The journal was written by a newer version of this crate.
    #[error("journal {path:?} has format version {found}, this build supports up to {supported}")]
    UnsupportedFormat {
        /// The journal directory.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// The journal could not be read: a record or the database itself is damaged.
    #[error("journal is corrupt: {what}")]
    Corrupt {
        /// Which record or file was damaged, and how.
        what: String,
    },
    /// The storage layer (sled or the file system) failed.
    #[error("journal storage failed while {context}")]
    Storage {
        /// What the runtime was doing.
        context: String,
        /// The underlying failure.
        #[source]
        source: StorageError,
    },
    /// A write to the journal, or the flush that makes writes durable, failed; that journal
    /// has stopped taking writes (fail-stop).
    ///
    /// The operation that returned this is not done: a step that returns it is not reported
    /// as completed, and neither is a start, signal or cancellation. Its writes may or may not
    /// have reached the disk, so once the journal is open again it is either journaled (and a
    /// step replays without running again) or absent (and a step runs again). The failed
    /// journal is never written or read again, because no later flush could prove that
    /// earlier writes are durable: sled 0.34 refuses all writes after an I/O error in its log,
    /// and after a failed `fsync` Linux may already have dropped the unwritten pages.
    /// Executions in flight are abandoned, not failed (see
    /// [`Runtime::issues`](crate::Runtime::issues)).
    ///
    /// What happens next depends on the [`ReopenPolicy`](crate::ReopenPolicy). By default the
    /// runtime closes the failed journal and opens the directory again by itself, and every
    /// unfinished workflow resumes from what is on disk; meanwhile calls return
    /// [`Error::Recovering`]. With [`ReopenPolicy::off`](crate::ReopenPolicy::off), or once
    /// every attempt has failed (the context then says so), every later operation on this
    /// runtime returns this error too; drop the runtime and open the directory again.
    ///
    /// Retrying is safe for a start (the ID is the idempotency key) and a cancellation (it
    /// only marks records), not blindly for a signal: each send is a new buffered signal, so
    /// a send that reached the disk and is sent again is delivered twice (look at
    /// [`Runtime::pending_signals`](crate::Runtime::pending_signals) and
    /// [`Runtime::history`](crate::Runtime::history) first).
    #[error("journal {path:?} failed while {context}; the operation is not done")]
    JournalFailed {
        /// The journal directory.
        path: PathBuf,
        /// What the runtime was doing when it met the failure (the workflow, the operation).
        context: String,
        /// The first failure, with the `std::io::Error` (and its kind) as its source.
        #[source]
        source: StorageError,
    },
    /// The journal failed and the runtime is opening the directory again (see
    /// [`RuntimeBuilder::reopen`](crate::RuntimeBuilder::reopen)); nothing was done, and the
    /// same call can be made again once the journal is open.
    ///
    /// Queries ([`Runtime::status`](crate::Runtime::status), `list`, `history`, ...) and
    /// commands (`start`, `signal`, `cancel`) return this at once instead of waiting;
    /// [`Handle::result`](crate::Handle::result) waits across the reopen instead. If every
    /// attempt fails, calls return [`Error::JournalFailed`] from then on.
    #[error(
        "journal {path:?} failed and is being opened again (attempt {attempt}); nothing was done, try again"
    )]
    Recovering {
        /// The journal directory.
        path: PathBuf,
        /// The reopen attempt in progress or about to start, from 1.
        attempt: u32,
        /// The failure that stopped the journal.
        #[source]
        source: StorageError,
    },
    /// A workflow name is not registered on this runtime.
    #[error("workflow {name:?} is not registered")]
    UnknownWorkflow {
        /// The name that was asked for.
        name: String,
    },
    /// A queue name is not configured on this runtime.
    #[error("queue {name:?} is not configured")]
    UnknownQueue {
        /// The name that was asked for.
        name: String,
    },
    /// No workflow with this ID exists in the journal.
    #[error("workflow {id} does not exist")]
    NotFound {
        /// The ID that was asked for.
        id: WorkflowId,
    },
    /// The ID exists but belongs to a workflow of another name.
    #[error("workflow {id} already exists as {existing:?}, not {requested:?}")]
    IdConflict {
        /// The ID.
        id: WorkflowId,
        /// The name recorded for it.
        existing: String,
        /// The name the caller asked for.
        requested: String,
    },
    /// A workflow ID was empty, too long, or contained a NUL byte; or a host tried to start a
    /// workflow whose ID contains `/`, which is reserved for child workflows (`parent/n`).
    #[error("invalid workflow id {id:?}: {reason}")]
    InvalidId {
        /// The rejected text.
        id: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A signal name contained a NUL byte, which the journal uses as a key separator.
    #[error("invalid signal name {name:?}: it contains a NUL byte")]
    InvalidSignalName {
        /// The rejected name.
        name: String,
    },
    /// A setting passed to a builder or policy was out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Replay asked for a different operation than the journal recorded at this position.
    #[error(
        "workflow {id} replay diverged at position {index}: journal has {recorded}, code asked for {requested}"
    )]
    Nondeterminism {
        /// The workflow.
        id: WorkflowId,
        /// Position in the workflow's journal.
        index: u64,
        /// The recorded operation.
        recorded: String,
        /// The requested operation.
        requested: String,
    },
    /// A journaled value or an input does not deserialise into the type the code asks for.
    #[error("workflow {id}: {what} does not deserialise into the requested type")]
    Payload {
        /// The workflow.
        id: WorkflowId,
        /// Which value (input, step output, signal, result).
        what: String,
        /// The serde failure.
        #[source]
        source: serde_json::Error,
    },
    /// A value could not be serialised to JSON.
    #[error("{what} could not be serialised")]
    Serialize {
        /// Which value.
        what: String,
        /// The serde failure.
        #[source]
        source: serde_json::Error,
    },
    /// A step failed permanently (non-retryable error or attempts exhausted).
    #[error("workflow {id}: step {step:?} failed after {attempts} attempt(s): {message}")]
    StepFailed {
        /// The workflow.
        id: WorkflowId,
        /// The step name.
        step: String,
        /// How many attempts ran.
        attempts: u32,
        /// The last attempt's error message.
        message: String,
    },
    /// The workflow finished with an error.
    #[error("workflow {id} failed: {message}")]
    WorkflowFailed {
        /// The workflow.
        id: WorkflowId,
        /// The error it returned.
        message: String,
    },
    /// The workflow was cancelled.
    #[error("workflow {id} was cancelled")]
    Cancelled {
        /// The workflow.
        id: WorkflowId,
    },
    /// A signal was sent to a workflow that has already finished.
    #[error("workflow {id} has finished; signal {signal:?} was not delivered")]
    Finished {
        /// The workflow.
        id: WorkflowId,
        /// The signal name.
        signal: String,
    },
    /// The runtime has been shut down.
    #[error("the runtime has been shut down")]
    ShutDown,
    /// A second worker was started on a runtime that already has one.
    #[error("a worker is already running on this runtime")]
    WorkerRunning,
}

/// The underlying cause of an [`Error::Storage`], wrapped so no sled type leaks.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    message: String,
    #[source]
    io: Option<std::io::Error>,
}

impl StorageError {
    pub(crate) fn from_sled(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => Self {
                message: io.to_string(),
                io: Some(io),
            },
            other => Self {
                message: other.to_string(),
                io: None,
            },
        }
    }

    pub(crate) fn from_io(e: std::io::Error) -> Self {
        Self {
            message: e.to_string(),
            io: Some(e),
        }
    }
}

impl Error {
    pub(crate) fn sled(context: impl Into<String>, e: sled::Error) -> Self {
        if let sled::Error::Corruption { .. } = e {
            return Error::Corrupt {
                what: format!("{}: {e}", context.into()),
            };
        }
        Error::Storage {
            context: context.into(),
            source: StorageError::from_sled(e),
        }
    }

    /// Names what the caller was doing in a [`Error::JournalFailed`]; other errors pass.
    pub(crate) fn during(self, context: impl FnOnce() -> String) -> Self {
        match self {
            Error::JournalFailed { path, source, .. } => Error::JournalFailed {
                path,
                context: context(),
                source,
            },
            other => other,
        }
    }

    pub(crate) fn io(context: impl Into<String>, e: std::io::Error) -> Self {
        Error::Storage {
            context: context.into(),
            source: StorageError::from_io(e),
        }
    }
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
