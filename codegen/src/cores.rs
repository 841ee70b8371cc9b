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
    let parts: Vec<Vec<(usize, T)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut results: Vec<Option<T>> = (0..n).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        results[i] = Some(r);
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(&lost))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::for_each_index;

    #[test]
    fn every_index_once_in_order_and_panics_are_lost_items() {
        let squares = for_each_index(
            100,
            usize::MAX,
            || 0usize,
            |calls, i| {
                *calls += 1;
                i * i
            },
            || usize::MAX,
        );
        assert_eq!(squares, (0..100).map(|i| i * i).collect::<Vec<_>>());
        assert!(for_each_index(0, 4, || (), |_, i| i, || 0).is_empty());
        // A thread that panics loses the items it held; the others still come back.
        let r = for_each_index(
            8,
            usize::MAX,
            || (),
            |_, i| {
                if i == 3 {
                    panic!("item 3");
                }
                Some(i)
            },
            || None,
        );
        assert_eq!(r.len(), 8);
        assert_eq!(r[3], None);
        assert!(r.iter().flatten().all(|&i| i != 3));
    }
}
