//! Prometheus metrics, rendered by hand in the text exposition format: a few fixed counters
//! and gauges, `tessera_server_<thing>_<unit>[_total]`, small fixed label sets, never a SPIFFE
//! ID as a label value.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use tessera_ca::{IssuanceCounters, ResultCounter};

fn render_results(c: &ResultCounter, out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    let (ok, denied, error) = c.counts();
    for (label, v) in [("ok", ok), ("denied", denied), ("error", error)] {
        let _ = writeln!(out, "{name}{{result=\"{label}\"}} {v}");
    }
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// X509-SVIDs and JWT-SVIDs issued (counted by the issuance path).
    pub issuance: std::sync::Arc<IssuanceCounters>,
    /// Agent attestations.
    pub attestations: ResultCounter,
    /// Signing calls refused by the per-agent rate limit.
    pub rate_limited_svids: std::sync::atomic::AtomicU64,
    /// Attestations refused by the per-IP rate limit.
    pub rate_limited_attestations: std::sync::atomic::AtomicU64,
    /// Connection counters of each TCP listener, by name.
    listeners: parking_lot::Mutex<Vec<(&'static str, std::sync::Arc<tessera_svc::listener::ConnStats>)>>,
}

/// Gauges read at scrape time.
#[derive(Debug)]
pub struct Gauges {
    /// 1 when ready.
    pub ready: bool,
    /// Active X.509 CA notAfter, Unix seconds.
    pub ca_expiry: i64,
    /// Our bundle's sequence number.
    pub bundle_sequence: u64,
    /// The out-of-process upstream plugin, when there is one.
    pub plugin: Option<tessera_plugins::upstream::PluginHealth>,
    /// notAfter of the prepared and active X.509 authorities, by slot.
    pub authorities: Vec<(&'static str, i64)>,
    /// The earliest notAfter among the upstream roots in our bundle (0: none).
    pub bundle_root_not_after: i64,
    /// Failed rotation checks since start.
    pub rotation_errors: u64,
    /// Per federated trust domain: last success (Unix seconds, 0 = never), last attempt ok.
    pub federation: Vec<(String, i64, bool)>,
    /// Attested agents that are not banned, and banned ones.
    pub agents: (u64, u64),
    /// Seconds since each unbanned agent's last sync with this replica.
    pub sync_ages: Vec<i64>,
    /// Unbanned agents by the version they reported (`unknown` when none).
    pub versions: std::collections::BTreeMap<String, u64>,
    /// Change notices (sent to an agent's stream, skipped because they did not concern it).
    pub notices: (u64, u64),
}

/// Buckets of `tessera_server_agent_last_sync_age_seconds`.
const SYNC_AGE_BUCKETS: [i64; 7] = [5, 15, 30, 60, 300, 900, 3600];

fn render_doctor_gauges(out: &mut String, g: &Gauges) {
    let name = "tessera_server_x509_authority_not_after_timestamp_seconds";
    let _ = writeln!(out, "# HELP {name} notAfter of the prepared and active X.509 authorities.\n# TYPE {name} gauge");
    for (slot, t) in &g.authorities {
        let _ = writeln!(out, "{name}{{slot=\"{slot}\"}} {t}");
    }
    let name = "tessera_server_bundle_root_not_after_timestamp_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} The earliest notAfter among the upstream roots in our bundle (0: none, e.g. a self-signed CA).\n# TYPE {name} gauge\n{name} {}",
        g.bundle_root_not_after
    );
    let name = "tessera_server_ca_rotation_errors_total";
    let _ =
        writeln!(out, "# HELP {name} Failed CA rotation checks.\n# TYPE {name} counter\n{name} {}", g.rotation_errors);
    let name = "tessera_server_federation_last_success_timestamp_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Last accepted bundle of each federated trust domain (0: never).\n# TYPE {name} gauge"
    );
    for (td, t, _) in &g.federation {
        let _ = writeln!(out, "{name}{{trust_domain=\"{td}\"}} {t}");
    }
    let name = "tessera_server_federation_refresh_ok";
    let _ =
        writeln!(out, "# HELP {name} 1 when the last refresh of a federated bundle succeeded.\n# TYPE {name} gauge");
    for (td, _, ok) in &g.federation {
        let _ = writeln!(out, "{name}{{trust_domain=\"{td}\"}} {}", i64::from(*ok));
    }
    let name = "tessera_server_agents";
    let _ = writeln!(
        out,
        "# HELP {name} Attested agents, by state.\n# TYPE {name} gauge\n{name}{{state=\"attested\"}} {}\n{name}{{state=\"banned\"}} {}",
        g.agents.0, g.agents.1
    );
    let name = "tessera_server_change_notices_total";
    let _ = writeln!(
        out,
        "# HELP {name} Change notices per agent stream: sent, or skipped because the change did not concern the agent.\n# TYPE {name} counter\n{name}{{result=\"sent\"}} {}\n{name}{{result=\"skipped\"}} {}",
        g.notices.0, g.notices.1
    );
    let name = "tessera_server_agents_by_version";
    let _ = writeln!(out, "# HELP {name} Unbanned agents by the version they report.\n# TYPE {name} gauge");
    for (v, n) in &g.versions {
        let _ = writeln!(out, "{name}{{version=\"{v}\"}} {n}");
    }
    let name = "tessera_server_agent_last_sync_age_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Seconds since each unbanned agent last synced with this replica.\n# TYPE {name} histogram"
    );
    for le in SYNC_AGE_BUCKETS {
        let n = g.sync_ages.iter().filter(|a| **a <= le).count();
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.sync_ages.len());
    let _ = writeln!(out, "{name}_sum {}", g.sync_ages.iter().sum::<i64>());
    let _ = writeln!(out, "{name}_count {}", g.sync_ages.len());
}

