//! The replica pool: spreads requests over replicas by power of two choices, follows a discovery
//! source, ejects unhealthy replicas, drains, and refuses work it cannot serve in time.
//!
//! The request path takes no lock: the member list is an immutable snapshot behind an
//! [`ArcSwap`], membership changes build a new snapshot and swap it in, and every per-request
//! counter lives on the chosen replica's slot.

mod discovery;
mod engine;
mod health;
mod metrics;
mod picker;
mod replica;
mod sim;

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub use discovery::{
    Discovery, DiscoveryError, DiscoveryEvent, EndpointStatus, Registry, RegistryWatch,
    StaticDiscovery,
};
pub use engine::{EngineReplica, PromptFormat};
pub use metrics::{LatencySummary, PoolStats, ReplicaState, ReplicaStats};
pub use picker::Policy;
pub use replica::{
    BoxFuture, Load, LoadTicket, LoadTracker, PoolRequest, Replica, ReplicaError, ReplicaErrorKind,
    ReplicaEvent, ReplicaId, TokenSender, TokenStream,
};
pub use sim::{SimConfig, SimPolicyReport, SimReport};

use crate::error::{Error, Result};
use health::{Eligibility, FailureOutcome, Health};
use metrics::SlotCounters;

const SERVING: u8 = 0;
const DRAINING: u8 = 1;
const UNHEALTHY: u8 = 2;
const REMOVED: u8 = 3;

/// How many removed replicas' counters are kept for the pool totals.
const RETIRED_KEPT: usize = 1024;

/// The pool's settings; see [`PoolBuilder`] for what each one means and its default.
#[derive(Debug, Clone)]
struct PoolConfig {
    policy: Policy,
    seed: Option<u64>,
    max_in_flight: u32,
    default_deadline: Duration,
    first_token_timeout: Duration,
    failure_threshold: u32,
    ejection_base: Duration,
    ejection_max: Duration,
    max_ejected_fraction: f64,
    outlier_factor: Option<f64>,
    outlier_min_latency: Duration,
    maintenance_interval: Duration,
    min_retry_after: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            policy: Policy::PowerOfTwoChoices,
            seed: None,
            max_in_flight: 256,
            default_deadline: Duration::from_secs(30),
            first_token_timeout: Duration::from_secs(10),
            failure_threshold: 5,
            ejection_base: Duration::from_secs(1),
            ejection_max: Duration::from_secs(60),
            max_ejected_fraction: 0.5,
            outlier_factor: Some(3.0),
            outlier_min_latency: Duration::from_millis(50),
            maintenance_interval: Duration::from_secs(1),
            min_retry_after: Duration::from_millis(10),
        }
    }
}

/// Counters that belong to no single replica (cold paths only, except `retries`).
#[derive(Debug, Default)]
struct PoolCounters {
    retries: AtomicU64,
    overloaded: AtomicU64,
    deadline_exceeded: AtomicU64,
    unavailable: AtomicU64,
    discovery_errors: AtomicU64,
}

/// State shared by the pool handle and every slot (so a request only clones its slot's `Arc`).
#[derive(Debug)]
struct Shared {
    cfg: PoolConfig,
    origin: Instant,
    ejected: AtomicUsize,
    members: AtomicUsize,
    shut_down: AtomicBool,
    all_idle: Notify,
    counters: PoolCounters,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One replica as the pool tracks it.
struct Slot {
    id: ReplicaId,
    replica: Arc<dyn Replica>,
    state: AtomicU8,
    in_flight: AtomicU32,
    health: Health,
    counters: SlotCounters,
    idle: Notify,
    shared: Arc<Shared>,
}

impl Slot {
    fn public_state(&self) -> ReplicaState {
        match self.state.load(Ordering::Acquire) {
            SERVING if self.health.is_ejected() => ReplicaState::Ejected,
            SERVING => ReplicaState::Serving,
            UNHEALTHY => ReplicaState::Unhealthy,
            _ => ReplicaState::Draining,
        }
    }

    fn stats(&self) -> ReplicaStats {
        let c = &self.counters;
        ReplicaStats {
            id: self.id,
            state: self.public_state(),
            // Every reservation ends in exactly one of these, or is still in flight.
            picks: c.successes.load(Ordering::Relaxed)
                + c.failures.load(Ordering::Relaxed)
                + c.cancelled.load(Ordering::Relaxed)
                + u64::from(self.in_flight.load(Ordering::Relaxed)),
            successes: c.successes.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            cancelled: c.cancelled.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            ejections: c.ejections.load(Ordering::Relaxed),
            latency: c.latency.summary(),
            ttft: c.ttft.summary(),
        }
    }

