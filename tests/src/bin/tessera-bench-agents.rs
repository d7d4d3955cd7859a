//! `tessera-bench-agents`: many simulated agents on one server, on sled and on PostgreSQL:
//! the steady state of entry sync with change-notice streams open, one entry change among
//! them, and the resync storm after a server restart.
//!
//! Run: `cargo build --release --bins && target/release/tessera-bench-agents`
//! (`--agents N` (default 10,000), `--entries N` per agent (default 10), `--store
//! sled|postgres|replicas|both|all` (default both: sled and postgres), `--binaries DIR`).
//!
//! `replicas` is two server replicas on one PostgreSQL, the agents spread over both (agent
//! `i` on replica `i % 2`), and only the first replica restarted for the resync storm. Its
//! agents do what `tessera-agent` with `server_addresses` does: a failed attempt moves them to
//! the next replica (`connect_any`). The bench reports where they came back and whether any
//! notice stream on the other replica broke.
//!
//! Each simulated agent is what the server sees of a real one: its own key and agent SVID
//! (join-token attestation), its own mTLS connection, a `WatchChanges` stream held open, and a
//! `SyncEntries` every 5 s (spread over the period) with the revision it last saw. After the
//! server restarts, each one does what `tessera-agent` does (node-agent/src/manager.rs): its
//! notice stream breaks, it waits between half and all of 250 ms doubling per failure (at
//! most the sync interval), opens a new stream, and syncs on its first notice. It never gives up; the bench reports
//! how many attempts the slowest needed.
//!
//! Setup uses the server with its attestation and signing rate limits off (all agents come
//! from one address here); everything measured runs with the server's other defaults. The
//! load generator shares the two cores: its CPU is reported next to the server's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use prost::Message;
use tessera_identity::SpiffeId;
use tessera_identity::tls::Authorize;
use tessera_proto::admin::v1 as admin;
use tessera_proto::agent::v1 as agent;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tessera_proto::types::v1 as types;
use tessera_test_util::bench::periodic_syncs;
use tessera_test_util::procfs::{cpu_secs, rss_kib};
use tessera_test_util::{ServerProc, free_port, server_config};

const SYNC_EVERY: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(20);
/// How many setup calls run at once.
const SETUP_CONCURRENCY: usize = 16;
/// The resync storm is given this long before the bench calls it failed.
const STORM_LIMIT: Duration = Duration::from_secs(180);

/// The `--store` that runs two replicas on one PostgreSQL; also its column's name.
const REPLICAS: &str = "PostgreSQL, 2 replicas";

type Client = AgentClient<tonic::transport::Channel>;
type Admin = admin::admin_client::AdminClient<tonic::transport::Channel>;

struct Args {
    agents: usize,
    entries: usize,
    stores: Vec<&'static str>,
}

fn args() -> Result<Args> {
    let usage = "usage: tessera-bench-agents [--binaries DIR] [--agents N] [--entries N] [--store sled|postgres|replicas|both|all]";
    let mut a = Args { agents: 10_000, entries: 10, stores: vec!["sled", "postgres"] };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value: {usage}"));
        match arg.as_str() {
            "--binaries" => tessera_test_util::bench::use_binaries_arg(&value()?)?,
            "--agents" => a.agents = value()?.parse()?,
            "--entries" => a.entries = value()?.parse()?,
            "--store" => {
                a.stores = match value()?.as_str() {
                    "sled" => vec!["sled"],
                    "postgres" => vec!["postgres"],
                    "replicas" => vec![REPLICAS],
                    "both" => vec!["sled", "postgres"],
                    "all" => vec!["sled", "postgres", REPLICAS],
                    other => bail!("--store {other}: {usage}"),
                }
            }
            other => bail!("unknown argument {other}: {usage}"),
        }
    }
    anyhow::ensure!((10..=15_000).contains(&a.agents), "--agents must be 10 to 15000 (file descriptors)");
    anyhow::ensure!((1..=100).contains(&a.entries), "--entries must be 1 to 100");
    Ok(a)
}

