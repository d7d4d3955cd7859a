//! The external plugin path against a CA nobody here wrote: the example plugin
//! `tessera-upstream-cfssl` bridges the upstream protocol to a real `cfssl serve` (Debian
//! `golang-cfssl`). SVIDs chain to cfssl's root (openssl verify); a plugin killed with -9 is
//! restarted while the server keeps signing, and `/ready` and `/metrics` show it; a plugin
//! whose checksum does not match is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tessera_test_util::{Proc, ServerProc, bin, free_port, http_get, server_config, wait_for};

/// A cfssl CA made by cfssl itself, served by `cfssl serve` with a profile that issues CAs.
fn start_cfssl(dir: &Path) -> (Proc, u16, String) {
    start_cfssl_at(dir, free_port())
}

/// The same on `port`, with a fresh CA.
fn start_cfssl_at(dir: &Path, port: u16) -> (Proc, u16, String) {
    std::fs::write(dir.join("ca-csr.json"), r#"{"CN": "Corp cfssl Root", "key": {"algo": "ecdsa", "size": 256}}"#)
        .unwrap();
    let out = Command::new("cfssl")
        .args(["gencert", "-initca"])
        .arg(dir.join("ca-csr.json"))
        .output()
        .expect("cfssl is missing: scripts/test.sh installs golang-cfssl");
    assert!(out.status.success(), "cfssl gencert: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ca = v["cert"].as_str().unwrap().to_owned();
    std::fs::write(dir.join("ca.pem"), &ca).unwrap();
    std::fs::write(dir.join("ca-key.pem"), v["key"].as_str().unwrap()).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"signing": {"default": {"expiry": "8760h"}, "profiles": {"intermediate": {
            "usages": ["cert sign", "crl sign", "digital signature"], "expiry": "48h",
            "ca_constraint": {"is_ca": true, "max_path_len": 0, "max_path_len_zero": true}}}}}"#,
    )
    .unwrap();
    let mut cmd = Command::new("cfssl");
    cmd.args(["serve", "-address", "127.0.0.1", "-port", &port.to_string()])
        .arg(format!("-ca={}", dir.join("ca.pem").display()))
        .arg(format!("-ca-key={}", dir.join("ca-key.pem").display()))
        .arg(format!("-config={}", dir.join("config.json").display()));
    let mut p = Proc::spawn(cmd, dir.join("cfssl.log"));
    p.wait_until(30, "cfssl serve", || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    (p, port, ca)
}

fn sha256_hex(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

fn plugin_pid(health: &str) -> Option<u32> {
    let (_, body) = http_get(health, "/ready").ok()?;
    let rest = body.split("up (pid ").nth(1)?;
    rest.split(',').next()?.parse().ok().filter(|p| *p != 0)
}

fn metric(health: &str, name: &str) -> Option<u64> {
    let (_, body) = http_get(health, "/metrics").ok()?;
    body.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn cfssl_signs_our_ca_through_the_external_plugin_which_is_restarted_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let (cfssl, port, cfssl_root) = start_cfssl(dir.path());
    let plugin = bin("tessera-upstream-cfssl");
    let health_port = free_port();
    let health = format!("127.0.0.1:{health_port}");
    let base = server_config(dir.path(), "ca_ttl = \"24h\"")
        .replace("health_address = \"127.0.0.1:0\"", &format!("health_address = \"{health}\""))
        .replace("[server]\n", "[server]\nrotation_check_interval = \"1s\"\n");
    let upstream = |checksum: &str| {
        format!(
            "{base}[upstream_authority]\ntype = \"external\"\ncommand = \"{}\"\nchecksum = \"{checksum}\"\ncall_timeout = \"10s\"\n[upstream_authority.plugin_config]\nurl = \"http://127.0.0.1:{port}\"\nprofile = \"intermediate\"\npoll_seconds = 1\n",
            plugin.display()
        )
    };

    // A wrong checksum: the server refuses to run the plugin, and says so.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, upstream(&"0".repeat(64))).unwrap();
    let out = Command::new(bin("tessera-server")).args(["run", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to run"), "{err}");

    let server = ServerProc::start_text(dir.path(), &upstream(&sha256_hex(&plugin)));
    let bundle = server.cli_ok(&["bundle", "show"]);
    let roots = tessera_identity::pem::decode_certs(bundle.as_bytes()).unwrap();
    let cfssl_der = tessera_identity::pem::decode_certs(cfssl_root.as_bytes()).unwrap();
    assert_eq!(roots, cfssl_der, "the bundle must be cfssl's root");

    let verify = |name: &str| {
        let out = dir.path().join(name);
        server.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/cfssl", "--write", out.to_str().unwrap()]);
        let v = Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(dir.path().join("ca.pem"))
            .arg("-untrusted")
            .arg(out.join("svid.pem"))
            .arg(out.join("svid.pem"))
            .output()
            .unwrap();
        assert!(v.status.success(), "{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr));
        tessera_identity::pem::decode_certs(&std::fs::read(out.join("svid.pem")).unwrap()).unwrap().len()
    };
    assert_eq!(verify("svid1"), 2, "leaf and our cfssl-signed intermediate");

    let (code, body) = http_get(&health, "/ready").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("upstream plugin \"cfssl\": up"), "{body}");
    assert_eq!(metric(&health, "tessera_server_plugin_up"), Some(1));
    assert_eq!(metric(&health, "tessera_server_plugin_restarts_total"), Some(0));

    // kill -9 the plugin: signing goes on with the current CA; the server restarts it.
    let pid = plugin_pid(&health).expect("plugin pid in /ready");
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    assert_eq!(verify("svid2"), 2, "signing must not need the plugin");
    wait_for(
        30,
        "plugin restarted",
        || {
            metric(&health, "tessera_server_plugin_restarts_total") == Some(1)
                && metric(&health, "tessera_server_plugin_up") == Some(1)
                && plugin_pid(&health).is_some_and(|p| p != pid)
        },
        || server.log(),
    );
    // cfssl gets a new root: the restarted plugin's SubscribeRoots stream carries it into our
    // bundle before anything is signed under it.
    drop(cfssl);
    let new_dir = dir.path().join("cfssl2");
    std::fs::create_dir_all(&new_dir).unwrap();
    let (_cfssl2, _, new_root) = start_cfssl_at(&new_dir, port);
    let new_der = tessera_identity::pem::decode_certs(new_root.as_bytes()).unwrap();
    wait_for(
        30,
        "cfssl's new root in the bundle",
        || {
            let b = tessera_identity::pem::decode_certs(server.cli_ok(&["bundle", "show"]).as_bytes()).unwrap();
            assert!(b.contains(&cfssl_der[0]), "the old root left the bundle too early");
            b.contains(&new_der[0])
        },
        || server.log(),
    );
    // The restarted plugin signs the next CA, now under cfssl's new root.
    server.cli_ok(&["localauthority", "x509", "prepare"]);
    server.cli_ok(&["localauthority", "x509", "activate"]);
    std::fs::copy(new_dir.join("ca.pem"), dir.path().join("ca.pem")).unwrap();
    assert_eq!(verify("svid3"), 2);
    assert!(server.log().contains("External plugin is down"), "{}", server.log());

    // The plugin dies with its server, however the server dies: kill -9 the server and the
    // plugin is gone within a second (its stdin, a pipe only the server held, is closed).
    let mut server = server;
    let pid = plugin_pid(&health).expect("plugin pid in /ready");
    server.kill9();
    let gone_by = Instant::now() + Duration::from_secs(1);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(Instant::now() < gone_by, "plugin {pid} outlived its killed server by a second");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A restarted server starts its plugin afresh on the same socket path.
    server.spawn();
    let (code, body) = http_get(&health, "/ready").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(plugin_pid(&health).is_some_and(|p| p != pid));
    server.stop();
}

/// `(code, severity)` of each finding of `tessera-server doctor`.
fn doctor_codes(server: &ServerProc) -> Vec<(String, String)> {
    let out = server.cli(&["doctor", "--output", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["code"].as_str().unwrap().to_owned(), f["severity"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn a_plugin_that_cannot_be_restarted_is_plugin_down() {
    let dir = tempfile::tempdir().unwrap();
    let (_cfssl, port, _) = start_cfssl(dir.path());
    // A copy of the plugin, so that the test can spoil it.
    let plugin = dir.path().join("tessera-upstream-cfssl");
    std::fs::copy(bin("tessera-upstream-cfssl"), &plugin).unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let text = server_config(dir.path(), "ca_ttl = \"24h\"")
        .replace("health_address = \"127.0.0.1:0\"", &format!("health_address = \"{health}\""))
        .replace("[server]\n", "[server]\nrotation_check_interval = \"1s\"\n")
        + &format!(
            "[upstream_authority]\ntype = \"external\"\ncommand = \"{}\"\nchecksum = \"{}\"\ncall_timeout = \"5s\"\n[upstream_authority.plugin_config]\nurl = \"http://127.0.0.1:{port}\"\nprofile = \"intermediate\"\npoll_seconds = 1\n",
            plugin.display(),
            sha256_hex(&plugin)
        );
    let server = ServerProc::start_text(dir.path(), &text);
    assert_eq!(doctor_codes(&server), Vec::<(String, String)>::new());
    // The plugin's binary changes under the server (its checksum no longer matches), then the
    // plugin dies: the server will not run the changed binary, so it stays down.
    let spoiled = dir.path().join("spoiled");
    std::fs::write(&spoiled, b"#!/bin/sh\nexit 1\n").unwrap();
    std::fs::rename(&spoiled, &plugin).unwrap();
    let pid = plugin_pid(&health).expect("plugin pid in /ready");
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
    wait_for(
        30,
        "plugin-down",
        || doctor_codes(&server).contains(&("plugin-down".into(), "error".into())),
        || format!("{:?}\n{}", doctor_codes(&server), server.log()),
    );
    assert_eq!(server.cli(&["doctor"]).status.code(), Some(1));
}
