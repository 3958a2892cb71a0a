//! The lifecycle scenario: one host application that composes keel-lineage, keel-serving and
//! keel-durable to ship a model version to the `prod:assistant` service safely.
//!
//! [`run`] opens (or creates) a data dir holding a durable journal and a lineage store, then
//! starts or resumes the durable workflow `ship-model`, whose steps
//! ([`Step`]) register data, features and the model in lineage, evaluate the model through a
//! replica pool, assess the impact of the change, wait durably for an approval signal, roll
//! the production pool over to the new version, serve a burst of requests, and report the
//! service's lineage and governance checks. Every step's outcome is journaled: a killed run,
//! started again, replays finished steps from the journal instead of redoing them, and every
//! lineage write is idempotent (a resumed step commits only what is missing).
//!
//! The example `lifecycle` is a thin command-line front end; `docs/guide.md` walks through it.
#![allow(clippy::print_stdout)] // the scenario reports to its operator on stdout

mod catalog;
mod fleet;
mod progress;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use keel_durable::{Context, ListFilter, RetryPolicy, Runtime, StepError, WorkflowId};
use keel_lineage::LineageStore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use catalog::ImpactBrief;
use fleet::Fleet;

/// The name the workflow is registered under in the durable journal.
pub const WORKFLOW: &str = "ship-model";
/// The file that marks a directory as a lifecycle data dir, with its format version.
pub const MARKER_FILE: &str = "keel-lifecycle.json";
/// The data dir format this build reads and writes.
pub const DATA_FORMAT: u32 = 1;
/// The number of cases in the fixed evaluation set.
pub const EVAL_SET_LEN: usize = fleet::EVAL_SET.len();

/// Prints one line on stdout (the scenario's report to its operator).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The workflow's steps, in order. `--crash-after` takes a name or a number (1 = first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Step {
    /// Datasets, fields, the feature table, the evaluation set, the workflow and the service.
    RegisterData,
    /// The model and the new model version, trained on the features.
    RegisterModel,
    /// The evaluation set run through a staging pool of the new version's replicas.
    Evaluate,
    /// The Evaluation node with the scores.
    RecordEvaluation,
    /// Impact of replacing the served version, and of a proposed field drop.
    Impact,
    /// The approval signal, received durably.
    Approval,
    /// New replicas join the production pool through discovery; old ones drain; lineage
    /// records that the service serves the new version.
    Deploy,
    /// Concurrent requests through the production pool.
    Burst,
    /// Lineage tree, Mermaid and DOT files, governance checks.
    Report,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 9] = [
        Step::RegisterData,
        Step::RegisterModel,
        Step::Evaluate,
        Step::RecordEvaluation,
        Step::Impact,
        Step::Approval,
        Step::Deploy,
        Step::Burst,
        Step::Report,
    ];

    /// The step's name in the journal and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Step::RegisterData => "register-data",
            Step::RegisterModel => "register-model",
            Step::Evaluate => "evaluate",
            Step::RecordEvaluation => "record-evaluation",
            Step::Impact => "impact",
            Step::Approval => "approval",
            Step::Deploy => "deploy",
            Step::Burst => "burst",
            Step::Report => "report",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Step {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        if let Ok(n) = s.parse::<usize>() {
            return n
                .checked_sub(1)
                .and_then(|i| Step::ALL.get(i).copied())
                .ok_or_else(|| anyhow!("step number {n} is out of range 1..={}", Step::ALL.len()));
        }
        Step::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Step::ALL.iter().map(|st| st.name()).collect();
                anyhow!("unknown step {s:?}; steps are {}", names.join(", "))
            })
    }
}

/// How a `--crash-after` crash happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CrashMode {
    /// Stop the workflow where it is, drop the runtime without finishing anything, and return
    /// [`Outcome::Crashed`] (what tests use: the same as a kill, minus the process exit).
    #[default]
    Return,
    /// Exit the process at once with status 137, as `kill -9` would leave it.
    Exit,
}

/// Sizes of the request burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BurstConfig {
    /// Requests in all.
    pub requests: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// New tokens per request, at most.
    pub max_tokens: u32,
}

