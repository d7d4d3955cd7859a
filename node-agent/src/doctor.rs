//! What `tessera-agent doctor` and `debug info` read: the agent's own view of itself — its
//! link to the server, its clock against the server's, its trust bundle (in memory, on disk,
//! in the cert files it writes), its SVIDs' rotation, its sockets, and which entries no
//! workload has asked for. Checks only read. The codes are documented in docs/doctor.md.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tessera_identity::unix_now;
use tessera_svc::doctor::{Finding, Report, Severity};

use crate::manager::Manager;

/// Clock skew beyond the server's backdating of certificates (10 s): an SVID can be
/// "not yet valid" to peers whose clock is that far behind.
pub const CLOCK_SKEW_ALLOWANCE_MS: i64 = 10_000;

/// A certificate of a chain as `debug info` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertInfo {
    /// Its SPIFFE ID (or trust domain ID); empty when none.
    pub spiffe_id: String,
    /// Hex serial.
    pub serial: String,
    /// Unix seconds.
    pub not_after: i64,
}

/// Counts in `debug info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Counts {
    /// Entries the agent holds.
    pub entries: usize,
    /// Cached X509-SVIDs.
    pub x509_svids: usize,
    /// Cached JWT-SVIDs.
    pub jwt_svids: usize,
    /// Federated bundles held.
    pub federated_bundles: usize,
    /// Open SDS streams.
    pub sds_streams: u64,
    /// Open Workload API streams.
    pub workload_api_streams: u64,
}

/// `tessera-agent debug info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AgentInfo {
    /// The agent's version.
    pub version: String,
    /// Its SPIFFE ID.
    pub agent_id: String,
    /// Its trust domain.
    pub trust_domain: String,
    /// The server replicas it syncs with.
    pub servers: Vec<String>,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// Unix seconds of the last successful sync (0: none yet).
    pub last_sync: i64,
    /// The last failed sync's error, when the last pass failed.
    pub last_sync_error: Option<String>,
    /// Server clock minus ours, milliseconds (None until measured).
    pub clock_skew_ms: Option<i64>,
    /// Our bundle's sequence number.
    pub bundle_sequence: u64,
    /// Counts.
    pub counts: Counts,
    /// The agent's own SVID chain, leaf first.
    pub svid_chain: Vec<CertInfo>,
}

fn cert_info(der: &[u8]) -> Option<CertInfo> {
    let f = tessera_identity::x509::cert_facts(der).ok()?;
    Some(CertInfo { spiffe_id: f.uris.first().cloned().unwrap_or_default(), serial: f.serial, not_after: f.not_after })
}

fn ago(now: i64, t: i64) -> String {
    let d = std::time::Duration::from_secs((now - t).unsigned_abs());
    if now >= t {
        format!("{} ago", humantime::format_duration(d))
    } else {
        format!("in {}", humantime::format_duration(d))
    }
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// `debug info`.
pub fn info(mgr: &Manager) -> AgentInfo {
    let snap = mgr.snapshot();
    let cfg = mgr.config();
    let (chain, _, _) = mgr.own_svid();
    let m = &mgr.metrics;
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        agent_id: mgr.agent_id().to_string(),
        trust_domain: cfg.trust_domain.to_string(),
        servers: cfg.servers.clone(),
        uptime_seconds: mgr.observed.started.elapsed().as_secs(),
        last_sync: m.last_sync.load(Ordering::Relaxed),
        last_sync_error: mgr.observed.last_sync_error.lock().as_ref().map(|(_, e)| e.clone()),
        clock_skew_ms: mgr
            .observed
            .skew_measured
            .load(Ordering::Relaxed)
            .then(|| m.clock_skew_ms.load(Ordering::Relaxed)),
        bundle_sequence: snap.bundle.sequence_number,
        counts: Counts {
            entries: mgr.entries().len(),
            x509_svids: snap.svids.len(),
            jwt_svids: mgr.cached_jwt_svids(),
            federated_bundles: snap.federated.len(),
            sds_streams: m.sds_streams.load(Ordering::Relaxed),
            workload_api_streams: m.workload_streams.load(Ordering::Relaxed),
        },
        svid_chain: chain.iter().filter_map(|c| cert_info(c)).collect(),
    }
}

