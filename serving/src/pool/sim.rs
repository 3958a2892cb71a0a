//! A deterministic discrete-event simulation of many client-side balancers in front of a fleet
//! of continuously batching replicas, used to compare selection policies at the reference scale.
//!
//! The model, in brief:
//! - Requests arrive as a Poisson process and each goes to one of `balancers` front-ends chosen
//!   uniformly. A front-end picks a replica with the policy under test, using the fleet's load
//!   as last published (every `info_period`) plus what it has itself sent since then; it does
//!   not see other front-ends' recent requests. That staleness is what makes join-the-shortest-
//!   queue herd.
//! - A replica runs iteration-level batching: each step admits waiting requests up to
//!   `max_batch` running sequences, prefills their prompts, and decodes one token for every
//!   running sequence. A step costs `step_overhead + decode_cost_per_sequence × batch +
//!   prefill_cost_per_token × new prompt tokens`, multiplied by the replica's slowness.
//! - A fraction of replicas is slower than the rest; one replica degrades at `degrade_at`;
//!   one replica fails at `fail_at`. When a replica fails, its requests that have not produced
//!   a token are retried once on another replica; those that have are lost. A front-end sends
//!   to a dead replica only until `eject_after` consecutive connection failures, each retried
//!   once elsewhere.
//!
//! Everything is driven by one seeded generator, so the same configuration gives the same report.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::metrics::{LatencySummary, empty_counts, record_into};
use super::picker::{Policy, SplitMix, pick};
use crate::error::{Error, Result};

/// The simulated workload, fleet and balancers.
///
/// Construct with [`SimConfig::default`] (the reference scenario) and adjust fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SimConfig {
    /// Seed for every random choice.
    pub seed: u64,
    /// Offered load, requests per second.
    pub qps: f64,
    /// How long requests arrive for (the simulation then runs until all have finished).
    pub duration: Duration,
    /// Requests arriving before this are left out of the latency percentiles.
    pub warmup: Duration,
    /// Fleet size.
    pub replicas: usize,
    /// Prompt tokens per request.
    pub input_tokens: u32,
    /// Mean output tokens per request (uniform between half and one and a half times this).
    pub output_tokens: u32,
    /// Most sequences a replica decodes at once.
    pub max_batch: u32,
    /// Fixed cost of one batching step.
    pub step_overhead: Duration,
    /// Cost per running sequence per step.
    pub decode_cost_per_sequence: Duration,
    /// Cost per prompt token prefilled in a step.
    pub prefill_cost_per_token: Duration,
    /// Fraction of replicas that are slower than the rest.
    pub slow_fraction: f64,
    /// How much slower they are (step costs are multiplied by this).
    pub slow_factor: f64,
    /// When one replica (index `replicas / 3`) degrades, if ever.
    pub degrade_at: Option<Duration>,
    /// How much slower it becomes.
    pub degrade_factor: f64,
    /// When one replica (index `2 × replicas / 3`) fails, if ever.
    pub fail_at: Option<Duration>,
    /// Independent client-side balancers (front-end processes), each with its own pool.
    pub balancers: usize,
    /// How often load information is published to the balancers.
    pub info_period: Duration,
    /// Consecutive connection failures after which a balancer stops using a replica.
    pub eject_after: u32,
    /// Width of the time buckets in the latency timeline.
    pub timeline_bucket: Duration,
}

impl Default for SimConfig {
    /// The reference scenario: 200,000 queries/s of 50 in / 50 out tokens over 170 replicas of
    /// about 1,250 queries/s each at full batch, 64 front-ends seeing load 100 ms late, 10% of
    /// replicas 1.5x slower, one replica 4x slower from the middle of the run.
    fn default() -> Self {
        Self {
            seed: 7,
            qps: 200_000.0,
            duration: Duration::from_secs(20),
            warmup: Duration::from_secs(2),
            replicas: 170,
            input_tokens: 50,
            output_tokens: 50,
            max_batch: 256,
            step_overhead: Duration::from_micros(1_000),
            decode_cost_per_sequence: Duration::from_micros(10),
            prefill_cost_per_token: Duration::from_micros(2),
            slow_fraction: 0.1,
            slow_factor: 1.5,
            degrade_at: Some(Duration::from_secs(10)),
            degrade_factor: 4.0,
            fail_at: None,
            balancers: 64,
            info_period: Duration::from_millis(100),
            eject_after: 3,
            timeline_bucket: Duration::from_millis(500),
        }
    }
}

