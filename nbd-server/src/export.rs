//! Export configuration and the registry of named exports.
//!
//! An export is given on the command line as `NAME:KEY=VALUE[,KEY=VALUE...]`:
//!
//! | key | meaning |
//! |---|---|
//! | `size=SIZE` | bytes; suffixes K, M, G, T (powers of 1024); a multiple of 4096. Required unless `file` names an existing file |
//! | `file=PATH` | a raw image file; without it the export is a sparse memory disk |
//! | `readonly` | writes, trims and zeroes are refused with EPERM |
//! | `description=TEXT` | sent as NBD_INFO_DESCRIPTION (no commas) |
//! | `record=PATH` | record every write, flush, mark, fault and power cut to this write log; a file already there is refused |
//! | `record-overwrite` | let `record=` replace an existing file (never the export's own image) |
//! | `record-max=SIZE` | cap the write log: past it writes answer ENOSPC and the log ends in a full record |
//! | `record-sync=os\|flush` | FLUSH and FUA replies wait until the log is handed to the OS (default) or on stable storage |
//! | `idle-writeback=MS` | write the cache back after MS ms without a change (default 1000 for `file=`, off for memory; 0 is off) |
//! | `cache=SIZE` | the emulated disk's volatile write cache limit (default 64M) |
//! | `eio-read=P`, `eio-write=P`, `eio-flush=P` | inject EIO with probability P (0..=1) |
//! | `latency-us=N`, `latency-rate=P` | add N µs to a request with probability P |
//! | `fault-seed=S` | seed of the fault generator |
//! | `crash-after-writes=N` | cut the power after N writes |
//! | `crash-seed=S` | seed of the automatic power cut (its point, without crash-after-writes) |
//! | `flush=ignore\|honour` | `ignore` makes a lying disk, for testing crash checkers: FLUSH and FUA are answered without making anything durable, and the write log has no flush and no FUA (default `honour`) |
//!
//! A key may be given once. Across exports, one image file has one writable export (and a
//! writable file export holds an advisory lock on it, so a second server is refused too), and
//! one write log has one export; a log is never one of the images.
//!
//! Every writable export is an emulated disk ([`crate::disk`]) over its storage: a volatile
//! write cache with the durability rule, marks and power cuts.
//!
//! `NAME` may be empty (`:size=1M`), which makes it the default export. A client asking for
//! the name "" gets the export named "" if there is one, else the first export given.
//!
//! To add a key: add a field to [`ExportSpec`], a match arm in [`ExportSpec::parse`], and its
//! use in [`build_backend`]; unknown keys are rejected with the list of known ones.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use crate::backend::{Backend, FileBackend, MemoryBackend};
use crate::disk::{DiskConfig, DiskError, EmulatedDisk};
use crate::limits::FLUSH_FENCE_MILLIS_MAX;
use crate::log::LogError;
use crate::proto::*;

/// Export sizes are a multiple of this.
pub const EXPORT_ALIGNMENT_BYTES: u64 = 4096;
/// Largest export size accepted (offset + length arithmetic stays far from overflow).
pub const EXPORT_BYTES_MAX: u64 = 1 << 60;
/// Most exports one server serves.
pub const EXPORTS_MAX: usize = 256;
/// Every key [`ExportSpec::parse`] accepts, for the error message.
pub const EXPORT_KEYS: &[&str] = &[
    "size",
    "file",
    "readonly",
    "description",
    "record",
    "cache",
    "eio-read",
    "eio-write",
    "eio-flush",
    "latency-us",
    "latency-rate",
    "fault-seed",
    "crash-after-writes",
    "crash-seed",
    "record-overwrite",
    "record-max",
    "record-sync",
    "idle-writeback",
    "flush",
];

/// Default of `idle-writeback` for file exports: a real drive writes its cache back within
/// about a second of going idle.
pub const IDLE_WRITEBACK_MILLIS_DEFAULT: u64 = 1000;

