//! Serves the real model from two or more in-process engine replicas behind a power-of-two-
//! choices pool, drives them with concurrent requests, kills one replica mid-run, and reports
//! throughput, latency percentiles and failures.
//!
//! ```text
//! scripts/fetch-model   # once: downloads SmolLM2-135M-Instruct into models/
//! cargo run --release -p keel-examples --example pool_serve -- [--model PATH] [--replicas 2]
//!     [--requests 32] [--concurrency 8] [--max-tokens 16] [--kill-after 8] [--seed 1]
//! ```
//!
//! The model is found by `--model`, then `KEEL_MODEL`, then `models/`.
//! Killing a replica makes its new requests fail at once (the pool retries them on another
//! replica) and cuts its in-flight streams; requests that had already streamed tokens cannot be
//! retried without duplicating output, so they are reported as lost.
#![allow(clippy::print_stdout)] // A CLI program reports on stdout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_serving::{
    BoxFuture, Engine, EngineReplica, Error, Load, Pool, PoolRequest, Replica, ReplicaError,
    ReplicaErrorKind, ReplicaEvent, ReplicaId, TokenStream, resolve_model_path,
};
use tokio::sync::{Semaphore, watch};

/// A replica that can be killed: afterwards it refuses new requests and cuts in-flight streams.
struct Killable {
    inner: EngineReplica,
    dead: watch::Sender<bool>,
}

impl Replica for Killable {
    fn generate(
        &self,
        request: PoolRequest,
    ) -> BoxFuture<'static, Result<TokenStream, ReplicaError>> {
        if *self.dead.borrow() {
            return Box::pin(async {
                Err(ReplicaError::new(
                    ReplicaErrorKind::Unavailable,
                    "replica was killed",
                ))
            });
        }
        let started = self.inner.generate(request);
        let dead = self.dead.subscribe();
        Box::pin(async move {
            let mut inner = started.await?;
            let (tx, out) = TokenStream::channel(16);
            tokio::spawn(async move {
                let killed = killed(dead);
                tokio::pin!(killed);
                loop {
                    tokio::select! {
                        () = &mut killed => {
                            // Dropping `inner` cancels the request inside the engine.
                            let _ = tx.send(Err(ReplicaError::new(ReplicaErrorKind::Failed, "replica was killed"))).await;
                            return;
                        }
                        ev = inner.next() => match ev {
                            None => return,
                            Some(ev) => {
                                let last = !matches!(ev, Ok(ReplicaEvent::Token { .. }));
                                if !tx.send(ev).await || last {
                                    return;
                                }
                            }
                        },
                    }
                }
            });
            Ok(out)
        })
    }

    fn load(&self) -> Load {
        self.inner.load()
    }
}

