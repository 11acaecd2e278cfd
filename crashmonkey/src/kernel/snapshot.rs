//! What a mounted tree holds at a mark, and what the persistence points before the mark
//! promised of it (CrashMonkey's automatic checker):
//! - `fsync FILE`: the file's data and size, at its path (fsync(2) does not promise the
//!   directory entry, but ext4, XFS and btrfs persist a new name with the inode, and
//!   fstests holds them to it; CrashMonkey's checker assumes it too), and its [`Meta`]:
//!   mode and `user.*` extended attributes (fsync(2) flushes "all modified in-core data of
//!   (i.e., modified buffer cache pages for) the file" and "also flushes the metadata
//!   information associated with the file (see inode(7))"; xattrs live in the inode or
//!   blocks it owns on ext4, XFS and btrfs, and each logs them with the inode);
//! - `fdatasync FILE`: the file's data and size (the size needed to read the data back:
//!   fdatasync(2)), at its path only if that path named the same inode at the mark before:
//!   fdatasync does not flush metadata the data does not need, and a new name (a link, a
//!   rename's target) is such metadata; nor are the mode and the xattrs: never claimed;
//! - `fsync DIR`: the directory's entries, mode and xattrs;
//! - `sync`: everything, modes and xattrs included.
//!
//! A promise outlives its mark while what it covers stays as it was: at a later mark, a
//! promise of an earlier one still holds if the path's entry is the same in both snapshots
//! (nothing changed it since, so a crash state may not lose it).
//!
//! A claim of the metadata outlives its mark only while the metadata stays as it was too;
//! when only the metadata changed, the data part of the claim stays.
//!
//! Ownership, times, link counts and xattrs outside `user.*` are not compared.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use crate::checker::sys;
use crate::workload::KOp;

/// Entries of one snapshot, at most (the workloads make a handful).
pub const SNAPSHOT_ENTRIES_MAX: usize = 10_000;
/// Bytes of one file hashed, at most (the workloads' files are under 64 KiB).
pub const SNAPSHOT_FILE_BYTES_MAX: u64 = 256 << 20;
/// Bytes of one path's list of xattr names, at most (the kernel's own limit, XATTR_LIST_MAX).
pub const XATTR_LIST_BYTES_MAX: usize = 64 << 10;
/// Bytes of one xattr value, at most (the kernel's own limit, XATTR_SIZE_MAX).
pub const XATTR_VALUE_BYTES_MAX: usize = 64 << 10;
/// The namespace of the extended attributes compared (the ones a workload sets).
pub const XATTR_PREFIX: &str = "user.";

/// One path of the tree.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Entry {
    File { size: u64, blake3: String },
    Dir { entries: Vec<String> },
    Other,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Entry::File { size, blake3 } => {
                write!(f, "a file of {size} bytes (blake3 {})", &blake3[..16])
            }
            Entry::Dir { entries } => write!(f, "a directory of [{}]", entries.join(", ")),
            Entry::Other => write!(f, "neither file nor directory"),
        }
    }
}

/// What fsync promises of an inode beyond its data and entries.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// `st_mode`: the file's type and permission bits.
    pub mode: u32,
    /// The `user.*` extended attributes: name to value (UTF-8 text, else `0x` and hex).
    pub xattrs: BTreeMap<String, String>,
}

/// The tree under a mount point: path (relative; `.` is the mount point) to entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub mark: String,
    pub entries: BTreeMap<String, Entry>,
    /// Inode numbers of the files, by path: which name points at which file.
    #[serde(default)]
    pub inodes: BTreeMap<String, u64>,
    /// Mode and xattrs of the files and directories, by path.
    #[serde(default)]
    pub meta: BTreeMap<String, Meta>,
}

/// One promise: what a crash state must show at `path`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    pub path: String,
    /// The persistence point that made it (`fsync foo`, `sync`).
    pub by: String,
    pub want: Entry,
    /// The mode and xattrs promised too (not by fdatasync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<Meta>,
}

/// The entry at `root/rel`, or `None` when nothing is there.
pub fn entry(root: &Path, rel: &str) -> std::io::Result<Option<Entry>> {
    let p = if rel == "." {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let meta = match std::fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&p)? {
            entries.push(e?.file_name().to_string_lossy().into_owned());
        }
        entries.sort();
        return Ok(Some(Entry::Dir { entries }));
    }
    if !meta.is_file() {
        return Ok(Some(Entry::Other));
    }
    let mut hasher = blake3::Hasher::new();
    let mut f = std::fs::File::open(&p)?.take(SNAPSHOT_FILE_BYTES_MAX);
    std::io::copy(&mut f, &mut hasher)?;
    Ok(Some(Entry::File {
        size: meta.len(),
        blake3: hasher.finalize().to_hex().to_string(),
    }))
}

