//! `crashmonkey check` under faults and bad input (issue 13, items 9, 11-14): checkers that
//! leave children behind, hang, die by a signal or delete their image; Ctrl-C and SIGTERM;
//! base images that do not fit the log. Each test names the bug it guards against.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    all_gone_within, base, check_cmd, log, output_within, pids_in, wait_within, KillOnDrop,
    DISK_BYTES,
};

/// Longest any one `crashmonkey` run in these tests may take before the test fails.
const RUN_SECONDS_MAX: u64 = 60;

fn run_limit() -> Duration {
    Duration::from_secs(RUN_SECONDS_MAX)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn summary(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stderr:\n{}", stderr(out)))
}

/// Item 9: a checker that leaves a daemonised child (`setsid`) holding its stdout hung the run
/// until that child ended (300 s a state): the output was read to its end. Now the pipes are
/// read for a short grace after the checker itself ended, then let go.
#[test]
fn daemonised_grandchild_holding_the_pipe_does_not_hang_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let (l, b) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    let pids = dir.path().join("pids");
    let _reap = KillOnDrop(pids.clone());
    // The checker waits until its daemon has left its process group (else the group's kill
    // at its end could beat the daemon's setsid, and nothing would hold the pipe).
    let checker = format!(
        "setsid sh -c 'echo $$ >> {p}; touch {p}.{{state}}; exec sleep 300' & \
         while [ ! -e {p}.{{state}} ]; do sleep 0.01; done; true {{image}}",
        p = pids.display()
    );
    let started = Instant::now();
    let out = output_within(
        &mut check_cmd(&l, &b, &checker, &["--json", "--jobs", "2"]),
        run_limit(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["failed"], 0, "{s}");
    assert!(s["passed"].as_u64().unwrap() > 0, "{s}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // The checker did leave its daemons behind, holding the pipe: the test tests something.
    assert!(pids_in(&pids).into_iter().any(common::alive));
}

/// Item 9: at the time limit the checker's whole process group is killed, its children too,
/// and the state fails saying it timed out.
#[test]
fn timed_out_checker_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let (l, b) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    let pids = dir.path().join("pids");
    let _reap = KillOnDrop(pids.clone());
    let checker = format!(
        "echo $$ >> '{p}'; sleep 300 & echo $! >> '{p}'; wait; true {{image}}",
        p = pids.display()
    );
    let args = ["--json", "--jobs", "2", "--timeout-seconds", "1"];
    let out = output_within(&mut check_cmd(&l, &b, &checker, &args), run_limit());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = summary(&out);
    assert_eq!(s["passed"], 0, "{s}");
    for f in s["failures"].as_array().unwrap() {
        assert_eq!(f["timed_out"], true, "{f}");
        assert_eq!(f["exit_code"], serde_json::Value::Null, "{f}");
        assert!(f["reason"]
            .as_str()
            .unwrap()
            .contains("timed out after 1 s"));
    }
    assert!(pids_in(&pids).len() >= 4);
    assert!(
        all_gone_within(&pids, Duration::from_secs(5)),
        "a checker or its child outlived its timeout"
    );
}

/// Item 11: a checker killed by a signal was reported as `exit None`. The signal is named, in
/// the JSON summary and in the text report.
#[test]
fn checker_killed_by_a_signal_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (l, b) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    for (sig, name, number) in [("KILL", "SIGKILL", 9), ("TERM", "SIGTERM", 15)] {
        let checker = format!("kill -{sig} $$; true {{image}}");
        let out = output_within(&mut check_cmd(&l, &b, &checker, &["--json"]), run_limit());
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        let s = summary(&out);
        assert_eq!(s["passed"], 0, "{s}");
        let want = format!("killed by signal {number} ({name})");
        for f in s["failures"].as_array().unwrap() {
            assert_eq!(f["exit_code"], serde_json::Value::Null, "{f}");
            assert_eq!(f["signal"], name, "{f}");
            assert_eq!(f["timed_out"], false, "{f}");
            assert!(f["reason"].as_str().unwrap().contains(&want), "{f}");
        }
        let out = output_within(&mut check_cmd(&l, &b, &checker, &[]), run_limit());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(&want)),
            "{text}"
        );
    }
}

/// The md5 of `{image}` per state, one "STATE HASH" line each, sorted.
fn hashes(file: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    lines
}

