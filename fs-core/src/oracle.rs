//! The oracle: an fsx-style model of every file's bytes, updated at each operation's
//! linearisation point (the step where its effect becomes visible: a folio's copy in
//! `write_end`, the store of an mmap store, the locked start of punch/zero range, the size
//! change of truncate), and the invariants checked at quiescent points.
//!
//! Because every step is atomic and each effect is applied at its own step, the legal
//! content of a file after a given schedule is exactly one byte string: a buffered write and
//! an mmap store racing on the same bytes are ordered by the steps that copied them. A read
//! must return the model's bytes at the step it copies a folio out.

use crate::block::BLOCK_SIZE;
use crate::extent::ExtentState;
use crate::fs::{Fs, Violation};
use serde::{Deserialize, Serialize};

/// What one operation did to one file (or name), at its linearisation point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EffectKind {
    /// One byte value repeated (what workloads write; no copy kept).
    Fill {
        offset: u64,
        len: u64,
        byte: u8,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Size {
        size: u64,
    },
    /// The inode slot holds a new, empty file of this generation.
    Created {
        generation: u64,
    },
    /// The inode lost its last name and is gone.
    Gone,
    /// The name now names the inode `ino` (`Some`), or nothing (`None`); `Effect::ino` is
    /// the slot it named before, or the new one.
    Name {
        name: String,
        to: Option<usize>,
    },
}

/// One effect, in the order they happened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effect {
    pub op: u32,
    pub ino: usize,
    pub kind: EffectKind,
}

/// One file as a persistence point saw it when it started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileImage {
    pub live: bool,
    pub generation: u64,
    pub data: Vec<u8>,
}

/// What a persistence point (fsync, fdatasync, sync) promised once it completed: the files it
/// covers (one for fsync and fdatasync, all of them and the names for sync) as the effects
/// before `effects_at` made them, less what operations still running then did (they had not
/// completed: their effects may or may not be durable).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promise {
    /// The operation, and the mark its completion put in the device's log.
    pub op: u32,
    pub mark: String,
    /// `Some(ino)` for fsync and fdatasync of that file; `None` for sync.
    pub file: Option<usize>,
    /// Effects before this index had happened when it started.
    pub effects_at: usize,
    /// Workload operations running when it started.
    pub running: Vec<u32>,
    /// When the operation completed: its place among the completed persistence points
    /// (the order of their marks in the device's log).
    pub done: Option<u64>,
}

/// Where a wrong byte was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seen {
    /// Returned by a buffered read (operation index).
    Read { op: u32 },
    /// Read back after sync and dropping the page cache.
    AfterSync,
    /// Held in an uptodate block of the page cache when no operation was running (what the
    /// next read would return).
    Cached,
}

/// A failed check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    WrongData {
        file: usize,
        offset: u64,
        expected: u8,
        found: u8,
        /// Operation whose effect the model holds at that byte (None: never written, zero).
        expected_from: Option<u32>,
        /// Latest operation that put the found value there (None: nobody; the filesystem
        /// made it up, e.g. zero-fill from a stale mapping).
        found_from: Option<u32>,
        seen: Seen,
    },
    WrongSize {
        file: usize,
        expected: u64,
        found: u64,
    },
    Invariant {
        what: String,
    },
    Deadlock {
        blocked: Vec<String>,
    },
    StepLimit {
        steps: u64,
    },
    Harness {
        what: String,
    },
}

/// A run's history as the oracle saw it: the files at the start, every effect in order, and
/// every persistence point. A crash state of the run is judged against it
/// ([`crate::crash`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    pub start: Vec<FileImage>,
    pub start_names: std::collections::BTreeMap<String, usize>,
    pub effects: Vec<Effect>,
    pub promises: Vec<Promise>,
}

/// How much the oracle keeps. A workload run keeps everything; a long-lived engine (an NBD
/// export that is a file of fs-core) cannot keep every effect, and may not keep the files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tracking {
    /// The files' bytes, every effect and every promise: reads are checked with attribution,
    /// and crash states can be judged against the history.
    #[default]
    Full,
    /// The files' bytes only: reads are checked (no attribution); memory is the files' size.
    Files,
    /// Nothing: reads are not checked. Memory does not grow with the run.
    Off,
}

