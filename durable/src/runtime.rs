//! The runtime: builder, registration, recovery, the worker loop, the timer heap, queues,
//! and the public queries (status, list, history) and commands (start, signal, cancel).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::context::{CatchUnwind, Context, Suspend};
use crate::error::{Error, Result};
use crate::journal::{Failure, Journal, JournalStats, Record, Writes, to_json};
use crate::types::{
    Durability, HistoryEntry, ListFilter, PendingSignal, QueueConfig, ReopenPolicy, StartOptions,
    WorkflowId, WorkflowInfo, WorkflowStatus, ms_to_time, now_ms,
};

pub(crate) type BoxFut = Pin<Box<dyn Future<Output = std::result::Result<Value, String>> + Send>>;
type Erased = Arc<dyn Fn(Context, Value) -> BoxFut + Send + Sync>;

/// Configures and opens a [`Runtime`]; created by [`Runtime::builder`].
pub struct RuntimeBuilder {
    path: PathBuf,
    durability: Durability,
    concurrency: usize,
    registry: HashMap<String, Erased>,
    queues: HashMap<String, QueueConfig>,
    reopen: ReopenPolicy,
    #[cfg(feature = "fault-injection")]
    faults: Option<crate::fault::FaultInjector>,
}

impl fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("path", &self.path)
            .field("durability", &self.durability)
            .field("concurrency", &self.concurrency)
            .field("workflows", &self.registry.keys().collect::<Vec<_>>())
            .field("queues", &self.queues)
            .field("reopen", &self.reopen)
            .finish()
    }
}

