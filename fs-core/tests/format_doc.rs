//! `docs/fs-core-format.md` and the code agree, in both directions:
//! - the document's example dumps decode with the code's decoders (and journal recovery) to
//!   exactly the values annotated beside them, each line's bytes read as little-endian say the
//!   same, and each checksum is what the document's rule computes;
//! - the code, building the same structures, encodes exactly the document's bytes;
//! - every structure table's offsets and sizes match the example lines and the code's
//!   constants, and blocks without an example (extent chain, bitmap) are read from the code's
//!   output at the offsets the tables give;
//! - every constant and magic the document names has the code's value, and the geometry rows
//!   and formula are what `Geometry::for_device` computes.
//!
//! A changed constant, field offset or encoding fails here until the document says the same.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use fs_core::block::{read_block_sync, BlockDevice, DeviceError, MemDevice, BLOCK_SIZE};
use fs_core::extent::FILE_BLOCKS_MAX;
use fs_core::ondisk::format::*;
use fs_core::ondisk::journal::{
    self, decode_journal_super, Journal, JournalBugs, JOURNAL_SUPER_CRC_BYTES,
};
use fs_core::ondisk::{self, fsck, COMMIT_HEADROOM_BLOCKS, COMMIT_INTERVAL_STEPS};

const DOC: &str = include_str!("../../docs/fs-core-format.md");

/// The example filesystem: device size and inodes, the names mkfs gives, and the inode whose
/// block the document dumps.
const EXAMPLE_BLOCKS: u64 = 256;
const EXAMPLE_INODES: u64 = 16;
const EXAMPLE_NAMES: [&str; 2] = ["f0", "notes.txt"];
const EXAMPLE_INO: u64 = 1;

// ---- reading the document ----

/// The text after `marker`, which must occur exactly once.
fn after(marker: &str) -> &'static str {
    let at = DOC
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} is not in the document"));
    assert!(
        !DOC[at + 1..].contains(marker),
        "{marker} is in the document twice"
    );
    &DOC[at + marker.len()..]
}

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

/// One row of a structure table.
#[derive(Debug, Clone)]
struct Row {
    offset: usize,
    /// Bytes of the field, or of one element when `array`.
    size: usize,
    field: String,
    array: bool,
}

fn number(cell: &str) -> usize {
    let tok = cell.split_whitespace().next().unwrap_or("");
    tok.parse()
        .unwrap_or_else(|_| panic!("{cell:?} does not start with a number"))
}

/// A structure table: offset, size, field.
fn layout(name: &str) -> Vec<Row> {
    table(name)
        .into_iter()
        .map(|r| {
            let field = r[2].clone();
            let array = field.ends_with("[i]");
            Row {
                offset: number(&r[0]),
                size: number(&r[1]),
                field: field.trim_end_matches("[i]").to_string(),
                array,
            }
        })
        .collect()
}

/// The tables that describe one example's kind of block, in order.
fn tables_of(kind: &str) -> [&str; 2] {
    assert!(KINDS.contains(&kind), "no example kind {kind}");
    ["header", kind]
}

