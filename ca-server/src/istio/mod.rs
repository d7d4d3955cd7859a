//! Istio's CA API: `istio.v1.auth.IstioCertificateService/CreateCertificate`, so that
//! istio-agent and ztunnel get their workload certificates from Tessera instead of istiod.
//!
//! A caller is authenticated by, first success wins: a client certificate (an unexpired SVID
//! `spiffe://<td>/ns/<ns>/sa/<sa>` that this API issued on a token, for renewal); a
//! Kubernetes service-account token
//! (`authorization: Bearer`), validated for the cluster the `clusterid` header names, online
//! by TokenReview or offline against the issuer's JWKS. The certificate is for
//! `spiffe://<td>/ns/<ns>/sa/<sa>`, and the CSR must ask for exactly that URI SAN and nothing
//! else. A trusted node account (ztunnel) may ask for another service account's identity
//! (`metadata.ImpersonatedIdentity`) when that account has a pod on the caller's node.
//!
//! Renewal by certificate is bounded by the token it started from: a certificate issued on a
//! token (for the caller's own identity) carries a [`RenewalGrant`] naming when the token was
//! checked and the pod it was bound to; presenting it renews only while that pod exists and
//! for `certificate_renewal_max_age` after the check, and the renewed certificate carries the
//! same grant. Certificates an agent obtained (Agent API) or that were issued by impersonation
//! carry none and renew nothing here, so banning or evicting an agent, or deleting an entry,
//! leaves no path that keeps renewing what it obtained.
//!
//! What it is not: no istiod features (no XDS, no `istio-ca-root-cert` here: see
//! `tessera_k8s::publish`).

pub mod config;
mod node_pods;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tessera_identity::SpiffeId;
use tessera_identity::csr::{CheckedCsr, CsrError};
use tessera_identity::x509::{PodRef, RenewalGrant};
use tessera_k8s::cache::CachedAuthenticator;
use tessera_k8s::jwks::{JwksSource, JwksValidator};
use tessera_k8s::review::TokenReviewer;
use tessera_k8s::token::parse_istio_identity;
use tessera_k8s::{ClusterClient, ServiceAccountToken, TokenAuthenticator};
use tessera_proto::istio::v1::auth as pb;
use tessera_proto::istio::v1::auth::istio_certificate_service_server::IstioCertificateService;
use tonic::{Request, Response, Status};
use tracing::warn;

use self::config::{IstioCluster, IstioConfig, TokenValidation};
use crate::api::{ApiError, Shared};
use tessera_ca::{Issuance, X509Request};
use tessera_store::AuditKind;

/// The metadata key ztunnel sets to ask for another workload's certificate.
const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The header naming the caller's cluster.
const CLUSTER_ID_HEADER: &str = "clusterid";
/// A token that passed is not checked again for this long (the kube-apiserver's own cache
/// of successful token authentications lasts as long), nor past its `exp`.
const TOKEN_CACHE_TTL: Duration = tessera_k8s::cache::DEFAULT_TTL;
/// Tokens remembered at most, per cluster.
const TOKEN_CACHE_CAPACITY: usize = tessera_k8s::cache::DEFAULT_CAPACITY;

/// One cluster: how its tokens are validated, and its API server when reachable.
struct Cluster {
    id: String,
    tokens: Arc<dyn TokenAuthenticator>,
    api: Option<kube::Client>,
    /// Service accounts with a live pod on a node, shared by concurrent impersonations.
    node_accounts: node_pods::NodeAccounts,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("id", &self.id).field("api", &self.api.is_some()).finish_non_exhaustive()
    }
}

/// Who called.
#[derive(Debug)]
struct Caller {
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    id: SpiffeId,
    namespace: String,
    service_account: String,
    /// Set when authenticated by token: the token's facts and its cluster.
    token: Option<(ServiceAccountToken, usize)>,
    /// What a certificate issued to this caller for its own identity may renew: a new grant
    /// for a token, the presented certificate's grant for a renewal.
    grant: RenewalGrant,
    /// For the audit log.
    label: String,
}

/// Why the Istio CA API cannot start (a cluster's kubeconfig or JWKS).
#[derive(Debug, thiserror::Error)]
#[error("istio: {0}")]
pub struct IstioStartError(String);

