//! Two server replicas on one real PostgreSQL: each has its own CA and both CAs are in the
//! one bundle; an agent that knows both addresses keeps its workload's SVIDs rotating when
//! one replica is killed with -9, every workload request succeeds, and every SVID the
//! workload received is in the audit log, whose chain verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_test_util::postgres::TestPostgres;
use tessera_test_util::{Proc, ServerProc, bin, free_port, my_uid, server_config, wait_for};

/// A replica whose SVIDs live `svid_ttl`.
fn replica(dir: &Path, id: &str, port: u16, db: &str, svid_ttl: &str) -> ServerProc {
    std::fs::create_dir_all(dir).unwrap();
    let text = server_config(dir, &format!("ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"{svid_ttl}\""))
        .replace("agent_api_address = \"127.0.0.1:0\"", &format!("agent_api_address = \"127.0.0.1:{port}\""))
        .replace("[server]\n", &format!("[server]\ninstance_id = \"{id}\"\nrotation_check_interval = \"1s\"\n"))
        .replace("[store]\ntype = \"sled\"", &format!("[store]\ntype = \"postgres\"\nconnection_string = \"{db}\""));
    assert!(text.contains("postgres"));
    ServerProc::start_text(dir, &text)
}

/// A PostgreSQL, and two replicas on database `db` whose SVIDs live `svid_ttl`, once both
/// CAs are in both replicas' bundles. Returns them with their Agent API ports.
fn two_replicas(db: &str, svid_ttl: &str) -> (TestPostgres, tempfile::TempDir, (ServerProc, u16), (ServerProc, u16)) {
    let pg = TestPostgres::start();
    let url = pg.database(db);
    let dir = tempfile::tempdir().unwrap();
    let (pa, pb) = (free_port(), free_port());
    let a = replica(&dir.path().join("a"), "replica-a", pa, &url, svid_ttl);
    let b = replica(&dir.path().join("b"), "replica-b", pb, &url, svid_ttl);
    wait_for(20, "both CAs in both replicas' bundles", || roots(&a) == 2 && roots(&b) == 2, || a.log());
    (pg, dir, (a, pa), (b, pb))
}

fn roots(s: &ServerProc) -> usize {
    tessera_identity::pem::decode_certs(s.cli_ok(&["bundle", "show"]).as_bytes()).unwrap().len()
}

/// The serial of the workload's SVID, from the agent's Workload API.
fn fetch_serial(socket: &Path) -> Result<String, String> {
    let out =
        Command::new(bin("tessera-agent")).args(["api", "fetch", "x509", "--socket"]).arg(socket).output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Serial:"))
        .map(|s| s.trim().to_owned())
        .ok_or_else(|| format!("no serial in {text}"))
}

