//! The blocking client: claims a slot, creates its shared memory, handshakes, then sends and receives frames.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::{Duration, Instant};

use crate::doorbell::{self, SpinPolicy, WaitOutcome};
use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::framing::{FrameReceiver, FrameSender, Received, ReceivedMessage};
use crate::lockfile::{self, HeldLock, TryLock};
use crate::protocol::frame::DEFAULT_MAX_MESSAGE_BYTES;
use crate::protocol::{
    ArchivedErrorMessage, ErrorMessage, Goodbye, Hello, HelloAck, Message, MessageType,
    PayloadEncoder, PROTOCOL_VERSION,
};
use crate::segment::{EnginePage, SlotSegment};

/// Highest slot number a client will try.
pub const MAX_SLOTS: u32 = 4096;

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Shown in the engine's logs.
    pub client_name: String,
    pub client_to_server_ring_bytes: usize,
    pub server_to_client_ring_bytes: usize,
    /// Deadline for the whole handshake.
    pub connect_timeout: Duration,
    /// Largest reassembled message accepted from the engine.
    pub max_message_bytes: u32,
    /// Longest busy-wait before sleeping (adaptive below this).
    pub max_spin: Duration,
    /// How often a sleeping client re-checks that the engine is alive.
    pub liveness_interval: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_name: format!("pid {}", std::process::id()),
            client_to_server_ring_bytes: 64 * 1024,
            server_to_client_ring_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_spin: Duration::from_micros(50),
            liveness_interval: Duration::from_millis(20),
        }
    }
}

/// The engine as the client sees it: its lock file (liveness) and doorbell page.
pub(crate) struct EngineLink {
    pub(crate) endpoint: Endpoint,
    lock_file: File,
    page: EnginePage,
    /// The engine we connected to; a restarted engine publishes another number in the same page.
    incarnation: u64,
}

impl EngineLink {
    /// Opens the engine's lock file; `NoServer` unless an engine holds it and has published its page.
    pub(crate) fn open(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let path = endpoint.engine_lock_path();
        let no_server = || TransportError::NoServer(endpoint.name().to_owned());
        let lock_file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(no_server()),
            Err(e) => return Err(TransportError::io(format!("opening {}", path.display()), e)),
        };
        let alive = lockfile::is_locked_by_other(&lock_file)
            .map_err(|e| TransportError::io("probing the engine lock", e))?;
        if !alive {
            return Err(no_server());
        }
        let page = EnginePage::open(&lock_file)
            .map_err(|e| TransportError::io("mapping the engine page", e))?
            .ok_or_else(no_server)?;
        let incarnation = page.incarnation();
        if incarnation == 0 {
            // Locked, but still starting up.
            return Err(no_server());
        }
        Ok(Self {
            endpoint: endpoint.clone(),
            lock_file,
            page,
            incarnation,
        })
    }

    /// True while the engine we connected to holds its lock (not a restarted one on the same file).
    pub(crate) fn alive(&self) -> bool {
        self.page.incarnation() == self.incarnation
            && lockfile::is_locked_by_other(&self.lock_file).unwrap_or(false)
    }

    pub(crate) fn ring(&self) {
        self.page.bell().ring();
    }

    pub(crate) fn gone(&self) -> TransportError {
        TransportError::ServerGone(self.endpoint.name().to_owned())
    }
}

/// What the engine told us in its `HelloAck`.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub slot: u32,
    /// The slot segment's random generation: with `slot` and `server_pid`, names this connection uniquely.
    pub generation: u64,
    pub server_pid: u32,
    pub max_message_bytes: u32,
    pub stream_window_bytes: u32,
    pub server_name: String,
}

/// Everything a connected client owns; split between threads by the async client.
pub(crate) struct ClientParts {
    pub(crate) engine: EngineLink,
    pub(crate) segment: SlotSegment,
    pub(crate) slot_lock: Option<HeldLock>,
    pub(crate) sender: FrameSender,
    pub(crate) receiver: FrameReceiver,
    pub(crate) info: ConnectionInfo,
    pub(crate) options: ClientOptions,
}

