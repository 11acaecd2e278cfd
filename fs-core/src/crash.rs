//! The crash oracle: what a filesystem recovered from a crash state must show, given the run's
//! history and the last persistence point the state is known to include. It is the promise
//! of `docs/fs-core-crash.md` (ordered data, as ext4 `data=ordered` and XFS give):
//!
//! - **Baseline.** For each file, the newest completed persistence point that covers it and
//!   that the state includes (its mark is in the state): fsync or fdatasync of the file, or
//!   sync; else the filesystem as mounted before the run. Its image is the file as the
//!   effects before that point *started* made it, less those of operations still running
//!   then (they may or may not be durable): the history replayed up to that cut.
//! - **Bytes.** Each byte of the recovered file is the baseline's byte, or one that an
//!   operation after the baseline's start wrote there, or zero where a later operation could
//!   have left zeros (punch, zero range, a truncate that shrank then grew the file, a write
//!   that left a hole below it). Never another file's data, never an older incarnation's.
//! - **Sizes.** Between the smallest a later truncate set (or the baseline's) and the largest
//!   a later operation reached (or the baseline's); every byte below it obeys the rule above,
//!   so an on-disk size that ran ahead of its data shows up as bytes that must not be zero.
//! - **Existence.** A file the baseline saw alive is alive, unless a later operation removed
//!   its last name; a recovered file's generation is the baseline's or one a later create
//!   made.
//! - **Names** (from the newest included sync, else as mounted): each baseline name is
//!   there unless a later operation removed it, and names the baseline's inode or one a later
//!   operation put there; a renamed-over name is the old file or the new one, never missing.

use std::collections::BTreeMap;

use crate::fs::Fs;
use crate::oracle::{Effect, EffectKind, FileImage, History, Promise};

/// Violations reported per crash state at most.
pub const VIOLATIONS_MAX: usize = 16;

/// One broken promise.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CrashViolation {
    /// The file: a name the recovered directory gives its inode, else `inode <N>`.
    pub file: String,
    /// Its inode (the workload's file slot).
    #[serde(default)]
    pub ino: Option<usize>,
    /// What is wrong, in words (offset, found and allowed values, whose data it is).
    pub what: String,
    /// The persistence point whose promise it breaks (`None`: the mounted state).
    pub promised_by: Option<u32>,
}

/// The baseline of one file: its image and where the history goes on from.
struct Baseline {
    image: FileImage,
    effects_at: usize,
    by: Option<u32>,
}

/// Where a promise's baseline ends in the history: before its start, and before the first
/// effect of any operation running then.
fn cut(history: &History, p: &Promise) -> usize {
    let first_running = history.effects[..p.effects_at.min(history.effects.len())]
        .iter()
        .position(|e| p.running.contains(&e.op));
    first_running.map_or(p.effects_at, |i| i.min(p.effects_at))
}

/// The files and the names as the effects before `cut` left them, from the start.
fn replay(history: &History, cut: usize) -> (Vec<FileImage>, BTreeMap<String, usize>) {
    let mut files = history.start.clone();
    let mut names = history.start_names.clone();
    for e in &history.effects[..cut.min(history.effects.len())] {
        let Some(f) = files.get_mut(e.ino) else {
            if let EffectKind::Name { name, to } = &e.kind {
                set_name(&mut names, name, *to);
            }
            continue;
        };
        match &e.kind {
            EffectKind::Fill { offset, len, byte } => {
                put(&mut f.data, *offset, &vec![*byte; *len as usize])
            }
            EffectKind::Write { offset, data } => put(&mut f.data, *offset, data),
            EffectKind::Zero { offset, len } => {
                let end = ((offset + len) as usize).min(f.data.len());
                let start = (*offset as usize).min(end);
                f.data[start..end].fill(0);
            }
            EffectKind::Size { size } => f.data.resize(*size as usize, 0),
            EffectKind::Created { generation } => {
                *f = FileImage {
                    live: true,
                    generation: *generation,
                    data: Vec::new(),
                }
            }
            EffectKind::Gone => {
                f.live = false;
                f.data.clear();
            }
            EffectKind::Name { name, to } => set_name(&mut names, name, *to),
        }
    }
    (files, names)
}

