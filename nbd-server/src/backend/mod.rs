//! Export backends: where an export's bytes live.
//!
//! The server talks to every export through [`Backend`]. Plain storage (`memory`, `file`)
//! implements it directly; the emulated disk (`crate::disk`) wraps another backend and uses
//! the request-lifecycle hooks ([`Backend::arrived`], [`Backend::reply_sent`]) to apply the
//! durability rule: a write is durable once a FLUSH that *arrived after the write's reply was
//! sent* has been answered, or once it was answered with FUA.
//!
//! Contract the server keeps (the emulated disk relies on it):
//! 1. For every request, `arrived` is called once, as soon as its header (and for WRITE its
//!    payload) has been read from the socket and before it is executed. The [`Ticket`] it
//!    returns, if any, travels with the request.
//! 2. The IO method is called with that ticket (possibly on another task, concurrently with
//!    other requests). Callers that are not the server (the emulated disk writing back to its
//!    storage, tools) call IO methods with no ticket.
//! 3. `reply_sent` is called with the ticket after the reply bytes were handed to the socket,
//!    whether the request succeeded or failed. Never before the IO method returned.
//!
//!    Across connections of one export, a FLUSH's `arrived` comes after the `reply_sent` of
//!    every reply already handed to a socket (the server holds the flush until then; see
//!    [`crate::export::ReplyFence`]), so a flush covers every write a client saw answered.
//! 4. If the connection dies before the reply could be handed to the socket, `reply_abandoned`
//!    is called instead of `reply_sent` (default: no-op).
//!
//! A WRITE's payload is received into the buffer [`Backend::write_buffer`] hands out and given
//! to [`Backend::write`] as [`WriteData`], one type however the bytes are held (see [`data`]).
//!
//! Requests the server rejects itself before executing them (unknown command or flag, out of
//! range, zero length, write to a read-only export, oversized payload) never reach the
//! backend: no `arrived`, no IO, no `reply_sent`.
//!
//! Offsets and lengths have been checked against `size()` by the server before any IO method
//! is called; a backend may still return an error (`EIO`) but never panics on them.

use std::io;

pub mod data;
pub mod file;
pub mod memory;
pub mod overlay;

pub use data::{block_from, Block, Form, WriteData, WriteFailed, BLOCK_BYTES};
pub use file::FileBackend;
pub use memory::MemoryBackend;
pub use overlay::{Layer, Origin, OverlayBackend, Source};

/// Identifies one connection for the lifetime of the server process.
pub type ConnId = u64;

/// One piece of a read lent out by [`Backend::read_pieces`]: bytes in the backend's own
/// memory, or a run of zeroes that is not stored anywhere.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    Data(&'a [u8]),
    Zeroes(usize),
}

impl Piece<'_> {
    /// Bytes this piece stands for.
    pub fn len(&self) -> usize {
        match self {
            Piece::Data(d) => d.len(),
            Piece::Zeroes(n) => *n,
        }
    }

    /// Whether the piece stands for no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An opaque token a backend hands out at request arrival and gets back at every later
/// lifecycle event of the same request. Plain backends hand out none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

/// The kind of a request, as the backend needs to know it at arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

/// What arrived: enough for a recorder to stamp and order the request.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub conn: ConnId,
    pub kind: RequestKind,
    pub offset: u64,
    pub length: u64,
    /// NBD_CMD_FLAG_FUA was set.
    pub fua: bool,
}

/// One run of a BLOCK_STATUS answer for `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusExtent {
    pub length: u64,
    /// NBD_STATE_HOLE: no storage is allocated here.
    pub hole: bool,
    /// NBD_STATE_ZERO: reads return zeroes.
    pub zero: bool,
}

/// How the server runs a backend's IO methods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStyle {
    /// The methods may block (file IO, fsync, waiting on a lock held across IO): run them on
    /// tokio's blocking thread pool.
    Blocking,
    /// The methods only touch memory and return quickly: run them on the async workers.
    Inline,
    /// The backend runs requests on its own thread and answers through a callback
    /// ([`Backend::defer`]): nothing of the server's blocks while a request runs (an fs-core
    /// volume, whose engine thread runs every request). BLOCK_STATUS still goes through
    /// [`Backend::block_status`] on the blocking pool.
    Deferred,
}

/// A request handed to a [`IoStyle::Deferred`] backend.
#[derive(Debug)]
pub enum DeferredCall {
    Read {
        offset: u64,
        length: u64,
    },
    Write {
        offset: u64,
        data: WriteData,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u64,
        may_trim: bool,
        fua: bool,
    },
    Cache {
        offset: u64,
        length: u64,
    },
}

/// How a deferred request ended: a read's bytes, or nothing, or the error.
pub type DeferredOutcome = io::Result<Option<Vec<u8>>>;

/// Called once with the outcome of a deferred request, on whatever thread finished it.
pub type DeferredDone = Box<dyn FnOnce(DeferredOutcome) + Send>;

