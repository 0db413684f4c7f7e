//! End to end through the real transport: `ai-engine serve` in its own process, clients completing, chatting,
//! cancelling, dying mid-stream, and many at once.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lapce_ai_transport::protocol::{
    ChatMessage, ChatRequest, ChatRole, CompletionMode, CompletionRequest, ErrorCode, FinishReason,
    StatusReply, StatusRequest,
};
use lapce_ai_transport::{AsyncClient, ClientOptions, ResponseStream, StreamEvent, TransportError};
use support::{fake_config, FakeOpenAi, Sandbox, Script};

fn add_request() -> CompletionRequest {
    CompletionRequest {
        language_id: "python".into(),
        file_path: "add.py".into(),
        prefix: "def add(a, b):\n    return ".into(),
        suffix: "\n".into(),
        mode: CompletionMode::Auto,
        ..CompletionRequest::default()
    }
}

async fn collect(stream: &mut ResponseStream) -> Result<(String, FinishReason), TransportError> {
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event? {
            StreamEvent::Chunk { text: piece, .. } => text.push_str(&piece),
            StreamEvent::End(end) => return Ok((text, end.finish_reason)),
        }
    }
    panic!("stream ended without a terminal event")
}

fn script(pieces: &[&str], delay_ms: u64) -> Script {
    Script {
        pieces: pieces.iter().map(|s| (*s).to_owned()).collect(),
        delay: Duration::from_millis(delay_ms),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completes_chats_caches_and_reports_status() {
    let fake = FakeOpenAi::start(script(&["a", " +", " b", "\n", "    print(a)\n"], 0)).await;
    let sandbox = Sandbox::new("e2e");
    let engine = sandbox.serve(&sandbox.config(&fake_config(&fake.base_url())));
    let client = AsyncClient::connect(&sandbox.endpoint, ClientOptions::default())
        .await
        .unwrap();

    let (text, reason) = collect(&mut client.request(&add_request()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(text, "a + b", "single-line completion, cut at the newline");
    assert_eq!(reason, FinishReason::Truncated);

    // The same context again is served from the cache; typing through the suggestion too.
    let (text, reason) = collect(&mut client.request(&add_request()).await.unwrap())
        .await
        .unwrap();
    assert_eq!((text.as_str(), reason), ("a + b", FinishReason::Cached));
    let mut typed = add_request();
    typed.prefix.push_str("a +");
    let (text, reason) = collect(&mut client.request(&typed).await.unwrap())
        .await
        .unwrap();
    assert_eq!((text.as_str(), reason), (" b", FinishReason::Cached));
    assert_eq!(
        fake.requests.load(Ordering::SeqCst),
        1,
        "cache hits never reach the provider"
    );

    let chat = ChatRequest {
        messages: vec![ChatMessage {
            role: ChatRole::User,
            content: "hi".into(),
        }],
        ..ChatRequest::default()
    };
    let (text, reason) = collect(&mut client.request(&chat).await.unwrap())
        .await
        .unwrap();
    assert_eq!(text, "a + b\n    print(a)\n");
    assert_eq!(reason, FinishReason::Stop);

    let status: StatusReply = client.call(&StatusRequest {}).await.unwrap();
    assert_eq!(status.engine_pid, engine.pid());
    assert_eq!(status.requests, 4);
    assert_eq!(status.cache_hits, 2);
    assert_eq!(status.connections, 1);
    assert!(status.completion_model.contains("fake-coder"), "{status:?}");

    drop(client);
    assert!(engine.terminate().success());
    sandbox.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_per_request_and_the_daemon_keeps_serving() {
    let fake = FakeOpenAi::start(script(&["x"], 0)).await;
    let sandbox = Sandbox::new("errors");
    let engine = sandbox.serve(&sandbox.config(&fake_config(&fake.base_url())));
    let client = AsyncClient::connect(&sandbox.endpoint, ClientOptions::default())
        .await
        .unwrap();

    let mut unknown = add_request();
    unknown.profile = "nonexistent".into();
    match collect(&mut client.request(&unknown).await.unwrap()).await {
        Err(TransportError::Remote { code, message }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("nonexistent"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    let mut down = add_request();
    down.profile = "down".into();
    match collect(&mut client.request(&down).await.unwrap()).await {
        Err(TransportError::Remote { code, .. }) => {
            assert_eq!(code, ErrorCode::ProviderUnreachable)
        }
        other => panic!("expected an error, got {other:?}"),
    }
    let empty_chat = ChatRequest::default();
    match collect(&mut client.request(&empty_chat).await.unwrap()).await {
        Err(TransportError::Remote { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
        other => panic!("expected an error, got {other:?}"),
    }
    let (text, _) = collect(&mut client.request(&add_request()).await.unwrap())
        .await
        .unwrap();
    assert_eq!(text, "x");
    drop(client);
    assert!(engine.terminate().success());
    sandbox.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_stream_closes_the_upstream_connection() {
    let pieces: Vec<String> = (0..200).map(|i| format!("line {i}\n")).collect();
    let fake = FakeOpenAi::start(Script {
        pieces,
        delay: Duration::from_millis(10),
    })
    .await;
    let sandbox = Sandbox::new("cancel");
    let engine = sandbox.serve(&sandbox.config(&fake_config(&fake.base_url())));
    let client = AsyncClient::connect(&sandbox.endpoint, ClientOptions::default())
        .await
        .unwrap();
    let chat = ChatRequest {
        messages: vec![ChatMessage {
            role: ChatRole::User,
            content: "count".into(),
        }],
        ..ChatRequest::default()
    };
    let mut stream = client.request(&chat).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            stream.next().await.unwrap().unwrap(),
            StreamEvent::Chunk { .. }
        ));
    }
    stream.cancel().await.unwrap();
    let (_, reason) = collect(&mut stream).await.unwrap();
    assert_eq!(reason, FinishReason::Cancelled);
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.aborted.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the provider connection was not closed after cancel"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(fake.completed.load(Ordering::SeqCst), 0);
    let status: StatusReply = client.call(&StatusRequest {}).await.unwrap();
    assert_eq!(status.cancels, 1);
    drop(stream);
    drop(client);
    assert!(engine.terminate().success());
    sandbox.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_stream_cancels_its_provider_call() {
    let pieces: Vec<String> = (0..500).map(|i| format!("word{i} ")).collect();
    let fake = FakeOpenAi::start(Script {
        pieces,
        delay: Duration::from_millis(10),
    })
    .await;
    let sandbox = Sandbox::new("killclient");
    let config = sandbox.config(&fake_config(&fake.base_url()));
    let engine = sandbox.serve(&config);
    // The CLI is a real client process: it streams the chat answer to stdout.
    let mut cli = sandbox
        .command()
        .arg("--no-start")
        .args(["chat", "tell me everything"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = cli.stdout.take().unwrap();
    let mut first = [0u8; 4];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    cli.kill().unwrap();
    cli.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.aborted.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the dead client's provider call kept running"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The daemon is fine and serves the next client.
    let client = AsyncClient::connect(&sandbox.endpoint, ClientOptions::default())
        .await
        .unwrap();
    let status: StatusReply = client.call(&StatusRequest {}).await.unwrap();
    assert_eq!(status.connections, 1);
    drop(client);
    assert!(engine.terminate().success());
    sandbox.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_clients_all_get_answers() {
    let fake = FakeOpenAi::start(script(&["a", " +", " b", "\n"], 1)).await;
    let sandbox = Sandbox::new("many");
    let engine = sandbox.serve(&sandbox.config(&fake_config(&fake.base_url())));
    let mut tasks = Vec::new();
    for c in 0..16 {
        let endpoint = sandbox.endpoint.clone();
        tasks.push(tokio::spawn(async move {
            let client = AsyncClient::connect(&endpoint, ClientOptions::default())
                .await
                .unwrap();
            for r in 0..5 {
                let mut request = add_request();
                // Distinct contexts so every request reaches the provider.
                request.prefix = format!("# client {c} request {r}\n{}", request.prefix);
                let (text, _) = collect(&mut client.request(&request).await.unwrap())
                    .await
                    .unwrap();
                assert_eq!(text, "a + b");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(fake.requests.load(Ordering::SeqCst), 80);
    assert!(engine.terminate().success());
    sandbox.assert_clean();
}

#[test]
fn cli_complete_status_and_stop() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = runtime.block_on(FakeOpenAi::start(script(&["a", " +", " b", "\n"], 0)));
    let sandbox = Sandbox::new("cli");
    let config = sandbox.config(&fake_config(&fake.base_url()));
    let source = sandbox.dir.path().join("add.py");
    std::fs::write(&source, "def add(a, b):\n    return \n").unwrap();
    // No engine runs: `complete` starts one detached (with the same --config) and completes.
    let output = sandbox
        .command()
        .arg("--config")
        .arg(&config)
        .args(["complete", "--file"])
        .arg(&source)
        .args(["--line", "2", "--column", "12"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim_end(), "a + b");

    let status = sandbox.status_json();
    assert_eq!(status["requests"], 1);
    assert!(status["total_ms"]["p50"].as_f64().unwrap() > 0.0);

    let output = sandbox.command().arg("stop").output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = sandbox.status(&[]);
    assert_eq!(output.status.code(), Some(3), "no engine after stop");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no engine"), "{stderr}");
    sandbox.assert_clean();
}

/// An upgrade can leave the previous release's engine running: it holds engine.lock but cannot read this
/// release's messages. `stop` says which engine it was and stops it with a signal; `status` then finds none.
#[test]
fn cli_stop_stops_an_engine_of_another_release() {
    use std::io::BufRead;
    let sandbox = Sandbox::new("oldrelease");
    sandbox.endpoint.ensure_dirs().unwrap();
    let lock = sandbox.endpoint.engine_lock_path();
    // What a release before the rendezvous version leaves in engine.lock: the lock held, the pid alone.
    let holder = r#"
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 4096)
os.pwrite(fd, (str(os.getpid()).ljust(31) + "\n").encode(), 0)
print("ready", flush=True)
sys.stdin.read()
"#;
    let mut old = std::process::Command::new("python3")
        .args(["-c", holder])
        .arg(&lock)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 plays the old engine");
    let mut ready = String::new();
    std::io::BufReader::new(old.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready.trim(), "ready");

    let output = sandbox.status(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("older lapce-ai release") && stderr.contains(&old.id().to_string()),
        "{stderr}"
    );

    let output = sandbox.command().arg("stop").output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("another lapce-ai release") && stdout.contains(&old.id().to_string()),
        "{stdout}"
    );
    let exit = old.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&exit),
        Some(libc::SIGTERM)
    );
    let output = sandbox.status(&[]);
    assert_eq!(output.status.code(), Some(3), "no engine after stop");
    let _ = std::fs::remove_file(&lock);
    sandbox.assert_clean();
}
