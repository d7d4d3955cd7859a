//! `tessera-bench-server`: the server's signing throughput and latency at 1, 16 and 64
//! concurrent clients, next to cfssl (`cfssl serve`, ECDSA P-256 CA, the same CSR pool, the
//! same concurrency and the same load-generator design: one connection per client, requests
//! back to back) and to the crypto limit (ring's P-256 CSR verify + certificate signature
//! rate on one core × the cores), all measured in the same run. Also the cold start of the
//! server and the agent to ready. Prints a Markdown table.
//!
//! Run: `cargo build --release --bins && target/release/tessera-bench-server`.
//! `--binaries DIR` measures the server and agent in DIR instead of this build's: for example
//! the static musl `dist` pair that the images ship (docs/performance.md).
//!
//! Each Tessera request is an Agent API `BatchNewX509Svid` with one CSR over mTLS: CSR check,
//! signature, and a durable (fsynced) audit record before the answer. Each Istio CA API
//! request is a `CreateCertificate` as istio-agent sends it (TLS, a service-account token
//! validated offline against the cluster's JWKS, a PEM CSR), with the same checks and audit.
//! Each cfssl request is a `POST /api/v1/cfssl/sign` with the same CSR (cfssl keeps no audit
//! log).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tessera_identity::tls::Authorize;
use tessera_identity::{PrivateKey, SpiffeId};
use tessera_proto::admin::v1 as admin;
use tessera_proto::agent::v1 as agent;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tessera_proto::istio::v1::auth::IstioCertificateRequest;
use tessera_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tessera_proto::types::v1 as types;
use tessera_test_util::procfs::{cpu_secs, rss_kib};
use tessera_test_util::{Mesh, Proc, free_port};

const POOL: usize = 256;
const SYNC_AGENTS: usize = 1000;
const SYNC_ENTRIES_PER_AGENT: usize = 10;
const SYNC_EVERY: Duration = Duration::from_secs(5);
const SYNC_WINDOW: Duration = Duration::from_secs(20);
const LEVELS: [usize; 3] = [1, 16, 64];
const RUN: Duration = Duration::from_secs(4);

struct Stats {
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// CPU time per request of the serving process and of this load generator, µs.
    server_us: f64,
    client_us: f64,
}

fn stats(mut lat: Vec<Duration>, elapsed: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied();
    Stats {
        rate: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50).unwrap_or_default(),
        p99: pick(0.99).unwrap_or_default(),
        server_us: 0.0,
        client_us: 0.0,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// ring's rate of CSR verify + leaf signature on one core, per second.
fn crypto_rate(csrs: &[Vec<u8>], id: &SpiffeId) -> Result<f64> {
    let ca_key = PrivateKey::generate_ec_p256()?.to_rcgen()?;
    let issuer = rcgen::Issuer::new(tessera_identity::x509::ca_params(id.trust_domain(), 0, 7200, [2; 16])?, &ca_key);
    let start = Instant::now();
    let mut n = 0usize;
    while start.elapsed() < Duration::from_secs(2) {
        let csr = tessera_identity::csr::CheckedCsr::from_der(&csrs[n % csrs.len()])?;
        let spec = tessera_identity::x509::LeafSpec {
            spiffe_id: id,
            dns_names: &[],
            rsa_key: false,
            not_before: 0,
            not_after: 3600,
            issuer_not_after: 7200,
            serial: [1; 16],
            renewal_grant: None,
        };
        tessera_identity::x509::leaf_params(&spec)?.signed_by(csr.public_key(), &issuer)?;
        n += 1;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Runs `clients` loops for RUN; each loop calls `one(client index, request index)`.
/// A channel as istio-agent opens it: TLS to `host`, verified against `roots` (Web PKI rules).
async fn istio_channel(
    addr: &str,
    roots: &[rustls::pki_types::CertificateDer<'static>],
    host: &'static str,
) -> Result<tonic::transport::Channel> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(store).with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let target = addr.to_owned();
    Ok(tonic::transport::Endpoint::from_static("https://tessera.bench:15012")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, target) = (connector.clone(), target.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(target.as_str()).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(host).map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }))
        .await?)
}

