//! Test certificates, made at run time with GnuTLS's `certtool`, in the layout nbdkit's
//! documentation describes (a CA, a server certificate for `localhost` and 127.0.0.1, and a
//! client certificate the CA signed), plus a second CA that nobody trusts.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Certificate directories, each in the layout its reader expects:
/// - [`Pki::all`]: `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
///   `client-key.pem` (nbdkit's test layout; the server and every client can use it);
/// - [`Pki::anon`]: `ca-cert.pem` only (a client with no certificate of its own);
/// - [`Pki::rogue`]: `ca-cert.pem` (the real CA, so the server is trusted) with a client
///   certificate and key signed by the untrusted CA;
/// - [`Pki::stranger`]: `ca-cert.pem` of the untrusted CA (a client that does not trust
///   the server).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

fn certtool(args: &[&str], dir: &Path) -> Vec<u8> {
    let out = Command::new("certtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running certtool");
    assert!(
        out.status.success(),
        "certtool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// An RSA private key (certtool's default type, what nbdkit's documentation makes; qemu
/// wants certificates that permit key encipherment, which rules out EdDSA), of 2048 bits
/// rather than the default 3072 because they are made for every test.
fn key(dir: &Path, name: &str) {
    let key = certtool(&["--generate-privkey", "--bits=2048"], dir);
    std::fs::write(dir.join(name), key).unwrap();
}

/// Signs `key` with the template `info`; self-signed when `ca` is `None`.
fn certificate(dir: &Path, out: &str, key: &str, info: &str, ca: Option<(&str, &str)>) {
    let template = format!("{out}.info");
    std::fs::write(dir.join(&template), info).unwrap();
    let mut args = vec![
        "--load-privkey",
        key,
        "--template",
        &template,
        "--outfile",
        out,
    ];
    match ca {
        None => args.push("--generate-self-signed"),
        Some((ca_cert, ca_key)) => {
            args.push("--generate-certificate");
            args.extend([
                "--load-ca-certificate",
                ca_cert,
                "--load-ca-privkey",
                ca_key,
            ]);
        }
    }
    certtool(&args, dir);
}

const CA_INFO: &str = "cn = nbd-server test CA\nca\ncert_signing_key\nexpiration_days = 7\n";
const SERVER_INFO: &str = "organization = nbd-server test\ncn = localhost\n\
    dns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\n\
    signing_key\nexpiration_days = 7\n";
const CRL_INFO: &str = "crl_next_update = 7\ncrl_number = 1\n";
const CLIENT_INFO: &str = "organization = nbd-server test\ncn = test client\n\
    tls_www_client\nencryption_key\nsigning_key\nexpiration_days = 7\n";

impl Pki {
    /// Makes every certificate; `None` (skipped, with the reason printed) when `certtool` is
    /// missing outside CI.
    pub fn generate() -> Option<Pki> {
        if !super::have("certtool") {
            return None;
        }
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
        };
        let all = pki.all();
        for d in [pki.all(), pki.anon(), pki.rogue(), pki.stranger()] {
            std::fs::create_dir(d).unwrap();
        }
        key(&all, "ca-key.pem");
        certificate(&all, "ca-cert.pem", "ca-key.pem", CA_INFO, None);
        key(&all, "server-key.pem");
        let ca = Some(("ca-cert.pem", "ca-key.pem"));
        certificate(&all, "server-cert.pem", "server-key.pem", SERVER_INFO, ca);
        key(&all, "client-key.pem");
        certificate(&all, "client-cert.pem", "client-key.pem", CLIENT_INFO, ca);
        // The CA's key stays out of the directories the server and clients read.
        std::fs::rename(all.join("ca-key.pem"), pki.dir.path().join("ca-key.pem")).unwrap();
        std::fs::copy(all.join("ca-cert.pem"), pki.anon().join("ca-cert.pem")).unwrap();

        let rogue = pki.rogue();
        key(&rogue, "rogue-ca-key.pem");
        certificate(
            &rogue,
            "rogue-ca-cert.pem",
            "rogue-ca-key.pem",
            CA_INFO,
            None,
        );
        key(&rogue, "client-key.pem");
        let rogue_ca = Some(("rogue-ca-cert.pem", "rogue-ca-key.pem"));
        certificate(
            &rogue,
            "client-cert.pem",
            "client-key.pem",
            CLIENT_INFO,
            rogue_ca,
        );
        std::fs::copy(all.join("ca-cert.pem"), rogue.join("ca-cert.pem")).unwrap();
        let stranger = pki.stranger().join("ca-cert.pem");
        std::fs::copy(rogue.join("rogue-ca-cert.pem"), stranger).unwrap();
        Some(pki)
    }

    /// A server directory like [`Pki::all`]'s whose `ca-crl.pem` revokes the client
    /// certificate of [`Pki::all`].
    pub fn revoked(&self) -> PathBuf {
        let (all, dir) = (self.all(), self.dir.path().join("revoked"));
        std::fs::create_dir(&dir).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(all.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(self.dir.path().join("crl.info"), CRL_INFO).unwrap();
        let args = [
            "--generate-crl",
            "--load-ca-privkey",
            "ca-key.pem",
            "--load-ca-certificate",
            "all/ca-cert.pem",
            "--load-certificate",
            "all/client-cert.pem",
            "--template",
            "crl.info",
            "--outfile",
            "revoked/ca-crl.pem",
        ];
        certtool(&args, self.dir.path());
        dir
    }

    pub fn all(&self) -> PathBuf {
        self.dir.path().join("all")
    }

    pub fn anon(&self) -> PathBuf {
        self.dir.path().join("anon")
    }

    pub fn rogue(&self) -> PathBuf {
        self.dir.path().join("rogue")
    }

    pub fn stranger(&self) -> PathBuf {
        self.dir.path().join("stranger")
    }
}
