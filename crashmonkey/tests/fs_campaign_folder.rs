//! fs campaign folders (`crashmonkey fs campaign --out DIR`, issue 17): the folder changes no
//! result of the campaign; a campaign killed with SIGKILL and run again ends as if it had
//! never stopped; three shards run as three processes, merged, hold the unsharded campaign's
//! findings; the index rebuilt from the bundles and records answers byte for byte as the live
//! one; the report draws every fs finding; a folder of other files, or of another campaign,
//! is refused and left as it was.
//!
//! The campaigns plant `fsync-no-log-force` (fsync returns before the journal is on disk):
//! every run of an ace workload with an fsync, fdatasync or sync fails, so that 48 runs make
//! several findings in a few seconds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn cm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
}

/// Runs of every campaign here.
const RUNS: u64 = 48;

/// The campaign of these tests, with `extra` flags, into `dir` (records every 50 ms, so that
/// even a short campaign has several).
fn fs_campaign(dir: Option<&Path>, extra: &[&str]) -> Command {
    let mut c = cm();
    c.args(["fs", "campaign", "--seed", "1", "--json", "--jobs", "2"])
        .args(["--runs", &RUNS.to_string()])
        .args(["--bug", "fsync-no-log-force"])
        .args(extra);
    if let Some(d) = dir {
        c.args(["--record-seconds", "0.05"]).arg("--out").arg(d);
    }
    c
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: exit {:?}, stderr {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn findings(dir: &Path) -> Output {
    cm().args(["findings", "--json"]).arg(dir).output().unwrap()
}

/// An fs campaign's JSON without its timings and rates; the reproducer by folder name.
fn untimed(mut v: serde_json::Value) -> serde_json::Value {
    let o = v.as_object_mut().unwrap();
    for k in [
        "seconds",
        "states_per_second",
        "check_seconds",
        "check_states_per_second",
    ] {
        assert!(o.remove(k).is_some(), "no {k} in {o:?}");
    }
    let r = o["reproducer"].as_str().map(|p| {
        Path::new(p)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    });
    o.insert("reproducer".into(), r.into());
    v
}

/// The uninterrupted, unsharded campaign in a folder: its folder, JSON and findings' JSON.
fn clean() -> &'static (PathBuf, serde_json::Value, Vec<u8>) {
    static CLEAN: OnceLock<(PathBuf, serde_json::Value, Vec<u8>)> = OnceLock::new();
    CLEAN.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fs_campaign_folder_clean");
        let _ = std::fs::remove_dir_all(&dir);
        let out = fs_campaign(Some(&dir), &[]).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let f = findings(&dir);
        assert_eq!(
            f.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&f.stderr)
        );
        // A copy no test opens, to copy from (sled may write when a reader opens the index).
        let _ = std::fs::remove_dir_all(pristine());
        copy_tree(&dir, &pristine());
        (dir, untimed(json(&out)), f.stdout)
    })
}

/// Where [`clean`] keeps a copy of its folder that no test opens.
fn pristine() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("fs_campaign_folder_pristine")
}

/// The folder changes no result: the campaign without one (the runner's own summary, not
/// built from records) prints the same JSON, reproducer aside. Its findings partition the
/// failing runs: counts sum to them, every finding keeps its first and smallest bundle, and
/// there is more than one (the signature tells promises of fsync, fdatasync, sync apart).
#[test]
fn the_folder_changes_no_result_and_groups_every_failing_run() {
    let (dir, with, f) = clean();
    let mut plain = untimed(json(&fs_campaign(None, &["--no-bundle"]).output().unwrap()));
    plain["reproducer"] = with["reproducer"].clone();
    assert_eq!(*with, plain);
    let f: serde_json::Value = serde_json::from_slice(f).unwrap();
    let list = f["findings"].as_array().unwrap();
    assert!(list.len() > 1, "{f}");
    let failing = with["failures"].as_u64().unwrap();
    assert!(failing > 0 && failing <= RUNS);
    assert_eq!(f["runs"], RUNS);
    assert_eq!(f["failing_runs"], failing);
    let counted: u64 = list.iter().map(|x| x["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, failing);
    for x in list {
        assert!(x["signature"]
            .as_str()
            .unwrap()
            .starts_with("fs|crash_state|"));
        for b in [&x["bundle"], &x["first_bundle"]] {
            assert!(
                dir.join(b.as_str().unwrap()).join("crash.img").is_file(),
                "{x}"
            );
        }
    }
}

/// Waits until `dir` holds at least one run record; panics if `child` ends first.
fn wait_for_record(dir: &Path, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let records = || {
        std::fs::read_dir(dir.join("runs")).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "json")
            })
            .count()
        })
    };
    while records() == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the campaign ended before a record"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no record within a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A campaign killed with SIGKILL (or stopped by SIGINT, which exits 130) once it has
