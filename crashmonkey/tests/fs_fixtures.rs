//! The committed fs-core crash reproducers (`fixtures/fs/<bug>/fs-seed-N`), one per planted
//! bug and one per stale-mapping switch whose lost bytes a persistence point made durable:
//! each replays to the verdict it records (exit 1, the same violations), replays clean with
//! the defaults (exit 0), and its crash image shows what the oracle says with the `fs`
//! commands, which read it through correct recovery.

use std::path::{Path, PathBuf};
use std::process::Command;

use crashmonkey::fscore::bundle;

const CM: &str = env!("CARGO_BIN_EXE_crashmonkey");

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/fs");
    let mut out = Vec::new();
    for kind in std::fs::read_dir(&root).unwrap() {
        for b in std::fs::read_dir(kind.unwrap().path()).unwrap() {
            out.push(b.unwrap().path());
        }
    }
    out.sort();
    out
}

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(CM).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn every_fixture_replays_to_its_verdict_and_clean_with_the_defaults() {
    let all = fixtures();
    let names: Vec<String> = all
        .iter()
        .map(|p| {
            p.parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into()
        })
        .collect();
    for want in fs_core::fs::Bugs::NAMES.iter().chain(&["no-iomap-valid"]) {
        assert!(
            names.iter().any(|n| n == want),
            "no fixture for {want}: {names:?}"
        );
    }
    for dir in &all {
        let d = dir.to_str().unwrap();
        let b = bundle::load(dir).unwrap();
        let verdict = b.verdict.as_ref().expect("a crash-state finding");
        let (code, text) = run(&["fs", "campaign", "--replay", d, "--json"]);
        assert_eq!(code, 1, "{d}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["state_found"], true, "{d}: {text}");
        for x in &verdict.violations {
            let report = v["verdict"].as_str().unwrap();
            assert!(report.contains(&x.what), "{d}: {} not in {report}", x.what);
        }
        for p in &verdict.fsck {
            assert!(
                v["verdict"].as_str().unwrap().contains(p.as_str()),
                "{d}: {p}"
            );
        }
        let (code, text) = run(&["fs", "campaign", "--replay", d, "--defaults"]);
        assert_eq!(code, 0, "{d} with the defaults: {text}");
    }
}

/// `fs cat` of a fixture's crash image shows the byte the oracle reports (`byte X: found V`),
/// and `fs fsck` judges it as the verdict's fsck part says (bugs in recovery itself aside:
/// the `fs` commands recover correctly).
#[test]
fn crash_images_show_the_wrong_bytes() {
    for dir in fixtures() {
        let b = bundle::load(&dir).unwrap();
        let verdict = b.verdict.unwrap();
        let img = dir.join("crash.img");
        let img = img.to_str().unwrap();
        let (code, text) = run(&["fs", "fsck", img]);
        let expect = i32::from(!verdict.fsck.is_empty() && !b.config.bugs.replay_ignores_checksum);
        assert_eq!(code, expect, "{img}: {text}");
        for v in &verdict.violations {
            let Some((x, found)) = parse_byte(&v.what) else {
                continue;
            };
            let out = Command::new(CM)
                .args(["fs", "cat", img, &v.file])
                .output()
                .unwrap();
            assert!(out.status.success(), "{img} {}", v.file);
            assert_eq!(out.stdout.get(x), Some(&found), "{img} {} byte {x}", v.file);
        }
    }
}

/// "byte 12288: found 0x00, ..." or "byte 3520: found 'E', ..." -> (12288, 0).
fn parse_byte(what: &str) -> Option<(usize, u8)> {
    let rest = what.strip_prefix("byte ")?;
    let (x, rest) = rest.split_once(": found ")?;
    let v = if let Some(hex) = rest.strip_prefix("0x") {
        u8::from_str_radix(&hex[..2], 16).ok()?
    } else {
        *rest.strip_prefix('\'')?.as_bytes().first()?
    };
    Some((x.parse().ok()?, v))
}