/// The table describing one element of an array field.
fn element_table(field: &str) -> Option<&'static str> {
    match field {
        "extent" => Some("extent"),
        "slot" => Some("dir-slot"),
        "home" => None,
        _ => panic!("no element table for {field}[i]"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Int(u64),
    Text(String),
}

/// One annotated line (with its continuation lines) of an example dump.
#[derive(Debug)]
struct Line {
    at: usize,
    bytes: Vec<u8>,
    path: String,
    value: Option<Value>,
}

fn parse_value(rest: &str) -> Option<Value> {
    let rest = rest.trim();
    if let Some(s) = rest.strip_prefix('"') {
        let end = s.find('"').expect("closing quote");
        return Some(Value::Text(s[..end].to_string()));
    }
    let tok = rest.split_whitespace().next()?;
    if let Some(hex) = tok.strip_prefix("0x") {
        return Some(Value::Int(u64::from_str_radix(hex, 16).expect("hex value")));
    }
    tok.parse().ok().map(Value::Int)
}

/// The example block after `<!-- example:KIND -->`: its 4096 bytes (what the dump does not
/// show is zero) and its annotated lines.
fn example(kind: &str) -> (Vec<u8>, Vec<Line>) {
    let text = after(&format!("<!-- example:{kind} -->"));
    let start = text.find("```").expect("fenced block") + 3;
    let body = &text[start..];
    let body = &body[body.find('\n').unwrap() + 1..];
    let body = &body[..body.find("```").expect("closing fence")];
    let mut block = vec![0u8; BLOCK_SIZE];
    let mut shown = vec![false; BLOCK_SIZE];
    let mut lines: Vec<Line> = Vec::new();
    for l in body.lines() {
        let (dump, note) = l.split_once('|').expect("a '|' on every line");
        let (off, hex) = dump.split_once(':').expect("an offset column");
        let at = usize::from_str_radix(off.trim(), 16).expect("hex offset");
        let bytes: Vec<u8> = hex
            .split_whitespace()
            .map(|t| u8::from_str_radix(t, 16).unwrap_or_else(|_| panic!("bad hex {t:?}")))
            .collect();
        for (i, &b) in bytes.iter().enumerate() {
            assert!(!shown[at + i], "{kind}: byte {:#x} shown twice", at + i);
            shown[at + i] = true;
            block[at + i] = b;
        }
        let note = note.trim();
        if note.is_empty() {
            // A continuation of the line before.
            let prev = lines.last_mut().expect("a line to continue");
            assert_eq!(
                prev.at + prev.bytes.len(),
                at,
                "{kind}: gap in {}",
                prev.path
            );
            prev.bytes.extend(bytes);
            continue;
        }
        let (path, rest) = note.split_once(' ').unwrap_or((note, ""));
        lines.push(Line {
            at,
            bytes,
            path: path.to_string(),
            value: parse_value(rest),
        });
    }
    (block, lines)
}

// ---- the code's side ----

fn le(bytes: &[u8]) -> u64 {
    assert!(bytes.len() <= 8);
    bytes.iter().rev().fold(0, |v, &b| (v << 8) | u64::from(b))
}

fn magic_text(magic: u32) -> Value {
    Value::Text(String::from_utf8(magic.to_le_bytes().to_vec()).unwrap())
}

/// The document's constants table, by name.
fn doc_constants() -> BTreeMap<String, u64> {
    table("constants")
        .into_iter()
        .map(|r| (r[0].clone(), number(&r[1]) as u64))
        .collect()
}

/// The checksum by the document's rule: CRC-32C of the first `span` bytes with bytes 4..8
/// taken as zero. (Computed here, not by the code under test.)
fn doc_crc(block: &[u8], span: usize) -> u64 {
    let mut b = block[..span].to_vec();
    b[4..8].fill(0);
    u64::from(crc32c::crc32c(&b))
}

/// The header values of a block the code accepted at `home` as a `magic` block.
fn header(map: &mut HashMap<String, Value>, block: &[u8], magic: u32, home: u64, span: usize) {
    map.insert("magic".into(), magic_text(magic));
    map.insert("crc".into(), Value::Int(doc_crc(block, span)));
    map.insert("blockno".into(), Value::Int(home));
}

fn ints(map: &mut HashMap<String, Value>, fields: &[(&str, u64)]) {
    for &(k, v) in fields {
        map.insert(k.to_string(), Value::Int(v));
    }
}

/// The example filesystem's geometry, decoded by the code from the document's superblock.
fn example_geometry() -> Geometry {
    Geometry::decode(&example("superblock").0).expect("the document's superblock decodes")
}

/// Every example block, decoded by the code: kind -> field path -> value.
fn decoded() -> BTreeMap<&'static str, HashMap<String, Value>> {
    let mut out = BTreeMap::new();
    let full = BLOCK_SIZE;

    let (sb, _) = example("superblock");
    let g = Geometry::decode(&sb).expect("the document's superblock decodes");
    let mut m = HashMap::new();
    header(&mut m, &sb, MAGIC_SUPER, 0, full);
    ints(
        &mut m,
        &[
            ("version", u64::from(FORMAT_VERSION)),
            ("block_bytes", BLOCK_SIZE as u64),
            ("blocks", g.blocks),
            ("journal_start", g.journal_start),
            ("journal_blocks", g.journal_blocks),
            ("bitmap_start", g.bitmap_start),
            ("bitmap_blocks", g.bitmap_blocks),
            ("inode_start", g.inode_start),
            ("inodes", g.inodes),
            ("dir_start", g.dir_start),
            ("dir_blocks", g.dir_blocks),
            ("data_start", g.data_start),
        ],
    );
    out.insert("superblock", m);

    let (jsb, _) = example("journal-super");
    let span = doc_constants()["JOURNAL_SUPER_CRC_BYTES"] as usize;
    let (tail_seq, tail) = decode_journal_super(&g, &jsb).expect("journal superblock decodes");
    let mut m = HashMap::new();
    header(&mut m, &jsb, MAGIC_JOURNAL_SUPER, g.journal_start, span);
    ints(&mut m, &[("tail_seq", tail_seq), ("tail", tail)]);
    out.insert("journal-super", m);

    let (ib, _) = example("inode");
    let home = g.inode_block(EXAMPLE_INO);
    let (inode, chain) = DiskInode::decode(&ib, home, &mut |b| {
        panic!("the example inode has no chain, yet block {b} was read")
    })
    .expect("the document's inode decodes");
    let mut m = HashMap::new();
    header(&mut m, &ib, MAGIC_INODE, home, full);
    ints(
        &mut m,
        &[
            ("ino", u64::from(inode.ino)),
            ("flags", u64::from(inode.in_use)),
            ("generation", inode.generation),
            ("size", inode.size),
            ("nlink", u64::from(inode.nlink)),
            ("extent_count", inode.extents.len() as u64),
            ("mtime", inode.mtime),
            ("ctime", inode.ctime),
            ("extent_block", chain.first().copied().unwrap_or(0)),
        ],
    );
    for (i, e) in inode.extents.iter().enumerate() {
        let state = match e.state {
            DiskExtentState::Unwritten => EXTENT_UNWRITTEN,
            DiskExtentState::Written => EXTENT_WRITTEN,
        };
        ints(
            &mut m,
            &[
                (&format!("extent[{i}].file_block"), e.file_block),
                (&format!("extent[{i}].count"), u64::from(e.count)),
                (&format!("extent[{i}].state"), u64::from(state)),
                (&format!("extent[{i}].dev_block"), e.dev_block),
            ],
        );
    }
    out.insert("inode", m);

    let (db, _) = example("dir-block");
    let slots = decode_dir_block(&db, g.dir_start).expect("the document's directory decodes");
    let mut m = HashMap::new();
    header(&mut m, &db, MAGIC_DIR, g.dir_start, full);
    for (i, s) in slots.iter().enumerate() {
        if let Some(e) = s {
            ints(
                &mut m,
                &[
                    (&format!("slot[{i}].ino"), u64::from(e.ino)),
                    (&format!("slot[{i}].name_len"), e.name.len() as u64),
                ],
            );
            m.insert(format!("slot[{i}].name"), Value::Text(e.name.clone()));
        }
    }
    out.insert("dir-block", m);

    // The transaction, decoded by recovery: the five example blocks on a device.
    let (desc, _) = example("descriptor");
    let (commit, _) = example("commit");
    let desc_at = g.journal_start + tail;
    let mut disk: HashMap<u64, Vec<u8>> = HashMap::new();
    disk.insert(0, sb.clone());
    disk.insert(g.journal_start, jsb.clone());
    disk.insert(desc_at, desc.clone());
    disk.insert(desc_at + 1, db.clone());
    disk.insert(desc_at + 2, commit.clone());
    let (rec, homes) = replay(&g, &disk);
    assert_eq!(
        rec.replayed, 1,
        "recovery replays the document's transaction"
    );
    assert_eq!(
        homes,
        vec![(g.dir_start, db.clone())],
        "and writes its image home"
    );
    let count = homes.len() as u64;
    let mut m = HashMap::new();
    header(&mut m, &desc, MAGIC_DESCRIPTOR, desc_at, full);
    ints(&mut m, &[("seq", tail_seq), ("count", count)]);
    out.insert("descriptor", m);
    let mut m = HashMap::new();
    header(&mut m, &commit, MAGIC_COMMIT, desc_at + 1 + count, full);
    let txn = [desc.as_slice(), db.as_slice()].concat();
    ints(
        &mut m,
        &[
            ("seq", tail_seq),
            ("count", count),
            ("txn_crc", u64::from(crc32c::crc32c(&txn))),
        ],
    );
    for (i, (h, _)) in homes.iter().enumerate() {
        m.insert(format!("home[{i}]"), Value::Int(*h));
    }
    out.insert("commit", m);
    out
}