/// The outcome of one simulated run under one policy.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SimPolicyReport {
    /// The policy.
    pub policy: Policy,
    /// Fleet size.
    pub replicas: usize,
    /// Requests that arrived.
    pub requests: u64,
    /// Requests that finished.
    pub completed: u64,
    /// Requests lost (their replica failed after their first token, or the retry failed too).
    pub failed: u64,
    /// Requests retried on a second replica.
    pub retried: u64,
    /// End-to-end latency of finished requests that arrived after the warm-up.
    pub latency: LatencySummary,
    /// Time to first token of the same requests.
    pub ttft: LatencySummary,
    /// The longest waiting queue (requests not yet admitted to a batch) on any replica.
    pub max_queue_depth: usize,
    /// 99th-percentile latency of requests by arrival time: `(bucket start, p99)`.
    pub timeline: Vec<(Duration, Duration)>,
}

impl SimPolicyReport {
    /// Finished requests over arrived requests.
    pub fn success_rate(&self) -> f64 {
        if self.requests == 0 {
            1.0
        } else {
            self.completed as f64 / self.requests as f64
        }
    }
}

/// One run of every policy on the same configuration.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct SimReport {
    /// The configuration.
    pub config: SimConfig,
    /// One report per policy, in [`Policy::ALL`] order.
    pub policies: Vec<SimPolicyReport>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl SimConfig {
    /// Queries per second one normal replica sustains at full batch.
    pub fn capacity_per_replica(&self) -> f64 {
        let b = f64::from(self.max_batch);
        let out = f64::from(self.output_tokens.max(1));
        let step = self.step_overhead.as_secs_f64()
            + b * self.decode_cost_per_sequence.as_secs_f64()
            + b / out * f64::from(self.input_tokens) * self.prefill_cost_per_token.as_secs_f64();
        b / (out * step)
    }

    /// Each replica's step-cost multiplier, drawn first from the run's generator.
    fn slowness(&self, rng: &mut SplitMix) -> Vec<f64> {
        (0..self.replicas)
            .map(|_| {
                if rng.unit() < self.slow_fraction {
                    self.slow_factor
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// Queries per second the whole fleet sustains at full batch once the degraded replica has
    /// degraded and the failed one has failed: an upper bound no policy can beat.
    pub fn fleet_capacity(&self) -> f64 {
        let n = self.replicas;
        let cap = self.capacity_per_replica();
        self.slowness(&mut SplitMix::new(self.seed))
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                if self.fail_at.is_some() && i == 2 * n / 3 {
                    0.0
                } else if self.degrade_at.is_some() && i == n / 3 {
                    cap / (k * self.degrade_factor)
                } else {
                    cap / k
                }
            })
            .sum()
    }

    /// Checks that the configuration describes a finite simulation.
    ///
    /// # Errors
    /// [`Error::InvalidPoolConfig`] when a rate, factor or fraction is not a finite number in
    /// range, a count is zero, a period is under a microsecond, or the run would simulate more
    /// than a billion requests.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| {
            Err(Error::InvalidPoolConfig {
                reason: format!("simulation: {reason}"),
            })
        };
        let finite_pos = |x: f64| x.is_finite() && x > 0.0;
        if !finite_pos(self.qps) {
            return bad("qps must be a positive, finite number");
        }
        if self.qps * self.duration.as_secs_f64() > 1e9 {
            return bad("more than a billion requests");
        }
        if self.replicas == 0 || self.replicas > 1_000_000 || self.balancers == 0 {
            return bad("replicas must be in 1..=1000000 and balancers at least 1");
        }
        if self.max_batch == 0 || self.output_tokens == 0 {
            return bad("max_batch and output_tokens must be at least 1");
        }
        if !finite_pos(self.slow_factor) || !finite_pos(self.degrade_factor) {
            return bad("slow_factor and degrade_factor must be positive and finite");
        }
        if !(0.0..=1.0).contains(&self.slow_fraction) {
            return bad("slow_fraction must be within 0..=1");
        }
        if self.balancers > 100_000 || self.replicas.saturating_mul(self.balancers) > 100_000_000 {
            return bad(
                "at most 100000 balancers and 10^8 replicas × balancers (per-balancer load views)",
            );
        }
        let micro = Duration::from_micros(1);
        if self.duration.as_secs_f64() / self.timeline_bucket.as_secs_f64().max(1e-6) > 100_000.0 {
            return bad("at most 100000 timeline buckets");
        }
        if self.info_period < micro || self.timeline_bucket < micro {
            return bad("info_period and timeline_bucket must be at least 1 µs");
        }
        if self.step_overhead.is_zero()
            && self.decode_cost_per_sequence.is_zero()
            && self.prefill_cost_per_token.is_zero()
        {
            return bad("a batching step must cost some time");
        }
        Ok(())
    }

    /// Simulates one policy.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn run(&self, policy: Policy) -> Result<SimPolicyReport> {
        self.validate()?;
        Ok(World::new(self, policy).run())
    }

    /// Simulates every policy in [`Policy::ALL`].
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn run_all(&self) -> Result<SimReport> {
        Ok(SimReport {
            config: self.clone(),
            policies: Policy::ALL
                .iter()
                .map(|&p| self.run(p))
                .collect::<Result<_>>()?,
        })
    }

    /// The smallest fleet (between `min` and `max`) on which `policy` keeps p99 latency below
    /// `target`, by bisection (assuming more replicas never hurt), or `None` if even `max`
    /// replicas miss it.
    ///
    /// A fleet whose [`fleet_capacity`](Self::fleet_capacity) is below the offered load never
    /// counts: its queues grow without bound, however short the simulated run is.
    ///
    /// # Errors
    /// As [`validate`](Self::validate), for any fleet size tried.
    pub fn fleet_needed(
        &self,
        policy: Policy,
        target: Duration,
        min: usize,
        max: usize,
    ) -> Result<Option<usize>> {
        let meets = |n: usize| -> Result<bool> {
            let mut c = self.clone();
            c.replicas = n;
            Ok(c.fleet_capacity() > c.qps && c.run(policy)?.latency.p99 < target)
        };
        let (mut lo, mut hi) = (min.max(1), max.max(1));
        if !meets(hi)? {
            return Ok(None);
        }
        // Invariant: `hi` meets the target; everything below `lo` is unknown or fails.
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if meets(mid)? {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(Some(hi))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Arrival,
    StepEnd(u32),
    Refresh,
    Degrade,
    Fail,
}

#[derive(Debug, Clone, Copy, Default)]
struct Req {
    arrival: u64,
    frontend: u32,
    retried: bool,
    out: u32,
    first_token: bool,
}

#[derive(Debug, Default)]
struct Rep {
    waiting: VecDeque<u32>,
    /// `(step at whose end the sequence finishes, request)`.
    running: BinaryHeap<Reverse<(u64, u32)>>,
    admitted: Vec<u32>,
    steps: u64,
    busy: bool,
    slowness: f64,
    alive: bool,
    outstanding: u32,
}

struct World<'a> {
    cfg: &'a SimConfig,
    policy: Policy,
    rng: SplitMix,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    reqs: Vec<Req>,
    free: Vec<u32>,
    reps: Vec<Rep>,
    published: Vec<u32>,
    /// `balancers × replicas`: requests this balancer sent since the last publication.
    local: Vec<u32>,
    /// `balancers × replicas`: consecutive connection failures seen by this balancer.
    fails: Vec<u32>,
    rr: Vec<AtomicUsize>,
    latency: Vec<u64>,
    ttft: Vec<u64>,
    timeline: Vec<Vec<u64>>,
    requests: u64,
    completed: u64,
    failed: u64,
    retried: u64,
    max_queue: usize,
}

