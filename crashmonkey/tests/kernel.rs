//! `crashmonkey kernel` on this machine's kernel: ACE workloads recorded on ext4 and XFS
//! through the recording nbd-server, nbdfuse and a loop device, their crash states mounted,
//! compared with what the persistence points promised, and fsck'd (and the same on btrfs).
//!
//! - With an honest disk, the committed workloads of `fixtures/workloads/` (a buffered,
//!   direct and mmap write, a punched hole, a creat, renames of a file and of a directory,
//!   each with its fsync or fdatasync) give no finding.
//! - With a lying disk (`flush=ignore`), the same checker must find that a power cut loses
//!   what fsync and sync promised: it guards against a checker that never looks at the
//!   states that matter (the durable ones), which would pass both disks alike.
//! - A campaign folder gets a bundle per finding and resumes; a folder of other files is
//!   refused and left alone; SIGINT mid-campaign leaves no mount, loop device or file.
//!
//! They need root, /dev/fuse, loop devices, nbdfuse, xfs_io, setfattr, mkfs.ext4, mkfs.xfs
//! and (for the btrfs pair) btrfs-progs: elsewhere the skip policy decides (never under CI).

mod common;

#[path = "../../nbd-server/tests/common/skip.rs"]
mod skip;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const CM: &str = env!("CARGO_BIN_EXE_crashmonkey");
/// A test's campaign that takes longer than this is a failure.
const CAMPAIGN_SECONDS_MAX: u64 = 120;

/// Whether this machine can run kernel campaigns on btrfs too.
fn can_run_btrfs() -> bool {
    can_run() && (have("mkfs.btrfs") && have("btrfs"))
}

fn have(t: &str) -> bool {
    common::on_path(t) || skip::skip(&format!("{t} is not installed (make deps installs it)"))
}

/// What a kernel campaign on ext4 and XFS needs besides root, /dev/fuse and a loop device.
const KERNEL_TOOLS: [&str; 9] = [
    "nbdfuse",
    "fusermount3",
    "losetup",
    "xfs_io",
    "setfattr",
    "mkfs.ext4",
    "e2fsck",
    "mkfs.xfs",
    "xfs_repair",
];

/// Whether this machine can run kernel campaigns; otherwise the skip policy decides.
fn can_run() -> bool {
    common::kernel_unready(&KERNEL_TOOLS).is_none_or(|why| skip::skip(&why))
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/workloads")
}

/// Runs `crashmonkey kernel ARGS --json` with its temporary files under `tmp`; the summary.
fn kernel(tmp: &Path, args: &[&str]) -> (Output, serde_json::Value) {
    let t = Instant::now();
    let out = Command::new(CM)
        .arg("kernel")
        .args(args)
        .arg("--json")
        .env("TMPDIR", tmp)
        .output()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(CAMPAIGN_SECONDS_MAX),
        "{args:?} took {:?}",
        t.elapsed()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| {
            panic!(
                "{args:?}: no summary:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (out, summary)
}

/// Nothing of a campaign is left: no mount, no loop device over its files, no work folder.
fn assert_clean(tmp: &Path) {
    let prefix = tmp.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&prefix),
        "a mount is left under {prefix}:\n{mounts}"
    );
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(!loops.contains(&prefix), "a loop device is left:\n{loops}");
    let left: Vec<_> = std::fs::read_dir(tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("crashmonkey-kernel")
        })
        .collect();
    assert!(left.is_empty(), "work folders left: {left:?}");
}

