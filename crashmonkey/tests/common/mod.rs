//! Helpers shared by the `crashmonkey check` fault tests: a recorded write log, a base image,
//! the binary, a run with a deadline, and a guard that kills processes a checker left behind.
#![allow(dead_code)] // each test binary uses its own part

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_server::backend::{Arrival, Backend, RequestKind, WriteData};
use nbd_server::disk::{DiskConfig, EmulatedDisk, VecStorage};

/// Size of the logged disk, in bytes.
pub const DISK_BYTES: u64 = 1 << 20;

/// The crashmonkey binary built for these tests.
pub fn crashmonkey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
}

/// A log of 30 overlapping 8 KiB writes on a 1 MiB disk, with a flush and a mark after every
/// tenth: three epochs.
pub fn log(dir: &Path) -> PathBuf {
    let path = dir.join("d.log");
    let s = Arc::new(VecStorage::new(DISK_BYTES).unwrap());
    let d = EmulatedDisk::new(
        s,
        DiskConfig {
            record: Some(path.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    for i in 0..30u64 {
        let t = d
            .arrived(&Arrival {
                conn: 1,
                kind: RequestKind::Write,
                offset: i * 4096,
                length: 8192,
                fua: false,
            })
            .expect("a write gets a ticket");
        d.write(
            Some(t),
            i * 4096,
            WriteData::copy_of(&[i as u8 + 1; 8192]),
            false,
        )
        .unwrap();
        d.reply_sent(t);
        if i % 10 == 9 {
            let t = d
                .arrived(&Arrival {
                    conn: 2,
                    kind: RequestKind::Flush,
                    offset: 0,
                    length: 0,
                    fua: false,
                })
                .expect("a flush gets a ticket");
            d.flush(Some(t)).unwrap();
            d.reply_sent(t);
            d.mark(&format!("m{i}")).unwrap();
        }
    }
    path
}

/// An empty base image of `bytes` bytes.
pub fn base(dir: &Path, bytes: u64) -> PathBuf {
    let path = dir.join(format!("base-{bytes}.img"));
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    path
}

/// `crashmonkey check LOG --base BASE --checker CHECKER` plus few states (`--samples 1
/// --no-torn --max-subset 1`) and `extra`.
pub fn check_cmd(log: &Path, base: &Path, checker: &str, extra: &[&str]) -> Command {
    let mut c = crashmonkey();
    c.arg("check")
        .arg(log)
        .arg("--base")
        .arg(base)
        .args(["--checker", checker])
        .args(["--samples", "1", "--no-torn", "--max-subset", "1"])
        .args(extra);
    c
}

/// Runs `cmd` to its end, or kills it after `limit` and panics: a test never hangs.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_within(child, limit)
}

/// Waits for `child` to end, or kills it after `limit` and panics. Its pipes are read all the
/// while, so a child that prints much never blocks on them.
pub fn wait_within(mut child: Child, limit: Duration) -> Output {
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                pipe.read_to_end(&mut bytes).unwrap();
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            let err = stderr.join().unwrap();
            panic!(
                "still running after {limit:?}; killed. stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// The process ids a checker wrote, one a line, to `file`.
pub fn pids_in(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether `pid` is still a live process (a zombie waiting for its reaper counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

/// Whether every pid in `file` is gone within `limit`.
pub fn all_gone_within(file: &Path, limit: Duration) -> bool {
    let started = Instant::now();
    loop {
        if !pids_in(file).into_iter().any(alive) {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills, when dropped, every process whose pid was written to its file: what a test leaves
/// behind when it fails (or what a checker deliberately daemonised) does not outlive it.
pub struct KillOnDrop(pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in pids_in(&self.0) {
            if alive(pid) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// Whether `tool` is on the PATH.
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why this machine cannot run a kernel campaign or a `crashmonkey run` that needs `tools`
/// (root, /dev/fuse, each tool, a free loop device), or `None` when it can. What a reason
/// means is the caller's skip policy's (`skip::skip`).
pub fn kernel_unready(tools: &[&str]) -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    });
    if !root {
        return Some("needs root (loop devices, mount)".into());
    }
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    if let Some(t) = tools.iter().find(|t| !on_path(t)) {
        return Some(format!("{t} is not installed (make deps installs it)"));
    }
    let free_loop = Command::new("losetup").arg("-f").output();
    (!free_loop.is_ok_and(|o| o.status.success())).then(|| "no free loop device".into())
}
