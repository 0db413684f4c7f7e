//! llama.cpp server provider (`kind = "llama-cpp"`) against local servers: `/infill`, `/completion` and chat
//! request shapes, the native stream format, and a model without FIM tokens.

mod common;

use ai_engine::config::{FimMode, ProviderKind};
use ai_engine::provider::llama_cpp::LlamaCppProvider;
use ai_engine::provider::{
    provider_from_profile, ContextChunk, GenerationEvent, Provider, ProviderError, StopReason,
    TokenUsage,
};
use common::*;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn sse(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.to_string(), "text/event-stream")
}

fn chunk(text: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"index": 0, "content": text, "stop": false})
    )
}

fn last_chunk(stop_type: &str) -> String {
    format!(
        "data: {}\n\n",
        json!({"index": 0, "content": "", "stop": true, "stop_type": stop_type,
            "tokens_evaluated": 31, "tokens_predicted": 3})
    )
}

/// llama.cpp's error for `/infill` on a model whose vocabulary has no FIM tokens.
fn no_fim_tokens() -> ResponseTemplate {
    ResponseTemplate::new(501).set_body_json(json!({"error": {
        "code": 501,
        "message": "Infill is not supported by this model: prefix token is missing. suffix token is missing. middle token is missing. ",
        "type": "not_supported_error"
    }}))
}

fn provider(base: &str, fim: FimMode) -> LlamaCppProvider {
    let mut prof = profile(ProviderKind::LlamaCpp, base, "qwen2.5-coder-1.5b");
    prof.api_key = None;
    prof.fim = fim;
    LlamaCppProvider::from_profile(&prof).unwrap()
}

async fn bodies(server: &MockServer) -> Vec<(String, Value)> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| (r.url.path().to_string(), r.body_json().unwrap()))
        .collect()
}

#[tokio::test]
async fn fim_goes_to_infill_with_extra_context_and_the_cursor_line_as_prompt() {
    let server = MockServer::start().await;
    let body = chunk("a") + &chunk(" + b") + &last_chunk("limit");
    Mock::given(method("POST"))
        .and(path("/infill"))
        .respond_with(sse(&body))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri(), FimMode::Auto);
    assert_eq!(p.kind(), "llama-cpp");
    assert!(p.supports_native_fim());
    let mut request = fim_with_fallback(
        "import math\ndef add(a, b):\n    return ",
        "\n\nprint(add(1, 2))\n",
        "<|fim_prefix|>unused",
        &["<|endoftext|>"],
    );
    request.extra_context = vec![ContextChunk {
        path: "src/util.py".to_string(),
        text: "def sub(a, b):\n    return a - b\n".to_string(),
    }];
    let events = collect(p.generate(request)).await;
    assert_eq!(text(&events), "a + b");
    assert_eq!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Length,
            usage: TokenUsage {
                prompt_tokens: 31,
                completion_tokens: 3
            }
        }
    );
    let sent = bodies(&server).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].1,
        json!({
            "input_prefix": "import math\ndef add(a, b):\n",
            "prompt": "    return ",
            "input_suffix": "\n\nprint(add(1, 2))\n",
            "input_extra": [{"filename": "src/util.py", "text": "def sub(a, b):\n    return a - b\n"}],
            "n_predict": 64,
            "temperature": 0.2f32,
            "cache_prompt": true,
            "stream": true,
            "t_max_predict_ms": 2000,
        })
    );
}

#[tokio::test]
async fn a_prefix_without_newline_is_all_prompt_and_no_extra_context_is_an_empty_list() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/infill"))
        .respond_with(sse(&(chunk("1") + &last_chunk("eos"))))
        .mount(&server)
        .await;
    let p = provider(&server.uri(), FimMode::Auto);
    let mut request = fim("x = ", "\n");
    request.stop = vec!["\n\n".to_string()];
    let events = collect(p.generate(request)).await;
    assert_eq!(text(&events), "1");
    let (_, body) = &bodies(&server).await[0];
    assert_eq!(body["input_prefix"], "");
    assert_eq!(body["prompt"], "x = ");
    assert_eq!(body["input_extra"], json!([]));
    assert_eq!(body["stop"], json!(["\n\n"]));
    assert!(
        body.get("t_max_predict_ms").is_none(),
        "only completion requests carry a time limit"
    );
    assert!(body.get("suffix").is_none());
}

