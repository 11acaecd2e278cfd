//! Byte-level protocol tests: every option and every command, each error path, with a raw
//! client that writes and checks the bytes the spec describes.

mod common;

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::wire::*;
use common::*;
use nbd_server::backend::*;
use nbd_server::{Export, ExportRegistry, Server, ServerConfig};

fn client(t: &TestServer) -> Raw {
    let mut c = Raw::connect(t.addr);
    c.handshake(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    c
}

fn go(t: &TestServer, export: &str, structured: bool, meta: bool) -> Raw {
    let mut c = client(t);
    c.go(export, structured, meta).expect("GO");
    c
}

#[test]
fn greeting_is_fixed_newstyle_with_no_zeroes() {
    let t = TestServer::start();
    let mut c = Raw::connect(t.addr);
    let b = c.read_n(GREETING_BYTES);
    assert_eq!(&b[0..8], b"NBDMAGIC");
    assert_eq!(&b[8..16], b"IHAVEOPT");
    assert_eq!(u16::from_be_bytes([b[16], b[17]]), 3);
}

#[test]
fn export_name_with_and_without_no_zeroes() {
    let t = TestServer::start();
    for (flags, extra) in [
        (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES, 0),
        (NBD_FLAG_C_FIXED_NEWSTYLE, 124),
        (0, 124),
    ] {
        let mut c = Raw::connect(t.addr);
        c.handshake(flags);
        c.option(NBD_OPT_EXPORT_NAME, b"disk");
        let b = c.read_n(10 + extra);
        assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), DISK_BYTES);
        let tf = u16::from_be_bytes([b[8], b[9]]);
        assert_ne!(tf & NBD_FLAG_SEND_FLUSH, 0);
        assert_eq!(tf & NBD_FLAG_SEND_DF, 0, "no DF without structured replies");
        assert!(b[10..].iter().all(|&x| x == 0));
        c.request(0, NBD_CMD_READ, 1, 0, 512, &[]);
        assert_eq!(c.simple_reply(512), (0, 1, vec![0; 512]));
        c.disc();
    }
}

#[test]
fn export_name_empty_is_the_default_and_unknown_closes() {
    let t = TestServer::start();
    let mut c = client(&t);
    c.option(NBD_OPT_EXPORT_NAME, b"");
    let b = c.read_n(10);
    assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), DISK_BYTES);
    let mut c = client(&t);
    c.option(NBD_OPT_EXPORT_NAME, b"nope");
    assert!(
        c.closed(),
        "unknown export via EXPORT_NAME must end the session"
    );
    t.assert_healthy();
}

#[test]
fn transmission_flags_advertise_everything() {
    let t = TestServer::start();
    let mut c = client(&t);
    let (size, f) = c.go("disk", true, false).unwrap();
    assert_eq!(size, DISK_BYTES);
    for bit in [
        NBD_FLAG_HAS_FLAGS,
        NBD_FLAG_SEND_FLUSH,
        NBD_FLAG_SEND_FUA,
        NBD_FLAG_SEND_TRIM,
        NBD_FLAG_SEND_WRITE_ZEROES,
        NBD_FLAG_SEND_CACHE,
        NBD_FLAG_CAN_MULTI_CONN,
        NBD_FLAG_SEND_FAST_ZERO,
        NBD_FLAG_SEND_DF,
    ] {
        assert_ne!(f & bit, 0, "flag {bit:#x} missing from {f:#x}");
    }
    assert_eq!(f & NBD_FLAG_READ_ONLY, 0);
    let mut c = client(&t);
    let (size, f) = c.go("ro", false, false).unwrap();
    assert_eq!(size, RO_BYTES);
    assert_ne!(f & NBD_FLAG_READ_ONLY, 0);
    assert_eq!(f & NBD_FLAG_SEND_DF, 0);
}

#[test]
fn abort_is_acked_then_closed() {
    let t = TestServer::start();
    let mut c = client(&t);
    c.option(NBD_OPT_ABORT, &[]);
    let r = c.opt_reply();
    assert_eq!((r.option, r.reply_type), (NBD_OPT_ABORT, NBD_REP_ACK));
    assert!(c.closed());
}

#[test]
fn list_returns_real_names() {
    let t = TestServer::start();
    let mut c = client(&t);
    c.option(NBD_OPT_LIST, &[]);
    let r = c.opt_replies();
    let names: Vec<String> = r
        .iter()
        .filter(|r| r.reply_type == NBD_REP_SERVER)
        .map(|r| {
            let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, ["disk", "ro", "file", "emu"]);
    assert_eq!(r.last().unwrap().reply_type, NBD_REP_ACK);
    // With data it is invalid, and negotiation goes on.
    c.option(NBD_OPT_LIST, b"x");
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_INVALID);
    c.go("disk", false, false).unwrap();
}

#[test]
fn info_answers_export_name_description_block_size() {
    let t = TestServer::start();
    let mut c = client(&t);
    let req = InfoRequest {
        name: "disk".into(),
        requests: vec![
            NBD_INFO_NAME,
            NBD_INFO_DESCRIPTION,
            NBD_INFO_BLOCK_SIZE,
            999,
        ],
    };
    c.option(NBD_OPT_INFO, &req.encode());
    let infos: Vec<Info> = c
        .opt_replies()
        .into_iter()
        .filter(|r| r.reply_type == NBD_REP_INFO)
        .map(|r| Info::decode(&r.data).unwrap())
        .collect();
    assert!(infos.contains(&Info::Export {
        size: DISK_BYTES,
        transmission_flags: infos
            .iter()
            .find_map(|i| match i {
                Info::Export {
                    transmission_flags, ..
                } => Some(*transmission_flags),
                _ => None,
            })
            .unwrap()
    }));
    assert!(infos.contains(&Info::Name("disk".into())));
    assert!(infos.contains(&Info::Description("a test disk".into())));
    assert!(infos.contains(&Info::BlockSize {
        minimum: 1,
        preferred: 4096,
        maximum: 32 << 20
    }));
    // INFO does not end negotiation; unknown export is ERR_UNKNOWN and negotiation goes on.
    c.option(
        NBD_OPT_INFO,
        &InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }
        .encode(),
    );
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_UNKNOWN);
    c.option(
        NBD_OPT_GO,
        &InfoRequest {
            name: "nope".into(),
            requests: vec![],
        }
        .encode(),
    );
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_UNKNOWN);
    c.option(NBD_OPT_GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_INVALID);
    assert_eq!(c.go("ro", false, false).unwrap().0, RO_BYTES);
}

