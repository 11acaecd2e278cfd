//! A write log as a timeline: records in log order along the x axis, in lanes for the epochs
//! (cut by flushes and power cuts), the writes (coloured by their fate), FUA, flushes, marks
//! and the crash point, and a lane showing where on the disk each write landed. A write's
//! fate is what a power cut record gave it (survived, tore, dropped); a write no power cut
//! lists was durable when the cut came; with no power cut after it, a write after the last
//! flush is "not yet flushed" (a crash at the log's end may lose it).
//!
//! `--highlight-byte N` (the block that holds a wrong byte) outlines the writes that cover
//! disk byte N and draws the byte's line across the disk lane.

use super::draw::{Canvas, LANE_HEIGHT_PX, LANE_LABEL_WIDTH_PX, LEGEND_HEIGHT_PX};
use super::text::clip;
use super::ReportError;
use nbd_server::log::{
    decode_payload, Fate, FaultPayload, FlushPayload, LogError, LogReader, PowerCutPayload, Record,
    RecordKind,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Records drawn per timeline; the page says when a log has more.
pub const RECORDS_DRAWN_MAX: usize = 1500;
/// Width of one record.
pub const RECORD_WIDTH_PX: u32 = 10;
/// Height of the lane that shows where on the disk each write landed.
pub const DISK_LANE_HEIGHT_PX: u32 = 90;
/// Characters of a mark's name drawn (the full name is in its tooltip).
pub const MARK_LABEL_CHARS_MAX: usize = 16;
/// Room right of the last record, for the crash point's label.
pub const LOG_RIGHT_MARGIN_PX: u32 = 320;

/// What became of a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteFate {
    /// Flushed, or FUA, before any crash the log records.
    Durable,
    /// After the last flush with no power cut after it: a crash at the log's end may lose it.
    NotFlushed,
    /// A power cut found it pending and it survived.
    Survived,
    /// A power cut tore it: only these byte ranges landed.
    Torn(Vec<(u64, u64)>),
    /// A power cut dropped it.
    Dropped,
    /// After the crash point of the crash state drawn: not in it.
    AfterCrash,
}

/// A record drawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemKind {
    /// A write, trim or zero write (`what` says which).
    Write {
        what: &'static str,
        fua: bool,
        fate: WriteFate,
    },
    Flush {
        in_flight: usize,
    },
    Mark(String),
    PowerCut,
    /// A fault or a full record, in words.
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub seq: u64,
    pub kind: ItemKind,
    pub offset: u64,
    pub length: u64,
    /// Epochs are counted from 0; a flush or a power cut ends one.
    pub epoch: usize,
}

/// A write log ready to draw.
#[derive(Clone, Debug)]
pub struct LogTimeline {
    pub name: String,
    pub disk_bytes: u64,
    /// The first `RECORDS_DRAWN_MAX` records.
    pub items: Vec<Item>,
    /// Records in the log.
    pub records: u64,
    /// A disk byte to show (the one that holds a wrong byte).
    pub highlight: Option<u64>,
    /// A crash point other than the log's power cuts (a crash state's): the item it comes
    /// before, and what it is.
    pub crash_at: Option<(usize, String)>,
    /// Each write's role in fs-core's format, by sequence number (empty: not drawn).
    pub roles: BTreeMap<u64, String>,
}

/// What a first pass over the log learns: each power cut's fates, and the last flush and
/// power cut.
#[derive(Default)]
struct Fates {
    fates: BTreeMap<u64, (Fate, Vec<(u64, u64)>)>,
    last_flush: Option<u64>,
    last_cut: Option<u64>,
    records: u64,
}

fn log_error(path: &Path) -> impl Fn(LogError) -> ReportError + '_ {
    move |source| ReportError::Log {
        path: path.to_path_buf(),
        source,
    }
}

