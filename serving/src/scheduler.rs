//! The model thread: continuous batching at iteration level. Each step decodes one token for
//! every running sequence and fills the rest of a token budget with prefill chunks of waiting
//! sequences (first come, first served); when KV blocks run out the newest running sequence
//! is preempted and recomputed later. While the batch only decodes device-sampled tokens,
//! steps are pipelined: the next is launched from the picked ids on the device before the host
//! streams them (`InFlight`, `Scheduler::advance`).

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
/// decode); at most one exists. It feeds each of its sequences one token, `tokens[computed]`
/// at position `computed`, in a cache slot of a block the sequence held when it was launched.
///
/// While it is in flight, every running sequence has a row in it, in the same order (`running`
/// is a subsequence of `rows`), and nothing joins `running`. A sequence may leave (it ended at
/// the step before, or was cancelled or expired): it is retired at once and its blocks go back
/// to the pool at once, and its row is dead, discarded when the step is collected (never
/// streamed or counted). Freeing a block this step still writes is safe: every launch goes on
/// the device's one stream, so a later step that reuses the block is queued behind this one
/// and writes after it, and on the CPU a launched step has completed before `launch_step`
/// returns. The slot written is never in a block the prefix cache indexed: it is at or past the
/// sequence's `computed`, and only whole computed blocks are indexed.
struct InFlight {
    /// The ids its sampler picked, one per row, still on the device.
    ids: DeviceIds,
    /// The sequence (`Seq::id`) of each row, in batch order.
    rows: Vec<u64>,
    /// When its planning began, for the step metrics.
    t0: Instant,
}

