//! The engine's OpenAI-compatible providers against a real llama.cpp server (PyPI `llama-cpp-python[server]`).
//!
//! Each test starts `python -m llama_cpp.server` serving the SmolLM2 test model on 127.0.0.1 and a free port,
//! and stops it at the end, even when the test panics. The server's python comes from
//! `LAPCE_AI_LLAMA_SERVER_PYTHON` (`cargo xtask test` sets it from `scripts/llama-server.sh`); without it these
//! tests fail with a message saying how to get it, so CI cannot pass them by skipping.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener as StdTcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ai_engine::config::EngineConfig;
use ai_engine::engine::{default_factory, Engine, EngineError, TextSink};
use ai_engine::provider::ProviderError;
use lapce_ai_transport::protocol::{
    ChatMessage, ChatRequest, ChatRole, CompletionMode, CompletionRequest, FinishReason,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// One server at a time: they share two cores, and the cancel test compares timings.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SERVER_PYTHON_ENV: &str = "LAPCE_AI_LLAMA_SERVER_PYTHON";
const STARTUP_LIMIT: Duration = Duration::from_secs(180);
const REQUEST_LIMIT: Duration = Duration::from_secs(120);

fn server_python() -> PathBuf {
    let python = std::env::var_os(SERVER_PYTHON_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "{SERVER_PYTHON_ENV} is not set: these tests need a real llama.cpp server. Run `cargo xtask test` \
                 (it installs one), or run `bash scripts/llama-server.sh` and set {SERVER_PYTHON_ENV} to the \
                 python it prints"
            )
        });
    assert!(
        python.is_file(),
        "{SERVER_PYTHON_ENV}={} is not a file: run `bash scripts/llama-server.sh`",
        python.display()
    );
    python
}

