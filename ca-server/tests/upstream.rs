//! The `disk` upstream authority, in process: our CA becomes an intermediate under a root
//! from files (explicit files, and Istio's `cacerts` layout with an intermediate between),
//! SVID chains carry the intermediates, the bundle holds only the upstream root, and a new
//! root placed in the files is published without a restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tessera_proto::admin::v1 as admin;
use tessera_test_util::inprocess::{TestServer, bundle_from_pb, csr_for, verify_chain};

/// A CA certificate (not a SPIFFE one: a corporate root or intermediate).
fn corporate_ca(cn: &str, issuer: Option<&Issuer<'_, KeyPair>>) -> (Vec<u8>, KeyPair, CertificateParams) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = match issuer {
        None => p.self_signed(&key).unwrap(),
        Some(i) => p.signed_by(&key, i).unwrap(),
    };
    (cert.der().to_vec(), key, p)
}

fn pem(der: &[u8]) -> String {
    tessera_identity::pem::encode("CERTIFICATE", der)
}

async fn mint(s: &mut TestServer, id: &str) -> Vec<Vec<u8>> {
    s.admin
        .mint_x509_svid(admin::MintX509SvidRequest { spiffe_id: id.into(), csr: csr_for(id), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap()
        .cert_chain
}

fn upstream_toml(dir: &Path, body: &str) -> String {
    format!("[upstream_authority]\ntype = \"disk\"\n{}\n", body.replace("$UP", &dir.display().to_string()))
}

#[tokio::test]
async fn svids_chain_to_the_disk_upstream_root_through_our_intermediate() {
    let up = tempfile::tempdir().unwrap();
    let (root, root_key, _) = corporate_ca("Corp Root", None);
    std::fs::write(up.path().join("root.pem"), pem(&root)).unwrap();
    std::fs::write(up.path().join("root.key"), root_key.serialize_pem()).unwrap();
    let mut s = TestServer::start_full(
        "example.org",
        "",
        &upstream_toml(up.path(), "cert_file = \"$UP/root.pem\"\nkey_file = \"$UP/root.key\""),
    )
    .await;
    let bundle = bundle_from_pb(&s.bundle().await);
    assert_eq!(bundle.x509_authorities.len(), 1);
    assert_eq!(bundle.x509_authorities[0].as_ref(), root.as_slice(), "the bundle must hold the upstream root");
    let chain = mint(&mut s, "spiffe://example.org/web").await;
    assert_eq!(chain.len(), 2, "leaf and our intermediate");
    let inter = tessera_identity::x509::cert_facts(&chain[1]).unwrap();
    assert!(inter.is_ca);
    assert!(inter.uris.contains(&"spiffe://example.org".to_owned()));
    verify_chain(&chain, std::slice::from_ref(&root), "spiffe://example.org/web").unwrap();
    // Without the intermediate the leaf does not verify: the chain really goes through it.
    assert!(verify_chain(&chain[..1], &[root], "spiffe://example.org/web").is_err());
    s.stop().await;
}

#[tokio::test]
async fn istio_cacerts_layout_with_an_intermediate_and_a_root_reload() {
    let up = tempfile::tempdir().unwrap();
    let (root, root_key, root_params) = corporate_ca("Corp Root", None);
    let root_issuer = Issuer::new(root_params, root_key);
    let (istio_ca, istio_key, _) = corporate_ca("Istio CA cluster-a", Some(&root_issuer));
    let d = up.path();
    std::fs::write(d.join("ca-cert.pem"), pem(&istio_ca)).unwrap();
    std::fs::write(d.join("ca-key.pem"), istio_key.serialize_pem()).unwrap();
    std::fs::write(d.join("cert-chain.pem"), format!("{}{}", pem(&istio_ca), pem(&root))).unwrap();
    std::fs::write(d.join("root-cert.pem"), pem(&root)).unwrap();
    let mut s = TestServer::start_full(
        "example.org",
        "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"",
        &format!("{}\n", upstream_toml(d, "cacerts_dir = \"$UP\"")),
    )
    .await;
    assert_eq!(bundle_from_pb(&s.bundle().await).x509_authorities[0].as_ref(), root.as_slice());
    let chain = mint(&mut s, "spiffe://example.org/web").await;
    assert_eq!(chain.len(), 3, "leaf, our intermediate, Istio's intermediate");
    assert_eq!(chain[2], istio_ca);
    verify_chain(&chain, std::slice::from_ref(&root), "spiffe://example.org/web").unwrap();

    // The operator adds a second root to root-cert.pem: it reaches the bundle on the next
    // rotation check, before anything is signed under it.
    let (root2, _, _) = corporate_ca("Corp Root 2", None);
    std::fs::write(d.join("root-cert.pem"), format!("{}{}", pem(&root), pem(&root2))).unwrap();
    s.server().ca.rotate_once().await.unwrap();
    let b = bundle_from_pb(&s.bundle().await);
    assert_eq!(b.x509_authorities.len(), 2);
    assert!(b.x509_authorities.iter().any(|c| c.as_ref() == root2.as_slice()));

    // A broken key file is refused; signing continues with what was loaded.
    std::fs::write(d.join("ca-key.pem"), "garbage").unwrap();
    s.server().ca.prepare_x509().await.unwrap();
    assert_eq!(s.server().ca.x509_authorities().len(), 2, "the prepared CA was minted with the loaded key");
    verify_chain(&mint(&mut s, "spiffe://example.org/web2").await, &[root], "spiffe://example.org/web2").unwrap();
    s.stop().await;
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_stops_the_start() {
    let up = tempfile::tempdir().unwrap();
    let (root, _, _) = corporate_ca("Corp Root", None);
    let other = KeyPair::generate().unwrap();
    std::fs::write(up.path().join("root.pem"), pem(&root)).unwrap();
    std::fs::write(up.path().join("root.key"), other.serialize_pem()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{}\n{}",
        tessera_test_util::inprocess::config_text_for("example.org", dir.path(), ""),
        upstream_toml(up.path(), "cert_file = \"$UP/root.pem\"\nkey_file = \"$UP/root.key\"")
    );
    let cfg = tessera_server::config::Config::from_toml(&text).unwrap();
    let err = tessera_server::app::Server::start(cfg).await.unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
}
