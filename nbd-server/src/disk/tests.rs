//! Unit and property tests of the durability rule, epochs, power cut and faults.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use std::io;

use crate::backend::{Arrival, Piece, RequestKind, StatusExtent, Ticket, WriteData, WriteFailed};
use crate::log::{decode_payload, FlushPayload, LogReader, PowerCutPayload};

const SIZE: u64 = 64 * 1024;

fn disk(record: Option<PathBuf>) -> (Arc<VecStorage>, EmulatedDisk) {
    let storage = Arc::new(VecStorage::new(SIZE).unwrap());
    let d = EmulatedDisk::new(
        storage.clone(),
        DiskConfig {
            record,
            ..DiskConfig::default()
        },
    )
    .unwrap();
    (storage, d)
}

fn arrive(
    d: &EmulatedDisk,
    conn: u64,
    kind: RequestKind,
    offset: u64,
    length: u64,
    fua: bool,
) -> Ticket {
    d.arrived(&Arrival {
        conn,
        kind,
        offset,
        length,
        fua,
    })
    .expect("changes and flushes get a ticket")
}

/// Write start to finish: arrival, IO, reply.
fn write(d: &EmulatedDisk, conn: u64, offset: u64, byte: u8, len: usize, fua: bool) {
    let t = arrive(d, conn, RequestKind::Write, offset, len as u64, fua);
    d.write(Some(t), offset, WriteData::bytes(vec![byte; len]), fua)
        .unwrap();
    d.reply_sent(t);
}

fn flush(d: &EmulatedDisk, conn: u64) {
    let t = arrive(d, conn, RequestKind::Flush, 0, 0, false);
    d.flush(Some(t)).unwrap();
    d.reply_sent(t);
}

fn read(d: &EmulatedDisk, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    d.read(None, offset, &mut buf).unwrap();
    buf
}

/// The records of the log at `path`.
fn log_records(path: &std::path::Path) -> Vec<crate::log::Record> {
    LogReader::open(path).unwrap().map(|r| r.unwrap()).collect()
}

/// The decoded payload of record `rec` of the log at `path`.
fn payload_of<T: bincode::Decode<()>>(path: &std::path::Path, rec: &crate::log::Record) -> T {
    let bytes = LogReader::open(path).unwrap().read_payload(rec).unwrap();
    decode_payload(&bytes).unwrap()
}

/// Guards against a write cache that loses what a reader should see: cached writes overlay
/// reads before they reach storage.
#[test]
fn reads_see_cached_writes_before_storage_does() {
    let (storage, d) = disk(None);
    write(&d, 1, 4096, 0xAA, 4096, false);
    write(&d, 1, 6000, 0xBB, 100, false);
    assert_eq!(read(&d, 4096, 4096)[0], 0xAA);
    assert_eq!(read(&d, 6000, 100), vec![0xBB; 100]);
    assert_eq!(
        storage.snapshot()[4096],
        0,
        "not durable yet, so not in storage"
    );
    flush(&d, 1);
    let snap = storage.snapshot();
    assert_eq!(snap[4096], 0xAA);
    assert_eq!(&snap[6000..6100], &[0xBB; 100][..]);
    assert_eq!(snap[6100], 0xAA);
}

/// The durability rule is global: a FLUSH on connection 2 covers a write answered on
/// connection 1 before the flush arrived, and not a write still in flight on connection 1.
#[test]
fn flush_on_one_connection_covers_answered_writes_of_another_not_in_flight_ones() {
    // Every seed: the answered write survives the power cut; the in-flight one may or may
    // not, and over the seeds both outcomes occur (one seed would check only one of them).
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..16 {
        let (storage, d) = disk(None);
        write(&d, 1, 0, 0x11, 512, false); // answered before the flush arrives
        let in_flight = arrive(&d, 1, RequestKind::Write, 4096, 512, false);
        d.write(
            Some(in_flight),
            4096,
            WriteData::copy_of(&[0x22; 512]),
            false,
        )
        .unwrap(); // applied, reply not yet sent
        let f = arrive(&d, 2, RequestKind::Flush, 0, 0, false);
        d.reply_sent(in_flight); // answered after the flush arrived
        d.flush(Some(f)).unwrap();
        d.reply_sent(f);
        let snap = storage.snapshot();
        assert_eq!(snap[0], 0x11, "answered write is durable");
        assert_eq!(snap[4096], 0, "in-flight write is not covered");
        let cut = d.power_cut(Some(seed)).unwrap();
        assert_eq!(cut.pending, 1, "seed {seed}");
        assert_eq!(
            read(&d, 0, 512),
            vec![0x11; 512],
            "seed {seed}: durable write lost"
        );
        let pending = read(&d, 4096, 512);
        assert!(
            pending == vec![0; 512] || pending == vec![0x22; 512],
            "seed {seed}: the pending write is neither kept nor dropped whole: {pending:?}"
        );
        outcomes.insert(pending[0]);
    }
    assert_eq!(
        outcomes.len(),
        2,
        "16 seeds show one outcome only: {outcomes:?}"
    );
}

/// A write answered with FUA is durable at once, without a flush.
#[test]
fn fua_write_is_durable_without_flush() {
    let (storage, d) = disk(None);
    write(&d, 1, 0, 0x33, 1024, true);
    assert_eq!(storage.snapshot()[0..1024], [0x33; 1024]);
}

/// Storage sees writes in apply order: writing back a FUA write first writes back the older
/// cached write it overlaps, so the older one can never land over it later.
#[test]
fn fua_write_back_keeps_apply_order() {
    let (storage, d) = disk(None);
    write(&d, 1, 0, 0x01, 4096, false);
    write(&d, 1, 0, 0x02, 512, true);
    let cut = d.power_cut(Some(3)).unwrap();
    assert_eq!(cut.pending, 0);
    let snap = storage.snapshot();
    assert_eq!(snap[0..512], [0x02; 512]);
    assert_eq!(snap[512], 0x01);
}

/// Storage that records the calls it gets, over a [`VecStorage`]; its writes and flushes
/// fail with EIO while `failing` is set.
struct CallLog {
    inner: VecStorage,
    calls: std::sync::Mutex<Vec<String>>,
    failing: std::sync::atomic::AtomicBool,
    can_trim: bool,
}

