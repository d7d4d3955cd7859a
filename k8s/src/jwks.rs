//! Offline token validation for clusters whose API server Tessera cannot reach: the token's
//! signature is checked against the cluster issuer's JWKS (a file, or a URL such as
//! `<issuer>/openid/v1/jwks`), then its issuer, audience, expiry and not-before.
//!
//! Offline validation cannot see revocation: a token stays valid until it expires even when
//! its pod is deleted. Use short-lived projected tokens (the default is one hour).

use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::Deserialize;
use tessera_identity::jwt::{JwtError, verify_jws};
use tessera_identity::unix_now;

use crate::K8sError;
use crate::token::{ServiceAccountToken, TokenAuthenticator};

/// Clock skew tolerated on `exp` and `nbf`, as the API server does.
const LEEWAY_SECS: i64 = 60;
/// A URL JWKS is fetched again after this long.
const URL_REFRESH: Duration = Duration::from_secs(600);
/// An unknown `kid` fetches the URL again, at most this often.
const URL_MISS_BACKOFF: Duration = Duration::from_secs(30);
/// A JWKS file is checked for changes at most this often.
const FILE_RECHECK: Duration = Duration::from_secs(1);
/// The largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Where the issuer's keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A file, read again when its modification time changes.
    File(PathBuf),
    /// An HTTPS (or, for tests, HTTP) URL.
    Url {
        /// The JWKS URL.
        url: String,
        /// TLS to the URL (roots to trust).
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

#[derive(Default)]
struct Cache {
    keys: Vec<(String, Vec<u8>)>,
    file_mtime: Option<SystemTime>,
    /// The last fetch attempt, successful or not: one failing URL is not asked again per
    /// request.
    fetched: Option<Instant>,
}

/// Validates tokens against a JWKS.
pub struct JwksValidator {
    source: JwksSource,
    issuer: String,
    audiences: Vec<String>,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for JwksValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksValidator")
            .field("source", &self.source)
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    #[serde(default, deserialize_with = "tessera_identity::jwt::one_or_many")]
    aud: Vec<String>,
    exp: i64,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(rename = "kubernetes.io", default)]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    namespace: String,
    serviceaccount: ObjectRef,
    #[serde(default)]
    pod: Option<ObjectRef>,
    #[serde(default)]
    node: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct ObjectRef {
    name: String,
    #[serde(default)]
    uid: String,
}

impl JwksValidator {
    /// A validator for tokens of `issuer` carrying one of `audiences`. The JWKS is read now,
    /// so a missing or malformed document fails at start.
    pub async fn new(source: JwksSource, issuer: String, audiences: Vec<String>) -> Result<Self, K8sError> {
        if audiences.is_empty() {
            return Err(K8sError::Config("offline validation needs at least one audience".into()));
        }
        let v = Self { source, issuer, audiences, cache: Mutex::new(Cache::default()) };
        v.refresh(true).await?;
        Ok(v)
    }

    async fn refresh(&self, force: bool) -> Result<(), K8sError> {
        match &self.source {
            JwksSource::File(path) => {
                // A file is looked at (one stat) at most once a second, not per token.
                let due = {
                    let mut c = self.cache.lock();
                    let due = force || c.fetched.is_none_or(|t| t.elapsed() >= FILE_RECHECK);
                    if due {
                        c.fetched = Some(Instant::now());
                    }
                    due
                };
                if !due {
                    return Ok(());
                }
                let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if !force && self.cache.lock().file_mtime == mtime {
                    return Ok(());
                }
                let doc = std::fs::read(path).map_err(|e| K8sError::Jwks(format!("{}: {e}", path.display())))?;
                let keys = tessera_identity::bundle::jwks_signing_keys(&doc)
                    .map_err(|e| K8sError::Jwks(format!("{}: {e}", path.display())))?;
                {
                    let mut c = self.cache.lock();
                    *c = Cache { keys, file_mtime: mtime, fetched: Some(Instant::now()) };
                }
                Ok(())
            }
            JwksSource::Url { url, tls } => {
                {
                    let mut c = self.cache.lock();
                    c.fetched = Some(Instant::now());
                }
                let parsed = tessera_svc::http::Url::parse(url).map_err(K8sError::Jwks)?;
                let req = tessera_svc::http::Request { method: "GET", url: &parsed, headers: &[], body: Vec::new() };
                let (status, body) = tessera_svc::http::send(req, tls.clone(), MAX_JWKS_BYTES, Duration::from_secs(10))
                    .await
                    .map_err(|e| K8sError::Jwks(format!("{url}: {e}")))?;
                if status != 200 {
                    return Err(K8sError::Jwks(format!("{url} answered HTTP {status}")));
                }
                let keys = tessera_identity::bundle::jwks_signing_keys(&body)
                    .map_err(|e| K8sError::Jwks(format!("{url}: {e}")))?;
                {
                    let mut c = self.cache.lock();
                    *c = Cache { keys, file_mtime: None, fetched: Some(Instant::now()) };
                }
                Ok(())
            }
        }
    }

    fn key_for(&self, kid: Option<&str>) -> Option<Vec<u8>> {
        let c = self.cache.lock();
        match kid {
            Some(k) => c.keys.iter().find(|(id, _)| id == k).map(|(_, spki)| spki.clone()),
            // A token without kid is accepted only when the issuer has a single key.
            None => match c.keys.as_slice() {
                [(_, only)] => Some(only.clone()),
                _ => None,
            },
        }
    }

    fn age(&self) -> Option<Duration> {
        self.cache.lock().fetched.map(|t| t.elapsed())
    }

    fn header_kid(token: &str) -> Option<String> {
        use base64::Engine;
        let h = token.split('.').next()?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(h).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        v.get("kid")?.as_str().map(str::to_owned)
    }
}

fn refused(e: JwtError) -> K8sError {
    K8sError::Unauthenticated(format!("token refused: {e}"))
}

#[async_trait]
impl TokenAuthenticator for JwksValidator {
    async fn authenticate(&self, token: &str) -> Result<ServiceAccountToken, K8sError> {
        match &self.source {
            JwksSource::File(_) => {
                if let Err(e) = self.refresh(false).await {
                    tracing::warn!(error = %e, "Cannot reload the JWKS file; keeping the previous keys");
                }
            }
            JwksSource::Url { .. } => {
                let kid = Self::header_kid(token);
                let stale = self.age().is_none_or(|a| a > URL_REFRESH);
                let unknown = self.key_for(kid.as_deref()).is_none() && self.age().is_none_or(|a| a > URL_MISS_BACKOFF);
                if (stale || unknown)
                    && let Err(e) = self.refresh(true).await
                {
                    tracing::warn!(error = %e, "Cannot fetch the JWKS; keeping the previous keys");
                }
            }
        }
        let payload = verify_jws(token, |kid| {
            self.key_for(kid).ok_or_else(|| match kid {
                Some(k) => JwtError::UnknownKey(k.to_owned()),
                None => JwtError::MissingKeyId,
            })
        })
        .map_err(refused)?;
        let claims: Claims = serde_json::from_slice(&payload)
            .map_err(|_| K8sError::Unauthenticated("token claims are not a Kubernetes service account token".into()))?;
        if claims.iss != self.issuer {
            return Err(K8sError::Unauthenticated(format!(
                "token issuer {:?} is not the cluster's issuer {:?}",
                claims.iss, self.issuer
            )));
        }
        let now = unix_now();
        if claims.exp + LEEWAY_SECS <= now {
            return Err(refused(JwtError::Expired));
        }
        if claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECS) {
            return Err(K8sError::Unauthenticated("token is not valid yet (nbf)".into()));
        }
        if !claims.aud.iter().any(|a| self.audiences.contains(a)) {
            return Err(K8sError::Unauthenticated(format!(
                "token is not valid for audience {:?}",
                self.audiences.join(",")
            )));
        }
        let mut sat = ServiceAccountToken::from_username(&claims.sub)?;
        if let Some(k) = claims.kubernetes {
            if k.namespace != sat.namespace || k.serviceaccount.name != sat.service_account {
                return Err(K8sError::Unauthenticated("token subject and kubernetes.io claims disagree".into()));
            }
            sat.pod_name = k.pod.as_ref().map(|p| p.name.clone());
            sat.pod_uid = k.pod.map(|p| p.uid).filter(|u| !u.is_empty());
            sat.node_name = k.node.as_ref().map(|n| n.name.clone());
            sat.node_uid = k.node.map(|n| n.uid).filter(|u| !u.is_empty());
        }
        Ok(sat)
    }
}
