//! PKCS#10 CSR inspection: parse, verify the signature, and read what the CSR asks for.
//!
//! The CA never copies extensions from a CSR: it takes the public key and checks that any
//! requested name is one the caller may have. A CSR that asks to be a CA is refused outright.

use std::fmt;

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::SpiffeId;

/// The largest CSR accepted, in bytes (an RSA-4096 CSR with a few SANs is ~1.7 KiB).
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// Why a CSR was refused. Messages never include the CSR itself.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum CsrError {
    /// Larger than [`MAX_CSR_LEN`].
    #[error("CSR is {0} bytes, over the {MAX_CSR_LEN}-byte limit")]
    TooLarge(usize),
    /// Not a DER PKCS#10 request.
    #[error("CSR does not parse as PKCS#10 DER")]
    Malformed,
    /// The self-signature does not verify.
    #[error("CSR signature does not verify")]
    BadSignature,
    /// basicConstraints cA=true was requested.
    #[error("CSR requests a CA certificate (basicConstraints cA=true)")]
    RequestsCa,
    /// The key algorithm is not one Tessera signs for.
    #[error("CSR key is not supported: {0}")]
    UnsupportedKey(String),
    /// A URI SAN other than the identity being issued.
    #[error("CSR asks for URI SAN {requested:?} but the identity is {expected}")]
    WrongUri {
        /// The URI in the CSR.
        requested: String,
        /// The SPIFFE ID being issued.
        expected: String,
    },
    /// A DNS SAN the entry does not list.
    #[error("CSR asks for DNS SAN {0:?}, which the entry does not allow")]
    DnsNotAllowed(String),
    /// An IP, e-mail or other SAN kind.
    #[error("CSR asks for a {0} SAN; only the SPIFFE ID URI and the entry's DNS names are allowed")]
    SanKindNotAllowed(&'static str),
}

/// A CSR whose signature verified. Holds the subject key and the names it requested.
#[derive(Clone)]
pub struct CheckedCsr {
    key: rcgen::SubjectPublicKeyInfo,
    rsa: bool,
    uris: Vec<String>,
    dns: Vec<String>,
    other_san: Option<&'static str>,
}

impl fmt::Debug for CheckedCsr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedCsr").field("rsa", &self.rsa).finish_non_exhaustive()
    }
}

