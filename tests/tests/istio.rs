//! Istio's CA API, called exactly as istio-agent calls it: gRPC over TLS to the host name in
//! `CA_ADDR` (verified against the bundle as `istio-ca-root-cert`), a service-account token in
//! `authorization: Bearer`, the `clusterid` header, `CertSigner` metadata. Two clusters:
//! cluster-a by TokenReview against a FAKE API server (no real one runs here), cluster-b
//! offline by its issuer's JWKS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost_types::{Struct, Value as PbValue, value::Kind};
use tessera_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tessera_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use tessera_test_util::fake_k8s::{FakeCluster, pod};
use tessera_test_util::{ServerProc, free_port, openssl_verify};
use tonic::Code;
use tonic::transport::Channel;

const TD: &str = "cluster.local";
const HOST: &str = "tessera.tessera-system.svc";
const AUD: &[&str] = &["istio-ca"];

struct Env {
    _dir: tempfile::TempDir,
    server: ServerProc,
    addr: String,
    roots_pem: String,
    a: FakeCluster,
    b: FakeCluster,
}

fn setup() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let a = FakeCluster::start("https://kubernetes.default.svc.cluster.local");
    a.add_node("node-1", "node-uid-1", &[]);
    a.add_node("node-2", "node-uid-2", &[]);
    a.add_pod(pod("shop", "cart-1", "pod-uid-cart", "cart", "node-1"));
    a.add_pod(pod("shop", "pay-1", "pod-uid-pay", "pay", "node-2"));
    a.add_pod(pod("istio-system", "ztunnel-n1", "pod-uid-zt1", "ztunnel", "node-1"));
    a.add_pod(pod("tools", "debug-1", "pod-uid-debug", "debug", "node-1"));
    let b = FakeCluster::start("https://oidc.cluster-b.example");
    let kubeconfig = dir.path().join("a.kubeconfig");
    a.write_kubeconfig(&kubeconfig, "cluster-a");
    let jwks = dir.path().join("b-jwks.json");
    std::fs::write(&jwks, b.jwks()).unwrap();
    let port = free_port();
    let extra = format!(
        r#"
[istio]
address = "127.0.0.1:{port}"
dns_names = ["{HOST}"]
default_workload_cert_ttl = "24h"
max_workload_cert_ttl = "48h"
trusted_node_accounts = ["istio-system/ztunnel"]
[[istio.clusters]]
cluster_id = "cluster-a"
kubeconfig = "{kc}"
audiences = ["istio-ca"]
[[istio.clusters]]
cluster_id = "cluster-b"
jwks_path = "{jwks}"
issuer = "https://oidc.cluster-b.example"
audiences = ["istio-ca"]
"#,
        kc = kubeconfig.display(),
        jwks = jwks.display()
    );
    let ca = "ca_ttl = \"96h\"\ndefault_x509_svid_ttl = \"1h\"";
    let server = ServerProc::start_in(dir.path(), TD, ca, &extra);
    let roots_pem = server.cli_ok(&["bundle", "show"]);
    Env { _dir: dir, server, addr: format!("127.0.0.1:{port}"), roots_pem, a, b }
}

/// A channel as istio-agent opens it: TLS, host name `HOST` checked against the roots.
async fn channel(env: &Env, client_cert: Option<(&str, &rcgen::KeyPair)>) -> Channel {
    ca_channel(&env.addr, &env.roots_pem, client_cert).await
}

