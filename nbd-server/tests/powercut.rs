//! Power cut through the real binary and a real client (the `nbd` crate): guards against an
//! emulated disk that loses flushed data at a power cut, persists data a client never wrote,
//! or keeps serving the dead connection.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use common::binary::Running;

const KIB: usize = 1024;

/// The server (stderr gathered by a thread with a deadline on start-up: a server that never
/// says "listening on" fails the test instead of hanging it), and its port.
struct Server {
    run: Running,
    port: u16,
}

fn start(dir: &Path) -> Server {
    start_with(dir, &[])
}

fn start_with(dir: &Path, extra: &[&str]) -> Server {
    let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    args.push("--export".into());
    args.push(format!("d:size=1M,record={}", dir.join("d.log").display()));
    args.push("--control".into());
    args.push(dir.join("ctl").display().to_string());
    let run = Running::start(&args);
    // The control socket is served before "listening on" is printed.
    assert!(run.log().contains("control socket"), "{}", run.log());
    let port = run.addr.port();
    Server { run, port }
}

fn connect(port: u16) -> nbd::client::NbdClient<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let export = nbd::client::handshake(&mut s, b"d").unwrap();
    nbd::client::NbdClient::new(s, &export)
}

fn ctl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
        .arg("ctl")
        .arg("--socket")
        .arg(dir.join("ctl"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn flushed_writes_survive_a_power_cut_and_the_rest_is_an_allowed_state() {
    for seed in [1u64, 2, 3, 4, 5, 6] {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path());
        let mut c = connect(server.port);
        c.write_all(&[1u8; 64 * KIB]).unwrap(); // A at 0
        c.flush().unwrap();
        c.write_all(&[2u8; 64 * KIB]).unwrap(); // B at 64K, not flushed
        c.seek(SeekFrom::Start(0)).unwrap();
        c.write_all(&[3u8; 4 * KIB]).unwrap(); // C over the start of A, not flushed
        ctl(dir.path(), &["mark", "before-crash"]);
        let report = ctl(dir.path(), &["crash", "--seed", &seed.to_string()]);
        assert!(report.contains("\"pending\":2"), "{report}");
        // The old connection is gone.
        let mut probe = [0u8; 512];
        c.seek(SeekFrom::Start(0)).unwrap();
        assert!(
            c.read_exact(&mut probe).is_err(),
            "connection survived the power cut"
        );
        // Reconnect and recover.
        let mut c = connect(server.port);
        let mut disk = vec![0u8; 128 * KIB];
        c.seek(SeekFrom::Start(0)).unwrap();
        c.read_exact(&mut disk).unwrap();
        for (i, sector) in disk.chunks(512).enumerate() {
            let at = i * 512;
            let allowed: &[u8] = if at < 4 * KIB {
                &[1, 3]
            } else if at < 64 * KIB {
                &[1]
            } else {
                &[0, 2]
            };
            assert!(
                sector.iter().all(|&b| b == sector[0]),
                "seed {seed}: sector {i} mixes writes"
            );
            assert!(
                allowed.contains(&sector[0]),
                "seed {seed}: sector {i} holds {} (allowed {allowed:?})",
                sector[0]
            );
        }
        // The log says exactly what happened: replaying it gives the disk we read.
        ctl(dir.path(), &["sync"]);
        let stats = ctl(dir.path(), &["stats"]);
        assert!(stats.contains("\"power_cuts\":1"), "{stats}");
        drop(server);
        let log = nbd_server::log::LogReader::open(&dir.path().join("d.log")).unwrap();
        let kinds: Vec<_> = log.map(|r| r.unwrap().kind.name()).collect();
        assert_eq!(
            kinds,
            ["write", "flush", "write", "write", "mark", "power-cut"],
            "seed {seed}"
        );
    }
}

#[test]
fn ctl_reports_bad_requests_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let out = Command::new(env!("CARGO_BIN_EXE_nbd-server"))
        .args(["ctl", "--socket"])
        .arg(dir.path().join("ctl"))
        .args(["--export", "nope", "stats"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no writable export named"));
    assert_eq!(
        nbd_server::control::request(&dir.path().join("ctl"), "frobnicate").unwrap_err(),
        "unknown request \"frobnicate\" (try: mark NAME, crash [SEED], stats, sync)"
    );
    let mut c = connect(server.port);
    c.write_all(&[7u8; 4096]).unwrap();
    c.flush().unwrap();
}

/// `--crash-after-writes N` cuts the power by itself after the N-th write: the connection
/// drops, the log records the cut, and a new connection is served.
#[test]
fn crash_after_writes_cuts_the_power_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), &["--crash-after-writes", "3", "--seed", "11"]);
    let mut c = connect(server.port);
    c.write_all(&[1u8; 4096]).unwrap();
    c.flush().unwrap();
    c.write_all(&[2u8; 4096]).unwrap();
    // The third write triggers the cut: it or the next request fails.
    let third = c.write_all(&[3u8; 4096]);
    let fourth = third.is_ok() && c.write_all(&[4u8; 4096]).is_ok();
    assert!(
        third.is_err() || !fourth,
        "the connection survived the automatic power cut"
    );
    let mut c = connect(server.port);
    let mut back = vec![0u8; 4096];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, vec![1u8; 4096], "the flushed write survives");
    ctl(dir.path(), &["sync"]);
    let log = nbd_server::log::LogReader::open(&dir.path().join("d.log")).unwrap();
    let kinds: Vec<_> = log.map(|r| r.unwrap().kind.name()).collect();
    assert_eq!(
        kinds[..5],
        ["write", "flush", "write", "write", "power-cut"]
    );
}

/// `eio-write=1` fails every write with EIO, changes nothing, and records each fault.
#[test]
fn injected_write_faults_fail_and_are_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let args = vec![
        "--export".to_string(),
        format!(
            "d:size=1M,record={},eio-write=1,fault-seed=4",
            dir.path().join("d.log").display()
        ),
    ];
    let run = Running::start(&args);
    let server = Server {
        port: run.addr.port(),
        run,
    };
    let mut c = connect(server.port);
    assert!(
        c.write_all(&[5u8; 4096]).is_err(),
        "write must fail with EIO"
    );
    let mut c = connect(server.port);
    let mut back = vec![1u8; 4096];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, vec![0u8; 4096], "a failed write changes nothing");
    drop(c);
    // SIGTERM: a graceful stop writes out the whole log.
    let mut server = server;
    server.run.signal(libc::SIGTERM);
    assert!(server.run.wait_exit(20).success(), "{}", server.run.log());
    let log = nbd_server::log::LogReader::open(&dir.path().join("d.log")).unwrap();
    let kinds: Vec<_> = log.map(|r| r.unwrap().kind.name()).collect();
    assert_eq!(kinds.first().copied(), Some("fault"), "{kinds:?}");
    assert!(!kinds.contains(&"write"));
}
