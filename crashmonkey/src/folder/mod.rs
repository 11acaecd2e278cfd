//! Campaign folders (`--out DIR`): what a campaign did and found, kept so that it can be
//! resumed, merged with its shards' and read back (docs/campaigns.md).
//!
//! The truth is in files: `campaign.json` (the campaign's parameters), `runs/` (a record
//! per stretch of runs done, with the tallies of what failed in it, `record`) and one bundle
//! per finding's first and smallest failing run (`race-seed-N/`, the smallest's with its
//! minimised run inside when the campaign minimised, `minimised`). The `sled` index in
//! `index/` is derived from them (`index`) and can be rebuilt (`reindex`). Findings are
//! failing runs grouped by failure signature (`signature`).

pub mod campaign;
pub mod fs_campaign;
pub mod index;
pub mod ledger;
pub mod minimised;
pub mod record;
pub mod signature;

use record::{Record, Tally};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Format of `campaign.json`.
pub const CAMPAIGN_FORMAT: u32 = 1;
/// The campaign's parameters, in the folder.
pub const CAMPAIGN_FILE: &str = "campaign.json";
/// Bundles a finding keeps: its first failing run's and its smallest's (one if they are the
/// same run). Disk use is this many bundles per finding, plus one record per stretch of runs.
pub const BUNDLES_PER_FINDING_MAX: usize = 2;

/// Why a campaign folder could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FolderError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "the index of {} is damaged or out of date ({what}); rebuild it from the bundles and \
         run records: crashmonkey findings reindex {}",
        dir.display(),
        dir.display()
    )]
    Index { dir: PathBuf, what: String },
    #[error("{} is in use by another crashmonkey process (its index is locked)", dir.display())]
    InUse { dir: PathBuf },
    #[error(
        "{} holds another campaign ({differences}); rerun that command to resume it, or give \
         another --out",
        dir.display()
    )]
    OtherCampaign { dir: PathBuf, differences: String },
    #[error("{}: {what}", dir.display())]
    Refused { dir: PathBuf, what: String },
}

