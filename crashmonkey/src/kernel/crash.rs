//! The crash states of a kernel workload, two at each mark:
//! - **durable**: only what the disk had made durable when the mark was set: every write
//!   a completed FLUSH covered (not the ones still in flight when it came) and every FUA
//!   write. A power cut right after the persistence point may leave exactly this (a disk
//!   with a volatile cache loses the rest); it is the state that tells whether the
//!   filesystem asked the disk for what it promised the application;
//! - **prefix**: every write that reached the disk before the mark (the cache all landed).
//!
//! When the two are the same (nothing pending at the mark) one state is checked.
//!
//! On request ([`reorder_states`]), **reorder** states between the two: the durable state
//! plus one of the writes pending at the mark, and the prefix minus one of them (a cache
//! writes back in any order), at most [`REORDER_STATES_PER_MARK_MAX`] per mark, sampled with
//! a seeded generator when there are more.
//!
//! On request ([`torn_states`]), **torn** states: the durable state plus the first sectors
//! of one pending write of several sectors, the rest of its range left as it was (a power
//! cut in the middle of a write; the disk writes 512-byte sectors atomically, in order).
//! The tear point is drawn with a seeded generator, at most [`TORN_STATES_PER_MARK_MAX`]
//! per mark, the writes sampled when there are more. The sector split and merge are
//! nbd-server's ([`sector_pieces`], [`merge_pieces`]), as `crashmonkey check --torn` uses.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use nbd_server::log::{merge_pieces, sector_pieces};

use crate::history::{Event, History, Op};
use crate::overlay::apply_pieces;

use super::KernelError;

/// Operations of one workload's log, at most (its logs hold a few hundred).
pub const LOG_OPS_MAX: usize = 1_000_000;
/// Bytes copied at a time when an image is copied.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// Which of the two states at a mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Which {
    Durable,
    Prefix,
    Reorder,
    /// The durable state and the first sectors of one pending write ([`torn_states`]).
    Torn,
    /// Every write of the log (`crashmonkey run`'s state after the workload and the
    /// unmount).
    Final,
}

impl Which {
    pub fn name(self) -> &'static str {
        match self {
            Which::Durable => "durable",
            Which::Prefix => "prefix",
            Which::Reorder => "reorder",
            Which::Torn => "torn",
            Which::Final => "final",
        }
    }
}

/// One crash state: the operations (indices into the log's operations, ascending) applied
/// over the base image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub mark: String,
    /// Position of the mark among the log's marks.
    pub mark_index: usize,
    pub which: Which,
    pub ops: Vec<usize>,
    /// What a reorder or torn state changed (`durable + write seq 12`); empty for the
    /// others.
    pub detail: String,
    /// The write a torn state tears, applied in its place in log order.
    pub torn: Option<TornWrite>,
}

/// Part of one write: the operation (an index into the log's operations) and the ranges of
/// it that land (sorted, merged).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornWrite {
    pub op: usize,
    pub pieces: Vec<(u64, u64)>,
}

/// The log's operations and its states at every mark.
pub struct LogStates {
    pub ops: Vec<Op>,
    pub states: Vec<State>,
    pub marks: Vec<String>,
    pub log: File,
}

