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
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

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

/// A set of writes applied atomically by [`Journal::commit`].
#[derive(Default)]
pub(crate) struct Writes {
    batch: sled::Batch,
    len: usize,
    /// The only write, while there is exactly one insert: applied with a plain `insert`,
    /// because sled's `apply_batch` takes a process-wide exclusive lock that stalls every
    /// other reader and writer, which is the common case's bottleneck under concurrency.
    single: Option<(Vec<u8>, Vec<u8>)>,
}

impl Writes {
    pub(crate) fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        if self.len == 0 {
            self.single = Some((key.clone(), value.clone()));
        } else {
            self.single = None;
        }
        self.batch.insert(key, value);
        self.len += 1;
    }

    pub(crate) fn remove(&mut self, key: Vec<u8>) {
        self.single = None;
        self.batch.remove(key);
        self.len += 1;
    }

    fn apply_to(self, db: &sled::Db) -> Result<()> {
        match (self.len, self.single) {
            (0, _) => Ok(()),
            (1, Some((k, v))) => db
                .insert(k, v)
                .map(|_| ())
                .map_err(|e| Error::sled("writing to the journal", e)),
            _ => db
                .apply_batch(self.batch)
                .map_err(|e| Error::sled("applying a journal batch", e)),
        }
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

type Waiter = oneshot::Sender<std::result::Result<(), String>>;

/// Counters of the group committer, for tests and benches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JournalStats {
    /// Commits requested (each waits for a flush).
    pub commits: u64,
    /// Flushes run; with concurrent workflows this is smaller than `commits`.
    pub flushes: u64,
}

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    flushes: AtomicU64,
}

/// The open journal. Dropping it (and the runtime that owns it) closes the database and
/// releases the directory lock once the committer thread has drained.
pub(crate) struct Journal {
    // Field order matters: the database closes before the lock file is released, so a
    // runtime that takes the lock next never finds sled's own file lock still held.
    db: sled::Db,
    committer: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    counters: Arc<Counters>,
    _lock: File,
}

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
    pub(crate) fn open(dir: &Path, durability: Durability) -> Result<Self> {
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
        let db_dir = dir.join("journal");
        // sled 0.34 panics on some kinds of damaged files instead of returning an error;
        // a damaged journal must surface as `Error::Corrupt`, never bring the host down.
        let opened = std::panic::catch_unwind(|| sled::Config::new().path(&db_dir).open());
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(Error::sled(format!("opening journal {db_dir:?}"), e)),
            Err(_) => {
                return Err(Error::Corrupt {
                    what: format!("sled panicked while opening {db_dir:?}"),
                });
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
        let (tx, rx) = mpsc::channel::<Waiter>();
        let counters = Arc::new(Counters::default());
        let thread_db = db.clone();
        let thread_counters = Arc::clone(&counters);
        let thread = std::thread::Builder::new()
            .name("keel-durable-committer".into())
            .spawn(move || committer(thread_db, db_dir, durability, rx, thread_counters))
            .map_err(|e| Error::io("spawning the committer thread", e))?;
        Ok(Self {
            db,
            committer: Some(tx),
            thread: Some(thread),
            counters,
            _lock: lock,
        })
    }

    pub(crate) fn stats(&self) -> JournalStats {
        JournalStats {
            commits: self.counters.commits.load(Ordering::Relaxed),
            flushes: self.counters.flushes.load(Ordering::Relaxed),
        }
    }

    /// Applies `writes` atomically and returns once a flush that covers them has completed.
    ///
    /// The batch is applied before the waiter is queued, so the committer's next flush,
    /// which starts after it dequeues the waiter, includes it.
    pub(crate) async fn commit(&self, writes: Writes) -> Result<()> {
        writes.apply_to(&self.db)?;
        self.sync().await
    }

    /// Waits for a flush that covers every write applied so far.
    pub(crate) async fn sync(&self) -> Result<()> {
        self.counters.commits.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.committer
            .as_ref()
            .ok_or(Error::ShutDown)?
            .send(tx)
            .map_err(|_| Error::ShutDown)?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(Error::Storage {
                context: "flushing the journal".into(),
                source: StorageError::msg(message),
            }),
            Err(_) => Err(Error::ShutDown),
        }
    }

    /// Applies writes without waiting for a flush (for bookkeeping that a later commit covers).
    pub(crate) fn apply(&self, writes: Writes) -> Result<()> {
        writes.apply_to(&self.db)
    }

    pub(crate) fn next_seq(&self) -> Result<u64> {
        self.db
            .generate_id()
            .map_err(|e| Error::sled("generating a sequence number", e))
    }

    pub(crate) fn record(&self, id: &str) -> Result<Option<Record>> {
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
        match self
            .db
            .compare_and_swap(rec_key(id), None::<&[u8]>, Some(v))
            .map_err(|e| Error::sled(format!("creating workflow {id:?}"), e))?
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
    pub(crate) fn records(&self) -> Vec<(String, Result<Record>)> {
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
        let Some(item) = self.db.scan_prefix(sig_prefix(id, name)).next() else {
            return Ok(None);
        };
        let (k, v) = item.map_err(|e| Error::sled(format!("reading signals of {id:?}"), e))?;
        let value = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
            what: format!("buffered signal {name:?} of workflow {id:?} does not parse: {e}"),
        })?;
        Ok(Some((k.to_vec(), value)))
    }

    pub(crate) fn signal_key(&self, id: &str, name: &str) -> Result<Vec<u8>> {
        let mut k = sig_prefix(id, name);
        k.extend_from_slice(&self.next_seq()?.to_be_bytes());
        Ok(k)
    }
}

