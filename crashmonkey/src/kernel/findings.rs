//! The findings of a kernel campaign folder (`crashmonkey kernel --out DIR`) or of an
//! application run's folder (`crashmonkey run --out DIR`), read back for `crashmonkey
//! findings DIR` and `crashmonkey report DIR`: the index (`findings.jsonl`, a line per
//! failing state) grouped by signature, each finding with its bundle, checked to be there.
//! The bundles and the index are the truth; nothing else is derived from them.

use std::path::{Path, PathBuf};

use super::KernelError;

/// Lines of `findings.jsonl` read, at most.
pub const INDEX_LINES_MAX: usize = 1_000_000;
/// Bytes of a bundle's report (`report.txt`, `output.txt`) kept with a finding.
pub const REPORT_EXCERPT_BYTES_MAX: usize = 8 * 1024;

/// One finding: every failing state with one signature.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelFinding {
    pub signature: String,
    /// Failing states with this signature.
    pub count: u64,
    /// The index line of its first failing state (workload, mark, state, ...).
    pub first: serde_json::Value,
    /// The bundle, relative to the folder.
    pub bundle: String,
    /// The command that shows it again (the bundle README's first code block).
    pub again: String,
    /// The head of the bundle's `report.txt` (kernel) or `output.txt` (run).
    pub report: String,
}

/// What a kernel or application folder found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelFindings {
    /// `kernel` or `app`.
    pub kind: String,
    pub params: serde_json::Value,
    /// Workloads with a done record (kernel campaigns; 1 for a run).
    pub workloads: u64,
    pub failing_states: u64,
    /// Most frequent first, then by signature.
    pub findings: Vec<KernelFinding>,
}

/// The kind of `dir`'s `campaign.json` when it is a kernel campaign's or a run's.
pub fn folder_kind(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("campaign.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let kind = v["kind"].as_str()?;
    matches!(kind, "kernel" | "app").then(|| kind.to_owned())
}

fn bad(path: &Path, what: impl std::fmt::Display) -> KernelError {
    KernelError::Setup(format!("{}: {what}", path.display()))
}

/// Reads the findings of the kernel or application folder `dir`; a bundle the index names
/// that is not there is an error (a damaged folder).
pub fn read(dir: &Path) -> Result<KernelFindings, KernelError> {
    let kind = folder_kind(dir).ok_or_else(|| bad(dir, "not a kernel campaign or run folder"))?;
    let camp = dir.join("campaign.json");
    let text =
        std::fs::read_to_string(&camp).map_err(KernelError::io(camp.display().to_string()))?;
    let params = serde_json::from_str::<serde_json::Value>(&text).map_err(|e| bad(&camp, e))?
        ["params"]
        .clone();
    let mut out = KernelFindings {
        workloads: if kind == "app" { 1 } else { done_records(dir)? },
        kind,
        params,
        failing_states: 0,
        findings: Vec::new(),
    };
    for line in index_lines(dir)? {
        out.failing_states += 1;
        let sig = line["signature"].as_str().unwrap_or_default().to_owned();
        match out.findings.iter_mut().find(|f| f.signature == sig) {
            Some(f) => f.count += 1,
            None => out.findings.push(finding(dir, sig, line)?),
        }
    }
    out.findings
        .sort_by(|a, b| b.count.cmp(&a.count).then(a.signature.cmp(&b.signature)));
    Ok(out)
}

/// The lines of `dir/findings.jsonl` (none when it is missing: nothing failed).
fn index_lines(dir: &Path) -> Result<Vec<serde_json::Value>, KernelError> {
    let path = dir.join("findings.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(KernelError::io(path.display().to_string())(e)),
    };
    let mut lines = Vec::new();
    for (n, l) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        if n >= INDEX_LINES_MAX {
            return Err(bad(&path, format!("more than {INDEX_LINES_MAX} lines")));
        }
        let v: serde_json::Value =
            serde_json::from_str(l).map_err(|e| bad(&path, format!("line {}: {e}", n + 1)))?;
        if !v["signature"].is_string() || !v["bundle"].is_string() {
            return Err(bad(
                &path,
                format!("line {}: no signature or bundle", n + 1),
            ));
        }
        lines.push(v);
    }
    Ok(lines)
}

/// The done records of a kernel campaign.
fn done_records(dir: &Path) -> Result<u64, KernelError> {
    let done = dir.join("done");
    match std::fs::read_dir(&done) {
        Ok(d) => Ok(d
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .count() as u64),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(KernelError::io(done.display().to_string())(e)),
    }
}

/// A new finding from its first index line; its bundle must be there.
fn finding(
    dir: &Path,
    signature: String,
    first: serde_json::Value,
) -> Result<KernelFinding, KernelError> {
    let bundle = first["bundle"].as_str().unwrap_or_default().to_owned();
    let plain =
        !bundle.is_empty() && !bundle.contains('/') && bundle != ".." && !bundle.starts_with('.');
    let path: PathBuf = dir.join("findings").join(&bundle);
    if !plain || !path.join("README.md").is_file() {
        return Err(bad(&path, "the bundle the index names is not there"));
    }
    let readme = std::fs::read_to_string(path.join("README.md"))
        .map_err(KernelError::io(path.display().to_string()))?;
    let report = ["report.txt", "output.txt"]
        .iter()
        .find_map(|f| std::fs::read_to_string(path.join(f)).ok())
        .unwrap_or_default();
    let mut report = report;
    report.truncate(report.floor_char_boundary(REPORT_EXCERPT_BYTES_MAX));
    Ok(KernelFinding {
        signature,
        count: 1,
        first,
        bundle: format!("findings/{bundle}"),
        again: first_code_block(&readme),
        report,
    })
}

/// The first fenced code block of a README, trimmed.
fn first_code_block(readme: &str) -> String {
    let mut parts = readme.split("```");
    parts.next();
    parts.next().unwrap_or_default().trim().to_owned()
}
