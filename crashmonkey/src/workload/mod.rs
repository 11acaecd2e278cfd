//! Workloads for crash campaigns on the kernel's own filesystems, in the manner of
//! CrashMonkey's ACE (Automatic Crash Explorer): a few file-system operations over a small
//! fixed set of files and directories, each core operation followed by a persistence point
//! and a mark. A workload is a small text file (one operation per line, documented in
//! `docs/kernel-workloads.md`) that also exports as a shell script running on any Linux
//! (`script`), so that a finding reproduces without this project.
//!
//! - [`ace`] generates the bounded, exhaustive `--seq 1` set and seeded `--seq 2` samples;
//! - [`script`] writes the shell script.

pub mod ace;
pub mod script;

use std::fmt;

/// Operations in one workload.
pub const WORKLOAD_OPS_MAX: usize = 64;
/// Bytes of one workload file.
pub const WORKLOAD_TEXT_BYTES_MAX: usize = 64 * 1024;
/// Bytes of one path inside the file system.
pub const WORKLOAD_PATH_BYTES_MAX: usize = 64;
/// Offsets and lengths of data operations stay below this.
pub const WORKLOAD_RANGE_BYTES_MAX: u64 = 1 << 30;

/// `fallocate`'s modes the workloads use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallocMode {
    /// Allocate, extending the size.
    Alloc,
    /// `FALLOC_FL_KEEP_SIZE`.
    KeepSize,
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE`.
    ZeroRange,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`.
    ZeroRangeKeepSize,
}

impl FallocMode {
    pub const ALL: [FallocMode; 5] = [
        FallocMode::Alloc,
        FallocMode::KeepSize,
        FallocMode::PunchHole,
        FallocMode::ZeroRange,
        FallocMode::ZeroRangeKeepSize,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FallocMode::Alloc => "alloc",
            FallocMode::KeepSize => "keep_size",
            FallocMode::PunchHole => "punch_hole",
            FallocMode::ZeroRange => "zero_range",
            FallocMode::ZeroRangeKeepSize => "zero_range_keep_size",
        }
    }

    fn parse(s: &str) -> Option<FallocMode> {
        FallocMode::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// One operation, on paths relative to the mount point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KOp {
    /// `creat(2)`: create or truncate a file.
    Creat(String),
    Mkdir(String),
    /// Buffered `pwrite` of `len` bytes of `byte` at `offset`.
    Write {
        path: String,
        offset: u64,
        len: u64,
        byte: u8,
    },
    /// The same with `O_DIRECT` (block-aligned).
    DirectWrite {
        path: String,
        offset: u64,
        len: u64,
        byte: u8,
    },
    /// Stores through a shared mapping, then `msync(MS_SYNC)` of the range.
    MmapWrite {
        path: String,
        offset: u64,
        len: u64,
        byte: u8,
    },
    Falloc {
        path: String,
        mode: FallocMode,
        offset: u64,
        len: u64,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink(String),
    Rename {
        from: String,
        to: String,
    },
    Truncate {
        path: String,
        size: u64,
    },
    SetXattr {
        path: String,
        name: String,
        value: String,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    /// `fsync(2)` of a file or a directory.
    Fsync(String),
    Fdatasync(String),
    Sync,
    /// A mark in the write log (a persistence point was passed).
    Mark(String),
}

impl KOp {
    /// Does this operation promise durability (a persistence point)?
    pub fn is_persistence_point(&self) -> bool {
        matches!(self, KOp::Fsync(_) | KOp::Fdatasync(_) | KOp::Sync)
    }
}

impl fmt::Display for KOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KOp::Creat(p) => write!(f, "creat {p}"),
            KOp::Mkdir(p) => write!(f, "mkdir {p}"),
            KOp::Write {
                path,
                offset,
                len,
                byte,
            } => write!(f, "write {path} {offset} {len} 0x{byte:02x}"),
            KOp::DirectWrite {
                path,
                offset,
                len,
                byte,
            } => write!(f, "dwrite {path} {offset} {len} 0x{byte:02x}"),
            KOp::MmapWrite {
                path,
                offset,
                len,
                byte,
            } => write!(f, "mwrite {path} {offset} {len} 0x{byte:02x}"),
            KOp::Falloc {
                path,
                mode,
                offset,
                len,
            } => write!(f, "falloc {path} {} {offset} {len}", mode.name()),
            KOp::Link { from, to } => write!(f, "link {from} {to}"),
            KOp::Unlink(p) => write!(f, "unlink {p}"),
            KOp::Rename { from, to } => write!(f, "rename {from} {to}"),
            KOp::Truncate { path, size } => write!(f, "truncate {path} {size}"),
            KOp::SetXattr { path, name, value } => write!(f, "setxattr {path} {name} {value}"),
            KOp::RemoveXattr { path, name } => write!(f, "removexattr {path} {name}"),
            KOp::Fsync(p) => write!(f, "fsync {p}"),
            KOp::Fdatasync(p) => write!(f, "fdatasync {p}"),
            KOp::Sync => write!(f, "sync"),
            KOp::Mark(m) => write!(f, "mark {m}"),
        }
    }
}

