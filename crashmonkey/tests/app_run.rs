//! `crashmonkey run` on this machine's kernel: a tiny shell workload on ext4 (three files,
//! each fsynced with its directory, a mark after each) and a checker that holds each state
//! to the files fsynced before its mark.
//!
//! - With an honest disk, no state fails, and the checker saw `{mnt}` with the files in it
//!   (it guards against a checker given an empty folder, which would pass every state).
//! - With a lying disk (`flush=ignore`), the durable states lose what fsync promised: a run
//!   that checked only prefix states, or ignored the checker's exit, would pass both disks
//!   alike. The bundle's `check.sh` shows the failure again.
//! - A state that does not mount is a failing state, with mount's and the kernel's words.
//! - SIGINT while the workload runs, and while a checker runs on a mounted state, leaves no
//!   mount, loop device or work folder.
//!
//! They need root, /dev/fuse, loop devices, nbdfuse and mkfs.ext4: elsewhere the skip policy
//! decides (never under CI).

mod common;

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const CM: &str = env!("CARGO_BIN_EXE_crashmonkey");
/// A test's run that takes longer than this is a failure.
const RUN_SECONDS_MAX: u64 = 120;

/// Three files, each fsynced with its directory, a mark after each.
const WORKLOAD: &str = "cd \"$CRASHMONKEY_MNT\" && for i in 1 2 3; do \
    echo \"row $i\" > f$i && sync f$i . && crashmonkey mark m$i; done";

/// What `crashmonkey run` on ext4 needs besides root, /dev/fuse and a loop device.
const RUN_TOOLS: [&str; 4] = ["nbdfuse", "fusermount3", "losetup", "mkfs.ext4"];

/// Whether this machine can run `crashmonkey run` on ext4; otherwise the skip policy decides.
fn can_run() -> bool {
    common::kernel_unready(&RUN_TOOLS).is_none_or(|why| skip::skip(&why))
}

/// The checker: records what it saw (state, mark, the names in `{mnt}`) in `seen`, then
/// requires every file fsynced before the mark to hold its line.
fn checker(tmp: &Path, extra: &str) -> String {
    let script = tmp.join("check.sh");
    let text = format!(
        "mnt=$1 mark=$2 state=$3 image=$4\n\
         echo \"$state $mark: $(cd \"$mnt\" && ls | tr '\\n' ' ')\" >> {seen}\n\
         {extra}\n\
         [ -s \"$image\" ] || {{ echo \"no image $image\"; exit 3; }}\n\
         [ -z \"$mark\" ] && exit 0\n\
         for i in $(seq 1 ${{mark#m}}); do\n\
         grep -qx \"row $i\" \"$mnt/f$i\" || {{ echo \"f$i lost after $mark\"; exit 1; }}\n\
         done\n",
        seen = tmp.join("seen").display()
    );
    std::fs::write(&script, text).unwrap();
    format!(
        "sh {} {{mnt}} {{mark}} {{state}} {{image}}",
        script.display()
    )
}

fn crashmonkey_run(tmp: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(CM);
    c.arg("run")
        .args(["--fs", "ext4"])
        .args(args)
        .env("TMPDIR", tmp);
    c
}

/// Runs `crashmonkey run ARGS --json`; its output and summary.
fn run(tmp: &Path, args: &[&str]) -> (Output, serde_json::Value) {
    let t = Instant::now();
    let out = crashmonkey_run(tmp, args).arg("--json").output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(RUN_SECONDS_MAX));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{args:?}: no summary:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out, summary)
}

/// Nothing of a run is left: no mount, no loop device over its files, no work folder.
fn assert_clean(tmp: &Path) {
    let prefix = tmp.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&prefix),
        "a mount is left under {prefix}:\n{mounts}"
    );
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(!loops.contains(&prefix), "a loop device is left:\n{loops}");
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("crashmonkey-run")
        })
        .collect();
    assert!(left.is_empty(), "work folders left: {left:?}");
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn an_honest_disk_keeps_what_fsync_promised_and_the_checker_sees_the_files() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let check = checker(tmp.path(), "");
    let (out, s) = run(tmp.path(), &["--workload", WORKLOAD, "--checker", &check]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{s}\n{stderr}");
    assert_eq!(s["marks"], serde_json::json!(["m1", "m2", "m3"]), "{s}");
    assert_eq!(num(&s, "findings"), 0, "{s}");
    // At least the durable state at each mark and the final state.
    assert!(num(&s, "states") >= 4, "{s}");
    let seen = std::fs::read_to_string(tmp.path().join("seen")).unwrap();
    assert_eq!(seen.lines().count() as u64, num(&s, "states"), "{seen}");
    // The final state has every file; the durable state at m1 has f1.
    assert!(seen.contains("final m3: f1 f2 f3 lost+found"), "{seen}");
    assert!(seen.contains("durable m1: f1 "), "{seen}");
    assert_clean(tmp.path());
}

