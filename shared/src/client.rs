//! The blocking client: claims a slot, creates its shared memory, handshakes, then sends and receives frames.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
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
use crate::segment::{EngineIdentity, EnginePage, SlotSegment};
use crate::util::lock;

/// Highest slot number + 1 a client will try.
pub use crate::segment::MAX_SLOTS;

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
    /// How often a client that waits for the engine (a reply, ring space) re-checks that it is alive.
    pub liveness_interval: Duration,
    /// The same for an async client with nothing outstanding: an idle connection wakes this rarely, so idle
    /// clients cost no measurable CPU. A new request wakes the pump, which then uses `liveness_interval`.
    pub idle_liveness_interval: Duration,
    /// CRC32 on every frame this client sends (the engine verifies it when present). On by default; the cost
    /// is measured in docs/BENCHMARKS.md.
    pub frame_crc: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            client_name: format!("pid {}", std::process::id()),
            // 16 KiB each way: an idle connection then costs about 52 KiB on both sides together (the rings
            // are reserved when the segment is created), against 139 KiB with 64 KiB rings; larger messages are
            // fragmented (4 KiB pieces), which costs microseconds next to a completion's milliseconds.
            client_to_server_ring_bytes: 16 * 1024,
            server_to_client_ring_bytes: 16 * 1024,
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_spin: Duration::from_micros(50),
            liveness_interval: Duration::from_millis(20),
            idle_liveness_interval: Duration::from_secs(30),
            frame_crc: true,
        }
    }
}

/// One engine's lock file and mapped page, shared by every connection of this process to that engine.
struct EngineMapping {
    path: PathBuf,
    /// Device and inode of the mapped engine.lock: a restarted engine may create a new file at the same path.
    file_id: (u64, u64),
    lock_file: File,
    page: EnginePage,
}

/// The process's engine mappings, one per engine.lock file in use (not one per connection, nor per slot).
static MAPPINGS: Mutex<Vec<Weak<EngineMapping>>> = Mutex::new(Vec::new());

impl EngineMapping {
    /// The mapping of the engine.lock now at `path`, shared if this process has it already.
    fn get(path: &Path) -> Result<Option<Arc<Self>>, TransportError> {
        let meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(TransportError::io(
                    format!("inspecting {}", path.display()),
                    e,
                ))
            }
        };
        let file_id = (meta.dev(), meta.ino());
        let mut mappings = lock(&MAPPINGS);
        mappings.retain(|weak| weak.strong_count() > 0);
        if let Some(found) = mappings
            .iter()
            .filter_map(Weak::upgrade)
            .find(|m| m.path == path && m.file_id == file_id)
        {
            return Ok(Some(found));
        }
        let lock_file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(TransportError::io(format!("opening {}", path.display()), e)),
        };
        let opened = lock_file
            .metadata()
            .map_err(|e| TransportError::io("inspecting the engine lock", e))?;
        if (opened.dev(), opened.ino()) != file_id {
            // Replaced between the stat and the open: let the caller retry later.
            return Ok(None);
        }
        let Some(page) = EnginePage::open(&lock_file)
            .map_err(|e| TransportError::io("mapping the engine page", e))?
        else {
            return Ok(None);
        };
        let mapping = Arc::new(Self {
            path: path.to_owned(),
            file_id,
            lock_file,
            page,
        });
        mappings.push(Arc::downgrade(&mapping));
        Ok(Some(mapping))
    }
}

/// The engine as one connection sees it: the shared mapping plus the incarnation it connected to.
pub(crate) struct EngineLink {
    pub(crate) endpoint: Endpoint,
    mapping: Arc<EngineMapping>,
    /// The engine we connected to; a restarted engine publishes another number in the same page.
    incarnation: u64,
}

impl EngineLink {
    /// Opens the engine's lock file; `NoServer` unless an engine holds it and has published its page.
    pub(crate) fn open(endpoint: &Endpoint) -> Result<Self, TransportError> {
        let no_server = || TransportError::NoServer(endpoint.name().to_owned());
        let mapping = EngineMapping::get(&endpoint.engine_lock_path())?.ok_or_else(no_server)?;
        let alive = lockfile::is_locked_by_other(&mapping.lock_file)
            .map_err(|e| TransportError::io("probing the engine lock", e))?;
        if !alive {
            return Err(no_server());
        }
        match mapping.page.identity() {
            EngineIdentity::Compatible { .. } => {}
            // Bound a moment ago; its identity line follows at once.
            EngineIdentity::Blank => return Err(no_server()),
            EngineIdentity::Other { pid, version } => {
                // Only if that engine really holds the lock: a line left by a dead engine of another release
                // is overwritten by the next engine right after it takes the lock.
                let holder = lockfile::exclusive_holder(&mapping.lock_file)
                    .map_err(|e| TransportError::io("reading /proc/locks", e))?;
                if holder != Some(pid) {
                    return Err(no_server());
                }
                return Err(TransportError::IncompatibleEngine {
                    endpoint: endpoint.name().to_owned(),
                    pid,
                    version,
                });
            }
        }
        let incarnation = mapping.page.incarnation();
        if incarnation == 0 {
            // Locked, but still starting up.
            return Err(no_server());
        }
        Ok(Self {
            endpoint: endpoint.clone(),
            mapping,
            incarnation,
        })
    }