/// The mode and `user.*` xattrs of `root/rel`.
pub fn meta(root: &Path, rel: &str) -> std::io::Result<Meta> {
    let p = if rel == "." {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let st = std::fs::symlink_metadata(&p)?;
    let mut xattrs = BTreeMap::new();
    let names = sys::xattr_list(&p, XATTR_LIST_BYTES_MAX)?;
    let user = names
        .split(|&b| b == 0)
        .filter(|n| n.starts_with(XATTR_PREFIX.as_bytes()));
    for name in user {
        let value = sys::xattr_get(&p, name, XATTR_VALUE_BYTES_MAX)?;
        let value = String::from_utf8(value).unwrap_or_else(|e| {
            let hex: String = e.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        });
        xattrs.insert(String::from_utf8_lossy(name).into_owned(), value);
    }
    Ok(Meta {
        mode: std::os::unix::fs::MetadataExt::mode(&st),
        xattrs,
    })
}

/// Every path under `root` (an explicit stack: no recursion).
pub fn take(root: &Path, mark: &str) -> std::io::Result<Snapshot> {
    let mut snap = Snapshot {
        mark: mark.to_owned(),
        ..Default::default()
    };
    let mut todo = vec![".".to_owned()];
    while let Some(rel) = todo.pop() {
        if snap.entries.len() >= SNAPSHOT_ENTRIES_MAX {
            return Err(std::io::Error::other(format!(
                "more than {SNAPSHOT_ENTRIES_MAX} entries under {}",
                root.display()
            )));
        }
        let Some(e) = entry(root, &rel)? else {
            continue;
        };
        if let Entry::File { .. } = e {
            let p = root.join(&rel);
            snap.inodes.insert(
                rel.clone(),
                std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p)?),
            );
        }
        if !matches!(e, Entry::Other) {
            snap.meta.insert(rel.clone(), meta(root, &rel)?);
        }
        if let Entry::Dir { entries } = &e {
            for name in entries {
                todo.push(if rel == "." {
                    name.clone()
                } else {
                    format!("{rel}/{name}")
                });
            }
        }
        snap.entries.insert(rel, e);
    }
    Ok(snap)
}

/// What the persistence points `points` (those between the previous mark and this one)
/// promised of `snap`; `prev` is the snapshot of the mark before, if any.
pub fn own_claims(points: &[KOp], snap: &Snapshot, prev: Option<&Snapshot>) -> Vec<Claim> {
    let mut out = Vec::new();
    for op in points {
        let by = op.to_string();
        // fdatasync promises no metadata the data does not need: no mode, no xattrs.
        let (paths, want_dir, with_meta): (Vec<&String>, Option<bool>, bool) = match op {
            KOp::Sync => (snap.entries.keys().collect(), None, true),
            KOp::Fsync(p) => (vec![p], None, true),
            KOp::Fdatasync(p) => {
                let same_name = |s: &Snapshot| s.inodes.get(p).copied();
                let named_before = prev
                    .and_then(same_name)
                    .is_some_and(|i| Some(i) == same_name(snap));
                if !named_before {
                    continue;
                }
                (vec![p], Some(false), false)
            }
            _ => continue,
        };
        for path in paths {
            let Some(want) = snap.entries.get(path) else {
                continue;
            };
            let is_dir = matches!(want, Entry::Dir { .. });
            if want_dir.is_some_and(|d| d != is_dir) || matches!(want, Entry::Other) {
                continue;
            }
            out.push(Claim {
                path: path.clone(),
                by: by.clone(),
                want: want.clone(),
                meta: snap.meta.get(path).filter(|_| with_meta).cloned(),
            });
        }
    }
    out
}

