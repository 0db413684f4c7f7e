//! Frames over rings: one frame per ring record, large messages split into fragments and reassembled.

use std::collections::HashMap;

use rkyv::util::AlignedVec;

use crate::error::TransportError;
use crate::protocol::frame::{FLAG_CONTINUATION, FLAG_MORE_FRAGMENTS, FLAG_NO_CRC};
use crate::protocol::{self, FrameError, FrameHeader, Message, MessageType, FRAME_HEADER_LEN};
use crate::ring::{self, RecordSink, RingConsumer, RingProducer};

/// Writes frames into a ring.
pub struct FrameSender {
    producer: RingProducer,
    /// Largest payload of one fragment (a quarter of the ring, so several frames are in flight).
    max_fragment: usize,
    /// Flags added to every frame (`FLAG_NO_CRC` when the CRC is switched off).
    extra_flags: u8,
}

impl FrameSender {
    pub fn new(producer: RingProducer) -> Self {
        let capacity = producer.capacity();
        let max_fragment =
            (capacity / 4).min(ring::max_record_payload(capacity)) - FRAME_HEADER_LEN;
        Self {
            producer,
            max_fragment,
            extra_flags: 0,
        }
    }

    /// Switches the frame CRC on (the default) or off for frames sent from now on (see `FLAG_NO_CRC`).
    pub fn set_crc(&mut self, on: bool) {
        self.extra_flags = if on { 0 } else { FLAG_NO_CRC };
    }

    pub fn max_fragment(&self) -> usize {
        self.max_fragment
    }

    #[cfg(feature = "test-hooks")]
    pub(crate) fn raw_producer(&mut self) -> &mut RingProducer {
        &mut self.producer
    }

    /// Writes as many fragments of `payload` as fit, starting at `*progress` bytes already sent, and publishes
    /// them (with anything queued before) in one store. Returns true once the whole message is in the ring. A
    /// message that fits one fragment is sent as a single frame.
    pub fn try_send(
        &mut self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
        progress: &mut usize,
    ) -> Result<bool, TransportError> {
        let result = self.write_fragments(message_type, message_id, payload, progress);
        self.producer.publish();
        result
    }

    /// Writes one message that fits a single fragment without publishing it: a batch of `queue` calls ends
    /// with one [`FrameSender::publish`]. Returns `Ok(false)` (nothing written) when the message needs
    /// fragmenting or the ring is full; publish and ring the peer before waiting.
    pub fn queue(
        &mut self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
    ) -> Result<bool, TransportError> {
        if payload.len() > self.max_fragment {
            return Ok(false);
        }
        let mut progress = 0;
        self.write_fragments(message_type, message_id, payload, &mut progress)
    }

    /// Publishes every queued frame. Returns true when there was something to publish.
    pub fn publish(&mut self) -> bool {
        self.producer.publish()
    }

    fn write_fragments(
        &mut self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
        progress: &mut usize,
    ) -> Result<bool, TransportError> {
        if payload.len() > u32::MAX as usize {
            return Err(TransportError::MessageTooLarge {
                len: payload.len(),
                max: u32::MAX as usize,
            });
        }
        loop {
            let start = *progress;
            let end = (start + self.max_fragment).min(payload.len());
            let piece = &payload[start..end];
            let mut flags = self.extra_flags;
            if start > 0 {
                flags |= FLAG_CONTINUATION;
            }
            if end < payload.len() {
                flags |= FLAG_MORE_FRAGMENTS;
            }
            let header = FrameHeader::new(message_type, flags, piece.len() as u32, message_id);
            let written =
                self.producer
                    .try_write_unpublished(FRAME_HEADER_LEN + piece.len(), |out| {
                        let (head, body) = out.split_at_mut(FRAME_HEADER_LEN);
                        let mut encoded = [0u8; FRAME_HEADER_LEN];
                        header.encode_into(piece, &mut encoded);
                        head.copy_from_slice(&encoded);
                        body.copy_from_slice(piece);
                    })?;
            if !written {
                return Ok(false);
            }
            *progress = end;
            if end == payload.len() {
                return Ok(true);
            }
        }
    }

