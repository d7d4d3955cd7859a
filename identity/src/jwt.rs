//! JWT-SVIDs (SPIFFE JWT-SVID spec): minting with ES256 and validation against bundles.
//!
//! Validation follows the spec: `kid` names a `jwt-svid` key in the bundle of the `sub`'s trust
//! domain, `alg` is one of the allowed signature algorithms and matches the key, `exp` is in the
//! future, and `aud` contains the expected audience.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::{Bundle, SpiffeId, TrustDomain};

/// The longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a token was refused. Messages never include the token.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum JwtError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is over {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// Not three base64url JSON parts.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` is missing, `none`, or not allowed.
    #[error("token algorithm {0:?} is not allowed")]
    BadAlgorithm(String),
    /// No `kid` header.
    #[error("token has no key ID")]
    MissingKeyId,
    /// `sub` is not a SPIFFE ID.
    #[error("token subject is not a SPIFFE ID")]
    BadSubject,
    /// No bundle for the subject's trust domain.
    #[error("no bundle for trust domain {0}")]
    NoBundle(String),
    /// The bundle has no key with that `kid`.
    #[error("key {0:?} is not in the trust domain's bundle")]
    UnknownKey(String),
    /// The key cannot verify with `alg`.
    #[error("key {0:?} does not match the token algorithm")]
    KeyMismatch(String),
    /// The signature does not verify.
    #[error("token signature does not verify")]
    BadSignature,
    /// `exp` is missing or past.
    #[error("token has expired")]
    Expired,
    /// The audience does not match.
    #[error("token audience does not include {0:?}")]
    WrongAudience(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Signing(String),
    /// More audiences, or a longer one, than a JWT-SVID request may ask for.
    #[error("audience: at most {MAX_AUDIENCES} values of at most {MAX_AUDIENCE_BYTES} bytes each")]
    AudienceTooLarge,
}

/// Most audience values a JWT-SVID may be minted for.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience value, in bytes.
pub const MAX_AUDIENCE_BYTES: usize = 512;

/// Refuses an audience list longer than [`MAX_AUDIENCES`] or with a value longer than
/// [`MAX_AUDIENCE_BYTES`]: each distinct list costs a minted token, a durable audit record and
/// a cache slot, so its size is bounded where it enters (agent and server).
pub fn check_audience(audience: &[String]) -> Result<(), JwtError> {
    if audience.len() > MAX_AUDIENCES || audience.iter().any(|a| a.len() > MAX_AUDIENCE_BYTES) {
        return Err(JwtError::AudienceTooLarge);
    }
    Ok(())
}

/// JWT-SVID claims.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The SPIFFE ID.
    pub sub: String,
    /// Audiences.
    #[serde(deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    #[serde(default)]
    pub iat: i64,
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims").field("sub", &self.sub).field("aud", &self.aud).field("exp", &self.exp).finish()
    }
}

/// Deserializes a JWT `aud` claim, which RFC 7519 allows as one string or an array.
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Aud {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Aud::deserialize(d)? {
        Aud::One(s) => vec![s],
        Aud::Many(v) => v,
    })
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// Mints an ES256 token. `sign_der` signs the input with the P-256 key named `kid` and returns a
/// DER ECDSA signature (what X.509 signers produce); it is converted to JOSE's r||s here.
pub fn mint_es256(
    kid: &str,
    claims: &Claims,
    sign_der: impl FnOnce(&[u8]) -> Result<Vec<u8>, String>,
) -> Result<String, JwtError> {
    let header = Header { alg: "ES256".into(), kid: Some(kid.to_owned()), typ: Some("JWT".into()) };
    let h = serde_json::to_vec(&header).map_err(|e| JwtError::Signing(e.to_string()))?;
    let c = serde_json::to_vec(claims).map_err(|e| JwtError::Signing(e.to_string()))?;
    let mut input = URL_SAFE_NO_PAD.encode(h);
    input.push('.');
    input.push_str(&URL_SAFE_NO_PAD.encode(c));
    let der = sign_der(input.as_bytes()).map_err(JwtError::Signing)?;
    let fixed = crate::der::ecdsa_der_to_fixed(&der, 32)
        .ok_or_else(|| JwtError::Signing("signer returned a non-P-256 signature".into()))?;
    input.push('.');
    input.push_str(&URL_SAFE_NO_PAD.encode(fixed));
    Ok(input)
}

/// A validated JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidJwtSvid {
    /// The subject.
    pub spiffe_id: SpiffeId,
    /// All claims.
    pub claims: Claims,
}

