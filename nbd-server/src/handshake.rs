//! Fixed-newstyle negotiation: greeting, client flags, and option haggling until the client
//! picks an export (EXPORT_NAME or GO), aborts, starts TLS, or breaks a rule.
//!
//! Every option the server does not implement, known or not, has its payload read and
//! discarded and is answered `NBD_REP_ERR_UNSUP`; negotiation continues. An option longer
//! than [`OPTION_BYTES_MAX`] is answered `NBD_REP_ERR_TOO_BIG`; its payload is discarded if it
//! is at most [`OPTION_DISCARD_BYTES_MAX`], otherwise the connection is dropped, because
//! staying in step would mean reading up to 4 GiB the server will never use.
//!
//! TLS (the spec's "TLS support" section; [`TlsPhase`] says where a connection stands):
//! - `--tls=off` (NOTLS): `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_POLICY`, as nbdkit
//!   does when TLS is switched off, and nothing is ever answered `NBD_REP_ERR_TLS_REQD`.
//! - `--tls=on` (SELECTIVETLS, no export TLS-only): plain clients negotiate as without TLS;
//!   `NBD_OPT_STARTTLS` is acknowledged and the caller runs the TLS handshake.
//! - `--tls=require` (FORCEDTLS): before TLS, every option but `STARTTLS` and `ABORT` is
//!   answered `NBD_REP_ERR_TLS_REQD` (its payload discarded), and `NBD_OPT_EXPORT_NAME`, which
//!   cannot carry an error, drops the connection. A client without
//!   `NBD_FLAG_C_FIXED_NEWSTYLE` cannot start TLS and is dropped after its flags.
//! - `STARTTLS` with data is `NBD_REP_ERR_INVALID`; so is a second one once TLS runs.
//!
//! After the ACK to `STARTTLS` the caller upgrades the socket and calls [`haggle`] again:
//! option haggling restarts inside TLS, without a new greeting, and with nothing kept from
//! before (structured replies and meta contexts must be asked for again, as the spec says).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::{Export, ExportRegistry};
use crate::limits::{
    OPTIONS_PER_CONNECTION_MAX, OPTION_BYTES_MAX, OPTION_DISCARD_BYTES_MAX, PAYLOAD_BYTES_MAX,
};
use crate::proto::*;
/// Context id of `base:allocation` in NBD_REP_META_CONTEXT after SET_META_CONTEXT.
pub const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;
/// The smallest block size advertised: byte-granular requests are fine.
pub const BLOCK_SIZE_MIN_BYTES: u32 = 1;
/// The preferred block size advertised (the backends' block).
pub const BLOCK_SIZE_PREFERRED_BYTES: u32 = 4096;

/// What negotiation settled, for the transmission phase.
#[derive(Debug, Clone)]
pub struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `base:allocation` was selected with SET_META_CONTEXT for this export.
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

/// How option haggling ended, when it did not fail.
#[derive(Debug)]
pub enum Negotiated {
    /// The client chose an export: the transmission phase starts.
    Session(Session),
    /// `NBD_OPT_STARTTLS` was acknowledged: the next bytes are the client's TLS handshake.
    StartTls,
}

/// Where TLS stands on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// The server offers no TLS (`--tls=off`).
    Off,
    /// TLS is offered and not running yet; `required` under `--tls=require`.
    Offered { required: bool },
    /// TLS runs on this connection.
    Running,
}

/// What the client's flags said, and how many options it sent: kept across STARTTLS, which
/// restarts option haggling but not the greeting.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
    options: u32,
}