/// Runs `f(i)` for i in 0..n, `SETUP_CONCURRENCY` at a time, results in order.
async fn in_parallel<T, F, Fut>(n: usize, f: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..SETUP_CONCURRENCY.min(n) {
        let (f, next) = (f.clone(), next.clone());
        tasks.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    break;
                }
                out.push((i, f(i).await?));
            }
            Ok::<_, anyhow::Error>(out)
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}

/// One simulated agent: its connection, the revision it last saw, the replica it is
/// connected to and its TLS configuration (to connect to another one).
#[derive(Clone)]
struct Sim {
    client: Client,
    revision: u64,
    replica: usize,
    tls: Arc<rustls::ClientConfig>,
}

/// The server processes' figures over a stretch of time (summed over the replicas).
struct Meter {
    pids: Vec<u32>,
    t0: Instant,
    server0: f64,
    client0: f64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
}

impl Meter {
    fn start(pids: Vec<u32>) -> Result<Self> {
        let (peak, stop) = (Arc::new(AtomicU64::new(rss_sum(&pids)?)), Arc::new(AtomicU64::new(0)));
        let (p, s, ps) = (peak.clone(), stop.clone(), pids.clone());
        tokio::spawn(async move {
            while s.load(Ordering::Relaxed) == 0 {
                p.fetch_max(rss_sum(&ps).unwrap_or(0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Self {
            t0: Instant::now(),
            server0: cpu_sum(&pids)?,
            pids,
            client0: cpu_secs(std::process::id())?,
            peak,
            stop,
        })
    }

    /// (elapsed, server CPU seconds, load-generator CPU seconds, server peak RSS KiB).
    fn stop(self) -> Result<(Duration, f64, f64, u64)> {
        self.stop.store(1, Ordering::Relaxed);
        Ok((
            self.t0.elapsed(),
            cpu_sum(&self.pids)? - self.server0,
            cpu_secs(std::process::id())? - self.client0,
            self.peak.load(Ordering::Relaxed).max(rss_sum(&self.pids)?),
        ))
    }
}

fn cpu_sum(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}

fn rss_sum(pids: &[u32]) -> Result<u64> {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

/// PostgreSQL's counters for one database: transactions, rows fetched, rows returned.
struct PgCounters<'a> {
    pg: &'a tessera_test_util::postgres::TestPostgres,
    db: &'a str,
}

/// CPU seconds of every `postgres` process on the machine (the bench's own server is the
/// only one running while it measures).
fn postgres_cpu() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0.0 };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(|pid| cpu_secs(pid).unwrap_or(0.0))
        .sum()
}

impl PgCounters<'_> {
    fn read(&self) -> Result<(f64, f64)> {
        let out = self.pg.psql(
            "postgres",
            &format!(
                "SELECT xact_commit + xact_rollback, tup_returned FROM pg_stat_database WHERE datname = '{}'",
                self.db
            ),
        );
        let mut it = out.trim().split('|');
        Ok((it.next().context("xacts")?.parse()?, it.next().context("tuples")?.parse()?))
    }
}

struct StoreFigures {
    store: &'static str,
    setup: Duration,
    first_sync_bytes: f64,
    window_syncs: usize,
    window_cpu_share: f64,
    /// Server CPU seconds in the window.
    window_cpu: f64,
    window_client_share: f64,
    unchanged_bytes: f64,
    rss_idle_kib: u64,
    rss_window_kib: u64,
    pg_xacts_per_sec: Option<(f64, f64)>,
    pg_cpu_share: Option<f64>,
    woken: usize,
    targeted: Duration,
    targeted_cpu: f64,
    restart: Duration,
    resynced: Duration,
    resynced_count: usize,
    storm_cpu: f64,
    storm_peak_kib: u64,
    worst_attempts: u32,
    /// Agents of the restarted server (all of them with one replica).
    restarted: usize,
    /// With replicas: agents of the restarted one that came back on another, and notice
    /// streams on the others that broke during the storm.
    moved: Option<(usize, usize)>,
    /// The second window, with bad requests mixed in.
    bad: BadFigures,
}

/// Bad requests mixed into the second steady window, in turn.
#[derive(Clone, Copy, Debug)]
enum Bad {
    /// `AttestAgent` with a join token the server never issued, on a connection without a
    /// client certificate.
    ForgedJoinToken,
    /// `BatchNewX509Svid` from an attested agent for one of its entries, with bytes that are
    /// no CSR.
    GarbageCsr,
    /// `AttestAgent` whose message is over the listener's cap (`max_message_bytes`, 1 MiB).
    Oversized,
}

const BAD: [Bad; 3] = [Bad::ForgedJoinToken, Bad::GarbageCsr, Bad::Oversized];

/// Bad requests per good sync in the second window.
const BAD_SHARE: f64 = 0.05;

struct BadFigures {
    /// Good syncs and server CPU seconds in the second window.
    syncs: usize,
    cpu: f64,
    /// (kind, gRPC code) → count; a code of `Ok` is a bad request that was accepted.
    codes: std::collections::BTreeMap<(String, String), usize>,
    /// What `tessera-server audit verify` said at the end: (passed, its output).
    audit: (bool, String),
}

async fn run(store: &'static str, a: &Args) -> Result<StoreFigures> {
    let replicas = if store == REPLICAS { 2 } else { 1 };
    let pg = (store != "sled").then(tessera_test_util::postgres::TestPostgres::start);
    let db = "bench";
    let conn = pg.as_ref().map(|pg| pg.database(db));
    let (mut dirs, mut servers, mut addrs, mut adms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..replicas {
        let dir = tempfile::tempdir()?;
        // A fixed port: the agents reconnect to the same address after the restart.
        let port = free_port();
        let mut text = server_config(dir.path(), "ca_ttl = \"96h\"\ndefault_x509_svid_ttl = \"1h\"")
            .replace(
                "[server]\n",
                &format!("[server]\ninstance_id = \"bench-{r}\"\nrate_limit_svids_per_second = 0\nrate_limit_attestations_per_minute = 0\n"),
            )
            .replace("agent_api_address = \"127.0.0.1:0\"", &format!("agent_api_address = \"127.0.0.1:{port}\""));
        if let Some(conn) = &conn {
            text = text.replace("type = \"sled\"\n", &format!("type = \"postgres\"\nconnection_string = \"{conn}\"\n"));
        }
        let server = ServerProc::start_text(dir.path(), &text);
        adms.push(tessera_server::client::connect_admin(&server.socket).await?);
        servers.push(server);
        dirs.push(dir);
        addrs.push(format!("127.0.0.1:{port}"));
    }
    // Each replica has its own CA: wait until every replica's bundle holds all of them.
    let t_ready = Instant::now();
    let roots = loop {
        let mut all = Vec::new();
        for adm in &mut adms {
            all.push(tessera_test_util::bench::roots(adm).await?);
        }
        if all.iter().all(|r| r.len() == replicas) {
            break all.swap_remove(0);
        }
        anyhow::ensure!(t_ready.elapsed() < Duration::from_secs(60), "the replicas' bundles never held both CAs");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut adm = adms[0].clone();
    let td = tessera_identity::TrustDomain::new("example.org")?;
    let server_id = tessera_identity::server_id(&td)?;
    let addrs = Arc::new(addrs);

    // Setup: tokens, attestations, entries, connections, first syncs.
    let t_setup = Instant::now();
    let roots = Arc::new(roots);
    let (adm_c, r, s, ad) = (adms.clone(), roots.clone(), server_id.clone(), addrs.clone());
    let sims: Vec<(SpiffeId, Sim)> = in_parallel(a.agents, move |i| {
        let replica = i % replicas;
        let (mut adm, roots, server_id, addr) = (adm_c[replica].clone(), r.clone(), s.clone(), ad[replica].clone());
        async move {
            let anon = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id.clone()), None)?;
            let mut anon = AgentClient::new(tessera_svc::connect::tls(&addr, anon).await?);
            let (id, key, chain) = tessera_test_util::bench::attest_new_agent(&mut adm, &mut anon).await?;
            let tls = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id), Some((chain, &key)))?;
            let client = AgentClient::new(tessera_svc::connect::tls(&addr, tls.clone()).await?);
            Ok((id, Sim { client, revision: 0, replica, tls: Arc::new(tls) }))
        }
    })
    .await?;
    let mut batch = Vec::new();
    for (i, (id, _)) in sims.iter().enumerate() {
        for e in 0..a.entries {
            batch.push(types::Entry {
                spiffe_id: format!("spiffe://example.org/sim/{i}/{e}"),
                parent_id: id.to_string(),
                selectors: vec![types::Selector { r#type: "unix".into(), value: format!("uid:{e}") }],
                ..Default::default()
            });
            if batch.len() == 1000 {
                create_batch(&mut adm, std::mem::take(&mut batch)).await?;
            }
        }
    }
    if !batch.is_empty() {
        create_batch(&mut adm, batch).await?;
    }
    let sims: Vec<Sim> = sims.into_iter().map(|(_, s)| s).collect();
    let first = Arc::new(sims);
    let f = first.clone();
    let synced: Vec<(Sim, usize)> = in_parallel(first.len(), move |i| {
        let mut sim = f[i].clone();
        async move {
            let r = sim
                .client
                .sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() })
                .await?
                .into_inner();
            anyhow::ensure!(!r.upserted.is_empty(), "agent {i}: a full sync returned no entry");
            sim.revision = r.revision;
            Ok((sim, r.encoded_len()))
        }
    })
    .await?;
    let setup = t_setup.elapsed();
    let first_sync_bytes = synced.iter().map(|(_, b)| *b as f64).sum::<f64>() / synced.len() as f64;
    let sims: Vec<Sim> = synced.into_iter().map(|(s, _)| s).collect();

    // Every agent holds a notice stream, as real ones do.
    let mut streams = Vec::with_capacity(sims.len());
    for s in &sims {
        let mut c = s.client.clone();
        let mut n = c.watch_changes(agent::WatchChangesRequest {}).await?.into_inner();
        n.message().await?.context("no first notice")?;
        streams.push(n);
    }

    // Steady state: every agent syncs every 5 s, spread over the period.
    let pgc = pg.as_ref().map(|pg| PgCounters { pg, db });
    let pg0 = pgc.as_ref().map(PgCounters::read).transpose()?;
    let pg_cpu0 = postgres_cpu();
    let meter = Meter::start(pids(&servers))?;
    let (window_syncs, window_bytes) = steady_window(&sims).await?;
    let (elapsed, scpu, ccpu, peak) = meter.stop()?;
    let pg_xacts_per_sec = match (&pgc, pg0) {
        (Some(p), Some((x0, t0))) => {
            let (x1, t1) = p.read()?;
            Some(((x1 - x0) / elapsed.as_secs_f64(), (t1 - t0) / elapsed.as_secs_f64()))
        }
        _ => None,
    };
    let pg_cpu_share = pg.as_ref().map(|_| (postgres_cpu() - pg_cpu0) / elapsed.as_secs_f64());
    let rss_idle_kib = rss_sum(&pids(&servers))?;

    // The first simulated agent's first entry: the bad requests ask for it, and its parent
    // (that agent) gets a new entry below.
    let sim0 = adm
        .list_entries(admin::ListEntriesRequest {
            by_spiffe_id: "spiffe://example.org/sim/0/0".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .entries
        .into_iter()
        .next()
        .context("entry sim/0/0")?;

    // The same window again, with bad requests mixed in (BAD_SHARE of the good syncs).
    let bad = {
        let anon = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id.clone()), None)?;
        let anon = AgentClient::new(tessera_svc::connect::tls(&addrs[0], anon).await?);
        let first = sims.first().context("no agent")?.client.clone();
        let meter = Meter::start(pids(&servers))?;
        let every = SYNC_EVERY.div_f64(sims.len() as f64 * BAD_SHARE);
        let bad_sender = tokio::spawn(bad_requests(anon, first, sim0.id.clone(), every, WINDOW));
        let (syncs, _) = steady_window(&sims).await?;
        let codes = bad_sender.await??;
        let (_, cpu, _, _) = meter.stop()?;
        let out = servers[0].cli(&["audit", "verify"]);
        let said = String::from_utf8_lossy(if out.status.success() { &out.stdout } else { &out.stderr });
        BadFigures { syncs, cpu, codes, audit: (out.status.success(), said.trim().to_owned()) }
    };

    // One entry change: which agents hear of it.
    let meter = Meter::start(pids(&servers))?;
    let t1 = Instant::now();
    let concerned = sims.first().context("no agent")?.clone();
    adm.create_entry(admin::CreateEntryRequest {
        entry: Some(types::Entry {
            spiffe_id: "spiffe://example.org/sim/0/new".into(),
            parent_id: sim0.parent_id,
            selectors: vec![types::Selector { r#type: "unix".into(), value: "uid:4242".into() }],
            ..Default::default()
        }),
    })
    .await?;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut n) in streams.into_iter().enumerate() {
        let mut c = if i == 0 { Some(concerned.clone()) } else { None };
        tasks.spawn(async move {
            match tokio::time::timeout(Duration::from_secs(2), n.message()).await {
                Ok(m) => {
                    m?.context("stream ended")?;
                    if let Some(s) = c.as_mut() {
                        s.client
                            .sync_entries(agent::SyncEntriesRequest {
                                since_revision: s.revision,
                                ..Default::default()
                            })
                            .await?;
                    }
                    Ok::<_, anyhow::Error>((i, Some(t1.elapsed()), n))
                }
                Err(_) => Ok((i, None, n)),
            }
        });
    }
    let (mut woken, mut targeted, mut streams) = (0usize, Duration::ZERO, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (i, w, n) = r??;
        if let Some(d) = w {
            woken += 1;
            targeted = targeted.max(d);
        }
        streams.push((i, n));
    }
    // In the agents' order again, to go with `sims`.
    streams.sort_by_key(|(i, _)| *i);
    let (_, targeted_cpu, _, _) = meter.stop()?;

    // The resync storm: the (first) server restarts under its agents; with replicas, the
    // others' notice streams are watched for breaks.
    let stop_at = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut elsewhere = Vec::new();
    let mut restarted = 0usize;
    for (s, (_, mut n)) in sims.iter().cloned().zip(streams) {
        if s.replica == 0 {
            restarted += 1;
            tasks.spawn(agent_after_restart(s, n, addrs.clone()));
        } else {
            elsewhere.push(tokio::spawn(async move { while let Ok(Some(_)) = n.message().await {} }));
        }
    }
    servers[0].stop();
    servers[0].spawn();
    let restart = stop_at.elapsed();
    let meter = Meter::start(pids(&servers))?;
    let (mut resynced, mut resynced_count, mut worst_attempts, mut moved) = (Duration::ZERO, 0usize, 0u32, 0usize);
    let deadline = tokio::time::Instant::now() + STORM_LIMIT;
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        let (at, attempts, replica) = r??;
        resynced = resynced.max(at.saturating_duration_since(stop_at));
        resynced_count += 1;
        worst_attempts = worst_attempts.max(attempts);
        moved += usize::from(replica != 0);
    }
    let (_, storm_cpu, _, storm_peak_kib) = meter.stop()?;
    tasks.abort_all();
    let broken_elsewhere = elsewhere.iter().filter(|h| h.is_finished()).count();
    elsewhere.iter().for_each(tokio::task::JoinHandle::abort);
    for s in &mut servers {
        s.stop();
    }
    drop(pg);
    drop(dirs);
    Ok(StoreFigures {
        store,
        setup,
        first_sync_bytes,
        window_syncs,
        window_cpu_share: scpu / elapsed.as_secs_f64(),
        window_cpu: scpu,
        window_client_share: ccpu / elapsed.as_secs_f64(),
        unchanged_bytes: window_bytes as f64 / window_syncs.max(1) as f64,
        rss_idle_kib,
        rss_window_kib: peak,
        pg_xacts_per_sec,
        pg_cpu_share,
        woken,
        targeted,
        targeted_cpu,
        restart,
        resynced,
        resynced_count,
        storm_cpu,
        storm_peak_kib,
        worst_attempts,
        restarted,
        moved: (replicas > 1).then_some((moved, broken_elsewhere)),
        bad,
    })
}

