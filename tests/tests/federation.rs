//! Federation end to end, with the real binaries and real Envoy: two "clusters" on this
//! machine (own server, agent, sockets and ports), each serving its bundle endpoint and
//! fetching the other's; Envoy in A calls Envoy in B over mTLS, each validating the other
//! against the federated bundle it got over SDS; B rotates its CA under traffic. And our
//! bundle document read by py-spiffe and the Rust spiffe crate, and go-spiffe's test
//! document imported with `bundle set --format spiffe`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tessera_identity::tls::Authorize;
use tessera_identity::{Bundle, SpiffeId, TrustDomain};
use tessera_test_util::envoy::{
    agent_cluster, back_config, counter_sum, envoy_binary, hcm, listener, mtls_cluster, served_serials,
    start_envoy_binary, validator_certs,
};
use tessera_test_util::{Mesh, ServerProc, Traffic, free_port, http_get, venv_tool, wait_for};

/// GETs `/` from a bundle endpoint with SPIFFE authentication of `endpoint_id`.
fn fetch_bundle_doc(port: u16, roots_pem: &str, endpoint_id: &str) -> String {
    let roots: Vec<rustls_pki_types::CertificateDer<'static>> =
        tessera_identity::pem::decode_certs(roots_pem.as_bytes()).unwrap();
    let mut cfg =
        tessera_identity::tls::client_config(&roots, Authorize::Id(SpiffeId::new(endpoint_id).unwrap()), None).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let conn = rustls::ClientConnection::new(Arc::new(cfg), "127.0.0.1".try_into().unwrap()).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw);
    let text = String::from_utf8(raw).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n").unwrap().1.to_owned()
}

fn endpoint_toml(port: u16, hint: &str) -> String {
    format!(
        "[federation.bundle_endpoint]\naddress = \"127.0.0.1:{port}\"\nprofile = \"https_spiffe\"\nrefresh_hint = \"{hint}\"\n"
    )
}

fn py_parse(td: &str, doc: &Path) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/parse_bundle.py");
    let out = Command::new(venv_tool("python3")).arg(script).arg(td).arg(doc).output().unwrap();
    assert!(out.status.success(), "py-spiffe: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bundle_document_parses_with_py_spiffe_and_the_spiffe_crate_and_imports_go_spiffe_data() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = ServerProc::start_in(dir.path(), "a.example", "ca_ttl = \"24h\"", &endpoint_toml(port, "10m"));
    let roots = server.cli_ok(&["bundle", "show"]);
    let doc = fetch_bundle_doc(port, &roots, "spiffe://a.example/tessera/server");
    let ours = Bundle::from_jwks(TrustDomain::new("a.example").unwrap(), doc.as_bytes()).unwrap();
    std::fs::write(dir.path().join("doc.json"), &doc).unwrap();

    // py-spiffe.
    let py = py_parse("a.example", &dir.path().join("doc.json"));
    let kids: Vec<&str> = ours.jwt_authorities.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(py["jwt_key_ids"], json!(kids));
    assert_eq!(py["x509_authorities"], json!(ours.x509_authorities.len()));
    assert_eq!(py["x509_kids"], json!([]), "x509-svid keys must not carry a kid (X509-SVID §6.1)");
    assert_eq!(py["refresh_hint"], json!(600));
    assert_eq!(py["sequence"], json!(ours.sequence_number));

    // The Rust spiffe crate (go-spiffe's semantics): JWT authorities from the jwt-svid keys,
    // X.509 authorities from the x509-svid keys' x5c.
    let v: Value = serde_json::from_str(&doc).unwrap();
    let by_use = |u: &str| v["keys"].as_array().unwrap().iter().filter(|k| k["use"] == u).cloned().collect::<Vec<_>>();
    let td = spiffe::TrustDomain::new("a.example").unwrap();
    let jwt = spiffe::bundle::jwt::JwtBundle::from_jwt_authorities(
        td.clone(),
        serde_json::to_vec(&json!({"keys": by_use("jwt-svid")})).unwrap().as_slice(),
    )
    .unwrap();
    for k in &kids {
        assert!(jwt.find_jwt_authority(k).is_some(), "spiffe crate lost JWT key {k}");
    }
    let der: Vec<u8> = by_use("x509-svid")
        .iter()
        .flat_map(|k| base64::engine::general_purpose::STANDARD.decode(k["x5c"][0].as_str().unwrap()).unwrap())
        .collect();
    let x509 = spiffe::bundle::x509::X509Bundle::parse_from_der(td, &der).unwrap();
    assert_eq!(x509.authorities().len(), ours.x509_authorities.len());
    for (a, b) in x509.authorities().iter().zip(&ours.x509_authorities) {
        assert_eq!(a.as_ref(), b.as_ref());
    }

    // go-spiffe's test document (x509-svid and jwt-svid keys) imports as-is.
    let go_doc = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata/go-spiffe-spiffebundle_valid_1.json");
    server.cli_ok(&["bundle", "set", "--id", "local", "--format", "spiffe", "--path", go_doc]);
    let listed: Value =
        serde_json::from_str(&server.cli_ok(&["bundle", "list", "--format", "spiffe", "--output", "json"])).unwrap();
    let local = listed["bundles"].as_array().unwrap().iter().find(|b| b["trust_domain"] == "local").unwrap();
    let exported = dir.path().join("local.json");
    std::fs::write(&exported, local["bundle"].as_str().unwrap()).unwrap();
    let py = py_parse("local", &exported);
    assert_eq!(py["jwt_key_ids"], json!(["C6vs25welZOx6WksNYfbMfiw9l96pMnD"]));
    assert_eq!(py["x509_authorities"], json!(1));
    let original = py_parse("local", Path::new(go_doc));
    assert_eq!(
        (original["jwt_key_ids"].clone(), original["x509_authorities"].clone()),
        (py["jwt_key_ids"].clone(), py["x509_authorities"].clone())
    );
}

