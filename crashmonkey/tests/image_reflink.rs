//! Issue 21: an `{image}` state costs only its difference from the last state its worker
//! held: the ranges that differ go back to the prefix (by reflink, `FICLONERANGE`, where the
//! `--work-dir` filesystem has them, else by copying what differs), then the state's writes
//! land. A range restored at the wrong place, one left out, or a block shared with the wrong
//! file shows here as a state whose `{image}` differs from its `{uri}` (the in-process
//! server's view of the same state, built from the log without any image).
//!
//! The log mixes writes of several MiB (their ranges go back by reflink: at least
//! `REFLINK_RANGE_BYTES_MIN`) with 8 KiB ones (copied even where reflinks work).
//! Both paths run on a loop-mounted XFS image (needs root and mkfs.xfs; under CI it must run,
//! elsewhere the suite's skip policy decides): reflinks on, and off
//! (`CRASHMONKEY_REFLINK=0`, the difference path by copying).

mod common;

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

// Not every helper of the shared tmpfs module is used here.
#[allow(dead_code)]
#[path = "../../nbd-server/tests/common/tmpfs.rs"]
mod tmpfs;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use crashmonkey::overlay::REFLINK_RANGE_BYTES_MIN;
use nbd_server::log::{encode_payload, FlushPayload, LogWriter, RecordKind};

/// Size of the logged disk.
const DISK: u64 = 8 << 20;
// The log's large writes (1 and 2 MiB) must be large enough to be reflinked.
const _: () = assert!(REFLINK_RANGE_BYTES_MIN <= 1 << 20);

/// A log of 4 epochs, each of 3 writes of one to two MiB (a sector off the block
/// boundaries, some overlapping) and 2 writes of 8 KiB.
fn mixed_log(dir: &Path) -> PathBuf {
    let path = dir.join("mixed.log");
    let mut w = LogWriter::create(&path, DISK).unwrap();
    let mut n = 0u8;
    for epoch in 0..4u64 {
        for k in 0..5u64 {
            n += 1;
            let (offset, len) = match k {
                0..3 => (((epoch * 5 + k * 3) % 6) << 20 | 512, (1 + k % 2) << 20),
                _ => ((epoch * 7 + k) * 100_000 / 512 * 512, 8192),
            };
            let data = vec![n; len as usize];
            w.append(RecordKind::Write, 0, 1, offset, len, &data)
                .unwrap();
        }
        let flush = encode_payload(&FlushPayload::default());
        w.append(RecordKind::Flush, 0, 1, 0, 0, &flush).unwrap();
    }
    w.flush().unwrap();
    path
}

/// Size of the XFS image (mkfs.xfs refuses filesystems below 300 MB).
const XFS_IMAGE_BYTES: u64 = 320 << 20;

/// An XFS filesystem loop-mounted on a temporary folder; unmounted on drop.
struct XfsMount {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

impl XfsMount {
    /// `None` when this machine cannot (the skip policy has decided).
    fn new() -> Option<Self> {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        if !root {
            skip::skip("loop-mounting an XFS image needs root");
            return None;
        }
        if !run(Command::new("mkfs.xfs").arg("-V")) {
            skip::skip("mkfs.xfs is not installed (make deps installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let (img, mnt) = (dir.path().join("xfs.img"), dir.path().join("mnt"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(XFS_IMAGE_BYTES)
            .unwrap();
        std::fs::create_dir(&mnt).unwrap();
        let made = run(Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img));
        assert!(made, "mkfs.xfs failed");
        let mounted = run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt));
        assert!(mounted, "mount -o loop of an XFS image failed");
        Some(XfsMount { mnt, _dir: dir })
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        if !run(Command::new("umount").arg(&self.mnt)) {
            run(Command::new("umount").arg("-l").arg(&self.mnt));
        }
    }
}

/// Size of the tmpfs work folder (a filesystem without reflinks: no `FICLONE`): the prefix,
/// two workers' images and the checker's copies of every state.
const TMPFS_BYTES: u64 = 64 << 20;

/// The files `{prefix}-{state}.img` in `dir`, by state id.
fn images(dir: &Path, prefix: &str) -> std::collections::BTreeMap<u64, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let id = name
                .strip_prefix(&format!("{prefix}-"))?
                .strip_suffix(".img")?;
            Some((id.parse().unwrap(), std::fs::read(dir.join(&name)).unwrap()))
        })
        .collect()
}

/// A base image that is not all zeroes, so a range restored from the wrong place shows.
fn patterned_base(dir: &Path) -> PathBuf {
    let path = dir.join("patterned.img");
    let bytes: Vec<u8> = (0..DISK).map(|i| (i / 512 % 251) as u8).collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Checks every state of a seeded log with its work folder in `work`, copying each state's
/// `{image}` and reading its `{uri}`; asserts they are equal and returns crashmonkey's stderr.
fn image_equals_uri(work: &Path, reflink: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (log, base) = (mixed_log(dir.path()), patterned_base(dir.path()));
    let got = dir.path().join("got");
    std::fs::create_dir(&got).unwrap();
    let g = got.display();
    let checker = format!(
        "qemu-img convert -f raw -O raw {{uri}} '{g}/uri-{{state}}.img' && \
         cp {{image}} '{g}/image-{{state}}.img'"
    );
    let mut cmd = crashmonkey();
    cmd.arg("check").arg(&log).arg("--base").arg(&base);
    cmd.args(["--checker", &checker, "--seed", "7", "--samples", "4"]);
    cmd.args(["--max-subset", "2", "--jobs", "2", "--json"]);
    cmd.arg("--work-dir").arg(work);
    cmd.env("RUST_LOG", "crashmonkey=debug");
    cmd.env("CRASHMONKEY_REFLINK", if reflink { "1" } else { "0" });
    let out = output_within(&mut cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (uri, image) = (images(&got, "uri"), images(&got, "image"));
    assert_eq!(uri.len() as u64, s["unique"].as_u64().unwrap(), "{s}");
    assert!(uri.len() > 30, "too few states to prove much: {s}");
    for (id, bytes) in &uri {
        assert!(
            image.get(id) == Some(bytes),
            "state {id}: {{image}} differs from {{uri}} (reflink {reflink})"
        );
    }
    stderr
}

#[test]
fn image_states_by_reflink_and_by_difference_equal_their_uri() {
    let have_qemu = run(Command::new("qemu-img").arg("--version"))
        || skip::skip("qemu-img is not installed (make deps installs it)");
    let Some(xfs) = have_qemu.then(XfsMount::new).flatten() else {
        return;
    };
    let stderr = image_equals_uri(&xfs.mnt, true);
    assert!(
        stderr.contains("ranges restored by reflink"),
        "XFS with reflink=1, yet no range was reflinked:\n{stderr}"
    );
    let stderr = image_equals_uri(&xfs.mnt, false);
    assert!(
        !stderr.contains("restored by reflink") && stderr.contains("reflink Unsupported"),
        "CRASHMONKEY_REFLINK=0, yet reflinks were used:\n{stderr}"
    );
    // A work folder whose filesystem has no reflinks at all (tmpfs), with them allowed: the
    // first whole-file clone is refused, and every range, the large ones too, is copied.
    drop(xfs);
    let tmpfs = tmpfs::Tmpfs::mount(TMPFS_BYTES);
    let stderr = image_equals_uri(tmpfs.dir.path(), true);
    assert!(
        !stderr.contains("restored by reflink") && stderr.contains("reflink Unsupported"),
        "tmpfs has no reflinks, yet they were used:\n{stderr}"
    );
}