/// A checker that does `damage` to `{image}` in every odd state fails those states, with
/// `reason` in their failure; the worker's image is built again and every later state holds
/// the same bytes as in a run where nothing was touched.
fn damaging_checker_fails_that_state_only(damage: &str, reason: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (l, b) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    let record = |f: &Path| {
        format!(
            "echo {{state}} $(md5sum < {{image}} | cut -c1-32) >> '{}'",
            f.display()
        )
    };
    let (seen_a, seen_b, out_a) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("out-a"),
    );
    let deleting = format!(
        "{}; case {{state}} in *[13579]) {damage};; esac",
        record(&seen_a)
    );
    let args = ["--json", "--jobs", "2", "--out", out_a.to_str().unwrap()];
    let out = output_within(&mut check_cmd(&l, &b, &deleting, &args), run_limit());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = summary(&out);
    let unique = s["unique"].as_u64().unwrap();
    assert!(unique >= 4, "{s}");
    assert_eq!(s["failed"].as_u64().unwrap(), unique / 2, "{s}");
    for f in s["failures"].as_array().unwrap() {
        assert_eq!(f["id"].as_u64().unwrap() % 2, 1, "{f}");
        assert!(f["reason"].as_str().unwrap().contains(reason), "{f}");
        let img = f["image"].as_str().expect("the state's image is kept");
        assert_eq!(std::fs::metadata(img).unwrap().len(), DISK_BYTES);
    }
    assert!(out_a.join("summary.json").exists());
    let keeping = format!("{}; true", record(&seen_b));
    let out = output_within(
        &mut check_cmd(&l, &b, &keeping, &["--jobs", "2"]),
        run_limit(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hashes(&seen_a), hashes(&seen_b));
}

/// Item 12: a checker that deleted `{image}` aborted the whole run with no summary. Now that
/// state fails saying why, the worker's image is built again and the run goes on.
#[test]
fn checker_deleting_its_image_fails_that_state_only() {
    damaging_checker_fails_that_state_only("rm {image}", "removed");
}

/// A regular file of another size left where `{image}` was (removed, then built again).
#[test]
fn checker_truncating_its_image_fails_that_state_only() {
    damaging_checker_fails_that_state_only("truncate -s 4096 {image}", "changed the size");
}

