//! Compile-time work spread over the machine's cores: lowering kernels through MLIR and
//! compiling them with LLVM, one kernel at a time per thread.

use std::sync::atomic::{AtomicUsize, Ordering};

/// `f(&mut state, i)` for every `i` in `0..n`, on as many scoped threads as the machine has
/// cores (at most `max_threads`), each with its own `state` from `init` (an MLIR context, a
/// target machine) and taking the next index when done with one; the results in index order.
/// The indices a panicking thread had taken give `lost()`.
pub(crate) fn for_each_index<S, T: Send>(
    n: usize,
    max_threads: usize,
    init: impl Fn() -> S + Sync,
    f: impl Fn(&mut S, usize) -> T + Sync,
    lost: impl Fn() -> T,
) -> Vec<T> {
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = cores.min(max_threads).min(n).max(1);
    let next = AtomicUsize::new(0);
    let work = || {
        let mut state = init();
        let mut done = vec![];
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return done;
            }
            done.push((i, f(&mut state, i)));
        }
    };
    let parts: Vec<Vec<(usize, T)>> = if threads == 1 {
        vec![work()]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .collect()
        })
    };
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(&lost))
        .collect()
}
