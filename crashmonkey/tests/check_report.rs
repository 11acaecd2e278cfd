//! `crashmonkey report DIR` of the folder `crashmonkey check --out DIR` writes (issue 17): the
//! page lists every failing state, with the reason, the checker's output, and the state drawn
//! on the write log the check read; with the log gone it says so instead of failing.
//!
//! The check runs over the committed commit-without-flush fs bundle's write log with a checker
//! that fails the states whose id is odd, so the failing states are known without the code
//! under test: every odd id among the states checked.

use std::path::Path;
use std::process::Command;

fn cm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
}

/// A checker that prints a line naming its state and fails the odd ones.
const CHECKER: &str =
    "test -f {image} && echo checked-state-{state} && test $(( {state} % 2 )) -eq 0";

#[test]
fn a_check_folder_is_reported_state_by_state() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/fs/commit-without-flush/fs-seed-2");
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("device.log");
    std::fs::copy(fixture.join("device.log"), &log).unwrap();
    let out = tmp.path().join("failed");
    let c = cm()
        .arg("check")
        .arg(&log)
        .arg("--base")
        .arg(fixture.join("base.img"))
        .args([
            "--checker",
            CHECKER,
            "--jobs",
            "2",
            "--max-subset",
            "1",
            "--json",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&c.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&c.stderr)));
    let failed: Vec<u64> = s["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_u64().unwrap())
        .collect();
    assert!(failed.len() >= 2, "{s}");
    assert!(failed.iter().all(|id| id % 2 == 1), "{failed:?}");
    let html = tmp.path().join("r.html");
    let r = cm()
        .arg("report")
        .arg(&out)
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
    assert!(page.contains("crash states checked"));
    assert_eq!(
        page.matches("<section class=\"finding\"").count(),
        failed.len()
    );
    assert_eq!(
        page.matches("The crash state on the write log").count(),
        failed.len()
    );
    assert!(page.matches("<svg").count() >= failed.len());
    for id in &failed {
        assert!(
            page.contains(&format!("checked-state-{id}\n")),
            "state {id}'s output"
        );
    }
    // The log moved away: the page says so, and is still written.
    std::fs::remove_file(&log).unwrap();
    let r = cm()
        .arg("report")
        .arg(&out)
        .arg("-o")
        .arg(&html)
        .arg("--force")
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("no timeline").count(), failed.len());
    assert!(!page.contains("<svg"));
}