#[test]
fn structured_reply_option() {
    let t = TestServer::start();
    let mut c = client(&t);
    c.option(NBD_OPT_STRUCTURED_REPLY, b"junk");
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_INVALID);
    c.option(NBD_OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ACK);
}

#[test]
fn meta_contexts_list_and_set() {
    let t = TestServer::start();
    let mut c = client(&t);
    // SET before structured replies: invalid.
    let q = MetaContextRequest {
        export: "disk".into(),
        queries: vec!["base:allocation".into()],
    };
    c.option(NBD_OPT_SET_META_CONTEXT, &q.encode());
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_INVALID);
    for queries in [
        vec![],
        vec!["base:".to_string()],
        vec!["base:allocation".to_string()],
    ] {
        c.option(
            NBD_OPT_LIST_META_CONTEXT,
            &MetaContextRequest {
                export: "disk".into(),
                queries,
            }
            .encode(),
        );
        let r = c.opt_replies();
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].reply_type, NBD_REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
    }
    c.option(
        NBD_OPT_LIST_META_CONTEXT,
        &MetaContextRequest {
            export: "disk".into(),
            queries: vec!["x-other:thing".into()],
        }
        .encode(),
    );
    assert_eq!(c.opt_replies().len(), 1, "no match: a bare ACK");
    c.option(
        NBD_OPT_LIST_META_CONTEXT,
        &MetaContextRequest {
            export: "nope".into(),
            queries: vec![],
        }
        .encode(),
    );
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_UNKNOWN);
    c.option(NBD_OPT_LIST_META_CONTEXT, &[0, 0]);
    assert_eq!(c.opt_reply().reply_type, NBD_REP_ERR_INVALID);
    let (_, _) = c.go("disk", true, true).unwrap();
    c.request(0, NBD_CMD_BLOCK_STATUS, 5, 0, 8192, &[]);
    let ch = c.chunk();
    assert_eq!(ch.chunk_type, NBD_REPLY_TYPE_BLOCK_STATUS);
}

#[test]
fn unsupported_options_are_refused_and_negotiation_continues() {
    let t = TestServer::start();
    let mut c = client(&t);
    // (NBD_OPT_STARTTLS has replies of its own: tests/tls.rs.)
    for opt in [
        NBD_OPT_EXTENDED_HEADERS,
        NBD_OPT_PEEK_EXPORT,
        12,
        9999,
        u32::MAX,
    ] {
        c.option(opt, b"some payload");
        let r = c.opt_reply();
        assert_eq!((r.option, r.reply_type), (opt, NBD_REP_ERR_UNSUP));
        assert!(!r.data.is_empty(), "error replies carry a message");
    }
    c.go("disk", false, false).unwrap();
    c.request(0, NBD_CMD_FLUSH, 1, 0, 0, &[]);
    assert_eq!(c.simple_reply(0).0, 0);
}

#[test]
fn simple_read_write_flush_fua() {
    let t = TestServer::start();
    let mut c = go(&t, "disk", false, false);
    let data = vec![0xc3u8; 65536];
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 1, 1 << 20, 65536, &data);
    assert_eq!(c.simple_reply(0), (0, 1, vec![]));
    c.request(0, NBD_CMD_WRITE, 2, 100, 3, b"abc"); // unaligned
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(0, NBD_CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(c.simple_reply(0), (0, 3, vec![]));
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(c.simple_reply(0).0, 0, "FUA is accepted on every command");
    c.request(0, NBD_CMD_READ, 5, 1 << 20, 65536, &[]);
    assert_eq!(c.simple_reply(65536).2, data);
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_READ, 6, 99, 5, &[]);
    assert_eq!(c.simple_reply(5).2, b"\0abc\0");
    c.disc();
}

/// Aligned writes are received straight into 4 KiB blocks (part from the reader's buffer, the
/// rest with `readv`, at most 1024 blocks a call): payloads split at odd points and sent in
/// pieces, one larger than 1024 blocks, several pipelined in one send, and zero blocks among
/// them all read back exactly, and the stream stays in step for the next request.
#[test]
fn aligned_writes_received_into_blocks_read_back_exactly() {
    let t = TestServer::start();
    let mut c = go(&t, "disk", false, false);
    let pattern = |seed: u8, n: usize| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    };
    // 1. A 6 MiB write (over two readv calls), sent in pieces that split the header.
    let big = pattern(7, 6 << 20);
    let mut msg = RequestHeader {
        flags: 0,
        command: NBD_CMD_WRITE,
        cookie: 1,
        offset: 8 << 20,
        length: big.len() as u32,
    }
    .encode()
    .to_vec();
    msg.extend_from_slice(&big);
    for piece in [
        &msg[..10],
        &msg[10..5000],
        &msg[5000..70_001],
        &msg[70_001..],
    ] {
        c.send(piece);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(c.simple_reply(0), (0, 1, vec![]));
    // 2. Many small aligned writes and one with a zero block, pipelined in one send.
    let mut batch = Vec::new();
    let mut expect = Vec::new();
    for i in 0..64u64 {
        let mut data = pattern(i as u8, 8192);
        if i == 5 {
            data[4096..].fill(0);
        }
        batch.extend_from_slice(
            &RequestHeader {
                flags: 0,
                command: NBD_CMD_WRITE,
                cookie: 100 + i,
                offset: i * 8192,
                length: 8192,
            }
            .encode(),
        );
        batch.extend_from_slice(&data);
        expect.extend_from_slice(&data);
    }
    c.send(&batch);
    let mut cookies: Vec<u64> = (0..64).map(|_| c.simple_reply(0)).map(|r| r.1).collect();
    cookies.sort();
    assert_eq!(cookies, (100..164).collect::<Vec<u64>>());
    // 3. Everything reads back.
    c.request(0, NBD_CMD_READ, 2, 8 << 20, big.len() as u32, &[]);
    assert!(c.simple_reply(big.len()).2 == big, "6 MiB write reads back");
    c.request(0, NBD_CMD_READ, 3, 0, expect.len() as u32, &[]);
    assert!(
        c.simple_reply(expect.len()).2 == expect,
        "pipelined writes read back"
    );
    c.disc();
    t.assert_healthy();
}

