//! Rows of the attack table (docs/security-tests.md) that need the real server binary:
//! forged, expired, wrong-audience and other-cluster tokens at `k8s_psat` attestation; the
//! admin socket reached by another user; oversized requests and slow-loris connections on the
//! Agent API, the bundle endpoint, the health listener and the Admin API. Each is refused,
//! stores nothing, and leaves the server serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tessera_identity::tls::Authorize;
use tessera_identity::{PrivateKey, SpiffeId};
use tessera_proto::agent::v1 as agent;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tessera_test_util::fake_k8s::{FakeCluster, PSAT_AGENT_ID};
use tessera_test_util::{ServerProc, free_port, server_config_for};
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
            let e = c
                .attest_agent(agent::AttestAgentRequest { data: Some(data), csr, ..Default::default() })
                .await
                .unwrap_err();
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
        c.attest_agent(agent::AttestAgentRequest { data: Some(data), csr, ..Default::default() }).await.unwrap();
    });
    // Exactly one agent. The refusals came from callers that proved nothing: they are
    // counted, not written to the audit chain (F9 of the second review: the agent ID they
    // name comes from an unverified token).
    let agents = f.server.cli_ok(&["agent", "list", "--output", "json"]);
    let agents: serde_json::Value = serde_json::from_str(&agents).unwrap();
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);
    let audit = f.server.cli_ok(&["audit", "show", "--spiffe-id", PSAT_AGENT_ID, "--output", "json"]);
    let denied = audit.matches("\"denied\"").count();
    assert_eq!(denied, 0, "unverified callers wrote to the audit chain: {audit}");
    assert!(audit.contains("agent_attested"), "the good attestation is audited: {audit}");
    let refused = metric(&f.health, "tessera_server_agent_attestations_total{result=\"denied\"}");
    assert!(refused >= 4, "refusals not counted: {refused}");
}

#[test]
fn the_admin_socket_refuses_other_users() {
    if tessera_test_util::my_uid() != 0 {
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
    std::fs::copy(tessera_test_util::bin("tessera-server"), &cli).unwrap();
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
        let mut admin = tessera_server::client::connect_admin(&f.server.socket).await.unwrap();
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

/// A server whose per-IP attestation limit does not get in the way of a test that attests
/// hundreds of times.
fn start_unlimited() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let k8s = FakeCluster::with_agent_node("agent-n1", &[]);
    let other = FakeCluster::with_agent_node("agent-n1", &[]);
    let agent_port = free_port();
    let text =
        server_config_for("example.org", dir.path(), "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"").replace(
            "agent_api_address = \"127.0.0.1:0\"",
            &format!("agent_api_address = \"127.0.0.1:{agent_port}\"\nrate_limit_attestations_per_minute = 1000000"),
        ) + &k8s.psat_attestor(&dir.path().join("kubeconfig"), "");
    let server = ServerProc::start_text(dir.path(), &text);
    Fixture {
        _dir: dir,
        server,
        agent_api: format!("127.0.0.1:{agent_port}"),
        bundle_endpoint: String::new(),
        health: String::new(),
        k8s,
        other,
    }
}

/// An Agent API client presenting `chain`/`key`.
async fn agent_client(f: &Fixture, chain: &[Vec<u8>], key: &PrivateKey) -> AgentClient<tonic::transport::Channel> {
    let roots = tessera_identity::pem::decode_certs(f.server.cli_ok(&["bundle", "show"]).as_bytes()).unwrap();
    let server_id = tessera_identity::server_id(&tessera_identity::TrustDomain::new("example.org").unwrap()).unwrap();
    let chain = chain.iter().map(|c| c.clone().into()).collect();
    let tls = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id), Some((chain, key))).unwrap();
    AgentClient::new(tessera_svc::connect::tls(&f.agent_api, tls).await.unwrap())
}

