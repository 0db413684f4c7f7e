//! Keeps the engine's copy of the open documents current (context from other files), off the completion path:
//! coalesced in the background, dropped while no engine is connected, re-sent whole after a reconnect.

use std::{collections::HashMap, sync::Arc, time::Duration};

use lsp_types::{TextDocumentContentChangeEvent, Url};
use ropey::Rope;
use tokio::{sync::Notify, task::JoinHandle};

use crate::{
    backend::{CompletionBackend, ConnectionId, DocumentClosed, DocumentNotice, DocumentSync},
    document::char_index,
};
use lapce_ai_transport::protocol::{ByteEdit, DocumentContent};

/// Documents larger than this are not sent (the engine's default limit too).
pub const MAX_SYNC_BYTES: usize = 1024 * 1024;
/// Pending edits beyond these limits are replaced by one full-text sync.
const MAX_PENDING_EDITS: usize = 64;
const MAX_PENDING_EDIT_BYTES: usize = 16 * 1024;
/// How often to look for an engine connection while documents wait to be synced.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// The path a document is known by, to the engine and in completion requests: the file path, else the URI.
pub fn document_path(uri: &Url) -> String {
    uri.to_file_path()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|()| uri.to_string())
}

/// The byte range an LSP change replaces in `text` (before it is applied); `None` for a full replacement or a
/// range outside the text.
pub fn byte_edit(text: &Rope, change: &TextDocumentContentChangeEvent) -> Option<ByteEdit> {
    let range = change.range?;
    let start = text.char_to_byte(char_index(text, range.start)?);
    let end = text.char_to_byte(char_index(text, range.end)?);
    (start <= end).then(|| ByteEdit {
        start: start as u64,
        end: end as u64,
        text: change.text.as_bytes().to_vec(),
    })
}

/// What the engine should learn about one document.
struct SyncedDocument {
    language_id: String,
    version: i32,
    /// The latest text (a rope clone shares its chunks: cheap).
    text: Rope,
    /// Edits since `engine_version` (only meaningful while `needs_full` is false).
    pending: Vec<ByteEdit>,
    pending_bytes: usize,
    /// The version the engine has, on the connection last synced.
    engine_version: Option<i32>,
    needs_full: bool,
    dirty: bool,
}

impl SyncedDocument {
    fn resend_whole(&mut self) {
        self.needs_full = true;
        self.dirty = true;
        self.pending.clear();
        self.pending_bytes = 0;
        self.engine_version = None;
    }
}

#[derive(Default)]
struct State {
    documents: HashMap<String, SyncedDocument>,
    closed: Vec<String>,
}

impl State {
    /// The engine on the other side forgot everything (new connection) or never heard it (dropped).
    fn resend_all(&mut self) {
        self.closed.clear();
        for doc in self.documents.values_mut() {
            doc.resend_whole();
        }
    }

    fn has_work(&self) -> bool {
        !self.closed.is_empty() || self.documents.values().any(|d| d.dirty)
    }

    /// The notices to send now, oldest concern first; marks them as sent.
    fn take_notices(&mut self) -> Vec<DocumentNotice> {
        let mut notices: Vec<DocumentNotice> = self
            .closed
            .drain(..)
            .map(|path| DocumentNotice::Closed(DocumentClosed { path }))
            .collect();
        for (path, doc) in self.documents.iter_mut().filter(|(_, d)| d.dirty) {
            doc.dirty = false;
            let content = match doc.engine_version {
                Some(base_version) if !doc.needs_full => DocumentContent::Edits {
                    base_version,
                    edits: std::mem::take(&mut doc.pending),
                },
                _ => {
                    if doc.text.len_bytes() > MAX_SYNC_BYTES {
                        // Logged when it grew too large; never sent.
                        continue;
                    }
                    DocumentContent::Full(String::from(&doc.text).into_bytes())
                }
            };
            doc.pending_bytes = 0;
            doc.needs_full = false;
            doc.engine_version = Some(doc.version);
            notices.push(DocumentNotice::Sync(DocumentSync {
                path: path.clone(),
                language_id: doc.language_id.clone(),
                version: doc.version,
                content,
            }));
        }
        notices
    }
}

struct Shared {
    state: std::sync::Mutex<State>,
    wake: Notify,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The server loop's handle: every call is a few map operations and a wake-up, never a send.
pub struct ContextSync {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl ContextSync {
    /// Starts the background sender (inside the tokio runtime).
    pub fn start(backend: Arc<dyn CompletionBackend>) -> Self {
        let shared = Arc::new(Shared {
            state: std::sync::Mutex::new(State::default()),
            wake: Notify::new(),
        });
        let task = tokio::spawn(send_loop(Arc::clone(&shared), backend));
        Self { shared, task }
    }

