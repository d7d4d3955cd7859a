//! The plugin catalog: builds exactly one key manager, at most one upstream authority and the
//! named node attestors (`join_token`, `k8s_psat`) from the configuration, so the CA core and the APIs only ever see the
//! `KeyManager`, `UpstreamAuthority` and `NodeAttestor` traits and never name a concrete
//! plugin.

use std::sync::Arc;

use tessera_plugin_external::ExternalUpstream;
use tessera_plugin_k8s_psat::PsatAttestor;
use tessera_plugins::{
    DiskKeyManager, DiskUpstream, JoinTokenAttestor, KeyManager, MemoryKeyManager, NodeAttestor, UpstreamAuthority,
};

use crate::app::StartError;
use tessera_plugin_nested::{NestedConfig, NestedUpstream};
use tessera_plugin_vault::{VaultAuth, VaultConfig, VaultUpstream};

use crate::config::{
    Config, KeyManagerKind, NodeAttestorKind, PinSource, Pkcs11Settings, UpstreamConfig, VaultAuthSettings,
};

/// The plugins one server runs.
#[derive(Debug)]
pub struct Catalog {
    /// Holds the CA keys.
    pub key_manager: Arc<dyn KeyManager>,
    /// Signs our CA, when configured.
    pub upstream: Option<Arc<dyn UpstreamAuthority>>,
    /// The same upstream when it is an external process, for its supervisor task.
    pub external: Option<Arc<ExternalUpstream>>,
    /// The node attestors `AttestAgent` accepts.
    pub node_attestors: Vec<Arc<dyn NodeAttestor>>,
}

impl Catalog {
    /// Builds the plugins named by `cfg`; fails when one cannot start.
    pub async fn build(cfg: &Config) -> Result<Self, StartError> {
        let key_manager: Arc<dyn KeyManager> = match &cfg.key_manager {
            KeyManagerKind::Disk => Arc::new(DiskKeyManager::new(cfg.data_dir.join("keys"))?),
            KeyManagerKind::Memory => Arc::new(MemoryKeyManager::new()),
            KeyManagerKind::Pkcs11(p) => Arc::new(open_pkcs11(p)?),
        };
        let upstream_err = |e| StartError::Ca(tessera_ca::CaError::Upstream(e));
        let (upstream, external): (Option<Arc<dyn UpstreamAuthority>>, _) = match &cfg.upstream_authority {
            None => (None, None),
            Some(UpstreamConfig::Disk(files)) => {
                (Some(Arc::new(DiskUpstream::new(files.clone()).map_err(upstream_err)?)), None)
            }
            Some(UpstreamConfig::Vault(v)) => {
                let auth = match &v.auth {
                    VaultAuthSettings::Token(src) => VaultAuth::Token(read_secret(src, "Vault token")?),
                    VaultAuthSettings::Kubernetes { mount, role, token_path } => VaultAuth::Kubernetes {
                        mount: mount.clone(),
                        role: role.clone(),
                        token_path: token_path.clone(),
                    },
                    VaultAuthSettings::AppRole { mount, role_id, secret_id } => VaultAuth::AppRole {
                        mount: mount.clone(),
                        role_id: role_id.clone(),
                        secret_id: read_secret(secret_id, "AppRole secret ID")?,
                    },
                };
                let up = VaultUpstream::new(VaultConfig {
                    address: v.address.clone(),
                    pki_mount: v.pki_mount.clone(),
                    issuer_ref: v.issuer_ref.clone(),
                    namespace: v.namespace.clone(),
                    ca_cert_file: v.ca_cert_file.clone(),
                    auth,
                    timeout: std::time::Duration::from_secs(30),
                })
                .map_err(upstream_err)?;
                (Some(Arc::new(up)), None)
            }
            Some(UpstreamConfig::Tessera(t)) => {
                let up = NestedUpstream::new(NestedConfig {
                    trust_domain: cfg.trust_domain.clone(),
                    server_address: t.server_address.clone(),
                    trust_bundle_path: t.trust_bundle_path.clone(),
                    join_token: t.join_token.clone(),
                    state_dir: t.state_dir.clone(),
                    timeout: std::time::Duration::from_secs(30),
                })
                .await
                .map_err(upstream_err)?;
                (Some(Arc::new(up)), None)
            }
            Some(UpstreamConfig::External(settings)) => {
                let ext = Arc::new(
                    ExternalUpstream::start(settings.clone(), cfg.trust_domain.as_str()).await.map_err(upstream_err)?,
                );
                (Some(ext.clone() as Arc<dyn UpstreamAuthority>), Some(ext))
            }
        };
        let mut node_attestors: Vec<Arc<dyn NodeAttestor>> = Vec::new();
        for a in &cfg.node_attestors {
            node_attestors.push(match a {
                NodeAttestorKind::JoinToken => Arc::new(JoinTokenAttestor),
                NodeAttestorKind::K8sPsat(clusters) => Arc::new(
                    PsatAttestor::new(clusters)
                        .await
                        .map_err(|e| StartError::NodeAttestor(format!("k8s_psat: {e}")))?,
                ),
            });
        }
        Ok(Self { key_manager, upstream, external, node_attestors })
    }
}

/// Reads a secret (PIN, token) from a file (trailing newline removed) or the environment.
fn read_secret(src: &PinSource, what: &str) -> Result<tessera_identity::Secret, StartError> {
    match src {
        PinSource::File(f) => Ok(std::fs::read_to_string(f)
            .map_err(|source| StartError::Io { what: format!("cannot read the {what} file {}", f.display()), source })?
            .trim_end_matches(['\r', '\n'])
            .into()),
        PinSource::Env(v) => std::env::var(v)
            .map(tessera_identity::Secret::new)
            .map_err(|_| StartError::Secret(format!("environment variable {v} (the {what}) is not set"))),
    }
}

/// Reads the PIN from its source and opens the token.
fn open_pkcs11(p: &Pkcs11Settings) -> Result<tessera_plugin_pkcs11::Pkcs11KeyManager, StartError> {
    let pin = read_secret(&p.pin, "HSM PIN")?;
    tessera_plugin_pkcs11::Pkcs11KeyManager::open(&tessera_plugin_pkcs11::Pkcs11Config {
        module_path: p.module_path.clone(),
        token_label: p.token_label.clone(),
        pin,
        key_label_prefix: p.key_label_prefix.clone(),
    })
    .map_err(|e| StartError::KeyManagerConfig(e.to_string()))
}