/// A bad export specification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error("export {0:?}: expected NAME:size=SIZE[,file=PATH][,readonly] (missing ':')")]
    MissingColon(String),
    #[error("export {name:?}: unknown key {key:?} (known keys: {known})")]
    UnknownKey {
        name: String,
        key: String,
        known: String,
    },
    #[error("export {name:?}: key {key:?} {problem}")]
    BadValue {
        name: String,
        key: String,
        problem: String,
    },
    #[error("export {0:?}: size= is required (or file= naming an existing file)")]
    MissingSize(String),
    #[error("export {name:?}: size {size} is not a positive multiple of 4096 bytes up to 2^60")]
    BadSize { name: String, size: u64 },
    #[error("export {name:?}: {message}")]
    Backend { name: String, message: String },
    #[error("export name {0:?} is given twice")]
    Duplicate(String),
    #[error("export name {0:?} is not a valid NBD name (UTF-8, no NUL, at most 4096 bytes)")]
    BadName(String),
    #[error("no export given (use --export NAME:size=SIZE)")]
    NoExports,
    #[error("more than {EXPORTS_MAX} exports")]
    TooMany,
    #[error("export {name:?}: key {key:?} is given twice")]
    RepeatedKey { name: String, key: String },
    #[error("export {name:?}: {problem}")]
    Conflict { name: String, problem: String },
}

/// Smallest `record-max`: the file header, a few records and the full record fit.
pub const RECORD_MAX_BYTES_MIN: u64 = 4096;

/// A flag key's value: none (true), or true/false, 1/0, yes/no.
pub(crate) fn parse_bool(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("true") | Some("1") | Some("yes") => Ok(true),
        Some("false") | Some("0") | Some("no") => Ok(false),
        Some(v) => Err(format!("takes no value or true/false, not {v:?}")),
    }
}

/// Parses `64M`, `1G`, `4096`, `2T`: binary suffixes, case-insensitive, optional trailing `B`
/// or `iB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .unwrap_or(t);
    let t = if t.len() > 1 {
        t.strip_suffix(['B', 'b']).unwrap_or(t)
    } else {
        t
    };
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 64K, 16M, 2G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// One `--export` argument, parsed but not yet opened.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportSpec {
    pub name: String,
    pub size: Option<u64>,
    pub file: Option<PathBuf>,
    pub readonly: bool,
    pub description: Option<String>,
    /// Emulated-disk settings (recording, cache, faults, automatic power cut).
    pub disk: DiskConfig,
    /// Serve straight from the backend, with no emulated disk in front. The binary sets it
    /// where [`ExportSpec::disk_observable`] says nobody could tell the difference.
    pub plain: bool,
    /// `idle-writeback=MS` as given (0: off); the default depends on `file=`.
    pub idle_writeback: Option<u64>,
    /// The export is a file of an fs-core volume (`fscore=` and its keys).
    pub fscore: Option<crate::fscore::FsCoreSpec>,
}

impl ExportSpec {
    /// Whether an emulated disk in front of this export could make a difference anyone can
    /// see. It cannot for a writable memory export with no recording, faults, cache size or
    /// automatic power cut, on a server without a control socket (so no `crash`, no
    /// `stats`): the volatile cache would hold data only until a power cut that nothing can
    /// cause, and memory is gone at exit either way. Such an export is better served
    /// straight from memory: it skips the cache's bookkeeping and its write-back copy (in a
    /// paired run of 4K random writes the server used 80% instead of 90% of a core, at 7%
    /// more IOPS). A read-only export never has the disk, whatever this says.
    ///
    /// The same holds for the disk under an fs-core volume in memory (`fscore=mem`): its
    /// device then does its IO on the memory directly (no tickets, no cache entry per block,
    /// no write-back copy at each journal commit: 1 MiB writes of an fscore export went from
    /// 585 to 685 MiB/s). A volume on an image file keeps the disk.
    pub fn disk_observable(&self, control_socket: bool) -> bool {
        let image = self.fscore.as_ref().is_some_and(|f| f.image.is_some());
        control_socket || self.file.is_some() || image || self.disk != DiskConfig::default()
    }