impl ClientParts {
    fn connect(endpoint: &Endpoint, options: ClientOptions) -> Result<Self, TransportError> {
        endpoint.ensure_dirs()?;
        let engine = EngineLink::open(endpoint)?;
        let (slot, slot_lock) = claim_slot(endpoint)?;
        let segment = match SlotSegment::create(
            options.client_to_server_ring_bytes,
            options.server_to_client_ring_bytes,
            random_generation(),
        ) {
            Ok(segment) => segment,
            Err(e) => {
                slot_lock.remove();
                return Err(e);
            }
        };
        let result = Self::handshake(engine, segment, slot, &slot_lock, options);
        match result {
            Ok(mut parts) => {
                parts.slot_lock = Some(slot_lock);
                Ok(parts)
            }
            Err(e) => {
                slot_lock.remove();
                Err(e)
            }
        }
    }

    fn handshake(
        engine: EngineLink,
        segment: SlotSegment,
        slot: u32,
        slot_lock: &HeldLock,
        options: ClientOptions,
    ) -> Result<Self, TransportError> {
        // SAFETY: called once; the ends live inside ClientParts next to the segment that backs them.
        let (producer, consumer) = unsafe { segment.client_ends()? };
        let mut sender = FrameSender::new(producer);
        let mut receiver = FrameReceiver::new(consumer, options.max_message_bytes);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            client_to_server_ring_bytes: options.client_to_server_ring_bytes as u32,
            server_to_client_ring_bytes: options.server_to_client_ring_bytes as u32,
            generation: segment.generation(),
            client_pid: std::process::id(),
            client_name: options.client_name.clone(),
        };
        let bytes = crate::protocol::encode(&hello)?;
        let mut progress = 0;
        if !sender.try_send(MessageType::Hello.code(), 0, &bytes, &mut progress)? {
            return Err(TransportError::Protocol(
                "hello does not fit the ring".into(),
            ));
        }
        // Announce the segment: the engine's inotify watch sees this write, opens our memfd through /proc and
        // attaches.
        let memfd = segment
            .memfd_number()
            .ok_or_else(|| TransportError::Protocol("a client segment without its memfd".into()))?;
        let announcement =
            crate::segment::Announcement::new(segment.generation(), std::process::id(), memfd);
        slot_lock
            .file()
            .write_all_at(&announcement.encode(), 0)
            .map_err(|e| TransportError::io("announcing the slot", e))?;
        tracing::debug!(slot, memfd, "slot announced, waiting for hello-ack");

        let deadline = Instant::now() + options.connect_timeout;
        let mut spin = SpinPolicy::new(options.max_spin);
        loop {
            match receiver.poll()? {
                Received::Message => break,
                Received::Rejected { error, .. } => return Err(error.into()),
                Received::Nothing => {}
            }
            if segment.server_closed() {
                return Err(TransportError::Closed(
                    "the engine closed the connection during the handshake".into(),
                ));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout(
                    "waiting for the engine's hello-ack",
                ));
            }
            let wait = (deadline - now).min(options.liveness_interval);
            if doorbell::wait_on(segment.client_bell(), &mut spin, wait, || {
                receiver.has_data() || segment.server_closed()
            }) == WaitOutcome::Slept
                && !engine.alive()
            {
                return Err(engine.gone());
            }
        }
        let message = receiver.message();
        let info = match message.message_type() {
            Some(MessageType::HelloAck) => {
                let ack = message.decode_owned::<HelloAck>()?;
                if ack.protocol_version != PROTOCOL_VERSION {
                    return Err(TransportError::Protocol(format!(
                        "engine speaks protocol version {}, this client {PROTOCOL_VERSION}",
                        ack.protocol_version
                    )));
                }
                ConnectionInfo {
                    slot: ack.slot,
                    generation: segment.generation(),
                    server_pid: ack.server_pid,
                    max_message_bytes: ack.max_message_bytes,
                    stream_window_bytes: ack.stream_window_bytes,
                    server_name: ack.server_name,
                }
            }
            Some(MessageType::ErrorMessage) => {
                let err: &ArchivedErrorMessage = message.decode::<ErrorMessage>()?;
                return Err(TransportError::Rejected {
                    code: rkyv::deserialize::<_, rkyv::rancor::Error>(&err.code)?,
                    message: err.message.to_string(),
                });
            }
            _ => {
                return Err(TransportError::Protocol(format!(
                    "expected hello-ack, got message type {}",
                    message.header.message_type
                )))
            }
        };
        Ok(Self {
            engine,
            segment,
            slot_lock: None,
            sender,
            receiver,
            info,
            options,
        })
    }

    /// Sends goodbye (best effort) and releases the slot.
    pub(crate) fn close(&mut self, reason: &str) {
        if !self.segment.server_closed() && self.engine.alive() {
            if let Ok(bytes) = crate::protocol::encode(&Goodbye {
                reason: reason.to_owned(),
            }) {
                let mut progress = 0;
                let _ = self
                    .sender
                    .try_send(MessageType::Goodbye.code(), 0, &bytes, &mut progress);
                self.engine.ring();
            }
        }
        if let Some(lock) = self.slot_lock.take() {
            lock.remove();
        }
    }
}

