//! A human-in-the-loop workflow: it waits durably for an approval sent by another process.
//!
//! ```text
//! cargo run --release -p keel-examples --example durable_approval -- start deploy-42 900
//! cargo run --release -p keel-examples --example durable_approval -- status deploy-42
//! cargo run --release -p keel-examples --example durable_approval -- approve deploy-42 alice
//! cargo run --release -p keel-examples --example durable_approval -- reject deploy-42 bob
//! cargo run --release -p keel-examples --example durable_approval
//! ```
//!
//! `start` journals the request, runs its first step and exits while the workflow waits (it
//! holds no process, thread or task while waiting). `approve`/`reject` is a second invocation:
//! it sends the signal, the workflow resumes from the journal and finishes. With no
//! arguments the program runs both invocations in turn, reopening the journal in between.
//! `--dir PATH` (first argument) picks the journal (default: `keel-durable-approval` in the
//! temp dir). Only one invocation may hold the journal at a time; a second gets a clear
//! "already open" error.
#![allow(clippy::print_stdout)] // a CLI program reports on stdout

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use keel_durable::{Context, Error, Runtime, StepError, WorkflowId, WorkflowStatus};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Request {
    what: String,
    amount: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Decision {
    approved: bool,
    by: String,
}

/// Prepares the change, waits up to a day for a decision, then applies or discards it.
async fn approval(ctx: Context, req: Request) -> Result<String, Error> {
    let ticket: String = ctx
        .step("prepare", || {
            let what = req.what.clone();
            async move { Ok::<_, StepError>(format!("ticket for {what}")) }
        })
        .await?;
    let decision = ctx
        .recv_timeout::<Decision>("approval", Duration::from_secs(24 * 3600))
        .await?;
    let outcome = match decision {
        Some(d) if d.approved => {
            let by = d.by.clone();
            ctx.step("apply", || {
                let by = by.clone();
                let amount = req.amount;
                async move { Ok::<_, StepError>(format!("applied {amount} (approved by {by})")) }
            })
            .await?
        }
        Some(d) => format!("rejected by {}", d.by),
        None => "timed out waiting for approval".to_string(),
    };
    Ok(format!("{ticket}: {outcome}"))
}

async fn open(dir: &Path) -> anyhow::Result<Runtime> {
    let rt = Runtime::builder(dir)
        .register("approval", approval)
        .open()
        .await
        .with_context(|| format!("opening the journal at {}", dir.display()))?;
    tokio::spawn(rt.worker()?.run());
    Ok(rt)
}

async fn start(dir: &Path, id: &str, amount: u64) -> anyhow::Result<()> {
    let rt = open(dir).await?;
    let id = WorkflowId::new(id)?;
    let req = Request {
        what: format!("deploy {}", id.as_str()),
        amount,
    };
    rt.start("approval", &id, &req).await?;
    // Wait until the first step is journaled, so the workflow is visibly waiting.
    while rt.history(&id)?.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "{}: {:?}, waiting for approval; now run `approve {}` or `reject {}`",
        id.as_str(),
        rt.status(&id)?.status,
        id.as_str(),
        id.as_str()
    );
    rt.shutdown().await?;
    Ok(())
}

async fn decide(dir: &Path, id: &str, approved: bool, by: &str) -> anyhow::Result<()> {
    let rt = open(dir).await?;
    let id = WorkflowId::new(id)?;
    let decision = Decision {
        approved,
        by: by.to_string(),
    };
    rt.signal(&id, "approval", &decision).await?;
    let h = rt.handle(&id)?;
    let out: String = h.result().await?;
    println!("{}: {out}", id.as_str());
    drop(h);
    rt.shutdown().await?;
    Ok(())
}

async fn status(dir: &Path, id: &str) -> anyhow::Result<()> {
    let rt = Runtime::builder(dir)
        .register("approval", approval)
        .open()
        .await?;
    let id = WorkflowId::new(id)?;
    let info = rt.status(&id)?;
    println!("{}: {:?}", id.as_str(), info.status);
    for entry in rt.history(&id)? {
        println!("  {entry}");
    }
    // Signals sent but not received yet: a decision shows here until the workflow takes it.
    for pending in rt.pending_signals(&id)? {
        println!("  pending signal {pending}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut dir = std::env::temp_dir().join("keel-durable-approval");
    if args.first().map(String::as_str) == Some("--dir") {
        if args.len() < 2 {
            bail!("--dir needs a path");
        }
        dir = PathBuf::from(args.remove(1));
        args.remove(0);
    }
    let arg = |i: usize| args.get(i).map(String::as_str);
    match (arg(0), arg(1)) {
        (Some("start"), Some(id)) => {
            let amount = arg(2).map(str::parse).transpose()?.unwrap_or(100);
            start(&dir, id, amount).await
        }
        (Some("approve"), Some(id)) => decide(&dir, id, true, arg(2).unwrap_or("operator")).await,
        (Some("reject"), Some(id)) => decide(&dir, id, false, arg(2).unwrap_or("operator")).await,
        (Some("status"), Some(id)) => status(&dir, id).await,
        (None, _) => {
            // The demo: two "invocations" in one run, with the journal closed in between.
            let demo = std::env::temp_dir()
                .join(format!("keel-durable-approval-demo-{}", std::process::id()));
            println!("journal: {}", demo.display());
            start(&demo, "deploy-42", 900).await?;
            println!("-- first invocation exited; a human approves later --");
            decide(&demo, "deploy-42", true, "alice").await?;
            let rt = open(&demo).await?;
            let info = rt.status(&WorkflowId::new("deploy-42")?)?;
            assert_eq!(info.status, WorkflowStatus::Succeeded);
            rt.shutdown().await?;
            drop(rt);
            std::fs::remove_dir_all(&demo).ok();
            Ok(())
        }
        _ => bail!(
            "usage: durable_approval [--dir PATH] [start ID [AMOUNT] | approve ID [BY] | reject ID [BY] | status ID]"
        ),
    }
}
