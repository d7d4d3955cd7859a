//! The X.509 certificate profiles Tessera issues, and the X509-SVID leaf check.
//!
//! Leaf profile (SPIFFE X509-SVID spec §4–5): exactly one URI SAN holding the SPIFFE ID (plus
//! any DNS names the entry lists), `cA=false`, keyUsage digitalSignature (+keyEncipherment for
//! RSA keys), extKeyUsage serverAuth + clientAuth, an empty subject with the SAN marked
//! critical, and a notAfter that never passes the issuer's.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod,
    KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{SpiffeId, TrustDomain};

/// Errors building a certificate profile or checking a certificate against one.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ProfileError {
    /// The requested validity ends after the issuer's.
    #[error("requested notAfter {requested} is past the issuing CA's notAfter {issuer}")]
    PastIssuer {
        /// Unix seconds requested.
        requested: i64,
        /// Unix seconds of the CA's notAfter.
        issuer: i64,
    },
    /// A time is outside what X.509 can encode.
    #[error("time {0} is out of range")]
    TimeOutOfRange(i64),
    /// A DNS name is not valid for a certificate.
    #[error("invalid DNS name {0:?}")]
    InvalidDnsName(String),
    /// The certificate DER does not parse.
    #[error("certificate does not parse: {0}")]
    Malformed(String),
    /// The certificate breaks an X509-SVID rule.
    #[error("not a valid X509-SVID leaf: {0}")]
    NotSvid(&'static str),
    /// The random generator failed.
    #[error("random generator failed")]
    Rng,
}

fn ts(t: i64) -> Result<OffsetDateTime, ProfileError> {
    OffsetDateTime::from_unix_timestamp(t).map_err(|_| ProfileError::TimeOutOfRange(t))
}

/// A random positive 128-bit serial number (RFC 5280 allows up to 20 octets).
pub fn random_serial() -> Result<[u8; 16], ProfileError> {
    let mut s = [0u8; 16];
    SystemRandom::new().fill(&mut s).map_err(|_| ProfileError::Rng)?;
    s[0] &= 0x7f;
    s[0] |= 0x01 << 6; // never zero, never a leading 0x00 octet to strip
    Ok(s)
}

/// What a leaf certificate is issued for.
#[derive(Debug, Clone)]
pub struct LeafSpec<'a> {
    /// The SPIFFE ID, the only URI SAN.
    pub spiffe_id: &'a SpiffeId,
    /// Extra DNS SANs (the entry's `dns_names`).
    pub dns_names: &'a [String],
    /// True when the subject key is RSA (adds keyEncipherment).
    pub rsa_key: bool,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// The issuing CA's notAfter, Unix seconds.
    pub issuer_not_after: i64,
    /// Serial number octets.
    pub serial: [u8; 16],
    /// What the holder may renew by presenting this certificate (Istio CA API), if anything.
    pub renewal_grant: Option<&'a RenewalGrant>,
}

/// OID of Tessera's renewal-grant extension, a private arc under 2.25 (ITU-T X.667).
pub const RENEWAL_GRANT_OID: &[u64] = &[2, 25, 6_016_170_186_473_862_163];

/// The pod a token was bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
}

/// A non-critical extension in certificates the Istio CA API issued on a service-account
/// token: the holder may renew the certificate by presenting it, within what the token
/// proved. Only our CA writes it (it is in the signed part; CSR extensions are never copied),
/// so certificates an agent obtained never carry it and cannot be renewed over the Istio API.
/// A renewal carries the grant on unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalGrant {
    /// Unix seconds: when the token was checked. Renewals stop a configured time after it.
    pub authorized_at: i64,
    /// The cluster whose token it was.
    pub cluster: String,
    /// The pod the token was bound to, when it was: renewals stop when that pod is gone.
    pub pod: Option<PodRef>,
}

