//! The LSP server loop: documents, settings, debounced and superseded inline completions.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use futures::StreamExt;
use lsp_server::{Connection, ErrorCode, Message, Notification, Request, RequestId, Response};
use lsp_types::{
    notification::{
        Cancel, DidChangeConfiguration, DidChangeTextDocument, DidCloseTextDocument,
        DidOpenTextDocument, Exit, Notification as _, Progress, ShowMessage,
    },
    request::{Initialize, InlineCompletionRequest, Request as _, Shutdown},
    CancelParams, DidChangeConfigurationParams, DidChangeTextDocumentParams,
    DidCloseTextDocumentParams, DidOpenTextDocumentParams, InitializeParams,
    InlineCompletionParams, InlineCompletionTriggerKind, MessageType, NumberOrString, OneOf,
    PositionEncodingKind, ServerCapabilities, ServerInfo, ShowMessageParams,
    TextDocumentSyncCapability, TextDocumentSyncKind, TextDocumentSyncOptions, Url,
};
use serde_json::{json, Value};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::{
    backend::{BackendError, CompletionBackend, CompletionRequest, Prefill},
    context_sync::{byte_edit, document_path, ContextSync},
    debounce::Rhythm,
    document::{position_of, ContextLimits, Document},
    first_use::FirstCompletion,
    prefill::Prefiller,
    settings::Settings,
};

/// How long one completion may take before it is given up (answered with `[]`).
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the server until the client's stream ends (stdin closed) or `exit` arrives.
pub async fn run(connection: Connection, backend: Arc<dyn CompletionBackend>) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let receiver = connection.receiver.clone();
    let forward_tx = events_tx.clone();
    let forwarder = std::thread::Builder::new()
        .name("lsp-forward".into())
        .spawn(move || {
            for msg in receiver {
                if forward_tx.send(Event::Lsp(msg)).is_err() {
                    return;
                }
            }
            // The reader ended: stdin closed (or the stream broke, or `exit` was read).
            let _ = forward_tx.send(Event::Closed);
        });
    if let Err(err) = forwarder {
        tracing::error!(%err, "cannot start the message thread");
        return;
    }
    let mut server = Server {
        out: connection.sender.clone(),
        events: events_tx,
        context: ContextSync::start(Arc::clone(&backend)),
        backend,
        settings: Settings::default(),
        state: State::Uninitialized,
        docs: HashMap::new(),
        rhythm: HashMap::new(),
        inflight: HashMap::new(),
        errors: ErrorNotifier::default(),
        prefills: Prefiller::default(),
        first_use: FirstCompletion::default(),
    };
    while let Some(event) = events.recv().await {
        let keep_going = match event {
            Event::Lsp(msg) => server.on_message(msg),
            Event::Done { id, outcome } => {
                server.on_done(id, outcome);
                true
            }
            Event::Closed => {
                tracing::info!("client closed the connection; exiting");
                false
            }
        };
        if !keep_going {
            break;
        }
    }
    server.abort_all();
}

enum Event {
    Lsp(Message),
    Closed,
    Done {
        id: RequestId,
        outcome: Result<String, BackendError>,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Uninitialized,
    Running,
    ShutDown,
}

struct Inflight {
    uri: Url,
    task: JoinHandle<()>,
}

struct Server {
    out: Sender<Message>,
    events: mpsc::UnboundedSender<Event>,
    backend: Arc<dyn CompletionBackend>,
    /// Tells the engine about open documents, in the background.
    context: ContextSync,
    settings: Settings,
    state: State,
    docs: HashMap<Url, Document>,
    rhythm: HashMap<Url, Rhythm>,
    /// Unanswered inline completion requests; whoever removes an entry answers it.
    inflight: HashMap<RequestId, Inflight>,
    errors: ErrorNotifier,
    prefills: Prefiller,
    /// `$/progress` while the first completion starts the engine.
    first_use: FirstCompletion,
}

impl Server {
    fn send(&self, msg: Message) {
        if let Err(err) = self.out.send(msg) {
            tracing::warn!(%err, "cannot write to the client");
        }
    }

    fn respond_ok(&self, id: RequestId, result: Value) {
        self.send(Message::Response(Response::new_ok(id, result)));
    }

    fn respond_err(&self, id: RequestId, code: ErrorCode, message: impl Into<String>) {
        self.send(Message::Response(Response::new_err(
            id,
            code as i32,
            message.into(),
        )));
    }

    fn notify(&self, method: &str, params: impl serde::Serialize) {
        self.send(Message::Notification(Notification::new(
            method.to_owned(),
            params,
        )));
    }