/// The model of all files.
#[derive(Clone, Debug, Default)]
pub struct Oracle {
    tracking: Tracking,
    /// The files and names when the run started.
    start: Vec<FileImage>,
    start_names: std::collections::BTreeMap<String, usize>,
    files: Vec<Vec<u8>>,
    /// Per slot: whether it holds a live file, and its generation.
    live: Vec<(bool, u64)>,
    /// The directory, when the filesystem has one.
    names: std::collections::BTreeMap<String, usize>,
    effects: Vec<Effect>,
    promises: Vec<Promise>,
    /// Workload operations started and not completed.
    running: std::collections::BTreeSet<u32>,
    /// Direct writes between their IO and their return: a read of those bytes may see the
    /// old or the new ones.
    in_flux: Vec<InFlux>,
    /// What the page cache held that the file did not, at quiescence (reported last).
    incoherent: Option<Failure>,
    pub failures: Vec<Failure>,
}

/// The bytes of a direct write in flight (see [`Oracle::dio_begin`]).
#[derive(Clone, Debug, Default)]
struct InFlux {
    op: u32,
    ino: usize,
    offset: u64,
    old: Vec<u8>,
    new: Vec<u8>,
}

impl InFlux {
    /// Whether `found` at byte `at` of `ino` is one of the two values it may read as.
    fn admits(&self, ino: usize, at: u64, found: u8) -> bool {
        if ino != self.ino || at < self.offset {
            return false;
        }
        let i = (at - self.offset) as usize;
        i < self.new.len() && (self.new[i] == found || self.old[i] == found)
    }
}

impl Oracle {
    pub fn new(files: usize) -> Self {
        let empty = FileImage {
            live: true,
            generation: 1,
            data: Vec::new(),
        };
        Oracle {
            start: vec![empty; files],
            files: vec![Vec::new(); files],
            live: vec![(true, 1); files],
            names: Default::default(),
            start_names: Default::default(),
            effects: Vec::new(),
            promises: Vec::new(),
            running: Default::default(),
            in_flux: Vec::new(),
            incoherent: None,
            failures: Vec::new(),
            tracking: Tracking::Full,
        }
    }

    /// The same oracle keeping only what `tracking` says (set it before the first effect).
    pub fn tracking(mut self, tracking: Tracking) -> Self {
        self.tracking = tracking;
        if tracking == Tracking::Off {
            for f in &mut self.files {
                *f = Vec::new();
            }
            for f in &mut self.start {
                f.data = Vec::new();
            }
        }
        self
    }

    fn keeps_files(&self) -> bool {
        self.tracking != Tracking::Off
    }

    fn keeps_history(&self) -> bool {
        self.tracking == Tracking::Full
    }

    fn push(&mut self, effect: Effect) {
        if self.keeps_history() {
            self.effects.push(effect);
        }
    }

    /// A model of a filesystem that persists, as mounted: each slot's liveness, generation
    /// and content, and the directory.
    pub fn mounted(
        files: Vec<(bool, u64, Vec<u8>)>,
        names: std::collections::BTreeMap<String, usize>,
    ) -> Self {
        Oracle {
            start: files
                .iter()
                .map(|f| FileImage {
                    live: f.0,
                    generation: f.1,
                    data: f.2.clone(),
                })
                .collect(),
            live: files.iter().map(|f| (f.0, f.1)).collect(),
            files: files.into_iter().map(|f| f.2).collect(),
            start_names: names.clone(),
            names,
            ..Oracle::default()
        }
    }

    /// The run's history so far.
    pub fn history(&self) -> History {
        History {
            start: self.start.clone(),
            start_names: self.start_names.clone(),
            effects: self.effects.clone(),
            promises: self.promises.clone(),
        }
    }

    /// Every effect so far, in order.
    pub fn effects(&self) -> &[Effect] {
        &self.effects
    }