/// The same to `addr`, trusting `roots_pem`.
async fn ca_channel(addr: &str, roots_pem: &str, client_cert: Option<(&str, &rcgen::KeyPair)>) -> Channel {
    let mut roots = rustls::RootCertStore::empty();
    for c in tessera_identity::pem::decode_certs(roots_pem.as_bytes()).unwrap() {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client_cert {
        None => builder.with_no_client_auth(),
        Some((chain_pem, key)) => builder
            .with_client_auth_cert(
                tessera_identity::pem::decode_certs(chain_pem.as_bytes()).unwrap(),
                rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let target = addr.to_owned();
    tonic::transport::Endpoint::from_static("https://tessera.tessera-system.svc:15012")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, target) = (connector.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(target.as_str()).await?;
                let name = rustls_pki_types::ServerName::try_from(HOST).unwrap();
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await
        .unwrap()
}

/// A CSR as istio-agent makes it: EC P-256, the identity as the only URI SAN.
fn csr(uri: &str, extra_dns: Option<&str>) -> (String, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names.push(rcgen::SanType::URI(uri.try_into().unwrap()));
    if let Some(d) = extra_dns {
        p.subject_alt_names.push(rcgen::SanType::DnsName(d.try_into().unwrap()));
    }
    (p.serialize_request(&key).unwrap().pem().unwrap(), key)
}

struct Call<'a> {
    token: Option<&'a str>,
    cluster: Option<&'a str>,
    csr: String,
    ttl: i64,
    impersonate: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn new(token: &'a str, cluster: &'a str, csr: String) -> Self {
        Self { token: Some(token), cluster: Some(cluster), csr, ttl: 0, impersonate: None }
    }
}

async fn call(ch: &Channel, c: Call<'_>) -> Result<IstioCertificateResponse, tonic::Status> {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert("CertSigner".to_owned(), PbValue { kind: Some(Kind::StringValue("default".into())) });
    if let Some(i) = c.impersonate {
        fields.insert("ImpersonatedIdentity".to_owned(), PbValue { kind: Some(Kind::StringValue(i.into())) });
    }
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: c.csr,
        validity_duration: c.ttl,
        metadata: Some(Struct { fields }),
    });
    if let Some(t) = c.token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(cl) = c.cluster {
        req.metadata_mut().insert("clusterid", cl.parse().unwrap());
    }
    IstioCertificateServiceClient::new(ch.clone()).create_certificate(req).await.map(|r| r.into_inner())
}

fn leaf_facts(resp: &IstioCertificateResponse) -> tessera_identity::x509::CertFacts {
    let der = tessera_identity::pem::decode_certs(resp.cert_chain[0].as_bytes()).unwrap();
    tessera_identity::x509::cert_facts(&der[0]).unwrap()
}

fn assert_code(r: Result<IstioCertificateResponse, tonic::Status>, code: Code, what: &str) -> String {
    match r {
        Ok(_) => panic!("{what}: was accepted"),
        Err(s) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            s.message().to_owned()
        }
    }
}

fn verify_with_openssl(dir: &Path, resp: &IstioCertificateResponse) {
    let (root, chain) = resp.cert_chain.split_last().unwrap();
    let root_file = dir.join("root.pem");
    let chain_file = dir.join("chain.pem");
    std::fs::write(&root_file, root).unwrap();
    std::fs::write(&chain_file, chain.concat()).unwrap();
    assert!(openssl_verify(&root_file, &chain_file), "openssl verify failed for {:?}", resp.cert_chain);
}