    pub(crate) fn page(&self) -> &EnginePage {
        &self.mapping.page
    }

    /// True while the engine we connected to holds its lock (not a restarted one on the same file).
    pub(crate) fn alive(&self) -> bool {
        self.page().incarnation() == self.incarnation
            && lockfile::is_locked_by_other(&self.mapping.lock_file).unwrap_or(false)
    }

    /// Wakes the engine's reactor if it sleeps (through this connection's slot: see
    /// [`SlotSegment::wake_server`]).
    pub(crate) fn ring(&self, segment: &SlotSegment) {
        segment.wake_server(self.page());
    }

    /// Tells the reactor that `slot`'s announcement is in its lock file, and wakes it if it sleeps (no
    /// syscall while it is awake or spinning). A wake-up lost to a peer that cleared the shared flag is
    /// repaired by the handshake's liveness tick, which announces again and rings unconditionally.
    pub(crate) fn announce(&self, slot: u32) {
        self.page().announce(slot);
        self.page().bell().ring();
    }

    /// Wakes the reactor unconditionally (one syscall). A client that waited a whole liveness interval for the
    /// engine does this, so a wake-up lost to a peer that scribbled on the shared page costs at most one
    /// interval, never a stall.
    pub(crate) fn nudge(&self) {
        self.page().bell().ring_always();
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
        // The engine created the directories; a client only checks them (no mkdir per connect).
        endpoint.verify_dirs()?;
        let engine = EngineLink::open(endpoint)?;
        let (slot, slot_lock) = claim_slot(endpoint, engine.page())?;
        let segment = match SlotSegment::create(
            options.client_to_server_ring_bytes,
            options.server_to_client_ring_bytes,
            random_generation(),
        ) {
            Ok(segment) => segment,
            Err(e) => {
                release_slot(&engine, slot, slot_lock);
                return Err(e);
            }
        };
        match Self::handshake(&engine, &segment, slot, &slot_lock, &options) {
            Ok((mut sender, receiver, info)) => {
                sender.set_crc(options.frame_crc);
                Ok(Self {
                    engine,
                    segment,
                    slot_lock: Some(slot_lock),
                    sender,
                    receiver,
                    info,
                    options,
                })
            }
            Err(e) => {
                release_slot(&engine, slot, slot_lock);
                Err(e)
            }
        }
    }

    fn handshake(
        engine: &EngineLink,
        segment: &SlotSegment,
        slot: u32,
        slot_lock: &HeldLock,
        options: &ClientOptions,
    ) -> Result<(FrameSender, FrameReceiver, ConnectionInfo), TransportError> {
        // SAFETY: called once; the ends live inside ClientParts next to the segment that backs them.
        let (producer, consumer) = unsafe { segment.client_ends()? };
        let mut sender = FrameSender::new(producer);
        let mut receiver = FrameReceiver::new(consumer, options.max_message_bytes);
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            client_to_server_ring_bytes: options.client_to_server_ring_bytes as u32,
            server_to_client_ring_bytes: options.server_to_client_ring_bytes as u32,
            generation: segment.generation(),
            client_pid: segment.client_pid(),
            client_name: options.client_name.clone(),
        };
        let bytes = crate::protocol::encode(&hello)?;
        let mut progress = 0;
        if !sender.try_send(MessageType::Hello.code(), 0, &bytes, &mut progress)? {
            return Err(TransportError::Protocol(
                "hello does not fit the ring".into(),
            ));
        }
        // Announce the segment in the slot's lock file, then ring the reactor, which opens our memfd through
        // /proc, verifies and attaches it, and answers the hello.
        let memfd = segment
            .memfd_number()
            .ok_or_else(|| TransportError::Protocol("a client segment without its memfd".into()))?;
        let announcement =
            crate::segment::Announcement::new(segment.generation(), segment.client_pid(), memfd);
        slot_lock
            .file()
            .write_all_at(&announcement.encode(), 0)
            .map_err(|e| TransportError::io("announcing the slot", e))?;
        engine.announce(slot);
        tracing::debug!(slot, memfd, "slot announced, waiting for hello-ack");

