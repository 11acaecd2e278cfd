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

/// `count` seeded `--seq 2` workloads: two core operations, each followed by one of its
/// persistence points and a mark, named `seq2-S-NNNN`. The same seed gives the same list.
pub fn seq2(seed: u64, count: usize) -> Vec<KWorkload> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (first, second) = (core_ops(b'X'), core_ops(b'Y'));
    (0..count.min(SEQ2_SAMPLES_MAX))
        .map(|i| {
            let mut ops = setup();
            for (k, cores) in [&first, &second].into_iter().enumerate() {
                let c = &cores[rng.random_range(0..cores.len())];
                let points = persistence_points(c);
                ops.push(c.op.clone());
                ops.push(points[rng.random_range(0..points.len())].clone());
                ops.push(KOp::Mark(format!("p{}", k + 1)));
            }
            KWorkload {
                name: format!("seq2-{seed}-{:04}", i + 1),
                ops,
            }
        })
        .collect()
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

    #[test]
    fn seq2_samples_are_seeded() {
        assert_eq!(seq2(7, 20), seq2(7, 20));
        assert_ne!(seq2(7, 20), seq2(8, 20));
        let w = &seq2(7, 1)[0];
        let marks = w.ops.iter().filter(|o| matches!(o, KOp::Mark(_))).count();
        assert_eq!(marks, 3);
    }
}
