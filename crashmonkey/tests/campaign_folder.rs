//! Campaign folders (`crashmonkey race --out DIR`, `crashmonkey findings`): many failing
//! seeds collapse into few findings with the right counts; the index rebuilt from the files
//! answers byte for byte the same; three shards' folders merged are the unsharded folder; a
//! campaign killed with SIGKILL (or stopped by SIGINT) and run again ends as if it had never
//! stopped; damage is a clear error, and reindex repairs a damaged index.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

fn cm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
}

/// Switches that make several kinds of failure within a few thousand runs from seed 1.
const BROKEN: [&str; 3] = ["--no-iomap-valid", "--no-wb-seq-check", "--old-punch"];

/// A campaign that records every 50 ms of running, so that a short one has several records.
fn race(dir: &Path, runs: u64, extra: &[&str]) -> Command {
    let mut c = cm();
    c.args(["race", "--seed", "1", "--runs", &runs.to_string(), "--json"])
        .args(["--record-seconds", "0.05"])
        .args(BROKEN)
        .args(extra)
        .arg("--out")
        .arg(dir);
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

/// A race JSON without its timings; the reproducer by folder name (campaign folders differ).
fn untimed(mut v: serde_json::Value) -> serde_json::Value {
    let o = v.as_object_mut().unwrap();
    o.remove("seconds");
    o.remove("runs_per_second");
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

/// The failure signature of one seed, computed here from that seed's own one-run JSON (a
/// second implementation of the grouping: kind, where the wrong byte was seen, whether
/// another operation's old data came back, and the kind of operation whose data was lost).
fn own_signature(seed: u64) -> String {
    let out = cm()
        .args(["race", "--seed", &seed.to_string(), "--runs", "1", "--json"])
        .args(BROKEN)
        .arg("--no-bundle")
        .output()
        .unwrap();
    let v = json(&out);
    let f = &v["first_failure"]["failures"][0];
    let summary = v["first_failure"]["summary"].as_str().unwrap();
    let seen = if f["seen"] == "after_sync" {
        "after_sync"
    } else {
        "read"
    };
    let found = if f["found_from"].is_null() {
        "unwritten"
    } else {
        "old_data"
    };
    // "... written by op3 mmap_store(f0, ...)": the kind is the word after the op number.
    let lost = summary
        .split("written by op")
        .nth(1)
        .and_then(|s| s.split_once(' '))
        .map(|(_, rest)| rest.split('(').next().unwrap().to_string())
        .unwrap_or_else(|| "none".into());
    // Reports say pwrite and pread where the workload says write and read.
    let lost = match lost.as_str() {
        "pwrite" => "write".to_string(),
        "pread" => "read".to_string(),
        _ => lost,
    };
    assert_eq!(f["kind"], "wrong_data", "seed {seed}: {v}");
    format!("seen={seen},found={found}|{lost}")
}

/// Many failing seeds, fewer findings: every failing seed of the campaign is in exactly one
/// finding, the one its own failure says, and the counts add up.
#[test]
fn failing_seeds_collapse_into_findings_with_counts() {
    let dir = tempfile::tempdir().unwrap();
    let camp = dir.path().join("camp");
    let out = race(&camp, 3000, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let r = json(&out);
    let failing: BTreeSet<u64> = r["failing_seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect();
    assert_eq!(failing.len() as u64, r["failures"].as_u64().unwrap());
    let f = findings(&camp);
    assert_eq!(f.status.code(), Some(1));
    let f = json(&f);
    let list = f["findings"].as_array().unwrap();
    assert!(list.len() >= 2, "several findings: {f}");
    assert!(
        list.len() < failing.len(),
        "fewer findings than failing runs: {f}"
    );
    assert_eq!(f["runs"], 3000);
    assert_eq!(f["failing_runs"], r["failures"]);
    let mut grouped: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for x in list {
        let seeds: BTreeSet<u64> = x["seeds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap())
            .collect();
        assert_eq!(seeds.len() as u64, x["count"].as_u64().unwrap(), "{x}");
        assert_eq!(x["first_seed"].as_u64(), seeds.first().copied());
        assert!(seeds.contains(&x["smallest_seed"].as_u64().unwrap()));
        for b in ["bundle", "first_bundle"] {
            assert!(camp
                .join(x[b].as_str().unwrap())
                .join("bundle.json")
                .is_file());
        }
        let key = format!(
            "{}|{}",
            x["violation"].as_str().unwrap(),
            x["lost_by"].as_str().unwrap()
        );
        assert!(
            grouped.insert(key, seeds).is_none(),
            "two findings of one signature"
        );
    }
    let mut all = BTreeSet::new();
    for (key, seeds) in &grouped {
        for &s in seeds {
            assert_eq!(&own_signature(s), key, "seed {s}");
            assert!(all.insert(s), "seed {s} in two findings");
        }
    }
    assert_eq!(all, failing);
    // One bundle per finding's first and smallest run: no more folders than that.
    let bundles = std::fs::read_dir(&camp)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("race-seed-")
        })
        .count();
    assert!(
        bundles <= 2 * list.len(),
        "{bundles} bundles for {} findings",
        list.len()
    );
}

/// `findings reindex` rebuilds the index from the run records and bundles alone and answers
/// byte for byte what the live index answered, also after the index was damaged or removed.
#[test]
fn reindex_answers_what_the_live_index_answered() {
    let dir = tempfile::tempdir().unwrap();
    let camp = dir.path().join("camp");
    assert_eq!(
        race(&camp, 2000, &[]).output().unwrap().status.code(),
        Some(1)
    );
    let live = findings(&camp);
    assert_eq!(live.status.code(), Some(1));
    let re = cm()
        .args(["findings", "reindex", "--json"])
        .arg(&camp)
        .output()
        .unwrap();
    assert_eq!(re.stdout, live.stdout);
    assert_eq!(findings(&camp).stdout, live.stdout);
    // Damage: every byte of sled's data file overwritten.
    let db = camp.join("index").join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0xffu8; len]).unwrap();
    let bad = findings(&camp);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("crashmonkey findings reindex"), "{err}");
    let re = cm()
        .args(["findings", "reindex", "--json"])
        .arg(&camp)
        .output()
        .unwrap();
    assert_eq!(
        re.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&re.stderr)
    );
    assert_eq!(re.stdout, live.stdout);
    // No index at all.
    std::fs::remove_dir_all(camp.join("index")).unwrap();
    assert_eq!(findings(&camp).status.code(), Some(2));
    let re = cm()
        .args(["findings", "reindex", "--json"])
        .arg(&camp)
        .output()
        .unwrap();
    assert_eq!(re.stdout, live.stdout);
    let left: Vec<_> = std::fs::read_dir(&camp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n.starts_with("index."))
        .collect();
    assert!(left.is_empty(), "reindex left {left:?}");
}

