//! Anthropic Messages API provider (`/v1/messages`, SSE with typed events, `system` as a top-level field).

use std::sync::Arc;

use reqwest::header::HeaderName;
use serde_json::{json, Value};

use super::http::u32_field;
use super::http::{
    error_stream, expect_kind, generation_stream, parse_json, EventStream, FrameDecoder, Framing,
    HttpEndpoint,
};
use super::openai_wire::stream_error;
use super::{
    ChatRole, GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError, StopReason,
    TokenUsage,
};
use crate::config::{ApiKey, ConfigError, ProfileConfig, ProviderKind};

/// The API version this provider speaks.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Claude models through the Messages API. No native FIM; a raw prompt becomes one user turn.
#[derive(Debug)]
pub struct AnthropicProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
}

impl AnthropicProvider {
    /// Builds the provider from an `anthropic` profile; needs an API key (default env `ANTHROPIC_API_KEY`).
    pub fn from_profile(profile: &ProfileConfig) -> Result<Self, ConfigError> {
        expect_kind(profile, &[ProviderKind::Anthropic])?;
        let auth = |key: &ApiKey| {
            vec![(
                HeaderName::from_static("x-api-key"),
                key.expose().to_string(),
            )]
        };
        let endpoint = HttpEndpoint::new(
            profile,
            auth,
            &[(
                HeaderName::from_static("anthropic-version"),
                ANTHROPIC_VERSION,
            )],
        )?;
        Ok(Self {
            endpoint: Arc::new(endpoint),
            profile: profile.clone(),
        })
    }
}

impl Provider for AnthropicProvider {
    fn kind(&self) -> &str {
        self.profile.kind.as_str()
    }

    fn model(&self) -> &str {
        &self.profile.model
    }

    fn supports_native_fim(&self) -> bool {
        false
    }

    fn generate(&self, request: GenerationRequest) -> EventStream {
        let mut body = HttpEndpoint::streaming_body(&self.profile, &request);
        match &request.prompt {
            Prompt::Raw(text) => {
                body["messages"] = json!([{"role": "user", "content": text}]);
            }
            Prompt::Chat { system, messages } => {
                if let Some(system) = system {
                    body["system"] = json!(system);
                }
                let messages: Vec<Value> = messages
                    .iter()
                    .map(|turn| {
                        let role = match turn.role {
                            ChatRole::User => "user",
                            ChatRole::Assistant => "assistant",
                        };
                        json!({"role": role, "content": turn.content})
                    })
                    .collect();
                body["messages"] = json!(messages);
            }
            Prompt::FillInTheMiddle { .. } => {
                return error_stream(ProviderError::BadRequest(format!(
                    "profile `{}` (anthropic) has no native fill-in-the-middle; use a chat prompt",
                    self.profile.name
                )))
            }
        }
        if !request.stop.is_empty() {
            body["stop_sequences"] = json!(request.stop);
        }
        tracing::debug!(profile = %self.profile.name, max_tokens = %body["max_tokens"], "starting Anthropic generation");
        let http_request = self.endpoint.post_json("/v1/messages", &body);
        let decoder = AnthropicDecoder {
            endpoint: Arc::clone(&self.endpoint),
            reason: None,
            usage: TokenUsage::default(),
        };
        generation_stream(
            Arc::clone(&self.endpoint),
            http_request,
            Framing::Sse,
            decoder,
        )
    }
}

struct AnthropicDecoder {
    endpoint: Arc<HttpEndpoint>,
    reason: Option<StopReason>,
    usage: TokenUsage,
}

impl FrameDecoder for AnthropicDecoder {
    fn frame(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<GenerationEvent>,
    ) -> Result<bool, ProviderError> {
        if data.trim().is_empty() {
            return Ok(false);
        }
        let value: Value = parse_json("anthropic", data)?;
        let kind = value
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(event)
            .to_string();
        match kind.as_str() {
            "message_start" => {
                if let Some(usage) = value.pointer("/message/usage") {
                    self.usage.prompt_tokens = u32_field(usage, "input_tokens");
                    self.usage.completion_tokens = u32_field(usage, "output_tokens");
                }
            }
            "content_block_start" => {
                if let Some(text) = value
                    .pointer("/content_block/text")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                {
                    out.push(GenerationEvent::Text(text.to_string()));
                }
            }
            "content_block_delta" => {
                let delta = value.get("delta");
                let is_text = delta
                    .and_then(|d| d.get("type"))
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == "text_delta");
                if let Some(text) = delta
                    .filter(|_| is_text)
                    .and_then(|d| d.get("text"))
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                {
                    out.push(GenerationEvent::Text(text.to_string()));
                }
            }
            "message_delta" => {
                if let Some(reason) = value.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.reason = Some(match reason {
                        "max_tokens" => StopReason::Length,
                        _ => StopReason::Stop,
                    });
                }
                if let Some(usage) = value.get("usage") {
                    if usage.get("output_tokens").is_some() {
                        self.usage.completion_tokens = u32_field(usage, "output_tokens");
                    }
                    if usage.get("input_tokens").is_some() {
                        self.usage.prompt_tokens = u32_field(usage, "input_tokens");
                    }
                }
            }
            "message_stop" => {
                out.push(GenerationEvent::Finished {
                    reason: self.reason.unwrap_or(StopReason::Stop),
                    usage: self.usage,
                });
                return Ok(true);
            }
            "error" => {
                let error = value.get("error").unwrap_or(&value);
                return Err(stream_error(&self.endpoint, error));
            }
            // content_block_stop, ping and event types added later carry nothing we use.
            _ => {}
        }
        Ok(false)
    }

    fn end(&mut self, _out: &mut Vec<GenerationEvent>) -> Result<(), ProviderError> {
        Err(ProviderError::Protocol(
            "stream ended before message_stop".to_string(),
        ))
    }
}
