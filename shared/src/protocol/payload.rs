//! rkyv payload encoding into a reused buffer and validated zero-copy access on receipt.

use super::messages::Message;
use rkyv::rancor;
use rkyv::util::AlignedVec;

/// Serializes payloads into a reused aligned buffer and arena, so steady-state encoding does not allocate.
#[derive(Default)]
pub struct PayloadEncoder {
    buffer: AlignedVec,
    arena: rkyv::ser::allocator::Arena,
}

impl PayloadEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serializes `message` and returns its bytes (valid until the next call).
    pub fn encode<M: Message>(&mut self, message: &M) -> Result<&[u8], rancor::Error> {
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        let buffer =
            rkyv::api::high::to_bytes_in_with_alloc(message, buffer, self.arena.acquire())?;
        self.buffer = buffer;
        Ok(&self.buffer)
    }
}

/// One-off serialization (allocates); prefer [`PayloadEncoder`] on hot paths.
pub fn encode<M: Message>(message: &M) -> Result<AlignedVec, rancor::Error> {
    rkyv::to_bytes::<rancor::Error>(message)
}

/// Validates `bytes` as an archived `M` and returns a reference into them (no copy).
/// `bytes` must be 16-byte aligned (the transport's receive buffers are).
pub fn decode<M>(bytes: &[u8]) -> Result<&M::Archived, rancor::Error>
where
    M: Message,
    M::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Portable,
{
    rkyv::access::<M::Archived, rancor::Error>(bytes)
}
