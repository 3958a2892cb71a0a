//! Replica pool overhead: the cost of one pick (choose a replica, take and release an in-flight
//! place) by policy and fleet size, beside a plain atomic-counter round-robin as the floor, and
//! how picks scale across threads.
//!
//! `cargo bench -p keel-benches --bench serving_pool`
#![allow(missing_docs)] // criterion_main! generates an undocumented main.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel_serving::{
    BoxFuture, Load, Policy, Pool, PoolRequest, Replica, ReplicaError, ReplicaErrorKind, ReplicaId,
    TokenStream,
};

/// A replica with a fixed, slightly different load each, so the picker has real comparisons.
struct Static(Load);

impl Replica for Static {
    fn generate(&self, _: PoolRequest) -> BoxFuture<'static, Result<TokenStream, ReplicaError>> {
        Box::pin(async {
            Err(ReplicaError::new(
                ReplicaErrorKind::Unavailable,
                "bench replica",
            ))
        })
    }

    fn load(&self) -> Load {
        self.0
    }
}

fn pool(n: usize, policy: Policy) -> Pool {
    let mut b = Pool::builder()
        .policy(policy)
        .max_in_flight_per_replica(u32::MAX);
    for i in 0..n {
        let load = Load {
            in_flight: (i % 7) as u32,
            queued_prefill_tokens: (i % 5) as u64 * 50,
            outstanding_decode_tokens: (i % 3) as u64 * 50,
            peak_ewma_latency: Duration::from_millis(100 + (i % 11) as u64),
        };
        b = b.replica(ReplicaId::new(i as u64), Arc::new(Static(load)));
    }
    b.build().expect("valid pool")
}

/// The floor: what any pool must at least do per request (an atomic counter and an index).
struct RoundRobinFloor {
    next: AtomicUsize,
    replicas: Vec<Arc<Static>>,
}

impl RoundRobinFloor {
    fn new(n: usize) -> Self {
        Self {
            next: AtomicUsize::new(0),
            replicas: (0..n).map(|_| Arc::new(Static(Load::default()))).collect(),
        }
    }

    fn pick(&self) -> &Arc<Static> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.replicas.len();
        &self.replicas[i]
    }
}

fn picks(c: &mut Criterion) {
    let mut g = c.benchmark_group("serving_pool/pick");
    g.throughput(Throughput::Elements(1));
    for n in [2usize, 8, 64, 256] {
        let floor = RoundRobinFloor::new(n);
        g.bench_with_input(BenchmarkId::new("atomic-rr-floor", n), &n, |b, _| {
            b.iter(|| black_box(floor.pick()));
        });
        for policy in Policy::ALL {
            if policy == Policy::LeastLoaded && n > 64 {
                continue; // a full scan at 256 replicas says nothing new
            }
            let p = pool(n, policy);
            g.bench_with_input(BenchmarkId::new(policy.name(), n), &n, |b, _| {
                b.iter(|| drop(black_box(p.reserve().expect("a replica is free"))));
            });
        }
    }
    g.finish();
}

/// Runs `op` `iters` times on each of `threads` threads at once; returns the wall time.
fn parallel(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..iters {
                    op();
                }
            });
        }
    });
    start.elapsed()
}

fn scaling(c: &mut Criterion) {
    let mut g = c.benchmark_group("serving_pool/threads");
    let n = 64;
    let p = pool(n, Policy::PowerOfTwoChoices);
    let floor = RoundRobinFloor::new(n);
    for threads in [1usize, 2, 4] {
        // Elements are picks across all threads, so criterion's rate is the pool's throughput.
        g.throughput(Throughput::Elements(threads as u64));
        g.bench_with_input(BenchmarkId::new("p2c-64", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                parallel(t, iters, &|| {
                    drop(black_box(p.reserve().expect("a replica is free")));
                })
            });
        });
        g.bench_with_input(
            BenchmarkId::new("atomic-rr-floor-64", threads),
            &threads,
            |b, &t| {
                b.iter_custom(|iters| {
                    parallel(t, iters, &|| {
                        black_box(floor.pick());
                    })
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, picks, scaling);
criterion_main!(benches);
