//! Minimised runs in a campaign folder: `race --out DIR --minimise` shrinks each finding's
//! smallest failing run (`race::minimise`) and keeps the result inside that run's bundle, as
//! `race-seed-N/minimised/`, a bundle of its own beside the original's files. The original is
//! never replaced, a finding still keeps at most two bundle folders, and a bundle removed
//! because a smaller run superseded it takes its minimised run with it.

use super::record::Tally;
use super::{bundle_name, FolderError};
use crate::race::minimise::{self, MinimiseReport, MINIMISE_FILE};
use serde::Serialize;
use std::path::Path;

/// The folder, inside a bundle, that holds its minimised run.
pub const MINIMISED_DIR: &str = "minimised";

/// A finding's minimised run, as `crashmonkey findings` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MinimisedRun {
    /// Its bundle, relative to the folder (`race-seed-N/minimised`).
    pub bundle: String,
    /// Candidate runs minimisation made.
    pub runs: u64,
    pub before: minimise::RunSize,
    pub after: minimise::RunSize,
}

/// The minimised run in the bundle of `seed`, if there is one; it must load and fail with
/// `signature`.
pub fn read(dir: &Path, seed: u64, signature: &str) -> Result<Option<MinimisedRun>, FolderError> {
    let rel = format!("{}/{MINIMISED_DIR}", bundle_name(seed));
    let at = dir.join(&rel);
    if !at.exists() {
        return Ok(None);
    }
    let file = at.join(MINIMISE_FILE);
    let text = std::fs::read(&file).map_err(|e| FolderError::io(&file, e))?;
    let r: MinimiseReport = serde_json::from_slice(&text)
        .map_err(|e| FolderError::corrupt(&file, format!("not a minimisation report: {e}")))?;
    let b = crate::race::load_bundle(&at)
        .map_err(|e| FolderError::corrupt(&at, format!("bundle unusable: {e:#}")))?;
    let sig = b
        .failures
        .first()
        .map(|f| super::signature::race_signature(&b.config, f, &b.workload));
    if r.signature != signature || sig.as_deref() != Some(signature) {
        return Err(FolderError::corrupt(
            &at,
            format!("the minimised run shows {sig:?}, not finding {signature:?}"),
        ));
    }
    Ok(Some(MinimisedRun {
        bundle: rel,
        runs: r.runs,
        before: r.before,
        after: r.after,
    }))
}

/// Minimises the smallest run of each of `tallies` that has no minimised run yet, within
/// `runs_max` candidate runs each; `progress` hears (finding number, runs, size). Returns
/// how many it minimised; a run that cannot be minimised is skipped with a warning.
pub fn minimise_findings(
    dir: &Path,
    tallies: &[Tally],
    runs_max: u64,
    progress: &mut dyn FnMut(usize, u64, &minimise::RunSize),
) -> Result<usize, FolderError> {
    let mut made = 0;
    for (n, t) in tallies.iter().enumerate() {
        let bundle = dir.join(bundle_name(t.smallest_seed));
        let target = bundle.join(MINIMISED_DIR);
        if target.exists() {
            continue;
        }
        let b = crate::race::load_bundle(&bundle)
            .map_err(|e| FolderError::corrupt(&bundle, format!("bundle unusable: {e:#}")))?;
        // A run that cannot be minimised (it no longer fails as recorded) costs the campaign
        // nothing: it is said, and the finding keeps its bundle as it is.
        let m = match minimise::minimise(&b, runs_max, &mut |runs, size| progress(n, runs, size)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(bundle = %bundle.display(), "not minimised: {e}");
                continue;
            }
        };
        minimise::write_minimised(&target, &m)
            .map_err(|e| FolderError::corrupt(&target, format!("{e:#}")))?;
        made += 1;
    }
    Ok(made)
}
