//! `crashmonkey findings merge OUT DIR...` for kernel campaign folders: the folders of one
//! campaign's shards (`crashmonkey kernel --shard K/N --out DIR`) made into the folder the
//! unsharded campaign would have written.
//!
//! Workloads run in the order of their names (ACE's `seq1-NNNN` and `seq2-S-NNNN` are
//! numbered in campaign order; workload files run sorted by name), and a kernel campaign
//! writes a finding's bundle from its first failing state in that order. So the merge:
//! - refuses folders of different campaigns (their `campaign.json` must be the same) and an
//!   `OUT` that holds anything;
//! - keeps each workload's done record from the first folder given that holds it, and the
//!   index lines of that folder for it;
//! - orders the index by workload name (a workload's own lines keep their order);
//! - keeps, per signature, the bundle of the folder that holds its first line, with a
//!   `more.txt` listing the signature's other failing states;
//! - copies `campaign.json` and the first folder's `base.img` (any shard's is a formatted
//!   base of the same filesystem), so that the kernel command run on `OUT` resumes it:
//!   workloads no shard checked run then, and the others are skipped.
//!
//! `OUT` is built in a temporary folder beside it and renamed into place at the end: an
//! error or an interruption leaves no half-merged folder.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::findings::{folder_kind, read, KernelFindings};
use super::KernelError;

fn refused(what: String) -> KernelError {
    KernelError::Setup(what)
}

/// One index line, with the folder it came from.
struct Line {
    from: usize,
    workload: String,
    signature: String,
    value: serde_json::Value,
}

/// Merges the kernel campaign folders `dirs` into the new folder `out`. See the module docs.
pub fn merge(out: &Path, dirs: &[PathBuf]) -> Result<KernelFindings, KernelError> {
    let campaign = same_campaign(dirs)?;
    refuse_nonempty(out)?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".kernel-merge-")
        .tempdir_in(&parent)
        .map_err(KernelError::at(&parent))?;
    let at = tmp.path();
    for sub in ["done", "findings"] {
        std::fs::create_dir_all(at.join(sub)).map_err(KernelError::at(at))?;
    }
    std::fs::write(at.join("campaign.json"), campaign).map_err(KernelError::at(at))?;
    let base = dirs[0].join("base.img");
    if base.is_file() {
        super::crash::sparse_copy(&base, &at.join("base.img"))?;
    }
    let owner = copy_done(dirs, at)?;
    let lines = index_lines(dirs, &owner)?;
    write_index_and_bundles(dirs, at, &lines)?;
    if out.exists() {
        std::fs::remove_dir(out).map_err(KernelError::at(out))?;
    }
    std::fs::rename(at, out).map_err(KernelError::at(out))?;
    // The rename moved the folder: nothing is left for the guard to remove.
    let _ = tmp.keep();
    read(out)
}

/// The `campaign.json` all of `dirs` share; folders of other kinds or campaigns are refused.
fn same_campaign(dirs: &[PathBuf]) -> Result<String, KernelError> {
    let first = dirs
        .first()
        .ok_or_else(|| refused("give at least one folder to merge".into()))?;
    let mut want: Option<(String, serde_json::Value)> = None;
    for d in dirs {
        if folder_kind(d).as_deref() != Some("kernel") {
            return Err(refused(format!(
                "{}: not a kernel campaign folder (only those merge with kernel folders)",
                d.display()
            )));
        }
        // Each folder must be sound: every bundle its index names is there.
        read(d)?;
        let file = d.join("campaign.json");
        let text = std::fs::read_to_string(&file).map_err(KernelError::at(&file))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| refused(format!("{}: {e}", file.display())))?;
        match &want {
            None => want = Some((text, v)),
            Some((_, w)) if *w == v => {}
            Some((_, w)) => {
                return Err(refused(format!(
                    "{} holds another campaign than {} ({} against {}): only the shards of \
                     one campaign merge",
                    d.display(),
                    first.display(),
                    v["params"],
                    w["params"]
                )))
            }
        }
    }
    Ok(want.expect("one folder at least").0)
}