/// Decodes the chunks of one structured READ reply into the bytes read (holes as zeroes);
/// also returns the chunk types in order. Checks that only the last chunk carries DONE.
fn structured_read(c: &mut Raw, cookie: u64, offset: u64, len: usize) -> (Vec<u8>, Vec<u16>) {
    let mut out = vec![0xAAu8; len];
    let mut covered = vec![false; len];
    let mut types = Vec::new();
    loop {
        let ch = c.chunk();
        assert_eq!(ch.cookie, cookie);
        types.push(ch.chunk_type);
        let at = |p: &[u8]| (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize;
        let mut mark = |a: usize, n: usize| {
            assert!(covered[a..a + n].iter().all(|&x| !x), "chunks overlap");
            covered[a..a + n].fill(true);
        };
        match ch.chunk_type {
            NBD_REPLY_TYPE_OFFSET_DATA => {
                let a = at(&ch.payload);
                let d = &ch.payload[8..];
                mark(a, d.len());
                out[a..a + d.len()].copy_from_slice(d);
            }
            NBD_REPLY_TYPE_OFFSET_HOLE => {
                let a = at(&ch.payload);
                let n = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap()) as usize;
                mark(a, n);
                out[a..a + n].fill(0);
            }
            NBD_REPLY_TYPE_NONE => {}
            t => panic!("unexpected chunk type {t}"),
        }
        if ch.flags & NBD_REPLY_FLAG_DONE != 0 {
            assert!(
                covered.iter().all(|&x| x),
                "the chunks cover the whole read"
            );
            return (out, types);
        }
    }
}

/// Reads larger than the inline limit are sent straight from the memory backend's blocks
/// (`nbd_server::lent`): unaligned, across chunk boundaries, over holes, in every reply form
/// (simple; structured with holes as OFFSET_HOLE chunks; structured with DF as one chunk),
/// and when the client lets replies pile up until the socket is full (the part the socket
/// does not take is sent later, in order).
#[test]
fn large_reads_are_sent_from_backend_memory_in_every_reply_form() {
    let t = TestServer::start();
    let mut w = go(&t, "disk", false, false);
    let base: u64 = (1 << 20) - 8192 + 512;
    let len = 3 << 20;
    let mut want: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0x5c)
        .collect();
    // A 256 KiB hole inside (never written) and a partial zero block.
    let hole_at = 1 << 20;
    want[hole_at..hole_at + (256 << 10)].fill(0);
    want[100..4000].fill(0);
    w.request(0, NBD_CMD_WRITE, 1, base, hole_at as u32, &want[..hole_at]);
    assert_eq!(w.simple_reply(0).0, 0);
    let after = hole_at + (256 << 10);
    w.request(
        0,
        NBD_CMD_WRITE,
        2,
        base + after as u64,
        (len - after) as u32,
        &want[after..],
    );
    assert_eq!(w.simple_reply(0).0, 0);

    c_simple(&mut w, base, &want);

    let mut s = go(&t, "disk", true, false);
    s.request(0, NBD_CMD_READ, 7, base, len as u32, &[]);
    let (got, types) = structured_read(&mut s, 7, base, len);
    assert!(got == want, "structured read without DF");
    assert!(
        types.contains(&NBD_REPLY_TYPE_OFFSET_HOLE),
        "a 256 KiB hole is sent as a hole: {types:?}"
    );
    s.request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 8, base, len as u32, &[]);
    let (got, types) = structured_read(&mut s, 8, base, len);
    assert!(got == want, "structured read with DF");
    assert_eq!(types, vec![NBD_REPLY_TYPE_OFFSET_DATA], "DF: one chunk");

    // 16 reads of the whole range, pipelined while the client reads nothing: far more than
    // the socket buffers hold.
    for i in 0..16 {
        w.request(0, NBD_CMD_READ, 100 + i, base, len as u32, &[]);
    }
    // Wait until the replies stop arriving: the client's receive queue is full and the
    // server has replies it cannot send. Less than all 48 MiB must be queued, or the path
    // this test is for (a reply waiting for room) was not taken.
    let queued = settled_receive_queue(&w.s);
    assert!(
        queued > 0 && queued < 16 * len,
        "{queued} bytes queued: the replies did not wait for room"
    );
    for _ in 0..16 {
        let (err, cookie, got) = w.simple_reply(len);
        assert_eq!(err, 0);
        assert!((100..116).contains(&cookie));
        assert!(
            got == want,
            "a reply that waited for room reads back exactly"
        );
    }
    w.disc();
    t.assert_healthy();
}

fn c_simple(c: &mut Raw, base: u64, want: &[u8]) {
    c.request(0, NBD_CMD_READ, 5, base, want.len() as u32, &[]);
    let (err, cookie, got) = c.simple_reply(want.len());
    assert_eq!((err, cookie), (0, 5));
    assert!(got == want, "simple read");
}

