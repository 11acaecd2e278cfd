//! The transmission phase of one connection.
//!
//! A reader loop decodes requests, checks them, calls [`Backend::arrived`], and runs each
//! valid request. Requests of [`IoStyle::Inline`] backends up to [`INLINE_BYTES_MAX`], and
//! writes of any length received straight into blocks, run in the reader itself; their
//! replies collect and are written to the socket by the reader whenever it is about to wait
//! (one `send` answers everything one `recv` brought, with no task switch). Longer reads from
//! a backend that lends its memory are sent by the reader straight from that memory
//! ([`crate::lent`]). Other requests run as their own tasks (tokio's blocking pool for
//! [`IoStyle::Blocking`] backends), concurrently and finishing in any order; a writer task
//! writes their replies as they complete (out of order), batching whatever is queued. Both
//! share the socket's write half and call [`Backend::reply_sent`] once the bytes were handed
//! to the socket.
//!
//! Limits: at most [`REQUESTS_IN_FLIGHT_MAX`] requests and [`IN_FLIGHT_PAYLOAD_BYTES_MAX`]
//! payload bytes (write data and read buffers) per connection; the reader waits for room
//! before it reads the next request, which pushes back on the client through TCP.
//!
//! `NBD_CMD_DISC`, end of stream, a bad request magic (the stream cannot be trusted after it)
//! or server shutdown stop the reader; the writer then finishes every request already started,
//! writes its reply, and closes the socket.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::backend::{Arrival, Backend, Block, ConnId, IoStyle, RequestKind, Ticket, BLOCK_BYTES};
use crate::handshake::Session;
use crate::lent::{LentReply, VectoredWrite};
use crate::proto::*;
use crate::server::{
    wait_for_shutdown, IN_FLIGHT_PAYLOAD_BYTES_MAX, PAYLOAD_BYTES_MAX, PAYLOAD_DISCARD_BYTES_MAX,
    REPLY_STALL_SECONDS_MAX, REQUESTS_IN_FLIGHT_MAX, SERVER_PAYLOAD_BYTES_MAX,
    SERVER_PAYLOAD_RESERVE_BYTES, WRITE_BATCH_BYTES_MAX,
};

/// Longest a FLUSH waits for replies already being written (on any connection of its export)
/// to be reported with `reply_sent`; only a client that stops reading its replies makes the
/// wait this long.
pub const FLUSH_FENCE_MILLIS_MAX: u64 = 1000;

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
    fn begin(&self) -> u64 {
        let mut st = self.state();
        let id = st.next_id;
        st.next_id += 1;
        st.in_transit.insert(id);
        id
    }

    /// The batch's replies were reported with `reply_sent` (or abandoned).
    fn end(&self, id: u64) {
        self.state().in_transit.remove(&id);
        self.idle.notify_waiters();
    }

    /// Waits until every batch begun before this call has ended.
    async fn wait_idle(&self) {
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
        if tokio::time::timeout(Duration::from_millis(FLUSH_FENCE_MILLIS_MAX), wait)
            .await
            .is_err()
        {
            tracing::warn!("FLUSH waited {FLUSH_FENCE_MILLIS_MAX} ms for replies stuck in transit");
        }
    }
}

/// Most descriptors in one BLOCK_STATUS reply.
pub const BLOCK_STATUS_DESCRIPTORS_MAX: usize = 1024;

/// Buffers kept per connection for reuse.
pub const POOL_BUFFERS_MAX: usize = 16;
/// Buffers larger than this are freed rather than kept.
pub const POOL_BUFFER_BYTES_MAX: usize = 4 * 1024 * 1024 + 64;

/// Reusable payload buffers of one connection. Reusing them (rather than a fresh, zeroed
/// allocation per request) saves the page faults, zeroing and unmapping that dominated large
/// requests. A taken buffer holds stale bytes; every user overwrites all of it.
#[derive(Default)]
struct BufPool {
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of exactly `n` bytes (contents unspecified).
    fn take(&self, n: usize) -> Vec<u8> {
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        // Best fit: the smallest buffer that is long enough, else the longest one.
        let pick = bufs
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= n)
            .min_by_key(|(_, b)| b.len())
            .or_else(|| bufs.iter().enumerate().max_by_key(|(_, b)| b.len()))
            .map(|(i, _)| i);
        match pick.map(|i| bufs.swap_remove(i)) {
            Some(mut b) => {
                drop(bufs);
                if b.len() >= n {
                    b.truncate(n);
                } else {
                    b.resize(n, 0);
                }
                b
            }
            None => vec![0u8; n],
        }
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() > POOL_BUFFER_BYTES_MAX || b.len() < 4096 {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < POOL_BUFFERS_MAX {
            bufs.push(b);
        }
    }
}

/// One reply on its way to the writer.
struct Reply {
    bytes: Vec<u8>,
    /// Leading bytes of `bytes` that are not part of the reply (alignment padding).
    skip: usize,
    ticket: Option<Ticket>,
    _slot: OwnedSemaphorePermit,
    _budget: Option<Held>,
}

/// Payload bytes held by one request: of its connection's budget and of the server's.
struct Held {
    _conn: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
    /// For a large request, also the part of the server's budget small ones cannot use.
    _large: Option<OwnedSemaphorePermit>,
}

/// The server-wide budget of payload bytes in flight, shared by every connection: a request
/// waits for its bytes (so many clients with huge requests in flight cannot take the
/// server's memory). Requests longer than [`SMALL_REQUEST_BYTES_MAX`] also take bytes from a
/// budget [`SERVER_PAYLOAD_RESERVE_BYTES`] smaller, so that when large requests have taken
/// all they may, small ones still find room.
#[derive(Clone)]
pub struct ServerBudget {
    all: Arc<Semaphore>,
    large: Arc<Semaphore>,
}

