//! The scheduling priority of the server's own threads.
//!
//! An fs-core volume runs its whole model on one engine thread, which every request of its
//! exports passes through; the runtime's workers (one per core) read requests and write
//! replies around it. When a worker woke on the engine's core the scheduler often preempted
//! the engine, and every connection waited: on 2 cores under fio's 4 KiB random writes at
//! queue depth 32 the engine spent 17-26% of the run runnable but not running
//! (`/proc/PID/task/TID/schedstat`) and was preempted 3,500-6,300 times a second. The
//! server therefore runs its workers nicer than the engine when it serves fs-core volumes
//! (see `nbd-server --worker-nice`).

use std::io;

/// The largest nice value Linux gives a thread (the lowest priority).
pub const NICE_MAX: i32 = 19;

/// The nice value of the calling thread, from `/proc/thread-self/stat`.
pub fn this_thread_nice() -> io::Result<i32> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    parse_stat_nice(&stat)
        .ok_or_else(|| io::Error::other("no nice value in /proc/thread-self/stat"))
}

/// The nice field of a `/proc/.../stat` line: the 19th field, counted after the command
/// name in parentheses (which may itself hold spaces and parentheses).
fn parse_stat_nice(stat: &str) -> Option<i32> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // Fields 3 (state) onwards; the nice value is field 19.
    after_comm.split_whitespace().nth(19 - 3)?.parse().ok()
}

/// Makes the calling thread `by` steps nicer than it is (at most [`NICE_MAX`]); on Linux a
/// thread's nice value is its own (`setpriority(PRIO_PROCESS, tid, ..)`), so nothing else of
/// the process changes. Becoming nicer needs no privilege.
pub fn lower_this_thread(by: i32) -> io::Result<()> {
    let nice = this_thread_nice()?.saturating_add(by.max(0)).min(NICE_MAX);
    set_this_thread_nice(nice)
}

#[allow(unsafe_code)]
fn set_this_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid and setpriority take and return plain integers; no memory is shared.
    let r = unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nice_field_is_read_past_a_command_name_with_spaces() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 7 1 0 5 0 0";
        assert_eq!(parse_stat_nice(line), Some(7));
        assert_eq!(parse_stat_nice("42 (x) S 1"), None);
    }

    /// Only the calling thread becomes nicer, and never past the maximum.
    #[test]
    fn a_thread_lowers_its_own_priority_only() {
        let before = this_thread_nice().unwrap();
        let inside = std::thread::spawn(|| {
            let start = this_thread_nice().unwrap();
            lower_this_thread(3).unwrap();
            let once = this_thread_nice().unwrap();
            lower_this_thread(NICE_MAX).unwrap();
            (start, once, this_thread_nice().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(inside, (before, (before + 3).min(NICE_MAX), NICE_MAX));
        assert_eq!(this_thread_nice().unwrap(), before);
    }
}
