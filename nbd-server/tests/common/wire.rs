//! The NBD wire format as the test client speaks it, written by hand from the NBD protocol
//! specification (NetworkBlockDevice/nbd, `doc/proto.md`), not from the server's `proto`
//! module: a mistake made symmetrically in the server's encoders and decoders must not pass
//! the tests. Every value and offset below is the spec's; the section it comes from is named.
//! Everything is big-endian ("network byte order"), as the spec requires.
#![allow(dead_code)]

// ---- "Newstyle negotiation": the greeting ---------------------------------------------------

/// `S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC')`.
pub const NBD_MAGIC_BYTES: [u8; 8] = *b"NBDMAGIC";
/// `S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')`, also the client's option magic.
pub const IHAVEOPT_BYTES: [u8; 8] = *b"IHAVEOPT";
/// NBDMAGIC, IHAVEOPT, then 16 bits of handshake flags.
pub const GREETING_BYTES: usize = 18;

/// Handshake flags ("Handshake flags"): bit 0 and bit 1.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 0b01;
pub const NBD_FLAG_NO_ZEROES: u16 = 0b10;
/// Client flags ("Client flags"): the same two bits, 32 bits wide.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 0b01;
pub const NBD_FLAG_C_NO_ZEROES: u32 = 0b10;

/// Transmission flags ("Transmission flags"), bit by bit.
pub const NBD_FLAG_HAS_FLAGS: u16 = 0x0001;
pub const NBD_FLAG_READ_ONLY: u16 = 0x0002;
pub const NBD_FLAG_SEND_FLUSH: u16 = 0x0004;
pub const NBD_FLAG_SEND_FUA: u16 = 0x0008;
pub const NBD_FLAG_ROTATIONAL: u16 = 0x0010;
pub const NBD_FLAG_SEND_TRIM: u16 = 0x0020;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 0x0040;
pub const NBD_FLAG_SEND_DF: u16 = 0x0080;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 0x0100;
pub const NBD_FLAG_SEND_RESIZE: u16 = 0x0200;
pub const NBD_FLAG_SEND_CACHE: u16 = 0x0400;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 0x0800;

// ---- "Option types" ---------------------------------------------------------------------------

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

/// IHAVEOPT, 32-bit option, 32-bit length of the data that follows.
pub const OPTION_HEADER_BYTES: usize = 16;

// ---- "Option reply types" ---------------------------------------------------------------------

/// `S: 64 bits, 0x3e889045565a9 (magic number for replies)`.
pub const NBD_REP_MAGIC_BYTES: [u8; 8] = [0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
/// Magic, 32-bit option, 32-bit reply type, 32-bit length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Error replies have bit 31 set.
pub const NBD_REP_FLAG_ERROR: u32 = 0x8000_0000;
pub const NBD_REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const NBD_REP_ERR_POLICY: u32 = 0x8000_0002;
pub const NBD_REP_ERR_INVALID: u32 = 0x8000_0003;
pub const NBD_REP_ERR_PLATFORM: u32 = 0x8000_0004;
pub const NBD_REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const NBD_REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const NBD_REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
pub const NBD_REP_ERR_TOO_BIG: u32 = 0x8000_0009;

/// "Information types" of NBD_REP_INFO.
pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---- "Transmission phase" ---------------------------------------------------------------------

/// "Request message": `C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)`.
pub const NBD_REQUEST_MAGIC_BYTES: [u8; 4] = [0x25, 0x60, 0x95, 0x13];
/// Magic, 16-bit flags, 16-bit type, 64-bit cookie, 64-bit offset, 32-bit length.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// "Simple reply message": `S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)`.
pub const NBD_SIMPLE_REPLY_MAGIC_BYTES: [u8; 4] = [0x67, 0x44, 0x66, 0x98];
/// Magic, 32-bit error, 64-bit cookie.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// "Structured reply chunk message": `S: 32 bits, 0x668e33ef`.
pub const NBD_STRUCTURED_REPLY_MAGIC_BYTES: [u8; 4] = [0x66, 0x8e, 0x33, 0xef];
/// Magic, 16-bit flags, 16-bit type, 64-bit cookie, 32-bit length of the payload.
pub const STRUCTURED_REPLY_HEADER_BYTES: usize = 20;

/// "Request types".
pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

/// "Command flags", bit by bit.
pub const NBD_CMD_FLAG_FUA: u16 = 0x01;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 0x02;
pub const NBD_CMD_FLAG_DF: u16 = 0x04;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 0x08;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 0x10;
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 0x20;

/// "Structured reply flags" and "Structured reply types".
pub const NBD_REPLY_FLAG_DONE: u16 = 0x01;
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const NBD_REPLY_TYPE_ERROR: u16 = 0x8001;
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

/// "Error values" (the Linux errno numbers the spec fixes).
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// "base:allocation" metadata context: its two flags.
pub const NBD_STATE_HOLE: u32 = 0b01;
pub const NBD_STATE_ZERO: u32 = 0b10;

// ---- Byte helpers -----------------------------------------------------------------------------

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// A string as the spec sends it in option data: 32-bit length, then the bytes.
fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

// ---- Messages ---------------------------------------------------------------------------------

/// The greeting's handshake flags, after checking both magics at bytes 0..8 and 8..16.
pub fn decode_greeting(b: &[u8; GREETING_BYTES]) -> Result<u16, String> {
    if b[0..8] != NBD_MAGIC_BYTES || b[8..16] != IHAVEOPT_BYTES {
        return Err(format!("bad greeting magic: {:02x?}", &b[..16]));
    }
    Ok(be16(b, 16))
}

/// The client's option header (the data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn encode(&self) -> [u8; OPTION_HEADER_BYTES] {
        let mut b = [0u8; OPTION_HEADER_BYTES];
        b[..8].copy_from_slice(&IHAVEOPT_BYTES);
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The server's option reply header (the data follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn decode(b: &[u8; OPTION_REPLY_HEADER_BYTES]) -> Result<Self, String> {
        if b[..8] != NBD_REP_MAGIC_BYTES {
            return Err(format!("bad option reply magic: {:02x?}", &b[..8]));
        }
        Ok(OptionReplyHeader {
            option: be32(b, 8),
            reply_type: be32(b, 12),
            length: be32(b, 16),
        })
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO data: 32-bit name length, name, 16-bit count, 16-bit info types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string32(&mut b, &self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for info in &self.requests {
            b.extend_from_slice(&info.to_be_bytes());
        }
        b
    }
}

