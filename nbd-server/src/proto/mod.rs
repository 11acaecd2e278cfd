//! The NBD wire protocol: constants, and pure encoders/decoders for every message this
//! server sends or receives (handshake, options, option replies, requests, simple and
//! structured replies). No IO happens here: the server reads bytes, hands them to these
//! functions, and writes what they produce. Clients (tests, crashmonkey) use the same codecs
//! for the other direction.
//!
//! Decoders never panic: malformed input is a [`ProtoError`]. Encoders append to a
//! `Vec<u8>` or fill a caller-provided fixed-size array.

pub mod consts;

pub use consts::*;

/// Malformed input on the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    #[error("bad magic: expected {expected:#x}, got {got:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("message truncated: needed {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    #[error("{0}")]
    Invalid(&'static str),
    #[error("string of {0} bytes is longer than the {STRING_BYTES_MAX}-byte limit")]
    StringTooLong(usize),
    #[error("string is not valid UTF-8")]
    NotUtf8,
}

/// A bounds-checked big-endian reader over a byte slice.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.remaining() < n {
            return Err(ProtoError::Truncated {
                needed: self.pos + n,
                got: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A string prefixed by its 32-bit length, checked against the spec's limit and UTF-8.
    pub fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        if len > STRING_BYTES_MAX {
            return Err(ProtoError::StringTooLong(len));
        }
        let b = self.take(len)?;
        parse_string(b)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self, what: &'static str) -> Result<(), ProtoError> {
        if self.remaining() != 0 {
            return Err(ProtoError::Invalid(what));
        }
        Ok(())
    }
}

/// A protocol string: UTF-8, at most [`STRING_BYTES_MAX`] bytes, no NUL.
pub fn parse_string(b: &[u8]) -> Result<String, ProtoError> {
    if b.len() > STRING_BYTES_MAX {
        return Err(ProtoError::StringTooLong(b.len()));
    }
    let s = std::str::from_utf8(b).map_err(|_| ProtoError::NotUtf8)?;
    if s.contains('\0') {
        return Err(ProtoError::Invalid("string contains a NUL byte"));
    }
    Ok(s.to_owned())
}

// ---- Handshake ---------------------------------------------------------------------------------

/// The server's first message: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_BYTES] {
    let mut b = [0u8; GREETING_BYTES];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Decodes the server greeting (client side); returns the handshake flags.
pub fn decode_greeting(b: &[u8; GREETING_BYTES]) -> Result<u16, ProtoError> {
    let mut c = Cursor::new(b);
    let m1 = c.u64()?;
    if m1 != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBD_MAGIC,
            got: m1,
        });
    }
    let m2 = c.u64()?;
    if m2 != NBD_OPTS_MAGIC {
        return Err(ProtoError::BadMagic {
            expected: NBD_OPTS_MAGIC,
            got: m2,
        });
    }
    c.u16()
}

/// Header of one option sent by the client during haggling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn decode(b: &[u8; OPTION_HEADER_BYTES]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != NBD_OPTS_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: NBD_OPTS_MAGIC,
                got: magic,
            });
        }
        Ok(OptionHeader {
            option: c.u32()?,
            length: c.u32()?,
        })
    }

    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut b = [0u8; OPTION_HEADER_BYTES];
        b[0..8].copy_from_slice(&NBD_OPTS_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Appends one option reply (header + data).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&NBD_REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Header of one option reply (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn decode(b: &[u8; OPTION_REPLY_HEADER_BYTES]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u64()?;
        if magic != NBD_REP_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: NBD_REP_MAGIC,
                got: magic,
            });
        }
        Ok(OptionReplyHeader {
            option: c.u32()?,
            reply_type: c.u32()?,
            length: c.u32()?,
        })
    }
}

/// Data of NBD_OPT_INFO and NBD_OPT_GO: an export name and the NBD_INFO_* items asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data);
        let name = c.string32()?;
        let n = c.u16()? as usize;
        if c.remaining() != n * 2 {
            return Err(ProtoError::Invalid(
                "information request count does not match the option length",
            ));
        }
        let mut requests = Vec::with_capacity(n);
        for _ in 0..n {
            requests.push(c.u16()?);
        }
        Ok(InfoRequest { name, requests })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// Data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Upper bound on the number of queries in one meta-context option (each costs a reply).
pub const META_CONTEXT_QUERIES_MAX: usize = 128;

impl MetaContextRequest {
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data);
        let export = c.string32()?;
        let n = c.u32()? as usize;
        if n > META_CONTEXT_QUERIES_MAX {
            return Err(ProtoError::Invalid("too many meta context queries"));
        }
        let mut queries = Vec::with_capacity(n);
        for _ in 0..n {
            queries.push(c.string32()?);
        }
        c.finish("trailing bytes after the meta context queries")?;
        Ok(MetaContextRequest { export, queries })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.export.len() as u32).to_be_bytes());
        b.extend_from_slice(self.export.as_bytes());
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }
}

