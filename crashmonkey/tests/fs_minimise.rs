//! Minimisation of failing crash states (`crashmonkey fs minimise`): it guards against a
//! minimiser that keeps a state which no longer fails, or fails another way, or is not a
//! state a power cut could leave (and so not one replay finds), or that differs from one call
//! to the next. The judge is the normal replay command, `fs campaign --replay`, on the
//! minimised bundle, and the failure signature of the verdict it writes, compared with the
//! committed fixture's own verdict.

use crashmonkey::fscore::bundle::{load, Verdict};
use crashmonkey::fscore::minimise::crash_signature;
use crashmonkey::fscore::states::StateFailure;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn crashmonkey() -> Command {
    Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
}

fn fixture(bug: &str, seed: u64) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../fixtures/fs/{bug}/fs-seed-{seed}"))
}

fn minimise(bundle: &Path, out: &Path) -> Output {
    crashmonkey()
        .args(["fs", "minimise", "--json"])
        .arg(bundle)
        .arg("-o")
        .arg(out)
        .output()
        .unwrap()
}

/// The crash signature of a bundle's recorded verdict.
fn signature_of(dir: &Path) -> String {
    let b = load(dir).unwrap();
    let (
        state,
        Verdict {
            mount_error,
            fsck,
            violations,
        },
    ) = (b.state.unwrap(), b.verdict.unwrap());
    crash_signature(&StateFailure {
        state,
        mount_error,
        fsck,
        violations,
        replayed: 0,
        image: Vec::new(),
    })
}

/// Minimises `bundle` into a new folder; checks that `fs campaign --replay` finds the
/// minimised state and that it fails as the original did. Returns the report.
fn minimised_fails_the_same_way(bundle: &Path, out: &Path) -> serde_json::Value {
    let o = minimise(bundle, out);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = crashmonkey()
        .args(["fs", "campaign", "--json", "--replay"])
        .arg(out)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&v["exact"], &v["state_found"]),
        (&true.into(), &true.into())
    );
    assert_eq!(signature_of(out), signature_of(bundle));
    assert_eq!(r["signature"], signature_of(bundle).as_str());
    r
}

/// commit-without-flush's state kept 6 writes of its epoch: fewer still break fsck.
#[test]
fn a_subset_state_keeps_fewer_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let r =
        minimised_fails_the_same_way(&fixture("commit-without-flush", 2), &tmp.path().join("m"));
    assert_eq!(r["before"]["kept"], 6);
    assert!(r["after"]["kept"].as_u64().unwrap() < 6, "{r}");
}

/// replay-ignores-checksum's torn write landed 5 sectors: fewer still make a bad superblock.
#[test]
fn a_torn_write_lands_fewer_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let r = minimised_fails_the_same_way(
        &fixture("replay-ignores-checksum", 1),
        &tmp.path().join("m"),
    );
    assert_eq!(r["before"]["torn_bytes"], 2560);
    assert!(r["after"]["torn_bytes"].as_u64().unwrap() < 2560, "{r}");
}

/// The same bundle minimises to the same bytes, twice.
#[test]
fn state_minimisation_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let f = fixture("commit-without-flush", 2);
    assert_eq!(minimise(&f, &a).status.code(), Some(0));
    assert_eq!(minimise(&f, &b).status.code(), Some(0));
    for name in ["bundle.json", "minimise.json", "crash.img", "oracle.txt"] {
        let x = std::fs::read(a.join(name)).unwrap();
        assert_eq!(x, std::fs::read(b.join(name)).unwrap(), "{name}");
    }
}

/// A bundle whose crash state keeps its promises when replayed (its planted bug switched
/// off) is refused with a clear error, and nothing is written.
#[test]
fn a_state_that_does_not_fail_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    std::fs::create_dir(&dir).unwrap();
    let from = fixture("fsync-no-log-force", 1);
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(from.join("bundle.json")).unwrap()).unwrap();
    v["config"]["bugs"]["fsync_no_log_force"] = false.into();
    std::fs::write(dir.join("bundle.json"), v.to_string()).unwrap();
    let out = tmp.path().join("m");
    let o = minimise(&dir, &out);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("does not fail"), "{err}");
    assert!(!out.exists());
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

/// The keys of the pretty-printed JSON lines at `indent` spaces, in their order.
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

/// docs/campaigns.md's tables are the fs bundle's `minimise.json` keys, in order, and the
/// constant it names is the code's.
#[test]
fn the_page_describes_the_fs_minimise_json() {
    use crashmonkey::fscore::minimise::STATE_CHECKS_MAX;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let o = minimise(&fixture("replay-ignores-checksum", 1), &out);
    assert_eq!(o.status.code(), Some(0));
    let text = std::fs::read_to_string(out.join("minimise.json")).unwrap();
    assert_eq!(keys_at(&text, 2), doc_keys("keys:state-minimise"));
    let before = &text[text.find("\"before\"").unwrap()..text.find("\"after\"").unwrap()];
    assert_eq!(keys_at(before, 4), doc_keys("keys:StateSize"));
    let flat = DOC.split_whitespace().collect::<Vec<_>>().join(" ");
    let said = format!("at most {STATE_CHECKS_MAX} checks (`STATE_CHECKS_MAX`)");
    assert!(
        flat.contains(&said),
        "docs/campaigns.md does not say {said:?}"
    );
}

/// `fs campaign --minimise` leaves the bundle as it was and adds `minimised/`, which
/// replays to the same crash signature.
#[test]
fn an_fs_campaign_minimises_its_bundle_beside_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = crashmonkey()
        .args(["fs", "campaign", "--seed", "1", "--runs", "50"])
        .args([
            "--bug",
            "fsync-no-log-force",
            "--max-failures",
            "1",
            "--minimise",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // --out is a campaign folder: the finding's one bundle is its only fs-seed-N.
    let bundles: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("fs-seed-")
        })
        .collect();
    assert_eq!(bundles.len(), 1, "{bundles:?}");
    let bundle = bundles[0].clone();
    let min = bundle.join("minimised");
    assert!(bundle.join("crash.img").is_file());
    assert_eq!(signature_of(&min), signature_of(&bundle));
    let o = crashmonkey()
        .args(["fs", "campaign", "--json", "--replay"])
        .arg(&min)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}
