//! The bookkeeping every campaign kind shares in its folder (`race --out`, `fs campaign
//! --out`): the folder opened and locked, records the index lacks indexed, the shard's
//! records read back in run order, and a stretch of runs committed (its new bundles, then its
//! record, then the index, then the bundles it superseded removed). What a run is, and how
//! its bundle is written, is the campaign's (`campaign`, `fs_campaign`).

use super::index::Index;
use super::record::{Record, Tally, RECORD_SECONDS_DEFAULT, RECORD_VERSION, RUNS_PER_RECORD_MAX};
use super::{bundle_name_of, CampaignFile, FolderError};
use crate::race::campaign::FAILING_SEEDS_LISTED_MAX;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a running campaign tells its progress bar.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The shard's runs done, those of earlier invocations included.
    pub runs: u64,
    pub failures: u64,
    /// Distinct failure signatures so far.
    pub findings: u64,
}

/// Where a campaign stands: the shard's runs recorded, and failures among them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub runs: u64,
    pub failures: u64,
}

/// A campaign's folder, open (its index locked) for one campaign's shard to go on.
pub struct Ledger {
    dir: PathBuf,
    index: Index,
    /// The campaign's id and the shard (`K/N`): its records' names start with them.
    id: String,
    shard: String,
    /// Seconds of running per record.
    record_seconds: f64,
}