    /// Every persistence point started so far.
    pub fn promises(&self) -> &[Promise] {
        &self.promises
    }

    /// The slot `ino` gets a new, empty file of `generation`.
    pub fn created(&mut self, ino: usize, generation: u64, op: u32) {
        self.files[ino].clear();
        self.live[ino] = (true, generation);
        self.push(Effect {
            op,
            ino,
            kind: EffectKind::Created { generation },
        });
    }

    /// The file in slot `ino` is gone (its last name went).
    pub fn gone(&mut self, ino: usize, op: u32) {
        self.files[ino].clear();
        self.live[ino].0 = false;
        self.push(Effect {
            op,
            ino,
            kind: EffectKind::Gone,
        });
    }

    /// `name` now names slot `to` (or nothing).
    pub fn name(&mut self, name: &str, to: Option<usize>, op: u32) {
        let before = match to {
            Some(ino) => self.names.insert(name.to_owned(), ino),
            None => self.names.remove(name),
        };
        self.push(Effect {
            op,
            ino: to.or(before).unwrap_or(usize::MAX),
            kind: EffectKind::Name {
                name: name.to_owned(),
                to,
            },
        });
    }

    /// A persistence point starts: what it covers is taken as it is now. `file: None` is
    /// sync (every file, and the names).
    pub fn promise_begin(&mut self, op: u32, file: Option<usize>) {
        if !self.keeps_history() {
            return;
        }
        self.promises.push(Promise {
            op,
            mark: format!("p{op}"),
            file,
            effects_at: self.effects.len(),
            running: self.running.iter().copied().filter(|&o| o != op).collect(),
            done: None,
        });
    }

    /// Workload operation `op` started (`true`) or completed.
    pub fn running(&mut self, op: u32, running: bool) {
        if running {
            self.running.insert(op);
        } else {
            self.running.remove(&op);
        }
    }

    /// The persistence point of `op` completed; returns its mark.
    pub fn promise_done(&mut self, op: u32) -> Option<String> {
        let order = self.promises.iter().filter(|p| p.done.is_some()).count() as u64;
        let p = self.promises.iter_mut().rev().find(|p| p.op == op)?;
        p.done = Some(order);
        Some(p.mark.clone())
    }

    pub fn file(&self, ino: usize) -> &[u8] {
        &self.files[ino]
    }

    pub fn write(&mut self, ino: usize, offset: u64, data: &[u8], op: u32) {
        if !self.keeps_files() {
            return;
        }
        let f = &mut self.files[ino];
        let end = offset as usize + data.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[offset as usize..end].copy_from_slice(data);
        let kind = match data.first() {
            // A branch-free fold vectorises; `all` with its early exit does not.
            Some(&b) if data.iter().fold(true, |same, &x| same & (x == b)) => EffectKind::Fill {
                offset,
                len: data.len() as u64,
                byte: b,
            },
            _ => EffectKind::Write {
                offset,
                data: data.to_vec(),
            },
        };
        self.push(Effect { op, ino, kind });
    }

    /// A direct write of `new` at `offset` submitted its IO: until [`Oracle::dio_end`], a
    /// buffered read of those bytes may return the old ones or the new ones (the read and the
    /// write are concurrent; which one the read sees depends on the page cache and the
    /// extent state at its step). The new bytes become the file's with [`Oracle::write`] at
    /// the write's completion.
    pub fn dio_begin(&mut self, ino: usize, offset: u64, new: &[u8], op: u32) {
        if !self.keeps_files() {
            return;
        }
        let f = &self.files[ino];
        let old = (0..new.len() as u64)
            .map(|i| f.get((offset + i) as usize).copied().unwrap_or(0))
            .collect();
        self.in_flux.push(InFlux {
            op,
            ino,
            offset,
            old,
            new: new.to_vec(),
        });
    }

    /// The direct write of `op` returned: its bytes are the file's, one value each.
    pub fn dio_end(&mut self, op: u32) {
        self.in_flux.retain(|d| d.op != op);
    }

