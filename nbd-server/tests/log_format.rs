//! The write-log format: round trips, torn tails, corruption, and agreement with
//! `docs/write-log.md`.

use std::io::Write;
use std::path::Path;

use nbd_server::log::*;

fn sample_log(path: &Path) -> Vec<u64> {
    let mut w = LogWriter::create(path, 1 << 20).unwrap();
    let mut file_ends = vec![];
    w.append(RecordKind::Write, 0, 1, 0, 4, b"abcd").unwrap();
    w.append(
        RecordKind::Flush,
        0,
        1,
        0,
        0,
        &encode_payload(&FlushPayload::default()),
    )
    .unwrap();
    w.append(RecordKind::Mark, 0, 0, 0, 0, b"m1").unwrap();
    w.append(RecordKind::Trim, FLAG_FUA, 2, 4096, 8192, &[])
        .unwrap();
    w.append(RecordKind::Write, FLAG_FUA, 2, 512, 1000, &[7u8; 1000])
        .unwrap();
    w.flush().unwrap();
    drop(w);
    let mut end = FILE_HEADER_BYTES as u64;
    for len in [4u64, 8, 2, 0, 1000] {
        end += RECORD_HEADER_BYTES as u64 + len;
        file_ends.push(end);
    }
    file_ends
}

fn read_all(path: &Path) -> Result<Vec<Record>, LogError> {
    LogReader::open(path)?.collect()
}

#[test]
fn records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.log");
    sample_log(&p);
    let recs = read_all(&p).unwrap();
    let kinds: Vec<_> = recs.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![
            RecordKind::Write,
            RecordKind::Flush,
            RecordKind::Mark,
            RecordKind::Trim,
            RecordKind::Write
        ]
    );
    let r = LogReader::open(&p).unwrap();
    assert_eq!(r.read_payload(&recs[0]).unwrap(), b"abcd");
    assert_eq!(recs[4].header.offset, 512);
    assert!(recs[4].header.fua());
    assert_eq!(r.read_payload(&recs[4]).unwrap(), vec![7u8; 1000]);
    assert_eq!(r.disk_bytes(), 1 << 20);
}

/// Guards against a reader that misreads a half-written last record: truncated at every byte
/// offset inside the last record, the log reads back as exactly the records before it.
#[test]
fn torn_tail_at_every_byte_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.log");
    let ends = sample_log(&p);
    let full = std::fs::read(&p).unwrap();
    let all = read_all(&p).unwrap();
    let last_start = ends[ends.len() - 2] as usize;
    let t = dir.path().join("t.log");
    for cut in last_start..full.len() {
        std::fs::write(&t, &full[..cut]).unwrap();
        let mut reader = LogReader::open(&t).unwrap();
        let recs: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(recs, all[..all.len() - 1], "cut at {cut}");
        assert_eq!(reader.torn_tail_bytes(), (cut - last_start) as u64);
        // The same cut followed by zeroes (space allocated, never written) is torn too.
        let mut z = full[..cut].to_vec();
        z.resize(full.len() + 100, 0);
        std::fs::write(&t, &z).unwrap();
        let recs: Vec<Record> = LogReader::open(&t)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(recs, all[..all.len() - 1], "cut at {cut} + zeroes");
    }
}

/// Damage before the tail is an error naming the offset, never silently skipped.
#[test]
fn corrupt_record_before_the_tail_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.log");
    let ends = sample_log(&p);
    let mut bytes = std::fs::read(&p).unwrap();
    // Flip a payload byte of the first record.
    bytes[FILE_HEADER_BYTES + RECORD_HEADER_BYTES + 1] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let err = read_all(&p).unwrap_err();
    assert!(matches!(err, LogError::Corrupt { offset: 32, .. }), "{err}");
    // Flip a header byte of the second record.
    sample_log(&p);
    let mut bytes = std::fs::read(&p).unwrap();
    bytes[ends[0] as usize + 10] ^= 1;
    std::fs::write(&p, &bytes).unwrap();
    assert!(matches!(
        read_all(&p).unwrap_err(),
        LogError::Corrupt { .. }
    ));
}

#[test]
fn bad_file_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.log");
    std::fs::File::create(&p)
        .unwrap()
        .write_all(&[0u8; 64])
        .unwrap();
    assert!(matches!(
        LogReader::open(&p).err().unwrap(),
        LogError::BadMagic(_)
    ));
    std::fs::write(&p, b"short").unwrap();
    assert!(LogReader::open(&p).is_err());
}

