//! Engine configuration: provider profiles, which profile serves completion and chat, and cache settings (`engine.toml`).
//!
//! Without a file the engine uses one profile, `embedded` (the catalog default model), for both completion and
//! chat. An example `$XDG_CONFIG_HOME/lapce-ai/engine.toml`:
//!
//! ```toml
//! completion_profile = "local-fim"
//! chat_profile = "claude"
//! idle_exit_minutes = 30               # the daemon exits after this long without clients; 0 = never
//!
//! [cache]
//! entries = 100
//! ttl_secs = 300
//!
//! [context]                            # snippets of other open files in completion prompts
//! enabled = true
//! extra_tokens = 1024                  # on top of the cursor's own context; 0 disables
//! max_documents = 64
//! max_document_bytes = 1048576         # larger files are not used as context
//!
//! [profiles.local-fim]
//! kind = "llama-cpp"                   # llama-cpp, openai-chat, openai-completions, anthropic, ollama, mistral-fim,
//!                                      # gemini, embedded
//! base_url = "http://127.0.0.1:8080"   # a trailing /v1 is fine too
//! model = "qwen2.5-coder-1.5b"         # the name also selects the FIM family (qwen, starcoder, deepseek, ...)
//! fim = "auto"                         # auto (default), native, template, none
//! idle_timeout_ms = 5000
//! max_tokens = 128
//!
//! [profiles.vllm]
//! kind = "openai-completions"
//! base_url = "http://127.0.0.1:8000/v1"
//! model = "my-finetune"
//! fim = "template"                     # render this template into `prompt`; vLLM rejects `suffix`
//! fim_template = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"   # or a family name: "starcoder2"
//! fim_stop = ["<|endoftext|>", "<file_sep>"]   # stop strings of a custom template ({{ and }} are literal braces)
//!
//! [profiles.ollama]
//! kind = "ollama"
//! model = "qwen2.5-coder:1.5b-base"
//! keep_alive = "30m"                   # the default; keeps the model loaded between keystrokes
//!
//! [profiles.claude]
//! kind = "anthropic"
//! model = "claude-sonnet-4-5"
//! api_key_env = "ANTHROPIC_API_KEY"   # the default for this kind; a literal api_key needs a chmod 600 file
//! api_key_file = "anthropic.key"      # or a file holding the key (relative to this file's folder; chmod 600)
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::completion::template::{CustomFimTemplate, FimTemplate, PromptPlan, PromptStyle};

/// Catalog name of the model the built-in `embedded` profile uses: the recommended code model when downloaded,
/// else the offline fallback (see `models::catalog`).
pub const DEFAULT_EMBEDDED_MODEL: &str = crate::models::DEFAULT_MODEL;
/// Name of the built-in profile used when the file names no other.
pub const DEFAULT_PROFILE: &str = "embedded";
/// Default TCP connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default time a stream may go without receiving a byte before it counts as stalled.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default limit on a whole request, streaming included.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Default Ollama `keep_alive`: long enough that a keystroke after a coffee break does not wait for a cold load
/// (Ollama's own default unloads after 5 idle minutes).
pub const DEFAULT_KEEP_ALIVE: &str = "30m";

/// The per-profile `fim` setting: how fill-in-the-middle reaches the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FimMode {
    /// The provider's native FIM where the server is known to honour it (falling back when it turns out not to);
    /// otherwise the model family's template; otherwise the prefix alone.
    #[default]
    Auto,
    /// Always the provider's native FIM (a server that rejects it still gets the fallback, with a warning).
    Native,
    /// Always a template rendered by the engine (`fim_template`, or the family's from the model name).
    Template,
    /// The prefix alone.
    None,
}

impl FimMode {
    /// The name used in `engine.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            FimMode::Auto => "auto",
            FimMode::Native => "native",
            FimMode::Template => "template",
            FimMode::None => "none",
        }
    }
}

