//! What `tessera-server doctor` and `debug info` read: [`Diagnostics`] checks the running
//! server's own state (CA slots and chains, upstream, plugin, store, federation, agents) and
//! reports coded findings. It only reads: no check changes state. The codes are a contract
//! (docs/doctor.md); the checks a client makes itself (config file, socket mode) are in the
//! binary.

use std::sync::Arc;

use tessera_ca::Ca;
use tessera_identity::ids::LogId;
use tessera_store::Store;
use tessera_svc::doctor::{Finding, Report, Severity};

use crate::api::AgentActivity;
use crate::api::tls::ServerIdentity;
use crate::config::DoctorConfig;
use crate::federation::Federation;

/// The finding codes this module reports (docs/doctor.md has one section each).
pub mod code {
    /// The active authority expires soon with no successor, or rotation keeps failing.
    pub const CA_EXPIRING: &str = "ca-expiring";
    /// An upstream root expires soon.
    pub const ROOT_EXPIRING: &str = "root-expiring";
    /// A CA certificate in use cannot sign leaves that verify.
    pub const CA_PROFILE_INVALID: &str = "ca-profile-invalid";
    /// A federated bundle is old or its last fetch failed.
    pub const FEDERATION_STALE: &str = "federation-stale";
    /// An agent stopped syncing.
    pub const AGENT_SILENT: &str = "agent-silent";
    /// An agent outside the version-skew policy.
    pub const AGENT_VERSION_SKEW: &str = "agent-version-skew";
    /// The external plugin is down.
    pub const PLUGIN_DOWN: &str = "plugin-down";
    /// The upstream authority cannot be reached.
    pub const UPSTREAM_UNREACHABLE: &str = "upstream-unreachable";
    /// The store does not answer or cannot write.
    pub const STORE_UNAVAILABLE: &str = "store-unavailable";
}

/// Everything the checks read.
#[derive(Debug, Clone)]
pub struct Diagnostics {
    /// The CA.
    pub ca: Arc<Ca>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Federation status.
    pub federation: Arc<Federation>,
    /// Agents' last syncs.
    pub activity: Arc<AgentActivity>,
    /// The server's own TLS identity.
    pub identity: Arc<ServerIdentity>,
    /// Thresholds.
    pub cfg: DoctorConfig,
    /// This replica's name.
    pub instance_id: String,
    /// When the process started.
    pub started: std::time::Instant,
}

/// An authority (or root) as `debug info` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AuthorityInfo {
    /// Hex SKI.
    pub authority_id: String,
    /// prepared / active / old.
    pub status: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// A certificate of a chain as `debug info` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// The SPIFFE ID (or the trust domain ID of a CA); empty when there is none.
    pub spiffe_id: String,
    /// Hex serial.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// `tessera-server debug info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerInfo {
    /// The server's version.
    pub version: String,
    /// This replica.
    pub instance_id: String,
    /// Our trust domain.
    pub trust_domain: String,
    /// Seconds since the process started.
    pub uptime_seconds: u64,
    /// Attested agents (banned included).
    pub agents: u64,
    /// Banned agents.
    pub banned_agents: u64,
    /// Registration entries.
    pub entries: u64,
    /// Federated bundles stored.
    pub federated_bundles: u64,
    /// Our bundle's sequence number.
    pub bundle_sequence: u64,
    /// Unix seconds of the newest agent sync with this replica (0: none yet).
    pub last_agent_sync: i64,
    /// Prepared and active X.509 authorities.
    pub authorities: Vec<AuthorityInfo>,
    /// The server's own SVID chain, leaf first.
    pub svid_chain: Vec<CertInfo>,
}

fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let f = tessera_identity::x509::cert_facts(der).ok()?;
    Some(CertInfo { spiffe_id: f.uris.first().cloned().unwrap_or_default(), serial: f.serial, not_after: f.not_after })
}