/// What to run and where; see [`Options::new`] for the defaults.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The data dir: durable journal, lineage store and exported files.
    pub data_dir: PathBuf,
    /// The GGUF file; `None` searches `KEEL_MODEL` and `models/`.
    pub model: Option<PathBuf>,
    /// Send the approval signal when the workflow waits for it.
    pub approve: bool,
    /// Who approves.
    pub approver: String,
    /// Stop as if killed right after this step completes (only when it ran in this
    /// invocation, so the same command resumes past it).
    pub crash_after: Option<Step>,
    /// How that crash happens.
    pub crash_mode: CrashMode,
    /// Evaluation cases to run (the first N of the fixed set).
    pub eval_cases: usize,
    /// New tokens per evaluation answer, at most.
    pub eval_max_tokens: u32,
    /// The burst.
    pub burst: BurstConfig,
    /// Engine replicas per model version.
    pub replicas: usize,
    /// Evaluation requests that fail on a replica before it serves again (fault injection).
    pub eval_faults: u32,
}

impl Options {
    /// Defaults: the model from `models/`, no approval, no crash, the full evaluation set with
    /// 16-token answers, a 16-request burst 8 at a time, 2 replicas, no injected faults.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            model: None,
            approve: false,
            approver: "operator".to_owned(),
            crash_after: None,
            crash_mode: CrashMode::Return,
            eval_cases: EVAL_SET_LEN,
            eval_max_tokens: 16,
            burst: BurstConfig {
                requests: 16,
                concurrency: 8,
                max_tokens: 16,
            },
            replicas: 2,
            eval_faults: 0,
        }
    }
}

/// How a model version is served. v1 and later versions differ only here: every version uses
/// the same GGUF weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingConfig {
    /// KV-cache blocks per engine (16 tokens each).
    pub kv_blocks: usize,
    /// Sequences batched at once per engine.
    pub max_seqs: usize,
    /// Token budget of one scheduler step.
    pub max_batch_tokens: usize,
    /// Whether the engine expands the 4-bit weights to f32 at load (about 8x the weight
    /// memory, multiplied by candle's dense kernels). Off for every version: Keel's own
    /// quantized CPU kernels batch well on the weights as stored.
    #[serde(default)]
    pub dense_weights: bool,
}

impl ServingConfig {
    /// v1: a small KV cache and batch; v2 and later: twice the batch and 1.5 times the cache.
    /// Both keep the weights as stored.
    pub fn for_version(version: u32) -> Self {
        if version <= 1 {
            Self {
                kv_blocks: 64,
                max_seqs: 8,
                max_batch_tokens: 256,
                dense_weights: false,
            }
        } else {
            Self {
                kv_blocks: 96,
                max_seqs: 16,
                max_batch_tokens: 384,
                dense_weights: false,
            }
        }
    }
}

/// One evaluation answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// The question.
    pub prompt: String,
    /// The answer (first 80 characters).
    pub answer: String,
    /// Whether it contains an expected keyword.
    pub correct: bool,
    /// End-to-end latency.
    pub latency_ms: u64,
    /// Tokens generated.
    pub tokens: u32,
}

/// The evaluation's scores, as recorded on the Evaluation node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalScores {
    /// Fraction of answers containing an expected keyword.
    pub accuracy: f64,
    /// Median latency.
    pub p50_ms: u64,
    /// Generated tokens per second of wall time.
    pub tokens_per_s: f64,
    /// Attempts the step took (more than 1 when a replica failed a request).
    pub attempts: u32,
    /// Each case.
    pub cases: Vec<CaseResult>,
}

/// What the rollout changed in the production pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    /// The version served before, if any.
    pub previous: Option<u32>,
    /// Replicas that joined.
    pub added: Vec<String>,
    /// Replicas that drained and left.
    pub drained: Vec<String>,
}

/// Throughput and latency of the burst.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BurstReport {
    /// Requests sent.
    pub requests: usize,
    /// In flight at once.
    pub concurrency: usize,
    /// Requests that finished.
    pub succeeded: usize,
    /// Requests that failed.
    pub failed: usize,
    /// Wall time.
    pub wall_ms: u64,
    /// Finished requests per second.
    pub requests_per_s: f64,
    /// Generated tokens per second.
    pub tokens_per_s: f64,
    /// Latency percentiles.
    pub p50_ms: u64,
    /// 90th percentile.
    pub p90_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
    /// Slowest.
    pub max_ms: u64,
    /// Requests served per replica.
    pub per_replica: Vec<(String, usize)>,
}

