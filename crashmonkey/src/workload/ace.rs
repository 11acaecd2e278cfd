//! Workloads in the manner of ACE (CrashMonkey's Automatic Crash Explorer): a setup made
//! durable, then core operations over a small fixed set of files and directories, each
//! followed by one persistence point and a mark.
//!
//! `--seq 1` is bounded and exhaustive: every core operation (with its parameter choices
//! below) times every persistence point that can apply to it. `--seq 2` is a seeded sample
//! of two such pairs in a row.

use super::{FallocMode, KOp, KWorkload};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};

/// The regular files the setup makes (16 KiB each, with a `user.a` attribute).
pub const SETUP_FILES: [&str; 2] = ["foo", "A/foo"];
/// Bytes of each setup file.
pub const SETUP_FILE_BYTES: u64 = 16384;
/// Most workloads `--seq 2` samples in one call.
pub const SEQ2_SAMPLES_MAX: usize = 100_000;

/// Byte ranges of buffered writes: append, aligned overwrite, unaligned overwrite, a write
/// past EOF leaving a gap.
const WRITE_RANGES: [(u64, u64); 4] = [(16384, 4096), (4096, 4096), (1000, 3000), (32768, 4096)];
/// Direct writes: aligned overwrite, aligned append.
const DIRECT_RANGES: [(u64, u64); 2] = [(4096, 4096), (16384, 4096)];
/// mmap stores stay inside the file (a store past EOF is SIGBUS).
const MMAP_RANGES: [(u64, u64); 2] = [(4096, 4096), (1000, 100)];
/// fallocate inside the file and past EOF.
const FALLOC_RANGES: [(u64, u64); 2] = [(4096, 8192), (16384, 8192)];
const TRUNCATE_SIZES: [u64; 4] = [0, 2048, 8192, 32768];

/// What `setup` leaves, durable, before the core operations.
pub fn setup() -> Vec<KOp> {
    let mut ops = vec![KOp::Mkdir("A".into())];
    for (i, f) in SETUP_FILES.iter().enumerate() {
        ops.push(KOp::Creat((*f).into()));
        ops.push(KOp::Write {
            path: (*f).into(),
            offset: 0,
            len: SETUP_FILE_BYTES,
            byte: b'a' + i as u8,
        });
        ops.push(KOp::SetXattr {
            path: (*f).into(),
            name: "user.a".into(),
            value: "v0".into(),
        });
    }
    ops.push(KOp::Sync);
    ops.push(KOp::Mark("setup".into()));
    ops
}

/// A core operation and what a persistence point after it may target.
struct Core {
    op: KOp,
    /// Files whose data the operation changed (fsync, fdatasync).
    files: Vec<String>,
    /// Directories whose entries it changed (fsync).
    dirs: Vec<String>,
}

fn parent(p: &str) -> String {
    p.rsplit_once('/').map_or(".".into(), |(d, _)| d.to_owned())
}

fn data_core(f: &str, byte: u8) -> Vec<Core> {
    let file = |op| Core {
        op,
        files: vec![f.into()],
        dirs: Vec::new(),
    };
    let path = || f.to_owned();
    let mut out = Vec::new();
    for (offset, len) in WRITE_RANGES {
        out.push(file(KOp::Write {
            path: path(),
            offset,
            len,
            byte,
        }));
    }
    for (offset, len) in DIRECT_RANGES {
        out.push(file(KOp::DirectWrite {
            path: path(),
            offset,
            len,
            byte,
        }));
    }
    for (offset, len) in MMAP_RANGES {
        out.push(file(KOp::MmapWrite {
            path: path(),
            offset,
            len,
            byte,
        }));
    }
    for mode in FallocMode::ALL {
        for (offset, len) in FALLOC_RANGES {
            out.push(file(KOp::Falloc {
                path: path(),
                mode,
                offset,
                len,
            }));
        }
    }
    for size in TRUNCATE_SIZES {
        out.push(file(KOp::Truncate { path: path(), size }));
    }
    out.push(file(KOp::SetXattr {
        path: path(),
        name: "user.b".into(),
        value: "v1".into(),
    }));
    out.push(file(KOp::RemoveXattr {
        path: path(),
        name: "user.a".into(),
    }));
    out
}

