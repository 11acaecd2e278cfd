//! Crash states, overlays, replay, check and dm-log-writes, on logs recorded by the emulated
//! disk driven directly (no server needed).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crashmonkey::check::{check, CheckOptions};
use crashmonkey::history::{Epoch, Epochs, History};

use crashmonkey::overlay::{replay, LargerBase, PrefixImage, ReplayTarget, WorkerImage};
use crashmonkey::states::{CrashState, StateGenerator, StateOptions};
use nbd_server::backend::{Arrival, Backend, RequestKind, WriteData};
use nbd_server::disk::{DiskConfig, EmulatedDisk, VecStorage};

const SIZE: u64 = 64 * 1024;

struct Rec {
    disk: EmulatedDisk,
    storage: Arc<VecStorage>,
}

impl Rec {
    fn new(path: &Path) -> Self {
        let storage = Arc::new(VecStorage::new(SIZE).unwrap());
        let disk = EmulatedDisk::new(
            storage.clone(),
            DiskConfig {
                record: Some(path.into()),
                ..Default::default()
            },
        )
        .unwrap();
        Rec { disk, storage }
    }
    fn write(&self, off: u64, byte: u8, len: usize, fua: bool) {
        let t = self
            .disk
            .arrived(&Arrival {
                conn: 1,
                kind: RequestKind::Write,
                offset: off,
                length: len as u64,
                fua,
            })
            .expect("a write gets a ticket");
        self.disk
            .write(Some(t), off, WriteData::bytes(vec![byte; len]), fua)
            .unwrap();
        self.disk.reply_sent(t);
    }
    fn flush(&self) {
        let t = self
            .disk
            .arrived(&Arrival {
                conn: 1,
                kind: RequestKind::Flush,
                offset: 0,
                length: 0,
                fua: false,
            })
            .expect("a flush gets a ticket");
        self.disk.flush(Some(t)).unwrap();
        self.disk.reply_sent(t);
    }
}

/// A log with overlapping writes in several epochs, FUA, marks and a trim. Every write has
/// its own byte value (its number), so an image shows which write each sector came from.
fn recorded_log(dir: &Path) -> PathBuf {
    let path = dir.join("disk.log");
    let r = Rec::new(&path);
    let mut b = 1u8;
    let mut w = |off: u64, len: usize, fua: bool| {
        r.write(off, b, len, fua);
        b += 1;
    };
    w(0, 4096, false);
    w(4096, 2048, false);
    r.flush();
    w(1024, 2048, false); // overlaps the first write
    w(0, 1536, false); // overlaps the previous one
    r.disk.mark("m1").unwrap();
    w(8192, 4096, true);
    w(9216, 512, false);
    r.flush();
    w(16384, 8192, false);
    w(20480, 1024, false);
    r.disk.mark("m2").unwrap();
    w(16384, 512, false);
    let t = r
        .disk
        .arrived(&Arrival {
            conn: 2,
            kind: RequestKind::Trim,
            offset: 0,
            length: 512,
            fua: false,
        })
        .expect("a trim gets a ticket");
    r.disk.trim(Some(t), 0, 512, false).unwrap();
    r.disk.reply_sent(t);
    drop(r);
    path
}

fn zero_base(dir: &Path) -> PathBuf {
    let p = dir.join("base.img");
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    p
}

fn all_states(log: &Path, opts: StateOptions) -> Vec<(Epoch, Vec<CrashState>)> {
    let h = History::open(log).unwrap();
    let mut g = StateGenerator::new(opts, h.data_file().unwrap());
    Epochs::new(h)
        .map(|e| {
            let e = e.unwrap();
            let s = g.epoch_states(&e).unwrap();
            (e, s)
        })
        .collect()
}

/// Materialises every state; returns (state, image bytes).
fn images(log: &Path, dir: &Path, opts: StateOptions) -> Vec<(Epoch, CrashState, Vec<u8>)> {
    let base = zero_base(dir);
    let h = History::open(log).unwrap();
    let data = h.data_file().unwrap();
    let prefix = PrefixImage::new(&base, dir, SIZE, LargerBase::Refuse).unwrap();
    let mut worker = WorkerImage::new(&prefix, dir.join("w.img")).unwrap();
    let mut out = Vec::new();
    for (epoch, states) in all_states(log, opts) {
        for s in states {
            worker.materialize(&prefix, &epoch, &s, &data).unwrap();
            out.push((epoch.clone(), s, std::fs::read(&worker.path).unwrap()));
        }
        prefix.advance(&epoch, &data).unwrap();
        worker.prefix_advanced(&epoch, SIZE);
    }
    out
}