#[test]
fn trim_and_write_zeroes_read_back_zero_and_show_holes() {
    let t = TestServer::start();
    let mut c = go(&t, "disk", true, true);
    c.request(0, NBD_CMD_WRITE, 1, 0, 4 * 4096, &[0xffu8; 4 * 4096]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(
        NBD_CMD_FLAG_NO_HOLE,
        NBD_CMD_WRITE_ZEROES,
        3,
        4096,
        4096,
        &[],
    );
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(
        NBD_CMD_FLAG_FAST_ZERO | NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE_ZEROES,
        4,
        8192,
        4096,
        &[],
    );
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 5, 0, 4 * 4096, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.chunk_type, ch.cookie),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA, 5)
    );
    assert_eq!(u64::from_be_bytes(ch.payload[0..8].try_into().unwrap()), 0);
    let d = &ch.payload[8..];
    assert!(d[..3 * 4096].iter().all(|&b| b == 0));
    assert!(d[3 * 4096..].iter().all(|&b| b == 0xff));
    c.request(0, NBD_CMD_BLOCK_STATUS, 6, 0, 8 * 4096, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.flags, ch.chunk_type),
        (NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_BLOCK_STATUS)
    );
    let desc: Vec<(u32, u32)> = ch.payload[4..]
        .chunks(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[0..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..8].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(desc, vec![(3 * 4096, 3), (4096, 0), (4 * 4096, 3)]);
    c.request(
        NBD_CMD_FLAG_REQ_ONE,
        NBD_CMD_BLOCK_STATUS,
        7,
        0,
        8 * 4096,
        &[],
    );
    let ch = c.chunk();
    assert_eq!(ch.payload.len(), 4 + 8, "REQ_ONE: one descriptor");
    c.request(0, NBD_CMD_CACHE, 8, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0), (0, 8, vec![]));
}