fn num(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn honest(fs: &str) {
    if !(if fs == "btrfs" {
        can_run_btrfs()
    } else {
        can_run()
    }) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = fixtures();
    let (out, s) = kernel(tmp.path(), &["--fs", fs, "--workload", w.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{s}\n{stderr}");
    assert_eq!(num(&s, "workloads"), 8, "{s}");
    assert_eq!(num(&s, "findings"), 0, "{s}");
    // Two marks each (setup, p1), at least the durable state at each.
    assert!(num(&s, "states") >= 16, "{s}");
    assert_clean(tmp.path());
}

#[test]
fn ext4_on_an_honest_disk_keeps_every_promise() {
    honest("ext4");
}

#[test]
fn xfs_on_an_honest_disk_keeps_every_promise() {
    honest("xfs");
}

/// A lying disk loses what the setup's sync and the workload's fsync promised: the durable
/// state at each mark is the freshly formatted base.
fn lying(fs: &str) {
    if !(if fs == "btrfs" {
        can_run_btrfs()
    } else {
        can_run()
    }) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let camp = tmp.path().join("camp");
    let args = [
        "--fs",
        fs,
        "--limit",
        "2",
        "--lying-disk",
        "--out",
        camp.to_str().unwrap(),
    ];
    let (out, s) = kernel(tmp.path(), &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{s}\n{stderr}");
    assert_eq!(num(&s, "workloads"), 2, "{s}");
    let sigs: Vec<&str> = s["signatures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // seq1-0001 is `write foo; fsync foo`: foo's fsync promised its data.
    assert!(
        sigs.iter()
            .any(|g| g.starts_with(&format!("{fs} lying disk:"))
                && g.contains("missing after fsync")),
        "{sigs:?}"
    );
    let index = std::fs::read_to_string(camp.join("findings.jsonl")).unwrap();
    assert_eq!(index.lines().count() as u64, num(&s, "failing_states"));
    let bundles: Vec<PathBuf> = std::fs::read_dir(camp.join("findings"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(bundles.len() as u64, num(&s, "findings"));
    for b in &bundles {
        for f in [
            "workload.txt",
            "workload.sh",
            "disk.log",
            "state.img.gz",
            "expected.json",
            "report.txt",
            "README.md",
        ] {
            assert!(b.join(f).is_file(), "{} has no {f}", b.display());
        }
        let readme = std::fs::read_to_string(b.join("README.md")).unwrap();
        assert!(readme.contains(&format!(
            "crashmonkey kernel --fs {fs} --workload workload.txt --lying-disk"
        )));
    }
    // `findings` and `report` read the folder: the campaign's own verdict, by signature.
    let f = Command::new(CM)
        .args(["findings", camp.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert_eq!(
        f.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&f.stderr)
    );
    let fj: serde_json::Value = serde_json::from_slice(&f.stdout).unwrap();
    assert_eq!(fj["kind"], "kernel");
    assert_eq!(fj["failing_states"], s["failing_states"], "{fj}");
    assert_eq!(
        fj["findings"].as_array().unwrap().len() as u64,
        num(&s, "findings")
    );
    for x in fj["findings"].as_array().unwrap() {
        assert!(sigs.contains(&x["signature"].as_str().unwrap()), "{x}");
        assert!(
            x["again"]
                .as_str()
                .unwrap()
                .contains("--workload workload.txt --lying-disk"),
            "{x}"
        );
    }
    let html = tmp.path().join("report.html");
    let r = Command::new(CM)
        .args([
            "report",
            camp.to_str().unwrap(),
            "-o",
            html.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("missing after fsync"), "{page}");
    // The same command again resumes: nothing runs, the same verdict.
    let (again, s2) = kernel(tmp.path(), &args);
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(
        (num(&s2, "resumed"), num(&s2, "findings")),
        (2, num(&s, "findings"))
    );
    assert_clean(tmp.path());
}

#[test]
fn ext4_on_a_lying_disk_loses_what_fsync_promised() {
    lying("ext4");
}

#[test]
fn xfs_on_a_lying_disk_loses_what_fsync_promised() {
    lying("xfs");
}

#[test]
fn btrfs_on_an_honest_disk_keeps_every_promise() {
    honest("btrfs");
}

#[test]
fn btrfs_on_a_lying_disk_loses_what_fsync_promised() {
    lying("btrfs");
}

#[test]
fn a_folder_of_other_files_is_refused_and_left_alone() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let r = Command::new(CM)
        .args(["kernel", "--fs", "ext4", "--limit", "1", "--out"])
        .arg(&out)
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not empty"));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
}

/// SIGINT while workloads run: exit 2, and nothing left mounted, attached or on disk.
#[test]
fn sigint_mid_campaign_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(CM)
        .args(["kernel", "--fs", "ext4", "--limit", "50"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Past the base's mkfs and into the workloads (each takes about a second).
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the campaign ended before the signal"
    );
    // SAFETY-free: kill(1) sends the signal.
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(CAMPAIGN_SECONDS_MAX));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by signal"));
    assert_clean(tmp.path());
}

/// `--shard K/N` runs workload i when i % N == K: two shards run disjoint workloads that
/// together are the whole list.
#[test]
fn shards_split_the_workloads() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = fixtures();
    let mut names = Vec::new();
    for k in 0..2 {
        let camp = tmp.path().join(format!("shard{k}"));
        let shard = format!("{k}/2");
        let args = [
            "--fs",
            "ext4",
            "--workload",
            w.to_str().unwrap(),
            "--limit",
            "3",
            "--shard",
            &shard,
        ];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["--out", camp.to_str().unwrap()]);
        let (out, s) = kernel(tmp.path(), &args);
        assert_eq!(out.status.code(), Some(0), "{s}");
        let mut done: Vec<String> = std::fs::read_dir(camp.join("done"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        done.sort();
        assert_eq!(num(&s, "workloads") as usize, done.len());
        names.push(done);
    }
    assert_eq!(names[0], ["seq1-0001.json", "seq1-0019.json"]);
    assert_eq!(names[1], ["seq1-0014.json"]);
    assert_clean(tmp.path());
}

/// `--reorder` adds the states between the durable one and the prefix at each mark with
/// writes pending (ext4 leaves some after the setup's sync); an honest disk keeps every
/// promise in them too.
#[test]
fn ext4_reorder_states_are_checked_and_keep_every_promise() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = fixtures().join("seq1-0001.txt");
    let plain = ["--fs", "ext4", "--workload", w.to_str().unwrap()];
    let (_, without) = kernel(tmp.path(), &plain);
    let mut args = plain.to_vec();
    args.push("--reorder");
    let (out, with) = kernel(tmp.path(), &args);
    assert_eq!(out.status.code(), Some(0), "{with}");
    assert_eq!(num(&with, "findings"), 0, "{with}");
    assert!(
        num(&with, "states") > num(&without, "states") + 2,
        "{without}\n{with}"
    );
    assert_clean(tmp.path());
}

/// A state that does not mount is a failure with mount's words, the kernel's log and fsck's
/// verdict: an ext4 image whose superblock is zeroed.
#[test]
fn a_state_that_does_not_mount_keeps_the_kernels_words_and_fscks() {
    use crashmonkey::checker::StopFlag;
    use crashmonkey::kernel::{verify, FsKind};
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("state.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(FsKind::Ext4.disk_bytes())
        .unwrap();
    let mkfs = Command::new("sh")
        .args(["-c", &FsKind::Ext4.mkfs_command(&img)])
        .status()
        .unwrap();
    assert!(mkfs.success());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let stop = StopFlag::new();
    let good = verify::check_state(FsKind::Ext4, &img, &mnt, &[], &stop).unwrap();
    assert!(!good.failed(), "{good:?}");
    // The primary superblock is bytes 1024..2048.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 1024], 1024).unwrap();
    drop(f);
    let bad = verify::check_state(FsKind::Ext4, &img, &mnt, &[], &stop).unwrap();
    assert!(bad.failed() && !bad.mounted, "{bad:?}");
    assert!(!bad.mount_output.is_empty(), "{bad:?}");
    // The kernel said why, about this image's loop device.
    assert!(
        bad.dmesg.contains("EXT4-fs") || bad.dmesg.contains("ext4"),
        "{}",
        bad.dmesg
    );
    assert!(!bad.fsck_passed, "{}", bad.fsck_output);
    assert!(
        bad.fsck_output.contains("superblock"),
        "{}",
        bad.fsck_output
    );
    assert_clean(tmp.path());
}

/// `--torn` adds, at each mark with writes pending, states where one pending write landed
/// only its first sectors: an honest ext4 keeps every promise in them too (its journal
/// replay and checksums cope). On a lying disk they fail like the others, and their
/// findings say they come from torn states: in the signature, the index and the bundle.
/// Guards against torn states that are never built (the state counts) or whose findings
/// pass for the durable state's.
#[test]
fn ext4_torn_states_are_checked_and_their_findings_say_torn() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = fixtures().join("seq1-0001.txt");
    let plain = ["--fs", "ext4", "--workload", w.to_str().unwrap()];
    let (_, without) = kernel(tmp.path(), &plain);
    let mut args = plain.to_vec();
    args.push("--torn");
    let (out, with) = kernel(tmp.path(), &args);
    assert_eq!(out.status.code(), Some(0), "{with}");
    assert_eq!(num(&with, "findings"), 0, "{with}");
    assert!(
        num(&with, "states") > num(&without, "states"),
        "{without}\n{with}"
    );
    let camp = tmp.path().join("camp");
    args.extend(["--lying-disk", "--out", camp.to_str().unwrap()]);
    let (out, lying) = kernel(tmp.path(), &args);
    assert_eq!(out.status.code(), Some(1), "{lying}");
    let sigs = lying["signatures"].as_array().unwrap();
    assert!(
        sigs.iter()
            .any(|s| s.as_str().unwrap().ends_with(" in torn states")),
        "no torn finding: {lying}"
    );
    let index = std::fs::read_to_string(camp.join("findings.jsonl")).unwrap();
    let torn_lines: Vec<serde_json::Value> = index_lines(&index)
        .into_iter()
        .filter(|v| v["state"] == "torn")
        .collect();
    assert!(!torn_lines.is_empty(), "{index}");
    // A torn state's finding is never filed under the durable or prefix states' ones.
    for v in &index_lines(&index) {
        let sig = v["signature"].as_str().unwrap();
        assert_eq!(
            v["state"] == "torn",
            sig.ends_with(" in torn states"),
            "{v}"
        );
    }
    let bundle = camp
        .join("findings")
        .join(torn_lines[0]["bundle"].as_str().unwrap());
    let report = std::fs::read_to_string(bundle.join("report.txt")).unwrap();
    assert!(
        report.contains("the torn state at mark") && report.contains("sectors of write seq"),
        "{report}"
    );
    let readme = std::fs::read_to_string(bundle.join("README.md")).unwrap();
    assert!(readme.contains("--torn --seed 1"), "{readme}");
    assert_clean(tmp.path());
}

/// The lines of a findings index.
fn index_lines(index: &str) -> Vec<serde_json::Value> {
    index
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Drops every key of `v` that differs from run to run whatever the jobs: timings, and the
/// outputs of fsck and the kernel (they name the work folder's temporary paths), with an
/// explicit stack.
fn without_seconds(mut v: serde_json::Value) -> serde_json::Value {
    let mut stack = vec![&mut v];
    while let Some(x) = stack.pop() {
        match x {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !(k.contains("seconds") || k == "fsck_output" || k == "dmesg"));
                stack.extend(m.values_mut());
            }
            serde_json::Value::Array(a) => stack.extend(a.iter_mut()),
            _ => {}
        }
    }
    v
}

/// A campaign folder's records: the index, the bundles' names, every done record (without
/// timings), by file name.
fn records(camp: &Path) -> (String, Vec<String>, Vec<(String, serde_json::Value)>) {
    // No finding, no index.
    let index = std::fs::read_to_string(camp.join("findings.jsonl")).unwrap_or_default();
    let names = |d: &str| -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(camp.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        n.sort();
        n
    };
    let done = names("done")
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(camp.join("done").join(&n)).unwrap();
            (n, without_seconds(serde_json::from_str(&text).unwrap()))
        })
        .collect();
    (index, names("findings"), done)
}

/// `--jobs 2` gives what `--jobs 1` gives: the same summary (but its timings), the same
/// index of failing states in the same order, the same bundles and done records; on an
/// honest disk (where a workload's `sync` flushing the other job's disk would change its
/// crash states) and on a lying one (findings). Guards against results handed on in the
/// order workloads end, and against workloads that disturb each other.
#[test]
fn ext4_jobs_2_gives_the_results_of_jobs_1() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let w = fixtures();
    for lying in [false, true] {
        let mut got = Vec::new();
        for jobs in ["1", "2"] {
            let camp = tmp.path().join(format!("camp-{lying}-{jobs}"));
            let mut args = vec!["--fs", "ext4", "--workload", w.to_str().unwrap()];
            args.extend(["--jobs", jobs, "--out", camp.to_str().unwrap()]);
            if lying {
                args.push("--lying-disk");
            }
            let (out, s) = kernel(tmp.path(), &args);
            assert_eq!(out.status.code(), Some(i32::from(lying)), "{s}");
            got.push((without_seconds(s), records(&camp)));
        }
        assert_eq!(got[0], got[1], "lying disk: {lying}");
        assert_eq!(num(&got[0].0, "workloads"), 8);
    }
    assert_clean(tmp.path());
}

/// SIGINT while two workloads run at once: exit 2, and nothing of either left mounted,
/// attached or on disk (each job's devices are undone before the campaign exits).
#[test]
fn sigint_with_jobs_2_leaves_nothing_behind() {
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(CM)
        .args(["kernel", "--fs", "ext4", "--limit", "100", "--jobs", "2"])
        .env("TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Past the base's mkfs and into the workloads (two at a time).
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the campaign ended before the signal"
    );
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(CAMPAIGN_SECONDS_MAX));
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("stopped by signal"));
    assert_clean(tmp.path());
}