    /// Zero `[offset, offset + len)` inside the current size (punch, zero range).
    pub fn zero(&mut self, ino: usize, offset: u64, len: u64, op: u32) {
        if !self.keeps_files() {
            return;
        }
        let f = &mut self.files[ino];
        let start = (offset as usize).min(f.len());
        let end = ((offset + len) as usize).min(f.len());
        f[start..end].fill(0);
        self.push(Effect {
            op,
            ino,
            kind: EffectKind::Zero { offset, len },
        });
    }

    pub fn set_size(&mut self, ino: usize, size: u64, op: u32) {
        if !self.keeps_files() {
            return;
        }
        self.files[ino].resize(size as usize, 0);
        self.push(Effect {
            op,
            ino,
            kind: EffectKind::Size { size },
        });
    }

    /// Latest operation whose effect left `value` at (ino, offset).
    fn who_wrote(&self, ino: usize, offset: u64, value: Option<u8>) -> Option<u32> {
        for e in self.effects.iter().rev().filter(|e| e.ino == ino) {
            let v = match &e.kind {
                EffectKind::Write { offset: o, data }
                    if offset >= *o && offset < o + data.len() as u64 =>
                {
                    Some(data[(offset - o) as usize])
                }
                EffectKind::Fill {
                    offset: o,
                    len,
                    byte,
                } if offset >= *o && offset < o + len => Some(*byte),
                EffectKind::Zero { offset: o, len } if offset >= *o && offset < o + len => Some(0),
                EffectKind::Size { size } if offset >= *size => Some(0),
                // An earlier incarnation's bytes are not this file's.
                EffectKind::Created { .. } | EffectKind::Gone => return None,
                _ => None,
            };
            if let Some(v) = v {
                if value.is_none_or(|want| want == v) {
                    return Some(e.op);
                }
            }
        }
        None
    }

    fn compare(&self, ino: usize, offset: u64, got: &[u8], seen: Seen) -> Option<Failure> {
        let model = &self.files[ino];
        for (i, &found) in got.iter().enumerate() {
            let at = offset + i as u64;
            let expected = model.get(at as usize).copied().unwrap_or(0);
            let in_flux = || self.in_flux.iter().any(|d| d.admits(ino, at, found));
            if found != expected && !in_flux() {
                return Some(Failure::WrongData {
                    file: ino,
                    offset: at,
                    expected,
                    found,
                    expected_from: self.who_wrote(ino, at, Some(expected)),
                    found_from: self.who_wrote(ino, at, Some(found)),
                    seen,
                });
            }
        }
        None
    }

    /// A read returned `got` for `[offset, ..)`: it must be the model's bytes now.
    pub fn check_read(&mut self, ino: usize, offset: u64, got: &[u8], op: u32) {
        if !self.keeps_files() {
            return;
        }
        if let Some(f) = self.compare(ino, offset, got, Seen::Read { op }) {
            self.failures.push(f);
        }
    }

    /// Invariants that hold whenever no operation is in flight: violations recorded by
    /// writeback, no dirty folio over a HOLE, no DELALLOC without a dirty folio.
    pub fn check_quiescent(&mut self, fs: &Fs) {
        for (ino, idx) in fs.dirty_hint_misses() {
            self.failures.push(Failure::Invariant {
                what: format!("folio {idx} of file {ino} is dirty, and the flusher cannot know"),
            });
        }
        for v in &fs.violations {
            self.failures.push(Failure::Invariant {
                what: v.to_string(),
            });
        }
        for (ino, inode) in fs.inodes.iter().enumerate() {
            for (idx, f) in inode.cache.folios.iter() {
                let (first, nb) = (fs.folio_start(idx), f.blocks());
                // Blocks past EOF may be dirty (page_mkwrite dirties the whole folio);
                // writeback never writes them.
                let past_eof = |i: u64| (first + i) * BLOCK_SIZE as u64 >= inode.size;
                for i in (0..nb).filter(|&i| f.dirty && f.block_dirty(i) && !past_eof(i)) {
                    let fblock = first + i;
                    let lo = first * BLOCK_SIZE as u64;
                    if inode.extents.get(fblock).state == ExtentState::Hole
                        && f.block_holds_data(i, lo, inode.size)
                    {
                        let v = Violation::DirtyFolioOverHole { ino, fblock };
                        self.failures.push(Failure::Invariant {
                            what: format!("quiescent: {v}"),
                        });
                    }
                }
            }
            for b in 0..inode.extents.span() {
                let idx = fs.folio_of(ino, b);
                if inode.extents.get(b).state == ExtentState::Delalloc
                    && !inode
                        .cache
                        .get(idx)
                        .is_some_and(|f| f.dirty && f.block_dirty(b - fs.folio_start(idx)))
                {
                    self.failures.push(Failure::Invariant {
                        what: format!(
                            "file {ino} block {b} is DELALLOC without a dirty folio over it"
                        ),
                    });
                }
            }
        }
        self.check_cache_coherent(fs);
    }