    /// Ejects this replica if the pool's cap allows; returns whether it did.
    fn eject(&self, reason_probe_failed: bool) -> bool {
        let sh = &self.shared;
        if !reason_probe_failed
            && !health::reserve_ejection(
                &sh.ejected,
                sh.members.load(Ordering::Acquire),
                sh.cfg.max_ejected_fraction,
            )
        {
            return false;
        }
        self.health
            .eject(sh.now_ns(), sh.cfg.ejection_base, sh.cfg.ejection_max);
        self.counters.ejections.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes the slot out of service for good (removed or replaced).
    fn retire(&self) {
        self.state.store(REMOVED, Ordering::Release);
        if self.health.clear() {
            self.shared.ejected.fetch_sub(1, Ordering::AcqRel);
        }
        self.idle.notify_waiters();
    }
}

/// The pool's state behind its handle.
struct Inner {
    members: ArcSwap<Vec<Arc<Slot>>>,
    /// Serialises membership changes; never taken on a request's path.
    writer: Mutex<Vec<Arc<Slot>>>,
    shared: Arc<Shared>,
    rng: picker::RngSource,
    rr: AtomicUsize,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data consistent before anything that can panic, so a
    // poisoned lock still guards valid data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Power-of-two-choices load balancer over a changing set of [`Replica`]s.
///
/// Each request goes to the cheaper (by [`Load::cost`]) of two replicas drawn at random among
/// those serving, not ejected and below their in-flight limit. Replicas come from the builder,
/// from a [`Discovery`] source, or from [`add_replica`](Self::add_replica) and friends; they
/// change while traffic flows. Cloning a `Pool` gives another handle to the same pool.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use keel_serving::{
///     BoxFuture, Load, LoadTracker, Pool, PoolRequest, Replica, ReplicaError, ReplicaEvent,
///     ReplicaId, TokenStream,
/// };
///
/// /// A replica that answers every prompt with "ok".
/// struct Echo(Arc<LoadTracker>);
///
/// impl Replica for Echo {
///     fn generate(
///         &self,
///         request: PoolRequest,
///     ) -> BoxFuture<'static, Result<TokenStream, ReplicaError>> {
///         let ticket = self.0.begin(request.prompt_tokens(), 1);
///         Box::pin(async move {
///             let (tx, stream) = TokenStream::channel(2);
///             tokio::spawn(async move {
///                 tx.send(Ok(ReplicaEvent::Token { text: "ok".into() })).await;
///                 ticket.finish();
///                 tx.send(Ok(ReplicaEvent::Finished { output_tokens: 1 })).await;
///             });
///             Ok(stream)
///         })
///     }
///
///     fn load(&self) -> Load {
///         self.0.load()
///     }
/// }
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
/// # rt.block_on(async {
/// let mut builder = Pool::builder();
/// for i in 0..3 {
///     let tracker = LoadTracker::new(Duration::from_secs(10));
///     builder = builder.replica(ReplicaId::new(i), Arc::new(Echo(tracker)));
/// }
/// let pool = builder.build()?;
/// let out = pool.generate(PoolRequest::new("hello", 8)).await?.collect().await?;
/// assert_eq!(out.text, "ok");
/// assert_eq!(pool.stats().successes, 1);
/// pool.shutdown().await;
/// # Ok::<(), keel_serving::Error>(())
/// # })?;
/// # Ok(())
/// # }
/// ```
///
/// # Guarantees
/// - Picking takes no lock and allocates nothing; membership changes never pause it.
/// - A request is retried at most once, and only before its first token.
/// - Every request ends with output or a typed [`Error`]: replica panics are caught, and the
///   first-token timeout and the deadline bound how long a hung replica can hold a request.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("replicas", &self.replica_ids())
            .field("policy", &self.inner.shared.cfg.policy)
            .finish()
    }
}

/// Builds a [`Pool`]; every setting has a default.
#[derive(Default)]
pub struct PoolBuilder {
    cfg: PoolConfig,
    replicas: Vec<(ReplicaId, Arc<dyn Replica>)>,
    discovery: Option<Box<dyn Discovery>>,
}

impl std::fmt::Debug for PoolBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("cfg", &self.cfg)
            .field("replicas", &self.replicas.len())
            .field("discovery", &self.discovery.is_some())
            .finish()
    }
}

