//! Every limit of the server, named once, and [`LIMITS`]: the one table that
//! `nbd-server limits` prints, `docs/protocol.md` lists, and `tests/docs_agree.rs` holds the
//! page to (both ways: every row of the page is here with the same value, and every limit here
//! is on the page).
//!
//! Limits of the server and its connections are defined here; those of the emulated disk,
//! its write log, the option haggling's codec, the exports and the control socket stay beside
//! the code they bound, and the table names them from there.

/// Connections served at once; a connection over the limit is closed right after `accept`.
pub const CONNECTIONS_MAX: usize = 512;
/// Threads `--workers` may ask for (the async runtime's workers serving connections).
pub const WORKER_THREADS_MAX: usize = 64;
/// Depth of the kernel's TCP accept queue (a burst of connects waits there, not in SYN retries).
pub const LISTEN_BACKLOG: u32 = 1024;
/// Connections negotiating at once; a new one past it closes the one that has been
/// negotiating longest, so idle connections cannot keep anyone else out.
pub const HANDSHAKES_MAX: usize = 64;
/// Time a client has to finish negotiation, with TLS the TLS handshake and the option
/// haggling on both sides of it together (qemu-nbd's default handshake limit).
pub const HANDSHAKE_SECONDS_MAX: u64 = 10;
/// Most options one connection may send before it is dropped (counted across STARTTLS).
pub const OPTIONS_PER_CONNECTION_MAX: u32 = 1024;
/// Longest option payload the server reads and parses.
pub const OPTION_BYTES_MAX: u32 = 64 * 1024;
/// Longest oversized option payload the server still reads and throws away to stay in step.
pub const OPTION_DISCARD_BYTES_MAX: u32 = 16 * 1024 * 1024;
/// Requests of one connection being executed or waiting for their reply to be written.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Largest READ or WRITE payload (also advertised as the maximum block size).
pub const PAYLOAD_BYTES_MAX: u32 = 32 * 1024 * 1024;
/// A WRITE above [`PAYLOAD_BYTES_MAX`] but at most this is read, thrown away and answered
/// EINVAL; a larger one drops the connection (reading it would cost up to 4 GiB).
pub const PAYLOAD_DISCARD_BYTES_MAX: u32 = 128 * 1024 * 1024;
/// Payload bytes (write data and read buffers) held by one connection's requests at once.
pub const IN_FLIGHT_PAYLOAD_BYTES_MAX: u32 = 128 * 1024 * 1024;
/// Payload bytes (write data and read buffers) held by the requests of every connection at
/// once; past it requests wait (see `connection::ServerBudget`).
pub const SERVER_PAYLOAD_BYTES_MAX: u32 = 512 * 1024 * 1024;
/// Part of [`SERVER_PAYLOAD_BYTES_MAX`] kept for requests of at most
/// [`SMALL_REQUEST_BYTES_MAX`].
pub const SERVER_PAYLOAD_RESERVE_BYTES: u32 = 64 * 1024 * 1024;
/// Requests of at most this many payload bytes may use the server's reserve (see
/// `connection::ServerBudget`).
pub const SMALL_REQUEST_BYTES_MAX: u32 = 1024 * 1024;
/// Most descriptors in one BLOCK_STATUS reply.
pub const BLOCK_STATUS_DESCRIPTORS_MAX: usize = 1024;
/// A batch of replies the socket does not take within this time drops the connection: its
/// client stopped reading, and its requests' bytes are freed for everyone else.
pub const REPLY_STALL_SECONDS_MAX: u64 = 20;
/// Longest a FLUSH waits for replies already being written (on any connection of its export)
/// to be reported with `reply_sent`; only a client that stops reading its replies makes the
/// wait this long (see [`crate::export::ReplyFence`]).
pub const FLUSH_FENCE_MILLIS_MAX: u64 = 1000;
/// Time shutdown waits for connections to finish their requests before flushing anyway.
pub const SHUTDOWN_GRACE_SECONDS: u64 = 30;
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
pub const ACCEPT_RETRY_MILLIS: u64 = 50;

