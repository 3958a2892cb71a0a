//! Durable workflows for async Rust, journaled in an embedded sled database.
//!
//! A [`Runtime`] owns a journal directory. A workflow is a plain async function
//! `async fn(Context, I) -> Result<O, E>` registered by name on the [`RuntimeBuilder`]; inputs
//! and outputs are serde values. Every side effect goes through [`Context::step`], which
//! journals the step's output (and flushes it) before the workflow sees it, so a restarted
//! process replays the workflow instead of redoing its work. A [`Worker`], which the host
//! spawns on its own tokio runtime, runs workflows with a concurrency limit; [`Handle`]s
//! wait for results.
//!
//! ```
//! use keel_durable::{Context, Runtime, StepError, WorkflowId};
//!
//! async fn greet(ctx: Context, name: String) -> keel_durable::Result<String> {
//!     let greeting = ctx
//!         .step("compose", || async { Ok::<_, StepError>(format!("hello, {name}")) })
//!         .await?;
//!     ctx.sleep(std::time::Duration::from_millis(1)).await?;
//!     Ok(greeting)
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
//! # rt.block_on(async {
//! let runtime = Runtime::builder(dir.path()).register("greet", greet).open().await?;
//! tokio::spawn(runtime.worker()?.run());
//! let id = WorkflowId::new("greet-1")?;
//! let handle = runtime.start("greet", &id, &"keel".to_string()).await?;
//! assert_eq!(handle.result::<String>().await?, "hello, keel");
//! // Starting the same ID again returns the finished workflow; nothing runs twice.
//! let again = runtime.start("greet", &id, &"other".to_string()).await?;
//! assert_eq!(again.result::<String>().await?, "hello, keel");
//! runtime.shutdown().await?;
//! # Ok::<_, Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Guarantees
//! - **Durability.** Once an operation on [`Context`] returns, its outcome is journaled and
//!   flushed to the level set by [`Durability`]: [`Durability::ProcessCrash`] survives
//!   `kill -9`, [`Durability::PowerLoss`] also survives a power cut. Flushes use group commit:
//!   a committer thread flushes for every completion queued since its previous flush, and a
//!   workflow that commits alone flushes on its own thread (see [`Durability`]).
//! - **Replay.** After a crash, [`RuntimeBuilder::open`] re-runs every unfinished workflow;
//!   completed operations return their journaled outcomes, and a step whose outcome was
//!   journaled never runs again. Code that asks for a different operation than the journal
//!   recorded fails with [`Error::Nondeterminism`].
//! - **Exclusivity.** One runtime at a time opens a journal directory; another gets
//!   [`Error::AlreadyOpen`], whether it is in this process or another.
//! - **Isolation.** There is no global state: two runtimes on two directories in one process
//!   do not interfere. All public types are `Send + Sync`.
//! - **Disk errors stop the journal, and the runtime reopens it.** If a journal write or
//!   flush fails, the operations it covered return [`Error::JournalFailed`] and are not
//!   reported done, and that journal takes no more writes and answers no more reads: no later
//!   flush on it could prove the earlier writes durable. Executions in flight are abandoned,
//!   not failed. By default ([`ReopenPolicy`]) the worker then closes the failed journal,
//!   opens the directory again under the same lock and resumes every unfinished workflow
//!   from what is on disk, with no help from the host; calls made meanwhile return the
//!   retryable [`Error::Recovering`], and [`Handle::result`] waits across the reopen. With
//!   [`ReopenPolicy::off`], or once every attempt has failed, the runtime stays failed until
//!   the host drops it and opens the directory again.
//!
//! # Feature flags
//! - `fault-injection` (off by default; test support, not a stable API): `FaultInjector`
//!   and `RuntimeBuilder::fault_injector`, which make a journal write or flush fail on demand.
#![forbid(unsafe_code)]

mod context;
mod error;
#[cfg(feature = "fault-injection")]
mod fault;
mod journal;
mod runtime;
mod types;

pub use context::{ChildHandle, Context};
pub use error::{Error, Result, StorageError};
#[cfg(feature = "fault-injection")]
pub use fault::FaultInjector;
pub use journal::JournalStats;
pub use runtime::{Handle, Issue, Runtime, RuntimeBuilder, Worker};
pub use types::{
    Durability, HistoryEntry, ListFilter, PendingSignal, QueueConfig, ReopenPolicy, RetryPolicy,
    StartOptions, StepError, WorkflowId, WorkflowInfo, WorkflowStatus,
};