/// Pulls the hex dump in the fenced block after `marker` out of the markdown.
fn hex_after(doc: &str, marker: &str) -> Vec<u8> {
    let at = doc
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} not in the document"));
    let rest = &doc[at..];
    let start = rest.find("```").unwrap() + 3;
    let body = &rest[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let end = body.find("```").unwrap();
    let mut out = Vec::new();
    for line in body[..end].lines() {
        let line = line.split('|').next().unwrap(); // text after '|' is commentary
        for tok in line.split_whitespace() {
            if tok.ends_with(':') {
                continue; // offset column
            }
            out.push(u8::from_str_radix(tok, 16).unwrap_or_else(|_| panic!("bad hex {tok:?}")));
        }
    }
    out
}

/// `docs/write-log.md` and the code agree: the document's example bytes decode as it says.
#[test]
fn document_example_decodes_as_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/write-log.md"))
        .unwrap();
    let bytes = hex_after(&doc, "<!-- example-log -->");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("doc.log");
    std::fs::write(&p, &bytes).unwrap();
    let r = LogReader::open(&p).unwrap();
    assert_eq!(r.disk_bytes(), 1048576);
    assert_eq!(r.file_header().flags, FILE_FLAG_NO_POWER_CUTS);
    let recs: Vec<Record> = LogReader::open(&p)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(recs.len(), 2);
    let w = recs[0].header;
    assert_eq!(
        (recs[0].kind, w.seq, w.conn, w.offset, w.length, w.fua()),
        (RecordKind::Write, 0, 1, 4096, 8, true)
    );
    assert_eq!(r.read_payload(&recs[0]).unwrap(), b"ABCDEFGH");
    assert_eq!(recs[1].kind, RecordKind::Mark);
    assert_eq!(r.read_payload(&recs[1]).unwrap(), b"fsync-a");
    // And the code writes exactly these bytes.
    let q = dir.path().join("code.log");
    let mut w = LogWriter::create(&q, 1048576).unwrap();
    w.append(RecordKind::Write, FLAG_FUA, 1, 4096, 8, b"ABCDEFGH")
        .unwrap();
    w.append(RecordKind::Mark, 0, 0, 0, 0, b"fsync-a").unwrap();
    drop(w);
    let code = std::fs::read(&q).unwrap();
    if code != bytes {
        for (i, chunk) in code.chunks(16).enumerate() {
            eprintln!(
                "{:04x}: {}",
                i * 16,
                chunk
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        panic!("document example differs from what the code writes (dump above)");
    }
}

/// The writer sets the file header's `no-power-cuts` bit when it closes a log without a
/// power-cut record, and only then: a log with one, and a log whose writer never closed
/// it, keep 0.
#[test]
fn the_no_power_cuts_flag_is_set_only_by_a_writer_that_closed_a_log_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let flags = |name: &str, cut: bool, close: bool| {
        let p = dir.path().join(name);
        let mut w = LogWriter::create(&p, 1048576).unwrap();
        w.append(RecordKind::Write, 0, 1, 0, 4, b"abcd").unwrap();
        if cut {
            w.append(RecordKind::PowerCut, 0, 0, 0, 0, b"").unwrap();
        }
        w.append(RecordKind::Mark, 0, 0, 0, 0, b"m").unwrap();
        if close {
            drop(w);
        } else {
            w.flush().unwrap();
            std::mem::forget(w); // a writer killed before it closed the log
        }
        LogReader::open(&p).unwrap().file_header().flags
    };
    assert_eq!(flags("closed.log", false, true), FILE_FLAG_NO_POWER_CUTS);
    assert_eq!(flags("cut.log", true, true), 0);
    assert_eq!(flags("killed.log", false, false), 0);
}

/// The header fields of a record built by hand, any of them inconsistent on purpose.
#[derive(Clone, Copy)]
struct Raw {
    kind: u8,
    flags: u8,
    seq: u64,
    offset: u64,
    length: u64,
    /// `None`: the payload's true length.
    payload_len: Option<u32>,
}

