//! The store conformance suite: every [`Store`] implementation runs it (sled now, PostgreSQL
//! later), so they behave the same.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tessera_identity::{Bundle, JwtAuthority, Selector, SpiffeId, TrustDomain};

use super::*;

/// A test entry.
pub fn entry(id: &str, spiffe_id: &str, parent: &str) -> Entry {
    Entry::new(
        id.into(),
        SpiffeId::new(spiffe_id).unwrap(),
        SpiffeId::new(parent).unwrap(),
        vec![Selector::new("unix", "uid:1000").unwrap()],
        1,
    )
}

/// A test audit event.
pub fn event(id: &str) -> AuditEvent {
    AuditEvent {
        at_ms: 1,
        kind: AuditKind::X509Svid,
        spiffe_id: id.into(),
        serial: "01".into(),
        not_after: 2,
        caller: "test".into(),
        detail: String::new(),
    }
}

/// Runs every rule against an empty store.
pub async fn run(s: &dyn Store) {
    entries(s).await;
    entry_batches(s).await;
    agents_and_tokens(s).await;
    bundles_and_journal(s).await;
    audit_chain(s).await;
}

async fn entry_batches(s: &dyn Store) {
    let parent = "spiffe://td/tessera/agent/join_token/batch";
    let before = s.entry_changes(0, 0).await.unwrap().revision;
    let stored = s
        .create_entries(vec![
            entry("batch-1", "spiffe://td/b1", parent),
            entry("batch-2", "spiffe://td/b2", parent),
            entry("batch-3", "spiffe://td/b3", parent),
        ])
        .await
        .unwrap();
    assert!(
        stored[0].revision > before
            && stored[1].revision > stored[0].revision
            && stored[2].revision > stored[1].revision
    );
    let changes = s.entry_changes(before, 100).await.unwrap();
    assert_eq!(changes.changed.len(), 3);
    assert_eq!(changes.revision, stored[2].revision);
    let parent_id = SpiffeId::new(parent).unwrap();
    // All or nothing: a batch with one entry that collides with a stored one stores nothing,
    // and so does one with two entries that collide with each other, or a repeated ID.
    for bad in [
        vec![entry("batch-4", "spiffe://td/b4", parent), entry("batch-5", "spiffe://td/b1", parent)],
        vec![entry("batch-6", "spiffe://td/b6", parent), entry("batch-7", "spiffe://td/b6", parent)],
        vec![entry("batch-8", "spiffe://td/b8", parent), entry("batch-8", "spiffe://td/b9", parent)],
        vec![entry("batch-1", "spiffe://td/b10", parent)],
    ] {
        assert!(matches!(s.create_entries(bad).await, Err(StoreError::AlreadyExists(_))));
        assert_eq!(s.entries_by_parent(&parent_id).await.unwrap().len(), 3, "a refused batch left entries");
        assert_eq!(
            s.entry_changes(0, 0).await.unwrap().revision,
            stored[2].revision,
            "a refused batch moved the revision"
        );
    }
    // Pages, by ID, after a token.
    let first = s.entries_page("", 2).await.unwrap();
    assert_eq!(first.len(), 2);
    let all: Vec<String> = s.list_entries().await.unwrap().into_iter().map(|e| e.id).collect();
    let mut paged = Vec::new();
    let mut after = String::new();
    loop {
        let p = s.entries_page(&after, 2).await.unwrap();
        let Some(last) = p.last() else { break };
        after = last.id.clone();
        paged.extend(p.into_iter().map(|e| e.id));
    }
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(paged, sorted);
    for e in stored {
        s.delete_entry(&e.id).await.unwrap();
    }
    assert!(s.entries_page("batch-1", 10).await.unwrap().iter().all(|e| !e.id.starts_with("batch-")));
}