/// A checker that leaves a directory (with a file in it) where `{image}` was fails that state
/// saying so; the worker's image is built again (the directory removed whole) and every later
/// state holds the same bytes as in a run where nothing was touched.
#[test]
fn checker_leaving_a_directory_at_its_image_fails_that_state_only() {
    let dir = tempfile::tempdir().unwrap();
    let (l, b) = (log(dir.path()), base(dir.path(), DISK_BYTES));
    let record = |f: &Path| {
        format!(
            "echo {{state}} $(md5sum < {{image}} | cut -c1-32) >> '{}'",
            f.display()
        )
    };
    let (seen_a, seen_b) = (dir.path().join("a"), dir.path().join("b"));
    let replacing = format!(
        "{}; case {{state}} in *[13579]) rm {{image}} && mkdir {{image}} && touch {{image}}/x;; esac",
        record(&seen_a)
    );
    let out = output_within(
        &mut check_cmd(&l, &b, &replacing, &["--json", "--jobs", "2"]),
        run_limit(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let s = summary(&out);
    let unique = s["unique"].as_u64().unwrap();
    assert!(unique >= 4, "{s}");
    assert_eq!(s["failed"].as_u64().unwrap(), unique / 2, "{s}");
    for f in s["failures"].as_array().unwrap() {
        assert_eq!(f["id"].as_u64().unwrap() % 2, 1, "{f}");
        assert!(f["reason"].as_str().unwrap().contains("directory"), "{f}");
    }
    let keeping = format!("{}; true", record(&seen_b));
    let out = output_within(
        &mut check_cmd(&l, &b, &keeping, &["--jobs", "2"]),
        run_limit(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(hashes(&seen_a), hashes(&seen_b));
}

/// Runs a check whose state 0 passes and whose later states hang (each checker writes its
/// pid and its child's to `pids`), sends `signal` once both hanging checkers run (to the whole
/// process group, as Ctrl-C does, when `to_group`), and returns the run's output, its
/// summary.json, and what is left in its TMPDIR.
fn interrupted_run(
    dir: &Path,
    signal: &str,
    to_group: bool,
) -> (std::process::Output, serde_json::Value, Vec<String>) {
    let (l, b) = (log(dir), base(dir, DISK_BYTES));
    let (pids, tmp, out_dir) = (dir.join("pids"), dir.join("tmp"), dir.join("out"));
    std::fs::create_dir(&tmp).unwrap();
    let checker = format!(
        "case {{state}} in 0) exit 0;; esac; echo $$ >> '{p}'; sleep 300 & echo $! >> '{p}'; wait; true {{image}}",
        p = pids.display()
    );
    let args = ["--json", "--jobs", "2", "--out", out_dir.to_str().unwrap()];
    let child = check_cmd(&l, &b, &checker, &args)
        .env("TMPDIR", &tmp)
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while pids_in(&pids).len() < 4 {
        assert!(
            started.elapsed() < run_limit(),
            "the checkers never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_some(),
        "the run keeps its images in TMPDIR"
    );
    let target = if to_group {
        format!("-{}", child.id())
    } else {
        child.id().to_string()
    };
    let sent = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &target])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = wait_within(child, run_limit());
    let summary = std::fs::read(out_dir.join("summary.json"))
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or_else(|e| panic!("no summary.json ({e}); stderr:\n{}", stderr(&out)));
    let left = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        all_gone_within(&pids, Duration::from_secs(5)),
        "a checker outlived the interrupted run"
    );
    (out, summary, left)
}

fn assert_interrupted(s: &serde_json::Value, name: &str) {
    assert_eq!(s["interrupted"]["signal"], name, "{s}");
    // State 0 passed before the signal; states 1 and 2 hung and are not counted.
    assert_eq!(s["passed"], 1, "{s}");
    assert_eq!(s["failed"], 0, "{s}");
}

/// Item 13: Ctrl-C (SIGINT to the process group) killed crashmonkey at once: no summary,
/// disk-sized temporary images left behind, the running checkers orphaned. Now the checkers'
/// process groups are killed, a partial summary.json says it was interrupted and how far it
/// got, the temporary files go, and the exit code is 130.
#[test]
fn ctrl_c_stops_the_run_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let _reap = KillOnDrop(dir.path().join("pids"));
    let (out, s, left) = interrupted_run(dir.path(), "INT", true);
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert_interrupted(&s, "SIGINT");
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Item 13: the same for SIGTERM sent to crashmonkey alone (as a service manager does): exit
/// code 143.
#[test]
fn sigterm_stops_the_run_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let _reap = KillOnDrop(dir.path().join("pids"));
    let (out, s, left) = interrupted_run(dir.path(), "TERM", false);
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert_interrupted(&s, "SIGTERM");
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Item 14: a base image larger than the logged disk was used silently (its first bytes). It
/// is refused unless `--allow-larger-base` says so, by `check` and by `replay`.
#[test]
fn base_larger_than_the_disk_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (l, big) = (log(dir.path()), base(dir.path(), 2 * DISK_BYTES));
    let out = output_within(&mut check_cmd(&l, &big, "true {image}", &[]), run_limit());
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("larger than the logged disk"), "{err}");
    assert!(err.contains("--allow-larger-base"), "{err}");
    let allowed = ["--allow-larger-base"];
    let out = output_within(
        &mut check_cmd(&l, &big, "true {image}", &allowed),
        run_limit(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("first {DISK_BYTES} bytes")));
    let img = dir.path().join("o.img");
    let replay = |extra: &[&str]| {
        let mut c = common::crashmonkey();
        c.arg("replay")
            .arg(&l)
            .arg("--base")
            .arg(&big)
            .arg("-o")
            .arg(&img);
        output_within(c.args(extra), run_limit())
    };
    let out = replay(&[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("larger than the logged disk"));
    let out = replay(&allowed);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), DISK_BYTES);
}

/// Item 14: a directory given as the base was reported as "4096 bytes, smaller than the logged
/// disk". It is called a directory.
#[test]
fn directory_as_base_is_called_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let l = log(dir.path());
    let out = output_within(
        &mut check_cmd(&l, dir.path(), "true {image}", &[]),
        run_limit(),
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is a directory"), "{err}");
    assert!(!err.contains("4096 bytes"), "{err}");
}
