//! The sled journal: key layout, records and events, the directory lock, and group commit.
//!
//! Everything lives in sled's default tree under prefixed keys, so a multi-key change is one
//! atomic `apply_batch`:
//! - `m/format` -> the format version (big-endian `u32`);
//! - `w/<id>` -> a workflow [`Record`] (JSON);
//! - `e/<id>\0<index:be64>` -> the workflow's [`Event`] at `index` (JSON);
//! - `s/<id>\0<signal>\0<seq:be64>` -> a buffered signal value (JSON), deleted in the same
//!   batch that journals its delivery.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError, mpsc};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result, StorageError};
use crate::types::{Durability, WorkflowStatus};

/// The journal format this build writes and the newest it reads.
pub(crate) const FORMAT_VERSION: u32 = 1;
const FORMAT_KEY: &[u8] = b"m/format";

/// A workflow's durable record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) name: String,
    pub(crate) input: Value,
    pub(crate) status: WorkflowStatus,
    pub(crate) created_ms: u64,
    pub(crate) updated_ms: u64,
    pub(crate) seq: u64,
    pub(crate) queue: Option<String>,
    pub(crate) parent: Option<String>,
    pub(crate) cancel_requested: bool,
    pub(crate) output: Option<Value>,
    pub(crate) error: Option<String>,
}

/// One journaled operation of a workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum Event {
    Step {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ok: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        err: Option<String>,
        attempts: u32,
    },
    Sleep {
        until_ms: u64,
    },
    Deadline {
        name: String,
        until_ms: u64,
    },
    Signal {
        name: String,
        // Not an `Option`: a delivered `null` (a unit signal) must stay distinct from a timeout
        // on replay, and serde reads `null` back as `None`.
        #[serde(default)]
        value: Value,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        timed_out: bool,
    },
    Now {
        ms: u64,
    },
    Random {
        value: u64,
    },
    Uuid {
        value: String,
    },
    Version {
        change_id: String,
        version: u32,
    },
    ChildStart {
        child_id: String,
        name: String,
    },
    ChildResult {
        child_id: String,
        status: WorkflowStatus,
        output: Option<Value>,
        error: Option<String>,
    },
    Cancelled,
}

impl Event {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Event::Step { .. } => "step",
            Event::Sleep { .. } => "sleep",
            Event::Deadline { .. } => "signal-deadline",
            Event::Signal { .. } => "signal",
            Event::Now { .. } => "now",
            Event::Random { .. } => "random",
            Event::Uuid { .. } => "uuid",
            Event::Version { .. } => "version",
            Event::ChildStart { .. } => "child-start",
            Event::ChildResult { .. } => "child-result",
            Event::Cancelled => "cancelled",
        }
    }

    pub(crate) fn subject(&self) -> String {
        match self {
            Event::Step { name, .. }
            | Event::Signal { name, .. }
            | Event::Deadline { name, .. } => name.clone(),
            Event::Version { change_id, .. } => change_id.clone(),
            // A child's start is compared by workflow name: the code cannot know the child's
            // ID before the start is journaled. Its result is compared by the child's ID.
            Event::ChildStart { name, .. } => name.clone(),
            Event::ChildResult { child_id, .. } => child_id.clone(),
            _ => String::new(),
        }
    }

    pub(crate) fn describe(&self) -> String {
        let s = self.subject();
        if s.is_empty() {
            self.kind().to_string()
        } else {
            format!("{} {:?}", self.kind(), s)
        }
    }
}

pub(crate) fn rec_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + id.len());
    k.extend_from_slice(b"w/");
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) fn ev_prefix(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + id.len() + 8);
    k.extend_from_slice(b"e/");
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k
}

pub(crate) fn ev_key(id: &str, index: u64) -> Vec<u8> {
    let mut k = ev_prefix(id);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

pub(crate) fn sig_prefix(id: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + id.len() + name.len() + 8);
    k.extend_from_slice(b"s/");
    k.extend_from_slice(id.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

pub(crate) fn to_json<T: Serialize + ?Sized>(what: &str, v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|source| Error::Serialize {
        what: what.to_string(),
        source,
    })
}

/// The JSON of a successful step's [`Event::Step`], serialised straight from the output.
///
/// It reads back as `Event::Step { ok: Some(..), err: None, .. }` (a `null` output reads back
/// as `ok: None`, which replay also decodes as `null`), without first building a
/// `serde_json::Value` of the output.
pub(crate) fn step_ok_json<T: Serialize + ?Sized>(
    name: &str,
    ok: &T,
    attempts: u32,
) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    #[serde(tag = "kind", rename = "step")]
    struct StepOk<'a, T: ?Sized> {
        name: &'a str,
        ok: &'a T,
        attempts: u32,
    }
    serde_json::to_vec(&StepOk { name, ok, attempts }).map_err(|source| Error::Serialize {
        what: format!("the output of step {name:?}"),
        source,
    })
}

/// A set of writes applied atomically by [`Journal::commit`].
#[derive(Default)]
pub(crate) struct Writes {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Writes {
    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push((key, Some(value)));
    }

    pub(crate) fn remove(&mut self, key: Vec<u8>) {
        self.ops.push((key, None));
    }

