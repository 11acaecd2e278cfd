//! `crashmonkey report` and `crashmonkey log show --svg` on a real campaign folder, through
//! the binary: the page holds every finding with its timeline and nothing fetched, a user's
//! file is never replaced without `--force`, and no partial or temporary file is left.

mod common;

use common::{crashmonkey, output_within};
use std::path::{Path, PathBuf};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(300);

/// A race campaign with the validity cookie off over seeds known to lose data (700..1000
/// holds several findings), its folder in `dir`.
pub fn campaign(dir: &Path) -> PathBuf {
    let out = dir.join("camp");
    let o = output_within(
        crashmonkey()
            .args([
                "race",
                "--seed",
                "700",
                "--runs",
                "300",
                "--no-iomap-valid",
                "--out",
            ])
            .arg(&out),
        LIMIT,
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "the campaign finds data loss: {o:?}"
    );
    out
}

fn findings(dir: &Path) -> serde_json::Value {
    let o = output_within(crashmonkey().arg("findings").arg(dir).arg("--json"), LIMIT);
    serde_json::from_slice(&o.stdout).unwrap()
}

fn report(dir: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    output_within(
        crashmonkey()
            .arg("report")
            .arg(dir)
            .arg("-o")
            .arg(out)
            .args(extra),
        LIMIT,
    )
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Every finding of the folder gets its section, with its signature, replay command and race
/// timeline (lanes for its tasks), and the page fetches nothing: no script, stylesheet,
/// image, font or frame, and no URL but the SVG namespace.
#[test]
fn the_report_shows_every_finding_and_is_self_contained() {
    let d = tempfile::tempdir().unwrap();
    let camp = campaign(d.path());
    let out = d.path().join("report.html");
    let o = report(&camp, &out, &[]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    let f = findings(&camp);
    let list = f["findings"].as_array().unwrap();
    assert!(!list.is_empty());
    assert_eq!(
        html.matches("<section class=\"finding\"").count(),
        list.len()
    );
    assert_eq!(
        html.matches("class=\"timeline race-timeline\"").count(),
        list.len()
    );
    for x in list {
        let sig = x["signature"].as_str().unwrap();
        assert!(html.contains(sig), "signature {sig}");
        let bundle = camp.join(x["bundle"].as_str().unwrap());
        let replay = format!("crashmonkey race --replay {}", bundle.display());
        assert!(html.contains(&replay), "{replay}");
    }
    for lane in [">flusher</text>", ">IO completion</text>", ">op0 "] {
        assert!(html.contains(lane), "lane {lane}");
    }
    for fetch in [
        "<script", "<link", "<img", "<iframe", " src=", "url(", "@import",
    ] {
        assert!(!html.contains(fetch), "the page fetches something: {fetch}");
    }
    let urls = html.matches("http").count();
    let svg_ns = html.matches("http://www.w3.org/2000/svg").count();
    assert_eq!(urls, svg_ns, "only the SVG namespace is a URL");
    assert_eq!(
        names(d.path()),
        ["camp", "report.html"],
        "no temporary file left"
    );
}

/// Guards against destroying a user's file: an existing output is refused (exit 2) and keeps
/// its bytes unless `--force`; a folder that is not a campaign's writes nothing.
#[test]
fn the_report_never_replaces_a_file_without_force() {
    let d = tempfile::tempdir().unwrap();
    let camp = campaign(d.path());
    let out = d.path().join("mine.html");
    std::fs::write(&out, b"my notes").unwrap();
    let o = report(&camp, &out, &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"my notes");
    assert_eq!(names(d.path()), ["camp", "mine.html"]);
    let o = report(&camp, &out, &["--force"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(std::fs::read_to_string(&out)
        .unwrap()
        .contains("<section class=\"finding\""));

    let not_a_campaign = d.path().join("empty");
    std::fs::create_dir(&not_a_campaign).unwrap();
    let none = d.path().join("none.html");
    let o = report(&not_a_campaign, &none, &[]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(!none.exists());
    assert_eq!(names(d.path()), ["camp", "empty", "mine.html"]);
}

/// `log show --svg` draws a bundle's device log the way the report does, to stdout or to a
/// new file, which it does not replace without `--force`.
#[test]
fn log_show_svg_draws_one_log() {
    let d = tempfile::tempdir().unwrap();
    let camp = campaign(d.path());
    let f = findings(&camp);
    let log = camp
        .join(f["findings"][0]["bundle"].as_str().unwrap())
        .join("device.log");
    let o = output_within(
        crashmonkey()
            .args(["log", "show", "--svg", "--highlight-byte", "4096"])
            .arg(&log),
        LIMIT,
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let svg = String::from_utf8(o.stdout).unwrap();
    assert!(svg
        .starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"timeline log-timeline\""));
    for lane in [
        "epochs",
        "writes",
        "FUA",
        "flushes",
        "marks",
        "crash",
        "where on disk",
    ] {
        assert!(svg.contains(&format!(">{lane}</text>")), "lane {lane}");
    }
    assert!(svg.contains("byte 4096 (block 1)"));
    let file = d.path().join("log.svg");
    let show = |extra: &[&str]| {
        output_within(
            crashmonkey()
                .args(["log", "show", "--svg", "--highlight-byte", "4096", "-o"])
                .arg(&file)
                .arg(&log)
                .args(extra),
            LIMIT,
        )
    };
    assert_eq!(show(&[]).status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim_end(),
        svg.trim_end()
    );
    std::fs::write(&file, b"keep").unwrap();
    assert_ne!(show(&[]).status.code(), Some(0));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    assert_eq!(show(&["--force"]).status.code(), Some(0));
    assert_eq!(names(d.path()), ["camp", "log.svg"]);
}

#[test]
fn help_explains_with_an_example() {
    for args in [&["report", "--help"][..], &["log", "show", "--help"][..]] {
        let o = output_within(crashmonkey().args(args), LIMIT);
        let text = String::from_utf8(o.stdout).unwrap();
        assert!(text.contains("Example"), "{args:?}: {text}");
        assert!(text.contains("--force"), "{args:?}: {text}");
    }
}

/// docs/campaigns.md's report section names the limits with the code's values.
#[test]
fn the_limits_on_the_page_are_the_code_s() {
    use crashmonkey::report::{bundle_page, crash, log, page, race};
    let doc = include_str!("../../docs/campaigns.md");
    let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        format!(
            "at most {} steps per race timeline (`STEPS_DRAWN_MAX`)",
            race::STEPS_DRAWN_MAX
        ),
        format!(
            "{} steps after the last mark (`STEPS_AFTER_LAST_MARK`)",
            race::STEPS_AFTER_LAST_MARK
        ),
        format!("at most {} lanes (`LANES_DRAWN_MAX`", race::LANES_DRAWN_MAX),
        format!(
            "at most {} records per write-log timeline (`RECORDS_DRAWN_MAX`)",
            log::RECORDS_DRAWN_MAX
        ),
        format!(
            "at most {} findings in full (`FINDINGS_SHOWN_MAX`",
            page::FINDINGS_SHOWN_MAX
        ),
        format!(
            "at most {} characters per note (`NOTE_CHARS_MAX`)",
            page::NOTE_CHARS_MAX
        ),
        format!(
            "{} operations listed (`OPS_LISTED_MAX`)",
            page::OPS_LISTED_MAX
        ),
        format!(
            "{} failures per run (`FAILURES_LISTED_MAX`)",
            page::FAILURES_LISTED_MAX
        ),
        format!(
            "{} bytes of `report.txt` (`REPORT_TEXT_BYTES_MAX`)",
            page::REPORT_TEXT_BYTES_MAX
        ),
        format!(
            "at most {} replays on this (`REPLAYS_PER_FINDING_MAX`)",
            race::REPLAYS_PER_FINDING_MAX
        ),
        format!(
            "at most {} per write, `ROLE_BLOCKS_PER_WRITE_MAX`",
            crash::ROLE_BLOCKS_PER_WRITE_MAX
        ),
        format!(
            "at most {} violations and fsck findings (`VERDICT_LINES_MAX`)",
            bundle_page::VERDICT_LINES_MAX
        ),
        format!(
            "{} + N operation N, `FIRST_OP_TASK`",
            fs_core::sched::FIRST_OP_TASK
        ),
    ] {
        assert!(
            doc.contains(&want),
            "docs/campaigns.md does not say {want:?}"
        );
    }
}

/// One fs bundle gets a page of its own: its verdict, and its write log with the crash state
/// on it, the wrong byte's block (device block 46, as the bundle's fsck.txt says inode 0's
/// file block 3 is) and the role lane; and a race bundle alone gets its finding's page.
#[test]
fn a_bundle_folder_gets_a_page_of_its_own() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let d = tempfile::tempdir().unwrap();
    let fs_page = d.path().join("fs.html");
    let fs_bundle = fixtures.join("fs/commit-without-flush/fs-seed-2");
    let o = report(&fs_bundle, &fs_page, &[]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let html = std::fs::read_to_string(&fs_page).unwrap();
    let fsck = std::fs::read_to_string(fs_bundle.join("fsck.txt")).unwrap();
    assert!(fsck.contains("block 46 is owned by inode 0 file block 3"));
    assert!(
        html.contains("byte 188416 (block 46)"),
        "the wrong byte's block"
    );
    assert!(html.contains(">role (fs-core)</text>"));
    assert!(html.contains("<b>f0</b>: byte 12288: found 0x00"));
    assert!(html.contains("crashmonkey fs campaign --replay"));
    assert_eq!(html.matches("class=\"timeline log-timeline\"").count(), 1);

    let race_page = d.path().join("race.html");
    let o = report(&fixtures.join("race/race-seed-9079"), &race_page, &[]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let html = std::fs::read_to_string(&race_page).unwrap();
    assert_eq!(html.matches("class=\"timeline race-timeline\"").count(), 1);
    assert!(html.contains("[step 23] op2 write_begin zero-filled"));
    for fetch in ["<script", "<link", "<img", " src=", "url("] {
        assert!(!html.contains(fetch), "the page fetches something: {fetch}");
    }
}
