//! A race bundle as a timeline: a lane per task (the workload's operations, the flusher, IO
//! completion, reclaim, the final sync), its steps along the x axis in schedule order, and
//! marks on the steps that tell the finding's story:
//!
//! - **cached**: the step that took the mapping a stale use then relied on (`iomap_begin`,
//!   `zero:iomap_begin`, `wb:map_blocks`), the same task's last such step before the use;
//! - **made stale**: steps of other tasks between that caching and the use that change
//!   extents (writeback's allocation, unwritten conversion, fallocate, punch, zero range,
//!   truncate) and can have touched the note's folio: what can have made the mapping lie;
//! - **used stale**: the step at which the model noted a stale mapping being used. The model
//!   does not say which step its notes come from, so the bundle is replayed (strictly, on
//!   its own schedule) with its schedule cut short, and the first cut whose run holds the
//!   note is the note's step;
//! - **wrong byte**: for a `wrong_data` failure, the step that put the wrong byte in the file
//!   (the noted stale use that zero-filled or read old data into the byte's folio, or, with
//!   no such note, the write of the operation whose old data came back), and the write whose
//!   byte was lost.

use super::draw::LEGEND_HEIGHT_PX;
use super::draw::{Canvas, LANE_HEIGHT_PX, LANE_LABEL_CHARS_MAX, LANE_LABEL_WIDTH_PX};
use crate::race::Bundle;
use fs_core::sched::{
    self, RecordedStep, ReplayPolicy, FIRST_OP_TASK, TASK_FLUSHER, TASK_IO_COMPLETION, TASK_RECLAIM,
};
use fs_core::step::YieldPoint;
use fs_core::Failure;
use std::collections::BTreeMap;

/// Steps drawn per timeline; a longer run is drawn as a window around its marked steps.
pub const STEPS_DRAWN_MAX: usize = 600;
/// Steps drawn after the last marked step when the window is cut.
pub const STEPS_AFTER_LAST_MARK: usize = 40;
/// Lanes drawn per timeline: those with marks first, then the busiest.
pub const LANES_DRAWN_MAX: usize = 24;
/// Width of one step.
pub const STEP_WIDTH_PX: u32 = 12;
/// Room right of the last step, for the labels drawn there.
pub const TIMELINE_RIGHT_MARGIN_PX: u32 = 220;
/// Replays of a bundle spent placing the model's notes on steps; notes left when they are
/// spent are listed without a step.
pub const REPLAYS_PER_FINDING_MAX: usize = 2048;

/// Which lane a task's steps go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LaneKey {
    /// Workload operation N (task `FIRST_OP_TASK + N`).
    Op(u32),
    Flusher,
    IoCompletion,
    Reclaim,
    /// The per-file sync passes the scheduler runs after the workload.
    FinalSync,
}

impl LaneKey {
    pub fn of(task: u32, ops: usize) -> LaneKey {
        match task as usize {
            TASK_IO_COMPLETION => LaneKey::IoCompletion,
            TASK_FLUSHER => LaneKey::Flusher,
            TASK_RECLAIM => LaneKey::Reclaim,
            t if t - FIRST_OP_TASK < ops => LaneKey::Op((t - FIRST_OP_TASK) as u32),
            _ => LaneKey::FinalSync,
        }
    }
}

/// A lane drawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lane {
    pub key: LaneKey,
    pub name: String,
}

/// What a mark on a step says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkKind {
    Cached,
    MadeStale,
    UsedStale,
    /// The step that put the wrong byte in the file.
    WrongByte,
    /// The step that wrote the byte that was lost.
    LostByte,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mark {
    pub step: usize,
    pub kind: MarkKind,
    pub what: String,
}

/// A note of the model, and the step it was made at when that is known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub text: String,
    pub step: Option<usize>,
}

