//! keel-durable: the sled floors and Keel's durable steps/s, measured in the same run.
//!
//! - `floor/*`: what sled itself does per commit: insert + `flush()`; insert + `flush()` +
//!   `fdatasync` of the log file; a batch of 100 inserts + `flush()`.
//! - `one_workflow/*`: one workflow of 100 trivial steps, one flush per step, per durability
//!   mode (compare with the floor of the same mode). Each iteration is paired with 100 floor
//!   commits measured right before it on a database of their own; the median of the paired
//!   ratios is printed after the group, since on a shared machine the `floor/*` figures
//!   were measured minutes earlier under other load.
//! - `group_commit/*`: 8 and 64 concurrent workflows of 100 steps each, sharing flushes.
//! - `peer_shape_power_loss/*`: the DBOS peer's shape, workflows of 10 steps, 1 and 8 callers.
//! - `recovery/10k`: opening a journal with 10,000 unfinished workflows until every one of
//!   them has replayed to its waiting point.
//!
//! Throughput is reported in elements per second: commits for the floors, steps for Keel.
//! Run: `cargo bench -p keel-benches --bench durable_journal`.
#![allow(missing_docs)] // criterion_main! generates an undocumented main.
#![allow(clippy::unwrap_used)] // a bench: failing loudly on setup errors is what we want

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel_durable::{Context, Durability, Error, Runtime, StepError, WorkflowId};

const STEPS: u64 = 100;
const PEER_STEPS: u64 = 10;

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn floors(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_journal/floor");
    g.sample_size(20).measurement_time(Duration::from_secs(4));
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let log = std::fs::File::open(dir.path().join("db").join("db")).unwrap();
    let value = [7u8; 64];
    let mut n = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("sled_insert_flush", |b| {
        b.iter(|| {
            n += 1;
            db.insert(n.to_be_bytes(), &value[..]).unwrap();
            db.flush().unwrap();
        })
    });
    g.bench_function("sled_insert_flush_fdatasync", |b| {
        b.iter(|| {
            n += 1;
            db.insert(n.to_be_bytes(), &value[..]).unwrap();
            db.flush().unwrap();
            log.sync_data().unwrap();
        })
    });
    g.throughput(Throughput::Elements(100));
    g.bench_function("sled_batch100_flush", |b| {
        b.iter(|| {
            let mut batch = sled::Batch::default();
            for _ in 0..100 {
                n += 1;
                batch.insert(&n.to_be_bytes(), &value[..]);
            }
            db.apply_batch(batch).unwrap();
            db.flush().unwrap();
        })
    });
    g.finish();
}

/// sled's floor for one durability mode on a database of its own: insert + `flush()`, plus
/// `fdatasync` of the log file in power-loss mode.
struct Floor {
    _dir: tempfile::TempDir,
    db: sled::Db,
    log: std::fs::File,
    durability: Durability,
    n: u64,
}

impl Floor {
    fn new(durability: Durability) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let log = std::fs::File::open(dir.path().join("db").join("db")).unwrap();
        Self {
            _dir: dir,
            db,
            log,
            durability,
            n: 0,
        }
    }

    /// Runs `k` commits and returns their time.
    fn commits(&mut self, k: u64) -> Duration {
        let value = [7u8; 64];
        let start = Instant::now();
        for _ in 0..k {
            self.n += 1;
            self.db.insert(self.n.to_be_bytes(), &value[..]).unwrap();
            self.db.flush().unwrap();
            if self.durability == Durability::PowerLoss {
                self.log.sync_data().unwrap();
            }
        }
        start.elapsed()
    }
}

async fn steps_wf(ctx: Context, n: u64) -> Result<u64, Error> {
    let mut acc = 0u64;
    for i in 0..n {
        acc = ctx
            .step(
                &format!("s{i}"),
                || async move { Ok::<_, StepError>(acc + 1) },
            )
            .await?;
    }
    Ok(acc)
}

async fn open(path: &Path, durability: Durability) -> Runtime {
    let rt = Runtime::builder(path)
        .durability(durability)
        .concurrency(64)
        .register("steps", steps_wf)
        .open()
        .await
        .unwrap();
    tokio::spawn(rt.worker().unwrap().run());
    rt
}

/// Runs `concurrent` callers, each starting a workflow of `steps` steps and awaiting its
/// result, `iters` times over, and returns the time.
async fn run_batch(
    rt: &Runtime,
    next: &Arc<AtomicU64>,
    concurrent: u64,
    steps: u64,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let mut callers = Vec::with_capacity(concurrent as usize);
        for _ in 0..concurrent {
            let rt = rt.clone();
            let next = Arc::clone(next);
            callers.push(tokio::spawn(async move {
                let n = next.fetch_add(1, Ordering::Relaxed);
                let id = WorkflowId::new(format!("w{n}")).unwrap();
                let h = rt.start("steps", &id, &steps).await.unwrap();
                assert_eq!(h.result::<u64>().await.unwrap(), steps);
            }));
        }
        for c in callers {
            c.await.unwrap();
        }
    }
    start.elapsed()
}

