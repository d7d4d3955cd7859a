//! An agent offline past its own SVID's expiry, or evicted while it runs, rejoins as
//! docs/agent.md says, never by editing the store: with `k8s_psat` by itself (a fresh
//! projected token, the same agent ID); with join tokens, it says what to do, and a new token
//! (and, after an eviction, a restart) brings it back under the same node alias.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tessera_test_util::fake_k8s::{FakeCluster, PSAT_AGENT_ID};
use tessera_test_util::{Mesh, bin, my_uid, wait_for};

const CA: &str = "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"";

fn short_agent_svids(t: String) -> String {
    t.replace("[server]\n", "[server]\nagent_svid_ttl = \"3s\"\n")
}

fn fetch_ok(mesh: &Mesh, id: &str) -> bool {
    let out = mesh.agent_cli(&["api", "fetch", "x509"]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(id)
}

/// A fresh projected token for the agent's pod on node `agent-n1`, written to `path`.
fn write_projected_token(k8s: &FakeCluster, path: &Path) {
    std::fs::write(path, k8s.token("tessera-system", "tessera-agent", Some("agent-n1"), &["tessera-server"], 3600))
        .unwrap();
}

/// A mesh whose agent attests with `k8s_psat` against a fake cluster (its token in `files`),
/// the server's configuration passed through `edit`.
fn psat_mesh(files: &Path, edit: impl FnOnce(String) -> String) -> (Mesh, FakeCluster, PathBuf) {
    let k8s = FakeCluster::with_agent_node("agent-n1", &[]);
    let token = files.join("token");
    write_projected_token(&k8s, &token);
    let extra = k8s.psat_attestor(&files.join("kubeconfig"), "");
    let attestation = format!(
        "[node_attestor]\ntype = \"k8s_psat\"\ncluster = \"cluster-a\"\ntoken_path = \"{}\"\n",
        token.display()
    );
    let mesh = Mesh::start_attested("example.org", CA, "200ms", |t| edit(t) + &extra, PSAT_AGENT_ID, |_| attestation);
    (mesh, k8s, token)
}

#[test]
fn a_kubernetes_agent_past_its_svid_expiry_attests_again_by_itself() {
    let files = tempfile::tempdir().unwrap();
    let (mut mesh, k8s, token) = psat_mesh(files.path(), short_agent_svids);
    let web = "spiffe://example.org/web";
    mesh.register_with(web, &format!("unix:uid:{}", my_uid()), &[]);
    wait_for(10, "the workload's SVID", || fetch_ok(&mesh, web), String::new);

    // Offline past the agent SVID's 3 s life, then back with a fresh projected token.
    drop(mesh.agent.take());
    std::thread::sleep(Duration::from_secs(4));
    write_projected_token(&k8s, &token);
    mesh.start_agent();
    wait_for(10, "the workload's SVID after the rejoin", || fetch_ok(&mesh, web), String::new);
    let log = agent_log(&mesh);
    assert!(log.contains("The persisted agent SVID has expired: attesting again"), "{log}");
    let agents = mesh.server.cli_ok(&["agent", "list"]);
    assert_eq!(agents.matches("SPIFFE ID").count(), 1, "the same agent ID, not a second agent: {agents}");
}

#[test]
fn a_join_token_agent_past_its_svid_expiry_stops_with_the_fix_and_a_new_token_brings_it_back() {
    let mut mesh = Mesh::start_custom("example.org", CA, "200ms", short_agent_svids);
    let web = "spiffe://example.org/web";
    mesh.register(web, &[]);
    wait_for(10, "the workload's SVID", || fetch_ok(&mesh, web), String::new);

    drop(mesh.agent.take());
    std::thread::sleep(Duration::from_secs(4));
    // The spent token cannot attest again: the agent stops and says why.
    let out = Command::new(bin("tessera-agent")).args(["run", "--config"]).arg(&mesh.agent_config).output().unwrap();
    assert!(!out.status.success(), "an agent with an expired SVID and a spent token started");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already been used"), "{err}");

    // The documented fix: a new join token for the same node alias.
    set_join_token(&mesh, &alias_token(&mesh));
    mesh.start_agent();
    wait_for(10, "the workload's SVID under the node alias", || fetch_ok(&mesh, web), String::new);
}

/// A new join token for the mesh's node alias.
fn alias_token(mesh: &Mesh) -> String {
    let token: serde_json::Value = serde_json::from_str(&mesh.server.cli_ok(&[
        "token",
        "generate",
        "--spiffe-id",
        &mesh.alias,
        "--output",
        "json",
    ]))
    .unwrap();
    token["token"].as_str().unwrap().to_owned()
}

fn set_join_token(mesh: &Mesh, token: &str) {
    let cfg = std::fs::read_to_string(&mesh.agent_config).unwrap();
    let cfg: String = cfg
        .lines()
        .map(|l| if l.starts_with("join_token") { format!("join_token = \"{token}\"\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(&mesh.agent_config, cfg).unwrap();
}

fn agent_log(mesh: &Mesh) -> String {
    std::fs::read_to_string(mesh.dir.path().join("agent.log")).unwrap()
}

fn agent_ids(mesh: &Mesh) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&mesh.server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    v["agents"].as_array().unwrap().iter().map(|a| a["spiffe_id"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn an_evicted_kubernetes_agent_attests_again_by_itself_while_it_runs() {
    let files = tempfile::tempdir().unwrap();
    let (mesh, _k8s, _token) = psat_mesh(files.path(), |t| t);
    let web = "spiffe://example.org/web";
    mesh.register(web, &[]);
    wait_for(10, "the workload's SVID", || fetch_ok(&mesh, web), String::new);
    assert_eq!(agent_ids(&mesh), [PSAT_AGENT_ID]);

    mesh.server.cli_ok(&["agent", "evict", "--spiffe-id", PSAT_AGENT_ID]);
    wait_for(
        15,
        "the agent attesting again after its eviction",
        || agent_log(&mesh).contains("Agent attested again after an eviction"),
        || agent_log(&mesh),
    );
    assert_eq!(agent_ids(&mesh), [PSAT_AGENT_ID], "the same agent ID, not a second agent");
    assert!(fetch_ok(&mesh, web), "the workload kept its SVID");
    // It syncs again: an entry made after the eviction reaches the workload.
    let late = "spiffe://example.org/late";
    mesh.register(late, &[]);
    wait_for(10, "an entry made after the eviction", || fetch_ok(&mesh, late), || agent_log(&mesh));
}

#[test]
fn an_evicted_join_token_agent_says_what_to_do_and_a_new_token_and_restart_bring_it_back() {
    let mut mesh = Mesh::start_custom("example.org", CA, "200ms", |t| t);
    let web = "spiffe://example.org/web";
    mesh.register(web, &[]);
    wait_for(10, "the workload's SVID", || fetch_ok(&mesh, web), String::new);
    let old = agent_ids(&mesh);
    assert_eq!(old.len(), 1);

    // Its token is spent: one try, refused, then the fix in the log. Its workloads keep their
    // SVIDs meanwhile.
    mesh.server.cli_ok(&["agent", "evict", "--spiffe-id", &old[0]]);
    wait_for(
        15,
        "the evicted agent naming the fix",
        || agent_log(&mesh).contains("put a new join token in join_token and restart the agent"),
        || agent_log(&mesh),
    );
    assert!(agent_log(&mesh).contains("already been used"), "{}", agent_log(&mesh));
    assert!(agent_ids(&mesh).is_empty());
    assert!(fetch_ok(&mesh, web), "the workload kept its SVID");

    // The fix: a new token for the node alias and a restart; no file is deleted.
    set_join_token(&mesh, &alias_token(&mesh));
    drop(mesh.agent.take());
    mesh.start_agent();
    wait_for(
        15,
        "the agent attesting again with the new token",
        || agent_log(&mesh).contains("Agent attested again after an eviction"),
        || agent_log(&mesh),
    );
    let now = agent_ids(&mesh);
    assert!(now.len() == 1 && now != old, "a new agent ID from the new token: {now:?} (was {old:?})");
    let late = "spiffe://example.org/late";
    mesh.register(late, &[]);
    wait_for(
        10,
        "an entry made after the eviction, under the node alias",
        || fetch_ok(&mesh, late),
        || agent_log(&mesh),
    );
}