fn namespace_core() -> Vec<Core> {
    let mut out = Vec::new();
    let entry = |op, made: Option<&str>, dirs: Vec<String>| Core {
        op,
        files: made.map(|m| vec![m.to_owned()]).unwrap_or_default(),
        dirs,
    };
    for f in ["bar", "A/bar"] {
        out.push(entry(KOp::Creat(f.into()), Some(f), vec![parent(f)]));
    }
    for d in ["B", "A/C"] {
        out.push(entry(KOp::Mkdir(d.into()), None, vec![parent(d), d.into()]));
    }
    for (from, to) in [("foo", "bar"), ("A/foo", "A/bar"), ("foo", "A/bar")] {
        let op = KOp::Link {
            from: from.into(),
            to: to.into(),
        };
        out.push(entry(op, Some(to), vec![parent(to)]));
    }
    for f in SETUP_FILES {
        out.push(entry(KOp::Unlink(f.into()), None, vec![parent(f)]));
    }
    let renames = [
        ("foo", "bar"),
        ("A/foo", "A/bar"),
        ("foo", "A/bar"),
        ("A/foo", "foo"),
        ("A", "B"),
    ];
    for (from, to) in renames {
        let mut dirs = vec![parent(to)];
        if parent(from) != parent(to) {
            dirs.push(parent(from));
        }
        let op = KOp::Rename {
            from: from.into(),
            to: to.into(),
        };
        let made = (from != "A").then_some(to);
        out.push(entry(op, made, dirs));
    }
    out
}

/// Every core operation of `--seq 1`, with `byte` as its data.
fn core_ops(byte: u8) -> Vec<Core> {
    let mut out: Vec<Core> = SETUP_FILES
        .iter()
        .flat_map(|f| data_core(f, byte))
        .collect();
    out.extend(namespace_core());
    out
}

/// The persistence points that apply after `c`: fsync and fdatasync of each file it changed,
/// fsync of each directory, and sync.
fn persistence_points(c: &Core) -> Vec<KOp> {
    let mut out = Vec::new();
    for f in &c.files {
        out.push(KOp::Fsync(f.clone()));
        out.push(KOp::Fdatasync(f.clone()));
    }
    for d in &c.dirs {
        out.push(KOp::Fsync(d.clone()));
    }
    out.push(KOp::Sync);
    out
}

/// The whole `--seq 1` set, in a fixed order, named `seq1-NNNN`.
pub fn seq1() -> Vec<KWorkload> {
    let mut out = Vec::new();
    for c in core_ops(b'X') {
        for p in persistence_points(&c) {
            let mut ops = setup();
            ops.push(c.op.clone());
            ops.push(p);
            ops.push(KOp::Mark("p1".into()));
            out.push(KWorkload {
                name: format!("seq1-{:04}", out.len() + 1),
                ops,
            });
        }
    }
    out
}

/// Draws of a core operation `--seq 2` makes, at most, to find one that applies after the
/// first (every draw is seeded, so the same seed still gives the same workloads).
const SEQ2_DRAWS_MAX: usize = 10_000;

/// `count` seeded `--seq 2` workloads: two core operations, each followed by one of its
/// persistence points and a mark, named `seq2-S-NNNN`. The same seed gives the same list.
/// The second operation is drawn among those that apply after the first ([`Tree`]): no
/// link over an existing name, no write to a file the first one renamed away.
pub fn seq2(seed: u64, count: usize) -> Vec<KWorkload> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (first, second) = (core_ops(b'X'), core_ops(b'Y'));
    (0..count.min(SEQ2_SAMPLES_MAX))
        .map(|i| {
            let mut ops = setup();
            let mut tree = Tree::after_setup();
            for (k, cores) in [&first, &second].into_iter().enumerate() {
                let (c, after) = (0..SEQ2_DRAWS_MAX)
                    .find_map(|_| {
                        let c = &cores[rng.random_range(0..cores.len())];
                        let mut t = tree.clone();
                        t.apply(&c.op).then_some((c, t))
                    })
                    .expect("some core operation applies after any first one");
                let points: Vec<KOp> = persistence_points(c)
                    .into_iter()
                    .filter(|p| after.clone().apply(p))
                    .collect();
                ops.push(c.op.clone());
                ops.push(points[rng.random_range(0..points.len())].clone());
                ops.push(KOp::Mark(format!("p{}", k + 1)));
                tree = after;
            }
            KWorkload {
                name: format!("seq2-{seed}-{:04}", i + 1),
                ops,
            }
        })
        .collect()
}

