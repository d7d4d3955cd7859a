//! Health and metrics over plain HTTP/1.1 on one listener: `/live`, `/ready`, `/metrics`.
//! Bind it to loopback or a pod IP; it exposes no secrets.

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

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

impl Health {
    async fn ready(&self) -> bool {
        // The store must answer a read, and the CA must be able to sign.
        self.ca.is_ready() && self.store.get_bundle(self.ca.trust_domain()).await.is_ok()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let reply = |code: StatusCode, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = code;
            r
        };
        if req.method() != Method::GET {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into());
        }
        match req.uri().path() {
            "/live" => reply(StatusCode::OK, "live\n".into()),
            "/ready" => {
                if self.ready().await {
                    reply(StatusCode::OK, "ready\n".into())
                } else {
                    reply(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
                }
            }
            "/metrics" => {
                let g = Gauges {
                    ready: self.ready().await,
                    ca_expiry: self.ca.active_x509_not_after().unwrap_or(0),
                    bundle_sequence: self.ca.bundle().sequence_number,
                };
                let mut r = reply(StatusCode::OK, self.metrics.render(&g));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            _ => reply(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }

    /// Serves until `shutdown` fires.
    pub async fn run(self, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let (tcp, _) = tokio::select! {
                c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
                _ = shutdown.changed() => break,
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let this = this.clone();
                    async move { Ok::<_, Infallible>(this.handle(req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(tcp), svc);
                if let Err(e) = conn.await {
                    debug!(error = %e, "Health connection ended with an error");
                }
            });
        }
    }
}