/// The group committer: one thread, one blocking flush at a time, every waiter that queued
/// up while the previous flush ran shares the next one. sled's `flush_async` is never used,
/// because concurrent calls to it deadlock in sled 0.34.
/// The longest the committer waits for a batch to refill; see [`committer`].
const MAX_LINGER: Duration = Duration::from_millis(2);

fn committer(
    db: sled::Db,
    dir: PathBuf,
    durability: Durability,
    rx: mpsc::Receiver<Waiter>,
    counters: Arc<Counters>,
) {
    let mut files = FileSyncer::new(dir);
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
        let started = Instant::now();
        let mut result = db.flush().map(|_| ()).map_err(|e| e.to_string());
        if result.is_ok() && durability == Durability::PowerLoss {
            result = files.sync().map_err(|e| e.to_string());
        }
        last_flush = started.elapsed();
        last_batch = waiters.len();
        counters.flushes.fetch_add(1, Ordering::Relaxed);
        for w in waiters {
            // A waiter whose future was dropped no longer cares about the outcome.
            let _ = w.send(result.clone());
        }
    }
}

/// Makes sled's directory durable after a flush.
///
/// sled appends everything to one log file, `db`, which gets an `fdatasync` on every flush.
/// Its other files (`conf`, snapshots, blobs) are written once and never modified in place
/// (a snapshot is written under a temporary name and renamed), so each is synced once with
/// `fsync` when it first appears, together with the directory that holds its name.
struct FileSyncer {
    dir: PathBuf,
    log: Option<File>,
    seen: HashSet<PathBuf>,
}

impl FileSyncer {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            log: None,
            seen: HashSet::new(),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        let log_path = self.dir.join("db");
        if self.log.is_none() {
            self.log = Some(File::open(&log_path)?);
        }
        let mut dirs = vec![self.dir.clone()];
        let mut new_dirs = Vec::new();
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d)? {
                let entry = entry?;
                let path = entry.path();
                if path == log_path || self.seen.contains(&path) {
                    continue;
                }
                let ty = entry.file_type()?;
                if ty.is_dir() {
                    dirs.push(path);
                    continue;
                }
                match File::open(&path) {
                    Ok(f) => f.sync_all()?,
                    // sled removes old snapshots and renames new ones concurrently; a file that
                    // vanished needs no sync, and its new name is picked up next time.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                if !new_dirs.contains(&d) {
                    new_dirs.push(d.clone());
                }
                self.seen.insert(path);
            }
        }
        if let Some(log) = &self.log {
            log.sync_data()?;
        }
        for d in new_dirs {
            // A new file is only durable once its directory entry is.
            File::open(&d)?.sync_all()?;
        }
        if self.seen.len() > 4096 {
            // Old snapshot names accumulate; forgetting them only costs one extra sync.
            self.seen.clear();
        }
        Ok(())
    }
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
