//! The KeyManager plugin kind: generates and holds the CA's private keys and signs with them.
//! Keys are addressed by a slot ID (`x509-CA-A`, `JWT-Signer-B`, ...); generating into a slot
//! replaces the key that was there.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use tessera_identity::{KeyType, PrivateKey};

pub mod disk;
pub mod memory;

/// Key manager errors. They never carry key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyManagerError {
    /// Key IDs are 1-64 characters of `[A-Za-z0-9._-]`.
    #[error("invalid key id {0:?}")]
    InvalidKeyId(String),
    /// Key generation failed.
    #[error("generating a {0} key failed: {1}")]
    Generate(KeyType, String),
    /// Signing failed.
    #[error("signing with key {0:?} failed")]
    Sign(String),
    /// A stored key cannot be read.
    #[error("key {id:?} is corrupt or unreadable: {reason}")]
    Corrupt {
        /// The key ID.
        id: String,
        /// What is wrong (never the key).
        reason: String,
    },
    /// Storage I/O failed.
    #[error("key storage: {0}")]
    Io(#[from] std::io::Error),
}

/// A CA key held by a key manager. `sign` may block (an HSM round trip): call it off the
/// async reactor.
pub trait CaKey: Send + Sync + fmt::Debug {
    /// The slot ID.
    fn id(&self) -> &str;
    /// The key type.
    fn key_type(&self) -> KeyType;
    /// The raw public key as X.509 carries it in subjectPublicKey (EC point or RSAPublicKey).
    fn public_key_raw(&self) -> &[u8];
    /// Signs `msg` as X.509 expects: DER ECDSA, or RSA PKCS#1 v1.5 with SHA-256.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyManagerError>;
    /// True when `sign` waits on something outside the process (an HSM round trip): callers
    /// must not run it on an async worker. Software keys answer false.
    fn blocks(&self) -> bool {
        false
    }
}

/// Holds the CA's keys.
#[async_trait]
pub trait KeyManager: Send + Sync + fmt::Debug {
    /// Generates a new key in slot `id`, replacing any key there.
    async fn generate_key(&self, id: &str, key_type: KeyType) -> Result<Arc<dyn CaKey>, KeyManagerError>;
    /// The key in slot `id`, if any.
    async fn get_key(&self, id: &str) -> Result<Option<Arc<dyn CaKey>>, KeyManagerError>;
    /// The plugin's name, for logs and metrics.
    fn name(&self) -> &'static str;
}

pub(crate) fn check_key_id(id: &str) -> Result<(), KeyManagerError> {
    let ok = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok { Ok(()) } else { Err(KeyManagerError::InvalidKeyId(id.to_owned())) }
}

/// A software key (ring) built from PKCS#8; shared by the memory and disk key managers.
pub(crate) struct SoftwareKey {
    id: String,
    key_type: KeyType,
    inner: Inner,
    pkcs8: PrivateKey,
}

enum Inner {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair),
}

impl fmt::Debug for SoftwareKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SoftwareKey").field("id", &self.id).field("key_type", &self.key_type).finish_non_exhaustive()
    }
}

impl SoftwareKey {
    pub(crate) fn generate(id: &str, key_type: KeyType) -> Result<Self, KeyManagerError> {
        let gen_err = |e: String| KeyManagerError::Generate(key_type, e);
        let pkcs8 = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => {
                let alg = ec_alg(key_type);
                let doc =
                    EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new()).map_err(|e| gen_err(e.to_string()))?;
                PrivateKey::from_pkcs8_der(doc.as_ref().to_vec())
            }
            KeyType::Rsa2048 | KeyType::Rsa3072 => {
                use rsa::pkcs8::EncodePrivateKey;
                let bits = if key_type == KeyType::Rsa2048 { 2048 } else { 3072 };
                let mut rng = rand::rng();
                let key = rsa::PrivateKey::new(&mut rng, bits).map_err(|e| gen_err(e.to_string()))?;
                let doc = key.to_pkcs8_der().map_err(|e| gen_err(e.to_string()))?;
                PrivateKey::from_pkcs8_der(doc.as_bytes().to_vec())
            }
        };
        Self::from_pkcs8(id, key_type, pkcs8).map_err(|e| gen_err(e.to_string()))
    }

    pub(crate) fn from_pkcs8(id: &str, key_type: KeyType, pkcs8: PrivateKey) -> Result<Self, KeyManagerError> {
        let corrupt = |reason: String| KeyManagerError::Corrupt { id: id.to_owned(), reason };
        let inner = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => Inner::Ec(
                EcdsaKeyPair::from_pkcs8(ec_alg(key_type), pkcs8.pkcs8_der(), &SystemRandom::new())
                    .map_err(|e| corrupt(e.to_string()))?,
            ),
            KeyType::Rsa2048 | KeyType::Rsa3072 => {
                Inner::Rsa(RsaKeyPair::from_pkcs8(pkcs8.pkcs8_der()).map_err(|e| corrupt(e.to_string()))?)
            }
        };
        Ok(Self { id: id.to_owned(), key_type, inner, pkcs8 })
    }

    pub(crate) fn pkcs8(&self) -> &PrivateKey {
        &self.pkcs8
    }
}

fn ec_alg(kt: KeyType) -> &'static signature::EcdsaSigningAlgorithm {
    if kt == KeyType::EcP384 {
        &signature::ECDSA_P384_SHA384_ASN1_SIGNING
    } else {
        &signature::ECDSA_P256_SHA256_ASN1_SIGNING
    }
}

impl CaKey for SoftwareKey {
    fn id(&self) -> &str {
        &self.id
    }

    fn key_type(&self) -> KeyType {
        self.key_type
    }

    fn public_key_raw(&self) -> &[u8] {
        match &self.inner {
            Inner::Ec(k) => k.public_key().as_ref(),
            Inner::Rsa(k) => k.public_key().as_ref(),
        }
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, KeyManagerError> {
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Ec(k) => {
                k.sign(&rng, msg).map(|s| s.as_ref().to_vec()).map_err(|_| KeyManagerError::Sign(self.id.clone()))
            }
            Inner::Rsa(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .map_err(|_| KeyManagerError::Sign(self.id.clone()))?;
                Ok(sig)
            }
        }
    }
}
