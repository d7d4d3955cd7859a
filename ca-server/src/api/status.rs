//! Where errors become gRPC statuses, for every service of the server: domain errors
//! (`CaError`, `IssueError`, `StoreError`, `AttestError`, …) become an [`ApiError`] here and
//! only here, and an [`ApiError`] becomes a `tonic::Status` here and only here.
//!
//! What a remote peer sees is the code and our own words. The text of a store, Kubernetes
//! or upstream failure is logged, never sent ([`ApiError::Backend`]), nor is an internal
//! error's detail.

use tessera_ca::{CaError, Failure, Fault, IssueError};
use tessera_identity::csr::CsrError;
use tessera_store::StoreError;
use tonic::{Code, Status};
use tracing::{error, warn};

/// What a peer is told when the store fails.
pub const STORE_UNAVAILABLE: &str = "store unavailable";
/// What a peer is told when a cluster's API server cannot answer.
pub const CLUSTER_UNAVAILABLE: &str = "the cluster's API server cannot be reached";
/// What a peer is told when the upstream authority fails.
pub const UPSTREAM_UNAVAILABLE: &str = "the upstream authority is unavailable";

/// A request failure, mapped to a gRPC status in exactly one place ([`From<ApiError> for Status`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// Malformed input.
    #[error("{0}")]
    InvalidArgument(String),
    /// No or bad credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// The calling agent has no record (an operator evicted it): `PermissionDenied`, marked
    /// with [`tessera_agent_api::EVICTED_METADATA`] so that the agent attests again.
    #[error("{0}")]
    Evicted(String),
    /// The object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not possible in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit was exceeded.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The server cannot serve now, in our own words (no active CA, no root yet).
    #[error("{0}")]
    Unavailable(String),
    /// Something we depend on failed (the store, a cluster's API server, the upstream
    /// authority): the peer gets `what`, the log gets `detail` too.
    #[error("{what}: {detail}")]
    Backend {
        /// What the peer is told.
        what: &'static str,
        /// The dependency's own text, for the log only.
        detail: String,
    },
    /// A bug or an unexpected failure; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::Evicted(m) => {
                let mut s = Status::permission_denied(m);
                s.metadata_mut()
                    .insert(tessera_agent_api::EVICTED_METADATA, tonic::metadata::MetadataValue::from_static("1"));
                s
            }
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
            ApiError::Backend { what, detail } => {
                warn!(detail = %detail, "{what}");
                Status::unavailable(what)
            }
            ApiError::Internal(m) => {
                error!(detail = %m, "Internal error");
                Status::internal("internal error")
            }
        }
    }
}

impl ApiError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument(_) => Code::InvalidArgument,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) | ApiError::Evicted(_) => Code::PermissionDenied,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) | ApiError::Backend { .. } => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// The message a peer may see (internal details are withheld).
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".into(),
            ApiError::Backend { what, .. } => (*what).into(),
            other => other.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::AlreadyExists(m) => ApiError::AlreadyExists(m),
            StoreError::Backend(detail) => ApiError::Backend { what: STORE_UNAVAILABLE, detail },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl Failure for ApiError {
    fn fault(&self) -> Fault {
        match self {
            ApiError::Internal(_) | ApiError::Unavailable(_) | ApiError::Backend { .. } => Fault::Server,
            _ => Fault::Caller,
        }
    }
}

impl From<IssueError> for ApiError {
    fn from(e: IssueError) -> Self {
        match e {
            IssueError::Csr(c) => c.into(),
            IssueError::Audience(a) => ApiError::InvalidArgument(a.to_string()),
            IssueError::Ca(c) => c.into(),
            IssueError::Audit(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<CaError> for ApiError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::NoActiveAuthority(_) => ApiError::Unavailable(e.to_string()),
            CaError::UnknownAuthority(_) => ApiError::NotFound(e.to_string()),
            // Operator commands that do not fit the CA's state, and states the CA cannot
            // leave by itself.
            CaError::NothingPrepared(_)
            | CaError::NotThePrepared { .. }
            | CaError::TaintNotOld { .. }
            | CaError::AlreadyTainted(_)
            | CaError::DamagedJournal(_)
            | CaError::UpstreamAnswer(_)
            | CaError::BundleContention => ApiError::FailedPrecondition(e.to_string()),
            CaError::Store(s) => s.into(),
            CaError::Profile(p) => ApiError::InvalidArgument(p.to_string()),
            CaError::Upstream(_) => ApiError::Backend { what: UPSTREAM_UNAVAILABLE, detail: e.to_string() },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<CsrError> for ApiError {
    fn from(e: CsrError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

impl From<crate::federation::FederationError> for ApiError {
    fn from(e: crate::federation::FederationError) -> Self {
        use crate::federation::FederationError as F;
        match e {
            F::NotFound(_) => ApiError::NotFound(e.to_string()),
            F::Invalid(_) | F::Bootstrap { .. } => ApiError::InvalidArgument(e.to_string()),
            F::Fetch { .. } => ApiError::Unavailable(e.to_string()),
            F::Refused { .. } => ApiError::FailedPrecondition(e.to_string()),
            F::Store(s) => s.into(),
        }
    }
}

impl From<tessera_plugins::AttestError> for ApiError {
    fn from(e: tessera_plugins::AttestError) -> Self {
        use tessera_plugins::AttestError as A;
        match e {
            A::Malformed(m) => ApiError::InvalidArgument(m),
            A::Refused(m) => ApiError::PermissionDenied(m),
            A::Unavailable(detail) => ApiError::Backend { what: CLUSTER_UNAVAILABLE, detail },
            A::Store(s) => s.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<tessera_identity::IdError> for ApiError {
    fn from(e: tessera_identity::IdError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dependency_failure_reaches_the_peer_as_our_words_only() {
        let cases: Vec<ApiError> = vec![
            StoreError::Backend("connection to db.internal:5432 refused (password=hunter2)".into()).into(),
            tessera_plugins::AttestError::Unavailable("cluster c1: https://10.0.0.1:6443 timed out".into()).into(),
            CaError::Upstream(tessera_plugins::UpstreamError::Signing {
                upstream: "vault",
                reason: "https://vault.internal:8200 503".into(),
            })
            .into(),
        ];
        for e in cases {
            assert_eq!(e.code(), Code::Unavailable);
            assert_eq!(e.fault(), Fault::Server, "not audited as a refusal");
            let public = e.public_message();
            let status = Status::from(e);
            for leaked in ["db.internal", "hunter2", "10.0.0.1", "vault.internal"] {
                assert!(!status.message().contains(leaked), "{leaked} reached the peer: {}", status.message());
                assert!(!public.contains(leaked), "{leaked} reached the peer: {public}");
            }
            assert!(!status.message().is_empty());
        }
    }

    #[test]
    fn an_internal_error_hides_its_detail() {
        let status = Status::from(ApiError::Internal("index 7 out of range in /src/x.rs".into()));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }
}
