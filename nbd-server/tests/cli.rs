//! The `nbd-server` binary: help, clear errors on bad exports, the "listening on" line,
//! serving, and a clean exit 0 on SIGTERM after flushing a file export.

mod common;

use std::process::Command;

use common::binary::Running;
use common::wire::*;
use common::Raw;

const BIN: &str = env!("CARGO_BIN_EXE_nbd-server");

#[test]
fn help_explains_flags_with_examples() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "--listen", "--export", "--unix", "Examples", "size=", "readonly", "RUST_LOG",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn bad_exports_fail_with_a_clear_message() {
    for (spec, needle) in [
        ("disk:size=1000", "multiple of 4096"),
        ("disk", "missing ':'"),
        ("disk:size=1M,colour=red", "unknown key \"colour\""),
        ("disk:size=lots", "not a size"),
    ] {
        let out = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--export", spec])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{spec} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{spec}: {err}");
    }
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no export given");
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--export",
            "a:size=4K",
            "--export",
            "a:size=8K",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "an export given twice is refused"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("given twice"));
}

#[test]
fn limits_subcommand_prints_json() {
    let out = Command::new(BIN)
        .args(["limits", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["PAYLOAD_BYTES_MAX"], 32 << 20);
    assert!(v["REQUESTS_IN_FLIGHT_MAX"].as_u64().unwrap() >= 128);
}

#[test]
fn serves_then_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let mut run = Running::start(&[
        "--export".into(),
        format!("d:size=1M,file={}", img.display()),
    ]);
    let addr = run.addr;
    let mut c = Raw::connect(addr);
    c.handshake(3);
    c.go("d", false, false).unwrap();
    c.request(0, NBD_CMD_WRITE, 1, 8192, 4096, &[0x77; 4096]);
    assert_eq!(c.simple_reply(0).0, 0);
    run.signal(libc::SIGTERM);
    let status = run.wait_exit(20);
    let rest = run.log();
    assert!(status.success(), "exit status {status}: {rest}");
    assert!(rest.contains("stopped"), "{rest}");
    assert!(c.closed());
    assert_eq!(&std::fs::read(&img).unwrap()[8192..12288], &[0x77; 4096]);
}

/// Starts the binary with `args` (within [`common::binary::START_SECONDS_MAX`]: a server
/// that never says "listening on" fails the test instead of hanging it); returns it and its
/// stderr lines up to "listening on" (the last line of start-up: the control socket, if any,
/// is served by then).
fn start_lines(args: &[String]) -> (Running, Vec<String>) {
    let run = Running::start(args);
    let lines = run.log().lines().map(str::to_owned).collect();
    (run, lines)
}

