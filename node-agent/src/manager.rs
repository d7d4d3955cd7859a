//! The SVID manager: the agent's core loop.
//!
//! It keeps the agent's own SVID fresh (renewal at half life), syncs the entries this agent is
//! authorized for incrementally (by store revision, checked by digest), fetches bundles,
//! generates each workload key here on the node (ECDSA P-256), gets the CSRs signed in
//! batches, and rotates every SVID at half of its lifetime minus a random jitter of up to a
//! tenth (so a thousand SVIDs issued together do not all renew in the same second). When the
//! server is unreachable it keeps serving what it has and retries with exponential backoff.
//!
//! Consumers (Workload API, SDS, cert files) read [`Snapshot`]s from a `watch` channel.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tessera_agent_api::wire::bundle_from_pb;
use tessera_agent_api::{AgentIdentity, ClientError, IdentityFiles, connect_any, server_tls};
use tessera_identity::{Bundle, PrivateKey, Selector, SpiffeId, TrustDomain, unix_now};
use tessera_proto::agent::v1 as pb;
use tessera_proto::agent::v1::agent_client::AgentClient;
use tessera_proto::types::v1 as types;
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::client::{load_state, save_bundle};
use crate::config::{Bootstrap, Config};

/// Most CSRs sent in one batch (the server's default limit).
const BATCH: usize = 500;
/// After a change notice, how long to let a burst of changes settle before syncing.
const NOTICE_SETTLE: Duration = Duration::from_millis(10);
/// Syncs caused by notices: a burst of this many at once, then one a second, so that a
/// server whose entries change all the time costs each agent one sync a second, not one per
/// change.
const NOTICE_BURST: f64 = 5.0;

/// A token bucket for notice-driven syncs.
struct NoticeBudget {
    tokens: f64,
    at: tokio::time::Instant,
}

impl NoticeBudget {
    fn new(now: tokio::time::Instant) -> Self {
        Self { tokens: NOTICE_BURST, at: now }
    }

    /// Takes one sync from the budget; returns when it may start.
    fn spend(&mut self, now: tokio::time::Instant) -> tokio::time::Instant {
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64()).min(NOTICE_BURST);
        self.at = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 { now } else { now + Duration::from_secs_f64(-self.tokens) }
    }
}

/// Agent errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Reaching the server, a call it refused, or the agent's own files.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent cannot attest (no SVID and no usable join token).
    #[error("{0}")]
    Attestation(String),
    /// A workload asks for new JWT-SVIDs faster than its entry's budget.
    #[error(
        "{0} asks for new JWT-SVIDs faster than {JWT_MINTS_PER_SECOND}/s (burst {JWT_MINTS_BURST}); reuse audiences or retry later"
    )]
    JwtBudget(SpiffeId),
}

/// A registration entry as the agent holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentEntry {
    /// Entry ID.
    pub id: String,
    /// The identity.
    pub spiffe_id: SpiffeId,
    /// Workload selectors (all must match).
    pub selectors: Vec<Selector>,
    /// Trust domains whose bundles the workload receives.
    pub federates_with: Vec<TrustDomain>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Hint.
    pub hint: String,
    /// Unix seconds; orders a workload's identities (the oldest is `default`).
    pub created_at: i64,
    /// Store revision.
    pub revision: u64,
}

