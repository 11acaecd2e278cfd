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
