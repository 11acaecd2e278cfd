//! fs-core images from outside a workload, for the `crashmonkey fs` commands: make one
//! ([`mkfs`]), check one ([`fsck`]), and open one read-only ([`Image::open`]) to list its
//! files, read one and describe one.
//!
//! Nothing here writes an image it was asked to read. Recovery replays the journal into a
//! [`CowDevice`] (a private copy in memory) and the image itself is opened read-only, so a
//! bug in recovery cannot reach it either: a read-only file descriptor, or an NBD device that
//! refuses writes.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::path::Path;
use std::rc::Rc;

use fs_core::block::{
    read_block_sync, BlockDevice, Completion, CowDevice, DeviceError, ReqId, Request, BLOCK_SIZE,
};
use fs_core::fs::FILE_BYTES_MAX;
use fs_core::ondisk::format::{check_name, DiskExtent, DiskExtentState, FormatError, Geometry};
use fs_core::ondisk::fsck::{self, FsckReport};
use fs_core::ondisk::journal::{JournalBugs, Recovery};
use fs_core::ondisk::{self, disk_extents};
use fs_core::{Config, Fs};

use super::device::{StreamDevice, Target};

const BS: u64 = BLOCK_SIZE as u64;
/// Inodes `mkfs` makes unless told otherwise.
pub const INODES_DEFAULT: u64 = 64;
/// Largest filesystem `mkfs` makes: mount and fsck keep a few bytes per block in memory
/// (64 GiB is 16 Mi blocks).
pub const IMAGE_BYTES_MAX: u64 = 64 << 30;

/// Why an image could not be made, opened or read. Every message names the image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// Missing, a directory, not a whole number of blocks, an NBD server that does not
    /// answer or has no such export (the message says which).
    #[error("{0}")]
    Open(String),
    #[error("{image}: not an fs-core filesystem: {reason}")]
    NotFsCore { image: String, reason: String },
    #[error(
        "{image}: truncated: its superblock says {want} blocks of 4096 bytes, the image has \
         only {have}"
    )]
    Truncated { image: String, want: u64, have: u64 },
    #[error("{image}: cannot mount: {reason}")]
    Mount { image: String, reason: String },
    #[error("{image}: device error: {reason}")]
    Device { image: String, reason: String },
    #[error("{image}: no file named {name:?}")]
    NoSuchFile { image: String, name: String },
    /// A request that cannot be carried out as given (mkfs options, a file larger than
    /// fs-core files are).
    #[error("{image}: {what}")]
    Refused { image: String, what: String },
    #[error("{image}: {source}")]
    Io {
        image: String,
        #[source]
        source: std::io::Error,
    },
}

/// How an image is named in messages: its path, or `nbd://HOST:PORT/EXPORT`.
pub fn label(target: &Target) -> String {
    match target {
        Target::File(path) => path.display().to_string(),
        Target::Nbd { host, port, export } => format!("nbd://{host}:{port}/{export}"),
    }
}

fn open(target: &Target, writable: bool) -> Result<Box<dyn BlockDevice>, ImageError> {
    target
        .open(writable)
        .map_err(|e| ImageError::Open(format!("{e:#}")))
}

/// What `mkfs` is asked to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MkfsOptions {
    /// Size in bytes: required for an image file; for an NBD export, its size (which this
    /// must match when given).
    pub size: Option<u64>,
    pub inodes: u64,
    /// Empty files to create, in this order (inode 0 first).
    pub names: Vec<String>,
    /// Overwrite an existing image file.
    pub force: bool,
}

/// What `mkfs` made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Made {
    pub image: String,
    pub bytes: u64,
    pub geometry: Geometry,
    pub files: Vec<String>,
}

/// Makes a filesystem: on an image file (created, or overwritten with `force`; synced to
/// stable storage), or on an NBD export (flushed). Options are checked before anything is
/// created or written.
pub fn mkfs(target: &Target, opts: &MkfsOptions) -> Result<Made, ImageError> {
    let image = label(target);
    let refused = |what: String| ImageError::Refused {
        image: image.clone(),
        what,
    };
    check_names(&opts.names, opts.inodes).map_err(refused)?;
    let (bytes, geometry) = match target {
        Target::File(path) => mkfs_file(&image, path, opts)?,
        Target::Nbd { .. } => mkfs_nbd(&image, target, opts)?,
    };
    Ok(Made {
        image,
        bytes,
        geometry,
        files: opts.names.clone(),
    })
}

