//! llama.cpp server provider (`kind = "llama-cpp"`): FIM on `/infill`, raw prompts on `/completion`, chat on the
//! OpenAI-compatible `/v1/chat/completions`; SSE streams.

use std::sync::Arc;

use serde_json::{json, Value};

use super::fim::{or_fallback, FallbackStream, NativeFimState};
use super::http::{
    error_stream, expect_kind, generation_stream, parse_json, EventStream, FinalChunk,
    FrameDecoder, Framing, HttpEndpoint,
};
use super::openai_wire::{bearer_auth, chat_completions_body, stream_error, OpenAiDecoder};
use super::{
    ContextChunk, GenerationEvent, GenerationRequest, Prompt, Provider, ProviderError, StopReason,
    TokenUsage,
};
use crate::config::{ConfigError, FimMode, ProfileConfig, ProviderKind};

/// Completion requests ask the server to stop predicting this long after the first generated newline
/// (`t_max_predict_ms`), so a slow model cannot hold a keystroke's answer for long.
pub const COMPLETION_PREDICT_LIMIT_MS: u64 = 2_000;

/// llama.cpp's `llama-server` (default `http://127.0.0.1:8080`; an API key, when set with `--api-key`, goes as
/// a bearer token).
///
/// A FIM prompt goes to `/infill`, which applies the model's own FIM and repository tokens: `input_prefix` holds
/// the prefix up to the cursor line's start, `prompt` the cursor line's text before the cursor (so the
/// server's prompt cache keeps the lines above while the user types), `input_suffix` the suffix and
/// `input_extra` the request's [`ContextChunk`]s. A model without FIM tokens makes `/infill` fail; with
/// `fim = "auto"` the same request then goes to `/completion` as the request's fallback prompt (logged once),
/// with `fim = "native"` it fails with a message saying what to change.
#[derive(Debug)]
pub struct LlamaCppProvider {
    endpoint: Arc<HttpEndpoint>,
    profile: ProfileConfig,
    native_fim: Arc<NativeFimState>,
}

impl LlamaCppProvider {
    /// Builds the provider from a `llama-cpp` profile.
    pub fn from_profile(profile: &ProfileConfig) -> Result<Self, ConfigError> {
        expect_kind(profile, &[ProviderKind::LlamaCpp])?;
        // `/infill` and `/completion` live at the server root; a base URL ending in `/v1` (natural for the
        // OpenAI-compatible part) would put them under it.
        let mut profile = profile.clone();
        if let Some(root) = profile
            .effective_base_url()
            .map(|base| base.trim_end_matches('/'))
            .and_then(|base| base.strip_suffix("/v1"))
        {
            profile.base_url = Some(root.to_string());
        }
        let endpoint = HttpEndpoint::new(&profile, bearer_auth, &[])?;
        Ok(Self {
            endpoint: Arc::new(endpoint),
            profile,
            native_fim: Arc::default(),
        })
    }
}

impl Provider for LlamaCppProvider {
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
        match &request.prompt {
            Prompt::FillInTheMiddle { prefix, suffix, .. } => {
                self.fill_in_the_middle(&request, prefix, suffix)
            }
            Prompt::Raw(text) => completion_stream(&self.endpoint, &self.profile, &request, text),
            Prompt::Chat { system, messages } => {
                let body =
                    chat_completions_body(&self.profile, &request, system.as_deref(), messages);
                tracing::debug!(profile = %self.profile.name, "starting llama.cpp chat generation");
                let http_request = self.endpoint.post_json("/v1/chat/completions", &body);
                let decoder = OpenAiDecoder::new(Arc::clone(&self.endpoint), true);
                generation_stream(
                    Arc::clone(&self.endpoint),
                    http_request,
                    Framing::Sse,
                    decoder,
                )
            }
        }
    }
}

impl LlamaCppProvider {
    fn fill_in_the_middle(
        &self,
        request: &GenerationRequest,
        prefix: &str,
        suffix: &str,
    ) -> EventStream {
        let fallback = request
            .fim_fallback()
            .filter(|_| self.profile.fim != FimMode::Native)
            .cloned();
        if let Some(fallback) = fallback.as_ref().filter(|_| self.native_fim.refused()) {
            return completion_stream(
                &self.endpoint,
                &self.profile,
                &request.with_fallback(fallback),
                &fallback.prompt,
            );
        }
        let body = infill_body(&self.profile, request, prefix, suffix);
        tracing::debug!(profile = %self.profile.name, extra = request.extra_context.len(), "starting llama.cpp infill");
        let http_request = self.endpoint.post_json("/infill", &body);
        let decoder = LlamaCppDecoder::new(Arc::clone(&self.endpoint));
        let primary = generation_stream(
            Arc::clone(&self.endpoint),
            http_request,
            Framing::Sse,
            decoder,
        );

        let endpoint = Arc::clone(&self.endpoint);
        let profile = self.profile.clone();
        let native_fim = Arc::clone(&self.native_fim);
        let request = request.clone();
        let on_missing_tokens: FallbackStream = Box::new(move |error: &ProviderError| {
            let reason = format!("this model has no fill-in-the-middle tokens ({error})");
            match fallback {
                Some(fallback) => {
                    native_fim.refuse(&profile.name, &reason, &fallback.description);
                    completion_stream(&endpoint, &profile, &request.with_fallback(&fallback), &fallback.prompt)
                }
                None => error_stream(ProviderError::BadRequest(format!(
                    "{reason}; set fim = \"template\" with a fim_template, fim = \"none\", or serve a FIM model \
                     (e.g. Qwen2.5-Coder base)"
                ))),
            }
        });
        or_fallback(primary, is_missing_fim_tokens, Some(on_missing_tokens))
    }
}

