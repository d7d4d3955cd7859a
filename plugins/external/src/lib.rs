//! The host side of external plugins (`tessera.plugin.v1`): an upstream authority served by
//! another process on a Unix socket. The server opens the executable, checks the SHA-256 of
//! what it read from that open file before every start, and runs that same open file (through
//! `/proc/self/fd`, so a file swapped in at the path afterwards is not what runs); an
//! executable that other users may write to, or that neither root nor the server's user
//! owns, is refused. It starts it with
//! `TESSERA_PLUGIN_SOCKET`, waits for the socket, checks `Info`, sends `Configure`, and then
//! supervises it: a health check (`Info`) every 2 s, and a restart with backoff (1 s doubling
//! to 30 s) when the process exits or stops answering. Every call has a deadline. While the
//! plugin is down the CA keeps signing with its current intermediate; only preparing a new
//! one waits for the plugin.
//!
//! A plugin dies with its server however the server dies: its stdin is a pipe whose other end
//! only the server holds, and the plugin contract (docs/plugins.md) is to exit when stdin
//! reaches end of file, which the kernel makes happen when the server exits, `kill -9`
//! included. As a second net, the plugin's pid is kept next to its socket, and a server that
//! starts and finds a plugin of a previous run still there (same executable) kills it.
//!
//! What it is not: no CA logic (the server's CA core asks it through the
//! `UpstreamAuthority` trait) and no plugin: the process it runs is the plugin
//! (`plugins/examples/cfssl-upstream` is one).

#![forbid(unsafe_code)]

use parking_lot::Mutex;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tessera_plugins::upstream::{MintMessage, PluginHealth, RootCache, mint_and_follow};
use tessera_plugins::{MintedX509Ca, UpstreamAuthority, UpstreamError};
use tessera_proto::plugin::v1 as pb;
use tessera_proto::plugin::v1::upstream_authority_client::UpstreamAuthorityClient;
use tessera_svc::config::{ConfigError, duration, invalid};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{info, warn};

const NAME: &str = "external";
const PROTOCOL_VERSION: u32 = 1;
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
const START_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How to run the plugin (`[upstream_authority] type = "external"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalSettings {
    /// The executable.
    pub command: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Expected SHA-256 of the executable, lower-case hex; checked before every start.
    pub checksum: Option<String>,
    /// `[upstream_authority.plugin_config]` as JSON.
    pub plugin_config_json: String,
    /// Deadline of each call.
    pub call_timeout: Duration,
    /// The socket the plugin serves on.
    pub socket: PathBuf,
}

/// The section's keys, as written.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExternalSettings {
    command: Option<PathBuf>,
    args: Option<Vec<String>>,
    checksum: Option<String>,
    call_timeout: Option<String>,
    plugin_config: Option<toml::Table>,
}

/// Every key of the section (besides `type`), as `upstream_authority.<key>`.
pub const KEYS: &[&str] = &[
    "upstream_authority.command",
    "upstream_authority.args",
    "upstream_authority.checksum",
    "upstream_authority.call_timeout",
    "upstream_authority.plugin_config",
];

impl ExternalSettings {
    /// Checks the section; the plugin's socket goes under `data_dir`.
    pub fn from_raw(u: RawExternalSettings, data_dir: &std::path::Path) -> Result<Self, ConfigError> {
        let command = u.command.ok_or(ConfigError::Missing("upstream_authority.command"))?;
        let checksum = match u.checksum {
            Some(c) => {
                let c = c.trim().to_ascii_lowercase();
                let c = c.strip_prefix("sha256:").unwrap_or(&c).to_owned();
                if c.len() != 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid(
                        "upstream_authority.checksum",
                        "must be the SHA-256 of the executable, 64 hex digits",
                    ));
                }
                Some(c)
            }
            None => None,
        };
        let plugin_config_json = serde_json::to_string(&u.plugin_config.unwrap_or_default())
            .map_err(|e| invalid("upstream_authority.plugin_config", e.to_string()))?;
        Ok(ExternalSettings {
            command,
            args: u.args.unwrap_or_default(),
            checksum,
            plugin_config_json,
            call_timeout: duration(
                "upstream_authority.call_timeout",
                u.call_timeout.as_deref().unwrap_or("30s"),
                Duration::ZERO,
            )?,
            socket: data_dir.join("plugins").join("upstream.sock"),
        })
    }
}

struct Running {
    child: Child,
    client: UpstreamAuthorityClient<Channel>,
    name: String,
    /// The write end of the plugin's stdin: never written, closed when the server exits.
    _lifeline: Option<tokio::process::ChildStdin>,
}

/// The plugin executable, opened and checked: run it through `/proc/self/fd`.
struct Executable {
    file: std::fs::File,
    /// A script (`#!`): its interpreter reads it again by path, so it runs by path.
    script: bool,
}

