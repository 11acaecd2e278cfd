//! crashmonkey's dm-log-writes import and export, held to the kernel's format rather than to
//! each other. A round trip through our own code cannot catch a field that both directions put
//! in the same wrong place (a sector counted in 512-byte units, a mark without its zero byte), so
//! the logs here are assembled field by field from the kernel's structures, transcribed in
//! [`kernel`] from `drivers/md/dm-log-writes.c` (and fstests' `src/log-writes/log-writes.h`,
//! which copies them), never from `dmlog.rs`:
//! - import reads a golden log to exactly the operations it describes, at both sector sizes;
//! - export of a write log holding those operations writes exactly the golden bytes, and
//!   differs only where `docs/dm-log-writes.md` says it does;
//! - the document's tables, constants and example agree with the kernel and the code.

use std::path::{Path, PathBuf};
use std::process::Command;

use crashmonkey::dmlog::{self, DmStats};
use nbd_server::log::{
    decode_payload, encode_payload, CutMode, Fate, FlushPayload, LogReader, LogWriter,
    PowerCutPayload, RecordKind, WriteFate, FLAG_FUA,
};

/// The format as the kernel defines it. Nothing here comes from `dmlog.rs`.
mod kernel {
    /// `WRITE_LOG_MAGIC`, `WRITE_LOG_VERSION`.
    pub const WRITE_LOG_MAGIC: u64 = 0x6a736677736872;
    pub const WRITE_LOG_VERSION: u64 = 1;
    /// `LOG_FLUSH_FLAG` ... `LOG_METADATA_FLAG`, by name.
    pub const FLAGS: [(&str, u64); 5] = [
        ("FLUSH", 1 << 0),
        ("FUA", 1 << 1),
        ("DISCARD", 1 << 2),
        ("MARK", 1 << 3),
        ("METADATA", 1 << 4),
    ];
    pub const FLUSH: u64 = FLAGS[0].1;
    pub const FUA: u64 = FLAGS[1].1;
    pub const DISCARD: u64 = FLAGS[2].1;
    pub const MARK: u64 = FLAGS[3].1;
    pub const METADATA: u64 = FLAGS[4].1;
    /// `struct log_write_super { __le64 magic; __le64 version; __le64 nr_entries;
    /// __le32 sectorsize; }`: (field, offset, size), at byte 0 of the log.
    pub const SUPER: [(&str, usize, usize); 4] = [
        ("magic", 0, 8),
        ("version", 8, 8),
        ("nr_entries", 16, 8),
        ("sectorsize", 24, 4),
    ];
    /// `struct log_write_entry { __le64 sector; __le64 nr_sectors; __le64 flags;
    /// __le64 data_len; }`, at the start of an entry's sector.
    pub const ENTRY: [(&str, usize, usize); 4] = [
        ("sector", 0, 8),
        ("nr_sectors", 8, 8),
        ("flags", 16, 8),
        ("data_len", 24, 8),
    ];
    /// `sizeof(struct log_write_entry)`: `write_metadata` puts a mark's name right after it.
    pub const ENTRY_BYTES: usize = 32;
    /// `log_mark`: `kstrndup(data, sectorsize - sizeof(struct log_write_entry) - 1)`.
    pub fn mark_bytes_max(sectorsize: usize) -> usize {
        sectorsize - ENTRY_BYTES - 1
    }
    /// The mark the target logs when it is torn down (`log_writes_dtr`).
    pub const END_MARK: &[u8] = b"dm-log-writes-end";
}

/// Writes `value` into the field `name` of a structure laid out by `table`, little-endian.
fn put(buf: &mut [u8], table: &[(&str, usize, usize)], name: &str, value: u64) {
    let &(_, at, size) = table
        .iter()
        .find(|f| f.0 == name)
        .unwrap_or_else(|| panic!("no field {name}"));
    assert!(size == 8 || value < 1 << (8 * size), "{name} = {value}");
    buf[at..at + size].copy_from_slice(&value.to_le_bytes()[..size]);
}

/// A dm-log-writes log assembled the way the kernel lays it out (`log_super`, `log_one_block`,
/// `write_metadata`): the super block in sector 0; per entry a header sector, zero past its
/// fields and mark name, then the data sectors of a write.
struct Golden {
    sectorsize: usize,
    bytes: Vec<u8>,
    entries: u64,
}

