//! The daemon: serves the engine on a transport endpoint, one task per request, with cancel and shutdown.

pub mod config_watch;
pub mod detach;
mod idle;

pub use idle::{parse_idle_exit, IdleExit};

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use lapce_ai_transport::protocol::{
    Cancel, ChatRequest, CompletionRequest, DocumentClosed, DocumentSync, ErrorCode, MessageType,
    Prefill, Usage,
};
use lapce_ai_transport::server::{DisconnectReason, ServerConnection, ServerHandler, StreamSender};
use lapce_ai_transport::{Endpoint, ReceivedMessage, Server, ServerOptions, TransportError};
use tokio_util::sync::CancellationToken;

use crate::completion::WorkspaceStore;
use crate::config::EngineConfig;
use crate::engine::{Engine, EngineError, Outcome, ProviderFactory, TextSink};
use lapce_ai_transport::util::lock;

/// A request in flight: (slot, connection generation, request id).
type RequestKey = (u32, u64, u64);
/// A client connection: (slot, connection generation).
type ConnectionKey = (u32, u64);

/// Requests one connection may have in flight at once (prefills included); more are refused with `Busy`.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 16;

/// Connects transport callbacks (reactor thread) to engine tasks (tokio runtime).
pub struct DaemonHandler {
    engine: Arc<Engine>,
    runtime: tokio::runtime::Handle,
    in_flight: Mutex<HashMap<RequestKey, CancellationToken>>,
    /// Each connection's open documents (context from other files), dropped when it disconnects.
    workspaces: Mutex<HashMap<ConnectionKey, Arc<Mutex<WorkspaceStore>>>>,
    connections: AtomicU32,
    idle: Mutex<idle::IdleTracker>,
    /// Cancelled when a client asks the engine to stop (or it was idle too long).
    pub shutdown: CancellationToken,
}

enum Job {
    Complete(CompletionRequest),
    Chat(ChatRequest),
    /// Warms the cache for a document; the stream ends (no chunks) when done, and `Cancel` drops it.
    Prefill(Prefill),
}

struct StreamSink<'a>(&'a mut StreamSender);

impl TextSink for StreamSink<'_> {
    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.0.chunk(text).await.map_err(|e| e.to_string())
    }
}