/// What a workload has made of the tree, as far as telling whether the next operation
/// applies: directories, and files by inode (so that links and renames keep a file's size
/// and attributes).
#[derive(Clone, Debug)]
pub struct Tree {
    dirs: BTreeSet<String>,
    files: BTreeMap<String, usize>,
    /// Size and extended attributes of each inode.
    inodes: Vec<(u64, BTreeSet<String>)>,
}

impl Tree {
    /// The tree [`setup`] leaves.
    pub fn after_setup() -> Tree {
        let attrs = BTreeSet::from(["user.a".to_owned()]);
        Tree {
            dirs: [".", "A"].map(String::from).into(),
            files: SETUP_FILES
                .iter()
                .enumerate()
                .map(|(i, f)| ((*f).to_owned(), i))
                .collect(),
            inodes: vec![(SETUP_FILE_BYTES, attrs.clone()), (SETUP_FILE_BYTES, attrs)],
        }
    }

    fn exists(&self, p: &str) -> bool {
        self.dirs.contains(p) || self.files.contains_key(p)
    }

    /// A file at `p`, made (empty) when missing and its directory exists, as `creat`,
    /// `xfs_io -f` and `truncate -s` do.
    fn file(&mut self, p: &str) -> Option<usize> {
        if let Some(&i) = self.files.get(p) {
            return Some(i);
        }
        if self.dirs.contains(p) || !self.dirs.contains(&parent(p)) {
            return None;
        }
        self.inodes.push((0, BTreeSet::new()));
        self.files.insert(p.to_owned(), self.inodes.len() - 1);
        Some(self.inodes.len() - 1)
    }

    /// Applies `op` if it applies here (its sources exist, its new names do not, an mmap
    /// store stays inside the file); says whether it did. Leaves a partial change when it
    /// did not: callers apply to a copy.
    pub fn apply(&mut self, op: &KOp) -> bool {
        match op {
            KOp::Creat(p) => self.file(p).map(|i| self.inodes[i].0 = 0).is_some(),
            KOp::Mkdir(p) => {
                let ok = !self.exists(p) && self.dirs.contains(&parent(p));
                ok && self.dirs.insert(p.clone())
            }
            KOp::Write {
                path, offset, len, ..
            }
            | KOp::DirectWrite {
                path, offset, len, ..
            } => self.grow(path, offset + len),
            KOp::MmapWrite {
                path, offset, len, ..
            } => self
                .files
                .get(path)
                .is_some_and(|&i| offset + len <= self.inodes[i].0),
            KOp::Falloc {
                path,
                mode,
                offset,
                len,
            } => match mode {
                FallocMode::Alloc | FallocMode::ZeroRange => {
                    self.files.contains_key(path) && self.grow(path, offset + len)
                }
                _ => self.files.contains_key(path),
            },
            KOp::Truncate { path, size } => {
                self.file(path).map(|i| self.inodes[i].0 = *size).is_some()
            }
            KOp::Link { from, to } => {
                let ok = !self.exists(to) && self.dirs.contains(&parent(to));
                match self.files.get(from) {
                    Some(&i) if ok => self.files.insert(to.clone(), i).is_none(),
                    _ => false,
                }
            }
            KOp::Unlink(p) => self.files.remove(p).is_some(),
            KOp::Rename { from, to } => self.rename(from, to),
            KOp::SetXattr { path, name, .. } => match self.files.get(path) {
                Some(&i) => {
                    self.inodes[i].1.insert(name.clone());
                    true
                }
                None => self.dirs.contains(path),
            },
            KOp::RemoveXattr { path, name } => self
                .files
                .get(path)
                .is_some_and(|&i| self.inodes[i].1.remove(name)),
            KOp::Fsync(p) | KOp::Fdatasync(p) => self.exists(p),
            KOp::Sync | KOp::Mark(_) => true,
        }
    }

    fn grow(&mut self, p: &str, end: u64) -> bool {
        self.file(p)
            .map(|i| self.inodes[i].0 = self.inodes[i].0.max(end))
            .is_some()
    }

