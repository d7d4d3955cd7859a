//! Crash consistency of the embedded store (with its group commit of flushes): SVIDs are
//! issued continuously while the server is killed with SIGKILL at random moments, 50 times.
//! After every kill the store must open, every SVID a client received must be in the audit
//! log, the hash chain must verify, and the CA must come back with the same key (same active
//! authority, same bundle).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::time::Duration;

use tessera_proto::admin::v1 as admin;
use tessera_store::Store;
use tessera_test_util::{ServerProc, eventually};

const ROUNDS: usize = 50;

fn csr(id: &str) -> Vec<u8> {
    let key = tessera_identity::PrivateKey::generate_ec_p256().unwrap();
    tessera_identity::csr::build_csr(&tessera_identity::SpiffeId::new(id).unwrap(), &[], &key).unwrap()
}

#[test]
fn kill_9_during_issuance_loses_no_acknowledged_svid() {
    let d = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(d.path(), "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut acknowledged: HashSet<String> = HashSet::new();
    let authorities = s.cli_ok(&["localauthority", "x509", "show"]);
    let bundle = s.cli_ok(&["bundle", "show"]);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 0..ROUNDS {
        // Issue from 4 concurrent clients until the kill lands.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = Duration::from_millis(60 + seed % 300);
        let socket = s.socket.clone();
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let acked: Vec<String> = rt.block_on(async {
            let mut tasks = Vec::new();
            for w in 0..4 {
                let socket = socket.clone();
                let issued = issued.clone();
                tasks.push(tokio::spawn(async move {
                    let mut got = Vec::new();
                    let Ok(mut c) = tessera_server::client::connect_admin(&socket).await else { return got };
                    for i in 0.. {
                        let id = format!("spiffe://example.org/r{round}/w{w}/{i}");
                        let req = admin::MintX509SvidRequest {
                            spiffe_id: id.clone(),
                            csr: csr(&id),
                            ttl: 0,
                            dns_names: vec![],
                        };
                        match c.mint_x509_svid(req).await {
                            Ok(r) => {
                                got.push(
                                    tessera_identity::x509::cert_facts(&r.into_inner().svid.unwrap().cert_chain[0])
                                        .unwrap()
                                        .serial,
                                );
                                issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            Err(_) => break, // the server died under us
                        }
                    }
                    got
                }));
            }
            // The kill lands mid-issuance, not before the first answer of a slow restart.
            eventually(10, "a first issuance after the restart", async || {
                (issued.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
            })
            .await;
            tokio::time::sleep(kill_after).await;
            s.kill9();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        assert!(!acked.is_empty(), "round {round}: nothing was issued before the kill");
        acknowledged.extend(acked);

        // The store opens after SIGKILL and holds every acknowledged issuance.
        let store = tessera_store::sled::SledStore::open(&d.path().join("data/store"))
            .unwrap_or_else(|e| panic!("round {round}: store does not open after kill -9: {e}"));
        let logged: HashSet<String> =
            rt.block_on(store.audit_range(1, usize::MAX)).unwrap().into_iter().map(|r| r.event.serial).collect();
        let missing: Vec<_> = acknowledged.iter().filter(|s| !logged.contains(*s)).collect();
        assert!(missing.is_empty(), "round {round}: {} acknowledged SVIDs missing from the audit log", missing.len());
        let verdict = rt.block_on(tessera_store::verify_audit(&store)).unwrap();
        assert!(verdict.ok, "round {round}: {verdict:?}");
        drop(store);

        s.spawn();
        let v = s.cli_ok(&["audit", "verify"]);
        assert!(v.starts_with("Audit log OK"), "{v}");
        // The CA key and journal survived: the same authorities, the same bundle.
        assert_eq!(s.cli_ok(&["localauthority", "x509", "show"]), authorities, "round {round}: the CA changed");
        assert_eq!(s.cli_ok(&["bundle", "show"]), bundle, "round {round}: the bundle changed");
    }
    eprintln!("{} SVIDs acknowledged across {ROUNDS} kill -9 rounds; all in the audit log", acknowledged.len());
}
