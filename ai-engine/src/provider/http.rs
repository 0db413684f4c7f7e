//! Shared HTTP plumbing for the streaming providers: one client per profile, status mapping, idle timeouts and framing.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{RequestBuilder, Response, StatusCode, Url};

use super::{GenerationEvent, GenerationRequest, ProviderError, StopReason, TokenUsage};
use crate::config::{ApiKey, ConfigError, ProfileConfig, ProviderKind};

/// The stream type every provider returns.
pub type EventStream = BoxStream<'static, Result<GenerationEvent, ProviderError>>;

/// Most bytes of an error response body that are read to build the error message.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// Most characters of a server's error message kept in a [`ProviderError`].
const MAX_ERROR_MESSAGE: usize = 400;

/// An HTTP client bound to one profile: base URL, auth headers, timeouts, proxy policy.
#[derive(Debug)]
pub struct HttpEndpoint {
    client: reqwest::Client,
    base_url: Url,
    api_key: Option<ApiKey>,
    idle_timeout: Duration,
    profile: String,
}

impl HttpEndpoint {
    /// Builds the client for `profile`. `auth` turns the key (if any) into request headers; returned header values
    /// are marked sensitive so they never show in debug output.
    pub fn new(
        profile: &ProfileConfig,
        auth: impl FnOnce(&ApiKey) -> Vec<(HeaderName, String)>,
        extra_headers: &[(HeaderName, &str)],
    ) -> Result<Self, ConfigError> {
        let base = profile
            .effective_base_url()
            .ok_or_else(|| ConfigError::profile(&profile.name, "no base_url"))?;
        let base_url = Url::parse(base).map_err(|e| {
            ConfigError::profile(&profile.name, format!("base_url is not a valid URL: {e}"))
        })?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(ConfigError::profile(
                &profile.name,
                "base_url must start with http:// or https://",
            ));
        }
        let api_key = profile.resolve_api_key();
        if api_key.is_none() && profile.kind.requires_api_key() {
            let hint = match (&profile.api_key_file, profile.effective_api_key_env()) {
                (Some(file), _) => format!("write the key to {} (chmod 600)", file.display()),
                (None, Some(var)) => format!(
                    "set api_key_file, or the environment variable {var} and restart the engine (`ai-engine stop`)"
                ),
                (None, None) => "set api_key_file or api_key_env".to_string(),
            };
            return Err(ConfigError::profile(
                &profile.name,
                format!("no API key for a `{}` profile: {hint}", profile.kind),
            ));
        }

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in extra_headers {
            let value = HeaderValue::from_str(value).map_err(|_| {
                ConfigError::profile(&profile.name, format!("invalid value for header {name}"))
            })?;
            headers.insert(name.clone(), value);
        }
        if let Some(key) = &api_key {
            for (name, value) in auth(key) {
                let mut value = HeaderValue::from_str(&value).map_err(|_| {
                    ConfigError::profile(
                        &profile.name,
                        "the API key contains characters that cannot be sent in an HTTP header",
                    )
                })?;
                value.set_sensitive(true);
                headers.insert(name, value);
            }
        }

        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("lapce-ai/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .connect_timeout(profile.connect_timeout)
            .timeout(profile.request_timeout);
        if is_loopback(&base_url) {
            // Proxies from HTTPS_PROXY/HTTP_PROXY never apply to a server on this machine.
            builder = builder.no_proxy();
        }
        let client = builder.build().map_err(|e| {
            ConfigError::profile(&profile.name, format!("cannot build the HTTP client: {e}"))
        })?;
        Ok(Self {
            client,
            base_url,
            api_key,
            idle_timeout: profile.idle_timeout,
            profile: profile.name.clone(),
        })
    }

    /// The profile this endpoint belongs to.
    pub fn profile(&self) -> &str {
        &self.profile
    }

    /// The base URL, e.g. `http://127.0.0.1:8080`.
    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// `base_url` + `path`. A base URL that already ends in the path's first segment (e.g. `.../v1` for
    /// `/v1/completions`) does not get it twice.
    pub fn url(&self, path: &str) -> String {
        let base = self.base_url.as_str().trim_end_matches('/');
        let first_segment_end = path
            .get(1..)
            .and_then(|rest| rest.find('/'))
            .map(|i| i + 1)
            .unwrap_or(path.len());
        let first = &path[..first_segment_end];
        if first.len() > 1 && first_segment_end < path.len() && base.ends_with(first) {
            format!("{base}{}", &path[first_segment_end..])
        } else {
            format!("{base}{path}")
        }
    }

