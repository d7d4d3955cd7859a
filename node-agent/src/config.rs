//! Agent configuration: TOML with unknown keys refused, parsed into a validated [`Config`].
//! docs/agent.md mirrors these doc comments.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tessera_identity::{SpiffeId, TrustDomain};

pub use tessera_svc::config::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: Option<String>,
    server_address: Option<String>,
    server_addresses: Option<Vec<String>>,
    data_dir: Option<PathBuf>,
    #[serde(default = "default_socket")]
    socket_path: PathBuf,
    trust_bundle_path: Option<PathBuf>,
    #[serde(default)]
    insecure_bootstrap: bool,
    join_token: Option<tessera_identity::Secret>,
    #[serde(default = "default_health")]
    health_address: String,
    #[serde(default = "default_log_level")]
    log_level: String,
    #[serde(default = "default_log_format")]
    log_format: String,
    admin_socket_path: Option<PathBuf>,
    #[serde(default)]
    doctor: RawDoctor,
    #[serde(default = "default_sync")]
    sync_interval: String,
    #[serde(default)]
    cert_files: Vec<RawCertFiles>,
    workload_attestor: Option<Vec<RawAttestor>>,
    node_attestor: Option<RawNodeAttestor>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNodeAttestor {
    #[serde(rename = "type")]
    kind: String,
    cluster: Option<String>,
    token_path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttestor {
    #[serde(rename = "type")]
    kind: String,
    kubelet_url: Option<String>,
    kubelet_ca_path: Option<PathBuf>,
    #[serde(default)]
    skip_kubelet_verification: bool,
    token_path: Option<PathBuf>,
    max_poll_attempts: Option<u32>,
    poll_retry_interval: Option<String>,
    cgroup_root: Option<String>,
    cgroupfs_path: Option<PathBuf>,
}

/// The default projected token of the agent's pod for `k8s_psat`.
pub const DEFAULT_PSAT_TOKEN_PATH: &str = "/var/run/secrets/tokens/tessera-agent";
/// The pod's service account token, for the kubelet.
pub const DEFAULT_SA_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `[node_attestor] type = "k8s_psat"`: attest with the pod's projected token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsatSettings {
    /// The cluster's name, as configured on the server.
    pub cluster: String,
    /// The projected token (audience `tessera-server`), read at every attestation.
    pub token_path: PathBuf,
}

/// `[[workload_attestor]] type = "k8s"`: pods from the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sAttestorSettings {
    /// The kubelet's base URL.
    pub kubelet_url: String,
    /// CA of the kubelet's serving certificate (default: the cluster CA next to the token).
    pub kubelet_ca_path: Option<PathBuf>,
    /// Accept any kubelet certificate (self-signed kubelet certificates).
    pub skip_kubelet_verification: bool,
    /// Bearer token for the kubelet, read at every call; `None` for the read-only port.
    pub token_path: Option<PathBuf>,
    /// How many times a pod not yet in the kubelet's list is looked up again.
    pub max_poll_attempts: u32,
    /// The pause between those lookups.
    pub poll_retry_interval: Duration,
    /// The kubelet's cgroup root (its `cgroupRoot` setting, `/` by default): a caller is in a
    /// pod only when its cgroup sits right under it, where the kubelet puts pods.
    pub cgroup_root: tessera_k8s::cgroup::CgroupRoot,
    /// The host's cgroup file system (`/sys/fs/cgroup` by default). When the agent is not in
    /// the host's cgroup namespace, a caller's cgroup is confirmed there (the kernel lists
    /// the caller's pid in that cgroup's `cgroup.procs`).
    pub cgroupfs_path: PathBuf,
}

/// A workload attestor (`[[workload_attestor]] type = "…"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadAttestorKind {
    /// The caller's uid, gid, user, group, executable path and SHA-256, from the kernel.
    Unix,
    /// The caller's pod, from its cgroup and the kubelet.
    K8s(K8sAttestorSettings),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertFiles {
    dir: PathBuf,
    spiffe_id: String,
}

fn default_socket() -> PathBuf {
    "/run/tessera/agent/api.sock".into()
}
fn default_health() -> String {
    "127.0.0.1:8082".into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_sync() -> String {
    "5s".into()
}
fn default_log_format() -> String {
    "text".into()
}

/// `[doctor]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDoctor {
    entry_unmatched_after: String,
}