    fn apply_to(mut self, db: &sled::Db) -> sled::Result<()> {
        // A lone insert (the common case: one journaled step) goes through a plain `insert`,
        // because sled's `apply_batch` takes a process-wide exclusive lock that stalls every
        // other reader and writer, which is the bottleneck under concurrency.
        if let [(_, Some(_))] = self.ops.as_slice()
            && let Some((k, Some(v))) = self.ops.pop()
        {
            return db.insert(k, v).map(|_| ());
        }
        if self.ops.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (k, v) in self.ops {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        db.apply_batch(batch)
    }

    pub(crate) fn record(&mut self, id: &str, rec: &Record) -> Result<()> {
        let v = to_json("workflow record", rec)?;
        self.put(rec_key(id), v);
        Ok(())
    }

    pub(crate) fn event(&mut self, id: &str, index: u64, ev: &Event) -> Result<()> {
        let v = to_json("journal event", ev)?;
        self.put(ev_key(id, index), v);
        Ok(())
    }
}

/// Why the journal stopped taking writes: the first write or flush that failed.
///
/// Kept as kind and text rather than as the `io::Error` itself because every waiter of the
/// failed flush, and every later caller, gets its own copy.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    kind: std::io::ErrorKind,
    message: String,
}

impl Failure {
    fn io(e: &std::io::Error) -> Self {
        Self {
            kind: e.kind(),
            message: e.to_string(),
        }
    }

    fn sled(e: &sled::Error) -> Self {
        match e {
            sled::Error::Io(io) => Self::io(io),
            other => Self {
                kind: std::io::ErrorKind::Other,
                message: other.to_string(),
            },
        }
    }

    /// A fresh copy of the failure, as the source of an error.
    pub(crate) fn source(&self) -> StorageError {
        StorageError::from_io(std::io::Error::new(self.kind, self.message.clone()))
    }

