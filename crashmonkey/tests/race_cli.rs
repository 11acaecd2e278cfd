//! The `crashmonkey race` command line: exit codes, JSON fields, the reproducer folder and
//! replay from it.

use std::process::Command;

/// Record by record, the write log holds what the model's device record says reached the
/// device: the kind, the byte range, FUA, and the payload (by its content hash and first byte).
fn same_io(log: &std::path::Path, model: &[serde_json::Value]) {
    use nbd_server::log::{LogReader, RecordKind};
    let mut reader = LogReader::open(log).expect("device.log");
    let records: Vec<_> = reader
        .by_ref()
        .map(Result::unwrap)
        .filter(|r| {
            matches!(
                r.kind,
                RecordKind::Write | RecordKind::Flush | RecordKind::Trim
            )
        })
        .collect();
    assert_eq!(records.len(), model.len());
    for (i, (r, m)) in records.iter().zip(model).enumerate() {
        let kind = m["kind"].as_str().unwrap();
        let want = match kind {
            "Write" | "FuaWrite" => RecordKind::Write,
            "Flush" => RecordKind::Flush,
            "Trim" => RecordKind::Trim,
            k => panic!("record {i}: unknown kind {k}"),
        };
        assert_eq!(r.kind, want, "record {i}: {m}");
        assert_eq!(r.header.fua(), kind == "FuaWrite", "record {i}: {m}");
        if want == RecordKind::Flush {
            continue;
        }
        let block = fs_core::block::BLOCK_SIZE as u64;
        assert_eq!(
            r.header.offset,
            m["block"].as_u64().unwrap() * block,
            "record {i}"
        );
        assert_eq!(
            r.header.length,
            m["count"].as_u64().unwrap() * block,
            "record {i}"
        );
        if want == RecordKind::Write {
            let payload = reader.read_payload(r).unwrap();
            assert_eq!(
                fs_core::block::content_hash(&payload),
                m["hash"].as_u64().unwrap(),
                "record {i}: payload differs from the model's"
            );
            assert_eq!(u64::from(payload[0]), m["first_byte"].as_u64().unwrap());
        }
    }
}

fn cm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
}

#[test]
fn campaign_with_fix_off_exits_1_writes_bundle_and_replays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = cm()
        .args([
            "race",
            "--seed",
            "9079",
            "--runs",
            "1",
            "--no-iomap-valid",
            "--json",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["runs"], 1);
    assert_eq!(v["failures"], 1);
    assert_eq!(v["first_failure_seed"], 9079);
    assert!(v["seconds"].as_f64().is_some());
    let bundle = dir.path().join("race-seed-9079");
    for f in [
        "bundle.json",
        "workload.json",
        "schedule.json",
        "device-log.json",
        "README.md",
        "report.txt",
    ] {
        assert!(bundle.join(f).is_file(), "missing {f}");
    }
    let readme = std::fs::read_to_string(bundle.join("README.md")).expect("readme");
    assert!(readme.contains("crashmonkey race --replay"));

    // The bundle's nbd-server write log holds the same IO as the model's own record, with
    // payloads, and the crash-state tools read it.
    let model_log: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("device-log.json")).unwrap())
            .expect("device-log.json");
    let stats = cm()
        .args(["log", "stats", "--json"])
        .arg(bundle.join("device.log"))
        .output()
        .expect("log stats");
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).expect("stats json");
    let recorded = ["write", "flush", "trim"]
        .iter()
        .map(|k| stats["kinds"][k].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert_eq!(recorded, model_log.len() as u64, "{stats}");
    assert!(!model_log.is_empty());
    same_io(&bundle.join("device.log"), &model_log);

    let replay = cm()
        .args(["race", "--replay"])
        .arg(&bundle)
        .output()
        .expect("replay");
    assert_eq!(replay.status.code(), Some(1));
    let text = String::from_utf8_lossy(&replay.stdout);
    assert!(text.contains("the same verdict as recorded"), "{text}");
    assert!(text.contains("offset 7839"), "{text}");

    let fixed = cm()
        .args(["race", "--defaults", "--replay"])
        .arg(&bundle)
        .output()
        .expect("replay");
    assert_eq!(
        fixed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fixed.stdout)
    );
}

