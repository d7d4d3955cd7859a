//! The Agent API end to end, in-process: attestation, sync, batch signing, JWT-SVIDs,
//! bundles, and every refusal, over real mTLS on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tessera_proto::admin::v1 as admin;
use tessera_proto::agent::v1 as agent;
use tessera_proto::types::v1 as types;
use tessera_test_util::inprocess::*;
use tonic::Code;

fn attest_req(token: &str, csr: Vec<u8>) -> agent::AttestAgentRequest {
    agent::AttestAgentRequest {
        data: Some(agent::AttestationData { r#type: "join_token".into(), payload: token.as_bytes().to_vec() }),
        csr,
        ..Default::default()
    }
}

#[tokio::test]
async fn join_token_attests_once_and_yields_an_agent_svid() {
    let mut t = TestServer::start().await;
    let token = t.join_token(None).await;
    let mut anon = t.anonymous_channel().await;
    let resp = anon.attest_agent(attest_req(&token.token, csr_for(&token.agent_id))).await.unwrap().into_inner();
    let svid = resp.svid.unwrap();
    assert_eq!(svid.spiffe_id, token.agent_id);
    assert!(token.agent_id.starts_with("spiffe://example.org/tessera/agent/join_token/"));
    let roots = resp.bundle.unwrap().x509_authorities;
    verify_chain(&svid.cert_chain, &roots, &token.agent_id).unwrap();

    let again = anon.attest_agent(attest_req(&token.token, csr_for(&token.agent_id))).await.unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied);
    assert!(again.message().contains("already been used"), "{}", again.message());
    let agents = t.admin.list_agents(admin::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 1);
    t.stop().await;
}

#[tokio::test]
async fn bad_attestation_input_is_refused_and_does_not_burn_the_token() {
    let mut t = TestServer::start().await;
    let token = t.join_token(None).await;
    let mut anon = t.anonymous_channel().await;
    // CSR for another identity.
    let e = anon.attest_agent(attest_req(&token.token, csr_for("spiffe://example.org/not-me"))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // CSR with a broken signature.
    let mut bad = csr_for(&token.agent_id);
    let n = bad.len() - 4;
    bad[n] ^= 0xff;
    let e = anon.attest_agent(attest_req(&token.token, bad)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("signature"), "{}", e.message());
    // Unknown token, unsupported type.
    let e = anon
        .attest_agent(attest_req("nosuchtoken", csr_for("spiffe://example.org/tessera/agent/join_token/nosuchtoken")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let mut req = attest_req(&token.token, csr_for(&token.agent_id));
    req.data.as_mut().unwrap().r#type = "k8s_psat".into();
    assert_eq!(anon.attest_agent(req).await.unwrap_err().code(), Code::InvalidArgument);
    assert!(t.admin.list_agents(admin::ListAgentsRequest::default()).await.unwrap().into_inner().agents.is_empty());
    // The token still works.
    anon.attest_agent(attest_req(&token.token, csr_for(&token.agent_id))).await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn expired_join_token_is_refused() {
    let mut t = TestServer::start().await;
    let token = t
        .admin
        .create_join_token(admin::CreateJoinTokenRequest { ttl: 1, spiffe_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let mut anon = t.anonymous_channel().await;
    let e = anon.attest_agent(attest_req(&token.token, csr_for(&token.agent_id))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("expired"), "{}", e.message());
    t.stop().await;
}

#[tokio::test]
async fn calls_other_than_attest_need_an_agent_svid() {
    let mut t = TestServer::start().await;
    let mut anon = t.anonymous_channel().await;
    let e = anon.sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // A valid SVID that is not an agent's (an admin-minted workload SVID) is refused too.
    let key = tessera_identity::PrivateKey::generate_ec_p256().unwrap();
    let id = tessera_identity::SpiffeId::new("spiffe://example.org/workload").unwrap();
    let csr = tessera_identity::csr::build_csr(&id, &[], &key).unwrap();
    let minted = t
        .admin
        .mint_x509_svid(admin::MintX509SvidRequest { spiffe_id: id.to_string(), csr, ttl: 0, dns_names: vec![] })
        .await
        .unwrap()
        .into_inner();
    let mut c = t.agent_client(&minted.svid.unwrap().cert_chain, &key).await;
    let e = c.sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    t.stop().await;
}

#[tokio::test]
async fn sync_is_incremental_and_scoped_to_the_agent() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let other = t.attested_agent().await;
    let mine = t.create_entry("spiffe://example.org/web", &a.id.to_string()).await;
    t.create_entry("spiffe://example.org/db", &other.id.to_string()).await;

    let full = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        full.upserted.iter().map(|e| e.spiffe_id.as_str()).collect::<Vec<_>>(),
        vec!["spiffe://example.org/web"]
    );

    let unchanged = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: full.revision, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(unchanged.upserted.is_empty() && unchanged.removed_ids.is_empty(), "unchanged sync returned data");
    assert_eq!(unchanged.authorized_digest, full.authorized_digest);

    let mut updated = mine.clone();
    updated.dns_names = vec!["web.local".into()];
    t.admin.update_entry(admin::UpdateEntryRequest { entry: Some(updated) }).await.unwrap();
    let delta = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: full.revision, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delta.upserted.len(), 1);
    assert_eq!(delta.upserted[0].dns_names, vec!["web.local".to_owned()]);
    assert_ne!(delta.authorized_digest, full.authorized_digest);

    t.admin.delete_entry(admin::EntryId { id: mine.id.clone() }).await.unwrap();
    let gone = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: delta.revision, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gone.removed_ids, vec![mine.id]);
    assert!(gone.upserted.is_empty());
    t.stop().await;
}

/// A sync that brings nothing new answers with a digest remembered at the store's entry
/// revision (node aliases included); once the store moves on, the digest follows it.
#[tokio::test]
async fn an_unchanged_sync_digest_follows_the_store_through_aliases() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let alias = t.create_entry("spiffe://example.org/node-alias", &a.id.to_string()).await;
    t.create_entry("spiffe://example.org/web", &alias.spiffe_id).await;
    let first = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.upserted.len(), 2, "the alias and the entry under it");
    for _ in 0..2 {
        let quiet = a
            .client
            .sync_entries(agent::SyncEntriesRequest { since_revision: first.revision, ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(quiet.upserted.is_empty() && quiet.removed_ids.is_empty());
        assert_eq!(quiet.authorized_digest, first.authorized_digest);
    }
    // A new entry under the alias: the store moves on, and so does every answer after it.
    let added = t.create_entry("spiffe://example.org/api", &alias.spiffe_id).await;
    let delta = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: first.revision, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(delta.upserted.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec![added.id.as_str()]);
    let quiet = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: delta.revision, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let now = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quiet.authorized_digest, now.authorized_digest);
    assert_ne!(quiet.authorized_digest, first.authorized_digest);
    t.stop().await;
}

/// F11 of the second review: an incremental sync tells an agent nothing about other agents'
/// entries, not even that they changed or were deleted.
#[tokio::test]
async fn incremental_sync_reveals_nothing_about_other_agents_entries() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let other = t.attested_agent().await;
    let mine = t.create_entry("spiffe://example.org/web", &a.id.to_string()).await;
    let theirs = t.create_entry("spiffe://example.org/db", &other.id.to_string()).await;
    let mut changed = theirs.clone();
    changed.dns_names = vec!["db.local".into()];
    t.admin.update_entry(admin::UpdateEntryRequest { entry: Some(changed) }).await.unwrap();
    let gone = t.create_entry("spiffe://example.org/cache", &other.id.to_string()).await;
    t.admin.delete_entry(admin::EntryId { id: gone.id.clone() }).await.unwrap();
    t.admin.delete_entry(admin::EntryId { id: mine.id.clone() }).await.unwrap();
    // From the first revision: every change since is replayed, but only ours is told.
    let r = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.removed_ids, vec![mine.id.clone()], "another agent's entries leaked");
    assert!(r.upserted.is_empty());
    for id in [&theirs.id, &gone.id] {
        assert!(!r.removed_ids.contains(id) && !r.upserted.iter().any(|e| &e.id == id), "{id} leaked");
    }
    t.stop().await;
}

