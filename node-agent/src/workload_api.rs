//! The SPIFFE Workload API on the agent socket (SPIFFE Workload API spec): every call needs the
//! `workload.spiffe.io: true` header (else InvalidArgument); a caller whose selectors match no
//! entry gets PermissionDenied; the streaming calls push a new message on every change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use tessera_identity::{Bundle, TrustDomain, unix_now};
use tessera_proto::codec::Scrub;
use tessera_proto::workload as wl;
use tessera_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use tonic::{Request, Response, Status};

use crate::callers::{Caller, Callers};
use crate::manager::{Manager, Snapshot, WorkloadSvid};
use crate::streams::{OpenStream, Responder, ResponseStream, StreamKind, respond};

/// The header every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    mgr: Arc<Manager>,
    callers: Callers,
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v == "true" => Ok(()),
        _ => Err(Status::invalid_argument("security header missing from request")),
    }
}

fn no_identity() -> Status {
    Status::permission_denied("no identity issued")
}

fn concat_der(b: &Bundle) -> Vec<u8> {
    b.x509_authorities.iter().flat_map(|c| c.as_ref().iter().copied()).collect()
}

/// Trust domains whose bundles the caller's identities federate with.
pub(crate) fn federated_for<'a>(
    snap: &'a Snapshot,
    ids: &[Arc<WorkloadSvid>],
) -> BTreeMap<&'a TrustDomain, &'a Arc<Bundle>> {
    let wanted: BTreeSet<&TrustDomain> = ids.iter().flat_map(|s| s.entry.federates_with.iter()).collect();
    snap.federated.iter().filter(|(td, _)| wanted.contains(td)).collect()
}

fn x509_response(snap: &Snapshot, ids: &[Arc<WorkloadSvid>]) -> wl::X509svidResponse {
    let bundle = concat_der(&snap.bundle);
    wl::X509svidResponse {
        svids: ids
            .iter()
            .map(|s| wl::X509svid {
                spiffe_id: s.entry.spiffe_id.to_string(),
                x509_svid: s.chain.concat(),
                x509_svid_key: s.key.pkcs8_der().to_vec(),
                bundle: bundle.clone(),
                hint: s.entry.hint.clone(),
            })
            .collect(),
        crl: vec![],
        federated_bundles: federated_for(snap, ids)
            .into_iter()
            .map(|(td, b)| (td.id_string(), concat_der(b)))
            .collect(),
    }
}

fn x509_bundles(snap: &Snapshot, ids: &[Arc<WorkloadSvid>]) -> wl::X509BundlesResponse {
    let mut bundles: std::collections::HashMap<String, Vec<u8>> =
        federated_for(snap, ids).into_iter().map(|(td, b)| (td.id_string(), concat_der(b))).collect();
    bundles.insert(snap.bundle.trust_domain.id_string(), concat_der(&snap.bundle));
    wl::X509BundlesResponse { crl: vec![], bundles }
}

/// A JWKS holding only a bundle's JWT keys (what JWT bundle parsers expect).
fn jwt_jwks(b: &Bundle) -> Vec<u8> {
    let mut only_jwt = Bundle::new(b.trust_domain.clone());
    only_jwt.jwt_authorities = b.jwt_authorities.clone();
    only_jwt.sequence_number = b.sequence_number;
    only_jwt.to_jwks().map(String::into_bytes).unwrap_or_default()
}

fn jwt_bundles(snap: &Snapshot, ids: &[Arc<WorkloadSvid>]) -> wl::JwtBundlesResponse {
    let mut bundles: std::collections::HashMap<String, Vec<u8>> =
        federated_for(snap, ids).into_iter().map(|(td, b)| (td.id_string(), jwt_jwks(b))).collect();
    bundles.insert(snap.bundle.trust_domain.id_string(), jwt_jwks(&snap.bundle));
    wl::JwtBundlesResponse { bundles }
}

impl WorkloadApi {
    /// A service over the manager's snapshots.
    pub fn new(mgr: Arc<Manager>, callers: Callers) -> Self {
        Self { mgr, callers }
    }

    /// Streams `build(snapshot, identities)` on every change until the client goes away; ends
    /// with PermissionDenied when the caller has (or comes to have) no identity. The stream is
    /// polled by its connection (no task or channel of its own) and remembers only a digest of
    /// what it last sent.
    fn stream<T, F>(&self, caller: Caller, build: F) -> ResponseStream<T>
    where
        T: prost::Message + Scrub + Send + 'static,
        F: Fn(&Snapshot, &[Arc<WorkloadSvid>]) -> T + Send + 'static,
    {
        let watch = Watch {
            snaps: self.mgr.subscribe(),
            caller,
            build,
            last: None,
            first: true,
            ended: false,
            mgr: self.mgr.clone(),
            _open: OpenStream::new(self.mgr.metrics.clone(), StreamKind::Workload),
        };
        respond(watch)
    }
}

