//! A tmpfs of a given size mounted on a fresh folder, unmounted when dropped: a filesystem
//! that runs out of space on cue. Shared by the integration tests (`tests/common`) and the
//! crate's unit tests (included by path from `src/lib.rs`).

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// A mounted tmpfs of a fixed size; unmounted (lazily) when dropped.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes`; `None` where mounting fails (it needs root).
    pub fn try_mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status();
        st.is_ok_and(|s| s.success()).then_some(Tmpfs { dir })
    }

    /// Mounts a tmpfs of `bytes`, or fails the test.
    pub fn mount(bytes: u64) -> Tmpfs {
        Tmpfs::try_mount(bytes).expect("mount -t tmpfs failed")
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
