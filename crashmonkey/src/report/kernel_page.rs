//! A kernel campaign's folder (`crashmonkey kernel --out`) or an application run's folder
//! (`crashmonkey run --out`) as one page: its parameters, its findings by signature (most
//! frequent first) and, per finding, its first failing state, its bundle, the command that
//! shows it again and the head of its report (broken claims, the kernel's and fsck's words,
//! or the checker's output). Read through [`crate::kernel::findings`].

use super::page::{page_foot, page_head, FINDINGS_SHOWN_MAX, REPORT_TEXT_BYTES_MAX};
use super::text::{clip, esc};
use super::ReportError;
use crate::kernel::findings::{read, KernelFinding, KernelFindings};
use std::fmt::Write as _;
use std::path::Path;

/// Whether `dir` is a kernel campaign's or a run's folder.
pub fn is_kernel_folder(dir: &Path) -> bool {
    crate::kernel::findings::folder_kind(dir).is_some()
}

/// The page of the kernel campaign or run folder `dir`.
pub fn kernel_report(dir: &Path) -> Result<String, ReportError> {
    let f = read(dir).map_err(|e| ReportError::Bundle {
        path: dir.to_path_buf(),
        what: e.to_string(),
    })?;
    let what = if f.kind == "app" {
        "application run"
    } else {
        "kernel campaign"
    };
    let mut h = page_head(&format!("crashmonkey report: {what}, {}", dir.display()));
    summary(&mut h, &f, what);
    for (n, x) in f.findings.iter().take(FINDINGS_SHOWN_MAX).enumerate() {
        finding(&mut h, dir, n, x);
    }
    if f.findings.len() > FINDINGS_SHOWN_MAX {
        let _ = writeln!(
            h,
            "<p class=\"warn\">{} more findings are in the table only (at most \
             {FINDINGS_SHOWN_MAX} are shown in full).</p>",
            f.findings.len() - FINDINGS_SHOWN_MAX
        );
    }
    h.push_str(&page_foot());
    Ok(h)
}

fn summary(h: &mut String, f: &KernelFindings, what: &str) {
    let params = serde_json::to_string_pretty(&f.params).unwrap_or_default();
    let _ = writeln!(
        h,
        "<p>A {what} (docs/kernel-campaigns.md): {} workloads, <b>{}</b> failing states, \
         <b>{}</b> distinct findings.</p>\n<pre>{}</pre>",
        f.workloads,
        f.failing_states,
        f.findings.len(),
        esc(&clip(&params, REPORT_TEXT_BYTES_MAX))
    );
    if f.findings.is_empty() {
        h.push_str("<p>No state failed.</p>\n");
        return;
    }
    h.push_str("<table><tr><th>#</th><th>failing states</th><th>signature</th></tr>\n");
    for (n, x) in f.findings.iter().enumerate() {
        let _ = writeln!(
            h,
            "<tr><td><a href=\"#finding-{n}\">{n}</a></td><td>{}</td><td>{}</td></tr>",
            x.count,
            esc(&x.signature)
        );
    }
    h.push_str("</table>\n");
}

fn finding(h: &mut String, dir: &Path, n: usize, x: &KernelFinding) {
    let first = &x.first;
    let _ = writeln!(
        h,
        "<h2 id=\"finding-{n}\">#{n} {}</h2>\n<p>{} failing states; the first: {} at mark \
         <code>{}</code>, the {} state. Bundle <code>{}</code>; shows it again (in the \
         bundle, root):</p>\n<pre>{}</pre>\n<pre>{}</pre>",
        esc(&x.signature),
        x.count,
        esc(first["workload"].as_str().unwrap_or("the run")),
        esc(first["mark"].as_str().unwrap_or_default()),
        esc(first["state"].as_str().unwrap_or_default()),
        esc(&dir.join(&x.bundle).display().to_string()),
        esc(&x.again),
        esc(&clip(&x.report, REPORT_TEXT_BYTES_MAX))
    );
}
