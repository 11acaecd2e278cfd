//! Block devices for fs-core outside the scheduler: a raw image file or an NBD export (through
//! the `nbd` crate's client) for the `crashmonkey fs` commands, and an in-memory crash state
//! (a prefix image and the state's own blocks) for campaigns.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;

use fs_core::block::{
    BlockDevice, BlockMap, Completion, DeviceError, ReqId, Request, RequestQueue, BLOCK_SIZE,
};

const BS: u64 = BLOCK_SIZE as u64;
/// NBD's default port, for `nbd://HOST/EXPORT`.
pub const NBD_PORT_DEFAULT: u16 = 10809;
/// How long a remote export may take to answer.
pub const NBD_IO_SECONDS_MAX: u64 = 60;
/// How long connecting to an NBD server may take: without a limit, a host that drops
/// packets holds the command for the kernel's SYN retries (about two minutes).
pub const NBD_CONNECT_SECONDS_MAX: u64 = 10;

/// fs-core's device over anything that reads, writes and seeks. Flush is the stream's flush
/// (an NBD FLUSH for the `nbd` client; for a file, `fdatasync` is the caller's, at the end).
pub struct StreamDevice<T: Read + Write + Seek> {
    io: T,
    blocks: u64,
    queue: RequestQueue,
    writable: bool,
}

impl<T: Read + Write + Seek> StreamDevice<T> {
    pub fn new(io: T, bytes: u64, writable: bool) -> Self {
        let blocks = bytes / BS;
        StreamDevice {
            io,
            blocks,
            queue: RequestQueue::new(blocks),
            writable,
        }
    }

    fn io_err(e: std::io::Error) -> DeviceError {
        DeviceError::Io(e.to_string())
    }

    /// The stream, back (a file to sync).
    pub fn into_inner(self) -> T {
        self.io
    }
}

impl<T: Read + Write + Seek> BlockDevice for StreamDevice<T> {
    fn block_count(&self) -> u64 {
        self.blocks
    }

    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        let write = matches!(req, Request::Write { .. } | Request::Trim { .. });
        if write && !self.writable {
            return Err(DeviceError::Io("the device is read-only".into()));
        }
        self.queue.submit(req)
    }

    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError> {
        match self.queue.take(id)? {
            Request::Read { block } => {
                let mut data = vec![0u8; BLOCK_SIZE];
                self.io
                    .seek(SeekFrom::Start(block * BS))
                    .map_err(Self::io_err)?;
                self.io.read_exact(&mut data).map_err(Self::io_err)?;
                Ok(Completion::Read { data })
            }
            Request::Write { block, data, .. } => {
                self.io
                    .seek(SeekFrom::Start(block * BS))
                    .map_err(Self::io_err)?;
                self.io.write_all(&data).map_err(Self::io_err)?;
                Ok(Completion::Done)
            }
            Request::Trim { block, count } => {
                let zero = vec![0u8; BLOCK_SIZE];
                for b in block..block + count {
                    self.io
                        .seek(SeekFrom::Start(b * BS))
                        .map_err(Self::io_err)?;
                    self.io.write_all(&zero).map_err(Self::io_err)?;
                }
                Ok(Completion::Done)
            }
            Request::Flush => {
                self.io.flush().map_err(Self::io_err)?;
                Ok(Completion::Done)
            }
        }
    }
}

/// Where an `IMAGE` argument points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    File(std::path::PathBuf),
    Nbd {
        host: String,
        port: u16,
        export: String,
    },
}