#[test]
fn istio_agent_gets_certificates_and_every_bad_request_is_refused_with_its_code() {
    let env = setup();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = channel(&env, None).await;
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";

        // cluster-a, TokenReview: the chain verifies, the root is last and in the bundle.
        let token = env.a.token("shop", "cart", Some("cart-1"), AUD, 3600);
        let (csr_pem, key) = csr(cart, None);
        let resp = call(&ch, Call::new(&token, "cluster-a", csr_pem)).await.unwrap();
        assert!(resp.cert_chain.len() >= 2, "{:?}", resp.cert_chain);
        assert!(env.roots_pem.contains(resp.cert_chain.last().unwrap().trim()), "the last element is a bundle root");
        verify_with_openssl(env._dir.path(), &resp);
        let facts = leaf_facts(&resp);
        assert_eq!(facts.uris, vec![cart.to_owned()]);
        let lifetime = facts.not_after - facts.not_before;
        assert!((24 * 3600..=24 * 3600 + 600).contains(&lifetime), "default TTL 24h, got {lifetime}s");
        assert!(env.a.reviews() >= 1, "cluster-a tokens go through TokenReview");

        // Renewal with the still-valid certificate, no token.
        let chain_pem = resp.cert_chain[..resp.cert_chain.len() - 1].concat();
        let mtls = channel(&env, Some((&chain_pem, &key))).await;
        let (csr2, _) = csr(cart, None);
        let renewed =
            call(&mtls, Call { token: None, cluster: None, csr: csr2, ttl: 3600, impersonate: None }).await.unwrap();
        assert_eq!(leaf_facts(&renewed).uris, vec![cart.to_owned()]);
        let l = leaf_facts(&renewed);
        assert!((3600..=3600 + 600).contains(&(l.not_after - l.not_before)), "requested TTL honoured");
        // ... but the certificate does not buy another identity.
        let (other, _) = csr("spiffe://cluster.local/ns/shop/sa/pay", None);
        let m = assert_code(
            call(&mtls, Call { token: None, cluster: None, csr: other, ttl: 0, impersonate: None }).await,
            Code::PermissionDenied,
            "renewal for another identity",
        );
        assert!(m.contains("ns/shop/sa/cart"), "{m}");

        // cluster-b, offline JWKS: its own tokens work.
        let btoken = env.b.token("web", "frontend", None, AUD, 3600);
        let (bcsr, _) = csr("spiffe://cluster.local/ns/web/sa/frontend", None);
        let bresp = call(&ch, Call::new(&btoken, "cluster-b", bcsr)).await.unwrap();
        assert_eq!(leaf_facts(&bresp).uris, vec!["spiffe://cluster.local/ns/web/sa/frontend".to_owned()]);
        verify_with_openssl(env._dir.path(), &bresp);

        // Each cluster accepts only its own tokens.
        let (c, _) = csr("spiffe://cluster.local/ns/web/sa/frontend", None);
        assert_code(call(&ch, Call::new(&btoken, "cluster-a", c)).await, Code::Unauthenticated, "b token at a");
        let (c, _) = csr(cart, None);
        assert_code(call(&ch, Call::new(&token, "cluster-b", c)).await, Code::Unauthenticated, "a token at b");

        // Forged, expired, wrong audience, unknown cluster, no credentials.
        for (what, t, cluster) in [
            ("forged token at a", env.a.forged_token("shop", "cart", None, AUD), "cluster-a"),
            ("forged token at b", env.b.forged_token("shop", "cart", None, AUD), "cluster-b"),
            ("expired token at a", env.a.token("shop", "cart", None, AUD, -600), "cluster-a"),
            ("expired token at b", env.b.token("shop", "cart", None, AUD, -600), "cluster-b"),
            ("wrong audience at a", env.a.token("shop", "cart", None, &["vault"], 3600), "cluster-a"),
            ("wrong audience at b", env.b.token("shop", "cart", None, &["vault"], 3600), "cluster-b"),
        ] {
            let (c, _) = csr(cart, None);
            assert_code(call(&ch, Call::new(&t, cluster, c)).await, Code::Unauthenticated, what);
        }
        let (c, _) = csr(cart, None);
        let m =
            assert_code(call(&ch, Call::new(&token, "cluster-z", c)).await, Code::Unauthenticated, "unknown cluster");
        assert!(m.contains("cluster-z"), "the message names the cluster: {m}");
        let (c, _) = csr(cart, None);
        assert_code(
            call(&ch, Call { token: None, cluster: Some("cluster-a"), csr: c, ttl: 0, impersonate: None }).await,
            Code::Unauthenticated,
            "no credentials",
        );

        // A deleted pod's bound token no longer passes TokenReview.
        env.a.add_pod(pod("shop", "cart-2", "pod-uid-cart-2", "cart", "node-1"));
        let gone = env.a.token("shop", "cart", Some("cart-2"), AUD, 3600);
        env.a.delete_pod("shop", "cart-2");
        let (c, _) = csr(cart, None);
        assert_code(call(&ch, Call::new(&gone, "cluster-a", c)).await, Code::Unauthenticated, "deleted pod");

        // CSR for another service account, with a DNS SAN, with no URI, and garbage.
        let (c, _) = csr("spiffe://cluster.local/ns/shop/sa/pay", None);
        assert_code(call(&ch, Call::new(&token, "cluster-a", c)).await, Code::PermissionDenied, "CSR for pay");
        let (c, _) = csr(cart, Some("cart.shop.svc"));
        assert_code(call(&ch, Call::new(&token, "cluster-a", c)).await, Code::PermissionDenied, "CSR with DNS SAN");
        for (what, san) in [
            ("IP SAN", rcgen::SanType::IpAddress("10.0.0.7".parse().unwrap())),
            ("e-mail SAN", rcgen::SanType::Rfc822Name("cart@shop.example".try_into().unwrap())),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.subject_alt_names.push(rcgen::SanType::URI(cart.try_into().unwrap()));
            p.subject_alt_names.push(san);
            let pem = p.serialize_request(&key).unwrap().pem().unwrap();
            assert_code(call(&ch, Call::new(&token, "cluster-a", pem)).await, Code::PermissionDenied, what);
        }
        let huge = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            "A".repeat(100 * 1024)
        );
        let e = call(&ch, Call::new(&token, "cluster-a", huge)).await.unwrap_err();
        assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted), "oversized request: {e:?}");
        let key = rcgen::KeyPair::generate().unwrap();
        let bare = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap().serialize_request(&key).unwrap();
        assert_code(
            call(&ch, Call::new(&token, "cluster-a", bare.pem().unwrap())).await,
            Code::PermissionDenied,
            "CSR without URI SAN",
        );
        assert_code(
            call(
                &ch,
                Call::new(
                    &token,
                    "cluster-a",
                    "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
                ),
            )
            .await,
            Code::InvalidArgument,
            "garbage CSR",
        );

        // TTL above the maximum is InvalidArgument, as istiod answers.
        let (c, _) = csr(cart, None);
        let mut over = Call::new(&token, "cluster-a", c);
        over.ttl = 49 * 3600;
        assert_code(call(&ch, over).await, Code::InvalidArgument, "TTL over max");

        // Impersonation: ztunnel on node-1 may ask for cart (a pod on node-1), not for pay
        // (node-2); an account that is not trusted may ask for nothing.
        let zt = env.a.token("istio-system", "ztunnel", Some("ztunnel-n1"), AUD, 3600);
        let (c, _) = csr(cart, None);
        let mut imp = Call::new(&zt, "cluster-a", c);
        imp.impersonate = Some(cart);
        let resp = call(&ch, imp).await.unwrap();
        assert_eq!(leaf_facts(&resp).uris, vec![cart.to_owned()]);
        let pay = "spiffe://cluster.local/ns/shop/sa/pay";
        let (c, _) = csr(pay, None);
        let mut imp = Call::new(&zt, "cluster-a", c);
        imp.impersonate = Some(pay);
        let m = assert_code(call(&ch, imp).await, Code::PermissionDenied, "ztunnel for a pod on another node");
        assert!(m.contains("node-1"), "{m}");
        let debug = env.a.token("tools", "debug", Some("debug-1"), AUD, 3600);
        let (c, _) = csr(cart, None);
        let mut imp = Call::new(&debug, "cluster-a", c);
        imp.impersonate = Some(cart);
        assert_code(call(&ch, imp).await, Code::PermissionDenied, "impersonation by an untrusted account");

        // After the authority that signed a certificate is tainted, that certificate renews
        // nothing: the caller must come back with a token.
        let old = env.server.cli_ok(&["localauthority", "x509", "show", "--output", "json"]);
        let old: serde_json::Value = serde_json::from_str(&old).unwrap();
        let old_id =
            old["authorities"].as_array().unwrap().iter().find(|a| a["status"] == "active").unwrap()["authority_id"]
                .as_str()
                .unwrap()
                .to_owned();
        env.server.cli_ok(&["localauthority", "x509", "prepare"]);
        env.server.cli_ok(&["localauthority", "x509", "activate"]);
        env.server.cli_ok(&["localauthority", "x509", "taint", "--authority-id", &old_id]);
        let (c, _) = csr(cart, None);
        let m = assert_code(
            call(&mtls, Call { token: None, cluster: None, csr: c, ttl: 0, impersonate: None }).await,
            Code::Unauthenticated,
            "renewal with a certificate of a tainted authority",
        );
        assert!(m.contains("tainted"), "{m}");
        let (c, _) = csr(cart, None);
        assert!(call(&ch, Call::new(&token, "cluster-a", c)).await.is_ok(), "a token still works");
    });

    // Refusals of authenticated callers are audited under the identity they asked for, with
    // the caller beside it: "who tried to get cart's certificate?" has an answer.
    let audit = env.server.cli_ok(&[
        "audit",
        "show",
        "--spiffe-id",
        "spiffe://cluster.local/ns/shop/sa/cart",
        "--caller",
        "istio:cluster-a:tools/debug",
    ]);
    assert!(audit.contains("denied") || audit.contains("Denied"), "{audit}");
    let issued = env.server.cli_ok(&["audit", "show", "--caller", "istio:cluster-b:web/frontend"]);
    assert!(issued.contains("ns/web/sa/frontend"), "{issued}");
    // The API server saw no writes from the CA API.
    assert!(env.a.writes().iter().all(|(m, p)| m == "POST" && p.ends_with("/tokenreviews")), "{:?}", env.a.writes());
    std::thread::sleep(Duration::from_millis(10));
}

