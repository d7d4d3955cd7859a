//! Kubernetes node and workload attestation with the real binaries, against a FAKE API server
//! and kubelet (there is no real Kubernetes here; see `tessera_test_util::fake_k8s`):
//!
//! - the agent attests with its pod's projected token (`k8s_psat`), proven by TokenReview and
//!   the pod's node; its ID names the cluster and the node UID; node labels become selectors;
//! - a workload runs in a real cgroup named like a kubelet's (`kubepods/…/pod<uid>/<cid>`),
//!   the `k8s` workload attestor finds its pod in the kubelet's list and the entry's
//!   `k8s:` selectors match; a pod that shows up late is found by the bounded retry; one that
//!   never shows up is given up with a log line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tessera_test_util::fake_k8s::{FakeCluster, PSAT_AGENT_ID, pod, with_container};
use tessera_test_util::{Mesh, bin, wait_for};

const CID: &str = "4f1b7c2e9d3a5b6c8e0f1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f";
const CART_UID: &str = "0d3f5c2a-6b1e-4c8d-9a7f-1e2d3c4b5a69";
const LATE_UID: &str = "7e6d5c4b-3a29-4180-8f7e-6d5c4b3a2910";
const NEVER_UID: &str = "11111111-2222-4333-8444-555555555555";
const WEB_UID: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
const OTHER_NODE_UID: &str = "22222222-3333-4444-8555-666666666666";

/// A cgroup (v1, `pids` controller) shaped like a kubelet's, removed on drop.
struct PodCgroup(PathBuf, Vec<PathBuf>);

impl PodCgroup {
    fn new(pod_uid: &str) -> Self {
        Self::under("kubepods/besteffort", pod_uid)
    }

    /// The same shape under `base` (relative to the `pids` hierarchy's root).
    fn under(base: &str, pod_uid: &str) -> Self {
        let dir = Path::new("/sys/fs/cgroup/pids").join(base).join(format!("pod{pod_uid}")).join(CID);
        // Only the directories this creates are removed again.
        let created: Vec<PathBuf> = dir
            .ancestors()
            .take_while(|a| *a != Path::new("/sys/fs/cgroup/pids"))
            .filter(|a| !a.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| {
            panic!("cannot create cgroup {} (the test needs root and cgroupfs): {e}", dir.display())
        });
        Self(dir, created)
    }