/// Reads `log` into its states (see the module docs).
pub fn states_of(log: &Path) -> Result<LogStates, KernelError> {
    let history = History::open(log)?;
    let data = history.data_file()?;
    let mut ops: Vec<Op> = Vec::new();
    let mut durable: Vec<bool> = Vec::new();
    let mut states = Vec::new();
    let mut marks = Vec::new();
    for ev in history {
        match ev? {
            Event::Op(op) => {
                if ops.len() >= LOG_OPS_MAX {
                    return Err(KernelError::Setup(format!(
                        "the write log has more than {LOG_OPS_MAX} operations"
                    )));
                }
                durable.push(op.fua);
                ops.push(op);
            }
            Event::Flush { in_flight, .. } => {
                let pending: HashSet<u64> = in_flight.into_iter().collect();
                for (d, op) in durable.iter_mut().zip(&ops) {
                    *d |= !pending.contains(&op.seq);
                }
            }
            Event::Mark { name, .. } => {
                let kept: Vec<usize> = (0..ops.len()).filter(|&i| durable[i]).collect();
                let mark_index = marks.len();
                let all = kept.len() == ops.len();
                states.push(State {
                    mark: name.clone(),
                    mark_index,
                    which: Which::Durable,
                    ops: kept,
                    detail: String::new(),
                    torn: None,
                });
                if !all {
                    states.push(State {
                        mark: name.clone(),
                        mark_index,
                        which: Which::Prefix,
                        ops: (0..ops.len()).collect(),
                        detail: String::new(),
                        torn: None,
                    });
                }
                marks.push(name);
            }
            Event::PowerCut { .. } => {
                return Err(KernelError::Setup(
                    "the write log has a power cut; a kernel workload's log never does".into(),
                ))
            }
        }
    }
    Ok(LogStates {
        ops,
        states,
        marks,
        log: data,
    })
}

/// Reorder states at a mark, at most.
pub const REORDER_STATES_PER_MARK_MAX: usize = 16;

/// The reorder states of every mark that has writes pending (see the module docs); the
/// sample, when one is needed, is drawn from `seed` and the mark's position.
pub fn reorder_states(ls: &LogStates, seed: u64) -> Vec<State> {
    let mut out = Vec::new();
    for (d, p, pending) in pending_at_marks(ls) {
        if pending.len() < 2 {
            continue; // keep-one is the prefix, drop-one the durable state
        }
        let mut cands: Vec<State> = Vec::new();
        for &j in &pending {
            let seq = ls.ops[j].seq;
            let mut keep = d.ops.clone();
            keep.push(j);
            keep.sort_unstable();
            let drop: Vec<usize> = p.ops.iter().copied().filter(|&i| i != j).collect();
            for (ops, detail) in [
                (keep, format!("durable + write seq {seq}")),
                (drop, format!("prefix - write seq {seq}")),
            ] {
                cands.push(State {
                    mark: d.mark.clone(),
                    mark_index: d.mark_index,
                    which: Which::Reorder,
                    ops,
                    detail,
                    torn: None,
                });
            }
        }
        if cands.len() > REORDER_STATES_PER_MARK_MAX {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (d.mark_index as u64).rotate_left(32));
            let mut picked = sample(&mut rng, cands.len(), REORDER_STATES_PER_MARK_MAX).into_vec();
            picked.sort_unstable();
            cands = picked.into_iter().map(|i| cands[i].clone()).collect();
        }
        out.extend(cands);
    }
    out
}

/// Torn states at a mark, at most.
pub const TORN_STATES_PER_MARK_MAX: usize = 16;
/// Mixed into the seed of the torn states' draws, so that they are not the reorder sample's.
const TORN_SEED_SALT: u64 = 0x746f_726e; // "torn"

/// The durable and the prefix state of each mark that has both, with the writes pending
/// there (indices, ascending: in the prefix, not in the durable state).
fn pending_at_marks(ls: &LogStates) -> Vec<(&State, &State, Vec<usize>)> {
    let mut out = Vec::new();
    for pair in ls.states.windows(2) {
        let [d, p] = pair else { continue };
        if d.which != Which::Durable || p.which != Which::Prefix || d.mark_index != p.mark_index {
            continue;
        }
        let pending = p
            .ops
            .iter()
            .copied()
            .filter(|i| d.ops.binary_search(i).is_err())
            .collect();
        out.push((d, p, pending));
    }
    out
}

