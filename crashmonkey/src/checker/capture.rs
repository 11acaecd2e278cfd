//! The checker's stdout and stderr, read as they come: the head of each is kept, the rest is
//! counted and dropped, so a checker that prints gigabytes neither blocks nor grows us.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{ChildStderr, ChildStdout};
use std::time::Duration;

use super::sys;

/// Bytes kept of each of the two streams: together the cap on a state's kept output.
pub const CHECKER_STREAM_BYTES_MAX: usize = super::CHECKER_OUTPUT_BYTES_MAX / 2;
/// Bytes read from a pipe at a time (a pipe holds 64 KiB by default).
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// One output stream: its pipe while it is open, the bytes kept, and how many were dropped.
struct Stream {
    name: &'static str,
    pipe: Option<File>,
    kept: Vec<u8>,
    dropped: u64,
}

impl Stream {
    fn new(name: &'static str, pipe: Option<OwnedFd>) -> Self {
        Stream {
            name,
            pipe: pipe.map(File::from),
            kept: Vec::new(),
            dropped: 0,
        }
    }

    /// Reads once from the pipe (`poll` said it would not block); closes it at its end.
    fn read_chunk(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let Some(pipe) = self.pipe.as_mut() else {
            return Ok(());
        };
        match pipe.read(buf) {
            Ok(0) => self.pipe = None,
            Ok(n) => self.keep(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = CHECKER_STREAM_BYTES_MAX - self.kept.len();
        let n = room.min(bytes.len());
        self.kept.extend_from_slice(&bytes[..n]);
        self.dropped += (bytes.len() - n) as u64;
        debug_assert!(self.kept.len() <= CHECKER_STREAM_BYTES_MAX);
    }
}

/// The checker's stdout and stderr.
pub struct Streams {
    streams: [Stream; 2],
    buf: Vec<u8>,
}

impl Streams {
    pub fn new(stdout: Option<ChildStdout>, stderr: Option<ChildStderr>) -> Self {
        Streams {
            streams: [
                Stream::new("stdout", stdout.map(OwnedFd::from)),
                Stream::new("stderr", stderr.map(OwnedFd::from)),
            ],
            buf: vec![0; READ_CHUNK_BYTES],
        }
    }

    /// Whether every writer of both pipes has closed them.
    pub fn all_closed(&self) -> bool {
        self.streams.iter().all(|s| s.pipe.is_none())
    }

    /// Waits up to `wait` for output, or for `also` to be readable, then reads a chunk from
    /// each stream that has some.
    pub fn pump(&mut self, wait: Duration, also: Option<RawFd>) -> io::Result<()> {
        let open: Vec<(usize, RawFd)> = self
            .streams
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.pipe.as_ref().map(|p| (i, p.as_raw_fd())))
            .collect();
        let mut fds: Vec<RawFd> = open.iter().map(|&(_, fd)| fd).collect();
        fds.extend(also);
        if fds.is_empty() {
            std::thread::sleep(wait);
            return Ok(());
        }
        let ready = sys::poll_readable(&fds, wait)?;
        for (&(i, _), ready) in open.iter().zip(ready) {
            if ready {
                self.streams[i].read_chunk(&mut self.buf)?;
            }
        }
        Ok(())
    }

    /// Stdout then stderr as text, each followed by a note if it was cut.
    pub fn text(&self) -> String {
        let mut text = String::new();
        for s in &self.streams {
            text.push_str(&String::from_utf8_lossy(&s.kept));
            if s.dropped > 0 {
                text.push_str(&format!(
                    "\n[{} cut: {} bytes kept, {} bytes dropped]\n",
                    s.name,
                    s.kept.len(),
                    s.dropped
                ));
            }
        }
        text
    }
}
