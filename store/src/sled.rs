//! The embedded store: sled, one process, nothing to run.
//!
//! Every mutating call flushes sled's log to disk (`flush_async`, an fsync) before it returns,
//! so an acknowledged write survives `kill -9` and power loss. Multi-tree updates (an entry and
//! its indexes) go through one sled transaction.

use std::path::Path;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tessera_identity::{Bundle, SpiffeId, TrustDomain};
use tokio::sync::Mutex;

use super::records::StoredBundle;
use super::{
    AgentRecord, AuditEvent, AuditRecord, CaJournal, Entry, EntryChanges, FederationRelationship, JoinToken, Result,
    Store, StoreError, audit,
};

const META_ENTRY_REV: &[u8] = b"entry_rev";
/// The layout version of this store's trees and records (8 bytes, big-endian).
const META_SCHEMA: &[u8] = b"schema_version";
/// The version of the last server that opened the store for writing (UTF-8).
const META_WRITER: &[u8] = b"last_writer_version";
/// The oldest schema a server must understand to run on the store (8 bytes, big-endian).
const META_READABLE: &[u8] = b"readable_from_schema";
/// The schema this build writes and understands. 1: the layout since agents' revisions.
pub const SCHEMA_VERSION: u64 = 1;
/// The oldest schema whose servers can run on the layout this build writes. A change that an
/// older server can live with (a new tree, a record field with a default) leaves it; a change
/// to what an older server reads or writes raises it to the new `SCHEMA_VERSION`. It is what
/// lets the previous minor release run on a store the next one opened (docs/upgrading.md).
pub const READABLE_FROM: u64 = 1;
const META_AGENT_REV: &[u8] = b"agent_rev";
const LIVE: u8 = b'U';
const TOMBSTONE: u8 = b'D';

/// The sled store.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
    entries: sled::Tree,
    by_rev: sled::Tree,
    by_parent: sled::Tree,
    meta: sled::Tree,
    agents: sled::Tree,
    tokens: sled::Tree,
    bundles: sled::Tree,
    federation: sled::Tree,
    journal: sled::Tree,
    audit: sled::Tree,
    entry_lock: Mutex<()>,
    bundle_lock: Mutex<()>,
    /// Writes made so far, and the count covered by the last completed flush.
    writes: std::sync::atomic::AtomicU64,
    flushed: Mutex<u64>,
    audit_lock: Mutex<()>,
    /// Since when flushes fail (sled keeps failing after an I/O error until it is reopened).
    failing_since: parking_lot::Mutex<Option<std::time::Instant>>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(backend)
}

fn dec<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
}