/// Attests the PSAT agent; returns its SVID chain and key.
async fn psat_attest(
    f: &Fixture,
    anon: &mut AgentClient<tonic::transport::Channel>,
) -> Result<(Vec<Vec<u8>>, PrivateKey), tonic::Status> {
    let token = f.k8s.token("tessera-system", "tessera-agent", Some("agent-n1"), &["tessera-server"], 600);
    let id = SpiffeId::new(PSAT_AGENT_ID).unwrap();
    let key = PrivateKey::generate_ec_p256().unwrap();
    let csr = tessera_identity::csr::build_csr(&id, &[], &key).unwrap();
    let data = agent::AttestationData { r#type: "k8s_psat".into(), payload: tessera_k8s_payload("cluster-a", &token) };
    let r = anon
        .attest_agent(agent::AttestAgentRequest { data: Some(data), csr, ..Default::default() })
        .await?
        .into_inner();
    Ok((r.svid.unwrap().cert_chain, key))
}

fn renew_csr() -> Vec<u8> {
    let key = PrivateKey::generate_ec_p256().unwrap();
    tessera_identity::csr::build_csr(&SpiffeId::new(PSAT_AGENT_ID).unwrap(), &[], &key).unwrap()
}

/// F1 of the second review: a ban or an eviction must not be undone by renewals or
/// attestations that were in flight when it landed. Each round attests the agent, then fires
/// renewals (and, for bans, re-attestations) at the same moment as the admin's ban or evict,
/// and checks what stays: the record banned (or gone), and no SVID the agent holds renews.
#[test]
fn bans_and_evictions_hold_against_racing_renewals_and_attestations() {
    const ROUNDS: usize = 150;
    let f = start_unlimited();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (mut won_before_ban, mut refused_after) = (0usize, 0usize);
    rt.block_on(async {
        let mut admin = tessera_server::client::connect_admin(&f.server.socket).await.unwrap();
        let mut anon = anonymous_agent_client(&f).await;
        let id = tessera_proto::admin::v1::AgentId { spiffe_id: PSAT_AGENT_ID.into() };
        for round in 0..ROUNDS * 2 {
            let ban = round % 2 == 0;
            let (chain, key) = psat_attest(&f, &mut anon).await.unwrap();
            let client = agent_client(&f, &chain, &key).await;
            let renewals: Vec<_> = (0..6)
                .map(|_| {
                    let mut c = client.clone();
                    async move {
                        let key = PrivateKey::generate_ec_p256().unwrap();
                        let csr = tessera_identity::csr::build_csr(&SpiffeId::new(PSAT_AGENT_ID).unwrap(), &[], &key)
                            .unwrap();
                        let r = c.renew_agent(agent::RenewAgentRequest { csr, ..Default::default() }).await?;
                        Ok::<_, tonic::Status>((r.into_inner().svid.unwrap().cert_chain, key))
                    }
                })
                .collect();
            let attestations: Vec<_> = (0..if ban { 2 } else { 0 })
                .map(|_| {
                    let mut a = anon.clone();
                    let f = &f;
                    async move { psat_attest(f, &mut a).await }
                })
                .collect();
            let mut adm = admin.clone();
            let id = id.clone();
            let admin_call =
                async move { if ban { adm.ban_agent(id.clone()).await } else { adm.evict_agent(id.clone()).await } };
            let (renewed, attested, admin_result) = tokio::join!(
                futures_util::future::join_all(renewals),
                futures_util::future::join_all(attestations),
                admin_call
            );
            admin_result.unwrap_or_else(|e| panic!("round {round}: the admin call failed: {e}"));
            // What the agent (or an attacker holding its key) could hold now: every SVID any
            // of the racing calls returned.
            let mut held: Vec<(Vec<Vec<u8>>, PrivateKey)> = Vec::new();
            held.push((chain.clone(), key.clone()));
            for r in renewed.into_iter().flatten() {
                won_before_ban += 1;
                held.push(r);
            }
            for a in attested.into_iter().flatten() {
                held.push(a);
            }
            let rec = admin.get_agent(tessera_proto::admin::v1::AgentId { spiffe_id: PSAT_AGENT_ID.into() }).await;
            if ban {
                let rec = rec.unwrap_or_else(|e| panic!("round {round}: the banned agent's record is gone: {e}"));
                assert!(rec.into_inner().banned, "round {round}: a racing call overwrote the ban");
                // A banned agent attests no more.
                let e = psat_attest(&f, &mut anon).await.unwrap_err();
                assert_eq!(e.code(), Code::PermissionDenied, "round {round}: {e:?}");
            } else {
                match rec {
                    Ok(r) => panic!("round {round}: a racing renewal brought the evicted agent back: {r:?}"),
                    Err(e) => assert_eq!(e.code(), Code::NotFound, "round {round}"),
                }
            }
            // No SVID from before or during the race renews any more.
            for (c, k) in &held {
                let mut client = agent_client(&f, c, k).await;
                let e = client
                    .renew_agent(agent::RenewAgentRequest { csr: renew_csr(), ..Default::default() })
                    .await
                    .unwrap_err();
                assert_eq!(e.code(), Code::PermissionDenied, "round {round}: {e:?}");
                refused_after += 1;
            }
            // The next round starts from a clean slate (eviction also lifts a ban).
            let _ = admin.evict_agent(tessera_proto::admin::v1::AgentId { spiffe_id: PSAT_AGENT_ID.into() }).await;
        }
    });
    eprintln!(
        "{ROUNDS} ban and {ROUNDS} evict rounds: {won_before_ban} renewals landed before the admin call, {refused_after} later renewals refused"
    );
}

/// A TLS connection to `addr` from `local` (a loopback address), handshake completed;
/// `None` when the server refused it before or during the handshake.
fn tls_connection(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    local: std::net::IpAddr,
) -> Option<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let target: std::net::SocketAddr = addr.parse().unwrap();
    // std cannot bind a source address before connecting; tokio's TcpSocket can.
    let sock = rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().ok()?;
        sock.bind(std::net::SocketAddr::new(local, 0)).ok()?;
        sock.connect(target).await.ok()
    })?;
    let sock = sock.into_std().ok()?;
    sock.set_nonblocking(false).ok()?;
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut cfg = tessera_identity::tls::danger::insecure_client_config().unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("tessera").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        if s.conn.complete_io(&mut s.sock).is_err() {
            return None;
        }
    }
    Some(s)
}

