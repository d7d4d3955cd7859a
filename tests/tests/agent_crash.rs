//! Crash consistency of the agent: killed with SIGKILL at random moments while its workload
//! SVIDs rotate every ~2 s (and its own SVID renews every ~2 s), 10 times. After every kill
//! it restarts from its persisted SVID and key (no new join token exists), and its workload
//! gets SVIDs again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tessera_test_util::{Mesh, wait_for};

const ROUNDS: u64 = 10;

fn serial(mesh: &Mesh) -> Option<String> {
    let out = mesh.agent_cli(&["api", "fetch", "x509"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    out.status.success().then(|| text.lines().find_map(|l| l.strip_prefix("Serial:")).map(|s| s.trim().to_owned()))?
}

#[test]
fn kill_9_of_the_agent_keeps_its_identity_and_its_workloads_served() {
    // 4 s workload SVIDs and 4 s agent SVIDs: both rotate while the kills land.
    let mut mesh =
        Mesh::start_custom("example.org", "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"4s\"", "500ms", |t| {
            t.replace("[server]\n", "[server]\nagent_svid_ttl = \"4s\"\n")
        });
    mesh.register("spiffe://example.org/crash", &[]);
    wait_for(20, "first SVID", || serial(&mesh).is_some(), String::new);
    let agent_svid = mesh.dir.path().join("agent/agent-svid.pem");
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut serials = std::collections::BTreeSet::new();
    for round in 0..ROUNDS {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(300 + seed % 1500));
        drop(mesh.agent.take()); // SIGKILL (Proc's drop)
        // The persisted identity is whole: a certificate chain and a key that parse.
        let chain = tessera_identity::pem::decode_certs(&std::fs::read(&agent_svid).unwrap()).unwrap();
        assert!(!chain.is_empty(), "round {round}: empty agent SVID file");
        // The certificate's key is on disk: in agent-key.pem, or, when the kill cut a save
        // after the certificate, in agent-key.next.pem beside the old one (the agent's load
        // pairs them; the restart below shows it can make a TLS handshake with them).
        let spki = tessera_identity::x509::cert_facts(&chain[0]).unwrap().spki;
        let key_matches = |name: &str| {
            std::fs::read(mesh.dir.path().join("agent").join(name)).ok().is_some_and(|pem| {
                let key = tessera_identity::PrivateKey::from_pem(&pem)
                    .unwrap_or_else(|e| panic!("round {round}: {name}: {e}"));
                key.public_key_spki().unwrap() == spki
            })
        };
        assert!(
            key_matches("agent-key.pem") || key_matches("agent-key.next.pem"),
            "round {round}: no persisted key is the one the agent SVID certifies"
        );
        mesh.start_agent();
        let context = || mesh.agent.as_ref().map(|a| a.log()).unwrap_or_default();
        let mut got = || match serial(&mesh) {
            Some(s) => {
                serials.insert(s);
                true
            }
            None => false,
        };
        wait_for(20, &format!("round {round}: workload SVID after restart"), &mut got, context);
    }
    // SVIDs kept rotating across the restarts, and the agent never needed a new token.
    assert!(serials.len() >= 3, "SVIDs stopped rotating: {serials:?}");
    let log = mesh.agent.as_ref().unwrap().log();
    assert!(!log.contains("Agent attested"), "the agent attested again: {log}");
}