/// The approval signal's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved.
    pub by: String,
    /// When, in seconds since the Unix epoch.
    pub at_unix_s: u64,
}

/// The lineage report and governance checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageReport {
    /// The service's upstream lineage as a text tree.
    pub tree: String,
    /// Files written into the data dir.
    pub files: Vec<String>,
    /// Governance policies checked.
    pub checks: Vec<String>,
    /// Violations found, one line each.
    pub violations: Vec<String>,
    /// Nodes in the lineage graph.
    pub nodes: usize,
    /// Edges in the lineage graph.
    pub edges: usize,
}

/// The workflow's result, journaled when it finishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Summary {
    /// The workflow ID.
    pub workflow: String,
    /// The version shipped.
    pub version: u32,
    /// The lineage key of the version shipped.
    pub model_version: String,
    /// Its serving configuration.
    pub serving: ServingConfig,
    /// Evaluation scores.
    pub evaluation: EvalScores,
    /// Impact of the version replacement, then of the proposed field drop.
    pub impact: Vec<ImpactBrief>,
    /// The approval.
    pub approval: Approval,
    /// The rollout.
    pub deploy: DeployReport,
    /// The burst.
    pub burst: BurstReport,
    /// Lineage report and governance.
    pub lineage: LineageReport,
}

/// One step as this invocation saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRecord {
    /// The step.
    pub step: Step,
    /// True when its outcome came from the journal and it did not run again.
    pub replayed: bool,
    /// How long it took in this invocation.
    pub elapsed: Duration,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// The workflow finished.
    Finished(Box<Summary>),
    /// The workflow is waiting for an approval; run again with approval.
    AwaitingApproval,
    /// Stopped as if killed after this step ([`Options::crash_after`]).
    Crashed(Step),
}

/// What one invocation of [`run`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Report {
    /// The workflow ID.
    pub workflow: String,
    /// The version it ships.
    pub version: u32,
    /// Whether an unfinished workflow was resumed (rather than a new one started).
    pub resumed: bool,
    /// How it ended.
    pub outcome: Outcome,
    /// The steps reached in this invocation, in order.
    pub steps: Vec<StepRecord>,
}

impl Report {
    /// Steps whose outcome came from the journal.
    pub fn replayed(&self) -> Vec<Step> {
        self.steps
            .iter()
            .filter(|s| s.replayed)
            .map(|s| s.step)
            .collect()
    }

    /// Steps that ran in this invocation.
    pub fn ran(&self) -> Vec<Step> {
        self.steps
            .iter()
            .filter(|s| !s.replayed)
            .map(|s| s.step)
            .collect()
    }
}

/// The workflow's input, journaled when it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    version: u32,
    eval_cases: usize,
    eval_max_tokens: u32,
    burst: BurstConfig,
}

enum Event {
    AwaitingApproval,
    Approved,
    Crash(Step),
}

/// What the workflow needs from its host: the lineage store, the serving fleet, the options
/// and a line back to the host's event loop.
struct Host {
    opts: Options,
    model: PathBuf,
    store: LineageStore,
    fleet: tokio::sync::Mutex<Fleet>,
    events: mpsc::UnboundedSender<Event>,
    log: Mutex<Vec<StepRecord>>,
    signalled: AtomicBool,
    waiting: AtomicBool,
}

fn permanent(e: impl fmt::Display) -> StepError {
    StepError::permanent(e)
}

impl Host {
    /// Whether this invocation has already seen `step` (the runtime re-runs a workflow from
    /// the top after it wakes from a wait, replaying what this process already reported).
    fn seen(&self, step: Step) -> bool {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .any(|r| r.step == step)
    }

    fn record(&self, step: Step, replayed: bool, elapsed: Duration) {
        if replayed && self.seen(step) {
            return;
        }
        if replayed {
            say(&format!("  ↺ {step:<18} replayed from the journal"));
        } else {
            say(&format!(
                "  ✓ {step:<18} done in {:.1} s",
                elapsed.as_secs_f64()
            ));
        }
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(StepRecord {
                step,
                replayed,
                elapsed,
            });
    }

