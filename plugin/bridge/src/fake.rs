//! In-process fake engine for tests and demos, selected with `--fake-engine` / `LAPCE_AI_FAKE_ENGINE`.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{stream, FutureExt, StreamExt};
use serde_json::json;

use crate::backend::{
    BackendError, BackendErrorKind, CompletionBackend, CompletionMode, CompletionRequest,
    CompletionStream,
};

/// What the fake answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FakeMode {
    /// One chunk: a JSON object describing the request (cursor line around the cursor, settings).
    Echo,
    /// 20 lines, one chunk each.
    Lines,
    /// 10 chunks, 300 ms apart.
    Slow,
    /// Fails with "no model".
    ModelMissing,
}

/// Counters the tests read back (written as JSON to the stats file after every change).
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    completed: AtomicU64,
    dropped: AtomicU64,
}

/// The fake backend.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    mode: FakeMode,
    stats: Arc<Stats>,
    stats_file: Option<PathBuf>,
}

impl FakeBackend {
    pub fn new(mode: FakeMode, stats_file: Option<PathBuf>) -> Self {
        let fake = Self {
            mode,
            stats: Arc::default(),
            stats_file,
        };
        fake.report();
        fake
    }

    fn report(&self) {
        let Some(path) = &self.stats_file else {
            return;
        };
        let body = json!({
            "requests": self.stats.requests.load(Ordering::SeqCst),
            "completed": self.stats.completed.load(Ordering::SeqCst),
            "dropped": self.stats.dropped.load(Ordering::SeqCst),
        })
        .to_string();
        let tmp = path.with_extension("tmp");
        if let Err(err) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!(%err, path = %path.display(), "cannot write fake engine stats");
        }
    }
}

/// Marks a stream completed or dropped (cancelled) exactly once.
struct Guard {
    fake: FakeBackend,
    done: bool,
}

impl Guard {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.fake.stats.completed.fetch_add(1, Ordering::SeqCst);
            self.fake.report();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.done {
            self.fake.stats.dropped.fetch_add(1, Ordering::SeqCst);
            self.fake.report();
        }
    }
}

fn echo(req: &CompletionRequest) -> String {
    let prefix_line = req.prefix.rsplit('\n').next().unwrap_or_default();
    let suffix_line = req.suffix.split('\n').next().unwrap_or_default();
    let mode = match req.mode {
        CompletionMode::Auto => "auto",
        CompletionMode::SingleLine => "single",
        CompletionMode::MultiLine => "multi",
    };
    json!({
        "prefix_line": prefix_line,
        "suffix_line": suffix_line,
        "language_id": req.language_id,
        "file_path": req.file_path,
        "profile": req.profile,
        "mode": mode,
        "max_lines": req.max_lines,
    })
    .to_string()
}

impl CompletionBackend for FakeBackend {
    fn complete(
        &self,
        request: CompletionRequest,
    ) -> futures::future::BoxFuture<'static, Result<CompletionStream, BackendError>> {
        self.stats.requests.fetch_add(1, Ordering::SeqCst);
        self.report();
        let guard = Guard {
            fake: self.clone(),
            done: false,
        };
        let mode = self.mode;
        async move {
            let (chunks, gap): (Vec<String>, Duration) = match mode {
                FakeMode::Echo => (vec![echo(&request)], Duration::ZERO),
                FakeMode::Lines => (
                    (1..=20).map(|i| format!("line {i}\n")).collect(),
                    Duration::ZERO,
                ),
                FakeMode::Slow => (
                    (1..=10).map(|i| format!("s{i} ")).collect(),
                    Duration::from_millis(300),
                ),
                FakeMode::ModelMissing => {
                    let mut guard = guard;
                    guard.finish();
                    return Err(BackendError::new(
                        BackendErrorKind::ModelMissing,
                        "no model: run `ai-engine models pull`",
                    ));
                }
            };
            let items = stream::iter(chunks.into_iter().map(Some).chain([None]));
            let s = stream::unfold((items, guard), move |(mut items, mut guard)| async move {
                match items.next().await {
                    Some(Some(chunk)) => {
                        if !gap.is_zero() {
                            tokio::time::sleep(gap).await;
                        }
                        Some((Ok(chunk), (items, guard)))
                    }
                    _ => {
                        guard.finish();
                        None
                    }
                }
            });
            Ok(s.boxed())
        }
        .boxed()
    }
}