/// An upstream authority in another process.
pub struct ExternalUpstream {
    settings: ExternalSettings,
    trust_domain: String,
    running: tokio::sync::Mutex<Option<Running>>,
    health: Mutex<PluginHealth>,
    roots: RootCache,
}

impl std::fmt::Debug for ExternalUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalUpstream").field("command", &self.settings.command).finish_non_exhaustive()
    }
}

fn cfg_err(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Config { upstream: NAME, reason: reason.into() }
}

fn call_err(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Signing { upstream: NAME, reason: reason.into() }
}

impl ExternalUpstream {
    /// Starts the plugin once (so a broken plugin stops the server's start with a clear
    /// error); [`ExternalUpstream::supervise`] keeps it running afterwards.
    pub async fn start(settings: ExternalSettings, trust_domain: &str) -> Result<Self, UpstreamError> {
        let me = Self {
            settings,
            trust_domain: trust_domain.to_owned(),
            running: tokio::sync::Mutex::new(None),
            health: Mutex::new(PluginHealth::default()),
            roots: RootCache::default(),
        };
        let r = me.spawn().await?;
        me.set_health(|h| {
            h.up = true;
            h.name.clone_from(&r.name);
            h.pid = r.child.id();
        });
        me.subscribe_roots(&r).await;
        *me.running.lock().await = Some(r);
        Ok(me)
    }

    /// Follows the plugin's roots with `SubscribeRoots` (when it offers it).
    async fn subscribe_roots(&self, r: &Running) {
        let mut c = r.client.clone();
        match tokio::time::timeout(self.settings.call_timeout, c.subscribe_roots(pb::SubscribeRootsRequest {})).await {
            Ok(Ok(resp)) => {
                let mut stream = resp.into_inner();
                let sink = self.roots.sink();
                self.roots.follow(async move {
                    while let Ok(Some(m)) = stream.message().await {
                        if sink.set(m.upstream_x509_roots) {
                            info!(roots = sink.get().len(), "Upstream roots updated by the plugin");
                        }
                    }
                });
            }
            Ok(Err(e)) if e.code() == tonic::Code::Unimplemented => {
                info!("The plugin does not offer SubscribeRoots; root updates come with each mint");
            }
            Ok(Err(e)) => warn!(error = %e.message(), "SubscribeRoots failed"),
            Err(_) => warn!("SubscribeRoots timed out"),
        }
    }

    fn set_health(&self, f: impl FnOnce(&mut PluginHealth)) {
        {
            let mut h = self.health.lock();
            f(&mut h);
        }
    }