/// A secret (API key). Its `Debug` and `Display` print `***`; use [`ApiKey::expose`] only to build a request.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The secret itself, for an HTTP header. Never log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Which wire format (or the embedded model) a profile uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// OpenAI-compatible `/v1/chat/completions`.
    #[serde(rename = "openai-chat")]
    OpenAiChat,
    /// OpenAI-compatible `/v1/completions` (native FIM through `suffix`); chat prompts go to `/v1/chat/completions`.
    #[serde(rename = "openai-completions")]
    OpenAiCompletions,
    /// Anthropic Messages API.
    Anthropic,
    /// Ollama `/api/generate` and `/api/chat`.
    Ollama,
    /// Mistral/Codestral `/v1/fim/completions`.
    MistralFim,
    /// Google Gemini `streamGenerateContent`.
    Gemini,
    /// llama.cpp's `llama-server`: FIM on `/infill`, raw prompts on `/completion`, chat on `/v1/chat/completions`.
    LlamaCpp,
    /// The in-process local model.
    Embedded,
}

impl ProviderKind {
    /// The name used in `engine.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAiChat => "openai-chat",
            Self::OpenAiCompletions => "openai-completions",
            Self::Anthropic => "anthropic",
            Self::Ollama => "ollama",
            Self::MistralFim => "mistral-fim",
            Self::Gemini => "gemini",
            Self::LlamaCpp => "llama-cpp",
            Self::Embedded => "embedded",
        }
    }

    /// Base URL used when a profile gives none (`None` for the embedded model).
    pub fn default_base_url(self) -> Option<&'static str> {
        match self {
            Self::OpenAiChat | Self::OpenAiCompletions => Some("https://api.openai.com"),
            Self::Anthropic => Some("https://api.anthropic.com"),
            Self::Ollama => Some("http://127.0.0.1:11434"),
            Self::MistralFim => Some("https://api.mistral.ai"),
            Self::Gemini => Some("https://generativelanguage.googleapis.com"),
            Self::LlamaCpp => Some("http://127.0.0.1:8080"),
            Self::Embedded => None,
        }
    }

    /// Environment variable holding the API key when a profile names none.
    pub fn default_api_key_env(self) -> Option<&'static str> {
        match self {
            Self::OpenAiChat | Self::OpenAiCompletions => Some("OPENAI_API_KEY"),
            Self::Anthropic => Some("ANTHROPIC_API_KEY"),
            Self::MistralFim => Some("MISTRAL_API_KEY"),
            Self::Gemini => Some("GEMINI_API_KEY"),
            Self::Ollama | Self::LlamaCpp | Self::Embedded => None,
        }
    }

    /// True when requests cannot work without an API key.
    pub fn requires_api_key(self) -> bool {
        matches!(self, Self::Anthropic | Self::MistralFim | Self::Gemini)
    }

    /// True when the wire format has a native fill-in-the-middle (a suffix field or an infill endpoint).
    pub fn has_native_fim(self) -> bool {
        matches!(
            self,
            Self::OpenAiCompletions | Self::Ollama | Self::MistralFim | Self::LlamaCpp
        )
    }

    /// True for chat-only APIs (completion then asks the model to fill a hole).
    pub fn is_chat_only(self) -> bool {
        matches!(self, Self::OpenAiChat | Self::Anthropic | Self::Gemini)
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One named provider profile (`[profiles.NAME]`), with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// `None` means [`ProviderKind::default_base_url`].
    pub base_url: Option<String>,
    pub model: String,
    /// Environment variable holding the key; `None` means [`ProviderKind::default_api_key_env`].
    pub api_key_env: Option<String>,
    /// A literal key from the file (only accepted from a file private to its owner).
    pub api_key: Option<ApiKey>,
    /// A file holding the key, read again whenever the key is needed (so a key written later, or a new
    /// key, applies to the next request). Only used when private to its owner.
    pub api_key_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// How long a response may go without a byte before the stream fails as stalled.
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    /// How fill-in-the-middle reaches the model (`fim`).
    pub fim: FimMode,
    /// `fim_template`, parsed: a named template or style, or a custom template string (with `fim_stop`).
    pub fim_template: Option<PromptStyle>,
    /// Ollama only: how long the server keeps the model loaded after a request (`keep_alive`).
    pub keep_alive: String,
    /// Upper bound on generated tokens; a request asking for more is capped.
    pub max_tokens: Option<u32>,
    /// Replaces the request's temperature when set.
    pub temperature: Option<f32>,
    /// Embedded only: a GGUF file to use instead of the catalog model.
    pub model_path: Option<PathBuf>,
    /// Embedded only: context window in tokens.
    pub context_tokens: Option<u32>,
    /// Embedded only: decoding threads.
    pub threads: Option<u32>,
}

