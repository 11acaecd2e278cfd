//! TLS (`NBD_OPT_STARTTLS`, x509 certificates made at run time by `certtool`):
//! - real clients over TLS: `nbdinfo` and `nbdcopy` (`nbds://`), `qemu-io` (`tls-creds-x509`),
//!   over TCP and a Unix socket, against an in-process server and the binary;
//! - `--tls=require` refusing plain clients, with the server's reason reaching them;
//! - the option replies of the spec's NOTLS, SELECTIVETLS and FORCEDTLS modes, checked byte
//!   by byte with bytes written out here from `doc/proto.md` (not the server's codecs), and
//!   haggling restarting inside TLS with nothing kept from before;
//! - bad TLS handshakes (garbage, hang-ups, a pipelined ClientHello, an untrusted server)
//!   each ending one connection while the server keeps serving;
//! - client certificates: ignored by default (as nbdkit), checked with `--tls-verify-peer`.
//!
//! A missing tool skips its test with a printed reason, unless `CI=true`, where it fails.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::binary::Running;
use common::pki::Pki;
use common::{have, run, IO_TIMEOUT};
use nbd_server::tls::TlsConfig;
use nbd_server::{BackgroundServer, ExportRegistry, Server, ServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const BIN: &str = env!("CARGO_BIN_EXE_nbd-server");

// The wire values below are copied from the NBD protocol document (doc/proto.md).
const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
/// Option reply magic 0x3e889045565a9.
const REPLY_MAGIC: [u8; 8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
/// Handshake flags NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES.
const HANDSHAKE_FLAGS: [u8; 2] = [0, 3];
/// Client flags NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES.
const CLIENT_FLAGS: [u8; 4] = [0, 0, 0, 3];
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Request magic 0x25609513 and simple reply magic 0x67446698.
const REQUEST_MAGIC: [u8; 4] = [0x25, 0x60, 0x95, 0x13];
const SIMPLE_REPLY_MAGIC: [u8; 4] = [0x67, 0x44, 0x66, 0x98];
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;

const DISK_BYTES: u64 = 64 << 20;

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// A byte-level client over any stream (plain TCP, or TLS after STARTTLS).
struct Wire<S: Read + Write> {
    s: S,
}

type TlsWire = Wire<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>;

impl<S: Read + Write> Wire<S> {
    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
        self.s.flush().unwrap();
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s
            .read_exact(&mut b)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        b
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_vec();
        b.extend(be32(option));
        b.extend(be32(data.len() as u32));
        b.extend(data);
        self.send(&b);
    }

    /// One option reply: (option, reply type, data), its magic checked.
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.recv(20);
        assert_eq!(h[..8], REPLY_MAGIC, "option reply magic");
        let word = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().unwrap());
        let data = self.recv(word(16) as usize);
        (word(8), word(12), data)
    }

    /// Sends `option` and returns the type of its one reply (checking it answers `option`).
    fn ask(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data);
        let (answered, reply_type, _) = self.reply();
        assert_eq!(answered, option, "the reply names the option");
        reply_type
    }

    /// NBD_OPT_GO for `name` with no information requests; the export size.
    fn go(&mut self, name: &str) -> u64 {
        let mut d = be32(name.len() as u32).to_vec();
        d.extend(name.as_bytes());
        d.extend([0, 0]);
        self.option(OPT_GO, &d);
        let mut size = None;
        loop {
            let (option, reply_type, data) = self.reply();
            assert_eq!(option, OPT_GO);
            match reply_type {
                // NBD_INFO_EXPORT: type 0, size, transmission flags.
                REP_INFO if data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()))
                }
                REP_INFO => {}
                REP_ACK => return size.expect("NBD_INFO_EXPORT before the ACK"),
                t => panic!("GO {name}: reply type {t:#x}"),
            }
        }
    }

    fn request(&mut self, command: u16, cookie: u64, offset: u64, payload: &[u8], len: u32) {
        let mut b = REQUEST_MAGIC.to_vec();
        b.extend([0, 0]);
        b.extend(command.to_be_bytes());
        b.extend(cookie.to_be_bytes());
        b.extend(offset.to_be_bytes());
        b.extend(len.to_be_bytes());
        b.extend(payload);
        self.send(&b);
    }

    /// A simple reply with error 0 for `cookie`, then `data_len` bytes of data.
    fn simple_ok(&mut self, cookie: u64, data_len: usize) -> Vec<u8> {
        let h = self.recv(16);
        assert_eq!(h[..4], SIMPLE_REPLY_MAGIC, "a simple reply");
        assert_eq!(h[4..8], [0; 4], "error field");
        assert_eq!(h[8..16], cookie.to_be_bytes());
        self.recv(data_len)
    }

    /// Writes a pattern at `offset`, reads it back, disconnects.
    fn write_read_disc(&mut self, offset: u64, seed: u8) {
        let data: Vec<u8> = (0..65536u32).map(|i| (i as u8) ^ seed).collect();
        self.request(CMD_WRITE, 1, offset, &data, data.len() as u32);
        self.simple_ok(1, 0);
        self.request(CMD_READ, 2, offset, &[], data.len() as u32);
        assert!(self.simple_ok(2, data.len()) == data, "read back");
        self.request(CMD_DISC, 3, 0, &[], 0);
    }

    /// The server closed the connection (end of stream, a reset, or a TLS alert) within
    /// the timeout; bytes before the end are skipped.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 4096];
        let deadline = std::time::Instant::now() + IO_TIMEOUT;
        while std::time::Instant::now() < deadline {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
        false
    }
}

