//! Ollama provider: `/api/generate` (raw prompts, native FIM via `suffix`) and `/api/chat`, NDJSON streams;
//! `/api/show` tells whether the model's template takes a suffix.

use std::sync::Arc;

use serde_json::{json, Value};

use futures::stream::{self, StreamExt};
use tokio::sync::OnceCell;

use super::fim::{is_suffix_rejection, or_fallback, FallbackStream, NativeFimState};
use super::http::{
    expect_kind, generation_stream, parse_json, EventStream, FinalChunk, FrameDecoder, Framing,
    HttpEndpoint,
};
use super::openai_wire::{bearer_auth, chat_messages};
use super::{GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError};
use crate::config::{ConfigError, ProfileConfig, ProviderKind};

/// A model served by Ollama (default `http://127.0.0.1:11434`). An API key is optional and sent as a bearer
/// token (for Ollama behind an authenticating proxy).
///
/// A FIM prompt uses the native `suffix` when `/api/show` (asked once per provider) says the model's template
/// takes one (`capabilities` holds `insert`, or the template mentions `.Suffix`); otherwise the request's
/// fallback prompt (the family template or the prefix alone), with one log line saying so. Every request sends
/// the profile's `keep_alive`.
#[derive(Debug, Clone)]
pub struct OllamaProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
    /// `/api/show`'s answer: does the model's template take a suffix (`None`: could not tell).
    suffix_support: Arc<OnceCell<Option<bool>>>,
    native_fim: Arc<NativeFimState>,
}

impl OllamaProvider {
    /// Builds the provider from an `ollama` profile.
    pub fn from_profile(profile: &ProfileConfig) -> Result<Self, ConfigError> {
        expect_kind(profile, &[ProviderKind::Ollama])?;
        let endpoint = HttpEndpoint::new(profile, bearer_auth, &[])?;
        Ok(Self {
            endpoint: Arc::new(endpoint),
            profile: profile.clone(),
            suffix_support: Arc::default(),
            native_fim: Arc::default(),
        })
    }

    /// Asks `/api/show` (once) whether the model's template takes a suffix; `None` when the server cannot tell.
    async fn model_takes_suffix(&self) -> Option<bool> {
        *self
            .suffix_support
            .get_or_init(|| async {
                let body = json!({"model": self.profile.model});
                let ask = async {
                    match self.endpoint.send(self.endpoint.post_json("/api/show", &body)).await {
                        Ok(response) => response
                            .bytes()
                            .await
                            .ok()
                            .and_then(|body| serde_json::from_slice::<Value>(&body).ok()),
                        Err(e) => {
                            tracing::debug!(profile = %self.profile.name, error = %e, "Ollama /api/show failed");
                            None
                        }
                    }
                };
                let answer = tokio::time::timeout(self.profile.idle_timeout, ask)
                    .await
                    .ok()
                    .flatten();
                let support = answer.as_ref().and_then(template_takes_suffix);
                match support {
                    Some(false) => tracing::warn!(
                        profile = %self.profile.name,
                        model = %self.profile.model,
                        "this Ollama model's template has no suffix (fill-in-the-middle) support; completions use {}",
                        "the model family's FIM template, or the prefix alone for an unknown family"
                    ),
                    Some(true) => tracing::debug!(profile = %self.profile.name, "Ollama model takes a suffix"),
                    None => tracing::debug!(profile = %self.profile.name, "cannot tell whether the Ollama model takes a suffix; trying it"),
                }
                support
            })
            .await
    }

    fn request_body(&self, request: &GenerationRequest) -> (Value, &'static str) {
        let (max_tokens, temperature) = HttpEndpoint::sampling(&self.profile, request);
        let mut options = json!({"num_predict": max_tokens, "temperature": temperature});
        if !request.stop.is_empty() {
            options["stop"] = json!(request.stop);
        }
        let mut body = json!({
            "model": self.profile.model,
            "stream": true,
            "keep_alive": self.profile.keep_alive,
            "options": options,
        });
        let path = match &request.prompt {
            Prompt::Raw(text) => {
                body["prompt"] = json!(text);
                body["raw"] = json!(true);
                "/api/generate"
            }
            Prompt::FillInTheMiddle { prefix, suffix, .. } => {
                // Not raw: Ollama applies the model's own FIM template to prompt + suffix.
                body["prompt"] = json!(prefix);
                body["suffix"] = json!(suffix);
                "/api/generate"
            }
            Prompt::Chat { system, messages } => {
                body["messages"] = json!(chat_messages(system.as_deref(), messages));
                "/api/chat"
            }
        };
        (body, path)
    }

