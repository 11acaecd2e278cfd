//! `crashmonkey fs` as a user runs it: the real binary on images made by its own mkfs and
//! filled by real fs-core workloads, on images whose journal still holds committed
//! transactions, on damaged and foreign images, and on an NBD export served in process.
//!
//! Expected file contents come from the workload's operations (bytes written, offsets), not
//! from the code under test.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use crashmonkey::fscore::device::Target;
use fs_core::block::BLOCK_SIZE;
use fs_core::ondisk::{self, format};
use fs_core::sched::{run_mounted, Policy, PolicyError, RandomPolicy, Workload};
use fs_core::TaskId;
use fs_core::{Config, Op};
use nbd_server::backend::{Backend, MemoryBackend};
use nbd_server::{BackgroundServer, Export, ExportRegistry, Server, ServerConfig};
use rand::{RngCore, SeedableRng};
use serde_json::Value;

/// Longest any one command may take before the test kills it and fails.
const RUN_LIMIT: Duration = Duration::from_secs(120);
const IMAGE_BYTES: u64 = 4 << 20;
const FILES: usize = 4;
/// Bytes the workload writes to f3: more than a pipe holds, so `cat | (closed)` must meet
/// EPIPE.
const F3_BYTES: u64 = 200 * 1024;

/// `crashmonkey fs ARGS...`, within [`RUN_LIMIT`].
fn fs(args: &[&str]) -> Output {
    let mut c = common::crashmonkey();
    c.arg("fs").args(args);
    common::output_within(&mut c, RUN_LIMIT)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `fs ARGS`, asserts its exit code, returns (stdout, stderr).
fn fs_expect(args: &[&str], code: i32) -> (Vec<u8>, String) {
    let out = fs(args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "crashmonkey fs {args:?}\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    (out.stdout, text(&out.stderr))
}

fn json(stdout: &[u8]) -> Value {
    serde_json::from_slice(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(stdout)))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

/// `fs mkfs IMAGE [--size 4M] --inodes 16 --file f0 .. --file f3`.
fn mkfs(image: &str, size: bool) {
    let mut args = vec!["mkfs", image, "--inodes", "16"];
    if size {
        args.extend(["--size", "4M"]);
    }
    for f in ["f0", "f1", "f2", "f3"] {
        args.extend(["--file", f]);
    }
    fs_expect(&args, 0);
}

/// f0: 10000 x 'a'; f1: a 4 KiB hole then 8 KiB of 0xff; f2: 16 KiB fallocated (unwritten);
/// f3: `F3_BYTES` x 'd'. Each file has one writer, so any schedule gives these bytes.
fn workload() -> Workload {
    let w = |file, offset, len, byte| Op::Write {
        file,
        offset,
        len,
        byte,
    };
    Workload {
        files: FILES,
        phases: vec![
            vec![
                w(0, 0, 10_000, b'a'),
                w(1, 4096, 8192, 0xff),
                Op::Fallocate {
                    file: 2,
                    offset: 0,
                    len: 16384,
                },
            ],
            vec![Op::Fsync { file: 0 }, w(3, 0, F3_BYTES, b'd')],
        ],
    }
}

fn f1_bytes() -> Vec<u8> {
    let mut v = vec![0u8; 4096];
    v.extend([0xffu8; 8192]);
    v
}

/// Random interleavings with every user copy whole (a random policy also shortens some,
/// and a write then lands fewer bytes): each write lands all its bytes.
struct WholeCopies(RandomPolicy);

impl Policy for WholeCopies {
    fn pick(&mut self, runnable: &[TaskId], step: u64) -> Result<TaskId, PolicyError> {
        self.0.pick(runnable, step)
    }
}

/// Mounts the filesystem on `image` writable, runs [`workload`] (which ends synced: every
/// transaction committed to the journal) and then unmounts (checkpoint: the journal empty)
/// or not (the journal keeps the committed transactions, as after a power cut).
fn run_workload(image: &str, unmount: bool) {
    let dev = Target::parse(image).unwrap().open(true).unwrap();
    let fs = ondisk::mount(Config::default(), dev).unwrap();
    let (result, fs) = run_mounted(fs, &workload(), &mut WholeCopies(RandomPolicy::new(1)));
    assert!(result.passed(), "{:?}", result.failures);
    let lens: Vec<usize> = result.files.iter().map(Vec::len).collect();
    assert!(
        result.files[0] == vec![b'a'; 10_000],
        "file lengths {lens:?}, results {:?}",
        result.results
    );
    if unmount {
        fs.unmount().unwrap();
    } else {
        drop(fs);
    }
}

fn hash(path: &Path) -> blake3::Hash {
    blake3::hash(&std::fs::read(path).unwrap())
}

/// A fresh image: every command works on it and shows exactly what mkfs was told.
#[test]
fn a_fresh_image_lists_reads_describes_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fresh.img");
    mkfs(p(&img), true);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), IMAGE_BYTES);

    let (out, err) = fs_expect(&["ls", p(&img)], 0);
    let out = text(&out);
    assert!(err.contains("nothing to replay"), "{err}");
    let rows: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    let want: Vec<Vec<String>> = (0..FILES)
        .map(|i| vec![i.to_string(), "0".into(), "1".into(), format!("f{i}")])
        .collect();
    assert_eq!(rows, want, "{out}");

    let v = json(&fs_expect(&["ls", p(&img), "--json"], 0).0);
    assert_eq!(v["recovery"]["replayed"], 0);
    let names: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["f0", "f1", "f2", "f3"]);

    let (bytes, _) = fs_expect(&["cat", p(&img), "f2"], 0);
    assert!(bytes.is_empty());
    let (out, _) = fs_expect(&["stat", p(&img), "f2"], 0);
    let out = text(&out);
    assert!(out.contains("inode:      2 (generation 1)"), "{out}");
    assert!(out.contains("size:       0 bytes"), "{out}");
    assert!(out.contains("extents:    none"), "{out}");

    let (out, _) = fs_expect(&["fsck", p(&img)], 0);
    assert!(text(&out).contains("clean"), "{}", text(&out));
    let v = json(&fs_expect(&["fsck", p(&img), "--json"], 0).0);
    assert_eq!(v["clean"], true);
    assert_eq!(v["inodes_in_use"], 4);
    assert_eq!(v["names"], 4);
    assert_eq!(v["recovery"]["replayed"], 0);
}