impl CallLog {
    fn new() -> Self {
        CallLog {
            inner: VecStorage::new(SIZE).unwrap(),
            calls: Default::default(),
            failing: Default::default(),
            can_trim: true,
        }
    }
    fn fail(&self, on: bool) {
        self.failing.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    fn check(&self) -> io::Result<()> {
        match self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            true => Err(io::Error::from_raw_os_error(libc::EIO)),
            false => Ok(()),
        }
    }
    fn note(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Backend for CallLog {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn can_trim(&self) -> bool {
        self.can_trim
    }
    fn read(&self, t: Option<Ticket>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read(t, offset, buf)
    }
    fn write(
        &self,
        t: Option<Ticket>,
        offset: u64,
        data: WriteData,
        fua: bool,
    ) -> Result<(), WriteFailed> {
        self.note(format!("write {offset}+{} fua={fua}", data.len()));
        if let Err(error) = self.check() {
            return Err(WriteFailed {
                error,
                data: Some(data),
            });
        }
        self.inner.write(t, offset, data, fua)
    }
    fn write_zeroes(
        &self,
        t: Option<Ticket>,
        offset: u64,
        length: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.note(format!("zero {offset}+{length} fua={fua}"));
        self.inner
            .write_zeroes(t, offset, length, may_trim, fast_only, fua)
    }
    fn trim(&self, t: Option<Ticket>, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.note(format!("trim {offset}+{length} fua={fua}"));
        self.inner.trim(t, offset, length, fua)
    }
    fn flush(&self, t: Option<Ticket>) -> io::Result<()> {
        self.note("flush".into());
        self.check()?;
        self.inner.flush(t)
    }
    fn block_status(
        &self,
        t: Option<Ticket>,
        offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        self.inner.block_status(t, offset, length)
    }
}

/// A FUA write writes back the older cached writes in order, then itself with FUA, so that
/// storage syncs just its range (a file: `RWF_DSYNC`), not everything (`fdatasync`). A FLUSH
/// still writes back and syncs everything.
#[test]
fn fua_write_back_syncs_only_the_fua_write() {
    let storage = Arc::new(CallLog::new());
    let d = EmulatedDisk::new(storage.clone(), DiskConfig::default()).unwrap();
    write(&d, 1, 0, 0x01, 4096, false);
    write(&d, 1, 8192, 0x02, 4096, false);
    let t = arrive(&d, 1, RequestKind::WriteZeroes, 16384, 4096, false);
    d.write_zeroes(Some(t), 16384, 4096, false, false, false)
        .unwrap();
    d.reply_sent(t);
    assert_eq!(
        storage.take(),
        Vec::<String>::new(),
        "plain writes stay cached"
    );
    write(&d, 1, 4096, 0x03, 4096, true);
    write(&d, 1, 32768, 0x04, 4096, false);
    assert_eq!(
        storage.take(),
        [
            "write 0+4096 fua=false",
            "write 8192+4096 fua=false",
            "zero 16384+4096 fua=false",
            "write 4096+4096 fua=true",
        ]
    );
    let t = arrive(&d, 1, RequestKind::WriteZeroes, 0, 4096, true);
    d.write_zeroes(Some(t), 0, 4096, false, false, true)
        .unwrap();
    d.reply_sent(t);
    assert_eq!(
        storage.take(),
        ["write 32768+4096 fua=false", "zero 0+4096 fua=true"]
    );
    write(&d, 1, 40960, 0x05, 4096, false);
    flush(&d, 1);
    assert_eq!(storage.take(), ["write 40960+4096 fua=false", "flush"]);
    assert_eq!(read(&d, 4096, 4096), [0x03; 4096]);
    assert_eq!(read(&d, 0, 4096), [0; 4096]);
}

/// Epochs in the log: the flush record lists writes in flight across it.
#[test]
fn flush_record_lists_in_flight_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let (_s, d) = disk(Some(path.clone()));
    write(&d, 1, 0, 1, 512, false);
    let t = arrive(&d, 1, RequestKind::Write, 512, 512, false);
    d.write(Some(t), 512, WriteData::copy_of(&[2; 512]), false)
        .unwrap();
    flush(&d, 2);
    d.reply_sent(t);
    d.mark("after").unwrap();
    drop(d);
    let r = LogReader::open(&path).unwrap();
    let recs = log_records(&path);
    let kinds: Vec<_> = recs.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![
            RecordKind::Write,
            RecordKind::Write,
            RecordKind::Flush,
            RecordKind::Mark
        ]
    );
    let p: FlushPayload = payload_of(&path, &recs[2]);
    assert_eq!(p.in_flight, vec![1]);
    assert_eq!(r.read_payload(&recs[3]).unwrap(), b"after");
}

/// A write whose reply was abandoned (its connection died) is no longer in flight for later
/// flushes, and no flush covers it: it stays cached until something older than a covered
/// write pushes it out.
#[test]
fn an_abandoned_write_leaves_the_flights_and_no_flush_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let (storage, d) = disk(Some(path.clone()));
    let t = arrive(&d, 1, RequestKind::Write, 0, 512, false);
    d.write(Some(t), 0, WriteData::copy_of(&[3; 512]), false)
        .unwrap();
    d.reply_abandoned(t);
    flush(&d, 2);
    assert_eq!(
        storage.snapshot()[0],
        0,
        "a flush covered an unanswered write"
    );
    assert_eq!(d.stats().cache_entries, 1);
    drop(d);
    let recs = log_records(&path);
    assert_eq!(recs[1].kind, RecordKind::Flush);
    let p: FlushPayload = payload_of(&path, &recs[1]);
    assert_eq!(p.in_flight, Vec::<u64>::new());
}

/// Reads are counted at arrival (changes are not), and get a ticket only while faults are
/// injected: then an injected EIO fails them.
#[test]
fn reads_are_counted_and_fail_with_an_injected_eio() {
    let (_s, d) = disk(None);
    for kind in [RequestKind::Read, RequestKind::Read, RequestKind::Write] {
        let a = Arrival {
            conn: 1,
            kind,
            offset: 0,
            length: 512,
            fua: false,
        };
        let ticket = d.arrived(&a);
        assert_eq!(ticket.is_some(), kind != RequestKind::Read, "{kind:?}");
        if let Some(t) = ticket {
            d.reply_sent(t);
        }
    }
    assert_eq!(d.stats().reads, 2);
    let faults = FaultConfig {
        eio_read: 1.0,
        ..FaultConfig::default()
    };
    let config = DiskConfig {
        faults,
        ..DiskConfig::default()
    };
    let d = EmulatedDisk::new(Arc::new(VecStorage::new(SIZE).unwrap()), config).unwrap();
    let t = arrive(&d, 1, RequestKind::Read, 0, 512, false);
    let e = d.read(Some(t), 0, &mut [0; 512]).unwrap_err();
    assert_eq!(crate::reply::errno_of(&e), crate::proto::NBD_EIO);
    assert_eq!(d.stats().faults, 1);
}

/// A FLUSH reply waits until the log's file holds every record before it: a reader opened
/// right after it (the server still running) finds them, whether the log is pushed to the
/// operating system (the default) or to stable storage (`record-sync=flush`).
#[test]
fn a_flushed_write_is_in_the_log_file_when_the_flush_returns() {
    for record_sync in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.log");
        let config = DiskConfig {
            record: Some(path.clone()),
            record_sync,
            ..DiskConfig::default()
        };
        let d = EmulatedDisk::new(Arc::new(VecStorage::new(SIZE).unwrap()), config).unwrap();
        write(&d, 1, 0, 1, 512, false);
        flush(&d, 1);
        let kinds: Vec<_> = LogReader::open(&path)
            .unwrap()
            .map(|r| r.unwrap().kind)
            .collect();
        assert_eq!(
            kinds,
            [RecordKind::Write, RecordKind::Flush],
            "sync {record_sync}"
        );
        drop(d);
    }
}