fn opts() -> StateOptions {
    StateOptions {
        max_subset: 2,
        samples: 1000,
        seed: 9,
        torn: true,
        atomic_bytes: 512,
    }
}

/// With a 4 KiB atomic write unit, a torn write lands whole 4 KiB units only.
#[test]
fn torn_writes_respect_the_atomic_unit() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let o = StateOptions {
        atomic_bytes: 4096,
        ..opts()
    };
    let mut torn = 0;
    for (epoch, states) in all_states(&log, o) {
        for s in states {
            if let Some(t) = &s.torn {
                torn += 1;
                let op = &epoch.ops[t.index];
                for &(off, len) in &t.pieces {
                    assert!(off % 4096 == 0 || off == op.offset, "{t:?}");
                    assert!(
                        (off + len) % 4096 == 0 || off + len == op.offset + op.length,
                        "{t:?}"
                    );
                }
            }
        }
    }
    assert!(torn > 0);
}

/// Guards against time travel: in every state, each sector holds the newest included write
/// that covers it (or what the prefix had), never an older write over a newer one; a torn
/// write lands only whole 512-byte sectors; FUA writes are kept before anything after them.
#[test]
fn ordered_subsets_never_time_travel() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let n = assert_no_time_travel(&log, dir.path(), opts());
    assert!(n > 20, "{n} states");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
    /// The same invariants on random logs: overlapping writes of random sizes on two
    /// connections, FUA writes, flushes with writes in flight across them, random seeds.
    #[test]
    fn random_logs_never_time_travel(
        steps in proptest::collection::vec((0u8..6, 0u64..120, 1u64..24), 1..40),
        seed in 0u64..1000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.log");
        let r = Rec::new(&path);
        let mut byte = 1u8;
        let mut in_flight = Vec::new();
        for (what, sector, sectors) in steps {
            let (off, len) = (sector * 512, (sectors * 512).min(SIZE - sector * 512));
            match what {
                0..=2 | 4 => {
                    let fua = what == 4;
                    let t = r.disk.arrived(&Arrival { conn: 1 + (byte as u64 % 2), kind: RequestKind::Write, offset: off, length: len, fua }).expect("a write gets a ticket");
                    r.disk.write(Some(t), off, WriteData::bytes(vec![byte; len as usize]), fua).unwrap();
                    byte += 1;
                    if what == 2 { in_flight.push(t) } else { r.disk.reply_sent(t) }
                }
                3 => r.flush(),
                _ => {
                    for t in in_flight.drain(..) {
                        r.disk.reply_sent(t);
                    }
                }
            }
        }
        drop(r);
        assert_no_time_travel(&path, dir.path(), StateOptions { seed, samples: 12, ..opts() });
    }
}

