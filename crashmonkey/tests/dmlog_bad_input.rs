//! dm-log-writes import on damaged or hostile input: the format has no checksums, so every
//! field is checked on its own. An import either fails with an error or produces a log whose
//! records are exactly the input's entries (by an independent parser with checked arithmetic).

use std::path::Path;

use crashmonkey::dmlog::{self, DM_DISCARD, DM_FLUSH, DM_FUA, DM_MAGIC, DM_MARK, DM_VERSION};
use nbd_server::log::{LogReader, RecordKind};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DISK_BYTES: u64 = 1 << 20;

/// One entry as the test writes it (and as its own parser reads it back).
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    sector: u64,
    nr: u64,
    flags: u64,
    data_len: u64,
    data: Vec<u8>,
}

fn build(sectorsize: u64, entries: &[Entry]) -> Vec<u8> {
    let ss = sectorsize as usize;
    let mut v = vec![0u8; ss];
    v[0..8].copy_from_slice(&DM_MAGIC.to_le_bytes());
    v[8..16].copy_from_slice(&DM_VERSION.to_le_bytes());
    v[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    v[24..28].copy_from_slice(&(sectorsize as u32).to_le_bytes());
    for e in entries {
        let mut s = vec![0u8; ss];
        s[0..8].copy_from_slice(&e.sector.to_le_bytes());
        s[8..16].copy_from_slice(&e.nr.to_le_bytes());
        s[16..24].copy_from_slice(&e.flags.to_le_bytes());
        s[24..32].copy_from_slice(&e.data_len.to_le_bytes());
        if e.flags & DM_MARK != 0 {
            s[32..32 + e.data.len()].copy_from_slice(&e.data);
        }
        v.extend_from_slice(&s);
        if e.flags & DM_MARK == 0 {
            v.extend_from_slice(&e.data);
        }
    }
    v
}

fn write(sector: u64, nr: u64, byte: u8) -> Entry {
    Entry {
        sector,
        nr,
        flags: 0,
        data_len: nr * 512,
        data: vec![byte; (nr * 512) as usize],
    }
}

/// What a correct import must produce for `bytes`: the (kind, offset, length) of each record,
/// or `None` where it must refuse. Checked arithmetic throughout; flushes before the entry.
fn expected(bytes: &[u8], disk_bytes: Option<u64>) -> Option<Vec<(RecordKind, u64, u64)>> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    if u64_at(0)? != DM_MAGIC || u64_at(8)? != DM_VERSION {
        return None;
    }
    let ss = u32::from_le_bytes(bytes.get(24..28)?.try_into().ok()?) as u64;
    if !ss.is_power_of_two() || !(512..=65536).contains(&ss) {
        return None;
    }
    let count = u64_at(16)?;
    let mut at = ss as usize;
    let mut parsed = vec![];
    for _ in 0..count {
        let (sector, nr, flags, data_len) = (
            u64_at(at)?,
            u64_at(at + 8)?,
            u64_at(at + 16)?,
            u64_at(at + 24)?,
        );
        bytes.get(at..at + ss as usize)?;
        at += ss as usize;
        if flags & DM_MARK != 0 {
            if data_len > ss - 32 {
                return None;
            }
        } else if flags & DM_DISCARD == 0 && nr > 0 {
            let n = nr.checked_mul(ss).filter(|&n| n <= 64 << 20)?;
            bytes.get(at..at + n as usize)?;
            at += n as usize;
        }
        parsed.push((sector, nr, flags));
    }
    let end_of = |s: u64, n: u64| s.checked_add(n)?.checked_mul(ss);
    let disk = match disk_bytes {
        Some(d) => d,
        None => {
            let mut end = 0u64;
            for &(s, n, _) in &parsed {
                end = end.max(end_of(s, n)?);
            }
            end.checked_next_multiple_of(4096)?
        }
    };
    let mut out = vec![];
    for (s, n, flags) in parsed {
        if end_of(s, n)? > disk {
            return None;
        }
        if flags & DM_FLUSH != 0 {
            out.push((RecordKind::Flush, 0, 0));
        }
        if flags & DM_MARK != 0 {
            out.push((RecordKind::Mark, 0, 0));
        } else if flags & DM_DISCARD != 0 {
            out.push((RecordKind::Trim, s * ss, n * ss));
        } else if n > 0 {
            out.push((RecordKind::Write, s * ss, n * ss));
        }
    }
    Some(out)
}