async fn entries(s: &dyn Store) {
    let parent = "spiffe://td/tessera/agent/join_token/a";
    let a = s.create_entry(entry("a", "spiffe://td/w1", parent)).await.unwrap();
    let b = s.create_entry(entry("b", "spiffe://td/w2", parent)).await.unwrap();
    assert!(b.revision > a.revision, "revisions must increase");
    assert!(matches!(s.create_entry(entry("a", "spiffe://td/x", parent)).await, Err(StoreError::AlreadyExists(_))));
    assert!(
        matches!(s.create_entry(entry("c", "spiffe://td/w1", parent)).await, Err(StoreError::AlreadyExists(_))),
        "same SPIFFE ID, parent and selectors must be refused"
    );
    let base = s.entry_changes(0, 100).await.unwrap();
    assert_eq!(base.changed.len(), 2);
    assert_eq!(base.revision, b.revision);
    let unchanged = s.entry_changes(base.revision, 100).await.unwrap();
    assert!(unchanged.changed.is_empty() && unchanged.deleted.is_empty(), "unchanged store reported changes");

    let mut a2 = a.clone();
    a2.dns_names = vec!["w1.local".into()];
    let a2 = s.update_entry(a2).await.unwrap();
    assert!(a2.revision > b.revision);
    let ch = s.entry_changes(base.revision, 100).await.unwrap();
    assert_eq!(ch.changed.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["a"]);
    assert_eq!(ch.changed[0].dns_names, vec!["w1.local".to_owned()]);

    assert!(s.delete_entry("b").await.unwrap().is_some());
    assert!(s.delete_entry("b").await.unwrap().is_none());
    let ch = s.entry_changes(a2.revision, 100).await.unwrap();
    assert_eq!(ch.deleted, vec![DeletedEntry { id: "b".into(), parent_id: Some(SpiffeId::new(parent).unwrap()) }]);
    // A replay is bounded: over the limit, only the revision comes back.
    let capped = s.entry_changes(0, 1).await.unwrap();
    assert!(capped.truncated && capped.changed.is_empty() && capped.deleted.is_empty(), "{capped:?}");
    assert_eq!(capped.revision, ch.revision);
    let revision_only = s.entry_changes(0, 0).await.unwrap();
    assert!(revision_only.truncated);
    assert_eq!(
        s.entry_changes(ch.revision, 0).await.unwrap(),
        EntryChanges { revision: ch.revision, ..Default::default() }
    );
    assert!(ch.changed.is_empty());

    let by_parent = s.entries_by_parent(&SpiffeId::new(parent).unwrap()).await.unwrap();
    assert_eq!(by_parent.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["a"]);
    assert!(s.get_entry("b").await.unwrap().is_none());
    assert!(matches!(s.update_entry(entry("zz", "spiffe://td/q", parent)).await, Err(StoreError::NotFound(_))));
    s.delete_entry("a").await.unwrap();
}

async fn agents_and_tokens(s: &dyn Store) {
    let id = SpiffeId::new("spiffe://td/tessera/agent/join_token/t").unwrap();
    let rec = AgentRecord {
        spiffe_id: id.clone(),
        attestation_type: "join_token".into(),
        serial: "aa".into(),
        previous_serial: String::new(),
        expires_at: 5,
        banned: false,
        selectors: vec![],
        attested_at: 1,
        renewed_at: 0,
        revision: 0,
        version: "0.1.0".into(),
    };
    // Agent records are written only by compare-and-set on their revision.
    let first = s.compare_and_put_agent(&rec, None).await.unwrap().expect("created");
    assert!(first.revision > 0, "the store sets the revision");
    assert_eq!(s.get_agent(&id).await.unwrap().unwrap(), first);
    assert_eq!(s.list_agents().await.unwrap().len(), 1);
    assert_eq!(s.compare_and_put_agent(&rec, None).await.unwrap(), None, "created twice");
    // A renewal that read the record, racing a ban that wrote it first, loses.
    let mut banned = first.clone();
    banned.banned = true;
    let banned = s.compare_and_put_agent(&banned, Some(first.revision)).await.unwrap().expect("ban applied");
    assert!(banned.revision > first.revision);
    let mut renewed = first.clone();
    renewed.serial = "bb".into();
    assert_eq!(s.compare_and_put_agent(&renewed, Some(first.revision)).await.unwrap(), None, "stale write won");
    assert!(s.get_agent(&id).await.unwrap().unwrap().banned, "the ban was overwritten");
    // After eviction, neither an old revision nor a re-creation race brings back an old revision.
    assert!(s.delete_agent(&id).await.unwrap().is_some());
    assert!(s.get_agent(&id).await.unwrap().is_none());
    assert_eq!(s.compare_and_put_agent(&renewed, Some(banned.revision)).await.unwrap(), None, "evicted agent renewed");
    assert!(s.get_agent(&id).await.unwrap().is_none());
    let again = s.compare_and_put_agent(&rec, None).await.unwrap().expect("re-attested");
    assert!(again.revision > banned.revision, "a revision was handed out twice");
    assert_eq!(s.compare_and_put_agent(&renewed, Some(first.revision)).await.unwrap(), None);
    // Of concurrent writers that read the same revision, exactly one wins.
    let writes: Vec<_> = (0..16)
        .map(|i| {
            let mut r = again.clone();
            r.serial = format!("{i:02x}");
            async move { s.compare_and_put_agent(&r, Some(again.revision)).await.unwrap() }
        })
        .collect();
    let won = futures_util::future::join_all(writes).await.into_iter().flatten().count();
    assert_eq!(won, 1, "{won} concurrent writers of one revision succeeded");
    assert!(s.delete_agent(&id).await.unwrap().is_some());
    assert!(s.delete_agent(&id).await.unwrap().is_none());

    let t = JoinToken { token: "secret".into(), expires_at: 9 };
    s.create_join_token(&t).await.unwrap();
    assert!(s.create_join_token(&t).await.is_err(), "duplicate token accepted");
    assert_eq!(s.take_join_token("secret").await.unwrap(), Some(t));
    assert_eq!(s.take_join_token("secret").await.unwrap(), None, "a token must be usable once");
    assert!(!format!("{:?}", JoinToken { token: "secret".into(), expires_at: 9 }).contains("secret"));
}

