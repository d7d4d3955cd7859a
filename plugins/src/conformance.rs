//! The conformance suite every [`KeyManager`] passes: one behaviour, many backends.
//! Call [`run`] from each implementation's tests.

use ring::signature::{self, UnparsedPublicKey};
use tessera_identity::KeyType;

use crate::KeyManager;

fn verify_alg(kt: KeyType) -> &'static dyn signature::VerificationAlgorithm {
    match kt {
        KeyType::EcP256 => &signature::ECDSA_P256_SHA256_ASN1,
        KeyType::EcP384 => &signature::ECDSA_P384_SHA384_ASN1,
        KeyType::Rsa2048 | KeyType::Rsa3072 => &signature::RSA_PKCS1_2048_8192_SHA256,
    }
}

/// Runs the suite; panics (test failure) on the first broken rule.
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
pub async fn run(km: &dyn KeyManager) {
    assert!(km.get_key("x509-CA-A").await.unwrap().is_none(), "{}: absent key must be None", km.name());
    assert!(km.generate_key("../escape", KeyType::EcP256).await.is_err(), "{}: path-like key id accepted", km.name());

    for kt in [KeyType::EcP256, KeyType::EcP384, KeyType::Rsa2048] {
        let key = km.generate_key("x509-CA-A", kt).await.unwrap();
        assert_eq!(key.key_type(), kt);
        let sig = key.sign(b"to be signed").unwrap();
        UnparsedPublicKey::new(verify_alg(kt), key.public_key_raw())
            .verify(b"to be signed", &sig)
            .unwrap_or_else(|_| panic!("{}: {kt} signature does not verify", km.name()));
        let again = km.get_key("x509-CA-A").await.unwrap().expect("generated key is gettable");
        assert_eq!(again.public_key_raw(), key.public_key_raw(), "{}: get returned another key", km.name());
    }

    let a = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    let b = km.generate_key("x509-CA-B", KeyType::EcP256).await.unwrap();
    assert_ne!(a.public_key_raw(), b.public_key_raw(), "{}: slots share a key", km.name());
    let replaced = km.generate_key("x509-CA-A", KeyType::EcP256).await.unwrap();
    assert_ne!(replaced.public_key_raw(), a.public_key_raw(), "{}: regenerate kept the old key", km.name());
    let dbg = format!("{replaced:?}");
    assert!(!dbg.contains("pkcs8") || dbg.len() < 200, "{}: Debug may show key material: {dbg}", km.name());
}
