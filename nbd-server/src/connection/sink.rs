//! The socket's write half, shared by the reader (replies of requests it ran itself) and the
//! writer task (replies of requests run elsewhere): replies in batches, `reply_sent` once the
//! bytes were handed to the socket, the FLUSH fence around every batch that carries tickets,
//! and a client that stops taking replies given up on.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit};

use super::admit::{Held, Op};
use super::Ctx;
use crate::backend::Ticket;
use crate::lent::{LentReply, VectoredWrite};
use crate::limits::{
    PENDING_REPLIES_MAX, POOL_BUFFERS_MAX, POOL_BUFFER_BYTES_MAX, REPLY_STALL_SECONDS_MAX,
    WRITE_BATCH_BYTES_MAX,
};
use crate::proto::*;
use crate::reply::{errno_of, error_reply};

/// Reusable payload buffers of one connection. Reusing them (rather than a fresh, zeroed
/// allocation per request) saves the page faults, zeroing and unmapping that dominated large
/// requests. A taken buffer holds stale bytes; every user overwrites all of it.
#[derive(Default)]
pub struct BufPool {
    bufs: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of exactly `n` bytes (contents unspecified).
    pub fn take(&self, n: usize) -> Vec<u8> {
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

    pub fn give(&self, b: Vec<u8>) {
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
pub struct Reply {
    bytes: Vec<u8>,
    /// Leading bytes of `bytes` that are not part of the reply (alignment padding).
    skip: usize,
    /// The backend's ticket: `reply_sent` (or `reply_abandoned`) is called with it.
    ticket: Option<Ticket>,
    _slot: OwnedSemaphorePermit,
    _budget: Option<Held>,
}

impl Reply {
    /// The reply `bytes` (after `skip` bytes of padding) of a request that held `slot` and
    /// `budget`.
    pub fn new(
        bytes: Vec<u8>,
        skip: usize,
        ticket: Option<Ticket>,
        slot: OwnedSemaphorePermit,
        budget: Option<Held>,
    ) -> Self {
        Reply {
            bytes,
            skip,
            ticket,
            _slot: slot,
            _budget: budget,
        }
    }
}

/// Replies of requests the reader ran itself, collected until it is about to wait.
#[derive(Default)]
pub struct Pending {
    replies: Vec<Reply>,
    bytes: usize,
}

impl Pending {
    pub fn push(&mut self, r: Reply) {
        self.bytes += r.bytes.len();
        self.replies.push(r);
    }

    pub fn is_full(&self) -> bool {
        self.replies.len() >= PENDING_REPLIES_MAX || self.bytes >= WRITE_BATCH_BYTES_MAX
    }

    /// Writes the collected replies to the socket (in this task: no hand-over, no wake-up).
    pub async fn flush<W: AsyncWrite + Unpin>(&mut self, sink: &Sink<W>) {
        if !self.replies.is_empty() {
            self.bytes = 0;
            sink.write_batch(std::mem::take(&mut self.replies)).await;
        }
    }
}

/// Hands replies to the writer; if it is gone, the requests' outcomes are never told.
pub fn send(tx: &mpsc::UnboundedSender<Vec<Reply>>, batch: Vec<Reply>, ctx: &Ctx) {
    if let Err(mpsc::error::SendError(batch)) = tx.send(batch) {
        for r in batch {
            if let Some(t) = r.ticket {
                ctx.backend.reply_abandoned(t);
            }
        }
    }
}

/// The socket's write half, shared by the reader (replies of requests it ran itself) and the
/// writer task (replies of requests run elsewhere).
pub struct Sink<W> {
    /// The writer and whether it failed (then replies are only abandoned).
    wr: tokio::sync::Mutex<(BufWriter<W>, bool)>,
    ctx: Arc<Ctx>,
    /// Set when the client stopped taking replies for [`REPLY_STALL_SECONDS_MAX`]; the
    /// reader then stops too.
    stalled: std::sync::atomic::AtomicBool,
    stall: tokio::sync::Notify,
}

impl<W> Sink<W> {
    pub fn new(wr: BufWriter<W>, ctx: Arc<Ctx>) -> Self {
        Sink {
            wr: tokio::sync::Mutex::new((wr, false)),
            ctx,
            stalled: Default::default(),
            stall: Default::default(),
        }
    }

    pub fn is_stalled(&self) -> bool {
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
    pub async fn stalled(&self) {
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
    pub async fn write_batch(&self, mut batch: Vec<Reply>) {
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
    pub async fn send_lent_read(&self, op: &Op)
    where
        W: VectoredWrite,
    {
        let ctx = &self.ctx;
        let fence_id = op.ticket.map(|_| ctx.export.fence.begin());
        let broken = {
            let mut g = self.wr.lock().await;
            let (wr, broken) = &mut *g;
            if !*broken {
                let sent = tokio::time::timeout(stall_limit(), send_lent(ctx, wr, op));
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
        if let Some(ticket) = op.ticket {
            if broken {
                ctx.backend.reply_abandoned(ticket);
            } else {
                ctx.backend.reply_sent(ticket);
            }
        }
        if let Some(id) = fence_id {
            ctx.export.fence.end(id);
        }
    }

    /// Marks the socket failed and shuts it down: later batches are abandoned, not written.
    pub async fn cut(&self) {
        let mut g = self.wr.lock().await;
        g.1 = true;
        let _ = g.0.get_mut().shutdown().await;
    }

    pub async fn close(&self) {
        let mut g = self.wr.lock().await;
        let _ = g.0.shutdown().await;
    }
}

/// Sends a lent READ reply (see [`Sink::send_lent_read`]) after what is buffered; false if
/// the socket failed.
async fn send_lent<W: VectoredWrite>(ctx: &Ctx, wr: &mut BufWriter<W>, op: &Op) -> bool {
    if wr.flush().await.is_err() {
        return false;
    }
    let df = op.flags & NBD_CMD_FLAG_DF != 0;
    let len = op.length as usize;
    let mut reply = LentReply::new(ctx.structured, df, op.cookie, op.offset, len);
    let sock = wr.get_ref();
    let read = ctx
        .backend
        .read_pieces(op.ticket, op.offset, len, &mut |pieces| {
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
pub async fn write_replies<W: AsyncWrite + Unpin>(
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
