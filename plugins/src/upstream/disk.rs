//! The `disk` upstream: a CA certificate and key in PEM files sign our intermediate. Reads
//! either explicit files or Istio's `cacerts` layout (`ca-cert.pem`, `ca-key.pem`,
//! `cert-chain.pem`, `root-cert.pem`). The files are re-read when their modification time or
//! size changes, checked on every call, so a replaced root or CA is picked up without a
//! restart; a broken replacement is refused and the previous files stay in use.

use parking_lot::Mutex;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rcgen::{Issuer, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer};
use tessera_identity::unix_now;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{MintedX509Ca, UpstreamAuthority, UpstreamError};

const NAME: &str = "disk";

/// Where the upstream CA's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFiles {
    /// The upstream CA certificate (PEM) that signs our intermediate.
    pub cert_file: PathBuf,
    /// Its private key (PEM, PKCS#8 or SEC1).
    pub key_file: PathBuf,
    /// Intermediates between `cert_file` and the root (PEM), if any. Copies of the CA
    /// certificate itself or of a root in it are ignored, so Istio's `cert-chain.pem` works.
    pub chain_file: Option<PathBuf>,
    /// The roots (PEM). Optional when `cert_file` is self-signed: it is then the root.
    pub bundle_file: Option<PathBuf>,
}

impl DiskFiles {
    /// Istio's plugged-in CA layout (`istioctl`/`cacerts` secret) in `dir`.
    pub fn istio_cacerts(dir: &Path) -> Self {
        Self {
            cert_file: dir.join("ca-cert.pem"),
            key_file: dir.join("ca-key.pem"),
            chain_file: Some(dir.join("cert-chain.pem")).filter(|p| p.exists()),
            bundle_file: Some(dir.join("root-cert.pem")),
        }
    }

    fn paths(&self) -> Vec<&Path> {
        let mut v = vec![self.cert_file.as_path(), self.key_file.as_path()];
        v.extend(self.chain_file.as_deref());
        v.extend(self.bundle_file.as_deref());
        v
    }
}

struct Loaded {
    stamp: Vec<Option<(SystemTime, u64)>>,
    issuer: Issuer<'static, KeyPair>,
    not_after: i64,
    /// Upstream CA certificate then intermediates, without roots.
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
}

/// The `disk` upstream authority.
pub struct DiskUpstream {
    files: DiskFiles,
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for DiskUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskUpstream").field("cert_file", &self.files.cert_file).finish_non_exhaustive()
    }
}

fn config_err(reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Config { upstream: NAME, reason: reason.into() }
}

fn stamp(files: &DiskFiles) -> Vec<Option<(SystemTime, u64)>> {
    files
        .paths()
        .iter()
        .map(|p| std::fs::metadata(p).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())))
        .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, UpstreamError> {
    let pem = std::fs::read(path).map_err(|e| config_err(format!("cannot read {}: {e}", path.display())))?;
    let certs =
        tessera_identity::pem::decode_certs(&pem).map_err(|e| config_err(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(config_err(format!("{} holds no certificate", path.display())));
    }
    Ok(certs)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, UpstreamError> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| config_err(format!("certificate: {e}")))
}

fn self_signed(c: &X509Certificate<'_>) -> bool {
    c.subject().as_raw() == c.issuer().as_raw() && c.verify_signature(None).is_ok()
}

