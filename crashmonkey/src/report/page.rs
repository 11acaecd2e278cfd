//! A campaign folder as one HTML page: the campaign, its findings most frequent first, and per
//! finding its signature, counts, seeds, replay commands, the failure, the model's notes, the
//! race timeline and the run's device IO. The page is self-contained: inline CSS and SVG, no
//! script, no font or image fetched, so it can be mailed or attached to a bug report. The
//! same folder gives the same bytes (no clock, no absolute path the caller did not give).

use super::log::{self, RECORDS_DRAWN_MAX};
use super::race::{self, MarkKind, RaceTimeline, LANES_DRAWN_MAX, STEPS_DRAWN_MAX};
use super::text::{clip, esc};
use super::ReportError;
use crate::folder::{self, CampaignFile, Finding, Findings};
use crate::race::campaign::failure_line;
use crate::race::Bundle;
use std::fmt::Write as _;
use std::path::Path;

/// Findings given a section each; the others are in the table only.
pub const FINDINGS_SHOWN_MAX: usize = 64;
/// Failures of a run listed (the first is the finding; more may follow from it).
pub const FAILURES_LISTED_MAX: usize = 5;
/// Characters of one note of the model shown.
pub const NOTE_CHARS_MAX: usize = 600;
/// Bytes of a bundle's `report.txt` included.
pub const REPORT_TEXT_BYTES_MAX: usize = 64 * 1024;
/// Operations of a workload listed.
pub const OPS_LISTED_MAX: usize = 200;

const STYLE: &str = "body{font-family:sans-serif;margin:0;color:#111;background:#fff}\
main{max-width:1400px;margin:0 auto;padding:16px 24px}\
h1{font-size:1.5em}h2{font-size:1.25em;border-top:2px solid #ddd;padding-top:12px;margin-top:32px}\
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}\
code,pre{font-family:monospace;font-size:0.9em}pre{background:#f6f8fa;padding:8px;overflow-x:auto;white-space:pre-wrap}\
.scroll{overflow-x:auto;border:1px solid #ddd;margin:8px 0}.warn{color:#b45309;font-weight:bold}\
.muted{color:#555}dt{font-weight:bold;margin-top:4px}dd{margin-left:16px}";

/// The start of a page titled `title`, to its `<h1>`.
pub fn page_head(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title>\
         <style>{STYLE}</style></head><body><main>\n<h1>{}</h1>\n",
        esc(title),
        esc(title)
    )
}

