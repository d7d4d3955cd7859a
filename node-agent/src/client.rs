//! The agent's side of the Agent API: a TCP + rustls connector (the server is authenticated by
//! its SPIFFE ID, `spiffe://<td>/tessera/server`) and the agent's persisted identity.

use std::path::{Path, PathBuf};

use tessera_identity::tls::{Authorize, client_config};
use tessera_identity::{Bundle, PrivateKey, SpiffeId, TrustDomain};
use tessera_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::Channel;

/// Errors reaching the server or reading the agent's own files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// TLS configuration failed (bad roots or key).
    #[error("TLS: {0}")]
    Tls(String),
    /// The server cannot be reached.
    #[error("cannot connect to the server at {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A persisted file is unreadable or damaged.
    #[error("agent state file {path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Connects to the Agent API at `addr` (`host:port`) with `tls`.
pub async fn connect(addr: &str, tls: rustls::ClientConfig) -> Result<AgentClient<Channel>, ClientError> {
    let channel = tessera_svc::connect::tls(addr, tls).await.map_err(|e| ClientError::Connect {
        addr: addr.to_owned(),
        reason: format!("{e}: {:?}", std::error::Error::source(&e)),
    })?;
    Ok(AgentClient::new(channel).max_decoding_message_size(64 * 1024 * 1024))
}

/// Connects to the first server replica that answers, trying `servers` in order from index
/// `start`; returns the client and the index that answered.
pub async fn connect_any(
    servers: &[String],
    start: usize,
    tls: rustls::ClientConfig,
) -> Result<(AgentClient<Channel>, usize), ClientError> {
    let n = servers.len();
    let mut last = None;
    for k in 0..n {
        let i = (start + k) % n;
        let Some(addr) = servers.get(i) else { continue };
        match connect(addr, tls.clone()).await {
            Ok(c) => return Ok((c, i)),
            Err(e) => {
                tracing::debug!(server = %addr, error = %e, "Server replica unreachable; trying the next");
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Connect { addr: String::new(), reason: "no server address".into() }))
}

/// TLS to the server, trusting `bundle`'s roots and presenting `identity` when given.
pub fn server_tls(
    td: &TrustDomain,
    bundle: &Bundle,
    identity: Option<&AgentIdentity>,
) -> Result<rustls::ClientConfig, ClientError> {
    let server = tessera_identity::server_id(td).map_err(|e| ClientError::Tls(e.to_string()))?;
    let client = identity.map(|i| (i.chain.iter().map(|c| c.clone().into()).collect(), &i.key));
    client_config(&bundle.x509_authorities, Authorize::Id(server), client).map_err(|e| ClientError::Tls(e.to_string()))
}

/// The agent's own SVID and key.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    /// The agent's SPIFFE ID.
    pub id: SpiffeId,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// Its key (never leaves the node).
    pub key: PrivateKey,
    /// Unix seconds: when this agent received it (the certificate's notBefore is backdated
    /// for clock skew, so it cannot serve as the start of the lifetime).
    pub received_at: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl AgentIdentity {
    /// Builds from a chain and key, reading the leaf's facts.
    pub fn new(chain: Vec<Vec<u8>>, key: PrivateKey) -> Result<Self, String> {
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let facts = tessera_identity::x509::cert_facts(leaf).map_err(|e| e.to_string())?;
        let id = tessera_identity::tls::leaf_spiffe_id(leaf).ok_or("agent certificate has no SPIFFE ID")?;
        let received_at = tessera_identity::unix_now().clamp(facts.not_before, facts.not_after);
        Ok(Self { id, chain, key, received_at, not_after: facts.not_after })
    }

    /// When to renew: half of the remaining lifetime from when it was received.
    pub fn renew_at(&self) -> i64 {
        self.received_at + (self.not_after - self.received_at) / 2
    }
}

const SVID_FILE: &str = "agent-svid.pem";
const KEY_FILE: &str = "agent-key.pem";
const BUNDLE_FILE: &str = "bundle.json";

fn state_err(path: &Path, reason: impl ToString) -> ClientError {
    ClientError::State { path: path.to_owned(), reason: reason.to_string() }
}

/// Reads the persisted identity and bundle, if any.
pub fn load_state(dir: &Path, td: &TrustDomain) -> Result<Option<(AgentIdentity, Bundle)>, ClientError> {
    let svid_path = dir.join(SVID_FILE);
    if !svid_path.exists() {
        return Ok(None);
    }
    let chain_pem = std::fs::read(&svid_path).map_err(|e| state_err(&svid_path, e))?;
    let chain = tessera_identity::pem::decode_certs(&chain_pem).map_err(|e| state_err(&svid_path, e))?;
    let key_path = dir.join(KEY_FILE);
    let key_pem = zeroize::Zeroizing::new(std::fs::read(&key_path).map_err(|e| state_err(&key_path, e))?);
    let key = PrivateKey::from_pem(&key_pem).map_err(|e| state_err(&key_path, e))?;
    let mut identity = AgentIdentity::new(chain.into_iter().map(|c| c.to_vec()).collect(), key)
        .map_err(|e| state_err(&svid_path, e))?;
    // Loaded from disk: we do not know when it arrived; assume its notBefore (renew early).
    if let Some(f) = identity.chain.first().and_then(|c| tessera_identity::x509::cert_facts(c).ok()) {
        identity.received_at = f.not_before;
    }
    let bundle_path = dir.join(BUNDLE_FILE);
    let doc = std::fs::read(&bundle_path).map_err(|e| state_err(&bundle_path, e))?;
    let bundle = Bundle::from_jwks(td.clone(), &doc).map_err(|e| state_err(&bundle_path, e))?;
    Ok(Some((identity, bundle)))
}

/// Persists the identity (key 0600) and the bundle, each file replaced atomically.
pub fn save_identity(dir: &Path, identity: &AgentIdentity) -> Result<(), ClientError> {
    tessera_plugins::fsutil::ensure_private_dir(dir).map_err(|e| state_err(dir, e))?;
    let key_path = dir.join(KEY_FILE);
    tessera_plugins::fsutil::atomic_write(&key_path, identity.key.to_pem().as_bytes(), 0o600)
        .map_err(|e| state_err(&key_path, e))?;
    let svid_path = dir.join(SVID_FILE);
    let pem = tessera_identity::pem::encode_certs(identity.chain.iter().map(Vec::as_slice));
    tessera_plugins::fsutil::atomic_write(&svid_path, pem.as_bytes(), 0o644).map_err(|e| state_err(&svid_path, e))
}

/// Persists the bundle (SPIFFE JWKS).
pub fn save_bundle(dir: &Path, bundle: &Bundle) -> Result<(), ClientError> {
    let path = dir.join(BUNDLE_FILE);
    let doc = bundle.to_jwks().map_err(|e| state_err(&path, e))?;
    tessera_plugins::fsutil::atomic_write(&path, doc.as_bytes(), 0o644).map_err(|e| state_err(&path, e))
}
