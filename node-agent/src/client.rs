//! The agent's files beside its identity: the trust bundle (`bundle.json`, SPIFFE JWKS). The
//! identity itself, and the calls that make and renew it, are in `tessera-agent-api`.

use tessera_agent_api::{AgentIdentity, ClientError, IdentityFiles};
use tessera_identity::{Bundle, TrustDomain};

const BUNDLE_FILE: &str = "bundle.json";

/// Reads the persisted identity and bundle, if any.
pub fn load_state(files: &IdentityFiles, td: &TrustDomain) -> Result<Option<(AgentIdentity, Bundle)>, ClientError> {
    let Some(identity) = files.load()? else { return Ok(None) };
    let doc = files.read_beside(BUNDLE_FILE)?;
    let bundle = Bundle::from_jwks(td.clone(), &doc)
        .map_err(|e| ClientError::State { path: files.dir().join(BUNDLE_FILE), reason: e.to_string() })?;
    Ok(Some((identity, bundle)))
}

/// Persists the bundle (SPIFFE JWKS), replaced atomically.
pub fn save_bundle(files: &IdentityFiles, bundle: &Bundle) -> Result<(), ClientError> {
    let doc = bundle
        .to_jwks()
        .map_err(|e| ClientError::State { path: files.dir().join(BUNDLE_FILE), reason: e.to_string() })?;
    files.write_beside(BUNDLE_FILE, doc.as_bytes(), 0o644)
}
