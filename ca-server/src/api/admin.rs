//! The Admin API, served only on the local Unix socket (mode 0600): registration entries,
//! join tokens, bundles, minting, local authority rotation, agents and the audit log.

use std::sync::Arc;
use std::time::Duration;

use tessera_identity::ids::{parse_member_id, parse_spiffe_id, parse_trust_domain};
use tessera_identity::{agent_id, unix_now};
use tessera_proto::admin::v1 as pb;
use tessera_proto::admin::v1::admin_server::Admin;
use tessera_proto::types::v1 as types;
use tonic::{Request, Response, Status};
use tracing::{info, instrument};

use super::convert::{
    agent_to_pb, bundle_from_pb, bundle_to_pb, entry_from_pb, entry_to_pb, federation_from_pb, federation_to_pb,
    selector_from_pb,
};
use super::{ApiError, Shared};
use crate::config::Config;
use crate::federation::{Federation, Refreshed};
use tessera_ca::{Issuance, X509Request};
use tessera_store::{AuditKind, FederationRelationship, JoinToken, verify_audit};

/// The Admin API service.
#[derive(Debug, Clone)]
pub struct AdminService {
    issuance: Issuance,
    changes: crate::changes::ChangeFeed,
    cfg: Arc<Config>,
    federation: Arc<Federation>,
    diagnostics: Arc<crate::doctor::Diagnostics>,
}

/// Most entries one `BatchCreateEntry` call creates.
const MAX_ENTRY_BATCH: usize = 1000;

/// What makes two entries the same registration: SPIFFE ID, parent, selectors.
fn natural_key(e: &tessera_store::Entry) -> (String, String, Vec<String>) {
    let mut sel: Vec<String> = e.selectors.iter().map(ToString::to_string).collect();
    sel.sort();
    (e.spiffe_id.to_string(), e.parent_id.to_string(), sel)
}

/// The page of `items` (sorted by `key`) after `token`, at most `size` long (0: all), and the
/// token of the next page.
fn page<T>(mut items: Vec<T>, key: impl Fn(&T) -> String, size: u32, token: &str) -> (Vec<T>, String) {
    items.sort_by_cached_key(&key);
    if !token.is_empty() {
        items.retain(|i| key(i).as_str() > token);
    }
    if size == 0 || items.len() <= size as usize {
        return (items, String::new());
    }
    items.truncate(size as usize);
    let next = items.last().map(&key).unwrap_or_default();
    (items, next)
}

/// 128 random bits as 32 hex characters.
fn random_id() -> Result<String, ApiError> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; 16];
    SystemRandom::new().fill(&mut b).map_err(|_| ApiError::Internal("random generator failed".into()))?;
    Ok(tessera_identity::x509::hex_lower(&b))
}

fn ttl_arg(field: &str, secs: i64, max: Duration) -> Result<Option<Duration>, ApiError> {
    match secs {
        0 => Ok(None),
        s if s < 0 => Err(ApiError::InvalidArgument(format!("{field} must not be negative"))),
        s if s.unsigned_abs() > max.as_secs() => {
            Err(ApiError::InvalidArgument(format!("{field} {s}s is over the server's maximum of {}s", max.as_secs())))
        }
        s => Ok(Some(Duration::from_secs(s.unsigned_abs()))),
    }
}

impl AdminService {
    /// A service over the shared issuance path.
    pub fn new(
        shared: Shared,
        cfg: Arc<Config>,
        federation: Arc<Federation>,
        diagnostics: Arc<crate::doctor::Diagnostics>,
    ) -> Self {
        Self { issuance: shared.issuance, changes: shared.changes, cfg, federation, diagnostics }
    }

    /// An agent as the Admin API shows it: its record, with the version it last reported to
    /// this replica.
    fn agent_pb(&self, a: &tessera_store::AgentRecord) -> pb::Agent {
        pb::Agent { version: self.diagnostics.activity.version_of(a), ..agent_to_pb(a) }
    }

