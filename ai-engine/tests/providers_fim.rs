//! Fill-in-the-middle routing on OpenAI-compatible `/v1/completions`: the native `suffix` only where it is honoured,
//! the family template everywhere else, and the fallback when a server rejects `suffix` (provider and engine level).

mod common;

use std::sync::Arc;

use ai_engine::config::{EngineConfig, FimMode, ProviderKind};
use ai_engine::engine::{default_factory, Engine, TextSink};
use ai_engine::provider::openai::OpenAiProvider;
use ai_engine::provider::Provider;
use common::*;
use lapce_ai_transport::protocol::CompletionRequest;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use wiremock::matchers::{method, path};
use wiremock::{Match, Mock, MockServer, Request, ResponseTemplate};

fn completion_sse(text: &str) -> ResponseTemplate {
    let body = format!(
        "data: {}\n\ndata: [DONE]\n\n",
        json!({"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})
    );
    ResponseTemplate::new(200).set_body_raw(body, "text/event-stream")
}

/// Matches requests whose JSON body has `field`.
struct HasField(&'static str);

impl Match for HasField {
    fn matches(&self, request: &Request) -> bool {
        serde_json::from_slice::<Value>(&request.body)
            .map(|body| body.get(self.0).is_some())
            .unwrap_or(false)
    }
}

/// A vLLM-like server: 400 to any request with `suffix`, a completion otherwise.
async fn server_rejecting_suffix() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/completions"))
        .and(HasField("suffix"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "object": "error",
            "message": "suffix is not currently supported",
            "type": "BadRequestError",
            "code": 400
        })))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/completions"))
        .respond_with(completion_sse("a + b"))
        .with_priority(2)
        .mount(&server)
        .await;
    server
}

async fn sent_bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.body_json().unwrap())
        .collect()
}

fn completions_provider(base: &str, fim: FimMode) -> OpenAiProvider {
    let mut prof = profile(ProviderKind::OpenAiCompletions, base, "qwen2.5-coder-1.5b");
    prof.fim = fim;
    OpenAiProvider::from_profile(&prof).unwrap()
}

#[tokio::test]
async fn auto_mode_never_sends_suffix_to_an_unknown_server() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/completions"))
        .respond_with(completion_sse("a + b"))
        .expect(2)
        .mount(&server)
        .await;
    // llama.cpp, vLLM and LM Studio all look like this: a local or unknown host.
    let p = completions_provider(&format!("{}/v1", server.uri()), FimMode::Auto);
    let with_template = fim_with_fallback(
        "def add(a, b):\n    return ",
        "\n",
        "<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n<|fim_middle|>",
        &["<|endoftext|>", "<|fim_pad|>"],
    );
    assert_eq!(text(&collect(p.generate(with_template)).await), "a + b");
    // Without a fallback (a caller that built no template) the prefix goes alone.
    assert_eq!(
        text(&collect(p.generate(fim("x = ", "\ny = 2"))).await),
        "a + b"
    );
    let bodies = sent_bodies(&server).await;
    for body in &bodies {
        assert!(body.get("suffix").is_none(), "suffix sent: {body}");
    }
    assert_eq!(
        bodies[0]["prompt"],
        "<|fim_prefix|>def add(a, b):\n    return <|fim_suffix|>\n<|fim_middle|>"
    );
    assert_eq!(bodies[0]["stop"], json!(["<|endoftext|>", "<|fim_pad|>"]));
    assert_eq!(bodies[1]["prompt"], "x = ");
    assert!(bodies[1].get("stop").is_none());
}

#[tokio::test]
async fn a_400_to_suffix_falls_back_in_the_same_request_then_goes_straight_to_the_fallback() {
    let server = server_rejecting_suffix().await;
    let logs = LogCapture::start();
    let p = completions_provider(&server.uri(), FimMode::Native);
    let request = || {
        fim_with_fallback(
            "def f():\n    ",
            "\n",
            "<fim_prefix>def f():\n    <fim_suffix>\n<fim_middle>",
            &["<|endoftext|>"],
        )
    };
    let first = collect(p.generate(request())).await;
    assert_eq!(text(&first), "a + b", "{first:?}");
    let second = collect(p.generate(request())).await;
    assert_eq!(text(&second), "a + b", "{second:?}");

    let bodies = sent_bodies(&server).await;
    assert_eq!(
        bodies.len(),
        3,
        "native try, fallback, then fallback directly: {bodies:?}"
    );
    assert_eq!(bodies[0]["suffix"], "\n");
    assert_eq!(bodies[0]["prompt"], "def f():\n    ");
    for body in &bodies[1..] {
        assert!(body.get("suffix").is_none());
        assert_eq!(
            body["prompt"],
            "<fim_prefix>def f():\n    <fim_suffix>\n<fim_middle>"
        );
        assert_eq!(body["stop"], json!(["<|endoftext|>"]));
    }
    assert_eq!(
        logs.warnings_with("suffix is not currently supported"),
        1,
        "exactly one warning: {}",
        logs.text()
    );
}

