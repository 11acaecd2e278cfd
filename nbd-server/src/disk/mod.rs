//! The emulated disk: a [`Backend`] that wraps the storage backend with a volatile write cache
//! and applies the durability rule, records every change to a write log, takes marks, cuts
//! the power and injects faults.
//!
//! **Durability rule** (the one dm-log-writes uses): a write is durable once a FLUSH that
//! arrived *after the write's reply was sent* has been answered, or once it was answered with
//! FUA. It is global: a FLUSH on one connection covers writes answered on every connection.
//!
//! **How it is kept.** Every write goes into the cache, an ordered list of pending writes with
//! an extent index that overlays reads. The storage backend only ever receives writes in the
//! order the disk applied them (a write-back of write *n* first writes back every older pending
//! write), so whatever subset of the cache a power cut persists, an older write never lands
//! after a newer one. Each answered write is stamped with the flush generation current when
//! its reply was sent; a FLUSH bumps the generation at arrival and, when executed, writes back
//! every write stamped before it, then flushes the storage. A FUA write is written through at
//! once. When the cache holds more than [`CACHE_BYTES_MAX`], the oldest writes are written
//! back early, as a real disk may do; they then survive any power cut, which is allowed.
//!
//! **Epochs in the log.** Data records are appended when the write is applied (so log order is
//! apply order). A flush record is appended at the flush's arrival and lists the writes already
//! applied but not yet answered: they are in flight across the flush and belong to the next
//! epoch.
//!
//! **Power cut** ([`EmulatedDisk::power_cut`]): with a seeded generator, choose a mode (none,
//! some, torn) and a fate for every pending write (dropped, kept, or torn at 512-byte sectors),
//! apply the kept parts to storage in order, record the choice, invalidate every request in
//! flight and signal the server to drop every connection. The disk keeps serving the result.
//!
//! **Faults**: decided at arrival by a generator seeded from [`FaultConfig::seed`]: EIO on
//! reads, writes or flushes at a rate, and added latency; each one is recorded.
//!
//! **Refusals** are typed ([`Refusal`]): a request from before a power cut, an injected EIO,
//! the write that cut the power, a full or failed write log. The server answers each with the
//! NBD error its [`Refusal::errno`] names.
//!
//! Modules, one concern each: `cache` (pending writes, write-back in apply order), `tickets`
//! (requests in flight, flush generations), `recording` and `recorder` (the write log, its
//! cap, its writer thread), `power_cut` (the seeded choice of survivors, the automatic cut),
//! `faults` (the seeded fault generator), `io` (the [`Backend`] the server drives), `mem` (a
//! dense storage for tests and tools).

mod cache;
mod faults;
mod io;
mod mem;
mod power_cut;
mod recorder;
mod recording;
#[cfg(test)]
mod tests;
mod tickets;

use std::io as stdio;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::backend::Backend;
use crate::log::{
    encode_payload, Fate, LogError, PowerCutPayload, RecordKind, WriteFate, MARK_NAME_BYTES_MAX,
};
use cache::Cache;
pub use faults::FaultConfig;
use faults::Faults;
pub use mem::VecStorage;
use power_cut::PowerCut;
pub use power_cut::PowerCutReport;
pub use recorder::{
    LogSink, Pusher, Record, Recorder, RECORDER_QUEUE_BYTES_MAX, RECORDER_QUEUE_RECORDS_MAX,
};
use recording::Recording;
use tickets::Tickets;

/// Bytes of pending (non-durable) write data the cache holds before writing back the oldest.
pub const CACHE_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Pending writes the cache holds before writing back the oldest.
pub const CACHE_ENTRIES_MAX: usize = 16 * 1024;
/// With `crash-seed` and no explicit count, the power cut comes after 1..=this many writes.
pub const CRASH_AFTER_WRITES_RANDOM_MAX: u64 = 1000;