/// Connects, checks the greeting's bytes and sends `client_flags`.
fn greet(addr: SocketAddr, client_flags: [u8; 4]) -> Wire<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut w = Wire { s };
    let g = w.recv(18);
    assert_eq!(&g[..8], NBDMAGIC);
    assert_eq!(&g[8..16], IHAVEOPT);
    assert_eq!(g[16..18], HANDSHAKE_FLAGS);
    w.send(&client_flags);
    w
}

/// A rustls client trusting `dir/ca-cert.pem`, presenting `dir/client-cert.pem` if there.
fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cert = dir.join("client-cert.pem");
    let config = if cert.exists() {
        let chain = CertificateDer::pem_file_iter(&cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("client-key.pem")).unwrap();
        b.with_client_auth_cert(chain, key).unwrap()
    } else {
        b.with_no_client_auth()
    };
    Arc::new(config)
}

/// Sends STARTTLS, expects exactly the ACK the spec describes, and wraps the socket in TLS
/// (the handshake runs on the first read or write).
fn start_tls(mut w: Wire<TcpStream>, dir: &Path) -> TlsWire {
    w.option(OPT_STARTTLS, &[]);
    let mut ack = REPLY_MAGIC.to_vec();
    ack.extend(be32(OPT_STARTTLS));
    ack.extend(be32(REP_ACK));
    ack.extend(be32(0));
    assert_eq!(w.recv(20), ack, "STARTTLS acknowledged, no data");
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(client_config(dir), name).unwrap();
    Wire {
        s: rustls::StreamOwned::new(conn, w.s),
    }
}

/// How a test server offers TLS.
#[derive(Clone, Copy)]
enum Tls {
    Off,
    On,
    Require,
    RequireVerifyPeer,
}

/// An in-process server on 127.0.0.1:0 and a Unix socket, exporting "disk" (64 MiB memory).
fn server(pki: Option<&Pki>, tls: Tls, sock_dir: &Path) -> BackgroundServer {
    server_with(pki.map(Pki::all), tls, sock_dir)
}

/// The same, with the certificates in `certs`.
fn server_with(certs: Option<PathBuf>, tls: Tls, sock_dir: &Path) -> BackgroundServer {
    let load = |required, verify| {
        let certs = certs.as_deref().expect("a certificate directory");
        Some(TlsConfig::load(certs, required, verify).unwrap())
    };
    let tls = match tls {
        Tls::Off => None,
        Tls::On => load(false, false),
        Tls::Require => load(true, false),
        Tls::RequireVerifyPeer => load(true, true),
    };
    let spec = format!("disk:size={DISK_BYTES}").parse().unwrap();
    Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: Some(sock_dir.join("nbd.sock")),
        exports: ExportRegistry::from_specs(&[spec]).unwrap(),
        tls,
    })
    .unwrap()
}

