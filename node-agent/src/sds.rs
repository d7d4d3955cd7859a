//! Envoy SDS v3 on the agent socket: StreamSecrets (state of the world), DeltaSecrets
//! (incremental) and FetchSecrets.
//!
//! Resource names follow SPIRE's and Istio's conventions: `default` (the caller's first SVID),
//! `ROOTCA` (our bundle as a trusted CA), `ALL` (our bundle and those the caller federates with, as an
//! `envoy.tls.cert_validator.spiffe` validator), a SPIFFE ID (that SVID) and
//! `spiffe://<trust domain>` (that trust domain's bundle). A response is sent when content
//! changes; stale nonces are ignored; a NACK is logged and the rejected version is not resent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use prost::Message;
use prost_types::Any;
use tessera_identity::{Bundle, SpiffeId, TrustDomain};
use tessera_proto::envoy::config::core::v3::{DataSource, TypedExtensionConfig, data_source::Specifier};
use tessera_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use tessera_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::callers::{Caller, Callers};
use crate::manager::{Manager, Snapshot, WorkloadSvid};
use crate::sds_state::{Reply, SentResource, Tracked};
use crate::streams::{OpenStream, Responder, ResponseStream, StreamKind, respond};
use crate::workload_api::federated_for;

/// Type URL of an SDS secret.
pub const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// Most resource names one delta stream may subscribe to (a real Envoy asks for a handful).
pub const MAX_SUBSCRIBED: usize = 1024;
/// Longest resource name accepted.
const MAX_NAME_BYTES: usize = 1024;
const SPIFFE_VALIDATOR_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";

/// The SDS service.
#[derive(Debug, Clone)]
pub struct Sds {
    mgr: Arc<Manager>,
    callers: Callers,
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource { specifier: Some(Specifier::InlineBytes(bytes)) })
}

fn tls_secret(name: &str, s: &WorkloadSvid) -> Secret {
    let chain = tessera_identity::pem::encode_certs(s.chain.iter().map(Vec::as_slice));
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: inline(s.key.to_pem().as_bytes().to_vec()),
        })),
    }
}

fn trusted_ca_secret(name: &str, b: &Bundle) -> Secret {
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            trusted_ca: inline(b.x509_pem().into_bytes()),
            ..Default::default()
        })),
    }
}

fn spiffe_validator_secret(name: &str, bundles: &[&Bundle]) -> Secret {
    let cfg = SpiffeCertValidatorConfig {
        trust_domains: bundles
            .iter()
            .map(|b| spiffe_cert_validator_config::TrustDomain {
                name: b.trust_domain.to_string(),
                trust_bundle: inline(b.x509_pem().into_bytes()),
            })
            .collect(),
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(CertificateValidationContext {
            custom_validator_config: Some(TypedExtensionConfig {
                name: "envoy.tls.cert_validator.spiffe".into(),
                typed_config: Some(Any { type_url: SPIFFE_VALIDATOR_TYPE.into(), value: cfg.encode_to_vec() }),
            }),
            ..Default::default()
        })),
    }
}