    /// Runs `f` as durable step `step`, records whether it ran or replayed, and crashes after
    /// it if asked to.
    async fn step<T, F, Fut>(
        &self,
        ctx: &Context,
        step: Step,
        policy: RetryPolicy,
        mut f: F,
    ) -> anyhow::Result<T>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T, StepError>> + Send,
    {
        let ran = AtomicBool::new(false);
        let t0 = Instant::now();
        let out = ctx
            .step_with(step.name(), policy, || {
                ran.store(true, Ordering::Relaxed);
                f()
            })
            .await
            .with_context(|| format!("step {step} failed"))?;
        let ran = ran.load(Ordering::Relaxed);
        self.record(step, !ran, t0.elapsed());
        if ran {
            self.crash_point(step).await;
        }
        Ok(out)
    }

    async fn crash_point(&self, step: Step) {
        if self.opts.crash_after != Some(step) {
            return;
        }
        say(&format!(
            "  ✗ simulated crash after step {step}: the process stops here as if killed"
        ));
        match self.opts.crash_mode {
            CrashMode::Exit => std::process::exit(137),
            CrashMode::Return => {
                let _ = self.events.send(Event::Crash(step));
                std::future::pending::<()>().await;
            }
        }
    }

    fn served(&self) -> Option<(u32, ServingConfig)> {
        catalog::served_version(&self.store.read())
    }
}

fn print_impact(briefs: &[ImpactBrief]) {
    for b in briefs {
        say(&format!(
            "    impact of \"{}\": {} break, {} informed{}",
            b.change,
            b.breaks,
            b.informed,
            b.max_severity
                .as_deref()
                .map_or_else(String::new, |s| format!(", max severity {s}"))
        ));
        for s in &b.services {
            say(&format!("      service  {s}"));
        }
        for t in &b.top {
            say(&format!("      affected {t}"));
        }
        for o in &b.owners {
            say(&format!("      notify   {o}"));
        }
        for n in &b.notes {
            say(&format!("      note     {n}"));
        }
    }
}

