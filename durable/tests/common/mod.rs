//! Shared helpers for the integration tests: open a runtime with a running worker.
#![allow(dead_code)] // each test file uses a different subset

pub(crate) mod faults;

use std::path::Path;

use keel_durable::{Runtime, RuntimeBuilder, WorkflowId};

/// Opens the runtime the builder describes and spawns its worker on the current tokio runtime.
pub(crate) async fn start(builder: RuntimeBuilder) -> Runtime {
    let rt = builder.open().await.expect("open runtime");
    tokio::spawn(rt.worker().expect("worker").run());
    rt
}

/// Shuts a runtime down and drops it, so the directory can be opened again.
pub(crate) async fn stop(rt: Runtime) {
    rt.shutdown().await.expect("shutdown");
    drop(rt);
}

pub(crate) fn id(s: &str) -> WorkflowId {
    WorkflowId::new(s).expect("valid id")
}

pub(crate) fn builder(dir: &Path) -> RuntimeBuilder {
    Runtime::builder(dir)
}

/// Opens the journal's sled database of a runtime that just stopped. sled's threads may hold
/// its file lock for a moment after the runtime is dropped (the runtime's own `open` waits for
/// it the same way), so a refused open is retried for up to two seconds.
pub(crate) fn open_stopped_journal(dir: &Path) -> sled::Db {
    let path = dir.join("journal");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match sled::open(&path) {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("cannot open {path:?}: {e}"),
        }
    }
}