/// How an emulated disk is set up (from the export's options).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DiskConfig {
    /// Write log to record to; `None` records nothing.
    pub record: Option<PathBuf>,
    /// Limit of pending bytes; 0 means [`CACHE_BYTES_MAX`].
    pub cache_bytes_max: u64,
    pub faults: FaultConfig,
    /// Cut the power after this many applied writes.
    pub crash_after_writes: Option<u64>,
    /// Seed of the automatic power cut (its point when `crash_after_writes` is unset, and its
    /// choice of surviving writes).
    pub crash_seed: Option<u64>,
    /// Replace a file already at `record` (`record-overwrite`); without it one is refused.
    pub record_overwrite: bool,
    /// Cap of the write log in bytes (`record-max`): a write, trim or zero write that would
    /// take the log past it is refused with ENOSPC, and the log says so in a full record.
    pub record_max_bytes: Option<u64>,
    /// FLUSH and FUA replies wait until the log is on stable storage (`record-sync=flush`),
    /// not only handed to the operating system (the default).
    pub record_sync: bool,
    /// Write the whole cache back after this many milliseconds without a change
    /// (`idle-writeback`), as a real drive does; `None` never does.
    pub idle_writeback_ms: Option<u64>,
    /// A lying disk (`flush=ignore`): FLUSH and FUA are answered without making anything
    /// durable, and the write log records what the disk promised, which is nothing: no flush
    /// record, no FUA flag. Crash states of such a log lose what a flush claimed to keep.
    pub flush_ignore: bool,
}

/// Flush, mark, fault and power-cut records may take a capped log this far past its cap
/// (they change no data, and a flush must still be answered truthfully); beyond it they are
/// refused too.
pub const RECORD_MAX_SLACK_BYTES: u64 = 1024 * 1024;
/// How often the idle write-back looks at the disk.
pub const IDLE_WRITEBACK_POLL_MILLIS: u64 = 100;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("storage I/O error: {0}")]
    Storage(#[from] stdio::Error),
    #[error("mark name must be 1..={MARK_NAME_BYTES_MAX} bytes with no control characters")]
    BadMarkName,
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("{}", ranges_message(.0))]
    Unwritten(Vec<(u64, u64)>),
}

/// Why the emulated disk refused or failed a request. It travels inside the `io::Error` of
/// the [`Backend`] method (see `From<Refusal> for io::Error`), and the server answers it
/// with the NBD error [`Refusal::errno`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    #[error("the request arrived before a power cut")]
    OutlivedPowerCut,
    #[error("injected EIO (fault injection)")]
    InjectedEio,
    #[error("this write cut the power (crash-after-writes)")]
    PowerCut,
    #[error("the write log reached its cap (record-max)")]
    LogCapped,
    #[error("the disk of the write log is full; the disk refuses further changes")]
    LogDiskFull,
    #[error("the write log failed; the disk refuses further changes")]
    LogFailed,
}

impl Refusal {
    /// The refusal a failed write log leaves: ENOSPC when the log's disk is full, else EIO.
    fn of_log(e: &LogError) -> Self {
        if matches!(e, LogError::LogDiskFull) {
            Refusal::LogDiskFull
        } else {
            Refusal::LogFailed
        }
    }

    /// The errno the request is answered with.
    pub fn errno(self) -> i32 {
        match self {
            Refusal::LogCapped | Refusal::LogDiskFull => libc::ENOSPC,
            _ => libc::EIO,
        }
    }
}

impl From<Refusal> for stdio::Error {
    /// An error of kind `StorageFull` for ENOSPC, `Other` (EIO) otherwise, carrying the
    /// refusal itself.
    fn from(r: Refusal) -> stdio::Error {
        let kind = match r.errno() {
            libc::ENOSPC => stdio::ErrorKind::StorageFull,
            _ => stdio::ErrorKind::Other,
        };
        stdio::Error::new(kind, r)
    }
}

