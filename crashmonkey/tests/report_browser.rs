//! The report of a small real campaign, opened in a real browser (headless Chromium): it
//! loads with no console message and no error, fetches nothing, and its first timeline is
//! drawn (the screenshot's pixels where the timeline lies are not blank).
//!
//! Two runs of the browser: one on a copy of the page with a small script put first in its
//! head, which records every error event (a script error, a resource that failed to load),
//! every console message and every resource the page fetched, and the first timeline's
//! place, and writes them into the DOM that `--dump-dom` prints; and one screenshot of the
//! page itself, whose stderr must hold no console line (the page has no script, so any is the
//! browser's complaint). Chromium runs in its own process group, killed whole at its time
//! limit, so it never outlives the test.
//!
//! Under CI a missing Chromium fails the test; elsewhere the suite's skip policy decides.

mod common;
#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long one browser run may take before its process group is killed.
const BROWSER_SECONDS_MAX: u64 = 90;
/// The browser window's width, in CSS pixels (scale factor 1: one pixel each).
const WINDOW_WIDTH_PX: u32 = 1400;
/// Height of the screenshot at most.
const WINDOW_HEIGHT_MAX_PX: u32 = 8000;
/// Share of the timeline's pixels, in thousandths, that must be other than the background.
const INKED_PER_MILLE_MIN: u64 = 20;

/// Put first in the copy's head: records what went wrong and where the first timeline is.
const PROBE: &str = r#"<script>
window.__probe = {errors: [], console: []};
window.addEventListener('error', function (e) {
  var t = e.target && (e.target.src || e.target.href);
  window.__probe.errors.push(String(e.message || t || 'an error event'));
}, true);
['error', 'warn', 'log', 'info'].forEach(function (k) {
  var f = console[k];
  console[k] = function () {
    window.__probe.console.push(k + ': ' + Array.prototype.join.call(arguments, ' '));
    return f.apply(console, arguments);
  };
});
window.addEventListener('load', function () {
  var svg = document.querySelector('svg.FIRST-TIMELINE');
  var r = svg && svg.getBoundingClientRect();
  var out = {
    errors: window.__probe.errors,
    console: window.__probe.console,
    resources: performance.getEntriesByType('resource').map(function (x) { return x.name; }),
    timelines: document.querySelectorAll('svg.timeline').length,
    rect: r ? [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height] : null
  };
  var pre = document.createElement('pre');
  pre.id = 'browser-probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"#;

/// The browser, if one is installed: `CHROMIUM` or the first of the usual names on PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n)))
        .find(|p| p.is_file())
}

/// Kills the process group `pgid`: Chromium's zygote and renderers are its children.
#[allow(unsafe_code)]
fn kill_group(pgid: u32) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // SAFETY: killpg takes two integers and touches no memory of ours.
    unsafe { libc::killpg(pgid, libc::SIGKILL) };
}

/// Runs the browser on `page` with `args`, in its own process group and profile folder,
/// killed whole after `BROWSER_SECONDS_MAX`.
fn browse(browser: &Path, profile: &Path, page: &Path, args: &[String]) -> Output {
    let mut cmd = Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ])
    .args([
        "--force-device-scale-factor=1",
        "--no-first-run",
        "--disable-extensions",
    ])
    .args(["--enable-logging=stderr", "--v=0"])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(format!("file://{}", page.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let child = cmd.spawn().expect("chromium starts");
    let pgid = child.id();
    let started = Instant::now();
    let limit = Duration::from_secs(BROWSER_SECONDS_MAX);
    // A watchdog kills the group if the browser overruns; `wait_within` reads the pipes.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                if started.elapsed() > limit {
                    kill_group(pgid);
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };
    let out = common::wait_within(child, limit + Duration::from_secs(30));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let killed = watch.join().unwrap();
    // Helpers the browser left (none should outlive it).
    kill_group(pgid);
    assert!(
        !killed,
        "chromium ran past {BROWSER_SECONDS_MAX} s and was killed"
    );
    out
}

/// The probe's JSON, from the DOM the browser printed (text there has `&`, `<`, `>` escaped).
fn probe(dom: &str) -> serde_json::Value {
    let start = dom
        .find("<pre id=\"browser-probe\">")
        .unwrap_or_else(|| panic!("the probe did not run; the DOM:\n{dom}"));
    let rest = &dom[start + "<pre id=\"browser-probe\">".len()..];
    let text = &rest[..rest.find("</pre>").expect("the probe's end")];
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    serde_json::from_str(&text).unwrap()
}

