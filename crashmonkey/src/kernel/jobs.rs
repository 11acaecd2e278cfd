//! `crashmonkey kernel --jobs J`: J workloads at once, each on a thread of its own (a
//! workload's [`super::campaign::Campaign::run_workload`] makes its own work folder,
//! nbd-server, nbdfuse mount, loop device and mount point), their results handed on **in
//! the workloads' order** whatever order they end in, so that the output, the summary and a
//! campaign folder's records are those of `--jobs 1`.
//!
//! When the consumer says stop (an error, a signal), no workload starts any more; the ones
//! running end (a signal stops them too) and their results are dropped unseen, as
//! `--jobs 1` would never have run them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

/// Workloads at once, at most: each holds a loop device, a FUSE mount, a mount and a
/// server thread, and on a 2-core machine the kernel's work already fills the cores by 2.
pub const KERNEL_JOBS_MAX: usize = 8;

/// Runs `work(i)` for every `i` in `0..count` on `jobs` threads (1 to
/// [`KERNEL_JOBS_MAX`]), and hands each result to `deliver` in order of `i`, on the calling
/// thread. When `deliver` returns `false`, no more work starts, and the results still to
/// come are dropped. Returns how many results were delivered.
pub fn run_in_order<T: Send>(
    count: usize,
    jobs: usize,
    work: impl Fn(usize) -> T + Sync,
    mut deliver: impl FnMut(usize, T) -> bool,
) -> usize {
    assert!(
        (1..=KERNEL_JOBS_MAX).contains(&jobs),
        "jobs {jobs} outside 1..={KERNEL_JOBS_MAX}"
    );
    let next = AtomicUsize::new(0);
    let halt = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<(usize, T)>();
    let mut delivered = 0;
    std::thread::scope(|s| {
        for _ in 0..jobs.min(count) {
            let tx = tx.clone();
            let (next, halt, work) = (&next, &halt, &work);
            s.spawn(move || {
                while !halt.load(Ordering::SeqCst) {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count || tx.send((i, work(i))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        // Results that ended before those of lower index: at most `jobs - 1` wait here
        // for long, since each worker takes the lowest index not taken.
        let mut waiting: BTreeMap<usize, T> = BTreeMap::new();
        for (i, r) in rx {
            if halt.load(Ordering::SeqCst) {
                continue; // drain: the workers in flight end, their results are dropped
            }
            waiting.insert(i, r);
            while let Some(r) = waiting.remove(&delivered) {
                let go_on = deliver(delivered, r);
                delivered += 1;
                if !go_on {
                    halt.store(true, Ordering::SeqCst);
                    waiting.clear();
                    break;
                }
            }
        }
    });
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Results come in index order whatever order they end in: later indices end first
    /// here (each sleeps less than the one before).
    #[test]
    fn results_are_delivered_in_index_order() {
        for jobs in [1, 2, 3, KERNEL_JOBS_MAX] {
            let mut got = Vec::new();
            let n = run_in_order(
                10,
                jobs,
                |i| {
                    std::thread::sleep(Duration::from_millis(2 * (10 - i as u64)));
                    i * i
                },
                |i, r| {
                    got.push((i, r));
                    true
                },
            );
            assert_eq!(n, 10);
            let want: Vec<(usize, usize)> = (0..10).map(|i| (i, i * i)).collect();
            assert_eq!(got, want, "jobs {jobs}");
        }
    }

    /// A consumer that stops at index 3 sees nothing after it, and no work starts once it
    /// has stopped beyond the ones in flight (at most `jobs` of them).
    #[test]
    fn stopping_delivers_nothing_more_and_starts_nothing_more() {
        let started = AtomicUsize::new(0);
        let mut got = Vec::new();
        let n = run_in_order(
            100,
            2,
            |i| {
                started.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
                i
            },
            |i, _| {
                got.push(i);
                i != 3
            },
        );
        assert_eq!((n, got), (4, vec![0, 1, 2, 3]));
        assert!(started.load(Ordering::SeqCst) <= 4 + 2, "{started:?}");
    }
}