/// Why negotiation ended without a session.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("client flags {0:#x} include unknown bits")]
    ClientFlags(u32),
    #[error("more than {OPTIONS_PER_CONNECTION_MAX} options")]
    TooManyOptions,
    #[error("option {option} has {length} bytes of data, more than {OPTION_DISCARD_BYTES_MAX} can be discarded")]
    OptionTooBig { option: u32, length: u32 },
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME with an invalid name")]
    BadExportName,
    #[error("client aborted negotiation")]
    Aborted,
    #[error("NBD_OPT_EXPORT_NAME before TLS, and this server requires TLS (--tls=require)")]
    TlsRequired,
    #[error("the client cannot start TLS (no NBD_FLAG_C_FIXED_NEWSTYLE), and this server requires TLS (--tls=require)")]
    TlsImpossible,
    #[error("the client sent {0} bytes after NBD_OPT_STARTTLS before reading its reply")]
    DataBeforeTls(usize),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
}

async fn send<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_BYTES + data.len());
    encode_option_reply(&mut out, option, reply_type, data);
    wr.write_all(&out).await
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> std::io::Result<()> {
    let mut sink = [0u8; 8192];
    while n > 0 {
        let m = n.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..m]).await?;
        n -= m as u64;
    }
    Ok(())
}

/// Sends the greeting and reads the client's flags. Under `--tls=require` a client that
/// cannot start TLS (no fixed newstyle) is turned away here: the spec keeps such a client in
/// NOTLS mode, which the server refuses to serve.
pub async fn greet<R, W>(rd: &mut R, wr: &mut W, tls: TlsPhase) -> Result<Client, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&encode_greeting(
        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES,
    ))
    .await?;
    wr.flush().await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & !NBD_CLIENT_FLAGS_KNOWN != 0 {
        return Err(HandshakeError::ClientFlags(client_flags));
    }
    let fixed_newstyle = client_flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0;
    if tls == (TlsPhase::Offered { required: true }) && !fixed_newstyle {
        return Err(HandshakeError::TlsImpossible);
    }
    Ok(Client {
        fixed_newstyle,
        no_zeroes: client_flags & NBD_FLAG_C_NO_ZEROES != 0,
        options: 0,
    })
}

/// Option haggling, from the first option after the greeting (or after the TLS handshake)
/// until the client picks an export or STARTTLS is acknowledged.
pub async fn haggle<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &ExportRegistry,
    client: &mut Client,
    tls: TlsPhase,
) -> Result<Negotiated, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut state = Haggle {
        exports,
        tls,
        client: *client,
        structured: false,
        meta: None,
    };
    while client.options < OPTIONS_PER_CONNECTION_MAX {
        client.options += 1;
        let mut hb = [0u8; OPTION_HEADER_BYTES];
        rd.read_exact(&mut hb).await?;
        let OptionHeader { option, length } = OptionHeader::decode(&hb)?;
        tracing::debug!(option = option_name(option), length, ?tls, "option");
        if tls == (TlsPhase::Offered { required: true })
            && !matches!(option, NBD_OPT_STARTTLS | NBD_OPT_ABORT)
        {
            if option == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            let msg = "TLS is required: send NBD_OPT_STARTTLS first (--tls=require)";
            refuse_unread(rd, wr, option, length, NBD_REP_ERR_TLS_REQD, msg).await?;
            continue;
        }
        if length > OPTION_BYTES_MAX {
            if option == NBD_OPT_EXPORT_NAME {
                // EXPORT_NAME cannot be answered with an error; a name this long is invalid.
                return Err(HandshakeError::BadExportName);
            }
            let msg =
                format!("option data of {length} bytes exceeds the {OPTION_BYTES_MAX}-byte limit");
            refuse_unread(rd, wr, option, length, NBD_REP_ERR_TOO_BIG, &msg).await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        rd.read_exact(&mut data).await?;
        if let Some(done) = state.answer(wr, option, data).await? {
            return Ok(done);
        }
        wr.flush().await?;
    }
    Err(HandshakeError::TooManyOptions)
}