    /// [`Error::JournalFailed`] for journal `dir`, `context` naming the operation.
    pub(crate) fn error(&self, dir: &Path, context: String) -> Error {
        Error::JournalFailed {
            path: dir.to_path_buf(),
            context,
            source: self.source(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What a flush tells its waiters.
type FlushResult = std::result::Result<(), Failure>;

/// A commit waiting for the committer thread: its ticket and where to send the outcome.
type Waiter = (u64, oneshot::Sender<FlushResult>);

/// Counters of the group committer, for tests and benches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct JournalStats {
    /// Commits requested (each waits for a flush).
    pub commits: u64,
    /// Flushes run; with concurrent workflows this is smaller than `commits`.
    pub flushes: u64,
    /// Flushes run by a committing task itself rather than by the committer thread (see
    /// [`Durability`]); these happen while a single workflow commits alone.
    pub inline_flushes: u64,
    /// Flushes that failed. A failure stops the journal it happened in (see
    /// [`Error::JournalFailed`]), so this is 0 or 1 per journal generation: at most 1 with
    /// [`ReopenPolicy::off`](crate::ReopenPolicy::off), at most `reopens + 1` otherwise.
    pub failed_flushes: u64,
    /// How many times the runtime closed its failed journal and opened the directory again
    /// by itself (see [`RuntimeBuilder::reopen`](crate::RuntimeBuilder::reopen)).
    pub reopens: u64,
}

impl JournalStats {
    /// The sum of two sets of counters (a closed journal generation's and the next one's).
    pub(crate) fn plus(self, o: Self) -> Self {
        Self {
            commits: self.commits + o.commits,
            flushes: self.flushes + o.flushes,
            inline_flushes: self.inline_flushes + o.inline_flushes,
            failed_flushes: self.failed_flushes + o.failed_flushes,
            reopens: self.reopens + o.reopens,
        }
    }
}

/// Group-commit state shared by every committing task and the committer thread.
///
/// Every commit takes a *ticket* after its writes are applied. A flush reads the newest
/// ticket before it starts, so when it completes every write with a ticket up to that value is
/// covered; `flushed` records the highest such ticket. Whoever flushes holds `flusher`, so
/// sled's flush never runs twice at once (concurrent `flush_async` calls deadlock in sled
/// 0.34, and two concurrent blocking flushes would only repeat each other's work).
struct Group {
    db: sled::Db,
    durability: Durability,
    flusher: Mutex<FileSyncer>,
    /// The newest ticket handed out.
    applied: AtomicU64,
    /// Every ticket up to this one is covered by a completed flush.
    flushed: AtomicU64,
    /// Whether the committer thread's last batch held more than one waiter.
    concurrent: AtomicBool,
    commits: AtomicU64,
    flushes: AtomicU64,
    inline_flushes: AtomicU64,
    failed_flushes: AtomicU64,
    /// Set by the first write or flush that fails; from then on nothing is written or
    /// reported durable (see [`Error::JournalFailed`] for why this journal never retries;
    /// the runtime may open the directory again as a new journal).
    failed: OnceLock<Failure>,
    /// Turns `true` when `failed` is set, to wake whoever waits for a workflow's result.
    failed_tx: watch::Sender<bool>,
    #[cfg(feature = "fault-injection")]
    faults: OnceLock<crate::fault::FaultInjector>,
}

impl Group {
    fn ticket(&self) -> u64 {
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.applied.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn covered(&self, ticket: u64) -> bool {
        self.flushed.load(Ordering::SeqCst) >= ticket
    }

    /// Records `f` as the journal's failure (the first one recorded wins) and returns that.
    fn fail(&self, f: Failure) -> Failure {
        let first = self.failed.get_or_init(|| f).clone();
        self.failed_tx.send_replace(true);
        first
    }

    /// Flushes (and, for power-loss safety, syncs the files); the caller holds `flusher`.
    ///
    /// A failure stops the journal: `flushed` never moves again, so no commit after the
    /// failure is covered.
    fn flush(&self, files: &mut FileSyncer) -> FlushResult {
        if let Some(f) = self.failed.get() {
            return Err(f.clone());
        }
        // Read before the flush starts: every ticket up to here belongs to applied writes.
        let upto = self.applied.load(Ordering::SeqCst);
        let mut result = self.db.flush().map(drop).map_err(|e| Failure::sled(&e));
        #[cfg(feature = "fault-injection")]
        if result.is_ok() && self.faults.get().is_some_and(|f| f.fire()) {
            // After sled's flush, in place of the file sync: the writes have reached the
            // kernel, as when an fdatasync reports EIO.
            result = Err(Failure {
                kind: std::io::ErrorKind::Other,
                message: "injected flush failure (keel-durable's fault-injection feature)".into(),
            });
        }
        if result.is_ok() && self.durability == Durability::PowerLoss {
            result = files.sync().map_err(|e| Failure::io(&e));
        }
        self.flushes.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                self.flushed.fetch_max(upto, Ordering::SeqCst);
                Ok(())
            }
            Err(f) => {
                self.failed_flushes.fetch_add(1, Ordering::Relaxed);
                Err(self.fail(f))
            }
        }
    }

    /// Flushes on the calling thread if no other commit is in the way; `None` otherwise.
    ///
    /// This is the path of a workflow that commits alone: handing its flush to the committer
    /// thread and being woken again costs two thread switches per step, a third of sled's own
    /// flush time. It is taken only when this commit is the only one not yet covered by a
    /// flush and the committer's last batch was a single commit, so concurrent workflows keep
    /// sharing the committer's flushes (and its wait for stragglers) instead of splitting
    /// into a flush of one plus a flush of the rest. The flush runs inside `block_in_place`,
    /// so the executor moves its other tasks to another thread meanwhile; on a current-thread
    /// runtime, which cannot do that, the committer thread flushes instead.
    fn try_inline(&self, ticket: u64) -> Option<FlushResult> {
        let alone = self.applied.load(Ordering::SeqCst) == ticket
            && self.flushed.load(Ordering::SeqCst) + 1 == ticket;
        if !alone || self.concurrent.load(Ordering::Relaxed) {
            return None;
        }
        let flavor = tokio::runtime::Handle::try_current().ok()?.runtime_flavor();
        if flavor != tokio::runtime::RuntimeFlavor::MultiThread {
            return None;
        }
        let mut files = match self.flusher.try_lock() {
            Ok(f) => f,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        if self.covered(ticket) {
            return Some(Ok(()));
        }
        self.inline_flushes.fetch_add(1, Ordering::Relaxed);
        Some(tokio::task::block_in_place(|| self.flush(&mut files)))
    }
}

/// One open generation of the journal: the sled database, its group committer and a share
/// of the directory lock.
///
/// Dropping it closes the database once the committer thread has drained, and releases the
/// directory lock unless someone else still holds a share of it: the runtime keeps one while
/// it reopens a failed journal, so no other runtime can take the directory in between.
pub(crate) struct Journal {
    // Field order matters: the database closes before the lock file is released, so a
    // runtime that takes the lock next never finds sled's own file lock still held.
    db: sled::Db,
    group: Arc<Group>,
    committer: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The journal directory, for errors.
    dir: PathBuf,
    /// Which generation this is: 0 for the journal `open` made, then one more per reopen.
    generation: u64,
    lock: Arc<File>,
}

/// Removes the snapshot files sled had not finished writing (`snap.<lsn>.generating`).
///
/// sled 0.34 writes a snapshot under that name, syncs it, renames it to `snap.<lsn>` and only
/// then deletes the older snapshots, so such a file is left only by a process that died while
/// writing it, and the previous complete snapshot is still there. But sled's own open takes the
/// newest `snap.*` file whatever its suffix, and fails on the partial one with a corruption
/// error until someone deletes it (found by the crash test: a kill during a snapshot write left
/// an empty `.generating` file, and every later open failed). The caller holds the directory
/// lock, so no other process is writing one.
fn remove_unfinished_snapshots(db_dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(db_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("listing journal {db_dir:?}"), e)),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("removing the unfinished snapshot {path:?}"),
                        e,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// How long an open waits for sled's lock on the journal files when this process's previous
/// runtime on the directory is still closing them (see `Journal::open_locked`).
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Journal {
    fn drop(&mut self) {
        // Closing the channel ends the committer after its current flush; joining it drops
        // its clone of the database before ours, so the files are closed when this returns.
        self.committer = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Journal {
    /// Takes the directory lock and opens generation 0 of the journal.
    pub(crate) fn open(dir: &Path, durability: Durability) -> Result<Self> {
        let lock = Self::lock(dir)?;
        Self::open_locked(dir, durability, Arc::new(lock), 0)
    }

    /// Creates the directory and takes its lock file's OS lock.
    fn lock(dir: &Path) -> Result<File> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating journal directory {dir:?}"), e))?;
        let lock_path = dir.join("keel.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("opening lock file {lock_path:?}"), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::AlreadyOpen {
                    path: dir.to_path_buf(),
                    lock: lock_path,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::io(format!("locking {lock_path:?}"), e));
            }
        }
        Ok(lock)
    }

    /// Opens the database of a directory whose lock `lock` is already held, as journal
    /// generation `generation`.
    ///
    /// sled 0.34 takes an exclusive `flock` of its own log file (`journal/db`) as well, so
    /// every handle of the previous generation must have been dropped first; if one is still
    /// open (sled's I/O threads can hold one for a moment after the last `Db` is gone), this
    /// fails with [`Error::Storage`] and can be tried again.
    pub(crate) fn open_locked(
        dir: &Path,
        durability: Durability,
        lock: Arc<File>,
        generation: u64,
    ) -> Result<Self> {
        let db_dir = dir.join("journal");
        remove_unfinished_snapshots(&db_dir)?;
        // We hold the directory's lock (`keel.lock`), so if sled's own lock on its files is
        // still taken, the holder is a runtime of this process that was dropped but whose
        // threads (a flush that was in flight, sled's flusher) have not closed the files yet.
        // Wait for them, briefly, instead of failing an open that would succeed a moment later.
        let deadline = std::time::Instant::now() + SLED_LOCK_WAIT;
        let db = loop {
            // sled 0.34 panics on some kinds of damaged files instead of returning an error;
            // a damaged journal must surface as `Error::Corrupt`, never bring the host down.
            let opened = std::panic::catch_unwind(|| sled::Config::new().path(&db_dir).open());
            match opened {
                Ok(Ok(db)) => break db,
                // sled reports its lock as an `Other` error wrapping the OS's `WouldBlock`.
                Ok(Err(sled::Error::Io(e))) if e.to_string().contains("could not acquire lock") => {
                    if std::time::Instant::now() >= deadline {
                        let e = sled::Error::Io(e);
                        return Err(Error::sled(format!("opening journal {db_dir:?}"), e));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Ok(Err(e)) => return Err(Error::sled(format!("opening journal {db_dir:?}"), e)),
                Err(_) => {
                    return Err(Error::Corrupt {
                        what: format!("sled panicked while opening {db_dir:?}"),
                    });
                }
            }
        };
        match db
            .get(FORMAT_KEY)
            .map_err(|e| Error::sled("reading the format version", e))?
        {
            None => {
                db.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                    .map_err(|e| Error::sled("writing the format version", e))?;
            }
            Some(v) => {
                let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| Error::Corrupt {
                    what: format!("format version key holds {} bytes, not 4", v.len()),
                })?;
                let found = u32::from_be_bytes(bytes);
                if found > FORMAT_VERSION {
                    return Err(Error::UnsupportedFormat {
                        path: dir.to_path_buf(),
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
            }
        }
        let mut files = FileSyncer::new(db_dir.clone());
        if durability == Durability::PowerLoss {
            // Recovery is about to act on what sled read back, and after a crash that can
            // include writes that reached the kernel but were never synced (their commits were
            // never reported done). A step replayed from such a write, followed by a power cut,
            // would run again with the next step's side effect already done on its old output;
            // so everything recovery sees is made durable before it looks.
            db.flush().map_err(|e| {
                Error::sled(format!("flushing journal {db_dir:?} after opening it"), e)
            })?;
            files
                .sync_everything(dir)
                .map_err(|e| Error::io(format!("syncing the files of journal {db_dir:?}"), e))?;
        }
        let (tx, rx) = mpsc::channel::<Waiter>();
        let group = Arc::new(Group {
            db: db.clone(),
            durability,
            flusher: Mutex::new(files),
            applied: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            concurrent: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            inline_flushes: AtomicU64::new(0),
            failed_flushes: AtomicU64::new(0),
            failed: OnceLock::new(),
            failed_tx: watch::channel(false).0,
            #[cfg(feature = "fault-injection")]
            faults: OnceLock::new(),
        });
        let thread_group = Arc::clone(&group);
        let thread = std::thread::Builder::new()
            .name("keel-durable-committer".into())
            .spawn(move || committer(&thread_group, &rx))
            .map_err(|e| Error::io("spawning the committer thread", e))?;
        Ok(Self {
            db,
            group,
            committer: Some(tx),
            thread: Some(thread),
            dir: dir.to_path_buf(),
            generation,
            lock,
        })
    }

    /// A share of the directory lock, to keep it held after this journal is dropped.
    pub(crate) fn lock_share(&self) -> Arc<File> {
        Arc::clone(&self.lock)
    }

    /// Which generation of the journal this is (0 for the one the runtime opened first).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The failure that stopped this journal, if one has.
    pub(crate) fn failure(&self) -> Option<Failure> {
        self.group.failed.get().cloned()
    }

    /// Whether a write or flush has failed.
    pub(crate) fn has_failed(&self) -> bool {
        self.group.failed.get().is_some()
    }

    /// Whether at least one flush of this journal succeeded (a journal whose first flush
    /// fails did not recover from the failure that made the runtime open it).
    pub(crate) fn has_flushed(&self) -> bool {
        let g = &self.group;
        g.flushes.load(Ordering::Relaxed) > g.failed_flushes.load(Ordering::Relaxed)
    }

    /// Attaches a fault injector to the write and flush paths (test support).
    #[cfg(feature = "fault-injection")]
    pub(crate) fn inject(&self, faults: crate::fault::FaultInjector) {
        let _ = self.group.faults.set(faults);
    }

    pub(crate) fn stats(&self) -> JournalStats {
        let g = &self.group;
        JournalStats {
            commits: g.commits.load(Ordering::Relaxed),
            flushes: g.flushes.load(Ordering::Relaxed),
            inline_flushes: g.inline_flushes.load(Ordering::Relaxed),
            failed_flushes: g.failed_flushes.load(Ordering::Relaxed),
            reopens: 0,
        }
    }

    fn failed_error(&self, f: &Failure, context: String) -> Error {
        f.error(&self.dir, context)
    }

    /// `Err(JournalFailed)` once a write or flush has failed; `context` names the operation.
    ///
    /// Reads are refused too: what sled holds in memory may include writes whose flush failed,
    /// and nothing may be reported (or replayed) from those.
    pub(crate) fn check(&self, context: impl FnOnce() -> String) -> Result<()> {
        match self.group.failed.get() {
            Some(f) => Err(self.failed_error(f, context())),
            None => Ok(()),
        }
    }

    /// A receiver that sees `true` once the journal has failed.
    pub(crate) fn failure_watch(&self) -> watch::Receiver<bool> {
        self.group.failed_tx.subscribe()
    }

    /// Stops the journal after a failed write; returns the error for the caller.
    fn write_failed(&self, e: &sled::Error, context: String) -> Error {
        let f = self.group.fail(Failure::sled(e));
        self.failed_error(&f, context)
    }

    /// Applies `writes` to sled in one atomic write (an `insert` or an `apply_batch`, so all
    /// of it or none). Every `Writes` reaches sled through here, which is where an armed
    /// `FaultInjector` refuses one (test support, the `fault-injection` feature).
    fn apply_writes(&self, writes: Writes) -> sled::Result<()> {
        #[cfg(feature = "fault-injection")]
        if !writes.ops.is_empty() {
            self.injected_write()?;
        }
        writes.apply_to(&self.db)
    }

    /// `Err` (an I/O error, as sled reports a failed log write) when the fault injector
    /// fails this write; nothing has been written then.
    #[cfg(feature = "fault-injection")]
    fn injected_write(&self) -> sled::Result<()> {
        if self.group.faults.get().is_some_and(|f| f.fire_write()) {
            return Err(sled::Error::Io(std::io::Error::other(
                "injected write failure (keel-durable's fault-injection feature)",
            )));
        }
        Ok(())
    }

    /// Applies `writes` atomically and returns once a flush that covers them has completed.
    ///
    /// Nothing is applied once the journal has failed; a write that fails stops the journal
    /// (sled 0.34 refuses further writes after an I/O error anyway). An `Err` means the
    /// writes are not known to be durable, though they may still be found on disk later.
    pub(crate) async fn commit(&self, writes: Writes) -> Result<()> {
        self.check(|| "writing to the journal".into())?;
        if let Err(e) = self.apply_writes(writes) {
            return Err(self.write_failed(&e, "writing to the journal".into()));
        }
        self.sync().await
    }

    /// Waits for a flush that covers every write applied so far.
    pub(crate) async fn sync(&self) -> Result<()> {
        let ticket = self.group.ticket();
        if self.group.covered(ticket) {
            return Ok(());
        }
        self.check(|| "flushing the journal".into())?;
        let outcome = match self.group.try_inline(ticket) {
            Some(r) => r,
            None => self.queue(ticket).await?,
        };
        outcome.map_err(|f| self.failed_error(&f, "flushing the journal".into()))
    }

    /// Hands `ticket` to the committer thread and waits for its answer.
    async fn queue(&self, ticket: u64) -> Result<FlushResult> {
        let (tx, rx) = oneshot::channel();
        let committer = self.committer.as_ref().ok_or(Error::ShutDown)?;
        committer.send((ticket, tx)).map_err(|_| Error::ShutDown)?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    /// Applies writes without waiting for a flush (for bookkeeping that a later commit covers).
    pub(crate) fn apply(&self, writes: Writes) -> Result<()> {
        self.check(|| "writing to the journal".into())?;
        self.apply_writes(writes)
            .map_err(|e| self.write_failed(&e, "writing to the journal".into()))
    }

    /// A new sequence number, unique in this journal (sled's `generate_id`, which persists
    /// its counter and can fail like a write; a failure stops the journal like one).
    pub(crate) fn next_seq(&self) -> Result<u64> {
        let what = || "generating a sequence number".to_string();
        self.check(what)?;
        #[cfg(feature = "fault-injection")]
        if self.group.faults.get().is_some_and(|f| f.fire_sequence()) {
            let e = sled::Error::Io(std::io::Error::other(
                "injected sequence-number failure (keel-durable's fault-injection feature)",
            ));
            return Err(self.write_failed(&e, what()));
        }
        self.db
            .generate_id()
            .map_err(|e| self.write_failed(&e, what()))
    }

    pub(crate) fn record(&self, id: &str) -> Result<Option<Record>> {
        self.check(|| format!("reading workflow {id:?}"))?;
        let Some(bytes) = self
            .db
            .get(rec_key(id))
            .map_err(|e| Error::sled(format!("reading workflow {id:?}"), e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                what: format!("record of workflow {id:?} does not parse: {e}"),
            })
    }

    /// Creates a record only if the ID is free; returns the existing record otherwise.
    pub(crate) fn create(&self, id: &str, rec: &Record) -> Result<Option<Record>> {
        let v = to_json("workflow record", rec)?;
        self.check(|| format!("creating workflow {id:?}"))?;
        #[cfg(feature = "fault-injection")]
        self.injected_write()
            .map_err(|e| self.write_failed(&e, format!("creating workflow {id:?}")))?;
        match self
            .db
            .compare_and_swap(rec_key(id), None::<&[u8]>, Some(v))
            .map_err(|e| self.write_failed(&e, format!("creating workflow {id:?}")))?
        {
            Ok(()) => Ok(None),
            Err(_) => match self.record(id)? {
                Some(r) => Ok(Some(r)),
                None => Err(Error::Corrupt {
                    what: format!("record of workflow {id:?} vanished during creation"),
                }),
            },
        }
    }

    /// Every record, parsed; a record that does not parse is returned as its error.
    ///
    /// Once the journal has failed, the only entry is that error, under an empty ID.
    pub(crate) fn records(&self) -> Vec<(String, Result<Record>)> {
        if let Err(e) = self.check(|| "listing workflows".into()) {
            return vec![(String::new(), Err(e))];
        }
        let mut out = Vec::new();
        for item in self.db.scan_prefix(b"w/") {
            match item {
                Ok((k, v)) => {
                    let id = String::from_utf8_lossy(k.get(2..).unwrap_or_default()).into_owned();
                    let parsed = serde_json::from_slice::<Record>(&v).map_err(|e| Error::Corrupt {
                        what: format!("record of workflow {id:?} does not parse: {e}"),
                    });
                    out.push((id, parsed));
                }
                Err(e) => out.push((String::new(), Err(Error::sled("scanning workflows", e)))),
            }
        }
        out
    }

    /// The workflow's journal as (index, event) pairs in index order. Indices may have gaps
    /// when a workflow ran operations concurrently and only some of them completed.
    pub(crate) fn events(&self, id: &str) -> Result<Vec<(u64, Event)>> {
        self.check(|| format!("reading the journal of workflow {id:?}"))?;
        let mut out = Vec::new();
        for item in self.db.scan_prefix(ev_prefix(id)) {
            let (k, v) = item.map_err(|e| Error::sled(format!("reading journal of {id:?}"), e))?;
            let idx = k
                .get(k.len().saturating_sub(8)..)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| Error::Corrupt {
                    what: format!("journal key of workflow {id:?} is truncated"),
                })?;
            let ev = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                what: format!("journal entry {idx} of workflow {id:?} does not parse: {e}"),
            })?;
            out.push((idx, ev));
        }
        Ok(out)
    }

    /// The oldest buffered signal of this name, as (key, value).
    pub(crate) fn first_signal(&self, id: &str, name: &str) -> Result<Option<(Vec<u8>, Value)>> {
        self.check(|| format!("reading signal {name:?} of workflow {id:?}"))?;
        let Some(item) = self.db.scan_prefix(sig_prefix(id, name)).next() else {
            return Ok(None);
        };
        let (k, v) = item.map_err(|e| Error::sled(format!("reading signals of {id:?}"), e))?;
        let value = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
            what: format!("buffered signal {name:?} of workflow {id:?} does not parse: {e}"),
        })?;
        Ok(Some((k.to_vec(), value)))
    }

    /// Every buffered (sent, not yet received) signal of the workflow, as
    /// (sequence number, name, value) in the order they were sent.
    pub(crate) fn signals(&self, id: &str) -> Result<Vec<(u64, String, Value)>> {
        self.check(|| format!("reading the signals of workflow {id:?}"))?;
        let mut prefix = b"s/".to_vec();
        prefix.extend_from_slice(id.as_bytes());
        prefix.push(0);
        let mut out = Vec::new();
        for item in self.db.scan_prefix(&prefix) {
            let (k, v) = item.map_err(|e| Error::sled(format!("reading signals of {id:?}"), e))?;
            // The key ends in `<name>\0<seq:be64>` after the prefix.
            let rest = k.get(prefix.len()..).unwrap_or_default();
            let parsed = rest.len().checked_sub(9).and_then(|cut| {
                let (name, tail) = rest.split_at(cut);
                let seq = <[u8; 8]>::try_from(tail.get(1..)?).ok()?;
                (tail.first() == Some(&0)).then(|| (u64::from_be_bytes(seq), name))
            });
            let Some((seq, name)) = parsed else {
                return Err(Error::Corrupt {
                    what: format!("buffered signal key of workflow {id:?} is malformed"),
                });
            };
            let name = String::from_utf8_lossy(name).into_owned();
            let value = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                what: format!("buffered signal {name:?} of workflow {id:?} does not parse: {e}"),
            })?;
            out.push((seq, name, value));
        }
        out.sort_by_key(|(seq, _, _)| *seq);
        Ok(out)
    }

