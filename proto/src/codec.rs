//! The agent link's gRPC codec: prost's encoding with small initial buffers.
//!
//! tonic's default codec gives every stream an 8 KiB encode buffer and an
//! 8 KiB decode buffer for its whole life. A session is one long-lived
//! stream whose messages are a few hundred bytes, and a hub holds one per
//! node: at 10,000 nodes the defaults alone were 160 MiB of the hub's heap
//! (heaptrack, BENCHMARKS.md). The buffers still grow to fit a large message
//! (a desired state with components is a few KiB).

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a stream's encode and decode buffers.
const BUFFER_SIZE: usize = 1024;
/// Encoded messages that are ready together go out as one chunk up to this
/// size (tonic's default), so a burst of reports still batches.
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD)
}

/// Named in the generated `AgentLink` client and server (see build.rs).
#[derive(Debug, Clone)]
pub struct LinkCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LinkCodec<T, U> {
    fn default() -> Self {
        LinkCodec(PhantomData)
    }
}

impl<T, U> Codec for LinkCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(settings())
    }
}
