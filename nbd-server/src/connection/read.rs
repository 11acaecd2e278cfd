//! Reading the next request off the socket: its header, and for a WRITE its payload, received
//! into the buffer the backend hands out ([`Backend::write_buffer`]) or, past
//! [`PAYLOAD_BYTES_MAX`], read and thrown away to stay in step.
//!
//! [`Backend::write_buffer`]: crate::backend::Backend::write_buffer

use std::io;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, BufReader};

use super::admit::Held;
use super::stop::Stop;
use super::Connection;
use crate::backend::{Block, Form, WriteData, BLOCK_BYTES};
use crate::lent::VectoredWrite;
use crate::limits::{PAYLOAD_BYTES_MAX, PAYLOAD_DISCARD_BYTES_MAX, READV_SLICES_MAX};
use crate::proto::*;

/// After a WRITE at least this long, the next request header is read by itself: a
/// read-buffer fill would take in up to [`crate::limits::READ_BUFFER_BYTES`] of the next
/// payload, to be copied again into its blocks.
pub const HEADER_ONLY_AFTER_BYTES: u32 = 256 * 1024;

/// A socket's read half that can also read into many buffers with one call (`readv`).
pub trait VectoredRead: AsyncRead + Unpin + Send + 'static {
    /// Reads what arrives into `bufs`, in order, waiting until at least one byte came
    /// (0 at the end of the stream). `bufs` is never all empty.
    fn read_vectored(
        &mut self,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> impl std::future::Future<Output = io::Result<usize>> + Send;
}

/// `readv` on a socket: what is there, else wait for readiness and try again.
macro_rules! socket_read_vectored {
    ($half:ty) => {
        impl VectoredRead for $half {
            async fn read_vectored(
                &mut self,
                bufs: &mut [io::IoSliceMut<'_>],
            ) -> io::Result<usize> {
                loop {
                    match self.try_read_vectored(bufs) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable().await?,
                        r => return r,
                    }
                }
            }
        }
    };
}
socket_read_vectored!(tokio::net::tcp::OwnedReadHalf);
socket_read_vectored!(tokio::net::unix::OwnedReadHalf);

/// A request as read off the socket.
pub struct Request {
    pub header: RequestHeader,
    pub payload: Payload,
}

/// What came with a request.
pub enum Payload {
    /// Nothing (every command but WRITE).
    None,
    /// A WRITE's data, and the payload budget it holds.
    Data(WriteData, Held),
    /// A WRITE over [`PAYLOAD_BYTES_MAX`]: read and thrown away.
    Discarded,
}

impl<R: VectoredRead, W: VectoredWrite> Connection<R, W> {
    /// Reads the next request: its header, then a WRITE's payload (whatever else is wrong
    /// with the request, to stay in step with the stream).
    pub(super) async fn read_request(&mut self) -> Result<Request, Stop> {
        let header = self.read_header().await?;
        let is_write = header.command == NBD_CMD_WRITE;
        self.last_write_bytes = if is_write { header.length } else { 0 };
        let payload = if !is_write {
            Payload::None
        } else if header.length > PAYLOAD_BYTES_MAX {
            self.discard_payload(header.length).await?;
            Payload::Discarded
        } else {
            let held = self.acquire(header.length).await?;
            Payload::Data(self.receive(&header).await?, held)
        };
        Ok(Request { header, payload })
    }

    /// Reads and decodes one request header; `NBD_CMD_DISC`, the end of the stream, a bad
    /// magic and every stop signalled meanwhile end the connection.
    async fn read_header(&mut self) -> Result<RequestHeader, Stop> {
        if self.rd.buffer().len() < REQUEST_HEADER_BYTES {
            self.pending.flush(&self.sink).await;
        }
        let mut hb = [0u8; REQUEST_HEADER_BYTES];
        // After a large write the next request is likely one too: read just its header, so
        // its payload goes from the socket straight into blocks rather than first filling
        // the read buffer and being copied out of it.
        let header_only =
            self.rd.buffer().is_empty() && self.last_write_bytes >= HEADER_ONLY_AFTER_BYTES;
        let (rd, signals, sink) = (&mut self.rd, &mut self.signals, &self.sink);
        let read = tokio::select! {
            biased;
            r = async {
                if header_only {
                    rd.get_mut().read_exact(&mut hb).await
                } else {
                    rd.read_exact(&mut hb).await
                }
            } => r,
            stop = signals.wait(sink) => return Err(stop),
        };
        let conn = self.conn;
        if let Err(e) = read {
            if e.kind() != io::ErrorKind::UnexpectedEof {
                tracing::debug!(conn, error = %e, "read failed");
            }
            return Err(Stop::Ended);
        }
        let h = RequestHeader::decode(&hb).map_err(|e| {
            tracing::warn!(conn, error = %e, "bad request, dropping the connection");
            Stop::Ended
        })?;
        tracing::trace!(
            conn,
            cmd = command_name(h.command),
            h.offset,
            h.length,
            h.flags,
            "request"
        );
        if h.command == NBD_CMD_DISC {
            return Err(Stop::Disconnect);
        }
        Ok(h)
    }

