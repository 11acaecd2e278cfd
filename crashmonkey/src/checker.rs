//! Running one checker command: in its own process group, under a deadline, with its output
//! streamed into a capped buffer.
//!
//! The checker is `sh -c CMD`, leader of a new process group. Its stdout and stderr are read
//! as they come and capped ([`capture`]). At its time limit, or when the run is stopped, the
//! whole group gets SIGKILL; when the checker ends by itself, whatever it left running in its
//! group gets SIGKILL too: no child outlives its checker. A process that left the group
//! (`setsid`) cannot be found that way and may hold the pipes open for as long as it likes:
//! they are let go [`CHECKER_PIPE_GRACE_MILLIS`] after the checker ended.

mod capture;
pub(crate) mod sys;

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture::Streams;
pub use capture::CHECKER_STREAM_BYTES_MAX;

/// Checker output kept per state, in bytes: the head of stdout and of stderr, half each.
pub const CHECKER_OUTPUT_BYTES_MAX: usize = 1024 * 1024;
/// How often a running checker's deadline, exit and stop flag are looked at, in milliseconds.
pub const CHECKER_POLL_MILLIS: u64 = 20;
/// How long the pipes are still read after the checker ended, in milliseconds. Enough for
/// the kernel to close the pipes of the processes killed with it; a process that escaped its
/// group and still holds them is not waited for longer.
pub const CHECKER_PIPE_GRACE_MILLIS: u64 = 500;

/// Raised, with a signal's number, when a run must stop early (the CLI raises it on SIGINT
/// and SIGTERM). Clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    pub fn new() -> Self {
        Self::default()
    }

    /// The shared cell a signal handler stores the signal's number into.
    pub fn shared(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.0)
    }

    pub fn raise(&self, signal: i32) {
        self.0
            .store(signal.unsigned_abs() as usize, Ordering::SeqCst);
    }

    /// The signal that stopped the run, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            n => Some(i32::try_from(n).unwrap_or(i32::MAX)),
        }
    }
}

/// How a checker run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckerEnd {
    /// It exited with this code.
    Exited(i32),
    /// A signal we did not send ended it.
    Signalled(i32),
    /// It ran past its time limit, of this many seconds, and its process group was killed.
    TimedOut(u64),
    /// The run was stopped by this signal and the checker's process group was killed: no
    /// verdict.
    Stopped(i32),
}

impl CheckerEnd {
    pub fn passed(self) -> bool {
        self == CheckerEnd::Exited(0)
    }

    pub fn exit_code(self) -> Option<i32> {
        match self {
            CheckerEnd::Exited(code) => Some(code),
            _ => None,
        }
    }

    /// The signal that ended the checker: ours (SIGKILL) when we killed it.
    pub fn signal(self) -> Option<i32> {
        match self {
            CheckerEnd::Exited(_) => None,
            CheckerEnd::Signalled(signal) => Some(signal),
            CheckerEnd::TimedOut(_) | CheckerEnd::Stopped(_) => Some(libc::SIGKILL),
        }
    }
}

impl fmt::Display for CheckerEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CheckerEnd::Exited(code) => write!(f, "exit code {code}"),
            CheckerEnd::Signalled(s) => write!(f, "killed by signal {s} ({})", signal_name(s)),
            CheckerEnd::TimedOut(seconds) => write!(
                f,
                "timed out after {seconds} s (its process group was killed with SIGKILL)"
            ),
            CheckerEnd::Stopped(s) => write!(
                f,
                "stopped by {} (its process group was killed with SIGKILL)",
                signal_name(s)
            ),
        }
    }
}

