//! `tessera-bench-storm`: a rollout storm on the Istio CA API, as a restart of many
//! deployments sends it, next to the same certificates asked for calmly in the same run.
//!
//! Run: `cargo build --release --bins && target/release/tessera-bench-storm`
//! (`--binaries DIR` measures the server in DIR; `--connections N`, `--calls N` per
//! connection, `--bad-percent P`).
//!
//! - **calm**: 64 connections, requests back to back, until the same number of certificates
//!   as the storm has been issued: the reference.
//! - **istio-agent storm**: N connections (default 1,000), each opened at its own moment within
//!   one second, each sending its calls (default 10) at once. Each connection is a pod: its
//!   own source address on loopback (127.1.x.y), its own service-account token, TLS with the
//!   host name checked, one PEM CSR per call, and istio-agent's retry policy (5 attempts,
//!   backoff 100 ms doubling with 10 % jitter, on Canceled, DeadlineExceeded,
//!   ResourceExhausted, Aborted, Internal and Unavailable).
//! - **the same storm with bad requests mixed in** (`--bad-percent`, default 5): forged tokens,
//!   garbage CSRs and oversized messages, each sent once; their codes are reported, and the
//!   good requests' figures stand next to those of the clean storm.
//! - **ztunnel storm**: N/10 nodes, each with a ztunnel (one connection, one node token) asking
//!   for the certificates of the 100 workloads on its node by impersonation, all at once.
//!
//! The server runs with its default limits. Its tokens are validated offline against the
//! cluster's JWKS; impersonation is checked against the API server, which is the test
//! suite's fake Kubernetes API server (`tessera_test_util::fake_k8s`, the real JSON shapes),
//! running in this process: its CPU is in the load generator's figure. At the end the audit
//! chain is verified (`tessera-server audit verify`).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use prost_types::value::Kind;
use tessera_identity::{PrivateKey, SpiffeId};
use tessera_proto::istio::v1::auth::IstioCertificateRequest;
use tessera_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
use tessera_test_util::fake_k8s::{FakeCluster, pod};
use tessera_test_util::procfs::{cpu_secs, rss_kib};
use tessera_test_util::{ServerProc, free_port};
use tonic::Code;

const TD: &str = "cluster.local";
const HOST: &str = "istiod.istio-system.svc";
const WORKLOADS_PER_NODE: usize = 100;
const CALM_CLIENTS: usize = 64;
/// istio-agent's `caclient.RetryOptions`: 5 attempts, 100 ms doubling, 10 % jitter.
const ATTEMPTS: u32 = 5;
const GIVE_UP: Duration = Duration::from_secs(120);

type Client = IstioCertificateServiceClient<tonic::transport::Channel>;

/// What one call ended with, after its retries.
struct Outcome {
    /// From the first attempt to the final answer.
    latency: Duration,
    /// Final code (Ok when a certificate came back).
    code: Code,
    attempts: u32,
    /// Codes of the attempts that were retried.
    retried: Vec<Code>,
    bad: Option<Bad>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bad {
    ForgedToken,
    GarbageCsr,
    Oversized,
}

impl Bad {
    fn name(self) -> &'static str {
        match self {
            Bad::ForgedToken => "forged token",
            Bad::GarbageCsr => "garbage CSR",
            Bad::Oversized => "oversized message (80 KiB CSR)",
        }
    }
}

/// One call as the load generator sends it.
#[derive(Clone)]
struct Call {
    token: Arc<str>,
    csr: Arc<str>,
    impersonate: Option<Arc<str>>,
    bad: Option<Bad>,
}

fn retryable(c: Code) -> bool {
    matches!(
        c,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Internal
            | Code::Unavailable
    )
}

/// grpc-go reports a connection that could not be made as Unavailable; tonic's lazy channel
/// reports it as Unknown with the transport error as its source.
fn grpc_go_code(s: &tonic::Status) -> Code {
    if s.code() == Code::Unknown && s.message().contains("transport error") { Code::Unavailable } else { s.code() }
}

/// 0..1, from a counter: deterministic jitter without a random source.
fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as f64 / u64::MAX as f64
}

