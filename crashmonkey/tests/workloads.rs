//! `crashmonkey workloads`: the ACE-style `--seq 1` set is written as workload files and
//! shell scripts (never over existing files), `--script` prints the same script, `--seq 2` is
//! seeded, and the scripts run as real system calls on this machine's filesystem with the
//! effects their workload files say.

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use std::path::Path;
use std::process::{Command, Output};

const CM: &str = env!("CARGO_BIN_EXE_crashmonkey");
/// A workload script that takes longer than this is killed (`timeout`).
const SCRIPT_SECONDS_MAX: u32 = 60;
/// One script in this many of the `--seq 1` set runs here (all of them take about 25 s).
const SCRIPT_SAMPLE_EVERY: usize = 8;

fn cm(args: &[&str]) -> Output {
    Command::new(CM).args(args).output().unwrap()
}

/// Whether `tool` runs here; otherwise the skip policy decides (never under CI).
fn have(tool: &str, arg: &str) -> bool {
    let found = Command::new(tool)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success());
    found || skip::skip(&format!("{tool} is not installed (make deps installs it)"))
}

fn run_script(script: &Path, dir: &Path) -> Output {
    let limit = SCRIPT_SECONDS_MAX.to_string();
    Command::new("timeout")
        .args(["-s", "KILL", &limit, "bash"])
        .arg(script)
        .arg(dir)
        .env_remove("CRASHMONKEY_MARK")
        .output()
        .unwrap()
}

#[test]
fn seq1_is_written_once_and_never_over_existing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ace1");
    let o = cm(&["workloads", "--seq", "1", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let names: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    let listed = cm(&["workloads", "--seq", "1"]);
    let count = String::from_utf8_lossy(&listed.stdout).lines().count();
    assert_eq!(names.len(), 2 * count);
    let first = out.join("seq1-0001.txt");
    std::fs::write(&first, "# mine\nsync\n").unwrap();
    let again = cm(&["workloads", "--seq", "1", "--out", out.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not replaced"));
    assert_eq!(std::fs::read_to_string(&first).unwrap(), "# mine\nsync\n");
    let script = cm(&[
        "workloads",
        "--script",
        out.join("seq1-0002.txt").to_str().unwrap(),
    ]);
    assert!(script.status.success());
    assert_eq!(
        script.stdout,
        std::fs::read(out.join("seq1-0002.sh")).unwrap()
    );
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "write ../x 0 1 0x41\n").unwrap();
    let e = cm(&["workloads", "--script", bad.to_str().unwrap()]);
    assert_eq!(e.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&e.stderr).contains("line 1"));
}

#[test]
fn seq2_samples_are_seeded_and_limited() {
    let list = |seed: &str| cm(&["workloads", "--seq", "2", "--seed", seed, "--limit", "5"]).stdout;
    assert_eq!(list("3"), list("3"));
    assert_eq!(String::from_utf8_lossy(&list("3")).lines().count(), 5);
}

#[test]
fn scripts_run_as_their_workloads_say() {
    if !have("xfs_io", "-V") || !have("setfattr", "--version") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ace1");
    assert!(cm(&["workloads", "--out", out.to_str().unwrap()])
        .status
        .success());
    let mut scripts: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sh"))
        .collect();
    scripts.sort();
    for script in scripts.iter().step_by(SCRIPT_SAMPLE_EVERY) {
        let dir = tempfile::tempdir_in(tmp.path()).unwrap();
        let o = run_script(script, dir.path());
        assert!(o.status.success(), "{}: {o:?}", script.display());
    }
    // One workload's effects, checked: fallocate past EOF extends A/foo, setup's xattr stays.
    let w = out.join("mine.txt");
    std::fs::write(
        &w,
        "mkdir A\ncreat A/foo\nwrite A/foo 0 16384 0x62\nsetxattr A/foo user.a v0\nsync\n\
         falloc A/foo alloc 16384 8192\nmwrite A/foo 1000 100 0x58\nrename A/foo A/bar\n\
         fsync A\nmark p1\n",
    )
    .unwrap();
    let sh = out.join("mine.sh");
    let s = cm(&["workloads", "--script", w.to_str().unwrap()]);
    std::fs::write(&sh, &s.stdout).unwrap();
    let dir = tempfile::tempdir_in(tmp.path()).unwrap();
    let o = run_script(&sh, dir.path());
    assert!(o.status.success(), "{o:?}");
    let data = std::fs::read(dir.path().join("A/bar")).unwrap();
    assert_eq!(data.len(), 16384 + 8192);
    assert!(data[..1000].iter().all(|&b| b == 0x62));
    assert!(data[1000..1100].iter().all(|&b| b == 0x58));
    assert!(data[16384..].iter().all(|&b| b == 0));
    let attr = Command::new("getfattr")
        .args(["-n", "user.a", "--only-values"])
        .arg(dir.path().join("A/bar"))
        .output()
        .unwrap();
    assert_eq!(attr.stdout, b"v0");
}

/// The example in docs/kernel-workloads.md parses, uses every operation of the format's
/// table, and prints back as written.
#[test]
fn the_documented_example_is_a_workload_with_every_operation() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kernel-workloads.md"),
    )
    .unwrap();
    let example = doc
        .split("```workload\n")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("an example block");
    let w = crashmonkey::workload::parse(example, "x").unwrap();
    assert_eq!(w.to_string(), example);
    let table: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split([' ', '`']).next())
        .collect();
    assert_eq!(table.len(), 16, "{table:?}");
    for op in table {
        assert!(
            example.lines().any(|l| l.split(' ').next() == Some(op)),
            "the example has no {op}"
        );
    }
}
