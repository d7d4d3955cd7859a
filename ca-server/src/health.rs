//! Health and metrics over plain HTTP/1.1 on one listener: `/live`, `/ready`, `/metrics`.
//! Bind it to loopback or a pod IP; it exposes no secrets.

use std::sync::Arc;

use crate::ca::Ca;
use crate::metrics::{Gauges, Metrics};
use crate::store::Store;

/// What the health endpoints read.
#[derive(Debug, Clone)]
pub struct Health {
    /// The CA.
    pub ca: Arc<Ca>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl tessera_svc::health::Probe for Health {
    /// The store must answer a read, and the CA must be able to sign.
    async fn ready(&self) -> bool {
        self.ca.is_ready() && self.store.get_bundle(self.ca.trust_domain()).await.is_ok()
    }

    async fn metrics(&self) -> String {
        let g = Gauges {
            ready: self.ready().await,
            ca_expiry: self.ca.active_x509_not_after().unwrap_or(0),
            bundle_sequence: self.ca.bundle().sequence_number,
        };
        self.metrics.render(&g)
    }
}