/// Runs journal recovery over `disk`: what it reports and the blocks it wrote home.
fn replay(g: &Geometry, disk: &HashMap<u64, Vec<u8>>) -> (journal::Recovery, Vec<(u64, Vec<u8>)>) {
    let mut homes = Vec::new();
    let mut read = |b: u64| -> Result<Vec<u8>, DeviceError> {
        Ok(disk.get(&b).cloned().unwrap_or(vec![0; BLOCK_SIZE]))
    };
    let mut write = |b: u64, data: Vec<u8>| -> Result<(), DeviceError> {
        homes.push((b, data));
        Ok(())
    };
    let rec = journal::recover(g, JournalBugs::default(), &mut read, &mut write).unwrap();
    (rec, homes)
}

const KINDS: [&str; 6] = [
    "superblock",
    "journal-super",
    "inode",
    "dir-block",
    "descriptor",
    "commit",
];

// ---- (a) the document's bytes decode as annotated ----

/// Each annotated value is what the code decodes from the document's own bytes, the line's
/// bytes say the same read little-endian, and every value the code decodes is annotated.
#[test]
fn document_examples_decode_as_annotated() {
    let decoded = decoded();
    for kind in KINDS {
        let (_, lines) = example(kind);
        let want = &decoded[kind];
        let mut seen = BTreeSet::new();
        for l in &lines {
            let here = format!("{kind} {:#06x} {}", l.at, l.path);
            match &l.value {
                Some(Value::Int(v)) => assert_eq!(le(&l.bytes), *v, "{here}: bytes vs annotation"),
                Some(Value::Text(t)) => assert_eq!(l.bytes, t.as_bytes(), "{here}: text"),
                None => {
                    assert!(l.path.ends_with("reserved"), "{here}: no value annotated");
                    assert!(
                        l.bytes.iter().all(|&b| b == 0),
                        "{here}: reserved, not zero"
                    );
                    continue;
                }
            }
            let code = want
                .get(&l.path)
                .unwrap_or_else(|| panic!("{here}: the code decodes no such field"));
            assert_eq!(
                l.value.as_ref(),
                Some(code),
                "{here}: annotation vs decoder"
            );
            seen.insert(l.path.clone());
        }
        for k in want.keys() {
            assert!(seen.contains(k), "{kind}: {k} is decoded but not annotated");
        }
    }
}

