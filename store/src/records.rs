//! The records the store holds. Identities are typed (`SpiffeId`, `TrustDomain`, `Selector`)
//! and re-validated when read back.

use serde::{Deserialize, Serialize};
use tessera_identity::{Selector, SpiffeId, TrustDomain, serde_str};

/// A registration entry (SPIRE semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Opaque unique ID.
    pub id: String,
    /// The identity issued.
    #[serde(with = "serde_str")]
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) allowed to obtain it.
    #[serde(with = "serde_str")]
    pub parent_id: SpiffeId,
    /// Workload selectors that must all match.
    #[serde(with = "serde_str::vec")]
    pub selectors: Vec<Selector>,
    /// X509-SVID TTL in seconds; 0 = server default.
    pub x509_svid_ttl: u32,
    /// JWT-SVID TTL in seconds; 0 = server default.
    pub jwt_svid_ttl: u32,
    /// Trust domains whose bundles the workload receives.
    #[serde(with = "serde_str::vec")]
    pub federates_with: Vec<TrustDomain>,
    /// Extra DNS SANs.
    pub dns_names: Vec<String>,
    /// May call the admin API with this SVID (reserved).
    pub admin: bool,
    /// May mint downstream CAs (reserved for the nested-upstream issue).
    pub downstream: bool,
    /// Free-form hint for workloads with several SVIDs.
    #[serde(default)]
    pub hint: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Set by the store on every write.
    pub revision: u64,
}

impl Entry {
    /// An entry with only what identifies it: server-default TTLs, no federation, no DNS
    /// names, neither admin nor downstream, no hint; `revision` is set by the store.
    pub fn new(
        id: String,
        spiffe_id: SpiffeId,
        parent_id: SpiffeId,
        selectors: Vec<Selector>,
        created_at: i64,
    ) -> Self {
        Self {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: 0,
            jwt_svid_ttl: 0,
            federates_with: Vec::new(),
            dns_names: Vec::new(),
            admin: false,
            downstream: false,
            hint: String::new(),
            created_at,
            revision: 0,
        }
    }
}

/// Result of [`super::Store::entry_changes`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EntryChanges {
    /// The newest revision in the store.
    pub revision: u64,
    /// Entries created or updated after `since`, current state.
    pub changed: Vec<Entry>,
    /// Entries deleted after `since`.
    pub deleted: Vec<DeletedEntry>,
    /// More than the asked limit changed after `since`: `changed` and `deleted` are empty
    /// and the caller must start over from the full state.
    pub truncated: bool,
}

/// A deleted entry, as its tombstone remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedEntry {
    /// The entry ID.
    pub id: String,
    /// Its parent when it was deleted; `None` for tombstones written before it was kept.
    pub parent_id: Option<SpiffeId>,
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's SPIFFE ID.
    #[serde(with = "serde_str")]
    pub spiffe_id: SpiffeId,
    /// How it attested (`join_token`).
    pub attestation_type: String,
    /// Hex serial of its current SVID.
    pub serial: String,
    /// Hex serial of the SVID it held before the last renewal (accepted during the switch).
    #[serde(default)]
    pub previous_serial: String,
    /// Unix seconds: current SVID's notAfter.
    pub expires_at: i64,
    /// Banned agents cannot re-attest or call the API.
    pub banned: bool,
    /// Node selectors from attestation.
    #[serde(with = "serde_str::vec")]
    pub selectors: Vec<Selector>,
    /// Unix seconds.
    pub attested_at: i64,
    /// Unix seconds; 0 if never renewed.
    pub renewed_at: i64,
    /// Set by the store on every write, from a counter that never repeats (an evicted and
    /// re-attested agent does not get a revision it had before). Writes are conditional on it:
    /// see [`super::Store::compare_and_put_agent`].
    #[serde(default)]
    pub revision: u64,
    /// The version the agent reported at its last attestation or renewal (empty: unknown).
    #[serde(default)]
    pub version: String,
}

/// A one-use join token. `Debug` hides the token.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The secret.
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken").field("expires_at", &self.expires_at).finish_non_exhaustive()
    }
}

/// How a peer's bundle endpoint authenticates itself (SPIFFE Federation spec §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "profile", rename_all = "snake_case")]
pub enum EndpointProfile {
    /// Web PKI: the endpoint's certificate chains to a public (or given) CA and names the host.
    HttpsWeb {
        /// PEM trust anchors for the endpoint; the system's CA bundle when absent.
        #[serde(default)]
        ca_bundle_path: Option<std::path::PathBuf>,
    },
    /// SPIFFE authentication: the endpoint presents this X509-SVID, chaining to the peer's
    /// bundle we already hold (at first, the bootstrap bundle).
    HttpsSpiffe {
        /// The endpoint's SPIFFE ID.
        #[serde(with = "serde_str")]
        endpoint_spiffe_id: SpiffeId,
    },
}

