//! Crash campaigns on the kernel's own filesystems (ext4, XFS, btrfs), with no kernel
//! module: CrashMonkey's method over this project's recording NBD disk.
//!
//! Per workload ([`crate::workload`]): the campaign's base image (formatted once) is copied,
//! served by an in-process nbd-server that records every write, flush and mark
//! ([`device`]), attached with `nbdfuse` and a loop device, mounted; the workload's shell
//! script runs as real system calls and calls `crashmonkey kernel-mark` after each
//! persistence point, which puts a mark in the write log and saves a [`snapshot`] of the
//! mounted tree. After unmounting, the crash states at every mark ([`crash`]) are built from
//! the log, mounted from a copy (so recovery runs), compared with what the persistence
//! points promised, and checked with the filesystem's own fsck in read-only mode
//! ([`verify`]). [`campaign`] drives it and keeps findings in a campaign folder.
//!
//! - [`proc`]     external commands in their own process group, with a deadline
//! - [`device`]   the recording export, nbdfuse, the loop device, the mount; all undone on drop
//! - [`snapshot`] what a mounted tree holds, and what a persistence point promised of it
//! - [`crash`]    the durable and the prefix state at each mark (and the reorder and torn
//!   states on request), as image files
//! - [`verify`]   one crash state mounted, compared, fsck'd
//! - [`campaign`] one workload run and checked
//! - [`jobs`]     workloads J at once, their results handed on in the workloads' order
//! - [`folder`]   the campaign folder: parameters, done records, finding bundles, index
//! - [`app`]      `crashmonkey run`: any application's workload and checker on the same
//!   recording disk, every crash state mounted at a temporary mount point for the checker
//! - [`app_folder`] the folder of such a run: bundles per finding, index, summary
//! - [`findings`] a kernel campaign's or a run's folder read back (`crashmonkey findings`,
//!   `crashmonkey report`): its findings by signature, with their bundles

pub mod app;
pub mod app_folder;
pub mod campaign;
pub mod crash;
pub mod device;
pub mod findings;
pub mod folder;
pub mod jobs;
pub mod merge;
pub mod proc;
pub mod snapshot;
pub mod verify;

use std::path::Path;

/// Deadline of one workload's shell script.
pub const WORKLOAD_TIMEOUT_SECONDS: u64 = 120;
/// Deadline of `mkfs`.
pub const MKFS_TIMEOUT_SECONDS: u64 = 120;
/// Deadline of one `mount` or `umount`.
pub const MOUNT_TIMEOUT_SECONDS: u64 = 60;
/// Deadline of one fsck run.
pub const FSCK_TIMEOUT_SECONDS: u64 = 120;
/// Deadline of small helpers (`losetup`, `fusermount3`, `dmesg`).
pub const HELPER_TIMEOUT_SECONDS: u64 = 30;
/// How long `nbdfuse` may take to serve its file.
pub const NBDFUSE_READY_SECONDS: u64 = 30;
/// Kernel log lines kept with a state that does not mount.
pub const DMESG_LINES_MAX: usize = 40;

/// The filesystems a kernel campaign formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
        }
    }

    pub fn parse(s: &str) -> Option<FsKind> {
        [FsKind::Ext4, FsKind::Xfs, FsKind::Btrfs]
            .into_iter()
            .find(|f| f.name() == s)
    }

    /// Bytes of the disk: small, so that copying a state is cheap, and above each mkfs's
    /// minimum (ext4 has none that matters; XFS 300 MB unless run as fstests runs it, see
    /// [`FsKind::mkfs_command`]; btrfs about 114 MiB).
    pub fn disk_bytes(self) -> u64 {
        match self {
            FsKind::Ext4 => 64 << 20,
            FsKind::Xfs | FsKind::Btrfs => 128 << 20,
        }
    }

    /// The shell command that formats `image`.
    pub fn mkfs_command(self, image: &Path) -> String {
        let opts = match self {
            FsKind::Ext4 => "-b 4096",
            FsKind::Xfs | FsKind::Btrfs => "",
        };
        self.mkfs_command_with(image, opts)
    }

    /// The shell command that formats `image` with the mkfs options `opts` (shell words,
    /// as a person would type them after `mkfs.FS`; empty for mkfs's defaults).
    pub fn mkfs_command_with(self, image: &Path, opts: &str) -> String {
        let img = proc::quote(&image.to_string_lossy());
        let opts = if opts.trim().is_empty() {
            String::new()
        } else {
            format!("{} ", opts.trim())
        };
        match self {
            FsKind::Ext4 => format!("mkfs.ext4 -q -F {opts}{img}"),
            // xfsprogs refuses filesystems under 300 MB unless run by a test suite; these are
            // the variables fstests sets.
            FsKind::Xfs => {
                format!("TEST_DIR=/tmp TEST_DEV={img} QA_CHECK_FS=xfs mkfs.xfs -f -q {opts}{img}")
            }
            FsKind::Btrfs => format!("mkfs.btrfs -q -f {opts}{img}"),
        }
    }

    /// Mount options of every mount (crash states share the base's UUID).
    pub fn mount_options(self) -> &'static str {
        match self {
            FsKind::Xfs => "nouuid",
            FsKind::Ext4 | FsKind::Btrfs => "",
        }
    }

    /// [`FsKind::mount_options`] and `extra` (comma-separated `mount -o` options), joined.
    pub fn mount_options_with(self, extra: &str) -> String {
        [self.mount_options(), extra.trim()]
            .into_iter()
            .filter(|o| !o.is_empty())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The filesystem's own checker, read-only, on `image`.
    pub fn fsck_command(self, image: &Path) -> String {
        let img = proc::quote(&image.to_string_lossy());
        match self {
            FsKind::Ext4 => format!("e2fsck -fn {img}"),
            FsKind::Xfs => format!("xfs_repair -n -f {img}"),
            FsKind::Btrfs => format!("btrfs check --readonly {img}"),
        }
    }

    /// The tools a campaign on this filesystem runs.
    pub fn tools(self) -> Vec<&'static str> {
        let mut t = vec![
            "nbdfuse",
            "fusermount3",
            "losetup",
            "mount",
            "umount",
            "xfs_io",
            "setfattr",
            "dmesg",
        ];
        t.extend_from_slice(match self {
            FsKind::Ext4 => &["mkfs.ext4", "e2fsck"],
            FsKind::Xfs => &["mkfs.xfs", "xfs_repair"],
            FsKind::Btrfs => &["mkfs.btrfs", "btrfs"],
        });
        t
    }
}

/// What stops a kernel campaign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Command(String),
    /// The workload's own script failed (an operation the filesystem refuses, or a workload
    /// that does not apply): the workload is skipped, the campaign goes on.
    #[error("the workload's script failed ({end}): {output}")]
    Script { end: String, output: String },
    #[error("reading the write log: {0}")]
    Log(#[from] nbd_server::log::LogError),
    #[error("building a crash state: {0}")]
    Image(#[from] crate::overlay::ImageError),
    #[error("the recording export: {0}")]
    Export(#[from] nbd_server::ExportError),
    #[error("stopped by signal {0}")]
    Stopped(i32),
    #[error("{0}")]
    Setup(String),
}

impl KernelError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
        let what = what.into();
        move |source| KernelError::Io { what, source }
    }

    /// [`Self::io`] naming the file or folder at `path`.
    pub fn at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> KernelError {
        Self::io(path.display().to_string())
    }
}