/// Three shards, each its own folder, merged: the unsharded campaign's findings, byte for
/// byte. A folder given twice counts once; a merge into a folder that holds files is refused.
#[test]
fn three_shards_merged_are_the_unsharded_campaign() {
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    assert_eq!(
        race(&whole, 3000, &[]).output().unwrap().status.code(),
        Some(1)
    );
    let shards: Vec<_> = (0..3).map(|k| dir.path().join(format!("s{k}"))).collect();
    let children: Vec<_> = shards
        .iter()
        .enumerate()
        .map(|(k, d)| {
            race(d, 3000, &["--shard", &format!("{k}/3")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        c.wait().unwrap();
    }
    let merged = dir.path().join("merged");
    let m = cm()
        .args(["findings", "merge", "--json"])
        .arg(&merged)
        .args(&shards)
        .arg(&shards[1])
        .output()
        .unwrap();
    assert_eq!(
        m.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&m.stderr)
    );
    let want = findings(&whole).stdout;
    assert_eq!(
        String::from_utf8_lossy(&m.stdout),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(findings(&merged).stdout, want);
    let again = cm()
        .args(["findings", "merge"])
        .arg(&merged)
        .arg(&shards[0])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    assert_eq!(
        findings(&merged).stdout,
        want,
        "a refused merge changes nothing"
    );
}

/// Waits until `dir` holds at least one run record.
fn wait_for_record(dir: &Path, child: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let n = std::fs::read_dir(dir.join("runs")).map_or(0, |d| {
            d.filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".json")
            })
            .count()
        });
        if n > 0 {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the campaign ended before a record"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no record within a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A campaign killed with SIGKILL after some runs are recorded, then run again with the same
/// command, prints the uninterrupted campaign's JSON (timings aside) and holds its findings;
/// the same with SIGINT, which exits 130. Another command against the folder is refused.
#[test]
fn killed_campaign_rerun_ends_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let runs = 12000;
    let clean = dir.path().join("clean");
    let want = untimed(json(&race(&clean, runs, &[]).output().unwrap()));
    for signal in ["KILL", "INT"] {
        let camp = dir.path().join(format!("camp-{signal}"));
        let mut child = race(&camp, runs, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        wait_for_record(&camp, &mut child);
        // While it runs, findings reads the records the campaign has written.
        let live = findings(&camp);
        assert!(
            live.status.code().unwrap() < 2,
            "{}",
            String::from_utf8_lossy(&live.stderr)
        );
        assert!(json(&live)["runs"].as_u64().unwrap() > 0);
        let kill = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        if signal == "INT" {
            assert_eq!(status.code(), Some(130));
        }
        let part = findings(&camp);
        assert!(
            part.status.code().unwrap() < 2,
            "{}",
            String::from_utf8_lossy(&part.stderr)
        );
        let done = json(&part)["runs"].as_u64().unwrap();
        assert!(
            done > 0 && done < runs,
            "{signal}: {done} runs recorded before the signal"
        );
        let again = race(&camp, runs, &[]).output().unwrap();
        assert_eq!(untimed(json(&again)), want, "{signal}");
        assert_eq!(findings(&camp).stdout, findings(&clean).stdout, "{signal}");
    }
    let other = race(&clean, runs, &["--max-failures", "3"])
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(2));
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(
        err.contains("holds another campaign") && err.contains("max_failures"),
        "{err}"
    );
}

/// A campaign in a folder prints what the same campaign without one prints (the reproducer's
/// folder aside), stopping early with --max-failures included: the summary built from the
/// records is the runner's.
#[test]
fn a_folder_changes_no_result() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        &[][..],
        &["--max-failures", "5"][..],
        &["--shard", "1/2"][..],
    ];
    for (n, extra) in cases.into_iter().enumerate() {
        let camp = dir.path().join(format!("camp{n}"));
        let with = untimed(json(&race(&camp, 3000, extra).output().unwrap()));
        let plain = cm()
            .args([
                "race",
                "--seed",
                "1",
                "--runs",
                "3000",
                "--json",
                "--no-bundle",
            ])
            .args(BROKEN)
            .args(extra)
            .output()
            .unwrap();
        let mut plain = untimed(json(&plain));
        plain["reproducer"] = with["reproducer"].clone();
        assert!(!with["reproducer"].is_null());
        assert_eq!(with, plain, "{extra:?}");
    }
}