    /// True when a fragment of `payload_len` bytes (capped at one fragment) would fit now.
    pub fn has_space_for(&mut self, payload_len: usize) -> Result<bool, TransportError> {
        let used = self.producer.used_bytes()? as usize;
        Ok(self.producer.capacity() - used >= self.space_needed(payload_len))
    }

    /// Cheap, unvalidated version of [`FrameSender::has_space_for`] for spinning waiters.
    pub fn may_have_space_for(&self, payload_len: usize) -> bool {
        let used = self.producer.used_bytes_hint() as usize;
        self.producer.capacity().saturating_sub(used) >= self.space_needed(payload_len)
    }

    /// Free bytes that guarantee the next fragment fits: worst case a padding record of up to the record's
    /// size precedes it.
    fn space_needed(&self, payload_len: usize) -> usize {
        let record = ring::RECORD_HEADER_LEN * 2
            + FRAME_HEADER_LEN
            + payload_len.min(self.max_fragment).div_ceil(8) * 8;
        2 * record
    }

    pub fn set_waiting_for_space(&self, waiting: bool) {
        self.producer.set_waiting_for_space(waiting);
    }
}

/// Copies one ring record straight into a header array and an aligned payload buffer (one copy, no allocation
/// once the buffer has grown).
struct FrameSink<'a> {
    header: [u8; FRAME_HEADER_LEN],
    payload: &'a mut AlignedVec,
    record_len: usize,
}

impl RecordSink for FrameSink<'_> {
    fn accept(&mut self, record: &[u8]) {
        self.record_len = record.len();
        self.payload.clear();
        if record.len() >= FRAME_HEADER_LEN {
            self.header.copy_from_slice(&record[..FRAME_HEADER_LEN]);
            self.payload.extend_from_slice(&record[FRAME_HEADER_LEN..]);
        }
    }
}

/// A complete message just received; its payload is 16-byte aligned for zero-copy rkyv access.
#[derive(Debug)]
pub struct ReceivedMessage<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

impl<'a> ReceivedMessage<'a> {
    pub fn message_type(&self) -> Option<MessageType> {
        MessageType::from_code(self.header.message_type)
    }

    pub fn id(&self) -> u64 {
        self.header.message_id
    }

    /// Validates the payload as `M` and returns the archived view (no copy). A bad payload is an error.
    pub fn decode<M>(&self) -> Result<&'a M::Archived, TransportError>
    where
        M: Message,
        M::Archived: for<'b> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
            > + rkyv::Portable,
    {
        if self.header.message_type != M::TYPE.code() {
            return Err(TransportError::Protocol(format!(
                "expected {}, got message type {}",
                M::TYPE.name(),
                self.header.message_type
            )));
        }
        Ok(protocol::decode::<M>(self.payload)?)
    }

    /// Validates and deserializes into an owned `M`.
    pub fn decode_owned<M>(&self) -> Result<M, TransportError>
    where
        M: Message,
        M::Archived: for<'b> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
            > + rkyv::Portable
            + rkyv::Deserialize<M, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let archived = self.decode::<M>()?;
        Ok(rkyv::deserialize::<M, rkyv::rancor::Error>(archived)?)
    }
}

/// What a receive attempt produced.
#[derive(Debug)]
pub enum Received {
    /// Nothing complete yet.
    Nothing,
    /// A message is ready: read it with [`FrameReceiver::message`].
    Message,
    /// A frame was well-formed but not acceptable (unknown version or flags, too large): answer with an error
    /// frame for `message_id`, the connection stays up.
    Rejected { message_id: u64, error: FrameError },
}

/// How many fragmented messages one peer may have started and not finished.
pub const MAX_PARTIAL_MESSAGES: usize = 8;

struct Partial {
    message_type: u16,
    bytes: AlignedVec,
}

/// Reads frames from a ring, verifies them and reassembles fragmented messages.
pub struct FrameReceiver {
    consumer: RingConsumer,
    max_message: u32,
    header: FrameHeader,
    frame_payload: AlignedVec,
    assembled: AlignedVec,
    current_is_assembled: bool,
    partials: HashMap<u64, Partial>,
}

impl FrameReceiver {
    pub fn new(consumer: RingConsumer, max_message: u32) -> Self {
        let capacity = consumer.capacity();
        let mut frame_payload = AlignedVec::new();
        frame_payload.reserve(capacity / 2);
        Self {
            consumer,
            max_message,
            header: FrameHeader::new(0, 0, 0, 0),
            frame_payload,
            assembled: AlignedVec::new(),
            current_is_assembled: false,
            partials: HashMap::new(),
        }
    }