fn check_names(names: &[String], inodes: u64) -> Result<(), String> {
    if names.len() as u64 > inodes {
        return Err(format!(
            "{} files asked for, but only {inodes} inodes (--inodes)",
            names.len()
        ));
    }
    let mut seen = HashSet::new();
    for n in names {
        check_name(n)?;
        if !seen.insert(n) {
            return Err(format!("the file name {n:?} is given twice"));
        }
    }
    Ok(())
}

/// The layout of a `bytes`-byte filesystem, or why there is none.
fn layout(bytes: u64, inodes: u64) -> Result<Geometry, String> {
    if bytes == 0 || !bytes.is_multiple_of(BS) {
        return Err(format!(
            "size {bytes} bytes is not a positive multiple of 4096"
        ));
    }
    if bytes > IMAGE_BYTES_MAX {
        return Err(format!(
            "size {bytes} bytes is more than the {IMAGE_BYTES_MAX} this mkfs makes"
        ));
    }
    Geometry::for_device(bytes / BS, inodes)
}

fn mkfs_file(image: &str, path: &Path, opts: &MkfsOptions) -> Result<(u64, Geometry), ImageError> {
    let refused = |what: String| ImageError::Refused {
        image: image.to_string(),
        what,
    };
    let io = |source| ImageError::Io {
        image: image.to_string(),
        source,
    };
    let Some(bytes) = opts.size else {
        return Err(refused("--size is required to make an image file".into()));
    };
    layout(bytes, opts.inodes).map_err(refused)?;
    if path.is_dir() {
        return Err(refused("is a directory, not an image file".into()));
    }
    let existed = path.exists();
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if opts.force {
        o.create(true).truncate(true);
    } else {
        o.create_new(true);
    }
    let file = o.open(path).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => refused("already exists (--force overwrites it)".into()),
        _ => io(e),
    })?;
    let made = format_file(file, bytes, opts).map_err(|e| match e {
        FormatFileError::Io(e) => io(e),
        FormatFileError::Mkfs(e) => refused(e.to_string()),
    });
    if made.is_err() && !existed {
        // Leave nothing half-made behind.
        let _ = std::fs::remove_file(path);
    }
    made.map(|geo| (bytes, geo))
}

enum FormatFileError {
    Io(std::io::Error),
    Mkfs(ondisk::MountError),
}

fn format_file(file: File, bytes: u64, opts: &MkfsOptions) -> Result<Geometry, FormatFileError> {
    file.set_len(bytes).map_err(FormatFileError::Io)?;
    let mut dev = StreamDevice::new(file, bytes, true);
    let geo = ondisk::mkfs(&mut dev, opts.inodes, &opts.names).map_err(FormatFileError::Mkfs)?;
    dev.into_inner().sync_all().map_err(FormatFileError::Io)?;
    Ok(geo)
}

fn mkfs_nbd(
    image: &str,
    target: &Target,
    opts: &MkfsOptions,
) -> Result<(u64, Geometry), ImageError> {
    let refused = |what: String| ImageError::Refused {
        image: image.to_string(),
        what,
    };
    let mut dev = open(target, true)?;
    let bytes = dev.block_count() * BS;
    if let Some(size) = opts.size.filter(|&s| s != bytes) {
        return Err(refused(format!(
            "the export has {bytes} bytes (in whole blocks), --size says {size}"
        )));
    }
    let geo = layout(bytes, opts.inodes).map_err(&refused)?;
    let made =
        ondisk::mkfs(dev.as_mut(), opts.inodes, &opts.names).map_err(|e| refused(e.to_string()))?;
    debug_assert_eq!(made, geo);
    Ok((bytes, geo))
}

/// Block 0, read: a superblock (sound or damaged), or proof this is no fs-core image.
enum Superblock {
    Sound(Geometry),
    Damaged(FormatError),
}

fn superblock(image: &str, dev: &mut dyn BlockDevice) -> Result<Superblock, ImageError> {
    let b = read_block_sync(dev, 0).map_err(|e| ImageError::Device {
        image: image.to_string(),
        reason: format!("reading the superblock: {e}"),
    })?;
    match Geometry::decode(&b) {
        Ok(g) => Ok(Superblock::Sound(g)),
        // The right magic with a bad checksum or field is a damaged fs-core filesystem;
        // another magic is something else altogether.
        Err(FormatError::BadMagic { found, .. }) => Err(ImageError::NotFsCore {
            image: image.to_string(),
            reason: match found {
                0 => "block 0 starts with zeros, not the superblock magic \"FSSB\"".into(),
                _ => format!(
                    "block 0 starts with \"{}\" ({found:#010x}), not the superblock magic \"FSSB\"",
                    found.to_le_bytes().escape_ascii()
                ),
            },
        }),
        Err(e) => Ok(Superblock::Damaged(e)),
    }
}

