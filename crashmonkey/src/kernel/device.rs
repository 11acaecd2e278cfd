//! The recording disk of one workload, attached and mounted: an in-process nbd-server
//! serving a copy of the base image on a Unix socket (nothing listens on the network) and
//! recording every write, flush and mark; a control socket for marks; `nbdfuse` presenting
//! the export as a file; a loop device over that file; the filesystem mounted on it.
//!
//! [`Recording::finish`] undoes it all in order (unmount, detach, stop nbdfuse, stop the
//! server, which makes the log complete) and says what failed; dropping a `Recording`
//! undoes whatever is still set up, on every path out (an error, a signal, a timeout).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_server::control::{execute, Disks, CONTROL_LINE_BYTES_MAX};
use nbd_server::{BackgroundServer, ExportRegistry, ExportSpec, ServerConfig};

use super::proc::{must, quote, run};
use super::{
    FsKind, KernelError, HELPER_TIMEOUT_SECONDS, MOUNT_TIMEOUT_SECONDS, NBDFUSE_READY_SECONDS,
};
use crate::checker::StopFlag;

/// How often a wait for nbdfuse looks again.
const POLL_MILLIS: u64 = 20;
/// How long a control client may take to send its line.
const CONTROL_READ_SECONDS: u64 = 10;
/// How long nbdfuse may take to exit once unmounted.
const NBDFUSE_EXIT_SECONDS: u64 = 10;

/// The export's name on the server.
const EXPORT: &str = "disk";

/// Marks (and the other `nbd-server ctl` requests) served on a Unix socket by a thread.
struct ControlThread {
    path: PathBuf,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlThread {
    fn start(path: PathBuf, disks: Disks) -> Result<Self, KernelError> {
        let listener = UnixListener::bind(&path)
            .map_err(KernelError::io(format!("binding {}", path.display())))?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    answer(conn, &disks);
                }
            }
        });
        Ok(ControlThread {
            path,
            done,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.done.store(true, Ordering::SeqCst);
        // Wakes the accept; the thread then sees `done`.
        let _ = UnixStream::connect(&self.path);
        let _ = thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One control request: a line in, a line out.
fn answer(conn: UnixStream, disks: &Disks) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(CONTROL_READ_SECONDS)));
    let mut line = String::new();
    let mut reader = BufReader::new((&conn).take(CONTROL_LINE_BYTES_MAX as u64));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let reply = execute(disks, &line);
    let _ = (&conn).write_all(format!("{reply}\n").as_bytes());
}

/// See the module docs.
pub struct Recording {
    server: Option<BackgroundServer>,
    control: ControlThread,
    nbdfuse: Option<Child>,
    fuse_dir: PathBuf,
    fuse_mounted: bool,
    loop_dev: Option<String>,
    mnt: PathBuf,
    mounted: bool,
}

impl Recording {
    /// Serves `image` (recording into `log`; a lying disk with `lying`), attaches and mounts
    /// it at `dir/mnt` (with the extra `mount -o` options `mount_opts`, empty for none).
    /// Everything it makes lives in `dir`.
    pub fn start(
        fs: FsKind,
        mount_opts: &str,
        image: &Path,
        log: &Path,
        lying: bool,
        dir: &Path,
        stop: &StopFlag,
    ) -> Result<Recording, KernelError> {
        let spec = format!(
            "{EXPORT}:file={},record={}{}",
            image.display(),
            log.display(),
            if lying { ",flush=ignore" } else { "" }
        );
        let spec = ExportSpec::parse(&spec)?;
        let exports = ExportRegistry::from_specs(&[spec])?;
        let disks: Disks = exports
            .iter()
            .filter_map(|e| e.disk.clone().map(|d| (e.name.clone(), d)))
            .collect();
        let socket = dir.join("nbd.sock");
        let server = nbd_server::Server::start_background(ServerConfig {
            listen: None,
            unix: Some(socket.clone()),
            exports,
            tls: None,
        })
        .map_err(KernelError::io("starting the recording nbd-server"))?;
        let control = ControlThread::start(dir.join("ctl.sock"), disks)?;
        let mut rec = Recording {
            server: Some(server),
            control,
            nbdfuse: None,
            fuse_dir: dir.join("fuse"),
            fuse_mounted: false,
            loop_dev: None,
            mnt: dir.join("mnt"),
            mounted: false,
        };
        rec.attach(fs, mount_opts, &socket, dir, stop)?;
        Ok(rec)
    }

