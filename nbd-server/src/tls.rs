//! TLS for NBD (`NBD_OPT_STARTTLS`) with x509 certificates, laid out the way nbdkit and
//! qemu-nbd read them: a directory holding `ca-cert.pem`, `server-cert.pem` and
//! `server-key.pem` (and, optionally, `ca-crl.pem`).
//!
//! Client certificates follow nbdkit: they are neither asked for nor checked unless the
//! server is started with `--tls-verify-peer`; then every TLS client must present a
//! certificate that `ca-cert.pem` signed (and `ca-crl.pem`, when present, does not revoke).
//! (qemu-nbd's `tls-creds-x509` defaults to `verify-peer=on` instead; a user of nbdkit's
//! layout and flags gets nbdkit's behaviour here, and a qemu user adds the flag.)
//!
//! The handshake itself runs in [`crate::server`] once [`crate::handshake`] has answered
//! `NBD_OPT_STARTTLS` with an ACK; option haggling then restarts inside TLS, without a new
//! greeting. The stream halves of a TLS connection implement the same [`VectoredRead`] and
//! [`VectoredWrite`] traits as the plain sockets, so the transmission phase is the same code;
//! the plain path is compiled separately for its socket types and pays nothing for TLS.

use std::io::{self, IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadHalf, WriteHalf};

use crate::connection::VectoredRead;
use crate::lent::VectoredWrite;

/// The CA certificate: always loaded; it signs the client certificates `--tls-verify-peer` accepts.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The server's certificate (chain), leaf first.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
/// The server's private key (PKCS#8, PKCS#1 or SEC1).
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// Revoked client certificates; optional, used with `--tls-verify-peer`.
pub const CA_CRL_FILE: &str = "ca-crl.pem";

/// Why the certificate directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no {what} in it", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("{}: {source}", path.display())]
    Certificate {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("the server certificate and key: {0}")]
    Config(rustls::Error),
}

/// TLS as one server offers it: the credentials and whether plain clients are turned away.
#[derive(Clone)]
pub struct TlsConfig {
    /// `--tls=require` (FORCEDTLS in the spec): nothing but STARTTLS and ABORT before TLS.
    /// Otherwise (`--tls=on`, SELECTIVETLS with no TLS-only export) clients choose.
    pub required: bool,
    /// Client certificates are asked for and checked against `ca-cert.pem`.
    pub verify_peer: bool,
    /// Where the certificates came from (for messages).
    pub dir: PathBuf,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("required", &self.required)
            .field("verify_peer", &self.verify_peer)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn revocations(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let read = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)
}

