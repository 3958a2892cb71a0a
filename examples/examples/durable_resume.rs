//! A multi-step workflow that survives its own crash.
//!
//! ```text
//! cargo run --release -p keel-examples --example durable_resume -- --crash-after 3
//! cargo run --release -p keel-examples --example durable_resume
//! ```
//!
//! The first run aborts the process right after step 3 is journaled. The second run opens
//! the same journal, replays steps 1 to 3 from it (their closures do not run again) and runs
//! steps 4 and 5. A third run finds the workflow finished and prints its result without running
//! anything (the workflow ID is the idempotency key). `--fresh` deletes the journal first;
//! `--dir PATH` picks the journal directory (default: `keel-durable-resume` in the temp dir).
#![allow(clippy::print_stdout)] // a CLI program reports on stdout

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use keel_durable::{Context, Runtime, StepError, WorkflowId, WorkflowStatus};

const STEPS: [&str; 5] = ["fetch-data", "clean", "train", "evaluate", "publish"];

struct Args {
    dir: PathBuf,
    crash_after: Option<usize>,
    fresh: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        dir: std::env::temp_dir().join("keel-durable-resume"),
        crash_after: None,
        fresh: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--crash-after" => {
                let n: usize = it
                    .next()
                    .context("--crash-after needs a step number")?
                    .parse()
                    .context("--crash-after needs a step number")?;
                if !(1..=STEPS.len()).contains(&n) {
                    bail!("--crash-after takes 1..={}", STEPS.len());
                }
                args.crash_after = Some(n);
            }
            "--dir" => args.dir = PathBuf::from(it.next().context("--dir needs a path")?),
            "--fresh" => args.fresh = true,
            "--help" | "-h" => {
                println!(
                    "durable_resume [--crash-after N] [--fresh] [--dir PATH]\n\n\
                     Runs a {}-step workflow; --crash-after N aborts the process right after \
                     step N is journaled. Run it again to resume: journaled steps are \
                     replayed, the rest run.",
                    STEPS.len()
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; try --help"),
        }
    }
    Ok(args)
}

/// The workflow: five steps, each printing whether it ran or was replayed.
async fn pipeline(ctx: Context, crash_after: Option<usize>) -> anyhow::Result<String> {
    let mut acc = String::from("model");
    for (i, name) in STEPS.iter().enumerate() {
        // Asked just before the step: will its outcome come from the journal?
        let replayed = ctx.is_replaying();
        let prev = acc.clone();
        acc = ctx
            .step(name, || {
                let prev = prev.clone();
                async move {
                    // A stand-in for real work: a slow, side-effecting call.
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    Ok::<_, StepError>(format!("{prev}+{name}"))
                }
            })
            .await?;
        let how = if replayed {
            "replayed from the journal"
        } else {
            "ran"
        };
        println!("step {} {name:<10} {how}", i + 1);
        if crash_after == Some(i + 1) && !replayed {
            println!(
                "crashing now (abort) with step {} journaled; run again to resume",
                i + 1
            );
            std::process::abort();
        }
    }
    Ok(acc)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if args.fresh && args.dir.exists() {
        std::fs::remove_dir_all(&args.dir).context("removing the old journal")?;
    }
    println!("journal: {}", args.dir.display());
    let crash_after = args.crash_after;
    let runtime = Runtime::builder(&args.dir)
        .register("pipeline", move |ctx: Context, (): ()| {
            pipeline(ctx, crash_after)
        })
        .open()
        .await?;
    tokio::spawn(runtime.worker()?.run());
    let id = WorkflowId::new("nightly-pipeline")?;
    match runtime.status(&id) {
        Ok(info) if info.status == WorkflowStatus::Succeeded => {
            println!("workflow already finished; nothing runs again");
        }
        Ok(info) => println!("resuming workflow ({:?})", info.status),
        Err(_) => println!("starting a new workflow"),
    }
    let handle = runtime.start("pipeline", &id, &()).await?;
    let out: String = handle.result().await?;
    println!("result: {out}");
    println!("journal of {}:", id.as_str());
    for entry in runtime.history(&id)? {
        println!("  {entry}");
    }
    drop(handle);
    runtime.shutdown().await?;
    Ok(())
}
