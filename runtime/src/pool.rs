//! The runtime's worker threads: [`parallel_for`] runs the independent tasks of one step (the
//! query blocks of a tiled attention, the outer iterations of a kernel's parallel loop) across
//! the cores that [`set_threads`] allows, the calling thread taking its share.
//!
//! The workers start once, at the first parallel step, and wait on a condition variable
//! between steps. Tasks are claimed from a shared counter, so which thread runs a task never
//! changes what it computes: a task writes only its own outputs, and results are the same on
//! one thread or many. A call made while the pool is busy (from inside a task, or from another
//! pipeline stage's thread) runs its tasks on the calling thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Threads at most (the GEMM library's limit too).
pub const MAX_THREADS: usize = 4;

/// Threads chosen by [`set_threads`]; 0 until then (every core, up to [`MAX_THREADS`]).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Uses `n` threads (1 to [`MAX_THREADS`]) for parallel steps. The workers start at the first
/// parallel step, as many as the count then asks; a later call may lower the count (fewer
/// workers join each step: `memc plan` times one thread count, then a smaller one) but not
/// raise it past the workers started, so the drivers call it first thing.
pub fn set_threads(n: usize) -> Result<(), String> {
    if !(1..=MAX_THREADS).contains(&n) {
        return Err(format!("--threads {n}: give 1 to {MAX_THREADS}"));
    }
    THREADS.store(n, Ordering::Relaxed);
    Ok(())
}

/// Threads parallel steps use: [`set_threads`]'s choice, else the machine's cores up to
/// [`MAX_THREADS`].
pub fn threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_THREADS),
        n => n,
    }
}

/// One parallel step: the task function (its lifetime erased: [`parallel_for`] does not
/// return before every claimed task has finished) and the counters.
struct Job {
    task: *const (dyn Fn(usize) + Sync),
    n: usize,
    /// Workers that join (the pool's first ones): [`threads`] less the caller.
    helpers: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

// SAFETY: `task` points to a `Sync` closure, called only for claimed indices while the
// `parallel_for` that owns it is waiting.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none is left; a panicking task is recorded, not unwound.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.n {
                return;
            }
            // SAFETY: index `i < n` was claimed by this thread alone, and the owner of `task`
            // waits for `done == n` before returning.
            let task = unsafe { &*self.task };
            if catch_unwind(AssertUnwindSafe(|| task(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// The workers' shared state: the current job and a generation counter that wakes them.
struct Pool {
    /// Held by the thread running a parallel step; others run theirs alone.
    busy: Mutex<()>,
    state: Mutex<(u64, Option<Arc<Job>>)>,
    wake: Condvar,
    finished: Condvar,
    workers: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let workers = threads() - 1;
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            busy: Mutex::new(()),
            state: Mutex::new((0, None)),
            wake: Condvar::new(),
            finished: Condvar::new(),
            workers,
        }));
        for w in 0..workers {
            let spawned = std::thread::Builder::new()
                .name(format!("memc-worker-{w}"))
                .spawn(move || worker(pool, w));
            if spawned.is_err() {
                // Without the thread the caller still runs every task itself.
                break;
            }
        }
        pool
    })
}

thread_local! {
    /// Set while this thread runs tasks of a parallel step.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn worker(pool: &'static Pool, index: usize) {
    IN_TASK.with(|t| t.set(true));
    let mut seen = 0u64;
    loop {
        let job = {
            let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
            while st.0 == seen {
                st = pool.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            seen = st.0;
            st.1.clone()
        };
        if let Some(job) = job.filter(|j| index < j.helpers) {
            job.work();
            if job.done.load(Ordering::Acquire) == job.n {
                let _st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
                pool.finished.notify_all();
            }
        }
    }
}

/// Runs `task(0)`, ..., `task(n - 1)` across the pool's threads and the caller's, returning
/// when all have finished. Tasks must be independent (each writes only its own outputs). A
/// panic in a task is raised again here, after every task has finished.
pub fn parallel_for(n: usize, task: &(dyn Fn(usize) + Sync)) {
    // Run here, one after another (nested, the pool busy, one thread): every task still
    // runs, and the first panic is raised after the last.
    let serial = |task: &(dyn Fn(usize) + Sync)| {
        let mut first = None;
        for i in 0..n {
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(i))) {
                first.get_or_insert(p);
            }
        }
        if let Some(p) = first {
            std::panic::resume_unwind(p);
        }
    };
    if n <= 1 || IN_TASK.with(|t| t.get()) || threads() <= 1 {
        return serial(task);
    }
    let pool = pool();
    let Ok(_busy) = pool.busy.try_lock() else {
        return serial(task);
    };
    if pool.workers == 0 {
        return serial(task);
    }
    // SAFETY (lifetime erasure): this function waits below until every claimed task has
    // finished, and tasks are only run for claimed indices, so `task` outlives every call.
    let erased: *const (dyn Fn(usize) + Sync + 'static) =
        unsafe { std::mem::transmute(task as *const (dyn Fn(usize) + Sync)) };
    let job = Arc::new(Job {
        task: erased,
        n,
        helpers: threads() - 1,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    });
    {
        let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
        st.0 += 1;
        st.1 = Some(job.clone());
        pool.wake.notify_all();
    }
    IN_TASK.with(|t| t.set(true));
    job.work();
    IN_TASK.with(|t| t.set(false));
    // Spin briefly (tasks are short), then sleep until the last worker reports.
    let mut spins = 0u32;
    while job.done.load(Ordering::Acquire) < n {
        if spins < 2000 {
            spins += 1;
            std::hint::spin_loop();
            continue;
        }
        let st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
        if job.done.load(Ordering::Acquire) < n {
            let _st = pool
                .finished
                .wait_timeout(st, std::time::Duration::from_millis(1))
                .unwrap_or_else(|e| e.into_inner());
        }
    }
    pool.state.lock().unwrap_or_else(|e| e.into_inner()).1 = None;
    if job.panicked.load(Ordering::Relaxed) {
        panic!("a parallel task panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_and_nested_calls_run_serially() {
        for n in [0, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            parallel_for(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                let inner = AtomicUsize::new(0);
                parallel_for(3, &|_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(inner.load(Ordering::Relaxed), 3);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_panicking_task_is_raised_after_the_others() {
        let ran = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            parallel_for(16, &|i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(i != 5, "task 5 fails");
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 16);
        // Nested calls run serially: there too every task runs before the panic is raised.
        let ran = AtomicUsize::new(0);
        let r = catch_unwind(AssertUnwindSafe(|| {
            parallel_for(2, &|_| {
                parallel_for(16, &|i| {
                    ran.fetch_add(1, Ordering::Relaxed);
                    assert!(i != 5, "task 5 fails");
                })
            })
        }));
        assert!(r.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 32);
    }
}
