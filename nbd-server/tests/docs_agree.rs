//! `docs/protocol.md` states the server's limits; this test keeps the page and the code in
//! agreement (a changed constant fails here until the page says the same).

use nbd_server::{connection, export, handshake, proto, server};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

#[test]
fn limits_in_protocol_md_match_the_code() {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .unwrap();
    let limits: [(&str, u64, &str); 17] = [
        ("HANDSHAKE_SECONDS_MAX", server::HANDSHAKE_SECONDS_MAX, "10"),
        ("HANDSHAKES_MAX", server::HANDSHAKES_MAX as u64, "64"),
        (
            "REPLY_STALL_SECONDS_MAX",
            server::REPLY_STALL_SECONDS_MAX,
            "20",
        ),
        (
            "SERVER_PAYLOAD_BYTES_MAX",
            server::SERVER_PAYLOAD_BYTES_MAX as u64 / MIB,
            "512 MiB",
        ),
        (
            "SERVER_PAYLOAD_RESERVE_BYTES",
            server::SERVER_PAYLOAD_RESERVE_BYTES as u64 / MIB,
            "64 MiB",
        ),
        ("CONNECTIONS_MAX", server::CONNECTIONS_MAX as u64, "512"),
        ("LISTEN_BACKLOG", server::LISTEN_BACKLOG as u64, "1024"),
        (
            "REQUESTS_IN_FLIGHT_MAX",
            server::REQUESTS_IN_FLIGHT_MAX as u64,
            "256",
        ),
        (
            "IN_FLIGHT_PAYLOAD_BYTES_MAX",
            server::IN_FLIGHT_PAYLOAD_BYTES_MAX as u64 / MIB,
            "128 MiB",
        ),
        (
            "PAYLOAD_BYTES_MAX",
            server::PAYLOAD_BYTES_MAX as u64 / MIB,
            "32 MiB",
        ),
        (
            "OPTION_BYTES_MAX",
            handshake::OPTION_BYTES_MAX as u64 / KIB,
            "64 KiB",
        ),
        (
            "BLOCK_STATUS_DESCRIPTORS_MAX",
            connection::BLOCK_STATUS_DESCRIPTORS_MAX as u64,
            "1024",
        ),
        (
            "META_CONTEXT_QUERIES_MAX",
            proto::META_CONTEXT_QUERIES_MAX as u64,
            "128",
        ),
        ("EXPORTS_MAX", export::EXPORTS_MAX as u64, "256"),
        (
            "SHUTDOWN_GRACE_SECONDS",
            server::SHUTDOWN_GRACE_SECONDS,
            "30",
        ),
        (
            "FLUSH_FENCE_MILLIS_MAX",
            connection::FLUSH_FENCE_MILLIS_MAX,
            "1000",
        ),
        (
            "OPTIONS_PER_CONNECTION_MAX",
            handshake::OPTIONS_PER_CONNECTION_MAX as u64,
            "1024",
        ),
    ];
    for (name, value, text) in limits {
        let number: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(
            value, number,
            "{name} is {value} in the code but {text} in the table below"
        );
        let needle = format!("`{name}` {text}");
        assert!(
            page.contains(&needle),
            "docs/protocol.md should say {needle:?}"
        );
    }
}
