//! Minimisation of failing race runs (`crashmonkey race minimise`, `race --out DIR
//! --minimise`): it guards against a minimiser that "shrinks" a run into one that no longer
//! fails, or fails another way (a different finding), or that differs from one call to the
//! next, or that writes over a user's files. The judge of "the same way" is not the
//! minimiser: it is the normal replay command, run on the minimised bundle, and the failure
//! signature of what it replays, compared with the original bundle's.

use crashmonkey::folder::signature::race_signature;
use crashmonkey::race::load_bundle;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn crashmonkey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/race/race-seed-9079")
}

fn minimise(bundle: &Path, out: &Path) -> Output {
    crashmonkey()
        .args(["race", "minimise"])
        .arg(bundle)
        .arg("-o")
        .arg(out)
        .arg("--json")
        .output()
        .unwrap()
}

/// The signature of the first failure of the bundle at `dir`.
fn signature_of(dir: &Path) -> String {
    let b = load_bundle(dir).unwrap();
    race_signature(
        &b.config,
        b.failures.first().expect("a failure"),
        &b.workload,
    )
}

/// `crashmonkey race --replay DIR --json`: its exit status and what it says.
fn replay(dir: &Path) -> (i32, serde_json::Value) {
    let out = crashmonkey()
        .args(["race", "--json", "--replay"])
        .arg(dir)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap();
    (out.status.code().unwrap(), v)
}

/// The committed fixture shrinks (fewer bytes, fewer preemptions, no more operations) and
/// the normal replay command replays the minimised bundle to the same failure signature.
#[test]
fn minimisation_shrinks_the_fixture_and_the_result_fails_the_same_way() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("min");
    let o = minimise(&fixture(), &out);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (before, after) = (&r["before"], &r["after"]);
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap();
    // The fixture as its report.txt lists it: fallocate 8192, pwrite 36, pwrite 6293, fsync.
    assert_eq!(n(before, "ops"), 4);
    assert_eq!(n(before, "bytes"), 8192 + 36 + 6293);
    assert!(n(after, "ops") <= n(before, "ops"));
    assert!(n(after, "bytes") < n(before, "bytes") / 2, "{r}");
    assert!(n(after, "preemptions") < n(before, "preemptions"), "{r}");
    let original = signature_of(&fixture());
    assert_eq!(r["signature"], original.as_str());
    let (code, v) = replay(&out);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["strict"], true);
    assert_eq!(v["same_failures_as_recorded"], true, "{v}");
    let b = load_bundle(&out).unwrap();
    let replayed: Vec<fs_core::Failure> = serde_json::from_value(v["failures"].clone()).unwrap();
    assert_eq!(
        race_signature(&b.config, &replayed[0], &b.workload),
        original
    );
    // Still the stale-mapping race: along the same interleaving, every step followed, the
    // fix (the default switches, iomap_valid on) keeps the data.
    let o = crashmonkey()
        .args(["race", "--json", "--defaults", "--replay"])
        .arg(&out)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(0), "{v}");
    assert_eq!(v["divergences"], 0, "{v}");
    // The minimised bundle is a whole bundle: its README replays it from where it is.
    let readme = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(readme.contains(&format!("crashmonkey race --replay {}", out.display())));
}

/// The same bundle minimises to the same bytes, twice.
#[test]
fn minimisation_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert_eq!(minimise(&fixture(), &a).status.code(), Some(0));
    assert_eq!(minimise(&fixture(), &b).status.code(), Some(0));
    for f in [
        "bundle.json",
        "minimise.json",
        "device-log.json",
        "device.log",
    ] {
        let x = std::fs::read(a.join(f)).unwrap();
        assert_eq!(x, std::fs::read(b.join(f)).unwrap(), "{f}");
    }
}

/// A bundle whose run passes is refused with a clear error, and nothing is written.
#[test]
fn a_run_that_does_not_fail_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Seed 1 under the fixed switches passes (the campaign's default finds nothing).
    let run = crashmonkey::race::run_one(1, &fs_core::Config::default());
    assert!(run.result.passed());
    let dir = crashmonkey::race::write_bundle(tmp.path(), &run).unwrap();
    let out = tmp.path().join("min");
    let o = minimise(&dir, &out);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not fail"), "{err}");
    assert!(!out.exists());
}

/// An output that exists, even an empty folder, is never replaced.
#[test]
fn an_existing_output_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    let o = minimise(&fixture(), &out);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("exists"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
    // Nothing left behind beside it either (the temporary folder is removed).
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
}

