//! Network faults between clusters (#19), with the real binaries and real Envoy on real
//! network links: cluster A and cluster B are network namespaces joined by a veth pair, each
//! with its server (bundle endpoint on the link), agent, a back Envoy (mTLS, answers 200) and a
//! front Envoy that calls its own back and the other cluster's over SPIFFE mTLS. A second node
//! of cluster A is a third namespace whose agent reaches A's server over its own link.
//! Continuous traffic runs inside each cluster and across the link while:
//!
//! 1. the link has 300 ms delay and 5 % loss each way for a minute (a relay, as the kernel here
//!    has no `tc netem`: [`tessera_test_util::netns::Link`]): no request
//!    fails, federation refreshes go on; TCP retransmissions reported next to the segments;
//! 2. meanwhile the second node is cut off from its server (every packet dropped) for longer
//!    than three sync intervals: its workload keeps its SVID, the server's doctor reports the
//!    agent silent and the agent's doctor the server unreachable, and after the link returns
//!    the agent catches up on an entry made during the cut;
//! 3. the link between the clusters is cut (every packet dropped) for longer than the refresh
//!    hint while B prepares and activates a new CA: traffic inside each cluster never fails,
//!    and after the link returns cross-cluster traffic recovers within one refresh interval
//!    with no manual step.
//!
//! Every namespace and process is removed at the end, also on failure. The test skips with a
//! message where the machine cannot make network namespaces.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tessera_test_util::envoy::{
    Envoy, agent_cluster, common_tls, envoy_binary, hcm, listener, mtls_cluster, served_serials, start_envoy_binary,
    validator_certs,
};
use tessera_test_util::netns::{self, Link, Netns};
use tessera_test_util::{Mesh, Proc, Traffic, command, doctor_findings, free_port, http_get, wait_for};

const A_IP: &str = "10.231.0.1";
const B_IP: &str = "10.231.0.2";
const A_NODE_LINK_IP: &str = "10.232.0.1";
const NODE_IP: &str = "10.232.0.2";
/// Ports inside each namespace (each has its own port space).
const BUNDLE_PORT: u16 = 8443;
const BACK_PORT: u16 = 8080;
const LOCAL_PORT: u16 = 8081;
const CROSS_PORT: u16 = 8082;
const BACK_ADMIN: u16 = 9901;
const FRONT_ADMIN: u16 = 9902;
/// The bundle endpoints' refresh hint: the federation refresh interval of SPIFFE Federation
/// §4.4 (the server fetches at a quarter of it, so every 5 s here).
const HINT_SECS: u64 = 20;

fn wait(secs: u64, what: &str, ok: impl FnMut() -> bool) {
    wait_for(secs, what, ok, String::new)
}

fn federation_status(m: &Mesh, peer_td: &str) -> Value {
    serde_json::from_str(&m.server.cli_ok(&["federation", "show", "--trust-domain", peer_td, "--output", "json"]))
        .unwrap()
}

fn unix_now() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

/// The back Envoy: mTLS on every address of its namespace, answering 200 to any SPIFFE ID its
/// `ALL` bundles validate (its own trust domain and the federated one).
fn back(socket: &Path, me: &str) -> Value {
    let route = json!({"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "hello from back"}}});
    let mut common = common_tls("GRPC", me, "");
    common["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] =
        json!([{"san_type": "URI", "matcher": {"prefix": "spiffe://"}}]);
    let tls = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": true,
        "common_tls_context": common
    });
    let mut l = listener(BACK_PORT, hcm(route), Some(tls));
    l["address"]["socket_address"]["address"] = json!("0.0.0.0");
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": BACK_ADMIN}}},
        "static_resources": {"listeners": [l], "clusters": [agent_cluster(socket)]}
    })
}

