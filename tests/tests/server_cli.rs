//! The real `tessera-server` binary, driven through its CLI as a user would, checked by tools
//! nobody here wrote: openssl, pkilint, and the `spiffe` crate.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;

use tessera_test_util::{ServerProc, pkilint, run};

const CA_DEFAULT: &str = "ca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"";

/// pkilint findings at ERROR or FATAL severity, except the one known false positive: pkilint
/// checks URIs with the `validators` package, whose URL check only admits a fixed list of
/// schemes (http, https, ftp, ...), so every `spiffe://` URI SAN is reported as
/// `pkix.invalid_uri_syntax` although RFC 3986 and the SPIFFE spec define it.
fn serious_findings(report: &str) -> Vec<String> {
    let lines: Vec<&str> = report.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let serious = l.contains("(ERROR)") || l.contains("(FATAL)") || l.contains("(CRITICAL)");
        let spiffe_uri_false_positive = l.contains("pkix.invalid_uri_syntax") && l.contains("\"spiffe://");
        if serious && !spiffe_uri_false_positive {
            out.push(format!("{} / {}", lines.get(i.wrapping_sub(1)).unwrap_or(&""), l.trim()));
        }
    }
    out
}

#[test]
fn minted_svid_verifies_with_openssl_parses_as_x509_svid_and_lints_clean() {
    let d = tempfile::tempdir().unwrap();
    let s = ServerProc::start(d.path(), CA_DEFAULT);
    let out = d.path().join("out");
    let msg = s.cli_ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--dns",
        "web.local",
        "--write",
        out.to_str().unwrap(),
    ]);
    assert!(msg.contains("spiffe://example.org/web"), "{msg}");
    let bundle = d.path().join("bundle.pem");
    std::fs::write(&bundle, s.cli_ok(&["bundle", "show"])).unwrap();

    // openssl verifies the chain against `bundle show`, for client and server use.
    for purpose in ["sslclient", "sslserver"] {
        let v = run(
            "openssl",
            &[
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                bundle.to_str().unwrap(),
                out.join("svid.pem").to_str().unwrap(),
            ],
        );
        assert!(
            v.status.success(),
            "openssl verify ({purpose}): {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
    }
    // The bundle written by mint is the same roots.
    assert_eq!(std::fs::read_to_string(out.join("bundle.pem")).unwrap(), std::fs::read_to_string(&bundle).unwrap());

    // The spiffe crate accepts it as an X509-SVID.
    let chain = tessera_identity::pem::decode_certs(&std::fs::read(out.join("svid.pem")).unwrap()).unwrap();
    let chain_der: Vec<u8> = chain.iter().flat_map(|c| c.as_ref().to_vec()).collect();
    let key_pem = std::fs::read(out.join("key.pem")).unwrap();
    let key_der = {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(&key_pem).unwrap()
    };
    let svid = spiffe::X509Svid::parse_from_der(&chain_der, key_der.secret_pkcs8_der()).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(std::fs::metadata(out.join("key.pem")).unwrap().permissions().mode() & 0o777, 0o600);

    // pkilint's RFC 5280 linter: no error for the leaf or the root.
    for cert in [out.join("svid.pem"), bundle.clone()] {
        let r = run(pkilint().to_str().unwrap(), &["lint", cert.to_str().unwrap()]);
        let report = String::from_utf8_lossy(&r.stdout).into_owned();
        assert!(r.status.code().is_some(), "pkilint crashed: {}", String::from_utf8_lossy(&r.stderr));
        assert!(
            serious_findings(&report).is_empty(),
            "pkilint errors for {}: {:?}\n{report}",
            cert.display(),
            serious_findings(&report)
        );
    }
}