/// Checks every state of `log`; returns how many there were.
fn assert_no_time_travel(log: &Path, dir: &Path, o: StateOptions) -> usize {
    LOG_PATH.with(|p| *p.borrow_mut() = log.to_path_buf());
    let imgs = images(log, dir, o);
    let count = imgs.len();
    // The image of the full prefix before the current epoch, and the one after it.
    let mut prefix = vec![0u8; SIZE as usize];
    let mut next_prefix = prefix.clone();
    let mut epoch_seen = 0;
    for (epoch, s, img) in &imgs {
        if epoch.index != epoch_seen {
            prefix = next_prefix.clone();
            epoch_seen = epoch.index;
        }
        for sector in 0..(SIZE / 512) as usize {
            let got = &img[sector * 512..sector * 512 + 512];
            assert!(
                got.iter().all(|&x| x == got[0]),
                "state {} sector {sector} mixes writes",
                s.id
            );
            // Which included ops (and torn pieces) cover this sector, newest last.
            let lo = sector as u64 * 512;
            let mut newest: Option<u8> = None;
            for &i in &s.included {
                let op = &epoch.ops[i];
                if op.pieces.iter().any(|&(o, l)| o < lo + 512 && lo < o + l) {
                    newest = Some(byte_of(op));
                }
            }
            if let Some(t) = &s.torn {
                if t.pieces.iter().any(|&(o, l)| o < lo + 512 && lo < o + l) {
                    newest = Some(byte_of(&epoch.ops[t.index]));
                }
            }
            match newest {
                Some(b) => assert_eq!(got[0], b, "state {} ({}) sector {sector}", s.id, s.label),
                None => assert_eq!(
                    got[0],
                    prefix[sector * 512],
                    "state {} sector {sector} differs from the prefix",
                    s.id
                ),
            }
        }
        if s.included.len() == epoch.ops.len() && s.torn.is_none() {
            next_prefix = img.clone();
        }
        let last = s.included.last().copied();
        for (i, op) in epoch.ops.iter().enumerate() {
            if op.fua && last.is_some_and(|l| l > i) {
                assert!(
                    s.included.contains(&i),
                    "state {} drops FUA write {} but keeps a later one",
                    s.id,
                    op.seq
                );
            }
        }
        if let Some(t) = &s.torn {
            let total: u64 = t.pieces.iter().map(|p| p.1).sum();
            assert!(total > 0 && total < epoch.ops[t.index].bytes());
            assert!(t.pieces.iter().all(|p| p.0 % 512 == 0 && p.1 % 512 == 0));
        }
    }
    count
}

/// Recorded byte of an operation (the test writes byte = 1 + write number; trims are zero).
fn byte_of(op: &crashmonkey::history::Op) -> u8 {
    match op.data {
        crashmonkey::history::OpData::Zero => 0,
        crashmonkey::history::OpData::Log { .. } => {
            let f = std::fs::File::open(LOG_PATH.with(|p| p.borrow().clone())).unwrap();
            let mut b = [0u8; 1];
            op.read(&f, op.pieces[0].0, &mut b).unwrap();
            b[0]
        }
    }
}

thread_local! {
    static LOG_PATH: std::cell::RefCell<PathBuf> = const { std::cell::RefCell::new(PathBuf::new()) };
}

/// Content dedup is exact: two states share a hash exactly when their images are identical.
#[test]
fn equal_hashes_mean_equal_images() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    LOG_PATH.with(|p| *p.borrow_mut() = log.clone());
    let imgs = images(&log, dir.path(), opts());
    let mut dups = 0;
    for (i, (_, a, ia)) in imgs.iter().enumerate() {
        for (_, b, ib) in &imgs[i + 1..] {
            assert_eq!(a.hash == b.hash, ia == ib, "states {} and {}", a.id, b.id);
        }
        if a.duplicate_of.is_some() {
            dups += 1;
        }
    }
    assert!(
        dups > 0,
        "the log has states with identical content; dedup must find them"
    );
}

/// Writes that put back bytes the disk already holds, away from sector 0: a state that
/// includes them has the image of one that does not, so it must have the same hash (its
/// sectors' contributions replace the prefix's at the same sector numbers). Every mark
/// inside an epoch is a state of its own, named after the mark.
#[test]
fn rewriting_the_bytes_already_there_is_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("rewrite.log");
    let r = Rec::new(&log);
    r.write(4096, 7, 4096, false);
    r.write(12288, 8, 4096, false);
    r.flush();
    r.write(4096, 7, 4096, false); // the same bytes again
    r.disk.mark("again").unwrap();
    r.write(8192, 9, 4096, false);
    r.write(12288, 8, 1024, false); // a partial rewrite of the same bytes
    r.flush();
    drop(r);
    let imgs = images(&log, dir.path(), opts());
    for (i, (_, a, ia)) in imgs.iter().enumerate() {
        for (_, b, ib) in &imgs[i + 1..] {
            if ia == ib && a.torn.is_none() && b.torn.is_none() && !touches_12288(a, b) {
                assert_eq!(a.hash, b.hash, "states {} and {}: same image", a.id, b.id);
            }
            if a.hash == b.hash {
                assert!(ia == ib, "states {} and {}: same hash", a.id, b.id);
            }
        }
    }
    let with_rewrite = imgs
        .iter()
        .filter(|(e, s, _)| e.index == 1 && s.included == [0] && s.torn.is_none());
    assert!(
        with_rewrite.count() > 0,
        "the rewrite alone is a state of epoch 1"
    );
    let marked: Vec<_> = imgs
        .iter()
        .filter(|(_, s, _)| s.label == "mark:again")
        .map(|(e, s, _)| (e.index, s.included.clone()))
        .collect();
    assert_eq!(marked, [(1, vec![0])]);
}

