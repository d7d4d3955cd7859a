//! The `tessera` (nested) upstream: a cluster's server gets its intermediate from a parent
//! Tessera server of the same trust domain, authenticated as an agent with a `downstream`
//! entry. SVIDs chain to the parent's root (openssl verify); the child restarts without a new
//! token; an agent without a downstream entry is refused; and a root rotation in the parent
//! reaches the child's Envoys before anything is signed under it, with no failed request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tessera_test_util::envoy::{EnvoyPair, envoy_pair, served_serials, validator_certs};
use tessera_test_util::{Mesh, ServerProc, Traffic, bin, free_port, http_get, openssl_verify, server_config, wait_for};

/// A join token on the parent; with `downstream`, also a downstream entry for its agent.
fn token(parent: &ServerProc, downstream: bool) -> String {
    let t: Value = serde_json::from_str(&parent.cli_ok(&["token", "generate", "--output", "json"])).unwrap();
    let (token, agent) = (t["token"].as_str().unwrap().to_owned(), t["agent_id"].as_str().unwrap().to_owned());
    if downstream {
        parent.cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/cluster-2/server",
            "--parent-id",
            &agent,
            "--selector",
            "unix:uid:0",
            "--downstream",
        ]);
    }
    token
}

fn upstream_toml(port: u16, bundle: &Path, token: &str) -> String {
    format!(
        "[upstream_authority]\ntype = \"tessera\"\nserver_address = \"127.0.0.1:{port}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\n",
        bundle.display()
    )
}

#[test]
fn a_child_server_gets_its_intermediate_from_a_parent_and_follows_its_root_rotation() {
    let pdir = tempfile::tempdir().unwrap();
    let pport = free_port();
    let parent_cfg = server_config(pdir.path(), "ca_ttl = \"24h\"")
        .replace("agent_api_address = \"127.0.0.1:0\"", &format!("agent_api_address = \"127.0.0.1:{pport}\""));
    let parent = ServerProc::start_text(pdir.path(), &parent_cfg);
    let parent_bundle = pdir.path().join("parent-bundle.pem");
    std::fs::write(&parent_bundle, parent.cli_ok(&["bundle", "show"])).unwrap();

    // An agent without a downstream entry cannot get a CA: the child does not start.
    let d0 = tempfile::tempdir().unwrap();
    let refused = d0.path().join("server.toml");
    std::fs::write(
        &refused,
        server_config(d0.path(), "ca_ttl = \"24h\"") + &upstream_toml(pport, &parent_bundle, &token(&parent, false)),
    )
    .unwrap();
    let out = Command::new(bin("tessera-server")).args(["run", "--config"]).arg(&refused).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no downstream entry"), "{err}");

    let upstream = upstream_toml(pport, &parent_bundle, &token(&parent, true));
    let mut child = Mesh::start_custom("example.org", "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"10s\"", "1s", |t| {
        t.replace("[server]\n", "[server]\nrotation_check_interval = \"1s\"\n") + &upstream
    });
    assert_eq!(child.server.cli_ok(&["bundle", "show"]), std::fs::read_to_string(&parent_bundle).unwrap());
    let probe = child.dir.path().join("probe");
    child.server.cli_ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/probe",
        "--write",
        probe.to_str().unwrap(),
    ]);
    assert!(
        openssl_verify(&parent_bundle, &probe.join("svid.pem")),
        "the child's SVID does not chain to the parent's root"
    );
    assert_eq!(tessera_identity::pem::decode_certs(&std::fs::read(probe.join("svid.pem")).unwrap()).unwrap().len(), 2);

    // Restart: the saved agent identity is reused (the join token is spent).
    child.server.stop();
    child.server.spawn();
    assert_eq!(child.server.cli_ok(&["bundle", "show"]), std::fs::read_to_string(&parent_bundle).unwrap());

    child.register("spiffe://example.org/front", &[]);
    child.register("spiffe://example.org/back", &[]);
    let d = child.dir.path().to_owned();
    let EnvoyPair { front, back, front_addr } =
        envoy_pair(&d, &child.socket, "spiffe://example.org/front", &child.socket, "spiffe://example.org/back");
    assert_eq!(http_get(&front_addr, "/").unwrap().0, 200, "front: {}\nback: {}", front.proc.log(), back.proc.log());

    let traffic = Traffic::start(&front_addr);
    let wait = |secs: u64, what: &str, ok: &mut dyn FnMut() -> bool| {
        wait_for(secs, what, ok, || format!("child: {}", child.server.log()))
    };

    // The parent prepares a new root: it reaches the child's Envoys through the stream.
    parent.cli_ok(&["localauthority", "x509", "prepare"]);
    wait(30, "the parent's new root in the child's Envoy", &mut || validator_certs(&front, "example.org") == 2);
    parent.cli_ok(&["localauthority", "x509", "activate"]);
    let new_root = {
        let all = tessera_identity::pem::decode_certs(parent.cli_ok(&["bundle", "show"]).as_bytes()).unwrap();
        let old = tessera_identity::pem::decode_certs(&std::fs::read(&parent_bundle).unwrap()).unwrap();
        all.into_iter().find(|c| !old.contains(c)).unwrap()
    };
    let new_root_pem = d.join("new-root.pem");
    std::fs::write(&new_root_pem, tessera_identity::pem::encode("CERTIFICATE", &new_root)).unwrap();
    // The child rotates its intermediate; it is now signed under the parent's new CA.
    let old = served_serials(&back, "spiffe://example.org/back");
    child.server.cli_ok(&["localauthority", "x509", "prepare"]);
    child.server.cli_ok(&["localauthority", "x509", "activate"]);
    let fetched = d.join("fetched");
    wait(40, "workload SVIDs chaining to the parent's new root", &mut || {
        let out = child.agent_cli(&["api", "fetch", "x509", "--write", fetched.to_str().unwrap()]);
        out.status.success() && openssl_verify(&new_root_pem, &fetched.join("svid.0.pem"))
    });
    wait(40, "Envoy serving a certificate from the new chain", &mut || {
        let now = served_serials(&back, "spiffe://example.org/back");
        !now.is_empty() && now.iter().all(|s| !old.contains(s))
    });
    std::thread::sleep(Duration::from_secs(2));
    traffic.assert_no_failures("parent Tessera root rotation");
}
