//! Mistral/Codestral provider: native FIM on `/v1/fim/completions`, chat on `/v1/chat/completions`, SSE streams.

use std::sync::Arc;

use serde_json::json;

use super::http::{expect_kind, generation_stream, EventStream, Framing, HttpEndpoint};
use super::openai_wire::{bearer_auth, chat_messages, OpenAiDecoder};
use super::{GenerationRequest, Prompt, Provider};
use crate::config::{ConfigError, ProfileConfig, ProviderKind};

/// Codestral-style models. FIM and raw prompts (a prefix with an empty suffix) use `/v1/fim/completions`;
/// chat prompts use the OpenAI-compatible `/v1/chat/completions`. Needs an API key (default env `MISTRAL_API_KEY`).
#[derive(Debug)]
pub struct MistralProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
}

impl MistralProvider {
    /// Builds the provider from a `mistral-fim` profile.
    pub fn from_profile(profile: &ProfileConfig) -> Result<Self, ConfigError> {
        expect_kind(profile, &[ProviderKind::MistralFim])?;
        let endpoint = HttpEndpoint::new(profile, bearer_auth, &[])?;
        Ok(Self {
            endpoint: Arc::new(endpoint),
            profile: profile.clone(),
        })
    }
}

impl Provider for MistralProvider {
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
        let mut body = HttpEndpoint::streaming_body(&self.profile, &request);
        let path = match &request.prompt {
            Prompt::FillInTheMiddle { prefix, suffix, .. } => {
                body["prompt"] = json!(prefix);
                body["suffix"] = json!(suffix);
                "/v1/fim/completions"
            }
            Prompt::Raw(text) => {
                body["prompt"] = json!(text);
                "/v1/fim/completions"
            }
            Prompt::Chat { system, messages } => {
                body["messages"] = json!(chat_messages(system.as_deref(), messages));
                "/v1/chat/completions"
            }
        };
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        tracing::debug!(profile = %self.profile.name, path, max_tokens = %body["max_tokens"], "starting Mistral generation");
        let http_request = self.endpoint.post_json(path, &body);
        // FIM streams carry chat-style `delta.content` chunks too.
        let decoder = OpenAiDecoder::new(Arc::clone(&self.endpoint), true);
        generation_stream(
            Arc::clone(&self.endpoint),
            http_request,
            Framing::Sse,
            decoder,
        )
    }
}
