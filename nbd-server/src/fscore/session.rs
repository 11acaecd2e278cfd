//! Sessions: what an fs-core export did, recorded so that it replays in process to the same
//! bytes. `docs/fscore-export.md` documents the format byte by byte (and a test holds this
//! code to it).
//!
//! A session file is a header, then records in the order things happened on the volume's
//! engine thread: each request as it arrived (with its payload), the steps the policy chose
//! between them (the materialised schedule), each answer (with a hash of the bytes a read
//! returned), power cuts, and the end. Steps are buffered and written as one record before
//! the next other record, so the order of the file is the order of events. Memory stays
//! bounded: everything is streamed.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::volume::{Answer, VolFile, VolOp, VolRequest};

/// The file's first 8 bytes.
pub const SESSION_MAGIC: [u8; 8] = *b"FSCSESS\0";
/// The format version this code writes and reads.
pub const SESSION_VERSION: u32 = 1;
/// Largest header (JSON) accepted.
pub const SESSION_HEADER_BYTES_MAX: u32 = 1 << 20;
/// Steps buffered before they are written as one record.
pub const SESSION_STEPS_PER_RECORD_MAX: usize = 65_536;
/// Largest record body (a WRITE's arrival with its data; the NBD server's own limit on a
/// write is lower).
pub const SESSION_RECORD_BYTES_MAX: u64 = 64 << 20;
/// Bytes of an arrival record's body before the payload.
pub const ARRIVE_HEADER_BYTES: usize = 30;

/// Record tags.
pub const TAG_STEPS: u8 = b'S';
pub const TAG_ARRIVE: u8 = b'A';
pub const TAG_ANSWER: u8 = b'R';
pub const TAG_POWER_CUT: u8 = b'C';
pub const TAG_END: u8 = b'E';

/// Request kinds in an arrival record.
pub const OP_READ: u8 = 1;
pub const OP_WRITE: u8 = 2;
pub const OP_TRIM: u8 = 3;
pub const OP_ZERO_MAY_TRIM: u8 = 4;
pub const OP_ZERO_NO_HOLE: u8 = 5;
pub const OP_FLUSH: u8 = 6;
pub const OP_CACHE: u8 = 7;

/// What a replay needs to build the volume as the server did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionHeader {
    /// fs-core's switches.
    pub config: fs_core::Config,
    /// The exports' files, in export order.
    pub files: Vec<VolFile>,
    /// Inodes mkfs made.
    pub inodes: u64,
    /// The device under fs-core, in 4 KiB blocks.
    pub device_blocks: u64,
    /// The scheduler's seed.
    pub sched_seed: u64,
    /// The emulated disk's volatile cache limit in bytes (a power cut's survivors depend on it).
    pub disk_cache_bytes: u64,
}

/// Why a session could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a session file (magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("session format version {0}; this build reads version {SESSION_VERSION}")]
    Version(u32),
    #[error("the header is {0} bytes, more than {SESSION_HEADER_BYTES_MAX}")]
    HeaderTooBig(u32),
    #[error("the header is not valid: {0}")]
    Header(String),
    #[error("record {index}: {what}")]
    Bad { index: u64, what: String },
    #[error("the session ends inside record {0} (the server stopped while writing it?)")]
    Truncated(u64),
}

/// One event of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Steps(Vec<u32>),
    Arrive {
        id: u64,
        req: VolRequest,
    },
    Answer {
        id: u64,
        ok: bool,
        hash: u64,
        len: u32,
    },
    PowerCut {
        seed: u64,
    },
    End {
        steps: u64,
    },
}

/// The hash an answer record keeps of the bytes a read returned (0 for none).
pub fn answer_hash(answer: &Answer) -> (bool, u64, u32) {
    match answer {
        Ok(Some(d)) => (true, fs_core::block::content_hash(d), d.len() as u32),
        Ok(None) => (true, 0, 0),
        Err(_) => (false, 0, 0),
    }
}

