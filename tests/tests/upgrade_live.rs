//! The upgrade from the previous release under live traffic, in the order docs/upgrading.md
//! gives and SPIRE's upgrade suite runs: the previous server and agent, then the new server
//! on the same data directory while the previous agent keeps rotating, then the new agent,
//! then one agent evicted and attested again. A pair of real Envoys talks mTLS with
//! certificates from the agent's SDS the whole time, and the SVIDs live 10 s, so every step
//! rotates them. No request may fail, every certificate Envoy served is in the audit log, and
//! the chain verifies. The same runs on two replicas on PostgreSQL, replaced one at a time.
//! Then the downgrade, agent first: on sled the previous server opens the store the new one
//! wrote (the layout has not moved); on PostgreSQL it refuses the database, whose schema moved,
//! with an error naming both versions (docs/upgrading.md).
//!
//! The previous release is the commit named in `tests/upgrade-from`, built by
//! `scripts/baseline.sh` (scripts/test.sh runs it) into target/baseline/<commit>/bin. Where it
//! is not built, the test says so and skips.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tessera_test_util::envoy::{EnvoyPair, envoy_pair, served_serials};
use tessera_test_util::postgres::TestPostgres;
use tessera_test_util::repo;
use tessera_test_util::{Proc, ServerToml, Traffic, bin, free_port, my_uid, wait_for};

const FRONT: &str = "spiffe://example.org/front";
const BACK: &str = "spiffe://example.org/back";
const ALIAS: &str = "spiffe://example.org/node/upgrade";

/// The previous release's binaries, if built.
fn baseline() -> Option<PathBuf> {
    let text = std::fs::read_to_string(repo().join("tests/upgrade-from")).unwrap();
    let commit = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap();
    let dir = repo().join("target/baseline").join(commit).join("bin");
    if dir.join("tessera-server").exists() && dir.join("tessera-agent").exists() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: the previous release ({commit}) is not built: run scripts/baseline.sh (scripts/test.sh does)"
        );
        None
    }
}

fn cli(binary: &Path, socket: &Path, args: &[&str]) -> Output {
    Command::new(binary).args(args).arg("--socket").arg(socket).output().unwrap()
}