fn ranges_message(ranges: &[(u64, u64)]) -> String {
    const SHOWN_MAX: usize = 16;
    let mut s = format!("{} cached writes could not be written back:", ranges.len());
    for (off, len) in ranges.iter().take(SHOWN_MAX) {
        s.push_str(&format!(" bytes {off}..{} ({len} bytes);", off + len));
    }
    if ranges.len() > SHOWN_MAX {
        s.push_str(&format!(" and {} more", ranges.len() - SHOWN_MAX));
    }
    s
}

/// Counters shown by `nbd-server ctl stats`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiskStats {
    pub writes: u64,
    pub write_bytes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub flushes: u64,
    /// Flushes a lying disk (`flush=ignore`) answered without doing anything.
    pub ignored_flushes: u64,
    pub fua_writes: u64,
    pub reads: u64,
    pub marks: u64,
    pub faults: u64,
    pub power_cuts: u64,
    pub early_writebacks: u64,
    pub cache_entries: usize,
    pub cache_bytes: u64,
    pub log_records: u64,
    pub recording: bool,
}

impl DiskStats {
    /// Counts a change applied.
    fn count(&mut self, kind: RecordKind, length: u64, fua: bool) {
        match kind {
            RecordKind::Write => {
                self.writes += 1;
                self.write_bytes += length;
            }
            RecordKind::Trim => self.trims += 1,
            _ => self.write_zeroes += 1,
        }
        if fua {
            self.fua_writes += 1;
        }
    }
}

/// Everything the disk changes under its lock, one part per concern.
struct State {
    cache: Cache,
    tickets: Tickets,
    log: Recording,
    faults: Faults,
    cut: PowerCut,
    /// Changes applied since the idle write-back last looked.
    changed: bool,
    stats: DiskStats,
}

/// The emulated disk. Cheap to share: wrap it in an `Arc` and hand it to the server.
pub struct EmulatedDisk {
    storage: Arc<dyn Backend>,
    state: Mutex<State>,
    config: DiskConfig,
    cut_tx: watch::Sender<u64>,
    reads: std::sync::atomic::AtomicU64,
    /// Written-back payload buffers (see [`cache::Spares`]).
    spares: cache::Spares,
    /// The export's name, for the server's log.
    name: String,
    /// Held by whoever must not see a power cut in the middle of its work (the engine thread
    /// of an fs-core volume holds it for each step, so a cut falls between two steps).
    cut_gate: std::sync::OnceLock<Arc<Mutex<()>>>,
    /// The seed of the last power cut.
    last_cut_seed: Mutex<Option<u64>>,
    /// Set by [`Self::pass_through`]: the disk under an fs-core volume that nothing can
    /// observe hands fs-core's IO straight to its storage.
    plain: std::sync::OnceLock<()>,
}

impl EmulatedDisk {
    pub fn new(storage: Arc<dyn Backend>, config: DiskConfig) -> Result<Self, DiskError> {
        Self::named(storage, config, "")
    }

    /// [`Self::new`] for the export `name` (which the server's log messages then name).
    pub fn named(
        storage: Arc<dyn Backend>,
        config: DiskConfig,
        name: &str,
    ) -> Result<Self, DiskError> {
        let recorder = match &config.record {
            Some(path) => Some(Recorder::create(
                path,
                storage.size(),
                config.record_overwrite,
            )?),
            None => None,
        };
        Ok(Self::with_recorder(storage, config, recorder, name))
    }

    /// [`Self::named`] recording to `recorder` rather than to `config.record` (tests give it
    /// a log writer that fails on demand).
    pub fn with_recorder(
        storage: Arc<dyn Backend>,
        config: DiskConfig,
        recorder: Option<Recorder>,
        name: &str,
    ) -> Self {
        let cache_limit = if config.cache_bytes_max == 0 {
            CACHE_BYTES_MAX
        } else {
            config.cache_bytes_max
        };
        let cache = Cache::new(cache_limit, CACHE_ENTRIES_MAX, name);
        let state = State {
            cache,
            tickets: Tickets::default(),
            stats: DiskStats {
                recording: recorder.is_some(),
                ..DiskStats::default()
            },
            log: Recording::new(recorder, config.record_max_bytes),
            faults: Faults::new(&config.faults),
            cut: PowerCut::new(&config),
            changed: false,
        };
        EmulatedDisk {
            spares: state.cache.spares(),
            state: Mutex::new(state),
            storage,
            config,
            cut_tx: watch::channel(0).0,
            reads: Default::default(),
            name: name.to_owned(),
            cut_gate: std::sync::OnceLock::new(),
            last_cut_seed: Mutex::new(None),
            plain: std::sync::OnceLock::new(),
        }
    }