/// Resolves once the switch is flipped (never, if its sender is gone first).
async fn killed(mut switch: watch::Receiver<bool>) {
    while !*switch.borrow_and_update() {
        if switch.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

struct Args {
    model: Option<String>,
    replicas: usize,
    requests: usize,
    concurrency: usize,
    max_tokens: u32,
    kill_after: usize,
    seed: u64,
}

fn parse() -> anyhow::Result<Args> {
    let mut a = Args {
        model: None,
        replicas: 2,
        requests: 32,
        concurrency: 8,
        max_tokens: 16,
        kill_after: 8,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(value()?),
            "--replicas" => a.replicas = value()?.parse()?,
            "--requests" => a.requests = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?.parse()?,
            "--max-tokens" => a.max_tokens = value()?.parse()?,
            "--kill-after" => a.kill_after = value()?.parse()?,
            "--seed" => a.seed = value()?.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if a.replicas < 2 || a.concurrency == 0 || a.requests == 0 {
        bail!("need at least 2 replicas, 1 request and a concurrency of at least 1");
    }
    Ok(a)
}

const PROMPTS: [&str; 8] = [
    "Name three primary colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash map is in one sentence.",
    "List four planets of the solar system.",
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "What does a compiler do?",
];

#[derive(Debug)]
enum Outcome {
    Ok {
        latency: Duration,
        tokens: u32,
    },
    /// Failed before any token reached the caller (the pool had already retried once).
    FailedBeforeFirstToken(Error),
    /// Failed after tokens were streamed: not retryable without duplicating output.
    FailedMidStream(Error),
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let path = resolve_model_path(args.model.as_deref().map(std::path::Path::new))
        .context("pool_serve needs the model weights")?;
    println!(
        "pool_serve: {} replicas of {}",
        args.replicas,
        path.display()
    );

    let mut kill_switches = Vec::new();
    let mut builder = Pool::builder()
        .seed(args.seed)
        // CPU inference on a small shared machine: a queued request can wait a long time for
        // its first token, which is not a replica failure.
        .first_token_timeout(Duration::from_secs(300))
        .default_deadline(Duration::from_secs(600));
    for i in 0..args.replicas {
        let engine = Engine::builder()
            .model_path(&path)
            .build()
            .with_context(|| format!("loading replica {i}"))?;
        let (dead, _) = watch::channel(false);
        kill_switches.push(dead.clone());
        let replica = Killable {
            inner: EngineReplica::new(Arc::new(engine)),
            dead,
        };
        builder = builder.replica(ReplicaId::new(i as u64), Arc::new(replica));
    }
    let pool = builder.build()?;

    let done = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.requests {
        let (pool, gate, done) = (pool.clone(), gate.clone(), done.clone());
        let request = PoolRequest::new(PROMPTS[i % PROMPTS.len()], args.max_tokens);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await;
            let t0 = Instant::now();
            let outcome = match pool.generate(request).await {
                Err(e) => Outcome::FailedBeforeFirstToken(e),
                Ok(stream) => match stream.collect().await {
                    Ok(out) => Outcome::Ok {
                        latency: t0.elapsed(),
                        tokens: out.output_tokens,
                    },
                    Err(e) => Outcome::FailedMidStream(e),
                },
            };
            done.fetch_add(1, Ordering::Relaxed);
            outcome
        }));
    }

    // Kill replica 0 once `kill_after` requests have completed.
    let killer = {
        let (done, switch, n) = (done.clone(), kill_switches[0].clone(), args.kill_after);
        tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = switch.send(true);
            Instant::now()
        })
    };

    let mut latencies = Vec::new();
    let (mut tokens, mut before, mut mid) = (0u64, 0, 0);
    for t in tasks {
        match t.await? {
            Outcome::Ok { latency, tokens: n } => {
                latencies.push(latency);
                tokens += u64::from(n);
            }
            Outcome::FailedBeforeFirstToken(e) => {
                before += 1;
                println!("  failed before its first token: {}", chain(&e));
            }
            Outcome::FailedMidStream(e) => {
                mid += 1;
                println!("  failed mid-stream: {}", chain(&e));
            }
        }
    }
    let wall = started.elapsed();
    let killed_at = killer.await?.saturating_duration_since(started);
    latencies.sort();
    let stats = pool.stats();
    println!(
        "\n{} requests ({} concurrent, {} new tokens each at most) in {:.1} s; replica 0 killed at {:.1} s after {} completions",
        args.requests,
        args.concurrency,
        args.max_tokens,
        wall.as_secs_f64(),
        killed_at.as_secs_f64(),
        args.kill_after
    );
    println!(
        "throughput: {:.2} requests/s, {:.1} generated tokens/s",
        latencies.len() as f64 / wall.as_secs_f64(),
        tokens as f64 / wall.as_secs_f64()
    );
    println!(
        "latency: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms; time to first token p50 {:.0} ms, p99 {:.0} ms",
        pct(&latencies, 0.5).as_secs_f64() * 1e3,
        pct(&latencies, 0.9).as_secs_f64() * 1e3,
        pct(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        stats.ttft.p50.as_secs_f64() * 1e3,
        stats.ttft.p99.as_secs_f64() * 1e3,
    );
    println!(
        "succeeded: {}; failed before the first token (retryable, so a pool bug if nonzero): {before}; lost mid-stream when the replica died: {mid}; retried on another replica: {}",
        latencies.len(),
        stats.retries
    );
    for r in &stats.replicas {
        println!(
            "  {}: {:?}, {} picks, {} ok, {} failed, ejections {}",
            r.id, r.state, r.picks, r.successes, r.failures, r.ejections
        );
    }
    pool.shutdown().await;
    if before > 0 {
        bail!("{before} requests failed that the pool should have retried");
    }
    Ok(())
}
