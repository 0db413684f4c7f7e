//! The tokio client: many concurrent requests on one connection, each a credit-limited response stream.
//!
//! A pump thread owns the receiving ring (tokio cannot wait on a futex): it spins, then sleeps on the slot's
//! doorbell, routes every message to the request that owns its id, and re-checks the engine's lock while it
//! sleeps so a dead engine fails every pending request within the liveness interval (an idle connection checks
//! only every `idle_liveness_interval`, so idle clients cost no CPU).

use crate::util::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rkyv::util::AlignedVec;
use tokio::sync::mpsc;

use crate::client::{wait_step, ClientOptions, ClientParts, ConnectionInfo, EngineLink, Wait};
use crate::doorbell::SpinPolicy;
use crate::endpoint::Endpoint;
use crate::error::TransportError;
use crate::framing::{AsyncWriter, FrameReceiver, Received, ReceivedMessage};
use crate::lockfile::HeldLock;
use crate::protocol::{
    self, Cancel, Credit, ErrorCode, ErrorMessage, Goodbye, Message, MessageType, StreamChunk,
    StreamEnd,
};
use crate::segment::SlotSegment;
use crate::Client;

/// One message delivered to a request, or the reason none will come.
enum Incoming {
    Message {
        message_type: MessageType,
        payload: AlignedVec,
    },
    Failed(TransportError),
}

struct Inner {
    engine: EngineLink,
    // Field order matters: the writer's ring pointers point into `segment`, which must drop last.
    writer: AsyncWriter,
    info: ConnectionInfo,
    options: ClientOptions,
    next_id: AtomicU64,
    routes: Mutex<HashMap<u64, mpsc::UnboundedSender<Incoming>>>,
    /// Why the connection is unusable, once it is.
    failure: Mutex<Option<String>>,
    failed: AtomicBool,
    /// Fired once when the connection fails.
    failed_signal: tokio::sync::watch::Sender<bool>,
    stop: AtomicBool,
    slot_lock: Mutex<Option<HeldLock>>,
    segment: SlotSegment,
}

impl Inner {
    fn check_open(&self) -> Result<(), TransportError> {
        if self.failed.load(Ordering::Acquire) {
            let why = lock(&self.failure).clone().unwrap_or_default();
            return Err(TransportError::Closed(why));
        }
        Ok(())
    }

    fn fail_all(&self, error: impl Fn() -> TransportError) {
        {
            let mut failure = lock(&self.failure);
            if failure.is_none() {
                *failure = Some(error().to_string());
            }
        }
        self.failed.store(true, Ordering::Release);
        self.failed_signal.send_replace(true);
        for (_, route) in lock(&self.routes).drain() {
            let _ = route.send(Incoming::Failed(error()));
        }
        self.writer.wake_all();
    }

    async fn send_raw(
        &self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        let max = self.info.max_message_bytes as usize;
        if payload.len() > max {
            return Err(TransportError::MessageTooLarge {
                len: payload.len(),
                max,
            });
        }
        self.writer
            .send(
                message_type,
                message_id,
                payload,
                || self.engine.ring(&self.segment),
                || self.check_open(),
            )
            .await
    }

    fn route(&self, message: &ReceivedMessage<'_>) {
        let Some(message_type) = message.message_type() else {
            tracing::warn!(
                code = message.header.message_type,
                "engine sent an unknown message type"
            );
            return;
        };
        let id = message.id();
        if id == 0 {
            match message_type {
                MessageType::Goodbye => {
                    let reason = message
                        .decode::<Goodbye>()
                        .map(|g| g.reason.to_string())
                        .unwrap_or_default();
                    tracing::info!(%reason, "engine said goodbye");
                }
                MessageType::ErrorMessage => {
                    if let Ok(e) = message.decode::<ErrorMessage>() {
                        tracing::warn!(message = %e.message, "engine reported a connection error");
                    }
                }
                _ => {}
            }
            return;
        }
        let terminal = !matches!(message_type, MessageType::StreamChunk);
        let mut routes = lock(&self.routes);
        let route = if terminal {
            routes.remove(&id)
        } else {
            routes.get(&id).cloned()
        };
        drop(routes);
        if let Some(route) = route {
            let mut payload = AlignedVec::with_capacity(message.payload.len());
            payload.extend_from_slice(message.payload);
            let _ = route.send(Incoming::Message {
                message_type,
                payload,
            });
        }
    }
}