fn fates(path: &Path) -> Result<Fates, ReportError> {
    let err = log_error(path);
    let mut reader = LogReader::open(path).map_err(&err)?;
    let payloads = LogReader::open(path).map_err(&err)?;
    let mut f = Fates::default();
    for rec in reader.by_ref() {
        let rec = rec.map_err(&err)?;
        f.records += 1;
        match rec.kind {
            RecordKind::Flush => f.last_flush = Some(rec.seq()),
            RecordKind::PowerCut => {
                let p: PowerCutPayload =
                    decode_payload(&payloads.read_payload(&rec).map_err(&err)?).map_err(&err)?;
                for w in p.fates {
                    f.fates.insert(w.seq, (w.fate, w.pieces));
                }
                f.last_cut = Some(rec.seq());
            }
            _ => {}
        }
    }
    Ok(f)
}

impl Fates {
    fn of(&self, seq: u64, fua: bool) -> WriteFate {
        match self.fates.get(&seq) {
            Some((Fate::Dropped, _)) => WriteFate::Dropped,
            Some((Fate::Kept, _)) => WriteFate::Survived,
            Some((Fate::Torn, p)) => WriteFate::Torn(p.clone()),
            None if fua || self.last_cut.is_some_and(|c| c > seq) => WriteFate::Durable,
            None if self.last_flush.is_some_and(|f| f > seq) => WriteFate::Durable,
            None => WriteFate::NotFlushed,
        }
    }
}

/// Reads the log at `path` for drawing.
pub fn read_log(path: &Path, highlight: Option<u64>) -> Result<LogTimeline, ReportError> {
    let err = log_error(path);
    let fates = fates(path)?;
    let mut reader = LogReader::open(path).map_err(&err)?;
    let payloads = LogReader::open(path).map_err(&err)?;
    let disk_bytes = reader.disk_bytes();
    let mut items = Vec::new();
    let mut epoch = 0;
    for rec in reader.by_ref().take(RECORDS_DRAWN_MAX) {
        let rec = rec.map_err(&err)?;
        let kind = item_kind(&rec, &payloads, &fates).map_err(&err)?;
        let ends_epoch = matches!(kind, ItemKind::Flush { .. } | ItemKind::PowerCut);
        items.push(Item {
            seq: rec.seq(),
            kind,
            offset: rec.header.offset,
            length: rec.header.length,
            epoch,
        });
        epoch += usize::from(ends_epoch);
    }
    Ok(LogTimeline {
        name: path.display().to_string(),
        disk_bytes,
        items,
        records: fates.records,
        highlight,
        crash_at: None,
        roles: BTreeMap::new(),
    })
}

fn item_kind(rec: &Record, payloads: &LogReader, fates: &Fates) -> Result<ItemKind, LogError> {
    let write = |what| ItemKind::Write {
        what,
        fua: rec.header.fua(),
        fate: fates.of(rec.seq(), rec.header.fua()),
    };
    Ok(match rec.kind {
        RecordKind::Write => write("write"),
        RecordKind::Trim => write("trim"),
        RecordKind::WriteZeroes => write("write zeroes"),
        RecordKind::Flush => {
            let p: FlushPayload = decode_payload(&payloads.read_payload(rec)?)?;
            ItemKind::Flush {
                in_flight: p.in_flight.len(),
            }
        }
        RecordKind::Mark => {
            ItemKind::Mark(String::from_utf8_lossy(&payloads.read_payload(rec)?).into_owned())
        }
        RecordKind::PowerCut => ItemKind::PowerCut,
        RecordKind::Fault => {
            let p: FaultPayload = decode_payload(&payloads.read_payload(rec)?)?;
            let what = if p.fault == 1 { "EIO" } else { "latency" };
            ItemKind::Other(format!("fault ({what}) on request {}", p.request))
        }
        RecordKind::Full => ItemKind::Other("the log is full".into()),
    })
}

/// The colour of a fate, and what it stands for (the legend).
pub fn fate_style(f: &WriteFate) -> (&'static str, &'static str) {
    match f {
        WriteFate::Durable => ("#2e7d32", "durable (flushed or FUA)"),
        WriteFate::NotFlushed => ("#9ca3af", "not yet flushed"),
        WriteFate::Survived => ("#60a5fa", "pending at the crash, survived"),
        WriteFate::Torn(_) => ("#f59e0b", "torn by the crash"),
        WriteFate::Dropped => ("#dc2626", "dropped by the crash"),
        WriteFate::AfterCrash => ("#e5e7eb", "after the crash point"),
    }
}