fn nbds(addr: SocketAddr, export: &str, certs: &Path) -> String {
    format!(
        "nbds://{addr}/{export}?tls-certificates={}",
        certs.display()
    )
}

/// NOTLS: STARTTLS is refused (POLICY; INVALID with data) and negotiation goes on.
#[test]
fn without_tls_starttls_is_refused_and_negotiation_continues() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server(None, Tls::Off, dir.path());
    let mut w = greet(srv.local_addr().unwrap(), CLIENT_FLAGS);
    w.option(OPT_STARTTLS, &[]);
    let (option, reply_type, message) = w.reply();
    assert_eq!((option, reply_type), (OPT_STARTTLS, REP_ERR_POLICY));
    assert!(String::from_utf8_lossy(&message).contains("--tls=off"));
    assert_eq!(
        w.ask(OPT_STARTTLS, b"x"),
        REP_ERR_INVALID,
        "STARTTLS with data"
    );
    assert_eq!(w.go("disk"), DISK_BYTES);
    w.write_read_disc(0, 1);
}

/// FORCEDTLS: before TLS every option but STARTTLS and ABORT gets TLS_REQD (its data read
/// and discarded: the next option is in step); after it, nothing does, and a second
/// STARTTLS is INVALID.
#[test]
fn require_answers_tls_reqd_until_starttls_then_serves_inside_tls() {
    let Some(pki) = Pki::generate() else { return };
    let srv = server(Some(&pki), Tls::Require, pki.dir.path());
    let addr = srv.local_addr().unwrap();
    let mut w = greet(addr, CLIENT_FLAGS);
    let mut info = be32(4).to_vec();
    info.extend(b"disk\0\0");
    for (option, data) in [
        (OPT_LIST, &[][..]),
        (OPT_INFO, &info[..]),
        (OPT_GO, &info[..]),
        (OPT_STRUCTURED_REPLY, &[][..]),
        (99, &[7u8; 100][..]),
    ] {
        w.option(option, data);
        let (answered, reply_type, message) = w.reply();
        assert_eq!((answered, reply_type), (option, REP_ERR_TLS_REQD));
        assert!(String::from_utf8_lossy(&message).contains("TLS is required"));
    }
    assert_eq!(
        w.ask(OPT_STARTTLS, b"x"),
        REP_ERR_INVALID,
        "STARTTLS with data"
    );
    let mut t = start_tls(w, &pki.anon());
    assert_eq!(t.ask(OPT_STARTTLS, &[]), REP_ERR_INVALID, "TLS twice");
    t.option(OPT_LIST, &[]);
    let (_, reply_type, data) = t.reply();
    assert_eq!(reply_type, REP_SERVER);
    assert_eq!(data, [&be32(4)[..], b"disk"].concat());
    assert_eq!(t.reply().1, REP_ACK);
    assert_eq!(t.go("disk"), DISK_BYTES);
    t.write_read_disc(1 << 20, 2);

    // EXPORT_NAME cannot carry TLS_REQD: the connection closes with no reply at all.
    let mut w = greet(addr, CLIENT_FLAGS);
    w.option(OPT_EXPORT_NAME, b"disk");
    let mut b = [0u8; 1];
    assert_eq!(w.s.read(&mut b).unwrap_or(0), 0, "closed without a reply");
    // ABORT is answered before TLS too.
    let mut w = greet(addr, CLIENT_FLAGS);
    assert_eq!(w.ask(OPT_ABORT, &[]), REP_ACK);
    assert!(w.closed());
    // A client without fixed newstyle could never start TLS.
    let mut w = greet(addr, [0, 0, 0, 2]);
    assert!(w.closed(), "dropped after its flags");
}

