//! The listener: TCP and Unix sockets, one task per connection, graceful shutdown.
//!
//! [`Server::bind`] starts serving on a tokio runtime and returns a [`ServerHandle`];
//! [`Server::start_background`] does the same on a runtime of its own, for synchronous
//! callers (tests, crashmonkey). Shutdown stops accepting, stops reading new requests,
//! lets every request in flight finish and its reply go out, then flushes every export.
//!
//! A connection is negotiated on the socket's own halves; when the client starts TLS (see
//! [`crate::handshake`]) the halves are joined again, the TLS handshake runs, and the rest of
//! the connection (option haggling, then transmission) runs on the halves of the TLS stream.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::backend::{Arrival, ConnId, RequestKind};
use crate::connection::{wait_for_shutdown, ServerBudget, VectoredRead};
use crate::export::ExportRegistry;
use crate::handshake::{greet, haggle, HandshakeError, Negotiated, TlsPhase};
use crate::lent::VectoredWrite;
use crate::limits::{
    ACCEPT_RETRY_MILLIS, CONNECTIONS_MAX, HANDSHAKES_MAX, HANDSHAKE_SECONDS_MAX, LISTEN_BACKLOG,
    READ_BUFFER_BYTES, SHUTDOWN_GRACE_SECONDS, WRITE_BUFFER_BYTES,
};
use crate::tls::TlsConfig;

/// Where the server listens when told nothing else: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

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
    /// TLS (`--tls=on` or `require`); `None` is `--tls=off`.
    pub tls: Option<TlsConfig>,
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
        let shared = Arc::new(Shared {
            exports: config.exports,
            tls: config.tls,
            handshakes: Arc::new(Handshakes::default()),
            budget: ServerBudget::default(),
        });
        let unix_path = config.unix.clone();
        let task = tokio::spawn(run(tcp, unix, unix_path.clone(), shared, rx));
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
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
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
                    // Registered as negotiating here, in accept order: a handshake closed to
                    // make room is always one accepted before it, whatever order the tasks
                    // start in.
                    let guard = shared.handshakes.begin(conn);
                    tokio::spawn(connection(s, shared.clone(), guard, shutdown.clone(), permit, done_tx.clone()));
                }
                Err(e) => accept_failed(e).await,
            },
            r = accept_unix(&unix) => match r {
                Ok(s) => {
                    let Some(permit) = permit() else { continue };
                    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn, "accepted on unix socket");
                    // Registered as negotiating here, in accept order: a handshake closed to
                    // make room is always one accepted before it, whatever order the tasks
                    // start in.
                    let guard = shared.handshakes.begin(conn);
                    tokio::spawn(connection(s, shared.clone(), guard, shutdown.clone(), permit, done_tx.clone()));
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
    flush_all(&shared.exports).await
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
            if let Some(t) = t {
                backend.reply_sent(t);
            }
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

/// What every connection task of a server shares.
struct Shared {
    exports: ExportRegistry,
    tls: Option<TlsConfig>,
    handshakes: Arc<Handshakes>,
    budget: ServerBudget,
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

/// A stream socket the server accepts (TCP or Unix): served as two halves, and joined again
/// when the client starts TLS.
pub trait Socket: AsyncRead + AsyncWrite + Sized + Unpin + Send + Sync + 'static {
    type Read: VectoredRead;
    type Write: VectoredWrite;
    fn split(self) -> (Self::Read, Self::Write);
    fn join(rd: Self::Read, wr: Self::Write) -> io::Result<Self>;
}

impl Socket for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn join(rd: Self::Read, wr: Self::Write) -> io::Result<Self> {
        rd.reunite(wr).map_err(io::Error::other)
    }
}

impl Socket for UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn split(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn join(rd: Self::Read, wr: Self::Write) -> io::Result<Self> {
        rd.reunite(wr).map_err(io::Error::other)
    }
}

fn buffered<R: AsyncRead, W: AsyncWrite>(rd: R, wr: W) -> (BufReader<R>, BufWriter<W>) {
    (
        BufReader::with_capacity(READ_BUFFER_BYTES, rd),
        BufWriter::with_capacity(WRITE_BUFFER_BYTES, wr),
    )
}

