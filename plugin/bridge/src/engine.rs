//! The real backend: the ai-engine daemon over the shared-memory transport, started on demand.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use lapce_ai_transport::protocol::ErrorCode;
use lapce_ai_transport::{
    autostart, AsyncClient, ClientOptions, Endpoint, ReconnectingClient, ResponseStream,
    StreamEvent, TransportError,
};

use crate::backend::{
    BackendError, BackendErrorKind, CompletionBackend, CompletionRequest, CompletionStream,
    ConnectionId, DocumentNotice, EngineSettings, Prefill,
};

/// How long one request may wait for an engine to start (the engine itself is ready in milliseconds; the
/// first completion may then wait for the model to load, which is not counted here).
const ENGINE_START_TIMEOUT: Duration = Duration::from_secs(20);

/// The ai-engine client backend. One connection per bridge, re-established when the engine restarts.
#[derive(Default)]
pub struct EngineBackend {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    settings: EngineSettings,
    /// Built lazily inside the runtime; replaced when the endpoint or engine binary setting changes.
    client: Option<Arc<ReconnectingClient>>,
}

impl EngineBackend {
    pub fn new(settings: EngineSettings) -> Self {
        Self {
            state: Mutex::new(State {
                settings,
                client: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection for the current settings (must be called inside the tokio runtime).
    fn client(&self) -> Result<Arc<ReconnectingClient>, BackendError> {
        let mut state = self.state();
        if let Some(client) = &state.client {
            return Ok(Arc::clone(client));
        }
        let endpoint_name = if state.settings.endpoint.is_empty() {
            lapce_ai_transport::endpoint::DEFAULT_ENDPOINT
        } else {
            state.settings.endpoint.as_str()
        };
        let endpoint = Endpoint::named(endpoint_name)
            .map_err(|e| BackendError::new(BackendErrorKind::Config, e.to_string()))?;
        // The `engine-path` setting (empty = unset), else next to this bridge, else PATH.
        let explicit = PathBuf::from(&state.settings.engine_path);
        let starter = autostart::locate_engine(Some(&explicit)).map(|engine| {
            crate::first_use::prepare_bundled_engine(&engine);
            autostart::starter(engine, Vec::new())
        });
        let options = ClientOptions {
            client_name: format!("lapce-ai-lsp pid {}", std::process::id()),
            ..ClientOptions::default()
        };
        let client = Arc::new(ReconnectingClient::new(
            endpoint,
            options,
            starter,
            ENGINE_START_TIMEOUT,
        ));
        state.client = Some(Arc::clone(&client));
        Ok(client)
    }
}

impl CompletionBackend for EngineBackend {
    fn complete(
        &self,
        request: CompletionRequest,
    ) -> futures::future::BoxFuture<'static, Result<CompletionStream, BackendError>> {
        let client = self.client();
        async move {
            let client = client?;
            let stream = client.request(&request).await.map_err(backend_error)?;
            Ok(chunks(stream))
        }
        .boxed()
    }

    fn connection(&self) -> futures::future::BoxFuture<'static, Option<ConnectionId>> {
        let client = self.state().client.clone();
        async move { Some(connection_id(&client?.current().await?)) }.boxed()
    }

    fn send_document(
        &self,
        notice: DocumentNotice,
    ) -> futures::future::BoxFuture<'static, Option<ConnectionId>> {
        let client = self.state().client.clone();
        async move {
            let connection = client?.current().await?;
            let sent = match &notice {
                DocumentNotice::Sync(sync) => connection.notify(sync).await,
                DocumentNotice::Closed(closed) => connection.notify(closed).await,
            };
            match sent {
                Ok(()) => Some(connection_id(&connection)),
                Err(e) => {
                    tracing::debug!(error = %e, "document notice not sent");
                    None
                }
            }
        }
        .boxed()
    }

    fn prefill(
        &self,
        request: Prefill,
    ) -> futures::future::BoxFuture<'static, Result<(), BackendError>> {
        let client = self.client();
        async move {
            let mut stream = client?.request(&request).await.map_err(backend_error)?;
            // The engine ends the stream when the prefill is done; dropping it earlier cancels.
            while let Some(event) = stream.next().await {
                if let StreamEvent::End(_) = event.map_err(backend_error)? {
                    break;
                }
            }
            Ok(())
        }
        .boxed()
    }

    fn reconfigure(&self, settings: &EngineSettings) {
        let mut state = self.state();
        if state.settings != *settings {
            state.settings = settings.clone();
            state.client = None;
        }
    }
}

fn connection_id(connection: &AsyncClient) -> ConnectionId {
    let info = connection.info();
    ConnectionId {
        server_pid: info.server_pid,
        slot: info.slot,
        generation: info.generation,
    }
}

/// Adapts a transport response stream to the bridge's chunk stream. Dropping it cancels the request.
fn chunks(stream: ResponseStream) -> CompletionStream {
    futures::stream::unfold(Some(stream), |state| async move {
        let mut stream = state?;
        match stream.next().await? {
            Ok(StreamEvent::Chunk { text, .. }) => Some((Ok(text), Some(stream))),
            Ok(StreamEvent::End(_)) => None,
            Err(e) => Some((Err(backend_error(e)), None)),
        }
    })
    .boxed()
}

/// Classifies transport and engine errors into what the user should be told.
fn backend_error(error: TransportError) -> BackendError {
    let kind = match &error {
        TransportError::Remote { code, .. } => match code {
            ErrorCode::ModelMissing => BackendErrorKind::ModelMissing,
            ErrorCode::ProviderAuth | ErrorCode::ProviderForbidden => BackendErrorKind::Auth,
            ErrorCode::ProviderRateLimited => BackendErrorKind::RateLimited,
            ErrorCode::ProviderNotFound
            | ErrorCode::ProviderServer
            | ErrorCode::ProviderUnreachable
            | ErrorCode::ProviderProtocol
            | ErrorCode::ModelLoad => BackendErrorKind::Provider,
            ErrorCode::BadRequest | ErrorCode::Config => BackendErrorKind::Config,
            ErrorCode::Cancelled => BackendErrorKind::Cancelled,
            _ => BackendErrorKind::Internal,
        },
        TransportError::NoServer(_)
        | TransportError::ServerGone(_)
        | TransportError::Closed(_)
        | TransportError::Io { .. }
        | TransportError::Timeout(_) => BackendErrorKind::EngineUnavailable,
        TransportError::InvalidEndpoint(_) | TransportError::UnsafeRendezvous(_) => {
            BackendErrorKind::Config
        }
        _ => BackendErrorKind::Internal,
    };
    let message = match &error {
        TransportError::Remote { message, .. } => message.clone(),
        other => other.to_string(),
    };
    BackendError::new(kind, message)
}
