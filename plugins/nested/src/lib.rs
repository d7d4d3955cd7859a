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
use tessera_identity::tls::Authorize;
use tessera_identity::{PrivateKey, SpiffeId, TrustDomain, unix_now};
use tessera_plugins::upstream::RootCache;
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

impl std::fmt::Debug for NestedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NestedConfig")
            .field("server_address", &self.server_address)
            .field("state_dir", &self.state_dir)
            .field("join_token", &self.join_token)
            .finish_non_exhaustive()
    }
}

struct Identity {
    chain: Vec<Vec<u8>>,
    key: PrivateKey,
    issued_at: i64,
    not_after: i64,
}

/// The `tessera` upstream authority.
pub struct NestedUpstream {
    cfg: NestedConfig,
    identity: tokio::sync::Mutex<Identity>,
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

fn write(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<(), UpstreamError> {
    tessera_plugins::fsutil::atomic_write(&dir.join(name), data, mode)
        .map_err(|e| cfg_err(format!("cannot write {}: {e}", dir.join(name).display())))
}

fn identity(chain: Vec<Vec<u8>>, key: PrivateKey) -> Result<Identity, UpstreamError> {
    let leaf = chain.first().ok_or_else(|| cfg_err("the parent sent no certificate"))?;
    let f = tessera_identity::x509::cert_facts(leaf).map_err(|e| cfg_err(e.to_string()))?;
    Ok(Identity { chain, key, issued_at: f.not_before, not_after: f.not_after })
}

impl NestedUpstream {
    /// Loads the saved identity, or attests to the parent with the join token.
    pub async fn new(cfg: NestedConfig) -> Result<Self, UpstreamError> {
        tessera_plugins::fsutil::ensure_private_dir(&cfg.state_dir)
            .map_err(|e| cfg_err(format!("cannot create {}: {e}", cfg.state_dir.display())))?;
        let saved = cfg.state_dir.join("agent-svid.pem");
        let (ident, roots) = if saved.exists() {
            let chain = read_pem_certs(&saved)?;
            let key_pem = std::fs::read(cfg.state_dir.join("agent-key.pem"))
                .map_err(|e| cfg_err(format!("cannot read the saved agent key: {e}")))?;
            let key = PrivateKey::from_pem(&key_pem).map_err(|e| cfg_err(e.to_string()))?;
            (identity(chain, key)?, read_pem_certs(&cfg.state_dir.join("parent-bundle.pem"))?)
        } else {
            Self::attest(&cfg).await?
        };
        let cache = RootCache::default();
        cache.set(roots);
        Ok(Self { cfg, identity: tokio::sync::Mutex::new(ident), roots: cache })
    }

    async fn attest(cfg: &NestedConfig) -> Result<(Identity, Vec<Vec<u8>>), UpstreamError> {
        let token = cfg.join_token.as_ref().map(tessera_identity::Secret::expose).ok_or_else(|| {
            cfg_err(format!(
                "no agent SVID in {} and no join_token: generate one on the parent with `tessera-server token generate`",
                cfg.state_dir.display()
            ))
        })?;
        let roots = read_pem_certs(&cfg.trust_bundle_path)?;
        let id =
            tessera_identity::agent_id(&cfg.trust_domain, "join_token", token).map_err(|e| cfg_err(e.to_string()))?;
        let key = PrivateKey::generate_ec_p256().map_err(|e| cfg_err(e.to_string()))?;
        let csr = tessera_identity::csr::build_csr(&id, &[], &key).map_err(|e| cfg_err(e.to_string()))?;
        let mut c = connect(cfg, &roots, None).await?;
        let resp = tokio::time::timeout(
            cfg.timeout,
            c.attest_agent(pb::AttestAgentRequest {
                data: Some(pb::AttestationData { r#type: "join_token".into(), payload: token.as_bytes().to_vec() }),
                csr,
            }),
        )
        .await
        .map_err(|_| cfg_err("AttestAgent timed out"))?
        .map_err(|e| cfg_err(format!("the parent refused attestation: {}", e.message())))?
        .into_inner();
        let chain = resp.svid.ok_or_else(|| cfg_err("the parent sent no SVID"))?.cert_chain;
        let roots = match resp.bundle {
            Some(b) if !b.x509_authorities.is_empty() => b.x509_authorities,
            _ => roots,
        };
        let ident = identity(chain, key)?;
        save(&cfg.state_dir, &ident, &roots)?;
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
        if unix_now() >= ident.issued_at + (ident.not_after - ident.issued_at) / 2 {
            let leaf = ident.chain.first().ok_or_else(|| call_err("no agent SVID"))?;
            let id: SpiffeId =
                tessera_identity::tls::leaf_spiffe_id(leaf).ok_or_else(|| call_err("agent SVID has no ID"))?;
            let key = PrivateKey::generate_ec_p256().map_err(|e| call_err(e.to_string()))?;
            let csr = tessera_identity::csr::build_csr(&id, &[], &key).map_err(|e| call_err(e.to_string()))?;
            let resp = tokio::time::timeout(self.cfg.timeout, c.renew_agent(pb::RenewAgentRequest { csr }))
                .await
                .map_err(|_| call_err("RenewAgent timed out"))?
                .map_err(|e| call_err(format!("the parent refused renewal: {}", e.message())))?
                .into_inner();
            *ident = identity(resp.svid.ok_or_else(|| call_err("the parent sent no SVID"))?.cert_chain, key)?;
            save(&self.cfg.state_dir, &ident, &roots)?;
            tracing::info!("Agent SVID toward the parent renewed");
            c = connect(&self.cfg, &roots, Some(&ident)).await?;
        }
        Ok(c)
    }
}

/// Keeps the parent's latest roots on disk (trust for the next start); a failure is logged.
fn save_roots(dir: &Path, roots: &[Vec<u8>]) {
    tracing::info!(roots = roots.len(), "The parent's roots changed");
    let pem = tessera_identity::pem::encode_certs(roots.iter().map(Vec::as_slice));
    if let Err(e) = write(dir, "parent-bundle.pem", pem.as_bytes(), 0o644) {
        tracing::warn!(error = %e, "Cannot save the parent's bundle");
    }
}

fn save(dir: &Path, ident: &Identity, roots: &[Vec<u8>]) -> Result<(), UpstreamError> {
    write(dir, "agent-key.pem", ident.key.to_pem().as_bytes(), 0o600)?;
    write(
        dir,
        "agent-svid.pem",
        tessera_identity::pem::encode_certs(ident.chain.iter().map(Vec::as_slice)).as_bytes(),
        0o644,
    )?;
    write(
        dir,
        "parent-bundle.pem",
        tessera_identity::pem::encode_certs(roots.iter().map(Vec::as_slice)).as_bytes(),
        0o644,
    )
}

async fn connect(
    cfg: &NestedConfig,
    roots: &[Vec<u8>],
    ident: Option<&Identity>,
) -> Result<AgentClient<Channel>, UpstreamError> {
    let anchors: Vec<CertificateDer<'static>> = roots.iter().map(|r| CertificateDer::from(r.clone())).collect();
    let server = tessera_identity::server_id(&cfg.trust_domain).map_err(|e| cfg_err(e.to_string()))?;
    let client = ident.map(|i| (i.chain.iter().map(|c| CertificateDer::from(c.clone())).collect(), &i.key));
    let tls = tessera_identity::tls::client_config(&anchors, Authorize::Id(server), client)
        .map_err(|e| cfg_err(e.to_string()))?;
    let ch = tessera_svc::connect::tls(&cfg.server_address, tls)
        .await
        .map_err(|e| call_err(format!("cannot reach the parent at {}: {e}", cfg.server_address)))?;
    Ok(AgentClient::new(ch))
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
        let mut stream = tokio::time::timeout(t, c.mint_downstream_x509_ca(req))
            .await
            .map_err(|_| call_err("MintDownstreamX509Ca timed out"))?
            .map_err(|e| call_err(format!("the parent refused: {}", e.message())))?
            .into_inner();
        let first = tokio::time::timeout(t, stream.message())
            .await
            .map_err(|_| call_err("no answer from the parent in time"))?
            .map_err(|e| call_err(e.message().to_owned()))?
            .ok_or_else(|| call_err("the parent closed the stream without an answer"))?;
        if first.x509_ca_chain.is_empty() || first.upstream_x509_roots.is_empty() {
            return Err(call_err("the parent's answer lacks the CA chain or its roots"));
        }
        self.roots.set(first.upstream_x509_roots.clone());
        let (sink, dir) = (self.roots.sink(), self.cfg.state_dir.clone());
        self.roots.follow(async move {
            while let Ok(Some(m)) = stream.message().await {
                if sink.set(m.upstream_x509_roots) {
                    save_roots(&dir, &sink.get());
                }
            }
        });
        Ok(MintedX509Ca { chain: first.x509_ca_chain, roots: first.upstream_x509_roots })
    }

    /// The parent's roots: pushed on the open `MintDownstreamX509Ca` stream; without one
    /// (after a restart the CA is restored, not minted) fetched with `FetchBundles`, which
    /// also keeps our agent SVID toward the parent renewed.
    async fn roots(&self) -> Result<Vec<Vec<u8>>, UpstreamError> {
        if !self.roots.following() {
            match self.fetch_roots().await {
                Ok(r) if !r.is_empty() => {
                    if self.roots.set(r) {
                        save_roots(&self.cfg.state_dir, &self.roots.get());
                    }
                }
                Ok(_) => tracing::warn!("The parent sent an empty bundle; keeping its previous roots"),
                Err(e) => tracing::warn!(error = %e, "Cannot fetch the parent's roots; keeping the previous ones"),
            }
        }
        Ok(self.roots.get())
    }
}