#[test]
fn openssl_shows_the_svid_profile() {
    let d = tempfile::tempdir().unwrap();
    let s = ServerProc::start(d.path(), CA_DEFAULT);
    let out = d.path().join("out");
    s.cli_ok(&[
        "x509",
        "mint",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--ttl",
        "10m",
        "--write",
        out.to_str().unwrap(),
    ]);
    let text = run("openssl", &["x509", "-noout", "-text", "-in", out.join("svid.pem").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("URI:spiffe://example.org/web"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("TLS Web Server Authentication, TLS Web Client Authentication"), "{text}");
    assert!(text.contains("X509v3 Subject Alternative Name: critical"), "empty subject needs a critical SAN: {text}");
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
}

#[test]
fn entries_tokens_and_the_ca_survive_a_restart() {
    let d = tempfile::tempdir().unwrap();
    let mut s = ServerProc::start(d.path(), CA_DEFAULT);
    let created = s.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        "spiffe://example.org/tessera/agent/join_token/x",
        "--selector",
        "unix:uid:1000",
        "--output",
        "json",
    ]);
    let entry: serde_json::Value = serde_json::from_str(&created).unwrap();
    let entry_id = entry["entries"][0]["id"].as_str().unwrap().to_owned();
    let token: serde_json::Value = serde_json::from_str(&s.cli_ok(&["token", "generate", "--output", "json"])).unwrap();
    let bundle_before = s.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    let authorities_before = s.cli_ok(&["localauthority", "x509", "show", "--output", "json"]);
    s.stop();
    assert!(!s.socket.exists(), "admin socket left behind after clean stop");

    s.spawn();
    let shown = s.cli_ok(&["entry", "show", "--entry-id", &entry_id]);
    assert!(shown.contains("spiffe://example.org/web") && shown.contains("unix:uid:1000"), "{shown}");
    assert_eq!(s.cli_ok(&["bundle", "show", "--format", "spiffe"]), bundle_before, "CA changed across restart");
    assert_eq!(s.cli_ok(&["localauthority", "x509", "show", "--output", "json"]), authorities_before);
    // The token is still stored: a second token is different, and the first can still attest
    // (checked in-process); here we check it was not consumed by the restart.
    let agents = s.cli_ok(&["agent", "list", "--output", "json"]);
    assert!(agents.contains("\"agents\": []"), "{agents}");
    assert!(token["token"].as_str().unwrap().len() == 32);

    // Key files are private.
    for f in std::fs::read_dir(d.path().join("data/keys")).unwrap() {
        let f = f.unwrap();
        assert_eq!(f.metadata().unwrap().permissions().mode() & 0o777, 0o600, "{}", f.path().display());
    }
    assert_eq!(std::fs::metadata(&s.socket).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn prepare_then_activate_leaves_two_roots_and_svids_from_both_verify_with_openssl() {
    let d = tempfile::tempdir().unwrap();
    let s = ServerProc::start(d.path(), CA_DEFAULT);
    let before = d.path().join("before");
    let after = d.path().join("after");
    s.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/a", "--write", before.to_str().unwrap()]);
    s.cli_ok(&["localauthority", "x509", "prepare"]);
    s.cli_ok(&["localauthority", "x509", "activate"]);
    s.cli_ok(&["x509", "mint", "--spiffe-id", "spiffe://example.org/b", "--write", after.to_str().unwrap()]);
    let bundle = d.path().join("bundle.pem");
    let pem = s.cli_ok(&["bundle", "show"]);
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2, "{pem}");
    std::fs::write(&bundle, pem).unwrap();
    for svid in [before.join("svid.pem"), after.join("svid.pem")] {
        let v = run("openssl", &["verify", "-CAfile", bundle.to_str().unwrap(), svid.to_str().unwrap()]);
        assert!(v.status.success(), "{}: {}", svid.display(), String::from_utf8_lossy(&v.stderr));
    }
    // The two SVIDs chain to different roots.
    let v = run(
        "openssl",
        &["verify", "-CAfile", before.join("bundle.pem").to_str().unwrap(), after.join("svid.pem").to_str().unwrap()],
    );
    assert!(!v.status.success(), "new SVID verified against the old root alone");
}

#[test]
fn bad_cli_input_exits_non_zero_with_one_clear_line() {
    let d = tempfile::tempdir().unwrap();
    let s = ServerProc::start(d.path(), CA_DEFAULT);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a//b",
                "--parent-id",
                "spiffe://example.org/p",
                "--selector",
                "unix:uid:1",
            ],
            "InvalidArgument",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                "spiffe://example.org/p",
                "--selector",
                "nope:x",
            ],
            "invalid selector",
        ),
        (
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                "spiffe://example.org/p",
                "--selector",
                "unix:uid:1",
                "--x509-svid-ttl",
                "100h",
            ],
            "maximum",
        ),
        (&["x509", "mint", "--spiffe-id", "spiffe://other.org/a"], "not in trust domain"),
        (&["localauthority", "x509", "taint", "--authority-id", "ffff"], "NotFound"),
        (&["entry", "show", "--entry-id", "missing"], "NotFound"),
    ];
    for (args, needle) in cases {
        let out = s.cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(err.starts_with("Error: ") && err.contains(needle), "{args:?}: {err}");
    }
    let entries = s.cli_ok(&["entry", "show", "--output", "json"]);
    assert!(entries.contains("\"entries\": []"), "refused input was stored: {entries}");
}

