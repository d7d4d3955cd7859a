//! Key types and private keys.
//!
//! A [`PrivateKey`] holds PKCS#8 DER, zeroizes it on drop, and prints only its length.

use std::fmt;
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use zeroize::Zeroizing;

/// The key algorithms Tessera issues and signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256 (the default).
    #[serde(rename = "ec-p256")]
    EcP256,
    /// ECDSA on P-384 with SHA-384.
    #[serde(rename = "ec-p384")]
    EcP384,
    /// RSA 2048, PKCS#1 v1.5 with SHA-256.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
    /// RSA 3072, PKCS#1 v1.5 with SHA-256.
    #[serde(rename = "rsa-3072")]
    Rsa3072,
}

impl KeyType {
    /// All key types, in the order the docs list them.
    pub const ALL: [KeyType; 4] = [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048, KeyType::Rsa3072];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::EcP256 => "ec-p256",
            KeyType::EcP384 => "ec-p384",
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
        }
    }

    /// The X.509 signature algorithm a key of this type signs with.
    pub fn signature_algorithm(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyType::EcP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyType::EcP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyType::Rsa2048 | KeyType::Rsa3072 => &rcgen::PKCS_RSA_SHA256,
        }
    }

    /// True for RSA keys (their leaves also get keyEncipherment).
    pub fn is_rsa(self) -> bool {
        matches!(self, KeyType::Rsa2048 | KeyType::Rsa3072)
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown key type name.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("unknown key type {0:?}: expected one of ec-p256, ec-p384, rsa-2048, rsa-3072")]
pub struct UnknownKeyType(pub String);

impl FromStr for KeyType {
    type Err = UnknownKeyType;
    fn from_str(s: &str) -> Result<Self, UnknownKeyType> {
        KeyType::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| UnknownKeyType(s.to_owned()))
    }
}

/// Errors from key handling. They never carry key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The bytes are not a PKCS#8 key this crate can use.
    #[error("private key is not a usable PKCS#8 key: {0}")]
    Rejected(String),
    /// The system random generator failed.
    #[error("random generator failed")]
    Rng,
}

/// A private key as PKCS#8 DER. Zeroized on drop; `Debug` shows only the length.
#[derive(Clone)]
pub struct PrivateKey {
    der: Zeroizing<Vec<u8>>,
}

impl PrivateKey {
    /// Wraps PKCS#8 DER (not checked here; users of the key check it).
    pub fn from_pkcs8_der(der: Vec<u8>) -> Self {
        Self { der: Zeroizing::new(der) }
    }

    /// Reads a `PRIVATE KEY` (PKCS#8) PEM block. The error never shows key bytes.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        use rustls_pki_types::pem::PemObject;
        let der =
            rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| KeyError::Rejected(e.to_string()))?;
        Ok(Self::from_pkcs8_der(der.secret_pkcs8_der().to_vec()))
    }

    /// Generates an ECDSA P-256 key: the workload and agent key type.
    pub fn generate_ec_p256() -> Result<Self, KeyError> {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).map_err(|_| KeyError::Rng)?;
        Ok(Self::from_pkcs8_der(doc.as_ref().to_vec()))
    }

    /// The PKCS#8 DER bytes. Only for writing to a 0600 file or handing to a TLS stack.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.der
    }

    /// The key as a `PRIVATE KEY` PEM block (zeroized on drop).
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(crate::pem::encode("PRIVATE KEY", &self.der))
    }

    /// An rcgen key pair, for building CSRs.
    pub fn to_rcgen(&self) -> Result<rcgen::KeyPair, KeyError> {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(self.der.as_slice());
        rcgen::KeyPair::try_from(&rustls_pki_types::PrivateKeyDer::Pkcs8(der))
            .map_err(|e| KeyError::Rejected(e.to_string()))
    }

    /// The public half as a DER SubjectPublicKeyInfo, as a certificate for this key carries it.
    pub fn public_key_spki(&self) -> Result<Vec<u8>, KeyError> {
        use rcgen::PublicKeyData;
        Ok(self.to_rcgen()?.subject_public_key_info())
    }

    /// A rustls view of the key, for loading a signing key (borrowed: no copy of the key
    /// bytes is made outside this zeroizing value).
    pub fn to_rustls(&self) -> rustls_pki_types::PrivateKeyDer<'_> {
        rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(self.der.as_slice()))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey").field("len", &self.der.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_spki_is_what_a_certificate_for_the_key_carries() {
        let k = PrivateKey::generate_ec_p256().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["x".into()]).unwrap().self_signed(&k.to_rcgen().unwrap()).unwrap();
        let facts = crate::x509::cert_facts(cert.der()).unwrap();
        assert_eq!(k.public_key_spki().unwrap(), facts.spki);
        assert_ne!(PrivateKey::generate_ec_p256().unwrap().public_key_spki().unwrap(), facts.spki);
    }

    #[test]
    fn private_key_debug_shows_only_length() {
        let k = PrivateKey::generate_ec_p256().unwrap();
        let dbg = format!("{k:?}");
        assert_eq!(dbg, format!("PrivateKey {{ len: {} }}", k.pkcs8_der().len()));
    }

    #[test]
    fn key_type_round_trips_its_config_spelling() {
        for k in KeyType::ALL {
            assert_eq!(k.as_str().parse::<KeyType>().unwrap(), k);
        }
        assert!("ed25519".parse::<KeyType>().is_err());
    }
}