/// The Istio CA service.
#[derive(Debug, Clone)]
pub struct IstioCa {
    issuance: Issuance,
    metrics: Arc<crate::metrics::Metrics>,
    cfg: Arc<IstioConfig>,
    clusters: Arc<Vec<Cluster>>,
    limit: Arc<crate::api::limits::RateLimiter<std::net::IpAddr>>,
    /// This trust domain's own CAs (every replica's journal) by authority ID, and when they
    /// were last read: only a certificate one of them signed may carry a renewal grant.
    own: Arc<parking_lot::Mutex<OwnAuthorities>>,
}

/// Own CA certificates (DER) by authority ID, and when they were read.
type OwnAuthorities = (Option<std::time::Instant>, std::collections::HashMap<String, Vec<u8>>);

/// How often the set of own authorities is read again when a certificate names another.
const OWN_AUTHORITIES_REFRESH: Duration = Duration::from_secs(5);
/// How far in the future a grant's time may be (clock skew between replicas).
const GRANT_SKEW_SECS: i64 = 300;

async fn build_cluster(c: &IstioCluster) -> Result<Cluster, IstioStartError> {
    let bad = |e: tessera_k8s::K8sError| IstioStartError(format!("cluster {}: {e}", c.cluster_id));
    let api = match (&c.validation, &c.kubeconfig) {
        (TokenValidation::TokenReview, kc) => Some(tessera_k8s::connect(kc.as_deref()).await.map_err(bad)?),
        (TokenValidation::Jwks { .. }, Some(kc)) => Some(tessera_k8s::connect(Some(kc)).await.map_err(bad)?),
        (TokenValidation::Jwks { .. }, None) => None,
    };
    let tokens: Arc<dyn TokenAuthenticator> = match &c.validation {
        TokenValidation::TokenReview => {
            let client = api.clone().ok_or_else(|| IstioStartError("unreachable".into()))?;
            Arc::new(CachedAuthenticator::new(
                TokenReviewer::new(ClusterClient { name: c.cluster_id.clone(), client }, c.audiences.clone()),
                TOKEN_CACHE_TTL,
                TOKEN_CACHE_CAPACITY,
            ))
        }
        TokenValidation::Jwks { path, url, ca_file, issuer } => {
            let source = match (path, url) {
                (Some(p), _) => JwksSource::File(p.clone()),
                (None, Some(u)) => {
                    let roots =
                        std::fs::read(ca_file.as_deref().unwrap_or(tessera_identity::tls::SYSTEM_CA_FILE.as_ref()))
                            .map_err(|e| IstioStartError(format!("cluster {}: JWKS CA file: {e}", c.cluster_id)))?;
                    let tls = tessera_identity::tls::web_client_config(&roots)
                        .map_err(|e| IstioStartError(format!("cluster {}: JWKS CA file: {e}", c.cluster_id)))?;
                    JwksSource::Url { url: u.clone(), tls: Some(Arc::new(tls)) }
                }
                (None, None) => return Err(IstioStartError(format!("cluster {}: no JWKS source", c.cluster_id))),
            };
            Arc::new(CachedAuthenticator::new(
                JwksValidator::new(source, issuer.clone(), c.audiences.clone()).await.map_err(bad)?,
                TOKEN_CACHE_TTL,
                TOKEN_CACHE_CAPACITY,
            ))
        }
    };
    Ok(Cluster { id: c.cluster_id.clone(), tokens, api, node_accounts: Default::default() })
}

fn csr_refusal(e: CsrError) -> ApiError {
    match e {
        CsrError::TooLarge(_) | CsrError::Malformed | CsrError::BadSignature | CsrError::UnsupportedKey(_) => {
            ApiError::InvalidArgument(e.to_string())
        }
        _ => ApiError::PermissionDenied(e.to_string()),
    }
}

/// The strict CSR check (as istio-csr): exactly the identity as URI SAN, no other SAN.
fn strict_csr(der: &[u8], id: &SpiffeId) -> Result<CheckedCsr, ApiError> {
    let csr = CheckedCsr::from_der(der).map_err(csr_refusal)?;
    csr.check_names(id, &[]).map_err(csr_refusal)?;
    if csr.uris().is_empty() {
        return Err(ApiError::PermissionDenied(format!("CSR must ask for URI SAN {id}")));
    }
    Ok(csr)
}

/// The identity a request asks to impersonate (`metadata.ImpersonatedIdentity`), if any.
fn impersonated(metadata: Option<&prost_types::Struct>) -> Option<&str> {
    metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)).and_then(|v| match &v.kind {
        Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    })
}

fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let v = req.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

