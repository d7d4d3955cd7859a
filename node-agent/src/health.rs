//! Health and metrics over plain HTTP/1.1: `/live`, `/ready` (the agent has synced with the
//! server at least once), `/metrics`.

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    ];
    let _ = writeln!(
        out,
        "# TYPE tessera_agent_syncs_total counter\n# TYPE tessera_agent_x509_svids_received_total counter"
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
    ];
    for (name, v) in gauges {
        let _ = writeln!(out, "# TYPE {name} gauge\n{name} {v}");
    }
    out
}

fn handle(mgr: &Manager, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (code, body) = if req.method() != Method::GET {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".to_owned())
    } else {
        match req.uri().path() {
            "/live" => (StatusCode::OK, "live\n".to_owned()),
            "/ready" if mgr.is_ready() => (StatusCode::OK, "ready\n".to_owned()),
            "/ready" => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned()),
            "/metrics" => (StatusCode::OK, metrics(mgr)),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r
}

/// Serves until `shutdown` fires.
pub async fn run(mgr: Arc<Manager>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        let mgr = mgr.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let mgr = mgr.clone();
                async move { Ok::<_, Infallible>(handle(&mgr, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(5))
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