impl Default for ServerBudget {
    fn default() -> Self {
        ServerBudget {
            all: Arc::new(Semaphore::new(SERVER_PAYLOAD_BYTES_MAX as usize)),
            large: Arc::new(Semaphore::new(
                (SERVER_PAYLOAD_BYTES_MAX - SERVER_PAYLOAD_RESERVE_BYTES) as usize,
            )),
        }
    }
}

/// Requests of at most this many payload bytes may use the server's reserve (see
/// [`ServerBudget`]).
pub const SMALL_REQUEST_BYTES_MAX: u32 = 1024 * 1024;

/// A checked request, ready to run.
struct Op {
    kind: RequestKind,
    cookie: u64,
    flags: u16,
    offset: u64,
    length: u32,
    payload: Payload,
}

/// A WRITE's data as received: in one buffer, or straight into blocks for backends that take
/// them (`Backend::takes_blocks`).
enum Payload {
    Bytes(Vec<u8>),
    Blocks(Vec<Block>),
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Bytes(Vec::new())
    }
}

/// A socket's read half that can also read into many buffers with one call (`readv`).
pub trait VectoredRead: AsyncRead + Unpin + Send + 'static {
    /// Reads what arrives into `bufs`, in order, waiting until at least one byte came
    /// (0 at the end of the stream). `bufs` is never all empty.
    fn read_vectored(
        &mut self,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> impl std::future::Future<Output = io::Result<usize>> + Send;
}

/// `readv` on a socket: what is there, else wait for readiness and try again.
macro_rules! socket_read_vectored {
    ($half:ty) => {
        impl VectoredRead for $half {
            async fn read_vectored(
                &mut self,
                bufs: &mut [io::IoSliceMut<'_>],
            ) -> io::Result<usize> {
                loop {
                    match self.try_read_vectored(bufs) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable().await?,
                        r => return r,
                    }
                }
            }
        }
    };
}
socket_read_vectored!(tokio::net::tcp::OwnedReadHalf);
socket_read_vectored!(tokio::net::unix::OwnedReadHalf);

/// Most buffers one `readv` call fills (the kernel's IOV_MAX).
pub const READV_SLICES_MAX: usize = 1024;

/// Receives exactly `blocks.len()` blocks of payload into `blocks`: first what the reader has
/// buffered, then straight from the socket with `readv`, so the kernel copies the data into
/// the blocks and nothing copies it again.
async fn read_blocks<R: VectoredRead>(
    rd: &mut BufReader<R>,
    mut blocks: Vec<Block>,
) -> io::Result<Vec<Block>> {
    let total = blocks.len() * BLOCK_BYTES;
    let mut done = 0;
    let buffered = rd.buffer();
    let n = buffered.len().min(total);
    while done < n {
        let (bi, bo) = (done / BLOCK_BYTES, done % BLOCK_BYTES);
        let m = (BLOCK_BYTES - bo).min(n - done);
        blocks[bi][bo..bo + m].copy_from_slice(&buffered[done..done + m]);
        done += m;
    }
    std::pin::Pin::new(&mut *rd).consume(n);
    while done < total {
        let (bi, bo) = (done / BLOCK_BYTES, done % BLOCK_BYTES);
        let got = {
            let (first, rest) = blocks[bi..]
                .split_first_mut()
                .expect("a block is left to fill");
            let mut slices = Vec::with_capacity(rest.len().min(READV_SLICES_MAX - 1) + 1);
            slices.push(io::IoSliceMut::new(&mut first[bo..]));
            slices.extend(
                rest.iter_mut()
                    .take(READV_SLICES_MAX - 1)
                    .map(|b| io::IoSliceMut::new(&mut b[..])),
            );
            rd.get_mut().read_vectored(&mut slices).await
        };
        match got {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(blocks)
}

/// Per-connection state shared by the request tasks.
struct Ctx {
    backend: Arc<dyn Backend>,
    export: Arc<crate::export::Export>,
    structured: bool,
    pool: BufPool,
}

/// An error answer decided before execution.
struct Reject {
    errno: u32,
    message: &'static str,
}

fn reject(errno: u32, message: &'static str) -> Reject {
    Reject { errno, message }
}

/// Checks a request header against the session; `Ok` is the kind to execute.
fn check(h: &RequestHeader, s: &Session, size: u64) -> Result<RequestKind, Reject> {
    let kind = match h.command {
        NBD_CMD_READ => RequestKind::Read,
        NBD_CMD_WRITE => RequestKind::Write,
        NBD_CMD_FLUSH => RequestKind::Flush,
        NBD_CMD_TRIM => RequestKind::Trim,
        NBD_CMD_CACHE => RequestKind::Cache,
        NBD_CMD_WRITE_ZEROES => RequestKind::WriteZeroes,
        NBD_CMD_BLOCK_STATUS => RequestKind::BlockStatus,
        _ => return Err(reject(NBD_EINVAL, "unknown command")),
    };
    let allowed = NBD_CMD_FLAG_FUA
        | match kind {
            RequestKind::Read if s.structured => NBD_CMD_FLAG_DF,
            RequestKind::WriteZeroes => {
                let fast = if s.transmission_flags & NBD_FLAG_SEND_FAST_ZERO != 0 {
                    NBD_CMD_FLAG_FAST_ZERO
                } else {
                    0
                };
                NBD_CMD_FLAG_NO_HOLE | fast
            }
            RequestKind::BlockStatus => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if h.flags & !allowed != 0 {
        return Err(reject(
            NBD_EINVAL,
            "command flag not valid for this command",
        ));
    }
    let writes = matches!(
        kind,
        RequestKind::Write | RequestKind::Trim | RequestKind::WriteZeroes
    );
    if writes && s.export.readonly {
        return Err(reject(NBD_EPERM, "the export is read-only"));
    }
    if kind == RequestKind::Flush {
        if h.offset != 0 || h.length != 0 {
            return Err(reject(NBD_EINVAL, "FLUSH must have offset and length 0"));
        }
        return Ok(kind);
    }
    if kind == RequestKind::BlockStatus && !(s.structured && s.base_allocation) {
        return Err(reject(
            NBD_EINVAL,
            "BLOCK_STATUS needs base:allocation selected with SET_META_CONTEXT",
        ));
    }
    if h.length == 0 {
        return Err(reject(NBD_EINVAL, "zero-length request"));
    }
    let in_range = h
        .offset
        .checked_add(h.length as u64)
        .is_some_and(|end| end <= size);
    if !in_range {
        return Err(if writes {
            reject(NBD_ENOSPC, "request extends past the end of the export")
        } else {
            reject(NBD_EINVAL, "request extends past the end of the export")
        });
    }
    if kind == RequestKind::Read && h.length > PAYLOAD_BYTES_MAX {
        return Err(reject(
            NBD_EINVAL,
            "read longer than the 32 MiB payload limit",
        ));
    }
    Ok(kind)
}

/// Maps an IO error to one of the NBD error values.
fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NBD_EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NBD_ENOSPC,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::EOPNOTSUPP) => NBD_ENOTSUP,
        Some(libc::EOVERFLOW) => NBD_EOVERFLOW,
        Some(_) => NBD_EIO,
        None => match e.kind() {
            io::ErrorKind::PermissionDenied => NBD_EPERM,
            io::ErrorKind::InvalidInput => NBD_EINVAL,
            io::ErrorKind::Unsupported => NBD_ENOTSUP,
            _ => NBD_EIO,
        },
    }
}

