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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::cache::{Cache, EntryData};

    /// Pending entries: one write of `sectors` 512-byte sectors per element, 8 KiB apart.
    fn pending(sectors: &[u64]) -> Vec<Entry> {
        let mut c = Cache::new(1 << 30, 1 << 20, "test");
        for (i, &n) in sectors.iter().enumerate() {
            let data = EntryData::Zeroes { trim: false };
            c.insert(i as u64 * 8192, n * 512, data, None, None);
        }
        c.drain_all()
    }

    /// Every mode is drawn over seeds; `none` drops everything; a write of one sector is
    /// never torn; a torn write lands a proper, non-empty part of itself; a kept one lands
    /// whole; the report counts the fates.
    #[test]
    fn each_mode_chooses_fates_as_documented() {
        let entries = pending(&[1, 8, 1, 8, 3, 16]);
        let mut modes = std::collections::HashSet::new();
        // Fates seen in `some` and `torn` cuts: each write survives one time in two.
        let mut survived = [0usize; 2];
        for seed in 0..200 {
            let (mode, choices) = choose(seed, &entries);
            assert_eq!((mode, choices.clone()), choose(seed, &entries), "seeded");
            modes.insert(mode as u32);
            for (e, c) in entries.iter().zip(&choices) {
                match c.fate {
                    Fate::Dropped => assert!(c.pieces.is_empty()),
                    Fate::Kept => assert_eq!(c.pieces, [(e.offset, e.length)]),
                    Fate::Torn => {
                        assert_eq!(mode, CutMode::Torn);
                        assert!(e.length > 512, "a one-sector write torn");
                        let landed: u64 = c.pieces.iter().map(|p| p.1).sum();
                        assert!(landed > 0 && landed < e.length, "{c:?} of {}", e.length);
                    }
                }
                if mode == CutMode::None {
                    assert_eq!(c.fate, Fate::Dropped);
                } else {
                    survived[(c.fate != Fate::Dropped) as usize] += 1;
                }
            }
            let r = PowerCutReport::of(seed, mode, &choices);
            let count = |f| choices.iter().filter(|c| c.fate == f).count();
            let counts = (r.pending, r.kept, r.torn, r.dropped);
            let want = (
                6,
                count(Fate::Kept),
                count(Fate::Torn),
                count(Fate::Dropped),
            );
            assert_eq!(counts, want);
        }
        assert_eq!(modes.len(), 3, "modes drawn: {modes:?}");
        let [dropped, kept] = survived;
        let share = kept as f64 / (kept + dropped) as f64;
        assert!(
            (0.4..0.6).contains(&share),
            "{kept} of {} survived",
            kept + dropped
        );
    }

    /// `crash-after-writes=N` cuts at the N-th applied write, once; `crash-seed` alone draws N
    /// in 1..=1000 from the seed; default cut seeds come from the crash seed and the number of
    /// cuts so far, and every cut moves the generation.
    #[test]
    fn the_automatic_cut_counts_writes_and_derives_seeds() {
        let config = DiskConfig {
            crash_after_writes: Some(3),
            crash_seed: Some(5),
            ..DiskConfig::default()
        };
        let mut cut = PowerCut::new(&config);
        let due: Vec<bool> = (0..6).map(|_| cut.write_applied()).collect();
        assert_eq!(due, [false, false, true, false, false, false]);
        assert_eq!((cut.crash_seed(), cut.seed(Some(77))), (Some(5), 77));
        let first = cut.seed(None);
        assert_eq!(first, 5u64.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        assert_eq!(cut.gen(), 0);
        cut.done();
        assert_eq!((cut.gen(), cut.seed(None)), (1, first + 1));
        let mut drawn = std::collections::HashSet::new();
        for seed in 0..50 {
            let config = DiskConfig {
                crash_seed: Some(seed),
                ..DiskConfig::default()
            };
            let mut cut = PowerCut::new(&config);
            let n = (1..=CRASH_AFTER_WRITES_RANDOM_MAX + 1)
                .find(|_| cut.write_applied())
                .expect("a cut within the maximum");
            let want = ChaCha8Rng::seed_from_u64(seed).random_range(1..=1000);
            assert_eq!(n, want, "seed {seed}");
            drawn.insert(n);
        }
        assert!(drawn.len() > 40, "the count follows the seed");
        let mut never = PowerCut::new(&DiskConfig::default());
        assert!((0..2000).all(|_| !never.write_applied()));
    }
}