/// One NBD_REP_INFO payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        transmission_flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
}

impl Info {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        match self {
            Info::Export {
                size,
                transmission_flags,
            } => {
                b.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&transmission_flags.to_be_bytes());
            }
            Info::Name(s) => {
                b.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
            Info::Description(s) => {
                b.extend_from_slice(&NBD_INFO_DESCRIPTION.to_be_bytes());
                b.extend_from_slice(s.as_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                b.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
                b.extend_from_slice(&minimum.to_be_bytes());
                b.extend_from_slice(&preferred.to_be_bytes());
                b.extend_from_slice(&maximum.to_be_bytes());
            }
        }
        b
    }

    /// Decodes an NBD_REP_INFO payload (client side). Unknown info types are an error.
    pub fn decode(data: &[u8]) -> Result<Self, ProtoError> {
        let mut c = Cursor::new(data);
        let info = match c.u16()? {
            NBD_INFO_EXPORT => {
                let size = c.u64()?;
                let transmission_flags = c.u16()?;
                Info::Export {
                    size,
                    transmission_flags,
                }
            }
            NBD_INFO_NAME => Info::Name(parse_string(c.take(c.remaining())?)?),
            NBD_INFO_DESCRIPTION => Info::Description(parse_string(c.take(c.remaining())?)?),
            NBD_INFO_BLOCK_SIZE => Info::BlockSize {
                minimum: c.u32()?,
                preferred: c.u32()?,
                maximum: c.u32()?,
            },
            _ => return Err(ProtoError::Invalid("unknown NBD_INFO type")),
        };
        c.finish("trailing bytes in NBD_REP_INFO")?;
        Ok(info)
    }
}

/// NBD_REP_SERVER data: a name and no details.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// NBD_REP_META_CONTEXT data: an id and a name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The answer to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless the
/// client negotiated NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_ZEROES_BYTES]);
    }
}

// ---- Transmission ----------------------------------------------------------------------------

