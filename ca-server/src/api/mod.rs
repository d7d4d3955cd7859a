//! The server's gRPC services and what they share: error mapping to `tonic::Status` (in one
//! place), proto conversions, and [`Issuance`], the one path every signing request takes
//! (CSR check → sign, on the worker for a software EC key and off it otherwise → durable
//! audit record → metrics).

pub mod admin;
pub mod agent;
pub mod convert;
pub mod limits;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use tessera_identity::SpiffeId;
use tessera_identity::csr::{CheckedCsr, CsrError};
use tessera_identity::ids::{LogId, redact_join_token};
use tessera_identity::unix_now;
use tonic::{Code, Status};
use tracing::{debug, error, warn};

use crate::ca::{Ca, CaError, IssuedJwt, IssuedX509};
use crate::changes::ChangeFeed;
use crate::metrics::Metrics;
use tessera_store::{AuditEvent, AuditKind, Store, StoreError};

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

impl From<CaError> for ApiError {
    fn from(e: CaError) -> Self {
        match e {
            CaError::NoActiveAuthority(_) => ApiError::Unavailable(e.to_string()),
            CaError::UnknownAuthority(_) => ApiError::NotFound(e.to_string()),
            CaError::InvalidState(m) => ApiError::FailedPrecondition(m),
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

impl From<tessera_identity::IdError> for ApiError {
    fn from(e: tessera_identity::IdError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

/// What an X509-SVID is issued for.
#[derive(Debug)]
pub struct X509Request<'a> {
    /// Identity.
    pub spiffe_id: &'a SpiffeId,
    /// DNS SANs the CSR may ask for (and that are always included).
    pub dns_names: &'a [String],
    /// TTL; None = default.
    pub ttl: Option<Duration>,
    /// Who asks (agent ID or `admin`), for the audit log.
    pub caller: &'a str,
    /// What is issued.
    pub kind: AuditKind,
}

/// The one issuance path: every SVID the server signs goes through here.
#[derive(Debug, Clone)]
pub struct Issuance {
    /// The CA.
    pub ca: Arc<Ca>,
    /// The store (audit log).
    pub store: Arc<dyn Store>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Tells watching agents that entries or bundles changed.
    pub changes: ChangeFeed,
}

impl Issuance {
    /// Checks the CSR, signs, and records the issuance durably before returning it.
    pub async fn x509(&self, req: X509Request<'_>, csr_der: Vec<u8>) -> Result<IssuedX509, ApiError> {
        self.x509_with(req, None, move |id, dns| {
            let csr = CheckedCsr::from_der(&csr_der)?;
            csr.check_names(id, dns)?;
            Ok(csr)
        })
        .await
    }

    /// Like [`Issuance::x509`], with the caller's own CSR check: `check` gets the identity and
    /// the allowed DNS names and returns the checked CSR or the refusal (which is audited).
    /// `renewal_grant` goes into the certificate (Istio CA API issuances on a token).
    pub async fn x509_with(
        &self,
        req: X509Request<'_>,
        renewal_grant: Option<tessera_identity::x509::RenewalGrant>,
        check: impl FnOnce(&SpiffeId, &[String]) -> Result<CheckedCsr, ApiError> + Send + 'static,
    ) -> Result<IssuedX509, ApiError> {
        let ca = self.ca.clone();
        let (id, dns, ttl) = (req.spiffe_id.clone(), req.dns_names.to_vec(), req.ttl);
        let work = move || -> Result<IssuedX509, ApiError> {
            let csr = check(&id, &dns)?;
            Ok(ca.sign_x509_svid(&id, &dns, &csr, ttl, renewal_grant.as_ref())?)
        };
        // With a software EC CA key, one verify and one signature take ~60 µs: cheaper on the
        // worker than a hop to the blocking pool and back (docs/performance.md). RSA and HSM
        // keys still sign on the blocking pool.
        let signed = if self.ca.signs_inline() {
            work()
        } else {
            tokio::task::spawn_blocking(work).await.map_err(|e| ApiError::Internal(e.to_string()))?
        };
        match signed {
            Ok(issued) => {
                self.audit(req.kind, req.spiffe_id, &issued.serial, issued.not_after, req.caller, "").await?;
                self.metrics.x509_issued.ok();
                // The audit log is the record of every issuance; this line is for debugging.
                debug!(spiffe_id = %LogId(req.spiffe_id), serial = %issued.serial, caller = %redact_join_token(req.caller), "Issued X509-SVID");
                Ok(issued)
            }
            Err(e) => {
                self.deny(req.spiffe_id, req.caller, &e).await;
                self.metrics.x509_issued.failed(&e);
                Err(e)
            }
        }
    }

    /// Mints a JWT-SVID and records it durably before returning it.
    pub async fn jwt(
        &self,
        id: &SpiffeId,
        audience: Vec<String>,
        ttl: Option<Duration>,
        caller: &str,
    ) -> Result<IssuedJwt, ApiError> {
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            let e = ApiError::InvalidArgument("at least one non-empty audience is required".into());
            self.metrics.jwt_issued.failed(&e);
            return Err(e);
        }
        if let Err(e) = tessera_identity::jwt::check_audience(&audience) {
            let e = ApiError::InvalidArgument(e.to_string());
            self.metrics.jwt_issued.failed(&e);
            return Err(e);
        }
        let (ca, owned) = (self.ca.clone(), id.clone());
        let minted = tokio::task::spawn_blocking(move || ca.mint_jwt_svid(&owned, &audience, ttl))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(ApiError::from);
        match minted {
            Ok(jwt) => {
                self.audit(AuditKind::JwtSvid, id, "", jwt.expires_at, caller, "").await?;
                self.metrics.jwt_issued.ok();
                debug!(spiffe_id = %LogId(id), caller = %redact_join_token(caller), "Issued JWT-SVID");
                Ok(jwt)
            }
            Err(e) => {
                self.metrics.jwt_issued.failed(&e);
                Err(e)
            }
        }
    }

    /// Appends an audit record; failing to record means failing the request.
    pub async fn audit(
        &self,
        kind: AuditKind,
        id: &SpiffeId,
        serial: &str,
        not_after: i64,
        caller: &str,
        detail: &str,
    ) -> Result<(), ApiError> {
        let ev = AuditEvent {
            at_ms: unix_now().saturating_mul(1000),
            kind,
            spiffe_id: id.to_string(),
            serial: serial.to_owned(),
            not_after,
            caller: caller.to_owned(),
            detail: detail.to_owned(),
        };
        self.store.append_audit(ev).await.map(|_| ()).map_err(ApiError::from)
    }

    /// Records a refusal (best effort: a refusal is returned whether or not it is recorded).
    pub async fn deny(&self, id: &SpiffeId, caller: &str, why: &ApiError) {
        if matches!(why, ApiError::Internal(_) | ApiError::Unavailable(_)) {
            return;
        }
        warn!(
            spiffe_id = %LogId(id),
            caller = %redact_join_token(caller),
            reason = %redact_join_token(&why.to_string()),
            "Refused"
        );
        if let Err(e) = self.audit(AuditKind::Denied, id, "", 0, caller, &why.to_string()).await {
            warn!(error = %e, "Cannot audit refusal");
        }
    }
}