/// Claims the lowest free slot by taking its lock.
fn claim_slot(endpoint: &Endpoint) -> Result<(u32, HeldLock), TransportError> {
    for slot in 0..MAX_SLOTS {
        let path = endpoint.slot_lock_path(slot);
        // Probe busy slots read-only first: closing a read-write probe would look like a client death to the
        // engine's inotify watch and make it re-check every slot we pass.
        if let Ok(Some(TryLock::Busy)) = HeldLock::try_acquire_existing(&path) {
            continue;
        }
        match HeldLock::try_acquire(&path)
            .map_err(|e| TransportError::io(format!("locking {}", path.display()), e))?
        {
            TryLock::Acquired(lock) => return Ok((slot, lock)),
            TryLock::Busy => continue,
        }
    }
    Err(TransportError::NoFreeSlot(MAX_SLOTS))
}

fn random_generation() -> u64 {
    crate::sys::random_u64() | 1
}

/// A blocking connection to the engine. One thread uses it at a time; see `AsyncClient` for concurrency.
pub struct Client {
    parts: ClientParts,
    encoder: PayloadEncoder,
    spin: SpinPolicy,
    closed: bool,
}

impl Client {
    /// Connects to the engine on `endpoint`.
    pub fn connect(endpoint: &Endpoint, options: ClientOptions) -> Result<Self, TransportError> {
        let spin = SpinPolicy::new(options.max_spin);
        Ok(Self {
            parts: ClientParts::connect(endpoint, options)?,
            encoder: PayloadEncoder::new(),
            spin,
            closed: false,
        })
    }

    pub(crate) fn into_parts(self) -> ClientParts {
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again: `parts` is moved out exactly once and the remaining
        // field with heap memory is dropped in place.
        unsafe {
            std::ptr::drop_in_place(&mut this.encoder);
            std::ptr::read(&this.parts)
        }
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.parts.info
    }

    pub fn slot(&self) -> u32 {
        self.parts.info.slot
    }

    /// Encodes and sends one message, waiting for ring space up to `timeout`.
    pub fn send<M: Message>(
        &mut self,
        message_id: u64,
        message: &M,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let payload = self.encoder.encode(message)?;
        send_blocking(
            &mut self.parts,
            &mut self.spin,
            M::TYPE.code(),
            message_id,
            payload,
            timeout,
        )
    }

