//! The workflow's view of the runtime: journaled steps, timers, signals, children and
//! deterministic helpers, each answered from the journal on replay.

use std::any::Any;
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::journal::{Event, Journal, Record, Writes, ev_key, rec_key, step_ok_json, to_json};
use crate::runtime::Inner;
use crate::types::{
    RetryPolicy, StepError, WorkflowId, WorkflowStatus, ms_to_time, now_ms, time_to_ms,
};

/// Why an execution stopped without finishing; the workflow re-runs from its journal later.
#[derive(Debug)]
pub(crate) struct Suspend {
    pub(crate) deadline_ms: Option<u64>,
}

struct State {
    /// Outcomes journaled by earlier executions that this execution has not reached yet, by
    /// position. Each is removed when its position is taken, and fresh outcomes are never
    /// added: no position is taken twice, so neither would be read again.
    history: HashMap<u64, Event>,
    next: u64,
    poisoned: Option<String>,
    /// Set when the journal failed under this execution: its outcome is not recorded, and
    /// the workflow resumes from the journal when a runtime opens it again.
    interrupted: Option<String>,
    cancel_delivered: bool,
    suspend: Option<oneshot::Sender<Suspend>>,
}

struct Shared {
    rt: Arc<Inner>,
    /// The journal generation this execution started on. It never writes to another: after
    /// that journal fails, every operation fails, and the runtime reopens the directory only
    /// once every execution of the failed generation (and so this reference) is gone.
    journal: Arc<Journal>,
    id: WorkflowId,
    state: Mutex<State>,
}

/// A workflow's handle on the runtime, passed to every registered workflow function.
///
/// Every operation takes the next position in the workflow's journal. On first execution it
/// does its work and journals the outcome (flushed by group commit) before returning it; on
/// replay it returns the journaled outcome without doing the work again. Workflow code must
/// therefore call these operations in a deterministic order: the same inputs and the same
/// journaled results must lead to the same sequence of calls. Anything non-deterministic
/// (clocks, randomness, I/O) goes through a step or the helpers [`Context::now`],
/// [`Context::random`] and [`Context::uuid`].
///
/// Waiting operations ([`Context::sleep`], [`Context::recv`], [`Context::child`]) suspend the
/// workflow: the execution is dropped and re-run from the journal when the timer fires, the
/// signal arrives or the child finishes, so a waiting workflow holds no task.
#[derive(Clone)]
pub struct Context {
    shared: Arc<Shared>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("id", &self.shared.id)
            .finish_non_exhaustive()
    }
}

/// A child workflow started with [`Context::start_child`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChildHandle {
    id: WorkflowId,
}

impl ChildHandle {
    /// The child's workflow ID (`<parent>/<position>`).
    pub fn id(&self) -> &WorkflowId {
        &self.id
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the code asks for at a position, for comparison with what the journal recorded.
struct Ask<'a> {
    kind: &'static str,
    subject: &'a str,
}

impl Ask<'_> {
    fn describe(&self) -> String {
        if self.subject.is_empty() {
            self.kind.to_string()
        } else {
            format!("{} {:?}", self.kind, self.subject)
        }
    }
}