/// The front Envoy: plain HTTP in; `LOCAL_PORT` goes to this cluster's back, `CROSS_PORT` to
/// the other cluster's, each over mTLS checking the back's SPIFFE ID. Timeouts are long enough
/// for TCP to retransmit through the lossy link (SYN retries at 1, 3, 7, 15 s).
fn front(socket: &Path, me: &str, local_back: &str, peer_ip: &str, peer_back: &str) -> Value {
    let route = |c: &str| json!({"match": {"prefix": "/"}, "route": {"cluster": c, "timeout": "60s"}});
    let upstream = |name: &str, ip: &str, peer: &str| {
        let mut c = mtls_cluster(name, BACK_PORT, "GRPC", me, peer);
        c["connect_timeout"] = json!("20s");
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["address"] =
            json!(ip);
        c
    };
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": FRONT_ADMIN}}},
        "static_resources": {
            "listeners": [listener(LOCAL_PORT, hcm(route("local")), None), listener(CROSS_PORT, hcm(route("cross")), None)],
            "clusters": [upstream("local", "127.0.0.1", local_back), upstream("cross", peer_ip, peer_back), agent_cluster(socket)]
        }
    })
}

/// One cluster: its namespace, mesh and Envoys.
struct Cluster<'a> {
    ns: &'a Netns,
    td: &'static str,
    mesh: Mesh,
    back: Option<Envoy>,
    front: Option<Envoy>,
}

impl<'a> Cluster<'a> {
    fn start(ns: &'a Netns, td: &'static str, ip: &str, extra: &str) -> Self {
        let ca = "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"20s\"";
        let endpoint = format!(
            "[federation.bundle_endpoint]\naddress = \"{ip}:{BUNDLE_PORT}\"\nprofile = \"https_spiffe\"\nrefresh_hint = \"{HINT_SECS}s\"\n{extra}"
        );
        let mesh = ns.run(|| {
            Mesh::start_custom(td, ca, "1s", |t| {
                t.replace("agent_api_address = \"127.0.0.1:", "agent_api_address = \"0.0.0.0:") + &endpoint
            })
        });
        Cluster { ns, td, mesh, back: None, front: None }
    }

    /// Registers the two Envoys (told apart by executable: Envoy itself and a copy) federating
    /// with `peer_td`, then starts them.
    fn start_envoys(&mut self, peer_td: &str, peer_ip: &str) {
        let envoy = envoy_binary();
        let copy = self.mesh.dir.path().join("envoy-back");
        std::fs::copy(&envoy, &copy).unwrap();
        let td = self.td;
        let sel = |p: &Path| format!("unix:path:{}", p.display());
        self.mesh.register_with(&format!("spiffe://{td}/front"), &sel(&envoy), &["--federates-with", peer_td]);
        self.mesh.register_with(&format!("spiffe://{td}/back"), &sel(&copy), &["--federates-with", peer_td]);
        let (dir, socket) = (self.mesh.dir.path().to_owned(), self.mesh.socket.clone());
        let (back_cfg, front_cfg) = (
            back(&socket, &format!("spiffe://{td}/back")),
            front(
                &socket,
                &format!("spiffe://{td}/front"),
                &format!("spiffe://{td}/back"),
                peer_ip,
                &format!("spiffe://{peer_td}/back"),
            ),
        );
        let (b, f) = self.ns.run(|| {
            let b = start_envoy_binary(&copy, &dir, "back", &back_cfg, BACK_ADMIN);
            let f = start_envoy_binary(&envoy, &dir, "front", &front_cfg, FRONT_ADMIN);
            (b, f)
        });
        self.back = Some(b);
        self.front = Some(f);
    }

    fn get(&self, port: u16) -> u16 {
        self.ns.run(|| http_get(&format!("127.0.0.1:{port}"), "/").map(|(c, _)| c).unwrap_or(0))
    }

    fn traffic(&self, port: u16) -> Traffic {
        self.ns.run(|| Traffic::start(&format!("127.0.0.1:{port}")))
    }

    fn back_serials(&self) -> Vec<String> {
        let id = format!("spiffe://{}/back", self.td);
        self.ns.run(|| served_serials(self.back.as_ref().unwrap(), &id))
    }

    fn front_serials(&self) -> Vec<String> {
        let id = format!("spiffe://{}/front", self.td);
        self.ns.run(|| served_serials(self.front.as_ref().unwrap(), &id))
    }

    fn front_trusts(&self, td: &str) -> usize {
        self.ns.run(|| validator_certs(self.front.as_ref().unwrap(), td))
    }
}

/// A second agent of cluster A on its own node (namespace), attested with a join token for
/// `alias`.
struct NodeAgent {
    dir: tempfile::TempDir,
    _proc: Proc,
    id: String,
}