/// An agent of `servers` (ports, in order) that polls every `sync`; its socket path.
fn start_agent(dir: &Path, any: &ServerProc, servers: &[u16], token: &str, sync: &str) -> (Proc, std::path::PathBuf) {
    std::fs::write(dir.join("bundle.pem"), any.cli_ok(&["bundle", "show"])).unwrap();
    let socket = dir.join("agent.sock");
    let agent_cfg = dir.join("agent.toml");
    let addrs: Vec<String> = servers.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    std::fs::write(
        &agent_cfg,
        format!(
            "trust_domain = \"example.org\"\nserver_addresses = [{}]\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\njoin_token = \"{token}\"\nhealth_address = \"127.0.0.1:{}\"\nsync_interval = \"{sync}\"\n",
            addrs.join(", "),
            dir.join("agent").display(),
            socket.display(),
            dir.join("bundle.pem").display(),
            free_port()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("tessera-agent"));
    cmd.args(["run", "--config"]).arg(&agent_cfg);
    (Proc::spawn(cmd, dir.join("agent.log")), socket)
}

#[test]
fn an_agent_fails_over_between_replicas_and_nothing_issued_is_lost() {
    // Both replicas' CAs end up in the one bundle, seen by both.
    let (pg, dir, (mut a, pa), (b, pb)) = two_replicas("ha", "4s");

    let alias = "spiffe://example.org/node/ha";
    let token: Value =
        serde_json::from_str(&a.cli_ok(&["token", "generate", "--spiffe-id", alias, "--output", "json"])).unwrap();
    a.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ha-workload",
        "--parent-id",
        alias,
        "--selector",
        &format!("unix:uid:{}", my_uid()),
    ]);
    let (mut agent, socket) = start_agent(dir.path(), &a, &[pa, pb], token["token"].as_str().unwrap(), "500ms");
    let s = socket.clone();
    agent.wait_until(30, "tessera-agent", || fetch_serial(&s).is_ok());

    // The workload asks continuously; replica A dies in the middle.
    let mut seen = BTreeSet::new();
    let mut failures = Vec::new();
    let mut poll = |until: Instant, seen: &mut BTreeSet<String>| {
        while Instant::now() < until {
            match fetch_serial(&socket) {
                Ok(serial) => {
                    seen.insert(serial);
                }
                Err(e) => failures.push(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    poll(Instant::now() + Duration::from_secs(5), &mut seen);
    let before_kill = seen.len();
    assert!(before_kill >= 2, "SVIDs did not rotate through replica A: {seen:?}");
    a.kill9();
    poll(Instant::now() + Duration::from_secs(10), &mut seen);
    assert!(failures.is_empty(), "workload requests failed: {:?}", &failures[..failures.len().min(3)]);
    assert!(
        seen.len() >= before_kill + 2,
        "SVIDs stopped rotating after replica A died: {} before, {} after\nagent: {}",
        before_kill,
        seen.len(),
        agent.log()
    );

    // Every SVID the workload got is in the audit log, and the chain holds.
    let audit = pg.psql("ha", "SELECT body FROM audit ORDER BY seq");
    let audited: BTreeSet<String> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["event"]["serial"].as_str().map(str::to_owned))
        .collect();
    let missing: Vec<&String> = seen.iter().filter(|s| !audited.contains(*s)).collect();
    assert!(missing.is_empty(), "issued but not audited: {missing:?}");
    let verdict = b.cli_ok(&["audit", "verify"]);
    assert!(verdict.starts_with("Audit log OK"), "{verdict}");
    eprintln!("HA failover: {} SVIDs seen ({} after the kill), all audited", seen.len(), seen.len() - before_kill);
}

#[test]
fn an_entry_written_through_one_replica_reaches_an_agent_of_the_other_without_its_poll() {
    // SVIDs live an hour: no renewal brings the agent to the server during the test.
    let (_pg, dir, (a, _), (b, pb)) = two_replicas("notice", "1h");
    let alias = "spiffe://example.org/node/notice";
    let token: Value =
        serde_json::from_str(&a.cli_ok(&["token", "generate", "--spiffe-id", alias, "--output", "json"])).unwrap();
    let selector = format!("unix:uid:{}", my_uid());
    a.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/first",
        "--parent-id",
        alias,
        "--selector",
        &selector,
    ]);
    // The agent knows only replica B and polls once an hour.
    let (mut agent, socket) = start_agent(dir.path(), &b, &[pb], token["token"].as_str().unwrap(), "1h");
    let s = socket.clone();
    agent.wait_until(30, "tessera-agent", || fetch_serial(&s).is_ok());

    // Let the agent's start-up syncs pass, so that only a notice can bring it back.
    std::thread::sleep(Duration::from_secs(2));
    // Written through replica A: B sees the store's entry revision move and tells its agent.
    a.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/second",
        "--parent-id",
        alias,
        "--selector",
        &selector,
    ]);
    let ids = || {
        let out = Command::new(bin("tessera-agent"))
            .args(["api", "fetch", "x509", "--socket"])
            .arg(&socket)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for(15, "the second identity at the agent", || ids().contains("spiffe://example.org/second"), || agent.log());
}
