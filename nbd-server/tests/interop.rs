//! Interop with clients nobody here wrote: qemu-io, qemu-img, nbdinfo, nbdcopy, fio's nbd
//! engine, and the `nbd` crate's client, each against an in-process server.
//!
//! A missing tool skips its test with a printed reason, unless `CI=true`, where it fails.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use common::wire::*;
use common::*;
use rand::{RngCore, SeedableRng};

/// Deterministic pseudo-random bytes (the seed is fixed and printed).
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    println!("data seed {seed}");
    let mut v = vec![0u8; len];
    rand_chacha::ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn read_export(t: &TestServer, export: &str, offset: u64, len: u32) -> Vec<u8> {
    let mut c = Raw::connect(t.addr);
    c.handshake(3);
    c.go(export, false, false).unwrap();
    c.request(0, NBD_CMD_READ, 1, offset, len, &[]);
    let (err, _, data) = c.simple_reply(len as usize);
    assert_eq!(err, 0);
    c.disc();
    data
}

#[test]
fn qemu_io_write_read_fua_zero_discard_flush() {
    if !have("qemu-io") {
        return;
    }
    let t = TestServer::start();
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args([
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -f -P 0x11 1M 4k",
            "-c",
            "read -P 0x11 1M 4k",
            "-c",
            "write -P 0xcd 2M 64k",
            "-c",
            "write -z 2M 32k",
            "-c",
            "read -P 0 2M 32k",
            "-c",
            "read -P 0xcd 2080k 32k",
            "-c",
            "discard 0 4k",
            "-c",
            "read -P 0 0 4k",
            "-c",
            "read -P 0xab 4k 60k",
            "-c",
            "flush",
        ])
        .arg(t.uri("disk")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    // Checked independently with the raw client.
    assert_eq!(read_export(&t, "disk", 1 << 20, 4096), vec![0x11; 4096]);
    assert_eq!(read_export(&t, "disk", 4096, 4096), vec![0xab; 4096]);
    assert_eq!(read_export(&t, "disk", 0, 4096), vec![0; 4096]);
}

/// FUA writes on a raw-file export take the `RWF_DSYNC` path (the file backend's unit test
/// shows only their range is synced); qemu-io with a writeback cache sends FUA only for
/// `write -f`, so plain and FUA writes mix as a guest's would.
#[test]
fn qemu_io_fua_writes_on_a_file_export() {
    if !have("qemu-io") {
        return;
    }
    let t = TestServer::start();
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", "-t", "writeback"])
        .args([
            "-c",
            "write -P 0x21 0 1M",
            "-c",
            "write -f -P 0x22 4M 4k",
            "-c",
            "write -f -P 0x23 5000k 100k",
            "-c",
            "read -P 0x21 0 1M",
            "-c",
            "read -P 0x22 4M 4k",
            "-c",
            "read -P 0x23 5000k 100k",
        ])
        .arg(t.uri("file")));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let img = std::fs::read(t.dir.path().join("file.img")).unwrap();
    assert_eq!(img[4 << 20..(4 << 20) + 4096], [0x22; 4096]);
    assert_eq!(img[5000 << 10..5100 << 10], [0x23; 100 << 10][..]);
    assert_eq!(img[..1 << 20], [0x21; 1 << 20][..]);
}

#[test]
fn qemu_io_over_unix_socket_and_read_only() {
    if !have("qemu-io") {
        return;
    }
    let t = TestServer::start();
    let uri = format!("nbd+unix:///disk?socket={}", t.socket_path().display());
    let out = run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 8k 8k",
            "-c",
            "read -P 0x42 8k 8k",
        ])
        .arg(&uri));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(t.uri("ro"))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            || text.contains("ermission")
            || text.contains("read-only")
            || text.contains("read only"),
        "writing to a read-only export must fail: {text}"
    );
    assert_eq!(read_export(&t, "ro", 0, 4096), vec![0x5a; 4096]);
}

#[test]
fn qemu_img_info_and_convert_both_ways() {
    if !have("qemu-img") {
        return;
    }
    let t = TestServer::start();
    let info = run(Command::new("qemu-img").arg("info").arg(t.uri("disk")));
    assert!(
        info.contains("67108864") || info.contains("64 MiB"),
        "{info}"
    );
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let mut data = pattern(1, 8 << 20);
    data[(2 << 20)..(3 << 20)].fill(0); // a hole in the middle
    std::fs::write(&src, &data).unwrap();
    // Into the export (-n: the target exists), then back out into a new file.
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(t.uri("file")));
    let back = dir.path().join("back.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(t.uri("file"))
        .arg(&back));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert!(got == data, "qemu-img round trip differs");
}

