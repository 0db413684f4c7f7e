//! The embedded local model: llama.cpp (via llama-cpp-2) on one worker thread, streaming tokens with KV-cache reuse.
//!
//! The GGUF file is loaded once on a dedicated thread (at engine start), which owns the llama context and
//! serves requests by priority: completions, then chat, then prefill (see [`queue`]). Each document keeps
//! its own KV sequence (see [`kv`]), so a keystroke, a moved window or a return to another file re-decodes
//! only the tokens that changed.

mod kv;
mod queue;
mod text;
mod threads;
mod worker;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::{GenerationEvent, GenerationRequest, Provider, ProviderError};
use crate::models::{resolve_model, ModelEntry};

/// Settings of the embedded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddedOptions {
    /// Name shown in status output; defaults to the file name without `.gguf`.
    pub model_name: Option<String>,
    /// Context window in tokens (prompt + generation). Longer prompts keep their tail.
    pub context_tokens: u32,
    /// CPU threads for decoding; defaults to the number of physical cores this process may use.
    pub threads: Option<u32>,
    /// Maximum tokens decoded in one llama batch while reading a prompt.
    pub batch_tokens: u32,
    /// Sampling seed for temperature > 0; `None` picks a new seed per request.
    pub seed: Option<u32>,
    /// Documents whose KV cache is kept at once (one llama sequence each, least recently used evicted).
    pub documents: u32,
    /// Cached chunks of at least this many tokens that reappear further down a new prompt are shifted
    /// into place instead of decoded again (llama.cpp's `n_cache_reuse`); 0 disables shifting.
    pub cache_reuse_min_chunk: u32,
    /// Order of fill-in-the-middle prompts for models with FIM tokens.
    pub fim_layout: FimLayout,
    /// While another request waits, prompt batches are cut to take about this long, so a cancel or a
    /// more urgent request is served soon.
    pub preempt_after: Duration,
}

/// Where the suffix goes in a fill-in-the-middle prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FimLayout {
    /// Suffix first for model families trained on it (StarCoder, CodeLlama), prefix first otherwise.
    #[default]
    Auto,
    /// `<prefix>P<suffix>S<middle>`: what every FIM model understands; a keystroke re-decodes the suffix.
    PrefixSuffixMiddle,
    /// `<suffix>S<prefix>P<middle>`: the text that changes while typing comes last.
    SuffixPrefixMiddle,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            model_name: None,
            context_tokens: 2048,
            threads: None,
            batch_tokens: 512,
            seed: None,
            documents: 4,
            cache_reuse_min_chunk: 32,
            fim_layout: FimLayout::Auto,
            preempt_after: Duration::from_millis(40),
        }
    }
}

/// What one request cost, for status output and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestMetrics {
    /// Tokens in the prompt as decoded (after truncation to the context window).
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV-cache entries were reused from the previous request.
    pub reused_tokens: u32,
    /// Prompt tokens decoded for this request (not reused); fewer than `prompt_tokens - reused_tokens` when it
    /// was cancelled or preempted part way.
    pub decoded_tokens: u32,
    /// Prompt tokens dropped from the front to fit the context window.
    pub truncated_tokens: u32,
    /// Tokens sampled (including a final stop token that is not sent).
    pub generated_tokens: u32,
    /// Time spent waiting behind other requests.
    pub queue_wait: Duration,
    /// Time spent decoding the new part of the prompt.
    pub prompt_eval: Duration,
    /// Time from submission to the first sampled token.
    pub ttft: Option<Duration>,
    /// Time from submission to the end.
    pub total: Duration,
    /// The client went away before the request finished (or started).
    pub cancelled: bool,
}

/// Facts about the loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    pub path: PathBuf,
    pub n_ctx_train: u32,
    pub n_vocab: i32,
    pub n_params: u64,
    /// The model has fill-in-the-middle tokens (prefix/suffix/middle).
    pub has_fim: bool,
    /// Effective context window of each document's sequence.
    pub context_tokens: u32,
    pub threads: u32,
    /// Documents whose KV cache is kept at once.
    pub documents: u32,
    /// The ggml CPU code in use (its SIMD level), e.g. `CPU (AVX2 FMA F16C)`.
    pub cpu_backend: String,
    /// GPU backends compiled in and found (empty = CPU only).
    pub gpu_backend: String,
}

#[derive(Debug, Clone, PartialEq)]
enum LoadState {
    Loading,
    Ready(ModelInfo),
    Failed(ProviderError),
}

type EventSender = mpsc::UnboundedSender<Result<GenerationEvent, ProviderError>>;

