//! READ replies sent straight from a backend's memory.
//!
//! A backend that lends its memory ([`Backend::lends_memory`], the sparse memory disk) hands
//! a read over as [`Piece`]s that point into its blocks, valid while it holds its locks. The
//! reply is framed around them (a simple reply header, or structured OFFSET_DATA and
//! OFFSET_HOLE chunks) and written to the socket with one vectored, non-blocking write per
//! call: the kernel's copy into the socket is the only copy of the data. Whatever the socket
//! does not take at once (its send buffer is full) is copied into [`LentReply::rest`] before
//! the backend's locks are released, and written after them with an ordinary async write.
//!
//! The caller holds the connection's write half exclusively for the whole reply.
//!
//! [`Backend::lends_memory`]: crate::backend::Backend::lends_memory

use std::io::{self, IoSlice};

use crate::backend::Piece;
use crate::proto::*;

/// A socket's write half that can also write many buffers with one call without waiting.
pub trait VectoredWrite: tokio::io::AsyncWrite + Unpin + Send + Sync + 'static {
    /// Whether [`Self::try_write_vectored`] hands the bytes straight to the socket, so that
    /// READ replies sent from a backend's memory save a copy. Not so over TLS, where every
    /// byte is encrypted into a buffer first: there READ replies take the ordinary path.
    const WRITES_IN_PLACE: bool = true;
    /// Writes what the socket takes now from `bufs`, in order (`WouldBlock` if nothing).
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
}

impl VectoredWrite for tokio::net::tcp::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::tcp::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
}

impl VectoredWrite for tokio::net::unix::OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        tokio::net::unix::OwnedWriteHalf::try_write_vectored(self, bufs)
    }
}

/// Most buffers one `writev` call takes (the kernel's IOV_MAX).
pub const WRITEV_SLICES_MAX: usize = 1024;

/// Zero bytes to point at for runs of zeroes sent as data.
const ZERO_SLICE_BYTES: usize = 64 * 1024;
static ZEROES: [u8; ZERO_SLICE_BYTES] = [0u8; ZERO_SLICE_BYTES];

/// Longest frame header this module writes: an OFFSET_HOLE chunk.
const FRAME_HEADER_BYTES_MAX: usize = STRUCTURED_REPLY_HEADER_BYTES + 12;

/// One READ reply in the making. Feed it the backend's pieces with [`LentReply::send`].
pub struct LentReply {
    structured: bool,
    /// One OFFSET_DATA chunk for the whole read (DF, or no structured replies).
    whole: bool,
    cookie: u64,
    /// Export offset of the next piece.
    next: u64,
    /// Bytes of the read not yet framed.
    left: usize,
    length: usize,
    /// Reply bytes the socket did not take at once, to write after the backend's locks.
    pub rest: Vec<u8>,
    /// The socket failed; nothing more can be sent on it.
    pub failed: Option<io::Error>,
    /// Reply bytes written straight from the backend's memory (for statistics).
    pub direct_bytes: usize,
}

/// A piece of the reply: a header in the frame list (index, length), or lent data.
enum Seg<'a> {
    Header(usize, usize),
    Lent(Piece<'a>),
}

impl LentReply {
    /// A reply to the READ `cookie` of `length` bytes at `offset`; `df` is the request's
    /// NBD_CMD_FLAG_DF (only meaningful with structured replies).
    pub fn new(structured: bool, df: bool, cookie: u64, offset: u64, length: usize) -> Self {
        LentReply {
            structured,
            whole: !structured || df,
            cookie,
            next: offset,
            left: length,
            length,
            rest: Vec::new(),
            failed: None,
            direct_bytes: 0,
        }
    }

    /// Whether any of the reply was framed yet (after which an error can no longer be sent
    /// as a simple reply).
    pub fn started(&self) -> bool {
        self.left != self.length
    }

    /// Whether every byte of the read was framed.
    pub fn complete(&self) -> bool {
        self.left == 0
    }