impl ProfileConfig {
    /// A profile with every optional setting at its default.
    pub fn new(name: impl Into<String>, kind: ProviderKind, model: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind,
            base_url: None,
            model: model.into(),
            api_key_env: None,
            api_key: None,
            api_key_file: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            fim: FimMode::Auto,
            fim_template: None,
            keep_alive: DEFAULT_KEEP_ALIVE.to_string(),
            max_tokens: None,
            temperature: None,
            model_path: None,
            context_tokens: None,
            threads: None,
        }
    }

    /// The built-in profile: the embedded catalog default model.
    pub fn embedded_default() -> Self {
        Self::new(
            DEFAULT_PROFILE,
            ProviderKind::Embedded,
            DEFAULT_EMBEDDED_MODEL,
        )
    }

    /// The base URL in effect (explicit or the kind's default).
    pub fn effective_base_url(&self) -> Option<&str> {
        self.base_url
            .as_deref()
            .or_else(|| self.kind.default_base_url())
    }

    /// The environment variable consulted for the key, if any.
    pub fn effective_api_key_env(&self) -> Option<&str> {
        self.api_key_env
            .as_deref()
            .or_else(|| self.kind.default_api_key_env())
    }

    /// How completion prompts are built for this profile: the `fim` mode and `fim_template` applied to the
    /// provider's model and abilities. `supports_native_fim` is the provider's answer.
    pub fn prompt_plan(&self, model_name: &str, supports_native_fim: bool) -> PromptPlan {
        let configured = self.fim_template.as_ref();
        let style = match self.fim {
            FimMode::None => PromptStyle::PrefixOnly,
            FimMode::Native => PromptStyle::NativeFim,
            FimMode::Template => PromptStyle::template_for(configured, model_name),
            FimMode::Auto => match configured {
                Some(style) => style.clone(),
                None => {
                    PromptStyle::detect(model_name, supports_native_fim, self.kind.is_chat_only())
                }
            },
        };
        PromptPlan::new(style, configured, model_name)
    }

    /// The key to send: the literal `api_key`, else the (non-empty) `api_key_file` if it is private to its
    /// owner, else the (non-empty) environment variable. The environment is the daemon's own, fixed when
    /// it started; the file is read on every call.
    pub fn resolve_api_key(&self) -> Option<ApiKey> {
        if let Some(key) = &self.api_key {
            return Some(key.clone());
        }
        if let Some(file) = &self.api_key_file {
            match file_is_private(file) {
                Ok(true) => {
                    if let Ok(text) = std::fs::read_to_string(file) {
                        if !text.trim().is_empty() {
                            return Some(ApiKey::new(text.trim()));
                        }
                    }
                }
                Ok(false) => tracing::warn!(
                    file = %file.display(),
                    "api_key_file is readable by others: not used (run `chmod 600` on it)"
                ),
                Err(_) => {}
            }
        }
        let var = self.effective_api_key_env()?;
        match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => Some(ApiKey::new(value.trim())),
            _ => None,
        }
    }
}

/// The completion cache (`[cache]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    pub entries: usize,
    pub ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            entries: 100,
            ttl: Duration::from_secs(300),
        }
    }
}

/// Context from other open files (`[context]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextConfig {
    pub enabled: bool,
    /// Token budget for snippets of other files, separate from the cursor context's budget; 0 disables.
    pub extra_tokens: usize,
    /// Open documents kept per client connection.
    pub max_documents: usize,
    /// Larger documents are refused (logged) and never used as context.
    pub max_document_bytes: usize,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            extra_tokens: 1024,
            max_documents: 64,
            max_document_bytes: 1024 * 1024,
        }
    }
}

