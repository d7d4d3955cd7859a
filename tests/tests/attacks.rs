//! Rows of the attack table (docs/security-tests.md) that need the real server binary:
//! forged, expired, wrong-audience and other-cluster tokens at `k8s_psat` attestation; the
//! admin socket reached by another user; oversized requests and slow-loris connections on the
//! Agent API, the bundle endpoint, the health listener and the Admin API. Each is refused,
//! stores nothing, and leaves the server serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tessera_e2e::fake_k8s::{FakeCluster, PSAT_AGENT_ID};
use tessera_e2e::{ServerProc, free_port, server_config_for};
use tessera_identity::tls::Authorize;
use tessera_identity::{PrivateKey, SpiffeId};
use tessera_proto::agent::v1 as agent;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tonic::Code;

struct Fixture {
    _dir: tempfile::TempDir,
    server: ServerProc,
    agent_api: String,
    bundle_endpoint: String,
    health: String,
    k8s: FakeCluster,
    other: FakeCluster,
}

fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let k8s = FakeCluster::with_agent_node("agent-n1", &[]);
    let other = FakeCluster::with_agent_node("agent-n1", &[]);
    let (agent_port, be_port, health_port) = (free_port(), free_port(), free_port());
    let text = server_config_for("example.org", dir.path(), "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"")
        .replace("agent_api_address = \"127.0.0.1:0\"", &format!("agent_api_address = \"127.0.0.1:{agent_port}\""))
        .replace("health_address = \"127.0.0.1:0\"", &format!("health_address = \"127.0.0.1:{health_port}\""))
        + &k8s.psat_attestor(&dir.path().join("kubeconfig"), "")
        + &format!("[federation.bundle_endpoint]\naddress = \"127.0.0.1:{be_port}\"\n");
    let server = ServerProc::start_text(dir.path(), &text);
    Fixture {
        _dir: dir,
        server,
        agent_api: format!("127.0.0.1:{agent_port}"),
        bundle_endpoint: format!("127.0.0.1:{be_port}"),
        health: format!("127.0.0.1:{health_port}"),
        k8s,
        other,
    }
}

async fn anonymous_agent_client(f: &Fixture) -> AgentClient<tonic::transport::Channel> {
    let roots = tessera_identity::pem::decode_certs(f.server.cli_ok(&["bundle", "show"]).as_bytes()).unwrap();
    let server_id = tessera_identity::server_id(&tessera_identity::TrustDomain::new("example.org").unwrap()).unwrap();
    let tls = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id), None).unwrap();
    AgentClient::new(tessera_svc::connect::tls(&f.agent_api, tls).await.unwrap())
}

fn psat(cluster: &str, token: &str) -> (agent::AttestationData, Vec<u8>) {
    let payload = tessera_k8s_payload(cluster, token);
    let id = SpiffeId::new(PSAT_AGENT_ID).unwrap();
    let key = PrivateKey::generate_ec_p256().unwrap();
    let csr = tessera_identity::csr::build_csr(&id, &[], &key).unwrap();
    (agent::AttestationData { r#type: "k8s_psat".into(), payload }, csr)
}

fn tessera_k8s_payload(cluster: &str, token: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"cluster": cluster, "token": token})).unwrap()
}

/// Reads until EOF or `limit`; returns what arrived and how long the peer took to close.
fn read_until_closed(s: &mut impl Read, limit: Duration) -> (Vec<u8>, Option<Duration>) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (out, Some(start.elapsed())),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (out, Some(start.elapsed())),
        }
    }
    (out, None)
}

#[test]
fn bad_kubernetes_tokens_attest_nothing() {
    let f = start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = anonymous_agent_client(&f).await;
        let aud = &["tessera-server"];
        let cases = [
            ("forged", "cluster-a", f.k8s.forged_token("tessera-system", "tessera-agent", Some("agent-n1"), aud)),
            ("expired", "cluster-a", f.k8s.token("tessera-system", "tessera-agent", Some("agent-n1"), aud, -600)),
            (
                "wrong audience",
                "cluster-a",
                f.k8s.token("tessera-system", "tessera-agent", Some("agent-n1"), &["istio-ca"], 600),
            ),
            (
                "other cluster's token",
                "cluster-a",
                f.other.token("tessera-system", "tessera-agent", Some("agent-n1"), aud, 600),
            ),
            (
                "unknown cluster",
                "cluster-z",
                f.k8s.token("tessera-system", "tessera-agent", Some("agent-n1"), aud, 600),
            ),
        ];
        for (what, cluster, token) in cases {
            let (data, csr) = psat(cluster, &token);
            let e = c.attest_agent(agent::AttestAgentRequest { data: Some(data), csr }).await.unwrap_err();
            assert!(
                matches!(e.code(), Code::PermissionDenied | Code::InvalidArgument),
                "{what}: {:?} {}",
                e.code(),
                e.message()
            );
        }
        // The good token works, so the refusals above were about the tokens.
        let (data, csr) =
            psat("cluster-a", &f.k8s.token("tessera-system", "tessera-agent", Some("agent-n1"), aud, 600));
        c.attest_agent(agent::AttestAgentRequest { data: Some(data), csr }).await.unwrap();
    });
    // Exactly one agent; every refusal of a named agent is audited.
    let agents = f.server.cli_ok(&["agent", "list", "--output", "json"]);
    let agents: serde_json::Value = serde_json::from_str(&agents).unwrap();
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);
    let audit = f.server.cli_ok(&["audit", "show", "--spiffe-id", PSAT_AGENT_ID, "--output", "json"]);
    let denied = audit.matches("\"denied\"").count();
    assert!(denied >= 4, "refusals not audited: {audit}");
}

