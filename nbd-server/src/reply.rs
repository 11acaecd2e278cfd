//! Reply encoders: the bytes of simple replies, error replies (simple or structured), READ
//! replies with holes as OFFSET_HOLE chunks, and BLOCK_STATUS replies; and the mapping of IO
//! errors to NBD errors. Pure functions; READ replies sent straight from a backend's memory
//! are framed by [`crate::lent`], beside this.

use std::io;

use crate::backend::StatusExtent;
use crate::limits::BLOCK_STATUS_DESCRIPTORS_MAX;
use crate::proto::*;

/// Maps an IO error to one of the NBD error values.
pub fn errno_of(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => NBD_EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => NBD_ENOSPC,
        Some(libc::EINVAL) => NBD_EINVAL,
        Some(libc::EOPNOTSUPP) => NBD_ENOTSUP,
        Some(libc::EOVERFLOW) => NBD_EOVERFLOW,
        Some(_) => NBD_EIO,
        None => match e.kind() {
            io::ErrorKind::PermissionDenied => NBD_EPERM,
            // The emulated disk's refusals carry no OS error; a full write log is this kind.
            io::ErrorKind::StorageFull => NBD_ENOSPC,
            io::ErrorKind::InvalidInput => NBD_EINVAL,
            io::ErrorKind::Unsupported => NBD_ENOTSUP,
            _ => NBD_EIO,
        },
    }
}

/// The bytes of an error reply: a structured ERROR chunk where the spec wants one (READ once
/// structured replies are on, and BLOCK_STATUS), else a simple reply.
pub fn error_reply(
    structured: bool,
    command: u16,
    cookie: u64,
    errno: u32,
    message: &str,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    if structured && matches!(command, NBD_CMD_READ | NBD_CMD_BLOCK_STATUS) {
        encode_error_chunk(&mut out, cookie, errno, message);
    } else {
        encode_simple_reply(&mut out, errno, cookie);
    }
    out
}

pub fn ok_reply(cookie: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIMPLE_REPLY_HEADER_BYTES);
    encode_simple_reply(&mut out, 0, cookie);
    out
}

/// Shortest run of zero bytes sent as an OFFSET_HOLE chunk rather than as data.
pub const HOLE_CHUNK_BYTES_MIN: usize = 64 * 1024;
/// Zero runs are found in aligned pieces of this size (relative to the export).
const HOLE_SCAN_BYTES: usize = 4096;

fn all_zero(b: &[u8]) -> bool {
    let (words, tail) = b.split_at(b.len() / 8 * 8);
    words.chunks_exact(8).all(|w| w == [0u8; 8]) && tail.iter().all(|&x| x == 0)
}

/// For a structured READ without DF: if `data` (read at `offset`) holds zero runs of at least
/// [`HOLE_CHUNK_BYTES_MIN`], the reply as OFFSET_DATA and OFFSET_HOLE chunks ending with a NONE
/// chunk, so holes cost 32 bytes on the wire instead of their length. `None` when there is
/// no such run (the caller sends one OFFSET_DATA chunk, with no extra copy).
pub fn sparse_read_reply(cookie: u64, offset: u64, data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < HOLE_CHUNK_BYTES_MIN {
        return None;
    }
    // Pieces aligned to the export, so chunk boundaries fall on 4 KiB multiples.
    let mut runs: Vec<(usize, usize, bool)> = Vec::new(); // (start, end, zero)
    let mut pos = 0usize;
    while pos < data.len() {
        let to_boundary = HOLE_SCAN_BYTES - ((offset as usize + pos) % HOLE_SCAN_BYTES);
        let end = (pos + to_boundary).min(data.len());
        let zero = all_zero(&data[pos..end]);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 = end,
            _ => runs.push((pos, end, zero)),
        }
        pos = end;
    }
    // Short zero runs travel as data: merge them into their neighbours.
    let mut merged: Vec<(usize, usize, bool)> = Vec::new();
    for (a, b, zero) in runs {
        let zero = zero && b - a >= HOLE_CHUNK_BYTES_MIN;
        match merged.last_mut() {
            Some(last) if last.2 == zero => last.1 = b,
            _ => merged.push((a, b, zero)),
        }
    }
    if !merged.iter().any(|r| r.2) {
        return None;
    }
    let data_bytes: usize = merged.iter().filter(|r| !r.2).map(|r| r.1 - r.0).sum();
    let mut out = Vec::with_capacity(
        data_bytes + merged.len() * (OFFSET_DATA_PREFIX_BYTES + 12) + STRUCTURED_REPLY_HEADER_BYTES,
    );
    for (a, b, zero) in merged {
        let at = offset + a as u64;
        if zero {
            encode_offset_hole(&mut out, 0, cookie, at, (b - a) as u32);
        } else {
            let mut prefix = [0u8; OFFSET_DATA_PREFIX_BYTES];
            put_offset_data_prefix(&mut prefix, 0, cookie, at, (b - a) as u32);
            out.extend_from_slice(&prefix);
            out.extend_from_slice(&data[a..b]);
        }
    }
    encode_none_chunk(&mut out, cookie);
    Some(out)
}