    /// Handles one client message; `false` ends the loop.
    fn on_message(&mut self, msg: Message) -> bool {
        match msg {
            Message::Request(req) => self.on_request(req),
            Message::Notification(n) => return self.on_notification(n),
            Message::Response(resp) => {
                tracing::debug!(id = %resp.id, "ignoring a response from the client");
            }
        }
        true
    }

    fn on_request(&mut self, req: Request) {
        match (&self.state, req.method.as_str()) {
            (State::Uninitialized, Initialize::METHOD) => self.on_initialize(req),
            (State::Uninitialized, _) => {
                self.respond_err(req.id, ErrorCode::ServerNotInitialized, "initialize first")
            }
            (_, Initialize::METHOD) => {
                self.respond_err(req.id, ErrorCode::InvalidRequest, "already initialized")
            }
            (State::ShutDown, _) => {
                self.respond_err(req.id, ErrorCode::InvalidRequest, "shutting down")
            }
            (_, Shutdown::METHOD) => {
                self.state = State::ShutDown;
                self.abort_all();
                self.respond_ok(req.id, Value::Null);
            }
            (_, InlineCompletionRequest::METHOD) => self.on_inline_completion(req),
            (_, method) => {
                let message = format!("unsupported request {method}");
                self.respond_err(req.id, ErrorCode::MethodNotFound, message)
            }
        }
    }

    fn on_initialize(&mut self, req: Request) {
        let params: InitializeParams = match serde_json::from_value(req.params) {
            Ok(p) => p,
            Err(err) => {
                self.respond_err(req.id, ErrorCode::InvalidParams, err.to_string());
                return;
            }
        };
        self.apply_settings(Settings::from_value(params.initialization_options.as_ref()));
        let capabilities = ServerCapabilities {
            position_encoding: Some(PositionEncodingKind::UTF16),
            text_document_sync: Some(TextDocumentSyncCapability::Options(
                TextDocumentSyncOptions {
                    open_close: Some(true),
                    change: Some(TextDocumentSyncKind::INCREMENTAL),
                    ..Default::default()
                },
            )),
            inline_completion_provider: Some(OneOf::Left(true)),
            ..Default::default()
        };
        let result = json!({
            "capabilities": capabilities,
            "serverInfo": ServerInfo {
                name: "lapce-ai-lsp".into(),
                version: Some(env!("CARGO_PKG_VERSION").into()),
            },
        });
        self.state = State::Running;
        self.respond_ok(req.id, result);
        tracing::info!(settings = ?self.settings, "initialized");
    }

    fn on_notification(&mut self, n: Notification) -> bool {
        match n.method.as_str() {
            Exit::METHOD => return false,
            Cancel::METHOD => {
                if let Ok(p) = serde_json::from_value::<CancelParams>(n.params) {
                    let id = match p.id {
                        NumberOrString::Number(n) => RequestId::from(n),
                        NumberOrString::String(s) => RequestId::from(s),
                    };
                    if let Some(entry) = self.inflight.remove(&id) {
                        entry.task.abort();
                        self.respond_err(id, ErrorCode::RequestCanceled, "cancelled");
                    }
                }
            }
            _ if self.state == State::Uninitialized => {}
            DidOpenTextDocument::METHOD => {
                match serde_json::from_value::<DidOpenTextDocumentParams>(n.params) {
                    Ok(p) => {
                        let d = p.text_document;
                        let doc = Document::new(d.language_id, d.version, &d.text);
                        let path = document_path(&d.uri);
                        self.context
                            .opened(path, &doc.language_id, doc.version, &doc.text);
                        self.docs.insert(d.uri.clone(), doc);
                        self.prefill(d.uri);
                    }
                    Err(err) => tracing::warn!(%err, "bad didOpen"),
                }
            }
            DidChangeTextDocument::METHOD => {
                match serde_json::from_value::<DidChangeTextDocumentParams>(n.params) {
                    Ok(p) => self.on_did_change(p),
                    Err(err) => tracing::warn!(%err, "bad didChange"),
                }
            }
            DidCloseTextDocument::METHOD => {
                match serde_json::from_value::<DidCloseTextDocumentParams>(n.params) {
                    Ok(p) => {
                        let uri = p.text_document.uri;
                        self.context.closed(&document_path(&uri));
                        self.prefills.stop(&uri);
                        self.supersede(&uri, "document closed");
                        self.docs.remove(&uri);
                        self.rhythm.remove(&uri);
                    }
                    Err(err) => tracing::warn!(%err, "bad didClose"),
                }
            }
            DidChangeConfiguration::METHOD => {
                match serde_json::from_value::<DidChangeConfigurationParams>(n.params) {
                    Ok(p) if p.settings.is_object() => {
                        self.apply_settings(Settings::from_value(Some(&p.settings)));
                        tracing::info!(settings = ?self.settings, "settings changed");
                    }
                    Ok(_) => tracing::debug!("didChangeConfiguration without settings"),
                    Err(err) => tracing::warn!(%err, "bad didChangeConfiguration"),
                }
            }
            method => tracing::debug!(method, "ignoring notification"),
        }
        true
    }

