//! Writing a report file. The whole report is made in memory first, then written to a
//! temporary file beside the target, synced, and renamed onto the target name: the target
//! never holds a partial report, whatever way the process ends (a SIGKILL while writing can
//! leave only the hidden temporary file). An existing file is replaced only when the caller
//! says so (`--force`): without it the rename itself refuses (`persist_noclobber`), so a file
//! that appears meanwhile is not destroyed either.

use super::ReportError;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path`, which must not exist unless `force`.
pub fn write_new(path: &Path, bytes: &[u8], force: bool) -> Result<(), ReportError> {
    let io = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(io(std::io::Error::other(
                "is a folder; give a file name to write the report to",
            )))
        }
        Ok(_) if !force => {
            return Err(ReportError::Exists {
                path: path.to_path_buf(),
            })
        }
        _ => {}
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or("report".into(), |n| n.to_string_lossy().into_owned());
    // A report is for reading: the usual mode of a new file (the umask applies), not the
    // owner-only mode temporary files get.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    let persisted = if force {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    match persisted {
        Ok(_) => Ok(()),
        // The temporary file is removed when `e` (which owns it) drops.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Err(ReportError::Exists {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io(e.error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards against destroying a user's file: without `force` an existing file keeps its
    /// bytes, and no temporary file is left beside it.
    #[test]
    fn refuses_to_replace_without_force() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("report.html");
        std::fs::write(&p, b"mine").unwrap();
        let e = write_new(&p, b"new", false).unwrap_err();
        assert!(matches!(e, ReportError::Exists { .. }), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"mine");
        write_new(&p, b"new", true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the report: {left:?}");
    }

    #[test]
    fn writes_a_new_file_and_refuses_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.svg");
        write_new(&p, b"<svg/>", false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"<svg/>");
        assert!(write_new(d.path(), b"x", true).is_err());
    }
}
