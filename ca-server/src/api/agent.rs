//! The Agent API: node attestation, agent SVID renewal, entry sync, batch X509-SVID signing,
//! JWT-SVID minting and bundles. Every call but `AttestAgent` requires the caller's agent SVID
//! as TLS client certificate; the server signs only for entries the calling agent is
//! authorized for (entries parented to it, or to one of its node aliases, transitively).
//! `MintDownstreamX509Ca` serves a downstream Tessera server (nested upstream) that runs with
//! an agent identity and a `downstream` entry. `WatchChanges` tells a connected agent when to
//! sync ([`crate::changes`]).

use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tessera_identity::ids::{LogId, redact_join_token};
use tessera_identity::{SpiffeId, unix_now};
use tessera_proto::agent::v1 as pb;
use tessera_proto::agent::v1::agent_server::Agent;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, instrument, warn};

use super::convert::{bundle_to_pb, entry_to_pb};
use super::limits::RateLimiter;
use super::{ApiError, Shared};
use crate::config::Config;
use tessera_ca::{Issuance, X509Request};
use tessera_plugins::NodeAttestor;
use tessera_store::{AgentRecord, AuditKind, Entry};

/// How often an open `WatchChanges` stream checks that its agent is still attested.
const WATCH_RECHECK: Duration = Duration::from_secs(30);

/// How deep node-alias chains are followed.
const MAX_ALIAS_DEPTH: usize = 8;
/// Most entry changes an incremental sync replays; an agent further behind gets a full
/// answer instead.
const MAX_SYNC_REPLAY: usize = 10_000;

/// The Agent API service.
#[derive(Debug, Clone)]
pub struct AgentService {
    issuance: Issuance,
    metrics: Arc<crate::metrics::Metrics>,
    changes: crate::changes::ChangeFeed,
    activity: Arc<super::AgentActivity>,
    cfg: Arc<Config>,
    attestors: Arc<Vec<Arc<dyn NodeAttestor>>>,
    svid_limit: Arc<RateLimiter<SpiffeId>>,
    /// JWT-SVIDs have a budget of their own, so that a workload asking for many audiences
    /// cannot starve its node's X.509 signing.
    jwt_limit: Arc<RateLimiter<SpiffeId>>,
    /// Agent renewals too: heavy signing must not keep an agent from renewing itself.
    renew_limit: Arc<RateLimiter<SpiffeId>>,
    attest_limit: Arc<RateLimiter<std::net::IpAddr>>,
    /// Registered entries per agent at a store revision, for syncs that bring nothing new.
    quiet: Arc<super::quiet::QuietSyncs>,
}

