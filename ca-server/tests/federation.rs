//! Federation, in process: our bundle endpoint in both SPIFFE profiles, two servers fetching
//! each other's bundles, and a misbehaving peer (a test double that serves whatever the test
//! sets) whose bad documents are refused while the stored bundle stays.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tessera_identity::tls::Authorize;
use tessera_identity::{Bundle, SpiffeId, TrustDomain};
use tessera_proto::admin::v1 as admin;
use tessera_test_util::eventually;
use tessera_test_util::inprocess::{TestServer, bundle_from_pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const ENDPOINT: &str =
    "[federation.bundle_endpoint]\naddress = \"127.0.0.1:0\"\nprofile = \"https_spiffe\"\nrefresh_hint = \"4s\"\n";

/// One HTTP/1.1 request over TLS; returns status, body and the server's certificates.
async fn https(
    addr: SocketAddr,
    mut cfg: rustls::ClientConfig,
    method: &str,
    path: &str,
) -> (u16, String, Vec<CertificateDer<'static>>) {
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Full handshakes only, so each request shows the certificate served now.
    cfg.resumption = rustls::client::Resumption::disabled();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let certs = tls.get_ref().1.peer_certificates().unwrap().iter().map(|c| c.clone().into_owned()).collect();
    tls.write_all(format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body, certs)
}

fn spiffe_client(roots: &[CertificateDer<'static>], id: &str) -> rustls::ClientConfig {
    tessera_identity::tls::client_config(roots, Authorize::Id(SpiffeId::new(id).unwrap()), None).unwrap()
}

#[tokio::test]
async fn bundle_endpoint_serves_our_bundle_over_https_spiffe() {
    let mut s = TestServer::start_full("a.example", "", ENDPOINT).await;
    let addr = s.server().bundle_endpoint_addr.unwrap();
    let roots = s.roots().await;
    let cfg = spiffe_client(&roots, "spiffe://a.example/tessera/server");
    let (code, body, certs) = https(addr, cfg.clone(), "GET", "/").await;
    assert_eq!(code, 200, "{body}");
    // The endpoint authenticates with the server's own SVID.
    assert_eq!(
        tessera_identity::tls::leaf_spiffe_id(&certs[0]).unwrap().to_string(),
        "spiffe://a.example/tessera/server"
    );
    let served = Bundle::from_jwks(s.td(), body.as_bytes()).unwrap();
    let ours = bundle_from_pb(&s.bundle().await);
    assert_eq!(served.x509_authorities, ours.x509_authorities);
    // JWKS carries no key expiry: compare key IDs and keys.
    let jwt =
        |b: &Bundle| b.jwt_authorities.iter().map(|k| (k.key_id.clone(), k.public_key.clone())).collect::<Vec<_>>();
    assert_eq!(jwt(&served), jwt(&ours));
    assert_eq!(served.sequence_number, ours.sequence_number);
    assert_eq!(served.refresh_hint, Some(4));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let uses: Vec<&str> = v["keys"].as_array().unwrap().iter().map(|k| k["use"].as_str().unwrap()).collect();
    assert!(uses.contains(&"x509-svid") && uses.contains(&"jwt-svid"), "{uses:?}");

    assert_eq!(https(addr, cfg.clone(), "POST", "/").await.0, 405);
    assert_eq!(https(addr, cfg.clone(), "DELETE", "/").await.0, 405);
    assert_eq!(https(addr, cfg, "GET", "/other").await.0, 404);
    s.stop().await;
}

/// A CA for `td` (self-signed, rcgen) that can issue leaves.
struct TestCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(td: &str, serial: u8) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            tessera_identity::x509::ca_params(&TrustDomain::new(td).unwrap(), 0, 4_000_000_000, [serial; 16]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        Self { cert, issuer }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// A leaf with URI SAN `uri` (when given) and DNS SAN `localhost`.
    fn leaf(&self, uri: Option<&str>) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        if let Some(u) = uri {
            p.subject_alt_names.push(rcgen::SanType::URI(u.try_into().unwrap()));
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
    }
}

fn server_config(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Arc<rustls::ServerConfig> {
    Arc::new(
        rustls::ServerConfig::builder_with_provider(tessera_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap(),
    )
}

/// A peer bundle endpoint that serves whatever body and certificate the test sets.
struct BadPeer {
    addr: SocketAddr,
    body: Arc<Mutex<Vec<u8>>>,
    tls: Arc<Mutex<Arc<rustls::ServerConfig>>>,
}

impl BadPeer {
    async fn start(tls: Arc<rustls::ServerConfig>) -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let body = Arc::new(Mutex::new(Vec::new()));
        let tls = Arc::new(Mutex::new(tls));
        let (b, t) = (body.clone(), tls.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let cfg = t.lock().unwrap().clone();
                let body = b.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await else { return };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let hdr = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                    let _ = s.write_all(hdr.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        Self { addr, body, tls }
    }

    fn serve(&self, body: impl Into<Vec<u8>>) {
        *self.body.lock().unwrap() = body.into();
    }
}

fn doc(b: &Bundle) -> String {
    b.to_jwks().unwrap()
}

#[tokio::test]
async fn bad_peer_documents_are_refused_and_the_stored_bundle_stays() {
    let mut s = TestServer::start_full("a.example", "", "").await;
    let peer_ca = TestCa::new("bad.example", 1);
    let (chain, key) = peer_ca.leaf(Some("spiffe://bad.example/endpoint"));
    let peer = BadPeer::start(server_config(chain, key)).await;
    let td = TrustDomain::new("bad.example").unwrap();

    let mut good = Bundle::new(td.clone());
    good.add_x509_authority(&peer_ca.der());
    good.sequence_number = 5;
    good.refresh_hint = Some(300);
    let rel = admin::FederationRelationship {
        trust_domain: "bad.example".into(),
        bundle_endpoint_url: format!("https://127.0.0.1:{}/", peer.addr.port()),
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: "spiffe://bad.example/endpoint".into(),
        ..Default::default()
    };
    // https_spiffe without any bundle of the peer cannot authenticate the endpoint.
    s.admin
        .create_federation_relationship(admin::SetFederationRelationshipRequest {
            relationship: Some(rel.clone()),
            bootstrap_bundle: None,
        })
        .await
        .unwrap();
    let err = s
        .admin
        .refresh_federated_bundle(admin::TrustDomainRequest { trust_domain: "bad.example".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("bootstrap bundle"), "{}", err.message());
    // A second create is refused; update with a bootstrap bundle is the way.
    let err = s
        .admin
        .create_federation_relationship(admin::SetFederationRelationshipRequest {
            relationship: Some(rel.clone()),
            bootstrap_bundle: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let mut boot = good.clone();
    boot.sequence_number = 1;
    s.admin
        .update_federation_relationship(admin::SetFederationRelationshipRequest {
            relationship: Some(rel.clone()),
            bootstrap_bundle: Some(tessera_server::api::convert::bundle_to_pb(&boot)),
        })
        .await
        .unwrap();

    let refresh = |mut c: tessera_proto::admin::v1::admin_client::AdminClient<tonic::transport::Channel>| async move {
        c.refresh_federated_bundle(admin::TrustDomainRequest { trust_domain: "bad.example".into() }).await
    };
    peer.serve(doc(&good));
    let r = refresh(s.admin.clone()).await.unwrap().into_inner();
    assert!(r.updated);
    assert_eq!(r.sequence_number, 5);
    let store = s.server().store.clone();
    let stored = || {
        let store = store.clone();
        let td = td.clone();
        async move { store.get_bundle(&td).await.unwrap().unwrap() }
    };
    assert_eq!(stored().await, good);
    // The same document again changes nothing.
    assert!(!refresh(s.admin.clone()).await.unwrap().into_inner().updated);

    let other_td_ca = TestCa::new("c.example", 2);
    let mut wrong_td = good.clone();
    wrong_td.sequence_number = 6;
    wrong_td.add_x509_authority(&other_td_ca.der());
    let mut stale = good.clone();
    stale.sequence_number = 4;
    let mut empty = Bundle::new(td.clone());
    empty.sequence_number = 9;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("wrong trust domain", doc(&wrong_td).into_bytes(), "belongs to trust domain c.example"),
        ("stale sequence", doc(&stale).into_bytes(), "lower than the stored 5"),
        ("garbage", b"{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"!!\"]}".to_vec(), "not valid JSON"),
        ("not a bundle", b"[1, 2, 3]".to_vec(), "malformed"),
        ("empty key set", doc(&empty).into_bytes(), "no keys"),
        ("10 MB body", vec![b' '; 10 * 1024 * 1024], "limit"),
    ];
    for (what, body, reason) in cases {
        peer.serve(body);
        let err = refresh(s.admin.clone()).await.unwrap_err();
        assert!(
            matches!(err.code(), Code::FailedPrecondition | Code::Unavailable),
            "{what}: {:?} {}",
            err.code(),
            err.message()
        );
        assert!(err.message().contains(reason), "{what}: {}", err.message());
        assert_eq!(stored().await, good, "{what} changed the stored bundle");
    }

    // TLS failure: the endpoint presents an SVID from a CA outside the peer's bundle.
    let rogue = TestCa::new("bad.example", 3);
    let (chain, key) = rogue.leaf(Some("spiffe://bad.example/endpoint"));
    *peer.tls.lock().unwrap() = server_config(chain, key);
    peer.serve(doc(&good));
    let err = refresh(s.admin.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("TLS"), "{}", err.message());
    // Right CA, wrong SPIFFE ID.
    let (chain, key) = peer_ca.leaf(Some("spiffe://bad.example/someone-else"));
    *peer.tls.lock().unwrap() = server_config(chain, key);
    let err = refresh(s.admin.clone()).await.unwrap_err();
    assert!(err.message().contains("TLS"), "{}", err.message());
    assert_eq!(stored().await, good);

    // The refusal is visible in `federation show`.
    let shown = s
        .admin
        .get_federation_relationship(admin::TrustDomainRequest { trust_domain: "bad.example".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(shown.last_error.contains("TLS"), "{shown:?}");
    assert_eq!(shown.bundle_sequence, 5);

    // An empty key set is honoured when the relationship allows it.
    let (chain, key) = peer_ca.leaf(Some("spiffe://bad.example/endpoint"));
    *peer.tls.lock().unwrap() = server_config(chain, key);
    let mut allow = rel.clone();
    allow.allow_empty_bundle = true;
    s.admin
        .update_federation_relationship(admin::SetFederationRelationshipRequest {
            relationship: Some(allow),
            bootstrap_bundle: None,
        })
        .await
        .unwrap();
    peer.serve(doc(&empty));
    assert_eq!(refresh(s.admin.clone()).await.unwrap().into_inner().sequence_number, 9);
    assert!(stored().await.is_empty());
    s.stop().await;
}

#[tokio::test]
async fn relationships_are_validated_listed_and_deleted() {
    let mut s = TestServer::start_full("a.example", "", "").await;
    let rel = |td: &str, url: &str, profile: &str, id: &str| admin::SetFederationRelationshipRequest {
        relationship: Some(admin::FederationRelationship {
            trust_domain: td.into(),
            bundle_endpoint_url: url.into(),
            profile: profile.into(),
            endpoint_spiffe_id: id.into(),
            ..Default::default()
        }),
        bootstrap_bundle: None,
    };
    for (req, why) in [
        (rel("a.example", "https://a", "https_web", ""), "own trust domain"),
        (rel("b.example", "http://b", "https_web", ""), "https"),
        (rel("b.example", "https://b", "https_spiffe", ""), "endpoint_spiffe_id"),
        (rel("b.example", "https://b", "https_web", "spiffe://b.example/x"), "https_spiffe only"),
        (rel("b.example", "https://b", "ftp", ""), "profile"),
        (rel("Not A Domain", "https://b", "https_web", ""), "trust domain"),
    ] {
        let err = s.admin.create_federation_relationship(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{why}: {}", err.message());
        assert!(err.message().to_lowercase().contains(why), "{why}: {}", err.message());
    }
    s.admin.create_federation_relationship(rel("b.example", "https://b:8443", "https_web", "")).await.unwrap();
    s.admin
        .create_federation_relationship(rel("c.example", "https://c", "https_spiffe", "spiffe://c.example/srv"))
        .await
        .unwrap();
    let list = s
        .admin
        .list_federation_relationships(admin::ListFederationRelationshipsRequest {})
        .await
        .unwrap()
        .into_inner()
        .relationships;
    let mut tds: Vec<_> = list.iter().map(|r| (r.trust_domain.as_str(), r.profile.as_str())).collect();
    tds.sort();
    assert_eq!(tds, vec![("b.example", "https_web"), ("c.example", "https_spiffe")]);
    let gone = s
        .admin
        .delete_federation_relationship(admin::TrustDomainRequest { trust_domain: "b.example".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.bundle_endpoint_url, "https://b:8443");
    let err = s
        .admin
        .get_federation_relationship(admin::TrustDomainRequest { trust_domain: "b.example".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    s.stop().await;
}

#[tokio::test]
async fn two_servers_follow_each_others_bundles_including_rotation() {
    let mut b = TestServer::start_full("b.example", "", ENDPOINT).await;
    let b_addr = b.server().bundle_endpoint_addr.unwrap();
    let b_bundle = b.dir.path().join("b-bundle.json");
    std::fs::write(&b_bundle, bundle_from_pb(&b.bundle().await).to_jwks().unwrap()).unwrap();
    // A knows B from its config file: URL, endpoint ID and bootstrap bundle.
    let a_tail = format!(
        "{ENDPOINT}[[federation.trust_domains]]\ntrust_domain = \"b.example\"\nbundle_endpoint_url = \"https://127.0.0.1:{}\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://b.example/tessera/server\"\nbootstrap_bundle_path = \"{}\"\n",
        b_addr.port(),
        b_bundle.display()
    );
    let a = TestServer::start_full("a.example", "", &a_tail).await;
    let td_b = TrustDomain::new("b.example").unwrap();
    let a_store = a.server().store.clone();
    let b_roots = || {
        let store = a_store.clone();
        let td = td_b.clone();
        async move { store.get_bundle(&td).await.unwrap().map(|b| b.x509_authorities).unwrap_or_default() }
    };
    assert_eq!(b_roots().await, bundle_from_pb(&b.bundle().await).x509_authorities);

    // B prepares a new CA: it joins B's bundle, and A picks it up on its own (hint 4 s →
    // fetch every second) before B signs anything with it.
    b.admin.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await.unwrap();
    let want = bundle_from_pb(&b.bundle().await).x509_authorities;
    assert_eq!(want.len(), 2);
    eventually(15, "A fetched B's prepared CA", async || (b_roots().await == want).then_some(())).await;
    let st = a.server().federation.status(&td_b);
    assert!(st.last_success > 0 && st.last_error.is_none(), "{st:?}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn https_web_endpoint_serves_a_file_certificate_and_reloads_it() {
    let dir = tempfile::tempdir().unwrap();
    let web_ca = TestCa::new("web.example", 7);
    let write = |serial_hint: Option<&str>| {
        let (chain, key) = web_ca.leaf(serial_hint);
        let cert_pem = tessera_identity::pem::encode_certs(chain.iter().map(|c| c.as_ref()));
        let key_pem = tessera_identity::pem::encode("PRIVATE KEY", key.secret_der());
        std::fs::write(dir.path().join("tls.crt"), cert_pem).unwrap();
        std::fs::write(dir.path().join("tls.key"), key_pem).unwrap();
        chain[0].clone()
    };
    let first = write(None);
    let tail = format!(
        "[federation.bundle_endpoint]\naddress = \"127.0.0.1:0\"\nprofile = \"https_web\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.path().join("tls.crt").display(),
        dir.path().join("tls.key").display()
    );
    let mut s = TestServer::start_full("a.example", "", &tail).await;
    let addr = s.server().bundle_endpoint_addr.unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(web_ca.der()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(tessera_identity::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let (code, body, certs) = https(addr, cfg.clone(), "GET", "/").await;
    assert_eq!(code, 200);
    assert_eq!(certs[0], first);
    assert_eq!(
        Bundle::from_jwks(s.td(), body.as_bytes()).unwrap().x509_authorities,
        bundle_from_pb(&s.bundle().await).x509_authorities
    );
    // New files are served without a restart.
    let second = write(Some("spiffe://a.example/bundle-endpoint"));
    eventually(10, "the new certificate served", async || {
        let (_, _, certs) = https(addr, cfg.clone(), "GET", "/").await;
        (certs[0] == second).then_some(())
    })
    .await;
    // A broken file keeps the current certificate in service.
    std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, _, certs) = https(addr, cfg, "GET", "/").await;
    assert_eq!((code, &certs[0]), (200, &second));
    s.stop().await;
}