/// The claims in force at each mark: its own, and the earlier ones whose path is unchanged.
pub fn claims_at_marks(points: &[Vec<KOp>], snaps: &[Snapshot]) -> Vec<Vec<Claim>> {
    let mut out: Vec<Vec<Claim>> = Vec::with_capacity(snaps.len());
    for (i, snap) in snaps.iter().enumerate() {
        let prev = i.checked_sub(1).map(|j| &snaps[j]);
        let mut claims = own_claims(points.get(i).map_or(&[][..], |p| &p[..]), snap, prev);
        let mut seen: BTreeSet<String> = claims.iter().map(|c| c.path.clone()).collect();
        if let Some(prev) = i.checked_sub(1).map(|j| &out[j]) {
            for c in prev {
                if snap.entries.get(&c.path) == Some(&c.want) && seen.insert(c.path.clone()) {
                    let mut c = c.clone();
                    // The metadata changed since: only the data part still holds.
                    if c.meta.is_some() && c.meta.as_ref() != snap.meta.get(&c.path) {
                        c.meta = None;
                    }
                    claims.push(c);
                }
            }
        }
        out.push(claims);
    }
    out
}

/// The persistence points before each mark of `ops` (since the mark before it), and the
/// marks' names, in order.
pub fn points_before_marks(ops: &[KOp]) -> Vec<(String, Vec<KOp>)> {
    let mut out = Vec::new();
    let mut points = Vec::new();
    for op in ops {
        match op {
            KOp::Mark(m) => out.push((m.clone(), std::mem::take(&mut points))),
            op if op.is_persistence_point() => points.push(op.clone()),
            _ => {}
        }
    }
    out
}

/// A claim a crash state does not keep.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Violation {
    /// Without particulars (`missing`, `data differs`, ...): for finding signatures.
    pub kind: String,
    /// The persistence point's operation (`fsync`, `fdatasync`, `sync`).
    pub by_op: String,
    pub text: String,
}

/// How `root` breaks `claims`.
pub fn violations(root: &Path, claims: &[Claim]) -> Vec<Violation> {
    let mut out = Vec::new();
    for c in claims {
        let found = entry(root, &c.path);
        let by_op = c.by.split(' ').next().unwrap_or_default().to_owned();
        let (seen, kind) = match &found {
            Ok(Some(e)) if *e == c.want => {
                out.extend(meta_violation(root, c, &by_op));
                continue;
            }
            Ok(Some(e)) => (e.to_string(), violation_kind(&c.want, Some(e))),
            Ok(None) => ("nothing".to_owned(), "missing"),
            Err(e) => (format!("an error ({e})"), "unreadable"),
        };
        out.push(Violation {
            kind: kind.to_owned(),
            by_op,
            text: format!(
                "{}: `{}` promised {}, the crash state has {seen}",
                c.path, c.by, c.want
            ),
        });
    }
    out
}

/// How the mode and xattrs at `c.path` (whose entry is as promised) break `c`'s metadata.
fn meta_violation(root: &Path, c: &Claim, by_op: &str) -> Option<Violation> {
    let want = c.meta.as_ref()?;
    let (diffs, kind) = match meta(root, &c.path) {
        Ok(got) => {
            let diffs = meta_diffs(want, &got);
            let kind = match (want.mode != got.mode, want.xattrs != got.xattrs) {
                (false, false) => return None,
                (true, false) => "mode differs",
                (false, true) => "xattrs differ",
                (true, true) => "mode and xattrs differ",
            };
            (diffs, kind)
        }
        Err(e) => (vec![format!("an error ({e})")], "unreadable"),
    };
    Some(Violation {
        kind: kind.to_owned(),
        by_op: by_op.to_owned(),
        text: format!(
            "{}: `{}` promised its mode and xattrs: {}",
            c.path,
            c.by,
            diffs.join(", ")
        ),
    })
}

/// What differs between the promised metadata `want` and the state's `got`, each named
/// (`mode 100644 != 100600`, `xattr user.x missing`); the state's value comes second.
pub fn meta_diffs(want: &Meta, got: &Meta) -> Vec<String> {
    let mut out = Vec::new();
    if want.mode != got.mode {
        out.push(format!("mode {:o} != {:o}", want.mode, got.mode));
    }
    for (name, value) in &want.xattrs {
        match got.xattrs.get(name) {
            None => out.push(format!("xattr {name} missing")),
            Some(v) if v != value => out.push(format!("xattr {name} {value:?} != {v:?}")),
            Some(_) => {}
        }
    }
    for name in got.xattrs.keys().filter(|n| !want.xattrs.contains_key(*n)) {
        out.push(format!("xattr {name} unexpected"));
    }
    out
}