#[test]
fn file_export_round_trips() {
    let t = TestServer::start();
    let mut c = go(&t, "file", true, true);
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    c.request(
        NBD_CMD_FLAG_FUA,
        NBD_CMD_WRITE,
        1,
        4096 * 100,
        data.len() as u32,
        &data,
    );
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(0, NBD_CMD_FLUSH, 2, 0, 0, &[]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(0, NBD_CMD_READ, 3, 4096 * 100, data.len() as u32, &[]);
    let ch = c.chunk();
    assert_eq!(&ch.payload[8..], &data[..]);
    let on_disk = std::fs::read(t.dir.path().join("file.img")).unwrap();
    assert_eq!(&on_disk[4096 * 100..4096 * 100 + data.len()], &data[..]);
    c.request(0, NBD_CMD_TRIM, 4, 4096 * 100, 8192, &[]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(0, NBD_CMD_WRITE_ZEROES, 5, 4096 * 102, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(0, NBD_CMD_READ, 6, 4096 * 100, 3 * 4096, &[]);
    assert!(c.chunk().payload[8..].iter().all(|&b| b == 0));
    c.request(0, NBD_CMD_BLOCK_STATUS, 7, 0, 8 << 20, &[]);
    let ch = c.chunk();
    assert_eq!(ch.chunk_type, NBD_REPLY_TYPE_BLOCK_STATUS);
    let total: u64 = ch.payload[4..]
        .chunks(8)
        .map(|d| u32::from_be_bytes(d[0..4].try_into().unwrap()) as u64)
        .sum();
    assert_eq!(total, 8 << 20);
    c.disc();
}

/// The spec's answer to each bad request, on a connection that keeps working.
#[test]
fn command_error_paths() {
    let t = TestServer::start();
    let mut c = go(&t, "disk", false, false);
    let end = DISK_BYTES;
    let cases: Vec<(u16, u16, u64, u32, Vec<u8>, u32)> = vec![
        (0, NBD_CMD_READ, end - 512, 1024, vec![], NBD_EINVAL),
        (0, NBD_CMD_READ, u64::MAX - 10, 512, vec![], NBD_EINVAL),
        (0, NBD_CMD_WRITE, end, 512, vec![1; 512], NBD_ENOSPC),
        (0, NBD_CMD_TRIM, end - 4096, 8192, vec![], NBD_ENOSPC),
        (0, NBD_CMD_WRITE_ZEROES, end, 1, vec![], NBD_ENOSPC),
        (0, NBD_CMD_CACHE, end, 1, vec![], NBD_EINVAL),
        (0, NBD_CMD_READ, 0, 0, vec![], NBD_EINVAL),
        (0, NBD_CMD_WRITE, 0, 0, vec![], NBD_EINVAL),
        (0, NBD_CMD_TRIM, 0, 0, vec![], NBD_EINVAL),
        (0, NBD_CMD_FLUSH, 0, 4096, vec![], NBD_EINVAL),
        (0, 9, 0, 4096, vec![], NBD_EINVAL),
        (0, 0xffff, 0, 0, vec![], NBD_EINVAL),
        (1 << 9, NBD_CMD_READ, 0, 512, vec![], NBD_EINVAL),
        (NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 512, vec![], NBD_EINVAL), // DF without structured
        (
            NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_WRITE,
            0,
            512,
            vec![2; 512],
            NBD_EINVAL,
        ),
        (
            NBD_CMD_FLAG_REQ_ONE,
            NBD_CMD_READ,
            0,
            512,
            vec![],
            NBD_EINVAL,
        ),
        (0, NBD_CMD_BLOCK_STATUS, 0, 512, vec![], NBD_EINVAL), // no meta context
        (0, NBD_CMD_READ, 0, (32 << 20) + 1, vec![], NBD_EINVAL),
    ];
    for (i, (flags, cmd, off, len, payload, want)) in cases.into_iter().enumerate() {
        let cookie = 1000 + i as u64;
        c.request(flags, cmd, cookie, off, len, &payload);
        let (err, got_cookie, _) = c.simple_reply(0);
        assert_eq!(
            (err, got_cookie),
            (want, cookie),
            "case {i}: cmd {cmd} flags {flags:#x} off {off} len {len}"
        );
    }
    // Nothing was written by the rejected write.
    c.request(0, NBD_CMD_READ, 1, 0, 512, &[]);
    assert_eq!(c.simple_reply(512).2, vec![0; 512]);
    c.disc();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let t = TestServer::start();
    let mut c = go(&t, "ro", false, false);
    c.request(0, NBD_CMD_WRITE, 1, 0, 4, b"oops");
    assert_eq!(c.simple_reply(0).0, NBD_EPERM);
    c.request(0, NBD_CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, NBD_EPERM);
    c.request(0, NBD_CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(c.simple_reply(0).0, NBD_EPERM);
    c.request(0, NBD_CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(0, NBD_CMD_READ, 5, 0, 4096, &[]);
    assert_eq!(c.simple_reply(4096).2, vec![0x5a; 4096], "data intact");
}

#[test]
fn structured_errors_use_error_chunks() {
    let t = TestServer::start();
    let mut c = go(&t, "disk", true, false);
    c.request(0, NBD_CMD_READ, 9, DISK_BYTES, 512, &[]);
    let ch = c.chunk();
    assert_eq!((ch.flags, ch.cookie), (NBD_REPLY_FLAG_DONE, 9));
    assert_eq!(chunk_error(&ch), NBD_EINVAL);
    c.request(0, NBD_CMD_BLOCK_STATUS, 10, 0, 512, &[]);
    assert_eq!(
        chunk_error(&c.chunk()),
        NBD_EINVAL,
        "no meta context negotiated"
    );
    c.request(0, 42, 11, 0, 0, &[]);
    let (err, cookie, _) = c.simple_reply(0);
    assert_eq!((err, cookie), (NBD_EINVAL, 11));
}

/// A backend whose read at offset 0 waits until the reply to the read at 4096 was sent: the
/// second request's reply must overtake the first one's (deterministically, no sleeps).
struct Gate {
    inner: MemoryBackend,
    passed: Mutex<bool>,
    cv: Condvar,
}

impl Backend for Gate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, t: Option<Ticket>, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if offset == 0 {
            let g = self.passed.lock().unwrap();
            let (g, _) = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(10), |p| !*p)
                .unwrap();
            assert!(
                *g,
                "the second read was not answered while the first one ran"
            );
        }
        self.inner.read(t, offset, buf)
    }
    fn arrived(&self, a: &Arrival) -> Option<Ticket> {
        Some(Ticket(a.offset + 1))
    }
    fn reply_sent(&self, t: Ticket) {
        if t == Ticket(4097) {
            *self.passed.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }
    fn write(&self, t: Option<Ticket>, o: u64, d: WriteData, f: bool) -> Result<(), WriteFailed> {
        self.inner.write(t, o, d, f)
    }
    fn write_zeroes(
        &self,
        t: Option<Ticket>,
        o: u64,
        l: u64,
        a: bool,
        b: bool,
        f: bool,
    ) -> std::io::Result<()> {
        self.inner.write_zeroes(t, o, l, a, b, f)
    }
    fn trim(&self, t: Option<Ticket>, o: u64, l: u64, f: bool) -> std::io::Result<()> {
        self.inner.trim(t, o, l, f)
    }
    fn flush(&self, t: Option<Ticket>) -> std::io::Result<()> {
        self.inner.flush(t)
    }
    fn block_status(
        &self,
        t: Option<Ticket>,
        o: u64,
        l: u64,
    ) -> std::io::Result<Vec<StatusExtent>> {
        self.inner.block_status(t, o, l)
    }
}

#[test]
fn replies_come_out_of_order() {
    let gate = Gate {
        inner: MemoryBackend::new(1 << 20),
        passed: Mutex::new(false),
        cv: Condvar::new(),
    };
    let exports = ExportRegistry::new(vec![Export::new("g", Arc::new(gate), false)]).unwrap();
    let srv = Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports,
        tls: None,
    })
    .unwrap();
    let mut c = Raw::connect(srv.local_addr().unwrap());
    c.handshake(3);
    c.go("g", false, false).unwrap();
    c.request(0, NBD_CMD_READ, 1, 0, 512, &[]);
    c.request(0, NBD_CMD_READ, 2, 4096, 512, &[]);
    assert_eq!(
        c.simple_reply(512).1,
        2,
        "the later request is answered first"
    );
    assert_eq!(c.simple_reply(512).1, 1);
    c.disc();
    srv.shutdown().unwrap();
}

/// Records the lifecycle events the emulated disk relies on.
#[derive(Default)]
struct Recorder {
    inner: Option<MemoryBackend>,
    events: Mutex<Vec<String>>,
    next: std::sync::atomic::AtomicU64,
}

impl Recorder {
    fn log(&self, s: String) {
        self.events.lock().unwrap().push(s);
    }
    fn mem(&self) -> &MemoryBackend {
        self.inner.as_ref().unwrap()
    }
}

impl Backend for Recorder {
    fn size(&self) -> u64 {
        self.mem().size()
    }
    fn arrived(&self, a: &Arrival) -> Option<Ticket> {
        let t = Ticket(self.next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1);
        self.log(format!("arrived {} {:?} c{}", t.0, a.kind, a.conn));
        Some(t)
    }
    fn reply_sent(&self, t: Ticket) {
        self.log(format!("sent {}", t.0));
    }
    fn read(&self, t: Option<Ticket>, o: u64, b: &mut [u8]) -> std::io::Result<()> {
        self.log(format!("io {}", t.map_or(0, |t| t.0)));
        self.mem().read(t, o, b)
    }
    fn write(&self, t: Option<Ticket>, o: u64, d: WriteData, f: bool) -> Result<(), WriteFailed> {
        self.log(format!("io {}", t.map_or(0, |t| t.0)));
        self.mem().write(t, o, d, f)
    }
    fn write_zeroes(
        &self,
        t: Option<Ticket>,
        o: u64,
        l: u64,
        a: bool,
        b: bool,
        f: bool,
    ) -> std::io::Result<()> {
        self.log(format!("io {}", t.map_or(0, |t| t.0)));
        self.mem().write_zeroes(t, o, l, a, b, f)
    }
    fn trim(&self, t: Option<Ticket>, o: u64, l: u64, f: bool) -> std::io::Result<()> {
        self.log(format!("io {}", t.map_or(0, |t| t.0)));
        self.mem().trim(t, o, l, f)
    }
    fn flush(&self, t: Option<Ticket>) -> std::io::Result<()> {
        self.log(format!("io {}", t.map_or(0, |t| t.0)));
        Ok(())
    }
    fn block_status(
        &self,
        t: Option<Ticket>,
        o: u64,
        l: u64,
    ) -> std::io::Result<Vec<StatusExtent>> {
        self.mem().block_status(t, o, l)
    }
}

/// The contract of `backend/mod.rs`: arrived, then IO with that ticket, then reply_sent after
/// the client could see the reply; rejected requests never reach the backend. A FLUSH sent on a
/// second connection after the first connection's write was answered arrives after that
/// write's reply_sent (what global flush semantics build on).
#[test]
fn lifecycle_hooks_follow_the_contract() {
    let rec = Arc::new(Recorder {
        inner: Some(MemoryBackend::new(1 << 20)),
        ..Default::default()
    });
    struct Shared(Arc<Recorder>);
    impl Backend for Shared {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn arrived(&self, a: &Arrival) -> Option<Ticket> {
            self.0.arrived(a)
        }
        fn reply_sent(&self, t: Ticket) {
            self.0.reply_sent(t)
        }
        fn read(&self, t: Option<Ticket>, o: u64, b: &mut [u8]) -> std::io::Result<()> {
            self.0.read(t, o, b)
        }
        fn write(
            &self,
            t: Option<Ticket>,
            o: u64,
            d: WriteData,
            f: bool,
        ) -> Result<(), WriteFailed> {
            self.0.write(t, o, d, f)
        }
        fn write_zeroes(
            &self,
            t: Option<Ticket>,
            o: u64,
            l: u64,
            a: bool,
            b: bool,
            f: bool,
        ) -> std::io::Result<()> {
            self.0.write_zeroes(t, o, l, a, b, f)
        }
        fn trim(&self, t: Option<Ticket>, o: u64, l: u64, f: bool) -> std::io::Result<()> {
            self.0.trim(t, o, l, f)
        }
        fn flush(&self, t: Option<Ticket>) -> std::io::Result<()> {
            self.0.flush(t)
        }
        fn block_status(
            &self,
            t: Option<Ticket>,
            o: u64,
            l: u64,
        ) -> std::io::Result<Vec<StatusExtent>> {
            self.0.block_status(t, o, l)
        }
    }
    let exports =
        ExportRegistry::new(vec![Export::new("r", Arc::new(Shared(rec.clone())), false)]).unwrap();
    let srv = Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports,
        tls: None,
    })
    .unwrap();
    let addr = srv.local_addr().unwrap();
    let mut a = Raw::connect(addr);
    a.handshake(3);
    a.go("r", false, false).unwrap();
    let mut b = Raw::connect(addr);
    b.handshake(3);
    b.go("r", false, false).unwrap();
    a.request(0, NBD_CMD_WRITE, 1, 0, 4096, &[1; 4096]);
    assert_eq!(a.simple_reply(0).0, 0);
    b.request(0, NBD_CMD_READ, 2, 1 << 20, 1, &[]); // rejected: past the end
    assert_eq!(b.simple_reply(0).0, NBD_EINVAL);
    b.request(0, NBD_CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(b.simple_reply(0).0, 0);
    a.disc();
    b.disc();
    srv.shutdown().unwrap();
    let ev = rec.events.lock().unwrap().clone();
    let pos = |s: &str| {
        ev.iter()
            .position(|e| e == s)
            .unwrap_or_else(|| panic!("{s:?} missing in {ev:?}"))
    };
    assert!(ev[0].starts_with("arrived 1 Write"), "{ev:?}");
    assert!(pos("io 1") < pos("sent 1"));
    assert!(
        ev[pos("sent 1") + 1].starts_with("arrived 2 Flush"),
        "flush arrives after the write's reply: {ev:?}"
    );
    assert!(pos("io 2") < pos("sent 2"));
    // The shutdown flush comes from the server itself (connection 0), also with hooks.
    assert!(
        ev.iter().any(|e| e.starts_with("arrived 3 Flush c0")),
        "{ev:?}"
    );
    assert_eq!(
        ev.iter().filter(|e| e.starts_with("arrived")).count(),
        3,
        "the rejected read never arrived: {ev:?}"
    );
}

