//! The `tessera` upstream authority (nested Tessera): this server's intermediate is signed by
//! a parent Tessera server of the same trust domain, which is how one trust domain spans
//! several clusters with one root of trust.
//!
//! The server acts toward its parent as an agent: it attests once with a join token (the
//! parent's bundle from `trust_bundle_path` authenticates the parent on that first contact),
//! keeps its agent SVID and key (0600) and the parent's bundle under `state_dir`, renews the
//! SVID at half life, and calls the parent's Agent API `MintDownstreamX509Ca`, which the
//! parent allows for agents holding a `downstream` entry. The call's stream stays open: the
//! parent sends its roots whenever its bundle changes, and the CA publishes them.
//!
//! What it is not: no JWT key publishing upstream; one parent address (no failover list).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use tessera_agent_api::{AgentIdentity, IdentityFiles};
use tessera_identity::{TrustDomain, unix_now};
use tessera_plugins::upstream::{MintMessage, RootCache, mint_and_follow};
use tessera_plugins::{MintedX509Ca, UpstreamAuthority, UpstreamError};
use tessera_proto::agent::v1 as pb;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

const NAME: &str = "tessera";

/// The `tessera` upstream's settings.
#[derive(Clone, PartialEq, Eq)]
pub struct NestedConfig {
    /// Our (and the parent's) trust domain.
    pub trust_domain: TrustDomain,
    /// The parent's Agent API, `host:port`.
    pub server_address: String,
    /// The parent's bundle (PEM), for the first contact.
    pub trust_bundle_path: PathBuf,
    /// A join token from the parent, for the first contact; unused once attested.
    pub join_token: Option<tessera_identity::Secret>,
    /// Where the agent SVID, key and the parent's bundle are kept.
    pub state_dir: PathBuf,
    /// Deadline of each call.
    pub timeout: Duration,
}

/// The section's keys (`[upstream_authority] type = "tessera"`), as written.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNestedSettings {
    server_address: Option<String>,
    trust_bundle_path: Option<PathBuf>,
    join_token: Option<tessera_identity::Secret>,
}

/// Every key of the section (besides `type`), as `upstream_authority.<key>`.
pub const KEYS: &[&str] =
    &["upstream_authority.server_address", "upstream_authority.trust_bundle_path", "upstream_authority.join_token"];

impl NestedConfig {
    /// Checks the section; the agent state goes to `<data_dir>/upstream`.
    pub fn from_raw(
        u: RawNestedSettings,
        trust_domain: &TrustDomain,
        data_dir: &Path,
    ) -> Result<Self, tessera_svc::config::ConfigError> {
        use tessera_svc::config::ConfigError;
        Ok(NestedConfig {
            trust_domain: trust_domain.clone(),
            server_address: u.server_address.ok_or(ConfigError::Missing("upstream_authority.server_address"))?,
            trust_bundle_path: u
                .trust_bundle_path
                .ok_or(ConfigError::Missing("upstream_authority.trust_bundle_path"))?,
            join_token: u.join_token,
            state_dir: data_dir.join("upstream"),
            timeout: Duration::from_secs(30),
        })
    }
}

impl std::fmt::Debug for NestedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedConfig")
            .field("server_address", &self.server_address)
            .field("state_dir", &self.state_dir)
            .field("join_token", &self.join_token)
            .finish_non_exhaustive()
    }
}

/// The `tessera` upstream authority.
pub struct NestedUpstream {
    cfg: NestedConfig,
    files: IdentityFiles,
    identity: tokio::sync::Mutex<AgentIdentity>,
    /// The parent's X.509 roots: TLS trust toward the parent and our upstream roots.
    roots: RootCache,
}

impl std::fmt::Debug for NestedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedUpstream").field("parent", &self.cfg.server_address).finish_non_exhaustive()
    }
}

fn cfg_err(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Config { upstream: NAME, reason: reason.into() }
}

fn call_err(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Signing { upstream: NAME, reason: reason.into() }
}

fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, UpstreamError> {
    let pem = std::fs::read(path).map_err(|e| cfg_err(format!("cannot read {}: {e}", path.display())))?;
    let certs: Vec<Vec<u8>> = tessera_identity::pem::decode_certs(&pem)
        .map_err(|e| cfg_err(format!("{}: {e}", path.display())))?
        .into_iter()
        .map(|c| c.to_vec())
        .collect();
    if certs.is_empty() {
        return Err(cfg_err(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

const PARENT_BUNDLE: &str = "parent-bundle.pem";

impl NestedUpstream {
    /// Loads the saved identity, or attests to the parent with the join token.
    pub async fn new(cfg: NestedConfig) -> Result<Self, UpstreamError> {
        tessera_plugins::fsutil::ensure_private_dir(&cfg.state_dir)
            .map_err(|e| cfg_err(format!("cannot create {}: {e}", cfg.state_dir.display())))?;
        let files = IdentityFiles::new(&cfg.state_dir);
        let (ident, roots) = match files.load().map_err(|e| cfg_err(e.to_string()))? {
            Some(ident) => (ident, read_pem_certs(&cfg.state_dir.join(PARENT_BUNDLE))?),
            None => Self::attest(&cfg, &files).await?,
        };
        let cache = RootCache::default();
        cache.set(roots);
        Ok(Self { cfg, files, identity: tokio::sync::Mutex::new(ident), roots: cache })
    }

    async fn attest(cfg: &NestedConfig, files: &IdentityFiles) -> Result<(AgentIdentity, Vec<Vec<u8>>), UpstreamError> {
        let token = cfg.join_token.as_ref().map(tessera_identity::Secret::expose).ok_or_else(|| {
            cfg_err(format!(
                "no agent SVID in {} and no join_token: generate one on the parent with `tessera-server token generate`",
                cfg.state_dir.display()
            ))
        })?;
        let roots = read_pem_certs(&cfg.trust_bundle_path)?;
        let id =
            tessera_identity::agent_id(&cfg.trust_domain, "join_token", token).map_err(|e| cfg_err(e.to_string()))?;
        let mut c = connect(cfg, &roots, None).await?;
        let data = pb::AttestationData { r#type: "join_token".into(), payload: token.as_bytes().to_vec() };
        let (ident, bundle) = tessera_agent_api::attest(&mut c, data, &id, Some(cfg.timeout))
            .await
            .map_err(|e| cfg_err(format!("attestation to the parent: {e}")))?;
        let roots = match bundle {
            Some(b) if !b.x509_authorities.is_empty() => b.x509_authorities,
            _ => roots,
        };
        files.save(&ident).map_err(|e| cfg_err(e.to_string()))?;
        let pem = tessera_identity::pem::encode_certs(roots.iter().map(Vec::as_slice));
        files.write_beside(PARENT_BUNDLE, pem.as_bytes(), 0o644).map_err(|e| cfg_err(e.to_string()))?;
        tracing::info!(agent_id = %tessera_identity::ids::LogId(&id), parent = %cfg.server_address, "Attested to the parent Tessera server");
        Ok((ident, roots))
    }

    async fn fetch_roots(&self) -> Result<Vec<Vec<u8>>, UpstreamError> {
        let mut c = self.fresh_client().await?;
        let b = tokio::time::timeout(self.cfg.timeout, c.fetch_bundles(pb::FetchBundlesRequest {}))
            .await
            .map_err(|_| call_err("FetchBundles timed out"))?
            .map_err(|e| call_err(format!("FetchBundles: {}", e.message())))?
            .into_inner();
        Ok(b.bundle.map(|b| b.x509_authorities).unwrap_or_default())
    }

    /// A client authenticated with our agent SVID, renewed first when past half life.
    async fn fresh_client(&self) -> Result<AgentClient<Channel>, UpstreamError> {
        let roots = self.roots.get();
        let mut ident = self.identity.lock().await;
        let mut c = connect(&self.cfg, &roots, Some(&ident)).await?;
        if unix_now() >= ident.renew_at() {
            *ident = tessera_agent_api::renew(&mut c, &ident, Some(self.cfg.timeout))
                .await
                .map_err(|e| call_err(format!("renewal toward the parent: {e}")))?;
            self.files.save(&ident).map_err(|e| cfg_err(e.to_string()))?;
            tracing::info!("Agent SVID toward the parent renewed");
            c = connect(&self.cfg, &roots, Some(&ident)).await?;
        }
        Ok(c)
    }
}

/// Keeps the parent's latest roots on disk (trust for the next start); a failure is logged.
fn save_roots(files: &IdentityFiles, roots: &[Vec<u8>]) {
    let pem = tessera_identity::pem::encode_certs(roots.iter().map(Vec::as_slice));
    if let Err(e) = files.write_beside(PARENT_BUNDLE, pem.as_bytes(), 0o644) {
        tracing::warn!(error = %e, "Cannot save the parent's bundle");
    }
}

async fn connect(
    cfg: &NestedConfig,
    roots: &[Vec<u8>],
    ident: Option<&AgentIdentity>,
) -> Result<AgentClient<Channel>, UpstreamError> {
    let anchors: Vec<CertificateDer<'static>> = roots.iter().map(|r| CertificateDer::from(r.clone())).collect();
    let tls = tessera_agent_api::server_tls(&cfg.trust_domain, &anchors, ident).map_err(|e| cfg_err(e.to_string()))?;
    tessera_agent_api::connect(&cfg.server_address, tls)
        .await
        .map_err(|e| call_err(format!("cannot reach the parent: {e}")))
}

#[async_trait]
impl UpstreamAuthority for NestedUpstream {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn mint_x509_ca(&self, csr: &[u8], ttl: Duration) -> Result<MintedX509Ca, UpstreamError> {
        let mut c = self.fresh_client().await?;
        let t = self.cfg.timeout;
        let req = pb::MintDownstreamX509CaRequest {
            csr: csr.to_vec(),
            preferred_ttl_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
        };
        let files = self.files.clone();
        let open = async move { c.mint_downstream_x509_ca(req).await.map(tonic::Response::into_inner) };
        mint_and_follow(
            NAME,
            "MintDownstreamX509Ca",
            t,
            open,
            |m: pb::MintDownstreamX509CaResponse| MintMessage { chain: m.x509_ca_chain, roots: m.upstream_x509_roots },
            &self.roots,
            move |roots| {
                tracing::info!(roots = roots.len(), "The parent's roots changed");
                save_roots(&files, roots);
            },
        )
        .await
    }

    /// The parent's roots: pushed on the open `MintDownstreamX509Ca` stream; without one
    /// (after a restart the CA is restored, not minted) fetched with `FetchBundles`, which
    /// also keeps our agent SVID toward the parent renewed.
    async fn roots(&self) -> Result<Vec<Vec<u8>>, UpstreamError> {
        if !self.roots.following() {
            match self.fetch_roots().await {
                Ok(r) if !r.is_empty() => {
                    if self.roots.set(r) {
                        tracing::info!("The parent's roots changed");
                        save_roots(&self.files, &self.roots.get());
                    }
                }
                Ok(_) => tracing::warn!("The parent sent an empty bundle; keeping its previous roots"),
                Err(e) => tracing::warn!(error = %e, "Cannot fetch the parent's roots; keeping the previous ones"),
            }
        }
        Ok(self.roots.get())
    }
}