    /// nbdfuse, the loop device, the mount.
    fn attach(
        &mut self,
        fs: FsKind,
        mount_opts: &str,
        socket: &Path,
        dir: &Path,
        stop: &StopFlag,
    ) -> Result<(), KernelError> {
        for d in [&self.fuse_dir, &self.mnt] {
            std::fs::create_dir_all(d)
                .map_err(KernelError::io(format!("creating {}", d.display())))?;
        }
        let pidfile = dir.join("nbdfuse.pid");
        let errfile = dir.join("nbdfuse.err");
        let err =
            std::fs::File::create(&errfile).map_err(KernelError::io("creating nbdfuse.err"))?;
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(self.fuse_dir.join("disk"))
            .arg(crate::served::nbd_unix_uri(EXPORT, socket))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(KernelError::io("starting nbdfuse"))?;
        self.nbdfuse = Some(child);
        self.fuse_mounted = true;
        wait_ready(self.nbdfuse.as_mut().expect("just set"), &pidfile, &errfile)?;
        // losetup and mount run to their deadlines whatever the stop flag says, so that what
        // they set up is known and undone; the flag is looked at once they are done.
        let steady = StopFlag::new();
        let file = self.fuse_dir.join("disk");
        let out = must(
            &format!("losetup -f --show {}", quote(&file.to_string_lossy())),
            HELPER_TIMEOUT_SECONDS,
            &steady,
        )?;
        self.loop_dev = Some(out.trim().to_owned());
        let dev = self.loop_dev.clone().expect("just set");
        self.mounted = true;
        let mounted = must(
            &mount_command(fs, mount_opts, &dev, &self.mnt),
            MOUNT_TIMEOUT_SECONDS,
            &steady,
        );
        self.mounted = mounted.is_ok();
        mounted?;
        match stop.signal() {
            Some(signal) => Err(KernelError::Stopped(signal)),
            None => Ok(()),
        }
    }

    /// Where the filesystem is mounted.
    pub fn mount_point(&self) -> &Path {
        &self.mnt
    }

    /// The control socket (`nbd-server ctl` requests: `mark NAME`).
    pub fn control_socket(&self) -> &Path {
        &self.control.path
    }

    /// Unmounts, detaches and stops everything; the write log is complete after it.
    pub fn finish(mut self) -> Result<(), KernelError> {
        let failed = self.teardown();
        if failed.is_empty() {
            Ok(())
        } else {
            Err(KernelError::Command(failed.join("; ")))
        }
    }

