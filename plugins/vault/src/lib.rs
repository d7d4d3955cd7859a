//! The `vault` upstream authority: the PKI secrets engine of HashiCorp Vault or OpenBao signs
//! Tessera's intermediate CA, so the root key stays in Vault.
//!
//! Calls (Vault HTTP API v1): `POST <mount>/root/sign-intermediate` (or
//! `<mount>/issuer/<ref>/sign-intermediate`) with our CSR and `use_csr_values`; the roots are
//! the self-signed issuers of the mount (`LIST <mount>/issuers`, `GET <mount>/issuer/<id>/json`),
//! so a root added with `<mount>/root/rotate/...` reaches our bundle at the next rotation
//! check, before Vault's default issuer is switched to it. Authentication: a token, an
//! AppRole login, or a Kubernetes login with a service account token; tokens with a lease
//! are renewed (`auth/token/renew-self`) at two thirds of their lease and logged in again
//! when renewal fails.
//!
//! Its configuration section is its own ([`settings`]): parsed and checked here, secrets read
//! at start.
//!
//! What it is not: no Vault agent integration, no response wrapping.
//! The HTTP client is `tessera_svc::http` over rustls with ring: one TLS stack in the
//! process.

#![forbid(unsafe_code)]

pub mod settings;

pub use settings::{RawVaultSettings, VaultAuthSettings, VaultSettings};

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{Value, json};
use tessera_plugins::{MintedX509Ca, UpstreamAuthority, UpstreamError};
use tessera_svc::http::{Request, Url};
use x509_parser::prelude::{FromDer, X509Certificate};

const NAME: &str = "vault";
const MAX_BODY: usize = 4 * 1024 * 1024;

/// How to log in.
#[derive(Clone, PartialEq, Eq)]
pub enum VaultAuth {
    /// A token (`X-Vault-Token`).
    Token(tessera_identity::Secret),
    /// Kubernetes login at `auth/<mount>/login` with a service account token, read from
    /// `token_path` at every login (projected tokens rotate).
    Kubernetes {
        /// The auth mount, usually `kubernetes`.
        mount: String,
        /// The Vault role.
        role: String,
        /// The service account token file.
        token_path: PathBuf,
    },
    /// AppRole login at `auth/<mount>/login`.
    AppRole {
        /// The auth mount, usually `approle`.
        mount: String,
        /// The role ID.
        role_id: String,
        /// The secret ID.
        secret_id: tessera_identity::Secret,
    },
}

impl fmt::Debug for VaultAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VaultAuth::Token(_) => f.write_str("Token(<redacted>)"),
            VaultAuth::Kubernetes { mount, role, token_path } => f
                .debug_struct("Kubernetes")
                .field("mount", mount)
                .field("role", role)
                .field("token_path", token_path)
                .finish(),
            VaultAuth::AppRole { mount, role_id, .. } => f
                .debug_struct("AppRole")
                .field("mount", mount)
                .field("role_id", role_id)
                .field("secret_id", &"<redacted>")
                .finish(),
        }
    }
}

/// The `vault` upstream's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    /// `http(s)://host:port` of Vault.
    pub address: String,
    /// The PKI mount, e.g. `pki`.
    pub pki_mount: String,
    /// Sign with this issuer instead of the mount's default.
    pub issuer_ref: Option<String>,
    /// `X-Vault-Namespace` (Vault Enterprise, OpenBao namespaces).
    pub namespace: Option<String>,
    /// PEM trust anchors for Vault's TLS certificate; the system bundle when `None`.
    pub ca_cert_file: Option<PathBuf>,
    /// How to log in.
    pub auth: VaultAuth,
    /// Deadline of each call.
    pub timeout: Duration,
}

struct Token {
    value: String,
    lease: Option<Duration>,
    obtained: Instant,
    renewable: bool,
}

/// The `vault` upstream authority.
pub struct VaultUpstream {
    cfg: VaultConfig,
    base: Url,
    tls: Option<Arc<rustls::ClientConfig>>,
    token: tokio::sync::Mutex<Option<Token>>,
}

impl fmt::Debug for VaultUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultUpstream").field("address", &self.cfg.address).field("mount", &self.cfg.pki_mount).finish()
    }
}

fn cfg_err(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Config { upstream: NAME, reason: reason.into() }
}

fn sign_err(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Signing { upstream: NAME, reason: reason.into() }
}

