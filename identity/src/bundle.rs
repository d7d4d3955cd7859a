//! SPIFFE bundles: the trust domain's X.509 authorities and JWT keys, and their JWKS form
//! (SPIFFE Trust Domain and Bundle spec §4: `keys` with `use` = `x509-svid` | `jwt-svid`,
//! `spiffe_sequence`, `spiffe_refresh_hint`).

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use rustls_pki_types::CertificateDer;
use serde_json::{Map, Value, json};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::TrustDomain;

/// The largest bundle document accepted, in bytes.
pub const MAX_BUNDLE_JSON_LEN: usize = 4 * 1024 * 1024;

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// A trust domain's bundle.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    /// Whose bundle this is.
    pub trust_domain: TrustDomain,
    /// CA certificates (DER) that sign X509-SVIDs.
    pub x509_authorities: Vec<CertificateDer<'static>>,
    /// Keys that sign JWT-SVIDs.
    pub jwt_authorities: Vec<JwtAuthority>,
    /// `spiffe_sequence`: increases with every change.
    pub sequence_number: u64,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint: Option<u64>,
}

/// A JWT-SVID signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtAuthority {
    /// The JWT `kid`.
    pub key_id: String,
    /// SubjectPublicKeyInfo, DER.
    pub public_key: Vec<u8>,
    /// Unix seconds; 0 when unknown.
    pub expires_at: i64,
}

