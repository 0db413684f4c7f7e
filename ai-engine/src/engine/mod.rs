//! The completion service: profile -> provider, prompt, cache, streaming post-processing and metrics.
//!
//! Transport-agnostic: the daemon feeds it requests and a [`TextSink`]; tests and benchmarks can do the same.

pub mod metrics;
pub mod registry;

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapce_ai_transport::protocol::{
    ChatRequest, ChatRole as WireChatRole, CompletionRequest, ErrorCode, FinishReason, Prefill,
    StatusReply, Usage,
};
use tokio_util::sync::CancellationToken;

use crate::completion::inflight::{
    GenerationOrigin, GenerationState, InflightGenerations, Subscription,
};
use crate::completion::{
    self, CacheScope, CompletionCache, CompletionFilter, ContextBudget, RelatedContext,
    SnippetPlacement, WorkspaceLimits, WorkspaceStore,
};
use crate::config::{EngineConfig, ProfileConfig};
use crate::provider::{
    ChatRole, ChatTurn, GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError,
    StopReason,
};
use lapce_ai_transport::util::lock;
pub use metrics::Metrics;
pub use registry::{default_factory, ProviderFactory, ProviderRegistry};

/// Default generation limits when neither the request nor the profile sets one.
const DEFAULT_COMPLETION_TOKENS: u32 = 128;
const DEFAULT_CHAT_TOKENS: u32 = 1024;
const DEFAULT_COMPLETION_TEMPERATURE: f32 = 0.0;
const DEFAULT_CHAT_TEMPERATURE: f32 = 0.7;
/// Provider kind whose API takes other files as separate chunks (llama.cpp `/infill` `input_extra`).
const EXTRA_CONTEXT_PROVIDER_KIND: &str = "llama-cpp";

/// Where generated text goes (a transport stream, stdout, a test vector).
pub trait TextSink: Send {
    /// Delivers the next piece of decided text. An error means the receiver is gone.
    fn send(&mut self, text: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// How a request ended (when it did not fail).
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub time_to_first_token: Option<Duration>,
    pub total: Duration,
}

/// Why a request failed; each maps to a wire error code and a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("the client went away: {0}")]
    ClientGone(String),
    /// The configuration file could not be used and no earlier version of it was loaded.
    #[error("engine configuration: {0}")]
    Config(String),
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::ClientGone(_) => ErrorCode::Cancelled,
            Self::Config(_) => ErrorCode::Config,
            Self::Provider(e) => match e {
                ProviderError::Auth(_) => ErrorCode::ProviderAuth,
                ProviderError::Forbidden(_) => ErrorCode::ProviderForbidden,
                ProviderError::NotFound(_) => ErrorCode::ProviderNotFound,
                ProviderError::RateLimited { .. } => ErrorCode::ProviderRateLimited,
                ProviderError::Server(_) => ErrorCode::ProviderServer,
                ProviderError::Unreachable(_) => ErrorCode::ProviderUnreachable,
                ProviderError::Protocol(_) => ErrorCode::ProviderProtocol,
                ProviderError::ModelMissing(_) => ErrorCode::ModelMissing,
                ProviderError::ModelLoad(_) => ErrorCode::ModelLoad,
                ProviderError::BadRequest(_) => ErrorCode::BadRequest,
            },
        }
    }
}

/// The configuration in effect and what became of the last attempt to (re)load it.
struct ConfigState {
    config: Arc<EngineConfig>,
    /// Why the file could not be used last time it was read (names the file and line); `None` when it was.
    error: Option<String>,
    /// A usable configuration was loaded at some point (the file's, or the defaults when it is absent).
    loaded: bool,
}

/// The engine state shared by every connection.
pub struct Engine {
    config: RwLock<ConfigState>,
    registry: ProviderRegistry,
    cache: Arc<Mutex<CompletionCache>>,
    /// Completion generations a request that types through their text may adopt.
    inflight: Arc<InflightGenerations>,
    pub metrics: Metrics,
    started: Instant,
    endpoint: String,
}

impl Engine {
    pub fn new(
        config: EngineConfig,
        factory: ProviderFactory,
        endpoint: impl Into<String>,
    ) -> Arc<Self> {
        let cache = CompletionCache::new(completion::CacheConfig {
            max_entries: config.cache.entries,
            time_to_live: config.cache.ttl,
        });
        Arc::new(Self {
            registry: ProviderRegistry::new(factory),
            cache: Arc::new(Mutex::new(cache)),
            inflight: Arc::default(),
            metrics: Metrics::default(),
            started: Instant::now(),
            endpoint: endpoint.into(),
            config: RwLock::new(ConfigState {
                config: Arc::new(config),
                error: None,
                loaded: true,
            }),
        })
    }