// ---- (b) the code writes the document's bytes ----

fn hexdump(block: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in block.chunks(8).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
            s += &format!("{:04x}: {}\n", i * 8, hex.join(" "));
        }
    }
    s
}

fn assert_block(kind: &str, code: &[u8]) {
    let (doc, _) = example(kind);
    assert!(
        code == doc.as_slice(),
        "the code writes this {kind} (non-zero 8-byte groups), not the document's:\n{}",
        hexdump(code)
    );
}

/// mkfs makes the document's superblock, journal superblock and directory block; the inode
/// record encodes to the document's inode block; committing the directory block writes the
/// document's descriptor, image and commit block.
#[test]
fn the_code_writes_the_document_bytes() {
    let mut dev = MemDevice::new(EXAMPLE_BLOCKS);
    let names: Vec<String> = EXAMPLE_NAMES.iter().map(|s| s.to_string()).collect();
    let g = ondisk::mkfs(&mut dev, EXAMPLE_INODES, &names).unwrap();
    assert_eq!(
        g,
        Geometry::for_device(EXAMPLE_BLOCKS, EXAMPLE_INODES).unwrap()
    );
    assert_block("superblock", &dev.block(0));
    assert_block("journal-super", &dev.block(g.journal_start));
    assert_block("dir-block", &dev.block(g.dir_start));

    let extent = |file_block, count, state, dev_block| DiskExtent {
        file_block,
        count,
        state,
        dev_block,
    };
    let inode = DiskInode {
        ino: EXAMPLE_INO as u32,
        in_use: true,
        generation: 1,
        size: 6000,
        nlink: 1,
        mtime: 5,
        ctime: 6,
        extents: vec![
            extent(0, 2, DiskExtentState::Written, g.data_start),
            extent(2, 1, DiskExtentState::Unwritten, g.data_start + 2),
        ],
    };
    let blocks = inode.encode(g.inode_block(EXAMPLE_INO), &[]);
    assert_eq!(blocks.len(), 1);
    assert_block("inode", &blocks[0].1);

    let image = dev.block(g.dir_start);
    let mut j = Journal::new(g, 1, 1, JournalBugs::default());
    j.commit(&mut dev, vec![(g.dir_start, image)]).unwrap();
    let desc_at = g.journal_start + 1;
    assert_block("descriptor", &dev.block(desc_at));
    assert_block("dir-block", &dev.block(desc_at + 1));
    assert_block("commit", &dev.block(desc_at + 2));
}

// ---- the tables ----

fn row<'a>(rows: &'a [Row], field: &str, table: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.field == field)
        .unwrap_or_else(|| panic!("table {table} has no field {field}"))
}

/// Where a field path (`blocks`, `extent[1].count`, `home[0]`) lies, by the tables.
fn resolve(kind: &str, path: &str) -> (usize, usize) {
    let rows: Vec<Row> = tables_of(kind).into_iter().flat_map(layout).collect();
    let (head, tail) = match path.split_once('.') {
        Some((h, t)) => (h, Some(t)),
        None => (path, None),
    };
    match head.split_once('[') {
        Some((name, idx)) => {
            let k: usize = idx.trim_end_matches(']').parse().expect("index");
            let r = row(&rows, name, kind);
            assert!(r.array, "{kind}: {name} is not an array");
            let base = r.offset + k * r.size;
            match (tail, element_table(name)) {
                (Some(t), Some(et)) => {
                    let sub = layout(et);
                    let s = row(&sub, t, et);
                    (base + s.offset, s.size)
                }
                (None, None) => (base, r.size),
                _ => panic!("{kind}: {path} does not fit the tables"),
            }
        }
        None => {
            assert!(tail.is_none(), "{kind}: {path}");
            let r = row(&rows, head, kind);
            assert!(!r.array, "{kind}: {head} is an array");
            (r.offset, r.size)
        }
    }
}