impl Golden {
    fn new(sectorsize: usize) -> Self {
        Golden {
            sectorsize,
            bytes: vec![0; sectorsize],
            entries: 0,
        }
    }

    /// Where the next entry starts: its index (from 0) and byte.
    fn next_entry(&self) -> (u64, usize) {
        (self.entries, self.bytes.len())
    }

    fn entry(mut self, sector: u64, nr_sectors: u64, flags: u64, mark: &[u8], data: &[u8]) -> Self {
        let mut header = vec![0u8; self.sectorsize];
        put(&mut header, &kernel::ENTRY, "sector", sector);
        put(&mut header, &kernel::ENTRY, "nr_sectors", nr_sectors);
        put(&mut header, &kernel::ENTRY, "flags", flags);
        put(&mut header, &kernel::ENTRY, "data_len", mark.len() as u64);
        header[kernel::ENTRY_BYTES..kernel::ENTRY_BYTES + mark.len()].copy_from_slice(mark);
        self.bytes.extend_from_slice(&header);
        self.bytes.extend_from_slice(data);
        self.entries += 1;
        self
    }

    fn write(self, sector: u64, flags: u64, data: &[u8]) -> Self {
        assert!(!data.is_empty() && data.len().is_multiple_of(self.sectorsize));
        let nr = (data.len() / self.sectorsize) as u64;
        self.entry(sector, nr, flags, &[], data)
    }

    /// An empty flush bio: `REQ_PREFLUSH`, no sectors, sector 0.
    fn flush(self) -> Self {
        self.entry(0, 0, kernel::FLUSH, &[], &[])
    }

    /// A discard: its range, and no data sectors.
    fn discard(self, sector: u64, nr_sectors: u64) -> Self {
        self.entry(sector, nr_sectors, kernel::DISCARD, &[], &[])
    }

    fn mark(self, name: &[u8]) -> Self {
        assert!(name.len() <= kernel::mark_bytes_max(self.sectorsize));
        self.entry(0, 0, kernel::MARK, name, &[])
    }

    /// The log, its super block counting every entry.
    fn finish(self) -> Vec<u8> {
        let n = self.entries;
        self.finish_counting(n)
    }

    /// The log, its super block saying `nr_entries` (the kernel rewrites it only after FUA and
    /// MARK entries, so it may count fewer than the log holds).
    fn finish_counting(mut self, nr_entries: u64) -> Vec<u8> {
        let sup = &mut self.bytes[..self.sectorsize];
        put(sup, &kernel::SUPER, "magic", kernel::WRITE_LOG_MAGIC);
        put(sup, &kernel::SUPER, "version", kernel::WRITE_LOG_VERSION);
        put(sup, &kernel::SUPER, "nr_entries", nr_entries);
        put(sup, &kernel::SUPER, "sectorsize", self.sectorsize as u64);
        self.bytes
    }
}

/// One record of a write log, as the tests compare them.
#[derive(Debug, Clone, PartialEq)]
enum Rec {
    Write {
        offset: u64,
        fua: bool,
        data: Vec<u8>,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    Flush,
    Mark(Vec<u8>),
}

fn fua_flag(fua: bool) -> u8 {
    if fua {
        FLAG_FUA
    } else {
        0
    }
}

/// A write log of `recs` on a disk of `disk_bytes`.
fn write_log(path: &Path, disk_bytes: u64, recs: &[Rec]) {
    let mut w = LogWriter::create(path, disk_bytes).unwrap();
    for r in recs {
        match r {
            Rec::Write { offset, fua, data } => w.append(
                RecordKind::Write,
                fua_flag(*fua),
                1,
                *offset,
                data.len() as u64,
                data,
            ),
            Rec::WriteZeroes {
                offset,
                length,
                fua,
            } => w.append(
                RecordKind::WriteZeroes,
                fua_flag(*fua),
                1,
                *offset,
                *length,
                &[],
            ),
            Rec::Trim {
                offset,
                length,
                fua,
            } => w.append(RecordKind::Trim, fua_flag(*fua), 1, *offset, *length, &[]),
            Rec::Flush => w.append(
                RecordKind::Flush,
                0,
                1,
                0,
                0,
                &encode_payload(&FlushPayload::default()),
            ),
            Rec::Mark(name) => w.append(RecordKind::Mark, 0, 0, 0, 0, name),
        }
        .unwrap();
    }
    w.sync().unwrap();
}

/// The records of the write log at `path`, and its disk size.
fn read_log(path: &Path) -> (u64, Vec<Rec>) {
    let reader = LogReader::open(path).unwrap();
    let disk_bytes = reader.disk_bytes();
    let mut out = vec![];
    for rec in LogReader::open(path).unwrap() {
        let rec = rec.unwrap();
        let h = rec.header;
        let payload = reader.read_payload(&rec).unwrap();
        out.push(match rec.kind {
            RecordKind::Write => {
                assert_eq!(payload.len() as u64, h.length);
                Rec::Write {
                    offset: h.offset,
                    fua: h.fua(),
                    data: payload,
                }
            }
            RecordKind::Trim => Rec::Trim {
                offset: h.offset,
                length: h.length,
                fua: h.fua(),
            },
            RecordKind::Flush => {
                let p: FlushPayload = decode_payload(&payload).unwrap();
                assert!(p.in_flight.is_empty(), "{p:?}");
                Rec::Flush
            }
            RecordKind::Mark => Rec::Mark(payload),
            k => panic!("import wrote a {} record", k.name()),
        });
    }
    (disk_bytes, out)
}

/// `len` bytes of a pattern that differs per `seed` and per sector.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 512) as u8) ^ (i as u8))
        .collect()
}

