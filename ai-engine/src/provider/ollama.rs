//! Ollama provider: `/api/generate` (raw prompts, native FIM via `suffix`) and `/api/chat`, NDJSON streams.

use std::sync::Arc;

use serde_json::{json, Value};

use super::http::{
    expect_kind, generation_stream, parse_json, EventStream, FrameDecoder, Framing, HttpEndpoint,
};
use super::openai::{bearer_auth, chat_messages, u32_field};
use super::{
    GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError, StopReason, TokenUsage,
};
use crate::config::{ConfigError, ProfileConfig, ProviderKind};

/// A model served by Ollama (default `http://127.0.0.1:11434`). An API key is optional and sent as a bearer
/// token (for Ollama behind an authenticating proxy).
#[derive(Debug)]
pub struct OllamaProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
}

impl OllamaProvider {
    /// Builds the provider from an `ollama` profile.
    pub fn from_profile(profile: &ProfileConfig) -> Result<Self, ConfigError> {
        expect_kind(profile, &[ProviderKind::Ollama])?;
        let endpoint = HttpEndpoint::new(profile, bearer_auth, &[])?;
        Ok(Self {
            endpoint: Arc::new(endpoint),
            profile: profile.clone(),
        })
    }
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
        let (max_tokens, temperature) = HttpEndpoint::sampling(&self.profile, &request);
        let mut options = json!({"num_predict": max_tokens, "temperature": temperature});
        if !request.stop.is_empty() {
            options["stop"] = json!(request.stop);
        }
        let mut body = json!({"model": self.profile.model, "stream": true, "options": options});
        let path = match &request.prompt {
            Prompt::Raw(text) => {
                body["prompt"] = json!(text);
                body["raw"] = json!(true);
                "/api/generate"
            }
            Prompt::FillInTheMiddle { prefix, suffix } => {
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
        tracing::debug!(profile = %self.profile.name, path, max_tokens, "starting Ollama generation");
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
}

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
        if line.get("done").and_then(Value::as_bool) == Some(true) {
            let reason = match line.get("done_reason").and_then(Value::as_str) {
                Some("length") => StopReason::Length,
                _ => StopReason::Stop,
            };
            out.push(GenerationEvent::Finished {
                reason,
                usage: TokenUsage {
                    prompt_tokens: u32_field(&line, "prompt_eval_count"),
                    completion_tokens: u32_field(&line, "eval_count"),
                },
            });
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
