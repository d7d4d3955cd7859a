//! The server's gRPC services and what they share ([`Shared`]: the issuance path of
//! `tessera-ca`, the metrics, the change feed): error mapping to `tonic::Status` (in one
//! place) and proto conversions.

pub mod admin;
pub mod agent;
pub mod convert;
pub mod limits;
pub mod tls;

use std::sync::Arc;

use tessera_ca::{CaError, Failure, Fault, Issuance, IssueError};
use tessera_identity::csr::CsrError;
use tessera_store::StoreError;
use tonic::{Code, Status};
use tracing::error;

use crate::changes::ChangeFeed;
use crate::metrics::Metrics;

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
    /// The server cannot serve now (no CA, store down).
    #[error("{0}")]
    Unavailable(String),
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
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            ApiError::Unavailable(m) => Status::unavailable(m),
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
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::AlreadyExists(_) => Code::AlreadyExists,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// The message a peer may see (internal details are withheld).
    pub fn public_message(&self) -> String {
        match self {
            ApiError::Internal(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(m),
            StoreError::AlreadyExists(m) => ApiError::AlreadyExists(m),
            StoreError::Backend(m) => ApiError::Unavailable(format!("store unavailable: {m}")),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl Failure for ApiError {
    fn fault(&self) -> Fault {
        match self {
            ApiError::Internal(_) | ApiError::Unavailable(_) => Fault::Server,
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
            CaError::Upstream(_) => ApiError::Unavailable(e.to_string()),
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
            A::Unavailable(m) => ApiError::Unavailable(m),
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

/// What every gRPC service shares: the one issuance path, the metrics and the change feed.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Every SVID is signed through it.
    pub issuance: Issuance,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Tells watching agents that entries or bundles changed.
    pub changes: ChangeFeed,
}