fn parent_key(parent: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(parent.len() + 1 + id.len());
    k.extend_from_slice(parent.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// A revision record: kind, entry ID, and for tombstones a NUL and the parent ID.
fn rev_value(kind: u8, id: &str, parent: Option<&SpiffeId>) -> Vec<u8> {
    let parent = parent.map(ToString::to_string);
    let mut v = Vec::with_capacity(2 + id.len() + parent.as_ref().map_or(0, String::len));
    v.push(kind);
    v.extend_from_slice(id.as_bytes());
    if let Some(p) = parent {
        v.push(0);
        v.extend_from_slice(p.as_bytes());
    }
    v
}

fn read_u64(v: Option<sled::IVec>) -> u64 {
    v.and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok()).map(u64::from_be_bytes).unwrap_or(0)
}

/// Inside an entry transaction: `entry` (encoded as `value`) stored live at revision `rev`,
/// with its revision and parent indexes.
fn put_live(
    entries: &sled::transaction::TransactionalTree,
    by_rev: &sled::transaction::TransactionalTree,
    by_parent: &sled::transaction::TransactionalTree,
    entry: &Entry,
    value: &[u8],
    rev: u64,
) -> std::result::Result<(), ConflictableTransactionError<String>> {
    let mut stored: Entry =
        serde_json::from_slice(value).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
    stored.revision = rev;
    let bytes = serde_json::to_vec(&stored).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
    entries.insert(entry.id.as_bytes(), bytes)?;
    by_rev.insert(&rev.to_be_bytes(), rev_value(LIVE, &entry.id, None))?;
    by_parent.insert(parent_key(&entry.parent_id.to_string(), &entry.id), &[])?;
    Ok(())
}

/// A `u64` meta record, 8 bytes big-endian.
fn meta_u64(meta: &sled::Tree, key: &[u8]) -> Result<Option<u64>> {
    match meta.get(key).map_err(backend)? {
        None => Ok(None),
        Some(v) => {
            <[u8; 8]>::try_from(v.as_ref()).map(|b| Some(u64::from_be_bytes(b))).map_err(|_| StoreError::Corrupt {
                key: format!("meta/{}", String::from_utf8_lossy(key)),
                reason: format!("{} bytes, expected 8", v.len()),
            })
        }
    }
}

/// Refuses a store written by a newer schema that this build cannot read (and says which
/// server wrote it); runs on a newer one that declares itself readable by this build, without
/// touching its records. A store from before schema versions gets the current one. Then
/// records this build as the last writer, unless the store's schema is newer than its own.
fn check_schema(meta: &sled::Tree) -> Result<()> {
    let writer = match meta.get(META_WRITER).map_err(backend)? {
        Some(v) => String::from_utf8(v.to_vec())
            .map_err(|_| StoreError::Corrupt { key: "meta/last_writer_version".into(), reason: "not UTF-8".into() })?,
        None => "unknown".into(),
    };
    if let Some(found) = meta_u64(meta, META_SCHEMA)?
        && found > SCHEMA_VERSION
    {
        let readable_from = meta_u64(meta, META_READABLE)?.unwrap_or(found);
        if readable_from > SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                store: "sled",
                found,
                readable_from,
                known: SCHEMA_VERSION,
                writer,
                server: crate::WRITER_VERSION,
            });
        }
        tracing::warn!(
            schema = found,
            readable_from,
            known = SCHEMA_VERSION,
            writer = %writer,
            "The store has a newer schema that this server can run on (a downgrade within the skew window); upgrade again when you can"
        );
        return Ok(());
    }
    meta.insert(META_SCHEMA, &SCHEMA_VERSION.to_be_bytes()).map_err(backend)?;
    meta.insert(META_READABLE, &READABLE_FROM.to_be_bytes()).map_err(backend)?;
    meta.insert(META_WRITER, crate::WRITER_VERSION.as_bytes()).map_err(backend)?;
    meta.flush().map_err(backend)?;
    Ok(())
}