#[test]
fn campaign_with_defaults_exits_0() {
    let out = cm()
        .args([
            "race",
            "--seed",
            "1",
            "--runs",
            "300",
            "--json",
            "--no-bundle",
        ])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["failures"], 0);
    assert!(v["first_failure_seed"].is_null());
}

#[test]
fn bad_replay_path_is_a_clear_error_with_exit_2() {
    let out = cm()
        .args(["race", "--replay", "/nonexistent/bundle"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/bundle"));
}

/// A hand-edited bundle whose workload cannot run (a file count that would make the model
/// allocate tables for 2^40 files, no files, too many operations) is refused before it runs:
/// exit 2 and a message that says what is wrong. Before the check, 2^40 files aborted the
/// process on a failed allocation.
#[test]
fn bundle_with_an_impossible_workload_is_refused_with_exit_2() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/race/race-seed-9079/bundle.json");
    let text = std::fs::read_to_string(&fixture).expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit, &str); 3] = [
        (
            "2^40 files",
            |j| j["workload"]["files"] = (1u64 << 40).into(),
            "files",
        ),
        ("no files", |j| j["workload"]["files"] = 0.into(), "files"),
        (
            "10001 operations",
            |j| {
                let op = j["workload"]["phases"][0][1].clone();
                j["workload"]["phases"] = serde_json::json!([vec![op; 10_001]]);
            },
            "operations",
        ),
    ];
    for (what, edit, says) in edits {
        let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
        edit(&mut j);
        let path = dir.path().join("bundle.json");
        std::fs::write(&path, j.to_string()).unwrap();
        let out = cm().args(["race", "--replay"]).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(
            err.contains(says) && !err.contains("panicked"),
            "{what}: {err}"
        );
    }
}

/// A folio switch of both campaigns (`switch`): with it the race campaign finds no failure in
/// 1,500 runs with the fix on, and with `->iomap_valid` off fails at `seed`; the bundle keeps
/// the switch (`kept`, in bundle.json), so its replay with `--defaults` passes on the same
/// machine geometry; an fs campaign runs clean with `fs_switch`; `bad` is refused as a size
/// the model cannot run. Returns what the replay printed.
fn folio_switch_finds_the_race_only_without_the_fix(
    switch: &[&str],
    seed: u64,
    kept: &str,
    fs_switch: &[&str],
    bad: &[&str],
) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let clean = cm()
        .arg("race")
        .args(switch)
        .args(["--json", "--no-bundle", "--seed", "1", "--runs", "1500"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&clean.stderr);
    assert_eq!(clean.status.code(), Some(0), "{err}");
    let off = cm()
        .arg("race")
        .args(switch)
        .args(["--no-iomap-valid", "--seed", &seed.to_string()])
        .args(["--runs", "1", "--out"])
        .arg(dir.path())
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&off.stdout);
    assert_eq!(off.status.code(), Some(1), "{text}");
    let bundle = dir.path().join(format!("race-seed-{seed}"));
    let cfg = std::fs::read_to_string(bundle.join("bundle.json")).expect("bundle");
    assert!(cfg.contains(kept), "{cfg}");
    let fixed = cm()
        .args(["race", "--defaults", "--replay"])
        .arg(&bundle)
        .output()
        .expect("replay");
    let replayed = String::from_utf8_lossy(&fixed.stdout).into_owned();
    assert_eq!(fixed.status.code(), Some(0), "{replayed}");
    let fs = cm()
        .args(["fs", "campaign"])
        .args(fs_switch)
        .args(["--runs", "40", "--workload", "random", "--json"])
        .output()
        .expect("fs campaign");
    let err = String::from_utf8_lossy(&fs.stderr);
    assert_eq!(fs.status.code(), Some(0), "{err}");
    let refused = cm()
        .arg("race")
        .args(bad)
        .args(["--runs", "1"])
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("power of two"));
    replayed
}

