//! A real PostgreSQL (Debian `postgresql`) for the tests: a cluster made with `initdb` in a
//! temp dir, served by `postgres` on a free port and a private socket directory, with trust
//! authentication for the local user `tessera`. As root, the server runs as the `postgres`
//! system user (PostgreSQL refuses to run as root).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Proc, free_port, my_uid};

/// A running PostgreSQL cluster; stopped and removed on drop.
pub struct TestPostgres {
    _proc: Proc,
    _dir: tempfile::TempDir,
    /// `127.0.0.1:<port>`.
    pub port: u16,
    /// With TLS on: the CA (PEM) that issued the server's certificate (for `127.0.0.1`).
    pub ca_pem: Option<String>,
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        // As root, `Proc` holds `runuser`, not the server: killing it would orphan the
        // postmaster (which exits only a minute later, when it misses its lock file). Stop
        // the server itself, and wait for it.
        let _ = as_pg_user(&pg_bin("pg_ctl"))
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self._dir.path().join("data"))
            .output();
    }
}

/// Where Debian puts the server binaries (`/usr/lib/postgresql/<major>/bin`).
pub fn pg_bin(name: &str) -> PathBuf {
    let mut majors: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is missing: scripts/test.sh installs the Debian package postgresql")
        .flatten()
        .map(|e| e.path())
        .collect();
    majors.sort();
    let bin = majors.last().expect("no PostgreSQL version under /usr/lib/postgresql").join("bin").join(name);
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

fn as_pg_user(program: &Path) -> Command {
    if my_uid() == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl TestPostgres {
    /// initdb + postgres; returns once it accepts connections.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// The same with TLS on (`ssl=on`), its certificate issued by a fresh test CA.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let ca_pem = tls.then(|| {
            use std::os::unix::fs::PermissionsExt;
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::default();
            ca.distinguished_name.push(rcgen::DnType::CommonName, "test database CA");
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_cert = ca.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join("server.crt"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
            std::fs::set_permissions(dir.path().join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
            ca_cert.pem()
        });
        if my_uid() == 0 {
            let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(ok.success(), "cannot chown the PostgreSQL temp dir to postgres");
        }
        let out = as_pg_user(&pg_bin("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "tessera", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut cmd = as_pg_user(&pg_bin("postgres"));
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-k"])
            .arg(dir.path())
            .args(["-c", "fsync=on", "-c", "max_connections=200"]);
        if tls {
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", dir.path().join("server.crt").display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", dir.path().join("server.key").display()));
        }
        let log = std::env::temp_dir().join(format!("tessera-pg-{port}.log"));
        let mut proc = Proc::spawn(cmd, log);
        let ready = || {
            Command::new(pg_bin("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "tessera"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        proc.wait_until(60, "postgres", ready);
        Self { _proc: proc, _dir: dir, port, ca_pem }
    }

    /// A new database and the connection string for it.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(pg_bin("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "tessera", "-d", "postgres", "-c"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "createdb: {}", String::from_utf8_lossy(&out.stderr));
        format!("host=127.0.0.1 port={} user=tessera dbname={name}", self.port)
    }

    /// Runs SQL with psql against `db`.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(pg_bin("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "tessera", "-d", db, "-At", "-c", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}