/// SELECTIVETLS (`--tls=on`): plain clients negotiate as usual; after STARTTLS nothing from
/// before is kept (the spec: no structured replies, no meta contexts).
#[test]
fn on_serves_plain_clients_and_starttls_forgets_earlier_options() {
    let Some(pki) = Pki::generate() else { return };
    let srv = server(Some(&pki), Tls::On, pki.dir.path());
    let addr = srv.local_addr().unwrap();
    let mut w = greet(addr, CLIENT_FLAGS);
    w.option(OPT_LIST, &[]);
    assert_eq!(w.reply().1, REP_SERVER);
    assert_eq!(w.reply().1, REP_ACK);
    assert_eq!(w.go("disk"), DISK_BYTES);
    w.write_read_disc(0, 3);

    let mut w = greet(addr, CLIENT_FLAGS);
    assert_eq!(w.ask(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
    let mut t = start_tls(w, &pki.anon());
    // SET_META_CONTEXT needs structured replies, which STARTTLS forgot.
    let mut set = be32(4).to_vec();
    set.extend(b"disk");
    set.extend(be32(1));
    set.extend(be32(15));
    set.extend(b"base:allocation");
    assert_eq!(t.ask(OPT_SET_META_CONTEXT, &set), REP_ERR_INVALID);
    assert_eq!(t.go("disk"), DISK_BYTES);
    // Without structured replies, a READ is answered with a simple reply.
    t.write_read_disc(2 << 20, 4);
}

/// Each bad handshake ends its own connection; the server keeps serving TLS and plain
/// clients.
#[test]
fn bad_tls_handshakes_end_one_connection_only() {
    let Some(pki) = Pki::generate() else { return };
    let srv = server(Some(&pki), Tls::On, pki.dir.path());
    let addr = srv.local_addr().unwrap();
    let acked = || {
        let mut w = greet(addr, CLIENT_FLAGS);
        assert_eq!(w.ask(OPT_STARTTLS, &[]), REP_ACK);
        w
    };
    let mut w = acked();
    w.send(b"GET / HTTP/1.0\r\n\r\n");
    assert!(w.closed(), "garbage instead of a ClientHello");
    drop(acked()); // hangs up right after the ACK
                   // A ClientHello sent with the STARTTLS option, before its reply: the spec makes the
                   // client wait, and the bytes the server already read would be lost; it hangs up.
    let mut w = greet(addr, CLIENT_FLAGS);
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut hello = Vec::new();
    rustls::ClientConnection::new(client_config(&pki.anon()), name)
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    let mut b = IHAVEOPT.to_vec();
    b.extend(be32(OPT_STARTTLS));
    b.extend(be32(0));
    b.extend(&hello);
    w.send(&b);
    assert_eq!(w.reply().1, REP_ACK);
    assert!(w.closed(), "pipelined ClientHello");
    // A client that does not trust the server's certificate gives up in the handshake.
    let mut t = start_tls(greet(addr, CLIENT_FLAGS), &pki.stranger());
    let e = t.s.write_all(b"IHAVEOPT").unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    // Everyone else is served.
    let mut t = start_tls(greet(addr, CLIENT_FLAGS), &pki.anon());
    assert_eq!(t.go("disk"), DISK_BYTES);
    t.write_read_disc(0, 5);
    let mut w = greet(addr, CLIENT_FLAGS);
    assert_eq!(w.go("disk"), DISK_BYTES);
    w.write_read_disc(4096, 6);
}

/// Whether negotiating over TLS with the certificates in `dir` gets as far as a LIST reply.
fn tls_client_accepted(addr: SocketAddr, dir: &Path) -> bool {
    let mut t = start_tls(greet(addr, CLIENT_FLAGS), dir);
    let mut b = IHAVEOPT.to_vec();
    b.extend(be32(OPT_LIST));
    b.extend(be32(0));
    if t.s.write_all(&b).and_then(|_| t.s.flush()).is_err() {
        return false;
    }
    // TLS 1.3: the server judges the client's certificate after the client finished its
    // side, so a refusal shows as an alert or a closed stream where the reply should be.
    let mut h = [0u8; 20];
    t.s.read_exact(&mut h).is_ok() && h[..8] == REPLY_MAGIC
}

/// nbdkit's default: client certificates are not asked for. With `--tls-verify-peer` only
/// a certificate signed by `ca-cert.pem` gets in: checked with rustls, libnbd and qemu.
#[test]
fn client_certificates_are_checked_only_with_verify_peer() {
    let Some(pki) = Pki::generate() else { return };
    let open = server(Some(&pki), Tls::Require, pki.dir.path());
    let addr = open.local_addr().unwrap();
    for dir in [pki.anon(), pki.rogue(), pki.all()] {
        assert!(tls_client_accepted(addr, &dir), "{}", dir.display());
    }
    let sock_dir = tempfile::tempdir().unwrap();
    let strict = server(Some(&pki), Tls::RequireVerifyPeer, sock_dir.path());
    let addr = strict.local_addr().unwrap();
    assert!(
        !tls_client_accepted(addr, &pki.anon()),
        "no client certificate"
    );
    assert!(
        !tls_client_accepted(addr, &pki.rogue()),
        "signed by another CA"
    );
    assert!(
        tls_client_accepted(addr, &pki.all()),
        "signed by ca-cert.pem"
    );
    // ca-crl.pem revokes that very certificate.
    let crl_sock = tempfile::tempdir().unwrap();
    let revoking = server_with(Some(pki.revoked()), Tls::RequireVerifyPeer, crl_sock.path());
    let revoking_addr = revoking.local_addr().unwrap();
    assert!(
        !tls_client_accepted(revoking_addr, &pki.all()),
        "revoked by ca-crl.pem"
    );
    if have("nbdinfo") {
        let info = |dir: &Path| {
            Command::new("nbdinfo")
                .arg(nbds(addr, "disk", dir))
                .output()
        };
        assert!(
            !info(&pki.anon()).unwrap().status.success(),
            "libnbd, no cert"
        );
        assert!(
            !info(&pki.rogue()).unwrap().status.success(),
            "libnbd, rogue cert"
        );
        let out = run(Command::new("nbdinfo").arg(nbds(addr, "disk", &pki.all())));
        assert!(out.contains("with TLS"), "{out}");
    }
    if have("qemu-io") {
        let out = run(&mut qemu_io_tls(addr, &pki.all(), &["read -P 0 0 4k"]));
        assert!(!out.contains("failed"), "{out}");
        let refused = qemu_io_tls(addr, &pki.anon(), &["read 0 4k"])
            .output()
            .unwrap();
        assert!(
            !refused.status.success(),
            "qemu without a client certificate"
        );
    }
}

/// qemu-io over TLS: `tls-creds-x509` (client endpoint) on an `nbd` node.
fn qemu_io_tls(addr: SocketAddr, dir: &Path, commands: &[&str]) -> Command {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--object")
        .arg(format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            dir.display()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,host={},port={},export=disk,tls-creds=tls0",
            addr.ip(),
            addr.port()
        ));
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd
}

/// qemu-io writes and reads through TLS; an independent client reads the bytes back.
#[test]
fn qemu_io_over_tls() {
    if !have("qemu-io") {
        return;
    }
    let Some(pki) = Pki::generate() else { return };
    let srv = server(Some(&pki), Tls::Require, pki.dir.path());
    let addr = srv.local_addr().unwrap();
    let out = run(&mut qemu_io_tls(
        addr,
        &pki.anon(),
        &[
            "write -P 0x5c 1M 256k",
            "write -z 1088k 64k",
            "read -P 0x5c 1M 64k",
            "read -P 0 1088k 64k",
            "flush",
        ],
    ));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let mut t = start_tls(greet(addr, CLIENT_FLAGS), &pki.anon());
    t.go("disk");
    t.request(CMD_READ, 9, 1 << 20, &[], 256 << 10);
    let got = t.simple_ok(9, 256 << 10);
    assert!(got[..64 << 10] == [0x5c; 64 << 10][..], "written by qemu");
    assert!(
        got[64 << 10..128 << 10] == [0; 64 << 10][..],
        "zeroed by qemu"
    );
    assert!(got[128 << 10..] == [0x5c; 128 << 10][..], "written by qemu");
}

/// libnbd's tools over `nbds://` (TCP) and `nbds+unix://`, on a server where plain clients
/// work too (`--tls=on`).
#[test]
fn nbdinfo_and_nbdcopy_over_nbds() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let Some(pki) = Pki::generate() else { return };
    let srv = server(Some(&pki), Tls::On, pki.dir.path());
    let addr = srv.local_addr().unwrap();
    let out = run(Command::new("nbdinfo").arg(nbds(addr, "disk", &pki.anon())));
    assert!(
        out.contains("with TLS") && out.contains("export-size: 67108864"),
        "{out}"
    );
    let out = run(Command::new("nbdinfo").arg(format!("nbd://{addr}/disk")));
    assert!(out.contains("without TLS"), "{out}");
    let sock = pki.dir.path().join("nbd.sock");
    let unix = format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        sock.display(),
        pki.anon().display()
    );
    let out = run(Command::new("nbdinfo").arg(&unix));
    assert!(out.contains("with TLS"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data: Vec<u8> = (0..DISK_BYTES as u32)
        .map(|i| (i ^ (i >> 11)) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(&src)
        .arg(nbds(addr, "disk", &pki.anon())));
    let back = dir.path().join("back.img");
    run(Command::new("nbdcopy").arg(&unix).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip over TLS"
    );
}

/// A child process killed when the test ends, passed or not.
/// Starts the binary with `args` (a start-up deadline: a server that never says it listens
/// fails the test rather than hang it); returns it, its address and its start-up lines.
fn start_binary(args: &[&str]) -> (Running, SocketAddr, Vec<String>) {
    let mut all = vec!["--export".to_string(), "disk:size=64M".to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let server = Running::start(&all);
    let lines = server.log().lines().map(str::to_owned).collect();
    let addr = server.addr;
    (server, addr, lines)
}

/// `nbd-server --tls=require`: plain libnbd and qemu clients are refused, and libnbd hears
/// why; TLS clients are served.
#[test]
fn require_refuses_plain_clients_with_a_reason() {
    if !have("nbdinfo") || !have("qemu-io") {
        return;
    }
    let Some(pki) = Pki::generate() else { return };
    let certs = pki.all();
    let certs = certs.to_str().unwrap();
    let (_server, addr, lines) = start_binary(&["--tls=require", "--tls-certificates", certs]);
    assert!(
        lines.iter().any(|l| l.contains("TLS required")),
        "{lines:?}"
    );
    let plain = Command::new("nbdinfo")
        .env("LIBNBD_DEBUG", "1")
        .arg(format!("nbd://{addr}/disk"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success(), "plain nbdinfo was served");
    assert!(
        err.contains("server error message: TLS is required"),
        "libnbd shows the server's reason: {err}"
    );
    let qemu = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k"])
        .arg(format!("nbd://{addr}/disk"))
        .output()
        .unwrap();
    assert!(!qemu.status.success(), "plain qemu-io was served");
    let out = run(Command::new("nbdinfo").arg(nbds(addr, "disk", &pki.anon())));
    assert!(out.contains("with TLS"), "{out}");
}

/// Every inconsistent TLS setup is refused at start, naming what is wrong.
#[test]
fn bad_tls_setups_fail_at_start_with_a_clear_message() {
    let Some(pki) = Pki::generate() else { return };
    let mismatched = pki.dir.path().join("mismatched");
    std::fs::create_dir(&mismatched).unwrap();
    for f in ["ca-cert.pem", "server-cert.pem"] {
        std::fs::copy(pki.all().join(f), mismatched.join(f)).unwrap();
    }
    std::fs::copy(
        pki.all().join("client-key.pem"),
        mismatched.join("server-key.pem"),
    )
    .unwrap();
    let dir = |p: PathBuf| p.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--tls=on".into()], "--tls-certificates"),
        (vec!["--tls=require".into()], "--tls-certificates"),
        (
            vec!["--tls-certificates".into(), dir(pki.all())],
            "--tls=on",
        ),
        (vec!["--tls-verify-peer".into()], "--tls=on"),
        (
            vec![
                "--tls=on".into(),
                "--tls-certificates".into(),
                dir(pki.anon()),
            ],
            "server-cert.pem",
        ),
        (
            vec![
                "--tls=on".into(),
                "--tls-certificates".into(),
                dir(mismatched),
            ],
            "key",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--export", "d:size=1M"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let help = run(Command::new(BIN).arg("--help"));
    for needle in [
        "--tls <MODE>",
        "--tls-certificates",
        "--tls-verify-peer",
        "nbds://",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}