/// `out` must not exist or be an empty folder: a merge never writes over anything.
fn refuse_nonempty(out: &Path) -> Result<(), KernelError> {
    match std::fs::read_dir(out).map(|mut d| d.next().is_none()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(refused(format!(
            "{} is not empty: give a new folder to merge into",
            out.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KernelError::at(out)(e)),
    }
}

/// Copies each workload's done record from the first folder that holds one; returns, by
/// workload, the index of that folder.
fn copy_done(dirs: &[PathBuf], at: &Path) -> Result<BTreeMap<String, usize>, KernelError> {
    let mut owner = BTreeMap::new();
    for (i, d) in dirs.iter().enumerate() {
        let done = d.join("done");
        let entries = match std::fs::read_dir(&done) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KernelError::at(&done)(e)),
        };
        let mut names: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        for p in names {
            let name = p
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if owner.contains_key(&name) {
                continue;
            }
            let target = at.join("done").join(p.file_name().unwrap_or_default());
            std::fs::copy(&p, &target).map_err(KernelError::at(&p))?;
            owner.insert(name, i);
        }
    }
    Ok(owner)
}

/// The index lines of every folder for the workloads it owns, in workload order.
fn index_lines(
    dirs: &[PathBuf],
    owner: &BTreeMap<String, usize>,
) -> Result<Vec<Line>, KernelError> {
    let mut lines = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let path = d.join("findings.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KernelError::at(&path)(e)),
        };
        for (n, l) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
            let value: serde_json::Value = serde_json::from_str(l)
                .map_err(|e| refused(format!("{}: line {}: {e}", path.display(), n + 1)))?;
            let workload = value["workload"].as_str().unwrap_or_default().to_owned();
            let signature = value["signature"].as_str().unwrap_or_default().to_owned();
            if owner.get(&workload) == Some(&i) {
                lines.push(Line {
                    from: i,
                    workload,
                    signature,
                    value,
                });
            }
        }
    }
    // Stable: a workload's lines keep the order its folder wrote them in.
    lines.sort_by(|a, b| a.workload.cmp(&b.workload));
    Ok(lines)
}

/// Writes `findings.jsonl` and, per signature, the bundle of its first line's folder with a
/// `more.txt` of its other failing states.
fn write_index_and_bundles(dirs: &[PathBuf], at: &Path, lines: &[Line]) -> Result<(), KernelError> {
    let mut index = String::new();
    let mut bundled = BTreeSet::new();
    for l in lines {
        index.push_str(&format!("{}\n", l.value));
        let bundle = l.value["bundle"].as_str().unwrap_or_default();
        let plain = !bundle.is_empty() && !bundle.contains('/') && !bundle.starts_with('.');
        if !plain {
            return Err(refused(format!(
                "{}: an index line names the bundle {bundle:?}, not a bundle folder",
                dirs[l.from].display()
            )));
        }
        let target = at.join("findings").join(bundle);
        if bundled.insert(l.signature.clone()) {
            copy_bundle(&dirs[l.from].join("findings").join(bundle), &target)?;
            continue;
        }
        let who = format!(
            "{} mark {} ({} state)\n",
            l.workload,
            l.value["mark"].as_str().unwrap_or_default(),
            l.value["state"].as_str().unwrap_or_default()
        );
        super::folder::append(&target.join("more.txt"), &who)?;
    }
    let path = at.join("findings.jsonl");
    if !index.is_empty() {
        std::fs::write(&path, index).map_err(KernelError::at(&path))?;
    }
    Ok(())
}

/// Copies a bundle folder's files but its `more.txt` (the merge writes its own).
fn copy_bundle(from: &Path, to: &Path) -> Result<(), KernelError> {
    if !from.join("README.md").is_file() {
        return Err(refused(format!(
            "{}: the bundle the index names is not there",
            from.display()
        )));
    }
    std::fs::create_dir_all(to).map_err(KernelError::at(to))?;
    for e in std::fs::read_dir(from).map_err(KernelError::at(from))? {
        let p = e.map_err(KernelError::at(from))?.path();
        let name = p.file_name().unwrap_or_default();
        if name == "more.txt" || !p.is_file() {
            continue;
        }
        if name == "state.img" {
            super::crash::sparse_copy(&p, &to.join(name))?;
        } else {
            std::fs::copy(&p, to.join(name)).map_err(KernelError::at(&p))?;
        }
    }
    Ok(())
}
