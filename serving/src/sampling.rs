//! Turning logits into the next token: penalties, greedy or temperature sampling with top-k,
//! top-p and min-p filters, a small seeded PRNG, and per-token log-probabilities.

use std::collections::HashMap;

use crate::error::{Error, Result};

/// How to pick tokens and when to stop. Start from [`SamplingParams::greedy`] or
/// [`SamplingParams::default`] (greedy, 256 tokens) and adjust with the builder methods.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub(crate) temperature: f32,
    pub(crate) top_k: usize,
    pub(crate) top_p: f32,
    pub(crate) min_p: f32,
    pub(crate) repetition_penalty: f32,
    pub(crate) frequency_penalty: f32,
    pub(crate) presence_penalty: f32,
    pub(crate) seed: u64,
    pub(crate) max_tokens: usize,
    pub(crate) stop_tokens: Vec<u32>,
    pub(crate) stop_strings: Vec<String>,
    pub(crate) logprobs: Option<usize>,
    pub(crate) ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            max_tokens: 256,
            stop_tokens: Vec::new(),
            stop_strings: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

/// The most alternatives [`SamplingParams::logprobs`] may ask for.
pub const MAX_TOP_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Greedy decoding (always the most likely token), 256 tokens at most.
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Sampling temperature; `0` means greedy. Must be finite and non-negative. Temperatures
    /// below [`SamplingParams::MIN_TEMPERATURE`] count as `0`: the most likely token already
    /// takes all the probability there, and scaling logits by `1/t` would overflow to
    /// infinities (whose differences are NaN) on either sampler.
    pub fn temperature(mut self, t: f32) -> Self {
        self.temperature = if t > 0.0 && t < Self::MIN_TEMPERATURE {
            0.0
        } else {
            t
        };
        self
    }

    /// The smallest temperature that samples; positive ones below it are greedy.
    pub const MIN_TEMPERATURE: f32 = 1e-5;

    /// Keep only the `k` most likely tokens; `0` disables the filter.
    pub fn top_k(mut self, k: usize) -> Self {
        self.top_k = k;
        self
    }

    /// Keep the smallest set of tokens whose probability sums to at least `p`, in `(0, 1]`.
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }

    /// Drop tokens less likely than `p` times the most likely one; `p` in `[0, 1]`.
    pub fn min_p(mut self, p: f32) -> Self {
        self.min_p = p;
        self
    }

    /// Divide positive (multiply negative) logits of tokens already in the context by `p > 0`.
    pub fn repetition_penalty(mut self, p: f32) -> Self {
        self.repetition_penalty = p;
        self
    }

    /// Subtract `p` times a token's count among generated tokens from its logit.
    pub fn frequency_penalty(mut self, p: f32) -> Self {
        self.frequency_penalty = p;
        self
    }

    /// Subtract `p` from the logit of every token generated at least once.
    pub fn presence_penalty(mut self, p: f32) -> Self {
        self.presence_penalty = p;
        self
    }

    /// Seed of the request's random stream: the same seed and inputs give the same output.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The most tokens to generate (at least 1).
    pub fn max_tokens(mut self, n: usize) -> Self {
        self.max_tokens = n;
        self
    }

    /// Extra token ids that end generation (besides the model's end-of-sequence tokens).
    pub fn stop_tokens(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        self.stop_tokens = ids.into_iter().collect();
        self
    }

    /// Strings that end generation; the output is cut before the first match.
    pub fn stop_strings<S: Into<String>>(mut self, s: impl IntoIterator<Item = S>) -> Self {
        self.stop_strings = s.into_iter().map(Into::into).collect();
        self
    }

    /// Report each token's log-probability and the `top` most likely alternatives
    /// (at most [`MAX_TOP_LOGPROBS`]).
    pub fn logprobs(mut self, top: usize) -> Self {
        self.logprobs = Some(top);
        self
    }

    /// Keep generating past the model's end-of-sequence tokens (for benchmarks).
    pub fn ignore_eos(mut self, ignore: bool) -> Self {
        self.ignore_eos = ignore;
        self
    }

    /// The most tokens this request may generate.
    pub fn max_new_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Whether the device sampler can pick this request's tokens: it applies temperature,
    /// top-k, top-p and min-p, but no penalties and no log-probabilities.
    pub(crate) fn device_sampleable(&self) -> bool {
        self.repetition_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
            && self.logprobs.is_none()
    }

    /// Checks every parameter's range.
    ///
    /// # Errors
    /// Returns [`Error::InvalidSampling`] naming the first bad parameter.
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &'static str, reason: String| Err(Error::InvalidSampling { name, reason });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("{} is not a finite value >= 0", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} is not in [0, 1]", self.min_p));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(
                "repetition_penalty",
                format!("{} is not a finite value > 0", self.repetition_penalty),
            );
        }
        if !self.frequency_penalty.is_finite() || !self.presence_penalty.is_finite() {
            return bad("frequency_penalty", "penalties must be finite".into());
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        if let Some(n) = self.logprobs
            && n > MAX_TOP_LOGPROBS
        {
            return bad("logprobs", format!("{n} exceeds {MAX_TOP_LOGPROBS}"));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return bad("stop_strings", "a stop string is empty".into());
        }
        Ok(())
    }
}

/// A small, fast, seeded PRNG (SplitMix64). Each request owns one, so requests are
/// reproducible whatever else the engine is running.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// One alternative token and its log-probability.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    token: u32,
    logprob: f32,
}

impl TokenLogprob {
    /// The token id.
    pub fn token(&self) -> u32 {
        self.token
    }