impl Ledger {
    /// Opens `dir` for the campaign `file` (making the folder if it is new). A folder of
    /// other files, or of another campaign, is refused; records the index lacks (a campaign
    /// stopped between writing a record and indexing it) are indexed now.
    pub fn open(
        dir: &Path,
        file: CampaignFile,
        id: String,
        shard: String,
    ) -> Result<Ledger, FolderError> {
        std::fs::create_dir_all(dir).map_err(|e| FolderError::io(dir, e))?;
        crate::race::repro::sweep_partial_bundles(dir).map_err(|e| FolderError::io(dir, e))?;
        // A folder of other files is not made a campaign's: its bundles could be overwritten.
        let empty = std::fs::read_dir(dir)
            .map_err(|e| FolderError::io(dir, e))?
            .next()
            .is_none();
        if !empty && CampaignFile::read(dir)?.is_none() {
            return Err(FolderError::Refused {
                dir: dir.to_path_buf(),
                what: format!(
                    "holds files but no {}: not a campaign folder; give a new or empty one",
                    super::CAMPAIGN_FILE
                ),
            });
        }
        // From here the folder is this process's: sled's lock keeps other campaigns out.
        let index = Index::open(dir, true)?;
        same_campaign(dir, &file)?;
        sweep_temporaries(&dir.join(super::record::RUNS_DIR))?;
        let ledger = Ledger {
            dir: dir.to_path_buf(),
            index,
            id,
            shard,
            record_seconds: RECORD_SECONDS_DEFAULT,
        };
        catch_up(&ledger.index, dir)?;
        sweep_orphan_bundles(&ledger.index, dir)?;
        Ok(ledger)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Writes a record every `seconds` of running (and every [`RUNS_PER_RECORD_MAX`] runs)
    /// instead of every [`RECORD_SECONDS_DEFAULT`]: less bookkeeping, or less to redo after
    /// a kill. It changes no result.
    pub fn record_every(&mut self, seconds: f64) {
        self.record_seconds = seconds.max(0.0);
    }

    /// Whether `s` is long enough to be recorded now.
    pub fn due<T>(&self, s: &Stretch<T>) -> bool {
        s.runs >= RUNS_PER_RECORD_MAX || s.started.elapsed().as_secs_f64() >= self.record_seconds
    }

    /// This campaign's (and shard's) records, in run order; they must follow each other
    /// from run 0 with no gap.
    pub fn records(&self) -> Result<Vec<Record>, FolderError> {
        let prefix = format!("{}-{}-", self.id, self.shard.replace('/', "of"));
        let mut out: Vec<Record> = Vec::new();
        for path in super::record::record_paths(&self.dir)? {
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            {
                continue;
            }
            let r = Record::read(&path)?;
            let next = out.last().map_or(0, |l| l.first_run + l.runs);
            if r.first_run != next {
                return Err(FolderError::corrupt(
                    &path,
                    format!("starts at the shard's run {}, not {next}", r.first_run),
                ));
            }
            out.push(r);
        }
        Ok(out)
    }

    pub fn done(&self) -> Result<Done, FolderError> {
        Ok(self.records()?.iter().fold(Done::default(), |d, r| Done {
            runs: d.runs + r.runs,
            failures: d.failures + r.failures,
        }))
    }

    /// The signatures of every finding the folder holds.
    pub fn signatures(&self) -> Result<BTreeSet<String>, FolderError> {
        Ok(self
            .index
            .findings()?
            .into_iter()
            .map(|t| t.signature)
            .collect())
    }

    /// Writes a stretch's new bundles (`write` writes the one of a kept run), then its
    /// record, then indexes it, then removes the bundles it superseded: whatever step an
    /// interruption stops, the records name only bundles that are there.
    pub fn commit<T>(
        &self,
        s: Stretch<T>,
        write: &mut dyn FnMut(&T) -> Result<(), FolderError>,
    ) -> Result<(), FolderError> {
        if s.runs == 0 {
            return Ok(());
        }
        let record = s.record(&self.id, &self.shard);
        let mut stale = Vec::new();
        for t in &record.findings {
            let before = self.index.finding(&t.signature)?;
            let mut after = t.clone();
            let was = before
                .as_ref()
                .map(Tally::bundled_seeds)
                .unwrap_or_default();
            if let Some(b) = &before {
                after.absorb(b);
            }
            for seed in after.bundled_seeds() {
                if !was.contains(&seed) {
                    write(&s.outcomes[&seed])?;
                }
            }
            stale.extend(
                was.into_iter()
                    .filter(|w| !after.bundled_seeds().contains(w))
                    .map(|w| bundle_name_of(&t.signature, w)),
            );
        }
        record.write(&self.dir)?;
        let bytes = serde_json::to_string_pretty(&record).expect("a record serializes");
        self.index.apply(&record, bytes.as_bytes())?;
        for name in stale {
            let path = self.dir.join(name);
            std::fs::remove_dir_all(&path).map_err(|e| FolderError::io(&path, e))?;
        }
        Ok(())
    }
}

/// Indexes the folder's records the index lacks (a campaign stopped between writing a
/// record and indexing it); an indexed record with no file, or whose file changed, is
/// damage. Returns how many records it indexed. The caller holds the index's lock.
pub fn catch_up(index: &Index, dir: &Path) -> Result<usize, FolderError> {
    let indexed = index.records()?;
    let (mut seen, mut added) = (0, 0);
    // Checked once all are in: a later record may supersede an earlier one's bundles.
    let mut touched = BTreeSet::new();
    for path in super::record::record_paths(dir)? {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let bytes = std::fs::read(&path).map_err(|e| FolderError::io(&path, e))?;
        match indexed.get(name.as_deref().unwrap_or_default()) {
            Some(e) if e.hash == *blake3::hash(&bytes).as_bytes() => seen += 1,
            Some(_) => return Err(FolderError::corrupt(&path, "changed since indexed")),
            None => {
                let r = Record::read(&path)?;
                tracing::info!(record = %path.display(), "indexing a record made before an interruption");
                for (_, after) in index.apply(&r, &bytes)? {
                    touched.insert(after.signature.clone());
                }
                added += 1;
            }
        }
    }
    if seen != indexed.len() {
        return Err(FolderError::Index {
            dir: dir.to_path_buf(),
            what: format!("{} indexed run records have no file", indexed.len() - seen),
        });
    }
    for sig in touched {
        if let Some(t) = index.finding(&sig)? {
            super::check_bundles(dir, &t)?;
        }
    }
    Ok(added)
}

/// The bundle folders of `dir` that no finding of the index names: written by a campaign
/// stopped before the record that names them (it writes them again when it runs again), or
/// superseded by a smaller run and not yet removed when it stopped. Sorted by name.
pub fn orphan_bundles(index: &Index, dir: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let mut named = BTreeSet::new();
    for t in index.findings()? {
        for seed in t.bundled_seeds() {
            named.insert(bundle_name_of(&t.signature, seed));
        }
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| FolderError::io(dir, e))? {
        let e = e.map_err(|e| FolderError::io(dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if is_bundle_name(&name) && !named.contains(&name) && e.path().is_dir() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `name` is a campaign bundle folder's name: `race-seed-N` or `fs-seed-N`.
fn is_bundle_name(name: &str) -> bool {
    let digits = name
        .strip_prefix("race-seed-")
        .or_else(|| name.strip_prefix("fs-seed-"));
    digits.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes [`orphan_bundles`]: only a campaign that holds the folder does, when it opens it.
fn sweep_orphan_bundles(index: &Index, dir: &Path) -> Result<(), FolderError> {
    for path in orphan_bundles(index, dir)? {
        tracing::info!(bundle = %path.display(), "removing a bundle no finding names (left by an interruption)");
        std::fs::remove_dir_all(&path).map_err(|e| FolderError::io(&path, e))?;
    }
    Ok(())
}

/// The folder's campaign is `want` (a new folder is made `want`'s); another is refused.
fn same_campaign(dir: &Path, want: &CampaignFile) -> Result<(), FolderError> {
    match CampaignFile::read(dir)? {
        Some(have) if have == *want => Ok(()),
        Some(CampaignFile::Merged { .. }) => Err(FolderError::Refused {
            dir: dir.to_path_buf(),
            what: "a merged folder holds findings only: no campaign runs into it".into(),
        }),
        Some(have) => Err(FolderError::OtherCampaign {
            dir: dir.to_path_buf(),
            differences: have.differences(want),
        }),
        None => want.write(dir),
    }
}

/// Removes the temporary files a killed campaign left while writing a record (SIGKILL
/// leaves no chance to remove them then).
fn sweep_temporaries(runs: &Path) -> Result<(), FolderError> {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|e| FolderError::io(&p, e))?;
        }
    }
    Ok(())
}

/// Runs done since the last record; `T` is a kept run (what its bundle is written from).
pub struct Stretch<T> {
    first_run: u64,
    pub runs: u64,
    steps: u64,
    crash_states: Option<u64>,
    failures: u64,
    failing_seeds: Vec<u64>,
    tallies: BTreeMap<String, Tally>,
    /// The first and smallest failing run of each signature here, by seed.
    outcomes: BTreeMap<u64, T>,
    started: Instant,
}

/// One run as a stretch counts it.
pub struct RunFacts {
    pub seed: u64,
    /// Scheduler steps: what makes a failing run smaller than another.
    pub steps: u64,
    /// Crash states it checked (an fs campaign's runs).
    pub crash_states: Option<u64>,
    /// Its failure signature, if it failed.
    pub signature: Option<String>,
}

impl<T> Stretch<T> {
    pub fn new(first_run: u64) -> Stretch<T> {
        Stretch {
            first_run,
            runs: 0,
            steps: 0,
            crash_states: None,
            failures: 0,
            failing_seeds: Vec::new(),
            tallies: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    /// Adds a run (`out`, kept while its bundle may be written); returns its signature if
    /// it failed.
    pub fn add(&mut self, facts: RunFacts, out: T) -> Option<String> {
        self.runs += 1;
        self.steps += facts.steps;
        if let Some(n) = facts.crash_states {
            *self.crash_states.get_or_insert(0) += n;
        }
        let sig = facts.signature?;
        self.failures += 1;
        if self.failing_seeds.len() < FAILING_SEEDS_LISTED_MAX {
            self.failing_seeds.push(facts.seed);
        }
        let seed = facts.seed;
        let one = Tally::one(sig.clone(), seed, facts.steps);
        let Some(t) = self.tallies.get_mut(&sig) else {
            self.tallies.insert(sig.clone(), one);
            self.outcomes.insert(seed, out);
            return Some(sig);
        };
        let kept_before = t.bundled_seeds();
        t.absorb(&one);
        let kept = t.bundled_seeds();
        for gone in kept_before.iter().filter(|s| !kept.contains(s)) {
            self.outcomes.remove(gone);
        }
        if kept.contains(&seed) {
            self.outcomes.insert(seed, out);
        }
        Some(sig)
    }

    fn record(&self, campaign: &str, shard: &str) -> Record {
        Record {
            version: RECORD_VERSION,
            campaign: campaign.to_string(),
            shard: shard.to_string(),
            first_run: self.first_run,
            runs: self.runs,
            steps: self.steps,
            failures: self.failures,
            crash_states: self.crash_states,
            failing_seeds: self.failing_seeds.clone(),
            findings: self.tallies.values().cloned().collect(),
        }
    }
}
