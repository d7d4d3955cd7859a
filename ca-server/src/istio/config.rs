//! `[istio]`: the Istio CA API listener and the clusters whose service-account tokens it
//! accepts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use tessera_svc::config::ConfigError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIstio {
    address: String,
    #[serde(default)]
    dns_names: Vec<String>,
    #[serde(default = "default_ttl")]
    default_workload_cert_ttl: String,
    #[serde(default = "max_ttl")]
    max_workload_cert_ttl: String,
    #[serde(default)]
    trusted_node_accounts: Vec<String>,
    #[serde(default)]
    clusters: Vec<RawCluster>,
    #[serde(default = "yes")]
    certificate_auth: bool,
    #[serde(default = "renewal_max_age")]
    certificate_renewal_max_age: String,
}

fn renewal_max_age() -> String {
    "168h".into()
}

fn yes() -> bool {
    true
}

fn default_ttl() -> String {
    "24h".into()
}

fn max_ttl() -> String {
    "48h".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    cluster_id: String,
    kubeconfig: Option<PathBuf>,
    jwks_path: Option<PathBuf>,
    jwks_url: Option<String>,
    jwks_ca_file: Option<PathBuf>,
    issuer: Option<String>,
    #[serde(default = "default_audiences")]
    audiences: Vec<String>,
}

fn default_audiences() -> Vec<String> {
    vec!["istio-ca".into()]
}

/// How a cluster's tokens are validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenValidation {
    /// TokenReview against the API server.
    TokenReview,
    /// Offline, against the issuer's keys.
    Jwks {
        /// A JWKS file (reloaded when it changes).
        path: Option<PathBuf>,
        /// Or a JWKS URL.
        url: Option<String>,
        /// Roots for the URL (default: the system's).
        ca_file: Option<PathBuf>,
        /// The expected `iss`.
        issuer: String,
    },
}

/// One `[[istio.clusters]]`.
#[derive(Debug, Clone)]
pub struct IstioCluster {
    /// Matched against the `clusterid` request header.
    pub cluster_id: String,
    /// API server access (TokenReview, pod lookups for impersonation); `None` with
    /// TokenReview means in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// How tokens are validated.
    pub validation: TokenValidation,
    /// A token must carry one of these audiences.
    pub audiences: Vec<String>,
}

/// `[istio]`.
#[derive(Debug, Clone)]
pub struct IstioConfig {
    /// Listen address of `istio.v1.auth.IstioCertificateService` (TLS).
    pub address: SocketAddr,
    /// DNS names added to the server certificate (what `CA_ADDR` names).
    pub dns_names: Vec<String>,
    /// Certificate lifetime when the request asks for none.
    pub default_ttl: Duration,
    /// Longest lifetime a request may ask for; longer is InvalidArgument.
    pub max_ttl: Duration,
    /// `(namespace, service account)` of node agents (ztunnel) allowed to impersonate.
    pub trusted_node_accounts: Vec<(String, String)>,
    /// The clusters whose tokens are accepted.
    pub clusters: Vec<IstioCluster>,
    /// Accept a still-valid workload certificate instead of a token (istio-agent's renewal):
    /// only certificates this API issued on a token, carrying its renewal grant.
    pub certificate_auth: bool,
    /// How long after the token was checked certificates may still be renewed by presenting
    /// them; then the client must present a token again.
    pub certificate_renewal_max_age: Duration,
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, reason: reason.into() }
}

impl RawIstio {
    pub(crate) fn validate(self) -> Result<IstioConfig, ConfigError> {
        let address = self.address.parse().map_err(|e| invalid("istio.address", format!("{:?}: {e}", self.address)))?;
        let dur = |key: &'static str, s: &str| tessera_svc::config::duration(key, s, Duration::ZERO);
        let default_ttl = dur("istio.default_workload_cert_ttl", &self.default_workload_cert_ttl)?;
        let max_ttl = dur("istio.max_workload_cert_ttl", &self.max_workload_cert_ttl)?;
        if max_ttl < default_ttl {
            return Err(invalid("istio.max_workload_cert_ttl", "must be at least istio.default_workload_cert_ttl"));
        }
        for d in &self.dns_names {
            if rustls_pki_types::DnsName::try_from(d.as_str()).is_err() || d.parse::<std::net::IpAddr>().is_ok() {
                return Err(invalid("istio.dns_names", format!("{d:?} is not a DNS name")));
            }
        }
        let mut trusted_node_accounts = Vec::new();
        for a in &self.trusted_node_accounts {
            let (ns, sa) =
                a.split_once('/').filter(|(n, s)| !n.is_empty() && !s.is_empty() && !s.contains('/')).ok_or_else(
                    || invalid("istio.trusted_node_accounts", format!("{a:?}: expected \"namespace/serviceaccount\"")),
                )?;
            trusted_node_accounts.push((ns.to_owned(), sa.to_owned()));
        }
        if self.clusters.is_empty() {
            return Err(invalid("istio.clusters", "name at least one cluster whose tokens are accepted"));
        }
        let mut clusters: Vec<IstioCluster> = Vec::new();
        for c in self.clusters {
            if c.cluster_id.is_empty() {
                return Err(invalid("istio.clusters.cluster_id", "must not be empty"));
            }
            if clusters.iter().any(|o| o.cluster_id == c.cluster_id) {
                return Err(invalid("istio.clusters.cluster_id", format!("{:?} is listed twice", c.cluster_id)));
            }
            if c.audiences.is_empty() || c.audiences.iter().any(String::is_empty) {
                return Err(invalid("istio.clusters.audiences", "at least one non-empty audience is required"));
            }
            let validation = match (c.jwks_path, c.jwks_url) {
                (None, None) => {
                    if c.issuer.is_some() || c.jwks_ca_file.is_some() {
                        return Err(invalid(
                            "istio.clusters.issuer",
                            "issuer and jwks_ca_file go with jwks_path or jwks_url (offline validation)",
                        ));
                    }
                    TokenValidation::TokenReview
                }
                (Some(_), Some(_)) => {
                    return Err(invalid("istio.clusters.jwks_url", "give jwks_path or jwks_url, not both"));
                }
                (path, url) => {
                    let issuer = c.issuer.filter(|i| !i.is_empty()).ok_or_else(|| {
                        invalid("istio.clusters.issuer", "offline validation needs the cluster's issuer")
                    })?;
                    if let Some(u) = &url {
                        let parsed =
                            tessera_svc::http::Url::parse(u).map_err(|e| invalid("istio.clusters.jwks_url", e))?;
                        if !parsed.tls {
                            return Err(invalid(
                                "istio.clusters.jwks_url",
                                format!("{u:?}: must be https (whoever can change the keys can forge any token)"),
                            ));
                        }
                    }
                    TokenValidation::Jwks { path, url, ca_file: c.jwks_ca_file, issuer }
                }
            };
            clusters.push(IstioCluster {
                cluster_id: c.cluster_id,
                kubeconfig: c.kubeconfig,
                validation,
                audiences: c.audiences,
            });
        }
        Ok(IstioConfig {
            address,
            dns_names: self.dns_names,
            default_ttl,
            max_ttl,
            trusted_node_accounts,
            clusters,
            certificate_auth: self.certificate_auth,
            certificate_renewal_max_age: dur("istio.certificate_renewal_max_age", &self.certificate_renewal_max_age)?,
        })
    }
}
