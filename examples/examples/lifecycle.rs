//! The main job: ship a model version to a service safely, with keel-lineage, keel-serving and
//! keel-durable composed in one host application (see docs/guide.md).
//!
//! ```text
//! scripts/fetch-model   # once: downloads SmolLM2-135M-Instruct into models/
//! cargo run --release -p keel-examples --example lifecycle -- [--data DIR] [--approve]
//!     [--crash-after STEP] [--model PATH] [--approver NAME] [--eval-cases N]
//!     [--max-tokens N] [--requests N] [--concurrency N] [--replicas N] [--eval-faults N]
//! ```
//!
//! The first run registers the lineage, evaluates v1, prints the impact report and waits for
//! approval (or goes on at once with `--approve`), then deploys v1, serves a burst and prints
//! the service's lineage. The next run ships v2 (the same weights, re-registered with another
//! serving configuration) and drains v1. `--crash-after STEP` (a step name or number) exits
//! with status 137 right after that step, as if killed; the same command resumes.
#![allow(clippy::print_stdout)] // a CLI program reports on stdout

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use keel_examples::lifecycle::{self, CrashMode, Options, Outcome, Step};

fn usage() -> String {
    let steps: Vec<&str> = Step::ALL.iter().map(|s| s.name()).collect();
    format!(
        "usage: lifecycle [--data DIR] [--approve] [--crash-after STEP] [--model PATH] [--approver NAME]\n\
         \x20      [--eval-cases N] [--max-tokens N] [--requests N] [--concurrency N] [--replicas N] [--eval-faults N]\n\
         steps: {} (or 1..={})",
        steps.join(", "),
        steps.len()
    )
}

fn parse() -> anyhow::Result<Options> {
    let mut o = Options::new("keel-data");
    o.crash_mode = CrashMode::Exit;
    if let Ok(user) = std::env::var("USER") {
        o.approver = user;
    }
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .with_context(|| format!("{flag} needs a value\n{}", usage()))
        };
        match flag.as_str() {
            "--data" => o.data_dir = PathBuf::from(value()?),
            "--approve" => o.approve = true,
            "--crash-after" => o.crash_after = Some(value()?.parse()?),
            "--model" => o.model = Some(PathBuf::from(value()?)),
            "--approver" => o.approver = value()?,
            "--eval-cases" => o.eval_cases = value()?.parse()?,
            "--max-tokens" => {
                let n: u32 = value()?.parse()?;
                o.eval_max_tokens = n;
                o.burst.max_tokens = n;
            }
            "--requests" => o.burst.requests = value()?.parse()?,
            "--concurrency" => o.burst.concurrency = value()?.parse()?,
            "--replicas" => o.replicas = value()?.parse()?,
            "--eval-faults" => o.eval_faults = value()?.parse()?,
            "-h" | "--help" => bail!("{}", usage()),
            other => bail!("unknown flag {other}\n{}", usage()),
        }
    }
    if o.eval_cases == 0 || o.burst.requests == 0 || o.replicas == 0 {
        bail!("--eval-cases, --requests and --replicas must be at least 1");
    }
    Ok(o)
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(lifecycle::run(&opts)) {
        Ok(report) => match report.outcome {
            Outcome::Finished(_) | Outcome::AwaitingApproval => ExitCode::SUCCESS,
            // Only with CrashMode::Return, which this program does not use.
            _ => ExitCode::from(137),
        },
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