    pub(crate) fn signal_key(&self, id: &str, name: &str) -> Result<Vec<u8>> {
        let mut k = sig_prefix(id, name);
        k.extend_from_slice(&self.next_seq()?.to_be_bytes());
        Ok(k)
    }
}

/// The longest the committer waits for a batch to refill; see [`committer`].
const MAX_LINGER: Duration = Duration::from_millis(2);

/// The group committer: one thread, one blocking flush at a time; every waiter that queued
/// up while the previous flush ran shares the next one. sled's `flush_async` is never used,
/// because concurrent calls to it deadlock in sled 0.34.
fn committer(group: &Group, rx: &mpsc::Receiver<Waiter>) {
    let mut last_batch = 0usize;
    let mut last_flush = Duration::ZERO;
    while let Ok(first) = rx.recv() {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        // Right after a flush wakes a large batch, its workflows are still computing their
        // next step; flushing at once would cover only the few that were fast. When the last
        // batch showed concurrency, wait a little (at most half a flush's time) for the batch
        // to refill, so an expensive fdatasync covers more completions. A lone workflow
        // (batches of one) never waits.
        if last_batch > 1 && waiters.len() < last_batch {
            let deadline = Instant::now() + (last_flush / 2).min(MAX_LINGER);
            while waiters.len() < last_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(w) => waiters.push(w),
                    Err(_) => break,
                }
            }
        }
        let newest = waiters.iter().map(|(t, _)| *t).max().unwrap_or(0);
        let result = if group.covered(newest) {
            // An inline flush that started after these commits already covered them.
            Ok(())
        } else {
            let mut files = group.flusher.lock().unwrap_or_else(|p| p.into_inner());
            let started = Instant::now();
            let r = if group.covered(newest) {
                Ok(())
            } else {
                group.flush(&mut files)
            };
            last_flush = started.elapsed();
            r
        };
        last_batch = waiters.len();
        group.concurrent.store(last_batch > 1, Ordering::Relaxed);
        for (_, w) in waiters {
            // A waiter whose future was dropped no longer cares about the outcome.
            let _ = w.send(result.clone());
        }
    }
}

