//! Prefill: when a document is opened (or changes before its first completion), ask the engine to evaluate its prompt early.

use std::{collections::HashMap, sync::Arc, time::Duration};

use lapce_ai_transport::protocol::Prefill;
use lsp_types::Url;
use tokio::task::JoinHandle;

use crate::backend::CompletionBackend;

/// How long a document must stay put (no further open or edit) before its prefill is sent: opening many files
/// at once, or typing right away, sends nothing.
pub const PREFILL_REST: Duration = Duration::from_millis(250);

/// One pending or running prefill per document. Dropping or stopping one aborts it, which cancels it in the
/// engine too (the request's stream is dropped).
#[derive(Default)]
pub struct Prefiller {
    tasks: HashMap<Url, JoinHandle<()>>,
}

impl Prefiller {
    /// (Re)starts the prefill of `uri` after [`PREFILL_REST`]; an older one for the same document is dropped.
    pub fn schedule(&mut self, uri: Url, request: Prefill, backend: Arc<dyn CompletionBackend>) {
        self.stop(&uri);
        let task = tokio::spawn(async move {
            tokio::time::sleep(PREFILL_REST).await;
            if let Err(err) = backend.prefill(request).await {
                tracing::debug!(%err, "prefill failed");
            }
        });
        self.tasks.insert(uri, task);
    }

    /// True when a prefill for `uri` is pending or running.
    pub fn is_active(&self, uri: &Url) -> bool {
        self.tasks.get(uri).is_some_and(|t| !t.is_finished())
    }

    /// Drops the prefill of `uri` (the document was closed, or a completion for it started).
    pub fn stop(&mut self, uri: &Url) {
        if let Some(task) = self.tasks.remove(uri) {
            task.abort();
        }
    }

    /// Drops every prefill.
    pub fn stop_all(&mut self) {
        for (_, task) in self.tasks.drain() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BackendError, CompletionRequest, CompletionStream};
    use futures::future::BoxFuture;
    use futures::FutureExt;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder {
        prefills: Mutex<Vec<String>>,
    }

    impl CompletionBackend for Recorder {
        fn complete(
            &self,
            _request: CompletionRequest,
        ) -> BoxFuture<'static, Result<CompletionStream, BackendError>> {
            async { Ok(futures::StreamExt::boxed(futures::stream::empty())) }.boxed()
        }

        fn prefill(&self, request: Prefill) -> BoxFuture<'static, Result<(), BackendError>> {
            self.prefills
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(request.prefix);
            async { Ok(()) }.boxed()
        }
    }

    fn prefill(prefix: &str) -> Prefill {
        Prefill {
            prefix: prefix.into(),
            ..Prefill::default()
        }
    }

    #[tokio::test]
    async fn only_a_rested_document_is_prefilled_and_closing_drops_it() {
        let backend = Arc::new(Recorder::default());
        let mut prefiller = Prefiller::default();
        let a = Url::parse("file:///a.rs").expect("url");
        let b = Url::parse("file:///b.rs").expect("url");
        prefiller.schedule(a.clone(), prefill("a1"), backend.clone());
        prefiller.schedule(a.clone(), prefill("a2"), backend.clone());
        prefiller.schedule(b.clone(), prefill("b1"), backend.clone());
        assert!(prefiller.is_active(&b));
        prefiller.stop(&b);
        assert!(!prefiller.is_active(&b));
        tokio::time::sleep(PREFILL_REST * 3).await;
        let sent = backend.prefills.lock().expect("lock").clone();
        assert_eq!(sent, vec!["a2".to_string()]);
        prefiller.stop_all();
    }
}
