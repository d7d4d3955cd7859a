//! The PostgreSQL store: the same [`Store`] as sled, for several server replicas sharing one
//! database. Records are stored as the same JSON as sled's, with the columns queries need
//! beside them. Migrations are versioned and applied at open, under an advisory lock so that
//! replicas starting together apply each once. A small pool of connections is reconnected
//! when a connection breaks.
//!
//! Ordering across replicas: entry writes take a transaction-level advisory lock before
//! drawing their revision, so commit order equals revision order and an incremental sync
//! never skips a change; audit appends take another, so the hash chain has one tail.
//!
//! TLS to the database is optional: with trust anchors configured, connections use
//! tokio-rustls (ring, like the rest of Tessera) and verify the server's certificate and host
//! name; put `sslmode=require` in the connection string to refuse a server without TLS.
//!
//! What it is not: no client-certificate authentication to the database, no read replicas.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tessera_identity::{Bundle, SpiffeId, TrustDomain};
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio_postgres::{Client, NoTls};

use super::records::StoredBundle;
use super::{
    AgentRecord, AuditEvent, AuditRecord, CaJournal, Entry, EntryChanges, FederationRelationship, JoinToken, Result,
    Store, StoreError, audit,
};

/// Advisory lock keys (arbitrary, fixed).
const LOCK_MIGRATE: i64 = 0x7e55_0001;
const LOCK_ENTRIES: i64 = 0x7e55_0002;
const LOCK_AUDIT: i64 = 0x7e55_0003;

