//! The read-only web console in a real browser: headless Chromium (Debian `chromium`) driven
//! over WebDriver (Debian `chromium-driver`). Every view loads, shows what the Admin API says
//! (values compared, not only that a page rendered), logs no console error, and is saved as a
//! screenshot under `target/console-screenshots/`. A write method is refused; on a
//! non-loopback address the console needs a client certificate of an admin SPIFFE ID.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use serde_json::{Value, json};
use tessera_test_util::{Mesh, Proc, ServerProc, free_port, http_call, http_get, server_config, wait_for};

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// A WebDriver session on a headless Chromium.
struct Browser {
    _driver: Proc,
    addr: String,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(chromium: &Path, driver: &Path, log: PathBuf) -> Self {
        let port = free_port();
        let mut cmd = Command::new(driver);
        cmd.arg(format!("--port={port}"));
        let mut p = Proc::spawn(cmd, log);
        let addr = format!("127.0.0.1:{port}");
        let a = addr.clone();
        p.wait_until(30, "chromedriver", || http_get(&a, "/status").is_ok_and(|(c, _)| c == 200));
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,900", format!("--user-data-dir={}", profile.path().display())]},
            "goog:loggingPrefs": {"browser": "ALL"}}}});
        let (code, body) = http_call(&addr, "POST", "/session", &[], &caps.to_string()).unwrap();
        assert_eq!(code, 200, "new session: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let session = v["value"]["sessionId"].as_str().unwrap().to_owned();
        Self { _driver: p, addr, session, _profile: profile }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let body = if body.is_null() { String::new() } else { body.to_string() };
        let (code, text) =
            http_call(&self.addr, method, &format!("/session/{}{path}", self.session), &[], &body).unwrap();
        assert_eq!(code, 200, "{method} {path}: {text}");
        serde_json::from_str::<Value>(&text).unwrap()["value"].clone()
    }

    fn open(&self, url: &str) -> String {
        self.call("POST", "/url", json!({"url": url}));
        self.call("POST", "/execute/sync", json!({"script": "return document.body.innerText", "args": []}))
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn screenshot(&self, name: &str) {
        let png = self.call("GET", "/screenshot", Value::Null);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }

    /// Console messages of level SEVERE since the last call.
    fn errors(&self) -> Vec<String> {
        let v = self.call("POST", "/se/log", json!({"type": "browser"}));
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http_call(&self.addr, "DELETE", &format!("/session/{}", self.session), &[], "");
    }
}

fn admin_json(server: &ServerProc, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&server.cli_ok(&a)).unwrap()
}

