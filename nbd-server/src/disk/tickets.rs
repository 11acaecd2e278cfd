//! Requests in flight and the durability rule's bookkeeping: the ticket each request got at
//! arrival, the flush generation (which answered writes a flush covers), and the writes
//! applied but not yet answered (a flush record lists them as in flight across it).

use std::collections::{BTreeSet, HashMap};

use super::Refusal;
use crate::backend::{ConnId, Ticket};

/// What the disk knows of one request between its arrival and its reply.
pub struct TicketInfo {
    pub conn: ConnId,
    /// An injected EIO awaits the request.
    pub eio: bool,
    /// Microseconds of injected latency before the request runs.
    pub latency_us: u32,
    /// Power-cut generation at arrival: a request that outlived a cut does nothing.
    pub cut_gen: u64,
    /// For flushes: writes answered in an earlier generation are covered.
    pub cover_gen: u64,
    /// For flushes: why the log does not hold the flush's record. Such a flush is answered
    /// with that error, never OK: crash states are built from the log, and a flush missing
    /// from it would leave the writes it made durable free to be lost.
    pub unrecorded: Option<Refusal>,
    /// For writes: the cache entry once applied.
    pub applied: Option<u64>,
    /// For writes: the sequence number of their log record, once applied (when recording).
    pub log_seq: Option<u64>,
}

/// Every request between arrival and reply, and the flush generation.
pub struct Tickets {
    next: u64,
    infos: HashMap<u64, TicketInfo>,
    /// Log sequence numbers of writes applied and not yet answered.
    unanswered: BTreeSet<u64>,
    /// Bumped by every FLUSH at its arrival; a write answered later carries the new value.
    flush_gen: u64,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets {
            next: 1,
            infos: HashMap::new(),
            unanswered: BTreeSet::new(),
            flush_gen: 0,
        }
    }
}

impl Tickets {
    /// Hands out the ticket of a request that arrived.
    pub fn issue(&mut self, info: TicketInfo) -> Ticket {
        let id = self.next;
        self.next += 1;
        self.infos.insert(id, info);
        Ticket(id)
    }

    pub fn get(&self, ticket: Option<Ticket>) -> Option<&TicketInfo> {
        self.infos.get(&ticket?.0)
    }

    /// A FLUSH arrived: it covers the writes answered before now, and later answers get a
    /// new generation. Returns the generation it covers and the log sequence numbers of the
    /// writes in flight across it (applied, not answered).
    pub fn flush_arrived(&mut self) -> (u64, Vec<u64>) {
        self.flush_gen += 1;
        (self.flush_gen, self.unanswered.iter().copied().collect())
    }

    /// The generation a flush with `ticket` covers: the one it got at arrival, or everything
    /// answered so far for a flush driven without arrival.
    pub fn cover_gen(&self, ticket: Option<Ticket>) -> u64 {
        self.get(ticket).map_or(self.flush_gen + 1, |t| t.cover_gen)
    }

    /// The flush generation a write answered now belongs to.
    pub fn flush_gen(&self) -> u64 {
        self.flush_gen
    }

    /// The write of `ticket` was applied as cache entry `id`, recorded as `log_seq`.
    pub fn applied(&mut self, ticket: Ticket, id: u64, log_seq: Option<u64>) {
        if let Some(t) = self.infos.get_mut(&ticket.0) {
            t.applied = Some(id);
            t.log_seq = log_seq;
        }
        if let Some(seq) = log_seq {
            self.unanswered.insert(seq);
        }
    }

    /// The reply of `ticket` was sent: its cache entry, if it applied a write, and the flush
    /// generation the write is answered in.
    pub fn answered(&mut self, ticket: Ticket) -> Option<(u64, u64)> {
        let t = self.infos.remove(&ticket.0)?;
        let id = t.applied?;
        if let Some(seq) = t.log_seq {
            self.unanswered.remove(&seq);
        }
        Some((id, self.flush_gen))
    }

    /// The reply of `ticket` will never be sent: the write stays applied but unanswered, so
    /// no later flush covers it.
    pub fn abandoned(&mut self, ticket: Ticket) {
        if let Some(t) = self.infos.remove(&ticket.0) {
            if let Some(seq) = t.log_seq {
                self.unanswered.remove(&seq);
            }
        }
    }

    /// A power cut: every request in flight is forgotten (it fails if it runs).
    pub fn clear(&mut self) {
        self.infos.clear();
        self.unanswered.clear();
    }
}
