//! The oracle: an fsx-style model of every file's bytes, updated at each operation's
//! linearisation point (the step where its effect becomes visible: a folio's copy in
//! `write_end`, the store of an mmap store, the locked start of punch/zero range, the size
//! change of truncate), and the invariants checked at quiescent points.
//!
//! Because every step is atomic and each effect is applied at its own step, the legal
//! content of a file after a given schedule is exactly one byte string: a buffered write and
//! an mmap store racing on the same bytes are ordered by the steps that copied them. A read
//! must return the model's bytes at the step it copies a folio out.

use crate::extent::ExtentState;
use crate::fs::{Fs, Violation};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug)]
enum EffectKind {
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
}

#[derive(Clone, Debug)]
struct Effect {
    op: u32,
    ino: usize,
    kind: EffectKind,
}

/// Where a wrong byte was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seen {
    /// Returned by a buffered read (operation index).
    Read { op: u32 },
    /// Read back after sync and dropping the page cache.
    AfterSync,
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

/// The model of all files.
#[derive(Clone, Debug, Default)]
pub struct Oracle {
    files: Vec<Vec<u8>>,
    effects: Vec<Effect>,
    pub failures: Vec<Failure>,
}

impl Oracle {
    pub fn new(files: usize) -> Self {
        Oracle {
            files: vec![Vec::new(); files],
            effects: Vec::new(),
            failures: Vec::new(),
        }
    }

    pub fn file(&self, ino: usize) -> &[u8] {
        &self.files[ino]
    }

    pub fn write(&mut self, ino: usize, offset: u64, data: &[u8], op: u32) {
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
        self.effects.push(Effect { op, ino, kind });
    }

    /// Zero `[offset, offset + len)` inside the current size (punch, zero range).
    pub fn zero(&mut self, ino: usize, offset: u64, len: u64, op: u32) {
        let f = &mut self.files[ino];
        let start = (offset as usize).min(f.len());
        let end = ((offset + len) as usize).min(f.len());
        f[start..end].fill(0);
        self.effects.push(Effect {
            op,
            ino,
            kind: EffectKind::Zero { offset, len },
        });
    }

    pub fn set_size(&mut self, ino: usize, size: u64, op: u32) {
        self.files[ino].resize(size as usize, 0);
        self.effects.push(Effect {
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
            if found != expected {
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
        if let Some(f) = self.compare(ino, offset, got, Seen::Read { op }) {
            self.failures.push(f);
        }
    }

    /// Invariants that hold whenever no operation is in flight: violations recorded by
    /// writeback, no dirty folio over a HOLE, no DELALLOC without a dirty folio.
    pub fn check_quiescent(&mut self, fs: &Fs) {
        for v in &fs.violations {
            self.failures.push(Failure::Invariant {
                what: v.to_string(),
            });
        }
        for (ino, inode) in fs.inodes.iter().enumerate() {
            for (idx, f) in &inode.cache.folios {
                if f.dirty && inode.extents.get(*idx).state == ExtentState::Hole {
                    let v = Violation::DirtyFolioOverHole { ino, fblock: *idx };
                    self.failures.push(Failure::Invariant {
                        what: format!("quiescent: {v}"),
                    });
                }
            }
            for b in 0..inode.extents.span() {
                if inode.extents.get(b).state == ExtentState::Delalloc
                    && !inode.cache.get(b).is_some_and(|f| f.dirty)
                {
                    self.failures.push(Failure::Invariant {
                        what: format!(
                            "file {ino} block {b} is DELALLOC without a dirty folio over it"
                        ),
                    });
                }
            }
        }
    }

    /// After sync and dropping the page cache: every file must equal its model.
    pub fn check_durable(&mut self, ino: usize, got: &[u8]) {
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