    pub fn opened(&self, path: String, language_id: &str, version: i32, text: &Rope) {
        if text.len_bytes() > MAX_SYNC_BYTES {
            tracing::info!(%path, bytes = text.len_bytes(), limit = MAX_SYNC_BYTES, "document too large to use as completion context");
        }
        self.shared.state().documents.insert(
            path,
            SyncedDocument {
                language_id: language_id.to_owned(),
                version,
                text: text.clone(),
                pending: Vec::new(),
                pending_bytes: 0,
                engine_version: None,
                needs_full: true,
                dirty: true,
            },
        );
        self.shared.wake.notify_one();
    }

    /// `edits` are the changes in order (byte ranges before each), or `None` when one could not be expressed
    /// as a range (full replacement, out of sync): then the whole text is sent.
    pub fn changed(&self, path: &str, version: i32, text: &Rope, edits: Option<Vec<ByteEdit>>) {
        let mut state = self.shared.state();
        let Some(doc) = state.documents.get_mut(path) else {
            return;
        };
        doc.version = version;
        doc.text = text.clone();
        doc.dirty = true;
        match edits {
            Some(edits) if !doc.needs_full => {
                doc.pending_bytes += edits.iter().map(|e| e.text.len()).sum::<usize>();
                doc.pending.extend(edits);
                if doc.pending.len() > MAX_PENDING_EDITS
                    || doc.pending_bytes > MAX_PENDING_EDIT_BYTES
                {
                    doc.resend_whole();
                }
            }
            _ => doc.resend_whole(),
        }
        drop(state);
        self.shared.wake.notify_one();
    }

    pub fn closed(&self, path: &str) {
        let mut state = self.shared.state();
        if let Some(doc) = state.documents.remove(path) {
            if doc.engine_version.is_some() {
                state.closed.push(path.to_owned());
            }
        }
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Looks for a (new) engine connection now: called when a completion is requested.
    pub fn poke(&self) {
        self.shared.wake.notify_one();
    }
}

impl Drop for ContextSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn send_loop(shared: Arc<Shared>, backend: Arc<dyn CompletionBackend>) {
    let mut synced_to: Option<ConnectionId> = None;
    loop {
        let waiting = shared.state().has_work();
        if waiting {
            tokio::select! {
                () = shared.wake.notified() => {}
                () = tokio::time::sleep(RETRY_INTERVAL) => {}
            }
        } else {
            shared.wake.notified().await;
        }
        let Some(connection) = backend.connection().await else {
            if synced_to.take().is_some() {
                shared.state().resend_all();
            }
            continue;
        };
        if synced_to != Some(connection) {
            if synced_to.is_some() {
                tracing::debug!("new engine connection: sending every open document again");
            }
            shared.state().resend_all();
            synced_to = Some(connection);
        }
        let notices = shared.state().take_notices();
        tracing::debug!(
            count = notices.len(),
            "context sync: sending document notices"
        );
        for notice in notices {
            if backend.send_document(notice).await != Some(connection) {
                // Dropped or went to another connection: start over on the next one.
                synced_to = None;
                shared.state().resend_all();
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, CompletionRequest, CompletionStream};
    use futures::{future::BoxFuture, FutureExt};
    use lsp_types::{Position, Range};

    /// Records what it is sent; `connected` says which connection is up.
    #[derive(Default)]
    struct Recorder {
        connected: std::sync::Mutex<Option<ConnectionId>>,
        sent: std::sync::Mutex<Vec<DocumentNotice>>,
    }

    impl CompletionBackend for Recorder {
        fn complete(
            &self,
            _request: CompletionRequest,
        ) -> BoxFuture<'static, Result<CompletionStream, BackendError>> {
            unreachable!("not used")
        }
        fn connection(&self) -> BoxFuture<'static, Option<ConnectionId>> {
            let id = *self.connected.lock().unwrap();
            async move { id }.boxed()
        }
        fn send_document(
            &self,
            notice: DocumentNotice,
        ) -> BoxFuture<'static, Option<ConnectionId>> {
            let id = *self.connected.lock().unwrap();
            if id.is_some() {
                self.sent.lock().unwrap().push(notice);
            }
            async move { id }.boxed()
        }
    }

    fn connection(generation: u64) -> Option<ConnectionId> {
        Some(ConnectionId {
            server_pid: 1,
            slot: 0,
            generation,
        })
    }

