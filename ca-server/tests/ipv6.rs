//! Listeners take IPv6 and dual-stack addresses: the Agent API on `[::1]` (an agent attests
//! over it), health on `[::]` (answering on both 127.0.0.1 and ::1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};

use tessera_identity::tls::Authorize;
use tessera_proto::admin::v1 as admin;
use tessera_proto::agent::v1 as agent;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tessera_server::app::Server;
use tessera_server::config::Config;
use tessera_test_util::inprocess::{TD, config_text_for, csr_for};

fn get(addr: std::net::SocketAddr, path: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split(' ').nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn agent_api_on_ipv6_loopback_and_health_on_dual_stack() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text_for(TD, dir.path(), "")
        .replace("agent_api_address = \"127.0.0.1:0\"", "agent_api_address = \"[::1]:0\"")
        .replace("health_address = \"127.0.0.1:0\"", "health_address = \"[::]:0\"");
    let server = Server::start(Config::from_toml(&text).unwrap()).await.unwrap();
    assert!(server.agent_api_addr.is_ipv6(), "{}", server.agent_api_addr);

    // Health answers on the IPv4 and the IPv6 loopback of one dual-stack listener.
    let port = server.health_addr.port();
    let v4: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: std::net::SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let (a, b) = tokio::task::spawn_blocking(move || (get(v4, "/live"), get(v6, "/live"))).await.unwrap();
    assert_eq!((a, b), (200, 200));

    // An agent attests over IPv6.
    let mut adm = tessera_server::client::connect_admin(&server.admin_socket).await.unwrap();
    let token = adm
        .create_join_token(admin::CreateJoinTokenRequest { ttl: 600, spiffe_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    let roots: Vec<rustls_pki_types::CertificateDer<'static>> = adm
        .get_bundle(admin::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner()
        .x509_authorities
        .into_iter()
        .map(Into::into)
        .collect();
    let server_id = tessera_identity::server_id(server.ca.trust_domain()).unwrap();
    let tls = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id), None).unwrap();
    let addr = format!("[::1]:{}", server.agent_api_addr.port());
    let mut c = AgentClient::new(tessera_svc::connect::tls(&addr, tls).await.unwrap());
    let r = c
        .attest_agent(agent::AttestAgentRequest {
            data: Some(agent::AttestationData { r#type: "join_token".into(), payload: token.token.into_bytes() }),
            csr: csr_for(&token.agent_id),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.svid.unwrap().spiffe_id, token.agent_id);
    server.shutdown().await;
}