impl ContextConfig {
    /// The snippet budget in effect (0 when disabled).
    pub fn effective_extra_tokens(&self) -> usize {
        if self.enabled {
            self.extra_tokens
        } else {
            0
        }
    }
}

/// The whole engine configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// The file it was read from (`None` when built from defaults only).
    pub source: Option<PathBuf>,
    /// All profiles by name; always contains the completion and chat profiles.
    pub profiles: BTreeMap<String, ProfileConfig>,
    pub completion_profile: String,
    pub chat_profile: String,
    pub cache: CacheConfig,
    pub context: ContextConfig,
    /// The daemon exits after this long without clients (`idle_exit_minutes`); `None` = never.
    pub idle_exit: Option<Duration>,
}

/// `idle_exit_minutes` when the file does not set it.
pub const DEFAULT_IDLE_EXIT: Duration = Duration::from_secs(30 * 60);

impl Default for EngineConfig {
    fn default() -> Self {
        let mut profiles = BTreeMap::new();
        profiles.insert(
            DEFAULT_PROFILE.to_string(),
            ProfileConfig::embedded_default(),
        );
        Self {
            source: None,
            profiles,
            completion_profile: DEFAULT_PROFILE.to_string(),
            chat_profile: DEFAULT_PROFILE.to_string(),
            cache: CacheConfig::default(),
            context: ContextConfig::default(),
            idle_exit: Some(DEFAULT_IDLE_EXIT),
        }
    }
}

/// Why a configuration could not be loaded or a profile could not be used. Never contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A problem at a place in the file: `FILE:LINE: KEY: MESSAGE`.
    #[error("{}", format_invalid(file, *line, key, message))]
    Invalid {
        file: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// Dotted key path, e.g. `profiles.fast.temperature` (empty for a syntax error).
        key: String,
        message: String,
    },
    /// A profile cannot be turned into a provider.
    #[error("profile `{profile}`: {message}")]
    Profile { profile: String, message: String },
}

fn format_invalid(file: &Path, line: Option<usize>, key: &str, message: &str) -> String {
    let mut out = file.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    if !key.is_empty() {
        out.push_str(": ");
        out.push_str(key);
    }
    out.push_str(": ");
    out.push_str(message);
    out
}