fn self_signed(der: &[u8]) -> bool {
    X509Certificate::from_der(der).is_ok_and(|(_, c)| c.subject().as_raw() == c.issuer().as_raw())
}

fn pem_certs(pem: &str) -> Result<Vec<Vec<u8>>, UpstreamError> {
    Ok(tessera_identity::pem::decode_certs(pem.as_bytes())
        .map_err(|e| sign_err(format!("Vault returned bad PEM: {e}")))?
        .into_iter()
        .map(|c| c.to_vec())
        .collect())
}

impl VaultUpstream {
    /// Checks the settings (no call is made until the first use).
    pub fn new(cfg: VaultConfig) -> Result<Self, UpstreamError> {
        let base = Url::parse(&cfg.address).map_err(cfg_err)?;
        let tls = if base.tls {
            let path = cfg.ca_cert_file.clone().unwrap_or_else(|| tessera_identity::tls::SYSTEM_CA_FILE.into());
            let pem = std::fs::read(&path).map_err(|e| cfg_err(format!("cannot read {}: {e}", path.display())))?;
            Some(Arc::new(tessera_identity::tls::web_client_config(&pem).map_err(|e| cfg_err(e.to_string()))?))
        } else {
            None
        };
        if cfg.pki_mount.is_empty() || cfg.pki_mount.contains("..") {
            return Err(cfg_err("pki_mount must name a mount"));
        }
        Ok(Self { cfg, base, tls, token: tokio::sync::Mutex::new(None) })
    }

    /// One API call; `Null` for an empty answer. Vault's error messages are passed on.
    async fn call(&self, method: &str, path: &str, body: Option<Value>, token: Option<&str>) -> Result<Value, String> {
        let url = self.base.with_path(&format!("/v1/{path}"));
        let mut headers: Vec<(&str, &str)> = Vec::new();
        if let Some(t) = token {
            headers.push(("x-vault-token", t));
        }
        if let Some(ns) = &self.cfg.namespace {
            headers.push(("x-vault-namespace", ns));
        }
        let req = Request {
            method,
            url: &url,
            headers: &headers,
            body: body.map(|b| b.to_string().into_bytes()).unwrap_or_default(),
        };
        let (status, bytes) = tessera_svc::http::send(req, self.tls.clone(), MAX_BODY, self.cfg.timeout).await?;
        let v: Value =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        if !(200..300).contains(&status) {
            let errors =
                v["errors"].as_array().map(|e| e.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("; "));
            return Err(format!("{method} /v1/{path}: HTTP {status}: {}", errors.unwrap_or_default()));
        }
        Ok(v)
    }

    async fn login(&self) -> Result<Token, UpstreamError> {
        match &self.cfg.auth {
            VaultAuth::Token(t) => {
                // Learn whether the token has a lease to renew.
                let v = self.call("GET", "auth/token/lookup-self", None, Some(t.expose())).await.map_err(cfg_err)?;
                let ttl = v["data"]["ttl"].as_u64().unwrap_or(0);
                Ok(Token {
                    value: t.expose().to_owned(),
                    lease: (ttl > 0).then(|| Duration::from_secs(ttl)),
                    obtained: Instant::now(),
                    renewable: v["data"]["renewable"].as_bool().unwrap_or(false),
                })
            }
            VaultAuth::AppRole { mount, role_id, secret_id } => {
                self.login_at(mount, json!({"role_id": role_id, "secret_id": secret_id.expose()}), "AppRole").await
            }
            VaultAuth::Kubernetes { mount, role, token_path } => {
                let jwt = std::fs::read_to_string(token_path).map_err(|e| {
                    cfg_err(format!("cannot read the service account token {}: {e}", token_path.display()))
                })?;
                self.login_at(mount, json!({"role": role, "jwt": jwt.trim()}), "Kubernetes").await
            }
        }
    }

    /// `POST auth/<mount>/login` with `body`; the answer's client token and lease.
    async fn login_at(&self, mount: &str, body: Value, method: &str) -> Result<Token, UpstreamError> {
        let v = self
            .call("POST", &format!("auth/{mount}/login"), Some(body), None)
            .await
            .map_err(|e| cfg_err(format!("{method} login failed: {e}")))?;
        let auth = &v["auth"];
        let value =
            auth["client_token"].as_str().ok_or_else(|| cfg_err(format!("{method} login returned no token")))?;
        let lease = auth["lease_duration"].as_u64().unwrap_or(0);
        tracing::info!(lease_seconds = lease, "Logged in to Vault with {method}");
        Ok(Token {
            value: value.to_owned(),
            lease: (lease > 0).then(|| Duration::from_secs(lease)),
            obtained: Instant::now(),
            renewable: auth["renewable"].as_bool().unwrap_or(false),
        })
    }