/// A crash state whose file has the promised data but lost an xattr and its mode breaks
/// fsync's promise, named, on a real ext4 (the snapshot is read through the kernel's own
/// xattr calls on the mounted image, as `kernel-mark` reads it). Guards against mode and
/// xattrs that are recorded but never compared, or compared on the wrong path.
#[test]
fn a_state_that_lost_an_xattr_and_its_mode_breaks_fsyncs_promise() {
    use crashmonkey::checker::StopFlag;
    use crashmonkey::kernel::snapshot::{own_claims, take};
    use crashmonkey::kernel::verify::{check_state, mount_state, StateMount};
    use crashmonkey::kernel::FsKind;
    use crashmonkey::workload::KOp;
    use std::os::unix::fs::PermissionsExt;
    if !can_run() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("state.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(FsKind::Ext4.disk_bytes()).unwrap();
    let mkfs = Command::new("sh")
        .args(["-c", &FsKind::Ext4.mkfs_command(&img)])
        .status()
        .unwrap();
    assert!(mkfs.success());
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let stop = StopFlag::new();
    let mounted = |edit: &dyn Fn(&Path)| {
        let StateMount::Mounted(m) = mount_state(FsKind::Ext4, "", &img, &mnt, &stop).unwrap()
        else {
            panic!("the image does not mount");
        };
        edit(&mnt.join("foo"));
        m.unmount().unwrap();
    };
    let setfattr = |args: &[&str], p: &Path| {
        let ok = Command::new("setfattr").args(args).arg(p).status().unwrap();
        assert!(ok.success());
    };
    mounted(&|foo| {
        std::fs::write(foo, b"data").unwrap();
        std::fs::set_permissions(foo, std::fs::Permissions::from_mode(0o640)).unwrap();
        setfattr(&["-n", "user.k", "-v", "v1"], foo);
    });
    let StateMount::Mounted(m) = mount_state(FsKind::Ext4, "", &img, &mnt, &stop).unwrap() else {
        panic!("the image does not mount");
    };
    let snap = take(&mnt, "p1").unwrap();
    m.unmount().unwrap();
    let claims = own_claims(&[KOp::Fsync("foo".into())], &snap, None);
    let good = check_state(FsKind::Ext4, &img, &mnt, &claims, &stop).unwrap();
    assert!(!good.failed(), "{good:?}");
    mounted(&|foo| {
        setfattr(&["-x", "user.k"], foo);
        std::fs::set_permissions(foo, std::fs::Permissions::from_mode(0o600)).unwrap();
    });
    let bad = check_state(FsKind::Ext4, &img, &mnt, &claims, &stop).unwrap();
    let texts: Vec<&str> = bad.violations.iter().map(|v| v.text.as_str()).collect();
    assert_eq!(
        texts,
        ["foo: `fsync foo` promised its mode and xattrs: mode 100640 != 100600, xattr user.k missing"]
    );
    assert_eq!(bad.violations[0].kind, "mode and xattrs differ");
    assert_clean(tmp.path());
}