impl ConfigError {
    pub(crate) fn profile(profile: &str, message: impl Into<String>) -> Self {
        Self::Profile {
            profile: profile.to_string(),
            message: message.into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    completion_profile: Option<Spanned<String>>,
    chat_profile: Option<Spanned<String>>,
    #[serde(default)]
    profiles: BTreeMap<String, Spanned<RawProfile>>,
    #[serde(default)]
    cache: RawCache,
    #[serde(default)]
    context: RawContext,
    idle_exit_minutes: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProfile {
    kind: ProviderKind,
    base_url: Option<Spanned<String>>,
    model: Option<String>,
    api_key_env: Option<String>,
    api_key: Option<Spanned<ApiKey>>,
    api_key_file: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    fim: Option<Spanned<FimMode>>,
    fim_template: Option<Spanned<String>>,
    fim_stop: Option<Spanned<Vec<String>>>,
    keep_alive: Option<Spanned<toml::Value>>,
    max_tokens: Option<u32>,
    temperature: Option<Spanned<f32>>,
    model_path: Option<PathBuf>,
    context_tokens: Option<u32>,
    threads: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCache {
    entries: Option<usize>,
    ttl_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawContext {
    enabled: Option<bool>,
    extra_tokens: Option<usize>,
    max_documents: Option<usize>,
    max_document_bytes: Option<usize>,
}

impl EngineConfig {
    /// `$XDG_CONFIG_HOME/lapce-ai/engine.toml` (platform config dir elsewhere); `None` without a home directory.
    pub fn default_path() -> Option<PathBuf> {
        directories::BaseDirs::new()
            .map(|dirs| dirs.config_dir().join("lapce-ai").join("engine.toml"))
    }

    /// Loads `path`, or the default path when `None`. A missing default file gives the defaults;
    /// a missing explicit file is an error.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (file, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => match Self::default_path() {
                Some(p) => (p, false),
                None => {
                    tracing::debug!("no config directory; using the default engine configuration");
                    return Ok(Self::default());
                }
            },
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(file = %file.display(), "no engine config file; using defaults");
                return Ok(Self::default());
            }
            Err(source) => return Err(ConfigError::Read { file, source }),
        };
        let private = file_is_private(&file).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let config = Self::parse(&text, &file, private)?;
        tracing::debug!(file = %file.display(), profiles = config.profiles.len(), "loaded engine config");
        Ok(config)
    }

    /// Parses configuration text. `file` names it in errors; `private` says whether the file is readable by its
    /// owner only (a literal `api_key` is rejected otherwise).
    pub fn parse(text: &str, file: &Path, private: bool) -> Result<Self, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, key: &str, message: String| {
            ConfigError::Invalid {
                file: file.to_path_buf(),
                line: span.map(|s| line_of(text, s.start)),
                key: key.to_string(),
                message,
            }
        };

        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| invalid(e.span(), "", e.message().trim().to_string()))?;
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().clone();
            let inner = e.into_inner();
            let message = inner.message().trim().to_string();
            let key = key_path(&path, &message);
            // serde quotes the offending value ("invalid type: integer `123…`"): never for a key.
            let message = if key.rsplit('.').next() == Some("api_key") {
                "must be a string (the value is not shown: it may be a secret)".to_string()
            } else {
                message
            };
            invalid(inner.span(), &key, message)
        })?;

        let mut config = Self {
            source: Some(file.to_path_buf()),
            ..Self::default()
        };
        if let Some(minutes) = raw.idle_exit_minutes {
            config.idle_exit =
                (minutes > 0).then(|| Duration::from_secs(minutes.saturating_mul(60)));
        }
        let defaults = CacheConfig::default();
        config.cache = CacheConfig {
            entries: raw.cache.entries.unwrap_or(defaults.entries),
            ttl: raw
                .cache
                .ttl_secs
                .map(Duration::from_secs)
                .unwrap_or(defaults.ttl),
        };
        let context_defaults = ContextConfig::default();
        config.context = ContextConfig {
            enabled: raw.context.enabled.unwrap_or(context_defaults.enabled),
            extra_tokens: raw
                .context
                .extra_tokens
                .unwrap_or(context_defaults.extra_tokens),
            max_documents: raw
                .context
                .max_documents
                .unwrap_or(context_defaults.max_documents),
            max_document_bytes: raw
                .context
                .max_document_bytes
                .unwrap_or(context_defaults.max_document_bytes),
        };

        for (name, spanned) in raw.profiles {
            let span = spanned.span();
            let raw = spanned.into_inner();
            let key = format!("profiles.{name}");
            let model = match (raw.model, raw.kind) {
                (Some(model), _) => model,
                (None, ProviderKind::Embedded) => DEFAULT_EMBEDDED_MODEL.to_string(),
                (None, kind) => {
                    return Err(invalid(
                        Some(span),
                        &format!("{key}.model"),
                        format!("missing: a `{kind}` profile needs a model name"),
                    ))
                }
            };
            if let Some(base_url) = &raw.base_url {
                if let Err(e) = reqwest::Url::parse(base_url.get_ref()) {
                    return Err(invalid(
                        Some(base_url.span()),
                        &format!("{key}.base_url"),
                        format!("not a valid URL: {e}"),
                    ));
                }
            }
            if let Some(t) = &raw.temperature {
                let value = *t.get_ref();
                if !(0.0..=2.0).contains(&value) {
                    return Err(invalid(
                        Some(t.span()),
                        &format!("{key}.temperature"),
                        format!("{value} is out of range (0.0 to 2.0)"),
                    ));
                }
            }
            if let Some(api_key) = &raw.api_key {
                if !private {
                    return Err(invalid(
                        Some(api_key.span()),
                        &format!("{key}.api_key"),
                        format!(
                            "a literal api_key is only accepted when the file is readable by its owner only \
                             (run `chmod 600 {}`), or name an environment variable with api_key_env",
                            file.display()
                        ),
                    ));
                }
            }
            let mut profile = ProfileConfig::new(name.clone(), raw.kind, model);
            profile.base_url = raw.base_url.map(Spanned::into_inner);
            profile.api_key_env = raw.api_key_env;
            profile.api_key = raw.api_key.map(Spanned::into_inner);
            profile.api_key_file = raw
                .api_key_file
                .map(|f| file.parent().map_or_else(|| f.clone(), |dir| dir.join(&f)));
            if let Some(ms) = raw.connect_timeout_ms {
                profile.connect_timeout = Duration::from_millis(ms);
            }
            if let Some(ms) = raw.idle_timeout_ms {
                profile.idle_timeout = Duration::from_millis(ms);
            }
            if let Some(ms) = raw.request_timeout_ms {
                profile.request_timeout = Duration::from_millis(ms);
            }
            profile.fim_template = parse_fim_template(
                raw.fim_template.as_ref(),
                raw.fim_stop.as_ref(),
                &key,
                &invalid,
            )?;
            if let Some(fim) = &raw.fim {
                profile.fim = *fim.get_ref();
                check_fim_mode(&profile, fim.span(), &key, &invalid)?;
            }
            if let Some(keep_alive) = &raw.keep_alive {
                profile.keep_alive = match keep_alive.get_ref() {
                    toml::Value::String(text) if !text.trim().is_empty() => text.trim().to_string(),
                    toml::Value::Integer(seconds) => format!("{seconds}s"),
                    _ => {
                        return Err(invalid(
                            Some(keep_alive.span()),
                            &format!("{key}.keep_alive"),
                            "expected a duration such as \"30m\" or \"1h\", or seconds (negative: keep loaded)"
                                .to_string(),
                        ))
                    }
                };
            }
            profile.max_tokens = raw.max_tokens;
            profile.temperature = raw.temperature.map(Spanned::into_inner);
            profile.model_path = raw.model_path;
            profile.context_tokens = raw.context_tokens;
            profile.threads = raw.threads;
            config.profiles.insert(name, profile);
        }

        for (field, value) in [
            ("completion_profile", raw.completion_profile),
            ("chat_profile", raw.chat_profile),
        ] {
            let Some(value) = value else { continue };
            let name = value.get_ref();
            if !config.profiles.contains_key(name) {
                let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
                return Err(invalid(
                    Some(value.span()),
                    field,
                    format!("unknown profile `{name}` (defined: {})", known.join(", ")),
                ));
            }
            if field == "completion_profile" {
                config.completion_profile = name.clone();
            } else {
                config.chat_profile = name.clone();
            }
        }
        Ok(config)
    }

    /// A profile by name.
    pub fn profile(&self, name: &str) -> Option<&ProfileConfig> {
        self.profiles.get(name)
    }

    /// The profile serving inline completion.
    pub fn completion(&self) -> &ProfileConfig {
        self.profile_or_default(&self.completion_profile)
    }

    /// The profile serving chat.
    pub fn chat(&self) -> &ProfileConfig {
        self.profile_or_default(&self.chat_profile)
    }

    fn profile_or_default(&self, name: &str) -> &ProfileConfig {
        // `parse` guarantees the name exists; fall back to any profile for hand-built configs.
        self.profiles
            .get(name)
            .or_else(|| self.profiles.get(DEFAULT_PROFILE))
            .or_else(|| self.profiles.values().next())
            .unwrap_or_else(|| default_profile())
    }
}

