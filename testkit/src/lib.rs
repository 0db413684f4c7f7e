//! A scripted peer for integration tests and `transport-bench`: streams back what a request asks for.
//!
//! A `CompletionRequest` is answered with `max_tokens` chunks, each the request's `prefix`; a `suffix` of the
//! form `delay_us=N` waits N microseconds between chunks. `Cancel` ends the stream with `Cancelled`.
//! `StatusRequest` reports the connection count. This is not the engine; it exists so the transport can be
//! exercised across processes without one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapce_ai_transport::protocol::{
    Cancel, CompletionRequest, ErrorCode, FinishReason, MessageType, StatusReply, Usage,
};
use lapce_ai_transport::server::{DisconnectReason, ServerConnection, ServerHandler};
use lapce_ai_transport::ReceivedMessage;

type StreamKey = (u32, u64, u64);

/// Streams scripted responses; see the module docs.
pub struct ScriptedPeer {
    runtime: tokio::runtime::Handle,
    cancels: Mutex<HashMap<StreamKey, Arc<AtomicBool>>>,
    connections: AtomicU64,
    /// Disconnects seen, by reason (for tests).
    pub client_gone: AtomicU64,
    pub goodbyes: AtomicU64,
    pub violations: AtomicU64,
}

impl ScriptedPeer {
    pub fn new(runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Self {
            runtime,
            cancels: Mutex::new(HashMap::new()),
            connections: AtomicU64::new(0),
            client_gone: AtomicU64::new(0),
            goodbyes: AtomicU64::new(0),
            violations: AtomicU64::new(0),
        })
    }

    fn key(connection: &ServerConnection, id: u64) -> StreamKey {
        (connection.slot(), connection.generation(), id)
    }

    fn start_stream(
        self: &Arc<Self>,
        connection: &Arc<ServerConnection>,
        id: u64,
        request: CompletionRequest,
    ) {
        let cancelled = Arc::new(AtomicBool::new(false));
        self.cancels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(Self::key(connection, id), Arc::clone(&cancelled));
        let delay = request
            .suffix
            .strip_prefix("delay_us=")
            .and_then(|n| n.parse::<u64>().ok())
            .map(Duration::from_micros);
        let connection = Arc::clone(connection);
        let this = Arc::clone(self);
        self.runtime.spawn(async move {
            let started = Instant::now();
            let mut stream = connection.open_stream(id);
            let mut reason = FinishReason::Stop;
            for _ in 0..request.max_tokens {
                if cancelled.load(Ordering::Acquire) {
                    reason = FinishReason::Cancelled;
                    break;
                }
                if let Some(delay) = delay {
                    tokio::time::sleep(delay).await;
                }
                if stream.chunk(&request.prefix).await.is_err() {
                    return;
                }
            }
            if cancelled.load(Ordering::Acquire) {
                reason = FinishReason::Cancelled;
            }
            let total = started.elapsed().as_micros() as u64;
            let usage = Usage {
                prompt_tokens: 1,
                completion_tokens: stream.chunks_sent(),
            };
            let _ = stream.end(reason, usage, 0, total).await;
            this.cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&Self::key(&connection, id));
        });
    }
}

/// Wrapper so `Arc<ScriptedPeer>` can be the server's handler while tests keep a reference.
pub struct ScriptedHandler(pub Arc<ScriptedPeer>);

impl ServerHandler for ScriptedHandler {
    fn on_connect(&self, _connection: &Arc<ServerConnection>) {
        self.0.connections.fetch_add(1, Ordering::AcqRel);
    }

    fn on_message(&self, connection: &Arc<ServerConnection>, message: &ReceivedMessage<'_>) {
        let peer = &self.0;
        let id = message.id();
        match message.message_type() {
            Some(MessageType::CompletionRequest) => {
                match message.decode_owned::<CompletionRequest>() {
                    Ok(request) => peer.start_stream(connection, id, request),
                    Err(e) => {
                        let connection = Arc::clone(connection);
                        let text = e.to_string();
                        peer.runtime.spawn(async move {
                            let _ = connection
                                .send_error(id, ErrorCode::InvalidPayload, text)
                                .await;
                        });
                    }
                }
            }
            Some(MessageType::Cancel) => {
                if let Ok(cancel) = message.decode::<Cancel>() {
                    let key = ScriptedPeer::key(connection, cancel.request_id.to_native());
                    if let Some(flag) = peer
                        .cancels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&key)
                    {
                        flag.store(true, Ordering::Release);
                    }
                }
            }
            Some(MessageType::StatusRequest) => {
                let connection = Arc::clone(connection);
                let connections = peer.connections.load(Ordering::Acquire) as u32;
                peer.runtime.spawn(async move {
                    let reply = StatusReply {
                        connections,
                        engine_pid: std::process::id(),
                        ..StatusReply::default()
                    };
                    let _ = connection.send(id, &reply).await;
                });
            }
            _ => {
                let connection = Arc::clone(connection);
                let kind = message.header.message_type;
                peer.runtime.spawn(async move {
                    let _ = connection
                        .send_error(
                            id,
                            ErrorCode::BadRequest,
                            format!("the test peer does not handle type {kind}"),
                        )
                        .await;
                });
            }
        }
    }

    fn on_disconnect(&self, connection: &Arc<ServerConnection>, reason: &DisconnectReason) {
        let peer = &self.0;
        peer.connections.fetch_sub(1, Ordering::AcqRel);
        match reason {
            DisconnectReason::ClientGone => peer.client_gone.fetch_add(1, Ordering::AcqRel),
            DisconnectReason::Goodbye(_) => peer.goodbyes.fetch_add(1, Ordering::AcqRel),
            DisconnectReason::ProtocolViolation(_) | DisconnectReason::HandlerPanicked(_) => {
                peer.violations.fetch_add(1, Ordering::AcqRel)
            }
            DisconnectReason::ServerShutdown => 0,
        };
        let (slot, generation) = (connection.slot(), connection.generation());
        let mut cancels = peer.cancels.lock().unwrap_or_else(|p| p.into_inner());
        for (key, flag) in cancels.iter() {
            if key.0 == slot && key.1 == generation {
                flag.store(true, Ordering::Release);
            }
        }
        cancels.retain(|key, _| !(key.0 == slot && key.1 == generation));
    }
}

/// Builds a request for `chunks` copies of `text`, optionally `delay` apart.
pub fn scripted_request(text: &str, chunks: u32, delay: Option<Duration>) -> CompletionRequest {
    CompletionRequest {
        prefix: text.to_owned(),
        suffix: delay
            .map(|d| format!("delay_us={}", d.as_micros()))
            .unwrap_or_default(),
        max_tokens: chunks,
        ..CompletionRequest::default()
    }
}

/// Names in /dev/shm that start with `prefix`.
pub fn shm_names_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/dev/shm")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Files (not directories) anywhere below `dir`; empty when `dir` does not exist.
pub fn files_below(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_below(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Panics, naming what is left, unless `endpoint` left nothing in /dev/shm or in its rendezvous directory.
pub fn assert_endpoint_clean(endpoint: &lapce_ai_transport::Endpoint) {
    let shm = shm_names_with_prefix(&endpoint.shm_prefix());
    assert!(shm.is_empty(), "shared memory left behind: {shm:?}");
    let files = files_below(endpoint.dir());
    assert!(
        files.is_empty(),
        "files left in the rendezvous dir: {files:?}"
    );
}
