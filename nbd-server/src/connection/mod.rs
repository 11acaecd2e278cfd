//! The transmission phase of one connection: a [`Connection`] reads the next request
//! ([`read`]: framing, a WRITE's payload, an oversized payload thrown away), admits it
//! ([`admit`]: checks, payload budgets, the FLUSH fence, arrival at the backend), and
//! dispatches it ([`dispatch`]). Until it stops ([`stop`]: shutdown, a dropped export, a
//! stalled client, `NBD_CMD_DISC`, the end of the stream).
//!
//! Requests of [`IoStyle::Inline`] backends up to [`INLINE_BYTES_MAX`], and writes received
//! straight into blocks, run in the reader itself; their replies collect and are written to
//! the socket by the reader whenever it is about to wait (one `send` answers everything one
//! `recv` brought, with no task switch). Longer reads from a backend that lends its memory are
//! sent by the reader straight from that memory ([`crate::lent`]). Other requests run as their
//! own tasks (tokio's blocking pool for [`IoStyle::Blocking`] backends), concurrently and
//! finishing in any order; a writer task writes their replies as they complete (out of
//! order), batching whatever is queued. Both share the socket's write half ([`sink`]) and call
//! [`Backend::reply_sent`] once the bytes were handed to the socket.
//!
//! Limits: at most [`REQUESTS_IN_FLIGHT_MAX`] requests and [`IN_FLIGHT_PAYLOAD_BYTES_MAX`]
//! payload bytes (write data and read buffers) per connection, and the server's budget
//! ([`ServerBudget`]); the reader waits for room before it reads the next request, which
//! pushes back on the client through TCP.
//!
//! After the reader stops, the writer finishes every request already started, writes its
//! reply, and the socket closes; a dropped export (power cut, `disconnect_all`) cuts the socket
//! first, so that nothing more reaches the client.

mod admit;
mod dispatch;
mod read;
mod sink;
mod stop;

use std::sync::Arc;

use tokio::io::{BufReader, BufWriter};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::backend::{Backend, ConnId, IoStyle};
use crate::handshake::Session;
use crate::lent::VectoredWrite;
use crate::limits::{IN_FLIGHT_PAYLOAD_BYTES_MAX, REQUESTS_IN_FLIGHT_MAX};
pub use admit::ServerBudget;
pub use dispatch::INLINE_BYTES_MAX;
pub use read::{VectoredRead, HEADER_ONLY_AFTER_BYTES};
use sink::{BufPool, Pending, Reply, Sink};
pub(crate) use stop::wait_for_shutdown;
use stop::{Signals, Stop};

/// What the requests of a connection share, wherever they run.
struct Ctx {
    backend: Arc<dyn Backend>,
    export: Arc<crate::export::Export>,
    structured: bool,
    pool: BufPool,
}

/// One connection in its transmission phase.
struct Connection<R, W> {
    conn: ConnId,
    rd: BufReader<R>,
    session: Session,
    ctx: Arc<Ctx>,
    /// The export's size, how the backend's IO methods run, and whether large reads are sent
    /// straight from its memory.
    size: u64,
    style: IoStyle,
    lends: bool,
    sink: Arc<Sink<W>>,
    /// Replies of requests run on other tasks, to the writer task.
    tx: mpsc::UnboundedSender<Vec<Reply>>,
    writer: tokio::task::JoinHandle<()>,
    /// Replies of requests run in the reader, written when it is about to wait.
    pending: Pending,
    /// Requests in flight ([`REQUESTS_IN_FLIGHT_MAX`]).
    slots: Arc<Semaphore>,
    /// Payload bytes in flight on this connection ([`IN_FLIGHT_PAYLOAD_BYTES_MAX`]).
    bytes: Arc<Semaphore>,
    server_bytes: ServerBudget,
    signals: Signals,
    /// Payload length of the last request if it was a WRITE, else 0.
    last_write_bytes: u32,
}

/// Serves the transmission phase until the client disconnects or the server shuts down.
pub async fn serve<R, W>(
    rd: BufReader<R>,
    wr: BufWriter<W>,
    session: Session,
    conn: ConnId,
    shutdown: watch::Receiver<bool>,
    server_bytes: ServerBudget,
) where
    R: VectoredRead,
    W: VectoredWrite,
{
    let mut c = Connection::new(rd, wr, session, conn, shutdown, server_bytes);
    let stop = c.run().await;
    c.close(stop).await;
}

impl<R: VectoredRead, W: VectoredWrite> Connection<R, W> {
    fn new(
        rd: BufReader<R>,
        wr: BufWriter<W>,
        session: Session,
        conn: ConnId,
        shutdown: watch::Receiver<bool>,
        server_bytes: ServerBudget,
    ) -> Self {
        let backend = session.export.backend.clone();
        let ctx = Arc::new(Ctx {
            backend: backend.clone(),
            export: session.export.clone(),
            structured: session.structured,
            pool: BufPool::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(Sink::new(wr, ctx.clone()));
        Connection {
            conn,
            rd,
            size: backend.size(),
            style: backend.io_style(),
            lends: backend.lends_memory() && W::WRITES_IN_PLACE,
            writer: tokio::spawn(sink::write_replies(sink.clone(), rx)),
            signals: Signals::new(shutdown, session.export.kick.subscribe()),
            session,
            ctx,
            sink,
            tx,
            pending: Pending::default(),
            slots: Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_MAX)),
            bytes: Arc::new(Semaphore::new(IN_FLIGHT_PAYLOAD_BYTES_MAX as usize)),
            server_bytes,
            last_write_bytes: 0,
        }
    }

    /// Reads, admits and dispatches requests until something stops the connection.
    async fn run(&mut self) -> Stop {
        loop {
            if let Err(stop) = self.step().await {
                return stop;
            }
        }
    }

    /// One request: read, admitted (or answered at once), dispatched.
    async fn step(&mut self) -> Result<(), Stop> {
        self.signals.check(&self.sink)?;
        let slot = self.slot().await?;
        let request = self.read_request().await?;
        match self.admit(request, slot).await? {
            admit::Admitted::Run(op) => self.dispatch(op).await,
            admit::Admitted::Answered(reply) => self.pending.push(reply),
        }
        if self.pending.is_full() {
            self.pending.flush(&self.sink).await;
        }
        Ok(())
    }

    /// Ends the connection: a dropped export cuts the socket (nothing more reaches the
    /// client); otherwise every request started finishes and its reply is written.
    async fn close(mut self, stop: Stop) {
        let conn = self.conn;
        match stop {
            Stop::Shutdown => tracing::debug!(conn, "shutdown: no more requests"),
            Stop::Disconnect => tracing::debug!(conn, "NBD_CMD_DISC"),
            Stop::Dropped => {
                tracing::info!(
                    conn,
                    "dropped with every connection of the export (power cut or disconnect_all)"
                );
                self.sink.cut().await;
            }
            Stop::Stalled | Stop::Ended => {}
        }
        self.pending.flush(&self.sink).await;
        // Every started request holds a sender; the writer ends once they all replied.
        drop(self.tx);
        let _ = self.writer.await;
        self.sink.close().await;
        tracing::debug!(conn, "connection closed");
    }
}