/// One streaming call's state.
struct Watch<F> {
    snaps: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    caller: Caller,
    build: F,
    /// SHA-256 of the last message sent.
    last: Option<ring::digest::Digest>,
    first: bool,
    ended: bool,
    mgr: Arc<Manager>,
    _open: OpenStream,
}

impl<T, F> Responder for Watch<F>
where
    T: prost::Message + Scrub + Send + 'static,
    F: Fn(&Snapshot, &[Arc<WorkloadSvid>]) -> T + Send + 'static,
{
    type Message = T;

    async fn next(&mut self) -> Option<Result<T, Status>> {
        if self.ended {
            return None;
        }
        loop {
            if !self.first && self.snaps.changed().await.is_err() {
                return None;
            }
            self.first = false;
            let snap = self.snaps.borrow_and_update().clone();
            let ids = snap.identities(&self.caller.selectors);
            if ids.is_empty() {
                self.ended = true;
                return Some(Err(no_identity()));
            }
            if let Err(e) = self.caller.check() {
                self.ended = true;
                return Some(Err(e));
            }
            let mut msg = (self.build)(&snap, &ids);
            let encoded = zeroize::Zeroizing::new(msg.encode_to_vec());
            let digest = ring::digest::digest(&ring::digest::SHA256, &encoded);
            if self.last.as_ref().map(AsRef::as_ref) != Some(digest.as_ref()) {
                self.last = Some(digest);
                self.mgr.mark_served(&ids);
                return Some(Ok(msg));
            }
            // Not sent: clear the keys it holds before it is dropped.
            msg.scrub();
        }
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<wl::X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<wl::X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<wl::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<wl::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let caller = self.callers.attest(&req).await?;
        if self.mgr.snapshot().identities(&caller.selectors).is_empty() {
            return Err(no_identity());
        }
        Ok(Response::new(self.stream(caller, x509_response)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<wl::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        let caller = self.callers.attest(&req).await?;
        if self.mgr.snapshot().identities(&caller.selectors).is_empty() {
            return Err(no_identity());
        }
        Ok(Response::new(self.stream(caller, x509_bundles)))
    }

    async fn fetch_jwtsvid(&self, req: Request<wl::JwtsvidRequest>) -> Result<Response<wl::JwtsvidResponse>, Status> {
        check_header(&req)?;
        let caller = self.callers.attest(&req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.audience.iter().any(String::is_empty) {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        tessera_identity::jwt::check_audience(&r.audience).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut ids = self.mgr.snapshot().identities(&caller.selectors);
        if !r.spiffe_id.is_empty() {
            tessera_identity::SpiffeId::new(&r.spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("invalid SPIFFE ID {:?}: {e}", r.spiffe_id)))?;
            ids.retain(|s| s.entry.spiffe_id.to_string() == r.spiffe_id);
        }
        if ids.is_empty() {
            return Err(no_identity());
        }
        self.mgr.mark_served(&ids);
        let mut svids = Vec::with_capacity(ids.len());
        for s in &ids {
            let token = self.mgr.jwt_svid(&s.entry, &r.audience).await?;
            svids.push(wl::Jwtsvid {
                spiffe_id: s.entry.spiffe_id.to_string(),
                svid: token,
                hint: s.entry.hint.clone(),
            });
        }
        caller.check()?;
        Ok(Response::new(wl::JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<wl::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        let caller = self.callers.attest(&req).await?;
        if self.mgr.snapshot().identities(&caller.selectors).is_empty() {
            return Err(no_identity());
        }
        Ok(Response::new(self.stream(caller, jwt_bundles)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<wl::ValidateJwtsvidRequest>,
    ) -> Result<Response<wl::ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        let caller = self.callers.attest(&req).await?;
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // As SPIRE: our own bundle, and the federated bundles the caller's entries federate
        // with; a token of any other trust domain does not validate for this caller.
        let snap = self.mgr.snapshot();
        let ids = snap.identities(&caller.selectors);
        let federated = federated_for(&snap, &ids);
        let v = tessera_identity::jwt::validate(&r.svid, &r.audience, unix_now(), |td| {
            if *td == snap.bundle.trust_domain {
                Some(snap.bundle.as_ref())
            } else {
                federated.get(td).map(|b| b.as_ref())
            }
        })
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let c = &v.claims;
        let mut fields = BTreeMap::new();
        let s = |v: String| prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(v)) };
        let n = |v: i64| prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(v as f64)) };
        fields.insert("sub".to_owned(), s(c.sub.clone()));
        fields.insert(
            "aud".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(prost_types::ListValue {
                    values: c.aud.iter().cloned().map(s).collect(),
                })),
            },
        );
        fields.insert("exp".to_owned(), n(c.exp));
        if c.iat != 0 {
            fields.insert("iat".to_owned(), n(c.iat));
        }
        Ok(Response::new(wl::ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(prost_types::Struct { fields }),
        }))
    }
}