/// The torn states of every mark with a pending write of two sectors or more (see the
/// module docs); the draws (which writes, when there are more than
/// [`TORN_STATES_PER_MARK_MAX`], then each one's tear point) come from `seed` and the mark's
/// position.
pub fn torn_states(ls: &LogStates, seed: u64) -> Vec<State> {
    let mut out = Vec::new();
    for (d, _, pending) in pending_at_marks(ls) {
        let sectors = |j: usize| -> Vec<(u64, u64)> {
            let op = &ls.ops[j];
            op.pieces
                .iter()
                .flat_map(|p| sector_pieces(p.0, p.1))
                .collect()
        };
        let mut tearable: Vec<usize> = pending
            .into_iter()
            .filter(|&j| sectors(j).len() > 1)
            .collect();
        let salt = TORN_SEED_SALT ^ (d.mark_index as u64).rotate_left(32);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ salt);
        if tearable.len() > TORN_STATES_PER_MARK_MAX {
            let mut picked = sample(&mut rng, tearable.len(), TORN_STATES_PER_MARK_MAX).into_vec();
            picked.sort_unstable();
            tearable = picked.into_iter().map(|i| tearable[i]).collect();
        }
        for j in tearable {
            let all = sectors(j);
            // At least one sector lands and at least one does not: a proper prefix.
            let landed = rng.random_range(1..all.len());
            out.push(State {
                mark: d.mark.clone(),
                mark_index: d.mark_index,
                which: Which::Torn,
                ops: d.ops.clone(), // `j` is pending: not among them

                detail: format!(
                    "durable + first {landed} of {} sectors of write seq {}",
                    all.len(),
                    ls.ops[j].seq
                ),
                torn: Some(TornWrite {
                    op: j,
                    pieces: merge_pieces(all[..landed].iter().copied()),
                }),
            });
        }
    }
    out
}

/// Copies `src` to a new file `dst`, holes as holes (SEEK_DATA / SEEK_HOLE): a formatted
/// 128 MiB image is a few MiB of data.
pub fn sparse_copy(src: &Path, dst: &Path) -> Result<(), KernelError> {
    let len = std::fs::metadata(src)
        .map_err(KernelError::io(format!("reading {}", src.display())))?
        .len();
    Ok(crate::overlay::sparse_copy(src, dst, len)?)
}

/// The name of a bundle's crash image: the state gzip-compressed (`gzip -dc state.img.gz |
/// cp --sparse=always /dev/stdin state.img` gives it back, sparse).
pub const STATE_IMAGE_GZ: &str = "state.img.gz";

/// Writes `src` to the new file `dst` gzip-compressed (fast level: a crash image is mostly
/// zeros, which compress a thousandfold), reading only `src`'s data (`SEEK_DATA`): its holes
/// are fed to the compressor as zeros from memory.
pub fn gzip_copy(src: &Path, dst: &Path) -> Result<(), KernelError> {
    use std::io::Write;
    let reading = || KernelError::io(format!("reading {}", src.display()));
    let writing = || KernelError::io(format!("writing {}", dst.display()));
    let from = File::open(src).map_err(KernelError::io(format!("opening {}", src.display())))?;
    let len = from.metadata().map_err(reading())?.len();
    let to = File::create(dst).map_err(KernelError::io(format!("creating {}", dst.display())))?;
    let mut z =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(to), flate2::Compression::fast());
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut at = 0u64;
    while at < len {
        let (start, end) = match crate::checker::sys::next_data(&from, at).map_err(reading())? {
            Some((data, hole)) => (data.min(len), hole.min(len)),
            None => (len, len),
        };
        let mut pos = at;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            if pos < start {
                let zeros = ((start - pos) as usize).min(buf.len());
                buf[..zeros].fill(0);
                z.write_all(&buf[..zeros]).map_err(writing())?;
                pos += zeros as u64;
                continue;
            }
            from.read_exact_at(&mut buf[..n], pos).map_err(reading())?;
            z.write_all(&buf[..n]).map_err(writing())?;
            pos += n as u64;
        }
        at = end;
    }
    let mut w = z.finish().map_err(writing())?;
    w.flush().map_err(writing())?;
    Ok(())
}

