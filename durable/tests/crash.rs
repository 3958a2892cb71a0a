//! The crash test: a child process runs many workflows and is killed with SIGKILL at seeded
//! random moments, then restarted, until everything finishes; then the ledger is checked.
//!
//! How it works: this file is a `harness = false` test (see `durable/Cargo.toml`), so the same
//! binary is both parent and child. Run normally, `main` is the parent: it re-executes its own
//! binary (`std::env::current_exe`) with `KEEL_CRASH_CHILD=1` and the paths of a journal
//! directory and a ledger file, kills that child at a random moment with `SIGKILL`
//! (`Child::kill`), and repeats at least 20 times before letting a last child run to the end.
//!
//! The child starts `JOBS` workflows (idempotently, by ID). Each runs four steps, sleeps
//! durably between steps 1 and 2, and waits for a signal between steps 2 and 3. Every side
//! effect appends one line to the ledger, an append-only file outside the journal:
//! - `run i s n` when step `s` of job `i` starts executing its closure, `n` being that run's
//!   nonce, which the step's output carries,
//! - `jour i s v` after `ctx.step` returned value `v` (so the value was journaled),
//! - `woke i ms` after the sleep, with the journaled time elapsed since before it,
//! - `sending i v` before signalling job `i` with value `v` (unique per attempt), and `sent i`
//!   once that signal was durably sent,
//! - `result i v` when job `i`'s result is known.
//!
//! The checks: every job finished with the right result; no step ran again after the run whose
//! output was journaled (the result names that run by its nonce, so a re-run after the commit
//! is caught even if the process died before writing `jour`; any re-run is of a step whose
//! result was not yet journaled); no step ran after its first `jour` line; every journaled
//! value of a step is the same and equals what the result holds; every job got one of the
//! values sent to it; every job's timer fired, after at least its duration. At the end the
//! parent opens the journal and checks that no delivered signal is also still buffered and no
//! signal is buffered twice (a signal is delivered at most once across crashes).
//!
//! If a child finishes its workflows before the parent kills it (a fast machine), the parent
//! checks that round's ledger and the next child gets a fresh round of workflows (new IDs, a
//! new ledger, the same journal), so the number of kills never depends on the machine's speed.
//!
//! Once, while the first child holds the journal, the parent tries to open it too and must get
//! `Error::AlreadyOpen`.
//!
//! The seed comes from `KEEL_CRASH_SEED` (default fixed), and is printed so a failure can be
//! replayed: `KEEL_CRASH_SEED=<seed> cargo test -p keel-durable --test crash`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a failed unwrap is a failed test

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_durable::{Context, Error, Runtime, StepError, WorkflowId};

const JOBS: u32 = 100;
const STEPS: u32 = 4;
const KILLS: u32 = 24;

fn main() {
    if std::env::var_os("KEEL_CRASH_CHILD").is_some() {
        child();
    } else {
        parent();
    }
}

/// splitmix64, so the kill schedule depends only on the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Written by a child whose runtime failed to open the journal (see `child`).
fn open_failed_marker(dir: &Path) -> PathBuf {
    dir.with_extension("open-failed")
}

/// Fails the test if a child could not open the journal, however the child then ended.
fn assert_opened(dir: &Path, seed: u64) {
    if let Ok(why) = std::fs::read_to_string(open_failed_marker(dir)) {
        panic!("a child could not open the journal after a kill: {why} (seed {seed})");
    }
}

fn spawn_child(dir: &Path, ledger: &Path, round: u32) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .env("KEEL_CRASH_CHILD", "1")
        .env("KEEL_CRASH_DIR", dir)
        .env("KEEL_CRASH_LEDGER", ledger)
        .env("KEEL_CRASH_ROUND", round.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child")
}

