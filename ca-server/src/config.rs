//! Server configuration: TOML with unknown keys refused, parsed into a validated [`Config`]
//! of typed values. Every field's doc comment is its user documentation
//! (docs/configuration.md mirrors it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tessera_identity::{SpiffeId, TrustDomain};

use tessera_plugins::upstream::disk::DiskFiles;

use tessera_store::{EndpointProfile, FederationRelationship};
use tessera_svc::config::invalid;

pub use tessera_svc::config::ConfigError;

/// Where a configuration looks up the environment variables it names.
pub type Env<'a> = dyn Fn(&str) -> Option<String> + 'a;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    /// The trust domain this server is the authority for.
    trust_domain: Option<String>,
    /// Where the store and the disk key manager keep their files.
    data_dir: Option<PathBuf>,
    /// `error`, `warn`, `info`, `debug` or `trace`.
    #[serde(default = "default_log_level")]
    log_level: String,
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    log_format: String,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    doctor: RawDoctor,
    console: Option<RawConsole>,
    #[serde(default)]
    ca: RawCa,
    key_manager: Option<toml::Table>,
    #[serde(default = "default_store")]
    store: RawStore,
    #[serde(default)]
    federation: RawFederation,
    upstream_authority: Option<toml::Table>,
    node_attestor: Option<Vec<RawPlugin>>,
    istio: Option<crate::istio::config::RawIstio>,
    bundle_publisher: Option<Vec<crate::publish::RawPublisher>>,
}

/// `[upstream_authority] type = "disk"`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiskUpstream {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    chain_file: Option<PathBuf>,
    bundle_file: Option<PathBuf>,
    cacerts_dir: Option<PathBuf>,
}

/// Every key of the disk upstream's section (besides `type`).
const DISK_KEYS: &[&str] = &[
    "upstream_authority.cert_file",
    "upstream_authority.key_file",
    "upstream_authority.chain_file",
    "upstream_authority.bundle_file",
    "upstream_authority.cacerts_dir",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    bundle_endpoint: Option<RawBundleEndpoint>,
    #[serde(default)]
    trust_domains: Vec<RawPeer>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundleEndpoint {
    address: String,
    #[serde(default = "default_profile")]
    profile: String,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    #[serde(default = "default_refresh_hint")]
    refresh_hint: String,
}

fn default_profile() -> String {
    "https_spiffe".into()
}

fn default_refresh_hint() -> String {
    "5m".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    trust_domain: String,
    bundle_endpoint_url: String,
    #[serde(default = "default_profile")]
    profile: String,
    endpoint_spiffe_id: Option<String>,
    bootstrap_bundle_path: Option<PathBuf>,
    ca_bundle_path: Option<PathBuf>,
    #[serde(default)]
    allow_empty_bundle: bool,
}

fn default_log_level() -> String {
    "info".into()
}

fn default_log_format() -> String {
    "text".into()
}

/// `[doctor]`: the thresholds behind `tessera-server doctor`'s findings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDoctor {
    ca_expiry_horizon: Option<String>,
    root_expiry_horizon: String,
    agent_sync_interval: String,
}

impl Default for RawDoctor {
    fn default() -> Self {
        Self { ca_expiry_horizon: None, root_expiry_horizon: "30d".into(), agent_sync_interval: "5s".into() }
    }
}

/// `[console]`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    address: String,
    #[serde(default)]
    admin_ids: Vec<String>,
}

fn console(raw: RawConsole) -> Result<crate::console::ConsoleConfig, ConfigError> {
    let address = addr("console.address", &raw.address)?;
    let admin_ids = raw
        .admin_ids
        .iter()
        .map(|s| SpiffeId::new(s).map_err(|e| invalid("console.admin_ids", format!("{s:?}: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    if !address.ip().is_loopback() && admin_ids.is_empty() {
        return Err(invalid(
            "console.admin_ids",
            "a console on a non-loopback address requires TLS client certificates: list the SPIFFE IDs allowed in",
        ));
    }
    Ok(crate::console::ConsoleConfig { address, admin_ids })
}

/// `[doctor]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoctorConfig {
    /// `ca-expiring` when the active authority expires within this with no successor
    /// prepared (default: a third of `ca.ca_ttl`; a successor is normally prepared at half).
    pub ca_expiry_horizon: Duration,
    /// `root-expiring` when an upstream root expires within this (default 30 days).
    pub root_expiry_horizon: Duration,
    /// The agents' `sync_interval`: `agent-silent` after three of them without a sync.
    pub agent_sync_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    agent_api_address: String,
    admin_socket: PathBuf,
    health_address: String,
    join_token_ttl: String,
    agent_svid_ttl: String,
    rotation_check_interval: String,
    max_message_bytes: usize,
    max_batch_size: usize,
    instance_id: String,
    rate_limit_svids_per_second: f64,
    rate_limit_attestations_per_minute: f64,
    max_connections: usize,
    connection_idle_timeout: String,
    max_anonymous_connections_per_ip: usize,
    max_connections_per_agent: usize,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            agent_api_address: "0.0.0.0:8081".into(),
            admin_socket: "/run/tessera/server/admin.sock".into(),
            health_address: "127.0.0.1:8080".into(),
            join_token_ttl: "10m".into(),
            agent_svid_ttl: "1h".into(),
            rotation_check_interval: "10s".into(),
            max_message_bytes: 1024 * 1024,
            max_batch_size: 500,
            instance_id: "default".into(),
            rate_limit_svids_per_second: 1000.0,
            rate_limit_attestations_per_minute: 60.0,
            max_connections: 16_384,
            connection_idle_timeout: "60s".into(),
            max_anonymous_connections_per_ip: 256,
            max_connections_per_agent: 8,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCa {
    key_type: String,
    ca_ttl: Option<String>,
    default_x509_svid_ttl: String,
    default_jwt_svid_ttl: String,
    max_x509_svid_ttl: Option<String>,
    max_jwt_svid_ttl: String,
}

impl Default for RawCa {
    fn default() -> Self {
        Self {
            key_type: "ec-p256".into(),
            ca_ttl: None,
            default_x509_svid_ttl: "1h".into(),
            default_jwt_svid_ttl: "5m".into(),
            max_x509_svid_ttl: None,
            max_jwt_svid_ttl: "24h".into(),
        }
    }
}

/// A plugin section: `type` picks the implementation. (A plain struct rather than a tagged
/// enum: serde cannot refuse unknown keys inside internally tagged unit variants.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugin {
    #[serde(rename = "type")]
    kind: String,
    /// `k8s_psat`: the clusters whose agents may attest, by name.
    clusters: Option<std::collections::BTreeMap<String, tessera_plugin_k8s_psat::RawPsatCluster>>,
}

impl RawPlugin {
    fn named(kind: &str) -> Self {
        Self { kind: kind.into(), clusters: None }
    }
}

pub use tessera_plugin_k8s_psat::PsatCluster;

/// `[key_manager] type = "pkcs11"`, owned by its plugin.
pub use tessera_plugin_pkcs11::Pkcs11Settings;
/// Where a secret named in the configuration is read from, at start.
pub use tessera_plugins::SecretSource as PinSource;

fn store(s: RawStore, env: &Env<'_>) -> Result<StoreKind, ConfigError> {
    let conn =
        match (s.connection_string, &s.connection_string_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "store.connection_string_env",
                    reason: "set connection_string or connection_string_env, not both".into(),
                });
            }
            (c, None) => c,
            (None, Some(var)) => Some(env(var).map(tessera_identity::Secret::new).ok_or_else(|| {
                invalid("store.connection_string_env", format!("environment variable {var} is not set"))
            })?),
        };
    match (s.kind.as_str(), conn) {
        ("sled", None) if s.max_connections.is_none() && s.tls_ca_file.is_none() => Ok(StoreKind::Sled),
        ("sled", _) => Err(ConfigError::Invalid {
            key: "store.connection_string",
            reason: "connection_string, max_connections and tls_ca_file belong to type \"postgres\"".into(),
        }),
        ("postgres", Some(connection_string)) => {
            let max_connections = s.max_connections.unwrap_or(8);
            if !(1..=256).contains(&max_connections) {
                return Err(ConfigError::Invalid { key: "store.max_connections", reason: "must be 1 to 256".into() });
            }
            Ok(StoreKind::Postgres { connection_string, max_connections, tls_ca_file: s.tls_ca_file })
        }
        ("postgres", None) => Err(ConfigError::Missing("store.connection_string")),
        (other, _) => Err(ConfigError::Invalid {
            key: "store.type",
            reason: format!("{other:?}: expected \"sled\" or \"postgres\""),
        }),
    }
}

