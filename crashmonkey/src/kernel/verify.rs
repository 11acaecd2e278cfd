//! One crash state checked: its image (a file of its own, so recovery may write to it)
//! mounted through a loop device, so the kernel replays the journal as after a real power
//! cut; compared with what the persistence points before its mark promised; unmounted; then
//! the filesystem's own checker, read-only, on the recovered image. A state that does not
//! mount is checked by fsck as it is, and keeps the kernel's messages.

use std::path::Path;

use super::device::unmount;
use super::proc::{dmesg_tail, quote, run};
use super::snapshot::{violations, Claim, Violation};
use super::{
    FsKind, KernelError, DMESG_LINES_MAX, FSCK_TIMEOUT_SECONDS, HELPER_TIMEOUT_SECONDS,
    MOUNT_TIMEOUT_SECONDS,
};
use crate::checker::StopFlag;

/// How long a state's loop device may take to go after its unmount: `mount -o loop` sets
/// autoclear, and the kernel detaches the device only when its last opener (udev probing
/// it, for one) closes it.
pub const LOOP_DETACH_SECONDS: u64 = 10;

/// Waits until no loop device is backed by `image` (then the next state can reuse the name
/// and nothing is left behind); past [`LOOP_DETACH_SECONDS`], detaches what is left.
pub(crate) fn wait_loop_detached(image: &Path) -> Result<(), KernelError> {
    let img = quote(&image.to_string_lossy());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(LOOP_DETACH_SECONDS);
    let never = StopFlag::new();
    loop {
        let attached = run(
            &format!("losetup -n -O NAME -j {img}"),
            HELPER_TIMEOUT_SECONDS,
            &never,
        )?;
        let devices: Vec<&str> = attached.output.split_whitespace().collect();
        if devices.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!("loop devices {devices:?} still back {img}: detaching them");
            for dev in devices {
                run(
                    &format!("losetup -d {}", quote(dev)),
                    HELPER_TIMEOUT_SECONDS,
                    &never,
                )?;
            }
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// What checking one state saw.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct StateReport {
    pub mounted: bool,
    /// `mount`'s output when it failed.
    pub mount_output: String,
    /// The kernel's last messages when the mount failed.
    pub dmesg: String,
    pub violations: Vec<Violation>,
    pub fsck_passed: bool,
    pub fsck_output: String,
    pub mount_seconds: f64,
    pub fsck_seconds: f64,
}

impl StateReport {
    /// Does this state break a promise, fail to mount, or fail fsck?
    pub fn failed(&self) -> bool {
        !self.mounted || !self.violations.is_empty() || !self.fsck_passed
    }
}

/// A crash state's image mounted through its own loop device; unmounted (and its loop
/// device waited for) by [`MountedState::unmount`], or on drop whatever the path out.
pub struct MountedState {
    mnt: std::path::PathBuf,
    image: std::path::PathBuf,
    mounted: bool,
}

impl MountedState {
    /// Unmounts and waits for the loop device to go.
    pub fn unmount(mut self) -> Result<(), KernelError> {
        self.mounted = false;
        unmount(&self.mnt, &StopFlag::new())?;
        wait_loop_detached(&self.image)
    }
}

impl Drop for MountedState {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount(&self.mnt, &StopFlag::new()) {
                tracing::warn!("unmounting a crash state: {e}");
            }
            if let Err(e) = wait_loop_detached(&self.image) {
                tracing::warn!("detaching a crash state's loop device: {e}");
            }
        }
    }
}

/// How mounting a crash state went.
pub enum StateMount {
    Mounted(MountedState),
    /// It does not mount: `mount`'s output and the kernel's last messages.
    Failed {
        output: String,
        dmesg: String,
    },
}

/// Mounts the state whose image is `image` at `mnt` (an empty folder) through a loop device,
/// with the filesystem's options and `extra` (`mount -o`), so the kernel runs its recovery.
/// The mount runs to its deadline whatever `stop` says, so that a mount it made is known
/// and undone; the caller looks at the flag after the unmount.
pub fn mount_state(
    fs: FsKind,
    extra: &str,
    image: &Path,
    mnt: &Path,
    stop: &StopFlag,
) -> Result<StateMount, KernelError> {
    if fs == FsKind::Btrfs {
        // btrfs finds its devices by filesystem id, which every state shares: forget the
        // ones no longer attached so the mount takes this image.
        run("btrfs device scan --forget", HELPER_TIMEOUT_SECONDS, stop)?;
    }
    let opts = match fs.mount_options_with(extra).as_str() {
        "" => "loop".to_owned(),
        o => format!("loop,{o}"),
    };
    let cmd = format!(
        "mount -t {} -o {opts} {} {}",
        fs.name(),
        quote(&image.to_string_lossy()),
        quote(&mnt.to_string_lossy())
    );
    let mount = run(&cmd, MOUNT_TIMEOUT_SECONDS, &StopFlag::new())?;
    if mount.end.passed() {
        return Ok(StateMount::Mounted(MountedState {
            mnt: mnt.to_path_buf(),
            image: image.to_path_buf(),
            mounted: true,
        }));
    }
    let dmesg = dmesg_tail(DMESG_LINES_MAX, stop);
    wait_loop_detached(image)?;
    Ok(StateMount::Failed {
        output: mount.output,
        dmesg,
    })
}

/// Checks the state whose image is `image`, mounting it at `mnt` (an empty folder).
pub fn check_state(
    fs: FsKind,
    image: &Path,
    mnt: &Path,
    claims: &[Claim],
    stop: &StopFlag,
) -> Result<StateReport, KernelError> {
    let mut report = StateReport::default();
    let t = std::time::Instant::now();
    match mount_state(fs, "", image, mnt, stop)? {
        StateMount::Mounted(m) => {
            report.mounted = true;
            report.violations = violations(mnt, claims);
            m.unmount()?;
        }
        StateMount::Failed { output, dmesg } => {
            report.mount_output = output;
            report.dmesg = dmesg;
        }
    }
    if let Some(signal) = stop.signal() {
        return Err(KernelError::Stopped(signal));
    }
    report.mount_seconds = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let fsck = run(&fs.fsck_command(image), FSCK_TIMEOUT_SECONDS, stop)?;
    report.fsck_passed = fsck.end.passed();
    report.fsck_output = fsck.output;
    report.fsck_seconds = t.elapsed().as_secs_f64();
    Ok(report)
}