    async fn relationship(&self, td: &tessera_identity::TrustDomain) -> Result<FederationRelationship, ApiError> {
        self.issuance
            .store
            .get_federation(td)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no federation relationship with {td}")))
    }

    async fn relationship_pb(&self, rel: &FederationRelationship) -> Result<pb::FederationRelationship, ApiError> {
        let seq = self.issuance.store.get_bundle(&rel.trust_domain).await?.map_or(0, |b| b.sequence_number);
        Ok(federation_to_pb(rel, &self.federation.status(&rel.trust_domain), seq))
    }

    /// Create (`create = true`) or update a relationship, storing the bootstrap bundle first.
    async fn set_relationship(
        &self,
        r: pb::SetFederationRelationshipRequest,
        create: bool,
    ) -> Result<pb::FederationRelationship, ApiError> {
        let own = self.issuance.ca.trust_domain();
        let rel = federation_from_pb(
            own,
            r.relationship.as_ref().ok_or_else(|| ApiError::InvalidArgument("relationship is required".into()))?,
        )?;
        let td = &rel.trust_domain;
        let exists = self.issuance.store.get_federation(td).await?.is_some();
        match (create, exists) {
            (true, true) => return Err(ApiError::AlreadyExists(format!("a relationship with {td} exists"))),
            (false, false) => return Err(ApiError::NotFound(format!("no federation relationship with {td}"))),
            _ => {}
        }
        if let Some(b) = &r.bootstrap_bundle {
            let b = bundle_from_pb(b)?;
            if &b.trust_domain != td {
                return Err(ApiError::InvalidArgument(format!("bootstrap bundle is for {}, not {td}", b.trust_domain)));
            }
            if b.is_empty() {
                return Err(ApiError::InvalidArgument("bootstrap bundle has no keys".into()));
            }
            self.issuance.store.put_bundle(&b).await?;
            self.changes.notify();
        }
        self.issuance.store.put_federation(&rel).await?;
        self.federation.relationships_changed(td);
        info!(trust_domain = %td, url = %rel.bundle_endpoint_url, profile = rel.profile.name(), created = create, "Federation relationship set");
        self.relationship_pb(&rel).await
    }

    fn authorities(&self) -> pb::X509AuthorityState {
        pb::X509AuthorityState {
            authorities: self
                .issuance
                .ca
                .x509_authorities()
                .into_iter()
                .map(|a| pb::X509Authority {
                    authority_id: a.authority_id,
                    status: a.status.to_owned(),
                    issued_at: a.issued_at,
                    expires_at: a.expires_at,
                    tainted: a.tainted,
                    certificate: a.certificate,
                    upstream_authority_id: String::new(),
                })
                .collect(),
        }
    }

    async fn agent(&self, id: &str) -> Result<tessera_store::AgentRecord, ApiError> {
        let id = parse_spiffe_id(id)?;
        self.issuance.store.get_agent(&id).await?.ok_or_else(|| ApiError::NotFound(format!("agent {id} not found")))
    }
}

type R<T> = Result<Response<T>, Status>;

/// How often a ban is retried when the agent record changes underneath it.
const MAX_BAN_ATTEMPTS: usize = 64;