    /// Runs `tessera-agent api fetch x509` inside this cgroup (the shell moves itself in,
    /// then execs the client, so the client's pid is in the pod's cgroup).
    fn fetch(&self, socket: &Path) -> std::process::Child {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec {} api fetch x509 --socket {}",
                self.0.display(),
                bin("tessera-agent").display(),
                socket.display()
            ))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Innermost first; a parent still holding another test's pod stays.
        for dir in self.0.ancestors().take(4).chain(self.1.iter().map(PathBuf::as_path)) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn agents_attest_by_projected_token_and_pods_get_identities_from_the_kubelet() {
    let files = tempfile::tempdir().unwrap();
    let k8s =
        FakeCluster::with_agent_node("tessera-agent-n1", &[("topology.kubernetes.io/zone", "z1"), ("secret", "x")]);
    k8s.add_pod(pod("tessera-system", "intruder", "pod-uid-intruder", "default", "node-1"));
    k8s.add_pod(with_container(
        pod("shop", "cart-1", CART_UID, "cart", "node-1"),
        "app",
        "registry.example/cart:1.4",
        CID,
        &[("app", "cart")],
    ));
    let kubeconfig = files.path().join("kubeconfig");
    let agent_token = files.path().join("agent-token");
    std::fs::write(
        &agent_token,
        k8s.token("tessera-system", "tessera-agent", Some("tessera-agent-n1"), &["tessera-server"], 3600),
    )
    .unwrap();
    let kubelet_ca = files.path().join("kubelet-ca.pem");
    std::fs::write(&kubelet_ca, &k8s.ca_pem).unwrap();
    let kubelet_token = files.path().join("sa-token");
    std::fs::write(&kubelet_token, "kubelet-reader-token").unwrap();

    let server_extra = "\n[[node_attestor]]\ntype = \"join_token\"".to_owned()
        + &k8s.psat_attestor(
            &kubeconfig,
            "allowed_node_label_keys = [\"topology.kubernetes.io/zone\"]\nauto_pod_identity = true\n",
        );
    let agent_id = PSAT_AGENT_ID;
    let agent_attestation = format!(
        r#"[node_attestor]
type = "k8s_psat"
cluster = "cluster-a"
token_path = "{token}"
[[workload_attestor]]
type = "k8s"
kubelet_url = "{url}"
kubelet_ca_path = "{ca}"
token_path = "{sa}"
max_poll_attempts = 30
poll_retry_interval = "100ms"
[[workload_attestor]]
type = "unix"
"#,
        token = agent_token.display(),
        url = k8s.url,
        ca = kubelet_ca.display(),
        sa = kubelet_token.display(),
    );
    let mesh = Mesh::start_attested(
        "example.org",
        "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"",
        "200ms",
        |t| t + &server_extra,
        agent_id,
        |_| agent_attestation.clone(),
    );

    // The agent's ID and selectors come from TokenReview, the pod and the node.
    let shown = mesh.server.cli_ok(&["agent", "show", "--spiffe-id", agent_id]);
    for s in [
        "k8s_psat:cluster:cluster-a",
        "k8s_psat:agent_ns:tessera-system",
        "k8s_psat:agent_sa:tessera-agent",
        "k8s_psat:agent_node_name:node-1",
        "k8s_psat:agent_node_label:topology.kubernetes.io/zone:z1",
    ] {
        assert!(shown.contains(s), "missing {s} in {shown}");
    }
    assert!(!shown.contains("secret"), "a node label not allowed became a selector: {shown}");
    assert!(k8s.reviews() >= 1);

    // A pod's identity from its cgroup and the kubelet.
    let cart = "spiffe://example.org/ns/shop/sa/cart";
    mesh.register_with(cart, "k8s:ns:shop", &["--selector", "k8s:sa:cart", "--selector", "k8s:container-name:app"]);
    let cg = PodCgroup::new(CART_UID);
    let got = std::cell::RefCell::new(String::new());
    wait_for(
        20,
        "the pod's SVID",
        || {
            let out = cg.fetch(&mesh.socket).wait_with_output().unwrap();
            *got.borrow_mut() = text(&out);
            out.status.success() && got.borrow().contains(cart)
        },
        || got.borrow().clone(),
    );
    // A process outside the pod gets nothing.
    let outside = mesh.agent_cli(&["api", "fetch", "x509"]);
    assert!(!text(&outside).contains(cart), "a process outside the pod got the pod's SVID: {}", text(&outside));
    // Nor does one that places itself in a look-alike of the pod's cgroup inside a subtree a
    // user may write to (systemd's user manager delegates one): only the kubelet's own
    // `kubepods` under the cgroup root counts (F2 of the second review).
    let delegated = PodCgroup::under("user.slice/user-1000.slice/user@1000.service/kubepods/besteffort", CART_UID);
    let out = delegated.fetch(&mesh.socket).wait_with_output().unwrap();
    assert!(!text(&out).contains(cart), "a delegated cgroup posed as the pod: {}", text(&out));

    // With auto_pod_identity, a pod on the agent's node gets spiffe://<td>/ns/<ns>/sa/<sa>
    // without any entry; a pod of a service account with no pod on this node does not.
    k8s.add_pod(with_container(pod("web", "frontend-1", WEB_UID, "frontend", "node-1"), "app", "web:1", CID, &[]));
    let web = PodCgroup::new(WEB_UID);
    let got = std::cell::RefCell::new(String::new());
    wait_for(
        20,
        "the automatic identity",
        || {
            let out = web.fetch(&mesh.socket).wait_with_output().unwrap();
            *got.borrow_mut() = text(&out);
            got.borrow().contains("spiffe://example.org/ns/web/sa/frontend")
        },
        || got.borrow().clone(),
    );
    assert!(mesh.server.cli_ok(&["entry", "show", "--output", "json"]).contains("ns/shop/sa/cart"));
    assert!(
        !mesh.server.cli_ok(&["entry", "show", "--output", "json"]).contains("ns/web/sa/frontend"),
        "no entry was written"
    );
    k8s.add_node("node-2", "node-uid-2", &[]);
    k8s.add_pod(with_container(pod("batch", "job-1", OTHER_NODE_UID, "batch", "node-2"), "app", "batch:1", CID, &[]));
    let other = PodCgroup::new(OTHER_NODE_UID);
    std::thread::sleep(Duration::from_secs(6)); // past the server's node pod cache
    let out = other.fetch(&mesh.socket).wait_with_output().unwrap();
    assert!(!text(&out).contains("ns/batch/sa/batch"), "a pod of another node got an identity: {}", text(&out));

    // A pod the kubelet lists only later is found by the retry.
    let late = "spiffe://example.org/ns/shop/sa/late";
    mesh.register_with(late, "k8s:ns:shop", &["--selector", "k8s:sa:late"]);
    std::thread::sleep(Duration::from_millis(600)); // one sync
    let late_cg = PodCgroup::new(LATE_UID);
    let child = late_cg.fetch(&mesh.socket);
    std::thread::sleep(Duration::from_millis(700));
    k8s.add_pod(with_container(pod("shop", "late-1", LATE_UID, "late", "node-1"), "app", "late:1", CID, &[]));
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success() && text(&out).contains(late), "late pod: {}", text(&out));

    // A pod that never shows up is given up, with one clear log line.
    let never_cg = PodCgroup::new(NEVER_UID);
    let out = never_cg.fetch(&mesh.socket).wait_with_output().unwrap();
    assert!(!text(&out).contains("spiffe://example.org/ns/"), "{}", text(&out));
    let log = std::fs::read_to_string(mesh.dir.path().join("agent.log")).unwrap();
    assert!(log.contains("Giving up on the caller's pod") && log.contains(NEVER_UID), "{log}");

    // A token of a service account outside the allow list does not attest.
    let bad = files.path().join("bad-token");
    std::fs::write(&bad, k8s.token("tessera-system", "default", Some("intruder"), &["tessera-server"], 3600)).unwrap();
    let cfg = std::fs::read_to_string(&mesh.agent_config)
        .unwrap()
        .replace(&agent_token.display().to_string(), &bad.display().to_string())
        .replace(
            &mesh.dir.path().join("agent").display().to_string(),
            &files.path().join("agent2").display().to_string(),
        )
        .replace(&mesh.socket.display().to_string(), &files.path().join("agent2.sock").display().to_string());
    let cfg_path = files.path().join("agent2.toml");
    let cfg: String = cfg
        .lines()
        .map(|l| {
            if l.starts_with("health_address") {
                format!("health_address = \"127.0.0.1:{}\"\n", tessera_test_util::free_port())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&cfg_path, cfg).unwrap();
    let out = Command::new(bin("tessera-agent")).args(["run", "--config"]).arg(&cfg_path).output().unwrap();
    assert!(!out.status.success(), "an agent outside the allow list attested");
    assert!(text(&out).contains("allow list"), "{}", text(&out));
}

/// The server's roots as the publisher writes them.
fn roots(s: &tessera_test_util::ServerProc) -> String {
    s.cli_ok(&["bundle", "show"])
}

#[test]
fn one_replica_at_a_time_keeps_istio_ca_root_cert_in_every_namespace() {
    let files = tempfile::tempdir().unwrap();
    let k8s = FakeCluster::start("https://kubernetes.default.svc.cluster.local");
    k8s.add_namespace("shop");
    let kubeconfig = files.path().join("kubeconfig");
    k8s.write_kubeconfig(&kubeconfig, "cluster-a");
    let publisher = format!(
        r#"
[[bundle_publisher]]
cluster = "cluster-a"
kubeconfig = "{}"
istio_root_cert = true
configmaps = [{{ namespace = "tessera-system", name = "tessera-bundle", key = "bundle.crt" }}]
lease_duration = "2s"
resync_interval = "1s"
"#,
        kubeconfig.display()
    );
    // Two replicas (each with its own store here, so their roots differ and show who wrote).
    let start = |name: &str| {
        let dir = files.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let text = tessera_test_util::server_config_for(
            "example.org",
            &dir,
            "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"",
        )
        .replace("[server]\n", &format!("[server]\ninstance_id = \"{name}\"\n"))
            + &publisher;
        tessera_test_util::ServerProc::start_text(&dir, &text)
    };
    let mut replicas = [start("a"), start("b")];
    let holder = std::cell::RefCell::new(None::<String>);
    wait_for(
        20,
        "a leader and a published ConfigMap",
        || {
            *holder.borrow_mut() = k8s.lease_holder("tessera-system", "tessera-bundle-publisher");
            k8s.configmap("default", "istio-ca-root-cert").is_some() && holder.borrow().is_some()
        },
        || format!("{:?} {:?}", k8s.writes(), holder.borrow()),
    );
    let leader = usize::from(holder.borrow().as_deref().unwrap().ends_with("/b"));
    let follower = 1 - leader;
    let leader_roots = roots(&replicas[leader]);
    assert_ne!(leader_roots, roots(&replicas[follower]));
    for ns in ["default", "shop"] {
        let got = k8s.configmap(ns, "istio-ca-root-cert").unwrap_or_default();
        assert_eq!(got.get("root-cert.pem"), Some(&leader_roots), "namespace {ns}");
    }
    assert_eq!(k8s.configmap("tessera-system", "tessera-bundle").unwrap()["bundle.crt"], leader_roots);

    // The follower writes nothing while the leader renews; a new namespace gets the root.
    k8s.add_namespace("late");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(k8s.configmap("default", "istio-ca-root-cert").unwrap()["root-cert.pem"], leader_roots);
    assert_eq!(k8s.configmap("late", "istio-ca-root-cert").unwrap()["root-cert.pem"], leader_roots);

    // A prepared CA is published with the old one.
    replicas[leader].cli_ok(&["localauthority", "x509", "prepare"]);
    let rotated = roots(&replicas[leader]);
    assert_eq!(tessera_identity::pem::decode_certs(rotated.as_bytes()).unwrap().len(), 2);
    wait_for(
        10,
        "the prepared CA in istio-ca-root-cert",
        || k8s.configmap("shop", "istio-ca-root-cert").unwrap()["root-cert.pem"] == rotated,
        || format!("{:?}", k8s.configmap("shop", "istio-ca-root-cert")),
    );

    // The leader dies without releasing the Lease: the other replica takes over after it expires.
    replicas[leader].kill9();
    let follower_roots = roots(&replicas[follower]);
    let expect = if follower == 1 { "/b" } else { "/a" };
    wait_for(
        20,
        "the other replica to lead and publish",
        || {
            k8s.lease_holder("tessera-system", "tessera-bundle-publisher").is_some_and(|h| h.ends_with(expect))
                && k8s.configmap("default", "istio-ca-root-cert").unwrap()["root-cert.pem"] == follower_roots
        },
        || format!("{:?}", k8s.lease_holder("tessera-system", "tessera-bundle-publisher")),
    );
}
