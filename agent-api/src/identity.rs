//! The agent identity (an agent SVID and its key) and the files it is kept in.

use std::path::{Path, PathBuf};

use tessera_identity::{PrivateKey, SpiffeId};

use crate::error::ClientError;

/// An agent's own SVID and key.
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
    /// Builds from a chain and key, reading the leaf's facts; received now.
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

/// Where an agent identity is kept: `agent-svid.pem` (0644) and `agent-key.pem` (0600) in a
/// private directory, each replaced atomically.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    dir: PathBuf,
}

fn state_err(path: &Path, reason: impl ToString) -> ClientError {
    ClientError::State { path: path.to_owned(), reason: reason.to_string() }
}

impl IdentityFiles {
    /// The files in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether an identity has been saved here.
    pub fn exists(&self) -> bool {
        self.dir.join(SVID_FILE).exists()
    }

    /// Reads the saved identity, if any. Loaded from disk, its receipt time is unknown: it
    /// counts from the certificate's notBefore (it renews early rather than late).
    pub fn load(&self) -> Result<Option<AgentIdentity>, ClientError> {
        let svid_path = self.dir.join(SVID_FILE);
        if !svid_path.exists() {
            return Ok(None);
        }
        let chain_pem = std::fs::read(&svid_path).map_err(|e| state_err(&svid_path, e))?;
        let chain = tessera_identity::pem::decode_certs(&chain_pem).map_err(|e| state_err(&svid_path, e))?;
        let key_path = self.dir.join(KEY_FILE);
        let key_pem = zeroize::Zeroizing::new(std::fs::read(&key_path).map_err(|e| state_err(&key_path, e))?);
        let key = PrivateKey::from_pem(&key_pem).map_err(|e| state_err(&key_path, e))?;
        let mut identity = AgentIdentity::new(chain.into_iter().map(|c| c.to_vec()).collect(), key)
            .map_err(|e| state_err(&svid_path, e))?;
        if let Some(f) = identity.chain.first().and_then(|c| tessera_identity::x509::cert_facts(c).ok()) {
            identity.received_at = f.not_before;
        }
        Ok(Some(identity))
    }

    /// Saves the identity: the key first (0600), then the certificate.
    pub fn save(&self, identity: &AgentIdentity) -> Result<(), ClientError> {
        tessera_plugins::fsutil::ensure_private_dir(&self.dir).map_err(|e| state_err(&self.dir, e))?;
        let key_path = self.dir.join(KEY_FILE);
        tessera_plugins::fsutil::atomic_write(&key_path, identity.key.to_pem().as_bytes(), 0o600)
            .map_err(|e| state_err(&key_path, e))?;
        let svid_path = self.dir.join(SVID_FILE);
        let pem = tessera_identity::pem::encode_certs(identity.chain.iter().map(Vec::as_slice));
        tessera_plugins::fsutil::atomic_write(&svid_path, pem.as_bytes(), 0o644).map_err(|e| state_err(&svid_path, e))
    }

    /// Writes another file beside the identity (a bundle), atomically.
    pub fn write_beside(&self, name: &str, data: &[u8], mode: u32) -> Result<(), ClientError> {
        let path = self.dir.join(name);
        tessera_plugins::fsutil::atomic_write(&path, data, mode).map_err(|e| state_err(&path, e))
    }

    /// Reads a file beside the identity.
    pub fn read_beside(&self, name: &str) -> Result<Vec<u8>, ClientError> {
        let path = self.dir.join(name);
        std::fs::read(&path).map_err(|e| state_err(&path, e))
    }
}