    pub fn parse(s: &str) -> Result<Self, ExportError> {
        let (name, rest) = s
            .split_once(':')
            .ok_or_else(|| ExportError::MissingColon(s.to_owned()))?;
        let name = name.to_owned();
        if parse_string(name.as_bytes()).is_err() {
            return Err(ExportError::BadName(name));
        }
        let mut spec = ExportSpec {
            name,
            size: None,
            file: None,
            readonly: false,
            description: None,
            disk: DiskConfig::default(),
            plain: false,
            idle_writeback: None,
            fscore: None,
        };
        let mut seen = std::collections::HashSet::new();
        for item in rest.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), Some(v)),
                None => (item.trim(), None),
            };
            let canonical = if key == "ro" { "readonly" } else { key };
            if !seen.insert(canonical.to_owned()) {
                return Err(ExportError::RepeatedKey {
                    name: spec.name,
                    key: canonical.to_owned(),
                });
            }
            spec.set(key, value)?;
        }
        spec.checked()
    }

    /// Applies one `KEY[=VALUE]`: the export's storage and its write log here, faults and
    /// the automatic power cut in [`Self::set_fault_key`].
    fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), ExportError> {
        let bad = |problem: String| bad_value(&self.name, key, problem);
        let need = || value.ok_or_else(|| bad("needs a value (KEY=VALUE)".into()));
        let path = || match need()? {
            "" => Err(bad("needs a path".into())),
            v => Ok(PathBuf::from(v)),
        };
        match key {
            "size" => {
                let size = parse_size(need()?).map_err(bad)?;
                if size == 0 || size % EXPORT_ALIGNMENT_BYTES != 0 || size > EXPORT_BYTES_MAX {
                    let name = self.name.clone();
                    return Err(ExportError::BadSize { name, size });
                }
                self.size = Some(size);
            }
            "file" => self.file = Some(path()?),
            "readonly" | "ro" => self.readonly = parse_bool(value).map_err(bad)?,
            "description" => {
                let v = need()?;
                parse_string(v.as_bytes()).map_err(|e| bad(e.to_string()))?;
                self.description = Some(v.to_owned());
            }
            "record" => self.disk.record = Some(path()?),
            "flush" => {
                self.disk.flush_ignore = match need()? {
                    "ignore" => true,
                    "honour" | "honor" => false,
                    _ => return Err(bad("must be ignore or honour".into())),
                }
            }
            "cache" => self.disk.cache_bytes_max = parse_size(need()?).map_err(bad)?.max(1),
            "record-overwrite" => self.disk.record_overwrite = parse_bool(value).map_err(bad)?,
            "record-max" => {
                let v = parse_size(need()?).map_err(bad)?;
                if v < RECORD_MAX_BYTES_MIN {
                    return Err(bad(format!(
                        "must be at least {RECORD_MAX_BYTES_MIN} bytes"
                    )));
                }
                self.disk.record_max_bytes = Some(v);
            }
            "record-sync" => {
                self.disk.record_sync = match need()? {
                    "os" => false,
                    "flush" => true,
                    v => return Err(bad(format!("is os or flush, not {v:?}"))),
                }
            }
            "fscore" => {
                let fs = self.fscore.get_or_insert_with(Default::default);
                fs.image = match need()? {
                    "mem" => None,
                    "" => return Err(bad("is a path or mem".into())),
                    p => Some(PathBuf::from(p)),
                };
                fs.keys.push("fscore".into());
            }
            k if crate::fscore::FSCORE_KEYS.contains(&k) => {
                let fs = self.fscore.get_or_insert_with(Default::default);
                fs.set(k, value).map_err(bad)?;
            }
            "idle-writeback" => {
                let v: u64 = need()?
                    .parse()
                    .map_err(|_| bad("needs a whole number of milliseconds".into()))?;
                self.idle_writeback = Some(v);
            }
            _ => return self.set_fault_key(key, value),
        }
        Ok(())
    }

    /// Applies one key of fault injection or of the automatic power cut.
    fn set_fault_key(&mut self, key: &str, value: Option<&str>) -> Result<(), ExportError> {
        let bad = |problem: String| bad_value(&self.name, key, problem);
        let need = || value.ok_or_else(|| bad("needs a value (KEY=VALUE)".into()));
        match key {
            "eio-read" | "eio-write" | "eio-flush" | "latency-rate" => {
                let v: f64 = need()?
                    .parse()
                    .ok()
                    .filter(|p| (0.0..=1.0).contains(p))
                    .ok_or_else(|| bad("needs a probability in 0..=1".into()))?;
                let f = &mut self.disk.faults;
                *match key {
                    "eio-read" => &mut f.eio_read,
                    "eio-write" => &mut f.eio_write,
                    "eio-flush" => &mut f.eio_flush,
                    _ => &mut f.latency_rate,
                } = v;
            }
            "latency-us" | "fault-seed" | "crash-after-writes" | "crash-seed" => {
                let v: u64 = need()?
                    .parse()
                    .map_err(|_| bad("needs a whole number".into()))?;
                match key {
                    "latency-us" => {
                        self.disk.faults.latency_us =
                            u32::try_from(v).map_err(|_| bad("is too large".into()))?
                    }
                    "fault-seed" => self.disk.faults.seed = v,
                    "crash-after-writes" => self.disk.crash_after_writes = Some(v.max(1)),
                    _ => self.disk.crash_seed = Some(v),
                }
            }
            _ => {
                return Err(ExportError::UnknownKey {
                    name: self.name.clone(),
                    key: key.to_owned(),
                    known: EXPORT_KEYS
                        .iter()
                        .chain(crate::fscore::FSCORE_KEYS)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", "),
                })
            }
        }
        Ok(())
    }

    /// The checks across keys, and the idle write-back's default (on for `file=`).
    fn checked(mut self) -> Result<Self, ExportError> {
        if let Some(fs) = &self.fscore {
            let problem = if !fs.keys.iter().any(|k| k == "fscore") {
                Some("fs-core keys need fscore=PATH|mem".to_owned())
            } else if self.file.is_some() {
                Some(
                    "file= and fscore= exclude each other (fscore=PATH is the volume's image)"
                        .into(),
                )
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(ExportError::Conflict {
                    name: self.name,
                    problem,
                });
            }
            if self.size.is_none() && fs.image.is_none() {
                return Err(ExportError::MissingSize(self.name));
            }
        }
        if self.size.is_none() && self.file.is_none() && self.fscore.is_none() {
            return Err(ExportError::MissingSize(self.name));
        }
        if self.readonly && self.disk.record.is_some() {
            return Err(ExportError::Conflict {
                name: self.name,
                problem: "a read-only export records nothing: drop record= or readonly".into(),
            });
        }
        self.disk.idle_writeback_ms = match self.idle_writeback {
            Some(0) => None,
            Some(ms) => Some(ms),
            None if self.file.is_some() => Some(IDLE_WRITEBACK_MILLIS_DEFAULT),
            None => None,
        };
        Ok(self)
    }
}