fn parent() {
    let seed: u64 = std::env::var("KEEL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6b65_656c);
    eprintln!("crash test: seed {seed} (replay with KEEL_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("journal");
    let ledger_of = |round: u32| tmp.path().join(format!("ledger-{round}.txt"));
    let started = Instant::now();
    let mut kills = 0;
    let mut round = 0;
    let mut reruns = 0;
    let mut delivered = Vec::new();
    while kills < KILLS {
        let ledger = ledger_of(round);
        let mut child = spawn_child(&dir, &ledger, round);
        if kills == 0 && round == 0 {
            second_process_is_refused(&dir, &ledger, &mut child);
        }
        let delay = Duration::from_millis(20 + rng.next() % 130);
        std::thread::sleep(delay);
        if let Some(status) = child.try_wait().unwrap() {
            // The child finished its round before the kill (a fast machine): check the round
            // and give the next child a fresh set of workflows, so the kill count never
            // depends on the machine's speed.
            assert!(status.success(), "child failed: {status} (seed {seed})");
            let r = check_ledger(&std::fs::read_to_string(&ledger).unwrap(), seed);
            reruns += r.reruns;
            delivered.push(r.delivered);
            round += 1;
            continue;
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        assert_opened(&dir, seed);
        kills += 1;
    }
    let ledger = ledger_of(round);
    let mut last = spawn_child(&dir, &ledger, round);
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = last.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            last.kill().unwrap();
            panic!("final child did not finish within 90 s (seed {seed})");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        status.success(),
        "final child failed: {status} (seed {seed})"
    );
    let r = check_ledger(&std::fs::read_to_string(&ledger).unwrap(), seed);
    reruns += r.reruns;
    delivered.push(r.delivered);
    check_signals(&dir, &delivered, seed);
    eprintln!(
        "crash test: {kills} kills over {} round(s), {reruns} step re-runs before journaling, \
         ok in {:?}",
        round + 1,
        started.elapsed()
    );
}

/// While a child holds the journal (it has written to the ledger), this process must get
/// `AlreadyOpen` rather than a second recovery of the same workflows.
fn second_process_is_refused(dir: &Path, ledger: &Path, child: &mut std::process::Child) {
    let before = std::fs::metadata(ledger).map(|m| m.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(ledger).map(|m| m.len()).unwrap_or(0) == before {
        assert!(
            Instant::now() < deadline,
            "the child made no progress in 10 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(Runtime::builder(dir).open());
    if r.is_ok() && child.try_wait().unwrap().is_some() {
        // The child already finished and released the journal: nothing to check this time.
        return;
    }
    assert!(
        matches!(r, Err(Error::AlreadyOpen { .. })),
        "a second process opened a journal in use: {r:?}"
    );
}

/// What one round's ledger showed: how many steps ran more than once (all before journaling),
/// and the signal value each job received.
struct Round {
    reruns: usize,
    delivered: HashMap<u32, u64>,
}

/// Checks one round's ledger.
fn check_ledger(text: &str, seed: u64) -> Round {
    let mut runs_after_jour = Vec::new();
    let mut journaled: HashMap<(u32, u32), String> = HashMap::new();
    // Every run of a step, in ledger order: (line number, nonce).
    let mut runs: HashMap<(u32, u32), Vec<(usize, String)>> = HashMap::new();
    let mut results: HashMap<u32, String> = HashMap::new();
    let mut sending: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut woke: HashMap<u32, u64> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["run", i, s, nonce] => {
                let key = (i.parse().unwrap(), s.parse().unwrap());
                runs.entry(key).or_default().push((n, (*nonce).to_string()));
                if journaled.contains_key(&key) {
                    runs_after_jour.push(key);
                }
            }
            ["jour", i, s, v] => {
                let key = (i.parse().unwrap(), s.parse().unwrap());
                let prev = journaled.entry(key).or_insert_with(|| (*v).to_string());
                assert_eq!(
                    prev, v,
                    "step {key:?} was journaled with two values (seed {seed})"
                );
            }
            ["woke", i, ms] => {
                woke.insert(i.parse().unwrap(), ms.parse().unwrap());
            }
            ["sending", i, v] => sending
                .entry(i.parse().unwrap())
                .or_default()
                .push(v.parse().unwrap()),
            ["result", i, v] => {
                results.insert(i.parse().unwrap(), (*v).to_string());
            }
            _ => {}
        }
    }
    assert!(
        runs_after_jour.is_empty(),
        "steps ran again after their result was journaled: {runs_after_jour:?} (seed {seed})"
    );
    let mut delivered = HashMap::new();
    for i in 0..JOBS {
        let got = results
            .get(&i)
            .unwrap_or_else(|| panic!("job {i} has no result (seed {seed})"));
        let parts: Vec<&str> = got.split(',').collect();
        assert_eq!(
            parts.len(),
            STEPS as usize + 1,
            "job {i} result {got} (seed {seed})"
        );
        for s in 0..STEPS {
            let value = parts[s as usize];
            // The result holds what the journal holds.
            if let Some(j) = journaled.get(&(i, s)) {
                assert_eq!(
                    j, value,
                    "job {i} step {s}: journal and result differ (seed {seed})"
                );
            }
            // The journaled value names the run that produced it; no run of the step may come
            // after that one, since its result was journaled by then.
            let nonce = value.rsplit('.').next().unwrap_or_default();
            let step_runs = runs.get(&(i, s)).map(Vec::as_slice).unwrap_or_default();
            let Some(at) = step_runs.iter().position(|(_, n)| n == nonce) else {
                panic!("job {i} step {s}: no run produced the journaled {value} (seed {seed})");
            };
            assert!(
                at + 1 == step_runs.len(),
                "job {i} step {s} ran again after the run whose output was journaled: {step_runs:?} (seed {seed})"
            );
        }
        let sig: u64 = parts[STEPS as usize]
            .strip_prefix("sig")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("job {i} result {got} has no signal (seed {seed})"));
        assert!(
            sending.get(&i).is_some_and(|v| v.contains(&sig)),
            "job {i} got signal {sig}, which was never sent to it (seed {seed})"
        );
        delivered.insert(i, sig);
        let ms = woke
            .get(&i)
            .unwrap_or_else(|| panic!("job {i}'s timer never fired (seed {seed})"));
        assert!(
            *ms >= sleep_ms(i),
            "job {i} woke after {ms} ms (seed {seed})"
        );
    }
    Round {
        reruns: runs.values().filter(|r| r.len() > 1).count(),
        delivered,
    }
}

/// After every round: no signal that a job received is still buffered for it, and no signal
/// is buffered twice, so none was delivered twice or duplicated by a crash.
fn check_signals(dir: &Path, rounds: &[HashMap<u32, u64>], seed: u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let runtime = Runtime::builder(dir)
            .register("job", job(PathBuf::from("/dev/null")))
            .open()
            .await
            .expect("open after the last child");
        for (round, delivered) in rounds.iter().enumerate() {
            for (i, sig) in delivered {
                let id = WorkflowId::new(format!("r{round}-job-{i}")).unwrap();
                let pending: Vec<String> = runtime
                    .pending_signals(&id)
                    .unwrap()
                    .into_iter()
                    .map(|p| p.value)
                    .collect();
                assert!(
                    !pending.contains(&sig.to_string()),
                    "job {i} of round {round} received {sig} and still has it buffered (seed {seed})"
                );
                let distinct: std::collections::HashSet<&String> = pending.iter().collect();
                assert_eq!(
                    distinct.len(),
                    pending.len(),
                    "job {i} of round {round} has a signal buffered twice: {pending:?} (seed {seed})"
                );
            }
        }
        runtime.shutdown().await.unwrap();
    });
}

