//! The write log's failure paths, driven by a log writer that fails on demand. A FLUSH or a
//! FUA write is answered OK only when the log holds its records: crash states are built from
//! the log, so a flush the log lacks would let them lose writes the client was told were
//! durable. Every test ends by checking that the log holds a flush record for every flush
//! answered OK.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::backend::{Arrival, Backend, RequestKind, WriteData};
use crate::disk::{
    DiskConfig, EmulatedDisk, LogSink, Recorder, VecStorage, RECORD_MAX_SLACK_BYTES,
};
use crate::log::{LogError, LogReader, LogWriter, RecordHead, RecordKind, RECORD_HEADER_BYTES};
use crate::proto::{NBD_EIO, NBD_ENOSPC};
use crate::reply::errno_of;

const SIZE: u64 = 64 * 1024;

/// The record kind whose next record fails; `None` fails nothing.
type FailNext = Arc<Mutex<Option<RecordKind>>>;

/// A log writer that fails on demand: records go to a real log file until the first record
/// of the kind [`FailNext`] names, which fails with an IO error, as does everything after it
/// (a log file that failed once is not trusted again).
struct FailingLog {
    file: LogWriter,
    fail_next: FailNext,
    failed: bool,
}

impl FailingLog {
    fn error() -> LogError {
        LogError::Io(io::Error::other("injected write-log failure"))
    }
}

impl LogSink for FailingLog {
    fn append_parts(&mut self, head: &RecordHead, parts: &[&[u8]]) -> Result<u64, LogError> {
        if *self.fail_next.lock().unwrap() == Some(head.kind) {
            self.failed = true;
        }
        if self.failed {
            return Err(Self::error());
        }
        self.file.append_parts(head, parts)
    }
    fn flush(&mut self) -> Result<(), LogError> {
        match self.failed {
            true => Err(Self::error()),
            false => self.file.flush(),
        }
    }
    fn sync(&mut self) -> Result<(), LogError> {
        match self.failed {
            true => Err(Self::error()),
            false => self.file.sync(),
        }
    }
}

/// A recording disk whose log fails on demand, the log's path, and the switch.
fn disk_with_failing_log(dir: &Path, config: DiskConfig) -> (EmulatedDisk, PathBuf, FailNext) {
    let path = dir.join("d.log");
    let fail_next = FailNext::default();
    let log = FailingLog {
        file: LogWriter::create_new(&path, SIZE).unwrap(),
        fail_next: fail_next.clone(),
        failed: false,
    };
    let recorder = Recorder::start(Box::new(log)).unwrap();
    let storage = Arc::new(VecStorage::new(SIZE).unwrap());
    let d = EmulatedDisk::with_recorder(storage, config, Some(recorder), "failing-log");
    (d, path, fail_next)
}

fn arrival(kind: RequestKind, offset: u64, length: u64, fua: bool) -> Arrival {
    Arrival {
        conn: 1,
        kind,
        offset,
        length,
        fua,
    }
}

/// A write start to finish; the NBD error it is answered with (0: OK).
fn write(d: &EmulatedDisk, offset: u64, byte: u8, fua: bool) -> u32 {
    let t = d
        .arrived(&arrival(RequestKind::Write, offset, 4096, fua))
        .expect("a write gets a ticket");
    let r = d.write(Some(t), offset, WriteData::bytes(vec![byte; 4096]), fua);
    d.reply_sent(t);
    r.map_or_else(|f| errno_of(&f.error), |()| 0)
}

/// A flush start to finish; the NBD error it is answered with (0: OK).
fn flush(d: &EmulatedDisk) -> u32 {
    let t = d
        .arrived(&arrival(RequestKind::Flush, 0, 0, false))
        .expect("a flush gets a ticket");
    let r = d.flush(Some(t));
    d.reply_sent(t);
    r.map_or_else(|e| errno_of(&e), |()| 0)
}

/// The kinds of the records in the log at `path`.
fn kinds(path: &Path) -> Vec<RecordKind> {
    LogReader::open(path)
        .unwrap()
        .map(|r| r.unwrap().kind)
        .collect()
}

fn flush_records(path: &Path) -> usize {
    kinds(path)
        .iter()
        .filter(|&&k| k == RecordKind::Flush)
        .count()
}

/// Guards against a write whose record never reached the log being made durable by a flush
/// answered OK. The write's own reply does not wait for the log (only FLUSH and FUA replies
/// do), so the next flush is the one that must fail; every change after it is refused.
#[test]
fn a_write_whose_record_fails_fails_the_next_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (d, path, fail_next) = disk_with_failing_log(dir.path(), DiskConfig::default());
    assert_eq!(write(&d, 0, 1, false), 0);
    assert_eq!(flush(&d), 0);
    *fail_next.lock().unwrap() = Some(RecordKind::Write);
    assert_eq!(
        write(&d, 4096, 2, false),
        0,
        "its reply does not wait for the log"
    );
    assert_eq!(
        flush(&d),
        NBD_EIO,
        "the flush would cover an unrecorded write"
    );
    assert_eq!(
        write(&d, 8192, 3, false),
        NBD_EIO,
        "a failed log takes no change"
    );
    assert_eq!(flush(&d), NBD_EIO);
    drop(d);
    assert_eq!(
        kinds(&path),
        [RecordKind::Write, RecordKind::Flush],
        "the log ends where it failed"
    );
}

