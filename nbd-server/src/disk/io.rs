//! The emulated disk as the server sees it: the [`Backend`] methods. Requests check their
//! ticket first (a power cut or an injected fault fails them), then reads overlay the cache
//! on storage, and changes go into the cache (and the log) through [`EmulatedDisk::apply`].

use std::io;
use std::sync::MutexGuard;

use super::cache::EntryData;
use super::recorder::Record;
use super::recording::wait_log;
use super::tickets::TicketInfo;
use super::{faults, EmulatedDisk, Refusal, State};
use crate::backend::{
    Arrival, Backend, IoStyle, Piece, RequestKind, StatusExtent, Ticket, WriteData, WriteFailed,
};
use crate::log::{encode_payload, FlushPayload, RecordHead, RecordKind, FLAG_FUA};

impl EmulatedDisk {
    /// Checks a ticket before IO: stale after a power cut, or carrying an injected EIO.
    fn pre_io(&self, ticket: Option<Ticket>) -> Result<(), Refusal> {
        let Some(ticket) = ticket else {
            return Ok(());
        };
        let (latency, result) = Self::ticket_check(&self.lock(), ticket);
        if latency > 0 {
            std::thread::sleep(std::time::Duration::from_micros(latency as u64));
        }
        result
    }

    /// The checks of [`Self::pre_io`] under a lock already held: (added latency, outcome).
    fn ticket_check(st: &State, ticket: Ticket) -> (u32, Result<(), Refusal>) {
        match st.tickets.get(Some(ticket)) {
            None => (0, Err(Refusal::OutlivedPowerCut)),
            Some(t) if t.cut_gen != st.cut.gen() => (0, Err(Refusal::OutlivedPowerCut)),
            Some(t) if t.eio => (t.latency_us, Err(Refusal::InjectedEio)),
            Some(t) => (t.latency_us, Ok(())),
        }
    }

