//! One HTTPS GET of a peer's bundle document, authenticated per the SPIFFE Federation
//! profiles, with a bounded body and a deadline (`tessera_svc::http`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tessera_identity::SpiffeId;
use tessera_identity::tls::{Authorize, SYSTEM_CA_FILE, web_client_config};
use tessera_svc::http::{Request, Url};

/// A bundle endpoint URL: `https` only.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let u = Url::parse(url)?;
    if !u.tls {
        return Err(format!("bundle endpoint URL {url:?} must use https"));
    }
    Ok(u)
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
            web_client_config(&pem).map_err(|e| format!("{}: {e}", path.display()))?
        }
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// GETs `url` and returns the body, refusing any status but 200 and bodies over `limit`.
pub async fn get(url: &str, trust: Trust, limit: usize, deadline: Duration) -> Result<Vec<u8>, String> {
    let u = parse_url(url)?;
    let cfg = Arc::new(tls_config(trust)?);
    let req = Request { method: "GET", url: &u, headers: &[("accept", "application/json")], body: Vec::new() };
    let (status, body) = tessera_svc::http::send(req, Some(cfg), limit, deadline).await?;
    if status != 200 {
        return Err(format!("HTTP status {status}"));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_endpoints_must_be_https() {
        assert_eq!(parse_url("https://b.example").unwrap().port, 443);
        assert!(parse_url("http://b.example").unwrap_err().contains("https"));
        assert!(parse_url("b.example:8443").is_err());
    }
}
