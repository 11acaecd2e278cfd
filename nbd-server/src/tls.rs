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
    Certificate { path: PathBuf, source: rustls::Error },
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
            roots
                .add(cert)
                .map_err(|source| TlsError::Certificate {
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
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?;
        let builder = if verify_peer {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
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
