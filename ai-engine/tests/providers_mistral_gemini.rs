//! Mistral FIM and Gemini provider tests against local servers: request shape, SSE streams, errors, cancellation.

mod common;

use std::time::Duration;

use ai_engine::config::{ProfileConfig, ProviderKind};
use ai_engine::provider::gemini::GeminiProvider;
use ai_engine::provider::mistral::MistralProvider;
use ai_engine::provider::{GenerationEvent, Provider, ProviderError, StopReason, TokenUsage};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn sse(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")
}

fn mistral_chunk(text: &str, finish: Option<&str>) -> String {
    let mut chunk = json!({"id": "x", "object": "chat.completion.chunk", "model": "codestral",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]});
    if finish.is_some() {
        chunk["usage"] = json!({"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10});
    }
    format!("data: {chunk}\n\n")
}

fn mistral(base: &str) -> MistralProvider {
    MistralProvider::from_profile(&profile(ProviderKind::MistralFim, base, "codestral-latest"))
        .unwrap()
}

#[tokio::test]
async fn mistral_fim_request_shape_and_stream() {
    let server = MockServer::start().await;
    let body = mistral_chunk("x ", None) + &mistral_chunk("+ 1", Some("stop")) + "data: [DONE]\n\n";
    Mock::given(method("POST"))
        .and(path("/v1/fim/completions"))
        .and(header(
            "authorization",
            format!("Bearer {TEST_KEY}").as_str(),
        ))
        .respond_with(sse(body))
        .expect(1)
        .mount(&server)
        .await;
    let p = mistral(&server.uri());
    assert_eq!(p.kind(), "mistral-fim");
    assert!(p.supports_native_fim());
    let events = collect(p.generate(fim("y = ", "\nprint(y)"))).await;
    assert_eq!(text(&events), "x + 1");
    assert_eq!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Stop,
            usage: TokenUsage {
                prompt_tokens: 8,
                completion_tokens: 2
            }
        }
    );
    let body: Value = server.received_requests().await.unwrap()[0]
        .body_json()
        .unwrap();
    assert_eq!(body["prompt"], "y = ");
    assert_eq!(body["suffix"], "\nprint(y)");
    assert_eq!(body["stream"], true);
    assert_eq!(body["model"], "codestral-latest");
}

#[tokio::test]
async fn mistral_chat_goes_to_chat_completions_and_errors_map() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/chat/completions"))
        .respond_with(sse(mistral_chunk("hi", Some("length")) + "data: [DONE]\n\n"))
        .expect(1)
        .mount(&server)
        .await;
    let p = mistral(&server.uri());
    let events = collect(p.generate(chat(Some("sys"), "hello"))).await;
    assert_eq!(text(&events), "hi");
    assert!(matches!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Length,
            ..
        }
    ));
    let body: Value = server.received_requests().await.unwrap()[0]
        .body_json()
        .unwrap();
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "sys"})
    );

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"message": "Unauthorized", "request_id": "r"})),
        )
        .mount(&server)
        .await;
    let events = collect(mistral(&server.uri()).generate(fim("a", "b"))).await;
    let error = last_error(&events);
    assert_eq!(
        error,
        ProviderError::Auth("HTTP 401: Unauthorized".to_string())
    );
}

#[tokio::test]
async fn mistral_requires_a_key() {
    let mut prof = ProfileConfig::new("c", ProviderKind::MistralFim, "codestral-latest");
    prof.api_key_env = Some("LAPCE_AI_TEST_NO_MISTRAL_KEY".to_string());
    let err = MistralProvider::from_profile(&prof).unwrap_err();
    assert!(
        err.to_string().contains("LAPCE_AI_TEST_NO_MISTRAL_KEY"),
        "{err}"
    );
}

fn gemini_chunk(text: &str, finish: Option<&str>) -> String {
    let mut candidate =
        json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0});
    let mut chunk = json!({});
    if let Some(reason) = finish {
        candidate["finishReason"] = json!(reason);
        chunk["usageMetadata"] =
            json!({"promptTokenCount": 6, "candidatesTokenCount": 3, "totalTokenCount": 9});
    }
    chunk["candidates"] = json!([candidate]);
    // Gemini's SSE uses CRLF line endings.
    format!("data: {chunk}\r\n\r\n")
}