/// mkfs never clobbers an image by accident, refuses bad options before it creates
/// anything, and leaves no half-made file behind.
#[test]
fn mkfs_refuses_to_overwrite_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    mkfs(p(&img), true);
    run_workload(p(&img), true);
    let before = hash(&img);
    let (_, err) = fs_expect(&["mkfs", p(&img), "--size", "4M"], 2);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(hash(&img), before, "a refused mkfs wrote the image");
    fs_expect(&["mkfs", p(&img), "--size", "1M", "--force"], 0);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 1 << 20);
    let (out, _) = fs_expect(&["ls", p(&img)], 0);
    assert_eq!(
        text(&out).lines().count(),
        1,
        "only the header after --force"
    );

    let refused: [(&[&str], &str); 5] = [
        (&["--size", "100K"], "too small"),
        (&["--size", "1000000"], "multiple of 4096"),
        (&["--size", "1M", "--file", "x", "--file", "x"], "twice"),
        (&["--size", "1M", "--file", "a/b"], "not a file name"),
        (
            &[
                "--size", "1M", "--inodes", "1", "--file", "x", "--file", "y",
            ],
            "inodes",
        ),
    ];
    let new = dir.path().join("new.img");
    for (extra, why) in refused {
        let mut args = vec!["mkfs", p(&new)];
        args.extend(extra);
        let (_, err) = fs_expect(&args, 2);
        assert!(err.contains(why), "{extra:?}: {err}");
        assert!(!new.exists(), "{extra:?} left {} behind", new.display());
    }
    let (_, err) = fs_expect(&["mkfs", p(&new)], 2);
    assert!(err.contains("--size is required"), "{err}");
    let long = "n".repeat(255);
    fs_expect(&["mkfs", p(&new), "--size", "1M", "--file", &long], 0);
    let (out, _) = fs_expect(&["ls", p(&new)], 0);
    assert!(text(&out).contains(&long));
}