/// The bytes of an error reply: a structured ERROR chunk where the spec wants one (READ once
/// structured replies are on, and BLOCK_STATUS), else a simple reply.
fn error_reply(structured: bool, command: u16, cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    if structured && matches!(command, NBD_CMD_READ | NBD_CMD_BLOCK_STATUS) {
        encode_error_chunk(&mut out, cookie, errno, message);
    } else {
        encode_simple_reply(&mut out, errno, cookie);
    }
    out
}

fn ok_reply(cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIMPLE_REPLY_HEADER_BYTES);
    encode_simple_reply(&mut out, 0, cookie);
    out
}

/// Data in a READ reply starts at this alignment in memory: copying blocks into a buffer
/// at an odd offset made the copy (`rep movsb` on this AMD machine) several times slower.
const READ_DATA_ALIGN_BYTES: usize = 64;

/// Runs one checked request against the backend and returns its reply bytes, after as many
/// leading bytes of padding as the second value says.
fn execute(ctx: &Ctx, op: &mut Op, ticket: Ticket) -> (Vec<u8>, usize) {
    let b = &*ctx.backend;
    let fua = op.flags & NBD_CMD_FLAG_FUA != 0;
    let (cookie, offset, len) = (op.cookie, op.offset, op.length as u64);
    let command = match op.kind {
        RequestKind::Read => NBD_CMD_READ,
        RequestKind::BlockStatus => NBD_CMD_BLOCK_STATUS,
        _ => NBD_CMD_WRITE,
    };
    let fail = |e: io::Error| {
        tracing::debug!(?op.kind, offset, len, error = %e, "request failed");
        error_reply(
            ctx.structured,
            command,
            cookie,
            errno_of(&e),
            &e.to_string(),
        )
    };
    let bytes = match op.kind {
        RequestKind::Read => {
            let prefix = if ctx.structured {
                OFFSET_DATA_PREFIX_BYTES
            } else {
                SIMPLE_REPLY_HEADER_BYTES
            };
            let mut out = ctx
                .pool
                .take(READ_DATA_ALIGN_BYTES + prefix + op.length as usize);
            // The header goes right before the data, the data at an aligned address.
            let data_at = prefix
                + (READ_DATA_ALIGN_BYTES
                    - (out.as_ptr() as usize + prefix) % READ_DATA_ALIGN_BYTES)
                    % READ_DATA_ALIGN_BYTES;
            let skip = data_at - prefix;
            out.truncate(data_at + op.length as usize);
            return match b.read(ticket, offset, &mut out[data_at..]) {
                Ok(()) => {
                    let df = op.flags & NBD_CMD_FLAG_DF != 0;
                    if ctx.structured && !df {
                        if let Some(chunks) = sparse_read_reply(cookie, offset, &out[data_at..]) {
                            ctx.pool.give(out);
                            return (chunks, 0);
                        }
                    }
                    let reply = &mut out[skip..];
                    if ctx.structured {
                        put_offset_data_prefix(
                            reply,
                            NBD_REPLY_FLAG_DONE,
                            cookie,
                            offset,
                            op.length,
                        );
                    } else {
                        put_simple_reply(reply, 0, cookie);
                    }
                    (out, skip)
                }
                Err(e) => {
                    ctx.pool.give(out);
                    (fail(e), 0)
                }
            };
        }
        RequestKind::Write => {
            let written = match std::mem::take(&mut op.payload) {
                Payload::Bytes(data) => b.write_owned(ticket, offset, data, fua),
                Payload::Blocks(blocks) => b.write_blocks(ticket, offset, blocks, fua),
            };
            match written {
                Ok(()) => ok_reply(cookie),
                Err(e) => fail(e),
            }
        }
        RequestKind::Flush => match b.flush(ticket) {
            Ok(()) => ok_reply(cookie),
            Err(e) => fail(e),
        },
        RequestKind::Trim => match b.trim(ticket, offset, len, fua) {
            Ok(()) => ok_reply(cookie),
            Err(e) => fail(e),
        },
        RequestKind::WriteZeroes => {
            let may_trim = op.flags & NBD_CMD_FLAG_NO_HOLE == 0;
            let fast_only = op.flags & NBD_CMD_FLAG_FAST_ZERO != 0;
            match b.write_zeroes(ticket, offset, len, may_trim, fast_only, fua) {
                Ok(()) => ok_reply(cookie),
                Err(e) => fail(e),
            }
        }
        RequestKind::Cache => match b.cache(ticket, offset, len) {
            Ok(()) => ok_reply(cookie),
            Err(e) => fail(e),
        },
        RequestKind::BlockStatus => match b.block_status(ticket, offset, len) {
            Ok(runs) => {
                let req_one = op.flags & NBD_CMD_FLAG_REQ_ONE != 0;
                let descriptors = descriptors_of(&runs, len, req_one);
                let mut out =
                    Vec::with_capacity(STRUCTURED_REPLY_HEADER_BYTES + 4 + 8 * descriptors.len());
                encode_block_status_chunk(
                    &mut out,
                    NBD_REPLY_FLAG_DONE,
                    cookie,
                    crate::handshake::BASE_ALLOCATION_CONTEXT_ID,
                    &descriptors,
                );
                out
            }
            Err(e) => fail(e),
        },
    };
    (bytes, 0)
}