/// Without a flush, the recorder thread still pushes what it wrote to the log's file once it
/// is out of work (within `RECORDER_PUSH_INTERVAL_MILLIS`), so a reader (`crashmonkey`, a
/// `tail` of the log) sees a running server's writes.
#[test]
fn unflushed_writes_reach_the_log_file_soon() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let (_s, d) = disk(Some(path.clone()));
    for i in 0..3 {
        write(&d, 1, i * 512, 1, 512, false);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let records = || LogReader::open(&path).unwrap().count();
    while records() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        records(),
        3,
        "the writes are not in the log file after 10 s"
    );
    drop(d);
}

/// A FLUSH covers the writes answered before it arrived, not one answered while it waited
/// (that one stays cached, for a power cut to drop); a flush driven without arrival covers
/// everything answered so far.
#[test]
fn a_flush_covers_what_was_answered_before_it_arrived() {
    let (storage, d) = disk(None);
    write(&d, 1, 0, 1, 512, false);
    d.write(None, 12288, WriteData::copy_of(&[4; 512]), false)
        .unwrap();
    let f = arrive(&d, 2, RequestKind::Flush, 0, 0, false);
    write(&d, 1, 4096, 2, 512, false);
    // A write driven without arrival (tools, fs-core's device) is answered at once: after
    // the flush arrived, too.
    d.write(None, 8192, WriteData::copy_of(&[3; 512]), false)
        .unwrap();
    d.flush(Some(f)).unwrap();
    d.reply_sent(f);
    let img = storage.snapshot();
    let got = (img[0], img[12288], img[4096], img[8192]);
    assert_eq!(
        got,
        (1, 4, 0, 0),
        "covered, then answered after the flush arrived"
    );
    assert_eq!(d.stats().cache_entries, 2);
    d.flush(None).unwrap();
    let img = storage.snapshot();
    let got = (img[4096], img[8192]);
    assert_eq!(got, (2, 3), "a flush without arrival covers everything");
}

/// A power cut forgets the requests in flight: a flush after it lists none of them.
#[test]
fn after_a_power_cut_no_write_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let (_s, d) = disk(Some(path.clone()));
    let t = arrive(&d, 1, RequestKind::Write, 0, 512, false);
    d.write(Some(t), 0, WriteData::copy_of(&[3; 512]), false)
        .unwrap();
    d.power_cut(Some(1)).unwrap();
    flush(&d, 2);
    drop(d);
    let recs = log_records(&path);
    let kinds: Vec<_> = recs.iter().map(|r| r.kind).collect();
    let flush_kinds = [RecordKind::Write, RecordKind::PowerCut, RecordKind::Flush];
    assert_eq!(kinds, flush_kinds);
    let p: FlushPayload = payload_of(&path, &recs[2]);
    assert_eq!(p.in_flight, Vec::<u64>::new());
}

/// A power cut is recorded with each pending write's fate, and the result is what stays.
#[test]
fn power_cut_records_fates_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let (_s, d) = disk(Some(path.clone()));
    let mut rx = d.power_cuts();
    write(&d, 1, 0, 1, 4096, false);
    flush(&d, 1);
    for i in 1..8u8 {
        write(&d, 1, i as u64 * 4096, i + 1, 4096, false);
    }
    let report = d.power_cut(Some(42)).unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 1, "the cut's generation");
    assert_eq!(report.pending, 7);
    assert_eq!(read(&d, 0, 4096), vec![1; 4096]);
    drop(d);
    let recs = log_records(&path);
    let last = recs.last().unwrap();
    assert_eq!(last.kind, RecordKind::PowerCut);
    let p: PowerCutPayload = payload_of(&path, last);
    assert_eq!(p.seed, 42);
    assert_eq!(p.fates.len(), 7);
}

/// A power cut waits for the gate (an fs-core engine holds it for each step, so a cut falls
/// between two steps), and every cut moves the generation the server's connections watch.
#[test]
fn a_power_cut_waits_for_its_gate_and_counts_generations() {
    let (_s, d) = disk(None);
    let d = Arc::new(d);
    let gate = Arc::new(std::sync::Mutex::new(()));
    d.set_power_cut_gate(gate.clone());
    let held = gate.lock().unwrap();
    let cutter = {
        let d = d.clone();
        std::thread::spawn(move || d.power_cut(Some(1)).unwrap())
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(d.stats().power_cuts, 0, "the cut went through a held gate");
    drop(held);
    cutter.join().unwrap();
    d.power_cut(Some(2)).unwrap();
    assert_eq!(d.stats().power_cuts, 2);
    assert_eq!(*d.power_cuts().borrow(), 2);
    assert_eq!(d.last_power_cut_seed(), Some(2));
}

/// Mark names are 1 to `MARK_NAME_BYTES_MAX` bytes without control characters.
#[test]
fn mark_names_are_checked_at_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (_s, d) = disk(Some(dir.path().join("m.log")));
    let longest = "m".repeat(MARK_NAME_BYTES_MAX);
    assert!(d.mark(&longest).unwrap().is_some());
    for bad in [String::new(), format!("{longest}m"), "a\nb".to_string()] {
        assert!(
            matches!(d.mark(&bad), Err(DiskError::BadMarkName)),
            "{bad:?}"
        );
    }
    assert_eq!(d.stats().marks, 1);
}

/// Requests that arrived before a power cut do nothing after it.
#[test]
fn requests_from_before_a_power_cut_fail() {
    let (_s, d) = disk(None);
    let t = arrive(&d, 1, RequestKind::Write, 0, 512, false);
    d.power_cut(Some(1)).unwrap();
    assert!(d
        .write(Some(t), 0, WriteData::copy_of(&[9; 512]), false)
        .is_err());
    assert_eq!(read(&d, 0, 512), vec![0; 512]);
}

/// Past the cache limit the oldest writes are written back early (allowed, and bounded).
#[test]
fn cache_is_bounded() {
    let storage = Arc::new(VecStorage::new(SIZE).unwrap());
    let d = EmulatedDisk::new(
        storage.clone(),
        DiskConfig {
            cache_bytes_max: 8192,
            ..DiskConfig::default()
        },
    )
    .unwrap();
    for i in 0..8u8 {
        write(&d, 1, i as u64 * 4096, i + 1, 4096, false);
    }
    let s = d.stats();
    assert!(s.cache_bytes <= 8192, "{s:?}");
    assert!(s.early_writebacks > 0);
    for i in 0..8u8 {
        assert_eq!(read(&d, i as u64 * 4096, 4096), vec![i + 1; 4096]);
    }
}