impl SledStore {
    /// Opens (or creates) the store at `path`. A damaged store file is an error, not a panic.
    pub fn open(path: &Path) -> Result<Self> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|e| StoreError::Backend(format!("cannot open sled store at {}: {e}", path.display())))?;
        let t = |name: &str| db.open_tree(name).map_err(backend);
        let meta = t("meta")?;
        check_schema(&meta)?;
        Ok(Self {
            entries: t("entries")?,
            by_rev: t("entries_by_rev")?,
            by_parent: t("entries_by_parent")?,
            meta,
            agents: t("agents")?,
            tokens: t("join_tokens")?,
            bundles: t("bundles")?,
            federation: t("federation")?,
            journal: t("ca_journal")?,
            audit: t("audit")?,
            db,
            entry_lock: Mutex::new(()),
            bundle_lock: Mutex::new(()),
            writes: std::sync::atomic::AtomicU64::new(0),
            flushed: Mutex::new(0),
            failing_since: parking_lot::Mutex::new(None),
            audit_lock: Mutex::new(()),
        })
    }

    /// Makes every write done before this call durable (fsync), with group commit:
    /// concurrent callers share one flush. A caller returns only after a flush that started
    /// after its own write completed.
    async fn durable(&self) -> Result<()> {
        let mine = self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let mut flushed = self.flushed.lock().await;
        if *flushed >= mine {
            return Ok(());
        }
        let target = self.writes.load(std::sync::atomic::Ordering::SeqCst);
        let result = self.db.flush_async().await;
        {
            let mut since = self.failing_since.lock();
            match &result {
                Ok(_) => *since = None,
                Err(_) => {
                    since.get_or_insert_with(std::time::Instant::now);
                }
            }
        }
        result.map_err(backend)?;
        *flushed = target;
        Ok(())
    }

    async fn put_json<T: Serialize + Sync>(&self, tree: &sled::Tree, key: &[u8], v: &T) -> Result<()> {
        tree.insert(key, enc(v)?).map_err(backend)?;
        self.durable().await
    }

    fn get_json<T: DeserializeOwned>(tree: &sled::Tree, key: &[u8]) -> Result<Option<T>> {
        tree.get(key).map_err(backend)?.map(|v| dec(key, &v)).transpose()
    }

    fn all_json<T: DeserializeOwned>(tree: &sled::Tree) -> Result<Vec<T>> {
        tree.iter().map(|kv| kv.map_err(backend).and_then(|(k, v)| dec(&k, &v))).collect()
    }

    async fn remove_json<T: DeserializeOwned>(&self, tree: &sled::Tree, key: &[u8]) -> Result<Option<T>> {
        let old = tree.remove(key).map_err(backend)?;
        let out = old.map(|v| dec(key, &v)).transpose()?;
        if out.is_some() {
            self.durable().await?;
        }
        Ok(out)
    }

    /// Writes `entry` (new state, or tombstone when `delete`) and its indexes in one
    /// transaction, assigning the next revision.
    fn write_entry(&self, entry: &Entry, previous: Option<&Entry>, delete: bool) -> Result<u64> {
        let value = enc(entry)?;
        let res = (&self.entries, &self.by_rev, &self.by_parent, &self.meta).transaction(
            |(entries, by_rev, by_parent, meta)| {
                let rev = read_u64(meta.get(META_ENTRY_REV)?) + 1;
                meta.insert(META_ENTRY_REV, &rev.to_be_bytes())?;
                if let Some(prev) = previous {
                    by_rev.remove(&prev.revision.to_be_bytes())?;
                    by_parent.remove(parent_key(&prev.parent_id.to_string(), &prev.id))?;
                }
                if delete {
                    entries.remove(entry.id.as_bytes())?;
                    by_rev.insert(&rev.to_be_bytes(), rev_value(TOMBSTONE, &entry.id, Some(&entry.parent_id)))?;
                } else {
                    put_live(entries, by_rev, by_parent, entry, &value, rev)?;
                }
                Ok(rev)
            },
        );
        res.map_err(|e: TransactionError<String>| backend(e))
    }
}

#[async_trait]
impl Store for SledStore {
    async fn create_entry(&self, mut entry: Entry) -> Result<Entry> {
        let _g = self.entry_lock.lock().await;
        if self.entries.contains_key(entry.id.as_bytes()).map_err(backend)? {
            return Err(StoreError::AlreadyExists(format!("entry {}", entry.id)));
        }
        let mut sel = entry.selectors.clone();
        sel.sort();
        for e in self.entries_by_parent(&entry.parent_id).await? {
            let mut other = e.selectors.clone();
            other.sort();
            if e.spiffe_id == entry.spiffe_id && other == sel {
                return Err(StoreError::AlreadyExists(format!(
                    "an entry with SPIFFE ID {}, parent {} and the same selectors ({})",
                    entry.spiffe_id, entry.parent_id, e.id
                )));
            }
        }
        entry.revision = self.write_entry(&entry, None, false)?;
        self.durable().await?;
        Ok(entry)
    }