impl RenewalGrant {
    /// `SEQUENCE { INTEGER authorized_at, UTF8String cluster, UTF8String pod namespace,
    /// UTF8String pod name, UTF8String pod uid }` (empty strings without a pod).
    pub fn to_der(&self) -> Vec<u8> {
        use crate::der::{write_tlv, write_uint};
        let mut body = Vec::new();
        write_uint(&mut body, &u64::try_from(self.authorized_at).unwrap_or(0).to_be_bytes());
        let empty = String::new();
        let (ns, name, uid) = match &self.pod {
            Some(p) => (&p.namespace, &p.name, &p.uid),
            None => (&empty, &empty, &empty),
        };
        for s in [&self.cluster, ns, name, uid] {
            write_tlv(&mut body, 0x0c, s.as_bytes());
        }
        let mut out = Vec::with_capacity(body.len() + 4);
        write_tlv(&mut out, 0x30, &body);
        out
    }

    /// Parses [`RenewalGrant::to_der`]'s output; `None` for anything else.
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use crate::der::read_tlv;
        let mut pos = 0;
        let seq = read_tlv(der, &mut pos, 0x30)?;
        if pos != der.len() {
            return None;
        }
        let mut p = 0;
        let int = read_tlv(seq, &mut p, 0x02)?;
        if int.len() > 9 || int.first().is_some_and(|b| b & 0x80 != 0) {
            return None;
        }
        let at = int.iter().fold(0u64, |a, b| (a << 8) | u64::from(*b));
        let mut text = || -> Option<String> { String::from_utf8(read_tlv(seq, &mut p, 0x0c)?.to_vec()).ok() };
        let (cluster, ns, name, uid) = (text()?, text()?, text()?, text()?);
        if p != seq.len() {
            return None;
        }
        let pod = (!uid.is_empty() || !name.is_empty()).then_some(PodRef { namespace: ns, name, uid });
        Some(Self { authorized_at: i64::try_from(at).ok()?, cluster, pod })
    }
}

/// Certificate parameters for an X509-SVID leaf.
pub fn leaf_params(spec: &LeafSpec<'_>) -> Result<CertificateParams, ProfileError> {
    if spec.not_after > spec.issuer_not_after {
        return Err(ProfileError::PastIssuer { requested: spec.not_after, issuer: spec.issuer_not_after });
    }
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let uri = spec.spiffe_id.to_string().try_into().map_err(|_| ProfileError::NotSvid("SPIFFE ID is not IA5"))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    for d in spec.dns_names {
        let name = d.clone().try_into().map_err(|_| ProfileError::InvalidDnsName(d.clone()))?;
        p.subject_alt_names.push(SanType::DnsName(name));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    if spec.rsa_key {
        p.key_usages.push(KeyUsagePurpose::KeyEncipherment);
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = ts(spec.not_before)?;
    p.not_after = ts(spec.not_after)?;
    p.serial_number = Some(SerialNumber::from_slice(&spec.serial));
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    if let Some(g) = spec.renewal_grant {
        p.custom_extensions.push(rcgen::CustomExtension::from_oid_content(RENEWAL_GRANT_OID, g.to_der()));
    }
    Ok(p)
}

/// Certificate parameters for a signing CA of `td` (self-signed root or intermediate).
pub fn ca_params(
    td: &TrustDomain,
    not_before: i64,
    not_after: i64,
    serial: [u8; 16],
) -> Result<CertificateParams, ProfileError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tessera");
    dn.push(DnType::CommonName, format!("Tessera CA {td}"));
    p.distinguished_name = dn;
    let uri = td.id_string().try_into().map_err(|_| ProfileError::NotSvid("trust domain ID is not IA5"))?;
    p.subject_alt_names = vec![SanType::URI(uri)];
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = ts(not_before)?;
    p.not_after = ts(not_after)?;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p)
}

/// The facts of a certificate Tessera cares about.
#[derive(Debug, Clone, PartialEq)]
pub struct CertFacts {
    /// Hex serial number.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Hex subject key identifier, when present.
    pub subject_key_id: Option<String>,
    /// Hex authority key identifier, when present.
    pub authority_key_id: Option<String>,
    /// URI SANs.
    pub uris: Vec<String>,
    /// True for CA certificates.
    pub is_ca: bool,
    /// The SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
    /// The renewal grant, when the certificate carries one that parses.
    pub renewal_grant: Option<RenewalGrant>,
}