impl Target {
    /// `nbd://HOST[:PORT]/EXPORT` or a path.
    pub fn parse(s: &str) -> anyhow::Result<Target> {
        let Some(rest) = s.strip_prefix("nbd://") else {
            return Ok(Target::File(s.into()));
        };
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse()
                    .map_err(|_| anyhow::anyhow!("{s}: port {p:?} is not a number"))?,
            ),
            None => (hostport.to_string(), NBD_PORT_DEFAULT),
        };
        if host.is_empty() {
            anyhow::bail!("{s}: no host (expected nbd://HOST[:PORT]/EXPORT)");
        }
        Ok(Target::Nbd {
            host,
            port,
            export: export.to_string(),
        })
    }

    /// Opens the device. A file that is not a whole number of 4 KiB blocks is refused.
    pub fn open(&self, writable: bool) -> anyhow::Result<Box<dyn BlockDevice>> {
        match self {
            Target::File(path) => {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let m = f.metadata()?;
                if m.is_dir() {
                    anyhow::bail!("{} is a directory, not a disk image", path.display());
                }
                let len = m.len();
                if len == 0 || len % BS != 0 {
                    anyhow::bail!(
                        "{} is {len} bytes, not a whole number of 4096-byte blocks",
                        path.display()
                    );
                }
                Ok(Box::new(StreamDevice::new(f, len, writable)))
            }
            Target::Nbd { host, port, export } => {
                let s = connect(host, *port)?;
                let limit = Some(std::time::Duration::from_secs(NBD_IO_SECONDS_MAX));
                s.set_read_timeout(limit)?;
                s.set_write_timeout(limit)?;
                let mut s2 = s.try_clone()?;
                let info = nbd::client::handshake(&mut s2, export.as_bytes()).map_err(|e| {
                    // NBD_OPT_EXPORT_NAME has no error reply: a server without the export
                    // just closes the connection.
                    let hint = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        format!(" (the server closed the connection: no export named {export:?}?)")
                    } else {
                        String::new()
                    };
                    anyhow::anyhow!("nbd://{host}:{port}/{export}: NBD handshake failed: {e}{hint}")
                })?;
                let size = info.size;
                if writable && info.readonly {
                    anyhow::bail!("nbd://{host}:{port}/{export} is read-only");
                }
                let client = nbd::client::NbdClient::new(s, &info);
                Ok(Box::new(StreamDevice::new(client, size, writable)))
            }
        }
    }
}

/// A TCP connection to `host:port` (each address it resolves to, in turn), within
/// [`NBD_CONNECT_SECONDS_MAX`] per address.
fn connect(host: &str, port: u16) -> anyhow::Result<TcpStream> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs = (bare, port)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("nbd://{host}:{port}: cannot resolve {host:?}: {e}"))?;
    let limit = std::time::Duration::from_secs(NBD_CONNECT_SECONDS_MAX);
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, limit) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(anyhow::anyhow!("nbd://{host}:{port}: cannot connect: {e}")),
        None => Err(anyhow::anyhow!(
            "nbd://{host}:{port}: {host:?} has no address"
        )),
    }
}

/// A crash state in memory: the epoch's prefix image (shared by every state of the epoch)
/// with the state's own blocks laid over it. Writes go to the state's blocks.
pub struct StateDevice {
    prefix: Arc<Vec<u8>>,
    blocks: BlockMap<Vec<u8>>,
    queue: RequestQueue,
}

impl StateDevice {
    pub fn new(prefix: Arc<Vec<u8>>, blocks: BlockMap<Vec<u8>>) -> Self {
        let n = prefix.len() as u64 / BS;
        StateDevice {
            prefix,
            blocks,
            queue: RequestQueue::new(n),
        }
    }
}

impl BlockDevice for StateDevice {
    fn block_count(&self) -> u64 {
        self.prefix.len() as u64 / BS
    }

    fn submit(&mut self, req: Request) -> Result<ReqId, DeviceError> {
        self.queue.submit(req)
    }

    fn complete(&mut self, id: ReqId) -> Result<Completion, DeviceError> {
        match self.queue.take(id)? {
            Request::Read { block } => {
                let data = match self.blocks.get(&block) {
                    Some(d) => d.clone(),
                    None => {
                        let at = (block * BS) as usize;
                        self.prefix[at..at + BLOCK_SIZE].to_vec()
                    }
                };
                Ok(Completion::Read { data })
            }
            Request::Write { block, data, .. } => {
                self.blocks.insert(block, data.into_vec());
                Ok(Completion::Done)
            }
            Request::Trim { block, count } => {
                for b in block..block + count {
                    self.blocks.insert(b, vec![0; BLOCK_SIZE]);
                }
                Ok(Completion::Done)
            }
            Request::Flush => Ok(Completion::Done),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            Target::parse("nbd://127.0.0.1:10810/vm").unwrap(),
            Target::Nbd {
                host: "127.0.0.1".into(),
                port: 10810,
                export: "vm".into()
            }
        );
        assert_eq!(
            Target::parse("nbd://host/d").unwrap(),
            Target::Nbd {
                host: "host".into(),
                port: NBD_PORT_DEFAULT,
                export: "d".into()
            }
        );
        assert!(Target::parse("nbd://:1/x").is_err());
        assert!(Target::parse("nbd://h:port/x").is_err());
        assert_eq!(
            Target::parse("/tmp/a.img").unwrap(),
            Target::File("/tmp/a.img".into())
        );
    }
}