fn put(data: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    let end = offset as usize + bytes.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(bytes);
}

fn set_name(names: &mut BTreeMap<String, usize>, name: &str, to: Option<usize>) {
    match to {
        Some(ino) => names.insert(name.to_owned(), ino),
        None => names.remove(name),
    };
}

/// The promises a crash state includes (indices into `history.promises`): completed, with a
/// mark at or before `mark`.
pub fn included(history: &History, mark: Option<&str>) -> Vec<usize> {
    let Some(limit) = mark.and_then(|m| {
        history
            .promises
            .iter()
            .find(|p| p.mark == m)
            .and_then(|p| p.done)
    }) else {
        return Vec::new();
    };
    history
        .promises
        .iter()
        .enumerate()
        .filter(|(_, p)| p.done.is_some_and(|d| d <= limit))
        .map(|(i, _)| i)
        .collect()
}

/// The files and names a cut of the history leaves.
type Replayed = (Vec<FileImage>, BTreeMap<String, usize>);

/// Judges the crash states of one run: the history's promises with their cuts, and what
/// replaying the history to each cut leaves, worked out once for every state.
pub struct Judge<'h> {
    history: &'h History,
    /// Each promise's cut, by its index in `history.promises`.
    cuts: Vec<usize>,
    replayed: std::collections::HashMap<usize, Replayed>,
}

impl<'h> Judge<'h> {
    pub fn new(history: &'h History) -> Self {
        let cuts: Vec<usize> = history.promises.iter().map(|p| cut(history, p)).collect();
        let replayed = history
            .promises
            .iter()
            .zip(&cuts)
            .filter(|(p, _)| p.done.is_some())
            .map(|(_, &c)| (c, replay(history, c)))
            .collect();
        Judge {
            history,
            cuts,
            replayed,
        }
    }

    /// The newest included promise covering `ino` (`None`: all files), as (cut, op).
    fn newest(
        &self,
        included: &[usize],
        covers: impl Fn(&Promise) -> bool,
    ) -> Option<(usize, u32)> {
        included
            .iter()
            .map(|&i| (&self.history.promises[i], self.cuts[i]))
            .filter(|(p, _)| covers(p))
            .map(|(p, c)| (c, p.op))
            .max()
    }

    /// The baseline of `ino` among the included promises, or the mounted state.
    fn baseline(&self, included: &[usize], ino: usize) -> Baseline {
        match self.newest(included, |p| p.file.is_none_or(|f| f == ino)) {
            Some((at, op)) => Baseline {
                image: self.replayed[&at].0[ino].clone(),
                effects_at: at,
                by: Some(op),
            },
            None => Baseline {
                image: self.history.start[ino].clone(),
                effects_at: 0,
                by: None,
            },
        }
    }

    /// The names baseline: the newest included sync, or the mounted directory.
    fn names(&self, included: &[usize]) -> (&BTreeMap<String, usize>, usize, Option<u32>) {
        match self.newest(included, |p| p.file.is_none()) {
            Some((at, op)) => (&self.replayed[&at].1, at, Some(op)),
            None => (&self.history.start_names, 0, None),
        }
    }
}

/// What a recovered file looks like.
#[derive(Debug, Clone)]
pub struct Found {
    pub in_use: bool,
    pub generation: u64,
    pub data: Vec<u8>,
}

/// Judges a recovered filesystem (mounted from the crash state) against the history, for a
/// state whose last included mark is `mark`.
pub fn judge(history: &History, mark: Option<&str>, fs: &mut Fs) -> Vec<CrashViolation> {
    Judge::new(history).check(mark, fs)
}