impl EndpointProfile {
    /// `https_web` or `https_spiffe`.
    pub fn name(&self) -> &'static str {
        match self {
            EndpointProfile::HttpsWeb { .. } => "https_web",
            EndpointProfile::HttpsSpiffe { .. } => "https_spiffe",
        }
    }
}

/// A federation relationship with another trust domain: where its bundle is served and how
/// that endpoint is authenticated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FederationRelationship {
    /// The peer.
    #[serde(with = "serde_str")]
    pub trust_domain: TrustDomain,
    /// Where its bundle is served (`https://host[:port]/path`).
    pub bundle_endpoint_url: String,
    /// How the endpoint is authenticated.
    #[serde(flatten)]
    pub profile: EndpointProfile,
    /// Honour a document with an empty key set (the spec's "revoke everything"). Off by
    /// default: an empty document is refused and the stored bundle stays.
    #[serde(default)]
    pub allow_empty_bundle: bool,
}

/// Lifecycle of a CA slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotStatus {
    /// In the bundle, not signing yet.
    Prepared,
    /// Signing.
    Active,
    /// Replaced; in the bundle until it expires.
    Old,
}

impl SlotStatus {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotStatus::Prepared => "prepared",
            SlotStatus::Active => "active",
            SlotStatus::Old => "old",
        }
    }
}

/// One X.509 CA in the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct X509CaEntry {
    /// Key manager slot ID (`x509-CA-A` / `x509-CA-B`).
    pub key_id: String,
    /// Hex subject key identifier.
    pub authority_id: String,
    /// DER, base64: the CA certificate, then its upstream chain (empty when self-signed).
    pub chain: Vec<String>,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Lifecycle.
    pub status: SlotStatus,
    /// Marked compromised by an operator.
    pub tainted: bool,
}

/// One JWT signing key in the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JwtKeyEntry {
    /// Key manager slot ID (`JWT-Signer-A` / `-B`).
    pub key_id: String,
    /// The JWT `kid`.
    pub kid: String,
    /// SubjectPublicKeyInfo DER, base64.
    pub public_key: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Lifecycle.
    pub status: SlotStatus,
}

/// A server instance's CA history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CaJournal {
    /// X.509 CAs, oldest first.
    pub x509: Vec<X509CaEntry>,
    /// JWT keys, oldest first.
    pub jwt: Vec<JwtKeyEntry>,
}

/// Bundles are stored in this shape (the JWKS form would drop key expiry).
#[cfg(any(feature = "sled", feature = "postgres"))]
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredBundle {
    #[serde(with = "serde_str")]
    pub trust_domain: TrustDomain,
    pub x509_authorities: Vec<String>,
    pub jwt_authorities: Vec<StoredJwtKey>,
    pub sequence_number: u64,
    pub refresh_hint: Option<u64>,
}

#[cfg(any(feature = "sled", feature = "postgres"))]
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredJwtKey {
    pub key_id: String,
    pub public_key: String,
    pub expires_at: i64,
}

#[cfg(any(feature = "sled", feature = "postgres"))]
impl From<&tessera_identity::Bundle> for StoredBundle {
    fn from(b: &tessera_identity::Bundle) -> Self {
        use base64::Engine;
        let e = base64::engine::general_purpose::STANDARD;
        Self {
            trust_domain: b.trust_domain.clone(),
            x509_authorities: b.x509_authorities.iter().map(|c| e.encode(c.as_ref())).collect(),
            jwt_authorities: b
                .jwt_authorities
                .iter()
                .map(|k| StoredJwtKey {
                    key_id: k.key_id.clone(),
                    public_key: e.encode(&k.public_key),
                    expires_at: k.expires_at,
                })
                .collect(),
            sequence_number: b.sequence_number,
            refresh_hint: b.refresh_hint,
        }
    }
}

#[cfg(any(feature = "sled", feature = "postgres"))]
impl StoredBundle {
    /// The bundle, or `Corrupt` naming its trust domain.
    pub(crate) fn decode(self) -> Result<tessera_identity::Bundle, super::StoreError> {
        let td = self.trust_domain.to_string();
        self.into_bundle().map_err(|reason| super::StoreError::Corrupt { key: td, reason })
    }

    pub(crate) fn into_bundle(self) -> Result<tessera_identity::Bundle, String> {
        use base64::Engine;
        let e = base64::engine::general_purpose::STANDARD;
        let mut b = tessera_identity::Bundle::new(self.trust_domain);
        for c in self.x509_authorities {
            b.add_x509_authority(&e.decode(c).map_err(|_| "x509 authority is not base64")?);
        }
        for k in self.jwt_authorities {
            b.add_jwt_authority(tessera_identity::JwtAuthority {
                key_id: k.key_id,
                public_key: e.decode(k.public_key).map_err(|_| "jwt authority is not base64")?,
                expires_at: k.expires_at,
            });
        }
        b.sequence_number = self.sequence_number;
        b.refresh_hint = self.refresh_hint;
        Ok(b)
    }
}