/// The `invalid(span, key, message)` error builder of [`EngineConfig::parse`].
type InvalidAt<'a> = dyn Fn(Option<std::ops::Range<usize>>, &str, String) -> ConfigError + 'a;

/// `fim_template` (a template or style name, or a template string with `{prefix}`/`{suffix}`) and `fim_stop`,
/// checked now so a broken template never reaches a request.
fn parse_fim_template(
    setting: Option<&Spanned<String>>,
    stop: Option<&Spanned<Vec<String>>>,
    key: &str,
    invalid: &InvalidAt<'_>,
) -> Result<Option<PromptStyle>, ConfigError> {
    let Some(setting) = setting else {
        if let Some(stop) = stop {
            return Err(invalid(
                Some(stop.span()),
                &format!("{key}.fim_stop"),
                "fim_stop belongs to a custom fim_template string (with {prefix} and {suffix}); set one"
                    .to_string(),
            ));
        }
        return Ok(None);
    };
    let text = setting.get_ref();
    let template_key = format!("{key}.fim_template");
    if CustomFimTemplate::looks_like_template(text) {
        let stop = stop.map(|s| s.get_ref().clone()).unwrap_or_default();
        return CustomFimTemplate::parse(text, stop)
            .map(|template| Some(PromptStyle::Custom(std::sync::Arc::new(template))))
            .map_err(|e| {
                invalid(
                    Some(setting.span()),
                    &template_key,
                    format!("invalid template: {e}"),
                )
            });
    }
    if let Some(stop) = stop {
        return Err(invalid(
            Some(stop.span()),
            &format!("{key}.fim_stop"),
            format!("fim_stop only applies to a custom template string; `{text}` is a named template with its own stop tokens"),
        ));
    }
    PromptStyle::from_name(text)
        .map(Some)
        .map_err(|e| invalid(Some(setting.span()), &template_key, e.to_string()))
}

