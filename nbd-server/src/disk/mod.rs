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

mod cache;
mod faults;
mod mem;
mod recorder;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::watch;

use crate::backend::{
    block_from, Arrival, Backend, Block, ConnId, IoStyle, Piece, RequestKind, StatusExtent, Ticket,
    BLOCK_BYTES,
};
use crate::log::{
    encode_payload, CutMode, Fate, FaultKind, FaultPayload, FlushPayload, FullPayload, FullReason,
    LogError, PowerCutPayload, RecordKind, WriteFate, FLAG_FUA, FULL_PAYLOAD_BYTES,
    MARK_NAME_BYTES_MAX, RECORD_HEADER_BYTES, SECTOR_BYTES,
};
use cache::{Cache, EntryData};
pub use faults::FaultConfig;
pub use mem::VecStorage;
pub use recorder::{Pusher, Recorder, RECORDER_QUEUE_BYTES_MAX, RECORDER_QUEUE_RECORDS_MAX};

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
    Storage(#[from] io::Error),
    #[error("mark name must be 1..={MARK_NAME_BYTES_MAX} bytes with no control characters")]
    BadMarkName,
    #[error("the write log failed earlier ({0}); the disk refuses further changes")]
    Failed(String),
    #[error("{}", ranges_message(.0))]
    Unwritten(Vec<(u64, u64)>),
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

/// Why the disk refuses changes for good: its write log failed.
#[derive(Debug, Clone)]
struct Failure {
    /// The answer to give: ENOSPC when the log's disk is full, else EIO.
    errno: i32,
}

impl Failure {
    fn of(e: &LogError) -> Self {
        Failure {
            errno: if matches!(e, LogError::LogDiskFull) {
                libc::ENOSPC
            } else {
                libc::EIO
            },
        }
    }

    fn error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

/// Counters shown by `nbd-server ctl stats`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiskStats {
    pub writes: u64,
    pub write_bytes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub flushes: u64,
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

/// What a power cut did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PowerCutReport {
    pub seed: u64,
    pub mode: CutMode,
    pub pending: usize,
    pub kept: usize,
    pub torn: usize,
    pub dropped: usize,
    /// Sequence number of the power-cut record, when recording.
    pub log_seq: Option<u64>,
}

struct TicketInfo {
    conn: ConnId,
    kind: RequestKind,
    fua: bool,
    eio: bool,
    latency_us: u32,
    /// Power-cut generation at arrival: a request that outlived a cut does nothing.
    cut_gen: u64,
    /// For flushes: writes answered in an earlier generation are covered.
    cover_gen: u64,
    /// For writes: the cache id once applied.
    applied: Option<u64>,
    log_seq: Option<u64>,
}

struct State {
    next_ticket: u64,
    tickets: HashMap<u64, TicketInfo>,
    cache: Cache,
    /// Log sequence numbers of writes applied and not yet answered.
    unanswered: BTreeSet<u64>,
    flush_gen: u64,
    cut_gen: u64,
    log: Option<Recorder>,
    failed: Option<Failure>,
    /// [`DiskConfig::record_max_bytes`].
    record_max: Option<u64>,
    /// The log reached `record_max` (a full record was appended).
    capped: bool,
    /// Changes applied since the idle write-back last looked.
    changed: bool,
    fault_rng: ChaCha8Rng,
    cuts_done: u64,
    writes_applied: u64,
    crash_after_writes: Option<u64>,
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
}

fn eio(what: &str) -> io::Error {
    io::Error::other(what.to_string())
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
        let log = match &config.record {
            Some(path) => Some(Recorder::create(
                path,
                storage.size(),
                config.record_overwrite,
            )?),
            None => None,
        };
        let crash_after_writes = config.crash_after_writes.or_else(|| {
            config.crash_seed.map(|s| {
                ChaCha8Rng::seed_from_u64(s).random_range(1..=CRASH_AFTER_WRITES_RANDOM_MAX)
            })
        });
        if let Some(n) = crash_after_writes {
            tracing::info!("emulated disk: power cut after {n} writes");
        }
        let cache_limit = if config.cache_bytes_max == 0 {
            CACHE_BYTES_MAX
        } else {
            config.cache_bytes_max
        };
        let recording = log.is_some();
        let (cut_tx, _) = watch::channel(0);
        let cache = Cache::new(cache_limit, CACHE_ENTRIES_MAX, name);
        let spares = cache.spares();
        Ok(EmulatedDisk {
            spares,
            state: Mutex::new(State {
                next_ticket: 1,
                tickets: HashMap::new(),
                cache,
                unanswered: BTreeSet::new(),
                flush_gen: 0,
                cut_gen: 0,
                log,
                failed: None,
                record_max: config.record_max_bytes,
                capped: false,
                changed: false,
                fault_rng: ChaCha8Rng::seed_from_u64(config.faults.seed),
                cuts_done: 0,
                writes_applied: 0,
                crash_after_writes,
                stats: DiskStats {
                    recording,
                    ..DiskStats::default()
                },
            }),
            storage,
            config,
            cut_tx,
            reads: Default::default(),
            name: name.to_owned(),
        })
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
        s.log_records = st.log.as_ref().map_or(0, |l| l.next_seq());
        s
    }

    /// Appends a record if recording; a log failure fails the disk for good.
    fn record(
        st: &mut State,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> io::Result<Option<u64>> {
        Self::record_inner(
            st,
            kind,
            flags,
            conn,
            offset,
            length,
            LogPayload::Copy(payload),
        )
    }

    /// [`Self::record`], with a write's data shared with the cache instead of copied.
    fn record_inner(
        st: &mut State,
        kind: RecordKind,
        flags: u8,
        conn: u64,
        offset: u64,
        length: u64,
        payload: LogPayload<'_>,
    ) -> io::Result<Option<u64>> {
        if let Some(f) = &st.failed {
            return Err(f.error());
        }
        if st.log.is_none() {
            return Ok(None);
        }
        if let Some(cap) = st.record_max {
            let bytes = match &payload {
                LogPayload::Copy(b) => b.len() as u64,
                LogPayload::Shared(d) => d.len() as u64,
                LogPayload::Blocks(b) => (b.len() * BLOCK_BYTES) as u64,
            };
            Self::within_cap(st, kind, bytes, cap)?;
        }
        let Some(log) = st.log.as_mut() else {
            return Ok(None);
        };
        let appended = match payload {
            LogPayload::Copy(bytes) => log.append(kind, flags, conn, offset, length, bytes),
            LogPayload::Shared(data) => log.append_shared(kind, flags, conn, offset, data),
            LogPayload::Blocks(blocks) => log.append_blocks(flags, conn, offset, blocks),
        };
        match appended {
            Ok(seq) => Ok(Some(seq)),
            Err(e) => {
                tracing::error!("write log failed: {e}; refusing further changes");
                let f = Failure::of(&e);
                let err = f.error();
                st.failed = Some(f);
                Err(err)
            }
        }
    }

    /// Refuses a record that would take the log past its cap (data records at the cap; the
    /// others [`RECORD_MAX_SLACK_BYTES`] later), appending the full record the first time a
    /// data record is refused.
    fn within_cap(st: &mut State, kind: RecordKind, payload: u64, cap: u64) -> io::Result<()> {
        let log = st.log.as_mut().expect("caller checked");
        let full_record = (RECORD_HEADER_BYTES + FULL_PAYLOAD_BYTES) as u64;
        let after = log.bytes() + RECORD_HEADER_BYTES as u64 + payload;
        let limit = if kind.is_data() {
            cap.saturating_sub(full_record)
        } else {
            cap.saturating_add(RECORD_MAX_SLACK_BYTES)
        };
        if after <= limit {
            return Ok(());
        }
        if kind.is_data() && !st.capped {
            st.capped = true;
            tracing::error!(
                "write log reached its cap (record-max={cap} bytes): writes, trims and zero \
                 writes are refused with ENOSPC from now on"
            );
            let full = encode_payload(&FullPayload {
                reason: FullReason::Cap,
                log_bytes: log.bytes(),
            });
            if let Err(e) = log.append(RecordKind::Full, 0, 0, 0, 0, &full) {
                let f = Failure::of(&e);
                st.failed = Some(f);
            }
        }
        Err(io::Error::from_raw_os_error(libc::ENOSPC))
    }

    /// Puts a named mark into the log, in order with the IO around it.
    pub fn mark(&self, name: &str) -> Result<Option<u64>, DiskError> {
        if name.is_empty() || name.len() > MARK_NAME_BYTES_MAX || name.chars().any(char::is_control)
        {
            return Err(DiskError::BadMarkName);
        }
        let mut st = self.lock();
        let seq = Self::record(&mut st, RecordKind::Mark, 0, 0, 0, 0, name.as_bytes())
            .map_err(|e| DiskError::Failed(e.to_string()))?;
        st.stats.marks += 1;
        Ok(seq)
    }

    /// Pushes buffered log records to the file (and to stable storage).
    pub fn sync_log(&self) -> Result<(), DiskError> {
        let mut st = self.lock();
        if let Some(log) = st.log.as_mut() {
            log.sync()?;
        }
        Ok(())
    }

    /// Cuts the power: see the module docs. `seed` defaults to one derived from the crash seed
    /// and the number of earlier cuts.
    pub fn power_cut(&self, seed: Option<u64>) -> Result<PowerCutReport, DiskError> {
        let report = {
            let mut st = self.lock();
            self.power_cut_locked(&mut st, seed)?
        };
        self.cut_tx.send_modify(|g| *g += 1);
        Ok(report)
    }

    fn power_cut_locked(
        &self,
        st: &mut State,
        seed: Option<u64>,
    ) -> Result<PowerCutReport, DiskError> {
        let seed = seed.unwrap_or_else(|| {
            self.config
                .crash_seed
                .unwrap_or(0)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(st.cuts_done)
        });
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mode = match rng.random_range(0..3u8) {
            0 => CutMode::None,
            1 => CutMode::Some,
            _ => CutMode::Torn,
        };
        let pending = st.cache.drain_all();
        let mut fates = Vec::with_capacity(pending.len());
        let (mut kept, mut torn, mut dropped) = (0, 0, 0);
        for entry in &pending {
            let keep = match mode {
                CutMode::None => false,
                CutMode::Some | CutMode::Torn => rng.random_bool(0.5),
            };
            let sectors = sector_pieces(entry.offset, entry.length);
            let (fate, pieces) = if !keep {
                dropped += 1;
                (Fate::Dropped, Vec::new())
            } else if mode == CutMode::Torn && sectors.len() > 1 && rng.random_bool(0.5) {
                // A non-empty, proper subset of the sectors lands.
                let mut chosen: Vec<bool> = sectors.iter().map(|_| rng.random_bool(0.5)).collect();
                if chosen.iter().all(|&c| c) {
                    let i = rng.random_range(0..chosen.len());
                    chosen[i] = false;
                }
                if chosen.iter().all(|&c| !c) {
                    let i = rng.random_range(0..chosen.len());
                    chosen[i] = true;
                }
                let pieces = merge_pieces(
                    sectors
                        .iter()
                        .zip(&chosen)
                        .filter(|(_, &c)| c)
                        .map(|(&p, _)| p),
                );
                torn += 1;
                (Fate::Torn, pieces)
            } else {
                kept += 1;
                (Fate::Kept, vec![(entry.offset, entry.length)])
            };
            for &(off, len) in &pieces {
                cache::apply_to_storage(&*self.storage, entry, off, len, false)?;
            }
            if let Some(seq) = entry.log_seq {
                fates.push(WriteFate {
                    seq,
                    fate,
                    pieces: if fate == Fate::Torn {
                        pieces
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        self.storage.flush(Ticket(0))?;
        st.cut_gen += 1;
        st.cuts_done += 1;
        st.tickets.clear();
        st.unanswered.clear();
        st.stats.power_cuts += 1;
        let payload = encode_payload(&PowerCutPayload { seed, mode, fates });
        let log_seq = Self::record(st, RecordKind::PowerCut, 0, 0, 0, 0, &payload)
            .map_err(|e| DiskError::Failed(e.to_string()))?;
        if let Some(log) = st.log.as_mut() {
            log.sync()?;
        }
        tracing::warn!(
            "power cut (seed {seed}, mode {mode:?}): {} pending writes, {kept} kept, {torn} torn, {dropped} dropped",
            pending.len()
        );
        Ok(PowerCutReport {
            seed,
            mode,
            pending: pending.len(),
            kept,
            torn,
            dropped,
            log_seq,
        })
    }

    fn ticket_info(st: &mut State, ticket: Ticket) -> Option<&mut TicketInfo> {
        st.tickets.get_mut(&ticket.0)
    }

    /// Checks a ticket before IO: stale after a power cut, or carrying an injected EIO.
    fn pre_io(&self, ticket: Ticket) -> io::Result<()> {
        if ticket.0 == 0 {
            return Ok(());
        }
        let (latency, result) = Self::ticket_check(&mut self.lock(), ticket);
        if latency > 0 {
            std::thread::sleep(std::time::Duration::from_micros(latency as u64));
        }
        result
    }

    /// The checks of [`Self::pre_io`] under a lock already held: (added latency, outcome).
    fn ticket_check(st: &mut State, ticket: Ticket) -> (u32, io::Result<()>) {
        let cut_gen = st.cut_gen;
        match Self::ticket_info(st, ticket) {
            None => (0, Err(eio("request outlived a power cut"))),
            Some(t) if t.cut_gen != cut_gen => (0, Err(eio("request outlived a power cut"))),
            Some(t) if t.eio => (t.latency_us, Err(eio("injected EIO"))),
            Some(t) => (t.latency_us, Ok(())),
        }
    }

    /// [`Self::pre_io`] and then the lock, taken once when there is no latency to add.
    fn pre_io_locked(&self, ticket: Ticket) -> io::Result<MutexGuard<'_, State>> {
        let mut st = self.lock();
        if ticket.0 == 0 {
            return Ok(st);
        }
        let (latency, result) = Self::ticket_check(&mut st, ticket);
        if latency == 0 {
            result?;
            return Ok(st);
        }
        drop(st);
        std::thread::sleep(std::time::Duration::from_micros(latency as u64));
        result?;
        Ok(self.lock())
    }

    /// Applies a data change to the cache (and log), then writes through for FUA and
    /// enforces the automatic power cut. A full cache first writes back its oldest entries;
    /// if that fails, the change is refused with the error and nothing is applied, so the
    /// cache neither drops acknowledged data nor grows past its limit.
    fn apply(
        &self,
        ticket: Ticket,
        offset: u64,
        length: u64,
        data: EntryData,
        fua: bool,
    ) -> io::Result<()> {
        let mut st = self.pre_io_locked(ticket)?;
        if let Some(f) = &st.failed {
            return Err(f.error());
        }
        let early = st.cache.make_room(&*self.storage, data.cost())?;
        st.stats.early_writebacks += early;
        let conn = st.tickets.get(&ticket.0).map_or(0, |t| t.conn);
        let (kind, payload) = match &data {
            EntryData::Bytes(b) => (RecordKind::Write, LogPayload::Shared(b.clone())),
            EntryData::Blocks(b) => (RecordKind::Write, LogPayload::Blocks(b.clone())),
            EntryData::Zeroes { trim: true } => (RecordKind::Trim, LogPayload::Copy(&[])),
            EntryData::Zeroes { trim: false } => (RecordKind::WriteZeroes, LogPayload::Copy(&[])),
        };
        let flags = if fua { FLAG_FUA } else { 0 };
        let log_seq = Self::record_inner(&mut st, kind, flags, conn, offset, length, payload)?;
        let answered_gen = (ticket.0 == 0).then_some(st.flush_gen);
        let id = st.cache.insert(offset, length, data, log_seq, answered_gen);
        st.changed = true;
        if let Some(t) = st.tickets.get_mut(&ticket.0) {
            t.applied = Some(id);
            t.log_seq = log_seq;
        }
        if let (Some(seq), true) = (log_seq, ticket.0 != 0) {
            st.unanswered.insert(seq);
        }
        match kind {
            RecordKind::Write => {
                st.stats.writes += 1;
                st.stats.write_bytes += length;
            }
            RecordKind::Trim => st.stats.trims += 1,
            _ => st.stats.write_zeroes += 1,
        }
        let pushed = if fua {
            st.stats.fua_writes += 1;
            st.cache.write_back_through(&*self.storage, id, true)?;
            Self::log_pusher(&st)
        } else {
            None
        };
        st.writes_applied += 1;
        if st.crash_after_writes == Some(st.writes_applied) {
            st.crash_after_writes = None;
            let seed = self.config.crash_seed;
            self.power_cut_locked(&mut st, seed)
                .map_err(io::Error::other)?;
            drop(st);
            self.cut_tx.send_modify(|g| *g += 1);
            return Err(eio("power cut"));
        }
        drop(st);
        self.wait_log(pushed)
    }

    /// The pusher of the write log (if any), taken under the lock for a FLUSH or FUA reply:
    /// push with [`Self::wait_log`] after releasing it.
    fn log_pusher(st: &State) -> Option<Pusher> {
        st.log.as_ref().map(Recorder::pusher)
    }

    /// Puts every record so far in the log's file (see [`Pusher::push`]). A failed push fails
    /// the reply (and, through the recorder, every later change).
    fn wait_log(&self, pushed: Option<Pusher>) -> io::Result<()> {
        match pushed.map(|p| p.push(self.config.record_sync)) {
            Some(Err(e)) => {
                tracing::error!("write log failed: {e}");
                Err(Failure::of(&e).error())
            }
            _ => Ok(()),
        }
    }

    /// Writes the whole cache back when nothing changed since the last call (the idle
    /// write-back's step), then flushes storage. A failure leaves the entries cached.
    pub fn write_back_if_idle(&self) -> io::Result<()> {
        let mut st = self.lock();
        if std::mem::take(&mut st.changed) || st.cache.len() == 0 {
            return Ok(());
        }
        st.cache.write_back_all(&*self.storage)?;
        self.storage.flush(Ticket(0))
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
            .and_then(|()| self.storage.flush(Ticket(0)));
        match r {
            Ok(()) => Ok(()),
            Err(e) if st.cache.len() == 0 => Err(DiskError::Storage(e)),
            Err(_) => Err(DiskError::Unwritten(st.cache.ranges())),
        }
    }
}

/// What a log record carries: bytes to copy, or the cache entry's data, shared.
enum LogPayload<'a> {
    Copy(&'a [u8]),
    Shared(Arc<Vec<u8>>),
    Blocks(Arc<Vec<Block>>),
}

/// Splits `[offset, offset+length)` at absolute 512-byte sector boundaries.
pub fn sector_pieces(offset: u64, length: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let end = offset + length;
    let mut at = offset;
    while at < end {
        let next = ((at / SECTOR_BYTES) + 1) * SECTOR_BYTES;
        let stop = next.min(end);
        out.push((at, stop - at));
        at = stop;
    }
    out
}

/// Joins adjacent ranges.
pub fn merge_pieces(pieces: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (off, len) in pieces {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

impl Backend for EmulatedDisk {
    fn size(&self) -> u64 {
        self.storage.size()
    }

    fn can_trim(&self) -> bool {
        self.storage.can_trim()
    }

    /// Zeroing only adds a cache entry, so it is always fast.
    fn can_fast_zero(&self) -> bool {
        true
    }

    fn io_style(&self) -> IoStyle {
        // Added latency sleeps in the IO method: keep it off the async workers.
        if self.config.faults.latency_us > 0 && self.config.faults.latency_rate > 0.0 {
            IoStyle::Blocking
        } else {
            self.storage.io_style()
        }
    }

    /// The client never learns the outcome: the write stays applied but unanswered, so no
    /// later flush covers it (it is written back only in order behind covered writes).
    fn reply_abandoned(&self, ticket: Ticket) {
        if ticket.0 == 0 {
            return;
        }
        let mut st = self.lock();
        if let Some(t) = st.tickets.remove(&ticket.0) {
            if let Some(seq) = t.log_seq {
                st.unanswered.remove(&seq);
            }
        }
    }

    fn arrived(&self, a: &Arrival) -> Ticket {
        let f = &self.config.faults;
        let tracked = matches!(
            a.kind,
            RequestKind::Write | RequestKind::Flush | RequestKind::Trim | RequestKind::WriteZeroes
        );
        if a.kind == RequestKind::Read {
            // Counted without the lock: reads need no ordering with anything.
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if !tracked && !f.active() {
            return Ticket(0);
        }
        let mut st = self.lock();
        let rate = match a.kind {
            RequestKind::Read => f.eio_read,
            RequestKind::Write | RequestKind::Trim | RequestKind::WriteZeroes => f.eio_write,
            RequestKind::Flush => f.eio_flush,
            _ => 0.0,
        };
        let eio = rate > 0.0 && st.fault_rng.random_bool(rate.min(1.0));
        let latency_us = if f.latency_us > 0
            && f.latency_rate > 0.0
            && st.fault_rng.random_bool(f.latency_rate.min(1.0))
        {
            f.latency_us
        } else {
            0
        };
        let request_code = match a.kind {
            RequestKind::Read => 0,
            RequestKind::Write => RecordKind::Write as u8,
            RequestKind::Trim => RecordKind::Trim as u8,
            RequestKind::WriteZeroes => RecordKind::WriteZeroes as u8,
            RequestKind::Flush => RecordKind::Flush as u8,
            RequestKind::Cache => 8,
            RequestKind::BlockStatus => 9,
        };
        for (hit, fault) in [(eio, FaultKind::Eio), (latency_us > 0, FaultKind::Latency)] {
            if hit {
                st.stats.faults += 1;
                let payload = encode_payload(&FaultPayload {
                    fault: fault as u8,
                    request: request_code,
                    latency_us,
                });
                // A log failure is reported by the IO that follows.
                let _ = Self::record(
                    &mut st,
                    RecordKind::Fault,
                    0,
                    a.conn,
                    a.offset,
                    a.length,
                    &payload,
                );
            }
        }
        let mut cover_gen = 0;
        if a.kind == RequestKind::Flush && !eio {
            // The flush covers what was answered before now; later answers get the new stamp.
            st.flush_gen += 1;
            cover_gen = st.flush_gen;
            st.stats.flushes += 1;
            let payload = encode_payload(&FlushPayload {
                in_flight: st.unanswered.iter().copied().collect(),
            });
            let _ = Self::record(&mut st, RecordKind::Flush, 0, a.conn, 0, 0, &payload);
        }
        let id = st.next_ticket;
        st.next_ticket += 1;
        let cut_gen = st.cut_gen;
        st.tickets.insert(
            id,
            TicketInfo {
                conn: a.conn,
                kind: a.kind,
                fua: a.fua,
                eio,
                latency_us,
                cut_gen,
                cover_gen,
                applied: None,
                log_seq: None,
            },
        );
        Ticket(id)
    }

    fn reply_sent(&self, ticket: Ticket) {
        if ticket.0 == 0 {
            return;
        }
        let mut st = self.lock();
        let Some(t) = st.tickets.remove(&ticket.0) else {
            return;
        };
        if let Some(id) = t.applied {
            let gen = st.flush_gen;
            st.cache.answered(id, gen);
            if let Some(seq) = t.log_seq {
                st.unanswered.remove(&seq);
            }
        }
        let _ = (t.kind, t.fua);
    }

    fn read(&self, ticket: Ticket, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let st = self.pre_io_locked(ticket)?;
        if !st.cache.overlaps(offset, buf.len() as u64) {
            // No pending write touches the range (an older write superseded by a newer one
            // still has the newer one's extent here, and write-back goes in apply order), and
            // write-backs and power cuts run under the lock, so storage already holds every
            // applied write here. Whatever is written back after the lock is released belongs
            // to a write applied after this check: concurrent with this read, so either
            // content is correct. Storage does its own locking; the disk lock is not held
            // across the copy.
            drop(st);
            return self.storage.read(Ticket(0), offset, buf);
        }
        // Under the lock, so a concurrent write-back cannot slip between the two steps.
        self.storage.read(Ticket(0), offset, buf)?;
        st.cache.overlay(offset, buf);
        Ok(())
    }

    fn lends_memory(&self) -> bool {
        self.storage.lends_memory()
    }

    /// Lends the storage's memory where no cached write covers the range (the reasoning of
    /// [`Self::read`] holds: storage has every applied write there); else reads a copy with
    /// the cached writes laid over it.
    fn read_pieces(
        &self,
        ticket: Ticket,
        offset: u64,
        length: usize,
        f: &mut dyn FnMut(&[Piece<'_>]),
    ) -> io::Result<()> {
        let st = self.pre_io_locked(ticket)?;
        if !st.cache.overlaps(offset, length as u64) {
            drop(st);
            return self.storage.read_pieces(Ticket(0), offset, length, f);
        }
        let mut buf = vec![0u8; length];
        self.storage.read(Ticket(0), offset, &mut buf)?;
        st.cache.overlay(offset, &mut buf);
        drop(st);
        f(&[Piece::Data(&buf)]);
        Ok(())
    }

    fn write(&self, ticket: Ticket, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.apply(
            ticket,
            offset,
            data.len() as u64,
            EntryData::Bytes(Arc::new(data.to_vec())),
            fua,
        )
    }

    fn payload_buffer(&self, n: usize) -> Vec<u8> {
        let spare = {
            let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
            spares.pop()
        };
        match spare {
            Some(v) if v.capacity() >= n => v,
            _ => Vec::with_capacity(n),
        }
    }

    /// The payload becomes the cache entry and the log record's payload without a copy. Over
    /// storage that adopts blocks, an aligned payload is cached as blocks instead, copied now
    /// while the bytes are still in the CPU cache, so that writing it back later moves the
    /// blocks rather than reading the payload again from memory (it has long left the CPU
    /// cache by then: the disk cache is larger). The server itself receives aligned writes
    /// straight into blocks (see [`Backend::write_blocks`]); this path serves other callers.
    fn write_owned(&self, ticket: Ticket, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        let length = data.len() as u64;
        if self.takes_blocks(offset, length) {
            let blocks = data.chunks_exact(BLOCK_BYTES).map(block_from).collect();
            cache::recycle(&self.spares, data);
            return self.write_blocks(ticket, offset, blocks, fua);
        }
        self.apply(
            ticket,
            offset,
            length,
            EntryData::Bytes(Arc::new(data)),
            fua,
        )
    }

    fn takes_blocks(&self, offset: u64, length: u64) -> bool {
        let block = BLOCK_BYTES as u64;
        self.storage.adopts_blocks()
            && length > 0
            && offset.is_multiple_of(block)
            && length.is_multiple_of(block)
    }

    fn block_buffers(&self, n: usize) -> Vec<Block> {
        self.storage.block_buffers(n)
    }

    /// The blocks become the cache entry and the log record's payload, without a copy.
    fn write_blocks(
        &self,
        ticket: Ticket,
        offset: u64,
        blocks: Vec<Block>,
        fua: bool,
    ) -> io::Result<()> {
        let length = (blocks.len() * BLOCK_BYTES) as u64;
        if !self.takes_blocks(offset, length) {
            let data: Vec<u8> = blocks.iter().flat_map(|b| b.iter().copied()).collect();
            return self.write_owned(ticket, offset, data, fua);
        }
        self.apply(
            ticket,
            offset,
            length,
            EntryData::Blocks(Arc::new(blocks)),
            fua,
        )
    }

    fn write_zeroes(
        &self,
        ticket: Ticket,
        offset: u64,
        length: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        // A cached zero range is fast whatever `fast_only` says; `may_trim` is left to storage
        // at write-back (it zeroes either way).
        let _ = (may_trim, fast_only);
        self.apply(
            ticket,
            offset,
            length,
            EntryData::Zeroes { trim: false },
            fua,
        )
    }

    fn trim(&self, ticket: Ticket, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.apply(
            ticket,
            offset,
            length,
            EntryData::Zeroes { trim: true },
            fua,
        )
    }

    /// Writes back what the flush covers, flushes storage, and waits until the write log
    /// holds every record so far (so a killed server cannot lose a write this flush made
    /// durable from the log). A write-back that fails leaves its entry cached and fails
    /// the flush; the next flush retries it.
    fn flush(&self, ticket: Ticket) -> io::Result<()> {
        self.pre_io(ticket)?;
        let mut st = self.lock();
        let cover_gen = match st.tickets.get(&ticket.0) {
            Some(t) => t.cover_gen,
            None => st.flush_gen + 1, // driven without arrival: cover everything answered
        };
        st.cache.write_back_covered(&*self.storage, cover_gen)?;
        self.storage.flush(Ticket(0))?;
        let pushed = Self::log_pusher(&st);
        drop(st);
        self.wait_log(pushed)
    }

    fn block_status(
        &self,
        ticket: Ticket,
        offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>> {
        self.pre_io(ticket)?;
        let st = self.lock();
        if let Some((first, end, zeroes)) = st.cache.first_overlap(offset, length) {
            // Cached content is not in storage yet: report it from the cache.
            if first <= offset {
                return Ok(vec![StatusExtent {
                    length: end.min(offset + length) - offset,
                    hole: zeroes == Some(true),
                    zero: zeroes.is_some(),
                }]);
            }
            let mut ext = self
                .storage
                .block_status(Ticket(0), offset, first - offset)?;
            ext.truncate(1);
            return Ok(ext);
        }
        self.storage.block_status(Ticket(0), offset, length)
    }
}