impl Context {
    pub(crate) fn new(
        rt: Arc<Inner>,
        journal: Arc<Journal>,
        id: WorkflowId,
        history: Vec<(u64, Event)>,
        suspend: oneshot::Sender<Suspend>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                rt,
                journal,
                id,
                state: Mutex::new(State {
                    history: history.into_iter().collect(),
                    next: 0,
                    poisoned: None,
                    interrupted: None,
                    cancel_delivered: false,
                    suspend: Some(suspend),
                }),
            }),
        }
    }

    /// The ID of the running workflow.
    pub fn id(&self) -> &WorkflowId {
        &self.shared.id
    }

    /// Whether the next operation on this context will be answered from the journal.
    ///
    /// After a restart (or a wake-up from a sleep, signal or child) a workflow re-runs from
    /// the start, and its operations return the outcomes a previous execution journaled
    /// without doing their work again. This is `true` while the journal holds an outcome for
    /// the position the next operation takes, and `false` once the execution has caught up
    /// and operations run for the first time. Checked just before a step, it says whether
    /// that step will be replayed or will run:
    ///
    /// ```no_run
    /// # async fn f(ctx: keel_durable::Context) -> keel_durable::Result<()> {
    /// let replayed = ctx.is_replaying();
    /// let total = ctx.step("charge", || async { Ok(42u64) }).await?;
    /// if !replayed {
    ///     println!("charged {total} just now");
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// A journaled cancellation at that position also counts as replaying. The answer is
    /// about positions, not names: if the code asks for another operation than the one
    /// journaled there, the call fails with [`Error::Nondeterminism`] instead.
    pub fn is_replaying(&self) -> bool {
        let st = lock(&self.shared.state);
        st.history.contains_key(&st.next)
    }

    pub(crate) fn poison(&self, message: String) {
        let mut st = lock(&self.shared.state);
        if st.poisoned.is_none() {
            st.poisoned = Some(message);
        }
    }

    pub(crate) fn poisoned(&self) -> Option<String> {
        lock(&self.shared.state).poisoned.clone()
    }

    /// Why this execution was abandoned, if the journal failed under it.
    pub(crate) fn interrupted(&self) -> Option<String> {
        lock(&self.shared.state).interrupted.clone()
    }

    pub(crate) fn cancel_delivered(&self) -> bool {
        lock(&self.shared.state).cancel_delivered
    }

    /// Whether cancellation of this workflow has been requested.
    pub fn is_cancelled(&self) -> bool {
        self.shared.rt.cancel_requested(self.shared.id.as_str()) || self.cancel_delivered()
    }

    /// Fails the workflow with `e`, or, if the journal failed, abandons this execution.
    ///
    /// A journal failure is not the workflow's: the workflow is left as the disk has it, to
    /// resume when a runtime opens the journal again, instead of being recorded as failed.
    fn fail<T>(&self, e: Error) -> Result<T> {
        let mut st = lock(&self.shared.state);
        let slot = match e {
            Error::JournalFailed { .. } => &mut st.interrupted,
            _ => &mut st.poisoned,
        };
        if slot.is_none() {
            *slot = Some(e.to_string());
        }
        Err(e)
    }

    /// Takes the next position and returns what the journal holds there, if anything.
    ///
    /// A recorded cancellation answers any request. Any other mismatch poisons the context:
    /// the workflow fails with [`Error::Nondeterminism`] whatever it does with the error.
    ///
    /// Once the journal has failed, nothing takes a position: no step's closure runs, so no
    /// side effect happens that could never be journaled.
    fn position(&self, ask: &Ask<'_>) -> Result<(u64, Option<Event>)> {
        if let Err(e) = self
            .shared
            .journal
            .check(|| format!("{} of workflow {}", ask.describe(), self.shared.id))
        {
            return self.fail(e);
        }
        let mut st = lock(&self.shared.state);
        if let Some(msg) = &st.poisoned {
            return Err(Error::WorkflowFailed {
                id: self.shared.id.clone(),
                message: msg.clone(),
            });
        }
        let index = st.next;
        st.next += 1;
        let Some(ev) = st.history.remove(&index) else {
            return Ok((index, None));
        };
        if ev == Event::Cancelled {
            st.cancel_delivered = true;
            return Err(Error::Cancelled {
                id: self.shared.id.clone(),
            });
        }
        if ev.kind() != ask.kind || ev.subject() != ask.subject {
            let e = Error::Nondeterminism {
                id: self.shared.id.clone(),
                index,
                recorded: ev.describe(),
                requested: ask.describe(),
            };
            st.poisoned = Some(e.to_string());
            return Err(e);
        }
        Ok((index, Some(ev)))
    }

    /// Journals `ev` at `index` together with `extra`, and waits for the flush.
    async fn record(&self, index: u64, ev: Event, mut extra: Writes) -> Result<()> {
        extra.event(self.shared.id.as_str(), index, &ev)?;
        self.commit(extra, || format!("{} at position {index}", ev.describe()))
            .await
    }

    /// Commits `writes` and waits for the flush; a failure fails the workflow, or, if the
    /// journal failed, abandons this execution (see [`Context::fail`]). `what` names the
    /// journaled operation in the error.
    async fn commit(&self, writes: Writes, what: impl FnOnce() -> String) -> Result<()> {
        match self.shared.journal.commit(writes).await {
            Ok(()) => Ok(()),
            Err(e) => self
                .fail(e.during(|| format!("journaling {} of workflow {}", what(), self.shared.id))),
        }
    }

    /// Delivers a pending cancellation at `index` instead of the requested operation.
    async fn check_cancel(&self, index: u64) -> Result<()> {
        if self.cancel_delivered() || !self.shared.rt.cancel_requested(self.shared.id.as_str()) {
            return Ok(());
        }
        self.record(index, Event::Cancelled, Writes::default())
            .await?;
        lock(&self.shared.state).cancel_delivered = true;
        Err(Error::Cancelled {
            id: self.shared.id.clone(),
        })
    }

    fn decode<T: DeserializeOwned>(&self, what: String, v: Value) -> Result<T> {
        match serde_json::from_value(v) {
            Ok(t) => Ok(t),
            Err(source) => self.fail(Error::Payload {
                id: self.shared.id.clone(),
                what,
                source,
            }),
        }
    }

    /// Stops this execution; the runtime re-runs the workflow when it is woken.
    async fn suspend<T>(&self, deadline_ms: Option<u64>) -> T {
        let tx = lock(&self.shared.state).suspend.take();
        if let Some(tx) = tx {
            let _ = tx.send(Suspend { deadline_ms });
        }
        let never: Infallible = std::future::pending().await;
        match never {}
    }

    /// Runs a side effect as a step with the default [`RetryPolicy`].
    ///
    /// See [`Context::step_with`].
    ///
    /// # Errors
    /// As [`Context::step_with`].
    pub async fn step<T, F, Fut>(&self, name: &str, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, StepError>> + Send,
    {
        self.step_with(name, RetryPolicy::default(), f).await
    }

    /// Runs a side effect as a step: once, with retries, and never again after it completes.
    ///
    /// `f` is called for each attempt. An attempt fails if it returns `Err`, panics (the
    /// panic is caught), or outlives the policy's per-attempt timeout. Retryable failures are
    /// retried after an exponential, jittered backoff until the attempts run out; a
    /// [`StepError::permanent`] failure stops at once.
    ///
    /// Once this returns, the outcome (the output, or the final failure) is journaled and
    /// flushed according to the runtime's [`Durability`](crate::Durability): after a crash,
    /// the step returns the journaled outcome and `f` is not called again. If the process
    /// dies while `f` runs, before its outcome is journaled, `f` runs again on recovery, so
    /// side effects should be idempotent or tolerate an at-least-once attempt.
    ///
    /// If the disk fails while the outcome is journaled (the write, or the flush that covers
    /// it, returns an error), this returns [`Error::JournalFailed`] and the step is not
    /// reported done. That journal then stops (every later operation on it, of every
    /// workflow, returns the same error and runs nothing) and this execution is abandoned:
    /// the workflow is not recorded as failed, and whatever the code does with the error is
    /// not journaled. Once the journal is open again (by default the runtime reopens it
    /// itself, see [`RuntimeBuilder::reopen`](crate::RuntimeBuilder::reopen); otherwise the
    /// next runtime to open the directory), the workflow replays; if the outcome did reach
    /// the disk, the step returns it without calling `f` again, and if it did not, `f` runs
    /// again, as after a crash. No execution ever replays an outcome from the failed journal
    /// itself: it refuses to be read, and only a journal opened afresh from the disk is.
    ///
    /// # Errors
    /// [`Error::StepFailed`] after the final failure; [`Error::Nondeterminism`] if the
    /// journal recorded another operation here; [`Error::Payload`] if the journaled output
    /// does not deserialise into `T`; [`Error::Cancelled`] once if the workflow was cancelled
    /// (the step does not run); [`Error::JournalFailed`] if journaling failed, or the journal
    /// had failed before (the step does not run).
    pub async fn step_with<T, F, Fut>(&self, name: &str, policy: RetryPolicy, mut f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = std::result::Result<T, StepError>> + Send,
    {
        let (index, recorded) = self.position(&Ask {
            kind: "step",
            subject: name,
        })?;
        if let Some(Event::Step {
            ok, err, attempts, ..
        }) = recorded
        {
            return match (ok, err) {
                (Some(v), _) => self.decode(format!("the output of step {name:?}"), v),
                (None, Some(message)) => Err(Error::StepFailed {
                    id: self.shared.id.clone(),
                    step: name.into(),
                    attempts,
                    message,
                }),
                (None, None) => self.decode(format!("the output of step {name:?}"), Value::Null),
            };
        }
        self.check_cancel(index).await?;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            // A closure that panics before it returns its future fails this attempt just as a
            // panic inside the future does.
            let made = std::panic::catch_unwind(AssertUnwindSafe(&mut f));
            let run = async move {
                match made {
                    Ok(fut) => CatchUnwind::new(fut).await,
                    Err(p) => Err(panic_message(p)),
                }
            };
            let outcome = match policy.attempt_timeout {
                Some(t) => match tokio::time::timeout(t, run).await {
                    Ok(r) => r,
                    Err(_) => Ok(Err(StepError::retryable(format!(
                        "attempt timed out after {t:?}"
                    )))),
                },
                None => run.await,
            };
            let outcome = match outcome {
                Ok(r) => r,
                Err(panic) => Err(StepError::retryable(format!("step panicked: {panic}"))),
            };
            match outcome {
                Ok(value) => {
                    // Serialised straight from `value`: the hot path of every workflow, so
                    // no intermediate `Value` tree is built.
                    let bytes = step_ok_json(name, &value, attempt)?;
                    let mut w = Writes::default();
                    w.put(ev_key(self.shared.id.as_str(), index), bytes);
                    self.commit(w, || format!("step {name:?} at position {index}"))
                        .await?;
                    return Ok(value);
                }
                Err(e) if e.is_retryable() && attempt < policy.max_attempts => {
                    let random = self.shared.rt.next_random();
                    tokio::time::sleep(policy.jittered_delay(attempt, random)).await;
                }
                Err(e) => {
                    let ev = Event::Step {
                        name: name.into(),
                        ok: None,
                        err: Some(e.message().to_string()),
                        attempts: attempt,
                    };
                    self.record(index, ev, Writes::default()).await?;
                    return Err(Error::StepFailed {
                        id: self.shared.id.clone(),
                        step: name.into(),
                        attempts: attempt,
                        message: e.message().to_string(),
                    });
                }
            }
        }
    }

    /// Sleeps durably for `d`, measured from the first execution of this call.
    ///
    /// The deadline is journaled, so after a restart the sleep ends at the original
    /// wall-clock time, or at once if that time has passed. The workflow holds no task while
    /// it sleeps.
    ///
    /// # Errors
    /// [`Error::Nondeterminism`], [`Error::Cancelled`] (once), [`Error::Storage`] or
    /// [`Error::JournalFailed`] (see [`Context::step_with`]).
    pub async fn sleep(&self, d: Duration) -> Result<()> {
        let until = now_ms().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.sleep_until_ms(until).await
    }

    /// Sleeps durably until wall-clock time `t`; see [`Context::sleep`].
    ///
    /// # Errors
    /// As [`Context::sleep`].
    pub async fn sleep_until(&self, t: SystemTime) -> Result<()> {
        self.sleep_until_ms(time_to_ms(t)).await
    }

    async fn sleep_until_ms(&self, until: u64) -> Result<()> {
        let (index, recorded) = self.position(&Ask {
            kind: "sleep",
            subject: "",
        })?;
        let until = match recorded {
            Some(Event::Sleep { until_ms }) => until_ms,
            _ => {
                self.check_cancel(index).await?;
                self.record(index, Event::Sleep { until_ms: until }, Writes::default())
                    .await?;
                until
            }
        };
        if now_ms() >= until {
            return Ok(());
        }
        self.suspend(Some(until)).await
    }

    /// Waits durably for signal `name` sent with [`Runtime::signal`](crate::Runtime::signal).
    ///
    /// A signal sent before the workflow waits is buffered. Taking a signal from the buffer
    /// and journaling its delivery is one atomic write, so each signal is delivered exactly
    /// once, also across crashes. The workflow holds no task while it waits.
    ///
    /// # Errors
    /// [`Error::Payload`] if the value does not deserialise into `T`; [`Error::Nondeterminism`],
    /// [`Error::Cancelled`] (once), [`Error::Storage`] or [`Error::JournalFailed`] (see
    /// [`Context::step_with`]).
    pub async fn recv<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        match self.recv_inner(name, None).await? {
            Some(v) => self.decode(format!("signal {name:?}"), v),
            None => self.decode(format!("signal {name:?}"), Value::Null),
        }
    }

    /// As [`Context::recv`], giving up after `timeout` (a durable deadline, like a sleep's).
    ///
    /// Returns `Ok(None)` if no signal came in time; that outcome is journaled too.
    ///
    /// # Errors
    /// As [`Context::recv`].
    pub async fn recv_timeout<T: DeserializeOwned>(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<Option<T>> {
        let (index, recorded) = self.position(&Ask {
            kind: "signal-deadline",
            subject: name,
        })?;
        let until = match recorded {
            Some(Event::Deadline { until_ms, .. }) => until_ms,
            _ => {
                self.check_cancel(index).await?;
                let until =
                    now_ms().saturating_add(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
                let ev = Event::Deadline {
                    name: name.into(),
                    until_ms: until,
                };
                self.record(index, ev, Writes::default()).await?;
                until
            }
        };
        match self.recv_inner(name, Some(until)).await? {
            Some(v) => self.decode(format!("signal {name:?}"), v).map(Some),
            None => Ok(None),
        }
    }

    async fn recv_inner(&self, name: &str, deadline: Option<u64>) -> Result<Option<Value>> {
        let (index, recorded) = self.position(&Ask {
            kind: "signal",
            subject: name,
        })?;
        if let Some(Event::Signal {
            value, timed_out, ..
        }) = recorded
        {
            return Ok(if timed_out { None } else { Some(value) });
        }
        self.check_cancel(index).await?;
        let id = self.shared.id.as_str();
        match self.shared.journal.first_signal(id, name) {
            Err(e) => return self.fail(e),
            Ok(Some((key, value))) => {
                let mut w = Writes::default();
                w.remove(key);
                let ev = Event::Signal {
                    name: name.into(),
                    value: value.clone(),
                    timed_out: false,
                };
                self.record(index, ev, w).await?;
                return Ok(Some(value));
            }
            Ok(None) => {}
        }
        if let Some(until) = deadline
            && now_ms() >= until
        {
            let ev = Event::Signal {
                name: name.into(),
                value: Value::Null,
                timed_out: true,
            };
            self.record(index, ev, Writes::default()).await?;
            return Ok(None);
        }
        self.suspend(deadline).await
    }

    /// The current wall-clock time, journaled so replay sees the same value.
    ///
    /// # Errors
    /// [`Error::Nondeterminism`], [`Error::Cancelled`] (once), [`Error::Storage`] or
    /// [`Error::JournalFailed`] (see [`Context::step_with`]).
    pub async fn now(&self) -> Result<SystemTime> {
        let (index, recorded) = self.position(&Ask {
            kind: "now",
            subject: "",
        })?;
        if let Some(Event::Now { ms }) = recorded {
            return Ok(ms_to_time(ms));
        }
        self.check_cancel(index).await?;
        let ms = now_ms();
        self.record(index, Event::Now { ms }, Writes::default())
            .await?;
        Ok(ms_to_time(ms))
    }

    /// A random `u64`, journaled so replay sees the same value.
    ///
    /// # Errors
    /// As [`Context::now`].
    pub async fn random(&self) -> Result<u64> {
        let (index, recorded) = self.position(&Ask {
            kind: "random",
            subject: "",
        })?;
        if let Some(Event::Random { value }) = recorded {
            return Ok(value);
        }
        self.check_cancel(index).await?;
        let value = self.shared.rt.next_random();
        self.record(index, Event::Random { value }, Writes::default())
            .await?;
        Ok(value)
    }

    /// A random version-4 UUID in its hyphenated text form, journaled so replay sees the same.
    ///
    /// # Errors
    /// As [`Context::now`].
    pub async fn uuid(&self) -> Result<String> {
        let (index, recorded) = self.position(&Ask {
            kind: "uuid",
            subject: "",
        })?;
        if let Some(Event::Uuid { value }) = recorded {
            return Ok(value);
        }
        self.check_cancel(index).await?;
        let hi = self.shared.rt.next_random();
        let lo = self.shared.rt.next_random();
        let hi = (hi & !0xF000) | 0x4000;
        let lo = (lo & !(0xC000_u64 << 48)) | (0x8000_u64 << 48);
        let value = format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            hi >> 32,
            (hi >> 16) & 0xFFFF,
            hi & 0xFFFF,
            lo >> 48,
            lo & 0xFFFF_FFFF_FFFF
        );
        self.record(
            index,
            Event::Uuid {
                value: value.clone(),
            },
            Writes::default(),
        )
        .await?;
        Ok(value)
    }

    /// A version marker for changing workflow code while old executions are still running.
    ///
    /// On first execution this journals and returns `max`. A workflow that recorded this marker
    /// gets the recorded version back. A workflow whose journal holds another operation at
    /// this position started before the marker existed: it gets `min` (use `min` for the old
    /// code path) and the marker takes no journal position, so its replay stays aligned.
    ///
    /// ```no_run
    /// # async fn f(ctx: keel_durable::Context) -> keel_durable::Result<()> {
    /// if ctx.version("send-receipt", 0, 1).await? >= 1 {
    ///     ctx.step("receipt", || async { Ok(()) }).await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Nondeterminism`] if the recorded version is outside `min..=max` (the code
    /// dropped support for it); [`Error::Cancelled`] (once), [`Error::Storage`] or
    /// [`Error::JournalFailed`] (see [`Context::step_with`]).
    pub async fn version(&self, change_id: &str, min: u32, max: u32) -> Result<u32> {
        let old_path = {
            let st = lock(&self.shared.state);
            // A recorded cancellation answers whatever asks at its position, this included.
            !matches!(
                st.history.get(&st.next),
                Some(Event::Version { .. } | Event::Cancelled) | None
            )
        };
        if old_path {
            return Ok(min);
        }
        let (index, recorded) = self.position(&Ask {
            kind: "version",
            subject: change_id,
        })?;
        if let Some(Event::Version { version, .. }) = recorded {
            if version < min || version > max {
                return self.fail(Error::Nondeterminism {
                    id: self.shared.id.clone(),
                    index,
                    recorded: format!("version {change_id:?} = {version}"),
                    requested: format!("version {change_id:?} in {min}..={max}"),
                });
            }
            return Ok(version);
        }
        self.check_cancel(index).await?;
        let ev = Event::Version {
            change_id: change_id.into(),
            version: max,
        };
        self.record(index, ev, Writes::default()).await?;
        Ok(max)
    }

    /// Starts workflow `name` as a child of this one and waits for its output.
    ///
    /// # Errors
    /// As [`Context::start_child`] and [`Context::wait_child`].
    pub async fn child<I: Serialize, O: DeserializeOwned>(
        &self,
        name: &str,
        input: &I,
    ) -> Result<O> {
        let h = self.start_child(name, input).await?;
        self.wait_child(&h).await
    }

    /// Starts workflow `name` as a child of this one, durably, without waiting for it.
    ///
    /// The child's ID is `<parent id>/<journal position>`, so replay finds the same child.
    /// Creating the child and journaling its start are one atomic write. Cancelling the
    /// parent cancels the child.
    ///
    /// # Errors
    /// [`Error::UnknownWorkflow`] if `name` is not registered; [`Error::IdConflict`] if the
    /// child's ID is taken by another workflow; [`Error::Nondeterminism`], [`Error::Cancelled`]
    /// (once), [`Error::Serialize`], [`Error::Storage`] or [`Error::JournalFailed`] (see
    /// [`Context::step_with`]).
    pub async fn start_child<I: Serialize>(&self, name: &str, input: &I) -> Result<ChildHandle> {
        let (index, recorded) = self.position(&Ask {
            kind: "child-start",
            subject: name,
        })?;
        if let Some(Event::ChildStart { child_id, .. }) = recorded {
            return Ok(ChildHandle {
                id: WorkflowId::from_trusted(child_id),
            });
        }
        self.check_cancel(index).await?;
        let rt = &self.shared.rt;
        if !rt.is_registered(name) {
            return Err(Error::UnknownWorkflow { name: name.into() });
        }
        let child_id = format!("{}/{index}", self.shared.id.as_str());
        let journal = &self.shared.journal;
        let existing = match journal.record(&child_id) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        if let Some(existing) = existing {
            return self.fail(Error::IdConflict {
                id: WorkflowId::from_trusted(child_id),
                existing: existing.name,
                requested: name.into(),
            });
        }
        let input = serde_json::to_value(input).map_err(|source| Error::Serialize {
            what: format!("input of child workflow {name:?}"),
            source,
        })?;
        let now = now_ms();
        let rec = Record {
            name: name.into(),
            input,
            status: WorkflowStatus::Running,
            created_ms: now,
            updated_ms: now,
            seq: match journal.next_seq() {
                Ok(seq) => seq,
                Err(e) => {
                    let what = || {
                        format!(
                            "the start of child {child_id:?} of workflow {}",
                            self.shared.id
                        )
                    };
                    return self.fail(e.during(what));
                }
            },
            queue: None,
            parent: Some(self.shared.id.as_str().to_string()),
            cancel_requested: false,
            output: None,
            error: None,
        };
        let mut w = Writes::default();
        w.put(rec_key(&child_id), to_json("workflow record", &rec)?);
        let ev = Event::ChildStart {
            child_id: child_id.clone(),
            name: name.into(),
        };
        self.record(index, ev, w).await?;
        rt.dispatch_new(&child_id);
        Ok(ChildHandle {
            id: WorkflowId::from_trusted(child_id),
        })
    }

    /// Waits durably for a child's outcome; the workflow holds no task while it waits.
    ///
    /// # Errors
    /// [`Error::WorkflowFailed`] or [`Error::Cancelled`] (naming the child) if the child did not
    /// succeed; [`Error::Payload`] if its output does not deserialise into `O`;
    /// [`Error::Cancelled`] (naming this workflow, once) if this workflow was cancelled while
    /// waiting; [`Error::Nondeterminism`], [`Error::Storage`] or [`Error::JournalFailed`] (see
    /// [`Context::step_with`]).
    pub async fn wait_child<O: DeserializeOwned>(&self, child: &ChildHandle) -> Result<O> {
        let cid = child.id.as_str();
        let (index, recorded) = self.position(&Ask {
            kind: "child-result",
            subject: cid,
        })?;
        let (status, output, error) = match recorded {
            Some(Event::ChildResult {
                status,
                output,
                error,
                ..
            }) => (status, output, error),
            _ => {
                self.check_cancel(index).await?;
                let rec = match self.shared.journal.record(cid) {
                    Ok(Some(r)) => r,
                    Ok(None) => {
                        return Err(Error::NotFound {
                            id: child.id.clone(),
                        });
                    }
                    Err(e) => return self.fail(e),
                };
                if !rec.status.is_terminal() {
                    return self.suspend(None).await;
                }
                let ev = Event::ChildResult {
                    child_id: cid.into(),
                    status: rec.status,
                    output: rec.output.clone(),
                    error: rec.error.clone(),
                };
                self.record(index, ev, Writes::default()).await?;
                (rec.status, rec.output, rec.error)
            }
        };
        match status {
            WorkflowStatus::Succeeded => self.decode(
                format!("the output of child {cid:?}"),
                output.unwrap_or(Value::Null),
            ),
            WorkflowStatus::Cancelled => Err(Error::Cancelled {
                id: child.id.clone(),
            }),
            _ => Err(Error::WorkflowFailed {
                id: child.id.clone(),
                message: error.unwrap_or_default(),
            }),
        }
    }
}

/// Polls a future and turns a panic inside it into an `Err` with the panic's message.
pub(crate) struct CatchUnwind<F> {
    inner: Pin<Box<F>>,
}

impl<F> CatchUnwind<F> {
    pub(crate) fn new(f: F) -> Self {
        Self { inner: Box::pin(f) }
    }
}

fn panic_message(p: Box<dyn Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::result::Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        // The future is dropped right after a panic is reported, never polled again, so no
        // broken invariant inside it can be observed.
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(p) => Poll::Ready(Err(panic_message(p))),
        }
    }
}