fn import(dir: &Path, bytes: &[u8], disk_bytes: Option<u64>) -> (DmStats, u64, Vec<Rec>) {
    let input = dir.join("in.dmlog");
    let out = dir.join("imported.log");
    std::fs::write(&input, bytes).unwrap();
    let stats = dmlog::import(&input, &out, disk_bytes).unwrap();
    let (disk, recs) = read_log(&out);
    (stats, disk, recs)
}

fn export(dir: &Path, disk_bytes: u64, recs: &[Rec]) -> (DmStats, Vec<u8>) {
    let log = dir.join("known.log");
    let out = dir.join("exported.dmlog");
    write_log(&log, disk_bytes, recs);
    let stats = dmlog::export(&log, &out).unwrap();
    (stats, std::fs::read(&out).unwrap())
}

/// Fails with the first differing sector of two dm-log-writes logs, in hex.
fn assert_same_log(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let sector = at / 512 * 512;
    let hex = |b: &[u8]| {
        let end = b.len().min(sector + 64);
        b.get(sector..end).map_or(String::new(), |s| {
            s.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
    };
    panic!(
        "{what}: {} bytes, want {}; first difference at byte {at}\n got  @{sector:#x}: {}\n want @{sector:#x}: {}",
        got.len(),
        want.len(),
        hex(got),
        hex(want)
    );
}

// ---- the example of docs/dm-log-writes.md ----

const DOC: &str = include_str!("../../docs/dm-log-writes.md");

/// The text after `marker`, which must occur exactly once.
fn after(marker: &str) -> &'static str {
    let at = DOC
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} is not in docs/dm-log-writes.md"));
    assert!(!DOC[at + 1..].contains(marker), "{marker} is there twice");
    &DOC[at + marker.len()..]
}