impl PoolBuilder {
    /// Seeds the picker's random numbers, so a single-threaded run picks the same replicas every
    /// time (default: unseeded, per-thread generators).
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.cfg.seed = Some(seed);
        self
    }

    /// The selection policy (default [`Policy::PowerOfTwoChoices`]; the others exist to compare).
    #[must_use]
    pub fn policy(mut self, policy: Policy) -> Self {
        self.cfg.policy = policy;
        self
    }

    /// The most requests this pool keeps in flight on one replica (default 256): the bounded
    /// queue. When every eligible replica is at this limit, requests fail fast with
    /// [`Error::Overloaded`].
    #[must_use]
    pub fn max_in_flight_per_replica(mut self, n: u32) -> Self {
        self.cfg.max_in_flight = n;
        self
    }

    /// The deadline for requests that set none (default 30 s).
    #[must_use]
    pub fn default_deadline(mut self, d: Duration) -> Self {
        self.cfg.default_deadline = d;
        self
    }

    /// How long a replica may take to produce the first token before the pool gives up on it,
    /// counts a failure, and retries on another replica (default 10 s).
    #[must_use]
    pub fn first_token_timeout(mut self, d: Duration) -> Self {
        self.cfg.first_token_timeout = d;
        self
    }

    /// Consecutive failures that eject a replica (default 5).
    #[must_use]
    pub fn failure_threshold(mut self, n: u32) -> Self {
        self.cfg.failure_threshold = n;
        self
    }

    /// The first ejection lasts `base`; each further one doubles, up to `max`
    /// (defaults 1 s and 60 s). After the backoff one probe request decides whether it returns.
    #[must_use]
    pub fn ejection_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.cfg.ejection_base = base;
        self.cfg.ejection_max = max;
        self
    }

    /// The largest fraction of replicas ejected at once, rounded down (default 0.5, so a
    /// single replica is never ejected).
    #[must_use]
    pub fn max_ejected_fraction(mut self, f: f64) -> Self {
        self.cfg.max_ejected_fraction = f;
        self
    }

    /// Ejects a replica whose peak-EWMA latency exceeds `factor` times the median of the
    /// others' and `min_latency` (defaults 3.0 and 50 ms); checked every maintenance interval
    /// and by [`Pool::eject_outliers`]. `None` turns latency ejection off.
    #[must_use]
    pub fn latency_outliers(mut self, factor: Option<f64>, min_latency: Duration) -> Self {
        self.cfg.outlier_factor = factor;
        self.cfg.outlier_min_latency = min_latency;
        self
    }

    /// How often the background task checks for latency outliers (default 1 s).
    #[must_use]
    pub fn maintenance_interval(mut self, d: Duration) -> Self {
        self.cfg.maintenance_interval = d;
        self
    }

    /// Adds a replica from the start (a static list).
    #[must_use]
    pub fn replica(mut self, id: ReplicaId, replica: Arc<dyn Replica>) -> Self {
        self.replicas.push((id, replica));
        self
    }

    /// Follows a discovery source: its events are applied by a background task.
    #[must_use]
    pub fn discovery(mut self, source: impl Discovery) -> Self {
        self.discovery = Some(Box::new(source));
        self
    }

    /// Builds the pool. Background tasks (discovery, latency-outlier checks) are spawned on the
    /// current tokio runtime; outside a runtime the pool still works, without latency-outlier
    /// checks, and [`Pool::eject_outliers`] can be called by hand.
    ///
    /// # Errors
    /// [`Error::InvalidPoolConfig`] for a zero limit, threshold, deadline or interval, a
    /// fraction outside `0..=1`, an outlier factor not above 1, or a discovery source without
    /// a tokio runtime to follow it on.
    pub fn build(self) -> Result<Pool> {
        let c = &self.cfg;
        let bad = |reason: &str| {
            Err(Error::InvalidPoolConfig {
                reason: reason.to_owned(),
            })
        };
        if c.max_in_flight == 0 {
            return bad("max_in_flight_per_replica must be at least 1");
        }
        if c.failure_threshold == 0 {
            return bad("failure_threshold must be at least 1");
        }
        if c.default_deadline.is_zero() || c.first_token_timeout.is_zero() {
            return bad("deadlines and timeouts must be positive");
        }
        if c.maintenance_interval.is_zero() || c.ejection_base.is_zero() {
            return bad("maintenance_interval and the ejection backoff must be positive");
        }
        if c.ejection_max < c.ejection_base {
            return bad("the maximum ejection backoff is below the base");
        }
        if !(0.0..=1.0).contains(&c.max_ejected_fraction) {
            return bad("max_ejected_fraction must be within 0..=1");
        }
        if c.outlier_factor.is_some_and(|f| !f.is_finite() || f <= 1.0) {
            return bad("the latency outlier factor must be finite and above 1");
        }
        let runtime = tokio::runtime::Handle::try_current().ok();
        if self.discovery.is_some() && runtime.is_none() {
            return bad("a discovery source needs a tokio runtime to run on");
        }
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            ejected: AtomicUsize::new(0),
            members: AtomicUsize::new(0),
            shut_down: AtomicBool::new(false),
            all_idle: Notify::new(),
            counters: PoolCounters::default(),
            cfg: self.cfg,
        });
        let inner = Arc::new(Inner {
            members: ArcSwap::from_pointee(Vec::new()),
            writer: Mutex::new(Vec::new()),
            rng: picker::RngSource::new(shared.cfg.seed),
            rr: AtomicUsize::new(0),
            tasks: Mutex::new(Vec::new()),
            shared,
        });
        let pool = Pool { inner };
        for (id, r) in self.replicas {
            pool.add_replica(id, r);
        }
        if let Some(rt) = runtime {
            let mut tasks = lock(&pool.inner.tasks);
            if let Some(d) = self.discovery {
                tasks.push(rt.spawn(follow_discovery(Arc::downgrade(&pool.inner), d)));
            }
            if pool.inner.shared.cfg.outlier_factor.is_some() {
                tasks.push(rt.spawn(maintain(Arc::downgrade(&pool.inner))));
            }
        }
        Ok(pool)
    }
}

