//! OpenAI-compatible provider: `/v1/chat/completions` and `/v1/completions` (native FIM via `suffix`), SSE streams.

use std::sync::Arc;

use serde_json::json;

use super::fim::{
    honours_native_suffix, is_suffix_rejection, or_fallback, FallbackStream, NativeFimState,
};
use super::http::{
    error_stream, expect_kind, generation_stream, EventStream, Framing, HttpEndpoint,
};
use super::openai_wire::{bearer_auth, chat_completions_body, OpenAiDecoder};
use super::{ChatRole, ChatTurn, GenerationRequest, Prompt, Provider, ProviderError};
use crate::config::{ConfigError, FimMode, ProfileConfig, ProviderKind};

/// A provider speaking the OpenAI HTTP API (OpenAI, llama.cpp server, vLLM, LM Studio, OpenRouter, ...).
///
/// Kind `openai-chat` sends every prompt to `/v1/chat/completions` (a raw prompt becomes one user turn) and has
/// no native FIM. Kind `openai-completions` sends raw and FIM prompts to `/v1/completions` and chat prompts to
/// `/v1/chat/completions`; a FIM prompt gets the native `suffix` only on servers that honour it
/// ([`honours_native_suffix`], or `fim = "native"`), and the request's fallback prompt everywhere else.
#[derive(Debug)]
pub struct OpenAiProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
    native_fim: Arc<NativeFimState>,
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
            native_fim: Arc::default(),
        })
    }
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
        match (&request.prompt, completions) {
            (Prompt::Raw(text), true) => self.completion(&request, text, None),
            (Prompt::FillInTheMiddle { prefix, suffix, .. }, true) => {
                self.fill_in_the_middle(&request, prefix, suffix)
            }
            (Prompt::FillInTheMiddle { .. }, false) => error_stream(ProviderError::BadRequest(format!(
                "profile `{}` (openai-chat) has no native fill-in-the-middle; use a FIM template or openai-completions",
                self.profile.name
            ))),
            (Prompt::Raw(text), false) => {
                let turn = ChatTurn {
                    role: ChatRole::User,
                    content: text.clone(),
                };
                self.chat(&request, None, std::slice::from_ref(&turn))
            }
            (Prompt::Chat { system, messages }, _) => {
                self.chat(&request, system.as_deref(), messages)
            }
        }
    }
}

impl OpenAiProvider {
    fn chat(
        &self,
        request: &GenerationRequest,
        system: Option<&str>,
        turns: &[ChatTurn],
    ) -> EventStream {
        let body = chat_completions_body(&self.profile, request, system, turns);
        self.stream("/v1/chat/completions", &body, true)
    }

    /// A `/v1/completions` request for `prompt`, with a native `suffix` when given.
    fn completion(
        &self,
        request: &GenerationRequest,
        prompt: &str,
        suffix: Option<&str>,
    ) -> EventStream {
        let mut body = HttpEndpoint::streaming_body(&self.profile, request);
        body["stream_options"] = json!({"include_usage": true});
        body["prompt"] = json!(prompt);
        if let Some(suffix) = suffix {
            body["suffix"] = json!(suffix);
        }
        if !request.stop.is_empty() {
            body["stop"] = json!(request.stop);
        }
        self.stream("/v1/completions", &body, false)
    }

    /// Native `suffix` only where the server honours it (or `fim = "native"` says so) and has not refused it;
    /// otherwise the request's fallback (the family template or the prefix alone). A server that answers 400 to
    /// the suffix gets the same request again as the fallback, and never the suffix again.
    fn fill_in_the_middle(
        &self,
        request: &GenerationRequest,
        prefix: &str,
        suffix: &str,
    ) -> EventStream {
        let wanted = match self.profile.fim {
            FimMode::Native => true,
            _ => honours_native_suffix(self.endpoint.base_url()),
        };
        let fallback = request.fim_fallback().cloned();
        if !wanted || self.native_fim.refused() {
            return match &fallback {
                Some(fallback) => {
                    let fallback_request = request.with_fallback(fallback);
                    self.completion(&fallback_request, &fallback.prompt, None)
                }
                None => self.completion(request, prefix, None),
            };
        }
        let primary = self.completion(request, prefix, Some(suffix));
        let fallback_stream = fallback.map(|fallback| {
            let endpoint = Arc::clone(&self.endpoint);
            let profile = self.profile.clone();
            let native_fim = Arc::clone(&self.native_fim);
            let fallback_request = request.with_fallback(&fallback);
            Box::new(move |error: &ProviderError| {
                native_fim.refuse(&profile.name, &error.to_string(), &fallback.description);
                let this = OpenAiProvider {
                    endpoint,
                    profile,
                    native_fim,
                };
                this.completion(&fallback_request, &fallback.prompt, None)
            }) as FallbackStream
        });
        or_fallback(primary, is_suffix_rejection, fallback_stream)
    }

    fn stream(&self, path: &str, body: &serde_json::Value, chat: bool) -> EventStream {
        tracing::debug!(profile = %self.profile.name, path, "starting OpenAI-compatible generation");
        let http_request = self.endpoint.post_json(path, body);
        let decoder = OpenAiDecoder::new(Arc::clone(&self.endpoint), chat);
        generation_stream(
            Arc::clone(&self.endpoint),
            http_request,
            Framing::Sse,
            decoder,
        )
    }
}