#[test]
fn disc_drains_pipelined_requests() {
    let t = TestServer::start();
    let mut c = go(&t, "disk", false, false);
    let n = 200u64;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(
            &RequestHeader {
                flags: 0,
                command: NBD_CMD_WRITE,
                cookie: i,
                offset: i * 4096,
                length: 4096,
            }
            .encode(),
        );
        batch.extend_from_slice(&[(i % 250) as u8 + 1; 4096]);
    }
    batch.extend_from_slice(
        &RequestHeader {
            flags: 0,
            command: NBD_CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode(),
    );
    c.send(&batch);
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (err, cookie, _) = c.simple_reply(0);
        assert_eq!(err, 0);
        seen[cookie as usize] = true;
    }
    assert!(seen.iter().all(|&s| s));
    assert!(c.closed());
    let mut c = go(&t, "disk", false, false);
    c.request(0, NBD_CMD_READ, 1, 199 * 4096, 4096, &[]);
    assert_eq!(c.simple_reply(4096).2, vec![200u8; 4096]);
}

#[test]
fn unix_socket_serves_too() {
    let t = TestServer::start();
    let mut s = std::os::unix::net::UnixStream::connect(t.socket_path()).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut g = [0u8; GREETING_BYTES];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(
        &OptionHeader {
            option: NBD_OPT_EXPORT_NAME,
            length: 4,
        }
        .encode(),
    )
    .unwrap();
    s.write_all(b"disk").unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), DISK_BYTES);
    s.write_all(
        &RequestHeader {
            flags: 0,
            command: NBD_CMD_READ,
            cookie: 7,
            offset: 0,
            length: 16,
        }
        .encode(),
    )
    .unwrap();
    let mut rep = [0u8; 16 + 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(&rep[0..4], &NBD_SIMPLE_REPLY_MAGIC_BYTES);
    assert_eq!(&rep[4..8], &[0; 4]);
}

