//! `tessera-bench`: the agent figures, measured against the real binaries on this machine, each
//! next to its reference measured in the same run. Prints a Markdown table.
//!
//! Run: `cargo build --release --bins && target/release/tessera-bench` (it uses the
//! `tessera-server` and `tessera-agent` binaries next to itself).
//!
//! Figures: minting 1,000 SVIDs (keys generated on the node, CSRs batched) against the raw
//! crypto limit (ring: the same key generations, CSR signatures and CA signatures, one core);
//! first SDS answer on a new stream; SDS push after an entry change and after a bundle change
//! to 1,000 open streams (both carried by the server's change notice, with the agent polling
//! at the default 5 s as fallback); agent RSS with
//! 1,000 SVIDs and with 1,000 SDS streams; a real Envoy's start-to-ready time (its own start
//! included).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tessera_proto::admin::v1 as admin;
use tessera_proto::envoy::service::discovery::v3::DiscoveryRequest;
use tessera_proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tessera_proto::types::v1 as types;
use tessera_test_util::procfs::rss_kib;
use tessera_test_util::{Mesh, my_uid};
use tonic::transport::Channel;

const N: usize = 1000;
/// The agent's poll interval: the default. Changes reach it by notice, not by this poll.
const SYNC: &str = "5s";
/// Quiet time before a latency figure: the agent's notice budget refills (5 at one a second).
const QUIET: Duration = Duration::from_secs(5);
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

async fn uds(path: PathBuf) -> Result<Channel> {
    Ok(tessera_svc::connect::unix(&path).await?)
}

fn metric(addr: &str, name: &str) -> Option<f64> {
    let (_, body) = tessera_test_util::http_get(addr, "/metrics").ok()?;
    body.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()).and_then(|v| v.parse().ok())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The crypto floor for minting N SVIDs on one core: per SVID one P-256 key generation and
/// one CSR signature (agent), one CSR signature check and one certificate signature (CA).
fn crypto_floor() -> Result<Duration> {
    let id = tessera_identity::SpiffeId::new("spiffe://example.org/bench/x")?;
    let ca_key = tessera_identity::PrivateKey::generate_ec_p256()?;
    let start = Instant::now();
    for _ in 0..N {
        let key = tessera_identity::PrivateKey::generate_ec_p256()?;
        let csr = tessera_identity::csr::build_csr(&id, &[], &key)?;
        let checked = tessera_identity::csr::CheckedCsr::from_der(&csr)?;
        let kp = ca_key.to_rcgen()?;
        let spec = tessera_identity::x509::LeafSpec {
            spiffe_id: &id,
            dns_names: &[],
            rsa_key: false,
            not_before: 0,
            not_after: 3600,
            issuer_not_after: 7200,
            serial: [1; 16],
            renewal_grant: None,
        };
        let issuer = rcgen::Issuer::new(tessera_identity::x509::ca_params(id.trust_domain(), 0, 7200, [2; 16])?, &kp);
        tessera_identity::x509::leaf_params(&spec)?.signed_by(checked.public_key(), &issuer)?;
    }
    Ok(start.elapsed())
}

/// An Envoy listener serving TLS with `tls_context` (SDS or static files), plus the agent
/// cluster for SDS.
fn envoy_config(admin: u16, port: u16, socket: &std::path::Path, tls_context: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "l",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "b",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
                    }}],
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "common_tls_context": tls_context
                    }}
                }]
            }],
            "clusters": [{
                "name": "tessera_agent", "connect_timeout": "1s", "type": "STATIC",
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}
                }},
                "load_assignment": {"cluster_name": "tessera_agent", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": socket}}}}]}]}
            }]
        }
    })
}