/// Lanes of a log timeline, top to bottom (then the role lane, when roles are known, and
/// the disk lane).
pub const LOG_LANES: [&str; 6] = ["epochs", "writes", "FUA", "flushes", "marks", "crash"];
/// The lane of fs-core roles.
pub const ROLE_LANE: &str = "role (fs-core)";

/// Where the lanes are.
struct Geometry {
    top: f64,
    lanes: Vec<&'static str>,
}

impl Geometry {
    fn x(&self, i: usize) -> f64 {
        LANE_LABEL_WIDTH_PX as f64 + (i as u32 * RECORD_WIDTH_PX) as f64
    }
    fn lane(&self, name: &str) -> f64 {
        let row = self.lanes.iter().position(|l| *l == name).unwrap_or(0);
        self.top + (row as u32 * LANE_HEIGHT_PX) as f64
    }
    fn disk_top(&self) -> f64 {
        self.top + (self.lanes.len() as u32 * LANE_HEIGHT_PX) as f64
    }
    fn bottom(&self) -> f64 {
        self.disk_top() + DISK_LANE_HEIGHT_PX as f64
    }
}

/// The timeline as one SVG document (`class="timeline log-timeline"`).
pub fn render_svg(t: &LogTimeline) -> String {
    let mut lanes = LOG_LANES.to_vec();
    if !t.roles.is_empty() {
        lanes.push(ROLE_LANE);
    }
    let geo = Geometry {
        top: (2 * LEGEND_HEIGHT_PX) as f64,
        lanes,
    };
    let width = geo.x(t.items.len()) as u32 + LOG_RIGHT_MARGIN_PX;
    let height = geo.bottom() as u32 + LEGEND_HEIGHT_PX + 8;
    let title = format!(
        "write log {}: {} of {} records",
        t.name,
        t.items.len(),
        t.records
    );
    let mut c = Canvas::new(width, height, &title);
    legend(&mut c, !t.roles.is_empty());
    for (row, name) in geo.lanes.iter().chain(["where on disk"].iter()).enumerate() {
        let y = geo.top + (row as u32 * LANE_HEIGHT_PX) as f64;
        let h = if row == geo.lanes.len() {
            DISK_LANE_HEIGHT_PX
        } else {
            LANE_HEIGHT_PX
        };
        let shade = if row % 2 == 0 { "#f3f4f6" } else { "#ffffff" };
        c.rect(0.0, y, c.width() as f64, h as f64, shade, "");
        c.text(6.0, y + 17.0, name, 12, "start", "#111");
    }
    epochs(&mut c, t, &geo);
    for (i, item) in t.items.iter().enumerate() {
        draw_item(&mut c, t, &geo, i, item);
    }
    crash_point(&mut c, t, &geo);
    highlight(&mut c, t, &geo);
    axis(&mut c, t, &geo);
    c.finish("timeline log-timeline")
}

fn legend(c: &mut Canvas, roles: bool) {
    let mut x = 6.0;
    for f in [
        WriteFate::Durable,
        WriteFate::NotFlushed,
        WriteFate::Survived,
        WriteFate::Torn(Vec::new()),
        WriteFate::Dropped,
        WriteFate::AfterCrash,
    ] {
        let (fill, what) = fate_style(&f);
        x = c.legend(x, 16.0, fill, what);
    }
    let mut x = 6.0;
    for (fill, what) in [
        ("#111827", "FUA"),
        ("#374151", "flush"),
        ("#0e7490", "mark"),
        ("#b91c1c", "power cut (crash point)"),
        ("#db2777", "highlighted byte"),
    ] {
        x = c.legend(x, 16.0 + LEGEND_HEIGHT_PX as f64, fill, what);
    }
    if roles {
        for role in ["data", "metadata", "journal"] {
            x = c.legend(x, 16.0 + LEGEND_HEIGHT_PX as f64, role_colour(role), role);
        }
    }
}

