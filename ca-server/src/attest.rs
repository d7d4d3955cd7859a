//! Node attestation on the server: the [`NodeAttestor`] trait and the built-in `join_token`
//! attestor. The catalog builds the configured attestors (`[[node_attestor]] type = "…"`);
//! `AttestAgent` dispatches on the attestation data's type.
//!
//! An attestation has two steps so that bad input changes nothing: [`NodeAttestor::identify`]
//! names the agent from the payload without consuming anything (the CSR is then checked
//! against that ID), and [`NodeAttestor::verify`] proves it, consuming one-use material.

use async_trait::async_trait;
use tessera_identity::{Selector, SpiffeId, TrustDomain, agent_id, unix_now};

use crate::api::ApiError;
use crate::store::Store;

/// Proves a node's identity from attestation data.
#[async_trait]
pub trait NodeAttestor: Send + Sync + std::fmt::Debug {
    /// The attestation type it handles (`AttestationData.type`), e.g. `join_token`.
    fn kind(&self) -> &'static str;
    /// The agent ID this payload claims; consumes nothing.
    fn identify(&self, td: &TrustDomain, payload: &[u8]) -> Result<SpiffeId, ApiError>;
    /// Proves the claim (consuming one-use material) and returns the node's selectors.
    async fn verify(&self, store: &dyn Store, payload: &[u8]) -> Result<Vec<Selector>, ApiError>;
}

/// `join_token`: a one-use token from `tessera-server token generate`; the agent ID is
/// `spiffe://<td>/tessera/agent/join_token/<token>`, as in SPIRE.
#[derive(Debug, Default)]
pub struct JoinTokenAttestor;

fn token(payload: &[u8]) -> Result<&str, ApiError> {
    let t = std::str::from_utf8(payload).map_err(|_| ApiError::InvalidArgument("join token is not UTF-8".into()))?;
    if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(ApiError::InvalidArgument("join token is malformed".into()));
    }
    Ok(t)
}

#[async_trait]
impl NodeAttestor for JoinTokenAttestor {
    fn kind(&self) -> &'static str {
        "join_token"
    }

    fn identify(&self, td: &TrustDomain, payload: &[u8]) -> Result<SpiffeId, ApiError> {
        Ok(agent_id(td, "join_token", token(payload)?)?)
    }

    async fn verify(&self, store: &dyn Store, payload: &[u8]) -> Result<Vec<Selector>, ApiError> {
        let t = token(payload)?;
        let Some(jt) = store.take_join_token(t).await? else {
            return Err(ApiError::PermissionDenied("join token does not exist or has already been used".into()));
        };
        if jt.expires_at <= unix_now() {
            return Err(ApiError::PermissionDenied("join token has expired".into()));
        }
        Ok(Vec::new())
    }
}
