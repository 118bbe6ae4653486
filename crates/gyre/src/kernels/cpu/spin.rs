//! A small pool for decode's matrix–vector products, whose helpers spin briefly between jobs
//! instead of sleeping: a decode step runs a product group every few microseconds, and a
//! sleeping helper costs a futex wake-up per group (rayon's idle workers sleep).
//!
//! `run(n, f)` calls `f(0..n)` once each, spread over the caller and the helpers, and returns
//! when all calls have returned. Helpers spin for [`SPIN_FOR`] after their last job, then
//! park until the next one, so an idle process uses no CPU.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// How long a helper spins after its last job before parking (a decode step's products are
/// microseconds apart; a step is tens of milliseconds).
const SPIN_FOR: std::time::Duration = std::time::Duration::from_micros(500);

/// One job: `n` calls of `task`, claimed through `next`, counted in `done`.
struct Job {
    /// The caller's closure with its lifetime erased; see `run` for why it stays valid.
    task: *const (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Set when a call panicked (the panic is caught so that the job still completes).
    panicked: AtomicBool,
}

// SAFETY: `task` points to a `Sync` closure, and it is only called while the job has
// unclaimed calls, which `run` outlives (see there).
unsafe impl Send for Job {}
// SAFETY: as above; the counters are atomics.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs calls until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: call `i < n` was claimed by this thread alone, so the job is not done
            // and `run`, which owns the closure, is still waiting for it.
            let call = std::panic::AssertUnwindSafe(|| unsafe { (*self.task)(i) });
            if std::panic::catch_unwind(call).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Shared {
    /// Bumped once per job; helpers wait for it to move.
    epoch: AtomicUsize,
    job: Mutex<Option<Arc<Job>>>,
    /// Helpers parked on `wake` (under `job`'s lock).
    parked: AtomicUsize,
    wake: Condvar,
}

/// The pool: `helpers` threads plus the caller.
pub struct SpinPool {
    shared: Arc<Shared>,
    helpers: usize,
}

impl SpinPool {
    /// The process-wide pool, with one helper fewer than rayon's threads.
    pub fn global() -> &'static SpinPool {
        static POOL: OnceLock<SpinPool> = OnceLock::new();
        POOL.get_or_init(|| SpinPool::new(rayon::current_num_threads().saturating_sub(1), "gyre-spin"))
    }

    /// A pool of `helpers` threads named `name-0`, `name-1`, ...
    fn new(helpers: usize, name: &str) -> SpinPool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            parked: AtomicUsize::new(0),
            wake: Condvar::new(),
        });
        for k in 0..helpers {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{k}"))
                .spawn(move || helper(&shared))
                .expect("spawning a kernel thread");
        }
        SpinPool { shared, helpers }
    }

    /// Threads that take part in a job (the caller included).
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Calls `task(i)` for every `i < n`, on the caller and the helpers; returns when all
    /// calls have returned.
    pub fn run(&self, n: usize, task: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        // SAFETY (lifetime erasure): helpers call `task` only for claimed calls `i < n`, and
        // this function returns only after `done == n`, i.e. after every such call returned;
        // a helper that picks the job up later finds no call left and never touches `task`.
        let task: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
        let job = Arc::new(Job {
            task,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        {
            let mut slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(job.clone());
            self.shared.epoch.fetch_add(1, Ordering::Release);
            if self.shared.parked.load(Ordering::Relaxed) > 0 {
                self.shared.wake.notify_all();
            }
        }
        // Panics inside calls are caught (here and on the helpers), so this wait always ends
        // and no helper can still be running `task` when this frame unwinds.
        job.work();
        while job.done.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
        assert!(!job.panicked.load(Ordering::Relaxed), "a kernel task panicked");
    }
}

fn helper(shared: &Shared) {
    let mut seen = 0;
    loop {
        let (start, mut spins) = (std::time::Instant::now(), 0u32);
        while shared.epoch.load(Ordering::Acquire) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            // Let a runnable thread (another pool's worker) have the core.
            std::thread::yield_now();
            if start.elapsed() >= SPIN_FOR {
                let mut slot = shared.job.lock().unwrap_or_else(|e| e.into_inner());
                shared.parked.fetch_add(1, Ordering::Relaxed);
                while shared.epoch.load(Ordering::Acquire) == seen {
                    slot = shared.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                shared.parked.fetch_sub(1, Ordering::Relaxed);
                break;
            }
        }
        seen = shared.epoch.load(Ordering::Acquire);
        let job = shared.job.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_call_runs_once_across_many_jobs() {
        let pool = SpinPool::new(3, "spin-test-a");
        for n in [0, 1, 2, 7, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
            }
        }
        // After the helpers park, a job still completes.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let sum = AtomicUsize::new(0);
        pool.run(100, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 4950);
    }

    #[test]
    fn a_panicking_call_fails_the_job_after_every_call_returned() {
        let pool = SpinPool::new(1, "spin-test-b");
        let done = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(32, &|i| {
                assert!(i != 5, "call 5 fails");
                done.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(result.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 31);
        // The pool still works.
        let n = AtomicUsize::new(0);
        pool.run(10, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }

    /// CPU ticks (user + system) of this process's threads whose name starts with `prefix`.
    #[cfg(target_os = "linux")]
    fn cpu_ticks(prefix: &str) -> u64 {
        let mut total = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
            let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            total += fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        }
        total
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn idle_helpers_park_and_use_no_cpu() {
        let pool = SpinPool::new(2, "spin-test-c");
        pool.run(8, &|_| {});
        std::thread::sleep(std::time::Duration::from_millis(300));
        let before = cpu_ticks("spin-test-c");
        std::thread::sleep(std::time::Duration::from_millis(700));
        // Two spinning helpers would use about 140 ticks (of 10 ms) here.
        assert!(cpu_ticks("spin-test-c") - before <= 5, "idle helpers use CPU");
    }
}