/// A damaged bundle or run record is named in a clear error with exit status 2, by
/// `findings`, `findings reindex` and a resumed campaign alike.
#[test]
fn a_damaged_bundle_or_record_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let camp = dir.path().join("camp");
    assert_eq!(
        race(&camp, 1000, &[]).output().unwrap().status.code(),
        Some(1)
    );
    let f = json(&findings(&camp));
    let bundle = camp
        .join(f["findings"][0]["bundle"].as_str().unwrap())
        .join("bundle.json");
    let kept = std::fs::read(&bundle).unwrap();
    std::fs::write(&bundle, b"{ not json").unwrap();
    for args in [vec!["findings"], vec!["findings", "reindex"]] {
        let out = cm().args(&args).arg(&camp).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&bundle.display().to_string()),
            "{args:?}: {err}"
        );
    }
    std::fs::write(&bundle, kept).unwrap();
    let params = camp.join("campaign.json");
    let kept = std::fs::read(&params).unwrap();
    std::fs::write(&params, b"{").unwrap();
    let out = race(&camp, 1000, &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&params.display().to_string()));
    std::fs::write(&params, kept).unwrap();
    let record = std::fs::read_dir(camp.join("runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&record, b"[]").unwrap();
    let outs = [
        cm().args(["findings", "reindex"])
            .arg(&camp)
            .output()
            .unwrap(),
        race(&camp, 1000, &[]).output().unwrap(),
    ];
    for out in outs {
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&record.display().to_string()), "{err}");
    }
}

