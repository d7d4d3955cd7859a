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
    /// Builds from a chain and key, reading the leaf's facts; received now. The key must be
    /// the one the leaf certifies: a pair that cannot make a TLS handshake is refused here.
    pub fn new(chain: Vec<Vec<u8>>, key: PrivateKey) -> Result<Self, String> {
        let leaf = chain.first().ok_or("empty certificate chain")?;
        let facts = tessera_identity::x509::cert_facts(leaf).map_err(|e| e.to_string())?;
        if key.public_key_spki().map_err(|e| e.to_string())? != facts.spki {
            return Err("the key is not the one the agent certificate certifies".into());
        }
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
/// A renewal's key while its certificate is being saved (see [`IdentityFiles::save`]).
const NEXT_KEY_FILE: &str = "agent-key.next.pem";

/// Where an agent identity is kept: `agent-svid.pem` (0644) and `agent-key.pem` (0600) in a
/// private directory, each replaced atomically, and saved so that a crash at any point
/// leaves a certificate and the key it certifies (see [`IdentityFiles::save`]).
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
    ///
    /// When a save was cut between the certificate and the key, `agent-key.pem` still holds
    /// the old key and `agent-key.next.pem` the one the certificate certifies: that pair is
    /// used, and the save is finished. A key file that certifies nothing is an error.
    pub fn load(&self) -> Result<Option<AgentIdentity>, ClientError> {
        let svid_path = self.dir.join(SVID_FILE);
        if !svid_path.exists() {
            return Ok(None);
        }
        let chain_pem = std::fs::read(&svid_path).map_err(|e| state_err(&svid_path, e))?;
        let chain: Vec<Vec<u8>> = tessera_identity::pem::decode_certs(&chain_pem)
            .map_err(|e| state_err(&svid_path, e))?
            .into_iter()
            .map(|c| c.to_vec())
            .collect();
        let key_path = self.dir.join(KEY_FILE);
        let next_path = self.dir.join(NEXT_KEY_FILE);
        let mut identity = match AgentIdentity::new(chain.clone(), self.read_key(&key_path)?) {
            Ok(identity) => identity,
            Err(reason) if next_path.exists() => {
                let identity =
                    AgentIdentity::new(chain, self.read_key(&next_path)?).map_err(|_| state_err(&key_path, reason))?;
                tessera_plugins::fsutil::rename_durable(&next_path, &key_path).map_err(|e| state_err(&key_path, e))?;
                identity
            }
            Err(reason) => return Err(state_err(&key_path, reason)),
        };
        if let Some(f) = identity.chain.first().and_then(|c| tessera_identity::x509::cert_facts(c).ok()) {
            identity.received_at = f.not_before;
        }
        Ok(Some(identity))
    }

    fn read_key(&self, path: &Path) -> Result<PrivateKey, ClientError> {
        let pem = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| state_err(path, e))?);
        PrivateKey::from_pem(&pem).map_err(|e| state_err(path, e))
    }

    /// Saves the identity so that a crash at any point leaves a pair that matches: the key
    /// to `agent-key.next.pem` (0600), then the certificate, then the key renamed over
    /// `agent-key.pem`. Cut before the certificate, the old pair stands; cut after it,
    /// [`IdentityFiles::load`] pairs the certificate with the next key.
    pub fn save(&self, identity: &AgentIdentity) -> Result<(), ClientError> {
        tessera_plugins::fsutil::ensure_private_dir(&self.dir).map_err(|e| state_err(&self.dir, e))?;
        let next_path = self.dir.join(NEXT_KEY_FILE);
        tessera_plugins::fsutil::atomic_write(&next_path, identity.key.to_pem().as_bytes(), 0o600)
            .map_err(|e| state_err(&next_path, e))?;
        let svid_path = self.dir.join(SVID_FILE);
        let pem = tessera_identity::pem::encode_certs(identity.chain.iter().map(Vec::as_slice));
        tessera_plugins::fsutil::atomic_write(&svid_path, pem.as_bytes(), 0o644)
            .map_err(|e| state_err(&svid_path, e))?;
        let key_path = self.dir.join(KEY_FILE);
        tessera_plugins::fsutil::rename_durable(&next_path, &key_path).map_err(|e| state_err(&key_path, e))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// An agent identity for a fresh key, self-signed (the files do not check the issuer).
    fn identity() -> AgentIdentity {
        let key = PrivateKey::generate_ec_p256().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names =
            vec![rcgen::SanType::URI("spiffe://example.org/tessera/agent/join_token/x".try_into().unwrap())];
        let cert = params.self_signed(&key.to_rcgen().unwrap()).unwrap();
        AgentIdentity::new(vec![cert.der().to_vec()], key).unwrap()
    }

    fn matches(id: &AgentIdentity) -> bool {
        tessera_identity::x509::cert_facts(&id.chain[0]).unwrap().spki == id.key.public_key_spki().unwrap()
    }

    fn write(dir: &Path, name: &str, data: &[u8]) {
        std::fs::write(dir.join(name), data).unwrap();
    }

    fn cert_pem(id: &AgentIdentity) -> String {
        tessera_identity::pem::encode_certs(id.chain.iter().map(Vec::as_slice))
    }

    #[test]
    fn a_key_that_the_certificate_does_not_certify_is_refused() {
        let (a, b) = (identity(), identity());
        let e = AgentIdentity::new(a.chain, b.key).unwrap_err();
        assert!(e.contains("not the one the agent certificate certifies"), "{e}");
    }

    #[test]
    fn save_then_load_gives_the_pair_back_and_leaves_no_next_key() {
        let d = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(d.path().join("agent"));
        let (a, b) = (identity(), identity());
        files.save(&a).unwrap();
        files.save(&b).unwrap();
        let got = files.load().unwrap().unwrap();
        assert_eq!(got.chain, b.chain);
        assert!(matches(&got));
        assert!(!files.dir().join(NEXT_KEY_FILE).exists());
    }

    /// The state a save of `new` over `old` cut after its first step leaves: the old pair,
    /// the new key beside it.
    fn cut_after_the_next_key() -> (tempfile::TempDir, IdentityFiles, AgentIdentity, AgentIdentity) {
        let d = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(d.path());
        let (old, new) = (identity(), identity());
        files.save(&old).unwrap();
        write(d.path(), NEXT_KEY_FILE, new.key.to_pem().as_bytes());
        (d, files, old, new)
    }

    #[test]
    fn a_save_cut_after_the_certificate_loads_the_new_pair_and_is_finished() {
        // The state a SIGKILL between the certificate's rename and the key's leaves: the new
        // certificate, the old key in agent-key.pem, the new key beside it.
        let (d, files, _, new) = cut_after_the_next_key();
        write(d.path(), SVID_FILE, cert_pem(&new).as_bytes());
        let got = files.load().unwrap().unwrap();
        assert_eq!(got.chain, new.chain);
        assert!(matches(&got), "the loaded key does not match the loaded certificate");
        assert_eq!(std::fs::read(d.path().join(KEY_FILE)).unwrap(), new.key.to_pem().as_bytes());
        assert!(!d.path().join(NEXT_KEY_FILE).exists());
    }

    #[test]
    fn a_save_cut_before_the_certificate_keeps_the_old_pair() {
        let (_d, files, old, _) = cut_after_the_next_key();
        let got = files.load().unwrap().unwrap();
        assert_eq!(got.chain, old.chain);
        assert!(matches(&got));
    }

    #[test]
    fn a_key_file_that_certifies_nothing_is_a_precise_error() {
        let d = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(d.path());
        let (a, b) = (identity(), identity());
        files.save(&a).unwrap();
        write(d.path(), KEY_FILE, b.key.to_pem().as_bytes());
        let e = files.load().unwrap_err().to_string();
        assert!(e.contains("agent-key.pem") && e.contains("not the one the agent certificate certifies"), "{e}");
    }
}