/// Everything a race finding's timeline shows.
#[derive(Clone, Debug)]
pub struct RaceTimeline {
    pub seed: u64,
    /// Operations in the workload (tasks past them are the final sync's).
    pub ops: usize,
    /// The whole trace (the drawing shows `window` of it).
    pub steps: Vec<RecordedStep>,
    /// Steps the scheduler chose; the rest are the quiesce and final sync.
    pub schedule_len: usize,
    pub notes: Vec<Note>,
    pub marks: Vec<Mark>,
    /// Whether replaying the bundle gave the failures it records.
    pub replay_agrees: bool,
    /// Steps `[start, end)` are drawn.
    pub window: (usize, usize),
    pub lanes: Vec<Lane>,
    /// Lanes with steps in the window that were not drawn (`LANES_DRAWN_MAX`).
    pub lanes_left_out: usize,
}

/// The timeline of `b`, replaying it to place the model's notes.
pub fn timeline(b: &Bundle) -> RaceTimeline {
    let ops = b.workload.ops().count();
    let (notes, replay_agrees) = attributed_notes(b);
    let mut marks = stale_marks(&b.trace, &notes);
    marks.extend(byte_marks(b, &notes));
    marks.sort_by_key(|m| m.step);
    let window = window(b.trace.len(), &marks);
    let (lanes, lanes_left_out) = lanes(b, ops, window, &marks);
    RaceTimeline {
        seed: b.seed,
        ops,
        steps: b.trace.clone(),
        schedule_len: b.schedule.len(),
        notes,
        marks,
        replay_agrees,
        window,
        lanes,
        lanes_left_out,
    }
}

/// The bundle's run with its schedule cut after `choices` steps (a strict replay stops there).
fn replay(b: &Bundle, choices: usize) -> fs_core::RunResult {
    let mut policy = ReplayPolicy::new(b.schedule[..choices].to_vec(), true);
    sched::run(&b.config, &b.workload, &mut policy)
}

/// Notes of runs cut short, by cut, replayed once each and at most `REPLAYS_PER_FINDING_MAX`
/// times in all.
struct Cuts<'b> {
    bundle: &'b Bundle,
    notes: BTreeMap<usize, Vec<String>>,
}

impl Cuts<'_> {
    fn notes(&mut self, choices: usize) -> Option<&Vec<String>> {
        if !self.notes.contains_key(&choices) {
            if self.notes.len() >= REPLAYS_PER_FINDING_MAX {
                return None;
            }
            let notes = replay(self.bundle, choices).notes;
            self.notes.insert(choices, notes);
        }
        self.notes.get(&choices)
    }

    /// The step that made note `i` (whose text is `text`): the last step of the shortest cut
    /// whose run holds it. Notes only ever grow as the cut grows, so a bisection finds it.
    fn step_of(&mut self, i: usize, text: &str) -> Option<usize> {
        let (mut lo, mut hi) = (1, self.bundle.schedule.len());
        if self.notes(hi)?.get(i).map(String::as_str) != Some(text) {
            return None;
        }
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if self.notes(mid)?.len() > i {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Some(lo - 1)
    }
}

/// The model's notes on the replayed run, each with its step where it can be found, and
/// whether the replay failed as the bundle says.
fn attributed_notes(b: &Bundle) -> (Vec<Note>, bool) {
    let full = replay(b, b.schedule.len());
    let agrees = full.failures == b.failures;
    let mut cuts = Cuts {
        bundle: b,
        notes: BTreeMap::new(),
    };
    let mut after = b.schedule.len();
    let mut notes = Vec::new();
    for (i, text) in full.notes.iter().enumerate() {
        let step = match cuts.step_of(i, text) {
            Some(s) => Some(s),
            // Made after the schedule: in the quiesce or the final sync's writeback.
            None => final_sync_step(&b.trace, after, text),
        };
        if let Some(s) = step.filter(|&s| s >= b.schedule.len()) {
            after = s + 1;
        }
        notes.push(Note {
            text: text.clone(),
            step,
        });
    }
    (notes, agrees)
}