impl CertFacts {
    /// The SPIFFE ID, when the certificate has exactly one URI SAN and it is one.
    pub fn spiffe_id(&self) -> Option<SpiffeId> {
        match self.uris.as_slice() {
            [one] => SpiffeId::new(one).ok(),
            _ => None,
        }
    }
}

/// Reads [`CertFacts`] from DER.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts, ProfileError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| ProfileError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(ProfileError::Malformed("trailing bytes after certificate".into()));
    }
    let mut facts = CertFacts {
        serial: hex_lower(cert.raw_serial()),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        subject_key_id: None,
        authority_key_id: None,
        uris: Vec::new(),
        is_ca: cert.is_ca(),
        spki: cert.public_key().raw.to_vec(),
        renewal_grant: None,
    };
    let grant_oid = x509_parser::der_parser::oid::Oid::from(RENEWAL_GRANT_OID).ok();
    for ext in cert.extensions() {
        if grant_oid.as_ref() == Some(&ext.oid) {
            facts.renewal_grant = RenewalGrant::from_der(ext.value);
            continue;
        }
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => facts.subject_key_id = Some(hex_lower(k.0)),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                facts.authority_key_id = a.key_identifier.as_ref().map(|k| hex_lower(k.0));
            }
            ParsedExtension::SubjectAlternativeName(san) => {
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        facts.uris.push((*u).to_owned());
                    }
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// True when `leaf_der` carries a valid signature by the key of the certificate `issuer_der`.
pub fn signed_by(leaf_der: &[u8], issuer_der: &[u8]) -> bool {
    let (Ok((_, leaf)), Ok((_, issuer))) = (X509Certificate::from_der(leaf_der), X509Certificate::from_der(issuer_der))
    else {
        return false;
    };
    leaf.verify_signature(Some(issuer.public_key())).is_ok()
}

/// What is wrong with a CA chain that signs our leaves (`chain`: the signing CA first, then
/// the certificates above it), as checked against `roots` (the bundle's X.509 authorities):
/// each CA certificate must be a CA with keyCertSign, allow the CA certificates below it by
/// its path length, carry no extKeyUsage that excludes serverAuth or clientAuth, be signed by
/// the next one, and the chain must end at (or under) a root. Empty when the chain is sound.
pub fn ca_chain_problems(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Vec<String> {
    chain_problems(chain, roots, 0)
}

/// [`ca_chain_problems`] for an upstream's chain (its CA first): the CA certificates in it
/// have our own CA below them as well, which their path lengths must allow.
pub fn upstream_chain_problems(chain: &[Vec<u8>], roots: &[Vec<u8>]) -> Vec<String> {
    chain_problems(chain, roots, 1)
}

fn chain_problems(chain: &[Vec<u8>], roots: &[Vec<u8>], below: usize) -> Vec<String> {
    let mut problems = Vec::new();
    let mut parsed = Vec::with_capacity(chain.len());
    for (i, der) in chain.iter().enumerate() {
        match X509Certificate::from_der(der) {
            Ok((_, c)) => parsed.push(c),
            Err(e) => {
                problems.push(format!("certificate {i} of the chain does not parse: {e}"));
                return problems;
            }
        }
    }
    if parsed.is_empty() {
        problems.push("the chain is empty".into());
        return problems;
    }
    for (i, c) in parsed.iter().enumerate() {
        let who = if i == 0 { "the signing CA".to_owned() } else { format!("chain certificate {i} ({})", c.subject()) };
        let mut is_ca = false;
        let mut path_len: Option<u32> = None;
        let mut key_cert_sign: Option<bool> = None;
        for ext in c.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => {
                    is_ca = bc.ca;
                    path_len = bc.path_len_constraint;
                }
                ParsedExtension::KeyUsage(ku) => key_cert_sign = Some(ku.key_cert_sign()),
                ParsedExtension::ExtendedKeyUsage(eku) if !(eku.any || eku.server_auth && eku.client_auth) => {
                    problems.push(format!(
                        "{who} has an extKeyUsage without serverAuth and clientAuth: the leaves it signs fail TLS verification"
                    ));
                }
                _ => {}
            }
        }
        if !is_ca {
            problems.push(format!("{who} is not a CA (basicConstraints cA is not true)"));
        }
        if key_cert_sign == Some(false) {
            problems.push(format!("{who} lacks the keyCertSign key usage"));
        }
        // Certificate i has i (+ `below`) CA certificates below it before our leaves.
        let under = i + below;
        if let Some(n) = path_len
            && (n as usize) < under
        {
            problems
                .push(format!("{who} has pathLenConstraint {n}, which forbids the {under} CA certificate(s) below it"));
        }
        if let Some(issuer) = parsed.get(i + 1)
            && c.verify_signature(Some(issuer.public_key())).is_err()
        {
            problems.push(format!("{who} is not signed by the next certificate of the chain"));
        }
    }
    let top_der = chain.last().map(Vec::as_slice).unwrap_or_default();
    let anchored = parsed.last().is_some_and(|top| {
        roots.iter().any(|r| {
            r.as_slice() == top_der
                || X509Certificate::from_der(r)
                    .is_ok_and(|(_, root)| top.verify_signature(Some(root.public_key())).is_ok())
        })
    });
    if !anchored {
        problems.push("the chain does not end at a root of the trust bundle".into());
    }
    problems
}

