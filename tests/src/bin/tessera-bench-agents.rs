//! `tessera-bench-agents`: many simulated agents on one server, on sled and on PostgreSQL:
//! the steady state of entry sync with change-notice streams open, one entry change among
//! them, and the resync storm after a server restart.
//!
//! Run: `cargo build --release --bins && target/release/tessera-bench-agents`
//! (`--agents N` (default 10,000), `--entries N` per agent (default 10), `--store
//! sled|postgres|both` (default both), `--binaries DIR`).
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

type Client = AgentClient<tonic::transport::Channel>;
type Admin = admin::admin_client::AdminClient<tonic::transport::Channel>;

struct Args {
    agents: usize,
    entries: usize,
    stores: Vec<&'static str>,
}

fn args() -> Result<Args> {
    let usage = "usage: tessera-bench-agents [--binaries DIR] [--agents N] [--entries N] [--store sled|postgres|both]";
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
                    "both" => vec!["sled", "postgres"],
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

/// One simulated agent: its connection and the revision it last saw.
#[derive(Clone)]
struct Sim {
    client: Client,
    revision: u64,
}

/// The server process's figures over a stretch of time.
struct Meter {
    pid: u32,
    t0: Instant,
    server0: f64,
    client0: f64,
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicU64>,
}

impl Meter {
    fn start(pid: u32) -> Result<Self> {
        let (peak, stop) = (Arc::new(AtomicU64::new(rss_kib(pid)?)), Arc::new(AtomicU64::new(0)));
        let (p, s) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while s.load(Ordering::Relaxed) == 0 {
                p.fetch_max(rss_kib(pid).unwrap_or(0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(Self {
            pid,
            t0: Instant::now(),
            server0: cpu_secs(pid)?,
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
            cpu_secs(self.pid)? - self.server0,
            cpu_secs(std::process::id())? - self.client0,
            self.peak.load(Ordering::Relaxed).max(rss_kib(self.pid)?),
        ))
    }
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
}

async fn run(store: &'static str, a: &Args) -> Result<StoreFigures> {
    let dir = tempfile::tempdir()?;
    let pg = (store == "postgres").then(tessera_test_util::postgres::TestPostgres::start);
    let db = "bench";
    // A fixed port: the agents reconnect to the same address after the restart.
    let port = free_port();
    let mut text = server_config(dir.path(), "ca_ttl = \"96h\"\ndefault_x509_svid_ttl = \"1h\"")
        .replace(
            "[server]\n",
            "[server]\ninstance_id = \"bench-a\"\nrate_limit_svids_per_second = 0\nrate_limit_attestations_per_minute = 0\n",
        )
        .replace("agent_api_address = \"127.0.0.1:0\"", &format!("agent_api_address = \"127.0.0.1:{port}\""));
    if let Some(pg) = &pg {
        let conn = pg.database(db);
        text = text.replace("type = \"sled\"\n", &format!("type = \"postgres\"\nconnection_string = \"{conn}\"\n"));
    }
    let mut server = ServerProc::start_text(dir.path(), &text);
    let mut adm = tessera_server::client::connect_admin(&server.socket).await?;
    let roots = tessera_test_util::bench::roots(&mut adm).await?;
    let td = tessera_identity::TrustDomain::new("example.org")?;
    let server_id = tessera_identity::server_id(&td)?;
    let addr = format!("127.0.0.1:{port}");

    // Setup: tokens, attestations, entries, connections, first syncs.
    let t_setup = Instant::now();
    let roots = Arc::new(roots);
    let (adm_c, r, s, ad) = (adm.clone(), roots.clone(), server_id.clone(), addr.clone());
    let sims: Vec<(SpiffeId, Sim)> = in_parallel(a.agents, move |_| {
        let (mut adm, roots, server_id, addr) = (adm_c.clone(), r.clone(), s.clone(), ad.clone());
        async move {
            let anon = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id.clone()), None)?;
            let mut anon = AgentClient::new(tessera_svc::connect::tls(&addr, anon).await?);
            let (id, key, chain) = tessera_test_util::bench::attest_new_agent(&mut adm, &mut anon).await?;
            let tls = tessera_identity::tls::client_config(&roots, Authorize::Id(server_id), Some((chain, &key)))?;
            let client = AgentClient::new(tessera_svc::connect::tls(&addr, tls).await?);
            Ok((id, Sim { client, revision: 0 }))
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
    let meter = Meter::start(server_pid(&server))?;
    let n = sims.len();
    let mut tasks = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for (i, s) in sims.iter().cloned().enumerate() {
        let offset = SYNC_EVERY.mul_f64(i as f64 / n as f64);
        tasks.spawn(periodic_syncs(s.client, s.revision, t0, offset, SYNC_EVERY, WINDOW));
    }
    let (mut window_syncs, mut window_bytes) = (0usize, 0usize);
    while let Some(r) = tasks.join_next().await {
        let (s, b) = r??;
        window_syncs += s;
        window_bytes += b;
    }
    let (elapsed, scpu, ccpu, peak) = meter.stop()?;
    let pg_xacts_per_sec = match (&pgc, pg0) {
        (Some(p), Some((x0, t0))) => {
            let (x1, t1) = p.read()?;
            Some(((x1 - x0) / elapsed.as_secs_f64(), (t1 - t0) / elapsed.as_secs_f64()))
        }
        _ => None,
    };
    let pg_cpu_share = pg.as_ref().map(|_| (postgres_cpu() - pg_cpu0) / elapsed.as_secs_f64());
    let rss_idle_kib = rss_kib(server_pid(&server))?;

    // One entry change: which agents hear of it.
    let meter = Meter::start(server_pid(&server))?;
    let t1 = Instant::now();
    let concerned = sims.first().context("no agent")?.clone();
    let parent = {
        // The first simulated agent's ID is the parent of spiffe://example.org/sim/0/*.
        let e = adm
            .list_entries(admin::ListEntriesRequest {
                by_spiffe_id: "spiffe://example.org/sim/0/0".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        e.entries.first().context("entry sim/0/0")?.parent_id.clone()
    };
    adm.create_entry(admin::CreateEntryRequest {
        entry: Some(types::Entry {
            spiffe_id: "spiffe://example.org/sim/0/new".into(),
            parent_id: parent,
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
                    Ok::<_, anyhow::Error>((Some(t1.elapsed()), n))
                }
                Err(_) => Ok((None, n)),
            }
        });
    }
    let (mut woken, mut targeted, mut streams) = (0usize, Duration::ZERO, Vec::new());
    while let Some(r) = tasks.join_next().await {
        let (w, n) = r??;
        if let Some(d) = w {
            woken += 1;
            targeted = targeted.max(d);
        }
        streams.push(n);
    }
    let (_, targeted_cpu, _, _) = meter.stop()?;

    // The resync storm: the server restarts under all agents.
    let stop_at = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (s, n) in sims.iter().cloned().zip(streams) {
        tasks.spawn(agent_after_restart(s, n));
    }
    server.stop();
    server.spawn();
    let restart = stop_at.elapsed();
    let meter = Meter::start(server_pid(&server))?;
    let (mut resynced, mut resynced_count, mut worst_attempts) = (Duration::ZERO, 0usize, 0u32);
    let deadline = tokio::time::Instant::now() + STORM_LIMIT;
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        let (at, attempts) = r??;
        resynced = resynced.max(at.saturating_duration_since(stop_at));
        resynced_count += 1;
        worst_attempts = worst_attempts.max(attempts);
    }
    let (_, storm_cpu, _, storm_peak_kib) = meter.stop()?;
    tasks.abort_all();
    server.stop();
    drop(pg);
    Ok(StoreFigures {
        store,
        setup,
        first_sync_bytes,
        window_syncs,
        window_cpu_share: scpu / elapsed.as_secs_f64(),
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
    })
}

/// What `tessera-agent` does when its notice stream breaks: wait between half and all of
/// 250 ms doubling per failure (at most the sync interval), open a new stream, sync on its first notice. Returns when it
/// synced, and how many streams it tried.
async fn agent_after_restart(
    mut s: Sim,
    mut notices: tonic::Streaming<agent::WatchChangesResponse>,
) -> Result<(Instant, u32)> {
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
            return Ok((Instant::now(), failures));
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

fn server_pid(s: &ServerProc) -> u32 {
    s.child.as_ref().map(std::process::Child::id).unwrap_or(0)
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
    line("resync storm: server stop + start to healthy", &|r| format!("{:.1} s", r.restart.as_secs_f64()), "—");
    line(
        "resync storm: until every agent synced again (from the stop)",
        &|r| {
            format!(
                "{:.1} s, {} of {} agents, worst {} attempts",
                r.resynced.as_secs_f64(),
                r.resynced_count,
                a.agents,
                r.worst_attempts
            )
        },
        "< 60 s, none gives up",
    );
    line("resync storm: server CPU, peak RSS", &|r| format!("{:.1} s, {}", r.storm_cpu, mib(r.storm_peak_kib)), "—");
    for r in &rows {
        if r.resynced_count < a.agents {
            bail!("{}: only {} of {} agents synced again within {STORM_LIMIT:?}", r.store, r.resynced_count, a.agents);
        }
    }
    Ok(())
}
