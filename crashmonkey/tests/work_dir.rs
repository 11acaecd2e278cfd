//! `check --work-dir`: the temporary state images go there, leave nothing behind, and a
//! folder too small for them is refused up front with the space it lacks.

mod common;

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use common::*;

#[test]
fn the_images_go_to_the_work_dir_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path());
    let base = base(dir.path(), DISK_BYTES);
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let seen = dir.path().join("seen");
    let checker = format!("echo {{image}} >> {}", seen.display());
    let out = check_cmd(
        &log,
        &base,
        &checker,
        &["--work-dir", work.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = std::fs::read_to_string(&seen).unwrap();
    assert!(!images.is_empty());
    assert!(
        images
            .lines()
            .all(|l| l.starts_with(work.to_str().unwrap())),
        "an image outside --work-dir: {images}"
    );
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "left behind");
}

/// Whether this test may mount (root); otherwise the skip policy decides.
fn root() -> bool {
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&uid.stdout).trim() == "0" || skip::skip("needs root to mount a tmpfs")
}

#[test]
fn a_work_dir_too_small_is_refused_before_anything_runs() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = log(dir.path());
    let base = base(dir.path(), DISK_BYTES);
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount -t tmpfs");
    let ran = dir.path().join("ran");
    let checker = format!("touch {}; true {{image}}", ran.display());
    let out = check_cmd(&log, &base, &checker, &["--jobs", "4"])
        .args(["--work-dir", small.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::process::Command::new("umount").arg(&small).status();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("bytes free") && err.contains("--work-dir"),
        "{err}"
    );
    assert!(!ran.exists(), "a checker ran although the space was short");
}