/// Pixels of the `rect` (x, y, w, h) of an RGB(A) screenshot that are not near-white, per
/// mille of the rect's pixels within the image.
fn inked_per_mille(png_path: &Path, rect: [u32; 4]) -> u64 {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    let [x0, y0, w, h] = rect;
    let (x1, y1) = ((x0 + w).min(info.width), (y0 + h).min(info.height));
    let (mut inked, mut all) = (0u64, 0u64);
    for y in y0..y1 {
        for x in x0..x1 {
            let at = y as usize * info.line_size + x as usize * channels;
            let px = &buf[at..at + 3];
            all += 1;
            inked += u64::from(px.iter().any(|&c| c < 235));
        }
    }
    assert!(all > 0, "the timeline is outside the screenshot");
    inked * 1000 / all
}

/// A small real campaign's report in `dir` (`campaign`: the command and its flags before
/// `--out`): the page's path.
fn report_of_a_campaign(dir: &Path, campaign: &[&str]) -> PathBuf {
    let out = dir.join("camp");
    let o = common::output_within(
        common::crashmonkey().args(campaign).arg("--out").arg(&out),
        Duration::from_secs(300),
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "the campaign finds data loss: {o:?}"
    );
    let page = dir.join("report.html");
    let o = common::output_within(
        common::crashmonkey()
            .arg("report")
            .arg(&out)
            .arg("-o")
            .arg(&page),
        Duration::from_secs(300),
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    page
}

/// Opens a copy of `page` with the probe in it: asserts nothing went wrong and nothing was
/// fetched, and returns where the first timeline of class `first` lies (x, y, width, height).
fn probe_page(browser: &Path, dir: &Path, page: &Path, first: &str) -> [u32; 4] {
    let html = std::fs::read_to_string(page).unwrap();
    let probed = dir.join("probed.html");
    let head = "<meta charset=\"utf-8\">";
    assert!(html.contains(head));
    let probe_js = PROBE.replace("FIRST-TIMELINE", first);
    std::fs::write(
        &probed,
        html.replacen(head, &format!("{head}{probe_js}"), 1),
    )
    .unwrap();
    let size = format!("--window-size={WINDOW_WIDTH_PX},2000");
    let o = browse(
        browser,
        &dir.join("p1"),
        &probed,
        &["--dump-dom".into(), size],
    );
    let p = probe(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(p["errors"], serde_json::json!([]), "errors: {p}");
    assert_eq!(p["console"], serde_json::json!([]), "console: {p}");
    assert_eq!(
        p["resources"],
        serde_json::json!([]),
        "the page fetched: {p}"
    );
    assert!(p["timelines"].as_u64().unwrap() >= 2, "{p}");
    let rect: Vec<f64> = serde_json::from_value(p["rect"].clone()).expect("a timeline");
    let rect = [rect[0], rect[1], rect[2], rect[3]].map(|v| v.max(0.0) as u32);
    assert!(rect[2] > 0 && rect[3] > 0, "the timeline has no size: {p}");
    rect
}

#[test]
fn the_report_renders_in_a_real_browser() {
    let campaign = ["race", "--seed", "700", "--runs", "300", "--no-iomap-valid"];
    renders(&campaign, "race-timeline");
}

/// An fs campaign folder's report (crash findings, each drawn on its write log) renders as
/// the race one does: no error, nothing fetched, its first log timeline not blank.
#[test]
fn the_fs_report_renders_in_a_real_browser() {
    let campaign = [
        "fs",
        "campaign",
        "--seed",
        "1",
        "--runs",
        "24",
        "--bug",
        "fsync-no-log-force",
    ];
    renders(&campaign, "log-timeline");
}

/// The report of `campaign`'s folder in the browser: probed, then shot; the first timeline
/// of class `first` must be inked.
fn renders(campaign: &[&str], first: &str) {
    let Some(browser) = chromium() else {
        skip::skip("chromium is not installed (make deps installs it)");
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let page = report_of_a_campaign(d.path(), campaign);
    let [x, y, w, h] = probe_page(&browser, d.path(), &page, first);

    // The page itself (no probe), tall enough to hold the first timeline.
    let shot = d.path().join("shot.png");
    let height = (y + h + 100).min(WINDOW_HEIGHT_MAX_PX);
    let args = [
        format!("--screenshot={}", shot.display()),
        format!("--window-size={WINDOW_WIDTH_PX},{height}"),
    ];
    let o = browse(&browser, &d.path().join("p2"), &page, &args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:#?}");
    assert!(shot.is_file(), "no screenshot; stderr:\n{stderr}");
    // Only what the window shows of the timeline (it scrolls sideways when wide).
    let visible = [x, y, w.min(WINDOW_WIDTH_PX.saturating_sub(x)), h];
    let inked = inked_per_mille(&shot, visible);
    assert!(
        inked >= INKED_PER_MILLE_MIN,
        "the timeline looks blank: {inked} per mille of its pixels inked (rect {visible:?})"
    );
}
