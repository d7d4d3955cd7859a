//! A prost codec whose per-stream buffers start small.
//!
//! tonic's default codec gives every stream an 8 KiB decode buffer and an 8 KiB encode
//! buffer for as long as the stream lives. Streams that stay open for hours and carry a
//! message now and then (Envoy's SDS streams, Workload API watches) would pay 16 KiB each for
//! nothing. These buffers start at [`BUFFER`] bytes and grow only while a message needs it.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

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
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }
}