impl NodeAgent {
    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("api.sock")
    }

    /// `tessera-agent api fetch x509 --write DIR` as this (root) process: the SPIFFE IDs and,
    /// for `want`, the certificate's serial and notAfter as openssl prints them.
    fn fetch(&self, want: &str) -> Option<(String, String)> {
        let out = self.dir.path().join("fetched");
        let _ = std::fs::remove_dir_all(&out);
        let o = command("tessera-agent")
            .args(["api", "fetch", "x509", "--write"])
            .arg(&out)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let n = text.lines().filter(|l| l.contains("spiffe://")).position(|l| l.contains(want))?;
        let pem = out.join(format!("svid.{n}.pem"));
        let x = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-enddate", "-checkend", "0", "-in"])
            .arg(&pem)
            .output()
            .unwrap();
        // -checkend 0 exits 1 for an expired certificate.
        assert!(x.status.success(), "{want}: the SVID served is expired: {}", String::from_utf8_lossy(&x.stdout));
        let t = String::from_utf8_lossy(&x.stdout);
        let field = |k: &str| t.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_default().to_owned();
        Some((field("serial="), field("notAfter=")))
    }

    /// Whether the last SVID fetched ([`NodeAgent::fetch`]) has more than `secs` left.
    fn valid_for_more_than(&self, serial: &str, secs: u32) -> bool {
        let dir = self.dir.path().join("fetched");
        let n = (0..8).find(|n| {
            let out = Command::new("openssl")
                .args(["x509", "-noout", "-serial", "-in"])
                .arg(dir.join(format!("svid.{n}.pem")))
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim() == format!("serial={serial}")
        });
        let pem = dir.join(format!("svid.{}.pem", n.expect("the SVID with that serial")));
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-checkend", &secs.to_string(), "-in"])
            .arg(pem)
            .output()
            .unwrap();
        out.status.success()
    }

    fn doctor(&self) -> Output {
        command("tessera-agent")
            .args(["doctor", "--output", "json", "--socket"])
            .arg(self.dir.path().join("data/admin.sock"))
            .output()
            .unwrap()
    }
}

