//! Crash states against a model of the disk that shares no code with the state generator.
//!
//! The model reads the raw log records (`LogReader`, the format layer, which
//! `nbd-server/tests/log_format.rs` holds to `docs/write-log.md`) and nothing of
//! `crashmonkey::history` or `crashmonkey::states`: a write is durable once a flush arrives
//! after it that does not list it as in flight, or once a power cut lets it land; until then it
//! is a candidate. A crash state is then the durable writes plus some candidates, applied in
//! record order, so at every sector the newest landed write wins. Every state the generator
//! makes, materialised by the overlay, must be that image; and every image a seeded power cut
//! of the emulated disk leaves must be one the generator admits.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crashmonkey::history::{Epoch, Epochs, History};
use crashmonkey::overlay::{LargerBase, PrefixImage, WorkerImage};
use crashmonkey::states::{CrashState, StateGenerator, StateKind, StateOptions};
use nbd_server::backend::{Arrival, Backend, RequestKind, Ticket, WriteData};
use nbd_server::disk::{DiskConfig, EmulatedDisk, VecStorage};
use nbd_server::log::{
    decode_payload, CutMode, Fate, FlushPayload, LogReader, PowerCutPayload, Record, RecordKind,
};

const SIZE: u64 = 64 * 1024;
const SECTOR: u64 = 512;
static ZEROES: [u8; SIZE as usize] = [0; SIZE as usize];

/// A data record as the raw log tells it: its bytes (zeroes for a trim or a zero write), and
/// the ranges of it that count (all of it, or the sectors a power cut let land).
#[derive(Clone, Debug)]
struct W {
    seq: u64,
    offset: u64,
    data: Vec<u8>,
    fua: bool,
    pieces: Vec<(u64, u64)>,
}

/// The model at the record that ends one of the generator's epochs (a flush, a power cut, or
/// the end of the log).
struct ModelEpoch {
    /// Durable before the epoch: every crash state of it holds these.
    durable: Vec<W>,
    /// Writes not durable yet at its end, by seq: a crash state may hold any of them.
    candidates: HashMap<u64, W>,
    /// Durable after its end (for a flush: what the flush made durable).
    after: Vec<W>,
    ended_by_flush: bool,
}

/// Reads the log's records and runs the model over them.
fn model(log: &Path) -> Vec<ModelEpoch> {
    let mut reader = LogReader::open(log).unwrap();
    let records: Vec<Record> = reader.by_ref().map(Result::unwrap).collect();
    let (mut durable, mut pending): (Vec<W>, Vec<W>) = (Vec::new(), Vec::new());
    let mut out = Vec::new();
    for rec in records {
        let h = rec.header;
        match rec.kind {
            RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes if h.length > 0 => {
                let data = if rec.kind == RecordKind::Write {
                    reader.read_payload(&rec).unwrap()
                } else {
                    vec![0; h.length as usize]
                };
                pending.push(W {
                    seq: h.seq,
                    offset: h.offset,
                    data,
                    fua: h.fua(),
                    pieces: vec![(h.offset, h.length)],
                });
            }
            RecordKind::Flush => {
                let p: FlushPayload = decode_payload(&reader.read_payload(&rec).unwrap()).unwrap();
                let in_flight: HashSet<u64> = p.in_flight.into_iter().collect();
                let before = durable.clone();
                let candidates = by_seq(&pending);
                let (stay, go): (Vec<W>, Vec<W>) =
                    pending.drain(..).partition(|w| in_flight.contains(&w.seq));
                durable.extend(go);
                pending = stay;
                out.push(ModelEpoch {
                    durable: before,
                    candidates,
                    after: durable.clone(),
                    ended_by_flush: true,
                });
            }
            RecordKind::PowerCut => {
                let p: PowerCutPayload =
                    decode_payload(&reader.read_payload(&rec).unwrap()).unwrap();
                let fates: HashMap<u64, (Fate, Vec<(u64, u64)>)> = p
                    .fates
                    .into_iter()
                    .map(|f| (f.seq, (f.fate, f.pieces)))
                    .collect();
                let before = durable.clone();
                let mut landed = Vec::new();
                for mut w in pending.drain(..) {
                    match fates.get(&w.seq) {
                        Some((Fate::Dropped, _)) => continue,
                        Some((Fate::Torn, pieces)) => w.pieces = pieces.clone(),
                        _ => {}
                    }
                    landed.push(w);
                }
                let candidates = by_seq(&landed);
                durable.extend(landed);
                out.push(ModelEpoch {
                    durable: before,
                    candidates,
                    after: durable.clone(),
                    ended_by_flush: false,
                });
            }
            _ => {}
        }
    }
    let mut after = durable.clone();
    after.extend(pending.iter().cloned());
    out.push(ModelEpoch {
        durable,
        candidates: by_seq(&pending),
        after,
        ended_by_flush: false,
    });
    out
}