fn gemini(base: &str) -> GeminiProvider {
    GeminiProvider::from_profile(&profile(ProviderKind::Gemini, base, "gemini-2.0-flash")).unwrap()
}

#[tokio::test]
async fn gemini_request_shape_and_stream() {
    let server = MockServer::start().await;
    let body = gemini_chunk("Hello", None) + &gemini_chunk(" there", Some("STOP"));
    Mock::given(method("POST"))
        .and(path(
            "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        ))
        .and(query_param("alt", "sse"))
        .and(header("x-goog-api-key", TEST_KEY))
        .respond_with(sse(body))
        .expect(1)
        .mount(&server)
        .await;
    let p = gemini(&server.uri());
    assert_eq!(p.kind(), "gemini");
    assert!(!p.supports_native_fim());
    let mut req = chat(Some("Be nice."), "hi");
    req.stop = vec!["STOP".to_string()];
    let events = collect(p.generate(req)).await;
    assert_eq!(text(&events), "Hello there");
    assert_eq!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Stop,
            usage: TokenUsage {
                prompt_tokens: 6,
                completion_tokens: 3
            }
        }
    );
    let requests = server.received_requests().await.unwrap();
    assert!(
        !requests[0].url.as_str().contains(TEST_KEY),
        "the key must not be in the URL"
    );
    let body: Value = requests[0].body_json().unwrap();
    assert_eq!(
        body["systemInstruction"],
        json!({"parts": [{"text": "Be nice."}]})
    );
    assert_eq!(
        body["contents"],
        json!([{"role": "user", "parts": [{"text": "hi"}]}])
    );
    assert_eq!(body["generationConfig"]["maxOutputTokens"], 64);
    assert_eq!(body["generationConfig"]["stopSequences"], json!(["STOP"]));
}

#[tokio::test]
async fn gemini_split_reads_max_tokens_and_errors() {
    let all = gemini_chunk("ü", None) + &gemini_chunk("ber", Some("MAX_TOKENS"));
    let bytes = all.as_bytes();
    let u = bytes.windows(2).position(|w| w == "ü".as_bytes()).unwrap();
    let steps = vec![
        send(&bytes[..u + 1]),
        send(&bytes[u + 1..u + 20]),
        send(&bytes[u + 20..]),
    ];
    let server = scripted("text/event-stream", steps).await;
    let p = gemini(&server.url());
    let events = collect(p.generate(raw("x"))).await;
    assert_eq!(text(&events), "über");
    assert!(matches!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Length,
            ..
        }
    ));
    let recorded = server.request.await.unwrap();
    assert!(recorded.head.starts_with(
        "POST /v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse HTTP/1.1"
    ));
    assert_eq!(recorded.json()["contents"][0]["parts"][0]["text"], "x");

    // Error object mid-stream.
    let server = MockServer::start().await;
    let body = gemini_chunk("a", None)
        + &format!(
            "data: {}\r\n\r\n",
            json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}})
        );
    Mock::given(method("POST"))
        .respond_with(sse(body))
        .mount(&server)
        .await;
    let events = collect(gemini(&server.uri()).generate(raw("x"))).await;
    assert_eq!(text(&events), "a");
    assert!(matches!(last_error(&events), ProviderError::Server(m) if m.contains("overloaded")));

    // HTTP errors, key redacted.
    for (status, expect) in [(400u16, "bad"), (403, "forbidden"), (429, "rate")] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status).set_body_json(json!([{"error": {
                "code": status, "message": format!("API key {TEST_KEY} is not valid"), "status": "X"}}])))
            .mount(&server)
            .await;
        let events = collect(gemini(&server.uri()).generate(raw("x"))).await;
        let error = last_error(&events);
        assert_no_key(&error);
        assert!(error.to_string().contains("is not valid"), "{error}");
        let ok = match expect {
            "bad" => matches!(error, ProviderError::BadRequest(_)),
            "forbidden" => matches!(error, ProviderError::Forbidden(_)),
            _ => matches!(error, ProviderError::RateLimited { .. }),
        };
        assert!(ok, "HTTP {status} mapped to {error:?}");
    }

    // No finish reason before EOF.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(sse(gemini_chunk("a", None)))
        .mount(&server)
        .await;
    let events = collect(gemini(&server.uri()).generate(raw("x"))).await;
    assert!(matches!(last_error(&events), ProviderError::Protocol(_)));
}