fn model_path() -> PathBuf {
    let path = std::env::var_os("LAPCE_AI_TEST_MODEL")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is not set; set LAPCE_AI_TEST_MODEL");
            PathBuf::from(home).join(".cache/lapce-ai/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "test model not found at {}: run scripts/fetch-test-model.sh (or set LAPCE_AI_TEST_MODEL)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `llama_cpp.server`; dropping it kills and reaps the process (and resumes it first if stopped).
struct LlamaServer {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl LlamaServer {
    fn start() -> Self {
        let python = server_python();
        let model = model_path();
        let port = free_port();
        let mut command = Command::new(&python);
        command
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&model)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            // One generation must not end another: with interruption on, a new request stops the running one,
            // which would hide whether a cancelled stream stopped by itself.
            .args(["--interrupt_requests", "False"])
            // One thread: on an oversubscribed machine (parallel tests, other builds) two OpenMP threads that
            // spin on each other's barrier fell to 0.2 tokens/s here; one thread kept 11 tokens/s.
            .args([
                "--n_ctx",
                "2048",
                "--n_threads",
                "1",
                "--n_threads_batch",
                "1",
            ])
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; the server dies with the test process should it be killed before
        // the guard runs.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} -m llama_cpp.server: {e}", python.display()));
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let mut server = Self { child, port, log };
        server.wait_ready();
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Polls `GET /v1/models` until the server answers 200 (the model is loaded by then).
    fn wait_ready(&mut self) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "llama_cpp.server exited during startup ({status}):\n{}",
                    self.log_tail()
                );
            }
            if http_get_ok(self.port, "/v1/models") {
                return;
            }
            assert!(
                started.elapsed() < STARTUP_LIMIT,
                "llama_cpp.server not ready after {STARTUP_LIMIT:?}:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, which has not been reaped yet (the guard reaps it in Drop).
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits until the server's log holds `needle`, returning false after `limit`.
    fn wait_for_log(&self, needle: &str, limit: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child; SIGCONT first so a stopped server can die.
        unsafe {
            libc::kill(self.pid(), libc::SIGCONT);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_get_ok(port: u16, path: &str) -> bool {
    use std::io::Write;
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// An engine whose profiles point at `base_url`: `real-fim` (openai-completions) for completion, `real-chat`
/// (openai-chat) for chat, both with a short idle timeout.
fn engine_for(base_url: &str, idle_timeout_ms: u64) -> Arc<Engine> {
    let text = format!(
        r#"completion_profile = "real-fim"
chat_profile = "real-chat"

[profiles.real-fim]
kind = "openai-completions"
base_url = "{base_url}"
model = "smollm2-135m-instruct"
idle_timeout_ms = {idle_timeout_ms}

[profiles.real-chat]
kind = "openai-chat"
base_url = "{base_url}"
model = "smollm2-135m-instruct"
idle_timeout_ms = {idle_timeout_ms}
"#
    );
    let config = EngineConfig::parse(&text, Path::new("real-llama-server.toml"), true).unwrap();
    let factory = default_factory(&config);
    Engine::new(config, factory, "real-llama-server")
}

/// Collects what the engine decides to show; optionally runs `on_first` when the first text arrives.
struct Collect<F: FnMut(&str) + Send> {
    text: String,
    pieces: usize,
    on_piece: F,
}

impl<F: FnMut(&str) + Send> TextSink for Collect<F> {
    async fn send(&mut self, text: &str) -> Result<(), String> {
        self.text.push_str(text);
        self.pieces += 1;
        (self.on_piece)(&self.text);
        Ok(())
    }
}

fn collect() -> Collect<impl FnMut(&str) + Send> {
    Collect {
        text: String::new(),
        pieces: 0,
        on_piece: |_: &str| {},
    }
}

fn chat_request(text: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest {
        messages: vec![ChatMessage {
            role: ChatRole::User,
            content: text.to_string(),
        }],
        max_tokens,
        temperature: Some(0.0),
        ..ChatRequest::default()
    }
}

/// A prompt SmolLM2 keeps answering for hundreds of tokens.
const LONG_ANSWER: &str = "Write a long story about a dragon who learns to code.";

#[tokio::test]
async fn completion_through_engine_returns_text_and_usage() {
    let _serial = SERIAL.lock().await;
    let server = LlamaServer::start();
    let engine = engine_for(&server.url(), 30_000);
    let request = CompletionRequest {
        language_id: "python".into(),
        prefix: "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return ".into(),
        suffix: "\n".into(),
        mode: CompletionMode::SingleLine,
        max_tokens: 24,
        ..CompletionRequest::default()
    };
    let mut sink = collect();
    let outcome = tokio::time::timeout(
        REQUEST_LIMIT,
        engine.complete(request, &mut sink, &CancellationToken::new()),
    )
    .await
    .expect("completion timed out")
    .unwrap_or_else(|e| panic!("completion failed: {e}\n{}", server.log_tail()));
    assert!(
        !sink.text.trim().is_empty(),
        "empty completion ({outcome:?})"
    );
    assert_eq!(
        sink.text.trim().lines().count(),
        1,
        "single-line mode shows one line: {:?}",
        sink.text
    );
    // llama-cpp-python's stream carries no usage (it ignores `stream_options`); the engine counts the pieces.
    assert!(outcome.usage.completion_tokens >= 1, "{outcome:?}");
    assert!(outcome.time_to_first_token.is_some(), "{outcome:?}");
}

#[tokio::test]
async fn chat_through_engine_answers() {
    let _serial = SERIAL.lock().await;
    let server = LlamaServer::start();
    let engine = engine_for(&server.url(), 30_000);
    let mut sink = collect();
    let outcome = tokio::time::timeout(
        REQUEST_LIMIT,
        engine.chat(
            chat_request("What is the capital of France? Answer in one word.", 16),
            &mut sink,
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("chat timed out")
    .unwrap_or_else(|e| panic!("chat failed: {e}\n{}", server.log_tail()));
    assert!(
        !sink.text.trim().is_empty(),
        "empty chat answer ({outcome:?})"
    );
    assert!(sink.pieces >= 1);
    assert!(
        outcome.usage.completion_tokens >= 1 && outcome.usage.completion_tokens <= 16,
        "max_tokens reached the server: {outcome:?}"
    );
}

/// Cancelling a request closes its HTTP stream, and the server stops generating: it logs the disconnect, and a
/// request sent right after is answered while the cancelled one, left alone, would still run for many seconds.
#[tokio::test]
async fn cancel_stops_the_server_generating() {
    let _serial = SERIAL.lock().await;
    let server = LlamaServer::start();
    let engine = engine_for(&server.url(), 30_000);

    // Reference: how long the long answer takes when nobody cancels it (bounded by max_tokens).
    const LONG_TOKENS: u32 = 300;
    let started = Instant::now();
    let mut sink = collect();
    let full = engine
        .chat(
            chat_request(LONG_ANSWER, LONG_TOKENS),
            &mut sink,
            &CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("reference chat failed: {e}\n{}", server.log_tail()));
    let full_time = started.elapsed();
    assert!(
        full.usage.completion_tokens >= 150,
        "the reference answer must be long for the comparison to mean anything: {full:?}"
    );

    // The same request, cancelled once a few pieces arrived.
    let cancel = CancellationToken::new();
    let mut sink = Collect {
        text: String::new(),
        pieces: 0,
        on_piece: {
            let cancel = cancel.clone();
            let mut seen = 0;
            move |_: &str| {
                seen += 1;
                if seen == 5 {
                    cancel.cancel();
                }
            }
        },
    };
    // Different wording so llama.cpp's prompt cache cannot turn the reference into a shortcut.
    let cancelled = engine
        .chat(
            chat_request(&format!("{LONG_ANSWER} Make it funny."), LONG_TOKENS),
            &mut sink,
            &cancel,
        )
        .await
        .unwrap();
    assert_eq!(cancelled.finish_reason, FinishReason::Cancelled);
    let cancelled_at = Instant::now();

    // The next request is served promptly: the server is not still producing the cancelled answer.
    let mut sink = collect();
    engine
        .chat(
            chat_request("Say hi.", 4),
            &mut sink,
            &CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|e| panic!("chat after cancel failed: {e}\n{}", server.log_tail()));
    let next_after_cancel = cancelled_at.elapsed();
    assert!(
        next_after_cancel < full_time / 2,
        "the request after a cancel took {next_after_cancel:?}, the whole long answer takes {full_time:?}: \
         the server kept generating\n{}",
        server.log_tail()
    );
    assert!(
        server.wait_for_log("Disconnected from client", Duration::from_secs(10)),
        "the server never logged the client's disconnect:\n{}",
        server.log_tail()
    );
}

/// A server that stops sending mid-stream (SIGSTOP) trips the profile's idle timeout with a clear error;
/// once resumed (SIGCONT) it serves the next request.
#[tokio::test]
async fn stalled_stream_hits_the_idle_timeout() {
    let _serial = SERIAL.lock().await;
    let server = LlamaServer::start();
    // Long enough for the first token on a loaded machine (the stop must come mid-stream).
    const IDLE_MS: u64 = 8000;
    let engine = engine_for(&server.url(), IDLE_MS);
    let pid = server.pid();
    let mut sink = Collect {
        text: String::new(),
        pieces: 0,
        on_piece: {
            let mut stopped = false;
            move |_: &str| {
                if !stopped {
                    stopped = true;
                    // SAFETY: kill(2) on the test's own server child; the guard resumes and reaps it.
                    unsafe { libc::kill(pid, libc::SIGSTOP) };
                }
            }
        },
    };
    let started = Instant::now();
    let result = tokio::time::timeout(
        REQUEST_LIMIT,
        engine.chat(
            chat_request(LONG_ANSWER, 300),
            &mut sink,
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("the idle timeout never fired");
    let waited = started.elapsed();
    server.signal(libc::SIGCONT);
    let error = match result {
        Err(EngineError::Provider(error)) => error,
        other => panic!("expected a stalled-stream error, got {other:?}"),
    };
    let ProviderError::Protocol(message) = &error else {
        panic!("expected ProviderError::Protocol, got {error:?}");
    };
    assert!(
        message.contains("stalled") && message.contains(&format!("{IDLE_MS} ms")),
        "{error}"
    );
    assert!(
        message.contains("127.0.0.1"),
        "the error names the server: {error}"
    );
    assert!(sink.pieces >= 1, "the stall came mid-stream");
    assert!(
        waited >= Duration::from_millis(IDLE_MS),
        "the error came before the idle timeout: {waited:?}"
    );

    let mut sink = collect();
    tokio::time::timeout(
        REQUEST_LIMIT,
        engine.chat(
            chat_request("Say hi.", 4),
            &mut sink,
            &CancellationToken::new(),
        ),
    )
    .await
    .expect("no answer after SIGCONT")
    .unwrap_or_else(|e| panic!("chat after SIGCONT failed: {e}\n{}", server.log_tail()));
    assert!(!sink.text.is_empty());
}

/// A recording TCP proxy in front of the server: keeps each connection's first request (head and body) and
/// relays everything both ways.
struct RecordingProxy {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    async fn start(upstream_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    let Ok(mut upstream) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut buf = [0u8; 8192];
                    // Read the head and a Content-Length body, then relay the rest transparently.
                    loop {
                        let Ok(n) = client.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        if request_complete(&request) {
                            break;
                        }
                    }
                    recorded
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&request).into_owned());
                    if upstream.write_all(&request).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        });
        Self {
            port,
            requests,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The JSON bodies of the recorded requests.
    fn bodies(&self) -> Vec<serde_json::Value> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| r.split_once("\r\n\r\n"))
            .filter_map(|(_, body)| serde_json::from_str(body).ok())
            .collect()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn request_complete(request: &[u8]) -> bool {
    let text = String::from_utf8_lossy(request);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= length
}

/// Why the engine must not send `suffix` here: llama-cpp-python's `/v1/completions` takes it and, for a model
/// without FIM tokens, appends it to the prompt (the prompt token count grows by the suffix), so the model
/// continues from the end of the suffix instead of filling the hole.
#[tokio::test]
async fn llama_cpp_python_appends_suffix_to_the_prompt_of_a_model_without_fim() {
    let _serial = SERIAL.lock().await;
    let server = LlamaServer::start();
    let client = reqwest::Client::new();
    let prompt_tokens = |body: serde_json::Value| {
        let client = client.clone();
        let url = format!("{}/v1/completions", server.url());
        async move {
            let reply = client
                .post(url)
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let reply: serde_json::Value = serde_json::from_slice(&reply).unwrap();
            reply["usage"]["prompt_tokens"].as_u64().unwrap()
        }
    };
    let prefix = "def add(a, b):\n    return ";
    let without = prompt_tokens(serde_json::json!({"prompt": prefix, "max_tokens": 1})).await;
    let with = prompt_tokens(serde_json::json!({
        "prompt": prefix,
        "suffix": "\n\n\ndef subtract(a, b):\n    return a - b\n\nprint(add(1, 2), subtract(3, 4))\n",
        "max_tokens": 1,
    }))
    .await;
    assert!(without >= 5, "{without}");
    assert!(
        with >= without + 20,
        "the suffix no longer lands in the prompt ({with} vs {without} prompt tokens): revisit the engine's FIM \
         rule for llama-cpp-python"
    );
}

/// The engine never sends `suffix` to this server (it would be silently dropped): requests are observed through
/// a recording proxy.
#[tokio::test]
async fn engine_never_sends_suffix_to_llama_cpp() {
    let _serial = SERIAL.lock().await;
    let server = LlamaServer::start();
    let proxy = RecordingProxy::start(server.port).await;
    let engine = engine_for(&proxy.url(), 30_000);
    let request = CompletionRequest {
        language_id: "python".into(),
        prefix: "def add(a, b):\n    return ".into(),
        suffix: "\n\nprint(add(1, 2))\n".into(),
        mode: CompletionMode::Auto,
        max_tokens: 16,
        ..CompletionRequest::default()
    };
    let mut sink = collect();
    engine
        .complete(request, &mut sink, &CancellationToken::new())
        .await
        .unwrap_or_else(|e| panic!("completion failed: {e}\n{}", server.log_tail()));
    let bodies = proxy.bodies();
    assert!(!bodies.is_empty(), "the proxy saw no request");
    for body in &bodies {
        assert!(
            body.get("suffix").is_none(),
            "the engine sent `suffix` to llama.cpp, which drops it: {body}"
        );
    }
}