/// The example dump: `OFFSET: bytes | comment` lines, every byte not shown zero, the length
/// given by the marker.
fn doc_example() -> Vec<u8> {
    let text = after("<!-- example-log bytes=");
    let len: usize = text[..text.find(' ').unwrap()].parse().unwrap();
    let start = text.find("```").unwrap() + 3;
    let body = &text[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let body = &body[..body.find("```").unwrap()];
    let mut out = vec![0u8; len];
    for line in body.lines() {
        let line = line.split('|').next().unwrap();
        let (offset, bytes) = line.split_once(':').expect("an offset");
        let start = usize::from_str_radix(offset.trim(), 16).unwrap();
        for (at, tok) in (start..).zip(bytes.split_whitespace()) {
            out[at] = u8::from_str_radix(tok, 16).unwrap_or_else(|_| panic!("bad hex {tok}"));
        }
    }
    out
}

/// The example's log as the kernel would write it, and the write log of the same IO.
fn example() -> (Vec<u8>, Vec<Rec>) {
    let mut data = vec![0u8; 512];
    data[..8].copy_from_slice(b"ABCDEFGH");
    let golden = Golden::new(512)
        .write(8, kernel::FUA, &data)
        .flush()
        .discard(16, 8)
        .mark(b"fsync-a")
        .finish();
    let recs = vec![
        Rec::Write {
            offset: 4096,
            fua: true,
            data,
        },
        Rec::Flush,
        Rec::Trim {
            offset: 8192,
            length: 4096,
            fua: false,
        },
        Rec::Mark(b"fsync-a".to_vec()),
    ];
    (golden, recs)
}

/// The document's example is the kernel's layout of the IO it describes; import reads it to
/// that IO and export writes it back byte for byte.
#[test]
fn document_example_is_the_kernels_layout_and_converts_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, recs) = example();
    let doc = doc_example();
    assert_same_log(
        &doc,
        &golden,
        "the document's example against the kernel's layout",
    );
    // The super block by hand, independent of `to_le_bytes`: "rhswfsj\0", 1, 4, 512.
    let sup: [u8; 28] = [
        0x72, 0x68, 0x73, 0x77, 0x66, 0x73, 0x6a, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0,
        0, 0, 0x00, 0x02, 0, 0,
    ];
    assert_eq!(doc[..28], sup);
    let (stats, disk, got) = import(dir.path(), &doc, None);
    assert_eq!(got, recs);
    assert_eq!(disk, 12288, "the end of the discard, rounded up to 4096");
    assert_eq!(
        (
            stats.entries,
            stats.writes,
            stats.flushes,
            stats.discards,
            stats.marks
        ),
        (4, 1, 1, 1, 1)
    );
    let (stats, bytes) = export(dir.path(), 1 << 20, &recs);
    assert_same_log(&bytes, &doc, "export of the example's write log");
    assert_eq!(stats.entries, 4);
}

/// What the kernel writes beyond the example: multi-sector writes, a journal commit (a write
/// with FLUSH and FUA: a flush of everything before it, then the write), METADATA, a mark of
/// the longest length the kernel logs, and the mark of a torn-down target, at 512- and
/// 4096-byte sectors (whose `sector` fields count 4096-byte units).
#[test]
fn kernel_logs_import_to_the_operations_they_describe() {
    let dir = tempfile::tempdir().unwrap();
    for ss in [512usize, 4096] {
        let long_mark = vec![b'm'; kernel::mark_bytes_max(ss)];
        let (a, b, c, d) = (
            pattern(1, 3 * ss),
            pattern(2, ss),
            pattern(3, 2 * ss),
            pattern(4, ss),
        );
        let golden = Golden::new(ss)
            .write(5, 0, &a)
            .write(40, kernel::FUA, &b)
            .flush()
            .write(7, kernel::FLUSH | kernel::FUA, &c)
            .write(2, kernel::METADATA, &d)
            .discard(100, 28)
            .mark(&long_mark)
            .mark(kernel::END_MARK)
            .finish();
        let at = |sector: u64| sector * ss as u64;
        let want = vec![
            Rec::Write {
                offset: at(5),
                fua: false,
                data: a,
            },
            Rec::Write {
                offset: at(40),
                fua: true,
                data: b,
            },
            Rec::Flush,
            Rec::Flush,
            Rec::Write {
                offset: at(7),
                fua: true,
                data: c,
            },
            Rec::Write {
                offset: at(2),
                fua: false,
                data: d,
            },
            Rec::Trim {
                offset: at(100),
                length: at(28),
                fua: false,
            },
            Rec::Mark(long_mark),
            Rec::Mark(kernel::END_MARK.to_vec()),
        ];
        let (stats, disk, got) = import(dir.path(), &golden, None);
        assert_eq!(got, want, "sector size {ss}");
        assert_eq!(disk, at(128).next_multiple_of(4096), "sector size {ss}");
        assert_eq!(
            (
                stats.entries,
                stats.writes,
                stats.flushes,
                stats.discards,
                stats.marks
            ),
            (8, 4, 2, 1, 2),
            "sector size {ss}"
        );
        let (_, disk, got) = import(dir.path(), &golden, Some(1 << 24));
        assert_eq!((disk, &got), (1 << 24, &want), "sector size {ss}");
    }
}

/// The kernel rewrites the super block only after FUA and MARK entries, so a log taken from a
/// live or crashed target holds entries past `nr_entries`. Readers take `nr_entries` entries
/// (replay-log stops there) and never look at the rest.
#[test]
fn import_takes_the_entries_the_super_block_counts() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(9, 512);
    let mut bytes = Golden::new(512)
        .write(1, kernel::FUA, &data)
        .mark(b"m")
        .write(2, 0, &pattern(10, 1024))
        .flush()
        .finish_counting(2);
    bytes.extend_from_slice(&[0xff; 700]); // whatever the log device held after the log
    let (stats, _, got) = import(dir.path(), &bytes, Some(1 << 20));
    assert_eq!(
        got,
        vec![
            Rec::Write {
                offset: 512,
                fua: true,
                data
            },
            Rec::Mark(b"m".to_vec()),
        ]
    );
    assert_eq!(stats.entries, 2);
}