/// Shortest run of zero bytes sent as an OFFSET_HOLE chunk rather than as data.
pub const HOLE_CHUNK_BYTES_MIN: usize = 64 * 1024;
/// Zero runs are found in aligned pieces of this size (relative to the export).
const HOLE_SCAN_BYTES: usize = 4096;

fn all_zero(b: &[u8]) -> bool {
    let (words, tail) = b.split_at(b.len() / 8 * 8);
    words.chunks_exact(8).all(|w| w == [0u8; 8]) && tail.iter().all(|&x| x == 0)
}

/// For a structured READ without DF: if `data` (read at `offset`) holds zero runs of at least
/// [`HOLE_CHUNK_BYTES_MIN`], the reply as OFFSET_DATA and OFFSET_HOLE chunks ending with a NONE
/// chunk, so holes cost 32 bytes on the wire instead of their length. `None` when there is
/// no such run (the caller sends one OFFSET_DATA chunk, with no extra copy).
fn sparse_read_reply(cookie: u64, offset: u64, data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HOLE_CHUNK_BYTES_MIN {
        return None;
    }
    // Pieces aligned to the export, so chunk boundaries fall on 4 KiB multiples.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new(); // (start, end, zero)
    let mut pos = 0usize;
    while pos < data.len() {
        let to_boundary = HOLE_SCAN_BYTES - ((offset as usize + pos) % HOLE_SCAN_BYTES);
        let end = (pos + to_boundary).min(data.len());
        let zero = all_zero(&data[pos..end]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => runs.push((pos, end, zero)),
        }
        pos = end;
    }
    // Short zero runs travel as data: merge them into their neighbours.
    let mut merged: Vec<(usize, usize, bool)> = Vec::new();
    for (a, b, zero) in runs {
        let zero = zero && b - a >= HOLE_CHUNK_BYTES_MIN;
        match merged.last_mut() {
            Some(last) if last.2 == zero => last.1 = b,
            _ => merged.push((a, b, zero)),
        }
    }
    if !merged.iter().any(|r| r.2) {
        return None;
    }
    let data_bytes: usize = merged.iter().filter(|r| !r.2).map(|r| r.1 - r.0).sum();
    let mut out = Vec::with_capacity(
        data_bytes + merged.len() * (OFFSET_DATA_PREFIX_BYTES + 12) + STRUCTURED_REPLY_HEADER_BYTES,
    );
    for (a, b, zero) in merged {
        let at = offset + a as u64;
        if zero {
            encode_offset_hole(&mut out, 0, cookie, at, (b - a) as u32);
        } else {
            let mut prefix = [0u8; OFFSET_DATA_PREFIX_BYTES];
            put_offset_data_prefix(&mut prefix, 0, cookie, at, (b - a) as u32);
            out.extend_from_slice(&prefix);
            out.extend_from_slice(&data[a..b]);
        }
    }
    encode_none_chunk(&mut out, cookie);
    Some(out)
}

/// Turns backend runs into descriptors: clipped to the request, empty runs dropped, equal
/// neighbours merged, at most [`BLOCK_STATUS_DESCRIPTORS_MAX`] (one with REQ_ONE), never none.
fn descriptors_of(
    runs: &[crate::backend::StatusExtent],
    len: u64,
    req_one: bool,
) -> Vec<BlockDescriptor> {
    let cap = if req_one {
        1
    } else {
        BLOCK_STATUS_DESCRIPTORS_MAX
    };
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut covered = 0u64;
    for r in runs {
        let n = r.length.min(len - covered);
        if n == 0 {
            continue;
        }
        let flags =
            if r.hole { NBD_STATE_HOLE } else { 0 } | if r.zero { NBD_STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += n as u32,
            _ => {
                if out.len() == cap {
                    break;
                }
                out.push(BlockDescriptor {
                    length: n as u32,
                    flags,
                });
            }
        }
        covered += n;
        if covered == len {
            break;
        }
    }
    if out.is_empty() {
        // The backend told nothing: "status 0" (allocated, contents unknown) is always true.
        out.push(BlockDescriptor {
            length: len as u32,
            flags: 0,
        });
    }
    out
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> io::Result<()> {
    let mut sink = vec![0u8; 64 * 1024];
    while n > 0 {
        let m = n.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..m]).await?;
        n -= m as u64;
    }
    Ok(())
}