/// Why a bundle document was refused. The stored bundle is never touched by a refused one.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum BundleError {
    /// Over [`MAX_BUNDLE_JSON_LEN`].
    #[error("bundle document is {0} bytes, over the limit")]
    TooLarge(usize),
    /// Not JSON, or truncated.
    #[error("bundle is not valid JSON: {0}")]
    Json(String),
    /// JSON, but not a SPIFFE bundle.
    #[error("bundle is malformed: {0}")]
    Malformed(String),
    /// One key entry is malformed.
    #[error("bundle key {index} is malformed: {reason}")]
    BadKey {
        /// Position in `keys`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

impl Bundle {
    /// An empty bundle for `td`.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: Vec::new(),
            sequence_number: 0,
            refresh_hint: None,
        }
    }

    /// Adds an X.509 authority unless it is already present. Returns true if added.
    pub fn add_x509_authority(&mut self, der: &[u8]) -> bool {
        if self.x509_authorities.iter().any(|c| c.as_ref() == der) {
            return false;
        }
        self.x509_authorities.push(CertificateDer::from(der.to_vec()));
        true
    }

    /// Adds a JWT authority unless its key ID is already present. Returns true if added.
    pub fn add_jwt_authority(&mut self, a: JwtAuthority) -> bool {
        if self.jwt_authorities.iter().any(|k| k.key_id == a.key_id) {
            return false;
        }
        self.jwt_authorities.push(a);
        true
    }

    /// The JWT key with this `kid`.
    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtAuthority> {
        self.jwt_authorities.iter().find(|k| k.key_id == kid)
    }

    /// The X.509 authorities as concatenated PEM.
    pub fn x509_pem(&self) -> String {
        crate::pem::encode_certs(self.x509_authorities.iter().map(|c| c.as_ref()))
    }

    /// True when the bundle holds no keys at all.
    pub fn is_empty(&self) -> bool {
        self.x509_authorities.is_empty() && self.jwt_authorities.is_empty()
    }

    /// The SPIFFE bundle document (JWKS).
    pub fn to_jwks(&self) -> Result<String, BundleError> {
        let mut keys = Vec::with_capacity(self.x509_authorities.len() + self.jwt_authorities.len());
        for (i, c) in self.x509_authorities.iter().enumerate() {
            let (_, cert) = x509_parser::parse_x509_certificate(c)
                .map_err(|e| BundleError::BadKey { index: i, reason: e.to_string() })?;
            let mut jwk = spki_to_jwk(cert.public_key()).map_err(|reason| BundleError::BadKey { index: i, reason })?;
            jwk.insert("use".into(), json!("x509-svid"));
            jwk.insert("x5c".into(), json!([STANDARD.encode(c.as_ref())]));
            keys.push(Value::Object(jwk));
        }
        for (i, k) in self.jwt_authorities.iter().enumerate() {
            let index = self.x509_authorities.len() + i;
            let (_, spki) = SubjectPublicKeyInfo::from_der(&k.public_key)
                .map_err(|e| BundleError::BadKey { index, reason: e.to_string() })?;
            let mut jwk = spki_to_jwk(&spki).map_err(|reason| BundleError::BadKey { index, reason })?;
            jwk.insert("use".into(), json!("jwt-svid"));
            jwk.insert("kid".into(), json!(k.key_id));
            keys.push(Value::Object(jwk));
        }
        let mut doc = Map::new();
        doc.insert("keys".into(), Value::Array(keys));
        doc.insert("spiffe_sequence".into(), json!(self.sequence_number));
        if let Some(h) = self.refresh_hint {
            doc.insert("spiffe_refresh_hint".into(), json!(h));
        }
        serde_json::to_string_pretty(&Value::Object(doc)).map_err(|e| BundleError::Json(e.to_string()))
    }

    /// Parses a SPIFFE bundle document for `trust_domain`. Keys with an unknown `use` are
    /// skipped, as the spec asks; every other defect is an error naming the key.
    pub fn from_jwks(trust_domain: TrustDomain, doc: &[u8]) -> Result<Self, BundleError> {
        if doc.len() > MAX_BUNDLE_JSON_LEN {
            return Err(BundleError::TooLarge(doc.len()));
        }
        let v: Value = serde_json::from_slice(doc).map_err(|e| BundleError::Json(e.to_string()))?;
        let obj = v.as_object().ok_or_else(|| BundleError::Malformed("top level is not an object".into()))?;
        let keys = obj
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| BundleError::Malformed("missing \"keys\" array".into()))?;
        let mut b = Bundle::new(trust_domain);
        b.sequence_number = match obj.get("spiffe_sequence") {
            None => 0,
            Some(s) => s
                .as_u64()
                .ok_or_else(|| BundleError::Malformed("spiffe_sequence is not a non-negative integer".into()))?,
        };
        b.refresh_hint =
            match obj.get("spiffe_refresh_hint") {
                None => None,
                Some(h) => Some(h.as_u64().ok_or_else(|| {
                    BundleError::Malformed("spiffe_refresh_hint is not a non-negative integer".into())
                })?),
            };
        for (index, k) in keys.iter().enumerate() {
            let bad = |reason: &str| BundleError::BadKey { index, reason: reason.to_owned() };
            let k = k.as_object().ok_or_else(|| bad("not an object"))?;
            match k.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = k.get("x5c").and_then(Value::as_array).ok_or_else(|| bad("x509-svid key without x5c"))?;
                    let [cert] = x5c.as_slice() else {
                        return Err(bad("x5c must hold exactly one certificate"));
                    };
                    let der =
                        cert.as_str().and_then(|s| STANDARD.decode(s).ok()).ok_or_else(|| bad("x5c is not base64"))?;
                    let (rest, cert) =
                        x509_parser::parse_x509_certificate(&der).map_err(|_| bad("x5c is not a certificate"))?;
                    if !rest.is_empty() {
                        return Err(bad("x5c has trailing bytes"));
                    }
                    // A key we could not publish again (to_jwks) is refused here, so that a
                    // bundle we accept is one we can serve.
                    spki_to_jwk(cert.public_key()).map_err(|r| bad(&format!("x5c certificate key: {r}")))?;
                    b.add_x509_authority(&der);
                }
                Some("jwt-svid") => {
                    let kid = k
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .ok_or_else(|| bad("jwt-svid key without kid"))?;
                    let public_key = jwk_to_spki(k).map_err(|r| bad(&r))?;
                    b.add_jwt_authority(JwtAuthority { key_id: kid.to_owned(), public_key, expires_at: 0 });
                }
                Some(_) => {} // unknown use: ignored (spec §4.2.1)
                None => return Err(bad("missing \"use\"")),
            }
        }
        Ok(b)
    }
}

