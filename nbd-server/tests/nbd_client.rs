//! Interop with Debian's `nbd-client` (package `nbd-client`), plain and over TLS.
//!
//! `nbd-client -l` lists the exports. `nbd-client HOST PORT /dev/nbdX -N NAME` negotiates
//! the export (NBD_OPT_GO) and then hands the socket to the kernel's `nbd` driver. Where that
//! driver is loaded (a free `/dev/nbdX` exists) and we are root, the test attaches the
//! export, writes and reads the block device, checks the bytes on the server, and detaches.
//! Where it is not (these build machines: no `nbd` module), nbd-client (3.24, netlink by
//! default) negotiates first and only then fails to find the driver's netlink family; the
//! test requires exactly that failure, after the export size came from the server, and the
//! server's own log saying the connection reached the transmission phase.
//!
//! A missing tool skips its test with a printed reason, unless `CI=true`, where it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::wire::*;
use common::{have, run, Raw};

const BIN: &str = env!("CARGO_BIN_EXE_nbd-server");

/// The size of the export nbd-client attaches; nbd-client prints it as "size = 48MB", a
/// number no other export here has.
const DISK_BYTES: u64 = 48 << 20;
/// What nbd-client 3.24 prints when the `nbd` module is not loaded (netlink mode).
const NO_NBD_MODULE: &str = "Couldn't resolve the nbd netlink family";
/// Held while a test may attach a `/dev/nbdX`, so two tests never pick the same device.
static NBD_DEVICES: Mutex<()> = Mutex::new(());
/// How long the server's log may take to show a connection's progress.
const LOG_WAIT: Duration = Duration::from_secs(10);