    /// Frames `pieces` (the next bytes of the read) and writes them to `sock` as far as it
    /// takes them without waiting; the rest goes to [`Self::rest`].
    pub fn send(
        &mut self,
        pieces: &[Piece<'_>],
        sock: &dyn Fn(&[IoSlice<'_>]) -> io::Result<usize>,
    ) {
        let total: usize = pieces.iter().map(|p| p.len()).sum();
        if total > self.left || self.failed.is_some() {
            if self.failed.is_none() {
                self.failed = Some(io::Error::other("backend lent more bytes than were read"));
            }
            return;
        }
        let mut headers: Vec<[u8; FRAME_HEADER_BYTES_MAX]> = Vec::new();
        let mut segs: Vec<Seg<'_>> = Vec::with_capacity(pieces.len() + 4);
        let header = |headers: &mut Vec<[u8; FRAME_HEADER_BYTES_MAX]>,
                      f: &dyn Fn(&mut [u8]) -> usize| {
            let mut h = [0u8; FRAME_HEADER_BYTES_MAX];
            let n = f(&mut h);
            headers.push(h);
            Seg::Header(headers.len() - 1, n)
        };
        let last_call = total == self.left;
        if self.whole {
            if !self.started() {
                let (cookie, at, len) = (self.cookie, self.next, self.length as u32);
                let s = if self.structured {
                    header(&mut headers, &|h| {
                        put_offset_data_prefix(h, NBD_REPLY_FLAG_DONE, cookie, at, len);
                        OFFSET_DATA_PREFIX_BYTES
                    })
                } else {
                    header(&mut headers, &|h| {
                        put_simple_reply(h, 0, cookie);
                        SIMPLE_REPLY_HEADER_BYTES
                    })
                };
                segs.push(s);
            }
            segs.extend(pieces.iter().map(|&p| Seg::Lent(p)));
        } else {
            // Runs of zeroes long enough become OFFSET_HOLE chunks; everything between them
            // one OFFSET_DATA chunk. The last chunk of the last call carries DONE.
            let is_hole = |p: &Piece<'_>| matches!(p, Piece::Zeroes(n) if *n >= crate::reply::HOLE_CHUNK_BYTES_MIN);
            let mut i = 0;
            let mut at = self.next;
            while i < pieces.len() {
                let hole = is_hole(&pieces[i]);
                let mut j = i + 1;
                while j < pieces.len() && !hole && !is_hole(&pieces[j]) {
                    j += 1;
                }
                let run: usize = pieces[i..j].iter().map(|p| p.len()).sum();
                let flags = if last_call && j == pieces.len() {
                    NBD_REPLY_FLAG_DONE
                } else {
                    0
                };
                let cookie = self.cookie;
                if hole {
                    segs.push(header(&mut headers, &|h| {
                        put_structured_header(h, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                        h[20..28].copy_from_slice(&at.to_be_bytes());
                        h[28..32].copy_from_slice(&(run as u32).to_be_bytes());
                        STRUCTURED_REPLY_HEADER_BYTES + 12
                    }));
                } else {
                    segs.push(header(&mut headers, &|h| {
                        put_offset_data_prefix(h, flags, cookie, at, run as u32);
                        OFFSET_DATA_PREFIX_BYTES
                    }));
                    segs.extend(pieces[i..j].iter().map(|&p| Seg::Lent(p)));
                }
                at += run as u64;
                i = j;
            }
        }
        self.next += total as u64;
        self.left -= total;
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(segs.len() + 4);
        for s in &segs {
            match *s {
                Seg::Header(i, n) => slices.push(IoSlice::new(&headers[i][..n])),
                Seg::Lent(Piece::Data(d)) => slices.push(IoSlice::new(d)),
                Seg::Lent(Piece::Zeroes(mut n)) => {
                    while n > 0 {
                        let m = n.min(ZERO_SLICE_BYTES);
                        slices.push(IoSlice::new(&ZEROES[..m]));
                        n -= m;
                    }
                }
            }
        }
        slices.retain(|s| !s.is_empty());
        self.write(&mut slices, sock);
    }

    fn write(
        &mut self,
        slices: &mut [IoSlice<'_>],
        sock: &dyn Fn(&[IoSlice<'_>]) -> io::Result<usize>,
    ) {
        let mut s = slices;
        // Once something waits in `rest`, everything after it must wait too (order).
        while !s.is_empty() && self.rest.is_empty() {
            let n = s.len().min(WRITEV_SLICES_MAX);
            match sock(&s[..n]) {
                Ok(0) => {
                    self.failed = Some(io::ErrorKind::WriteZero.into());
                    return;
                }
                Ok(k) => {
                    self.direct_bytes += k;
                    IoSlice::advance_slices(&mut s, k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            }
        }
        for sl in s.iter() {
            self.rest.extend_from_slice(sl);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A socket that takes at most `room` bytes in all, then would block.
    fn socket(room: usize) -> (RefCell<Vec<u8>>, usize) {
        (RefCell::new(Vec::new()), room)
    }

    fn feed(reply: &mut LentReply, calls: &[Vec<Piece<'_>>], room: usize) -> Vec<u8> {
        let (taken, room) = socket(room);
        let sock = |bufs: &[IoSlice<'_>]| -> io::Result<usize> {
            let mut t = taken.borrow_mut();
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(room - t.len());
                t.extend_from_slice(&b[..k]);
                n += k;
                if k < b.len() {
                    break;
                }
            }
            if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        };
        for c in calls {
            reply.send(c, &sock);
        }
        let mut all = taken.into_inner();
        assert_eq!(reply.direct_bytes, all.len());
        all.extend_from_slice(&reply.rest);
        all
    }

    #[test]
    fn simple_reply_is_header_then_data_whatever_the_socket_takes() {
        let a = vec![1u8; 4096];
        let b = vec![2u8; 100];
        for room in [0, 5, 16, 17, 4200, 1 << 20] {
            let mut r = LentReply::new(false, false, 7, 0, 4096 + 8192 + 100);
            let calls = vec![
                vec![Piece::Data(&a), Piece::Zeroes(8192)],
                vec![Piece::Data(&b)],
            ];
            let out = feed(&mut r, &calls, room);
            assert!(r.complete() && r.failed.is_none());
            let mut want = Vec::new();
            encode_simple_reply(&mut want, 0, 7);
            want.extend_from_slice(&a);
            want.extend_from_slice(&[0u8; 8192]);
            want.extend_from_slice(&b);
            assert!(out == want, "room {room}");
        }
    }

    #[test]
    fn structured_reply_sends_long_zero_runs_as_holes() {
        let a = vec![3u8; 4096];
        let hole = crate::reply::HOLE_CHUNK_BYTES_MIN;
        let len = 4096 + 8192 + 4096 + hole + 4096;
        let mut r = LentReply::new(true, false, 9, 1 << 20, len);
        let calls = vec![
            vec![Piece::Data(&a), Piece::Zeroes(8192), Piece::Data(&a)],
            vec![Piece::Zeroes(hole), Piece::Data(&a)],
        ];
        let out = feed(&mut r, &calls, 10_000);
        let mut want = Vec::new();
        let mut pre = [0u8; OFFSET_DATA_PREFIX_BYTES];
        put_offset_data_prefix(&mut pre, 0, 9, 1 << 20, 4096 + 8192 + 4096);
        want.extend_from_slice(&pre);
        want.extend_from_slice(&a);
        want.extend_from_slice(&[0u8; 8192]);
        want.extend_from_slice(&a);
        encode_offset_hole(&mut want, 0, 9, (1 << 20) + 16384, hole as u32);
        put_offset_data_prefix(
            &mut pre,
            NBD_REPLY_FLAG_DONE,
            9,
            (1 << 20) + 16384 + hole as u64,
            4096,
        );
        want.extend_from_slice(&pre);
        want.extend_from_slice(&a);
        assert!(out == want);
    }

    #[test]
    fn df_reply_is_one_chunk_and_a_final_hole_carries_done() {
        let hole = crate::reply::HOLE_CHUNK_BYTES_MIN;
        let mut r = LentReply::new(true, true, 1, 0, hole);
        let out = feed(&mut r, &[vec![Piece::Zeroes(hole)]], usize::MAX / 2);
        let mut want = vec![0u8; OFFSET_DATA_PREFIX_BYTES];
        put_offset_data_prefix(&mut want, NBD_REPLY_FLAG_DONE, 1, 0, hole as u32);
        want.resize(OFFSET_DATA_PREFIX_BYTES + hole, 0);
        assert!(out == want);

        let mut r = LentReply::new(true, false, 1, 0, hole);
        let out = feed(&mut r, &[vec![Piece::Zeroes(hole)]], usize::MAX / 2);
        let mut want = Vec::new();
        encode_offset_hole(&mut want, NBD_REPLY_FLAG_DONE, 1, 0, hole as u32);
        assert_eq!(out, want);
    }

    #[test]
    fn more_bytes_than_asked_fail_the_reply() {
        let a = vec![3u8; 4096];
        let mut r = LentReply::new(false, false, 1, 0, 100);
        feed(&mut r, &[vec![Piece::Data(&a)]], 1 << 20);
        assert!(r.failed.is_some() && !r.started());
    }
}