/// The signal job `i` gets from the child with process id `pid`.
fn signal_value(i: u32, pid: u32) -> u64 {
    (u64::from(i) << 32) | u64::from(pid)
}

fn sleep_ms(i: u32) -> u64 {
    u64::from(i % 5) * 40
}

fn append(ledger: &Path, line: String) {
    // One `write` per line on an O_APPEND file: SIGKILL cannot tear it, and the page cache
    // keeps it after the process dies.
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(ledger)
        .unwrap();
    f.write_all(line.as_bytes()).unwrap();
}

fn job(
    ledger: PathBuf,
) -> impl Fn(
    Context,
    u32,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<String, Error>> + Send>>
+ Send
+ Sync
+ 'static {
    move |ctx: Context, i: u32| {
        let ledger = ledger.clone();
        Box::pin(async move {
            let mut parts = Vec::new();
            for s in 0..STEPS {
                let l = ledger.clone();
                let v: String = ctx
                    .step(&format!("s{s}"), || {
                        let l = l.clone();
                        async move {
                            // The run's nonce (time of day in nanoseconds, unique per run),
                            // logged first and carried in the output.
                            let nanos = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap_or_default()
                                .as_nanos();
                            append(&l, format!("run {i} {s} {nanos}\n"));
                            // A stand-in for a slow API call, so kills land mid-step too.
                            tokio::time::sleep(Duration::from_millis(10 + u64::from((i + s) % 10)))
                                .await;
                            Ok::<_, StepError>(format!("{i}.{s}.{nanos}"))
                        }
                    })
                    .await?;
                append(&ledger, format!("jour {i} {s} {v}\n"));
                parts.push(v);
                if s == 1 {
                    let t0 = ctx.now().await?;
                    ctx.sleep(Duration::from_millis(sleep_ms(i))).await?;
                    let t1 = std::time::SystemTime::now();
                    let ms = t1.duration_since(t0).unwrap_or_default().as_millis();
                    append(&ledger, format!("woke {i} {ms}\n"));
                }
                if s == 2 {
                    let sig: u64 = ctx.recv("sig").await?;
                    parts.push(format!("sig{sig}"));
                }
            }
            // Keep the signal value last, as the parent expects.
            let sig = parts.remove(3);
            parts.push(sig);
            Ok(parts.join(","))
        })
    }
}