/// recorded some runs, then run again with the same command, prints the uninterrupted
/// campaign's JSON (timings aside) and holds its findings: no run repeated (the counts would
/// be higher) or lost (lower).
#[test]
fn a_killed_fs_campaign_rerun_ends_as_an_uninterrupted_one() {
    let (_, want, want_findings) = clean();
    let tmp = tempfile::tempdir().unwrap();
    for signal in ["KILL", "INT"] {
        let camp = tmp.path().join(signal);
        let mut child = fs_campaign(Some(&camp), &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_record(&camp, &mut child);
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(sent.success());
        let status = child.wait().unwrap();
        if signal == "INT" {
            assert_eq!(status.code(), Some(130));
        }
        let done = recorded_runs(&camp);
        assert!(done > 0 && done < RUNS, "{signal}: {done} runs recorded");
        let again = fs_campaign(Some(&camp), &[]).output().unwrap();
        assert_eq!(untimed(json(&again)), *want, "{signal}");
        assert_eq!(findings(&camp).stdout, *want_findings, "{signal}");
    }
}

/// The runs `dir`'s records hold, counted from the files: `findings` refuses a folder whose
/// last record a SIGKILL left unindexed (the rerun indexes it; campaign_folder.rs's
/// `an_index_behind_its_records_catches_up`).
fn recorded_runs(dir: &Path) -> u64 {
    std::fs::read_dir(dir.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| serde_json::from_slice::<serde_json::Value>(&std::fs::read(p).unwrap()).unwrap())
        .map(|r| r["runs"].as_u64().unwrap())
        .sum()
}

/// Three shards run at once as three processes, merged, hold the unsharded campaign's
/// findings byte for byte; each shard ran its share of the runs.
#[test]
fn three_fs_shards_merged_are_the_unsharded_campaign() {
    let (_, _, want) = clean();
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|k| tmp.path().join(format!("s{k}"))).collect();
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let shard = format!("{k}/3");
            fs_campaign(Some(d), &["--shard", &shard]).output_spawned()
        })
        .collect();
    for (k, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.code().unwrap() < 2,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(json(&out)["runs"], RUNS / 3, "shard {k}");
    }
    let merged = tmp.path().join("merged");
    let m = cm()
        .args(["findings", "merge", "--json"])
        .arg(&merged)
        .args(&dirs)
        .output()
        .unwrap();
    assert_eq!(
        m.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&m.stderr)
    );
    assert_eq!(findings(&merged).stdout, *want);
}

/// `.output()` of a command started now, to wait for later.
trait Spawned {
    fn output_spawned(&mut self) -> std::process::Child;
}

impl Spawned for Command {
    fn output_spawned(&mut self) -> std::process::Child {
        self.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// Copies the files of `from` (recursively) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &target);
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

/// `findings reindex` rebuilds the index from the bundles and records alone: the findings
/// read byte for byte as the live index's, with the old index gone entirely; and a bundle
/// that does not show its finding makes the rebuild fail rather than index it.
#[test]
fn reindex_from_the_bundles_equals_the_live_index() {
    let (_, _, want) = clean();
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    copy_tree(&pristine(), &camp);
    std::fs::remove_dir_all(camp.join("index")).unwrap();
    let r = cm()
        .args(["findings", "reindex", "--json"])
        .arg(&camp)
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(r.stdout, *want);
    assert_eq!(findings(&camp).stdout, *want);
    // A bundle whose verdict was changed (same seed, another violation) is caught by its
    // signature.
    let f: serde_json::Value = serde_json::from_slice(want).unwrap();
    let a = camp
        .join(f["findings"][0]["bundle"].as_str().unwrap())
        .join("bundle.json");
    let mut b: serde_json::Value = serde_json::from_slice(&std::fs::read(&a).unwrap()).unwrap();
    b["verdict"]["violations"][0]["what"] = "byte 7: found 0x00, allowed 'A' (op 0)".into();
    std::fs::write(&a, serde_json::to_string_pretty(&b).unwrap()).unwrap();
    let r = cm()
        .args(["findings", "reindex"])
        .arg(&camp)
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("not finding"),
        "{r:?}"
    );
}

/// `crashmonkey report DIR` of an fs campaign folder draws every finding: its signature, its
/// fs replay command, and its crash state on the write log (an SVG with kept and dropped
/// writes and fs-core roles).
#[test]
fn the_report_draws_every_fs_finding() {
    let (dir, _, f) = clean();
    let tmp = tempfile::tempdir().unwrap();
    let html = tmp.path().join("r.html");
    let r = cm()
        .arg("report")
        .arg(dir)
        .arg("-o")
        .arg(&html)
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    let f: serde_json::Value = serde_json::from_slice(f).unwrap();
    let list = f["findings"].as_array().unwrap();
    assert!(page.contains("An fs crash campaign"));
    assert_eq!(
        page.matches("<section class=\"finding\"").count(),
        list.len()
    );
    assert_eq!(
        page.matches("The crash state on the write log").count(),
        list.len()
    );
    assert!(page.matches("<svg").count() >= list.len());
    assert!(page.contains(">role (fs-core)</text>"));
    for x in list {
        let sig = x["signature"].as_str().unwrap().replace('<', "&lt;");
        assert!(page.contains(&sig), "{sig}");
        let replay = format!(
            "crashmonkey fs campaign --replay {}",
            dir.join(x["bundle"].as_str().unwrap()).display()
        );
        assert!(page.contains(&replay), "{replay}");
    }
}

/// A folder of other files is refused and left as it was; so is a race campaign's folder, and
/// this campaign's folder given other parameters (the difference said).
#[test]
fn other_folders_are_refused_and_left_as_they_were() {
    let tmp = tempfile::tempdir().unwrap();
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "mine").unwrap();
    let r = fs_campaign(Some(&mine), &[]).output().unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not a campaign folder"));
    let left: Vec<_> = std::fs::read_dir(&mine)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
    let race = tmp.path().join("race");
    let made = cm()
        .args(["race", "--seed", "1", "--runs", "10", "--out"])
        .arg(&race)
        .output()
        .unwrap();
    assert_eq!(
        made.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let r = fs_campaign(Some(&race), &[]).output().unwrap();
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("a race campaign") && err.contains("an fs campaign"),
        "{err}"
    );
    clean();
    let camp = tmp.path().join("camp");
    copy_tree(&pristine(), &camp);
    let r = fs_campaign(Some(&camp), &["--max-subset", "1"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("holds another campaign") && err.contains("states max_subset"),
        "{err}"
    );
}
