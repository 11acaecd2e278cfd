//! The few system calls std leaves out: CPU time (`getrusage`), huge pages off (`prctl`), signalling a process group, seeing a child end without
//! reaping it (`waitid`, `pidfd_open`), `poll`, the free space of a filesystem (`statvfs`), and a rename that never replaces
//! (`renameat2` with `RENAME_NOREPLACE`), SEEK_DATA / SEEK_HOLE (`lseek`), reflinks (`FICLONE`, `FICLONERANGE`), extended attributes (`llistxattr`, `lgetxattr`, `lsetxattr`,
//! `lremovexattr`). Each wrapper takes and returns plain values and says why it is sound.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// CPU seconds (user and system) of this process, every thread of it (`RUSAGE_SELF`), and of
/// its children that ended and were waited for, with theirs (`RUSAGE_CHILDREN`). Zero for
/// one the kernel does not give.
pub fn cpu_seconds() -> (f64, f64) {
    let of = |who: libc::c_int| {
        // SAFETY: rusage is plain data for which all-zero bytes are a valid value.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one rusage into `u`, which we own and which outlives it.
        if unsafe { libc::getrusage(who, &mut u) } != 0 {
            return 0.0;
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        secs(u.ru_utime) + secs(u.ru_stime)
    };
    (of(libc::RUSAGE_SELF), of(libc::RUSAGE_CHILDREN))
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`, what
/// mimalloc does itself with `MIMALLOC_ALLOW_THP=0`). Linux keeps the setting across `fork`
/// and `exec`, so processes started afterwards have it too.
pub fn disable_huge_pages() -> io::Result<()> {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integers only and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to every process of the process group `pgid`. A group with no process left
/// is not an error.
pub fn kill_group(pgid: u32, signal: i32) -> io::Result<()> {
    let pgid = libc::pid_t::try_from(pgid).map_err(io::Error::other)?;
    // SAFETY: killpg takes two integers and touches no memory of ours.
    if unsafe { libc::killpg(pgid, signal) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ESRCH) => Ok(()),
        _ => Err(e),
    }
}

/// Whether our child `pid` has ended, without reaping it. Until it is reaped its pid, and so
/// the id of the process group it leads, cannot be reused: signalling that group stays safe.
pub fn has_exited(pid: u32) -> io::Result<bool> {
    let id = libc::id_t::from(pid);
    // SAFETY: siginfo_t is plain data for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
    // SAFETY: waitid writes one siginfo_t into `info`, which we own and which outlives the call.
    if unsafe { libc::waitid(libc::P_PID, id, &mut info, flags) } != 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        };
    }
    // With WNOHANG and no child ready, waitid leaves si_pid zero.
    // SAFETY: `info` was filled by waitid (or is still zeroed), so si_pid reads an initialised
    // field.
    Ok(unsafe { info.si_pid() } != 0)
}

/// A descriptor that polls readable once our child `pid` has ended (Linux 5.3 and later), so
/// a wait for its output can also wake at its end; `None` where the kernel has none.
pub fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes two integers and returns a new descriptor or -1. The child is
    // not reaped yet, so `pid` is still ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = RawFd::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: the kernel just opened `fd` for us, and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits up to `wait` for any of `fds` to have data or be closed at the other end; says, per
/// descriptor, whether it has (a signal arriving meanwhile counts as nothing ready).
pub fn poll_readable(fds: &[RawFd], wait: Duration) -> io::Result<Vec<bool>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let millis = libc::c_int::try_from(wait.as_millis()).unwrap_or(libc::c_int::MAX);
    let count = libc::nfds_t::try_from(polled.len()).map_err(io::Error::other)?;
    // SAFETY: `polled` is an array of `count` pollfd structs that we own and lend exclusively
    // for the call.
    if unsafe { libc::poll(polled.as_mut_ptr(), count, millis) } < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::Interrupted => Ok(vec![false; fds.len()]),
            _ => Err(e),
        };
    }
    Ok(polled.iter().map(|p| p.revents != 0).collect())
}

/// Bytes free for an unprivileged user on the filesystem holding `dir`.
pub fn free_bytes(dir: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: statvfs is plain data, valid when zeroed; `c` is a NUL-terminated path and `st`
    // a valid place for statvfs to write, read only after it succeeded.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Renames `from` to `to`, failing with `AlreadyExists` if `to` exists, even as an empty
/// folder (which a plain `rename` would replace).
pub fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &std::path::Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
    };
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths that outlive the call; renameat2 keeps neither.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The next data and the hole after it in `f` from `at` (`lseek` SEEK_DATA / SEEK_HOLE):
/// `None` when only a hole is left.
pub fn next_data(f: &std::fs::File, at: u64) -> io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    let at = libc::off_t::try_from(at).map_err(io::Error::other)?;
    // SAFETY: lseek on an open file descriptor; it touches no memory of ours.
    let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
    if data < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((data as u64, hole as u64)))
}

/// Whether a reflink failed because the filesystem (or the pair of files) cannot share
/// blocks: the caller copies instead. ext4 and tmpfs answer EOPNOTSUPP; files on two
/// filesystems EXDEV; some filesystems EINVAL or ENOTTY.
pub fn reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS)
    )
}

/// Makes all of `dst` share the blocks of all of `src` (`FICLONE`: a reflink, on XFS and
/// btrfs): a copy that costs metadata only. See [`reflink_unsupported`] for the errors.
pub fn clone_file(src: &std::fs::File, dst: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: FICLONE takes the source descriptor as its argument, by value; both are open
    // files we hold for the duration of the call.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error())
}

/// Makes `len` bytes of `dst` at `at` share the blocks of `src` at the same offset
/// (`FICLONERANGE`). `at` and `len` must be multiples of the filesystem's block size, but
/// for a range that ends at the end of `src`.
pub fn clone_range(src: &std::fs::File, dst: &std::fs::File, at: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let range = libc::file_clone_range {
        src_fd: i64::from(src.as_raw_fd()),
        src_offset: at,
        src_length: len,
        dest_offset: at,
    };
    // SAFETY: FICLONERANGE reads one file_clone_range from `range`, which we own and which
    // outlives the call; both descriptors are open files we hold.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONERANGE, &range) } == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error())
}

/// `p` as a C string.
fn c_path(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// The extended attribute names of `path` (a symlink itself, not its target), NUL-separated,
/// at most `bytes_max` bytes of them (more is an error, `ERANGE`).
pub fn xattr_list(path: &std::path::Path, bytes_max: usize) -> io::Result<Vec<u8>> {
    let c = c_path(path)?;
    let mut buf = vec![0u8; bytes_max];
    // SAFETY: `c` is NUL-terminated; `buf` is writable for `buf.len()` bytes, and the kernel
    // writes at most that many.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// The value of extended attribute `name` of `path` (not following a symlink), at most
/// `bytes_max` bytes (more is an error, `ERANGE`).
pub fn xattr_get(path: &std::path::Path, name: &[u8], bytes_max: usize) -> io::Result<Vec<u8>> {
    let c = c_path(path)?;
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    let mut buf = vec![0u8; bytes_max];
    // SAFETY: both strings are NUL-terminated; `buf` is writable for `buf.len()` bytes, and
    // the kernel writes at most that many.
    let n = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// Sets extended attribute `name` of `path` (not following a symlink) to `value`.
#[cfg(test)]
pub fn xattr_set(path: &std::path::Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = c_path(path)?;
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated; `value` is readable for `value.len()` bytes.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Removes extended attribute `name` of `path` (not following a symlink).
#[cfg(test)]
pub fn xattr_remove(path: &std::path::Path, name: &str) -> io::Result<()> {
    let c = c_path(path)?;
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: both strings are NUL-terminated.
    if unsafe { libc::lremovexattr(c.as_ptr(), name.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
