//! Replica selection policies (power of two choices and the baselines it is compared with) and
//! the small, seedable random number generator they draw from.
//!
//! The policies work over indices and a cost callback that returns `None` for an ineligible
//! replica, so the pool and the simulator share them without sharing data structures.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// How a pool chooses a replica for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Policy {
    /// Draw two eligible replicas at random and take the one with the lower cost.
    #[default]
    PowerOfTwoChoices,
    /// Scan every replica and take the one with the lowest cost (join the shortest queue).
    LeastLoaded,
    /// Take an eligible replica uniformly at random.
    Random,
    /// Take eligible replicas in turn.
    RoundRobin,
}

impl Policy {
    /// Every policy, in the order reports list them.
    pub const ALL: [Policy; 4] = [
        Policy::PowerOfTwoChoices,
        Policy::LeastLoaded,
        Policy::Random,
        Policy::RoundRobin,
    ];

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::PowerOfTwoChoices => "p2c",
            Policy::LeastLoaded => "least-loaded",
            Policy::Random => "random",
            Policy::RoundRobin => "round-robin",
        }
    }
}

/// SplitMix64's output function: a bijective mix of a 64-bit counter.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// A uniform integer in `0..n` from 64 random bits (Lemire's multiply-shift; the bias is below
/// 2^-32 for the replica counts a pool sees).
pub(crate) fn below(bits: u64, n: usize) -> usize {
    ((u128::from(bits) * n as u128) >> 64) as usize
}

/// A single-owner SplitMix64 generator (used by the simulator and by the thread-local source).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix64(self.0)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        below(self.next_u64(), n)
    }

    /// A uniform float in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

thread_local! {
    static THREAD_RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()));
}

/// The pool's source of random bits.
///
/// Seeded pools share one atomic SplitMix64 counter, so a single-threaded test sees the same
/// sequence on every run. Unseeded pools use a per-thread generator, so concurrent pickers
/// never write to a shared cache line for their random numbers.
#[derive(Debug)]
pub(crate) enum RngSource {
    Seeded(AtomicU64),
    ThreadLocal,
}

impl RngSource {
    pub(crate) fn new(seed: Option<u64>) -> Self {
        match seed {
            Some(s) => Self::Seeded(AtomicU64::new(s)),
            None => Self::ThreadLocal,
        }
    }

    pub(crate) fn next_u64(&self) -> u64 {
        match self {
            Self::Seeded(state) => mix64(
                state
                    .fetch_add(GOLDEN, Ordering::Relaxed)
                    .wrapping_add(GOLDEN),
            ),
            Self::ThreadLocal => THREAD_RNG.with(|c| {
                let s = c.get().wrapping_add(GOLDEN);
                c.set(s);
                mix64(s)
            }),
        }
    }
}

/// Picks an index in `0..n` under `policy`.
///
/// `cost(i)` returns `None` when replica `i` is ineligible (draining, ejected, unhealthy,
/// excluded or saturated) and its cost otherwise. The result is always an index for which
/// `cost` returned `Some` during this call, or `None` when no replica is eligible.
///
/// Power of two choices draws pairs of distinct indices; when a draw hits ineligible replicas
/// it draws again (up to three pairs) and, failing that, falls back to a full scan, so a mostly
/// ejected fleet still finds its last healthy replicas. With one replica it takes that one if
/// eligible; with two it compares both.
pub(crate) fn pick(
    policy: Policy,
    n: usize,
    rng: &mut dyn FnMut() -> u64,
    rr: &AtomicUsize,
    cost: &mut dyn FnMut(usize) -> Option<u64>,
) -> Option<usize> {
    match n {
        0 => None,
        1 => cost(0).map(|_| 0),
        _ => match policy {
            Policy::PowerOfTwoChoices => p2c(n, rng, cost),
            Policy::LeastLoaded => least_loaded(n, below(rng(), n), cost),
            Policy::Random => random(n, rng, cost),
            Policy::RoundRobin => {
                let start = rr.fetch_add(1, Ordering::Relaxed) % n;
                (0..n).map(|k| (start + k) % n).find(|&i| cost(i).is_some())
            }
        },
    }
}

fn p2c(
    n: usize,
    rng: &mut dyn FnMut() -> u64,
    cost: &mut dyn FnMut(usize) -> Option<u64>,
) -> Option<usize> {
    let mut best: Option<(u64, usize)> = None;
    let mut seen = 0;
    for _ in 0..3 {
        let bits = rng();
        let a = below(bits, n);
        // The second index comes from the other half of the same draw, shifted past `a`.
        let mut b = below(mix64(bits), n - 1);
        if b >= a {
            b += 1;
        }
        for i in [a, b] {
            if let Some(c) = cost(i) {
                seen += 1;
                if best.is_none_or(|(bc, _)| c < bc) {
                    best = Some((c, i));
                }
            }
        }
        if seen >= 2 {
            break;
        }
    }
    match best {
        Some((_, i)) => Some(i),
        None => least_loaded(n, below(rng(), n), cost),
    }
}

fn least_loaded(
    n: usize,
    start: usize,
    cost: &mut dyn FnMut(usize) -> Option<u64>,
) -> Option<usize> {
    // Starting the scan at a random index breaks ties randomly instead of always favouring
    // the lowest index.
    let mut best: Option<(u64, usize)> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if let Some(c) = cost(i)
            && best.is_none_or(|(bc, _)| c < bc)
        {
            best = Some((c, i));
        }
    }
    best.map(|(_, i)| i)
}

fn random(
    n: usize,
    rng: &mut dyn FnMut() -> u64,
    cost: &mut dyn FnMut(usize) -> Option<u64>,
) -> Option<usize> {
    for _ in 0..4 {
        let i = below(rng(), n);
        if cost(i).is_some() {
            return Some(i);
        }
    }
    // Mostly ineligible: take a uniformly random eligible one by scanning from a random start.
    let start = below(rng(), n);
    (0..n).map(|k| (start + k) % n).find(|&i| cost(i).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(policy: Policy, costs: &[Option<u64>], seed: u64) -> Option<usize> {
        let mut r = SplitMix::new(seed);
        let rr = AtomicUsize::new(0);
        pick(policy, costs.len(), &mut || r.next_u64(), &rr, &mut |i| {
            costs[i]
        })
    }

    #[test]
    fn single_and_pair() {
        assert_eq!(run(Policy::PowerOfTwoChoices, &[Some(5)], 1), Some(0));
        assert_eq!(run(Policy::PowerOfTwoChoices, &[None], 1), None);
        for seed in 0..50 {
            assert_eq!(
                run(Policy::PowerOfTwoChoices, &[Some(9), Some(2)], seed),
                Some(1)
            );
            assert_eq!(run(Policy::LeastLoaded, &[Some(9), Some(2)], seed), Some(1));
        }
    }

    #[test]
    fn p2c_finds_the_last_eligible_replica() {
        let mut costs = vec![None; 64];
        costs[37] = Some(1);
        for seed in 0..50 {
            assert_eq!(run(Policy::PowerOfTwoChoices, &costs, seed), Some(37));
            assert_eq!(run(Policy::Random, &costs, seed), Some(37));
            assert_eq!(run(Policy::RoundRobin, &costs, seed), Some(37));
        }
    }
}
