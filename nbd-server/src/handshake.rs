//! Fixed-newstyle negotiation: greeting, client flags, and option haggling until the client
//! picks an export (EXPORT_NAME or GO), aborts, or breaks a rule.
//!
//! Every option the server does not implement, known or not, has its payload read and
//! discarded and is answered `NBD_REP_ERR_UNSUP`; negotiation continues. An option longer
//! than [`OPTION_BYTES_MAX`] is answered `NBD_REP_ERR_TOO_BIG`; its payload is discarded if it
//! is at most [`OPTION_DISCARD_BYTES_MAX`], otherwise the connection is dropped, because
//! staying in step would mean reading up to 4 GiB the server will never use.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::{Export, ExportRegistry};
use crate::proto::*;
use crate::server::PAYLOAD_BYTES_MAX;

/// Longest option payload the server reads and parses.
pub const OPTION_BYTES_MAX: u32 = 64 * 1024;
/// Longest oversized option payload the server still reads and throws away to stay in step.
pub const OPTION_DISCARD_BYTES_MAX: u32 = 16 * 1024 * 1024;
/// Most options one connection may send before it is dropped.
pub const OPTIONS_PER_CONNECTION_MAX: u32 = 1024;
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

/// Runs negotiation on a fresh connection. `Ok(session)` means the transmission phase starts.
pub async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    exports: &ExportRegistry,
) -> Result<Session, HandshakeError>
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
    let no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // (export name, base:allocation selected) from the last SET_META_CONTEXT.
    let mut meta: Option<(String, bool)> = None;

    for _ in 0..OPTIONS_PER_CONNECTION_MAX {
        let mut hb = [0u8; OPTION_HEADER_BYTES];
        rd.read_exact(&mut hb).await?;
        let OptionHeader { option, length } = OptionHeader::decode(&hb)?;
        tracing::debug!(option = option_name(option), length, "option");
        if length > OPTION_BYTES_MAX {
            if option == NBD_OPT_EXPORT_NAME {
                // EXPORT_NAME cannot be answered with an error; a name this long is invalid.
                return Err(HandshakeError::BadExportName);
            }
            let msg =
                format!("option data of {length} bytes exceeds the {OPTION_BYTES_MAX}-byte limit");
            send(wr, option, NBD_REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            wr.flush().await?;
            if length > OPTION_DISCARD_BYTES_MAX {
                return Err(HandshakeError::OptionTooBig { option, length });
            }
            discard(rd, length as u64).await?;
            continue;
        }
        let mut data = vec![0u8; length as usize];
        rd.read_exact(&mut data).await?;

        match option {
            NBD_OPT_EXPORT_NAME => {
                let name = parse_string(&data).map_err(|_| HandshakeError::BadExportName)?;
                let Some(export) = exports.lookup(&name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                let base_allocation = matches!(&meta, Some((n, true)) if *n == name);
                let flags = export.transmission_flags(structured);
                let mut out = Vec::new();
                encode_export_name_reply(&mut out, export.size(), flags, no_zeroes);
                wr.write_all(&out).await?;
                wr.flush().await?;
                return Ok(Session {
                    export,
                    structured,
                    base_allocation,
                    transmission_flags: flags,
                });
            }
            NBD_OPT_ABORT => {
                // The client may already have closed; an error sending the ACK changes nothing.
                let _ = send(wr, option, NBD_REP_ACK, &[]).await;
                let _ = wr.flush().await;
                return Err(HandshakeError::Aborted);
            }
            NBD_OPT_LIST => {
                if !data.is_empty() {
                    send(
                        wr,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    )
                    .await?;
                } else {
                    for e in exports.iter() {
                        send(wr, option, NBD_REP_SERVER, &encode_rep_server(&e.name)).await?;
                    }
                    send(wr, option, NBD_REP_ACK, &[]).await?;
                }
            }
            NBD_OPT_INFO | NBD_OPT_GO => {
                let req = match InfoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send(wr, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        wr.flush().await?;
                        continue;
                    }
                };
                let Some(export) = exports.lookup(&req.name) else {
                    let msg = format!("no export named {:?}", req.name);
                    send(wr, option, NBD_REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    wr.flush().await?;
                    continue;
                };
                let flags = export.transmission_flags(structured);
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
                wr.flush().await?;
                if option == NBD_OPT_GO {
                    // Meta contexts count only if they were set for this very export name.
                    let base_allocation = matches!(&meta, Some((n, true)) if *n == req.name);
                    return Ok(Session {
                        export,
                        structured,
                        base_allocation,
                        transmission_flags: flags,
                    });
                }
            }
            NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send(
                        wr,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    )
                    .await?;
                } else {
                    structured = true;
                    send(wr, option, NBD_REP_ACK, &[]).await?;
                }
            }
            NBD_OPT_LIST_META_CONTEXT | NBD_OPT_SET_META_CONTEXT => {
                let set = option == NBD_OPT_SET_META_CONTEXT;
                if set && !structured {
                    send(
                        wr,
                        option,
                        NBD_REP_ERR_INVALID,
                        b"negotiate NBD_OPT_STRUCTURED_REPLY first",
                    )
                    .await?;
                    wr.flush().await?;
                    continue;
                }
                let req = match MetaContextRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        send(wr, option, NBD_REP_ERR_INVALID, e.to_string().as_bytes()).await?;
                        wr.flush().await?;
                        continue;
                    }
                };
                if exports.lookup(&req.export).is_none() {
                    let msg = format!("no export named {:?}", req.export);
                    send(wr, option, NBD_REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    wr.flush().await?;
                    continue;
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
                    send(
                        wr,
                        option,
                        NBD_REP_META_CONTEXT,
                        &encode_rep_meta_context(id, NBD_META_CONTEXT_BASE_ALLOCATION),
                    )
                    .await?;
                }
                send(wr, option, NBD_REP_ACK, &[]).await?;
                if set {
                    meta = Some((req.export, base));
                }
            }
            _ => {
                let msg = format!(
                    "{} ({option}) is not supported by this server",
                    option_name(option)
                );
                send(wr, option, NBD_REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
        wr.flush().await?;
    }
    Err(HandshakeError::TooManyOptions)
}
