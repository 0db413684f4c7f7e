//! The OpenAI wire format shared by several providers: bearer auth, chat messages, request bodies (including
//! reasoning-model limits) and the SSE chunk decoder.

use std::sync::Arc;

use reqwest::header::AUTHORIZATION;
use serde_json::{json, Value};

use super::http::{parse_json, u32_field, FrameDecoder, HttpEndpoint};
use super::{
    ChatRole, ChatTurn, GenerationEvent, GenerationRequest, ProviderError, StopReason, TokenUsage,
};
use crate::config::ProfileConfig;

/// `Authorization: Bearer KEY`.
pub fn bearer_auth(key: &crate::config::ApiKey) -> Vec<(reqwest::header::HeaderName, String)> {
    vec![(AUTHORIZATION, format!("Bearer {}", key.expose()))]
}

/// OpenAI-style chat messages, the system prompt first.
pub fn chat_messages(system: Option<&str>, turns: &[ChatTurn]) -> Vec<Value> {
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

/// True for OpenAI's reasoning-era models (`o1`, `o3`, `o4-mini`, `gpt-5*`, `codex-mini*`), also behind a router
/// prefix such as `openai/o3-mini`. They take `max_completion_tokens` instead of `max_tokens`, and reject
/// `temperature` and `stop` (OpenAI's reasoning-models guide).
pub fn is_reasoning_model(model: &str) -> bool {
    let lower = model.to_ascii_lowercase();
    let name = lower.rsplit('/').next().unwrap_or(&lower);
    let o_series = ["o1", "o3", "o4"]
        .iter()
        .any(|series| name == *series || name.starts_with(&format!("{series}-")));
    let gpt5 = name.starts_with("gpt-5") && !name.starts_with("gpt-5-chat");
    o_series || gpt5 || name.starts_with("codex-mini")
}

/// The body of a streaming `/v1/chat/completions` request.
pub fn chat_completions_body(
    profile: &ProfileConfig,
    request: &GenerationRequest,
    system: Option<&str>,
    turns: &[ChatTurn],
) -> Value {
    let mut body = HttpEndpoint::streaming_body(profile, request);
    body["stream_options"] = json!({"include_usage": true});
    body["messages"] = json!(chat_messages(system, turns));
    if is_reasoning_model(&profile.model) {
        if let Some(object) = body.as_object_mut() {
            if let Some(limit) = object.remove("max_tokens") {
                object.insert("max_completion_tokens".to_string(), limit);
            }
            object.remove("temperature");
        }
    } else if !request.stop.is_empty() {
        body["stop"] = json!(request.stop);
    }
    body
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
