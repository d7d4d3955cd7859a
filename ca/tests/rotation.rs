//! The CA on a hand-moved clock, with a real store (sled) and the real in-memory key
//! manager: a whole rotation cycle, clock jumps, taint rules, restart and an upstream that
//! shortens the CA's life, without sleeping.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use tessera_ca::{Ca, CaConfig, CaDeps, CaError, Clock, ManualClock};
use tessera_identity::x509::cert_facts;
use tessera_identity::{KeyType, SpiffeId, TrustDomain};
use tessera_plugins::upstream::disk::DiskFiles;
use tessera_plugins::{DiskUpstream, KeyManager, MemoryKeyManager, UpstreamAuthority};
use tessera_store::{SlotStatus, Store, sled::SledStore};

const HOUR: i64 = 3600;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    km: Arc<dyn KeyManager>,
    clock: Arc<ManualClock>,
    td: TrustDomain,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).expect("store"));
        // The clock starts at the real time: certificates are checked by x509-parser and
        // rcgen against nothing else, but an upstream signs on the wall clock.
        let clock = Arc::new(ManualClock::new(tessera_identity::unix_now()));
        Self {
            _dir: dir,
            store,
            km: Arc::new(MemoryKeyManager::new()),
            clock,
            td: TrustDomain::new("example.org").expect("td"),
        }
    }

    async fn start(&self, upstream: Option<Arc<dyn UpstreamAuthority>>, ca_ttl_hours: u64) -> Arc<Ca> {
        Ca::start(CaDeps {
            trust_domain: self.td.clone(),
            config: CaConfig {
                key_type: KeyType::EcP256,
                ca_ttl: Duration::from_secs(ca_ttl_hours * 3600),
                default_x509_svid_ttl: Duration::from_secs(3600),
                default_jwt_svid_ttl: Duration::from_secs(300),
                max_x509_svid_ttl: Duration::from_secs(86_400),
                max_jwt_svid_ttl: Duration::from_secs(86_400),
            },
            instance: "test".into(),
            key_manager: self.km.clone(),
            upstream,
            store: self.store.clone(),
            clock: self.clock.clone(),
        })
        .await
        .expect("CA starts")
    }
}

/// `(authority_id, status)` of every X.509 authority, oldest first.
fn x509(ca: &Ca) -> Vec<(String, &'static str)> {
    ca.x509_authorities().into_iter().map(|a| (a.authority_id, a.status)).collect()
}

/// The authority that signed a fresh leaf.
fn signer_of_a_leaf(ca: &Ca) -> String {
    let id = SpiffeId::new("spiffe://example.org/w").expect("id");
    let (issued, _key) = ca.issue_own_svid(&id, &[], Duration::from_secs(600)).expect("signs");
    cert_facts(&issued.chain[0]).expect("facts").authority_key_id.expect("AKI")
}

#[tokio::test]
async fn a_whole_rotation_cycle_by_the_clock() {
    let f = Fixture::new();
    let ca = f.start(None, 60).await;
    let t0 = f.clock.now();
    let first = x509(&ca);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].1, "active");
    let bundle = ca.bundle();
    assert_eq!((bundle.x509_authorities.len(), bundle.jwt_authorities.len()), (1, 1));
    assert!(ca.is_ready());

    // Just before half life: nothing.
    f.clock.set(t0 + 30 * HOUR - 1);
    ca.rotate_once().await.expect("rotate");
    assert_eq!(x509(&ca).len(), 1);

    // Half life: a successor is prepared and trusted, but the first still signs.
    f.clock.set(t0 + 30 * HOUR);
    ca.rotate_once().await.expect("rotate");
    let now = x509(&ca);
    assert_eq!(now.iter().map(|a| a.1).collect::<Vec<_>>(), ["active", "prepared"]);
    let bundle = ca.bundle();
    assert_eq!((bundle.x509_authorities.len(), bundle.jwt_authorities.len()), (2, 2));
    assert_eq!(signer_of_a_leaf(&ca), first[0].0);

    // Five sixths: the successor signs; the first stays trusted.
    f.clock.set(t0 + 50 * HOUR);
    ca.rotate_once().await.expect("rotate");
    let now = x509(&ca);
    assert_eq!(now.iter().map(|a| a.1).collect::<Vec<_>>(), ["old", "active"]);
    assert_eq!(signer_of_a_leaf(&ca), now[1].0);
    assert_eq!(ca.bundle().x509_authorities.len(), 2);

    // A leaf never outlives its CA.
    let id = SpiffeId::new("spiffe://example.org/w").expect("id");
    let (leaf, _) = ca.issue_own_svid(&id, &[], Duration::from_secs(1_000 * 3600)).expect("signs");
    assert_eq!(leaf.not_after, ca.active_x509_not_after().expect("active"));

    // The first expires: pruned from the journal and the bundle. (The second, made at 30 h,
    // reaches its own half life at the same moment: its successor is prepared.)
    let first_root = ca.bundle().x509_authorities[0].to_vec();
    f.clock.set(t0 + 60 * HOUR);
    ca.rotate_once().await.expect("rotate");
    let now = x509(&ca);
    assert_eq!(now.iter().map(|a| a.1).collect::<Vec<_>>(), ["active", "prepared"], "{now:?}");
    assert!(now.iter().all(|a| a.0 != first[0].0));
    let bundle = ca.bundle();
    assert_eq!((bundle.x509_authorities.len(), bundle.jwt_authorities.len()), (2, 2));
    assert!(bundle.x509_authorities.iter().all(|c| c.as_ref() != first_root.as_slice()));
    // The journal in the store says the same.
    let journal = f.store.load_journal("test").await.expect("journal").expect("some");
    let statuses: Vec<SlotStatus> = journal.x509.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [SlotStatus::Active, SlotStatus::Prepared]);
    assert_eq!(journal.jwt.len(), 2);
}