        let deadline = Instant::now() + options.connect_timeout;
        // The answer takes the engine's verification (about a dozen syscalls) plus, when its reactor sleeps, a
        // wake-up (tens of microseconds on a VM): a spin of `max_spin` would often end just before it and add a
        // sleep and a wake-up of our own. So the handshake may spin longer, with a budget this process's earlier
        // handshakes adapted: when the reactor can only run once we stop spinning (one free CPU), the spins fail
        // and the budget shrinks instead of delaying every connect by the longest spin.
        let max_spin = options.max_spin * HANDSHAKE_SPIN_FACTOR;
        let learnt = Duration::from_nanos(HANDSHAKE_SPIN_NANOS.load(Ordering::Relaxed));
        let mut spin =
            SpinPolicy::resume(max_spin, if learnt.is_zero() { max_spin } else { learnt });
        loop {
            match receiver.poll()? {
                Received::Message => break,
                Received::Rejected { error, .. } => return Err(error.into()),
                Received::Nothing => {}
            }
            wait_step(
                engine,
                segment,
                &mut spin,
                Wait::until(deadline, options.liveness_interval),
                "waiting for the engine's hello-ack",
                || receiver.has_data(),
            )?;
            if !receiver.has_data() {
                // Slept without an answer: a peer may have cleared our bit or the reactor's flag in the shared
                // page. Announce again there, and to the acceptor through our lock file's attributes (its inotify
                // watch does not depend on the page). Either costs the engine one read of our lock file if it
                // had seen us already.
                engine.page().announce(slot);
                engine.nudge();
                if let Err(e) = crate::sys::touch(slot_lock.file()) {
                    tracing::debug!(slot, error = %e, "touching the slot lock file");
                }
            }
        }
        HANDSHAKE_SPIN_NANOS.store(spin.budget().as_nanos().max(1) as u64, Ordering::Relaxed);
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
        Ok((sender, receiver, info))
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
                self.engine.ring(&self.segment);
            }
        }
        if let Some(lock) = self.slot_lock.take() {
            release_slot(&self.engine, self.info.slot, lock);
        }
    }
}

/// The handshake spins up to this many times `ClientOptions::max_spin` before it sleeps.
const HANDSHAKE_SPIN_FACTOR: u32 = 4;

/// The handshake spin budget this process's last handshake left (0: none yet). See `ClientParts::handshake`.
static HANDSHAKE_SPIN_NANOS: AtomicU64 = AtomicU64::new(0);

/// Busy slots a client tries from the engine page's bitmap before it falls back to scanning every slot.
const HINT_TRIES: u32 = 16;

/// Claims a free slot by taking its lock: first the slots the engine page's bitmap calls free (usually the
/// first one is), then, if the bitmap is wrong or full (a hostile peer, a race with other clients), every slot.
fn claim_slot(endpoint: &Endpoint, page: &EnginePage) -> Result<(u32, HeldLock), TransportError> {
    for _ in 0..HINT_TRIES {
        let Some(slot) = page.free_slot_hint() else {
            break;
        };
        // A wrong bit is repaired either way: taken now by us, or busy (held by someone else). A slot the
        // bitmap calls free is usually free (and its file gone): no read-only probe first.
        if let Some(lock) = try_slot(endpoint, slot, false)? {
            page.mark_slot(slot, true);
            return Ok((slot, lock));
        }
        page.mark_slot(slot, true);
    }
    tracing::debug!("the engine page's slot bitmap had no usable hint; scanning every slot");
    for slot in 0..MAX_SLOTS {
        if let Some(lock) = try_slot(endpoint, slot, true)? {
            page.mark_slot(slot, true);
            return Ok((slot, lock));
        }
    }
    Err(TransportError::NoFreeSlot(MAX_SLOTS))
}

/// Takes `slot`'s lock if nobody holds it. With `probe_first`, a busy slot is detected read-only first:
/// closing a read-write probe would look like a client death to the engine's inotify watch and make it
/// re-check the slot.
fn try_slot(
    endpoint: &Endpoint,
    slot: u32,
    probe_first: bool,
) -> Result<Option<HeldLock>, TransportError> {
    let path = endpoint.slot_lock_path(slot);
    if probe_first {
        if let Ok(Some(TryLock::Busy)) = HeldLock::try_acquire_existing(&path) {
            return Ok(None);
        }
    }
    match HeldLock::try_acquire(&path)
        .map_err(|e| TransportError::io(format!("locking {}", path.display()), e))?
    {
        TryLock::Acquired(lock) => Ok(Some(lock)),
        TryLock::Busy => Ok(None),
    }
}