/// The `[istio]` section for cluster `a` (TokenReview through its kubeconfig `kc`).
fn istio_section(port: u16, kc: &Path, extra: &str) -> String {
    format!(
        "\n[istio]\naddress = \"127.0.0.1:{port}\"\ndns_names = [\"{HOST}\"]\n{extra}\n[[istio.clusters]]\ncluster_id = \"cluster-a\"\nkubeconfig = \"{}\"\naudiences = [\"istio-ca\"]\n",
        kc.display()
    )
}

/// An X509-SVID a real agent serves: (chain PEM, key).
async fn agent_svid(socket: &Path, id: &str) -> (String, rcgen::KeyPair) {
    let mut c = tessera_agent::cli::workload_client(socket).await.unwrap();
    let resp = c
        .fetch_x509svid(tessera_proto::workload::X509svidRequest {})
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let s = resp.svids.iter().find(|s| s.spiffe_id == id).unwrap_or_else(|| panic!("no SVID for {id}"));
    let certs = split_der(&s.x509_svid);
    let chain = tessera_identity::pem::encode_certs(certs.iter().map(Vec::as_slice));
    let key = rcgen::KeyPair::try_from(s.x509_svid_key.as_slice()).unwrap();
    (chain, key)
}

/// F6 of the second review: certificates an agent obtained (for `ns/*/sa/*` identities) are
/// not renewable over the Istio CA API, so banning or evicting the agent, or deleting the
/// entry, stops every path that renews them. Certificates this API issued on a token renew by
/// certificate only while the token's pod exists and within `certificate_renewal_max_age`.
#[test]
fn agent_obtained_identities_renew_nothing_at_the_istio_ca_api_and_token_grants_are_bounded() {
    let a = FakeCluster::start("https://kubernetes.default.svc.cluster.local");
    a.add_node("node-1", "node-uid-1", &[]);
    a.add_pod(pod("shop", "cart-1", "pod-uid-cart", "cart", "node-1"));
    a.add_pod(pod("istio-system", "ztunnel-n1", "pod-uid-zt1", "ztunnel", "node-1"));
    let kc_dir = tempfile::tempdir().unwrap();
    let kc = kc_dir.path().join("a.kubeconfig");
    a.write_kubeconfig(&kc, "cluster-a");
    let port = free_port();
    let ca = "ca_ttl = \"96h\"\ndefault_x509_svid_ttl = \"1h\"";
    let mesh = tessera_test_util::Mesh::start_custom(TD, ca, "1s", |t| {
        t + &istio_section(
            port,
            &kc,
            "certificate_renewal_max_age = \"4s\"\ntrusted_node_accounts = [\"istio-system/ztunnel\"]",
        )
    });
    let cart = "spiffe://cluster.local/ns/shop/sa/cart";
    let pay = "spiffe://cluster.local/ns/shop/sa/pay";
    mesh.register(cart, &[]);
    let pay_entry = mesh.register(pay, &[]);
    // A second agent of the same server, to be evicted.
    let token: serde_json::Value = serde_json::from_str(&mesh.server.cli_ok(&[
        "token",
        "generate",
        "--spiffe-id",
        "spiffe://cluster.local/node/second",
        "--output",
        "json",
    ]))
    .unwrap();
    let d = mesh.dir.path();
    let second_cfg = std::fs::read_to_string(&mesh.agent_config)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("join_token") && !l.starts_with("health_address"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(&d.join("agent.sock").display().to_string(), &d.join("second.sock").display().to_string())
        .replace(&d.join("agent\"").display().to_string(), &d.join("second\"").display().to_string())
        + &format!(
            "\njoin_token = \"{}\"\nhealth_address = \"127.0.0.1:{}\"\n",
            token["token"].as_str().unwrap(),
            free_port()
        );
    let second_cfg_path = d.join("second.toml");
    std::fs::write(&second_cfg_path, second_cfg).unwrap();
    let mut cmd = std::process::Command::new(tessera_test_util::bin("tessera-agent"));
    cmd.args(["run", "--config"]).arg(&second_cfg_path);
    let mut second = tessera_test_util::Proc::spawn(cmd, d.join("second.log"));
    let second_sock = d.join("second.sock");
    second.wait_until(30, "the second agent", || std::os::unix::net::UnixStream::connect(&second_sock).is_ok());
    let web = "spiffe://cluster.local/ns/web/sa/frontend";
    mesh.server.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        web,
        "--parent-id",
        "spiffe://cluster.local/node/second",
        "--selector",
        &format!("unix:uid:{}", tessera_test_util::my_uid()),
    ]);
    let roots_pem = mesh.server.cli_ok(&["bundle", "show"]);
    let env = Env {
        _dir: tempfile::tempdir().unwrap(),
        server: ServerProc { child: None, dir: d.to_owned(), socket: mesh.server.socket.clone(), config: d.into() },
        addr: format!("127.0.0.1:{port}"),
        roots_pem,
        a,
        b: FakeCluster::start("https://unused.example"),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let renew = |chain: String, key: rcgen::KeyPair, id: &'static str| {
            let env = &env;
            async move {
                let ch = channel(env, Some((&chain, &key))).await;
                let (c, _) = csr(id, None);
                call(&ch, Call { token: None, cluster: None, csr: c, ttl: 0, impersonate: None }).await
            }
        };
        let wait_svid = |socket: std::path::PathBuf, id: &'static str| async move {
            for _ in 0..100 {
                let mut c = tessera_agent::cli::workload_client(&socket).await.unwrap();
                if let Ok(r) = c.fetch_x509svid(tessera_proto::workload::X509svidRequest {}).await
                    && let Ok(Some(m)) = r.into_inner().message().await
                    && m.svids.iter().any(|s| s.spiffe_id == id)
                {
                    return agent_svid(&socket, id).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("no SVID for {id}");
        };
        let (cart_chain, cart_key) = wait_svid(mesh.socket.clone(), cart).await;
        let (pay_chain, pay_key) = wait_svid(mesh.socket.clone(), pay).await;
        let (web_chain, web_key) = wait_svid(d.join("second.sock"), web).await;

        // Entry deleted: its SVID renews nothing.
        mesh.server.cli_ok(&["entry", "delete", "--entry-id", &pay_entry]);
        let m = assert_code(renew(pay_chain, pay_key, pay).await, Code::Unauthenticated, "deleted entry's SVID");
        assert!(m.contains("not issued by this API"), "{m}");
        // Agent banned: what it obtained renews nothing.
        mesh.server.cli_ok(&[
            "agent",
            "ban",
            "--spiffe-id",
            &agent_id(&mesh.server, "spiffe://cluster.local/node/e2e"),
        ]);
        assert_code(renew(cart_chain, cart_key, cart).await, Code::Unauthenticated, "banned agent's SVID");
        // Agent evicted: the same.
        mesh.server.cli_ok(&[
            "agent",
            "evict",
            "--spiffe-id",
            &agent_id(&mesh.server, "spiffe://cluster.local/node/second"),
        ]);
        assert_code(renew(web_chain, web_key, web).await, Code::Unauthenticated, "evicted agent's SVID");

        // A certificate issued on a token renews by certificate, carrying the same grant...
        let ch = channel(&env, None).await;
        let tok = env.a.token("shop", "cart", Some("cart-1"), AUD, 3600);
        let (c, key) = csr(cart, None);
        let resp = call(&ch, Call::new(&tok, "cluster-a", c)).await.unwrap();
        let grant = leaf_facts(&resp).renewal_grant.expect("a token-issued certificate carries a grant");
        assert_eq!(grant.pod.as_ref().map(|p| p.uid.as_str()), Some("pod-uid-cart"));
        let chain = resp.cert_chain[..resp.cert_chain.len() - 1].concat();
        let renewed = renew(chain.clone(), key, cart).await.unwrap();
        assert_eq!(leaf_facts(&renewed).renewal_grant, Some(grant), "a renewal carries the grant unchanged");
        // ... until its pod is gone,
        env.a.add_pod(pod("shop", "cart-9", "pod-uid-cart-9", "cart", "node-1"));
        let tok9 = env.a.token("shop", "cart", Some("cart-9"), AUD, 3600);
        let (c, key9) = csr(cart, None);
        let r9 = call(&ch, Call::new(&tok9, "cluster-a", c)).await.unwrap();
        let chain9 = r9.cert_chain[..r9.cert_chain.len() - 1].concat();
        env.a.delete_pod("shop", "cart-9");
        let m = assert_code(renew(chain9, key9, cart).await, Code::Unauthenticated, "renewal after the pod is gone");
        assert!(m.contains("cart-9"), "{m}");
        // ... and no longer than certificate_renewal_max_age after the token was checked.
        let (c, key) = csr(cart, None);
        let fresh = call(&ch, Call::new(&tok, "cluster-a", c)).await.unwrap();
        let chain = fresh.cert_chain[..fresh.cert_chain.len() - 1].concat();
        tokio::time::sleep(Duration::from_millis(5500)).await;
        let m = assert_code(renew(chain, key, cart).await, Code::Unauthenticated, "renewal past the max age");
        assert!(m.contains("certificate_renewal_max_age"), "{m}");
        // Certificates issued by impersonation (ztunnel's) carry no grant: they renew nothing.
        let zt = env.a.token("istio-system", "ztunnel", Some("ztunnel-n1"), AUD, 3600);
        let (c, _) = csr(cart, None);
        let mut imp = Call::new(&zt, "cluster-a", c);
        imp.impersonate = Some(cart);
        let issued = call(&ch, imp).await.unwrap();
        assert_eq!(leaf_facts(&issued).uris, vec![cart.to_owned()]);
        assert!(leaf_facts(&issued).renewal_grant.is_none(), "an impersonated certificate carries a grant");
    });
    drop(second);
}

