//! The health and metrics listener: plain HTTP/1.1, `GET /live`, `/ready`, `/metrics`;
//! anything else 404, other methods 405, 5 s to send the request head.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What a binary reports.
#[async_trait]
pub trait Probe: Send + Sync + 'static {
    /// Whether `/ready` answers 200.
    async fn ready(&self) -> bool;
    /// The Prometheus text for `/metrics`.
    async fn metrics(&self) -> String;
    /// Extra lines for the `/ready` body (component states); empty by default.
    async fn detail(&self) -> String {
        String::new()
    }
    /// Whether `/live` answers 200: false only when the process cannot recover without a
    /// restart. True by default.
    async fn live(&self) -> bool {
        true
    }
}

async fn handle(probe: &dyn Probe, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (code, body, prometheus) = if req.method() != Method::GET {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".to_owned(), false)
    } else {
        match req.uri().path() {
            "/live" if probe.live().await => (StatusCode::OK, "live\n".to_owned(), false),
            "/live" => (StatusCode::SERVICE_UNAVAILABLE, "not live: restart needed\n".to_owned(), false),
            "/ready" if probe.ready().await => (StatusCode::OK, format!("ready\n{}", probe.detail().await), false),
            "/ready" => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready\n{}", probe.detail().await), false),
            "/metrics" => (StatusCode::OK, probe.metrics().await, true),
            _ => (StatusCode::NOT_FOUND, "not found\n".to_owned(), false),
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if prometheus {
        r.headers_mut()
            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"));
    }
    r
}

/// Connections from loopback, apart from the listener's cap.
const LOOPBACK_CONNECTIONS: usize = 64;

/// Serves `probe` on `listener` until `shutdown` fires, within `gate` (connections from
/// loopback within a reserve of their own).
pub async fn serve(
    listener: TcpListener,
    probe: Arc<dyn Probe>,
    gate: crate::listener::ConnGate,
    mut shutdown: watch::Receiver<bool>,
) {
    let reserved = crate::listener::ConnLimits {
        max_connections: LOOPBACK_CONNECTIONS,
        max_anonymous_per_ip: LOOPBACK_CONNECTIONS,
        max_per_peer: LOOPBACK_CONNECTIONS,
        ..gate.limits()
    };
    let loopback = crate::listener::ConnGate::new(reserved, gate.stats());
    loop {
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
            _ = shutdown.changed() => break,
        };
        // Loopback has places of its own: a probe on 127.0.0.1 (the kubelet's, with the
        // host's network) gets in however many other addresses hold.
        let slot = if peer.ip().is_loopback() {
            loopback.admit(None)
        } else {
            gate.admit(Some(crate::listener::Share::Ip(peer.ip())))
        };
        let Some(slot) = slot else { continue };
        let idle = gate.limits().idle_timeout;
        let probe = probe.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let probe = probe.clone();
                async move { Ok::<_, Infallible>(handle(probe.as_ref(), &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                // Probes and scrapers send a few hundred bytes; a bigger head is refused.
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(crate::listener::IdleIo::bytes(tcp, idle, Some(slot))), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "Health connection ended with an error");
            }
        });
    }
}
