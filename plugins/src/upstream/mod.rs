//! The upstream authority: signs our X.509 CA under an existing root (files, Vault, a parent
//! Tessera, any CA), modelled on SPIRE's UpstreamAuthority. The server sends a CSR for its CA
//! key (which stays in the key manager) and gets back its CA certificate, the chain up to the
//! upstream root, and the upstream roots, which become our bundle's X.509 authorities.
//!
//! Root updates: the CA polls [`UpstreamAuthority::roots`] on its rotation tick and publishes
//! new roots before anything is signed under them.

pub mod disk;

use std::time::Duration;

use async_trait::async_trait;

/// What an upstream returns for our CA CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedX509Ca {
    /// Our CA certificate first, then each upstream intermediate (DER), without the root.
    pub chain: Vec<Vec<u8>>,
    /// The upstream trust anchors (DER); the first is the root `chain` ends under.
    pub roots: Vec<Vec<u8>>,
}

/// Upstream failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The upstream's own material (files, credentials) is unusable.
    #[error("upstream {upstream}: {reason}")]
    Config {
        /// Which upstream.
        upstream: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Our CSR was refused.
    #[error("upstream {upstream} refused the CSR: {reason}")]
    Csr {
        /// Which upstream.
        upstream: &'static str,
        /// Why.
        reason: String,
    },
    /// Signing failed.
    #[error("upstream {upstream} failed to sign: {reason}")]
    Signing {
        /// Which upstream.
        upstream: &'static str,
        /// Why.
        reason: String,
    },
}

/// Signs our intermediate CA and reports the upstream roots.
#[async_trait]
pub trait UpstreamAuthority: Send + Sync + std::fmt::Debug {
    /// `disk`, `vault`, `tessera`, `external`.
    fn name(&self) -> &'static str;

    /// Signs `csr` (DER PKCS#10 for our CA key; its URI SAN is our trust domain ID) as a CA
    /// valid for up to `ttl`; the upstream may shorten it to its own expiry.
    async fn mint_x509_ca(&self, csr: &[u8], ttl: Duration) -> Result<MintedX509Ca, UpstreamError>;

    /// The current upstream roots (DER).
    async fn roots(&self) -> Result<Vec<Vec<u8>>, UpstreamError>;

    /// For plugins that run as a separate process: whether it is up, for `/ready` and
    /// `/metrics`. In-process plugins return `None`.
    fn health(&self) -> Option<PluginHealth> {
        None
    }
}

/// The state of an out-of-process plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginHealth {
    /// The name the plugin reported.
    pub name: String,
    /// Answering its health checks.
    pub up: bool,
    /// Restarts since the server started.
    pub restarts: u64,
    /// The process ID, while running.
    pub pid: Option<u32>,
    /// The last failure.
    pub last_error: Option<String>,
}