/// The agent whose alias entry is `alias`.
fn agent_id(server: &ServerProc, alias: &str) -> String {
    let entries: serde_json::Value =
        serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])).unwrap();
    entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == alias)
        .and_then(|e| e["parent_id"].as_str())
        .unwrap_or_else(|| panic!("no alias entry {alias}: {entries}"))
        .to_owned()
}

/// Concatenated DER certificates, one by one.
fn split_der(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() > 2 {
        let (len, hdr) = match b[1] {
            n if n < 0x80 => (usize::from(n), 2),
            0x81 => (usize::from(b[2]), 3),
            0x82 => ((usize::from(b[2]) << 8) | usize::from(b[3]), 4),
            _ => panic!("certificate too long"),
        };
        out.push(b[..hdr + len].to_vec());
        b = &b[hdr + len..];
    }
    out
}

/// A client of the Istio CA API that behaves as ztunnel does: it asks for its certificate with
/// its token, trusts for its peers exactly the last element of its latest answer, and renews
/// at half life.
struct Workload {
    id: &'static str,
    chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    key: rustls_pki_types::PrivateKeyDer<'static>,
    peer_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    renew_at: std::time::Instant,
    /// Authority key ID of the leaf (which CA signed it).
    issuer: String,
}

impl Workload {
    async fn fetch(id: &'static str, addr: &str, ca_roots_pem: &str, token: &str) -> Workload {
        let ch = ca_channel(addr, ca_roots_pem, None).await;
        let (c, key) = csr(id, None);
        let resp = call(&ch, Call::new(token, "cluster-b", c)).await.unwrap();
        let last = resp.cert_chain.last().unwrap();
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> = resp.cert_chain[..resp.cert_chain.len() - 1]
            .iter()
            .flat_map(|p| tessera_identity::pem::decode_certs(p.as_bytes()).unwrap())
            .collect();
        let facts = tessera_identity::x509::cert_facts(&chain[0]).unwrap();
        let life = u64::try_from(facts.not_after - tessera_identity::unix_now()).unwrap_or(0);
        Workload {
            id,
            peer_roots: tessera_identity::pem::decode_certs(last.as_bytes()).unwrap(),
            chain,
            key: rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            renew_at: std::time::Instant::now() + Duration::from_millis(life * 1000 / 2),
            issuer: facts.authority_key_id.unwrap_or_default(),
        }
    }
}