/// Imports `bytes` and checks the outcome against [`expected`]; true if it was imported.
fn check(dir: &Path, bytes: &[u8], disk_bytes: Option<u64>, what: &str) -> bool {
    let input = dir.join("in.dmlog");
    let out = dir.join("out.log");
    std::fs::write(&input, bytes).unwrap();
    let got = dmlog::import(&input, &out, disk_bytes);
    match (expected(bytes, disk_bytes), got) {
        (None, Err(_)) => false,
        (None, Ok(s)) => panic!("{what}: imported input it must refuse: {s:?}"),
        (Some(_), Err(e)) => panic!("{what}: refused valid input: {e}"),
        (Some(want), Ok(_)) => {
            let got: Vec<_> = LogReader::open(&out)
                .unwrap()
                .map(|r| {
                    let r = r.unwrap();
                    let (off, len) = if matches!(r.kind, RecordKind::Write | RecordKind::Trim) {
                        (r.header.offset, r.header.length)
                    } else {
                        (0, 0)
                    };
                    (r.kind, off, len)
                })
                .collect();
            assert_eq!(got, want, "{what}");
            true
        }
    }
}

#[test]
fn entries_whose_byte_range_overflows_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // sector * 512 wraps to 0 in 64 bits: it must not land at byte 0.
    let wraps = Entry {
        sector: 1 << 55,
        ..write(0, 1, 0xab)
    };
    let discard = Entry {
        sector: 8,
        nr: u64::MAX / 256,
        flags: DM_DISCARD,
        data_len: 0,
        data: vec![],
    };
    let near_end = Entry {
        sector: u64::MAX - 1,
        nr: 4,
        flags: DM_DISCARD,
        data_len: 0,
        data: vec![],
    };
    for (name, e) in [
        ("wraps", wraps),
        ("discard", discard),
        ("near_end", near_end),
    ] {
        let bytes = build(512, &[write(0, 8, 1), e]);
        for disk in [Some(DISK_BYTES), None] {
            let input = dir.path().join("in.dmlog");
            std::fs::write(&input, &bytes).unwrap();
            let r = dmlog::import(&input, &dir.path().join("out.log"), disk);
            assert!(r.is_err(), "{name} with disk {disk:?} was imported: {r:?}");
        }
    }
}

fn random_log(rng: &mut ChaCha8Rng) -> (u64, Vec<Entry>) {
    let ss = [512u64, 4096][rng.random_range(0..2)];
    let sectors = DISK_BYTES / ss;
    let mut entries = vec![];
    for _ in 0..rng.random_range(0..12) {
        let sector = rng.random_range(0..sectors);
        let nr = rng.random_range(1..=(sectors - sector).min(8));
        let e = match rng.random_range(0..6) {
            0 => Entry {
                sector: 0,
                nr: 0,
                flags: DM_FLUSH,
                data_len: 0,
                data: vec![],
            },
            1 => Entry {
                sector: 0,
                nr: 0,
                flags: DM_MARK,
                data_len: 2,
                data: b"m1".to_vec(),
            },
            2 => Entry {
                sector,
                nr,
                flags: DM_DISCARD,
                data_len: 0,
                data: vec![],
            },
            f => {
                let mut data = vec![0u8; (nr * ss) as usize];
                rng.fill_bytes(&mut data);
                Entry {
                    sector,
                    nr,
                    flags: if f == 3 { DM_FUA | DM_FLUSH } else { 0 },
                    data_len: nr * ss,
                    data,
                }
            }
        };
        entries.push(e);
    }
    (ss, entries)
}

/// Seeded mutations of valid logs: flipped bytes, fields set to edge values, truncation.
#[test]
fn mutated_logs_import_exactly_or_fail_cleanly() {
    let seed: u64 = std::env::var("DMLOG_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xd31_2026);
    println!("seed {seed} (replay: DMLOG_FUZZ_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut imported, mut refused) = (0, 0);
    let edges = [0, 1, 511, 512, 1 << 55, 1 << 63, u64::MAX, u64::MAX / 512];
    for case in 0..5000 {
        let (ss, entries) = random_log(&mut rng);
        let mut bytes = build(ss, &entries);
        for _ in 0..rng.random_range(0..4) {
            let at = rng.random_range(0..bytes.len());
            match rng.random_range(0..4) {
                0 => bytes[at] ^= 1 << rng.random_range(0..8),
                1 => bytes.truncate(at.max(28)),
                _ => {
                    // An 8-byte field of an entry header (or the super block) set to an edge.
                    let field = (at / 8) * 8;
                    if field + 8 <= bytes.len() {
                        let v: u64 = edges[rng.random_range(0..edges.len())];
                        bytes[field..field + 8].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        for disk in [Some(DISK_BYTES), None] {
            let what = format!("seed {seed} case {case} disk {disk:?}");
            if check(dir.path(), &bytes, disk, &what) {
                imported += 1;
            } else {
                refused += 1;
            }
        }
    }
    println!("{imported} imports matched the input entry for entry, {refused} refused");
    // Neither side may be vacuous: the mutations must leave both kinds of input.
    assert!(imported > 1000 && refused > 1000, "{imported} / {refused}");
}
