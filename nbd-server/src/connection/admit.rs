//! Admitting a request: the checks against the session (a failed check is answered at once
//! and never reaches the backend), the payload budgets of the connection and the server, the
//! FLUSH fence, and the request's arrival at the backend.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::read::{Payload, Request};
use super::sink::Reply;
use super::stop::Stop;
use super::{Connection, VectoredRead};
use crate::backend::{Arrival, RequestKind, Ticket, WriteData};
use crate::handshake::Session;
use crate::lent::VectoredWrite;
use crate::limits::{
    PAYLOAD_BYTES_MAX, SERVER_PAYLOAD_BYTES_MAX, SERVER_PAYLOAD_RESERVE_BYTES,
    SMALL_REQUEST_BYTES_MAX,
};
use crate::proto::*;
use crate::reply::error_reply;

/// A checked request, ready to run, with what it holds until its reply is written.
pub struct Op {
    pub kind: RequestKind,
    pub cookie: u64,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
    /// A WRITE's data (taken when it runs).
    pub data: Option<WriteData>,
    /// What the backend handed out at arrival.
    pub ticket: Option<Ticket>,
    /// Its place among the connection's requests in flight.
    pub slot: OwnedSemaphorePermit,
    /// Its payload bytes (write data, read buffer).
    pub held: Option<Held>,
}

/// What admitting a request came to.
pub enum Admitted {
    /// Run it.
    Run(Op),
    /// Answered at once (an error), without reaching the backend.
    Answered(Reply),
}

/// An error answer decided before execution.
pub struct Reject {
    errno: u32,
    message: &'static str,
}

fn reject(errno: u32, message: &'static str) -> Reject {
    Reject { errno, message }
}

/// Payload bytes held by one request: of its connection's budget and of the server's.
pub struct Held {
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

impl<R: VectoredRead, W: VectoredWrite> Connection<R, W> {
    /// Checks the request, holds its payload bytes, fences a FLUSH, and tells the backend it
    /// arrived. A request that fails its checks is answered at once.
    pub(super) async fn admit(
        &mut self,
        request: Request,
        slot: OwnedSemaphorePermit,
    ) -> Result<Admitted, Stop> {
        let Request { header: h, payload } = request;
        let (data, mut held) = match payload {
            Payload::None => (None, None),
            Payload::Data(data, held) => (Some(data), Some(held)),
            Payload::Discarded => {
                let reply = self.refuse(&h, reject(NBD_EINVAL, ""), slot);
                return Ok(Admitted::Answered(reply));
            }
        };
        let kind = match check(&h, &self.session, self.size) {
            Ok(kind) => kind,
            Err(rej) => {
                let (conn, cmd) = (self.conn, command_name(h.command));
                let why = rej.message;
                tracing::debug!(conn, cmd, h.offset, h.length, h.flags, why, "rejected");
                return Ok(Admitted::Answered(self.refuse(&h, rej, slot)));
            }
        };
        if kind == RequestKind::Read {
            held = Some(self.acquire(h.length).await?);
        }
        if kind == RequestKind::Flush {
            self.pending.flush(&self.sink).await;
            self.ctx.export.fence.wait_idle().await;
        }
        let ticket = self.ctx.backend.arrived(&Arrival {
            conn: self.conn,
            kind,
            offset: h.offset,
            length: h.length as u64,
            fua: h.flags & NBD_CMD_FLAG_FUA != 0,
        });
        Ok(Admitted::Run(Op {
            kind,
            cookie: h.cookie,
            flags: h.flags,
            offset: h.offset,
            length: h.length,
            data,
            ticket,
            slot,
            held,
        }))
    }

    /// The error reply of a request refused before execution.
    fn refuse(&self, h: &RequestHeader, rej: Reject, slot: OwnedSemaphorePermit) -> Reply {
        let structured = self.session.structured;
        let bytes = error_reply(structured, h.command, h.cookie, rej.errno, rej.message);
        Reply::new(bytes, 0, None, slot, None)
    }

    /// A place among the connection's requests in flight, first handing pending replies to
    /// the socket if it has to wait (their requests hold the places).
    pub(super) async fn slot(&mut self) -> Result<OwnedSemaphorePermit, Stop> {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return Ok(slot);
        }
        self.pending.flush(&self.sink).await;
        self.slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Stop::Ended)
    }

    /// Reserves `n` payload bytes of the connection's budget and of the server's, first
    /// handing pending replies to the socket if it has to wait (their buffers are what it
    /// waits for).
    pub(super) async fn acquire(&mut self, n: u32) -> Result<Held, Stop> {
        let (conn, server) = (self.bytes.clone(), self.server_bytes.clone());
        let conn = self.acquire_one(&conn, n).await?;
        // Always in this order (connection, large, all), so that no two requests wait on each
        // other's permits.
        let large = if n > SMALL_REQUEST_BYTES_MAX {
            Some(self.acquire_one(&server.large, n).await?)
        } else {
            None
        };
        let all = self.acquire_one(&server.all, n).await?;
        Ok(Held {
            _conn: conn,
            _server: all,
            _large: large,
        })
    }

    async fn acquire_one(
        &mut self,
        budget: &Arc<Semaphore>,
        n: u32,
    ) -> Result<OwnedSemaphorePermit, Stop> {
        if let Ok(p) = budget.clone().try_acquire_many_owned(n) {
            return Ok(p);
        }
        self.pending.flush(&self.sink).await;
        // A connection given up on stops waiting: its client reads nothing anyway.
        tokio::select! {
            p = budget.clone().acquire_many_owned(n) => p.map_err(|_| Stop::Ended),
            _ = self.sink.stalled() => Err(Stop::Stalled),
        }
    }
}

/// Checks a request header against the session; `Ok` is the kind to execute.
fn check(h: &RequestHeader, s: &Session, size: u64) -> Result<RequestKind, Reject> {
    let kind = kind_of(h.command).ok_or_else(|| reject(NBD_EINVAL, "unknown command"))?;
    if h.flags & !allowed_flags(kind, s) != 0 {
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
        let errno = if writes { NBD_ENOSPC } else { NBD_EINVAL };
        return Err(reject(errno, "request extends past the end of the export"));
    }
    if kind == RequestKind::Read && h.length > PAYLOAD_BYTES_MAX {
        return Err(reject(
            NBD_EINVAL,
            "read longer than the 32 MiB payload limit",
        ));
    }
    Ok(kind)
}

/// The request kind of an NBD command (every command but DISC, which never gets here).
fn kind_of(command: u16) -> Option<RequestKind> {
    Some(match command {
        NBD_CMD_READ => RequestKind::Read,
        NBD_CMD_WRITE => RequestKind::Write,
        NBD_CMD_FLUSH => RequestKind::Flush,
        NBD_CMD_TRIM => RequestKind::Trim,
        NBD_CMD_CACHE => RequestKind::Cache,
        NBD_CMD_WRITE_ZEROES => RequestKind::WriteZeroes,
        NBD_CMD_BLOCK_STATUS => RequestKind::BlockStatus,
        _ => return None,
    })
}

/// The command flags a request of `kind` may carry in this session (FUA on every one).
fn allowed_flags(kind: RequestKind, s: &Session) -> u16 {
    NBD_CMD_FLAG_FUA
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
        }
}
