//! Run records: the campaign folder's ledger of runs done. A campaign writes one record per
//! stretch of runs (at most [`RUNS_PER_RECORD_MAX`] runs, or `--record-seconds`, by default
//! [`RECORD_SECONDS_DEFAULT`] seconds),
//! atomically (a temporary file, synced, renamed), after the bundles it names; a record is
//! never changed after. The findings are the records' tallies merged, and merging is
//! associative and commutative, so any order of records (a resumed campaign's, merged
//! shards') gives the same findings.

use super::FolderError;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Record format version.
pub const RECORD_VERSION: u32 = 1;
/// Runs one record covers at most.
pub const RUNS_PER_RECORD_MAX: u64 = 1 << 16;
/// Seconds of running one record covers by default: what a SIGKILL can make a rerun redo.
/// Writing a record syncs about five times (the record, its folder, sled's flush): with a
/// record every 1024 runs, a 100,000-run release campaign waited about 1.2 s more on them
/// than it computed (5.0 s wall, 3.8 s CPU); one record a second bounds that wait to a few
/// syncs a second, whatever the runs/s.
pub const RECORD_SECONDS_DEFAULT: f64 = 1.0;
/// Seeds a finding lists (the lowest).
pub const SEEDS_PER_FINDING_LISTED_MAX: usize = 16;
/// The folder of records inside a campaign folder.
pub const RUNS_DIR: &str = "runs";

/// How many runs of one failure signature a stretch of runs (or a whole folder) holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub signature: String,
    pub count: u64,
    /// The lowest failing seed.
    pub first_seed: u64,
    /// The failing run with the fewest scheduler steps (the lowest seed among equals).
    pub smallest_seed: u64,
    pub smallest_steps: u64,
    /// The lowest failing seeds, ascending, at most [`SEEDS_PER_FINDING_LISTED_MAX`].
    pub seeds: Vec<u64>,
}

impl Tally {
    pub fn one(signature: String, seed: u64, steps: u64) -> Tally {
        Tally {
            signature,
            count: 1,
            first_seed: seed,
            smallest_seed: seed,
            smallest_steps: steps,
            seeds: vec![seed],
        }
    }

    /// Adds `other` (of the same signature, other runs) to this tally.
    pub fn absorb(&mut self, other: &Tally) {
        debug_assert_eq!(self.signature, other.signature);
        self.count += other.count;
        self.first_seed = self.first_seed.min(other.first_seed);
        if (other.smallest_steps, other.smallest_seed) < (self.smallest_steps, self.smallest_seed) {
            self.smallest_steps = other.smallest_steps;
            self.smallest_seed = other.smallest_seed;
        }
        self.seeds.extend_from_slice(&other.seeds);
        self.seeds.sort_unstable();
        self.seeds.dedup();
        self.seeds.truncate(SEEDS_PER_FINDING_LISTED_MAX);
    }

    /// The seeds whose bundles the folder keeps for this finding (first, then smallest).
    pub fn bundled_seeds(&self) -> Vec<u64> {
        let mut s = vec![self.first_seed];
        if self.smallest_seed != self.first_seed {
            s.push(self.smallest_seed);
        }
        debug_assert!(s.len() <= super::BUNDLES_PER_FINDING_MAX);
        s
    }
}

/// One record: a stretch of a shard's runs and what failed in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    /// The campaign's id (see `CampaignFile::id`).
    pub campaign: String,
    /// `K/N`.
    pub shard: String,
    /// The shard's own run number of the first run here (run i of the campaign is the
    /// shard's run (i - K) / N).
    pub first_run: u64,
    pub runs: u64,
    /// Scheduler steps of all the runs.
    pub steps: u64,
    /// Failing runs.
    pub failures: u64,
    /// Crash states checked by all the runs (an fs campaign's records; absent in a race
    /// campaign's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crash_states: Option<u64>,
    /// The failing seeds, the first `FAILING_SEEDS_LISTED_MAX` in run order.
    pub failing_seeds: Vec<u64>,
    /// One tally per signature, by signature.
    pub findings: Vec<Tally>,
}