impl Metrics {
    /// The connection counters of listener `name` (`agent_api`, `istio_ca`, `bundle_endpoint`,
    /// `health`), created on first use.
    pub fn listener(&self, name: &'static str) -> std::sync::Arc<tessera_svc::listener::ConnStats> {
        let mut l = self.listeners.lock();
        if let Some((_, s)) = l.iter().find(|(n, _)| *n == name) {
            return s.clone();
        }
        let s = std::sync::Arc::<tessera_svc::listener::ConnStats>::default();
        l.push((name, s.clone()));
        s
    }

    /// The exposition text.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(2048);
        render_results(
            &self.issuance.x509,
            &mut out,
            "tessera_server_x509_svids_issued_total",
            "X509-SVIDs signed, by result.",
        );
        render_results(
            &self.issuance.jwt,
            &mut out,
            "tessera_server_jwt_svids_issued_total",
            "JWT-SVIDs minted, by result.",
        );
        render_results(
            &self.attestations,
            &mut out,
            "tessera_server_agent_attestations_total",
            "Agent attestations, by result.",
        );
        let gauges = [
            (
                "tessera_server_ready",
                "1 when the CA has an active authority and the store answers.",
                i64::from(g.ready),
            ),
            ("tessera_server_ca_expiry_timestamp_seconds", "notAfter of the active X.509 CA.", g.ca_expiry),
            (
                "tessera_server_bundle_sequence",
                "Sequence number of our trust bundle.",
                i64::try_from(g.bundle_sequence).unwrap_or(i64::MAX),
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP tessera_server_rate_limited_total Agent API calls refused by a rate limit.\n# TYPE tessera_server_rate_limited_total counter\ntessera_server_rate_limited_total{{limit=\"svids_per_agent\"}} {}\ntessera_server_rate_limited_total{{limit=\"attestations_per_ip\"}} {}",
            self.rate_limited_svids.load(Ordering::Relaxed),
            self.rate_limited_attestations.load(Ordering::Relaxed)
        );
        {
            let listeners = self.listeners.lock();
            tessera_svc::listener::render_headers(&mut out, "tessera_server");
            for (name, s) in listeners.iter() {
                s.render(&mut out, "tessera_server", name);
            }
        }
        render_doctor_gauges(&mut out, g);
        if let Some(p) = &g.plugin {
            let _ = writeln!(
                out,
                "# HELP tessera_server_plugin_up 1 when the external plugin answers its health checks.\n# TYPE tessera_server_plugin_up gauge\ntessera_server_plugin_up{{kind=\"upstream_authority\"}} {}",
                i64::from(p.up)
            );
            let _ = writeln!(
                out,
                "# HELP tessera_server_plugin_restarts_total Restarts of the external plugin.\n# TYPE tessera_server_plugin_restarts_total counter\ntessera_server_plugin_restarts_total{{kind=\"upstream_authority\"}} {}",
                p.restarts
            );
        }
        out
    }
}