/// What a real fs-core workload wrote comes back byte for byte through `cat` (binary-safe:
/// holes as zeros, 0xff bytes), and `stat` shows its extents in their states.
#[test]
fn a_workload_s_bytes_come_back_through_cat_and_stat() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.img");
    mkfs(p(&img), true);
    run_workload(p(&img), true);

    let (bytes, err) = fs_expect(&["cat", p(&img), "f0"], 0);
    assert!(bytes == vec![b'a'; 10_000], "f0: {} bytes", bytes.len());
    assert!(
        err.contains("nothing to replay"),
        "unmounted cleanly: {err}"
    );
    let (bytes, _) = fs_expect(&["cat", p(&img), "f1"], 0);
    assert!(bytes == f1_bytes(), "f1: {} bytes", bytes.len());
    let (bytes, _) = fs_expect(&["cat", p(&img), "f3"], 0);
    assert!(
        bytes == vec![b'd'; F3_BYTES as usize],
        "f3: {} bytes",
        bytes.len()
    );

    // f1: file block 0 is a hole, blocks 1 and 2 hold data.
    let v = json(&fs_expect(&["stat", p(&img), "f1", "--json"], 0).0);
    let f = &v["file"];
    assert_eq!(f["size"], 12288);
    assert_eq!(f["written_blocks"], 2);
    assert_eq!(f["unwritten_blocks"], 0);
    assert_eq!(f["disk_bytes"], 8192);
    let mut covered = Vec::new();
    for e in f["extents"].as_array().unwrap() {
        assert_eq!(e["state"], "written", "{e}");
        let (start, n) = (
            e["file_block"].as_u64().unwrap(),
            e["count"].as_u64().unwrap(),
        );
        covered.extend(start..start + n);
    }
    assert_eq!(covered, [1, 2]);
    let (out, _) = fs_expect(&["stat", p(&img), "f1"], 0);
    assert!(text(&out).contains("WRITTEN"), "{}", text(&out));

    // f2: fallocated, never written: 4 unwritten blocks that read as zeros.
    let v = json(&fs_expect(&["stat", p(&img), "f2", "--json"], 0).0);
    assert_eq!(v["file"]["size"], 16384);
    assert_eq!(v["file"]["unwritten_blocks"], 4);
    assert_eq!(v["file"]["written_blocks"], 0);
    let (out, _) = fs_expect(&["stat", p(&img), "f2"], 0);
    assert!(text(&out).contains("UNWRITTEN"), "{}", text(&out));
    let (bytes, _) = fs_expect(&["cat", p(&img), "f2"], 0);
    assert!(bytes == vec![0; 16384]);

    let v = json(&fs_expect(&["ls", p(&img), "--json"], 0).0);
    let sizes: Vec<u64> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, [10_000, 12288, 16384, F3_BYTES]);
    let v = json(&fs_expect(&["fsck", p(&img), "--json"], 0).0);
    assert_eq!(v["clean"], true, "{v}");
    assert_eq!(v["recovery"]["replayed"], 0, "unmount checkpoints");
}

/// `cat` into a pipe whose reader is gone ends quietly with 0, not with an error.
#[test]
fn cat_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("w.img");
    mkfs(p(&img), true);
    run_workload(p(&img), true);
    let mut c = common::crashmonkey();
    c.args(["fs", "cat", p(&img), "f3"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    // Close the read end before the file (larger than a pipe holds) is written.
    drop(child.stdout.take());
    let out = common::wait_within(child, RUN_LIMIT);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("error"), "{err}");
}