#[test]
fn the_admin_socket_refuses_other_users() {
    if tessera_e2e::my_uid() != 0 {
        panic!("this test needs root (it runs a command as `nobody`); CI runs as root");
    }
    let f = start();
    let socket = f.server.socket.clone();
    // A copy of the CLI that `nobody` can run wherever the checkout lives, so that a refusal
    // below is the socket's, not exec's.
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cli = bin_dir.path().join("tessera-server");
    std::fs::copy(tessera_e2e::bin("tessera-server"), &cli).unwrap();
    std::fs::set_permissions(&cli, std::fs::Permissions::from_mode(0o755)).unwrap();
    let version =
        std::process::Command::new("runuser").args(["-u", "nobody", "--"]).arg(&cli).arg("--version").output().unwrap();
    assert!(version.status.success(), "nobody cannot run tessera-server: {version:?}");
    let as_nobody = || {
        std::process::Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(&cli)
            .args(["entry", "show", "--socket"])
            .arg(&socket)
            .output()
            .unwrap()
    };
    // The socket is 0600 in a private directory: the kernel refuses the connection.
    let out = as_nobody();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ermission denied"), "{out:?}");
    // Even with the file modes opened up by mistake, the server checks the peer's uid.
    let dir = socket.parent().unwrap();
    let mode = std::fs::metadata(dir).unwrap().permissions().mode();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("restricted to the server's user"), "{out:?}");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn oversized_requests_and_slow_clients_are_cut_off_and_the_server_keeps_serving() {
    let f = start();
    // Health listener: a 200 KiB request head is refused.
    let mut s = TcpStream::connect(&f.health).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let head = format!("GET /live HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(200 * 1024));
    let _ = s.write_all(head.as_bytes());
    let (got, closed) = read_until_closed(&mut s, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&got);
    assert!(closed.is_some(), "health listener kept an oversized request open");
    assert!(!text.starts_with("HTTP/1.1 200"), "oversized request served: {text}");

    // Bundle endpoint (TLS): an oversized head and a slow-loris head are both cut off.
    let mut cfg = tessera_identity::tls::danger::insecure_client_config().unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = std::sync::Arc::new(cfg);
    let open = || {
        let tcp = TcpStream::connect(&f.bundle_endpoint).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("tessera").unwrap();
        let conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    };
    let mut big = open();
    let _ = big.write_all(head.as_bytes());
    let (got, closed) = read_until_closed(&mut big, Duration::from_secs(10));
    assert!(closed.is_some(), "bundle endpoint kept an oversized request open");
    assert!(!String::from_utf8_lossy(&got).contains("HTTP/1.1 200"));
    let mut slow = open();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(15));
    let took = closed.expect("bundle endpoint kept a slow-loris connection open");
    assert!(took <= Duration::from_secs(8), "closed after {took:?}");

    // Agent API: a TCP connection that never starts TLS is closed after the handshake limit.
    let mut idle = TcpStream::connect(&f.agent_api).unwrap();
    idle.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let (_, closed) = read_until_closed(&mut idle, Duration::from_secs(20));
    let took = closed.expect("Agent API kept a silent connection open");
    assert!((Duration::from_secs(9)..=Duration::from_secs(15)).contains(&took), "closed after {took:?}");

    // Admin API: a request over its 4 MiB limit is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut admin = tessera_server::cli::connect_admin(&f.server.socket).await.unwrap();
        let e = admin
            .create_entry(tessera_proto::admin::v1::CreateEntryRequest {
                entry: Some(tessera_proto::types::v1::Entry {
                    spiffe_id: "spiffe://example.org/big".into(),
                    parent_id: "spiffe://example.org/node".into(),
                    hint: "h".repeat(5 * 1024 * 1024),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted), "{e:?}");
    });
    assert!(!f.server.cli_ok(&["entry", "show"]).contains("spiffe://example.org/big"));

    // Still serving: the bundle endpoint answers, the server is healthy.
    let mut ok = open();
    ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let (got, _) = read_until_closed(&mut ok, Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
    f.server.cli_ok(&["healthcheck"]);
}
