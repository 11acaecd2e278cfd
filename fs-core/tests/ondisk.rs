//! fs-core on disk: mkfs, mount, a workload, unmount and mount again give back every file;
//! fsck finds nothing wrong with a filesystem the code made, and names what is wrong with one
//! that was damaged on purpose; every prefix of the writes a workload issued mounts (with
//! recovery) and passes fsck.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fs_core::block::{
    BlockDevice, Completion, CowDevice, DeviceError, MemDevice, ReqId, Request, RequestQueue,
    BLOCK_SIZE,
};
use fs_core::ondisk::{self, format, fsck, journal::JournalBugs};
use fs_core::ops::file_name;
use fs_core::sched::{run_mounted, RandomPolicy, Workload};
use fs_core::{Config, Op};

const BLOCKS: u64 = 1024;
const INODES: u64 = 16;
const FILES: usize = 4;

/// Writes applied, in order: (block, data).
type Writes = Vec<(u64, Vec<u8>)>;

/// A device that keeps every write it applied, in order (a write log with the data), and
/// shares its blocks so a test can look at them after the filesystem took the device.
#[derive(Clone, Default)]
struct Recording {
    blocks: Arc<Mutex<BTreeMap<u64, Vec<u8>>>>,
    writes: Arc<Mutex<Writes>>,
}

struct RecDevice {
    rec: Recording,
    queue: RequestQueue,
}

impl BlockDevice for RecDevice {
    fn block_count(&self) -> u64 {
        BLOCKS
    }
    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        self.queue.submit(req)
    }
    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError> {
        match self.queue.take(id)? {
            Request::Read { block } => {
                let b = self.rec.blocks.lock().unwrap();
                let data = b.get(&block).cloned().unwrap_or(vec![0; BLOCK_SIZE]);
                Ok(Completion::Read { data })
            }
            Request::Write { block, data, .. } => {
                self.rec.writes.lock().unwrap().push((block, data.to_vec()));
                self.rec
                    .blocks
                    .lock()
                    .unwrap()
                    .insert(block, data.into_vec());
                Ok(Completion::Done)
            }
            _ => Ok(Completion::Done),
        }
    }
}

fn device(rec: &Recording) -> Box<dyn BlockDevice> {
    Box::new(RecDevice {
        rec: rec.clone(),
        queue: RequestQueue::new(BLOCKS),
    })
}

/// A device holding `blocks`, writes kept to itself.
fn image(blocks: BTreeMap<u64, Vec<u8>>) -> Box<dyn BlockDevice> {
    let rec = Recording {
        blocks: Arc::new(Mutex::new(blocks)),
        writes: Default::default(),
    };
    Box::new(CowDevice::new(device(&rec)))
}

fn names() -> Vec<String> {
    (0..FILES).map(file_name).collect()
}

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
            vec![w(0, 0, 10_000, b'a'), w(1, 4096, 8192, b'b')],
            vec![
                Op::Fsync { file: 0 },
                Op::Fallocate {
                    file: 2,
                    offset: 0,
                    len: 16384,
                },
            ],
            vec![
                w(2, 100, 5000, b'c'),
                Op::Truncate {
                    file: 0,
                    size: 3000,
                },
            ],
            vec![Op::Rename { from: 1, to: 3 }, Op::Link { file: 2, to: 1 }],
            vec![Op::Unlink { file: 2 }, w(3, 0, 100, b'd'), Op::Sync],
            vec![Op::FallocateKeepSize {
                file: 3,
                offset: 16384,
                len: 8192,
            }],
            vec![Op::Create { file: 2 }, Op::Fdatasync { file: 3 }],
            vec![
                w(2, 0, 4096, b'e'),
                Op::PunchHole {
                    file: 3,
                    offset: 4096,
                    len: 4096,
                },
            ],
        ],
    }
}

/// mkfs on a recording device, mount, run the workload, unmount.
fn make_and_run(seed: u64) -> (Recording, fs_core::sched::RunResult) {
    let rec = Recording::default();
    let mut dev = device(&rec);
    ondisk::mkfs(dev.as_mut(), INODES, &names()).unwrap();
    let fs = ondisk::mount(Config::default(), dev).unwrap();
    let (result, fs) = run_mounted(fs, &workload(), &mut RandomPolicy::new(seed));
    assert!(result.passed(), "seed {seed}: {:?}", result.failures);
    fs.unmount().unwrap();
    (rec, result)
}

