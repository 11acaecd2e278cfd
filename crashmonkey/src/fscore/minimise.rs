//! Minimisation of a failing crash state (an fs campaign's bundle): the state shrinks to the
//! fewest surviving writes of its epoch, and the fewest bytes of its torn write, that still
//! fail **the same way** (the same [`crash_signature`]). The run itself is not changed: it is
//! replayed exactly, so its log, and the full prefix before the state's epoch, are the
//! bundle's; only the state's choice of what of the epoch survived shrinks.
//!
//! Passes, in rounds until one shrinks nothing (at most `MINIMISE_ROUNDS_MAX`): ddmin over the
//! epoch's writes the state kept (the empty set first); the torn write dropped, else ddmin
//! over its landed atomic units (at least one kept). Every candidate must be a crash state a
//! power cut could leave (`states::legal`: FUA writes before a kept write kept, a torn write
//! after the kept ones), and is checked as a campaign checks a state: mounted with recovery,
//! fsck'd, judged by the crash oracle. Bounded by [`STATE_CHECKS_MAX`] checks; deterministic.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use fs_core::crash::Judge;
use serde::{Deserialize, Serialize};

use super::bundle::{self, FsBundle};
use super::campaign::FsRun;
use super::states::{check_state, state_blocks, state_image, StateFailure};
use crate::folder::signature::generic;
use crate::history::{Epoch, Epochs, History as LogHistory};
use crate::race::minimise::{ddmin, MINIMISE_FILE, MINIMISE_ROUNDS_MAX, MINIMISE_VERSION};
use crate::states::{legal, CrashState, StateGenerator, TornOp};

/// Crash states one minimisation may check (each a mount, fsck and oracle in memory).
pub const STATE_CHECKS_MAX: u64 = 5_000;

/// Why a crash state could not be minimised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateMinimiseError {
    #[error(
        "the bundle holds no crash state (its run failed the race oracle only): minimise the \
         run with `crashmonkey race minimise` instead"
    )]
    NoCrashState,
    #[error(
        "the bundled crash state does not fail when replayed (it keeps its promises, or did \
         not arise): there is nothing to minimise"
    )]
    DoesNotFail,
    #[error("replaying the bundle: {0:#}")]
    Replay(anyhow::Error),
}

/// How big a crash state is: what minimisation shrinks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSize {
    /// Writes of the epoch that survived whole.
    pub kept: u64,
    /// 1 if a write landed in part.
    pub torn: u64,
    /// Bytes of the torn write that landed.
    pub torn_bytes: u64,
}

impl StateSize {
    fn of(included: &[usize], torn: Option<&TornOp>) -> StateSize {
        StateSize {
            kept: included.len() as u64,
            torn: u64::from(torn.is_some()),
            torn_bytes: torn.map_or(0, |t| t.pieces.iter().map(|p| p.1).sum()),
        }
    }
}

/// What an fs bundle's `minimise.json` holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateMinimiseReport {
    pub version: u32,
    pub seed: u64,
    /// The crash failure's signature, the same before and after.
    pub signature: String,
    /// Crash states checked.
    pub checks: u64,
    pub before: StateSize,
    pub after: StateSize,
}

/// A failing crash state's signature: what kind of promise it broke, without particulars.
/// `mount|TEXT` when it does not mount; else the first fsck problem (`fsck|TEXT`, or
/// `fsck|clean`) and the first violation (`FILE|TEXT up to its first ':' or ';'`, e.g.
/// `f0|byte #`), each text with its digits as `#`.
pub fn crash_signature(f: &StateFailure) -> String {
    if let Some(e) = &f.mount_error {
        return format!("mount|{}", generic(e));
    }
    let fsck = f.fsck.first().map_or("clean".into(), |p| generic(p));
    let violation = f.violations.first().map_or("none".into(), |v| {
        let head = v.what.split([':', ';']).next().unwrap_or("");
        format!("{}|{}", v.file, generic(head))
    });
    format!("fsck|{fsck}|{violation}")
}

/// One epoch of a replayed run, ready to check states of.
struct EpochAt {
    prefix: Arc<Vec<u8>>,
    epoch: Epoch,
    log: Vec<u8>,
}