impl RuntimeBuilder {
    /// Sets how much a completed operation survives; the default is
    /// [`Durability::ProcessCrash`].
    ///
    /// Either way an operation on [`Context`] (a step's output, a timer, a signal's delivery,
    /// a child's start) and a start, signal or cancel on the runtime is reported done only
    /// after its journal write is flushed, shared with concurrent commits by group commit:
    /// - [`Durability::ProcessCrash`]: sled's flush writes the journal to the OS
    ///   (`sync_file_range`). It survives `kill -9` and a crash of the process; after a power
    ///   loss or kernel crash, the last few hundred milliseconds of reported operations may be
    ///   lost (their steps then run again).
    /// - [`Durability::PowerLoss`]: the flush plus an `fdatasync` of sled's files before the
    ///   operation is reported done, so it also survives power loss; about half the commit
    ///   rate of a single workflow (docs/BENCHMARKS.md).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How many workflow executions the worker runs at once (default 64, at least 1).
    ///
    /// Sleeping and waiting workflows hold no slot: they are suspended, not running.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Registers a workflow function under `name`.
    ///
    /// The function is a plain `async fn(Context, I) -> Result<O, E>`: `I` is deserialised from
    /// the journaled input, `O` is serialised into the journal, and `E`'s `Display` text is
    /// recorded as the failure message. Registering the same name twice keeps the last one.
    pub fn register<F, Fut, I, O, E>(mut self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(Context, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<O, E>> + Send + 'static,
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        E: fmt::Display + Send + 'static,
    {
        let f = Arc::new(f);
        let erased: Erased = Arc::new(move |ctx: Context, input: Value| -> BoxFut {
            let f = Arc::clone(&f);
            Box::pin(async move {
                let input: I = match serde_json::from_value(input) {
                    Ok(i) => i,
                    Err(source) => {
                        let e = Error::Payload {
                            id: ctx.id().clone(),
                            what: "the workflow input".into(),
                            source,
                        };
                        ctx.poison(e.to_string());
                        return Err(e.to_string());
                    }
                };
                match f(ctx, input).await {
                    Ok(o) => serde_json::to_value(o)
                        .map_err(|e| format!("the workflow output could not be serialised: {e}")),
                    Err(e) => Err(e.to_string()),
                }
            })
        });
        self.registry.insert(name.into(), erased);
        self
    }

    /// Declares a named queue with its limits; see [`StartOptions::queue`].
    pub fn queue(mut self, name: impl Into<String>, config: QueueConfig) -> Self {
        self.queues.insert(name.into(), config);
        self
    }

    /// Sets whether and how the runtime opens its journal directory again by itself after a
    /// disk error; the default is [`ReopenPolicy::default`] (on).
    ///
    /// With reopening on, a failed write or flush still fails the operations it covered with
    /// [`Error::JournalFailed`] and abandons the executions in flight, but then the worker
    /// closes the failed journal and opens the directory again, and every unfinished workflow
    /// resumes from disk without the host doing anything; calls made meanwhile return
    /// [`Error::Recovering`], and [`Handle::result`] waits across it. The worker does this, so
    /// it must be running (see [`Runtime::worker`]). [`ReopenPolicy::off`] keeps the runtime
    /// fail-stop: it stays failed until the host drops it and opens the directory again.
    pub fn reopen(mut self, policy: ReopenPolicy) -> Self {
        self.reopen = policy;
        self
    }

    /// Attaches a [`FaultInjector`](crate::FaultInjector) to the journal's writes and flushes,
    /// so a test can make one fail (test support, only with the `fault-injection` feature).
    /// The injector stays attached to every journal generation the runtime opens after a
    /// failure.
    #[cfg(feature = "fault-injection")]
    pub fn fault_injector(mut self, faults: &crate::fault::FaultInjector) -> Self {
        self.faults = Some(faults.clone());
        self
    }

    /// Opens the journal, takes its lock, and recovers every unfinished workflow.
    ///
    /// Recovered workflows are queued for the worker (see [`Runtime::worker`]); they run
    /// again from the start, with completed operations answered from the journal.
    /// Records that cannot be recovered (unparseable, unregistered name, unknown queue) are
    /// left untouched on disk and reported by [`Runtime::issues`]; the others run normally.
    ///
    /// A runtime of this process that was just dropped may still be closing the journal's
    /// files on its threads (a flush in flight); the open waits up to 2 s for them.
    ///
    /// # Errors
    /// [`Error::AlreadyOpen`] if another runtime, in this process or another, holds the
    /// directory; [`Error::Storage`] if the files stay locked past that wait; [`Error::UnsupportedFormat`] for a journal from a newer build;
    /// [`Error::Corrupt`] if sled cannot read the database; [`Error::Storage`] for I/O failures
    /// (including, in [`Durability::PowerLoss`] mode, failing to sync the files recovery is
    /// about to read).
    pub async fn open(self) -> Result<Runtime> {
        let path = self.path.clone();
        let durability = self.durability;
        let journal = tokio::task::spawn_blocking(move || Journal::open(&path, durability))
            .await
            .map_err(|e| Error::Corrupt {
                what: format!("opening the journal panicked: {e}"),
            })??;
        #[cfg(feature = "fault-injection")]
        if let Some(faults) = &self.faults {
            journal.inject(faults.clone());
        }
        let journal = Arc::new(journal);
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let (done_tx, _) = watch::channel(0u64);
        let (shutdown_tx, _) = watch::channel(false);
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(now_ms());
            h.finish()
        };
        let queues = self
            .queues
            .iter()
            .map(|(name, cfg)| {
                (
                    name.clone(),
                    QueueState {
                        cfg: *cfg,
                        active: 0,
                        pending: VecDeque::new(),
                        tokens: cfg.per_second.map_or(0.0, |r| r.max(1.0)),
                        last: Instant::now(),
                        armed: false,
                    },
                )
            })
            .collect();
        let inner = Arc::new(Inner {
            path: self.path,
            durability: self.durability,
            reopen: self.reopen,
            #[cfg(feature = "fault-injection")]
            faults: self.faults,
            slot: RwLock::new(Slot::Open(Arc::clone(&journal))),
            state_tx: watch::channel(0).0,
            attempts: AtomicU32::new(0),
            retired: Mutex::new(JournalStats::default()),
            registry: self.registry,
            queue_names: self.queues.keys().cloned().collect(),
            concurrency: self.concurrency,
            sched: Mutex::new(Sched {
                running: HashMap::new(),
                suspended: HashMap::new(),
                timers: BinaryHeap::new(),
                queues,
                slots: HashSet::new(),
                cancelled: HashSet::new(),
                generation: 0,
                issues: Vec::new(),
            }),
            ready_tx,
            ready_rx: Mutex::new(Some(ready_rx)),
            timer_notify: Notify::new(),
            done_tx,
            shutdown_tx,
            worker_done: watch::channel(false).0,
            rng: Mutex::new(seed),
        });
        let rt = Runtime { inner };
        let recover = rt.clone();
        tokio::task::spawn_blocking(move || recover.recover(&journal))
            .await
            .map_err(|e| Error::Corrupt {
                what: format!("recovery panicked: {e}"),
            })?;
        Ok(rt)
    }
}

/// A problem found in the journal that affects one workflow but not the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The workflow concerned, when known.
    pub workflow: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.workflow {
            Some(w) => write!(f, "workflow {w:?}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

struct QueueState {
    cfg: QueueConfig,
    active: usize,
    pending: VecDeque<String>,
    tokens: f64,
    last: Instant,
    armed: bool,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Wake { id: String, generation: u64 },
    Queue { name: String },
}

struct Sched {
    /// Executing workflows, with a flag set when something woke them while they ran.
    running: HashMap<String, bool>,
    /// Suspended workflows and the generation of their current suspension.
    suspended: HashMap<String, u64>,
    timers: BinaryHeap<Reverse<(u64, TimerKind)>>,
    queues: HashMap<String, QueueState>,
    /// Queued workflows that hold a concurrency slot of their queue.
    slots: HashSet<String>,
    cancelled: HashSet<String>,
    generation: u64,
    issues: Vec<Issue>,
}

/// Where the runtime's journal stands: open (healthy, or failed and not yet taken for
/// reopening), being reopened, or given up on.
enum Slot {
    Open(Arc<Journal>),
    /// The worker is closing the failed journal and opening the directory again.
    Reopening {
        attempt: u32,
        failure: Failure,
        /// The failed journal's counters when it was taken out of the slot.
        stats: JournalStats,
    },
    /// Every attempt failed; the runtime stays failed until the host drops it.
    GaveUp {
        failure: Failure,
        attempts: u32,
        last: String,
        /// Keeps the directory locked, as a failed open journal would, until the runtime is
        /// dropped.
        _lock: Arc<std::fs::File>,
    },
}

/// How long a reopen attempt waits, after its backoff, for the last users of the failed
/// journal to drop it. The executions are aborted before, so what is left are calls in
/// progress on it, which end at once on a failed journal, or a [`Context`] that workflow code
/// kept outside its execution.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

pub(crate) struct Inner {
    path: PathBuf,
    durability: Durability,
    reopen: ReopenPolicy,
    #[cfg(feature = "fault-injection")]
    faults: Option<crate::fault::FaultInjector>,
    /// The current journal generation. Each execution takes its own reference when it starts
    /// and uses only that, so an execution of a failed generation can never write into the
    /// next one; public calls take a reference per call.
    slot: RwLock<Slot>,
    /// Bumped whenever the slot changes, the worker stops or shutdown begins, so that
    /// [`Handle::result`] re-reads where the journal stands.
    state_tx: watch::Sender<u64>,
    /// Reopen attempts in a row that did not heal the journal (see [`ReopenPolicy`]).
    attempts: AtomicU32,
    /// Counters of the closed journal generations, and the reopen count.
    retired: Mutex<JournalStats>,
    registry: HashMap<String, Erased>,
    queue_names: HashSet<String>,
    concurrency: usize,
    sched: Mutex<Sched>,
    ready_tx: mpsc::UnboundedSender<String>,
    ready_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    timer_notify: Notify,
    done_tx: watch::Sender<u64>,
    shutdown_tx: watch::Sender<bool>,
    worker_done: watch::Sender<bool>,
    rng: Mutex<u64>,
}

fn push_issue(s: &mut Sched, issue: Issue) {
    // The same damaged record is met by every scan, every wake and every reopen; report it
    // once.
    if !s.issues.contains(&issue) {
        s.issues.push(issue);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way
    // that matters more than stopping, and workflow panics are caught outside them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// The current journal, for one call or one execution.
    ///
    /// # Errors
    /// [`Error::Recovering`] while the worker reopens a failed journal, or is about to;
    /// [`Error::JournalFailed`] once it gave up or stopped before it could. A failed journal
    /// that will not be reopened (reopening off) is returned, and answers with its failure.
    pub(crate) fn current(&self) -> Result<Arc<Journal>> {
        let slot = self.slot.read().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Slot::Open(j) => match j.failure() {
                Some(f) if self.will_reopen() => {
                    let next = if j.has_flushed() {
                        1
                    } else {
                        self.attempts.load(Ordering::SeqCst) + 1
                    };
                    Err(self.recovering(next.min(self.reopen.max_attempts), &f))
                }
                _ => Ok(Arc::clone(j)),
            },
            Slot::Reopening {
                attempt, failure, ..
            } => {
                if self.will_reopen() {
                    Err(self.recovering(*attempt, failure))
                } else {
                    Err(failure.error(
                        &self.path,
                        "the runtime was opening it again when its worker stopped".into(),
                    ))
                }
            }
            Slot::GaveUp {
                failure,
                attempts,
                last,
                ..
            } => Err(failure.error(
                &self.path,
                format!(
                    "the runtime gave up opening it again after {attempts} failed attempt(s) \
                     (the last: {last})"
                ),
            )),
        }
    }

    fn recovering(&self, attempt: u32, failure: &Failure) -> Error {
        Error::Recovering {
            path: self.path.clone(),
            attempt,
            source: failure.source(),
        }
    }

    /// Whether a failed journal will be reopened: the policy allows it, the worker that does
    /// it is running, and no shutdown has begun. (The slot is checked by the caller.)
    fn will_reopen(&self) -> bool {
        self.reopen.is_enabled()
            && lock(&self.ready_rx).is_none()
            && !*self.worker_done.borrow()
            && !*self.shutdown_tx.borrow()
    }

    /// A failure that a read met because the journal failed under it: retryable
    /// ([`Error::Recovering`]) when the journal is about to be reopened, since a read does
    /// nothing; other errors pass.
    fn refused(&self, e: Error) -> Error {
        match e {
            Error::JournalFailed { .. } => match self.current() {
                Err(r @ Error::Recovering { .. }) => r,
                _ => e,
            },
            other => other,
        }
    }

    /// Runs a read on the current journal; see [`Inner::refused`].
    fn read<T>(&self, f: impl FnOnce(&Journal) -> Result<T>) -> Result<T> {
        let j = self.current()?;
        f(&j).map_err(|e| self.refused(e))
    }

    fn set_slot(&self, slot: Slot) {
        *self.slot.write().unwrap_or_else(|p| p.into_inner()) = slot;
        self.state_tx.send_modify(|n| *n += 1);
    }

    /// The current journal if it is open and has failed.
    fn failed_journal(&self) -> Option<Arc<Journal>> {
        match &*self.slot.read().unwrap_or_else(|p| p.into_inner()) {
            Slot::Open(j) if j.has_failed() => Some(Arc::clone(j)),
            _ => None,
        }
    }

    /// A receiver that sees `true` once the current journal fails (`None` if none is open).
    fn failure_watch(&self) -> Option<watch::Receiver<bool>> {
        match &*self.slot.read().unwrap_or_else(|p| p.into_inner()) {
            Slot::Open(j) => Some(j.failure_watch()),
            _ => None,
        }
    }

    fn stats(&self) -> JournalStats {
        let retired = *lock(&self.retired);
        match &*self.slot.read().unwrap_or_else(|p| p.into_inner()) {
            Slot::Open(j) => retired.plus(j.stats()),
            Slot::Reopening { stats, .. } => retired.plus(*stats),
            Slot::GaveUp { .. } => retired,
        }
    }

    /// Forgets every execution, timer and queue slot, before recovery from a reopened
    /// journal rebuilds them from disk; the issues found so far stay.
    fn reset_sched(&self) {
        let mut s = lock(&self.sched);
        s.running.clear();
        s.suspended.clear();
        s.timers.clear();
        s.slots.clear();
        s.cancelled.clear();
        for q in s.queues.values_mut() {
            q.active = 0;
            q.pending.clear();
            q.armed = false;
        }
    }

    pub(crate) fn is_registered(&self, name: &str) -> bool {
        self.registry.contains_key(name)
    }

    pub(crate) fn cancel_requested(&self, id: &str) -> bool {
        lock(&self.sched).cancelled.contains(id)
    }

    pub(crate) fn next_random(&self) -> u64 {
        crate::types::splitmix64(&mut lock(&self.rng))
    }

    /// Makes a workflow runnable again: at once if suspended, after its current execution if
    /// running. Spurious wakes are harmless: the workflow replays and suspends again.
    pub(crate) fn wake(&self, id: &str) {
        let mut s = lock(&self.sched);
        if let Some(flag) = s.running.get_mut(id) {
            *flag = true;
        } else if s.suspended.remove(id).is_some() {
            let _ = self.ready_tx.send(id.to_string());
        }
    }

    pub(crate) fn dispatch_new(&self, id: &str) {
        let _ = self.ready_tx.send(id.to_string());
    }

    fn issue(&self, workflow: Option<&str>, message: String) {
        let issue = Issue {
            workflow: workflow.map(str::to_string),
            message,
        };
        push_issue(&mut lock(&self.sched), issue);
    }

    /// Moves queued workflows to the ready channel while the queue's limits allow.
    fn pump_queue(&self, s: &mut Sched, name: &str) {
        let Some(q) = s.queues.get_mut(name) else {
            return;
        };
        if let Some(rate) = q.cfg.per_second {
            let now = Instant::now();
            let cap = rate.max(1.0);
            q.tokens = (q.tokens + now.duration_since(q.last).as_secs_f64() * rate).min(cap);
            q.last = now;
        }
        let mut arm_at = None;
        while q.active < q.cfg.concurrency && !q.pending.is_empty() {
            if let Some(rate) = q.cfg.per_second {
                if q.tokens < 1.0 {
                    // At most a day at the lowest rate `rate_limit` accepts; saturating, so
                    // no rate can overflow the clock.
                    let wait = Duration::try_from_secs_f64((1.0 - q.tokens) / rate)
                        .unwrap_or(Duration::MAX);
                    let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
                    arm_at = Some(now_ms().saturating_add(wait_ms).saturating_add(1));
                    break;
                }
                q.tokens -= 1.0;
            }
            let Some(id) = q.pending.pop_front() else {
                break;
            };
            q.active += 1;
            s.slots.insert(id.clone());
            let _ = self.ready_tx.send(id);
        }
        if let Some(at) = arm_at {
            let q_armed = s.queues.get(name).is_some_and(|q| q.armed);
            if !q_armed {
                if let Some(q) = s.queues.get_mut(name) {
                    q.armed = true;
                }
                s.timers.push(Reverse((
                    at,
                    TimerKind::Queue {
                        name: name.to_string(),
                    },
                )));
                self.timer_notify.notify_one();
            }
        }
    }
}

/// A durable-execution runtime over one journal directory.
///
/// Cloning is cheap and shares the runtime. The journal stays open, and its directory
/// locked, until the runtime, its clones, its handles and its worker are all dropped.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("concurrency", &self.inner.concurrency)
            .finish_non_exhaustive()
    }
}

/// A reference to a started workflow; see [`Runtime::start`].
#[derive(Clone)]
pub struct Handle {
    id: WorkflowId,
    inner: Arc<Inner>,
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle").field("id", &self.id).finish()
    }
}