fn by_seq(ws: &[W]) -> HashMap<u64, W> {
    ws.iter().map(|w| (w.seq, w.clone())).collect()
}

/// The disk after `writes` land on a zeroed disk, in record order.
fn image_of<'a>(writes: impl IntoIterator<Item = &'a W>) -> Vec<u8> {
    let mut ws: Vec<&W> = writes.into_iter().collect();
    ws.sort_by_key(|w| w.seq);
    let mut img = vec![0u8; SIZE as usize];
    for w in ws {
        for &(off, len) in &w.pieces {
            let from = (off - w.offset) as usize;
            img[off as usize..(off + len) as usize]
                .copy_from_slice(&w.data[from..from + len as usize]);
        }
    }
    img
}

/// Whether every sector of `w` that counts is overwritten by a newer durable write: such a
/// write can never show, and the generator may leave it out of its epoch.
fn hidden(w: &W, durable: &[W]) -> bool {
    w.pieces.iter().all(|&(off, len)| {
        (off / SECTOR..(off + len).div_ceil(SECTOR)).all(|s| {
            durable.iter().any(|d| {
                d.seq > w.seq
                    && d.pieces
                        .iter()
                        .any(|&(o, l)| o <= s * SECTOR && (s + 1) * SECTOR <= o + l)
            })
        })
    })
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<u64> {
    a.iter().zip(b).position(|(x, y)| x != y).map(|i| i as u64)
}

/// One generated state against the model: its writes are candidates of its epoch, a torn
/// write lands whole atomic units inside itself, FUA writes come first, and its image is the
/// model's image of exactly those writes.
fn check_state(m: &ModelEpoch, epoch: &Epoch, s: &CrashState, img: &[u8], atomic: u64) {
    let mut landed: Vec<W> = m.durable.clone();
    let mut seqs = HashSet::new();
    for &i in &s.included {
        let seq = epoch.ops[i].seq;
        let w = m.candidates.get(&seq).unwrap_or_else(|| {
            panic!(
                "state {} includes record {seq}, which is not pending in its epoch",
                s.id
            )
        });
        seqs.insert(seq);
        landed.push(w.clone());
    }
    if let Some(t) = &s.torn {
        let w = m.candidates.get(&t.seq).expect("torn write is a candidate");
        let start = w.pieces[0].0;
        let end = w.pieces.last().map(|p| p.0 + p.1).unwrap();
        for &(off, len) in &t.pieces {
            assert!(
                off >= start && off + len <= end,
                "state {}: torn piece outside",
                s.id
            );
            assert!(
                off == start || off % atomic == 0,
                "state {}: torn piece {off}",
                s.id
            );
            assert!(
                off + len == end || (off + len) % atomic == 0,
                "state {}",
                s.id
            );
        }
        seqs.insert(t.seq);
        landed.push(W {
            pieces: t.pieces.clone(),
            ..w.clone()
        });
    }
    let want = image_of(&landed);
    if let Some(x) = first_difference(img, &want) {
        panic!(
            "state {} ({}) of epoch {}: byte {x} (sector {}) is {} on the image, the model says {}",
            s.id,
            s.label,
            epoch.index,
            x / SECTOR,
            img[x as usize],
            want[x as usize]
        );
    }
    let newest = seqs.iter().copied().max();
    for w in m.candidates.values() {
        let later_kept = newest.is_some_and(|n| n > w.seq);
        if w.fua && later_kept && !seqs.contains(&w.seq) && !hidden(w, &m.durable) {
            panic!(
                "state {} keeps a write after FUA write {} but not it",
                s.id, w.seq
            );
        }
    }
}

/// A state and its image.
type Imaged = (CrashState, Vec<u8>);

/// Every state the generator makes of `log`, with its image as the overlay materialises it.
fn states_with_images(log: &Path, dir: &Path, opts: StateOptions) -> Vec<(Epoch, Vec<Imaged>)> {
    let base = dir.join("base.img");
    std::fs::File::create(&base).unwrap().set_len(SIZE).unwrap();
    let h = History::open(log).unwrap();
    let data = h.data_file().unwrap();
    let mut gen = StateGenerator::new(opts, h.data_file().unwrap());
    let prefix = PrefixImage::new(&base, dir, SIZE, LargerBase::Refuse).unwrap();
    let mut worker = WorkerImage::new(&prefix, dir.join("w.img")).unwrap();
    let mut out = Vec::new();
    for epoch in Epochs::new(h) {
        let epoch = epoch.unwrap();
        let mut states = Vec::new();
        for s in gen.epoch_states(&epoch).unwrap() {
            worker.materialize(&prefix, &epoch, &s, &data).unwrap();
            states.push((s, std::fs::read(&worker.path).unwrap()));
        }
        prefix.advance(&epoch, &data).unwrap();
        worker.prefix_advanced(&epoch, SIZE);
        out.push((epoch, states));
    }
    assert_eq!(
        hashed_ahead(log, opts),
        out.iter()
            .map(|(_, s)| s.iter().map(|(s, _)| s.clone()).collect::<Vec<_>>())
            .collect::<Vec<_>>(),
        "the states hashed ahead (from the bytes the reader kept) are the states"
    );
    out
}

/// Every epoch's states as `check` and `crashmonkey states` make them: hashed ahead on a
/// thread of their own, from the log's bytes as the reader read them.
fn hashed_ahead(log: &Path, opts: StateOptions) -> Vec<Vec<CrashState>> {
    let h = History::open(log).unwrap();
    let mut gen = StateGenerator::new(opts, h.data_file().unwrap());
    let mut out = Vec::new();
    crashmonkey::ahead::hashed_epochs(h, &opts, |item| {
        let (epoch, hashed) = item.unwrap();
        out.push(gen.epoch_states_hashed(&epoch, hashed).unwrap());
        true
    })
    .unwrap();
    out
}

/// Checks every state of `log` against the model; returns how many there were.
fn check_log(log: &Path, dir: &Path, opts: StateOptions) -> usize {
    let model = model(log);
    let states = states_with_images(log, dir, opts);
    assert_eq!(
        model.len(),
        states.len(),
        "the model and the generator count epochs alike"
    );
    let mut n = 0;
    let mut seen: HashSet<&[u8]> = HashSet::new();
    seen.insert(&ZEROES);
    for (m, (epoch, states)) in model.iter().zip(&states) {
        for op in &epoch.ops {
            assert!(
                m.candidates.contains_key(&op.seq),
                "epoch {} holds record {}, which the model says is not pending there",
                epoch.index,
                op.seq
            );
        }
        for (s, img) in states {
            check_state(m, epoch, s, img, opts.atomic_bytes);
            n += 1;
        }
        seen.extend(states.iter().map(|(_, img)| img.as_slice()));
        if m.ended_by_flush {
            // An epoch with nothing new has no states: its flush's disk is an earlier one.
            let flushed = image_of(&m.after);
            assert!(
                seen.contains(flushed.as_slice()),
                "epoch {}: no state is the disk its flush made durable",
                epoch.index
            );
        }
    }
    n
}

/// Drives an emulated disk that records (conn 1 and 2), every write with its own byte value.
struct Driver {
    disk: EmulatedDisk,
    storage: Arc<VecStorage>,
    byte: u8,
    held: Vec<Ticket>,
}

impl Driver {
    fn new(path: &Path) -> Self {
        let storage = Arc::new(VecStorage::new(SIZE).unwrap());
        let config = DiskConfig {
            record: Some(path.into()),
            ..Default::default()
        };
        let disk = EmulatedDisk::new(storage.clone(), config).unwrap();
        Driver {
            disk,
            storage,
            byte: 1,
            held: Vec::new(),
        }
    }

    fn arrive(&self, kind: RequestKind, offset: u64, length: u64, fua: bool) -> Ticket {
        let conn = 1 + u64::from(self.byte % 2);
        self.disk
            .arrived(&Arrival {
                conn,
                kind,
                offset,
                length,
                fua,
            })
            .expect("changes and flushes get a ticket")
    }

    /// One step: `what` picks write (held in flight or answered), FUA write, trim, zero
    /// write, flush, mark, or answering the held writes.
    fn step(&mut self, what: u8, sector: u64, sectors: u64) {
        let off = (sector * SECTOR) % SIZE;
        let len = (sectors * SECTOR).min(SIZE - off);
        match what {
            0..=3 => {
                let fua = what == 3;
                let t = self.arrive(RequestKind::Write, off, len, fua);
                let data = WriteData::bytes(vec![self.byte; len as usize]);
                self.disk.write(Some(t), off, data, fua).unwrap();
                self.byte = self.byte.wrapping_add(1).max(1);
                if what == 2 {
                    self.held.push(t)
                } else {
                    self.disk.reply_sent(t)
                }
            }
            4 => {
                let t = self.arrive(RequestKind::Trim, off, len, false);
                self.disk.trim(Some(t), off, len, false).unwrap();
                self.disk.reply_sent(t);
            }
            5 => {
                let t = self.arrive(RequestKind::WriteZeroes, off, len, false);
                self.disk
                    .write_zeroes(Some(t), off, len, false, false, false)
                    .unwrap();
                self.disk.reply_sent(t);
            }
            6 => {
                let t = self.arrive(RequestKind::Flush, 0, 0, false);
                self.disk.flush(Some(t)).unwrap();
                self.disk.reply_sent(t);
            }
            7 => {
                self.disk.mark(&format!("m{sector}")).unwrap();
            }
            _ => {
                for t in self.held.drain(..) {
                    self.disk.reply_sent(t);
                }
            }
        }
    }

    fn surviving_disk(&self) -> Vec<u8> {
        let mut img = vec![0u8; SIZE as usize];
        self.storage.read(None, 0, &mut img).unwrap();
        img
    }
}

fn opts(seed: u64) -> StateOptions {
    StateOptions {
        max_subset: 2,
        samples: 64,
        seed,
        torn: true,
        atomic_bytes: SECTOR,
    }
}

/// A fixed log with overlapping writes, writes in flight across two flushes, FUA, trims,
/// zero writes, marks and a power cut in the middle.
#[test]
fn every_state_is_the_model_s_image() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    fixed_log(&log);
    let n = check_log(&log, dir.path(), opts(7));
    assert!(n > 20, "{n} states");
}

