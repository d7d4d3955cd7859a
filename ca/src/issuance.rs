//! [`Issuance`]: the one path every SVID the server signs takes — CSR check, signature (on
//! the async worker for a software EC key, on the blocking pool otherwise), a durable audit
//! record, counters. A request is answered only after its audit record is written.
//!
//! The callers' error type `E` stays theirs: it is built from an [`IssueError`] and says
//! whose fault it is ([`Failure`]), which decides the counter and whether a refusal is
//! audited.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tessera_identity::SpiffeId;
use tessera_identity::csr::{CheckedCsr, CsrError};
use tessera_identity::ids::{LogId, redact_join_token};
use tessera_store::{AuditEvent, AuditKind, Store, StoreError};
use tracing::{debug, warn};

use crate::ca::{Ca, IssuedJwt, IssuedX509};
use crate::error::CaError;

/// Whose fault a failed request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The caller's: a refusal, counted as `denied` and audited.
    Caller,
    /// Ours (a store or CA that cannot serve now, a bug): counted as `error`, not audited.
    Server,
}

/// An error a caller of [`Issuance`] returns.
pub trait Failure: std::fmt::Display {
    /// Whose fault it is.
    fn fault(&self) -> Fault;
}

/// Why an issuance failed, before the caller maps it to its own error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The CSR is malformed or asks for names it may not have.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// A JWT-SVID request names no audience, or too many or too long ones.
    #[error("{0}")]
    Audience(AudienceError),
    /// The CA could not sign.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The audit record could not be written, so the SVID is not handed out.
    #[error(transparent)]
    Audit(StoreError),
}

/// What is wrong with a JWT-SVID audience.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AudienceError {
    /// None, or an empty one.
    #[error("at least one non-empty audience is required")]
    Missing,
    /// Over the bounds (`tessera_identity::jwt::check_audience`).
    #[error("{0}")]
    Bounds(String),
}

/// A counter split by `result` = ok | denied | error.
#[derive(Debug, Default)]
pub struct ResultCounter {
    ok: AtomicU64,
    denied: AtomicU64,
    error: AtomicU64,
}