/// The durable workflow: every side effect is a step, so a restart replays instead of redoing.
async fn ship(host: Arc<Host>, ctx: Context, plan: Plan) -> anyhow::Result<Summary> {
    let v = plan.version;
    let cfg = ServingConfig::for_version(v);
    let mv_key = catalog::version_key(v).to_string();

    let h = Arc::clone(&host);
    let _: usize = host
        .step(
            &ctx,
            Step::RegisterData,
            RetryPolicy::default(),
            move || {
                let h = Arc::clone(&h);
                async move {
                    let n = catalog::commit_missing(&h.store, catalog::data_changes())
                        .map_err(permanent)?;
                    say(&format!(
                        "    lineage: {n} changes committed (0: already registered)"
                    ));
                    Ok(n)
                }
            },
        )
        .await?;

    let h = Arc::clone(&host);
    let _: usize = host
        .step(&ctx, Step::RegisterModel, RetryPolicy::default(), move || {
            let h = Arc::clone(&h);
            async move {
                let bytes = std::fs::metadata(&h.model).map(|m| m.len()).unwrap_or(0);
                let file = h
                    .model
                    .file_name()
                    .map_or_else(String::new, |f| f.to_string_lossy().into_owned());
                let n = catalog::commit_missing(
                    &h.store,
                    catalog::model_changes(v, &file, bytes, &cfg),
                )
                .map_err(permanent)?;
                say(&format!(
                    "    lineage: {} registered, trained on features:assistant_training ({n} changes)",
                    catalog::version_key(v)
                ));
                Ok(n)
            }
        })
        .await?;

    let h = Arc::clone(&host);
    let attempts = Arc::new(AtomicU32::new(0));
    let retry = RetryPolicy::default().max_attempts(3).backoff(
        Duration::from_millis(200),
        2.0,
        Duration::from_secs(2),
    );
    let scores: EvalScores = host
        .step(&ctx, Step::Evaluate, retry, move || {
            let (h, attempts) = (Arc::clone(&h), Arc::clone(&attempts));
            async move {
                let n = attempts.fetch_add(1, Ordering::AcqRel) + 1;
                let mut fleet = h.fleet.lock().await;
                match fleet
                    .evaluate(v, &cfg, plan.eval_cases, plan.eval_max_tokens)
                    .await
                {
                    Ok(mut s) => {
                        s.attempts = n;
                        Ok(s)
                    }
                    Err(e) => {
                        say(&format!(
                            "    evaluation attempt {n} failed: {e:#}; the step will be retried"
                        ));
                        Err(StepError::retryable(format!("{e:#}")))
                    }
                }
            }
        })
        .await?;

    let h = Arc::clone(&host);
    let s2 = scores.clone();
    let _: usize = host
        .step(
            &ctx,
            Step::RecordEvaluation,
            RetryPolicy::default(),
            move || {
                let (h, s) = (Arc::clone(&h), s2.clone());
                async move {
                    catalog::commit_missing(&h.store, catalog::evaluation_changes(v, &s))
                        .map_err(permanent)
                }
            },
        )
        .await?;

    let impact_shown = host.seen(Step::Impact);
    let h = Arc::clone(&host);
    let (previous, impact): (Option<u32>, Vec<ImpactBrief>) = host
        .step(&ctx, Step::Impact, RetryPolicy::default(), move || {
            let h = Arc::clone(&h);
            async move {
                let g = h.store.read();
                let prev = catalog::served_version(&g).map(|(p, _)| p);
                let briefs = catalog::impact_briefs(&g, v).map_err(permanent)?;
                Ok((prev, briefs))
            }
        })
        .await?;
    if !impact_shown {
        say(&format!(
            "    {} serves {}; proposed: {mv_key}",
            catalog::service_key(),
            previous.map_or_else(|| "nothing yet".to_owned(), |p| format!("v{p}"))
        ));
        print_impact(&impact);
    }

    // The approval: a durable wait; the host sends the signal (now or in a later invocation).
    let t0 = Instant::now();
    if !host.seen(Step::Approval) && !host.waiting.swap(true, Ordering::AcqRel) {
        say("  … waiting for approval (signal \"approval\")");
    }
    let _ = host.events.send(Event::AwaitingApproval);
    let approval: Approval = ctx.recv("approval").await.context("waiting for approval")?;
    let _ = host.events.send(Event::Approved);
    let fresh = host.signalled.load(Ordering::Acquire);
    host.record(Step::Approval, !fresh, t0.elapsed());
    say(&format!("    approved by {}", approval.by));
    if fresh {
        host.crash_point(Step::Approval).await;
    }

    let h = Arc::clone(&host);
    let deploy: DeployReport = host
        .step(&ctx, Step::Deploy, RetryPolicy::default(), move || {
            let h = Arc::clone(&h);
            async move {
                let served = h.served();
                let mut fleet = h.fleet.lock().await;
                let mut report = fleet
                    .deploy(served, v, &cfg)
                    .await
                    .map_err(|e| StepError::retryable(format!("{e:#}")))?;
                let changes = catalog::deploy_changes(&h.store.read(), served.map(|s| s.0), v);
                catalog::commit_missing(&h.store, changes).map_err(permanent)?;
                report.previous = served.map(|s| s.0).filter(|&p| p != v);
                Ok(report)
            }
        })
        .await?;
    if !deploy.added.is_empty() || !deploy.drained.is_empty() {
        say(&format!(
            "    joined {}; drained {}",
            list_or_none(&deploy.added),
            list_or_none(&deploy.drained)
        ));
    }

    let h = Arc::clone(&host);
    let burst_cfg = plan.burst;
    let burst: BurstReport = host
        .step(&ctx, Step::Burst, RetryPolicy::default(), move || {
            let h = Arc::clone(&h);
            async move {
                let served = h.served();
                let mut fleet = h.fleet.lock().await;
                fleet
                    .burst(served, &burst_cfg)
                    .await
                    .map_err(|e| StepError::retryable(format!("{e:#}")))
            }
        })
        .await?;

    let h = Arc::clone(&host);
    let lineage: LineageReport = host
        .step(&ctx, Step::Report, RetryPolicy::default(), move || {
            let h = Arc::clone(&h);
            async move { lineage_report(&h).map_err(|e| StepError::retryable(format!("{e:#}"))) }
        })
        .await?;

    Ok(Summary {
        workflow: ctx.id().as_str().to_owned(),
        version: v,
        model_version: mv_key,
        serving: cfg,
        evaluation: scores,
        impact,
        approval,
        deploy,
        burst,
        lineage,
    })
}