    /// Opens the executable, refuses one that others may write to, and checks the SHA-256 of
    /// the bytes read from that open file.
    fn open_checked(&self) -> Result<Executable, UpstreamError> {
        use std::io::{Read, Seek};
        use std::os::unix::fs::PermissionsExt;
        let path = &self.settings.command;
        let mut file =
            std::fs::File::open(path).map_err(|e| cfg_err(format!("cannot open {}: {e}", path.display())))?;
        let meta = file.metadata().map_err(|e| cfg_err(format!("{}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(cfg_err(format!(
                "{} is writable by group or others (mode {:o}); refusing to run it",
                path.display(),
                meta.permissions().mode() & 0o7777
            )));
        }
        // Its owner could rewrite it between the check and the start: only root or the
        // server's own user may own it.
        use std::os::unix::fs::MetadataExt;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != me {
            return Err(cfg_err(format!(
                "{} is owned by uid {}, neither root nor the server's user ({me}); refusing to run it",
                path.display(),
                meta.uid()
            )));
        }
        let mut head = [0u8; 2];
        let script = file.read_exact(&mut head).is_ok() && &head == b"#!";
        file.rewind().map_err(|e| cfg_err(format!("{}: {e}", path.display())))?;
        if let Some(want) = &self.settings.checksum {
            if script {
                return Err(cfg_err(format!(
                    "{} is a script: its interpreter would read it again by path after the check; with a checksum, the plugin must be a binary",
                    path.display()
                )));
            }
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = file.read(&mut buf).map_err(|e| cfg_err(format!("cannot read {}: {e}", path.display())))?;
                if n == 0 {
                    break;
                }
                ctx.update(buf.get(..n).unwrap_or_default());
            }
            let got = tessera_identity::x509::hex_lower(ctx.finish().as_ref());
            if &got != want {
                return Err(cfg_err(format!(
                    "{} has SHA-256 {got}, not the configured checksum {want}; refusing to run it",
                    path.display()
                )));
            }
        }
        Ok(Executable { file, script })
    }

    /// Kills a plugin a previous server run left behind (its pid file names a live process
    /// running the same executable), so that it cannot outlive us twice.
    fn reap_stale(&self, exe: &Executable) {
        use std::os::unix::fs::MetadataExt;
        let pid_file = self.pid_file();
        let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) else {
            return;
        };
        let Ok(me) = exe.file.metadata() else { return };
        let same =
            std::fs::metadata(format!("/proc/{pid}/exe")).is_ok_and(|m| m.dev() == me.dev() && m.ino() == me.ino());
        if same && let Some(p) = rustix::process::Pid::from_raw(pid) {
            warn!(pid, "A plugin from a previous run is still running; stopping it");
            let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        }
        let _ = std::fs::remove_file(pid_file);
    }

    fn pid_file(&self) -> PathBuf {
        let mut p = self.settings.socket.clone().into_os_string();
        p.push(".pid");
        PathBuf::from(p)
    }

    async fn spawn(&self) -> Result<Running, UpstreamError> {
        use std::os::fd::AsRawFd;
        let exe = self.open_checked()?;
        let sock = &self.settings.socket;
        if let Some(dir) = sock.parent() {
            tessera_plugins::fsutil::ensure_private_dir(dir)
                .map_err(|e| cfg_err(format!("cannot create {}: {e}", dir.display())))?;
        }
        self.reap_stale(&exe);
        let _ = std::fs::remove_file(sock);
        // The checked open file itself, not the path (which could now name another file).
        let program = if exe.script {
            self.settings.command.clone()
        } else {
            PathBuf::from(format!("/proc/self/fd/{}", exe.file.as_raw_fd()))
        };
        let mut child = Command::new(&program)
            .arg0(&self.settings.command)
            .args(&self.settings.args)
            .env("TESSERA_PLUGIN_SOCKET", sock)
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| cfg_err(format!("cannot start {}: {e}", self.settings.command.display())))?;
        drop(exe);
        let lifeline = child.stdin.take();
        if let Some(pid) = child.id() {
            let _ = tessera_plugins::fsutil::atomic_write(&self.pid_file(), pid.to_string().as_bytes(), 0o600);
        }
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let channel = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(cfg_err(format!("plugin exited during start ({status})")));
            }
            if sock.exists()
                && let Ok(ch) = tessera_svc::connect::unix(sock).await
            {
                break ch;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                return Err(cfg_err(format!(
                    "plugin did not serve {} within {}s",
                    sock.display(),
                    START_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let mut client = UpstreamAuthorityClient::new(channel);
        let t = self.settings.call_timeout;
        let info = tokio::time::timeout(t, client.info(pb::InfoRequest {}))
            .await
            .map_err(|_| cfg_err("Info timed out"))?
            .map_err(|e| cfg_err(format!("Info: {}", e.message())))?
            .into_inner();
        if info.protocol_version != PROTOCOL_VERSION {
            let _ = child.kill().await;
            return Err(cfg_err(format!(
                "plugin {:?} speaks protocol version {}, this server speaks {PROTOCOL_VERSION}",
                info.name, info.protocol_version
            )));
        }
        tokio::time::timeout(
            t,
            client.configure(pb::ConfigureRequest {
                config_json: self.settings.plugin_config_json.clone(),
                trust_domain: self.trust_domain.clone(),
            }),
        )
        .await
        .map_err(|_| cfg_err("Configure timed out"))?
        .map_err(|e| cfg_err(format!("plugin {:?} refused its configuration: {}", info.name, e.message())))?;
        info!(plugin = %info.name, pid = child.id(), "External plugin started");
        Ok(Running { child, client, name: info.name, _lifeline: lifeline })
    }

    async fn client(&self) -> Result<UpstreamAuthorityClient<Channel>, UpstreamError> {
        match self.running.lock().await.as_ref() {
            Some(r) => Ok(r.client.clone()),
            None => Err(call_err("the plugin is down; the server is restarting it")),
        }
    }

    /// Health-checks the plugin and restarts it with backoff until shutdown.
    pub async fn supervise(&self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
                _ = shutdown.changed() => break,
            }
            let problem = {
                let mut guard = self.running.lock().await;
                match guard.as_mut() {
                    None => Some("not running".to_owned()),
                    Some(r) => match r.child.try_wait() {
                        Ok(Some(status)) => Some(format!("exited ({status})")),
                        _ => {
                            let mut c = r.client.clone();
                            match tokio::time::timeout(HEALTH_INTERVAL, c.info(pb::InfoRequest {})).await {
                                Ok(Ok(_)) => None,
                                Ok(Err(e)) => Some(format!("health check failed: {}", e.message())),
                                Err(_) => Some("health check timed out".to_owned()),
                            }
                        }
                    },
                }
            };
            let Some(problem) = problem else {
                backoff = Duration::from_secs(1);
                continue;
            };
            warn!(problem = %problem, "External plugin is down; restarting it");
            self.set_health(|h| {
                h.up = false;
                h.last_error = Some(problem.clone());
            });
            if let Some(mut old) = self.running.lock().await.take() {
                let _ = old.child.kill().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match self.spawn().await {
                Ok(r) => {
                    self.set_health(|h| {
                        h.up = true;
                        h.restarts += 1;
                        h.pid = r.child.id();
                        h.name.clone_from(&r.name);
                    });
                    self.subscribe_roots(&r).await;
                    *self.running.lock().await = Some(r);
                }
                Err(e) => {
                    warn!(error = %e, "External plugin restart failed");
                    self.set_health(|h| h.last_error = Some(e.to_string()));
                }
            }
        }
        if let Some(mut r) = self.running.lock().await.take() {
            let _ = r.child.kill().await;
        }
    }
}

#[async_trait]
impl UpstreamAuthority for ExternalUpstream {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn mint_x509_ca(&self, csr: &[u8], ttl: Duration) -> Result<MintedX509Ca, UpstreamError> {
        let mut c = self.client().await?;
        let t = self.settings.call_timeout;
        let req = pb::MintX509CaRequest {
            csr: csr.to_vec(),
            preferred_ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        };
        // Later messages are root updates; the CA reads them through `roots()` on its
        // rotation tick. A newer subscription replaces this one.
        let open = async move { c.mint_x509_ca_and_subscribe(req).await.map(tonic::Response::into_inner) };
        mint_and_follow(
            NAME,
            "MintX509CaAndSubscribe",
            t,
            open,
            |m: pb::MintX509CaResponse| MintMessage { chain: m.x509_ca_chain, roots: m.upstream_x509_roots },
            &self.roots,
            |roots| info!(roots = roots.len(), "Upstream roots updated by the plugin"),
        )
        .await
    }

    async fn roots(&self) -> Result<Vec<Vec<u8>>, UpstreamError> {
        let r = self.roots.get();
        if r.is_empty() {
            return Err(call_err("no upstream roots known yet"));
        }
        Ok(r)
    }

    fn health(&self) -> Option<PluginHealth> {
        Some(self.health.lock().clone())
    }
}
