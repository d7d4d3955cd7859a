//! Every input a fuzzer once crashed on (`fuzz/regressions/<target>/`) stays fixed: each is
//! replayed through its target's checks on every `cargo test`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

/// A fuzz target: its name and its checks.
type Target = (&'static str, fn(&[u8]));

#[test]
fn every_past_finding_passes_its_target() {
    let targets: [Target; 7] = [
        ("csr", tessera_fuzz::csr),
        ("bundle_json", tessera_fuzz::bundle_json),
        ("jwt_svid", tessera_fuzz::jwt_svid),
        ("sds_request", tessera_fuzz::sds_request),
        ("workload_request", tessera_fuzz::workload_request),
        ("config", tessera_fuzz::config),
        ("k8s_input", tessera_fuzz::k8s_input),
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut replayed = 0;
    for (name, check) in targets {
        for dir in ["regressions", "seeds"] {
            let Ok(files) = std::fs::read_dir(root.join(dir).join(name)) else { continue };
            for f in files {
                let path = f.unwrap().path();
                check(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
    }
    assert!(replayed >= 10, "only {replayed} inputs found");
}

#[test]
fn a_bundle_with_an_unpublishable_x509_key_is_refused_at_parse() {
    let doc = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("regressions/bundle_json/x509-svid-key-not-publishable.json"),
    )
    .unwrap();
    let td = tessera_identity::TrustDomain::new("example.org").unwrap();
    let err = tessera_identity::Bundle::from_jwks(td, &doc).unwrap_err().to_string();
    assert!(err.contains("x5c certificate key"), "{err}");
}