fn lineage_report(h: &Host) -> anyhow::Result<LineageReport> {
    let (tree, (mermaid, dot), (checks, violations), nodes, edges) = {
        let g = h.store.read();
        (
            catalog::tree(&g)?,
            catalog::exports(&g)?,
            catalog::governance(&g),
            g.node_count(),
            g.edge_count(),
        )
    };
    let mut files = Vec::new();
    for (name, text) in [
        ("lineage-assistant.mmd", mermaid),
        ("lineage-assistant.dot", dot),
    ] {
        let path = h.opts.data_dir.join(name);
        write_atomically(&path, text.as_bytes())?;
        files.push(path.display().to_string());
    }
    Ok(LineageReport {
        tree,
        files,
        checks,
        violations: violations
            .iter()
            .map(|v| format!("{}: {} {}", v.policy, v.node, v.message))
            .collect(),
        nodes,
        edges,
    })
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    app: String,
    format: u32,
}

/// Checks that `dir` is a lifecycle data dir of this format, or creates one.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    let marker = dir.join(MARKER_FILE);
    if marker.exists() {
        let text = std::fs::read_to_string(&marker)
            .with_context(|| format!("reading {}", marker.display()))?;
        let m: Marker = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "data dir {} is corrupt: {} is not a valid marker ({e}); move the dir away or pass another --data",
                dir.display(),
                marker.display()
            )
        })?;
        if m.app != "keel-lifecycle" || m.format != DATA_FORMAT {
            bail!(
                "data dir {} was written by {} format {}; this build reads keel-lifecycle format {DATA_FORMAT}; pass another --data or move it away",
                dir.display(),
                m.app,
                m.format
            );
        }
        return Ok(());
    }
    let non_empty = dir.exists()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some();
    if non_empty {
        bail!(
            "{} is not empty and has no {MARKER_FILE}: it is not a lifecycle data dir (or its marker was lost); pass another --data",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let m = Marker {
        app: "keel-lifecycle".to_owned(),
        format: DATA_FORMAT,
    };
    write_atomically(&marker, serde_json::to_string_pretty(&m)?.as_bytes())
}

fn open_lineage(path: &Path) -> anyhow::Result<LineageStore> {
    let mut tries = 0;
    loop {
        match LineageStore::open(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                let locked = matches!(e, keel_lineage::Error::Locked { .. });
                let text = format!("{:#}", anyhow::Error::from(e));
                // A store closed a moment ago by this process may still be releasing its lock.
                if locked && tries < 20 {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                if locked {
                    bail!(
                        "the lineage store {} is locked: another lifecycle run is using this data dir ({text})",
                        path.display()
                    );
                }
                bail!(
                    "cannot open the lineage store {}: it is damaged or from another version ({text})",
                    path.display()
                );
            }
        }
    }
}

async fn open_journal(path: &Path, host: &Arc<Host>) -> anyhow::Result<Runtime> {
    let h = Arc::clone(host);
    let builder = Runtime::builder(path).register(WORKFLOW, move |ctx: Context, plan: Plan| {
        let h = Arc::clone(&h);
        async move { ship(h, ctx, plan).await.map_err(|e| format!("{e:#}")) }
    });
    match builder.open().await {
        Ok(rt) => Ok(rt),
        Err(keel_durable::Error::AlreadyOpen { path, .. }) => bail!(
            "another lifecycle run is using this data dir: its durable journal {} is locked; wait for that run to finish",
            path.display()
        ),
        Err(e) => Err(anyhow::Error::from(e).context(format!(
            "cannot open the durable journal {}: it is damaged or from another version",
            path.display()
        ))),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs (or resumes) the lifecycle in `opts.data_dir` and prints its progress and summary.
///
/// # Errors
/// A missing model (the message names `scripts/fetch-model`), a data dir from another
/// version or damaged, a data dir in use by another run, or a workflow that failed.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let dir = &opts.data_dir;
    // The model first, so a missing file leaves no half-made data dir behind.
    let model = keel_serving::resolve_model_path(opts.model.as_deref())
        .map_err(|e| anyhow!("the lifecycle serves the real model and cannot find it: {e}"))?;
    prepare_data_dir(dir)?;
    let store = open_lineage(&dir.join("lineage"))?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let host = Arc::new(Host {
        opts: opts.clone(),
        model: model.clone(),
        store,
        fleet: tokio::sync::Mutex::new(Fleet::new(model, opts.replicas, opts.eval_faults)),
        events: tx,
        log: Mutex::new(Vec::new()),
        signalled: AtomicBool::new(false),
        waiting: AtomicBool::new(false),
    });
    let runtime = open_journal(&dir.join("journal"), &host).await?;
    // Pick (and print) the workflow before the worker starts replaying it.
    let picked = pick_workflow(&runtime, opts).await;
    let worker = tokio::spawn(runtime.worker()?.run());
    let result = match picked {
        Ok((id, version, resumed)) => {
            drive(&host, &runtime, &mut rx, opts, id, version, resumed).await
        }
        Err(e) => Err(e),
    };
    // Whatever happened, stop the workflow where it is (everything done is journaled).
    let _ = runtime.shutdown().await;
    let _ = worker.await;
    host.fleet.lock().await.shutdown().await;
    drop(runtime);
    let (id, version, resumed, outcome) = result?;
    let steps = host
        .log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let report = Report {
        workflow: id,
        version,
        resumed,
        outcome,
        steps,
    };
    print_report(&report, opts);
    Ok(report)
}

/// Finds the unfinished workflow to resume, or starts the next version's.
async fn pick_workflow(
    runtime: &Runtime,
    opts: &Options,
) -> anyhow::Result<(WorkflowId, u32, bool)> {
    let existing = runtime.list(&ListFilter::new().name(WORKFLOW))?;
    let open = existing.iter().find(|w| !w.status.is_terminal());
    let (id, resumed) = match open {
        Some(w) => (w.id.clone(), true),
        None => {
            if let Some(last) = existing.iter().max_by_key(|w| w.created_at)
                && let Some(err) = &last.error
            {
                say(&format!(
                    "note: the previous workflow {} failed ({err}); starting a new one",
                    last.id.as_str()
                ));
            }
            let version = u32::try_from(existing.len()).unwrap_or(u32::MAX - 1) + 1;
            let id = WorkflowId::new(format!("ship-assistant-v{version}"))?;
            let plan = Plan {
                version,
                eval_cases: opts.eval_cases,
                eval_max_tokens: opts.eval_max_tokens,
                burst: opts.burst,
            };
            runtime.start(WORKFLOW, &id, &plan).await?;
            (id, false)
        }
    };
    let version: u32 = id
        .as_str()
        .rsplit_once("-v")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    say(&format!(
        "keel lifecycle: data dir {}; {} workflow {} (ships {} to {})",
        opts.data_dir.display(),
        if resumed { "resuming" } else { "started" },
        id.as_str(),
        catalog::version_key(version),
        catalog::service_key()
    ));
    Ok((id, version, resumed))
}

/// Follows the workflow until it finishes, waits for an approval nobody gives, or crashes.
async fn drive(
    host: &Arc<Host>,
    runtime: &Runtime,
    rx: &mut mpsc::UnboundedReceiver<Event>,
    opts: &Options,
    id: WorkflowId,
    version: u32,
    resumed: bool,
) -> anyhow::Result<(String, u32, bool, Outcome)> {
    let handle = runtime.handle(&id)?;
    let result = handle.result::<Summary>();
    tokio::pin!(result);
    let mut grace: Option<tokio::time::Instant> = None;
    let out = |o: Outcome| -> anyhow::Result<(String, u32, bool, Outcome)> {
        Ok((id.as_str().to_owned(), version, resumed, o))
    };
    loop {
        let wait = async {
            match grace {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = &mut result => {
                let summary = r.with_context(|| format!("workflow {} failed", id.as_str()))?;
                return out(Outcome::Finished(Box::new(summary)));
            }
            Some(ev) = rx.recv() => match ev {
                Event::AwaitingApproval if opts.approve => {
                    let delivered = runtime
                        .history(&id)?
                        .iter()
                        .any(|e| e.kind == "signal" && e.name == "approval");
                    if !delivered {
                        let approval = Approval { by: opts.approver.clone(), at_unix_s: now_unix() };
                        host.signalled.store(true, Ordering::Release);
                        runtime.signal(&id, "approval", &approval).await?;
                    }
                }
                // Give an approval sent by an earlier invocation a moment to be delivered.
                Event::AwaitingApproval => grace = Some(tokio::time::Instant::now() + Duration::from_millis(750)),
                Event::Approved => grace = None,
                Event::Crash(step) => return out(Outcome::Crashed(step)),
            },
            () = wait => return out(Outcome::AwaitingApproval),
        }
    }
}

fn secs(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1e3)
}

fn print_report(r: &Report, opts: &Options) {
    let names = |steps: Vec<Step>| {
        if steps.is_empty() {
            "none".to_owned()
        } else {
            steps
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let this_run = format!(
        "ran {}; replayed from the journal {}",
        names(r.ran()),
        names(r.replayed())
    );
    match &r.outcome {
        Outcome::AwaitingApproval => {
            say(&format!(
                "\n{} is waiting for approval ({this_run}).\nApprove with: cargo run --release -p keel-examples --example lifecycle -- --data {} --approve",
                r.workflow,
                opts.data_dir.display()
            ));
        }
        Outcome::Crashed(step) => {
            say(&format!(
                "\n{} stopped after step {step} ({this_run}). Run the same command again to resume.",
                r.workflow
            ));
        }
        Outcome::Finished(s) => print_summary(s, &this_run),
    }
}

fn print_summary(s: &Summary, this_run: &str) {
    say("\nservice lineage:");
    for line in s.lineage.tree.lines() {
        say(&format!("  {line}"));
    }
    let e = &s.evaluation;
    let correct = e.cases.iter().filter(|c| c.correct).count();
    let mut rows: BTreeMap<u8, (&str, String)> = BTreeMap::new();
    rows.insert(
        0,
        (
            "shipped",
            format!(
                "{} -> prod:assistant (was {}); serving {} seqs, {} KV blocks, {} weights",
                s.model_version,
                s.deploy
                    .previous
                    .map_or_else(|| "nothing".to_owned(), |p| format!("v{p}")),
                s.serving.max_seqs,
                s.serving.kv_blocks,
                if s.serving.dense_weights {
                    "f32"
                } else {
                    "Q4_1"
                }
            ),
        ),
    );
    rows.insert(
        1,
        (
            "evaluation",
            format!(
                "{correct}/{} correct ({:.0} %), p50 {}, {:.1} tokens/s, {} attempt(s)",
                e.cases.len(),
                e.accuracy * 100.0,
                secs(e.p50_ms),
                e.tokens_per_s,
                e.attempts
            ),
        ),
    );
    let impact: Vec<String> = s
        .impact
        .iter()
        .map(|b| {
            format!(
                "{}: {} break, {} informed{}",
                b.change,
                b.breaks,
                b.informed,
                b.max_severity
                    .as_deref()
                    .map_or_else(String::new, |x| format!(" ({x})"))
            )
        })
        .collect();
    rows.insert(2, ("impact", impact.join("; ")));
    rows.insert(3, ("approval", format!("by {}", s.approval.by)));
    rows.insert(
        4,
        (
            "rollout",
            format!(
                "joined {}; drained {}",
                list_or_none(&s.deploy.added),
                list_or_none(&s.deploy.drained)
            ),
        ),
    );
    let b = &s.burst;
    rows.insert(
        5,
        (
            "burst",
            format!(
                "{}/{} ok, {} at a time in {}: {:.2} req/s, {:.1} tokens/s; latency p50 {} p90 {} p99 {} max {}",
                b.succeeded,
                b.requests,
                b.concurrency,
                secs(b.wall_ms),
                b.requests_per_s,
                b.tokens_per_s,
                secs(b.p50_ms),
                secs(b.p90_ms),
                secs(b.p99_ms),
                secs(b.max_ms)
            ),
        ),
    );
    let spread: Vec<String> = b
        .per_replica
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    rows.insert(6, ("picks", spread.join(", ")));
    rows.insert(
        7,
        (
            "governance",
            format!(
                "{} checks, {} violation(s){}",
                s.lineage.checks.len(),
                s.lineage.violations.len(),
                if s.lineage.violations.is_empty() {
                    String::new()
                } else {
                    format!(": {}", s.lineage.violations.join("; "))
                }
            ),
        ),
    );
    rows.insert(
        8,
        (
            "lineage",
            format!(
                "{} nodes, {} edges; {}",
                s.lineage.nodes,
                s.lineage.edges,
                s.lineage.files.join(", ")
            ),
        ),
    );
    rows.insert(9, ("this run", this_run.to_owned()));
    say(&format!("\n== {} finished ==", s.workflow));
    for (label, text) in rows.values() {
        say(&format!("  {label:<11} {text}"));
    }
}
