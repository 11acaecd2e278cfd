//! The control socket (`--control PATH`): a Unix-socket line protocol that drives the emulated
//! disks of a running server, and its blocking client (`nbd-server ctl`).
//!
//! One request per line, one reply line each:
//! - `mark NAME`: put mark NAME in the write log of every emulated disk, in order with its IO;
//! - `crash [SEED]`: cut the power (seeded choice of surviving writes; connections dropped);
//! - `stats`: counters of every emulated disk;
//! - `sync`: push every write log to stable storage.
//!
//! A request may start with `@EXPORT ` to address one export. Replies are `ok JSON` or
//! `err MESSAGE`. Lines are at most [`CONTROL_LINE_BYTES_MAX`] bytes.

use std::io::{BufRead, BufReader as StdBufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::disk::EmulatedDisk;

/// Longest request line.
pub const CONTROL_LINE_BYTES_MAX: usize = 4096;
/// Most control clients served at once.
pub const CONTROL_CLIENTS_MAX: usize = 16;
/// How long `ctl` waits for a reply.
pub const CONTROL_REPLY_SECONDS_MAX: u64 = 60;

/// The emulated disks a control socket drives, by export name.
pub type Disks = Vec<(String, Arc<EmulatedDisk>)>;

/// Executes one request line; returns the reply line (without newline).
pub fn execute(disks: &Disks, line: &str) -> String {
    match execute_inner(disks, line.trim()) {
        Ok(v) => format!("ok {v}"),
        Err(e) => format!("err {}", e.replace('\n', " ")),
    }
}

fn execute_inner(disks: &Disks, line: &str) -> Result<serde_json::Value, String> {
    let (target, line) = match line.strip_prefix('@') {
        Some(rest) => {
            let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            (Some(name), rest.trim())
        }
        None => (None, line),
    };
    let chosen: Vec<&(String, Arc<EmulatedDisk>)> = disks
        .iter()
        .filter(|(n, _)| target.is_none_or(|t| t == n))
        .collect();
    if chosen.is_empty() {
        return Err(match target {
            Some(t) => format!("no writable export named {t:?}"),
            None => "the server has no writable export".into(),
        });
    }
    let (cmd, arg) = line.split_once(' ').unwrap_or((line, ""));
    let arg = arg.trim();
    let mut out = serde_json::Map::new();
    match cmd {
        "mark" => {
            if arg.is_empty() {
                return Err("usage: mark NAME".into());
            }
            for (name, d) in &chosen {
                let seq = d.mark(arg).map_err(|e| e.to_string())?;
                out.insert(name.clone(), serde_json::json!({ "seq": seq }));
            }
        }
        "crash" => {
            let seed = if arg.is_empty() {
                None
            } else {
                Some(
                    arg.parse::<u64>()
                        .map_err(|_| format!("seed {arg:?} is not a number"))?,
                )
            };
            for (name, d) in &chosen {
                let r = d.power_cut(seed).map_err(|e| e.to_string())?;
                out.insert(
                    name.clone(),
                    serde_json::to_value(r).map_err(|e| e.to_string())?,
                );
            }
        }
        "stats" => {
            for (name, d) in &chosen {
                out.insert(
                    name.clone(),
                    serde_json::to_value(d.stats()).map_err(|e| e.to_string())?,
                );
            }
        }
        "sync" => {
            for (name, d) in &chosen {
                d.sync_log().map_err(|e| e.to_string())?;
                out.insert(name.clone(), serde_json::Value::Bool(true));
            }
        }
        "" => return Err("empty request (try: mark NAME, crash [SEED], stats, sync)".into()),
        other => {
            return Err(format!(
                "unknown request {other:?} (try: mark NAME, crash [SEED], stats, sync)"
            ))
        }
    }
    Ok(serde_json::Value::Object(out))
}

/// A served control socket. Dropping it stops serving and removes the socket file (if it is
/// still the one this server made).
pub struct ControlSocket {
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own.
    id: (u64, u64),
    task: tokio::task::JoinHandle<()>,
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        if file_id(&self.path).is_ok_and(|id| id == self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(p: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p)?;
    Ok((m.dev(), m.ino()))
}

/// Binds a Unix socket at `path` that only its owner can use (mode 0600, whatever the
/// umask): it is bound inside a new folder of mode 0700 beside `path`, given its mode, then
/// linked to `path` (which fails rather than replace anything that appeared meanwhile).
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = parent.join(format!(".nbd-server-ctl.{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let inner = dir.join("s");
    let bound = UnixListener::bind(&inner).and_then(|l| {
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))?;
        std::fs::hard_link(&inner, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&inner);
    let _ = std::fs::remove_dir(&dir);
    bound
}

/// Claims `path` (see [`crate::server::claim_socket_path`]: a stale socket is replaced,
/// anything else refused), binds it owner-only (0600) and serves requests until the returned
/// [`ControlSocket`] is dropped.
pub async fn serve(path: PathBuf, disks: Disks) -> std::io::Result<ControlSocket> {
    crate::server::claim_socket_path(&path)?;
    let listener = bind_private(&path)?;
    let id = file_id(&path)?;
    let disks = Arc::new(disks);
    let slots = Arc::new(Semaphore::new(CONTROL_CLIENTS_MAX));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("control socket accept failed: {e}");
                    continue;
                }
            };
            tokio::spawn(serve_client(stream, disks.clone(), permit));
        }
    });
    Ok(ControlSocket { path, id, task })
}