/// Writes a session as it happens.
#[derive(Debug)]
pub struct SessionWriter {
    out: BufWriter<File>,
    steps: Vec<u32>,
}

impl SessionWriter {
    /// Creates `path` (refusing to replace a file there) and writes the header.
    pub fn create(path: &Path, header: &SessionHeader) -> io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)?;
        let mut out = BufWriter::new(f);
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        out.write_all(&SESSION_MAGIC)?;
        out.write_all(&SESSION_VERSION.to_le_bytes())?;
        out.write_all(&(json.len() as u32).to_le_bytes())?;
        out.write_all(&json)?;
        Ok(SessionWriter {
            out,
            steps: Vec::new(),
        })
    }

    /// A step the engine ran.
    pub fn step(&mut self, task: u32) -> io::Result<()> {
        self.steps.push(task);
        if self.steps.len() >= SESSION_STEPS_PER_RECORD_MAX {
            self.flush_steps()?;
        }
        Ok(())
    }

    /// Writes one record: tag, body length, body, CRC-32C of the three.
    fn emit(&mut self, tag: u8, body: &[u8]) -> io::Result<()> {
        let len = (body.len() as u32).to_le_bytes();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&[tag]), &len);
        let crc = crc32c::crc32c_append(crc, body);
        self.out.write_all(&[tag])?;
        self.out.write_all(&len)?;
        self.out.write_all(body)?;
        self.out.write_all(&crc.to_le_bytes())
    }

    fn flush_steps(&mut self) -> io::Result<()> {
        if self.steps.is_empty() {
            return Ok(());
        }
        let body: Vec<u8> = self.steps.drain(..).flat_map(u32::to_le_bytes).collect();
        self.emit(TAG_STEPS, &body)
    }

    pub fn arrive(&mut self, id: u64, req: &VolRequest) -> io::Result<()> {
        self.flush_steps()?;
        let (op, len, payload): (u8, u64, &[u8]) = match &req.op {
            VolOp::Read { len } => (OP_READ, *len, &[]),
            VolOp::Write { data } => (OP_WRITE, data.len() as u64, data),
            VolOp::Trim { len } => (OP_TRIM, *len, &[]),
            VolOp::Zero {
                len,
                may_trim: true,
            } => (OP_ZERO_MAY_TRIM, *len, &[]),
            VolOp::Zero { len, .. } => (OP_ZERO_NO_HOLE, *len, &[]),
            VolOp::Flush => (OP_FLUSH, 0, &[]),
            VolOp::Cache { len } => (OP_CACHE, *len, &[]),
        };
        let mut body = Vec::with_capacity(ARRIVE_HEADER_BYTES + payload.len());
        body.extend_from_slice(&id.to_le_bytes());
        body.extend_from_slice(&(req.file as u32).to_le_bytes());
        body.extend_from_slice(&[op, u8::from(req.fua)]);
        body.extend_from_slice(&req.offset.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(payload);
        self.emit(TAG_ARRIVE, &body)
    }

    pub fn answer(&mut self, id: u64, answer: &Answer) -> io::Result<()> {
        self.flush_steps()?;
        let (ok, hash, len) = answer_hash(answer);
        let mut body = Vec::with_capacity(21);
        body.extend_from_slice(&id.to_le_bytes());
        body.push(u8::from(ok));
        body.extend_from_slice(&hash.to_le_bytes());
        body.extend_from_slice(&len.to_le_bytes());
        self.emit(TAG_ANSWER, &body)
    }

    pub fn power_cut(&mut self, seed: u64) -> io::Result<()> {
        self.flush_steps()?;
        self.emit(TAG_POWER_CUT, &seed.to_le_bytes())
    }

    /// Writes the end record and flushes the file.
    pub fn end(mut self, steps: u64) -> io::Result<()> {
        self.flush_steps()?;
        self.emit(TAG_END, &steps.to_le_bytes())?;
        self.out.flush()?;
        self.out.get_ref().sync_data()
    }

    /// Hands what is buffered to the OS (the server does this when it goes idle).
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_steps()?;
        self.out.flush()
    }
}