/// One mTLS handshake from `client` to `server` over loopback, each side checking the other
/// against its own peer trust store, as two ztunnels do. Err names the side that refused.
async fn handshake(server: &Workload, client: &Workload) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for r in &server.peer_roots {
        store.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let scfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(server.chain.clone(), server.key.clone_key())
        .map_err(|e| e.to_string())?;
    let td = tessera_identity::TrustDomain::new(TD).unwrap();
    let cverifier = tessera_identity::tls::SpiffeServerVerifier::new(
        &client.peer_roots,
        tessera_identity::tls::Authorize::MemberOf(td),
        &provider,
    )
    .map_err(|e| e.to_string())?;
    let ccfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(cverifier))
        .with_client_auth_cert(client.chain.clone(), client.key.clone_key())
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
    let serve = async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut s = acceptor.accept(tcp).await.map_err(|e| format!("{} refused {}: {e}", "server", "client"))?;
        use tokio::io::AsyncWriteExt;
        s.write_all(b"ok").await.map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())
    };
    let connect = async move {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("peer").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(ccfg))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("client refused server: {e}"))?;
        let mut buf = [0u8; 2];
        use tokio::io::AsyncReadExt;
        s.read_exact(&mut buf).await.map_err(|e| format!("server refused client: {e}"))?;
        Ok::<_, String>(())
    };
    let (a, b) = tokio::join!(serve, connect);
    a.and(b).map_err(|e| format!("{} ⇄ {}: {e}", client.id, server.id))
}