impl Judge<'_> {
    /// [`judge`], with the history's replays shared by every state of the run.
    pub fn check(&self, mark: Option<&str>, fs: &mut Fs) -> Vec<CrashViolation> {
        let history = self.history;
        let included = included(history, mark);
        let mut out = Vec::new();
        for ino in 0..history.start.len().min(fs.inodes.len()) {
            let i = fs.inode(ino);
            let (in_use, generation) = (i.in_use && i.nlink > 0, i.generation);
            let data = if in_use {
                match fs.read_from_disk(ino) {
                    Ok(d) => d,
                    Err(e) => {
                        out.push(CrashViolation {
                            file: name_of(fs, ino),
                            ino: Some(ino),
                            what: format!("inode {ino} cannot be read: {e}"),
                            promised_by: None,
                        });
                        continue;
                    }
                }
            } else {
                Vec::new()
            };
            let found = Found {
                in_use,
                generation,
                data,
            };
            let base = self.baseline(&included, ino);
            if let Some(what) = judge_file(history, &base, ino, &found) {
                out.push(CrashViolation {
                    file: name_of(fs, ino),
                    ino: Some(ino),
                    what,
                    promised_by: base.by,
                });
            }
            if out.len() >= VIOLATIONS_MAX {
                return out;
            }
        }
        out.extend(judge_names(history, self.names(&included), fs));
        out.truncate(VIOLATIONS_MAX);
        out
    }
}

/// A name the recovered directory gives inode `ino`, else `inode <ino>`.
fn name_of(fs: &Fs, ino: usize) -> String {
    fs.dir
        .iter()
        .flatten()
        .find(|e| e.ino as usize == ino)
        .map_or_else(|| format!("inode {ino}"), |e| e.name.clone())
}

/// The effects on slot `ino` after `from`, split at the first create or removal: those that
/// belong to the baseline's incarnation, and the later incarnations by generation.
fn incarnations(
    effects: &[Effect],
    ino: usize,
    from: usize,
) -> (Vec<&Effect>, BTreeMap<u64, Vec<&Effect>>) {
    let mut first = Vec::new();
    let mut later: BTreeMap<u64, Vec<&Effect>> = BTreeMap::new();
    let mut current: Option<u64> = None;
    for e in effects[from.min(effects.len())..]
        .iter()
        .filter(|e| e.ino == ino)
    {
        match &e.kind {
            EffectKind::Created { generation } => {
                current = Some(*generation);
                later.entry(*generation).or_default();
            }
            EffectKind::Gone => current = Some(u64::MAX),
            EffectKind::Name { .. } => {}
            _ => match current {
                None => first.push(e),
                Some(g) => later.entry(g).or_default().push(e),
            },
        }
    }
    (first, later)
}

fn judge_file(history: &History, base: &Baseline, ino: usize, found: &Found) -> Option<String> {
    let after = &history.effects[base.effects_at.min(history.effects.len())..];
    let removed_later = after
        .iter()
        .any(|e| e.ino == ino && e.kind == EffectKind::Gone);
    let (same, later) = incarnations(&history.effects, ino, base.effects_at);
    if !found.in_use {
        return (base.image.live && !removed_later).then(|| {
            "is gone, though it was durable and no later operation removed it".to_string()
        });
    }
    if base.image.live && found.generation == base.image.generation {
        return check_bytes(Some(&base.image.data), &same, found, history, ino);
    }
    match later.get(&found.generation) {
        Some(effects) => check_bytes(None, effects, found, history, ino),
        None => Some(format!(
            "has generation {}, which neither the durable state ({}) nor a later create made",
            found.generation,
            if base.image.live {
                format!("generation {}", base.image.generation)
            } else {
                "no file".into()
            }
        )),
    }
}