/// Faults come from the seed and are recorded; the same seed gives the same faults.
#[test]
fn faults_are_seeded_and_recorded() {
    let run = |seed| {
        let storage = Arc::new(VecStorage::new(SIZE).unwrap());
        let faults = FaultConfig {
            seed,
            eio_write: 0.5,
            ..FaultConfig::default()
        };
        let d = EmulatedDisk::new(
            storage,
            DiskConfig {
                faults,
                ..DiskConfig::default()
            },
        )
        .unwrap();
        let mut fails = Vec::new();
        for i in 0..32u64 {
            let t = arrive(&d, 1, RequestKind::Write, i * 512, 512, false);
            fails.push(
                d.write(Some(t), i * 512, WriteData::copy_of(&[1; 512]), false)
                    .is_err(),
            );
            d.reply_sent(t);
        }
        (fails, d.stats().faults)
    };
    let (a, na) = run(5);
    let (b, _) = run(5);
    assert_eq!(a, b);
    assert!(a.iter().any(|&f| f) && a.iter().any(|&f| !f));
    assert_eq!(na as usize, a.iter().filter(|&&f| f).count());
}

#[derive(Debug, Clone)]
enum Step {
    /// Start a write on a connection: (conn, sector, byte).
    Start(u8, u8, u8),
    /// Reply to the oldest in-flight write of a connection.
    Reply(u8),
    Flush(u8),
    Fua(u8, u8, u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..2u8, 0..16u8, 1..255u8).prop_map(|(c, s, b)| Step::Start(c, s, b)),
        4 => (0..2u8).prop_map(Step::Reply),
        1 => (0..2u8).prop_map(Step::Flush),
        1 => (0..2u8, 0..16u8, 1..255u8).prop_map(|(c, s, b)| Step::Fua(c, s, b)),
    ]
}

proptest! {
    /// After any interleaving of writes, replies and flushes on two connections and a power
    /// cut with any seed, every sector holds either its newest durable write or a write newer
    /// than that one, never anything older (the durability rule, globally).
    #[test]
    fn power_cut_never_loses_durable_data(steps in proptest::collection::vec(step(), 1..60), seed in any::<u64>()) {
        let (_s, d) = disk(None);
        // Per sector: list of (apply order, byte) of writes; durable index per sector.
        let mut history: Vec<Vec<(usize, u8)>> = vec![Vec::new(); 16];
        let mut durable: Vec<Option<usize>> = vec![None; 16];
        let mut answered: Vec<(usize, usize)> = Vec::new(); // (sector, apply order) answered, not durable
        let mut in_flight: Vec<std::collections::VecDeque<(Ticket, usize, usize)>> = vec![Default::default(), Default::default()];
        let mut order = 0usize;
        for s in steps {
            match s {
                Step::Start(c, sec, b) => {
                    let t = arrive(&d, c as u64, RequestKind::Write, sec as u64 * 512, 512, false);
                    d.write(Some(t), sec as u64 * 512, WriteData::copy_of(&[b; 512]), false).unwrap();
                    history[sec as usize].push((order, b));
                    in_flight[c as usize].push_back((t, sec as usize, order));
                    order += 1;
                }
                Step::Reply(c) => {
                    if let Some((t, sec, o)) = in_flight[c as usize].pop_front() {
                        d.reply_sent(t);
                        answered.push((sec, o));
                    }
                }
                Step::Flush(c) => {
                    let t = arrive(&d, c as u64, RequestKind::Flush, 0, 0, false);
                    d.flush(Some(t)).unwrap();
                    d.reply_sent(t);
                    for (sec, o) in answered.drain(..) {
                        durable[sec] = Some(durable[sec].map_or(o, |x: usize| x.max(o)));
                    }
                }
                Step::Fua(c, sec, b) => {
                    let t = arrive(&d, c as u64, RequestKind::Write, sec as u64 * 512, 512, true);
                    d.write(Some(t), sec as u64 * 512, WriteData::copy_of(&[b; 512]), true).unwrap();
                    d.reply_sent(t);
                    history[sec as usize].push((order, b));
                    durable[sec as usize] = Some(durable[sec as usize].map_or(order, |x| x.max(order)));
                    order += 1;
                }
            }
        }
        d.power_cut(Some(seed)).unwrap();
        for sec in 0..16 {
            let got = read(&d, sec as u64 * 512, 512);
            prop_assert!(got.iter().all(|&x| x == got[0]), "sector {} is not torn at 512 B", sec);
            let allowed: Vec<u8> = match durable[sec] {
                None => std::iter::once(0).chain(history[sec].iter().map(|h| h.1)).collect(),
                Some(o) => history[sec].iter().filter(|h| h.0 >= o).map(|h| h.1).collect(),
            };
            prop_assert!(allowed.contains(&got[0]), "sector {} holds {} not in {:?}", sec, got[0], allowed);
        }
    }
}

#[derive(Debug, Clone)]
enum CacheOp {
    /// Write `len` bytes of `byte` at `off` (any alignment).
    Write(u16, u16, u8),
    /// WRITE_ZEROES (false) or TRIM (true) of `len` bytes at `off`.
    Zero(u16, u16, bool),
    Flush,
    /// Read `len` bytes at `off` and compare.
    Read(u16, u16),
}

/// Ranges inside the first 16 KiB, from 1 byte long (writes from 0 bytes: an empty write at
/// the start of a cached one must not hide it).
fn cache_op() -> impl Strategy<Value = CacheOp> {
    let range = (0..16_384u16).prop_flat_map(|off| (Just(off), 1..=(16_384 - off).min(6000)));
    let write_range = (0..16_384u16).prop_flat_map(|off| (Just(off), 0..=(16_384 - off).min(6000)));
    prop_oneof![
        6 => (write_range, 1..255u8).prop_map(|((o, l), b)| CacheOp::Write(o, l, b)),
        1 => (range.clone(), 1..255u8).prop_map(|((o, _), b)| CacheOp::Write(o, 0, b)),
        2 => (range.clone(), any::<bool>()).prop_map(|((o, l), t)| CacheOp::Zero(o, l, t)),
        1 => Just(CacheOp::Flush),
        3 => range.prop_map(|(o, l)| CacheOp::Read(o, l)),
    ]
}