/// NBD_OPT_{LIST,SET}_META_CONTEXT data: export name, 32-bit query count, the queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string32(&mut b, &self.export);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string32(&mut b, q);
        }
        b
    }
}

/// One NBD_REP_INFO payload: a 16-bit information type, then its fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    /// NBD_INFO_EXPORT: 64-bit size, 16-bit transmission flags (12 bytes in all).
    Export { size: u64, transmission_flags: u16 },
    /// NBD_INFO_NAME: the name's bytes, to the end of the reply (no length prefix).
    Name(String),
    /// NBD_INFO_DESCRIPTION: likewise.
    Description(String),
    /// NBD_INFO_BLOCK_SIZE: three 32-bit sizes (14 bytes in all).
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
}

impl Info {
    pub fn decode(d: &[u8]) -> Result<Self, String> {
        if d.len() < 2 {
            return Err(format!("NBD_REP_INFO of {} bytes", d.len()));
        }
        let text = || String::from_utf8(d[2..].to_vec()).map_err(|e| e.to_string());
        match (be16(d, 0), d.len()) {
            (NBD_INFO_EXPORT, 12) => Ok(Info::Export {
                size: be64(d, 2),
                transmission_flags: be16(d, 10),
            }),
            (NBD_INFO_NAME, _) => Ok(Info::Name(text()?)),
            (NBD_INFO_DESCRIPTION, _) => Ok(Info::Description(text()?)),
            (NBD_INFO_BLOCK_SIZE, 14) => Ok(Info::BlockSize {
                minimum: be32(d, 2),
                preferred: be32(d, 6),
                maximum: be32(d, 10),
            }),
            (t, n) => Err(format!("NBD_REP_INFO type {t} with {n} bytes")),
        }
    }
}

/// A request header (a WRITE's payload follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[..4].copy_from_slice(&NBD_REQUEST_MAGIC_BYTES);
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// A reply header: simple (16 bytes) or a structured chunk's (20 bytes).
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
    /// Decodes a header from its magic; returns it and the bytes it takes. `b` holds at least
    /// the header's bytes.
    pub fn decode(b: &[u8]) -> Result<(Self, usize), String> {
        let magic: [u8; 4] = b[..4].try_into().unwrap();
        if magic == NBD_SIMPLE_REPLY_MAGIC_BYTES {
            let h = ReplyHeader::Simple {
                error: be32(b, 4),
                cookie: be64(b, 8),
            };
            return Ok((h, SIMPLE_REPLY_HEADER_BYTES));
        }
        if magic == NBD_STRUCTURED_REPLY_MAGIC_BYTES {
            let h = ReplyHeader::Structured {
                flags: be16(b, 4),
                chunk_type: be16(b, 6),
                cookie: be64(b, 8),
                length: be32(b, 16),
            };
            return Ok((h, STRUCTURED_REPLY_HEADER_BYTES));
        }
        Err(format!("bad reply magic {magic:02x?}"))
    }
}