#[tonic::async_trait]
impl Admin for AdminService {
    #[instrument(skip_all, name = "CreateJoinToken")]
    async fn create_join_token(&self, req: Request<pb::CreateJoinTokenRequest>) -> R<pb::CreateJoinTokenResponse> {
        let r = req.into_inner();
        let ttl = match r.ttl {
            0 => self.cfg.join_token_ttl,
            t if t < 0 => return Err(ApiError::InvalidArgument("ttl must not be negative".into()).into()),
            t => Duration::from_secs(t.unsigned_abs()),
        };
        let td = self.issuance.ca.trust_domain();
        let alias = if r.spiffe_id.is_empty() {
            None
        } else {
            Some(parse_member_id(&r.spiffe_id, td).map_err(ApiError::from)?)
        };
        let token = random_id()?;
        let agent = agent_id(td, "join_token", &token).map_err(ApiError::from)?;
        let expires_at = unix_now().saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        self.issuance
            .store
            .create_join_token(&JoinToken { token: token.clone(), expires_at })
            .await
            .map_err(ApiError::from)?;
        let alias_entry = match alias {
            None => None,
            Some(spiffe_id) => {
                let e = tessera_store::Entry::new(random_id()?, spiffe_id, agent.clone(), vec![], unix_now());
                let stored = self.issuance.store.create_entry(e).await.map_err(ApiError::from)?;
                self.changes.entries_written();
                Some(entry_to_pb(&stored))
            }
        };
        info!(agent_id = %tessera_identity::ids::LogId(&agent), expires_at, "Join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse { token, expires_at, agent_id: agent.to_string(), alias_entry }))
    }

    #[instrument(skip_all, name = "CreateEntry")]
    async fn create_entry(&self, req: Request<pb::CreateEntryRequest>) -> R<types::Entry> {
        let e = req.into_inner().entry.ok_or_else(|| ApiError::InvalidArgument("entry is required".into()))?;
        let mut entry = entry_from_pb(&e, self.issuance.ca.trust_domain(), &self.cfg.ca)?;
        if entry.id.is_empty() {
            entry.id = random_id()?;
        }
        entry.created_at = unix_now();
        let stored = self.issuance.store.create_entry(entry).await.map_err(ApiError::from)?;
        self.changes.entries_written();
        info!(entry_id = %stored.id, spiffe_id = %stored.spiffe_id, "Entry created");
        Ok(Response::new(entry_to_pb(&stored)))
    }

    #[instrument(skip_all, name = "BatchCreateEntry")]
    async fn batch_create_entry(&self, req: Request<pb::BatchCreateEntryRequest>) -> R<pb::BatchCreateEntryResponse> {
        let given = req.into_inner().entries;
        if given.len() > MAX_ENTRY_BATCH {
            return Err(ApiError::InvalidArgument(format!(
                "{} entries in one batch; at most {MAX_ENTRY_BATCH}",
                given.len()
            ))
            .into());
        }
        let now = unix_now();
        // Every entry checked before anything is written, each with its own result.
        let mut checked: Vec<Result<tessera_store::Entry, ApiError>> = Vec::with_capacity(given.len());
        let mut by_parent: std::collections::HashMap<tessera_identity::SpiffeId, Vec<tessera_store::Entry>> =
            std::collections::HashMap::new();
        let mut ids = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for e in &given {
            let one = async {
                let mut entry = entry_from_pb(e, self.issuance.ca.trust_domain(), &self.cfg.ca)?;
                if entry.id.is_empty() {
                    entry.id = random_id()?;
                }
                entry.created_at = now;
                if !ids.insert(entry.id.clone()) || self.issuance.store.get_entry(&entry.id).await?.is_some() {
                    return Err(ApiError::AlreadyExists(format!("entry {} already exists", entry.id)));
                }
                let key = natural_key(&entry);
                let siblings = match by_parent.get(&entry.parent_id) {
                    Some(s) => s,
                    None => {
                        let s = self.issuance.store.entries_by_parent(&entry.parent_id).await?;
                        by_parent.entry(entry.parent_id.clone()).or_insert(s)
                    }
                };
                if let Some(dup) = siblings.iter().find(|s| natural_key(s) == key) {
                    return Err(ApiError::AlreadyExists(format!(
                        "an entry with this SPIFFE ID, parent and selectors exists ({})",
                        dup.id
                    )));
                }
                if !keys.insert(key) {
                    return Err(ApiError::AlreadyExists(
                        "another entry of this batch has the same SPIFFE ID, parent and selectors".into(),
                    ));
                }
                Ok(entry)
            };
            checked.push(one.await);
        }
        let failed = checked.iter().filter(|c| c.is_err()).count();
        let results = if failed > 0 {
            let why = format!(
                "not created: {failed} other entr{} of the batch failed",
                if failed == 1 { "y" } else { "ies" }
            );
            given
                .iter()
                .zip(checked)
                .map(|(g, c)| match c {
                    Ok(_) => pb::EntryResult {
                        entry: Some(g.clone()),
                        code: tonic::Code::Aborted as i32,
                        message: why.clone(),
                    },
                    Err(e) => {
                        let s = tonic::Status::from(e);
                        pb::EntryResult {
                            entry: Some(g.clone()),
                            code: s.code() as i32,
                            message: s.message().to_owned(),
                        }
                    }
                })
                .collect()
        } else {
            let batch: Vec<tessera_store::Entry> = checked.into_iter().filter_map(Result::ok).collect();
            match self.issuance.store.create_entries(batch).await {
                Ok(stored) => {
                    self.changes.entries_written();
                    info!(entries = stored.len(), "Entries created");
                    stored
                        .iter()
                        .map(|e| pb::EntryResult { entry: Some(entry_to_pb(e)), code: 0, message: String::new() })
                        .collect()
                }
                // Another writer got there between the checks and the write: nothing stored.
                Err(e) => {
                    let s = tonic::Status::from(ApiError::from(e));
                    given
                        .iter()
                        .map(|g| pb::EntryResult {
                            entry: Some(g.clone()),
                            code: tonic::Code::Aborted as i32,
                            message: format!("not created: {}", s.message()),
                        })
                        .collect()
                }
            }
        };
        Ok(Response::new(pb::BatchCreateEntryResponse { results }))
    }

    #[instrument(skip_all, name = "UpdateEntry")]
    async fn update_entry(&self, req: Request<pb::UpdateEntryRequest>) -> R<types::Entry> {
        let e = req.into_inner().entry.ok_or_else(|| ApiError::InvalidArgument("entry is required".into()))?;
        if e.id.is_empty() {
            return Err(ApiError::InvalidArgument("entry id is required".into()).into());
        }
        let entry = entry_from_pb(&e, self.issuance.ca.trust_domain(), &self.cfg.ca)?;
        let before = self.issuance.store.get_entry(&entry.id).await.map_err(ApiError::from)?;
        let stored = self.issuance.store.update_entry(entry).await.map_err(ApiError::from)?;
        match before {
            Some(b) if b.parent_id != stored.parent_id => self.changes.entry_moved_from(b.parent_id),
            _ => self.changes.entries_written(),
        }
        Ok(Response::new(entry_to_pb(&stored)))
    }

    async fn delete_entry(&self, req: Request<pb::EntryId>) -> R<types::Entry> {
        let id = req.into_inner().id;
        let e = self
            .issuance
            .store
            .delete_entry(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("entry {id} not found")))?;
        self.changes.entries_written();
        info!(entry_id = %id, "Entry deleted");
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn get_entry(&self, req: Request<pb::EntryId>) -> R<types::Entry> {
        let id = req.into_inner().id;
        let e = self
            .issuance
            .store
            .get_entry(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("entry {id} not found")))?;
        Ok(Response::new(entry_to_pb(&e)))
    }

