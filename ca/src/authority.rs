//! The two kinds of authority a CA holds — an X.509 CA ([`X509Authority`]) and a JWT signing
//! key ([`JwtSigner`]) — and what they have in common for the slots ([`AuthorityKind`]): a
//! journal entry with an ID, a status and a lifetime, a pair of key-manager slots, and the
//! bundle items they put in the trust bundle.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use rcgen::{Issuer, PublicKeyData, SigningKey};
use tessera_identity::x509::{cert_facts, hex_lower};
use tessera_identity::{Bundle, JwtAuthority};
use tessera_plugins::{CaKey, MintedX509Ca};
use tessera_store::{CaJournal, JwtKeyEntry, SlotStatus, X509CaEntry};

use crate::ca::IssuedX509;
use crate::error::{CaError, UpstreamAnswerError};
use crate::policy::Lifetime;

/// An rcgen signing key backed by a key manager key.
pub(crate) struct KeySigner {
    pub(crate) key: Arc<dyn CaKey>,
    pub(crate) alg: &'static rcgen::SignatureAlgorithm,
}

impl PublicKeyData for KeySigner {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key_raw()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

impl SigningKey for KeySigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign(msg).map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

/// A usable X.509 authority: its journal entry, certificate and signer.
pub(crate) struct X509Authority {
    pub(crate) entry: X509CaEntry,
    /// Certificates that follow a leaf in an SVID chain (empty for a self-signed CA).
    pub(crate) chain_tail: Vec<Vec<u8>>,
    pub(crate) issuer: Issuer<'static, KeySigner>,
    /// Signing takes microseconds in this process (a software EC key): cheaper on an async
    /// worker than a hop to the blocking pool. False for RSA and for HSM keys.
    pub(crate) quick: bool,
}

impl X509Authority {
    /// Builds the authority from its entry, key and decoded chain (our CA first).
    pub(crate) fn new(entry: X509CaEntry, key: Arc<dyn CaKey>, chain: &[Vec<u8>]) -> Result<Self, CaError> {
        let alg = key.key_type().signature_algorithm();
        let quick = !key.blocks() && !key.key_type().is_rsa();
        let cert = chain.first().ok_or_else(|| CaError::DamagedJournal(entry.authority_id.clone()))?;
        let issuer = Issuer::from_ca_cert_der(&cert.as_slice().into(), KeySigner { key, alg })?;
        // Self-signed: nothing follows the leaf. Upstream-signed: our CA and its intermediates.
        let chain_tail = if chain.len() > 1 { chain[..chain.len() - 1].to_vec() } else { Vec::new() };
        Ok(Self { entry, chain_tail, issuer, quick })
    }

    /// A certificate this authority signed, as issued: it, then the chain that follows a leaf.
    pub(crate) fn issued(&self, cert: &rcgen::Certificate, serial: &[u8], not_after: i64) -> IssuedX509 {
        let mut chain = Vec::with_capacity(1 + self.chain_tail.len());
        chain.push(cert.der().to_vec());
        chain.extend(self.chain_tail.iter().cloned());
        IssuedX509 { chain, serial: hex_lower(serial), not_after }
    }
}

/// A usable JWT signing key.
pub(crate) struct JwtSigner {
    pub(crate) entry: JwtKeyEntry,
    pub(crate) key: Arc<dyn CaKey>,
}

/// What an authority puts in the trust bundle.
#[derive(Debug, Clone)]
pub(crate) enum BundleItem {
    /// An X.509 root (DER).
    Root(Vec<u8>),
    /// A JWT public key.
    JwtKey(JwtAuthority),
}

impl BundleItem {
    fn same(&self, other: &BundleItem) -> bool {
        match (self, other) {
            (BundleItem::Root(a), BundleItem::Root(b)) => a == b,
            (BundleItem::JwtKey(a), BundleItem::JwtKey(b)) => a.key_id == b.key_id,
            _ => false,
        }
    }