impl<'a> World<'a> {
    fn new(cfg: &'a SimConfig, policy: Policy) -> Self {
        let n = cfg.replicas;
        let b = cfg.balancers.max(1);
        let mut rng = SplitMix::new(cfg.seed);
        let reps = cfg
            .slowness(&mut rng)
            .into_iter()
            .map(|slowness| Rep {
                slowness,
                alive: true,
                ..Rep::default()
            })
            .collect();
        let buckets = (ns(cfg.duration) / ns(cfg.timeline_bucket).max(1) + 1) as usize;
        Self {
            cfg,
            policy,
            rng,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            reqs: Vec::new(),
            free: Vec::new(),
            reps,
            published: vec![0; n],
            local: vec![0; n * b],
            fails: vec![0; n * b],
            rr: (0..b).map(|f| AtomicUsize::new(f * n / b)).collect(),
            latency: empty_counts(),
            ttft: empty_counts(),
            timeline: vec![empty_counts(); buckets],
            requests: 0,
            completed: 0,
            failed: 0,
            retried: 0,
            max_queue: 0,
        }
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse((t, self.seq, ev)));
    }

    fn run(mut self) -> SimPolicyReport {
        let n = self.cfg.replicas;
        self.at(0, Ev::Arrival);
        self.at(0, Ev::Refresh);
        if let Some(t) = self.cfg.degrade_at {
            self.at(ns(t), Ev::Degrade);
        }
        if let Some(t) = self.cfg.fail_at {
            self.at(ns(t), Ev::Fail);
        }
        while let Some(Reverse((t, _, ev))) = self.heap.pop() {
            self.now = t;
            match ev {
                Ev::Arrival => self.arrival(),
                Ev::StepEnd(r) => self.step_end(r as usize),
                Ev::Refresh => self.refresh(),
                Ev::Degrade => {
                    if let Some(r) = self.reps.get_mut(n / 3) {
                        r.slowness *= self.cfg.degrade_factor;
                    }
                }
                Ev::Fail => self.fail_replica(2 * n / 3),
            }
        }
        let timeline = self
            .timeline
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    self.cfg.timeline_bucket * i as u32,
                    LatencySummary::from_counts(c).p99,
                )
            })
            .collect();
        SimPolicyReport {
            policy: self.policy,
            replicas: n,
            requests: self.requests,
            completed: self.completed,
            failed: self.failed,
            retried: self.retried,
            latency: LatencySummary::from_counts(&self.latency),
            ttft: LatencySummary::from_counts(&self.ttft),
            max_queue_depth: self.max_queue,
            timeline,
        }
    }

    fn arrival(&mut self) {
        let cfg = self.cfg;
        let frontend = self.rng.below(cfg.balancers.max(1)) as u32;
        let half = cfg.output_tokens / 2;
        let out = (half + self.rng.below(cfg.output_tokens as usize + 1) as u32).max(1);
        let req = Req {
            arrival: self.now,
            frontend,
            retried: false,
            out,
            first_token: false,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.reqs[i as usize] = req;
                i
            }
            None => {
                self.reqs.push(req);
                (self.reqs.len() - 1) as u32
            }
        };
        self.requests += 1;
        self.route(idx, None);
        let gap = -(1.0 - self.rng.unit()).ln() / cfg.qps.max(f64::MIN_POSITIVE);
        let next = self.now + (gap * 1e9) as u64;
        if next < ns(cfg.duration) {
            self.at(next, Ev::Arrival);
        }
    }

    fn route(&mut self, idx: u32, exclude: Option<usize>) {
        let n = self.cfg.replicas;
        let f = self.reqs[idx as usize].frontend as usize;
        let base = f * n;
        let eject_after = self.cfg.eject_after.max(1);
        let (rng, published, local, fails) =
            (&mut self.rng, &self.published, &self.local, &self.fails);
        let choice = pick(
            self.policy,
            n,
            &mut || rng.next_u64(),
            &self.rr[f],
            &mut |i| {
                if Some(i) == exclude || fails[base + i] >= eject_after {
                    None
                } else {
                    Some(u64::from(published[i] + local[base + i]))
                }
            },
        );
        match choice {
            None => self.retry_or_fail(idx, exclude),
            Some(r) => {
                self.local[base + r] += 1;
                self.send(idx, r);
            }
        }
    }

    fn send(&mut self, idx: u32, r: usize) {
        if !self.reps[r].alive {
            let f = self.reqs[idx as usize].frontend as usize;
            self.fails[f * self.cfg.replicas + r] += 1;
            self.retry_or_fail(idx, Some(r));
            return;
        }
        let rep = &mut self.reps[r];
        rep.waiting.push_back(idx);
        rep.outstanding += 1;
        // The queue is what waits beyond a full batch.
        if rep.running.len() >= self.cfg.max_batch as usize {
            self.max_queue = self.max_queue.max(rep.waiting.len());
        }
        if !rep.busy {
            self.start_step(r);
        }
    }

    fn retry_or_fail(&mut self, idx: u32, failed_on: Option<usize>) {
        let req = &mut self.reqs[idx as usize];
        if req.retried || failed_on.is_none() {
            self.failed += 1;
            self.free.push(idx);
        } else {
            req.retried = true;
            self.retried += 1;
            self.route(idx, failed_on);
        }
    }

    fn start_step(&mut self, r: usize) {
        let cfg = self.cfg;
        let rep = &mut self.reps[r];
        rep.busy = true;
        let this_step = rep.steps + 1;
        let mut prefill = 0u64;
        while rep.running.len() < cfg.max_batch as usize {
            let Some(idx) = rep.waiting.pop_front() else {
                break;
            };
            let out = u64::from(self.reqs[idx as usize].out);
            rep.running.push(Reverse((this_step + out - 1, idx)));
            rep.admitted.push(idx);
            prefill += u64::from(cfg.input_tokens);
        }
        let batch = rep.running.len() as f64;
        let cost = cfg.step_overhead.as_secs_f64()
            + batch * cfg.decode_cost_per_sequence.as_secs_f64()
            + prefill as f64 * cfg.prefill_cost_per_token.as_secs_f64();
        let end = self.now + (cost * rep.slowness * 1e9) as u64;
        self.at(end, Ev::StepEnd(r as u32));
    }

    fn step_end(&mut self, r: usize) {
        if !self.reps[r].alive {
            return;
        }
        let now = self.now;
        let warm = ns(self.cfg.warmup);
        let rep = &mut self.reps[r];
        rep.steps += 1;
        for idx in rep.admitted.drain(..) {
            let req = &mut self.reqs[idx as usize];
            req.first_token = true;
            if req.arrival >= warm {
                record_into(&mut self.ttft, Duration::from_nanos(now - req.arrival));
            }
        }
        while let Some(&Reverse((finish, idx))) = rep.running.peek() {
            if finish > rep.steps {
                break;
            }
            rep.running.pop();
            rep.outstanding -= 1;
            let req = self.reqs[idx as usize];
            let lat = Duration::from_nanos(now - req.arrival);
            if req.arrival >= warm {
                record_into(&mut self.latency, lat);
            }
            let bucket = (req.arrival / ns(self.cfg.timeline_bucket).max(1)) as usize;
            if let Some(t) = self.timeline.get_mut(bucket) {
                record_into(t, lat);
            }
            self.fails[req.frontend as usize * self.cfg.replicas + r] = 0;
            self.completed += 1;
            self.free.push(idx);
        }
        rep.busy = false;
        if !rep.waiting.is_empty() || !rep.running.is_empty() {
            self.start_step(r);
        }
    }

    fn refresh(&mut self) {
        for (p, r) in self.published.iter_mut().zip(&self.reps) {
            *p = r.outstanding;
        }
        self.local.fill(0);
        let next = self.now + ns(self.cfg.info_period).max(1);
        if next < ns(self.cfg.duration) {
            self.at(next, Ev::Refresh);
        }
    }

    fn fail_replica(&mut self, r: usize) {
        let Some(rep) = self.reps.get_mut(r) else {
            return;
        };
        rep.alive = false;
        rep.outstanding = 0;
        rep.admitted.clear();
        let mut lost: Vec<u32> = rep.waiting.drain(..).collect();
        lost.extend(rep.running.drain().map(|Reverse((_, idx))| idx));
        for idx in lost {
            if self.reqs[idx as usize].first_token {
                // Tokens were already streamed: retrying would duplicate output.
                self.failed += 1;
                self.free.push(idx);
            } else {
                self.retry_or_fail(idx, Some(r));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            qps: 5_000.0,
            replicas: 8,
            balancers: 4,
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(200),
            degrade_at: None,
            ..SimConfig::default()
        }
    }

    #[test]
    fn deterministic_and_complete() {
        let c = small();
        let a = c.run(Policy::PowerOfTwoChoices).unwrap();
        let b = c.run(Policy::PowerOfTwoChoices).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.completed + a.failed, a.requests);
        assert_eq!(a.failed, 0);
        assert!(a.requests > 9_000 && a.requests < 11_000, "{}", a.requests);
    }

    #[test]
    fn failure_loses_only_streamed_requests() {
        let mut c = small();
        c.fail_at = Some(Duration::from_secs(1));
        let r = c.run(Policy::PowerOfTwoChoices).unwrap();
        assert_eq!(r.completed + r.failed, r.requests);
        assert!(r.retried > 0);
        // At most what was running on one of eight replicas.
        assert!(r.failed < r.requests / 50, "{r:?}");
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut bad = Vec::new();
        for f in [
            |c: &mut SimConfig| c.qps = f64::INFINITY,
            |c: &mut SimConfig| c.qps = -1.0,
            |c: &mut SimConfig| c.qps = f64::NAN,
            |c: &mut SimConfig| c.replicas = 0,
            |c: &mut SimConfig| c.balancers = 0,
            |c: &mut SimConfig| c.info_period = Duration::ZERO,
            |c: &mut SimConfig| c.slow_fraction = 2.0,
            |c: &mut SimConfig| c.degrade_factor = f64::NAN,
            |c: &mut SimConfig| c.duration = Duration::from_secs(1_000_000),
            |c: &mut SimConfig| c.timeline_bucket = Duration::from_micros(1),
            |c: &mut SimConfig| c.balancers = 1_000_000,
        ] {
            let mut c = small();
            f(&mut c);
            bad.push(c);
        }
        for c in bad {
            assert!(
                matches!(c.run(Policy::Random), Err(Error::InvalidPoolConfig { .. })),
                "{c:?}"
            );
        }
    }

    #[test]
    fn capacity_matches_reference() {
        let cap = SimConfig::default().capacity_per_replica();
        assert!((1_100.0..1_400.0).contains(&cap), "{cap}");
    }
}
