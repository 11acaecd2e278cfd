//! The `crashmonkey` write-log commands as a user runs them.

mod common;

use std::process::Command;

use common::log;

fn cm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(args)
        .output()
        .unwrap()
}

/// Same log and seed: byte-identical `states --json` output (ids, subsets, hashes).
#[test]
fn states_output_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let l = l.to_str().unwrap();
    let a = cm(&["states", l, "--seed", "3", "--samples", "5", "--json"]);
    let b = cm(&["states", l, "--seed", "3", "--samples", "5", "--json"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    let text = String::from_utf8(a.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(summary["states"].as_u64().unwrap() > 10);
    let c = cm(&["states", l, "--seed", "4", "--samples", "5", "--json"]);
    assert_ne!(text.as_bytes(), &c.stdout[..]);
}

/// `log show` says a log its writer closed without a power cut is one, and a reader that
/// stops reading (`| head`) ends it quietly: exit 0, no panic.
#[test]
fn log_show_names_a_closed_log_and_stops_quietly_when_its_reader_does() {
    let dir = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let l = l.to_str().unwrap();
    let out = cm(&["log", "show", l]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(
        first.contains("closed by its writer with no power cut"),
        "{first}"
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(["log", "show", l])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes before the first line
    let done = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Any command whose reader stops reading ends quietly: `states --json | head` exits 0
/// with no panic, and leaves its work folder empty.
#[test]
fn a_closed_stdout_ends_a_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let w = work.path().to_str().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
        .args(["states", l.to_str().unwrap(), "--json", "--work-dir", w])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let done = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

/// `states --work-dir DIR`: the same states, the tables in DIR and gone afterwards; a work dir
/// that is not a folder is refused (exit 1, as the write-log commands refuse bad input).
#[test]
fn states_work_dir_gives_the_same_states_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let l = l.to_str().unwrap();
    let w = work.path().to_str().unwrap();
    let a = cm(&["states", l, "--seed", "3", "--json"]);
    let b = cm(&["states", l, "--seed", "3", "--json", "--work-dir", w]);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    assert_eq!(a.stdout, b.stdout);
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
    let missing = work.path().join("nope");
    let c = cm(&["states", l, "--work-dir", missing.to_str().unwrap()]);
    assert_eq!(c.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&c.stderr).contains("--work-dir"));
}

#[test]
fn check_json_summary_has_the_documented_fields() {
    let dir = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let base = dir.path().join("base.img");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = cm(&[
        "check",
        l.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--checker",
        "test -s {image}",
        "--json",
        "--jobs",
        "2",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["states", "unique", "passed", "failed", "seconds"] {
        assert!(s.get(k).is_some(), "missing {k}: {s}");
    }
    assert_eq!(s["failed"], 0);
    // The CPU it took, its own and its checkers' (each checker is a shell: never nothing).
    let cpu = |k: &str| {
        s["cpu"][k]
            .as_f64()
            .unwrap_or_else(|| panic!("cpu.{k}: {s}"))
    };
    assert!(cpu("crashmonkey") > 0.0 && cpu("checkers") > 0.0, "{s}");
    // A failing checker makes the command exit non-zero.
    let out = cm(&[
        "check",
        l.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--checker",
        "false {image}",
    ]);
    assert_eq!(out.status.code(), Some(1));
}

/// Bad input: a clear message and a non-zero exit, never a panic.
#[test]
fn bad_input_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let mut bytes = std::fs::read(&l).unwrap();
    bytes[200] ^= 0x55;
    let bad = dir.path().join("bad.log");
    std::fs::write(&bad, &bytes).unwrap();
    let out = cm(&["log", "stats", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt at byte"), "{err}");
    assert!(!err.contains("panicked"));
    let out = cm(&["log", "show", "/nonexistent/x.log"]);
    assert!(!out.status.success());
    let out = cm(&[
        "check",
        l.to_str().unwrap(),
        "--base",
        l.to_str().unwrap(),
        "--checker",
        "true",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("{image}"));
    let small = dir.path().join("small.img");
    std::fs::write(&small, [0u8; 10]).unwrap();
    let out = cm(&[
        "replay",
        l.to_str().unwrap(),
        "--base",
        small.to_str().unwrap(),
        "-o",
        dir.path().join("o.img").to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("smaller than the logged disk"));
}

/// A hanging checker is killed at its time limit and its state fails; nothing hangs.
#[test]
fn hanging_checker_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let base = dir.path().join("base.img");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = cm(&[
        "check",
        l.to_str().unwrap(),
        "--base",
        base.to_str().unwrap(),
        "--checker",
        "sleep 100; test -e {image}",
        "--timeout-seconds",
        "1",
        "--samples",
        "1",
        "--no-torn",
        "--max-subset",
        "1",
        "--json",
        "--jobs",
        "4",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["passed"], 0);
    assert!(s["failures"][0]["output"]
        .as_str()
        .unwrap()
        .contains("timed out after 1 s"));
}