/// Socket read buffer per connection: several pipelined requests per `recv`. (64 KiB, which
/// copies less of a large payload, measured slower for 1 MiB writes: more `recv` calls.)
pub const READ_BUFFER_BYTES: usize = 256 * 1024;
/// Socket write buffer per connection: several small replies per `send`.
pub const WRITE_BUFFER_BYTES: usize = 256 * 1024;
/// The writer flushes at least this often while replies keep coming.
pub const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Most replies the reader collects before handing them to the socket.
pub const PENDING_REPLIES_MAX: usize = 64;
/// Buffers kept per connection for reuse.
pub const POOL_BUFFERS_MAX: usize = 16;
/// Buffers larger than this are freed rather than kept.
pub const POOL_BUFFER_BYTES_MAX: usize = 4 * 1024 * 1024 + 64;
/// Most buffers one `readv` call fills (the kernel's IOV_MAX).
pub const READV_SLICES_MAX: usize = 1024;

/// How a limit's value reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A number of things.
    Count,
    Bytes,
    Seconds,
    Millis,
}

/// One named limit.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub name: &'static str,
    pub value: u64,
    pub unit: Unit,
    /// What it bounds, in a few words.
    pub what: &'static str,
}

impl Limit {
    /// The value as the page writes it: `512`, `64 KiB`, `32 MiB`, `10 s`, `1000 ms`.
    pub fn shown(&self) -> String {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * 1024;
        match self.unit {
            Unit::Count => self.value.to_string(),
            Unit::Bytes if self.value >= MIB && self.value.is_multiple_of(MIB) => {
                format!("{} MiB", self.value / MIB)
            }
            Unit::Bytes if self.value >= KIB && self.value.is_multiple_of(KIB) => {
                format!("{} KiB", self.value / KIB)
            }
            Unit::Bytes => format!("{} bytes", self.value),
            Unit::Seconds => format!("{} s", self.value),
            Unit::Millis => format!("{} ms", self.value),
        }
    }
}

const fn limit(name: &'static str, value: u64, unit: Unit, what: &'static str) -> Limit {
    Limit {
        name,
        value,
        unit,
        what,
    }
}

use Unit::{Bytes, Count, Millis, Seconds};