    /// A POST of a JSON body to `path`.
    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> RequestBuilder {
        self.client.post(self.url(path)).body(body.to_string())
    }

    /// Sends `request` and checks its status; errors are classified [`ProviderError`]s.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, ProviderError> {
        let response = match tokio::time::timeout(self.idle_timeout, request.send()).await {
            Err(_) => {
                return Err(ProviderError::Protocol(format!(
                    "stream stalled: no response from {} within {} ms",
                    self.origin(),
                    self.idle_timeout.as_millis()
                )))
            }
            Ok(Err(e)) => return Err(self.map_reqwest_error(&e)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let retry_after_secs = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let body = self.read_error_body(response).await;
        let message = self.error_message(status, &body);
        tracing::debug!(profile = %self.profile, %status, "provider returned an error status");
        Err(match status.as_u16() {
            400 | 413 | 422 => ProviderError::BadRequest(message),
            401 => ProviderError::Auth(message),
            403 => ProviderError::Forbidden(message),
            404 => ProviderError::NotFound(message),
            408 | 504 => ProviderError::Unreachable(message),
            429 => ProviderError::RateLimited {
                retry_after_secs,
                message,
            },
            500..=599 => ProviderError::Server(message),
            _ => ProviderError::Protocol(message),
        })
    }

    async fn read_error_body(&self, response: Response) -> Vec<u8> {
        let mut body = Vec::new();
        let mut chunks = response.bytes_stream();
        while body.len() < MAX_ERROR_BODY {
            match tokio::time::timeout(self.idle_timeout, chunks.next()).await {
                Ok(Some(Ok(chunk))) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(MAX_ERROR_BODY);
        body
    }

    /// `HTTP 401: <server message>`, with the key redacted should the server echo it.
    fn error_message(&self, status: StatusCode, body: &[u8]) -> String {
        let text = String::from_utf8_lossy(body);
        let detail = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| json_error_message(&v))
            .unwrap_or_else(|| text.trim().to_string());
        let mut message = format!("HTTP {}", status.as_u16());
        let detail = self.clean(&detail);
        if !detail.is_empty() {
            message.push_str(": ");
            message.push_str(&detail);
        }
        message
    }

    /// Collapses whitespace, truncates and redacts a server-provided message.
    pub(crate) fn clean(&self, message: &str) -> String {
        let mut out = message.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some(key) = &self.api_key {
            if key.expose().len() >= 4 {
                out = out.replace(key.expose(), "***");
            }
        }
        if out.chars().count() > MAX_ERROR_MESSAGE {
            out = out.chars().take(MAX_ERROR_MESSAGE).collect::<String>() + "...";
        }
        out
    }

    fn origin(&self) -> String {
        self.base_url.origin().ascii_serialization()
    }

    fn map_reqwest_error(&self, e: &reqwest::Error) -> ProviderError {
        let mut cause = String::new();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            cause = s.to_string();
            source = s.source();
        }
        let cause = self.clean(&cause);
        let origin = self.origin();
        if e.is_timeout() {
            ProviderError::Unreachable(format!("{origin}: request timed out"))
        } else if e.is_connect() {
            ProviderError::Unreachable(format!("cannot connect to {origin}: {cause}"))
        } else if e.is_body() || e.is_decode() {
            ProviderError::Protocol(format!("{origin}: response body failed: {cause}"))
        } else {
            ProviderError::Unreachable(format!("{origin}: {cause}"))
        }
    }

    /// The response body as chunks; fails with `stream stalled` when nothing arrives for the idle timeout.
    /// Dropping the stream drops the response and so closes the connection.
    pub fn body_stream(
        self: &Arc<Self>,
        response: Response,
    ) -> BoxStream<'static, Result<Bytes, ProviderError>> {
        let endpoint = Arc::clone(self);
        let body = response.bytes_stream().boxed();
        stream::unfold(Some(body), move |body| {
            let endpoint = Arc::clone(&endpoint);
            async move {
                let mut body = body?;
                match tokio::time::timeout(endpoint.idle_timeout, body.next()).await {
                    Err(_) => {
                        tracing::debug!(profile = %endpoint.profile, "provider stream stalled");
                        Some((
                            Err(ProviderError::Protocol(format!(
                                "stream stalled: no data from {} for {} ms",
                                endpoint.origin(),
                                endpoint.idle_timeout.as_millis()
                            ))),
                            None,
                        ))
                    }
                    Ok(None) => None,
                    Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
                    Ok(Some(Err(e))) => Some((Err(endpoint.map_reqwest_error(&e)), None)),
                }
            }
        })
        .boxed()
    }