/// Import names a bad entry as replay-log numbers it (from 0), with the byte where it starts,
/// so `replay-log --start-entry N` and `dd skip=` find the same entry.
#[test]
fn import_errors_name_the_entry_as_replay_log_does() {
    let dir = tempfile::tempdir().unwrap();
    let g = Golden::new(512)
        .write(0, 0, &pattern(1, 1024))
        .discard(8, 8)
        .flush();
    let (index, byte) = g.next_entry();
    assert_eq!((index, byte), (3, 512 + 512 + 1024 + 512 + 512));
    let bytes = g.write(4096, 0, &pattern(2, 512)).finish(); // past a 1 MiB disk
    let input = dir.path().join("bad.dmlog");
    std::fs::write(&input, &bytes).unwrap();
    let err = dmlog::import(&input, &dir.path().join("out.log"), Some(1 << 20))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("entry {index} (byte {byte} of the log)")),
        "{err}"
    );
}

/// Export writes the kernel's bytes for every operation the kernel logs the same way.
#[test]
fn export_writes_the_kernels_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (pattern(5, 4096), pattern(6, 512));
    let recs = vec![
        Rec::Mark(b"start".to_vec()),
        Rec::Write {
            offset: 8192,
            fua: false,
            data: a.clone(),
        },
        Rec::Flush,
        Rec::Write {
            offset: 512,
            fua: true,
            data: b.clone(),
        },
        Rec::Trim {
            offset: 1 << 19,
            length: 1 << 18,
            fua: false,
        },
        Rec::Mark(vec![b'n'; 256]),
    ];
    let golden = Golden::new(512)
        .mark(b"start")
        .write(16, 0, &a)
        .flush()
        .write(1, kernel::FUA, &b)
        .discard(1024, 512)
        .mark(&[b'n'; 256])
        .finish();
    let (stats, bytes) = export(dir.path(), 1 << 20, &recs);
    assert_same_log(&bytes, &golden, "export");
    assert_eq!(
        (
            stats.entries,
            stats.writes,
            stats.flushes,
            stats.discards,
            stats.marks
        ),
        (6, 2, 1, 1, 2)
    );
}

/// Where export differs from what the kernel would log for the same IO, each difference as
/// `docs/dm-log-writes.md` states it.
#[test]
fn export_differs_from_the_kernel_only_where_documented() {
    let dir = tempfile::tempdir().unwrap();
    // Write-zeroes: a write entry whose data sectors hold the zeroes. A trim with FUA keeps it.
    let (_, bytes) = export(
        dir.path(),
        1 << 20,
        &[
            Rec::WriteZeroes {
                offset: 1024,
                length: 1536,
                fua: true,
            },
            Rec::Trim {
                offset: 0,
                length: 512,
                fua: true,
            },
        ],
    );
    let golden = Golden::new(512)
        .write(2, kernel::FUA, &[0u8; 1536])
        .entry(0, 1, kernel::DISCARD | kernel::FUA, &[], &[])
        .finish();
    assert_same_log(&bytes, &golden, "write-zeroes and a FUA trim");

    // Mark names as the kernel keeps them: a C string, at most sectorsize - 33 bytes, so a
    // zero byte follows the name in its sector (replay-log compares data_len + 1 bytes).
    let long = vec![b'x'; 600];
    let (_, bytes) = export(
        dir.path(),
        1 << 20,
        &[Rec::Mark(long.clone()), Rec::Mark(b"a\0b".to_vec())],
    );
    let max = kernel::mark_bytes_max(512);
    assert_eq!(max, 479);
    let golden = Golden::new(512).mark(&long[..max]).mark(b"a").finish();
    assert_same_log(&bytes, &golden, "mark names");
    assert_eq!(bytes[512 + kernel::ENTRY_BYTES + max], 0);

    // A log from a 4096-byte sector device comes back with 512-byte sectors; a write with
    // FLUSH comes back as a flush entry, then the write; METADATA is not kept.
    let (c, d) = (pattern(7, 8192), pattern(8, 4096));
    let kernel_4k = Golden::new(4096)
        .write(3, kernel::METADATA, &c)
        .write(9, kernel::FLUSH | kernel::FUA, &d)
        .mark(b"m")
        .finish();
    let (_, disk, recs) = import(dir.path(), &kernel_4k, None);
    let (_, bytes) = export(dir.path(), disk, &recs);
    let golden = Golden::new(512)
        .write(24, 0, &c)
        .flush()
        .write(72, kernel::FUA, &d)
        .mark(b"m")
        .finish();
    assert_same_log(
        &bytes,
        &golden,
        "a 4096-byte sector log, imported and exported",
    );
}