async fn follow_discovery(pool: std::sync::Weak<Inner>, mut source: Box<dyn Discovery>) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let event = source.next_event().await;
        let Some(inner) = pool.upgrade() else { return };
        let pool = Pool { inner };
        match event {
            None => return,
            Some(Ok(ev)) => {
                backoff = Duration::from_millis(10);
                pool.apply(ev);
            }
            Some(Err(_)) => {
                pool.inner
                    .shared
                    .counters
                    .discovery_errors
                    .fetch_add(1, Ordering::Relaxed);
                drop(pool);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn maintain(pool: std::sync::Weak<Inner>) {
    let period = match pool.upgrade() {
        Some(p) => p.shared.cfg.maintenance_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = pool.upgrade() else { return };
        Pool { inner }.eject_outliers();
    }
}

impl Pool {
    /// A builder with every setting at its default.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// Sends a request to one replica and returns its output stream once the first token
    /// has arrived.
    ///
    /// The replica is chosen by the pool's [`Policy`] among serving, non-ejected replicas below
    /// their in-flight limit. If that replica fails (or exceeds the first-token timeout) before
    /// producing anything, the request is retried once on a different replica; after the
    /// first token it is never retried, so the caller never sees duplicated output.
    ///
    /// # Errors
    /// - [`Error::PoolShutDown`] after [`shutdown`](Self::shutdown).
    /// - [`Error::NoReplicas`] when there are none (or all are draining).
    /// - [`Error::AllEjected`] when every replica is ejected or unhealthy.
    /// - [`Error::Overloaded`] when every eligible replica is at its in-flight limit; nothing
    ///   was queued, retry after the hint.
    /// - [`Error::PoolDeadlineExceeded`] when the deadline passed before the first token.
    /// - [`Error::ReplicaFailed`] when the replica (and the retry, if any) failed or rejected
    ///   the request.
    pub async fn generate(&self, request: PoolRequest) -> Result<PoolStream> {
        let sh = &self.inner.shared;
        let started = Instant::now();
        let budget = request.deadline().unwrap_or(sh.cfg.default_deadline);
        if budget.is_zero() {
            sh.counters
                .deadline_exceeded
                .fetch_add(1, Ordering::Relaxed);
            return Err(Error::PoolDeadlineExceeded { deadline: budget });
        }
        let deadline = started + budget;
        let mut excluded = None;
        let mut last_failure = None;
        for attempt in 0..2 {
            let res = match self.reserve_excluding(excluded) {
                Ok(r) => r,
                Err(e) => return Err(last_failure.unwrap_or(e)),
            };
            if attempt > 0 {
                sh.counters.retries.fetch_add(1, Ordering::Relaxed);
            }
            let id = res.replica();
            let timeout_at = Instant::now() + sh.cfg.first_token_timeout;
            let first_token_by = deadline.min(timeout_at);
            let started_on = start(&*res.slot.replica, request.clone());
            let err = match tokio::time::timeout_at(first_token_by, started_on).await {
                Ok(Ok((stream, first))) => {
                    res.slot.counters.ttft.record(started.elapsed());
                    return Ok(PoolStream {
                        res,
                        stream,
                        first: Some(first),
                        started,
                        deadline,
                        budget,
                        done: false,
                    });
                }
                Ok(Err(e)) => e,
                Err(_) if Instant::now() >= deadline => {
                    // The caller's own short deadline says nothing about the replica; only a
                    // replica that also missed the first-token timeout is held to account.
                    if timeout_at <= deadline {
                        res.fail(&ReplicaError::new(
                            ReplicaErrorKind::TimedOut,
                            "no first token before the request deadline",
                        ));
                    }
                    sh.counters
                        .deadline_exceeded
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(Error::PoolDeadlineExceeded { deadline: budget });
                }
                Err(_) => ReplicaError::new(
                    ReplicaErrorKind::TimedOut,
                    format!("no first token within {:?}", sh.cfg.first_token_timeout),
                ),
            };
            res.fail(&err);
            let retry = err.kind().is_retryable();
            last_failure = Some(Error::ReplicaFailed {
                replica: id,
                source: err,
            });
            if !retry {
                break;
            }
            excluded = Some(id);
        }
        Err(last_failure.unwrap_or(Error::NoReplicas))
    }

    /// Picks a replica and reserves one of its in-flight places, for callers that talk to the
    /// replica themselves (or measure the picker): report the outcome on the [`Reservation`].
    ///
    /// # Errors
    /// As [`generate`](Self::generate): [`Error::PoolShutDown`], [`Error::NoReplicas`],
    /// [`Error::AllEjected`] or [`Error::Overloaded`].
    pub fn reserve(&self) -> Result<Reservation> {
        self.reserve_excluding(None)
    }

    fn reserve_excluding(&self, excluded: Option<ReplicaId>) -> Result<Reservation> {
        let inner = &*self.inner;
        let sh = &*inner.shared;
        if sh.shut_down.load(Ordering::Acquire) {
            return Err(Error::PoolShutDown);
        }
        let members = inner.members.load();
        // Read the clock at most once, and only if some replica is ejected.
        let clock = std::cell::Cell::new(None);
        let now = || match clock.get() {
            Some(t) => t,
            None => {
                let t = sh.now_ns();
                clock.set(Some(t));
                t
            }
        };
        let max = sh.cfg.max_in_flight;
        for _ in 0..4 {
            let mut rng = || inner.rng.next_u64();
            let mut cost = |i: usize| -> Option<u64> {
                let s = members.get(i)?;
                let ours = s.in_flight.load(Ordering::Relaxed);
                if Some(s.id) == excluded
                    || s.state.load(Ordering::Acquire) != SERVING
                    || ours >= max
                {
                    return None;
                }
                match s.health.eligibility(now) {
                    // The replica's own count may lag (or be absent for a remote endpoint
                    // that reports nothing), so the pool's count is a floor.
                    Eligibility::Ok => {
                        let mut load = s.replica.load();
                        load.in_flight = load.in_flight.max(ours);
                        Some(load.cost())
                    }
                    // A replica due for a probe is tried first: one request decides its fate.
                    Eligibility::ProbeReady => Some(0),
                    Eligibility::No => None,
                }
            };
            let picked = picker::pick(sh.cfg.policy, members.len(), &mut rng, &inner.rr, &mut cost);
            let Some(slot) = picked.and_then(|i| members.get(i)) else {
                break;
            };
            let probe = match slot.health.eligibility(now) {
                Eligibility::Ok => false,
                Eligibility::ProbeReady if slot.health.claim_probe() => true,
                // Another request took the probe (or it was ejected) since we looked.
                _ => continue,
            };
            // The limit is re-checked after the increment: two pickers may both have seen the
            // last free place.
            if slot.in_flight.fetch_add(1, Ordering::AcqRel) >= max && !probe {
                release_in_flight(slot);
                continue;
            }
            return Ok(Reservation {
                slot: Arc::clone(slot),
                probe,
                settled: false,
            });
        }
        let err = self.why_unavailable(&members, excluded, now());
        let counter = match err {
            Error::Overloaded { .. } => &sh.counters.overloaded,
            _ => &sh.counters.unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Err(err)
    }

    /// Explains a failed pick (cold path).
    fn why_unavailable(
        &self,
        members: &[Arc<Slot>],
        excluded: Option<ReplicaId>,
        now: u64,
    ) -> Error {
        let sh = &self.inner.shared;
        if sh.shut_down.load(Ordering::Acquire) {
            return Error::PoolShutDown;
        }
        let mut candidates = 0;
        let mut ejected = 0;
        let mut saturated_hint: Option<Duration> = None;
        for s in members.iter().filter(|s| Some(s.id) != excluded) {
            candidates += 1;
            let state = s.state.load(Ordering::Acquire);
            if state == UNHEALTHY
                || (state == SERVING && s.health.eligibility(|| now) == Eligibility::No)
            {
                ejected += 1;
            } else if state == SERVING {
                // Serving and healthy, so it was full: estimate when one place frees up.
                let load = s.replica.load();
                let n = s.in_flight.load(Ordering::Relaxed).max(1);
                let est = load.peak_ewma_latency / n;
                saturated_hint = Some(saturated_hint.map_or(est, |h| h.min(est)));
            }
        }
        if let Some(hint) = saturated_hint {
            return Error::Overloaded {
                retry_after: hint.clamp(sh.cfg.min_retry_after, Duration::from_secs(1)),
            };
        }
        if candidates == 0 {
            Error::NoReplicas
        } else if ejected == candidates {
            Error::AllEjected { ejected }
        } else {
            Error::NoReplicas
        }
    }

    /// Adds a replica, or replaces the one with the same id (which finishes its in-flight
    /// requests and is then dropped). Traffic continues while the member list changes.
    pub fn add_replica(&self, id: ReplicaId, replica: Arc<dyn Replica>) {
        let slot = Arc::new(Slot {
            id,
            replica,
            state: AtomicU8::new(SERVING),
            in_flight: AtomicU32::new(0),
            health: Health::default(),
            counters: SlotCounters::default(),
            idle: Notify::new(),
            shared: Arc::clone(&self.inner.shared),
        });
        self.update_members(|list, retired| {
            match list.binary_search_by_key(&id, |s| s.id) {
                Ok(i) => {
                    let old = std::mem::replace(&mut list[i], slot);
                    old.retire();
                    retired.push(old);
                }
                Err(i) => list.insert(i, slot),
            }
            true
        });
    }

    /// Removes a replica at once: it takes no new requests; its in-flight requests finish or
    /// fail on their own.
    ///
    /// # Errors
    /// [`Error::UnknownReplica`] if it is not in the pool.
    pub fn remove_replica(&self, id: ReplicaId) -> Result<()> {
        let mut found = false;
        self.update_members(|list, retired| {
            if let Ok(i) = list.binary_search_by_key(&id, |s| s.id) {
                let old = list.remove(i);
                old.retire();
                retired.push(old);
                found = true;
            }
            found
        });
        if found {
            Ok(())
        } else {
            Err(Error::UnknownReplica { replica: id })
        }
    }

    /// Builds and publishes a new member list. `f` returns whether it changed anything.
    fn update_members(&self, f: impl FnOnce(&mut Vec<Arc<Slot>>, &mut Vec<Arc<Slot>>) -> bool) {
        let mut retired = lock(&self.inner.writer);
        let mut list: Vec<Arc<Slot>> = self.inner.members.load().as_ref().clone();
        if f(&mut list, &mut retired) {
            self.inner
                .shared
                .members
                .store(list.len(), Ordering::Release);
            self.inner.members.store(Arc::new(list));
            let excess = retired.len().saturating_sub(RETIRED_KEPT);
            retired.drain(..excess);
        }
    }

    /// Applies one discovery event (the background task calls this; it is public so callers
    /// with their own event loop can too). Events for unknown ids are ignored.
    pub fn apply(&self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Add { id, replica } => self.add_replica(id, replica),
            DiscoveryEvent::Remove { id } => {
                let _ = self.remove_replica(id);
            }
            DiscoveryEvent::Update { id, status } => {
                let _ = self.set_status(id, status);
            }
        }
    }

    /// Sets a replica's status: `Serving` takes new requests, `Draining` and `Unhealthy` do not.
    ///
    /// # Errors
    /// [`Error::UnknownReplica`] if it is not in the pool.
    pub fn set_status(&self, id: ReplicaId, status: EndpointStatus) -> Result<()> {
        let slot = self.slot(id)?;
        let state = match status {
            EndpointStatus::Serving => SERVING,
            EndpointStatus::Draining => DRAINING,
            EndpointStatus::Unhealthy => UNHEALTHY,
        };
        slot.state.store(state, Ordering::Release);
        Ok(())
    }

    fn slot(&self, id: ReplicaId) -> Result<Arc<Slot>> {
        let members = self.inner.members.load();
        members
            .binary_search_by_key(&id, |s| s.id)
            .ok()
            .and_then(|i| members.get(i))
            .cloned()
            .ok_or(Error::UnknownReplica { replica: id })
    }

    /// Drains a replica for a graceful rollout: it takes no new requests at once, this waits
    /// until its in-flight requests have finished, and then removes it from the pool.
    ///
    /// # Errors
    /// [`Error::UnknownReplica`] if it is not in the pool.
    pub async fn drain(&self, id: ReplicaId) -> Result<()> {
        let slot = self.slot(id)?;
        slot.state.store(DRAINING, Ordering::Release);
        wait_idle(&slot).await;
        // It may have been replaced meanwhile; remove only the slot we drained.
        self.update_members(|list, retired| {
            match list.iter().position(|s| Arc::ptr_eq(s, &slot)) {
                Some(i) => {
                    let old = list.remove(i);
                    old.retire();
                    retired.push(old);
                    true
                }
                None => false,
            }
        });
        Ok(())
    }

    /// Stops taking requests (new ones fail with [`Error::PoolShutDown`]), stops following
    /// discovery, and waits until every in-flight request has finished or been dropped.
    pub async fn shutdown(&self) {
        let sh = &self.inner.shared;
        sh.shut_down.store(true, Ordering::Release);
        for t in lock(&self.inner.tasks).drain(..) {
            t.abort();
        }
        loop {
            let notified = sh.all_idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn in_flight(&self) -> u64 {
        let members = self.inner.members.load();
        let retired = lock(&self.inner.writer);
        members
            .iter()
            .chain(retired.iter())
            .map(|s| u64::from(s.in_flight.load(Ordering::Acquire)))
            .sum()
    }

    /// Ejects replicas whose peak-EWMA latency is an outlier (see
    /// [`PoolBuilder::latency_outliers`]) and returns their ids. Needs at least three serving
    /// replicas with latency samples, and respects the cap on ejected replicas.
    pub fn eject_outliers(&self) -> Vec<ReplicaId> {
        let sh = &self.inner.shared;
        let Some(factor) = sh.cfg.outlier_factor else {
            return Vec::new();
        };
        let members = self.inner.members.load();
        let now = sh.now_ns();
        let mut lat: Vec<(Duration, &Arc<Slot>)> = members
            .iter()
            .filter(|s| {
                s.state.load(Ordering::Acquire) == SERVING
                    && s.health.eligibility(|| now) == Eligibility::Ok
            })
            .map(|s| (s.replica.load().peak_ewma_latency, s))
            .filter(|(l, _)| !l.is_zero())
            .collect();
        if lat.len() < 3 {
            return Vec::new();
        }
        lat.sort_by_key(|(l, _)| *l);
        let median = lat[lat.len() / 2].0;
        let scaled = Duration::try_from_secs_f64(median.as_secs_f64() * factor);
        let limit = scaled
            .unwrap_or(Duration::MAX)
            .max(sh.cfg.outlier_min_latency);
        lat.iter()
            .filter(|(l, _)| *l > limit)
            .filter(|(_, s)| s.eject(false))
            .map(|(_, s)| s.id)
            .collect()
    }

    /// The ids of the replicas currently in the pool (serving or not), in order.
    pub fn replica_ids(&self) -> Vec<ReplicaId> {
        self.inner.members.load().iter().map(|s| s.id).collect()
    }

    /// A snapshot of the pool's metrics (totals include replicas removed recently).
    pub fn stats(&self) -> PoolStats {
        let members = self.inner.members.load();
        let retired = lock(&self.inner.writer);
        let c = &self.inner.shared.counters;
        let mut lat = metrics::empty_counts();
        let mut ttft = metrics::empty_counts();
        let (mut picks, mut successes, mut failures, mut in_flight, mut ejections) =
            (0, 0, 0, 0, 0);
        for s in members.iter().chain(retired.iter()) {
            let sc = &s.counters;
            picks += sc.successes.load(Ordering::Relaxed)
                + sc.failures.load(Ordering::Relaxed)
                + sc.cancelled.load(Ordering::Relaxed)
                + u64::from(s.in_flight.load(Ordering::Relaxed));
            successes += sc.successes.load(Ordering::Relaxed);
            failures += sc.failures.load(Ordering::Relaxed);
            ejections += sc.ejections.load(Ordering::Relaxed);
            in_flight += u64::from(s.in_flight.load(Ordering::Relaxed));
            sc.latency.add_to(&mut lat);
            sc.ttft.add_to(&mut ttft);
        }
        PoolStats {
            picks,
            successes,
            replica_failures: failures,
            retries: c.retries.load(Ordering::Relaxed),
            overloaded: c.overloaded.load(Ordering::Relaxed),
            deadline_exceeded: c.deadline_exceeded.load(Ordering::Relaxed),
            unavailable: c.unavailable.load(Ordering::Relaxed),
            in_flight,
            ejections,
            discovery_errors: c.discovery_errors.load(Ordering::Relaxed),
            latency: LatencySummary::from_counts(&lat),
            ttft: LatencySummary::from_counts(&ttft),
            replicas: members.iter().map(|s| s.stats()).collect(),
        }
    }
}

async fn wait_idle(slot: &Slot) {
    loop {
        let notified = slot.idle.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if slot.in_flight.load(Ordering::Acquire) == 0 {
            return;
        }
        notified.await;
    }
}

fn release_in_flight(slot: &Slot) {
    if slot.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
        if slot.state.load(Ordering::Acquire) != SERVING {
            slot.idle.notify_waiters();
        }
        if slot.shared.shut_down.load(Ordering::Acquire) {
            slot.shared.all_idle.notify_waiters();
        }
    }
}

/// Starts `request` on `replica` and waits for its first event, turning a panic in the
/// replica's code into [`ReplicaErrorKind::Panicked`].
async fn start(
    replica: &dyn Replica,
    request: PoolRequest,
) -> std::result::Result<(TokenStream, ReplicaEvent), ReplicaError> {
    let panicked = || ReplicaError::new(ReplicaErrorKind::Panicked, "the replica panicked");
    let fut =
        catch_unwind(AssertUnwindSafe(|| replica.generate(request))).map_err(|_| panicked())?;
    let mut stream = CatchUnwind(fut).await.map_err(|()| panicked())??;
    match stream.next().await {
        Some(Ok(first)) => Ok((stream, first)),
        Some(Err(e)) => Err(e),
        None => Err(ReplicaError::new(
            ReplicaErrorKind::Failed,
            "the output stream ended before the first token",
        )),
    }
}

/// Polls a boxed future, catching a panic in its `poll` as `Err(())`.
struct CatchUnwind<T>(BoxFuture<'static, T>);

impl<T> Future for CatchUnwind<T> {
    type Output = std::result::Result<T, ()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(_) => Poll::Ready(Err(())),
        }
    }
}

/// One in-flight place on a replica, taken by [`Pool::reserve`] (or internally by
/// [`Pool::generate`]).
///
/// Report how the request went with [`succeed`](Self::succeed) or [`fail`](Self::fail); these
/// feed health and metrics. Dropping it without a report counts the request as cancelled.
/// Either way the place is released.
pub struct Reservation {
    slot: Arc<Slot>,
    probe: bool,
    settled: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("replica", &self.slot.id)
            .field("probe", &self.probe)
            .finish()
    }
}

impl Reservation {
    /// The chosen replica's id.
    pub fn replica(&self) -> ReplicaId {
        self.slot.id
    }

    /// The chosen replica.
    pub fn replica_handle(&self) -> &Arc<dyn Replica> {
        &self.slot.replica
    }

    /// Whether this request is the probe that decides if an ejected replica returns.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Reports success with the request's end-to-end latency.
    pub fn succeed(mut self, latency: Duration) {
        self.record_success(latency);
    }

    /// Reports a failure (which counts against the replica's health when its kind says so).
    pub fn fail(mut self, error: &ReplicaError) {
        self.record_failure(error);
    }

    fn record_success(&mut self, latency: Duration) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let s = &self.slot;
        s.counters.successes.fetch_add(1, Ordering::Relaxed);
        s.counters.latency.record(latency);
        if s.health.on_success(self.probe) {
            s.shared.ejected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn record_failure(&mut self, error: &ReplicaError) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let s = &self.slot;
        s.counters.failures.fetch_add(1, Ordering::Relaxed);
        if !error.kind().counts_against_health() {
            if self.probe {
                s.health.release_probe();
            }
            return;
        }
        match s
            .health
            .on_failure(self.probe, s.shared.cfg.failure_threshold)
        {
            FailureOutcome::Counted => {}
            FailureOutcome::Eject => {
                s.eject(false);
            }
            FailureOutcome::ProbeFailed => {
                s.eject(true);
            }
        }
    }

    /// Settles without touching health (the caller's own deadline ran out mid-stream).
    fn record_neutral(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        self.slot.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        if self.probe {
            self.slot.health.release_probe();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.record_neutral();
        }
        release_in_flight(&self.slot);
    }
}

/// The output of a request sent through [`Pool::generate`]: the first token has already
/// arrived.
///
/// Dropping it cancels the request on the replica.
#[derive(Debug)]
pub struct PoolStream {
    res: Reservation,
    stream: TokenStream,
    first: Option<ReplicaEvent>,
    started: Instant,
    deadline: Instant,
    budget: Duration,
    done: bool,
}

/// A finished request's output, from [`PoolStream::collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOutput {
    /// The replica that served it.
    pub replica: ReplicaId,
    /// The generated text.
    pub text: String,
    /// Tokens generated, as the replica counted them.
    pub output_tokens: u32,
}