/// Every mark inside an epoch and every FUA write but its last operation give a prefix
/// state named after them, holding exactly the operations before the mark or through the
/// FUA write.
#[test]
fn marks_and_fua_writes_inside_an_epoch_are_prefix_states() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let mut seen = 0;
    for (epoch, states) in all_states(&log, opts()) {
        let n = epoch.ops.len();
        let mut want: Vec<(String, Vec<usize>)> = Vec::new();
        for (pos, name) in epoch.marks.iter().filter(|m| m.0 < n) {
            want.push((format!("mark:{name}"), (0..*pos).collect()));
        }
        for (i, op) in epoch
            .ops
            .iter()
            .enumerate()
            .filter(|(i, o)| o.fua && i + 1 < n)
        {
            want.push((format!("fua@{}", op.seq), (0..=i).collect()));
        }
        for (label, included) in want {
            let found = states.iter().find(|s| s.label == label);
            let found =
                found.unwrap_or_else(|| panic!("no state {label} in epoch {}", epoch.index));
            assert_eq!(found.included, included, "{label}");
            assert!(found.torn.is_none(), "{label}");
            seen += 1;
        }
    }
    assert_eq!(
        seen, 3,
        "the log has two marks and one FUA write inside epochs"
    );
    // A FUA write that ends its epoch adds no state of its own: the epoch's end is that state.
    let log = dir.path().join("fua-last.log");
    let r = Rec::new(&log);
    r.write(0, 1, 4096, false);
    r.write(4096, 2, 4096, true);
    r.flush();
    drop(r);
    for (_, states) in all_states(&log, opts()) {
        let fua: Vec<_> = states
            .iter()
            .filter(|s| s.label.starts_with("fua@"))
            .collect();
        assert!(fua.is_empty(), "{fua:?}");
    }
    // An epoch with no operation (two flushes in a row) has no state: its end is the state
    // the epoch before ended with. The first epoch keeps its initial and end states.
    let log = dir.path().join("empty-epoch.log");
    let r = Rec::new(&log);
    r.flush();
    r.write(0, 1, 4096, false);
    r.flush();
    r.flush();
    drop(r);
    let per_epoch: Vec<_> = all_states(&log, opts())
        .into_iter()
        .map(|(e, states)| (e.ops.len(), states.len()))
        .collect();
    assert_eq!(
        per_epoch[0],
        (0, 2),
        "epoch 0: initial and end: {per_epoch:?}"
    );
    assert_eq!(
        per_epoch[2],
        (0, 0),
        "an empty epoch after the first: {per_epoch:?}"
    );
}

/// A state's mark is the last one all of whose preceding operations it holds: in its own
/// epoch, a mark at or before the run of operations it holds from the first; else the last
/// mark of an earlier epoch.
#[test]
fn a_state_is_named_after_the_last_mark_it_has_passed() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let mut earlier: Option<String> = None;
    let mut named = 0;
    for (epoch, states) in all_states(&log, opts()) {
        for s in &states {
            let run = (0..).zip(&s.included).take_while(|(k, &i)| *k == i).count();
            let own = epoch.marks.iter().rev().find(|(pos, _)| *pos <= run);
            let want = own.map(|m| m.1.clone()).or(earlier.clone());
            assert_eq!(s.mark, want, "state {} {:?}", s.id, s.included);
            named += usize::from(own.is_some());
        }
        earlier = epoch.marks.last().map(|m| m.1.clone()).or(earlier);
    }
    assert!(named > 3, "too few states past a mark of their own epoch");
}

/// Whether either state includes the partial rewrite at 12288 (operation 2 of epoch 1): a
/// partial sector's hash is of its history, not of its bytes, so it may differ.
fn touches_12288(a: &CrashState, b: &CrashState) -> bool {
    a.included.contains(&2) || b.included.contains(&2)
}