fn start_node_agent(node: &Netns, a: &Mesh, alias: &str) -> NodeAgent {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cfg = std::fs::read_to_string(&a.server.config).unwrap();
    let port = cfg
        .lines()
        .find_map(|l| l.strip_prefix("agent_api_address = \"0.0.0.0:"))
        .and_then(|r| r.trim_end_matches('"').parse::<u16>().ok())
        .expect("A's agent API port");
    let token: Value =
        serde_json::from_str(&a.server.cli_ok(&["token", "generate", "--spiffe-id", alias, "--output", "json"]))
            .unwrap();
    let before = agent_ids(a);
    std::fs::write(
        d.join("agent.toml"),
        format!(
            "trust_domain = \"a.example\"\nserver_address = \"{A_NODE_LINK_IP}:{port}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\nhealth_address = \"127.0.0.1:{}\"\nsync_interval = \"1s\"\njoin_token = \"{}\"\n",
            d.join("data").display(),
            d.join("api.sock").display(),
            a.dir.path().join("bootstrap.pem").display(),
            free_port(),
            token["token"].as_str().unwrap()
        ),
    )
    .unwrap();
    let sock = d.join("api.sock");
    let proc = node.run(|| {
        let mut cmd = command("tessera-agent");
        cmd.args(["run", "--config"]).arg(d.join("agent.toml"));
        let mut p = Proc::spawn(cmd, d.join("agent.log"));
        p.wait_until(30, "the node's agent", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
        p
    });
    let id = agent_ids(a).into_iter().find(|i| !before.contains(i)).expect("the node's agent in agent list");
    NodeAgent { dir, _proc: proc, id }
}

fn agent_ids(m: &Mesh) -> Vec<String> {
    let v: Value = serde_json::from_str(&m.server.cli_ok(&["agent", "list", "--output", "json"])).unwrap();
    v["agents"].as_array().unwrap().iter().map(|a| a["spiffe_id"].as_str().unwrap().to_owned()).collect()
}

#[test]
fn two_clusters_ride_out_delay_loss_a_cut_during_ca_rotation_and_a_cut_off_node() {
    if let Some(why) = netns::unavailable() {
        eprintln!("SKIPPED: this machine cannot make network namespaces ({why}); the network fault test did not run");
        return;
    }
    let (na, nb, nn) = (Netns::create("a"), Netns::create("b"), Netns::create("node"));
    let mut clusters = Link::new("ab", (&na, "to-b", A_IP), (&nb, "to-a", B_IP));
    let mut node_link = Link::new("an", (&na, "to-node", A_NODE_LINK_IP), (&nn, "to-server", NODE_IP));

    let mut a = Cluster::start(&na, "a.example", A_IP, "[doctor]\nagent_sync_interval = \"1s\"\n");
    let mut b = Cluster::start(&nb, "b.example", B_IP, "");
    a.mesh.federate("b.example", &format!("https://{B_IP}:{BUNDLE_PORT}"), &b.mesh);
    b.mesh.federate("a.example", &format!("https://{A_IP}:{BUNDLE_PORT}"), &a.mesh);
    a.start_envoys("b.example", B_IP);
    b.start_envoys("a.example", A_IP);
    for c in [&a, &b] {
        wait(30, &format!("{}: local and cross-cluster calls answer 200", c.td), || {
            c.get(LOCAL_PORT) == 200 && c.get(CROSS_PORT) == 200
        });
    }

    let node_alias = "spiffe://a.example/node/second";
    let node = start_node_agent(&nn, &a.mesh, node_alias);
    let sel = format!("unix:uid:{}", tessera_test_util::my_uid());
    let reg = |id: &str, ttl: &str| {
        a.mesh.server.cli_ok(&[
            "entry",
            "create",
            "--spiffe-id",
            id,
            "--parent-id",
            node_alias,
            "--selector",
            &sel,
            "--x509-svid-ttl",
            ttl,
        ]);
    };
    // 60 s: the cut below lasts past the half-life, when the agent would renew it.
    reg("spiffe://a.example/second/w", "60s");
    wait(20, "the second node's workload SVID", || node.fetch("spiffe://a.example/second/w").is_some());

    // 1. 300 ms delay and 5 % loss each way for a minute.
    let segs = (na.tcp_segments(), nb.tcp_segments());
    let frames = clusters.stats();
    clusters.set(300, 5.0);
    let lossy_from = (Instant::now(), unix_now());
    // Three callers each way across the link (a call takes about 2 s there: 3 round trips).
    let inside = [a.traffic(LOCAL_PORT), b.traffic(LOCAL_PORT)];
    let across = [&a, &b].map(|c| [0; 3].map(|_| c.traffic(CROSS_PORT)));

    // 2. Meanwhile the second node is cut off from its server.
    let (serial, not_after) = node.fetch("spiffe://a.example/second/w").unwrap();
    node_link.cut();
    let cut_at = Instant::now();
    let silent = |code: &str| {
        doctor_findings(&a.mesh.server.cli(&["doctor", "--output", "json"]))
            .iter()
            .any(|(c, _, s)| c == code && *s == node.id)
    };
    wait(30, "server doctor: agent-silent for the cut-off node", || silent("agent-silent"));
    wait(30, "agent doctor: upstream-unreachable on the cut-off node", || {
        doctor_findings(&node.doctor()).iter().any(|(c, _, _)| c == "upstream-unreachable")
    });
    reg("spiffe://a.example/second/late", "60s");
    // Past 3 sync intervals and the SVID's renewal (at half its life less a tenth at most):
    // until 28 s of its 60 s are left.
    while cut_at.elapsed() < Duration::from_secs(14) || node.valid_for_more_than(&serial, 28) {
        assert!(cut_at.elapsed() < Duration::from_secs(60), "the SVID's renewal time never came");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        node.fetch("spiffe://a.example/second/w"),
        Some((serial.clone(), not_after)),
        "the cut-off node's workload lost its SVID"
    );
    assert!(node.fetch("spiffe://a.example/second/late").is_none(), "the node reached its server through the cut");
    node_link.heal();
    let back_at = Instant::now();
    wait(30, "the node catching up on the entry made during the cut", || {
        node.fetch("spiffe://a.example/second/late").is_some()
    });
    let catch_up = back_at.elapsed();
    wait(30, "the server's doctor no longer reports the node", || !silent("agent-silent"));
    wait(30, "the node renewing its workload's SVID", || {
        node.fetch("spiffe://a.example/second/w").is_some_and(|(s, _)| s != serial)
    });
    eprintln!(
        "node cut off {:.1} s: SVID kept; caught up {:.1} s after the link returned",
        (back_at - cut_at).as_secs_f64(),
        catch_up.as_secs_f64()
    );

    while lossy_from.0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(500));
    }
    let [a_inside, b_inside] = inside;
    a_inside.assert_no_failures("A inside, link lossy");
    b_inside.assert_no_failures("B inside, link lossy");
    let [a_ok, b_ok] = across.map(|callers| {
        let (mut ok, mut failed) = (0, Vec::new());
        for t in callers {
            let (o, f) = t.finish();
            ok += o;
            failed.extend(f);
        }
        assert!(failed.is_empty(), "calls across the lossy link failed: {failed:?}");
        assert!(ok > 30, "too few calls across the lossy link: {ok}");
        ok
    });
    let after = (na.tcp_segments(), nb.tcp_segments());
    for (c, f) in [(&a, "b.example"), (&b, "a.example")] {
        let s = federation_status(&c.mesh, f);
        let last = s["last_refresh"].as_i64().unwrap();
        assert!(last >= lossy_from.1 + 45, "{}: no federation refresh succeeded late in the lossy minute: {s}", c.td);
    }
    let frames = {
        let now = clusters.stats();
        (now.0 - frames.0, now.1 - frames.1)
    };
    clusters.heal();
    eprintln!(
        "lossy link, 60 s: {a_ok} A->B and {b_ok} B->A requests, 0 failed; the link dropped {} of {} frames; TCP segments retransmitted: A {} of {}, B {} of {}",
        frames.1,
        frames.0 + frames.1,
        after.0.1 - segs.0.1,
        after.0.0 - segs.0.0,
        after.1.1 - segs.1.1,
        after.1.0 - segs.1.0
    );

    // 3. The link cut for longer than the refresh hint while B rotates its CA.
    let inside = [a.traffic(LOCAL_PORT), b.traffic(LOCAL_PORT)];
    let old = (b.back_serials(), b.front_serials());
    clusters.cut();
    let cut_at = Instant::now();
    b.mesh.server.cli_ok(&["localauthority", "x509", "prepare"]);
    wait(30, "B's prepared CA in B's front Envoy", || b.front_trusts("b.example") == 2);
    b.mesh.server.cli_ok(&["localauthority", "x509", "activate"]);
    wait(40, "B's Envoys serving certificates from B's new CA", || {
        let (back, front) = (b.back_serials(), b.front_serials());
        !back.is_empty()
            && !front.is_empty()
            && back.iter().chain(&front).all(|s| !old.0.contains(s) && !old.1.contains(s))
    });
    while cut_at.elapsed() < Duration::from_secs(HINT_SECS + 2) {
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(a.front_trusts("b.example"), 1, "B's new CA reached A through the cut");
    clusters.heal();
    let back_at = Instant::now();
    wait_for(
        HINT_SECS + 30,
        "cross-cluster calls both ways after the link returned",
        || a.get(CROSS_PORT) == 200 && b.get(CROSS_PORT) == 200,
        || {
            format!(
                "A -> B {}, B -> A {}; A's front trusts {} of B's CAs, B's front {} of A's; A's view of B: {}; B's view of A: {}\nA front log: {}",
                a.get(CROSS_PORT),
                b.get(CROSS_PORT),
                a.front_trusts("b.example"),
                b.front_trusts("a.example"),
                federation_status(&a.mesh, "b.example"),
                federation_status(&b.mesh, "a.example"),
                a.front.as_ref().unwrap().proc.log()
            )
        },
    );
    let recovery = back_at.elapsed();
    let [a_inside, b_inside] = inside;
    a_inside.assert_no_failures("A inside, link cut, B rotating");
    b_inside.assert_no_failures("B inside, link cut, B rotating");
    eprintln!(
        "link cut {:.1} s while B rotated its CA: inside traffic 0 failed; cross-cluster calls back {:.1} s after the link returned (refresh hint {HINT_SECS} s)",
        (back_at - cut_at).as_secs_f64(),
        recovery.as_secs_f64()
    );
    assert!(
        recovery <= Duration::from_secs(HINT_SECS),
        "cross-cluster traffic took {recovery:?} to recover, more than one refresh interval ({HINT_SECS} s)"
    );
}
