//! The listener: TCP and Unix sockets, one task per connection, limits, graceful shutdown.
//!
//! [`Server::bind`] starts serving on a tokio runtime and returns a [`ServerHandle`];
//! [`Server::start_background`] does the same on a runtime of its own, for synchronous
//! callers (tests, crashmonkey). Shutdown stops accepting, stops reading new requests,
//! lets every request in flight finish and its reply go out, then flushes every export.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::backend::{Arrival, ConnId, RequestKind};
use crate::export::ExportRegistry;
use crate::handshake::negotiate;

/// Where the server listens when told nothing else: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// Connections served at once; a connection over the limit is closed right after `accept`.
pub const CONNECTIONS_MAX: usize = 512;
/// Depth of the kernel's TCP accept queue (a burst of connects waits there, not in SYN retries).
pub const LISTEN_BACKLOG: u32 = 1024;
/// Requests of one connection being executed or waiting for their reply to be written.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Largest READ or WRITE payload (also advertised as the maximum block size).
pub const PAYLOAD_BYTES_MAX: u32 = 32 * 1024 * 1024;
/// A WRITE above [`PAYLOAD_BYTES_MAX`] but at most this is read, thrown away and answered
/// EINVAL; a larger one drops the connection (reading it would cost up to 4 GiB).
pub const PAYLOAD_DISCARD_BYTES_MAX: u32 = 128 * 1024 * 1024;
/// Payload bytes (write data and read buffers) held by one connection's requests at once.
pub const IN_FLIGHT_PAYLOAD_BYTES_MAX: u32 = 128 * 1024 * 1024;
/// Payload bytes (write data and read buffers) held by the requests of every connection at
/// once; past it requests wait (see `connection::ServerBudget`).
pub const SERVER_PAYLOAD_BYTES_MAX: u32 = 512 * 1024 * 1024;
/// Part of [`SERVER_PAYLOAD_BYTES_MAX`] kept for requests of at most 1 MiB.
pub const SERVER_PAYLOAD_RESERVE_BYTES: u32 = 64 * 1024 * 1024;
/// A batch of replies the socket does not take within this time drops the connection: its
/// client stopped reading, and its requests' bytes are freed for everyone else.
pub const REPLY_STALL_SECONDS_MAX: u64 = 20;
/// Time a client has to finish negotiation (qemu-nbd's default handshake limit).
pub const HANDSHAKE_SECONDS_MAX: u64 = 10;
/// Connections negotiating at once; a new one past it closes the one that has been
/// negotiating longest, so idle connections cannot keep anyone else out.
pub const HANDSHAKES_MAX: usize = 64;
/// Time shutdown waits for connections to finish their requests before flushing anyway.
pub const SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// Socket read buffer per connection: several pipelined requests per `recv`. (64 KiB, which
/// copies less of a large payload, measured slower for 1 MiB writes: more `recv` calls.)
pub const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Socket write buffer per connection: several small replies per `send`.
pub const WRITE_BUFFER_BYTES: usize = 256 * 1024;
/// The writer flushes at least this often while replies keep coming.
pub const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
pub const ACCEPT_RETRY_MILLIS: u64 = 50;

/// Connection ids; 0 is the server itself (its shutdown flush).
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
/// The connection id the server uses for its own requests (shutdown flush).
pub const SERVER_CONN: ConnId = 0;

/// What to serve and where.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// TCP address; `None` for Unix socket only. Port 0 picks a free port.
    pub listen: Option<SocketAddr>,
    /// Unix socket path; a stale socket file there is replaced.
    pub unix: Option<PathBuf>,
    pub exports: ExportRegistry,
}

/// Entry points.
pub struct Server;

/// A running server.
pub struct ServerHandle {
    tcp_addr: Option<SocketAddr>,
    unix_path: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<io::Result<()>>,
}

impl ServerHandle {
    /// The bound TCP address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    pub fn unix_path(&self) -> Option<&Path> {
        self.unix_path.as_deref()
    }

    /// Graceful shutdown; returns the first export flush error, if any.
    pub async fn shutdown(self) -> io::Result<()> {
        let _ = self.shutdown.send(true);
        self.task.await.map_err(io::Error::other)?
    }
}

/// Resolves once shutdown was asked for (or the handle is gone).
pub(crate) async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

