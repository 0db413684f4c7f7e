//! Anthropic Messages API provider tests against local servers: request shape, typed SSE events, errors, cancellation.

mod common;

use std::time::Duration;

use ai_engine::config::{ProfileConfig, ProviderKind};
use ai_engine::provider::anthropic::AnthropicProvider;
use ai_engine::provider::{
    ChatRole, ChatTurn, GenerationEvent, Prompt, Provider, ProviderError, StopReason, TokenUsage,
};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn event(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

fn start() -> String {
    event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "content": [], "model": "claude-test", "stop_reason": null,
            "usage": {"input_tokens": 25, "output_tokens": 1}}}),
    ) + &event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    )
}

fn delta(text: &str) -> String {
    event(
        "content_block_delta",
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
    )
}

fn end(stop_reason: &str, output_tokens: u32) -> String {
    event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ) + &event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": output_tokens}}),
    ) + &event("message_stop", json!({"type": "message_stop"}))
}

fn sse(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")
}

fn provider(base: &str) -> AnthropicProvider {
    AnthropicProvider::from_profile(&profile(ProviderKind::Anthropic, base, "claude-test")).unwrap()
}

#[tokio::test]
async fn request_shape_system_top_level_and_full_event_sequence() {
    let server = MockServer::start().await;
    let body = start()
        + &event("ping", json!({"type": "ping"}))
        + &delta("Hello")
        + &delta(", world")
        + &end("end_turn", 9);
    Mock::given(method("POST"))
        .and(path("/v1/messages"))
        .and(header("x-api-key", TEST_KEY))
        .and(header("anthropic-version", "2023-06-01"))
        .and(header("content-type", "application/json"))
        .and(body_partial_json(
            json!({"stream": true, "model": "claude-test", "system": "Be brief."}),
        ))
        .respond_with(sse(body))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    assert_eq!(p.kind(), "anthropic");
    assert!(!p.supports_native_fim());
    let mut req = request(Prompt::Chat {
        system: Some("Be brief.".to_string()),
        messages: vec![
            ChatTurn {
                role: ChatRole::User,
                content: "hi".to_string(),
            },
            ChatTurn {
                role: ChatRole::Assistant,
                content: "hello".to_string(),
            },
            ChatTurn {
                role: ChatRole::User,
                content: "greet the world".to_string(),
            },
        ],
    });
    req.stop = vec!["END".to_string()];
    let events = collect(p.generate(req)).await;
    assert_eq!(text(&events), "Hello, world");
    assert_eq!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Stop,
            usage: TokenUsage {
                prompt_tokens: 25,
                completion_tokens: 9
            }
        }
    );
    let requests = server.received_requests().await.unwrap();
    assert!(requests[0].headers.get("authorization").is_none());
    let body: Value = requests[0].body_json().unwrap();
    assert_eq!(body["system"], "Be brief.");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "greet the world"}
        ]),
        "the system prompt must not be sent as a turn"
    );
    assert_eq!(body["max_tokens"], 64);
    assert_eq!(body["stop_sequences"], json!(["END"]));
}

#[tokio::test]
async fn max_tokens_stop_reason_maps_to_length_and_raw_is_a_user_turn() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(sse(start() + &delta("abc") + &end("max_tokens", 64)))
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let events = collect(p.generate(raw("write"))).await;
    assert!(matches!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Length,
            usage: TokenUsage {
                completion_tokens: 64,
                ..
            }
        }
    ));
    let body: Value = server.received_requests().await.unwrap()[0]
        .body_json()
        .unwrap();
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "write"}])
    );
    assert!(body.get("system").is_none());

    let events = collect(p.generate(fim("a", "b"))).await;
    assert!(matches!(last_error(&events), ProviderError::BadRequest(_)));
}

#[tokio::test]
async fn split_reads_utf8_crlf_and_comments() {
    let all =
        (start() + &delta("naïve ") + &delta("日本") + &end("end_turn", 4)).replace('\n', "\r\n");
    let bytes = all.as_bytes();
    let nihon = bytes.windows(3).position(|w| w == "日".as_bytes()).unwrap();
    let mut steps = vec![send(": ping\r\n\r\n")];
    // Cut every 37 bytes, plus once inside the multi-byte character.
    let mut cuts: Vec<usize> = (37..bytes.len()).step_by(37).collect();
    cuts.push(nihon + 1);
    cuts.sort();
    let mut at = 0;
    for cut in cuts {
        steps.push(send(&bytes[at..cut]));
        at = cut;
    }
    steps.push(send(&bytes[at..]));
    let server = scripted("text/event-stream", steps).await;
    let p = provider(&server.url());
    let events = collect(p.generate(chat(Some("sys"), "x"))).await;
    assert_eq!(text(&events), "naïve 日本");
    assert!(matches!(
        finished(&events),
        GenerationEvent::Finished { .. }
    ));
    let recorded = server.request.await.unwrap();
    assert!(recorded.head.starts_with("POST /v1/messages HTTP/1.1"));
    let head = recorded.head.to_ascii_lowercase();
    assert!(head.contains(&format!("x-api-key: {}", TEST_KEY.to_ascii_lowercase())));
    assert!(head.contains("anthropic-version: 2023-06-01"));
    assert_eq!(recorded.json()["system"], "sys");
}