#[test]
fn a_lying_disk_loses_what_fsync_promised_and_the_bundle_shows_it_again() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    let check = checker(tmp.path(), "");
    let args = [
        "--workload",
        WORKLOAD,
        "--checker",
        &check,
        "--lying-disk",
        "--out",
        camp.to_str().unwrap(),
    ];
    let (out, s) = run(tmp.path(), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{s}\n{stderr}");
    // Nothing is ever durable: the durable state at each mark is the empty filesystem.
    let sigs = s["signatures"].as_array().unwrap();
    assert!(
        sigs.iter()
            .any(|g| g == "ext4 lying disk: checker exit 1 in durable states"),
        "{s}"
    );
    assert_eq!(num(&s, "failing_states"), 3, "{s}");
    assert!(s["failing"][0]["output"]
        .as_str()
        .unwrap()
        .contains("f1 lost after m1"));
    let index = std::fs::read_to_string(camp.join("findings.jsonl")).unwrap();
    assert_eq!(index.lines().count() as u64, num(&s, "failing_states"));
    let bundle = camp.join("findings/ext4-lying-disk-checker-exit-1-in-durable-states");
    for f in [
        "workload.txt",
        "checker.txt",
        "disk.log",
        "state.img.gz",
        "output.txt",
        "check.sh",
        "README.md",
        "more.txt",
    ] {
        assert!(bundle.join(f).is_file(), "{} has no {f}", bundle.display());
    }
    let readme = std::fs::read_to_string(bundle.join("README.md")).unwrap();
    assert!(readme.contains("sudo sh check.sh"), "{readme}");
    assert!(readme.contains("--lying-disk"), "{readme}");
    // `findings` and `report` read the run's folder.
    let f = Command::new(CM)
        .args(["findings", camp.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_eq!(
        f.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
    let fj: serde_json::Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(
        (fj["kind"].as_str(), &fj["failing_states"]),
        (Some("app"), &s["failing_states"])
    );
    assert_eq!(fj["findings"][0]["again"], "sudo sh check.sh", "{fj}");
    let html = tmp.path().join("run.html");
    let r = Command::new(CM)
        .args([
            "report",
            camp.to_str().unwrap(),
            "-o",
            html.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("f1 lost after m1"), "{page}");
    // The one command shows it again: the state at m1 without f1.
    let again = Command::new("sh")
        .arg(bundle.join("check.sh"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&again.stdout);
    assert_eq!(again.status.code(), Some(1), "{text}");
    assert!(text.contains("f1 lost after m1"), "{text}");
    assert_clean(tmp.path());
}

/// The same command on a folder of its run resumes it: done, the stored summary comes back
/// (same exit status) and nothing runs; interrupted (no `summary.json`), what the run wrote
/// goes and it runs again to the same findings. A folder of another run, or holding a file a
/// run does not write, is refused and left as it is.
#[test]
fn the_same_run_resumes_and_any_other_folder_is_refused() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    let check = checker(tmp.path(), "");
    let mut args = vec!["--workload", WORKLOAD, "--checker", &check, "--lying-disk"];
    args.extend(["--out", camp.to_str().unwrap()]);
    let (out, first) = run(tmp.path(), &args);
    assert_eq!(out.status.code(), Some(1), "{first}");
    let seen = std::fs::read_to_string(tmp.path().join("seen")).unwrap();
    let (out, again) = run(tmp.path(), &args);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(again, first, "a done run gives its stored summary");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds this run, done"), "{err}");
    let seen_after = std::fs::read_to_string(tmp.path().join("seen")).unwrap();
    assert_eq!(seen_after, seen, "the checker ran again");
    // Interrupted: no summary, a partial bundle and output left behind.
    std::fs::remove_file(camp.join("summary.json")).unwrap();
    std::fs::create_dir_all(camp.join("findings/half-written")).unwrap();
    std::fs::write(camp.join("workload-output.txt"), "partial").unwrap();
    let (out, redone) = run(tmp.path(), &args);
    assert_eq!(out.status.code(), Some(1), "{redone}");
    assert_eq!(redone["signatures"], first["signatures"]);
    assert_eq!(redone["failing_states"], first["failing_states"]);
    assert!(!camp.join("findings/half-written").exists());
    let index = std::fs::read_to_string(camp.join("findings.jsonl")).unwrap();
    assert_eq!(index.lines().count() as u64, num(&first, "failing_states"));
    // Another run's parameters (an honest disk) are refused; the folder stays as it was.
    let summary = std::fs::read(camp.join("summary.json")).unwrap();
    let honest: Vec<&str> = args
        .iter()
        .copied()
        .filter(|a| *a != "--lying-disk")
        .collect();
    let out = crashmonkey_run(tmp.path(), &honest).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("holds another run"), "{err}");
    assert_eq!(std::fs::read(camp.join("summary.json")).unwrap(), summary);
    // A file a run does not write keeps an interrupted folder from being resumed.
    std::fs::remove_file(camp.join("summary.json")).unwrap();
    std::fs::write(camp.join("notes.txt"), "mine").unwrap();
    let out = crashmonkey_run(tmp.path(), &args).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("which a run does not write"), "{err}");
    assert_eq!(
        std::fs::read_to_string(camp.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(
        camp.join("findings.jsonl").exists(),
        "a refused resume removed files"
    );
    assert_clean(tmp.path());
}

/// A state that does not mount is a failing state even when the checker would pass it, with
/// mount's words and the kernel's: the workload zeroes ext4's primary superblock through the
/// loop device under the mount (`dd ... conv=fsync`), then sets a mark.
#[test]
fn a_state_that_does_not_mount_is_a_finding_with_the_kernels_words() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let workload = "dev=$(findmnt -n -o SOURCE \"$CRASHMONKEY_MNT\") && \
        dd if=/dev/zero of=\"$dev\" bs=1024 seek=1 count=1 oflag=direct conv=fsync status=none \
        && crashmonkey mark zeroed";
    let (out, s) = run(tmp.path(), &["--workload", workload, "--checker", "true"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{s}\n{stderr}");
    assert!(
        s["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g == "ext4 honest disk: does not mount in durable states"),
        "{s}"
    );
    let f = &s["failing"][0];
    assert_eq!(
        (f["mark"].as_str(), f["mounted"].as_bool()),
        (Some("zeroed"), Some(false))
    );
    let words = f["output"].as_str().unwrap();
    assert!(words.contains("superblock"), "{words}");
    assert!(words.contains("Kernel log (last lines)"), "{words}");
    assert_clean(tmp.path());
}

/// Waits up to the run's deadline for `file` to exist while `child` runs.
fn wait_for_file(child: &mut std::process::Child, file: &Path) {
    let t = Instant::now();
    while !file.exists() {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(t.elapsed() < Duration::from_secs(RUN_SECONDS_MAX));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sends SIGINT to a run once `ready` exists; it must exit 2 having undone everything.
fn interrupt(tmp: &Path, args: &[&str], ready: &Path) {
    let mut child = crashmonkey_run(tmp, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_file(&mut child, ready);
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    // The sleeps below are 100 s: the run killed them.
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("stopped by signal"), "{stderr}");
    assert_clean(tmp);
}

#[test]
fn sigint_while_the_workload_or_a_checker_runs_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ready = tmp.path().join("ready");
    let workload = format!("{WORKLOAD} && touch {} && sleep 100", ready.display());
    let check = checker(tmp.path(), "");
    interrupt(
        tmp.path(),
        &["--workload", &workload, "--checker", &check],
        &ready,
    );
    // Now with the second state mounted and its checker asleep.
    std::fs::remove_file(&ready).unwrap();
    let wait = format!(
        "[ \"$state $mark\" = \"durable m2\" ] && touch {} && sleep 100",
        ready.display()
    );
    let check = checker(tmp.path(), &wait);
    interrupt(
        tmp.path(),
        &["--workload", WORKLOAD, "--checker", &check],
        &ready,
    );
}

#[test]
fn mark_outside_a_run_says_what_is_missing() {
    let out = Command::new(CM)
        .args(["mark", "m1"])
        .env_remove("CRASHMONKEY_CONTROL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CRASHMONKEY_CONTROL"), "{stderr}");
}
