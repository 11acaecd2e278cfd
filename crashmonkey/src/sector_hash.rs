//! The content hashes crash-state generation keeps: one per 512-byte sector, and a
//! sector's contribution to a state's additive sum ([`crate::states`]).
//!
//! Both are XXH3 (128 bits), a non-cryptographic hash: a state's hash only has to tell
//! apart the states of one run, none of which an adversary chose, and a collision would at
//! worst skip checking one state as a duplicate of another (about 2^-128 per pair of distinct
//! sectors). It replaced BLAKE3 (issue 21): on a 1 GiB log every payload byte is hashed once,
//! and BLAKE3 of 512-byte inputs, even sixteen lanes wide, ran at about 1 GB/s here inside a
//! check, XXH3 at about 5 GB/s.
//!
//! Definitions (the tests check them against `xxhash_rust` directly):
//! - a sector's hash: `XXH3_128(sector bytes)`, 16 bytes little-endian;
//! - a part of a sector (a torn or unaligned write) over the sector's previous hash `prev`
//!   (zeros when none): `XXH3_128(prev ‖ offset u16 LE ‖ length u16 LE ‖ XXH3_128(part))`;
//! - a sector's contribution to a state's sum: the 24 bytes `sector number u64 LE ‖ hash`
//!   hashed with seeds 0 and 1, as four u64 lanes: seed 0's low and high halves, then seed
//!   1's. A state's hash is the lane-wise wrapping sum over its sectors, 64 hex digits.

use xxhash_rust::xxh3::{xxh3_128, xxh3_128_with_seed};

/// Bytes of one sector.
pub const SECTOR_HASH_INPUT_BYTES: usize = 512;
/// Bytes of one sector's hash.
pub const SECTOR_HASH_BYTES: usize = 16;

/// Content identity of one sector (see the module docs).
pub type SectorHash = [u8; SECTOR_HASH_BYTES];
/// Additive multiset hash of a whole image (four wrapping u64 lanes).
pub type Sum = [u64; 4];

/// The hash of `bytes`: a whole sector, or a part of one.
pub fn hash_bytes(bytes: &[u8]) -> SectorHash {
    xxh3_128(bytes).to_le_bytes()
}

/// Appends to `out` the hash of each 512-byte sector of `data`, in order.
///
/// # Panics
/// If `data`'s length is not a multiple of 512.
pub fn hash_sectors(data: &[u8], out: &mut Vec<SectorHash>) {
    assert_eq!(
        data.len() % SECTOR_HASH_INPUT_BYTES,
        0,
        "whole sectors only"
    );
    out.extend(data.chunks_exact(SECTOR_HASH_INPUT_BYTES).map(hash_bytes));
}

/// The hash of a sector whose previous hash was `prev` (`None`: never written) after
/// `length` bytes at `offset` in it were replaced by bytes hashing to `part`.
pub fn hash_partial(
    prev: Option<&SectorHash>,
    offset: u16,
    length: u16,
    part: &SectorHash,
) -> SectorHash {
    let mut input = [0u8; 2 * SECTOR_HASH_BYTES + 4];
    if let Some(p) = prev {
        input[..SECTOR_HASH_BYTES].copy_from_slice(p);
    }
    input[SECTOR_HASH_BYTES..SECTOR_HASH_BYTES + 2].copy_from_slice(&offset.to_le_bytes());
    input[SECTOR_HASH_BYTES + 2..SECTOR_HASH_BYTES + 4].copy_from_slice(&length.to_le_bytes());
    input[SECTOR_HASH_BYTES + 4..].copy_from_slice(part);
    hash_bytes(&input)
}

/// Sector `sector`'s contribution to an image's sum when it holds content `h`.
pub fn contribution(sector: u64, h: &SectorHash) -> Sum {
    let mut input = [0u8; 8 + SECTOR_HASH_BYTES];
    input[..8].copy_from_slice(&sector.to_le_bytes());
    input[8..].copy_from_slice(h);
    let (a, b) = (xxh3_128_with_seed(&input, 0), xxh3_128_with_seed(&input, 1));
    [a as u64, (a >> 64) as u64, b as u64, (b >> 64) as u64]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn every_sector_hashes_as_its_definition_says() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        for sectors in [0usize, 1, 2, 17, 200] {
            let mut data = vec![0u8; sectors * SECTOR_HASH_INPUT_BYTES];
            rng.fill(&mut data[..]);
            let mut got = vec![[7u8; SECTOR_HASH_BYTES]];
            hash_sectors(&data, &mut got);
            assert_eq!(got.len(), 1 + sectors, "appends one hash per sector");
            assert_eq!(got[0], [7u8; SECTOR_HASH_BYTES], "keeps what was there");
            for (i, s) in data.chunks_exact(SECTOR_HASH_INPUT_BYTES).enumerate() {
                assert_eq!(
                    got[1 + i],
                    xxh3_128(s).to_le_bytes(),
                    "{sectors} sectors: #{i}"
                );
            }
        }
    }

    /// The byte layouts of the module docs, written out independently.
    #[test]
    fn partial_hashes_and_contributions_follow_the_documented_layout() {
        let (prev, part) = ([3u8; 16], [9u8; 16]);
        let mut input = Vec::new();
        input.extend_from_slice(&prev);
        input.extend_from_slice(&[0x34, 0x12, 0x00, 0x01]);
        input.extend_from_slice(&part);
        assert_eq!(
            hash_partial(Some(&prev), 0x1234, 0x100, &part),
            xxh3_128(&input).to_le_bytes()
        );
        input[..16].fill(0);
        assert_eq!(
            hash_partial(None, 0x1234, 0x100, &part),
            xxh3_128(&input).to_le_bytes()
        );
        let mut c = 0x0102_0304_0506_0708u64.to_le_bytes().to_vec();
        c.extend_from_slice(&part);
        let (a, b) = (xxh3_128_with_seed(&c, 0), xxh3_128_with_seed(&c, 1));
        let lanes = contribution(0x0102_0304_0506_0708, &part);
        assert_eq!(lanes[0] as u128 | (lanes[1] as u128) << 64, a);
        assert_eq!(lanes[2] as u128 | (lanes[3] as u128) << 64, b);
        assert_ne!(
            lanes,
            contribution(0x0102_0304_0506_0709, &part),
            "the sector counts"
        );
    }

    #[test]
    #[should_panic(expected = "whole sectors only")]
    fn a_partial_sector_is_refused() {
        hash_sectors(&[0u8; 513], &mut Vec::new());
    }
}