    /// Lets fs-core's device on this disk skip it and do its IO on the storage directly
    /// ([`Self::plain_storage`]). Only for a disk nothing can observe (no control socket, no
    /// recording, faults, cache size or automatic power cut: see
    /// `ExportSpec::disk_observable`), for which the volatile cache would hold data only until
    /// a power cut nothing can cause: the same reasoning as a plain memory export.
    pub fn pass_through(&self) {
        let _ = self.plain.set(());
    }

    /// The storage to do IO on directly, if [`Self::pass_through`] was called.
    pub fn plain_storage(&self) -> Option<&Arc<dyn Backend>> {
        self.plain.get().map(|()| &self.storage)
    }

    /// A receiver that changes value at every power cut: the server drops every connection
    /// of this export when it fires.
    pub fn power_cuts(&self) -> watch::Receiver<u64> {
        self.cut_tx.subscribe()
    }

    /// The sender that power cuts bump; the export uses it as its disconnect channel, so
    /// `Export::disconnect_all` and a power cut drop connections the same way.
    pub fn power_cut_sender(&self) -> watch::Sender<u64> {
        self.cut_tx.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug; the state may be half-updated, so stop.
        self.state
            .lock()
            .expect("emulated disk state lock poisoned")
    }

    pub fn stats(&self) -> DiskStats {
        let st = self.lock();
        let mut s = st.stats.clone();
        s.reads = self.reads.load(std::sync::atomic::Ordering::Relaxed);
        s.cache_entries = st.cache.len();
        s.cache_bytes = st.cache.bytes();
        s.log_records = st.log.records();
        s
    }

    /// Puts a named mark into the log, in order with the IO around it.
    pub fn mark(&self, name: &str) -> Result<Option<u64>, DiskError> {
        if name.is_empty() || name.len() > MARK_NAME_BYTES_MAX || name.chars().any(char::is_control)
        {
            return Err(DiskError::BadMarkName);
        }
        let mut st = self.lock();
        let record = Record::event(RecordKind::Mark, 0, name.as_bytes().to_vec());
        let seq = st.log.append(record)?;
        st.stats.marks += 1;
        Ok(seq)
    }

    /// Pushes buffered log records to the file (and to stable storage).
    pub fn sync_log(&self) -> Result<(), DiskError> {
        self.lock().log.sync()?;
        Ok(())
    }