/// The socket again, for the TLS handshake. The client must wait for the STARTTLS reply
/// before it starts TLS, so nothing may sit in the read buffer: bytes there would be lost.
fn unbuffered<S: Socket>(
    rd: BufReader<S::Read>,
    wr: BufWriter<S::Write>,
) -> Result<S, HandshakeError> {
    if !rd.buffer().is_empty() {
        return Err(HandshakeError::DataBeforeTls(rd.buffer().len()));
    }
    debug_assert!(wr.buffer().is_empty(), "the STARTTLS reply was flushed");
    S::join(rd.into_inner(), wr.into_inner()).map_err(HandshakeError::Io)
}

/// One connection: negotiation (with TLS if the client starts it), then transmission.
async fn connection<S: Socket>(
    stream: S,
    shared: Arc<Shared>,
    guard: HandshakeGuard,
    mut shutdown: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
    _done: mpsc::Sender<()>,
) {
    let deadline = Instant::now() + Duration::from_secs(HANDSHAKE_SECONDS_MAX);
    let phase = match &shared.tls {
        None => TlsPhase::Off,
        Some(t) => TlsPhase::Offered {
            required: t.required,
        },
    };
    let (r, w) = stream.split();
    let (mut rd, mut wr) = buffered(r, w);
    let conn = guard.conn;
    let close = &guard.close;
    let plain = async {
        let mut client = greet(&mut rd, &mut wr, phase).await?;
        let negotiated = haggle(&mut rd, &mut wr, &shared.exports, &mut client, phase).await?;
        Ok((client, negotiated))
    };
    let Some((mut client, negotiated)) = bounded(plain, deadline, &mut shutdown, close, conn).await
    else {
        return;
    };
    let Some(tls) = shared
        .tls
        .as_ref()
        .filter(|_| matches!(negotiated, Negotiated::StartTls))
    else {
        drop(guard);
        return transmission(rd, wr, negotiated, conn, shutdown, &shared).await;
    };
    let upgraded = async {
        let socket = unbuffered::<S>(rd, wr)?;
        let stream = tls.accept(socket).await.map_err(HandshakeError::Tls)?;
        let (r, w) = tokio::io::split(stream);
        let (mut rd, mut wr) = buffered(r, w);
        let running = TlsPhase::Running;
        let negotiated = haggle(&mut rd, &mut wr, &shared.exports, &mut client, running).await?;
        Ok((rd, wr, negotiated))
    };
    let upgraded = bounded(upgraded, deadline, &mut shutdown, close, conn).await;
    drop(guard);
    if let Some((rd, wr, negotiated)) = upgraded {
        transmission(rd, wr, negotiated, conn, shutdown, &shared).await;
    }
}

/// Runs one stage of negotiation within the connection's deadline, unless the server shuts
/// down first; `None` (the reason logged) closes the connection.
async fn bounded<T>(
    stage: impl std::future::Future<Output = Result<T, HandshakeError>>,
    deadline: Instant,
    shutdown: &mut watch::Receiver<bool>,
    close: &tokio::sync::Notify,
    conn: ConnId,
) -> Option<T> {
    let finished = tokio::select! {
        r = tokio::time::timeout_at(deadline, stage) => r,
        _ = wait_for_shutdown(shutdown) => return None,
        _ = close.notified() => return None,
    };
    match finished {
        Err(_) => {
            tracing::info!(
                conn,
                "negotiation took longer than {HANDSHAKE_SECONDS_MAX} s; dropped"
            );
            None
        }
        Ok(Err(
            e @ (HandshakeError::Tls(_)
            | HandshakeError::TlsRequired
            | HandshakeError::TlsImpossible
            | HandshakeError::DataBeforeTls(_)),
        )) => {
            tracing::info!(conn, error = %e, "negotiation failed");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(conn, error = %e, "negotiation ended");
            None
        }
        Ok(Ok(t)) => Some(t),
    }
}

/// The transmission phase of a negotiated connection.
async fn transmission<R, W>(
    rd: BufReader<R>,
    wr: BufWriter<W>,
    negotiated: Negotiated,
    conn: ConnId,
    shutdown: watch::Receiver<bool>,
    shared: &Shared,
) where
    R: VectoredRead,
    W: VectoredWrite,
{
    let Negotiated::Session(session) = negotiated else {
        // `haggle` acknowledges STARTTLS only where TLS is offered and not yet running.
        tracing::error!(conn, "STARTTLS acknowledged without TLS to start; dropped");
        return;
    };
    tracing::debug!(
        conn,
        export = %session.export.name,
        structured = session.structured,
        base_allocation = session.base_allocation,
        "transmission"
    );
    crate::connection::serve(rd, wr, session, conn, shutdown, shared.budget.clone()).await;
}