    /// [`Self::pre_io`] and then the lock, taken once when there is no latency to add.
    fn pre_io_locked(&self, ticket: Option<Ticket>) -> Result<MutexGuard<'_, State>, Refusal> {
        let st = self.lock();
        let Some(ticket) = ticket else {
            return Ok(st);
        };
        let (latency, result) = Self::ticket_check(&st, ticket);
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
        ticket: Option<Ticket>,
        offset: u64,
        length: u64,
        data: EntryData,
        fua: bool,
    ) -> io::Result<()> {
        // A lying disk takes FUA as a plain write (and records it so).
        let fua = fua && !self.config.flush_ignore;
        let mut st = self.pre_io_locked(ticket)?;
        st.log.check()?;
        let early = st.cache.make_room(&*self.storage, data.cost())?;
        st.stats.early_writebacks += early;
        let kind = match &data {
            EntryData::Data(_) => RecordKind::Write,
            EntryData::Zeroes { trim: true } => RecordKind::Trim,
            EntryData::Zeroes { trim: false } => RecordKind::WriteZeroes,
        };
        let record = Record {
            head: RecordHead {
                kind,
                flags: if fua { FLAG_FUA } else { 0 },
                conn: st.tickets.get(ticket).map_or(0, |t| t.conn),
                offset,
                length,
            },
            payload: match &data {
                EntryData::Data(d) => d.clone(),
                EntryData::Zeroes { .. } => WriteData::empty(),
            },
        };
        let log_seq = st.log.append(record)?;
        // A write driven without arrival counts as answered at once.
        let answered_gen = ticket.is_none().then(|| st.tickets.flush_gen());
        let id = st.cache.insert(offset, length, data, log_seq, answered_gen);
        st.changed = true;
        if let Some(t) = ticket {
            st.tickets.applied(t, id, log_seq);
        }
        st.stats.count(kind, length, fua);
        let pushed = if fua {
            st.cache.write_back_through(&*self.storage, id, true)?;
            st.log.pusher()
        } else {
            None
        };
        if st.cut.write_applied() {
            let seed = st.cut.seed(st.cut.crash_seed());
            self.power_cut_locked(&mut st, seed)
                .map_err(io::Error::other)?;
            drop(st);
            *self.last_cut_seed.lock().unwrap_or_else(|p| p.into_inner()) = Some(seed);
            self.cut_tx.send_modify(|g| *g += 1);
            return Err(Refusal::PowerCut.into());
        }
        drop(st);
        Ok(wait_log(pushed, self.config.record_sync)?)
    }

    /// The ticket of a tracked request: faults drawn and recorded, and for a flush the
    /// generation it covers and the flush record.
    fn arrived_locked(&self, st: &mut State, a: &Arrival) -> Ticket {
        let injected = st.faults.decide(a.kind);
        for record in faults::fault_records(a, injected) {
            st.stats.faults += 1;
            // A log failure is reported by the IO that follows.
            let _ = st.log.append(record);
        }
        let (mut cover_gen, mut unrecorded) = (0, None);
        if a.kind == RequestKind::Flush && !injected.eio && !self.config.flush_ignore {
            let (gen, in_flight) = st.tickets.flush_arrived();
            cover_gen = gen;
            st.stats.flushes += 1;
            let payload = encode_payload(&FlushPayload { in_flight });
            // A refused record (failed log, or a capped one past its slack) fails the flush.
            unrecorded = st
                .log
                .append(Record::event(RecordKind::Flush, a.conn, payload))
                .err();
        }
        let cut_gen = st.cut.gen();
        st.tickets.issue(TicketInfo {
            conn: a.conn,
            eio: injected.eio,
            latency_us: injected.latency_us,
            cut_gen,
            cover_gen,
            unrecorded,
            applied: None,
            log_seq: None,
        })
    }
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
        self.lock().tickets.abandoned(ticket);
    }

    /// Changes and flushes get a ticket (so does everything while faults are injected);
    /// reads, the hot path, are only counted, without the lock.
    fn arrived(&self, a: &Arrival) -> Option<Ticket> {
        let tracked = matches!(
            a.kind,
            RequestKind::Write | RequestKind::Flush | RequestKind::Trim | RequestKind::WriteZeroes
        );
        if a.kind == RequestKind::Read {
            // Counted without the lock: reads need no ordering with anything.
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if !tracked && !self.config.faults.active() {
            return None;
        }
        Some(self.arrived_locked(&mut self.lock(), a))
    }

    fn reply_sent(&self, ticket: Ticket) {
        let mut st = self.lock();
        if let Some((id, gen)) = st.tickets.answered(ticket) {
            st.cache.answered(id, gen);
        }
    }

    fn read(&self, ticket: Option<Ticket>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
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
            return self.storage.read(None, offset, buf);
        }
        // Under the lock, so a concurrent write-back cannot slip between the two steps.
        self.storage.read(None, offset, buf)?;
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
        ticket: Option<Ticket>,
        offset: u64,
        length: usize,
        f: &mut dyn FnMut(&[Piece<'_>]),
    ) -> io::Result<()> {
        let st = self.pre_io_locked(ticket)?;
        if !st.cache.overlaps(offset, length as u64) {
            drop(st);
            return self.storage.read_pieces(None, offset, length, f);
        }
        let mut buf = vec![0u8; length];
        self.storage.read(None, offset, &mut buf)?;
        st.cache.overlay(offset, &mut buf);
        drop(st);
        f(&[Piece::Data(&buf)]);
        Ok(())
    }

    /// Storage's blocks where storage keeps blocks (the write then moves into storage at
    /// write-back); else a written-back payload buffer, for reuse (see [`super::cache::Spares`]).
    fn write_buffer(&self, offset: u64, length: usize) -> WriteData {
        let buf = self.storage.write_buffer(offset, length);
        if buf.is_blocks() {
            return buf;
        }
        let spare = {
            let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
            spares.pop()
        };
        match spare {
            Some(v) if v.capacity() >= length => WriteData::bytes(v),
            _ => WriteData::bytes(Vec::with_capacity(length)),
        }
    }

    /// The data becomes the cache entry and the log record's payload, without a copy. A
    /// refused write's data is dropped (the server has no use for it back).
    fn write(
        &self,
        ticket: Option<Ticket>,
        offset: u64,
        data: WriteData,
        fua: bool,
    ) -> Result<(), WriteFailed> {
        let length = data.len() as u64;
        self.apply(ticket, offset, length, EntryData::Data(data), fua)
            .map_err(|error| WriteFailed { error, data: None })
    }

    fn write_zeroes(
        &self,
        ticket: Option<Ticket>,
        offset: u64,
        length: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()> {
        // A cached zero range is fast whatever `fast_only` says; `may_trim` is left to storage
        // at write-back (it zeroes either way).
        let _ = (may_trim, fast_only);
        let zeroes = EntryData::Zeroes { trim: false };
        self.apply(ticket, offset, length, zeroes, fua)
    }

    fn trim(&self, ticket: Option<Ticket>, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        let zeroes = EntryData::Zeroes { trim: true };
        self.apply(ticket, offset, length, zeroes, fua)
    }

    /// Writes back what the flush covers, flushes storage, and waits until the write log
    /// holds every record so far (so a killed server cannot lose a write this flush made
    /// durable from the log). A write-back that fails leaves its entry cached and fails
    /// the flush; the next flush retries it. A flush whose record the log refused, or that
    /// runs after the log failed, is refused with the log's error and does nothing: the log
    /// cannot say what it made durable.
    fn flush(&self, ticket: Option<Ticket>) -> io::Result<()> {
        self.pre_io(ticket)?;
        let mut st = self.lock();
        if let Some(refusal) = st.tickets.get(ticket).and_then(|t| t.unrecorded) {
            return Err(refusal.into());
        }
        st.log.check()?;
        if self.config.flush_ignore {
            // The lie: answered, nothing made durable, nothing recorded.
            st.stats.ignored_flushes += 1;
            return Ok(());
        }
        let cover_gen = st.tickets.cover_gen(ticket);
        st.cache.write_back_covered(&*self.storage, cover_gen)?;
        self.storage.flush(None)?;
        let pushed = st.log.pusher();
        drop(st);
        Ok(wait_log(pushed, self.config.record_sync)?)
    }

    fn block_status(
        &self,
        ticket: Option<Ticket>,
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
            let mut ext = self.storage.block_status(None, offset, first - offset)?;
            ext.truncate(1);
            return Ok(ext);
        }
        self.storage.block_status(None, offset, length)
    }
}