    /// Its natural-log probability under the model (after penalties, before temperature).
    pub fn logprob(&self) -> f32 {
        self.logprob
    }
}

/// The outcome of sampling one position.
#[derive(Debug, Clone)]
pub(crate) struct Sampled {
    pub(crate) token: u32,
    pub(crate) logprob: Option<f32>,
    pub(crate) top: Vec<TokenLogprob>,
}

/// Per-sequence sampling state: the PRNG and counts of generated tokens.
#[derive(Debug, Clone)]
pub(crate) struct Sampler {
    rng: Rng,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed),
            counts: HashMap::new(),
        }
    }

    /// Picks the next token from `logits`; `context` is every token so far (prompt included).
    pub(crate) fn sample(
        &mut self,
        p: &SamplingParams,
        logits: &mut [f32],
        context: &[u32],
    ) -> Sampled {
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in context {
                if seen.insert(t)
                    && let Some(l) = logits.get_mut(t as usize)
                {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
        let token = if p.temperature == 0.0 {
            argmax(logits)
        } else {
            self.draw(p, logits)
        };
        let (logprob, top) = match p.logprobs {
            Some(n) => {
                let lse = log_sum_exp(logits);
                let lp = logits.get(token as usize).map(|l| l - lse);
                let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
                let n = n.min(idx.len());
                if n > 0 {
                    idx.select_nth_unstable_by(n - 1, |a, b| {
                        logits[*b as usize].total_cmp(&logits[*a as usize])
                    });
                }
                idx.truncate(n);
                idx.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
                let top = idx
                    .into_iter()
                    .map(|t| TokenLogprob {
                        token: t,
                        logprob: logits[t as usize] - lse,
                    })
                    .collect();
                (lp, top)
            }
            None => (None, Vec::new()),
        };
        *self.counts.entry(token).or_insert(0) += 1;
        Sampled {
            token,
            logprob,
            top,
        }
    }

    /// This token's settings for the device sampler (`cuda::ops::sample`), when the request
    /// needs nothing it lacks (no penalties, no log-probabilities); the uniform draw comes from
    /// this sequence's generator, one per sampled token as on the host (none for greedy). The
    /// device applies the host's rule in the same order, so a draw picks the same token up to
    /// float summation order; a seed therefore repeats its output on either path, not across
    /// them. The caller must then [`Sampler::record`] the token the device picked.
    pub(crate) fn device_params(
        &mut self,
        p: &SamplingParams,
    ) -> Option<crate::cuda::cuda_kernels::SampleParams> {
        use crate::cuda::cuda_kernels::SampleParams;
        if !p.device_sampleable() {
            return None;
        }
        if p.temperature == 0.0 {
            return Some(SampleParams::greedy());
        }
        let top_k = u32::try_from(p.top_k).unwrap_or(u32::MAX);
        // The largest f32 below 1: an f64 draw just under 1 rounds to 1.0 as f32.
        let u = (self.rng.next_f64() as f32).min(1.0 - f32::EPSILON / 2.0);
        SampleParams::new(p.temperature, top_k, p.top_p, p.min_p, u).ok()
    }

    /// Records a token picked by the device sampler, as [`Sampler::sample`] records its own.
    pub(crate) fn record(&mut self, token: u32) -> Sampled {
        *self.counts.entry(token).or_insert(0) += 1;
        Sampled {
            token,
            logprob: None,
            top: Vec::new(),
        }
    }

    fn draw(&mut self, p: &SamplingParams, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / p.temperature;
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (i as u32, l * inv_t))
            .collect();
        if cand.is_empty() {
            return argmax(logits);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|q| **q >= floor).count().max(1));
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.next_f64() as f32 * total;
        for i in 0..keep {
            r -= probs[i];
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    max + s.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_max_and_penalty_changes_it() {
        let mut s = Sampler::new(1);
        let p = SamplingParams::greedy();
        assert_eq!(s.sample(&p, &mut [0.1, 2.0, 1.9], &[]).token, 1);
        let p = p.repetition_penalty(2.0);
        assert_eq!(s.sample(&p, &mut [0.1, 2.0, 1.9], &[1]).token, 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_top_k_one_is_greedy() {
        let p = SamplingParams::default().temperature(1.0).seed(7);
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.seed);
            (0..20)
                .map(|_| s.sample(p, &mut logits.clone(), &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&p), run(&p));
        let k1 = run(&p.clone().top_k(1));
        assert!(k1.iter().all(|t| *t == argmax(&logits)));
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(
            SamplingParams::default()
                .temperature(-1.0)
                .validate()
                .is_err()
        );
        assert!(SamplingParams::default().top_p(0.0).validate().is_err());
        // Tiny temperatures are greedy (their 1/t would overflow); NaN and negatives are
        // still refused.
        for t in [1e-30, f32::MIN_POSITIVE, 1e-6] {
            let p = SamplingParams::default().temperature(t);
            assert_eq!(p.temperature, 0.0, "{t}");
            assert!(p.validate().is_ok());
        }
        let p = SamplingParams::default().temperature(SamplingParams::MIN_TEMPERATURE);
        assert_eq!(p.temperature, SamplingParams::MIN_TEMPERATURE);
        assert!(
            SamplingParams::default()
                .temperature(f32::NAN)
                .validate()
                .is_err()
        );
        assert!(
            SamplingParams::default()
                .temperature(-1e-6)
                .validate()
                .is_err()
        );
        assert!(SamplingParams::default().min_p(1.5).validate().is_err());
        assert!(SamplingParams::default().max_tokens(0).validate().is_err());
        assert!(SamplingParams::default().validate().is_ok());
    }
}
