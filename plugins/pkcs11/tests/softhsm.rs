//! The pkcs11 key manager against a real SoftHSM2 token (Debian `softhsm2`), created for the
//! test with `softhsm2-util` under a unique label and deleted afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use tessera_identity::KeyType;
use tessera_plugin_pkcs11::{Pkcs11Config, Pkcs11KeyManager};
use tessera_plugins::KeyManager;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A fresh token, made for this test process (the next run deletes it).
struct TestToken {
    label: String,
}

impl TestToken {
    /// The token for test `name`. Every test's token is made up front, once, before any test
    /// loads the module: SoftHSM lists tokens when the module is initialised in the process,
    /// and `--init-token --free` run concurrently can pick the same slot.
    fn new(name: &str) -> &'static Self {
        static ALL: std::sync::OnceLock<Vec<(&'static str, TestToken)>> = std::sync::OnceLock::new();
        let all = ALL.get_or_init(|| {
            delete_stale_tokens();
            ["conf", "reopen"].into_iter().map(|n| (n, TestToken::create(n))).collect()
        });
        &all.iter().find(|(n, _)| *n == name).expect("a token made up front").1
    }

    fn create(name: &str) -> Self {
        let label = format!("t-{name}-{}", std::process::id());
        let out = Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", &label, "--so-pin", "0000", "--pin", "1234"])
            .output()
            .expect("softhsm2-util is missing: scripts/test.sh installs softhsm2");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Self { label }
    }

    fn config(&self) -> Pkcs11Config {
        Pkcs11Config {
            module_path: MODULE.into(),
            token_label: self.label.clone(),
            pin: "1234".into(),
            key_label_prefix: "tessera-".into(),
        }
    }
}

/// Deletes the tokens earlier runs of this test left (statics are never dropped).
fn delete_stale_tokens() {
    let Ok(out) = Command::new("softhsm2-util").arg("--show-slots").output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(label) = line.trim().strip_prefix("Label:").map(str::trim) else { continue };
        if label.starts_with("t-conf-") || label.starts_with("t-reopen-") {
            let _ = Command::new("softhsm2-util").args(["--delete-token", "--token", label]).output();
        }
    }
}

#[tokio::test]
async fn softhsm2_passes_the_key_manager_conformance_suite() {
    let t = TestToken::new("conf");
    let km = Pkcs11KeyManager::open(&t.config()).unwrap();
    tessera_plugins::conformance::run(&km).await;
}

#[tokio::test]
async fn keys_stay_in_the_token_across_reopen_and_a_wrong_pin_is_refused() {
    let t = TestToken::new("reopen");
    // Before any login to this token from this process (PKCS#11 login state is shared by
    // all of an application's sessions on a token).
    let mut bad = t.config();
    bad.pin = "9999".into();
    let err = Pkcs11KeyManager::open(&bad).unwrap_err().to_string();
    assert!(err.contains("login") && !err.contains("9999"), "{err}");
    let mut missing = t.config();
    missing.token_label = "no-such-token".into();
    assert!(Pkcs11KeyManager::open(&missing).unwrap_err().to_string().contains("no token labelled"));
    let km = Pkcs11KeyManager::open(&t.config()).unwrap();
    let key = km.generate_key("x509-CA-A", KeyType::EcP384).await.unwrap();
    assert!(key.blocks(), "an HSM key must be signed with off the async workers");
    let sig = key.sign(b"hello").unwrap();
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P384_SHA384_ASN1, key.public_key_raw())
        .verify(b"hello", &sig)
        .unwrap();
    drop(km);
    let again = Pkcs11KeyManager::open(&t.config()).unwrap().get_key("x509-CA-A").await.unwrap().unwrap();
    assert_eq!(again.public_key_raw(), key.public_key_raw(), "reopen found another key");
    assert_eq!(again.key_type(), KeyType::EcP384);
    // The private key is sensitive and not extractable: pkcs11-tool cannot read its value.
    let out = Command::new("pkcs11-tool")
        .args(["--module", MODULE, "--token-label", &t.label, "--login", "--pin", "1234", "--list-objects"])
        .output()
        .expect("pkcs11-tool is missing: scripts/test.sh installs opensc");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("tessera-x509-CA-A"), "{listing}");
    assert!(listing.contains("Private Key Object") && listing.contains("sensitive"), "{listing}");
    assert!(!listing.contains("extractable") || listing.contains("never extractable"), "{listing}");

    // The token label holds the process ID, which may itself contain "1234": leave it out.
    let dbg = format!("{:?}", t.config()).replace(&t.label, "<label>");
    assert!(!dbg.contains("1234") && dbg.contains("<redacted>"), "{dbg}");
}