/// `[key_manager]`: `type` picks the key manager; only `pkcs11` has keys of its own, parsed by
/// its plugin. No section means `disk`.
fn key_manager(section: Option<toml::Table>) -> Result<KeyManagerKind, ConfigError> {
    let mut table = section.unwrap_or_default();
    let kind = match table.remove("type") {
        None => "disk".to_owned(),
        Some(toml::Value::String(s)) => s,
        Some(_) => return Err(ConfigError::Toml("[key_manager]: `type` must be a string".into())),
    };
    match kind.as_str() {
        "disk" | "memory" => match table.keys().next() {
            None => Ok(if kind == "disk" { KeyManagerKind::Disk } else { KeyManagerKind::Memory }),
            Some(k) if tessera_plugin_pkcs11::KEYS.contains(&k.as_str()) => Err(ConfigError::Invalid {
                key: "key_manager.module_path",
                reason: format!(
                    "module_path, token_label, pin_file, pin_env and key_label_prefix belong to type \"pkcs11\", not {kind:?}"
                ),
            }),
            Some(k) => Err(ConfigError::Toml(format!("unknown key `key_manager.{k}`"))),
        },
        "pkcs11" => {
            let raw: tessera_plugin_pkcs11::RawPkcs11Settings =
                toml::Value::Table(table).try_into().map_err(|e| ConfigError::Toml(format!("[key_manager]: {e}")))?;
            Ok(KeyManagerKind::Pkcs11(Pkcs11Settings::try_from(raw)?))
        }
        other => Err(ConfigError::Invalid {
            key: "key_manager.type",
            reason: format!("{other:?}: expected \"disk\", \"memory\" or \"pkcs11\""),
        }),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    #[serde(rename = "type")]
    kind: String,
    connection_string: Option<tessera_identity::Secret>,
    /// The name of an environment variable holding the connection string (a Secret).
    connection_string_env: Option<String>,
    max_connections: Option<usize>,
    tls_ca_file: Option<PathBuf>,
}

fn default_store() -> RawStore {
    RawStore {
        kind: "sled".into(),
        connection_string: None,
        connection_string_env: None,
        max_connections: None,
        tls_ca_file: None,
    }
}

/// Which key manager holds the CA keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManagerKind {
    /// Files under `<data_dir>/keys`, 0600.
    Disk,
    /// Process memory; a restart makes a new CA.
    Memory,
    /// An HSM over PKCS#11: keys made and used in the token.
    Pkcs11(Pkcs11Settings),
}

/// A node attestor the server accepts (`[[node_attestor]] type = "…"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestorKind {
    /// One-use join tokens.
    JoinToken,
    /// Kubernetes projected service-account tokens, per cluster.
    K8sPsat(Vec<PsatCluster>),
}

/// Which store backend.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// sled under `<data_dir>/store`.
    Sled,
    /// PostgreSQL, shared by several server replicas.
    Postgres {
        /// libpq connection string or `postgres://` URL (may hold a password: never shown).
        connection_string: tessera_identity::Secret,
        /// Connections in the pool.
        max_connections: usize,
        /// PEM trust anchors: connect over TLS and verify the server against them.
        tls_ca_file: Option<PathBuf>,
    },
}

impl std::fmt::Debug for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKind::Sled => f.write_str("Sled"),
            StoreKind::Postgres { max_connections, tls_ca_file, .. } => f
                .debug_struct("Postgres")
                .field("connection_string", &"<redacted>")
                .field("max_connections", max_connections)
                .field("tls_ca_file", tls_ca_file)
                .finish(),
        }
    }
}

/// `[upstream_authority]`: who signs our X.509 CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamConfig {
    /// CA certificate and key files (or Istio's `cacerts` directory).
    Disk(DiskFiles),
    /// A plugin process speaking `tessera.plugin.v1`.
    External(tessera_plugin_external::ExternalSettings),
    /// Vault or OpenBao's PKI engine.
    Vault(VaultSettings),
    /// A parent Tessera server of the same trust domain.
    Tessera(TesseraUpstreamSettings),
}