/// Median time from spawning Envoy with `cfg` to its admin `/ready` answering 200.
fn envoy_start_to_ready(
    dir: &std::path::Path,
    name: &str,
    cfg: impl Fn(u16, u16) -> serde_json::Value,
) -> Result<Duration> {
    let mut times = Vec::new();
    for i in 0..5 {
        let (admin, port) = (tessera_test_util::free_port(), tessera_test_util::free_port());
        let path = dir.join(format!("{name}-{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&cfg(admin, port))?)?;
        let mut cmd = std::process::Command::new(tessera_test_util::venv_tool("envoy"));
        cmd.arg("-c").arg(&path).args(["--disable-hot-restart", "--concurrency", "1", "--log-level", "error"]);
        let t = Instant::now();
        let mut p = tessera_test_util::Proc::spawn(cmd, dir.join(format!("{name}-{i}.log")));
        let addr = format!("127.0.0.1:{admin}");
        p.wait_until(30, name, || tessera_test_util::http_get(&addr, "/ready").map(|(c, _)| c == 200).unwrap_or(false));
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[2])
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut rows: Vec<(String, String, String)> = Vec::new();

    let floor = tokio::task::spawn_blocking(crypto_floor).await??;

    let mesh = Mesh::start("ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"", SYNC);
    let agent_pid = mesh.agent.as_ref().context("agent")?.child.id();
    let agent_health = {
        let cfg = std::fs::read_to_string(&mesh.agent_config)?;
        cfg.lines()
            .find(|l| l.starts_with("health_address"))
            .and_then(|l| l.split('"').nth(1))
            .context("health_address")?
            .to_owned()
    };
    let rss_idle = rss_kib(agent_pid)?;
    let mut adm = tessera_server::client::connect_admin(&mesh.server.socket).await?;
    let uid = my_uid();

    // 1,000 entries for one workload (this process's uid), parented to a node alias that the
    // agent is not yet authorized for; then one entry makes them all authorized at once, so
    // the agent mints all 1,000 in one sync.
    let pending_alias = "spiffe://example.org/node/bench-pending";
    let mut ids = Vec::with_capacity(N);
    let syncs = |h: &str| metric(h, "tessera_agent_syncs_total{result=\"ok\"}").unwrap_or(0.0);
    let syncs_before = syncs(&agent_health);
    let created = Instant::now();
    for i in 0..N {
        let e = adm
            .create_entry(admin::CreateEntryRequest {
                entry: Some(types::Entry {
                    spiffe_id: format!("spiffe://example.org/bench/{i}"),
                    parent_id: pending_alias.into(),
                    selectors: vec![types::Selector { r#type: "unix".into(), value: format!("uid:{uid}") }],
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        ids.push(e);
    }
    let registering = created.elapsed();
    let churn_syncs = syncs(&agent_health) - syncs_before;
    // Registering sent the agent 1,000 change notices and used up its notice budget (a burst
    // of 5 syncs, then one a second). The figures below are for a quiet system: wait QUIET.
    tokio::time::sleep(QUIET).await;
    let t0 = Instant::now();
    adm.create_entry(admin::CreateEntryRequest {
        entry: Some(types::Entry {
            spiffe_id: pending_alias.into(),
            parent_id: mesh.alias.clone(),
            selectors: vec![types::Selector { r#type: "unix".into(), value: "uid:4294967294".into() }],
            ..Default::default()
        }),
    })
    .await?;
    loop {
        if metric(&agent_health, "tessera_agent_svids_cached").unwrap_or(0.0) as usize > N {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("agent did not get {N} SVIDs in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mint = t0.elapsed();
    rows.push((
        format!("mint {N} SVIDs at once: node keys + 2 batched CSR calls + CA signing + durable audit (from the authorizing entry's creation, after {QUIET:?} without changes; change notice, agent polling every {SYNC})"),
        ms(mint),
        format!("crypto floor, 1 core: {} (ring keygen + CSR + verify + sign ×{N})", ms(floor)),
    ));
    rows.push((
        format!("register {N} entries over the Admin API (sequential, each fsynced)"),
        ms(registering),
        "—".into(),
    ));
    rows.push((
        format!("agent syncs while those {N} entries were registered (under an alias the agent is not yet authorized for: targeted notices wake it for none)"),
        format!("{churn_syncs:.0}"),
        format!("expected 0; were they the agent's, the notice budget (5 at once, then 1/s) would allow ≤ {:.0}", 5.0 + registering.as_secs_f64().ceil()),
    ));
    let rss_1000 = rss_kib(agent_pid)?;
    rows.push((
        format!("agent RSS with {N} cached SVIDs"),
        format!("{:.1} MiB", rss_1000 as f64 / 1024.0),
        format!("idle agent: {:.1} MiB", rss_idle as f64 / 1024.0),
    ));

    // First SDS answer on a new stream, 50 times.
    let mut firsts = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        let mut c = SecretDiscoveryServiceClient::new(uds(mesh.socket.clone()).await?);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(DiscoveryRequest {
            resource_names: vec![format!("spiffe://example.org/bench/{i}")],
            type_url: SECRET_TYPE.into(),
            ..Default::default()
        })
        .await?;
        let mut s = c.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
        s.message().await?.context("no answer")?;
        firsts.push(t.elapsed());
    }
    firsts.sort();
    rows.push((
        "first SDS answer to a new client (connect + stream + secret), p50 / p99 of 50".into(),
        format!("{} / {}", ms(firsts[25]), ms(firsts[49])),
        "target < 20 ms".into(),
    ));

    // Push after an entry change: notice, sync, re-mint, push.
    let mut c = SecretDiscoveryServiceClient::new(uds(mesh.socket.clone()).await?);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(DiscoveryRequest {
        resource_names: vec!["spiffe://example.org/bench/0".into()],
        type_url: SECRET_TYPE.into(),
        ..Default::default()
    })
    .await?;
    let mut s = c.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let first = s.message().await?.context("no answer")?;
    tx.send(DiscoveryRequest {
        resource_names: vec!["spiffe://example.org/bench/0".into()],
        type_url: SECRET_TYPE.into(),
        response_nonce: first.nonce.clone(),
        version_info: first.version_info.clone(),
        ..Default::default()
    })
    .await?;
    let mut e0 = ids[0].clone();
    e0.dns_names = vec!["bench0.internal".into()];
    tokio::time::sleep(QUIET).await;
    let t = Instant::now();
    adm.update_entry(admin::UpdateEntryRequest { entry: Some(e0) }).await?;
    s.message().await?.context("no push")?;
    rows.push((
        format!("SDS push after an entry change, after {QUIET:?} without changes (server change notice → agent sync → re-mint → push)"),
        ms(t.elapsed()),
        format!("without the notice: up to one poll interval ({SYNC})"),
    ));

    // 1,000 SDS streams on 10 connections; then a bundle change pushed to all of them.
    let mut streams = Vec::with_capacity(N);
    let mut senders = Vec::with_capacity(N);
    for conn in 0..10 {
        let ch = uds(mesh.socket.clone()).await?;
        for k in 0..N / 10 {
            let i = conn * (N / 10) + k;
            let mut c = SecretDiscoveryServiceClient::new(ch.clone());
            let (tx, rx) = tokio::sync::mpsc::channel(2);
            tx.send(DiscoveryRequest {
                resource_names: vec![format!("spiffe://example.org/bench/{i}"), "ROOTCA".into()],
                type_url: SECRET_TYPE.into(),
                ..Default::default()
            })
            .await?;
            let mut s = c.stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
            let r = s.message().await?.context("no answer")?;
            tx.send(DiscoveryRequest {
                resource_names: vec![format!("spiffe://example.org/bench/{i}"), "ROOTCA".into()],
                type_url: SECRET_TYPE.into(),
                response_nonce: r.nonce,
                version_info: r.version_info,
                ..Default::default()
            })
            .await?;
            streams.push(s);
            senders.push(tx);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_streams = rss_kib(agent_pid)?;
    rows.push((
        format!("agent RSS with {N} SVIDs and {N} open SDS streams"),
        format!("{:.1} MiB", rss_streams as f64 / 1024.0),
        "target ≤ 20 MiB".into(),
    ));
    tokio::time::sleep(QUIET).await;
    let t = Instant::now();
    adm.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await?;
    let mut waits = Vec::with_capacity(N);
    for s in streams.iter_mut() {
        waits.push(async move { s.message().await });
    }
    let mut last = Duration::ZERO;
    for w in waits {
        w.await?.context("stream ended")?;
        last = t.elapsed();
    }
    rows.push((
        format!("bundle change pushed to all {N} SDS streams, after {QUIET:?} without changes (from the Admin API call: notice, sync, push)"),
        ms(last),
        "target < 100 ms".into(),
    ));
    drop(senders);

    // A real Envoy: start to ready with its certificate over SDS, against the same Envoy
    // reading the same certificate from files.
    let mut wc = tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
        uds(mesh.socket.clone()).await?,
    );
    let mut req = tonic::Request::new(tessera_proto::workload::X509svidRequest {});
    req.metadata_mut().insert("workload.spiffe.io", tonic::metadata::MetadataValue::from_static("true"));
    let x = wc.fetch_x509svid(req).await?.into_inner().message().await?.context("no SVID")?;
    let s0 = x.svids.first().context("no SVID")?;
    let d = mesh.dir.path().to_owned();
    let chain =
        tessera_identity::pem::decode_certs(tessera_identity::pem::encode_certs([s0.x509_svid.as_slice()]).as_bytes());
    std::fs::write(
        d.join("cert.pem"),
        tessera_identity::pem::encode_certs(chain.iter().flatten().map(|c| c.as_ref())),
    )?;
    std::fs::write(
        d.join("key.pem"),
        tessera_identity::PrivateKey::from_pkcs8_der(s0.x509_svid_key.clone()).to_pem().as_bytes(),
    )?;
    let sock = mesh.socket.clone();
    let sds_id = s0.spiffe_id.clone();
    let with_sds = envoy_start_to_ready(&d, "envoy-sds", |admin, port| {
        let sds = serde_json::json!({"resource_api_version": "V3", "api_config_source": {"api_type": "GRPC", "transport_api_version": "V3", "grpc_services": [{"envoy_grpc": {"cluster_name": "tessera_agent"}}]}});
        envoy_config(
            admin,
            port,
            &sock,
            serde_json::json!({
                "tls_certificate_sds_secret_configs": [{"name": sds_id, "sds_config": sds}],
                "validation_context_sds_secret_config": {"name": "ALL", "sds_config": sds}
            }),
        )
    })?;
    let (certf, keyf) = (d.join("cert.pem"), d.join("key.pem"));
    let with_files = envoy_start_to_ready(&d, "envoy-files", |admin, port| {
        envoy_config(
            admin,
            port,
            &sock,
            serde_json::json!({
                "tls_certificates": [{"certificate_chain": {"filename": certf}, "private_key": {"filename": keyf}}]
            }),
        )
    })?;
    rows.push((
        "real Envoy 1.40: start → ready with certificate and validation context over SDS (median of 5)".into(),
        ms(with_sds),
        format!("same Envoy, certificate from files: {}", ms(with_files)),
    ));

    println!("| figure | measured | reference (same run) |\n|---|---|---|");
    for (a, b, c) in rows {
        println!("| {a} | {b} | {c} |");
    }
    Ok(())
}