#[tokio::test]
async fn gemini_and_mistral_stall_and_drop() {
    let server = scripted(
        "text/event-stream",
        vec![send(gemini_chunk("a", None)), Step::Hold],
    )
    .await;
    let mut prof = profile(ProviderKind::Gemini, &server.url(), "gemini-2.0-flash");
    prof.idle_timeout = Duration::from_millis(250);
    let events = collect(
        GeminiProvider::from_profile(&prof)
            .unwrap()
            .generate(raw("x")),
    )
    .await;
    assert_eq!(text(&events), "a");
    assert!(
        matches!(last_error(&events), ProviderError::Protocol(m) if m.contains("stream stalled"))
    );
    assert_closed(server.closed).await;

    let server = scripted(
        "text/event-stream",
        vec![send(mistral_chunk("z", None)), Step::Hold],
    )
    .await;
    let p = mistral(&server.url());
    let mut stream = p.generate(fim("a", "b"));
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        GenerationEvent::Text("z".to_string())
    );
    drop(stream);
    assert_closed(server.closed).await;

    let port = closed_port().await;
    let events = collect(gemini(&format!("http://127.0.0.1:{port}")).generate(raw("x"))).await;
    assert!(matches!(last_error(&events), ProviderError::Unreachable(_)));
}

fn gemini_model(base: &str, model: &str) -> GeminiProvider {
    GeminiProvider::from_profile(&profile(ProviderKind::Gemini, base, model)).unwrap()
}

/// A completion request (the engine marks those), as a chat prompt like the fill-the-hole style.
fn completion_chat() -> ai_engine::provider::GenerationRequest {
    let mut request = chat(Some("fill"), "x = <FILL_HERE>");
    request.completion = Some(Default::default());
    request
}

#[tokio::test]
async fn gemini_completions_ask_for_the_least_thinking_the_model_allows() {
    let cases: [(&str, Option<Value>); 6] = [
        ("gemini-2.5-flash", Some(json!({"thinkingBudget": 0}))),
        ("gemini-2.5-flash-lite", Some(json!({"thinkingBudget": 0}))),
        (
            "models/gemini-2.5-pro",
            Some(json!({"thinkingBudget": 128})),
        ),
        (
            "gemini-3-pro-preview",
            Some(json!({"thinkingLevel": "low"})),
        ),
        ("gemini-3-flash", Some(json!({"thinkingLevel": "minimal"}))),
        ("gemini-2.0-flash", None),
    ];
    for (model, expected) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(sse(gemini_chunk("1", Some("STOP"))))
            .mount(&server)
            .await;
        let p = gemini_model(&server.uri(), model);
        assert_eq!(text(&collect(p.generate(completion_chat())).await), "1");
        // A chat request keeps the model's default thinking.
        assert_eq!(text(&collect(p.generate(chat(None, "hi"))).await), "1");
        let requests = server.received_requests().await.unwrap();
        let completion: Value = requests[0].body_json().unwrap();
        let chat_body: Value = requests[1].body_json().unwrap();
        assert_eq!(
            completion["generationConfig"]
                .get("thinkingConfig")
                .cloned(),
            expected,
            "{model}"
        );
        assert!(
            chat_body["generationConfig"]
                .get("thinkingConfig")
                .is_none(),
            "{model}"
        );
    }
}

#[tokio::test]
async fn gemini_blocked_finishes_are_errors_not_empty_text() {
    for (reason, words) in [
        ("SAFETY", "safety"),
        ("RECITATION", "recitation"),
        ("PROHIBITED_CONTENT", "prohibited"),
        ("OTHER", "OTHER"),
    ] {
        let server = MockServer::start().await;
        let body = format!(
            "data: {}\r\n\r\n",
            json!({"candidates": [{"finishReason": reason, "index": 0}]})
        );
        Mock::given(method("POST"))
            .respond_with(sse(body))
            .mount(&server)
            .await;
        let events = collect(gemini(&server.uri()).generate(completion_chat())).await;
        assert_eq!(text(&events), "");
        let error = last_error(&events);
        let message = error.to_string();
        assert!(matches!(error, ProviderError::BadRequest(_)), "{error:?}");
        assert!(message.contains(reason), "{message}");
        assert!(message.contains(words), "{message}");
        assert!(message.contains("withheld"), "{message}");
    }
}
