//! The server's gRPC services and what they share ([`Shared`]: the issuance path of
//! `tessera-ca`, the metrics, the change feed), the one mapping of errors to
//! `tonic::Status` ([`status`]) and proto conversions.

pub mod admin;
pub mod agent;
pub mod convert;
pub mod limits;
mod quiet;
pub mod status;
pub mod tls;

use std::sync::Arc;

use tessera_ca::Issuance;

use crate::changes::ChangeFeed;
use crate::metrics::Metrics;
pub use status::ApiError;

/// What every gRPC service shares: the one issuance path, the metrics and the change feed.
#[derive(Debug, Clone)]
pub struct Shared {
    /// Every SVID is signed through it.
    pub issuance: Issuance,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Tells watching agents that entries or bundles changed.
    pub changes: ChangeFeed,
    /// When each agent last synced with this replica.
    pub activity: Arc<AgentActivity>,
}

/// When each agent last synced with this replica (memory only: after a restart every agent
/// counts from the server's start). One record per attested agent, pruned against the store
/// by [`AgentActivity::retain`].
#[derive(Debug)]
pub struct AgentActivity {
    started_at: i64,
    last_sync: parking_lot::Mutex<std::collections::HashMap<tessera_identity::SpiffeId, i64>>,
    versions: parking_lot::Mutex<std::collections::HashMap<tessera_identity::SpiffeId, String>>,
}

impl AgentActivity {
    /// A record that starts counting at `now` (Unix seconds).
    pub fn new(now: i64) -> Self {
        Self { started_at: now, last_sync: parking_lot::Mutex::default(), versions: parking_lot::Mutex::default() }
    }

    /// Unix seconds this replica started counting.
    pub fn started_at(&self) -> i64 {
        self.started_at
    }

    /// Notes a completed sync of `id` at `now`.
    pub fn synced(&self, id: &tessera_identity::SpiffeId, now: i64) {
        let mut m = self.last_sync.lock();
        match m.get_mut(id) {
            Some(t) => *t = now,
            None => {
                m.insert(id.clone(), now);
            }
        }
    }

    /// Unix seconds of `id`'s last sync with this replica.
    pub fn last_sync(&self, id: &tessera_identity::SpiffeId) -> Option<i64> {
        self.last_sync.lock().get(id).copied()
    }

    /// Notes the version `id` reported in its last sync (empty: it sent none).
    pub fn reported_version(&self, id: &tessera_identity::SpiffeId, version: &str) {
        if version.is_empty() {
            return;
        }
        let mut m = self.versions.lock();
        if m.get(id).is_none_or(|v| v != version) {
            m.insert(id.clone(), version.to_owned());
        }
    }

    /// The version `id` last reported to this replica, else the one in its record.
    pub fn version_of(&self, a: &tessera_store::AgentRecord) -> String {
        self.versions.lock().get(&a.spiffe_id).cloned().unwrap_or_else(|| a.version.clone())
    }

    /// Forgets agents for which `keep` is false (evicted ones).
    pub fn retain(&self, keep: impl Fn(&tessera_identity::SpiffeId) -> bool) {
        self.last_sync.lock().retain(|id, _| keep(id));
        self.versions.lock().retain(|id, _| keep(id));
    }
}
