//! A race campaign that keeps its runs in a campaign folder: it records each stretch of runs
//! as it finishes it, so that the same command, run again after Ctrl-C or SIGKILL, goes on
//! from the first run not recorded, and its summary is built from the records alone (the
//! same whether or not it was interrupted).

pub use super::ledger::{Done, Progress};
use super::ledger::{Ledger, RunFacts, Stretch};
use super::{bundle_name, signature, CampaignFile, FolderError, RaceParams, CAMPAIGN_FORMAT};
use crate::race::campaign::{CampaignSummary, FAILING_SEEDS_LISTED_MAX};
use crate::race::{run_one, CampaignOptions, RunOutcome};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A race campaign's folder, open (its index locked) for the campaign to go on.
pub struct RaceFolder {
    ledger: Ledger,
}

impl RaceFolder {
    /// Opens `dir` for the campaign `params` (making it if it is new). A folder of other
    /// parameters is refused; records the index lacks (a campaign stopped between writing
    /// a record and indexing it) are indexed now.
    pub fn open(dir: &Path, params: RaceParams) -> Result<RaceFolder, FolderError> {
        let (id, shard) = (params.id(), params.shard.clone());
        let file = CampaignFile::Race {
            format: CAMPAIGN_FORMAT,
            params,
        };
        Ok(RaceFolder {
            ledger: Ledger::open(dir, file, id, shard)?,
        })
    }

    /// Writes a record every `seconds` of running instead of every
    /// `record::RECORD_SECONDS_DEFAULT` (see [`Ledger::record_every`]).
    pub fn record_every(&mut self, seconds: f64) {
        self.ledger.record_every(seconds);
    }

    pub fn done(&self) -> Result<Done, FolderError> {
        self.ledger.done()
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
        let mut signatures = self.ledger.signatures()?;
        while j < own && !full(failures) && !stop() {
            let i = opts.shard.index + j * opts.shard.count;
            let out = run_one(opts.seed.wrapping_add(i), &opts.config);
            failures += u64::from(!out.result.passed());
            let facts = RunFacts {
                seed: out.seed,
                steps: out.result.steps,
                crash_states: None,
                signature: out
                    .result
                    .failures
                    .first()
                    .map(|f| signature::race_signature(&out.cfg, f, &out.generated.workload)),
            };
            if let Some(sig) = stretch.add(facts, out) {
                signatures.insert(sig);
            }
            j += 1;
            progress(Progress {
                runs: j,
                failures,
                findings: signatures.len() as u64,
            });
            if self.ledger.due(&stretch) {
                let next = Stretch::new(j);
                self.commit(std::mem::replace(&mut stretch, next))?;
            }
        }
        self.commit(stretch)?;
        let mut s = self.summary(opts)?;
        s.seconds = started.elapsed().as_secs_f64();
        Ok(s)
    }

    fn commit(&self, s: Stretch<RunOutcome>) -> Result<(), FolderError> {
        self.ledger.commit(s, &mut |o| self.write_bundle(o))
    }

    fn write_bundle(&self, o: &RunOutcome) -> Result<(), FolderError> {
        let dir = self.ledger.dir();
        let path = crate::race::write_bundle(dir, o)
            .map_err(|e| FolderError::corrupt(&dir.join(bundle_name(o.seed)), format!("{e:#}")))?;
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
        for r in self.ledger.records()? {
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
        let tallies = self.ledger.index().findings()?;
        super::minimised::minimise_findings(self.ledger.dir(), &tallies, runs_max, progress)
    }

    /// The bundle folder of a seed.
    pub fn bundle_dir(&self, seed: u64) -> PathBuf {
        self.ledger.dir().join(bundle_name(seed))
    }
}