    /// A usable token: renewed at two thirds of its lease, or a fresh login.
    async fn token(&self) -> Result<String, UpstreamError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_mut() {
            match t.lease {
                None => return Ok(t.value.clone()),
                Some(l) if t.obtained.elapsed() < l * 2 / 3 => return Ok(t.value.clone()),
                Some(_) if t.renewable => {
                    match self.call("POST", "auth/token/renew-self", Some(json!({})), Some(&t.value)).await {
                        Ok(v) => {
                            let lease = v["auth"]["lease_duration"].as_u64().unwrap_or(0);
                            t.lease = (lease > 0).then(|| Duration::from_secs(lease));
                            t.obtained = Instant::now();
                            tracing::info!(lease_seconds = lease, "Vault token renewed");
                            return Ok(t.value.clone());
                        }
                        Err(e) => tracing::warn!(error = %e, "Vault token renewal failed; logging in again"),
                    }
                }
                Some(_) => {}
            }
        }
        let t = self.login().await?;
        let v = t.value.clone();
        *slot = Some(t);
        Ok(v)
    }

    /// An authenticated call; a 403 (token revoked or expired early) gets one fresh login.
    async fn authed(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let t = self.token().await.map_err(|e| e.to_string())?;
        match self.call(method, path, body.clone(), Some(&t)).await {
            Err(e) if e.contains("HTTP 403") && !matches!(self.cfg.auth, VaultAuth::Token(_)) => {
                *self.token.lock().await = None;
                let t = self.token().await.map_err(|e| e.to_string())?;
                self.call(method, path, body, Some(&t)).await
            }
            other => other,
        }
    }
}

#[async_trait]
impl UpstreamAuthority for VaultUpstream {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn mint_x509_ca(&self, csr: &[u8], ttl: Duration) -> Result<MintedX509Ca, UpstreamError> {
        let mount = &self.cfg.pki_mount;
        let path = match &self.cfg.issuer_ref {
            Some(r) => format!("{mount}/issuer/{r}/sign-intermediate"),
            None => format!("{mount}/root/sign-intermediate"),
        };
        let body = json!({
            "csr": tessera_identity::pem::encode("CERTIFICATE REQUEST", csr),
            "use_csr_values": true,
            "ttl": format!("{}s", ttl.as_secs()),
            "format": "pem",
        });
        let v = self.authed("POST", &path, Some(body)).await.map_err(sign_err)?;
        let d = &v["data"];
        let ours = pem_certs(d["certificate"].as_str().ok_or_else(|| sign_err("no certificate in Vault's answer"))?)?;
        let mut chain: Vec<Vec<u8>> = ours.into_iter().take(1).collect();
        let mut above: Vec<Vec<u8>> = Vec::new();
        if let Some(list) = d["ca_chain"].as_array() {
            for p in list.iter().filter_map(Value::as_str) {
                above.extend(pem_certs(p)?);
            }
        }
        if let Some(p) = d["issuing_ca"].as_str() {
            above.extend(pem_certs(p)?);
        }
        for c in above {
            if !self_signed(&c) && !chain.contains(&c) {
                chain.push(c);
            }
        }
        if chain.is_empty() {
            return Err(sign_err("no certificate in Vault's answer"));
        }
        Ok(MintedX509Ca { chain, roots: self.roots().await? })
    }

    async fn roots(&self) -> Result<Vec<Vec<u8>>, UpstreamError> {
        let mount = &self.cfg.pki_mount;
        let list = self.authed("GET", &format!("{mount}/issuers?list=true"), None).await.map_err(sign_err)?;
        let mut roots = Vec::new();
        for id in list["data"]["keys"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let v = self.authed("GET", &format!("{mount}/issuer/{id}/json"), None).await.map_err(sign_err)?;
            for c in pem_certs(v["data"]["certificate"].as_str().unwrap_or_default())? {
                if self_signed(&c) && !roots.contains(&c) {
                    roots.push(c);
                }
            }
        }
        if roots.is_empty() {
            return Err(sign_err(format!("the PKI mount {mount:?} has no root issuer")));
        }
        Ok(roots)
    }
}