/// The error for a bad value of `key` in export `name`.
fn bad_value(name: &str, key: &str, problem: String) -> ExportError {
    ExportError::BadValue {
        name: name.to_owned(),
        key: key.into(),
        problem,
    }
}

impl FromStr for ExportSpec {
    type Err = ExportError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExportSpec::parse(s)
    }
}

/// Opens the storage an export spec names.
pub fn build_backend(spec: &ExportSpec) -> Result<Arc<dyn Backend>, ExportError> {
    match &spec.file {
        Some(path) => {
            let f = FileBackend::open(path, spec.size, spec.readonly).map_err(|e| {
                ExportError::Backend {
                    name: spec.name.clone(),
                    message: format!("{}: {e}", path.display()),
                }
            })?;
            let size = f.size();
            if size == 0 || size % EXPORT_ALIGNMENT_BYTES != 0 || size > EXPORT_BYTES_MAX {
                return Err(ExportError::BadSize {
                    name: spec.name.clone(),
                    size,
                });
            }
            Ok(Arc::new(f))
        }
        None => {
            let size = spec
                .size
                .ok_or_else(|| ExportError::MissingSize(spec.name.clone()))?;
            Ok(Arc::new(MemoryBackend::new(size)))
        }
    }
}

/// Started volumes by key, each with the file indexes its exports have not taken yet.
type StartedVolumes =
    std::collections::HashMap<String, (Arc<crate::fscore::served::ServedVolume>, Vec<usize>)>;