/// `[upstream_authority] type = "tessera"`: the nested upstream's own settings.
pub use tessera_plugin_nested::NestedConfig as TesseraUpstreamSettings;

pub use tessera_plugin_vault::{VaultAuthSettings, VaultSettings};

/// How our bundle endpoint authenticates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServingProfile {
    /// With the server's own X509-SVID (`spiffe://<td>/tessera/server`).
    HttpsSpiffe,
    /// With a Web PKI certificate from files, reloaded when they change.
    HttpsWeb {
        /// Certificate chain, PEM.
        cert_file: PathBuf,
        /// Its private key, PEM (PKCS#8, SEC1 or PKCS#1).
        key_file: PathBuf,
    },
}

/// `[federation.bundle_endpoint]`.
#[derive(Debug, Clone)]
pub struct BundleEndpointConfig {
    /// Listen address.
    pub address: SocketAddr,
    /// How it authenticates.
    pub profile: ServingProfile,
    /// `spiffe_refresh_hint` in the served document.
    pub refresh_hint: Duration,
}

pub use crate::federation::ConfiguredPeer;

/// `[federation]`.
#[derive(Debug, Clone, Default)]
pub struct FederationConfig {
    /// Our bundle endpoint, when served.
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    /// Peers from the config file.
    pub trust_domains: Vec<ConfiguredPeer>,
}

pub use tessera_ca::CaConfig;

/// Validated server configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Our trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log filter.
    pub log_level: String,
    /// Log line format.
    pub log_format: tessera_svc::LogFormat,
    /// Doctor thresholds.
    pub doctor: DoctorConfig,
    /// The read-only web console, when served.
    pub console: Option<crate::console::ConsoleConfig>,
    /// Agent API listen address (mTLS).
    pub agent_api_address: SocketAddr,
    /// Admin API Unix socket (0600).
    pub admin_socket: PathBuf,
    /// Health and metrics listen address.
    pub health_address: SocketAddr,
    /// Default join token lifetime.
    pub join_token_ttl: Duration,
    /// Agent SVID lifetime.
    pub agent_svid_ttl: Duration,
    /// How often the CA checks whether to prepare/activate/prune.
    pub rotation_check_interval: Duration,
    /// Largest gRPC message accepted on the Agent API.
    pub max_message_bytes: usize,
    /// Most CSRs in one batch.
    pub max_batch_size: usize,
    /// This replica's name: keys its CA journal in a shared store.
    pub instance_id: String,
    /// SVIDs (X.509 and JWT) one agent may have signed per second; 0 = unlimited.
    pub rate_limit_svids_per_second: f64,
    /// Attestation attempts per minute from one IP address; 0 = unlimited.
    pub rate_limit_attestations_per_minute: f64,
    /// Bounds of every TCP listener (Agent API, Istio CA API, bundle endpoint, health):
    /// `max_connections`, `connection_idle_timeout`, `max_anonymous_connections_per_ip`.
    pub connections: tessera_svc::listener::ConnLimits,
    /// CA settings.
    pub ca: CaConfig,
    /// Key manager.
    pub key_manager: KeyManagerKind,
    /// Store.
    pub store: StoreKind,
    /// Federation.
    pub federation: FederationConfig,
    /// The upstream authority; `None`: our CA is a self-signed root.
    pub upstream_authority: Option<UpstreamConfig>,
    /// Node attestors, each at most once; `join_token` when the config names none.
    pub node_attestors: Vec<NodeAttestorKind>,
    /// The Istio CA API, when served.
    pub istio: Option<crate::istio::config::IstioConfig>,
    /// Trust bundle writers to Kubernetes ConfigMaps.
    pub bundle_publishers: Vec<crate::publish::PublisherConfig>,
}

/// `ca.ca_ttl` when the config sets none: 24h, or, with the Istio CA API on, long enough for
/// its longest workload certificates to learn a new root before it signs (1.8 ×
/// `istio.max_workload_cert_ttl`, rounded up to the hour: 87h for the default 48h).
fn default_ca_ttl(istio: Option<&crate::istio::config::IstioConfig>) -> Duration {
    let day = Duration::from_secs(24 * 3600);
    let Some(i) = istio else { return day };
    let need = (i.max_ttl / 2 + i.max_ttl / 10) * 3;
    day.max(Duration::from_secs(need.as_secs().div_ceil(3600) * 3600))
}

/// Refuses an Istio configuration whose workload certificates are too long-lived for the CA's
/// rotation. A prepared CA sits in the bundle for a third of `ca_ttl` before it signs (from
/// ½ to ⅚ of the CA's life). An Istio client learns new roots only when it renews, at half
/// its certificate's life, so that third must cover half the longest certificate, plus a
/// tenth of it for renewal jitter, clock skew and retries; else its peers' new certificates
/// fail its handshakes until it renews (istio #30946, #31111).
fn istio_rotation_fits(
    istio: crate::istio::config::IstioConfig,
    ca_ttl: Duration,
) -> Result<crate::istio::config::IstioConfig, ConfigError> {
    let window = ca_ttl / 3;
    let need = istio.max_ttl / 2 + istio.max_ttl / 10;
    if window < need {
        let h = |d: Duration| {
            let hours = d.as_secs_f64() / 3600.0;
            if hours.fract() < 0.05 { format!("{hours:.0}h") } else { format!("{hours:.1}h") }
        };
        return Err(ConfigError::Invalid {
            key: "istio.max_workload_cert_ttl",
            reason: format!(
                "a new CA is in the bundle for a third of ca.ca_ttl ({}) before it signs, but Istio clients holding {} certificates may learn it only {} later (at half life, plus a tenth for jitter and clock skew): raise ca.ca_ttl to at least {} or lower istio.max_workload_cert_ttl to at most {} (docs/istio.md, CA rotation)",
                h(window),
                h(istio.max_ttl),
                h(need),
                h(need * 3),
                h(window * 5 / 3),
            ),
        });
    }
    Ok(istio)
}

fn dur(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    tessera_svc::config::duration(key, s, Duration::ZERO)
}