/// Every agent syncs every `SYNC_EVERY` for `WINDOW`, their starts spread over the period.
/// Returns (syncs, protobuf bytes received).
async fn steady_window(sims: &[Sim]) -> Result<(usize, usize)> {
    let n = sims.len();
    let mut tasks = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for (i, s) in sims.iter().cloned().enumerate() {
        let offset = SYNC_EVERY.mul_f64(i as f64 / n as f64);
        tasks.spawn(periodic_syncs(s.client, s.revision, t0, offset, SYNC_EVERY, WINDOW));
    }
    let (mut syncs, mut bytes) = (0usize, 0usize);
    while let Some(r) = tasks.join_next().await {
        let (s, b) = r??;
        syncs += s;
        bytes += b;
    }
    Ok((syncs, bytes))
}

/// Sends one bad request every `every` for `window`, the kinds in turn, each on its own
/// task; returns how each was answered.
async fn bad_requests(
    anon: Client,
    agent: Client,
    entry_id: String,
    every: Duration,
    window: Duration,
) -> Result<std::collections::BTreeMap<(String, String), usize>> {
    // A well-formed token the server never issued, with a CSR for the agent ID it names: the
    // refusal comes from the token lookup, not from an earlier check.
    let forged = "forged-0123456789abcdef0123456789abcdef";
    let id = SpiffeId::new(format!("spiffe://example.org/tessera/agent/join_token/{forged}"))?;
    let key = tessera_identity::PrivateKey::generate_ec_p256()?;
    let csr = tessera_identity::csr::build_csr(&id, &[], &key)?;
    let attest = |payload: Vec<u8>| agent::AttestAgentRequest {
        data: Some(agent::AttestationData { r#type: "join_token".into(), payload }),
        csr: csr.clone(),
        ..Default::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    let t0 = tokio::time::Instant::now();
    let mut i = 0usize;
    while t0.elapsed() < window {
        let kind = BAD[i % BAD.len()];
        let (mut anon, mut agent) = (anon.clone(), agent.clone());
        let attest_call = match kind {
            Bad::ForgedJoinToken => Some(attest(forged.as_bytes().to_vec())),
            Bad::Oversized => Some(attest(vec![b'A'; 1024 * 1024 + 1])),
            Bad::GarbageCsr => None,
        };
        let entry_id = entry_id.clone();
        tasks.spawn(async move {
            let code = match attest_call {
                Some(call) => match anon.attest_agent(call).await {
                    Ok(_) => tonic::Code::Ok,
                    Err(s) => s.code(),
                },
                None => {
                    let req = agent::BatchNewX509SvidRequest {
                        params: vec![agent::X509SvidParams { entry_id, csr: b"no CSR at all".to_vec() }],
                    };
                    match agent.batch_new_x509_svid(req).await {
                        // Per-entry results: the refusal is in the item's status.
                        Ok(r) => r
                            .into_inner()
                            .results
                            .first()
                            .and_then(|x| x.status.as_ref())
                            .map_or(tonic::Code::Ok, |st| tonic::Code::from_i32(st.code)),
                        Err(s) => s.code(),
                    }
                }
            };
            (format!("{kind:?}"), format!("{code:?}"))
        });
        i += 1;
        tokio::time::sleep_until(t0 + every * u32::try_from(i)?).await;
    }
    let mut codes = std::collections::BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        *codes.entry(r?).or_insert(0) += 1;
    }
    Ok(codes)
}

/// What `tessera-agent` does when its notice stream breaks: wait between half and all of
/// 250 ms doubling per failure (at most the sync interval), open a new stream, sync on its
/// first notice; after a failed attempt, connect to the next replica if there is one. Returns
/// when it synced, how many streams it tried, and the replica it synced with.
async fn agent_after_restart(
    mut s: Sim,
    mut notices: tonic::Streaming<agent::WatchChangesResponse>,
    addrs: Arc<Vec<String>>,
) -> Result<(Instant, u32, usize)> {
    // The old stream ends when the server goes.
    while let Ok(Some(_)) = notices.message().await {}
    let mut failures = 0u32;
    loop {
        failures += 1;
        let base = Duration::from_millis(250u64 << failures.min(7)).min(SYNC_EVERY);
        tokio::time::sleep(base.mul_f64(0.5 + 0.5 * rand::random::<f64>())).await;
        let opened = async {
            let mut n = s.client.watch_changes(agent::WatchChangesRequest {}).await?.into_inner();
            n.message().await?.context("no first notice")?;
            s.client
                .sync_entries(agent::SyncEntriesRequest { since_revision: s.revision, ..Default::default() })
                .await?;
            Ok::<_, anyhow::Error>(n)
        };
        if let Ok(Ok(_stream)) = tokio::time::timeout(Duration::from_secs(10), opened).await {
            return Ok((Instant::now(), failures, s.replica));
        }
        if addrs.len() > 1 {
            // As `connect_any` after a failed sync: the next replica.
            let next = (s.replica + 1) % addrs.len();
            let connect = tessera_svc::connect::tls(&addrs[next], (*s.tls).clone());
            if let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(10), connect).await {
                s.client = AgentClient::new(channel);
                s.replica = next;
            }
        }
    }
}

async fn create_batch(adm: &mut Admin, entries: Vec<types::Entry>) -> Result<()> {
    let r = adm.batch_create_entry(admin::BatchCreateEntryRequest { entries }).await?.into_inner();
    if let Some(bad) = r.results.iter().find(|x| x.code != 0) {
        bail!("batch refused: {} {}", bad.code, bad.message);
    }
    Ok(())
}

fn pids(servers: &[ServerProc]) -> Vec<u32> {
    servers.iter().map(|s| s.child.as_ref().map(std::process::Child::id).unwrap_or(0)).collect()
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let a = args()?;
    let mut rows = Vec::new();
    for store in a.stores.clone() {
        eprintln!("{store}: {} agents × {} entries", a.agents, a.entries);
        rows.push(run(store, &a).await?);
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "## {} agents × {} entries ({} entries), {cores} cores, each agent syncing every {SYNC_EVERY:?} with a notice stream open\n",
        a.agents,
        a.entries,
        a.agents * a.entries
    );
    let cols: Vec<&str> = rows.iter().map(|r| r.store).collect();
    println!("| figure | {} | target |", cols.join(" | "));
    println!("|---|{}---|", "---|".repeat(cols.len()));
    let line = |name: &str, f: &dyn Fn(&StoreFigures) -> String, target: &str| {
        let cells: Vec<String> = rows.iter().map(f).collect();
        println!("| {name} | {} | {target} |", cells.join(" | "));
    };
    line(
        "setup: tokens, attestations, entries, connections, first syncs",
        &|r| format!("{:.0} s", r.setup.as_secs_f64()),
        "—",
    );
    line("bytes per first (full) sync", &|r| format!("{:.0} B", r.first_sync_bytes), "—");
    line(
        &format!("server CPU during {WINDOW:?} of steady syncs (load generator beside it)"),
        &|r| {
            format!(
                "{:.1} % of one core ({} syncs; load generator {:.1} %)",
                100.0 * r.window_cpu_share,
                r.window_syncs,
                100.0 * r.window_client_share
            )
        },
        "< 50 % of one core",
    );
    line("bytes per unchanged sync", &|r| format!("{:.0} B", r.unchanged_bytes), "O(changes)");
    line(
        "server RSS: peak in the window, then idle",
        &|r| format!("{} / {}", mib(r.rss_window_kib), mib(r.rss_idle_kib)),
        "—",
    );
    line(
        "PostgreSQL: transactions/s, rows read/s (pg_stat_database)",
        &|r| r.pg_xacts_per_sec.map(|(x, t)| format!("{x:.0} / {t:.0}")).unwrap_or_else(|| "—".into()),
        "—",
    );
    line(
        "PostgreSQL's own CPU during the window (all its processes)",
        &|r| r.pg_cpu_share.map(|c| format!("{:.1} % of one core", 100.0 * c)).unwrap_or_else(|| "—".into()),
        "—",
    );
    line(
        "one entry change: agents woken, the concerned one synced in",
        &|r| {
            format!(
                "{} woken, {:.0} ms, server CPU {:.0} ms",
                r.woken,
                r.targeted.as_secs_f64() * 1e3,
                r.targeted_cpu * 1e3
            )
        },
        "1",
    );
    line(
        &format!(
            "the same window with bad requests mixed in ({:.0} % of the syncs): server CPU per good sync, clean → mixed",
            100.0 * BAD_SHARE
        ),
        &|r| {
            format!(
                "{:.0} → {:.0} µs ({} good syncs)",
                1e6 * r.window_cpu / r.window_syncs.max(1) as f64,
                1e6 * r.bad.cpu / r.bad.syncs.max(1) as f64,
                r.bad.syncs
            )
        },
        "no more than their own cost",
    );
    line(
        "bad requests: kind, answer, count",
        &|r| {
            let v: Vec<String> = r.bad.codes.iter().map(|((k, c), n)| format!("{k} {c} ×{n}")).collect();
            v.join("; ")
        },
        "refused with the right code",
    );
    line(
        "audit chain after the bad requests (`tessera-server audit verify`)",
        &|r| if r.bad.audit.0 { "verifies".into() } else { format!("FAILS: {}", r.bad.audit.1) },
        "verifies",
    );
    line("resync storm: (first) server stop + start to healthy", &|r| format!("{:.1} s", r.restart.as_secs_f64()), "—");
    line(
        "resync storm: until every agent of that server synced again (from the stop)",
        &|r| {
            format!(
                "{:.1} s, {} of {} agents, worst {} attempts",
                r.resynced.as_secs_f64(),
                r.resynced_count,
                r.restarted,
                r.worst_attempts
            )
        },
        "< 60 s, none gives up",
    );
    line(
        "resync storm: of those, back on the other replica; notice streams broken on the other",
        &|r| r.moved.map(|(m, b)| format!("{m}; {b}")).unwrap_or_else(|| "—".into()),
        "—",
    );
    line(
        "resync storm: server CPU, peak RSS (replicas together)",
        &|r| format!("{:.1} s, {}", r.storm_cpu, mib(r.storm_peak_kib)),
        "—",
    );
    for r in &rows {
        if let Some(((k, _), n)) = r.bad.codes.iter().find(|((_, c), _)| c == "Ok") {
            bail!("{}: {n} bad requests of kind {k} were accepted", r.store);
        }
        if !r.bad.audit.0 {
            bail!("{}: the audit chain did not verify: {}", r.store, r.bad.audit.1);
        }
        if r.resynced_count < r.restarted {
            bail!(
                "{}: only {} of {} agents synced again within {STORM_LIMIT:?}",
                r.store,
                r.resynced_count,
                r.restarted
            );
        }
        if let Some((_, broken)) = r.moved.filter(|(_, b)| *b > 0) {
            bail!("{}: {broken} notice streams broke on the replica that stayed up", r.store);
        }
    }
    Ok(())
}
