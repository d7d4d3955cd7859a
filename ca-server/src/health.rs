//! Health and metrics over plain HTTP/1.1 on one listener: `/live`, `/ready`, `/metrics`.
//! Bind it to loopback or a pod IP; it exposes no secrets.

use std::sync::Arc;

use crate::metrics::{Gauges, Metrics};
use tessera_ca::Ca;
use tessera_store::Store;

/// What the health endpoints read.
#[derive(Debug, Clone)]
pub struct Health {
    /// The CA.
    pub ca: Arc<Ca>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// What doctor reads (authorities, federation, agents' syncs).
    pub diagnostics: Arc<crate::doctor::Diagnostics>,
    /// The change feed (its notice counts).
    pub changes: crate::changes::ChangeFeed,
}

#[async_trait::async_trait]
impl tessera_svc::health::Probe for Health {
    /// The store must answer a read and make a write durable, and the CA must be able to sign.
    async fn ready(&self) -> bool {
        if !self.ca.is_ready() || self.store.get_bundle(self.ca.trust_domain()).await.is_err() {
            return false;
        }
        match self.store.check_writable().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "Store cannot make writes durable: not ready");
                false
            }
        }
    }

    /// A store whose writes have failed for 30 s without a success cannot recover in place
    /// (sled after an I/O error such as a full disk): ask to be restarted.
    async fn live(&self) -> bool {
        match self.store.failing_for() {
            Some(d) if d > std::time::Duration::from_secs(30) => {
                tracing::error!(failing_for = ?d, "Store writes keep failing: /live is 503 so that the server is restarted");
                false
            }
            _ => true,
        }
    }

    /// The upstream plugin's state, when it runs out of process: the CA keeps signing while
    /// it restarts, so this informs and does not fail readiness.
    async fn detail(&self) -> String {
        match self.ca.upstream_health() {
            Some(p) if p.up => {
                format!("upstream plugin {:?}: up (pid {}, restarts: {})\n", p.name, p.pid.unwrap_or(0), p.restarts)
            }
            Some(p) => format!(
                "upstream plugin {:?}: DOWN, restarting (restarts: {}; last error: {})\n",
                p.name,
                p.restarts,
                p.last_error.unwrap_or_default()
            ),
            None => String::new(),
        }
    }

    async fn metrics(&self) -> String {
        let d = &self.diagnostics;
        let bundle = self.ca.bundle();
        // Upstream roots only: our own (self-signed) authorities have their own gauge.
        let own: Vec<Vec<u8>> = self.ca.x509_authorities().into_iter().map(|a| a.certificate).collect();
        let bundle_root_not_after = bundle
            .x509_authorities
            .iter()
            .filter(|c| !own.iter().any(|o| o.as_slice() == c.as_ref()))
            .filter_map(|c| tessera_identity::x509::cert_facts(c).ok())
            .map(|f| f.not_after)
            .min()
            .unwrap_or(0);
        let mut federation = Vec::new();
        for rel in self.store.list_federations().await.unwrap_or_default() {
            let st = d.federation.status(&rel.trust_domain);
            federation.push((rel.trust_domain.to_string(), st.last_success, st.last_error.is_none()));
        }
        let agents = self.store.list_agents().await.unwrap_or_default();
        let now = tessera_identity::unix_now();
        let sync_ages = agents
            .iter()
            .filter(|a| !a.banned)
            .map(|a| {
                now - d.activity.last_sync(&a.spiffe_id).unwrap_or_else(|| d.activity.started_at().max(a.attested_at))
            })
            .collect();
        let banned = agents.iter().filter(|a| a.banned).count() as u64;
        let mut versions = std::collections::BTreeMap::new();
        for a in agents.iter().filter(|a| !a.banned) {
            let v = d.activity.version_of(a);
            // Only versions that parse become label values: a caller cannot invent series.
            let v = if v.parse::<tessera_svc::version::Version>().is_ok() { v } else { "unknown".to_owned() };
            *versions.entry(v).or_insert(0u64) += 1;
        }
        let g = Gauges {
            ready: self.ready().await,
            ca_expiry: self.ca.active_x509_not_after().unwrap_or(0),
            bundle_sequence: bundle.sequence_number,
            plugin: self.ca.upstream_health(),
            authorities: self
                .ca
                .x509_authorities()
                .into_iter()
                .filter(|a| a.status != "old")
                .map(|a| (a.status, a.expires_at))
                .collect(),
            bundle_root_not_after,
            rotation_errors: self.ca.rotation_health().errors_total,
            federation,
            agents: (agents.len() as u64 - banned, banned),
            sync_ages,
            versions,
            notices: self.changes.counts(),
        };
        self.metrics.render(&g)
    }
}