    /// Cuts the power: see the module docs. `seed` defaults to one derived from the crash seed
    /// and the number of earlier cuts.
    pub fn power_cut(&self, seed: Option<u64>) -> Result<PowerCutReport, DiskError> {
        let gate = self.cut_gate.get().cloned();
        let _held = gate
            .as_ref()
            .map(|g| g.lock().unwrap_or_else(|p| p.into_inner()));
        let report = {
            let mut st = self.lock();
            let seed = st.cut.seed(seed);
            self.power_cut_locked(&mut st, seed)?
        };
        *self.last_cut_seed.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.seed);
        self.cut_tx.send_modify(|g| *g += 1);
        Ok(report)
    }

    /// Makes every power cut wait for `gate` (set once; later calls are ignored).
    pub fn set_power_cut_gate(&self, gate: Arc<Mutex<()>>) {
        let _ = self.cut_gate.set(gate);
    }

    /// The seed of the last power cut, if there was one.
    pub fn last_power_cut_seed(&self) -> Option<u64> {
        *self.last_cut_seed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a cut seeded with `seed` (see [`power_cut::choose`]) under the lock: the
    /// surviving pieces of the pending writes go to storage in apply order, every request in
    /// flight is forgotten, and the log records each write's fate.
    fn power_cut_locked(&self, st: &mut State, seed: u64) -> Result<PowerCutReport, DiskError> {
        let pending = st.cache.drain_all();
        let (mode, choices) = power_cut::choose(seed, &pending);
        let report = PowerCutReport::of(seed, mode, &choices);
        let mut fates = Vec::with_capacity(pending.len());
        for (entry, choice) in pending.iter().zip(choices) {
            for &(off, len) in &choice.pieces {
                cache::write_piece(&*self.storage, entry, off, len)?;
            }
            if let Some(seq) = entry.log_seq {
                let torn = choice.fate == Fate::Torn;
                fates.push(WriteFate {
                    seq,
                    fate: choice.fate,
                    pieces: if torn { choice.pieces } else { Vec::new() },
                });
            }
        }
        self.storage.flush(None)?;
        st.cut.done();
        st.tickets.clear();
        st.stats.power_cuts += 1;
        let payload = encode_payload(&PowerCutPayload { seed, mode, fates });
        let log_seq = st
            .log
            .append(Record::event(RecordKind::PowerCut, 0, payload))?;
        st.log.sync()?;
        let PowerCutReport {
            pending,
            kept,
            torn,
            dropped,
            ..
        } = report;
        tracing::warn!(
            "power cut (seed {seed}, mode {mode:?}): {pending} pending writes, {kept} kept, \
             {torn} torn, {dropped} dropped"
        );
        Ok(PowerCutReport { log_seq, ..report })
    }

    /// Writes the whole cache back when nothing changed since the last call (the idle
    /// write-back's step), then flushes storage. A failure leaves the entries cached.
    pub fn write_back_if_idle(&self) -> stdio::Result<()> {
        let mut st = self.lock();
        if std::mem::take(&mut st.changed) || st.cache.len() == 0 {
            return Ok(());
        }
        st.cache.write_back_all(&*self.storage)?;
        self.storage.flush(None)
    }

    /// Starts a thread that writes the cache back after [`DiskConfig::idle_writeback_ms`]
    /// without a change; it ends with the disk.
    pub fn start_idle_writeback(self: &Arc<Self>) {
        let Some(idle_ms) = self.config.idle_writeback_ms else {
            return;
        };
        let disk = Arc::downgrade(self);
        let poll = std::time::Duration::from_millis(IDLE_WRITEBACK_POLL_MILLIS.min(idle_ms.max(1)));
        let spawned = std::thread::Builder::new()
            .name("idle-writeback".into())
            .spawn(move || {
                let mut idle_since = std::time::Instant::now();
                loop {
                    std::thread::sleep(poll);
                    let Some(d) = disk.upgrade() else { return };
                    if d.lock().changed {
                        d.lock().changed = false;
                        idle_since = std::time::Instant::now();
                        continue;
                    }
                    if idle_since.elapsed().as_millis() as u64 >= idle_ms {
                        // Failures are logged by the cache (once per entry) and retried.
                        let _ = d.write_back_if_idle();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(export = %self.name, "no idle write-back: {e}");
        }
    }

    /// Byte ranges of the writes still in the cache: after a failed flush, what is not in
    /// storage.
    pub fn unwritten(&self) -> Vec<(u64, u64)> {
        self.lock().cache.ranges()
    }

    /// Writes back everything and flushes storage (at shutdown); on failure, says which
    /// ranges could not be written.
    pub fn write_back_everything(&self) -> Result<(), DiskError> {
        let mut st = self.lock();
        let r = st
            .cache
            .write_back_all(&*self.storage)
            .and_then(|()| self.storage.flush(None));
        match r {
            Ok(()) => Ok(()),
            Err(e) if st.cache.len() == 0 => Err(DiskError::Storage(e)),
            Err(_) => Err(DiskError::Unwritten(st.cache.ranges())),
        }
    }
}