/// Same log and seed: the same states with the same hashes, twice; another seed samples
/// differently when sampling is needed.
#[test]
fn states_are_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let few = StateOptions {
        samples: 3,
        ..opts()
    };
    let a: Vec<CrashState> = all_states(&log, few)
        .into_iter()
        .flat_map(|e| e.1)
        .collect();
    let b: Vec<CrashState> = all_states(&log, few)
        .into_iter()
        .flat_map(|e| e.1)
        .collect();
    assert_eq!(a, b);
    let c: Vec<CrashState> = all_states(&log, StateOptions { seed: 10, ..few })
        .into_iter()
        .flat_map(|e| e.1)
        .collect();
    assert_ne!(a, c);
}

/// Replay follows the log: at the end it equals what the disk holds after a flush.
#[test]
fn replay_matches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let r = Rec::new(&log);
    for i in 0..20u64 {
        r.write((i * 1536) % (SIZE - 4096), i as u8 + 1, 3000, i % 7 == 0);
        if i % 5 == 4 {
            r.flush();
        }
    }
    r.flush();
    let disk = r.storage.snapshot();
    drop(r);
    let base = zero_base(dir.path());
    let out = dir.path().join("out.img");
    replay(&log, &base, &out, &ReplayTarget::End, LargerBase::Refuse).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), disk);
    replay(
        &log,
        &base,
        &out,
        &ReplayTarget::Flush(1),
        LargerBase::Refuse,
    )
    .unwrap();
    assert_ne!(std::fs::read(&out).unwrap(), disk);
    assert!(replay(
        &log,
        &base,
        &out,
        &ReplayTarget::Mark("nope".into()),
        LargerBase::Refuse
    )
    .is_err());
}

/// The subset states of an epoch are exactly the family the options name: with room for all of
/// them (`samples` equal to its size, the boundary), every set of 1..=max_subset operations
/// and every complement of one, once each; with less room, at most `samples` drawn ones, each
/// of a legal size. Counts, not just admissibility (the sampling arithmetic was untested).
#[test]
fn subset_states_are_the_whole_family_or_a_bounded_sample() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let r = Rec::new(&log);
    let n = 6usize;
    for i in 0..n as u64 {
        r.write(i * 4096, i as u8 + 1, 4096, false);
    }
    r.flush();
    drop(r);
    let subsets = |max_subset: usize, samples: usize| -> Vec<Vec<usize>> {
        let o = StateOptions {
            max_subset,
            samples,
            torn: false,
            ..opts()
        };
        let (_, states) = all_states(&log, o).into_iter().next().unwrap();
        states
            .into_iter()
            .filter(|s| s.kind == crashmonkey::states::StateKind::Subset)
            .map(|s| s.included)
            .collect()
    };
    // Sets of 1 or 2 of the 6 operations, and their complements (sizes 5 and 4).
    let mut family = std::collections::BTreeSet::new();
    for mask in 1u32..(1 << n) - 1 {
        let set: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
        if set.len() <= 2 || set.len() >= n - 2 {
            family.insert(set);
        }
    }
    assert_eq!(family.len(), 2 * (6 + 15));
    for samples in [family.len(), 1000] {
        let got = subsets(2, samples);
        let unique: std::collections::BTreeSet<_> = got.iter().cloned().collect();
        assert_eq!(unique.len(), got.len(), "a subset appears twice");
        assert_eq!(unique, family, "samples={samples}: not the whole family");
    }
    for samples in [5, family.len() - 1] {
        let got = subsets(2, samples);
        assert!(
            !got.is_empty() && got.len() <= samples,
            "{} drawn for {samples}",
            got.len()
        );
        assert!(
            got.iter().all(|s| family.contains(s)),
            "an illegal set was drawn"
        );
        let unique: std::collections::BTreeSet<_> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "a drawn subset appears twice");
    }
}

