//! A race campaign that keeps its runs in a campaign folder: it records each stretch of runs
//! as it finishes it, so that the same command, run again after Ctrl-C or SIGKILL, goes on
//! from the first run not recorded, and its summary is built from the records alone (the
//! same whether or not it was interrupted).

use super::index::Index;
use super::record::{Record, Tally, RECORD_SECONDS_DEFAULT, RECORD_VERSION, RUNS_PER_RECORD_MAX};
use super::{bundle_name, signature, CampaignFile, FolderError, RaceParams, CAMPAIGN_FORMAT};
use crate::race::campaign::{CampaignSummary, FAILING_SEEDS_LISTED_MAX};
use crate::race::{run_one, CampaignOptions, RunOutcome};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A race campaign's folder, open (its index locked) for the campaign to go on.
pub struct RaceFolder {
    dir: PathBuf,
    index: Index,
    params: RaceParams,
    id: String,
    /// Seconds of running per record.
    record_seconds: f64,
}

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

impl RaceFolder {
    /// Opens `dir` for the campaign `params` (making it if it is new). A folder of other
    /// parameters is refused; records the index lacks (a campaign stopped between writing
    /// a record and indexing it) are indexed now.
    pub fn open(dir: &Path, params: RaceParams) -> Result<RaceFolder, FolderError> {
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
        same_campaign(dir, &params)?;
        sweep_temporaries(&dir.join(super::record::RUNS_DIR))?;
        let folder = RaceFolder {
            dir: dir.to_path_buf(),
            index,
            id: params.id(),
            params,
            record_seconds: RECORD_SECONDS_DEFAULT,
        };
        folder.catch_up()?;
        Ok(folder)
    }

    /// Writes a record every `seconds` of running (and every [`RUNS_PER_RECORD_MAX`] runs)
    /// instead of every [`RECORD_SECONDS_DEFAULT`]: less bookkeeping, or less to redo after
    /// a kill. It changes no result.
    pub fn record_every(&mut self, seconds: f64) {
        self.record_seconds = seconds.max(0.0);
    }

    /// Indexes the folder's records the index lacks; an indexed record with no file, or
    /// whose file changed, is damage.
    fn catch_up(&self) -> Result<(), FolderError> {
        let indexed = self.index.records()?;
        let mut seen = 0;
        // Checked once all are in: a later record may supersede an earlier one's bundles.
        let mut touched = std::collections::BTreeSet::new();
        for path in super::record::record_paths(&self.dir)? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let bytes = std::fs::read(&path).map_err(|e| FolderError::io(&path, e))?;
            match indexed.get(name.as_deref().unwrap_or_default()) {
                Some(e) if e.hash == *blake3::hash(&bytes).as_bytes() => seen += 1,
                Some(_) => return Err(FolderError::corrupt(&path, "changed since indexed")),
                None => {
                    let r = Record::read(&path)?;
                    tracing::info!(record = %path.display(), "indexing a record made before an interruption");
                    for (_, after) in self.index.apply(&r, &bytes)? {
                        touched.insert(after.signature.clone());
                    }
                }
            }
        }
        if seen != indexed.len() {
            return Err(FolderError::Index {
                dir: self.dir.clone(),
                what: format!("{} indexed run records have no file", indexed.len() - seen),
            });
        }
        for sig in touched {
            if let Some(t) = self.index.finding(&sig)? {
                super::check_bundles(&self.dir, &t)?;
            }
        }
        Ok(())
    }

    /// This campaign's (and shard's) records, in run order; they must follow each other
    /// from run 0 with no gap.
    pub fn records(&self) -> Result<Vec<Record>, FolderError> {
        let prefix = format!("{}-{}-", self.id, self.params.shard.replace('/', "of"));
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

    /// Runs what is left of the campaign: `progress` hears how far it is after each run, and `stop` is asked between runs (a stop records what
    /// was run). Returns the summary of the whole campaign, built from the records.
    pub fn run(
        &self,
        opts: &CampaignOptions,
        progress: &mut dyn FnMut(Progress),
        stop: &dyn Fn() -> bool,
    ) -> Result<CampaignSummary, FolderError> {
        let started = Instant::now();
        let done = self.done()?;
        let own = opts.shard.share_of(opts.runs);
        let full = |failures: u64| opts.max_failures > 0 && failures >= opts.max_failures;
        let mut failures = done.failures;
        let mut stretch = Stretch::new(done.runs);
        let mut j = done.runs;
        let mut signatures: std::collections::BTreeSet<String> = (self.index.findings()?)
            .into_iter()
            .map(|t| t.signature)
            .collect();
        while j < own && !full(failures) && !stop() {
            let i = opts.shard.index + j * opts.shard.count;
            let out = run_one(opts.seed.wrapping_add(i), &opts.config);
            failures += u64::from(!out.result.passed());
            if let Some(sig) = stretch.add(out) {
                signatures.insert(sig);
            }
            j += 1;
            progress(Progress {
                runs: j,
                failures,
                findings: signatures.len() as u64,
            });
            if stretch.runs >= RUNS_PER_RECORD_MAX
                || stretch.started.elapsed().as_secs_f64() >= self.record_seconds
            {
                let next = Stretch::new(j);
                self.commit(std::mem::replace(&mut stretch, next))?;
            }
        }
        self.commit(stretch)?;
        let mut s = self.summary(opts)?;
        s.seconds = started.elapsed().as_secs_f64();
        Ok(s)
    }

    /// Writes a stretch's new bundles, then its record, then indexes it, then removes the
    /// bundles it superseded: whatever step an interruption stops, the records name only
    /// bundles that are there.
    fn commit(&self, s: Stretch) -> Result<(), FolderError> {
        if s.runs == 0 {
            return Ok(());
        }
        let record = s.record(&self.id, &self.params.shard);
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
                    self.write_bundle(&s.outcomes[&seed])?;
                }
            }
            stale.extend(
                was.into_iter()
                    .filter(|w| !after.bundled_seeds().contains(w)),
            );
        }
        record.write(&self.dir)?;
        let bytes = serde_json::to_string_pretty(&record).expect("a record serializes");
        self.index.apply(&record, bytes.as_bytes())?;
        for seed in stale {
            let path = self.dir.join(bundle_name(seed));
            std::fs::remove_dir_all(&path).map_err(|e| FolderError::io(&path, e))?;
        }
        Ok(())
    }

    fn write_bundle(&self, o: &RunOutcome) -> Result<(), FolderError> {
        let path = crate::race::write_bundle(&self.dir, o).map_err(|e| {
            FolderError::corrupt(&self.dir.join(bundle_name(o.seed)), format!("{e:#}"))
        })?;
        // The record that names it is synced: so is the bundle's file replay reads.
        let json = path.join("bundle.json");
        std::fs::File::open(&json)
            .and_then(|f| f.sync_all())
            .map_err(|e| FolderError::io(&json, e))
    }

    /// The campaign's summary from its records; the first and the smallest failing runs are
    /// run again (the seed decides a run: they come out as they were).
    pub fn summary(&self, opts: &CampaignOptions) -> Result<CampaignSummary, FolderError> {
        let mut s = CampaignSummary {
            runs: 0,
            failures: 0,
            first_failure_seed: None,
            seconds: 0.0,
            steps: 0,
            failing_seeds: Vec::new(),
            smallest_failure_seed: None,
            first: None,
            smallest: None,
        };
        let mut smallest: Option<(u64, u64)> = None;
        for r in self.records()? {
            s.runs += r.runs;
            s.failures += r.failures;
            s.steps += r.steps;
            s.failing_seeds.extend_from_slice(&r.failing_seeds);
            for t in &r.findings {
                let this = (t.smallest_steps, t.smallest_seed);
                smallest = Some(smallest.map_or(this, |m| m.min(this)));
            }
        }
        s.failing_seeds.truncate(FAILING_SEEDS_LISTED_MAX);
        s.first_failure_seed = s.failing_seeds.first().copied();
        s.smallest_failure_seed = smallest.map(|(_, seed)| seed);
        s.first = s.first_failure_seed.map(|seed| run_one(seed, &opts.config));
        s.smallest = s
            .smallest_failure_seed
            .map(|seed| run_one(seed, &opts.config));
        Ok(s)
    }

    /// Minimises each finding's smallest run that is not minimised yet
    /// (`folder::minimised`), within `runs_max` candidate runs each; returns how many.
    pub fn minimise(
        &self,
        runs_max: u64,
        progress: &mut dyn FnMut(usize, u64, &crate::race::minimise::RunSize),
    ) -> Result<usize, FolderError> {
        let tallies = self.index.findings()?;
        super::minimised::minimise_findings(&self.dir, &tallies, runs_max, progress)
    }

    /// The bundle folder of a seed.
    pub fn bundle_dir(&self, seed: u64) -> PathBuf {
        self.dir.join(bundle_name(seed))
    }
}