fn load(files: &DiskFiles) -> Result<Loaded, UpstreamError> {
    let stamp = stamp(files);
    let ca = read_certs(&files.cert_file)?.into_iter().next().ok_or_else(|| config_err("no CA certificate"))?;
    let ca_cert = parse(&ca)?;
    if !ca_cert.is_ca() {
        return Err(config_err(format!("{} is not a CA certificate", files.cert_file.display())));
    }
    let not_after = ca_cert.validity().not_after.timestamp();
    let key_pem = std::fs::read_to_string(&files.key_file)
        .map_err(|e| config_err(format!("cannot read {}: {e}", files.key_file.display())))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| config_err(format!("{}: {e}", files.key_file.display())))?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != ca_cert.public_key().raw {
        return Err(config_err(format!("{} does not match {}", files.key_file.display(), files.cert_file.display())));
    }
    let roots: Vec<Vec<u8>> = match &files.bundle_file {
        Some(p) => read_certs(p)?.into_iter().map(|c| c.to_vec()).collect(),
        None if self_signed(&ca_cert) => vec![ca.to_vec()],
        None => {
            return Err(config_err(format!(
                "{} is not self-signed: set bundle_file to the root(s)",
                files.cert_file.display()
            )));
        }
    };
    for r in &roots {
        if !parse(r)?.is_ca() {
            return Err(config_err("a root in bundle_file is not a CA certificate"));
        }
    }
    let mut chain = Vec::new();
    if !roots.iter().any(|r| r.as_slice() == ca.as_ref()) {
        chain.push(ca.to_vec());
    }
    if let Some(p) = &files.chain_file {
        for c in read_certs(p)? {
            let c = c.to_vec();
            if c.as_slice() != ca.as_ref() && !roots.contains(&c) && !chain.contains(&c) {
                chain.push(c);
            }
        }
    }
    let issuer = Issuer::from_ca_cert_der(&ca, key).map_err(|e| config_err(format!("CA certificate: {e}")))?;
    Ok(Loaded { stamp, issuer, not_after, chain, roots })
}

impl DiskUpstream {
    /// Loads the files; fails when they are unusable.
    pub fn new(files: DiskFiles) -> Result<Self, UpstreamError> {
        let loaded = load(&files)?;
        Ok(Self { files, loaded: Mutex::new(loaded) })
    }

    /// Re-reads the files when they changed; keeps the loaded ones when the new ones fail.
    fn refresh(&self) -> Result<parking_lot::MutexGuard<'_, Loaded>, UpstreamError> {
        let mut l = self.loaded.lock();
        if l.stamp != stamp(&self.files) {
            match load(&self.files) {
                Ok(new) => {
                    tracing::info!(cert_file = %self.files.cert_file.display(), "Upstream CA files reloaded");
                    *l = new;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Upstream CA files changed but cannot be used; keeping the loaded ones");
                    l.stamp = stamp(&self.files);
                }
            }
        }
        Ok(l)
    }
}

#[async_trait]
impl UpstreamAuthority for DiskUpstream {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn mint_x509_ca(&self, csr: &[u8], ttl: Duration) -> Result<MintedX509Ca, UpstreamError> {
        let refused = |reason: String| UpstreamError::Csr { upstream: NAME, reason };
        let req = rcgen::CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr.to_vec()))
            .map_err(|e| refused(e.to_string()))?;
        // A CA for exactly one trust domain: one URI SAN `spiffe://<td>`, nothing else.
        let td = match req.params.subject_alt_names.as_slice() {
            [SanType::URI(u)] => {
                let id = tessera_identity::SpiffeId::new(u.as_str()).map_err(|e| refused(e.to_string()))?;
                if !id.path().is_empty() {
                    return Err(refused(format!("URI SAN {id} is not a trust domain ID")));
                }
                id.trust_domain().clone()
            }
            _ => return Err(refused("a CA CSR must carry exactly one URI SAN, the trust domain ID".into())),
        };
        let l = self.refresh()?;
        let now = unix_now();
        let not_after = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)).min(l.not_after);
        if not_after <= now {
            return Err(config_err("the upstream CA certificate has expired"));
        }
        let signing = |reason: String| UpstreamError::Signing { upstream: NAME, reason };
        let serial = tessera_identity::x509::random_serial().map_err(|e| signing(e.to_string()))?;
        // Our CA profile, whatever else the CSR asked for.
        let params =
            tessera_identity::x509::ca_params(&td, now - 10, not_after, serial).map_err(|e| signing(e.to_string()))?;
        let cert = params.signed_by(&req.public_key, &l.issuer).map_err(|e| signing(e.to_string()))?;
        let mut chain = vec![cert.der().to_vec()];
        chain.extend(l.chain.iter().cloned());
        Ok(MintedX509Ca { chain, roots: l.roots.clone() })
    }

    async fn roots(&self) -> Result<Vec<Vec<u8>>, UpstreamError> {
        Ok(self.refresh()?.roots.clone())
    }
}
