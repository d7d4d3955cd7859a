//! Day-2 tools against the real binaries: `doctor` (each finding code planted as a real fault
//! and asserted by code, severity and subject; a healthy deployment has none), `validate`,
//! `debug info` (compared with what the Admin API says), JSON logs, and the monitoring
//! artefacts (every metric the dashboard and alert rules use exists on a running server or
//! agent; promtool checks and unit-tests the rules).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tessera_test_util::doctor_findings as findings;
use tessera_test_util::postgres::TestPostgres;
use tessera_test_util::{Mesh, ServerProc, bin, http_get, repo, server_config, wait_for};

/// `(code, severity, subject)` of each finding.
fn has(f: &[(String, String, String)], code: &str, severity: &str, subject_contains: &str) -> bool {
    f.iter().any(|(c, s, subj)| c == code && s == severity && subj.contains(subject_contains))
}

fn agent_admin(mesh: &Mesh) -> PathBuf {
    mesh.dir.path().join("agent/admin.sock")
}

/// `tessera-agent <args> --socket <admin socket>`.
fn agent(mesh: &Mesh, args: &[&str]) -> Output {
    Command::new(bin("tessera-agent")).args(args).arg("--socket").arg(agent_admin(mesh)).output().unwrap()
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_healthy_deployment_has_no_findings_and_debug_info_says_what_the_admin_api_says() {
    let mesh = Mesh::start("ca_ttl = \"24h\"", "1s");
    mesh.register("spiffe://example.org/w", &[]);
    mesh.wait_for_svid("spiffe://example.org/w");

    let out = mesh.server.cli(&["doctor", "--output", "json"]);
    let f = findings(&out);
    assert!(f.is_empty(), "server findings on a healthy deployment: {f:?}");
    assert_eq!(out.status.code(), Some(0));
    // The config named too: still healthy, and the text form ends with its summary.
    let out = mesh.server.cli(&["doctor", "--config", mesh.server.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("healthy: 0 errors, 0 warnings, 0 info\n"));

    let out = agent(&mesh, &["doctor", "--output", "json"]);
    let f = findings(&out);
    assert!(!f.iter().any(|(_, s, _)| s != "info"), "agent findings on a healthy deployment: {f:?}");
    assert_eq!(out.status.code(), Some(0));

    // Server `debug info` against the Admin API's own answers.
    let info = json(&mesh.server.cli(&["debug", "info", "--output", "json"]));
    let agents = json(&mesh.server.cli(&["agent", "list", "--output", "json"]));
    let entries = json(&mesh.server.cli(&["entry", "show", "--output", "json"]));
    let auths = json(&mesh.server.cli(&["localauthority", "x509", "show", "--output", "json"]));
    assert_eq!(info["counts"]["agents"].as_u64().unwrap() as usize, agents["agents"].as_array().unwrap().len());
    assert_eq!(info["counts"]["entries"].as_u64().unwrap() as usize, entries["entries"].as_array().unwrap().len());
    let active = auths["authorities"].as_array().unwrap().iter().find(|a| a["status"] == "active").unwrap().clone();
    let info_active = info["authorities"].as_array().unwrap().iter().find(|a| a["status"] == "active").unwrap();
    assert_eq!(info_active["authority_id"], active["authority_id"]);
    assert_eq!(info_active["not_after"], active["expires_at"]);
    assert_eq!(info["svid_chain"][0]["spiffe_id"], "spiffe://example.org/tessera/server");
    assert!(info["last_agent_sync"].as_i64().unwrap() > 0, "{info}");
    assert!(info["version"].is_string() && info["uptime_seconds"].is_u64());

    // Agent `debug info` against the agent list and the Workload API.
    let a = json(&agent(&mesh, &["debug", "info", "--output", "json"]));
    let listed = &agents["agents"][0];
    assert_eq!(a["agent_id"], listed["spiffe_id"]);
    assert_eq!(a["svid_chain"][0]["serial"], listed["serial"]);
    // The agent reports its version; `agent list` shows it.
    assert_eq!(listed["version"], a["version"], "{listed}");
    assert_eq!(a["counts"]["x509_svids"], 1);
    assert!(a["last_sync"].as_i64().unwrap() > 0);
    assert!(a["clock_skew_ms"].as_i64().unwrap().abs() < 2000, "{a}");
    let jwks: Value = serde_json::from_str(&mesh.server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    assert_eq!(a["bundle_sequence"], jwks["spiffe_sequence"], "{jwks}");
    assert_eq!(info["bundle_sequence"], jwks["spiffe_sequence"]);
    // The text form prints the same facts.
    let text = String::from_utf8(agent(&mesh, &["debug", "info"]).stdout).unwrap();
    assert!(text.contains(listed["spiffe_id"].as_str().unwrap()), "{text}");
}

#[test]
fn a_stopped_agent_is_reported_silent_and_a_cut_agent_reports_the_server_unreachable() {
    let mut mesh = Mesh::start_in("example.org", "ca_ttl = \"24h\"", "1s", "[doctor]\nagent_sync_interval = \"1s\"\n");
    mesh.register("spiffe://example.org/w", &[]);
    mesh.wait_for_svid("spiffe://example.org/w");
    let agent_id = json(&mesh.server.cli(&["agent", "list", "--output", "json"]))["agents"][0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The server stops: the agent keeps serving and says why it cannot sync.
    mesh.server.kill9();
    wait_for(
        20,
        "agent doctor: upstream-unreachable",
        || has(&findings(&agent(&mesh, &["doctor", "--output", "json"])), "upstream-unreachable", "error", "127.0.0.1"),
        || String::from_utf8_lossy(&agent(&mesh, &["doctor"]).stdout).into_owned(),
    );
    assert_eq!(agent(&mesh, &["doctor"]).status.code(), Some(1));
    mesh.server.spawn();
    wait_for(
        20,
        "agent doctor healthy again",
        || agent(&mesh, &["doctor"]).status.code() == Some(0),
        || String::from_utf8_lossy(&agent(&mesh, &["doctor"]).stdout).into_owned(),
    );

    // The agent stops: after 3 sync intervals the server reports it by its ID.
    mesh.agent.take();
    wait_for(
        20,
        "server doctor: agent-silent",
        || has(&findings(&mesh.server.cli(&["doctor", "--output", "json"])), "agent-silent", "warning", &agent_id),
        || String::from_utf8_lossy(&mesh.server.cli(&["doctor"]).stdout).into_owned(),
    );
    assert_eq!(mesh.server.cli(&["doctor"]).status.code(), Some(1));
}

#[test]
fn an_entry_no_workload_has_received_is_entry_unmatched_and_only_informational() {
    let alias = "spiffe://example.org/node/e2e";
    let mesh = Mesh::start_attested(
        "example.org",
        "ca_ttl = \"24h\"",
        "1s",
        |t| t,
        alias,
        |server| {
            let token: Value =
                serde_json::from_str(&server.cli_ok(&["token", "generate", "--spiffe-id", alias, "--output", "json"]))
                    .unwrap();
            format!("join_token = \"{}\"\n[doctor]\nentry_unmatched_after = \"1s\"\n", token["token"].as_str().unwrap())
        },
    );
    let used = "spiffe://example.org/used";
    mesh.register(used, &[]);
    mesh.wait_for_svid(used);
    // A uid no process here runs as: the agent gets the entry, no workload ever matches it.
    let unused = "spiffe://example.org/unused";
    mesh.register_with(unused, "unix:uid:54321", &[]);
    let doctor = || agent(&mesh, &["doctor", "--output", "json"]);
    // (`has` matches the subject by substring: ".../used" is not in ".../unused".)
    let reported = |f: &[(String, String, String)], id: &str| has(f, "entry-unmatched", "info", id);
    wait_for(
        20,
        "agent doctor: entry-unmatched for the entry nobody receives",
        || reported(&findings(&doctor()), unused),
        || String::from_utf8_lossy(&doctor().stdout).into_owned(),
    );
    // Well past the threshold, the entry a workload received is still not reported.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = doctor();
    let f = findings(&out);
    assert!(reported(&f, unused), "{f:?}");
    assert!(!reported(&f, used), "an entry whose SVID a workload received: {f:?}");
    assert_eq!(out.status.code(), Some(0), "informational findings alone are healthy: {f:?}");
    let text = String::from_utf8_lossy(&agent(&mesh, &["doctor"]).stdout).into_owned();
    assert!(text.contains("unix:uid:54321"), "the message names the selectors: {text}");
}

#[test]
fn a_peer_that_cannot_be_reached_is_federation_stale_with_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let text = server_config(dir.path(), "ca_ttl = \"24h\"")
        + "[[federation.trust_domains]]\ntrust_domain = \"peer.example\"\nbundle_endpoint_url = \"https://127.0.0.1:1/bundle\"\nprofile = \"https_web\"\n";
    let server = ServerProc::start_text(dir.path(), &text);
    wait_for(
        20,
        "federation-stale for peer.example",
        || has(&findings(&server.cli(&["doctor", "--output", "json"])), "federation-stale", "warning", "peer.example"),
        String::new,
    );
    let out = server.cli(&["doctor", "--output", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = v["findings"].as_array().unwrap().iter().find(|f| f["code"] == "federation-stale").unwrap();
    assert!(f["message"].as_str().unwrap().contains("127.0.0.1:1"), "{f}");
    assert_eq!(out.status.code(), Some(1));
}

/// A root whose profile is given by `edit`, valid for `days`, written as PEM files in `dir`.
fn upstream_root(dir: &Path, days: i64, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "Upstream Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
    edit(&mut p);
    let root = p.self_signed(&key).unwrap();
    std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
    std::fs::write(dir.join("root.key"), key.serialize_pem()).unwrap();
    format!(
        "[upstream_authority]\ntype = \"disk\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        dir.join("root.pem").display(),
        dir.join("root.key").display()
    )
}

#[test]
fn an_upstream_ca_with_a_server_only_eku_and_a_near_expiry_is_diagnosed_and_refused_by_validate() {
    // istio #27193: a `cacerts` CA with extKeyUsage serverAuth only; and it expires in 10 days.
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream_root(dir.path(), 10, |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    });
    let text = server_config(dir.path(), "ca_ttl = \"24h\"") + &upstream;
    let server = ServerProc::start_text(dir.path(), &text);
    let out = server.cli(&["doctor", "--output", "json"]);
    let f = findings(&out);
    assert!(has(&f, "ca-profile-invalid", "error", ""), "{f:?}");
    assert!(has(&f, "root-expiring", "warning", ""), "{f:?}");
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad = v["findings"].as_array().unwrap().iter().find(|f| f["code"] == "ca-profile-invalid").unwrap();
    assert!(bad["message"].as_str().unwrap().contains("extKeyUsage"), "{bad}");
    // Most severe first.
    assert_eq!(v["findings"][0]["severity"], "error");

    // `validate` finds the same before anything starts, at the key that names the file.
    let out = Command::new(bin("tessera-server")).args(["validate", "--config"]).arg(&server.config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("upstream_authority.cert_file: the upstream CA has an extKeyUsage"), "{text}");

    // A sound root, far from expiry: no finding.
    let dir2 = tempfile::tempdir().unwrap();
    let upstream = upstream_root(dir2.path(), 400, |_| {});
    let server2 = ServerProc::start_text(dir2.path(), &(server_config(dir2.path(), "ca_ttl = \"24h\"") + &upstream));
    let f = findings(&server2.cli(&["doctor", "--output", "json"]));
    assert!(f.is_empty(), "{f:?}");
}

#[test]
fn an_authority_near_its_end_with_no_successor_is_ca_expiring() {
    // The horizon is longer than the CA's life: the fresh CA has no prepared successor yet.
    let dir = tempfile::tempdir().unwrap();
    let text = server_config(dir.path(), "ca_ttl = \"2h\"") + "[doctor]\nca_expiry_horizon = \"3h\"\n";
    let server = ServerProc::start_text(dir.path(), &text);
    let out = server.cli(&["doctor", "--output", "json"]);
    let f = findings(&out);
    let active = json(&server.cli(&["localauthority", "x509", "show", "--output", "json"]))["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["status"] == "active")
        .unwrap()["authority_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(has(&f, "ca-expiring", "warning", &active), "{f:?}");
    // Once a successor is prepared, the finding goes.
    server.cli_ok(&["localauthority", "x509", "prepare"]);
    let f = findings(&server.cli(&["doctor", "--output", "json"]));
    assert!(!f.iter().any(|(c, _, _)| c == "ca-expiring"), "{f:?}");
}

#[test]
fn a_stopped_store_is_store_unavailable() {
    let pg = TestPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let db = pg.database("doctor");
    let text = server_config(dir.path(), "ca_ttl = \"24h\"")
        .replace("[store]\ntype = \"sled\"", &format!("[store]\ntype = \"postgres\"\nconnection_string = \"{db}\""))
        .replace("[server]\n", "[server]\ninstance_id = \"doctor-1\"\n");
    let server = ServerProc::start_text(dir.path(), &text);
    assert_eq!(
        server.cli(&["doctor"]).status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&server.cli(&["doctor"]).stdout)
    );
    drop(pg);
    let out = server.cli(&["doctor", "--output", "json"]);
    let f = findings(&out);
    assert!(has(&f, "store-unavailable", "error", "store"), "{f:?}");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn config_and_socket_faults_and_an_unreachable_program_have_their_exit_codes() {
    let mesh = Mesh::start("ca_ttl = \"24h\"", "1s");
    // A config with a bad value: config-invalid at its key, exit 1 (the server still answers).
    let bad = mesh.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&mesh.server.config).unwrap() + "[doctor]\nroot_expiry_horizon = \"soon\"\n",
    )
    .unwrap();
    let out = mesh.server.cli(&["doctor", "--output", "json", "--config", bad.to_str().unwrap()]);
    assert!(has(&findings(&out), "config-invalid", "error", "doctor.root_expiry_horizon"), "{:?}", findings(&out));
    assert_eq!(out.status.code(), Some(1));
    // validate lists it with its key path and exits 1; a good file exits 0.
    let out = Command::new(bin("tessera-server")).args(["validate", "--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("doctor.root_expiry_horizon"));
    let out =
        Command::new(bin("tessera-server")).args(["validate", "--config"]).arg(&mesh.server.config).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let out = Command::new(bin("tessera-agent"))
        .args(["validate", "--output", "json", "--config"])
        .arg(&mesh.agent_config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    // A file it names that is missing: every problem with its key.
    let agent_bad = mesh.dir.path().join("agent-bad.toml");
    std::fs::write(
        &agent_bad,
        std::fs::read_to_string(&mesh.agent_config)
            .unwrap()
            .replace("data_dir = \"", "data_dir = \"/nonexistent")
            .replace("bootstrap.pem", "missing.pem"),
    )
    .unwrap();
    let out = Command::new(bin("tessera-agent"))
        .args(["validate", "--output", "json", "--config"])
        .arg(&agent_bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert!(v["problems"].as_array().unwrap().iter().any(|p| p["key"] == "trust_bundle_path"), "{v}");

    // The Workload API socket loses its mode: workloads of other users cannot connect.
    std::fs::set_permissions(&mesh.socket, std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = agent(&mesh, &["doctor", "--output", "json"]);
    assert!(
        has(&findings(&out), "socket-permissions", "warning", mesh.socket.to_str().unwrap()),
        "{:?}",
        findings(&out)
    );
    assert_eq!(out.status.code(), Some(1));
    std::fs::set_permissions(&mesh.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The server's admin socket opened to everyone.
    std::fs::set_permissions(&mesh.server.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = mesh.server.cli(&["doctor", "--output", "json"]);
    assert!(has(&findings(&out), "socket-permissions", "warning", "admin.sock"), "{:?}", findings(&out));
    std::fs::set_permissions(&mesh.server.socket, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Nothing listening: exit 2, in both programs.
    let nowhere = mesh.dir.path().join("nowhere.sock");
    let out = Command::new(bin("tessera-server")).args(["doctor", "--socket"]).arg(&nowhere).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("doctor could not run"));
    let out = Command::new(bin("tessera-agent"))
        .args(["doctor", "--output", "json", "--socket"])
        .arg(&nowhere)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("could not run"), "{v}");
}

#[test]
fn stale_bundle_files_and_an_expired_svid_are_found_on_the_agent() {
    let mut mesh = Mesh::start("ca_ttl = \"24h\"", "1s");
    let files = mesh.dir.path().join("files");
    let cfg = std::fs::read_to_string(&mesh.agent_config).unwrap()
        + &format!("[[cert_files]]\ndir = \"{}\"\nspiffe_id = \"spiffe://example.org/w\"\n", files.display());
    std::fs::write(&mesh.agent_config, cfg).unwrap();
    mesh.agent.take();
    mesh.start_agent();
    mesh.register("spiffe://example.org/w", &["--x509-svid-ttl", "20s"]);
    mesh.wait_for_svid("spiffe://example.org/w");
    wait_for(20, "cert files written", || files.join("root-cert.pem").exists(), String::new);
    assert_eq!(
        agent(&mesh, &["doctor"]).status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&agent(&mesh, &["doctor"]).stdout)
    );

    // Another CA's bundle planted where the agent keeps its own (spire #4624), and in the
    // bundle file it writes for applications.
    let other = tempfile::tempdir().unwrap();
    let other_server = ServerProc::start(other.path(), "ca_ttl = \"24h\"");
    std::fs::write(
        mesh.dir.path().join("agent/bundle.json"),
        other_server.cli_ok(&["bundle", "show", "--format", "spiffe"]),
    )
    .unwrap();
    std::fs::write(files.join("root-cert.pem"), other_server.cli_ok(&["bundle", "show"])).unwrap();
    let f = findings(&agent(&mesh, &["doctor", "--output", "json"]));
    assert!(has(&f, "bundle-stale", "warning", "bundle.json"), "{f:?}");
    assert!(has(&f, "bundle-stale", "warning", "root-cert.pem"), "{f:?}");

    // The server goes away and the 20 s SVID runs out: svid-overdue, an error.
    mesh.server.kill9();
    wait_for(
        45,
        "svid-overdue for the expired SVID",
        || {
            has(
                &findings(&agent(&mesh, &["doctor", "--output", "json"])),
                "svid-overdue",
                "error",
                "spiffe://example.org/w",
            )
        },
        || String::from_utf8_lossy(&agent(&mesh, &["doctor"]).stdout).into_owned(),
    );
}

#[test]
fn json_logs_are_one_object_per_line_without_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        server_config(dir.path(), "ca_ttl = \"24h\"").replacen("log_level", "log_format = \"json\"\nlog_level", 1);
    let mut server = ServerProc::start_text(dir.path(), &text);
    server.stop();
    let log = server.log();
    assert!(!log.contains('\u{1b}'), "escape codes in a log file");
    let mut messages = Vec::new();
    for line in log.lines().filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        for k in ["timestamp", "level", "target", "message"] {
            assert!(v[k].is_string(), "{k} missing: {line}");
        }
        messages.push(v["message"].as_str().unwrap().to_owned());
    }
    assert!(messages.iter().any(|m| m == "Server started"), "{messages:?}");
    assert!(messages.iter().any(|m| m == "Server stopped"), "{messages:?}");
    // The event's fields are top-level keys.
    let started: Value = serde_json::from_str(log.lines().find(|l| l.contains("Server started")).unwrap()).unwrap();
    assert_eq!(started["trust_domain"], "example.org");
}

/// Metric names in a PromQL expression: identifiers that start with `tessera_`.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let b = expr.as_bytes();
    let mut i = 0;
    while let Some(p) = expr[i..].find("tessera_") {
        let start = i + p;
        if start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_') {
            i = start + 1;
            continue;
        }
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        out.push(expr[start..end].to_owned());
        i = end;
    }
    out
}

/// The series names a `/metrics` body defines (histograms count by their base name too).
fn exposed(body: &str) -> std::collections::BTreeSet<String> {
    let mut s = std::collections::BTreeSet::new();
    for l in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let name: String = l.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix) {
                s.insert(base.to_owned());
            }
        }
        s.insert(name);
    }
    s
}

#[test]
fn every_metric_the_dashboard_and_alert_rules_use_exists_and_promtool_accepts_the_rules() {
    let rules_path = repo().join("deploy/prometheus/tessera-rules.yaml");
    let rules = std::fs::read_to_string(&rules_path).unwrap();
    let chart_copy = std::fs::read_to_string(repo().join("deploy/helm/tessera/files/tessera-rules.yaml")).unwrap();
    assert_eq!(
        rules, chart_copy,
        "the chart's copy of the alert rules differs from deploy/prometheus/tessera-rules.yaml"
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("deploy/grafana/tessera.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "expr" {
                        out.push(x.as_str().unwrap_or_default().to_owned());
                    }
                    walk(x, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() > 10, "the dashboard has {} queries", exprs.len());
    let parsed: Value = serde_json::to_value(serde_saphyr::from_str::<serde_json::Value>(&rules).unwrap()).unwrap();
    walk(&parsed, &mut exprs);

    // A deployment with a federation peer (its gauges have series) and an agent.
    let mesh = Mesh::start_in(
        "example.org",
        "ca_ttl = \"24h\"",
        "1s",
        "[[federation.trust_domains]]\ntrust_domain = \"peer.example\"\nbundle_endpoint_url = \"https://127.0.0.1:1/b\"\nprofile = \"https_web\"\n",
    );
    mesh.register("spiffe://example.org/w", &[]);
    mesh.wait_for_svid("spiffe://example.org/w");
    let cfg = |path: &Path, key: &str| {
        let t = std::fs::read_to_string(path).unwrap();
        t.lines().find(|l| l.trim_start().starts_with(key)).unwrap().split('"').nth(1).unwrap().to_owned()
    };
    // The server's health address is ephemeral: read it from its log.
    let log = mesh.server.log();
    let at = log.find("health=").map(|i| &log[i + 7..]).unwrap_or_default();
    let server_addr: String = at.chars().take_while(|c| !c.is_whitespace()).collect();
    let agent_addr = cfg(&mesh.agent_config, "health_address");
    let (code, server_body) = http_get(&server_addr, "/metrics").unwrap();
    assert_eq!(code, 200, "server /metrics at {server_addr}");
    let (code, agent_body) = http_get(&agent_addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    let have: std::collections::BTreeSet<String> =
        exposed(&server_body).into_iter().chain(exposed(&agent_body)).collect();
    // Only present with an external plugin: checked by name in the plugin's own test.
    let plugin_only = ["tessera_server_plugin_up", "tessera_server_plugin_restarts_total"];
    let mut missing = std::collections::BTreeSet::new();
    for e in &exprs {
        for n in metric_names(e) {
            if !have.contains(&n) && !plugin_only.contains(&n.as_str()) {
                missing.insert(n);
            }
        }
    }
    assert!(missing.is_empty(), "used by the dashboard or rules but not exposed: {missing:?}");

    // promtool (Debian's prometheus package): the rules parse and their unit tests pass.
    let promtool = which("promtool");
    match promtool {
        None => {
            eprintln!("SKIPPED: promtool is not installed (scripts/test.sh installs it); rules checked by name only")
        }
        Some(p) => {
            let out = Command::new(&p).args(["check", "rules"]).arg(&rules_path).output().unwrap();
            assert!(
                out.status.success(),
                "promtool check rules: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let out = Command::new(&p)
                .args(["test", "rules"])
                .arg(repo().join("deploy/prometheus/tessera-rules.test.yaml"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "promtool test rules: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

#[test]
fn an_agent_whose_clock_is_ahead_reports_clock_skew() {
    // libfaketime itself, preloaded into the agent: the `faketime` wrapper would run the
    // agent as its child, which outlives the wrapper when the test kills it.
    let Some(lib) = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file()) else {
        eprintln!("SKIPPED: libfaketime is not installed (scripts/test.sh installs Debian's faketime)");
        return;
    };
    let mut mesh = Mesh::start("ca_ttl = \"24h\"", "1s");
    mesh.register("spiffe://example.org/w", &[]);
    mesh.wait_for_svid("spiffe://example.org/w");
    assert_eq!(agent(&mesh, &["doctor"]).status.code(), Some(0));
    // The same agent, restarted 40 s in the future.
    mesh.agent.take();
    let mut cmd = Command::new(bin("tessera-agent"));
    cmd.args(["run", "--config"]).arg(&mesh.agent_config).env("LD_PRELOAD", &lib).env("FAKETIME", "+40s");
    let mut p = tessera_test_util::Proc::spawn(cmd, mesh.dir.path().join("agent-skewed.log"));
    let sock = mesh.socket.clone();
    p.wait_until(30, "skewed agent", || std::os::unix::net::UnixStream::connect(&sock).is_ok());
    wait_for(
        20,
        "clock-skew",
        || has(&findings(&agent(&mesh, &["doctor", "--output", "json"])), "clock-skew", "warning", "clock"),
        || String::from_utf8_lossy(&agent(&mesh, &["doctor"]).stdout).into_owned(),
    );
    let info = json(&agent(&mesh, &["debug", "info", "--output", "json"]));
    let skew = info["clock_skew_ms"].as_i64().unwrap();
    assert!((-42_000..=-38_000).contains(&skew), "server minus agent should be about -40 s: {skew}");
    drop(p);
}
