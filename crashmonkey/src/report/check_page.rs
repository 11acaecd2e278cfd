//! The folder `crashmonkey check --out DIR` writes, as one page: what the check found
//! (`summary.json`), and per failing state its reason, the checker's output, its image, and
//! the write log it came from with the state on it (the writes it kept, dropped and tore, and
//! the crash point), drawn as `crash` draws an fs bundle's state. The log is the one
//! `summary.json` names; if it is no longer there, the page says so and draws no timeline.

use super::crash::{apply, state_view};
use super::log::{read_log, render_svg, RECORDS_DRAWN_MAX};
use super::page::{page_foot, page_head, FINDINGS_SHOWN_MAX, REPORT_TEXT_BYTES_MAX};
use super::text::{clip, esc};
use super::ReportError;
use crate::check::{CheckSummary, FailedState};
use std::fmt::Write as _;
use std::path::Path;

/// The file `check --out` writes its summary to.
pub const CHECK_SUMMARY_FILE: &str = "summary.json";

/// Whether `dir` is a `check --out` folder: a `summary.json` that reads as a check's.
pub fn is_check_folder(dir: &Path) -> bool {
    std::fs::read(dir.join(CHECK_SUMMARY_FILE))
        .ok()
        .and_then(|t| serde_json::from_slice::<CheckSummary>(&t).ok())
        .is_some()
}

/// The page of the `check --out` folder `dir`.
pub fn check_report(dir: &Path) -> Result<String, ReportError> {
    let path = dir.join(CHECK_SUMMARY_FILE);
    let text = std::fs::read(&path).map_err(|source| ReportError::Io {
        path: path.clone(),
        source,
    })?;
    let s: CheckSummary = serde_json::from_slice(&text).map_err(|e| ReportError::Bundle {
        path: path.clone(),
        what: format!("not a check summary: {e}"),
    })?;
    let mut h = page_head(&format!(
        "crashmonkey report: crash states checked, {}",
        dir.display()
    ));
    summary(&mut h, &s);
    for (n, f) in s.failures.iter().take(FINDINGS_SHOWN_MAX).enumerate() {
        failed_state(&mut h, n, f, s.log.as_deref())?;
    }
    if s.failures.len() > FINDINGS_SHOWN_MAX {
        let _ = writeln!(
            h,
            "<p class=\"warn\">{} more failing states are in the table only (at most \
             {FINDINGS_SHOWN_MAX} are shown in full).</p>",
            s.failures.len() - FINDINGS_SHOWN_MAX
        );
    }
    h.push_str(&page_foot());
    Ok(h)
}

fn summary(h: &mut String, s: &CheckSummary) {
    let log = s
        .log
        .as_ref()
        .map_or("(not recorded)".into(), |p| p.display().to_string());
    let _ = writeln!(
        h,
        "<p>A checker run over every crash state of a write log (<code>crashmonkey check \
         --out</code>): log <code>{}</code>, {} epochs, {} states ({} distinct), <b>{}</b> \
         passed, <b>{}</b> failed, in {:.1} s; state sampling seed {}.</p>",
        esc(&log),
        s.epochs,
        s.states,
        s.unique,
        s.passed,
        s.failed,
        s.seconds,
        s.seed
    );
    if let Some(i) = &s.interrupted {
        let _ = writeln!(
            h,
            "<p class=\"warn\">Stopped by {} in epoch {}: only the states counted were checked.</p>",
            esc(&i.signal),
            i.epoch
        );
    }
    if s.failures.is_empty() {
        h.push_str("<p>No state failed.</p>\n");
        return;
    }
    h.push_str("<table><tr><th>#</th><th>state</th><th>epoch</th><th>what</th><th>mark</th><th>why it failed</th></tr>\n");
    for (n, f) in s.failures.iter().enumerate() {
        let _ = writeln!(
            h,
            "<tr><td><a href=\"#state-{n}\">{n}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f.id,
            f.epoch,
            esc(&f.label),
            esc(f.mark.as_deref().unwrap_or("-")),
            esc(&clip(&f.reason, REPORT_TEXT_BYTES_MAX))
        );
    }
    h.push_str("</table>\n");
}

fn failed_state(
    h: &mut String,
    n: usize,
    f: &FailedState,
    log: Option<&Path>,
) -> Result<(), ReportError> {
    let st = &f.state;
    let _ = writeln!(
        h,
        "<section class=\"finding\" id=\"state-{n}\">\n<h2>#{n} crash state {} ({}, epoch {})</h2>\n\
         <p>{} writes of its epoch kept, {} dropped{}; failed: {}.</p>",
        f.id,
        esc(&f.label),
        f.epoch,
        st.included.len(),
        st.dropped_seqs.len(),
        if st.torn.is_some() { ", one torn" } else { "" },
        esc(&f.reason)
    );
    if let Some(img) = &f.image {
        let _ = writeln!(
            h,
            "<p>Its image: <code>{}</code></p>",
            esc(&img.display().to_string())
        );
    }
    match log {
        Some(log) if log.is_file() => timeline(h, st, log)?,
        _ => h.push_str(
            "<p class=\"warn\">The write log is not where the check read it: no timeline.</p>\n",
        ),
    }
    let _ = writeln!(
        h,
        "<details open><summary>The checker's output</summary><pre>{}</pre></details>\n</section>",
        esc(&clip(&f.output, REPORT_TEXT_BYTES_MAX))
    );
    Ok(())
}

/// The log with crash state `st` on it.
fn timeline(h: &mut String, st: &crate::states::CrashState, log: &Path) -> Result<(), ReportError> {
    let mut t = read_log(log, None)?;
    apply(&mut t, &state_view(st, log)?);
    h.push_str(
        "<h3>The crash state on the write log</h3>\n<p class=\"muted\">Writes in log order, \
         coloured by what the crash state made of them (hover for details).</p>\n",
    );
    if t.records as usize > t.items.len() {
        let _ = writeln!(
            h,
            "<p class=\"warn\">The first {} of {} records drawn (at most {RECORDS_DRAWN_MAX}).</p>",
            t.items.len(),
            t.records
        );
    }
    let _ = writeln!(h, "<div class=\"scroll\">{}</div>", render_svg(&t));
    Ok(())
}