/// How old a timestamp must be before a file or directory with that modification time can
/// no longer change without the time moving: more than the coarsest timestamp granularity of
/// common file systems (the kernel's tick on ext4 and xfs, 2 s on FAT), with room to spare.
const SETTLED: Duration = Duration::from_secs(3);

fn settled(modified: SystemTime, now: SystemTime) -> bool {
    now.duration_since(modified).is_ok_and(|age| age >= SETTLED)
}

/// Makes sled's files durable for power-loss mode.
///
/// sled 0.34 appends everything to one log file, `db`, which gets an `fdatasync` on every
/// flush. Its other files are written once and never changed in place: `conf` and the
/// snapshot (`snap.*`, written under a temporary name, synced and renamed) only while sled
/// opens, and, while it runs, blobs (`blobs/<lsn>`, for log messages too large for a segment),
/// which sled does not sync at all. So [`FileSyncer::sync_everything`] syncs every file and
/// directory once when the journal opens, and [`FileSyncer::sync`] syncs the log plus the
/// blobs that appeared since the previous flush.
///
/// Finding new blobs must not cost a directory listing per flush: a flush of one small step
/// is a few dozen microseconds of work, and listing two directories was a sizeable part of it.
/// Adding a file to a directory moves the directory's modification time, so one `stat` of
/// `blobs/` says whether there can be anything new. Timestamps are only as fine as the file
/// system's granularity, though: a blob created in the same tick as a listing, just after it,
/// would leave the time where it was. A listing is therefore trusted only if the directory
/// had not changed for [`SETTLED`] when it began; until then every flush lists again. (This
/// assumes the file system's clock is this machine's, as it is for local file systems.)
struct FileSyncer {
    dir: PathBuf,
    blobs: PathBuf,
    log: Option<File>,
    /// The modification time of `blobs/` seen just before the last trusted listing.
    listed: Option<SystemTime>,
    /// Names of the blobs synced so far (those present at the last listing).
    seen: HashSet<OsString>,
    /// Blobs synced while sled may still have been writing them (their modification time was
    /// recent); synced again at every flush until their time has settled.
    recent: Vec<PathBuf>,
}