    /// With nothing running, every uptodate block of the page cache holds the file's bytes
    /// below EOF (a read would return them): a folio filled through a mapping that went stale
    /// before it was dropped shows here even if nothing reads it again and sync drops it.
    /// The failure is kept aside and reported by [`Oracle::check_cached`] only if the run
    /// fails no other way, so that a run's first failure stays what it was before this check.
    fn check_cache_coherent(&mut self, fs: &Fs) {
        if !self.keeps_files() || !self.failures.is_empty() {
            return;
        }
        let bs = BLOCK_SIZE as u64;
        for (ino, inode) in fs.inodes.iter().enumerate().filter(|(_, i)| i.in_use) {
            for (idx, f) in inode.cache.folios.iter() {
                let first = fs.folio_start(idx);
                for i in (0..f.blocks()).filter(|&i| f.block_uptodate(i)) {
                    let lo = (first + i) * bs;
                    let hi = (lo + bs).min(inode.size);
                    if lo >= hi {
                        continue;
                    }
                    let at = (i * bs) as usize;
                    let got = &f.data[at..at + (hi - lo) as usize];
                    if let Some(fail) = self.compare(ino, lo, got, Seen::Cached) {
                        self.incoherent = Some(fail);
                        return;
                    }
                }
            }
        }
    }

    /// The last check of a run: a page cache found incoherent at quiescence fails it, if
    /// nothing else did.
    pub fn check_cached(&mut self) {
        if let Some(f) = self.incoherent.take() {
            if self.failures.is_empty() {
                self.failures.push(f);
            }
        }
    }

    /// After sync and dropping the page cache: every file must equal its model.
    pub fn check_durable(&mut self, ino: usize, got: &[u8]) {
        if !self.keeps_files() {
            return;
        }
        if let Some(f) = self.compare(ino, 0, got, Seen::AfterSync) {
            self.failures.push(f);
        }
        let expected = self.files[ino].len() as u64;
        if got.len() as u64 != expected {
            self.failures.push(Failure::WrongSize {
                file: ino,
                expected,
                found: got.len() as u64,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_wrong_byte_names_both_writers() {
        let mut o = Oracle::new(1);
        o.write(0, 0, &[b'A'; 10], 0);
        o.write(0, 5, &[b'B'; 10], 1);
        let mut got = o.file(0).to_vec();
        got[7] = b'A';
        o.check_durable(0, &got);
        assert_eq!(
            o.failures[0],
            Failure::WrongData {
                file: 0,
                offset: 7,
                expected: b'B',
                found: b'A',
                expected_from: Some(1),
                found_from: Some(0),
                seen: Seen::AfterSync
            }
        );
    }

    #[test]
    fn zero_fill_is_attributed_to_nobody() {
        let mut o = Oracle::new(1);
        o.write(0, 0, &[b'X'; 4], 3);
        o.check_durable(0, &[b'X', 0, b'X', b'X']);
        assert!(matches!(
            o.failures[0],
            Failure::WrongData {
                offset: 1,
                found_from: None,
                expected_from: Some(3),
                ..
            }
        ));
    }
}