    /// The request body fields every OpenAI-style streaming API shares: model, token limit, temperature,
    /// `stream: true`.
    pub fn streaming_body(
        profile: &ProfileConfig,
        request: &GenerationRequest,
    ) -> serde_json::Value {
        let (max_tokens, temperature) = Self::sampling(profile, request);
        serde_json::json!({
            "model": profile.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": true,
        })
    }

    /// The effective `(max_tokens, temperature)`: the profile caps tokens and overrides the temperature.
    pub fn sampling(profile: &ProfileConfig, request: &GenerationRequest) -> (u32, f32) {
        let max_tokens = match profile.max_tokens {
            Some(cap) => request.max_tokens.min(cap),
            None => request.max_tokens,
        };
        (
            max_tokens,
            profile.temperature.unwrap_or(request.temperature),
        )
    }
}

/// The message of a JSON error body in the shapes providers use:
/// `{"error":{"message":..}}`, `{"error":".."}`, `{"message":..}`, `{"detail":..}`, or a list of those.
pub(crate) fn json_error_message(value: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match value {
        Value::Array(items) => items.iter().find_map(json_error_message),
        Value::Object(map) => {
            if let Some(err) = map.get("error") {
                return match err {
                    Value::String(s) => Some(s.clone()),
                    Value::Object(inner) => inner
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .or_else(|| Some(err.to_string())),
                    other => Some(other.to_string()),
                };
            }
            map.get("message").or_else(|| map.get("detail")).map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
        }
        _ => None,
    }
}

fn is_loopback(url: &Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            host == "localhost" || host.ends_with(".localhost")
        }
    }
}

/// How a response body is cut into frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events (`eventsource-stream`).
    Sse,
    /// Newline-delimited JSON (one frame per non-empty line).
    Ndjson,
}

/// Turns frames of one wire format into [`GenerationEvent`]s.
pub trait FrameDecoder: Send + 'static {
    /// Handles one frame (`event` is the SSE event name, empty for NDJSON). Pushes output to `out`;
    /// returns `true` when the generation is complete (the stream then ends and the connection is dropped).
    fn frame(
        &mut self,
        event: &str,
        data: &str,
        out: &mut Vec<GenerationEvent>,
    ) -> Result<bool, ProviderError>;

    /// The body ended before [`FrameDecoder::frame`] reported completion: emit the final event or fail.
    fn end(&mut self, out: &mut Vec<GenerationEvent>) -> Result<(), ProviderError>;
}

type Frames = BoxStream<'static, Result<(String, String), ProviderError>>;

/// Sends `request` on `endpoint` and decodes the streamed body. Nothing happens until the stream is polled;
/// dropping it at any point aborts the request and closes the connection.
pub fn generation_stream<D: FrameDecoder>(
    endpoint: Arc<HttpEndpoint>,
    request: RequestBuilder,
    framing: Framing,
    decoder: D,
) -> EventStream {
    let start = async move {
        let response = endpoint.send(request).await?;
        let body = endpoint.body_stream(response);
        let frames: Frames = match framing {
            Framing::Sse => sse_frames(body),
            Framing::Ndjson => ndjson_frames(body),
        };
        Ok::<_, ProviderError>(frames)
    };
    stream::once(async move {
        match start.await {
            Ok(frames) => decode_frames(frames, decoder),
            Err(e) => error_stream(e),
        }
    })
    .flatten()
    .boxed()
}

fn sse_frames(body: BoxStream<'static, Result<Bytes, ProviderError>>) -> Frames {
    use eventsource_stream::{EventStreamError, Eventsource};
    body.eventsource()
        .map(|item| match item {
            Ok(event) => Ok((event.event, event.data)),
            Err(EventStreamError::Transport(e)) => Err(e),
            Err(EventStreamError::Utf8(e)) => Err(ProviderError::Protocol(format!(
                "invalid UTF-8 in event stream: {e}"
            ))),
            Err(EventStreamError::Parser(e)) => Err(ProviderError::Protocol(format!(
                "malformed event stream: {e}"
            ))),
        })
        .boxed()
}