#[test]
fn every_view_shows_what_the_admin_api_says_in_a_real_browser() {
    let (Some(chromium), Some(driver)) = (which("chromium"), which("chromedriver")) else {
        eprintln!(
            "SKIPPED: chromium and chromedriver are not installed (scripts/test.sh installs Debian's chromium and chromium-driver)"
        );
        return;
    };
    let port = free_port();
    let mesh = Mesh::start_in(
        "example.org",
        "ca_ttl = \"24h\"",
        "1s",
        &format!(
            "[console]\naddress = \"127.0.0.1:{port}\"\n[[federation.trust_domains]]\ntrust_domain = \"peer.example\"\nbundle_endpoint_url = \"https://127.0.0.1:1/b\"\nprofile = \"https_web\"\n"
        ),
    );
    let entry_id = mesh.register("spiffe://example.org/web", &[]);
    mesh.wait_for_svid("spiffe://example.org/web");
    let base = format!("http://127.0.0.1:{port}");
    let browser = Browser::start(&chromium, &driver, mesh.dir.path().join("chromedriver.log"));

    // Overview: trust domain, counts, the doctor's verdict (the unreachable peer).
    let info = admin_json(&mesh.server, &["debug", "info"]);
    let text = browser.open(&format!("{base}/"));
    assert!(text.contains("example.org"), "{text}");
    assert!(text.contains(&format!("Agents\t{} (0 banned)", info["counts"]["agents"])), "{text}");
    assert!(text.contains(&format!("Entries\t{}", info["counts"]["entries"])), "{text}");
    assert!(text.contains("federation-stale") && text.contains("unhealthy"), "{text}");
    browser.screenshot("overview");
    assert_eq!(browser.errors(), Vec::<String>::new());

    // CA: every authority of `localauthority x509 show`, with its state.
    let auths = admin_json(&mesh.server, &["localauthority", "x509", "show"]);
    let text = browser.open(&format!("{base}/ca"));
    for a in auths["authorities"].as_array().unwrap() {
        let line = format!("{}\t{}", a["authority_id"].as_str().unwrap(), a["status"].as_str().unwrap());
        assert!(text.contains(&line), "{line} missing: {text}");
    }
    let timeline = browser.call(
        "POST",
        "/execute/sync",
        json!({"script": "return document.querySelectorAll('#timeline rect').length", "args": []}),
    );
    assert_eq!(timeline.as_u64().unwrap() as usize, auths["authorities"].as_array().unwrap().len());
    browser.screenshot("ca");
    assert_eq!(browser.errors(), Vec::<String>::new());

    // Bundles: our sequence, and the peer with its failed fetch.
    let jwks: Value = serde_json::from_str(&mesh.server.cli_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let text = browser.open(&format!("{base}/bundles"));
    assert!(text.contains(&format!("example.org\town\t{}", jwks["spiffe_sequence"])), "{text}");
    assert!(text.contains("peer.example") && text.contains("last fetch failed"), "{text}");
    browser.screenshot("bundles");

    // Agents: ID, attestation type and SVID serial as `agent list` gives them.
    let agents = admin_json(&mesh.server, &["agent", "list"]);
    let a = &agents["agents"][0];
    let text = browser.open(&format!("{base}/agents"));
    let row = format!("{}\t{}\t", a["spiffe_id"].as_str().unwrap(), a["attestation_type"].as_str().unwrap());
    assert!(text.contains(&row), "{row} missing: {text}");
    assert!(text.contains(a["serial"].as_str().unwrap()), "{text}");
    browser.screenshot("agents");

    // Entries: the registered one, found by a search on its selector; a search that matches
    // nothing shows nothing.
    let text = browser.open(&format!("{base}/entries?q=unix%3Auid"));
    assert!(text.contains(&entry_id) && text.contains("spiffe://example.org/web"), "{text}");
    browser.screenshot("entries");
    let text = browser.open(&format!("{base}/entries?q=no-such-thing"));
    assert!(!text.contains(&entry_id), "{text}");

    // Audit: the newest records as `audit show` lists them, filtered by SPIFFE ID.
    let audit = admin_json(&mesh.server, &["audit", "show", "--spiffe-id", "spiffe://example.org/web"]);
    let serial = audit["records"].as_array().unwrap().last().unwrap()["serial"].as_str().unwrap().to_owned();
    let text = browser.open(&format!("{base}/audit?spiffe_id=spiffe%3A%2F%2Fexample.org%2Fweb"));
    assert!(text.contains(&serial), "{serial} missing: {text}");
    assert!(!text.contains("agent_attested"), "filter ignored: {text}");
    browser.screenshot("audit");
    assert_eq!(browser.errors(), Vec::<String>::new());

    // Read-only: a write method is refused, and nothing changed.
    for m in ["POST", "PUT", "DELETE", "PATCH"] {
        let (code, _) = http_call(&format!("127.0.0.1:{port}"), m, "/entries", &[], "{}").unwrap();
        assert_eq!(code, 405, "{m}");
    }
    let (code, _) = http_get(&format!("127.0.0.1:{port}"), "/nope").unwrap();
    assert_eq!(code, 404);
}

#[test]
fn a_console_off_loopback_requires_an_admin_client_certificate() {
    let Some(curl) = which("curl") else {
        eprintln!("SKIPPED: curl is not installed (scripts/test.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = server_config(dir.path(), "ca_ttl = \"24h\"")
        + &format!("[console]\naddress = \"0.0.0.0:{port}\"\nadmin_ids = [\"spiffe://example.org/ops/alice\"]\n");
    let server = ServerProc::start_text(dir.path(), &text);
    let url = format!("https://127.0.0.1:{port}/agents");
    let get = |extra: &[&str]| {
        let out = Command::new(&curl)
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Plain HTTP, and TLS without a client certificate: no page.
    let (code, _) = http_get(&format!("127.0.0.1:{port}"), "/").unwrap_or((0, String::new()));
    assert_ne!(code, 200);
    assert_eq!(get(&[]), "000", "a TLS client without a certificate got an answer");
    // An SVID of our trust domain that is not an admin: 403. Alice's: 200.
    for (who, want) in [("spiffe://example.org/ops/bob", "403"), ("spiffe://example.org/ops/alice", "200")] {
        let d = dir.path().join(who.rsplit('/').next().unwrap());
        server.cli_ok(&["x509", "mint", "--spiffe-id", who, "--write", d.to_str().unwrap()]);
        let (cert, key) = (d.join("svid.pem"), d.join("key.pem"));
        let got = get(&["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()]);
        assert_eq!(got, want, "{who}");
    }
    // A certificate from another CA with the admin's ID: refused at the handshake.
    let other = tempfile::tempdir().unwrap();
    let other_server = ServerProc::start(other.path(), "ca_ttl = \"24h\"");
    let d = other.path().join("mallory");
    other_server.cli_ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/ops/alice",
        "--write",
        d.to_str().unwrap(),
    ]);
    let got = get(&["--cert", d.join("svid.pem").to_str().unwrap(), "--key", d.join("key.pem").to_str().unwrap()]);
    assert_eq!(got, "000");
    wait_for(5, "server still answers", || server.cli(&["healthcheck"]).status.success(), String::new);
}
