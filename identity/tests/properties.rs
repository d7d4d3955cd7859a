//! Property tests (proptest) for everything that parses untrusted input: arbitrary bytes never
//! panic and get a precise error, round trips hold, and every single-bit change to a signed
//! object is refused. `docs/FUZZING.md` lists the fuzz targets that explore the same parsers
//! further.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use proptest::prelude::*;
use tessera_identity::csr::CheckedCsr;
use tessera_identity::{Bundle, JwtAuthority, PrivateKey, SpiffeId, TrustDomain};

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn valid_csr() -> Vec<u8> {
    let key = PrivateKey::generate_ec_p256().unwrap();
    tessera_identity::csr::build_csr(&SpiffeId::new("spiffe://example.org/w").unwrap(), &[], &key).unwrap()
}

thread_local! {
    /// Four CA certificates and JWT keys, made once (key generation is too slow per case).
    static POOL: Vec<(Vec<u8>, Vec<u8>)> = (0..4u8)
        .map(|i| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = tessera_identity::x509::ca_params(&td(), 0, 100 + i64::from(i), [i + 1; 16])
                .unwrap()
                .self_signed(&key)
                .unwrap();
            let jwt = rcgen::KeyPair::generate().unwrap();
            (cert.der().to_vec(), rcgen::PublicKeyData::subject_public_key_info(&jwt))
        })
        .collect();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn csr_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = CheckedCsr::from_der(&bytes);
    }

    #[test]
    fn bundle_documents_never_panic(doc in ".{0,2048}") {
        let _ = Bundle::from_jwks(td(), doc.as_bytes());
        let _ = tessera_identity::bundle::jwks_signing_keys(doc.as_bytes());
    }

    #[test]
    fn bundle_json_shapes_never_panic(
        kty in prop_oneof![Just("EC"), Just("RSA"), Just("OKP"), Just("")],
        crv in prop_oneof![Just("P-256"), Just("P-384"), Just("P-521")],
        x in "[A-Za-z0-9_-]{0,90}",
        y in "[A-Za-z0-9_-]{0,90}",
        use_ in prop_oneof![Just("x509-svid"), Just("jwt-svid"), Just("sig"), Just("enc")],
        seq in any::<i64>(),
    ) {
        let doc = serde_json::json!({"keys": [{"kty": kty, "crv": crv, "x": x, "y": y, "use": use_, "kid": "k",
            "n": x, "e": "AQAB", "x5c": [y]}], "spiffe_sequence": seq});
        let _ = Bundle::from_jwks(td(), doc.to_string().as_bytes());
        let _ = tessera_identity::bundle::jwks_signing_keys(doc.to_string().as_bytes());
    }

    #[test]
    fn jwt_validation_never_panics(token in "[A-Za-z0-9_.=-]{0,600}") {
        let b = Bundle::new(td());
        let _ = tessera_identity::jwt::validate(&token, "aud", 0, |_| Some(&b));
    }

    #[test]
    fn pem_round_trips(der in proptest::collection::vec(any::<u8>(), 1..2048)) {
        let pem = tessera_identity::pem::encode("CERTIFICATE", &der);
        let back = tessera_identity::pem::decode_certs(pem.as_bytes()).unwrap();
        prop_assert_eq!(back[0].as_ref(), der.as_slice());
        let csr_pem = tessera_identity::pem::encode("CERTIFICATE REQUEST", &der);
        prop_assert_eq!(tessera_identity::pem::decode_csr(csr_pem.as_bytes()).unwrap(), der);
    }

    #[test]
    fn spiffe_ids_round_trip_and_garbage_is_refused_not_panicked(
        segments in proptest::collection::vec("[a-z0-9._-]{1,12}", 1..6),
        junk in ".{0,200}",
    ) {
        let segments: Vec<String> = segments.into_iter().filter(|s| s != "." && s != "..").collect();
        prop_assume!(!segments.is_empty());
        let text = format!("spiffe://example.org/{}", segments.join("/"));
        let id = SpiffeId::new(&text).unwrap();
        prop_assert_eq!(id.to_string(), text);
        let _ = SpiffeId::new(&junk);
        let _ = tessera_identity::ids::parse_spiffe_id(&junk);
    }

    #[test]
    fn bundles_round_trip_through_jwks(seq in any::<u64>(), hint in proptest::option::of(1u64..1_000_000), n in 0usize..4) {
        let b = POOL.with(|pool| {
            let mut b = Bundle::new(td());
            for (cert, spki) in pool.iter().take(n) {
                b.add_x509_authority(cert);
                let key_id = format!("k{}", b.jwt_authorities.len());
                b.add_jwt_authority(JwtAuthority { key_id, public_key: spki.clone(), expires_at: 0 });
            }
            b.sequence_number = seq;
            b.refresh_hint = hint;
            b
        });
        let back = Bundle::from_jwks(td(), b.to_jwks().unwrap().as_bytes()).unwrap();
        prop_assert_eq!(&back.x509_authorities, &b.x509_authorities);
        let keys = |x: &Bundle| x.jwt_authorities.iter().map(|k| (k.key_id.clone(), k.public_key.clone())).collect::<Vec<_>>();
        prop_assert_eq!(keys(&back), keys(&b));
        prop_assert_eq!(back.sequence_number, seq);
        prop_assert_eq!(back.refresh_hint, hint);
    }
}

