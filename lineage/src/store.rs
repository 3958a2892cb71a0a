//! The sled-backed store: an append-only log of commits on disk, replayed into an
//! in-memory [`LineageGraph`] on open.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use serde::Deserialize;

use crate::change::{Batch, Change, Commit, NodeSpec};
use crate::error::{Error, Result};
use crate::graph::{CommitSummary, LineageGraph, apply_batches};
use crate::schema::Schema;
use crate::time::Timestamp;
use crate::typed::AnyNodeId;

const LOG_TREE: &str = "log";
const META_TREE: &str = "meta";
/// The file in the store's directory that [`LineageStore`] holds an OS lock on.
const LOCK_FILE: &str = "keel-lineage.lock";
const SCHEMA_KEY: &[u8] = b"schema";
/// The file in the store's directory that holds the last checkpoint.
const CHECKPOINT_FILE: &str = "checkpoint.bin";

/// Automatic checkpoints: a commit writes one once the changes logged since the last
/// checkpoint reach this many and a quarter of the graph's nodes plus edges (so checkpoint
/// work stays proportional to the log, and a reopen replays at most about a fifth of the
/// store); `open` writes one after replaying at least this many changes.
pub const AUTO_CHECKPOINT_CHANGES: usize = 50_000;

#[derive(Deserialize)]
struct Stored {
    time: Timestamp,
    changes: Vec<Change>,
}

/// A durable lineage graph.
///
/// **Flush policy:** every commit is written to the log and flushed to disk (`fsync`) before
/// the call returns; once [`LineageStore::commit`] returns `Ok`, the commit survives a crash
/// and is replayed by the next [`LineageStore::open`]. Batch many changes into one commit for
/// throughput: the flush cost is per commit, not per change.
///
/// **Concurrency:** readers never wait for a writer. [`LineageStore::read`] hands out an
/// immutable [`Snapshot`] of the graph as of the last commit, and a reader keeps that view,
/// unchanged, for as long as it holds it. Writers are serialised; a commit is validated,
/// written and flushed, then applied to the writer's own copy of the graph, which is
/// published atomically, so a reader sees every change of a commit or none of them. The
/// copy shares storage with the previous snapshot in fixed-size chunks: a commit copies the
/// chunks it writes, not the graph.
#[derive(Debug)]
pub struct LineageStore {
    db: sled::Db,
    log: sled::Tree,
    current: ArcSwap<LineageGraph>,
    writer: Mutex<()>,
    /// Serialises [`LineageStore::checkpoint`] calls (they do not hold up commits).
    checkpointing: Mutex<()>,
    /// Changes logged since the last checkpoint (approximate; drives automatic checkpoints).
    uncovered: std::sync::atomic::AtomicUsize,
    dir: PathBuf,
    /// An OS lock on the store's `keel-lineage.lock`, held for the store's life so a second
    /// opener gets [`Error::Locked`]. Declared last so it is released after the database.
    _lock: std::fs::File,
}

/// An immutable view of a store's graph as of one commit, from [`LineageStore::read`].
///
/// It dereferences to [`LineageGraph`], so every query works on it, petgraph's algorithms
/// included (through [`LineageGraph::petgraph_view`]). Commits made after it was taken are
/// not visible through it; holding it never delays a writer (it only keeps the storage of
/// that version alive), so take a fresh one to see newer commits.
#[derive(Debug, Clone)]
pub struct Snapshot(Arc<LineageGraph>);

impl Deref for Snapshot {
    type Target = LineageGraph;

    fn deref(&self) -> &LineageGraph {
        &self.0
    }
}

impl AsRef<LineageGraph> for Snapshot {
    fn as_ref(&self) -> &LineageGraph {
        &self.0
    }
}