fn addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|e| ConfigError::Invalid { key, reason: format!("{s:?}: {e}") })
}

/// `[upstream_authority]`: `type` picks the plugin, and each plugin parses its own keys. A
/// key of another type is named as such.
fn upstream(
    mut table: toml::Table,
    td: &TrustDomain,
    data_dir: &std::path::Path,
) -> Result<UpstreamConfig, ConfigError> {
    const TYPES: [(&str, &[&str]); 4] = [
        ("disk", DISK_KEYS),
        ("vault", tessera_plugin_vault::settings::KEYS),
        ("tessera", tessera_plugin_nested::KEYS),
        ("external", tessera_plugin_external::KEYS),
    ];
    let kind = match table.remove("type") {
        Some(toml::Value::String(k)) => k,
        Some(_) => return Err(invalid("upstream_authority.type", "must be a string")),
        None => return Err(ConfigError::Missing("upstream_authority.type")),
    };
    let Some((_, own)) = TYPES.iter().find(|(t, _)| *t == kind) else {
        return Err(invalid(
            "upstream_authority.type",
            format!("{kind:?}: expected \"disk\", \"vault\", \"tessera\" or \"external\""),
        ));
    };
    for k in table.keys() {
        let full = format!("upstream_authority.{k}");
        if own.contains(&full.as_str()) {
            continue;
        }
        let owner = TYPES.iter().find_map(|(t, keys)| keys.iter().find(|x| **x == full).map(|x| (*t, *x)));
        return Err(match owner {
            Some((t, key)) => {
                invalid(key, format!("not a key of upstream_authority.type {kind:?}: it belongs to type {t:?}"))
            }
            None => ConfigError::Toml(format!("unknown key `{full}`")),
        });
    }
    fn section<T: serde::de::DeserializeOwned>(table: toml::Table) -> Result<T, ConfigError> {
        toml::Value::Table(table).try_into().map_err(|e| ConfigError::Toml(format!("[upstream_authority]: {e}")))
    }
    match kind.as_str() {
        "vault" => Ok(UpstreamConfig::Vault(VaultSettings::try_from(section::<
            tessera_plugin_vault::RawVaultSettings,
        >(table)?)?)),
        "tessera" => {
            Ok(UpstreamConfig::Tessera(tessera_plugin_nested::NestedConfig::from_raw(section(table)?, td, data_dir)?))
        }
        "external" => Ok(UpstreamConfig::External(tessera_plugin_external::ExternalSettings::from_raw(
            section(table)?,
            data_dir,
        )?)),
        _ => {
            let u: RawDiskUpstream = section(table)?;
            let files = match (u.cacerts_dir, u.cert_file, u.key_file) {
                (Some(dir), None, None) if u.chain_file.is_none() && u.bundle_file.is_none() => {
                    DiskFiles::istio_cacerts(&dir)
                }
                (None, Some(cert_file), Some(key_file)) => {
                    DiskFiles { cert_file, key_file, chain_file: u.chain_file, bundle_file: u.bundle_file }
                }
                _ => {
                    return Err(invalid(
                        "upstream_authority.cert_file",
                        "type \"disk\" takes cert_file and key_file (with optional chain_file and bundle_file), or cacerts_dir alone",
                    ));
                }
            };
            Ok(UpstreamConfig::Disk(files))
        }
    }
}