/// Where an export's bytes live. All methods take `&self`: backends do their own locking,
/// because requests of one connection run concurrently.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes; a multiple of 4096.
    fn size(&self) -> u64;

    /// Whether TRIM actually frees storage (the server advertises SEND_TRIM either way).
    fn can_trim(&self) -> bool {
        true
    }

    /// Whether WRITE_ZEROES can be done without writing zero bytes (FAST_ZERO support).
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// How the server should call the IO methods. Default: [`IoStyle::Blocking`], always safe.
    fn io_style(&self) -> IoStyle {
        IoStyle::Blocking
    }

    /// Lifecycle hook: a request has arrived (see the module docs). Default: no ticket.
    fn arrived(&self, _arrival: &Arrival) -> Option<Ticket> {
        None
    }

    /// Lifecycle hook: the reply for `ticket` has been handed to the socket. Default: no-op.
    fn reply_sent(&self, _ticket: Ticket) {}

    /// Lifecycle hook: the connection failed before the reply for `ticket` could be handed to
    /// the socket, so the client never learns the outcome. Default: no-op.
    fn reply_abandoned(&self, _ticket: Ticket) {}

    /// Fill `buf` from `offset`.
    fn read(&self, ticket: Option<Ticket>, offset: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Whether [`Self::read_pieces`] lends the backend's own memory, so that a caller can send
    /// a read straight from it rather than copying it into a buffer first.
    fn lends_memory(&self) -> bool {
        false
    }

    /// Reads `[offset, offset+length)` by calling `f` with its pieces, in order, as many
    /// times as needed (their lengths add up to `length`). The pieces are valid only during
    /// the call: the backend may hold locks meanwhile, so `f` must be quick and must not call
    /// back into the backend. An error is returned before the first call of `f`. The default
    /// reads into a fresh buffer with [`Self::read`].
    fn read_pieces(
        &self,
        ticket: Option<Ticket>,
        offset: u64,
        length: usize,
        f: &mut dyn FnMut(&[Piece<'_>]),
    ) -> io::Result<()> {
        let mut buf = vec![0u8; length];
        self.read(ticket, offset, &mut buf)?;
        f(&[Piece::Data(&buf)]);
        Ok(())
    }

    /// A buffer to receive a write of `length` bytes at `offset` into, to fill and hand to
    /// [`Self::write`]: one buffer ([`Form::Bytes`], of any length and capacity: the receiver
    /// empties it first), or exactly `length / BLOCK_BYTES` blocks ([`Form::Blocks`], their
    /// contents to be overwritten) where storage keeps blocks. Default: an empty buffer.
    fn write_buffer(&self, _offset: u64, _length: usize) -> WriteData {
        WriteData::empty()
    }

    /// Writes `data` at `offset`; with `fua`, durable before returning. A backend keeps what
    /// it is given (the emulated disk caches it; memory storage takes blocks it is given the
    /// only handle of) or copies it. On failure the data comes back with the error.
    fn write(
        &self,
        ticket: Option<Ticket>,
        offset: u64,
        data: WriteData,
        fua: bool,
    ) -> Result<(), WriteFailed>;

    /// Writes a copy of `data` at `offset`, for a caller that keeps its buffer (fs-core's
    /// writeback lends a folio's memory to its block writes): storage that copies what it is
    /// given anyway copies straight from `data`, with no buffer of the write's own.
    fn write_from(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.write(None, offset, WriteData::copy_of(data), fua)
            .map_err(|f| f.error)
    }

    /// Zero `length` bytes at `offset`. With `may_trim` (no NO_HOLE flag) storage may be
    /// freed. With `fast_only` (FAST_ZERO) return `Err(ErrorKind::Unsupported)` rather than
    /// fall back to writing zero bytes.
    fn write_zeroes(
        &self,
        ticket: Option<Ticket>,
        offset: u64,
        length: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()>;

    /// Discard `length` bytes at `offset`; afterwards they read as zeroes in this project's
    /// backends (the spec allows any content; zeroes keep crash checking deterministic).
    fn trim(&self, ticket: Option<Ticket>, offset: u64, length: u64, fua: bool) -> io::Result<()>;

    /// Make every write whose reply was sent before this flush arrived durable.
    fn flush(&self, ticket: Option<Ticket>) -> io::Result<()>;

    /// Starts `call` and returns at once; `done` gets its outcome later, from any thread. Only
    /// [`IoStyle::Deferred`] backends are called this way; the default runs the call here
    /// with the blocking methods.
    fn defer(&self, ticket: Option<Ticket>, call: DeferredCall, done: DeferredDone) {
        let outcome = match call {
            DeferredCall::Read { offset, length } => {
                let mut buf = vec![0u8; length as usize];
                self.read(ticket, offset, &mut buf).map(|()| Some(buf))
            }
            DeferredCall::Write { offset, data, fua } => self
                .write(ticket, offset, data, fua)
                .map(|()| None)
                .map_err(io::Error::from),
            DeferredCall::Flush => self.flush(ticket).map(|()| None),
            DeferredCall::Trim {
                offset,
                length,
                fua,
            } => self.trim(ticket, offset, length, fua).map(|()| None),
            DeferredCall::WriteZeroes {
                offset,
                length,
                may_trim,
                fua,
            } => self
                .write_zeroes(ticket, offset, length, may_trim, false, fua)
                .map(|()| None),
            DeferredCall::Cache { offset, length } => {
                self.cache(ticket, offset, length).map(|()| None)
            }
        };
        done(outcome)
    }

    /// Prefetch hint; may do nothing.
    fn cache(&self, _ticket: Option<Ticket>, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    /// Allocation status of `[offset, offset+length)`, as consecutive runs covering at least
    /// the first byte. May stop early (the server then reports what it got).
    fn block_status(
        &self,
        ticket: Option<Ticket>,
        offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>>;
}