proptest! {
    /// Reads see the newest write of every byte, whatever the overlaps: unaligned writes and
    /// zero ranges that split, cover and abut cached ones, some written back early (a small
    /// cache) or by a flush. Guards the cache's extent index and its overlay of reads.
    #[test]
    fn reads_see_the_newest_of_overlapping_cached_writes(
        ops in proptest::collection::vec(cache_op(), 1..80),
        cache_bytes in prop_oneof![Just(0u64), 4096..32_768u64],
    ) {
        let storage = Arc::new(VecStorage::new(SIZE).unwrap());
        let config = DiskConfig { cache_bytes_max: cache_bytes, ..DiskConfig::default() };
        let d = EmulatedDisk::new(storage, config).unwrap();
        let mut shadow = vec![0u8; 16_384];
        for op in ops {
            match op {
                CacheOp::Write(o, l, b) => {
                    // Every byte differs from its neighbours, so a read from the wrong place
                    // within a write shows.
                    let data: Vec<u8> = (0..l).map(|i| b.wrapping_add((i % 251) as u8)).collect();
                    let t = arrive(&d, 1, RequestKind::Write, o as u64, l as u64, false);
                    d.write(Some(t), o as u64, WriteData::copy_of(&data), false).unwrap();
                    d.reply_sent(t);
                    shadow[o as usize..(o + l) as usize].copy_from_slice(&data);
                }
                CacheOp::Zero(o, l, trim) => {
                    let kind = if trim { RequestKind::Trim } else { RequestKind::WriteZeroes };
                    let t = arrive(&d, 1, kind, o as u64, l as u64, false);
                    match trim {
                        true => d.trim(Some(t), o as u64, l as u64, false).unwrap(),
                        false => d.write_zeroes(Some(t), o as u64, l as u64, false, false, false).unwrap(),
                    }
                    d.reply_sent(t);
                    shadow[o as usize..(o + l) as usize].fill(0);
                }
                CacheOp::Flush => flush(&d, 1),
                CacheOp::Read(o, l) => {
                    let got = read(&d, o as u64, l as usize);
                    prop_assert_eq!(&got[..], &shadow[o as usize..(o + l) as usize], "read {}+{}", o, l);
                }
            }
        }
        prop_assert_eq!(read(&d, 0, 16_384), shadow);
    }
}

/// Reads lent from memory storage (`read_pieces`) give what `read` gives: storage's blocks
/// where no cached write covers the range, a copy with the cached writes laid over it
/// elsewhere.
#[test]
fn lent_reads_match_copied_reads_with_and_without_cached_writes() {
    let storage = Arc::new(crate::backend::MemoryBackend::new(4 << 20));
    let d = EmulatedDisk::new(storage, DiskConfig::default()).unwrap();
    assert!(d.lends_memory());
    let lent = |offset: u64, len: usize| {
        let mut out = Vec::new();
        let mut calls = 0;
        d.read_pieces(None, offset, len, &mut |pieces| {
            calls += 1;
            for p in pieces {
                match p {
                    Piece::Data(b) => out.extend_from_slice(b),
                    Piece::Zeroes(n) => out.resize(out.len() + n, 0),
                }
            }
        })
        .unwrap();
        (out, calls)
    };
    write(&d, 1, 4096, 0xAA, 8192, false);
    write(&d, 1, (1 << 20) + 300, 0xBB, 5000, false);
    // Cached writes overlap: one copied piece, with the cache laid over storage.
    let (got, calls) = lent(0, 2 << 20);
    assert_eq!((got == read(&d, 0, 2 << 20), calls), (true, 1));
    assert_eq!(got[4096], 0xAA);
    flush(&d, 1);
    // Written back: lent from storage, one call per 1 MiB chunk touched.
    let (got, calls) = lent(100, 2 << 20);
    assert!(got == read(&d, 100, 2 << 20));
    assert_eq!(calls, 3);
    assert_eq!(got[(1 << 20) + 200], 0xBB);
    assert_eq!(got[(1 << 20) + 199], 0);
}

/// Guards against a cache that stops caching. Writing back an entry held in blocks moved the
/// blocks into storage before the entry's size was taken off the cache's count, so the count
/// only grew: once it passed the limit, every write was written back at once (the cache held
/// one entry, and a power cut had next to nothing to choose from). The count must follow what
/// is cached, and a full cache hold its limit of pending writes.
#[test]
fn a_cache_of_writes_in_blocks_holds_its_limit_after_write_backs() {
    const PENDING_MAX: u64 = 16;
    let storage = Arc::new(crate::backend::MemoryBackend::new(1 << 20));
    let config = DiskConfig {
        cache_bytes_max: PENDING_MAX * 4096,
        ..DiskConfig::default()
    };
    let d = EmulatedDisk::new(storage, config).unwrap();
    for i in 0..4 * PENDING_MAX {
        let offset = (i % 64) * 4096;
        let t = arrive(&d, 1, RequestKind::Write, offset, 4096, false);
        let data = WriteData::blocks(vec![Box::new([i as u8 + 1; 4096])]);
        d.write(Some(t), offset, data, false).unwrap();
        d.reply_sent(t);
    }
    let s = d.stats();
    assert_eq!(s.cache_entries as u64, PENDING_MAX, "{s:?}");
    assert_eq!(s.cache_bytes, PENDING_MAX * 4096, "{s:?}");
    assert_eq!(s.early_writebacks, 3 * PENDING_MAX, "{s:?}");
    assert_eq!(read(&d, 0, 1), [1], "written back");
    assert_eq!(read(&d, 63 * 4096, 1), [64], "cached");
}

mod log_failures;

/// A lying disk (`flush=ignore`) answers FLUSH and FUA without making anything durable, and
/// its log says so: no flush record, no FUA flag. A power cut then can drop a flushed write.
#[test]
fn a_lying_disk_makes_nothing_durable_and_records_no_promise() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let storage = Arc::new(VecStorage::new(SIZE).unwrap());
    let d = EmulatedDisk::new(
        storage.clone(),
        DiskConfig {
            record: Some(path.clone()),
            flush_ignore: true,
            ..DiskConfig::default()
        },
    )
    .unwrap();
    write(&d, 1, 0, 0x11, 4096, false);
    flush(&d, 1);
    write(&d, 1, 4096, 0x22, 4096, true);
    assert_eq!(
        storage.snapshot()[..8192],
        [0; 8192],
        "nothing reached storage"
    );
    assert_eq!(d.stats().ignored_flushes, 1);
    d.power_cut(Some(0)).unwrap();
    drop(d);
    let recs = log_records(&path);
    assert!(recs.iter().all(|r| r.kind != RecordKind::Flush), "{recs:?}");
    assert!(recs
        .iter()
        .all(|r| r.header.flags & crate::log::FLAG_FUA == 0));
    assert_eq!(
        recs.iter().filter(|r| r.kind == RecordKind::Write).count(),
        2
    );
}