impl FolderError {
    pub fn io(path: &Path, source: std::io::Error) -> FolderError {
        FolderError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn corrupt(path: &Path, what: impl Into<String>) -> FolderError {
        FolderError::Corrupt {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// A race campaign's parameters: what decides which runs it makes and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaceParams {
    pub seed: u64,
    pub runs: u64,
    pub config: fs_core::Config,
    pub max_failures: u64,
    /// `K/N`.
    pub shard: String,
}

/// An fs crash campaign's parameters (`crashmonkey fs campaign --out DIR`): what decides
/// which runs it makes and how (not `--jobs`: the results are the same on any number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsParams {
    pub seed: u64,
    pub runs: u64,
    pub workload: crate::fscore::workload::WorkloadKind,
    pub config: fs_core::Config,
    pub states: crate::states::StateOptions,
    pub max_failures: u64,
    /// `K/N`.
    pub shard: String,
}

impl FsParams {
    /// The campaign's id, as [`RaceParams::id`]: every shard of one campaign has the same.
    pub fn id(&self) -> String {
        id_of(&FsParams {
            shard: String::new(),
            ..self.clone()
        })
    }
}

/// The first 16 hex digits of the blake3 hash of `params` as JSON.
fn id_of(params: &impl Serialize) -> String {
    let json = serde_json::to_string(params).expect("parameters serialize");
    blake3::hash(json.as_bytes()).to_hex()[..16].to_string()
}

/// The parameters of `a` that differ from `b`'s, in words (the switches one by one): `a`'s
/// value is said to be "there" (in the folder), `b`'s "here" (given now).
fn differences(a: &impl Serialize, b: &impl Serialize) -> String {
    let flat = |p: serde_json::Value| {
        let mut out: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        for (k, x) in p.as_object().into_iter().flatten() {
            match x.as_object() {
                Some(inner) if k == "config" || k == "states" => {
                    let what = if k == "config" { "switch" } else { "states" };
                    for (ik, ix) in inner {
                        out.insert(format!("{what} {ik}"), ix.clone());
                    }
                }
                _ => drop(out.insert(k.clone(), x.clone())),
            }
        }
        out
    };
    let there = flat(serde_json::to_value(a).expect("parameters serialize"));
    let here = flat(serde_json::to_value(b).expect("parameters serialize"));
    let null = serde_json::Value::Null;
    let keys: BTreeSet<&String> = there.keys().chain(here.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (there.get(k).unwrap_or(&null), here.get(k).unwrap_or(&null));
            (x != y).then(|| format!("{k} {x} there, {y} here"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What `campaign.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CampaignFile {
    /// A folder a race campaign writes (and resumes).
    Race { format: u32, params: RaceParams },
    /// A folder an fs crash campaign writes (and resumes).
    Fs { format: u32, params: FsParams },
    /// A folder `crashmonkey findings merge` made: findings only, nothing to resume.
    Merged { format: u32 },
}

impl CampaignFile {
    pub fn read(dir: &Path) -> Result<Option<CampaignFile>, FolderError> {
        let path = dir.join(CAMPAIGN_FILE);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(FolderError::io(&path, e)),
        };
        let f: CampaignFile = serde_json::from_slice(&text)
            .map_err(|e| FolderError::corrupt(&path, format!("not a campaign file: {e}")))?;
        let (CampaignFile::Race { format, .. }
        | CampaignFile::Fs { format, .. }
        | CampaignFile::Merged { format }) = &f;
        if *format != CAMPAIGN_FORMAT {
            return Err(FolderError::corrupt(
                &path,
                format!("format {format}, this build reads {CAMPAIGN_FORMAT}"),
            ));
        }
        Ok(Some(f))
    }

    pub fn write(&self, dir: &Path) -> Result<(), FolderError> {
        let text = serde_json::to_string_pretty(self).expect("campaign file serializes");
        record::write_atomically(&dir.join(CAMPAIGN_FILE), text.as_bytes())
    }

    /// The command that makes such a folder, in words.
    pub fn what(&self) -> &'static str {
        match self {
            CampaignFile::Race { .. } => "a race campaign (crashmonkey race --out)",
            CampaignFile::Fs { .. } => "an fs campaign (crashmonkey fs campaign --out)",
            CampaignFile::Merged { .. } => "a merged folder (crashmonkey findings merge)",
        }
    }

    /// How `self` (the folder's) differs from `other` (the command's), in words.
    pub fn differences(&self, other: &CampaignFile) -> String {
        match (self, other) {
            (CampaignFile::Race { params: a, .. }, CampaignFile::Race { params: b, .. }) => {
                differences(a, b)
            }
            (CampaignFile::Fs { params: a, .. }, CampaignFile::Fs { params: b, .. }) => {
                differences(a, b)
            }
            _ => format!("{} there, {} here", self.what(), other.what()),
        }
    }
}

impl RaceParams {
    /// The campaign's id: the first 16 hex digits of the blake3 hash of its parameters as
    /// JSON with the shard left empty, so that every shard of one campaign has the same id.
    pub fn id(&self) -> String {
        id_of(&RaceParams {
            shard: String::new(),
            ..self.clone()
        })
    }

    /// The parameters that differ from `other`'s, in words (the switches one by one).
    pub fn differences(&self, other: &RaceParams) -> String {
        differences(self, other)
    }
}

/// The folder of a race bundle of `seed`, relative to the campaign folder.
pub fn bundle_name(seed: u64) -> String {
    format!("race-seed-{seed}")
}

/// Whether a finding of `signature` is an fs campaign's (its bundles are fs crash bundles).
pub fn is_fs_signature(signature: &str) -> bool {
    signature.starts_with("fs|")
}

/// The folder of the bundle of `seed` of a finding of `signature`, relative to the campaign
/// folder: `race-seed-N` or, for an fs campaign's finding, `fs-seed-N`.
pub fn bundle_name_of(signature: &str, seed: u64) -> String {
    if is_fs_signature(signature) {
        format!("fs-seed-{seed}")
    } else {
        bundle_name(seed)
    }
}

/// One finding as `crashmonkey findings` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub signature: String,
    pub kind: String,
    pub violation: String,
    pub lost_by: String,
    pub switches: String,
    /// Failing runs with this signature.
    pub count: u64,
    pub first_seed: u64,
    pub smallest_seed: u64,
    pub smallest_steps: u64,
    /// The lowest failing seeds.
    pub seeds: Vec<u64>,
    /// The smallest run's bundle, relative to the folder.
    pub bundle: String,
    /// The first run's bundle, relative to the folder.
    pub first_bundle: String,
    /// The smallest run minimised (`race --minimise`), if it was: the smallest reproducer.
    pub minimised: Option<minimised::MinimisedRun>,
    /// An fs campaign's finding: the smallest run's crash state minimised (`fs campaign
    /// --minimise`), if it was: the smallest reproducer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minimised_state: Option<fs_campaign::MinimisedState>,
}

impl Finding {
    pub fn of(t: &Tally) -> Finding {
        let mut parts = t.signature.split(signature::FIELD_SEPARATOR).skip(1);
        let mut next = || parts.next().unwrap_or("").to_string();
        Finding {
            signature: t.signature.clone(),
            kind: next(),
            violation: next(),
            lost_by: next(),
            switches: next(),
            count: t.count,
            first_seed: t.first_seed,
            smallest_seed: t.smallest_seed,
            smallest_steps: t.smallest_steps,
            seeds: t.seeds.clone(),
            bundle: bundle_name_of(&t.signature, t.smallest_seed),
            first_bundle: bundle_name_of(&t.signature, t.first_seed),
            minimised: None,
            minimised_state: None,
        }
    }
}

/// What a folder found: `crashmonkey findings DIR --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Findings {
    /// Runs the folder's records hold.
    pub runs: u64,
    pub failing_runs: u64,
    /// Most frequent first, then by signature.
    pub findings: Vec<Finding>,
    /// Bundle folders no finding names (an interrupted campaign's; running it again removes
    /// them): not in the JSON, they change no answer; the command says they are there.
    #[serde(skip)]
    pub orphan_bundles: Vec<PathBuf>,
}

/// Reads a folder's findings from its index, after checking that the index holds exactly
/// the folder's run records and that every finding's bundles are there and show it.
pub fn findings(dir: &Path) -> Result<Findings, FolderError> {
    CampaignFile::read(dir)?.ok_or_else(|| FolderError::Refused {
        dir: dir.to_path_buf(),
        what: format!("not a campaign folder (no {CAMPAIGN_FILE})"),
    })?;
    let index = match index::Index::try_open(dir) {
        // A campaign runs in the folder: its records are read instead of its index.
        Err(FolderError::InUse { .. }) => return findings_of_records(dir),
        r => r?,
    };
    // Records a stopped campaign wrote but did not index are indexed now (this process holds
    // the lock); an indexed record with no file, or changed, is refused: after it, the index
    // holds exactly the folder's records.
    ledger::catch_up(&index, dir)?;
    let indexed = index.records()?;
    let tallies = index.findings()?;
    for t in &tallies {
        check_bundles(dir, t)?;
    }
    let runs = indexed.values().map(|r| r.runs).sum();
    let failing_runs = indexed.values().map(|r| r.failures).sum();
    let mut out = report(dir, runs, failing_runs, &tallies)?;
    out.orphan_bundles = ledger::orphan_bundles(&index, dir)?;
    Ok(out)
}

/// Times [`findings`] of a running campaign reads its records again when a bundle they name
/// went away meanwhile (a newer record superseded it).
pub const LIVE_READS_MAX: usize = 3;

/// [`findings`] from the run records alone, for a folder whose campaign is running.
fn findings_of_records(dir: &Path) -> Result<Findings, FolderError> {
    let mut tries = 0;
    loop {
        let (runs, failing_runs, tallies) = merge_records(dir)?;
        let tallies: Vec<Tally> = tallies.into_values().collect();
        match tallies.iter().try_for_each(|t| check_bundles(dir, t)) {
            Err(_) if tries + 1 < LIVE_READS_MAX => tries += 1,
            Err(e) => return Err(e),
            Ok(()) => return report(dir, runs, failing_runs, &tallies),
        }
    }
}

/// Every run record of `dir` merged: runs, failing runs, and the tallies by signature.
fn merge_records(dir: &Path) -> Result<(u64, u64, BTreeMap<String, Tally>), FolderError> {
    let (mut runs, mut failing_runs) = (0, 0);
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for path in record::record_paths(dir)? {
        let r = Record::read(&path)?;
        runs += r.runs;
        failing_runs += r.failures;
        for t in r.findings {
            match tallies.get_mut(&t.signature) {
                Some(have) => have.absorb(&t),
                None => drop(tallies.insert(t.signature.clone(), t)),
            }
        }
    }
    Ok((runs, failing_runs, tallies))
}

fn report(
    dir: &Path,
    runs: u64,
    failing_runs: u64,
    tallies: &[Tally],
) -> Result<Findings, FolderError> {
    let mut findings = Vec::with_capacity(tallies.len());
    for t in tallies {
        let mut f = Finding::of(t);
        if is_fs_signature(&t.signature) {
            f.minimised_state = fs_campaign::read_minimised(dir, t)?;
        } else {
            f.minimised = minimised::read(dir, f.smallest_seed, &f.signature)?;
        }
        findings.push(f);
    }
    findings.sort_by(|a, b| b.count.cmp(&a.count).then(a.signature.cmp(&b.signature)));
    Ok(Findings {
        runs,
        failing_runs,
        findings,
        orphan_bundles: Vec::new(),
    })
}

/// A finding's bundles are in the folder, load, and show a failure of its signature.
pub fn check_bundles(dir: &Path, t: &Tally) -> Result<(), FolderError> {
    for seed in t.bundled_seeds() {
        let path = dir.join(bundle_name_of(&t.signature, seed));
        let (found, sig) = bundle_signature(&path, is_fs_signature(&t.signature))
            .map_err(|e| FolderError::corrupt(&path, format!("bundle unusable: {e:#}")))?;
        if found != seed || sig.as_deref() != Some(t.signature.as_str()) {
            return Err(FolderError::corrupt(
                &path,
                format!(
                    "the bundle of seed {found} shows {sig:?}, not finding {:?} of seed {seed}",
                    t.signature
                ),
            ));
        }
    }
    Ok(())
}

/// The seed and failure signature of the bundle at `path`: an fs crash bundle if `fs`, else
/// a race bundle.
pub fn bundle_signature(path: &Path, fs: bool) -> anyhow::Result<(u64, Option<String>)> {
    if fs {
        let b = crate::fscore::bundle::load(path)?;
        return Ok((b.seed, b.signature()));
    }
    let b = crate::race::load_bundle(path)?;
    let sig = b
        .failures
        .first()
        .map(|f| signature::race_signature(&b.config, f, &b.workload));
    Ok((b.seed, sig))
}

/// Rebuilds `dir`'s index from its run records and bundles alone: in a temporary folder
/// inside `dir`, which then replaces `index/`. Refused while a campaign has the folder open.
pub fn reindex(dir: &Path) -> Result<Findings, FolderError> {
    CampaignFile::read(dir)?.ok_or_else(|| FolderError::Refused {
        dir: dir.to_path_buf(),
        what: format!("not a campaign folder (no {CAMPAIGN_FILE})"),
    })?;
    let live = dir.join(index::INDEX_DIR);
    if live.exists() {
        // Only to learn whether a campaign holds the lock; damage is what reindex repairs.
        if let Err(e @ FolderError::InUse { .. }) = index::Index::open(dir, false) {
            return Err(e);
        }
    }
    sweep_rebuilds(dir)?;
    // Built aside (removed on every way out but the last rename), then swapped in.
    let fresh = tempfile::Builder::new()
        .prefix(REBUILD_PREFIX)
        .tempdir_in(dir)
        .map_err(|e| FolderError::io(dir, e))?;
    let at = fresh.path().join(index::INDEX_DIR);
    build_index(dir, &at)?;
    let old = dir.join("index.old");
    remove_ours(&old)?;
    if live.exists() {
        std::fs::rename(&live, &old).map_err(|e| FolderError::io(&live, e))?;
    }
    std::fs::rename(&at, &live).map_err(|e| FolderError::io(&at, e))?;
    remove_ours(&old)?;
    findings(dir)
}

/// Removes the temporary folders of a reindex that was killed (SIGKILL leaves no chance to).
fn sweep_rebuilds(dir: &Path) -> Result<(), FolderError> {
    for e in std::fs::read_dir(dir).map_err(|e| FolderError::io(dir, e))? {
        let e = e.map_err(|e| FolderError::io(dir, e))?;
        if e.file_name().to_string_lossy().starts_with(REBUILD_PREFIX) {
            remove_ours(&e.path())?;
        }
    }
    Ok(())
}

/// The name of a reindex's temporary folder starts so.
const REBUILD_PREFIX: &str = ".index-rebuild-";

/// Removes a folder this module made (an index being rebuilt or replaced), if it is there.
fn remove_ours(path: &Path) -> Result<(), FolderError> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(FolderError::io(path, e)),
        _ => Ok(()),
    }
}

/// Makes an index at `at` from `dir`'s records, checking every finding's bundles.
fn build_index(dir: &Path, at: &Path) -> Result<(), FolderError> {
    let index = index::Index::open_at(at, dir, true)?;
    let mut tallies = BTreeMap::new();
    for path in record::record_paths(dir)? {
        let bytes = std::fs::read(&path).map_err(|e| FolderError::io(&path, e))?;
        let r = Record::read(&path)?;
        for (_, after) in index.apply(&r, &bytes)? {
            tallies.insert(after.signature.clone(), after);
        }
    }
    for t in tallies.values() {
        check_bundles(dir, t)?;
    }
    index.flush()
}

/// Merges campaign folders into `out`, a new folder: the union of their run records (a
/// record two folders share is taken once), and the bundles of every finding's first and
/// smallest run. `out` must not exist or be empty.
pub fn merge(out: &Path, dirs: &[PathBuf]) -> Result<Findings, FolderError> {
    let refuse = |what: String| FolderError::Refused {
        dir: out.to_path_buf(),
        what,
    };
    if std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some()) {
        return Err(refuse("is not empty: merge makes a new folder".into()));
    }
    let mut sources = Vec::new();
    for d in dirs {
        // Each source must be sound: its index agrees with its records and bundles.
        findings(d)?;
        sources.push(d.clone());
    }
    // Made aside, beside `out`, and renamed to it when whole: a failed merge leaves nothing.
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".merge-")
        .tempdir_in(parent)
        .map_err(|e| FolderError::io(parent, e))?;
    merge_into(tmp.path(), &sources)?;
    std::fs::rename(tmp.path(), out).map_err(|e| FolderError::io(out, e))?;
    // Renamed: nothing is left for the guard to remove.
    let _ = tmp.keep();
    findings(out)
}

