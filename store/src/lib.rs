//! Tessera's storage: one [`Store`] trait for everything the server persists (registration
//! entries with revisions, agents written by compare-and-set, join tokens, bundles,
//! federation relationships, CA journals, the hash-chained audit log), the records it holds,
//! and two implementations: sled, embedded, one process (feature `sled`), and PostgreSQL,
//! shared by several server replicas (feature `postgres`). A write is durable when the call
//! returns. Both pass one conformance suite (feature `test-util`).
//!
//! What it is not: no policy (who may write what is the server's), no gRPC, no CA.

#![forbid(unsafe_code)]

use std::fmt;

use async_trait::async_trait;
use tessera_identity::{Bundle, SpiffeId, TrustDomain};

pub mod audit;
#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod records;
#[cfg(feature = "sled")]
pub mod sled;

pub use audit::{AuditEvent, AuditKind, AuditRecord, AuditVerdict};
pub use records::{
    AgentRecord, CaJournal, DeletedEntry, EndpointProfile, Entry, EntryChanges, FederationRelationship, JoinToken,
    JwtKeyEntry, SlotStatus, X509CaEntry,
};

/// Store errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record to update or delete does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record with the same identity already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A stored record does not decode: the store file is damaged.
    #[error("store record {key:?} is corrupt: {reason}")]
    Corrupt {
        /// Which record.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The backend failed (I/O, disk full, read-only file system, ...).
    #[error("store backend: {0}")]
    Backend(String),
    /// The store was written by a newer schema than this server understands, and that schema
    /// is not readable by it (a downgrade past the skew window).
    #[error(
        "the {store} store has schema version {found}, last written by server {writer}, and needs a server that understands schema version {readable_from} or later; this server ({server}) understands schema versions up to {known}: run a server at least as new as {writer}, or restore the backup taken before the upgrade (docs/upgrading.md)"
    )]
    SchemaTooNew {
        /// `sled` or `postgres`.
        store: &'static str,
        /// The schema version found.
        found: u64,
        /// The oldest schema version a server must understand to run on the store.
        readable_from: u64,
        /// The newest this build understands.
        known: u64,
        /// The version of the last server that wrote it (`unknown` when not recorded).
        writer: String,
        /// This server's version.
        server: &'static str,
    },
}