/// Every single-bit change anywhere in a signed CSR is refused, or (for the few bits the
/// signature does not cover) changes nothing the CA uses. Exhaustive, not sampled.
#[test]
fn every_bit_flip_of_a_csr_is_refused_or_harmless() {
    let csr = valid_csr();
    let original = CheckedCsr::from_der(&csr).unwrap();
    let signed = signed_range(&csr);
    let mut accepted = 0;
    for i in 0..csr.len() {
        for bit in 0..8 {
            let mut m = csr.clone();
            m[i] ^= 1 << bit;
            if let Ok(c) = CheckedCsr::from_der(&m) {
                accepted += 1;
                assert!(
                    !signed.contains(&i),
                    "a flip inside the signed CertificationRequestInfo was accepted: byte {i} bit {bit}"
                );
                assert_eq!(c.uris(), original.uris(), "byte {i} bit {bit}");
                assert_eq!(
                    format!("{:?}", c.public_key()),
                    format!("{:?}", original.public_key()),
                    "byte {i} bit {bit}"
                );
            }
        }
    }
    // x509-parser is lenient about a few tag bits outside the signed part (the outer
    // SEQUENCE, the signature algorithm, the signature BIT STRING): a handful of flips, none
    // in what the signature covers.
    assert!(accepted < csr.len(), "{accepted} of {} flips accepted", csr.len() * 8);
}

/// The byte range of the CertificationRequestInfo TLV (what the CSR's signature covers).
fn signed_range(der: &[u8]) -> std::ops::Range<usize> {
    fn header(der: &[u8], at: usize) -> (usize, usize) {
        let first = der[at + 1];
        if first < 0x80 {
            (2, usize::from(first))
        } else {
            let n = usize::from(first & 0x7f);
            (2 + n, der[at + 2..at + 2 + n].iter().fold(0, |acc, b| (acc << 8) | usize::from(*b)))
        }
    }
    let (outer_header, _) = header(der, 0);
    let (h, len) = header(der, outer_header);
    outer_header..outer_header + h + len
}

/// Every single-character change to a valid JWT-SVID's header, claims or signature is refused.
#[test]
fn every_character_change_of_a_jwt_svid_is_refused() {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut b = Bundle::new(td());
    b.add_jwt_authority(JwtAuthority {
        key_id: "k1".into(),
        public_key: rcgen::PublicKeyData::subject_public_key_info(&key),
        expires_at: 0,
    });
    let claims = tessera_identity::jwt::Claims {
        sub: "spiffe://example.org/w".into(),
        aud: vec!["svc".into()],
        exp: 1000,
        iat: 1,
    };
    let pkcs8 = key.serialize_der();
    let token = tessera_identity::jwt::mint_es256("k1", &claims, |input| {
        let rng = ring::rand::SystemRandom::new();
        let kp =
            ring::signature::EcdsaKeyPair::from_pkcs8(&ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING, &pkcs8, &rng)
                .map_err(|e| e.to_string())?;
        kp.sign(&rng, input).map(|s| s.as_ref().to_vec()).map_err(|e| e.to_string())
    })
    .unwrap();
    assert!(tessera_identity::jwt::validate(&token, "svc", 10, |_| Some(&b)).is_ok());
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).ok();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = token.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b'.' {
            continue;
        }
        let mut m = bytes.to_vec();
        m[i] = *alphabet.iter().find(|c| **c != bytes[i]).unwrap();
        let changed = String::from_utf8(m).unwrap();
        // A last base64url character's unused bits decode to the same bytes: not a change.
        if changed.split('.').zip(token.split('.')).all(|(a, o)| b64(a) == b64(o)) {
            continue;
        }
        assert!(tessera_identity::jwt::validate(&changed, "svc", 10, |_| Some(&b)).is_err(), "position {i}");
    }
}