/// `check` generates its states while the pass over the headers looks for power cuts, and
/// generates them again with the cut's fates once it finds one: the images its checker sees
/// are the model's, state by state, and there are as many.
#[test]
fn check_s_states_after_a_power_cut_are_the_model_s_images() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    fixed_log(&log);
    let seen = dir.path().join("seen");
    std::fs::create_dir(&seen).unwrap();
    let base = dir.path().join("zero.img");
    std::fs::File::create(&base).unwrap().set_len(SIZE).unwrap();
    let checker = format!("cp {{image}} {}/{{state}}.img", seen.display());
    let o = crashmonkey::check::CheckOptions {
        checker,
        jobs: 2,
        out: None,
        states: opts(7),
        progress: false,
        timeout_seconds: 60,
        larger_base: LargerBase::Refuse,
        stop: Default::default(),
        shard: Default::default(),
        work_dir: None,
        checker_nice: 0,
    };
    let summary = crashmonkey::check::check(&log, &base, &o).unwrap();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).unwrap();
    let mut unique = 0;
    for (_, states) in states_with_images(&log, &model_dir, opts(7)) {
        for (s, img) in states.iter().filter(|(s, _)| s.duplicate_of.is_none()) {
            let got = std::fs::read(seen.join(format!("{}.img", s.id))).unwrap();
            assert!(
                got == *img,
                "state {} ({}) is not the model's image",
                s.id,
                s.label
            );
            unique += 1;
        }
    }
    assert_eq!((summary.unique, summary.passed), (unique, unique));
    assert_eq!(std::fs::read_dir(&seen).unwrap().count(), unique);
}