/// One request header as sent by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn decode(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<Self, ProtoError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != NBD_REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                expected: NBD_REQUEST_MAGIC as u64,
                got: magic as u64,
            });
        }
        let mut c = Cursor::new(&b[4..]);
        Ok(RequestHeader {
            flags: c.u16()?,
            command: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u32()?,
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// Fills a simple reply header into the first [`SIMPLE_REPLY_HEADER_BYTES`] of `b`.
pub fn put_simple_reply(b: &mut [u8], error: u32, cookie: u64) {
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Appends a simple reply header.
pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    let mut b = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    put_simple_reply(&mut b, error, cookie);
    out.extend_from_slice(&b);
}

/// Fills a structured reply chunk header into the first
/// [`STRUCTURED_REPLY_HEADER_BYTES`] of `b`.
pub fn put_structured_header(b: &mut [u8], flags: u16, chunk_type: u16, cookie: u64, length: u32) {
    b[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
}

/// Bytes before the data of an OFFSET_DATA chunk: chunk header + 64-bit offset.
pub const OFFSET_DATA_PREFIX_BYTES: usize = STRUCTURED_REPLY_HEADER_BYTES + 8;

/// Fills the header of an OFFSET_DATA chunk carrying `data_len` bytes into the first
/// [`OFFSET_DATA_PREFIX_BYTES`] of `b`.
pub fn put_offset_data_prefix(b: &mut [u8], flags: u16, cookie: u64, offset: u64, data_len: u32) {
    put_structured_header(b, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, data_len + 8);
    b[20..28].copy_from_slice(&offset.to_be_bytes());
}

/// Appends an OFFSET_HOLE chunk.
pub fn encode_offset_hole(out: &mut Vec<u8>, flags: u16, cookie: u64, offset: u64, hole: u32) {
    let mut b = [0u8; STRUCTURED_REPLY_HEADER_BYTES + 12];
    put_structured_header(&mut b, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b[28..32].copy_from_slice(&hole.to_be_bytes());
    out.extend_from_slice(&b);
}

/// Appends a NONE chunk (always final).
pub fn encode_none_chunk(out: &mut Vec<u8>, cookie: u64) {
    let mut b = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
    put_structured_header(&mut b, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
    out.extend_from_slice(&b);
}

/// Longest error message this server puts in an ERROR chunk.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 256;

/// Appends a final ERROR chunk with a human-readable message (truncated to
/// [`ERROR_MESSAGE_BYTES_MAX`] on a character boundary).
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let mut end = message.len().min(ERROR_MESSAGE_BYTES_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut b = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
    put_structured_header(
        &mut b,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&b);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// One block status descriptor: a run length and its `NBD_STATE_*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// Appends a BLOCK_STATUS chunk for one meta context.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    flags: u16,
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
) {
    let mut b = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
    let len = 4 + 8 * descriptors.len();
    put_structured_header(
        &mut b,
        flags,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len as u32,
    );
    out.reserve(b.len() + len);
    out.extend_from_slice(&b);
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

/// A reply header as the client sees it: simple or structured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Structured {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        length: u32,
    },
}

impl ReplyHeader {
    /// Decodes the first 4 bytes' magic, then the rest of the header. `b` must hold at least
    /// [`STRUCTURED_REPLY_HEADER_BYTES`] for structured replies; for simple ones
    /// [`SIMPLE_REPLY_HEADER_BYTES`] suffice (returns the bytes consumed).
    pub fn decode(b: &[u8]) -> Result<(Self, usize), ProtoError> {
        let mut c = Cursor::new(b);
        let magic = c.u32()?;
        match magic {
            NBD_SIMPLE_REPLY_MAGIC => {
                let error = c.u32()?;
                let cookie = c.u64()?;
                Ok((
                    ReplyHeader::Simple { error, cookie },
                    SIMPLE_REPLY_HEADER_BYTES,
                ))
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                let flags = c.u16()?;
                let chunk_type = c.u16()?;
                let cookie = c.u64()?;
                let length = c.u32()?;
                Ok((
                    ReplyHeader::Structured {
                        flags,
                        chunk_type,
                        cookie,
                        length,
                    },
                    STRUCTURED_REPLY_HEADER_BYTES,
                ))
            }
            got => Err(ProtoError::BadMagic {
                expected: NBD_SIMPLE_REPLY_MAGIC as u64,
                got: got as u64,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trips() {
        let g = encode_greeting(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(decode_greeting(&g).unwrap(), 3);
    }

    #[test]
    fn option_header_rejects_bad_magic() {
        let mut b = OptionHeader {
            option: 7,
            length: 3,
        }
        .encode();
        assert_eq!(
            OptionHeader::decode(&b).unwrap(),
            OptionHeader {
                option: 7,
                length: 3
            }
        );
        b[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request_round_trips_and_checks_count() {
        let r = InfoRequest {
            name: "disk".into(),
            requests: vec![NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE],
        };
        let b = r.encode();
        assert_eq!(InfoRequest::decode(&b).unwrap(), r);
        assert!(InfoRequest::decode(&b[..b.len() - 1]).is_err());
        let mut longer = b.clone();
        longer.push(0);
        assert!(InfoRequest::decode(&longer).is_err());
        // A name length that points past the end.
        assert!(InfoRequest::decode(&[0, 0, 0, 9, b'a']).is_err());
    }

    #[test]
    fn meta_context_request_round_trips() {
        let r = MetaContextRequest {
            export: "".into(),
            queries: vec!["base:allocation".into()],
        };
        assert_eq!(MetaContextRequest::decode(&r.encode()).unwrap(), r);
        assert!(MetaContextRequest::decode(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn request_header_round_trips() {
        let h = RequestHeader {
            flags: 1,
            command: NBD_CMD_WRITE,
            cookie: 42,
            offset: 4096,
            length: 512,
        };
        let b = h.encode();
        assert_eq!(RequestHeader::decode(&b).unwrap(), h);
        let mut bad = b;
        bad[3] ^= 0xff;
        assert!(RequestHeader::decode(&bad).is_err());
    }

    #[test]
    fn info_encodings_have_spec_lengths() {
        assert_eq!(
            Info::Export {
                size: 1,
                transmission_flags: 1
            }
            .encode()
            .len(),
            12
        );
        assert_eq!(
            Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 1 << 25
            }
            .encode()
            .len(),
            14
        );
        let i = Info::Name("x".into());
        assert_eq!(Info::decode(&i.encode()).unwrap(), i);
    }

    #[test]
    fn structured_chunks_decode() {
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 9, NBD_EINVAL, "bad");
        let (h, n) = ReplyHeader::decode(&out).unwrap();
        assert_eq!(n, STRUCTURED_REPLY_HEADER_BYTES);
        assert_eq!(
            h,
            ReplyHeader::Structured {
                flags: NBD_REPLY_FLAG_DONE,
                chunk_type: NBD_REPLY_TYPE_ERROR,
                cookie: 9,
                length: 9
            }
        );
        let mut out = Vec::new();
        encode_block_status_chunk(
            &mut out,
            1,
            3,
            1,
            &[BlockDescriptor {
                length: 4096,
                flags: 3,
            }],
        );
        assert_eq!(out.len(), 20 + 4 + 8);
    }

    #[test]
    fn error_message_is_truncated_on_char_boundary() {
        let long = "é".repeat(300);
        let mut out = Vec::new();
        encode_error_chunk(&mut out, 1, NBD_EIO, &long);
        let msg_len = u16::from_be_bytes([out[24], out[25]]) as usize;
        assert!(msg_len <= ERROR_MESSAGE_BYTES_MAX);
        assert!(std::str::from_utf8(&out[26..26 + msg_len]).is_ok());
    }
}