fn epoch_at(run: &FsRun, index: usize) -> anyhow::Result<EpochAt> {
    let log = std::fs::read(run.log.path())?;
    let mut prefix = run.base.clone();
    for epoch in Epochs::new(LogHistory::open(run.log.path())?) {
        let epoch = epoch?;
        if epoch.index == index {
            return Ok(EpochAt {
                prefix: Arc::new(prefix),
                epoch,
                log,
            });
        }
        super::states::advance(&mut prefix, &epoch, &log);
    }
    anyhow::bail!("the replayed log has no epoch {index}")
}

/// Checks candidate states of one epoch against a signature, within a budget.
struct Checker<'a> {
    run: &'a FsRun,
    at: &'a EpochAt,
    judge: Judge<'a>,
    want: &'a CrashState,
    signature: String,
    checks: u64,
}

impl Checker<'_> {
    fn state(&self, included: &[usize], torn: Option<&TornOp>) -> CrashState {
        CrashState {
            included: included.to_vec(),
            torn: torn.cloned(),
            ..self.want.clone()
        }
    }

    /// Whether the state fails with the signature (an illegal one never does).
    fn fails(&mut self, included: &[usize], torn: Option<&TornOp>) -> bool {
        if self.checks >= STATE_CHECKS_MAX || !legal(&self.at.epoch, included, torn) {
            return false;
        }
        self.checks += 1;
        self.failure(included, torn)
            .is_some_and(|f| crash_signature(&f) == self.signature)
    }

    fn failure(&self, included: &[usize], torn: Option<&TornOp>) -> Option<StateFailure> {
        let s = self.state(included, torn);
        let blocks = state_blocks(&self.at.prefix, &self.at.epoch, &s, &self.at.log);
        check_state(&self.run.cfg, &self.judge, &self.at.prefix, blocks, &s)
    }
}

/// The landed pieces of a torn write cut into atomic units of `unit` bytes.
fn units(t: &TornOp, unit: u64) -> Vec<(u64, u64)> {
    t.pieces
        .iter()
        .flat_map(|&(off, len)| nbd_server::log::unit_pieces(off, len, unit))
        .collect()
}