fn wait(secs: u64, what: &str, ok: impl FnMut() -> bool) {
    wait_for(secs, what, ok, String::new)
}

fn federate(from: &Mesh, peer_td: &str, peer_port: u16, peer: &Mesh) {
    let out = from.federate(peer_td, &format!("https://127.0.0.1:{peer_port}"), peer);
    assert!(out.contains("Federation relationship created"), "{out}");
    let r: Value = serde_json::from_str(&from.server.cli_ok(&[
        "federation",
        "refresh",
        "--trust-domain",
        peer_td,
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(r["trust_domain"], peer_td);
}

/// A front Envoy in A: `/` on `port` goes to B's `back` Envoy, on `port2` to B's `back2`.
fn front(admin: u16, port: u16, port2: u16, up: u16, up2: u16, socket: &Path, me: &str) -> Value {
    let r = |c: &str| json!({"match": {"prefix": "/"}, "route": {"cluster": c}});
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener(port, hcm(r("back")), None), listener(port2, hcm(r("back2")), None)],
            "clusters": [
                mtls_cluster("back", up, "GRPC", me, "spiffe://b.example/back"),
                mtls_cluster("back2", up2, "GRPC", me, "spiffe://b.example/back2"),
                agent_cluster(socket)
            ]
        }
    })
}