/// Guards against a read-only command that recovers into the image itself, or that reads
/// the image without recovery: with committed transactions left in the journal (a workload
/// synced, never unmounted), ls, cat, stat and fsck all see the recovered files and say
/// recovery replayed them, and the image file is the same bytes afterwards.
#[test]
fn recovery_is_replayed_in_memory_and_the_image_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.img");
    mkfs(p(&img), true);
    run_workload(p(&img), false);
    let before = hash(&img);
    // At home, f0's inode still says what mkfs wrote: its new size is only in the journal.
    let raw = std::fs::read(&img).unwrap();
    let geo = format::Geometry::decode(&raw[..BLOCK_SIZE]).unwrap();
    let home = geo.inode_block(0);
    let at = home as usize * BLOCK_SIZE;
    let (inode, _) = format::DiskInode::decode(&raw[at..at + BLOCK_SIZE], home, &mut |_| {
        unreachable!("no extent chain")
    })
    .unwrap();
    assert_eq!(
        inode.size, 0,
        "the run checkpointed f0: this test needs the journal"
    );

    let (out, err) = fs_expect(&["ls", p(&img)], 0);
    let replayed: u64 = err
        .split("replayed ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("ls does not say what recovery replayed: {err}"));
    assert!(replayed > 0, "{err}");
    assert!(err.contains("the image was not written"), "{err}");
    assert!(text(&out).contains("10000"), "{}", text(&out));

    let v = json(&fs_expect(&["ls", p(&img), "--json"], 0).0);
    assert_eq!(v["recovery"]["replayed"], replayed);
    let (bytes, err) = fs_expect(&["cat", p(&img), "f0"], 0);
    assert!(bytes == vec![b'a'; 10_000], "f0: {} bytes", bytes.len());
    assert!(err.contains(&format!("replayed {replayed} ")), "{err}");
    let (bytes, _) = fs_expect(&["cat", p(&img), "f1"], 0);
    assert!(bytes == f1_bytes());
    let v = json(&fs_expect(&["stat", p(&img), "f3", "--json"], 0).0);
    assert_eq!(v["file"]["size"], F3_BYTES);
    assert_eq!(v["recovery"]["replayed"], replayed);

    let (out, _) = fs_expect(&["fsck", p(&img)], 0);
    let out = text(&out);
    assert!(out.contains(&format!("replayed {replayed} ")), "{out}");
    assert!(out.contains("clean"), "{out}");
    let v = json(&fs_expect(&["fsck", p(&img), "--json"], 0).0);
    assert_eq!(v["recovery"]["replayed"], replayed);
    assert_eq!(v["clean"], true);

    assert_eq!(hash(&img), before, "a read-only command wrote the image");
}

/// Damage inside an fs-core image is an inconsistency fsck names (exit 1), not an error, and
/// the other commands refuse to mount it.
#[test]
fn a_flipped_byte_in_an_inode_is_named_by_fsck() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    mkfs(p(&img), true);
    run_workload(p(&img), true);
    let mut raw = std::fs::read(&img).unwrap();
    let geo = format::Geometry::decode(&raw[..BLOCK_SIZE]).unwrap();
    let home = geo.inode_block(1);
    raw[home as usize * BLOCK_SIZE + 40] ^= 0x01; // f1's nlink, not resealed
    std::fs::write(&img, &raw).unwrap();

    let (out, _) = fs_expect(&["fsck", p(&img)], 1);
    let out = text(&out);
    assert!(out.contains("INCONSISTENT"), "{out}");
    let named = format!("inode 1: block {home}: checksum mismatch");
    assert!(out.contains(&named), "wanted {named:?} in:\n{out}");
    let v = json(&fs_expect(&["fsck", p(&img), "--json"], 1).0);
    assert_eq!(v["clean"], false);
    assert!(v["problems"].to_string().contains(&named), "{v}");
    let (_, err) = fs_expect(&["ls", p(&img)], 2);
    assert!(
        err.contains("cannot mount") && err.contains("checksum"),
        "{err}"
    );

    // Damage that checksums cannot see: f2's link count made 7, the block resealed.
    let home = geo.inode_block(2) as usize * BLOCK_SIZE;
    raw[home + 40..home + 44].copy_from_slice(&7u32.to_le_bytes());
    format::seal(&mut raw[home..home + BLOCK_SIZE]);
    std::fs::write(&img, &raw).unwrap();
    let (out, _) = fs_expect(&["fsck", p(&img)], 1);
    let named = "inode 2: link count 7, but 1 directory entries name it";
    assert!(text(&out).contains(named), "{}", text(&out));
}