/// A power cut is exported as its outcome: a dropped write is left out, a torn write is the
/// sectors that landed, one entry per piece.
#[test]
fn export_writes_a_power_cuts_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cut.log");
    let (a, b, c) = (pattern(1, 2048), pattern(2, 512), pattern(3, 4096));
    let mut w = LogWriter::create(&log, 1 << 20).unwrap();
    w.append(RecordKind::Write, 0, 1, 0, 2048, &a).unwrap();
    let dropped = w.append(RecordKind::Write, 0, 1, 8192, 512, &b).unwrap();
    let torn = w.append(RecordKind::Write, 0, 1, 16384, 4096, &c).unwrap();
    let cut = PowerCutPayload {
        seed: 7,
        mode: CutMode::Torn,
        fates: vec![
            WriteFate {
                seq: dropped,
                fate: Fate::Dropped,
                pieces: vec![],
            },
            WriteFate {
                seq: torn,
                fate: Fate::Torn,
                pieces: vec![(16384, 512), (17408, 1024)],
            },
        ],
    };
    w.append(RecordKind::PowerCut, 0, 0, 0, 0, &encode_payload(&cut))
        .unwrap();
    w.sync().unwrap();
    drop(w);
    let out = dir.path().join("cut.dmlog");
    dmlog::export(&log, &out).unwrap();
    let golden = Golden::new(512)
        .write(0, 0, &a)
        .write(32, 0, &c[..512])
        .write(34, 0, &c[1024..2048])
        .finish();
    assert_same_log(&std::fs::read(&out).unwrap(), &golden, "a torn power cut");
}

/// The commands, end to end: `log import` reads the golden log, `log export` writes it back.
#[test]
fn cli_import_and_export_convert_the_golden_log() {
    let dir = tempfile::tempdir().unwrap();
    let (golden, recs) = example();
    let p = |name: &str| -> PathBuf { dir.path().join(name) };
    std::fs::write(p("golden.dmlog"), &golden).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_crashmonkey"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {text}");
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let s = |name: &str| p(name).to_str().unwrap().to_string();
    let stats = run(&[
        "log",
        "import",
        &s("golden.dmlog"),
        "--format",
        "dm-log-writes",
        "-o",
        &s("ours.log"),
        "--disk-bytes",
        "1048576",
    ]);
    assert_eq!(stats["entries"], 4, "{stats}");
    assert_eq!(read_log(&p("ours.log")), (1 << 20, recs));
    run(&[
        "log",
        "export",
        &s("ours.log"),
        "--format",
        "dm-log-writes",
        "-o",
        &s("back.dmlog"),
    ]);
    assert_same_log(
        &std::fs::read(p("back.dmlog")).unwrap(),
        &golden,
        "CLI export",
    );
}

// ---- docs/dm-log-writes.md's tables ----

/// The rows of the markdown table after `<!-- table:NAME -->`, without the header and the
/// separator, each cell trimmed and stripped of backticks.
fn table(name: &str) -> Vec<Vec<String>> {
    let text = after(&format!("<!-- table:{name} -->"));
    let rows: Vec<Vec<String>> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "table {name} has no rows");
    rows[2..].to_vec()
}

fn number(cell: &str) -> u64 {
    let tok = cell.split_whitespace().next().unwrap_or("");
    match tok.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => tok.parse(),
    }
    .unwrap_or_else(|_| panic!("{cell:?} does not start with a number"))
}

