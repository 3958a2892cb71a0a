//! keel-lineage at 1M nodes / 5M edges, against raw floors measured in the same run.
//!
//! - `closure/*`: a downstream closure from the same start node, reaching roughly half the
//!   graph: `floor_csr_bfs` (a bare CSR of `u32` arrays with a `Vec<bool>` visited set and a
//!   queue), `floor_petgraph_bfs` (petgraph's `Bfs` over a bare `Graph<(), ()>`),
//!   `keel_impact_set` (Keel's closure + breaks/informed classification + path
//!   bookkeeping) and `keel_walk` (Keel's plain downstream walk).
//! - `bounded/*`: depth-3 queries from a random node.
//! - One-shot figures printed before the criterion groups: in-memory ingest, heap and RSS for
//!   the graph, CSR snapshot build and full report resolution; after them: the cost of a
//!   copy-on-write commit (what `LineageStore` pays to publish a snapshot) against the same
//!   commit applied in place, durable ingest of the whole graph, and reopen of that store by
//!   replaying its log and again from a checkpoint.
//!
//! Scale with `KEEL_BENCH_NODES` (default 1,000,000; edges are 5x nodes).
//! Run: `cargo bench -p keel-benches --bench lineage_impact`.
#![allow(missing_docs)] // criterion_main! generates an undocumented main.
#![allow(clippy::unwrap_used)] // a bench: failing loudly on setup errors is what we want
#![allow(clippy::print_stdout)] // a bench reports its one-shot figures

use std::collections::VecDeque;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keel_lineage::{
    AnyNodeId, Budget, Change, EdgeKind, LineageGraph, LineageStore, NodeKey, NodeKind, NodeSpec,
    ProposedChange, Timestamp, Walk,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn kind_of(i: usize) -> NodeKind {
    match i {
        _ if i % 1000 == 999 => NodeKind::Service,
        _ if i % 100 == 98 => NodeKind::ModelVersion,
        _ if i % 10 == 7 => NodeKind::Feature,
        _ => NodeKind::Dataset,
    }
}

fn is_data(k: NodeKind) -> bool {
    matches!(k, NodeKind::Dataset | NodeKind::Feature)
}

fn key(i: usize) -> NodeKey {
    NodeKey::new(format!("team{}", i % 64), format!("asset_{i:07}"))
}

/// Edges as (source, consumer) pairs in data-flow direction: every consumer `j` gets up
/// to 5 sources below it, of a kind the schema allows, so the graph is a DAG whose closure
/// from a node in the middle reaches roughly half of it.
fn edges(n: usize, seed: u64) -> Vec<(u32, u32)> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(n * 5);
    for j in 1..n {
        let kj = kind_of(j);
        for _ in 0..5 {
            for _attempt in 0..8 {
                // Mostly local sources, some far ones, so closures are deep and wide.
                let i = if rng.below(4) == 0 {
                    rng.below(j)
                } else {
                    j - 1 - rng.below(j.min(5000))
                };
                let ki = kind_of(i);
                let ok = match kj {
                    NodeKind::Service => ki == NodeKind::ModelVersion,
                    NodeKind::ModelVersion => is_data(ki),
                    _ => is_data(ki),
                };
                if ok {
                    out.push((i as u32, j as u32));
                    break;
                }
            }
        }
    }
    out
}

fn change_for(i: u32, j: u32) -> Change {
    let (i, j) = (i as usize, j as usize);
    let kind = match kind_of(j) {
        NodeKind::Service => EdgeKind::Serves,
        NodeKind::ModelVersion => EdgeKind::TrainedOn,
        _ => EdgeKind::DerivedFrom,
    };
    // All three kinds are declared consumer -> source.
    Change::link(key(j), kind, key(i))
}

fn node_change(i: usize) -> Change {
    let mut s = NodeSpec::with_key(kind_of(i), key(i)).owner(format!("owner{}", i % 100));
    if i.is_multiple_of(7) {
        s = s.tag("pii");
    }
    if i % 1000 == 999 {
        s = s.tag("tier-1");
    }
    Change::Upsert(s)
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |p| p * 4096)
}

const MIB: f64 = 1024.0 * 1024.0;