#[tokio::test]
async fn a_clock_jump_forward_past_the_ca_replaces_it_at_once() {
    let f = Fixture::new();
    let ca = f.start(None, 60).await;
    let first = x509(&ca)[0].0.clone();
    f.clock.advance(10 * 24 * HOUR);
    assert!(!ca.is_ready(), "an expired CA is not ready");
    assert!(matches!(
        ca.issue_own_svid(&SpiffeId::new("spiffe://example.org/w").expect("id"), &[], Duration::from_secs(60)),
        Err(CaError::NoActiveAuthority(_))
    ));
    ca.rotate_once().await.expect("rotate");
    let now = x509(&ca);
    assert_eq!(now.len(), 1, "the expired CA is replaced and pruned: {now:?}");
    assert_ne!(now[0].0, first);
    assert!(ca.is_ready());
    assert_eq!(ca.bundle().x509_authorities.len(), 1);
}

#[tokio::test]
async fn a_clock_jump_backwards_changes_nothing() {
    let f = Fixture::new();
    let ca = f.start(None, 60).await;
    let before = (x509(&ca), ca.bundle().sequence_number);
    f.clock.advance(-24 * HOUR);
    ca.rotate_once().await.expect("rotate");
    assert_eq!((x509(&ca), ca.bundle().sequence_number), before);
}

#[tokio::test]
async fn only_an_old_authority_can_be_tainted_and_only_once() {
    let f = Fixture::new();
    let ca = f.start(None, 60).await;
    let first = x509(&ca)[0].0.clone();
    assert!(matches!(ca.taint_x509(&first).await, Err(CaError::TaintNotOld { status: SlotStatus::Active, .. })));
    assert!(matches!(ca.taint_x509("nope").await, Err(CaError::UnknownAuthority(_))));
    ca.prepare_x509().await.expect("prepare");
    ca.activate_x509(Some("not-it")).await.expect_err("must name the prepared one");
    ca.activate_x509(None).await.expect("activate");
    ca.taint_x509(&first).await.expect("taint the old one");
    assert_eq!(ca.tainted_authority_ids(), std::slice::from_ref(&first));
    assert!(matches!(ca.taint_x509(&first).await, Err(CaError::AlreadyTainted(_))));
    assert!(matches!(ca.activate_x509(None).await, Err(CaError::NothingPrepared(_))));
}

#[tokio::test]
async fn a_restarted_ca_keeps_its_slots() {
    let f = Fixture::new();
    let ca = f.start(None, 60).await;
    f.clock.advance(30 * HOUR);
    ca.rotate_once().await.expect("rotate");
    let before = x509(&ca);
    let jwt_before: Vec<String> = ca.bundle().jwt_authorities.iter().map(|k| k.key_id.clone()).collect();
    drop(ca);
    let ca = f.start(None, 60).await;
    assert_eq!(x509(&ca), before);
    let jwt_after: Vec<String> = ca.bundle().jwt_authorities.iter().map(|k| k.key_id.clone()).collect();
    assert_eq!(jwt_after, jwt_before);
    assert_eq!(signer_of_a_leaf(&ca), before[0].0);
}