impl IstioCa {
    /// Connects to every configured cluster (or reads its JWKS).
    /// `rate_per_second` bounds requests per client IP address (0: unlimited), before any
    /// token is reviewed.
    pub async fn new(shared: Shared, cfg: IstioConfig, rate_per_second: f64) -> Result<Self, IstioStartError> {
        let mut clusters = Vec::with_capacity(cfg.clusters.len());
        for c in &cfg.clusters {
            clusters.push(build_cluster(c).await?);
        }
        let limit = crate::api::limits::RateLimiter::new(rate_per_second, rate_per_second.max(1.0));
        Ok(Self {
            issuance: shared.issuance,
            metrics: shared.metrics,
            cfg: Arc::new(cfg),
            clusters: Arc::new(clusters),
            limit: Arc::new(limit),
            own: Arc::default(),
        })
    }

    fn td(&self) -> &tessera_identity::TrustDomain {
        self.issuance.ca.trust_domain()
    }

    /// The caller from its client certificate, when it presented an Istio identity of ours
    /// that this API issued on a token, and the grant it carries still holds.
    async fn by_certificate<T>(&self, req: &Request<T>) -> Result<Option<Caller>, ApiError> {
        let Some(certs) = req.extensions().get::<crate::api::tls::PeerCerts>().and_then(|p| p.0.clone()) else {
            return Ok(None);
        };
        let Some(leaf) = certs.first() else { return Ok(None) };
        let facts = tessera_identity::x509::cert_facts(leaf).map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        // The handshake checked the chain once; a long-lived connection must not outlive the
        // certificate, and a tainted authority's certificates renew nothing.
        if facts.not_after <= tessera_identity::unix_now() {
            return Err(ApiError::Unauthenticated("the client certificate has expired".into()));
        }
        if facts.authority_key_id.as_ref().is_some_and(|aki| self.issuance.ca.tainted_authority_ids().contains(aki)) {
            return Err(ApiError::Unauthenticated(
                "the client certificate was issued by a tainted authority: authenticate with a token".into(),
            ));
        }
        let Some(id) = facts.spiffe_id() else { return Ok(None) };
        let Some((ns, sa)) = parse_istio_identity(&id, self.td()).map(|(n, s)| (n.to_owned(), s.to_owned())) else {
            return Ok(None);
        };
        let grant = facts.renewal_grant.ok_or_else(|| {
            ApiError::Unauthenticated(
                "the client certificate was not issued by this API on a service-account token, so it renews nothing here: authenticate with a token".into(),
            )
        })?;
        self.check_issuer(leaf, facts.authority_key_id.as_deref()).await?;
        self.check_grant(&grant).await?;
        Ok(Some(Caller {
            label: format!("istio:cert:{id}"),
            id,
            namespace: ns,
            service_account: sa,
            token: None,
            grant,
        }))
    }