/// An image that is not fs-core at all, is truncated, or cannot be read is an error (exit 2)
/// that says so.
#[test]
fn foreign_truncated_and_unreadable_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    mkfs(p(&img), true);

    // Not fs-core: seeded noise, and zeros.
    let garbage = dir.path().join("garbage.img");
    let mut noise = vec![0u8; 64 * BLOCK_SIZE];
    rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut noise);
    noise[..4].copy_from_slice(b"GARB");
    std::fs::write(&garbage, &noise).unwrap();
    let zeros = dir.path().join("zeros.img");
    std::fs::write(&zeros, vec![0u8; 64 * BLOCK_SIZE]).unwrap();
    for image in [&garbage, &zeros] {
        for args in [
            vec!["fsck", p(image)],
            vec!["fsck", p(image), "--json"],
            vec!["ls", p(image)],
            vec!["cat", p(image), "f0"],
            vec!["stat", p(image), "f0"],
        ] {
            let (_, err) = fs_expect(&args, 2);
            assert!(err.contains("not an fs-core filesystem"), "{args:?}: {err}");
        }
    }
    let (_, err) = fs_expect(&["fsck", p(&garbage)], 2);
    assert!(err.contains("\"GARB\""), "the magic found is shown: {err}");

    // A wrong magic alone, everything else intact.
    let mut wrong = std::fs::read(&img).unwrap();
    wrong[..4].copy_from_slice(b"XFSB");
    let wrong_magic = dir.path().join("wrong-magic.img");
    std::fs::write(&wrong_magic, &wrong).unwrap();
    let (_, err) = fs_expect(&["fsck", p(&wrong_magic)], 2);
    assert!(err.contains("not an fs-core filesystem"), "{err}");

    // Truncated: at a block boundary (shorter than the superblock says), and mid-block.
    let good = std::fs::read(&img).unwrap();
    let short = dir.path().join("short.img");
    std::fs::write(&short, &good[..good.len() / 2]).unwrap();
    for cmd in ["fsck", "ls"] {
        let (_, err) = fs_expect(&[cmd, p(&short)], 2);
        assert!(err.contains("truncated"), "{cmd}: {err}");
    }
    let ragged = dir.path().join("ragged.img");
    std::fs::write(&ragged, &good[..good.len() - 100]).unwrap();
    let (_, err) = fs_expect(&["fsck", p(&ragged)], 2);
    assert!(
        err.contains("not a whole number of 4096-byte blocks"),
        "{err}"
    );

    for (args, why) in [
        (vec!["fsck", p(dir.path())], "is a directory"),
        (vec!["ls", p(dir.path())], "is a directory"),
        (vec!["ls", "/nonexistent/x.img"], "No such file"),
        (vec!["fsck", "/nonexistent/x.img"], "No such file"),
    ] {
        let (_, err) = fs_expect(&args, 2);
        assert!(err.contains(why), "{args:?}: {err}");
    }
}

/// Names that are not there, and metadata that decodes but that mount takes on trust (a
/// directory entry naming an inode past the table, a size past the largest file), end in a
/// clear error, never a panic or an allocation of the claimed size.
#[test]
fn missing_names_and_crafted_metadata_are_errors_not_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.img");
    mkfs(p(&img), true);
    for cmd in ["cat", "stat"] {
        let (_, err) = fs_expect(&[cmd, p(&img), "nope"], 2);
        assert!(err.contains("no file named \"nope\""), "{cmd}: {err}");
    }
    let raw = std::fs::read(&img).unwrap();
    let geo = format::Geometry::decode(&raw[..BLOCK_SIZE]).unwrap();
    let reseal = |raw: &mut Vec<u8>, block: u64, at: usize, bytes: &[u8]| {
        let b = &mut raw[block as usize * BLOCK_SIZE..][..BLOCK_SIZE];
        b[at..at + bytes.len()].copy_from_slice(bytes);
        format::seal(b);
    };

    let mut huge = raw.clone();
    reseal(
        &mut huge,
        geo.inode_block(0),
        32,
        &(1u64 << 50).to_le_bytes(),
    );
    let huge_img = dir.path().join("huge.img");
    std::fs::write(&huge_img, &huge).unwrap();
    let (_, err) = fs_expect(&["cat", p(&huge_img), "f0"], 2);
    assert!(err.contains("larger than a file can be"), "{err}");

    // Slot 0's inode number: 60000, in a 16-inode table.
    let mut far = raw;
    reseal(
        &mut far,
        geo.dir_start,
        format::HEADER_BYTES,
        &60_000u32.to_le_bytes(),
    );
    let far_img = dir.path().join("far.img");
    std::fs::write(&far_img, &far).unwrap();
    for args in [
        vec!["ls", p(&far_img)],
        vec!["cat", p(&far_img), "f0"],
        vec!["stat", p(&far_img), "f0"],
    ] {
        let (_, err) = fs_expect(&args, 2);
        assert!(err.contains("names inode 60000"), "{args:?}: {err}");
    }
    let (out, _) = fs_expect(&["fsck", p(&far_img)], 1);
    assert!(text(&out).contains("inode 60000"), "{}", text(&out));
}