/// A banned agent's open change stream (which keeps its connection from going idle) ends
/// at the ban, not whenever the agent lets go of it.
#[tokio::test]
async fn a_ban_ends_the_agents_open_change_stream() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let mut stream = a.client.watch_changes(agent::WatchChangesRequest {}).await.unwrap().into_inner();
    stream.message().await.unwrap().unwrap();
    t.admin.ban_agent(admin::AgentId { spiffe_id: a.id.to_string() }).await.unwrap();
    let e = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
        .await
        .expect("the stream outlived the ban")
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    t.stop().await;
}

#[tokio::test]
async fn node_alias_from_join_token_authorizes_its_children() {
    let mut t = TestServer::start().await;
    let token = t.join_token(Some("spiffe://example.org/node/n1")).await;
    assert_eq!(token.alias_entry.as_ref().unwrap().parent_id, token.agent_id);
    let key = tessera_identity::PrivateKey::generate_ec_p256().unwrap();
    let id = tessera_identity::SpiffeId::new(&token.agent_id).unwrap();
    let csr = tessera_identity::csr::build_csr(&id, &[], &key).unwrap();
    let svid = t
        .anonymous_channel()
        .await
        .attest_agent(attest_req(&token.token, csr))
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let mut c = t.agent_client(&svid.cert_chain, &key).await;
    let child = t.create_entry("spiffe://example.org/app", "spiffe://example.org/node/n1").await;
    let full = c
        .sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = full.upserted.iter().map(|e| e.id.clone()).collect();
    assert!(ids.contains(&child.id), "child of the node alias not synced: {ids:?}");
    t.stop().await;
}