    /// Whether a renewal grant still holds: within `certificate_renewal_max_age` of its token,
    /// and, when the token was bound to a pod of a cluster we can ask, that pod still exists.
    /// Refuses a certificate that none of our own CAs (this replica's or another's) issued:
    /// a downstream (nested) server's CA chains to our roots too, but a grant it wrote proves
    /// nothing here.
    async fn check_issuer(&self, leaf: &[u8], aki: Option<&str>) -> Result<(), ApiError> {
        let refused = || {
            ApiError::Unauthenticated(
                "the client certificate was not issued by this trust domain's own CA (a downstream CA's certificates renew nothing here): authenticate with a token".into(),
            )
        };
        let aki = aki.ok_or_else(refused)?;
        // The authority key ID is only what the signer wrote: the signature is checked
        // against that authority's own certificate.
        let signed = |own: &std::collections::HashMap<String, Vec<u8>>| {
            own.get(aki).is_some_and(|ca| tessera_identity::x509::signed_by(leaf, ca))
        };
        let cached = {
            let o = self.own.lock();
            (signed(&o.1), o.0)
        };
        match cached {
            (true, _) => return Ok(()),
            (false, Some(at)) if at.elapsed() < OWN_AUTHORITIES_REFRESH => return Err(refused()),
            _ => {}
        }
        let mut own: std::collections::HashMap<String, Vec<u8>> =
            self.issuance.ca.x509_authorities().into_iter().map(|a| (a.authority_id, a.certificate)).collect();
        for (_, journal) in self.issuance.store.list_journals().await? {
            for e in journal.x509 {
                use base64::Engine;
                let der = e.chain.first().and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok());
                if let Some(der) = der {
                    own.entry(e.authority_id).or_insert(der);
                }
            }
        }
        let ok = signed(&own);
        {
            let mut o = self.own.lock();
            *o = (Some(std::time::Instant::now()), own);
        }
        if ok { Ok(()) } else { Err(refused()) }
    }

    async fn check_grant(&self, g: &RenewalGrant) -> Result<(), ApiError> {
        if g.authorized_at > tessera_identity::unix_now() + GRANT_SKEW_SECS {
            return Err(ApiError::Unauthenticated("the certificate's renewal grant is dated in the future".into()));
        }
        let age = tessera_identity::unix_now().saturating_sub(g.authorized_at);
        if age > i64::try_from(self.cfg.certificate_renewal_max_age.as_secs()).unwrap_or(i64::MAX) {
            return Err(ApiError::Unauthenticated(format!(
                "the token behind this certificate was checked {age}s ago, over istio.certificate_renewal_max_age: authenticate with a token"
            )));
        }
        let Some(cluster) = self.clusters.iter().find(|c| c.id == g.cluster) else {
            return Err(ApiError::Unauthenticated(format!(
                "the certificate was granted for cluster {:?}, which is no longer configured",
                g.cluster
            )));
        };
        if let (Some(pod), Some(api)) = (&g.pod, &cluster.api) {
            let found = Api::<Pod>::namespaced(api.clone(), &pod.namespace)
                .get_opt(&pod.name)
                .await
                .map_err(|e| cluster_unavailable(&cluster.id, &e))?;
            let live = found
                .is_some_and(|p| p.metadata.uid.as_deref() == Some(pod.uid.as_str()) && tessera_k8s::pod_is_live(&p));
            if !live {
                return Err(ApiError::Unauthenticated(format!(
                    "the pod {}/{} this certificate was granted to is gone: authenticate with a token",
                    pod.namespace, pod.name
                )));
            }
        }
        Ok(())
    }

    /// The caller from its service-account token and `clusterid` header.
    async fn by_token<T>(&self, req: &Request<T>, token: &str) -> Result<Caller, ApiError> {
        let header = req.metadata().get(CLUSTER_ID_HEADER).and_then(|v| v.to_str().ok()).filter(|s| !s.is_empty());
        let index = match header {
            Some(name) => self.clusters.iter().position(|c| c.id == name).ok_or_else(|| {
                let known: Vec<&str> = self.clusters.iter().map(|c| c.id.as_str()).collect();
                ApiError::Unauthenticated(format!(
                    "cluster {name:?} (clusterid header) is not configured; known clusters: {}",
                    known.join(", ")
                ))
            })?,
            None if self.clusters.len() == 1 => 0,
            None => {
                return Err(ApiError::Unauthenticated(
                    "no clusterid header, and several clusters are configured: name the caller's cluster".into(),
                ));
            }
        };
        let cluster = &self.clusters[index];
        let sat = cluster.tokens.authenticate(token).await.map_err(|e| match e {
            tessera_k8s::K8sError::Unauthenticated(m) => {
                ApiError::Unauthenticated(format!("cluster {}: {m}", cluster.id))
            }
            other => cluster_unavailable(&cluster.id, &format!("cannot validate the token: {other}")),
        })?;
        let id = sat.istio_identity(self.td()).map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        let pod = match (&sat.pod_name, &sat.pod_uid) {
            (Some(name), Some(uid)) => {
                Some(PodRef { namespace: sat.namespace.clone(), name: name.clone(), uid: uid.clone() })
            }
            _ => None,
        };
        let grant = RenewalGrant { authorized_at: tessera_identity::unix_now(), cluster: cluster.id.clone(), pod };
        Ok(Caller {
            label: format!("istio:{}:{}/{}", cluster.id, sat.namespace, sat.service_account),
            id,
            namespace: sat.namespace.clone(),
            service_account: sat.service_account.clone(),
            token: Some((sat, index)),
            grant,
        })
    }

    async fn authenticate<T>(&self, req: &Request<T>, impersonating: bool) -> Result<Caller, ApiError> {
        let cert = if self.cfg.certificate_auth { self.by_certificate(req).await } else { Ok(None) };
        // Impersonation needs the node the token is bound to: prefer the token then.
        if impersonating && let Some(token) = bearer(req) {
            return self.by_token(req, token).await;
        }
        if let Ok(Some(c)) = cert {
            return Ok(c);
        }
        match bearer(req) {
            Some(token) => self.by_token(req, token).await,
            None => Err(ApiError::Unauthenticated(match cert {
                Err(e) => format!("client certificate refused ({e}) and no bearer token"),
                _ => "no client certificate with a workload identity and no bearer token (authorization: Bearer <service account token>)".into(),
            })),
        }
    }

    /// The identity to issue: the caller's, or the impersonated one when the caller may.
    async fn target(&self, caller: &Caller, metadata: Option<&prost_types::Struct>) -> Result<SpiffeId, ApiError> {
        let Some(asked) = impersonated(metadata) else { return Ok(caller.id.clone()) };
        let trusted = self
            .cfg
            .trusted_node_accounts
            .iter()
            .any(|(ns, sa)| *ns == caller.namespace && *sa == caller.service_account);
        if !trusted {
            return Err(ApiError::PermissionDenied(format!(
                "{} may not impersonate: it is not in istio.trusted_node_accounts",
                caller.id
            )));
        }
        let target = SpiffeId::new(asked)
            .map_err(|e| ApiError::InvalidArgument(format!("ImpersonatedIdentity {asked:?}: {e}")))?;
        if target == caller.id {
            return Ok(target);
        }
        let (ns, sa) = parse_istio_identity(&target, self.td()).ok_or_else(|| {
            ApiError::PermissionDenied(format!(
                "ImpersonatedIdentity {target} is not spiffe://{}/ns/<ns>/sa/<sa>",
                self.td()
            ))
        })?;
        let Some((sat, index)) = &caller.token else {
            return Err(ApiError::PermissionDenied(
                "impersonation needs the node agent's service-account token (its node is not known otherwise)".into(),
            ));
        };
        let cluster = &self.clusters[*index];
        let Some(api) = &cluster.api else {
            return Err(ApiError::PermissionDenied(format!(
                "cluster {} has no API server access (kubeconfig); impersonation cannot be checked",
                cluster.id
            )));
        };
        let node = match (&sat.node_name, &sat.pod_name) {
            (Some(n), _) => n.clone(),
            (None, Some(pod)) => Api::<Pod>::namespaced(api.clone(), &sat.namespace)
                .get_opt(pod)
                .await
                .map_err(|e| cluster_unavailable(&cluster.id, &e))?
                .filter(|p| sat.pod_uid.is_none() || p.metadata.uid == sat.pod_uid)
                .and_then(|p| p.spec.and_then(|s| s.node_name))
                .ok_or_else(|| {
                    ApiError::PermissionDenied(format!("the caller's pod {pod} is gone or not on a node"))
                })?,
            (None, None) => {
                return Err(ApiError::PermissionDenied(
                    "the node agent's token is not bound to a pod; its node is unknown".into(),
                ));
            }
        };
        let list = || async {
            let pods = Api::<Pod>::namespaced(api.clone(), ns)
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
                .map_err(|e| format!("listing pods: {e}"))?;
            Ok::<_, String>(
                pods.items
                    .iter()
                    .filter(|p| tessera_k8s::pod_is_live(p))
                    .filter_map(|p| p.spec.as_ref())
                    .filter(|s| s.node_name.as_deref() == Some(node.as_str()))
                    .map(|s| s.service_account_name.clone().unwrap_or_else(|| "default".into()))
                    .collect(),
            )
        };
        let on_node =
            cluster.node_accounts.has(ns, &node, sa, list).await.map_err(|m| cluster_unavailable(&cluster.id, &m))?;
        if !on_node {
            return Err(ApiError::PermissionDenied(format!(
                "service account {ns}/{sa} has no pod on node {node}; {} may not impersonate it",
                caller.id
            )));
        }
        Ok(target)
    }

    fn ttl(&self, requested: i64) -> Result<Duration, ApiError> {
        if requested <= 0 {
            return Ok(self.cfg.default_ttl);
        }
        let asked = Duration::from_secs(requested.unsigned_abs());
        if asked > self.cfg.max_ttl {
            return Err(ApiError::InvalidArgument(format!(
                "requested TTL {}s is over the maximum {}s (istio.max_workload_cert_ttl)",
                requested,
                self.cfg.max_ttl.as_secs()
            )));
        }
        Ok(asked)
    }

    /// Leaf and intermediates, then one last element holding every root of our bundle,
    /// PEM-concatenated, the root that signed this chain first. Istio's clients (istio-agent,
    /// ztunnel) take their peer trust store from that last element, so during a CA rotation
    /// it must hold the prepared, active and old roots alike, as istiod's does.
    fn response_chain(&self, chain: &[Vec<u8>]) -> Result<Vec<String>, ApiError> {
        let bundle = self.issuance.ca.bundle();
        let is_root = |c: &[u8]| bundle.x509_authorities.iter().any(|r| r.as_ref() == c);
        // The chain without its root (a self-signed CA's chain ends in it).
        let path: Vec<&Vec<u8>> = chain.iter().filter(|c| !is_root(c)).collect();
        let last = path.last().ok_or_else(|| ApiError::Internal("chain without a leaf".into()))?;
        let aki =
            tessera_identity::x509::cert_facts(last).map_err(|e| ApiError::Internal(e.to_string()))?.authority_key_id;
        if bundle.x509_authorities.is_empty() {
            return Err(ApiError::Unavailable("the bundle holds no root yet".into()));
        }
        // The signing root first when it can be told (by its key identifier); an upstream root
        // without one still goes in, with the others.
        let signing = bundle
            .x509_authorities
            .iter()
            .position(|r| {
                aki.is_some() && tessera_identity::x509::cert_facts(r).ok().and_then(|f| f.subject_key_id) == aki
            })
            .unwrap_or(0);
        let mut roots = String::new();
        if let Some(r) = bundle.x509_authorities.get(signing) {
            roots.push_str(&tessera_identity::pem::encode("CERTIFICATE", r));
        }
        for (i, r) in bundle.x509_authorities.iter().enumerate() {
            if i != signing {
                roots.push_str(&tessera_identity::pem::encode("CERTIFICATE", r));
            }
        }
        let mut out: Vec<String> = path.iter().map(|c| tessera_identity::pem::encode("CERTIFICATE", c)).collect();
        out.push(roots);
        Ok(out)
    }

    async fn create(
        &self,
        req: Request<pb::IstioCertificateRequest>,
    ) -> Result<pb::IstioCertificateResponse, ApiError> {
        if let Some(ip) = req.extensions().get::<crate::api::tls::PeerCerts>().and_then(|p| p.1)
            && !self.limit.check(&ip, 1.0)
        {
            self.metrics.rate_limited_svids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ApiError::ResourceExhausted(format!("too many certificate requests from {ip}; retry later")));
        }
        let impersonating =
            req.get_ref().metadata.as_ref().is_some_and(|m| m.fields.contains_key(IMPERSONATED_IDENTITY));
        let caller = self.authenticate(&req, impersonating).await?;
        let r = req.into_inner();
        let target = match self.target(&caller, r.metadata.as_ref()).await {
            Ok(t) => t,
            Err(e) => {
                // Recorded under the identity asked for, with the caller beside it, so that
                // "who tried to get this workload's certificate" has an answer.
                let asked = impersonated(r.metadata.as_ref()).and_then(|s| SpiffeId::new(s).ok());
                self.issuance.deny(asked.as_ref().unwrap_or(&caller.id), &caller.label, &e).await;
                return Err(e);
            }
        };
        // Only a certificate for the caller's own identity can be renewed by presenting it.
        let grant = (target == caller.id).then(|| caller.grant.clone());
        let ttl = self.ttl(r.validity_duration)?;
        let der = tessera_identity::pem::decode_csr(r.csr.as_bytes())
            .map_err(|e| ApiError::InvalidArgument(format!("csr: {e}")))?;
        let issued = self
            .issuance
            .x509_with(
                X509Request {
                    spiffe_id: &target,
                    dns_names: &[],
                    ttl: Some(ttl),
                    caller: &caller.label,
                    kind: AuditKind::X509Svid,
                },
                grant,
                move |id, _| strict_csr(&der, id),
            )
            .await?;
        Ok(pb::IstioCertificateResponse { cert_chain: self.response_chain(&issued.chain)? })
    }
}

#[tonic::async_trait]
impl IstioCertificateService for IstioCa {
    async fn create_certificate(
        &self,
        req: Request<pb::IstioCertificateRequest>,
    ) -> Result<Response<pb::IstioCertificateResponse>, Status> {
        match self.create(req).await {
            Ok(r) => Ok(Response::new(r)),
            Err(e) => {
                if matches!(e, ApiError::Unauthenticated(_)) {
                    warn!(reason = %e, "Istio CA: caller not authenticated");
                }
                Err(e.into())
            }
        }
    }
}

/// A cluster's API server failed: the peer is told so, the log gets the detail.
fn cluster_unavailable(cluster: &str, e: &dyn std::fmt::Display) -> ApiError {
    ApiError::Backend { what: crate::api::status::CLUSTER_UNAVAILABLE, detail: format!("cluster {cluster}: {e}") }
}
