//! Fault injection for tests (the `fault-injection` feature): journal flushes that fail on
//! demand, so a test can put a disk error in the middle of a run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes a journal flush fail on demand; test support behind the `fault-injection` feature.
///
/// Attach it with [`RuntimeBuilder::fault_injector`](crate::RuntimeBuilder::fault_injector)
/// and arm it with [`FaultInjector::fail_flush`]. The armed flush runs sled's `flush()` and
/// then reports an [`std::io::Error`] (kind `Other`) instead of syncing the files, which is
/// what an `fdatasync` failing with `EIO` looks like: the writes it covers have reached the
/// kernel, and are found on disk when the journal is opened again, but no commit it covers is
/// reported done. The journal then stops taking writes, as after any real failure (see
/// [`Error::JournalFailed`](crate::Error::JournalFailed)).
///
/// The feature exists for tests and is not a stable API. Production builds should not turn
/// it on; an unarmed injector costs one atomic load per flush.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    /// 0: disarmed; `n > 0`: the `n`-th flush from now fails.
    countdown: Arc<AtomicU64>,
    fired: Arc<AtomicU64>,
}

impl FaultInjector {
    /// An injector that is not armed.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms the injector: `after` more flushes succeed, and the one after them fails.
    ///
    /// `fail_flush(0)` fails the next flush. Arming again replaces the previous setting.
    pub fn fail_flush(&self, after: u64) {
        self.countdown
            .store(after.saturating_add(1), Ordering::SeqCst);
    }

    /// Disarms the injector; no flush fails because of it any more.
    pub fn disarm(&self) {
        self.countdown.store(0, Ordering::SeqCst);
    }

    /// How many flushes the injector has failed so far.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    /// Counts one flush; true if this one must fail.
    pub(crate) fn fire(&self) -> bool {
        let hit = self
            .countdown
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
            == Ok(1);
        if hit {
            self.fired.fetch_add(1, Ordering::SeqCst);
        }
        hit
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
    }
}