impl FileSyncer {
    fn new(dir: PathBuf) -> Self {
        Self {
            blobs: dir.join("blobs"),
            dir,
            log: None,
            listed: None,
            seen: HashSet::new(),
            recent: Vec::new(),
        }
    }

    /// Syncs every file and directory of the journal, including `root`, which names sled's
    /// directory; run once on open, before recovery reads anything.
    fn sync_everything(&mut self, root: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                sync_file(&entry.path())?;
            }
        }
        self.listed = None;
        self.sync_new_blobs()?;
        File::open(&self.dir)?.sync_all()?;
        File::open(root)?.sync_all()
    }

    /// Makes everything sled's last flush wrote durable: new blobs first, so that no durable
    /// log entry points at a blob that is not, then the log.
    fn sync(&mut self) -> std::io::Result<()> {
        self.sync_new_blobs()?;
        if self.log.is_none() {
            self.log = Some(File::open(self.dir.join("db"))?);
        }
        match &self.log {
            Some(log) => log.sync_data(),
            None => Ok(()),
        }
    }

    fn sync_new_blobs(&mut self) -> std::io::Result<()> {
        let now = SystemTime::now();
        if !self.recent.is_empty() {
            let mut still = Vec::new();
            for path in std::mem::take(&mut self.recent) {
                if let Some(modified) = sync_file(&path)?
                    && !settled(modified, now)
                {
                    still.push(path);
                }
            }
            self.recent = still;
        }
        let stamp = match std::fs::metadata(&self.blobs) {
            Ok(m) => m.modified()?,
            // sled creates `blobs/` when it opens; without it there is nothing to sync.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if self.listed == Some(stamp) {
            return Ok(());
        }
        let mut names = HashSet::new();
        let mut added = false;
        for entry in std::fs::read_dir(&self.blobs)? {
            let entry = entry?;
            let name = entry.file_name();
            if !self.seen.contains(&name) {
                let path = entry.path();
                // sled removes blobs it no longer needs; one that vanished needs no sync.
                let Some(modified) = sync_file(&path)? else {
                    continue;
                };
                if !settled(modified, now) {
                    self.recent.push(path);
                }
                added = true;
            }
            names.insert(name);
        }
        if added {
            // A new file is only durable once its directory entry is.
            File::open(&self.blobs)?.sync_all()?;
        }
        self.seen = names;
        self.listed = settled(stamp, now).then_some(stamp);
        Ok(())
    }
}