impl Handle {
    /// The workflow's ID.
    pub fn id(&self) -> &WorkflowId {
        &self.id
    }

    /// Waits until the workflow finishes and returns its output.
    ///
    /// Works for workflows that finished before this runtime was opened too: the output is
    /// read from the journal. A worker must be running for unfinished workflows to progress.
    /// While the runtime reopens a failed journal (see [`RuntimeBuilder::reopen`]), this
    /// keeps waiting, and returns the workflow's real outcome once it finishes from the
    /// reopened journal.
    ///
    /// # Errors
    /// [`Error::WorkflowFailed`] if it failed, [`Error::Cancelled`] if it was cancelled,
    /// [`Error::Payload`] if its output does not deserialise into `O`,
    /// [`Error::NotFound`] if the ID does not exist; [`Error::JournalFailed`] as soon as the
    /// journal fails if it will not be reopened ([`ReopenPolicy::off`], no worker running, a
    /// shutdown begun), or once the runtime gives up reopening it: the outcome is then known
    /// only after a runtime opens the journal again.
    pub async fn result<O: DeserializeOwned>(&self) -> Result<O> {
        let inner = &self.inner;
        let mut done = inner.done_tx.subscribe();
        let mut state = inner.state_tx.subscribe();
        // The senders live in `inner`, which `self` keeps alive, so waiting cannot fail.
        let closed = |_| Error::ShutDown;
        loop {
            state.borrow_and_update();
            let (read, mut failed) = match inner.current() {
                // The journal is not kept across the wait: a reopen waits for every
                // reference to the failed one to go. The failure watch is taken before the
                // read: a failure between the two would otherwise be marked as already seen
                // by the new receiver, and the wait below would never wake.
                Ok(j) => {
                    let failed = j.failure_watch();
                    (j.record(self.id.as_str()), failed)
                }
                Err(Error::Recovering { .. }) => {
                    state.changed().await.map_err(closed)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let rec = match read {
                Ok(Some(rec)) => rec,
                Ok(None) => {
                    return Err(Error::NotFound {
                        id: self.id.clone(),
                    });
                }
                // The worker is about to take the failed journal and reopen it.
                Err(Error::JournalFailed { .. }) if inner.will_reopen() => {
                    state.changed().await.map_err(closed)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match rec.status {
                WorkflowStatus::Succeeded => {
                    return serde_json::from_value(rec.output.unwrap_or(Value::Null)).map_err(
                        |source| Error::Payload {
                            id: self.id.clone(),
                            what: "the workflow output".into(),
                            source,
                        },
                    );
                }
                WorkflowStatus::Failed => {
                    return Err(Error::WorkflowFailed {
                        id: self.id.clone(),
                        message: rec.error.unwrap_or_default(),
                    });
                }
                WorkflowStatus::Cancelled => {
                    return Err(Error::Cancelled {
                        id: self.id.clone(),
                    });
                }
                WorkflowStatus::Enqueued | WorkflowStatus::Running => {
                    // Any of these means the record must be read again: it may have finished,
                    // its journal may have failed (or been closed after a reopen), or the
                    // runtime may have moved on with reopening.
                    tokio::select! {
                        changed = done.changed() => changed.map_err(closed)?,
                        _ = failed.changed() => {}
                        changed = state.changed() => changed.map_err(closed)?,
                    }
                }
            }
        }
    }

    /// The workflow's current summary.
    ///
    /// # Errors
    /// As [`Runtime::status`].
    pub fn status(&self) -> Result<WorkflowInfo> {
        Runtime {
            inner: Arc::clone(&self.inner),
        }
        .status(&self.id)
    }
}

/// The loop that picks up runnable workflows; see [`Runtime::worker`].
pub struct Worker {
    inner: Arc<Inner>,
    ready_rx: mpsc::UnboundedReceiver<String>,
    // Declared last so it drops last, after `inner`.
    _guard: WorkerGuard,
}

/// Marks the worker as gone when the worker (run or not) is dropped, so `shutdown` never
/// waits for a worker that will not run, and wakes result waiters, since a failed journal is
/// no longer going to be reopened.
struct WorkerGuard {
    done: watch::Sender<bool>,
    state: watch::Sender<u64>,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.done.send_replace(true);
        self.state.send_modify(|n| *n += 1);
    }
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("concurrency", &self.inner.concurrency)
            .finish()
    }
}

enum Outcome {
    Done {
        parent: Option<String>,
        queue: Option<String>,
    },
    Suspended(Suspend),
    /// The journal failed under the execution; the workflow stays as the disk has it.
    Abandoned(String),
    Gone,
}

impl Worker {
    /// Runs workflows until [`Runtime::shutdown`] is called.
    ///
    /// At most the builder's `concurrency` executions run at once, each as a task on the
    /// tokio runtime that polls this future. Timers of all sleeping workflows live in one heap
    /// polled by this loop, so a sleeping workflow costs no task.
    ///
    /// When the journal fails and the [`ReopenPolicy`] allows it, this loop reopens it (see
    /// [`RuntimeBuilder::reopen`]) and then goes on running workflows.
    ///
    /// # Errors
    /// None today; the `Result` leaves room for fatal journal failures.
    pub async fn run(mut self) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let sem = Arc::new(Semaphore::new(inner.concurrency));
        let mut tasks: JoinSet<()> = JoinSet::new();
        let mut shutdown = inner.shutdown_tx.subscribe();
        let reopens = inner.reopen.is_enabled();
        let mut failed_rx = inner.failure_watch();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if reopens && let Some(failed) = inner.failed_journal() {
                self.heal(failed, &mut tasks, &mut shutdown).await;
                failed_rx = inner.failure_watch();
                continue;
            }
            let next = lock(&inner.sched).timers.peek().map(|Reverse((t, _))| *t);
            let sleep_for = next.map(|t| Duration::from_millis(t.saturating_sub(now_ms())));
            tokio::select! {
                _ = shutdown.changed() => break,
                id = self.ready_rx.recv() => {
                    let Some(id) = id else { break };
                    {
                        let mut s = lock(&inner.sched);
                        if let Some(flag) = s.running.get_mut(&id) {
                            *flag = true;
                            continue;
                        }
                        s.suspended.remove(&id);
                        s.running.insert(id.clone(), false);
                    }
                    let permit = tokio::select! {
                        p = Arc::clone(&sem).acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                        _ = shutdown.changed() => break,
                    };
                    let task_inner = Arc::clone(&inner);
                    tasks.spawn(async move {
                        let outcome = execute(&task_inner, &id).await;
                        drop(permit);
                        settle(&task_inner, &id, outcome);
                    });
                }
                _ = sleep_maybe(sleep_for) => {
                    fire_timers(&inner);
                }
                _ = inner.timer_notify.notified() => {}
                Some(_) = tasks.join_next() => {}
                // The top of the loop takes the failed journal.
                () = journal_failed(&mut failed_rx), if reopens => {}
            }
        }
        tasks.shutdown().await;
        // Release every reference to the journal before the guard reports the worker gone,
        // so a `shutdown` caller that then drops the runtime really closes the journal.
        drop(tasks);
        drop(inner);
        drop(self);
        Ok(())
    }
}