/// A named list of operations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KWorkload {
    pub name: String,
    pub ops: Vec<KOp>,
}

impl fmt::Display for KWorkload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# workload {}", self.name)?;
        for op in &self.ops {
            writeln!(f, "{op}")?;
        }
        Ok(())
    }
}

/// A workload file that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
    #[error("the workload is {0} bytes (at most {WORKLOAD_TEXT_BYTES_MAX})")]
    TooLong(usize),
    #[error("the workload has more than {WORKLOAD_OPS_MAX} operations")]
    TooManyOps,
    #[error("the workload has no operation")]
    Empty,
}

/// Parses a workload file; `name` is its name when it has no `# workload NAME` line.
pub fn parse(text: &str, name: &str) -> Result<KWorkload, WorkloadError> {
    if text.len() > WORKLOAD_TEXT_BYTES_MAX {
        return Err(WorkloadError::TooLong(text.len()));
    }
    let mut w = KWorkload {
        name: name.to_owned(),
        ops: Vec::new(),
    };
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(n) = line.strip_prefix("# workload ") {
            w.name = n.trim().to_owned();
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let op = parse_op(line).map_err(|what| WorkloadError::Line { line: i + 1, what })?;
        if w.ops.len() == WORKLOAD_OPS_MAX {
            return Err(WorkloadError::TooManyOps);
        }
        w.ops.push(op);
    }
    if w.ops.is_empty() {
        return Err(WorkloadError::Empty);
    }
    Ok(w)
}

/// One line, without comments: the operation's name and its arguments.
fn parse_op(line: &str) -> Result<KOp, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let (name, args) = words.split_first().expect("a non-empty line");
    let want = |n: usize| -> Result<(), String> {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!("{name} takes {n} arguments, not {}", args.len()))
        }
    };
    let op = match *name {
        "creat" | "mkdir" | "unlink" | "fsync" | "fdatasync" => {
            want(1)?;
            let p = path(args[0])?;
            match *name {
                "creat" => KOp::Creat(p),
                "mkdir" => KOp::Mkdir(p),
                "unlink" => KOp::Unlink(p),
                "fsync" => KOp::Fsync(p),
                _ => KOp::Fdatasync(p),
            }
        }
        "write" | "dwrite" | "mwrite" => {
            want(4)?;
            data_op(name, args)?
        }
        "falloc" => {
            want(4)?;
            let mode = FallocMode::parse(args[1]).ok_or_else(|| {
                let all: Vec<_> = FallocMode::ALL.iter().map(|m| m.name()).collect();
                format!(
                    "unknown fallocate mode {:?} (one of {})",
                    args[1],
                    all.join(", ")
                )
            })?;
            let (offset, len) = (number(args[2])?, number(args[3])?);
            nonempty(len)?;
            KOp::Falloc {
                path: path(args[0])?,
                mode,
                offset,
                len,
            }
        }
        "link" | "rename" => {
            want(2)?;
            let (from, to) = (path(args[0])?, path(args[1])?);
            if *name == "link" {
                KOp::Link { from, to }
            } else {
                KOp::Rename { from, to }
            }
        }
        "truncate" => {
            want(2)?;
            KOp::Truncate {
                path: path(args[0])?,
                size: number(args[1])?,
            }
        }
        "setxattr" => {
            want(3)?;
            KOp::SetXattr {
                path: path(args[0])?,
                name: xattr_name(args[1])?,
                value: word(args[2])?,
            }
        }
        "removexattr" => {
            want(2)?;
            KOp::RemoveXattr {
                path: path(args[0])?,
                name: xattr_name(args[1])?,
            }
        }
        "sync" => {
            want(0)?;
            KOp::Sync
        }
        "mark" => {
            want(1)?;
            KOp::Mark(word(args[0])?)
        }
        other => return Err(format!("unknown operation {other:?}")),
    };
    Ok(op)
}

