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

use envoy_types::pb::envoy::config::core::v3::{DataSource, TypedExtensionConfig, data_source::Specifier};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use prost::Message;
use tessera_identity::{Bundle, Selector, SpiffeId, TrustDomain};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use crate::callers::{Caller, Callers};
use crate::manager::{Manager, Snapshot, WorkloadSvid};
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
    Some(DataSource { specifier: Some(Specifier::InlineBytes(bytes)), ..Default::default() })
}

fn tls_secret(name: &str, s: &WorkloadSvid) -> Secret {
    let chain = tessera_identity::pem::encode_certs(s.chain.iter().map(Vec::as_slice));
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(chain.into_bytes()),
            private_key: inline(s.key.to_pem().as_bytes().to_vec()),
            ..Default::default()
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
                ..Default::default()
            })
            .collect(),
        ..Default::default()
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

/// The secret named `name` for a caller with identities `ids`, if it exists.
pub fn secret_for(name: &str, snap: &Snapshot, ids: &[Arc<WorkloadSvid>]) -> Option<Secret> {
    match name {
        "default" => ids.first().map(|s| tls_secret(name, s)),
        "ROOTCA" => Some(trusted_ca_secret(name, &snap.bundle)),
        "ALL" => {
            // Ours, and those of the trust domains the caller's entries federate with.
            let mut all: Vec<&Bundle> = vec![&snap.bundle];
            all.extend(federated_for(snap, ids).into_values().map(AsRef::as_ref));
            Some(spiffe_validator_secret(name, &all))
        }
        other if other.starts_with("spiffe://") => {
            let id = SpiffeId::new(other).ok()?;
            if id.path().is_empty() {
                let td: &TrustDomain = id.trust_domain();
                if td == &snap.bundle.trust_domain {
                    Some(trusted_ca_secret(name, &snap.bundle))
                } else {
                    federated_for(snap, ids).get(td).map(|b| trusted_ca_secret(name, b))
                }
            } else {
                ids.iter().find(|s| s.entry.spiffe_id == id).map(|s| tls_secret(name, s))
            }
        }
        _ => None,
    }
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
fn sotw(names: &[String], snap: &Snapshot, sel: &[Selector]) -> (Vec<Any>, String) {
    let ids = snap.identities(sel);
    let any: Vec<Any> = names.iter().filter_map(|n| secret_for(n, snap, &ids)).map(to_any).collect();
    let parts: Vec<&[u8]> = any.iter().map(|a| a.value.as_slice()).collect();
    let version = version_of(&parts);
    (any, version)
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
                    }
                    let names = match checked_names(r.resource_names) {
                        Ok(n) => n,
                        Err(e) => return Some(Err(e)),
                    };
                    if self.names.as_ref() != Some(&names) {
                        self.names = Some(names);
                    }
                }
                c = self.snaps.changed() => if c.is_err() { return None },
            }
            let Some(n) = &self.names else { continue };
            let snap = self.snaps.borrow_and_update().clone();
            let (mut resources, version) = sotw(n, &snap, &self.caller.selectors);
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
            return Some(Ok(DeltaDiscoveryResponse {
                system_version_info: snap.generation.to_string(),
                resources,
                type_url: SECRET_TYPE.into(),
                removed_resources: removed,
                nonce: self.nonces.next(),
                ..Default::default()
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
        let state = Sotw {
            inbound: req.into_inner(),
            snaps: self.mgr.subscribe(),
            caller,
            names: None,
            sent_version: String::new(),
            last_nonce: String::new(),
            nonces: Nonces(0),
            _open: OpenStream::new(self.mgr.metrics.clone(), StreamKind::Sds),
        };
        Ok(Response::new(respond(state)))
    }

    /// `FetchSecrets`: one answer.
    pub async fn fetch_secrets(&self, req: Request<DiscoveryRequest>) -> Result<Response<DiscoveryResponse>, Status> {
        let caller = self.callers.attest(&req).await?;
        let names = checked_names(req.into_inner().resource_names)?;
        let (resources, version) = sotw(&names, &self.mgr.snapshot(), &caller.selectors);
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
        let state = Delta {
            inbound: req.into_inner(),
            snaps: self.mgr.subscribe(),
            caller,
            subscribed: BTreeSet::new(),
            held: BTreeMap::new(),
            nonces: Nonces(0),
            first: true,
            _open: OpenStream::new(self.mgr.metrics.clone(), StreamKind::Sds),
        };
        Ok(Response::new(respond(state)))
    }
}