    fn stream(&self, request: &GenerationRequest) -> EventStream {
        let (body, path) = self.request_body(request);
        tracing::debug!(profile = %self.profile.name, path, "starting Ollama generation");
        let http_request = self.endpoint.post_json(path, &body);
        let decoder = OllamaDecoder {
            endpoint: Arc::clone(&self.endpoint),
        };
        generation_stream(
            Arc::clone(&self.endpoint),
            http_request,
            Framing::Ndjson,
            decoder,
        )
    }

    /// A FIM request: native when the model takes a suffix (or cannot tell), else the fallback; a server that
    /// still refuses the suffix gets the fallback for this and every later request.
    fn fill_in_the_middle(&self, request: GenerationRequest) -> EventStream {
        let this = self.clone();
        stream::once(async move {
            let fallback = request.fim_fallback().cloned();
            let takes_suffix = this.model_takes_suffix().await != Some(false);
            match fallback {
                Some(fallback) if !takes_suffix || this.native_fim.refused() => {
                    this.stream(&request.with_fallback(&fallback))
                }
                Some(fallback) => {
                    let retry = this.clone();
                    let fallback_request = request.with_fallback(&fallback);
                    let on_refusal: FallbackStream = Box::new(move |error: &ProviderError| {
                        retry.native_fim.refuse(
                            &retry.profile.name,
                            &error.to_string(),
                            &fallback.description,
                        );
                        retry.stream(&fallback_request)
                    });
                    or_fallback(this.stream(&request), is_suffix_rejection, Some(on_refusal))
                }
                None => this.stream(&request),
            }
        })
        .flatten()
        .boxed()
    }
}

/// Reads `/api/show`: `capabilities` containing `insert` (current Ollama), else a template that uses `.Suffix`.
fn template_takes_suffix(show: &Value) -> Option<bool> {
    if let Some(capabilities) = show.get("capabilities").and_then(Value::as_array) {
        return Some(capabilities.iter().any(|c| c.as_str() == Some("insert")));
    }
    show.get("template")
        .and_then(Value::as_str)
        .map(|template| template.contains(".Suffix"))
}

impl Provider for OllamaProvider {
    fn kind(&self) -> &str {
        self.profile.kind.as_str()
    }

    fn model(&self) -> &str {
        &self.profile.model
    }

    fn supports_native_fim(&self) -> bool {
        true
    }

    fn generate(&self, request: GenerationRequest) -> EventStream {
        match request.prompt {
            Prompt::FillInTheMiddle { .. } => self.fill_in_the_middle(request),
            _ => self.stream(&request),
        }
    }
}

/// Ollama's last line: `"done": true`, `done_reason`, `prompt_eval_count` / `eval_count`.
const OLLAMA_FINAL: FinalChunk = FinalChunk {
    flag: "done",
    reason: "done_reason",
    length_reason: "length",
    prompt_tokens: "prompt_eval_count",
    completion_tokens: "eval_count",
};

struct OllamaDecoder {
    endpoint: Arc<HttpEndpoint>,
}

impl FrameDecoder for OllamaDecoder {
    fn frame(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<GenerationEvent>,
    ) -> Result<bool, ProviderError> {
        let line: Value = parse_json("ollama", data)?;
        if let Some(error) = line.get("error") {
            let message = self.endpoint.clean(
                &error
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| error.to_string()),
            );
            return Err(if message.contains("not found") {
                ProviderError::NotFound(message)
            } else {
                ProviderError::Server(message)
            });
        }
        let text = line
            .get("response")
            .and_then(Value::as_str)
            .or_else(|| line.pointer("/message/content").and_then(Value::as_str));
        if let Some(text) = text.filter(|t| !t.is_empty()) {
            out.push(GenerationEvent::Text(text.to_string()));
        }
        if let Some(finished) = OLLAMA_FINAL.event(&line) {
            out.push(finished);
            return Ok(true);
        }
        Ok(false)
    }

    fn end(&mut self, _out: &mut Vec<GenerationEvent>) -> Result<(), ProviderError> {
        Err(ProviderError::Protocol(
            "stream ended before a `done` line".to_string(),
        ))
    }
}
