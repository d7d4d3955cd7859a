//! Kubernetes integration for Tessera.
//!
//! What it is: turning a Kubernetes service-account token into a checked [`ServiceAccountToken`]
//! (online with a TokenReview against the cluster's API server, or offline against the
//! cluster issuer's JWKS), the few API reads and writes the server and agent need (pods on a
//! node, the kubelet's pod list, ConfigMaps holding the trust bundle), leader election with a
//! `coordination.k8s.io` Lease, and pod lookup from a process's cgroup.
//!
//! What it is not: no controller runtime, no watch caches, no CRDs. It never chooses the
//! Kubernetes API version feature of `k8s-openapi`; the binaries do.

#![forbid(unsafe_code)]

pub mod cache;
pub mod cgroup;
pub mod client;
pub mod jwks;
pub mod kubelet;
pub mod lease;
pub mod psat;
pub mod publish;
pub mod review;
pub mod token;

pub use client::{ClusterClient, connect};
pub use token::{ServiceAccountToken, TokenAuthenticator};

/// Why a Kubernetes operation failed. Messages never include a token.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    /// The kubeconfig or in-cluster configuration cannot be used.
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    /// The API server (or kubelet) could not be reached or answered an error.
    #[error("Kubernetes API: {0}")]
    Api(String),
    /// The token is not valid for us (bad signature, expired, wrong audience, not a service
    /// account, refused by the API server).
    #[error("{0}")]
    Unauthenticated(String),
    /// A JWKS document cannot be read or parsed.
    #[error("JWKS: {0}")]
    Jwks(String),
}

/// False for pods that have finished (`Succeeded`, `Failed`) or are being deleted: they no
/// longer stand for a workload on their node.
pub fn pod_is_live(p: &k8s_openapi::api::core::v1::Pod) -> bool {
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    p.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Succeeded" | "Failed"))
}

impl From<kube::Error> for K8sError {
    fn from(e: kube::Error) -> Self {
        K8sError::Api(e.to_string())
    }
}