    async fn create_entries(&self, mut batch: Vec<Entry>) -> Result<Vec<Entry>> {
        let _g = self.entry_lock.lock().await;
        let mut keys: std::collections::HashSet<(String, String, Vec<String>)> = std::collections::HashSet::new();
        let mut ids = std::collections::HashSet::new();
        for entry in &batch {
            if !ids.insert(entry.id.clone()) || self.entries.contains_key(entry.id.as_bytes()).map_err(backend)? {
                return Err(StoreError::AlreadyExists(format!("entry {}", entry.id)));
            }
            let mut sel: Vec<String> = entry.selectors.iter().map(ToString::to_string).collect();
            sel.sort();
            let key = (entry.spiffe_id.to_string(), entry.parent_id.to_string(), sel.clone());
            let stored_dup = self.entries_by_parent(&entry.parent_id).await?.into_iter().find(|e| {
                let mut other: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
                other.sort();
                e.spiffe_id == entry.spiffe_id && other == sel
            });
            if stored_dup.is_some() || !keys.insert(key) {
                return Err(StoreError::AlreadyExists(format!(
                    "an entry with SPIFFE ID {}, parent {} and the same selectors ({})",
                    entry.spiffe_id,
                    entry.parent_id,
                    stored_dup.map_or_else(|| "earlier in this batch".to_owned(), |e| e.id)
                )));
            }
        }
        let values = batch.iter().map(enc).collect::<Result<Vec<_>>>()?;
        let res = (&self.entries, &self.by_rev, &self.by_parent, &self.meta).transaction(
            |(entries, by_rev, by_parent, meta)| {
                let mut rev = read_u64(meta.get(META_ENTRY_REV)?);
                let mut revs = Vec::with_capacity(values.len());
                for (entry, value) in batch.iter().zip(&values) {
                    rev += 1;
                    put_live(entries, by_rev, by_parent, entry, value, rev)?;
                    revs.push(rev);
                }
                meta.insert(META_ENTRY_REV, &rev.to_be_bytes())?;
                Ok(revs)
            },
        );
        let revs = res.map_err(|e: TransactionError<String>| backend(e))?;
        self.durable().await?;
        for (e, r) in batch.iter_mut().zip(revs) {
            e.revision = r;
        }
        Ok(batch)
    }

    async fn update_entry(&self, mut entry: Entry) -> Result<Entry> {
        let _g = self.entry_lock.lock().await;
        let prev: Entry = Self::get_json(&self.entries, entry.id.as_bytes())?
            .ok_or_else(|| StoreError::NotFound(format!("entry {}", entry.id)))?;
        entry.created_at = prev.created_at;
        entry.revision = self.write_entry(&entry, Some(&prev), false)?;
        self.durable().await?;
        Ok(entry)
    }

    async fn delete_entry(&self, id: &str) -> Result<Option<Entry>> {
        let _g = self.entry_lock.lock().await;
        let Some(prev) = Self::get_json::<Entry>(&self.entries, id.as_bytes())? else { return Ok(None) };
        self.write_entry(&prev, Some(&prev), true)?;
        self.durable().await?;
        Ok(Some(prev))
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        Self::get_json(&self.entries, id.as_bytes())
    }

    async fn entries_page(&self, after: &str, limit: usize) -> Result<Vec<Entry>> {
        use std::ops::Bound;
        let start = if after.is_empty() { Bound::Unbounded } else { Bound::Excluded(after.as_bytes().to_vec()) };
        self.entries
            .range::<Vec<u8>, _>((start, Bound::Unbounded))
            .take(limit)
            .map(|kv| kv.map_err(backend).and_then(|(k, v)| dec(&k, &v)))
            .collect()
    }

    async fn list_entries(&self) -> Result<Vec<Entry>> {
        Self::all_json(&self.entries)
    }