impl TlsConfig {
    /// Loads the certificates from `dir` (see the module documentation for the files). Every
    /// problem is reported here, at start-up, naming the file; none waits for a client.
    pub fn load(dir: &Path, required: bool, verify_peer: bool) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_path = dir.join(CA_CERT_FILE);
        let mut roots = rustls::RootCertStore::empty();
        for cert in certificates(&ca_path)? {
            roots.add(cert).map_err(|source| TlsError::Certificate {
                path: ca_path.clone(),
                source,
            })?;
        }
        let chain = certificates(&dir.join(SERVER_CERT_FILE))?;
        let key_path = dir.join(SERVER_KEY_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| TlsError::Read {
            path: key_path.clone(),
            source,
        })?;
        let key = match key {
            PrivateKeyDer::Sec1(k) => match sec1_scalar_unpadded(k.secret_sec1_der()) {
                Some(fixed) => PrivateKeyDer::Sec1(fixed.into()),
                None => PrivateKeyDer::Sec1(k),
            },
            other => other,
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = if verify_peer {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .with_crls(revocations(&dir.join(CA_CRL_FILE))?)
            .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        // `with_single_cert` also checks that the key belongs to the certificate.
        let config = builder
            .with_single_cert(chain, key)
            .map_err(TlsError::Config)?;
        Ok(TlsConfig {
            required,
            verify_peer,
            dir: dir.to_owned(),
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Runs the server side of the TLS handshake on `stream`.
    pub(crate) async fn accept<S>(&self, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self.acceptor.accept(stream).await?;
        let (_, state) = tls.get_ref();
        tracing::debug!(
            version = ?state.protocol_version(),
            suite = ?state.negotiated_cipher_suite().map(|s| s.suite()),
            client_certificate = state.peer_certificates().is_some(),
            "TLS established"
        );
        Ok(tls)
    }
}

/// Reads one DER item at the start of `b`: (tag, content, what follows).
fn der_item(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (first as usize, b)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 2 || b.len() < n {
            return None;
        }
        let (len, b) = b.split_at(n);
        (len.iter().fold(0, |a, &x| a << 8 | x as usize), b)
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

fn der_push(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(content);
}

/// GnuTLS 3.7's `certtool --generate-privkey --key-type=ecdsa` writes the private scalar of
/// about half its keys with a leading zero byte (33 bytes for P-256, as if it were a signed
/// INTEGER); RFC 5915 makes it exactly the field's size, and ring refuses such a key
/// ("failed to parse private key"), while GnuTLS and OpenSSL read it. Returns the key in
/// the RFC's form when it has that zero byte; `None` leaves the key as it is.
fn sec1_scalar_unpadded(der: &[u8]) -> Option<Vec<u8>> {
    let (0x30, body, []) = der_item(der)? else {
        return None;
    };
    let (0x02, version, rest) = der_item(body)? else {
        return None;
    };
    let (0x04, scalar, params_and_public) = der_item(rest)? else {
        return None;
    };
    // The field size is half the uncompressed public point (0x04 || X || Y), found in the
    // [1] BIT STRING (after its unused-bits byte).
    let mut field_bytes = None;
    let mut tail = params_and_public;
    while let Some((tag, content, next)) = der_item(tail) {
        if let (0xa1, Some((0x03, [0, 4, point @ ..], _))) = (tag, der_item(content)) {
            field_bytes = Some(point.len() / 2);
        }
        tail = next;
    }
    if scalar.len() != field_bytes? + 1 || scalar[0] != 0 {
        return None;
    }
    let mut body = Vec::with_capacity(der.len());
    der_push(&mut body, 0x02, version);
    der_push(&mut body, 0x04, &scalar[1..]);
    body.extend_from_slice(params_and_public);
    let mut out = Vec::with_capacity(der.len());
    der_push(&mut out, 0x30, &body);
    Some(out)
}

/// A server-side TLS stream over a socket.
pub type TlsStream<S> = tokio_rustls::server::TlsStream<S>;

impl<S> VectoredRead for ReadHalf<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Decrypted bytes come out of rustls's buffer one copy at a time anyway, so this fills
    /// the first buffer with an ordinary read; the caller loops.
    async fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(first) => self.read(first).await,
            None => Ok(0),
        }
    }
}

impl<S> VectoredWrite for WriteHalf<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static,
{
    /// Bytes must be encrypted before they reach the socket: READ replies are not lent.
    const WRITES_IN_PLACE: bool = false;

    fn try_write_vectored(&self, _bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Never called (WRITES_IN_PLACE is false); "would block" keeps any caller correct,
        // as it then queues the bytes for an ordinary write.
        Err(io::ErrorKind::WouldBlock.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 key as GnuTLS 3.7's certtool wrote it (a 33-byte scalar starting with 0x00).
    const GNUTLS_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHgCAQEEIQDBjHAbr2Czn9UChZFER3w55KrN1BDaZszxj4av25bcGKAKBggqhkjO
PQMBB6FEA0IABMGD3+u1cP6pz3wn7+LosWiosXA9uA2e9QgeQn3f45AT98b5x7Ic
fyjEO8qHIv7SFolLNFkrQ2MCeIg27PvJNEM=
-----END EC PRIVATE KEY-----";
    /// The same key rewritten by `openssl ec` (the RFC 5915 form: a 32-byte scalar).
    const OPENSSL_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIMGMcBuvYLOf1QKFkURHfDnkqs3UENpmzPGPhq/bltwYoAoGCCqGSM49
AwEHoUQDQgAEwYPf67Vw/qnPfCfv4uixaKixcD24DZ71CB5Cfd/jkBP3xvnHshx/
KMQ7yoci/tIWiUs0WStDYwJ4iDbs+8k0Qw==
-----END EC PRIVATE KEY-----";

    fn sec1(pem: &str) -> Vec<u8> {
        match PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap() {
            PrivateKeyDer::Sec1(k) => k.secret_sec1_der().to_vec(),
            other => panic!("not SEC1: {other:?}"),
        }
    }

    #[test]
    fn gnutls_padded_ecdsa_keys_become_what_openssl_writes() {
        let (gnutls, openssl) = (sec1(GNUTLS_KEY), sec1(OPENSSL_KEY));
        let usable = |der: &[u8]| {
            let key = PrivateKeyDer::Sec1(der.to_vec().into());
            rustls::crypto::ring::sign::any_supported_type(&key).is_ok()
        };
        assert!(!usable(&gnutls), "ring refuses the padded scalar");
        let fixed = sec1_scalar_unpadded(&gnutls).expect("rewritten");
        assert_eq!(fixed, openssl);
        assert!(usable(&fixed));
        assert_eq!(sec1_scalar_unpadded(&openssl), None, "already right");
        assert_eq!(sec1_scalar_unpadded(&gnutls[..40]), None, "truncated");
        assert_eq!(sec1_scalar_unpadded(b""), None);
    }
}