/// The fs-core volumes the specs name, started, by volume key, each with the file indexes of
/// its exports in spec order. Volume-wide keys (fs-core switches, session, disk keys) come
/// from the first export of a volume; a later one giving any is refused.
fn start_volumes(specs: &[ExportSpec]) -> Result<StartedVolumes, ExportError> {
    use crate::fscore::served::{ServedVolume, VolumeSetup};
    let mut setups: Vec<(String, VolumeSetup)> = Vec::new();
    for spec in specs {
        let Some(fs) = &spec.fscore else { continue };
        let key = fs.volume_key();
        match setups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, setup)) => {
                let extra: Vec<&String> = fs.keys.iter().filter(|k| *k != "fscore").collect();
                if !extra.is_empty() || spec.disk != DiskConfig::default() {
                    return Err(ExportError::Conflict {
                        name: spec.name.clone(),
                        problem: format!(
                            "the volume's keys ({extra:?}, disk keys) go on its first export, {:?}",
                            setup.label
                        ),
                    });
                }
                setup.files.push((spec.name.clone(), spec.size));
            }
            None => setups.push((
                key,
                VolumeSetup {
                    image: fs.image.clone(),
                    files: vec![(spec.name.clone(), spec.size)],
                    volume_size: fs.volume_size,
                    config: fs.config.clone(),
                    sched_seed: fs.sched_seed,
                    session: fs.session.clone(),
                    disk: spec.disk.clone(),
                    plain: spec.plain,
                    label: spec.name.clone(),
                },
            )),
        }
    }
    let mut out = std::collections::HashMap::new();
    for (key, setup) in setups {
        let n = setup.files.len();
        let label = setup.label.clone();
        if setup.session.is_some()
            && (setup.disk.crash_after_writes.is_some() || setup.disk.crash_seed.is_some())
        {
            return Err(ExportError::Conflict {
                name: label,
                problem: "session= cannot replay an automatic power cut (crash-after-writes,                           crash-seed); cut with `nbd-server ctl crash` instead"
                    .into(),
            });
        }
        let volume = ServedVolume::start(setup).map_err(|message| ExportError::Backend {
            name: label,
            message,
        })?;
        out.insert(key, (volume, (0..n).collect()));
    }
    Ok(out)
}

/// Whether `a` and `b` name one file: the same inode where both exist, else the same path
/// once made absolute (a symbolic link to an image is its image).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => absolute(a) == absolute(b),
    }
}

fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
    match (parent.map(std::fs::canonicalize), p.file_name()) {
        (Some(Ok(d)), Some(f)) => d.join(f),
        (None, Some(f)) => std::env::current_dir().unwrap_or_default().join(f),
        _ => p.to_owned(),
    }
}