#[tokio::test]
async fn error_event_mid_stream_is_classified() {
    let cases = [
        ("overloaded_error", "Overloaded"),
        ("rate_limit_error", "Too many"),
        ("invalid_request_error", "bad"),
    ];
    for (kind, message) in cases {
        let server = MockServer::start().await;
        let body = start()
            + &delta("par")
            + &event(
                "error",
                json!({"type": "error", "error": {"type": kind, "message": message}}),
            );
        Mock::given(method("POST"))
            .respond_with(sse(body))
            .mount(&server)
            .await;
        let events = collect(provider(&server.uri()).generate(chat(None, "x"))).await;
        assert_eq!(text(&events), "par");
        let error = last_error(&events);
        assert!(error.to_string().contains(message), "{error}");
        match (kind, &error) {
            ("overloaded_error", ProviderError::Server(_))
            | ("rate_limit_error", ProviderError::RateLimited { .. })
            | ("invalid_request_error", ProviderError::BadRequest(_)) => {}
            _ => panic!("{kind} mapped to {error:?}"),
        }
    }
}

#[tokio::test]
async fn stream_without_message_stop_is_a_protocol_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(sse(start() + &delta("cut")))
        .mount(&server)
        .await;
    let events = collect(provider(&server.uri()).generate(chat(None, "x"))).await;
    assert_eq!(text(&events), "cut");
    assert!(
        matches!(last_error(&events), ProviderError::Protocol(m) if m.contains("message_stop"))
    );
}

#[tokio::test]
async fn http_errors_map_and_never_show_the_key() {
    for (status, retry) in [
        (401u16, None),
        (403, None),
        (404, None),
        (429, Some("12")),
        (529, None),
    ] {
        let server = MockServer::start().await;
        let body = json!({"type": "error", "error": {"type": "some_error", "message": format!("key {TEST_KEY} rejected")}});
        let mut response = ResponseTemplate::new(status).set_body_json(body);
        if let Some(r) = retry {
            response = response.insert_header("retry-after", r);
        }
        Mock::given(method("POST"))
            .respond_with(response)
            .mount(&server)
            .await;
        let events = collect(provider(&server.uri()).generate(chat(None, "x"))).await;
        let error = last_error(&events);
        assert_no_key(&error);
        assert!(error.to_string().contains("rejected"), "{error}");
        match (status, &error) {
            (401, ProviderError::Auth(_))
            | (403, ProviderError::Forbidden(_))
            | (404, ProviderError::NotFound(_))
            | (529, ProviderError::Server(_)) => {}
            (
                429,
                ProviderError::RateLimited {
                    retry_after_secs: Some(12),
                    ..
                },
            ) => {}
            _ => panic!("HTTP {status} mapped to {error:?}"),
        }
    }
}

#[tokio::test]
async fn stall_drop_and_refused() {
    // Stall: idle timeout fires.
    let server = scripted(
        "text/event-stream",
        vec![send(start() + &delta("a")), Step::Hold],
    )
    .await;
    let mut prof = profile(ProviderKind::Anthropic, &server.url(), "m");
    prof.idle_timeout = Duration::from_millis(250);
    let p = AnthropicProvider::from_profile(&prof).unwrap();
    let events = collect(p.generate(chat(None, "x"))).await;
    assert_eq!(text(&events), "a");
    assert!(
        matches!(last_error(&events), ProviderError::Protocol(m) if m.contains("stream stalled"))
    );
    assert_closed(server.closed).await;

    // Drop: the server sees the connection close.
    let server = scripted(
        "text/event-stream",
        vec![send(start() + &delta("b")), Step::Hold],
    )
    .await;
    let p = provider(&server.url());
    let mut stream = p.generate(chat(None, "x"));
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        GenerationEvent::Text("b".to_string())
    );
    drop(stream);
    assert_closed(server.closed).await;

    // Refused.
    let port = closed_port().await;
    let events =
        collect(provider(&format!("http://127.0.0.1:{port}")).generate(chat(None, "x"))).await;
    assert!(matches!(last_error(&events), ProviderError::Unreachable(_)));
}

#[test]
fn missing_key_is_a_config_error_naming_the_env_var() {
    let mut prof = ProfileConfig::new("claude", ProviderKind::Anthropic, "m");
    prof.api_key_env = Some("LAPCE_AI_TEST_NO_SUCH_KEY".to_string());
    let err = AnthropicProvider::from_profile(&prof).unwrap_err();
    let shown = err.to_string();
    assert!(shown.contains("claude"), "{shown}");
    assert!(shown.contains("LAPCE_AI_TEST_NO_SUCH_KEY"), "{shown}");

    let p = AnthropicProvider::from_profile(&profile(
        ProviderKind::Anthropic,
        "http://127.0.0.1:1",
        "m",
    ))
    .unwrap();
    let debug = format!("{p:?}");
    assert!(!debug.contains(TEST_KEY), "{debug}");
}