    /// Receives a WRITE's payload into the backend's buffer, filled without zeroing it first.
    async fn receive(&mut self, h: &RequestHeader) -> Result<WriteData, Stop> {
        let n = h.length as usize;
        if self.rd.buffer().len() < n {
            self.pending.flush(&self.sink).await;
        }
        let mut data = self.ctx.backend.write_buffer(h.offset, n);
        let received = match data.form_mut().expect("a new buffer is not shared") {
            Form::Blocks(blocks) => {
                assert_eq!(
                    blocks.len() * BLOCK_BYTES,
                    n,
                    "a block buffer fits the write"
                );
                read_blocks(&mut self.rd, blocks).await
            }
            Form::Bytes(v) => read_payload(&mut self.rd, v, n).await,
        };
        match received {
            Ok(()) => Ok(data),
            Err(e) => {
                let conn = self.conn;
                tracing::debug!(conn, error = %e, "connection ended in the middle of a write payload");
                Err(Stop::Ended)
            }
        }
    }

    /// Reads a WRITE payload over [`PAYLOAD_BYTES_MAX`] and throws it away (one larger than
    /// [`PAYLOAD_DISCARD_BYTES_MAX`] ends the connection instead).
    async fn discard_payload(&mut self, length: u32) -> Result<(), Stop> {
        let conn = self.conn;
        if length > PAYLOAD_DISCARD_BYTES_MAX {
            tracing::warn!(
                conn,
                length,
                "write payload too large to discard, dropping the connection"
            );
            return Err(Stop::Ended);
        }
        self.pending.flush(&self.sink).await;
        discard(&mut self.rd, length as u64)
            .await
            .map_err(|_| Stop::Ended)?;
        tracing::debug!(conn, length, "write payload over the limit, discarded");
        Ok(())
    }
}

/// Receives exactly `blocks.len()` blocks of payload into `blocks`: first what the reader has
/// buffered, then straight from the socket with `readv`, so the kernel copies the data into
/// the blocks and nothing copies it again.
async fn read_blocks<R: VectoredRead>(
    rd: &mut BufReader<R>,
    blocks: &mut [Block],
) -> io::Result<()> {
    let total = blocks.len() * BLOCK_BYTES;
    let mut done = 0;
    let buffered = rd.buffer();
    let n = buffered.len().min(total);
    while done < n {
        let (bi, bo) = (done / BLOCK_BYTES, done % BLOCK_BYTES);
        let m = (BLOCK_BYTES - bo).min(n - done);
        blocks[bi][bo..bo + m].copy_from_slice(&buffered[done..done + m]);
        done += m;
    }
    std::pin::Pin::new(&mut *rd).consume(n);
    while done < total {
        let (bi, bo) = (done / BLOCK_BYTES, done % BLOCK_BYTES);
        let got = {
            let (first, rest) = blocks[bi..]
                .split_first_mut()
                .expect("a block is left to fill");
            let mut slices = Vec::with_capacity(rest.len().min(READV_SLICES_MAX - 1) + 1);
            slices.push(io::IoSliceMut::new(&mut first[bo..]));
            slices.extend(
                rest.iter_mut()
                    .take(READV_SLICES_MAX - 1)
                    .map(|b| io::IoSliceMut::new(&mut b[..])),
            );
            rd.get_mut().read_vectored(&mut slices).await
        };
        match got {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads exactly `n` bytes into `payload` (emptied first), straight into its spare capacity
/// (no zeroing).
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut R,
    payload: &mut Vec<u8>,
    n: usize,
) -> io::Result<()> {
    payload.clear();
    payload.reserve(n);
    while payload.len() < n {
        let want = (n - payload.len()) as u64;
        if (&mut *rd).take(want).read_buf(payload).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, mut n: u64) -> io::Result<()> {
    let mut sink = vec![0u8; 64 * 1024];
    while n > 0 {
        let m = n.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..m]).await?;
        n -= m as u64;
    }
    Ok(())
}