#[tokio::test]
async fn batch_signing_signs_only_what_the_agent_may_have() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let other = t.attested_agent().await;
    let mine = t.create_entry("spiffe://example.org/web", &a.id.to_string()).await;
    let theirs = t.create_entry("spiffe://example.org/db", &other.id.to_string()).await;

    let mut bad_sig = csr_for("spiffe://example.org/web");
    let n = bad_sig.len() - 4;
    bad_sig[n] ^= 0xff;
    let ca_csr = {
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.serialize_request(&kp).unwrap().der().to_vec()
    };
    let extra_san = |san: rcgen::SanType| {
        let kp = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.subject_alt_names.push(rcgen::SanType::URI("spiffe://example.org/web".try_into().unwrap()));
        p.subject_alt_names.push(san);
        p.serialize_request(&kp).unwrap().der().to_vec()
    };
    let params = vec![
        agent::X509SvidParams { entry_id: mine.id.clone(), csr: csr_for("spiffe://example.org/web") },
        agent::X509SvidParams { entry_id: theirs.id.clone(), csr: csr_for("spiffe://example.org/db") },
        agent::X509SvidParams { entry_id: mine.id.clone(), csr: bad_sig },
        agent::X509SvidParams { entry_id: mine.id.clone(), csr: ca_csr },
        agent::X509SvidParams { entry_id: mine.id.clone(), csr: csr_for("spiffe://example.org/admin") },
        agent::X509SvidParams { entry_id: "no-such-entry".into(), csr: csr_for("spiffe://example.org/web") },
        agent::X509SvidParams {
            entry_id: mine.id.clone(),
            csr: extra_san(rcgen::SanType::IpAddress("10.0.0.7".parse().unwrap())),
        },
        agent::X509SvidParams {
            entry_id: mine.id.clone(),
            csr: extra_san(rcgen::SanType::Rfc822Name("web@example.org".try_into().unwrap())),
        },
        agent::X509SvidParams {
            entry_id: mine.id.clone(),
            csr: extra_san(rcgen::SanType::DnsName("unlisted.example.org".try_into().unwrap())),
        },
    ];
    let results =
        a.client.batch_new_x509_svid(agent::BatchNewX509SvidRequest { params }).await.unwrap().into_inner().results;
    let codes: Vec<i32> = results.iter().map(|r| r.status.as_ref().unwrap().code).collect();
    assert_eq!(
        codes,
        vec![
            0,
            Code::PermissionDenied as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            Code::PermissionDenied as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32,
            Code::InvalidArgument as i32
        ]
    );
    assert!(results[3].status.as_ref().unwrap().message.contains("CA"), "{:?}", results[3].status);
    assert!(results[6].status.as_ref().unwrap().message.contains("IP address"), "{:?}", results[6].status);
    assert!(results[7].status.as_ref().unwrap().message.contains("e-mail"), "{:?}", results[7].status);
    assert!(results[8].status.as_ref().unwrap().message.contains("unlisted.example.org"), "{:?}", results[8].status);
    let svid = results[0].svid.as_ref().unwrap();
    let roots = t.bundle().await.x509_authorities;
    verify_chain(&svid.cert_chain, &roots, "spiffe://example.org/web").unwrap();
    assert_eq!(
        tessera_identity::x509::check_svid_leaf(&svid.cert_chain[0]).unwrap().to_string(),
        "spiffe://example.org/web"
    );

    // Exactly one workload SVID was issued; the refusals are audited, and the chain holds.
    let audit = t.server().store.audit_range(1, 1000).await.unwrap();
    let issued: Vec<_> = audit.iter().filter(|r| r.event.kind == tessera_store::AuditKind::X509Svid).collect();
    assert_eq!(issued.len(), 1);
    assert_eq!(issued[0].event.spiffe_id, "spiffe://example.org/web");
    assert_eq!(issued[0].event.caller, a.id.to_string());
    assert!(audit.iter().filter(|r| r.event.kind == tessera_store::AuditKind::Denied).count() >= 7);
    assert!(t.admin.verify_audit(admin::VerifyAuditRequest {}).await.unwrap().into_inner().ok);
    t.stop().await;
}