/// What a resource name stands for, for a caller with identities `ids`.
enum Chosen<'a> {
    /// A TLS certificate and key.
    Tls(&'a WorkloadSvid),
    /// Our bundle (or one federated bundle) as trusted CAs.
    TrustedCa(&'a Bundle),
    /// Bundles as a SPIFFE validator.
    Spiffe(Vec<&'a Bundle>),
}

fn choose<'a>(name: &str, snap: &'a Snapshot, ids: &'a [Arc<WorkloadSvid>]) -> Option<Chosen<'a>> {
    match name {
        "default" => ids.first().map(|s| Chosen::Tls(s)),
        "ROOTCA" => Some(Chosen::TrustedCa(&snap.bundle)),
        "ALL" => {
            // Ours, and those of the trust domains the caller's entries federate with.
            let mut all: Vec<&Bundle> = vec![&snap.bundle];
            all.extend(federated_for(snap, ids).into_values().map(AsRef::as_ref));
            Some(Chosen::Spiffe(all))
        }
        other if other.starts_with("spiffe://") => {
            let id = SpiffeId::new(other).ok()?;
            if id.path().is_empty() {
                let td: &TrustDomain = id.trust_domain();
                if td == &snap.bundle.trust_domain {
                    Some(Chosen::TrustedCa(&snap.bundle))
                } else {
                    federated_for(snap, ids).get(td).copied().map(|b| Chosen::TrustedCa(b.as_ref()))
                }
            } else {
                ids.iter().find(|s| s.entry.spiffe_id == id).map(|s| Chosen::Tls(s))
            }
        }
        _ => None,
    }
}

/// The secret named `name` for a caller with identities `ids`, if it exists.
pub fn secret_for(name: &str, snap: &Snapshot, ids: &[Arc<WorkloadSvid>]) -> Option<Secret> {
    Some(match choose(name, snap, ids)? {
        Chosen::Tls(s) => tls_secret(name, s),
        Chosen::TrustedCa(b) => trusted_ca_secret(name, b),
        Chosen::Spiffe(all) => spiffe_validator_secret(name, &all),
    })
}

/// What `debug sds` shows of the resource `name` as it would be sent now.
fn describe(name: &str, snap: &Snapshot, ids: &[Arc<WorkloadSvid>]) -> Option<SentResource> {
    Some(match choose(name, snap, ids)? {
        Chosen::Tls(s) => SentResource {
            name: name.to_owned(),
            kind: "tls_certificate",
            spiffe_id: Some(s.entry.spiffe_id.to_string()),
            serial: Some(s.serial.clone()),
            not_after: Some(s.not_after),
            trust_domains: Vec::new(),
        },
        Chosen::TrustedCa(b) => SentResource {
            name: name.to_owned(),
            kind: "validation_context",
            spiffe_id: None,
            serial: None,
            not_after: None,
            trust_domains: vec![b.trust_domain.to_string()],
        },
        Chosen::Spiffe(all) => SentResource {
            name: name.to_owned(),
            kind: "validation_context",
            spiffe_id: None,
            serial: None,
            not_after: None,
            trust_domains: all.iter().map(|b| b.trust_domain.to_string()).collect(),
        },
    })
}

/// Encodes a secret, then zeroes the private key it held: the encoded copy is the only one
/// left, and the codec clears it once it is sent.
fn to_any(mut s: Secret) -> Any {
    let any = Any { type_url: SECRET_TYPE.into(), value: s.encode_to_vec() };
    if let Some(secret::Type::TlsCertificate(t)) = &mut s.r#type
        && let Some(DataSource { specifier: Some(Specifier::InlineBytes(key)), .. }) = &mut t.private_key
    {
        zeroize::Zeroize::zeroize(key);
    }
    any
}

/// A short content hash, used as a version.
fn version_of(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    tessera_identity::x509::hex_lower(ctx.finish().as_ref().get(..12).unwrap_or_default())
}

struct Nonces(u64);

impl Nonces {
    fn next(&mut self) -> String {
        self.0 += 1;
        self.0.to_string()
    }
}

impl Sds {
    /// An SDS service over the manager's snapshots.
    pub fn new(mgr: Arc<Manager>, callers: Callers) -> Self {
        Self { mgr, callers }
    }
}

/// The resource names of a state-of-the-world request, each once, bounded like a delta
/// stream's subscriptions: a request repeating a name thousands of times must not make the
/// agent build thousands of secrets.
fn checked_names(names: Vec<String>) -> Result<Vec<String>, Status> {
    let mut seen = BTreeSet::new();
    let unique: Vec<String> = names.into_iter().filter(|n| seen.insert(n.clone())).collect();
    if unique.len() > MAX_SUBSCRIBED || unique.iter().any(|n| n.len() > MAX_NAME_BYTES) {
        return Err(Status::resource_exhausted(format!(
            "an SDS request may name at most {MAX_SUBSCRIBED} resources of at most {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(unique)
}

/// SotW: the resources for `names`, and their joint version.
fn sotw(names: &[String], snap: &Snapshot, ids: &[Arc<WorkloadSvid>]) -> (Vec<Any>, String) {
    let any: Vec<Any> = names.iter().filter_map(|n| secret_for(n, snap, ids)).map(to_any).collect();
    let parts: Vec<&[u8]> = any.iter().map(|a| a.value.as_slice()).collect();
    let version = version_of(&parts);
    (any, version)
}

/// Notes an ACK or NACK of a stream's response.
fn note_reply(track: &Tracked, mgr: &Manager, nonce: &str, version: &str, err: Option<(i32, &str)>) {
    if err.is_some() {
        mgr.metrics.sds_nacks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let reply = Reply {
        at: tessera_identity::unix_now(),
        nonce: nonce.to_owned(),
        version: version.to_owned(),
        code: err.map(|e| e.0),
        error: err.map(|e| e.1.to_owned()),
    };
    track.update(|s| {
        if err.is_some() {
            s.last_nack = Some(reply);
        } else {
            s.last_ack = Some(reply);
        }
    });
}

/// Notes what a stream just sent.
fn note_sent(
    track: &Tracked,
    ids: &[Arc<WorkloadSvid>],
    version: &str,
    nonce: &str,
    sent: impl Iterator<Item = SentResource>,
    removed: &[String],
    replace: bool,
) {
    let entitled = track.entitled(
        ids,
        |held, svid| {
            let id = &svid.entry.spiffe_id;
            held.strip_prefix("spiffe://").and_then(|r| r.strip_prefix(id.trust_domain_name())) == Some(id.path())
        },
        |svid| svid.entry.spiffe_id.to_string(),
    );
    track.update(|s| {
        s.spiffe_ids = entitled;
        s.version = version.to_owned();
        s.nonce = nonce.to_owned();
        s.sent_at = tessera_identity::unix_now();
        if replace {
            s.resources.clear();
        }
        for r in removed {
            s.resources.remove(r);
        }
        for r in sent {
            s.resources.insert(r);
        }
    });
}

/// One state-of-the-world stream.
struct Sotw {
    inbound: Streaming<DiscoveryRequest>,
    snaps: watch::Receiver<Arc<Snapshot>>,
    caller: Caller,
    names: Option<Vec<String>>,
    sent_version: String,
    last_nonce: String,
    nonces: Nonces,
    mgr: Arc<Manager>,
    track: Tracked,
    _open: OpenStream,
}

impl Responder for Sotw {
    type Message = DiscoveryResponse;

    async fn next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        loop {
            tokio::select! {
                msg = self.inbound.message() => {
                    let Ok(Some(r)) = msg else { return None };
                    if !r.response_nonce.is_empty() && r.response_nonce != self.last_nonce {
                        debug!(nonce = %r.response_nonce, "Stale SDS request ignored");
                        continue;
                    }
                    if let Some(err) = &r.error_detail {
                        warn!(version = %r.version_info, code = err.code, message = %err.message, "Envoy rejected (NACK) an SDS response");
                        note_reply(&self.track, &self.mgr, &r.response_nonce, &r.version_info, Some((err.code, &err.message)));
                    } else if !r.response_nonce.is_empty() {
                        note_reply(&self.track, &self.mgr, &r.response_nonce, &r.version_info, None);
                    }
                    let names = match checked_names(r.resource_names) {
                        Ok(n) => n,
                        Err(e) => return Some(Err(e)),
                    };
                    if self.names.as_ref() != Some(&names) {
                        self.track.update(|s| s.resource_names.clone_from(&names));
                        self.names = Some(names);
                    }
                }
                c = self.snaps.changed() => if c.is_err() { return None },
            }
            let Some(n) = &self.names else { continue };
            let snap = self.snaps.borrow_and_update().clone();
            let ids = snap.identities(&self.caller.selectors);
            let (mut resources, version) = sotw(n, &snap, &ids);
            if resources.is_empty() || version == self.sent_version {
                // Not sent: clear the keys they hold before they are dropped.
                resources.iter_mut().for_each(|r| zeroize::Zeroize::zeroize(&mut r.value));
                continue;
            }
            if let Err(e) = self.caller.check() {
                return Some(Err(e));
            }
            self.last_nonce = self.nonces.next();
            self.sent_version.clone_from(&version);
            self.mgr.mark_served(&ids);
            note_sent(
                &self.track,
                &ids,
                &version,
                &self.last_nonce,
                n.iter().filter_map(|x| describe(x, &snap, &ids)),
                &[],
                true,
            );
            return Some(Ok(DiscoveryResponse {
                version_info: version,
                resources,
                type_url: SECRET_TYPE.into(),
                nonce: self.last_nonce.clone(),
                ..Default::default()
            }));
        }
    }
}

/// One incremental (delta) stream.
struct Delta {
    inbound: Streaming<DeltaDiscoveryRequest>,
    snaps: watch::Receiver<Arc<Snapshot>>,
    caller: Caller,
    subscribed: BTreeSet<String>,
    /// What the client holds: name -> version.
    held: BTreeMap<String, String>,
    nonces: Nonces,
    first: bool,
    /// The nonce last sent (a reply naming it is an ACK or NACK of it).
    last_nonce: String,
    mgr: Arc<Manager>,
    track: Tracked,
    _open: OpenStream,
}

impl Responder for Delta {
    type Message = DeltaDiscoveryResponse;

    async fn next(&mut self) -> Option<Result<DeltaDiscoveryResponse, Status>> {
        loop {
            tokio::select! {
                msg = self.inbound.message() => {
                    let Ok(Some(r)) = msg else { return None };
                    if let Some(err) = &r.error_detail {
                        warn!(nonce = %r.response_nonce, code = err.code, message = %err.message, "Envoy rejected (NACK) a delta SDS response");
                        note_reply(&self.track, &self.mgr, &r.response_nonce, "", Some((err.code, &err.message)));
                    } else if !r.response_nonce.is_empty() && r.response_nonce == self.last_nonce {
                        note_reply(&self.track, &self.mgr, &r.response_nonce, "", None);
                    }
                    if self.first {
                        self.held.extend(r.initial_resource_versions.clone());
                        self.first = false;
                    }
                    for n in &r.resource_names_unsubscribe {
                        self.subscribed.remove(n);
                        self.held.remove(n);
                    }
                    for n in r.resource_names_subscribe {
                        self.subscribed.insert(n);
                    }
                    let names: Vec<String> = self.subscribed.iter().cloned().collect();
                    self.track.update(|s| s.resource_names = names);
                    // Bounded: what a stream remembers is at most its subscriptions.
                    if self.subscribed.len() > MAX_SUBSCRIBED
                        || self.held.len() > MAX_SUBSCRIBED
                        || self.subscribed.iter().chain(self.held.keys()).any(|n| n.len() > MAX_NAME_BYTES)
                    {
                        return Some(Err(Status::resource_exhausted(format!(
                            "a delta SDS stream may subscribe to at most {MAX_SUBSCRIBED} resources with names of at most {MAX_NAME_BYTES} bytes"
                        ))));
                    }
                }
                c = self.snaps.changed() => if c.is_err() { return None },
            }
            let snap = self.snaps.borrow_and_update().clone();
            let ids = snap.identities(&self.caller.selectors);
            let mut resources = Vec::new();
            let mut removed = Vec::new();
            for name in &self.subscribed {
                match secret_for(name, &snap, &ids) {
                    Some(s) => {
                        let mut any = to_any(s);
                        let version = version_of(&[&any.value]);
                        if self.held.get(name) == Some(&version) {
                            zeroize::Zeroize::zeroize(&mut any.value);
                        } else {
                            self.held.insert(name.clone(), version.clone());
                            resources.push(Resource {
                                name: name.clone(),
                                version,
                                resource: Some(any),
                                ..Default::default()
                            });
                        }
                    }
                    None => {
                        if self.held.remove(name).is_some() {
                            removed.push(name.clone());
                        }
                    }
                }
            }
            if resources.is_empty() && removed.is_empty() {
                continue;
            }
            if let Err(e) = self.caller.check() {
                return Some(Err(e));
            }
            self.last_nonce = self.nonces.next();
            self.mgr.mark_served(&ids);
            let system_version = snap.generation.to_string();
            note_sent(
                &self.track,
                &ids,
                &system_version,
                &self.last_nonce,
                resources.iter().filter_map(|r| describe(&r.name, &snap, &ids)),
                &removed,
                false,
            );
            return Some(Ok(DeltaDiscoveryResponse {
                system_version_info: system_version,
                resources,
                type_url: SECRET_TYPE.into(),
                removed_resources: removed,
                nonce: self.last_nonce.clone(),
            }));
        }
    }
}

impl Sds {
    /// `StreamSecrets`: state of the world.
    pub async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DiscoveryResponse>>, Status> {
        let caller = self.callers.attest(&req).await?;
        let (caller_pid, caller_uid) = (caller.pid(), caller.uid);
        let state = Sotw {
            inbound: req.into_inner(),
            snaps: self.mgr.subscribe(),
            caller,
            names: None,
            sent_version: String::new(),
            last_nonce: String::new(),
            nonces: Nonces(0),
            track: self.mgr.observed.sds.open("sotw", caller_pid, caller_uid),
            mgr: self.mgr.clone(),
            _open: OpenStream::new(self.mgr.metrics.clone(), StreamKind::Sds),
        };
        Ok(Response::new(respond(state)))
    }

    /// `FetchSecrets`: one answer.
    pub async fn fetch_secrets(&self, req: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = self.callers.attest(&req).await?;
        let names = checked_names(req.into_inner().resource_names)?;
        let snap = self.mgr.snapshot();
        let ids = snap.identities(&caller.selectors);
        let (resources, version) = sotw(&names, &snap, &ids);
        self.mgr.mark_served(&ids);
        caller.check()?;
        Ok(Response::new(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: SECRET_TYPE.into(),
            nonce: "1".into(),
            ..Default::default()
        }))
    }

    /// `DeltaSecrets`: incremental.
    pub async fn delta_secrets(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream<DeltaDiscoveryResponse>>, Status> {
        let caller = self.callers.attest(&req).await?;
        let (caller_pid, caller_uid) = (caller.pid(), caller.uid);
        let state = Delta {
            inbound: req.into_inner(),
            snaps: self.mgr.subscribe(),
            caller,
            subscribed: BTreeSet::new(),
            held: BTreeMap::new(),
            nonces: Nonces(0),
            first: true,
            last_nonce: String::new(),
            track: self.mgr.observed.sds.open("delta", caller_pid, caller_uid),
            mgr: self.mgr.clone(),
            _open: OpenStream::new(self.mgr.metrics.clone(), StreamKind::Sds),
        };
        Ok(Response::new(respond(state)))
    }
}