struct Job {
    id: u64,
    request: GenerationRequest,
    events: EventSender,
    metrics: Option<oneshot::Sender<RequestMetrics>>,
    submitted: Instant,
}

/// Prefills kept queued at once; an older one is dropped for a newer (the user moved on).
const QUEUED_PREFILLS: usize = 2;

struct Shared {
    has_fim: AtomicBool,
    last_metrics: Mutex<Option<RequestMetrics>>,
    model: OnceLock<Arc<llama_cpp_2::model::LlamaModel>>,
    jobs: queue::JobQueue<Job>,
}

/// A [`Provider`] running a GGUF model in-process with llama.cpp.
pub struct EmbeddedProvider {
    name: String,
    load: watch::Receiver<LoadState>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
}

impl Drop for EmbeddedProvider {
    fn drop(&mut self) {
        // The worker finishes what is queued, then exits and frees the model.
        self.shared.jobs.close();
    }
}

impl std::fmt::Debug for EmbeddedProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedProvider")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl EmbeddedProvider {
    /// Starts the worker thread, which loads the model at `path` in the background. Never fails:
    /// if loading fails, every request (and [`Self::wait_loaded`]) gets
    /// [`ProviderError::ModelLoad`] (or [`ProviderError::ModelMissing`] when there is no file).
    pub fn new(path: impl Into<PathBuf>, options: EmbeddedOptions) -> Self {
        let path = path.into();
        let name = options.model_name.clone().unwrap_or_else(|| {
            path.file_name()
                .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
                .unwrap_or_else(|| "embedded".to_string())
        });
        Self::start(name, Ok(path), options)
    }

    /// Resolves the file of the catalog `entry` (configured path, `LAPCE_AI_MODEL`, model cache)
    /// and starts the provider. A missing file makes every request fail with
    /// [`ProviderError::ModelMissing`] telling the user to run `ai-engine models pull`.
    pub fn from_catalog(
        entry: &ModelEntry,
        configured: Option<&Path>,
        options: EmbeddedOptions,
    ) -> Self {
        let name = options
            .model_name
            .clone()
            .unwrap_or_else(|| entry.name.to_string());
        let path = resolve_model(configured, entry)
            .map(|r| r.path)
            .map_err(ProviderError::from);
        Self::start(name, path, options)
    }

    fn start(name: String, path: Result<PathBuf, ProviderError>, options: EmbeddedOptions) -> Self {
        let (load_tx, load_rx) = watch::channel(LoadState::Loading);
        let shared = Arc::new(Shared {
            has_fim: AtomicBool::new(false),
            last_metrics: Mutex::new(None),
            model: OnceLock::new(),
            jobs: queue::JobQueue::new(),
        });
        let worker_shared = Arc::clone(&shared);
        let worker_name = name.clone();
        let spawned = std::thread::Builder::new()
            .name("ai-engine-llama".to_string())
            .spawn(move || worker::run(path, worker_name, options, load_tx, worker_shared));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the embedded model thread");
            shared.jobs.close();
        }
        Self {
            name,
            load: load_rx,
            shared,
            next_id: AtomicU64::new(1),
        }
    }

    /// The load state right now: `None` while loading, else the model or why it failed.
    pub fn load_state(&self) -> Option<Result<ModelInfo, ProviderError>> {
        match &*self.load.borrow() {
            LoadState::Loading => None,
            LoadState::Ready(info) => Some(Ok(info.clone())),
            LoadState::Failed(e) => Some(Err(e.clone())),
        }
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn wait_loaded(&self) -> Result<ModelInfo, ProviderError> {
        let mut rx = self.load.clone();
        let state = rx
            .wait_for(|s| !matches!(s, LoadState::Loading))
            .await
            .map(|s| (*s).clone());
        match state {
            Ok(LoadState::Ready(info)) => Ok(info),
            Ok(LoadState::Failed(e)) => Err(e),
            Ok(LoadState::Loading) | Err(_) => Err(worker_gone()),
        }
    }

    /// Metrics of the most recently finished request.
    pub fn last_metrics(&self) -> Option<RequestMetrics> {
        self.shared
            .last_metrics
            .lock()
            .map(|m| *m)
            .unwrap_or_default()
    }

    /// Number of tokens `text` has for this model (without BOS), once the model is loaded.
    /// Useful to budget prompts; safe to call from any thread while the worker decodes.
    pub fn count_tokens(&self, text: &str) -> Option<usize> {
        let model = self.shared.model.get()?;
        Some(model.vocab().tokenize(text.as_bytes(), false, false).len())
    }

    /// Like [`Provider::generate`], plus a receiver for the request's [`RequestMetrics`],
    /// delivered when the request ends (also when it is cancelled).
    pub fn generate_with_metrics(
        &self,
        request: GenerationRequest,
    ) -> (
        BoxStream<'static, Result<GenerationEvent, ProviderError>>,
        oneshot::Receiver<RequestMetrics>,
    ) {
        let (metrics_tx, metrics_rx) = oneshot::channel();
        (self.submit(request, Some(metrics_tx)), metrics_rx)
    }

    /// Evaluates `request`'s prompt into its document's KV sequence at the lowest priority, without
    /// generating, so the next completion there only decodes what changed. Dropping the stream cancels it;
    /// any completion or chat request preempts it; a newer prefill replaces older queued ones.
    pub fn prefill_with_metrics(
        &self,
        request: GenerationRequest,
    ) -> (
        BoxStream<'static, Result<GenerationEvent, ProviderError>>,
        oneshot::Receiver<RequestMetrics>,
    ) {
        let (metrics_tx, metrics_rx) = oneshot::channel();
        (
            self.enqueue(queue::Priority::Prefill, request, Some(metrics_tx)),
            metrics_rx,
        )
    }

    fn submit(
        &self,
        request: GenerationRequest,
        metrics: Option<oneshot::Sender<RequestMetrics>>,
    ) -> BoxStream<'static, Result<GenerationEvent, ProviderError>> {
        let priority = match request.prompt {
            super::Prompt::Chat { .. } => queue::Priority::Chat,
            _ => queue::Priority::Completion,
        };
        self.enqueue(priority, request, metrics)
    }

    fn enqueue(
        &self,
        priority: queue::Priority,
        request: GenerationRequest,
        metrics: Option<oneshot::Sender<RequestMetrics>>,
    ) -> BoxStream<'static, Result<GenerationEvent, ProviderError>> {
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let job = Job {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            request,
            events: events_tx,
            metrics,
            submitted: Instant::now(),
        };
        if priority == queue::Priority::Prefill {
            // Keep the newest `QUEUED_PREFILLS - 1` queued prefills (plus this one); drop cancelled ones.
            let mut older = 0;
            self.shared.jobs.remove_where(|p, _| {
                older += usize::from(p == queue::Priority::Prefill);
                false
            });
            let mut seen = 0;
            let dropped = self.shared.jobs.remove_where(|p, queued| {
                if p != queue::Priority::Prefill {
                    return false;
                }
                seen += 1;
                queued.events.is_closed() || seen + QUEUED_PREFILLS - 1 <= older
            });
            if !dropped.is_empty() {
                tracing::debug!(
                    dropped = dropped.len(),
                    "older prefills dropped for a newer one"
                );
            }
        }
        if let Err(job) = self.shared.jobs.push(priority, job) {
            // The worker thread is gone; report why if it said so.
            let error = match &*self.load.borrow() {
                LoadState::Failed(e) => e.clone(),
                _ => worker_gone(),
            };
            let _ = job.events.send(Err(error));
        }
        futures::stream::poll_fn(move |cx| events_rx.poll_recv(cx)).boxed()
    }
}

