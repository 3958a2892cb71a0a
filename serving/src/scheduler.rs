//! The model thread: continuous batching at iteration level. Each step decodes one token for
//! every running sequence and fills the rest of a token budget with prefill chunks of waiting
//! sequences (first come, first served); when KV blocks run out the newest running sequence
//! is preempted and recomputed later.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::error::{Error, Result};
use crate::kv::{BlockPool, KvCache, blocks_for};
use crate::metrics::{LoadCounters, MetricsState};
use crate::model::{Model, RowOutput, SeqStep};
use crate::request::{FinishReason, StreamEvent, Summary, Timings, TokenDelta, Usage};
use crate::sampling::{Sampled, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;

/// Messages from the [`crate::Engine`] to its model thread.
#[derive(Debug)]
pub(crate) enum Command {
    Submit(Box<NewSeq>),
    Shutdown,
}

/// A validated, tokenized request.
#[derive(Debug)]
pub(crate) struct NewSeq {
    pub(crate) id: u64,
    pub(crate) tokens: Vec<u32>,
    pub(crate) params: SamplingParams,
    pub(crate) deadline: Option<Instant>,
    pub(crate) submitted: Instant,
    pub(crate) events: UnboundedSender<Result<StreamEvent>>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct SchedulerConfig {
    pub(crate) block_size: usize,
    pub(crate) kv_blocks: usize,
    pub(crate) max_batch_tokens: usize,
    pub(crate) max_seqs: usize,
    pub(crate) max_context: usize,
    pub(crate) prefix_caching: bool,
}

#[derive(Debug)]
struct Seq {
    id: u64,
    /// Prompt followed by every generated token.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Leading blocks already offered to the prefix cache.
    indexed: usize,
    params: SamplingParams,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    events: UnboundedSender<Result<StreamEvent>>,
    deadline: Option<Instant>,
    submitted: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    generated: usize,
    preemptions: u32,
    /// Bytes of generated text not yet valid UTF-8.
    pending: Vec<u8>,
    /// Generated text so far, and how much of it has been released to the caller.
    text: String,
    emitted: usize,
}

impl Seq {
    fn to_feed(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Appends decoded bytes to the text, keeping an incomplete UTF-8 tail pending.
    fn absorb(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                self.text.push_str(s);
                self.pending.clear();
            }
            Err(e) if e.error_len().is_some() => {
                self.text.push_str(&String::from_utf8_lossy(&self.pending));
                self.pending.clear();
            }
            Err(e) => {
                let n = e.valid_up_to();
                if let Ok(s) = std::str::from_utf8(&self.pending[..n]) {
                    self.text.push_str(s);
                }
                self.pending.drain(..n);
            }
        }
    }

    /// Text that can be released now, and whether a stop string ended generation.
    fn release(&mut self) -> (String, bool) {
        let stops = &self.params.stop_strings;
        if stops.is_empty() {
            let out = self.text[self.emitted..].to_string();
            self.emitted = self.text.len();
            return (out, false);
        }
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| p + from))
            .min();
        if let Some(pos) = hit {
            let pos = pos.max(self.emitted);
            let out = self.text[self.emitted..pos].to_string();
            self.emitted = pos;
            return (out, true);
        }
        let mut hold = 0;
        for s in stops {
            for k in (1..s.len()).rev() {
                if s.is_char_boundary(k) && self.text.ends_with(&s[..k]) {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let end = (self.text.len() - hold).max(self.emitted);
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        (out, false)
    }

    /// Everything not yet released, for the end of generation.
    fn flush(&mut self) -> String {
        if !self.pending.is_empty() {
            let tail = String::from_utf8_lossy(&self.pending).into_owned();
            self.text.push_str(&tail);
            self.pending.clear();
        }
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }
}

pub(crate) struct Scheduler {
    model: Model,
    cache: KvCache,
    alloc: BlockPool,
    cfg: SchedulerConfig,
    tokenizer: Arc<Tokenizer>,
    metrics: Arc<Mutex<MetricsState>>,
    load: Arc<LoadCounters>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    shutting_down: bool,
}

impl Scheduler {
    pub(crate) fn new(
        model: Model,
        cfg: SchedulerConfig,
        tokenizer: Arc<Tokenizer>,
        metrics: Arc<Mutex<MetricsState>>,
        load: Arc<LoadCounters>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let c = &model.config;
        let cache = KvCache::new(
            c.layers,
            cfg.kv_blocks,
            cfg.block_size,
            c.kv_dim(),
            device,
            model.host_kv(),
        )?;
        Ok(Self {
            model,
            cache,
            alloc: BlockPool::new(cfg.kv_blocks, cfg.prefix_caching),
            cfg,
            tokenizer,
            metrics,
            load,
            waiting: VecDeque::new(),
            running: Vec::new(),
            shutting_down: false,
        })
    }

    /// Runs until shut down (or the engine is dropped) and every accepted request is done.
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Command>) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                if self.shutting_down {
                    break;
                }
                // Idle: block until a request arrives rather than spin.
                match rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.shutting_down = true;
                        break;
                    }
                }
            }
            self.reap();
            self.step();
            self.publish();
        }
        self.publish();
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Shutdown => self.shutting_down = true,
            Command::Submit(n) => {
                let mut stop_ids = n.params.stop_tokens.clone();
                if !n.params.ignore_eos {
                    stop_ids.extend_from_slice(self.tokenizer.stop_tokens());
                }
                let prompt_len = n.tokens.len();
                self.waiting.push_back(Seq {
                    id: n.id,
                    tokens: n.tokens,
                    prompt_len,
                    computed: 0,
                    blocks: Vec::new(),
                    indexed: 0,
                    sampler: Sampler::new(n.params.seed),
                    params: n.params,
                    stop_ids,
                    events: n.events,
                    deadline: n.deadline,
                    submitted: n.submitted,
                    started: None,
                    first_token: None,
                    last_token: None,
                    generated: 0,
                    preemptions: 0,
                    pending: Vec::new(),
                    text: String::new(),
                    emitted: 0,
                });
                self.with_metrics(|m| m.m.requests_started += 1);
            }
        }
    }

    fn with_metrics(&self, f: impl FnOnce(&mut MetricsState)) {
        match self.metrics.lock() {
            Ok(mut m) => f(&mut m),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    fn finish_seq(&mut self, seq: Seq) {
        self.alloc.release(seq.blocks);
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Drops cancelled requests and fails those past their deadline, freeing their blocks.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut dead = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.events.is_closed() || s.deadline.is_some_and(|d| now >= d) {
                dead.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        for s in self.waiting.drain(..) {
            if s.events.is_closed() || s.deadline.is_some_and(|d| now >= d) {
                dead.push(s);
            } else {
                keep.push_back(s);
            }
        }
        self.waiting = keep;
        for s in dead {
            // Account first, so a caller who sees the error also sees its effects.
            let events = s.events.clone();
            let id = s.id;
            let cancelled = events.is_closed();
            self.with_metrics(|m| {
                if cancelled {
                    m.m.requests_cancelled += 1;
                } else {
                    m.m.requests_failed += 1;
                }
            });
            self.finish_seq(s);
            self.publish();
            if !cancelled {
                let _ = events.send(Err(Error::DeadlineExceeded { id }));
            }
        }
    }

    fn preempt(&mut self, mut s: Seq) {
        self.alloc.release(std::mem::take(&mut s.blocks));
        s.computed = 0;
        s.indexed = 0;
        s.preemptions += 1;
        self.waiting.push_front(s);
        self.with_metrics(|m| m.m.preemptions += 1);
    }

    /// Plans and runs one step.
    fn step(&mut self) {
        let t0 = Instant::now();
        let bs = self.cfg.block_size;
        let mut budget = self.cfg.max_batch_tokens;
        // (index into `running`, tokens fed this step)
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let s = &self.running[i];
            let chunk = s.to_feed().min(budget);
            let need = blocks_for(s.computed + chunk, bs).saturating_sub(s.blocks.len());
            while self.alloc.free_count() < need && self.running.len() > i + 1 {
                if let Some(victim) = self.running.pop() {
                    self.preempt(victim);
                }
            }
            if self.alloc.free_count() < need {
                let me = self.running.remove(i);
                self.preempt(me);
                continue;
            }
            if let Some(b) = self.alloc.allocate(need) {
                self.running[i].blocks.extend(b);
            }
            plan.push((i, chunk));
            budget -= chunk;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_seqs {
            // A sequence about to start takes the cached blocks of its longest known prefix.
            if let Some(s) = self.waiting.front_mut()
                && s.computed == 0
                && s.blocks.is_empty()
            {
                let bs = self.cfg.block_size;
                let reused = self.alloc.match_prefix(&s.tokens, bs);
                if !reused.is_empty() {
                    s.computed = reused.len() * bs;
                    s.indexed = reused.len();
                    s.blocks = reused;
                }
            }
            let Some(s) = self.waiting.front() else { break };
            let chunk = s.to_feed().min(budget);
            let need = blocks_for(s.computed + chunk, bs).saturating_sub(s.blocks.len());
            let Some(b) = self.alloc.allocate(need) else {
                // A waiting sequence never holds blocks: hand back the cached prefix it was
                // about to reuse (it matches again when there is room), so a full pool cannot
                // wedge on blocks nobody runs with.
                if let Some(s) = self.waiting.front_mut()
                    && !s.blocks.is_empty()
                {
                    let held = std::mem::take(&mut s.blocks);
                    s.computed = 0;
                    s.indexed = 0;
                    self.alloc.release(held);
                }
                break;
            };
            let Some(mut s) = self.waiting.pop_front() else {
                break;
            };
            if s.computed > 0 && s.started.is_none() {
                let hit = s.computed as u64;
                self.with_metrics(|m| m.m.prefix_cached_tokens += hit);
            }
            s.blocks.extend(b);
            if s.started.is_none() {
                s.started = Some(t0);
                let q = t0 - s.submitted;
                self.with_metrics(|m| {
                    m.queue_sum += q;
                    m.queue_n += 1;
                });
            }
            self.running.push(s);
            plan.push((self.running.len() - 1, chunk));
            budget -= chunk;
        }
        if plan.is_empty() {
            return;
        }

        let mut tokens = Vec::with_capacity(self.cfg.max_batch_tokens - budget);
        let mut steps = Vec::with_capacity(plan.len());
        for &(idx, chunk) in &plan {
            let s = &self.running[idx];
            tokens.extend_from_slice(&s.tokens[s.computed..s.computed + chunk]);
            steps.push(SeqStep {
                start_pos: s.computed,
                len: chunk,
                slots: self.cache.slots(&s.blocks, s.computed + chunk),
                want_logits: s.computed + chunk == s.tokens.len(),
            });
        }
        // Requests without penalties or log-probabilities get their token picked where the
        // logits are (on a GPU only ids then cross to the host); each draws its uniform from its
        // own generator, so a sequence's path never depends on what else is in the batch.
        // Greedy requests get the same treatment on the CPU kernels, whose pick reads the
        // logits buffer instead of a copied row.
        let device = self.model.samples_on_device();
        let greedy_here = self.model.picks_greedy();
        let mut sample = Vec::new();
        for (&(idx, _), step) in plan.iter().zip(&steps) {
            if step.want_logits {
                let s = &mut self.running[idx];
                let here = device || (greedy_here && s.params.temperature == 0.0);
                sample.push(if here && s.params.device_sampleable() {
                    s.sampler.device_params(&s.params)
                } else {
                    None
                });
            }
        }
        let result = self
            .model
            .forward_step(&tokens, &steps, &mut self.cache, &sample);
        let mut logits = match result {
            Ok(l) => l.into_iter(),
            Err(e) => {
                // Fail only this batch's requests; the engine keeps serving others.
                let reason = e.to_string();
                let mut idxs: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idxs.sort_unstable();
                let mut failed = Vec::new();
                for idx in idxs.into_iter().rev() {
                    let s = self.running.remove(idx);
                    failed.push(s.events.clone());
                    self.with_metrics(|m| m.m.requests_failed += 1);
                    self.finish_seq(s);
                }
                self.publish();
                for tx in failed {
                    let _ = tx.send(Err(Error::Execution {
                        reason: reason.clone(),
                    }));
                }
                return;
            }
        };

        let now = Instant::now();
        let mut finished = Vec::new();
        let mut generated = 0u64;
        let mut prefill = 0u64;
        for (&(idx, chunk), step) in plan.iter().zip(&steps) {
            let s = &mut self.running[idx];
            s.computed += chunk;
            self.alloc.register(
                &s.blocks,
                &s.tokens,
                s.computed,
                self.cfg.block_size,
                &mut s.indexed,
            );
            if !(chunk == 1 && s.tokens.len() > s.prompt_len) {
                prefill += chunk as u64;
            }
            if !step.want_logits {
                continue;
            }
            let sampled = match logits.next() {
                Some(RowOutput::Logits(mut row)) => {
                    s.sampler.sample(&s.params, &mut row, &s.tokens)
                }
                Some(RowOutput::Token(token)) => s.sampler.record(token),
                None => continue,
            };
            generated += 1;
            if let Some(done) = self.on_token(idx, sampled, now) {
                finished.push((idx, done));
            }
        }
        finished.sort_by_key(|f| f.0);
        // Summaries go out after the step's accounting, so a caller who has its summary also
        // sees the request's blocks freed and counted in the metrics.
        let mut done_events = Vec::new();
        for (idx, (reason, tail)) in finished.into_iter().rev() {
            let s = self.running.remove(idx);
            let summary = Summary {
                finish_reason: reason,
                usage: Usage {
                    prompt_tokens: s.prompt_len,
                    completion_tokens: s.generated,
                },
                timings: Timings {
                    queued: s.started.map_or_else(Default::default, |t| t - s.submitted),
                    time_to_first_token: s
                        .first_token
                        .map_or_else(Default::default, |t| t - s.submitted),
                    total: now - s.submitted,
                    preemptions: s.preemptions,
                },
                trailing_text: tail,
            };
            self.with_metrics(|m| m.m.requests_finished += 1);
            done_events.push((s.events.clone(), summary));
            self.finish_seq(s);
        }
        let batch = plan.len();
        let max_seqs = self.cfg.max_seqs;
        let used = self.alloc.used();
        let (running, waiting) = (self.running.len(), self.waiting.len());
        let graphs = self.model.graph_report();
        self.with_metrics(|m| {
            if let Some((stats, off)) = graphs {
                m.m.graph_captures = stats.captures;
                m.m.graph_replays = stats.replays;
                m.m.graphs_off = off;
            }
            let took = t0.elapsed();
            m.m.steps += 1;
            m.m.generated_tokens += generated;
            m.m.prefill_tokens += prefill;
            if prefill == 0 && generated > 0 {
                m.m.decode_only_steps += 1;
                m.decode_only_tokens += generated;
                m.decode_only_busy += took;
            }
            m.batch_sum += batch as u64;
            m.occupancy_sum += batch as f64 / max_seqs as f64;
            m.busy += took;
            m.m.kv_blocks_in_use = used;
            m.m.running = running;
            m.m.waiting = waiting;
        });
        self.publish();
        for (tx, summary) in done_events {
            let _ = tx.send(Ok(StreamEvent::Done(summary)));
        }
    }

    /// Handles a sampled token: emits it, and reports whether (and why) the sequence ended,
    /// with text still to release.
    fn on_token(
        &mut self,
        idx: usize,
        sampled: Sampled,
        now: Instant,
    ) -> Option<(FinishReason, String)> {
        let max_context = self.cfg.max_context;
        let tokenizer = self.tokenizer.clone();
        let s = &mut self.running[idx];
        let first = s.first_token.is_none();
        let itl = s.last_token.map(|t| now - t);
        s.last_token = Some(now);
        if first {
            s.first_token = Some(now);
        }
        let ttft = now - s.submitted;
        let done = if s.stop_ids.contains(&sampled.token) {
            Some((FinishReason::StopToken, s.flush()))
        } else {
            s.tokens.push(sampled.token);
            s.generated += 1;
            let bytes = tokenizer.token_bytes(sampled.token).unwrap_or_default();
            s.absorb(&bytes);
            let (mut text, stopped) = s.release();
            let reason = if stopped {
                Some(FinishReason::StopString)
            } else if s.generated >= s.params.max_tokens || s.tokens.len() >= max_context {
                text.push_str(&s.flush());
                Some(FinishReason::Length)
            } else {
                None
            };
            let _ = s.events.send(Ok(StreamEvent::Token(TokenDelta {
                token: sampled.token,
                text,
                logprob: sampled.logprob,
                top_logprobs: sampled.top,
            })));
            reason.map(|r| (r, String::new()))
        };
        self.with_metrics(|m| {
            if first {
                m.ttft_sum += ttft;
                m.ttft_n += 1;
            }
            if let Some(d) = itl {
                m.itl_sum += d;
                m.itl_n += 1;
            }
        });
        done
    }

    fn publish(&self) {
        let mut prefill = 0u64;
        let mut decode = 0u64;
        for s in self.running.iter().chain(self.waiting.iter()) {
            let feed = s.to_feed();
            if feed > 1 || s.computed == 0 {
                prefill += feed as u64;
            }
            decode += s.params.max_tokens.saturating_sub(s.generated) as u64;
        }
        self.load
            .queued_prefill_tokens
            .store(prefill, Ordering::Relaxed);
        self.load
            .outstanding_decode_tokens
            .store(decode, Ordering::Relaxed);
        let used = self.alloc.used();
        let (running, waiting) = (self.running.len(), self.waiting.len());
        self.with_metrics(|m| {
            m.m.kv_blocks_in_use = used;
            m.m.running = running;
            m.m.waiting = waiting;
        });
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .field("free_blocks", &self.alloc.free_count())
            .field("total_blocks", &self.alloc.total())
            .field("block_size", &self.cache.block_size())
            .finish()
    }
}
