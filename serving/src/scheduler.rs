//! The model thread: continuous batching at iteration level. Each step decodes one token for
//! every running sequence and fills the rest of a token budget with prefill chunks of waiting
//! sequences (first come, first served); when KV blocks run out the newest running sequence
//! is preempted and recomputed later. While the batch samples on the device, steps are
//! pipelined: the next is launched from the picked ids on the device before the host streams
//! them, with waiting sequences admitted into it as prefill chunks (`InFlight`,
//! `Scheduler::advance`, `Scheduler::plan_ahead`).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use crate::cuda::cuda_kernels::SampleParams;
use crate::error::{Error, Result};
use crate::kv::{BlockPool, KvCache, blocks_for};
use crate::metrics::{LoadCounters, MetricsState};
use crate::model::{DeviceIds, Model, RowOutput, SeqStep, StepTokens};
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
    /// Whether decode steps may be launched one ahead of reading their predecessor's tokens
    /// (`EngineBuilder::pipelined_decode`).
    pub(crate) pipelined_decode: bool,
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

/// A step launched on the device whose picked ids the host has not read yet (pipelined
/// decode); at most one exists. It feeds each of its sequences (`fed`) a chunk of `chunk`
/// tokens, `tokens[computed..computed + chunk]` at positions from `computed`, in cache slots of
/// blocks the sequence held when it was launched: one token for a sequence that decodes, a
/// prefill chunk for one admitted into a chained step. The rows of `ids` are the sequences that
/// want a token (`Fed::wants`: those whose chunk ends their known tokens), in batch order;
/// a prefill chunk that does not finish its prompt has no row. A sequence's `computed` advances
/// by its chunk when the step is collected.
///
/// While it is in flight, every running sequence is fed in it, in the same order (`running`
/// is a subsequence of `fed`): every running sequence that decodes has a row, and a prefilling
/// sequence admitted in it is running. Nothing joins `running` except while the step after it
/// is planned (`plan_ahead` admits waiting sequences into that step, after the sequences of
/// this one, and they have no entry here). A sequence may leave (it ended at the step before,
/// or was cancelled or expired): it is retired at once and its blocks go back to the pool at
/// once, and its entry is dead, discarded when the step is collected (never streamed or
/// counted). Freeing a block this step still writes is safe: every launch goes on
/// the device's one stream, so a later step that reuses the block is queued behind this one
/// and writes after it, and on the CPU a launched step has completed before `launch_step`
/// returns. The slot written is never in a block the prefix cache indexed: it is at or past the
/// sequence's `computed`, and only whole computed blocks are indexed.
struct InFlight {
    /// The ids its sampler picked, one per row (a sequence that wants a token), still on the
    /// device.
    ids: DeviceIds,
    /// Every sequence it feeds, in batch order.
    fed: Vec<Fed>,
    /// When its planning began, for the step metrics.
    t0: Instant,
}

/// One sequence's part of a launched step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fed {
    /// The sequence (`Seq::id`).
    seq: u64,
    /// How many tokens the step feeds it, from its `computed`.
    chunk: usize,
    /// Whether it wants a token from the step (and so has a row of the step's ids).
    wants: bool,
}

/// The step after the one in flight, planned before that one's ids are read: the running
/// sequences that go on past it, then waiting sequences admitted into it.
struct Ahead {
    steps: Vec<SeqStep>,
    /// One setting per step that wants a token, in order.
    params: Vec<SampleParams>,
    /// Per step, where its tokens come from: `Some(row)` of the step in flight's ids (one
    /// token: the sequence decodes), or `None` for its chunk of `host` (a prefill chunk).
    rows: Vec<Option<u32>>,
    /// The host-fed steps' tokens, in batch order.
    host: Vec<u32>,
    fed: Vec<Fed>,
    t0: Instant,
}

impl Ahead {
    /// Adds `s` to the step: `chunk` tokens from position `start`, its input token from `row`
    /// of the step in flight's ids (it decodes), or, with `row: None`, from its own `tokens`
    /// (a prefill chunk, uploaded with `host`). It wants a token when the chunk reaches the end
    /// of its known tokens (a decoding sequence's input token is not in `tokens` yet: it is
    /// read with the step in flight), and then draws its setting from its own sampler. `false`
    /// when it wants one and cannot sample on the device.
    fn feed(
        &mut self,
        s: &mut Seq,
        cache: &KvCache,
        start: usize,
        chunk: usize,
        row: Option<u32>,
    ) -> bool {
        let wants = row.is_some() || start + chunk == s.tokens.len();
        if row.is_none() {
            let tokens = s.tokens.get(start..start + chunk).unwrap_or_default();
            self.host.extend_from_slice(tokens);
        }
        self.steps.push(SeqStep {
            start_pos: start,
            len: chunk,
            slots: cache.slots(&s.blocks, start + chunk),
            want_logits: wants,
        });
        self.rows.push(row);
        self.fed.push(Fed {
            seq: s.id,
            chunk,
            wants,
        });
        if !wants {
            return true;
        }
        match s.sampler.device_params(&s.params) {
            Some(p) => {
                self.params.push(p);
                true
            }
            None => false,
        }
    }
}

/// A sequence that ended at a step: its index in `running`, why it ended, and the text still
/// to release.
type Finished = (usize, (FinishReason, String));

/// A finished request's summary and where it goes.
type DoneEvent = (UnboundedSender<Result<StreamEvent>>, Summary);