/// True once the peer has closed `s` (end of stream or an error).
fn closed(s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> bool {
    s.sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // e.g. the server's HTTP/2 SETTINGS
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn metric(health: &str, line_start: &str) -> u64 {
    let (_, body) = tessera_test_util::http_get(health, "/metrics").unwrap();
    body.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start} in {body}"))
}

/// F4 of the second review: idle TLS connections are closed after the idle timeout, a
/// connection over the cap (or over an address's share without a client certificate) is
/// refused, and throughout the server stays ready and keeps signing for a real agent.
#[test]
fn idle_and_excess_connections_are_closed_and_the_server_keeps_signing_for_its_agent() {
    let health_port = free_port();
    let mesh = tessera_test_util::Mesh::start_custom(
        "example.org",
        "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"",
        "5s",
        |t| {
            t.replace(
            "[server]\n",
            "[server]\nmax_connections = 300\nconnection_idle_timeout = \"3s\"\nmax_anonymous_connections_per_ip = 200\n",
        )
        .replace("health_address = \"127.0.0.1:0\"", &format!("health_address = \"127.0.0.1:{health_port}\""))
        },
    );
    let health = format!("127.0.0.1:{health_port}");
    let cfg = std::fs::read_to_string(mesh.dir.path().join("server.toml")).unwrap();
    let addr = cfg
        .lines()
        .find_map(|l| l.strip_prefix("agent_api_address = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let one: std::net::IpAddr = [127, 0, 0, 1].into();
    let two: std::net::IpAddr = [127, 0, 0, 2].into();

    // 200 idle TLS connections without a client certificate from one address.
    let mut idle = Vec::new();
    for i in 0..200 {
        let s = tls_connection(&rt, &addr, one).unwrap_or_else(|| panic!("connection {i} refused under the caps"));
        idle.push((Instant::now(), s));
    }
    // One more from that address is over its share: closed right after the handshake.
    let started = Instant::now();
    let mut extra = tls_connection(&rt, &addr, one);
    let refused_at_share = match &mut extra {
        None => true,
        Some(s) => {
            let mut gone = false;
            while !gone && started.elapsed() < Duration::from_secs(2) {
                gone = closed(s);
            }
            gone
        }
    };
    assert!(refused_at_share, "a 201st connection without a certificate from one address was kept");
    // Other addresses fill the listener up to its cap; the next one is refused.
    let mut refused_at_cap = false;
    for _ in 0..200 {
        match tls_connection(&rt, &addr, two) {
            Some(s) => idle.push((Instant::now(), s)),
            None => {
                refused_at_cap = true;
                break;
            }
        }
    }
    assert!(refused_at_cap, "the listener took more than max_connections");
    assert!(idle.len() <= 300, "{} connections open at once", idle.len());

    // The agent's own connection (with its SVID and an open WatchChanges stream) is neither
    // idle nor refused: a new entry reaches it and is signed while the listener is full.
    let id = "spiffe://example.org/while-full";
    mesh.register(id, &[]);
    let got = std::cell::RefCell::new(String::new());
    tessera_test_util::wait_for(
        20,
        "an SVID while the listener is full",
        || {
            let out = mesh.agent_cli(&["api", "fetch", "x509"]);
            *got.borrow_mut() = String::from_utf8_lossy(&out.stdout).into_owned();
            got.borrow().contains(id)
        },
        || got.borrow().clone(),
    );
    assert_eq!(tessera_test_util::http_get(&health, "/ready").unwrap().0, 200);

    // Every idle connection is closed within the idle limit (3 s, plus scheduling slack).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut open: Vec<_> = idle.into_iter().map(|(at, s)| (at, s, None::<Duration>)).collect();
    while open.iter().any(|(_, _, c)| c.is_none()) && Instant::now() < deadline {
        for (at, s, c) in open.iter_mut().filter(|(_, _, c)| c.is_none()) {
            if closed(s) {
                *c = Some(at.elapsed());
            }
        }
    }
    let still = open.iter().filter(|(_, _, c)| c.is_none()).count();
    assert_eq!(still, 0, "{still} idle connections still open after 10 s");
    let slowest = open.iter().filter_map(|(_, _, c)| *c).max().unwrap();
    assert!(slowest <= Duration::from_secs(6), "an idle connection lived {slowest:?} (limit 3 s)");
    eprintln!("{} idle connections closed; the last after {slowest:?}", open.len());

    // Places are free again, the agent still gets new SVIDs, and the metrics tell the story.
    assert!(tls_connection(&rt, &addr, one).is_some(), "no connection accepted after the idle ones were closed");
    let again = "spiffe://example.org/after";
    mesh.register(again, &[]);
    mesh.wait_for_svid(again);
    let m = |l: &str| metric(&health, l);
    assert!(m("tessera_server_connections_refused_total{listener=\"agent_api\",reason=\"per_ip\"}") >= 1);
    assert!(m("tessera_server_connections_refused_total{listener=\"agent_api\",reason=\"limit\"}") >= 1);
    assert!(m("tessera_server_connections_idle_closed_total{listener=\"agent_api\"}") >= 250);
}

/// F5 of the second review: join tokens never reach a log. Tokens are created (one for the
/// agent, some never used), the agent attests, a bad attestation is tried with an unused
/// token, the agent is evicted and keeps calling; then the server's and the agent's whole log
/// output, at debug level, is searched for every token value. Logs written to a file carry
/// no terminal colour codes either.
#[test]
fn join_tokens_never_reach_the_server_or_agent_logs() {
    let tokens = std::cell::RefCell::new(Vec::<String>::new());
    let alias = "spiffe://example.org/node/logs";
    let mesh = tessera_test_util::Mesh::start_attested(
        "example.org",
        "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"",
        "1s",
        |t| t.replace("log_level = \"info\"", "log_level = \"debug\""),
        alias,
        |server| {
            let generate = |args: &[&str]| {
                let mut all = vec!["token", "generate", "--output", "json"];
                all.extend_from_slice(args);
                let v: serde_json::Value = serde_json::from_str(&server.cli_ok(&all)).unwrap();
                let t = v["token"].as_str().unwrap().to_owned();
                tokens.borrow_mut().push(t.clone());
                t
            };
            let used = generate(&["--spiffe-id", alias]);
            generate(&["--spiffe-id", "spiffe://example.org/node/unused"]);
            generate(&[]);
            generate(&[]);
            format!("join_token = \"{used}\"\nlog_level = \"debug\"\n")
        },
    );
    let tokens = tokens.into_inner();
    let id = "spiffe://example.org/logged";
    mesh.register(id, &[]);
    mesh.wait_for_svid(id);
    // A refused attestation with an unused token (a CSR for another ID).
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let roots = tessera_identity::pem::decode_certs(mesh.server.cli_ok(&["bundle", "show"]).as_bytes()).unwrap();
        let server_id =
            tessera_identity::server_id(&tessera_identity::TrustDomain::new("example.org").unwrap()).unwrap();
        let tls = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id), None).unwrap();
        let cfg = std::fs::read_to_string(mesh.dir.path().join("server.toml")).unwrap();
        let addr = cfg.lines().find_map(|l| l.strip_prefix("agent_api_address = \"")).unwrap().trim_end_matches('"');
        let mut anon = AgentClient::new(tessera_svc::connect::tls(addr, tls).await.unwrap());
        let key = PrivateKey::generate_ec_p256().unwrap();
        let csr = tessera_identity::csr::build_csr(&SpiffeId::new("spiffe://example.org/not-me").unwrap(), &[], &key)
            .unwrap();
        let data = agent::AttestationData { r#type: "join_token".into(), payload: tokens[2].clone().into_bytes() };
        let e = anon
            .attest_agent(agent::AttestAgentRequest { data: Some(data), csr, ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    });
    // The agent evicted: it keeps calling and is refused (both sides log that).
    let agents: serde_json::Value =
        serde_json::from_str(&mesh.server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    let agent_id = agents["agents"][0]["spiffe_id"].as_str().unwrap().to_owned();
    mesh.server.cli_ok(&["agent", "evict", "--spiffe-id", &agent_id]);
    std::thread::sleep(Duration::from_secs(3));
    let server_log = mesh.server.log();
    let agent_log = std::fs::read_to_string(mesh.dir.path().join("agent.log")).unwrap();
    assert!(server_log.contains("Join token created") && server_log.contains("Agent evicted"), "{server_log}");
    assert!(agent_log.contains("Agent attested"), "{agent_log}");
    for (name, log) in [("server", &server_log), ("agent", &agent_log)] {
        for t in &tokens {
            assert!(!log.contains(t.as_str()), "the {name} log holds a join token:\n{log}");
        }
        assert!(!log.contains('\u{1b}'), "the {name} log, written to a file, holds terminal escape codes");
    }
}