    fn is_in(&self, items: &[BundleItem]) -> bool {
        items.iter().any(|i| self.same(i))
    }
}

/// A change to the trust bundle.
#[derive(Debug, Default)]
pub(crate) struct BundleChange {
    pub(crate) remove: Vec<BundleItem>,
    pub(crate) add: Vec<BundleItem>,
}

impl BundleChange {
    /// Applies the change; true when the bundle changed.
    pub(crate) fn apply(&self, b: &mut Bundle) -> bool {
        let before = (b.x509_authorities.len(), b.jwt_authorities.len());
        for item in &self.remove {
            match item {
                BundleItem::Root(r) => b.x509_authorities.retain(|c| c.as_ref() != r.as_slice()),
                BundleItem::JwtKey(k) => b.jwt_authorities.retain(|j| j.key_id != k.key_id),
            }
        }
        let mut changed = before != (b.x509_authorities.len(), b.jwt_authorities.len());
        for item in &self.add {
            changed |= match item {
                BundleItem::Root(r) => b.add_x509_authority(r),
                BundleItem::JwtKey(k) => b.add_jwt_authority(k.clone()),
            };
        }
        changed
    }

    /// The change that retires `gone` entries: their items leave the bundle unless a
    /// remaining entry or `keep` still holds them (one upstream root under several CAs).
    pub(crate) fn retiring<'a, E: JournalEntry + 'a>(
        gone: impl IntoIterator<Item = &'a E>,
        remaining: impl IntoIterator<Item = &'a E>,
        keep: &[BundleItem],
    ) -> Self {
        let mut kept: Vec<BundleItem> = remaining.into_iter().flat_map(JournalEntry::bundle_items).collect();
        kept.extend(keep.iter().cloned());
        let remove = gone.into_iter().flat_map(JournalEntry::bundle_items).filter(|i| !i.is_in(&kept)).collect();
        Self { remove, add: Vec::new() }
    }
}

/// A journal entry of either kind.
pub(crate) trait JournalEntry: Clone + Send + Sync + 'static {
    /// The authority's ID: the X.509 subject key ID, or the JWT `kid`.
    fn id(&self) -> &str;
    /// The key manager slot its key is in.
    fn key_slot(&self) -> &str;
    fn status(&self) -> SlotStatus;
    fn set_status(&mut self, status: SlotStatus);
    fn lifetime(&self) -> Lifetime;
    /// What it puts in the bundle.
    fn bundle_items(&self) -> Vec<BundleItem>;
}

impl JournalEntry for X509CaEntry {
    fn id(&self) -> &str {
        &self.authority_id
    }
    fn key_slot(&self) -> &str {
        &self.key_id
    }
    fn status(&self) -> SlotStatus {
        self.status
    }
    fn set_status(&mut self, status: SlotStatus) {
        self.status = status;
    }
    fn lifetime(&self) -> Lifetime {
        Lifetime { issued_at: self.issued_at, not_after: self.not_after }
    }
    fn bundle_items(&self) -> Vec<BundleItem> {
        self.chain.last().and_then(|c| STANDARD.decode(c).ok()).map(BundleItem::Root).into_iter().collect()
    }
}

impl JournalEntry for JwtKeyEntry {
    fn id(&self) -> &str {
        &self.kid
    }
    fn key_slot(&self) -> &str {
        &self.key_id
    }
    fn status(&self) -> SlotStatus {
        self.status
    }
    fn set_status(&mut self, status: SlotStatus) {
        self.status = status;
    }
    fn lifetime(&self) -> Lifetime {
        Lifetime { issued_at: self.issued_at, not_after: self.not_after }
    }
    fn bundle_items(&self) -> Vec<BundleItem> {
        // Keys are matched by `kid`; the key bytes matter only when the item is added, and
        // then the entry was made here a moment ago.
        let public_key = STANDARD.decode(&self.public_key).unwrap_or_default();
        vec![BundleItem::JwtKey(JwtAuthority { key_id: self.kid.clone(), public_key, expires_at: self.not_after })]
    }
}

/// The active and the prepared authority of one kind, and the one active before, whose key
/// is kept until the next prepare takes its key slot.
pub(crate) struct Slots<A> {
    pub(crate) active: Option<Arc<A>>,
    pub(crate) prepared: Option<Arc<A>>,
    pub(crate) previous: Option<Arc<A>>,
}

impl<A> Default for Slots<A> {
    fn default() -> Self {
        Self { active: None, prepared: None, previous: None }
    }
}

/// The CA's mutable state: the journal and both kinds' slots.
#[derive(Default)]
pub(crate) struct State {
    pub(crate) journal: CaJournal,
    pub(crate) x509: Slots<X509Authority>,
    pub(crate) jwt: Slots<JwtSigner>,
}