fn epochs(c: &mut Canvas, t: &LogTimeline, geo: &Geometry) {
    let y = geo.lane("epochs");
    let mut start = 0;
    while start < t.items.len() {
        let e = t.items[start].epoch;
        let end = (start..t.items.len())
            .find(|&i| t.items[i].epoch != e)
            .unwrap_or(t.items.len());
        let fill = if e.is_multiple_of(2) {
            "#c7d2fe"
        } else {
            "#e0e7ff"
        };
        let (x0, x1) = (geo.x(start), geo.x(end));
        let tip = format!(
            "epoch {e}: records {} to {}",
            t.items[start].seq,
            t.items[end - 1].seq
        );
        c.rect(
            x0,
            y + 4.0,
            x1 - x0 - 1.0,
            LANE_HEIGHT_PX as f64 - 8.0,
            fill,
            &tip,
        );
        if x1 - x0 > 40.0 {
            c.text(
                x0 + 3.0,
                y + 17.0,
                &format!("epoch {e}"),
                10,
                "start",
                "#1e1b4b",
            );
        }
        start = end;
    }
}

fn covers(item: &Item, byte: u64) -> bool {
    (item.offset..item.offset.saturating_add(item.length)).contains(&byte)
}

/// A write: its fate in the writes lane, FUA, its place on the disk, its role, and an
/// outline when it covers the highlighted byte.
fn draw_write(
    c: &mut Canvas,
    t: &LogTimeline,
    geo: &Geometry,
    x: f64,
    item: &Item,
    (what, fua, fate): (&str, bool, &WriteFate),
) {
    let w = RECORD_WIDTH_PX as f64 - 2.0;
    let h = LANE_HEIGHT_PX as f64;
    let (fill, meaning) = fate_style(fate);
    let mut tip = format!(
        "record {}: {what} of {} bytes at byte {}{}, {meaning}",
        item.seq,
        item.length,
        item.offset,
        if fua { " (FUA)" } else { "" }
    );
    if let WriteFate::Torn(p) = fate {
        tip.push_str(&format!("; landed: {p:?}"));
    }
    c.rect(x + 1.0, geo.lane("writes") + 5.0, w, h - 10.0, fill, &tip);
    if fua {
        let y = geo.lane("FUA");
        let diamond = [
            (x + 5.0, y + 5.0),
            (x + 9.0, y + 13.0),
            (x + 5.0, y + 21.0),
            (x + 1.0, y + 13.0),
        ];
        c.polygon(&diamond, "#111827", &tip);
    }
    disk_bar(c, t, geo, x, item, fill, &tip);
    if let Some(role) = t.roles.get(&item.seq) {
        let y = geo.lane(ROLE_LANE);
        let tip = format!("record {}: {role}", item.seq);
        c.rect(x + 1.0, y + 5.0, w, h - 10.0, role_colour(role), &tip);
    }
    if t.highlight.is_some_and(|b| covers(item, b)) {
        c.frame(
            x,
            geo.lane("writes") + 3.0,
            w + 2.0,
            h - 6.0,
            "#db2777",
            &tip,
        );
    }
}

fn draw_item(c: &mut Canvas, t: &LogTimeline, geo: &Geometry, i: usize, item: &Item) {
    let x = geo.x(i);
    let w = RECORD_WIDTH_PX as f64 - 2.0;
    let h = LANE_HEIGHT_PX as f64;
    match &item.kind {
        ItemKind::Write { what, fua, fate } => draw_write(c, t, geo, x, item, (what, *fua, fate)),
        ItemKind::Flush { in_flight } => {
            let tip = format!("record {}: flush ({in_flight} writes in flight)", item.seq);
            c.rect(
                x + 3.0,
                geo.lane("flushes") + 3.0,
                4.0,
                h - 6.0,
                "#374151",
                &tip,
            );
        }
        ItemKind::Mark(name) => {
            let y = geo.lane("marks");
            let tip = format!("record {}: mark {name}", item.seq);
            c.polygon(
                &[(x + 1.0, y + 4.0), (x + 9.0, y + 8.0), (x + 1.0, y + 12.0)],
                "#0e7490",
                &tip,
            );
            c.text(
                x + 1.0,
                y + 23.0,
                &clip(name, MARK_LABEL_CHARS_MAX),
                9,
                "start",
                "#0e7490",
            );
        }
        ItemKind::PowerCut => {
            let tip = format!("record {}: power cut", item.seq);
            c.line((x + 5.0, geo.top), (x + 5.0, geo.bottom()), "#b91c1c", true);
            c.rect(
                x + 1.0,
                geo.lane("crash") + 3.0,
                w,
                h - 6.0,
                "#b91c1c",
                &tip,
            );
        }
        ItemKind::Other(what) => {
            let tip = format!("record {}: {what}", item.seq);
            c.rect(
                x + 1.0,
                geo.lane("crash") + 8.0,
                w,
                h - 16.0,
                "#a8a8a8",
                &tip,
            );
        }
    }
}

