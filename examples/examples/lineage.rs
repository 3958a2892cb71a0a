//! Command-line front end to a durable keel-lineage store.
//!
//! ```text
//! cargo run --release -p keel-examples --example lineage -- --db DIR [--json] <command>
//!   ingest-openlineage <file-or-dir> [--lenient] [--template-base RFC3339]
//!   ingest-dbt <manifest.json>
//!   upstream <node-key> [--depth N]
//!   downstream <node-key> [--depth N]
//!   impact <node-key> [--drop-field F | --deprecate]
//!   search <text>
//!   dot <node-key>
//!   checkpoint
//! ```
//!
//! Node keys are `namespace:name`; fields are `namespace:name#field`. A file may hold one
//! OpenLineage event, a JSON array of events, or one event per line. Marquez seed
//! placeholders (`{{RUN_START_TIME}}`, ...) are resolved against `--template-base` or now.
#![allow(clippy::print_stdout)] // A CLI program reports on stdout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use keel_lineage::{
    At, Direction, LineageGraph, LineageStore, NodeKind, OpenLineageOptions, ProposedChange,
    Search, Subgraph, Timestamp, Walk, nodes, parse_dbt_manifest, parse_openlineage,
};

struct Args {
    db: PathBuf,
    json: bool,
    command: String,
    rest: Vec<String>,
    flags: BTreeMap<String, Option<String>>,
}

const VALUE_FLAGS: [&str; 4] = ["--depth", "--drop-field", "--template-base", "--db"];

fn parse_args() -> anyhow::Result<Args> {
    let mut db = None;
    let mut json = false;
    let mut pos = Vec::new();
    let mut flags = BTreeMap::new();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        if a == "--json" {
            json = true;
        } else if a == "--db" {
            db = Some(PathBuf::from(it.next().context("--db needs a directory")?));
        } else if VALUE_FLAGS.contains(&a.as_str()) {
            let v = it.next().with_context(|| format!("{a} needs a value"))?;
            flags.insert(a, Some(v));
        } else if a.starts_with("--") {
            flags.insert(a, None);
        } else {
            pos.push(a);
        }
    }
    let db = db.context("usage: lineage --db DIR [--json] <command> ... (see the file's doc)")?;
    if pos.is_empty() {
        bail!(
            "missing command: ingest-openlineage, ingest-dbt, upstream, downstream, impact, search, dot"
        );
    }
    let command = pos.remove(0);
    Ok(Args {
        db,
        json,
        command,
        rest: pos,
        flags,
    })
}

fn arg(a: &Args, i: usize, what: &str) -> anyhow::Result<String> {
    a.rest
        .get(i)
        .cloned()
        .with_context(|| format!("{} needs {what}", a.command))
}

