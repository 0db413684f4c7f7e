//! OpenAI-compatible provider: `/v1/chat/completions` and `/v1/completions` (native FIM via `suffix`), SSE streams.

use std::sync::Arc;

use reqwest::header::AUTHORIZATION;
use serde_json::{json, Value};

use super::http::{
    error_stream, expect_kind, generation_stream, parse_json, EventStream, FrameDecoder, Framing,
    HttpEndpoint,
};
use super::{
    ChatRole, ChatTurn, GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError,
    StopReason, TokenUsage,
};
use crate::config::{ConfigError, ProfileConfig, ProviderKind};

/// A provider speaking the OpenAI HTTP API (OpenAI, llama.cpp server, vLLM, LM Studio, OpenRouter, ...).
///
/// Kind `openai-chat` sends every prompt to `/v1/chat/completions` (a raw prompt becomes one user turn) and has
/// no native FIM. Kind `openai-completions` sends raw and FIM prompts to `/v1/completions` (FIM through
/// `suffix`) and chat prompts to `/v1/chat/completions`.
#[derive(Debug)]
pub struct OpenAiProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
}

impl OpenAiProvider {
    /// Builds the provider from an `openai-chat` or `openai-completions` profile.
    pub fn from_profile(profile: &ProfileConfig) -> Result<Self, ConfigError> {
        expect_kind(
            profile,
            &[ProviderKind::OpenAiChat, ProviderKind::OpenAiCompletions],
        )?;
        let endpoint = HttpEndpoint::new(profile, bearer_auth, &[])?;
        Ok(Self {
            endpoint: Arc::new(endpoint),
            profile: profile.clone(),
        })
    }
}

/// `Authorization: Bearer KEY`.
pub(crate) fn bearer_auth(
    key: &crate::config::ApiKey,
) -> Vec<(reqwest::header::HeaderName, String)> {
    vec![(AUTHORIZATION, format!("Bearer {}", key.expose()))]
}

/// OpenAI-style chat messages, the system prompt first.
pub(crate) fn chat_messages(system: Option<&str>, turns: &[ChatTurn]) -> Vec<Value> {
    let mut messages = Vec::with_capacity(turns.len() + 1);
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    for turn in turns {
        let role = match turn.role {
            ChatRole::User => "user",
            ChatRole::Assistant => "assistant",
        };
        messages.push(json!({"role": role, "content": turn.content}));
    }
    messages
}

impl Provider for OpenAiProvider {
    fn kind(&self) -> &str {
        self.profile.kind.as_str()
    }

    fn model(&self) -> &str {
        &self.profile.model
    }

    fn supports_native_fim(&self) -> bool {
        self.profile.kind == ProviderKind::OpenAiCompletions
    }

    fn generate(&self, request: GenerationRequest) -> EventStream {
        let completions = self.profile.kind == ProviderKind::OpenAiCompletions;
        let mut body = HttpEndpoint::streaming_body(&self.profile, &request);
        body["stream_options"] = json!({"include_usage": true});
        let chat = match (&request.prompt, completions) {
            (Prompt::Raw(text), true) => {
                body["prompt"] = json!(text);
                false
            }
            (Prompt::FillInTheMiddle { prefix, suffix }, true) => {
                body["prompt"] = json!(prefix);
                body["suffix"] = json!(suffix);
                false
            }
            (Prompt::FillInTheMiddle { .. }, false) => {
                return error_stream(ProviderError::BadRequest(format!(
                    "profile `{}` (openai-chat) has no native fill-in-the-middle; use a FIM template or openai-completions",
                    self.profile.name
                )))
            }
            (Prompt::Raw(text), false) => {
                body["messages"] = json!([{"role": "user", "content": text}]);
                true
            }
            (Prompt::Chat { system, messages }, _) => {
                body["messages"] = json!(chat_messages(system.as_deref(), messages));
                true
            }
        };
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        let path = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        tracing::debug!(profile = %self.profile.name, path, max_tokens = %body["max_tokens"], "starting OpenAI-compatible generation");
        let http_request = self.endpoint.post_json(path, &body);
        let decoder = OpenAiDecoder::new(Arc::clone(&self.endpoint), chat);
        generation_stream(
            Arc::clone(&self.endpoint),
            http_request,
            Framing::Sse,
            decoder,
        )
    }
}