/// Checks a file's bytes and size against its baseline content (`None`: a new, empty file)
/// and the effects after it.
fn check_bytes(
    base: Option<&[u8]>,
    effects: &[&Effect],
    found: &Found,
    history: &History,
    ino: usize,
) -> Option<String> {
    let base_len = base.map_or(0, <[u8]>::len) as u64;
    let (lo, hi) = size_bounds(base_len, effects);
    let size = found.data.len() as u64;
    if size < lo || size > hi {
        return Some(format!(
            "has size {size}; the durable size and later operations allow {lo}..={hi}"
        ));
    }
    let mut allowed = Allowed::new(base_len, effects);
    let durable = base.unwrap_or(&[]);
    let data = &found.data;
    // Most bytes are the durable ones: skip them a chunk at a time, judge the rest.
    for start in (0..data.len()).step_by(SAME_CHUNK_BYTES) {
        let end = (start + SAME_CHUNK_BYTES).min(data.len());
        if end <= durable.len() && data[start..end] == durable[start..end] {
            continue;
        }
        if let Some(x) = allowed.first_refused(data, durable, start, end) {
            return Some(describe_byte(
                base, effects, history, ino, x as u64, data[x],
            ));
        }
    }
    None
}

/// Bytes compared with the durable content at once before judging them.
const SAME_CHUNK_BYTES: usize = 256;

/// What later effects allow at each byte, swept in offset order: the spans they wrote (a
/// value, or data), and where zeros may stand: where a later operation zeroed, where a later
/// truncate cut the file at or below the byte (it may have grown again over a hole), and,
/// beyond the durable size, below a later extension or a later write that left a hole.
struct Allowed<'e> {
    /// (start, end, what), by start.
    spans: Vec<(u64, u64, Span<'e>)>,
    next: usize,
    /// Spans that started at or before the current byte (ended ones are dropped lazily).
    active: Vec<usize>,
    /// Zero is allowed at or past this byte (a later truncate cut the file there).
    zero_from: u64,
    /// ... and in `[base_len, zero_until)` (extensions and holes below later writes).
    base_len: u64,
    zero_until: u64,
    /// `active` holds until this offset (the next span start or end).
    boundary: u64,
    /// Scratch: which bytes of the stretch being judged are allowed.
    ok: Vec<bool>,
}

#[derive(Clone, Copy)]
enum Span<'e> {
    Byte(u8),
    Data(&'e [u8]),
}

