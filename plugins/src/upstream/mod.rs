//! The upstream authority: signs our X.509 CA under an existing root (files, Vault, a parent
//! Tessera, any CA), modelled on SPIRE's UpstreamAuthority. The server sends a CSR for its CA
//! key (which stays in the key manager) and gets back its CA certificate, the chain up to the
//! upstream root, and the upstream roots, which become our bundle's X.509 authorities.
//!
//! Root updates: the CA polls [`UpstreamAuthority::roots`] on its rotation tick and publishes
//! new roots before anything is signed under them.

pub mod disk;

use std::sync::Arc;

use parking_lot::Mutex;
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

/// The upstream roots an out-of-band plugin (external process, parent Tessera) last
/// reported, and the one task that follows its updates: a newer subscription replaces the
/// previous one.
#[derive(Debug, Default)]
pub struct RootCache {
    roots: RootSink,
    follower: Mutex<Option<tokio::task::AbortHandle>>,
}

/// Where a follower task writes root updates.
#[derive(Debug, Clone, Default)]
pub struct RootSink(Arc<Mutex<Vec<Vec<u8>>>>);

impl RootSink {
    /// Replaces the roots; true when they changed. An empty set is ignored.
    pub fn set(&self, roots: Vec<Vec<u8>>) -> bool {
        if roots.is_empty() {
            return false;
        }
        let mut cur = self.0.lock();
        if *cur == roots {
            return false;
        }
        *cur = roots;
        true
    }

    /// The current roots.
    pub fn get(&self) -> Vec<Vec<u8>> {
        self.0.lock().clone()
    }
}

impl RootCache {
    /// The current roots.
    pub fn get(&self) -> Vec<Vec<u8>> {
        self.roots.get()
    }

    /// Replaces the roots; true when they changed.
    pub fn set(&self, roots: Vec<Vec<u8>>) -> bool {
        self.roots.set(roots)
    }

    /// A handle for a follower task.
    pub fn sink(&self) -> RootSink {
        self.roots.clone()
    }

    /// Runs `task` as the follower, stopping the previous one.
    pub fn follow(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        if let Some(old) = self.follower.lock().replace(handle) {
            old.abort();
        }
    }

    /// True while a follower task runs.
    pub fn following(&self) -> bool {
        self.follower.lock().as_ref().is_some_and(|h| !h.is_finished())
    }
}

/// The first answer of a mint stream and the rest of it: a CA chain and the upstream roots,
/// then root updates.
pub struct MintMessage {
    /// Our new CA first, then intermediates (empty in updates).
    pub chain: Vec<Vec<u8>>,
    /// The upstream's roots.
    pub roots: Vec<Vec<u8>>,
}

/// Mints over a stream whose later messages carry root updates (an external plugin's
/// `MintX509CaAndSubscribe`, a parent Tessera's `MintDownstreamX509Ca`): opens it and waits
/// for the first answer, each within `timeout`; checks that it carries a chain and roots;
/// records the roots in `cache`; and follows the rest of the stream in the background,
/// calling `on_update` with each new set of roots. A newer mint replaces the follower.
pub async fn mint_and_follow<M, E, S>(
    upstream: &'static str,
    call: &'static str,
    timeout: Duration,
    open: impl std::future::Future<Output = Result<S, E>>,
    read: fn(M) -> MintMessage,
    cache: &RootCache,
    on_update: impl Fn(&[Vec<u8>]) + Send + 'static,
) -> Result<MintedX509Ca, UpstreamError>
where
    S: futures_util::Stream<Item = Result<M, E>> + Unpin + Send + 'static,
    E: std::fmt::Display,
    M: Send + 'static,
{
    use futures_util::StreamExt;
    let err = |reason: String| UpstreamError::Signing { upstream, reason };
    let mut stream = tokio::time::timeout(timeout, open)
        .await
        .map_err(|_| err(format!("{call} timed out")))?
        .map_err(|e| err(format!("{call}: {e}")))?;
    let first = tokio::time::timeout(timeout, stream.next())
        .await
        .map_err(|_| err(format!("no answer to {call} in time")))?
        .ok_or_else(|| err(format!("{call}: the stream closed without an answer")))?
        .map_err(|e| err(format!("{call}: {e}")))?;
    let first = read(first);
    if first.chain.is_empty() || first.roots.is_empty() {
        return Err(err(format!("{call}: the first answer must carry the CA chain and the upstream roots")));
    }
    cache.set(first.roots.clone());
    let sink = cache.sink();
    cache.follow(async move {
        while let Some(Ok(m)) = stream.next().await {
            if sink.set(read(m).roots) {
                on_update(&sink.get());
            }
        }
    });
    Ok(MintedX509Ca { chain: first.chain, roots: first.roots })
}