/// The end of a page.
pub fn page_foot() -> String {
    format!(
        "<p class=\"muted\">Made by crashmonkey report {} (docs/campaigns.md).</p>\n</main></body></html>\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The report of `dir`: a campaign folder, a `check --out` folder, or one bundle folder
/// (`race-seed-N`, `fs-seed-N`).
pub fn report(dir: &Path) -> Result<String, ReportError> {
    if super::kernel_page::is_kernel_folder(dir) {
        return super::kernel_page::kernel_report(dir);
    }
    if !dir.join(folder::CAMPAIGN_FILE).exists() && dir.join("bundle.json").is_file() {
        return super::bundle_page::bundle_report(dir);
    }
    if !dir.join(folder::CAMPAIGN_FILE).exists() && super::check_page::is_check_folder(dir) {
        return super::check_page::check_report(dir);
    }
    campaign_report(dir)
}

/// The report of the campaign folder `dir`, as HTML.
pub fn campaign_report(dir: &Path) -> Result<String, ReportError> {
    let found = folder::findings(dir)?;
    let campaign = CampaignFile::read(dir)?;
    let mut h = page_head(&format!("crashmonkey report: {}", dir.display()));
    summary(&mut h, &found, campaign.as_ref());
    for (n, f) in found.findings.iter().take(FINDINGS_SHOWN_MAX).enumerate() {
        finding(&mut h, dir, n, f)?;
    }
    if found.findings.len() > FINDINGS_SHOWN_MAX {
        let _ = writeln!(
            h,
            "<p class=\"warn\">{} more findings are in the table only (at most \
             {FINDINGS_SHOWN_MAX} are shown in full).</p>",
            found.findings.len() - FINDINGS_SHOWN_MAX
        );
    }
    h.push_str(&page_foot());
    Ok(h)
}

fn summary(h: &mut String, f: &Findings, campaign: Option<&CampaignFile>) {
    let what = match campaign {
        Some(CampaignFile::Race { params, .. }) => format!(
            "A race campaign: seeds from {}, {} runs, shard {}; switches: {}.",
            params.seed,
            params.runs,
            params.shard,
            crate::race::campaign::switches(&params.config)
        ),
        Some(CampaignFile::Fs { params, .. }) => format!(
            "An fs crash campaign ({:?} workloads): seeds from {}, {} runs, shard {}; every \
             crash state of each run's write log mounted, fsck'd and judged; switches: {}.",
            params.workload,
            params.seed,
            params.runs,
            params.shard,
            crate::race::campaign::switches(&params.config)
        ),
        _ => "A folder merged from other campaign folders (crashmonkey findings merge).".into(),
    };
    let _ = writeln!(
        h,
        "<p>{}</p>\n<p><b>{}</b> runs recorded, <b>{}</b> failing, <b>{}</b> distinct findings \
         (a finding is every failing run with one failure signature).</p>",
        esc(&what),
        f.runs,
        f.failing_runs,
        f.findings.len()
    );
    if f.findings.is_empty() {
        h.push_str("<p>No finding: every recorded run passed.</p>\n");
        return;
    }
    h.push_str(
        "<table><tr><th>#</th><th>failing runs</th><th>kind</th><th>violation</th>\
         <th>data lost by</th><th>first seed</th><th>smallest seed (steps)</th></tr>\n",
    );
    for (n, x) in f.findings.iter().enumerate() {
        let anchor = if n < FINDINGS_SHOWN_MAX {
            format!("<a href=\"#finding-{n}\">{n}</a>")
        } else {
            n.to_string()
        };
        let _ = writeln!(
            h,
            "<tr><td>{anchor}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ({})</td></tr>",
            x.count,
            esc(&x.kind),
            esc(&x.violation),
            esc(&x.lost_by),
            x.first_seed,
            x.smallest_seed,
            x.smallest_steps
        );
    }
    h.push_str("</table>\n");
}

fn finding(h: &mut String, dir: &Path, n: usize, f: &Finding) -> Result<(), ReportError> {
    let path = dir.join(&f.bundle);
    if folder::is_fs_signature(&f.signature) {
        return fs_finding(h, dir, n, f);
    }
    let b = crate::race::load_bundle(&path).map_err(|e| ReportError::Bundle {
        path: path.clone(),
        what: format!("{e:#}"),
    })?;
    let _ = writeln!(
        h,
        "<section class=\"finding\" id=\"finding-{n}\">\n<h2>#{n} {}: {}, data lost by {}</h2>",
        esc(&f.kind),
        esc(&f.violation),
        esc(&f.lost_by)
    );
    facts(h, dir, f, "race");
    race_body(h, &b, &path)?;
    h.push_str("</section>\n");
    Ok(())
}

/// An fs campaign's finding: its facts, then its smallest run's crash bundle drawn as
/// `bundle_page` draws one (verdict, operations, the crash state on the write log).
fn fs_finding(h: &mut String, dir: &Path, n: usize, f: &Finding) -> Result<(), ReportError> {
    let path = dir.join(&f.bundle);
    let b = crate::fscore::bundle::load(&path).map_err(|e| ReportError::Bundle {
        path: path.clone(),
        what: format!("{e:#}"),
    })?;
    let _ = writeln!(
        h,
        "<section class=\"finding\" id=\"finding-{n}\">\n<h2>#{n} {}: {}, promise of {}</h2>",
        esc(&f.kind),
        esc(&f.violation),
        esc(&f.lost_by)
    );
    facts(h, dir, f, "fs campaign");
    if let Some(m) = &f.minimised_state {
        let _ = writeln!(
            h,
            "<p>Smallest reproducer: the crash state minimised in {} checks to {} writes of \
             its epoch kept whole (was {}), {} torn (was {}): <code>{}</code>.</p>",
            m.checks,
            m.after.kept,
            m.before.kept,
            m.after.torn,
            m.before.torn,
            esc(&dir.join(&m.bundle).display().to_string())
        );
    }
    super::bundle_page::fs_body(h, &path, &b)?;
    h.push_str("</section>\n");
    Ok(())
}

/// What a race bundle at `path` shows: its failures, operations, notes, timeline, device IO
/// and `report.txt`.
pub fn race_body(h: &mut String, b: &Bundle, path: &Path) -> Result<(), ReportError> {
    let ops: Vec<&fs_core::Op> = b.workload.ops().collect();
    h.push_str("<h3>What failed</h3>\n<ul>");
    for x in b.failures.iter().take(FAILURES_LISTED_MAX) {
        let _ = write!(h, "<li>{}</li>", esc(&failure_line(x, &ops)));
    }
    h.push_str("</ul>\n");
    operations(h, &b.workload);
    let t = race::timeline(b);
    notes(h, &t);
    timeline(h, &t);
    device_log(h, path)?;
    text_file(h, path, "report.txt");
    Ok(())
}

/// A finding's signature, counts, seeds, bundles and replay commands (`crashmonkey
/// {command} --replay`).
fn facts(h: &mut String, dir: &Path, f: &Finding, command: &str) {
    let more = f.count.saturating_sub(f.seeds.len() as u64);
    let seeds: Vec<String> = f.seeds.iter().map(u64::to_string).collect();
    let bundle = dir.join(&f.bundle).display().to_string();
    let _ = writeln!(
        h,
        "<dl><dt>signature</dt><dd><code>{}</code></dd>\
         <dt>failing runs</dt><dd>{}</dd>\
         <dt>seeds</dt><dd>{}{}</dd>\
         <dt>first failing run</dt><dd>seed {} (<code>{}</code>)</dd>\
         <dt>smallest failing run</dt><dd>seed {}, {} steps (<code>{}</code>)</dd>\
         <dt>switches</dt><dd><code>{}</code></dd></dl>\n\
         <h3>Replay</h3>\n<pre>crashmonkey {command} --replay {}\n\
         crashmonkey {command} --replay {} --defaults   # the same schedule with every fix on</pre>",
        esc(&f.signature),
        f.count,
        seeds.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        },
        f.first_seed,
        esc(&dir.join(&f.first_bundle).display().to_string()),
        f.smallest_seed,
        f.smallest_steps,
        esc(&bundle),
        esc(&f.switches),
        esc(&bundle),
        esc(&bundle)
    );
}

/// The workload's operations, by phase.
pub fn operations(h: &mut String, w: &fs_core::Workload) {
    h.push_str(
        "<h3>Operations</h3>\n<p class=\"muted\">Those of one phase race each other; a phase \
         starts when the one before returned.</p>\n<ol start=\"0\">",
    );
    let mut i = 0;
    for (p, phase) in w.phases.iter().enumerate() {
        for op in phase {
            if i < OPS_LISTED_MAX {
                let _ = write!(
                    h,
                    "<li>op{i} (phase {p}): <code>{}</code></li>",
                    esc(&op.to_string())
                );
            }
            i += 1;
        }
    }
    h.push_str("</ol>\n");
    if i > OPS_LISTED_MAX {
        let _ = writeln!(
            h,
            "<p class=\"warn\">{} more operations not listed (at most {OPS_LISTED_MAX}).</p>",
            i - OPS_LISTED_MAX
        );
    }
}

fn notes(h: &mut String, t: &RaceTimeline) {
    h.push_str("<h3>What the model saw go wrong</h3>\n");
    if !t.replay_agrees {
        h.push_str(
            "<p class=\"warn\">Replaying this bundle did not give the failures it records \
             (the model changed since it was written): the notes and marks below are the \
             replay's.</p>\n",
        );
    }
    if t.notes.is_empty() {
        h.push_str("<p>The model made no note on this run.</p>\n");
        return;
    }
    h.push_str("<ol>");
    for n in &t.notes {
        let at = n
            .step
            .map_or("step not found".into(), |s| format!("step {s}"));
        let _ = write!(h, "<li>[{at}] {}</li>", esc(&clip(&n.text, NOTE_CHARS_MAX)));
    }
    h.push_str("</ol>\n");
}

fn timeline(h: &mut String, t: &RaceTimeline) {
    let (start, end) = t.window;
    let _ = writeln!(
        h,
        "<h3>Timeline</h3>\n<p class=\"muted\">A lane per task, a box per step in schedule \
         order (hover for the step's yield point and argument).</p>"
    );
    if end - start < t.steps.len() {
        let _ = writeln!(
            h,
            "<p class=\"warn\">Steps {start} to {} of {} drawn (at most {STEPS_DRAWN_MAX} per \
             timeline, ending after the last marked step).</p>",
            end.saturating_sub(1),
            t.steps.len()
        );
    }
    if t.lanes_left_out > 0 {
        let _ = writeln!(
            h,
            "<p class=\"warn\">{} lanes with steps in this window not drawn (at most \
             {LANES_DRAWN_MAX}; those with marks and the busiest are drawn).</p>",
            t.lanes_left_out
        );
    }
    let _ = writeln!(h, "<div class=\"scroll\">{}</div>", race::render_svg(t));
    if t.marks.is_empty() {
        return;
    }
    h.push_str("<table><tr><th>step</th><th>task</th><th>mark</th><th>what</th></tr>\n");
    for m in &t.marks {
        let s = &t.steps[m.step];
        let (_, kind) = race::mark_style(m.kind);
        let lane = race::LaneKey::of(s.task, t.ops);
        let task = t
            .lanes
            .iter()
            .find(|l| l.key == lane)
            .map_or(String::new(), |l| l.name.clone());
        let strong = matches!(m.kind, MarkKind::WrongByte | MarkKind::UsedStale);
        let what = if strong {
            format!("<b>{}</b>", esc(&m.what))
        } else {
            esc(&m.what)
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{what}</td></tr>",
            m.step,
            esc(&task),
            esc(kind)
        );
    }
    h.push_str("</table>\n");
}

fn device_log(h: &mut String, bundle: &Path) -> Result<(), ReportError> {
    let path = bundle.join("device.log");
    if !path.is_file() {
        return Ok(());
    }
    let t = log::read_log(&path, None)?;
    let _ = writeln!(
        h,
        "<details open><summary>The run's device IO (<code>{}</code>): epochs, writes, \
         flushes, FUA, marks</summary>",
        esc(&path.display().to_string())
    );
    if t.records as usize > t.items.len() {
        let _ = writeln!(
            h,
            "<p class=\"warn\">The first {} of {} records drawn (at most {RECORDS_DRAWN_MAX}).</p>",
            t.items.len(),
            t.records
        );
    }
    let _ = writeln!(
        h,
        "<div class=\"scroll\">{}</div></details>",
        log::render_svg(&t)
    );
    Ok(())
}

/// The text file `name` of a bundle, folded (at most `REPORT_TEXT_BYTES_MAX` bytes).
pub fn text_file(h: &mut String, bundle: &Path, name: &str) {
    let Ok(text) = std::fs::read(bundle.join(name)) else {
        return;
    };
    let cut = text.len() > REPORT_TEXT_BYTES_MAX;
    let text = String::from_utf8_lossy(&text[..text.len().min(REPORT_TEXT_BYTES_MAX)]).into_owned();
    let _ = writeln!(
        h,
        "<details><summary>The bundle's {}{}</summary><pre>{}</pre></details>",
        esc(name),
        if cut {
            format!(" (its first {REPORT_TEXT_BYTES_MAX} bytes)")
        } else {
            String::new()
        },
        esc(&text)
    );
}
