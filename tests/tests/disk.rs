//! A full and a read-only data directory (a real tmpfs mounted for the test; needs root, as
//! CI runs). On a full disk the server refuses new SVIDs with a clear error, turns not-ready,
//! writes no half record, asks for a restart on `/live` after 30 s of failures, and serves
//! again once there is space. On a read-only data dir it
//! refuses to start with a clear error. Every SVID it acknowledged is in the audit log and the
//! chain verifies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tessera_test_util::{ServerProc, free_port, http_get, server_config_for, wait_for};

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs at {} (the test needs root)", dir.display());
        Self(dir.to_owned())
    }

    fn remount(&self, opt: &str) {
        let ok = Command::new("mount").args(["-o", &format!("remount,{opt}")]).arg(&self.0).status().unwrap().success();
        assert!(ok, "remount {opt}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mints one SVID over the Admin API; the serial, or the refusal's message.
fn mint(s: &ServerProc) -> Result<String, String> {
    mint_many(s, 1).pop().unwrap()
}

/// Mints up to `n` SVIDs, stopping at the first refusal.
fn mint_many(s: &ServerProc, n: usize) -> Vec<Result<String, String>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut admin = tessera_server::client::connect_admin(&s.socket).await.unwrap();
        let id = tessera_identity::SpiffeId::new("spiffe://example.org/w").unwrap();
        let key = tessera_identity::PrivateKey::generate_ec_p256().unwrap();
        let csr = tessera_identity::csr::build_csr(&id, &[], &key).unwrap();
        let mut out = Vec::new();
        for _ in 0..n {
            let r = admin
                .mint_x509_svid(tessera_proto::admin::v1::MintX509SvidRequest {
                    spiffe_id: id.to_string(),
                    csr: csr.clone(),
                    ttl: 0,
                    dns_names: vec![],
                })
                .await;
            match r {
                Ok(r) => {
                    let chain = r.into_inner().svid.unwrap().cert_chain;
                    out.push(Ok(tessera_identity::x509::cert_facts(&chain[0]).unwrap().serial));
                }
                Err(e) => {
                    out.push(Err(format!("{:?}: {}", e.code(), e.message())));
                    break;
                }
            }
        }
        out
    })
}

fn ready(health: &str) -> u16 {
    http_get(health, "/ready").map(|(c, _)| c).unwrap_or(0)
}

/// Fills the file system holding `dir` to the last byte.
fn fill(dir: &Path) -> PathBuf {
    let f = dir.join("filler");
    let mut file = std::fs::File::create(&f).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if std::io::Write::write_all(&mut file, &chunk).is_err() {
            break;
        }
    }
    let small = [0u8; 512];
    while std::io::Write::write_all(&mut file, &small).is_ok() {}
    f
}

#[test]
fn a_full_or_read_only_data_dir_refuses_cleanly_turns_not_ready_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("data"), "24m");
    let health = format!("127.0.0.1:{}", free_port());
    let text = server_config_for("example.org", dir.path(), "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"")
        .replace("health_address = \"127.0.0.1:0\"", &format!("health_address = \"{health}\""));
    let mut s = ServerProc::start_text(dir.path(), &text);
    let mut acknowledged: Vec<String> = (0..5).map(|_| mint(&s).unwrap()).collect();
    assert_eq!(ready(&health), 200);

    // Disk full: writes into space the store had already allocated still succeed (and are
    // durable); the first write that needs more is refused with a clear error.
    let filler = fill(&fs.0);
    let results = mint_many(&s, 5000);
    let (ok, err): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    acknowledged.extend(ok.into_iter().map(Result::unwrap));
    let err = err.into_iter().next().expect("5000 SVIDs fit on a full disk").unwrap_err();
    assert!(err.starts_with("Unavailable") && err.contains("store"), "unclear error: {err}");
    wait_for(10, "not ready on a full disk", || ready(&health) == 503, || format!("/ready {}", ready(&health)));
    // sled cannot recover from a failed write in place: after 30 s of failures /live asks for
    // a restart (Kubernetes' liveness probe, or a supervisor, does it).
    let live = || http_get(&health, "/live").map(|(c, _)| c).unwrap_or(0);
    assert_eq!(live(), 200, "not live at once: a transient failure must not restart the server");
    wait_for(45, "/live to ask for a restart", || live() == 503, || format!("/live {}", live()));
    // Space is back: the server serves again, by itself or after a restart.
    std::fs::remove_file(&filler).unwrap();
    recover(&mut s, &health);
    acknowledged.push(mint(&s).unwrap());

    // Read-only: Linux refuses to remount a file system read-only while the server holds its
    // files open for writing, so the server is stopped first; started on a read-only data
    // dir, it refuses to start with a clear error, and starts once the dir is writable.
    s.stop();
    fs.remount("ro");
    let out = Command::new(tessera_test_util::bin("tessera-server"))
        .args(["run", "--config"])
        .arg(&s.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a read-only data dir");
    assert!(stderr.contains("Read-only file system"), "unclear error: {stderr}");
    fs.remount("rw");
    s.spawn();
    recover(&mut s, &health);
    acknowledged.push(mint(&s).unwrap());

    // Nothing acknowledged is missing, nothing refused is recorded, and the chain holds.
    let audit =
        s.cli_ok(&["audit", "show", "--spiffe-id", "spiffe://example.org/w", "--limit", "1000", "--output", "json"]);
    let audit: serde_json::Value = serde_json::from_str(&audit).unwrap();
    let issued: Vec<String> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "x509_svid")
        .map(|r| r["serial"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(issued, acknowledged, "audit log and acknowledged SVIDs differ");
    s.cli_ok(&["audit", "verify"]);
}

/// Waits for the server to be ready again; restarts it once if it stays not ready (a store
/// that cannot recover from a failed write in place).
fn recover(s: &mut ServerProc, health: &str) {
    for _ in 0..50 {
        if ready(health) == 200 {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("not ready 5 s after the disk became usable: restarting the server");
    s.stop();
    s.spawn();
    wait_for(20, "ready after a restart", || ready(health) == 200, || s.log());
}
