//! `crashmonkey findings merge OUT DIR...` of a kernel campaign's shards: the merged folder
//! is the one the unsharded campaign writes (the same done records, index lines, bundles per
//! signature and `more.txt` lists, and the same `findings --json` but for what differs
//! between any two runs: the kernel's and fsck's words), and running the campaign's command
//! on it resumes it with nothing left to do. Folders of another campaign, or an `OUT` that
//! holds anything, are refused and left alone.
//!
//! The campaign part needs what `crashmonkey kernel` needs (root, /dev/fuse, loop devices,
//! nbdfuse, mkfs.ext4): elsewhere the skip policy decides (never under CI).

mod common;

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CM: &str = env!("CARGO_BIN_EXE_crashmonkey");

/// What the campaigns here need besides root, /dev/fuse and a loop device.
const MERGE_TOOLS: [&str; 6] = [
    "nbdfuse",
    "losetup",
    "xfs_io",
    "setfattr",
    "mkfs.ext4",
    "e2fsck",
];

/// Whether this machine can run these tests; otherwise the skip policy decides.
fn can_run() -> bool {
    common::kernel_unready(&MERGE_TOOLS).is_none_or(|why| skip::skip(&why))
}

/// `crashmonkey kernel` of the lying-disk campaign on the first 12 ACE workloads into `out`
/// (their findings share signatures across the two shards: each shard's bundle of one, and
/// the `more.txt` lists, are what the merge must get right).
fn campaign(tmp: &Path, out: &Path, shard: Option<&str>) -> Output {
    let mut c = Command::new(CM);
    c.args(["kernel", "--fs", "ext4", "--lying-disk", "--limit", "12"])
        .args(["--workload", "ace", "--out"])
        .arg(out)
        .env("TMPDIR", tmp);
    if let Some(s) = shard {
        c.args(["--shard", s]);
    }
    let o = c.output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "the lying disk must give findings: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn findings(dir: &Path) -> serde_json::Value {
    let o = Command::new(CM)
        .args(["findings", "--json"])
        .arg(dir)
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&o.stderr));
    })
}

/// What any two runs of one campaign share in `findings --json`: all but the reports'
/// words (the kernel's and fsck's, with device names and times).
fn comparable(mut v: serde_json::Value) -> serde_json::Value {
    for f in v["findings"].as_array_mut().unwrap() {
        f.as_object_mut().unwrap().remove("report");
    }
    v
}

/// The folder's lasting content: done record names, index lines, and each bundle's file
/// names with its `more.txt`.
fn layout(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir.join("done")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        out.insert(format!("done/{name}"), String::new());
    }
    let index = std::fs::read_to_string(dir.join("findings.jsonl")).unwrap();
    out.insert("findings.jsonl".into(), index);
    for e in std::fs::read_dir(dir.join("findings")).unwrap() {
        let b = e.unwrap().path();
        let mut files: Vec<String> = std::fs::read_dir(&b)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let more = std::fs::read_to_string(b.join("more.txt")).unwrap_or_default();
        let name = b.file_name().unwrap().to_string_lossy().into_owned();
        out.insert(format!("findings/{name}"), format!("{files:?}\n{more}"));
    }
    out
}

#[test]
fn merged_shards_are_the_unsharded_campaign() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let whole = tmp.path().join("whole");
    campaign(tmp.path(), &whole, None);
    let shards: Vec<PathBuf> = (0..2).map(|k| tmp.path().join(format!("s{k}"))).collect();
    for (k, s) in shards.iter().enumerate() {
        campaign(tmp.path(), s, Some(&format!("{k}/2")));
    }
    let merged = tmp.path().join("merged");
    // Given in the other order: the result must not depend on it.
    let o = Command::new(CM)
        .args(["findings", "merge", "--json"])
        .arg(&merged)
        .args([&shards[1], &shards[0]])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let want = comparable(findings(&whole));
    assert!(want["findings"].as_array().unwrap().len() > 1, "{want}");
    let more = std::fs::read_dir(whole.join("findings"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("more.txt").exists())
        .count();
    assert!(more > 1, "too few repeated signatures to prove the merge");
    assert_eq!(comparable(findings(&merged)), want);
    assert_eq!(layout(&merged), layout(&whole));
    // The merged folder is the campaign's: its command resumes it with nothing to run.
    campaign(tmp.path(), &merged, None);
    assert_eq!(
        layout(&merged),
        layout(&whole),
        "the resumed campaign ran again"
    );
    assert_eq!(comparable(findings(&merged)), want);
}

/// A kernel campaign folder made by hand: `campaign.json` with `params`, and no workload.
fn fake_kernel_folder(dir: &Path, params: serde_json::Value) {
    std::fs::create_dir_all(dir.join("done")).unwrap();
    std::fs::create_dir_all(dir.join("findings")).unwrap();
    let c = serde_json::json!({ "kind": "kernel", "params": params });
    std::fs::write(dir.join("campaign.json"), c.to_string()).unwrap();
}

fn merge(out: &Path, dirs: &[&Path]) -> Output {
    Command::new(CM)
        .args(["findings", "merge"])
        .arg(out)
        .args(dirs)
        .output()
        .unwrap()
}

#[test]
fn other_campaigns_and_a_full_out_are_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    fake_kernel_folder(&a, serde_json::json!({ "fs": "ext4", "seed": 1 }));
    fake_kernel_folder(&b, serde_json::json!({ "fs": "xfs", "seed": 1 }));
    let out = tmp.path().join("out");
    let o = merge(&out, &[&a, &b]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("holds another campaign"), "{err}");
    assert!(!out.exists(), "a refused merge made its folder");
    // An OUT that holds a file is never written into.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep me").unwrap();
    let o = merge(&out, &[&a]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "keep me"
    );
    // One folder of the same campaign merges; nothing temporary is left beside OUT. The
    // merge is built beside OUT, not in the working folder (here /proc, where nothing can be
    // made), and an OUT given relative to the working folder works too.
    let single = tmp.path().join("single");
    let o = Command::new(CM)
        .args(["findings", "merge"])
        .arg(&single)
        .arg(&a)
        .current_dir("/proc")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let o = Command::new(CM)
        .args(["findings", "merge", "relative", "a"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(tmp.path().join("relative/campaign.json").is_file());
    // A folder with no `done/` (no workload checked) merges as one with an empty one.
    std::fs::remove_dir(a.join("done")).unwrap();
    let o = merge(&tmp.path().join("no-done"), &[&a]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
