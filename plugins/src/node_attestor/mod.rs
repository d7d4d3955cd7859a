//! Node attestation on the server: the [`NodeAttestor`] trait, and the built-in `join_token`
//! attestor ([`join_token`]). `k8s_psat` is its own crate (`plugins/k8s-psat`). The server's
//! catalog builds the configured attestors, and `AttestAgent` dispatches on the attestation
//! data's type.
//!
//! An attestation has two steps so that bad input changes nothing: [`NodeAttestor::identify`]
//! names the agent from the payload without consuming anything (the CSR is then checked
//! against that ID), and [`NodeAttestor::verify`] proves it, consuming one-use material.

pub mod join_token;

use async_trait::async_trait;
use tessera_identity::{Selector, SpiffeId, TrustDomain};
use tessera_store::{AgentRecord, Entry, Store, StoreError};

/// Why an attestation was refused. The server maps each kind to a gRPC code in one place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The payload is malformed or names something unknown (`InvalidArgument`).
    #[error("{0}")]
    Malformed(String),
    /// The payload is well formed but proves nothing, or proves a node that may not attest
    /// (`PermissionDenied`).
    #[error("{0}")]
    Refused(String),
    /// What the proof needs cannot be reached now (a cluster's API server): retry
    /// (`Unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<tessera_identity::IdError> for AttestError {
    fn from(e: tessera_identity::IdError) -> Self {
        AttestError::Malformed(e.to_string())
    }
}

/// Proves a node's identity from attestation data.
#[async_trait]
pub trait NodeAttestor: Send + Sync + std::fmt::Debug {
    /// The attestation type it handles (`AttestationData.type`), e.g. `join_token`.
    fn kind(&self) -> &'static str;
    /// The agent ID this payload claims; consumes nothing.
    fn identify(&self, td: &TrustDomain, payload: &[u8]) -> Result<SpiffeId, AttestError>;
    /// Proves the claim (consuming one-use material) and returns the node's selectors.
    async fn verify(&self, store: &dyn Store, payload: &[u8]) -> Result<Vec<Selector>, AttestError>;
    /// Entries an agent attested by this attestor holds without registration (none by
    /// default; `k8s_psat` with `auto_pod_identity` implies one per service account with a pod
    /// on the agent's node).
    async fn implied_entries(&self, _agent: &AgentRecord, _td: &TrustDomain) -> Result<Vec<Entry>, AttestError> {
        Ok(Vec::new())
    }
}
