//! Shared test helpers: an in-process server with a fixed set of exports, and a raw,
//! byte-level NBD client built on std sockets (every read has a timeout, so a test fails
//! rather than hangs).
#![allow(dead_code)]

pub mod binary;
pub mod pki;
pub mod skip;
pub mod tmpfs;
pub mod wire;

pub use skip::skip;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nbd_server::backend::{Backend, MemoryBackend};
use nbd_server::{BackgroundServer, Export, ExportRegistry, Server, ServerConfig};
use wire::*;

pub const DISK_BYTES: u64 = 64 << 20;
pub const RO_BYTES: u64 = 1 << 20;
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A server on 127.0.0.1:0 with exports "disk" (64 MiB memory), "ro" (1 MiB read-only,
/// pre-filled with 0x5a in its first 4 KiB), "file" (8 MiB raw file in a temp dir) and "emu"
/// (64 MiB memory behind the emulated disk, with a cache of only 1 MiB so that write-back
/// runs all the time).
pub struct TestServer {
    pub server: Option<BackgroundServer>,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// Threads the server runs code on (the tokio runtime's, and the emulated disk's).
const SERVER_THREADS: [&str; 3] = ["nbd-server", "write-log", "idle-writeback"];

/// Panics on server threads since the test binary started. tokio swallows a connection
/// task's panic (the task just ends), so a bad-input test that only watches the client side
/// cannot see one; this hook counts them, and [`TestServer::assert_healthy`] demands none.
static SERVER_PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_server_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            // The engine thread of an fs-core volume is named "fscore EXPORT".
            if thread
                .name()
                .is_some_and(|n| SERVER_THREADS.contains(&n) || n.starts_with("fscore "))
            {
                SERVER_PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            default_hook(info);
        }));
    });
}

impl TestServer {
    pub fn start() -> Self {
        count_server_panics();
        let dir = tempfile::tempdir().unwrap();
        let ro = MemoryBackend::new(RO_BYTES);
        ro.write(
            None,
            0,
            nbd_server::backend::WriteData::copy_of(&[0x5a; 4096]),
            false,
        )
        .unwrap();
        let file = nbd_server::backend::FileBackend::open(
            &dir.path().join("file.img"),
            Some(8 << 20),
            false,
        )
        .unwrap();
        let mut disk = Export::new("disk", Arc::new(MemoryBackend::new(DISK_BYTES)), false);
        disk.description = Some("a test disk".into());
        let exports = ExportRegistry::new(vec![
            disk,
            Export::new("ro", Arc::new(ro), true),
            Export::new("file", Arc::new(file), false),
            Export::from_spec(&format!("emu:size={DISK_BYTES},cache=1M").parse().unwrap()).unwrap(),
        ])
        .unwrap();
        let server = Server::start_background(ServerConfig {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            unix: Some(dir.path().join("nbd.sock")),
            exports,
            tls: None,
        })
        .unwrap();
        let addr = server.local_addr().unwrap();
        TestServer {
            server: Some(server),
            addr,
            dir,
        }
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.path().join("nbd.sock")
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// No server thread has panicked, and a fresh client can negotiate "disk", write, read
    /// back and disconnect.
    pub fn assert_healthy(&self) {
        assert_eq!(
            SERVER_PANICS.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "a server thread panicked (see the panic message above)"
        );
        let mut c = Raw::connect(self.addr);
        c.handshake(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        c.go("disk", false, false).expect("GO disk");
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        c.request(0, NBD_CMD_WRITE, 77, 12288, 8192, &data);
        assert_eq!(c.simple_reply(0), (0, 77, vec![]), "healthy write");
        c.request(0, NBD_CMD_READ, 78, 12288, 8192, &[]);
        let (err, cookie, got) = c.simple_reply(8192);
        assert_eq!((err, cookie), (0, 78));
        assert!(got == data, "healthy read returned other bytes");
        c.disc();
    }
}

/// Whether `tool` can be run; when it cannot, [`skip`] decides (a failure, unless skipping
/// is allowed outside CI).
pub fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    found || skip(&format!("{tool} is not installed (make deps installs it)"))
}

/// Runs a command, fails the test with its output unless it exits 0; returns stdout+stderr.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A raw NBD client.
pub struct Raw {
    pub s: TcpStream,
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// One structured chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Raw { s }
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        b
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Reads the greeting; returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let b = self.read_n(GREETING_BYTES);
        decode_greeting(b.as_slice().try_into().unwrap()).unwrap()
    }

