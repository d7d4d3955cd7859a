//! Real Workload API clients against the real agent binary: py-spiffe (PyPI `spiffe`) and the
//! agent's own CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::process::Command;

use tessera_test_util::{Mesh, venv_tool};

#[test]
fn py_spiffe_fetches_x509_and_jwt_svids_and_validates_the_jwt() {
    let m = Mesh::start("ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"", "500ms");
    m.register("spiffe://example.org/py", &[]);
    // The agent picks the entry up within its sync interval.
    m.wait_for_svid("spiffe://example.org/py");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/py_spiffe_client.py");
    let out = Command::new(venv_tool("python")).arg(script).arg(&m.socket).arg("svc-a").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "py-spiffe failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let facts: HashMap<&str, &str> = stdout.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(facts["x509_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(facts["x509_chain_len"], "1");
    assert_eq!(facts["x509_bundle_authorities"], "1");
    assert_eq!(facts["x509_bundles_has_td"], "True");
    assert_eq!(facts["jwt_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(facts["jwt_validated_spiffe_id"], "spiffe://example.org/py");
    assert_eq!(facts["jwt_bundle_keys"], "1");
    assert!(facts["wrong_audience"].starts_with("refused"), "{stdout}");

    // The same SVID through the agent CLI, written to files that openssl verifies.
    let out_dir = m.dir.path().join("fetched");
    let o = m.agent_cli(&["api", "fetch", "x509", "--write", out_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = tessera_test_util::run(
        "openssl",
        &[
            "verify",
            "-CAfile",
            out_dir.join("bundle.0.pem").to_str().unwrap(),
            out_dir.join("svid.0.pem").to_str().unwrap(),
        ],
    );
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let serial = tessera_identity::x509::cert_facts(
        &tessera_identity::pem::decode_certs(&std::fs::read(out_dir.join("svid.0.pem")).unwrap()).unwrap()[0],
    )
    .unwrap()
    .serial;
    assert_eq!(serial, facts["x509_serial"], "py-spiffe and the CLI saw different SVIDs");
}
