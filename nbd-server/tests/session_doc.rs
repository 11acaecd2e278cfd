//! `docs/fscore-export.md` documents the session format byte by byte. These tests hold the
//! code to the page both ways: the bytes a `SessionWriter` writes sit at the offsets and
//! sizes the page's tables give, every field the page lists is one the test knows, every field
//! the test knows is on the page, and the constants table matches the code.

use std::collections::BTreeMap;

use nbd_server::fscore::session::*;
use nbd_server::fscore::volume::{VolFile, VolOp, VolRequest};

fn page() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/fscore-export.md"
    ))
    .unwrap()
}

/// The rows `(offset, size, field)` of the table under the heading that starts with `title`.
/// A size like `4 × n` or `` `length` `` is kept as text.
fn layout(title: &str) -> Vec<(String, String, String)> {
    let page = page();
    let section = page
        .split("\n### ")
        .chain(page.split("\n## "))
        .find(|s| s.starts_with(title))
        .unwrap_or_else(|| panic!("docs/fscore-export.md has a section {title:?}"));
    let rows: Vec<(String, String, String)> = section
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| offset") && !l.contains("---"))
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (
                c[0].to_owned(),
                c[1].to_owned(),
                c[2].trim_matches('`').to_owned(),
            )
        })
        .collect();
    assert!(!rows.is_empty(), "section {title:?} has a table");
    rows
}

fn header() -> SessionHeader {
    SessionHeader {
        config: fs_core::Config::default(),
        files: vec![VolFile {
            name: "vm".into(),
            ino: 0,
            size: 1 << 20,
        }],
        inodes: 17,
        device_blocks: 4096,
        sched_seed: 5,
        disk_cache_bytes: 1 << 20,
    }
}

/// A session holding one record of each kind; its bytes.
fn session() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let mut w = SessionWriter::create(&path, &header()).unwrap();
    w.step(3).unwrap();
    w.step(0x0102_0304).unwrap();
    let req = VolRequest {
        file: 1,
        offset: 0x1122_3344_5566,
        op: VolOp::Write {
            data: vec![9, 8, 7],
        },
        fua: true,
    };
    w.arrive(0x0a0b, &req).unwrap();
    w.answer(0x0a0b, &Ok(Some(vec![1, 2]))).unwrap();
    w.power_cut(0xdead_beef).unwrap();
    w.end(0).unwrap();
    std::fs::read(&path).unwrap()
}

fn le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |v, &b| (v << 8) | u64::from(b))
}

/// Checks `bytes` against the table `title`: each row's field, read at its offset with its
/// size, is the value `want` gives it (a fixed size) or the bytes it gives (a variable one).
fn check(title: &str, bytes: &[u8], want: &BTreeMap<&str, Vec<u8>>) {
    let rows = layout(title);
    let mut seen = Vec::new();
    for (offset, size, field) in rows {
        let Ok(offset) = offset.parse::<usize>() else {
            // A variable offset (after a variable field): the field is what follows.
            let w = want
                .get(field.as_str())
                .unwrap_or_else(|| panic!("{title}: {field}?"));
            assert!(bytes.ends_with(w), "{title}: {field} ends the bytes");
            seen.push(field);
            continue;
        };
        let w = want
            .get(field.as_str())
            .unwrap_or_else(|| panic!("{title}: the page lists {field:?}, the code has none"));
        let size = size.parse::<usize>().unwrap_or(w.len());
        assert_eq!(size, w.len(), "{title}: {field} is {} bytes", w.len());
        assert_eq!(
            &bytes[offset..offset + size],
            &w[..],
            "{title}: {field} at {offset}"
        );
        seen.push(field);
    }
    for f in want.keys() {
        assert!(
            seen.iter().any(|s| s == f),
            "{title}: the page does not list {f}"
        );
    }
}

/// The records after the header, (tag, body) each, their frames checked against the page.
fn records(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let header_len = le(&bytes[12..16]) as usize;
    let mut at = 16 + header_len;
    let mut out = Vec::new();
    while at < bytes.len() {
        let len = le(&bytes[at + 1..at + 5]) as usize;
        let frame = &bytes[at..at + 9 + len];
        let body = frame[5..5 + len].to_vec();
        let crc = crc32c::crc32c(&frame[..5 + len]);
        let mut want = BTreeMap::new();
        want.insert("tag", vec![frame[0]]);
        want.insert("body_len", (len as u32).to_le_bytes().to_vec());
        want.insert("body", body.clone());
        want.insert("crc", crc.to_le_bytes().to_vec());
        check_frame(frame, &want);
        out.push((frame[0], body));
        at += 9 + len;
    }
    out
}

fn check_frame(frame: &[u8], want: &BTreeMap<&str, Vec<u8>>) {
    // The record table follows the file table in the same section: take the rows from `tag` on.
    let rows = layout("File layout");
    let start = rows.iter().position(|r| r.2 == "tag").expect("a tag row");
    let mut fields = Vec::new();
    for (offset, _size, field) in &rows[start..] {
        let w = &want[field.as_str()];
        let at = match offset.parse::<usize>() {
            Ok(o) => o,
            Err(_) => frame.len() - 4, // `5 + body_len`
        };
        assert_eq!(&frame[at..at + w.len()], &w[..], "record frame: {field}");
        fields.push(field.clone());
    }
    assert_eq!(fields, ["tag", "body_len", "body", "crc"]);
}