/// `replay --to-seq N` stops exactly at N: for every sequence number of the log, the image
/// holds the writes and trims recorded through N and none after, as the raw records (read
/// with the log reader, not the history) say.
#[test]
fn replay_to_each_seq_stops_exactly_there() {
    use nbd_server::log::{LogReader, RecordKind};
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let base = zero_base(dir.path());
    let out = dir.path().join("out.img");
    let reader = LogReader::open(&log).unwrap();
    let records: Vec<_> = LogReader::open(&log).unwrap().map(Result::unwrap).collect();
    let last = records.last().unwrap().seq();
    let mut expect = vec![0u8; SIZE as usize];
    for n in 0..=last {
        if let Some(r) = records.iter().find(|r| r.seq() == n) {
            let (off, len) = (r.header.offset as usize, r.header.length as usize);
            match r.kind {
                RecordKind::Write => {
                    let data = reader.read_payload(r).unwrap();
                    expect[off..off + len].copy_from_slice(&data);
                }
                RecordKind::Trim | RecordKind::WriteZeroes => expect[off..off + len].fill(0),
                _ => {}
            }
        }
        let report = replay(&log, &base, &out, &ReplayTarget::Seq(n), LargerBase::Refuse).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == expect,
            "replay to seq {n} is not the log's records through {n}"
        );
        let data = records.iter().filter(|r| {
            r.seq() <= n
                && matches!(
                    r.kind,
                    RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes
                )
        });
        let (ops, bytes) = data.fold((0, 0), |(o, b), r| (o + 1, b + r.header.length));
        assert_eq!(
            (report.ops_applied, report.bytes_applied),
            (ops, bytes),
            "to seq {n}"
        );
        assert_eq!(report.disk_bytes, SIZE);
    }
}

/// A power cut's recorded fates replay to exactly what the disk kept.
#[test]
fn power_cut_log_replays_to_the_surviving_disk() {
    for seed in 0..12 {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("d.log");
        let r = Rec::new(&log);
        r.write(0, 1, 8192, false);
        r.flush();
        for i in 0..10u64 {
            r.write(i * 2048, i as u8 + 2, 4096, false);
        }
        r.disk.power_cut(Some(seed)).unwrap();
        r.write(30000, 99, 1000, false);
        r.flush();
        let disk = r.storage.snapshot();
        drop(r);
        let base = zero_base(dir.path());
        let out = dir.path().join("out.img");
        replay(&log, &base, &out, &ReplayTarget::End, LargerBase::Refuse).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), disk, "seed {seed}");
    }
}

/// Sets the file header's flags word of the log at `path` (byte 28).
fn set_log_flags(path: &Path, flags: u32) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&flags.to_le_bytes(), 28).unwrap();
}

/// A log closed without a power cut says so in its file header, and is read without the
/// first pass for power cuts: its states and verdicts are those of the same log without the
/// flag. A power cut in a log whose header says it has none is damage, reported as such.
#[test]
fn a_log_that_says_it_has_no_power_cut_checks_as_one_that_does_not_say() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let flags = |p: &Path| {
        nbd_server::log::LogReader::open(p)
            .unwrap()
            .file_header()
            .flags
    };
    assert_eq!(flags(&log), nbd_server::log::FILE_FLAG_NO_POWER_CUTS);
    let plain = dir.path().join("plain.log");
    std::fs::copy(&log, &plain).unwrap();
    set_log_flags(&plain, 0);
    let base = zero_base(dir.path());
    let o = check_options("true {image}".into());
    let (a, b) = (
        check(&log, &base, &o).unwrap(),
        check(&plain, &base, &o).unwrap(),
    );
    assert_eq!(
        (a.states, a.unique, a.passed, a.epochs),
        (b.states, b.unique, b.passed, b.epochs)
    );
    assert!(a.unique > 10, "{} states", a.unique);
    let cut = dir.path().join("cut.log");
    let r = Rec::new(&cut);
    r.write(0, 1, 8192, false);
    r.disk.power_cut(Some(1)).unwrap();
    r.write(0, 2, 4096, false);
    r.flush();
    drop(r);
    assert_eq!(
        flags(&cut),
        0,
        "a log with a power cut keeps the flag clear"
    );
    assert!(check(&cut, &base, &o).is_ok());
    set_log_flags(&cut, nbd_server::log::FILE_FLAG_NO_POWER_CUTS);
    let e = check(&cut, &base, &o).unwrap_err().to_string();
    assert!(e.contains("file header says the log has none"), "{e}");
}