/// The colour of an fs-core role: data, journal, or metadata in place.
pub fn role_colour(role: &str) -> &'static str {
    if role.starts_with("journal") {
        "#7b5ea7"
    } else if role == "data" {
        "#52a447"
    } else if role.split(", ").any(|r| r == "data") {
        "#8fbf7f"
    } else {
        "#2f6fcf"
    }
}

/// A write's range drawn in the disk lane (at least 2 px tall, so small writes show).
fn disk_bar(
    c: &mut Canvas,
    t: &LogTimeline,
    geo: &Geometry,
    x: f64,
    item: &Item,
    fill: &str,
    tip: &str,
) {
    let scale = DISK_LANE_HEIGHT_PX as f64 / t.disk_bytes.max(1) as f64;
    let y = geo.disk_top() + item.offset as f64 * scale;
    let h = (item.length as f64 * scale).max(2.0);
    c.rect(x + 1.0, y, RECORD_WIDTH_PX as f64 - 2.0, h, fill, tip);
}

/// The crash point: a power cut draws its own; without one, the log's end is where a crash
/// would lose the writes not yet flushed.
fn crash_point(c: &mut Canvas, t: &LogTimeline, geo: &Geometry) {
    if let Some((at, what)) = &t.crash_at {
        let x = geo.x(*at) - 1.0;
        c.line((x, geo.top), (x, geo.bottom()), "#b91c1c", false);
        c.text(
            x + 4.0,
            geo.lane("crash") + 17.0,
            what,
            10,
            "start",
            "#b91c1c",
        );
        return;
    }
    if t.items.iter().any(|i| i.kind == ItemKind::PowerCut) {
        return;
    }
    let x = geo.x(t.items.len()) + 2.0;
    c.line((x, geo.top), (x, geo.bottom()), "#6b7280", true);
    let text = if t.records as usize > t.items.len() {
        "(more records not drawn)"
    } else {
        "end of log: a crash here loses what is not flushed"
    };
    c.text(
        x + 4.0,
        geo.lane("crash") + 17.0,
        text,
        10,
        "start",
        "#6b7280",
    );
}

fn highlight(c: &mut Canvas, t: &LogTimeline, geo: &Geometry) {
    let Some(byte) = t.highlight else { return };
    let scale = DISK_LANE_HEIGHT_PX as f64 / t.disk_bytes.max(1) as f64;
    let y = geo.disk_top() + byte as f64 * scale;
    let end = geo.x(t.items.len());
    c.line((LANE_LABEL_WIDTH_PX as f64, y), (end, y), "#db2777", true);
    let block = byte / fs_core::block::BLOCK_SIZE as u64;
    c.text(
        LANE_LABEL_WIDTH_PX as f64 - 4.0,
        y + 4.0,
        &format!("byte {byte} (block {block})"),
        9,
        "end",
        "#db2777",
    );
}