/// Writes the log of [`every_state_is_the_model_s_image`] to `log`.
fn fixed_log(log: &Path) {
    let mut d = Driver::new(log);
    for &(what, sector, sectors) in &[
        (0, 0, 8),
        (2, 4, 8), // in flight across the next flush
        (1, 6, 2),
        (6, 0, 0),
        (0, 0, 2),
        (3, 20, 4),
        (4, 1, 2),
        (6, 0, 0), // the held write is still in flight: carried again
        (8, 0, 0),
        (0, 30, 16),
        (5, 34, 2),
        (7, 1, 0),
        (0, 32, 4),
    ] {
        d.step(what, sector, sectors);
    }
    d.disk.power_cut(Some(3)).unwrap();
    for &(what, sector, sectors) in &[(0, 8, 8), (2, 10, 8), (6, 0, 0), (8, 0, 0), (0, 9, 1)] {
        d.step(what, sector, sectors);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// The same on random logs: overlapping writes on two connections, some held in flight
    /// across flushes, FUA writes, trims, zero writes, marks, and sometimes a power cut.
    #[test]
    fn random_logs_are_the_model_s_images(
        steps in proptest::collection::vec((0u8..9, 0u64..128, 1u64..24), 1..40),
        cut_at in proptest::option::of(0usize..40),
        seed in 0u64..1000,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("d.log");
        let mut d = Driver::new(&log);
        for (i, &(what, sector, sectors)) in steps.iter().enumerate() {
            if cut_at == Some(i) {
                d.disk.power_cut(Some(seed)).unwrap();
            }
            d.step(what, sector, sectors);
        }
        drop(d);
        check_log(&log, dir.path(), opts(seed));
    }
}

/// The log up to (not including) its power-cut record: the log of a server killed at the cut.
fn log_before_cut(log: &Path, out: &Path) -> PathBuf {
    let cut = LogReader::open(log)
        .unwrap()
        .map(Result::unwrap)
        .find(|r| r.kind == RecordKind::PowerCut)
        .expect("a power-cut record");
    let bytes = std::fs::read(log).unwrap();
    std::fs::write(out, &bytes[..cut.file_offset as usize]).unwrap();
    out.to_path_buf()
}

/// Whether each sector of `img` holds what the model allows at the end of `log`: the durable
/// content, or the bytes of a pending write over it.
fn admitted_sector_by_sector(m: &ModelEpoch, img: &[u8]) -> Result<(), String> {
    let durable = image_of(&m.durable);
    for s in 0..SIZE / SECTOR {
        let r = (s * SECTOR) as usize..((s + 1) * SECTOR) as usize;
        if img[r.clone()] == durable[r.clone()] {
            continue;
        }
        let ok = m.candidates.values().any(|w| {
            w.pieces
                .iter()
                .any(|&(o, l)| o <= s * SECTOR && (s + 1) * SECTOR <= o + l)
                && w.data[r.start - w.offset as usize..r.end - w.offset as usize] == img[r.clone()]
        });
        if !ok {
            return Err(format!("sector {s} holds neither durable nor pending data"));
        }
    }
    Ok(())
}

/// The emulated disk's power cut and the generator are two implementations of one rule:
/// every disk a seeded cut leaves is a state the generator admits. Cuts that keep or drop
/// whole writes must be among the states it enumerates (exhaustively, here); a cut that tears
/// writes may tear several at once, which the generator bounds to one per state, so those
/// are held to the model sector by sector.
#[test]
fn every_power_cut_leaves_a_state_the_generator_admits() {
    let (mut whole, mut torn) = (0, 0);
    for seed in 0..80u64 {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("d.log");
        let mut d = Driver::new(&log);
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for _ in 0..12 {
            let what = [0, 0, 1, 2, 3, 4, 5, 6, 8][next(9) as usize];
            d.step(what, next(120), 1 + next(12));
        }
        let report = d.disk.power_cut(Some(seed)).unwrap();
        let after = d.surviving_disk();
        drop(d);
        let cut_log = log_before_cut(&log, &dir.path().join("before.log"));
        let last = model(&cut_log).pop().unwrap();
        admitted_sector_by_sector(&last, &after)
            .unwrap_or_else(|e| panic!("seed {seed} ({:?} cut): {e}", report.mode));
        if report.mode == CutMode::Torn && report.torn > 0 {
            torn += 1;
            continue;
        }
        whole += 1;
        let every = StateOptions {
            max_subset: 64,
            samples: 1 << 16,
            torn: false,
            ..opts(seed)
        };
        // Keeping none of the last epoch's writes is the previous epoch's flush state.
        let states = states_with_images(&cut_log, dir.path(), every);
        let all: Vec<&Imaged> = states.iter().flat_map(|(_, s)| s).collect();
        assert!(
            after == ZEROES || all.iter().any(|(_, img)| *img == after),
            "seed {seed}: the disk a {:?} cut left ({} pending, {} kept) is not among the {} \
             states of the log before it",
            report.mode,
            report.pending,
            report.kept,
            all.len()
        );
        assert!(all.iter().all(|(s, _)| s.kind != StateKind::Torn));
    }
    assert!(
        whole > 20 && torn > 8,
        "{whole} whole cuts, {torn} torn cuts"
    );
}