impl Raw {
    fn new(kind: RecordKind, seq: u64, offset: u64, length: u64) -> Raw {
        Raw {
            kind: kind as u8,
            flags: 0,
            seq,
            offset,
            length,
            payload_len: None,
        }
    }
}

/// A record's bytes laid out from `docs/write-log.md`, not with the code's encoder: magic
/// "WREC", kind, flags, reserved, then seq, conn, offset, length (u64), payload length (u32),
/// crc32c of bytes 0..44 and the payload, crc32c of bytes 0..48, all little-endian.
fn raw_record(r: Raw, payload: &[u8]) -> Vec<u8> {
    let mut h = b"WREC".to_vec();
    h.extend([r.kind, r.flags, 0, 0]);
    for v in [r.seq, 7, r.offset, r.length] {
        h.extend(v.to_le_bytes());
    }
    h.extend(r.payload_len.unwrap_or(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..44]), payload);
    h.extend(crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&h[..48]);
    h.extend(header_crc.to_le_bytes());
    assert_eq!(h.len(), RECORD_HEADER_BYTES);
    h.extend(payload);
    h
}

const HAND_DISK_BYTES: u64 = 1 << 20;

/// A log file of a 1 MiB disk holding `records` (raw bytes each), written to `path`.
fn hand_log(path: &Path, records: &[Vec<u8>]) {
    let mut bytes = FileHeader::new(HAND_DISK_BYTES).encode().to_vec();
    for r in records {
        bytes.extend(r);
    }
    std::fs::write(path, bytes).unwrap();
}

/// A good first record: a 4-byte write, so a bad second record sits at byte 32 + 52 + 4.
fn good_write() -> Vec<u8> {
    raw_record(Raw::new(RecordKind::Write, 0, 0, 4), b"abcd")
}
const SECOND_RECORD_AT: u64 = (FILE_HEADER_BYTES + RECORD_HEADER_BYTES + 4) as u64;

fn full_payload(reason: FullReason, log_bytes: u64) -> Vec<u8> {
    encode_payload(&FullPayload { reason, log_bytes })
}

/// A header whose checksums are right is trusted, so anything in it inconsistent with the log
/// is damage: each case is refused with an error naming the record's offset and what is wrong.
#[test]
fn every_inconsistent_trusted_header_is_an_error_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.log");
    let disk = HAND_DISK_BYTES;
    let over_limit = Raw {
        payload_len: Some(RECORD_PAYLOAD_BYTES_MAX + 1),
        ..Raw::new(RecordKind::Mark, 1, 0, 0)
    };
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "kind 9",
            vec![raw_record(
                Raw {
                    kind: 9,
                    ..Raw::new(RecordKind::Mark, 1, 0, 0)
                },
                b"",
            )],
            "unknown record kind 9",
        ),
        (
            "kind 0",
            vec![raw_record(
                Raw {
                    kind: 0,
                    ..Raw::new(RecordKind::Mark, 1, 0, 0)
                },
                b"",
            )],
            "unknown record kind 0",
        ),
        (
            "payload over the limit",
            vec![raw_record(over_limit, b"")],
            "exceeds the limit",
        ),
        (
            "write shorter than its length",
            vec![raw_record(Raw::new(RecordKind::Write, 1, 0, 8), b"abcd")],
            "differs from its length",
        ),
        (
            "write past the disk",
            vec![raw_record(
                Raw::new(RecordKind::Write, 1, disk - 2, 4),
                b"abcd",
            )],
            "reaches past the disk",
        ),
        (
            "trim past the disk",
            vec![raw_record(Raw::new(RecordKind::Trim, 1, disk, 1), b"")],
            "trim of 1 bytes",
        ),
        (
            "zeroes past the disk",
            vec![raw_record(
                Raw::new(RecordKind::WriteZeroes, 1, 512, disk),
                b"",
            )],
            "write-zeroes of",
        ),
        (
            "range overflowing u64",
            vec![raw_record(
                Raw::new(RecordKind::Trim, 1, u64::MAX - 1, 4),
                b"",
            )],
            "reaches past the disk",
        ),
        (
            "sequence out of turn",
            vec![raw_record(Raw::new(RecordKind::Mark, 5, 0, 0), b"m")],
            "sequence number 5, expected 1",
        ),
        (
            "sequence repeated",
            vec![raw_record(Raw::new(RecordKind::Mark, 0, 0, 0), b"m")],
            "sequence number 0, expected 1",
        ),
    ];
    for (name, records, what) in cases {
        let mut all = vec![good_write()];
        all.extend(records);
        hand_log(&p, &all);
        let err = read_all(&p).unwrap_err();
        let LogError::Corrupt { offset, what: said } = &err else {
            panic!("{name}: {err:?}");
        };
        assert_eq!(*offset, SECOND_RECORD_AT, "{name}: {err}");
        assert!(said.contains(what), "{name}: {said:?} should say {what:?}");
    }
    // A data record after a full record: the writer never puts one there.
    let full = raw_record(
        Raw::new(RecordKind::Full, 1, 0, 0),
        &full_payload(FullReason::Cap, 88),
    );
    let after = raw_record(Raw::new(RecordKind::Trim, 2, 0, 512), b"");
    hand_log(&p, &[good_write(), full.clone(), after]);
    let err = read_all(&p).unwrap_err();
    assert!(
        err.to_string()
            .contains("record 2: a trim after the log was full"),
        "{err}"
    );
    // A full record whose payload is not a full payload.
    let bad_full = raw_record(
        Raw::new(RecordKind::Full, 1, 0, 0),
        &[0u8; FULL_PAYLOAD_BYTES + 1],
    );
    hand_log(&p, &[good_write(), bad_full]);
    assert!(matches!(read_all(&p).unwrap_err(), LogError::Payload(_)));
}