/// Every example line sits at the offset and has the size its table gives, and every field of
/// the tables (index 0 of arrays) is shown in the example.
#[test]
fn example_lines_match_the_tables() {
    for kind in KINDS {
        let (_, lines) = example(kind);
        for l in &lines {
            let (at, size) = resolve(kind, &l.path);
            assert_eq!(l.at, at, "{kind} {}: offset by the table", l.path);
            match l.value {
                Some(Value::Text(_)) => assert!(l.bytes.len() <= size, "{kind} {}", l.path),
                _ => assert_eq!(l.bytes.len(), size, "{kind} {}: size by the table", l.path),
            }
        }
        let shown: BTreeSet<&str> = lines.iter().map(|l| l.path.as_str()).collect();
        for t in tables_of(kind) {
            for r in layout(t) {
                let element = if r.array {
                    element_table(&r.field)
                } else {
                    None
                };
                let paths: Vec<String> = match (r.array, element) {
                    (false, _) => vec![r.field.clone()],
                    (true, None) => vec![format!("{}[0]", r.field)],
                    (true, Some(et)) => layout(et)
                        .into_iter()
                        .map(|s| format!("{}[0].{}", r.field, s.field))
                        .collect(),
                };
                for p in paths {
                    let optional = p.ends_with("reserved");
                    assert!(
                        optional || shown.contains(p.as_str()),
                        "{kind}: {p} not shown"
                    );
                }
            }
        }
    }
}

/// The tables' fields follow each other without gap or overlap, and their offsets and sizes
/// are the code's constants.
#[test]
fn tables_agree_with_the_code_constants() {
    let end = |rows: &[Row]| {
        let last = rows.last().unwrap();
        last.offset + last.size
    };
    for name in [
        "header",
        "superblock",
        "bitmap",
        "inode",
        "extent",
        "extent-block",
        "dir-block",
        "dir-slot",
        "journal-super",
        "descriptor",
        "commit",
    ] {
        let rows = layout(name);
        let first = if matches!(name, "header" | "extent" | "dir-slot") {
            0
        } else {
            HEADER_BYTES
        };
        assert_eq!(rows[0].offset, first, "{name} starts at {first}");
        for w in rows.windows(2) {
            if !w[1].array {
                assert_eq!(
                    w[1].offset,
                    w[0].offset + w[0].size,
                    "{name}: {}",
                    w[1].field
                );
            }
        }
        assert!(
            rows.iter().rev().skip(1).all(|r| !r.array),
            "{name}: only the last field is an array"
        );
    }
    let inode = layout("inode");
    let ext = row(&inode, "extent", "inode");
    assert_eq!((ext.offset, ext.size), (INODE_EXTENTS_AT, EXTENT_BYTES));
    assert_eq!(end(&layout("extent")), EXTENT_BYTES);
    let xb = layout("extent-block");
    let ext = row(&xb, "extent", "extent-block");
    assert_eq!(
        (ext.offset, ext.size),
        (EXTENT_BLOCK_EXTENTS_AT, EXTENT_BYTES)
    );
    assert_eq!(end(&layout("header")), HEADER_BYTES);
    let db = layout("dir-block");
    let slot = row(&db, "slot", "dir-block");
    assert_eq!((slot.offset, slot.size), (HEADER_BYTES, DIR_SLOT_BYTES));
    let ds = layout("dir-slot");
    assert_eq!(end(&ds), DIR_SLOT_BYTES);
    assert_eq!(row(&ds, "name", "dir-slot").size, NAME_BYTES_MAX + 1);
    let commit = layout("commit");
    let homes = row(&commit, "home", "commit");
    assert_eq!((homes.offset, homes.size), (COMMIT_HOMES_AT, 8));
    let bits = layout("bitmap");
    let b = row(&bits, "bits", "bitmap");
    assert_eq!(b.offset, HEADER_BYTES);
    assert_eq!(b.size as u64 * 8, BITS_PER_BITMAP_BLOCK);
    assert_eq!(b.offset + b.size, BLOCK_SIZE);
}