/// Large folios are a switch of both campaigns (`--folio-blocks`): with 16 KiB folios the
/// race campaign finds the stale-mapping race with the fix off (seed 1112) and none with it
/// on; the bundle keeps the folio size and replays clean with `--defaults`.
#[test]
fn large_folio_campaigns_find_the_race_only_without_the_fix() {
    let text = folio_switch_finds_the_race_only_without_the_fix(
        &["--folio-blocks", "4"],
        1112,
        "\"folio_blocks\": 4",
        &["--folio-blocks", "4"],
        &["--folio-blocks", "3"],
    );
    assert!(text.contains("folios of 4 blocks"), "{text}");
}

/// Write-sized folios are a switch of both campaigns (`--max-folio-blocks`): the first
/// failing seed without `->iomap_valid` is 89 (`crashmonkey race --max-folio-blocks 4
/// --no-iomap-valid --seed 1 --runs 3000`); none fails with the fix on.
#[test]
fn write_sized_folio_campaigns_find_the_race_only_without_the_fix() {
    let text = folio_switch_finds_the_race_only_without_the_fix(
        &["--max-folio-blocks", "4"],
        89,
        "\"max_folio_blocks\": 4",
        &["--max-folio-blocks", "8"],
        &["--max-folio-blocks", "24"],
    );
    assert!(text.contains("write-sized folios up to 4 blocks"), "{text}");
}

/// `--direct-writes` races O_DIRECT writes: with the kernel's order (the page cache dropped
/// after `->end_io`) no run fails; with `--dio-invalidate before-end-io` the first failing
/// seed (2665, `crashmonkey race --seed 1 --runs 20000 --direct-writes --dio-invalidate
/// before-end-io`) leaves zeros cached where the write put its bytes, its bundle replays, and
/// `--defaults` passes it. The fs campaign races them through crash states; gfs2 and the ace
/// workloads are refused.
#[test]
fn direct_write_campaigns_find_the_invalidation_race_only_out_of_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let race = |extra: &[&str]| cm().arg("race").args(extra).output().expect("run");
    let clean = race(&["--direct-writes", "--seed", "2000", "--runs", "1500"]);
    let text = String::from_utf8_lossy(&clean.stdout);
    assert_eq!(clean.status.code(), Some(0), "{text}");
    assert!(text.contains("direct writes raced"), "{text}");
    let out = dir.path().to_str().expect("utf-8");
    let late = [
        "--dio-invalidate",
        "before-end-io",
        "--runs",
        "1",
        "--out",
        out,
    ];
    let off = race(&[&["--direct-writes", "--seed", "2665"], &late[..]].concat());
    let text = String::from_utf8_lossy(&off.stdout);
    assert_eq!(off.status.code(), Some(1), "{text}");
    assert!(
        text.contains("held in the page cache once nothing ran"),
        "{text}"
    );
    let bundle = dir.path().join("race-seed-2665");
    let cfg = std::fs::read_to_string(bundle.join("bundle.json")).expect("bundle");
    assert!(
        cfg.contains("\"dio_invalidate\": \"before-end-io\""),
        "{cfg}"
    );
    assert!(cfg.contains("\"op\": \"direct_write\""), "{cfg}");
    let again = cm()
        .args(["race", "--replay"])
        .arg(&bundle)
        .output()
        .expect("replay");
    assert_eq!(again.status.code(), Some(1));
    let fixed = cm()
        .args(["race", "--defaults", "--replay"])
        .arg(&bundle)
        .output()
        .expect("replay");
    assert_eq!(
        fixed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&fixed.stdout)
    );
    let fs = cm()
        .args([
            "fs",
            "campaign",
            "--direct-writes",
            "--workload",
            "random",
            "--runs",
            "60",
        ])
        .output()
        .expect("fs campaign");
    let text = String::from_utf8_lossy(&fs.stdout);
    assert_eq!(fs.status.code(), Some(0), "{text}");
    assert!(text.contains("direct writes raced"), "{text}");
    let gfs2 = race(&["--fs", "gfs2", "--direct-writes", "--runs", "1"]);
    assert_eq!(gfs2.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&gfs2.stderr).contains("gfs2"));
    let ace = cm()
        .args(["fs", "campaign", "--direct-writes", "--runs", "1"])
        .output()
        .expect("fs campaign");
    assert_eq!(ace.status.code(), Some(2));
}