/// Refuses specs that would destroy or share data behind each other's backs, before any file
/// is opened: a write log that is an export's image (its own or another's), two logs in one
/// file, two writable exports of one image.
pub fn check_specs(specs: &[ExportSpec]) -> Result<(), ExportError> {
    let conflict = |name: &str, problem: String| ExportError::Conflict {
        name: name.to_owned(),
        problem,
    };
    for (i, a) in specs.iter().enumerate() {
        if let Some(log) = &a.disk.record {
            if let Some(img) = specs
                .iter()
                .find(|b| b.file.as_deref().is_some_and(|f| same_file(log, f)))
            {
                return Err(conflict(
                    &a.name,
                    format!(
                        "record={} is the image of export {:?}; the log would overwrite it",
                        log.display(),
                        img.name
                    ),
                ));
            }
        }
        for b in &specs[i + 1..] {
            if let (Some(x), Some(y)) = (&a.disk.record, &b.disk.record) {
                if same_file(x, y) {
                    return Err(conflict(
                        &b.name,
                        format!("records to {}, as export {:?} does", y.display(), a.name),
                    ));
                }
            }
            if let (Some(x), Some(y), false, false) = (&a.file, &b.file, a.readonly, b.readonly) {
                if same_file(x, y) {
                    return Err(conflict(
                        &b.name,
                        format!(
                            "{} is already the image of writable export {:?}",
                            y.display(),
                            a.name
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Counts the replies of one export that are being written to a socket but not yet reported
/// with [`Backend::reply_sent`].
///
/// Why: `reply_sent` comes after the bytes reach the socket, so a client can read a write's
/// reply and send a FLUSH on another connection before that write's `reply_sent` ran. The
/// backend would then see the flush arrive before the write counted as answered, and leave
/// the write out of what the flush covers, although the client rightly counts on it. So a
/// FLUSH waits (up to [`FLUSH_FENCE_MILLIS_MAX`]) until no reply of its export is in transit
/// before it calls `arrived`. Writes whose reply was still in transit are then covered too,
/// which is allowed: a flush may persist more than it must.
///
/// Only batches already in transit when the flush arrives are waited for (by id), so a flush
/// is not held up by replies that started after it, however busy the other connections are.
#[derive(Debug, Default)]
pub struct ReplyFence {
    state: std::sync::Mutex<FenceState>,
    idle: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct FenceState {
    next_id: u64,
    in_transit: std::collections::BTreeSet<u64>,
}

impl ReplyFence {
    fn state(&self) -> std::sync::MutexGuard<'_, FenceState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A batch of replies starts on its way to a socket.
    pub(crate) fn begin(&self) -> u64 {
        let mut st = self.state();
        let id = st.next_id;
        st.next_id += 1;
        st.in_transit.insert(id);
        id
    }

    /// The batch's replies were reported with `reply_sent` (or abandoned).
    pub(crate) fn end(&self, id: u64) {
        self.state().in_transit.remove(&id);
        self.idle.notify_waiters();
    }

    /// Waits until every batch begun before this call has ended.
    pub(crate) async fn wait_idle(&self) {
        let horizon = self.state().next_id;
        let wait = async {
            loop {
                let notified = self.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let oldest = self.state().in_transit.first().copied();
                // Batches are ids in begin order: only those begun before the flush count.
                if oldest.is_none() || oldest >= Some(horizon) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(
            std::time::Duration::from_millis(FLUSH_FENCE_MILLIS_MAX),
            wait,
        )
        .await
        .is_err()
        {
            tracing::warn!("FLUSH waited {FLUSH_FENCE_MILLIS_MAX} ms for replies stuck in transit");
        }
    }
}

/// A served export.
pub struct Export {
    pub name: String,
    pub description: Option<String>,
    pub readonly: bool,
    pub backend: Arc<dyn Backend>,
    /// Orders FLUSH arrivals after the `reply_sent` of every reply already on the wire.
    pub(crate) fence: ReplyFence,
    /// The emulated disk behind `backend`, for writable exports built from a spec.
    pub disk: Option<Arc<EmulatedDisk>>,
    /// Bumped by [`Export::disconnect_all`]; every connection of the export watches it.
    pub(crate) kick: tokio::sync::watch::Sender<u64>,
    /// The fs-core volume this export is a file of.
    pub fscore: Option<Arc<crate::fscore::served::ServedVolume>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .field("readonly", &self.readonly)
            .finish()
    }
}

impl Export {
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>, readonly: bool) -> Self {
        Export {
            name: name.into(),
            description: None,
            readonly,
            backend,
            fence: Default::default(),
            disk: None,
            kick: tokio::sync::watch::Sender::new(0),
            fscore: None,
        }
    }

    /// The export that is file `file` of `volume`.
    pub fn of_volume(
        spec: &ExportSpec,
        volume: Arc<crate::fscore::served::ServedVolume>,
        file: usize,
    ) -> Self {
        let backend = Arc::new(crate::fscore::served::FsCoreFile {
            volume: volume.clone(),
            file,
        });
        Export {
            name: spec.name.clone(),
            description: spec.description.clone(),
            readonly: spec.readonly,
            backend,
            fence: Default::default(),
            kick: volume.disk.power_cut_sender(),
            disk: Some(volume.disk.clone()),
            fscore: Some(volume),
        }
    }

    /// Builds the backend of `spec` and wraps it.
    pub fn from_spec(spec: &ExportSpec) -> Result<Self, ExportError> {
        let storage = build_backend(spec)?;
        let disk = if spec.readonly || spec.plain {
            None
        } else {
            let d = EmulatedDisk::named(storage.clone(), spec.disk.clone(), &spec.name).map_err(
                |e| ExportError::Backend {
                    name: spec.name.clone(),
                    message: match (&spec.disk.record, &e) {
                        (Some(p), DiskError::Log(LogError::Io(io)))
                            if io.kind() == std::io::ErrorKind::AlreadyExists =>
                        {
                            format!(
                                "record={} exists; refusing to overwrite it (add \
                                 record-overwrite to replace it)",
                                p.display()
                            )
                        }
                        _ => e.to_string(),
                    },
                },
            )?;
            let d = Arc::new(d);
            d.start_idle_writeback();
            Some(d)
        };
        let backend = match &disk {
            Some(d) => d.clone() as Arc<dyn Backend>,
            None => storage,
        };
        Ok(Export {
            name: spec.name.clone(),
            description: spec.description.clone(),
            readonly: spec.readonly,
            backend,
            // A power cut of the disk drops connections through the same channel as
            // `disconnect_all`.
            kick: disk
                .as_ref()
                .map(|d| d.power_cut_sender())
                .unwrap_or_else(|| tokio::sync::watch::Sender::new(0)),
            disk,
            fence: Default::default(),
            fscore: None,
        })
    }

    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// Drops every connection of this export at once, as a power cut would: no further
    /// request is read, replies not yet written are never sent (the backend gets
    /// `reply_abandoned` for them), and the sockets close. New connections are accepted as
    /// usual. Requests already executing still finish inside the backend.
    pub fn disconnect_all(&self) {
        self.kick.send_modify(|g| *g += 1);
    }

    /// The transmission flags sent to a client; `structured` says whether structured replies
    /// were negotiated (NBD_FLAG_SEND_DF depends on it).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_CACHE
            | NBD_FLAG_CAN_MULTI_CONN;
        if self.backend.can_fast_zero() {
            f |= NBD_FLAG_SEND_FAST_ZERO;
        }
        if structured {
            f |= NBD_FLAG_SEND_DF;
        }
        if self.readonly {
            f |= NBD_FLAG_READ_ONLY;
        }
        f
    }
}

/// The exports of one server, in the order given.
#[derive(Debug, Clone)]
pub struct ExportRegistry {
    exports: Vec<Arc<Export>>,
}

impl ExportRegistry {
    pub fn new(exports: Vec<Export>) -> Result<Self, ExportError> {
        if exports.is_empty() {
            return Err(ExportError::NoExports);
        }
        if exports.len() > EXPORTS_MAX {
            return Err(ExportError::TooMany);
        }
        let mut seen = std::collections::HashSet::new();
        for e in &exports {
            if !seen.insert(e.name.clone()) {
                return Err(ExportError::Duplicate(e.name.clone()));
            }
        }
        Ok(ExportRegistry {
            exports: exports.into_iter().map(Arc::new).collect(),
        })
    }

    /// Checks the specs against each other ([`check_specs`]), then opens every one.
    pub fn from_specs(specs: &[ExportSpec]) -> Result<Self, ExportError> {
        check_specs(specs)?;
        let mut volumes = start_volumes(specs)?;
        let exports = specs
            .iter()
            .map(|spec| match &spec.fscore {
                Some(fs) => {
                    let (volume, files) = volumes
                        .get_mut(&fs.volume_key())
                        .expect("every volume was started");
                    let file = files.remove(0);
                    Ok(Export::of_volume(spec, volume.clone(), file))
                }
                None => Export::from_spec(spec),
            })
            .collect::<Result<Vec<_>, _>>()?;
        ExportRegistry::new(exports)
    }

    /// The export a client means by `name`: an exact match, or for "" the first export.
    pub fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .iter()
            .find(|e| e.name == name)
            .or_else(|| {
                if name.is_empty() {
                    self.exports.first()
                } else {
                    None
                }
            })
            .cloned()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.exports.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("16m").unwrap(), 16 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }

    #[test]
    fn specs_parse() {
        let s = ExportSpec::parse("disk:size=64M,file=/tmp/x.img,readonly").unwrap();
        assert_eq!(s.name, "disk");
        assert_eq!(s.size, Some(64 << 20));
        assert_eq!(s.file, Some(PathBuf::from("/tmp/x.img")));
        assert!(s.readonly);
        let d = ExportSpec::parse(":size=1M").unwrap();
        assert_eq!(d.name, "");
        assert!(!d.disk.flush_ignore);
        let lying = ExportSpec::parse("l:size=1M,flush=ignore").unwrap();
        assert!(lying.disk.flush_ignore);
        let e = ExportSpec::parse("l:size=1M,flush=maybe").unwrap_err();
        assert!(e.to_string().contains("ignore or honour"), "{e}");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let e = ExportSpec::parse("disk").unwrap_err().to_string();
        assert!(e.contains("missing ':'"), "{e}");
        let e = ExportSpec::parse("disk:size=1000").unwrap_err().to_string();
        assert!(e.contains("multiple of 4096"), "{e}");
        let e = ExportSpec::parse("disk:size=1M,color=red")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key \"color\"") && e.contains("size, file"),
            "{e}"
        );
        let e = ExportSpec::parse("disk:readonly").unwrap_err().to_string();
        assert!(e.contains("size= is required"), "{e}");
        assert!(ExportSpec::parse("disk:size=").is_err());
        assert!(ExportSpec::parse("disk:size=0").is_err());
    }

    #[test]
    fn registry_rules() {
        let a = Export::new("a", Arc::new(MemoryBackend::new(4096)), false);
        let b = Export::new("b", Arc::new(MemoryBackend::new(8192)), true);
        let r = ExportRegistry::new(vec![a, b]).unwrap();
        assert_eq!(r.lookup("b").unwrap().size(), 8192);
        assert_eq!(
            r.lookup("").unwrap().name,
            "a",
            "\"\" falls back to the first export"
        );
        assert!(r.lookup("c").is_none());
        let dup = vec![
            Export::new("a", Arc::new(MemoryBackend::new(4096)), false),
            Export::new("a", Arc::new(MemoryBackend::new(4096)), false),
        ];
        assert!(matches!(
            ExportRegistry::new(dup),
            Err(ExportError::Duplicate(_))
        ));
        assert!(matches!(
            ExportRegistry::new(vec![]),
            Err(ExportError::NoExports)
        ));
    }

    #[test]
    fn readonly_flag_is_advertised() {
        let e = Export::new("a", Arc::new(MemoryBackend::new(4096)), true);
        assert_ne!(e.transmission_flags(false) & NBD_FLAG_READ_ONLY, 0);
        assert_eq!(e.transmission_flags(false) & NBD_FLAG_SEND_DF, 0);
        assert_ne!(e.transmission_flags(true) & NBD_FLAG_SEND_DF, 0);
    }
}
