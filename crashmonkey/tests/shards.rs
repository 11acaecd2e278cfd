//! Shards: N processes, each with `--shard K/N`, together do exactly what one unsharded
//! campaign does: the same failing seeds (race), the same states checked (check), each once.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Output};

use common::*;

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)))
}

/// Runs `N` processes of `make(k)` at once and returns their outputs, in shard order.
fn shards(n: u64, make: impl Fn(u64) -> Command) -> Vec<Output> {
    let children: Vec<_> = (0..n)
        .map(|k| {
            make(k)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

fn seeds(v: &serde_json::Value) -> BTreeSet<u64> {
    v["failing_seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .collect()
}

#[test]
fn three_race_shards_find_what_one_campaign_finds() {
    let race = || {
        let mut c = crashmonkey();
        c.args(["race", "--seed", "1", "--runs", "3000", "--no-iomap-valid"])
            .args(["--json", "--no-bundle"]);
        c
    };
    let whole = json(&race().output().unwrap());
    let parts: Vec<serde_json::Value> = shards(3, |k| {
        let mut c = race();
        c.args(["--shard", &format!("{k}/3")]);
        c
    })
    .iter()
    .map(json)
    .collect();
    let total = |key: &str| parts.iter().map(|p| p[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!(total("runs"), whole["runs"].as_u64().unwrap());
    assert_eq!(total("failures"), whole["failures"].as_u64().unwrap());
    assert!(
        whole["failures"].as_u64().unwrap() > 0,
        "the campaign must find something"
    );
    let mut union = BTreeSet::new();
    for p in &parts {
        let s = seeds(p);
        assert!(union.is_disjoint(&s), "two shards ran one seed");
        union.extend(s);
    }
    assert_eq!(union, seeds(&whole));
    // The shard index can come from a Kubernetes Indexed Job's environment.
    let mut c = race();
    c.args(["--shard", "3"]).env("JOB_COMPLETION_INDEX", "2");
    assert_eq!(json(&c.output().unwrap())["shard"], "2/3");
    let bad = race().args(["--shard", "3/3"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn three_check_shards_check_each_state_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path());
    let base = base(dir.path(), DISK_BYTES);
    let seen = |name: &str| dir.path().join(name);
    let checker = |file: &std::path::Path| {
        format!("test -s {{image}} && echo {{state}} >> {}", file.display())
    };
    let ids = |file: &std::path::Path| -> Vec<u64> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    let whole = check_cmd(&log, &base, &checker(&seen("all")), &["--json"])
        .output()
        .unwrap();
    assert!(
        whole.status.success(),
        "{}",
        String::from_utf8_lossy(&whole.stderr)
    );
    let all: BTreeSet<u64> = ids(&seen("all")).into_iter().collect();
    let outs = shards(3, |k| {
        let file = seen(&format!("s{k}"));
        let mut c = check_cmd(&log, &base, &checker(&file), &["--json"]);
        c.args(["--shard", &format!("{k}/3")]);
        c
    });
    let mut union = Vec::new();
    for (k, o) in outs.iter().enumerate() {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let mine = ids(&seen(&format!("s{k}")));
        assert!(
            mine.iter().all(|id| id % 3 == k as u64),
            "shard {k} checked {mine:?}"
        );
        union.extend(mine);
    }
    union.sort_unstable();
    let n = union.len();
    union.dedup();
    assert_eq!(n, union.len(), "a state was checked twice");
    assert_eq!(union.into_iter().collect::<BTreeSet<_>>(), all);
}
