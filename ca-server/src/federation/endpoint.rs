//! Our SPIFFE bundle endpoint: `GET /` answers the trust domain's bundle document (JWKS with
//! `spiffe_sequence` and `spiffe_refresh_hint`); other methods 405, other paths 404. HTTP/1.1
//! over TLS with either profile: `https_spiffe` presents the server's rotating SVID,
//! `https_web` a certificate from files, reloaded when the files change.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use tessera_ca::Ca;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for changes (on handshakes, not in a loop).
const RELOAD_CHECK: Duration = Duration::from_secs(1);

type Stamp = Vec<(SystemTime, u64)>;

fn stamp(paths: &[&Path]) -> Option<Stamp> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())))
        .collect()
}

/// An `https_web` serving certificate from PEM files, reloaded when their modification time
/// or size changes. A failed reload keeps serving the previous certificate.
#[derive(Debug)]
pub struct FileCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    state: RwLock<(Arc<CertifiedKey>, Option<Stamp>, Instant)>,
}

fn load_cert(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("{}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let signer =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| format!("{}: {e}", key_file.display()))?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(|e| format!("{} does not match {}: {e}", key_file.display(), cert_file.display()))?;
    Ok(Arc::new(ck))
}

impl FileCert {
    /// Loads the files; fails when they are unusable.
    pub fn load(cert_file: PathBuf, key_file: PathBuf) -> Result<Self, String> {
        let ck = load_cert(&cert_file, &key_file)?;
        let st = stamp(&[&cert_file, &key_file]);
        Ok(Self { cert_file, key_file, state: RwLock::new((ck, st, Instant::now())) })
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let (ck, old, checked) = self.state.read().clone();
        if checked.elapsed() < RELOAD_CHECK {
            return Some(ck);
        }
        let now = stamp(&[&self.cert_file, &self.key_file]);
        let ck = if now != old {
            match load_cert(&self.cert_file, &self.key_file) {
                Ok(new) => {
                    info!(cert_file = %self.cert_file.display(), "Bundle endpoint certificate reloaded");
                    new
                }
                Err(e) => {
                    warn!(error = %e, "Cannot reload the bundle endpoint certificate; serving the previous one");
                    ck
                }
            }
        } else {
            ck
        };
        {
            let mut s = self.state.write();
            *s = (ck.clone(), now, Instant::now());
        }
        Some(ck)
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// The served document: our bundle with the configured refresh hint.
fn document(ca: &Ca, refresh_hint: Duration) -> Result<String, String> {
    let mut b = (*ca.bundle()).clone();
    b.refresh_hint = Some(refresh_hint.as_secs().max(1));
    b.to_jwks().map_err(|e| e.to_string())
}

fn handle(ca: &Ca, refresh_hint: Duration, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (code, body, json) = if req.method() != Method::GET && req.method() != Method::HEAD {
        (StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".to_owned(), false)
    } else if req.uri().path() != "/" {
        (StatusCode::NOT_FOUND, "not found\n".to_owned(), false)
    } else {
        match document(ca, refresh_hint) {
            Ok(d) => (StatusCode::OK, d, true),
            Err(e) => {
                warn!(error = %e, "Cannot render our bundle");
                (StatusCode::SERVICE_UNAVAILABLE, "bundle unavailable\n".to_owned(), false)
            }
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    let h = r.headers_mut();
    let ct = if json { "application/json" } else { "text/plain" };
    h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ct));
    if code == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
    }
    r
}

/// TLS settings for the endpoint: any TLS version rustls offers by default, no client
/// certificates, HTTP/1.1.
pub fn tls_config(resolver: Arc<dyn ResolvesServerCert>) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(tessera_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves the bundle endpoint on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ca: Arc<Ca>,
    refresh_hint: Duration,
    gate: tessera_svc::listener::ConnGate,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            c = listener.accept() => match c {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "Bundle endpoint accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // Every caller is anonymous here: the cap and the per-IP share both apply.
        let Some(slot) = gate.admit(Some(tessera_svc::listener::Share::Ip(peer.ip()))) else {
            debug!(%peer, "Bundle endpoint at its connection limit (or this address's share); dropping connection");
            continue;
        };
        let (acceptor, ca, idle) = (acceptor.clone(), ca.clone(), gate.limits().idle_timeout);
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return debug!(%peer, error = %e, "Bundle endpoint TLS handshake failed"),
                Err(_) => return debug!(%peer, "Bundle endpoint TLS handshake timed out"),
            };
            let svc = hyper::service::service_fn(move |req| {
                let ca = ca.clone();
                async move { Ok::<_, Infallible>(handle(&ca, refresh_hint, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tessera_svc::listener::IdleIo::bytes(tls, idle, Some(slot))), svc);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "Bundle endpoint connection ended with an error");
            }
        });
    }
}
