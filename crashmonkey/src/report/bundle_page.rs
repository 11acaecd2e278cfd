//! One bundle folder as a page: a race bundle (`race-seed-N`) as a campaign's finding is
//! shown, or an fs bundle (`fs-seed-N`): its crash state's verdict (mount error, fsck's
//! findings, the crash oracle's violations) and its write log with the crash state on it
//! (`crash`): the writes it kept, dropped and tore, the crash point, each write's role and the
//! block holding the wrong byte.

use super::crash;
use super::log::RECORDS_DRAWN_MAX;
use super::page::{operations, page_foot, page_head, race_body, text_file};
use super::text::esc;
use super::ReportError;
use crate::fscore::bundle::FsBundle;
use std::fmt::Write as _;
use std::path::Path;

/// Violations and fsck findings listed.
pub const VERDICT_LINES_MAX: usize = 32;

/// The page of the bundle folder `dir`.
pub fn bundle_report(dir: &Path) -> Result<String, ReportError> {
    let bundle_error = |e: anyhow::Error| ReportError::Bundle {
        path: dir.to_path_buf(),
        what: format!("{e:#}"),
    };
    let text =
        std::fs::read_to_string(dir.join("bundle.json")).map_err(|source| ReportError::Io {
            path: dir.join("bundle.json"),
            source,
        })?;
    let kind: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bundle_error(anyhow::anyhow!("bundle.json: {e}")))?;
    let mut h = page_head(&format!("crashmonkey report: bundle {}", dir.display()));
    if kind["kind"] == crate::fscore::bundle::FS_BUNDLE_KIND {
        let b = crate::fscore::bundle::load(dir).map_err(bundle_error)?;
        fs_body(&mut h, dir, &b)?;
    } else {
        let b = crate::race::load_bundle(dir).map_err(bundle_error)?;
        let shown = esc(&dir.display().to_string());
        let _ = writeln!(
            h,
            "<p>A race bundle: seed {}, switches: {}.</p>\n<h3>Replay</h3>\n\
             <pre>crashmonkey race --replay {shown}\n\
             crashmonkey race --replay {shown} --defaults   # the same schedule with every fix on</pre>",
            b.seed,
            esc(&crate::race::campaign::switches(&b.config))
        );
        race_body(&mut h, &b, dir)?;
    }
    h.push_str(&page_foot());
    Ok(h)
}

/// What an fs crash bundle at `dir` shows: replay commands, verdict, operations, the crash
/// state on its write log, `oracle.txt` and `fsck.txt`.
pub fn fs_body(h: &mut String, dir: &Path, b: &FsBundle) -> Result<(), ReportError> {
    let shown = esc(&dir.display().to_string());
    let _ = writeln!(
        h,
        "<p>An fs-core crash bundle: seed {} ({:?} workload), switches: {}.</p>\n\
         <h3>Replay</h3>\n<pre>crashmonkey fs campaign --replay {shown}\n\
         crashmonkey fs campaign --replay {shown} --defaults   # planted bugs off</pre>",
        b.seed,
        b.workload_kind,
        esc(&crate::race::campaign::switches(&b.config))
    );
    verdict(h, b);
    operations(h, &b.workload);
    let t = crash::bundle_log(dir, None, None)?;
    let _ = writeln!(
        h,
        "<h3>The crash state on the write log</h3>\n<p class=\"muted\">Writes in log order, \
         coloured by what the crash state made of them; the role lane says what each write \
         is in fs-core's format (hover for details).</p>"
    );
    if let Some(byte) = t.highlight {
        let _ = writeln!(
            h,
            "<p>The first violation's wrong byte is disk byte {byte} (block {}), outlined \
             where a write covers it.</p>",
            byte / fs_core::block::BLOCK_SIZE as u64
        );
    }
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
        "<div class=\"scroll\">{}</div>",
        super::log::render_svg(&t)
    );
    text_file(h, dir, "oracle.txt");
    text_file(h, dir, "fsck.txt");
    Ok(())
}

fn verdict(h: &mut String, b: &FsBundle) {
    h.push_str("<h3>What failed</h3>\n<ul>");
    let Some(v) = &b.verdict else {
        h.push_str("<li>No crash state failed: the run failed fs-core's race oracle.</li></ul>\n");
        return;
    };
    if let Some(s) = &b.state {
        let _ = write!(
            h,
            "<li>crash state {} ({}, epoch {}): {} writes of its epoch kept, {} dropped{}</li>",
            s.id,
            esc(&s.label),
            s.epoch,
            s.included.len(),
            s.dropped_seqs.len(),
            if s.torn.is_some() { ", one torn" } else { "" }
        );
    }
    if let Some(e) = &v.mount_error {
        let _ = write!(h, "<li>mount failed: {}</li>", esc(e));
    }
    for x in v.violations.iter().take(VERDICT_LINES_MAX) {
        let _ = write!(h, "<li><b>{}</b>: {}</li>", esc(&x.file), esc(&x.what));
    }
    for line in v.fsck.iter().take(VERDICT_LINES_MAX) {
        let _ = write!(h, "<li>fsck: {}</li>", esc(line));
    }
    h.push_str("</ul>\n");
}
