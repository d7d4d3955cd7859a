//! One HTTPS GET of a peer's bundle document, authenticated per the SPIFFE Federation
//! profiles, with a bounded body and a deadline. HTTP/1.1 over tokio-rustls, one connection
//! per fetch (a fetch every few minutes needs no pool).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};
use tessera_identity::SpiffeId;
use tessera_identity::tls::Authorize;
use tokio::net::TcpStream;

/// The system CA bundle used for `https_web` peers without their own `ca_bundle_path`.
const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A parsed bundle endpoint URL.
#[derive(Debug, Clone)]
pub struct Target {
    host: String,
    port: u16,
    path: String,
    authority: String,
}

impl Target {
    /// Parses an `https://host[:port][/path]` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("bundle endpoint URL {url:?}: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("bundle endpoint URL {url:?} must use https"));
        }
        let authority = uri.authority().ok_or_else(|| format!("bundle endpoint URL {url:?} has no host"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(format!("bundle endpoint URL {url:?} has no host"));
        }
        Ok(Self {
            host,
            port: authority.port_u16().unwrap_or(443),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            authority: authority.as_str().to_owned(),
        })
    }
}

/// How the endpoint is authenticated.
#[derive(Debug)]
pub enum Trust {
    /// `https_spiffe`: the endpoint's SVID chains to `roots` and carries `id`.
    Spiffe {
        /// The X.509 authorities of the endpoint's trust domain.
        roots: Vec<CertificateDer<'static>>,
        /// The endpoint's SPIFFE ID.
        id: SpiffeId,
    },
    /// `https_web`: Web PKI with the host name checked.
    Web {
        /// PEM trust anchors; the system bundle when `None`.
        ca_file: Option<PathBuf>,
    },
}

fn tls_config(trust: Trust) -> Result<rustls::ClientConfig, String> {
    let mut cfg = match trust {
        Trust::Spiffe { roots, id } => {
            tessera_identity::tls::client_config(&roots, Authorize::Id(id), None).map_err(|e| e.to_string())?
        }
        Trust::Web { ca_file } => {
            let path = ca_file.unwrap_or_else(|| PathBuf::from(SYSTEM_CA_FILE));
            let pem = std::fs::read(&path).map_err(|e| format!("cannot read CA bundle {}: {e}", path.display()))?;
            let mut roots = RootCertStore::empty();
            for c in tessera_identity::pem::decode_certs(&pem).map_err(|e| format!("{}: {e}", path.display()))? {
                roots.add(c).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            rustls::ClientConfig::builder_with_provider(tessera_identity::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// GETs `url` and returns the body, refusing any status but 200 and bodies over `limit`.
pub async fn get(url: &str, trust: Trust, limit: usize, deadline: Duration) -> Result<Vec<u8>, String> {
    let target = Target::parse(url)?;
    let cfg = tls_config(trust)?;
    tokio::time::timeout(deadline, get_inner(target, cfg, limit))
        .await
        .map_err(|_| format!("no complete answer within {}s", deadline.as_secs()))?
}

async fn get_inner(t: Target, cfg: rustls::ClientConfig, limit: usize) -> Result<Vec<u8>, String> {
    let name = ServerName::try_from(t.host.clone()).map_err(|e| format!("host {:?}: {e}", t.host))?;
    let tcp = TcpStream::connect((t.host.as_str(), t.port)).await.map_err(|e| format!("connect: {e}"))?;
    let tls =
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let req = hyper::Request::get(t.path.as_str())
        .header(hyper::header::HOST, t.authority.as_str())
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, concat!("tessera-server/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
    let status = resp.status();
    if status != hyper::StatusCode::OK {
        driver.abort();
        return Err(format!("HTTP status {status}"));
    }
    let body = Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("body is over the {limit}-byte limit")
            } else {
                format!("reading body: {e}")
            }
        })?
        .to_bytes();
    driver.abort();
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_with_default_port_and_path() {
        let t = Target::parse("https://b.example").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("b.example", 443, "/"));
        let t = Target::parse("https://[::1]:8443/bundle?x=1").unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 8443, "/bundle?x=1"));
        assert!(Target::parse("http://b.example").unwrap_err().contains("https"));
        assert!(Target::parse("b.example:8443").is_err());
    }
}