/// Reads a session, one event at a time.
#[derive(Debug)]
pub struct SessionReader {
    input: BufReader<File>,
    pub header: SessionHeader,
    index: u64,
}

impl SessionReader {
    pub fn open(path: &Path) -> Result<Self, SessionError> {
        let mut input = BufReader::new(File::open(path)?);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic)?;
        if magic != SESSION_MAGIC {
            return Err(SessionError::Magic(magic));
        }
        let version = read_u32(&mut input)?;
        if version != SESSION_VERSION {
            return Err(SessionError::Version(version));
        }
        let len = read_u32(&mut input)?;
        if len > SESSION_HEADER_BYTES_MAX {
            return Err(SessionError::HeaderTooBig(len));
        }
        let mut json = vec![0u8; len as usize];
        input.read_exact(&mut json)?;
        let header =
            serde_json::from_slice(&json).map_err(|e| SessionError::Header(e.to_string()))?;
        Ok(SessionReader {
            input,
            header,
            index: 0,
        })
    }

    /// The next event; `None` at the end of the file.
    pub fn next_event(&mut self) -> Result<Option<Event>, SessionError> {
        let mut tag = [0u8; 1];
        if self.input.read(&mut tag)? == 0 {
            return Ok(None);
        }
        self.index += 1;
        let index = self.index;
        let truncated = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => SessionError::Truncated(index),
            _ => SessionError::Io(e),
        };
        let len = read_u32(&mut self.input).map_err(truncated)?;
        if u64::from(len) > SESSION_RECORD_BYTES_MAX {
            return Err(self.bad(format!("a record of {len} bytes")));
        }
        let mut body = vec![0u8; len as usize];
        self.input.read_exact(&mut body).map_err(truncated)?;
        let stored = read_u32(&mut self.input).map_err(truncated)?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&tag), &len.to_le_bytes());
        if crc32c::crc32c_append(crc, &body) != stored {
            return Err(self.bad("its checksum does not hold".into()));
        }
        self.decode(tag[0], &body).map(Some)
    }

    fn decode(&self, tag: u8, body: &[u8]) -> Result<Event, SessionError> {
        let mut c = Cursor(body);
        let short = |_| self.bad(format!("record {tag:#04x} is too short"));
        let event = match tag {
            TAG_STEPS => {
                if !body.len().is_multiple_of(4) {
                    return Err(self.bad("steps are 4 bytes each".into()));
                }
                Event::Steps(
                    body.chunks_exact(4)
                        .map(|b| u32::from_le_bytes(b.try_into().expect("4")))
                        .collect(),
                )
            }
            TAG_ARRIVE => self.arrival(body)?,
            TAG_ANSWER => Event::Answer {
                id: c.u64().map_err(short)?,
                ok: c.u8().map_err(short)? != 0,
                hash: c.u64().map_err(short)?,
                len: c.u32().map_err(short)?,
            },
            TAG_POWER_CUT => Event::PowerCut {
                seed: c.u64().map_err(short)?,
            },
            TAG_END => Event::End {
                steps: c.u64().map_err(short)?,
            },
            t => return Err(self.bad(format!("unknown record tag 0x{t:02x}"))),
        };
        Ok(event)
    }

    fn arrival(&self, body: &[u8]) -> Result<Event, SessionError> {
        if body.len() < ARRIVE_HEADER_BYTES {
            return Err(self.bad("an arrival record is too short".into()));
        }
        let mut c = Cursor(body);
        let short = |_| self.bad("an arrival record is too short".into());
        let id = c.u64().map_err(short)?;
        let file = c.u32().map_err(short)? as usize;
        let op = c.u8().map_err(short)?;
        let fua = c.u8().map_err(short)? != 0;
        let offset = c.u64().map_err(short)?;
        let len = c.u64().map_err(short)?;
        let payload = c.0;
        let fits = if op == OP_WRITE {
            payload.len() as u64 == len
        } else {
            payload.is_empty()
        };
        if !fits {
            return Err(self.bad(format!(
                "a request of kind {op} with {} payload bytes for length {len}",
                payload.len()
            )));
        }
        let op = match op {
            OP_READ => VolOp::Read { len },
            OP_WRITE => VolOp::Write {
                data: payload.to_vec(),
            },
            OP_TRIM => VolOp::Trim { len },
            OP_ZERO_MAY_TRIM => VolOp::Zero {
                len,
                may_trim: true,
            },
            OP_ZERO_NO_HOLE => VolOp::Zero {
                len,
                may_trim: false,
            },
            OP_FLUSH => VolOp::Flush,
            OP_CACHE => VolOp::Cache { len },
            k => return Err(self.bad(format!("unknown request kind {k}"))),
        };
        Ok(Event::Arrive {
            id,
            req: VolRequest {
                file,
                offset,
                op,
                fua,
            },
        })
    }

    fn bad(&self, what: String) -> SessionError {
        SessionError::Bad {
            index: self.index,
            what,
        }
    }
}

