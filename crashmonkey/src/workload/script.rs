//! A workload as a bash script that runs on any Linux with `xfs_io` (xfsprogs) and
//! `setfattr` (attr): `bash w.sh MOUNTPOINT` performs the operations as real system calls,
//! and calls `$CRASHMONKEY_MARK NAME` at each mark when that variable names a command.

use super::{FallocMode, KOp, KWorkload};

/// The script of `w`.
pub fn render(w: &KWorkload) -> String {
    let mut s = format!(
        "#!/usr/bin/env bash\n\
         # crashmonkey workload {name}: run as `bash {name}.sh MOUNTPOINT`.\n\
         # Needs xfs_io (xfsprogs) and setfattr (attr). At each mark it runs\n\
         # \"$CRASHMONKEY_MARK NAME\" when CRASHMONKEY_MARK is set.\n\
         set -euo pipefail\n\
         cd \"${{1:?usage: $0 MOUNTPOINT}}\"\n\
         mark() {{ if [ -n \"${{CRASHMONKEY_MARK:-}}\" ]; then $CRASHMONKEY_MARK \"$1\"; fi; }}\n",
        name = w.name
    );
    for op in &w.ops {
        s.push_str(&line(op));
        s.push('\n');
    }
    s
}

/// One operation as one shell command. Paths and words are plain (checked when parsed), so
/// nothing needs quoting.
fn line(op: &KOp) -> String {
    match op {
        KOp::Creat(p) => format!(": > {p}"),
        KOp::Mkdir(p) => format!("mkdir {p}"),
        KOp::Write {
            path,
            offset,
            len,
            byte,
        } => format!("xfs_io -f -c 'pwrite -q -S 0x{byte:02x} {offset} {len}' {path}"),
        KOp::DirectWrite {
            path,
            offset,
            len,
            byte,
        } => format!("xfs_io -d -f -c 'pwrite -q -S 0x{byte:02x} {offset} {len}' {path}"),
        KOp::MmapWrite {
            path,
            offset,
            len,
            byte,
        } => mmap_write(path, *offset, *len, *byte),
        KOp::Falloc {
            path,
            mode,
            offset,
            len,
        } => {
            let cmd = match mode {
                FallocMode::Alloc => "falloc",
                FallocMode::KeepSize => "falloc -k",
                FallocMode::PunchHole => "fpunch",
                FallocMode::ZeroRange => "fzero",
                FallocMode::ZeroRangeKeepSize => "fzero -k",
            };
            format!("xfs_io -c '{cmd} {offset} {len}' {path}")
        }
        KOp::Link { from, to } => format!("ln {from} {to}"),
        KOp::Unlink(p) => format!("rm -- {p}"),
        KOp::Rename { from, to } => format!("mv -T -- {from} {to}"),
        KOp::Truncate { path, size } => format!("truncate -s {size} {path}"),
        KOp::SetXattr { path, name, value } => format!("setfattr -n {name} -v {value} {path}"),
        KOp::RemoveXattr { path, name } => format!("setfattr -x {name} {path}"),
        KOp::Fsync(p) => format!("xfs_io -r -c fsync {p}"),
        KOp::Fdatasync(p) => format!("xfs_io -r -c fdatasync {p}"),
        // syncfs(2) of the workload's own filesystem (the script runs in its mount point):
        // what sync(2) does for it, without syncing every other filesystem too, which under
        // `kernel --jobs` flushed the other workloads' disks and changed their crash states.
        KOp::Sync => "sync -f .".into(),
        KOp::Mark(m) => format!("mark {m}"),
    }
}

/// Page size the mapping of an mmap write is aligned to.
const MMAP_ALIGN_BYTES: u64 = 4096;

/// Map the pages around the range shared and writable, store, `msync(MS_SYNC)` them.
fn mmap_write(path: &str, offset: u64, len: u64, byte: u8) -> String {
    let start = offset / MMAP_ALIGN_BYTES * MMAP_ALIGN_BYTES;
    let span = (offset + len).div_ceil(MMAP_ALIGN_BYTES) * MMAP_ALIGN_BYTES - start;
    format!(
        "xfs_io -c 'mmap -w {start} {span}' -c 'mwrite -S 0x{byte:02x} {offset} {len}' \
         -c 'msync -s {start} {span}' {path}"
    )
}