/// The folder's campaign is `params` (a new folder is made `params`'s); another is refused.
fn same_campaign(dir: &Path, params: &RaceParams) -> Result<(), FolderError> {
    match CampaignFile::read(dir)? {
        Some(CampaignFile::Race { params: have, .. }) if have == *params => Ok(()),
        Some(CampaignFile::Race { params: have, .. }) => Err(FolderError::OtherCampaign {
            dir: dir.to_path_buf(),
            differences: have.differences(params),
        }),
        Some(CampaignFile::Merged { .. }) => Err(FolderError::Refused {
            dir: dir.to_path_buf(),
            what: "a merged folder holds findings only: no campaign runs into it".into(),
        }),
        None => CampaignFile::Race {
            format: CAMPAIGN_FORMAT,
            params: params.clone(),
        }
        .write(dir),
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

/// Runs done since the last record.
struct Stretch {
    first_run: u64,
    runs: u64,
    steps: u64,
    failures: u64,
    failing_seeds: Vec<u64>,
    tallies: BTreeMap<String, Tally>,
    /// The first and smallest failing run of each signature here, by seed.
    outcomes: BTreeMap<u64, RunOutcome>,
    started: Instant,
}

impl Stretch {
    fn new(first_run: u64) -> Stretch {
        Stretch {
            first_run,
            runs: 0,
            steps: 0,
            failures: 0,
            failing_seeds: Vec::new(),
            tallies: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    /// Adds a run; returns its signature if it failed.
    fn add(&mut self, out: RunOutcome) -> Option<String> {
        self.runs += 1;
        self.steps += out.result.steps;
        let first = out.result.failures.first()?;
        self.failures += 1;
        if self.failing_seeds.len() < FAILING_SEEDS_LISTED_MAX {
            self.failing_seeds.push(out.seed);
        }
        let sig = signature::race_signature(&out.cfg, first, &out.generated.workload);
        let seed = out.seed;
        let one = Tally::one(sig.clone(), seed, out.result.steps);
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
            failing_seeds: self.failing_seeds.clone(),
            findings: self.tallies.values().cloned().collect(),
        }
    }
}