/// Reads a plain JWKS (RFC 7517), such as a Kubernetes API server's service-account issuer
/// keys: every usable signing key with a `kid` becomes `(kid, SubjectPublicKeyInfo DER)`.
/// Keys for encryption (`"use": "enc"`), without `kid`, or of a type we cannot verify with are
/// skipped, so one odd key does not hide the others; a document with no usable key, or that
/// is not a JWKS, is an error.
pub fn jwks_signing_keys(doc: &[u8]) -> Result<Vec<(String, Vec<u8>)>, BundleError> {
    if doc.len() > MAX_BUNDLE_JSON_LEN {
        return Err(BundleError::TooLarge(doc.len()));
    }
    let v: Value = serde_json::from_slice(doc).map_err(|e| BundleError::Json(e.to_string()))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| BundleError::Malformed("missing \"keys\" array".into()))?;
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let Some(k) = k.as_object() else { continue };
        if k.get("use").and_then(Value::as_str) == Some("enc") {
            continue;
        }
        let (Some(kid), Ok(spki)) = (k.get("kid").and_then(Value::as_str).filter(|s| !s.is_empty()), jwk_to_spki(k))
        else {
            continue;
        };
        out.push((kid.to_owned(), spki));
    }
    if out.is_empty() {
        return Err(BundleError::Malformed("no usable signing key (with kid, EC P-256/P-384 or RSA ≥ 2048)".into()));
    }
    Ok(out)
}

fn b64u(b: &[u8]) -> Value {
    Value::String(URL_SAFE_NO_PAD.encode(b))
}

fn strip_zeros(mut b: &[u8]) -> &[u8] {
    while let [0, rest @ ..] = b {
        b = rest;
    }
    b
}

fn spki_to_jwk(spki: &SubjectPublicKeyInfo<'_>) -> Result<Map<String, Value>, String> {
    let mut m = Map::new();
    match spki.parsed().map_err(|e| e.to_string())? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .map(|o| o.to_id_string())
                .ok_or("EC key without a named curve")?;
            let (crv, len) = match curve.as_str() {
                OID_P256 => ("P-256", 32),
                OID_P384 => ("P-384", 48),
                other => return Err(format!("unsupported curve {other}")),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data.first() != Some(&4) {
                return Err("EC point is not uncompressed".into());
            }
            m.insert("kty".into(), json!("EC"));
            m.insert("crv".into(), json!(crv));
            m.insert("x".into(), b64u(&data[1..=len]));
            m.insert("y".into(), b64u(&data[1 + len..]));
        }
        PublicKey::RSA(rsa) => {
            m.insert("kty".into(), json!("RSA"));
            m.insert("n".into(), b64u(strip_zeros(rsa.modulus)));
            m.insert("e".into(), b64u(strip_zeros(rsa.exponent)));
        }
        _ => return Err("unsupported key type".into()),
    }
    Ok(m)
}

fn jwk_field(k: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    k.get(name)
        .and_then(Value::as_str)
        .and_then(|s| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok())
        .ok_or_else(|| format!("missing or non-base64url \"{name}\""))
}