/// Makes merged folder `at` of `sources`.
fn merge_into(at: &Path, sources: &[PathBuf]) -> Result<(), FolderError> {
    std::fs::create_dir_all(at.join(record::RUNS_DIR)).map_err(|e| FolderError::io(at, e))?;
    CampaignFile::Merged {
        format: CAMPAIGN_FORMAT,
    }
    .write(at)?;
    for d in sources {
        copy_records(d, at)?;
    }
    let (_, _, tallies) = merge_records(at)?;
    for t in tallies.values() {
        for seed in t.bundled_seeds() {
            copy_bundle(sources, at, &bundle_name_of(&t.signature, seed))?;
        }
    }
    build_index(at, &at.join(index::INDEX_DIR))
}

/// Copies `from`'s run records into `to`; a record already there must be the same bytes.
fn copy_records(from: &Path, to: &Path) -> Result<(), FolderError> {
    for path in record::record_paths(from)? {
        let bytes = std::fs::read(&path).map_err(|e| FolderError::io(&path, e))?;
        let target = to
            .join(record::RUNS_DIR)
            .join(path.file_name().expect("a record has a name"));
        match std::fs::read(&target) {
            Ok(have) if have == bytes => continue,
            Ok(_) => {
                return Err(FolderError::corrupt(
                    &path,
                    format!(
                        "differs from {}, a record of the same runs",
                        target.display()
                    ),
                ))
            }
            Err(_) => record::write_atomically(&target, &bytes)?,
        }
    }
    Ok(())
}