/// The BLOCK_STATUS reply for `base:allocation` over the backend's `runs` of a request of
/// `len` bytes (see [`descriptors_of`]).
pub fn block_status_reply(cookie: u64, runs: &[StatusExtent], len: u64, req_one: bool) -> Vec<u8> {
    let descriptors = descriptors_of(runs, len, req_one);
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_BYTES + 4 + 8 * descriptors.len());
    encode_block_status_chunk(
        &mut out,
        NBD_REPLY_FLAG_DONE,
        cookie,
        crate::handshake::BASE_ALLOCATION_CONTEXT_ID,
        &descriptors,
    );
    out
}

/// Turns backend runs into descriptors: clipped to the request, empty runs dropped, equal
/// neighbours merged, at most [`BLOCK_STATUS_DESCRIPTORS_MAX`] (one with REQ_ONE), never none.
pub fn descriptors_of(runs: &[StatusExtent], len: u64, req_one: bool) -> Vec<BlockDescriptor> {
    let cap = if req_one {
        1
    } else {
        BLOCK_STATUS_DESCRIPTORS_MAX
    };
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut covered = 0u64;
    for r in runs {
        let n = r.length.min(len - covered);
        if n == 0 {
            continue;
        }
        let flags =
            if r.hole { NBD_STATE_HOLE } else { 0 } | if r.zero { NBD_STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += n as u32,
            _ => {
                if out.len() == cap {
                    break;
                }
                out.push(BlockDescriptor {
                    length: n as u32,
                    flags,
                });
            }
        }
        covered += n;
        if covered == len {
            break;
        }
    }
    if out.is_empty() {
        // The backend told nothing: "status 0" (allocated, contents unknown) is always true.
        out.push(BlockDescriptor {
            length: len as u32,
            flags: 0,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a chunked READ reply back into bytes (holes as zeroes).
    fn reassemble(reply: &[u8], offset: u64, len: usize) -> (Vec<u8>, usize) {
        let mut out = vec![0xAAu8; len];
        let mut p = 0;
        let mut chunks = 0;
        loop {
            let (h, n) = ReplyHeader::decode(&reply[p..]).unwrap();
            let ReplyHeader::Structured {
                flags,
                chunk_type,
                length,
                ..
            } = h
            else {
                panic!()
            };
            let body = &reply[p + n..p + n + length as usize];
            p += n + length as usize;
            chunks += 1;
            let at = body
                .get(0..8)
                .map(|b| (u64::from_be_bytes(b.try_into().unwrap()) - offset) as usize)
                .unwrap_or(0);
            match chunk_type {
                NBD_REPLY_TYPE_OFFSET_DATA => {
                    out[at..at + body.len() - 8].copy_from_slice(&body[8..])
                }
                NBD_REPLY_TYPE_OFFSET_HOLE => {
                    let n = u32::from_be_bytes(body[8..12].try_into().unwrap()) as usize;
                    out[at..at + n].fill(0);
                }
                NBD_REPLY_TYPE_NONE => {}
                t => panic!("chunk type {t}"),
            }
            if flags & NBD_REPLY_FLAG_DONE != 0 {
                assert_eq!(p, reply.len());
                return (out, chunks);
            }
        }
    }

    #[test]
    fn sparse_reads_become_hole_chunks() {
        let mut data = vec![0u8; 1 << 20];
        data[5000..9000].fill(1); // data inside the first 64 KiB
        data[700_000] = 2; // lone byte: its block stays data
        let off = 3 * 4096 + 100; // unaligned start
        let reply = sparse_read_reply(9, off, &data).expect("has holes");
        let (back, chunks) = reassemble(&reply, off, data.len());
        assert!(back == data);
        assert!(chunks >= 5, "data, hole, data, hole, none: {chunks}");
        assert!(
            reply.len() < 100_000,
            "holes are not sent as bytes: {}",
            reply.len()
        );
        // No hole of 64 KiB: no chunking.
        let mut dense = vec![1u8; 1 << 20];
        dense[4096..8192].fill(0);
        assert!(sparse_read_reply(9, 0, &dense).is_none());
        assert!(
            sparse_read_reply(9, 0, &[0u8; 4096]).is_none(),
            "too short to bother"
        );
    }

    #[test]
    fn descriptors_merge_clip_and_cap() {
        let runs = [
            StatusExtent {
                length: 4096,
                hole: true,
                zero: true,
            },
            StatusExtent {
                length: 4096,
                hole: true,
                zero: true,
            },
            StatusExtent {
                length: 8192,
                hole: false,
                zero: false,
            },
        ];
        let d = descriptors_of(&runs, 10000, false);
        assert_eq!(
            d,
            vec![
                BlockDescriptor {
                    length: 8192,
                    flags: 3
                },
                BlockDescriptor {
                    length: 1808,
                    flags: 0
                }
            ]
        );
        assert_eq!(
            descriptors_of(&runs, 10000, true),
            vec![BlockDescriptor {
                length: 8192,
                flags: 3
            }]
        );
        assert_eq!(
            descriptors_of(&[], 512, false),
            vec![BlockDescriptor {
                length: 512,
                flags: 0
            }]
        );
    }
}
