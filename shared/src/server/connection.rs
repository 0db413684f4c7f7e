//! One accepted client as the engine sees it: sending messages and credit-limited response streams.

use crate::util::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::error::TransportError;
use crate::framing::AsyncWriter;
use crate::protocol::{
    self, ErrorCode, ErrorMessage, FinishReason, Message, MessageType, StreamChunk, StreamEnd,
    Usage,
};
use crate::segment::SlotSegment;

/// How long a stream waits for the client to grant credit before giving up.
const CREDIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The client said goodbye.
    Goodbye(String),
    /// The client's slot lock was released without goodbye (it crashed or was killed).
    ClientGone,
    /// The client broke the protocol; the connection was closed.
    ProtocolViolation(String),
    /// The engine is shutting down.
    ServerShutdown,
    /// The engine's handler panicked while serving this connection; only this connection was closed.
    HandlerPanicked(String),
}

/// The engine's handle on one client connection. Cheap to share (`Arc`); all methods are thread-safe.
pub struct ServerConnection {
    pub(crate) slot: u32,
    pub(crate) generation: u64,
    pub(crate) client_pid: u32,
    pub(crate) client_name: Mutex<String>,
    pub(crate) segment: Arc<SlotSegment>,
    pub(crate) writer: AsyncWriter,
    pub(crate) closed: AtomicBool,
    /// Per-stream credit (bytes the client is ready to receive), keyed by request id.
    pub(crate) credits: Mutex<HashMap<u64, i64>>,
    pub(crate) credit_changed: Notify,
    pub(crate) stream_window: u32,
}

impl ServerConnection {
    pub fn slot(&self) -> u32 {
        self.slot
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn client_pid(&self) -> u32 {
        self.client_pid
    }

    pub fn client_name(&self) -> String {
        lock(&self.client_name).clone()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn closed_error(&self) -> TransportError {
        TransportError::Closed(format!("client in slot {} is gone", self.slot))
    }

    fn check_open(&self) -> Result<(), TransportError> {
        if self.is_closed() {
            Err(self.closed_error())
        } else {
            Ok(())
        }
    }

    /// Writes without waiting; `Ok(false)` when the ring is too full for the whole message right now.
    /// Only for messages that fit one fragment (used from the reactor thread, which must never block).
    pub fn try_send_raw(
        &self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
    ) -> Result<bool, TransportError> {
        self.check_open()?;
        let done = self.writer.try_send(message_type, message_id, payload)?;
        if done {
            self.segment.client_bell().ring();
        }
        Ok(done)
    }

    /// Sends an encoded payload, awaiting ring space (never blocks a runtime thread). Large payloads are
    /// fragmented; other senders may interleave between fragments.
    pub async fn send_raw(
        &self,
        message_type: u16,
        message_id: u64,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        self.writer
            .send(
                message_type,
                message_id,
                payload,
                || self.segment.client_bell().ring(),
                || self.check_open(),
            )
            .await
    }

    /// Encodes and sends one message.
    pub async fn send<M: Message>(
        &self,
        message_id: u64,
        message: &M,
    ) -> Result<(), TransportError> {
        let payload = protocol::encode(message)?;
        self.send_raw(M::TYPE.code(), message_id, &payload).await
    }

    /// Sends an error frame about `message_id`.
    pub async fn send_error(
        &self,
        message_id: u64,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Result<(), TransportError> {
        self.send(
            message_id,
            &ErrorMessage {
                code,
                message: message.into(),
            },
        )
        .await
    }

    /// Opens the response stream of request `request_id` with the connection's initial credit window.
    pub fn open_stream(self: &Arc<Self>, request_id: u64) -> StreamSender {
        lock(&self.credits).insert(request_id, i64::from(self.stream_window));
        StreamSender {
            connection: Arc::clone(self),
            request_id,
            sequence: 0,
            finished: false,
        }
    }

    /// Applies a `Credit` message from the client.
    pub(crate) fn add_credit(&self, request_id: u64, bytes: u32) {
        if let Some(credit) = lock(&self.credits).get_mut(&request_id) {
            *credit += i64::from(bytes);
        }
        self.credit_changed.notify_waiters();
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.store(true, Ordering::Release);
        self.writer.wake_all();
        self.credit_changed.notify_waiters();
    }
}

/// Sends one request's response stream: chunks limited by the client's credit, then exactly one terminal frame.
pub struct StreamSender {
    connection: Arc<ServerConnection>,
    request_id: u64,
    sequence: u32,
    finished: bool,
}

impl StreamSender {
    pub fn request_id(&self) -> u64 {
        self.request_id
    }

    /// Chunks sent so far.
    pub fn chunks_sent(&self) -> u32 {
        self.sequence
    }

    pub fn connection(&self) -> &Arc<ServerConnection> {
        &self.connection
    }

    /// Sends the next chunk once the client has credit for it (a slow reader of this stream never blocks
    /// other streams on the same connection).
    pub async fn chunk(&mut self, text: &str) -> Result<(), TransportError> {
        let conn = &self.connection;
        loop {
            if conn.is_closed() {
                return Err(conn.closed_error());
            }
            let changed = conn.credit_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let credit = lock(&conn.credits)
                .get(&self.request_id)
                .copied()
                .unwrap_or(0);
            if credit > 0 {
                break;
            }
            if tokio::time::timeout(CREDIT_TIMEOUT, changed).await.is_err() {
                return Err(TransportError::Timeout(
                    "waiting for stream credit from the client",
                ));
            }
        }
        let message = StreamChunk {
            request_id: self.request_id,
            sequence: self.sequence,
            text: text.to_owned(),
        };
        let payload = protocol::encode(&message)?;
        if let Some(credit) = lock(&conn.credits).get_mut(&self.request_id) {
            *credit -= payload.len() as i64;
        }
        conn.send_raw(MessageType::StreamChunk.code(), self.request_id, &payload)
            .await?;
        self.sequence += 1;
        Ok(())
    }

    /// Ends the stream normally (terminal).
    pub async fn end(
        mut self,
        finish_reason: FinishReason,
        usage: Usage,
        time_to_first_token_us: u64,
        total_us: u64,
    ) -> Result<(), TransportError> {
        self.finished = true;
        let end = StreamEnd {
            request_id: self.request_id,
            chunks: self.sequence,
            finish_reason,
            usage,
            time_to_first_token_us,
            total_us,
        };
        self.connection.send(self.request_id, &end).await
    }

    /// Ends the stream with an error (terminal).
    pub async fn fail(
        mut self,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Result<(), TransportError> {
        self.finished = true;
        self.connection
            .send_error(self.request_id, code, message)
            .await
    }

    /// True once a terminal frame was sent.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        lock(&self.connection.credits).remove(&self.request_id);
        if !self.finished && !self.connection.is_closed() {
            // Never leave the client waiting: best-effort terminal error without blocking.
            tracing::warn!(
                request_id = self.request_id,
                "response stream dropped without a terminal frame"
            );
            let error = ErrorMessage {
                code: ErrorCode::Internal,
                message: "the engine dropped this request without an answer".into(),
            };
            if let Ok(payload) = protocol::encode(&error) {
                let _ = self.connection.try_send_raw(
                    MessageType::ErrorMessage.code(),
                    self.request_id,
                    &payload,
                );
            }
        }
    }
}
