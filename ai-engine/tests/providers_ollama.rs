//! Ollama provider tests against local servers: generate/chat request shape, NDJSON framing, errors, cancellation.

mod common;

use std::time::Duration;

use ai_engine::config::{ProfileConfig, ProviderKind};
use ai_engine::provider::ollama::OllamaProvider;
use ai_engine::provider::{GenerationEvent, Provider, ProviderError, StopReason, TokenUsage};
use common::*;
use futures::StreamExt;
use serde_json::{json, Value};
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn gen_line(text: &str) -> String {
    format!(
        "{}\n",
        json!({"model": "m", "response": text, "done": false})
    )
}

fn gen_done(reason: &str) -> String {
    format!(
        "{}\n",
        json!({"model": "m", "response": "", "done": true, "done_reason": reason,
            "prompt_eval_count": 12, "eval_count": 4})
    )
}

fn chat_line(text: &str) -> String {
    format!(
        "{}\n",
        json!({"model": "m", "message": {"role": "assistant", "content": text}, "done": false})
    )
}

fn ndjson(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body, "application/x-ndjson")
}

/// A local Ollama needs no key: these profiles have none.
fn provider(base: &str) -> OllamaProvider {
    let mut prof = ProfileConfig::new("ol", ProviderKind::Ollama, "qwen2.5-coder:1.5b");
    prof.base_url = Some(base.to_string());
    prof.idle_timeout = Duration::from_secs(3);
    OllamaProvider::from_profile(&prof).unwrap()
}

#[tokio::test]
async fn fim_uses_generate_with_suffix_and_several_lines_in_one_read() {
    let server = MockServer::start().await;
    let body = gen_line("return ") + &gen_line("a + b") + &gen_done("stop");
    Mock::given(method("POST"))
        .and(path("/api/generate"))
        .and(body_partial_json(
            json!({"stream": true, "model": "qwen2.5-coder:1.5b"}),
        ))
        .respond_with(ndjson(body))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    assert_eq!(p.kind(), "ollama");
    assert!(p.supports_native_fim());
    let mut req = fim("def add(a, b):\n    ", "\n");
    req.stop = vec!["\n\n".to_string()];
    let events = collect(p.generate(req)).await;
    assert_eq!(text(&events), "return a + b");
    assert_eq!(
        finished(&events),
        GenerationEvent::Finished {
            reason: StopReason::Stop,
            usage: TokenUsage {
                prompt_tokens: 12,
                completion_tokens: 4
            }
        }
    );
    let requests: Vec<_> = server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/api/generate")
        .collect();
    assert!(requests[0].headers.get("authorization").is_none());
    let body: Value = requests[0].body_json().unwrap();
    assert_eq!(body["prompt"], "def add(a, b):\n    ");
    assert_eq!(body["suffix"], "\n");
    assert!(
        body.get("raw").is_none(),
        "FIM must let Ollama apply the model's template"
    );
    assert_eq!(body["options"]["num_predict"], 64);
    assert_eq!(body["options"]["stop"], json!(["\n\n"]));
}

#[tokio::test]
async fn raw_prompt_sets_raw_and_length_maps() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/generate"))
        .respond_with(ndjson(gen_line("x") + &gen_done("length")))
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let events = collect(p.generate(raw("<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"))).await;
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
    assert_eq!(body["raw"], true);
    assert_eq!(
        body["prompt"],
        "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
    );
    assert!(body.get("suffix").is_none());
}

#[tokio::test]
async fn chat_uses_api_chat_with_system_message() {
    let server = MockServer::start().await;
    let body = chat_line("Hi")
        + &chat_line(" there")
        + &format!(
            "{}\n",
            json!({"model": "m", "message": {"role": "assistant", "content": ""}, "done": true,
            "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2})
        );
    Mock::given(method("POST"))
        .and(path("/api/chat"))
        .respond_with(ndjson(body))
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let events = collect(p.generate(chat(Some("sys"), "hello"))).await;
    assert_eq!(text(&events), "Hi there");
    let body: Value = server.received_requests().await.unwrap()[0]
        .body_json()
        .unwrap();
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}])
    );
    assert_eq!(body["stream"], true);
}

#[tokio::test]
async fn lines_split_across_reads_utf8_split_and_crlf() {
    let all = (gen_line("añ") + &gen_line("🦀 ok") + &gen_done("stop")).replace('\n', "\r\n");
    let bytes = all.as_bytes();
    let crab = bytes.windows(4).position(|w| w == "🦀".as_bytes()).unwrap();
    let n_tilde = bytes.windows(2).position(|w| w == "ñ".as_bytes()).unwrap();
    let mut cuts = vec![5, n_tilde + 1, crab + 1, crab + 3, bytes.len() - 1];
    cuts.sort();
    let mut steps = Vec::new();
    let mut at = 0;
    for cut in cuts {
        steps.push(send(&bytes[at..cut]));
        at = cut;
    }
    steps.push(send(&bytes[at..]));
    let server = scripted("application/x-ndjson", steps).await;
    let p = provider(&server.url());
    let events = collect(p.generate(raw("a"))).await;
    assert_eq!(text(&events), "añ🦀 ok");
    assert!(matches!(
        finished(&events),
        GenerationEvent::Finished { .. }
    ));
    let recorded = server.request.await.unwrap();
    assert!(recorded.head.starts_with("POST /api/generate HTTP/1.1"));
}