/// The step after the one in flight, planned before that one's ids are read, for the running
/// sequences that go on past it.
struct Ahead {
    steps: Vec<SeqStep>,
    params: Vec<SampleParams>,
    /// Each planned sequence's row of the step in flight, which holds its input token.
    rows: Vec<u32>,
    /// Each planned sequence's id.
    seqs: Vec<u64>,
    t0: Instant,
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
    /// launching the next one ahead when the batch can go on unchanged (see `advance`).
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
        let want: Vec<bool> = steps.iter().map(|s| s.want_logits).collect();
        if let Some(params) = self.starts_chain(&plan, &want, &sample) {
            // The first step of a chain: launched with its ids left on the device, so that
            // `advance` can launch the next step from them before reading them.
            let launched =
                self.model
                    .launch_step(StepTokens::Host(&tokens), &steps, &mut self.cache, &params);
            match launched {
                Ok(ids) => {
                    let rows = self.running.iter().map(|s| s.id).collect();
                    self.advance(InFlight { ids, rows, t0 });
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

    /// The sampling settings of a step that can start a pipelined chain, `None` for any other:
    /// pipelining is on and the model supports it, and the step decodes one token for every
    /// running sequence, in order, each wanting its token from the device sampler.
    fn starts_chain(
        &self,
        plan: &[(usize, usize)],
        want: &[bool],
        sample: &[Option<SampleParams>],
    ) -> Option<Vec<SampleParams>> {
        let whole_batch = plan.len() == self.running.len()
            && plan.iter().enumerate().all(|(i, &p)| p == (i, 1))
            && want.iter().all(|&w| w)
            && sample.len() == plan.len();
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

    /// Whether the step after the one in flight may be launched before that one is collected,
    /// for the running sequences that go on past it (`goes_on`), each decoding its next token:
    /// some sequence goes on, and nothing else is due. Not when a waiting request could join
    /// the batch those sequences leave, at shutdown, when some sequence needs the host sampler,
    /// or when they outgrow one step's token budget. (The context check is in `goes_on`: a
    /// sequence that goes on has room for the position after the one in flight.)
    fn may_chain(&self) -> bool {
        let n = self.running.iter().filter(|s| self.goes_on(s)).count();
        let room = n < self.cfg.max_seqs && n < self.cfg.max_batch_tokens;
        self.cfg.pipelined_decode
            && self.model.can_chain()
            && !self.shutting_down
            && n > 0
            && n <= self.cfg.max_batch_tokens
            && (self.waiting.is_empty() || !room)
            && self.running.iter().all(|s| s.params.device_sampleable())
    }

    /// Plans the step after `flight` for the running sequences that go on past it (`goes_on`),
    /// in order, assuming each does: one token, the one `flight` picks for it (its row there),
    /// at the position after the one in flight, in a slot of a block taken now when the
    /// position starts a new block, with the next draw from the sequence's own sampler (so a
    /// seed's draws stay in order; a sequence left out draws nothing). `None`, with no block
    /// taken and nothing drawn, when the pool has too few free blocks; the next step then runs
    /// synchronously, which may preempt.
    fn plan_ahead(&mut self, flight: &InFlight) -> Option<Ahead> {
        let t0 = Instant::now();
        let bs = self.cfg.block_size;
        let mut going = Vec::new();
        let mut rows = Vec::new();
        let mut next_row = 0;
        for (i, s) in self.running.iter().enumerate() {
            // `running` is a subsequence of the rows, so one pass finds every row.
            let later = flight.rows.get(next_row..)?;
            let k = next_row + later.iter().position(|&id| id == s.id)?;
            next_row = k + 1;
            if self.goes_on(s) {
                going.push(i);
                rows.push(u32::try_from(k).ok()?);
            }
        }
        let needs: Vec<usize> = going
            .iter()
            .map(|&i| {
                let s = &self.running[i];
                blocks_for(s.computed + 2, bs).saturating_sub(s.blocks.len())
            })
            .collect();
        let mut fresh = self.alloc.allocate(needs.iter().sum())?.into_iter();
        let mut steps = Vec::with_capacity(going.len());
        let mut params = Vec::with_capacity(going.len());
        let mut seqs = Vec::with_capacity(going.len());
        for (&i, need) in going.iter().zip(needs) {
            let s = &mut self.running[i];
            s.blocks.extend(fresh.by_ref().take(need));
            steps.push(SeqStep {
                start_pos: s.computed + 1,
                len: 1,
                slots: self.cache.slots(&s.blocks, s.computed + 2),
                want_logits: true,
            });
            params.push(s.sampler.device_params(&s.params));
            seqs.push(s.id);
        }
        // `may_chain` checked that every sequence samples on the device, so each has a setting;
        // if one did not, the blocks stay with their sequences (their next step uses them).
        let params = params.into_iter().collect::<Option<Vec<_>>>()?;
        Some(Ahead {
            steps,
            params,
            rows,
            seqs,
            t0,
        })
    }

    /// Collects the step in flight and processes its tokens. When the batch may go on
    /// (`may_chain`), the next step is planned while the device still runs this one, for the
    /// sequences that go on past it, and launched from this step's ids on the device (each
    /// sequence's own row) before they are read, so the device runs it while the host reads and
    /// streams this step's tokens. (On a GPU the read waits for this step only: its copy to
    /// page-locked memory was queued right behind it, ahead of the next launch.) A sequence
    /// that ends at this step (a stop token or stop string, found only now) is retired at once
    /// and its row of the step ahead is dead; the chain goes on for the others.
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
            let identity = a.rows.len() == flight.rows.len()
                && a.rows.iter().enumerate().all(|(k, &r)| r as usize == k);
            let picked = StepTokens::Picked {
                ids: &flight.ids,
                rows: (!identity).then_some(&a.rows[..]),
            };
            match self
                .model
                .launch_step(picked, &a.steps, &mut self.cache, &a.params)
            {
                Ok(ids) => {
                    next = Some(InFlight {
                        ids,
                        rows: a.seqs,
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
            // `running`, since a chain admits nobody) fail, and the engine keeps serving.
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
        if ids.len() != flight.rows.len() {
            return Err(Error::Execution {
                reason: format!(
                    "a launched step returned {} ids for {} sequences",
                    ids.len(),
                    flight.rows.len()
                ),
            });
        }
        Ok(ids)
    }

    /// Processes a launched decode step's ids (one per row of `flight`) and counts the step.
    /// A row whose sequence is no longer running (it left while the step was in flight) is
    /// dead: dropped, never streamed or counted; a step with only dead rows is not counted at
    /// all. Returns the sequences that ended.
    fn absorb_decode(&mut self, flight: &InFlight, ids: Vec<u32>) -> Vec<Finished> {
        let mut plan = Vec::with_capacity(self.running.len());
        let mut outputs = Vec::with_capacity(self.running.len());
        // `running` is a subsequence of the rows, in order, so one pass pairs them.
        let mut live = self.running.iter().enumerate().peekable();
        for (&id, token) in flight.rows.iter().zip(ids) {
            if let Some(&(idx, _)) = live.peek().filter(|(_, s)| s.id == id) {
                plan.push((idx, 1));
                outputs.push(RowOutput::Token(token));
                live.next();
            }
        }
        if plan.is_empty() {
            return Vec::new();
        }
        let want = vec![true; plan.len()];
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
        let spec = RandomModel::llama(64, 2, 4, 2, 96, 300)
            .unwrap()
            .seed(21)
            .dtype(Dtype::Bf16);
        let (model, tokenizer) = spec.build(&Device::Cpu).unwrap();
        assert!(model.can_chain());
        let cfg = SchedulerConfig {
            block_size: BLOCK,
            kv_blocks,
            max_batch_tokens: 64,
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

    /// The invariants between steps: while a step is in flight, every running sequence has a
    /// row in it, in order (rows of sequences that left are dead), is fed its last token there
    /// and holds the block its slot is in; and every block in use is held by a sequence (so a
    /// sequence that left gave its blocks back).
    fn check_invariants(s: &Scheduler) {
        if let Some(f) = &s.in_flight {
            assert_eq!(f.ids.len(), f.rows.len());
            assert!(
                !s.running.is_empty(),
                "a step in flight with every row dead"
            );
            let mut rows = f.rows.iter();
            for q in &s.running {
                assert!(
                    rows.any(|&id| id == q.id),
                    "sequence {} has no row in the step in flight (rows {:?})",
                    q.id,
                    f.rows
                );
                assert_eq!(q.tokens.len(), q.computed + 1);
                assert!(q.blocks.len() >= blocks_for(q.computed + 1, BLOCK));
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
        assert!(some > 0);
        assert!(more > some, "{more} {some}");
    }

    #[test]
    fn the_chain_survives_sequences_ending_at_different_steps() {
        // Four sequences of 3, 5, 7 and 9 tokens, prefilled together (turn 1, their first
        // token). Turn 2 starts the chain; from then on each turn k collects step k and leaves
        // step k + 1 in flight for the sequences that go on past k, and a sequence that ends
        // leaves the batch without stopping the chain. The last turn launches nothing: its
        // sequence is known to end there.
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
                (running, k >= 2 && k < last)
            })
            .collect();
        assert_eq!(flights, expected);
        // Every step after the chain's first was launched ahead, none twice and none run for
        // nothing: the longest sequence's decode steps (all but its first token) less one.
        assert_eq!(metric(&s, |m| m.pipelined_steps), (last - 2) as u64);
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
        // The chain never stopped: every step after the chain's first (turn 2) was launched
        // ahead, up to the other request's last; each step counted once.
        assert!(after_cancel[..after_cancel.len() - 1].iter().all(|&f| f));
        assert_eq!(metric(&s, |m| m.pipelined_steps), (b.len() - 2) as u64);
        assert_eq!(metric(&s, |m| m.steps), b.len() as u64);
    }
}