#[test]
fn bad_config_is_refused_with_the_key_named() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("server.toml");
    for (text, needle) in [
        ("trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\nfrobnicate = true\n", "frobnicate"),
        ("data_dir = \"/tmp/x\"\n", "missing required key `trust_domain`"),
        (
            "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n[ca]\nca_ttl = \"1h\"\ndefault_x509_svid_ttl = \"2h\"\n",
            "ca.default_x509_svid_ttl",
        ),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = run(
            tessera_test_util::bin("tessera-server").to_str().unwrap(),
            &["run", "--config", cfg.to_str().unwrap()],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn entries_load_from_a_file_in_atomic_batches_and_lists_come_back_whole_across_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_test_util::ServerProc::start(dir.path(), "ca_ttl = \"24h\"");
    // 2,500 entries, one per line: three batches (1,000, 1,000, 500); `entry show` reads
    // them back across three pages.
    let mut lines = String::new();
    for i in 0..2500 {
        lines.push_str(&format!(
            "{{\"spiffe_id\": \"spiffe://example.org/bulk/{i}\", \"parent_id\": \"spiffe://example.org/node/{}\", \"selectors\": [\"unix:uid:{i}\"]}}\n",
            i % 7
        ));
    }
    let file = dir.path().join("entries.jsonl");
    std::fs::write(&file, &lines).unwrap();
    let out = server.cli(&["entry", "create", "--file", file.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["created"].as_u64(), v["total"].as_u64()), (Some(2500), Some(2500)));
    let all: serde_json::Value = serde_json::from_str(&server.cli_ok(&["entry", "show", "--output", "json"])).unwrap();
    let ids: std::collections::BTreeSet<&str> =
        all["entries"].as_array().unwrap().iter().map(|e| e["spiffe_id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2500);
    assert!(ids.contains("spiffe://example.org/bulk/2499"));

    // SPIRE's shape, with one bad entry (and one that repeats a stored one): nothing of the
    // batch is created; each offender has its own result; exit status 1.
    let spire = serde_json::json!({"entries": [
        {"spiffe_id": "spiffe://example.org/new/1", "parent_id": "spiffe://example.org/node/1",
         "selectors": [{"type": "unix", "value": "uid:1"}]},
        {"spiffe_id": "spiffe://other.org/foreign", "parent_id": "spiffe://example.org/node/1",
         "selectors": [{"type": "unix", "value": "uid:2"}]},
        {"spiffe_id": "spiffe://example.org/bulk/3", "parent_id": "spiffe://example.org/node/3",
         "selectors": [{"type": "unix", "value": "uid:3"}]},
    ]});
    let file = dir.path().join("spire.json");
    std::fs::write(&file, spire.to_string()).unwrap();
    let out = server.cli(&["entry", "create", "--file", file.to_str().unwrap(), "--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<i64> =
        v["results"].as_array().unwrap().iter().map(|r| r["status"]["code"].as_i64().unwrap()).collect();
    // Aborted (10) for the good one, InvalidArgument (3) and AlreadyExists (6) for the others.
    assert_eq!(codes, [10, 3, 6], "{v}");
    assert_eq!(v["created"], 0);
    let new: serde_json::Value = serde_json::from_str(&server.cli_ok(&[
        "entry",
        "show",
        "--spiffe-id",
        "spiffe://example.org/new/1",
        "--output",
        "json",
    ]))
    .unwrap();
    assert!(new["entries"].as_array().unwrap().is_empty(), "part of a refused batch was created");
    // The same file without the bad entries goes in.
    let good = serde_json::json!({"entries": [spire["entries"][0].clone()]});
    std::fs::write(&file, good.to_string()).unwrap();
    let text = server.cli_ok(&["entry", "create", "--file", file.to_str().unwrap()]);
    assert!(text.contains("Created 1 of 1 entries."), "{text}");
}

/// Runs `binary args... --socket socket` with standard output a pipe whose reader has already
/// gone, as in `tessera-server entry show | head -0`.
fn into_closed_pipe(binary: &str, args: &[&str], socket: &std::path::Path) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    tessera_test_util::command(binary)
        .args(args)
        .arg("--socket")
        .arg(socket)
        .env_remove("RUST_BACKTRACE")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn output_into_a_closed_pipe_ends_quietly_and_keeps_the_verdict() {
    let mesh = tessera_test_util::Mesh::start(CA_DEFAULT, "1s");
    let id = "spiffe://example.org/piped";
    mesh.register(id, &[]);
    mesh.wait_for_svid(id);
    let config = mesh.server.config.to_str().unwrap();
    let bad = mesh.dir.path().join("bad.toml");
    std::fs::write(&bad, "trust_domain = \"\"\n").unwrap();
    let agent_admin = mesh.dir.path().join("agent/admin.sock");
    // (binary, args, socket); each must end as it ends with a reader, apart from `api watch`.
    let cases: Vec<(&str, Vec<&str>, &std::path::Path)> = vec![
        ("tessera-server", vec!["entry", "show"], &mesh.server.socket),
        ("tessera-server", vec!["entry", "show", "--output", "json"], &mesh.server.socket),
        ("tessera-server", vec!["bundle", "show"], &mesh.server.socket),
        ("tessera-server", vec!["validate", "--config", config], &mesh.server.socket),
        ("tessera-server", vec!["validate", "--config", bad.to_str().unwrap()], &mesh.server.socket),
        ("tessera-server", vec!["doctor", "--output", "json"], &mesh.server.socket),
        ("tessera-agent", vec!["api", "fetch", "x509"], &mesh.socket),
        ("tessera-agent", vec!["api", "fetch", "jwt", "--audience", "a"], &mesh.socket),
        ("tessera-agent", vec!["api", "watch"], &mesh.socket),
        ("tessera-agent", vec!["debug", "info"], &agent_admin),
        ("tessera-agent", vec!["doctor"], &agent_admin),
    ];
    for (binary, args, socket) in cases {
        let piped = into_closed_pipe(binary, &args, socket);
        let err = String::from_utf8_lossy(&piped.stderr);
        assert!(!err.contains("panicked"), "{binary} {args:?} panicked on a closed stdout: {err}");
        if args[0] == "api" && args[1] == "watch" {
            // Without a reader, watch has nothing to do: it ends at its first answer.
            assert_eq!(piped.status.code(), Some(0), "{binary} {args:?}: {err}");
            continue;
        }
        let read = tessera_test_util::command(binary).args(&args).arg("--socket").arg(socket).output().unwrap();
        assert!(!read.stdout.is_empty(), "{binary} {args:?} printed nothing to compare with");
        assert_eq!(piped.status.code(), read.status.code(), "{binary} {args:?}: {err}");
        // What a reader would have seen on stderr (validate's refusal, doctor's failure) is
        // all there is on stderr: no message about the pipe.
        assert_eq!(err, String::from_utf8_lossy(&read.stderr), "{binary} {args:?}");
    }
}