    fn on_did_change(&mut self, p: DidChangeTextDocumentParams) {
        let uri = p.text_document.uri;
        let Some(doc) = self.docs.get_mut(&uri) else {
            tracing::warn!(%uri, "didChange for a document that is not open");
            return;
        };
        doc.version = p.text_document.version;
        // The engine's copy gets the same edits as byte ranges, or the whole text if one does not apply.
        let mut edits = Some(Vec::with_capacity(p.content_changes.len()));
        for change in &p.content_changes {
            let edit = byte_edit(&doc.text, change);
            if let Err(err) = doc.apply(change) {
                tracing::warn!(%uri, %err, "document out of sync; ignoring the edit");
                edits = None;
            }
            edits = edits.zip(edit).map(|(mut all, edit)| {
                all.push(edit);
                all
            });
        }
        self.context
            .changed(&document_path(&uri), doc.version, &doc.text, edits);
        if self.prefills.is_active(&uri) {
            self.prefill(uri);
        }
    }

    /// Schedules a prefill of `uri` with the cursor at its end (where an opened file is most often extended).
    fn prefill(&mut self, uri: Url) {
        let Some(doc) = self.docs.get(&uri).filter(|_| self.settings.enabled) else {
            return;
        };
        let end = position_of(&doc.text, doc.text.len_chars());
        let Some(ctx) = doc.context(end, ContextLimits::default()) else {
            return;
        };
        let request = Prefill {
            profile: self.settings.profile.clone(),
            language_id: doc.language_id.clone(),
            file_path: document_path(&uri),
            prefix: ctx.prefix,
            suffix: ctx.suffix,
        };
        self.prefills
            .schedule(uri, request, Arc::clone(&self.backend));
    }

    fn apply_settings(&mut self, settings: Settings) {
        if settings.engine() != self.settings.engine() {
            self.backend.reconfigure(&settings.engine());
        }
        self.settings = settings;
        if !self.settings.enabled {
            // Disabled: answer everything pending with "nothing to show".
            for (id, entry) in std::mem::take(&mut self.inflight) {
                entry.task.abort();
                self.respond_ok(id, json!([]));
            }
        }
    }

    /// Answers every pending request of `uri` with an error (Lapce ignores errors: no flicker).
    fn supersede(&mut self, uri: &Url, why: &str) {
        let ids: Vec<RequestId> = self
            .inflight
            .iter()
            .filter(|(_, e)| &e.uri == uri)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(entry) = self.inflight.remove(&id) {
                entry.task.abort();
                self.respond_err(id, ErrorCode::RequestCanceled, why);
            }
        }
    }

    fn abort_all(&mut self) {
        self.prefills.stop_all();
        for (_, entry) in self.inflight.drain() {
            entry.task.abort();
        }
    }

    fn on_inline_completion(&mut self, req: Request) {
        let params: InlineCompletionParams = match serde_json::from_value(req.params) {
            Ok(p) => p,
            Err(err) => {
                self.respond_err(req.id, ErrorCode::InvalidParams, err.to_string());
                return;
            }
        };
        let uri = params.text_document_position.text_document.uri;
        self.prefills.stop(&uri);
        self.supersede(&uri, "superseded by a newer inline completion request");
        if !self.settings.enabled {
            self.respond_ok(req.id, json!([]));
            return;
        }
        let position = params.text_document_position.position;
        let Some(doc) = self.docs.get(&uri) else {
            self.respond_ok(req.id, json!([]));
            return;
        };
        let Some(ctx) = doc.context(position, ContextLimits::default()) else {
            tracing::debug!(%uri, ?position, "position outside the document");
            self.respond_ok(req.id, json!([]));
            return;
        };
        let file_path = document_path(&uri);
        self.context.poke();
        let request = CompletionRequest {
            profile: self.settings.profile.clone(),
            language_id: doc.language_id.clone(),
            file_path,
            prefix: ctx.prefix,
            suffix: ctx.suffix,
            mode: self.settings.mode(),
            max_tokens: 0,
            temperature: None,
            max_lines: self.settings.max_lines,
        };
        let delay = if params.context.trigger_kind == InlineCompletionTriggerKind::Automatic {
            let rhythm = self.rhythm.entry(uri.clone()).or_default();
            rhythm.observe(Instant::now());
            rhythm.delay(self.settings.debounce_ms, ctx.at_line_end)
        } else {
            Duration::ZERO
        };
        if let Some(progress) = self.first_use.begin() {
            self.notify(Progress::METHOD, progress);
        }
        let backend = Arc::clone(&self.backend);
        let events = self.events.clone();
        let id = req.id.clone();
        let max_lines = self.settings.max_lines;
        let task = tokio::spawn(async move {
            // tokio's timer has millisecond ticks: even a zero sleep would wait for the next tick.
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let outcome = complete(backend.as_ref(), request, max_lines).await;
            let _ = events.send(Event::Done { id, outcome });
        });
        self.inflight.insert(req.id, Inflight { uri, task });
    }