/// Shutdown answers what is in flight, closes connections, and flushes every export.
#[test]
fn graceful_shutdown_finishes_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.img");
    let file = FileBackend::open(&path, Some(1 << 20), false).unwrap();
    let exports = ExportRegistry::new(vec![Export::new("d", Arc::new(file), false)]).unwrap();
    let srv = Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports,
        tls: None,
    })
    .unwrap();
    let mut c = Raw::connect(srv.local_addr().unwrap());
    c.handshake(3);
    c.go("d", false, false).unwrap();
    c.request(0, NBD_CMD_WRITE, 1, 0, 4096, &[9; 4096]);
    assert_eq!(c.simple_reply(0).0, 0);
    let addr = srv.local_addr().unwrap();
    srv.shutdown().unwrap();
    assert!(c.closed(), "connections are closed at shutdown");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "no longer accepting"
    );
    assert_eq!(&std::fs::read(&path).unwrap()[..4096], &[9; 4096]);
}

/// A backend whose writes wait for a release, and which records abandoned replies.
struct Held {
    inner: MemoryBackend,
    released: Mutex<bool>,
    cv: Condvar,
    in_write: Mutex<bool>,
    abandoned: Mutex<Vec<Ticket>>,
}

impl Backend for Held {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn arrived(&self, a: &Arrival) -> Option<Ticket> {
        Some(Ticket(a.offset + 1))
    }
    fn reply_abandoned(&self, t: Ticket) {
        self.abandoned.lock().unwrap().push(t);
    }
    fn read(&self, t: Option<Ticket>, o: u64, b: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(t, o, b)
    }
    fn write(&self, t: Option<Ticket>, o: u64, d: WriteData, f: bool) -> Result<(), WriteFailed> {
        if o == 4096 {
            *self.in_write.lock().unwrap() = true;
            self.cv.notify_all();
            let g = self.released.lock().unwrap();
            drop(
                self.cv
                    .wait_timeout_while(g, Duration::from_secs(10), |r| !*r)
                    .unwrap(),
            );
        }
        self.inner.write(t, o, d, f)
    }
    fn write_zeroes(
        &self,
        t: Option<Ticket>,
        o: u64,
        l: u64,
        a: bool,
        b: bool,
        f: bool,
    ) -> std::io::Result<()> {
        self.inner.write_zeroes(t, o, l, a, b, f)
    }
    fn trim(&self, t: Option<Ticket>, o: u64, l: u64, f: bool) -> std::io::Result<()> {
        self.inner.trim(t, o, l, f)
    }
    fn flush(&self, t: Option<Ticket>) -> std::io::Result<()> {
        self.inner.flush(t)
    }
    fn block_status(
        &self,
        t: Option<Ticket>,
        o: u64,
        l: u64,
    ) -> std::io::Result<Vec<StatusExtent>> {
        self.inner.block_status(t, o, l)
    }
}

/// `Export::disconnect_all` (what a power cut uses): the connection drops at once, the reply
/// of the write still executing is never sent (reply_abandoned), and new clients are served.
#[test]
fn disconnect_all_drops_connections_and_abandons_replies() {
    let held = Arc::new(Held {
        inner: MemoryBackend::new(1 << 20),
        released: Mutex::new(false),
        cv: Condvar::new(),
        in_write: Mutex::new(false),
        abandoned: Mutex::new(vec![]),
    });
    struct Shared(Arc<Held>);
    impl Backend for Shared {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn arrived(&self, a: &Arrival) -> Option<Ticket> {
            self.0.arrived(a)
        }
        fn reply_abandoned(&self, t: Ticket) {
            self.0.reply_abandoned(t)
        }
        fn read(&self, t: Option<Ticket>, o: u64, b: &mut [u8]) -> std::io::Result<()> {
            self.0.read(t, o, b)
        }
        fn write(
            &self,
            t: Option<Ticket>,
            o: u64,
            d: WriteData,
            f: bool,
        ) -> Result<(), WriteFailed> {
            self.0.write(t, o, d, f)
        }
        fn write_zeroes(
            &self,
            t: Option<Ticket>,
            o: u64,
            l: u64,
            a: bool,
            b: bool,
            f: bool,
        ) -> std::io::Result<()> {
            self.0.write_zeroes(t, o, l, a, b, f)
        }
        fn trim(&self, t: Option<Ticket>, o: u64, l: u64, f: bool) -> std::io::Result<()> {
            self.0.trim(t, o, l, f)
        }
        fn flush(&self, t: Option<Ticket>) -> std::io::Result<()> {
            self.0.flush(t)
        }
        fn block_status(
            &self,
            t: Option<Ticket>,
            o: u64,
            l: u64,
        ) -> std::io::Result<Vec<StatusExtent>> {
            self.0.block_status(t, o, l)
        }
    }
    let exports = ExportRegistry::new(vec![Export::new(
        "h",
        Arc::new(Shared(held.clone())),
        false,
    )])
    .unwrap();
    let export = exports.lookup("h").unwrap();
    let srv = Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports,
        tls: None,
    })
    .unwrap();
    let addr = srv.local_addr().unwrap();
    let mut c = Raw::connect(addr);
    c.handshake(3);
    c.go("h", false, false).unwrap();
    c.request(0, NBD_CMD_WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.request(0, NBD_CMD_WRITE, 2, 4096, 512, &[2; 512]);
    {
        let g = held.in_write.lock().unwrap();
        let (g, _) = held
            .cv
            .wait_timeout_while(g, Duration::from_secs(10), |w| !*w)
            .unwrap();
        assert!(*g, "the held write never started");
    }
    export.disconnect_all();
    assert!(
        c.closed(),
        "the connection drops at once, with a write still executing"
    );
    *held.released.lock().unwrap() = true;
    held.cv.notify_all();
    let mut d = Raw::connect(addr);
    d.handshake(3);
    d.go("h", false, false).unwrap();
    d.request(0, NBD_CMD_READ, 3, 0, 512, &[]);
    assert_eq!(d.simple_reply(512).2, vec![1; 512]);
    d.disc();
    srv.shutdown().unwrap();
    assert_eq!(
        *held.abandoned.lock().unwrap(),
        vec![Ticket(4097)],
        "the unsent reply was abandoned"
    );
}