impl ResultCounter {
    /// One success.
    pub fn ok(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    /// One failure: `denied` for the caller's fault, `error` for ours.
    pub fn failed(&self, e: &impl Failure) {
        let c = match e.fault() {
            Fault::Server => &self.error,
            Fault::Caller => &self.denied,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// `(ok, denied, error)`.
    pub fn counts(&self) -> (u64, u64, u64) {
        (self.ok.load(Ordering::Relaxed), self.denied.load(Ordering::Relaxed), self.error.load(Ordering::Relaxed))
    }
}

/// The issuance counters (the server renders them as metrics).
#[derive(Debug, Default)]
pub struct IssuanceCounters {
    /// X509-SVIDs issued (workload, agent and admin mints).
    pub x509: ResultCounter,
    /// JWT-SVIDs issued.
    pub jwt: ResultCounter,
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
    pub counters: Arc<IssuanceCounters>,
}

impl Issuance {
    /// The issuance path of `ca`, auditing to the CA's store.
    pub fn new(ca: Arc<Ca>, counters: Arc<IssuanceCounters>) -> Self {
        Self { store: ca.store().clone(), ca, counters }
    }

    /// Checks the CSR, signs, and records the issuance durably before returning it.
    pub async fn x509<E>(&self, req: X509Request<'_>, csr_der: Vec<u8>) -> Result<IssuedX509, E>
    where
        E: From<IssueError> + Failure + Send + 'static,
    {
        self.x509_with(req, None, move |id, dns| {
            let csr = CheckedCsr::from_der(&csr_der).map_err(IssueError::from)?;
            csr.check_names(id, dns).map_err(IssueError::from)?;
            Ok(csr)
        })
        .await
    }

    /// Like [`Issuance::x509`], with the caller's own CSR check: `check` gets the identity and
    /// the allowed DNS names and returns the checked CSR or the refusal (which is audited).
    /// `renewal_grant` goes into the certificate (Istio CA API issuances on a token).
    pub async fn x509_with<E>(
        &self,
        req: X509Request<'_>,
        renewal_grant: Option<tessera_identity::x509::RenewalGrant>,
        check: impl FnOnce(&SpiffeId, &[String]) -> Result<CheckedCsr, E> + Send + 'static,
    ) -> Result<IssuedX509, E>
    where
        E: From<IssueError> + Failure + Send + 'static,
    {
        let ca = self.ca.clone();
        let (id, dns, ttl) = (req.spiffe_id.clone(), req.dns_names.to_vec(), req.ttl);
        let work = move || -> Result<IssuedX509, E> {
            let csr = check(&id, &dns)?;
            ca.sign_x509_svid(&id, &dns, &csr, ttl, renewal_grant.as_ref()).map_err(|e| E::from(e.into()))
        };
        // With a software EC CA key, one verify and one signature take ~60 µs: cheaper on the
        // worker than a hop to the blocking pool and back (docs/performance.md). RSA and HSM
        // keys still sign on the blocking pool.
        let signed = if self.ca.signs_inline() {
            work()
        } else {
            tokio::task::spawn_blocking(work).await.map_err(|_| E::from(CaError::TaskFailed.into()))?
        };
        match signed {
            Ok(issued) => {
                self.audit(req.kind, req.spiffe_id, &issued.serial, issued.not_after, req.caller, "")
                    .await
                    .map_err(|e| E::from(IssueError::Audit(e)))?;
                self.counters.x509.ok();
                // The audit log is the record of every issuance; this line is for debugging.
                debug!(spiffe_id = %LogId(req.spiffe_id), serial = %issued.serial, caller = %redact_join_token(req.caller), "Issued X509-SVID");
                Ok(issued)
            }
            Err(e) => {
                self.deny(req.spiffe_id, req.caller, &e).await;
                self.counters.x509.failed(&e);
                Err(e)
            }
        }
    }

    /// Mints a JWT-SVID and records it durably before returning it.
    pub async fn jwt<E>(
        &self,
        id: &SpiffeId,
        audience: Vec<String>,
        ttl: Option<Duration>,
        caller: &str,
    ) -> Result<IssuedJwt, E>
    where
        E: From<IssueError> + Failure + Send + 'static,
    {
        let refused = if audience.is_empty() || audience.iter().any(String::is_empty) {
            Some(AudienceError::Missing)
        } else {
            tessera_identity::jwt::check_audience(&audience).err().map(|e| AudienceError::Bounds(e.to_string()))
        };
        if let Some(why) = refused {
            let e = E::from(IssueError::Audience(why));
            self.counters.jwt.failed(&e);
            return Err(e);
        }
        let (ca, owned) = (self.ca.clone(), id.clone());
        let minted = match tokio::task::spawn_blocking(move || ca.mint_jwt_svid(&owned, &audience, ttl)).await {
            Ok(Ok(jwt)) => Ok(jwt),
            Ok(Err(e)) => Err(E::from(e.into())),
            Err(_) => Err(E::from(CaError::TaskFailed.into())),
        };
        match minted {
            Ok(jwt) => {
                self.audit(AuditKind::JwtSvid, id, "", jwt.expires_at, caller, "")
                    .await
                    .map_err(|e| E::from(IssueError::Audit(e)))?;
                self.counters.jwt.ok();
                debug!(spiffe_id = %LogId(id), caller = %redact_join_token(caller), "Issued JWT-SVID");
                Ok(jwt)
            }
            Err(e) => {
                self.counters.jwt.failed(&e);
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
    ) -> Result<(), StoreError> {
        let ev = AuditEvent {
            at_ms: self.ca.clock().now().saturating_mul(1000),
            kind,
            spiffe_id: id.to_string(),
            serial: serial.to_owned(),
            not_after,
            caller: caller.to_owned(),
            detail: detail.to_owned(),
        };
        self.store.append_audit(ev).await.map(|_| ())
    }

    /// Records a refusal (best effort: a refusal is returned whether or not it is recorded).
    /// Our own failures are not refusals and are not audited.
    pub async fn deny(&self, id: &SpiffeId, caller: &str, why: &impl Failure) {
        if why.fault() == Fault::Server {
            return;
        }
        let reason = why.to_string();
        warn!(
            spiffe_id = %LogId(id),
            caller = %redact_join_token(caller),
            reason = %redact_join_token(&reason),
            "Refused"
        );
        if let Err(e) = self.audit(AuditKind::Denied, id, "", 0, caller, &reason).await {
            warn!(error = %e, "Cannot audit refusal");
        }
    }
}