    pub fn consumer(&self) -> &RingConsumer {
        &self.consumer
    }

    /// All unfinished fragmented messages together may hold at most one maximum-size message's bytes, so a
    /// peer that starts many and never finishes them cannot exhaust memory.
    fn check_partial_bytes(&self) -> Result<(), TransportError> {
        let held: u64 = self.partials.values().map(|p| p.bytes.len() as u64).sum();
        if held > u64::from(self.max_message) {
            return Err(TransportError::Protocol(format!(
                "unfinished fragmented messages hold {held} bytes (limit {})",
                self.max_message
            )));
        }
        Ok(())
    }

    pub fn has_data(&self) -> bool {
        self.consumer.has_data()
    }

    /// Reads records until a whole message is available or the ring is empty. A fatal error means the byte
    /// stream can't be trusted: close the connection.
    pub fn poll(&mut self) -> Result<Received, TransportError> {
        loop {
            let mut sink = FrameSink {
                header: [0u8; FRAME_HEADER_LEN],
                payload: &mut self.frame_payload,
                record_len: 0,
            };
            if !self.consumer.read_into(&mut sink)? {
                return Ok(Received::Nothing);
            }
            let header_bytes = sink.header;
            let record_len = sink.record_len;
            if record_len < FRAME_HEADER_LEN {
                return Err(FrameError::Truncated {
                    got: record_len,
                    need: FRAME_HEADER_LEN,
                }
                .into());
            }
            let header = match FrameHeader::verify_parts(
                &header_bytes,
                &self.frame_payload,
                self.max_message,
            ) {
                Ok(h) => h,
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    let (h, _) = FrameHeader::parse_unchecked(&header_bytes)?;
                    self.partials.remove(&h.message_id);
                    return Ok(Received::Rejected {
                        message_id: h.message_id,
                        error: e,
                    });
                }
            };
            let more = header.flags & FLAG_MORE_FRAGMENTS != 0;
            let continuation = header.flags & FLAG_CONTINUATION != 0;
            match (continuation, more) {
                (false, false) => {
                    // A sender whose fragmented send was abandoned (cancelled) may reuse the id: the stale
                    // fragments are dropped, the new message stands on its own. (No hashing on the common path.)
                    if !self.partials.is_empty() {
                        self.partials.remove(&header.message_id);
                    }
                    self.header = header;
                    self.current_is_assembled = false;
                    return Ok(Received::Message);
                }
                (false, true) => {
                    // A restart of the same id replaces its abandoned fragments (see above).
                    self.partials.remove(&header.message_id);
                    if self.partials.len() >= MAX_PARTIAL_MESSAGES {
                        return Err(TransportError::Protocol(format!(
                            "more than {MAX_PARTIAL_MESSAGES} fragmented messages outstanding"
                        )));
                    }
                    let mut bytes = AlignedVec::new();
                    bytes.extend_from_slice(&self.frame_payload);
                    self.partials.insert(
                        header.message_id,
                        Partial {
                            message_type: header.message_type,
                            bytes,
                        },
                    );
                    self.check_partial_bytes()?;
                }
                (true, _) => {
                    let Some(partial) = self.partials.get_mut(&header.message_id) else {
                        return Err(TransportError::Protocol(format!(
                            "continuation of unknown message {}",
                            header.message_id
                        )));
                    };
                    if partial.message_type != header.message_type {
                        return Err(TransportError::Protocol(format!(
                            "fragment type changed within message {}",
                            header.message_id
                        )));
                    }
                    let total = partial.bytes.len() as u64 + self.frame_payload.len() as u64;
                    if total > u64::from(self.max_message) {
                        self.partials.remove(&header.message_id);
                        return Ok(Received::Rejected {
                            message_id: header.message_id,
                            error: FrameError::TooLarge {
                                len: total,
                                max: self.max_message,
                            },
                        });
                    }
                    partial.bytes.extend_from_slice(&self.frame_payload);
                    self.check_partial_bytes()?;
                    if !more {
                        let Some(done) = self.partials.remove(&header.message_id) else {
                            continue;
                        };
                        self.assembled = done.bytes;
                        self.header = FrameHeader {
                            flags: 0,
                            payload_len: self.assembled.len() as u32,
                            ..header
                        };
                        self.current_is_assembled = true;
                        return Ok(Received::Message);
                    }
                }
            }
        }
    }

    /// The message made available by the last `poll` that returned [`Received::Message`].
    pub fn message(&self) -> ReceivedMessage<'_> {
        let payload: &[u8] = if self.current_is_assembled {
            &self.assembled
        } else {
            &self.frame_payload
        };
        ReceivedMessage {
            header: self.header,
            payload,
        }
    }

    /// True when the peer announced it waits for space in this ring (and clears that announcement).
    pub fn take_peer_waiting_for_space(&self) -> bool {
        self.consumer.take_producer_waiting()
    }
}