#[tokio::test]
async fn error_line_mid_stream_and_truncated_stream() {
    let server = MockServer::start().await;
    let body = gen_line("par") + &format!("{}\n", json!({"error": "model runner crashed"}));
    Mock::given(method("POST"))
        .respond_with(ndjson(body))
        .mount(&server)
        .await;
    let events = collect(provider(&server.uri()).generate(fim("a", "b"))).await;
    assert_eq!(text(&events), "par");
    assert_eq!(
        last_error(&events),
        ProviderError::Server("model runner crashed".to_string())
    );

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ndjson(gen_line("cut")))
        .mount(&server)
        .await;
    let events = collect(provider(&server.uri()).generate(fim("a", "b"))).await;
    assert!(matches!(last_error(&events), ProviderError::Protocol(m) if m.contains("done")));

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ndjson("{\"response\": \"a\", \"done\": fal\n".to_string()))
        .mount(&server)
        .await;
    let events = collect(provider(&server.uri()).generate(fim("a", "b"))).await;
    assert!(
        matches!(last_error(&events), ProviderError::Protocol(m) if m.contains("malformed JSON"))
    );
}

#[tokio::test]
async fn http_errors_map() {
    let cases = [
        (
            404u16,
            r#"{"error":"model 'nope' not found, try pulling it first"}"#,
        ),
        (500, r#"{"error":"out of memory"}"#),
        (401, r#"{"error":"unauthorized"}"#),
        (403, r#"{"error":"forbidden"}"#),
        (429, r#"{"error":"busy"}"#),
    ];
    for (status, body) in cases {
        let server = MockServer::start().await;
        let mut response = ResponseTemplate::new(status).set_body_raw(body, "application/json");
        if status == 429 {
            response = response.insert_header("Retry-After", "3");
        }
        Mock::given(method("POST"))
            .respond_with(response)
            .mount(&server)
            .await;
        let events = collect(provider(&server.uri()).generate(fim("a", "b"))).await;
        let error = last_error(&events);
        let expected_text = serde_json::from_str::<Value>(body).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(error.to_string().contains(&expected_text), "{error}");
        match (status, &error) {
            (404, ProviderError::NotFound(_))
            | (500, ProviderError::Server(_))
            | (401, ProviderError::Auth(_))
            | (403, ProviderError::Forbidden(_)) => {}
            (
                429,
                ProviderError::RateLimited {
                    retry_after_secs: Some(3),
                    ..
                },
            ) => {}
            _ => panic!("HTTP {status} mapped to {error:?}"),
        }
    }
}

#[tokio::test]
async fn optional_key_is_sent_as_bearer_but_never_shown() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_raw(
            format!("{{\"error\":\"bad token {TEST_KEY}\"}}"),
            "application/json",
        ))
        .mount(&server)
        .await;
    let p =
        OllamaProvider::from_profile(&profile(ProviderKind::Ollama, &server.uri(), "m")).unwrap();
    let events = collect(p.generate(fim("a", "b"))).await;
    let error = last_error(&events);
    assert!(matches!(error, ProviderError::Auth(_)));
    assert_no_key(&error);
    let requests = server.received_requests().await.unwrap();
    assert_eq!(
        requests[0]
            .headers
            .get("authorization")
            .unwrap()
            .to_str()
            .unwrap(),
        format!("Bearer {TEST_KEY}")
    );
    assert!(!format!("{p:?}").contains(TEST_KEY));
}

#[tokio::test]
async fn stall_drop_and_refused() {
    let server = scripted(
        "application/x-ndjson",
        vec![send(gen_line("a")), Step::Hold],
    )
    .await;
    let mut prof = ProfileConfig::new("ol", ProviderKind::Ollama, "m");
    prof.base_url = Some(server.url());
    prof.idle_timeout = Duration::from_millis(250);
    let p = OllamaProvider::from_profile(&prof).unwrap();
    let events = collect(p.generate(raw("a"))).await;
    assert_eq!(text(&events), "a");
    assert!(
        matches!(last_error(&events), ProviderError::Protocol(m) if m.contains("stream stalled"))
    );
    assert_closed(server.closed).await;

    let server = scripted(
        "application/x-ndjson",
        vec![send(gen_line("b")), Step::Hold],
    )
    .await;
    let p = provider(&server.url());
    let mut stream = p.generate(raw("a"));
    assert_eq!(
        stream.next().await.unwrap().unwrap(),
        GenerationEvent::Text("b".to_string())
    );
    drop(stream);
    assert_closed(server.closed).await;

    let port = closed_port().await;
    let events = collect(provider(&format!("http://127.0.0.1:{port}")).generate(raw("a"))).await;
    assert!(matches!(last_error(&events), ProviderError::Unreachable(_)));
}

fn show(body: Value) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(body)
}

async fn paths_and_bodies(server: &MockServer) -> Vec<(String, Value)> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| (r.url.path().to_string(), r.body_json().unwrap()))
        .collect()
}

