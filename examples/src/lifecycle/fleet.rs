//! The serving side of the lifecycle: engines loaded per model version, a staging pool that
//! evaluates a candidate, the production pool that follows a discovery registry, the rollout
//! (join new replicas, drain old ones) and the request burst.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keel_serving::{
    BoxFuture, EndpointStatus, Engine, EngineReplica, Load, Pool, PoolRequest, Registry, Replica,
    ReplicaError, ReplicaErrorKind, ReplicaId, TokenStream, Weights,
};
use tokio::sync::Semaphore;

use super::progress::Progress;
use super::{BurstConfig, BurstReport, CaseResult, DeployReport, EvalScores, ServingConfig};

/// One evaluation case: a question and the keywords (any of them, lower case) a correct
/// answer contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EvalCase {
    pub(crate) prompt: &'static str,
    pub(crate) expect: &'static [&'static str],
}

/// The fixed evaluation set (the `eval:assistant-smoke` dataset in lineage).
pub(crate) const EVAL_SET: [EvalCase; 8] = [
    EvalCase {
        prompt: "What is the capital of France? Answer in one word.",
        expect: &["paris"],
    },
    EvalCase {
        prompt: "What color is the sky on a clear day? Answer in one word.",
        expect: &["blue"],
    },
    EvalCase {
        prompt: "How many days are there in a week?",
        expect: &["7", "seven"],
    },
    EvalCase {
        prompt: "What is the largest planet in our solar system?",
        expect: &["jupiter"],
    },
    EvalCase {
        prompt: "What do bees make?",
        expect: &["honey"],
    },
    EvalCase {
        prompt: "What is the opposite of hot?",
        expect: &["cold"],
    },
    EvalCase {
        prompt: "What is 2 + 2?",
        expect: &["4", "four"],
    },
    EvalCase {
        prompt: "Which animal says woof?",
        expect: &["dog"],
    },
];

const BURST_PROMPTS: [&str; 6] = [
    "Give me one tip for writing clear emails.",
    "Explain what a hash map is in one sentence.",
    "Suggest a name for a pet turtle.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What does a compiler do?",
];

/// A replica that fails its next `faults` requests before they start (an injected fault, so
/// the evaluation step's retry can be seen and tested).
struct Flaky {
    inner: EngineReplica,
    faults: Arc<AtomicU32>,
}

impl Replica for Flaky {
    fn generate(
        &self,
        request: PoolRequest,
    ) -> BoxFuture<'static, Result<TokenStream, ReplicaError>> {
        let fail = self
            .faults
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async {
                Err(ReplicaError::new(
                    ReplicaErrorKind::Unavailable,
                    "injected fault: the replica dropped the request",
                ))
            });
        }
        self.inner.generate(request)
    }

    fn load(&self) -> Load {
        self.inner.load()
    }
}

/// The production pool and who is in it.
struct Production {
    pool: Pool,
    registry: Registry,
    members: BTreeMap<ReplicaId, u32>,
}

/// Engines, pools and replicas of this process. Rebuilt from lineage after a restart: lineage,
/// not memory, says which version the service serves.
pub(crate) struct Fleet {
    model: PathBuf,
    replicas: usize,
    engines: HashMap<u32, Vec<Arc<Engine>>>,
    production: Option<Production>,
    faults: Arc<AtomicU32>,
}

fn replica_id(version: u32, i: usize) -> ReplicaId {
    ReplicaId::new(u64::from(version) * 100 + i as u64)
}