impl CheckedCsr {
    /// Parses DER, verifies the signature, and checks the key type and CA request.
    pub fn from_der(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge(der.len()));
        }
        let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed);
        }
        csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let info = &csr.certification_request_info;
        let rsa = match info.subject_pki.parsed() {
            Ok(PublicKey::RSA(k)) => {
                let bits = k.key_size();
                if !(2048..=8192).contains(&bits) {
                    return Err(CsrError::UnsupportedKey(format!("RSA-{bits} (2048 to 8192 allowed)")));
                }
                true
            }
            Ok(PublicKey::EC(_)) => false,
            Ok(_) => return Err(CsrError::UnsupportedKey("only ECDSA and RSA keys are allowed".into())),
            Err(_) => return Err(CsrError::Malformed),
        };
        let key = rcgen::SubjectPublicKeyInfo::from_der(info.subject_pki.raw)
            .map_err(|e| CsrError::UnsupportedKey(e.to_string()))?;
        let mut out = CheckedCsr { key, rsa, uris: Vec::new(), dns: Vec::new(), other_san: None };
        if let Some(exts) = csr.requested_extensions() {
            for ext in exts {
                match ext {
                    ParsedExtension::BasicConstraints(bc) if bc.ca => return Err(CsrError::RequestsCa),
                    ParsedExtension::SubjectAlternativeName(san) => {
                        for n in &san.general_names {
                            match n {
                                GeneralName::URI(u) => out.uris.push((*u).to_owned()),
                                GeneralName::DNSName(d) => out.dns.push((*d).to_owned()),
                                GeneralName::IPAddress(_) => out.other_san = Some("IP address"),
                                GeneralName::RFC822Name(_) => out.other_san = Some("e-mail"),
                                _ => out.other_san = Some("non-URI, non-DNS"),
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Checks the requested names against what is being issued: URI SANs may only name `id`,
    /// DNS SANs must be in `allowed_dns`, and no other SAN kind is accepted.
    pub fn check_names(&self, id: &SpiffeId, allowed_dns: &[String]) -> Result<(), CsrError> {
        if let Some(kind) = self.other_san {
            return Err(CsrError::SanKindNotAllowed(kind));
        }
        let expected = id.to_string();
        if let Some(u) = self.uris.iter().find(|u| **u != expected) {
            return Err(CsrError::WrongUri { requested: u.clone(), expected });
        }
        if let Some(d) = self.dns.iter().find(|d| !allowed_dns.iter().any(|a| a.eq_ignore_ascii_case(d))) {
            return Err(CsrError::DnsNotAllowed(d.clone()));
        }
        Ok(())
    }

    /// The URI SANs requested.
    pub fn uris(&self) -> &[String] {
        &self.uris
    }

    /// The subject public key, for signing.
    pub fn public_key(&self) -> &rcgen::SubjectPublicKeyInfo {
        &self.key
    }

    /// True when the subject key is RSA.
    pub fn is_rsa(&self) -> bool {
        self.rsa
    }
}

/// Builds a CSR (DER) for `id` (and DNS names) signed by `key`. Used by agents and the CLI,
/// which keep the key.
pub fn build_csr(
    id: &SpiffeId,
    dns_names: &[String],
    key: &crate::PrivateKey,
) -> Result<Vec<u8>, crate::keys::KeyError> {
    let kp = key.to_rcgen()?;
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    let uri = id.to_string().try_into().map_err(|_| crate::keys::KeyError::Rejected("SPIFFE ID is not IA5".into()))?;
    p.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    for d in dns_names {
        let n = d.clone().try_into().map_err(|_| crate::keys::KeyError::Rejected(format!("bad DNS name {d:?}")))?;
        p.subject_alt_names.push(rcgen::SanType::DnsName(n));
    }
    let csr = p.serialize_request(&kp).map_err(|e| crate::keys::KeyError::Rejected(e.to_string()))?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PrivateKey;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn accepts_a_csr_for_the_issued_identity() {
        let key = PrivateKey::generate_ec_p256().unwrap();
        let der = build_csr(&id("spiffe://td/w"), &["w.local".into()], &key).unwrap();
        let csr = CheckedCsr::from_der(&der).unwrap();
        csr.check_names(&id("spiffe://td/w"), &["w.local".into()]).unwrap();
        assert!(!csr.is_rsa());
    }

    #[test]
    fn rejects_csr_for_another_identity_or_unlisted_dns() {
        let key = PrivateKey::generate_ec_p256().unwrap();
        let der = build_csr(&id("spiffe://td/other"), &["x.local".into()], &key).unwrap();
        let csr = CheckedCsr::from_der(&der).unwrap();
        assert!(matches!(csr.check_names(&id("spiffe://td/w"), &["x.local".into()]), Err(CsrError::WrongUri { .. })));
        assert_eq!(csr.check_names(&id("spiffe://td/other"), &[]), Err(CsrError::DnsNotAllowed("x.local".into())));
    }

    #[test]
    fn rejects_csr_with_a_bad_signature() {
        let key = PrivateKey::generate_ec_p256().unwrap();
        let mut der = build_csr(&id("spiffe://td/w"), &[], &key).unwrap();
        let last = der.len() - 3;
        der[last] ^= 0x55;
        assert_eq!(CheckedCsr::from_der(&der).unwrap_err(), CsrError::BadSignature);
    }

    #[test]
    fn rejects_csr_asking_for_ca() {
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = p.serialize_request(&kp).unwrap().der().to_vec();
        assert_eq!(CheckedCsr::from_der(&der).unwrap_err(), CsrError::RequestsCa);
    }

    #[test]
    fn rejects_garbage_truncation_and_oversize() {
        assert_eq!(CheckedCsr::from_der(b"not a csr").unwrap_err(), CsrError::Malformed);
        let key = PrivateKey::generate_ec_p256().unwrap();
        let der = build_csr(&id("spiffe://td/w"), &[], &key).unwrap();
        assert!(CheckedCsr::from_der(&der[..der.len() - 1]).is_err());
        assert_eq!(CheckedCsr::from_der(&vec![0u8; MAX_CSR_LEN + 1]).unwrap_err(), CsrError::TooLarge(MAX_CSR_LEN + 1));
    }

    #[test]
    fn debug_never_shows_the_request() {
        let key = PrivateKey::generate_ec_p256().unwrap();
        let der = build_csr(&id("spiffe://td/w"), &[], &key).unwrap();
        let dbg = format!("{:?}", CheckedCsr::from_der(&der).unwrap());
        assert!(!dbg.contains("spiffe://"), "{dbg}");
    }
}
