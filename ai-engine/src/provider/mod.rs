//! The provider interface every model backend implements: a cancellable stream of generated text.

pub mod anthropic;
#[cfg(feature = "embedded")]
pub mod embedded;
pub mod fim;
pub mod gemini;
pub mod http;
pub mod llama_cpp;
pub mod mistral;
pub mod ollama;
pub mod openai;
pub mod openai_wire;

use std::sync::Arc;

use futures::stream::BoxStream;

use crate::config::{ConfigError, ProfileConfig, ProviderKind};

/// What to generate. Prompt building (templates, budgets) happens before a provider sees this.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A finished raw prompt (e.g. a FIM template already applied, or plain prefix completion).
    Raw(String),
    /// Provider-native fill-in-the-middle (`suffix` field, `/v1/fim/completions`, ...).
    FillInTheMiddle {
        prefix: String,
        suffix: String,
        /// Where a provider that lays out a prefix-first prompt itself may start the middle with the rest of
        /// the prefix, so typing only appends tokens ([`crate::completion::anchor`]); `None`: the whole prefix
        /// goes before the suffix. Providers that send `prefix` as a field ignore it.
        middle_start: Option<usize>,
    },
    /// Chat turns with an optional system prompt.
    Chat {
        system: Option<String>,
        messages: Vec<ChatTurn>,
    },
}

/// `prefix` split at a [`Prompt::FillInTheMiddle`]'s `middle_start` (ignored unless it is a char boundary
/// inside the prefix): the text that goes before the suffix, and the text that starts the middle.
pub fn split_at_middle(prefix: &str, middle_start: Option<usize>) -> (&str, &str) {
    match middle_start {
        Some(at) if at > 0 && prefix.is_char_boundary(at) => prefix.split_at(at),
        _ => (prefix, ""),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    pub role: ChatRole,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatRole {
    User,
    Assistant,
}

/// A snippet of another file given to the model as extra context (llama.cpp `input_extra`, repo-level FIM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextChunk {
    /// The file the snippet comes from, as the editor names it (workspace-relative when known).
    pub path: String,
    /// The snippet itself.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Prompt,
    pub max_tokens: u32,
    pub temperature: f32,
    /// Provider-side stop sequences.
    pub stop: Vec<String>,
    /// Snippets of other files for providers that take them as a separate field (llama.cpp `/infill`).
    /// Prompt styles that render context into the prompt text leave this empty.
    pub extra_context: Vec<ContextChunk>,
    /// Set on inline-completion requests, `None` on chat requests.
    pub completion: Option<CompletionHints>,
}

/// What a provider needs to know about an inline-completion request beyond the prompt.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CompletionHints {
    /// For a [`Prompt::FillInTheMiddle`]: what to send instead when the server does not honour a native suffix
    /// (or, with `fim = "auto"`, is not known to).
    pub fim_fallback: Option<FimFallback>,
}

/// A raw prompt that stands in for a native FIM prompt: the model family's template rendered, or the prefix alone.
#[derive(Debug, Clone, PartialEq)]
pub struct FimFallback {
    pub prompt: String,
    /// Stop strings for `prompt`.
    pub stop: Vec<String>,
    /// What the fallback is, for log lines (`the qwen2.5-coder FIM template`, `prefix-only completion`).
    pub description: String,
}

impl GenerationRequest {
    /// The fallback of a completion request, if any.
    pub fn fim_fallback(&self) -> Option<&FimFallback> {
        self.completion.as_ref()?.fim_fallback.as_ref()
    }

    /// This request with its native FIM prompt replaced by `fallback` (a raw prompt with its stop strings).
    pub fn with_fallback(&self, fallback: &FimFallback) -> GenerationRequest {
        let mut request = self.clone();
        request.prompt = Prompt::Raw(fallback.prompt.clone());
        request.stop = fallback.stop.clone();
        request
    }
}

/// Why the provider stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// End of text or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// One item of a provider stream.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// More generated text (may be any length, including a partial word).
    Text(String),
    /// The provider finished; always the last item of a successful stream.
    Finished {
        reason: StopReason,
        usage: TokenUsage,
    },
}

/// Provider failures, classified so the user can act on them. Messages never contain secrets.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    #[error("authentication failed ({0}): check the API key")]
    Auth(String),
    #[error("access forbidden ({0})")]
    Forbidden(String),
    #[error("not found ({0}): check the base URL and model name")]
    NotFound(String),
    #[error("rate limited{}: {message}", retry_after_secs.map(|s| format!(" (retry after {s}s)")).unwrap_or_default())]
    RateLimited {
        retry_after_secs: Option<u64>,
        message: String,
    },
    #[error("provider server error ({0})")]
    Server(String),
    #[error("cannot reach the provider ({0})")]
    Unreachable(String),
    #[error("bad or stalled stream from the provider ({0})")]
    Protocol(String),
    #[error("no model available: {0}")]
    ModelMissing(String),
    #[error("model failed to load: {0}")]
    ModelLoad(String),
    #[error("invalid request: {0}")]
    BadRequest(String),
}

/// A model backend. Dropping the returned stream cancels generation (HTTP connection closed, decoding stopped).
pub trait Provider: Send + Sync + 'static {
    /// Provider kind for status output, e.g. `openai`, `embedded`.
    fn kind(&self) -> &str;
    /// Model name for status output and cache keys.
    fn model(&self) -> &str;
    /// True when the backend accepts [`Prompt::FillInTheMiddle`] natively.
    fn supports_native_fim(&self) -> bool;
    /// Starts generating. Errors before the first token are delivered as the stream's first item.
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxStream<'static, Result<GenerationEvent, ProviderError>>;
    /// Warms the provider's cache with `request`'s prompt at low priority, generating nothing; the stream
    /// ends when done and dropping it cancels. `None`: the provider has no use for a prefill.
    fn prefill(
        &self,
        _request: GenerationRequest,
    ) -> Option<BoxStream<'static, Result<GenerationEvent, ProviderError>>> {
        None
    }
    /// Load state and hardware in use, for status output (`None` for remote providers).
    fn describe(&self) -> Option<ProviderDetails> {
        None
    }
}

/// What `status` shows about a local model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProviderDetails {
    /// `loading`, `ready: ...` or `failed: ...`.
    pub state: String,
    /// The CPU code in use (SIMD level).
    pub cpu_backend: String,
    /// GPU backend in use; empty for CPU only.
    pub gpu_backend: String,
}

/// Builds the HTTP provider for `profile`; `embedded` profiles are not HTTP providers.
pub fn provider_from_profile(profile: &ProfileConfig) -> Result<Arc<dyn Provider>, ConfigError> {
    Ok(match profile.kind {
        ProviderKind::OpenAiChat | ProviderKind::OpenAiCompletions => {
            Arc::new(openai::OpenAiProvider::from_profile(profile)?)
        }
        ProviderKind::Anthropic => Arc::new(anthropic::AnthropicProvider::from_profile(profile)?),
        ProviderKind::Ollama => Arc::new(ollama::OllamaProvider::from_profile(profile)?),
        ProviderKind::MistralFim => Arc::new(mistral::MistralProvider::from_profile(profile)?),
        ProviderKind::Gemini => Arc::new(gemini::GeminiProvider::from_profile(profile)?),
        ProviderKind::LlamaCpp => Arc::new(llama_cpp::LlamaCppProvider::from_profile(profile)?),
        ProviderKind::Embedded => {
            return Err(ConfigError::profile(
                &profile.name,
                "an `embedded` profile is served by the embedded model, not over HTTP",
            ))
        }
    })
}