/// The structure tables give the kernel's offsets and sizes, and its constants; the code has
/// the same constants.
#[test]
fn document_tables_match_the_kernel_and_the_code() {
    let sup = table("super");
    let fields: Vec<_> = sup
        .iter()
        .map(|r| {
            (
                r[2].as_str(),
                number(&r[0]) as usize,
                number(&r[1]) as usize,
            )
        })
        .collect();
    assert_eq!(fields, kernel::SUPER, "table:super");
    assert_eq!(number(&sup[0][3]), kernel::WRITE_LOG_MAGIC);
    assert_eq!(dmlog::DM_MAGIC, kernel::WRITE_LOG_MAGIC);
    let magic_bytes: String = kernel::WRITE_LOG_MAGIC
        .to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        sup[0][3].contains(&format!("({magic_bytes})")),
        "{:?}",
        sup[0]
    );
    assert_eq!(number(&sup[1][3]), kernel::WRITE_LOG_VERSION);
    assert_eq!(dmlog::DM_VERSION, kernel::WRITE_LOG_VERSION);

    let entry = table("entry");
    let fields: Vec<_> = entry[..4]
        .iter()
        .map(|r| {
            (
                r[2].as_str(),
                number(&r[0]) as usize,
                number(&r[1]) as usize,
            )
        })
        .collect();
    assert_eq!(fields, kernel::ENTRY, "table:entry");
    assert_eq!(
        (entry[4][0].as_str(), entry[4][2].as_str()),
        ("32", "mark"),
        "a mark's name follows the 32-byte header"
    );
    assert_eq!(kernel::ENTRY_BYTES, 32);
    assert_eq!(dmlog::DM_ENTRY_HEADER_BYTES as usize, kernel::ENTRY_BYTES);
    assert_eq!(entry.len(), 5, "table:entry");

    let flags: Vec<(String, u64)> = table("flags")
        .iter()
        .map(|r| {
            let (bit, value) = (number(&r[0]), number(&r[1]));
            assert_eq!(value, 1 << bit, "{r:?}");
            (r[2].clone(), value)
        })
        .collect();
    let kernel_flags: Vec<_> = kernel::FLAGS
        .iter()
        .map(|&(n, v)| (n.to_string(), v))
        .collect();
    assert_eq!(flags, kernel_flags, "table:flags");
    let code = [
        ("FLUSH", dmlog::DM_FLUSH),
        ("FUA", dmlog::DM_FUA),
        ("DISCARD", dmlog::DM_DISCARD),
        ("MARK", dmlog::DM_MARK),
        ("METADATA", dmlog::DM_METADATA),
    ];
    for (name, value) in code {
        assert!(flags.contains(&(name.to_string(), value)), "DM_{name}");
    }

    // Each kind of entry the kernel writes, as the golden builder lays it out.
    let kinds = table("kinds");
    let names: Vec<_> = kinds.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["write", "flush", "discard", "mark"]);
    for r in &kinds {
        let flag = r[3].split([',', ' ']).next().unwrap();
        let want = match r[0].as_str() {
            "write" => "0",
            "flush" => "FLUSH",
            "discard" => "DISCARD",
            _ => "MARK",
        };
        assert_eq!(flag, want, "{r:?}");
    }

    // The limits the prose gives are the code's.
    for needle in [
        format!("`DM_SECTOR_BYTES_MAX` ({})", dmlog::DM_SECTOR_BYTES_MAX),
        format!(
            "`DM_ENTRY_DATA_BYTES_MAX` ({} MiB)",
            dmlog::DM_ENTRY_DATA_BYTES_MAX >> 20
        ),
        format!("at {} bytes", dmlog::mark_bytes_max(dmlog::DM_SECTOR_BYTES)),
        "`sectorsize - 33`".to_string(),
    ] {
        assert!(
            DOC.contains(&needle),
            "docs/dm-log-writes.md should say {needle}"
        );
    }
    assert_eq!(
        dmlog::mark_bytes_max(dmlog::DM_SECTOR_BYTES) as usize,
        kernel::mark_bytes_max(512)
    );
}

/// The export table names every kind of record the write log has, once.
#[test]
fn export_table_covers_every_record_kind() {
    let mut documented: Vec<String> = table("export")
        .iter()
        .flat_map(|r| r[0].split(", ").map(str::to_string).collect::<Vec<_>>())
        .collect();
    documented.sort();
    let mut kinds: Vec<String> = (0..=u8::MAX)
        .filter_map(RecordKind::from_u8)
        .map(|k| k.name().to_string())
        .collect();
    kinds.sort();
    assert_eq!(documented, kinds);
}
