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