    fn on_done(&mut self, id: RequestId, outcome: Result<String, BackendError>) {
        // The completion may have connected (or started) the engine: sync the documents now.
        self.context.poke();
        let finished = outcome.as_ref().map(|_| ()).map_err(|e| e.message.as_str());
        if let Some(progress) = self.first_use.end(finished) {
            self.notify(Progress::METHOD, progress);
        }
        if self.inflight.remove(&id).is_none() {
            return; // Already answered (superseded, cancelled or disabled).
        }
        match outcome {
            Ok(text) => {
                self.errors.success();
                let items: Vec<Value> = finish_text(&text, self.settings.max_lines)
                    .map(|t| json!({ "insertText": t }))
                    .into_iter()
                    .collect();
                self.respond_ok(id, Value::Array(items));
            }
            Err(err) => {
                tracing::warn!(kind = ?err.kind, %err, "completion failed");
                if let Some(message) = self.errors.failure(&err) {
                    self.notify(
                        ShowMessage::METHOD,
                        ShowMessageParams {
                            typ: MessageType::ERROR,
                            message,
                        },
                    );
                }
                self.respond_ok(id, json!([]));
            }
        }
    }
}

/// Asks the backend and gathers the text, stopping (dropping the stream) once `max_lines` are in.
async fn complete(
    backend: &dyn CompletionBackend,
    request: CompletionRequest,
    max_lines: u32,
) -> Result<String, BackendError> {
    let work = async {
        let mut stream = backend.complete(request).await?;
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            text.push_str(&chunk?);
            if text.matches('\n').count() >= max_lines as usize {
                break;
            }
        }
        Ok(text)
    };
    match tokio::time::timeout(COMPLETION_TIMEOUT, work).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(timeout = ?COMPLETION_TIMEOUT, "completion timed out");
            Ok(String::new())
        }
    }
}

/// The text to show: at most `max_lines` lines, without trailing whitespace; `None` if empty.
fn finish_text(text: &str, max_lines: u32) -> Option<String> {
    let kept: String = text
        .split_inclusive('\n')
        .take(max_lines.max(1) as usize)
        .collect();
    let kept = kept.trim_end();
    (!kept.trim().is_empty()).then(|| kept.to_owned())
}

/// Shows each distinct failure once, until a completion succeeds again.
#[derive(Debug, Default)]
struct ErrorNotifier {
    shown: Option<String>,
}

impl ErrorNotifier {
    fn failure(&mut self, err: &BackendError) -> Option<String> {
        if !err.is_user_visible() {
            return None;
        }
        let message = err.user_message();
        if self.shown.as_deref() == Some(message.as_str()) {
            return None;
        }
        self.shown = Some(message.clone());
        Some(message)
    }

    fn success(&mut self) {
        self.shown = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendErrorKind;

    #[test]
    fn text_is_cut_to_max_lines() {
        assert_eq!(finish_text("a\nb\nc\n", 2).as_deref(), Some("a\nb"));
        assert_eq!(finish_text("  \n\n", 3), None);
        assert_eq!(finish_text("x  ", 1).as_deref(), Some("x"));
    }

    #[test]
    fn errors_are_shown_once() {
        let mut n = ErrorNotifier::default();
        let e = BackendError::new(BackendErrorKind::ModelMissing, "no model");
        assert!(n.failure(&e).is_some());
        assert!(n.failure(&e).is_none());
        n.success();
        assert!(n.failure(&e).is_some());
        let c = BackendError::new(BackendErrorKind::Cancelled, "c");
        assert!(n.failure(&c).is_none());
    }
}
