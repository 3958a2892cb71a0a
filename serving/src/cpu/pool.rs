//! A small worker pool for the forward pass: `threads − 1` workers plus the calling thread
//! split each parallel section (one matmul, one attention) by task index.
//!
//! A decode step has about 150 parallel sections, so handing work over must cost far less than
//! a microsecond: workers spin on an epoch counter between sections of a step, and park on a
//! condition variable once nothing has arrived for a while, so an idle engine burns no CPU.
//!
//! Tasks are claimed from a shared counter, so the caller alone finishes a section if no worker
//! shows up. A worker *joins* a section before touching it, and the caller *closes* the
//! section once its tasks are all claimed: it then waits only for the workers that joined. A
//! worker that the OS has descheduled (other processes on the same cores) therefore never
//! holds a section up unless it is in the middle of a task. The section is a borrowed closure;
//! [`Pool::run`] returns only after every joined worker has left it, and no worker can join a
//! closed section, which is what makes lending it to the workers sound.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Spin iterations before a waiting worker parks (roughly 50–100 µs).
const SPINS: u32 = 20_000;

type Task = dyn Fn(usize) + Sync;

/// The current section's closure with its lifetime erased; see [`Pool::run`].
#[derive(Clone, Copy)]
struct JobRef(*const Task);

// SAFETY: the pointee is `Sync`, and `Pool::run` keeps it alive until no worker uses it.
unsafe impl Send for JobRef {}

/// `state` layout: the section's epoch in the high 32 bits, [`CLOSED`], and the number of
/// workers that joined in the low bits.
const CLOSED: u64 = 1 << 31;
const JOINED: u64 = CLOSED - 1;

fn epoch_of(state: u64) -> u64 {
    state >> 32
}

struct Shared {
    state: AtomicU64,
    job: Mutex<Option<JobRef>>,
    next: AtomicUsize,
    tasks: AtomicUsize,
    /// Joined workers that have finished the current section.
    done: AtomicUsize,
    sleepers: AtomicUsize,
    parked: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    panicked: AtomicBool,
}

/// A fixed set of worker threads that cooperate with the caller on indexed tasks.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Pool {
    /// A pool using `threads` threads in all (the caller counts as one).
    pub(crate) fn new(threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            parked: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let s = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("keel-cpu-{i}"))
                .spawn(move || worker(&s));
            match handle {
                Ok(h) => workers.push(h),
                Err(e) => {
                    stop(&shared, &mut workers);
                    return Err(e);
                }
            }
        }
        Ok(Self {
            shared,
            workers,
            threads,
        })
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0..tasks)` across the pool and returns when all calls have finished. A panic in
    /// any task is re-raised here after every worker has left the section.
    pub(crate) fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.workers.is_empty() || tasks == 1 {
            for i in 0..tasks {
                f(i);
            }
            return;
        }
        let s = &*self.shared;
        let erased: *const (dyn Fn(usize) + Sync + '_) = f;
        // SAFETY: only the lifetime is erased. A worker uses the pointer only after joining
        // this section (which requires it to be open) and counts itself in `done` after its
        // last use; below we close the section and wait until `done` equals the number that
        // joined before returning (also when a task panics), so `f` outlives every use.
        let job = JobRef(unsafe { std::mem::transmute::<*const _, *const Task>(erased) });
        *s.job.lock().unwrap_or_else(PoisonError::into_inner) = Some(job);
        s.next.store(0, Ordering::SeqCst);
        s.tasks.store(tasks, Ordering::SeqCst);
        s.done.store(0, Ordering::SeqCst);
        let epoch = epoch_of(s.state.load(Ordering::SeqCst)) + 1;
        s.state.store((epoch & 0xFFFF_FFFF) << 32, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = s.parked.lock().unwrap_or_else(PoisonError::into_inner);
            s.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| {
            loop {
                let i = s.next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    break;
                }
                f(i);
            }
        }));
        let joined = (s.state.fetch_or(CLOSED, Ordering::SeqCst) & JOINED) as usize;
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) != joined {
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *s.job.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let worker_panicked = s.panicked.swap(false, Ordering::SeqCst);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        if worker_panicked {
            resume_unwind(Box::new("a CPU kernel task panicked on a worker thread"));
        }
    }

    /// Splits `out` into chunks of `chunk` elements and runs `f(index, chunk)` for each.
    pub(crate) fn run_chunks<T: Send>(
        &self,
        out: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let parts: Vec<Mutex<&mut [T]>> = out.chunks_mut(chunk.max(1)).map(Mutex::new).collect();
        self.run(parts.len(), &|i| {
            let mut part = parts[i].lock().unwrap_or_else(PoisonError::into_inner);
            f(i, &mut part);
        });
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let e = epoch_of(s.state.load(Ordering::SeqCst));
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins < SPINS {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = s.parked.lock().unwrap_or_else(PoisonError::into_inner);
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while epoch_of(s.state.load(Ordering::SeqCst)) == seen && !s.stop.load(Ordering::SeqCst)
            {
                guard = s.wake.wait(guard).unwrap_or_else(PoisonError::into_inner);
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        }
        // Join the section unless it has moved on or been closed meanwhile.
        let mut cur = s.state.load(Ordering::SeqCst);
        let joined = loop {
            if epoch_of(cur) != seen || cur & CLOSED != 0 {
                break false;
            }
            match s
                .state
                .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break true,
                Err(now) => cur = now,
            }
        };
        if !joined {
            continue;
        }
        let job = *s.job.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(JobRef(f)) = job {
            let tasks = s.tasks.load(Ordering::SeqCst);
            let r = catch_unwind(AssertUnwindSafe(|| {
                loop {
                    let i = s.next.fetch_add(1, Ordering::Relaxed);
                    if i >= tasks {
                        break;
                    }
                    // SAFETY: we joined the section, so `Pool::run` keeps the closure alive
                    // until we count ourselves in `done`, after this call returns.
                    unsafe { (*f)(i) };
                }
            }));
            if r.is_err() {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.done.fetch_add(1, Ordering::Release);
    }
}

fn stop(shared: &Shared, workers: &mut Vec<JoinHandle<()>>) {
    shared.stop.store(true, Ordering::SeqCst);
    {
        let _guard = shared.parked.lock().unwrap_or_else(PoisonError::into_inner);
        shared.wake.notify_all();
    }
    for w in workers.drain(..) {
        let _ = w.join();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        stop(&self.shared, &mut self.workers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_sections() {
        let pool = Pool::new(3).unwrap();
        for n in [0usize, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn chunks_cover_the_output_and_workers_wake_after_parking() {
        let pool = Pool::new(2).unwrap();
        let mut out = vec![0usize; 103];
        pool.run_chunks(&mut out, 10, &|i, c| c.iter_mut().for_each(|v| *v = i + 1));
        assert_eq!(out[0], 1);
        assert_eq!(out[102], 11);
        // Long enough for the worker to park; the next section must still complete.
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut out = vec![0u8; 64];
        pool.run_chunks(&mut out, 8, &|_, c| c.fill(1));
        assert!(out.iter().all(|v| *v == 1));
    }

    #[test]
    fn a_panicking_task_is_reported_and_the_pool_stays_usable() {
        let pool = Pool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "task five fails"));
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