#[tokio::test]
async fn oversized_and_empty_batches_are_refused() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let mine = t.create_entry("spiffe://example.org/web", &a.id.to_string()).await;
    let huge = agent::BatchNewX509SvidRequest {
        params: vec![agent::X509SvidParams { entry_id: mine.id.clone(), csr: vec![0u8; 2 * 1024 * 1024] }],
    };
    let e = a.client.batch_new_x509_svid(huge).await.unwrap_err();
    assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted), "{e:?}");
    let e = a.client.batch_new_x509_svid(agent::BatchNewX509SvidRequest { params: vec![] }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let many = (0..501).map(|_| agent::X509SvidParams { entry_id: mine.id.clone(), csr: vec![] }).collect();
    let e = a.client.batch_new_x509_svid(agent::BatchNewX509SvidRequest { params: many }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    t.stop().await;
}

#[tokio::test]
async fn jwt_svids_validate_against_the_bundle_and_are_scoped() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let other = t.attested_agent().await;
    let mine = t.create_entry("spiffe://example.org/web", &a.id.to_string()).await;
    let theirs = t.create_entry("spiffe://example.org/db", &other.id.to_string()).await;
    let jwt = a
        .client
        .new_jwt_svid(agent::NewJwtSvidRequest { entry_id: mine.id.clone(), audience: vec!["svc-b".into()] })
        .await
        .unwrap()
        .into_inner();
    let bundles = a.client.fetch_bundles(agent::FetchBundlesRequest {}).await.unwrap().into_inner();
    let bundle = bundle_from_pb(&bundles.bundle.unwrap());
    let v =
        tessera_identity::jwt::validate(&jwt.token, "svc-b", tessera_identity::unix_now(), |_| Some(&bundle)).unwrap();
    assert_eq!(v.spiffe_id.to_string(), "spiffe://example.org/web");
    assert!(jwt.expires_at - jwt.issued_at <= 300);
    let e = a
        .client
        .new_jwt_svid(agent::NewJwtSvidRequest { entry_id: theirs.id, audience: vec!["svc-b".into()] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = a.client.new_jwt_svid(agent::NewJwtSvidRequest { entry_id: mine.id, audience: vec![] }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    t.stop().await;
}

#[tokio::test]
async fn federated_bundles_reach_agents_whose_entries_federate() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    // A peer trust domain's root.
    let peer_key = rcgen::KeyPair::generate().unwrap();
    let peer_td = tessera_identity::TrustDomain::new("peer.org").unwrap();
    let peer_root =
        tessera_identity::x509::ca_params(&peer_td, 0, 4_000_000_000, [1; 16]).unwrap().self_signed(&peer_key).unwrap();
    t.admin
        .set_federated_bundle(types::Bundle {
            trust_domain: "peer.org".into(),
            x509_authorities: vec![peer_root.der().to_vec()],
            ..Default::default()
        })
        .await
        .unwrap();
    let before = a.client.fetch_bundles(agent::FetchBundlesRequest {}).await.unwrap().into_inner();
    assert!(before.federated_bundles.is_empty(), "bundle sent without federates_with");
    t.admin
        .create_entry(admin::CreateEntryRequest {
            entry: Some(types::Entry {
                spiffe_id: "spiffe://example.org/web".into(),
                parent_id: a.id.to_string(),
                selectors: vec![types::Selector { r#type: "unix".into(), value: "uid:1".into() }],
                federates_with: vec!["peer.org".into()],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let after = a.client.fetch_bundles(agent::FetchBundlesRequest {}).await.unwrap().into_inner();
    assert_eq!(after.federated_bundles.len(), 1);
    assert_eq!(after.federated_bundles[0].trust_domain, "peer.org");
    t.stop().await;
}

#[tokio::test]
async fn renewal_rotates_the_agent_svid_and_eviction_and_ban_lock_the_agent_out() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let renewed = a
        .client
        .renew_agent(agent::RenewAgentRequest { csr: csr_for(&a.id.to_string()), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .svid
        .unwrap();
    let old_serial = tessera_identity::x509::cert_facts(&a.chain[0]).unwrap().serial;
    let new_serial = tessera_identity::x509::cert_facts(&renewed.cert_chain[0]).unwrap().serial;
    assert_ne!(old_serial, new_serial);
    let rec = t.admin.get_agent(admin::AgentId { spiffe_id: a.id.to_string() }).await.unwrap().into_inner();
    assert_eq!(rec.serial, new_serial);
    // Renewal for another identity is refused.
    let e = a
        .client
        .renew_agent(agent::RenewAgentRequest {
            csr: csr_for("spiffe://example.org/tessera/agent/join_token/x"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let mut b = t.attested_agent().await;
    t.admin.evict_agent(admin::AgentId { spiffe_id: a.id.to_string() }).await.unwrap();
    let e =
        a.client.sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    t.admin.ban_agent(admin::AgentId { spiffe_id: b.id.to_string() }).await.unwrap();
    let e =
        b.client.sync_entries(agent::SyncEntriesRequest { since_revision: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("banned"), "{}", e.message());
    t.stop().await;
}

#[tokio::test]
async fn attestation_types_the_server_does_not_run_are_refused_and_consume_nothing() {
    let mut t = TestServer::start().await;
    let token = t.join_token(None).await;
    let mut anon = t.anonymous_channel().await;
    let mut req = attest_req(&token.token, csr_for(&token.agent_id));
    req.data.as_mut().unwrap().r#type = "tpm".into();
    let err = anon.attest_agent(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("\"tpm\"") && err.message().contains("accepts: join_token"), "{}", err.message());
    // The token was not spent: it still attests.
    anon.attest_agent(attest_req(&token.token, csr_for(&token.agent_id))).await.unwrap();
    t.stop().await;
}

#[tokio::test]
async fn signing_and_attestation_are_rate_limited_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "").replace(
        "[server]\n",
        "[server]\nrate_limit_svids_per_second = 2\nrate_limit_attestations_per_minute = 3\nmax_batch_size = 2\n",
    );
    let mut t = TestServer::start_text(dir, &text).await;
    let mut a = t.attested_agent().await;
    let e = t.create_entry("spiffe://example.org/limited", &a.id.to_string()).await;
    let batch = |n: usize| agent::BatchNewX509SvidRequest {
        params: (0..n)
            .map(|_| agent::X509SvidParams { entry_id: e.id.clone(), csr: csr_for("spiffe://example.org/limited") })
            .collect(),
    };
    // The burst is one batch (2); the next call inside the same second is refused whole.
    a.client.batch_new_x509_svid(batch(2)).await.unwrap();
    let err = a.client.batch_new_x509_svid(batch(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("rate limit"), "{}", err.message());
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    a.client.batch_new_x509_svid(batch(1)).await.unwrap();

    // Attestation: 3 a minute from one IP (one used above); then refused, token untouched.
    t.attested_agent().await;
    t.attested_agent().await;
    let token = t.join_token(None).await;
    let mut anon = t.anonymous_channel().await;
    let err = anon.attest_agent(attest_req(&token.token, csr_for(&token.agent_id))).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let (_, metrics) = tokio::task::spawn_blocking({
        let addr = t.server().health_addr;
        move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            ((), out)
        }
    })
    .await
    .unwrap();
    assert!(metrics.contains("tessera_server_rate_limited_total{limit=\"svids_per_agent\"} 1"), "{metrics}");
    assert!(metrics.contains("tessera_server_rate_limited_total{limit=\"attestations_per_ip\"} 1"), "{metrics}");
    t.stop().await;
}

#[tokio::test]
async fn agents_report_their_version_and_one_outside_the_skew_policy_is_told_what_to_upgrade() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let current = tessera_svc::version::CURRENT;
    // A sync reports the version; the Admin API shows it.
    a.client
        .sync_entries(agent::SyncEntriesRequest { since_revision: 0, agent_version: current.into() })
        .await
        .unwrap();
    let rec = t.admin.get_agent(admin::AgentId { spiffe_id: a.id.to_string() }).await.unwrap().into_inner();
    assert_eq!(rec.version, current);
    // Newer than the server: a clear refusal, on every call that carries a version.
    let newer = "99.0.0";
    let e = a
        .client
        .sync_entries(agent::SyncEntriesRequest { since_revision: 0, agent_version: newer.into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("agent 99.0.0 is newer than server") && e.message().contains("upgrade every server"),
        "{}",
        e.message()
    );
    let e = a
        .client
        .renew_agent(agent::RenewAgentRequest { csr: csr_for(&a.id.to_string()), agent_version: newer.into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let token = t.join_token(None).await;
    let mut anon = t.anonymous_channel().await;
    let mut req = attest_req(&token.token, csr_for(&token.agent_id));
    req.agent_version = "not-a-version".into();
    let e = anon.attest_agent(req).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("not a version"), "{}", e.message());
    // The refused calls changed nothing: the token still attests.
    anon.attest_agent(attest_req(&token.token, csr_for(&token.agent_id))).await.unwrap();

    // An agent whose record holds a version the policy no longer allows (the servers were
    // upgraded past it): doctor names it.
    let id = tessera_identity::SpiffeId::new(&token.agent_id).unwrap();
    let store = t.server().store.clone();
    let mut rec = store.get_agent(&id).await.unwrap().unwrap();
    let expected = rec.revision;
    rec.version = "99.0.0".into();
    store.compare_and_put_agent(&rec, Some(expected)).await.unwrap().unwrap();
    let findings = t.admin.doctor(admin::DoctorRequest {}).await.unwrap().into_inner().findings;
    let f = findings.iter().find(|f| f.code == "agent-version-skew").expect("agent-version-skew");
    assert_eq!(f.subject, token.agent_id);
    assert_eq!(f.severity, "warning");
    t.stop().await;
}

#[tokio::test]
async fn an_entry_change_notifies_only_the_agents_it_concerns_and_a_bundle_change_notifies_all() {
    let mut t = TestServer::start().await;
    let mut a = t.attested_agent().await;
    let mut b = t.attested_agent().await;
    let watch = |c: &mut tessera_proto::agent::v1::agent_client::AgentClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        async move { c.watch_changes(agent::WatchChangesRequest {}).await.unwrap().into_inner() }
    };
    let (mut wa, mut wb) = (watch(&mut a.client).await, watch(&mut b.client).await);
    // The current generation first.
    wa.message().await.unwrap().unwrap();
    wb.message().await.unwrap().unwrap();
    let quiet = std::time::Duration::from_millis(1500);
    let soon = std::time::Duration::from_secs(5);

    // An entry under agent A: A hears of it, B does not.
    let mut e = t.create_entry("spiffe://example.org/a-workload", &a.id.to_string()).await;
    tokio::time::timeout(soon, wa.message()).await.expect("A not notified").unwrap().unwrap();
    assert!(tokio::time::timeout(quiet, wb.message()).await.is_err(), "B was notified of A's entry");

    // An entry under an alias of B (an entry whose parent is B): B hears of it.
    t.create_entry("spiffe://example.org/b-alias", &b.id.to_string()).await;
    tokio::time::timeout(soon, wb.message()).await.expect("B not notified of its alias").unwrap().unwrap();
    assert!(tokio::time::timeout(quiet, wa.message()).await.is_err(), "A was notified of B's alias");
    t.create_entry("spiffe://example.org/b-workload", "spiffe://example.org/b-alias").await;
    tokio::time::timeout(soon, wb.message()).await.expect("B not notified under its alias").unwrap().unwrap();
    assert!(tokio::time::timeout(quiet, wa.message()).await.is_err(), "A was notified of an entry under B's alias");

    // A's entry moves to B: both hear of it (A must drop it, B may take it).
    e.parent_id = b.id.to_string();
    t.admin.update_entry(admin::UpdateEntryRequest { entry: Some(e) }).await.unwrap();
    tokio::time::timeout(soon, wa.message()).await.expect("A not notified of the move").unwrap().unwrap();
    tokio::time::timeout(soon, wb.message()).await.expect("B not notified of the move").unwrap().unwrap();

    // A bundle change concerns everyone.
    t.admin.prepare_x509_authority(admin::PrepareX509AuthorityRequest {}).await.unwrap();
    tokio::time::timeout(soon, wa.message()).await.expect("A not notified of the bundle").unwrap().unwrap();
    tokio::time::timeout(soon, wb.message()).await.expect("B not notified of the bundle").unwrap().unwrap();
    drop((wa, wb));
    t.stop().await;
}