fn cli_ok(binary: &Path, socket: &Path, args: &[&str]) -> String {
    let out = cli(binary, socket, args);
    assert!(out.status.success(), "{} {args:?}: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Stops a process with SIGTERM, as a rolling update does, and waits for it.
fn terminate(mut p: Proc) {
    let _ = Command::new("kill").arg("-TERM").arg(p.child.id().to_string()).status();
    let status = p.child.wait().unwrap();
    assert!(status.success(), "exited with {status} on SIGTERM: {}", p.log());
}

/// One server replica: its configuration and admin socket.
struct Replica {
    name: &'static str,
    config: PathBuf,
    admin: PathBuf,
}

struct Deployment {
    dir: tempfile::TempDir,
    /// One on sled; two on PostgreSQL.
    replicas: Vec<Replica>,
    agent_config: PathBuf,
    socket: PathBuf,
    _pg: Option<TestPostgres>,
}

impl Deployment {
    /// One server on sled.
    fn sled() -> Self {
        Self::new(&["server"], None)
    }

    /// Two replicas on one real PostgreSQL, each with its own CA (tests/tests/ha.rs).
    fn postgres() -> Self {
        let pg = TestPostgres::start();
        let url = pg.database("upgrade");
        Self::new(&["replica-a", "replica-b"], Some((pg, url)))
    }

    fn new(names: &[&'static str], pg: Option<(TestPostgres, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut replicas = Vec::new();
        let mut addresses = Vec::new();
        for &name in names {
            let rd = d.join(name);
            std::fs::create_dir_all(&rd).unwrap();
            let port = free_port();
            let mut text = ServerToml::new(&rd, "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"10s\"")
                .render()
                .replace("agent_api_address = \"127.0.0.1:0\"", &format!("agent_api_address = \"127.0.0.1:{port}\""));
            if let Some((_, url)) = &pg {
                text = text
                    .replace(
                        "[server]\n",
                        &format!("[server]\ninstance_id = \"{name}\"\nrotation_check_interval = \"1s\"\n"),
                    )
                    .replace(
                        "[store]\ntype = \"sled\"",
                        &format!("[store]\ntype = \"postgres\"\nconnection_string = \"{url}\""),
                    );
                assert!(text.contains("postgres"), "{text}");
            }
            let config = rd.join("server.toml");
            std::fs::write(&config, text).unwrap();
            replicas.push(Replica { name, config, admin: rd.join("admin.sock") });
            addresses.push(format!("\"127.0.0.1:{port}\""));
        }
        let agent_config = d.join("agent.toml");
        let socket = d.join("agent.sock");
        std::fs::write(
            &agent_config,
            format!(
                "trust_domain = \"example.org\"\nserver_addresses = [{}]\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\nhealth_address = \"127.0.0.1:{}\"\nsync_interval = \"1s\"\n",
                addresses.join(", "),
                d.join("agent").display(),
                socket.display(),
                d.join("bootstrap.pem").display(),
                free_port(),
            ),
        )
        .unwrap();
        Self { dir, replicas, agent_config, socket, _pg: pg.map(|(pg, _)| pg) }
    }

    /// The first replica's admin socket, for the CLI.
    fn admin(&self) -> &Path {
        &self.replicas[0].admin
    }

    fn server(&self, replica: usize, binary: &Path, release: &str) -> Proc {
        let r = &self.replicas[replica];
        let mut cmd = Command::new(binary);
        cmd.args(["run", "--config"]).arg(&r.config);
        let mut p = Proc::spawn(cmd, self.dir.path().join(format!("{}-{release}.log", r.name)));
        let admin = r.admin.clone();
        p.wait_until(30, &format!("{} ({release})", r.name), || cli(binary, &admin, &["healthcheck"]).status.success());
        p
    }

    /// Starts a replica that must refuse to run; its log once it has exited with an error.
    fn refused(&self, replica: usize, binary: &Path) -> String {
        let r = &self.replicas[replica];
        let mut cmd = Command::new(binary);
        cmd.args(["run", "--config"]).arg(&r.config);
        let mut p = Proc::spawn(cmd, self.dir.path().join(format!("{}-refused.log", r.name)));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                assert!(!status.success(), "{} exited 0: {}", r.name, p.log());
                return p.log();
            }
            assert!(Instant::now() < deadline, "{} did not refuse the store within 30 s: {}", r.name, p.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every replica, started in order, once each has every replica's CA in its bundle.
    fn servers(&self, binary: &Path, release: &str) -> Vec<Proc> {
        let procs: Vec<Proc> = (0..self.replicas.len()).map(|i| self.server(i, binary, release)).collect();
        let n = self.replicas.len();
        for r in &self.replicas {
            wait_for(
                30,
                &format!("every replica's CA in {}'s bundle", r.name),
                || roots(binary, &r.admin) == n,
                || procs.iter().map(Proc::log).collect::<Vec<_>>().join("\n"),
            );
        }
        procs
    }

    fn agent(&self, binary: &Path, release: &str) -> Proc {
        let mut cmd = Command::new(binary);
        cmd.args(["run", "--config"]).arg(&self.agent_config);
        let mut p = Proc::spawn(cmd, self.dir.path().join(format!("agent-{release}.log")));
        let socket = self.socket.clone();
        p.wait_until(30, &format!("the {release} agent"), || std::os::unix::net::UnixStream::connect(&socket).is_ok());
        p
    }

    /// A new one-use join token for the node alias, written into the agent's config.
    fn join_token(&self, server: &Path) {
        let out = cli_ok(server, self.admin(), &["token", "generate", "--spiffe-id", ALIAS, "--output", "json"]);
        let token: serde_json::Value = serde_json::from_str(&out).unwrap();
        let cfg = std::fs::read_to_string(&self.agent_config).unwrap();
        let cfg: String = cfg.lines().filter(|l| !l.starts_with("join_token")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&self.agent_config, format!("{cfg}join_token = \"{}\"\n", token["token"].as_str().unwrap()))
            .unwrap();
    }
}

/// The number of CA certificates in a server's bundle.
fn roots(binary: &Path, admin: &Path) -> usize {
    let out = cli(binary, admin, &["bundle", "show"]);
    if !out.status.success() {
        return 0;
    }
    tessera_identity::pem::decode_certs(&out.stdout).map(|c| c.len()).unwrap_or(0)
}

/// Waits until Envoy `back` has served `n` certificates it had not served before, while the
/// traffic runs; every serial seen goes into `seen`.
fn rotations(pair: &EnvoyPair, seen: &mut BTreeSet<String>, n: usize, what: &str) {
    let before = seen.len();
    let deadline = Instant::now() + Duration::from_secs(40);
    while seen.len() < before + n {
        assert!(Instant::now() < deadline, "{what}: only {} new certificates in 40 s", seen.len() - before);
        seen.extend(served_serials(&pair.back, BACK));
        seen.extend(served_serials(&pair.front, FRONT).into_iter().map(|s| format!("front:{s}")));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn normal_serial(s: &str) -> String {
    s.trim_start_matches("front:").trim_start_matches('0').to_lowercase()
}

#[test]
fn the_previous_release_upgrades_server_then_agent_under_traffic_and_downgrades() {
    let Some(old) = baseline() else { return };
    upgrade_under_traffic(&old, &Deployment::sled(), "sled, one server");
}

#[test]
fn two_postgres_replicas_upgrade_one_at_a_time_under_traffic_and_downgrade() {
    let Some(old) = baseline() else { return };
    upgrade_under_traffic(&old, &Deployment::postgres(), "PostgreSQL, two replicas");
}

/// The scenario of the module's header on `dep`: its replicas are replaced one at a time.
fn upgrade_under_traffic(old: &Path, dep: &Deployment, what: &str) {
    let (old_server, old_agent) = (old.join("tessera-server"), old.join("tessera-agent"));
    let (new_server, new_agent) = (bin("tessera-server"), bin("tessera-agent"));

    // The previous release, serving a pair of Envoys.
    let mut servers = dep.servers(&old_server, "previous");
    dep.join_token(&old_server);
    std::fs::write(dep.dir.path().join("bootstrap.pem"), cli_ok(&old_server, dep.admin(), &["bundle", "show"]))
        .unwrap();
    let agent = dep.agent(&old_agent, "previous");
    let uid = format!("unix:uid:{}", my_uid());
    for id in [FRONT, BACK] {
        cli_ok(
            &old_server,
            dep.admin(),
            &["entry", "create", "--spiffe-id", id, "--parent-id", ALIAS, "--selector", &uid],
        );
    }
    wait_for(
        30,
        "the workloads' SVIDs from the previous agent",
        || String::from_utf8_lossy(&cli(&old_agent, &dep.socket, &["api", "fetch", "x509"]).stdout).contains(BACK),
        || agent.log(),
    );
    let pair = envoy_pair(dep.dir.path(), &dep.socket, FRONT, &dep.socket, BACK);
    let traffic = Traffic::start(&pair.front_addr);
    let mut seen = BTreeSet::new();
    rotations(&pair, &mut seen, 2, "previous servers, previous agent");
    let mut steps = vec![("previous servers and agent".to_owned(), seen.len())];

    // 1. Each server, replaced on its own data directory, one at a time; the previous agent
    //    keeps rotating (through the other replica while one is down).
    for (i, r) in dep.replicas.iter().enumerate() {
        terminate(servers.remove(i));
        servers.insert(i, dep.server(i, &new_server, "new"));
        rotations(&pair, &mut seen, 2, &format!("{} new, previous agent", r.name));
        steps.push((format!("{} new, previous agent", r.name), seen.len()));
    }

    // 2. The agent, replaced; Envoy reconnects to the new one's socket.
    terminate(agent);
    let agent = dep.agent(&new_agent, "new");
    rotations(&pair, &mut seen, 2, "new servers, new agent");
    steps.push(("new servers and agent".to_owned(), seen.len()));
    let agents = cli_ok(&new_server, dep.admin(), &["agent", "list", "--output", "json"]);
    let agents: serde_json::Value = serde_json::from_str(&agents).unwrap();
    let list = agents["agents"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{agents}");
    assert_eq!(list[0]["version"], env!("CARGO_PKG_VERSION"), "the new agent reports its version: {agents}");
    let agent_id = list[0]["spiffe_id"].as_str().unwrap().to_owned();

    // 3. Evicted, then attested again with a new join token and a restart (docs/agent.md);
    // the agent finds out it was evicted at its first sync and attests again by itself.
    cli_ok(&new_server, dep.admin(), &["agent", "evict", "--spiffe-id", &agent_id]);
    terminate(agent);
    dep.join_token(&new_server);
    let agent = dep.agent(&new_agent, "re-attested");
    rotations(&pair, &mut seen, 2, "after the eviction");
    steps.push(("evicted and attested again".to_owned(), seen.len()));
    let again: serde_json::Value =
        serde_json::from_str(&cli_ok(&new_server, dep.admin(), &["agent", "list", "--output", "json"])).unwrap();
    assert!(again["agents"].as_array().unwrap().iter().all(|a| a["spiffe_id"] != agent_id.as_str()), "{again}");

    let requests = traffic.assert_no_failures(&format!("upgrade under traffic ({what})"));

    // Every certificate Envoy served is in the audit log, and the chain verifies.
    let mut audited = BTreeSet::new();
    let mut from = 1u64;
    loop {
        let page = cli_ok(
            &new_server,
            dep.admin(),
            &["audit", "show", "--from-seq", &from.to_string(), "--limit", "1000", "--output", "json"],
        );
        let page: serde_json::Value = serde_json::from_str(&page).unwrap();
        for r in page["records"].as_array().unwrap() {
            if let Some(s) = r["serial"].as_str() {
                audited.insert(normal_serial(s));
            }
        }
        match page["next_seq"].as_u64() {
            Some(n) if n > from => from = n,
            _ => break,
        }
    }
    let missing: Vec<&String> = seen.iter().filter(|s| !audited.contains(&normal_serial(s))).collect();
    assert!(missing.is_empty(), "served but not audited: {missing:?}");
    let verdict = cli_ok(&new_server, dep.admin(), &["audit", "verify"]);
    assert!(verdict.contains("Audit log OK"), "{verdict}");
    let counts: Vec<String> = steps.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    eprintln!(
        "upgrade ({what}): {requests} requests, 0 failed; certificates served (cumulative) {counts:?}; all {} audited",
        seen.len()
    );

    // Downgrade, the agent first, then the servers one at a time.
    drop(pair);
    terminate(agent);
    let agent = dep.agent(&old_agent, "downgraded");
    if dep.replicas.len() == 1 {
        // sled: the layout has not moved since the previous release (schema 1), so the previous
        // server runs on the store the new one wrote.
        terminate(servers.remove(0));
        servers.insert(0, dep.server(0, &old_server, "downgraded"));
    } else {
        // PostgreSQL: the schema moved from 1 to 3 migrations since the previous release, which
        // predates `readable_from_schema`, so the previous server refuses the database, naming
        // both versions and writing nothing; the replica is upgraded again and the other one
        // serves meanwhile (docs/upgrading.md).
        terminate(servers.remove(0));
        let refused = dep.refused(0, &old_server);
        assert!(refused.contains("schema is version 3, newer than this server knows (1)"), "{refused}");
        servers.insert(0, dep.server(0, &new_server, "upgraded again"));
    }
    let late = "spiffe://example.org/after-downgrade";
    cli_ok(
        &old_server,
        dep.admin(),
        &["entry", "create", "--spiffe-id", late, "--parent-id", ALIAS, "--selector", &uid],
    );
    wait_for(
        30,
        "an SVID from the downgraded agent",
        || String::from_utf8_lossy(&cli(&old_agent, &dep.socket, &["api", "fetch", "x509"]).stdout).contains(late),
        || agent.log(),
    );
}