    fn change(line: u32, character: u32, text: &str) -> TextDocumentContentChangeEvent {
        let at = Position::new(line, character);
        TextDocumentContentChangeEvent {
            range: Some(Range::new(at, at)),
            range_length: None,
            text: text.into(),
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    fn kinds(sent: &[DocumentNotice]) -> Vec<String> {
        sent.iter()
            .map(|n| match n {
                DocumentNotice::Sync(s) => match &s.content {
                    DocumentContent::Full(_) => format!("full {} v{}", s.path, s.version),
                    DocumentContent::Edits {
                        base_version,
                        edits,
                    } => format!(
                        "edits {} v{base_version}->v{} x{}",
                        s.path,
                        s.version,
                        edits.len()
                    ),
                },
                DocumentNotice::Closed(c) => format!("closed {}", c.path),
            })
            .collect()
    }

    #[test]
    fn byte_edits_use_utf8_offsets_of_utf16_positions() {
        let text = Rope::from_str("a😀b\nzé\n");
        // After 😀 (2 UTF-16 units, 4 UTF-8 bytes).
        let edit = byte_edit(&text, &change(0, 3, "X")).unwrap();
        assert_eq!((edit.start, edit.end), (5, 5));
        let edit = byte_edit(&text, &change(1, 2, "")).unwrap();
        assert_eq!((edit.start, edit.end), (10, 10));
        let full = TextDocumentContentChangeEvent {
            range: None,
            range_length: None,
            text: "new".into(),
        };
        assert!(byte_edit(&text, &full).is_none());
        assert!(byte_edit(&text, &change(9, 0, "x")).is_none());
    }

    #[tokio::test]
    async fn full_on_open_edits_after_dropped_while_disconnected_resent_after_reconnect() {
        let recorder = Arc::new(Recorder::default());
        let sync = ContextSync::start(Arc::clone(&recorder) as Arc<dyn CompletionBackend>);
        let mut text = Rope::from_str("fn a() {}\n");
        // Not connected: nothing is sent (and nothing blocks).
        sync.opened("/a.rs".into(), "rust", 1, &text);
        settle().await;
        assert!(recorder.sent.lock().unwrap().is_empty());

        *recorder.connected.lock().unwrap() = connection(1);
        sync.poke();
        settle().await;
        assert_eq!(kinds(&recorder.sent.lock().unwrap()), ["full /a.rs v1"]);

        // Keystrokes: small edits against the version the engine has.
        for (i, ch) in ["x", "y"].iter().enumerate() {
            let edit = byte_edit(&text, &change(0, 9 + i as u32, ch)).unwrap();
            text.insert(9 + i, ch);
            sync.changed("/a.rs", 2 + i as i32, &text, Some(vec![edit]));
            settle().await;
        }
        let sent = kinds(&recorder.sent.lock().unwrap());
        assert_eq!(
            sent[1..],
            ["edits /a.rs v1->v2 x1", "edits /a.rs v2->v3 x1"]
        );

        // A new engine connection: the whole document again; a close is forwarded.
        *recorder.connected.lock().unwrap() = connection(2);
        sync.opened("/b.rs".into(), "rust", 1, &Rope::from_str("b"));
        settle().await;
        sync.closed("/b.rs");
        settle().await;
        let sent = kinds(&recorder.sent.lock().unwrap());
        let mut tail = sent[3..].to_vec();
        tail[..2].sort();
        assert_eq!(tail, ["full /a.rs v3", "full /b.rs v1", "closed /b.rs"]);
        let DocumentNotice::Sync(last_full) = recorder.sent.lock().unwrap()[3].clone() else {
            panic!("sync");
        };
        if last_full.path == "/a.rs" {
            assert_eq!(
                last_full.content,
                DocumentContent::Full(b"fn a() {}xy\n".to_vec())
            );
        }
    }

    #[tokio::test]
    async fn edits_piling_up_while_disconnected_become_one_full_text() {
        let recorder = Arc::new(Recorder::default());
        *recorder.connected.lock().unwrap() = connection(1);
        let sync = ContextSync::start(Arc::clone(&recorder) as Arc<dyn CompletionBackend>);
        let mut text = Rope::from_str("");
        sync.opened("/a.rs".into(), "rust", 0, &text);
        settle().await;
        *recorder.connected.lock().unwrap() = None;
        for i in 0..200 {
            let edit = byte_edit(&text, &change(0, i, "z")).unwrap();
            text.insert(i as usize, "z");
            sync.changed("/a.rs", i as i32 + 1, &text, Some(vec![edit]));
        }
        settle().await;
        *recorder.connected.lock().unwrap() = connection(1);
        sync.poke();
        settle().await;
        let sent = recorder.sent.lock().unwrap();
        assert_eq!(kinds(&sent), ["full /a.rs v0", "full /a.rs v200"]);
    }
}