/// `ctl stats` counts what happened: writes, their bytes, FUA writes, flushes.
#[test]
fn stats_count_writes_fua_and_flushes() {
    let (_s, d) = disk(None);
    write(&d, 1, 0, 1, 512, false);
    write(&d, 1, 4096, 2, 1024, true);
    write(&d, 1, 8192, 3, 512, true);
    flush(&d, 1);
    let t = arrive(&d, 1, RequestKind::Trim, 0, 4096, false);
    d.trim(Some(t), 0, 4096, false).unwrap();
    d.reply_sent(t);
    for fua in [false, true] {
        let t = arrive(&d, 1, RequestKind::WriteZeroes, 8192, 512, fua);
        d.write_zeroes(Some(t), 8192, 512, false, false, fua)
            .unwrap();
        d.reply_sent(t);
    }
    let s = d.stats();
    assert_eq!((s.writes, s.write_bytes), (3, 2048));
    assert_eq!((s.trims, s.write_zeroes), (1, 2), "{s:?}");
    assert_eq!((s.fua_writes, s.flushes, s.ignored_flushes), (3, 1, 0));
    assert!(!s.recording);
    let dir = tempfile::tempdir().unwrap();
    let (_s, recorded) = disk(Some(dir.path().join("r.log")));
    assert!(recorded.stats().recording);
    write(&recorded, 1, 0, 1, 512, false);
    flush(&recorded, 1);
    recorded.mark("m").unwrap();
    assert_eq!(recorded.stats().log_records, 3, "write, flush, mark");
}

/// With no limit given, the cache holds 64 MiB and 16,384 writes (`CACHE_BYTES_MAX`,
/// `CACHE_ENTRIES_MAX`, as documented in docs/nbd-server.md) before it writes back the oldest:
/// the defaults that bound a campaign's memory and give a power cut its choice of writes.
#[test]
fn the_default_cache_holds_its_documented_limits() {
    const MIB: u64 = 1024 * 1024;
    let storage = Arc::new(crate::backend::MemoryBackend::new(72 * MIB));
    let d = EmulatedDisk::new(storage, DiskConfig::default()).unwrap();
    for i in 0..66 {
        write(&d, 1, i * MIB, i as u8 + 1, MIB as usize, false);
    }
    let s = d.stats();
    assert_eq!((s.cache_bytes, s.early_writebacks), (64 * MIB, 2), "{s:?}");
    let storage = Arc::new(crate::backend::MemoryBackend::new(16 * MIB));
    let d = EmulatedDisk::new(storage, DiskConfig::default()).unwrap();
    for i in 0..16_387 {
        write(&d, 1, i * 512, 7, 512, false);
    }
    let s = d.stats();
    assert_eq!((s.cache_entries, s.early_writebacks), (16_384, 3), "{s:?}");
}

/// The error for cached writes a write-back could not save names each range (up to 16, then
/// how many more), so a user can tell which data is at risk.
#[test]
fn the_unwritten_message_lists_ranges_up_to_its_limit() {
    let ranges: Vec<(u64, u64)> = (0..17).map(|i| (i * 4096, 512)).collect();
    let all = DiskError::Unwritten(ranges.clone()).to_string();
    assert!(
        all.starts_with("17 cached writes could not be written back: bytes 0..512 (512 bytes);"),
        "{all}"
    );
    assert!(
        all.contains("bytes 61440..61952 (512 bytes); and 1 more"),
        "{all}"
    );
    assert!(!all.contains("bytes 65536.."), "{all}");
    let sixteen = DiskError::Unwritten(ranges[..16].to_vec()).to_string();
    assert!(
        sixteen.ends_with("bytes 61440..61952 (512 bytes);"),
        "{sixteen}"
    );
}

/// BLOCK_STATUS of a range that starts before a cached write answers from storage only up
/// to that write (the cached bytes are not in storage yet).
#[test]
fn block_status_before_a_cached_write_stops_at_it() {
    let (_s, d) = disk(None);
    write(&d, 1, 8192, 7, 4096, false);
    let ext = d.block_status(None, 4096, 3 * 4096).unwrap();
    assert_eq!(ext.len(), 1);
    assert_eq!(ext[0].length, 4096, "{ext:?}");
    let ext = d.block_status(None, 8192, 3 * 4096).unwrap();
    assert_eq!((ext[0].length, ext[0].hole), (4096, false));
}

/// A power cut tears writes only in its torn mode: in the others a pending write is kept
/// or dropped whole. Over many seeds every mode occurs.
#[test]
fn only_a_torn_cut_tears() {
    let mut torn_seen = false;
    for seed in 0..60 {
        let (_s, d) = disk(None);
        for i in 0..4 {
            write(&d, 1, i * 8192, 1 + i as u8, 4096, false);
        }
        let r = d.power_cut(Some(seed)).unwrap();
        if r.mode == crate::log::CutMode::Torn {
            torn_seen |= r.torn > 0;
        } else {
            assert_eq!(r.torn, 0, "seed {seed}: {r:?}");
        }
    }
    assert!(torn_seen, "no seed tore a write");
}

/// The power-cut record agrees with the cut's report: one fate per pending write, by its
/// record's sequence number, with the landed pieces for a torn write and none otherwise; the
/// report names the record.
#[test]
fn the_power_cut_record_matches_the_report() {
    let dir = tempfile::tempdir().unwrap();
    let mut torn_seen = false;
    for seed in 0..40 {
        let path = dir.path().join(format!("{seed}.log"));
        let (storage, d) = disk(Some(path.clone()));
        for i in 0..4 {
            write(&d, 1, i * 8192, 1 + i as u8, 4096, false);
        }
        let r = d.power_cut(Some(seed)).unwrap();
        drop(d);
        let recs = log_records(&path);
        let last = recs.last().unwrap();
        assert_eq!(
            (last.kind, r.log_seq),
            (RecordKind::PowerCut, Some(last.seq()))
        );
        let p: PowerCutPayload = payload_of(&path, last);
        let seqs: Vec<u64> = p.fates.iter().map(|f| f.seq).collect();
        assert_eq!(seqs, [0, 1, 2, 3], "seed {seed}");
        let img = storage.snapshot();
        for (i, f) in p.fates.iter().enumerate() {
            let torn = f.fate == Fate::Torn;
            torn_seen |= torn;
            assert_eq!(!f.pieces.is_empty(), torn, "seed {seed}: {f:?}");
            // What landed on storage is exactly what the record says.
            let start = i * 8192;
            for (at, &b) in img[start..start + 4096].iter().enumerate() {
                let off = (start + at) as u64;
                let landed = match f.fate {
                    Fate::Kept => true,
                    Fate::Torn => f.pieces.iter().any(|&(o, l)| (o..o + l).contains(&off)),
                    _ => false,
                };
                let want = if landed { 1 + i as u8 } else { 0 };
                assert_eq!(b, want, "seed {seed}: byte {off} of {f:?}");
            }
        }
        let count = |fate| p.fates.iter().filter(|f| f.fate == fate).count();
        assert_eq!(
            (count(Fate::Kept), count(Fate::Torn), count(Fate::Dropped)),
            (r.kept, r.torn, r.dropped),
            "seed {seed}"
        );
    }
    assert!(torn_seen, "no seed tore a write");
}

/// The idle write-back writes the cache back only when nothing changed since it last looked
/// (so a busy disk keeps its cache), and then all of it.
#[test]
fn idle_write_back_waits_for_a_quiet_look_then_writes_everything() {
    let (storage, d) = disk(None);
    d.write_back_if_idle().unwrap();
    write(&d, 1, 0, 5, 4096, false);
    write(&d, 1, 8192, 6, 512, false);
    d.write_back_if_idle().unwrap();
    assert_eq!(storage.snapshot()[0], 0, "written back while changing");
    d.write_back_if_idle().unwrap();
    let img = storage.snapshot();
    assert_eq!((img[0], img[4095], img[8192], img[8703]), (5, 5, 6, 6));
    assert_eq!(d.stats().cache_entries, 0);
}

