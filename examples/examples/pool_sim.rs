//! Simulates the reference workload (200,000 queries/s, 50 in / 50 out tokens) over a fleet of
//! continuously batching replicas behind many client-side balancers, and compares power of two
//! choices with full-scan least-loaded, uniform random and round-robin.
//!
//! ```text
//! cargo run --release -p keel-examples --example pool_sim -- [--seed N] [--qps Q]
//!     [--replicas N] [--duration-s S] [--balancers B] [--info-period-ms MS]
//!     [--search-duration-s S] [--no-search] [--svg PATH]
//! ```
//!
//! It prints three Markdown tables (the main run with one replica degrading mid-run, the same
//! run with one replica failing mid-run, and the fleet size each policy needs for p99 < 1 s) and
//! writes an SVG plot of p99 latency over time per policy.
#![allow(clippy::print_stdout)] // A CLI program reports on stdout.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_serving::{Policy, SimConfig, SimPolicyReport};

struct Args {
    cfg: SimConfig,
    search: bool,
    search_duration: Duration,
    svg: String,
}

fn parse() -> anyhow::Result<Args> {
    let mut cfg = SimConfig::default();
    let mut search = true;
    let mut search_duration = Duration::from_secs(10);
    let mut svg = "docs/pool-sim-latency.svg".to_owned();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seed" => cfg.seed = value()?.parse()?,
            "--qps" => cfg.qps = value()?.parse()?,
            "--replicas" => cfg.replicas = value()?.parse()?,
            "--duration-s" => cfg.duration = Duration::from_secs_f64(value()?.parse()?),
            "--balancers" => cfg.balancers = value()?.parse()?,
            "--info-period-ms" => {
                cfg.info_period = Duration::from_secs_f64(value()?.parse::<f64>()? / 1e3);
            }
            "--search-duration-s" => {
                search_duration = Duration::from_secs_f64(value()?.parse()?);
            }
            "--no-search" => search = false,
            "--svg" => svg = value()?,
            "--help" | "-h" => {
                println!(
                    "usage: pool_sim [--seed N] [--qps Q] [--replicas N] [--duration-s S] \
                     [--balancers B] [--info-period-ms MS] [--search-duration-s S] [--no-search] [--svg PATH]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other} (try --help)"),
        }
    }
    if cfg.replicas < 3 || cfg.balancers == 0 || cfg.qps <= 0.0 {
        bail!("need at least 3 replicas, 1 balancer and a positive --qps");
    }
    cfg.warmup = cfg.duration / 10;
    cfg.degrade_at = Some(cfg.duration / 2);
    Ok(Args {
        cfg,
        search,
        search_duration,
        svg,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn table(title: &str, runs: &[SimPolicyReport]) {
    println!("\n### {title}\n");
    println!(
        "| policy | p50 ms | p99 ms | p99.9 ms | max ms | TTFT p99 ms | max queue | requests | failed | retried | success |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.4}% |",
            r.policy.name(),
            ms(r.latency.p50),
            ms(r.latency.p99),
            ms(r.latency.p999),
            ms(r.latency.max),
            ms(r.ttft.p99),
            r.max_queue_depth,
            r.requests,
            r.failed,
            r.retried,
            r.success_rate() * 100.0
        );
    }
}

/// A line chart of p99 latency over time, one line per policy, on a log scale.
fn svg(runs: &[SimPolicyReport], cfg: &SimConfig) -> String {
    let (w, h, left, right, top, bottom) = (760.0, 420.0, 70.0, 150.0, 30.0, 50.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let t_max = cfg.duration.as_secs_f64();
    let (lo, hi) = (10.0_f64.log10(), 100_000.0_f64.log10()); // 10 ms .. 100 s
    let x = |t: f64| left + t / t_max * pw;
    let y = |ms: f64| top + ph - ((ms.max(10.0).log10() - lo) / (hi - lo)).clamp(0.0, 1.0) * ph;
    let colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"];
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="18" text-anchor="middle" font-size="14">p99 latency by arrival time ({} replicas, {:.0} queries/s, {} balancers)</text>
"#,
        left + pw / 2.0,
        cfg.replicas,
        cfg.qps,
        cfg.balancers
    );
    for ms in [10.0, 100.0, 1_000.0, 10_000.0, 100_000.0] {
        let yy = y(ms);
        let label = if ms >= 1000.0 {
            format!("{} s", ms / 1000.0)
        } else {
            format!("{ms} ms")
        };
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0
        );
    }
    let step = (t_max / 10.0).max(1.0).round();
    let mut t = 0.0;
    while t <= t_max + 1e-9 {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{t:.0}</text>"#,
            x(t),
            top + ph + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">arrival time (s); one replica degrades 4x at {:.0} s</text>"#,
        left + pw / 2.0,
        h - 12.0,
        cfg.degrade_at.unwrap_or_default().as_secs_f64()
    );
    let one_s = y(1000.0);
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{}" y1="{one_s}" y2="{one_s}" stroke="#c00" stroke-dasharray="4 3"/>"##,
        left + pw
    );
    for (i, r) in runs.iter().enumerate() {
        let c = colours[i % colours.len()];
        let pts: Vec<String> = r
            .timeline
            .iter()
            .filter(|(_, p99)| !p99.is_zero())
            .map(|(t, p99)| {
                format!(
                    "{:.1},{:.1}",
                    x(t.as_secs_f64() + cfg.timeline_bucket.as_secs_f64() / 2.0),
                    y(p99.as_secs_f64() * 1e3)
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = top + 20.0 + i as f64 * 20.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            left + pw + 10.0,
            left + pw + 35.0,
            left + pw + 40.0,
            ly + 4.0,
            r.policy.name()
        );
    }
    s.push_str("</svg>\n");
    s
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let cfg = &args.cfg;
    let t0 = Instant::now();
    println!(
        "pool_sim: {:.0} queries/s of {} in / {} out tokens for {:?}; {} replicas of {:.0} queries/s each at full batch ({:.0}% of them {}x slower); {} balancers seeing load {:?} late; seed {}",
        cfg.qps,
        cfg.input_tokens,
        cfg.output_tokens,
        cfg.duration,
        cfg.replicas,
        cfg.capacity_per_replica(),
        cfg.slow_fraction * 100.0,
        cfg.slow_factor,
        cfg.balancers,
        cfg.info_period,
        cfg.seed
    );

    let main_run = cfg.run_all()?;
    table(
        &format!(
            "{} replicas; replica {} degrades {}x at {:?}",
            cfg.replicas,
            cfg.replicas / 3,
            cfg.degrade_factor,
            cfg.degrade_at.unwrap_or_default()
        ),
        &main_run.policies,
    );
    std::fs::write(&args.svg, svg(&main_run.policies, cfg))
        .with_context(|| format!("writing {}", args.svg))?;
    println!("\n(plot written to {})", args.svg);

    let mut failing = cfg.clone();
    failing.fail_at = cfg.degrade_at;
    failing.degrade_at = None;
    table(
        &format!(
            "{} replicas; replica {} fails at {:?}",
            cfg.replicas,
            2 * cfg.replicas / 3,
            failing.fail_at.unwrap_or_default()
        ),
        &failing.run_all()?.policies,
    );

    if args.search {
        let mut c = cfg.clone();
        c.duration = args.search_duration;
        c.warmup = c.duration / 10;
        c.degrade_at = Some(c.duration / 2);
        let min = (c.qps / c.capacity_per_replica()).ceil() as usize;
        let max = min * 3;
        println!(
            "\n### Fleet needed for p99 < 1 s ({:?} runs, degrading replica included)\n",
            c.duration
        );
        println!("| policy | replicas | vs least-loaded | vs 1 ms-fresh least-loaded |");
        println!("|---|---:|---:|---:|");
        let found = Policy::ALL
            .iter()
            .map(|&p| Ok((p, c.fleet_needed(p, Duration::from_secs(1), min, max)?)))
            .collect::<anyhow::Result<Vec<(Policy, Option<usize>)>>>()?;
        let ll = found
            .iter()
            .find(|(p, _)| *p == Policy::LeastLoaded)
            .and_then(|(_, n)| *n);
        // The idealised baseline: least-loaded with load information 1 ms old.
        let mut fresh = c.clone();
        fresh.info_period = Duration::from_millis(1);
        let oracle = fresh.fleet_needed(Policy::LeastLoaded, Duration::from_secs(1), min, max)?;
        let rows = found
            .iter()
            .map(|(p, n)| (p.name().to_owned(), *n))
            .chain([("least-loaded, 1 ms-fresh load".to_owned(), oracle)]);
        for (name, n) in rows {
            let n_s = n.map_or(format!("> {max}"), |n| n.to_string());
            let ratio = |base: Option<usize>| match (n, base) {
                (Some(n), Some(l)) => format!("{:.2}x", n as f64 / l as f64),
                _ => "-".to_owned(),
            };
            println!("| {name} | {n_s} | {} | {} |", ratio(ll), ratio(oracle));
        }
    }
    println!(
        "\n(simulated in {:.1} s of wall time)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