/// Answers an option with an error before its data was read, then discards the data (or
/// drops the connection when there is too much of it to read).
async fn refuse_unread<R, W>(
    rd: &mut R,
    wr: &mut W,
    option: u32,
    length: u32,
    reply_type: u32,
    message: &str,
) -> Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send(wr, option, reply_type, message.as_bytes()).await?;
    wr.flush().await?;
    if length > OPTION_DISCARD_BYTES_MAX {
        return Err(HandshakeError::OptionTooBig { option, length });
    }
    discard(rd, length as u64).await?;
    Ok(())
}

/// Negotiation state of one round of option haggling (reset by STARTTLS).
struct Haggle<'a> {
    exports: &'a ExportRegistry,
    tls: TlsPhase,
    client: Client,
    structured: bool,
    /// (export name, base:allocation selected) from the last SET_META_CONTEXT.
    meta: Option<(String, bool)>,
}

impl Haggle<'_> {
    /// Answers one option whose data was read; `Some` ends haggling.
    async fn answer<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: Vec<u8>,
    ) -> Result<Option<Negotiated>, HandshakeError> {
        match option {
            NBD_OPT_EXPORT_NAME => return self.export_name(wr, &data).await.map(Some),
            NBD_OPT_ABORT => {
                // The client may already have closed; an error sending the ACK changes nothing.
                let _ = send(wr, option, NBD_REP_ACK, &[]).await;
                let _ = wr.flush().await;
                return Err(HandshakeError::Aborted);
            }
            NBD_OPT_STARTTLS => return self.start_tls(wr, &data).await,
            NBD_OPT_LIST => self.list(wr, &data).await?,
            NBD_OPT_INFO | NBD_OPT_GO => return self.info(wr, option, &data).await,
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    let msg = b"NBD_OPT_STRUCTURED_REPLY takes no data";
                    send(wr, option, NBD_REP_ERR_INVALID, msg).await?;
                } else {
                    self.structured = true;
                    send(wr, option, NBD_REP_ACK, &[]).await?;
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                self.meta_context(wr, option, &data).await?
            }
            _ => {
                let msg = format!(
                    "{} ({option}) is not supported by this server",
                    option_name(option)
                );
                send(wr, option, NBD_REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
        Ok(None)
    }

    async fn export_name<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        data: &[u8],
    ) -> Result<Negotiated, HandshakeError> {
        let name = parse_string(data).map_err(|_| HandshakeError::BadExportName)?;
        let Some(export) = self.exports.lookup(&name) else {
            return Err(HandshakeError::UnknownExport(name));
        };
        let base_allocation = matches!(&self.meta, Some((n, true)) if *n == name);
        let flags = export.transmission_flags(self.structured);
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, export.size(), flags, self.client.no_zeroes);
        wr.write_all(&out).await?;
        wr.flush().await?;
        Ok(Negotiated::Session(Session {
            export,
            structured: self.structured,
            base_allocation,
            transmission_flags: flags,
        }))
    }

    /// `NBD_OPT_STARTTLS`: acknowledged only where TLS is offered and not yet running.
    async fn start_tls<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        data: &[u8],
    ) -> Result<Option<Negotiated>, HandshakeError> {
        let option = NBD_OPT_STARTTLS;
        let (reply, msg) = match self.tls {
            _ if !data.is_empty() => (NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"),
            TlsPhase::Off => (
                NBD_REP_ERR_POLICY,
                "TLS is not enabled on this server (--tls=off)",
            ),
            TlsPhase::Running => (
                NBD_REP_ERR_INVALID,
                "TLS is already running on this connection",
            ),
            TlsPhase::Offered { .. } if !self.client.fixed_newstyle => (
                NBD_REP_ERR_POLICY,
                "TLS needs fixed newstyle negotiation (NBD_FLAG_C_FIXED_NEWSTYLE)",
            ),
            TlsPhase::Offered { .. } => {
                send(wr, option, NBD_REP_ACK, &[]).await?;
                wr.flush().await?;
                return Ok(Some(Negotiated::StartTls));
            }
        };
        send(wr, option, reply, msg.as_bytes()).await?;
        Ok(None)
    }

    async fn list<W: AsyncWrite + Unpin>(&self, wr: &mut W, data: &[u8]) -> std::io::Result<()> {
        let option = NBD_OPT_LIST;
        if !data.is_empty() {
            return send(
                wr,
                option,
                NBD_REP_ERR_INVALID,
                b"NBD_OPT_LIST takes no data",
            )
            .await;
        }
        for e in self.exports.iter() {
            send(wr, option, NBD_REP_SERVER, &encode_rep_server(&e.name)).await?;
        }
        send(wr, option, NBD_REP_ACK, &[]).await
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`; `Some` when GO succeeded.
    async fn info<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Negotiated>, HandshakeError> {
        let req = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                send(wr, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                return Ok(None);
            }
        };
        let Some(export) = self.exports.lookup(&req.name) else {
            let msg = format!("no export named {:?}", req.name);
            send(wr, option, NBD_REP_ERR_UNKNOWN, msg.as_bytes()).await?;
            return Ok(None);
        };
        let flags = export.transmission_flags(self.structured);
        let info = Info::Export {
            size: export.size(),
            transmission_flags: flags,
        };
        send(wr, option, NBD_REP_INFO, &info.encode()).await?;
        let mut sent = Vec::new();
        for &r in &req.requests {
            if sent.contains(&r) {
                continue;
            }
            sent.push(r);
            let info = match r {
                NBD_INFO_NAME => Info::Name(export.name.clone()),
                NBD_INFO_DESCRIPTION => match &export.description {
                    Some(d) => Info::Description(d.clone()),
                    None => continue,
                },
                NBD_INFO_BLOCK_SIZE => Info::BlockSize {
                    minimum: BLOCK_SIZE_MIN_BYTES,
                    preferred: BLOCK_SIZE_PREFERRED_BYTES,
                    maximum: PAYLOAD_BYTES_MAX,
                },
                _ => continue, // unknown info requests are ignored, per the spec
            };
            send(wr, option, NBD_REP_INFO, &info.encode()).await?;
        }
        send(wr, option, NBD_REP_ACK, &[]).await?;
        if option != NBD_OPT_GO {
            return Ok(None);
        }
        wr.flush().await?;
        // Meta contexts count only if they were set for this very export name.
        let base_allocation = matches!(&self.meta, Some((n, true)) if *n == req.name);
        Ok(Some(Negotiated::Session(Session {
            export,
            structured: self.structured,
            base_allocation,
            transmission_flags: flags,
        })))
    }

    async fn meta_context<W: AsyncWrite + Unpin>(
        &mut self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        let set = option == NBD_OPT_SET_META_CONTEXT;
        if set && !self.structured {
            let msg = b"negotiate NBD_OPT_STRUCTURED_REPLY first";
            return send(wr, option, NBD_REP_ERR_INVALID, msg).await;
        }
        let req = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return send(wr, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes()).await,
        };
        if self.exports.lookup(&req.export).is_none() {
            let msg = format!("no export named {:?}", req.export);
            return send(wr, option, NBD_REP_ERR_UNKNOWN, msg.as_bytes()).await;
        }
        let base = if req.queries.is_empty() {
            !set // LIST with no query lists everything; SET with none selects nothing
        } else {
            req.queries
                .iter()
                .any(|q| q == NBD_META_CONTEXT_BASE_ALLOCATION || (!set && q == "base:"))
        };
        if base {
            let id = if set { BASE_ALLOCATION_CONTEXT_ID } else { 0 };
            let reply = encode_rep_meta_context(id, NBD_META_CONTEXT_BASE_ALLOCATION);
            send(wr, option, NBD_REP_META_CONTEXT, &reply).await?;
        }
        send(wr, option, NBD_REP_ACK, &[]).await?;
        if set {
            self.meta = Some((req.export, base));
        }
        Ok(())
    }
}