/// Reads the subject and claims without verifying anything (for display only).
pub fn peek_claims(token: &str) -> Result<Claims, JwtError> {
    let mut parts = token.split('.');
    let (_, Some(c), _) = (parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let cb = URL_SAFE_NO_PAD.decode(c).map_err(|_| JwtError::Malformed("claims are not base64url"))?;
    serde_json::from_slice(&cb).map_err(|_| JwtError::Malformed("claims are not JWT-SVID JSON"))
}

/// Verifies the signature of a compact JWS with the key (SubjectPublicKeyInfo DER) that
/// `key_for` returns for the header's `kid`, and returns the decoded payload. Only the
/// asymmetric algorithms of the JWT-SVID spec are accepted; `alg` must match the key's type.
/// Checks no claim: the caller does.
pub fn verify_jws(
    token: &str,
    key_for: impl FnOnce(Option<&str>) -> Result<Vec<u8>, JwtError>,
) -> Result<Vec<u8>, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    let hb = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed("header is not base64url"))?;
    let header: Header = serde_json::from_slice(&hb).map_err(|_| JwtError::Malformed("header is not JSON"))?;
    let payload = URL_SAFE_NO_PAD.decode(c).map_err(|_| JwtError::Malformed("payload is not base64url"))?;
    let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed("signature is not base64url"))?;
    let kid = header.kid.clone().unwrap_or_default();
    let key = key_for(header.kid.as_deref())?;
    let (_, spki) = SubjectPublicKeyInfo::from_der(&key).map_err(|_| JwtError::KeyMismatch(kid.clone()))?;
    let alg: &'static dyn signature::VerificationAlgorithm = match (header.alg.as_str(), spki.parsed()) {
        ("ES256", Ok(x509_parser::public_key::PublicKey::EC(p))) if p.data().len() == 65 => {
            &signature::ECDSA_P256_SHA256_FIXED
        }
        ("ES384", Ok(x509_parser::public_key::PublicKey::EC(p))) if p.data().len() == 97 => {
            &signature::ECDSA_P384_SHA384_FIXED
        }
        ("RS256", Ok(x509_parser::public_key::PublicKey::RSA(_))) => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("RS384", Ok(x509_parser::public_key::PublicKey::RSA(_))) => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("RS512", Ok(x509_parser::public_key::PublicKey::RSA(_))) => &signature::RSA_PKCS1_2048_8192_SHA512,
        ("PS256", Ok(x509_parser::public_key::PublicKey::RSA(_))) => &signature::RSA_PSS_2048_8192_SHA256,
        ("PS384", Ok(x509_parser::public_key::PublicKey::RSA(_))) => &signature::RSA_PSS_2048_8192_SHA384,
        ("PS512", Ok(x509_parser::public_key::PublicKey::RSA(_))) => &signature::RSA_PSS_2048_8192_SHA512,
        ("ES256" | "ES384" | "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512", _) => {
            return Err(JwtError::KeyMismatch(kid));
        }
        (other, _) => return Err(JwtError::BadAlgorithm(other.to_owned())),
    };
    let signed_len = h.len() + 1 + c.len();
    let signed = token.get(..signed_len).ok_or(JwtError::Malformed("token is truncated"))?;
    UnparsedPublicKey::new(alg, spki.subject_public_key.as_ref())
        .verify(signed.as_bytes(), &sig)
        .map_err(|_| JwtError::BadSignature)?;
    Ok(payload)
}

/// Validates `token` for `audience` at time `now`, with keys from `bundle_for`.
pub fn validate<'b>(
    token: &str,
    audience: &str,
    now: i64,
    bundle_for: impl Fn(&TrustDomain) -> Option<&'b Bundle>,
) -> Result<ValidJwtSvid, JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge);
    }
    let claims = peek_claims(token)?;
    let spiffe_id = SpiffeId::new(&claims.sub).map_err(|_| JwtError::BadSubject)?;
    let bundle =
        bundle_for(spiffe_id.trust_domain()).ok_or_else(|| JwtError::NoBundle(spiffe_id.trust_domain().to_string()))?;
    verify_jws(token, |kid| {
        let kid = kid.ok_or(JwtError::MissingKeyId)?;
        Ok(bundle.jwt_authority(kid).ok_or_else(|| JwtError::UnknownKey(kid.to_owned()))?.public_key.clone())
    })?;
    if claims.exp <= now {
        return Err(JwtError::Expired);
    }
    if !claims.aud.iter().any(|a| a == audience) {
        return Err(JwtError::WrongAudience(audience.to_owned()));
    }
    Ok(ValidJwtSvid { spiffe_id, claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::JwtAuthority;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};

    fn setup() -> (EcdsaKeyPair, Bundle) {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, doc.as_ref(), &rng).unwrap();
        let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
        b.add_jwt_authority(JwtAuthority {
            key_id: "k1".into(),
            public_key: crate::der::ec_spki(kp.public_key().as_ref(), false),
            expires_at: 0,
        });
        (kp, b)
    }

    fn mint(kp: &EcdsaKeyPair, kid: &str, sub: &str, exp: i64) -> String {
        let claims = Claims { sub: sub.into(), aud: vec!["svc".into()], exp, iat: 1 };
        mint_es256(kid, &claims, |m| Ok(kp.sign(&SystemRandom::new(), m).unwrap().as_ref().to_vec())).unwrap()
    }

    #[test]
    fn minted_token_validates_for_its_audience() {
        let (kp, b) = setup();
        let t = mint(&kp, "k1", "spiffe://example.org/w", 1000);
        let v = validate(&t, "svc", 10, |_| Some(&b)).unwrap();
        assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/w");
    }

    #[test]
    fn forged_expired_and_misdirected_tokens_are_refused() {
        let (kp, b) = setup();
        let t = mint(&kp, "k1", "spiffe://example.org/w", 1000);
        assert_eq!(validate(&t, "other", 10, |_| Some(&b)).unwrap_err(), JwtError::WrongAudience("other".into()));
        assert_eq!(validate(&t, "svc", 1000, |_| Some(&b)).unwrap_err(), JwtError::Expired);
        // Swap in other claims but keep the signature: a forgery.
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"sub":"spiffe://example.org/admin","aud":["svc"],"exp":1000}"#);
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[1] = &forged_claims;
        assert_eq!(validate(&parts.join("."), "svc", 10, |_| Some(&b)).unwrap_err(), JwtError::BadSignature);
        let t2 = mint(&kp, "nope", "spiffe://example.org/w", 1000);
        assert!(matches!(validate(&t2, "svc", 10, |_| Some(&b)), Err(JwtError::UnknownKey(_))));
        let none = format!("{}.{}.", URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k1"}"#), parts[1]);
        assert_eq!(validate(&none, "svc", 10, |_| Some(&b)).unwrap_err(), JwtError::BadAlgorithm("none".into()));
        assert!(matches!(validate("a.b", "svc", 10, |_| Some(&b)), Err(JwtError::Malformed(_))));
    }
}