/// Every limit a user may meet, in the order `nbd-server limits` prints them.
pub const LIMITS: &[Limit] = &[
    limit(
        "CONNECTIONS_MAX",
        CONNECTIONS_MAX as u64,
        Count,
        "connections served at once",
    ),
    limit(
        "WORKER_THREADS_MAX",
        WORKER_THREADS_MAX as u64,
        Count,
        "threads serving connections (--workers)",
    ),
    limit(
        "LISTEN_BACKLOG",
        LISTEN_BACKLOG as u64,
        Count,
        "connects waiting in the kernel's accept queue",
    ),
    limit(
        "HANDSHAKES_MAX",
        HANDSHAKES_MAX as u64,
        Count,
        "connections negotiating at once (past it the oldest is closed)",
    ),
    limit(
        "HANDSHAKE_SECONDS_MAX",
        HANDSHAKE_SECONDS_MAX,
        Seconds,
        "time to finish negotiation, TLS included",
    ),
    limit(
        "OPTIONS_PER_CONNECTION_MAX",
        OPTIONS_PER_CONNECTION_MAX as u64,
        Count,
        "options one connection may send",
    ),
    limit(
        "OPTION_BYTES_MAX",
        OPTION_BYTES_MAX as u64,
        Bytes,
        "option payload read and parsed",
    ),
    limit(
        "OPTION_DISCARD_BYTES_MAX",
        OPTION_DISCARD_BYTES_MAX as u64,
        Bytes,
        "oversized option payload still read and thrown away",
    ),
    limit(
        "META_CONTEXT_QUERIES_MAX",
        crate::proto::META_CONTEXT_QUERIES_MAX as u64,
        Count,
        "queries in one meta context option",
    ),
    limit(
        "EXPORTS_MAX",
        crate::export::EXPORTS_MAX as u64,
        Count,
        "exports one server serves",
    ),
    limit(
        "REQUESTS_IN_FLIGHT_MAX",
        REQUESTS_IN_FLIGHT_MAX as u64,
        Count,
        "requests of one connection in flight",
    ),
    limit(
        "PAYLOAD_BYTES_MAX",
        PAYLOAD_BYTES_MAX as u64,
        Bytes,
        "READ or WRITE payload (the advertised maximum block size)",
    ),
    limit(
        "PAYLOAD_DISCARD_BYTES_MAX",
        PAYLOAD_DISCARD_BYTES_MAX as u64,
        Bytes,
        "oversized WRITE payload still read, thrown away and answered EINVAL",
    ),
    limit(
        "IN_FLIGHT_PAYLOAD_BYTES_MAX",
        IN_FLIGHT_PAYLOAD_BYTES_MAX as u64,
        Bytes,
        "payload bytes (write data and read buffers) of one connection in flight",
    ),
    limit(
        "SERVER_PAYLOAD_BYTES_MAX",
        SERVER_PAYLOAD_BYTES_MAX as u64,
        Bytes,
        "payload bytes of every connection in flight",
    ),
    limit(
        "SERVER_PAYLOAD_RESERVE_BYTES",
        SERVER_PAYLOAD_RESERVE_BYTES as u64,
        Bytes,
        "of those, kept for requests of at most SMALL_REQUEST_BYTES_MAX",
    ),
    limit(
        "SMALL_REQUEST_BYTES_MAX",
        SMALL_REQUEST_BYTES_MAX as u64,
        Bytes,
        "payload of a request that may use the reserve",
    ),
    limit(
        "BLOCK_STATUS_DESCRIPTORS_MAX",
        BLOCK_STATUS_DESCRIPTORS_MAX as u64,
        Count,
        "descriptors in one BLOCK_STATUS reply",
    ),
    limit(
        "REPLY_STALL_SECONDS_MAX",
        REPLY_STALL_SECONDS_MAX,
        Seconds,
        "time a client may take no reply before it is dropped",
    ),
    limit(
        "FLUSH_FENCE_MILLIS_MAX",
        FLUSH_FENCE_MILLIS_MAX,
        Millis,
        "time a FLUSH waits for replies already on their way",
    ),
    limit(
        "SHUTDOWN_GRACE_SECONDS",
        SHUTDOWN_GRACE_SECONDS,
        Seconds,
        "time shutdown waits for requests in flight",
    ),
    limit(
        "CACHE_BYTES_MAX",
        crate::disk::CACHE_BYTES_MAX,
        Bytes,
        "pending write data in an emulated disk's cache (default of cache=)",
    ),
    limit(
        "CACHE_ENTRIES_MAX",
        crate::disk::CACHE_ENTRIES_MAX as u64,
        Count,
        "pending writes in an emulated disk's cache",
    ),
    limit(
        "RECORD_PAYLOAD_BYTES_MAX",
        crate::log::RECORD_PAYLOAD_BYTES_MAX as u64,
        Bytes,
        "payload of one write-log record",
    ),
    limit(
        "RECORD_MAX_SLACK_BYTES",
        crate::disk::RECORD_MAX_SLACK_BYTES,
        Bytes,
        "how far flush, mark, fault and power-cut records may pass record-max",
    ),
    limit(
        "RECORDER_QUEUE_RECORDS_MAX",
        crate::disk::RECORDER_QUEUE_RECORDS_MAX as u64,
        Count,
        "records queued for the write log's thread",
    ),
    limit(
        "RECORDER_QUEUE_BYTES_MAX",
        crate::disk::RECORDER_QUEUE_BYTES_MAX,
        Bytes,
        "payload bytes queued for the write log's thread",
    ),
    limit(
        "SPARE_BLOCKS_MAX",
        crate::backend::memory::SPARE_BLOCKS_MAX as u64,
        Count,
        "freed 4 KiB blocks a memory export keeps for new writes",
    ),
    limit(
        "CONTROL_LINE_BYTES_MAX",
        crate::control::CONTROL_LINE_BYTES_MAX as u64,
        Bytes,
        "one control-socket request line",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_values_read_back() {
        let mut names: Vec<_> = LIMITS.iter().map(|l| l.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), LIMITS.len());
        for l in LIMITS {
            let shown = l.shown();
            let (number, unit) = shown.split_once(' ').unwrap_or((&shown, ""));
            let scale = match unit {
                "MiB" => 1 << 20,
                "KiB" => 1 << 10,
                _ => 1,
            };
            assert_eq!(
                number.parse::<u64>().unwrap() * scale,
                l.value,
                "{}",
                l.name
            );
        }
    }
}
