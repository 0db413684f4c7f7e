//! The completion service: profile -> provider, prompt, cache, streaming post-processing and metrics.
//!
//! Transport-agnostic: the daemon feeds it requests and a [`TextSink`]; tests and benchmarks can do the same.

pub mod metrics;
pub mod registry;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapce_ai_transport::protocol::{
    ChatRequest, ChatRole as WireChatRole, CompletionRequest, ErrorCode, FinishReason, StatusReply,
    Usage,
};
use tokio_util::sync::CancellationToken;

use crate::completion::{self, CompletionCache, CompletionFilter, ContextBudget, PromptStyle};
use crate::config::{EngineConfig, ProfileConfig, ProviderKind};
use crate::provider::{
    ChatRole, ChatTurn, GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError,
    StopReason,
};
pub use metrics::Metrics;
pub use registry::{default_factory, ProviderFactory, ProviderRegistry};

/// Default generation limits when neither the request nor the profile sets one.
const DEFAULT_COMPLETION_TOKENS: u32 = 128;
const DEFAULT_CHAT_TOKENS: u32 = 1024;
const DEFAULT_COMPLETION_TEMPERATURE: f32 = 0.0;
const DEFAULT_CHAT_TEMPERATURE: f32 = 0.7;

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
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadRequest(_) => ErrorCode::BadRequest,
            Self::ClientGone(_) => ErrorCode::Cancelled,
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

/// The engine state shared by every connection.
pub struct Engine {
    config: EngineConfig,
    registry: ProviderRegistry,
    cache: Mutex<CompletionCache>,
    pub metrics: Metrics,
    started: Instant,
    endpoint: String,
}

fn is_chat_only(kind: ProviderKind) -> bool {
    matches!(
        kind,
        ProviderKind::OpenAiChat | ProviderKind::Anthropic | ProviderKind::Gemini
    )
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
            cache: Mutex::new(cache),
            metrics: Metrics::default(),
            started: Instant::now(),
            endpoint: endpoint.into(),
            config,
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    fn profile(&self, requested: &str, default: &str) -> Result<&ProfileConfig, EngineError> {
        let name = if requested.is_empty() {
            default
        } else {
            requested
        };
        self.config.profile(name).ok_or_else(|| {
            let known: Vec<&str> = self.config.profiles.keys().map(String::as_str).collect();
            EngineError::BadRequest(format!(
                "unknown profile {name:?} (configured: {})",
                known.join(", ")
            ))
        })
    }

    /// Builds providers that are cheap to build and starts loading the embedded model, so the first
    /// completion does not pay for it. Failures are logged; requests report them.
    pub fn warm_up(&self) {
        for name in [&self.config.completion_profile, &self.config.chat_profile] {
            if let Some(profile) = self.config.profile(name) {
                if let Err(e) = self.registry.get(profile) {
                    tracing::warn!(profile = %name, error = %e, "provider not ready");
                }
            }
        }
    }

    /// One fill-in-the-middle completion, streamed into `sink` as it is decided.
    pub async fn complete<S: TextSink>(
        &self,
        request: CompletionRequest,
        sink: &mut S,
        cancel: &CancellationToken,
    ) -> Result<Outcome, EngineError> {
        let started = Instant::now();
        Metrics::count(&self.metrics.requests);
        let profile = self.profile(&request.profile, &self.config.completion_profile)?;
        let provider = self.registry.get(profile)?;
        let style = match &profile.fim_template {
            Some(name) => {
                PromptStyle::from_name(name).map_err(|e| EngineError::BadRequest(e.to_string()))?
            }
            None => PromptStyle::detect(
                provider.model(),
                provider.supports_native_fim(),
                is_chat_only(profile.kind),
            ),
        };
        let max_tokens = limit(
            request.max_tokens,
            profile.max_tokens,
            DEFAULT_COMPLETION_TOKENS,
        );
        let temperature = profile
            .temperature
            .or(request.temperature)
            .unwrap_or(DEFAULT_COMPLETION_TEMPERATURE);
        let prepared = completion::prepare_completion(
            &request,
            style,
            ContextBudget::default(),
            max_tokens,
            temperature,
        );
        let trimmed = &prepared.context;
        let cache_model = format!("{}/{}", profile.name, provider.model());
        let cached = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(
            &cache_model,
            &trimmed.prefix,
            &trimmed.suffix,
        );
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
        let mut filter = CompletionFilter::new(prepared.filter_context);
        let generation = prepared.request;
        let mut shown = String::new();
        let outcome = self
            .run(
                provider.as_ref(),
                generation,
                sink,
                cancel,
                started,
                |delta| {
                    let step = match delta {
                        Some(text) => filter.push(text),
                        None => completion::FilterStep {
                            emit: filter.finish(),
                            done: true,
                        },
                    };
                    shown.push_str(&step.emit);
                    step
                },
            )
            .await;
        match &outcome {
            Ok(o) if o.finish_reason != FinishReason::Cancelled => {
                self.cache.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    &cache_model,
                    &trimmed.prefix,
                    &trimmed.suffix,
                    &shown,
                );
            }
            _ => {}
        }
        outcome
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
        let profile = self.profile(&request.profile, &self.config.chat_profile)?;
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
        let total = started.elapsed();
        match result {
            Ok(()) => {
                if finish_reason == FinishReason::Cancelled {
                    Metrics::count(&self.metrics.cancels);
                }
                if usage.completion_tokens == 0 {
                    usage.completion_tokens = generated_pieces;
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

    /// Engine statistics for `status`.
    pub fn status(&self, connections: u32) -> StatusReply {
        let latencies = self.metrics.latencies();
        let describe = |name: &str| {
            self.config
                .profile(name)
                .map(|p| (format!("{} ({})", p.kind, p.name), p.model.clone()))
                .unwrap_or_default()
        };
        let (completion_provider, completion_model) = describe(&self.config.completion_profile);
        let (chat_provider, chat_model) = describe(&self.config.chat_profile);
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
            // Filled in by the daemon, which tracks its clients.
            idle_exit_after_ms: 0,
            idle_exit_in_ms: u64::MAX,
        }
    }
}

/// The token limit: the request's (if set), capped by the profile's, else the default.
fn limit(requested: u32, profile_cap: Option<u32>, default: u32) -> u32 {
    let wanted = if requested == 0 { default } else { requested };
    profile_cap.map_or(wanted, |cap| wanted.min(cap))
}
