//! Upgrades and downgrades of the real server binary: a store written by a newer schema (a
//! downgrade that skipped the order in docs/upgrading.md) stops the server at start with a
//! message naming both versions and what to do, and changes nothing in the store.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use tessera_test_util::{ServerProc, bin, server_config};

#[test]
fn a_server_refuses_a_store_written_by_a_newer_schema_and_leaves_it_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProc::start_text(dir.path(), &server_config(dir.path(), "ca_ttl = \"24h\""));
    server.stop();
    // A newer server (schema 2, version 9.1.0) wrote the store since, with a change this server
    // cannot read (readable from schema 2 on).
    let store = dir.path().join("data/store");
    {
        let db = sled::open(&store).unwrap();
        let meta = db.open_tree("meta").unwrap();
        meta.insert(b"schema_version", &2u64.to_be_bytes()).unwrap();
        meta.insert(b"readable_from_schema", &2u64.to_be_bytes()).unwrap();
        meta.insert(b"last_writer_version", b"9.1.0").unwrap();
        db.flush().unwrap();
    }
    // A server that starts anyway would run forever: give it 30 s to refuse.
    let mut child = Command::new(bin("tessera-server"))
        .args(["run", "--config"])
        .arg(&server.config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server started on a store written by a newer schema");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("schema version 2, last written by server 9.1.0")
            && err.contains(&format!("this server ({})", env!("CARGO_PKG_VERSION")))
            && err.contains("needs a server that understands schema version 2")
            && err.contains("docs/upgrading.md"),
        "{err}"
    );
    let db = sled::open(&store).unwrap();
    assert_eq!(db.open_tree("meta").unwrap().get(b"last_writer_version").unwrap().unwrap().as_ref(), b"9.1.0");
}