/// The name of signal `signal` ("SIGKILL"), as signal(7) gives it.
pub fn signal_name(signal: i32) -> String {
    const NAMES: [(i32, &str); 31] = [
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGILL, "SIGILL"),
        (libc::SIGTRAP, "SIGTRAP"),
        (libc::SIGABRT, "SIGABRT"),
        (libc::SIGBUS, "SIGBUS"),
        (libc::SIGFPE, "SIGFPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGALRM, "SIGALRM"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGSTKFLT, "SIGSTKFLT"),
        (libc::SIGCHLD, "SIGCHLD"),
        (libc::SIGCONT, "SIGCONT"),
        (libc::SIGSTOP, "SIGSTOP"),
        (libc::SIGTSTP, "SIGTSTP"),
        (libc::SIGTTIN, "SIGTTIN"),
        (libc::SIGTTOU, "SIGTTOU"),
        (libc::SIGURG, "SIGURG"),
        (libc::SIGXCPU, "SIGXCPU"),
        (libc::SIGXFSZ, "SIGXFSZ"),
        (libc::SIGVTALRM, "SIGVTALRM"),
        (libc::SIGPROF, "SIGPROF"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGIO, "SIGIO"),
        (libc::SIGPWR, "SIGPWR"),
        (libc::SIGSYS, "SIGSYS"),
    ];
    match NAMES.iter().find(|(n, _)| *n == signal) {
        Some((_, name)) => (*name).to_owned(),
        None if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal) => {
            format!("SIGRTMIN+{}", signal - libc::SIGRTMIN())
        }
        None => format!("signal {signal}"),
    }
}

/// What one checker run left: how it ended and its capped output.
#[derive(Debug, Clone)]
pub struct CheckerRun {
    pub end: CheckerEnd,
    pub output: String,
}

/// Why we killed a checker's process group.
#[derive(Debug, Clone, Copy)]
enum Kill {
    Deadline,
    Stop(i32),
}

/// What watching a checker saw: whether we killed it, and whether its pipes were let go while
/// an escaped process still held them.
struct Watched {
    kill: Option<Kill>,
    let_go: bool,
}

/// The shell checkers run in: `sh` from the first directory of `PATH` that has it (what
/// `execvp` would run), found once per process. Searching on every start cost a failed
/// `execve` per directory before it, per checker (eight on a developer's `PATH` here, about 15
/// us of a 0.8 ms start). Plain `sh` when no directory has it (the spawn then reports the
/// error as before).
fn shell() -> &'static std::ffi::OsStr {
    static SHELL: std::sync::OnceLock<std::ffi::OsString> = std::sync::OnceLock::new();
    SHELL.get_or_init(|| {
        find_in_path("sh", std::env::var_os("PATH").as_deref()).unwrap_or_else(|| "sh".into())
    })
}

/// The first `dir/name` of the `:`-separated `path` that is an executable file; `None` when
/// none is, or when `path` has a relative directory (or an empty one, the current folder):
/// those are left to `execvp`, so that the choice is always the one it would make.
fn find_in_path(name: &str, path: Option<&std::ffi::OsStr>) -> Option<std::ffi::OsString> {
    use std::os::unix::fs::PermissionsExt;
    let dirs: Vec<_> = std::env::split_paths(path?).collect();
    if dirs.iter().any(|d| !d.is_absolute()) {
        return None;
    }
    dirs.into_iter()
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .map(std::path::PathBuf::into_os_string)
}