impl<'e> Allowed<'e> {
    fn new(base_len: u64, effects: &[&'e Effect]) -> Self {
        let mut spans = Vec::new();
        let (mut zero_from, mut zero_until) = (u64::MAX, base_len);
        for e in effects {
            match &e.kind {
                EffectKind::Fill { offset, len, byte } => {
                    spans.push((*offset, offset + len, Span::Byte(*byte)));
                    zero_until = zero_until.max(*offset);
                }
                EffectKind::Write { offset, data } => {
                    spans.push((*offset, offset + data.len() as u64, Span::Data(data)));
                    zero_until = zero_until.max(*offset);
                }
                EffectKind::Zero { offset, len } => {
                    spans.push((*offset, offset + len, Span::Byte(0)))
                }
                EffectKind::Size { size } => {
                    zero_from = zero_from.min(*size);
                    zero_until = zero_until.max(*size);
                }
                _ => {}
            }
        }
        spans.sort_by_key(|s| s.0);
        Allowed {
            spans,
            next: 0,
            active: Vec::new(),
            zero_from,
            base_len,
            zero_until,
            boundary: 0,
            ok: Vec::new(),
        }
    }

    /// The first byte of `data[start..end]` that neither the durable content nor a later
    /// effect allows (callers ask in increasing offsets). Judged a stretch at a time: within
    /// a stretch the same spans are over every byte, so each span is compared with the
    /// stretch as a whole (loops the compiler vectorises).
    fn first_refused(
        &mut self,
        data: &[u8],
        durable: &[u8],
        start: usize,
        end: usize,
    ) -> Option<usize> {
        let mut x = start;
        while x < end {
            if x as u64 >= self.boundary {
                self.advance(x as u64);
            }
            let stop = self.boundary.min(end as u64) as usize;
            if self.one_source(data, durable, x, stop) {
                x = stop;
                continue;
            }
            let ok = &mut self.ok;
            ok.clear();
            ok.resize(stop - x, false);
            let found = &data[x..stop];
            if x < durable.len() {
                let same = &durable[x..stop.min(durable.len())];
                for ((o, f), d) in ok.iter_mut().zip(found).zip(same) {
                    *o |= f == d;
                }
            }
            for &i in &self.active {
                let (s0, _, span) = self.spans[i];
                match span {
                    Span::Byte(b) => ok.iter_mut().zip(found).for_each(|(o, f)| *o |= *f == b),
                    Span::Data(d) => {
                        let from = (x as u64 - s0) as usize;
                        let wrote = &d[from..from + found.len()];
                        for ((o, f), w) in ok.iter_mut().zip(found).zip(wrote) {
                            *o |= f == w;
                        }
                    }
                }
            }
            if let Some(k) = ok.iter().position(|o| !o) {
                let zeros = (self.zero_from, self.base_len, self.zero_until);
                let refused =
                    (k..ok.len()).find(|&k| !(ok[k] || (found[k] == 0 && zero_ok(zeros, x + k))));
                if let Some(k) = refused {
                    return Some(x + k);
                }
            }
            x = stop;
        }
        None
    }

    /// Whether `data[x..stop]` is, as a whole, the durable content or one active span's:
    /// the common case, answered by a comparison each, with no per-byte verdicts (the
    /// per-byte sweep was the crash oracle's main cost).
    fn one_source(&self, data: &[u8], durable: &[u8], x: usize, stop: usize) -> bool {
        let found = &data[x..stop];
        if stop <= durable.len() && found == &durable[x..stop] {
            return true;
        }
        let zeros = (self.zero_from, self.base_len, self.zero_until);
        if zero_ok_over(zeros, x, stop) && all_bytes(found, 0) {
            return true;
        }
        self.active.iter().any(|&i| match self.spans[i].2 {
            Span::Byte(b) => all_bytes(found, b),
            Span::Data(d) => {
                let from = x - self.spans[i].0 as usize;
                found == &d[from..from + found.len()]
            }
        })
    }

    /// The spans over `x`, and the next offset where they change.
    fn advance(&mut self, x: u64) {
        while self.next < self.spans.len() && self.spans[self.next].0 <= x {
            self.active.push(self.next);
            self.next += 1;
        }
        let spans = &self.spans;
        self.active.retain(|&i| spans[i].1 > x);
        let next_start = spans.get(self.next).map_or(u64::MAX, |s| s.0);
        let first_end = self.active.iter().map(|&i| spans[i].1).min();
        self.boundary = first_end.map_or(next_start, |e| e.min(next_start));
    }
}

/// Whether a zero may stand at `x` whatever the spans say, given [`Allowed`]'s
/// `(zero_from, base_len, zero_until)`.
fn zero_ok((zero_from, base_len, zero_until): (u64, u64, u64), x: usize) -> bool {
    let x = x as u64;
    x >= zero_from || (x >= base_len && x < zero_until)
}

/// Whether every byte of `found` is `b`, sixteen at a time (a byte loop that stops at the
/// first difference does not vectorise, and most stretches judged are whole).
fn all_bytes(found: &[u8], b: u8) -> bool {
    let want = u128::from_ne_bytes([b; 16]);
    let mut words = found.chunks_exact(16);
    let whole = words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == want);
    whole && words.remainder().iter().all(|&f| f == b)
}

/// Whether [`zero_ok`] holds at every byte of `[x, stop)`: its set is `[zero_from, ..)` and
/// `[base_len, zero_until)`, so a stretch starting in the second runs on past `zero_until`
/// only where the first takes over.
fn zero_ok_over((zero_from, base_len, zero_until): (u64, u64, u64), x: usize, stop: usize) -> bool {
    let (x, stop) = (x as u64, stop as u64);
    x >= zero_from
        || (x >= base_len && x < zero_until && (stop <= zero_until || zero_from <= zero_until))
}