/// Issue 15: two workloads keep doing mTLS with each other through a whole CA rotation
/// (prepare, activate, the old CA expired and pruned), each renewing at half life and
/// trusting only what its latest `CreateCertificate` answer's last element holds, as
/// ztunnel does. Before the last element held every root, a workload with a certificate of
/// one CA refused a peer holding one of the other, for up to half a certificate lifetime.
#[test]
fn istio_workloads_keep_trusting_each_other_through_a_ca_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let b = FakeCluster::start("https://oidc.cluster-b.example");
    let jwks = dir.path().join("b-jwks.json");
    std::fs::write(&jwks, b.jwks()).unwrap();
    let port = free_port();
    // A 20 s CA: prepared at 10 s, active at ~16.7 s, expired at 20 s. Workload certificates
    // of at most 10 s fit its rotation (a third of 20 s is over 0.6 × 10 s).
    let extra = format!(
        "\n[istio]\naddress = \"127.0.0.1:{port}\"\ndns_names = [\"{HOST}\"]\ndefault_workload_cert_ttl = \"10s\"\nmax_workload_cert_ttl = \"10s\"\n[[istio.clusters]]\ncluster_id = \"cluster-b\"\njwks_path = \"{}\"\nissuer = \"https://oidc.cluster-b.example\"\naudiences = [\"istio-ca\"]\n",
        jwks.display()
    );
    let text = tessera_test_util::server_config_for(TD, dir.path(), "ca_ttl = \"20s\"\ndefault_x509_svid_ttl = \"5s\"")
        .replace("[server]\n", "[server]\nrotation_check_interval = \"500ms\"\nagent_svid_ttl = \"5s\"\n")
        + &extra;
    let server = ServerProc::start_text(dir.path(), &text);
    let addr = format!("127.0.0.1:{port}");
    let authorities = || -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&server.cli_ok(&["localauthority", "x509", "show", "--output", "json"])).unwrap();
        v["authorities"].as_array().unwrap().iter().map(|a| a["authority_id"].as_str().unwrap().to_owned()).collect()
    };
    let first = authorities();
    assert_eq!(first.len(), 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ok, failed, mixed, renewals) = rt.block_on(async {
        let token_a = b.token("shop", "cart", None, AUD, 3600);
        let token_b = b.token("shop", "pay", None, AUD, 3600);
        let (cart, pay) = ("spiffe://cluster.local/ns/shop/sa/cart", "spiffe://cluster.local/ns/shop/sa/pay");
        // The CA connection trusts the published bundle (istio-ca-root-cert), read afresh.
        let roots = || server.cli_ok(&["bundle", "show"]);
        let mut a = Workload::fetch(cart, &addr, &roots(), &token_a).await;
        tokio::time::sleep(Duration::from_millis(2500)).await; // out of step, as real pods are
        let mut w = Workload::fetch(pay, &addr, &roots(), &token_b).await;
        let (mut ok, mut failed, mut mixed, mut renewals) = (0u32, Vec::new(), 0u32, 0u32);
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        loop {
            let now = std::time::Instant::now();
            if now >= a.renew_at {
                a = Workload::fetch(cart, &addr, &roots(), &token_a).await;
                renewals += 1;
            }
            if now >= w.renew_at {
                w = Workload::fetch(pay, &addr, &roots(), &token_b).await;
                renewals += 1;
            }
            for (s, c) in [(&a, &w), (&w, &a)] {
                match handshake(s, c).await {
                    Ok(()) => {
                        ok += 1;
                        if a.issuer != w.issuer {
                            mixed += 1;
                        }
                    }
                    Err(e) => failed.push(e),
                }
            }
            let now_authorities = authorities();
            if !now_authorities.contains(&first[0]) || now >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (ok, failed, mixed, renewals)
    });
    eprintln!(
        "rotation: {ok} handshakes, {} failed, {mixed} between certificates of different CAs, {renewals} renewals",
        failed.len()
    );
    assert!(!authorities().contains(&first[0]), "the first CA was not pruned within 45 s: {:?}", authorities());
    assert!(
        failed.is_empty(),
        "{} of {} handshakes failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(mixed > 0, "no handshake between certificates of the two CAs: the rotation was not exercised");
}