    fn config_state(&self) -> std::sync::RwLockReadGuard<'_, ConfigState> {
        self.config.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration in effect now (a snapshot: a reload does not change it under a running request).
    pub fn config(&self) -> Arc<EngineConfig> {
        Arc::clone(&self.config_state().config)
    }

    /// Why the configuration file could not be used when last read, or `None`.
    pub fn config_error(&self) -> Option<String> {
        self.config_state().error.clone()
    }

    /// Applies a reloaded configuration to the next requests. Start-time settings (`[cache]`,
    /// `idle_exit_minutes`) keep the values the daemon started with; providers of changed profiles are
    /// rebuilt on their next use and cached completions are dropped. Returns whether anything changed.
    pub fn apply_config(&self, mut config: EngineConfig) -> bool {
        let mut state = self.config.write().unwrap_or_else(|p| p.into_inner());
        config.cache = state.config.cache;
        config.idle_exit = state.config.idle_exit;
        let changed = *state.config != config;
        state.config = Arc::new(config);
        state.error = None;
        state.loaded = true;
        drop(state);
        if changed {
            let settings = self.config().cache;
            let mut cache = lock(&self.cache);
            *cache = CompletionCache::new(completion::CacheConfig {
                max_entries: settings.entries,
                time_to_live: settings.ttl,
            });
        }
        changed
    }

    /// Records that the configuration file could not be used. The configuration in effect stays; when
    /// `loaded` is false there never was a usable one, and requests fail with this error until the file is
    /// fixed.
    pub fn config_failed(&self, error: String, loaded: bool) {
        let mut state = self.config.write().unwrap_or_else(|p| p.into_inner());
        state.error = Some(error);
        state.loaded = state.loaded && loaded;
    }

    /// The configuration for a request: an error when the file is broken and nothing usable was loaded.
    fn request_config(&self) -> Result<Arc<EngineConfig>, EngineError> {
        let state = self.config_state();
        match (&state.error, state.loaded) {
            (Some(error), false) => Err(EngineError::Config(error.clone())),
            _ => Ok(Arc::clone(&state.config)),
        }
    }

