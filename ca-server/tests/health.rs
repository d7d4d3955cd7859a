//! Health and metrics endpoints, over a raw HTTP/1.1 connection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tessera_proto::admin::v1 as admin;
use tessera_test_util::inprocess::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn http(addr: std::net::SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

#[tokio::test]
async fn live_ready_and_metrics_report_the_server_state() {
    let mut t = TestServer::start().await;
    let addr = t.server().health_addr;
    assert_eq!(http(addr, "GET", "/live").await.0, 200);
    assert_eq!(http(addr, "GET", "/ready").await, (200, "ready\n".to_owned()));
    assert_eq!(http(addr, "POST", "/ready").await.0, 405);
    assert_eq!(http(addr, "GET", "/nope").await.0, 404);

    let id = "spiffe://example.org/w";
    t.admin
        .mint_x509_svid(admin::MintX509SvidRequest {
            spiffe_id: id.into(),
            csr: csr_for(id),
            ttl: 0,
            dns_names: vec![],
        })
        .await
        .unwrap();
    let bad = admin::MintX509SvidRequest { spiffe_id: id.into(), csr: b"junk".to_vec(), ttl: 0, dns_names: vec![] };
    t.admin.mint_x509_svid(bad).await.unwrap_err();
    let (code, metrics) = http(addr, "GET", "/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("tessera_server_x509_svids_issued_total{result=\"ok\"} 1"), "{metrics}");
    assert!(metrics.contains("tessera_server_x509_svids_issued_total{result=\"denied\"} 1"), "{metrics}");
    assert!(metrics.contains("tessera_server_ready 1"), "{metrics}");
    let seq = t.bundle().await.sequence_number;
    assert!(metrics.contains(&format!("tessera_server_bundle_sequence {seq}")), "{metrics}");
    assert!(!metrics.contains("spiffe://"), "a SPIFFE ID leaked into a metric label");
    t.stop().await;
}
