//! `crashmonkey findings` and `crashmonkey report` on a kernel campaign's folder, written by
//! hand here in the format `crashmonkey kernel --out` writes (docs/kernel-campaigns.md): the
//! index's failing states grouped by signature, most frequent first, each with its bundle and
//! the command in its README. A folder whose index names a bundle that is not there is
//! refused (exit 2), not read as if nothing were missing. (`tests/kernel.rs` and
//! `tests/app_run.rs` read real folders too, as root.)

use std::path::Path;
use std::process::Command;

const CM: &str = env!("CARGO_BIN_EXE_crashmonkey");

const SIG_A: &str = "ext4 lying disk: missing after fsync [write]";
const SIG_B: &str = "ext4 lying disk: does not mount [rename]";

fn bundle(dir: &Path, name: &str, report: &str) {
    let b = dir.join("findings").join(name);
    std::fs::create_dir_all(&b).unwrap();
    let readme = "# x\n\nShow it again:\n\n```\nsudo crashmonkey kernel --fs ext4 --workload \
                  workload.txt --lying-disk\n```\n";
    std::fs::write(b.join("README.md"), readme).unwrap();
    std::fs::write(b.join("report.txt"), report).unwrap();
}

/// Three failing states: two of SIG_A (workloads w1, w2), one of SIG_B.
fn folder(dir: &Path) {
    std::fs::create_dir_all(dir.join("done")).unwrap();
    let params = r#"{"kind":"kernel","params":{"fs":"ext4","lying_disk":true,"workload":"ace","seq":1,"seed":1,"limit":3,"reorder":false}}"#;
    std::fs::write(dir.join("campaign.json"), params).unwrap();
    for w in ["w1", "w2", "w3"] {
        std::fs::write(dir.join("done").join(format!("{w}.json")), "{}").unwrap();
    }
    let line = |sig: &str, w: &str, bundle: &str| {
        serde_json::json!({"signature": sig, "workload": w, "mark": "p1", "state": "durable",
            "bundle": bundle})
        .to_string()
    };
    let index = [
        line(SIG_B, "w1", "b"),
        line(SIG_A, "w1", "a"),
        line(SIG_A, "w2", "a"),
    ]
    .join("\n");
    std::fs::write(dir.join("findings.jsonl"), index + "\n").unwrap();
    bundle(dir, "a", "foo: `fsync foo` promised <20480> bytes");
    bundle(dir, "b", "Does not mount: wrong fs type");
}

fn cm(args: &[&str]) -> std::process::Output {
    Command::new(CM).args(args).output().unwrap()
}

#[test]
fn a_kernel_folder_reads_as_findings_by_signature_and_as_a_page() {
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    folder(&camp);
    let dir = camp.to_str().unwrap();
    let out = cm(&["findings", dir, "--json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["workloads"].as_u64()),
        (Some("kernel"), Some(3))
    );
    assert_eq!(v["failing_states"], 3);
    let f = v["findings"].as_array().unwrap();
    let got: Vec<(&str, u64, &str, &str)> = f
        .iter()
        .map(|x| {
            (
                x["signature"].as_str().unwrap(),
                x["count"].as_u64().unwrap(),
                x["first"]["workload"].as_str().unwrap(),
                x["bundle"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (SIG_A, 2, "w1", "findings/a"),
            (SIG_B, 1, "w1", "findings/b")
        ]
    );
    assert_eq!(
        f[0]["again"],
        "sudo crashmonkey kernel --fs ext4 --workload workload.txt --lying-disk"
    );
    let text = cm(&["findings", dir]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("3 failing states, 2 distinct findings"),
        "{text}"
    );
    let html = tmp.path().join("r.html");
    let r = cm(&["report", dir, "-o", html.to_str().unwrap()]);
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains(SIG_B) && page.contains("wrong fs type"),
        "{page}"
    );
    // Text from the folder is escaped.
    assert!(
        page.contains("&lt;20480&gt;") && !page.contains("<20480>"),
        "{page}"
    );
}

#[test]
fn a_kernel_folder_missing_a_bundle_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    folder(&camp);
    std::fs::remove_dir_all(camp.join("findings/b")).unwrap();
    let dir = camp.to_str().unwrap();
    let out = cm(&["findings", dir]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not there"));
    let html = tmp.path().join("r.html");
    let r = cm(&["report", dir, "-o", html.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(2));
    assert!(!html.exists());
}

#[test]
fn a_kernel_folder_with_no_finding_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    folder(&camp);
    std::fs::remove_file(camp.join("findings.jsonl")).unwrap();
    let out = cm(&["findings", camp.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["findings"].as_array().unwrap().len(), 0);
}
