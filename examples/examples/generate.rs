//! Prompt in, streamed text out, on the real model.
//!
//! ```text
//! cargo run --release -p keel-examples --example generate -- \
//!     [--model PATH] [--raw] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]
//!     [--min-p P] [--repeat-penalty R] [--seed S] [--stop STR] "prompt text"
//! ```
//! Without `--raw` the prompt is sent as a chat message through the model's chat template.
#![allow(clippy::print_stdout)] // a CLI program reports on stdout

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use keel_serving::{ChatMessage, Engine, GenerateRequest, SamplingParams, StreamEvent};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut model: Option<PathBuf> = None;
    let mut raw = false;
    let mut params = SamplingParams::greedy().max_tokens(128);
    let mut stops = Vec::new();
    let mut prompt = None;
    while let Some(a) = args.next() {
        let mut val = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--model" => model = Some(val("--model")?.into()),
            "--raw" => raw = true,
            "--max-tokens" => params = params.max_tokens(val(&a)?.parse()?),
            "--temperature" => params = params.temperature(val(&a)?.parse()?),
            "--top-k" => params = params.top_k(val(&a)?.parse()?),
            "--top-p" => params = params.top_p(val(&a)?.parse()?),
            "--min-p" => params = params.min_p(val(&a)?.parse()?),
            "--repeat-penalty" => params = params.repetition_penalty(val(&a)?.parse()?),
            "--seed" => params = params.seed(val(&a)?.parse()?),
            "--stop" => stops.push(val(&a)?),
            "-h" | "--help" => {
                println!(
                    "usage: generate [--model PATH] [--raw] [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repeat-penalty R] [--seed S] [--stop STR] PROMPT"
                );
                return Ok(());
            }
            other if other.starts_with("--") => bail!("unknown flag {other}"),
            other => prompt = Some(other.to_string()),
        }
    }
    let prompt = prompt.unwrap_or_else(|| "Name three primary colors.".to_string());
    let params = params.stop_strings(stops);
    let mut builder = Engine::builder().kv_blocks(64);
    if let Some(m) = &model {
        builder = builder.model_path(m);
    }
    let engine = match builder.build() {
        Ok(e) => e,
        Err(e @ keel_serving::Error::ModelNotFound { .. }) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
        Err(e) => return Err(e.into()),
    };
    let request = if raw {
        GenerateRequest::text(prompt)
    } else {
        GenerateRequest::chat([ChatMessage::user(prompt)])
    }
    .sampling(params);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut stream = engine.generate(request)?;
        let mut out = std::io::stdout();
        while let Some(ev) = stream.next().await {
            match ev? {
                StreamEvent::Token(d) => {
                    print!("{}", d.text());
                    out.flush()?;
                }
                StreamEvent::Done(s) => {
                    print!("{}", s.trailing_text);
                    let decode = s.timings.total.saturating_sub(s.timings.time_to_first_token);
                    let tps = if s.usage.completion_tokens > 1 {
                        (s.usage.completion_tokens - 1) as f64 / decode.as_secs_f64()
                    } else {
                        0.0
                    };
                    println!(
                        "\n[{:?}; {} prompt + {} generated tokens; ttft {:.0} ms; {:.1} tokens/s decode]",
                        s.finish_reason,
                        s.usage.prompt_tokens,
                        s.usage.completion_tokens,
                        s.timings.time_to_first_token.as_secs_f64() * 1e3,
                        tps
                    );
                }
                _ => {}
            }
        }
        engine.shutdown().await;
        Ok(())
    })
}