fn ndjson_frames(body: BoxStream<'static, Result<Bytes, ProviderError>>) -> Frames {
    struct State {
        body: Option<BoxStream<'static, Result<Bytes, ProviderError>>>,
        buffer: Vec<u8>,
    }
    fn take_line(buffer: &mut Vec<u8>, at_end: bool) -> Option<Vec<u8>> {
        match buffer.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let mut line: Vec<u8> = buffer.drain(..=pos).collect();
                line.pop();
                Some(line)
            }
            None if at_end && !buffer.is_empty() => Some(std::mem::take(buffer)),
            None => None,
        }
    }
    let state = State {
        body: Some(body),
        buffer: Vec::new(),
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(mut line) = take_line(&mut st.buffer, st.body.is_none()) {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let item = String::from_utf8(line)
                    .map(|text| (String::new(), text))
                    .map_err(|e| {
                        ProviderError::Protocol(format!("invalid UTF-8 in JSON line stream: {e}"))
                    });
                return Some((item, st));
            }
            let body = st.body.as_mut()?;
            match body.next().await {
                Some(Ok(chunk)) => st.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    st.body = None;
                    st.buffer.clear();
                    return Some((Err(e), st));
                }
                None => st.body = None,
            }
        }
    })
    .boxed()
}

fn decode_frames<D: FrameDecoder>(frames: Frames, decoder: D) -> EventStream {
    struct State<D> {
        frames: Option<Frames>,
        decoder: D,
        pending: VecDeque<Result<GenerationEvent, ProviderError>>,
    }
    let state = State {
        frames: Some(frames),
        decoder,
        pending: VecDeque::new(),
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.pending.pop_front() {
                return Some((item, st));
            }
            let frames = st.frames.as_mut()?;
            let mut out = Vec::new();
            let result = match frames.next().await {
                Some(Ok((event, data))) => st.decoder.frame(&event, &data, &mut out),
                Some(Err(e)) => Err(e),
                None => st.decoder.end(&mut out).map(|()| true),
            };
            st.pending.extend(out.into_iter().map(Ok));
            match result {
                Ok(false) => {}
                Ok(true) => st.frames = None,
                Err(e) => {
                    st.frames = None;
                    st.pending.push_back(Err(e));
                }
            }
        }
    })
    .boxed()
}

/// A number field as `u32` (0 when absent, saturating when too large).
pub(crate) fn u32_field(value: &serde_json::Value, key: &str) -> u32 {
    value
        .get(key)
        .and_then(serde_json::Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

/// How a JSON-lines or SSE wire format marks its last chunk: a boolean flag, a stop-reason field (and the value
/// that means the token limit), and the token counts.
pub(crate) struct FinalChunk {
    pub flag: &'static str,
    pub reason: &'static str,
    pub length_reason: &'static str,
    pub prompt_tokens: &'static str,
    pub completion_tokens: &'static str,
}

impl FinalChunk {
    /// The `Finished` event when `chunk` has the flag set.
    pub(crate) fn event(&self, chunk: &serde_json::Value) -> Option<GenerationEvent> {
        if chunk.get(self.flag).and_then(serde_json::Value::as_bool) != Some(true) {
            return None;
        }
        let length =
            chunk.get(self.reason).and_then(serde_json::Value::as_str) == Some(self.length_reason);
        Some(GenerationEvent::Finished {
            reason: if length {
                StopReason::Length
            } else {
                StopReason::Stop
            },
            usage: TokenUsage {
                prompt_tokens: u32_field(chunk, self.prompt_tokens),
                completion_tokens: u32_field(chunk, self.completion_tokens),
            },
        })
    }
}

/// Parses one JSON frame, naming the provider in the error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    what: &str,
    data: &str,
) -> Result<T, ProviderError> {
    serde_json::from_str(data)
        .map_err(|e| ProviderError::Protocol(format!("{what}: malformed JSON in stream: {e}")))
}

/// Fails with [`ConfigError::Profile`] unless `profile.kind` is one of `kinds`.
pub(crate) fn expect_kind(
    profile: &ProfileConfig,
    kinds: &[ProviderKind],
) -> Result<(), ConfigError> {
    if kinds.contains(&profile.kind) {
        Ok(())
    } else {
        let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        Err(ConfigError::profile(
            &profile.name,
            format!(
                "kind `{}` cannot be served by this provider (expected {})",
                profile.kind,
                names.join(" or ")
            ),
        ))
    }
}

/// A stream that yields one error (for requests a provider cannot express).
pub(crate) fn error_stream(error: ProviderError) -> EventStream {
    stream::iter([Err(error)]).boxed()
}