/// Lower-case hex.
pub fn hex_lower(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0x0f)]));
    }
    s
}

/// Checks a leaf against the X509-SVID rules and returns its SPIFFE ID.
pub fn check_svid_leaf(der: &[u8]) -> Result<SpiffeId, ProfileError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| ProfileError::Malformed(e.to_string()))?;
    let mut uris = Vec::new();
    let mut san_critical = false;
    let mut ku = None;
    let mut bc_ca = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                san_critical = ext.critical;
                for n in &san.general_names {
                    if let GeneralName::URI(u) = n {
                        uris.push(*u);
                    }
                }
            }
            ParsedExtension::KeyUsage(k) => ku = Some(*k),
            ParsedExtension::BasicConstraints(b) => bc_ca = Some(b.ca),
            _ => {}
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(ProfileError::NotSvid("must have exactly one URI SAN"));
    };
    let id = SpiffeId::new(uri).map_err(|_| ProfileError::NotSvid("URI SAN is not a SPIFFE ID"))?;
    if id.path().is_empty() {
        return Err(ProfileError::NotSvid("leaf SPIFFE ID must have a path"));
    }
    if bc_ca != Some(false) {
        return Err(ProfileError::NotSvid("basicConstraints must be present with cA=false"));
    }
    let ku = ku.ok_or(ProfileError::NotSvid("keyUsage must be present"))?;
    if !ku.digital_signature() {
        return Err(ProfileError::NotSvid("keyUsage must include digitalSignature"));
    }
    if ku.key_cert_sign() || ku.crl_sign() {
        return Err(ProfileError::NotSvid("keyUsage must not include keyCertSign or cRLSign"));
    }
    if cert.subject().iter().next().is_none() && !san_critical {
        return Err(ProfileError::NotSvid("SAN must be critical when the subject is empty"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A root and an intermediate under it, with `tweak` applied to the intermediate's profile
    /// and `root_tweak` to the root's.
    fn ca_pair(
        tweak: impl FnOnce(&mut CertificateParams),
        root_tweak: impl FnOnce(&mut CertificateParams),
    ) -> (Vec<u8>, Vec<u8>) {
        let td = TrustDomain::new("example.org").unwrap();
        let root_key = rcgen::KeyPair::generate().unwrap();
        let mut root = ca_params(&td, 0, 2_000_000_000, random_serial().unwrap()).unwrap();
        root_tweak(&mut root);
        let root_der = root.clone().self_signed(&root_key).unwrap().der().to_vec();
        let issuer = rcgen::Issuer::new(root, &root_key);
        let mut int = ca_params(&td, 0, 1_900_000_000, random_serial().unwrap()).unwrap();
        tweak(&mut int);
        let key = rcgen::KeyPair::generate().unwrap();
        (int.signed_by(&key, &issuer).unwrap().der().to_vec(), root_der)
    }

    #[test]
    fn a_sound_ca_chain_has_no_problems() {
        let (int, root) = ca_pair(|_| {}, |_| {});
        assert_eq!(ca_chain_problems(&[int.clone(), root.clone()], std::slice::from_ref(&root)), Vec::<String>::new());
        // The root alone (a self-signed CA) and a chain given without its root.
        assert!(ca_chain_problems(std::slice::from_ref(&root), std::slice::from_ref(&root)).is_empty());
        assert!(ca_chain_problems(std::slice::from_ref(&int), std::slice::from_ref(&root)).is_empty());
    }

    #[test]
    fn a_ca_with_a_server_only_eku_is_a_problem() {
        // istio #27193: a `cacerts` intermediate with extKeyUsage serverAuth only.
        let (int, root) = ca_pair(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth], |_| {});
        let p = ca_chain_problems(&[int, root.clone()], &[root]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("extKeyUsage"), "{p:?}");
    }

    #[test]
    fn missing_key_cert_sign_path_length_and_foreign_roots_are_problems() {
        let (int, root) = ca_pair(|p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature], |_| {});
        let p = ca_chain_problems(&[int, root.clone()], &[root]);
        assert!(p.iter().any(|m| m.contains("keyCertSign")), "{p:?}");
        let (int, root) = ca_pair(|_| {}, |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0)));
        let p = ca_chain_problems(&[int.clone(), root.clone()], std::slice::from_ref(&root));
        assert!(p.iter().any(|m| m.contains("pathLenConstraint 0")), "{p:?}");
        let (int, root) = ca_pair(|_| {}, |_| {});
        let (_, other_root) = ca_pair(|_| {}, |_| {});
        let p = ca_chain_problems(&[int, root], &[other_root]);
        assert_eq!(p, vec!["the chain does not end at a root of the trust bundle".to_owned()]);
        let leaf = issue_leaf(false);
        let p = ca_chain_problems(&[leaf], &[]);
        assert!(p.iter().any(|m| m.contains("not a CA")), "{p:?}");
    }

    fn issue_leaf(rsa: bool) -> Vec<u8> {
        let td = TrustDomain::new("example.org").unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params(&td, 0, 2_000_000_000, random_serial().unwrap()).unwrap();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let dns = vec!["web.local".to_owned()];
        let spec = LeafSpec {
            spiffe_id: &id,
            dns_names: &dns,
            rsa_key: rsa,
            not_before: 10,
            not_after: 1_000,
            issuer_not_after: 2_000_000_000,
            serial: random_serial().unwrap(),
            renewal_grant: None,
        };
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        leaf_params(&spec).unwrap().signed_by(&leaf_key, &issuer).unwrap().der().to_vec()
    }

    #[test]
    fn issued_leaf_passes_the_svid_check() {
        let der = issue_leaf(false);
        assert_eq!(check_svid_leaf(&der).unwrap().to_string(), "spiffe://example.org/web");
        let f = cert_facts(&der).unwrap();
        assert_eq!(f.not_after, 1_000);
        assert!(!f.is_ca);
        assert!(f.authority_key_id.is_some());
        assert_eq!(f.uris, vec!["spiffe://example.org/web".to_owned()]);
    }

    #[test]
    fn leaf_past_issuer_is_refused() {
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let spec = LeafSpec {
            spiffe_id: &id,
            dns_names: &[],
            rsa_key: false,
            not_before: 0,
            not_after: 101,
            issuer_not_after: 100,
            serial: [1; 16],
            renewal_grant: None,
        };
        assert_eq!(leaf_params(&spec).unwrap_err(), ProfileError::PastIssuer { requested: 101, issuer: 100 });
    }

    #[test]
    fn ca_certificate_is_not_an_svid_leaf() {
        let td = TrustDomain::new("example.org").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = ca_params(&td, 0, 100, [1; 16]).unwrap().self_signed(&key).unwrap().der().to_vec();
        assert!(check_svid_leaf(&der).is_err());
        assert!(cert_facts(&der).unwrap().is_ca);
    }

    #[test]
    fn serials_are_positive_and_distinct() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        assert!(a[0] & 0x80 == 0 && a[0] != 0);
    }
}