/// The extent-chain block (no dump in the document) holds what its table says where it says:
/// read from the code's encoding of an inode with a two-block chain.
#[test]
fn extent_chain_blocks_are_laid_out_as_the_table_says() {
    let extents: Vec<DiskExtent> = (0..400u64)
        .map(|i| DiskExtent {
            file_block: 2 * i,
            count: 1 + (i % 3) as u32,
            state: if i % 2 == 0 {
                DiskExtentState::Written
            } else {
                DiskExtentState::Unwritten
            },
            dev_block: 1000 + 5 * i,
        })
        .collect();
    let inode = DiskInode {
        ino: 3,
        in_use: true,
        nlink: 1,
        extents: extents.clone(),
        ..DiskInode::default()
    };
    let chain = [700u64, 650];
    let blocks = inode.encode(20, &chain);
    let rows: Vec<Row> = ["header", "extent-block"]
        .into_iter()
        .flat_map(layout)
        .collect();
    let er = layout("extent");
    let at = |name: &str| row(&rows, name, "extent-block").offset;
    let field = |b: &[u8], base: usize, name: &str| {
        let r = row(&er, name, "extent");
        le(&b[base + r.offset..base + r.offset + r.size])
    };
    let inode_rows = layout("inode");
    let ib = &blocks[0].1;
    let ir = |name: &str| row(&inode_rows, name, "inode").offset;
    assert_eq!(le(&ib[ir("extent_count")..ir("extent_count") + 4]), 400);
    assert_eq!(
        le(&ib[ir("extent_block")..ir("extent_block") + 8]),
        chain[0]
    );
    let mut next_extent = INODE_EXTENTS_MAX;
    for (k, (home, b)) in blocks[1..].iter().enumerate() {
        assert_eq!(*home, chain[k]);
        assert_eq!(
            le(&b[at("magic")..at("magic") + 4]),
            u64::from(MAGIC_EXTENT)
        );
        assert_eq!(le(&b[at("blockno")..at("blockno") + 8]), chain[k]);
        let next = chain.get(k + 1).copied().unwrap_or(0);
        assert_eq!(le(&b[at("next")..at("next") + 8]), next);
        let count = le(&b[at("count")..at("count") + 4]) as usize;
        let want = (400 - next_extent).min(EXTENT_BLOCK_EXTENTS_MAX);
        assert_eq!(count, want, "every chain block but the last is full");
        assert!(b[at("reserved")..at("reserved") + 4]
            .iter()
            .all(|&x| x == 0));
        for i in 0..count {
            let base = at("extent") + i * EXTENT_BYTES;
            let e = extents[next_extent + i];
            assert_eq!(field(b, base, "file_block"), e.file_block);
            assert_eq!(field(b, base, "count"), u64::from(e.count));
            assert_eq!(field(b, base, "dev_block"), e.dev_block);
        }
        next_extent += count;
    }
    assert_eq!(next_extent, 400);
}

/// The bitmap (no dump in the document): bit `i % 8` of byte `16 + i / 8` is block `i`, set
/// for every block below `data_start` after mkfs, and zero past the device's end.
#[test]
fn bitmap_bits_are_where_the_document_says() {
    let mut dev = MemDevice::new(EXAMPLE_BLOCKS);
    let g = ondisk::mkfs(&mut dev, EXAMPLE_INODES, &[]).unwrap();
    let b = dev.block(g.bitmap_start);
    let bits = row(&layout("bitmap"), "bits", "bitmap").offset;
    for blk in 0..(BLOCK_SIZE - bits) * 8 {
        let set = b[bits + blk / 8] & (1 << (blk % 8)) != 0;
        assert_eq!(set, (blk as u64) < g.data_start, "block {blk}");
    }
}

// ---- (c) constants, magics, geometry ----