impl AgentEntry {
    fn from_pb(e: &types::Entry) -> Result<Self, String> {
        Ok(Self {
            id: e.id.clone(),
            spiffe_id: SpiffeId::new(&e.spiffe_id).map_err(|x| x.to_string())?,
            selectors: e
                .selectors
                .iter()
                .map(|s| Selector::new(&s.r#type, &s.value).map_err(|x| x.to_string()))
                .collect::<Result<_, _>>()?,
            federates_with: e
                .federates_with
                .iter()
                .map(|t| TrustDomain::new(t).map_err(|x| x.to_string()))
                .collect::<Result<_, _>>()?,
            dns_names: e.dns_names.clone(),
            hint: e.hint.clone(),
            created_at: e.created_at,
            revision: e.revision,
        })
    }
}

/// A workload X509-SVID held by the agent. `Debug` omits the key.
pub struct WorkloadSvid {
    /// The entry it was issued for.
    pub entry: AgentEntry,
    /// DER chain, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The key, generated here.
    pub key: PrivateKey,
    /// Hex serial.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds: when the agent replaces it.
    pub rotate_at: i64,
}

impl std::fmt::Debug for WorkloadSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadSvid")
            .field("spiffe_id", &self.entry.spiffe_id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// What the agent can serve right now.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Every workload SVID, ordered by entry age (then ID).
    pub svids: Vec<Arc<WorkloadSvid>>,
    /// Our trust domain's bundle.
    pub bundle: Arc<Bundle>,
    /// Federated bundles by trust domain.
    pub federated: BTreeMap<TrustDomain, Arc<Bundle>>,
    /// Bumped on every change.
    pub generation: u64,
    /// True when some entry selects on `unix:sha256` (workload attestation then hashes
    /// executables).
    pub wants_exe_hash: bool,
}

impl Snapshot {
    /// The SVIDs whose entry selectors are all in `selectors`, oldest entry first.
    pub fn identities(&self, selectors: &[Selector]) -> Vec<Arc<WorkloadSvid>> {
        self.svids.iter().filter(|s| s.entry.selectors.iter().all(|want| selectors.contains(want))).cloned().collect()
    }

    /// The bundle of `td` (ours or federated).
    pub fn bundle_for(&self, td: &TrustDomain) -> Option<&Arc<Bundle>> {
        if td == &self.bundle.trust_domain { Some(&self.bundle) } else { self.federated.get(td) }
    }
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Successful sync passes.
    pub syncs_ok: AtomicU64,
    /// Failed sync passes.
    pub syncs_failed: AtomicU64,
    /// X509-SVIDs received from the server.
    pub svids_issued: AtomicU64,
    /// Open SDS streams.
    pub sds_streams: AtomicU64,
    /// Open Workload API streams.
    pub workload_streams: AtomicU64,
    /// Change notices received from the server.
    pub change_notices: AtomicU64,
    /// SDS responses Envoy rejected.
    pub sds_nacks: AtomicU64,
    /// Unix seconds of the last successful sync pass (0: none yet).
    pub last_sync: std::sync::atomic::AtomicI64,
    /// Server clock minus ours, milliseconds, measured in the last sync answer.
    pub clock_skew_ms: std::sync::atomic::AtomicI64,
    /// The health listener's connections.
    pub health_connections: Arc<tessera_svc::listener::ConnStats>,
    /// The agent socket's connections.
    pub socket_connections: Arc<tessera_svc::listener::ConnStats>,
}

struct CachedJwt {
    token: String,
    issued_at: i64,
    expires_at: i64,
    used: u64,
}

/// JWT-SVIDs cached per entry (distinct audience lists), and in all.
const JWT_CACHE_PER_ENTRY: usize = 64;
const JWT_CACHE_TOTAL: usize = 4096;
/// New JWT-SVIDs each entry may ask the server for: a burst, then a steady rate. Cache hits
/// are free. One workload asking for ever-new audiences spends its own budget, not the
/// node's: other workloads keep theirs.
const JWT_MINTS_BURST: f64 = 50.0;
const JWT_MINTS_PER_SECOND: f64 = 10.0;

/// The agent's JWT-SVID cache: bounded per entry and in all, least recently used out first.
#[derive(Default)]
struct JwtCache {
    tokens: HashMap<(String, Vec<String>), CachedJwt>,
    budgets: HashMap<String, (f64, std::time::Instant)>,
    tick: u64,
}

impl JwtCache {
    fn get(&mut self, key: &(String, Vec<String>), now: i64) -> Option<String> {
        self.tick += 1;
        let tick = self.tick;
        let c = self.tokens.get_mut(key)?;
        (now < c.issued_at + (c.expires_at - c.issued_at) / 2).then(|| {
            c.used = tick;
            c.token.clone()
        })
    }

    /// Takes one mint from `entry`'s budget; false when it is spent.
    fn spend(&mut self, entry: &str) -> bool {
        let now = std::time::Instant::now();
        let (tokens, at) = self.budgets.entry(entry.to_owned()).or_insert((JWT_MINTS_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * JWT_MINTS_PER_SECOND).min(JWT_MINTS_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn put(&mut self, key: (String, Vec<String>), c: CachedJwt, now: i64) {
        self.tick += 1;
        self.tokens.retain(|_, c| c.expires_at > now);
        let entry = key.0.clone();
        let oldest = |tokens: &HashMap<(String, Vec<String>), CachedJwt>, of: Option<&str>| {
            tokens
                .iter()
                .filter(|(k, _)| of.is_none_or(|e| k.0 == e))
                .min_by_key(|(_, c)| c.used)
                .map(|(k, _)| k.clone())
        };
        if self.tokens.keys().filter(|k| k.0 == entry).count() >= JWT_CACHE_PER_ENTRY
            && let Some(k) = oldest(&self.tokens, Some(&entry))
        {
            self.tokens.remove(&k);
        }
        if self.tokens.len() >= JWT_CACHE_TOTAL
            && let Some(k) = oldest(&self.tokens, None)
        {
            self.tokens.remove(&k);
        }
        self.tokens.insert(key, CachedJwt { used: self.tick, ..c });
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

/// What the manager holds. Behind a plain (non-async) lock that is never held across an
/// `.await`: network calls work on copies, and only their results are written back.
struct State {
    identity: Arc<AgentIdentity>,
    client: Option<AgentClient<Channel>>,
    revision: u64,
    entries: BTreeMap<String, AgentEntry>,
    svids: BTreeMap<String, Arc<WorkloadSvid>>,
    bundle: Arc<Bundle>,
    federated: BTreeMap<TrustDomain, Arc<Bundle>>,
    generation: u64,
}

/// The entries a sync pass received.
struct EntrySync {
    entries: BTreeMap<String, AgentEntry>,
    revision: u64,
    tainted_authority_ids: Vec<String>,
}

/// The manager. Start it with [`Manager::start`], then spawn [`Manager::run`].
pub struct Manager {
    cfg: Arc<Config>,
    files: IdentityFiles,
    state: Mutex<State>,
    /// One sync pass at a time. Only sync passes take it: a Workload API call never waits
    /// for one.
    pass: tokio::sync::Mutex<()>,
    tx: watch::Sender<Arc<Snapshot>>,
    jwt_cache: Mutex<JwtCache>,
    synced: AtomicBool,
    /// A `join_token` agent tries to attest again after an eviction once per process: the
    /// token in its configuration is spent after one use.
    join_token_tried: AtomicBool,
    /// Woken by the server's change notices: sync now instead of at the next poll.
    wake: Notify,
    /// Index in `cfg.servers` of the replica to try first.
    current: AtomicUsize,
    /// Counters.
    pub metrics: Arc<AgentMetrics>,
    /// What `doctor` and `debug` read besides the counters.
    pub observed: Observed,
}

/// What the agent has observed of itself, for `doctor` and `debug info`.
#[derive(Debug)]
pub struct Observed {
    /// When the agent started.
    pub started: std::time::Instant,
    /// The last failed sync pass (Unix seconds, error), cleared by a success.
    pub last_sync_error: Mutex<Option<(i64, String)>>,
    /// True once a sync answer carried the server's time.
    pub skew_measured: AtomicBool,
    /// Per entry ID: when the agent first held it, and when a workload last received its
    /// SVID (Unix seconds).
    pub entries: Mutex<HashMap<String, (i64, Option<i64>)>>,
    /// Open SDS streams' state (`debug sds`).
    pub sds: crate::sds_state::SdsStreams,
}

impl Default for Observed {
    fn default() -> Self {
        Self {
            started: std::time::Instant::now(),
            last_sync_error: Mutex::default(),
            skew_measured: AtomicBool::new(false),
            entries: Mutex::default(),
            sds: crate::sds_state::SdsStreams::default(),
        }
    }
}

/// The system clock in Unix milliseconds.
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").field("server", &self.cfg.server_address).finish_non_exhaustive()
    }
}

fn jitter(max: i64) -> i64 {
    if max <= 0 { 0 } else { i64::try_from(rand::random::<u64>() % max.unsigned_abs()).unwrap_or(0) }
}

/// Digest of the authorized set, as the server computes it.
fn entries_digest(entries: &BTreeMap<String, AgentEntry>) -> Vec<u8> {
    tessera_identity::authorized_digest(entries.iter().map(|(id, e)| (id.as_str(), e.revision)))
}

/// The attestation to send and the agent ID it claims.
fn attestation_data(cfg: &Config) -> Result<(pb::AttestationData, SpiffeId), AgentError> {
    if let Some(p) = &cfg.psat {
        let token = std::fs::read_to_string(&p.token_path).map_err(|e| {
            AgentError::Attestation(format!("cannot read the projected token {}: {e}", p.token_path.display()))
        })?;
        let payload = tessera_k8s::psat::Payload { cluster: p.cluster.clone(), token: token.trim().to_owned() };
        let suffix = payload.agent_suffix().map_err(|e| AgentError::Attestation(e.to_string()))?;
        let id = tessera_identity::agent_id(&cfg.trust_domain, tessera_k8s::psat::KIND, &suffix)
            .map_err(|e| AgentError::Attestation(e.to_string()))?;
        let bytes = serde_json::to_vec(&payload).map_err(|e| AgentError::Attestation(e.to_string()))?;
        return Ok((pb::AttestationData { r#type: tessera_k8s::psat::KIND.into(), payload: bytes }, id));
    }
    let token = cfg.join_token.as_ref().map(tessera_identity::Secret::expose).ok_or_else(|| {
        AgentError::Attestation(format!(
            "no agent SVID in {} and no join_token configured: generate one with `tessera-server token generate`",
            cfg.data_dir.display()
        ))
    })?;
    let id = tessera_identity::agent_id(&cfg.trust_domain, "join_token", token)
        .map_err(|e| AgentError::Attestation(e.to_string()))?;
    Ok((pb::AttestationData { r#type: "join_token".into(), payload: token.as_bytes().to_vec() }, id))
}

/// First contact: the server is trusted as `bootstrap` says.
async fn attest(cfg: &Config, files: &IdentityFiles) -> Result<(AgentIdentity, Bundle), AgentError> {
    let tls = match &cfg.bootstrap {
        Bootstrap::Insecure => {
            warn!("insecure_bootstrap: trusting the server without verification for this first contact");
            tessera_identity::tls::danger::insecure_client_config().map_err(|e| ClientError::Tls(e.to_string()))?
        }
        Bootstrap::BundleFile(path) => {
            let pem =
                std::fs::read(path).map_err(|e| ClientError::State { path: path.clone(), reason: e.to_string() })?;
            let certs = tessera_identity::pem::decode_certs(&pem)
                .map_err(|e| ClientError::State { path: path.clone(), reason: e.to_string() })?;
            server_tls(&cfg.trust_domain, &certs, None)?
        }
    };
    attest_with(cfg, files, tls).await
}

/// Attests over `tls` and persists the new identity and bundle.
async fn attest_with(
    cfg: &Config,
    files: &IdentityFiles,
    tls: rustls::ClientConfig,
) -> Result<(AgentIdentity, Bundle), AgentError> {
    let (data, id) = attestation_data(cfg)?;
    let (mut client, _) = connect_any(&cfg.servers, 0, tls).await?;
    let (identity, bundle) = tessera_agent_api::attest(&mut client, data, &id, None).await?;
    let bundle = bundle_from_pb(&bundle.unwrap_or_default()).map_err(|e| AgentError::Attestation(e.to_string()))?;
    files.save(&identity)?;
    save_bundle(files, &bundle)?;
    info!(agent_id = %tessera_identity::ids::LogId(&identity.id), "Agent attested");
    Ok((identity, bundle))
}

impl Manager {
    /// Loads the persisted identity, or attests on first start (or when it has expired).
    pub async fn start(cfg: Arc<Config>) -> Result<Arc<Self>, AgentError> {
        let files = IdentityFiles::new(&cfg.data_dir);
        let (identity, bundle) = match load_state(&files, &cfg.trust_domain)? {
            Some((id, b)) if id.not_after > unix_now() => {
                info!(agent_id = %tessera_identity::ids::LogId(&id.id), not_after = id.not_after, "Using the persisted agent SVID");
                (id, b)
            }
            Some((id, _)) => {
                warn!(agent_id = %tessera_identity::ids::LogId(&id.id), "The persisted agent SVID has expired: attesting again");
                attest(&cfg, &files).await?
            }
            None => attest(&cfg, &files).await?,
        };
        let bundle = Arc::new(bundle);
        let snapshot = Snapshot {
            svids: vec![],
            bundle: bundle.clone(),
            federated: BTreeMap::new(),
            generation: 0,
            wants_exe_hash: false,
        };
        let (tx, _) = watch::channel(Arc::new(snapshot));
        Ok(Arc::new(Self {
            cfg,
            files,
            state: Mutex::new(State {
                identity: Arc::new(identity),
                client: None,
                revision: 0,
                entries: BTreeMap::new(),
                svids: BTreeMap::new(),
                bundle,
                federated: BTreeMap::new(),
                generation: 0,
            }),
            pass: tokio::sync::Mutex::new(()),
            tx,
            jwt_cache: Mutex::default(),
            synced: AtomicBool::new(false),
            join_token_tried: AtomicBool::new(false),
            wake: Notify::new(),
            current: AtomicUsize::new(0),
            metrics: Arc::default(),
            observed: Observed::default(),
        }))
    }

    /// The agent's SPIFFE ID.
    pub fn agent_id(&self) -> SpiffeId {
        self.state.lock().identity.id.clone()
    }

    /// Snapshots as they change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Notes that a workload received the SVIDs `served`.
    pub fn mark_served(&self, served: &[Arc<WorkloadSvid>]) {
        if served.is_empty() {
            return;
        }
        let now = unix_now();
        let mut e = self.observed.entries.lock();
        for s in served {
            if let Some(v) = e.get_mut(&s.entry.id) {
                v.1 = Some(now);
            }
        }
    }

    /// The agent's own SVID: chain (leaf first), when it renews, when it expires.
    pub fn own_svid(&self) -> (Vec<Vec<u8>>, i64, i64) {
        let s = self.state.lock();
        (s.identity.chain.clone(), s.identity.renew_at(), s.identity.not_after)
    }

    /// The entries the agent holds.
    pub fn entries(&self) -> Vec<AgentEntry> {
        self.state.lock().entries.values().cloned().collect()
    }

    /// The files the agent keeps its state in.
    pub fn files(&self) -> &IdentityFiles {
        &self.files
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// True once a sync with the server has completed.
    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Syncs forever: after success every `sync_interval` (sooner when an SVID is due),
    /// after failure with exponential backoff (1 s doubling, capped at the sync interval).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        let mut budget = NoticeBudget::new(tokio::time::Instant::now());
        loop {
            let wait = match self.sync_once().await {
                Ok(next_due) => {
                    failures = 0;
                    self.synced.store(true, Ordering::Relaxed);
                    self.metrics.syncs_ok.fetch_add(1, Ordering::Relaxed);
                    let until_due = Duration::from_secs(u64::try_from((next_due - unix_now()).max(0)).unwrap_or(0));
                    self.cfg.sync_interval.min(until_due.max(Duration::from_millis(100)))
                }
                Err(e) => {
                    let evicted = matches!(e, AgentError::Client(ClientError::Evicted { .. }));
                    if evicted || matches!(e, AgentError::Attestation(_)) {
                        // The agent can no longer authenticate: not ready until re-attested.
                        self.synced.store(false, Ordering::Relaxed);
                    }
                    failures = failures.saturating_add(1);
                    self.metrics.syncs_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, failures, "Sync with the server failed; serving cached SVIDs");
                    self.state.lock().client = None;
                    if evicted {
                        match self.reattest().await {
                            Ok(()) => failures = 0,
                            Err(e) => warn!(error = %e, "Cannot attest again after the eviction; serving cached SVIDs"),
                        }
                    }
                    if failures == 0 {
                        Duration::ZERO
                    } else {
                        // Next time, start with the next replica.
                        let n = self.cfg.servers.len().max(1);
                        let _ = self.current.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some((c + 1) % n));
                        Duration::from_secs(1u64 << failures.min(6))
                            .min(self.cfg.sync_interval.max(Duration::from_secs(1)))
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified(), if failures == 0 => {
                    // A burst of changes (a batch of entries) costs one sync, not one each;
                    // under steady churn, notices sync at the budget's rate.
                    let at = budget.spend(tokio::time::Instant::now()) + NOTICE_SETTLE;
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = shutdown.changed() => break,
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }

    /// After an eviction: attests again as at first start, trusting the bundle the agent
    /// holds. A `k8s_psat` agent does so every time (its projected token is fresh, and its
    /// agent ID stays the same); a `join_token` agent once per process, since its token is
    /// spent: give it a new one and restart it (docs/agent.md). Cached SVIDs stay served
    /// throughout; the next sync starts from scratch under the new identity.
    async fn reattest(&self) -> Result<(), AgentError> {
        let _pass = self.pass.lock().await;
        if self.cfg.psat.is_none() && self.join_token_tried.swap(true, Ordering::Relaxed) {
            return Err(AgentError::Attestation(
                "the agent was evicted and its join_token was already tried: put a new join token in join_token and restart the agent (docs/agent.md)"
                    .into(),
            ));
        }
        let roots = self.state.lock().bundle.x509_authorities.clone();
        let tls = server_tls(&self.cfg.trust_domain, &roots, None)?;
        let (identity, bundle) = attest_with(&self.cfg, &self.files, tls).await?;
        info!(agent_id = %tessera_identity::ids::LogId(&identity.id), "Agent attested again after an eviction");
        let mut s = self.state.lock();
        s.identity = Arc::new(identity);
        s.bundle = Arc::new(bundle);
        s.client = None;
        s.revision = 0;
        Ok(())
    }

    /// Holds a `WatchChanges` stream to the server and wakes [`Manager::run`] on every notice,
    /// so that entry and bundle changes reach workloads without waiting for the poll. Polling
    /// stays the fallback: a lost stream costs at most one sync interval. A server without the
    /// call (older version) leaves the agent polling.
    pub async fn watch_changes(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let outcome = tokio::select! {
                r = self.watch_once() => r,
                _ = shutdown.changed() => return,
            };
            match outcome {
                Err(AgentError::Client(ClientError::Refused { code: tonic::Code::Unimplemented, .. })) => {
                    info!("The server does not send change notices; polling every sync interval");
                    return;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    debug!(error = %e, failures, "Change notice stream lost");
                }
                Ok(()) => failures = 0,
            }
            // Half the backoff, plus a random part of the other half: after a server restart,
            // its agents come back spread out, not in waves.
            let base = Duration::from_millis(250u64 << failures.min(7)).min(self.cfg.sync_interval);
            let half = u64::try_from(base.as_millis() / 2).unwrap_or(0);
            let wait =
                Duration::from_millis(half + u64::try_from(jitter(i64::try_from(half).unwrap_or(0))).unwrap_or(0));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// One stream, until it ends. Each notice wakes the sync loop; so does the first, since
    /// changes may have been missed while no stream was open.
    async fn watch_once(&self) -> Result<(), AgentError> {
        const CALL: &str = "WatchChanges";
        let mut client = self.client().await?;
        let mut notices =
            client.watch_changes(pb::WatchChangesRequest {}).await.map_err(ClientError::refused(CALL))?.into_inner();
        while notices.message().await.map_err(ClientError::refused(CALL))?.is_some() {
            self.metrics.change_notices.fetch_add(1, Ordering::Relaxed);
            self.wake.notify_one();
        }
        Ok(())
    }

    /// A connected client, authenticated with the current agent SVID: the cached one, or a
    /// new connection to the first replica that answers. No lock is held while connecting.
    async fn client(&self) -> Result<AgentClient<Channel>, AgentError> {
        let (identity, bundle) = {
            let s = self.state.lock();
            if let Some(c) = &s.client {
                return Ok(c.clone());
            }
            (s.identity.clone(), s.bundle.clone())
        };
        let tls = server_tls(&self.cfg.trust_domain, &bundle.x509_authorities, Some(&identity))?;
        let (c, i) = connect_any(&self.cfg.servers, self.current.load(Ordering::Relaxed), tls).await?;
        self.current.store(i, Ordering::Relaxed);
        let mut s = self.state.lock();
        // Keep it only if the identity and bundle it was made with are still current.
        if Arc::ptr_eq(&s.identity, &identity) && Arc::ptr_eq(&s.bundle, &bundle) {
            s.client = Some(c.clone());
        }
        Ok(c)
    }

    /// One pass, in named steps: the agent SVID, entries, taints, bundles, workload SVIDs,
    /// publication. Returns when the next SVID (or the agent SVID) is due, Unix seconds.
    pub async fn sync_once(&self) -> Result<i64, AgentError> {
        let r = self.sync_pass().await;
        match &r {
            Ok(_) => {
                self.metrics.last_sync.store(unix_now(), Ordering::Relaxed);
                *self.observed.last_sync_error.lock() = None;
            }
            Err(e) => *self.observed.last_sync_error.lock() = Some((unix_now(), e.to_string())),
        }
        r
    }

    async fn sync_pass(&self) -> Result<i64, AgentError> {
        let _pass = self.pass.lock().await;
        let now = unix_now();
        self.renew_agent_if_due(now).await?;
        let mut client = self.client().await?;
        let received = self.fetch_entries(&mut client).await?;
        let mut changed = self.apply_entries(&received);
        let force = self.apply_taints(&received.tainted_authority_ids, &mut client).await?;
        changed |= self.fetch_bundles(&mut client).await?;
        let due = self.due(now, &force);
        for batch in due.chunks(BATCH) {
            changed |= self.mint(&mut client, batch).await?;
        }
        if changed {
            self.publish();
        }
        let s = self.state.lock();
        Ok(s.svids.values().map(|v| v.rotate_at).chain([s.identity.renew_at()]).min().unwrap_or(now + 60))
    }

    /// The agent SVID: an expired one is an error (the agent must attest again); one past
    /// half its life is renewed.
    async fn renew_agent_if_due(&self, now: i64) -> Result<(), AgentError> {
        let identity = self.state.lock().identity.clone();
        if now >= identity.not_after {
            return Err(AgentError::Attestation(format!(
                "agent SVID {} expired at {}; re-attest with a new join token (see docs/agent.md)",
                tessera_identity::ids::LogId(&identity.id),
                identity.not_after
            )));
        }
        if now >= identity.renew_at() {
            self.renew_agent().await?;
        }
        Ok(())
    }

    /// Entries, incrementally by store revision, checked against the server's digest (a
    /// full sync when they differ).
    async fn fetch_entries(&self, client: &mut AgentClient<Channel>) -> Result<EntrySync, AgentError> {
        const CALL: &str = "SyncEntries";
        let (since, mut entries) = {
            let s = self.state.lock();
            (s.revision, s.entries.clone())
        };
        let sent_ms = unix_now_ms();
        let resp = client
            .sync_entries(pb::SyncEntriesRequest {
                since_revision: since,
                agent_version: tessera_svc::version::CURRENT.into(),
            })
            .await
            .map_err(ClientError::refused(CALL))?
            .into_inner();
        if resp.server_time_ms != 0 {
            // The server read its clock about halfway through the round trip.
            let midpoint = sent_ms + (unix_now_ms() - sent_ms) / 2;
            self.metrics.clock_skew_ms.store(resp.server_time_ms - midpoint, Ordering::Relaxed);
            self.observed.skew_measured.store(true, Ordering::Relaxed);
        }
        for id in &resp.removed_ids {
            entries.remove(id);
        }
        for e in &resp.upserted {
            match AgentEntry::from_pb(e) {
                Ok(a) => {
                    entries.insert(a.id.clone(), a);
                }
                Err(err) => warn!(entry_id = %e.id, error = %err, "Ignoring an entry the agent cannot parse"),
            }
        }
        if entries_digest(&entries) != resp.authorized_digest {
            debug!("Entry digest differs after the delta; doing a full sync");
            let full = client
                .sync_entries(pb::SyncEntriesRequest {
                    since_revision: 0,
                    agent_version: tessera_svc::version::CURRENT.into(),
                })
                .await
                .map_err(ClientError::refused(CALL))?
                .into_inner();
            entries =
                full.upserted.iter().filter_map(|e| AgentEntry::from_pb(e).ok()).map(|e| (e.id.clone(), e)).collect();
        }
        Ok(EntrySync { entries, revision: resp.revision, tainted_authority_ids: resp.tainted_authority_ids })
    }

    /// Takes the received entries; SVIDs whose entry vanished or whose identity changed are
    /// dropped at once. True when anything changed.
    fn apply_entries(&self, received: &EntrySync) -> bool {
        let mut s = self.state.lock();
        let mut changed = received.entries != s.entries;
        s.revision = received.revision;
        let before = s.svids.len();
        s.svids.retain(|id, svid| received.entries.get(id).is_some_and(|e| e.spiffe_id == svid.entry.spiffe_id));
        changed |= s.svids.len() != before;
        s.entries = received.entries.clone();
        let now = unix_now();
        let mut seen = self.observed.entries.lock();
        seen.retain(|id, _| received.entries.contains_key(id));
        for id in received.entries.keys() {
            seen.entry(id.clone()).or_insert((now, None));
        }
        changed
    }

    /// SVIDs signed by a tainted authority are due now (returned), and so is the agent's
    /// own (renewed here, and `client` reconnected with it).
    async fn apply_taints(
        &self,
        tainted_ids: &[String],
        client: &mut AgentClient<Channel>,
    ) -> Result<std::collections::HashSet<String>, AgentError> {
        let mut force = std::collections::HashSet::new();
        if tainted_ids.is_empty() {
            return Ok(force);
        }
        let tainted = |chain: &[Vec<u8>]| {
            chain
                .first()
                .and_then(|c| tessera_identity::x509::cert_facts(c).ok())
                .and_then(|f| f.authority_key_id)
                .is_some_and(|aki| tainted_ids.contains(&aki))
        };
        let own_tainted = {
            let s = self.state.lock();
            for (id, svid) in &s.svids {
                if tainted(&svid.chain) {
                    warn!(spiffe_id = %svid.entry.spiffe_id, serial = %svid.serial, "SVID signed by a tainted authority; replacing it now");
                    force.insert(id.clone());
                }
            }
            tainted(&s.identity.chain)
        };
        if own_tainted {
            warn!("Agent SVID signed by a tainted authority; renewing it now");
            self.renew_agent().await?;
            *client = self.client().await?;
        }
        Ok(force)
    }

    /// Our bundle (saved to disk, and a reconnection with its roots) and the federated ones.
    /// True when either changed.
    async fn fetch_bundles(&self, client: &mut AgentClient<Channel>) -> Result<bool, AgentError> {
        const CALL: &str = "FetchBundles";
        let b =
            client.fetch_bundles(pb::FetchBundlesRequest {}).await.map_err(ClientError::refused(CALL))?.into_inner();
        let mut changed = false;
        if let Some(own) = b.bundle {
            let own = bundle_from_pb(&own).map_err(|e| ClientError::Malformed { call: CALL, reason: e.to_string() })?;
            let differs = own != *self.state.lock().bundle;
            if differs && !own.x509_authorities.is_empty() {
                save_bundle(&self.files, &own)?;
                info!(sequence = own.sequence_number, roots = own.x509_authorities.len(), "Trust bundle updated");
                let mut s = self.state.lock();
                s.bundle = Arc::new(own);
                s.client = None; // reconnect with the new roots
                changed = true;
            }
        }
        let federated: BTreeMap<TrustDomain, Arc<Bundle>> = b
            .federated_bundles
            .iter()
            .filter_map(|f| bundle_from_pb(f).ok())
            .map(|f| (f.trust_domain.clone(), Arc::new(f)))
            .collect();
        let mut s = self.state.lock();
        if federated != s.federated {
            s.federated = federated;
            changed = true;
        }
        Ok(changed)
    }

    /// Workload SVIDs that are missing, due, forced, or whose entry changed. Entries without
    /// selectors are node aliases (SPIRE's semantics): they authorize children, and no
    /// workload can ever match them, so no SVID is minted for them.
    fn due(&self, now: i64, force: &std::collections::HashSet<String>) -> Vec<AgentEntry> {
        let s = self.state.lock();
        s.entries
            .values()
            .filter(|e| !e.selectors.is_empty())
            .filter(|e| match s.svids.get(&e.id) {
                None => true,
                Some(v) => v.rotate_at <= now || v.entry.revision != e.revision || force.contains(&e.id),
            })
            .cloned()
            .collect()
    }

    /// Publishes a new snapshot to the Workload API, SDS and cert files.
    fn publish(&self) {
        let mut s = self.state.lock();
        s.generation += 1;
        let mut svids: Vec<Arc<WorkloadSvid>> = s.svids.values().cloned().collect();
        svids.sort_by(|a, b| (a.entry.created_at, &a.entry.id).cmp(&(b.entry.created_at, &b.entry.id)));
        let wants_exe_hash =
            s.entries.values().any(|e| e.selectors.iter().any(|x| x.kind == "unix" && x.value.starts_with("sha256:")));
        let snap = Snapshot {
            svids,
            bundle: s.bundle.clone(),
            federated: s.federated.clone(),
            generation: s.generation,
            wants_exe_hash,
        };
        self.tx.send_replace(Arc::new(snap));
    }

    /// One batch: keys made here, CSRs signed by the server, the results kept.
    async fn mint(&self, client: &mut AgentClient<Channel>, batch: &[AgentEntry]) -> Result<bool, AgentError> {
        let mut keys = HashMap::with_capacity(batch.len());
        let mut params = Vec::with_capacity(batch.len());
        for e in batch {
            let key = PrivateKey::generate_ec_p256().map_err(|x| ClientError::Key(x.to_string()))?;
            let csr = tessera_identity::csr::build_csr(&e.spiffe_id, &e.dns_names, &key)
                .map_err(|x| ClientError::Key(x.to_string()))?;
            params.push(pb::X509SvidParams { entry_id: e.id.clone(), csr });
            keys.insert(e.id.clone(), (e.clone(), key));
        }
        let results = client
            .batch_new_x509_svid(pb::BatchNewX509SvidRequest { params })
            .await
            .map_err(ClientError::refused("BatchNewX509Svid"))?
            .into_inner()
            .results;
        let mut issued = Vec::with_capacity(results.len());
        for r in results {
            let Some((entry, key)) = keys.remove(&r.entry_id) else { continue };
            let status = r.status.unwrap_or_default();
            let Some(svid) = r.svid.filter(|_| status.code == 0) else {
                warn!(entry_id = %r.entry_id, spiffe_id = %entry.spiffe_id, code = status.code, message = %status.message, "Server refused an SVID");
                continue;
            };
            let Some(facts) = svid.cert_chain.first().and_then(|c| tessera_identity::x509::cert_facts(c).ok()) else {
                warn!(entry_id = %r.entry_id, "Server sent an unreadable certificate");
                continue;
            };
            // The certificate's notBefore is backdated for clock skew: count the lifetime from
            // receipt.
            let received = unix_now().clamp(facts.not_before, facts.not_after);
            let life = facts.not_after - received;
            let rotate_at = received + life / 2 - jitter(life / 10);
            let ws = WorkloadSvid {
                entry,
                chain: svid.cert_chain,
                key,
                serial: facts.serial,
                not_before: facts.not_before,
                not_after: facts.not_after,
                rotate_at,
            };
            debug!(spiffe_id = %ws.entry.spiffe_id, serial = %ws.serial, rotate_at, "Workload SVID issued");
            self.metrics.svids_issued.fetch_add(1, Ordering::Relaxed);
            issued.push((r.entry_id, Arc::new(ws)));
        }
        let changed = !issued.is_empty();
        self.state.lock().svids.extend(issued);
        Ok(changed)
    }

    /// Renews the agent SVID over a new key, saves it, and drops the connection made with
    /// the old one.
    async fn renew_agent(&self) -> Result<(), AgentError> {
        let mut client = self.client().await?;
        let current = self.state.lock().identity.clone();
        let identity = tessera_agent_api::renew(&mut client, &current, None).await?;
        self.files.save(&identity)?;
        info!(agent_id = %tessera_identity::ids::LogId(&identity.id), not_after = identity.not_after, "Agent SVID renewed");
        let mut s = self.state.lock();
        s.identity = Arc::new(identity);
        s.client = None;
        Ok(())
    }

    /// A JWT-SVID for `entry` and `audience`, from the cache while it is in its first half of
    /// life, else freshly minted by the server. Never waits for a sync pass.
    pub async fn jwt_svid(&self, entry: &AgentEntry, audience: &[String]) -> Result<String, AgentError> {
        let mut aud = audience.to_vec();
        aud.sort();
        aud.dedup();
        let key = (entry.id.clone(), aud.clone());
        let now = unix_now();
        {
            let mut cache = self.jwt_cache.lock();
            if let Some(token) = cache.get(&key, now) {
                return Ok(token);
            }
            if !cache.spend(&entry.id) {
                return Err(AgentError::JwtBudget(entry.spiffe_id.clone()));
            }
        }
        let mut client = self.client().await?;
        let r = client
            .new_jwt_svid(pb::NewJwtSvidRequest { entry_id: entry.id.clone(), audience: aud })
            .await
            .map_err(ClientError::refused("NewJwtSvid"))?
            .into_inner();
        let c = CachedJwt { token: r.token.clone(), issued_at: r.issued_at, expires_at: r.expires_at, used: 0 };
        self.jwt_cache.lock().put(key, c, now);
        Ok(r.token)
    }

    /// JWT-SVIDs held in the cache.
    pub fn cached_jwt_svids(&self) -> usize {
        self.jwt_cache.lock().len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn jwt(exp: i64) -> CachedJwt {
        CachedJwt { token: "t".into(), issued_at: 0, expires_at: exp, used: 0 }
    }

    /// F7 of the second review: one workload asking for ever-new audiences neither grows the
    /// cache without bound nor spends other workloads' minting budget.
    #[test]
    fn the_jwt_cache_is_bounded_and_each_entry_has_its_own_budget() {
        let mut c = JwtCache::default();
        for i in 0..10_000 {
            c.put(("greedy".into(), vec![format!("aud-{i}")]), jwt(1_000), 0);
        }
        assert_eq!(c.len(), JWT_CACHE_PER_ENTRY, "one entry filled the cache");
        c.put(("other".into(), vec!["a".into()]), jwt(1_000), 0);
        assert!(c.get(&("other".into(), vec!["a".into()]), 1).is_some());
        for i in 0..JWT_CACHE_TOTAL * 2 {
            c.put((format!("e{}", i % 200), vec![format!("aud-{i}")]), jwt(1_000), 0);
        }
        assert!(c.len() <= JWT_CACHE_TOTAL);
        // Budgets: the greedy entry runs dry, another entry is untouched.
        let spent = (0..1000).take_while(|_| c.spend("greedy")).count();
        assert!((50..=60).contains(&spent), "{spent}");
        assert!(!c.spend("greedy"));
        assert!(c.spend("quiet"), "a quiet entry paid for the greedy one");
    }

    #[test]
    fn notice_budget_allows_a_burst_then_one_sync_a_second() {
        let t0 = tokio::time::Instant::now();
        let mut b = NoticeBudget::new(t0);
        for _ in 0..5 {
            assert_eq!(b.spend(t0), t0, "a burst of five starts at once");
        }
        // The sixth and seventh wait one and two seconds.
        assert_eq!(b.spend(t0), t0 + Duration::from_secs(1));
        assert_eq!(b.spend(t0), t0 + Duration::from_secs(2));
        // Steady churn after that: one a second.
        let t = t0 + Duration::from_secs(2);
        assert_eq!(b.spend(t), t + Duration::from_secs(1));
        // After a quiet minute the full burst is back, and no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(b.spend(later), later);
        }
        assert!(b.spend(later) > later);
    }
}