async fn attempt(client: &mut Client, call: &Call) -> Result<(), tonic::Status> {
    let mut metadata = None;
    if let Some(i) = &call.impersonate {
        let mut fields = BTreeMap::new();
        fields.insert(
            "ImpersonatedIdentity".to_owned(),
            prost_types::Value { kind: Some(Kind::StringValue(i.to_string())) },
        );
        metadata = Some(prost_types::Struct { fields });
    }
    let mut req =
        tonic::Request::new(IstioCertificateRequest { csr: call.csr.to_string(), validity_duration: 0, metadata });
    let bearer = format!("Bearer {}", call.token).parse().map_err(|_| tonic::Status::internal("token header"))?;
    req.metadata_mut().insert("authorization", bearer);
    req.metadata_mut().insert("clusterid", tonic::metadata::MetadataValue::from_static("storm"));
    let r = client.create_certificate(req).await?.into_inner();
    if r.cert_chain.len() < 2 {
        return Err(tonic::Status::internal("short chain"));
    }
    Ok(())
}

/// One call with istio-agent's retry policy; a bad call is sent once.
async fn call_with_retries(mut client: Client, call: Call, seed: u64) -> Outcome {
    let start = Instant::now();
    let mut retried = Vec::new();
    let mut n = 0;
    loop {
        n += 1;
        let code =
            match tokio::time::timeout(GIVE_UP.saturating_sub(start.elapsed()), attempt(&mut client, &call)).await {
                Ok(Ok(())) => Code::Ok,
                Ok(Err(s)) => grpc_go_code(&s),
                Err(_) => Code::DeadlineExceeded,
            };
        if code == Code::Ok || call.bad.is_some() || !retryable(code) || n >= ATTEMPTS || start.elapsed() >= GIVE_UP {
            return Outcome { latency: start.elapsed(), code, attempts: n, retried, bad: call.bad };
        }
        retried.push(code);
        let base = 100.0 * f64::from(1u32 << (n - 1));
        let jitter = 1.0 + 0.1 * (2.0 * unit(seed * 8 + u64::from(n)) - 1.0);
        tokio::time::sleep(Duration::from_secs_f64(base * jitter / 1000.0)).await;
    }
}

/// A lazily connected channel as istio-agent opens it: TLS to HOST from the source address
/// `src` (a pod's own address), verified against `roots`.
fn channel(addr: SocketAddr, src: IpAddr, roots: &rustls::RootCertStore) -> Result<Client> {
    let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots.clone()).with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let ch = tonic::transport::Endpoint::from_static("https://istiod.istio-system.svc:15012")
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let sock = tokio::net::TcpSocket::new_v4()?;
                sock.bind(SocketAddr::new(src, 0))?;
                let tcp = sock.connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(HOST).map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(TokioIo::new(connector.connect(name, tcp).await?))
            }
        }));
    Ok(IstioCertificateServiceClient::new(ch).max_decoding_message_size(1 << 20))
}

/// The source address of connection `c`: 127.1.0.1 onwards, one per pod.
fn source(c: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (c / 250) as u8, (c % 250 + 1) as u8))
}

struct Figures {
    name: String,
    calls: usize,
    last: Duration,
    outcomes: Vec<Outcome>,
    server_cpu: f64,
    client_cpu: f64,
    peak_rss_kib: u64,
    rss0_kib: u64,
}

/// Samples the server's RSS every 20 ms until `stop` is set; returns the peak.
fn rss_sampler(pid: u32, stop: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut peak = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            peak = peak.max(rss_kib(pid).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        peak
    })
}

