//! Test doubles for ai-engine users: a scripted OpenAI-compatible SSE server on 127.0.0.1, instant providers.
//!
//! Used by the engine's, the bridge's and the volt host's integration tests, and by `engine-bench` (src/bin).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ai_engine::config::{EngineConfig, ProfileConfig, ProviderKind};
use ai_engine::daemon::{DaemonHandler, Handler};
use ai_engine::engine::{Engine, ProviderFactory};
use ai_engine::provider::http::EventStream;
use ai_engine::provider::{GenerationEvent, GenerationRequest, Provider, StopReason, TokenUsage};
use lapce_ai_transport::util::lock;
use lapce_ai_transport::{Endpoint, Server, ServerOptions, TransportError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the fake server streams back for every request.
#[derive(Clone)]
pub struct Script {
    pub pieces: Vec<String>,
    pub delay: Duration,
}

/// A tiny OpenAI-compatible server: `/v1/completions` and `/v1/chat/completions` stream `Script` as SSE.
pub struct FakeOpenAi {
    pub port: u16,
    pub requests: Arc<AtomicUsize>,
    /// Streams whose client hung up before the script ended (a cancel reached the upstream connection).
    pub aborted: Arc<AtomicUsize>,
    pub completed: Arc<AtomicUsize>,
    /// Every request body received, in order (what the engine sent: prompts, suffixes, extra fields).
    pub bodies: Arc<Mutex<Vec<String>>>,
    /// Requests refused with 401 because they lacked the required key.
    pub unauthorized: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeOpenAi {
    pub async fn start(script: Script) -> Self {
        Self::start_with_key(script, None).await
    }

    /// Like [`FakeOpenAi::start`], answering 401 to requests without `Authorization: Bearer KEY`.
    pub async fn start_with_key(script: Script, key: Option<String>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("fake server");
        let port = listener.local_addr().expect("fake server").port();
        let requests = Arc::new(AtomicUsize::new(0));
        let aborted = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (r, a, c) = (
            Arc::clone(&requests),
            Arc::clone(&aborted),
            Arc::clone(&completed),
        );
        let b = Arc::clone(&bodies);
        let unauthorized = Arc::new(AtomicUsize::new(0));
        let u = Arc::clone(&unauthorized);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                let (r, a, c) = (Arc::clone(&r), Arc::clone(&a), Arc::clone(&c));
                let b = Arc::clone(&b);
                let (u, key) = (Arc::clone(&u), key.clone());
                tokio::spawn(async move {
                    let Some((path, head, body)) = read_request(&mut socket).await else {
                        return;
                    };
                    if let Some(key) = key {
                        let wanted = format!("authorization: bearer {}", key.to_ascii_lowercase());
                        if !head
                            .lines()
                            .any(|l| l.trim().to_ascii_lowercase() == wanted)
                        {
                            u.fetch_add(1, Ordering::SeqCst);
                            let refusal = "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: 42\r\nconnection: close\r\n\r\n{\"error\":{\"message\":\"bad key, try again\"}}";
                            let _ = socket.write_all(refusal.as_bytes()).await;
                            return;
                        }
                    }
                    lock(&b).push(body);
                    r.fetch_add(1, Ordering::SeqCst);
                    let chat = path.contains("chat");
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
                    if socket.write_all(head.as_bytes()).await.is_err() {
                        a.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    for piece in &script.pieces {
                        tokio::time::sleep(script.delay).await;
                        let text = serde_json::to_string(piece).expect("fake server");
                        let event = if chat {
                            format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{text}}}}}]}}\n\n")
                        } else {
                            format!("data: {{\"choices\":[{{\"index\":0,\"text\":{text}}}]}}\n\n")
                        };
                        if socket.write_all(event.as_bytes()).await.is_err()
                            || socket.flush().await.is_err()
                        {
                            a.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    let end = "data: {\"choices\":[{\"index\":0,\"text\":\"\",\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
                    let _ = socket.write_all(end.as_bytes()).await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            port,
            requests,
            aborted,
            completed,
            bodies,
            unauthorized,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one HTTP request (headers + content-length body); returns its path, head and body.
async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<(String, String, String)> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                })
                .unwrap_or(0);
            while buffer.len() < end + 4 + length {
                let n = socket.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buffer.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]).into_owned();
            return head
                .split_whitespace()
                .nth(1)
                .map(|path| (path.to_owned(), head.clone(), body));
        }
    }
}

/// A config whose completion and chat profiles use a fake server at `base_url`, plus a `down` profile whose
/// server refuses connections.
pub fn fake_config(base_url: &str) -> String {
    format!(
        r#"completion_profile = "fake"
chat_profile = "fakechat"

[profiles.fake]
kind = "openai-completions"
base_url = "{base_url}"
model = "fake-coder"

[profiles.fakechat]
kind = "openai-chat"
base_url = "{base_url}"
model = "fake-chat"

[profiles.down]
kind = "openai-completions"
base_url = "http://127.0.0.1:9"
model = "nobody-home"
"#
    )
}

/// A provider that answers `text` instantly: measures engine, transport and bridge overhead alone.
pub struct InstantProvider {
    pub text: String,
}

impl Provider for InstantProvider {
    fn kind(&self) -> &str {
        "instant"
    }
    fn model(&self) -> &str {
        "instant"
    }
    fn supports_native_fim(&self) -> bool {
        true
    }
    fn generate(&self, _request: GenerationRequest) -> EventStream {
        Box::pin(futures::stream::iter([
            Ok(GenerationEvent::Text(self.text.clone())),
            Ok(GenerationEvent::Finished {
                reason: StopReason::Stop,
                usage: TokenUsage::default(),
            }),
        ]))
    }
}

/// A provider that is one function of the request: for tests that need a provider with one behaviour
/// (stall on some prompts, fail on others).
pub struct FnProvider<F>(pub F);

impl<F> Provider for FnProvider<F>
where
    F: Fn(GenerationRequest) -> EventStream + Send + Sync + 'static,
{
    fn kind(&self) -> &str {
        "function"
    }
    fn model(&self) -> &str {
        "function"
    }
    fn supports_native_fim(&self) -> bool {
        true
    }
    fn generate(&self, request: GenerationRequest) -> EventStream {
        (self.0)(request)
    }
}

/// A config and factory serving every request from an [`InstantProvider`] answering `text`.
pub fn instant_engine_parts(text: &str) -> (EngineConfig, ProviderFactory) {
    let mut config = EngineConfig::default();
    let profile = ProfileConfig::new("instant", ProviderKind::OpenAiCompletions, "instant");
    config.profiles.insert("instant".into(), profile);
    config.completion_profile = "instant".into();
    config.chat_profile = "instant".into();
    let text = text.to_owned();
    let factory: ProviderFactory = Arc::new(move |_profile: &ProfileConfig| {
        Ok(Arc::new(InstantProvider { text: text.clone() }) as Arc<dyn Provider>)
    });
    (config, factory)
}

/// Serves `engine` at `endpoint` in this process as `ai-engine serve` does: the transport's reactor thread hands
/// requests to the daemon's tasks on `runtime`.
pub fn serve_engine(
    endpoint: &Endpoint,
    engine: Arc<Engine>,
    runtime: tokio::runtime::Handle,
) -> Result<Server, TransportError> {
    let daemon = DaemonHandler::new(engine, runtime);
    Server::bind(
        endpoint,
        ServerOptions::default(),
        Arc::new(Handler(daemon)),
    )
}
