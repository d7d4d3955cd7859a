//! The Istio CA API's renewal grants against a downstream (nested) CA: a downstream server's CA
//! chains to our roots, so a certificate it signs passes the TLS handshake, but a renewal
//! grant it writes must not renew anything here (review of the second security round).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tessera_identity::tls::{Authorize, client_config};
use tessera_identity::x509::{PodRef, RENEWAL_GRANT_OID, RenewalGrant};
use tessera_identity::{PrivateKey, SpiffeId};
use tessera_proto::admin::v1 as admin;
use tessera_proto::agent::v1 as agent;
use tessera_proto::istio::v1::auth::IstioCertificateRequest;
use tessera_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tessera_proto::types::v1 as types;
use tessera_test_util::inprocess::TestServer;
use tonic::Code;

#[tokio::test]
async fn a_grant_written_by_a_downstream_ca_renews_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    // Any valid issuer key: no token is used here.
    let k = rcgen::KeyPair::generate().unwrap();
    let raw = k.public_key_raw();
    let b64 = |b: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let doc = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}]});
    std::fs::write(&jwks, doc.to_string()).unwrap();
    let istio_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let tail = format!(
        "[istio]\naddress = \"127.0.0.1:{istio_port}\"\n[[istio.clusters]]\ncluster_id = \"c\"\njwks_path = \"{}\"\nissuer = \"https://k\"\n",
        jwks.display()
    );
    let mut t = TestServer::start_full("example.org", "ca_ttl = \"96h\"\ndefault_x509_svid_ttl = \"1h\"", &tail).await;
    // An agent with a downstream entry gets a CA of our trust domain.
    let mut a = t.attested_agent().await;
    t.admin
        .create_entry(admin::CreateEntryRequest {
            entry: Some(types::Entry {
                spiffe_id: "spiffe://example.org/downstream".into(),
                parent_id: a.id.to_string(),
                selectors: vec![types::Selector { r#type: "unix".into(), value: "uid:0".into() }],
                downstream: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI("spiffe://example.org".try_into().unwrap()));
    let csr = p.serialize_request(&ca_key).unwrap().der().to_vec();
    let mut stream = a
        .client
        .mint_downstream_x509_ca(agent::MintDownstreamX509CaRequest { csr, preferred_ttl_seconds: 3600 })
        .await
        .unwrap()
        .into_inner();
    let ca_chain = stream.message().await.unwrap().unwrap().x509_ca_chain;
    drop(stream); // an open stream would hold the server's shutdown for its drain grace
    // The downstream CA signs a workload certificate carrying a grant it made up: no pod, and
    // dated far in the future so that no age check would ever stop it.
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_chain[0].clone().into(), &ca_key).unwrap();
    let leaf_key = PrivateKey::generate_ec_p256().unwrap();
    let mut lp = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let id = "spiffe://example.org/ns/shop/sa/cart";
    lp.subject_alt_names.push(rcgen::SanType::URI(id.try_into().unwrap()));
    let grant = RenewalGrant { authorized_at: 4_000_000_000, cluster: "c".into(), pod: None::<PodRef> };
    lp.custom_extensions.push(rcgen::CustomExtension::from_oid_content(RENEWAL_GRANT_OID, grant.to_der()));
    let leaf = lp.signed_by(&leaf_key.to_rcgen().unwrap(), &issuer).unwrap();
    assert_eq!(tessera_identity::x509::cert_facts(leaf.der()).unwrap().renewal_grant, Some(grant));
    // It passes the TLS handshake (the chain is ours), and renews nothing.
    let roots = t.roots().await;
    let server_id = tessera_identity::server_id(&t.td()).unwrap();
    let mut chain: Vec<rustls_pki_types::CertificateDer<'static>> = vec![leaf.der().clone()];
    chain.extend(ca_chain.iter().map(|c| c.clone().into()));
    let cfg = client_config(&roots, Authorize::Id(server_id), Some((chain, &leaf_key))).unwrap();
    let ch = tessera_svc::connect::tls(&format!("127.0.0.1:{istio_port}"), cfg).await.unwrap();
    let renew_key = PrivateKey::generate_ec_p256().unwrap();
    let csr = tessera_identity::csr::build_csr(&SpiffeId::new(id).unwrap(), &[], &renew_key).unwrap();
    let e = IstioCertificateServiceClient::new(ch)
        .create_certificate(IstioCertificateRequest {
            csr: tessera_identity::pem::encode("CERTIFICATE REQUEST", &csr),
            validity_duration: 0,
            metadata: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("own CA"), "{}", e.message());
    t.stop().await;
}
