//! `join_token`: a one-use token from `tessera-server token generate`; the agent ID is
//! `spiffe://<td>/tessera/agent/join_token/<token>`, as in SPIRE.

use async_trait::async_trait;
use tessera_identity::{Selector, SpiffeId, TrustDomain, agent_id, unix_now};
use tessera_store::Store;

use super::{AttestError, NodeAttestor};

/// The `join_token` attestor.
#[derive(Debug, Default)]
pub struct JoinTokenAttestor;

fn token(payload: &[u8]) -> Result<&str, AttestError> {
    let t = std::str::from_utf8(payload).map_err(|_| AttestError::Malformed("join token is not UTF-8".into()))?;
    if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(AttestError::Malformed("join token is malformed".into()));
    }
    Ok(t)
}

#[async_trait]
impl NodeAttestor for JoinTokenAttestor {
    fn kind(&self) -> &'static str {
        "join_token"
    }

    fn identify(&self, td: &TrustDomain, payload: &[u8]) -> Result<SpiffeId, AttestError> {
        Ok(agent_id(td, "join_token", token(payload)?)?)
    }

    async fn verify(&self, store: &dyn Store, payload: &[u8]) -> Result<Vec<Selector>, AttestError> {
        let t = token(payload)?;
        let Some(jt) = store.take_join_token(t).await? else {
            return Err(AttestError::Refused("join token does not exist or has already been used".into()));
        };
        if jt.expires_at <= unix_now() {
            return Err(AttestError::Refused("join token has expired".into()));
        }
        Ok(Vec::new())
    }
}