/// `fsync`s a file and returns its modification time from before the sync, or `None` if the
/// file no longer exists.
fn sync_file(path: &Path) -> std::io::Result<Option<SystemTime>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let modified = f.metadata()?.modified()?;
    f.sync_all()?;
    Ok(Some(modified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_index() {
        assert!(ev_key("a", 1) < ev_key("a", 2));
        assert!(ev_key("a", 255) < ev_key("a", 256));
        assert!(ev_key("a", u64::MAX).starts_with(&ev_prefix("a")));
        assert!(!ev_key("ab", 0).starts_with(&ev_prefix("a")));
    }

    #[test]
    fn step_json_reads_back_as_the_step_event() {
        #[derive(Serialize)]
        struct Out {
            a: u32,
            b: Vec<&'static str>,
        }
        let check = |json: Vec<u8>, ok: Option<Value>| {
            let back: Event = serde_json::from_slice(&json).unwrap();
            let expected = Event::Step {
                name: "s\"1".into(),
                ok,
                err: None,
                attempts: 3,
            };
            assert_eq!(back, expected);
        };
        let out = Out { a: 1, b: vec!["x"] };
        check(
            step_ok_json("s\"1", &out, 3).unwrap(),
            Some(serde_json::json!({"a": 1, "b": ["x"]})),
        );
        check(step_ok_json("s\"1", &7u64, 3).unwrap(), Some(7.into()));
        check(step_ok_json("s\"1", &(), 3).unwrap(), None);
        check(step_ok_json("s\"1", &None::<u8>, 3).unwrap(), None);
    }

    fn set_modified(path: &Path, t: SystemTime) {
        File::open(path).unwrap().set_modified(t).unwrap();
    }

    fn modified(path: &Path) -> SystemTime {
        std::fs::metadata(path).unwrap().modified().unwrap()
    }

    #[test]
    fn new_blobs_are_found_without_listing_the_directory_every_flush() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        let seen = |f: &FileSyncer, name: &str| f.seen.contains(std::ffi::OsStr::new(name));
        let mut f = FileSyncer::new(dir.path().to_path_buf());
        let old = SystemTime::now() - Duration::from_secs(60);
        set_modified(&blobs, old);
        f.sync().unwrap();
        assert_eq!(
            f.listed,
            Some(old),
            "a settled directory's listing is trusted"
        );

        // A new blob moves the directory's time, so the next flush lists it.
        std::fs::write(blobs.join("1"), b"blob").unwrap();
        f.sync().unwrap();
        assert!(seen(&f, "1"));
        assert_eq!(
            f.recent,
            vec![blobs.join("1")],
            "a fresh blob is synced again later"
        );
        // That listing met a directory changed just now, so it is not trusted: a blob created
        // in the same timestamp tick, which leaves the time where it was, is found next time.
        assert_eq!(f.listed, None);
        let stamp = modified(&blobs);
        std::fs::write(blobs.join("2"), b"blob").unwrap();
        set_modified(&blobs, stamp);
        f.sync().unwrap();
        assert!(seen(&f, "2"));

        // Once everything has settled, an unchanged directory is not listed again...
        for p in [blobs.join("1"), blobs.join("2"), blobs.clone()] {
            set_modified(&p, old);
        }
        f.sync().unwrap();
        assert_eq!(f.listed, Some(old));
        assert!(f.recent.is_empty());
        std::fs::write(blobs.join("3"), b"blob").unwrap();
        set_modified(&blobs, old);
        f.sync().unwrap();
        assert!(!seen(&f, "3"), "the trusted listing was used");
        // ...and any change lists it again, forgetting blobs sled removed.
        std::fs::remove_file(blobs.join("1")).unwrap();
        f.sync().unwrap();
        assert!(seen(&f, "3") && seen(&f, "2") && !seen(&f, "1"));
    }

    #[test]
    fn event_json_round_trips() {
        let e = Event::Step {
            name: "x".into(),
            ok: Some(serde_json::json!({"a": 1})),
            err: None,
            attempts: 2,
        };
        let back: Event = serde_json::from_slice(&to_json("e", &e).unwrap()).unwrap();
        assert_eq!(back, e);
    }
}
