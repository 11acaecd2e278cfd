//! An fs crash campaign that keeps its runs in a campaign folder (`crashmonkey fs campaign
//! --out DIR`), as a race campaign does (`campaign`): each stretch of runs is recorded as it
//! finishes, with the crash bundles (`fs-seed-N/`) of each finding's first and smallest
//! failing run, so that the same command run again after Ctrl-C or SIGKILL goes on from the
//! first run not recorded; the summary is built from the records alone.

pub use super::ledger::{Done, Progress};
use super::ledger::{Ledger, RunFacts, Stretch};
use super::record::Tally;
use super::{bundle_name_of, CampaignFile, FolderError, FsParams, CAMPAIGN_FORMAT};
use crate::fscore::bundle;
use crate::fscore::campaign::{in_seed_order, runs_at_once, FsCampaignOptions};
use crate::fscore::campaign::{FsCampaignSummary, FsRun};
use crate::fscore::minimise::{self, StateMinimiseReport, StateSize};
use crate::race::campaign::FAILING_SEEDS_LISTED_MAX;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// An fs campaign's folder, open (its index locked) for the campaign to go on.
pub struct FsFolder {
    ledger: Ledger,
    params: FsParams,
}

/// What this invocation ran (the records hold the rest).
#[derive(Default)]
struct Ran {
    crash_states: u64,
    check_seconds: f64,
}

impl FsFolder {
    /// Opens `dir` for the campaign `params`: see [`Ledger::open`].
    pub fn open(dir: &Path, params: FsParams) -> Result<FsFolder, FolderError> {
        let (id, shard) = (params.id(), params.shard.clone());
        let file = CampaignFile::Fs {
            format: CAMPAIGN_FORMAT,
            params: params.clone(),
        };
        Ok(FsFolder {
            ledger: Ledger::open(dir, file, id, shard)?,
            params,
        })
    }

    /// See [`Ledger::record_every`].
    pub fn record_every(&mut self, seconds: f64) {
        self.ledger.record_every(seconds);
    }

    pub fn done(&self) -> Result<Done, FolderError> {
        self.ledger.done()
    }

    /// Runs what is left of the campaign (temporary files in `tmp`): `progress` hears how
    /// far it is after each run, `stop` is asked between runs and says why to stop (what
    /// ran is recorded). Returns the summary of the whole campaign, built from the records.
    pub fn run(
        &self,
        opts: &FsCampaignOptions,
        tmp: &Path,
        progress: &mut dyn FnMut(Progress),
        stop: &dyn Fn() -> Option<String>,
    ) -> anyhow::Result<FsCampaignSummary> {
        let started = Instant::now();
        let done = self.done()?;
        let full = |failures: u64| opts.max_failures > 0 && failures >= opts.max_failures;
        let mut failures = done.failures;
        let mut stretch = Stretch::new(done.runs);
        let mut j = done.runs;
        let mut signatures = self.ledger.signatures()?;
        let mut ran = Ran::default();
        let mut take = |run: anyhow::Result<FsRun>| -> anyhow::Result<bool> {
            let run = run?;
            ran.crash_states += run.states.checked as u64;
            ran.check_seconds += run.check_seconds;
            let facts = RunFacts {
                seed: run.seed,
                steps: run.result.steps,
                crash_states: Some(run.states.checked as u64),
                signature: run.signature(),
            };
            failures += u64::from(facts.signature.is_some());
            if let Some(sig) = stretch.add(facts, run) {
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
            Ok(!full(failures))
        };
        let interrupted = if full(done.failures) {
            None
        } else {
            in_seed_order(opts, tmp, done.runs, &mut take, stop)?
        };
        self.commit(stretch)?;
        let mut s = self.summary(opts)?;
        s.interrupted = interrupted;
        s.seconds = started.elapsed().as_secs_f64();
        // The rates are this invocation's: the states it checked in the time it took.
        s.states_per_second = ran.crash_states as f64 / s.seconds.max(1e-9);
        s.check_seconds = ran.check_seconds;
        s.check_states_per_second =
            ran.crash_states as f64 / ran.check_seconds.max(1e-9) * runs_at_once(opts) as f64;
        Ok(s)
    }

    fn commit(&self, s: Stretch<FsRun>) -> Result<(), FolderError> {
        self.ledger.commit(s, &mut |run| self.write_bundle(run))
    }

    /// Writes `run`'s crash bundle in a temporary folder of the campaign folder, synced, then
    /// renamed to `fs-seed-N` (replacing one a killed campaign left: the same seed makes the
    /// same bundle).
    fn write_bundle(&self, run: &FsRun) -> Result<(), FolderError> {
        let dir = self.ledger.dir();
        let sig = run.signature().unwrap_or_default();
        let target = dir.join(bundle_name_of(&sig, run.seed));
        let err = |e: anyhow::Error| FolderError::corrupt(&target, format!("{e:#}"));
        let tmp = tempfile::Builder::new()
            .prefix(&format!(
                "{}{}-",
                crate::race::repro::PARTIAL_BUNDLE_PREFIX,
                run.seed
            ))
            .tempdir_in(dir)
            .map_err(|e| FolderError::io(dir, e))?;
        let (kind, states) = (self.params.workload, self.params.states);
        bundle::write_bundle_files(tmp.path(), &target, kind, run, states).map_err(err)?;
        let json = tmp.path().join("bundle.json");
        std::fs::File::open(&json)
            .and_then(|f| f.sync_all())
            .map_err(|e| FolderError::io(&json, e))?;
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(|e| FolderError::io(&target, e))?;
        }
        std::fs::rename(tmp.path(), &target).map_err(|e| FolderError::io(&target, e))?;
        // Renamed: nothing is left for the guard to remove.
        let _ = tmp.keep();
        Ok(())
    }