fn keel(c: &mut Criterion) {
    let tokio = tokio_rt();
    let next = Arc::new(AtomicU64::new(0));
    for (mode, durability) in [
        ("process_crash", Durability::ProcessCrash),
        ("power_loss", Durability::PowerLoss),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio.block_on(open(dir.path(), durability));
        let mut g = c.benchmark_group("durable_journal/one_workflow");
        g.sample_size(10).measurement_time(Duration::from_secs(5));
        g.throughput(Throughput::Elements(STEPS));
        // On a shared machine the floor measured minutes earlier says little about the
        // conditions a Keel sample met, so each iteration is paired with the floor measured
        // right before it; criterion times only the workflow, and the paired ratios are
        // printed after the group.
        let mut floor = Floor::new(durability);
        let mut ratios = Vec::new();
        g.bench_function(mode, |b| {
            b.iter_custom(|iters| {
                let mut keel = Duration::ZERO;
                for _ in 0..iters {
                    let f = floor.commits(STEPS);
                    let k = tokio.block_on(run_batch(&rt, &next, 1, STEPS, 1));
                    ratios.push(f.as_secs_f64() / k.as_secs_f64());
                    keel += k;
                }
                keel
            })
        });
        g.finish();
        ratios.sort_by(f64::total_cmp);
        let at = |q: usize| {
            ratios
                .get(ratios.len() * q / 4)
                .copied()
                .unwrap_or(f64::NAN)
        };
        // A filter that skips the group leaves no pairs to report.
        if !ratios.is_empty() {
            eprintln!(
                "durable_journal/one_workflow/{mode}: Keel steps/s over the paired sled floor's \
                 commits/s: median {:.2}x (quartiles {:.2}x to {:.2}x) over {} iterations",
                at(2),
                at(1),
                at(3),
                ratios.len()
            );
        }
        let mut g = c.benchmark_group(format!("durable_journal/group_commit_{mode}"));
        g.sample_size(10).measurement_time(Duration::from_secs(6));
        for concurrent in [8u64, 64] {
            g.throughput(Throughput::Elements(STEPS * concurrent));
            g.bench_with_input(
                BenchmarkId::from_parameter(concurrent),
                &concurrent,
                |b, &n| {
                    b.iter_custom(|iters| tokio.block_on(run_batch(&rt, &next, n, STEPS, iters)))
                },
            );
        }
        g.finish();
        if durability == Durability::PowerLoss {
            // The DBOS peer's shape: workflows of 10 trivial steps, one caller at a time and
            // 8 concurrent callers (PostgreSQL's default commit is power-loss safe).
            let mut g = c.benchmark_group("durable_journal/peer_shape_power_loss");
            g.sample_size(10).measurement_time(Duration::from_secs(5));
            for concurrent in [1u64, 8] {
                g.throughput(Throughput::Elements(PEER_STEPS * concurrent));
                g.bench_with_input(
                    BenchmarkId::from_parameter(concurrent),
                    &concurrent,
                    |b, &n| {
                        b.iter_custom(|iters| {
                            tokio.block_on(run_batch(&rt, &next, n, PEER_STEPS, iters))
                        })
                    },
                );
            }
            g.finish();
        }
        let s = rt.stats();
        eprintln!(
            "durable_journal {mode}: {} commits in {} flushes ({:.1} commits per flush), \
             {} of them run inline by a lone committing workflow",
            s.commits,
            s.flushes,
            s.commits as f64 / s.flushes.max(1) as f64,
            s.inline_flushes
        );
        tokio.block_on(rt.shutdown()).unwrap();
    }
}

const RECOVER: usize = 10_000;

/// A workflow that journals one step and then waits for a signal that never comes; the
/// counter records each time an execution reaches the wait.
fn waiter(
    reached: Arc<AtomicUsize>,
) -> impl Fn(
    Context,
    u64,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, Error>> + Send>>
+ Send
+ Sync
+ 'static {
    move |ctx: Context, x: u64| {
        let reached = Arc::clone(&reached);
        Box::pin(async move {
            let v = ctx
                .step("s", || async move { Ok::<_, StepError>(x) })
                .await?;
            reached.fetch_add(1, Ordering::SeqCst);
            ctx.recv::<u64>("never").await?;
            Ok(v)
        })
    }
}

async fn open_waiters(path: &Path, reached: &Arc<AtomicUsize>) -> Runtime {
    let rt = Runtime::builder(path)
        .concurrency(64)
        .register("wait", waiter(Arc::clone(reached)))
        .open()
        .await
        .unwrap();
    tokio::spawn(rt.worker().unwrap().run());
    rt
}

async fn until(reached: &AtomicUsize, n: usize) {
    while reached.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn recovery(c: &mut Criterion) {
    let tokio = tokio_rt();
    let dir = tempfile::tempdir().unwrap();
    let reached = Arc::new(AtomicUsize::new(0));
    tokio.block_on(async {
        let rt = open_waiters(dir.path(), &reached).await;
        for i in 0..RECOVER as u64 {
            let id = WorkflowId::new(format!("w{i}")).unwrap();
            rt.start("wait", &id, &i).await.unwrap();
        }
        until(&reached, RECOVER).await;
        rt.shutdown().await.unwrap();
    });
    let mut g = c.benchmark_group("durable_journal/recovery");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(RECOVER as u64));
    g.bench_function("10k_unfinished", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                reached.store(0, Ordering::SeqCst);
                total += tokio.block_on(async {
                    let start = Instant::now();
                    let rt = open_waiters(dir.path(), &reached).await;
                    until(&reached, RECOVER).await;
                    let t = start.elapsed();
                    rt.shutdown().await.unwrap();
                    t
                });
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, floors, keel, recovery);
criterion_main!(benches);