impl Default for RawDoctor {
    fn default() -> Self {
        Self { entry_unmatched_after: "10m".into() }
    }
}

/// Where to write one SVID as files for proxyless gRPC and file-reading apps.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFiles {
    /// Directory for `cert-chain.pem`, `key.pem` (0600) and `root-cert.pem`.
    pub dir: PathBuf,
    /// Which SVID.
    pub spiffe_id: SpiffeId,
}

/// How the agent trusts the server before it has a bundle of its own.
#[derive(Debug, Clone, PartialEq)]
pub enum Bootstrap {
    /// PEM roots to trust.
    BundleFile(PathBuf),
    /// Trust any server on first contact (development only; see SECURITY.md).
    Insecure,
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our trust domain.
    pub trust_domain: TrustDomain,
    /// The server's Agent API, `host:port` (the first of `servers`).
    pub server_address: String,
    /// Every server replica's Agent API, tried in order from the last one that answered.
    pub servers: Vec<String>,
    /// Where the agent keeps its SVID, key and bundle.
    pub data_dir: PathBuf,
    /// The Workload API + SDS socket.
    pub socket_path: PathBuf,
    /// First-contact trust.
    pub bootstrap: Bootstrap,
    /// Join token for the first attestation (not needed once the agent holds an SVID).
    pub join_token: Option<tessera_identity::Secret>,
    /// Health and metrics listener.
    pub health_address: SocketAddr,
    /// Log level.
    pub log_level: String,
    /// Log line format.
    pub log_format: tessera_svc::LogFormat,
    /// The admin socket (`doctor`, `debug`): 0600, this user and root only. Default
    /// `<data_dir>/admin.sock`, away from the directory workloads see.
    pub admin_socket_path: PathBuf,
    /// `doctor`: an entry no workload has received for this long is reported
    /// (`entry-unmatched`, informational).
    pub entry_unmatched_after: Duration,
    /// How often entries and bundles are synced.
    pub sync_interval: Duration,
    /// SVIDs to keep written as files.
    pub cert_files: Vec<CertFiles>,
    /// Workload attestors, in order; `unix` when the config names none.
    pub workload_attestors: Vec<WorkloadAttestorKind>,
    /// Attest with a Kubernetes projected token instead of a join token.
    pub psat: Option<PsatSettings>,
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = tessera_svc::config::from_toml(text)?;
        let td_raw = raw.trust_domain.ok_or(ConfigError::Missing("trust_domain"))?;
        let trust_domain = TrustDomain::new(&td_raw)
            .map_err(|e| ConfigError::Invalid { key: "trust_domain", reason: format!("{td_raw:?}: {e}") })?;
        let servers = match (raw.server_address, raw.server_addresses) {
            (Some(one), None) => vec![one],
            (None, Some(many)) if !many.is_empty() => many,
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "server_addresses",
                    reason: "set server_address or server_addresses, not both".into(),
                });
            }
            _ => return Err(ConfigError::Missing("server_address")),
        };
        for a in &servers {
            if !a.contains(':') {
                return Err(ConfigError::Invalid {
                    key: "server_address",
                    reason: format!("{a:?}: expected host:port"),
                });
            }
        }
        let server_address = servers.first().cloned().unwrap_or_default();
        let data_dir = raw.data_dir.ok_or(ConfigError::Missing("data_dir"))?;
        let bootstrap = match (raw.trust_bundle_path, raw.insecure_bootstrap) {
            (Some(p), false) => Bootstrap::BundleFile(p),
            (None, true) => Bootstrap::Insecure,
            (Some(_), true) => {
                return Err(ConfigError::Invalid {
                    key: "insecure_bootstrap",
                    reason: "set either trust_bundle_path or insecure_bootstrap, not both".into(),
                });
            }
            (None, false) => return Err(ConfigError::Missing("trust_bundle_path (or insecure_bootstrap = true)")),
        };
        let health_address = raw.health_address.parse().map_err(|e| ConfigError::Invalid {
            key: "health_address",
            reason: format!("{:?}: {e}", raw.health_address),
        })?;
        if !["error", "warn", "info", "debug", "trace"].contains(&raw.log_level.as_str()) {
            return Err(ConfigError::Invalid {
                key: "log_level",
                reason: format!("{:?}: expected error, warn, info, debug or trace", raw.log_level),
            });
        }
        let sync_interval =
            tessera_svc::config::duration("sync_interval", &raw.sync_interval, Duration::from_millis(100))?;
        let cert_files = raw
            .cert_files
            .into_iter()
            .map(|c| {
                let spiffe_id = SpiffeId::new(&c.spiffe_id).map_err(|e| ConfigError::Invalid {
                    key: "cert_files.spiffe_id",
                    reason: format!("{:?}: {e}", c.spiffe_id),
                })?;
                Ok(CertFiles { dir: c.dir, spiffe_id })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let mut workload_attestors = Vec::new();
        for a in
            raw.workload_attestor.unwrap_or_else(|| vec![RawAttestor { kind: "unix".into(), ..Default::default() }])
        {
            let kind = match a.kind.as_str() {
                "unix" => WorkloadAttestorKind::Unix,
                "k8s" => {
                    let poll_retry_interval = match &a.poll_retry_interval {
                        Some(s) => {
                            tessera_svc::config::duration("workload_attestor.poll_retry_interval", s, Duration::ZERO)?
                        }
                        None => Duration::from_millis(500),
                    };
                    let kubelet_url = a.kubelet_url.clone().unwrap_or_else(|| "https://127.0.0.1:10250".into());
                    if !(kubelet_url.starts_with("https://") || kubelet_url.starts_with("http://")) {
                        return Err(ConfigError::Invalid {
                            key: "workload_attestor.kubelet_url",
                            reason: format!("{kubelet_url:?}: expected an http(s) URL"),
                        });
                    }
                    let token_path = match &a.token_path {
                        Some(p) if p.as_os_str().is_empty() => None,
                        Some(p) => Some(p.clone()),
                        None => Some(PathBuf::from(DEFAULT_SA_TOKEN_PATH)),
                    };
                    let cgroup_root = a.cgroup_root.as_deref().unwrap_or("/").parse().map_err(
                        |e: tessera_k8s::cgroup::CgroupRootError| ConfigError::Invalid {
                            key: "workload_attestor.cgroup_root",
                            reason: e.to_string(),
                        },
                    )?;
                    WorkloadAttestorKind::K8s(K8sAttestorSettings {
                        kubelet_url,
                        kubelet_ca_path: a.kubelet_ca_path.clone(),
                        skip_kubelet_verification: a.skip_kubelet_verification,
                        token_path,
                        max_poll_attempts: a.max_poll_attempts.unwrap_or(60).clamp(1, 600),
                        poll_retry_interval,
                        cgroup_root,
                        cgroupfs_path: a.cgroupfs_path.clone().unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup")),
                    })
                }
                other => {
                    return Err(ConfigError::Invalid {
                        key: "workload_attestor.type",
                        reason: format!("{other:?}: expected \"unix\" or \"k8s\""),
                    });
                }
            };
            if a.kind == "unix"
                && (a.kubelet_url.is_some()
                    || a.kubelet_ca_path.is_some()
                    || a.token_path.is_some()
                    || a.max_poll_attempts.is_some()
                    || a.poll_retry_interval.is_some()
                    || a.cgroup_root.is_some()
                    || a.cgroupfs_path.is_some()
                    || a.skip_kubelet_verification)
            {
                return Err(ConfigError::Invalid {
                    key: "workload_attestor.type",
                    reason: "the unix attestor takes no settings".into(),
                });
            }
            if workload_attestors.iter().any(|k| std::mem::discriminant(k) == std::mem::discriminant(&kind)) {
                return Err(ConfigError::Invalid {
                    key: "workload_attestor.type",
                    reason: format!("{:?} is listed twice", a.kind),
                });
            }
            workload_attestors.push(kind);
        }
        let psat = match raw.node_attestor {
            None => None,
            Some(n) if n.kind == "k8s_psat" => Some(PsatSettings {
                cluster: n.cluster.filter(|c| !c.is_empty()).ok_or(ConfigError::Missing("node_attestor.cluster"))?,
                token_path: n.token_path.unwrap_or_else(|| PathBuf::from(DEFAULT_PSAT_TOKEN_PATH)),
            }),
            Some(n) => {
                return Err(ConfigError::Invalid {
                    key: "node_attestor.type",
                    reason: format!("{:?}: expected \"k8s_psat\" (a join token is the top-level join_token)", n.kind),
                });
            }
        };
        if psat.is_some() && raw.join_token.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ConfigError::Invalid {
                key: "join_token",
                reason: "set join_token or [node_attestor] k8s_psat, not both".into(),
            });
        }
        let admin_socket_path = raw.admin_socket_path.unwrap_or_else(|| data_dir.join("admin.sock"));
        if admin_socket_path.parent() == raw.socket_path.parent() {
            return Err(ConfigError::Invalid {
                key: "admin_socket_path",
                reason: "must not be in the socket_path's directory, which workloads see".into(),
            });
        }
        let log_format = raw.log_format.parse()?;
        let entry_unmatched_after = tessera_svc::config::duration(
            "doctor.entry_unmatched_after",
            &raw.doctor.entry_unmatched_after,
            Duration::from_secs(1),
        )?;
        Ok(Config {
            trust_domain,
            server_address,
            servers,
            data_dir,
            socket_path: raw.socket_path,
            bootstrap,
            join_token: raw.join_token.filter(|t| !t.is_empty()),
            health_address,
            log_level: raw.log_level,
            log_format,
            admin_socket_path,
            entry_unmatched_after,
            sync_interval,
            cert_files,
            workload_attestors,
            psat,
        })
    }

    /// Reads and validates a config file.
    /// What still keeps a parsed configuration from starting, checked without starting:
    /// each file it names exists and holds what it should. `(key, problem)` pairs.
    pub fn file_problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut readable = |key: &str, p: &std::path::Path, pem: bool| match std::fs::read(p) {
            Ok(b) if pem => match tessera_identity::pem::decode_certs(&b) {
                Ok(c) if !c.is_empty() => {}
                Ok(_) => out.push((key.to_owned(), format!("{} holds no PEM certificate", p.display()))),
                Err(e) => out.push((key.to_owned(), format!("{}: {e}", p.display()))),
            },
            Ok(_) => {}
            Err(e) => out.push((key.to_owned(), format!("{}: {e}", p.display()))),
        };
        if let Bootstrap::BundleFile(p) = &self.bootstrap
            && !self.data_dir.join("agent-svid.pem").exists()
        {
            readable("trust_bundle_path", p, true);
        }
        if let Some(p) = &self.psat {
            readable("node_attestor.token_path", &p.token_path, false);
        }
        for a in &self.workload_attestors {
            if let WorkloadAttestorKind::K8s(k) = a {
                if let Some(ca) = &k.kubelet_ca_path {
                    readable("workload_attestor.kubelet_ca_path", ca, true);
                }
                if let Some(t) = &k.token_path {
                    readable("workload_attestor.token_path", t, false);
                }
            }
        }
        for (key, p) in [("data_dir", &self.data_dir), ("socket_path", &self.socket_path)] {
            let dir = if key == "data_dir" { Some(p.as_path()) } else { p.parent() };
            if let Some(d) = dir
                && d.exists()
                && !d.is_dir()
            {
                out.push((key.to_owned(), format!("{} is not a directory", d.display())));
            }
        }
        out
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Toml(format!("cannot read config {}: {e}", path.display())))?;
        Self::from_toml(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
trust_domain = "example.org"
server_address = "127.0.0.1:8081"
data_dir = "/var/lib/tessera/agent"
socket_path = "/run/tessera/agent/api.sock"
trust_bundle_path = "/etc/tessera/bootstrap.pem"
join_token = "abc"
health_address = "127.0.0.1:8082"
"#;

    #[test]
    fn the_documented_contract_parses() {
        let c = Config::from_toml(CONTRACT).unwrap();
        assert_eq!(c.server_address, "127.0.0.1:8081");
        assert_eq!(c.bootstrap, Bootstrap::BundleFile("/etc/tessera/bootstrap.pem".into()));
        assert_eq!(c.join_token.as_ref().map(tessera_identity::Secret::expose), Some("abc"));
        assert!(!format!("{c:?}").contains("\"abc\""), "the join token shows in Debug");
        assert_eq!(c.sync_interval, Duration::from_secs(5));
    }

    #[test]
    fn workload_attestors_default_to_unix_and_unknown_ones_are_refused() {
        assert_eq!(Config::from_toml(CONTRACT).unwrap().workload_attestors, vec![WorkloadAttestorKind::Unix]);
        let k8s = format!("{CONTRACT}[[workload_attestor]]\ntype = \"k8s\"\nskip_kubelet_verification = true\n");
        let c = Config::from_toml(&k8s).unwrap();
        let WorkloadAttestorKind::K8s(s) = &c.workload_attestors[0] else { panic!("{:?}", c.workload_attestors) };
        assert_eq!(s.kubelet_url, "https://127.0.0.1:10250");
        assert!(s.skip_kubelet_verification && s.max_poll_attempts == 60);
        let odd = format!("{CONTRACT}[[workload_attestor]]\ntype = \"docker\"\n");
        assert!(Config::from_toml(&odd).unwrap_err().to_string().contains("workload_attestor.type"));
        let misplaced = format!("{CONTRACT}[[workload_attestor]]\ntype = \"unix\"\nkubelet_url = \"http://x\"\n");
        assert!(Config::from_toml(&misplaced).unwrap_err().to_string().contains("no settings"));
        let extra = format!("{CONTRACT}[[workload_attestor]]\ntype = \"unix\"\ncolour = 1\n");
        assert!(Config::from_toml(&extra).unwrap_err().to_string().contains("colour"));
    }

    #[test]
    fn k8s_psat_node_attestation_needs_a_cluster_and_excludes_a_join_token() {
        let no_token = CONTRACT.replace("join_token = \"abc\"\n", "");
        let psat = format!("{no_token}[node_attestor]\ntype = \"k8s_psat\"\ncluster = \"cluster-a\"\n");
        let c = Config::from_toml(&psat).unwrap();
        let p = c.psat.unwrap();
        assert_eq!((p.cluster.as_str(), p.token_path.to_str().unwrap()), ("cluster-a", DEFAULT_PSAT_TOKEN_PATH));
        let both = format!("{CONTRACT}[node_attestor]\ntype = \"k8s_psat\"\ncluster = \"cluster-a\"\n");
        assert!(Config::from_toml(&both).unwrap_err().to_string().contains("join_token"));
        let nameless = format!("{no_token}[node_attestor]\ntype = \"k8s_psat\"\n");
        assert!(Config::from_toml(&nameless).unwrap_err().to_string().contains("node_attestor.cluster"));
    }

    #[test]
    fn several_server_addresses_are_accepted_instead_of_one() {
        let many = CONTRACT.replace(
            "server_address = \"127.0.0.1:8081\"",
            "server_addresses = [\"10.0.0.1:8081\", \"10.0.0.2:8081\"]",
        );
        let c = Config::from_toml(&many).unwrap();
        assert_eq!(c.servers, vec!["10.0.0.1:8081".to_owned(), "10.0.0.2:8081".to_owned()]);
        assert_eq!(c.server_address, "10.0.0.1:8081");
        let both = format!("{CONTRACT}server_addresses = [\"10.0.0.2:8081\"]\n");
        assert!(Config::from_toml(&both).unwrap_err().to_string().contains("not both"));
        let bad = many.replace("10.0.0.2:8081", "nohost");
        assert!(Config::from_toml(&bad).unwrap_err().to_string().contains("host:port"));
    }

    #[test]
    fn bootstrap_needs_exactly_one_trust_source() {
        let none = CONTRACT.replace("trust_bundle_path = \"/etc/tessera/bootstrap.pem\"\n", "");
        assert!(Config::from_toml(&none).unwrap_err().to_string().contains("trust_bundle_path"));
        let both = format!("{CONTRACT}insecure_bootstrap = true\n");
        assert!(Config::from_toml(&both).unwrap_err().to_string().contains("insecure_bootstrap"));
        let insecure = format!("{none}insecure_bootstrap = true\n");
        assert_eq!(Config::from_toml(&insecure).unwrap().bootstrap, Bootstrap::Insecure);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        assert!(Config::from_toml(&format!("{CONTRACT}colour = 1\n")).unwrap_err().to_string().contains("colour"));
        let bad = format!("{CONTRACT}[[cert_files]]\ndir = \"/x\"\nspiffe_id = \"nope\"\n");
        assert!(Config::from_toml(&bad).unwrap_err().to_string().contains("cert_files.spiffe_id"));
    }
}