/// The same checks at their edges let sound records through: a range ending exactly at the
/// disk's end, a header claiming exactly the largest payload (a torn tail when the file is
/// shorter), events after a full record, and the log's ending says which record was full.
#[test]
fn headers_at_the_edge_of_every_check_are_sound() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("edge.log");
    let disk = HAND_DISK_BYTES;
    let records = vec![
        good_write(),
        raw_record(Raw::new(RecordKind::Write, 1, disk - 4, 4), b"wxyz"),
        raw_record(Raw::new(RecordKind::Trim, 2, 0, disk), b""),
        raw_record(Raw::new(RecordKind::WriteZeroes, 3, disk - 512, 512), b""),
        raw_record(
            Raw::new(RecordKind::Full, 4, 0, 0),
            &full_payload(FullReason::LogDiskFull, 300),
        ),
        raw_record(
            Raw::new(RecordKind::Flush, 5, 0, 0),
            &encode_payload(&FlushPayload::default()),
        ),
        raw_record(Raw::new(RecordKind::Mark, 6, 0, 0), b"after-full"),
    ];
    hand_log(&p, &records);
    let mut reader = LogReader::open(&p).unwrap();
    let recs: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    let seqs: Vec<u64> = recs.iter().map(|r| r.seq()).collect();
    assert_eq!(seqs, (0..7).collect::<Vec<_>>());
    assert_eq!(reader.read_payload(&recs[1]).unwrap(), b"wxyz");
    assert_eq!(
        reader.ending(),
        LogEnding::Full {
            seq: 4,
            reason: FullReason::LogDiskFull,
            log_bytes: 300
        }
    );
    // Exactly the largest payload, the file cut short: a torn tail, not damage.
    let at_limit = Raw {
        payload_len: Some(RECORD_PAYLOAD_BYTES_MAX),
        ..Raw::new(RecordKind::Mark, 1, 0, 0)
    };
    let torn = raw_record(at_limit, b"");
    hand_log(&p, &[good_write(), torn]);
    let mut reader = LogReader::open(&p).unwrap();
    assert_eq!(reader.by_ref().count(), 1);
    assert_eq!(reader.torn_tail_bytes(), RECORD_HEADER_BYTES as u64);
    assert_eq!(
        reader.ending(),
        LogEnding::TornTail {
            bytes: RECORD_HEADER_BYTES as u64
        }
    );
}

