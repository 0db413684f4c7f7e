//! Google Gemini provider: `/v1beta/models/{model}:streamGenerateContent?alt=sse`, key in `x-goog-api-key`.

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

/// Gemini models. No native FIM; a raw prompt becomes one user turn; the system prompt goes in
/// `systemInstruction`. Needs an API key (default env `GEMINI_API_KEY`), sent as a header, never in the URL.
#[derive(Debug)]
pub struct GeminiProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
}

impl GeminiProvider {
    /// Builds the provider from a `gemini` profile.
    pub fn from_profile(profile: &ProfileConfig) -> Result<Self, ConfigError> {
        expect_kind(profile, &[ProviderKind::Gemini])?;
        let auth = |key: &ApiKey| {
            vec![(
                HeaderName::from_static("x-goog-api-key"),
                key.expose().to_string(),
            )]
        };
        let endpoint = HttpEndpoint::new(profile, auth, &[])?;
        Ok(Self {
            endpoint: Arc::new(endpoint),
            profile: profile.clone(),
        })
    }
}

/// The least thinking a model allows, for completions (thinking tokens come out of `maxOutputTokens` and add
/// latency). Gemini 2.5 Flash and Flash-Lite turn thinking off with `thinkingBudget: 0`; 2.5 Pro cannot, and
/// its smallest budget is 128; Gemini 3 and later take `thinkingLevel` (`minimal` on Flash models, `low` on
/// Pro). Older models (1.5, 2.0) have no thinking and get no field.
fn completion_thinking_config(model: &str) -> Option<Value> {
    let name = model.to_ascii_lowercase();
    let name = name.strip_prefix("models/").unwrap_or(&name);
    let version = name.strip_prefix("gemini-")?;
    let major: u32 = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let flash = version.contains("flash");
    if version.starts_with("2.5") {
        Some(json!({"thinkingBudget": if flash { 0 } else { 128 }}))
    } else if major >= 3 {
        Some(json!({"thinkingLevel": if flash { "minimal" } else { "low" }}))
    } else {
        None
    }
}

/// A finish reason that means the answer was withheld; reported as an error instead of empty text.
fn blocked_finish(reason: &str) -> Option<ProviderError> {
    let why = match reason {
        "STOP" | "MAX_TOKENS" | "FINISH_REASON_UNSPECIFIED" => return None,
        "SAFETY" | "IMAGE_SAFETY" => "its safety filters",
        "RECITATION" => "its recitation check (the answer repeated training data too closely)",
        "BLOCKLIST" => "a terminology blocklist",
        "PROHIBITED_CONTENT" => "its prohibited-content policy",
        "SPII" => "its sensitive personal information check",
        "LANGUAGE" => "an unsupported language",
        "MALFORMED_FUNCTION_CALL" => "a malformed function call",
        _ => "a reason it did not explain",
    };
    Some(ProviderError::BadRequest(format!(
        "Gemini withheld the answer (finish reason {reason}: stopped by {why})"
    )))
}

fn text_content(role: &str, text: &str) -> Value {
    json!({"role": role, "parts": [{"text": text}]})
}

impl Provider for GeminiProvider {
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
        let (max_tokens, temperature) = HttpEndpoint::sampling(&self.profile, &request);
        let mut config = json!({"maxOutputTokens": max_tokens, "temperature": temperature});
        if !request.stop.is_empty() {
            config["stopSequences"] = json!(request.stop);
        }
        if request.completion.is_some() {
            if let Some(thinking) = completion_thinking_config(&self.profile.model) {
                config["thinkingConfig"] = thinking;
            }
        }
        let mut body = json!({"generationConfig": config});
        match &request.prompt {
            Prompt::Raw(text) => body["contents"] = json!([text_content("user", text)]),
            Prompt::Chat { system, messages } => {
                if let Some(system) = system {
                    body["systemInstruction"] = json!({"parts": [{"text": system}]});
                }
                let contents: Vec<Value> = messages
                    .iter()
                    .map(|turn| {
                        let role = match turn.role {
                            ChatRole::User => "user",
                            ChatRole::Assistant => "model",
                        };
                        text_content(role, &turn.content)
                    })
                    .collect();
                body["contents"] = json!(contents);
            }
            Prompt::FillInTheMiddle { .. } => {
                return error_stream(ProviderError::BadRequest(format!(
                    "profile `{}` (gemini) has no native fill-in-the-middle; use a chat prompt",
                    self.profile.name
                )))
            }
        }
        let model = self
            .profile
            .model
            .strip_prefix("models/")
            .unwrap_or(&self.profile.model);
        let path = format!("/v1beta/models/{model}:streamGenerateContent?alt=sse");
        tracing::debug!(profile = %self.profile.name, model, max_tokens, "starting Gemini generation");
        let http_request = self.endpoint.post_json(&path, &body);
        let decoder = GeminiDecoder {
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

struct GeminiDecoder {
    endpoint: Arc<HttpEndpoint>,
    reason: Option<StopReason>,
    usage: TokenUsage,
}

impl FrameDecoder for GeminiDecoder {
    fn frame(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<GenerationEvent>,
    ) -> Result<bool, ProviderError> {
        if data.trim().is_empty() {
            return Ok(false);
        }
        let chunk: Value = parse_json("gemini", data)?;
        if let Some(error) = chunk.get("error") {
            return Err(stream_error(&self.endpoint, error));
        }
        if let Some(reason) = chunk
            .pointer("/promptFeedback/blockReason")
            .and_then(Value::as_str)
        {
            return Err(ProviderError::BadRequest(format!(
                "prompt blocked by the provider: {reason}"
            )));
        }
        if let Some(candidate) = chunk
            .get("candidates")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        {
            if let Some(parts) = candidate
                .pointer("/content/parts")
                .and_then(Value::as_array)
            {
                let text: String = parts
                    .iter()
                    .filter(|p| p.get("thought").and_then(Value::as_bool) != Some(true))
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect();
                if !text.is_empty() {
                    out.push(GenerationEvent::Text(text));
                }
            }
            if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
                if let Some(error) = blocked_finish(reason) {
                    return Err(error);
                }
                self.reason = Some(match reason {
                    "MAX_TOKENS" => StopReason::Length,
                    _ => StopReason::Stop,
                });
            }
        }
        if let Some(usage) = chunk.get("usageMetadata") {
            self.usage = TokenUsage {
                prompt_tokens: u32_field(usage, "promptTokenCount"),
                completion_tokens: u32_field(usage, "candidatesTokenCount"),
            };
        }
        Ok(false)
    }

    fn end(&mut self, out: &mut Vec<GenerationEvent>) -> Result<(), ProviderError> {
        match self.reason {
            Some(reason) => {
                out.push(GenerationEvent::Finished {
                    reason,
                    usage: self.usage,
                });
                Ok(())
            }
            None => Err(ProviderError::Protocol(
                "stream ended without a finish reason".to_string(),
            )),
        }
    }
}