    async fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>> {
        let mut prefix = parent.to_string().into_bytes();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.by_parent.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(backend)?;
            let id = &k[prefix.len()..];
            if let Some(e) = Self::get_json(&self.entries, id)? {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn entry_changes(&self, since: u64, limit: usize) -> Result<EntryChanges> {
        let mut out =
            EntryChanges { revision: read_u64(self.meta.get(META_ENTRY_REV).map_err(backend)?), ..Default::default() };
        let start = since.saturating_add(1).to_be_bytes();
        if self.by_rev.range(start..).nth(limit).is_some() {
            out.truncated = true;
            return Ok(out);
        }
        for kv in self.by_rev.range(start..).take(limit) {
            let (k, v) = kv.map_err(backend)?;
            let (kind, rest) = v
                .split_first()
                .ok_or_else(|| StoreError::Corrupt { key: format!("{k:?}"), reason: "empty revision record".into() })?;
            let (id, parent) = match rest.iter().position(|b| *b == 0) {
                Some(i) => (
                    rest.get(..i).unwrap_or_default(),
                    SpiffeId::new(String::from_utf8_lossy(rest.get(i + 1..).unwrap_or_default())).ok(),
                ),
                None => (rest, None),
            };
            let id = String::from_utf8_lossy(id).into_owned();
            match *kind {
                TOMBSTONE => out.deleted.push(super::DeletedEntry { id, parent_id: parent }),
                _ => {
                    if let Some(e) = Self::get_json(&self.entries, id.as_bytes())? {
                        out.changed.push(e);
                    }
                }
            }
        }
        Ok(out)
    }

    async fn compare_and_put_agent(&self, agent: &AgentRecord, expected: Option<u64>) -> Result<Option<AgentRecord>> {
        let key = agent.spiffe_id.to_string();
        // One transaction over the record and the revision counter: the comparison, the new
        // revision and the write are one step, also against a concurrent writer of this agent.
        let res = (&self.agents, &self.meta).transaction(|(agents, meta)| {
            let current = match agents.get(key.as_bytes())? {
                None => None,
                Some(v) => Some(
                    serde_json::from_slice::<AgentRecord>(&v)
                        .map_err(|e| {
                            let shown = tessera_identity::ids::redact_join_token(&key);
                            ConflictableTransactionError::Abort(format!("agent {shown} is corrupt: {e}"))
                        })?
                        .revision,
                ),
            };
            if current != expected {
                return Ok(None);
            }
            let rev = read_u64(meta.get(META_AGENT_REV)?) + 1;
            meta.insert(META_AGENT_REV, &rev.to_be_bytes())?;
            let mut stored = agent.clone();
            stored.revision = rev;
            let bytes = serde_json::to_vec(&stored).map_err(|e| ConflictableTransactionError::Abort(e.to_string()))?;
            agents.insert(key.as_bytes(), bytes)?;
            Ok(Some(stored))
        });
        let out = res.map_err(|e: TransactionError<String>| backend(e))?;
        if out.is_some() {
            self.durable().await?;
        }
        Ok(out)
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>> {
        Self::get_json(&self.agents, id.to_string().as_bytes())
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        Self::all_json(&self.agents)
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>> {
        // A transaction, so that it serializes with `compare_and_put_agent`.
        let key = id.to_string();
        let res = self.agents.transaction(|agents| Ok(agents.remove(key.as_bytes())?));
        let old = res.map_err(|e: TransactionError<String>| backend(e))?;
        let out = old.map(|v| dec(key.as_bytes(), &v)).transpose()?;
        if out.is_some() {
            self.durable().await?;
        }
        Ok(out)
    }

    async fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        let res = self
            .tokens
            .compare_and_swap(token.token.as_bytes(), None as Option<&[u8]>, Some(enc(token)?))
            .map_err(backend)?;
        if res.is_err() {
            return Err(StoreError::AlreadyExists("join token".into()));
        }
        self.durable().await
    }

    async fn take_join_token(&self, token: &str) -> Result<Option<JoinToken>> {
        // Never put the token into an error: the key is the secret.
        let old = self.tokens.remove(token.as_bytes()).map_err(backend)?;
        let out = old.map(|v| dec::<JoinToken>(b"<join token>", &v)).transpose()?;
        if out.is_some() {
            self.durable().await?;
        }
        Ok(out)
    }

    fn failing_for(&self) -> Option<std::time::Duration> {
        self.failing_since.lock().map(|t| t.elapsed())
    }

    async fn check_writable(&self) -> Result<()> {
        // A small write made durable: fails on a full or read-only file system.
        self.db.insert(b"__health_probe", &tessera_identity::unix_now().to_be_bytes()).map_err(backend)?;
        self.durable().await
    }

    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>> {
        let key = td.as_str().as_bytes();
        let Some(stored) = Self::get_json::<StoredBundle>(&self.bundles, key)? else { return Ok(None) };
        stored.decode().map(Some)
    }

    async fn put_bundle(&self, bundle: &Bundle) -> Result<()> {
        self.put_json(&self.bundles, bundle.trust_domain.as_str().as_bytes(), &StoredBundle::from(bundle)).await
    }

    async fn compare_and_put_bundle(&self, bundle: &Bundle, expected: Option<u64>) -> Result<bool> {
        let _g = self.bundle_lock.lock().await;
        let current = self.get_bundle(&bundle.trust_domain).await?.map(|b| b.sequence_number);
        if current != expected {
            return Ok(false);
        }
        self.put_bundle(bundle).await?;
        Ok(true)
    }

    async fn delete_bundle(&self, td: &TrustDomain) -> Result<bool> {
        Ok(self.remove_json::<StoredBundle>(&self.bundles, td.as_str().as_bytes()).await?.is_some())
    }

    async fn list_bundles(&self) -> Result<Vec<Bundle>> {
        Self::all_json::<StoredBundle>(&self.bundles)?.into_iter().map(StoredBundle::decode).collect()
    }

    async fn put_federation(&self, rel: &FederationRelationship) -> Result<()> {
        self.put_json(&self.federation, rel.trust_domain.as_str().as_bytes(), rel).await
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        Self::all_json(&self.federation)
    }

    async fn delete_federation(&self, td: &TrustDomain) -> Result<bool> {
        Ok(self.remove_json::<FederationRelationship>(&self.federation, td.as_str().as_bytes()).await?.is_some())
    }

    async fn load_journal(&self, server: &str) -> Result<Option<CaJournal>> {
        Self::get_json(&self.journal, server.as_bytes())
    }

    async fn save_journal(&self, server: &str, journal: &CaJournal) -> Result<()> {
        self.put_json(&self.journal, server.as_bytes(), journal).await
    }

    async fn list_journals(&self) -> Result<Vec<(String, CaJournal)>> {
        self.journal
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(backend)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), dec(&k, &v)?))
            })
            .collect()
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<AuditRecord> {
        // The chain is extended under the lock; the flush is shared with concurrent appends
        // (group commit), and the record is acknowledged only once it is durable.
        let rec = {
            let _g = self.audit_lock.lock().await;
            let last = match self.audit.last().map_err(backend)? {
                Some((k, v)) => Some(dec::<AuditRecord>(&k, &v)?),
                None => None,
            };
            let rec = audit::chain(last.as_ref(), event);
            self.audit.insert(rec.seq.to_be_bytes(), enc(&rec)?).map_err(backend)?;
            rec
        };
        self.durable().await?;
        Ok(rec)
    }

    async fn audit_range(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        self.audit
            .range(from.to_be_bytes()..)
            .take(limit)
            .map(|kv| kv.map_err(backend).and_then(|(k, v)| dec(&k, &v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled lets go of its file lock from a background thread a moment after the last handle
    /// is dropped, so a reopen in the same process can find it still held (about one open in
    /// ten here). A server opens its store once per process; these tests reopen it often, so
    /// they wait out that one error, for at most ten seconds.
    fn reopen<T, E: std::fmt::Display>(
        mut open: impl FnMut() -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open() {
                Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    #[test]
    fn a_store_from_a_newer_schema_is_refused_naming_both_versions_and_a_damaged_version_is_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("store");
        drop(reopen(|| SledStore::open(&path)).unwrap());
        // What the store recorded about itself.
        {
            let db = reopen(|| sled::open(&path)).unwrap();
            let meta = db.open_tree("meta").unwrap();
            assert_eq!(meta.get(META_SCHEMA).unwrap().unwrap().as_ref(), SCHEMA_VERSION.to_be_bytes());
            assert_eq!(meta.get(META_READABLE).unwrap().unwrap().as_ref(), READABLE_FROM.to_be_bytes());
            assert_eq!(meta.get(META_WRITER).unwrap().unwrap().as_ref(), crate::WRITER_VERSION.as_bytes());
            // A newer server wrote it, and recorded no readable-from: taken as readable only
            // by servers that know its own schema.
            meta.remove(META_READABLE).unwrap();
            meta.insert(META_SCHEMA, &(SCHEMA_VERSION + 1).to_be_bytes()).unwrap();
            meta.insert(META_WRITER, b"9.1.0").unwrap();
            db.flush().unwrap();
        }
        let e = reopen(|| SledStore::open(&path)).unwrap_err();
        assert!(matches!(e, StoreError::SchemaTooNew { found: 2, readable_from: 2, known: 1, .. }), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("schema version 2, last written by server 9.1.0"), "{m}");
        // The newer server declares its schema readable from this one: it runs, and leaves
        // the records as they are.
        {
            let db = reopen(|| sled::open(&path)).unwrap();
            db.open_tree("meta").unwrap().insert(META_READABLE, &SCHEMA_VERSION.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        drop(reopen(|| SledStore::open(&path)).unwrap());
        {
            let db = reopen(|| sled::open(&path)).unwrap();
            let meta = db.open_tree("meta").unwrap();
            assert_eq!(meta.get(META_SCHEMA).unwrap().unwrap().as_ref(), (SCHEMA_VERSION + 1).to_be_bytes());
            assert_eq!(meta.get(META_WRITER).unwrap().unwrap().as_ref(), b"9.1.0");
            meta.insert(META_READABLE, &(SCHEMA_VERSION + 1).to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let e = reopen(|| SledStore::open(&path)).unwrap_err();
        assert!(matches!(e, StoreError::SchemaTooNew { found: 2, readable_from: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("understands schema version 2 or later"), "{e}");
        assert!(m.contains(&format!("this server ({})", crate::WRITER_VERSION)), "{m}");
        // Refused without writing: the record still says 9.1.0.
        {
            let db = reopen(|| sled::open(&path)).unwrap();
            let meta = db.open_tree("meta").unwrap();
            assert_eq!(meta.get(META_WRITER).unwrap().unwrap().as_ref(), b"9.1.0");
            meta.insert(META_SCHEMA, b"bad").unwrap();
            db.flush().unwrap();
        }
        let e = reopen(|| SledStore::open(&path)).unwrap_err();
        assert!(matches!(e, StoreError::Corrupt { ref key, .. } if key == "meta/schema_version"), "{e:?}");
    }

    #[tokio::test]
    async fn sled_store_passes_the_conformance_suite() {
        let d = tempfile::tempdir().unwrap();
        let store = SledStore::open(&d.path().join("store")).unwrap();
        crate::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn records_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("store");
        {
            let store = reopen(|| SledStore::open(&path)).unwrap();
            store.create_entry(crate::conformance::entry("e1", "spiffe://td/w", "spiffe://td/agent")).await.unwrap();
            store.append_audit(crate::conformance::event("spiffe://td/w")).await.unwrap();
        }
        let store = reopen(|| SledStore::open(&path)).unwrap();
        assert!(store.get_entry("e1").await.unwrap().is_some());
        assert_eq!(store.audit_range(1, 10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_garbage_store_file_is_an_error_not_a_panic() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("store");
        std::fs::create_dir_all(&path).unwrap();
        std::fs::write(path.join("conf"), b"\x00garbage\xff").unwrap();
        std::fs::write(path.join("db"), vec![0xffu8; 4096]).unwrap();
        assert!(reopen(|| SledStore::open(&path)).is_err());
    }
}