/// One kind of authority, for the code both kinds share (prepare, activate, prune, restore).
pub(crate) trait AuthorityKind: 'static {
    type Entry: JournalEntry;
    type Authority: Send + Sync + 'static;
    /// For messages: "X.509", "JWT".
    const NAME: &'static str;
    /// The two key manager slots the authorities alternate between.
    const KEY_SLOTS: [&'static str; 2];
    fn entry(a: &Self::Authority) -> &Self::Entry;
    /// The journal and the slots of this kind, borrowed together.
    fn parts(s: &mut State) -> (&mut Vec<Self::Entry>, &mut Slots<Self::Authority>);
    fn journal(j: &CaJournal) -> &[Self::Entry];
    fn slots(s: &State) -> &Slots<Self::Authority>;
}

/// X.509 CAs.
pub(crate) struct X509Kind;
/// JWT signing keys.
pub(crate) struct JwtKind;

impl AuthorityKind for X509Kind {
    type Entry = X509CaEntry;
    type Authority = X509Authority;
    const NAME: &'static str = "X.509";
    const KEY_SLOTS: [&'static str; 2] = ["x509-CA-A", "x509-CA-B"];
    fn entry(a: &X509Authority) -> &X509CaEntry {
        &a.entry
    }
    fn parts(s: &mut State) -> (&mut Vec<X509CaEntry>, &mut Slots<X509Authority>) {
        (&mut s.journal.x509, &mut s.x509)
    }
    fn journal(j: &CaJournal) -> &[X509CaEntry] {
        &j.x509
    }
    fn slots(s: &State) -> &Slots<X509Authority> {
        &s.x509
    }
}

impl AuthorityKind for JwtKind {
    type Entry = JwtKeyEntry;
    type Authority = JwtSigner;
    const NAME: &'static str = "JWT";
    const KEY_SLOTS: [&'static str; 2] = ["JWT-Signer-A", "JWT-Signer-B"];
    fn entry(a: &JwtSigner) -> &JwtKeyEntry {
        &a.entry
    }
    fn parts(s: &mut State) -> (&mut Vec<JwtKeyEntry>, &mut Slots<JwtSigner>) {
        (&mut s.journal.jwt, &mut s.jwt)
    }
    fn journal(j: &CaJournal) -> &[JwtKeyEntry] {
        &j.jwt
    }
    fn slots(s: &State) -> &Slots<JwtSigner> {
        &s.jwt
    }
}

/// Checks an upstream's answer and returns our journal chain: our CA certificate (which must
/// hold our key and be a CA), the intermediates, and the root the chain ends under.
pub(crate) fn upstream_chain(minted: &MintedX509Ca, our_spki: &[u8]) -> Result<Vec<Vec<u8>>, CaError> {
    let bad = CaError::UpstreamAnswer;
    let ours = minted.chain.first().ok_or(bad(UpstreamAnswerError::NoCertificate))?;
    let facts = cert_facts(ours)?;
    if facts.spki != our_spki {
        return Err(bad(UpstreamAnswerError::NotOurKey));
    }
    if !facts.is_ca {
        return Err(bad(UpstreamAnswerError::NotACa));
    }
    let last = minted.chain.last().unwrap_or(ours);
    let (_, last_cert) = x509_parser::parse_x509_certificate(last).map_err(|_| bad(UpstreamAnswerError::Unparsable))?;
    let root = minted
        .roots
        .iter()
        .find(|r| {
            x509_parser::parse_x509_certificate(r)
                .is_ok_and(|(_, rc)| rc.subject().as_raw() == last_cert.issuer().as_raw())
        })
        .ok_or(bad(UpstreamAnswerError::NoIssuingRoot))?;
    let mut chain = minted.chain.clone();
    chain.push(root.clone());
    Ok(chain)
}

/// A bare public key, to compute a SubjectPublicKeyInfo.
struct RawPublic<'a>(&'a [u8], &'static rcgen::SignatureAlgorithm);

impl PublicKeyData for RawPublic<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.1
    }
}

/// The DER SubjectPublicKeyInfo of a key manager key.
pub(crate) fn spki_of(key: &dyn CaKey) -> Vec<u8> {
    RawPublic(key.public_key_raw(), key.key_type().signature_algorithm()).subject_public_key_info()
}

/// A random JWT `kid`: 16 bytes, base64url.
pub(crate) fn random_kid() -> Result<String, CaError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).map_err(|_| CaError::Random)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}