fn axis(c: &mut Canvas, t: &LogTimeline, geo: &Geometry) {
    let y = geo.bottom() + 12.0;
    let seqs: BTreeSet<usize> = (0..t.items.len()).filter(|i| i % 10 == 0).collect();
    for i in seqs {
        let x = geo.x(i) + RECORD_WIDTH_PX as f64 / 2.0;
        c.text(x, y, &t.items[i].seq.to_string(), 9, "middle", "#555");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbd_server::backend::{Arrival, Backend, RequestKind, WriteData};
    use nbd_server::disk::{DiskConfig, EmulatedDisk, VecStorage};
    use std::sync::Arc;

    const DISK_BYTES: u64 = 1 << 20;

    /// A disk recording to `path`.
    fn disk(path: &Path) -> EmulatedDisk {
        let s = Arc::new(VecStorage::new(DISK_BYTES).unwrap());
        let config = DiskConfig {
            record: Some(path.to_path_buf()),
            ..Default::default()
        };
        EmulatedDisk::new(s, config).unwrap()
    }

    fn request(d: &EmulatedDisk, kind: RequestKind, offset: u64, length: u64, fua: bool) {
        let a = Arrival {
            conn: 1,
            kind,
            offset,
            length,
            fua,
        };
        let t = d.arrived(&a).expect("a ticket");
        match kind {
            RequestKind::Flush => d.flush(Some(t)).unwrap(),
            _ => {
                let data = WriteData::copy_of(&vec![7u8; length as usize]);
                d.write(Some(t), offset, data, fua).unwrap()
            }
        }
        d.reply_sent(t);
    }

    /// Three writes, a flush, a mark whose name is markup, a FUA write, two plain writes and a
    /// power cut: two epochs before the cut, one after.
    fn small_log(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("d.log");
        let d = disk(&path);
        for i in 0..3 {
            request(&d, RequestKind::Write, i * 4096, 4096, false);
        }
        request(&d, RequestKind::Flush, 0, 0, false);
        d.mark("<m&\"x\">").unwrap();
        request(&d, RequestKind::Write, 65536, 8192, true);
        request(&d, RequestKind::Write, 4096, 4096, false);
        request(&d, RequestKind::Write, 8192, 4096, false);
        d.power_cut(Some(3)).unwrap();
        d.sync_log().unwrap();
        path
    }

    /// The fates follow the log's own promises: flushed and FUA writes are durable, and the
    /// writes pending at the power cut carry the fate the cut gave them (never "durable").
    #[test]
    fn fates_epochs_and_lanes() {
        let dir = tempfile::tempdir().unwrap();
        let t = read_log(&small_log(dir.path()), Some(8192)).unwrap();
        let writes: Vec<&WriteFate> = t
            .items
            .iter()
            .filter_map(|i| match &i.kind {
                ItemKind::Write { fate, .. } => Some(fate),
                _ => None,
            })
            .collect();
        assert_eq!(writes.len(), 6);
        assert!(
            writes[..4].iter().all(|f| **f == WriteFate::Durable),
            "{writes:?}"
        );
        for f in &writes[4..] {
            assert!(
                matches!(
                    f,
                    WriteFate::Survived | WriteFate::Torn(_) | WriteFate::Dropped
                ),
                "{f:?}"
            );
        }
        let cut = t
            .items
            .iter()
            .find(|i| i.kind == ItemKind::PowerCut)
            .unwrap();
        assert_eq!(cut.epoch, 1, "one flush before the cut");
        let svg = render_svg(&t);
        for lane in LOG_LANES.iter().chain(["where on disk"].iter()) {
            assert!(svg.contains(&format!(">{lane}</text>")), "lane {lane}");
        }
        assert!(svg.contains("byte 8192 (block 2)"));
        assert!(svg.contains("epoch 0"));
    }

    /// Guards against markup injection through a mark's name (any bytes a client sends).
    #[test]
    fn mark_names_are_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let svg = render_svg(&read_log(&small_log(dir.path()), None).unwrap());
        assert!(svg.contains("mark &lt;m&amp;&quot;x&quot;&gt;"), "{svg}");
        assert!(!svg.contains("<m&"));
    }

    /// A long log is drawn up to `RECORDS_DRAWN_MAX` records, and says it has more.
    #[test]
    fn long_logs_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.log");
        let d = disk(&path);
        for i in 0..RECORDS_DRAWN_MAX as u64 + 10 {
            request(&d, RequestKind::Write, (i % 64) * 4096, 4096, false);
        }
        d.sync_log().unwrap();
        let t = read_log(&path, None).unwrap();
        assert_eq!(t.items.len(), RECORDS_DRAWN_MAX);
        assert_eq!(t.records, RECORDS_DRAWN_MAX as u64 + 10);
        let svg = render_svg(&t);
        assert_eq!(
            svg.matches("<title>record ").count(),
            2 * RECORDS_DRAWN_MAX,
            "bar + disk bar"
        );
        assert!(svg.contains("(more records not drawn)"));
    }
}
