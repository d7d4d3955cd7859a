//! The Admin API in-process: input validation (precise errors, nothing stored), local
//! authority rotation, and the audit chain.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tessera_proto::admin::v1 as admin;
use tessera_proto::types::v1 as types;
use tessera_test_util::inprocess::*;
use tonic::Code;

fn entry(spiffe_id: &str, parent: &str, sel: (&str, &str)) -> types::Entry {
    types::Entry {
        spiffe_id: spiffe_id.into(),
        parent_id: parent.into(),
        selectors: vec![types::Selector { r#type: sel.0.into(), value: sel.1.into() }],
        ..Default::default()
    }
}

#[tokio::test]
async fn invalid_entries_get_precise_errors_and_change_nothing() {
    let mut t = TestServer::start().await;
    let parent = "spiffe://example.org/tessera/agent/join_token/abc";
    let cases: Vec<(types::Entry, &str)> = vec![
        (entry("spiffe://example.org/a//b", parent, ("unix", "uid:1")), "empty segments"),
        (entry("http://example.org/a", parent, ("unix", "uid:1")), "scheme"),
        (entry("spiffe://other.org/a", parent, ("unix", "uid:1")), "not in trust domain"),
        (entry("spiffe://example.org/a", parent, ("bogus", "x")), "invalid selector"),
        (entry("spiffe://example.org/a", "spiffe://example.org/x", ("unix", "")), "invalid selector"),
        (
            types::Entry { x509_svid_ttl: 90 * 3600, ..entry("spiffe://example.org/a", parent, ("unix", "uid:1")) },
            "over the server's maximum",
        ),
        (types::Entry { x509_svid_ttl: -1, ..entry("spiffe://example.org/a", parent, ("unix", "uid:1")) }, "negative"),
        (
            types::Entry {
                federates_with: vec!["example.org".into()],
                ..entry("spiffe://example.org/a", parent, ("unix", "uid:1"))
            },
            "own trust domain",
        ),
        (
            types::Entry {
                dns_names: vec!["bad name".into()],
                ..entry("spiffe://example.org/a", parent, ("unix", "uid:1"))
            },
            "invalid DNS name",
        ),
    ];
    for (e, needle) in cases {
        let err = t.admin.create_entry(admin::CreateEntryRequest { entry: Some(e.clone()) }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{e:?}");
        assert!(err.message().contains(needle), "{needle:?} not in {:?}", err.message());
    }
    let ok = t.create_entry("spiffe://example.org/a", parent).await;
    let dup = t
        .admin
        .create_entry(admin::CreateEntryRequest {
            entry: Some(entry("spiffe://example.org/a", parent, ("unix", "uid:1000"))),
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let all = t.admin.list_entries(admin::ListEntriesRequest::default()).await.unwrap().into_inner().entries;
    assert_eq!(all.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), vec![ok.id.clone()]);
    let missing = t.admin.delete_entry(admin::EntryId { id: "nope".into() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    t.stop().await;
}

#[tokio::test]
async fn mint_refuses_foreign_ids_ttl_over_cap_and_ca_csrs() {
    let mut t = TestServer::start().await;
    let req = |id: &str, ttl: i64| admin::MintX509SvidRequest {
        spiffe_id: id.into(),
        csr: csr_for(id),
        ttl,
        dns_names: vec![],
    };
    assert_eq!(t.admin.mint_x509_svid(req("spiffe://other.org/w", 0)).await.unwrap_err().code(), Code::InvalidArgument);
    let e = t.admin.mint_x509_svid(req("spiffe://example.org/w", 48 * 3600)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("maximum"), "{}", e.message());
    let e = t
        .admin
        .mint_jwt_svid(admin::MintJwtSvidRequest {
            spiffe_id: "spiffe://example.org/w".into(),
            audience: vec!["a".into()],
            ttl: 25 * 3600,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let ok = t.admin.mint_x509_svid(req("spiffe://example.org/w", 600)).await.unwrap().into_inner().svid.unwrap();
    let now = tessera_identity::unix_now();
    assert!((ok.expires_at - now - 600).abs() <= 5, "TTL not honoured: {}", ok.expires_at - now);
    t.stop().await;
}

#[tokio::test]
async fn prepare_then_activate_keeps_both_roots_and_both_generations_verify() {
    let mut t = TestServer::start().await;
    let before = t.bundle().await;
    assert_eq!(before.x509_authorities.len(), 1);
    let mint =
        |id: &str| admin::MintX509SvidRequest { spiffe_id: id.into(), csr: csr_for(id), ttl: 0, dns_names: vec![] };
    let old_svid = t.admin.mint_x509_svid(mint("spiffe://example.org/a")).await.unwrap().into_inner().svid.unwrap();

    // Preparing twice replaces the first prepared CA, in the bundle too.
    t.admin.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await.unwrap();
    let prepared = t.admin.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await.unwrap().into_inner();
    assert_eq!(prepared.authorities.iter().filter(|a| a.status == "prepared").count(), 1);
    let prepared_id = prepared.authorities.iter().find(|a| a.status == "prepared").unwrap().authority_id.clone();
    let mid = t.bundle().await;
    assert_eq!(mid.x509_authorities.len(), 2, "prepared CA must be in the bundle before it signs");
    assert!(mid.sequence_number > before.sequence_number);
    // Still signing with the old one.
    let still_old = t.admin.mint_x509_svid(mint("spiffe://example.org/b")).await.unwrap().into_inner().svid.unwrap();
    verify_chain(&still_old.cert_chain, &before.x509_authorities, "spiffe://example.org/b").unwrap();

    let e = t
        .admin
        .activate_x509_authority(admin::ActivateX509AuthorityRequest { authority_id: "deadbeef".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let state = t
        .admin
        .activate_x509_authority(admin::ActivateX509AuthorityRequest { authority_id: prepared_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let active = state.authorities.iter().find(|a| a.status == "active").unwrap();
    assert_eq!(active.authority_id, prepared_id);
    let new_svid = t.admin.mint_x509_svid(mint("spiffe://example.org/c")).await.unwrap().into_inner().svid.unwrap();

    let after = t.bundle().await.x509_authorities;
    assert_eq!(after.len(), 2);
    verify_chain(&old_svid.cert_chain, &after, "spiffe://example.org/a").unwrap();
    verify_chain(&new_svid.cert_chain, &after, "spiffe://example.org/c").unwrap();
    assert!(
        verify_chain(&new_svid.cert_chain, &before.x509_authorities, "spiffe://example.org/c").is_err(),
        "new CA signs under the old root?"
    );

    // Only the old authority can be tainted.
    let e =
        t.admin.taint_x509_authority(admin::TaintX509AuthorityRequest { authority_id: prepared_id }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let old_id = state.authorities.iter().find(|a| a.status == "old").unwrap().authority_id.clone();
    let tainted = t
        .admin
        .taint_x509_authority(admin::TaintX509AuthorityRequest { authority_id: old_id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(tainted.authorities.iter().find(|a| a.authority_id == old_id).unwrap().tainted);
    let e = t
        .admin
        .taint_x509_authority(admin::TaintX509AuthorityRequest { authority_id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    t.stop().await;
}

#[tokio::test]
async fn ca_rotates_on_schedule_and_prunes_expired_roots() {
    // CA life 6 s: prepare at 3 s, activate at 5 s, the first root expires at 6 s. The CA
    // reads a manual clock that the test moves one second per rotation check.
    let clock = std::sync::Arc::new(tessera_ca::ManualClock::new(tessera_identity::unix_now()));
    let mut t = TestServer::start_with_clock("ca_ttl = \"6s\"\ndefault_x509_svid_ttl = \"2s\"\n", clock.clone()).await;
    let first = t.bundle().await.x509_authorities;
    assert_eq!(first.len(), 1);
    let ca = t.server().ca.clone();
    let mut seen_two = false;
    let mut pruned = false;
    for _ in 0..20 {
        ca.rotate_once().await.unwrap();
        let roots = t.bundle().await.x509_authorities;
        if roots.len() == 2 {
            seen_two = true;
        }
        if seen_two && !roots.contains(&first[0]) {
            pruned = true;
            break;
        }
        clock.advance(1);
    }
    assert!(seen_two && pruned, "rotation did not complete in 20 clock seconds");
    assert!(ca.is_ready());
    t.stop().await;
}

#[tokio::test]
async fn federated_bundle_admin_round_trip_and_refusals() {
    let mut t = TestServer::start().await;
    let e = t
        .admin
        .set_federated_bundle(types::Bundle { trust_domain: "example.org".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = t
        .admin
        .set_federated_bundle(types::Bundle {
            trust_domain: "peer.org".into(),
            x509_authorities: vec![vec![0x30, 0x00]],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = t
        .admin
        .set_federated_bundle(types::Bundle { trust_domain: "peer.org".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        t.admin
            .list_federated_bundles(admin::ListFederatedBundlesRequest {})
            .await
            .unwrap()
            .into_inner()
            .bundles
            .is_empty()
    );
    let e = t
        .admin
        .delete_federated_bundle(admin::TrustDomainRequest { trust_domain: "peer.org".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    t.stop().await;
}

#[tokio::test]
async fn audit_records_are_listed_by_spiffe_id_caller_time_and_page() {
    let mut t = TestServer::start().await;
    for id in ["spiffe://example.org/a", "spiffe://example.org/b", "spiffe://example.org/a"] {
        t.admin
            .mint_x509_svid(admin::MintX509SvidRequest { spiffe_id: id.into(), csr: csr_for(id), ..Default::default() })
            .await
            .unwrap();
    }
    let list = |r: admin::ListAuditRequest| {
        let mut c = t.admin.clone();
        async move { c.list_audit(r).await.unwrap().into_inner() }
    };
    let a = list(admin::ListAuditRequest { spiffe_id: "spiffe://example.org/a".into(), ..Default::default() }).await;
    assert_eq!(a.records.len(), 2);
    assert!(
        a.records
            .iter()
            .all(|r| r.spiffe_id == "spiffe://example.org/a" && r.kind == "x509_svid" && r.caller == "admin")
    );
    assert!(a.records[0].seq < a.records[1].seq && !a.records[0].serial.is_empty());
    let none =
        list(admin::ListAuditRequest { caller: "spiffe://example.org/tessera/agent/x".into(), ..Default::default() })
            .await;
    assert!(none.records.is_empty());
    let future = list(admin::ListAuditRequest { since_ms: 4_000_000_000_000, ..Default::default() }).await;
    assert!(future.records.is_empty());
    // Paging: one at a time, following next_seq, reaches every record once.
    let mut seen = Vec::new();
    let mut from = 0;
    loop {
        let p = list(admin::ListAuditRequest { from_seq: from, limit: 1, ..Default::default() }).await;
        seen.extend(p.records.iter().map(|r| r.seq));
        if p.next_seq == 0 {
            break;
        }
        from = p.next_seq;
    }
    let all = list(admin::ListAuditRequest { limit: 1000, ..Default::default() }).await;
    assert_eq!(seen, all.records.iter().map(|r| r.seq).collect::<Vec<_>>());
    assert!(all.records.len() >= 3);
    t.stop().await;
}

#[tokio::test]
async fn only_software_ec_ca_keys_sign_on_the_async_worker() {
    let ec = TestServer::start().await;
    assert!(ec.server().ca.signs_inline(), "a software P-256 CA should sign inline");
    ec.stop().await;
    let mut rsa =
        TestServer::start_with("key_type = \"rsa-2048\"\nca_ttl = \"24h\"\ndefault_x509_svid_ttl = \"1h\"").await;
    assert!(!rsa.server().ca.signs_inline(), "an RSA CA must sign on the blocking pool");
    // And it still signs.
    let id = "spiffe://example.org/rsa-signed";
    let r = rsa
        .admin
        .mint_x509_svid(admin::MintX509SvidRequest { spiffe_id: id.into(), csr: csr_for(id), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    verify_chain(&r.svid.unwrap().cert_chain, &r.bundle, id).unwrap();
    rsa.stop().await;
}