/// Serves the transmission phase until the client disconnects or the server shuts down.
pub async fn serve<R, W>(
    mut rd: BufReader<R>,
    wr: BufWriter<W>,
    session: Session,
    conn: ConnId,
    mut shutdown: watch::Receiver<bool>,
    server_budget: ServerBudget,
) where
    R: VectoredRead,
    W: VectoredWrite,
{
    let backend = session.export.backend.clone();
    let size = backend.size();
    let style = backend.io_style();
    let lends = backend.lends_memory() && W::WRITES_IN_PLACE;
    let ctx = Arc::new(Ctx {
        backend: backend.clone(),
        export: session.export.clone(),
        structured: session.structured,
        pool: BufPool::default(),
    });
    let (tx, rx) = mpsc::unbounded_channel::<Vec<Reply>>();
    let sink = Arc::new(Sink::new(wr, ctx.clone()));
    let writer = tokio::spawn(write_replies(sink.clone(), rx));
    let slots = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX));
    let budget = Arc::new(Semaphore::new(IN_FLIGHT_PAYLOAD_BYTES_MAX as usize));
    // Replies of requests run in this task, handed to the writer in one message whenever the
    // reader is about to wait (so one socket write answers everything one read brought).
    let mut pending = Pending::default();
    // Bumped by `Export::disconnect_all` and, for an emulated disk, by its power cut.
    let mut kick = session.export.kick.subscribe();
    let mut kicked = false;
    // Payload length of the last request if it was a WRITE, else 0.
    let mut last_write_bytes = 0u32;
    loop {
        // Checked here too: with requests always buffered, the select below never waits.
        if *shutdown.borrow() {
            tracing::debug!(conn, "shutdown: no more requests");
            break;
        }
        if kick.has_changed().unwrap_or(false) {
            kicked = true;
            break;
        }
        if sink.is_stalled() {
            break;
        }
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                pending.flush(&sink).await;
                let Ok(s) = slots.clone().acquire_owned().await else {
                    break;
                };
                s
            }
        };
        if rd.buffer().len() < REQUEST_HEADER_BYTES {
            pending.flush(&sink).await;
        }
        let mut hb = [0u8; REQUEST_HEADER_BYTES];
        // After a large write the next request is likely one too: read just its header, so
        // its payload goes from the socket straight into blocks rather than first filling
        // the read buffer and being copied out of it.
        let header_only = rd.buffer().is_empty() && last_write_bytes >= HEADER_ONLY_AFTER_BYTES;
        let r = tokio::select! {
            biased;
            r = async {
                if header_only {
                    rd.get_mut().read_exact(&mut hb).await
                } else {
                    rd.read_exact(&mut hb).await
                }
            } => r.map(|_| ()),
            _ = wait_for_shutdown(&mut shutdown) => {
                tracing::debug!(conn, "shutdown: no more requests");
                break;
            }
            _ = kick.changed() => {
                kicked = true;
                break;
            }
            _ = sink.stalled() => break,
        };
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!(conn, error = %e, "read failed");
            }
            break;
        }
        let h = match RequestHeader::decode(&hb) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(conn, error = %e, "bad request, dropping the connection");
                break;
            }
        };
        tracing::trace!(
            conn,
            cmd = command_name(h.command),
            h.offset,
            h.length,
            h.flags,
            "request"
        );
        if h.command == NBD_CMD_DISC {
            tracing::debug!(conn, "NBD_CMD_DISC");
            break;
        }
        last_write_bytes = if h.command == NBD_CMD_WRITE {
            h.length
        } else {
            0
        };
        // WRITE carries a payload whatever else is wrong with it; read it first to stay in step.
        let mut payload = Payload::default();
        let mut payload_budget = None;
        if h.command == NBD_CMD_WRITE {
            if h.length > PAYLOAD_BYTES_MAX {
                if h.length > PAYLOAD_DISCARD_BYTES_MAX {
                    tracing::warn!(
                        conn,
                        length = h.length,
                        "write payload too large to discard, dropping the connection"
                    );
                    break;
                }
                pending.flush(&sink).await;
                if discard(&mut rd, h.length as u64).await.is_err() {
                    break;
                }
                tracing::debug!(
                    conn,
                    length = h.length,
                    "write payload over the limit, discarded"
                );
                let bytes = error_reply(session.structured, h.command, h.cookie, NBD_EINVAL, "");
                pending.push(Reply {
                    bytes,
                    ticket: None,
                    skip: 0,
                    _slot: slot,
                    _budget: None,
                });
                continue;
            }
            payload_budget =
                match acquire_bytes(&budget, &server_budget, h.length, &mut pending, &sink).await {
                    Some(p) => Some(p),
                    None => break,
                };
            if rd.buffer().len() < h.length as usize {
                pending.flush(&sink).await;
            }
            // The backend's buffer (the emulated disk recycles written-back entries), filled
            // without zeroing it first; `write_owned` hands it back as the cache entry.
            let received = if backend.takes_blocks(h.offset, h.length as u64) {
                let blocks = backend.block_buffers(h.length as usize / BLOCK_BYTES);
                read_blocks(&mut rd, blocks).await.map(Payload::Blocks)
            } else {
                // The backend's buffer (the emulated disk recycles written-back entries),
                // filled without zeroing it first; `write_owned` hands it back as the cache
                // entry.
                read_payload(
                    &mut rd,
                    backend.payload_buffer(h.length as usize),
                    h.length as usize,
                )
                .await
                .map(Payload::Bytes)
            };
            payload = match received {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(conn, error = %e, "connection ended in the middle of a write payload");
                    break;
                }
            };
        }
        let kind = match check(&h, &session, size) {
            Ok(k) => k,
            Err(rej) => {
                tracing::debug!(
                    conn,
                    cmd = command_name(h.command),
                    h.offset,
                    h.length,
                    h.flags,
                    why = rej.message,
                    "rejected"
                );
                let bytes = error_reply(
                    session.structured,
                    h.command,
                    h.cookie,
                    rej.errno,
                    rej.message,
                );
                pending.push(Reply {
                    bytes,
                    ticket: None,
                    skip: 0,
                    _slot: slot,
                    _budget: None,
                });
                continue;
            }
        };
        if kind == RequestKind::Read {
            payload_budget =
                match acquire_bytes(&budget, &server_budget, h.length, &mut pending, &sink).await {
                    Some(p) => Some(p),
                    None => break,
                };
        }
        if kind == RequestKind::Flush {
            pending.flush(&sink).await;
            ctx.export.fence.wait_idle().await;
        }
        let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
        let ticket = backend.arrived(&Arrival {
            conn,
            kind,
            offset: h.offset,
            length: h.length as u64,
            fua,
        });
        let op = Op {
            kind,
            cookie: h.cookie,
            flags: h.flags,
            offset: h.offset,
            length: h.length,
            payload,
        };
        match style {
            // Memory-speed backends run in the reader: a task switch would cost more than the
            // request. Their replies collect and are written when the reader is about to wait.
            // A write received into blocks is cheap to execute however long (the blocks are
            // cached as they are): handing it to another task measured slower at 1 MiB
            // (0.88x vs 0.99x nbdkit, paired A/B rounds), as a task spawned by the reader
            // mostly waits for the reader's own worker anyway (tokio's LIFO slot).
            IoStyle::Inline
                if op.length <= INLINE_BYTES_MAX || matches!(op.payload, Payload::Blocks(_)) =>
            {
                let reply = run(&ctx, op, ticket, slot, payload_budget);
                pending.push(reply);
            }
            // A large read from a backend that lends its memory is sent straight from it, in
            // the reader, after the replies collected so far (0.96x vs 0.88x nbdkit at 1 MiB
            // for a spawned task, paired A/B rounds: the send is the work, and one socket
            // takes one send at a time).
            IoStyle::Inline if lends && op.kind == RequestKind::Read => {
                pending.flush(&sink).await;
                sink.send_lent_read(&op, ticket).await;
                drop((slot, payload_budget));
            }
            // A large copy goes to another worker, so the reader keeps reading meanwhile and
            // both cores copy.
            IoStyle::Inline => {
                let ctx = ctx.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let reply = run(&ctx, op, ticket, slot, payload_budget);
                    send(&tx, vec![reply], &ctx);
                });
            }
            IoStyle::Blocking => {
                let ctx = ctx.clone();
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    let reply = run(&ctx, op, ticket, slot, payload_budget);
                    send(&tx, vec![reply], &ctx);
                });
            }
        }
        if pending.is_full() {
            pending.flush(&sink).await;
        }
    }
    if kicked {
        // Hard disconnect: nothing more reaches the client.
        tracing::info!(
            conn,
            "dropped with every connection of the export (power cut or disconnect_all)"
        );
        sink.cut().await;
    }
    pending.flush(&sink).await;
    // Every started request holds a sender; the writer ends once they all replied.
    drop(tx);
    let _ = writer.await;
    sink.close().await;
    tracing::debug!(conn, "connection closed");
}

