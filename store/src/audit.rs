//! The issuance audit log: append-only records, each carrying the SHA-256 of its predecessor,
//! so removing, reordering or editing any record breaks the chain at that point.
//!
//! `hash = SHA-256(prev_hash || seq as 8 big-endian bytes || JSON(event))`; the first record's
//! `prev_hash` is 32 zero bytes. Store implementations call [`chain`] inside their append
//! critical section; [`ChainChecker`] verifies.

use ring::digest::{SHA256, digest};
use serde::{Deserialize, Serialize};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// An X509-SVID was issued.
    X509Svid,
    /// A JWT-SVID was issued.
    JwtSvid,
    /// An agent attested and got its first SVID.
    AgentAttested,
    /// An agent renewed its SVID.
    AgentRenewed,
    /// A CA certificate was created.
    CaIssued,
    /// A request was refused.
    Denied,
}

/// One audited event (before chaining).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Unix milliseconds.
    pub at_ms: i64,
    /// What happened.
    pub kind: AuditKind,
    /// The identity issued or asked for.
    pub spiffe_id: String,
    /// Hex serial (X.509) or empty.
    pub serial: String,
    /// Unix seconds; 0 when nothing was issued.
    pub not_after: i64,
    /// Who asked: an agent ID, `admin`, or `server`.
    pub caller: String,
    /// Reason for a refusal, or a short note. Never a key, token or CSR.
    pub detail: String,
}

/// A chained record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// 1, 2, 3, ... with no gaps.
    pub seq: u64,
    /// Hex hash of the previous record.
    pub prev_hash: String,
    /// Hex hash of this record.
    pub hash: String,
    /// The event.
    pub event: AuditEvent,
}

fn hash_of(prev_hash_hex: &str, seq: u64, event: &AuditEvent) -> String {
    let mut buf = Vec::with_capacity(200);
    buf.extend_from_slice(prev_hash_hex.as_bytes());
    buf.extend_from_slice(&seq.to_be_bytes());
    // Serializing a plain struct of strings and integers cannot fail.
    buf.extend_from_slice(&serde_json::to_vec(event).unwrap_or_default());
    tessera_identity::x509::hex_lower(digest(&SHA256, &buf).as_ref())
}

/// The hash that precedes the first record.
pub fn genesis_hash() -> String {
    "0".repeat(64)
}

/// Builds the record that follows `prev` (or the first one).
pub fn chain(prev: Option<&AuditRecord>, event: AuditEvent) -> AuditRecord {
    let (seq, prev_hash) = match prev {
        Some(p) => (p.seq + 1, p.hash.clone()),
        None => (1, genesis_hash()),
    };
    let hash = hash_of(&prev_hash, seq, &event);
    AuditRecord { seq, prev_hash, hash, event }
}

/// The outcome of verifying a chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditVerdict {
    /// True when every link holds.
    pub ok: bool,
    /// Records checked.
    pub records: u64,
    /// The first broken record (when `!ok`).
    pub first_broken: Option<u64>,
    /// Why it is broken.
    pub reason: String,
    /// Hash of the last good record.
    pub head: String,
}

/// Checks records one by one, in order.
#[derive(Debug)]
pub struct ChainChecker {
    expect_seq: u64,
    prev_hash: String,
    count: u64,
}

impl Default for ChainChecker {
    fn default() -> Self {
        Self { expect_seq: 1, prev_hash: genesis_hash(), count: 0 }
    }
}

impl ChainChecker {
    /// Checks the next record; returns a failing verdict at the first broken link.
    pub fn push(&mut self, r: &AuditRecord) -> Option<AuditVerdict> {
        let fail = |reason: &str, this: &Self| {
            Some(AuditVerdict {
                ok: false,
                records: this.count,
                first_broken: Some(this.expect_seq),
                reason: reason.to_owned(),
                head: this.prev_hash.clone(),
            })
        };
        if r.seq != self.expect_seq {
            return fail(&format!("record {} is missing (found {} next)", self.expect_seq, r.seq), self);
        }
        if r.prev_hash != self.prev_hash {
            return fail("prev_hash does not match the previous record's hash", self);
        }
        if hash_of(&r.prev_hash, r.seq, &r.event) != r.hash {
            return fail("record content does not match its hash", self);
        }
        self.prev_hash = r.hash.clone();
        self.expect_seq += 1;
        self.count += 1;
        None
    }

    /// The verdict when every record passed.
    pub fn finish(self) -> AuditVerdict {
        AuditVerdict { ok: true, records: self.count, first_broken: None, reason: String::new(), head: self.prev_hash }
    }
}