async fn bundles_and_journal(s: &dyn Store) {
    let td = TrustDomain::new("peer.org").unwrap();
    let mut b = Bundle::new(td.clone());
    b.add_jwt_authority(JwtAuthority { key_id: "k".into(), public_key: vec![1, 2, 3], expires_at: 7 });
    b.sequence_number = 3;
    s.put_bundle(&b).await.unwrap();
    assert_eq!(s.get_bundle(&td).await.unwrap().unwrap(), b);
    assert_eq!(s.list_bundles().await.unwrap().len(), 1);
    assert!(s.delete_bundle(&td).await.unwrap());
    assert!(!s.delete_bundle(&td).await.unwrap());
    // Compare-and-set on the sequence: a stale writer loses, and nothing changes.
    assert!(s.compare_and_put_bundle(&b, None).await.unwrap());
    assert!(!s.compare_and_put_bundle(&b, None).await.unwrap(), "created twice");
    let mut next = b.clone();
    next.sequence_number = 4;
    assert!(!s.compare_and_put_bundle(&next, Some(2)).await.unwrap(), "stale sequence accepted");
    assert_eq!(s.get_bundle(&td).await.unwrap().unwrap(), b);
    assert!(s.compare_and_put_bundle(&next, Some(3)).await.unwrap());
    assert_eq!(s.get_bundle(&td).await.unwrap().unwrap().sequence_number, 4);
    assert!(s.delete_bundle(&td).await.unwrap());

    let rel = FederationRelationship {
        trust_domain: td.clone(),
        bundle_endpoint_url: "https://peer.org:8443".into(),
        profile: EndpointProfile::HttpsSpiffe {
            endpoint_spiffe_id: SpiffeId::new("spiffe://peer.org/tessera/server").unwrap(),
        },
        allow_empty_bundle: false,
    };
    s.put_federation(&rel).await.unwrap();
    assert_eq!(s.list_federations().await.unwrap(), vec![rel.clone()]);
    // A put replaces, and both profiles round-trip.
    let web = FederationRelationship {
        profile: EndpointProfile::HttpsWeb { ca_bundle_path: Some("/etc/peer-ca.pem".into()) },
        allow_empty_bundle: true,
        ..rel
    };
    s.put_federation(&web).await.unwrap();
    assert_eq!(s.get_federation(&td).await.unwrap(), Some(web));
    assert_eq!(s.list_federations().await.unwrap().len(), 1);
    assert_eq!(s.get_federation(&TrustDomain::new("other.org").unwrap()).await.unwrap(), None);
    assert!(s.delete_federation(&td).await.unwrap());

    assert!(s.load_journal("server-1").await.unwrap().is_none());
    let j = CaJournal {
        x509: vec![X509CaEntry {
            key_id: "x509-CA-A".into(),
            authority_id: "ab".into(),
            chain: vec!["AAAA".into()],
            issued_at: 1,
            not_after: 2,
            status: SlotStatus::Active,
            tainted: false,
        }],
        jwt: vec![],
    };
    s.save_journal("server-1", &j).await.unwrap();
    assert_eq!(s.load_journal("server-1").await.unwrap().unwrap(), j);
    assert!(s.load_journal("server-2").await.unwrap().is_none(), "journals are per server");
    s.save_journal("server-2", &CaJournal::default()).await.unwrap();
    let all = s.list_journals().await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.contains(&("server-1".to_owned(), j.clone())), "{all:?}");
}

async fn audit_chain(s: &dyn Store) {
    for i in 0..5 {
        let r = s.append_audit(event(&format!("spiffe://td/w{i}"))).await.unwrap();
        assert_eq!(r.seq, i + 1);
    }
    let all = s.audit_range(1, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[1].prev_hash, all[0].hash);
    let v = verify_audit(s).await.unwrap();
    assert!(v.ok, "{v:?}");
    assert_eq!(v.records, 5);
    // Tampering is detected at the right record.
    let mut checker = audit::ChainChecker::default();
    let mut tampered = all.clone();
    tampered[2].event.spiffe_id = "spiffe://td/evil".into();
    let verdict = tampered.iter().find_map(|r| checker.push(r)).unwrap();
    assert_eq!(verdict.first_broken, Some(3));
    assert_eq!(s.audit_range(4, 1).await.unwrap()[0].seq, 4);
}
