//! The real binaries as processes: `tessera-server` in a temp dir (started, health-checked,
//! driven through its CLI, killed on drop), any child process with its log ([`Proc`]), a
//! server and an agent together ([`Mesh`]), and steady traffic through a gateway
//! ([`Traffic`]). The binaries must be built first (`cargo build --bins`; `scripts/test.sh`
//! does it).

use std::path::{Path, PathBuf};

use crate::config::server_config_for;
use crate::wait::{poll, wait_for};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The directory holding the built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps/<test>; binaries from target/<profile>/<bin>.
    let parent = exe.parent().expect("exe dir");
    let dir = if parent.ends_with("deps") { parent.parent().expect("target dir") } else { parent }.to_owned();
    assert!(
        dir.join("tessera-server").exists(),
        "{} has no tessera-server binary: run `cargo build --bins` first (scripts/test.sh does)",
        dir.display()
    );
    dir
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Path of a built binary.
pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Other binaries for this test process, set once by [`use_binaries`].
static OTHER_BINARIES: std::sync::OnceLock<(PathBuf, Vec<String>)> = std::sync::OnceLock::new();

/// Makes [`ServerProc`], [`Mesh`] and their CLIs run `dir`'s binaries through `runner` (such
/// as `qemu-aarch64-static`) for the rest of this test process, instead of the host build's.
/// For a test file of its own: every test in the process is affected.
pub fn use_binaries(dir: &Path, runner: &[&str]) {
    let set = OTHER_BINARIES.set((dir.to_owned(), runner.iter().map(|s| (*s).to_owned()).collect()));
    assert!(set.is_ok(), "use_binaries called twice");
}

/// A command running binary `name`: the host build's, or what [`use_binaries`] chose.
pub fn command(name: &str) -> Command {
    match OTHER_BINARIES.get() {
        Some((dir, runner)) if !runner.is_empty() => {
            let mut c = Command::new(&runner[0]);
            c.args(&runner[1..]).arg(dir.join(name));
            c
        }
        Some((dir, _)) => Command::new(dir.join(name)),
        None => Command::new(bin(name)),
    }
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

impl ServerProc {
    /// Writes the config and starts the server; returns once the admin socket answers.
    pub fn start(dir: &Path, ca: &str) -> Self {
        Self::start_in(dir, "example.org", ca, "")
    }

    /// The same in trust domain `td`, with `extra` appended to the config.
    pub fn start_in(dir: &Path, td: &str, ca: &str, extra: &str) -> Self {
        Self::start_text(dir, &(server_config_for(td, dir, ca) + extra))
    }

    /// Starts a server with exactly `text` as its config.
    pub fn start_text(dir: &Path, text: &str) -> Self {
        let config = dir.join("server.toml");
        std::fs::write(&config, text).unwrap();
        let mut p = ServerProc { child: None, dir: dir.to_owned(), socket: dir.join("admin.sock"), config };
        p.spawn();
        p
    }

    /// (Re)starts the process with the same config and waits until it is healthy.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.log")).unwrap();
        let child = command("tessera-server")
            .args(["run", "--config"])
            .arg(&self.config)
            .env_remove("RUST_BACKTRACE")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let log = self.dir.join("server.log");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let (socket, child) = (&self.socket, self.child.as_mut().unwrap());
        poll(
            30,
            Duration::from_millis(25),
            "server start",
            || {
                if run_cli("tessera-server", socket, &["healthcheck"]).status.success() {
                    return Ok(true);
                }
                match child.try_wait().unwrap() {
                    Some(status) => Err(format!("server exited ({status}): {}", read_log())),
                    None => Ok(false),
                }
            },
            read_log,
        );
    }

    /// Runs the CLI against this server's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_cli("tessera-server", &self.socket, args)
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

/// Runs one of our binaries with `args` and `--socket socket`.
fn run_cli(binary: &str, socket: &Path, args: &[&str]) -> Output {
    command(binary).args(args).arg("--socket").arg(socket).env_remove("RUST_BACKTRACE").output().unwrap()
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

/// The current process's uid (from /proc, no libc).
pub fn my_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A program from the project venv (`target/venv/bin`), or `$TESSERA_<NAME>` when set.
pub fn venv_tool(name: &str) -> PathBuf {
    let var = format!("TESSERA_{}", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let p = bin_dir().parent().unwrap().join("venv/bin").join(name);
    assert!(p.exists(), "{} is missing: run scripts/test.sh, which installs it into target/venv", p.display());
    p
}

/// A long-running child process killed on drop, logging to a file.
pub struct Proc {
    /// The child.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Self {
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env_remove("RUST_BACKTRACE")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `ready` every 25 ms for up to `secs`; fails with the log if the process dies or
    /// time runs out.
    pub fn wait_until(&mut self, secs: u64, what: &str, mut ready: impl FnMut() -> bool) {
        let read_log = || std::fs::read_to_string(&self.log).unwrap_or_default();
        let child = &mut self.child;
        poll(
            secs,
            Duration::from_millis(25),
            what,
            || {
                if ready() {
                    return Ok(true);
                }
                match child.try_wait().unwrap() {
                    Some(s) => Err(format!("process exited ({s}): {}", read_log())),
                    None => Ok(false),
                }
            },
            read_log,
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET over a fresh connection: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_call(addr, "GET", path, &[], "")
}

/// One HTTP/1.1 request over a fresh connection, with extra headers and a JSON body (none
/// when empty): (status, body).
pub fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    // Long enough for a browser's first start behind a WebDriver call.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    // Up to the end of the head, then Content-Length bytes when given (a server may keep the
    // connection open despite `Connection: close`, as chromedriver does), else to the end.
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            break;
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) => {
            let mut body = vec![0u8; n];
            s.read_exact(&mut body)?;
            raw.extend_from_slice(&body);
        }
        None => {
            s.read_to_end(&mut raw)?;
        }
    }
    let buf = String::from_utf8_lossy(&raw).into_owned();
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok((code, body.to_owned()));
    }
    // Chunked: size line (hex), data, CRLF; a zero size ends it.
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    Ok((code, out))
}

/// A server and an agent, both the real binaries, with a node alias for the agent.
pub struct Mesh {
    /// Temp dir.
    pub dir: tempfile::TempDir,
    /// The server.
    pub server: ServerProc,
    /// The agent.
    pub agent: Option<Proc>,
    /// The agent's socket.
    pub socket: PathBuf,
    /// The agent's config file.
    pub agent_config: PathBuf,
    /// The node alias entries hang under.
    pub alias: String,
}

/// A `doctor --output json` run's findings as (code, severity, subject); fails the test if
/// the output is not JSON or a finding lacks one of its five string fields.
pub fn doctor_findings(out: &Output) -> Vec<(String, String, String)> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let field = |f: &serde_json::Value, k: &str| -> String {
        f[k].as_str().unwrap_or_else(|| panic!("finding without {k}: {f}")).to_owned()
    };
    let all = v["findings"].as_array().unwrap_or_else(|| panic!("doctor output without findings: {v}"));
    all.iter()
        .map(|f| {
            for k in ["message", "fix"] {
                field(f, k);
            }
            (field(f, "code"), field(f, "severity"), field(f, "subject"))
        })
        .collect()
}