/// `write|dwrite|mwrite PATH OFFSET LEN BYTE`.
fn data_op(name: &str, args: &[&str]) -> Result<KOp, String> {
    let (path, offset, len) = (path(args[0])?, number(args[1])?, number(args[2])?);
    nonempty(len)?;
    let byte = args[3]
        .strip_prefix("0x")
        .and_then(|h| u8::from_str_radix(h, 16).ok())
        .ok_or_else(|| format!("{:?} is not a byte like 0x41", args[3]))?;
    Ok(match name {
        "write" => KOp::Write {
            path,
            offset,
            len,
            byte,
        },
        "dwrite" => {
            if offset % 512 != 0 || len % 512 != 0 {
                return Err("a direct write needs 512-byte-aligned offset and length".into());
            }
            KOp::DirectWrite {
                path,
                offset,
                len,
                byte,
            }
        }
        _ => KOp::MmapWrite {
            path,
            offset,
            len,
            byte,
        },
    })
}

fn number(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if n >= WORKLOAD_RANGE_BYTES_MAX {
        return Err(format!("{n} is not below {WORKLOAD_RANGE_BYTES_MAX}"));
    }
    Ok(n)
}

fn nonempty(len: u64) -> Result<(), String> {
    if len == 0 {
        Err("the length must not be 0".into())
    } else {
        Ok(())
    }
}

/// A path inside the mount point: `.` (the mount point itself), or relative, `/`-separated
/// names of letters, digits, `.`, `_` and `-`, no `.` or `..` component (so that the shell script needs no quoting and
/// cannot leave the mount point).
fn path(s: &str) -> Result<String, String> {
    let ok_name = |c: &str| {
        !c.is_empty()
            && c != "."
            && c != ".."
            && c.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    if s == "." {
        return Ok(s.to_owned());
    }
    if s.len() > WORKLOAD_PATH_BYTES_MAX || !s.split('/').all(ok_name) {
        return Err(format!(
            "{s:?} is not a relative path of plain names (at most {WORKLOAD_PATH_BYTES_MAX} bytes)"
        ));
    }
    Ok(s.to_owned())
}

fn xattr_name(s: &str) -> Result<String, String> {
    match s.strip_prefix("user.") {
        Some(rest) if !rest.is_empty() => word(s),
        _ => Err(format!("{s:?} is not a user.* extended attribute")),
    }
}

/// A mark name or an attribute value: plain characters, so the script needs no quoting.
fn word(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= WORKLOAD_PATH_BYTES_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} must be letters, digits, '.', '_', '-' or ':'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_reads_back_as_it_prints() {
        let text = "# workload demo\nmkdir A\ncreat A/foo\nwrite A/foo 0 4096 0x41\n\
                    dwrite A/foo 4096 4096 0x42\nmwrite A/foo 100 10 0x43\n\
                    falloc A/foo zero_range_keep_size 0 8192\nlink A/foo bar\nunlink bar\n\
                    rename A/foo A/baz\ntruncate A/baz 2048\nsetxattr A/baz user.k v1\n\
                    removexattr A/baz user.k\nfsync A\nfdatasync A/baz\nsync\nmark p1\n";
        let w = parse(text, "x").unwrap();
        assert_eq!(w.name, "demo");
        assert_eq!(w.ops.len(), 16);
        assert_eq!(w.to_string(), text);
        assert_eq!(parse(&w.to_string(), "y").unwrap(), w);
    }

    #[test]
    fn bad_lines_say_where_and_what() {
        let bad = [
            ("creat ../etc/passwd", "not a relative path"),
            ("creat /abs", "not a relative path"),
            ("write foo 0 0 0x41", "must not be 0"),
            ("write foo 0 10 A", "not a byte"),
            ("dwrite foo 1 512 0x41", "512-byte-aligned"),
            ("falloc foo sideways 0 10", "unknown fallocate mode"),
            ("setxattr foo trusted.x 1", "user.*"),
            ("mark a;rm", "must be letters"),
            ("sync now", "takes 0 arguments"),
            ("format c:", "unknown operation"),
            ("truncate foo 99999999999", "not below"),
        ];
        for (line, want) in bad {
            let e = parse(&format!("sync\n{line}\n"), "w").unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with("line 2: ") && text.contains(want),
                "{line}: {text}"
            );
        }
        assert_eq!(parse("# nothing\n", "w"), Err(WorkloadError::Empty));
        assert_eq!(
            parse(&"sync\n".repeat(WORKLOAD_OPS_MAX + 1), "w"),
            Err(WorkloadError::TooManyOps)
        );
    }
}