struct Handle {
    inner: Arc<Inner>,
    pump: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner.stop.store(true, Ordering::SeqCst);
        inner.segment.client_bell().ring_always();
        if let Some(pump) = lock(&self.pump).take() {
            let _ = pump.join();
        }
        if !inner.failed.load(Ordering::Acquire) && inner.engine.alive() {
            if let Ok(bytes) = protocol::encode(&Goodbye {
                reason: "client closed".into(),
            }) {
                let _ = inner
                    .writer
                    .try_send(MessageType::Goodbye.code(), 0, &bytes);
                inner.engine.ring(&inner.segment);
            }
        }
        if let Some(slot_lock) = lock(&inner.slot_lock).take() {
            slot_lock.remove();
        }
    }
}

/// An async connection to the engine. Clones share the connection; it closes when the last clone (and the
/// last open [`ResponseStream`]) is dropped.
#[derive(Clone)]
pub struct AsyncClient {
    handle: Arc<Handle>,
}

/// One event of a response stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Chunk {
        sequence: u32,
        text: String,
    },
    /// Terminal: the stream ended (its `finish_reason` says whether it was cancelled).
    End(StreamEnd),
}

impl AsyncClient {
    /// Connects without blocking the runtime (the handshake runs on a blocking thread).
    pub async fn connect(
        endpoint: &Endpoint,
        options: ClientOptions,
    ) -> Result<Self, TransportError> {
        let endpoint = endpoint.clone();
        tokio::task::spawn_blocking(move || Self::connect_blocking(&endpoint, options))
            .await
            .map_err(|e| TransportError::Closed(format!("connect task failed: {e}")))?
    }

    /// Connects from a non-async context.
    pub fn connect_blocking(
        endpoint: &Endpoint,
        options: ClientOptions,
    ) -> Result<Self, TransportError> {
        let client = Client::connect(endpoint, options)?;
        Self::from_parts(client.into_parts())
    }

    fn from_parts(parts: ClientParts) -> Result<Self, TransportError> {
        let ClientParts {
            engine,
            segment,
            slot_lock,
            sender,
            receiver,
            info,
            options,
        } = parts;
        let inner = Arc::new(Inner {
            engine,
            writer: AsyncWriter::new(
                sender,
                options
                    .connect_timeout
                    .max(std::time::Duration::from_secs(30)),
            ),
            info,
            options,
            next_id: AtomicU64::new(1),
            routes: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            failed_signal: tokio::sync::watch::channel(false).0,
            stop: AtomicBool::new(false),
            slot_lock: Mutex::new(slot_lock),
            segment,
        });
        let pump = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("lapce-ai-client-pump".into())
                .spawn(move || pump(&inner, receiver))
                .map_err(|e| TransportError::io("spawning the client pump thread", e))?
        };
        Ok(Self {
            handle: Arc::new(Handle {
                inner,
                pump: Mutex::new(Some(pump)),
            }),
        })
    }

    fn inner(&self) -> &Inner {
        &self.handle.inner
    }

    pub fn info(&self) -> &ConnectionInfo {
        &self.inner().info
    }

    /// False once the engine died, closed the connection, or the protocol broke (as last noticed: the pump
    /// notices within the liveness interval; [`AsyncClient::check_alive`] asks now).
    pub fn is_alive(&self) -> bool {
        !self.inner().failed.load(Ordering::Acquire)
    }

    /// Probes the engine's lock right now (one syscall) and fails the connection if the engine is gone, so a
    /// request is not sent into a connection whose engine just died.
    pub fn check_alive(&self) -> bool {
        let inner = self.inner();
        if !inner.failed.load(Ordering::Acquire)
            && (!inner.engine.alive() || inner.segment.server_closed())
        {
            inner.fail_all(|| inner.engine.gone());
        }
        self.is_alive()
    }

    /// Resolves when the connection has failed (engine gone, closed, protocol error).
    pub async fn failed(&self) {
        let mut signal = self.inner().failed_signal.subscribe();
        let _ = signal.wait_for(|failed| *failed).await;
    }

    /// Why the connection failed, once it has.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner().failure).clone()
    }

    /// Starts a request (completion, chat, ...) and returns its response stream.
    pub async fn request<M: Message>(&self, message: &M) -> Result<ResponseStream, TransportError> {
        let inner = self.inner();
        inner.check_open()?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&inner.routes).insert(id, tx);
        let payload = protocol::encode(message)?;
        if let Err(e) = inner.send_raw(M::TYPE.code(), id, &payload).await {
            lock(&inner.routes).remove(&id);
            return Err(e);
        }
        // A pump asleep on the idle interval now has a request to watch: wake it so it checks the engine's
        // liveness at the short interval (a syscall only when it sleeps).
        inner.segment.client_bell().ring();
        Ok(ResponseStream {
            client: self.clone(),
            id,
            rx,
            window: inner.info.stream_window_bytes,
            unacknowledged: 0,
            next_sequence: 0,
            finished: false,
        })
    }

    /// Sends a request that has exactly one reply message `R` (status, ping) and returns it.
    pub async fn call<M: Message, R>(&self, message: &M) -> Result<R, TransportError>
    where
        R: Message,
        R::Archived: for<'b> rkyv::bytecheck::CheckBytes<
                rkyv::api::high::HighValidator<'b, rkyv::rancor::Error>,
            > + rkyv::Deserialize<R, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let mut stream = self.request(message).await?;
        let reply = stream.rx.recv().await;
        stream.finished = true;
        match reply {
            Some(Incoming::Message {
                message_type,
                payload,
            }) => {
                if message_type == R::TYPE {
                    let archived = protocol::decode::<R>(&payload)?;
                    Ok(rkyv::deserialize::<R, rkyv::rancor::Error>(archived)?)
                } else {
                    Err(remote_error(message_type, &payload))
                }
            }
            Some(Incoming::Failed(e)) => Err(e),
            None => Err(self.inner().engine.gone()),
        }
    }

    /// Sends a one-way message (e.g. `Shutdown`).
    pub async fn notify<M: Message>(&self, message: &M) -> Result<(), TransportError> {
        let inner = self.inner();
        inner.check_open()?;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let payload = protocol::encode(message)?;
        inner.send_raw(M::TYPE.code(), id, &payload).await
    }
}

