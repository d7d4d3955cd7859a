//! The PostgreSQL store against a real PostgreSQL: the same conformance suite as sled; two
//! stores on one database (two server replicas) racing on join tokens, entries and the
//! audit chain; migrations applied once; a damaged record is an error, not a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;

use tessera_store::conformance::{self, entry, event};
use tessera_store::postgres::PostgresStore;
use tessera_store::{JoinToken, Store, StoreError, verify_audit};
use tessera_test_util::postgres::TestPostgres;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_passes_the_store_conformance_suite_and_holds_up_between_replicas() {
    let pg = tokio::task::spawn_blocking(TestPostgres::start).await.unwrap();
    let url = pg.database("conformance");
    let s = PostgresStore::open(&url, 4).await.unwrap();
    conformance::run(&s).await;

    // Two replicas on one database.
    let url = pg.database("replicas");
    let a: Arc<dyn Store> = Arc::new(PostgresStore::open(&url, 4).await.unwrap());
    let b: Arc<dyn Store> = Arc::new(PostgresStore::open(&url, 4).await.unwrap());
    assert_eq!(
        pg.psql("replicas", "SELECT count(*) FROM tessera_migrations").trim(),
        "3",
        "migrations ran twice (there are three)"
    );

    // A join token is taken by exactly one of many concurrent takers.
    for i in 0..20 {
        let t = format!("token-{i}");
        a.create_join_token(&JoinToken { token: t.clone(), expires_at: 9 }).await.unwrap();
        let mut tasks = Vec::new();
        for s in [&a, &b, &a, &b] {
            let (s, t) = (s.clone(), t.clone());
            tasks.push(tokio::spawn(async move { s.take_join_token(&t).await.unwrap().is_some() }));
        }
        let mut won = 0;
        for t in tasks {
            won += usize::from(t.await.unwrap());
        }
        assert_eq!(won, 1, "token {i} taken {won} times");
    }

    // Concurrent audit appends from both replicas make one unbroken chain.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { s.append_audit(event(&format!("spiffe://td/w{i}"))).await.unwrap().seq }));
    }
    let mut seqs = BTreeSet::new();
    for t in tasks {
        seqs.insert(t.await.unwrap());
    }
    assert_eq!(seqs, (1..=100).collect::<BTreeSet<u64>>());
    let v = verify_audit(b.as_ref()).await.unwrap();
    assert!(v.ok && v.records == 100, "{v:?}");

    // Concurrent entry writes: every change is seen by an incremental sync, in order.
    let parent = "spiffe://td/tessera/agent/join_token/p";
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            s.create_entry(entry(&format!("e{i}"), &format!("spiffe://td/w{i}"), parent)).await.unwrap().revision
        }));
    }
    let mut revisions = BTreeSet::new();
    for t in tasks {
        revisions.insert(t.await.unwrap());
    }
    assert_eq!(revisions.len(), 40, "two entries got the same revision");
    let mut seen = BTreeSet::new();
    let mut since = 0;
    loop {
        let ch = a.entry_changes(since, 100_000).await.unwrap();
        if ch.changed.is_empty() {
            break;
        }
        for e in &ch.changed {
            assert!(e.revision > since);
            seen.insert(e.id.clone());
        }
        since = ch.changed.iter().map(|e| e.revision).max().unwrap();
    }
    assert_eq!(seen.len(), 40);
    // A duplicate (same SPIFFE ID, parent, selectors) is refused whichever replica writes it.
    assert!(matches!(b.create_entry(entry("dup", "spiffe://td/w0", parent)).await, Err(StoreError::AlreadyExists(_))));

    // A damaged record is a precise error.
    pg.psql("replicas", "UPDATE entries SET body = '{not json' WHERE id = 'e1'");
    match a.get_entry("e1").await {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "e1"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The connection string's password never shows in Debug.
    let dbg = format!("{:?}", PostgresStore::open(&format!("{url} password=hunter2"), 1).await.unwrap());
    assert!(!dbg.contains("hunter2"), "{dbg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verifies_the_server_and_can_be_required() {
    let pg = tokio::task::spawn_blocking(TestPostgres::start_tls).await.unwrap();
    let ca = pg.ca_pem.clone().unwrap();
    let url = format!("{} sslmode=require", pg.database("tls"));
    let s = PostgresStore::open_with_tls(&url, 2, Some(ca.as_bytes())).await.unwrap();
    s.create_join_token(&JoinToken { token: "t".into(), expires_at: 1 }).await.unwrap();
    // The session really is encrypted.
    let ssl = pg.psql("tls", "SELECT count(*) FROM pg_stat_ssl WHERE ssl");
    assert!(ssl.trim().parse::<u32>().unwrap() >= 2, "no TLS sessions: {ssl}");
    // Another CA: the server is not trusted.
    let other = rcgen::CertificateParams::default().self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().pem();
    let err = PostgresStore::open_with_tls(&url, 1, Some(other.as_bytes())).await.unwrap_err().to_string();
    assert!(err.contains("postgres"), "{err}");
    // sslmode=require without TLS settings is refused rather than sent in the clear.
    assert!(PostgresStore::open(&url, 1).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_migrated_by_a_newer_server_runs_if_readable_and_is_refused_naming_both_versions_if_not() {
    let pg = tokio::task::spawn_blocking(TestPostgres::start).await.unwrap();
    let url = pg.database("downgrade");
    drop(PostgresStore::open(&url, 2).await.unwrap());
    assert_eq!(
        pg.psql("downgrade", "SELECT value FROM tessera_meta WHERE key = 'last_writer_version'").trim(),
        tessera_store::WRITER_VERSION
    );
    pg.psql(
        "downgrade",
        "INSERT INTO tessera_migrations (version) VALUES (99); UPDATE tessera_meta SET value = '9.1.0' WHERE key = 'last_writer_version'",
    );
    // The newer server kept the readable-from this build recorded: its migration is one an
    // older server can live with, so this build runs on it and leaves it as it is.
    let e = PostgresStore::open(&url, 2).await;
    assert!(e.is_ok(), "a schema readable by this build is refused: {:?}", e.err());
    drop(e);
    assert_eq!(pg.psql("downgrade", "SELECT max(version) FROM tessera_migrations").trim(), "99");
    assert_eq!(
        pg.psql("downgrade", "SELECT value FROM tessera_meta WHERE key = 'last_writer_version'").trim(),
        "9.1.0"
    );
    // It did not.
    pg.psql("downgrade", "UPDATE tessera_meta SET value = '99' WHERE key = 'readable_from_schema'");
    let e = PostgresStore::open(&url, 2).await.unwrap_err();
    assert!(matches!(e, StoreError::SchemaTooNew { found: 99, readable_from: 99, .. }), "{e:?}");
    let m = e.to_string();
    assert!(m.contains("schema version 99, last written by server 9.1.0"), "{m}");
    assert!(m.contains("understands schema version 99 or later"), "{m}");
    // A damaged record is corrupt, not a panic.
    pg.psql("downgrade", "UPDATE tessera_meta SET value = 'x' WHERE key = 'readable_from_schema'");
    let e = PostgresStore::open(&url, 2).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
}