/// Guards against a FLUSH answered OK when its own record did not reach the log.
#[test]
fn a_flush_whose_record_fails_is_answered_eio() {
    let dir = tempfile::tempdir().unwrap();
    let (d, path, fail_next) = disk_with_failing_log(dir.path(), DiskConfig::default());
    assert_eq!(write(&d, 0, 1, false), 0);
    *fail_next.lock().unwrap() = Some(RecordKind::Flush);
    assert_eq!(flush(&d), NBD_EIO);
    assert_eq!(flush(&d), NBD_EIO, "nor any flush after it");
    assert_eq!(write(&d, 4096, 2, false), NBD_EIO, "nor any change");
    drop(d);
    assert_eq!(kinds(&path), [RecordKind::Write]);
}

/// Guards against a FUA write answered OK when its record did not reach the log.
#[test]
fn a_fua_write_whose_record_fails_is_answered_eio() {
    let dir = tempfile::tempdir().unwrap();
    let (d, path, fail_next) = disk_with_failing_log(dir.path(), DiskConfig::default());
    assert_eq!(write(&d, 0, 1, true), 0);
    *fail_next.lock().unwrap() = Some(RecordKind::Write);
    assert_eq!(write(&d, 4096, 2, true), NBD_EIO);
    assert_eq!(flush(&d), NBD_EIO, "a flush after a failed log");
    drop(d);
    assert_eq!(kinds(&path), [RecordKind::Write]);
}

/// Guards against a flush answered OK when the log refused its record at arrival: a capped
/// log (`record-max`) takes flush records [`RECORD_MAX_SLACK_BYTES`] past its cap and no
/// further, and the first flush past that was answered OK with no record (its refusal was
/// dropped). Flushes are answered OK exactly as long as the log holds their records.
#[test]
fn a_flush_past_a_capped_logs_slack_is_refused() {
    // Exactly room for four 4 KiB writes and the full record, so the boundary is met; and one
    // byte short of room for a fifth, so the full record's room is what refuses it.
    let record = (RECORD_HEADER_BYTES + 4096) as u64;
    let full = (RECORD_HEADER_BYTES + crate::log::FULL_PAYLOAD_BYTES) as u64;
    let exact = crate::log::FILE_HEADER_BYTES as u64 + 4 * record + full;
    for cap in [exact, exact + record - 1] {
        capped_log_refuses_flushes_past_its_slack(cap);
    }
}

fn capped_log_refuses_flushes_past_its_slack(cap: u64) {
    let dir = tempfile::tempdir().unwrap();
    let config = DiskConfig {
        record_max_bytes: Some(cap),
        ..DiskConfig::default()
    };
    let (d, path, _) = disk_with_failing_log(dir.path(), config);
    let mut i = 0;
    while write(&d, i * 4096 % SIZE, i as u8, false) == 0 {
        i += 1;
    }
    assert_eq!(write(&d, 0, 0, false), NBD_ENOSPC, "the log is capped");
    // Data records fill the cap less the room of the full record, and no further.
    assert_eq!(i, 4, "writes taken under a cap of {cap} bytes");
    assert_eq!(write(&d, 0, 0, false), NBD_ENOSPC, "still capped");
    // Each flush record is more than a header, so this many flushes pass the slack.
    let flushes_max = RECORD_MAX_SLACK_BYTES / RECORD_HEADER_BYTES as u64;
    let mut answered_ok = 0;
    let refused = loop {
        assert!(answered_ok < flushes_max, "no flush refused past the slack");
        match flush(&d) {
            0 => answered_ok += 1,
            e => break e,
        }
    };
    assert_eq!(refused, NBD_ENOSPC, "the log's refusal: it reached its cap");
    assert!(answered_ok > 1000, "flushes past the cap use the slack");
    drop(d);
    assert_eq!(flush_records(&path), answered_ok as usize);
    // One full record, right after the last write: the log says where it was capped.
    let k = kinds(&path);
    let full: Vec<usize> = (0..k.len()).filter(|&j| k[j] == RecordKind::Full).collect();
    assert_eq!(full, [i as usize], "{k:?}");
}

/// `ctl sync` (and the server's exit) reports a log that failed: a user who syncs the log to
/// take it away must learn that it lacks records.
#[test]
fn syncing_a_failed_log_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (d, _path, fail_next) = disk_with_failing_log(dir.path(), DiskConfig::default());
    assert_eq!(write(&d, 0, 1, false), 0);
    d.sync_log().expect("a healthy log syncs");
    *fail_next.lock().unwrap() = Some(RecordKind::Write);
    assert_eq!(write(&d, 4096, 2, false), 0);
    let e = d.sync_log().expect_err("the log lost a record");
    assert!(e.to_string().contains("injected write-log failure"), "{e}");
}