/// A campaign stopped between writing a record and indexing it leaves an index behind its
/// records. Simulated with an index saved part-way and put back after the campaign ended:
/// `findings` indexes the records it lacks and answers as the uninterrupted campaign's
/// folder does, and so does the campaign run again. An index that names a record the folder
/// does not hold is still refused, saying how to repair it.
#[test]
fn an_index_behind_its_records_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let runs = 12000;
    let clean = dir.path().join("clean");
    let want = untimed(json(&race(&clean, runs, &[]).output().unwrap()));
    let camp = dir.path().join("camp");
    let mut child = race(&camp, runs, &[])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_record(&camp, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    let saved = dir.path().join("saved-index");
    copy_tree(&camp.join("index"), &saved);
    let done = untimed(json(&race(&camp, runs, &[]).output().unwrap()));
    assert_eq!(done, want);
    std::fs::remove_dir_all(camp.join("index")).unwrap();
    copy_tree(&saved, &camp.join("index"));
    let behind = findings(&camp);
    assert_eq!(behind.status.code(), findings(&clean).status.code());
    assert_eq!(behind.stdout, findings(&clean).stdout);
    std::fs::remove_dir_all(camp.join("index")).unwrap();
    copy_tree(&saved, &camp.join("index"));
    let again = untimed(json(&race(&camp, runs, &[]).output().unwrap()));
    assert_eq!(again, want);
    assert_eq!(findings(&camp).stdout, findings(&clean).stdout);
    // The saved index names a record; with that record's file gone it is damage.
    let record = std::fs::read_dir(camp.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    std::fs::remove_file(&record).unwrap();
    let missing = findings(&camp);
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("have no file") && err.contains("reindex"),
        "{err}"
    );
}

/// A campaign stopped after writing a bundle and before the record that names it (or after
/// a smaller run superseded a bundle and before removing it) leaves a bundle folder no
/// finding names. `findings` answers as before and says it is there; the campaign run again
/// removes it and ends as the uninterrupted campaign.
#[test]
fn a_bundle_no_finding_names_is_noted_then_removed() {
    let dir = tempfile::tempdir().unwrap();
    let camp = dir.path().join("camp");
    let runs = 3000;
    let want = untimed(json(&race(&camp, runs, &[]).output().unwrap()));
    let before = findings(&camp);
    let first = want["failing_seeds"][0]
        .as_u64()
        .expect("the campaign fails");
    let orphan = camp.join("race-seed-999999999");
    copy_tree(&camp.join(format!("race-seed-{first}")), &orphan);
    let noted = findings(&camp);
    assert_eq!(noted.stdout, before.stdout);
    assert_eq!(noted.status.code(), before.status.code());
    let err = String::from_utf8_lossy(&noted.stderr);
    assert!(
        err.contains("1 bundle folder(s) no finding names") && err.contains("race-seed-999999999"),
        "{err}"
    );
    let again = untimed(json(&race(&camp, runs, &[]).output().unwrap()));
    assert_eq!(again, want);
    assert!(!orphan.exists(), "the rerun removes the orphan bundle");
    assert!(findings(&camp).stderr.is_empty());
}

/// Copies a folder of files and folders of files (sled's index is two levels deep).
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

/// While another process holds a folder's index (here this test, as a running campaign
/// would), a campaign on the folder is refused, and `findings` answers from the run records
/// alone, byte for byte what the index answers.
#[test]
fn a_busy_folder_refuses_campaigns_and_findings_reads_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let camp = dir.path().join("camp");
    assert_eq!(
        race(&camp, 2000, &[]).output().unwrap().status.code(),
        Some(1)
    );
    let from_index = findings(&camp);
    assert_eq!(from_index.status.code(), Some(1));
    let held = sled::open(camp.join("index")).unwrap();
    let second = race(&camp, 2000, &[]).output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains("in use by another crashmonkey process"),
        "{err}"
    );
    let from_records = findings(&camp);
    assert_eq!(from_records.status.code(), Some(1));
    assert_eq!(from_records.stdout, from_index.stdout);
    drop(held);
    assert_eq!(findings(&camp).stdout, from_index.stdout);
}