fn child() {
    let dir = PathBuf::from(std::env::var_os("KEEL_CRASH_DIR").unwrap());
    let ledger = PathBuf::from(std::env::var_os("KEEL_CRASH_LEDGER").unwrap());
    let round: u32 = std::env::var("KEEL_CRASH_ROUND").unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        // A small concurrency spreads the work over many kill windows.
        let runtime = Runtime::builder(&dir)
            .concurrency(4)
            .register("job", job(ledger.clone()))
            .open()
            .await
            .unwrap_or_else(|e| {
                // The parent may kill this process before it exits, which would pass for an
                // ordinary kill; the marker makes a failed open fail the test.
                let _ = std::fs::write(open_failed_marker(&dir), format!("{e:?}"));
                panic!("open: {e:?}");
            });
        tokio::spawn(runtime.worker().unwrap().run());
        let sent: std::collections::HashSet<u32> = std::fs::read_to_string(&ledger)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("sent ").and_then(|n| n.parse().ok()))
            .collect();
        let mut handles = Vec::new();
        for i in 0..JOBS {
            let id = WorkflowId::new(format!("r{round}-job-{i}")).unwrap();
            handles.push((i, runtime.start("job", &id, &i).await.expect("start")));
        }
        for i in 0..JOBS {
            if !sent.contains(&i) {
                let id = WorkflowId::new(format!("r{round}-job-{i}")).unwrap();
                // A value unique to this attempt (a child killed between sending and `sent`
                // sends again): the job's number, then this process's id.
                let value = signal_value(i, std::process::id());
                append(&ledger, format!("sending {i} {value}\n"));
                match runtime.signal(&id, "sig", &value).await {
                    Ok(()) | Err(Error::Finished { .. }) => {}
                    Err(e) => panic!("signal: {e}"),
                }
                append(&ledger, format!("sent {i}\n"));
            }
        }
        for (i, h) in handles {
            let v: String = h.result().await.expect("result");
            append(&ledger, format!("result {i} {v}\n"));
        }
    });
}