/// llama.cpp's answer to `/infill` on a model whose vocabulary lacks FIM tokens
/// ("Infill is not supported by this model: prefix token is missing. ...", HTTP 501).
fn is_missing_fim_tokens(error: &ProviderError) -> bool {
    match error {
        ProviderError::BadRequest(message)
        | ProviderError::Server(message)
        | ProviderError::Protocol(message) => message
            .to_ascii_lowercase()
            .contains("infill is not supported"),
        _ => false,
    }
}

/// The sampling and streaming fields `/infill` and `/completion` share.
fn native_body(profile: &ProfileConfig, request: &GenerationRequest) -> Value {
    let (max_tokens, temperature) = HttpEndpoint::sampling(profile, request);
    let mut body = json!({
        "n_predict": max_tokens,
        "temperature": temperature,
        "cache_prompt": true,
        "stream": true,
    });
    if !request.stop.is_empty() {
        body["stop"] = json!(request.stop);
    }
    if request.completion.is_some() {
        body["t_max_predict_ms"] = json!(COMPLETION_PREDICT_LIMIT_MS);
    }
    body
}

/// The `/infill` request body.
pub fn infill_body(
    profile: &ProfileConfig,
    request: &GenerationRequest,
    prefix: &str,
    suffix: &str,
) -> Value {
    let line_start = prefix.rfind('\n').map_or(0, |i| i + 1);
    let mut body = native_body(profile, request);
    body["input_prefix"] = json!(&prefix[..line_start]);
    body["prompt"] = json!(&prefix[line_start..]);
    body["input_suffix"] = json!(suffix);
    body["input_extra"] = json!(request
        .extra_context
        .iter()
        .map(|ContextChunk { path, text }| json!({"filename": path, "text": text}))
        .collect::<Vec<_>>());
    body
}

/// A raw prompt on `/completion`.
fn completion_stream(
    endpoint: &Arc<HttpEndpoint>,
    profile: &ProfileConfig,
    request: &GenerationRequest,
    prompt: &str,
) -> EventStream {
    let mut body = native_body(profile, request);
    body["prompt"] = json!(prompt);
    tracing::debug!(profile = %profile.name, "starting llama.cpp completion");
    let http_request = endpoint.post_json("/completion", &body);
    let decoder = LlamaCppDecoder::new(Arc::clone(endpoint));
    generation_stream(Arc::clone(endpoint), http_request, Framing::Sse, decoder)
}

/// Decodes llama.cpp's native stream: `data: {"content": "...", "stop": false}` chunks, then one with
/// `"stop": true`, `stop_type` (`eos`, `word`, `limit`) and token counts.
/// llama.cpp's last chunk: `"stop": true`, `stop_type` (`eos`, `word`, `limit`), token counts.
const LLAMA_CPP_FINAL: FinalChunk = FinalChunk {
    flag: "stop",
    reason: "stop_type",
    length_reason: "limit",
    prompt_tokens: "tokens_evaluated",
    completion_tokens: "tokens_predicted",
};

struct LlamaCppDecoder {
    endpoint: Arc<HttpEndpoint>,
}

impl LlamaCppDecoder {
    fn new(endpoint: Arc<HttpEndpoint>) -> Self {
        Self { endpoint }
    }
}

impl FrameDecoder for LlamaCppDecoder {
    fn frame(
        &mut self,
        _event: &str,
        data: &str,
        out: &mut Vec<GenerationEvent>,
    ) -> Result<bool, ProviderError> {
        let data = data.trim();
        if data.is_empty() {
            return Ok(false);
        }
        if data == "[DONE]" {
            out.push(GenerationEvent::Finished {
                reason: StopReason::Stop,
                usage: TokenUsage::default(),
            });
            return Ok(true);
        }
        let chunk: Value = parse_json("llama.cpp", data)?;
        if let Some(error) = chunk.get("error") {
            return Err(stream_error(&self.endpoint, error));
        }
        if let Some(text) = chunk
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            out.push(GenerationEvent::Text(text.to_string()));
        }
        if let Some(finished) = LLAMA_CPP_FINAL.event(&chunk) {
            out.push(finished);
            return Ok(true);
        }
        Ok(false)
    }

    fn end(&mut self, _out: &mut Vec<GenerationEvent>) -> Result<(), ProviderError> {
        Err(ProviderError::Protocol(
            "llama.cpp stream ended before its final (`stop: true`) chunk".to_string(),
        ))
    }
}