    pub fn handshake(&mut self, client_flags: u32) {
        let f = self.greeting();
        assert_eq!(f, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        self.send(&client_flags.to_be_bytes());
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = OptionHeader {
            option,
            length: data.len() as u32,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        let h = self.read_n(OPTION_REPLY_HEADER_BYTES);
        let h = OptionReplyHeader::decode(h.as_slice().try_into().unwrap()).unwrap();
        let data = self.read_n(h.length as usize);
        OptReply {
            option: h.option,
            reply_type: h.reply_type,
            data,
        }
    }

    /// Reads replies up to and including the final one (ACK or an error).
    pub fn opt_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.reply_type == NBD_REP_ACK || r.reply_type & NBD_REP_FLAG_ERROR != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// STRUCTURED_REPLY (optional), SET_META_CONTEXT base:allocation (optional), then GO.
    /// Returns (size, transmission flags) or the error reply type.
    pub fn go(&mut self, name: &str, structured: bool, meta: bool) -> Result<(u64, u16), u32> {
        if structured {
            self.option(NBD_OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.opt_reply().reply_type, NBD_REP_ACK);
        }
        if meta {
            let q = MetaContextRequest {
                export: name.into(),
                queries: vec!["base:allocation".into()],
            };
            self.option(NBD_OPT_SET_META_CONTEXT, &q.encode());
            let r = self.opt_replies();
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].reply_type, NBD_REP_META_CONTEXT);
        }
        let req = InfoRequest {
            name: name.into(),
            requests: vec![],
        };
        self.option(NBD_OPT_GO, &req.encode());
        let mut export = None;
        for r in self.opt_replies() {
            match r.reply_type {
                NBD_REP_INFO => {
                    if let Ok(Info::Export {
                        size,
                        transmission_flags,
                    }) = Info::decode(&r.data)
                    {
                        export = Some((size, transmission_flags));
                    }
                }
                NBD_REP_ACK => return Ok(export.expect("GO acked without NBD_INFO_EXPORT")),
                e => return Err(e),
            }
        }
        unreachable!()
    }

    pub fn request(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut b = RequestHeader {
            flags,
            command,
            cookie,
            offset,
            length,
        }
        .encode()
        .to_vec();
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// A simple reply; when its error is 0, `data_len` bytes of data follow (READ).
    pub fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let b = self.read_n(SIMPLE_REPLY_HEADER_BYTES);
        match ReplyHeader::decode(&b).unwrap().0 {
            ReplyHeader::Simple { error, cookie } => {
                let data = if error == 0 {
                    self.read_n(data_len)
                } else {
                    vec![]
                };
                (error, cookie, data)
            }
            h => panic!("expected a simple reply, got {h:?}"),
        }
    }

    pub fn chunk(&mut self) -> Chunk {
        let b = self.read_n(STRUCTURED_REPLY_HEADER_BYTES);
        match ReplyHeader::decode(&b).unwrap().0 {
            ReplyHeader::Structured {
                flags,
                chunk_type,
                cookie,
                length,
            } => {
                let payload = self.read_n(length as usize);
                Chunk {
                    flags,
                    chunk_type,
                    cookie,
                    payload,
                }
            }
            h => panic!("expected a structured chunk, got {h:?}"),
        }
    }

    pub fn disc(&mut self) {
        self.request(0, NBD_CMD_DISC, 0, 0, 0, &[]);
        assert!(self.closed(), "server did not close after NBD_CMD_DISC");
    }

    /// True once the server has closed the connection (EOF or reset) within the timeout.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}

impl Raw {
    /// Connects and negotiates `export` with simple replies.
    pub fn attach(addr: SocketAddr, export: &str) -> Raw {
        let mut c = Raw::connect(addr);
        c.handshake(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        c.go(export, false, false)
            .unwrap_or_else(|e| panic!("GO {export}: error {e:#x}"));
        c
    }

    /// A WRITE (with `flags`), answered; returns the NBD error (0: success).
    pub fn write_at(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.request(
            flags,
            NBD_CMD_WRITE,
            offset,
            offset,
            data.len() as u32,
            data,
        );
        let (err, cookie, _) = self.simple_reply(0);
        assert_eq!(cookie, offset);
        err
    }

    /// A READ, answered: the data, or the NBD error.
    pub fn read_at(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, u32> {
        self.request(0, NBD_CMD_READ, offset, offset, len as u32, &[]);
        let (err, cookie, data) = self.simple_reply(len);
        assert_eq!(cookie, offset);
        if err == 0 {
            Ok(data)
        } else {
            Err(err)
        }
    }

    /// A FLUSH, answered; returns the NBD error.
    pub fn flush_now(&mut self) -> u32 {
        self.request(0, NBD_CMD_FLUSH, 0xF1, 0, 0, &[]);
        let (err, cookie, _) = self.simple_reply(0);
        assert_eq!(cookie, 0xF1);
        err
    }
}

/// True when a test that needs root (mounts) can run; else [`skip`] decides.
pub fn root_or_skip(test: &str) -> bool {
    #[allow(unsafe_code)]
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root || skip(&format!("{test} needs root (it mounts a small tmpfs)"))
}

/// The NBD error field of an ERROR chunk.
pub fn chunk_error(c: &Chunk) -> u32 {
    assert_eq!(c.chunk_type, NBD_REPLY_TYPE_ERROR, "{c:?}");
    u32::from_be_bytes(c.payload[0..4].try_into().unwrap())
}

/// Many sockets in one test: raise the soft limit of open files (up to the hard limit).
#[allow(unsafe_code)]
pub fn raise_open_files_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the one struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
