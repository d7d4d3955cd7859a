//! Health and metrics over plain HTTP/1.1: `/live`, `/ready` (the agent has synced with the
//! server at least once), `/metrics`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::manager::Manager;

fn metrics(mgr: &Manager) -> String {
    let m = &mgr.metrics;
    let snap = mgr.snapshot();
    let earliest = snap.svids.iter().map(|s| s.not_after).min().unwrap_or(0);
    let mut out = String::with_capacity(1024);
    let counters = [
        ("tessera_agent_syncs_total{result=\"ok\"}", m.syncs_ok.load(Ordering::Relaxed)),
        ("tessera_agent_syncs_total{result=\"error\"}", m.syncs_failed.load(Ordering::Relaxed)),
        ("tessera_agent_x509_svids_received_total", m.svids_issued.load(Ordering::Relaxed)),
        ("tessera_agent_change_notices_total", m.change_notices.load(Ordering::Relaxed)),
        ("tessera_agent_sds_nacks_total", m.sds_nacks.load(Ordering::Relaxed)),
    ];
    let _ = writeln!(
        out,
        "# TYPE tessera_agent_syncs_total counter\n# TYPE tessera_agent_x509_svids_received_total counter\n# TYPE tessera_agent_change_notices_total counter\n# TYPE tessera_agent_sds_nacks_total counter"
    );
    for (name, v) in counters {
        let _ = writeln!(out, "{name} {v}");
    }
    let gauges = [
        ("tessera_agent_ready", i64::from(mgr.is_ready())),
        ("tessera_agent_svids_cached", i64::try_from(snap.svids.len()).unwrap_or(i64::MAX)),
        ("tessera_agent_svid_expiry_timestamp_seconds", earliest),
        ("tessera_agent_sds_streams", i64::try_from(m.sds_streams.load(Ordering::Relaxed)).unwrap_or(0)),
        ("tessera_agent_workload_api_streams", i64::try_from(m.workload_streams.load(Ordering::Relaxed)).unwrap_or(0)),
        ("tessera_agent_bundle_sequence", i64::try_from(snap.bundle.sequence_number).unwrap_or(0)),
        ("tessera_agent_last_sync_timestamp_seconds", m.last_sync.load(Ordering::Relaxed)),
        ("tessera_agent_jwt_svids_cached", i64::try_from(mgr.cached_jwt_svids()).unwrap_or(i64::MAX)),
    ];
    for (name, v) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name} {v}");
    }
    // Seconds, as Prometheus wants; absent until a sync answer carried the server's time.
    if mgr.observed.skew_measured.load(Ordering::Relaxed) {
        let skew = m.clock_skew_ms.load(Ordering::Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "# TYPE tessera_agent_clock_skew_seconds gauge\ntessera_agent_clock_skew_seconds {skew}");
    }
    tessera_svc::listener::render_headers(&mut out, "tessera_agent");
    m.health_connections.render(&mut out, "tessera_agent", "health");
    m.socket_connections.render(&mut out, "tessera_agent", "socket");
    out
}

/// The agent's probe: ready once a sync with the server completed.
#[derive(Debug)]
pub struct AgentProbe(pub Arc<Manager>);

#[async_trait::async_trait]
impl tessera_svc::health::Probe for AgentProbe {
    async fn ready(&self) -> bool {
        self.0.is_ready()
    }

    async fn metrics(&self) -> String {
        metrics(&self.0)
    }
}