/// The system clock in Unix milliseconds (what agents measure their skew against).
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The registered entries `agent` may obtain, following node aliases (entries under entries)
/// up to [`MAX_ALIAS_DEPTH`] levels.
async fn registered_entries(
    store: &dyn tessera_store::Store,
    agent: &SpiffeId,
) -> Result<BTreeMap<String, Entry>, tessera_store::StoreError> {
    let mut out = BTreeMap::new();
    let mut seen: HashSet<SpiffeId> = HashSet::from([agent.clone()]);
    let mut frontier = vec![agent.clone()];
    for _ in 0..MAX_ALIAS_DEPTH {
        let mut next = Vec::new();
        for parent in &frontier {
            for e in store.entries_by_parent(parent).await? {
                if seen.insert(e.spiffe_id.clone()) {
                    next.push(e.spiffe_id.clone());
                }
                out.insert(e.id.clone(), e);
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    Ok(out)
}

/// The parents an entry change must name to concern `agent`: the agent itself and every
/// registered entry its authorized set hangs under.
async fn parents_of(
    store: &dyn tessera_store::Store,
    agent: &SpiffeId,
) -> Result<HashSet<SpiffeId>, tessera_store::StoreError> {
    let entries = registered_entries(store, agent).await?;
    Ok(std::iter::once(agent.clone()).chain(entries.into_values().map(|e| e.spiffe_id)).collect())
}

/// One `WatchChanges` stream's state.
struct Watch {
    rx: tokio::sync::watch::Receiver<crate::changes::Feed>,
    first: bool,
    store: Arc<dyn tessera_store::Store>,
    id: SpiffeId,
    serial: String,
    /// The generation of the last notice looked at.
    last: u64,
    /// What an entry change must name to concern this agent.
    parents: HashSet<SpiffeId>,
    changes: crate::changes::ChangeFeed,
}

/// Refuses an agent outside the version-skew policy, in words that say what to upgrade.
fn check_version(agent_version: &str) -> Result<(), ApiError> {
    tessera_svc::version::check_agent(agent_version, tessera_svc::version::Version::current())
        .map_err(|e| ApiError::FailedPrecondition(e.to_string()))
}

/// An authenticated calling agent.
struct Caller {
    id: SpiffeId,
    record: AgentRecord,
    /// Hex serial of the SVID the caller presented.
    serial: String,
}

impl AgentService {
    /// A service over the shared issuance path.
    pub fn new(shared: Shared, cfg: Arc<Config>, attestors: Vec<Arc<dyn NodeAttestor>>) -> Self {
        let Shared { issuance, metrics, changes, activity } = shared;
        // A second's worth of SVIDs, and never less than one full batch, may come at once.
        let svid_rate = cfg.rate_limit_svids_per_second;
        let svid_limit = RateLimiter::new(svid_rate, svid_rate.max(cfg.max_batch_size as f64));
        let jwt_limit = RateLimiter::new(svid_rate, svid_rate.max(1.0));
        let renew_limit = RateLimiter::new(svid_rate, svid_rate.max(1.0));
        let attest_rate = cfg.rate_limit_attestations_per_minute / 60.0;
        let attest_limit = RateLimiter::new(attest_rate, cfg.rate_limit_attestations_per_minute.max(1.0));
        Self {
            issuance,
            metrics,
            changes,
            activity,
            cfg,
            attestors: Arc::new(attestors),
            svid_limit: Arc::new(svid_limit),
            jwt_limit: Arc::new(jwt_limit),
            renew_limit: Arc::new(renew_limit),
            attest_limit: Arc::new(attest_limit),
            quiet: Arc::default(),
        }
    }

    /// Spends `n` SVIDs of the caller's signing budget, or refuses the call.
    async fn spend_svids(&self, caller: &SpiffeId, n: usize) -> Result<(), ApiError> {
        self.spend(&self.svid_limit, caller, n).await
    }

    /// Spends `n` from `limit`'s bucket for `caller`, or refuses (and audits) the call.
    async fn spend(&self, limit: &RateLimiter<SpiffeId>, caller: &SpiffeId, n: usize) -> Result<(), ApiError> {
        if limit.check(caller, n as f64) {
            return Ok(());
        }
        self.metrics.rate_limited_svids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let e = ApiError::ResourceExhausted(format!(
            "agent {} is over its signing rate limit ({} SVIDs/s); retry later",
            LogId(caller),
            self.cfg.rate_limit_svids_per_second
        ));
        self.issuance.deny(caller, &caller.to_string(), &e).await;
        Err(e)
    }

    /// Authenticates the caller from its TLS client certificate and the agent record.
    async fn caller<T>(&self, req: &Request<T>) -> Result<Caller, ApiError> {
        let certs = req.extensions().get::<super::tls::PeerCerts>().and_then(|p| p.0.clone()).ok_or_else(|| {
            ApiError::Unauthenticated("this call requires the agent's SVID as TLS client certificate".into())
        })?;
        let leaf = certs.first().ok_or_else(|| ApiError::Unauthenticated("no client certificate".into()))?;
        let facts = tessera_identity::x509::cert_facts(leaf).map_err(|e| ApiError::Unauthenticated(e.to_string()))?;
        let id =
            facts.spiffe_id().ok_or_else(|| ApiError::Unauthenticated("client certificate has no SPIFFE ID".into()))?;
        if !tessera_identity::ids::is_agent_id(&id, self.issuance.ca.trust_domain()) {
            return Err(ApiError::PermissionDenied(format!("{} is not an agent of this trust domain", LogId(&id))));
        }
        let record = self.issuance.store.get_agent(&id).await?.ok_or_else(|| {
            ApiError::Evicted(format!("agent {} is not attested (evicted?); it must attest again", LogId(&id)))
        })?;
        if record.banned {
            return Err(ApiError::PermissionDenied(format!("agent {} is banned", LogId(&id))));
        }
        if facts.serial != record.serial && facts.serial != record.previous_serial {
            return Err(ApiError::PermissionDenied(format!(
                "agent {} presented an SVID that is no longer current",
                LogId(&id)
            )));
        }
        Ok(Caller { id, record, serial: facts.serial })
    }

    /// Entries the agent may obtain SVIDs for, by ID: registered ones and those its
    /// attestation implies.
    async fn authorized(&self, caller: &Caller) -> Result<BTreeMap<String, Entry>, ApiError> {
        let mut out = self.registered(&caller.id).await?;
        for e in self.implied(caller).await {
            out.entry(e.id.clone()).or_insert(e);
        }
        Ok(out)
    }

    /// The entries the agent's attestation implies (none when its attestor implies none, or
    /// when the cluster cannot be asked: registered entries still work then).
    async fn implied(&self, caller: &Caller) -> Vec<Entry> {
        let Some(a) = self.attestors.iter().find(|a| a.kind() == caller.record.attestation_type) else {
            return Vec::new();
        };
        match a.implied_entries(&caller.record, self.issuance.ca.trust_domain()).await {
            Ok(implied) => implied,
            Err(e) => {
                tracing::warn!(agent_id = %LogId(&caller.id), error = %e, "Cannot derive implied entries; using registered entries only");
                Vec::new()
            }
        }
    }

    /// The digest of what the agent may obtain, for a sync that brings nothing new: its
    /// registered entries as remembered at the store's entry `revision` (read from the store
    /// when not), and those its attestation implies, merged as [`Self::authorized`] does.
    async fn quiet_digest(&self, caller: &Caller, revision: u64) -> Result<Vec<u8>, ApiError> {
        let registered = match self.quiet.get(&caller.id, revision) {
            Some(r) => r,
            None => {
                let r: super::quiet::Registered =
                    self.registered(&caller.id).await?.into_iter().map(|(id, e)| (id, e.revision)).collect();
                self.quiet.put(&caller.id, revision, r.clone());
                r
            }
        };
        let mut all: BTreeMap<&str, u64> = registered.iter().map(|(id, rev)| (id.as_str(), *rev)).collect();
        let implied = self.implied(caller).await;
        for e in &implied {
            all.entry(e.id.as_str()).or_insert(e.revision);
        }
        Ok(tessera_identity::authorized_digest(all))
    }

    /// Registered entries the agent may obtain SVIDs for, by ID.
    async fn registered(&self, agent: &SpiffeId) -> Result<BTreeMap<String, Entry>, ApiError> {
        Ok(registered_entries(self.issuance.store.as_ref(), agent).await?)
    }

    /// Writes an agent record if it still has revision `expected` (`None`: still absent).
    /// Refuses (and audits) the request when it changed underneath: the ban, eviction or
    /// other write that got there first stands.
    async fn store_agent(&self, record: &AgentRecord, expected: Option<u64>, what: &str) -> Result<(), ApiError> {
        let store = &self.issuance.store;
        if store.compare_and_put_agent(record, expected).await?.is_some() {
            return Ok(());
        }
        let id = &record.spiffe_id;
        let e = match store.get_agent(id).await? {
            Some(now) if now.banned => ApiError::PermissionDenied(format!("agent {} is banned", LogId(id))),
            None if expected.is_some() => {
                ApiError::Evicted(format!("agent {} was evicted during its {what}; it must attest again", LogId(id)))
            }
            _ => ApiError::FailedPrecondition(format!(
                "agent {} changed during its {what} (another attestation or renewal got there first); retry",
                LogId(id)
            )),
        };
        self.issuance.deny(id, &id.to_string(), &e).await;
        Err(e)
    }

    async fn sign_agent_svid(
        &self,
        id: &SpiffeId,
        csr: Vec<u8>,
        caller: &str,
        kind: AuditKind,
    ) -> Result<tessera_ca::IssuedX509, ApiError> {
        let req = X509Request { spiffe_id: id, dns_names: &[], ttl: Some(self.cfg.agent_svid_ttl), caller, kind };
        self.issuance.x509(req, csr).await
    }
}

/// The digest of the authorized set (see [`tessera_identity::authorized_digest`]).
pub fn authorized_digest(entries: &BTreeMap<String, Entry>) -> Vec<u8> {
    tessera_identity::authorized_digest(entries.iter().map(|(id, e)| (id.as_str(), e.revision)))
}

fn svid_pb(spiffe_id: &SpiffeId, issued: &tessera_ca::IssuedX509) -> tessera_proto::types::v1::X509Svid {
    tessera_proto::types::v1::X509Svid {
        spiffe_id: spiffe_id.to_string(),
        cert_chain: issued.chain.clone(),
        expires_at: issued.not_after,
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    #[instrument(skip_all, name = "AttestAgent")]
    async fn attest_agent(
        &self,
        req: Request<pb::AttestAgentRequest>,
    ) -> Result<Response<pb::AttestAgentResponse>, Status> {
        let ip = req.extensions().get::<super::tls::PeerCerts>().and_then(|p| p.1);
        if let Some(ip) = ip
            && !self.attest_limit.check(&ip, 1.0)
        {
            self.metrics.rate_limited_attestations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.metrics.attestations.failed(&ApiError::ResourceExhausted(String::new()));
            return Err(ApiError::ResourceExhausted(format!(
                "too many attestation attempts from {ip} ({}/min); retry later",
                self.cfg.rate_limit_attestations_per_minute
            ))
            .into());
        }
        let r = req.into_inner();
        check_version(&r.agent_version)?;
        let data = r.data.ok_or_else(|| ApiError::InvalidArgument("attestation data is required".into()))?;
        let attestor = self.attestors.iter().find(|a| a.kind() == data.r#type).ok_or_else(|| {
            let known: Vec<&str> = self.attestors.iter().map(|a| a.kind()).collect();
            ApiError::InvalidArgument(format!(
                "unsupported attestation type {:?} (this server accepts: {})",
                data.r#type,
                known.join(", ")
            ))
        })?;
        let td = self.issuance.ca.trust_domain();
        let id = attestor.identify(td, &data.payload).map_err(ApiError::from)?;
        // Check the CSR before consuming anything: bad input must change nothing.
        tessera_identity::csr::CheckedCsr::from_der(&r.csr)
            .and_then(|c| c.check_names(&id, &[]))
            .map_err(ApiError::from)?;
        let existing = self.issuance.store.get_agent(&id).await.map_err(ApiError::from)?;
        // Refusals before the attestor has proven the claim are logged and counted, not
        // audited: the ID is only what the caller claims, and anyone able to reach the port
        // must not be able to write to the audit chain.
        if existing.as_ref().is_some_and(|a| a.banned) {
            let e = ApiError::PermissionDenied(format!("agent {} is banned", LogId(&id)));
            self.metrics.attestations.failed(&e);
            warn!(agent_id = %LogId(&id), reason = %e, "Attestation refused");
            return Err(e.into());
        }
        // The record is written below only if it is still what was read here: a ban or an
        // eviction that lands while the attestor and the CA work is not undone.
        let expected = existing.map(|a| a.revision);
        let now = unix_now();
        let selectors = match attestor.verify(self.issuance.store.as_ref(), &data.payload).await {
            Ok(s) => s,
            Err(e) => {
                let e = ApiError::from(e);
                self.metrics.attestations.failed(&e);
                warn!(agent_id = %LogId(&id), reason = %redact_join_token(&e.to_string()), "Attestation refused");
                return Err(e.into());
            }
        };
        let issued = self.sign_agent_svid(&id, r.csr, "attestor", AuditKind::AgentAttested).await?;
        let record = AgentRecord {
            spiffe_id: id.clone(),
            attestation_type: attestor.kind().into(),
            serial: issued.serial.clone(),
            previous_serial: String::new(),
            expires_at: issued.not_after,
            banned: false,
            selectors,
            attested_at: now,
            renewed_at: 0,
            revision: 0,
            version: r.agent_version.clone(),
        };
        if let Err(e) = self.store_agent(&record, expected, "attestation").await {
            self.metrics.attestations.failed(&e);
            return Err(e.into());
        }
        self.metrics.attestations.ok();
        info!(agent_id = %LogId(&id), "Agent attested");
        Ok(Response::new(pb::AttestAgentResponse {
            svid: Some(svid_pb(&id, &issued)),
            bundle: Some(bundle_to_pb(&self.issuance.ca.bundle())),
        }))
    }

    #[instrument(skip_all, name = "RenewAgent")]
    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let caller = self.caller(&req).await?;
        // Renewals are rate-limited per agent like signing, from a bucket of their own.
        self.spend(&self.renew_limit, &caller.id, 1).await?;
        let r = req.into_inner();
        check_version(&r.agent_version)?;
        let issued = self.sign_agent_svid(&caller.id, r.csr, &caller.id.to_string(), AuditKind::AgentRenewed).await?;
        let mut record = caller.record;
        let expected = record.revision;
        // The SVID that stays valid during the switch is the one the agent presented: if the
        // answer of an earlier renewal never reached it (or was not made durable), its SVID
        // must keep working, or two such failures would lock it out.
        record.serial = issued.serial.clone();
        record.previous_serial = caller.serial;
        record.expires_at = issued.not_after;
        record.renewed_at = unix_now();
        record.version = r.agent_version;
        // Conditional on the revision `caller()` read: if the agent was banned, evicted or
        // renewed in between, the new SVID is not stored and not sent (it authenticates
        // nothing: the Agent API accepts only the serials in the record).
        self.store_agent(&record, Some(expected), "renewal").await?;
        Ok(Response::new(pb::RenewAgentResponse { svid: Some(svid_pb(&caller.id, &issued)) }))
    }

    #[instrument(skip_all, name = "SyncEntries")]
    async fn sync_entries(
        &self,
        req: Request<pb::SyncEntriesRequest>,
    ) -> Result<Response<pb::SyncEntriesResponse>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        check_version(&r.agent_version)?;
        self.activity.reported_version(&caller.id, &r.agent_version);
        let since = r.since_revision;
        // The changes (or, for a full sync, just the newest revision) are read before the
        // authorized set, so that nothing written in between is missed.
        let limit = if since == 0 { 0 } else { MAX_SYNC_REPLAY };
        let changes = self.issuance.store.entry_changes(since, limit).await.map_err(ApiError::from)?;
        let mut resp = pb::SyncEntriesResponse {
            revision: changes.revision,
            upserted: vec![],
            removed_ids: vec![],
            authorized_digest: vec![],
            tainted_authority_ids: self.issuance.ca.tainted_authority_ids(),
            server_time_ms: unix_now_ms(),
        };
        self.activity.synced(&caller.id, tessera_identity::unix_now());
        if since != 0 && !changes.truncated && changes.changed.is_empty() && changes.deleted.is_empty() {
            // Nothing new: the answer is the digest alone.
            resp.authorized_digest = self.quiet_digest(&caller, changes.revision).await?;
            return Ok(Response::new(resp));
        }
        let authorized = self.authorized(&caller).await?;
        resp.authorized_digest = authorized_digest(&authorized);
        if since == 0 || changes.truncated {
            // A full answer. After a truncated replay the agent's merge leaves a digest that
            // differs when it held something it should drop, and it asks again from 0.
            resp.upserted = authorized.values().map(entry_to_pb).collect();
        } else {
            // Only what concerns this agent: its authorized entries that changed, and the
            // deletions of entries that hung under it (or its aliases). An entry that moved
            // away shows as a digest mismatch, and the agent does a full sync.
            let parents: HashSet<&SpiffeId> =
                std::iter::once(&caller.id).chain(authorized.values().map(|e| &e.spiffe_id)).collect();
            for e in &changes.changed {
                if let Some(a) = authorized.get(&e.id) {
                    resp.upserted.push(entry_to_pb(a));
                }
            }
            for d in changes.deleted {
                if d.parent_id.as_ref().is_some_and(|p| parents.contains(p)) {
                    resp.removed_ids.push(d.id);
                }
            }
        }
        Ok(Response::new(resp))
    }

    #[instrument(skip_all, name = "BatchNewX509Svid")]
    async fn batch_new_x509_svid(
        &self,
        req: Request<pb::BatchNewX509SvidRequest>,
    ) -> Result<Response<pb::BatchNewX509SvidResponse>, Status> {
        let caller = self.caller(&req).await?;
        let params = req.into_inner().params;
        if params.is_empty() {
            return Err(ApiError::InvalidArgument("empty batch".into()).into());
        }
        if params.len() > self.cfg.max_batch_size {
            return Err(ApiError::ResourceExhausted(format!(
                "batch of {} is over the limit of {}",
                params.len(),
                self.cfg.max_batch_size
            ))
            .into());
        }
        self.spend_svids(&caller.id, params.len()).await?;
        let authorized = self.authorized(&caller).await?;
        let caller_s = caller.id.to_string();
        let mut results = Vec::with_capacity(params.len());
        for p in params {
            let outcome = match authorized.get(&p.entry_id) {
                None => {
                    let e =
                        ApiError::PermissionDenied(format!("entry {:?} is not authorized for this agent", p.entry_id));
                    if let Some(entry) = self.issuance.store.get_entry(&p.entry_id).await.ok().flatten() {
                        self.issuance.deny(&entry.spiffe_id, &caller_s, &e).await;
                    }
                    self.metrics.issuance.x509.failed(&e);
                    Err(e)
                }
                Some(entry) => {
                    let ttl = (entry.x509_svid_ttl > 0).then(|| Duration::from_secs(u64::from(entry.x509_svid_ttl)));
                    let req = X509Request {
                        spiffe_id: &entry.spiffe_id,
                        dns_names: &entry.dns_names,
                        ttl,
                        caller: &caller_s,
                        kind: AuditKind::X509Svid,
                    };
                    self.issuance.x509(req, p.csr).await.map(|i| svid_pb(&entry.spiffe_id, &i))
                }
            };
            results.push(match outcome {
                Ok(svid) => pb::X509SvidResult {
                    entry_id: p.entry_id,
                    svid: Some(svid),
                    status: Some(pb::ItemStatus { code: 0, message: String::new() }),
                },
                Err(e) => pb::X509SvidResult {
                    entry_id: p.entry_id,
                    svid: None,
                    status: Some(pb::ItemStatus { code: e.code() as i32, message: e.public_message() }),
                },
            });
        }
        Ok(Response::new(pb::BatchNewX509SvidResponse { results }))
    }

    #[instrument(skip_all, name = "NewJwtSvid")]
    async fn new_jwt_svid(
        &self,
        req: Request<pb::NewJwtSvidRequest>,
    ) -> Result<Response<pb::NewJwtSvidResponse>, Status> {
        let caller = self.caller(&req).await?;
        self.spend(&self.jwt_limit, &caller.id, 1).await?;
        let r = req.into_inner();
        let authorized = self.authorized(&caller).await?;
        let entry = authorized.get(&r.entry_id).ok_or_else(|| {
            ApiError::PermissionDenied(format!("entry {:?} is not authorized for this agent", r.entry_id))
        })?;
        let ttl = (entry.jwt_svid_ttl > 0).then(|| Duration::from_secs(u64::from(entry.jwt_svid_ttl)));
        let jwt = self.issuance.jwt::<ApiError>(&entry.spiffe_id, r.audience, ttl, &caller.id.to_string()).await?;
        Ok(Response::new(pb::NewJwtSvidResponse {
            token: jwt.token,
            spiffe_id: entry.spiffe_id.to_string(),
            issued_at: jwt.issued_at,
            expires_at: jwt.expires_at,
        }))
    }

    #[instrument(skip_all, name = "FetchBundles")]
    async fn fetch_bundles(
        &self,
        req: Request<pb::FetchBundlesRequest>,
    ) -> Result<Response<pb::FetchBundlesResponse>, Status> {
        let caller = self.caller(&req).await?;
        let authorized = self.authorized(&caller).await?;
        let wanted: HashSet<_> = authorized.values().flat_map(|e| e.federates_with.iter().cloned()).collect();
        let mut federated = Vec::new();
        for td in wanted {
            if let Some(b) = self.issuance.store.get_bundle(&td).await.map_err(ApiError::from)? {
                federated.push(bundle_to_pb(&b));
            }
        }
        Ok(Response::new(pb::FetchBundlesResponse {
            bundle: Some(bundle_to_pb(&self.issuance.ca.bundle())),
            federated_bundles: federated,
        }))
    }

    type WatchChangesStream = Pin<Box<dyn Stream<Item = Result<pb::WatchChangesResponse, Status>> + Send>>;

    #[instrument(skip_all, name = "WatchChanges")]
    async fn watch_changes(
        &self,
        req: Request<pb::WatchChangesRequest>,
    ) -> Result<Response<Self::WatchChangesStream>, Status> {
        let caller = self.caller(&req).await?;
        let rx = self.changes.subscribe();
        let store = self.issuance.store.clone();
        let parents = parents_of(store.as_ref(), &caller.id).await.map_err(ApiError::from)?;
        let last = rx.borrow().generation;
        // The current generation at once, then one message per change that concerns this
        // agent (its scope reaches the agent's parents, or it is a bundle change, or the
        // stream missed a generation and cannot tell); a burst that comes faster than the agent
        // reads is one message. The stream ends when the server stops, and, because it would
        // otherwise hold its connection open, when the agent is banned or evicted or its SVID
        // is replaced: checked on every change and every 30 s.
        let state = Watch {
            rx,
            first: true,
            store,
            id: caller.id,
            serial: caller.serial,
            last,
            parents,
            changes: self.changes.clone(),
        };
        let notices = futures_util::stream::unfold(state, |mut w| async move {
            if !w.first {
                loop {
                    let changed = tokio::select! {
                        c = w.rx.changed() => { if c.is_err() { return None } true }
                        _ = tokio::time::sleep(WATCH_RECHECK) => false,
                    };
                    let current = match w.store.get_agent(&w.id).await {
                        Ok(Some(r)) => !r.banned && (r.serial == w.serial || r.previous_serial == w.serial),
                        Ok(None) => false,
                        Err(_) => true, // a store outage is not a ban: keep the stream
                    };
                    if !current {
                        let e = ApiError::PermissionDenied(format!(
                            "agent {} is no longer attested with this SVID (banned, evicted or renewed)",
                            LogId(&w.id)
                        ));
                        w.serial = String::new();
                        return Some((Err(e.into()), w));
                    }
                    if !changed {
                        continue;
                    }
                    let feed = w.rx.borrow_and_update().clone();
                    if feed.closed {
                        return None;
                    }
                    let missed = feed.generation != w.last.wrapping_add(1);
                    w.last = feed.generation;
                    if missed || feed.scope.reaches(&w.parents) {
                        // What it hangs under may have changed with this very notice.
                        if let Ok(p) = parents_of(w.store.as_ref(), &w.id).await {
                            w.parents = p;
                        }
                        w.changes.count(true);
                        break;
                    }
                    w.changes.count(false);
                }
            }
            if w.serial.is_empty() {
                return None;
            }
            if w.first {
                let feed = w.rx.borrow_and_update().clone();
                if feed.closed {
                    return None;
                }
                w.last = feed.generation;
                w.first = false;
            }
            let generation = w.last;
            Some((Ok(pb::WatchChangesResponse { generation }), w))
        });
        Ok(Response::new(Box::pin(notices)))
    }

    type MintDownstreamX509CaStream = ReceiverStream<Result<pb::MintDownstreamX509CaResponse, Status>>;

    #[instrument(skip_all, name = "MintDownstreamX509Ca")]
    async fn mint_downstream_x509_ca(
        &self,
        req: Request<pb::MintDownstreamX509CaRequest>,
    ) -> Result<Response<Self::MintDownstreamX509CaStream>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let authorized = self.authorized(&caller).await?;
        let Some(entry) = authorized.values().find(|e| e.downstream) else {
            let e = ApiError::PermissionDenied(format!(
                "agent {} has no downstream entry; create one with `entry create --downstream`",
                LogId(&caller.id)
            ));
            self.issuance.deny(&caller.id, &caller.id.to_string(), &e).await;
            return Err(e.into());
        };
        let ttl = Duration::from_secs(u64::try_from(r.preferred_ttl_seconds).unwrap_or(0).max(60));
        let ca = self.issuance.ca.clone();
        let signed = tokio::task::spawn_blocking(move || ca.sign_downstream_ca(&r.csr, ttl))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(ApiError::from);
        let issued = match signed {
            Ok(i) => i,
            Err(e) => {
                self.issuance.deny(&entry.spiffe_id, &caller.id.to_string(), &e).await;
                return Err(e.into());
            }
        };
        self.issuance
            .audit(
                AuditKind::CaIssued,
                &entry.spiffe_id,
                &issued.serial,
                issued.not_after,
                &caller.id.to_string(),
                "downstream CA",
            )
            .await
            .map_err(ApiError::from)?;
        info!(downstream = %entry.spiffe_id, agent = %LogId(&caller.id), serial = %issued.serial, "Signed a downstream CA");
        let roots = |b: &tessera_identity::Bundle| b.x509_authorities.iter().map(|c| c.to_vec()).collect::<Vec<_>>();
        let mut bundle_rx = self.issuance.ca.subscribe_bundle();
        let mut last = roots(&bundle_rx.borrow_and_update());
        let first = pb::MintDownstreamX509CaResponse { x509_ca_chain: issued.chain, upstream_x509_roots: last.clone() };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(Ok(first)).await.map_err(|_| Status::cancelled("the downstream server went away"))?;
        // Root updates: our X.509 authorities whenever the bundle changes.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = bundle_rx.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                }
                let now = roots(&bundle_rx.borrow_and_update());
                if now != last {
                    last.clone_from(&now);
                    let m = pb::MintDownstreamX509CaResponse { x509_ca_chain: vec![], upstream_x509_roots: now };
                    if tx.send(Ok(m)).await.is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