/// The value `e` leaves at byte `x`, if it writes one there.
fn writes(e: &Effect, x: u64) -> Option<u8> {
    match &e.kind {
        EffectKind::Fill { offset, len, byte } if x >= *offset && x < offset + len => Some(*byte),
        EffectKind::Write { offset, data } if x >= *offset && x < offset + data.len() as u64 => {
            Some(data[(x - offset) as usize])
        }
        EffectKind::Zero { offset, len } if x >= *offset && x < offset + len => Some(0),
        _ => None,
    }
}

/// The smallest and largest sizes the baseline and later operations allow.
fn size_bounds(base_len: u64, effects: &[&Effect]) -> (u64, u64) {
    let (mut lo, mut hi) = (base_len, base_len);
    for e in effects {
        match &e.kind {
            EffectKind::Size { size } => {
                lo = lo.min(*size);
                hi = hi.max(*size);
            }
            EffectKind::Fill { offset, len, .. } => hi = hi.max(offset + len),
            EffectKind::Write { offset, data } => hi = hi.max(offset + data.len() as u64),
            _ => {}
        }
    }
    (lo, hi)
}

/// A wrong byte, in words: what was found, what was allowed, whose data it is.
fn describe_byte(
    base: Option<&[u8]>,
    effects: &[&Effect],
    history: &History,
    ino: usize,
    x: u64,
    v: u8,
) -> String {
    let mut allowed: Vec<String> = Vec::new();
    if let Some(b) = base.and_then(|b| b.get(x as usize)) {
        allowed.push(format!("{} (durable)", show(*b)));
    }
    for e in effects {
        if let Some(w) = writes(e, x) {
            allowed.push(format!("{} (op {})", show(w), e.op));
        }
    }
    let owner = history
        .effects
        .iter()
        .rev()
        .filter(|_| v != 0)
        .find(|e| matches!(e.kind, EffectKind::Fill { byte, .. } if byte == v))
        .map(|e| {
            if e.ino == ino {
                format!("; it is data op {} wrote to this file", e.op)
            } else {
                format!(
                    "; it is data op {} wrote to {} (stale data of another file)",
                    e.op,
                    crate::ops::file_name(e.ino)
                )
            }
        })
        .unwrap_or_default();
    format!(
        "byte {x}: found {}, allowed {}{owner}",
        show(v),
        if allowed.is_empty() {
            "nothing (no operation wrote there)".into()
        } else {
            allowed.join(" or ")
        }
    )
}

fn show(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("0x{b:02x}")
    }
}

