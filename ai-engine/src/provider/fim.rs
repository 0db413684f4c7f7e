//! Native fill-in-the-middle across servers: which servers honour a `suffix`, what a rejection looks like, and
//! the switch to the request's fallback prompt (learned per provider, logged once).

use std::sync::atomic::{AtomicBool, Ordering};

use futures::stream::{self, StreamExt};
use reqwest::Url;

use super::http::EventStream;
use super::ProviderError;

/// True for OpenAI-compatible `/v1/completions` servers known to use a `suffix` field: OpenAI, DeepSeek's beta
/// base URL and Mistral. Every other server (llama.cpp drops it silently, vLLM rejects it, LM Studio, unknown
/// hosts) gets the template instead in `fim = "auto"`.
pub fn honours_native_suffix(base_url: &Url) -> bool {
    let host = base_url
        .host_str()
        .unwrap_or_default()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    match host.as_str() {
        "api.openai.com" => true,
        "api.deepseek.com" => base_url.path().trim_end_matches('/').ends_with("/beta"),
        "api.mistral.ai" | "codestral.mistral.ai" => true,
        _ => false,
    }
}

/// True when `error` is a server refusing the request's native FIM field (`suffix`, Ollama's "does not support
/// insert").
pub fn is_suffix_rejection(error: &ProviderError) -> bool {
    match error {
        ProviderError::BadRequest(message) | ProviderError::Server(message) => {
            let lower = message.to_ascii_lowercase();
            lower.contains("suffix") || lower.contains("insert")
        }
        _ => false,
    }
}

/// What a provider learned about its server's native FIM: once the server refused it, every later request goes
/// straight to the fallback, and the warning is logged once.
#[derive(Debug, Default)]
pub struct NativeFimState {
    refused: AtomicBool,
}

impl NativeFimState {
    /// True once the server refused native FIM.
    pub fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }

    /// Records a refusal; the first one is logged as a warning naming the reason and what is used instead.
    pub fn refuse(&self, profile: &str, reason: &str, instead: &str) {
        if !self.refused.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                profile,
                "native fill-in-the-middle does not work on this server ({reason}); using {instead} from now on"
            );
        }
    }
}

/// A fallback stream, built from the error that caused it.
pub type FallbackStream = Box<dyn FnOnce(&ProviderError) -> EventStream + Send>;

/// Runs `primary`; when it fails before producing anything with an error `is_refusal` accepts, continues with
/// `fallback(error)` instead, so the same request still succeeds. Without a fallback the error passes through.
pub fn or_fallback(
    mut primary: EventStream,
    is_refusal: fn(&ProviderError) -> bool,
    fallback: Option<FallbackStream>,
) -> EventStream {
    stream::once(async move {
        match primary.next().await {
            Some(Err(error)) if is_refusal(&error) => match fallback {
                Some(fallback) => fallback(&error),
                None => stream::iter([Err(error)]).boxed(),
            },
            Some(first) => stream::iter([first]).chain(primary).boxed(),
            None => stream::empty().boxed(),
        }
    })
    .flatten()
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_servers_get_a_native_suffix() {
        let cases = [
            ("https://api.openai.com", true),
            ("https://api.openai.com/v1", true),
            ("https://api.deepseek.com/beta", true),
            ("https://api.deepseek.com", false),
            ("https://api.mistral.ai/v1", true),
            ("http://127.0.0.1:8080", false),
            ("http://localhost:8000/v1", false),
            ("http://localhost:1234/v1", false),
            ("https://openrouter.ai/api/v1", false),
            ("https://api.openai.com.evil.example", false),
        ];
        for (url, expected) in cases {
            let url = Url::parse(url).unwrap();
            assert_eq!(honours_native_suffix(&url), expected, "{url}");
        }
    }

    #[test]
    fn suffix_rejections_are_recognised() {
        assert!(is_suffix_rejection(&ProviderError::BadRequest(
            "HTTP 400: suffix is not currently supported".into()
        )));
        assert!(is_suffix_rejection(&ProviderError::BadRequest(
            "HTTP 400: registry.ollama.ai/library/llama3 does not support insert".into()
        )));
        assert!(!is_suffix_rejection(&ProviderError::BadRequest(
            "HTTP 400: max_tokens too large".into()
        )));
        assert!(!is_suffix_rejection(&ProviderError::Auth("suffix".into())));
    }
}