#[test]
fn the_file_header_is_as_documented() {
    let bytes = session();
    let json = serde_json::to_vec(&header()).unwrap();
    let mut want = BTreeMap::new();
    want.insert("magic", SESSION_MAGIC.to_vec());
    want.insert("version", SESSION_VERSION.to_le_bytes().to_vec());
    want.insert("header_len", (json.len() as u32).to_le_bytes().to_vec());
    want.insert("header", json.clone());
    let rows = layout("File layout");
    let end = rows.iter().position(|r| r.2 == "tag").unwrap();
    for (offset, size, field) in &rows[..end] {
        let o: usize = offset.parse().unwrap();
        let w = &want[field.as_str()];
        if let Ok(n) = size.parse::<usize>() {
            assert_eq!(n, w.len(), "{field}");
        }
        assert_eq!(&bytes[o..o + w.len()], &w[..], "{field} at {o}");
    }
    assert!(page().contains("`FSCSESS\\0` (`46 53 43 53 45 53 53 00`)"));
    assert_eq!(&SESSION_MAGIC, b"FSCSESS\0");
}

#[test]
fn every_record_body_is_as_documented() {
    let bytes = session();
    let recs = records(&bytes);
    let tags: Vec<u8> = recs.iter().map(|r| r.0).collect();
    assert_eq!(
        tags,
        [TAG_STEPS, TAG_ARRIVE, TAG_ANSWER, TAG_POWER_CUT, TAG_END]
    );
    let steps = &recs[0].1;
    assert_eq!(layout("Steps body")[0].2, "task");
    assert_eq!(
        steps[..],
        [3u32.to_le_bytes(), 0x0102_0304u32.to_le_bytes()].concat()
    );
    let mut a = BTreeMap::new();
    a.insert("id", 0x0a0bu64.to_le_bytes().to_vec());
    a.insert("file", 1u32.to_le_bytes().to_vec());
    a.insert("kind", vec![OP_WRITE]);
    a.insert("fua", vec![1]);
    a.insert("offset", 0x1122_3344_5566u64.to_le_bytes().to_vec());
    a.insert("length", 3u64.to_le_bytes().to_vec());
    a.insert("payload", vec![9, 8, 7]);
    check("Arrival body", &recs[1].1, &a);
    let mut r = BTreeMap::new();
    r.insert("id", 0x0a0bu64.to_le_bytes().to_vec());
    r.insert("ok", vec![1]);
    let hash = fs_core::block::content_hash(&[1, 2]);
    r.insert("hash", hash.to_le_bytes().to_vec());
    r.insert("length", 2u32.to_le_bytes().to_vec());
    check("Answer body", &recs[2].1, &r);
    let cut = layout("Power-cut body");
    assert_eq!((cut[0].0.as_str(), cut[0].1.as_str()), ("0", "8"));
    assert_eq!(recs[3].1, 0xdead_beefu64.to_le_bytes());
    assert_eq!(recs[4].1, 0u64.to_le_bytes());
    assert_eq!(
        ARRIVE_HEADER_BYTES,
        layout("Arrival body")
            .iter()
            .find(|r| r.2 == "payload")
            .unwrap()
            .0
            .parse::<usize>()
            .unwrap()
    );
}

#[test]
fn the_kinds_and_tags_the_page_names_are_the_codes() {
    let page = page();
    assert!(page.contains(
        "1 read, 2 write, 3 trim, 4 write-zeroes, 5 write-zeroes with NO_HOLE, 6 flush, 7 cache"
    ));
    assert_eq!(
        [
            OP_READ,
            OP_WRITE,
            OP_TRIM,
            OP_ZERO_MAY_TRIM,
            OP_ZERO_NO_HOLE,
            OP_FLUSH,
            OP_CACHE
        ],
        [1, 2, 3, 4, 5, 6, 7]
    );
    assert!(page.contains("`S` steps, `A` arrival, `R` answer, `C` power cut, `E` end"));
    assert_eq!(
        [TAG_STEPS, TAG_ARRIVE, TAG_ANSWER, TAG_POWER_CUT, TAG_END],
        *b"SARCE"
    );
}

#[test]
fn the_constants_table_matches_the_code() {
    let page = page();
    let section = page.split("\n### Constants").nth(1).unwrap();
    let rows: BTreeMap<String, u64> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            (c[0].trim_matches('`').to_owned(), c[1].parse().unwrap())
        })
        .collect();
    let code: BTreeMap<String, u64> = [
        ("SESSION_VERSION", u64::from(SESSION_VERSION)),
        (
            "SESSION_HEADER_BYTES_MAX",
            u64::from(SESSION_HEADER_BYTES_MAX),
        ),
        ("SESSION_RECORD_BYTES_MAX", SESSION_RECORD_BYTES_MAX),
        (
            "SESSION_STEPS_PER_RECORD_MAX",
            SESSION_STEPS_PER_RECORD_MAX as u64,
        ),
        ("ARRIVE_HEADER_BYTES", ARRIVE_HEADER_BYTES as u64),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(rows, code);
}