/// Decodes OpenAI-style SSE chunks (`choices[0].delta.content` or `choices[0].text`, then `data: [DONE]`).
/// Also used for Mistral, whose streams have the same shape.
pub(crate) struct OpenAiDecoder {
    endpoint: Arc<HttpEndpoint>,
    chat: bool,
    reason: Option<StopReason>,
    usage: TokenUsage,
}

impl OpenAiDecoder {
    pub(crate) fn new(endpoint: Arc<HttpEndpoint>, chat: bool) -> Self {
        Self {
            endpoint,
            chat,
            reason: None,
            usage: TokenUsage::default(),
        }
    }

    fn finished(&self) -> GenerationEvent {
        GenerationEvent::Finished {
            reason: self.reason.unwrap_or(StopReason::Stop),
            usage: self.usage,
        }
    }
}

impl FrameDecoder for OpenAiDecoder {
    fn frame(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<GenerationEvent>,
    ) -> Result<bool, ProviderError> {
        let data = data.trim();
        if data == "[DONE]" {
            out.push(self.finished());
            return Ok(true);
        }
        if data.is_empty() {
            return Ok(false);
        }
        let chunk: Value = parse_json("openai", data)?;
        if let Some(error) = chunk.get("error") {
            return Err(stream_error(&self.endpoint, error));
        }
        if let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        {
            let text = if self.chat {
                choice.pointer("/delta/content").and_then(Value::as_str)
            } else {
                choice.get("text").and_then(Value::as_str)
            };
            if let Some(text) = text.filter(|t| !t.is_empty()) {
                out.push(GenerationEvent::Text(text.to_string()));
            }
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.reason = Some(match reason {
                    "length" => StopReason::Length,
                    _ => StopReason::Stop,
                });
            }
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = TokenUsage {
                prompt_tokens: u32_field(usage, "prompt_tokens"),
                completion_tokens: u32_field(usage, "completion_tokens"),
            };
        }
        Ok(false)
    }

    fn end(&mut self, out: &mut Vec<GenerationEvent>) -> Result<(), ProviderError> {
        if self.reason.is_some() {
            // Some compatible servers end after the finish reason without `[DONE]`.
            out.push(self.finished());
            Ok(())
        } else {
            Err(ProviderError::Protocol(
                "stream ended before [DONE]".to_string(),
            ))
        }
    }
}

pub(crate) fn u32_field(value: &Value, key: &str) -> u32 {
    value
        .get(key)
        .and_then(Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// Classifies an error object received inside a stream (`{"type"/"code"/"status": .., "message": ..}`).
pub(crate) fn stream_error(endpoint: &HttpEndpoint, error: &Value) -> ProviderError {
    let kind = ["type", "status", "code"]
        .iter()
        .find_map(|k| match error.get(*k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    let message = match error {
        Value::String(s) => s.clone(),
        other => other
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| other.to_string()),
    };
    let message = endpoint.clean(&if kind.is_empty() {
        message
    } else {
        format!("{kind}: {message}")
    });
    let lower = kind.to_ascii_lowercase();
    if lower.contains("rate_limit") || lower.contains("resource_exhausted") || lower == "429" {
        ProviderError::RateLimited {
            retry_after_secs: None,
            message,
        }
    } else if lower.contains("auth") || lower.contains("invalid_api_key") || lower == "401" {
        ProviderError::Auth(message)
    } else if lower.contains("permission") || lower == "403" {
        ProviderError::Forbidden(message)
    } else if lower.contains("not_found") || lower == "404" {
        ProviderError::NotFound(message)
    } else if lower.contains("invalid_request")
        || lower.contains("invalid_argument")
        || lower == "400"
    {
        ProviderError::BadRequest(message)
    } else {
        ProviderError::Server(message)
    }
}