/// An in-process nbd-server with one writable export, "disk", over memory.
fn nbd_server(backend: Arc<MemoryBackend>) -> BackgroundServer {
    let exports = ExportRegistry::new(vec![Export::new("disk", backend, false)]).unwrap();
    Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports,
        tls: None,
    })
    .unwrap()
}

fn export_bytes(backend: &MemoryBackend) -> Vec<u8> {
    let mut v = vec![0u8; backend.size() as usize];
    backend.read(None, 0, &mut v).unwrap();
    v
}

/// The same commands over `nbd://`: mkfs formats the export, a workload writes it through
/// the NBD client, ls, cat and fsck read it back; read-only commands leave the export's
/// bytes alone even with a journal to recover; a missing export or server is a clear error.
#[test]
fn nbd_exports_are_made_listed_read_and_checked() {
    let backend = Arc::new(MemoryBackend::new(IMAGE_BYTES));
    let server = nbd_server(backend.clone());
    let addr = server.local_addr().unwrap();
    let uri = format!("nbd://{addr}/disk");

    let (_, err) = fs_expect(&["mkfs", &uri, "--size", "8M"], 2);
    assert!(err.contains("the export has 4194304 bytes"), "{err}");
    mkfs(&uri, false);
    let (out, err) = fs_expect(&["ls", &uri], 0);
    assert_eq!(text(&out).lines().count(), 1 + FILES, "{}", text(&out));
    assert!(err.contains("nothing to replay"), "{err}");

    run_workload(&uri, true);
    let (bytes, _) = fs_expect(&["cat", &uri, "f0"], 0);
    assert!(bytes == vec![b'a'; 10_000], "f0: {} bytes", bytes.len());
    let (bytes, _) = fs_expect(&["cat", &uri, "f1"], 0);
    assert!(bytes == f1_bytes());
    fs_expect(&["fsck", &uri], 0);

    // mkfs again over the used export: a fresh filesystem, with nothing of the old one's
    // journal to replay.
    mkfs(&uri, false);
    let v = json(&fs_expect(&["ls", &uri, "--json"], 0).0);
    assert_eq!(v["recovery"]["replayed"], 0, "{v}");
    assert!(
        v["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["size"] == 0),
        "{v}"
    );

    // A journal to recover, over NBD: recovered in memory, the export untouched.
    run_workload(&uri, false);
    let before = export_bytes(&backend);
    let v = json(&fs_expect(&["ls", &uri, "--json"], 0).0);
    assert!(v["recovery"]["replayed"].as_u64().unwrap() > 0, "{v}");
    let (bytes, _) = fs_expect(&["cat", &uri, "f0"], 0);
    assert!(bytes == vec![b'a'; 10_000]);
    let v = json(&fs_expect(&["fsck", &uri, "--json"], 0).0);
    assert!(v["recovery"]["replayed"].as_u64().unwrap() > 0, "{v}");
    assert!(
        export_bytes(&backend) == before,
        "a read-only command wrote the export"
    );

    let (_, err) = fs_expect(&["ls", &format!("nbd://{addr}/nope")], 2);
    assert!(err.contains("no export named \"nope\""), "{err}");
    server.shutdown().unwrap();
    let (_, err) = fs_expect(&["ls", &uri], 2);
    assert!(err.contains("cannot connect"), "{err}");
    let (_, err) = fs_expect(&["ls", "nbd://127.0.0.1:notaport/disk"], 2);
    assert!(err.contains("is not a number"), "{err}");
}

/// Each command explains itself with examples.
#[test]
fn help_explains_each_command_with_examples() {
    let (out, _) = fs_expect(&["--help"], 0);
    let out = text(&out);
    for cmd in ["mkfs", "fsck", "ls", "cat", "stat"] {
        assert!(out.contains(cmd), "fs --help lacks {cmd}: {out}");
        let (help, _) = fs_expect(&[cmd, "--help"], 0);
        let help = text(&help);
        assert!(help.contains("Examples:"), "{cmd}: {help}");
        assert!(
            help.contains(&format!("crashmonkey fs {cmd} ")),
            "{cmd}: {help}"
        );
        assert!(help.contains("Exit status"), "{cmd}: {help}");
        assert!(help.contains("nbd://"), "{cmd}: {help}");
    }
}