/// Payloads are checksummed in 64 KiB chunks: damage in any chunk of a large payload is
/// found, a large one reads back whole, and a part of it reads back from where it was asked.
#[test]
fn large_payloads_are_checked_in_every_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("large.log");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let write = raw_record(
        Raw::new(RecordKind::Write, 1, 4096, data.len() as u64),
        &data,
    );
    let mark = raw_record(Raw::new(RecordKind::Mark, 2, 0, 0), b"m");
    hand_log(&p, &[good_write(), write.clone(), mark.clone()]);
    let reader = LogReader::open(&p).unwrap();
    let recs = read_all(&p).unwrap();
    assert_eq!(recs.len(), 3);
    assert_eq!(
        recs[1].payload_offset(),
        SECOND_RECORD_AT + RECORD_HEADER_BYTES as u64
    );
    assert_eq!(recs[1].payload_len(), data.len() as u64);
    assert_eq!(reader.read_payload(&recs[1]).unwrap(), data);
    let mut part = vec![0u8; 1000];
    reader
        .read_payload_at(&recs[1], 150_000, &mut part)
        .unwrap();
    assert_eq!(part, data[150_000..151_000]);
    for damaged in [10, 70_000, 140_000, 199_999] {
        let mut bad = write.clone();
        bad[RECORD_HEADER_BYTES + damaged] ^= 0x40;
        hand_log(&p, &[good_write(), bad, mark.clone()]);
        let err = read_all(&p).unwrap_err();
        assert!(
            matches!(&err, LogError::Corrupt { offset, what } if *offset == SECOND_RECORD_AT && what == "record checksum mismatch"),
            "byte {damaged}: {err}"
        );
    }
}

/// A damaged last record is a torn tail only when nothing but zeroes follows it, however far
/// the zeroes reach (past the 64 KiB the reader scans at a time); one byte that is not zero at
/// the very end makes it damage.
#[test]
fn a_torn_tail_is_zeroes_to_the_very_end() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tail.log");
    // (A damaged header with payload bytes after it is damage: at most a header's worth of
    // bytes may have been written before the cut.)
    let mut bad_header = raw_record(Raw::new(RecordKind::Mark, 1, 0, 0), b"");
    bad_header[20] ^= 1;
    let mut bad_payload = raw_record(Raw::new(RecordKind::Write, 1, 0, 4), b"wxyz");
    bad_payload[RECORD_HEADER_BYTES] ^= 1;
    for (name, last, what) in [
        ("header", bad_header, "record header checksum mismatch"),
        ("payload", bad_payload, "record checksum mismatch"),
    ] {
        let mut tail = last.clone();
        tail.resize(last.len() + 200_000, 0);
        hand_log(&p, &[good_write(), tail.clone()]);
        let mut reader = LogReader::open(&p).unwrap();
        assert_eq!(reader.by_ref().count(), 1, "{name}");
        assert_eq!(reader.torn_tail_bytes(), tail.len() as u64, "{name}");
        *tail.last_mut().unwrap() = 1;
        hand_log(&p, &[good_write(), tail]);
        let err = read_all(&p).unwrap_err();
        assert!(
            matches!(&err, LogError::Corrupt { offset, what: w } if *offset == SECOND_RECORD_AT && w == what),
            "{name}: {err}"
        );
    }
    // A record that says "WRED" with checksums that match it is not a record.
    let mut wrong_magic = raw_record(Raw::new(RecordKind::Mark, 1, 0, 0), b"m");
    wrong_magic[3] = b'D';
    let header_crc = crc32c::crc32c(&wrong_magic[..48]);
    wrong_magic[48..52].copy_from_slice(&header_crc.to_le_bytes());
    hand_log(&p, &[good_write(), wrong_magic]);
    assert!(read_all(&p)
        .unwrap_err()
        .to_string()
        .contains("record header checksum mismatch"));
}

/// A second pass after `rewind` reads the same records and forgets how the first pass ended:
/// a torn tail, and a full record (which would otherwise refuse the first write again).
#[test]
fn rewind_reads_the_same_records_again() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rewind.log");
    let full = raw_record(
        Raw::new(RecordKind::Full, 1, 0, 0),
        &full_payload(FullReason::Cap, 88),
    );
    let mut torn = raw_record(Raw::new(RecordKind::Mark, 2, 0, 0), b"cut");
    torn.truncate(30);
    hand_log(&p, &[good_write(), full, torn]);
    let mut reader = LogReader::open(&p).unwrap();
    let first: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(first.len(), 2);
    assert_eq!(reader.torn_tail_bytes(), 30);
    assert!(matches!(
        reader.ending(),
        LogEnding::Full {
            seq: 1,
            reason: FullReason::Cap,
            log_bytes: 88
        }
    ));
    reader.rewind().unwrap();
    assert_eq!(reader.torn_tail_bytes(), 0);
    assert_eq!(reader.ending(), LogEnding::Complete);
    let second: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(first, second);
    assert_eq!(reader.torn_tail_bytes(), 30);
    // Torn without a full record.
    let mut torn = raw_record(Raw::new(RecordKind::Mark, 1, 0, 0), b"cut");
    torn.truncate(RECORD_HEADER_BYTES - 1);
    hand_log(&p, &[good_write(), torn]);
    let mut reader = LogReader::open(&p).unwrap();
    assert_eq!(reader.by_ref().count(), 1);
    assert_eq!(
        reader.ending(),
        LogEnding::TornTail {
            bytes: RECORD_HEADER_BYTES as u64 - 1
        }
    );
    assert_eq!(
        reader.next().map(|r| r.is_ok()),
        None,
        "the reader stays at its end"
    );
}