/// Versioned migrations: each runs once, in order, in its own transaction.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE entries (
    id TEXT PRIMARY KEY,
    parent_id TEXT NOT NULL,
    natural_key TEXT NOT NULL,
    revision BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT FALSE,
    body TEXT NOT NULL
);
CREATE UNIQUE INDEX entries_natural_key ON entries (natural_key) WHERE NOT deleted;
CREATE INDEX entries_parent ON entries (parent_id) WHERE NOT deleted;
CREATE INDEX entries_revision ON entries (revision);
CREATE SEQUENCE entry_revision;
CREATE TABLE agents (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE join_tokens (token TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE bundles (trust_domain TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE federations (trust_domain TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE ca_journals (server TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE audit (seq BIGINT PRIMARY KEY, body TEXT NOT NULL);
"#,
    // 2: agent records are written only by compare-and-set on a revision drawn from a sequence
    // (never repeated, also across eviction and re-attestation).
    r#"
ALTER TABLE agents ADD COLUMN revision BIGINT NOT NULL DEFAULT 0;
CREATE SEQUENCE agent_revision;
"#,
    // 3: the version of the last server that migrated or opened the database.
    r#"
CREATE TABLE tessera_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"#,
];

/// The oldest schema (number of migrations) whose servers can run on the schema this build
/// leaves, recorded as `readable_from_schema` in `tessera_meta`. A migration that an older
/// server can live with (a new table, a column with a default it never reads) leaves it; one
/// that changes what an older server reads or writes raises it to its own number. 3: agents
/// are written only by compare-and-set on their revision (migration 2), which a server that
/// knows fewer migrations does not do.
const READABLE_FROM: i32 = 3;

fn backend(e: tokio_postgres::Error) -> StoreError {
    StoreError::Backend(match e.as_db_error() {
        Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
        None => format!("postgres: {e}"),
    })
}

fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(format!("encoding a record: {e}")))
}

fn from_json<T: DeserializeOwned>(key: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt { key: key.to_owned(), reason: e.to_string() })
}

fn rev(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `spiffe_id|parent_id|sorted selectors`: two live entries may not share it.
fn natural_key(e: &Entry) -> String {
    let mut sel: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
    sel.sort();
    format!("{}|{}|{}", e.spiffe_id, e.parent_id, sel.join(","))
}

/// A few connections, each used by one caller at a time (transactions need that).
struct Pool {
    url: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    conns: Vec<Arc<Mutex<Conn>>>,
    next: AtomicUsize,
}

/// One connection and the statements it has prepared. A query by text costs two round trips
/// (prepare, then execute); the hot reads (an agent's record, entries by parent, entry
/// changes: every sync makes them) are prepared once per connection instead.
struct Conn {
    client: Client,
    prepared: std::collections::HashMap<&'static str, tokio_postgres::Statement>,
}

impl Conn {
    fn new(client: Client) -> Self {
        Self { client, prepared: std::collections::HashMap::new() }
    }

    /// `sql`, prepared on this connection once.
    async fn statement(&mut self, sql: &'static str) -> Result<tokio_postgres::Statement> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await.map_err(backend)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    /// Runs a prepared `sql`; on an error the prepared statements are dropped (a schema
    /// change by a newer replica makes them stale) and made again on next use.
    async fn query_prepared(
        &mut self,
        sql: &'static str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let st = self.statement(sql).await?;
        match self.client.query(&st, params).await {
            Ok(rows) => Ok(rows),
            Err(e) => {
                self.prepared.clear();
                Err(backend(e))
            }
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

async fn connect(url: &str, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Client> {
    let client = match tls {
        None => {
            let (client, conn) = tokio_postgres::connect(url, NoTls).await.map_err(backend)?;
            tokio::spawn(drive(conn));
            client
        }
        Some(cfg) => {
            let (client, conn) = tokio_postgres::connect(url, tls::MakeRustls(cfg.clone())).await.map_err(backend)?;
            tokio::spawn(drive(conn));
            client
        }
    };
    Ok(client)
}

async fn drive<F: std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>>>(conn: F) {
    if let Err(e) = conn.await {
        tracing::warn!(error = %e, "PostgreSQL connection ended");
    }
}

/// tokio-postgres over tokio-rustls.
mod tls {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

    /// Makes a TLS connector per connection, for the host being connected to.
    #[derive(Clone)]
    pub struct MakeRustls(pub Arc<rustls::ClientConfig>);

    impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> MakeTlsConnect<S> for MakeRustls {
        type Stream = Stream<S>;
        type TlsConnect = Connect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, domain: &str) -> io::Result<Connect> {
            let name = ServerName::try_from(domain.to_owned()).map_err(io::Error::other)?;
            Ok(Connect { cfg: self.0.clone(), name })
        }
    }

    /// One TLS handshake.
    pub struct Connect {
        cfg: Arc<rustls::ClientConfig>,
        name: ServerName<'static>,
    }

    impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> TlsConnect<S> for Connect {
        type Stream = Stream<S>;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

        fn connect(self, stream: S) -> Self::Future {
            Box::pin(async move {
                let s = tokio_rustls::TlsConnector::from(self.cfg).connect(self.name, stream).await?;
                Ok(Stream(s))
            })
        }
    }

    /// A TLS connection to PostgreSQL.
    pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }
}

impl Pool {
    async fn get(&self) -> Result<OwnedMutexGuard<Conn>> {
        let n = self.conns.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut guard = None;
        for i in 0..n {
            if let Some(c) = self.conns.get((start + i) % n)
                && let Ok(g) = c.clone().try_lock_owned()
            {
                guard = Some(g);
                break;
            }
        }
        let mut g = match guard {
            Some(g) => g,
            None => {
                self.conns
                    .get(start % n)
                    .ok_or_else(|| StoreError::Backend("empty pool".into()))?
                    .clone()
                    .lock_owned()
                    .await
            }
        };
        if g.is_closed() {
            *g = Conn::new(connect(&self.url, self.tls.as_ref()).await?);
        }
        Ok(g)
    }
}

/// The PostgreSQL store.
pub struct PostgresStore {
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never shown.
        f.debug_struct("PostgresStore").field("connections", &self.pool.conns.len()).finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects `connections` times to `url` (a libpq connection string or URL) and applies
    /// the migrations this version knows.
    pub async fn open(url: &str, connections: usize) -> Result<Self> {
        Self::open_with_tls(url, connections, None).await
    }

    /// The same, over TLS verified against `ca_pem` (PEM trust anchors) when given.
    pub async fn open_with_tls(url: &str, connections: usize, ca_pem: Option<&[u8]>) -> Result<Self> {
        let tls = match ca_pem {
            None => None,
            Some(pem) => Some(Arc::new(
                tessera_identity::tls::web_client_config(pem)
                    .map_err(|e| StoreError::Backend(format!("database CA file: {e}")))?,
            )),
        };
        let mut conns = Vec::new();
        for _ in 0..connections.max(1) {
            conns.push(Arc::new(Mutex::new(Conn::new(connect(url, tls.as_ref()).await?))));
        }
        let store = Self { pool: Pool { url: url.to_owned(), tls, conns, next: AtomicUsize::new(0) } };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_MIGRATE]).await.map_err(backend)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS tessera_migrations (version INT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            .await
            .map_err(backend)?;
        let done: i32 = tx
            .query_one("SELECT COALESCE(MAX(version), 0) FROM tessera_migrations", &[])
            .await
            .map_err(backend)?
            .get(0);
        let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
        if done > known {
            let meta = |key: &'static str| {
                let tx = &tx;
                async move {
                    match tx.query_opt("SELECT value FROM tessera_meta WHERE key = $1", &[&key]).await {
                        Ok(row) => Ok(row.map(|r| r.get::<_, String>(0))),
                        Err(e) => Err(backend(e)),
                    }
                }
            };
            let writer = meta("last_writer_version").await?.unwrap_or_else(|| "unknown".into());
            let readable_from = match meta("readable_from_schema").await? {
                None => done,
                Some(v) => v.parse::<i32>().map_err(|_| StoreError::Corrupt {
                    key: "tessera_meta/readable_from_schema".into(),
                    reason: format!("{v:?} is not a schema version"),
                })?,
            };
            if readable_from > known {
                return Err(StoreError::SchemaTooNew {
                    store: "postgres",
                    found: u64::try_from(done).unwrap_or(0),
                    readable_from: u64::try_from(readable_from).unwrap_or(0),
                    known: u64::try_from(known).unwrap_or(0),
                    writer,
                    server: crate::WRITER_VERSION,
                });
            }
            tracing::warn!(
                schema = done,
                readable_from,
                known,
                writer = %writer,
                "The database has a newer schema that this server can run on (a downgrade within the skew window); upgrade again when you can"
            );
            return tx.commit().await.map_err(backend);
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(done).unwrap_or(0)) {
            tx.batch_execute(sql).await.map_err(backend)?;
            let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
            tx.execute("INSERT INTO tessera_migrations (version) VALUES ($1)", &[&v]).await.map_err(backend)?;
            tracing::info!(version = v, "Store migration applied");
        }
        for (key, value) in [
            ("last_writer_version", crate::WRITER_VERSION.to_owned()),
            ("readable_from_schema", READABLE_FROM.to_string()),
        ] {
            tx.execute(
                "INSERT INTO tessera_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2",
                &[&key, &value],
            )
            .await
            .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    async fn get_body<T: DeserializeOwned>(&self, sql: &'static str, key: &str) -> Result<Option<T>> {
        let mut c = self.pool.get().await?;
        match c.query_prepared(sql, &[&key]).await?.first() {
            Some(row) => Ok(Some(from_json(key, row.get::<_, &str>(0))?)),
            None => Ok(None),
        }
    }

    async fn all_bodies<T: DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>> {
        let c = self.pool.get().await?;
        c.query(sql, &[]).await.map_err(backend)?.iter().map(|r| from_json(sql, r.get::<_, &str>(0))).collect()
    }

    async fn exec(&self, sql: &str, key: &str, body: &str) -> Result<u64> {
        let c = self.pool.get().await?;
        c.execute(sql, &[&key, &body]).await.map_err(backend)
    }

    /// Writes an entry (or its tombstone) under the entry lock with the next revision.
    async fn write_entry(&self, entry: &Entry, mode: EntryWrite) -> Result<u64> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_ENTRIES]).await.map_err(backend)?;
        let revision = write_entry_in(&tx, entry, mode).await?;
        tx.commit().await.map_err(backend)?;
        Ok(revision)
    }
}

/// Writes one entry (checked against what is stored) in the transaction `tx`, which holds the
/// entries lock; returns its revision.
async fn write_entry_in(tx: &tokio_postgres::Transaction<'_>, entry: &Entry, mode: EntryWrite) -> Result<u64> {
    let existing: Option<bool> = tx
        .query_opt("SELECT deleted FROM entries WHERE id = $1", &[&entry.id])
        .await
        .map_err(backend)?
        .map(|r| r.get(0));
    match (mode, existing) {
        (EntryWrite::Create, Some(false)) => return Err(StoreError::AlreadyExists(format!("entry {}", entry.id))),
        (EntryWrite::Update | EntryWrite::Delete, None | Some(true)) => {
            return Err(StoreError::NotFound(format!("entry {}", entry.id)));
        }
        _ => {}
    }
    let nk = natural_key(entry);
    if mode == EntryWrite::Create {
        let dup = tx
            .query_opt("SELECT id FROM entries WHERE natural_key = $1 AND NOT deleted", &[&nk])
            .await
            .map_err(backend)?;
        if let Some(row) = dup {
            return Err(StoreError::AlreadyExists(format!(
                "an entry with SPIFFE ID {}, parent {} and the same selectors ({})",
                entry.spiffe_id,
                entry.parent_id,
                row.get::<_, &str>(0)
            )));
        }
    }
    let revision: i64 = tx.query_one("SELECT nextval('entry_revision')", &[]).await.map_err(backend)?.get(0);
    let mut stored = entry.clone();
    stored.revision = rev(revision);
    let body = to_json(&stored)?;
    let deleted = mode == EntryWrite::Delete;
    tx.execute(
        "INSERT INTO entries (id, parent_id, natural_key, revision, deleted, body) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (id) DO UPDATE SET parent_id = $2, natural_key = $3, revision = $4, deleted = $5, body = $6",
        &[&entry.id, &entry.parent_id.to_string(), &nk, &revision, &deleted, &body],
    )
    .await
    .map_err(backend)?;
    Ok(rev(revision))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryWrite {
    Create,
    Update,
    Delete,
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_entry(&self, mut entry: Entry) -> Result<Entry> {
        entry.revision = self.write_entry(&entry, EntryWrite::Create).await?;
        Ok(entry)
    }

    async fn create_entries(&self, mut batch: Vec<Entry>) -> Result<Vec<Entry>> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_ENTRIES]).await.map_err(backend)?;
        // Inside the transaction, an entry written earlier in the batch is seen by the checks
        // of the later ones (a duplicate within the batch is refused like a stored one).
        for e in &mut batch {
            e.revision = write_entry_in(&tx, e, EntryWrite::Create).await?;
        }
        tx.commit().await.map_err(backend)?;
        Ok(batch)
    }

    async fn update_entry(&self, mut entry: Entry) -> Result<Entry> {
        let prev =
            self.get_entry(&entry.id).await?.ok_or_else(|| StoreError::NotFound(format!("entry {}", entry.id)))?;
        entry.created_at = prev.created_at;
        entry.revision = self.write_entry(&entry, EntryWrite::Update).await?;
        Ok(entry)
    }

    async fn delete_entry(&self, id: &str) -> Result<Option<Entry>> {
        let Some(prev) = self.get_entry(id).await? else { return Ok(None) };
        match self.write_entry(&prev, EntryWrite::Delete).await {
            Ok(_) => Ok(Some(prev)),
            // Deleted by another replica in between.
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>> {
        self.get_body("SELECT body FROM entries WHERE id = $1 AND NOT deleted", id).await
    }

    async fn list_entries(&self) -> Result<Vec<Entry>> {
        self.all_bodies("SELECT body FROM entries WHERE NOT deleted ORDER BY id").await
    }

    async fn entries_page(&self, after: &str, limit: usize) -> Result<Vec<Entry>> {
        let c = self.pool.get().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c
            .query("SELECT body FROM entries WHERE NOT deleted AND id > $1 ORDER BY id LIMIT $2", &[&after, &limit])
            .await
            .map_err(backend)?;
        rows.iter().map(|r| from_json(after, r.get::<_, &str>(0))).collect()
    }

    async fn entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>> {
        let mut c = self.pool.get().await?;
        let rows = c
            .query_prepared(
                "SELECT body FROM entries WHERE parent_id = $1 AND NOT deleted ORDER BY id",
                &[&parent.to_string()],
            )
            .await?;
        rows.iter().map(|r| from_json(&parent.to_string(), r.get::<_, &str>(0))).collect()
    }

    async fn entry_changes(&self, since: u64, limit: usize) -> Result<EntryChanges> {
        let mut c = self.pool.get().await?;
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        let newest: i64 = c
            .query_prepared("SELECT COALESCE(MAX(revision), 0) FROM entries", &[])
            .await?
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| StoreError::Backend("MAX(revision) returned no row".into()))?;
        let mut out = EntryChanges { revision: rev(newest), ..Default::default() };
        let over = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let rows = c
            .query_prepared(
                "SELECT id, deleted, body, parent_id FROM entries WHERE revision > $1 AND revision <= $2 ORDER BY revision LIMIT $3",
                &[&since, &newest, &over],
            )
            .await?;
        if rows.len() > limit {
            out.truncated = true;
            return Ok(out);
        }
        for r in rows {
            let id: &str = r.get(0);
            if r.get::<_, bool>(1) {
                let parent_id = SpiffeId::new(r.get::<_, &str>(3)).ok();
                out.deleted.push(super::DeletedEntry { id: id.to_owned(), parent_id });
            } else {
                out.changed.push(from_json(id, r.get::<_, &str>(2))?);
            }
        }
        Ok(out)
    }

    async fn compare_and_put_agent(&self, agent: &AgentRecord, expected: Option<u64>) -> Result<Option<AgentRecord>> {
        let c = self.pool.get().await?;
        // A fresh revision first (sequences never hand out a value twice), then one
        // conditional statement: the row is written only while it is still as the caller read it.
        let revision: i64 = c.query_one("SELECT nextval('agent_revision')", &[]).await.map_err(backend)?.get(0);
        let mut stored = agent.clone();
        stored.revision = rev(revision);
        let body = to_json(&stored)?;
        let id = agent.spiffe_id.to_string();
        let n = match expected {
            None => c
                .execute(
                    "INSERT INTO agents (id, revision, body) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    &[&id, &revision, &body],
                )
                .await
                .map_err(backend)?,
            Some(old) => {
                let old = i64::try_from(old).unwrap_or(i64::MAX);
                c.execute(
                    "UPDATE agents SET revision = $2, body = $3 WHERE id = $1 AND revision = $4",
                    &[&id, &revision, &body, &old],
                )
                .await
                .map_err(backend)?
            }
        };
        Ok((n == 1).then_some(stored))
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>> {
        self.get_body("SELECT body FROM agents WHERE id = $1", &id.to_string()).await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
        self.all_bodies("SELECT body FROM agents ORDER BY id").await
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>> {
        self.get_body("DELETE FROM agents WHERE id = $1 RETURNING body", &id.to_string()).await
    }

    async fn create_join_token(&self, token: &JoinToken) -> Result<()> {
        let n = self
            .exec(
                "INSERT INTO join_tokens (token, body) VALUES ($1, $2) ON CONFLICT (token) DO NOTHING",
                &token.token,
                &to_json(token)?,
            )
            .await?;
        if n == 0 {
            return Err(StoreError::AlreadyExists("join token".into()));
        }
        Ok(())
    }

    async fn take_join_token(&self, token: &str) -> Result<Option<JoinToken>> {
        // DELETE … RETURNING: of two concurrent takers, exactly one gets the row.
        self.get_body("DELETE FROM join_tokens WHERE token = $1 RETURNING body", token).await
    }

    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<Bundle>> {
        let stored: Option<StoredBundle> =
            self.get_body("SELECT body FROM bundles WHERE trust_domain = $1", td.as_str()).await?;
        stored.map(StoredBundle::decode).transpose()
    }

    async fn put_bundle(&self, bundle: &Bundle) -> Result<()> {
        let sql = "INSERT INTO bundles (trust_domain, body) VALUES ($1, $2) ON CONFLICT (trust_domain) DO UPDATE SET body = $2";
        self.exec(sql, bundle.trust_domain.as_str(), &to_json(&StoredBundle::from(bundle))?).await.map(|_| ())
    }

    async fn compare_and_put_bundle(&self, bundle: &Bundle, expected: Option<u64>) -> Result<bool> {
        let c = self.pool.get().await?;
        let body = to_json(&StoredBundle::from(bundle))?;
        let td = bundle.trust_domain.as_str();
        let n = match expected {
            None => c
                .execute(
                    "INSERT INTO bundles (trust_domain, body) VALUES ($1, $2) ON CONFLICT (trust_domain) DO NOTHING",
                    &[&td, &body],
                )
                .await
                .map_err(backend)?,
            Some(seq) => {
                let seq = i64::try_from(seq).unwrap_or(i64::MAX);
                c.execute(
                    "UPDATE bundles SET body = $2 WHERE trust_domain = $1 AND (body::jsonb ->> 'sequence_number')::bigint = $3",
                    &[&td, &body, &seq],
                )
                .await
                .map_err(backend)?
            }
        };
        Ok(n == 1)
    }

    async fn delete_bundle(&self, td: &TrustDomain) -> Result<bool> {
        let c = self.pool.get().await?;
        Ok(c.execute("DELETE FROM bundles WHERE trust_domain = $1", &[&td.as_str()]).await.map_err(backend)? > 0)
    }

    async fn list_bundles(&self) -> Result<Vec<Bundle>> {
        let stored: Vec<StoredBundle> = self.all_bodies("SELECT body FROM bundles ORDER BY trust_domain").await?;
        stored.into_iter().map(StoredBundle::decode).collect()
    }

    async fn put_federation(&self, rel: &FederationRelationship) -> Result<()> {
        let sql = "INSERT INTO federations (trust_domain, body) VALUES ($1, $2) ON CONFLICT (trust_domain) DO UPDATE SET body = $2";
        self.exec(sql, rel.trust_domain.as_str(), &to_json(rel)?).await.map(|_| ())
    }

    async fn list_federations(&self) -> Result<Vec<FederationRelationship>> {
        self.all_bodies("SELECT body FROM federations ORDER BY trust_domain").await
    }

    async fn delete_federation(&self, td: &TrustDomain) -> Result<bool> {
        let c = self.pool.get().await?;
        Ok(c.execute("DELETE FROM federations WHERE trust_domain = $1", &[&td.as_str()]).await.map_err(backend)? > 0)
    }

    async fn get_federation(&self, td: &TrustDomain) -> Result<Option<FederationRelationship>> {
        self.get_body("SELECT body FROM federations WHERE trust_domain = $1", td.as_str()).await
    }

    async fn load_journal(&self, server: &str) -> Result<Option<CaJournal>> {
        self.get_body("SELECT body FROM ca_journals WHERE server = $1", server).await
    }

    async fn list_journals(&self) -> Result<Vec<(String, CaJournal)>> {
        let c = self.pool.get().await?;
        let rows = c.query("SELECT server, body FROM ca_journals ORDER BY server", &[]).await.map_err(backend)?;
        rows.iter()
            .map(|r| {
                let server: &str = r.get(0);
                Ok((server.to_owned(), from_json(server, r.get::<_, &str>(1))?))
            })
            .collect()
    }

    async fn save_journal(&self, server: &str, journal: &CaJournal) -> Result<()> {
        let sql = "INSERT INTO ca_journals (server, body) VALUES ($1, $2) ON CONFLICT (server) DO UPDATE SET body = $2";
        self.exec(sql, server, &to_json(journal)?).await.map(|_| ())
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<AuditRecord> {
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await.map_err(backend)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_AUDIT]).await.map_err(backend)?;
        let prev: Option<AuditRecord> =
            match tx.query_opt("SELECT body FROM audit ORDER BY seq DESC LIMIT 1", &[]).await.map_err(backend)? {
                Some(row) => Some(from_json("audit tail", row.get::<_, &str>(0))?),
                None => None,
            };
        let record = audit::chain(prev.as_ref(), event);
        let seq = i64::try_from(record.seq).map_err(|_| StoreError::Backend("audit sequence overflow".into()))?;
        tx.execute("INSERT INTO audit (seq, body) VALUES ($1, $2)", &[&seq, &to_json(&record)?])
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        Ok(record)
    }

    async fn audit_range(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        let c = self.pool.get().await?;
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = c
            .query("SELECT body FROM audit WHERE seq >= $1 ORDER BY seq LIMIT $2", &[&from, &limit])
            .await
            .map_err(backend)?;
        rows.iter().map(|r| from_json("audit", r.get::<_, &str>(0))).collect()
    }
}