impl Worker {
    /// Closes the failed journal and opens the directory again, with backoff, until it opens,
    /// the policy's attempts run out, or shutdown begins; see [`ReopenPolicy`].
    async fn heal(
        &mut self,
        failed: Arc<Journal>,
        tasks: &mut JoinSet<()>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let inner = Arc::clone(&self.inner);
        let Some(failure) = failed.failure() else {
            return;
        };
        let generation = failed.generation();
        // A reopened journal that failed before any of its flushes succeeded did not heal:
        // its failure continues the count of attempts.
        let mut attempt = if failed.has_flushed() {
            0
        } else {
            inner.attempts.load(Ordering::SeqCst)
        };
        inner.set_slot(Slot::Reopening {
            attempt: (attempt + 1).min(inner.reopen.max_attempts),
            failure: failure.clone(),
            stats: failed.stats(),
        });
        // Every execution in flight belongs to the failed journal. They are abandoned at
        // their current await point, as at shutdown: nothing they did after the failure was
        // reported done, and every workflow resumes from what is on disk.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let running: Vec<String> = lock(&inner.sched).running.keys().cloned().collect();
        for id in running {
            inner.issue(
                Some(&id),
                format!(
                    "execution abandoned (not failed) when journal generation {generation} \
                     failed; it resumes from disk once the runtime has opened the journal \
                     again: {failure}"
                ),
            );
        }
        // The directory stays locked from the failed journal to the next one, so no other
        // runtime can open it in between.
        let dir_lock = failed.lock_share();
        let mut last = if attempt > 0 {
            format!("the reopened journal failed again before any flush of it succeeded: {failure}")
        } else {
            String::new()
        };
        let mut failed = Some(failed);
        loop {
            attempt += 1;
            inner.attempts.store(attempt, Ordering::SeqCst);
            if attempt > inner.reopen.max_attempts {
                return inner.give_up(failure, attempt - 1, last, dir_lock);
            }
            let stats = failed.as_ref().map(|j| j.stats()).unwrap_or_default();
            inner.set_slot(Slot::Reopening {
                attempt,
                failure: failure.clone(),
                stats,
            });
            tokio::select! {
                () = tokio::time::sleep(inner.reopen.delay(attempt)) => {}
                _ = shutdown.changed() => {
                    let last = "shutdown began".to_string();
                    return inner.give_up(failure, attempt - 1, last, dir_lock);
                }
            }
            if let Some(j) = failed.take() {
                match close(j).await {
                    Ok(stats) => {
                        let mut retired = lock(&inner.retired);
                        *retired = retired.plus(stats);
                    }
                    Err((j, holders)) => {
                        failed = Some(j);
                        last = format!(
                            "the failed journal was still in use by {holders} holder(s) (a call \
                             in progress, or a Context kept outside its workflow)"
                        );
                        inner.issue(None, format!("reopen attempt {attempt}: {last}"));
                        continue;
                    }
                }
            }
            // Nothing runs and nothing is dispatched now (calls get `Recovering`), so what
            // the scheduler and the ready channel hold is stale: recovery rebuilds it.
            inner.reset_sched();
            while self.ready_rx.try_recv().is_ok() {}
            match reopen(&inner, dir_lock.clone(), generation + 1).await {
                Ok(journal) => {
                    lock(&inner.retired).reopens += 1;
                    inner.issue(
                        None,
                        format!(
                            "journal {:?} reopened as generation {} (attempt {attempt}) after \
                             it failed: {failure}; every unfinished workflow resumes from disk",
                            inner.path,
                            generation + 1
                        ),
                    );
                    inner.set_slot(Slot::Open(journal));
                    return;
                }
                Err(e) => {
                    last = e.to_string();
                    inner.issue(None, format!("reopen attempt {attempt} failed: {e}"));
                }
            }
        }
    }
}