/// Runs `conns` connections, each opened at its moment within `spread` and sending its
/// `calls` at once.
async fn storm(
    name: &str,
    server: u32,
    addr: SocketAddr,
    roots: &rustls::RootCertStore,
    plan: Vec<Vec<Call>>,
    spread: Duration,
) -> Result<Figures> {
    let stop = Arc::new(AtomicU64::new(0));
    let rss0_kib = rss_kib(server)?;
    let sampler = rss_sampler(server, stop.clone());
    let (s0, c0) = (cpu_secs(server)?, cpu_secs(std::process::id())?);
    let conns = plan.len();
    let calls: usize = plan.iter().map(Vec::len).sum();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, calls) in plan.into_iter().enumerate() {
        let client = channel(addr, source(c), roots)?;
        let at = spread.mul_f64(c as f64 / conns as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(start + at)).await;
            let mut set = tokio::task::JoinSet::new();
            for (j, call) in calls.into_iter().enumerate() {
                set.spawn(call_with_retries(client.clone(), call, (c * 1000 + j) as u64));
            }
            let mut out = Vec::new();
            while let Some(o) = set.join_next().await {
                out.push((o?, start.elapsed()));
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut outcomes = Vec::with_capacity(calls);
    let mut last = Duration::ZERO;
    while let Some(r) = tasks.join_next().await {
        for (o, done) in r?? {
            if o.code == Code::Ok {
                last = last.max(done);
            }
            outcomes.push(o);
        }
    }
    let (server_cpu, client_cpu) = (cpu_secs(server)? - s0, cpu_secs(std::process::id())? - c0);
    stop.store(1, Ordering::Relaxed);
    let peak_rss_kib = sampler.await?;
    Ok(Figures { name: name.into(), calls, last, outcomes, server_cpu, client_cpu, peak_rss_kib, rss0_kib })
}

/// The reference: the same calls from CALM_CLIENTS connections, back to back, no storm.
async fn calm(server: u32, addr: SocketAddr, roots: &rustls::RootCertStore, plan: Vec<Vec<Call>>) -> Result<Figures> {
    let all: Vec<Call> = plan.into_iter().flatten().collect();
    let calls = all.len();
    let all = Arc::new(all);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let rss0_kib = rss_kib(server)?;
    let sampler = rss_sampler(server, stop.clone());
    let (s0, c0) = (cpu_secs(server)?, cpu_secs(std::process::id())?);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CALM_CLIENTS {
        let (client, all, next) = (channel(addr, source(c), roots)?, all.clone(), next.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some(call) = all.get(i) else { break };
                out.push(call_with_retries(client.clone(), call.clone(), i as u64).await);
            }
            out
        });
    }
    let mut outcomes = Vec::with_capacity(calls);
    while let Some(r) = tasks.join_next().await {
        outcomes.extend(r?);
    }
    let last = start.elapsed();
    let (server_cpu, client_cpu) = (cpu_secs(server)? - s0, cpu_secs(std::process::id())? - c0);
    stop.store(1, Ordering::Relaxed);
    let peak_rss_kib = sampler.await?;
    Ok(Figures {
        name: format!("calm: {CALM_CLIENTS} connections, back to back"),
        calls,
        last,
        outcomes,
        server_cpu,
        client_cpu,
        peak_rss_kib,
        rss0_kib,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted.get(((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1))).copied().unwrap_or_default()
}

fn row(f: &Figures, reference: Option<&Figures>) {
    let good: Vec<&Outcome> = f.outcomes.iter().filter(|o| o.bad.is_none()).collect();
    let ok = good.iter().filter(|o| o.code == Code::Ok).count();
    let failed = good.len() - ok;
    let mut lat: Vec<Duration> = good.iter().filter(|o| o.code == Code::Ok).map(|o| o.latency).collect();
    lat.sort();
    let retried = good.iter().filter(|o| o.attempts > 1).count();
    let mut codes = BTreeMap::new();
    for o in &good {
        for c in &o.retried {
            *codes.entry(format!("{c:?}")).or_insert(0usize) += 1;
        }
    }
    let codes = if codes.is_empty() {
        "none".to_owned()
    } else {
        codes.iter().map(|(c, n)| format!("{c} {n}")).collect::<Vec<_>>().join(", ")
    };
    let vs =
        reference.map(|r| format!(" ({:.2}× calm)", f.last.as_secs_f64() / r.last.as_secs_f64())).unwrap_or_default();
    println!(
        "| {} | {} | {}{} | {} | {} / {} / {} | {} calls retried (attempts refused: {}) | {:.0} µs / {:.0} µs | {:.1} → {:.1} MiB |",
        f.name,
        good.len(),
        ms(f.last),
        vs,
        failed,
        ms(quantile(&lat, 0.5)),
        ms(quantile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
        retried,
        codes,
        f.server_cpu * 1e6 / ok.max(1) as f64,
        f.client_cpu * 1e6 / ok.max(1) as f64,
        f.rss0_kib as f64 / 1024.0,
        f.peak_rss_kib as f64 / 1024.0,
    );
}

fn bad_rows(f: &Figures) -> Vec<String> {
    let mut by: BTreeMap<(Bad, String), usize> = BTreeMap::new();
    for o in &f.outcomes {
        if let Some(b) = o.bad {
            *by.entry((b, format!("{:?}", o.code))).or_insert(0) += 1;
        }
    }
    by.iter().map(|((b, c), n)| format!("| {} | {n} | {c} |", b.name())).collect()
}

struct Args {
    conns: usize,
    calls: usize,
    bad_percent: usize,
}

fn args() -> Result<Args> {
    let mut a = Args { conns: 1000, calls: 10, bad_percent: 5 };
    let mut it = std::env::args().skip(1);
    let usage = "usage: tessera-bench-storm [--binaries DIR] [--connections N] [--calls N] [--bad-percent P]";
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value: {usage}"));
        match arg.as_str() {
            "--binaries" => tessera_test_util::bench::use_binaries_arg(&value()?)?,
            "--connections" => a.conns = value()?.parse()?,
            "--calls" => a.calls = value()?.parse()?,
            "--bad-percent" => a.bad_percent = value()?.parse()?,
            other => bail!("unknown argument {other}: {usage}"),
        }
    }
    anyhow::ensure!((10..=60_000).contains(&a.conns), "--connections must be 10 to 60000");
    anyhow::ensure!((1..=1000).contains(&a.calls), "--calls must be 1 to 1000");
    anyhow::ensure!(a.bad_percent <= 50, "--bad-percent must be 0 to 50");
    Ok(a)
}

fn pem_csr(id: &SpiffeId) -> Result<Arc<str>> {
    let key = PrivateKey::generate_ec_p256()?;
    Ok(tessera_identity::pem::encode("CERTIFICATE REQUEST", &tessera_identity::csr::build_csr(id, &[], &key)?).into())
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = args()?;
    let nodes = (a.conns / 10).max(1);

    // The cluster: `nodes` nodes, each with a ztunnel and 100 workloads (service accounts
    // w-0..w-99 in namespace storm), and one pod per istio-agent connection.
    let k8s = FakeCluster::start("https://kubernetes.default.svc.cluster.local");
    k8s.add_namespace("storm");
    k8s.add_namespace("istio-system");
    for n in 0..nodes {
        k8s.add_node(&format!("node-{n}"), &format!("node-uid-{n}"), &[]);
        k8s.add_pod(pod(
            "istio-system",
            &format!("ztunnel-{n}"),
            &format!("zt-uid-{n}"),
            "ztunnel",
            &format!("node-{n}"),
        ));
        for w in 0..WORKLOADS_PER_NODE {
            k8s.add_pod(pod(
                "storm",
                &format!("w{w}-{n}"),
                &format!("uid-{n}-{w}"),
                &format!("w-{w}"),
                &format!("node-{n}"),
            ));
        }
    }
    for c in 0..a.conns {
        k8s.add_pod(pod("storm", &format!("agent-{c}"), &format!("agent-uid-{c}"), &format!("sa-{c}"), "node-0"));
    }
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("storm.kubeconfig");
    k8s.write_kubeconfig(&kubeconfig, "storm");
    std::fs::write(dir.path().join("jwks.json"), k8s.jwks())?;
    let port = free_port();
    let extra = format!(
        "\n[istio]\naddress = \"127.0.0.1:{port}\"\ndns_names = [\"{HOST}\"]\ntrusted_node_accounts = [\"istio-system/ztunnel\"]\n[[istio.clusters]]\ncluster_id = \"storm\"\nkubeconfig = \"{}\"\njwks_path = \"{}\"\nissuer = \"{}\"\n",
        kubeconfig.display(),
        dir.path().join("jwks.json").display(),
        k8s.issuer
    );
    let server = ServerProc::start_in(dir.path(), TD, "ca_ttl = \"96h\"", &extra);
    let pid = server.child.as_ref().context("server pid")?.id();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let mut roots = rustls::RootCertStore::empty();
    let bundle = server.cli_ok(&["bundle", "show"]);
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(bundle.as_bytes()) {
        let c: rustls::pki_types::CertificateDer<'static> = c?;
        roots.add(c)?;
    }
    anyhow::ensure!(!roots.is_empty(), "bundle show printed no certificate");

    // istio-agent plans: connection c is pod agent-c (service account sa-c), `calls` CSRs.
    let mut agent_plan = Vec::with_capacity(a.conns);
    for c in 0..a.conns {
        let token: Arc<str> =
            k8s.token("storm", &format!("sa-{c}"), Some(&format!("agent-{c}")), &["istio-ca"], 3600).into();
        let id = SpiffeId::new(format!("spiffe://{TD}/ns/storm/sa/sa-{c}"))?;
        let csr = pem_csr(&id)?;
        agent_plan.push(
            (0..a.calls)
                .map(|_| Call { token: token.clone(), csr: csr.clone(), impersonate: None, bad: None })
                .collect::<Vec<_>>(),
        );
    }
    // The same with bad calls in place of every (100 / bad_percent)th good one.
    let forged: Arc<str> = k8s.forged_token("storm", "sa-0", Some("agent-0"), &["istio-ca"]).into();
    let garbage: Arc<str> =
        "-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgQ1NS\n-----END CERTIFICATE REQUEST-----\n".into();
    let oversized: Arc<str> = "A".repeat(80 * 1024).into();
    let mut mixed_plan = agent_plan.clone();
    if let Some(every) = 100usize.checked_div(a.bad_percent) {
        let mut k = 0usize;
        for (c, calls) in mixed_plan.iter_mut().enumerate() {
            for (j, call) in calls.iter_mut().enumerate() {
                if (c * a.calls + j) % every == every - 1 {
                    let bad = [Bad::ForgedToken, Bad::GarbageCsr, Bad::Oversized][k % 3];
                    k += 1;
                    call.bad = Some(bad);
                    match bad {
                        Bad::ForgedToken => call.token = forged.clone(),
                        Bad::GarbageCsr => call.csr = garbage.clone(),
                        Bad::Oversized => call.csr = oversized.clone(),
                    }
                }
            }
        }
    }
    // ztunnel plans: node n's ztunnel asks for its 100 workloads.
    let mut zt_plan = Vec::with_capacity(nodes);
    for n in 0..nodes {
        let token: Arc<str> =
            k8s.token("istio-system", "ztunnel", Some(&format!("ztunnel-{n}")), &["istio-ca"], 3600).into();
        let mut calls = Vec::with_capacity(WORKLOADS_PER_NODE);
        for w in 0..WORKLOADS_PER_NODE {
            let id = SpiffeId::new(format!("spiffe://{TD}/ns/storm/sa/w-{w}"))?;
            calls.push(Call {
                token: token.clone(),
                csr: pem_csr(&id)?,
                impersonate: Some(id.to_string().into()),
                bad: None,
            });
        }
        zt_plan.push(calls);
    }

    let calm_fig = calm(pid, addr, &roots, agent_plan.clone()).await?;
    let storm_fig = storm(
        &format!("istio-agent storm: {} connections × {} calls within 1 s", a.conns, a.calls),
        pid,
        addr,
        &roots,
        agent_plan,
        Duration::from_secs(1),
    )
    .await?;
    let mixed_fig = storm(
        &format!("the same storm, {} % bad requests in place of good ones", a.bad_percent),
        pid,
        addr,
        &roots,
        mixed_plan,
        Duration::from_secs(1),
    )
    .await?;
    let zt_fig = storm(
        &format!("ztunnel storm: {nodes} nodes × {WORKLOADS_PER_NODE} impersonated workloads within 1 s"),
        pid,
        addr,
        &roots,
        zt_plan,
        Duration::from_secs(1),
    )
    .await?;
    let verify = server.cli(&["audit", "verify"]);

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("## Rollout storm on the Istio CA API ({cores} cores, server with its default limits)\n");
    println!(
        "| run | good calls | until the last certificate | failed after retries | p50 / p99 / max | retries | server / load-generator CPU per certificate | server RSS: before → peak |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    row(&calm_fig, None);
    row(&storm_fig, Some(&calm_fig));
    row(&mixed_fig, Some(&calm_fig));
    row(&zt_fig, None);
    let bad = bad_rows(&mixed_fig);
    if !bad.is_empty() {
        println!("\n| bad request (sent once) | count | code |");
        println!("|---|---|---|");
        for r in bad {
            println!("{r}");
        }
    }
    println!(
        "\n`tessera-server audit verify` after all runs: {} ({})",
        if verify.status.success() { "passes" } else { "FAILS" },
        String::from_utf8_lossy(if verify.status.success() { &verify.stdout } else { &verify.stderr }).trim()
    );
    println!(
        "\n({} calls per run; {} + {} + {} = {} certificates expected in all)",
        calm_fig.calls,
        storm_fig.calls,
        mixed_fig.calls,
        zt_fig.calls,
        calm_fig.calls + storm_fig.calls + mixed_fig.calls + zt_fig.calls
    );
    let failed: usize = [&calm_fig, &storm_fig, &mixed_fig, &zt_fig]
        .iter()
        .map(|f| f.outcomes.iter().filter(|o| o.bad.is_none() && o.code != Code::Ok).count())
        .sum();
    if failed > 0 || !verify.status.success() {
        bail!("{failed} good calls failed after their retries, or the audit chain did not verify");
    }
    Ok(())
}
