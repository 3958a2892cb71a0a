//! The ledger and fixture the fault-injection tests (`flush_faults.rs`, `write_faults.rs`)
//! share: what the steps did and what the workflow code saw, across the runtime that meets
//! the failure and the ones that open the directory again.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_durable::{Durability, FaultInjector};

/// What the steps did and what the workflow code saw, across runtimes.
#[derive(Default)]
pub(crate) struct Ledger {
    /// One entry per call of a step closure: (workflow, step, value returned).
    pub(crate) ran: Vec<(String, String, u64)>,
    /// One entry per operation in workflow code: (workflow, operation, what it returned).
    pub(crate) saw: Vec<(String, String, Result<u64, String>)>,
}

pub(crate) type Shared = Arc<Mutex<Ledger>>;

/// One test's journal directory, ledger and fault injector, for the runtime that meets the
/// failure and the ones that open the directory again afterwards. Each test file adds the
/// methods that open runtimes with its own workflows.
pub(crate) struct Faulty {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) durability: Durability,
    pub(crate) ledger: Shared,
    pub(crate) faults: FaultInjector,
}

impl Faulty {
    pub(crate) fn new(durability: Durability) -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            durability,
            ledger: Shared::default(),
            faults: FaultInjector::new(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Waits until the code of workflow `w` has seen operation `op` succeed, that is, until the
/// operation was reported done (the journal alone would also show writes whose flush is still
/// running, and the tests count flushes).
pub(crate) async fn reached(ledger: &Shared, w: &str, op: &str) {
    for _ in 0..2000 {
        if seen(ledger, w, op).iter().any(Result::is_ok) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("workflow {w} never completed {op}");
}

/// Every (workflow, step) and how many times its closure ran.
/// Records in the ledger what workflow `w`'s code saw from operation `op`.
pub(crate) fn note(ledger: &Shared, w: &str, op: &str, r: &Result<u64, keel_durable::Error>) {
    let seen = r.as_ref().copied().map_err(ToString::to_string);
    ledger
        .lock()
        .unwrap()
        .saw
        .push((w.to_string(), op.to_string(), seen));
}

pub(crate) fn runs(ledger: &Shared) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for (w, s, _) in &ledger.lock().unwrap().ran {
        *out.entry((w.clone(), s.clone())).or_default() += 1;
    }
    out
}

/// The (workflow, operation) pairs the code saw succeed, with their values.
pub(crate) fn seen_ok(ledger: &Shared) -> BTreeMap<(String, String), u64> {
    let mut out = BTreeMap::new();
    for (w, s, r) in &ledger.lock().unwrap().saw {
        if let Ok(v) = r {
            out.insert((w.clone(), s.clone()), *v);
        }
    }
    out
}

/// Everything the code of workflow `w` saw operation `op` return, in order.
pub(crate) fn seen(ledger: &Shared, w: &str, op: &str) -> Vec<Result<u64, String>> {
    let l = ledger.lock().unwrap();
    l.saw
        .iter()
        .filter(|(x, s, _)| x == w && s == op)
        .map(|(_, _, r)| r.clone())
        .collect()
}
