//! What the scripted race tests share (`races.rs`, `gfs2.rs`): running a script, checking
//! that its materialised schedule replays to the same run, and the first wrong byte.

use fs_core::sched::{self, ReplayPolicy, ScriptPolicy};
use fs_core::{Config, Failure, RunResult, Workload};

/// Runs `script` (then the lowest runnable task), prints the trace when `RACE_TRACE` is set,
/// and checks the recorded schedule replays to the same files, failures and device IO: the
/// scripts are only a way to write down a schedule.
pub fn run_script(cfg: &Config, w: &Workload, script: Vec<fs_core::Directive>) -> RunResult {
    let r = sched::run(cfg, w, &mut ScriptPolicy::new(script));
    if std::env::var_os("RACE_TRACE").is_some() {
        for s in &r.trace {
            eprintln!("t{} {} {}", s.task, s.label, s.arg);
        }
        eprintln!("{:?}", r.failures);
    }
    let again = sched::run(cfg, w, &mut ReplayPolicy::new(r.schedule.clone(), true));
    assert_eq!(again.files, r.files);
    assert_eq!(again.failures, r.failures);
    assert_eq!(again.device_log, r.device_log);
    r
}

/// The first wrong byte a run reported: (offset, expected, found).
pub fn first_wrong(r: &RunResult) -> Option<(u64, u8, u8)> {
    r.failures.iter().find_map(|f| match f {
        Failure::WrongData {
            offset,
            expected,
            found,
            ..
        } => Some((*offset, *expected, *found)),
        _ => None,
    })
}