#[test]
fn nbdinfo_plain_list_and_map() {
    if !have("nbdinfo") {
        return;
    }
    let t = TestServer::start();
    let out = run(Command::new("nbdinfo").arg(t.uri("disk")));
    assert!(out.contains("export-size: 67108864"), "{out}");
    assert!(
        out.contains("can_flush: true")
            && out.contains("can_fua: true")
            && out.contains("can_multi_conn: true"),
        "{out}"
    );
    assert!(out.contains("description: a test disk"), "{out}");
    let out = run(Command::new("nbdinfo").arg("--list").arg(t.uri("")));
    for name in ["export=\"disk\"", "export=\"ro\"", "export=\"file\""] {
        assert!(out.contains(name), "{name} missing from --list:\n{out}");
    }
    // Data at [1 MiB, 1 MiB + 8 KiB), holes elsewhere.
    let mut c = Raw::connect(t.addr);
    c.handshake(3);
    c.go("disk", false, false).unwrap();
    c.request(0, NBD_CMD_WRITE, 1, 1 << 20, 8192, &[9; 8192]);
    assert_eq!(c.simple_reply(0).0, 0);
    c.disc();
    let out = run(Command::new("nbdinfo").arg("--map").arg(t.uri("disk")));
    let rows: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let expect = [
        ("0", "1048576", "hole,zero"),
        ("1048576", "8192", "data"),
        ("1056768", "66052096", "hole,zero"),
    ];
    assert_eq!(rows.len(), 3, "{out}");
    for (row, (off, len, what)) in rows.iter().zip(expect) {
        assert_eq!(
            (row[0].as_str(), row[1].as_str(), row[3].as_str()),
            (off, len, what),
            "{out}"
        );
    }
}

#[test]
fn nbdcopy_with_several_connections() {
    if !have("nbdcopy") {
        return;
    }
    let t = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = pattern(2, 64 << 20);
    std::fs::write(&src, &data).unwrap();
    // Plain memory, and memory behind the emulated disk (1 MiB cache: constant write-back).
    for export in ["disk", "emu"] {
        run(Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&src)
            .arg(t.uri(export)));
        let back = dir.path().join("back.img");
        run(Command::new("nbdcopy")
            .args(["--connections=4"])
            .arg(t.uri(export))
            .arg(&back));
        let got = std::fs::read(&back).unwrap();
        assert!(got == data, "nbdcopy round trip differs on {export}");
        files_equal(&src, &back);
    }
}

fn files_equal(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

#[test]
fn fio_nbd_engine_with_crc32c_verify() {
    if !have("fio") {
        return;
    }
    let t = TestServer::start();
    for export in ["disk", "emu"] {
        let out = run(Command::new("fio").args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", t.uri(export)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randseed=1234",
        ]));
        assert!(!out.contains("verify: bad"), "{export}: {out}");
    }
    let out = run(Command::new("fio").args([
        "--name=mixed",
        "--ioengine=nbd",
        &format!("--uri={}", t.uri("file")),
        "--rw=write",
        "--bs=256k",
        "--iodepth=8",
        "--size=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]));
    assert!(!out.contains("verify: bad"), "{out}");
}

/// The `nbd` crate's client negotiates with NBD_OPT_EXPORT_NAME and expects the 124 zeroes.
#[test]
fn nbd_crate_client_round_trip() {
    let t = TestServer::start();
    let mut s = std::net::TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let export = nbd::client::handshake(&mut s, b"disk").unwrap();
    assert_eq!(export.size, DISK_BYTES);
    assert!(export.send_flush && export.send_trim && !export.readonly);
    let mut c = nbd::client::NbdClient::new(&mut s, &export);
    let data = pattern(3, 1 << 20);
    c.seek(SeekFrom::Start(3 << 20)).unwrap();
    c.write_all(&data).unwrap();
    c.flush().unwrap();
    c.seek(SeekFrom::Start(3 << 20)).unwrap();
    let mut back = vec![0u8; data.len()];
    c.read_exact(&mut back).unwrap();
    assert!(back == data);
    // Read-only export: the crate surfaces EPERM as PermissionDenied.
    let mut s = std::net::TcpStream::connect(t.addr).unwrap();
    let export = nbd::client::handshake(&mut s, b"ro").unwrap();
    assert!(export.readonly);
    let mut c = nbd::client::NbdClient::new(&mut s, &export);
    let e = c.write(&[1; 512]).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
}

/// nbdfuse exposes the export as a file through FUSE (the path Linux uses for a loop device
/// where the nbd module is missing): write through the file, read back through NBD.
#[test]
fn nbdfuse_file_round_trip() {
    if !have("nbdfuse") || !have("fusermount3") {
        return;
    }
    if !Path::new("/dev/fuse").exists() && !common::skip("/dev/fuse is missing") {
        return;
    }
    let t = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut child = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(t.uri("disk"))
        .spawn()
        .unwrap();
    let file = mnt.join("nbd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) != DISK_BYTES {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not mount"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let data = pattern(4, 4 << 20);
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    let mut back = vec![0u8; data.len()];
    let mut f = std::fs::File::open(&file).unwrap();
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.read_exact(&mut back).unwrap();
    drop(f);
    let _ = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    let _ = child.wait();
    assert!(back == data, "read through FUSE differs");
    assert_eq!(
        read_export(&t, "disk", 8 << 20, 65536),
        data[..65536].to_vec(),
        "data reached the export"
    );
}