/// A log may be just its file header; anything shorter is not a log.
#[test]
fn a_log_of_only_its_file_header_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.log");
    hand_log(&p, &[]);
    let mut reader = LogReader::open(&p).unwrap();
    assert_eq!(reader.by_ref().count(), 0);
    assert_eq!(
        (reader.ending(), reader.torn_tail_bytes()),
        (LogEnding::Complete, 0)
    );
    assert_eq!(reader.file_header(), &FileHeader::new(HAND_DISK_BYTES));
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..FILE_HEADER_BYTES - 1]).unwrap();
    let err = LogReader::open(&p).err().unwrap();
    assert!(
        matches!(&err, LogError::Corrupt { offset: 0, what } if what.contains("31 bytes, shorter than the file header")),
        "{err}"
    );
}

/// Every field of the file header is checked: magic, checksum, version, sector size.
#[test]
fn each_file_header_field_is_checked() {
    let good = FileHeader::new(HAND_DISK_BYTES).encode();
    assert_eq!(
        FileHeader::decode(&good).unwrap().disk_bytes,
        HAND_DISK_BYTES
    );
    let with = |at: usize, value: &[u8], reseal: bool| {
        let mut b = good;
        b[at..at + value.len()].copy_from_slice(value);
        if reseal {
            let crc = crc32c::crc32c(&b[..24]);
            b[24..28].copy_from_slice(&crc.to_le_bytes());
        }
        FileHeader::decode(&b)
    };
    assert!(matches!(with(0, b"NBDWLOG1", true), Err(LogError::BadMagic(m)) if &m == b"NBDWLOG1"));
    assert!(matches!(
        with(8, &2u32.to_le_bytes(), true),
        Err(LogError::BadVersion(2))
    ));
    assert!(matches!(
        with(8, &2u32.to_le_bytes(), false),
        Err(LogError::BadFileHeader)
    ));
    assert!(matches!(
        with(12, &4096u32.to_le_bytes(), true),
        Err(LogError::BadFileHeader)
    ));
    assert!(matches!(
        with(16, &1u64.to_le_bytes(), false),
        Err(LogError::BadFileHeader)
    ));
    // The flags word is outside the checksum; bit 0 says the log holds no power cut.
    let flagged = with(28, &[9, 9, 9, 9], false).unwrap();
    assert_eq!(flagged.flags, 0x0909_0909);
    assert!(flagged.no_power_cuts());
    assert!(!with(28, &[8, 0, 0, 0], false).unwrap().no_power_cuts());
}

/// Kind codes, names and flags are part of the format (`docs/write-log.md`).
#[test]
fn record_kind_codes_names_and_flags() {
    let kinds = [
        (1, RecordKind::Write, "write", true),
        (2, RecordKind::Trim, "trim", true),
        (3, RecordKind::WriteZeroes, "write-zeroes", true),
        (4, RecordKind::Flush, "flush", false),
        (5, RecordKind::Mark, "mark", false),
        (6, RecordKind::Fault, "fault", false),
        (7, RecordKind::PowerCut, "power-cut", false),
        (8, RecordKind::Full, "full", false),
    ];
    for v in 0..=255u8 {
        let expected = kinds.iter().find(|k| k.0 == v).map(|k| k.1);
        assert_eq!(RecordKind::from_u8(v), expected, "code {v}");
    }
    for (code, kind, name, data) in kinds {
        assert_eq!(
            (kind as u8, kind.name(), kind.is_data()),
            (code, name, data)
        );
    }
    let header = |flags: u8| {
        let head = RecordHead {
            kind: RecordKind::Trim,
            flags,
            conn: 1,
            offset: 0,
            length: 512,
        };
        RecordHeader::seal(&head, 0, &[])
    };
    assert!(header(FLAG_FUA).fua());
    assert!(header(FLAG_FUA | 2).fua());
    assert!(!header(2).fua());
    assert!(!header(0).fua());
    let event = RecordHead::event(RecordKind::Mark, 3);
    assert_eq!(
        (event.flags, event.conn, event.offset, event.length),
        (0, 3, 0, 0)
    );
}