fn worker_gone() -> ProviderError {
    ProviderError::ModelLoad("the embedded model thread stopped".to_string())
}

impl Provider for EmbeddedProvider {
    fn kind(&self) -> &str {
        "embedded"
    }

    fn model(&self) -> &str {
        &self.name
    }

    /// True once a model with fill-in-the-middle tokens is loaded. Without them a
    /// [`super::Prompt::FillInTheMiddle`] request is completed from the prefix alone.
    fn supports_native_fim(&self) -> bool {
        self.shared.has_fim.load(Ordering::Relaxed)
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxStream<'static, Result<GenerationEvent, ProviderError>> {
        self.submit(request, None)
    }

    fn prefill(
        &self,
        request: GenerationRequest,
    ) -> Option<BoxStream<'static, Result<GenerationEvent, ProviderError>>> {
        Some(self.enqueue(queue::Priority::Prefill, request, None))
    }

    fn describe(&self) -> Option<super::ProviderDetails> {
        let state = match self.load_state() {
            None => "loading".to_string(),
            Some(Ok(info)) => format!(
                "ready: {} ({} threads, {} documents x {} tokens)",
                info.path.display(),
                info.threads,
                info.documents,
                info.context_tokens
            ),
            Some(Err(e)) => format!("failed: {e}"),
        };
        let info = self.load_state().and_then(Result::ok);
        Some(super::ProviderDetails {
            state,
            cpu_backend: info
                .as_ref()
                .map(|i| i.cpu_backend.clone())
                .unwrap_or_default(),
            gpu_backend: info.map(|i| i.gpu_backend).unwrap_or_default(),
        })
    }
}