fn fits(image: &str, geo: &Geometry, dev: &dyn BlockDevice) -> Result<(), ImageError> {
    if geo.blocks > dev.block_count() {
        return Err(ImageError::Truncated {
            image: image.to_string(),
            want: geo.blocks,
            have: dev.block_count(),
        });
    }
    Ok(())
}

/// What `fsck` found, for the image named.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FsckOutcome {
    pub image: String,
    pub clean: bool,
    #[serde(flatten)]
    pub report: FsckReport,
}

/// Checks the filesystem on `target` after recovering its journal into a private copy.
/// Damage is in the report; an error means the check could not run (the image cannot be
/// opened or read, is no fs-core filesystem, or is shorter than its superblock says).
pub fn fsck(target: &Target) -> Result<FsckOutcome, ImageError> {
    let image = label(target);
    let mut dev = open(target, false)?;
    let mut size_problem = None;
    if let Superblock::Sound(geo) = superblock(&image, dev.as_mut())? {
        fits(&image, &geo, dev.as_ref())?;
        if geo.blocks < dev.block_count() {
            size_problem = Some(format!(
                "the superblock says {} blocks, the device has {}",
                geo.blocks,
                dev.block_count()
            ));
        }
    }
    let (watched, first_error) = Watched::new(dev);
    let mut report = fsck::check_device(Box::new(watched), JournalBugs::default());
    if let Some(reason) = first_error.borrow_mut().take() {
        return Err(ImageError::Device { image, reason });
    }
    report.problems.splice(0..0, size_problem);
    Ok(FsckOutcome {
        image,
        clean: report.clean(),
        report,
    })
}

/// A device that remembers its first error, so that an fsck that could not read its image
/// says so instead of reporting the unread blocks as damage.
struct Watched {
    inner: Box<dyn BlockDevice>,
    first_error: Rc<RefCell<Option<String>>>,
}

impl Watched {
    fn new(inner: Box<dyn BlockDevice>) -> (Self, Rc<RefCell<Option<String>>>) {
        let first_error = Rc::new(RefCell::new(None));
        let w = Watched {
            inner,
            first_error: first_error.clone(),
        };
        (w, first_error)
    }

    fn note<T>(&self, r: Result<T, DeviceError>) -> Result<T, DeviceError> {
        if let Err(e) = &r {
            self.first_error
                .borrow_mut()
                .get_or_insert_with(|| e.to_string());
        }
        r
    }
}

impl BlockDevice for Watched {
    fn block_count(&self) -> u64 {
        self.inner.block_count()
    }

    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        let r = self.inner.submit(req);
        self.note(r)
    }

    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError> {
        let r = self.inner.complete(id);
        self.note(r)
    }
}

/// One name in the root directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Entry {
    pub name: String,
    pub ino: u32,
    pub size: u64,
    pub nlink: u32,
    pub generation: u64,
}

/// One file, described.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileStat {
    pub name: String,
    pub ino: u32,
    pub generation: u64,
    /// The size the inode holds.
    pub size: u64,
    /// Bytes of the blocks its extents hold on disk (written and unwritten).
    pub disk_bytes: u64,
    pub written_blocks: u64,
    pub unwritten_blocks: u64,
    pub nlink: u32,
    /// Logical times (the filesystem's operation counter).
    pub mtime: u64,
    pub ctime: u64,
    /// By file block.
    pub extents: Vec<DiskExtent>,
}

/// A filesystem mounted read-only, in memory: the journal recovered into a private copy.
pub struct Image {
    pub label: String,
    pub fs: Fs,
    /// What recovery replayed (into the private copy).
    pub recovery: Recovery,
}

impl Image {
    /// Mounts the filesystem on `target` without ever writing it.
    pub fn open(target: &Target) -> Result<Image, ImageError> {
        let image = label(target);
        let mut dev = open(target, false)?;
        let geo = match superblock(&image, dev.as_mut())? {
            Superblock::Sound(g) => g,
            Superblock::Damaged(e) => {
                return Err(ImageError::Mount {
                    image,
                    reason: format!("superblock: {e} (fsck tells more)"),
                })
            }
        };
        fits(&image, &geo, dev.as_ref())?;
        let fs = ondisk::mount(Config::default(), Box::new(CowDevice::new(dev))).map_err(|e| {
            ImageError::Mount {
                image: image.clone(),
                reason: format!("{e} (fsck tells more)"),
            }
        })?;
        let recovery = fs.persist.as_ref().expect("mount persists").recovery;
        Ok(Image {
            label: image,
            fs,
            recovery,
        })
    }

