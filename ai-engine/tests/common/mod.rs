//! Test helpers for the HTTP providers: a scripted chunk-by-chunk HTTP server on 127.0.0.1, profiles, collectors.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use ai_engine::config::{ApiKey, ProfileConfig, ProviderKind};
use ai_engine::provider::{
    ChatRole, ChatTurn, CompletionHints, FimFallback, GenerationEvent, GenerationRequest, Prompt,
    ProviderError,
};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// The key used by every test; asserted never to leak into errors or debug output.
pub const TEST_KEY: &str = "sk-test-SECRET-0123456789";

/// One step of a scripted response body.
pub enum Step {
    /// Write these bytes as one HTTP chunk, then pause briefly so the client sees a separate read.
    Send(Vec<u8>),
    /// Stop writing but keep the connection open until the client goes away.
    Hold,
}

pub fn send(s: impl AsRef<[u8]>) -> Step {
    Step::Send(s.as_ref().to_vec())
}

/// A request as the scripted server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub head: String,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub struct ScriptedServer {
    pub addr: SocketAddr,
    pub request: oneshot::Receiver<Recorded>,
    /// Fires when the server sees the client close the connection (EOF or reset).
    pub closed: oneshot::Receiver<()>,
}

impl ScriptedServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves one connection: reads the request, answers 200 with `content_type` and a chunked body made of `steps`.
pub async fn scripted(content_type: &str, steps: Vec<Step>) -> ScriptedServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (req_tx, req_rx) = oneshot::channel();
    let (closed_tx, closed_rx) = oneshot::channel();
    let content_type = content_type.to_string();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let recorded = read_request(&mut socket).await;
        let _ = req_tx.send(recorded);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        if socket.write_all(head.as_bytes()).await.is_err() {
            let _ = closed_tx.send(());
            return;
        }
        let mut held = false;
        for step in steps {
            match step {
                Step::Send(bytes) => {
                    let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                    chunk.extend_from_slice(&bytes);
                    chunk.extend_from_slice(b"\r\n");
                    if socket.write_all(&chunk).await.is_err() {
                        let _ = closed_tx.send(());
                        return;
                    }
                    let _ = socket.flush().await;
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Step::Hold => {
                    held = true;
                    break;
                }
            }
        }
        if !held {
            let _ = socket.write_all(b"0\r\n\r\n").await;
        }
        wait_for_close(&mut socket).await;
        let _ = closed_tx.send(());
    });
    ScriptedServer {
        addr,
        request: req_rx,
        closed: closed_rx,
    }
}

async fn wait_for_close(socket: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    loop {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Reads one HTTP/1.1 request (head + Content-Length body).
pub async fn read_request(socket: &mut TcpStream) -> Recorded {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "client closed before sending a request");
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().unwrap())
        })
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "client closed mid-request");
        data.extend_from_slice(&buf[..n]);
    }
    Recorded {
        head,
        body: data[head_end..head_end + length].to_vec(),
    }
}

/// A profile pointing at `base_url` with the test key and short timeouts.
pub fn profile(kind: ProviderKind, base_url: &str, model: &str) -> ProfileConfig {
    let mut p = ProfileConfig::new("test", kind, model);
    p.base_url = Some(base_url.to_string());
    p.api_key = Some(ApiKey::new(TEST_KEY));
    p.connect_timeout = Duration::from_secs(2);
    p.idle_timeout = Duration::from_secs(3);
    p.request_timeout = Duration::from_secs(10);
    p
}

pub fn raw(text: &str) -> GenerationRequest {
    request(Prompt::Raw(text.to_string()))
}

pub fn fim(prefix: &str, suffix: &str) -> GenerationRequest {
    request(Prompt::FillInTheMiddle {
        prefix: prefix.to_string(),
        suffix: suffix.to_string(),
        middle_start: None,
    })
}

pub fn chat(system: Option<&str>, user: &str) -> GenerationRequest {
    request(Prompt::Chat {
        system: system.map(str::to_string),
        messages: vec![ChatTurn {
            role: ChatRole::User,
            content: user.to_string(),
        }],
    })
}

pub fn request(prompt: Prompt) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens: 64,
        temperature: 0.2,
        stop: vec![],
        extra_context: vec![],
        completion: None,
    }
}

/// A completion request for native FIM whose fallback is `fallback_prompt` with `fallback_stop`, as the engine
/// builds it.
pub fn fim_with_fallback(
    prefix: &str,
    suffix: &str,
    fallback_prompt: &str,
    fallback_stop: &[&str],
) -> GenerationRequest {
    let mut request = fim(prefix, suffix);
    request.completion = Some(CompletionHints {
        fim_fallback: Some(FimFallback {
            prompt: fallback_prompt.to_string(),
            stop: fallback_stop.iter().map(|s| s.to_string()).collect(),
            description: "the test template".to_string(),
        }),
    });
    request
}

pub type Events = Vec<Result<GenerationEvent, ProviderError>>;

/// Drains a stream (10 s limit).
pub async fn collect(stream: BoxStream<'static, Result<GenerationEvent, ProviderError>>) -> Events {
    tokio::time::timeout(Duration::from_secs(10), stream.collect::<Vec<_>>())
        .await
        .expect("stream did not finish within 10 s")
}

/// Concatenated text of the successful events.
pub fn text(events: &Events) -> String {
    events
        .iter()
        .filter_map(|e| match e {
            Ok(GenerationEvent::Text(t)) => Some(t.as_str()),
            _ => None,
        })
        .collect()
}

/// The last item, which must be an error.
pub fn last_error(events: &Events) -> ProviderError {
    match events.last() {
        Some(Err(e)) => e.clone(),
        other => panic!("expected the stream to end with an error, got {other:?}"),
    }
}

/// The last item, which must be `Finished`.
pub fn finished(events: &Events) -> GenerationEvent {
    match events.last() {
        Some(Ok(e @ GenerationEvent::Finished { .. })) => e.clone(),
        other => panic!("expected the stream to end with Finished, got {other:?}"),
    }
}

/// Asserts that the key appears in neither Display nor Debug of `error`.
pub fn assert_no_key(error: &ProviderError) {
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains(TEST_KEY), "key leaked: {shown}");
    assert!(!shown.contains("SECRET"), "key leaked: {shown}");
}

/// A port on 127.0.0.1 with nothing listening.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    port
}

/// Waits (up to 3 s) for the scripted server to see the connection closed.
pub async fn assert_closed(closed: oneshot::Receiver<()>) {
    tokio::time::timeout(Duration::from_secs(3), closed)
        .await
        .expect("upstream connection was not closed within 3 s")
        .expect("server task ended without observing close");
}

/// Captures the `tracing` output of the current thread (a `#[tokio::test]` runs its futures there) while alive.
pub struct LogCapture {
    buffer: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

#[derive(Clone)]
struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn start() -> Self {
        let buffer = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = SharedBuffer(std::sync::Arc::clone(&buffer));
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        Self {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }

    /// Lines at WARN level containing `needle`.
    pub fn warnings_with(&self, needle: &str) -> usize {
        self.text()
            .lines()
            .filter(|line| line.contains("WARN") && line.contains(needle))
            .count()
    }
}