/// Every constant in the document's table has the code's value, the table names every
/// constant the test holds, and every constant-like name anywhere in the document is one of
/// them.
#[test]
fn constants_in_the_document_are_the_code_s() {
    let code: BTreeMap<&str, u64> = [
        ("BLOCK_SIZE", BLOCK_SIZE as u64),
        ("FORMAT_VERSION", u64::from(FORMAT_VERSION)),
        ("HEADER_BYTES", HEADER_BYTES as u64),
        ("BITS_PER_BITMAP_BLOCK", BITS_PER_BITMAP_BLOCK),
        ("EXTENT_BYTES", EXTENT_BYTES as u64),
        ("INODE_EXTENTS_AT", INODE_EXTENTS_AT as u64),
        ("INODE_EXTENTS_MAX", INODE_EXTENTS_MAX as u64),
        ("EXTENT_BLOCK_EXTENTS_AT", EXTENT_BLOCK_EXTENTS_AT as u64),
        ("EXTENT_BLOCK_EXTENTS_MAX", EXTENT_BLOCK_EXTENTS_MAX as u64),
        ("INODE_IN_USE", u64::from(INODE_IN_USE)),
        ("EXTENT_UNWRITTEN", u64::from(EXTENT_UNWRITTEN)),
        ("EXTENT_WRITTEN", u64::from(EXTENT_WRITTEN)),
        ("NAME_BYTES_MAX", NAME_BYTES_MAX as u64),
        ("DIR_SLOT_BYTES", DIR_SLOT_BYTES as u64),
        ("DIR_SLOTS_PER_BLOCK", DIR_SLOTS_PER_BLOCK as u64),
        ("JOURNAL_SUPER_CRC_BYTES", JOURNAL_SUPER_CRC_BYTES as u64),
        ("COMMIT_HOMES_AT", COMMIT_HOMES_AT as u64),
        ("TRANSACTION_BLOCKS_MAX", TRANSACTION_BLOCKS_MAX as u64),
        ("JOURNAL_BLOCKS_MIN", JOURNAL_BLOCKS_MIN),
        ("JOURNAL_BLOCKS_MAX", JOURNAL_BLOCKS_MAX),
        ("INODES_MAX", INODES_MAX),
        ("DATA_BLOCKS_MIN", DATA_BLOCKS_MIN),
        ("FILE_BLOCKS_MAX", FILE_BLOCKS_MAX),
        ("COMMIT_INTERVAL_STEPS", COMMIT_INTERVAL_STEPS),
        ("COMMIT_HEADROOM_BLOCKS", COMMIT_HEADROOM_BLOCKS as u64),
        ("PROBLEMS_MAX", fsck::PROBLEMS_MAX as u64),
    ]
    .into_iter()
    .collect();
    let doc = doc_constants();
    for (name, value) in &code {
        assert_eq!(
            doc.get(*name),
            Some(value),
            "{name} is {value} in the code; the constants table must say so"
        );
    }
    for name in doc.keys() {
        assert!(
            code.contains_key(name.as_str()),
            "the test does not hold {name}"
        );
    }
    let magics: BTreeSet<&str> = MAGICS.iter().map(|m| m.0).collect();
    // Backticked names like `INODE_EXTENTS_AT` anywhere in the text.
    for (i, span) in DOC.split('`').enumerate() {
        let constant_like = span.contains('_')
            && span
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && span.starts_with(|c: char| c.is_ascii_uppercase());
        if i % 2 == 1 && constant_like {
            assert!(
                code.contains_key(span) || magics.contains(span),
                "the document names {span}, which this test does not hold to the code"
            );
        }
    }
}

const MAGICS: [(&str, u32); 8] = [
    ("MAGIC_SUPER", MAGIC_SUPER),
    ("MAGIC_BITMAP", MAGIC_BITMAP),
    ("MAGIC_INODE", MAGIC_INODE),
    ("MAGIC_EXTENT", MAGIC_EXTENT),
    ("MAGIC_DIR", MAGIC_DIR),
    ("MAGIC_JOURNAL_SUPER", MAGIC_JOURNAL_SUPER),
    ("MAGIC_DESCRIPTOR", MAGIC_DESCRIPTOR),
    ("MAGIC_COMMIT", MAGIC_COMMIT),
];

/// The magics table gives each kind's constant as text, bytes and `u32`, as the code has it.
#[test]
fn magics_in_the_document_are_the_code_s() {
    let rows = table("magics");
    assert_eq!(rows.len(), MAGICS.len(), "one row per magic");
    for (name, value) in MAGICS {
        let r = rows
            .iter()
            .find(|r| r[1] == name)
            .unwrap_or_else(|| panic!("no row for {name}"));
        let bytes = value.to_le_bytes();
        assert_eq!(Value::Text(r[2].clone()), magic_text(value), "{name} text");
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(r[3], hex.join(" "), "{name} bytes");
        assert_eq!(r[4], format!("{value:#010x}"), "{name} as u32");
    }
}

/// Each row of the geometry table is what `Geometry::for_device` makes (or refuses).
#[test]
fn geometry_rows_are_what_for_device_makes() {
    for r in table("geometry") {
        let (blocks, inodes) = (number(&r[0]) as u64, number(&r[1]) as u64);
        let got = Geometry::for_device(blocks, inodes);
        if r[2] == "too small" {
            assert!(got.is_err(), "{blocks} blocks, {inodes} inodes is refused");
            continue;
        }
        let g = got.unwrap();
        let cells: Vec<u64> = r[2..9].iter().map(|c| number(c) as u64).collect();
        let code = [
            g.journal_blocks,
            g.bitmap_start,
            g.bitmap_blocks,
            g.inode_start,
            g.dir_start,
            g.dir_blocks,
            g.data_start,
        ];
        assert_eq!(cells, code, "{blocks} blocks, {inodes} inodes");
    }
}

