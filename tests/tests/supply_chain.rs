//! Supply chain: the CycloneDX SBOM that `scripts/sbom.py` writes from Cargo.lock lists what
//! the two binaries link, once each, with licences, package URLs and hashes, and a dependency
//! graph whose references resolve; and the TLS/HTTP/gRPC stack is there in one version.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::path::Path;

#[test]
fn the_sbom_lists_every_linked_crate_once_with_licence_purl_and_hash() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tessera.cdx.json");
    let run =
        std::process::Command::new("python3").arg("scripts/sbom.py").arg(&out).current_dir(repo).output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let bom: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(bom["bomFormat"], "CycloneDX");
    assert_eq!(bom["specVersion"], "1.5");
    let components = bom["components"].as_array().unwrap();
    let mut refs = HashSet::new();
    let mut versions: HashMap<&str, Vec<&str>> = HashMap::new();
    for c in components {
        let name = c["name"].as_str().unwrap();
        let version = c["version"].as_str().unwrap();
        assert_eq!(c["purl"], format!("pkg:cargo/{name}@{version}"));
        assert!(refs.insert(c["bom-ref"].as_str().unwrap()), "{name} {version} listed twice");
        assert!(c["licenses"][0]["expression"].as_str().is_some_and(|l| !l.is_empty()), "{name} has no licence");
        let from_repo = c["properties"][0]["value"] == "path";
        if !from_repo {
            assert_eq!(c["hashes"][0]["content"].as_str().map(str::len), Some(64), "{name} has no SHA-256");
        }
        versions.entry(name).or_default().push(version);
    }
    for one in ["tonic", "rustls", "hyper", "h2", "tokio-rustls", "prost", "ring", "kube-client", "k8s-openapi"] {
        assert_eq!(versions.get(one).map(Vec::len), Some(1), "{one}: {:?}", versions.get(one));
    }
    for never in ["openssl", "openssl-sys", "native-tls", "aws-lc-rs", "aws-lc-sys"] {
        assert!(!versions.contains_key(never), "{never} is linked");
    }
    for name in ["tessera-server", "tessera-agent"] {
        assert!(versions.contains_key(name));
    }
    for d in bom["dependencies"].as_array().unwrap() {
        assert!(refs.contains(d["ref"].as_str().unwrap()));
        for on in d["dependsOn"].as_array().unwrap() {
            assert!(refs.contains(on.as_str().unwrap()), "dangling {on}");
        }
    }
}