/// This build's version, recorded in the store as its last writer.
pub const WRITER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything the server persists.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    // --- registration entries (revisioned, for incremental sync) ---

    /// Stores a new entry; the store sets `revision`. Refuses an entry with the same ID, or with
    /// the same SPIFFE ID, parent ID and selectors as an existing one.
    async fn create_entry(&self, entry: Entry) -> Result<Entry>;
    /// Stores new entries all at once or not at all (each gets its revision). Refuses the
    /// whole batch, naming the first offender, when any has the ID or the same SPIFFE ID,
    /// parent ID and selectors as a stored entry or as another entry of the batch.
    async fn create_entries(&self, entries: Vec<Entry>) -> Result<Vec<Entry>>;
    /// Replaces an entry; the store bumps `revision`.
    async fn update_entry(&self, entry: Entry) -> Result<Entry>;
    /// Deletes an entry, leaving a tombstone for sync. `None` when absent.
    async fn delete_entry(&self, id: &str) -> Result<Option<Entry>>;
    /// One entry.
    async fn get_entry(&self, id: &str) -> Result<Option<Entry>>;
    /// All entries.
    async fn list_entries(&self) -> Result<Vec<Entry>>;
    /// At most `limit` entries with IDs after `after` (`""`: from the first), by ID: O(limit).
    async fn entries_page(&self, after: &str, limit: usize) -> Result<Vec<Entry>>;
    /// Entries whose parent is `parent`.
    async fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>>;
    /// What changed after revision `since`, at most `limit` changes: O(changes), not
    /// O(entries). Over the limit, `truncated` is set and nothing else is read; `limit` 0
    /// reads only the newest revision.
    async fn entry_changes(&self, since: u64, limit: usize) -> Result<EntryChanges>;

    // --- attested agents ---

    /// Stores `agent` only if the stored record has revision `expected` (`None`: no record is
    /// stored), giving it a new revision that no record of any agent had before. Returns the
    /// stored record, or `None` (nothing written) when the record changed underneath the
    /// caller: banned, evicted, renewed or re-attested in between. There is no unconditional
    /// write, so a ban or an eviction cannot be overwritten by a request that read the record
    /// before it.
    async fn compare_and_put_agent(&self, agent: &AgentRecord, expected: Option<u64>) -> Result<Option<AgentRecord>>;
    /// One agent.
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>>;
    /// All agents.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>>;
    /// Removes an agent (eviction). `None` when absent.
    async fn delete_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>>;

    // --- join tokens ---

    /// Stores a new join token.
    async fn create_join_token(&self, token: &JoinToken) -> Result<()>;
    /// Removes and returns a token atomically: of two concurrent callers, one gets it.
    async fn take_join_token(&self, token: &str) -> Result<Option<JoinToken>>;

    // --- bundles (own and federated) ---

    /// A trust domain's bundle.
    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>>;
    /// Creates or replaces a bundle.
    async fn put_bundle(&self, bundle: &Bundle) -> Result<()>;
    /// Stores `bundle` only if the stored one has sequence `expected` (`None`: none is
    /// stored). False when another writer got there first.
    async fn compare_and_put_bundle(&self, bundle: &Bundle, expected: Option<u64>) -> Result<bool>;
    /// Deletes a bundle; false when absent.
    async fn delete_bundle(&self, td: &TrustDomain) -> Result<bool>;
    /// All bundles.
    async fn list_bundles(&self) -> Result<Vec<Bundle>>;

    // --- federation relationships ---

    /// Creates or replaces a relationship.
    async fn put_federation(&self, rel: &FederationRelationship) -> Result<()>;
    /// All relationships.
    async fn list_federations(&self) -> Result<Vec<FederationRelationship>>;
    /// Deletes a relationship; false when absent.
    async fn delete_federation(&self, td: &TrustDomain) -> Result<bool>;

    /// The relationship with `td`, if any.
    async fn get_federation(&self, td: &TrustDomain) -> Result<Option<FederationRelationship>> {
        Ok(self.list_federations().await?.into_iter().find(|r| &r.trust_domain == td))
    }

    // --- CA journal (one per server instance) ---

    /// The journal of server instance `server`.
    async fn load_journal(&self, server: &str) -> Result<Option<CaJournal>>;
    /// Replaces the journal of `server`.
    async fn save_journal(&self, server: &str, journal: &CaJournal) -> Result<()>;
    /// Every server instance's journal (all replicas sharing the store).
    async fn list_journals(&self) -> Result<Vec<(String, CaJournal)>>;

    // --- audit log (append-only, hash-chained) ---

    /// Appends an event, chaining it to the last record.
    async fn append_audit(&self, event: AuditEvent) -> Result<AuditRecord>;
    /// Up to `limit` records with `seq >= from`, in order.
    async fn audit_range(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>>;

    /// Whether a write can be made durable now (readiness: a full or read-only disk makes the
    /// server not ready). By default, nothing to check: the database server owns its disk.
    async fn check_writable(&self) -> Result<()> {
        Ok(())
    }

    /// How long writes have been failing without a success since, when the store cannot
    /// recover from that in place (the server must be restarted): `/live` turns false after
    /// a while. `None` by default.
    fn failing_for(&self) -> Option<std::time::Duration> {
        None
    }
}

/// Verifies the whole audit chain of a store, a page at a time.
pub async fn verify_audit(store: &dyn Store) -> Result<AuditVerdict> {
    let mut checker = audit::ChainChecker::default();
    let mut next = 1;
    loop {
        let page = store.audit_range(next, 1024).await?;
        let Some(last) = page.last() else { break };
        next = last.seq + 1;
        for r in &page {
            if let Some(v) = checker.push(r) {
                return Ok(v);
            }
        }
    }
    Ok(checker.finish())
}