impl Record {
    /// The record's file name: campaign, shard and first run, so that records of one
    /// campaign's shards never collide and a merge takes each run once.
    pub fn file_name(&self) -> String {
        format!(
            "{}-{}-{:020}.json",
            self.campaign,
            self.shard.replace('/', "of"),
            self.first_run
        )
    }

    /// Writes the record into `dir/runs/` atomically and durably; a record of the same runs
    /// already there is never replaced (it is the truth), the write is refused.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, FolderError> {
        let runs = dir.join(RUNS_DIR);
        std::fs::create_dir_all(&runs).map_err(|e| FolderError::io(&runs, e))?;
        let path = runs.join(self.file_name());
        let text = serde_json::to_string_pretty(self).expect("a record serializes");
        write_new(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Reads and checks one record file.
    pub fn read(path: &Path) -> Result<Record, FolderError> {
        let text = std::fs::read(path).map_err(|e| FolderError::io(path, e))?;
        let r: Record = serde_json::from_slice(&text)
            .map_err(|e| FolderError::corrupt(path, format!("not a run record: {e}")))?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if r.version != RECORD_VERSION || name.as_deref() != Some(&r.file_name()) {
            return Err(FolderError::corrupt(
                path,
                format!(
                    "record version {} named {:?} (expected version {RECORD_VERSION}, name {})",
                    r.version,
                    name.unwrap_or_default(),
                    r.file_name()
                ),
            ));
        }
        Ok(r)
    }
}

/// Every record file of `dir`, by name.
pub fn record_paths(dir: &Path) -> Result<Vec<PathBuf>, FolderError> {
    let runs = dir.join(RUNS_DIR);
    let entries = match std::fs::read_dir(&runs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(FolderError::io(&runs, e)),
    };
    let mut paths = Vec::new();
    for e in entries {
        let p = e.map_err(|e| FolderError::io(&runs, e))?.path();
        if p.extension().is_some_and(|x| x == "json") {
            paths.push(p);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Writes `data` at `path` through a temporary file beside it that is synced, then renamed
/// over `path`; the folder is synced so the rename lasts. The temporary file is removed if
/// anything fails.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<(), FolderError> {
    write_synced(path, data, true)
}

/// As [`write_atomically`], refused if `path` exists.
pub fn write_new(path: &Path, data: &[u8]) -> Result<(), FolderError> {
    write_synced(path, data, false)
}

fn write_synced(path: &Path, data: &[u8], replace: bool) -> Result<(), FolderError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| FolderError::io(dir, e))?;
    tmp.write_all(data)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| FolderError::io(tmp.path(), e))?;
    if replace {
        tmp.persist(path)
            .map_err(|e| FolderError::io(path, e.error))?;
    } else {
        tmp.persist_noclobber(path)
            .map_err(|e| FolderError::io(path, e.error))?;
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| FolderError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_in_any_order() {
        let t = |seed, steps| Tally::one("s".into(), seed, steps);
        let parts = [t(9, 30), t(4, 50), t(7, 30), t(20, 10)];
        let mut a = parts[0].clone();
        parts[1..].iter().for_each(|p| a.absorb(p));
        let mut b = parts[3].clone();
        parts[..3].iter().rev().for_each(|p| b.absorb(p));
        assert_eq!(a, b);
        assert_eq!((a.count, a.first_seed, a.smallest_seed), (4, 4, 20));
        assert_eq!(a.seeds, vec![4, 7, 9, 20]);
        let mut c = t(9, 30);
        c.absorb(&t(7, 30));
        assert_eq!(
            c.smallest_seed, 7,
            "the lowest seed among equally small runs"
        );
        assert_eq!(c.bundled_seeds(), vec![7]);
    }
}