    /// Undoes what is set up, in order; what failed, in words. Runs whatever the campaign's
    /// stop flag says (a fresh flag): a signal must not leave a mount behind.
    fn teardown(&mut self) -> Vec<String> {
        let stop = StopFlag::new();
        let mut failed = Vec::new();
        if self.mounted {
            self.mounted = false;
            if let Err(e) = unmount(&self.mnt, &stop) {
                failed.push(e.to_string());
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            if let Err(e) = must(
                &format!("losetup -d {}", quote(&dev)),
                HELPER_TIMEOUT_SECONDS,
                &stop,
            ) {
                failed.push(e.to_string());
            }
            // A busy device is detached when its last opener closes it: wait for that, so
            // that the FUSE mount under it can go.
            let file = self.fuse_dir.join("disk");
            if let Err(e) = super::verify::wait_loop_detached(&file) {
                failed.push(e.to_string());
            }
        }
        if self.fuse_mounted {
            self.fuse_mounted = false;
            let dir = quote(&self.fuse_dir.to_string_lossy());
            if must(
                &format!("fusermount3 -u {dir}"),
                HELPER_TIMEOUT_SECONDS,
                &stop,
            )
            .is_err()
            {
                let _ = run(
                    &format!("fusermount3 -uz {dir}"),
                    HELPER_TIMEOUT_SECONDS,
                    &stop,
                );
            }
        }
        if let Some(child) = self.nbdfuse.take() {
            if let Err(e) = reap(child) {
                failed.push(e);
            }
        }
        self.control.stop();
        if let Some(server) = self.server.take() {
            if let Err(e) = server.shutdown() {
                failed.push(format!("the recording nbd-server: {e}"));
            }
        }
        failed
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        for e in self.teardown() {
            tracing::warn!("cleaning up the recording disk: {e}");
        }
    }
}

/// `mount -t FS [-o OPTS] DEV MNT`, OPTS the filesystem's and `extra`.
pub fn mount_command(fs: FsKind, extra: &str, dev: &str, mnt: &Path) -> String {
    let opts = fs.mount_options_with(extra);
    format!(
        "mount -t {} {}{} {}",
        fs.name(),
        if opts.is_empty() {
            String::new()
        } else {
            format!("-o {opts} ")
        },
        quote(dev),
        quote(&mnt.to_string_lossy())
    )
}

/// Tries of an unmount that finds its mount busy, at most.
pub const UMOUNT_BUSY_TRIES_MAX: u32 = 50;
/// Milliseconds between two tries of a busy unmount.
const UMOUNT_BUSY_PAUSE_MILLIS: u64 = 20;

/// Unmounts `mnt`; when it is busy, tries again ([`UMOUNT_BUSY_TRIES_MAX`] times in all):
/// with `--jobs` above 1, a child another thread is starting holds copies of this thread's
/// open files until it calls exec (CLOEXEC closes them only then), so a file just read in
/// the mount can keep it busy for that instant. When that fails, detaches it lazily and
/// says so.
pub fn unmount(mnt: &Path, stop: &StopFlag) -> Result<(), KernelError> {
    let m = quote(&mnt.to_string_lossy());
    let mut tries = 1;
    loop {
        match must(&format!("umount {m}"), MOUNT_TIMEOUT_SECONDS, stop) {
            Ok(_) => return Ok(()),
            Err(KernelError::Command(text))
                if text.contains("busy") && tries < UMOUNT_BUSY_TRIES_MAX =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(UMOUNT_BUSY_PAUSE_MILLIS));
            }
            Err(e) => {
                let _ = run(&format!("umount -l {m}"), MOUNT_TIMEOUT_SECONDS, stop);
                return Err(e);
            }
        }
    }
}

/// Waits until nbdfuse has written its pid file (it serves), or fails with its stderr.
fn wait_ready(child: &mut Child, pidfile: &Path, errfile: &Path) -> Result<(), KernelError> {
    let deadline = Instant::now() + Duration::from_secs(NBDFUSE_READY_SECONDS);
    loop {
        if pidfile.exists() {
            return Ok(());
        }
        let exited = child
            .try_wait()
            .map_err(KernelError::io("waiting for nbdfuse"))?;
        if exited.is_some() || Instant::now() >= deadline {
            let err = std::fs::read_to_string(errfile).unwrap_or_default();
            return Err(KernelError::Command(format!(
                "nbdfuse did not serve the disk within {NBDFUSE_READY_SECONDS} s ({}): {}",
                exited.map_or("still running".into(), |s| s.to_string()),
                err.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(POLL_MILLIS));
    }
}

/// Waits for nbdfuse to exit after its unmount; kills its process group past the deadline.
fn reap(mut child: Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(NBDFUSE_EXIT_SECONDS);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(POLL_MILLIS))
            }
            _ => {
                // Its group id is still its own: it is not reaped yet.
                let _ = crate::checker::sys::kill_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                return Err(format!(
                    "nbdfuse did not exit within {NBDFUSE_EXIT_SECONDS} s; killed"
                ));
            }
        }
    }
}