    /// `mv -T FROM TO`: a file over a file or a new name; a directory to a new name only
    /// (not into itself), with everything under it.
    fn rename(&mut self, from: &str, to: &str) -> bool {
        if !self.dirs.contains(&parent(to)) || from == to {
            return false;
        }
        if let Some(i) = self.files.get(from).copied() {
            if self.dirs.contains(to) {
                return false;
            }
            self.files.remove(from);
            self.files.insert(to.to_owned(), i);
            return true;
        }
        let inside = format!("{from}/");
        if !self.dirs.contains(from) || self.exists(to) || to.starts_with(&inside) {
            return false;
        }
        let moved = |p: &String| {
            if p == from {
                Some(to.to_owned())
            } else {
                p.strip_prefix(&inside).map(|rest| format!("{to}/{rest}"))
            }
        };
        self.dirs = self
            .dirs
            .iter()
            .map(|d| moved(d).unwrap_or_else(|| d.clone()))
            .collect();
        self.files = self
            .files
            .iter()
            .map(|(p, &i)| (moved(p).unwrap_or_else(|| p.clone()), i))
            .collect();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq1_is_exhaustive_fixed_and_reads_back() {
        let all = seq1();
        assert_eq!(all.len(), seq1().len());
        assert!(all.len() > 150, "{}", all.len());
        for w in &all {
            assert_eq!(super::super::parse(&w.to_string(), "x").unwrap(), *w);
            let pp = w.ops.iter().filter(|o| o.is_persistence_point()).count();
            assert_eq!(pp, 2, "the setup's sync and one after the core op: {w}");
        }
        let kinds = |want: &str| all.iter().filter(|w| w.to_string().contains(want)).count();
        for op in [
            "\nwrite A/foo",
            "\ndwrite",
            "\nmwrite",
            "\nfalloc foo punch_hole",
            "\nlink",
        ] {
            assert!(kinds(op) > 0, "no workload has {op}");
        }
        assert!(kinds("\nfsync .\n") > 0, "the root directory is fsynced");
    }

    /// Every generated workload applies step by step on the tree model; the model refuses
    /// what the shell would refuse (seen in a kernel campaign: `ln foo A/bar` over an
    /// existing A/bar failed the script before the second operation was drawn with it).
    #[test]
    fn every_workload_applies_and_the_model_refuses_what_the_shell_refuses() {
        let applies = |w: &KWorkload| {
            let mut t = Tree::after_setup();
            let after_setup = setup().len();
            w.ops[after_setup..].iter().all(|op| t.apply(op))
        };
        assert!(seq1().iter().all(applies));
        assert!(seq2(7, 2000).iter().all(applies));
        let mut t = Tree::after_setup();
        let link = KOp::Link {
            from: "foo".into(),
            to: "A/bar".into(),
        };
        assert!(t.apply(&link));
        assert!(!t.clone().apply(&link), "a link over an existing name");
        assert!(!t.clone().apply(&KOp::Mkdir("A".into())));
        let gone = KOp::Rename {
            from: "A".into(),
            to: "B".into(),
        };
        assert!(t.apply(&gone));
        assert!(!t.clone().apply(&KOp::Unlink("A/foo".into())));
        assert!(t.clone().apply(&KOp::Unlink("B/foo".into())));
        let store = KOp::MmapWrite {
            path: "B/bar".into(),
            offset: 4096,
            len: 4096,
            byte: 0,
        };
        assert!(t.clone().apply(&store), "B/bar is foo, 16 KiB");
        assert!(t.apply(&KOp::Truncate {
            path: "B/bar".into(),
            size: 0
        }));
        assert!(!t.apply(&store), "an mmap store past EOF is SIGBUS");
        let remove = KOp::RemoveXattr {
            path: "B/bar".into(),
            name: "user.a".into(),
        };
        assert!(t.apply(&remove), "the link kept foo's attribute");
        assert!(!t.apply(&remove), "removed already");
    }

    #[test]
    fn seq2_samples_are_seeded() {
        assert_eq!(seq2(7, 20), seq2(7, 20));
        assert_ne!(seq2(7, 20), seq2(8, 20));
        let w = &seq2(7, 1)[0];
        let marks = w.ops.iter().filter(|o| matches!(o, KOp::Mark(_))).count();
        assert_eq!(marks, 3);
    }
}