/// Payload structures decode only from exactly their bytes.
#[test]
fn payloads_decode_from_exactly_their_bytes() {
    let flush = FlushPayload {
        in_flight: vec![3, 9],
    };
    let mut bytes = encode_payload(&flush);
    assert_eq!(decode_payload::<FlushPayload>(&bytes).unwrap(), flush);
    bytes.push(0);
    let err = decode_payload::<FlushPayload>(&bytes).unwrap_err();
    assert!(
        err.to_string().contains("1 trailing bytes after payload"),
        "{err}"
    );
    let full = full_payload(FullReason::Cap, 5);
    assert_eq!(full.len(), FULL_PAYLOAD_BYTES);
    assert!(decode_payload::<FullPayload>(&full[..FULL_PAYLOAD_BYTES - 1]).is_err());
}

/// How a log ends is said in words a person reads in reports.
#[test]
fn log_endings_say_why() {
    let said = |e: LogEnding| e.to_string();
    assert_eq!(said(LogEnding::Complete), "complete");
    assert!(said(LogEnding::TornTail { bytes: 17 }).starts_with("torn tail of 17 bytes ignored"));
    let capped = said(LogEnding::Full {
        seq: 4,
        reason: FullReason::Cap,
        log_bytes: 999,
    });
    assert!(
        capped.starts_with("capped: the log reached its record-max at 999 bytes (record 4)"),
        "{capped}"
    );
    let full = said(LogEnding::Full {
        seq: 4,
        reason: FullReason::LogDiskFull,
        log_bytes: 999,
    });
    assert!(
        full.starts_with("incomplete: the disk of the log was full (at 999 bytes, record 4)"),
        "{full}"
    );
}

/// The header-only pass (`LogReader::headers`, a long log's quick first pass) meets the same
/// records as the full pass, leaves the stream where it was, ends quietly at a torn tail or a
/// damaged header, and `read_checked_payload` refuses a payload whose checksum is wrong.
#[test]
fn the_header_pass_meets_the_records_the_full_pass_reads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.log");
    let ends = sample_log(&p);
    let all = read_all(&p).unwrap();
    let mut reader = LogReader::open(&p).unwrap();
    assert_eq!(
        reader.headers().collect::<Result<Vec<_>, _>>().unwrap(),
        all
    );
    for rec in &all {
        let payload = reader.read_checked_payload(rec).unwrap();
        assert_eq!(payload, reader.read_payload(rec).unwrap());
    }
    let streamed: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        streamed, all,
        "the header pass left the stream at the first record"
    );

    // Torn inside the last record's payload: its header is whole but its payload is not.
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..full.len() - 1]).unwrap();
    let reader = LogReader::open(&p).unwrap();
    assert_eq!(
        reader.headers().collect::<Result<Vec<_>, _>>().unwrap(),
        all[..4]
    );

    // A damaged header (of the third record) ends the pass there: in its sequence number,
    // and in its connection, which only the header's checksum covers.
    for at in [10, 16] {
        let mut bytes = full.clone();
        bytes[ends[1] as usize + at] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let reader = LogReader::open(&p).unwrap();
        assert_eq!(
            reader.headers().collect::<Result<Vec<_>, _>>().unwrap(),
            all[..2],
            "header byte {at} damaged"
        );
    }

    // A damaged payload (of the first record) passes the header pass, not the check.
    let mut bytes = full;
    bytes[FILE_HEADER_BYTES + RECORD_HEADER_BYTES + 1] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let reader = LogReader::open(&p).unwrap();
    let headers: Vec<Record> = reader.headers().collect::<Result<_, _>>().unwrap();
    assert_eq!(headers, all);
    let err = reader.read_checked_payload(&headers[0]).unwrap_err();
    assert!(
        matches!(&err, LogError::Corrupt { offset: 32, what } if what.contains("checksum")),
        "{err}"
    );
    reader.read_checked_payload(&headers[1]).unwrap();
}