fn build(n: usize, edge_list: &[(u32, u32)]) -> (LineageGraph, Duration, Duration) {
    let mut g = LineageGraph::new().without_log();
    // Names are `asset_NNNNNNN` (13 bytes); namespaces and owners repeat and intern once.
    g.reserve(n, edge_list.len(), n * 14);
    let t0 = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100_000) {
        g.commit_at(
            Timestamp::EPOCH,
            chunk.iter().map(|&i| node_change(i)).collect(),
        )
        .unwrap();
    }
    let nodes_time = t0.elapsed();
    let t1 = Instant::now();
    for chunk in edge_list.chunks(100_000) {
        g.commit_at(
            Timestamp::EPOCH,
            chunk.iter().map(|&(i, j)| change_for(i, j)).collect(),
        )
        .unwrap();
    }
    (g, nodes_time, t1.elapsed())
}

fn csr_floor(n: usize, edge_list: &[(u32, u32)]) -> (Vec<u32>, Vec<u32>) {
    let mut off = vec![0u32; n + 1];
    for &(s, _) in edge_list {
        off[s as usize + 1] += 1;
    }
    for i in 0..n {
        off[i + 1] += off[i];
    }
    let mut pos = off.clone();
    let mut tgt = vec![0u32; edge_list.len()];
    for &(s, t) in edge_list {
        tgt[pos[s as usize] as usize] = t;
        pos[s as usize] += 1;
    }
    (off, tgt)
}

fn bfs_floor(off: &[u32], tgt: &[u32], start: u32) -> usize {
    let mut seen = vec![false; off.len() - 1];
    let mut q = Vec::with_capacity(1024);
    seen[start as usize] = true;
    q.push(start);
    let mut head = 0;
    while head < q.len() {
        let v = q[head] as usize;
        head += 1;
        for &t in &tgt[off[v] as usize..off[v + 1] as usize] {
            if !seen[t as usize] {
                seen[t as usize] = true;
                q.push(t);
            }
        }
    }
    q.len() - 1
}

