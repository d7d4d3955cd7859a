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

use tessera_plugin_nested::NestedUpstream;
use tessera_plugin_vault::VaultUpstream;

use crate::config::{Config, KeyManagerKind, NodeAttestorKind, Pkcs11Settings, UpstreamConfig};

/// Why a plugin cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CatalogError {
    /// The key manager failed.
    #[error(transparent)]
    KeyManager(#[from] tessera_plugins::KeyManagerError),
    /// The key manager cannot be opened (HSM module, token, PIN).
    #[error("key manager: {0}")]
    KeyManagerConfig(String),
    /// The upstream authority cannot start.
    #[error(transparent)]
    Upstream(#[from] tessera_plugins::UpstreamError),
    /// A secret named in the configuration cannot be read.
    #[error(transparent)]
    Secret(#[from] tessera_plugins::SecretError),
    /// A node attestor cannot start (a cluster's kubeconfig).
    #[error("node attestor: {0}")]
    NodeAttestor(String),
}

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
    pub async fn build(cfg: &Config) -> Result<Self, CatalogError> {
        let key_manager: Arc<dyn KeyManager> = match &cfg.key_manager {
            KeyManagerKind::Disk => Arc::new(DiskKeyManager::new(cfg.data_dir.join("keys"))?),
            KeyManagerKind::Memory => Arc::new(MemoryKeyManager::new()),
            KeyManagerKind::Pkcs11(p) => Arc::new(open_pkcs11(p)?),
        };
        let upstream_err = CatalogError::Upstream;
        let (upstream, external): (Option<Arc<dyn UpstreamAuthority>>, _) = match &cfg.upstream_authority {
            None => (None, None),
            Some(UpstreamConfig::Disk(files)) => {
                (Some(Arc::new(DiskUpstream::new(files.clone()).map_err(upstream_err)?)), None)
            }
            Some(UpstreamConfig::Vault(v)) => {
                let up = VaultUpstream::new(v.clone().into_config(std::time::Duration::from_secs(30))?)
                    .map_err(upstream_err)?;
                (Some(Arc::new(up)), None)
            }
            Some(UpstreamConfig::Tessera(t)) => {
                (Some(Arc::new(NestedUpstream::new(t.clone()).await.map_err(upstream_err)?)), None)
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
                        .map_err(|e| CatalogError::NodeAttestor(format!("k8s_psat: {e}")))?,
                ),
            });
        }
        Ok(Self { key_manager, upstream, external, node_attestors })
    }
}

/// Reads the PIN from its source and opens the token.
fn open_pkcs11(p: &Pkcs11Settings) -> Result<tessera_plugin_pkcs11::Pkcs11KeyManager, CatalogError> {
    tessera_plugin_pkcs11::Pkcs11KeyManager::open(&p.clone().into_config()?)
        .map_err(|e| CatalogError::KeyManagerConfig(e.to_string()))
}