    /// Sends an already-encoded payload.
    pub fn send_raw(
        &mut self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(), TransportError> {
        send_blocking(
            &mut self.parts,
            &mut self.spin,
            message_type,
            message_id,
            payload,
            timeout,
        )
    }

    /// Waits up to `timeout` for the next complete message.
    pub fn recv(&mut self, timeout: Duration) -> Result<ReceivedMessage<'_>, TransportError> {
        // The clock is read only when we have to wait (the fast path makes no syscall).
        let mut deadline = None;
        let parts = &mut self.parts;
        loop {
            match parts.receiver.poll()? {
                Received::Message => {
                    if parts.receiver.take_peer_waiting_for_space() {
                        parts.engine.ring();
                    }
                    return Ok(parts.receiver.message());
                }
                Received::Rejected { message_id, error } => {
                    tracing::warn!(message_id, %error, "engine sent an unacceptable frame");
                    return Err(error.into());
                }
                Received::Nothing => {}
            }
            if parts.receiver.take_peer_waiting_for_space() {
                parts.engine.ring();
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            wait_step(
                parts,
                &mut self.spin,
                deadline,
                "waiting for a message",
                |p| p.receiver.has_data(),
            )?;
        }
    }

    /// Test hook: publishes a raw record (any bytes) into the client-to-engine ring.
    #[cfg(feature = "test-hooks")]
    pub fn hostile_write_record(&mut self, bytes: &[u8]) {
        let written = self
            .parts
            .sender
            .raw_producer()
            .try_write(bytes.len(), |out| out.copy_from_slice(bytes));
        assert!(matches!(written, Ok(true)), "hostile record did not fit");
        self.parts.engine.ring();
    }

    /// Test hook: overwrites the published tail index of the client-to-engine ring.
    #[cfg(feature = "test-hooks")]
    pub fn hostile_set_tail(&mut self, tail: u64) {
        self.parts.segment.hostile_set_client_to_server_tail(tail);
        self.parts.engine.ring();
    }

    /// Closes gracefully (goodbye, slot released). Also done on drop.
    pub fn close(mut self) {
        self.shutdown("client closed");
    }

    fn shutdown(&mut self, reason: &str) {
        if !self.closed {
            self.closed = true;
            self.parts.close(reason);
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown("client dropped");
    }
}

/// One bounded wait on the client's doorbell; errors when the engine died, closed us, or the deadline passed.
fn wait_step(
    parts: &ClientParts,
    spin: &mut SpinPolicy,
    deadline: Instant,
    what: &'static str,
    ready: impl Fn(&ClientParts) -> bool,
) -> Result<(), TransportError> {
    if parts.segment.server_closed() {
        return Err(TransportError::Closed(
            "the engine closed this connection".into(),
        ));
    }
    let now = Instant::now();
    if now >= deadline {
        return Err(TransportError::Timeout(what));
    }
    let wait = (deadline - now).min(parts.options.liveness_interval);
    let outcome = doorbell::wait_on(parts.segment.client_bell(), spin, wait, || {
        ready(parts) || parts.segment.server_closed()
    });
    if outcome == WaitOutcome::Slept && !parts.engine.alive() {
        return Err(parts.engine.gone());
    }
    Ok(())
}

fn send_blocking(
    parts: &mut ClientParts,
    spin: &mut SpinPolicy,
    message_type: u16,
    message_id: u64,
    payload: &[u8],
    timeout: Duration,
) -> Result<(), TransportError> {
    let max = parts.info.max_message_bytes as usize;
    if payload.len() > max {
        return Err(TransportError::MessageTooLarge {
            len: payload.len(),
            max,
        });
    }
    let mut deadline = None;
    let mut progress = 0;
    loop {
        let before = progress;
        let done = parts
            .sender
            .try_send(message_type, message_id, payload, &mut progress)?;
        if progress != before || done {
            parts.engine.ring();
        }
        if done {
            return Ok(());
        }
        // Full: announce we wait for space, re-check, then wait.
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
        parts.sender.set_waiting_for_space(true);
        let remaining = payload.len() - progress;
        let result = loop {
            if parts.sender.has_space_for(remaining)? {
                break Ok(());
            }
            let ready = |p: &ClientParts| p.sender.may_have_space_for(remaining);
            if let Err(e) = wait_step(parts, spin, deadline, "waiting for ring space", ready) {
                break Err(e);
            }
        };
        parts.sender.set_waiting_for_space(false);
        result?;
    }
}