/// Reads little-endian fields off the front of a record's body.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], ()> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(())?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, ()> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, ()> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, ()> {
        self.take().map(u64::from_le_bytes)
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SessionHeader {
        SessionHeader {
            config: fs_core::Config::default(),
            files: vec![VolFile {
                name: "vm".into(),
                ino: 0,
                size: 1 << 20,
            }],
            inodes: 16,
            device_blocks: 1024,
            sched_seed: 7,
            disk_cache_bytes: 1 << 20,
        }
    }

    #[test]
    fn every_event_round_trips_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = SessionWriter::create(&path, &header()).unwrap();
        let write = VolRequest {
            file: 0,
            offset: 512,
            op: VolOp::Write {
                data: vec![1, 2, 3],
            },
            fua: true,
        };
        w.step(3).unwrap();
        w.step(1).unwrap();
        w.arrive(0, &write).unwrap();
        w.step(4).unwrap();
        w.answer(0, &Ok(Some(vec![9; 10]))).unwrap();
        w.power_cut(42).unwrap();
        w.end(3).unwrap();
        let mut r = SessionReader::open(&path).unwrap();
        assert_eq!(r.header, header());
        let mut events = Vec::new();
        while let Some(e) = r.next_event().unwrap() {
            events.push(e);
        }
        let hash = fs_core::block::content_hash(&[9; 10]);
        assert_eq!(
            events,
            vec![
                Event::Steps(vec![3, 1]),
                Event::Arrive { id: 0, req: write },
                Event::Steps(vec![4]),
                Event::Answer {
                    id: 0,
                    ok: true,
                    hash,
                    len: 10
                },
                Event::PowerCut { seed: 42 },
                Event::End { steps: 3 },
            ]
        );
        assert!(
            SessionWriter::create(&path, &header()).is_err(),
            "never replaces a file"
        );
    }

    #[test]
    fn a_cut_off_session_says_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut w = SessionWriter::create(&path, &header()).unwrap();
        w.power_cut(1).unwrap();
        w.flush().unwrap();
        drop(w);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        let mut r = SessionReader::open(&path).unwrap();
        assert!(matches!(r.next_event(), Err(SessionError::Truncated(1))));
        let mut w = SessionWriter::create(&dir.path().join("t"), &header()).unwrap();
        w.power_cut(1).unwrap();
        w.end(0).unwrap();
        let mut bytes = std::fs::read(dir.path().join("t")).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let mut r = SessionReader::open(&path).unwrap();
        let e = r.next_event().and_then(|_| r.next_event()).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        std::fs::write(&path, b"not a session at all").unwrap();
        assert!(matches!(
            SessionReader::open(&path),
            Err(SessionError::Magic(_))
        ));
    }
}