impl Inner {
    fn give_up(&self, failure: Failure, attempts: u32, last: String, dir_lock: Arc<std::fs::File>) {
        self.issue(
            None,
            format!(
                "journal {:?} failed ({failure}) and the runtime gave up opening it again after \
                 {attempts} attempt(s) (the last: {last}); drop the runtime and open the \
                 directory again",
                self.path
            ),
        );
        self.set_slot(Slot::GaveUp {
            failure,
            attempts,
            last,
            _lock: dir_lock,
        });
    }
}

/// Waits for every other reference to the failed journal to go, then drops it, which closes
/// sled's database; returns its final counters, or the journal and how many others still
/// hold it after [`RELEASE_WAIT`].
async fn close(j: Arc<Journal>) -> std::result::Result<JournalStats, (Arc<Journal>, usize)> {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    while Arc::strong_count(&j) > 1 {
        if tokio::time::Instant::now() >= deadline {
            let holders = Arc::strong_count(&j) - 1;
            return Err((j, holders));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let stats = j.stats();
    // Dropping the last reference joins the committer thread and sled's flusher, and sled
    // syncs its files: blocking work that must not run on the executor (and sled 0.34 can
    // panic in it after an I/O error, which the blocking task contains).
    let _ = tokio::task::spawn_blocking(move || drop(j)).await;
    Ok(stats)
}

/// Opens the directory again under the lock already held and recovers every unfinished
/// workflow from it, as [`RuntimeBuilder::open`] does; the caller publishes the journal.
async fn reopen(
    inner: &Arc<Inner>,
    dir_lock: Arc<std::fs::File>,
    generation: u64,
) -> Result<Arc<Journal>> {
    let (path, durability) = (inner.path.clone(), inner.durability);
    let journal = tokio::task::spawn_blocking(move || {
        Journal::open_locked(&path, durability, dir_lock, generation)
    })
    .await
    .map_err(|e| Error::Corrupt {
        what: format!("opening the journal again panicked: {e}"),
    })??;
    #[cfg(feature = "fault-injection")]
    if let Some(faults) = &inner.faults {
        journal.inject(faults.clone());
    }
    let journal = Arc::new(journal);
    let (rt, j) = (
        Runtime {
            inner: Arc::clone(inner),
        },
        Arc::clone(&journal),
    );
    tokio::task::spawn_blocking(move || rt.recover(&j))
        .await
        .map_err(|e| Error::Corrupt {
            what: format!("recovery panicked: {e}"),
        })?;
    Ok(journal)
}

/// Resolves when the journal behind `rx` fails; never once it is gone.
async fn journal_failed(rx: &mut Option<watch::Receiver<bool>>) {
    let closed = match rx {
        Some(r) => r.wait_for(|failed| *failed).await.is_err(),
        None => std::future::pending().await,
    };
    if closed {
        *rx = None;
    }
}

async fn sleep_maybe(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn fire_timers(inner: &Inner) {
    let now = now_ms();
    let mut s = lock(&inner.sched);
    let mut queues = Vec::new();
    while let Some(Reverse((t, _))) = s.timers.peek() {
        if *t > now {
            break;
        }
        let Some(Reverse((_, kind))) = s.timers.pop() else {
            break;
        };
        match kind {
            TimerKind::Wake { id, generation } => {
                if s.suspended.get(&id) == Some(&generation) {
                    s.suspended.remove(&id);
                    let _ = inner.ready_tx.send(id);
                }
            }
            TimerKind::Queue { name } => {
                if let Some(q) = s.queues.get_mut(&name) {
                    q.armed = false;
                }
                queues.push(name);
            }
        }
    }
    for name in queues {
        inner.pump_queue(&mut s, &name);
    }
}

/// Records what happened to an execution in the scheduler.
fn settle(inner: &Inner, id: &str, outcome: Outcome) {
    let mut s = lock(&inner.sched);
    let woken = s.running.remove(id).unwrap_or(false);
    match outcome {
        Outcome::Suspended(sus) => {
            if woken {
                let _ = inner.ready_tx.send(id.to_string());
            } else {
                s.generation += 1;
                let generation = s.generation;
                s.suspended.insert(id.to_string(), generation);
                if let Some(at) = sus.deadline_ms {
                    s.timers.push(Reverse((
                        at,
                        TimerKind::Wake {
                            id: id.to_string(),
                            generation,
                        },
                    )));
                    inner.timer_notify.notify_one();
                }
            }
        }
        Outcome::Done { parent, queue } => {
            s.cancelled.remove(id);
            if s.slots.remove(id)
                && let Some(qname) = queue
            {
                if let Some(q) = s.queues.get_mut(&qname) {
                    q.active = q.active.saturating_sub(1);
                }
                inner.pump_queue(&mut s, &qname);
            }
            drop(s);
            if let Some(p) = parent {
                inner.wake(&p);
            }
            inner.done_tx.send_modify(|n| *n += 1);
        }
        Outcome::Abandoned(why) => {
            drop(s);
            inner.issue(
                Some(id),
                format!(
                    "execution abandoned (not failed), to resume from disk once the journal is \
                     open again: {why}"
                ),
            );
        }
        Outcome::Gone => {}
    }
}

async fn execute(inner: &Arc<Inner>, id: &str) -> Outcome {
    // This execution uses this journal generation and no other, to the end.
    let journal = match inner.current() {
        Ok(j) => j,
        Err(e) => return Outcome::Abandoned(e.to_string()),
    };
    let mut rec = match journal.record(id) {
        Ok(Some(r)) => r,
        Ok(None) => return Outcome::Gone,
        Err(e @ Error::JournalFailed { .. }) => return Outcome::Abandoned(e.to_string()),
        Err(e) => {
            inner.issue(Some(id), e.to_string());
            return Outcome::Gone;
        }
    };
    if rec.status.is_terminal() {
        return Outcome::Done {
            parent: None,
            queue: rec.queue,
        };
    }
    let Some(f) = inner.registry.get(&rec.name).cloned() else {
        inner.issue(
            Some(id),
            Error::UnknownWorkflow {
                name: rec.name.clone(),
            }
            .to_string(),
        );
        return Outcome::Gone;
    };
    if rec.status == WorkflowStatus::Enqueued {
        rec.status = WorkflowStatus::Running;
        rec.updated_ms = now_ms();
        let mut w = Writes::default();
        // The status change needs no flush of its own: sled flushes in order, so any later
        // durable step of this workflow carries it along.
        match w.record(id, &rec).and_then(|()| journal.apply(w)) {
            Ok(()) => {}
            Err(e @ Error::JournalFailed { .. }) => return Outcome::Abandoned(e.to_string()),
            Err(e) => {
                inner.issue(Some(id), e.to_string());
                return Outcome::Gone;
            }
        }
    }
    let history = match journal.events(id) {
        Ok(h) => h,
        Err(e @ Error::JournalFailed { .. }) => return Outcome::Abandoned(e.to_string()),
        Err(e) => {
            inner.issue(Some(id), e.to_string());
            return Outcome::Gone;
        }
    };
    let (stx, mut srx) = tokio::sync::oneshot::channel();
    let ctx = Context::new(
        Arc::clone(inner),
        Arc::clone(&journal),
        WorkflowId::from_trusted(id.to_string()),
        history,
        stx,
    );
    let mut fut = CatchUnwind::new(f(ctx.clone(), rec.input.clone()));
    let result = loop {
        tokio::select! {
            biased;
            r = &mut fut => break r,
            s = &mut srx, if !srx.is_terminated() => {
                if let Ok(s) = s {
                    return Outcome::Suspended(s);
                }
            }
        }
    };
    let result = match result {
        Ok(r) => r,
        Err(panic) => Err(format!("workflow panicked: {panic}")),
    };
    if let Some(why) = ctx.interrupted() {
        // The journal failed under this execution, so its outcome (most likely the journal
        // error itself) says nothing about the workflow.
        return Outcome::Abandoned(why);
    }
    let cancelled = inner.cancel_requested(id) || ctx.cancel_delivered();
    match ctx.poisoned() {
        Some(msg) => {
            rec.status = WorkflowStatus::Failed;
            rec.error = Some(msg);
        }
        None => match result {
            Ok(v) if !cancelled => {
                rec.status = WorkflowStatus::Succeeded;
                rec.output = Some(v);
            }
            Ok(v) => {
                rec.status = WorkflowStatus::Cancelled;
                rec.output = Some(v);
            }
            Err(msg) => {
                rec.status = if cancelled {
                    WorkflowStatus::Cancelled
                } else {
                    WorkflowStatus::Failed
                };
                rec.error = Some(msg);
            }
        },
    }
    rec.updated_ms = now_ms();
    let mut w = Writes::default();
    let committed = match w.record(id, &rec) {
        Ok(()) => journal.commit(w).await,
        Err(e) => Err(e),
    };
    match committed {
        Ok(()) => {}
        Err(e @ Error::JournalFailed { .. }) => {
            let e = e.during(|| format!("recording the outcome of workflow {id:?}"));
            return Outcome::Abandoned(e.to_string());
        }
        Err(e) => {
            inner.issue(Some(id), format!("recording the result failed: {e}"));
            return Outcome::Gone;
        }
    }
    Outcome::Done {
        parent: rec.parent,
        queue: rec.queue,
    }
}

fn info(id: &str, rec: &Record) -> WorkflowInfo {
    WorkflowInfo {
        id: WorkflowId::from_trusted(id.to_string()),
        name: rec.name.clone(),
        status: rec.status,
        created_at: ms_to_time(rec.created_ms),
        updated_at: ms_to_time(rec.updated_ms),
        queue: rec.queue.clone(),
        parent: rec.parent.clone().map(WorkflowId::from_trusted),
        cancel_requested: rec.cancel_requested,
        error: rec.error.clone(),
    }
}

impl Runtime {
    /// Starts configuring a runtime whose journal lives in the directory `path`.
    ///
    /// The directory holds sled's database (`journal/`) and a lock file (`keel.lock`).
    pub fn builder(path: impl AsRef<Path>) -> RuntimeBuilder {
        RuntimeBuilder {
            path: path.as_ref().to_path_buf(),
            durability: Durability::default(),
            concurrency: 64,
            registry: HashMap::new(),
            queues: HashMap::new(),
            reopen: ReopenPolicy::default(),
            #[cfg(feature = "fault-injection")]
            faults: None,
        }
    }

    /// Queues every unfinished workflow of `journal` for the worker; run on open and after
    /// every reopen, on an empty scheduler.
    fn recover(&self, journal: &Journal) {
        let inner = &self.inner;
        let mut ready = Vec::new();
        let mut queued: HashMap<String, Vec<(u64, String)>> = HashMap::new();
        let mut s = lock(&inner.sched);
        for (id, rec) in journal.records() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    let issue = Issue {
                        workflow: Some(id).filter(|i| !i.is_empty()),
                        message: e.to_string(),
                    };
                    push_issue(&mut s, issue);
                    continue;
                }
            };
            if rec.status.is_terminal() {
                continue;
            }
            if !inner.registry.contains_key(&rec.name) {
                let issue = Issue {
                    workflow: Some(id),
                    message: Error::UnknownWorkflow { name: rec.name }.to_string(),
                };
                push_issue(&mut s, issue);
                continue;
            }
            if rec.cancel_requested {
                s.cancelled.insert(id.clone());
            }
            match &rec.queue {
                Some(q) if !inner.queue_names.contains(q) => {
                    let issue = Issue {
                        workflow: Some(id),
                        message: Error::UnknownQueue { name: q.clone() }.to_string(),
                    };
                    push_issue(&mut s, issue);
                }
                Some(q) if rec.status == WorkflowStatus::Enqueued => {
                    queued.entry(q.clone()).or_default().push((rec.seq, id));
                }
                Some(q) => {
                    if let Some(qs) = s.queues.get_mut(q) {
                        qs.active += 1;
                    }
                    s.slots.insert(id.clone());
                    ready.push((rec.seq, id));
                }
                None => ready.push((rec.seq, id)),
            }
        }
        ready.sort();
        for (_, id) in ready {
            let _ = inner.ready_tx.send(id);
        }
        for (name, mut ids) in queued {
            ids.sort();
            if let Some(q) = s.queues.get_mut(&name) {
                q.pending.extend(ids.into_iter().map(|(_, id)| id));
            }
            inner.pump_queue(&mut s, &name);
        }
    }

    /// Takes the runtime's worker: the loop that runs workflows. Spawn it on your tokio runtime
    /// (`tokio::spawn(rt.worker()?.run())`) or drive it from your own scheduler.
    ///
    /// # Errors
    /// [`Error::WorkerRunning`] if the worker was already taken.
    pub fn worker(&self) -> Result<Worker> {
        let rx = lock(&self.inner.ready_rx)
            .take()
            .ok_or(Error::WorkerRunning)?;
        Ok(Worker {
            inner: Arc::clone(&self.inner),
            ready_rx: rx,
            _guard: WorkerGuard {
                done: self.inner.worker_done.clone(),
                state: self.inner.state_tx.clone(),
            },
        })
    }

    /// Starts workflow `name` under `id` with `input`, or returns the existing workflow.
    ///
    /// The ID is the idempotency key: if it exists (running or finished), nothing new runs and
    /// the returned handle refers to the existing workflow. Once this returns `Ok`, the start
    /// is durable: after a crash the workflow is recovered and runs to completion.
    ///
    /// If the journal fails while the start is journaled ([`Error::JournalFailed`]), the start
    /// is not done. Its record may still have reached the disk, in which case the workflow
    /// runs once the journal is open again (reopened by this runtime, see
    /// [`RuntimeBuilder::reopen`], or by the next one); starting the same ID again is the way
    /// to find out, since it returns the existing workflow rather than starting a second one.
    ///
    /// # Errors
    /// [`Error::UnknownWorkflow`] if `name` is not registered; [`Error::InvalidId`] if the ID
    /// contains `/`, which is reserved for child workflows (`parent/n`, started by
    /// [`Context::child`](crate::Context::child); their IDs still work for queries and
    /// signals); [`Error::IdConflict`] if the ID exists under another name; [`Error::Serialize`], [`Error::Storage`] or
    /// [`Error::JournalFailed`]; [`Error::Recovering`] while the journal is being reopened
    /// (nothing was done; try again).
    pub async fn start<I: Serialize>(
        &self,
        name: &str,
        id: &WorkflowId,
        input: &I,
    ) -> Result<Handle> {
        self.start_with(name, id, input, StartOptions::new()).await
    }

    /// As [`Runtime::start`], with options such as a queue.
    ///
    /// # Errors
    /// As [`Runtime::start`], plus [`Error::UnknownQueue`].
    pub async fn start_with<I: Serialize>(
        &self,
        name: &str,
        id: &WorkflowId,
        input: &I,
        options: StartOptions,
    ) -> Result<Handle> {
        let inner = &self.inner;
        if !inner.registry.contains_key(name) {
            return Err(Error::UnknownWorkflow { name: name.into() });
        }
        if id.as_str().contains('/') {
            // A host-started `p/0` would take the ID of `p`'s first child.
            return Err(Error::InvalidId {
                id: id.as_str().to_string(),
                reason: "`/` is reserved for the IDs of child workflows, which their parent starts",
            });
        }
        if let Some(q) = &options.queue
            && !inner.queue_names.contains(q)
        {
            return Err(Error::UnknownQueue { name: q.clone() });
        }
        let input = serde_json::to_value(input).map_err(|source| Error::Serialize {
            what: format!("input of workflow {id}"),
            source,
        })?;
        let journaling = || format!("journaling the start of workflow {id}");
        let journal = inner.current()?;
        let now = now_ms();
        let rec = Record {
            name: name.to_string(),
            input,
            status: if options.queue.is_some() {
                WorkflowStatus::Enqueued
            } else {
                WorkflowStatus::Running
            },
            created_ms: now,
            updated_ms: now,
            seq: journal.next_seq().map_err(|e| e.during(journaling))?,
            queue: options.queue.clone(),
            parent: None,
            cancel_requested: false,
            output: None,
            error: None,
        };
        let handle = Handle {
            id: id.clone(),
            inner: Arc::clone(inner),
        };
        let created = journal.create(id.as_str(), &rec);
        if let Some(existing) = created.map_err(|e| e.during(journaling))? {
            if existing.name != name {
                return Err(Error::IdConflict {
                    id: id.clone(),
                    existing: existing.name,
                    requested: name.into(),
                });
            }
            // An existing record was committed by whoever created it; make sure that commit
            // is durable before reporting the start as done.
            journal.sync().await.map_err(|e| e.during(journaling))?;
            return Ok(handle);
        }
        journal.sync().await.map_err(|e| e.during(journaling))?;
        match &options.queue {
            Some(q) => {
                let mut s = lock(&inner.sched);
                if let Some(qs) = s.queues.get_mut(q) {
                    qs.pending.push_back(id.as_str().to_string());
                }
                inner.pump_queue(&mut s, q);
            }
            None => inner.dispatch_new(id.as_str()),
        }
        Ok(handle)
    }

    /// A handle to an existing workflow.
    ///
    /// # Errors
    /// [`Error::NotFound`] if the ID does not exist; otherwise as [`Runtime::status`].
    pub fn handle(&self, id: &WorkflowId) -> Result<Handle> {
        self.status(id)?;
        Ok(Handle {
            id: id.clone(),
            inner: Arc::clone(&self.inner),
        })
    }

    /// The workflow's current summary, read from the journal.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Corrupt`] or [`Error::Storage`]. Once the journal has
    /// failed, this and the other queries refuse to answer from a journal whose last writes
    /// may not be on disk: they return [`Error::Recovering`] (retryable, nothing waits) while
    /// the runtime reopens it, or [`Error::JournalFailed`] if it will not be reopened (see
    /// [`RuntimeBuilder::reopen`]).
    pub fn status(&self, id: &WorkflowId) -> Result<WorkflowInfo> {
        let rec = self
            .inner
            .read(|j| j.record(id.as_str()))?
            .ok_or_else(|| Error::NotFound { id: id.clone() })?;
        Ok(info(id.as_str(), &rec))
    }

    /// Every workflow matching `filter`, oldest first.
    ///
    /// # Errors
    /// [`Error::Storage`] if the journal cannot be read; [`Error::Recovering`] or
    /// [`Error::JournalFailed`] once it has failed, as for [`Runtime::status`]. Records that
    /// do not parse are skipped here and reported by [`Runtime::issues`].
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<WorkflowInfo>> {
        let mut out = Vec::new();
        let records = self.inner.read(|j| {
            let mut records = j.records();
            // A failed journal answers with its failure alone.
            if let [(_, Err(Error::JournalFailed { .. }))] = records.as_slice()
                && let Some((_, Err(e))) = records.pop()
            {
                return Err(e);
            }
            Ok(records)
        })?;
        for (id, rec) in records {
            match rec {
                Ok(rec) => {
                    let i = info(&id, &rec);
                    if filter.matches(&i) {
                        out.push((rec.seq, i));
                    }
                }
                Err(e @ (Error::Storage { .. } | Error::JournalFailed { .. })) => return Err(e),
                Err(e) => self.inner.issue(Some(&id), e.to_string()),
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out.into_iter().map(|(_, i)| i).collect())
    }

    /// The workflow's journal, one human-readable entry per recorded operation.
    ///
    /// # Errors
    /// As [`Runtime::status`].
    pub fn history(&self, id: &WorkflowId) -> Result<Vec<HistoryEntry>> {
        self.status(id)?;
        let events = self.inner.read(|j| j.events(id.as_str()))?;
        Ok(events
            .into_iter()
            .map(|(index, ev)| {
                let detail = serde_json::to_string(&ev).unwrap_or_default();
                HistoryEntry {
                    index,
                    kind: ev.kind().to_string(),
                    name: ev.subject(),
                    detail,
                }
            })
            .collect())
    }

    /// The signals sent to a workflow that it has not received yet, oldest first.
    ///
    /// A signal appears here from the moment [`Runtime::signal`] returns `Ok` until the
    /// workflow's [`Context::recv`] takes it; taking it and journaling its delivery (which
    /// then shows in [`Runtime::history`]) are one atomic write, so a signal is always in
    /// exactly one of the two lists. Signals still buffered when a workflow finishes stay
    /// here.
    ///
    /// # Errors
    /// As [`Runtime::status`].
    pub fn pending_signals(&self, id: &WorkflowId) -> Result<Vec<PendingSignal>> {
        self.status(id)?;
        let signals = self.inner.read(|j| j.signals(id.as_str()))?;
        Ok(signals
            .into_iter()
            .map(|(_, name, value)| PendingSignal {
                name,
                value: value.to_string(),
            })
            .collect())
    }

    /// Sends signal `name` with `value` to a workflow.
    ///
    /// Once this returns `Ok`, the signal is durable: it is buffered until the workflow
    /// receives it with [`Context::recv`], and delivered exactly once even across crashes
    /// (taking it from the buffer and journaling its delivery is one atomic write).
    /// Signals of one name are delivered in the order they were sent.
    ///
    /// If the journal fails while the signal is journaled ([`Error::JournalFailed`]), the
    /// send is not done, but the signal may have reached the disk: once the journal is open
    /// again (reopened by this runtime, see [`RuntimeBuilder::reopen`], or by the next one),
    /// [`Runtime::pending_signals`] and [`Runtime::history`] show whether it is there. A send
    /// is not idempotent (each one buffers a new signal), so sending it again without looking
    /// can deliver it twice. [`Error::Recovering`] means nothing was sent, and the same send
    /// can be made again.
    ///
    /// # Errors
    /// [`Error::InvalidSignalName`] if `name` contains a NUL byte; [`Error::NotFound`];
    /// [`Error::Finished`] if the workflow has already finished; [`Error::Serialize`],
    /// [`Error::Storage`], [`Error::JournalFailed`] or [`Error::Recovering`].
    pub async fn signal<T: Serialize>(&self, id: &WorkflowId, name: &str, value: &T) -> Result<()> {
        if name.contains('\0') {
            // The journal separates a signal's name from its sequence number with NUL; a
            // name with a NUL in it could be taken by a `recv` of a shorter name.
            return Err(Error::InvalidSignalName { name: name.into() });
        }
        let journal = self.inner.current()?;
        let rec = journal
            .record(id.as_str())
            .map_err(|e| self.inner.refused(e))?
            .ok_or_else(|| Error::NotFound { id: id.clone() })?;
        if rec.status.is_terminal() {
            return Err(Error::Finished {
                id: id.clone(),
                signal: name.into(),
            });
        }
        let v = to_json(&format!("signal {name:?}"), value)?;
        let mut w = Writes::default();
        let journaling = || format!("journaling signal {name:?} for workflow {id}");
        let key = journal
            .signal_key(id.as_str(), name)
            .map_err(|e| e.during(journaling))?;
        w.put(key, v);
        journal.commit(w).await.map_err(|e| e.during(journaling))?;
        self.inner.wake(id.as_str());
        Ok(())
    }

    /// Requests cancellation of a workflow and, recursively, of its unfinished children.
    ///
    /// The request is durable once this returns `Ok`. A running workflow observes it at its
    /// next new operation on [`Context`] (step, sleep, recv, child, ...), which returns
    /// [`Error::Cancelled`] once; the operations after that run normally, so the workflow
    /// can run compensation steps before it returns. It then ends as
    /// [`WorkflowStatus::Cancelled`]. A workflow still waiting in a queue is cancelled at once.
    /// Cancelling a finished workflow does nothing.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::Storage`] or [`Error::JournalFailed`] (the request may then
    /// be found on disk when the journal is open again, as for [`Runtime::signal`]; cancelling
    /// again is safe, since it only marks records); [`Error::Recovering`] while the journal is
    /// being reopened (nothing was done; try again).
    pub async fn cancel(&self, id: &WorkflowId) -> Result<()> {
        let inner = &self.inner;
        let journal = inner.current()?;
        journal
            .record(id.as_str())
            .map_err(|e| inner.refused(e))?
            .ok_or_else(|| Error::NotFound { id: id.clone() })?;
        let mut children: HashMap<String, Vec<String>> = HashMap::new();
        let mut records = HashMap::new();
        for (cid, rec) in journal.records() {
            if let Ok(rec) = rec {
                if let Some(p) = &rec.parent {
                    children.entry(p.clone()).or_default().push(cid.clone());
                }
                records.insert(cid, rec);
            }
        }
        let mut w = Writes::default();
        let mut touched = Vec::new();
        let mut finished_now = false;
        let mut stack = vec![id.as_str().to_string()];
        let now = now_ms();
        while let Some(x) = stack.pop() {
            let Some(mut rec) = records.remove(&x) else {
                continue;
            };
            if rec.status.is_terminal() {
                continue;
            }
            rec.cancel_requested = true;
            rec.updated_ms = now;
            if rec.status == WorkflowStatus::Enqueued {
                rec.status = WorkflowStatus::Cancelled;
                finished_now = true;
            }
            w.record(&x, &rec)?;
            stack.extend(children.remove(&x).unwrap_or_default());
            touched.push(x);
        }
        // One write for the workflow and all its descendants: after a failure, either every
        // one of them has the request on disk or none has.
        journal
            .commit(w)
            .await
            .map_err(|e| e.during(|| format!("journaling the cancellation of workflow {id}")))?;
        drop(journal);
        {
            let mut s = lock(&inner.sched);
            for x in &touched {
                s.cancelled.insert(x.clone());
            }
        }
        for x in &touched {
            inner.wake(x);
        }
        if finished_now {
            inner.done_tx.send_modify(|n| *n += 1);
        }
        Ok(())
    }

    /// Problems found in the journal that affect single workflows (unparseable records,
    /// unregistered names, unknown queues, failures to record a result). Those workflows are
    /// left as they are on disk; every other workflow runs normally.
    ///
    /// Once the journal has failed ([`Error::JournalFailed`]), every execution that was in
    /// flight, or that the worker picks up afterwards, is abandoned and listed here with the
    /// error: such a workflow is not failed, it resumes from the journal once it is open
    /// again. Reopening (see [`RuntimeBuilder::reopen`]) is reported here too, with no
    /// workflow: each failed attempt and why, the reopen that succeeded, or that the runtime
    /// gave up.
    pub fn issues(&self) -> Vec<Issue> {
        lock(&self.inner.sched).issues.clone()
    }

    /// Counters of the group committer (commits requested, flushes run, flushes failed) and
    /// how often the journal was reopened, summed over every journal generation.
    pub fn stats(&self) -> JournalStats {
        self.inner.stats()
    }

    /// Stops the worker, waits for its executions to be dropped, and flushes the journal.
    ///
    /// Executions in flight are abandoned at their current await point; because every
    /// completed operation is already journaled, they resume from there when a runtime opens
    /// the journal again. The directory lock is released when the last clone of this runtime
    /// and the last [`Handle`] are dropped.
    ///
    /// A reopen in progress stops at its next wait, and the runtime stays failed.
    ///
    /// # Errors
    /// [`Error::JournalFailed`] if the final flush fails or the journal had failed before
    /// (and was not reopened).
    pub async fn shutdown(&self) -> Result<()> {
        self.inner.shutdown_tx.send_replace(true);
        self.inner.state_tx.send_modify(|n| *n += 1);
        if lock(&self.inner.ready_rx).is_none() {
            let mut done = self.inner.worker_done.subscribe();
            // The sender lives in `inner`, which `self` keeps alive, so this cannot fail.
            let _ = done.wait_for(|d| *d).await;
        }
        self.inner.current()?.sync().await
    }
}