fn pool_builder() -> keel_serving::PoolBuilder {
    Pool::builder()
        .seed(7)
        .first_token_timeout(Duration::from_secs(120))
        .default_deadline(Duration::from_secs(600))
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Fleet {
    pub(crate) fn new(model: PathBuf, replicas: usize, faults: u32) -> Self {
        Self {
            model,
            replicas: replicas.max(1),
            engines: HashMap::new(),
            production: None,
            faults: Arc::new(AtomicU32::new(faults)),
        }
    }

    /// The engines of `version`, loading them (one per replica) if this process has not yet.
    async fn engines(
        &mut self,
        version: u32,
        cfg: &ServingConfig,
    ) -> anyhow::Result<Vec<Arc<Engine>>> {
        if let Some(e) = self.engines.get(&version) {
            return Ok(e.clone());
        }
        let progress = Progress::new(format!("loading v{version}"), self.replicas);
        let mut out = Vec::new();
        // Replicas share this machine's cores: give each its share of kernel threads.
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let threads = (cores / self.replicas).max(1);
        for i in 0..self.replicas {
            let builder = Engine::builder()
                .model_path(&self.model)
                .threads(threads)
                .kv_blocks(cfg.kv_blocks)
                .max_seqs(cfg.max_seqs)
                .max_batch_tokens(cfg.max_batch_tokens)
                .weights(if cfg.dense_weights {
                    Weights::Dequantized
                } else {
                    Weights::AsStored
                });
            let engine = tokio::task::spawn_blocking(move || builder.build())
                .await
                .context("the model loading task panicked")?
                .with_context(|| format!("loading replica {i} of model version v{version}"))?;
            out.push(Arc::new(engine));
            progress.tick();
        }
        progress.finish(&format!(
            "{} replica(s) of {} ({} max seqs, {} KV blocks, {} weights)",
            self.replicas,
            self.model
                .file_name()
                .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
            cfg.max_seqs,
            cfg.kv_blocks,
            if cfg.dense_weights {
                "f32"
            } else {
                "as stored"
            }
        ));
        self.engines.insert(version, out.clone());
        Ok(out)
    }

    /// Evaluates `version` on the first `cases` evaluation cases through a staging pool of
    /// its replicas. A failed request fails the attempt (the caller's step retries it).
    pub(crate) async fn evaluate(
        &mut self,
        version: u32,
        cfg: &ServingConfig,
        cases: usize,
        max_tokens: u32,
    ) -> anyhow::Result<EvalScores> {
        let engines = self.engines(version, cfg).await?;
        let mut builder = pool_builder();
        for (i, e) in engines.iter().enumerate() {
            let replica = Flaky {
                inner: EngineReplica::new(Arc::clone(e)),
                faults: Arc::clone(&self.faults),
            };
            builder = builder.replica(replica_id(version, i), Arc::new(replica));
        }
        let pool = builder.build().context("building the staging pool")?;
        let cases: Vec<EvalCase> = EVAL_SET.iter().copied().take(cases.max(1)).collect();
        let progress = Arc::new(Progress::new(format!("evaluating v{version}"), cases.len()));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for case in &cases {
            let (pool, progress, case) = (pool.clone(), Arc::clone(&progress), *case);
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let out = pool
                    .generate(PoolRequest::new(case.prompt, max_tokens))
                    .await?
                    .collect()
                    .await;
                progress.tick();
                out.map(|o| (o, t0.elapsed()))
            }));
        }
        let mut results = Vec::new();
        let mut failure = None;
        for (case, t) in cases.iter().zip(tasks) {
            match t.await.context("an evaluation task panicked")? {
                Ok((out, latency)) => {
                    let answer = out.text.trim().to_owned();
                    let lower = answer.to_lowercase();
                    results.push(CaseResult {
                        prompt: case.prompt.to_owned(),
                        correct: case.expect.iter().any(|k| lower.contains(k)),
                        answer: answer.chars().take(80).collect(),
                        latency_ms: ms(latency),
                        tokens: out.output_tokens,
                    });
                }
                Err(e) => failure = Some(format!("{:?}: {e}", case.prompt)),
            }
        }
        pool.shutdown().await;
        if let Some(f) = failure {
            progress.abandon("a request failed");
            anyhow::bail!("evaluation request {f}");
        }
        let wall = started.elapsed();
        let mut lat: Vec<Duration> = results
            .iter()
            .map(|r| Duration::from_millis(r.latency_ms))
            .collect();
        lat.sort();
        let tokens: u64 = results.iter().map(|r| u64::from(r.tokens)).sum();
        let correct = results.iter().filter(|r| r.correct).count();
        let scores = EvalScores {
            accuracy: correct as f64 / results.len().max(1) as f64,
            p50_ms: ms(pct(&lat, 0.5)),
            tokens_per_s: tokens as f64 / wall.as_secs_f64().max(1e-9),
            attempts: 0,
            cases: results,
        };
        progress.finish(&format!(
            "{correct}/{} correct, p50 {} ms",
            scores.cases.len(),
            scores.p50_ms
        ));
        Ok(scores)
    }

    /// The production pool, created on first use with the replicas of `served` (what lineage
    /// says the service serves) joined through the registry.
    async fn production(
        &mut self,
        served: Option<(u32, ServingConfig)>,
    ) -> anyhow::Result<&mut Production> {
        if self.production.is_none() {
            let registry = Registry::new(Duration::from_secs(24 * 3600));
            let pool = pool_builder()
                .discovery(registry.watch())
                .build()
                .context("building the production pool")?;
            let mut prod = Production {
                pool,
                registry,
                members: BTreeMap::new(),
            };
            if let Some((v, cfg)) = served {
                let engines = self.engines(v, &cfg).await?;
                join(&mut prod, v, &engines).await?;
            }
            self.production = Some(prod);
        }
        self.production
            .as_mut()
            .context("the production pool was not created")
    }

    /// Rolls the production pool over to `version`: its replicas join through discovery, the
    /// others drain (finish in-flight work, take nothing new) and leave. Idempotent.
    pub(crate) async fn deploy(
        &mut self,
        served: Option<(u32, ServingConfig)>,
        version: u32,
        cfg: &ServingConfig,
    ) -> anyhow::Result<DeployReport> {
        let engines = self.engines(version, cfg).await?;
        let prod = self.production(served).await?;
        let mut report = DeployReport::default();
        if !prod.members.values().any(|&v| v == version) {
            report.added = join(prod, version, &engines).await?;
        }
        let old: Vec<(ReplicaId, u32)> = prod
            .members
            .iter()
            .filter(|(_, v)| **v != version)
            .map(|(id, v)| (*id, *v))
            .collect();
        for (id, _) in &old {
            prod.registry
                .set_status(*id, EndpointStatus::Draining)
                .with_context(|| format!("marking {id} as draining"))?;
            // Waits for its in-flight requests, then removes it from the pool.
            let _ = prod.pool.drain(*id).await;
            prod.registry
                .leave(*id)
                .with_context(|| format!("removing {id} from discovery"))?;
            prod.members.remove(id);
            report.drained.push(id.to_string());
        }
        for v in old.iter().map(|(_, v)| *v) {
            if let Some(engines) = self.engines.remove(&v) {
                for e in engines {
                    e.shutdown().await;
                }
            }
        }
        Ok(report)
    }

    /// Sends a burst of concurrent requests through the production pool.
    pub(crate) async fn burst(
        &mut self,
        served: Option<(u32, ServingConfig)>,
        cfg: &BurstConfig,
    ) -> anyhow::Result<BurstReport> {
        let prod = self.production(served).await?;
        let pool = prod.pool.clone();
        let progress = Arc::new(Progress::new("burst".to_owned(), cfg.requests));
        let gate = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..cfg.requests {
            let (pool, gate, progress) = (pool.clone(), Arc::clone(&gate), Arc::clone(&progress));
            let request = PoolRequest::new(BURST_PROMPTS[i % BURST_PROMPTS.len()], cfg.max_tokens);
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await;
                let t0 = Instant::now();
                let out = match pool.generate(request).await {
                    Ok(s) => s.collect().await,
                    Err(e) => Err(e),
                };
                progress.tick();
                out.map(|o| (t0.elapsed(), o.output_tokens, o.replica))
            }));
        }
        let mut lat = Vec::new();
        let (mut tokens, mut failed) = (0u64, 0usize);
        let mut per_replica: BTreeMap<String, usize> = BTreeMap::new();
        for t in tasks {
            match t.await.context("a burst task panicked")? {
                Ok((l, n, r)) => {
                    lat.push(l);
                    tokens += u64::from(n);
                    *per_replica.entry(r.to_string()).or_default() += 1;
                }
                Err(_) => failed += 1,
            }
        }
        let wall = started.elapsed().as_secs_f64().max(1e-9);
        lat.sort();
        let report = BurstReport {
            requests: cfg.requests,
            concurrency: cfg.concurrency,
            succeeded: lat.len(),
            failed,
            wall_ms: (wall * 1e3) as u64,
            requests_per_s: lat.len() as f64 / wall,
            tokens_per_s: tokens as f64 / wall,
            p50_ms: ms(pct(&lat, 0.5)),
            p90_ms: ms(pct(&lat, 0.9)),
            p99_ms: ms(pct(&lat, 0.99)),
            max_ms: ms(lat.last().copied().unwrap_or_default()),
            per_replica: per_replica.into_iter().collect(),
        };
        progress.finish(&format!(
            "{} ok, {} failed, {:.2} req/s",
            report.succeeded, report.failed, report.requests_per_s
        ));
        Ok(report)
    }

    /// Stops the pools and engines.
    pub(crate) async fn shutdown(&mut self) {
        if let Some(p) = self.production.take() {
            p.pool.shutdown().await;
        }
        for (_, engines) in self.engines.drain() {
            for e in engines {
                e.shutdown().await;
            }
        }
    }
}

/// Joins `engines` (replicas of `version`) through the registry and waits until the pool,
/// which follows the registry, has them.
async fn join(
    prod: &mut Production,
    version: u32,
    engines: &[Arc<Engine>],
) -> anyhow::Result<Vec<String>> {
    let mut added = Vec::new();
    for (i, e) in engines.iter().enumerate() {
        let id = replica_id(version, i);
        prod.registry
            .join(id, Arc::new(EngineReplica::new(Arc::clone(e))));
        prod.members.insert(id, version);
        added.push(id.to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ids = prod.pool.replica_ids();
        if engines
            .iter()
            .enumerate()
            .all(|(i, _)| ids.contains(&replica_id(version, i)))
        {
            return Ok(added);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the production pool did not pick up the new replicas from discovery within 10 s"
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