#[tokio::test]
async fn a_model_whose_template_takes_a_suffix_gets_native_fim_and_show_is_asked_once() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/show"))
        .respond_with(show(json!({
            "template": "{{- if .Suffix }}<|fim_prefix|>{{ .Prompt }}<|fim_suffix|>{{ .Suffix }}<|fim_middle|>{{- else }}{{ .Prompt }}{{- end }}",
            "capabilities": ["completion", "insert"]
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/generate"))
        .respond_with(ndjson(gen_line("a + b") + &gen_done("stop")))
        .expect(2)
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    for _ in 0..2 {
        let events = collect(p.generate(fim_with_fallback(
            "x = ",
            "\n",
            "TEMPLATE x = ",
            &["<stop>"],
        )))
        .await;
        assert_eq!(text(&events), "a + b");
    }
    let sent = paths_and_bodies(&server).await;
    assert_eq!(
        sent[0],
        (
            "/api/show".to_string(),
            json!({"model": "qwen2.5-coder:1.5b"})
        )
    );
    let (path_sent, body) = &sent[1];
    assert_eq!(path_sent, "/api/generate");
    assert_eq!(
        *body,
        json!({
            "model": "qwen2.5-coder:1.5b",
            "stream": true,
            "keep_alive": "30m",
            "options": {"num_predict": 64, "temperature": 0.2f32},
            "prompt": "x = ",
            "suffix": "\n",
        })
    );
    assert_eq!(sent.len(), 3, "show once, then two generations");
}

#[tokio::test]
async fn a_model_without_suffix_support_gets_the_fallback_and_one_log_line() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/show"))
        // An older Ollama: no capabilities field; a chat template without .Suffix.
        .respond_with(show(json!({
            "template": "{{ if .System }}<|im_start|>system {{ .System }}<|im_end|>{{ end }}{{ .Prompt }}"
        })))
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/generate"))
        .respond_with(ndjson(gen_line("1") + &gen_done("stop")))
        .expect(2)
        .mount(&server)
        .await;
    let logs = LogCapture::start();
    let p = provider(&server.uri());
    for _ in 0..2 {
        let events = collect(p.generate(fim_with_fallback(
            "x = ",
            "\n",
            "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>",
            &["<|endoftext|>"],
        )))
        .await;
        assert_eq!(text(&events), "1");
    }
    let sent = paths_and_bodies(&server).await;
    for (path_sent, body) in sent.iter().filter(|(p, _)| p == "/api/generate") {
        assert_eq!(path_sent, "/api/generate");
        assert!(body.get("suffix").is_none(), "{body}");
        assert_eq!(
            body["prompt"],
            "<|fim_prefix|>x = <|fim_suffix|>\n<|fim_middle|>"
        );
        assert_eq!(body["raw"], true);
        assert_eq!(body["options"]["stop"], json!(["<|endoftext|>"]));
        assert_eq!(body["keep_alive"], "30m");
    }
    assert_eq!(
        logs.warnings_with("no suffix (fill-in-the-middle) support"),
        1,
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn capabilities_without_insert_mean_no_suffix_even_if_the_template_mentions_it() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/show"))
        .respond_with(show(
            json!({"template": "{{ .Suffix }}", "capabilities": ["completion"]}),
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/generate"))
        .respond_with(ndjson(gen_done("stop")))
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    collect(p.generate(fim_with_fallback("a", "b", "a", &[]))).await;
    let sent = paths_and_bodies(&server).await;
    assert!(sent[1].1.get("suffix").is_none());
    assert_eq!(sent[1].1["prompt"], "a");
}

#[tokio::test]
async fn a_suffix_refused_at_generate_time_falls_back_once() {
    let server = MockServer::start().await;
    // /api/show unavailable (404): the provider tries the suffix.
    Mock::given(method("POST"))
        .and(path("/api/generate"))
        .and(body_partial_json(json!({"suffix": "b"})))
        .respond_with(ResponseTemplate::new(400).set_body_json(
            json!({"error": "registry.ollama.ai/library/m:latest does not support insert"}),
        ))
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/generate"))
        .respond_with(ndjson(gen_line("ok") + &gen_done("stop")))
        .with_priority(2)
        .expect(2)
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    for _ in 0..2 {
        let events = collect(p.generate(fim_with_fallback("a", "b", "a", &[]))).await;
        assert_eq!(text(&events), "ok", "{events:?}");
    }
}

#[tokio::test]
async fn keep_alive_is_configurable_and_sent_on_chat_too() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/chat"))
        .respond_with(ndjson(chat_line("hi") + &gen_done("stop")))
        .mount(&server)
        .await;
    let mut prof = ProfileConfig::new("ol", ProviderKind::Ollama, "m");
    prof.base_url = Some(server.uri());
    prof.keep_alive = "-1s".to_string();
    let p = OllamaProvider::from_profile(&prof).unwrap();
    assert_eq!(text(&collect(p.generate(chat(None, "hello"))).await), "hi");
    let sent = paths_and_bodies(&server).await;
    assert_eq!(sent[0].1["keep_alive"], "-1s");
}