fn until(now: i64, t: i64) -> String {
    let d = t - now;
    if d <= 0 {
        return format!("{} ago", humantime::format_duration(std::time::Duration::from_secs(d.unsigned_abs())));
    }
    format!("in {}", humantime::format_duration(std::time::Duration::from_secs(d.unsigned_abs())))
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Diagnostics {
    /// Every check, as one report.
    pub async fn doctor(&self) -> Report {
        let mut out = Vec::new();
        let now = self.ca.clock().now();
        let store_ok = self.check_store(&mut out).await;
        self.check_authorities(now, &mut out);
        self.check_upstream(&mut out);
        if store_ok {
            self.check_federation(now, &mut out).await;
            self.check_agents(&mut out).await;
        }
        Report::new(out)
    }

    async fn check_store(&self, out: &mut Vec<Finding>) -> bool {
        let fix = "check the store's logs and its connection (store.connection_string, disk space, permissions); the server keeps signing from memory but cannot record";
        let deadline = std::time::Duration::from_secs(5);
        let read = tokio::time::timeout(deadline, self.store.get_bundle(self.ca.trust_domain())).await;
        let read = read.map_err(|_| "no answer within 5 s".to_owned()).and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = read {
            out.push(Finding::new(
                code::STORE_UNAVAILABLE,
                Severity::Error,
                "store",
                format!("the store does not answer a read: {e}"),
                fix,
            ));
            return false;
        }
        let write = tokio::time::timeout(deadline, self.store.check_writable()).await;
        let write = write.map_err(|_| "no answer within 5 s".to_owned()).and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(e) = write {
            out.push(Finding::new(
                code::STORE_UNAVAILABLE,
                Severity::Error,
                "store",
                format!("the store cannot make a write durable: {e}"),
                fix,
            ));
            return false;
        }
        true
    }

    fn check_authorities(&self, now: i64, out: &mut Vec<Finding>) {
        let auths = self.ca.x509_authorities();
        let prepared = auths.iter().any(|a| a.status == "prepared");
        match auths.iter().find(|a| a.status == "active") {
            None => out.push(Finding::new(
                code::CA_EXPIRING,
                Severity::Error,
                "x509-authority",
                "there is no active X.509 authority: nothing can be signed",
                "check the key manager and upstream authority (see upstream-unreachable, plugin-down), then `tessera-server localauthority x509 prepare` and `activate`",
            )),
            Some(a) if a.expires_at <= now => out.push(Finding::new(
                code::CA_EXPIRING,
                Severity::Error,
                &a.authority_id,
                format!("the active X.509 authority expired {}", until(now, a.expires_at)),
                "prepare and activate a new authority now: `tessera-server localauthority x509 prepare`, then `activate`",
            )),
            Some(a) if a.expires_at - now < secs(self.cfg.ca_expiry_horizon) && !prepared => out.push(Finding::new(
                code::CA_EXPIRING,
                Severity::Warning,
                &a.authority_id,
                format!(
                    "the active X.509 authority expires {} and no successor is prepared",
                    until(now, a.expires_at)
                ),
                "find why rotation did not prepare one (server log: \"CA rotation check failed\"), or run `tessera-server localauthority x509 prepare`",
            )),
            Some(_) => {}
        }
        let health = self.ca.rotation_health();
        if let Some((at, e)) = &health.last_error {
            out.push(Finding::new(
                code::CA_EXPIRING,
                Severity::Warning,
                "ca-rotation",
                format!(
                    "the rotation check has been failing ({} failures since start; last {}): {e}",
                    health.errors_total,
                    until(now, *at)
                ),
                "fix the cause named in the error (key manager, upstream authority, store) before the active authority expires",
            ));
        }
        // Upstream roots: the roots in our bundle that are not our own authorities.
        let own: Vec<Vec<u8>> = auths.iter().map(|a| a.certificate.clone()).collect();
        let bundle = self.ca.bundle();
        let roots: Vec<Vec<u8>> = bundle.x509_authorities.iter().map(|c| c.to_vec()).collect();
        for r in roots.iter().filter(|r| !own.contains(r)) {
            let Ok(f) = tessera_identity::x509::cert_facts(r) else { continue };
            let subject = f.subject_key_id.clone().unwrap_or_else(|| f.serial.clone());
            if f.not_after <= now {
                out.push(Finding::new(
                    code::ROOT_EXPIRING,
                    Severity::Error,
                    subject,
                    format!("an upstream root in the bundle expired {}", until(now, f.not_after)),
                    "rotate the upstream root (a new root must reach the bundle before the old one expires), then remove the expired one",
                ));
            } else if f.not_after - now < secs(self.cfg.root_expiry_horizon) {
                out.push(Finding::new(
                    code::ROOT_EXPIRING,
                    Severity::Warning,
                    subject,
                    format!("an upstream root in the bundle expires {}", until(now, f.not_after)),
                    "add the upstream's successor root now (it must be in every bundle before it signs), and plan the switch",
                ));
            }
        }
        for (status, chain) in self.ca.x509_chains() {
            let subject = chain
                .first()
                .and_then(|c| tessera_identity::x509::cert_facts(c).ok())
                .and_then(|f| f.subject_key_id)
                .unwrap_or_else(|| status.to_owned());
            let problems = tessera_identity::x509::ca_chain_problems(&chain, &roots);
            if !problems.is_empty() {
                out.push(Finding::new(
                    code::CA_PROFILE_INVALID,
                    Severity::Error,
                    subject,
                    format!("the {status} X.509 authority cannot sign verifiable SVIDs: {}", problems.join("; ")),
                    "reissue the CA certificate (or the upstream's cacerts) with cA=true, keyCertSign, no extKeyUsage or one with serverAuth and clientAuth, a path length that allows it, and a chain to the bundle",
                ));
            }
        }
    }

    fn check_upstream(&self, out: &mut Vec<Finding>) {
        if let Some(p) = self.ca.upstream_health()
            && !p.up
        {
            out.push(Finding::new(
                code::PLUGIN_DOWN,
                Severity::Error,
                format!("upstream_authority/{}", p.name),
                format!(
                    "the external upstream plugin does not answer (restarts: {}; last error: {})",
                    p.restarts,
                    p.last_error.unwrap_or_default()
                ),
                "read the plugin's stderr in the server log; check its binary, its settings and what it connects to",
            ));
        }
        if let Some((at, e)) = self.ca.rotation_health().upstream_error {
            out.push(Finding::new(
                code::UPSTREAM_UNREACHABLE,
                Severity::Error,
                "upstream_authority",
                format!("the upstream authority's roots could not be read ({}): {e}", until(self.ca.clock().now(), at)),
                "check the upstream's address, credentials and TLS trust (upstream_authority.* in the server config); the CA cannot rotate until it answers",
            ));
        }
    }

    async fn check_federation(&self, now: i64, out: &mut Vec<Finding>) {
        let Ok(rels) = self.store.list_federations().await else { return };
        for rel in rels {
            let td = &rel.trust_domain;
            let st = self.federation.status(td);
            if let Some(e) = &st.last_error {
                out.push(Finding::new(
                    code::FEDERATION_STALE,
                    Severity::Warning,
                    td.to_string(),
                    format!("the last fetch of {td}'s bundle from {} failed: {e}", rel.bundle_endpoint_url),
                    "check that the peer's bundle endpoint is reachable from this server and that its identity matches the relationship; `tessera-server federation refresh` retries now",
                ));
                continue;
            }
            let hint = match self.store.get_bundle(td).await {
                Ok(Some(b)) => b.refresh_hint.filter(|h| *h > 0).unwrap_or(300),
                _ => 300,
            };
            let hint = i64::try_from(hint).unwrap_or(i64::MAX);
            let since = if st.last_success > 0 { st.last_success } else { self.started_at() };
            if now - since > hint.saturating_mul(3) {
                out.push(Finding::new(
                    code::FEDERATION_STALE,
                    Severity::Warning,
                    td.to_string(),
                    format!(
                        "{td}'s bundle was last refreshed {} ({}), more than 3x its refresh hint of {hint}s",
                        if st.last_success > 0 { until(now, st.last_success) } else { "never".into() },
                        rel.bundle_endpoint_url
                    ),
                    "check the peer's bundle endpoint and this server's federation log; `tessera-server federation refresh` retries now",
                ));
            }
        }
    }

    fn started_at(&self) -> i64 {
        self.activity.started_at()
    }

    async fn check_agents(&self, out: &mut Vec<Finding>) {
        let Ok(agents) = self.store.list_agents().await else { return };
        self.activity.retain(|id| agents.iter().any(|a| &a.spiffe_id == id));
        // Agents sync on the wall clock, not the CA's.
        let now = tessera_identity::unix_now();
        let limit = secs(self.cfg.agent_sync_interval).saturating_mul(3).max(1);
        let server = tessera_svc::version::Version::current();
        for a in agents.iter().filter(|a| !a.banned) {
            let version = self.activity.version_of(a);
            if let Err(e) = tessera_svc::version::check_agent(&version, server) {
                out.push(Finding::new(
                    code::AGENT_VERSION_SKEW,
                    Severity::Warning,
                    a.spiffe_id.to_string(),
                    e.to_string(),
                    "upgrade servers first, then agents, one minor release at a time (docs/upgrading.md); the server refuses this agent's calls until then",
                ));
            }
            let since = self.activity.last_sync(&a.spiffe_id).unwrap_or_else(|| self.started_at().max(a.attested_at));
            if now - since > limit {
                let last = self.activity.last_sync(&a.spiffe_id);
                out.push(Finding::new(
                    code::AGENT_SILENT,
                    Severity::Warning,
                    a.spiffe_id.to_string(),
                    format!(
                        "agent {} has not synced with this server {} (3x the {}s sync interval is {limit}s)",
                        LogId(&a.spiffe_id),
                        match last {
                            Some(t) => format!("since {}", until(now, t)),
                            None => format!("since this server started {}", until(now, self.started_at())),
                        },
                        secs(self.cfg.agent_sync_interval)
                    ),
                    "check the node: is the agent running, can it reach the Agent API? A node that is gone: `tessera-server agent evict`",
                ));
            }
        }
    }

    /// `debug info`.
    pub async fn info(&self) -> ServerInfo {
        let agents = self.store.list_agents().await.unwrap_or_default();
        let entries = self.store.list_entries().await.map(|e| e.len()).unwrap_or(0);
        let own = self.ca.trust_domain().clone();
        let federated =
            self.store.list_bundles().await.map(|b| b.iter().filter(|b| b.trust_domain != own).count()).unwrap_or(0);
        let last_agent_sync = agents.iter().filter_map(|a| self.activity.last_sync(&a.spiffe_id)).max().unwrap_or(0);
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        ServerInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            instance_id: self.instance_id.clone(),
            trust_domain: own.to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            agents: count(agents.len()),
            banned_agents: count(agents.iter().filter(|a| a.banned).count()),
            entries: count(entries),
            federated_bundles: count(federated),
            bundle_sequence: self.ca.bundle().sequence_number,
            last_agent_sync,
            authorities: self
                .ca
                .x509_authorities()
                .into_iter()
                .filter(|a| a.status != "old")
                .map(|a| AuthorityInfo {
                    authority_id: a.authority_id,
                    status: a.status.to_owned(),
                    not_after: a.expires_at,
                })
                .collect(),
            svid_chain: self.identity.chain().iter().filter_map(|c| cert_info(c)).collect(),
        }
    }
}
