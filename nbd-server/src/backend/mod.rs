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
//!    payload) has been read from the socket and before it is executed. The returned
//!    [`Ticket`] travels with the request.
//! 2. The IO method is called with that ticket (possibly on another task, concurrently with
//!    other requests).
//! 3. `reply_sent` is called with the ticket after the reply bytes were handed to the socket,
//!    whether the request succeeded or failed. Never before the IO method returned.
//!
//!    Across connections of one export, a FLUSH's `arrived` comes after the `reply_sent` of
//!    every reply already handed to a socket (the server holds the flush until then; see
//!    `connection::ReplyFence`), so a flush covers every write a client saw answered.
//! 4. If the connection dies before the reply could be handed to the socket, `reply_abandoned`
//!    is called instead of `reply_sent` (default: no-op).
//!
//! Requests the server rejects itself before executing them (unknown command or flag, out of
//! range, zero length, write to a read-only export, oversized payload) never reach the
//! backend: no `arrived`, no IO, no `reply_sent`.
//!
//! Offsets and lengths have been checked against `size()` by the server before any IO method
//! is called; a backend may still return an error (`EIO`) but never panics on them.

use std::io;

pub mod file;
pub mod memory;

pub use file::FileBackend;
pub use memory::MemoryBackend;

/// Identifies one connection for the lifetime of the server process.
pub type ConnId = u64;

/// Bytes in a [`Block`].
pub const BLOCK_BYTES: usize = 4096;

/// One 4 KiB block on the heap: the unit the memory backend stores, and the form the emulated
/// disk caches aligned writes in, so that writing one back into a hole moves the block instead
/// of copying it (see [`Backend::adopt_blocks`]).
pub type Block = Box<[u8; BLOCK_BYTES]>;

/// A block holding `bytes` (exactly [`BLOCK_BYTES`] of them), copied straight into its
/// allocation without zeroing it first.
pub fn block_from(bytes: &[u8]) -> Block {
    let whole: Box<[u8]> = bytes.into();
    whole
        .try_into()
        .unwrap_or_else(|_| Box::new([0u8; BLOCK_BYTES]))
}

/// A failed [`Backend::adopt_blocks`]: the error, and the blocks handed back untouched.
pub struct AdoptError {
    pub error: io::Error,
    pub blocks: Vec<Block>,
}

impl std::fmt::Debug for AdoptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdoptError")
            .field("error", &self.error)
            .field("blocks", &self.blocks.len())
            .finish()
    }
}

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
/// lifecycle event of the same request. Plain backends return `Ticket(0)` and ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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
}

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

    /// Lifecycle hook: a request has arrived (see the module docs). Default: no-op.
    fn arrived(&self, _arrival: &Arrival) -> Ticket {
        Ticket(0)
    }

    /// Lifecycle hook: the reply for `ticket` has been handed to the socket. Default: no-op.
    fn reply_sent(&self, _ticket: Ticket) {}

    /// Lifecycle hook: the connection failed before the reply for `ticket` could be handed to
    /// the socket, so the client never learns the outcome. Default: no-op.
    fn reply_abandoned(&self, _ticket: Ticket) {}

    /// Fill `buf` from `offset`.
    fn read(&self, ticket: Ticket, offset: u64, buf: &mut [u8]) -> io::Result<()>;

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
        ticket: Ticket,
        offset: u64,
        length: usize,
        f: &mut dyn FnMut(&[Piece<'_>]),
    ) -> io::Result<()> {
        let mut buf = vec![0u8; length];
        self.read(ticket, offset, &mut buf)?;
        f(&[Piece::Data(&buf)]);
        Ok(())
    }

    /// Write `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, ticket: Ticket, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;

    /// An empty buffer with room for a write payload of `n` bytes, to fill and hand back
    /// through [`Backend::write_owned`]. Default: a fresh allocation.
    fn payload_buffer(&self, n: usize) -> Vec<u8> {
        Vec::with_capacity(n)
    }

    /// [`Backend::write`] with the payload handed over: a backend that keeps the bytes (the
    /// emulated disk's cache) takes the buffer instead of copying it. Default: borrows it.
    fn write_owned(&self, ticket: Ticket, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.write(ticket, offset, &data, fua)
    }

    /// Whether a write of `length` bytes at `offset` is best handed over as [`Block`]s
    /// ([`Self::write_blocks`]), received straight into them, rather than as one buffer.
    fn takes_blocks(&self, _offset: u64, _length: u64) -> bool {
        false
    }

    /// `n` blocks to receive a write into (their contents are to be overwritten).
    fn block_buffers(&self, n: usize) -> Vec<Block> {
        (0..n).map(|_| Box::new([0u8; BLOCK_BYTES])).collect()
    }

    /// Writes `blocks` at `offset`, one after the other. The default copies them.
    fn write_blocks(
        &self,
        ticket: Ticket,
        offset: u64,
        blocks: Vec<Block>,
        fua: bool,
    ) -> io::Result<()> {
        let data: Vec<u8> = blocks.iter().flat_map(|b| b.iter().copied()).collect();
        self.write_owned(ticket, offset, data, fua)
    }

    /// Whether [`Self::adopt_blocks`] keeps the blocks it is given (rather than copying them),
    /// so that a caller holding data should hand it over in [`Block`]s.
    fn adopts_blocks(&self) -> bool {
        false
    }

    /// Writes `blocks` at `offset` (a multiple of [`BLOCK_BYTES`]), taking ownership of them.
    /// On failure the blocks come back with the error, so that a caller holding the only
    /// copy of acknowledged data (the emulated disk's cache) keeps it. The default copies
    /// them with [`Self::write`].
    fn adopt_blocks(
        &self,
        ticket: Ticket,
        offset: u64,
        blocks: Vec<Block>,
    ) -> Result<(), AdoptError> {
        for (i, b) in blocks.iter().enumerate() {
            if let Err(error) = self.write(ticket, offset + (i * BLOCK_BYTES) as u64, &b[..], false)
            {
                return Err(AdoptError { error, blocks });
            }
        }
        Ok(())
    }

    /// Zero `length` bytes at `offset`. With `may_trim` (no NO_HOLE flag) storage may be
    /// freed. With `fast_only` (FAST_ZERO) return `Err(ErrorKind::Unsupported)` rather than
    /// fall back to writing zero bytes.
    fn write_zeroes(
        &self,
        ticket: Ticket,
        offset: u64,
        length: u64,
        may_trim: bool,
        fast_only: bool,
        fua: bool,
    ) -> io::Result<()>;

    /// Discard `length` bytes at `offset`; afterwards they read as zeroes in this project's
    /// backends (the spec allows any content; zeroes keep crash checking deterministic).
    fn trim(&self, ticket: Ticket, offset: u64, length: u64, fua: bool) -> io::Result<()>;

    /// Make every write whose reply was sent before this flush arrived durable.
    fn flush(&self, ticket: Ticket) -> io::Result<()>;

    /// Prefetch hint; may do nothing.
    fn cache(&self, _ticket: Ticket, _offset: u64, _length: u64) -> io::Result<()> {
        Ok(())
    }

    /// Allocation status of `[offset, offset+length)`, as consecutive runs covering at least
    /// the first byte. May stop early (the server then reports what it got).
    fn block_status(
        &self,
        ticket: Ticket,
        offset: u64,
        length: u64,
    ) -> io::Result<Vec<StatusExtent>>;
}