fn jwk_to_spki(k: &Map<String, Value>) -> Result<Vec<u8>, String> {
    match k.get("kty").and_then(Value::as_str) {
        Some("EC") => {
            let (p384, len) = match k.get("crv").and_then(Value::as_str) {
                Some("P-256") => (false, 32),
                Some("P-384") => (true, 48),
                other => return Err(format!("unsupported crv {other:?}")),
            };
            let (x, y) = (jwk_field(k, "x")?, jwk_field(k, "y")?);
            if x.len() != len || y.len() != len {
                return Err("EC coordinates have the wrong length".into());
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(crate::der::ec_spki(&point, p384))
        }
        Some("RSA") => {
            let (n, e) = (jwk_field(k, "n")?, jwk_field(k, "e")?);
            if strip_zeros(&n).len() < 256 {
                return Err("RSA modulus under 2048 bits".into());
            }
            Ok(crate::der::rsa_spki(&n, &e))
        }
        other => Err(format!("unsupported kty {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn sample() -> Bundle {
        let mut b = Bundle::new(td());
        for alg in [&rcgen::PKCS_ECDSA_P256_SHA256, &rcgen::PKCS_ECDSA_P384_SHA384] {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = crate::x509::ca_params(&td(), 0, 100, [1; 16]).unwrap().self_signed(&key).unwrap();
            b.add_x509_authority(cert.der());
            let jwt = rcgen::KeyPair::generate().unwrap();
            b.add_jwt_authority(JwtAuthority {
                key_id: format!("k{}", b.jwt_authorities.len()),
                public_key: rcgen::PublicKeyData::subject_public_key_info(&jwt),
                expires_at: 0,
            });
        }
        b.sequence_number = 7;
        b.refresh_hint = Some(300);
        b
    }

    #[test]
    fn jwks_round_trips() {
        let b = sample();
        let doc = b.to_jwks().unwrap();
        let back = Bundle::from_jwks(td(), doc.as_bytes()).unwrap();
        assert_eq!(back, b);
        let v: Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(v["keys"][0]["use"], "x509-svid");
        assert_eq!(v["keys"][2]["use"], "jwt-svid");
        assert_eq!(v["spiffe_sequence"], 7);
        assert_eq!(v["spiffe_refresh_hint"], 300);
    }

    #[test]
    fn rsa_jwt_key_round_trips_through_jwk() {
        // A fixed 2048-bit modulus pattern is enough to exercise the DER writer.
        let mut n = vec![0xc5u8; 256];
        n[255] = 0x01;
        let spki = crate::der::rsa_spki(&n, &[1, 0, 1]);
        let (_, parsed) = SubjectPublicKeyInfo::from_der(&spki).unwrap();
        let jwk = spki_to_jwk(&parsed).unwrap();
        assert_eq!(jwk_to_spki(&jwk).unwrap(), spki);
    }

    #[test]
    fn truncated_or_malformed_documents_are_refused_with_a_reason() {
        let doc = sample().to_jwks().unwrap();
        assert!(matches!(Bundle::from_jwks(td(), &doc.as_bytes()[..doc.len() / 2]), Err(BundleError::Json(_))));
        assert!(matches!(Bundle::from_jwks(td(), b"{}"), Err(BundleError::Malformed(_))));
        assert!(matches!(
            Bundle::from_jwks(td(), br#"{"keys":[{"use":"jwt-svid","kty":"EC"}]}"#),
            Err(BundleError::BadKey { index: 0, .. })
        ));
        assert!(matches!(
            Bundle::from_jwks(td(), br#"{"keys":[{"use":"x509-svid","x5c":["AAAA"]}]}"#),
            Err(BundleError::BadKey { index: 0, .. })
        ));
        assert!(matches!(
            Bundle::from_jwks(td(), br#"{"keys":[], "spiffe_sequence": -1}"#),
            Err(BundleError::Malformed(_))
        ));
    }

    #[test]
    fn plain_jwks_keeps_usable_keys_and_refuses_a_document_without_any() {
        let b = sample();
        let doc: Value = serde_json::from_str(&b.to_jwks().unwrap()).unwrap();
        let jwt_key = doc["keys"].as_array().unwrap().iter().find(|k| k["use"] == "jwt-svid").unwrap().clone();
        let odd = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AAAA"});
        let no_kid = serde_json::json!({"kty": "EC", "crv": "P-256"});
        let mixed = serde_json::json!({"keys": [odd, no_kid, jwt_key]}).to_string();
        let keys = jwks_signing_keys(mixed.as_bytes()).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].1, b.jwt_authorities[0].public_key);
        assert!(jwks_signing_keys(br#"{"keys": [{"kty": "OKP"}]}"#).is_err());
        assert!(jwks_signing_keys(b"[]").is_err());
    }

    #[test]
    fn unknown_key_use_is_ignored_and_empty_key_set_parses() {
        let b = Bundle::from_jwks(td(), br#"{"keys":[{"use":"something-else"}]}"#).unwrap();
        assert!(b.is_empty());
    }
}