impl Server {
    /// Binds the configured sockets and starts serving on the current tokio runtime.
    pub async fn bind(config: ServerConfig) -> io::Result<ServerHandle> {
        if config.listen.is_none() && config.unix.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "nothing to listen on",
            ));
        }
        let tcp = match config.listen {
            Some(a) => Some(listen_tcp(a)?),
            None => None,
        };
        let tcp_addr = match &tcp {
            Some(l) => Some(l.local_addr()?),
            None => None,
        };
        let unix = match &config.unix {
            Some(p) => {
                claim_socket_path(p)?;
                Some(UnixListener::bind(p)?)
            }
            None => None,
        };
        let (tx, rx) = watch::channel(false);
        let exports = Arc::new(config.exports);
        let unix_path = config.unix.clone();
        let task = tokio::spawn(run(tcp, unix, unix_path.clone(), exports, rx));
        Ok(ServerHandle {
            tcp_addr,
            unix_path,
            shutdown: tx,
            task,
        })
    }

    /// Starts a server on a runtime of its own (two worker threads); for synchronous callers.
    pub fn start_background(config: ServerConfig) -> io::Result<BackgroundServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("nbd-server")
            .enable_all()
            .build()?;
        let handle = rt.block_on(Server::bind(config))?;
        Ok(BackgroundServer {
            handle: Some(handle),
            rt: Some(rt),
        })
    }
}

/// A server running on its own runtime. Dropping it shuts it down.
pub struct BackgroundServer {
    handle: Option<ServerHandle>,
    rt: Option<tokio::runtime::Runtime>,
}

impl BackgroundServer {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.handle.as_ref().and_then(|h| h.local_addr())
    }

    pub fn unix_path(&self) -> Option<&Path> {
        self.handle.as_ref().and_then(|h| h.unix_path())
    }

    /// Graceful shutdown (see [`ServerHandle::shutdown`]).
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        let (Some(h), Some(rt)) = (self.handle.take(), self.rt.take()) else {
            return Ok(());
        };
        let r = rt.block_on(h.shutdown());
        rt.shutdown_timeout(Duration::from_secs(1));
        r
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Binds a TCP listener with a deep accept queue ([`LISTEN_BACKLOG`]).
fn listen_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

/// Makes `p` free for a new Unix socket: nothing is there, or a stale socket (no server
/// answers on it) that is then removed. A path that is not a socket is refused (it is
/// somebody's file), and so is a socket a live server answers on (it is somebody's server).
pub fn claim_socket_path(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                p.display()
            ),
        ));
    }
    match std::os::unix::net::UnixStream::connect(p) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is the socket of a running server (it answers); stop that one first",
                p.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %p.display(), "replacing a stale socket");
            std::fs::remove_file(p)
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("{} is a socket that cannot be checked: {e}", p.display()),
        )),
    }
}

async fn accept_tcp(l: &Option<TcpListener>) -> io::Result<(tokio::net::TcpStream, String)> {
    match l {
        Some(l) => {
            let (s, a) = l.accept().await?;
            Ok((s, a.to_string()))
        }
        None => std::future::pending().await,
    }
}

async fn accept_unix(l: &Option<UnixListener>) -> io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => Ok(l.accept().await?.0),
        None => std::future::pending().await,
    }
}

async fn run(
    tcp: Option<TcpListener>,
    unix: Option<UnixListener>,
    unix_path: Option<PathBuf>,
    exports: Arc<ExportRegistry>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let shared = Shared {
        exports: exports.clone(),
        handshakes: Arc::new(Handshakes::default()),
        budget: crate::connection::ServerBudget::default(),
    };
    // Each connection task holds a sender; `recv` returning None means all of them ended.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    loop {
        // Accept even when full, so a client over the limit is told at once (its connection
        // closes) instead of waiting in the kernel's queue for SYN retries.
        let permit = || match slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                tracing::warn!(
                    "{CONNECTIONS_MAX} connections already; closing a new one (CONNECTIONS_MAX)"
                );
                None
            }
        };
        tokio::select! {
            r = accept_tcp(&tcp) => match r {
                Ok((s, peer)) => {
                    let Some(permit) = permit() else { continue };
                    let _ = s.set_nodelay(true);
                    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn, %peer, "accepted");
                    let (r, w) = s.into_split();
                    tokio::spawn(connection(r, w, shared.clone(), conn, shutdown.clone(), permit, done_tx.clone()));
                }
                Err(e) => accept_failed(e).await,
            },
            r = accept_unix(&unix) => match r {
                Ok(s) => {
                    let Some(permit) = permit() else { continue };
                    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn, "accepted on unix socket");
                    let (r, w) = s.into_split();
                    tokio::spawn(connection(r, w, shared.clone(), conn, shutdown.clone(), permit, done_tx.clone()));
                }
                Err(e) => accept_failed(e).await,
            },
            _ = wait_for_shutdown(&mut shutdown) => break,
        }
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    drop(tcp);
    drop(unix);
    if let Some(p) = &unix_path {
        let _ = std::fs::remove_file(p);
    }
    drop(done_tx);
    let grace = Duration::from_secs(SHUTDOWN_GRACE_SECONDS);
    if tokio::time::timeout(grace, done_rx.recv()).await.is_err() {
        tracing::warn!("connections still busy after {SHUTDOWN_GRACE_SECONDS} s; flushing anyway");
    }
    flush_all(&exports).await
}