/// Every check, as one report.
pub fn doctor(mgr: &Arc<Manager>) -> Report {
    let mut out = Vec::new();
    let now = unix_now();
    let cfg = mgr.config();
    let server = cfg.servers.join(",");

    // The link to the server.
    if let Some((at, e)) = mgr.observed.last_sync_error.lock().clone() {
        let last = mgr.metrics.last_sync.load(Ordering::Relaxed);
        out.push(Finding::new(
            "upstream-unreachable",
            Severity::Error,
            server.clone(),
            format!(
                "the last sync with the server failed ({}): {e}; last success: {}",
                ago(now, at),
                if last == 0 { "never".to_owned() } else { ago(now, last) }
            ),
            "check that the server's Agent API is reachable from this node (address, firewall, TLS trust); the agent serves its cached SVIDs until they expire",
        ));
    }

    // Clock skew, as measured against the server's answers.
    if mgr.observed.skew_measured.load(Ordering::Relaxed) {
        let skew = mgr.metrics.clock_skew_ms.load(Ordering::Relaxed);
        if skew.abs() > CLOCK_SKEW_ALLOWANCE_MS {
            out.push(Finding::new(
                "clock-skew",
                Severity::Warning,
                "clock",
                format!(
                    "this node's clock is {:.1}s {} the server's, more than the {}s certificates are backdated by: peers may see new SVIDs as not yet valid, or expired ones as valid",
                    skew.abs() as f64 / 1000.0,
                    if skew > 0 { "behind" } else { "ahead of" },
                    CLOCK_SKEW_ALLOWANCE_MS / 1000
                ),
                "synchronise the node's clock (chrony/NTP); expiry errors on this node may be the clock, not the certificates",
            ));
        }
    }

    check_bundles(mgr, now, &mut out);
    check_svids(mgr, now, &mut out);
    check_sockets(mgr, &mut out);

    // Entries no workload has received.
    let after = secs(cfg.entry_unmatched_after);
    let entries = mgr.entries();
    let seen = mgr.observed.entries.lock().clone();
    for e in entries.iter().filter(|e| !e.selectors.is_empty()) {
        let Some((first, served)) = seen.get(&e.id) else { continue };
        let since = served.unwrap_or(*first);
        if served.is_none() && now - since > after {
            let selectors: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
            out.push(Finding::new(
                "entry-unmatched",
                Severity::Info,
                e.spiffe_id.to_string(),
                format!(
                    "entry {} ({}) has been on this node for {} and no workload has received its SVID: its selectors may match no running process",
                    e.id,
                    selectors.join(" "),
                    ago(now, *first).trim_end_matches(" ago")
                ),
                "compare the entry's selectors with the workload's (uid, path, pod labels); delete the entry if the workload no longer runs here",
            ));
        }
    }
    Report::new(out)
}

/// The SKIs of `bundle`'s X.509 authorities.
fn skis(b: &tessera_identity::Bundle) -> Vec<String> {
    b.x509_authorities
        .iter()
        .filter_map(|c| tessera_identity::x509::cert_facts(c).ok())
        .filter_map(|f| f.subject_key_id)
        .collect()
}

fn check_bundles(mgr: &Arc<Manager>, now: i64, out: &mut Vec<Finding>) {
    let snap = mgr.snapshot();
    let held = skis(&snap.bundle);
    // The newest SVID the agent holds is signed by the server's current authority: its chain
    // must lead to a root of the bundle.
    let (own_chain, _, _) = mgr.own_svid();
    let newest = snap
        .svids
        .iter()
        .map(|s| s.chain.clone())
        .chain(std::iter::once(own_chain))
        .filter_map(|c| {
            let facts: Vec<_> = c.iter().filter_map(|d| tessera_identity::x509::cert_facts(d).ok()).collect();
            facts.first().map(|f| f.not_before).map(|nb| (nb, facts))
        })
        .max_by_key(|(nb, _)| *nb);
    if let Some((_, facts)) = newest {
        let anchored = facts.iter().any(|f| {
            f.subject_key_id.as_ref().is_some_and(|k| held.contains(k))
                || f.authority_key_id.as_ref().is_some_and(|k| held.contains(k))
        });
        if !anchored {
            let issuer = facts.last().and_then(|f| f.authority_key_id.clone()).unwrap_or_default();
            out.push(Finding::new(
                "bundle-stale",
                Severity::Error,
                "trust bundle",
                format!(
                    "the agent's trust bundle (sequence {}) lacks the authority {issuer} that signs its newest SVIDs: peers with this bundle reject them",
                    snap.bundle.sequence_number
                ),
                "check that the agent can fetch bundles (see upstream-unreachable); restart it to refetch",
            ));
        }
    }
    let current = skis(&snap.bundle);
    // The bundle the agent keeps on disk (it starts from it after a restart).
    match crate::client::load_state(mgr.files(), &mgr.config().trust_domain) {
        Ok(Some((_, disk))) => {
            let missing: Vec<&String> = current.iter().filter(|s| !skis(&disk).contains(s)).collect();
            if !missing.is_empty() {
                out.push(Finding::new(
                    "bundle-stale",
                    Severity::Warning,
                    mgr.files().dir().join("bundle.json").display().to_string(),
                    format!(
                        "the bundle saved on disk (sequence {}) lacks {} of the current authorities: after a restart the agent would not trust the server",
                        disk.sequence_number,
                        missing.len()
                    ),
                    "check that the data directory is writable (disk full, read-only mount); the agent rewrites the file on every bundle change",
                ));
            }
        }
        Ok(None) => {}
        Err(e) => out.push(Finding::new(
            "bundle-stale",
            Severity::Warning,
            mgr.files().dir().display().to_string(),
            format!("the agent's saved state cannot be read: {e}"),
            "check the data directory's files and permissions",
        )),
    }
    // The bundles written as cert files for applications.
    for t in &mgr.config().cert_files {
        let path = t.dir.join("root-cert.pem");
        let Ok(pem) = std::fs::read(&path) else { continue };
        let on_disk: Vec<String> = tessera_identity::pem::decode_certs(&pem)
            .unwrap_or_default()
            .iter()
            .filter_map(|c| tessera_identity::x509::cert_facts(c).ok())
            .filter_map(|f| f.subject_key_id)
            .collect();
        let missing = current.iter().filter(|s| !on_disk.contains(s)).count();
        if missing > 0 {
            let modified = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(0));
            out.push(Finding::new(
                "bundle-stale",
                Severity::Warning,
                path.display().to_string(),
                format!(
                    "this bundle file lacks {missing} of the agent's current authorities (written {}): applications reading it reject peers signed by them",
                    modified.map_or_else(|| "at an unknown time".to_owned(), |m| ago(now, m))
                ),
                "check the agent's log for \"Cannot write cert files\" and the directory's permissions; nothing else should write this file",
            ));
        }
    }
}