/// Export to dm-log-writes and import back: the replayed images are identical at the end and
/// at every flush.
#[test]
fn dm_log_writes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let dm = dir.path().join("d.dmlog");
    let back = dir.path().join("back.log");
    let s = crashmonkey::dmlog::export(&log, &dm).unwrap();
    assert!(s.flushes == 2 && s.marks == 2 && s.discards == 1, "{s:?}");
    let s2 = crashmonkey::dmlog::import(&dm, &back, Some(SIZE)).unwrap();
    assert_eq!(s.entries, s2.entries);
    let base = zero_base(dir.path());
    for target in [
        ReplayTarget::End,
        ReplayTarget::Flush(1),
        ReplayTarget::Flush(2),
        ReplayTarget::Mark("m2".into()),
    ] {
        let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
        replay(&log, &base, &a, &target, LargerBase::Refuse).unwrap();
        replay(&back, &base, &b, &target, LargerBase::Refuse).unwrap();
        assert_eq!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "{target:?}"
        );
    }
    // Garbage is refused with a clear error.
    std::fs::write(&dm, [0u8; 100]).unwrap();
    assert!(crashmonkey::dmlog::import(&dm, &back, None).is_err());
}

/// Two jobs running `checker` on the states of `opts()`, no output folder, checkers at the
/// caller's priority.
fn check_options(checker: String) -> CheckOptions {
    CheckOptions {
        checker,
        jobs: 2,
        out: None,
        states: opts(),
        progress: false,
        timeout_seconds: 60,
        larger_base: LargerBase::Refuse,
        stop: Default::default(),
        shard: Default::default(),
        work_dir: None,
        checker_nice: 0,
    }
}

/// The checkers run `checker_nice` nicer than the thread that called `check` (they inherit
/// it from the job threads that start them); 0 leaves them as they are.
#[test]
fn checkers_run_nicer_by_checker_nice() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let base = zero_base(dir.path());
    let here = nbd_server::priority::this_thread_nice().unwrap();
    for by in [0, 7, 19] {
        let seen = dir.path().join(format!("nice-{by}"));
        // Field 19 of `cut`'s own stat line is its nice value (its name has no spaces).
        let o = CheckOptions {
            checker_nice: by,
            ..check_options(format!(
                "cut -d' ' -f19 /proc/self/stat >> {}; true {{uri}}",
                seen.display()
            ))
        };
        let s = check(&log, &base, &o).unwrap();
        let nice: Vec<i32> = std::fs::read_to_string(&seen)
            .unwrap()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect();
        assert_eq!(nice.len(), s.unique);
        let want = (here + by).min(19);
        assert!(
            nice.iter().all(|&n| n == want),
            "checker-nice {by}: {nice:?}"
        );
    }
    assert_eq!(nbd_server::priority::this_thread_nice().unwrap(), here);
}

/// The checker sees every unique state, `{mark}` names the right mark, and failures keep
/// their image and output.
#[test]
fn check_runs_the_checker_on_every_unique_state() {
    let dir = tempfile::tempdir().unwrap();
    let log = recorded_log(dir.path());
    let base = zero_base(dir.path());
    let out = dir.path().join("fail");
    let seen = dir.path().join("seen");
    let o = CheckOptions {
        out: Some(out.clone()),
        // Each run appends its `{state}` id (one short O_APPEND write: whole lines).
        ..check_options(format!(
            "echo {{state}} >> {}; test -s {{image}} && test {{mark}} != m2",
            seen.display()
        ))
    };
    let s = check(&log, &base, &o).unwrap();
    assert_eq!(s.passed + s.failed, s.unique);
    assert!(s.unique < s.states);
    // The checker ran once on each state the generator calls unique, and on no other.
    let mut ran: Vec<usize> = std::fs::read_to_string(&seen)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    ran.sort_unstable();
    let mut unique: Vec<usize> = all_states(&log, opts())
        .into_iter()
        .flat_map(|(_, states)| states)
        .filter(|st| st.duplicate_of.is_none())
        .map(|st| st.id)
        .collect();
    unique.sort_unstable();
    assert_eq!(ran, unique);
    assert_eq!(ran.len(), s.unique);
    assert!(s.failed > 0 && s.passed > 0);
    for f in &s.failures {
        assert_eq!(f.mark.as_deref(), Some("m2"));
        assert!(f.image.as_ref().unwrap().exists());
        assert!(out.join(format!("state-{}.txt", f.id)).exists());
    }
    let all = check(
        &log,
        &base,
        &CheckOptions {
            checker: "true {image}".into(),
            out: None,
            ..o
        },
    )
    .unwrap();
    assert_eq!(all.failed, 0);
    assert_eq!(all.unique, s.unique);
}