/// Turns an unexpected reply into an error (an `ErrorMessage` keeps its code and text).
fn remote_error(message_type: MessageType, payload: &[u8]) -> TransportError {
    if message_type == MessageType::ErrorMessage {
        match protocol::decode::<ErrorMessage>(payload) {
            Ok(e) => TransportError::Remote {
                code: rkyv::deserialize::<ErrorCode, rkyv::rancor::Error>(&e.code)
                    .unwrap_or(ErrorCode::Protocol),
                message: e.message.to_string(),
            },
            Err(e) => TransportError::Payload(e.to_string()),
        }
    } else {
        TransportError::Protocol(format!("unexpected reply {}", message_type.name()))
    }
}

/// The responses to one request, in order, ending with exactly one terminal event (`End` or an error).
/// Dropping an unfinished stream cancels the request.
pub struct ResponseStream {
    client: AsyncClient,
    id: u64,
    rx: mpsc::UnboundedReceiver<Incoming>,
    window: u32,
    unacknowledged: u32,
    next_sequence: u32,
    finished: bool,
}

impl ResponseStream {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the terminal event.
    pub async fn next(&mut self) -> Option<Result<StreamEvent, TransportError>> {
        if self.finished {
            return None;
        }
        let incoming = self.rx.recv().await;
        let result = match incoming {
            Some(Incoming::Message {
                message_type,
                payload,
            }) => self.interpret(message_type, &payload).await,
            Some(Incoming::Failed(e)) => Err(e),
            None => Err(self.client.inner().engine.gone()),
        };
        if !matches!(result, Ok(StreamEvent::Chunk { .. })) {
            self.finished = true;
        }
        Some(result)
    }