/// Releases a slot: unlinks its lock file while holding it and clears its bit in the engine page.
fn release_slot(engine: &EngineLink, slot: u32, slot_lock: HeldLock) {
    slot_lock.remove();
    engine.page().mark_slot(slot, false);
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

    /// Sends already-encoded messages as one batch: frames are written back to back and made visible with one
    /// tail store and one doorbell check (one fence) per batch, instead of one per message. When the ring
    /// fills, what is written is published and the rest waits for space as in [`Client::send_raw`]; a message
    /// larger than one fragment is sent on its own.
    pub fn send_raw_batch<'p>(
        &mut self,
        messages: impl IntoIterator<Item = (u16, u64, &'p [u8])>,
        timeout: Duration,
    ) -> Result<(), TransportError> {
        let parts = &mut self.parts;
        let max = parts.info.max_message_bytes as usize;
        for (message_type, message_id, payload) in messages {
            if payload.len() > max {
                return Err(TransportError::MessageTooLarge {
                    len: payload.len(),
                    max,
                });
            }
            if parts.sender.queue(message_type, message_id, payload)? {
                continue;
            }
            // Full, or too large for one frame: publish the batch so far, then send this one the slow way.
            if parts.sender.publish() {
                parts.engine.ring(&parts.segment);
            }
            send_blocking(
                parts,
                &mut self.spin,
                message_type,
                message_id,
                payload,
                timeout,
            )?;
        }
        if parts.sender.publish() {
            parts.engine.ring(&parts.segment);
        }
        Ok(())
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
                        parts.engine.ring(&parts.segment);
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
                parts.engine.ring(&parts.segment);
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            wait_step(
                &parts.engine,
                &parts.segment,
                &mut self.spin,
                Wait::until(deadline, parts.options.liveness_interval),
                "waiting for a message",
                || parts.receiver.has_data(),
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
        self.parts.engine.ring(&self.parts.segment);
    }

    /// Test hook: overwrites the published tail index of the client-to-engine ring.
    #[cfg(feature = "test-hooks")]
    pub fn hostile_set_tail(&mut self, tail: u64) {
        self.parts.segment.hostile_set_client_to_server_tail(tail);
        self.parts.engine.ring(&self.parts.segment);
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

/// How long one [`wait_step`] may sleep.
pub(crate) struct Wait {
    /// Give up with `Timeout` at this instant.
    deadline: Option<Instant>,
    /// Longest sleep before the engine's liveness is checked.
    interval: Duration,
    /// True when the caller waits for the engine (a reply, ring space): after a sleep without progress it
    /// nudges the reactor, in case its wake-up was lost to a peer that scribbled on the shared engine page.
    expecting_engine: bool,
}

impl Wait {
    pub(crate) fn until(deadline: Instant, interval: Duration) -> Self {
        Self {
            deadline: Some(deadline),
            interval,
            expecting_engine: true,
        }
    }

    pub(crate) fn for_interval(interval: Duration, expecting_engine: bool) -> Self {
        Self {
            deadline: None,
            interval,
            expecting_engine,
        }
    }
}

/// The one client wait: spins, then sleeps on the slot's doorbell until `ready`, the engine closes this
/// connection, or the interval passes; after a sleep without `ready` it checks that the engine still lives.
/// Errors when the engine died or closed us, or the deadline passed.
pub(crate) fn wait_step(
    engine: &EngineLink,
    segment: &SlotSegment,
    spin: &mut SpinPolicy,
    wait: Wait,
    what: &'static str,
    mut ready: impl FnMut() -> bool,
) -> Result<(), TransportError> {
    if segment.server_closed() {
        return Err(TransportError::Closed(
            "the engine closed this connection".into(),
        ));
    }
    let sleep = match wait.deadline {
        Some(deadline) => {
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout(what));
            }
            (deadline - now).min(wait.interval)
        }
        None => wait.interval,
    };
    let outcome = doorbell::wait_on(segment.client_bell(), spin, sleep, || {
        ready() || segment.server_closed()
    });
    if outcome == WaitOutcome::Slept {
        if !engine.alive() {
            return Err(engine.gone());
        }
        if wait.expecting_engine {
            engine.nudge();
        }
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
            parts.engine.ring(&parts.segment);
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
            if let Err(e) = wait_step(
                &parts.engine,
                &parts.segment,
                spin,
                Wait::until(deadline, parts.options.liveness_interval),
                "waiting for ring space",
                || parts.sender.may_have_space_for(remaining),
            ) {
                break Err(e);
            }
        };
        parts.sender.set_waiting_for_space(false);
        result?;
    }
}