/// Writes the image of `state` to `dst`: a copy of `base` with the state's operations
/// (and its torn write's pieces) applied in log order (so newer data always lands over
/// older).
pub fn write_image(
    base: &Path,
    states: &LogStates,
    state: &State,
    dst: &Path,
) -> Result<(), KernelError> {
    sparse_copy(base, dst)?;
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(KernelError::io(format!("opening {}", dst.display())))?;
    let mut order = state.ops.clone();
    if let Some(t) = &state.torn {
        order.push(t.op);
        order.sort_unstable();
    }
    for i in order {
        let op = &states.ops[i];
        let pieces = match &state.torn {
            Some(t) if t.op == i => &t.pieces,
            _ => &op.pieces,
        };
        apply_pieces(&img, dst, op, pieces, &states.log)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_server::backend::{Arrival, Backend, RequestKind, WriteData};
    use nbd_server::disk::{DiskConfig, EmulatedDisk, VecStorage};
    use std::sync::Arc;

    /// A sparse image with data at its start, in its middle (across a copy chunk's end) and
    /// at its last byte comes back from its gzip byte for byte, holes as zeros; so does an
    /// image that is one hole.
    #[test]
    fn a_gzipped_sparse_image_decompresses_to_the_same_bytes() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let len = 3 * COPY_CHUNK_BYTES as u64 + 4096;
        for writes in [
            vec![],
            vec![
                (0u64, 7u8),
                (COPY_CHUNK_BYTES as u64 - 100, 9),
                (len - 1, 5),
            ],
        ] {
            let src = dir.path().join("src.img");
            let f = File::create(&src).unwrap();
            f.set_len(len).unwrap();
            let mut want = vec![0u8; len as usize];
            for &(at, b) in &writes {
                let n = 300.min(len - at) as usize;
                f.write_all_at(&vec![b; n], at).unwrap();
                want[at as usize..at as usize + n].fill(b);
            }
            let gz = dir.path().join("state.img.gz");
            gzip_copy(&src, &gz).unwrap();
            let mut got = Vec::new();
            flate2::read::GzDecoder::new(File::open(&gz).unwrap())
                .read_to_end(&mut got)
                .unwrap();
            assert!(got == want, "{writes:?}: the bytes differ");
            assert!(std::fs::metadata(&gz).unwrap().len() < len / 100);
        }
    }

    fn write(d: &EmulatedDisk, block: u64, byte: u8, fua: bool) {
        let arrival = Arrival {
            conn: 1,
            kind: RequestKind::Write,
            offset: block * 4096,
            length: 4096,
            fua,
        };
        let t = d.arrived(&arrival).expect("a write gets a ticket");
        d.write(
            Some(t),
            block * 4096,
            WriteData::copy_of(&[byte; 4096]),
            fua,
        )
        .unwrap();
        d.reply_sent(t);
    }

    fn flush(d: &EmulatedDisk) {
        let arrival = Arrival {
            conn: 2,
            kind: RequestKind::Flush,
            offset: 0,
            length: 0,
            fua: false,
        };
        let t = d.arrived(&arrival).expect("a flush gets a ticket");
        d.flush(Some(t)).unwrap();
        d.reply_sent(t);
    }

    /// A 1 MiB disk in memory recording its write log to `d.log` in `dir`.
    fn recording_disk(dir: &Path) -> (EmulatedDisk, std::path::PathBuf) {
        let log = dir.join("d.log");
        let s = Arc::new(VecStorage::new(1 << 20).unwrap());
        let cfg = DiskConfig {
            record: Some(log.clone()),
            ..Default::default()
        };
        (EmulatedDisk::new(s, cfg).unwrap(), log)
    }

    /// A write log: write 0, flush, write 1, mark m1, write 2 (FUA), mark m2, flush, mark m3.
    /// The durable state at m1 has write 0 only; at m2 also the FUA write 2 but not write 1;
    /// at m3 everything (and no prefix state, it would be the same).
    #[test]
    fn durable_states_hold_flushed_and_fua_writes_only() {
        let dir = tempfile::tempdir().unwrap();
        let (d, log) = recording_disk(dir.path());
        write(&d, 0, 1, false);
        flush(&d);
        write(&d, 1, 2, false);
        d.mark("m1").unwrap();
        write(&d, 2, 3, true);
        d.mark("m2").unwrap();
        flush(&d);
        d.mark("m3").unwrap();
        drop(d);
        let st = states_of(&log).unwrap();
        let got: Vec<(&str, Which, Vec<usize>)> = st
            .states
            .iter()
            .map(|s| (s.mark.as_str(), s.which, s.ops.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("m1", Which::Durable, vec![0]),
                ("m1", Which::Prefix, vec![0, 1]),
                ("m2", Which::Durable, vec![0, 2]),
                ("m2", Which::Prefix, vec![0, 1, 2]),
                ("m3", Which::Durable, vec![0, 1, 2]),
            ]
        );
        // Reorder states: m1 and m2 have one write pending (none); add one at m2 by hand.
        assert!(reorder_states(&st, 1).is_empty());
        let mut two = LogStates {
            states: st.states[2..4].to_vec(),
            ..st
        };
        two.states[0].ops = vec![0];
        let r: Vec<(Vec<usize>, String)> = reorder_states(&two, 1)
            .into_iter()
            .map(|s| (s.ops, s.detail))
            .collect();
        assert_eq!(
            r,
            [
                (vec![0, 1], "durable + write seq 2".to_owned()),
                (vec![0, 2], "prefix - write seq 2".to_owned()),
                (vec![0, 2], "durable + write seq 4".to_owned()),
                (vec![0, 1], "prefix - write seq 4".to_owned()),
            ]
        );
        let st = two;
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let img = dir.path().join("m2.img");
        write_image(&base, &st, &st.states[0], &img).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(bytes.len(), 1 << 20);
        assert_eq!(
            (bytes[0], bytes[4096], bytes[8192], bytes[12288]),
            (1, 0, 0, 0)
        );
        write_image(&base, &st, &st.states[1], &img).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        assert_eq!(
            (bytes[0], bytes[4096], bytes[8192], bytes[12288]),
            (1, 2, 3, 0)
        );
    }

    /// Torn states: at each mark with a pending write of several sectors, the durable state
    /// and a proper, non-empty first part of that write (the rest of its range as it was);
    /// the same seed draws the same tear points; at most TORN_STATES_PER_MARK_MAX a mark.
    #[test]
    fn torn_states_land_a_first_part_of_one_pending_write() {
        let dir = tempfile::tempdir().unwrap();
        let (d, log) = recording_disk(dir.path());
        write(&d, 0, 1, false);
        flush(&d);
        write(&d, 1, 2, false);
        d.mark("m1").unwrap();
        for block in 2..22 {
            write(&d, block, 3, false);
        }
        d.mark("m2").unwrap();
        drop(d);
        let st = states_of(&log).unwrap();
        let torn = torn_states(&st, 7);
        assert_eq!(torn, torn_states(&st, 7));
        let at_m1: Vec<&State> = torn.iter().filter(|t| t.mark == "m1").collect();
        assert_eq!(at_m1.len(), 1);
        let t = at_m1[0];
        assert_eq!((t.which, &t.ops), (Which::Torn, &vec![0]));
        let tw = t.torn.as_ref().unwrap();
        assert_eq!(tw.op, 1);
        let [(off, len)] = tw.pieces[..] else {
            panic!("{tw:?}")
        };
        assert!(
            off == 4096 && len % 512 == 0 && (512..4096).contains(&len),
            "{tw:?}"
        );
        assert_eq!(
            t.detail,
            format!("durable + first {} of 8 sectors of write seq 2", len / 512)
        );
        let base = dir.path().join("base.img");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let img = dir.path().join("torn.img");
        write_image(&base, &st, t, &img).unwrap();
        let bytes = std::fs::read(&img).unwrap();
        let landed = len as usize;
        assert!(bytes[4096..4096 + landed].iter().all(|&b| b == 2));
        assert!(bytes[4096 + landed..8192].iter().all(|&b| b == 0));
        assert_eq!((bytes[0], bytes[8192]), (1, 0));
        // m2: 21 writes pending, a sample of TORN_STATES_PER_MARK_MAX, each its own write.
        let at_m2: Vec<usize> = torn
            .iter()
            .filter(|t| t.mark == "m2")
            .map(|t| t.torn.as_ref().unwrap().op)
            .collect();
        assert_eq!(at_m2.len(), TORN_STATES_PER_MARK_MAX);
        assert!(at_m2.windows(2).all(|w| w[0] < w[1]), "{at_m2:?}");
    }
}