/// Reads exactly `n` bytes into `payload` (emptied first), straight into its spare capacity (no zeroing).
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    mut payload: Vec<u8>,
    n: usize,
) -> io::Result<Vec<u8>> {
    payload.clear();
    payload.reserve(n);
    while payload.len() < n {
        let want = (n - payload.len()) as u64;
        if (&mut *rd).take(want).read_buf(&mut payload).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(payload)
}

/// After a WRITE at least this long, the next request header is read by itself (see
/// `serve`): a read-buffer fill would take in up to [`crate::server::READ_BUFFER_BYTES`] of
/// the next payload, to be copied again into its blocks.
pub const HEADER_ONLY_AFTER_BYTES: u32 = 256 * 1024;

/// Requests of inline backends up to this length run in the reader; longer ones get a task.
pub const INLINE_BYTES_MAX: u32 = 128 * 1024;

/// Most replies the reader collects before handing them to the writer.
pub const PENDING_REPLIES_MAX: usize = 64;

#[derive(Default)]
struct Pending {
    replies: Vec<Reply>,
    bytes: usize,
}

impl Pending {
    fn push(&mut self, r: Reply) {
        self.bytes += r.bytes.len();
        self.replies.push(r);
    }

    fn is_full(&self) -> bool {
        self.replies.len() >= PENDING_REPLIES_MAX || self.bytes >= WRITE_BATCH_BYTES_MAX
    }

    /// Writes the collected replies to the socket (in this task: no hand-over, no wake-up).
    async fn flush<W: AsyncWrite + Unpin>(&mut self, sink: &Sink<W>) {
        if !self.replies.is_empty() {
            self.bytes = 0;
            sink.write_batch(std::mem::take(&mut self.replies)).await;
        }
    }
}

/// Hands replies to the writer; if it is gone, the requests' outcomes are never told.
fn send(tx: &mpsc::UnboundedSender<Vec<Reply>>, batch: Vec<Reply>, ctx: &Ctx) {
    if let Err(mpsc::error::SendError(batch)) = tx.send(batch) {
        for r in batch {
            if let Some(t) = r.ticket {
                ctx.backend.reply_abandoned(t);
            }
        }
    }
}

/// Reserves `n` payload bytes of the connection's budget and of the server's, first handing
/// pending replies to the writer if it has to wait (their buffers are what it waits for).
async fn acquire_bytes<W: AsyncWrite + Unpin>(
    conn: &Arc<Semaphore>,
    server: &ServerBudget,
    n: u32,
    pending: &mut Pending,
    sink: &Sink<W>,
) -> Option<Held> {
    let conn = acquire_one(conn, n, pending, sink).await?;
    // Always in this order (connection, large, all), so that no two requests wait on each
    // other's permits.
    let large = if n > SMALL_REQUEST_BYTES_MAX {
        Some(acquire_one(&server.large, n, pending, sink).await?)
    } else {
        None
    };
    let all = acquire_one(&server.all, n, pending, sink).await?;
    Some(Held {
        _conn: conn,
        _server: all,
        _large: large,
    })
}

async fn acquire_one<W: AsyncWrite + Unpin>(
    budget: &Arc<Semaphore>,
    n: u32,
    pending: &mut Pending,
    sink: &Sink<W>,
) -> Option<OwnedSemaphorePermit> {
    match budget.clone().try_acquire_many_owned(n) {
        Ok(p) => Some(p),
        Err(_) => {
            pending.flush(sink).await;
            // A connection given up on stops waiting: its client reads nothing anyway.
            tokio::select! {
                p = budget.clone().acquire_many_owned(n) => p.ok(),
                _ = sink.stalled() => None,
            }
        }
    }
}

/// Executes one request and wraps its reply.
fn run(
    ctx: &Ctx,
    op: Op,
    ticket: Ticket,
    slot: OwnedSemaphorePermit,
    budget: Option<Held>,
) -> Reply {
    let mut op = op;
    let (bytes, skip) = execute(ctx, &mut op, ticket);
    if let Payload::Bytes(data) = op.payload {
        ctx.pool.give(data);
    }
    Reply {
        bytes,
        skip,
        ticket: Some(ticket),
        _slot: slot,
        _budget: budget,
    }
}

/// The socket's write half, shared by the reader (replies of requests it ran itself) and the
/// writer task (replies of requests run elsewhere).
struct Sink<W> {
    /// The writer and whether it failed (then replies are only abandoned).
    wr: tokio::sync::Mutex<(BufWriter<W>, bool)>,
    ctx: Arc<Ctx>,
    /// Set when the client stopped taking replies for [`REPLY_STALL_SECONDS_MAX`]; the
    /// reader then stops too.
    stalled: std::sync::atomic::AtomicBool,
    stall: tokio::sync::Notify,
}

impl<W> Sink<W> {
    fn new(wr: BufWriter<W>, ctx: Arc<Ctx>) -> Self {
        Sink {
            wr: tokio::sync::Mutex::new((wr, false)),
            ctx,
            stalled: Default::default(),
            stall: Default::default(),
        }
    }

    fn is_stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Gives up on the client: it took no reply for too long.
    fn give_up(&self) {
        tracing::warn!(
            export = %self.ctx.export.name,
            "a client took no reply for {REPLY_STALL_SECONDS_MAX} s; dropping its connection"
        );
        self.stalled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.stall.notify_waiters();
    }

    /// Resolves once [`Self::give_up`] was called.
    async fn stalled(&self) {
        loop {
            let notified = self.stall.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_stalled() {
                return;
            }
            notified.await;
        }
    }
}

/// How long a batch of replies may take to reach the socket (see [`REPLY_STALL_SECONDS_MAX`]).
fn stall_limit() -> Duration {
    Duration::from_secs(REPLY_STALL_SECONDS_MAX)
}

impl<W: AsyncWrite + Unpin> Sink<W> {
    /// Writes replies in order, flushes, then reports each with `reply_sent` (or
    /// `reply_abandoned` if the socket failed) and recycles the buffers.
    async fn write_batch(&self, mut batch: Vec<Reply>) {
        let ctx = &self.ctx;
        let ticketed = batch.iter().filter(|r| r.ticket.is_some()).count();
        let fence_id = (ticketed > 0).then(|| ctx.export.fence.begin());
        let broken = {
            let mut g = self.wr.lock().await;
            let (wr, broken) = &mut *g;
            if !*broken {
                let written = tokio::time::timeout(stall_limit(), async {
                    for r in &batch {
                        wr.write_all(&r.bytes[r.skip..]).await?;
                    }
                    wr.flush().await
                })
                .await;
                match written {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => *broken = true,
                    Err(_) => {
                        *broken = true;
                        self.give_up();
                    }
                }
            }
            *broken
        };
        for r in batch.drain(..) {
            if let Some(t) = r.ticket {
                if broken {
                    ctx.backend.reply_abandoned(t);
                } else {
                    ctx.backend.reply_sent(t);
                }
            }
            ctx.pool.give(r.bytes);
        }
        if let Some(id) = fence_id {
            ctx.export.fence.end(id);
        }
    }

    /// Answers a READ with data lent by the backend (see [`crate::lent`]): the reply goes
    /// to the socket straight from the backend's memory, after everything queued before it.
    async fn send_lent_read(&self, op: &Op, ticket: Ticket)
    where
        W: VectoredWrite,
    {
        let ctx = &self.ctx;
        let fence_id = ctx.export.fence.begin();
        let broken = {
            let mut g = self.wr.lock().await;
            let (wr, broken) = &mut *g;
            if !*broken {
                let sent = tokio::time::timeout(stall_limit(), send_lent(ctx, wr, op, ticket));
                match sent.await {
                    Ok(true) => {}
                    Ok(false) => *broken = true,
                    Err(_) => {
                        *broken = true;
                        self.give_up();
                    }
                }
            }
            *broken
        };
        if broken {
            ctx.backend.reply_abandoned(ticket);
        } else {
            ctx.backend.reply_sent(ticket);
        }
        ctx.export.fence.end(fence_id);
    }
    /// Marks the socket failed and shuts it down: later batches are abandoned, not written.
    async fn cut(&self) {
        let mut g = self.wr.lock().await;
        g.1 = true;
        let _ = g.0.get_mut().shutdown().await;
    }

    async fn close(&self) {
        let mut g = self.wr.lock().await;
        let _ = g.0.shutdown().await;
    }
}

/// Sends a lent READ reply (see [`Sink::send_lent_read`]) after what is buffered; false if
/// the socket failed.
async fn send_lent<W: VectoredWrite>(
    ctx: &Ctx,
    wr: &mut BufWriter<W>,
    op: &Op,
    ticket: Ticket,
) -> bool {
    if wr.flush().await.is_err() {
        return false;
    }
    let df = op.flags & NBD_CMD_FLAG_DF != 0;
    let len = op.length as usize;
    let mut reply = LentReply::new(ctx.structured, df, op.cookie, op.offset, len);
    let sock = wr.get_ref();
    let read = ctx
        .backend
        .read_pieces(ticket, op.offset, len, &mut |pieces| {
            reply.send(pieces, &|bufs| sock.try_write_vectored(bufs))
        });
    let ok = match read {
        Ok(()) if reply.failed.is_none() && reply.complete() => {
            wr.write_all(&reply.rest).await.is_ok()
        }
        Ok(()) => {
            tracing::debug!(error = ?reply.failed, "lent READ reply failed");
            false
        }
        // Errors come before any piece: nothing of this reply went out yet.
        Err(e) if !reply.started() => {
            tracing::debug!(offset = op.offset, len, error = %e, "read failed");
            let bytes = error_reply(
                ctx.structured,
                NBD_CMD_READ,
                op.cookie,
                errno_of(&e),
                &e.to_string(),
            );
            wr.write_all(&bytes).await.is_ok()
        }
        Err(e) => {
            tracing::warn!(error = %e, "read failed after part of its reply was sent");
            false
        }
    };
    ok && wr.flush().await.is_ok()
}

/// The writer task: replies of requests run on other tasks, in completion order, batched.
async fn write_replies<W: AsyncWrite + Unpin>(
    sink: Arc<Sink<W>>,
    mut rx: mpsc::UnboundedReceiver<Vec<Reply>>,
) {
    while let Some(mut batch) = rx.recv().await {
        let mut bytes: usize = batch.iter().map(|r| r.bytes.len()).sum();
        while bytes < WRITE_BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(more) => {
                    bytes += more.iter().map(|r| r.bytes.len()).sum::<usize>();
                    batch.extend(more);
                }
                Err(_) => break,
            }
        }
        sink.write_batch(batch).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::StatusExtent;

    /// Decodes a chunked READ reply back into bytes (holes as zeroes).
    fn reassemble(reply: &[u8], offset: u64, len: usize) -> (Vec<u8>, usize) {
        let mut out = vec![0xAAu8; len];
        let mut p = 0;
        let mut chunks = 0;
        loop {
            let (h, n) = ReplyHeader::decode(&reply[p..]).unwrap();
            let ReplyHeader::Structured {
                flags,
                chunk_type,
                length,
                ..
            } = h
            else {
                panic!()
            };
            let body = &reply[p + n..p + n + length as usize];
            p += n + length as usize;
            chunks += 1;
            let at = body
                .get(0..8)
                .map(|b| (u64::from_be_bytes(b.try_into().unwrap()) - offset) as usize)
                .unwrap_or(0);
            match chunk_type {
                NBD_REPLY_TYPE_OFFSET_DATA => {
                    out[at..at + body.len() - 8].copy_from_slice(&body[8..])
                }
                NBD_REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(body[8..12].try_into().unwrap()) as usize;
                    out[at..at + n].fill(0);
                }
                NBD_REPLY_TYPE_NONE => {}
                t => panic!("chunk type {t}"),
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                assert_eq!(p, reply.len());
                return (out, chunks);
            }
        }
    }

    #[test]
    fn sparse_reads_become_hole_chunks() {
        let mut data = vec![0u8; 1 << 20];
        data[5000..9000].fill(1); // data inside the first 64 KiB
        data[700_000] = 2; // lone byte: its block stays data
        let off = 3 * 4096 + 100; // unaligned start
        let reply = sparse_read_reply(9, off, &data).expect("has holes");
        let (back, chunks) = reassemble(&reply, off, data.len());
        assert!(back == data);
        assert!(chunks >= 5, "data, hole, data, hole, none: {chunks}");
        assert!(
            reply.len() < 100_000,
            "holes are not sent as bytes: {}",
            reply.len()
        );
        // No hole of 64 KiB: no chunking.
        let mut dense = vec![1u8; 1 << 20];
        dense[4096..8192].fill(0);
        assert!(sparse_read_reply(9, 0, &dense).is_none());
        assert!(
            sparse_read_reply(9, 0, &[0u8; 4096]).is_none(),
            "too short to bother"
        );
    }

    #[test]
    fn descriptors_merge_clip_and_cap() {
        let runs = [
            StatusExtent {
                length: 4096,
                hole: true,
                zero: true,
            },
            StatusExtent {
                length: 4096,
                hole: true,
                zero: true,
            },
            StatusExtent {
                length: 8192,
                hole: false,
                zero: false,
            },
        ];
        let d = descriptors_of(&runs, 10000, false);
        assert_eq!(
            d,
            vec![
                BlockDescriptor {
                    length: 8192,
                    flags: 3
                },
                BlockDescriptor {
                    length: 1808,
                    flags: 0
                }
            ]
        );
        assert_eq!(
            descriptors_of(&runs, 10000, true),
            vec![BlockDescriptor {
                length: 8192,
                flags: 3
            }]
        );
        assert_eq!(
            descriptors_of(&[], 512, false),
            vec![BlockDescriptor {
                length: 512,
                flags: 0
            }]
        );
    }
}
