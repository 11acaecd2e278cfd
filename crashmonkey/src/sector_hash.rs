//! BLAKE3 of many 512-byte sectors at once: the same hash as `blake3::hash` of each sector,
//! computed with BLAKE3's SIMD "hash many inputs" mode.
//!
//! A sector is one BLAKE3 chunk of eight 64-byte blocks, so `blake3::hash` of it runs eight
//! compressions one after the other, one block at a time (a third of the time of crash-state
//! generation on a 1 GiB log, issue 21). BLAKE3's `hash_many` compresses up to 16 same-length
//! chunks side by side in SIMD lanes (AVX-512; 8 with AVX2, 4 with SSE4.1); called with the
//! flags of a one-chunk root it gives exactly `blake3::hash` of each input.
//!
//! `hash_many` belongs to the crate's `platform` module, public but documented as unstable:
//! the workspace pins the exact `blake3` version, and the tests below compare every result
//! with `blake3::hash`, so an upgrade that changed it fails here, not in a campaign.

use std::sync::OnceLock;

use blake3::platform::Platform;
use blake3::IncrementCounter;

/// Bytes of one sector.
pub const SECTOR_HASH_INPUT_BYTES: usize = 512;
/// BLAKE3's initialisation vector (its key words when hashing, not keyed).
const BLAKE3_IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
/// BLAKE3's domain flags: the first block of a chunk, its last, and the root output.
const CHUNK_START: u8 = 1;
const CHUNK_END: u8 = 1 << 1;
const ROOT: u8 = 1 << 3;
/// Sectors handed to `hash_many` per call, at most (its SIMD degree is at most 16).
const SECTORS_PER_CALL_MAX: usize = 64;

fn platform() -> Platform {
    static PLATFORM: OnceLock<Platform> = OnceLock::new();
    *PLATFORM.get_or_init(Platform::detect)
}

/// Appends to `out` the BLAKE3 hash of each 512-byte sector of `data`, in order.
///
/// # Panics
/// If `data`'s length is not a multiple of 512.
pub fn hash_sectors(data: &[u8], out: &mut Vec<[u8; 32]>) {
    hash_sectors_on(platform(), data, out)
}

/// [`hash_sectors`] with BLAKE3's implementation for `platform` (the tests run each).
fn hash_sectors_on(platform: Platform, data: &[u8], out: &mut Vec<[u8; 32]>) {
    assert_eq!(
        data.len() % SECTOR_HASH_INPUT_BYTES,
        0,
        "whole sectors only"
    );
    let mut inputs: Vec<&[u8; SECTOR_HASH_INPUT_BYTES]> = Vec::with_capacity(SECTORS_PER_CALL_MAX);
    let mut hashes = [0u8; 32 * SECTORS_PER_CALL_MAX];
    for group in data.chunks(SECTOR_HASH_INPUT_BYTES * SECTORS_PER_CALL_MAX) {
        inputs.clear();
        inputs.extend(
            group
                .chunks_exact(SECTOR_HASH_INPUT_BYTES)
                .map(|s| <&[u8; SECTOR_HASH_INPUT_BYTES]>::try_from(s).expect("512 bytes")),
        );
        let bytes = &mut hashes[..32 * inputs.len()];
        platform.hash_many(
            &inputs,
            &BLAKE3_IV,
            0,
            IncrementCounter::No,
            0,
            CHUNK_START,
            CHUNK_END | ROOT,
            bytes,
        );
        out.extend(
            bytes
                .chunks_exact(32)
                .map(|h| <[u8; 32]>::try_from(h).expect("32 bytes")),
        );
    }
}

/// Bytes of one BLAKE3 block: the longest input [`hash_block`] takes.
pub const BLAKE3_BLOCK_BYTES: usize = 64;

/// `blake3::hash` of an input of at most one block, as its eight little-endian words: one
/// compression, without the incremental hasher's set-up (each sector's contribution to a
/// state's sum is one of these, two million for a 1 GiB log).
///
/// # Panics
/// If `input` is longer than [`BLAKE3_BLOCK_BYTES`].
pub fn hash_block(input: &[u8]) -> [u32; 8] {
    hash_block_on(platform(), input)
}

fn hash_block_on(platform: Platform, input: &[u8]) -> [u32; 8] {
    assert!(input.len() <= BLAKE3_BLOCK_BYTES, "one block at most");
    let mut block = [0u8; BLAKE3_BLOCK_BYTES];
    block[..input.len()].copy_from_slice(input);
    let mut cv = BLAKE3_IV;
    platform.compress_in_place(
        &mut cv,
        &block,
        input.len() as u8,
        0,
        CHUNK_START | CHUNK_END | ROOT,
    );
    cv
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every implementation this machine has: the one `hash_sectors` uses (the widest), and
    /// the narrower ones another machine would use.
    fn platforms() -> Vec<Platform> {
        let mut out = vec![Platform::detect(), Platform::portable()];
        #[cfg(target_arch = "x86_64")]
        out.extend(
            [Platform::sse2(), Platform::sse41(), Platform::avx2()]
                .into_iter()
                .flatten(),
        );
        out
    }

    #[test]
    fn every_sector_hashes_as_blake3_hash_does() {
        for platform in platforms() {
            every_sector_hashes_as_blake3_hash_does_on(platform);
        }
    }

    fn every_sector_hashes_as_blake3_hash_does_on(platform: Platform) {
        let degree = platform.simd_degree();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        // Counts below, at and around the SIMD degrees and the per-call bound.
        for sectors in [0usize, 1, 2, 3, 4, 7, 8, 15, 16, 17, 63, 64, 65, 129, 200] {
            let mut data = vec![0u8; sectors * SECTOR_HASH_INPUT_BYTES];
            rng.fill(&mut data[..]);
            if sectors > 2 {
                data[SECTOR_HASH_INPUT_BYTES..2 * SECTOR_HASH_INPUT_BYTES].fill(0);
            }
            let mut got = vec![[7u8; 32]];
            hash_sectors_on(platform, &data, &mut got);
            assert_eq!(got.len(), 1 + sectors, "appends one hash per sector");
            assert_eq!(got[0], [7u8; 32], "keeps what was there");
            for (i, s) in data.chunks_exact(SECTOR_HASH_INPUT_BYTES).enumerate() {
                assert_eq!(
                    got[1 + i],
                    *blake3::hash(s).as_bytes(),
                    "SIMD degree {degree}, {sectors} sectors: #{i}"
                );
            }
        }
    }

    /// Every length from empty to a whole block, on every implementation.
    #[test]
    fn a_block_hashes_as_blake3_hash_does() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(40);
        let mut input = [0u8; BLAKE3_BLOCK_BYTES];
        rng.fill(&mut input[..]);
        for platform in platforms() {
            for len in 0..=BLAKE3_BLOCK_BYTES {
                let words = hash_block_on(platform, &input[..len]);
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                assert_eq!(
                    bytes,
                    blake3::hash(&input[..len]).as_bytes(),
                    "{len} bytes, SIMD degree {}",
                    platform.simd_degree()
                );
            }
        }
    }

    #[test]
    #[should_panic(expected = "one block at most")]
    fn more_than_a_block_is_refused() {
        hash_block(&[0u8; 65]);
    }

    #[test]
    #[should_panic(expected = "whole sectors only")]
    fn a_partial_sector_is_refused() {
        hash_sectors(&[0u8; 513], &mut Vec::new());
    }
}