    fn profile<'c>(
        config: &'c EngineConfig,
        requested: &str,
        default: &str,
    ) -> Result<&'c ProfileConfig, EngineError> {
        let name = if requested.is_empty() {
            default
        } else {
            requested
        };
        config.profile(name).ok_or_else(|| {
            let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
            EngineError::BadRequest(format!(
                "unknown profile {name:?} (configured: {})",
                known.join(", ")
            ))
        })
    }

    /// Builds providers that are cheap to build and starts loading the embedded model, so the first
    /// completion does not pay for it. Failures are logged; requests report them.
    pub fn warm_up(&self) {
        let config = self.config();
        for name in [&config.completion_profile, &config.chat_profile] {
            if let Some(profile) = config.profile(name) {
                if let Err(e) = self.registry.get(profile) {
                    tracing::warn!(profile = %name, error = %e, "provider not ready");
                }
            }
        }
    }

    /// An empty store for one client's open documents, bounded by `[context]`.
    pub fn new_workspace(&self) -> WorkspaceStore {
        let config = self.config();
        WorkspaceStore::new(WorkspaceLimits {
            max_documents: config.context.max_documents,
            max_document_bytes: config.context.max_document_bytes,
            ..WorkspaceLimits::default()
        })
    }

    /// One fill-in-the-middle completion, streamed into `sink` as it is decided.
    pub async fn complete<S: TextSink>(
        &self,
        request: CompletionRequest,
        sink: &mut S,
        cancel: &CancellationToken,
    ) -> Result<Outcome, EngineError> {
        self.complete_in(request, None, sink, cancel).await
    }

    /// [`Engine::complete`] with snippets of the client's other open documents from `workspace`.
    pub async fn complete_in<S: TextSink>(
        &self,
        request: CompletionRequest,
        workspace: Option<&Mutex<WorkspaceStore>>,
        sink: &mut S,
        cancel: &CancellationToken,
    ) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        Metrics::count(&self.metrics.requests);
        let config = self.request_config()?;
        let profile = Self::profile(&config, &request.profile, &config.completion_profile)?;
        let provider = self.registry.get(profile)?;
        let plan = profile.prompt_plan(provider.model(), provider.supports_native_fim());
        let max_tokens = limit(
            request.max_tokens,
            profile.max_tokens,
            DEFAULT_COMPLETION_TOKENS,
        );
        let temperature = profile
            .temperature
            .or(request.temperature)
            .unwrap_or(DEFAULT_COMPLETION_TEMPERATURE);
        let extra_tokens = config.context.effective_extra_tokens();
        let mut prepared = match workspace.filter(|_| extra_tokens > 0) {
            Some(workspace) => {
                let store = lock(workspace);
                let placement = if provider.kind() == EXTRA_CONTEXT_PROVIDER_KIND {
                    SnippetPlacement::ExtraContext
                } else {
                    SnippetPlacement::Prompt
                };
                completion::prepare_completion_with(
                    &request,
                    plan.style.clone(),
                    ContextBudget::default(),
                    max_tokens,
                    temperature,
                    Some(RelatedContext {
                        store: &store,
                        extra_tokens,
                        placement,
                    }),
                )
            }
            None => completion::prepare_completion(
                &request,
                plan.style.clone(),
                ContextBudget::default(),
                max_tokens,
                temperature,
            ),
        };
        plan.attach_fallback(&mut prepared);
        let trimmed = &prepared.context;
        let scope = CacheScope::new(
            format!("{}/{}", profile.name, provider.model()),
            request.mode,
            request.max_lines,
        );
        let cached = lock(&self.cache).get(&scope, &trimmed.prefix, &trimmed.suffix);
        if let Some(text) = cached {
            Metrics::count(&self.metrics.cache_hits);
            if !text.is_empty() {
                sink.send(&text).await.map_err(EngineError::ClientGone)?;
            }
            let total = started.elapsed();
            self.metrics.record_latency(Some(total), total);
            return Ok(Outcome {
                finish_reason: FinishReason::Cached,
                usage: Usage::default(),
                time_to_first_token: Some(total),
                total,
            });
        }
        let origin = GenerationOrigin {
            scope: scope.clone(),
            file_path: request.file_path.clone(),
            language_id: request.language_id.clone(),
            prefix: request.prefix.clone(),
            suffix: request.suffix.clone(),
        };
        if let Some(subscription) = self.inflight.adopt(&origin) {
            Metrics::count(&self.metrics.reused_generations);
            return self.follow(subscription, true, sink, cancel, started).await;
        }
        let filter = CompletionFilter::new(prepared.filter_context);
        let stream = provider.generate(prepared.request);
        let cache = Arc::clone(&self.cache);
        let (cache_prefix, cache_suffix) = (trimmed.prefix.clone(), trimmed.suffix.clone());
        let subscription = self
            .inflight
            .start(origin, stream, filter, move |completion| {
                lock(&cache).insert(&scope, &cache_prefix, &cache_suffix, completion);
            });
        self.follow(subscription, false, sink, cancel, started)
            .await
    }

    /// Streams a completion generation's decided text into `sink` until it ends or `cancel` fires (the
    /// generation itself may outlive this request: see [`completion::inflight`]). A request that adopted
    /// another request's generation (`reused`) reports no token usage of its own.
    async fn follow<S: TextSink>(
        &self,
        mut subscription: Subscription,
        reused: bool,
        sink: &mut S,
        cancel: &CancellationToken,
        started: Instant,
    ) -> Result<Outcome, EngineError> {
        let mut time_to_first_token = None;
        let result = loop {
            let (text, state) = subscription.take_new();
            if !text.is_empty() {
                time_to_first_token.get_or_insert_with(|| started.elapsed());
                if let Err(gone) = sink.send(&text).await {
                    break Err(EngineError::ClientGone(gone));
                }
            }
            match state {
                GenerationState::Running => {}
                GenerationState::Finished {
                    finish_reason,
                    usage,
                } => break Ok((finish_reason, if reused { Usage::default() } else { usage })),
                GenerationState::Failed(error) => break Err(EngineError::Provider(error)),
                GenerationState::Cancelled => {
                    break Ok((FinishReason::Cancelled, Usage::default()))
                }
            }
            tokio::select! {
                biased;
                () = cancel.cancelled() => break Ok((FinishReason::Cancelled, Usage::default())),
                () = subscription.changed() => {}
            }
        };
        drop(subscription);
        self.settle(result, time_to_first_token, started.elapsed())
    }

    /// Counts how a request ended (cancel, error, latency) and turns it into its [`Outcome`].
    fn settle(
        &self,
        result: Result<(FinishReason, Usage), EngineError>,
        time_to_first_token: Option<Duration>,
        total: Duration,
    ) -> Result<Outcome, EngineError> {
        match result {
            Ok((finish_reason, usage)) => {
                if finish_reason == FinishReason::Cancelled {
                    Metrics::count(&self.metrics.cancels);
                }
                self.metrics.record_latency(time_to_first_token, total);
                Ok(Outcome {
                    finish_reason,
                    usage,
                    time_to_first_token,
                    total,
                })
            }
            Err(e) => {
                Metrics::count(&self.metrics.errors);
                Err(e)
            }
        }
    }

    /// Warms the completion provider's cache for a document (the `Prefill` message): the prompt a completion at
    /// this cursor would use is evaluated at low priority. Returns when the provider is done, or at once when
    /// it has no use for a prefill (remote providers); cancelling `cancel` drops it. Nothing is generated.
    pub async fn prefill(
        &self,
        request: Prefill,
        cancel: &CancellationToken,
    ) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        let cancelled = self.prefill_until_done(request, cancel).await?;
        Ok(Outcome {
            finish_reason: if cancelled {
                FinishReason::Cancelled
            } else {
                FinishReason::Stop
            },
            usage: Usage::default(),
            time_to_first_token: None,
            total: started.elapsed(),
        })
    }

    /// [`Self::prefill`]'s work; true when it was cancelled.
    async fn prefill_until_done(
        &self,
        request: Prefill,
        cancel: &CancellationToken,
    ) -> Result<bool, EngineError> {
        let request = CompletionRequest {
            profile: request.profile,
            language_id: request.language_id,
            file_path: request.file_path,
            prefix: request.prefix,
            suffix: request.suffix,
            ..CompletionRequest::default()
        };
        let config = self.request_config()?;
        let profile = Self::profile(&config, &request.profile, &config.completion_profile)?;
        let provider = self.registry.get(profile)?;
        let plan = profile.prompt_plan(provider.model(), provider.supports_native_fim());
        let max_tokens = limit(0, profile.max_tokens, DEFAULT_COMPLETION_TOKENS);
        let prepared = completion::prepare_completion(
            &request,
            plan.style.clone(),
            ContextBudget::default(),
            max_tokens,
            DEFAULT_COMPLETION_TEMPERATURE,
        );
        let Some(mut stream) = provider.prefill(prepared.request) else {
            return Ok(false);
        };
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Ok(true),
                item = stream.next() => match item {
                    None | Some(Ok(GenerationEvent::Finished { .. })) => return Ok(false),
                    Some(Ok(GenerationEvent::Text(_))) => {}
                    Some(Err(e)) => return Err(EngineError::Provider(e)),
                },
            }
        }
    }

    /// One chat answer, streamed into `sink`.
    pub async fn chat<S: TextSink>(
        &self,
        request: ChatRequest,
        sink: &mut S,
        cancel: &CancellationToken,
    ) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        Metrics::count(&self.metrics.requests);
        if request.messages.is_empty() {
            return Err(EngineError::BadRequest(
                "a chat request needs at least one message".into(),
            ));
        }
        let config = self.request_config()?;
        let profile = Self::profile(&config, &request.profile, &config.chat_profile)?;
        let provider = self.registry.get(profile)?;
        let messages: Vec<ChatTurn> = request
            .messages
            .iter()
            .map(|m| ChatTurn {
                role: match m.role {
                    WireChatRole::User => ChatRole::User,
                    WireChatRole::Assistant => ChatRole::Assistant,
                },
                content: m.content.clone(),
            })
            .collect();
        let generation = GenerationRequest {
            prompt: Prompt::Chat {
                system: Some(request.system.clone()).filter(|s| !s.is_empty()),
                messages,
            },
            max_tokens: limit(request.max_tokens, profile.max_tokens, DEFAULT_CHAT_TOKENS),
            temperature: profile
                .temperature
                .or(request.temperature)
                .unwrap_or(DEFAULT_CHAT_TEMPERATURE),
            stop: Vec::new(),
            extra_context: Vec::new(),
            completion: None,
        };
        self.run(
            provider.as_ref(),
            generation,
            sink,
            cancel,
            started,
            |delta| completion::FilterStep {
                emit: delta.unwrap_or_default().to_owned(),
                done: delta.is_none(),
            },
        )
        .await
    }

    /// Drives a provider stream through `decide` (which turns raw deltas into shown text and says when to
    /// stop; `None` = the provider finished) into `sink`, honouring cancellation.
    async fn run<S: TextSink>(
        &self,
        provider: &dyn Provider,
        generation: GenerationRequest,
        sink: &mut S,
        cancel: &CancellationToken,
        started: Instant,
        mut decide: impl FnMut(Option<&str>) -> completion::FilterStep,
    ) -> Result<Outcome, EngineError> {
        let mut stream = provider.generate(generation);
        let mut time_to_first_token = None;
        let mut usage = Usage::default();
        let mut finish_reason = FinishReason::Stop;
        let mut generated_pieces = 0u32;
        let result: Result<(), EngineError> = async {
            loop {
                let item = tokio::select! {
                    biased;
                    () = cancel.cancelled() => {
                        finish_reason = FinishReason::Cancelled;
                        return Ok(());
                    }
                    item = stream.next() => item,
                };
                let (step, finished) = match item {
                    Some(Ok(GenerationEvent::Text(text))) => {
                        generated_pieces += 1;
                        (decide(Some(&text)), false)
                    }
                    Some(Ok(GenerationEvent::Finished {
                        reason,
                        usage: provider_usage,
                    })) => {
                        usage = Usage {
                            prompt_tokens: provider_usage.prompt_tokens,
                            completion_tokens: provider_usage.completion_tokens,
                        };
                        if reason == StopReason::Length {
                            finish_reason = FinishReason::Length;
                        }
                        (decide(None), true)
                    }
                    Some(Err(e)) => return Err(EngineError::Provider(e)),
                    None => (decide(None), true),
                };
                if !step.emit.is_empty() {
                    if time_to_first_token.is_none() {
                        time_to_first_token = Some(started.elapsed());
                    }
                    sink.send(&step.emit)
                        .await
                        .map_err(EngineError::ClientGone)?;
                }
                if finished {
                    return Ok(());
                }
                if step.done {
                    // Post-processing decided the answer: stop generating (dropping the stream cancels it).
                    finish_reason = FinishReason::Truncated;
                    return Ok(());
                }
            }
        }
        .await;
        drop(stream);
        if usage.completion_tokens == 0 {
            usage.completion_tokens = generated_pieces;
        }
        let result = result.map(|()| (finish_reason, usage));
        self.settle(result, time_to_first_token, started.elapsed())
    }

    /// Engine statistics for `status`.
    pub fn status(&self, connections: u32) -> StatusReply {
        let latencies = self.metrics.latencies();
        let config = self.config();
        let describe = |name: &str| {
            config
                .profile(name)
                .map(|p| (format!("{} ({})", p.kind, p.name), p.model.clone()))
                .unwrap_or_default()
        };
        let (completion_provider, completion_model) = describe(&config.completion_profile);
        let details = self
            .registry
            .peek(&config.completion_profile)
            .and_then(|p| p.describe().map(|d| (d, p.model().to_owned())));
        let (details, model_note) = match details {
            Some((d, model)) => {
                let note = crate::models::catalog::model_note(&model).unwrap_or_default();
                (d, note)
            }
            None => Default::default(),
        };
        let (chat_provider, chat_model) = describe(&config.chat_profile);
        use std::sync::atomic::Ordering::Relaxed;
        StatusReply {
            endpoint: self.endpoint.clone(),
            engine_pid: std::process::id(),
            engine_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            completion_provider,
            completion_model,
            chat_provider,
            chat_model,
            connections,
            requests: self.metrics.requests.load(Relaxed),
            cancels: self.metrics.cancels.load(Relaxed),
            errors: self.metrics.errors.load(Relaxed),
            cache_hits: self.metrics.cache_hits.load(Relaxed),
            time_to_first_token_p50_us: latencies.time_to_first_token_p50_us,
            time_to_first_token_p95_us: latencies.time_to_first_token_p95_us,
            total_p50_us: latencies.total_p50_us,
            total_p95_us: latencies.total_p95_us,
            model_state: details.state,
            cpu_backend: details.cpu_backend,
            gpu_backend: details.gpu_backend,
            model_note,
            // Filled in by the daemon, which tracks its clients.
            idle_exit_after_ms: 0,
            idle_exit_in_ms: u64::MAX,
            config_error: self.config_error().unwrap_or_default(),
        }
    }
}

/// The token limit: the request's (if set), capped by the profile's, else the default.
fn limit(requested: u32, profile_cap: Option<u32>, default: u32) -> u32 {
    let wanted = if requested == 0 { default } else { requested };
    profile_cap.map_or(wanted, |cap| wanted.min(cap))
}