#[tokio::test]
async fn a_400_without_a_fallback_is_reported_not_swallowed() {
    let server = server_rejecting_suffix().await;
    let p = completions_provider(&server.uri(), FimMode::Native);
    let events = collect(p.generate(fim("a", "b"))).await;
    let message = last_error(&events).to_string();
    assert!(
        message.contains("suffix is not currently supported"),
        "{message}"
    );
}

struct Collected(String);

impl TextSink for Collected {
    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.0.push_str(text);
        Ok(())
    }
}

fn engine_for(server: &MockServer, extra: &str) -> Arc<Engine> {
    let text = format!(
        "completion_profile = \"local\"\n\n[profiles.local]\nkind = \"openai-completions\"\n\
         base_url = \"{}/v1\"\nmodel = \"qwen2.5-coder-1.5b\"\n{extra}",
        server.uri()
    );
    let config = EngineConfig::parse(&text, std::path::Path::new("engine.toml"), true).unwrap();
    let factory = default_factory(&config);
    Engine::new(config, factory, "fim-test")
}

async fn complete(engine: &Engine, prefix: &str, suffix: &str) -> String {
    let mut sink = Collected(String::new());
    let request = CompletionRequest {
        language_id: "python".into(),
        prefix: prefix.into(),
        suffix: suffix.into(),
        ..CompletionRequest::default()
    };
    engine
        .complete(request, &mut sink, &CancellationToken::new())
        .await
        .unwrap();
    sink.0
}

#[tokio::test]
async fn the_engine_renders_the_family_template_for_a_local_completions_server() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/completions"))
        .respond_with(completion_sse("a + b"))
        .mount(&server)
        .await;
    let engine = engine_for(&server, "");
    assert_eq!(
        complete(&engine, "def add(a, b):\n    return ", "\n").await,
        "a + b"
    );
    let body = &sent_bodies(&server).await[0];
    assert!(body.get("suffix").is_none(), "{body}");
    // Prefix-first: the cursor's line starts the middle, so the server's prompt cache keeps the suffix while
    // the user types on (completion/anchor.rs).
    assert_eq!(
        body["prompt"],
        "<|fim_prefix|>def add(a, b):\n<|fim_suffix|>\n<|fim_middle|>    return "
    );
    assert!(body["stop"]
        .as_array()
        .unwrap()
        .contains(&json!("<|endoftext|>")));
}

#[tokio::test]
async fn the_engine_survives_a_server_that_rejects_a_forced_suffix() {
    let server = server_rejecting_suffix().await;
    let engine = engine_for(&server, "fim = \"native\"\n");
    assert_eq!(complete(&engine, "x = ", "\n").await, "a + b");
    assert_eq!(complete(&engine, "y = ", "\n").await, "a + b");
    let bodies = sent_bodies(&server).await;
    assert_eq!(bodies.len(), 3);
    assert!(bodies[0].get("suffix").is_some());
    assert!(bodies[2].get("suffix").is_none());
    assert_eq!(
        bodies[2]["prompt"],
        "<|fim_prefix|>y = <|fim_suffix|>\n<|fim_middle|>"
    );
}

#[tokio::test]
async fn the_engine_sends_a_custom_template_and_its_stop_strings() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/completions"))
        .respond_with(completion_sse("a + b<END>ignored"))
        .mount(&server)
        .await;
    let engine = engine_for(
        &server,
        "fim = \"template\"\nfim_template = \"<PRE>{prefix}<SUF>{suffix}<MID>{{literal}}\"\nfim_stop = [\"<END>\"]\n",
    );
    assert_eq!(complete(&engine, "x = ", "\n").await, "a + b");
    let body = &sent_bodies(&server).await[0];
    assert_eq!(body["prompt"], "<PRE>x = <SUF>\n<MID>{literal}");
    assert_eq!(body["stop"], json!(["<END>"]));
    assert!(body.get("suffix").is_none());
}

#[tokio::test]
async fn fim_none_sends_the_prefix_alone() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/completions"))
        .respond_with(completion_sse("1"))
        .mount(&server)
        .await;
    let engine = engine_for(&server, "fim = \"none\"\n");
    assert_eq!(complete(&engine, "x = ", "\n").await, "1");
    let body = &sent_bodies(&server).await[0];
    assert_eq!(body["prompt"], "x = ");
    assert!(body.get("suffix").is_none());
}