/// Runs `sh -c cmd` in its own process group, for at most `timeout_seconds` and only while
/// `stop` is down. Returns once the checker has ended and its output is read (or let go).
pub fn run_checker(cmd: &str, timeout_seconds: u64, stop: &StopFlag) -> io::Result<CheckerRun> {
    let mut child = Command::new(shell())
        .args(["-c", cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()?;
    let mut streams = Streams::new(child.stdout.take(), child.stderr.take());
    let deadline = Instant::now().checked_add(Duration::from_secs(timeout_seconds));
    let watched = watch(child.id(), &mut streams, deadline, stop);
    if watched.is_err() {
        // The checker is not reaped yet, so its group id is still its own: kill what is left.
        let _ = sys::kill_group(child.id(), libc::SIGKILL);
    }
    let status = child.wait()?;
    let watched = watched?;
    let end = match (watched.kill, status.code(), status.signal()) {
        (Some(Kill::Deadline), _, _) => CheckerEnd::TimedOut(timeout_seconds),
        (Some(Kill::Stop(signal)), _, _) => CheckerEnd::Stopped(signal),
        (None, Some(code), _) => CheckerEnd::Exited(code),
        (None, None, Some(signal)) => CheckerEnd::Signalled(signal),
        (None, None, None) => unreachable!("wait() returns only for an exit or a kill"),
    };
    let mut output = streams.text();
    if watched.let_go {
        output.push_str(&format!(
            "\n[output let go {CHECKER_PIPE_GRACE_MILLIS} ms after the checker ended: a process \
             that left its process group (setsid?) still held it open]\n"
        ));
    }
    if !matches!(end, CheckerEnd::Exited(_)) {
        output.push_str(&format!("\n[checker {end}]\n"));
    }
    Ok(CheckerRun { end, output })
}

/// Reads the checker's output until it has ended and its pipes are closed or the grace is
/// over; kills its process group at the deadline, on a stop, and (for what it left running)
/// when it ends. The checker is never reaped here, so its group id stays its own throughout.
fn watch(
    pid: u32,
    streams: &mut Streams,
    deadline: Option<Instant>,
    stop: &StopFlag,
) -> io::Result<Watched> {
    let grace = Duration::from_millis(CHECKER_PIPE_GRACE_MILLIS);
    // Wakes the wait below when the checker ends; without it a checker that closed its
    // output would be seen ending only at the next poll (29 ms a state with `true {image}`).
    let exit_fd = sys::pidfd_open(pid);
    let mut kill = None;
    let mut ended_at: Option<Instant> = None;
    loop {
        if let Some(ended) = ended_at {
            if streams.all_closed() || ended.elapsed() >= grace {
                let let_go = !streams.all_closed();
                if let_go {
                    tracing::debug!("checker {pid}: its output is still held open; let go");
                }
                return Ok(Watched { kill, let_go });
            }
        }
        let running = exit_fd.as_ref().filter(|_| ended_at.is_none());
        streams.pump(
            Duration::from_millis(CHECKER_POLL_MILLIS),
            running.map(AsRawFd::as_raw_fd),
        )?;
        if ended_at.is_some() {
            continue;
        }
        if sys::has_exited(pid)? {
            sys::kill_group(pid, libc::SIGKILL)?;
            ended_at = Some(Instant::now());
        } else if kill.is_none() {
            kill = match (stop.signal(), deadline) {
                (Some(signal), _) => Some(Kill::Stop(signal)),
                (None, Some(d)) if Instant::now() >= d => Some(Kill::Deadline),
                _ => None,
            };
            if let Some(why) = kill {
                tracing::debug!("checker {pid}: {why:?}; killing its process group");
                sys::kill_group(pid, libc::SIGKILL)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_names_follow_signal_7() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
        assert_eq!(signal_name(2), "SIGINT");
        assert_eq!(signal_name(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
    }

    #[test]
    fn the_shell_is_the_first_executable_sh_on_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        for d in [&a, &b, &c] {
            std::fs::create_dir(d).unwrap();
        }
        // `a` has no sh; `b` has one that is not executable; `c` has one.
        use std::os::unix::fs::PermissionsExt;
        for (d, mode) in [(&b, 0o644), (&c, 0o755)] {
            std::fs::write(d.join("sh"), "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(d.join("sh"), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let path = std::env::join_paths([&a, &b, &c]).unwrap();
        assert_eq!(
            find_in_path("sh", Some(&path)),
            Some(c.join("sh").into_os_string())
        );
        // A relative or empty directory anywhere leaves the search to execvp; no PATH, or no
        // sh in it, finds nothing.
        for odd in ["c", ""] {
            let rel = std::env::join_paths([&c, std::path::Path::new(odd)]).unwrap();
            assert_eq!(find_in_path("sh", Some(&rel)), None, "{rel:?}");
        }
        assert_eq!(find_in_path("sh", None), None);
        let none = std::env::join_paths([&a, &b]).unwrap();
        assert_eq!(find_in_path("sh", Some(&none)), None);
    }

    #[test]
    fn stop_flag_holds_the_signal() {
        let stop = StopFlag::new();
        assert_eq!(stop.signal(), None);
        stop.clone().raise(libc::SIGTERM);
        assert_eq!(stop.signal(), Some(15));
    }
}