async fn accept_failed(e: io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MILLIS)).await;
}

/// Flushes every export, as a request of the server itself (so a recording backend sees it
/// arrive, run and be answered like any other flush).
async fn flush_all(exports: &ExportRegistry) -> io::Result<()> {
    let mut first_err = None;
    for e in exports.iter() {
        if e.readonly {
            continue;
        }
        let backend = e.backend.clone();
        let name = e.name.clone();
        let r = tokio::task::spawn_blocking(move || {
            let t = backend.arrived(&Arrival {
                conn: SERVER_CONN,
                kind: RequestKind::Flush,
                offset: 0,
                length: 0,
                fua: false,
            });
            let r = backend.flush(t);
            backend.reply_sent(t);
            r
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        match r {
            Ok(()) => tracing::info!(export = %name, "flushed"),
            Err(err) => {
                tracing::error!(export = %name, error = %err, "flush at shutdown failed");
                first_err.get_or_insert(err);
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// What every connection task shares.
#[derive(Clone)]
struct Shared {
    exports: Arc<ExportRegistry>,
    handshakes: Arc<Handshakes>,
    budget: crate::connection::ServerBudget,
}

/// The connections still negotiating, oldest first, each with the signal that closes it.
#[derive(Default)]
struct Handshakes {
    queue: std::sync::Mutex<std::collections::VecDeque<(ConnId, Arc<tokio::sync::Notify>)>>,
}

impl Handshakes {
    /// Registers `conn` as negotiating; with [`HANDSHAKES_MAX`] already negotiating, the
    /// oldest of them is told to close. The guard unregisters `conn` when dropped.
    fn begin(self: &Arc<Self>, conn: ConnId) -> HandshakeGuard {
        let close = Arc::new(tokio::sync::Notify::new());
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= HANDSHAKES_MAX {
            if let Some((old, signal)) = q.pop_front() {
                tracing::info!(
                    conn = old,
                    "{HANDSHAKES_MAX} connections negotiating; closing the oldest (HANDSHAKES_MAX)"
                );
                signal.notify_one();
            }
        }
        q.push_back((conn, close.clone()));
        HandshakeGuard {
            handshakes: self.clone(),
            conn,
            close,
        }
    }
}

struct HandshakeGuard {
    handshakes: Arc<Handshakes>,
    conn: ConnId,
    close: Arc<tokio::sync::Notify>,
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        let mut q = self
            .handshakes
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        q.retain(|(c, _)| *c != self.conn);
    }
}

async fn connection<R, W>(
    rd: R,
    wr: W,
    shared: Shared,
    conn: ConnId,
    mut shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
    _done: mpsc::Sender<()>,
) where
    R: crate::connection::VectoredRead,
    W: crate::lent::VectoredWrite,
{
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let mut wr = BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr);
    let limit = Duration::from_secs(HANDSHAKE_SECONDS_MAX);
    let guard = shared.handshakes.begin(conn);
    let negotiated = tokio::select! {
        r = tokio::time::timeout(limit, negotiate(&mut rd, &mut wr, &shared.exports)) => r,
        _ = wait_for_shutdown(&mut shutdown) => return,
        _ = guard.close.notified() => return,
    };
    drop(guard);
    let session = match negotiated {
        Err(_) => {
            tracing::info!(
                conn,
                "negotiation took longer than {HANDSHAKE_SECONDS_MAX} s; dropped"
            );
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(conn, error = %e, "negotiation ended");
            return;
        }
        Ok(Ok(s)) => s,
    };
    tracing::debug!(
        conn,
        export = %session.export.name,
        structured = session.structured,
        base_allocation = session.base_allocation,
        "transmission"
    );
    crate::connection::serve(rd, wr, session, conn, shutdown, shared.budget).await;
}