    async fn list_entries(&self, req: Request<pb::ListEntriesRequest>) -> R<pb::ListEntriesResponse> {
        let r = req.into_inner();
        let by_id = if r.by_spiffe_id.is_empty() {
            None
        } else {
            Some(parse_spiffe_id(&r.by_spiffe_id).map_err(ApiError::from)?)
        };
        let by_parent = if r.by_parent_id.is_empty() {
            None
        } else {
            Some(parse_spiffe_id(&r.by_parent_id).map_err(ApiError::from)?)
        };
        let mut by_sel = r.by_selectors.iter().map(selector_from_pb).collect::<Result<Vec<_>, _>>()?;
        by_sel.sort();
        if by_id.is_none() && by_parent.is_none() && by_sel.is_empty() && r.page_size > 0 {
            // Unfiltered: one range read of the page (and one more to know if there is a next).
            let size = r.page_size as usize;
            let mut entries =
                self.issuance.store.entries_page(&r.page_token, size + 1).await.map_err(ApiError::from)?;
            let next_page_token = if entries.len() > size {
                entries.truncate(size);
                entries.last().map(|e| e.id.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            return Ok(Response::new(pb::ListEntriesResponse {
                entries: entries.iter().map(entry_to_pb).collect(),
                next_page_token,
            }));
        }
        let entries = match &by_parent {
            Some(p) => self.issuance.store.entries_by_parent(p).await,
            None => self.issuance.store.list_entries().await,
        }
        .map_err(ApiError::from)?;
        let entries: Vec<_> = entries
            .into_iter()
            .filter(|e| by_id.as_ref().is_none_or(|id| &e.spiffe_id == id))
            .filter(|e| {
                by_sel.is_empty() || {
                    let mut s = e.selectors.clone();
                    s.sort();
                    s == by_sel
                }
            })
            .collect();
        let (entries, next_page_token) = page(entries, |e| e.id.clone(), r.page_size, &r.page_token);
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(entry_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn get_bundle(&self, _req: Request<pb::GetBundleRequest>) -> R<types::Bundle> {
        Ok(Response::new(bundle_to_pb(&self.issuance.ca.bundle())))
    }

    async fn list_federated_bundles(
        &self,
        _req: Request<pb::ListFederatedBundlesRequest>,
    ) -> R<pb::ListFederatedBundlesResponse> {
        let own = self.issuance.ca.trust_domain();
        let bundles = self.issuance.store.list_bundles().await.map_err(ApiError::from)?;
        Ok(Response::new(pb::ListFederatedBundlesResponse {
            bundles: bundles.iter().filter(|b| &b.trust_domain != own).map(bundle_to_pb).collect(),
        }))
    }

    #[instrument(skip_all, name = "SetFederatedBundle")]
    async fn set_federated_bundle(&self, req: Request<types::Bundle>) -> R<types::Bundle> {
        let b = bundle_from_pb(&req.into_inner())?;
        if &b.trust_domain == self.issuance.ca.trust_domain() {
            return Err(
                ApiError::InvalidArgument("cannot set our own trust domain's bundle as federated".into()).into()
            );
        }
        if b.is_empty() {
            return Err(ApiError::InvalidArgument("bundle has no X.509 or JWT authorities".into()).into());
        }
        self.issuance.store.put_bundle(&b).await.map_err(ApiError::from)?;
        self.changes.notify();
        info!(trust_domain = %b.trust_domain, "Federated bundle set");
        Ok(Response::new(bundle_to_pb(&b)))
    }

    async fn delete_federated_bundle(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> R<pb::DeleteFederatedBundleResponse> {
        let td = parse_trust_domain(&req.into_inner().trust_domain).map_err(ApiError::from)?;
        if &td == self.issuance.ca.trust_domain() {
            return Err(ApiError::InvalidArgument("cannot delete our own trust domain's bundle".into()).into());
        }
        if !self.issuance.store.delete_bundle(&td).await.map_err(ApiError::from)? {
            return Err(ApiError::NotFound(format!("no federated bundle for {td}")).into());
        }
        self.changes.notify();
        Ok(Response::new(pb::DeleteFederatedBundleResponse {}))
    }

    #[instrument(skip_all, name = "CreateFederationRelationship")]
    async fn create_federation_relationship(
        &self,
        req: Request<pb::SetFederationRelationshipRequest>,
    ) -> R<pb::FederationRelationship> {
        Ok(Response::new(self.set_relationship(req.into_inner(), true).await?))
    }

    #[instrument(skip_all, name = "UpdateFederationRelationship")]
    async fn update_federation_relationship(
        &self,
        req: Request<pb::SetFederationRelationshipRequest>,
    ) -> R<pb::FederationRelationship> {
        Ok(Response::new(self.set_relationship(req.into_inner(), false).await?))
    }

    async fn get_federation_relationship(&self, req: Request<pb::TrustDomainRequest>) -> R<pb::FederationRelationship> {
        let td = parse_trust_domain(&req.into_inner().trust_domain).map_err(ApiError::from)?;
        let rel = self.relationship(&td).await?;
        Ok(Response::new(self.relationship_pb(&rel).await?))
    }

    async fn list_federation_relationships(
        &self,
        _req: Request<pb::ListFederationRelationshipsRequest>,
    ) -> R<pb::ListFederationRelationshipsResponse> {
        let mut relationships = Vec::new();
        for rel in self.issuance.store.list_federations().await.map_err(ApiError::from)? {
            relationships.push(self.relationship_pb(&rel).await?);
        }
        Ok(Response::new(pb::ListFederationRelationshipsResponse { relationships }))
    }

    #[instrument(skip_all, name = "DeleteFederationRelationship")]
    async fn delete_federation_relationship(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> R<pb::FederationRelationship> {
        let td = parse_trust_domain(&req.into_inner().trust_domain).map_err(ApiError::from)?;
        let rel = self.relationship(&td).await?;
        let out = self.relationship_pb(&rel).await?;
        self.issuance.store.delete_federation(&td).await.map_err(ApiError::from)?;
        self.federation.relationships_changed(&td);
        info!(trust_domain = %td, "Federation relationship deleted; its bundle stays until `bundle delete`");
        Ok(Response::new(out))
    }

    #[instrument(skip_all, name = "RefreshFederatedBundle")]
    async fn refresh_federated_bundle(
        &self,
        req: Request<pb::TrustDomainRequest>,
    ) -> R<pb::RefreshFederatedBundleResponse> {
        let td = parse_trust_domain(&req.into_inner().trust_domain).map_err(ApiError::from)?;
        let (updated, sequence_number) = match self.federation.refresh(&td).await.map_err(ApiError::from)? {
            Refreshed::Updated(s) => (true, s),
            Refreshed::Unchanged(s) => (false, s),
        };
        Ok(Response::new(pb::RefreshFederatedBundleResponse { updated, sequence_number }))
    }

    #[instrument(skip_all, name = "MintX509Svid")]
    async fn mint_x509_svid(&self, req: Request<pb::MintX509SvidRequest>) -> R<pb::MintX509SvidResponse> {
        let r = req.into_inner();
        let id = parse_member_id(&r.spiffe_id, self.issuance.ca.trust_domain()).map_err(ApiError::from)?;
        if id.path().is_empty() {
            return Err(ApiError::InvalidArgument("an X509-SVID's SPIFFE ID must have a path".into()).into());
        }
        let ttl = ttl_arg("ttl", r.ttl, self.cfg.ca.max_x509_svid_ttl)?;
        let req =
            X509Request { spiffe_id: &id, dns_names: &r.dns_names, ttl, caller: "admin", kind: AuditKind::X509Svid };
        let issued = self.issuance.x509::<ApiError>(req, r.csr).await?;
        Ok(Response::new(pb::MintX509SvidResponse {
            svid: Some(types::X509Svid {
                spiffe_id: id.to_string(),
                cert_chain: issued.chain,
                expires_at: issued.not_after,
            }),
            bundle: self.issuance.ca.bundle().x509_authorities.iter().map(|c| c.as_ref().to_vec()).collect(),
        }))
    }

    #[instrument(skip_all, name = "MintJwtSvid")]
    async fn mint_jwt_svid(&self, req: Request<pb::MintJwtSvidRequest>) -> R<pb::MintJwtSvidResponse> {
        let r = req.into_inner();
        let id = parse_member_id(&r.spiffe_id, self.issuance.ca.trust_domain()).map_err(ApiError::from)?;
        let ttl = ttl_arg("ttl", r.ttl, self.cfg.ca.max_jwt_svid_ttl)?;
        let jwt = self.issuance.jwt::<ApiError>(&id, r.audience, ttl, "admin").await?;
        Ok(Response::new(pb::MintJwtSvidResponse { token: jwt.token, expires_at: jwt.expires_at }))
    }

    async fn get_x509_authorities(&self, _req: Request<pb::GetX509AuthoritiesRequest>) -> R<pb::X509AuthorityState> {
        Ok(Response::new(self.authorities()))
    }

    async fn prepare_x509_authority(
        &self,
        _req: Request<pb::PrepareX509AuthorityRequest>,
    ) -> R<pb::X509AuthorityState> {
        self.issuance.ca.prepare_x509().await.map_err(ApiError::from)?;
        Ok(Response::new(self.authorities()))
    }

    async fn activate_x509_authority(
        &self,
        req: Request<pb::ActivateX509AuthorityRequest>,
    ) -> R<pb::X509AuthorityState> {
        let want = req.into_inner().authority_id;
        self.issuance.ca.activate_x509(Some(&want)).await.map_err(ApiError::from)?;
        Ok(Response::new(self.authorities()))
    }

    async fn taint_x509_authority(&self, req: Request<pb::TaintX509AuthorityRequest>) -> R<pb::X509AuthorityState> {
        let id = req.into_inner().authority_id;
        if id.is_empty() {
            return Err(ApiError::InvalidArgument("authority_id is required".into()).into());
        }
        self.issuance.ca.taint_x509(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(self.authorities()))
    }

    async fn list_agents(&self, req: Request<pb::ListAgentsRequest>) -> R<pb::ListAgentsResponse> {
        let r = req.into_inner();
        let agents = self.issuance.store.list_agents().await.map_err(ApiError::from)?;
        let (agents, next_page_token) = page(agents, |a| a.spiffe_id.to_string(), r.page_size, &r.page_token);
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(|a| self.agent_pb(a)).collect(),
            next_page_token,
        }))
    }

    async fn get_agent(&self, req: Request<pb::AgentId>) -> R<pb::Agent> {
        Ok(Response::new(self.agent_pb(&self.agent(&req.into_inner().spiffe_id).await?)))
    }

    #[instrument(skip_all, name = "EvictAgent")]
    async fn evict_agent(&self, req: Request<pb::AgentId>) -> R<pb::Agent> {
        let a = self.agent(&req.into_inner().spiffe_id).await?;
        self.issuance.store.delete_agent(&a.spiffe_id).await.map_err(ApiError::from)?;
        // Wakes every change stream (each checks its agent), so that the evicted agent's
        // ends now rather than at its next 30 s check.
        self.changes.notify();
        info!(agent_id = %tessera_identity::ids::LogId(&a.spiffe_id), "Agent evicted");
        Ok(Response::new(agent_to_pb(&a)))
    }

    #[instrument(skip_all, name = "BanAgent")]
    async fn ban_agent(&self, req: Request<pb::AgentId>) -> R<pb::Agent> {
        let id = req.into_inner().spiffe_id;
        // Compare-and-set: a renewal or attestation that read the record before cannot write
        // over the ban afterwards (its own write is conditional on the revision it read), and
        // a write that got in first is re-read and banned again.
        for _ in 0..MAX_BAN_ATTEMPTS {
            let mut a = self.agent(&id).await?;
            let expected = a.revision;
            a.banned = true;
            if let Some(stored) =
                self.issuance.store.compare_and_put_agent(&a, Some(expected)).await.map_err(ApiError::from)?
            {
                info!(agent_id = %tessera_identity::ids::LogId(&stored.spiffe_id), "Agent banned");
                // Wakes every change stream (each checks its agent), so that the banned agent's
                // ends now rather than at its next 30 s check.
                self.changes.notify();
                return Ok(Response::new(agent_to_pb(&stored)));
            }
        }
        Err(ApiError::Unavailable(format!(
            "agent {} keeps changing; the ban was not applied, retry",
            tessera_identity::ids::redact_join_token(&id)
        ))
        .into())
    }

    async fn verify_audit(&self, _req: Request<pb::VerifyAuditRequest>) -> R<pb::VerifyAuditResponse> {
        let v = verify_audit(self.issuance.store.as_ref()).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: v.ok,
            records: v.records,
            first_broken: v.first_broken.unwrap_or(0),
            reason: v.reason,
            head: v.head,
        }))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> R<pb::ListAuditResponse> {
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n => usize::try_from(n).unwrap_or(1000).min(1000),
        };
        let matches = |rec: &tessera_store::AuditRecord| {
            let e = &rec.event;
            (r.spiffe_id.is_empty() || e.spiffe_id == r.spiffe_id)
                && (r.caller.is_empty() || e.caller == r.caller)
                && (r.since_ms == 0 || e.at_ms >= r.since_ms)
                && (r.until_ms == 0 || e.at_ms <= r.until_ms)
        };
        // A scan of the chain from `from_seq`, a page at a time: O(records read).
        let mut records = Vec::new();
        let mut next = r.from_seq.max(1);
        let mut next_seq = 0;
        'scan: loop {
            let page = self.issuance.store.audit_range(next, 1024).await.map_err(ApiError::from)?;
            let Some(last) = page.last() else { break };
            next = last.seq + 1;
            for rec in &page {
                if !matches(rec) {
                    continue;
                }
                if records.len() == limit {
                    next_seq = rec.seq;
                    break 'scan;
                }
                let kind = serde_json::to_value(rec.event.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                records.push(pb::AuditEntry {
                    seq: rec.seq,
                    at_ms: rec.event.at_ms,
                    kind,
                    spiffe_id: rec.event.spiffe_id.clone(),
                    serial: rec.event.serial.clone(),
                    not_after: rec.event.not_after,
                    caller: rec.event.caller.clone(),
                    detail: rec.event.detail.clone(),
                    hash: rec.hash.clone(),
                });
            }
        }
        Ok(Response::new(pb::ListAuditResponse { records, next_seq }))
    }

