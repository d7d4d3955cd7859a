//! Fixtures for the end-to-end tests: run the real `tessera-server` binary in a temp dir, wait
//! for its socket (never a fixed sleep), drive its CLI, and kill it on drop.
//!
//! The binaries must be built first (`cargo build --bins`; `scripts/test.sh` does it).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The directory holding the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_owned();
    assert!(
        dir.join("tessera-server").exists(),
        "{} has no tessera-server binary: run `cargo build --bins` first (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// Path of a built binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A `tessera-server run` process.
pub struct ServerProc {
    /// The child process.
    pub child: Option<Child>,
    /// Its temp dir (config, data, socket, log).
    pub dir: PathBuf,
    /// Admin socket.
    pub socket: PathBuf,
    /// Config file.
    pub config: PathBuf,
}

/// A server config for `dir`: loopback, ephemeral ports, disk key manager.
pub fn server_config(dir: &Path, ca: &str) -> String {
    format!(
        r#"trust_domain = "example.org"
data_dir = "{data}"
log_level = "info"
[server]
agent_api_address = "127.0.0.1:0"
health_address = "127.0.0.1:0"
admin_socket = "{sock}"
[ca]
{ca}
[key_manager]
type = "disk"
[store]
type = "sled"
"#,
        data = dir.join("data").display(),
        sock = dir.join("admin.sock").display(),
    )
}

impl ServerProc {
    /// Writes the config and starts the server; returns once the admin socket answers.
    pub fn start(dir: &Path, ca: &str) -> Self {
        let config = dir.join("server.toml");
        std::fs::write(&config, server_config(dir, ca)).unwrap();
        let mut p = ServerProc { child: None, dir: dir.to_owned(), socket: dir.join("admin.sock"), config };
        p.spawn();
        p
    }

    /// (Re)starts the process with the same config and waits until it is healthy.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.log")).unwrap();
        let child = Command::new(bin("tessera-server"))
            .args(["run", "--config"])
            .arg(&self.config)
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.cli(&["healthcheck"]).status.success() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited during start ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "server not healthy after 30 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Runs the CLI against this server's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("tessera-server"))
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap()
    }

    /// Runs the CLI and returns stdout, failing the test on a non-zero exit.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// SIGKILL, no cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let status = c.wait().unwrap();
            assert!(status.success(), "server exited with {status} on SIGTERM: {}", self.log());
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a command and returns its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// The pkilint `lint_pkix_cert` executable: `$TESSERA_PKILINT`, else the project venv
/// (`target/venv`, made by scripts/test.sh).
pub fn pkilint() -> PathBuf {
    if let Ok(p) = std::env::var("TESSERA_PKILINT") {
        return PathBuf::from(p);
    }
    let p = bin_dir().parent().unwrap().join("venv/bin/lint_pkix_cert");
    assert!(p.exists(), "{} is missing: run scripts/test.sh, which installs pkilint into target/venv", p.display());
    p
}
