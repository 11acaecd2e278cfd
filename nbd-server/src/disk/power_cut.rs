//! The power cut: which of the pending (non-durable) writes survive it, chosen by a seeded
//! generator, and the automatic cut after a number of writes.
//!
//! A cut first draws a mode: `none` (every pending write is lost), `some` (each one survives
//! with probability 1/2) or `torn` (as `some`, and a surviving write of several sectors lands
//! only partly, one time in two: a non-empty, proper subset of its 512-byte sectors, drawn by
//! [`torn_pieces`], the choice crashmonkey's torn crash states make too). The draws happen in
//! a fixed order, so a seed and the same pending writes give the same fates.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::cache::Entry;
use super::{DiskConfig, CRASH_AFTER_WRITES_RANDOM_MAX};
use crate::log::{sector_pieces, torn_pieces, CutMode, Fate};

/// What a power cut does to one pending write: its fate and the ranges of it that land.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    pub fate: Fate,
    pub pieces: Vec<(u64, u64)>,
}

/// Chooses the mode of a cut seeded with `seed` and the fate of each pending write (oldest
/// first).
pub fn choose(seed: u64, pending: &[Entry]) -> (CutMode, Vec<Choice>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mode = match rng.random_range(0..3u8) {
        0 => CutMode::None,
        1 => CutMode::Some,
        _ => CutMode::Torn,
    };
    let choices = pending
        .iter()
        .map(|e| choose_one(&mut rng, mode, e.offset, e.length))
        .collect();
    (mode, choices)
}

fn choose_one(rng: &mut ChaCha8Rng, mode: CutMode, offset: u64, length: u64) -> Choice {
    let keep = match mode {
        CutMode::None => false,
        CutMode::Some | CutMode::Torn => rng.random_bool(0.5),
    };
    if !keep {
        return Choice {
            fate: Fate::Dropped,
            pieces: Vec::new(),
        };
    }
    let sectors = sector_pieces(offset, length);
    if mode == CutMode::Torn && sectors.len() > 1 && rng.random_bool(0.5) {
        return Choice {
            fate: Fate::Torn,
            pieces: torn_pieces(rng, &sectors),
        };
    }
    Choice {
        fate: Fate::Kept,
        pieces: vec![(offset, length)],
    }
}

/// What a power cut did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PowerCutReport {
    pub seed: u64,
    pub mode: CutMode,
    pub pending: usize,
    pub kept: usize,
    pub torn: usize,
    pub dropped: usize,
    /// Sequence number of the power-cut record, when recording.
    pub log_seq: Option<u64>,
}

impl PowerCutReport {
    /// The counts of a cut's choices (no log record yet).
    pub fn of(seed: u64, mode: CutMode, choices: &[Choice]) -> Self {
        let count = |fate| choices.iter().filter(|c| c.fate == fate).count();
        PowerCutReport {
            seed,
            mode,
            pending: choices.len(),
            kept: count(Fate::Kept),
            torn: count(Fate::Torn),
            dropped: count(Fate::Dropped),
            log_seq: None,
        }
    }
}

/// The power-cut state of a disk: how many cuts happened, and the automatic cut's countdown.
pub struct PowerCut {
    /// Bumped by every cut: requests that arrived before it fail.
    gen: u64,
    /// Cuts done (part of the default seed of the next one).
    done: u64,
    writes_applied: u64,
    /// Cut the power once this many writes were applied.
    after_writes: Option<u64>,
    crash_seed: Option<u64>,
}

impl PowerCut {
    /// From the disk's `crash-after-writes` and `crash-seed`: with a seed and no count, the
    /// cut comes after 1..=[`CRASH_AFTER_WRITES_RANDOM_MAX`] writes, drawn from the seed.
    pub fn new(config: &DiskConfig) -> Self {
        let after_writes = config.crash_after_writes.or_else(|| {
            config.crash_seed.map(|s| {
                ChaCha8Rng::seed_from_u64(s).random_range(1..=CRASH_AFTER_WRITES_RANDOM_MAX)
            })
        });
        if let Some(n) = after_writes {
            tracing::info!("emulated disk: power cut after {n} writes");
        }
        PowerCut {
            gen: 0,
            done: 0,
            writes_applied: 0,
            after_writes,
            crash_seed: config.crash_seed,
        }
    }

    /// The generation requests arriving now belong to.
    pub fn gen(&self) -> u64 {
        self.gen
    }

    /// The seed of the next cut: `given`, else one derived from the crash seed and the
    /// number of earlier cuts.
    pub fn seed(&self, given: Option<u64>) -> u64 {
        given.unwrap_or_else(|| {
            self.crash_seed
                .unwrap_or(0)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(self.done)
        })
    }

    /// A write was applied; true when the automatic cut is due now (once).
    pub fn write_applied(&mut self) -> bool {
        self.writes_applied += 1;
        if self.after_writes == Some(self.writes_applied) {
            self.after_writes = None;
            return true;
        }
        false
    }

    /// The seed the automatic cut uses (the configured crash seed, as given).
    pub fn crash_seed(&self) -> Option<u64> {
        self.crash_seed
    }

    /// A cut happened.
    pub fn done(&mut self) {
        self.gen += 1;
        self.done += 1;
    }
}