impl Mesh {
    /// Federates this mesh's server with `peer` (trust domain `peer_td`), whose bundle
    /// endpoint is at `url` (`https_spiffe`, bootstrapped with its current bundle). Returns
    /// what `federation create` printed.
    pub fn federate(&self, peer_td: &str, url: &str, peer: &Mesh) -> String {
        let boot = self.dir.path().join(format!("{peer_td}.json"));
        std::fs::write(&boot, peer.server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
        self.server.cli_ok(&[
            "federation",
            "create",
            "--trust-domain",
            peer_td,
            "--bundle-endpoint-url",
            url,
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            &format!("spiffe://{peer_td}/tessera/server"),
            "--bundle-path",
            boot.to_str().unwrap(),
            "--bundle-format",
            "spiffe",
        ])
    }

    /// Starts a server with `ca` settings and an agent attested with a fresh join token.
    pub fn start(ca: &str, sync_interval: &str) -> Self {
        Self::start_in("example.org", ca, sync_interval, "")
    }

    /// The same in trust domain `td`, with `server_extra` appended to the server config.
    pub fn start_in(td: &str, ca: &str, sync_interval: &str, server_extra: &str) -> Self {
        Self::start_custom(td, ca, sync_interval, |t| t + server_extra)
    }

    /// The same, with the server config text passed through `edit`.
    pub fn start_custom(td: &str, ca: &str, sync_interval: &str, edit: impl FnOnce(String) -> String) -> Self {
        let alias = format!("spiffe://{td}/node/e2e");
        Self::start_attested(td, ca, sync_interval, edit, &alias, |server| {
            let token: serde_json::Value =
                serde_json::from_str(&server.cli_ok(&["token", "generate", "--spiffe-id", &alias, "--output", "json"]))
                    .unwrap();
            format!("join_token = \"{}\"\n", token["token"].as_str().unwrap())
        })
    }

    /// The general form: `attestation` returns the agent's attestation settings (config text
    /// appended after the common keys), `alias` is what [`Mesh::register`] parents entries to.
    pub fn start_attested(
        td: &str,
        ca: &str,
        sync_interval: &str,
        edit: impl FnOnce(String) -> String,
        alias: &str,
        attestation: impl FnOnce(&ServerProc) -> String,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().to_owned();
        std::fs::create_dir_all(d.join("server")).unwrap();
        let server_cfg = server_config_for(td, &d.join("server"), ca)
            .replace("agent_api_address = \"127.0.0.1:0\"", &format!("agent_api_address = \"127.0.0.1:{port}\""));
        let server_cfg = edit(server_cfg);
        let config = d.join("server.toml");
        std::fs::write(&config, server_cfg).unwrap();
        let mut server = ServerProc { child: None, dir: d.join("server"), socket: d.join("server/admin.sock"), config };
        server.spawn();
        let attest = attestation(&server);
        std::fs::write(d.join("bootstrap.pem"), server.cli_ok(&["bundle", "show"])).unwrap();
        let socket = d.join("agent.sock");
        let agent_config = d.join("agent.toml");
        let health = free_port();
        std::fs::write(
            &agent_config,
            format!(
                "trust_domain = \"{td}\"\nserver_address = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\nhealth_address = \"127.0.0.1:{health}\"\nsync_interval = \"{sync_interval}\"\n{attest}",
                d.join("agent").display(),
                socket.display(),
                d.join("bootstrap.pem").display(),
            ),
        )
        .unwrap();
        let mut m = Mesh { dir, server, agent: None, socket, agent_config, alias: alias.to_owned() };
        m.start_agent();
        m
    }

    /// (Re)starts the agent binary and waits for its socket.
    pub fn start_agent(&mut self) {
        let mut cmd = command("tessera-agent");
        cmd.args(["run", "--config"]).arg(&self.agent_config);
        let mut p = Proc::spawn(cmd, self.dir.path().join("agent.log"));
        let sock = self.socket.clone();
        p.wait_until(30, "tessera-agent", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
        self.agent = Some(p);
    }

    /// Registers `spiffe_id` for this process's uid under the node alias.
    pub fn register(&self, spiffe_id: &str, extra: &[&str]) -> String {
        self.register_with(spiffe_id, &format!("unix:uid:{}", my_uid()), extra)
    }

    /// Registers `spiffe_id` with one `selector` under the node alias.
    pub fn register_with(&self, spiffe_id: &str, selector: &str, extra: &[&str]) -> String {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            &self.alias,
            "--selector",
            selector,
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        let v: serde_json::Value = serde_json::from_str(&self.server.cli_ok(&args)).unwrap();
        v["entries"][0]["id"].as_str().unwrap().to_owned()
    }

    /// Waits up to 20 s until the agent serves `spiffe_id` to this process.
    pub fn wait_for_svid(&self, spiffe_id: &str) {
        wait_for(
            20,
            &format!("an SVID for {spiffe_id}"),
            || String::from_utf8_lossy(&self.agent_cli(&["api", "fetch", "x509"]).stdout).contains(spiffe_id),
            String::new,
        );
    }

    /// Runs `tessera-agent api ...` against this agent.
    pub fn agent_cli(&self, args: &[&str]) -> Output {
        run_cli("tessera-agent", &self.socket, args)
    }
}

/// Continuous HTTP GETs of `/` against `addr` (every 20 ms, a new connection each) in a
/// thread, counting answers 200 and everything else.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<(u32, Vec<String>)>,
}

impl Traffic {
    /// Starts sending.
    pub fn start(addr: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, addr) = (stop.clone(), addr.to_owned());
        let handle = std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                match http_get(&addr, "/") {
                    Ok((200, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (ok, failed)
        });
        Self { stop, handle }
    }

    /// Stops and returns (successes, the failures as text).
    pub fn finish(self) -> (u32, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap()
    }

    /// Stops and fails the test on any failed request or too little traffic; returns the count.
    pub fn assert_no_failures(self, what: &str) -> u32 {
        let (ok, failed) = self.finish();
        assert!(
            failed.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            failed.len(),
            ok as usize + failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(ok > 20, "{what}: too little traffic ({ok} requests)");
        eprintln!("{what}: {ok} requests, 0 failed");
        ok
    }
}

/// `openssl verify -CAfile root -untrusted chain chain`: the chain's first certificate
/// verifies to `root` through the chain's other certificates.
pub fn openssl_verify(root: &Path, chain: &Path) -> bool {
    Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(root)
        .arg("-untrusted")
        .arg(chain)
        .arg(chain)
        .output()
        .unwrap()
        .status
        .success()
}