#[tokio::test]
async fn model_without_fim_tokens_falls_back_to_completion_once_and_says_so() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/infill"))
        .respond_with(no_fim_tokens())
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/completion"))
        .respond_with(sse(&(chunk("a + b") + &last_chunk("eos"))))
        .expect(2)
        .mount(&server)
        .await;
    let logs = LogCapture::start();
    let p = provider(&server.uri(), FimMode::Auto);
    for _ in 0..2 {
        let events = collect(p.generate(fim_with_fallback(
            "def add(a, b):\n    return ",
            "\n",
            "def add(a, b):\n    return ",
            &[],
        )))
        .await;
        assert_eq!(text(&events), "a + b", "{events:?}");
    }
    let sent = bodies(&server).await;
    let paths: Vec<&str> = sent.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(paths, ["/infill", "/completion", "/completion"]);
    assert_eq!(sent[1].1["prompt"], "def add(a, b):\n    return ");
    assert_eq!(sent[1].1["cache_prompt"], true);
    assert!(sent[1].1.get("input_suffix").is_none());
    assert_eq!(
        logs.warnings_with("no fill-in-the-middle tokens"),
        1,
        "one warning: {}",
        logs.text()
    );
}

#[tokio::test]
async fn model_without_fim_tokens_in_native_mode_is_a_clear_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/infill"))
        .respond_with(no_fim_tokens())
        .mount(&server)
        .await;
    let p = provider(&server.uri(), FimMode::Native);
    let events = collect(p.generate(fim_with_fallback("a", "b", "a", &[]))).await;
    let error = last_error(&events);
    let message = error.to_string();
    assert!(matches!(error, ProviderError::BadRequest(_)), "{error:?}");
    assert!(
        message.contains("no fill-in-the-middle tokens"),
        "{message}"
    );
    assert!(message.contains("fim = \"template\""), "{message}");
    assert!(message.contains("Infill is not supported"), "{message}");
    assert_eq!(
        bodies(&server).await.len(),
        1,
        "no fallback request in native mode"
    );
}

#[tokio::test]
async fn raw_prompts_use_completion_and_chat_uses_the_openai_endpoint() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/completion"))
        .respond_with(sse(&(chunk("x") + &last_chunk("word"))))
        .expect(1)
        .mount(&server)
        .await;
    let chat_body = format!(
        "data: {}\n\ndata: {}\n\ndata: [DONE]\n\n",
        json!({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": null}]}),
        json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    );
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(sse(&chat_body))
        .expect(1)
        .mount(&server)
        .await;
    // A base URL ending in /v1 still reaches the root endpoints, and chat is not doubled to /v1/v1.
    let p = provider(&format!("{}/v1/", server.uri()), FimMode::Auto);
    assert_eq!(
        text(&collect(p.generate(raw("<|fim_prefix|>a"))).await),
        "x"
    );
    assert_eq!(
        text(&collect(p.generate(chat(Some("be brief"), "hello"))).await),
        "hi"
    );
    let sent = bodies(&server).await;
    assert_eq!(
        sent[0].1,
        json!({"prompt": "<|fim_prefix|>a", "n_predict": 64, "temperature": 0.2f32,
            "cache_prompt": true, "stream": true})
    );
    assert_eq!(sent[1].0, "/v1/chat/completions");
    assert_eq!(
        sent[1].1["messages"],
        json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}])
    );
}

#[tokio::test]
async fn errors_inside_the_stream_and_truncated_streams_fail_clearly() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/infill"))
        .respond_with(sse(&(chunk("a")
            + "data: {\"error\":{\"code\":500,\"message\":\"context overflow\",\"type\":\"server_error\"}}\n\n")))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/completion"))
        .respond_with(sse(&chunk("partial")))
        .mount(&server)
        .await;
    let p = provider(&server.uri(), FimMode::Auto);
    let events = collect(p.generate(fim("a", "b"))).await;
    assert_eq!(text(&events), "a");
    assert!(last_error(&events).to_string().contains("context overflow"));
    let events = collect(p.generate(raw("x"))).await;
    assert_eq!(text(&events), "partial");
    assert!(matches!(last_error(&events), ProviderError::Protocol(m) if m.contains("final")));
}

#[test]
fn the_factory_builds_a_llama_cpp_provider_without_a_key() {
    let mut prof = profile(ProviderKind::LlamaCpp, "http://127.0.0.1:8080", "any");
    prof.api_key = None;
    let p = provider_from_profile(&prof).unwrap();
    assert_eq!(p.kind(), "llama-cpp");
    assert_eq!(p.model(), "any");
    assert_eq!(
        ProviderKind::LlamaCpp.default_base_url(),
        Some("http://127.0.0.1:8080")
    );
}
