//! The engine interface the bridge completes against: a request in, a stream of text chunks out.

use futures::{future::BoxFuture, stream::BoxStream, FutureExt};

pub use lapce_ai_transport::protocol::{
    CompletionMode, CompletionRequest, DocumentClosed, DocumentSync, Prefill,
};

/// What kind of failure a backend reports; decides the message the user sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendErrorKind {
    /// No usable model: the message says how to get one.
    ModelMissing,
    /// The engine cannot be reached or started.
    EngineUnavailable,
    /// The provider rejected the credentials or access.
    Auth,
    /// The provider asked us to slow down.
    RateLimited,
    /// The provider or model failed (5xx, bad stream, load failure, ...).
    Provider,
    /// A configuration problem (unknown profile, bad endpoint, ...).
    Config,
    /// The request was cancelled by the engine.
    Cancelled,
    /// Anything else.
    Internal,
}

/// A failed completion.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    pub kind: BackendErrorKind,
    pub message: String,
}

impl BackendError {
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Whether the user should hear about it (cancellations are routine).
    pub fn is_user_visible(&self) -> bool {
        self.kind != BackendErrorKind::Cancelled
    }

    /// The text of the one `window/showMessage` for this error.
    pub fn user_message(&self) -> String {
        let hint = match self.kind {
            BackendErrorKind::ModelMissing => "",
            BackendErrorKind::EngineUnavailable => {
                " (is `ai-engine` installed? see the `engine-path` setting)"
            }
            BackendErrorKind::Auth => " (check the provider's API key in the engine profile)",
            BackendErrorKind::Config => " (check the lapce-ai settings and the engine profile)",
            _ => "",
        };
        format!("lapce-ai: {}{hint}", self.message)
    }
}

/// The chunks of one completion, in order. The stream ending (`None`) means the completion is
/// complete; an `Err` item is terminal (nothing follows it).
pub type CompletionStream = BoxStream<'static, Result<String, BackendError>>;

/// Engine settings a backend may need; passed again whenever the user changes them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineSettings {
    /// Engine endpoint (shared-memory namespace) name.
    pub endpoint: String,
    /// Explicit `ai-engine` binary; empty = next to the bridge, then PATH.
    pub engine_path: String,
}

/// Something that completes code: the real engine client or an in-process fake.
///
/// Cancellation is by dropping: dropping the returned future, or the stream it yields, must stop
/// the work (the real client sends a transport `Cancel` for the stream).
pub trait CompletionBackend: Send + Sync + 'static {
    /// Starts one completion.
    fn complete(
        &self,
        request: CompletionRequest,
    ) -> BoxFuture<'static, Result<CompletionStream, BackendError>>;

    /// Warms the engine's cache for a document; resolves when the engine is done. Dropping the future
    /// cancels it. Default: nothing to warm.
    fn prefill(&self, _request: Prefill) -> BoxFuture<'static, Result<(), BackendError>> {
        Box::pin(async { Ok(()) })
    }

    /// Applies changed engine settings (endpoint, engine binary). Default: nothing to do.
    fn reconfigure(&self, _settings: &EngineSettings) {}

    /// The engine connection up right now, without connecting; `None` when there is none. Default: none
    /// (the backend keeps no documents).
    fn connection(&self) -> BoxFuture<'static, Option<ConnectionId>> {
        async { None }.boxed()
    }

    /// Sends a document notification on the connection that is up right now (fire and forget) and says which
    /// connection took it; `None` = dropped (not connected, or the send failed).
    fn send_document(&self, _notice: DocumentNotice) -> BoxFuture<'static, Option<ConnectionId>> {
        async { None }.boxed()
    }
}

/// Names one engine connection: a different value means a new engine-side document store (it starts empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId {
    pub server_pid: u32,
    pub slot: u32,
    pub generation: u64,
}

/// What the bridge tells the engine about open documents (for context from other files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentNotice {
    Sync(DocumentSync),
    Closed(DocumentClosed),
}
