//! rustls verifiers that authenticate a peer by SPIFFE ID against a bundle (SPIFFE X509-SVID
//! spec §5), and helpers to read a peer's SPIFFE ID.
//!
//! Chain building and signature checks are webpki's; this module adds the SPIFFE part: the
//! peer's leaf must carry exactly one URI SAN, and it must be the ID (or trust domain) we expect.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::{SpiffeId, TrustDomain};

/// The ring provider: Tessera's only crypto provider.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Who the peer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Authorize {
    /// Exactly this ID.
    Id(SpiffeId),
    /// Any ID in this trust domain.
    MemberOf(TrustDomain),
}

impl Authorize {
    fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Authorize::Id(want) => want == id,
            Authorize::MemberOf(td) => id.is_member_of(td),
        }
    }
}

/// The SPIFFE ID in a leaf certificate, if it has exactly one URI SAN that is one.
pub fn leaf_spiffe_id(leaf: &[u8]) -> Option<SpiffeId> {
    crate::x509::cert_facts(leaf).ok()?.spiffe_id()
}

/// Verifies a server's X509-SVID against trust anchors and an expected SPIFFE ID. The TLS
/// server name is ignored: SPIFFE authenticates the URI SAN instead.
pub struct SpiffeServerVerifier {
    roots: Vec<rustls_pki_types::TrustAnchor<'static>>,
    authorize: Authorize,
    algs: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeServerVerifier")
            .field("roots", &self.roots.len())
            .field("authorize", &self.authorize)
            .finish()
    }
}

/// Errors building a verifier.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A root certificate cannot be a trust anchor.
    #[error("bundle certificate is not a usable trust anchor: {0}")]
    BadRoot(String),
    /// No roots.
    #[error("no trust anchors")]
    NoRoots,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

impl SpiffeServerVerifier {
    /// A verifier trusting `roots` (DER) for peers matching `authorize`.
    pub fn new(
        roots: &[CertificateDer<'_>],
        authorize: Authorize,
        provider: &CryptoProvider,
    ) -> Result<Self, TlsError> {
        let roots = roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r).map(|a| a.to_owned()).map_err(|e| TlsError::BadRoot(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        Ok(Self { roots, authorize, algs: provider.signature_verification_algorithms })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| rustls::Error::General(e.to_string()))?;
        cert.verify_for_usage(
            self.algs.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        let id = leaf_spiffe_id(end_entity)
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        if !self.authorize.allows(&id) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Always presents one certificate and key.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client config that authenticates the server by SPIFFE ID and presents `client` (chain,
/// key) when given.
pub fn client_config(
    roots: &[CertificateDer<'_>],
    authorize: Authorize,
    client: Option<(Vec<CertificateDer<'static>>, &crate::PrivateKey)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier::new(roots, authorize, &provider)?);
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match client {
        Some((chain, key)) => {
            // The signing key is loaded from a borrowed view of the key, so no owned copy of
            // the key bytes outlives this call unzeroized (rustls' `with_client_auth_cert`
            // would take one by value).
            let signer = rustls::crypto::ring::sign::any_supported_type(&key.to_rustls())
                .map_err(|e| TlsError::Config(e.to_string()))?;
            let ck = Arc::new(rustls::sign::CertifiedKey::new(chain, signer));
            builder.with_client_cert_resolver(Arc::new(ClientCert(ck)))
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Where Debian (and most distributions) keep the system's Web PKI trust anchors.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A Web PKI client config (host name checked, no client certificate) trusting the PEM
/// certificates in `ca_pem`, for control-plane peers: bundle endpoints (`https_web`), Vault,
/// PostgreSQL.
pub fn web_client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::pem::decode_certs(ca_pem).map_err(|e| TlsError::BadRoot(e.to_string()))? {
        roots.add(c).map_err(|e| TlsError::BadRoot(e.to_string()))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Verifiers that skip authentication. Only for an agent's first contact with
/// `insecure_bootstrap = true`, which the docs mark as development-only.
pub mod danger {
    use super::*;

    /// Accepts any server certificate; handshake signatures are still checked, so the peer
    /// must hold the key of the certificate it shows.
    #[derive(Debug)]
    pub struct AcceptAnyServer {
        algs: WebPkiSupportedAlgorithms,
    }

    impl AcceptAnyServer {
        /// A verifier using `provider`'s signature algorithms.
        pub fn new(provider: &CryptoProvider) -> Self {
            Self { algs: provider.signature_verification_algorithms }
        }
    }

    impl ServerCertVerifier for AcceptAnyServer {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    }

    /// A client config that trusts any server (first contact only).
    pub fn insecure_client_config() -> Result<rustls::ClientConfig, TlsError> {
        let provider = provider();
        let verifier = Arc::new(AcceptAnyServer::new(&provider));
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(cfg)
    }
}