    /// The campaign's summary from its records (rates and timings left at zero).
    pub fn summary(&self, opts: &FsCampaignOptions) -> Result<FsCampaignSummary, FolderError> {
        let mut s = FsCampaignSummary::empty(opts);
        for r in self.ledger.records()? {
            s.runs += r.runs;
            s.failures += r.failures;
            s.crash_states += r.crash_states.unwrap_or(0);
            s.failing_seeds.extend_from_slice(&r.failing_seeds);
        }
        s.failing_seeds.truncate(FAILING_SEEDS_LISTED_MAX);
        s.first_failure_seed = s.failing_seeds.first().copied();
        // The first failing run is the first of its finding: its bundle is kept.
        s.reproducer = s.first_failure_seed.map(|seed| self.bundle_dir(seed));
        Ok(s)
    }

    /// The bundle folder of failing seed `seed`.
    pub fn bundle_dir(&self, seed: u64) -> PathBuf {
        self.ledger.dir().join(bundle_name_of("fs|", seed))
    }

    /// Minimises the crash state of each finding's smallest run that has no `minimised/` yet
    /// (as `crashmonkey fs minimise` does), replayed in `tmp`; returns how many. A state that
    /// cannot be minimised, or whose minimised state fails with another signature, is left
    /// as it is, with a warning.
    pub fn minimise(&self, tmp: &Path) -> Result<usize, FolderError> {
        let mut made = 0;
        for t in self.ledger.index().findings()? {
            let dir = self
                .ledger
                .dir()
                .join(bundle_name_of(&t.signature, t.smallest_seed));
            let target = dir.join(super::minimised::MINIMISED_DIR);
            if target.exists() {
                continue;
            }
            let b = bundle::load(&dir)
                .map_err(|e| FolderError::corrupt(&dir, format!("bundle unusable: {e:#}")))?;
            let m = match minimise::minimise_state(&b, tmp) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(bundle = %dir.display(), "not minimised: {e}");
                    continue;
                }
            };
            if m.run.signature().as_deref() != Some(t.signature.as_str()) {
                tracing::warn!(bundle = %dir.display(), "not kept: the minimised state fails otherwise");
                continue;
            }
            minimise::write_state_minimised(&target, &b, &m)
                .map_err(|e| FolderError::corrupt(&target, format!("{e:#}")))?;
            made += 1;
        }
        Ok(made)
    }
}

/// A finding's minimised crash state, as `crashmonkey findings` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MinimisedState {
    /// Its bundle, relative to the folder (`fs-seed-N/minimised`).
    pub bundle: String,
    /// Crash states minimisation checked.
    pub checks: u64,
    pub before: StateSize,
    pub after: StateSize,
}

/// The minimised crash state in the bundle of `t`'s smallest run, if there is one; it must
/// load and fail with `t`'s signature.
pub fn read_minimised(dir: &Path, t: &Tally) -> Result<Option<MinimisedState>, FolderError> {
    let rel = format!(
        "{}/{}",
        bundle_name_of(&t.signature, t.smallest_seed),
        super::minimised::MINIMISED_DIR
    );
    let at = dir.join(&rel);
    if !at.exists() {
        return Ok(None);
    }
    let file = at.join(crate::race::minimise::MINIMISE_FILE);
    let text = std::fs::read(&file).map_err(|e| FolderError::io(&file, e))?;
    let r: StateMinimiseReport = serde_json::from_slice(&text)
        .map_err(|e| FolderError::corrupt(&file, format!("not a minimisation report: {e}")))?;
    let b = bundle::load(&at)
        .map_err(|e| FolderError::corrupt(&at, format!("bundle unusable: {e:#}")))?;
    let sig = b.signature();
    if sig.as_deref() != Some(t.signature.as_str()) {
        return Err(FolderError::corrupt(
            &at,
            format!(
                "the minimised state shows {sig:?}, not finding {:?}",
                t.signature
            ),
        ));
    }
    Ok(Some(MinimisedState {
        bundle: rel,
        checks: r.checks,
        before: r.before,
        after: r.after,
    }))
}
