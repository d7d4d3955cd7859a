//! Fuzz target bodies: each takes arbitrary bytes, feeds them to a parser of untrusted input,
//! and asserts what must hold for any input: no panic, and a round trip where one exists.
//! `fuzz_targets/*.rs` wrap them for libFuzzer (`cargo +nightly fuzz run <target>`); built
//! without `--cfg fuzzing` they replay files instead (`docs/FUZZING.md`).
//!
//! What it is not: no test of behaviour beyond those invariants; the property tests and the
//! end-to-end tests do that.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use prost::Message;
use tessera_identity::{Bundle, TrustDomain};

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

/// PKCS#10 parsing and checking; a CSR that parses re-checks the same way.
pub fn csr(data: &[u8]) {
    if let Ok(c) = tessera_identity::csr::CheckedCsr::from_der(data) {
        let id = tessera_identity::SpiffeId::new("spiffe://example.org/w").unwrap();
        let first = c.check_names(&id, &[]).is_ok();
        assert_eq!(first, c.check_names(&id, &[]).is_ok());
    }
    let _ = tessera_identity::pem::decode_csr(data);
}

/// SPIFFE bundle JSON: whatever parses re-serializes and parses to the same bundle.
pub fn bundle_json(data: &[u8]) {
    if let Ok(b) = Bundle::from_jwks(td(), data) {
        let again = Bundle::from_jwks(td(), b.to_jwks().unwrap().as_bytes()).unwrap();
        assert_eq!(again.x509_authorities, b.x509_authorities);
        assert_eq!(again.jwt_authorities.len(), b.jwt_authorities.len());
        assert_eq!(again.sequence_number, b.sequence_number);
    }
    let _ = tessera_identity::bundle::jwks_signing_keys(data);
}

/// JWT-SVID validation against an empty and a one-key bundle: never accepted (no key signs
/// the fuzzer's input), never a panic.
pub fn jwt_svid(data: &[u8]) {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let empty = Bundle::new(td());
    assert!(tessera_identity::jwt::validate(token, "aud", 0, |_| Some(&empty)).is_err());
    let _ = tessera_identity::jwt::peek_claims(token);
    let _ = tessera_identity::jwt::verify_jws(token, |_| Err(tessera_identity::jwt::JwtError::MissingKeyId));
}

/// SDS requests: decoded as Envoy sends them, every resource name looked up for a caller with
/// no identities: nothing but the public bundles is ever returned.
pub fn sds_request(data: &[u8]) {
    use tessera_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    let snap = tessera_agent::manager::Snapshot {
        svids: Vec::new(),
        bundle: Arc::new(Bundle::new(td())),
        federated: Default::default(),
        generation: 0,
        wants_exe_hash: false,
    };
    let mut names = Vec::new();
    if let Ok(r) = DiscoveryRequest::decode(data) {
        names.extend(r.resource_names);
    }
    if let Ok(r) = DeltaDiscoveryRequest::decode(data) {
        names.extend(r.resource_names_subscribe);
    }
    for n in names.iter().take(64) {
        if let Some(s) = tessera_agent::sds::secret_for(n, &snap, &[]) {
            assert!(
                !matches!(
                    s.r#type,
                    Some(tessera_proto::envoy::extensions::transport_sockets::tls::v3::secret::Type::TlsCertificate(_))
                ),
                "a certificate for a caller without identities ({n:?})"
            );
        }
    }
}

/// Workload API requests: decoded as clients send them; a JWT to validate is refused.
pub fn workload_request(data: &[u8]) {
    use tessera_proto::workload as wl;
    let _ = wl::X509svidRequest::decode(data);
    let _ = wl::X509BundlesRequest::decode(data);
    if let Ok(r) = wl::JwtsvidRequest::decode(data) {
        let _ = r.audience.len();
    }
    if let Ok(r) = wl::ValidateJwtsvidRequest::decode(data) {
        let empty = Bundle::new(td());
        assert!(tessera_identity::jwt::validate(&r.svid, &r.audience, 0, |_| Some(&empty)).is_err());
    }
}

/// Server and agent configuration files.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = tessera_server::config::Config::from_toml(text);
    let _ = tessera_agent::config::Config::from_toml(text);
}

/// Kubernetes input from workloads and peers: cgroup files, PSAT payloads, kubelet pod lists.
pub fn k8s_input(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(pc) = tessera_k8s::cgroup::parse(text)
    {
        assert_eq!(pc.pod_uid.len(), 36);
    }
    if let Ok(p) = tessera_k8s::psat::Payload::from_bytes(data) {
        let _ = p.agent_suffix();
    }
    if let Ok(list) = serde_json::from_slice::<k8s_openapi::List<k8s_openapi::api::core::v1::Pod>>(data) {
        for pod in &list.items {
            let _ = tessera_k8s::kubelet::pod_selectors(pod, Some("0"));
        }
    }
}

/// Without libFuzzer: run `f` on every file named on the command line (a corpus or a crash
/// reproducer), so a finding can be replayed on stable.
pub fn replay(f: fn(&[u8])) {
    for path in std::env::args().skip(1) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        f(&data);
        println!("{path}: ok");
    }
}