impl PoolStream {
    /// The replica serving this request.
    pub fn replica(&self) -> ReplicaId {
        self.res.replica()
    }

    /// The next event; `None` after [`ReplicaEvent::Finished`] or an error.
    ///
    /// # Errors
    /// [`Error::ReplicaFailed`] if the replica failed mid-stream (never retried: tokens were
    /// already delivered), [`Error::PoolDeadlineExceeded`] if the request's deadline passed.
    pub async fn next(&mut self) -> Option<Result<ReplicaEvent>> {
        if self.done {
            return None;
        }
        let event = match self.first.take() {
            Some(first) => Ok(first),
            None => match tokio::time::timeout_at(self.deadline, self.stream.next()).await {
                Err(_) => {
                    self.done = true;
                    self.res.record_neutral();
                    let c = &self.res.slot.shared.counters;
                    c.deadline_exceeded.fetch_add(1, Ordering::Relaxed);
                    return Some(Err(Error::PoolDeadlineExceeded {
                        deadline: self.budget,
                    }));
                }
                Ok(Some(ev)) => ev,
                Ok(None) => Err(ReplicaError::new(
                    ReplicaErrorKind::Failed,
                    "the output stream ended before the request finished",
                )),
            },
        };
        match event {
            Ok(ev @ ReplicaEvent::Finished { .. }) => {
                self.done = true;
                self.res.record_success(self.started.elapsed());
                Some(Ok(ev))
            }
            Ok(ev) => Some(Ok(ev)),
            Err(e) => {
                self.done = true;
                self.res.record_failure(&e);
                Some(Err(Error::ReplicaFailed {
                    replica: self.res.replica(),
                    source: e,
                }))
            }
        }
    }

    /// Reads the stream to the end.
    ///
    /// # Errors
    /// As [`next`](Self::next).
    pub async fn collect(mut self) -> Result<PoolOutput> {
        let mut text = String::new();
        while let Some(ev) = self.next().await {
            match ev? {
                ReplicaEvent::Token { text: t } => text.push_str(&t),
                ReplicaEvent::Finished { output_tokens } => {
                    return Ok(PoolOutput {
                        replica: self.replica(),
                        text,
                        output_tokens,
                    });
                }
            }
        }
        Err(Error::ReplicaFailed {
            replica: self.replica(),
            source: ReplicaError::new(ReplicaErrorKind::Failed, "the stream ended early"),
        })
    }
}
