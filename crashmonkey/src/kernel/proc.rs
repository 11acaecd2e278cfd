//! External commands of a kernel campaign: each in its own process group, killed with
//! everything it started at its deadline or when the campaign is stopped
//! ([`crate::checker::run_checker`]), its output captured and capped.

use crate::checker::{run_checker, CheckerRun, StopFlag};

use super::KernelError;

/// `s` as one shell word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `sh -c cmd` for at most `timeout_seconds`; its end and output, whatever they are.
pub fn run(cmd: &str, timeout_seconds: u64, stop: &StopFlag) -> Result<CheckerRun, KernelError> {
    tracing::debug!("run: {cmd}");
    let r = run_checker(cmd, timeout_seconds, stop)
        .map_err(KernelError::io(format!("running {cmd}")))?;
    if let Some(signal) = stop.signal() {
        return Err(KernelError::Stopped(signal));
    }
    Ok(r)
}

/// Runs `cmd` and requires it to succeed; an error carries its output.
pub fn must(cmd: &str, timeout_seconds: u64, stop: &StopFlag) -> Result<String, KernelError> {
    let r = run(cmd, timeout_seconds, stop)?;
    if r.end.passed() {
        Ok(r.output)
    } else {
        Err(KernelError::Command(format!(
            "`{cmd}` failed ({}): {}",
            r.end,
            r.output.trim()
        )))
    }
}

/// The last `lines` lines of the kernel's log.
pub fn dmesg_tail(lines: usize, stop: &StopFlag) -> String {
    match run("dmesg", super::HELPER_TIMEOUT_SECONDS, stop) {
        Ok(r) => {
            let all: Vec<&str> = r.output.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(dmesg could not run: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_words_reach_the_command_whole() {
        let stop = StopFlag::new();
        let word = "a b'c\"$HOME";
        let out = must(&format!("printf %s {}", quote(word)), 10, &stop).unwrap();
        assert_eq!(out, word);
    }

    #[test]
    fn a_command_past_its_deadline_is_killed() {
        let stop = StopFlag::new();
        let t = std::time::Instant::now();
        let r = run("sleep 30", 1, &stop).unwrap();
        assert!(!r.end.passed());
        assert!(t.elapsed().as_secs() < 10);
    }
}