    async fn doctor(&self, _req: Request<pb::DoctorRequest>) -> R<pb::DoctorResponse> {
        let report = self.diagnostics.doctor().await;
        Ok(Response::new(pb::DoctorResponse {
            findings: report
                .findings
                .into_iter()
                .map(|f| pb::Finding {
                    code: f.code,
                    severity: f.severity.as_str().to_owned(),
                    subject: f.subject,
                    message: f.message,
                    fix: f.fix,
                })
                .collect(),
        }))
    }

    async fn get_server_info(&self, _req: Request<pb::GetServerInfoRequest>) -> R<pb::ServerInfo> {
        let i = self.diagnostics.info().await;
        Ok(Response::new(pb::ServerInfo {
            version: i.version,
            instance_id: i.instance_id,
            trust_domain: i.trust_domain,
            uptime_seconds: i.uptime_seconds,
            agents: i.agents,
            banned_agents: i.banned_agents,
            entries: i.entries,
            federated_bundles: i.federated_bundles,
            bundle_sequence: i.bundle_sequence,
            last_agent_sync: i.last_agent_sync,
            authorities: i
                .authorities
                .into_iter()
                .map(|a| pb::AuthoritySummary {
                    authority_id: a.authority_id,
                    status: a.status,
                    not_after: a.not_after,
                })
                .collect(),
            svid_chain: i
                .svid_chain
                .into_iter()
                .map(|c| pb::CertSummary { spiffe_id: c.spiffe_id, serial: c.serial, not_after: c.not_after })
                .collect(),
        }))
    }
}