/// At shutdown every cached write goes to storage; when storage refuses, the error names
/// the ranges still cached (what a user would lose), and they stay cached for a retry; when
/// only the final flush fails, it is a storage error.
#[test]
fn writing_back_everything_names_what_storage_refused() {
    let storage = Arc::new(CallLog::new());
    let d = EmulatedDisk::new(storage.clone(), DiskConfig::default()).unwrap();
    write(&d, 1, 0, 1, 4096, false);
    write(&d, 1, 8192, 2, 512, false);
    assert_eq!(d.unwritten(), [(0, 4096), (8192, 512)]);
    storage.fail(true);
    match d.write_back_everything() {
        Err(DiskError::Unwritten(r)) => assert_eq!(r, [(0, 4096), (8192, 512)]),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.unwritten(), [(0, 4096), (8192, 512)], "kept for a retry");
    storage.fail(false);
    d.write_back_everything().unwrap();
    assert_eq!(d.unwritten(), []);
    assert_eq!(storage.inner.snapshot()[8192], 2);
    write(&d, 1, 0, 3, 512, false);
    storage.fail(true);
    let _ = d.write_back_everything();
    storage.fail(false);
    d.write_back_everything().unwrap();
    storage.fail(true);
    match d.write_back_everything() {
        Err(DiskError::Storage(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
        other => panic!("only the flush failed: {other:?}"),
    }
}

/// With `idle_writeback_ms`, a thread writes the cache back once the disk has been quiet
/// that long; without it, the cache stays as it is.
#[test]
fn the_idle_write_back_thread_runs_only_when_configured() {
    for idle in [Some(20), None] {
        let storage = Arc::new(VecStorage::new(SIZE).unwrap());
        let config = DiskConfig {
            idle_writeback_ms: idle,
            ..DiskConfig::default()
        };
        let d = Arc::new(EmulatedDisk::new(storage.clone(), config).unwrap());
        d.start_idle_writeback();
        write(&d, 1, 0, 9, 4096, false);
        // Configured: within 10 s (20 ms of quiet, then the thread's poll); else: not in 0.5 s.
        let wait = std::time::Duration::from_millis(if idle.is_some() { 10_000 } else { 500 });
        let deadline = std::time::Instant::now() + wait;
        while d.stats().cache_entries > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let written = storage.snapshot()[0] == 9;
        assert_eq!(written, idle.is_some(), "idle write-back {idle:?}");
    }
}

/// A written-back write's buffer is handed out again for a later write's payload (a fresh
/// large allocation costs a page fault per 4 KiB), when it is large enough for it.
#[test]
fn a_written_back_buffer_is_reused_for_the_next_write() {
    let (storage, d) = disk(None);
    let mut data = d.write_buffer(0, 65536);
    let Some(crate::backend::Form::Bytes(v)) = data.form_mut() else {
        panic!("memory storage takes bytes");
    };
    v.resize(65536, 7);
    let first = v.as_ptr();
    let t = arrive(&d, 1, RequestKind::Write, 0, 65536, false);
    d.write(Some(t), 0, data, false).unwrap();
    d.reply_sent(t);
    flush(&d, 1);
    assert_eq!(storage.snapshot()[65535], 7);
    let mut again = d.write_buffer(0, 4096);
    let Some(crate::backend::Form::Bytes(v)) = again.form_mut() else {
        panic!("memory storage takes bytes");
    };
    assert_eq!(
        (v.as_ptr(), v.len()),
        (first, 0),
        "the written-back buffer, emptied"
    );
    // A spare too small for the payload is not handed out.
    drop(again);
    let t = arrive(&d, 1, RequestKind::Write, 0, 65536, false);
    d.write(Some(t), 0, WriteData::bytes(vec![1; 65536]), false)
        .unwrap_or_else(|_| panic!("write"));
    d.reply_sent(t);
    flush(&d, 1);
    let mut large = d.write_buffer(0, 1 << 17);
    let Some(crate::backend::Form::Bytes(v)) = large.form_mut() else {
        panic!("memory storage takes bytes");
    };
    assert!(
        v.capacity() >= 1 << 17,
        "a buffer of {} bytes",
        v.capacity()
    );
}

/// The server's log lines of `f`, captured.
fn logged(f: impl FnOnce()) -> String {
    let buf = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || Captured(sink.clone()))
        .finish();
    tracing::subscriber::with_default(subscriber, f);
    let bytes = buf.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A write-back that storage keeps refusing is logged once with its range, not at every
/// retry (a flush a second would flood the log), and its eventual success says after how
/// many failed attempts.
#[test]
fn a_failing_write_back_is_logged_once_and_its_recovery_counted() {
    let storage = Arc::new(CallLog::new());
    let d = EmulatedDisk::new(storage.clone(), DiskConfig::default()).unwrap();
    let log = logged(|| {
        write(&d, 1, 0, 9, 512, false);
        flush(&d, 1);
        write(&d, 1, 4096, 1, 512, false);
        storage.fail(true);
        for _ in 0..3 {
            let t = arrive(&d, 1, RequestKind::Flush, 0, 0, false);
            assert!(d.flush(Some(t)).is_err());
            d.reply_sent(t);
        }
        storage.fail(false);
        flush(&d, 1);
    });
    let failed = "write-back of bytes 4096..4608 (512 bytes) failed";
    assert_eq!(log.matches(failed).count(), 1, "{log}");
    assert_eq!(log.matches("write-back of bytes").count(), 1, "{log}");
    assert!(
        log.contains("bytes 4096..4608 written back after 3 failed attempts"),
        "{log}"
    );
    assert_eq!(log.matches("written back after").count(), 1, "{log}");
    assert_eq!(storage.inner.snapshot()[4096], 1);
}

/// Added latency sleeps in the IO methods, so such a disk runs them off the async workers
/// (else it runs as its storage does).
#[test]
fn a_disk_with_latency_blocks_off_the_async_workers() {
    // Memory storage runs inline; only the added latency moves the disk off the workers.
    let storage: Arc<dyn Backend> = Arc::new(crate::backend::MemoryBackend::new(SIZE));
    let mut config = DiskConfig::default();
    assert!(!matches!(
        EmulatedDisk::new(storage.clone(), config.clone())
            .unwrap()
            .io_style(),
        crate::backend::IoStyle::Blocking
    ));
    // Latency needs both a duration and a rate.
    for (us, rate, blocking) in [(100, 0.5, true), (100, 0.0, false), (0, 0.5, false)] {
        config.faults.latency_us = us;
        config.faults.latency_rate = rate;
        let style = EmulatedDisk::new(storage.clone(), config.clone())
            .unwrap()
            .io_style();
        let is_blocking = matches!(style, crate::backend::IoStyle::Blocking);
        assert_eq!(is_blocking, blocking, "latency {us} us at {rate}");
    }
}

/// FLUSH and BLOCK_STATUS check their ticket as every request does: an injected EIO fails
/// the flush (which then makes nothing durable), a ticket from before a power cut fails, and
/// added latency delays them, as it delays reads and writes.
#[test]
fn flush_and_block_status_check_their_tickets() {
    let faults = FaultConfig {
        eio_flush: 1.0,
        ..FaultConfig::default()
    };
    let storage = Arc::new(VecStorage::new(SIZE).unwrap());
    let config = DiskConfig {
        faults,
        ..DiskConfig::default()
    };
    let d = EmulatedDisk::new(storage.clone(), config).unwrap();
    write(&d, 1, 0, 5, 512, false);
    let t = arrive(&d, 1, RequestKind::Flush, 0, 0, false);
    let e = d.flush(Some(t)).unwrap_err();
    d.reply_sent(t);
    assert_eq!(crate::reply::errno_of(&e), crate::proto::NBD_EIO);
    assert_eq!(
        storage.snapshot()[0],
        0,
        "a failed flush made a write durable"
    );
    let t = arrive(&d, 1, RequestKind::BlockStatus, 0, 512, false);
    d.power_cut(Some(1)).unwrap();
    assert!(
        d.block_status(Some(t), 0, 512).is_err(),
        "a ticket from before the cut"
    );
    let faults = FaultConfig {
        latency_us: 30_000,
        latency_rate: 1.0,
        ..FaultConfig::default()
    };
    let config = DiskConfig {
        faults,
        ..DiskConfig::default()
    };
    let d = EmulatedDisk::new(Arc::new(VecStorage::new(SIZE).unwrap()), config).unwrap();
    let kinds = [
        RequestKind::Flush,
        RequestKind::BlockStatus,
        RequestKind::Write,
        RequestKind::Read,
    ];
    for kind in kinds {
        let t = arrive(&d, 1, kind, 0, 512, false);
        let start = std::time::Instant::now();
        match kind {
            RequestKind::Flush => d.flush(Some(t)).unwrap(),
            RequestKind::Write => d.write(Some(t), 0, vec![1; 512].into(), false).unwrap(),
            RequestKind::Read => d.read(Some(t), 0, &mut [0; 512]).unwrap(),
            _ => drop(d.block_status(Some(t), 0, 512).unwrap()),
        }
        d.reply_sent(t);
        let waited = start.elapsed();
        assert!(
            waited >= std::time::Duration::from_millis(30),
            "{kind:?}: {waited:?}"
        );
    }
}

/// The disk advertises its storage's size and TRIM support, and fast zeroing always (a zero
/// range is only a cache entry); a cached TRIM reaches storage as a trim where storage can
/// trim, else as zeroes.
#[test]
fn the_disk_advertises_its_storage_and_writes_back_trims_as_it_can() {
    for can_trim in [true, false] {
        let storage = Arc::new(CallLog {
            can_trim,
            ..CallLog::new()
        });
        let d = EmulatedDisk::new(storage.clone(), DiskConfig::default()).unwrap();
        let advertised = (d.size(), d.can_trim(), d.can_fast_zero(), d.lends_memory());
        assert_eq!(advertised, (SIZE, can_trim, true, false));
        let t = arrive(&d, 1, RequestKind::Trim, 4096, 4096, false);
        d.trim(Some(t), 4096, 4096, false).unwrap();
        d.reply_sent(t);
        flush(&d, 1);
        let how = if can_trim { "trim" } else { "zero" };
        assert_eq!(
            storage.take(),
            [format!("{how} 4096+4096 fua=false"), "flush".into()]
        );
    }
}

/// `crash-after-writes=N`: the N-th write is applied and the power cut at once; that write is
/// refused (its client never learns whether it landed), the cut uses the crash seed, and the
/// generation the connections watch moves.
#[test]
fn the_automatic_cut_refuses_its_write_and_moves_the_generation() {
    let config = DiskConfig {
        crash_after_writes: Some(2),
        crash_seed: Some(7),
        ..DiskConfig::default()
    };
    let d = EmulatedDisk::new(Arc::new(VecStorage::new(SIZE).unwrap()), config).unwrap();
    write(&d, 1, 0, 1, 512, false);
    let t = arrive(&d, 1, RequestKind::Write, 512, 512, false);
    let refused = d.write(Some(t), 512, vec![2; 512].into(), false);
    assert!(refused.is_err(), "the cut's write was answered OK");
    assert_eq!(d.stats().power_cuts, 1);
    assert_eq!(*d.power_cuts().borrow(), 1);
    assert_eq!(d.last_power_cut_seed(), Some(7));
}

/// Fault rates must be probabilities.
#[test]
fn fault_rates_outside_0_to_1_are_refused() {
    let mut f = FaultConfig::default();
    assert!(f.validate().is_ok());
    f.eio_flush = 1.5;
    assert!(f.validate().unwrap_err().contains("eio-flush"));
    f.eio_flush = -0.1;
    assert!(f.validate().is_err());
}

/// A log read to its end says how it ended (complete, not torn), and a payload can be read
/// from any position inside it.
#[test]
fn a_complete_log_ends_complete_and_payloads_read_from_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let (_s, d) = disk(Some(path.clone()));
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    let t = arrive(&d, 1, RequestKind::Write, 0, 4096, false);
    d.write(Some(t), 0, WriteData::copy_of(&data), false)
        .unwrap();
    d.reply_sent(t);
    flush(&d, 1);
    drop(d);
    let mut r = LogReader::open(&path).unwrap();
    let recs: Vec<_> = r.by_ref().map(|x| x.unwrap()).collect();
    assert_eq!(r.ending(), crate::log::LogEnding::Complete);
    let mut buf = [0u8; 100];
    r.read_payload_at(&recs[0], 1000, &mut buf).unwrap();
    assert_eq!(buf[..], data[1000..1100]);
}

/// More records than the recorder's queue holds, with no flush: the recorder thread drains
/// the queue as it fills (back-pressure waits for it, not for a flush), and every record
/// reaches the log.
#[test]
fn the_recorder_drains_a_full_queue_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.log");
    let (_s, d) = disk(Some(path.clone()));
    let writes = crate::disk::recorder::RECORDER_QUEUE_RECORDS_MAX + 500;
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        for i in 0..writes {
            write(&d, 1, (i as u64 % 128) * 512, i as u8, 512, false);
        }
        drop(d);
        let _ = tx.send(());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the writes finish: the queue is drained while full");
    writer.join().unwrap();
    let n = LogReader::open(&path)
        .unwrap()
        .filter(|r| r.as_ref().unwrap().kind == RecordKind::Write)
        .count();
    assert_eq!(n, writes);
}