#[test]
fn a_workload_survives_unmount_and_mount() {
    for seed in 0..20 {
        let (rec, result) = make_and_run(seed);
        let report = fsck::check_device(
            image(rec.blocks.lock().unwrap().clone()),
            JournalBugs::default(),
        );
        assert!(report.clean(), "seed {seed}: {:?}", report.problems);
        assert_eq!(
            report.recovery.map(|r| r.replayed),
            Some(0),
            "unmount leaves the journal empty"
        );
        let mut fs =
            ondisk::mount(Config::default(), image(rec.blocks.lock().unwrap().clone())).unwrap();
        for (ino, want) in result.files.iter().enumerate() {
            assert_eq!(
                &fs.read_from_disk(ino).unwrap(),
                want,
                "seed {seed} file {ino}"
            );
        }
        let listed: Vec<String> = fs.dir.iter().flatten().map(|e| e.name.clone()).collect();
        // f1 and f2 may be gone: rename(f1, f3) and link(f2, f1) run concurrently, and
        // creat(f2) fails while f1 still names inode 2.
        for name in ["f0", "f3"] {
            assert!(
                listed.contains(&name.to_string()),
                "seed {seed}: {listed:?}"
            );
        }
    }
}

/// Guards against a journal or ordering bug that leaves a half-written filesystem: every
/// prefix of the writes the run issued (as if the power went out after each one, with the
/// device applying writes in order) must mount with recovery and pass fsck.
#[test]
fn every_prefix_of_the_writes_mounts_and_passes_fsck() {
    let rec = Recording::default();
    let mut dev = device(&rec);
    ondisk::mkfs(dev.as_mut(), INODES, &names()).unwrap();
    let base = rec.blocks.lock().unwrap().clone();
    rec.writes.lock().unwrap().clear();
    let fs = ondisk::mount(Config::default(), dev).unwrap();
    let (result, fs) = run_mounted(fs, &workload(), &mut RandomPolicy::new(7));
    assert!(result.passed(), "{:?}", result.failures);
    fs.unmount().unwrap();
    let writes = rec.writes.lock().unwrap().clone();
    assert!(writes.len() > 30, "only {} writes", writes.len());
    let mut blocks = base;
    for (i, (b, data)) in writes.iter().enumerate() {
        blocks.insert(*b, data.clone());
        let report = fsck::check_device(image(blocks.clone()), JournalBugs::default());
        assert!(
            report.clean(),
            "after write {i} of {}: {:?}",
            writes.len(),
            report.problems
        );
        ondisk::mount(Config::default(), image(blocks.clone()))
            .unwrap_or_else(|e| panic!("after write {i}: mount: {e}"));
    }
}

#[test]
fn fsck_names_what_is_wrong() {
    let (rec, _) = make_and_run(3);
    let blocks = rec.blocks.lock().unwrap().clone();
    let geo = format::Geometry::decode(&blocks[&0]).unwrap();
    // A bitmap bit cleared under a used block, then a directory entry to a free inode.
    let mut bad = blocks.clone();
    let bm = bad.get_mut(&geo.bitmap_start).unwrap();
    bm[format::HEADER_BYTES] = 0;
    format::seal(bm);
    let r = fsck::check_device(image(bad), JournalBugs::default());
    assert!(
        r.problems.iter().any(|p| p.contains("free in the bitmap")),
        "{:?}",
        r.problems
    );
    let mut bad = blocks.clone();
    let b = bad.get_mut(&(geo.inode_start + 1)).unwrap();
    b[40..44].copy_from_slice(&7u32.to_le_bytes());
    format::seal(b);
    let r = fsck::check_device(image(bad), JournalBugs::default());
    assert!(
        r.problems.iter().any(|p| p.contains("link count 7")),
        "{:?}",
        r.problems
    );
    let mut bad = blocks;
    bad.get_mut(&(geo.dir_start)).unwrap()[300] ^= 0xff;
    let r = fsck::check_device(image(bad), JournalBugs::default());
    assert!(
        r.problems.iter().any(|p| p.contains("checksum")),
        "{:?}",
        r.problems
    );
}

#[test]
fn mkfs_refuses_what_cannot_work() {
    let mut small = MemDevice::new(40);
    assert!(ondisk::mkfs(&mut small, 16, &names()).is_err());
    let mut dev = MemDevice::new(BLOCKS);
    assert!(
        ondisk::mkfs(&mut dev, 2, &names()).is_err(),
        "4 names, 2 inodes"
    );
    assert!(ondisk::mkfs(&mut dev, 4, &["a/b".to_string()]).is_err());
}