/// What applying one step's outputs did.
#[derive(Default)]
struct Absorbed {
    finished: Vec<Finished>,
    generated: u64,
    prefill: u64,
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
    in_flight: Option<InFlight>,
    /// When the last step's accounting ended (pipelined steps overlap; see `account`).
    last_step_end: Option<Instant>,
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
            in_flight: None,
            last_step_end: None,
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
    /// With a step in flight, a running sequence reaped here leaves the batch at once: its row
    /// of that step is dead (see `InFlight` on why its blocks may go back now), and the chain
    /// goes on for the others.
    fn reap(&mut self) {
        let now = Instant::now();
        // One look per sequence: whether it is dead, and whether because its stream was
        // dropped (cancelled) or its deadline passed. A stream dropped after its look is
        // reaped at the next turn.
        let look = |s: &Seq| {
            if s.events.is_closed() {
                Some(true)
            } else if s.deadline.is_some_and(|d| now >= d) {
                Some(false)
            } else {
                None
            }
        };
        let mut dead = Vec::new();
        let mut keep = Vec::with_capacity(self.running.len());
        for s in self.running.drain(..) {
            match look(&s) {
                Some(cancelled) => dead.push((s, cancelled)),
                None => keep.push(s),
            }
        }
        self.running = keep;
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        for s in self.waiting.drain(..) {
            match look(&s) {
                Some(cancelled) => dead.push((s, cancelled)),
                None => keep.push_back(s),
            }
        }
        self.waiting = keep;
        for (s, cancelled) in dead {
            // Account first, so a caller who sees the error also sees its effects.
            let events = s.events.clone();
            let id = s.id;
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
        self.settle();
    }

    /// Collects the step in flight once no running sequence is left in it (every row dead),
    /// so the thread never idles with a step unread.
    fn settle(&mut self) {
        if self.running.is_empty()
            && let Some(flight) = self.in_flight.take()
        {
            self.drain(flight);
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

    /// Plans and runs one step. With a step in flight (pipelined decode), collects it instead,
    /// launching the next one ahead when the batch can go on (see `advance`).
    fn step(&mut self) {
        if let Some(flight) = self.in_flight.take() {
            self.advance(flight);
            return;
        }
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
        let seats = self.cfg.max_seqs.saturating_sub(self.running.len());
        let admitted = self.admit(&mut budget, seats, t0, false);
        plan.extend(admitted);
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
        let want: Vec<bool> = steps.iter().map(|s| s.want_logits).collect();
        if let Some(params) = self.starts_chain(&plan, &want, &sample) {
            // The first step of a chain: launched with its ids left on the device, so that
            // `advance` can launch the next step from them before reading them.
            let launched =
                self.model
                    .launch_step(StepTokens::Host(&tokens), &steps, &mut self.cache, &params);
            match launched {
                Ok(ids) => {
                    // `starts_chain` checked that the plan is every running sequence in order.
                    let fed = plan
                        .iter()
                        .zip(&want)
                        .map(|(&(idx, chunk), &wants)| Fed {
                            seq: self.running[idx].id,
                            chunk,
                            wants,
                        })
                        .collect();
                    self.advance(InFlight { ids, fed, t0 });
                }
                Err(e) => self.fail(plan.iter().map(|p| p.0).collect(), &e),
            }
            return;
        }
        let outputs = match self
            .model
            .forward_step(&tokens, &steps, &mut self.cache, &sample)
        {
            Ok(rows) => rows,
            Err(e) => {
                // Fail only this batch's requests; the engine keeps serving others.
                self.fail(plan.iter().map(|p| p.0).collect(), &e);
                return;
            }
        };
        let now = Instant::now();
        let out = self.absorb(&plan, &want, outputs, now);
        self.account(t0, plan.len(), &out);
        let done = self.retire(out.finished, now);
        self.publish();
        Self::send_done(done);
    }

    /// Admits waiting sequences first come, first served, into a step being planned, while
    /// `budget` tokens and `seats` sequences are left: each takes the cached blocks of its
    /// longest known prefix (`BlockPool::match_prefix`), then a chunk of what it has left to
    /// compute and the free blocks that chunk needs. Never preempts: when the pool has too few
    /// free blocks, the front sequence waits (handing back the prefix it matched) and admission
    /// stops. Admitted sequences are pushed onto `running`, their queue time and prefix-cache
    /// hits counted; returns their (index into `running`, chunk). With `chained` (a step
    /// planned ahead, `plan_ahead`), admission also stops at a sequence that needs the host
    /// sampler, which the synchronous path runs.
    fn admit(
        &mut self,
        budget: &mut usize,
        mut seats: usize,
        t0: Instant,
        chained: bool,
    ) -> Vec<(usize, usize)> {
        let mut plan = Vec::new();
        while *budget > 0 && seats > 0 {
            if chained
                && !self
                    .waiting
                    .front()
                    .is_some_and(|s| s.params.device_sampleable())
            {
                break;
            }
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
            let bs = self.cfg.block_size;
            let chunk = s.to_feed().min(*budget);
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
            *budget -= chunk;
            seats -= 1;
        }
        plan
    }

    /// The sampling settings of a step that can start a pipelined chain, `None` for any other:
    /// pipelining is on and the model supports it, the step feeds every running sequence, in
    /// order (decode tokens, prefill chunks, or both: a chain can start at a mixed step, so a
    /// steady stream of arrivals does not keep it from starting), some sequence wants a token,
    /// and every one that does gets it from the device sampler.
    fn starts_chain(
        &self,
        plan: &[(usize, usize)],
        want: &[bool],
        sample: &[Option<SampleParams>],
    ) -> Option<Vec<SampleParams>> {
        let wanting = want.iter().filter(|&&w| w).count();
        let whole_batch = plan.len() == self.running.len()
            && want.len() == plan.len()
            && plan
                .iter()
                .enumerate()
                .all(|(i, &(idx, chunk))| idx == i && chunk > 0)
            && wanting > 0
            && sample.len() == wanting;
        if !(self.cfg.pipelined_decode && self.model.can_chain() && whole_batch) {
            return None;
        }
        sample.iter().copied().collect()
    }

    /// Whether a running sequence goes on past the step in flight, as far as the host can tell
    /// before reading it: not when that step's token reaches its `max_tokens` or the context
    /// limit (`on_token`'s length checks, one token on). A stop token or stop string is found
    /// only when the token is read.
    fn goes_on(&self, s: &Seq) -> bool {
        s.generated + 1 < s.params.max_tokens && s.tokens.len() + 1 < self.cfg.max_context
    }

    /// Whether the step after the one in flight may be launched before that one is collected:
    /// pipelining is on, the model supports it, it is not shutting down, and every running
    /// sequence samples on the device. (`plan_ahead` checks the rest: some sequence goes on, the
    /// batch fits one step's token budget, the pool has the blocks, and no waiting request that
    /// needs the host sampler could join.)
    fn may_chain(&self) -> bool {
        self.cfg.pipelined_decode
            && self.model.can_chain()
            && !self.shutting_down
            && self.running.iter().all(|s| s.params.device_sampleable())
    }

    /// Plans the step after `flight`, assuming every sequence in it goes on: first the running
    /// sequences that go on past it, in order (a sequence that wants a token there and is known
    /// to end with it, `goes_on`, is left out and draws nothing), then waiting sequences
    /// admitted into it (`admit`, first come, first served, never preempting). A sequence that
    /// decodes gets one token, the one `flight` picks for it (its row there), at the position
    /// after its chunk in flight; a sequence still prefilling gets its next chunk of host
    /// tokens, at least one, with the budget left after one token for each sequence that goes
    /// on; admissions share what is left. Blocks a position needs are taken now, and each
    /// sequence that wants a token gets the next draw from its own sampler (so a seed's draws
    /// stay in order). `None`, with no block taken and nothing drawn, when no sequence goes on,
    /// they outgrow the token budget, the pool has too few free blocks for them, or a waiting
    /// request that needs the host sampler could join; the next step then runs synchronously
    /// (which may preempt, or admit that request).
    fn plan_ahead(&mut self, flight: &InFlight) -> Option<Ahead> {
        let t0 = Instant::now();
        let bs = self.cfg.block_size;
        // (index into `running`, its row of the flight's ids when it decodes, the position
        // after its chunk in flight)
        let mut going: Vec<(usize, Option<u32>, usize)> = Vec::new();
        let mut at = 0;
        let mut row = 0u32;
        for (i, s) in self.running.iter().enumerate() {
            // `running` is a subsequence of the fed sequences, so one pass finds every entry.
            let (f, r) = loop {
                let f = flight.fed.get(at)?;
                at += 1;
                let r = row;
                if f.wants {
                    row += 1;
                }
                if f.seq == s.id {
                    break (f, r);
                }
            };
            let next = s.computed + f.chunk;
            if !f.wants {
                going.push((i, None, next));
            } else if self.goes_on(s) {
                going.push((i, Some(r), next));
            }
        }
        let budget = self.cfg.max_batch_tokens;
        if going.is_empty() || going.len() > budget {
            return None;
        }
        let mut spare = budget - going.len();
        let seats = self.cfg.max_seqs.saturating_sub(going.len());
        if seats > 0
            && spare > 0
            && self
                .waiting
                .front()
                .is_some_and(|s| !s.params.device_sampleable())
        {
            return None;
        }
        let mut chunks = Vec::with_capacity(going.len());
        let mut needs = Vec::with_capacity(going.len());
        for &(i, row, next) in &going {
            let s = &self.running[i];
            let chunk = match row {
                Some(_) => 1,
                None => {
                    let left = s.tokens.len().checked_sub(next).filter(|&n| n > 0)?;
                    let chunk = left.min(1 + spare);
                    spare -= chunk - 1;
                    chunk
                }
            };
            chunks.push(chunk);
            needs.push(blocks_for(next + chunk, bs).saturating_sub(s.blocks.len()));
        }
        let mut fresh = self.alloc.allocate(needs.iter().sum())?.into_iter();
        let mut ahead = Ahead {
            steps: Vec::with_capacity(going.len()),
            params: Vec::with_capacity(going.len()),
            rows: Vec::with_capacity(going.len()),
            host: Vec::new(),
            fed: Vec::with_capacity(going.len()),
            t0,
        };
        // `may_chain` and `admit` checked that every sequence samples on the device, so each
        // that wants a token has a setting; if one did not, the blocks stay with their
        // sequences (their next step uses them).
        let mut settled = true;
        for ((&(i, row, next), chunk), need) in going.iter().zip(chunks).zip(needs) {
            let s = &mut self.running[i];
            s.blocks.extend(fresh.by_ref().take(need));
            settled &= ahead.feed(s, &self.cache, next, chunk, row);
        }
        // Admissions go last: they join `running` now, after every sequence of the step in
        // flight. (Should nothing be launched after all, they are running sequences with
        // nothing computed yet, and the next synchronous step feeds them.)
        for (idx, chunk) in self.admit(&mut spare, seats, t0, true) {
            let s = &mut self.running[idx];
            let start = s.computed;
            settled &= ahead.feed(s, &self.cache, start, chunk, None);
        }
        settled.then_some(ahead)
    }

    /// Collects the step in flight and processes its tokens. When the batch may go on
    /// (`may_chain`), the next step is planned while the device still runs this one, for the
    /// sequences that go on past it and waiting sequences admitted into it (`plan_ahead`), and
    /// launched from this step's ids on the device (each decoding sequence's own row, with the
    /// admitted prefill chunks' host tokens mixed in) before they are read, so the device runs
    /// it while the host reads and streams this step's tokens. (On a GPU the read waits for
    /// this step only: its copy to page-locked memory was queued right behind it, ahead of the
    /// next launch.) A sequence that ends at this step (a stop token or stop string, found only
    /// now) is retired at once and its row of the step ahead is dead; the chain goes on for
    /// the others.
    fn advance(&mut self, flight: InFlight) {
        let ahead = if self.may_chain() {
            self.plan_ahead(&flight)
        } else {
            None
        };
        // The step ahead goes first: this step's ids were queued for the host right behind it
        // (`Model::launch_step`), so the read below waits for this step only, while the step
        // ahead keeps the device busy through the read and the streaming after it.
        let mut failure = None;
        let mut next = None;
        if let Some(a) = ahead {
            // A decode-only step takes its tokens from the picked ids alone (all of them, or
            // the rows of the sequences that go on); a step with prefill chunks mixes in host
            // tokens.
            let picked: Option<Vec<u32>> = a.rows.iter().copied().collect();
            let picked = match &picked {
                Some(rows) => {
                    let identity = rows.len() == flight.ids.len()
                        && rows.iter().enumerate().all(|(k, &r)| r as usize == k);
                    StepTokens::Picked {
                        ids: &flight.ids,
                        rows: (!identity).then_some(&rows[..]),
                    }
                }
                None => StepTokens::Mixed {
                    ids: &flight.ids,
                    rows: &a.rows,
                    host: &a.host,
                },
            };
            match self
                .model
                .launch_step(picked, &a.steps, &mut self.cache, &a.params)
            {
                Ok(ids) => {
                    next = Some(InFlight {
                        ids,
                        fed: a.fed,
                        t0: a.t0,
                    });
                    self.with_metrics(|m| m.m.pipelined_steps += 1);
                }
                Err(e) => failure = Some(e),
            }
        }
        let ids = match self.read(&flight) {
            Ok(ids) => ids,
            Err(e) => {
                // The whole batch fails, the step ahead with it (dropped unread: it runs
                // before anything launched later on the same stream, so the blocks it writes
                // may go back now).
                self.fail((0..self.running.len()).collect(), &e);
                return;
            }
        };
        let finished = self.absorb_decode(&flight, ids);
        // The sequences that ended leave now, their blocks back in the pool while the step
        // ahead may still write one of their slots: safe, see `InFlight`.
        let done = self.retire(finished, Instant::now());
        if let Some(e) = failure {
            // As when a synchronous step fails: the batch's remaining requests (all of
            // `running`: the sequences that went on and those admitted into the step that
            // failed) fail, and the engine keeps serving.
            self.fail((0..self.running.len()).collect(), &e);
        } else if let Some(next) = next {
            self.in_flight = Some(next);
        }
        self.settle();
        self.publish();
        Self::send_done(done);
    }

    /// Collects a step in flight whose batch goes no further (no step is launched from it),
    /// and retires the sequences that end at it.
    fn drain(&mut self, flight: InFlight) {
        let done = match self.read(&flight) {
            Ok(ids) => {
                let finished = self.absorb_decode(&flight, ids);
                self.retire(finished, Instant::now())
            }
            Err(e) => {
                self.fail((0..self.running.len()).collect(), &e);
                Vec::new()
            }
        };
        self.publish();
        Self::send_done(done);
    }

    /// Reads a launched step's ids back: on a GPU, the wait for the device.
    fn read(&self, flight: &InFlight) -> Result<Vec<u32>> {
        let ids = flight.ids.collect()?;
        let wanting = flight.fed.iter().filter(|f| f.wants).count();
        if ids.len() != wanting {
            return Err(Error::Execution {
                reason: format!(
                    "a launched step returned {} ids for {wanting} sequences that want one",
                    ids.len()
                ),
            });
        }
        Ok(ids)
    }

    /// Processes a launched step's ids (one per sequence of `flight` that wants a token, in
    /// order) and counts the step: every fed sequence's chunk is now computed, and each that
    /// wanted a token gets its row. An entry whose sequence is no longer running (it left while
    /// the step was in flight) is dead: dropped, never streamed or counted; a step with only
    /// dead entries is not counted at all. Returns the sequences that ended.
    fn absorb_decode(&mut self, flight: &InFlight, ids: Vec<u32>) -> Vec<Finished> {
        let mut plan = Vec::with_capacity(self.running.len());
        let mut want = Vec::with_capacity(self.running.len());
        let mut outputs = Vec::with_capacity(self.running.len());
        let mut ids = ids.into_iter();
        // `running` is a subsequence of the fed sequences, in order (sequences admitted into
        // the step after this one come last and are fed nowhere here), so one pass pairs them.
        let mut live = self.running.iter().enumerate().peekable();
        for f in &flight.fed {
            let token = if f.wants { ids.next() } else { None };
            if let Some(&(idx, _)) = live.peek().filter(|(_, s)| s.id == f.seq) {
                plan.push((idx, f.chunk));
                want.push(f.wants);
                outputs.extend(token.map(RowOutput::Token));
                live.next();
            }
        }
        if plan.is_empty() {
            return Vec::new();
        }
        let out = self.absorb(&plan, &want, outputs, Instant::now());
        self.account(flight.t0, plan.len(), &out);
        out.finished
    }

    /// Applies a step's outputs: each planned sequence's fed tokens are now in the cache, and
    /// each that wanted a token (`want`, per plan row) gets the next row of `outputs`, which is
    /// sampled if need be, streamed and checked against the stop conditions.
    fn absorb(
        &mut self,
        plan: &[(usize, usize)],
        want: &[bool],
        outputs: Vec<RowOutput>,
        now: Instant,
    ) -> Absorbed {
        let mut outputs = outputs.into_iter();
        let mut out = Absorbed::default();
        for (&(idx, chunk), &wanted) in plan.iter().zip(want) {
            let row = if wanted { outputs.next() } else { None };
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
                out.prefill += chunk as u64;
            }
            let sampled = match row {
                Some(RowOutput::Logits(mut row)) => {
                    s.sampler.sample(&s.params, &mut row, &s.tokens)
                }
                Some(RowOutput::Token(token)) => s.sampler.record(token),
                None => continue,
            };
            out.generated += 1;
            if let Some(done) = self.on_token(idx, sampled, now) {
                out.finished.push((idx, done));
            }
        }
        out
    }

    /// Removes the sequences that ended, frees their blocks and builds their summaries, to be
    /// sent after the step's accounting, so a caller who has its summary also sees the
    /// request's blocks freed and counted in the metrics.
    fn retire(&mut self, mut finished: Vec<Finished>, now: Instant) -> Vec<DoneEvent> {
        finished.sort_by_key(|f| f.0);
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
        done_events
    }

    fn send_done(done: Vec<DoneEvent>) {
        for (tx, summary) in done {
            let _ = tx.send(Ok(StreamEvent::Done(summary)));
        }
    }

    /// Fails the running sequences at `idxs` with `e` (a step that could not run): only they
    /// fail, and the engine keeps serving others.
    fn fail(&mut self, mut idxs: Vec<usize>, e: &Error) {
        let reason = e.to_string();
        idxs.sort_unstable();
        idxs.dedup();
        let mut failed = Vec::new();
        for idx in idxs.into_iter().rev() {
            if idx >= self.running.len() {
                continue;
            }
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
    }

    /// Counts one model step in the metrics.
    fn account(&mut self, t0: Instant, batch: usize, out: &Absorbed) {
        let now = Instant::now();
        // Pipelined steps overlap (the next is planned and launched before this one is
        // processed), so a step's time starts no earlier than the end of the previous step's,
        // and busy time is not counted twice.
        let start = self.last_step_end.map_or(t0, |end| end.max(t0));
        self.last_step_end = Some(now);
        let took = now.saturating_duration_since(start);
        let (generated, prefill) = (out.generated, out.prefill);
        let max_seqs = self.cfg.max_seqs;
        let graphs = self.model.graph_report();
        self.with_metrics(|m| {
            if let Some((stats, off)) = graphs {
                m.m.graph_captures = stats.captures;
                m.m.graph_replays = stats.replays;
                m.m.graphs_off = off;
            }
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
        });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RandomModel;
    use crate::cuda::cuda_kernels::Dtype;
    use candle_core::Device;
    use tokio::sync::mpsc::UnboundedReceiver;

    const BLOCK: usize = 4;

    /// A scheduler over a bf16 random model, which runs Keel's kernel path on the CPU (so
    /// steps can chain), with `kv_blocks` blocks of four and no prefix cache, so every block in
    /// use is held by exactly one sequence.
    fn scheduler(kv_blocks: usize, pipelined: bool) -> Scheduler {
        scheduler_with(kv_blocks, pipelined, 64)
    }

    /// `scheduler`, with a token budget of `max_batch_tokens` per step.
    fn scheduler_with(kv_blocks: usize, pipelined: bool, max_batch_tokens: usize) -> Scheduler {
        let spec = RandomModel::llama(64, 2, 4, 2, 96, 300)
            .unwrap()
            .seed(21)
            .dtype(Dtype::Bf16);
        let (model, tokenizer) = spec.build(&Device::Cpu).unwrap();
        assert!(model.can_chain());
        let cfg = SchedulerConfig {
            block_size: BLOCK,
            kv_blocks,
            max_batch_tokens,
            max_seqs: 8,
            max_context: 32,
            prefix_caching: false,
            pipelined_decode: pipelined,
        };
        let metrics = Arc::new(Mutex::new(MetricsState::new(kv_blocks)));
        let load = Arc::new(LoadCounters::default());
        Scheduler::new(model, cfg, Arc::new(tokenizer), metrics, load, &Device::Cpu).unwrap()
    }

    fn prompt(i: u32, len: u32) -> Vec<u32> {
        (0..len).map(|k| (k * 37 + i * 11 + 5) % 300).collect()
    }

    fn greedy(max_tokens: usize) -> SamplingParams {
        SamplingParams::greedy()
            .max_tokens(max_tokens)
            .ignore_eos(true)
    }

    fn submit(
        s: &mut Scheduler,
        id: u64,
        tokens: Vec<u32>,
        params: SamplingParams,
    ) -> UnboundedReceiver<Result<StreamEvent>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        s.load.in_flight.fetch_add(1, Ordering::Relaxed);
        s.handle(Command::Submit(Box::new(NewSeq {
            id,
            tokens,
            params,
            deadline: None,
            submitted: Instant::now(),
            events: tx,
        })));
        rx
    }

    /// The invariants between steps: while a step is in flight, every running sequence is fed
    /// in it, in order (entries of sequences that left are dead), with a chunk that starts at
    /// its `computed`, wants a token exactly when it ends the sequence's known tokens (so every
    /// decoding sequence has a row), and lies in blocks the sequence holds; and every block in
    /// use is held by a sequence (so a sequence that left gave its blocks back).
    fn check_invariants(s: &Scheduler) {
        if let Some(f) = &s.in_flight {
            assert_eq!(f.ids.len(), f.fed.iter().filter(|e| e.wants).count());
            assert!(
                !s.running.is_empty(),
                "a step in flight with every row dead"
            );
            let mut fed = f.fed.iter();
            for q in &s.running {
                let e = fed.find(|e| e.seq == q.id).unwrap_or_else(|| {
                    panic!(
                        "sequence {} is not fed in the step in flight ({:?})",
                        q.id, f.fed
                    )
                });
                assert!(e.chunk > 0);
                assert_eq!(e.wants, q.computed + e.chunk == q.tokens.len(), "{e:?}");
                assert!(q.computed + e.chunk <= q.tokens.len());
                assert!(q.blocks.len() >= blocks_for(q.computed + e.chunk, BLOCK));
            }
        }
        let held: usize = s
            .running
            .iter()
            .chain(&s.waiting)
            .map(|q| q.blocks.len())
            .sum();
        assert_eq!(
            s.alloc.used(),
            held,
            "a block in use that no sequence holds"
        );
    }

    /// One turn of the model thread's loop, then the invariants.
    fn turn(s: &mut Scheduler) {
        s.reap();
        s.step();
        check_invariants(s);
    }

    /// The tokens streamed so far and the summary, if it came.
    fn events(rx: &mut UnboundedReceiver<Result<StreamEvent>>) -> (Vec<u32>, Option<Summary>) {
        let mut tokens = Vec::new();
        while let Ok(event) = rx.try_recv() {
            match event.unwrap() {
                StreamEvent::Token(t) => tokens.push(t.token()),
                StreamEvent::Done(summary) => {
                    assert!(rx.try_recv().is_err(), "an event after the summary");
                    return (tokens, Some(summary));
                }
            }
        }
        (tokens, None)
    }

    fn metric(s: &Scheduler, f: impl Fn(&crate::EngineMetrics) -> u64) -> u64 {
        f(&s.metrics.lock().unwrap().m)
    }

    /// Runs `requests` (prompt, parameters) to the end, one turn at a time; returns each
    /// request's streamed tokens (checked against its usage), the running count and whether a
    /// step was in flight after each turn, and the scheduler for its metrics.
    fn run_turns(
        kv_blocks: usize,
        pipelined: bool,
        requests: &[(Vec<u32>, SamplingParams)],
    ) -> (Vec<Vec<u32>>, Vec<(usize, bool)>, Scheduler) {
        let mut s = scheduler(kv_blocks, pipelined);
        let mut rxs: Vec<_> = requests
            .iter()
            .zip(1..)
            .map(|((p, params), id)| submit(&mut s, id, p.clone(), params.clone()))
            .collect();
        let mut flights = Vec::new();
        while !(s.running.is_empty() && s.waiting.is_empty()) {
            turn(&mut s);
            flights.push((s.running.len(), s.in_flight.is_some()));
        }
        assert!(s.in_flight.is_none());
        assert_eq!(s.alloc.used(), 0);
        let outs = rxs
            .iter_mut()
            .map(|rx| {
                let (tokens, summary) = events(rx);
                assert_eq!(tokens.len(), summary.unwrap().usage.completion_tokens);
                tokens
            })
            .collect();
        (outs, flights, s)
    }

    #[test]
    fn the_step_ahead_falls_back_when_the_pool_cannot_hold_it() {
        // Two sequences of 9 + 16 tokens need six blocks of four each to finish (24 positions).
        // With eleven blocks, when both reach position 20 one of them must be preempted: the
        // chain cannot take the two blocks the step ahead needs, falls back, and the
        // synchronous step preempts, as it does without pipelining. With twelve, nothing is.
        let requests = [(prompt(0, 9), greedy(16)), (prompt(1, 9), greedy(16))];
        let go = |kv_blocks, pipelined| {
            let (outs, _, s) = run_turns(kv_blocks, pipelined, &requests);
            assert_eq!(metric(&s, |m| m.generated_tokens), 32);
            let preempted = metric(&s, |m| m.preemptions);
            (outs, preempted, metric(&s, |m| m.pipelined_steps))
        };
        let (one_by_one, preempted, none) = go(11, false);
        let (tight, preempted_on, some) = go(11, true);
        let (roomy, no_preemption, more) = go(12, true);
        assert_eq!(none, 0);
        assert_eq!(tight, one_by_one);
        assert_eq!(roomy, one_by_one);
        assert!(preempted > 0);
        assert_eq!(preempted_on, preempted, "the chain preempted");
        assert_eq!(no_preemption, 0);
        // Both chained; the preempted sequence then waits while the other decodes, and is
        // admitted back into a step launched ahead (its recompute a prefill chunk there), so
        // the tight pool need not cost the chain any steps.
        assert!(some > 0);
        assert!(more > 0);
    }

    #[test]
    fn the_chain_survives_sequences_ending_at_different_steps() {
        // Four sequences of 3, 5, 7 and 9 tokens, prefilled together (turn 1, their first
        // token). Their prefill step starts the chain (every wanting row samples on the
        // device); from then on each turn k collects step k and leaves step k + 1 in flight for
        // the sequences that go on past k, and a sequence that ends leaves the batch without
        // stopping the chain. The last turn launches nothing: its sequence is known to end
        // there.
        let lengths = [3usize, 5, 7, 9];
        let requests: Vec<_> = (0u32..)
            .zip(lengths)
            .map(|(i, n)| (prompt(i, 5 + i), greedy(n)))
            .collect();
        let (sync, _, off) = run_turns(32, false, &requests);
        let (outs, flights, s) = run_turns(32, true, &requests);
        assert_eq!(outs, sync);
        let got: Vec<usize> = outs.iter().map(Vec::len).collect();
        assert_eq!(got, lengths);
        let last = lengths[3];
        let expected: Vec<(usize, bool)> = (1..=last)
            .map(|k| {
                let running = lengths.iter().filter(|&&n| n > k).count();
                (running, k < last)
            })
            .collect();
        assert_eq!(flights, expected);
        // Every step after the chain's first (the prefill step) was launched ahead, none twice
        // and none run for nothing: one per token of the longest sequence after its first.
        assert_eq!(metric(&s, |m| m.pipelined_steps), (last - 1) as u64);
        assert_eq!(metric(&s, |m| m.steps), metric(&off, |m| m.steps));
        assert_eq!(metric(&s, |m| m.steps), last as u64);
        let total: usize = lengths.iter().sum();
        assert_eq!(metric(&s, |m| m.generated_tokens), total as u64);
        assert_eq!(metric(&s, |m| m.requests_finished), 4);
    }

    #[test]
    fn a_cancelled_sequence_leaves_mid_chain_and_the_chain_goes_on() {
        let go = |cancel_after: Option<usize>| {
            let mut s = scheduler(32, true);
            let mut a = Some(submit(&mut s, 1, prompt(0, 5), greedy(20)));
            let mut b = submit(&mut s, 2, prompt(1, 6), greedy(12));
            let mut seen_a = Vec::new();
            let mut after_cancel = Vec::new();
            while !(s.running.is_empty() && s.waiting.is_empty()) {
                turn(&mut s);
                if a.is_none() {
                    after_cancel.push(s.in_flight.is_some());
                }
                if let Some(rx) = a.as_mut() {
                    seen_a.extend(events(rx).0);
                    if cancel_after.is_some_and(|n| seen_a.len() >= n) {
                        // Cancelled while a step that runs it is in flight: it leaves at the
                        // next look, its row dead, and the step ahead runs the other alone.
                        assert!(s.in_flight.is_some());
                        a = None;
                        turn(&mut s);
                        assert_eq!(s.running.len(), 1);
                        assert!(s.in_flight.is_some(), "the chain stopped");
                    }
                }
            }
            let (b, summary) = events(&mut b);
            assert_eq!(b.len(), summary.unwrap().usage.completion_tokens);
            (seen_a, b, after_cancel, s)
        };
        let (a_all, b_all, _, _) = go(None);
        let (a, b, after_cancel, s) = go(Some(4));
        assert_eq!(metric(&s, |m| m.requests_cancelled), 1);
        assert_eq!(metric(&s, |m| m.requests_finished), 1);
        assert_eq!(a, a_all[..a.len()]);
        assert_eq!(b, b_all);
        // The tokens the cancelled request received are all that was counted for it.
        assert_eq!(
            metric(&s, |m| m.generated_tokens),
            (a.len() + b.len()) as u64
        );
        // The chain never stopped: every step after the chain's first (the prefill step) was
        // launched ahead, up to the other request's last; each step counted once.
        assert!(after_cancel[..after_cancel.len() - 1].iter().all(|&f| f));
        assert_eq!(metric(&s, |m| m.pipelined_steps), (b.len() - 1) as u64);
        assert_eq!(metric(&s, |m| m.steps), b.len() as u64);
    }

    fn fed(seq: u64, chunk: usize, wants: bool) -> Fed {
        Fed { seq, chunk, wants }
    }

    /// Runs two sequences (prompts of 5 and 6 tokens, `max_tokens` 12) for two turns, submits
    /// `late` (prompt, parameters) as sequence 3, and runs everything to the end one turn at a
    /// time with a budget of `budget` tokens and `kv_blocks` blocks. Returns each request's
    /// tokens, the step in flight's entries after each turn from the submission on (empty when
    /// none), `pipelined_steps` after each of those turns, and the scheduler.
    #[allow(clippy::type_complexity)]
    fn late_arrival(
        pipelined: bool,
        budget: usize,
        kv_blocks: usize,
        late: (Vec<u32>, SamplingParams),
    ) -> (Vec<Vec<u32>>, Vec<Vec<Fed>>, Vec<u64>, Scheduler) {
        let mut s = scheduler_with(kv_blocks, pipelined, budget);
        let mut rxs = vec![
            submit(&mut s, 1, prompt(0, 5), greedy(12)),
            submit(&mut s, 2, prompt(1, 6), greedy(12)),
        ];
        turn(&mut s);
        turn(&mut s);
        assert_eq!(s.in_flight.is_some(), pipelined);
        rxs.push(submit(&mut s, 3, late.0, late.1));
        let mut flights = Vec::new();
        let mut pipelined_after = vec![metric(&s, |m| m.pipelined_steps)];
        while !(s.running.is_empty() && s.waiting.is_empty()) {
            turn(&mut s);
            flights.push(
                s.in_flight
                    .as_ref()
                    .map_or_else(Vec::new, |f| f.fed.clone()),
            );
            pipelined_after.push(metric(&s, |m| m.pipelined_steps));
        }
        assert_eq!(s.alloc.used(), 0);
        let outs = rxs
            .iter_mut()
            .map(|rx| {
                let (tokens, summary) = events(rx);
                assert_eq!(tokens.len(), summary.unwrap().usage.completion_tokens);
                tokens
            })
            .collect();
        (outs, flights, pipelined_after, s)
    }

    #[test]
    fn a_request_submitted_mid_chain_joins_the_step_ahead() {
        let late = (prompt(2, 7), greedy(5));
        let (sync, _, _, off) = late_arrival(false, 64, 32, late.clone());
        let (outs, flights, pipelined, s) = late_arrival(true, 64, 32, late);
        assert_eq!(outs, sync);
        assert_eq!(outs.iter().map(Vec::len).collect::<Vec<_>>(), [12, 12, 5]);
        // The turn after the submission collects the step in flight and launches the next one
        // ahead: both decoding sequences' rows, then the newcomer's whole prompt (it wants its
        // first token).
        assert_eq!(
            flights[0],
            [fed(1, 1, true), fed(2, 1, true), fed(3, 7, true)]
        );
        // From then on it decodes in the chain with the others.
        assert_eq!(
            flights[1],
            [fed(1, 1, true), fed(2, 1, true), fed(3, 1, true)]
        );
        // The chain never stopped: every turn but the last (whose sequences all end at the
        // step it collects) launched one step ahead.
        let (last, rest) = flights.split_last().unwrap();
        assert!(last.is_empty());
        assert!(rest.iter().all(|f| !f.is_empty()), "{flights:?}");
        for (k, w) in pipelined.windows(2).enumerate() {
            let expected = u64::from(k + 1 < flights.len());
            assert_eq!(w[1] - w[0], expected, "turn {k}: {pipelined:?}");
        }
        // Accounted as on the synchronous path.
        for f in [
            |m: &crate::EngineMetrics| m.prefill_tokens,
            |m: &crate::EngineMetrics| m.generated_tokens,
            |m: &crate::EngineMetrics| m.requests_finished,
            |m: &crate::EngineMetrics| m.prefix_cached_tokens,
        ] {
            assert_eq!(metric(&s, f), metric(&off, f));
        }
        assert_eq!(metric(&s, |m| m.prefill_tokens), 5 + 6 + 7);
        let queued = |s: &Scheduler| s.metrics.lock().unwrap().queue_n;
        let ttft = |s: &Scheduler| s.metrics.lock().unwrap().ttft_n;
        assert_eq!((queued(&s), ttft(&s)), (3, 3));
    }

    #[test]
    fn a_prompt_longer_than_the_budget_is_admitted_in_chunks_across_chained_steps() {
        // A budget of 12: the two decoding sequences take one token each, the newcomer's
        // 20-token prompt the ten left, over two chained steps, only the second wanting its first
        // token.
        let late = (prompt(2, 20), greedy(4));
        let (sync, _, _, off) = late_arrival(false, 12, 32, late.clone());
        let (outs, flights, _, s) = late_arrival(true, 12, 32, late);
        assert_eq!(outs, sync);
        assert_eq!(outs.iter().map(Vec::len).collect::<Vec<_>>(), [12, 12, 4]);
        let chunks: Vec<Fed> = flights[..3].iter().map(|f| f[2]).collect();
        assert_eq!(
            chunks,
            [fed(3, 10, false), fed(3, 10, true), fed(3, 1, true)]
        );
        for f in &flights {
            assert!(f.iter().map(|e| e.chunk).sum::<usize>() <= 12, "{f:?}");
            assert!(f.iter().take(2).all(|e| e.chunk == 1 && e.wants) || f.len() < 3);
        }
        let (last, rest) = flights.split_last().unwrap();
        assert!(last.is_empty());
        assert!(rest.iter().all(|f| !f.is_empty()), "{flights:?}");
        assert_eq!(
            metric(&s, |m| m.prefill_tokens),
            metric(&off, |m| m.prefill_tokens)
        );
    }

    #[test]
    fn a_pool_too_small_to_admit_keeps_the_chain_without_preempting() {
        // Ten blocks of four: the two decoding sequences (5 + 6 prompt tokens, 12 new, so 16
        // and 17 positions fed) end up holding nine, and leave at most six free once they
        // decode, while the newcomer's 28-token prompt needs seven, so it cannot be admitted
        // until they end. The chain goes on without it (never taking a block from a sequence
        // with a row in flight, never preempting), and it runs after them.
        let late = (prompt(2, 28), greedy(3));
        let (sync, _, _, off) = late_arrival(false, 64, 10, late.clone());
        let (outs, flights, _, s) = late_arrival(true, 64, 10, late);
        assert_eq!(outs, sync);
        assert_eq!(outs.iter().map(Vec::len).collect::<Vec<_>>(), [12, 12, 3]);
        assert_eq!(metric(&s, |m| m.preemptions), 0);
        assert_eq!(metric(&off, |m| m.preemptions), 0);
        // While the first two run, every turn launches a step ahead, without the newcomer.
        let waiting: Vec<&Vec<Fed>> = flights.iter().take_while(|f| f.len() == 2).collect();
        assert!(waiting.len() >= 5, "{flights:?}");
        assert!(
            waiting
                .iter()
                .all(|f| f.iter().all(|e| e.seq != 3 && e.chunk == 1))
        );
    }
}