/// Copies bundle folder `name` from the first source that has it into `out`.
fn copy_bundle(sources: &[PathBuf], out: &Path, name: &str) -> Result<(), FolderError> {
    let Some(src) = sources.iter().map(|s| s.join(name)).find(|p| p.is_dir()) else {
        return Err(FolderError::Refused {
            dir: out.to_path_buf(),
            what: format!("no source folder holds {name}"),
        });
    };
    let dst = out.join(name);
    copy_files(&src, &dst)?;
    let min = src.join(minimised::MINIMISED_DIR);
    if min.is_dir() {
        copy_files(&min, &dst.join(minimised::MINIMISED_DIR))?;
    }
    Ok(())
}

/// Copies the files (not the folders) of `src` into `dst`, made if missing.
fn copy_files(src: &Path, dst: &Path) -> Result<(), FolderError> {
    std::fs::create_dir_all(dst).map_err(|e| FolderError::io(dst, e))?;
    for e in std::fs::read_dir(src).map_err(|e| FolderError::io(src, e))? {
        let p = e.map_err(|e| FolderError::io(src, e))?.path();
        if p.is_file() {
            let to = dst.join(p.file_name().expect("a file has a name"));
            std::fs::copy(&p, &to).map_err(|e| FolderError::io(&p, e))?;
        }
    }
    Ok(())
}