/// The `nbd-server` binary with debug logs kept, so a test can see what it did.
struct LoggedServer {
    child: std::process::Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl LoggedServer {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .env("RUST_LOG", "nbd_server=debug")
            .args(["--listen", "127.0.0.1:0", "--export"])
            .arg(format!("disk:size={DISK_BYTES}"))
            .args(["--export", "second:size=1M", "--export", "third:size=1M"])
            .args(args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("nbd-server: listening on ") {
                    let _ = tx.send(a.parse::<SocketAddr>().unwrap());
                }
                keep.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(LOG_WAIT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("no 'listening on' line: {:?}", log.lock().unwrap());
            }
        };
        LoggedServer { child, addr, log }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// Waits until a log line contains every one of `needles`.
    fn logged(&self, needles: &[&str]) -> bool {
        let deadline = Instant::now() + LOG_WAIT;
        while Instant::now() < deadline {
            let found = self
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| needles.iter().all(|n| l.contains(n)));
            if found {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The export names `nbd-client -l` printed (the lines after its "Negotiation" line).
fn listed(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| !l.starts_with("Negotiation"))
        .map(str::to_owned)
        .collect()
}

/// A `/dev/nbdX` the kernel driver offers and nothing uses, if we may attach (root).
fn free_nbd_device() -> Option<PathBuf> {
    // Root: the effective uid in /proc (the workspace denies the `unsafe` of geteuid).
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        return None;
    }
    (0..16)
        .map(|i| PathBuf::from(format!("/dev/nbd{i}")))
        .find(|d| {
            let name = d.file_name().unwrap().to_str().unwrap();
            d.exists()
                && std::fs::read_to_string(format!("/sys/block/{name}/size"))
                    .is_ok_and(|s| s.trim() == "0")
        })
}

/// Whether nbd-client's attach ended as it must without the `nbd` module: it printed the
/// export's size (which only the server's reply to its GO can tell it), then failed on the
/// missing netlink family, and nothing else.
fn handshake_done_without_module(out: &Output) -> bool {
    let (stdout, stderr) = text(out);
    let size = format!("size = {}MB", DISK_BYTES >> 20);
    !out.status.success()
        && stdout.contains(&size)
        && stderr.contains(NO_NBD_MODULE)
        && !stderr.contains("Server said")
}

#[test]
fn nbd_client_lists_the_exports() {
    if !have("nbd-client") {
        return;
    }
    let srv = LoggedServer::start(&[]);
    let out = run(Command::new("nbd-client").args(["-l", "127.0.0.1", &srv.port()]));
    assert_eq!(listed(&out), ["disk", "second", "third"], "{out}");
    assert!(srv.logged(&["NBD_OPT_LIST"]));
}

#[test]
fn nbd_client_attaches_the_export() {
    if !have("nbd-client") {
        return;
    }
    let srv = LoggedServer::start(&[]);
    let _devices = NBD_DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dev) = free_nbd_device() {
        return attach_write_read_detach(&srv, &dev, &[]);
    }
    let attach = |name: &str| {
        Command::new("nbd-client")
            .args(["127.0.0.1", &srv.port(), "/dev/nbd0", "-N", name])
            .output()
            .unwrap()
    };
    let out = attach("disk");
    assert!(handshake_done_without_module(&out), "{:?}", text(&out));
    assert!(
        srv.logged(&["transmission", "export=disk"]),
        "the server never reached the transmission phase: {:?}",
        srv.log.lock().unwrap()
    );
    // The check above cannot pass on a failed negotiation: an unknown export fails in
    // the handshake, with no size.
    let out = attach("nosuch");
    assert!(!handshake_done_without_module(&out), "{:?}", text(&out));
}

/// Over TLS, with client certificates checked (`--tls-verify-peer`, as nbdkit's
/// documentation pairs nbd-client with it): `-cacertfile` switches TLS on, `-certfile` and
/// `-keyfile` present the client's certificate (3.24 does not take the `-F` its usage lists
/// for `-certfile`); the host name checked defaults to the host given.
#[test]
fn nbd_client_over_tls() {
    if !have("nbd-client") {
        return;
    }
    let Some(pki) = Pki::generate() else { return };
    let certs = pki.all();
    let srv = LoggedServer::start(&[
        "--tls=require",
        "--tls-verify-peer",
        "--tls-certificates",
        path(&certs),
    ]);
    let file = |name: &str| certs.join(name).display().to_string();
    let tls = [
        "-cacertfile",
        &file("ca-cert.pem"),
        "-certfile",
        &file("client-cert.pem"),
        "-keyfile",
        &file("client-key.pem"),
    ];
    let list = |extra: &[&str]| {
        Command::new("nbd-client")
            .args(["-l", "127.0.0.1", &srv.port()])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = list(&tls);
    assert_eq!(
        listed(&text(&out).0),
        ["disk", "second", "third"],
        "{:?}",
        text(&out)
    );
    let plain = list(&[]);
    assert!(!plain.status.success(), "listed without TLS");
    assert!(
        text(&plain).1.contains("Server said: TLS is required"),
        "{:?}",
        text(&plain)
    );
    assert!(
        !list(&tls[..2]).status.success(),
        "listed without a client certificate"
    );
    let _devices = NBD_DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dev) = free_nbd_device() {
        return attach_write_read_detach(&srv, &dev, &tls);
    }
    let out = Command::new("nbd-client")
        .args(["127.0.0.1", &srv.port(), "/dev/nbd0", "-N", "disk"])
        .args(tls)
        .output()
        .unwrap();
    assert!(handshake_done_without_module(&out), "{:?}", text(&out));
    assert!(srv.logged(&["TLS established", "client_certificate=true"]));
    assert!(srv.logged(&["transmission", "export=disk"]));
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// With the `nbd` module: attach, write through the block device, read it back, find the
/// bytes on the server with an independent client, detach.
fn attach_write_read_detach(srv: &LoggedServer, dev: &Path, extra: &[&str]) {
    let d = path(dev);
    run(Command::new("nbd-client")
        .args(["127.0.0.1", &srv.port(), d, "-N", "disk", "-b", "4096"])
        .args(extra));
    let detach = || {
        let _ = Command::new("nbd-client").args(["-d", d]).status();
    };
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 13 + 7) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::write(&src, &data).unwrap();
    let dd = |args: &[String]| {
        let out = Command::new("dd").args(args).output().unwrap();
        if !out.status.success() {
            detach();
            panic!("dd {args:?}: {:?}", text(&out));
        }
    };
    let s = |v: &str| v.to_owned();
    dd(&[
        format!("if={}", src.display()),
        format!("of={d}"),
        s("bs=1M"),
        s("seek=4"),
        s("oflag=direct"),
    ]);
    let back = dir.path().join("back");
    dd(&[
        format!("if={d}"),
        format!("of={}", back.display()),
        s("bs=1M"),
        s("skip=4"),
        s("count=1"),
        s("iflag=direct"),
    ]);
    detach();
    assert!(
        std::fs::read(&back).unwrap() == data,
        "read back through {d}"
    );
    if extra.is_empty() {
        // The server holds the bytes (checked over plain NBD, not through the kernel).
        let mut c = Raw::connect(srv.addr);
        c.handshake(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        c.go("disk", false, false).unwrap();
        c.request(0, NBD_CMD_READ, 1, 4 << 20, 1 << 20, &[]);
        assert!(
            c.simple_reply(1 << 20).2 == data,
            "the server holds what was written"
        );
    }
}
