//! The server with its CA keys in an HSM (`[key_manager] type = "pkcs11"`, SoftHSM2): the keys
//! are in the token (pkcs11-tool lists them, and the CA certificate holds the token's public
//! key), no private key material is under data_dir, SVIDs verify with openssl, and a restart
//! reuses the same CA.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

use tessera_test_util::{ServerProc, server_config};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

struct Token(String);

impl Drop for Token {
    fn drop(&mut self) {
        let _ = Command::new("softhsm2-util").args(["--delete-token", "--token", &self.0]).output();
    }
}

fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn pkcs11_tool(token: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new("pkcs11-tool")
        .args(["--module", MODULE, "--token-label", token, "--login", "--pin", "1234"])
        .args(args)
        .output()
        .expect("pkcs11-tool is missing: scripts/test.sh installs opensc");
    assert!(out.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

#[test]
fn ca_keys_live_in_the_hsm_and_survive_a_restart() {
    let token = Token(format!("e2e-{}", std::process::id()));
    let out = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", &token.0, "--so-pin", "0000", "--pin", "1234"])
        .output()
        .expect("softhsm2-util is missing: scripts/test.sh installs softhsm2");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = tempfile::tempdir().unwrap();
    let pin = dir.path().join("hsm-pin");
    std::fs::write(&pin, "1234\n").unwrap();
    let text = server_config(dir.path(), "ca_ttl = \"24h\"").replace(
        "[key_manager]\ntype = \"disk\"",
        &format!(
            "[key_manager]\ntype = \"pkcs11\"\nmodule_path = \"{MODULE}\"\ntoken_label = \"{}\"\npin_file = \"{}\"",
            token.0,
            pin.display()
        ),
    );
    assert!(text.contains("pkcs11"));
    let mut server = ServerProc::start_text(dir.path(), &text);

    // The token holds the CA keys under their slot labels.
    let listing = String::from_utf8(pkcs11_tool(&token.0, &["--list-objects"])).unwrap();
    for label in ["tessera-x509-CA-A", "tessera-JWT-Signer-A"] {
        assert!(listing.contains(label), "{label} missing from the token:\n{listing}");
    }
    // The CA certificate carries the token's public key.
    let hsm_pub = pkcs11_tool(&token.0, &["--read-object", "--type", "pubkey", "--label", "tessera-x509-CA-A"]);
    let bundle = server.cli_ok(&["bundle", "show"]);
    let ca = tessera_identity::pem::decode_certs(bundle.as_bytes()).unwrap();
    let facts = tessera_identity::x509::cert_facts(&ca[0]).unwrap();
    assert_eq!(facts.spki, hsm_pub, "the CA certificate's key is not the HSM's");

    // SVIDs signed in the HSM verify.
    let svid = dir.path().join("svid");
    server.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/hsm", "--write", svid.to_str().unwrap()]);
    std::fs::write(dir.path().join("bundle.pem"), &bundle).unwrap();
    let v = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("bundle.pem"))
        .arg(svid.join("svid.pem"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    // No private key material under data_dir.
    let mut files = Vec::new();
    files_under(&dir.path().join("data"), &mut files);
    assert!(!dir.path().join("data/keys").exists(), "a disk key directory was created");
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"PRIVATE KEY") && !bytes.windows(5).any(|w| w == b"pkcs8"),
            "{} looks like it holds a private key",
            f.display()
        );
    }

    // A restart finds the same keys: same CA, same bundle.
    server.stop();
    server.spawn();
    assert_eq!(server.cli_ok(&["bundle", "show"]), bundle, "the restart made a new CA");
}
