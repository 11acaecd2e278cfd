//! Issue 21: on a log whose epochs have one new state or none (most of a long fio log's),
//! `check --jobs 2` checks the states of consecutive epochs at once, each on its own
//! prefix: the prefix before the batch plus the batch's epochs before its own, as layers of
//! its `{uri}` export or as writes on its `{image}` worker image. A state built on the wrong
//! prefix (an epoch before it left out, or one after it let in) shows here as bytes that
//! differ from the same state checked with `--jobs 1`, where every epoch is checked alone
//! on the prefix the stage holds.

mod common;

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use nbd_server::log::{encode_payload, FlushPayload, LogWriter, RecordKind};

/// Epochs of the log, each one write and a flush.
const EPOCHS: u64 = 40;

/// A log of [`EPOCHS`] epochs of one 4 KiB write each, overlapping earlier ones.
fn one_write_epochs(dir: &Path) -> PathBuf {
    let path = dir.join("one-write-epochs.log");
    let mut w = LogWriter::create(&path, DISK_BYTES).unwrap();
    for i in 0..EPOCHS {
        let offset = (i * 7 % 16) * 4096 + (i % 3) * 512;
        w.append(RecordKind::Write, 0, 1, offset, 4096, &[i as u8 + 1; 4096])
            .unwrap();
        let flush = encode_payload(&FlushPayload::default());
        w.append(RecordKind::Flush, 0, 1, 0, 0, &flush).unwrap();
    }
    w.flush().unwrap();
    path
}

/// Rounds of [`undo_epochs`]' log, three epochs each.
const UNDO_ROUNDS: u64 = 12;

/// The base's bytes at `offset` (see `patterned_base`).
fn base_bytes(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i / 512 % 251) as u8)
        .collect()
}

/// A base image of [`DISK_BYTES`] with a pattern, so that zeroes never pass for its bytes.
fn patterned_base(dir: &Path) -> PathBuf {
    let base = dir.join("patterned.img");
    std::fs::write(&base, base_bytes(0, DISK_BYTES)).unwrap();
    base
}

/// A log of rounds of three epochs: a new value at P, 200s at Q, then Q's base bytes back.
/// The third epoch of a round has no new state (its disk is the first's; without its write,
/// the second's), yet every later state must see its write: Q's base bytes, not 200s.
fn undo_epochs(dir: &Path) -> PathBuf {
    let path = dir.join("undo-epochs.log");
    let mut w = LogWriter::create(&path, DISK_BYTES).unwrap();
    let (p, q) = (0u64, 8192u64);
    let flush = encode_payload(&FlushPayload::default());
    for k in 0..UNDO_ROUNDS {
        for (offset, bytes) in [
            (p, vec![k as u8 + 1; 4096]),
            (q, vec![200; 4096]),
            (q, base_bytes(q, 4096)),
        ] {
            w.append(RecordKind::Write, 0, 1, offset, 4096, &bytes)
                .unwrap();
            w.append(RecordKind::Flush, 0, 1, 0, 0, &flush).unwrap();
        }
    }
    w.flush().unwrap();
    path
}

/// Whether `qemu-img` is there (the checker converts `{uri}` with it); without it the test
/// skips with a reason, outside CI.
fn qemu_img_or_skip() -> bool {
    let have_qemu = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    have_qemu || skip::skip("qemu-img is not installed (make deps installs it)")
}

/// State images by state id.
type Images = BTreeMap<u64, Vec<u8>>;

/// The files `{prefix}-{state}.img` in `dir`, by state id.
fn images(dir: &Path, prefix: &str) -> Images {
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

/// Every state's `{uri}` and `{image}` bytes with `jobs` checkers, and crashmonkey's stderr.
fn states(log: &Path, base: &Path, jobs: &str) -> (Images, Images, String) {
    let got = tempfile::tempdir().unwrap();
    let g = got.path().display();
    let checker = format!(
        "qemu-img convert -f raw -O raw {{uri}} '{g}/uri-{{state}}.img' && \
         cp {{image}} '{g}/image-{{state}}.img'"
    );
    let mut cmd = crashmonkey();
    cmd.arg("check").arg(log).arg("--base").arg(base);
    cmd.args(["--checker", &checker, "--jobs", jobs, "--no-torn", "--json"]);
    cmd.env("RUST_LOG", "crashmonkey=debug");
    let out = output_within(&mut cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (
        images(got.path(), "uri"),
        images(got.path(), "image"),
        stderr,
    )
}

/// `{uri}` and `{image}` states of `--jobs 1` are the same, and `--jobs 2` gives both again.
fn assert_jobs_agree(one: (&Images, &Images), two: (&Images, &Images)) {
    assert_eq!(one.0, one.1, "--jobs 1: {{uri}} and {{image}} differ");
    assert!(
        two.0 == one.0,
        "--jobs 2: a {{uri}} state differs from --jobs 1's"
    );
    assert!(
        two.1 == one.1,
        "--jobs 2: an {{image}} state differs from --jobs 1's"
    );
}

#[test]
fn states_of_epochs_checked_at_once_equal_those_checked_alone() {
    if !qemu_img_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = one_write_epochs(dir.path());
    let base = patterned_base(dir.path());
    let (uri1, image1, _) = states(&log, &base, "1");
    let (uri2, image2, stderr) = states(&log, &base, "2");
    assert!(uri1.len() as u64 > EPOCHS, "{} states", uri1.len());
    assert_jobs_agree((&uri1, &image1), (&uri2, &image2));
    let most = stderr
        .lines()
        .filter_map(|l| {
            let head = l.split(" epochs at once").next()?;
            head.rsplit(' ').next()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0);
    assert!(
        most >= 2,
        "--jobs 2 never checked two epochs at once:\n{stderr}"
    );
}

/// Epochs without a state to check share a layer of the state server with the epochs around
/// them in a batch: their writes must still reach every later state of the batch. Here every
/// third epoch has no state and undoes the epoch before; a state served without its write
/// shows 200s where `--jobs 1` (each epoch alone on the stage's prefix) shows the base.
#[test]
fn epochs_without_states_inside_a_batch_still_reach_later_states() {
    if !qemu_img_or_skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = undo_epochs(dir.path());
    let base = patterned_base(dir.path());
    let (uri1, image1, _) = states(&log, &base, "1");
    let (uri2, image2, _) = states(&log, &base, "2");
    // The third epoch of a round adds no state (after the first round, whose states differ
    // from the base's Q), so batches hold epochs without states.
    assert!(
        (uri1.len() as u64) < 1 + 3 * UNDO_ROUNDS,
        "{:?}",
        uri1.keys()
    );
    assert_jobs_agree((&uri1, &image1), (&uri2, &image2));
}