/// A memory export with no emulated-disk key on a server without `--control` is plain memory
/// (nothing could observe a cache there); a file, any disk key or `--control` brings the disk.
/// The same for the disk under an fs-core volume in memory; one on an image keeps it.
#[test]
fn plain_memory_export_has_no_emulated_disk_unless_something_could_observe_it() {
    let dir = tempfile::tempdir().unwrap();
    let export_line = |lines: &[String], name: &str| -> String {
        lines
            .iter()
            .find(|l| l.contains(&format!("export \"{name}\"")))
            .unwrap_or_else(|| panic!("no line for {name}: {lines:?}"))
            .clone()
    };
    let args: Vec<String> = [
        "--export",
        "a:size=1M",
        "--export",
        "b:size=1M,cache=1M",
        "--export",
        &format!("c:size=1M,file={}", dir.path().join("c.img").display()),
        "--export",
        "d:size=1M,crash-after-writes=1000",
        "--export",
        "e:size=1M,fscore=mem",
        "--export",
        &format!("f:size=1M,fscore={}", dir.path().join("f.img").display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (run, lines) = start_lines(&args);
    for name in ["a", "e"] {
        assert!(
            export_line(&lines, name).contains("no emulated disk"),
            "{lines:?}"
        );
    }
    for name in ["b", "c", "d", "f"] {
        assert!(
            !export_line(&lines, name).contains("no emulated disk"),
            "{lines:?}"
        );
    }
    drop(run);

    let ctl = dir.path().join("ctl");
    let args: Vec<String> = vec![
        "--export".into(),
        "a:size=1M".into(),
        "--export".into(),
        "e:size=1M,fscore=mem".into(),
        "--control".into(),
        ctl.display().to_string(),
    ];
    let (run, lines) = start_lines(&args);
    for name in ["a", "e"] {
        assert!(
            !export_line(&lines, name).contains("no emulated disk"),
            "{lines:?}"
        );
    }
    let out = Command::new(BIN)
        .arg("ctl")
        .arg("--socket")
        .arg(&ctl)
        .arg("stats")
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"a\""),
        "ctl stats: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(run);
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: i32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|t| {
            let comm = std::fs::read_to_string(t.as_ref().unwrap().path().join("comm"));
            comm.is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

/// The nice values of the threads of `pid` whose name starts with `prefix`.
fn nice_of_threads(pid: i32, prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let after_comm = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if let (true, Some(nice)) = (
            comm.starts_with(prefix),
            after_comm.split_whitespace().nth(16),
        ) {
            out.push(nice.parse().unwrap());
        }
    }
    out
}

/// Waits (at most 10 s) until `pid` has `n` runtime workers.
fn wait_for_workers(pid: i32, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while threads_named(pid, "tokio-runtime-w") < n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(threads_named(pid, "tokio-runtime-w"), n);
}

/// With fs-core exports the runtime's workers run nicer than the engine thread (10 by
/// default, `--worker-nice N` otherwise); a server of memory exports leaves them alone; the
/// flag refuses anything outside 0..=19.
#[test]
fn worker_nice_lowers_the_workers_beside_an_engine_thread() {
    let base = nbd_server::priority::this_thread_nice().unwrap();
    let expect = |by: i32| (base + by).min(19);
    let cases: [(&[&str], &str, i32); 4] = [
        (&[], "d:size=1M,fscore=mem", expect(10)),
        (&["--worker-nice", "3"], "d:size=1M,fscore=mem", expect(3)),
        (&["--worker-nice", "0"], "d:size=1M,fscore=mem", base),
        (&[], "d:size=1M", base),
    ];
    for (flags, export, want) in cases {
        let mut args: Vec<String> = vec!["--workers".into(), "2".into()];
        args.extend(flags.iter().map(|s| s.to_string()));
        args.extend(["--export".to_string(), export.to_string()]);
        let run = Running::start(&args);
        wait_for_workers(run.pid(), 2);
        // A worker is named before it runs its start hook: wait for both to have run it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut workers = nice_of_threads(run.pid(), "tokio-runtime-w");
        while workers != vec![want; 2] && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            workers = nice_of_threads(run.pid(), "tokio-runtime-w");
        }
        assert_eq!(workers, vec![want; 2], "{args:?}");
        let engines = nice_of_threads(run.pid(), "fscore");
        assert!(engines.iter().all(|&n| n == base), "{args:?}: {engines:?}");
        let mut c = Raw::connect(run.addr);
        c.handshake(3);
        c.go("d", false, false).unwrap();
        c.request(0, NBD_CMD_WRITE, 1, 0, 4096, &[0x3c; 4096]);
        assert_eq!(c.simple_reply(0).0, 0);
    }
    for bad in ["-1", "20", "low"] {
        let out = Command::new(BIN)
            .args([&format!("--worker-nice={bad}"), "--export", "d:size=1M"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--worker-nice {bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--worker-nice"), "{bad}: {err}");
    }
}

/// `--workers N` sets the threads serving connections (each serves), and anything outside
/// 1..=WORKER_THREADS_MAX is refused with the range.
#[test]
fn workers_sets_the_threads_serving_connections() {
    for n in [1usize, 3] {
        let run = Running::start(&[
            "--workers".into(),
            n.to_string(),
            "--export".into(),
            "d:size=1M,fscore=mem".into(),
        ]);
        // The runtime starts its workers while the server binds: wait for them to be named.
        wait_for_workers(run.pid(), n);
        let mut c = Raw::connect(run.addr);
        c.handshake(3);
        c.go("d", false, false).unwrap();
        c.request(0, NBD_CMD_WRITE, 1, 8192, 4096, &[0x5a; 4096]);
        assert_eq!(c.simple_reply(0).0, 0);
        c.request(0, NBD_CMD_READ, 2, 8192, 4096, &[]);
        assert_eq!(c.simple_reply(4096), (0, 2, vec![0x5a; 4096]));
    }
    for bad in ["0", "65", "many"] {
        let out = Command::new(BIN)
            .args(["--workers", bad, "--export", "d:size=1M"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--workers {bad} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--workers"), "{bad}: {err}");
    }
}