/// A frame sender shared by async tasks: writes without blocking and awaits ring space when full.
/// The thread that watches the peer (reactor or client pump) calls [`AsyncWriter::wake_if_space`].
pub struct AsyncWriter {
    sender: std::sync::Mutex<FrameSender>,
    space: tokio::sync::Notify,
    space_waiters: std::sync::atomic::AtomicBool,
    timeout: std::time::Duration,
}

impl AsyncWriter {
    pub fn new(sender: FrameSender, timeout: std::time::Duration) -> Self {
        Self {
            sender: std::sync::Mutex::new(sender),
            space: tokio::sync::Notify::new(),
            space_waiters: std::sync::atomic::AtomicBool::new(false),
            timeout,
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, FrameSender> {
        crate::util::lock(&self.sender)
    }

    /// Writes a message that fits one fragment, or returns `Ok(false)` without waiting.
    pub fn try_send(
        &self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
    ) -> Result<bool, TransportError> {
        let mut sender = self.lock();
        if payload.len() > sender.max_fragment() {
            return Ok(false);
        }
        let mut progress = 0;
        sender.try_send(message_type, message_id, payload, &mut progress)
    }

    /// Sends `payload` (fragmenting it when large), awaiting ring space. `ring_peer` wakes the reader after
    /// each write; `check_open` fails fast when the connection died.
    pub async fn send(
        &self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
        ring_peer: impl Fn(),
        check_open: impl Fn() -> Result<(), TransportError>,
    ) -> Result<(), TransportError> {
        let mut progress = 0;
        loop {
            check_open()?;
            let space = self.space.notified();
            tokio::pin!(space);
            {
                let mut sender = self.lock();
                let before = progress;
                let done = sender.try_send(message_type, message_id, payload, &mut progress)?;
                if done || progress != before {
                    ring_peer();
                }
                if done {
                    return Ok(());
                }
                // Full: register for the wake-up, announce it, then re-check so no wake-up is lost.
                space.as_mut().enable();
                self.space_waiters
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                sender.set_waiting_for_space(true);
                if sender.has_space_for(payload.len() - progress)? {
                    continue;
                }
            }
            if tokio::time::timeout(self.timeout, space).await.is_err() {
                return Err(TransportError::Timeout(
                    "waiting for the peer to read (ring full)",
                ));
            }
        }
    }

    /// True when a task waits for space and space is available now (cheap; never blocks on the lock).
    pub fn space_wanted_and_available(&self) -> bool {
        self.space_waiters
            .load(std::sync::atomic::Ordering::Relaxed)
            && match self.sender.try_lock() {
                Ok(mut sender) => sender.has_space_for(1).unwrap_or(true),
                // A sender holds the lock right now (it may be registering as a waiter): look again instead
                // of sleeping through its wait. Sleeping here lost wake-ups under CPU load: the waiter then
                // sat until its 30 s send timeout.
                Err(_) => true,
            }
    }

    /// Wakes tasks waiting for space if there is some. Returns true if it woke anyone.
    pub fn wake_if_space(&self) -> bool {
        if !self
            .space_waiters
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return false;
        }
        let has_space = self.lock().has_space_for(1).unwrap_or(true);
        if has_space {
            self.space_waiters
                .store(false, std::sync::atomic::Ordering::Release);
            self.space.notify_waiters();
        }
        has_space
    }

    /// Wakes every waiter (the connection closed).
    pub fn wake_all(&self) {
        self.space.notify_waiters();
    }
}
