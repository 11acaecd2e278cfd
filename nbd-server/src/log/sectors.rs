//! Sector arithmetic shared by everything that tears writes: the emulated disk's power cut and
//! crashmonkey's torn crash states. One torn-write choice for both, so that a seed tears a
//! write the same way wherever it is drawn.

use rand::Rng;

use super::SECTOR_BYTES;

/// Splits `[offset, offset+length)` at absolute multiples of `unit`.
pub fn unit_pieces(offset: u64, length: u64, unit: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let end = offset + length;
    let mut at = offset;
    while at < end {
        let stop = ((at / unit + 1) * unit).min(end);
        out.push((at, stop - at));
        at = stop;
    }
    out
}

/// Splits `[offset, offset+length)` at absolute 512-byte sector boundaries.
pub fn sector_pieces(offset: u64, length: u64) -> Vec<(u64, u64)> {
    unit_pieces(offset, length, SECTOR_BYTES)
}

/// Joins adjacent ranges.
pub fn merge_pieces(pieces: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in pieces {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// A torn write: which of its `units` (at least two, in order) land, as merged ranges. Each
/// unit lands with probability 1/2; if all or none were drawn, one unit chosen at random is
/// flipped, so that the result is a non-empty, proper subset. The draws are part of every
/// seeded result that tears (power-cut records, crash states): keep their order.
pub fn torn_pieces<R: Rng + ?Sized>(rng: &mut R, units: &[(u64, u64)]) -> Vec<(u64, u64)> {
    assert!(units.len() > 1, "only a write of several units can tear");
    let mut keep: Vec<bool> = units.iter().map(|_| rng.random_bool(0.5)).collect();
    if keep.iter().all(|&k| k) {
        let i = rng.random_range(0..keep.len());
        keep[i] = false;
    }
    if keep.iter().all(|&k| !k) {
        let i = rng.random_range(0..keep.len());
        keep[i] = true;
    }
    merge_pieces(units.iter().zip(&keep).filter(|(_, &k)| k).map(|(&p, _)| p))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn pieces_split_at_absolute_boundaries_and_merge_back() {
        assert_eq!(
            sector_pieces(500, 1100),
            [(500, 12), (512, 512), (1024, 512), (1536, 64)]
        );
        assert_eq!(
            merge_pieces(sector_pieces(500, 1100).into_iter()),
            [(500, 1100)]
        );
        assert_eq!(unit_pieces(0, 8192, 4096), [(0, 4096), (4096, 4096)]);
    }

    #[test]
    fn torn_pieces_are_a_proper_nonempty_subset() {
        let units = sector_pieces(0, 4096);
        for seed in 0..200 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let kept = torn_pieces(&mut rng, &units);
            let bytes: u64 = kept.iter().map(|p| p.1).sum();
            assert!(bytes > 0 && bytes < 4096, "seed {seed}: {kept:?}");
            assert!(kept.iter().all(|p| p.0 % SECTOR_BYTES == 0));
        }
    }

    /// Ranges that do not touch stay apart; a unit larger than the range gives one piece.
    #[test]
    fn merging_joins_only_adjacent_ranges() {
        let apart = [(0, 512), (1024, 512), (1536, 100)];
        assert_eq!(merge_pieces(apart.into_iter()), [(0, 512), (1024, 612)]);
        assert_eq!(unit_pieces(100, 50, 4096), [(100, 50)]);
        assert_eq!(unit_pieces(100, 0, 512), []);
    }

    /// Each unit lands about half the time, and a seed tears a write the same way in every
    /// version (crash states and power-cut records of old runs replay): the draws are pinned.
    #[test]
    fn each_unit_lands_half_the_time_and_the_draws_are_pinned() {
        let units = sector_pieces(0, 8 * 512);
        let mut landed = [0u32; 8];
        for seed in 0..2000 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            for (off, len) in torn_pieces(&mut rng, &units) {
                for s in off / 512..(off + len) / 512 {
                    landed[s as usize] += 1;
                }
            }
        }
        assert!(
            landed.iter().all(|&n| (850..1150).contains(&n)),
            "{landed:?}"
        );
        let pinned: Vec<Vec<(u64, u64)>> = (0..4)
            .map(|seed| {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                torn_pieces(&mut rng, &units)
            })
            .collect();
        let want: [&[(u64, u64)]; 4] = [
            &[(512, 512), (1536, 512)],
            &[(0, 1024), (1536, 1024), (3072, 1024)],
            &[(2048, 512), (3584, 512)],
            &[(512, 1536), (3072, 1024)],
        ];
        assert_eq!(pinned, want, "a seed tears differently than it used to");
        // All-kept and none-kept draws flip one unit chosen at random: two units give one of
        // them, never both, each half the time.
        let two = sector_pieces(0, 1024);
        let mut first = 0;
        for seed in 0..2000 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let kept = torn_pieces(&mut rng, &two);
            assert!(kept == [(0, 512)] || kept == [(512, 512)], "{kept:?}");
            first += (kept == [(0, 512)]) as u32;
        }
        assert!(
            (850..1150).contains(&first),
            "the first unit alone {first} times of 2000"
        );
    }
}