/// Names against their baseline (`(names, cut, promised by)`) and later operations.
fn judge_names(
    history: &History,
    (base, from, by): (&BTreeMap<String, usize>, usize, Option<u32>),
    fs: &Fs,
) -> Vec<CrashViolation> {
    let mut later: BTreeMap<&str, Vec<Option<usize>>> = BTreeMap::new();
    for e in &history.effects[from.min(history.effects.len())..] {
        if let EffectKind::Name { name, to } = &e.kind {
            later.entry(name).or_default().push(*to);
        }
    }
    let found: BTreeMap<&str, usize> = fs
        .dir
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.ino as usize))
        .collect();
    let mut out = Vec::new();
    let mut bad = |name: &str, what: String| {
        out.push(CrashViolation {
            file: name.to_string(),
            ino: None,
            what,
            promised_by: by,
        })
    };
    for (name, &slot) in base {
        let changes = later.get(name.as_str());
        match found.get(name.as_str()) {
            None if !changes.is_some_and(|c| c.contains(&None)) => bad(
                name,
                "is missing, though it was durable and no later operation removed it".into(),
            ),
            Some(&s) if s != slot && !changes.is_some_and(|c| c.contains(&Some(s))) => bad(
                name,
                format!(
                    "names inode {s}; durably it named {slot}, and no later operation moved it"
                ),
            ),
            _ => {}
        }
    }
    for (name, &s) in &found {
        if base.contains_key(*name) {
            continue;
        }
        if !later.get(name).is_some_and(|c| c.contains(&Some(s))) {
            bad(
                name,
                format!("names inode {s}, but no operation after the durable state made it"),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The rule, byte by byte and with no shortcuts: what `check_bytes`' sweep must agree with.
    fn admitted(base: &[u8], effects: &[&Effect], x: u64, v: u8) -> bool {
        let a = Allowed::new(base.len() as u64, effects);
        let zeros = (a.zero_from, a.base_len, a.zero_until);
        base.get(x as usize) == Some(&v)
            || effects.iter().any(|e| writes(e, x) == Some(v))
            || (v == 0 && zero_ok(zeros, x as usize))
    }

    /// The stretch shortcut of the sweep agrees with the byte rule on every small case (a
    /// stretch that starts in `[base_len, zero_until)` and crosses a gap before `zero_from`
    /// must not be admitted whole).
    #[test]
    fn zero_stretches_agree_with_the_byte_rule() {
        for zeros in zero_cases(8) {
            for x in 0..9 {
                for stop in x + 1..10 {
                    let each = (x..stop).all(|b| zero_ok(zeros, b));
                    assert_eq!(zero_ok_over(zeros, x, stop), each, "{zeros:?} {x}..{stop}");
                }
            }
        }
    }

    /// Every `(zero_from, base_len, zero_until)` with values below `n`, and `u64::MAX` as
    /// `zero_from` (no truncate).
    fn zero_cases(n: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        for f in (0..n).chain([u64::MAX]) {
            for b in 0..n {
                for u in 0..n {
                    out.push((f, b, u));
                }
            }
        }
        out
    }

    fn effect(kind: EffectKind) -> Effect {
        Effect {
            op: 1,
            ino: 0,
            kind,
        }
    }

    fn arb_effect() -> impl Strategy<Value = Effect> {
        prop_oneof![
            (0u64..3000, 1u64..900, 0u8..4)
                .prop_map(|(offset, len, byte)| effect(EffectKind::Fill { offset, len, byte })),
            (0u64..3000, proptest::collection::vec(0u8..4, 1..700))
                .prop_map(|(offset, data)| effect(EffectKind::Write { offset, data })),
            (0u64..3000, 1u64..900)
                .prop_map(|(offset, len)| effect(EffectKind::Zero { offset, len })),
            (0u64..4000).prop_map(|size| effect(EffectKind::Size { size })),
        ]
    }

    proptest! {
        /// The stretch-at-a-time sweep finds exactly the first byte the plain rule refuses.
        #[test]
        fn sweep_agrees_with_the_rule(
            base in proptest::collection::vec(0u8..4, 0..3000),
            effects in proptest::collection::vec(arb_effect(), 0..8),
            found in proptest::collection::vec(0u8..4, 0..4000),
        ) {
            let refs: Vec<&Effect> = effects.iter().collect();
            let mut a = Allowed::new(base.len() as u64, &refs);
            let mut got = None;
            for start in (0..found.len()).step_by(SAME_CHUNK_BYTES) {
                let end = (start + SAME_CHUNK_BYTES).min(found.len());
                got = a.first_refused(&found, &base, start, end);
                if got.is_some() {
                    break;
                }
            }
            let want = (0..found.len()).find(|&x| !admitted(&base, &refs, x as u64, found[x]));
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_byte_no_one_wrote_is_named() {
        let w = effect(EffectKind::Write {
            offset: 10,
            data: vec![7; 20],
        });
        let history = History::default();
        let found = Found {
            in_use: true,
            generation: 0,
            data: {
                let mut d = vec![1u8; 40];
                d[10..30].fill(7);
                d[25] = 9;
                d
            },
        };
        let base = vec![1u8; 40];
        let what = check_bytes(Some(&base), &[&w], &found, &history, 0).expect("byte 25 is wrong");
        assert!(what.contains("byte 25"), "{what}");
        let mut fine = found.clone();
        fine.data[25] = 7;
        assert_eq!(check_bytes(Some(&base), &[&w], &fine, &history, 0), None);
    }
}