fn federation(own: &TrustDomain, raw: RawFederation) -> Result<FederationConfig, ConfigError> {
    let bundle_endpoint = match raw.bundle_endpoint {
        None => None,
        Some(e) => {
            let profile = match (e.profile.as_str(), e.cert_file, e.key_file) {
                ("https_spiffe", None, None) => ServingProfile::HttpsSpiffe,
                ("https_spiffe", _, _) => {
                    return Err(ConfigError::Invalid {
                        key: "federation.bundle_endpoint.cert_file",
                        reason: "cert_file and key_file belong to profile \"https_web\"; https_spiffe serves the server's SVID".into(),
                    });
                }
                ("https_web", Some(cert_file), Some(key_file)) => ServingProfile::HttpsWeb { cert_file, key_file },
                ("https_web", _, _) => {
                    return Err(ConfigError::Invalid {
                        key: "federation.bundle_endpoint.cert_file",
                        reason: "profile \"https_web\" needs cert_file and key_file".into(),
                    });
                }
                (other, _, _) => {
                    return Err(ConfigError::Invalid {
                        key: "federation.bundle_endpoint.profile",
                        reason: format!("{other:?}: expected \"https_spiffe\" or \"https_web\""),
                    });
                }
            };
            Some(BundleEndpointConfig {
                address: addr("federation.bundle_endpoint.address", &e.address)?,
                profile,
                refresh_hint: dur("federation.bundle_endpoint.refresh_hint", &e.refresh_hint)?,
            })
        }
    };
    let mut trust_domains: Vec<ConfiguredPeer> = Vec::new();
    for p in raw.trust_domains {
        let invalid =
            |key, reason: String| ConfigError::Invalid { key, reason: format!("{}: {reason}", p.trust_domain) };
        let td = TrustDomain::new(&p.trust_domain)
            .map_err(|e| invalid("federation.trust_domains.trust_domain", e.to_string()))?;
        if trust_domains.iter().any(|c| c.relationship.trust_domain == td) {
            return Err(invalid("federation.trust_domains.trust_domain", "listed twice".into()));
        }
        let profile = match (p.profile.as_str(), p.endpoint_spiffe_id) {
            ("https_spiffe", Some(id)) => EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::new(&id)
                    .map_err(|e| invalid("federation.trust_domains.endpoint_spiffe_id", format!("{id:?}: {e}")))?,
            },
            ("https_spiffe", None) => {
                return Err(invalid(
                    "federation.trust_domains.endpoint_spiffe_id",
                    "profile \"https_spiffe\" needs endpoint_spiffe_id".into(),
                ));
            }
            ("https_web", None) => EndpointProfile::HttpsWeb { ca_bundle_path: p.ca_bundle_path.clone() },
            ("https_web", Some(_)) => {
                return Err(invalid(
                    "federation.trust_domains.endpoint_spiffe_id",
                    "belongs to profile \"https_spiffe\" only".into(),
                ));
            }
            (other, _) => {
                return Err(invalid(
                    "federation.trust_domains.profile",
                    format!("{other:?}: expected \"https_spiffe\" or \"https_web\""),
                ));
            }
        };
        let relationship = FederationRelationship {
            trust_domain: td,
            bundle_endpoint_url: p.bundle_endpoint_url.clone(),
            profile,
            allow_empty_bundle: p.allow_empty_bundle,
        };
        crate::federation::check_relationship(own, &relationship)
            .map_err(|e| invalid("federation.trust_domains", e.to_string()))?;
        trust_domains.push(ConfiguredPeer { relationship, bootstrap_bundle_path: p.bootstrap_bundle_path });
    }
    Ok(FederationConfig { bundle_endpoint, trust_domains })
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with(text, None)
    }

    /// Like [`Config::from_toml`], with `server.instance_id` replaced by `instance_id` when
    /// given (`tessera-server run --instance-id`, e.g. a StatefulSet pod's name).
    pub fn from_toml_with(text: &str, instance_id: Option<&str>) -> Result<Self, ConfigError> {
        Self::parse(text, instance_id, &|_| None)
    }

    /// Parses and validates TOML text. A value the file names by environment variable
    /// (`store.connection_string_env`) is looked up in `env`: parsing never reads the
    /// process environment itself (the binary passes it in).
    pub fn parse(text: &str, instance_id: Option<&str>, env: &Env<'_>) -> Result<Self, ConfigError> {
        let mut raw: RawConfig = tessera_svc::config::from_toml(text)?;
        if let Some(id) = instance_id.filter(|i| !i.is_empty()) {
            raw.server.instance_id = id.to_owned();
        }
        let td_raw = raw.trust_domain.ok_or(ConfigError::Missing("trust_domain"))?;
        let trust_domain = TrustDomain::new(&td_raw)
            .map_err(|e| ConfigError::Invalid { key: "trust_domain", reason: format!("{td_raw:?}: {e}") })?;
        let data_dir = raw.data_dir.ok_or(ConfigError::Missing("data_dir"))?;
        let key_type = raw.ca.key_type.parse().map_err(|e: tessera_identity::keys::UnknownKeyType| {
            ConfigError::Invalid { key: "ca.key_type", reason: e.to_string() }
        })?;
        let istio = raw.istio.map(crate::istio::config::RawIstio::validate).transpose()?;
        let ca_ttl = match &raw.ca.ca_ttl {
            Some(s) => dur("ca.ca_ttl", s)?,
            None => default_ca_ttl(istio.as_ref()),
        };
        let default_x509_svid_ttl = dur("ca.default_x509_svid_ttl", &raw.ca.default_x509_svid_ttl)?;
        let max_x509_svid_ttl = match &raw.ca.max_x509_svid_ttl {
            Some(s) => dur("ca.max_x509_svid_ttl", s)?,
            None => ca_ttl,
        };
        let default_jwt_svid_ttl = dur("ca.default_jwt_svid_ttl", &raw.ca.default_jwt_svid_ttl)?;
        let max_jwt_svid_ttl = dur("ca.max_jwt_svid_ttl", &raw.ca.max_jwt_svid_ttl)?;
        if default_x509_svid_ttl >= ca_ttl {
            return Err(ConfigError::Invalid {
                key: "ca.default_x509_svid_ttl",
                reason: format!("must be shorter than ca.ca_ttl ({})", humantime::format_duration(ca_ttl)),
            });
        }
        if max_x509_svid_ttl < default_x509_svid_ttl || max_x509_svid_ttl > ca_ttl {
            return Err(ConfigError::Invalid {
                key: "ca.max_x509_svid_ttl",
                reason: "must be between ca.default_x509_svid_ttl and ca.ca_ttl".into(),
            });
        }
        if max_jwt_svid_ttl < default_jwt_svid_ttl {
            return Err(ConfigError::Invalid {
                key: "ca.max_jwt_svid_ttl",
                reason: "must be at least ca.default_jwt_svid_ttl".into(),
            });
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&raw.log_level.as_str()) {
            return Err(ConfigError::Invalid {
                key: "log_level",
                reason: format!("{:?}: expected error, warn, info, debug or trace", raw.log_level),
            });
        }
        let federation = federation(&trust_domain, raw.federation)?;
        // A prepared CA is in the bundle for a third of the CA TTL before it signs; peers
        // fetch at a quarter of the hint, so the hint must leave them several tries.
        if let Some(ep) = &federation.bundle_endpoint
            && ep.refresh_hint > ca_ttl / 6
        {
            return Err(ConfigError::Invalid {
                key: "federation.bundle_endpoint.refresh_hint",
                reason: format!(
                    "must be at most a sixth of ca.ca_ttl ({}), so peers fetch a prepared CA before it signs",
                    humantime::format_duration(ca_ttl / 6)
                ),
            });
        }
        let upstream_authority = raw.upstream_authority.map(|u| upstream(u, &trust_domain, &data_dir)).transpose()?;
        let mut node_attestors = Vec::new();
        for a in raw.node_attestor.unwrap_or_else(|| vec![RawPlugin::named("join_token")]) {
            let kind = match a.kind.as_str() {
                "join_token" if a.clusters.is_none() => NodeAttestorKind::JoinToken,
                "join_token" => {
                    return Err(ConfigError::Invalid {
                        key: "node_attestor.clusters",
                        reason: "only k8s_psat takes clusters".into(),
                    });
                }
                "k8s_psat" => NodeAttestorKind::K8sPsat(PsatCluster::from_raw(a.clusters)?),
                other => {
                    return Err(ConfigError::Invalid {
                        key: "node_attestor.type",
                        reason: format!("{other:?}: expected \"join_token\" or \"k8s_psat\""),
                    });
                }
            };
            if node_attestors.iter().any(|k| std::mem::discriminant(k) == std::mem::discriminant(&kind)) {
                return Err(ConfigError::Invalid {
                    key: "node_attestor.type",
                    reason: format!("{:?} is listed twice", a.kind),
                });
            }
            node_attestors.push(kind);
        }
        let s = raw.server;
        if !(4096..=64 * 1024 * 1024).contains(&s.max_message_bytes) {
            return Err(ConfigError::Invalid {
                key: "server.max_message_bytes",
                reason: "must be 4096 to 67108864".into(),
            });
        }
        let id_ok = !s.instance_id.is_empty()
            && s.instance_id.len() <= 64
            && s.instance_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return Err(ConfigError::Invalid {
                key: "server.instance_id",
                reason: "1 to 64 characters of A-Z a-z 0-9 . _ -".into(),
            });
        }
        if matches!(raw.store.kind.as_str(), "postgres") && s.instance_id == "default" {
            return Err(ConfigError::Invalid {
                key: "server.instance_id",
                reason: "with a postgres store, give each replica its own instance_id (its CA journal is keyed by it)"
                    .into(),
            });
        }
        for (key, v) in [
            ("server.rate_limit_svids_per_second", s.rate_limit_svids_per_second),
            ("server.rate_limit_attestations_per_minute", s.rate_limit_attestations_per_minute),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(ConfigError::Invalid { key, reason: "must be 0 (unlimited) or a positive number".into() });
            }
        }
        if !(1..=10_000).contains(&s.max_batch_size) {
            return Err(ConfigError::Invalid { key: "server.max_batch_size", reason: "must be 1 to 10000".into() });
        }
        if !(1..=1_000_000).contains(&s.max_connections) {
            return Err(ConfigError::Invalid { key: "server.max_connections", reason: "must be 1 to 1000000".into() });
        }
        if !(1..=s.max_connections).contains(&s.max_anonymous_connections_per_ip) {
            return Err(ConfigError::Invalid {
                key: "server.max_anonymous_connections_per_ip",
                reason: "must be 1 to server.max_connections".into(),
            });
        }
        if !(1..=s.max_connections).contains(&s.max_connections_per_agent) {
            return Err(ConfigError::Invalid {
                key: "server.max_connections_per_agent",
                reason: "must be 1 to server.max_connections".into(),
            });
        }
        let idle = dur("server.connection_idle_timeout", &s.connection_idle_timeout)?;
        if idle < Duration::from_secs(1) || idle > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                key: "server.connection_idle_timeout",
                reason: "must be 1s to 1h".into(),
            });
        }
        let log_format = raw.log_format.parse()?;
        let d = raw.doctor;
        let doctor = DoctorConfig {
            ca_expiry_horizon: match &d.ca_expiry_horizon {
                Some(h) => dur("doctor.ca_expiry_horizon", h)?,
                None => ca_ttl / 3,
            },
            root_expiry_horizon: dur("doctor.root_expiry_horizon", &d.root_expiry_horizon)?,
            agent_sync_interval: tessera_svc::config::duration(
                "doctor.agent_sync_interval",
                &d.agent_sync_interval,
                Duration::from_millis(100),
            )?,
        };
        let console = raw.console.map(console).transpose()?;
        Ok(Config {
            trust_domain,
            data_dir,
            log_level: raw.log_level,
            log_format,
            doctor,
            console,
            agent_api_address: addr("server.agent_api_address", &s.agent_api_address)?,
            admin_socket: s.admin_socket,
            health_address: addr("server.health_address", &s.health_address)?,
            join_token_ttl: dur("server.join_token_ttl", &s.join_token_ttl)?,
            agent_svid_ttl: dur("server.agent_svid_ttl", &s.agent_svid_ttl)?,
            rotation_check_interval: dur("server.rotation_check_interval", &s.rotation_check_interval)?,
            max_message_bytes: s.max_message_bytes,
            max_batch_size: s.max_batch_size,
            instance_id: s.instance_id,
            rate_limit_svids_per_second: s.rate_limit_svids_per_second,
            rate_limit_attestations_per_minute: s.rate_limit_attestations_per_minute,
            connections: tessera_svc::listener::ConnLimits {
                max_connections: s.max_connections,
                idle_timeout: idle,
                max_anonymous_per_ip: s.max_anonymous_connections_per_ip,
                max_per_peer: s.max_connections_per_agent,
            },
            ca: CaConfig {
                key_type,
                ca_ttl,
                default_x509_svid_ttl,
                default_jwt_svid_ttl,
                max_x509_svid_ttl,
                max_jwt_svid_ttl,
            },
            key_manager: key_manager(raw.key_manager)?,
            store: store(raw.store, env)?,
            federation,
            upstream_authority,
            node_attestors,
            istio: match istio {
                Some(i) => Some(istio_rotation_fits(i, ca_ttl)?),
                None => None,
            },
            bundle_publishers: raw
                .bundle_publisher
                .unwrap_or_default()
                .into_iter()
                .map(crate::publish::RawPublisher::validate)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Reads and validates a config file, looking up named variables in `env`.
    pub fn load(path: &std::path::Path, env: &Env<'_>) -> Result<Self, ConfigError> {
        Self::load_with(path, None, env)
    }

    /// Reads a config file, overriding `server.instance_id` when `instance_id` is given, with
    /// `env` for the values it names by environment variable.
    pub fn load_with(path: &std::path::Path, instance_id: Option<&str>, env: &Env<'_>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Toml(format!("cannot read config {}: {e}", path.display())))?;
        Self::parse(&text, instance_id, env).map_err(|e| match e {
            ConfigError::Toml(m) => ConfigError::Toml(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTRACT: &str = r#"
trust_domain = "example.org"
data_dir = "/var/lib/tessera/server"
[server]
agent_api_address = "0.0.0.0:8081"
admin_socket = "/run/tessera/server/admin.sock"
health_address = "127.0.0.1:8080"
[ca]
key_type = "ec-p256"
ca_ttl = "24h"
default_x509_svid_ttl = "1h"
default_jwt_svid_ttl = "5m"
[key_manager]
type = "disk"
[store]
type = "sled"
"#;

    const ISTIO: &str = "[istio]\naddress = \"127.0.0.1:15012\"\n[[istio.clusters]]\ncluster_id = \"c\"\njwks_path = \"/tmp/j\"\nissuer = \"https://k\"\n";

    /// Issue 15: a CA whose rotation is shorter than Istio clients need to learn its new root
    /// is refused; without an explicit `ca_ttl`, the default is long enough.
    #[test]
    fn the_ca_rotation_must_fit_the_longest_istio_certificate() {
        let e = Config::from_toml(&format!("{CONTRACT}{ISTIO}")).unwrap_err().to_string();
        assert!(e.contains("istio.max_workload_cert_ttl") && e.contains("ca.ca_ttl"), "{e}");
        assert!(e.contains("at least 86.4h") && e.contains("(8h)"), "the message names the ca_ttl needed: {e}");
        let c = Config::from_toml(&format!("{}{ISTIO}", CONTRACT.replace("ca_ttl = \"24h\"\n", ""))).unwrap();
        assert_eq!(c.ca.ca_ttl, Duration::from_secs(87 * 3600), "the default follows the Istio maximum");
        let lower =
            ISTIO.replace("[[istio", "max_workload_cert_ttl = \"12h\"\ndefault_workload_cert_ttl = \"12h\"\n[[istio");
        Config::from_toml(&format!("{CONTRACT}{lower}")).unwrap();
        assert_eq!(
            Config::from_toml(&CONTRACT.replace("ca_ttl = \"24h\"\n", "")).unwrap().ca.ca_ttl,
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn the_documented_contract_parses() {
        let c = Config::from_toml(CONTRACT).unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.ca.ca_ttl, Duration::from_secs(86400));
        assert_eq!(c.ca.default_jwt_svid_ttl, Duration::from_secs(300));
        assert_eq!(c.key_manager, KeyManagerKind::Disk);
        assert_eq!(c.agent_api_address.port(), 8081);
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let err = Config::from_toml(&CONTRACT.replace("[store]", "[store]\nflavour = \"x\"")).unwrap_err();
        assert!(err.to_string().contains("flavour"), "{err}");
        let err = Config::from_toml(&format!("bogus = 1\n{CONTRACT}")).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = Config::from_toml(&CONTRACT.replace("type = \"sled\"", "type = \"etcd\"")).unwrap_err();
        assert!(err.to_string().contains("store.type"), "{err}");
    }

    #[test]
    fn missing_or_invalid_trust_domain_is_refused() {
        let err = Config::from_toml("data_dir = \"/x\"").unwrap_err();
        assert_eq!(err.to_string(), "missing required key `trust_domain`");
        let err = Config::from_toml("trust_domain = \"Bad Domain\"\ndata_dir = \"/x\"").unwrap_err();
        assert!(err.to_string().starts_with("invalid `trust_domain`"), "{err}");
    }

    #[test]
    fn svid_ttl_must_fit_in_the_ca_ttl() {
        let err =
            Config::from_toml(&CONTRACT.replace("default_x509_svid_ttl = \"1h\"", "default_x509_svid_ttl = \"48h\""))
                .unwrap_err();
        assert!(err.to_string().contains("ca.default_x509_svid_ttl"), "{err}");
        let err = Config::from_toml(&CONTRACT.replace("ca_ttl = \"24h\"", "ca_ttl = \"soon\"")).unwrap_err();
        assert!(err.to_string().contains("ca.ca_ttl"), "{err}");
        let err = Config::from_toml(&CONTRACT.replace("ec-p256", "dsa")).unwrap_err();
        assert!(err.to_string().contains("ca.key_type"), "{err}");
    }

    const FEDERATION: &str = r#"
[federation.bundle_endpoint]
address = "0.0.0.0:8443"
profile = "https_spiffe"
refresh_hint = "5m"
[[federation.trust_domains]]
trust_domain = "b.example"
bundle_endpoint_url = "https://b.example:8443"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://b.example/tessera/server"
bootstrap_bundle_path = "/etc/tessera/b-bundle.json"
"#;

    #[test]
    fn the_documented_federation_contract_parses() {
        let c = Config::from_toml(&format!("{CONTRACT}{FEDERATION}")).unwrap();
        let ep = c.federation.bundle_endpoint.unwrap();
        assert_eq!(
            (ep.address.port(), ep.profile, ep.refresh_hint),
            (8443, ServingProfile::HttpsSpiffe, Duration::from_secs(300))
        );
        let p = &c.federation.trust_domains[0];
        assert_eq!(p.relationship.trust_domain.as_str(), "b.example");
        assert_eq!(
            p.relationship.profile,
            EndpointProfile::HttpsSpiffe {
                endpoint_spiffe_id: SpiffeId::new("spiffe://b.example/tessera/server").unwrap()
            }
        );
        assert_eq!(p.bootstrap_bundle_path.as_deref(), Some(std::path::Path::new("/etc/tessera/b-bundle.json")));
    }

    #[test]
    fn federation_mistakes_name_their_key() {
        for (from, to, key) in [
            (
                "profile = \"https_spiffe\"\nrefresh",
                "profile = \"https_web\"\nrefresh",
                "federation.bundle_endpoint.cert_file",
            ),
            (
                "refresh_hint = \"5m\"",
                "refresh_hint = \"5m\"\ncert_file = \"/x\"",
                "federation.bundle_endpoint.cert_file",
            ),
            ("profile = \"https_spiffe\"\nendpoint", "profile = \"https_web\"\nendpoint", "endpoint_spiffe_id"),
            ("endpoint_spiffe_id = \"spiffe://b.example/tessera/server\"", "", "endpoint_spiffe_id"),
            ("https://b.example:8443", "http://b.example", "must use https"),
            ("trust_domain = \"b.example\"", "trust_domain = \"example.org\"", "own trust domain"),
            ("refresh_hint = \"5m\"", "refresh_hint = \"5m\"\ncolour = 1", "colour"),
            ("refresh_hint = \"5m\"", "refresh_hint = \"5h\"", "federation.bundle_endpoint.refresh_hint"),
        ] {
            let text = format!("{CONTRACT}{}", FEDERATION.replacen(from, to, 1));
            let err = Config::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(key), "{from:?} -> {to:?}: {err}");
        }
    }

    #[test]
    fn the_deploy_example_parses_with_and_without_its_optional_sections() {
        let text = include_str!("../../deploy/server.toml");
        let c = Config::from_toml(text).unwrap();
        assert!(c.federation.bundle_endpoint.is_none() && c.upstream_authority.is_none());
        // Uncomment the optional sections: `# [section]` and `# key = value` lines.
        let on: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[') || rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) =>
                {
                    rest
                }
                _ => l,
            })
            .fold(String::new(), |acc, l| acc + l + "\n");
        let c = Config::from_toml(&on).unwrap();
        assert_eq!(c.federation.trust_domains.len(), 1);
        assert!(c.federation.bundle_endpoint.is_some());
        assert!(matches!(c.upstream_authority, Some(UpstreamConfig::Disk(_))));
    }

    #[test]
    fn every_plugin_type_parses_and_misplaced_keys_are_refused() {
        let with = |section: &str| CONTRACT.replace("[key_manager]\ntype = \"disk\"\n", section);
        let c = Config::from_toml(&with(
            "[key_manager]\ntype = \"pkcs11\"\nmodule_path = \"/m.so\"\ntoken_label = \"t\"\npin_env = \"PIN\"\n",
        ))
        .unwrap();
        assert!(
            matches!(&c.key_manager, KeyManagerKind::Pkcs11(p) if p.pin == PinSource::Env("PIN".into()) && p.key_label_prefix == "tessera-")
        );
        for (section, key) in [
            ("[key_manager]\ntype = \"pkcs11\"\nmodule_path = \"/m.so\"\ntoken_label = \"t\"\n", "pin_file"),
            ("[key_manager]\ntype = \"disk\"\ntoken_label = \"t\"\n", "key_manager.module_path"),
            ("[key_manager]\ntype = \"hsm\"\n", "key_manager.type"),
        ] {
            let err = Config::from_toml(&with(section)).unwrap_err().to_string();
            assert!(err.contains(key), "{section}: {err}");
        }
        let up = |body: &str| Config::from_toml(&format!("{CONTRACT}[upstream_authority]\n{body}\n"));
        assert!(matches!(
            up("type = \"vault\"\naddress = \"http://127.0.0.1:8200\"\ntoken_env = \"T\"").unwrap().upstream_authority,
            Some(UpstreamConfig::Vault(v)) if v.pki_mount == "pki" && v.auth == VaultAuthSettings::Token(PinSource::Env("T".into()))
        ));
        assert!(matches!(
            up("type = \"tessera\"\nserver_address = \"p:8081\"\ntrust_bundle_path = \"/b.pem\"").unwrap().upstream_authority,
            Some(UpstreamConfig::Tessera(t)) if t.state_dir.ends_with("upstream")
        ));
        assert!(matches!(
            up("type = \"external\"\ncommand = \"/bin/p\"\nchecksum = \"sha256:ABCDEF0123456789abcdef0123456789ABCDEF0123456789abcdef0123456789\"\n[upstream_authority.plugin_config]\nurl = \"x\"").unwrap().upstream_authority,
            Some(UpstreamConfig::External(e)) if e.plugin_config_json == r#"{"url":"x"}"# && e.checksum.as_deref().is_some_and(|c| c.len() == 64 && !c.contains(':'))
        ));
        for (body, key) in [
            (
                "type = \"vault\"\naddress = \"http://v\"\ntoken_env = \"T\"\ncert_file = \"/c\"",
                "upstream_authority.type",
            ),
            (
                "type = \"disk\"\ncert_file = \"/c\"\nkey_file = \"/k\"\naddress = \"http://v\"",
                "upstream_authority.address",
            ),
            ("type = \"vault\"\naddress = \"ftp://v\"\ntoken_env = \"T\"", "upstream_authority.address"),
            ("type = \"vault\"\naddress = \"http://v\"\nauth_method = \"approle\"", "approle_role_id"),
            ("type = \"external\"\ncommand = \"/p\"\nchecksum = \"abc\"", "upstream_authority.checksum"),
            ("type = \"external\"", "upstream_authority.command"),
            ("type = \"tessera\"\nserver_address = \"p:1\"", "upstream_authority.trust_bundle_path"),
            ("type = \"acme\"", "upstream_authority.type"),
        ] {
            let err = up(body).unwrap_err().to_string();
            assert!(err.contains(key), "{body}: {err}");
        }
    }

    #[test]
    fn node_attestors_default_to_join_token_and_unknown_ones_are_refused() {
        assert_eq!(Config::from_toml(CONTRACT).unwrap().node_attestors, vec![NodeAttestorKind::JoinToken]);
        let c = Config::from_toml(&format!("{CONTRACT}[[node_attestor]]\ntype = \"join_token\"\n")).unwrap();
        assert_eq!(c.node_attestors, vec![NodeAttestorKind::JoinToken]);
        let err = Config::from_toml(&format!("{CONTRACT}[[node_attestor]]\ntype = \"tpm\"\n")).unwrap_err();
        assert!(err.to_string().contains("node_attestor.type"), "{err}");
        let twice =
            format!("{CONTRACT}[[node_attestor]]\ntype = \"join_token\"\n[[node_attestor]]\ntype = \"join_token\"\n");
        assert!(Config::from_toml(&twice).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn a_postgres_store_needs_a_connection_string_and_an_instance_id() {
        let pg = |server_extra: &str, store: &str| {
            Config::from_toml(
                &CONTRACT
                    .replace("[server]\n", &format!("[server]\n{server_extra}"))
                    .replace("[store]\ntype = \"sled\"", &format!("[store]\ntype = \"postgres\"\n{store}")),
            )
        };
        let c = pg("instance_id = \"a\"\n", "connection_string = \"host=db password=s3cret\"").unwrap();
        assert!(matches!(&c.store, StoreKind::Postgres { max_connections: 8, tls_ca_file: None, .. }));
        let c = pg("instance_id = \"a\"\n", "connection_string = \"x\"\ntls_ca_file = \"/ca.pem\"").unwrap();
        assert!(matches!(&c.store, StoreKind::Postgres { tls_ca_file: Some(p), .. } if p.ends_with("ca.pem")));
        assert_eq!(c.instance_id, "a");
        assert!(!format!("{c:?}").contains("s3cret"), "the connection string shows in Debug");
        let err = pg("", "connection_string = \"host=db\"").unwrap_err().to_string();
        assert!(err.contains("server.instance_id"), "{err}");
        let err = pg("instance_id = \"a\"\n", "").unwrap_err().to_string();
        assert!(err.contains("store.connection_string"), "{err}");
        let err = pg("instance_id = \"a b\"\n", "connection_string = \"x\"").unwrap_err().to_string();
        assert!(err.contains("server.instance_id"), "{err}");
    }
}