/// `server` is the serving process, whose CPU time per request is measured along with ours.
async fn load<F, Fut>(server: u32, clients: usize, one: F) -> Result<Stats>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let one = Arc::new(one);
    let (server0, client0) = (cpu_secs(server)?, cpu_secs(std::process::id())?);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let one = one.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c;
            while start.elapsed() < RUN {
                let t = Instant::now();
                one(c, i).await?;
                lat.push(t.elapsed());
                i += clients;
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let n = all.len().max(1) as f64;
    let mut s = stats(all, start.elapsed());
    s.server_us = (cpu_secs(server)? - server0) * 1e6 / n;
    s.client_us = (cpu_secs(std::process::id())? - client0) * 1e6 / n;
    Ok(s)
}

/// A cfssl CA (ECDSA P-256, made by cfssl) served by `cfssl serve`.
fn start_cfssl(dir: &Path) -> Result<(Proc, u16)> {
    std::fs::write(dir.join("ca-csr.json"), r#"{"CN": "bench root", "key": {"algo": "ecdsa", "size": 256}}"#)?;
    let out = Command::new("cfssl").args(["gencert", "-initca"]).arg(dir.join("ca-csr.json")).output()?;
    if !out.status.success() {
        bail!("cfssl gencert: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    std::fs::write(dir.join("ca.pem"), v["cert"].as_str().context("cert")?)?;
    std::fs::write(dir.join("ca-key.pem"), v["key"].as_str().context("key")?)?;
    std::fs::write(
        dir.join("config.json"),
        r#"{"signing": {"default": {"expiry": "1h", "usages": ["digital signature", "key encipherment", "server auth", "client auth"]}}}"#,
    )?;
    let port = free_port();
    let mut cmd = Command::new("cfssl");
    cmd.args(["serve", "-address", "127.0.0.1", "-port", &port.to_string(), "-loglevel", "5"])
        .arg(format!("-ca={}", dir.join("ca.pem").display()))
        .arg(format!("-ca-key={}", dir.join("ca-key.pem").display()))
        .arg(format!("-config={}", dir.join("config.json").display()));
    let mut p = Proc::spawn(cmd, dir.join("cfssl.log"));
    p.wait_until(30, "cfssl serve", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    Ok((p, port))
}

type CfsslConn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn cfssl_conn(port: u16) -> Result<CfsslConn> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn cfssl_sign(conn: &tokio::sync::Mutex<CfsslConn>, port: u16, body: Bytes) -> Result<()> {
    let mut c = conn.lock().await;
    c.ready().await?;
    let req = hyper::Request::post("/api/v1/cfssl/sign")
        .header(hyper::header::HOST, format!("127.0.0.1:{port}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let resp = c.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let ok = serde_json::from_slice::<serde_json::Value>(&bytes).is_ok_and(|v| v["success"] == true);
    if status != 200 || !ok {
        bail!("cfssl: {status} {}", String::from_utf8_lossy(&bytes));
    }
    Ok(())
}

struct SyncFigures {
    cpu_share: f64,
    syncs: usize,
    full_bytes: f64,
    unchanged_bytes: f64,
    /// Server RSS growth with every agent holding a `WatchChanges` stream, KiB.
    watch_rss_kib: i64,
    /// One entry change: the agents woken (only the one it concerns, when notices are
    /// targeted), until that agent synced, and the server CPU it took.
    woken: usize,
    targeted: Duration,
    targeted_cpu: f64,
    /// A bundle change: until every agent has its notice and has synced, and the server CPU
    /// that took.
    fanout: Duration,
    fanout_cpu: f64,
}

/// 1,000 simulated agents with 10 entries each (10,000 entries) syncing every 5 s over mTLS:
/// the server's CPU share during the window and the bytes per sync (protobuf payload).
async fn entry_sync(
    adm: &mut tessera_proto::admin::v1::admin_client::AdminClient<tonic::transport::Channel>,
    addr: &str,
    roots: &[rustls::pki_types::CertificateDer<'static>],
    server_id: &SpiffeId,
    server_pid: u32,
) -> Result<SyncFigures> {
    use prost::Message;
    let anon = tessera_identity::tls::client_config(roots, Authorize::Id(server_id.clone()), None)?;
    let mut anon = AgentClient::new(tessera_svc::connect::tls(addr, anon).await?);
    let mut clients = Vec::with_capacity(SYNC_AGENTS);
    let mut first_agent = None;
    for a in 0..SYNC_AGENTS {
        let (id, key, chain) = tessera_test_util::bench::attest_new_agent(adm, &mut anon).await?;
        first_agent.get_or_insert_with(|| id.clone());
        for e in 0..SYNC_ENTRIES_PER_AGENT {
            adm.create_entry(admin::CreateEntryRequest {
                entry: Some(types::Entry {
                    spiffe_id: format!("spiffe://example.org/sync/{a}/{e}"),
                    parent_id: id.to_string(),
                    selectors: vec![types::Selector { r#type: "unix".into(), value: format!("uid:{e}") }],
                    ..Default::default()
                }),
            })
            .await?;
        }
        let tls = tessera_identity::tls::client_config(roots, Authorize::Id(server_id.clone()), Some((chain, &key)))?;
        clients.push(AgentClient::new(tessera_svc::connect::tls(addr, tls).await?));
    }
    // First (full) syncs, then the window of periodic incremental syncs.
    let mut revisions = Vec::with_capacity(SYNC_AGENTS);
    let mut full = 0usize;
    for c in &mut clients {
        let r =
            c.sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() }).await?.into_inner();
        full += r.encoded_len();
        revisions.push(r.revision);
    }
    let cpu0 = cpu_secs(server_pid)?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (i, (c, rev)) in clients.iter().cloned().zip(revisions.iter().copied()).enumerate() {
        // Spread the agents over the period, as real ones drift apart.
        let offset = SYNC_EVERY.mul_f64(i as f64 / SYNC_AGENTS as f64);
        tasks.push(tokio::spawn(tessera_test_util::bench::periodic_syncs(c, rev, t0, offset, SYNC_EVERY, SYNC_WINDOW)));
    }
    let (mut syncs, mut bytes) = (0usize, 0usize);
    for t in tasks {
        let (n, b) = t.await??;
        syncs += n;
        bytes += b;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_secs(server_pid)? - cpu0;

    // Change notices: every agent holds a WatchChanges stream. One entry change wakes only the
    // agent it concerns (the others are given 2 s to show they were not woken); then a bundle
    // change wakes all of them at once (the herd a notice causes).
    let rss0 = rss_kib(server_pid)?;
    let mut watchers = Vec::with_capacity(SYNC_AGENTS);
    for (mut c, rev) in clients.into_iter().zip(revisions) {
        let mut notices = c.watch_changes(agent::WatchChangesRequest {}).await?.into_inner();
        notices.message().await?.context("no first notice")?;
        watchers.push((c, rev, notices));
    }
    let watch_rss_kib = i64::try_from(rss_kib(server_pid)?).unwrap_or(0) - i64::try_from(rss0).unwrap_or(0);
    let cpu1 = cpu_secs(server_pid)?;
    let t1 = Instant::now();
    adm.create_entry(admin::CreateEntryRequest {
        entry: Some(types::Entry {
            spiffe_id: "spiffe://example.org/sync/fanout".into(),
            parent_id: first_agent.context("no agent")?.to_string(),
            selectors: vec![types::Selector { r#type: "unix".into(), value: "uid:7".into() }],
            ..Default::default()
        }),
    })
    .await?;
    let mut tasks = Vec::with_capacity(SYNC_AGENTS);
    for (mut c, rev, mut notices) in watchers {
        tasks.push(tokio::spawn(async move {
            let woken = match tokio::time::timeout(Duration::from_secs(2), notices.message()).await {
                Ok(m) => {
                    m?.context("watch ended")?;
                    c.sync_entries(agent::SyncEntriesRequest { since_revision: rev, ..Default::default() }).await?;
                    Some(t1.elapsed())
                }
                Err(_) => None,
            };
            Ok::<_, anyhow::Error>((woken, (c, rev, notices)))
        }));
    }
    let (mut targeted, mut woken, mut watchers) = (Duration::ZERO, 0usize, Vec::with_capacity(SYNC_AGENTS));
    for t in tasks {
        let (w, back) = t.await??;
        if let Some(d) = w {
            woken += 1;
            targeted = targeted.max(d);
        }
        watchers.push(back);
    }
    // The 2 s of quiet cost the server nothing: its CPU is the notice and the one sync.
    let targeted_cpu = cpu_secs(server_pid)? - cpu1;
    let cpu2 = cpu_secs(server_pid)?;
    let t2 = Instant::now();
    adm.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await?;
    let mut tasks = Vec::with_capacity(SYNC_AGENTS);
    for (mut c, rev, mut notices) in watchers {
        tasks.push(tokio::spawn(async move {
            notices.message().await?.context("watch ended")?;
            c.sync_entries(agent::SyncEntriesRequest { since_revision: rev, ..Default::default() }).await?;
            Ok::<_, anyhow::Error>(t2.elapsed())
        }));
    }
    let mut fanout = Duration::ZERO;
    for t in tasks {
        fanout = fanout.max(t.await??);
    }
    let fanout_cpu = cpu_secs(server_pid)? - cpu2;
    Ok(SyncFigures {
        cpu_share: cpu / elapsed,
        syncs,
        full_bytes: full as f64 / SYNC_AGENTS as f64,
        unchanged_bytes: bytes as f64 / syncs.max(1) as f64,
        watch_rss_kib,
        woken,
        targeted,
        targeted_cpu,
        fanout,
        fanout_cpu,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--binaries" => {
                tessera_test_util::bench::use_binaries_arg(&args.next().context("--binaries needs a directory")?)?
            }
            other => bail!("unknown argument {other}: usage: tessera-bench-server [--binaries DIR]"),
        }
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let id = SpiffeId::new("spiffe://example.org/bench/w")?;

    // The CSR pool, shared by Tessera, cfssl and the crypto limit.
    let mut csrs = Vec::with_capacity(POOL);
    for _ in 0..POOL {
        let key = PrivateKey::generate_ec_p256()?;
        csrs.push(tessera_identity::csr::build_csr(&id, &[], &key)?);
    }
    let per_core = {
        let (c, i) = (csrs.clone(), id.clone());
        tokio::task::spawn_blocking(move || crypto_rate(&c, &i)).await??
    };
    let limit = per_core * cores as f64;

    // The Istio CA API: one cluster validated offline by its issuer's keys (no API server
    // round trip in the measurement), a token and CSRs for spiffe://example.org/ns/bench/sa/w.
    let k8s = tessera_test_util::fake_k8s::FakeCluster::start("https://kubernetes.default.svc.cluster.local");
    let istio_dir = tempfile::tempdir()?;
    std::fs::write(istio_dir.path().join("jwks.json"), k8s.jwks())?;
    let istio_port = free_port();
    let istio_cfg = format!(
        "\n[istio]\naddress = \"127.0.0.1:{istio_port}\"\ndns_names = [\"tessera.bench\"]\n[[istio.clusters]]\ncluster_id = \"bench\"\njwks_path = \"{}\"\nissuer = \"{}\"\n",
        istio_dir.path().join("jwks.json").display(),
        k8s.issuer
    );
    let sa_token = Arc::new(k8s.token("bench", "w", None, &["istio-ca"], 3600));
    let istio_id = SpiffeId::new("spiffe://example.org/ns/bench/sa/w")?;
    let mut istio_csrs = Vec::with_capacity(POOL);
    for _ in 0..POOL {
        let key = PrivateKey::generate_ec_p256()?;
        istio_csrs.push(tessera_identity::pem::encode(
            "CERTIFICATE REQUEST",
            &tessera_identity::csr::build_csr(&istio_id, &[], &key)?,
        ));
    }
    let istio_csrs = Arc::new(istio_csrs);

    // Cold starts.
    let t = Instant::now();
    // Rate limits off: one load-generator agent signs far above a real agent's rate.
    let mut mesh = Mesh::start_custom("example.org", "ca_ttl = \"96h\"\ndefault_x509_svid_ttl = \"1h\"", "5s", |t| {
        // One load generator on one address: its connections are not the many clients the
        // per-address cap is for.
        t.replace(
            "[server]\n",
            "[server]\nrate_limit_svids_per_second = 0\nrate_limit_attestations_per_minute = 0\nmax_anonymous_connections_per_ip = 4096\nmax_connections_per_agent = 4096\n",
        )
            + &istio_cfg
    });
    let mesh_ready = t.elapsed();
    mesh.server.stop();
    let t = Instant::now();
    mesh.server.spawn();
    let server_restart = t.elapsed();
    let agent_restart = {
        drop(mesh.agent.take());
        let t = Instant::now();
        mesh.start_agent();
        t.elapsed()
    };

    // A bench agent attested in-process, and an entry it may sign for.
    let mut adm = tessera_server::client::connect_admin(&mesh.server.socket).await?;
    let roots = tessera_test_util::bench::roots(&mut adm).await?;
    let server_id = tessera_identity::server_id(id.trust_domain())?;
    let addr = {
        let cfg = std::fs::read_to_string(&mesh.agent_config)?;
        cfg.lines()
            .find(|l| l.starts_with("server_address"))
            .and_then(|l| l.split('"').nth(1))
            .context("server_address")?
            .to_owned()
    };
    let anon = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id.clone()), None)?;
    let mut c = AgentClient::new(tessera_svc::connect::tls(&addr, anon).await?);
    let (agent_id, agent_key, chain) = tessera_test_util::bench::attest_new_agent(&mut adm, &mut c).await?;
    let entry = adm
        .create_entry(admin::CreateEntryRequest {
            entry: Some(types::Entry {
                spiffe_id: id.to_string(),
                parent_id: agent_id.to_string(),
                selectors: vec![types::Selector { r#type: "unix".into(), value: "uid:4242".into() }],
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let csrs = Arc::new(csrs);

    let cfssl_dir = tempfile::tempdir()?;
    let (cfssl_proc, port) = start_cfssl(cfssl_dir.path())?;
    let bodies: Arc<Vec<Bytes>> = Arc::new(
        csrs.iter()
            .map(|c| {
                let pem = tessera_identity::pem::encode("CERTIFICATE REQUEST", c);
                Bytes::from(serde_json::json!({ "certificate_request": pem }).to_string())
            })
            .collect(),
    );

    let server_pid = mesh.server.child.as_ref().context("server pid")?.id();
    let cfssl_pid = cfssl_proc.child.id();
    let mut rows = Vec::new();
    for clients in LEVELS {
        // Tessera: one mTLS channel per client.
        let mut chans = Vec::new();
        for _ in 0..clients {
            let tls = tessera_identity::tls::client_config(
                &roots,
                Authorize::Id(server_id.clone()),
                Some((chain.clone(), &agent_key)),
            )?;
            chans.push(AgentClient::new(tessera_svc::connect::tls(&addr, tls).await?));
        }
        let chans = Arc::new(chans);
        let (cs, eid) = (csrs.clone(), entry.id.clone());
        let tessera = load(server_pid, clients, move |c, i| {
            let (mut client, csr, eid) = (chans[c].clone(), cs[i % cs.len()].clone(), eid.clone());
            async move {
                let r = client
                    .batch_new_x509_svid(agent::BatchNewX509SvidRequest {
                        params: vec![agent::X509SvidParams { entry_id: eid, csr }],
                    })
                    .await?
                    .into_inner();
                match r.results.first().and_then(|x| x.status.as_ref()) {
                    Some(s) if s.code == 0 => Ok(()),
                    other => bail!("signing failed: {other:?}"),
                }
            }
        })
        .await?;

        // Istio CA API: one TLS channel per client, as istio-agent.
        let mut ichans = Vec::new();
        for _ in 0..clients {
            ichans.push(IstioCertificateServiceClient::new(
                istio_channel(&format!("127.0.0.1:{istio_port}"), &roots, "tessera.bench").await?,
            ));
        }
        let ichans = Arc::new(ichans);
        let (ic, tok) = (istio_csrs.clone(), sa_token.clone());
        let istio = load(server_pid, clients, move |c, i| {
            let (mut client, csr, tok) = (ichans[c].clone(), ic[i % ic.len()].clone(), tok.clone());
            async move {
                let mut req =
                    tonic::Request::new(IstioCertificateRequest { csr, validity_duration: 0, metadata: None });
                req.metadata_mut().insert("authorization", format!("Bearer {tok}").parse()?);
                req.metadata_mut().insert("clusterid", "bench".parse()?);
                let r = client.create_certificate(req).await?.into_inner();
                if r.cert_chain.len() < 2 {
                    bail!("short chain");
                }
                Ok(())
            }
        })
        .await?;

        // cfssl: one keep-alive HTTP/1.1 connection per client.
        let mut conns = Vec::new();
        for _ in 0..clients {
            conns.push(tokio::sync::Mutex::new(cfssl_conn(port).await?));
        }
        let conns = Arc::new(conns);
        let b = bodies.clone();
        let cfssl = load(cfssl_pid, clients, move |c, i| {
            let (conns, body) = (conns.clone(), b[i % b.len()].clone());
            async move { cfssl_sign(&conns[c], port, body).await }
        })
        .await?;
        rows.push((clients, tessera, istio, cfssl));
    }

    println!("## Server signing, {} cores, release build, {RUN:?} per level\n", cores);
    println!(
        "crypto limit: {:.0}/s ({:.0}/s per core × {cores}: ring P-256 CSR verify + certificate signature)\n",
        limit, per_core
    );
    println!(
        "| clients | Tessera (Agent API, durable audit) | Tessera (Istio CA API, token, durable audit) | cfssl serve | Agent API ÷ cfssl | Istio ÷ cfssl | Agent API ÷ crypto limit | Istio ÷ crypto limit |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let cell = |s: &Stats| format!("{:.0}/s, p50 {}, p99 {}", s.rate, ms(s.p50), ms(s.p99));
    for (c, t, i, f) in &rows {
        println!(
            "| {c} | {} | {} | {} | {:.2}× | {:.2}× | {:.0} % | {:.0} % |",
            cell(t),
            cell(i),
            cell(f),
            t.rate / f.rate,
            i.rate / f.rate,
            100.0 * t.rate / limit,
            100.0 * i.rate / limit
        );
    }
    println!(
        "\n### CPU time per certificate (µs): serving process, and this load generator; crypto alone is {:.0} µs\n",
        1e6 / per_core
    );
    println!(
        "| clients | Tessera Agent API: server / client | Istio CA API: server / client | cfssl: server / client |"
    );
    println!("|---|---|---|---|");
    let cpu = |s: &Stats| format!("{:.0} / {:.0}", s.server_us, s.client_us);
    for (c, t, i, f) in &rows {
        println!("| {c} | {} | {} | {} |", cpu(t), cpu(i), cpu(f));
    }
    let sync = entry_sync(&mut adm, &addr, &roots, &server_id, server_pid).await?;
    println!();
    println!(
        "## Entry sync: {SYNC_AGENTS} agents × {SYNC_ENTRIES_PER_AGENT} entries, each agent syncing every {SYNC_EVERY:?} for {SYNC_WINDOW:?}\n"
    );
    println!("| figure | measured | target |");
    println!("|---|---|---|");
    println!(
        "| server CPU during the window ({} syncs) | {:.1} % of one core | < 50 % of one core |",
        sync.syncs,
        100.0 * sync.cpu_share
    );
    println!("| bytes per first (full) sync, 10 entries | {:.0} B | — |", sync.full_bytes);
    println!("| bytes per unchanged sync | {:.0} B | O(changes), not O(entries) |", sync.unchanged_bytes);
    println!(
        "| server memory for {SYNC_AGENTS} open change-notice streams | {:.1} MiB | — |",
        sync.watch_rss_kib as f64 / 1024.0
    );
    println!(
        "| one entry change at {SYNC_AGENTS} agents: agents woken, the concerned one synced in | {} woken, synced in {}, server CPU {:.0} ms | 1 (only its agent) |",
        sync.woken,
        ms(sync.targeted),
        sync.targeted_cpu * 1000.0
    );
    println!(
        "| a bundle change: notice to all {SYNC_AGENTS} agents, each then syncs | all synced in {}, server CPU {:.0} ms | — |",
        ms(sync.fanout),
        sync.fanout_cpu * 1000.0
    );
    println!();
    println!("| cold start | measured |");
    println!("|---|---|");
    println!(
        "| server + agent from nothing to the agent's socket answering (fresh data dirs, join token) | {} |",
        ms(mesh_ready)
    );
    println!("| server restart to healthy (existing store and keys) | {} |", ms(server_restart));
    println!("| agent restart to socket ready (persisted SVID, no token) | {} |", ms(agent_restart));
    Ok(())
}
