//! Proxy policy: HTTP(S)_PROXY is honoured for remote hosts, loopback base URLs always bypass it.
//! Its own test binary because it sets process-wide proxy variables.

mod common;

use std::sync::{Arc, Mutex};

use ai_engine::config::ProviderKind;
use ai_engine::provider::openai::OpenAiProvider;
use ai_engine::provider::{Provider, ProviderError};
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const SSE_BODY: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"via-proxy\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";

/// A fake forward proxy on 127.0.0.1 that records request heads and answers every request itself.
async fn fake_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let recorded = read_request(&mut socket).await;
            record.lock().unwrap().push(recorded.head);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{SSE_BODY}",
                SSE_BODY.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        }
    });
    (url, seen)
}

#[tokio::test]
async fn loopback_bypasses_proxy_and_remote_hosts_use_it() {
    let (proxy_url, seen) = fake_proxy().await;
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        std::env::set_var(var, &proxy_url);
    }
    std::env::remove_var("NO_PROXY");
    std::env::remove_var("no_proxy");

    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(SSE_BODY.replace("via-proxy", "direct"), "text/event-stream"),
        )
        .mount(&server)
        .await;
    let port = server.address().port();

    for base in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
    ] {
        let p =
            OpenAiProvider::from_profile(&profile(ProviderKind::OpenAiChat, &base, "m")).unwrap();
        let events = collect(p.generate(chat(None, "x"))).await;
        assert_eq!(text(&events), "direct", "{base}: {events:?}");
    }
    assert_eq!(server.received_requests().await.unwrap().len(), 2);
    assert!(
        seen.lock().unwrap().is_empty(),
        "loopback went through the proxy"
    );

    // A remote host goes through the proxy (which answers; nothing leaves the machine).
    let p = OpenAiProvider::from_profile(&profile(
        ProviderKind::OpenAiChat,
        "http://api.example.invalid",
        "m",
    ))
    .unwrap();
    let events = collect(p.generate(chat(None, "x"))).await;
    assert_eq!(text(&events), "via-proxy", "{events:?}");
    let heads = seen.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("POST http://api.example.invalid/v1/chat/completions HTTP/1.1"),
        "{}",
        heads[0]
    );

    // A loopback server that is down is reported as unreachable, not retried through the proxy.
    let port = closed_port().await;
    let p = OpenAiProvider::from_profile(&profile(
        ProviderKind::OpenAiChat,
        &format!("http://127.0.0.1:{port}"),
        "m",
    ))
    .unwrap();
    let events = collect(p.generate(chat(None, "x"))).await;
    assert!(matches!(last_error(&events), ProviderError::Unreachable(_)));
    assert_eq!(seen.lock().unwrap().len(), 1);
}