/// The document's layout formula, written out here from the page, gives the code's layout
/// for every device size and inode count on a grid (an independent model of `for_device`).
#[test]
fn the_document_s_geometry_formula_is_the_code_s() {
    let c = doc_constants();
    let formula = |blocks: u64, inodes: u64| -> Option<[u64; 9]> {
        if inodes == 0 || inodes > c["INODES_MAX"] {
            return None;
        }
        let bitmap_blocks = blocks.div_ceil(c["BITS_PER_BITMAP_BLOCK"]).max(1);
        let dir_blocks = inodes.div_ceil(c["DIR_SLOTS_PER_BLOCK"]);
        let metadata = bitmap_blocks + inodes + dir_blocks;
        let journal_blocks = c["JOURNAL_BLOCKS_MAX"].min(
            (blocks / 16)
                .max(c["JOURNAL_BLOCKS_MIN"])
                .max((metadata + 4).min(c["TRANSACTION_BLOCKS_MAX"] + 3)),
        );
        let bitmap_start = 1 + journal_blocks;
        let inode_start = bitmap_start + bitmap_blocks;
        let dir_start = inode_start + inodes;
        let data_start = dir_start + dir_blocks;
        (data_start + c["DATA_BLOCKS_MIN"] <= blocks).then_some([
            blocks,
            journal_blocks,
            bitmap_start,
            bitmap_blocks,
            inode_start,
            inodes,
            dir_start,
            dir_blocks,
            data_start,
        ])
    };
    for blocks in (0..200_000u64).step_by(997).chain([48, 49, 50, 1 << 20]) {
        for inodes in [0, 1, 15, 16, 17, 64, 431, 1000, 4096, 4097] {
            let code = Geometry::for_device(blocks, inodes).ok().map(|g| {
                assert_eq!(g.journal_start, 1);
                [
                    g.blocks,
                    g.journal_blocks,
                    g.bitmap_start,
                    g.bitmap_blocks,
                    g.inode_start,
                    g.inodes,
                    g.dir_start,
                    g.dir_blocks,
                    g.data_start,
                ]
            });
            assert_eq!(
                code,
                formula(blocks, inodes),
                "{blocks} blocks, {inodes} inodes"
            );
        }
    }
}

// ---- the protocol claims the document makes about its own example ----

/// The document's check value for CRC-32C is the crate's.
#[test]
fn crc32c_is_the_document_s() {
    let needle = "`123456789` is `0xe3069283`";
    assert!(DOC.contains(needle), "the document gives the check value");
    assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
}

/// Torn at sector granularity, as the document says: a commit block whose later sectors are
/// lost is not replayed; a journal superblock whose later sectors hold anything still decodes.
#[test]
fn torn_writes_of_the_example_behave_as_documented() {
    let g = example_geometry();
    let span = doc_constants()["JOURNAL_SUPER_CRC_BYTES"] as usize;
    let (mut jsb, _) = example("journal-super");
    jsb[span..].fill(0xa5);
    assert_eq!(decode_journal_super(&g, &jsb), Ok((1, 1)));
    let mut torn = jsb.clone();
    torn[span - 1] ^= 1;
    assert!(
        decode_journal_super(&g, &torn).is_err(),
        "the first sector is checked"
    );

    let disk = |commit: Vec<u8>| {
        let mut d = HashMap::new();
        d.insert(g.journal_start, example("journal-super").0);
        d.insert(g.journal_start + 1, example("descriptor").0);
        d.insert(g.journal_start + 2, example("dir-block").0);
        d.insert(g.journal_start + 3, commit);
        d
    };
    let (commit, _) = example("commit");
    assert_eq!(replay(&g, &disk(commit.clone())).0.replayed, 1);
    let mut lost = commit.clone();
    lost[COMMIT_HOMES_AT..].fill(0);
    let (rec, homes) = replay(&g, &disk(lost));
    assert_eq!(
        (rec.replayed, homes.len()),
        (0, 0),
        "a torn commit is not replayed"
    );
}

/// The example filesystem made by mkfs mounts, passes fsck and unmounts (so the example is a
/// filesystem, not only blocks).
#[test]
fn the_example_filesystem_mounts_and_checks_clean() {
    let mut dev = MemDevice::new(EXAMPLE_BLOCKS);
    let names: Vec<String> = EXAMPLE_NAMES.iter().map(|s| s.to_string()).collect();
    ondisk::mkfs(&mut dev, EXAMPLE_INODES, &names).unwrap();
    let mut boxed: Box<dyn BlockDevice> = Box::new(dev);
    let report = fsck::check(&mut |b| read_block_sync(boxed.as_mut(), b));
    assert!(report.clean(), "{:?}", report.problems);
    assert_eq!(report.names, EXAMPLE_NAMES.len());
    let fs = ondisk::mount(fs_core::Config::default(), boxed).unwrap();
    assert_eq!(fs.lookup("notes.txt"), Some(1));
    fs.unmount().unwrap();
}
