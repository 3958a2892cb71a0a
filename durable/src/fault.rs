//! Fault injection for tests (the `fault-injection` feature): journal writes and flushes
//! that fail on demand, so a test can put a disk error in the middle of a run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes a journal write or flush fail on demand; test support behind the `fault-injection`
/// feature.
///
/// Attach it with [`RuntimeBuilder::fault_injector`](crate::RuntimeBuilder::fault_injector)
/// and arm it with [`FaultInjector::fail_flush`], [`FaultInjector::fail_write`] or
/// [`FaultInjector::fail_sequence`] (each counts on its own), or make every flush or write
/// fail with [`FaultInjector::fail_every_flush`] or [`FaultInjector::fail_every_write`]. The
/// injector stays attached to every journal generation the runtime opens after a failure
/// (see [`RuntimeBuilder::reopen`](crate::RuntimeBuilder::reopen)), so a test can let the
/// runtime heal and then inject another failure.
///
/// An armed flush runs sled's `flush()` and then reports an [`std::io::Error`] (kind `Other`)
/// instead of syncing the files, which is what an `fdatasync` failing with `EIO` looks like:
/// the writes it covers have reached the kernel, and are found on disk when the journal is
/// opened again, but no commit it covers is reported done.
///
/// An armed write is refused before it reaches sled and reports the same kind of error, as
/// sled does when it cannot write its log: nothing of it is applied, neither in memory nor on
/// disk, whether it is a single key or a multi-key batch.
///
/// An armed sequence number (sled's `generate_id`, which a start, a child start and a sent
/// signal each take before they write) fails the same way.
///
/// Either way the journal then stops taking writes, as after any real failure (see
/// [`Error::JournalFailed`](crate::Error::JournalFailed)).
///
/// The feature exists for tests and is not a stable API. Production builds should not turn
/// it on; an unarmed injector costs one atomic load per flush and per write.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    flushes: Countdown,
    writes: Countdown,
    sequences: Countdown,
}

/// One armable countdown and how often it fired.
#[derive(Debug, Clone, Default)]
struct Countdown {
    /// 0: disarmed; [`EVERY`]: every event fails; otherwise the `n`-th event from now fails.
    left: Arc<AtomicU64>,
    fired: Arc<AtomicU64>,
}

/// The countdown value that makes every event fail until disarmed.
const EVERY: u64 = u64::MAX;

impl Countdown {
    fn arm(&self, after: u64) {
        // `EVERY - 1` more successes is as good as forever, and keeps `EVERY` distinct.
        self.left
            .store(after.saturating_add(1).min(EVERY - 1), Ordering::SeqCst);
    }

    fn arm_every(&self) {
        self.left.store(EVERY, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.left.store(0, Ordering::SeqCst);
    }

    fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    /// Counts one event; true if this one must fail.
    fn fire(&self) -> bool {
        let hit = match self
            .left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| match c {
                EVERY => None,
                c => c.checked_sub(1),
            }) {
            Ok(before) => before == 1,
            Err(c) => c == EVERY,
        };
        if hit {
            self.fired.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }
}

impl FaultInjector {
    /// An injector that is not armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms the flush fault: `after` more flushes succeed, and the one after them fails.
    ///
    /// `fail_flush(0)` fails the next flush. Arming again replaces the previous setting.
    pub fn fail_flush(&self, after: u64) {
        self.flushes.arm(after);
    }

    /// Arms the write fault: `after` more journal writes succeed, and the one after them is
    /// refused without applying anything.
    ///
    /// A write is one atomic change the runtime hands to sled: a journaled step, signal
    /// delivery or child start (with the keys that go with it), a workflow's start, status
    /// change or outcome, a sent signal, or a cancellation request (every record it marks).
    /// `fail_write(0)` fails the next one. Arming again replaces the previous setting.
    pub fn fail_write(&self, after: u64) {
        self.writes.arm(after);
    }

    /// Arms the sequence-number fault: `after` more sequence numbers are handed out, and
    /// taking the one after them fails. `fail_sequence(0)` fails the next one.
    pub fn fail_sequence(&self, after: u64) {
        self.sequences.arm(after);
    }