/// Answers one control client's request lines until it hangs up.
async fn serve_client(
    stream: tokio::net::UnixStream,
    disks: Arc<Disks>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut rd).take(CONTROL_LINE_BYTES_MAX as u64 + 1);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = if line.len() > CONTROL_LINE_BYTES_MAX {
            "err request line too long".to_string()
        } else {
            match String::from_utf8(line.clone()) {
                Err(_) => "err request is not UTF-8".to_string(),
                Ok(text) => {
                    let disks = disks.clone();
                    tokio::task::spawn_blocking(move || execute(&disks, &text))
                        .await
                        .unwrap_or_else(|e| format!("err {e}"))
                }
            }
        };
        if wr.write_all(format!("{reply}\n").as_bytes()).await.is_err() {
            return;
        }
        if line.len() > CONTROL_LINE_BYTES_MAX {
            return; // the rest of the line is garbage to us
        }
    }
}

/// Sends one request and returns the reply line: `Ok(json)` for `ok`, `Err(message)` for
/// `err` or a broken socket.
pub fn request(socket: &Path, line: &str) -> Result<String, String> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(
        CONTROL_REPLY_SECONDS_MAX,
    )))
    .map_err(|e| e.to_string())?;
    s.write_all(format!("{}\n", line.trim()).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    StdBufReader::new(&s)
        .read_line(&mut reply)
        .map_err(|e| format!("no reply: {e}"))?;
    let reply = reply.trim_end();
    if let Some(ok) = reply.strip_prefix("ok ") {
        Ok(ok.to_string())
    } else if let Some(err) = reply.strip_prefix("err ") {
        Err(err.to_string())
    } else {
        Err(format!("unexpected reply {reply:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskConfig, VecStorage};

    fn disks() -> Disks {
        let d = |name: &str| {
            let s = Arc::new(VecStorage::new(64 * 1024).unwrap());
            (
                name.to_string(),
                Arc::new(EmulatedDisk::new(s, DiskConfig::default()).unwrap()),
            )
        };
        vec![d("a"), d("b")]
    }

    #[test]
    fn requests_reach_every_disk_or_the_addressed_one() {
        let ds = disks();
        assert!(execute(&ds, "mark m1").starts_with("ok "));
        assert_eq!(ds[0].1.stats().marks, 1);
        assert_eq!(ds[1].1.stats().marks, 1);
        assert!(execute(&ds, "@b mark m2").starts_with("ok "));
        assert_eq!(ds[0].1.stats().marks, 1);
        assert_eq!(ds[1].1.stats().marks, 2);
        let r = execute(&ds, "@a crash 5");
        assert!(r.contains("\"seed\":5"), "{r}");
        assert_eq!(ds[0].1.stats().power_cuts, 1);
        assert_eq!(ds[1].1.stats().power_cuts, 0);
        assert!(execute(&ds, "stats").contains("\"b\""));
    }

    #[test]
    fn bad_requests_get_clear_errors() {
        let ds = disks();
        assert_eq!(execute(&ds, "mark"), "err usage: mark NAME");
        assert!(execute(&ds, "crash x").starts_with("err seed \"x\""));
        assert!(execute(&ds, "@zz stats").contains("no writable export named \"zz\""));
        assert!(execute(&ds, "").starts_with("err empty request"));
        assert!(execute(&ds, &format!("mark {}", "x".repeat(300))).starts_with("err mark name"));
        assert!(execute(&ds, "mark bad\u{1}name").starts_with("err mark name"));
    }
}