/// The folio a note names ("... folio N ..."), if it names one.
fn note_folio(note: &str) -> Option<u64> {
    note.split("folio ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The step after the schedule that a writeback note names: the first `wb:map_blocks` from
/// `from` on whose folio is the note's "folio N".
fn final_sync_step(trace: &[RecordedStep], from: usize, note: &str) -> Option<usize> {
    let folio = note_folio(note)?;
    (from..trace.len())
        .find(|&i| trace[i].label == YieldPoint::WbMapBlocks && trace[i].arg == folio)
}

/// Whether a step that changes extents can have changed the mapping of `folio` (when the
/// note names one): IO completion converts the one block its argument names; writeback's
/// `map_blocks` allocates the delalloc run from its folio on; the other steps' arguments are
/// not folios, so they are kept.
fn can_touch(step: &RecordedStep, folio: Option<u64>) -> bool {
    match (step.label, folio) {
        (YieldPoint::IoConvertUnwritten, Some(f)) => step.arg == f,
        (YieldPoint::WbMapBlocks, Some(f)) => step.arg <= f,
        _ => true,
    }
}

/// Whether a step of `label` caches a mapping that later steps of its task rely on.
pub fn caches_mapping(label: YieldPoint) -> bool {
    matches!(
        label,
        YieldPoint::IomapBegin | YieldPoint::ZeroIomapBegin | YieldPoint::WbMapBlocks
    )
}

/// Whether a step of `label` changes a file's extents (and so can make a cached mapping lie).
pub fn changes_extents(label: YieldPoint) -> bool {
    matches!(
        label,
        YieldPoint::WbMapBlocks
            | YieldPoint::IoConvertUnwritten
            | YieldPoint::FallocateAlloc
            | YieldPoint::PunchFreeExtents
            | YieldPoint::ZeroRangeConvert
            | YieldPoint::TruncateFreeExtents
            | YieldPoint::PunchScanDone
            | YieldPoint::EvictFree
    )
}

/// Cached, made-stale and used-stale marks for every note placed on a step.
fn stale_marks(trace: &[RecordedStep], notes: &[Note]) -> Vec<Mark> {
    let mut marks = Vec::new();
    for (n, note) in notes.iter().enumerate() {
        let Some(used) = note.step.filter(|&s| s < trace.len()) else {
            continue;
        };
        let task = trace[used].task;
        marks.push(Mark {
            step: used,
            kind: MarkKind::UsedStale,
            what: format!("note {}: {}", n + 1, note.text),
        });
        let Some(cached) = (0..used)
            .rev()
            .find(|&i| trace[i].task == task && caches_mapping(trace[i].label))
        else {
            continue;
        };
        marks.push(Mark {
            step: cached,
            kind: MarkKind::Cached,
            what: format!(
                "the mapping note {} relies on was cached here ({}@{})",
                n + 1,
                trace[cached].label,
                trace[cached].arg
            ),
        });
        let folio = note_folio(&note.text);
        let between = trace.iter().enumerate().take(used).skip(cached + 1);
        let stale =
            |s: &RecordedStep| s.task != task && changes_extents(s.label) && can_touch(s, folio);
        for (i, s) in between.filter(|(_, s)| stale(s)) {
            marks.push(Mark {
                step: i,
                kind: MarkKind::MadeStale,
                what: format!(
                    "changed extents while the mapping of note {} was cached ({}@{})",
                    n + 1,
                    s.label,
                    s.arg
                ),
            });
        }
    }
    marks
}

/// The last step of operation `op` that copied data into folio `folio` (its last data step if
/// none names the folio).
fn data_step(trace: &[RecordedStep], op: u32, folio: u64) -> Option<usize> {
    let task = op + FIRST_OP_TASK as u32;
    let data = |s: &RecordedStep| {
        s.task == task && matches!(s.label, YieldPoint::CopyWriteEnd | YieldPoint::Store)
    };
    let all: Vec<usize> = (0..trace.len()).filter(|&i| data(&trace[i])).collect();
    all.iter()
        .rev()
        .find(|&&i| trace[i].arg == folio)
        .or(all.last())
        .copied()
}

/// The wrong-byte and lost-byte marks of the first failure, when it is a wrong byte.
fn byte_marks(b: &Bundle, notes: &[Note]) -> Vec<Mark> {
    let Some(Failure::WrongData {
        file,
        offset,
        found,
        expected,
        expected_from,
        found_from,
        ..
    }) = b.failures.first()
    else {
        return Vec::new();
    };
    let folio = offset / fs_core::block::BLOCK_SIZE as u64;
    let mut marks = Vec::new();
    if let Some(step) = expected_from.and_then(|op| data_step(&b.trace, op, folio)) {
        marks.push(Mark {
            step,
            kind: MarkKind::LostByte,
            what: format!(
                "op{} wrote byte 0x{expected:02x} at file {file} offset {offset}: it was lost",
                expected_from.unwrap_or_default()
            ),
        });
    }
    // A note that names the folio tells the step that filled it wrongly; without one, the
    // wrong byte is the older data of the operation the oracle names.
    let noted = notes.iter().enumerate().find_map(|(n, note)| {
        let names = note.text.contains(&format!("folio {folio} of file {file}"));
        let what = format!(
            "0x{found:02x} at file {file} offset {offset} was made here (note {})",
            n + 1
        );
        note.step.filter(|_| names).map(|s| (s, what))
    });
    let wrong = noted.or_else(|| {
        let op = (*found_from)?;
        let what = format!(
            "op{op} wrote 0x{found:02x} here earlier: this old data came back at file {file} \
             offset {offset}"
        );
        data_step(&b.trace, op, folio).map(|s| (s, what))
    });
    if let Some((step, what)) = wrong {
        marks.push(Mark {
            step,
            kind: MarkKind::WrongByte,
            what,
        });
    }
    marks
}

/// The steps drawn: all of them, or `STEPS_DRAWN_MAX` ending a little after the last mark.
fn window(total: usize, marks: &[Mark]) -> (usize, usize) {
    if total <= STEPS_DRAWN_MAX {
        return (0, total);
    }
    let last = marks.iter().map(|m| m.step).max().unwrap_or(total - 1);
    let end = (last + STEPS_AFTER_LAST_MARK + 1).clamp(STEPS_DRAWN_MAX, total);
    (end - STEPS_DRAWN_MAX, end)
}

/// The lanes of the steps in `window`, those with marks first, at most `LANES_DRAWN_MAX`, in
/// lane order; and how many were left out.
fn lanes(b: &Bundle, ops: usize, window: (usize, usize), marks: &[Mark]) -> (Vec<Lane>, usize) {
    let mut busy: BTreeMap<LaneKey, (bool, usize)> = BTreeMap::new();
    for s in &b.trace[window.0..window.1] {
        busy.entry(LaneKey::of(s.task, ops)).or_default().1 += 1;
    }
    for m in marks
        .iter()
        .filter(|m| (window.0..window.1).contains(&m.step))
    {
        busy.entry(LaneKey::of(b.trace[m.step].task, ops))
            .or_default()
            .0 = true;
    }
    let mut keys: Vec<(LaneKey, (bool, usize))> = busy.into_iter().collect();
    keys.sort_by_key(|&(k, (marked, steps))| (!marked, std::cmp::Reverse(steps), k));
    let left_out = keys.len().saturating_sub(LANES_DRAWN_MAX);
    keys.truncate(LANES_DRAWN_MAX);
    keys.sort_by_key(|&(k, _)| k);
    let all_ops: Vec<&fs_core::Op> = b.workload.ops().collect();
    let lanes = keys
        .into_iter()
        .map(|(key, _)| Lane {
            key,
            name: match key {
                LaneKey::Op(n) => format!("op{n} {}", all_ops[n as usize]),
                LaneKey::Flusher => "flusher".into(),
                LaneKey::IoCompletion => "IO completion".into(),
                LaneKey::Reclaim => "reclaim".into(),
                LaneKey::FinalSync => "final sync (after the workload)".into(),
            },
        })
        .collect();
    (lanes, left_out)
}

/// The colour of a step, and what it stands for (the legend).
pub fn category(label: YieldPoint) -> (&'static str, &'static str) {
    let l = label.label();
    if caches_mapping(label) {
        ("#2f6fcf", "maps a range (caches a mapping)")
    } else if changes_extents(label) {
        ("#e76f51", "changes extents")
    } else if l.contains("iomap_valid") {
        ("#8fb8ee", "checks a cached mapping")
    } else if l.starts_with("io:") {
        ("#2a9d8f", "IO completion")
    } else if l.starts_with("wb:") {
        ("#7b5ea7", "writeback")
    } else if l.starts_with("reclaim") || l.starts_with("evict") {
        ("#a0522d", "reclaim, eviction")
    } else if [
        "copy",
        "store",
        "write_begin",
        "get_folio",
        "fault",
        "page_mkwrite",
        "read:folio",
    ]
    .iter()
    .any(|p| l.starts_with(p))
    {
        ("#52a447", "page cache data")
    } else if l.starts_with("fsync") || l.starts_with("sync") {
        ("#333333", "sync")
    } else {
        ("#a8a8a8", "locks, other steps")
    }
}

/// The colour of a mark, and what it stands for (the legend).
pub fn mark_style(kind: MarkKind) -> (&'static str, &'static str) {
    match kind {
        MarkKind::Cached => ("#1d4ed8", "mapping cached"),
        MarkKind::MadeStale => ("#f59e0b", "may have made it stale"),
        MarkKind::UsedStale => ("#dc2626", "stale mapping used (a note)"),
        MarkKind::WrongByte => ("#b91c1c", "wrong byte made"),
        MarkKind::LostByte => ("#7e22ce", "lost byte written"),
    }
}

/// The timeline as one SVG document (`class="timeline race-timeline"`).
pub fn render_svg(t: &RaceTimeline) -> String {
    let (start, end) = t.window;
    let lanes_top = 2 * LEGEND_HEIGHT_PX;
    let width =
        LANE_LABEL_WIDTH_PX + (end - start) as u32 * STEP_WIDTH_PX + TIMELINE_RIGHT_MARGIN_PX;
    let height = lanes_top + t.lanes.len() as u32 * LANE_HEIGHT_PX + LEGEND_HEIGHT_PX + 8;
    let mut c = Canvas::new(
        width,
        height,
        &format!(
            "race seed {}: steps {start} to {} of {}",
            t.seed,
            end,
            t.steps.len()
        ),
    );
    legend(&mut c);
    let row: BTreeMap<LaneKey, usize> = t
        .lanes
        .iter()
        .enumerate()
        .map(|(i, l)| (l.key, i))
        .collect();
    let geo = Geometry {
        start,
        top: lanes_top as f64,
        bottom: (lanes_top + t.lanes.len() as u32 * LANE_HEIGHT_PX) as f64,
    };
    for (i, lane) in t.lanes.iter().enumerate() {
        let y = geo.lane_y(i);
        let shade = if i % 2 == 0 { "#f3f4f6" } else { "#ffffff" };
        c.rect(0.0, y, c.width() as f64, LANE_HEIGHT_PX as f64, shade, "");
        let name = super::text::clip(&lane.name, LANE_LABEL_CHARS_MAX);
        c.text(6.0, y + 17.0, &name, 12, "start", "#111");
    }
    steps(&mut c, t, &geo, &row);
    if (start..end).contains(&t.schedule_len) {
        let x = geo.x(t.schedule_len);
        c.line((x, geo.top), (x, geo.bottom), "#6b7280", true);
        c.text(
            x + 3.0,
            geo.bottom + 20.0,
            "workload done: quiesce, sync",
            10,
            "start",
            "#6b7280",
        );
    }
    marks(&mut c, t, &geo, &row);
    axis(&mut c, &geo, start, end);
    c.finish("timeline race-timeline")
}

/// Where steps and lanes are drawn.
struct Geometry {
    start: usize,
    top: f64,
    bottom: f64,
}

impl Geometry {
    fn x(&self, step: usize) -> f64 {
        LANE_LABEL_WIDTH_PX as f64 + (step - self.start) as f64 * STEP_WIDTH_PX as f64
    }
    fn lane_y(&self, row: usize) -> f64 {
        self.top + (row as u32 * LANE_HEIGHT_PX) as f64
    }
}

fn legend(c: &mut Canvas) {
    let mut x = 6.0;
    for (fill, what) in [
        YieldPoint::IomapBegin,
        YieldPoint::IomapValid,
        YieldPoint::FallocateAlloc,
        YieldPoint::CopyWriteEnd,
        YieldPoint::WbSubmit,
        YieldPoint::IoComplete,
        YieldPoint::Reclaim,
        YieldPoint::FsyncFlush,
        YieldPoint::WriteLockInode,
    ]
    .map(category)
    {
        x = c.legend(x, 16.0, fill, what);
    }
    let mut x = 6.0;
    for kind in [
        MarkKind::Cached,
        MarkKind::MadeStale,
        MarkKind::UsedStale,
        MarkKind::LostByte,
        MarkKind::WrongByte,
    ] {
        let (fill, what) = mark_style(kind);
        x = c.legend(x, 16.0 + LEGEND_HEIGHT_PX as f64, fill, what);
    }
}

fn steps(c: &mut Canvas, t: &RaceTimeline, geo: &Geometry, row: &BTreeMap<LaneKey, usize>) {
    for i in geo.start..t.window.1 {
        let s = &t.steps[i];
        let key = LaneKey::of(s.task, t.ops);
        let Some(&r) = row.get(&key) else { continue };
        let (fill, _) = category(s.label);
        let tip = format!("step {i}: {} {}@{}", lane_name(t, key), s.label, s.arg);
        let w = STEP_WIDTH_PX as f64 - 2.0;
        c.rect(
            geo.x(i) + 1.0,
            geo.lane_y(r) + 6.0,
            w,
            LANE_HEIGHT_PX as f64 - 12.0,
            fill,
            &tip,
        );
    }
}

fn lane_name(t: &RaceTimeline, key: LaneKey) -> &str {
    t.lanes
        .iter()
        .find(|l| l.key == key)
        .map_or("", |l| l.name.as_str())
}

fn marks(c: &mut Canvas, t: &RaceTimeline, geo: &Geometry, row: &BTreeMap<LaneKey, usize>) {
    for m in t
        .marks
        .iter()
        .filter(|m| (geo.start..t.window.1).contains(&m.step))
    {
        let key = LaneKey::of(t.steps[m.step].task, t.ops);
        let Some(&r) = row.get(&key) else { continue };
        let (fill, _) = mark_style(m.kind);
        let (x, y) = (geo.x(m.step), geo.lane_y(r));
        let w = STEP_WIDTH_PX as f64;
        let h = LANE_HEIGHT_PX as f64;
        match m.kind {
            MarkKind::Cached => {
                c.polygon(&[(x, y), (x + w, y), (x + w / 2.0, y + 7.0)], fill, &m.what)
            }
            MarkKind::MadeStale => c.polygon(
                &[
                    (x + w / 2.0, y),
                    (x + w, y + 5.0),
                    (x + w / 2.0, y + 10.0),
                    (x, y + 5.0),
                ],
                fill,
                &m.what,
            ),
            MarkKind::UsedStale => c.ring(x + w / 2.0, y + h / 2.0, w * 0.8, fill, &m.what),
            MarkKind::LostByte => c.polygon(
                &[(x, y + h), (x + w, y + h), (x + w / 2.0, y + h - 8.0)],
                fill,
                &m.what,
            ),
            MarkKind::WrongByte => {
                c.line(
                    (x + w / 2.0, geo.top),
                    (x + w / 2.0, geo.bottom),
                    fill,
                    true,
                );
                c.frame(x - 1.0, y + 2.0, w + 2.0, h - 4.0, fill, &m.what);
                c.text(x + w + 3.0, y + 12.0, "wrong byte", 11, "start", fill);
            }
        }
    }
}

fn axis(c: &mut Canvas, geo: &Geometry, start: usize, end: usize) {
    let y = geo.bottom + 12.0;
    for i in (start..end).filter(|i| i % 10 == 0) {
        let x = geo.x(i);
        c.line((x, geo.bottom), (x, geo.bottom + 3.0), "#555", false);
        c.text(x, y, &i.to_string(), 9, "middle", "#555");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The committed race fixture (fixtures/race/race-seed-9079; its report.txt is the
    /// schedule printed when it was found, which the expected steps below are read from).
    fn fixture() -> Bundle {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/race/race-seed-9079");
        crate::race::load_bundle(&dir).unwrap()
    }

    fn steps_of(t: &RaceTimeline, kind: MarkKind) -> Vec<usize> {
        t.marks
            .iter()
            .filter(|m| m.kind == kind)
            .map(|m| m.step)
            .collect()
    }

    /// The fixture's story, as its report.txt tells it: op2 cached an Unwritten mapping at
    /// step 11 (`iomap_begin@0`), IO completion converted block 1 at step 16, and op2's
    /// `write_begin@1` (step 23) zero-filled folio 1 over op1's byte, written at step 4
    /// (`copy+write_end@1`). The note's step is found by replaying cut schedules; a wrong cut
    /// (off by one, or the note taken from the full run) lands elsewhere.
    #[test]
    fn the_fixture_notes_and_marks_land_on_their_steps() {
        let b = fixture();
        let t = timeline(&b);
        assert!(t.replay_agrees);
        assert_eq!(t.notes.len(), 1, "{:?}", t.notes);
        assert!(t.notes[0].text.starts_with("op2 write_begin zero-filled"));
        assert_eq!(t.notes[0].step, Some(23));
        let s = &b.trace[23];
        assert_eq!((s.task, s.label, s.arg), (3 + 2, YieldPoint::WriteBegin, 1));
        assert_eq!(steps_of(&t, MarkKind::UsedStale), vec![23]);
        assert_eq!(steps_of(&t, MarkKind::WrongByte), vec![23]);
        assert_eq!(steps_of(&t, MarkKind::Cached), vec![11]);
        // io:convert_unwritten@1 (16), and the flusher's wb:map_blocks@0 (21), whose delalloc
        // run may reach folio 1; the conversion of no other block is drawn.
        assert_eq!(steps_of(&t, MarkKind::MadeStale), vec![16, 21]);
        assert_eq!(steps_of(&t, MarkKind::LostByte), vec![4]);
    }

    /// A lane per task that ran: every operation, flusher, IO completion, reclaim and the
    /// final sync, in that order, each named in the drawing.
    #[test]
    fn the_fixture_has_a_lane_per_task() {
        let t = timeline(&fixture());
        let keys: Vec<LaneKey> = t.lanes.iter().map(|l| l.key).collect();
        use LaneKey::*;
        assert_eq!(
            keys,
            [
                Op(0),
                Op(1),
                Op(2),
                Op(3),
                Flusher,
                IoCompletion,
                Reclaim,
                FinalSync
            ]
        );
        let svg = render_svg(&t);
        assert!(svg.starts_with(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"timeline race-timeline\""
        ));
        for name in [
            "op0 fallocate",
            "flusher",
            "IO completion",
            "reclaim",
            "final sync",
        ] {
            assert!(svg.contains(&format!(">{name}")), "lane {name}");
        }
        assert_eq!(svg.matches("<title>step ").count(), t.steps.len());
        assert!(svg.contains(">wrong byte</text>"));
    }

    /// Guards against markup injection through text the drawing did not write (a lane's
    /// name is an operation's text, a tooltip a note's).
    #[test]
    fn lane_names_are_escaped() {
        let mut t = timeline(&fixture());
        t.lanes[0].name = "<script>alert(1)</script>".into();
        t.marks[0].what = "a & b < c".into();
        let svg = render_svg(&t);
        assert!(!svg.contains("<script"));
        assert!(svg.contains("&lt;script&gt;"));
        assert!(svg.contains("a &amp; b &lt; c"));
    }

    #[test]
    fn the_window_ends_after_the_last_mark() {
        let mark = |step| Mark {
            step,
            kind: MarkKind::WrongByte,
            what: String::new(),
        };
        assert_eq!(window(100, &[mark(50)]), (0, 100));
        let end = 9000 + STEPS_AFTER_LAST_MARK + 1;
        assert_eq!(window(10_000, &[mark(9000)]), (end - STEPS_DRAWN_MAX, end));
        assert_eq!(window(10_000, &[mark(3)]), (0, STEPS_DRAWN_MAX));
        assert_eq!(window(10_000, &[]), (10_000 - STEPS_DRAWN_MAX, 10_000));
    }

    /// A long run draws at most `STEPS_DRAWN_MAX` steps.
    #[test]
    fn long_runs_are_cut() {
        let mut t = timeline(&fixture());
        let one = t.steps.clone();
        while t.steps.len() < 3 * STEPS_DRAWN_MAX {
            t.steps.extend(one.iter().cloned());
        }
        t.window = window(t.steps.len(), &t.marks);
        let svg = render_svg(&t);
        assert_eq!(svg.matches("<title>step ").count(), STEPS_DRAWN_MAX);
    }
}