/// A backend whose every IO fails: EIO (and ENOTSUP for a FAST_ZERO it cannot do fast).
struct Failing;

impl Backend for Failing {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn can_fast_zero(&self) -> bool {
        true
    }
    fn read(&self, _: Option<Ticket>, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("media error"))
    }
    fn write(&self, _: Option<Ticket>, _: u64, d: WriteData, _: bool) -> Result<(), WriteFailed> {
        // EIO from the OS
        Err(WriteFailed::returning(d)(
            std::io::Error::from_raw_os_error(5),
        ))
    }
    fn write_zeroes(
        &self,
        _: Option<Ticket>,
        _: u64,
        _: u64,
        _: bool,
        fast: bool,
        _: bool,
    ) -> std::io::Result<()> {
        if fast {
            Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "no fast zero",
            ))
        } else {
            Err(std::io::Error::other("media error"))
        }
    }
    fn trim(&self, _: Option<Ticket>, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(28)) // ENOSPC from the OS stays ENOSPC
    }
    fn flush(&self, _: Option<Ticket>) -> std::io::Result<()> {
        Err(std::io::Error::other("flush failed"))
    }
    fn block_status(
        &self,
        _: Option<Ticket>,
        _: u64,
        _: u64,
    ) -> std::io::Result<Vec<StatusExtent>> {
        Err(std::io::Error::other("no map"))
    }
}

#[test]
fn backend_errors_become_nbd_errors_without_payload() {
    let exports = ExportRegistry::new(vec![Export::new("f", Arc::new(Failing), false)]).unwrap();
    let srv = Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports,
        tls: None,
    })
    .unwrap();
    let addr = srv.local_addr().unwrap();
    let mut c = Raw::connect(addr);
    c.handshake(3);
    c.go("f", false, false).unwrap();
    // A failed READ: an error header and no data (the next reply follows immediately).
    c.request(0, NBD_CMD_READ, 1, 0, 4096, &[]);
    c.request(0, NBD_CMD_WRITE, 2, 0, 512, &[1; 512]);
    c.request(0, NBD_CMD_FLUSH, 3, 0, 0, &[]);
    c.request(0, NBD_CMD_TRIM, 4, 0, 4096, &[]);
    c.request(
        NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_WRITE_ZEROES,
        5,
        0,
        4096,
        &[],
    );
    c.request(0, NBD_CMD_WRITE_ZEROES, 6, 0, 4096, &[]);
    let mut got: Vec<(u64, u32)> = (0..6)
        .map(|_| {
            let (err, cookie, data) = c.simple_reply(0);
            assert!(data.is_empty());
            (cookie, err)
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (1, NBD_EIO),
            (2, NBD_EIO),
            (3, NBD_EIO),
            (4, NBD_ENOSPC),
            (5, NBD_ENOTSUP),
            (6, NBD_EIO)
        ]
    );
    // Structured: READ and BLOCK_STATUS errors are ERROR chunks with a message.
    let mut s = Raw::connect(addr);
    s.handshake(3);
    s.go("f", true, true).unwrap();
    s.request(0, NBD_CMD_READ, 7, 0, 4096, &[]);
    let ch = s.chunk();
    assert_eq!(chunk_error(&ch), NBD_EIO);
    assert!(String::from_utf8_lossy(&ch.payload[6..]).contains("media error"));
    s.request(0, NBD_CMD_BLOCK_STATUS, 8, 0, 4096, &[]);
    assert_eq!(chunk_error(&s.chunk()), NBD_EIO);
    c.disc();
    s.disc();
    // The shutdown flush fails too: shutdown reports it.
    assert!(srv.shutdown().is_err());
}

/// Through an emulated disk (as the CLI builds every writable export): 8 pipelined 1 MiB
/// structured reads at a time, first while the writes are still in the disk's cache (the
/// reads are copied with the cache laid over storage), then after a FLUSH wrote them back
/// (the reads are lent from storage), all read back exactly.
#[test]
fn pipelined_reads_through_the_emulated_disk_read_back() {
    let spec: nbd_server::ExportSpec = "bench:size=64M".parse().unwrap();
    let exports = ExportRegistry::new(vec![Export::from_spec(&spec).unwrap()]).unwrap();
    let server = Server::start_background(ServerConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        unix: None,
        exports,
        tls: None,
    })
    .unwrap();
    let mut w = Raw::connect(server.local_addr().unwrap());
    w.handshake(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    w.go("bench", true, false).unwrap();
    let len = 1usize << 20;
    let want: Vec<u8> = (0..8 * len)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0x5c)
        .collect();
    w.request(0, NBD_CMD_WRITE, 1, 0, want.len() as u32, &want);
    let ch = w.simple_reply(0);
    assert_eq!(ch.0, 0);
    for round in 0..20 {
        if round == 10 {
            w.request(0, NBD_CMD_FLUSH, 1, 0, 0, &[]);
            assert_eq!(w.simple_reply(0).0, 0);
        }
        for i in 0..8u64 {
            w.request(0, NBD_CMD_READ, 100 + i, i * len as u64, len as u32, &[]);
        }
        for _ in 0..8 {
            let ch = w.chunk();
            assert_eq!(ch.flags, NBD_REPLY_FLAG_DONE, "round {round}");
            let i = (ch.cookie - 100) as usize;
            assert!(
                ch.payload[8..] == want[i * len..(i + 1) * len],
                "round {round}"
            );
        }
    }
}

/// Bytes waiting in `s`'s receive queue once they stop growing (polled every 50 ms, at most
/// 10 s).
#[allow(unsafe_code)]
fn settled_receive_queue(s: &std::net::TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let queued = || {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int to the pointer we pass, which outlives the call.
        let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(r, 0, "ioctl(FIONREAD): {}", std::io::Error::last_os_error());
        n as usize
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = queued();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let now = queued();
        if (now == last && now > 0) || std::time::Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}