impl LineageStore {
    /// Opens (or creates) a store with the default schema.
    ///
    /// # Errors
    /// See [`Self::open_with_schema`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with_schema(path, Schema::default())
    }

    /// Opens (or creates) a store: loads the last checkpoint, if it can be trusted, and replays
    /// the log after it into memory. If that replay covered at least
    /// [`AUTO_CHECKPOINT_CHANGES`] changes, a fresh checkpoint is written before returning (a
    /// failure to write it is ignored: the store is whole and the next open replays again).
    /// Commits also checkpoint automatically, so the replay stays short.
    ///
    /// # Errors
    /// [`Error::Locked`] if another store holds the directory (or sled's lock stays busy for
    /// 2 s), [`Error::Storage`] if the database cannot be opened, [`Error::CorruptStore`] if a
    /// log entry cannot be decoded or replayed, [`Error::SchemaMismatch`] if the store was
    /// created with another schema.
    pub fn open_with_schema(path: impl AsRef<Path>, schema: Schema) -> Result<Self> {
        let path = path.as_ref();
        let lock = lock_dir(path)?;
        // Our own lock is held, so no other store has this directory; sled's lock can still be
        // held for a moment by the background threads of a store that was just dropped (in
        // this process or one that is exiting), so a busy sled lock is retried for up to 2 s.
        let mut attempts = 0;
        let db = loop {
            let opened =
                std::panic::catch_unwind(|| sled::open(path)).map_err(|_| Error::CorruptStore {
                    entry: path.display().to_string(),
                    reason: "the database files cannot be read".to_owned(),
                })?;
            match opened {
                Ok(db) => break db,
                // sled reports its lock only as an untyped IO error with this text.
                Err(e) if e.to_string().contains("could not acquire lock") => {
                    attempts += 1;
                    if attempts >= 100 {
                        return Err(Error::Locked {
                            path: path.to_path_buf(),
                        });
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(Error::storage("opening the database", e)),
            }
        };
        let meta = db
            .open_tree(META_TREE)
            .map_err(|e| Error::storage("opening the meta tree", e))?;
        let log = db
            .open_tree(LOG_TREE)
            .map_err(|e| Error::storage("opening the log tree", e))?;
        let schema_json =
            serde_json::to_vec(&schema).map_err(|e| Error::storage("encoding the schema", e))?;
        match meta
            .get(SCHEMA_KEY)
            .map_err(|e| Error::storage("reading the schema", e))?
        {
            Some(stored) => {
                let stored: Schema =
                    serde_json::from_slice(&stored).map_err(|e| Error::CorruptStore {
                        entry: "meta/schema".to_owned(),
                        reason: e.to_string(),
                    })?;
                if stored != schema {
                    return Err(Error::SchemaMismatch);
                }
            }
            None => {
                meta.insert(SCHEMA_KEY, schema_json)
                    .map_err(|e| Error::storage("writing the schema", e))?;
                db.flush()
                    .map_err(|e| Error::storage("flushing the schema", e))?;
            }
        }
        let (mut graph, start) = match load_checkpoint(path, &schema, &log) {
            Some(g) => {
                let n = g.commit_count();
                (g, n)
            }
            None => (LineageGraph::with_schema(schema).without_log(), 0),
        };
        // Decoding and applying overlap: a second thread reads and decodes entries while
        // this one applies the previous ones, in log order.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Stored>>(4);
        let mut replayed_changes = 0usize;
        let replayed = std::thread::scope(|scope| {
            let log = &log;
            scope.spawn(move || {
                for (expected, item) in (start..).zip(log.range(start.to_be_bytes()..)) {
                    let decoded = decode_entry(item, expected);
                    let failed = decoded.is_err();
                    if tx.send(decoded).is_err() || failed {
                        return;
                    }
                }
            });
            for stored in rx {
                let stored = stored?;
                // Every logged commit was validated before it was written, so replay
                // applies it directly; applying never panics, even on a log edited
                // behind our back.
                let time = graph.recorded_time(stored.time);
                replayed_changes += stored.changes.len();
                graph.apply_validated(time, stored.changes);
            }
            Ok::<(), Error>(())
        });
        replayed?;
        let store = Self {
            _lock: lock,
            db,
            log,
            current: ArcSwap::from_pointee(graph),
            writer: Mutex::new(()),
            checkpointing: Mutex::new(()),
            uncovered: std::sync::atomic::AtomicUsize::new(replayed_changes),
            dir: path.to_path_buf(),
        };
        if replayed_changes >= AUTO_CHECKPOINT_CHANGES {
            // An optimisation only: if it fails (a full disk, say), the store is still whole
            // and the next open replays the same log again.
            let _ = store.checkpoint();
        }
        Ok(store)
    }

    /// A snapshot of the graph as of the last commit. Never waits for a writer: a commit
    /// in progress publishes its result only once it is fully applied.
    pub fn read(&self) -> Snapshot {
        Snapshot(self.current.load_full())
    }

    /// Commits `changes` atomically and durably, stamped now.
    ///
    /// # Errors
    /// As [`Self::commit_at`].
    pub fn commit(&self, changes: Vec<Change>) -> Result<CommitSummary> {
        self.commit_at(Timestamp::now(), changes)
    }

    /// Commits `changes` atomically and durably, stamped `time` (made monotone). Once this
    /// returns `Ok` the commit is on disk and will be replayed after a crash.
    ///
    /// # Errors
    /// Validation errors as [`LineageGraph::commit_at`] (nothing is written), or
    /// [`Error::Storage`] if the write or flush fails (nothing is applied in memory).
    pub fn commit_at(&self, time: Timestamp, changes: Vec<Change>) -> Result<CommitSummary> {
        let (summary, graph) = {
            let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            self.commit_locked(self.current.load_full(), time, changes)?
        };
        self.checkpoint_if_due(&graph);
        Ok(summary)
    }

    /// Writes an automatic checkpoint when enough changes are uncovered (see
    /// [`AUTO_CHECKPOINT_CHANGES`]). Runs after the writer lock is released; readers never
    /// wait for it. A failure is ignored: the commit is durable in the log either way.
    fn checkpoint_if_due(&self, graph: &LineageGraph) {
        use std::sync::atomic::Ordering;
        let due = AUTO_CHECKPOINT_CHANGES.max((graph.node_count() + graph.edge_count()) / 4);
        let uncovered = self.uncovered.load(Ordering::Relaxed);
        if uncovered >= due
            && self
                .uncovered
                .compare_exchange(uncovered, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let _ = self.checkpoint();
        }
    }

    /// Creates a node unless a live node already has its key, and returns its handle either
    /// way (see [`LineageGraph::insert`]); the check and the commit are one atomic step, so
    /// two threads inserting the same key get the same node. When a node is created, it is
    /// durable once this returns.
    ///
    /// # Errors
    /// [`Error::KindMismatch`] if the live node with this key has another kind; otherwise as
    /// [`Self::commit_at`].
    pub fn insert(&self, spec: NodeSpec) -> Result<AnyNodeId> {
        let _w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let cur = self.current.load_full();
        if let Some(id) = cur.existing_for_insert(&spec)? {
            return Ok(id);
        }
        let key = spec.key.clone();
        let (_, g) = self.commit_locked(cur, Timestamp::now(), vec![Change::Insert(spec)])?;
        g.find(&key)
    }

    /// Validates, logs, flushes and applies one commit on top of `cur`, the published graph;
    /// the caller holds the writer lock, so nothing else replaces `current` meanwhile.
    fn commit_locked(
        &self,
        cur: Arc<LineageGraph>,
        time: Timestamp,
        changes: Vec<Change>,
    ) -> Result<(CommitSummary, Arc<LineageGraph>)> {
        let resolved = cur.validate(&changes)?;
        let count = changes.len();
        let (seq, time) = (cur.commit_count(), cur.recorded_time(time));
        let bytes = crate::codec::encode(time, &changes);
        self.log
            .insert(seq.to_be_bytes(), bytes)
            .map_err(|e| Error::storage("writing a commit", e))?;
        self.db
            .flush()
            .map_err(|e| Error::storage("flushing a commit", e))?;
        let mut next = LineageGraph::clone(&cur);
        drop(cur);
        // `next` is a clone of `cur`, which `resolved` was computed against.
        let summary = next.apply_resolved(time, changes, &resolved);
        let next = Arc::new(next);
        self.current.store(next.clone());
        self.uncovered
            .fetch_add(count, std::sync::atomic::Ordering::Relaxed);
        Ok((summary, next))
    }

    /// Writes a checkpoint of the graph as of the last commit, so the next
    /// [`Self::open`] loads it and replays only the commits made after it. Returns the number
    /// of commits it covers.
    ///
    /// The checkpoint is written from a snapshot: commits and readers go on meanwhile. It
    /// replaces the previous one atomically (written to a temporary file, synced, renamed),
    /// so a crash leaves the old or the new checkpoint, never a torn one. The log stays the
    /// source of truth: a checkpoint that is missing, damaged or does not match the log is
    /// ignored on open, which then replays the whole log.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written, [`Error::Storage`] if the log cannot be
    /// read.
    pub fn checkpoint(&self) -> Result<u64> {
        let _c = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        self.uncovered
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let snap = self.read();
        let n = snap.commit_count();
        let fingerprint = match n.checked_sub(1) {
            None => 0,
            Some(last) => {
                let v = self
                    .log
                    .get(last.to_be_bytes())
                    .map_err(|e| Error::storage("reading the log", e))?
                    .ok_or_else(|| Error::CorruptStore {
                        entry: last.to_string(),
                        reason: "committed entry missing from the log".to_owned(),
                    })?;
                crate::checkpoint::checksum(&v)
            }
        };
        let bytes = crate::checkpoint::encode(&snap, fingerprint);
        drop(snap);
        let path = self.dir.join(CHECKPOINT_FILE);
        let tmp = self.dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        let io = |p: &Path| {
            let p = p.to_path_buf();
            move |source| Error::Io { path: p, source }
        };
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(n)
    }

    /// Commits each batch atomically and durably, in order.
    ///
    /// # Errors
    /// The first failing batch's error; earlier batches stay committed.
    pub fn apply(&self, batches: Vec<Batch>) -> Result<CommitSummary> {
        apply_batches(batches, |time, changes| self.commit_at(time, changes))
    }

    /// Reads commits `from..to` (by sequence number) back from disk.
    ///
    /// # Errors
    /// [`Error::Storage`] or [`Error::CorruptStore`].
    pub fn log(&self, from: u64, to: u64) -> Result<Vec<Commit>> {
        let mut out = Vec::new();
        for item in self.log.range(from.to_be_bytes()..to.to_be_bytes()) {
            let (k, v) = item.map_err(|e| Error::storage("reading the log", e))?;
            let seq = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            let stored = decode_value(&v).map_err(|reason| Error::CorruptStore {
                entry: seq.to_string(),
                reason,
            })?;
            out.push(Commit {
                seq,
                time: stored.time,
                changes: stored.changes,
            });
        }
        Ok(out)
    }
}

fn decode_entry(item: sled::Result<(sled::IVec, sled::IVec)>, expected: u64) -> Result<Stored> {
    let (k, v) = item.map_err(|e| Error::storage("reading the log", e))?;
    let seq = <[u8; 8]>::try_from(k.as_ref())
        .map(u64::from_be_bytes)
        .map_err(|_| Error::CorruptStore {
            entry: format!("{k:?}"),
            reason: "log key is not a sequence number".to_owned(),
        })?;
    let corrupt = |reason: String| Error::CorruptStore {
        entry: seq.to_string(),
        reason,
    };
    if seq != expected {
        return Err(corrupt(format!("expected sequence number {expected}")));
    }
    decode_value(&v).map_err(corrupt)
}

/// Decodes a log value: the binary encoding, or JSON (`{...}`) as written by earlier
/// versions.
fn decode_value(v: &[u8]) -> std::result::Result<Stored, String> {
    if v.first() == Some(&b'{') {
        return serde_json::from_slice(v).map_err(|e| e.to_string());
    }
    crate::codec::decode(v).map(|(time, changes)| Stored { time, changes })
}

/// The graph from the store's checkpoint, if there is one that is intact, was taken with
/// `schema`, and matches the log (its last commit's entry is logged, byte for byte).
fn load_checkpoint(dir: &Path, schema: &Schema, log: &sled::Tree) -> Option<LineageGraph> {
    let bytes = std::fs::read(dir.join(CHECKPOINT_FILE)).ok()?;
    let (commits, fingerprint, body) = crate::checkpoint::header(&bytes).ok()?;
    let last = commits.checked_sub(1)?;
    let entry = log.get(last.to_be_bytes()).ok()??;
    if crate::checkpoint::checksum(&entry) != fingerprint {
        return None;
    }
    crate::checkpoint::decode(body, schema).ok()
}

/// Creates the store's directory and takes an exclusive OS lock on a file inside it.
fn lock_dir(path: &Path) -> Result<std::fs::File> {
    let io = |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    };
    std::fs::create_dir_all(path).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join(LOCK_FILE))
        .map_err(io)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked {
            path: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
    }
}