/// `race --out DIR --minimise`: each finding's smallest bundle keeps its original files and
/// gains `minimised/`, which replays to the finding's signature; `findings` reports it, and
/// a merge of the folder carries it.
#[test]
fn a_campaign_minimises_each_finding_beside_the_original() {
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    let args = ["race", "--seed", "1", "--runs", "1000", "--no-iomap-valid"];
    let o = crashmonkey()
        .args(args)
        .arg("--out")
        .arg(&camp)
        .arg("--minimise")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let findings = |dir: &Path| -> serde_json::Value {
        let o = crashmonkey()
            .args(["findings", "--json"])
            .arg(dir)
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let f = findings(&camp);
    let list = f["findings"].as_array().unwrap();
    assert!(!list.is_empty());
    for x in list {
        let m = &x["minimised"];
        let bundle = x["bundle"].as_str().unwrap();
        assert_eq!(m["bundle"], format!("{bundle}/minimised"));
        assert!(camp.join(bundle).join("bundle.json").is_file());
        let dir = camp.join(m["bundle"].as_str().unwrap());
        let (code, v) = replay(&dir);
        assert_eq!((code, &v["same_failures_as_recorded"]), (1, &true.into()));
        assert_eq!(signature_of(&dir), x["signature"].as_str().unwrap());
        assert!(m["after"]["ops"].as_u64() <= m["before"]["ops"].as_u64());
    }
    // `findings --json`: a finding's `minimised` object holds the page's keys, in order.
    let o = crashmonkey()
        .args(["findings", "--json"])
        .arg(&camp)
        .output()
        .unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(keys_at(&text, 8), doc_keys("keys:MinimisedRun"));
    let merged = tmp.path().join("merged");
    let o = crashmonkey()
        .args(["findings", "merge"])
        .arg(&merged)
        .arg(&camp)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(findings(&merged)["findings"], f["findings"]);
}

const DOC: &str = include_str!("../../docs/campaigns.md");

/// The first column of docs/campaigns.md's table after `<!-- marker -->`.
fn doc_keys(marker: &str) -> Vec<String> {
    let at = DOC.find(&format!("<!-- {marker} -->")).expect(marker);
    DOC[at..]
        .lines()
        .skip(3)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .nth(1)
                .unwrap()
                .trim()
                .trim_matches('`')
                .to_string()
        })
        .collect()
}

/// The keys of the pretty-printed JSON object lines at `indent` spaces, in their order.
fn keys_at(text: &str, indent: usize) -> Vec<String> {
    let pad = " ".repeat(indent);
    let mut out: Vec<String> = Vec::new();
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(&pad) else {
            continue;
        };
        if let Some(k) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
            if !out.iter().any(|x| x == k) {
                out.push(k.to_string());
            }
        }
    }
    out
}

/// docs/campaigns.md's minimisation tables are `minimise.json`'s keys, in order, and the
/// constants it names are the code's.
#[test]
fn the_page_describes_minimise_json() {
    use crashmonkey::race::minimise::{
        ALIGN_BYTES, MINIMISE_FILE, MINIMISE_ROUNDS_MAX, MINIMISE_RUNS_MAX, MINIMISE_STEPS_MAX,
        MINIMISE_VERSION,
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("min");
    assert_eq!(minimise(&fixture(), &out).status.code(), Some(0));
    let text = std::fs::read_to_string(out.join(MINIMISE_FILE)).unwrap();
    assert_eq!(keys_at(&text, 2), doc_keys("keys:minimise"));
    let before = &text[text.find("\"before\"").unwrap()..text.find("\"after\"").unwrap()];
    assert_eq!(keys_at(before, 4), doc_keys("keys:RunSize"));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["version"], MINIMISE_VERSION);
    let flat = DOC.split_whitespace().collect::<Vec<_>>().join(" ");
    for said in [
        format!("at most {MINIMISE_RUNS_MAX} candidate runs (`MINIMISE_RUNS_MAX`"),
        format!("(at most {MINIMISE_ROUNDS_MAX}, `MINIMISE_ROUNDS_MAX`)"),
        format!("{MINIMISE_STEPS_MAX} model steps over all of them (`MINIMISE_STEPS_MAX`"),
        format!("`{MINIMISE_VERSION}` (`MINIMISE_VERSION`)"),
        format!("{ALIGN_BYTES}-aligned values (`ALIGN_BYTES`"),
    ] {
        assert!(
            flat.contains(&said),
            "docs/campaigns.md does not say {said:?}"
        );
    }
}