impl DaemonHandler {
    pub fn new(engine: Arc<Engine>, runtime: tokio::runtime::Handle) -> Arc<Self> {
        let idle_exit = engine.config().idle_exit;
        Arc::new(Self {
            engine,
            runtime,
            in_flight: Mutex::new(HashMap::new()),
            workspaces: Mutex::new(HashMap::new()),
            connections: AtomicU32::new(0),
            idle: Mutex::new(idle::IdleTracker::new(idle_exit, Instant::now())),
            shutdown: CancellationToken::new(),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, idle::IdleTracker> {
        lock(&self.idle)
    }

    /// Time left before the idle exit (`None`: clients connected, requests running, or never).
    fn idle_remaining(&self) -> Option<Duration> {
        let running = !self.in_flight().is_empty();
        self.idle().remaining(running, Instant::now())
    }

    /// Cancels `shutdown` once the daemon has had no clients for the configured time.
    async fn exit_when_idle(self: Arc<Self>) {
        let Some(after) = self.idle().after() else {
            return;
        };
        loop {
            let wait = match self.idle_remaining() {
                Some(Duration::ZERO) => {
                    tracing::info!(
                        idle_secs = after.as_secs(),
                        "no clients for the idle time: exiting"
                    );
                    self.shutdown.cancel();
                    return;
                }
                Some(left) => left.min(Duration::from_secs(1)),
                None => Duration::from_secs(1),
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.shutdown.cancelled() => return,
            }
        }
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<RequestKey, CancellationToken>> {
        lock(&self.in_flight)
    }

    fn key(connection: &ServerConnection, id: u64) -> RequestKey {
        (connection.slot(), connection.generation(), id)
    }

    fn workspaces(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ConnectionKey, Arc<Mutex<WorkspaceStore>>>> {
        lock(&self.workspaces)
    }

    /// The connection's document store, if it synced any document.
    fn workspace(&self, connection: &ServerConnection) -> Option<Arc<Mutex<WorkspaceStore>>> {
        let key = (connection.slot(), connection.generation());
        self.workspaces().get(&key).cloned()
    }

    /// Applies a document notification to the connection's store (on the reactor thread: a bounded splice,
    /// so the order of edits is the order they arrived in). Ignored when context is switched off.
    fn on_document(
        &self,
        connection: &ServerConnection,
        sync: Option<&DocumentSync>,
        closed: Option<&str>,
    ) {
        if self.engine.config().context.effective_extra_tokens() == 0 {
            return;
        }
        let key = (connection.slot(), connection.generation());
        let store = match (sync, self.workspace(connection)) {
            (_, Some(store)) => store,
            (Some(_), None) => Arc::clone(
                self.workspaces()
                    .entry(key)
                    .or_insert_with(|| Arc::new(Mutex::new(self.engine.new_workspace()))),
            ),
            (None, None) => return,
        };
        let mut store = lock(&store);
        if let Some(sync) = sync {
            // A refusal is logged by the store; the document is just not used as context.
            let _ = store.apply(sync);
        }
        if let Some(path) = closed {
            store.remove(path);
        }
    }

    /// Records request `id` of `connection` as in flight, unless the connection already has
    /// [`MAX_IN_FLIGHT_PER_CONNECTION`] requests running (then `None`).
    fn register(
        &self,
        connection: &ServerConnection,
        id: u64,
    ) -> Option<(RequestKey, CancellationToken)> {
        let token = CancellationToken::new();
        let key = Self::key(connection, id);
        let mut in_flight = self.in_flight();
        let mine = in_flight
            .keys()
            .filter(|k| k.0 == key.0 && k.1 == key.1)
            .count();
        if mine >= MAX_IN_FLIGHT_PER_CONNECTION {
            return None;
        }
        if in_flight.insert(key, token.clone()).is_some() {
            tracing::warn!(
                id,
                "request id reused while in flight; the older request is orphaned"
            );
        }
        Some((key, token))
    }

    fn start(self: &Arc<Self>, connection: &Arc<ServerConnection>, id: u64, job: Job) {
        let Some((key, token)) = self.register(connection, id) else {
            self.reply_error(
                connection,
                id,
                ErrorCode::Busy,
                format!(
                    "too many requests in flight on this connection (limit {MAX_IN_FLIGHT_PER_CONNECTION}); \
                     cancel older ones first"
                ),
            );
            return;
        };
        let this = Arc::clone(self);
        let workspace = matches!(job, Job::Complete(_))
            .then(|| self.workspace(connection))
            .flatten();
        let connection = Arc::clone(connection);
        self.runtime.spawn(async move {
            let mut stream = connection.open_stream(id);
            let work = async {
                let mut sink = StreamSink(&mut stream);
                match job {
                    Job::Complete(request) => {
                        this.engine
                            .complete_in(request, workspace.as_deref(), &mut sink, &token)
                            .await
                    }
                    Job::Chat(request) => this.engine.chat(request, &mut sink, &token).await,
                    Job::Prefill(request) => this.engine.prefill(request, &token).await,
                }
            };
            // A panic in one request must not take the daemon down: it becomes that request's error.
            let result = AssertUnwindSafe(work).catch_unwind().await;
            let sent = match result {
                Ok(Ok(outcome)) => finish(stream, outcome).await,
                Ok(Err(EngineError::ClientGone(why))) => {
                    tracing::debug!(id, %why, "client went away mid-stream");
                    Ok(())
                }
                Ok(Err(error)) => {
                    tracing::info!(id, code = ?error.code(), %error, "request failed");
                    stream.fail(error.code(), error.to_string()).await
                }
                Err(panic) => {
                    let what = lapce_ai_transport::util::panic_text(&*panic);
                    tracing::error!(id, %what, "request panicked");
                    stream
                        .fail(
                            ErrorCode::Internal,
                            format!("internal error in the engine: {what}"),
                        )
                        .await
                }
            };
            if let Err(e) = sent {
                tracing::debug!(id, error = %e, "could not deliver the terminal frame");
            }
            this.in_flight().remove(&key);
        });
    }

    fn reply_error(
        &self,
        connection: &Arc<ServerConnection>,
        id: u64,
        code: ErrorCode,
        message: String,
    ) {
        let connection = Arc::clone(connection);
        self.runtime.spawn(async move {
            let _ = connection.send_error(id, code, message).await;
        });
    }
}

async fn finish(stream: StreamSender, outcome: Outcome) -> Result<(), TransportError> {
    let usage = Usage {
        prompt_tokens: outcome.usage.prompt_tokens,
        completion_tokens: outcome.usage.completion_tokens,
    };
    stream
        .end(
            outcome.finish_reason,
            usage,
            outcome
                .time_to_first_token
                .map_or(0, |d| d.as_micros() as u64),
            outcome.total.as_micros() as u64,
        )
        .await
}

/// The handler registered with the transport (the reactor calls it; it only dispatches).
pub struct Handler(pub Arc<DaemonHandler>);

impl ServerHandler for Handler {
    fn on_connect(&self, connection: &Arc<ServerConnection>) {
        self.0.connections.fetch_add(1, Ordering::AcqRel);
        self.0
            .idle()
            .connected((connection.slot(), connection.generation()));
        tracing::debug!(slot = connection.slot(), client = %connection.client_name(), "client connected");
    }

    fn on_message(&self, connection: &Arc<ServerConnection>, message: &ReceivedMessage<'_>) {
        let daemon = &self.0;
        let id = message.id();
        daemon.idle().message(
            (connection.slot(), connection.generation()),
            message.message_type() == Some(MessageType::StatusRequest),
        );
        match message.message_type() {
            Some(MessageType::CompletionRequest) => {
                match message.decode_owned::<CompletionRequest>() {
                    Ok(request) => daemon.start(connection, id, Job::Complete(request)),
                    Err(e) => {
                        daemon.reply_error(connection, id, ErrorCode::InvalidPayload, e.to_string())
                    }
                }
            }
            Some(MessageType::ChatRequest) => match message.decode_owned::<ChatRequest>() {
                Ok(request) => daemon.start(connection, id, Job::Chat(request)),
                Err(e) => {
                    daemon.reply_error(connection, id, ErrorCode::InvalidPayload, e.to_string())
                }
            },
            Some(MessageType::Prefill) => match message.decode_owned::<Prefill>() {
                Ok(request) => daemon.start(connection, id, Job::Prefill(request)),
                Err(e) => {
                    daemon.reply_error(connection, id, ErrorCode::InvalidPayload, e.to_string())
                }
            },
            Some(MessageType::Cancel) => match message.decode::<Cancel>() {
                Ok(cancel) => {
                    let key = DaemonHandler::key(connection, cancel.request_id.to_native());
                    if let Some(token) = daemon.in_flight().get(&key) {
                        token.cancel();
                    }
                }
                Err(e) => {
                    daemon.reply_error(connection, id, ErrorCode::InvalidPayload, e.to_string())
                }
            },
            Some(MessageType::DocumentSync) => match message.decode_owned::<DocumentSync>() {
                Ok(sync) => daemon.on_document(connection, Some(&sync), None),
                // A notification has no reply stream: log it.
                Err(e) => {
                    tracing::warn!(client = %connection.client_name(), error = %e, "ignoring a malformed DocumentSync")
                }
            },
            Some(MessageType::DocumentClosed) => match message.decode::<DocumentClosed>() {
                Ok(closed) => daemon.on_document(connection, None, Some(closed.path.as_str())),
                Err(e) => {
                    tracing::warn!(client = %connection.client_name(), error = %e, "ignoring a malformed DocumentClosed")
                }
            },
            Some(MessageType::StatusRequest) => {
                let mut status = daemon
                    .engine
                    .status(daemon.connections.load(Ordering::Acquire));
                let after = daemon.idle().after();
                status.idle_exit_after_ms = after.map_or(0, |d| d.as_millis() as u64);
                status.idle_exit_in_ms = daemon
                    .idle_remaining()
                    .map_or(u64::MAX, |d| d.as_millis() as u64);
                let connection = Arc::clone(connection);
                daemon.runtime.spawn(async move {
                    let _ = connection.send(id, &status).await;
                });
            }
            Some(MessageType::Shutdown) => {
                tracing::info!(client = %connection.client_name(), "shutdown requested");
                daemon.shutdown.cancel();
            }
            other => daemon.reply_error(
                connection,
                id,
                ErrorCode::BadRequest,
                format!(
                    "the engine does not accept {:?} from clients",
                    other.map(MessageType::name)
                ),
            ),
        }
    }

    fn on_disconnect(&self, connection: &Arc<ServerConnection>, reason: &DisconnectReason) {
        let daemon = &self.0;
        daemon.connections.fetch_sub(1, Ordering::AcqRel);
        let (slot, generation) = (connection.slot(), connection.generation());
        daemon.workspaces().remove(&(slot, generation));
        daemon
            .idle()
            .disconnected((slot, generation), Instant::now());
        let mut cancelled = 0;
        for (key, token) in daemon.in_flight().iter() {
            if key.0 == slot && key.1 == generation {
                token.cancel();
                cancelled += 1;
            }
        }
        tracing::debug!(slot, ?reason, cancelled, "client disconnected");
    }
}

/// Resolves when `signal` arrives (never, if its handler could not be installed).
async fn received(signal: &mut std::io::Result<tokio::signal::unix::Signal>) {
    match signal.as_mut() {
        Ok(signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

/// The configuration a daemon starts with and the file it follows.
pub struct StartConfig {
    /// What the file gave, or the defaults when it could not be used (`error` says why).
    pub config: EngineConfig,
    /// Why the file could not be used at start; requests fail with it until the file is fixed.
    pub error: Option<String>,
    /// The file to watch (`None`: no home directory and no `--config`).
    pub watched: Option<config_watch::WatchedConfig>,
}

impl StartConfig {
    /// Just `config`, with no file behind it (tests, benchmarks).
    pub fn fixed(config: EngineConfig) -> Self {
        Self {
            config,
            error: None,
            watched: None,
        }
    }
}

/// Runs the engine in the foreground until a `Shutdown` message, SIGINT, SIGTERM or the idle exit.
pub fn serve(
    start: StartConfig,
    endpoint: &Endpoint,
    factory: ProviderFactory,
) -> Result<(), TransportError> {
    let StartConfig {
        config,
        error,
        watched,
    } = start;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ai-engine-worker")
        .enable_all()
        .build()
        .map_err(|e| TransportError::io("starting the async runtime", e))?;
    let engine = Engine::new(config, factory, endpoint.name());
    if let Some(error) = error {
        engine.config_failed(error, false);
    }
    let daemon = DaemonHandler::new(Arc::clone(&engine), runtime.handle().clone());
    let options = ServerOptions {
        server_name: format!("ai-engine {}", env!("CARGO_PKG_VERSION")),
        ..ServerOptions::default()
    };
    // Signal handlers exist before the endpoint is ready, so a SIGTERM right after start-up is a clean stop.
    let (mut terminate, mut interrupt) = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        )
    });
    let server = Server::bind(endpoint, options, Arc::new(Handler(Arc::clone(&daemon))))?;
    engine.warm_up();
    runtime.spawn(Arc::clone(&daemon).exit_when_idle());
    if let Some(watched) = watched {
        config_watch::spawn(Arc::clone(&engine), watched, daemon.shutdown.clone());
    }
    tracing::info!(
        endpoint = endpoint.name(),
        pid = std::process::id(),
        "ai-engine serving"
    );
    runtime.block_on(async {
        tokio::select! {
            () = daemon.shutdown.cancelled() => {}
            () = received(&mut interrupt) => tracing::info!("interrupted"),
            () = received(&mut terminate) => tracing::info!("terminated"),
        }
    });
    for token in daemon.in_flight().values() {
        token.cancel();
    }
    server.shutdown();
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    tracing::info!("ai-engine stopped");
    Ok(())
}