#[test]
fn envoys_in_two_federated_clusters_talk_over_mtls_and_survive_a_ca_rotation() {
    let (a_ep, b_ep) = (free_port(), free_port());
    // 20 s SVIDs: B's Envoy gets a certificate from B's new CA soon after activation.
    let ca = "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"20s\"";
    let a = Mesh::start_in("a.example", ca, "1s", &endpoint_toml(a_ep, "2s"));
    let b = Mesh::start_in("b.example", ca, "1s", &endpoint_toml(b_ep, "2s"));
    federate(&a, "b.example", b_ep, &b);
    federate(&b, "a.example", a_ep, &a);

    // Workloads are told apart by executable path: Envoy itself, or a copy of it.
    let envoy = envoy_binary();
    let copy_in = |m: &Mesh| {
        let p = m.dir.path().join("envoy-copy");
        std::fs::copy(&envoy, &p).unwrap();
        p
    };
    let (a_copy, b_copy) = (copy_in(&a), copy_in(&b));
    let path_sel = |p: &Path| format!("unix:path:{}", p.display());
    a.register_with("spiffe://a.example/front", &path_sel(&envoy), &["--federates-with", "b.example"]);
    a.register_with("spiffe://a.example/front2", &path_sel(&a_copy), &[]);
    b.register_with("spiffe://b.example/back", &path_sel(&envoy), &["--federates-with", "a.example"]);
    b.register_with("spiffe://b.example/back2", &path_sel(&b_copy), &[]);

    let d = a.dir.path().to_owned();
    let (b1_admin, b1_port, b2_admin, b2_port) = (free_port(), free_port(), free_port(), free_port());
    let b1 = start_envoy_binary(
        &envoy,
        &d,
        "b-back",
        &back_config(b1_admin, b1_port, &b.socket, "GRPC", "spiffe://b.example/back", "spiffe://a.example/front"),
        b1_admin,
    );
    let b2 = start_envoy_binary(
        &b_copy,
        &d,
        "b-back2",
        &back_config(b2_admin, b2_port, &b.socket, "GRPC", "spiffe://b.example/back2", "spiffe://a.example/front"),
        b2_admin,
    );
    let (a1_admin, a1_port, a1_port2) = (free_port(), free_port(), free_port());
    let a1 = start_envoy_binary(
        &envoy,
        &d,
        "a-front",
        &front(a1_admin, a1_port, a1_port2, b1_port, b2_port, &a.socket, "spiffe://a.example/front"),
        a1_admin,
    );
    let (a2_admin, a2_port, a2_port2) = (free_port(), free_port(), free_port());
    let a2 = start_envoy_binary(
        &a_copy,
        &d,
        "a-front2",
        &front(a2_admin, a2_port, a2_port2, b1_port, b2_port, &a.socket, "spiffe://a.example/front2"),
        a2_admin,
    );
    let a1_addr = format!("127.0.0.1:{a1_port}");

    // A → B over mTLS across trust domains.
    let (code, body) = http_get(&a1_addr, "/").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "hello from back"),
        "a-front: {}\nb-back: {}",
        a1.proc.log(),
        b1.proc.log()
    );
    assert_eq!(validator_certs(&a1, "b.example"), 1, "a-front should trust b.example");
    assert_eq!(validator_certs(&b1, "a.example"), 1, "b-back should trust a.example");

    // A workload in A without federates_with b.example cannot authenticate B.
    assert_eq!(http_get(&format!("127.0.0.1:{a2_port}"), "/").unwrap().0, 503);
    assert_eq!(validator_certs(&a2, "b.example"), 0, "a-front2 got b.example's bundle");
    assert!(counter_sum(&a2, "ssl.fail_verify_error") > 0);
    // A workload in B without federates_with a.example refuses A's client certificate.
    assert_eq!(http_get(&format!("127.0.0.1:{a1_port2}"), "/").unwrap().0, 503);
    assert!(counter_sum(&b2, "ssl.fail_verify_error") > 0, "b-back2 did not refuse a.example");
    assert_eq!(counter_sum(&a1, "ssl.fail_verify_error"), 0);

    // B rotates its CA under continuous A → B traffic.
    let traffic = Traffic::start(&a1_addr);
    let old_serials = served_serials(&b1, "spiffe://b.example/back");
    b.server.cli_ok(&["localauthority", "x509", "prepare"]);
    // The prepared CA reaches A's server (bundle endpoint), A's agent and A's Envoy before
    // B signs with it.
    wait(30, "B's prepared CA in a-front's validation context", || validator_certs(&a1, "b.example") == 2);
    b.server.cli_ok(&["localauthority", "x509", "activate"]);
    wait(40, "b-back serving a certificate from B's new CA", || {
        let s = served_serials(&b1, "spiffe://b.example/back");
        !s.is_empty() && s.iter().all(|x| !old_serials.contains(x))
    });
    std::thread::sleep(Duration::from_secs(2));
    traffic.assert_no_failures("federated CA rotation");
    let (code, _) = http_get(&a1_addr, "/").unwrap();
    assert_eq!(code, 200);

    // `federation show` reports the peer's latest sequence and no error.
    let shown: Value = serde_json::from_str(&a.server.cli_ok(&[
        "federation",
        "show",
        "--trust-domain",
        "b.example",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown["last_error"], "");
    let b_seq = Bundle::from_jwks(
        TrustDomain::new("b.example").unwrap(),
        b.server.cli_ok(&["bundle", "show", "--format", "spiffe"]).as_bytes(),
    )
    .unwrap()
    .sequence_number;
    wait(10, "A holding B's latest bundle sequence", || {
        let s: Value = serde_json::from_str(&a.server.cli_ok(&[
            "federation",
            "show",
            "--trust-domain",
            "b.example",
            "--output",
            "json",
        ]))
        .unwrap();
        s["bundle_sequence"] == json!(b_seq)
    });
    drop((a1, a2, b1, b2));
}

#[test]
fn one_trust_domain_across_two_clusters_under_a_shared_root() {
    // The organisation's root, kept outside both clusters; each cluster's server gets its own
    // intermediate from it through the disk upstream.
    let shared = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "Example Org Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let root = p.self_signed(&key).unwrap();
    let (root_pem, key_pem) = (shared.path().join("root.pem"), shared.path().join("root.key"));
    std::fs::write(&root_pem, root.pem()).unwrap();
    std::fs::write(&key_pem, key.serialize_pem()).unwrap();
    let upstream = format!(
        "[upstream_authority]\ntype = \"disk\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        root_pem.display(),
        key_pem.display()
    );
    let ca = "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"";
    let c1 = Mesh::start_in("example.org", ca, "1s", &upstream);
    let c2 = Mesh::start_in("example.org", ca, "1s", &upstream);
    // Both clusters publish only the shared root.
    for c in [&c1, &c2] {
        let b = tessera_identity::pem::decode_certs(c.server.cli_ok(&["bundle", "show"]).as_bytes()).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].as_ref(), root.der().as_ref());
    }
    // An SVID from cluster 1 verifies with openssl against the root through the intermediate
    // (the command docs/multicluster.md shows), and the two clusters' intermediates differ.
    let inter = |c: &Mesh, name: &str| {
        let out = c.dir.path().join(name);
        c.server.cli_ok(&[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/probe",
            "--write",
            out.to_str().unwrap(),
        ]);
        let chain = tessera_identity::pem::decode_certs(&std::fs::read(out.join("svid.pem")).unwrap()).unwrap();
        assert_eq!(chain.len(), 2, "leaf and the cluster's intermediate");
        (out, chain[1].to_vec())
    };
    let (out1, i1) = inter(&c1, "mint1");
    let (_, i2) = inter(&c2, "mint2");
    assert_ne!(i1, i2);
    let v = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&root_pem)
        .arg("-untrusted")
        .arg(out1.join("svid.pem"))
        .arg(out1.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    c1.register("spiffe://example.org/front", &[]);
    c2.register("spiffe://example.org/back", &[]);
    let d = c1.dir.path().to_owned();
    let (b_admin, b_port, f_admin, f_port) = (free_port(), free_port(), free_port(), free_port());
    let back = start_envoy_binary(
        &envoy_binary(),
        &d,
        "c2-back",
        &back_config(b_admin, b_port, &c2.socket, "GRPC", "spiffe://example.org/back", "spiffe://example.org/front"),
        b_admin,
    );
    let front = start_envoy_binary(
        &envoy_binary(),
        &d,
        "c1-front",
        &tessera_test_util::envoy::front_config(
            f_admin,
            f_port,
            b_port,
            &c1.socket,
            "GRPC",
            "spiffe://example.org/front",
            "spiffe://example.org/back",
        ),
        f_admin,
    );
    for _ in 0..5 {
        let (code, body) = http_get(&format!("127.0.0.1:{f_port}"), "/").unwrap();
        assert_eq!(
            (code, body.as_str()),
            (200, "hello from back"),
            "front: {}\nback: {}",
            front.proc.log(),
            back.proc.log()
        );
    }
}
