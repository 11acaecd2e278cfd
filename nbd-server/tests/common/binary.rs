//! The `nbd-server` binary as a child process: started with arguments, its stderr gathered
//! by a thread (so the server never blocks on a full pipe, and a test can read what it
//! logged), killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nbd-server");

/// The binary under test: [`BIN`], or `$NBD_SERVER_BIN` when set (to show that a test fails
/// against an older build: `NBD_SERVER_BIN=/old/target/release/nbd-server cargo test ...`).
pub fn bin() -> String {
    std::env::var("NBD_SERVER_BIN").unwrap_or_else(|_| BIN.to_owned())
}
/// How long a server may take to print its "listening on" line.
pub const START_SECONDS_MAX: u64 = 20;

pub struct Running {
    pub child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
    /// The thread reading stderr; it ends at EOF, once the server has exited.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// Starts `nbd-server ARGS --listen 127.0.0.1:0`; panics with its stderr if it does not
    /// come up.
    pub fn start(args: &[String]) -> Running {
        Self::try_start(args, None).unwrap_or_else(|e| panic!("nbd-server {args:?}: {e}"))
    }

    /// Like [`Self::start`]; `Err(stderr)` if the server exits instead of listening. With
    /// `umask`, the server runs under that umask.
    pub fn try_start(args: &[String], umask: Option<u32>) -> Result<Running, String> {
        let mut cmd = match umask {
            Some(m) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("umask {m:03o}; exec \"$0\" \"$@\""))
                    .arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        let mut child = cmd
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let err = BufReader::new(child.stderr.take().unwrap());
        let log = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in err.lines().map_while(Result::ok) {
                {
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
                // After the line is in the log: a test reading it at start-up sees it.
                if let Some(a) = line.trim().strip_prefix("nbd-server: listening on ") {
                    let _ = tx.send(a.parse::<SocketAddr>().ok());
                }
            }
            let _ = tx.send(None);
        });
        match rx.recv_timeout(Duration::from_secs(START_SECONDS_MAX)) {
            Ok(Some(addr)) => Ok(Running {
                child,
                addr,
                stderr,
                reader: Some(reader),
            }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(50));
                let text = stderr.lock().unwrap().clone();
                Err(text)
            }
        }
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The log once it holds `needle` (the server may write a line just after the reply a
    /// test acts on, and the reader thread takes it a moment later); panics with the log if
    /// it does not within `seconds`.
    pub fn wait_log(&self, needle: &str, seconds: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "nbd-server did not log {needle:?} within {seconds} s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `signal` to the server.
    #[allow(unsafe_code)]
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; it touches no memory.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Waits for the server to exit, at most `seconds`; panics if it does not.
    pub fn wait_exit(&mut self, seconds: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // The stderr thread takes the last lines and ends at EOF.
                if let Some(reader) = self.reader.take() {
                    reader.join().unwrap();
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "nbd-server did not exit within {seconds} s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's resident memory in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:") * 1024
    }

    /// The server's peak resident memory in bytes (`VmHWM`).
    pub fn peak_rss_bytes(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:") * 1024
    }
}

fn status_kib(pid: i32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