/// A reader that keeps the bytes it reads gives them back exactly as the file holds them,
/// from where the last take left off, reads the same records, keeps nothing past its bound
/// (until the next take), and still ends at a torn tail or refuses a damaged payload.
#[test]
fn kept_bytes_are_the_files_bytes_and_change_nothing_read() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.log");
    let ends = sample_log(&p);
    let all = read_all(&p).unwrap();
    let file = std::fs::read(&p).unwrap();
    let slice = |a: u64, b: u64| file[a as usize..b as usize].to_vec();

    let mut reader = LogReader::open(&p).unwrap();
    reader.keep_bytes(1 << 20);
    let mut got: Vec<Record> = reader.by_ref().take(2).collect::<Result<_, _>>().unwrap();
    let kept = reader.take_kept(Vec::new()).unwrap();
    assert_eq!(
        (kept.start, kept.bytes),
        (
            FILE_HEADER_BYTES as u64,
            slice(FILE_HEADER_BYTES as u64, ends[1])
        )
    );
    got.extend(reader.by_ref().collect::<Result<Vec<_>, _>>().unwrap());
    assert_eq!(got, all, "keeping changes no record read");
    let kept = reader.take_kept(vec![1, 2, 3]).unwrap();
    assert_eq!((kept.start, kept.bytes), (ends[1], slice(ends[1], ends[4])));
    assert!(reader.take_kept(Vec::new()).is_none(), "nothing read since");

    // Past the bound nothing is kept, and the records are read all the same.
    let mut reader = LogReader::open(&p).unwrap();
    reader.keep_bytes(100);
    let two: Vec<Record> = reader.by_ref().take(2).collect::<Result<_, _>>().unwrap();
    assert_eq!(two, all[..2]);
    assert!(
        reader.take_kept(Vec::new()).is_none(),
        "140 bytes read, 100 kept at most"
    );
    reader.next().unwrap().unwrap();
    let kept = reader.take_kept(Vec::new()).unwrap();
    assert_eq!((kept.start, kept.bytes), (ends[1], slice(ends[1], ends[2])));

    // Torn inside the last payload: the same records, and the torn bytes are not kept.
    std::fs::write(&p, &file[..file.len() - 1]).unwrap();
    let mut reader = LogReader::open(&p).unwrap();
    reader.keep_bytes(1 << 20);
    let read: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        (read.as_slice(), reader.torn_tail_bytes()),
        (&all[..4], ends[4] - 1 - ends[3])
    );
    let kept = reader.take_kept(Vec::new()).unwrap();
    assert_eq!(kept.bytes, slice(FILE_HEADER_BYTES as u64, ends[3]));
    // Torn with its length whole: the payload's end never written (zeroes), so its checksum
    // fails with nothing but zeroes after; read and kept, then given up.
    let mut bytes = file.clone();
    let n = bytes.len();
    bytes[n - 10..].fill(0);
    std::fs::write(&p, &bytes).unwrap();
    let mut reader = LogReader::open(&p).unwrap();
    reader.keep_bytes(1 << 20);
    let read: Vec<Record> = reader.by_ref().collect::<Result<_, _>>().unwrap();
    assert_eq!(
        (read.as_slice(), reader.torn_tail_bytes()),
        (&all[..4], ends[4] - ends[3])
    );
    let kept = reader.take_kept(Vec::new()).unwrap();
    assert_eq!(kept.bytes, slice(FILE_HEADER_BYTES as u64, ends[3]));

    // A damaged payload is refused as without keeping.
    let mut bytes = file.clone();
    bytes[FILE_HEADER_BYTES + RECORD_HEADER_BYTES + 1] ^= 0xff;
    std::fs::write(&p, &bytes).unwrap();
    let mut reader = LogReader::open(&p).unwrap();
    reader.keep_bytes(1 << 20);
    let err = reader.next().unwrap().unwrap_err();
    assert!(
        matches!(&err, LogError::Corrupt { offset: 32, what } if what.contains("checksum")),
        "{err}"
    );
}
