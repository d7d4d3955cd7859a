//! The `[upstream_authority] type = "vault"` section: its keys ([`RawVaultSettings`]), checked
//! into [`VaultSettings`] when the configuration is parsed (secrets named by their source),
//! and turned into a [`VaultConfig`] when the server starts (secrets read then).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tessera_plugins::{SecretError, SecretSource};
use tessera_svc::config::{ConfigError, invalid};

use crate::{VaultAuth, VaultConfig};

/// The section's keys, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVaultSettings {
    address: Option<String>,
    pki_mount: Option<String>,
    issuer_ref: Option<String>,
    namespace: Option<String>,
    ca_cert_file: Option<PathBuf>,
    auth_method: Option<String>,
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    approle_mount: Option<String>,
    approle_role_id: Option<String>,
    approle_secret_id_file: Option<PathBuf>,
    approle_secret_id_env: Option<String>,
    k8s_mount: Option<String>,
    k8s_role: Option<String>,
    k8s_token_path: Option<PathBuf>,
}

/// Every key of the section (besides `type`), as `upstream_authority.<key>`.
pub const KEYS: &[&str] = &[
    "upstream_authority.address",
    "upstream_authority.pki_mount",
    "upstream_authority.issuer_ref",
    "upstream_authority.namespace",
    "upstream_authority.ca_cert_file",
    "upstream_authority.auth_method",
    "upstream_authority.token_file",
    "upstream_authority.token_env",
    "upstream_authority.approle_mount",
    "upstream_authority.approle_role_id",
    "upstream_authority.approle_secret_id_file",
    "upstream_authority.approle_secret_id_env",
    "upstream_authority.k8s_mount",
    "upstream_authority.k8s_role",
    "upstream_authority.k8s_token_path",
];

/// Checked settings; secrets are named by source and read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultSettings {
    /// `http(s)://host:port`.
    pub address: String,
    /// The PKI mount.
    pub pki_mount: String,
    /// Sign with this issuer instead of the default.
    pub issuer_ref: Option<String>,
    /// Vault namespace.
    pub namespace: Option<String>,
    /// PEM trust anchors for Vault's certificate.
    pub ca_cert_file: Option<PathBuf>,
    /// How to log in.
    pub auth: VaultAuthSettings,
}

/// Vault login, with secrets by source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultAuthSettings {
    /// A token from a file or the environment.
    Token(SecretSource),
    /// Kubernetes: a service account token file, read at every login.
    Kubernetes {
        /// Auth mount.
        mount: String,
        /// Vault role.
        role: String,
        /// Token file.
        token_path: PathBuf,
    },
    /// AppRole: role ID inline (not a secret), secret ID from a file or the environment.
    AppRole {
        /// Auth mount.
        mount: String,
        /// Role ID.
        role_id: String,
        /// Secret ID source.
        secret_id: SecretSource,
    },
}

/// Exactly one of a file and an environment variable.
fn source(
    file: Option<PathBuf>,
    env: Option<String>,
    key: &'static str,
    what: &str,
) -> Result<SecretSource, ConfigError> {
    match (file, env) {
        (Some(f), None) => Ok(SecretSource::File(f)),
        (None, Some(e)) => Ok(SecretSource::Env(e)),
        _ => Err(invalid(key, format!("{what} needs exactly one of a file and an environment variable"))),
    }
}

impl TryFrom<RawVaultSettings> for VaultSettings {
    type Error = ConfigError;

    fn try_from(u: RawVaultSettings) -> Result<Self, ConfigError> {
        let address = u.address.ok_or(ConfigError::Missing("upstream_authority.address"))?;
        tessera_svc::http::Url::parse(&address).map_err(|reason| invalid("upstream_authority.address", reason))?;
        let auth = match u.auth_method.as_deref().unwrap_or("token") {
            "token" => VaultAuthSettings::Token(source(
                u.token_file,
                u.token_env,
                "upstream_authority.token_file",
                "auth_method \"token\" (token_file or token_env)",
            )?),
            "approle" => VaultAuthSettings::AppRole {
                mount: u.approle_mount.unwrap_or_else(|| "approle".into()),
                role_id: u.approle_role_id.ok_or(ConfigError::Missing("upstream_authority.approle_role_id"))?,
                secret_id: source(
                    u.approle_secret_id_file,
                    u.approle_secret_id_env,
                    "upstream_authority.approle_secret_id_file",
                    "auth_method \"approle\" (approle_secret_id_file or approle_secret_id_env)",
                )?,
            },
            "kubernetes" => VaultAuthSettings::Kubernetes {
                mount: u.k8s_mount.unwrap_or_else(|| "kubernetes".into()),
                role: u.k8s_role.ok_or(ConfigError::Missing("upstream_authority.k8s_role"))?,
                token_path: u
                    .k8s_token_path
                    .unwrap_or_else(|| "/var/run/secrets/kubernetes.io/serviceaccount/token".into()),
            },
            other => {
                return Err(invalid(
                    "upstream_authority.auth_method",
                    format!("{other:?}: expected \"token\", \"approle\" or \"kubernetes\""),
                ));
            }
        };
        Ok(VaultSettings {
            address,
            pki_mount: u.pki_mount.unwrap_or_else(|| "pki".into()),
            issuer_ref: u.issuer_ref,
            namespace: u.namespace,
            ca_cert_file: u.ca_cert_file,
            auth,
        })
    }
}

impl VaultSettings {
    /// What the plugin runs with: the secrets read from their sources now.
    pub fn into_config(self, timeout: Duration) -> Result<VaultConfig, SecretError> {
        let auth = match self.auth {
            VaultAuthSettings::Token(src) => VaultAuth::Token(src.read("Vault token")?),
            VaultAuthSettings::Kubernetes { mount, role, token_path } => {
                VaultAuth::Kubernetes { mount, role, token_path }
            }
            VaultAuthSettings::AppRole { mount, role_id, secret_id } => {
                VaultAuth::AppRole { mount, role_id, secret_id: secret_id.read("AppRole secret ID")? }
            }
        };
        Ok(VaultConfig {
            address: self.address,
            pki_mount: self.pki_mount,
            issuer_ref: self.issuer_ref,
            namespace: self.namespace,
            ca_cert_file: self.ca_cert_file,
            auth,
            timeout,
        })
    }
}