fn files_in(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "json" || e == "jsonl" || e == "ndjson")
            })
            .collect();
        v.sort();
        Ok(v)
    } else {
        Ok(vec![path.to_path_buf()])
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

/// Writes large outputs without panicking when the reader goes away (`| head`).
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn walk(a: &Args, g: &LineageGraph, dir: Direction) -> anyhow::Result<()> {
    let key = arg(a, 0, "a node key")?;
    let id = g.find_str(&key)?;
    let mut w = Walk::new(dir);
    if let Some(Some(d)) = a.flags.get("--depth") {
        w = w.max_depth(d.parse().context("--depth needs a number")?);
    }
    let r = g.walk(id, &w)?;
    let rows: Vec<serde_json::Value> = r
        .nodes
        .iter()
        .map(|n| {
            let info = g.info(n.id)?;
            Ok(serde_json::json!({
                "key": info.key.to_string(),
                "kind": info.kind_name,
                "depth": n.depth,
                "via": n.via.map(|v| g.key(v).map(|k| k.to_string())).transpose()?,
                "placeholder": info.placeholder,
            }))
        })
        .collect::<keel_lineage::Result<_>>()?;
    let cycles: Vec<Vec<String>> = r
        .cycles
        .iter()
        .map(|c| {
            c.iter()
                .filter_map(|&i| g.key(i).ok())
                .map(|k| k.to_string())
                .collect()
        })
        .collect();
    if a.json {
        return print_json(&serde_json::json!({
            "start": key, "direction": dir, "nodes": rows, "partial": r.partial, "cycles": cycles,
        }));
    }
    println!(
        "{} of {key}: {} nodes",
        if dir == Direction::Upstream {
            "upstream"
        } else {
            "downstream"
        },
        rows.len()
    );
    for row in &rows {
        println!(
            "  {:>2}  {:<13} {}",
            row["depth"],
            row["kind"].as_str().unwrap_or(""),
            row["key"].as_str().unwrap_or("")
        );
    }
    for c in cycles {
        println!("  cycle: {}", c.join(" <-> "));
    }
    Ok(())
}

fn merged(a: Subgraph, b: Subgraph) -> Subgraph {
    let mut nodes = a.nodes;
    for n in b.nodes {
        if !nodes.iter().any(|m| m.key == n.key) {
            nodes.push(n);
        }
    }
    let mut edges = a.edges;
    for e in b.edges {
        if !edges.contains(&e) {
            edges.push(e);
        }
    }
    Subgraph {
        nodes,
        edges,
        partial: a.partial || b.partial,
    }
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let store = LineageStore::open(&a.db)
        .with_context(|| format!("cannot open store {}", a.db.display()))?;
    match a.command.as_str() {
        "ingest-openlineage" => {
            let path = PathBuf::from(arg(&a, 0, "a file or directory")?);
            let mut opts = if a.flags.contains_key("--lenient") {
                OpenLineageOptions::lenient()
            } else {
                OpenLineageOptions::strict()
            };
            let base = match a.flags.get("--template-base") {
                Some(Some(t)) => {
                    Timestamp::parse_rfc3339(t).context("--template-base is not RFC 3339")?
                }
                _ => Timestamp::now(),
            };
            opts = opts.resolve_templates(base);
            let mut summaries = Vec::new();
            for f in files_in(&path)? {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read {}", f.display()))?;
                let batches = parse_openlineage(&text, &f.display().to_string(), &opts)?;
                let events = batches.len();
                let s = store.apply(batches)?;
                summaries.push(serde_json::json!({"file": f.display().to_string(), "events": events, "summary": s}));
            }
            if a.json {
                print_json(&summaries)?;
            } else {
                for s in &summaries {
                    println!(
                        "{}: {} events, {} nodes created, {} edges created, {} placeholders",
                        s["file"].as_str().unwrap_or(""),
                        s["events"],
                        s["summary"]["nodes_created"],
                        s["summary"]["edges_created"],
                        s["summary"]["placeholders"]
                    );
                }
            }
        }
        "ingest-dbt" => {
            let f = arg(&a, 0, "a manifest.json")?;
            let text = std::fs::read_to_string(&f).with_context(|| format!("cannot read {f}"))?;
            let batch = parse_dbt_manifest(&text, &f)?;
            let s = store.apply(vec![batch])?;
            if a.json {
                print_json(&s)?;
            } else {
                println!(
                    "{f}: {} nodes created, {} edges created, {} placeholders",
                    s.nodes_created, s.edges_created, s.placeholders
                );
            }
        }
        "upstream" => walk(&a, &store.read(), Direction::Upstream)?,
        "downstream" => walk(&a, &store.read(), Direction::Downstream)?,
        "impact" => {
            let g = store.read();
            let key = arg(&a, 0, "a node key")?;
            let id = g.find_str(&key)?;
            let change = if let Some(Some(f)) = a.flags.get("--drop-field") {
                let field = g.find_str(&format!("{key}#{f}"))?;
                ProposedChange::DropField(g.typed::<nodes::Field>(field)?)
            } else if g.kind(id)? == NodeKind::Field {
                ProposedChange::DropField(g.typed::<nodes::Field>(id)?)
            } else if a.flags.contains_key("--deprecate") {
                ProposedChange::Deprecate(id)
            } else {
                ProposedChange::Retire(id)
            };
            let r = g.impact(&change)?;
            if a.json {
                print_json(&r)?;
            } else {
                let s = &r.summary;
                println!(
                    "{}: {} affected ({} break, {} informed), {} services, max severity {:?}",
                    r.change, s.affected, s.breaks, s.informed, s.services, s.max_severity
                );
                for x in &r.affected {
                    println!(
                        "  {:<8} {:<8} d={} {:<13} {}  owner={}",
                        format!("{:?}", x.severity).to_lowercase(),
                        format!("{:?}", x.impact).to_lowercase(),
                        x.distance,
                        x.kind,
                        x.key,
                        x.owner.as_deref().unwrap_or("-")
                    );
                }
                for o in &r.owners {
                    println!(
                        "  notify {} ({} break, {} informed)",
                        o.owner, o.breaks, o.informed
                    );
                }
                for n in &r.notes {
                    println!("  note: {n}");
                }
            }
        }
        "search" => {
            let g = store.read();
            let text = arg(&a, 0, "a search text")?;
            let hits = g.search(&Search::new().text(text));
            if a.json {
                print_json(&hits)?;
            } else {
                for h in &hits {
                    println!(
                        "{:<13} {}{}",
                        h.kind_name,
                        h.key,
                        if h.placeholder { "  (undeclared)" } else { "" }
                    );
                }
                println!("{} matches", hits.len());
            }
        }
        "dot" => {
            let g = store.read();
            let key = arg(&a, 0, "a node key")?;
            let id = g.find_str(&key)?;
            let sg = merged(
                g.subgraph(id, &Walk::upstream())?,
                g.subgraph(id, &Walk::downstream())?,
            );
            if a.json {
                emit(&format!("{}\n", sg.to_json()))?;
            } else {
                emit(&sg.to_dot())?;
            }
        }
        "mermaid" => {
            let g = store.read();
            let id = g.find_str(&arg(&a, 0, "a node key")?)?;
            print!(
                "{}",
                merged(
                    g.subgraph(id, &Walk::upstream())?,
                    g.subgraph(id, &Walk::downstream())?
                )
                .to_mermaid()
            );
        }
        "stats" => {
            let g = store.read();
            let v = serde_json::json!({
                "nodes": g.node_count(), "edges": g.edge_count(), "commits": g.commit_count(),
                "datasets": g.search(&Search::new().kind(NodeKind::Dataset)).len(),
                "all_nodes_ever": g.nodes(At::Cumulative).len(),
            });
            print_json(&v)?;
        }
        "checkpoint" => {
            let n = store.checkpoint()?;
            if a.json {
                print_json(&serde_json::json!({ "commits": n }))?;
            } else {
                println!("checkpoint of {n} commits; the next open replays only later ones");
            }
        }
        other => bail!("unknown command {other:?}"),
    }
    Ok(())
}
