//! The gRPC routing for Envoy's `SecretDiscoveryService`, written here rather than generated
//! (`tessera-proto` generates only the client from `proto/envoy/`).
//!
//! Why: this was written when the messages came from envoy-types, whose generated server fixes
//! tonic's default codec (an 8 KiB decode buffer and an 8 KiB encode buffer per stream). Envoy
//! holds one SDS stream per secret it watches, for as long as it runs, and a node has many
//! Envoys; the buffers were half of what 1,000 idle streams cost. Here the codec is
//! [`LeanCodec`], whose buffers start at 512 bytes.
//!
//! What it is not: the SDS logic. That is [`crate::sds::Sds`]; this only maps the three paths to
//! its methods.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tessera_proto::codec::LeanCodec;
use tessera_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tonic::body::Body;
use tonic::codegen::{Body as HttpBody, BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService, UnaryService};
use tonic::{Request, Response, Status, Streaming};

use crate::sds::Sds;
use crate::streams::ResponseStream;

/// The gRPC service name Envoy calls.
pub const SERVICE_NAME: &str = "envoy.service.secret.v3.SecretDiscoveryService";
const STREAM: &str = "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets";
const DELTA: &str = "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets";
const FETCH: &str = "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets";

/// Largest SDS answer the agent sends.
const MAX_ENCODING: usize = 16 * 1024 * 1024;

/// The SDS service for tonic's router.
#[derive(Debug, Clone)]
pub struct SdsServer {
    sds: Arc<Sds>,
    max_decoding: usize,
}

impl SdsServer {
    /// Serves `sds`, refusing request messages above `max_decoding` bytes.
    pub fn new(sds: Sds, max_decoding: usize) -> Self {
        Self { sds: Arc::new(sds), max_decoding }
    }

    fn grpc<T, U>(&self) -> Grpc<LeanCodec<T, U>>
    where
        T: prost::Message + tessera_proto::codec::Scrub + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        // Answers are bounded too: a few secrets per stream, never megabytes.
        Grpc::new(LeanCodec::default()).apply_max_message_size_config(Some(self.max_decoding), Some(MAX_ENCODING))
    }
}

impl NamedService for SdsServer {
    const NAME: &'static str = SERVICE_NAME;
}

struct StreamSecrets(Arc<Sds>);

impl StreamingService<DiscoveryRequest> for StreamSecrets {
    type Response = DiscoveryResponse;
    type ResponseStream = ResponseStream<DiscoveryResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<Streaming<DiscoveryRequest>>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.stream_secrets(req).await })
    }
}

struct DeltaSecrets(Arc<Sds>);

impl StreamingService<DeltaDiscoveryRequest> for DeltaSecrets {
    type Response = DeltaDiscoveryResponse;
    type ResponseStream = ResponseStream<DeltaDiscoveryResponse>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, req: Request<Streaming<DeltaDiscoveryRequest>>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.delta_secrets(req).await })
    }
}

struct FetchSecrets(Arc<Sds>);

impl UnaryService<DiscoveryRequest> for FetchSecrets {
    type Response = DiscoveryResponse;
    type Future = BoxFuture<Response<DiscoveryResponse>, Status>;

    fn call(&mut self, req: Request<DiscoveryRequest>) -> Self::Future {
        let sds = self.0.clone();
        Box::pin(async move { sds.fetch_secrets(req).await })
    }
}

impl<B> Service<http::Request<B>> for SdsServer
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let sds = self.sds.clone();
        match req.uri().path() {
            STREAM => {
                let mut grpc = self.grpc();
                Box::pin(async move { Ok(grpc.streaming(StreamSecrets(sds), req).await) })
            }
            DELTA => {
                let mut grpc = self.grpc();
                Box::pin(async move { Ok(grpc.streaming(DeltaSecrets(sds), req).await) })
            }
            FETCH => {
                let mut grpc = self.grpc();
                Box::pin(async move { Ok(grpc.unary(FetchSecrets(sds), req).await) })
            }
            _ => Box::pin(async move { Ok(Status::unimplemented("no such SDS method").into_http()) }),
        }
    }
}