    async fn interpret(
        &mut self,
        message_type: MessageType,
        payload: &AlignedVec,
    ) -> Result<StreamEvent, TransportError> {
        match message_type {
            MessageType::StreamChunk => {
                let chunk = protocol::decode::<StreamChunk>(payload)?;
                let sequence = chunk.sequence.to_native();
                if chunk.request_id.to_native() != self.id || sequence != self.next_sequence {
                    return Err(TransportError::Protocol(format!(
                        "stream {} got chunk {sequence} of request {} (expected chunk {})",
                        self.id,
                        chunk.request_id.to_native(),
                        self.next_sequence
                    )));
                }
                self.next_sequence += 1;
                let text = chunk.text.to_string();
                self.acknowledge(payload.len() as u32).await?;
                Ok(StreamEvent::Chunk { sequence, text })
            }
            MessageType::StreamEnd => {
                let archived = protocol::decode::<StreamEnd>(payload)?;
                let end: StreamEnd = rkyv::deserialize::<StreamEnd, rkyv::rancor::Error>(archived)?;
                if end.chunks != self.next_sequence {
                    return Err(TransportError::Protocol(format!(
                        "stream {} ended after {} chunks but {} arrived",
                        self.id, end.chunks, self.next_sequence
                    )));
                }
                Ok(StreamEvent::End(end))
            }
            other => Err(remote_error(other, payload)),
        }
    }

    /// Returns credit to the engine once half the window was consumed.
    async fn acknowledge(&mut self, bytes: u32) -> Result<(), TransportError> {
        self.unacknowledged += bytes;
        if self.unacknowledged >= self.window / 2 {
            let credit = Credit {
                request_id: self.id,
                bytes: self.unacknowledged,
            };
            self.unacknowledged = 0;
            let payload = protocol::encode(&credit)?;
            self.client
                .inner()
                .send_raw(MessageType::Credit.code(), self.id, &payload)
                .await?;
        }
        Ok(())
    }

    /// Asks the engine to stop; keep reading to see the terminal event (usually `End` with `Cancelled`).
    pub async fn cancel(&self) -> Result<(), TransportError> {
        let payload = protocol::encode(&Cancel {
            request_id: self.id,
        })?;
        self.client
            .inner()
            .send_raw(MessageType::Cancel.code(), self.id, &payload)
            .await
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let inner = self.client.inner();
        lock(&inner.routes).remove(&self.id);
        if let Ok(payload) = protocol::encode(&Cancel {
            request_id: self.id,
        }) {
            if matches!(
                inner
                    .writer
                    .try_send(MessageType::Cancel.code(), self.id, &payload),
                Ok(true)
            ) {
                inner.engine.ring(&inner.segment);
            }
        }
    }
}

fn pump(inner: &Inner, mut receiver: FrameReceiver) {
    let mut spin = SpinPolicy::new(inner.options.max_spin);
    loop {
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        loop {
            match receiver.poll() {
                Ok(Received::Message) => inner.route(&receiver.message()),
                Ok(Received::Rejected { message_id, error }) => {
                    tracing::warn!(message_id, %error, "engine sent an unacceptable frame");
                }
                Ok(Received::Nothing) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "closing a connection the engine corrupted");
                    inner.fail_all(|| TransportError::Protocol(e.to_string()));
                    return;
                }
            }
        }
        if receiver.take_peer_waiting_for_space() {
            inner.engine.ring(&inner.segment);
        }
        inner.writer.wake_if_space();
        if inner.segment.server_closed() {
            inner.fail_all(|| TransportError::Closed("the engine closed this connection".into()));
            return;
        }
        // With requests outstanding the engine's liveness is checked often; an idle connection sleeps long,
        // and a new request wakes it (see `AsyncClient::request`).
        let busy = !lock(&inner.routes).is_empty();
        let wait = if busy {
            Wait::for_interval(inner.options.liveness_interval, true)
        } else {
            Wait::for_interval(inner.options.idle_liveness_interval, false)
        };
        if let Err(e) = wait_step(
            &inner.engine,
            &inner.segment,
            &mut spin,
            wait,
            "waiting for the engine",
            || {
                inner.stop.load(Ordering::Relaxed)
                    || receiver.has_data()
                    || inner.writer.space_wanted_and_available()
            },
        ) {
            match e {
                TransportError::ServerGone(_) => {
                    tracing::warn!(endpoint = inner.engine.endpoint.name(), "engine went away");
                    inner.fail_all(|| inner.engine.gone());
                }
                TransportError::Closed(why) => {
                    inner.fail_all(|| TransportError::Closed(why.clone()))
                }
                other => {
                    let why = other.to_string();
                    inner.fail_all(|| TransportError::Protocol(why.clone()));
                }
            }
            return;
        }
    }
}
