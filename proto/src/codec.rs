//! A prost codec whose per-stream buffers start small, and that clears the secrets a message
//! holds (private keys, tokens) once it is encoded.
//!
//! tonic's default codec gives every stream an 8 KiB decode buffer and an 8 KiB encode
//! buffer for as long as the stream lives. Streams that stay open for hours and carry a
//! message now and then (Envoy's SDS streams, Workload API watches, every agent's
//! `WatchChanges` stream on the server) would pay 16 KiB each for nothing. These buffers
//! start at [`BUFFER`] bytes and grow only while a message needs it.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::ProstDecoder;
use zeroize::Zeroize;

/// Initial size of a stream's encode and decode buffers.
pub const BUFFER: usize = 512;
/// tonic yields an encoded batch once it passes this size (its default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Prost encoding with small initial buffers.
#[derive(Debug)]
pub struct LeanCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Scrub + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ScrubbingEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ScrubbingEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}

/// Encodes a message, then clears what [`Scrub`] says is secret in it: the message is the
/// last copy of a key or token this process made, and it is dropped right after.
#[derive(Debug)]
pub struct ScrubbingEncoder<T>(PhantomData<fn(T)>);

impl<T: prost::Message + Scrub> Encoder for ScrubbingEncoder<T> {
    type Item = T;
    type Error = tonic::Status;

    fn encode(&mut self, mut item: T, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        let r = item.encode(dst).map_err(|e| tonic::Status::internal(format!("encoding a message: {e}")));
        item.scrub();
        r
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER, YIELD_THRESHOLD)
    }
}

/// A message that may hold secrets clears them here (after it was encoded). Most hold none.
pub trait Scrub {
    /// Zeroes the secret bytes the message holds.
    fn scrub(&mut self) {}
}

macro_rules! no_secrets {
    ($($t:ty),* $(,)?) => { $(impl Scrub for $t {})* };
}

use crate::agent::v1 as ag;
use crate::envoy::service::discovery::v3 as xds;
use crate::workload as wl;

no_secrets!(
    wl::X509svidRequest,
    wl::X509BundlesRequest,
    wl::X509BundlesResponse,
    wl::JwtsvidRequest,
    wl::JwtBundlesRequest,
    wl::JwtBundlesResponse,
    wl::ValidateJwtsvidResponse,
    xds::DiscoveryRequest,
    xds::DeltaDiscoveryRequest,
    ag::AttestAgentResponse,
    ag::RenewAgentRequest,
    ag::RenewAgentResponse,
    ag::SyncEntriesRequest,
    ag::SyncEntriesResponse,
    ag::BatchNewX509SvidRequest,
    ag::BatchNewX509SvidResponse,
    ag::NewJwtSvidRequest,
    ag::FetchBundlesRequest,
    ag::FetchBundlesResponse,
    ag::MintDownstreamX509CaRequest,
    ag::MintDownstreamX509CaResponse,
    ag::WatchChangesRequest,
    ag::WatchChangesResponse,
);

/// The attestation payload is a join token (or a Kubernetes service-account token).
impl Scrub for ag::AttestAgentRequest {
    fn scrub(&mut self) {
        if let Some(d) = &mut self.data {
            d.payload.zeroize();
        }
    }
}

/// A JWT-SVID is a bearer token.
impl Scrub for ag::NewJwtSvidResponse {
    fn scrub(&mut self) {
        self.token.zeroize();
    }
}

impl Scrub for wl::X509svidResponse {
    fn scrub(&mut self) {
        for s in &mut self.svids {
            s.x509_svid_key.zeroize();
        }
    }
}

impl Scrub for wl::JwtsvidResponse {
    fn scrub(&mut self) {
        for s in &mut self.svids {
            s.svid.zeroize();
        }
    }
}

impl Scrub for wl::ValidateJwtsvidRequest {
    fn scrub(&mut self) {
        self.svid.zeroize();
    }
}

/// SDS resources are encoded `Secret`s, private keys inside.
impl Scrub for xds::DiscoveryResponse {
    fn scrub(&mut self) {
        for r in &mut self.resources {
            r.value.zeroize();
        }
    }
}

impl Scrub for xds::DeltaDiscoveryResponse {
    fn scrub(&mut self) {
        for r in &mut self.resources {
            if let Some(a) = &mut r.resource {
                a.value.zeroize();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message;

    #[test]
    fn keys_and_tokens_are_cleared_once_encoded() {
        let mut m = wl::X509svidResponse {
            svids: vec![wl::X509svid { x509_svid_key: vec![7; 32], ..Default::default() }],
            ..Default::default()
        };
        let bytes = m.encode_to_vec();
        assert!(bytes.windows(32).any(|w| w == [7; 32]), "the key was encoded");
        m.scrub();
        assert!(m.svids[0].x509_svid_key.is_empty());
        let mut d = xds::DiscoveryResponse {
            resources: vec![prost_types::Any { type_url: "t".into(), value: vec![9; 8] }],
            ..Default::default()
        };
        d.scrub();
        assert!(d.resources[0].value.is_empty());
        let mut a = ag::AttestAgentRequest {
            data: Some(ag::AttestationData { r#type: "join_token".into(), payload: b"secret-token".to_vec() }),
            ..Default::default()
        };
        a.scrub();
        assert!(a.data.unwrap().payload.is_empty());
        let mut j = ag::NewJwtSvidResponse { token: "eyJhbGciOi".into(), ..Default::default() };
        j.scrub();
        assert!(j.token.is_empty());
    }
}