/// Refuses `fim` settings that cannot work for the profile.
fn check_fim_mode(
    profile: &ProfileConfig,
    span: std::ops::Range<usize>,
    key: &str,
    invalid: &InvalidAt<'_>,
) -> Result<(), ConfigError> {
    let fim_key = format!("{key}.fim");
    match profile.fim {
        FimMode::Native if !profile.kind.has_native_fim() => Err(invalid(
            Some(span),
            &fim_key,
            format!(
                "a `{}` profile has no native fill-in-the-middle; use \"auto\", \"template\" or \"none\"",
                profile.kind
            ),
        )),
        FimMode::Template => match &profile.fim_template {
            Some(PromptStyle::Template(_) | PromptStyle::Custom(_)) => Ok(()),
            Some(other) => Err(invalid(
                Some(span),
                &fim_key,
                format!("fim = \"template\" needs a template, but fim_template selects {}", other.describe()),
            )),
            None if FimTemplate::for_model(&profile.model).is_some() => Ok(()),
            None => Err(invalid(
                Some(span),
                &fim_key,
                format!(
                    "fim = \"template\" but the model name `{}` names no known FIM family; set fim_template to a \
                     family name or a template string with {{prefix}} and {{suffix}}",
                    profile.model
                ),
            )),
        },
        _ => Ok(()),
    }
}

fn default_profile() -> &'static ProfileConfig {
    static DEFAULT: std::sync::OnceLock<ProfileConfig> = std::sync::OnceLock::new();
    DEFAULT.get_or_init(ProfileConfig::embedded_default)
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key an error is about. Segments added by `toml::Spanned` are skipped, and an unknown field (which
/// serde reports at its parent's path) is named.
fn key_path(path: &serde_path_to_error::Path, message: &str) -> String {
    use serde_path_to_error::Segment;
    let mut segments: Vec<String> = Vec::new();
    for segment in path.iter() {
        let text = match segment {
            Segment::Seq { index } => index.to_string(),
            Segment::Map { key } => key.clone(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => continue,
        };
        if !text.starts_with("$__serde_spanned_private") {
            segments.push(text);
        }
    }
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    if let Some(field) = unknown {
        if segments.last().map(String::as_str) != Some(field) {
            segments.push(field.to_string());
        }
    }
    segments.join(".")
}

#[cfg(unix)]
fn file_is_private(file: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(file)?.permissions().mode() & 0o077 == 0)
}

#[cfg(not(unix))]
fn file_is_private(_file: &Path) -> std::io::Result<bool> {
    Ok(true)
}