/// Units back into pieces: adjacent ones merged.
fn pieces(units: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in units {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == off => l.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// One round of the passes over (`included`, `torn`), shrinking them in place.
fn round(c: &mut Checker<'_>, inc: &mut Vec<usize>, torn: &mut Option<TornOp>, unit: u64) {
    let t = torn.clone();
    *inc = ddmin(inc.clone(), true, &mut |cand| c.fails(cand, t.as_ref()));
    let Some(t) = torn.clone() else {
        return;
    };
    if c.fails(inc, None) {
        *torn = None;
        return;
    }
    let all = units(&t, unit);
    let inc2 = inc.clone();
    let with = |u: &[(u64, u64)]| TornOp {
        pieces: pieces(u),
        ..t.clone()
    };
    let kept = ddmin(all, false, &mut |u| {
        !u.is_empty() && c.fails(&inc2, Some(&with(u)))
    });
    *torn = Some(with(&kept));
}

/// The crash state `included` and `torn` name, as the generator makes it (its id, kind,
/// label, mark, dropped writes and content hash): a drawn state of the same content and
/// choice if there is one, else the state appended to the epoch's.
fn final_state(
    run: &FsRun,
    opts: crate::states::StateOptions,
    index: usize,
    included: &[usize],
    torn: Option<&TornOp>,
) -> anyhow::Result<CrashState> {
    let log = Arc::new(std::fs::read(run.log.path())?);
    let mut generator = StateGenerator::new(opts, log);
    let wanted = [(included.to_vec(), torn.cloned())];
    for epoch in Epochs::new(LogHistory::open(run.log.path())?) {
        let epoch = epoch?;
        if epoch.index < index {
            generator.epoch_states(&epoch)?;
            continue;
        }
        return generator
            .epoch_states_and(&epoch, &wanted)?
            .into_iter()
            .find(|s| s.included == included && s.torn.as_ref() == torn)
            .context("the minimised state is not a crash state of its epoch");
    }
    anyhow::bail!("the replayed log has no epoch {index}")
}

/// A minimised crash state: the replayed run, its state failure replaced by the minimised
/// one (image included), and the report.
pub struct StateMinimised {
    pub run: FsRun,
    pub report: StateMinimiseReport,
}

/// Minimises the crash state of bundle `b` (replayed in `tmp`).
pub fn minimise_state(b: &FsBundle, tmp: &Path) -> Result<StateMinimised, StateMinimiseError> {
    let want = b.state.as_ref().ok_or(StateMinimiseError::NoCrashState)?;
    let replayed = bundle::replay(b, &b.config, tmp).map_err(StateMinimiseError::Replay)?;
    let original = replayed
        .state_failure
        .filter(|_| replayed.state_found)
        .ok_or(StateMinimiseError::DoesNotFail)?;
    let mut run = replayed.run;
    let at = epoch_at(&run, want.epoch).map_err(StateMinimiseError::Replay)?;
    let (mut inc, mut torn) = (want.included.clone(), want.torn.clone());
    let before = StateSize::of(&inc, torn.as_ref());
    let mut c = Checker {
        run: &run,
        at: &at,
        judge: Judge::new(&run.result.history),
        want,
        signature: crash_signature(&original),
        checks: 0,
    };
    let unit = b
        .state_options
        .atomic_bytes
        .max(nbd_server::log::SECTOR_BYTES);
    for _ in 0..MINIMISE_ROUNDS_MAX {
        let was = StateSize::of(&inc, torn.as_ref());
        round(&mut c, &mut inc, &mut torn, unit);
        if StateSize::of(&inc, torn.as_ref()) == was || c.checks >= STATE_CHECKS_MAX {
            break;
        }
    }
    let state = final_state(&run, b.state_options, want.epoch, &inc, torn.as_ref())
        .map_err(StateMinimiseError::Replay)?;
    let mut failure = c
        .failure(&inc, torn.as_ref())
        .expect("the kept state fails");
    let blocks = state_blocks(&at.prefix, &at.epoch, &state, &at.log);
    failure.image = state_image(&at.prefix, &blocks);
    failure.state = state;
    let report = StateMinimiseReport {
        version: MINIMISE_VERSION,
        seed: b.seed,
        signature: c.signature,
        checks: c.checks,
        before,
        after: StateSize::of(&inc, torn.as_ref()),
    };
    run.states.failures = vec![failure];
    Ok(StateMinimised { run, report })
}

/// Writes `m` (minimised from bundle `b`) as an fs bundle folder at `target`, which must
/// not exist: built beside it, then renamed with no replacing.
pub fn write_state_minimised(
    target: &Path,
    b: &FsBundle,
    m: &StateMinimised,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::fs::symlink_metadata(target).is_err(),
        "{} exists: minimisation never replaces a file; give another output (-o)",
        target.display()
    );
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".minimise-")
        .tempdir_in(parent)
        .with_context(|| format!("making a temporary folder in {}", parent.display()))?;
    bundle::write_bundle_files(tmp.path(), target, b.workload_kind, &m.run, b.state_options)?;
    let file = tmp.path().join(MINIMISE_FILE);
    std::fs::write(&file, serde_json::to_string_pretty(&m.report)?)
        .with_context(|| format!("writing {}", file.display()))?;
    for name in ["bundle.json", MINIMISE_FILE] {
        let p = tmp.path().join(name);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", p.display()))?;
    }
    crate::checker::sys::rename_noreplace(tmp.path(), target)
        .with_context(|| format!("renaming {} to {}", tmp.path().display(), target.display()))?;
    let _ = tmp.keep();
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", parent.display()))
}

/// What minimisation removed from a crash state, in words.
pub fn summary_text(r: &StateMinimiseReport) -> String {
    let (b, a) = (&r.before, &r.after);
    format!(
        "minimised the crash state of seed {} in {} checks, still failing as {}:\n  \
         writes kept whole {:>5} -> {}\n  torn writes       {:>5} -> {}\n  torn bytes landed \
         {:>5} -> {}\n",
        r.seed, r.checks, r.signature, b.kept, a.kept, b.torn, a.torn, b.torn_bytes, a.torn_bytes
    )
}