/// A violation without its particulars (sizes, hashes, names).
fn violation_kind(want: &Entry, found: Option<&Entry>) -> &'static str {
    match (want, found) {
        (_, None) => "missing",
        (Entry::File { size: a, .. }, Some(Entry::File { size: b, .. })) if a != b => {
            "size differs"
        }
        (Entry::File { .. }, Some(Entry::File { .. })) => "data differs",
        (Entry::Dir { .. }, Some(Entry::Dir { .. })) => "entries differ",
        _ => "kind differs",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64, h: &str) -> Entry {
        Entry::File {
            size,
            blake3: h.repeat(16),
        }
    }

    fn snap(mark: &str, e: &[(&str, Entry)]) -> Snapshot {
        Snapshot {
            mark: mark.into(),
            entries: e
                .iter()
                .map(|(p, e)| ((*p).to_owned(), e.clone()))
                .collect(),
            inodes: e
                .iter()
                .enumerate()
                .map(|(i, (p, _))| ((*p).to_owned(), i as u64))
                .collect(),
            meta: e
                .iter()
                .map(|(p, _)| ((*p).to_owned(), meta_of(0o100644, &[("user.a", "v0")])))
                .collect(),
        }
    }

    fn meta_of(mode: u32, xattrs: &[(&str, &str)]) -> Meta {
        Meta {
            mode,
            xattrs: xattrs
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn set_xattr(p: &Path, name: &str, value: &str) {
        sys::xattr_set(p, name, value.as_bytes()).unwrap();
    }

    /// fsync and sync promise the mode and the xattrs, fdatasync does not; a claim of an
    /// earlier mark keeps its metadata only while the metadata stays the same.
    #[test]
    fn fsync_and_sync_promise_mode_and_xattrs_fdatasync_does_not() {
        let s0 = snap("setup", &[("foo", file(1, "a")), ("bar", file(2, "b"))]);
        let mut s1 = s0.clone();
        s1.mark = "p1".into();
        let by_op = |points: Vec<KOp>, s1: &Snapshot| -> Vec<(String, bool)> {
            let claims = claims_at_marks(&[vec![], points], &[s0.clone(), s1.clone()]);
            let mut v: Vec<(String, bool)> = claims[1]
                .iter()
                .map(|c| (c.by.clone(), c.meta.is_some()))
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            by_op(vec![KOp::Fsync("foo".into())], &s1),
            [("fsync foo".to_owned(), true)]
        );
        assert_eq!(
            by_op(vec![KOp::Fdatasync("foo".into())], &s1),
            [("fdatasync foo".to_owned(), false)]
        );
        assert!(by_op(vec![KOp::Sync], &s1).iter().all(|(_, m)| *m));
        // setup's sync, then only foo's xattrs change by p1: bar keeps its metadata claim,
        // foo only its data claim.
        s1.meta
            .insert("foo".into(), meta_of(0o100644, &[("user.b", "v1")]));
        let claims = claims_at_marks(&[vec![KOp::Sync], vec![]], &[s0.clone(), s1]);
        let got: Vec<(&str, bool)> = claims[1]
            .iter()
            .map(|c| (c.path.as_str(), c.meta.is_some()))
            .collect();
        assert_eq!(got, [("bar", true), ("foo", false)]);
    }

    /// A state whose data is right but whose mode or xattrs are not breaks an fsync's
    /// promise, and the violation names what differs.
    #[test]
    fn a_changed_mode_or_xattr_is_a_named_violation() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let foo = d.path().join("foo");
        std::fs::write(&foo, b"hello").unwrap();
        std::fs::set_permissions(&foo, std::fs::Permissions::from_mode(0o644)).unwrap();
        set_xattr(&foo, "user.x", "1");
        set_xattr(&foo, "user.y", "2");
        let s = take(d.path(), "m").unwrap();
        assert_eq!(
            s.meta["foo"],
            meta_of(0o100644, &[("user.x", "1"), ("user.y", "2")])
        );
        let fsync = own_claims(&[KOp::Fsync("foo".into())], &s, None);
        let fdatasync = own_claims(&[KOp::Fdatasync("foo".into())], &s, Some(&s));
        assert!(violations(d.path(), &fsync).is_empty());
        std::fs::set_permissions(&foo, std::fs::Permissions::from_mode(0o600)).unwrap();
        let v = violations(d.path(), &fsync);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].kind, "mode differs");
        assert_eq!(
            v[0].text,
            "foo: `fsync foo` promised its mode and xattrs: mode 100644 != 100600"
        );
        sys::xattr_remove(&foo, "user.x").unwrap();
        set_xattr(&foo, "user.y", "3");
        set_xattr(&foo, "user.z", "4");
        let v = violations(d.path(), &fsync);
        assert_eq!(v[0].kind, "mode and xattrs differ");
        assert!(
            v[0].text.ends_with(
                "mode 100644 != 100600, xattr user.x missing, xattr user.y \"2\" != \"3\", \
                 xattr user.z unexpected"
            ),
            "{}",
            v[0].text
        );
        // fdatasync promised the data only.
        assert!(violations(d.path(), &fdatasync).is_empty());
    }

    #[test]
    fn fsync_promises_its_file_sync_everything_and_unchanged_promises_stay() {
        let dir = Entry::Dir {
            entries: vec!["bar".into(), "foo".into()],
        };
        let s0 = snap(
            "setup",
            &[
                (".", dir.clone()),
                ("foo", file(1, "a")),
                ("bar", file(2, "b")),
            ],
        );
        let s1 = snap(
            "p1",
            &[(".", dir), ("foo", file(3, "c")), ("bar", file(2, "b"))],
        );
        let points = vec![vec![KOp::Sync], vec![KOp::Fdatasync("foo".into())]];
        let claims = claims_at_marks(&points, &[s0, s1]);
        assert_eq!(claims[0].len(), 3);
        let at_p1: Vec<(&str, &str)> = claims[1]
            .iter()
            .map(|c| (c.path.as_str(), c.by.as_str()))
            .collect();
        // foo from fdatasync; bar and . unchanged since the sync.
        assert_eq!(
            at_p1,
            [("foo", "fdatasync foo"), (".", "sync"), ("bar", "sync")]
        );
    }

    /// fdatasync of a new name (a rename's target) promises nothing of the name: the man
    /// page's fdatasync flushes only the metadata the data needs.
    #[test]
    fn fdatasync_claims_a_name_only_if_it_named_the_same_file_before() {
        let s0 = snap("setup", &[("foo", file(1, "a"))]);
        let mut s1 = snap("p1", &[("bar", file(1, "a"))]);
        let points = vec![vec![], vec![KOp::Fdatasync("bar".into())]];
        assert!(claims_at_marks(&points, &[s0.clone(), s1.clone()])[1].is_empty());
        // Same name, same inode as before: the data is claimed.
        s1.entries = s0.entries.clone();
        s1.inodes = s0.inodes.clone();
        let points = vec![vec![], vec![KOp::Fdatasync("foo".into())]];
        assert_eq!(
            claims_at_marks(&points, &[s0.clone(), s1.clone()])[1].len(),
            1
        );
        // Same name, another inode (a rename over it): nothing.
        s1.inodes.insert("foo".into(), 99);
        assert!(claims_at_marks(&points, &[s0, s1])[1].is_empty());
        let fsync = vec![vec![], vec![KOp::Fsync("foo".into())]];
        let s0 = snap("setup", &[]);
        let s1 = snap("p1", &[("foo", file(1, "a"))]);
        assert_eq!(claims_at_marks(&fsync, &[s0, s1])[1].len(), 1);
    }

    #[test]
    fn a_real_tree_is_read_and_its_changes_are_violations() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("A")).unwrap();
        std::fs::write(d.path().join("A/foo"), b"hello").unwrap();
        let s = take(d.path(), "m").unwrap();
        assert_eq!(s.entries.len(), 3);
        let claims = own_claims(&[KOp::Sync], &s, None);
        assert!(violations(d.path(), &claims).is_empty());
        std::fs::write(d.path().join("A/foo"), b"hellO").unwrap();
        std::fs::write(d.path().join("new"), b"").unwrap();
        let v = violations(d.path(), &claims);
        assert_eq!(v.len(), 2, "{v:?}");
        let text: Vec<&str> = v.iter().map(|v| v.text.as_str()).collect();
        assert!(text
            .iter()
            .any(|l| l.starts_with("A/foo: `sync` promised a file of 5 bytes")));
        assert!(text
            .iter()
            .any(|l| l.starts_with(".: `sync` promised a directory of [A]")));
        assert!(v.iter().all(|v| v.by_op == "sync"));
        let kinds: BTreeSet<&str> = v.iter().map(|v| v.kind.as_str()).collect();
        assert_eq!(kinds, BTreeSet::from(["data differs", "entries differ"]));
    }
}