    /// Every name in the root directory, by name.
    pub fn list(&self) -> Result<Vec<Entry>, ImageError> {
        let mut out = Vec::new();
        for e in self.fs.dir.iter().flatten() {
            let inode = self.inode(&e.name, e.ino)?;
            out.push(Entry {
                name: e.name.clone(),
                ino: e.ino,
                size: inode.size,
                nlink: inode.nlink,
                generation: inode.generation,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The inode a directory entry names: mount does not check that it exists.
    fn inode(&self, name: &str, ino: u32) -> Result<&fs_core::fs::Inode, ImageError> {
        self.fs
            .inodes
            .get(ino as usize)
            .ok_or_else(|| ImageError::Mount {
                image: self.label.clone(),
                reason: format!(
                    "the directory entry {name:?} names inode {ino}, but there are only {} \
                     inodes (fsck tells more)",
                    self.fs.inodes.len()
                ),
            })
    }

    /// The inode named `name`.
    fn find(&self, name: &str) -> Result<u32, ImageError> {
        let slot = self.fs.lookup(name).ok_or_else(|| ImageError::NoSuchFile {
            image: self.label.clone(),
            name: name.to_string(),
        })?;
        let ino = self.fs.dir[slot].as_ref().expect("lookup found it").ino;
        self.inode(name, ino)?;
        Ok(ino)
    }

    /// Describes the file `name`.
    pub fn stat(&self, name: &str) -> Result<FileStat, ImageError> {
        let ino = self.find(name)?;
        let inode = self.fs.inode(ino as usize);
        let extents = disk_extents(inode);
        let blocks_in = |state| {
            extents
                .iter()
                .filter(|e| e.state == state)
                .map(|e| u64::from(e.count))
                .sum::<u64>()
        };
        let written_blocks = blocks_in(DiskExtentState::Written);
        let unwritten_blocks = blocks_in(DiskExtentState::Unwritten);
        Ok(FileStat {
            name: name.to_string(),
            ino,
            generation: inode.generation,
            size: inode.size,
            disk_bytes: (written_blocks + unwritten_blocks) * BS,
            written_blocks,
            unwritten_blocks,
            nlink: inode.nlink,
            mtime: inode.mtime,
            ctime: inode.ctime,
            extents,
        })
    }

    /// The bytes of the file `name` (unwritten extents and holes read as zeros).
    pub fn read_file(&mut self, name: &str) -> Result<Vec<u8>, ImageError> {
        let ino = self.find(name)?;
        let size = self.fs.inode(ino as usize).size;
        // Mount takes the size from the inode block as it is; reading trusts it to size
        // its buffer.
        if size > FILE_BYTES_MAX {
            return Err(ImageError::Refused {
                image: self.label.clone(),
                what: format!(
                    "inode {ino} ({name:?}) says it holds {size} bytes, more than an fs-core \
                     file can ({FILE_BYTES_MAX})"
                ),
            });
        }
        self.fs
            .read_from_disk(ino as usize)
            .map_err(|e| ImageError::Device {
                image: self.label.clone(),
                reason: format!("reading {name:?}: {e}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mkfs_options_are_checked_before_anything_is_made() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_names(&names(&["a", "b"]), 2).is_ok());
        assert!(check_names(&names(&["a", "b", "c"]), 2).is_err());
        assert!(check_names(&names(&["a", "a"]), 4)
            .unwrap_err()
            .contains("twice"));
        assert!(check_names(&names(&["a/b"]), 4).is_err());
        assert!(check_names(&["x".repeat(256)], 4).is_err());
        assert!(check_names(&["x".repeat(255)], 4).is_ok());
        assert!(layout(1 << 20, INODES_DEFAULT).is_ok());
        assert!(layout((1 << 20) + 1, INODES_DEFAULT).is_err());
        assert!(layout(0, INODES_DEFAULT).is_err());
        assert!(layout(IMAGE_BYTES_MAX + BS, INODES_DEFAULT).is_err());
        assert!(layout(64 * BS, INODES_DEFAULT).is_err(), "too small");
    }
}