    /// Makes every flush fail from now on, until [`FaultInjector::disarm`]: a disk that does
    /// not come back. Replaces a [`FaultInjector::fail_flush`] setting.
    pub fn fail_every_flush(&self) {
        self.flushes.arm_every();
    }

    /// Makes every journal write be refused from now on, until [`FaultInjector::disarm`].
    /// Replaces a [`FaultInjector::fail_write`] setting.
    pub fn fail_every_write(&self) {
        self.writes.arm_every();
    }

    /// Disarms every fault; no flush, write or sequence number fails because of this
    /// injector any more.
    pub fn disarm(&self) {
        self.flushes.disarm();
        self.writes.disarm();
        self.sequences.disarm();
    }

    /// How many flushes the injector has failed so far.
    pub fn fired(&self) -> u64 {
        self.flushes.fired()
    }

    /// How many writes the injector has refused so far.
    pub fn fired_writes(&self) -> u64 {
        self.writes.fired()
    }

    /// How many sequence numbers the injector has failed so far.
    pub fn fired_sequences(&self) -> u64 {
        self.sequences.fired()
    }

    /// Counts one sequence number; true if this one must fail.
    pub(crate) fn fire_sequence(&self) -> bool {
        self.sequences.fire()
    }

    /// Counts one flush; true if this one must fail.
    pub(crate) fn fire(&self) -> bool {
        self.flushes.fire()
    }

    /// Counts one write; true if this one must fail.
    pub(crate) fn fire_write(&self) -> bool {
        self.writes.fire()
    }
}

#[cfg(test)]
mod tests {
    use super::FaultInjector;

    #[test]
    fn fails_exactly_the_armed_flush() {
        let f = FaultInjector::new();
        assert!(!f.fire(), "an unarmed injector never fires");
        f.fail_flush(2);
        assert_eq!(
            [f.fire(), f.fire(), f.fire(), f.fire()],
            [false, false, true, false]
        );
        assert_eq!(f.fired(), 1);
        f.fail_flush(0);
        f.disarm();
        assert!(!f.fire());
        f.fail_flush(0);
        assert!(f.clone().fire(), "clones share the setting");
        assert_eq!(f.fired(), 2);
        assert_eq!(f.fired_writes(), 0);
    }

    #[test]
    fn fails_exactly_the_armed_write_and_counts_apart_from_flushes() {
        let f = FaultInjector::new();
        assert!(!f.fire_write(), "an unarmed injector never fires");
        f.fail_write(1);
        // Flushes neither consume the write countdown nor fire because of it.
        assert!(!f.fire());
        assert_eq!(
            [f.fire_write(), f.fire_write(), f.fire_write()],
            [false, true, false]
        );
        assert_eq!((f.fired(), f.fired_writes()), (0, 1));
        f.fail_write(0);
        f.fail_flush(0);
        assert!(f.clone().fire_write(), "clones share the setting");
        assert!(f.fire(), "the flush countdown is armed on its own");
        assert_eq!((f.fired(), f.fired_writes()), (1, 2));
        f.fail_write(0);
        f.disarm();
        assert!(!f.fire_write());
        assert_eq!(f.fired_writes(), 2);
    }

    #[test]
    fn every_event_fails_until_disarmed_and_sequences_count_apart() {
        let f = FaultInjector::new();
        f.fail_every_write();
        assert!((0..5).all(|_| f.fire_write()));
        assert!(!f.fire() && !f.fire_sequence());
        assert_eq!(f.fired_writes(), 5);
        f.fail_write(1);
        assert_eq!([f.fire_write(), f.fire_write()], [false, true]);
        f.fail_every_flush();
        f.fail_sequence(0);
        assert_eq!([f.fire(), f.fire()], [true, true]);
        assert_eq!([f.fire_sequence(), f.fire_sequence()], [true, false]);
        f.disarm();
        assert!(!f.fire() && !f.fire_write() && !f.fire_sequence());
        assert_eq!(
            (f.fired(), f.fired_writes(), f.fired_sequences()),
            (2, 6, 1)
        );
        // A countdown armed near the top never turns into "every event".
        f.fail_write(u64::MAX);
        assert!(!f.fire_write());
    }
}