fn bench(c: &mut Criterion) {
    let n: usize = std::env::var("KEEL_BENCH_NODES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let edge_list = edges(n, 42);
    let m = edge_list.len();
    println!("lineage_impact: {n} nodes, {m} edges");

    // Ingest and memory.
    let rss0 = rss_bytes();
    let (g, t_nodes, t_edges) = build(n, &edge_list);
    let rss1 = rss_bytes();
    println!(
        "ingest in memory: {n} nodes in {:.2} s ({:.0} nodes/s), {m} edges in {:.2} s ({:.0} edges/s)",
        t_nodes.as_secs_f64(),
        n as f64 / t_nodes.as_secs_f64(),
        t_edges.as_secs_f64(),
        m as f64 / t_edges.as_secs_f64()
    );
    let pre_snapshot = g.memory_usage();
    let t = Instant::now();
    let start = g.find(&key(n / 2)).unwrap();
    let _ = g.walk(start, &Walk::downstream().max_depth(0)).unwrap();
    let t_snap = t.elapsed();
    let mem = g.memory_usage();
    let rss2 = rss_bytes();
    println!(
        "memory: heap accounting {:.1} MiB without snapshot (graph {:.1}, names {:.1}, metadata {:.1}), {:.1} MiB with the CSR snapshot ({:.1}); RSS growth {:.1} MiB after build, {:.1} MiB with snapshot",
        pre_snapshot.total() as f64 / MIB,
        mem.graph as f64 / MIB,
        mem.names as f64 / MIB,
        mem.metadata as f64 / MIB,
        mem.total() as f64 / MIB,
        mem.snapshot as f64 / MIB,
        (rss1.saturating_sub(rss0)) as f64 / MIB,
        (rss2.saturating_sub(rss0)) as f64 / MIB,
    );
    println!("snapshot build: {:.1} ms", t_snap.as_secs_f64() * 1e3);

    // Closure from the middle node.
    let (off, tgt) = csr_floor(n, &edge_list);
    let reach = bfs_floor(&off, &tgt, start.index() as u32);
    let set = g
        .impact_set(&ProposedChange::Retire(start), &Budget::unlimited())
        .unwrap();
    assert_eq!(set.len(), reach, "keel and the floor must agree");
    println!("closure size from the middle node: {reach}");
    let t = Instant::now();
    let report = g.report(&ProposedChange::Retire(start), &set);
    println!(
        "full report resolution (keys, paths, owners, ranking) for {} affected: {:.0} ms",
        report.summary.affected,
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(report);

    let mut pg: petgraph::Graph<(), (), petgraph::Directed, u32> =
        petgraph::Graph::with_capacity(n, m);
    for _ in 0..n {
        pg.add_node(());
    }
    for &(s, t) in &edge_list {
        pg.add_edge(s.into(), t.into(), ());
    }

    let mut group = c.benchmark_group("closure");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group.bench_function("floor_csr_bfs", |b| {
        b.iter(|| black_box(bfs_floor(&off, &tgt, start.index() as u32)))
    });
    group.bench_function("floor_petgraph_bfs", |b| {
        b.iter(|| {
            let mut bfs = petgraph::visit::Bfs::new(&pg, (start.index() as u32).into());
            let mut k = 0usize;
            while bfs.next(&pg).is_some() {
                k += 1;
            }
            black_box(k)
        })
    });
    group.bench_function("keel_impact_set", |b| {
        b.iter(|| {
            black_box(
                g.impact_set(&ProposedChange::Retire(start), &Budget::unlimited())
                    .unwrap()
                    .len(),
            )
        })
    });
    group.bench_function("keel_impact_set_deprecate", |b| {
        b.iter(|| {
            black_box(
                g.impact_set(&ProposedChange::Deprecate(start), &Budget::unlimited())
                    .unwrap()
                    .len(),
            )
        })
    });
    group.bench_function("keel_walk", |b| {
        b.iter(|| {
            black_box(
                g.walk(start, &Walk::downstream().report_cycles(false))
                    .unwrap()
                    .nodes
                    .len(),
            )
        })
    });
    group.finish();
    drop(pg);

    let mut rng = Rng(7);
    let starts: Vec<AnyNodeId> = (0..64)
        .map(|_| g.find(&key(rng.below(n))).unwrap())
        .collect();
    let mut group = c.benchmark_group("bounded");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut i = 0usize;
    group.bench_function("walk_depth3", |b| {
        b.iter(|| {
            i = (i + 1) % starts.len();
            black_box(
                g.walk(
                    starts[i],
                    &Walk::downstream().max_depth(3).report_cycles(false),
                )
                .unwrap()
                .nodes
                .len(),
            )
        })
    });
    group.bench_function("impact_set_depth3", |b| {
        b.iter(|| {
            i = (i + 1) % starts.len();
            black_box(
                g.impact_set(
                    &ProposedChange::Retire(starts[i]),
                    &Budget::unlimited().max_depth(3),
                )
                .unwrap()
                .len(),
            )
        })
    });
    group.bench_function("floor_csr_bfs_depth3", |b| {
        b.iter(|| {
            i = (i + 1) % starts.len();
            // The floor also pays for a fresh visited set, as Keel does.
            let mut seen = vec![false; n];
            let mut frontier = VecDeque::from([(starts[i].index() as u32, 0u32)]);
            seen[starts[i].index()] = true;
            let mut k = 0;
            while let Some((v, d)) = frontier.pop_front() {
                if d == 3 {
                    continue;
                }
                for &t in &tgt[off[v as usize] as usize..off[v as usize + 1] as usize] {
                    if !seen[t as usize] {
                        seen[t as usize] = true;
                        k += 1;
                        frontier.push_back((t, d + 1));
                    }
                }
            }
            black_box(k)
        })
    });
    group.finish();
    copy_on_write(g, n);

    durable(n, &edge_list);
}

/// What publishing a snapshot costs a writer: `LineageStore` applies each commit to a clone
/// that shares storage with the published graph, so the chunks a commit writes are copied.
/// The floor is the same kind of commit applied in place to a graph no snapshot shares.
fn copy_on_write(mut g: LineageGraph, n: usize) {
    let fresh: Vec<(u32, u32)> = edges(n, 43).into_iter().step_by(7).take(200_000).collect();
    let (a, b) = fresh.split_at(fresh.len() / 2);
    let batch = |part: &[(u32, u32)]| -> Vec<Change> {
        part.iter().map(|&(i, j)| change_for(i, j)).collect()
    };
    let one = |i: usize| {
        vec![Change::Upsert(
            NodeSpec::with_key(kind_of(i), key(i)).owner("new-owner"),
        )]
    };
    let (batch_a, batch_b) = (batch(a), batch(b));
    let t = Instant::now();
    let mut next = g.clone();
    let s = next.commit_at(Timestamp::EPOCH, batch_a).unwrap();
    let t_cow = t.elapsed();
    drop(next);
    let t = Instant::now();
    g.commit_at(Timestamp::EPOCH, batch_b).unwrap();
    let t_floor = t.elapsed();
    println!(
        "copy-on-write commit of {} edges on a clone: {:.1} ms; in place: {:.1} ms; ratio {:.2}x",
        s.edges_created,
        t_cow.as_secs_f64() * 1e3,
        t_floor.as_secs_f64() * 1e3,
        t_cow.as_secs_f64() / t_floor.as_secs_f64()
    );
    let rounds = 200u32;
    let t = Instant::now();
    for r in 0..rounds as usize {
        let mut next = g.clone();
        next.commit_at(Timestamp::EPOCH, one(r * 4099 % n)).unwrap();
    }
    let t_cow = t.elapsed() / rounds;
    let t = Instant::now();
    for r in 0..rounds as usize {
        g.commit_at(Timestamp::EPOCH, one(r * 4099 % n + 1))
            .unwrap();
    }
    let t_floor = t.elapsed() / rounds;
    println!(
        "copy-on-write commit of one metadata change: {:.1} us on a clone; {:.1} us in place",
        t_cow.as_secs_f64() * 1e6,
        t_floor.as_secs_f64() * 1e6,
    );
}

fn durable(n: usize, edge_list: &[(u32, u32)]) {
    // Durable ingest: batched commits of 50k changes, each flushed.
    let dir = tempfile::tempdir().unwrap();
    let store = LineageStore::open(dir.path()).unwrap();
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(50_000) {
        store
            .commit_at(
                Timestamp::EPOCH,
                chunk.iter().map(|&i| node_change(i)).collect(),
            )
            .unwrap();
    }
    let t_nodes = t.elapsed();
    let durable_edges = edge_list.len();
    let t = Instant::now();
    for chunk in edge_list[..durable_edges].chunks(50_000) {
        store
            .commit_at(
                Timestamp::EPOCH,
                chunk.iter().map(|&(i, j)| change_for(i, j)).collect(),
            )
            .unwrap();
    }
    let t_edges = t.elapsed();
    println!(
        "ingest durable (50k changes per flushed commit, automatic checkpoints included): {n} nodes at {:.0} nodes/s, {durable_edges} edges at {:.0} edges/s",
        n as f64 / t_nodes.as_secs_f64(),
        durable_edges as f64 / t_edges.as_secs_f64()
    );
    drop(store);
    // Floor: what sled itself costs to open the same database and read every log entry.
    let t = Instant::now();
    let db = sled::open(dir.path()).unwrap();
    let tree = db.open_tree("log").unwrap();
    let bytes: usize = tree.iter().map(|e| e.unwrap().1.len()).sum();
    let floor = t.elapsed();
    drop(tree);
    drop(db);
    // The store as the ingest left it: its last automatic checkpoint plus the log after it.
    let t = Instant::now();
    let usual = LineageStore::open(dir.path()).unwrap();
    let usual_reopen = t.elapsed();
    println!(
        "reopen as the ingest left it (last automatic checkpoint + the log after it, plus any checkpoint that open writes): {} nodes in {:.2} s",
        usual.read().node_count(),
        usual_reopen.as_secs_f64()
    );
    drop(usual);
    // Commits checkpoint automatically; remove the last one so this open replays the whole
    // log (the worst case: a store whose checkpoint was lost). It then writes a checkpoint of
    // its own, which is included in the time.
    let _ = std::fs::remove_file(dir.path().join("checkpoint.bin"));
    let t = Instant::now();
    let store = LineageStore::open(dir.path()).unwrap();
    let reopen = t.elapsed();
    let g = store.read();
    println!(
        "reopen replaying the whole log (plus writing its checkpoint): {} nodes, {} edges rebuilt in {:.2} s; floor (sled open + read {:.0} MiB of log) {:.2} s; ratio {:.1}x",
        g.node_count(),
        g.edge_count(),
        reopen.as_secs_f64(),
        bytes as f64 / MIB,
        floor.as_secs_f64(),
        reopen.as_secs_f64() / floor.as_secs_f64()
    );
    drop(g);
    let t = Instant::now();
    store.checkpoint().unwrap();
    let t_ckpt = t.elapsed();
    drop(store);
    // Floor: reading the checkpoint file into memory.
    let t = Instant::now();
    let size = std::fs::read(dir.path().join("checkpoint.bin"))
        .unwrap()
        .len();
    let floor = t.elapsed();
    let t = Instant::now();
    let store = LineageStore::open(dir.path()).unwrap();
    let reopen = t.elapsed();
    let g = store.read();
    println!(
        "reopen from a checkpoint: {} nodes, {} edges in {:.2} s (checkpoint of {:.0} MiB written in {:.2} s); floor (reading the file) {:.2} s; ratio {:.1}x",
        g.node_count(),
        g.edge_count(),
        reopen.as_secs_f64(),
        size as f64 / MIB,
        t_ckpt.as_secs_f64(),
        floor.as_secs_f64(),
        reopen.as_secs_f64() / floor.as_secs_f64()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