#[tokio::test]
async fn an_upstream_that_shortens_the_ca_moves_the_rotation() {
    let f = Fixture::new();
    // An upstream root that expires in 12 hours; we ask for 60.
    let dir = tempfile::tempdir().expect("tempdir");
    let key = rcgen::KeyPair::generate().expect("key");
    let now = tessera_identity::unix_now();
    let params = tessera_identity::x509::ca_params(
        &f.td,
        now - 60,
        now + 12 * HOUR,
        tessera_identity::x509::random_serial().expect("serial"),
    )
    .expect("params");
    let root = params.self_signed(&key).expect("root");
    std::fs::write(dir.path().join("root.pem"), root.pem()).expect("write");
    std::fs::write(dir.path().join("root.key"), key.serialize_pem()).expect("write");
    let up = DiskUpstream::new(DiskFiles {
        cert_file: dir.path().join("root.pem"),
        key_file: dir.path().join("root.key"),
        chain_file: None,
        bundle_file: None,
    })
    .expect("upstream");
    let ca = f.start(Some(Arc::new(up)), 60).await;
    let not_after = ca.active_x509_not_after().expect("active");
    assert!(not_after <= now + 12 * HOUR, "the CA lives as long as the upstream allows");
    // The bundle holds the upstream root, not our intermediate.
    assert_eq!(ca.bundle().x509_authorities[0].as_ref(), root.der().as_ref());
    let issued_at = f.clock.now();
    let half = issued_at + (not_after - issued_at) / 2;
    f.clock.set(half - 1);
    ca.rotate_once().await.expect("rotate");
    assert_eq!(x509(&ca).len(), 1, "not yet at half of the shortened life");
    f.clock.set(half);
    ca.rotate_once().await.expect("rotate");
    assert_eq!(x509(&ca).iter().map(|a| a.1).collect::<Vec<_>>(), ["active", "prepared"]);
    // Both intermediates end under the same root: the bundle still has one.
    assert_eq!(ca.bundle().x509_authorities.len(), 1);
}

/// The authority that signs the bundle endpoint's SVID now (`ttl` 1 h), as the leaf's AKI.
fn endpoint_signer(ca: &Ca) -> String {
    let id = SpiffeId::new("spiffe://example.org/tessera/server").expect("id");
    let (issued, _key, signer) = ca.issue_endpoint_svid(&id, Duration::from_secs(HOUR as u64)).expect("signs");
    let aki = cert_facts(&issued.chain[0]).expect("facts").authority_key_id.expect("AKI");
    assert_eq!(signer, aki);
    assert_eq!(ca.endpoint_authority_id(Duration::from_secs(HOUR as u64)).as_deref(), Some(aki.as_str()));
    aki
}

#[tokio::test]
async fn the_bundle_endpoint_signs_with_the_previous_ca_while_it_may() {
    let f = Fixture::new();
    let ca = f.start(None, 60).await;
    let first = x509(&ca)[0].0.clone();
    assert_eq!(endpoint_signer(&ca), first, "one CA: the active one");
    ca.prepare_x509().await.expect("prepare");
    assert_eq!(endpoint_signer(&ca), first, "prepared is not active");
    ca.activate_x509(None).await.expect("activate");
    let second = x509(&ca).into_iter().find(|(_, s)| *s == "active").expect("active").0;
    // A peer that missed the whole rotation trusts only the first CA.
    assert_eq!(endpoint_signer(&ca), first, "the previous CA signs the endpoint's SVID");
    assert_eq!(signer_of_a_leaf(&ca), second, "everything else comes from the active CA");

    // After a restart, from the journal and the key manager.
    drop(ca);
    let ca = f.start(None, 60).await;
    assert_eq!(endpoint_signer(&ca), first, "restored after a restart");

    // Not once it would expire within the SVID's lifetime.
    f.clock.advance(60 * HOUR - HOUR / 2);
    assert_eq!(endpoint_signer(&ca), second, "the previous CA expires within the TTL");
    f.clock.set(tessera_identity::unix_now());

    // Not once tainted.
    ca.taint_x509(&first).await.expect("taint");
    assert_eq!(endpoint_signer(&ca), second, "a tainted CA never signs again");
}

#[tokio::test]
async fn the_next_prepare_takes_the_previous_cas_key_slot() {
    let f = Fixture::new();
    let ca = f.start(None, 60).await;
    let first = x509(&ca)[0].0.clone();
    ca.prepare_x509().await.expect("prepare");
    ca.activate_x509(None).await.expect("activate");
    assert_eq!(endpoint_signer(&ca), first);
    ca.prepare_x509().await.expect("prepare again");
    let second = x509(&ca).into_iter().find(|(_, s)| *s == "active").expect("active").0;
    assert_eq!(endpoint_signer(&ca), second, "the first CA's key is gone: its slot holds the third");
    drop(ca);
    let ca = f.start(None, 60).await;
    assert_eq!(endpoint_signer(&ca), second, "and stays gone after a restart");
}