fn check_svids(mgr: &Arc<Manager>, now: i64, out: &mut Vec<Finding>) {
    // Past its rotation point by more than a few sync intervals (a minute at least).
    let grace = secs(mgr.config().sync_interval).saturating_mul(3).max(60);
    let snap = mgr.snapshot();
    for s in &snap.svids {
        if s.not_after <= now {
            out.push(Finding::new(
                "svid-overdue",
                Severity::Error,
                s.entry.spiffe_id.to_string(),
                format!("the cached SVID (serial {}) expired {}", s.serial, ago(now, s.not_after)),
                "the agent cannot get it signed: see upstream-unreachable and the agent log",
            ));
        } else if now > s.rotate_at + grace {
            out.push(Finding::new(
                "svid-overdue",
                Severity::Warning,
                s.entry.spiffe_id.to_string(),
                format!(
                    "the cached SVID (serial {}) was due for rotation {} and expires {}",
                    s.serial,
                    ago(now, s.rotate_at),
                    ago(now, s.not_after)
                ),
                "the agent cannot get it signed: see upstream-unreachable and the agent log",
            ));
        }
    }
    let (_, renew_at, not_after) = mgr.own_svid();
    if not_after <= now {
        out.push(Finding::new(
            "svid-overdue",
            Severity::Error,
            mgr.agent_id().to_string(),
            format!("the agent's own SVID expired {}", ago(now, not_after)),
            "the agent must attest again: give it a new join token (see docs/agent.md)",
        ));
    } else if now > renew_at + grace {
        out.push(Finding::new(
            "svid-overdue",
            Severity::Warning,
            mgr.agent_id().to_string(),
            format!(
                "the agent's own SVID was due for renewal {} and expires {}",
                ago(now, renew_at),
                ago(now, not_after)
            ),
            "check the link to the server (upstream-unreachable) and the agent log",
        ));
    }
}

fn check_sockets(mgr: &Arc<Manager>, out: &mut Vec<Finding>) {
    let cfg = mgr.config();
    match std::fs::metadata(&cfg.socket_path) {
        Ok(m) => {
            let mode = m.permissions().mode() & 0o777;
            if mode & 0o006 != 0o006 {
                out.push(Finding::new(
                    "socket-permissions",
                    Severity::Warning,
                    cfg.socket_path.display().to_string(),
                    format!("the Workload API socket has mode {mode:03o}: workloads of other users cannot connect"),
                    "restart the agent (it sets 0777; attestation decides what each caller gets) and make sure nothing changes the mode",
                ));
            }
            if let Some(dir) = cfg.socket_path.parent()
                && let Ok(d) = std::fs::metadata(dir)
                && d.permissions().mode() & 0o001 == 0
            {
                out.push(Finding::new(
                    "socket-permissions",
                    Severity::Warning,
                    dir.display().to_string(),
                    format!(
                        "the socket's directory has mode {:03o}: other users cannot reach the socket in it",
                        d.permissions().mode() & 0o777
                    ),
                    "make the directory searchable by workloads (0755)",
                ));
            }
        }
        Err(e) => out.push(Finding::new(
            "socket-permissions",
            Severity::Error,
            cfg.socket_path.display().to_string(),
            format!("the Workload API socket is gone: {e}"),
            "restart the agent; check that nothing removes files in the socket directory",
        )),
    }
    if let Ok(m) = std::fs::metadata(&cfg.admin_socket_path) {
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push(Finding::new(
                "socket-permissions",
                Severity::Warning,
                cfg.admin_socket_path.display().to_string(),
                format!("the admin socket has mode {mode:03o}: other users can read the agent's state"),
                "restart the agent (it creates the socket 0600)",
            ));
        }
    }
}
