//! Recovery without a restart: a real `ai-engine serve` started while its model file, its config file or its
//! API key was missing (or the config was broken) serves once the user fixes it; keys never show.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use lapce_ai_transport::protocol::{
    CompletionMode, CompletionRequest, ErrorCode, StatusReply, StatusRequest,
};
use lapce_ai_transport::{AsyncClient, ClientOptions, StreamEvent, TransportError};
use support::{fake_config, FakeOpenAi, Sandbox, Script};

/// How long a fix may take to reach the daemon (inotify plus the reload's settle time, on a busy machine).
const APPLY: Duration = Duration::from_secs(10);

fn request(prefix: &str) -> CompletionRequest {
    CompletionRequest {
        language_id: "python".into(),
        file_path: "add.py".into(),
        prefix: prefix.into(),
        suffix: "\n".into(),
        mode: CompletionMode::SingleLine,
        ..CompletionRequest::default()
    }
}

/// One completion: its text, or the error code and message.
async fn complete(client: &AsyncClient) -> Result<String, (ErrorCode, String)> {
    complete_after(client, "def add(a, b):\n    return ").await
}

/// [`complete`] for another prefix (one the cache has not seen).
async fn complete_after(client: &AsyncClient, prefix: &str) -> Result<String, (ErrorCode, String)> {
    let mut stream = match client.request(&request(prefix)).await {
        Ok(stream) => stream,
        Err(e) => return Err((ErrorCode::Protocol, e.to_string())),
    };
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event {
            Ok(StreamEvent::Chunk { text: piece, .. }) => text.push_str(&piece),
            Ok(StreamEvent::End(_)) => return Ok(text),
            Err(TransportError::Remote { code, message }) => return Err((code, message)),
            Err(e) => return Err((ErrorCode::Protocol, e.to_string())),
        }
    }
    Err((ErrorCode::Protocol, "no terminal event".into()))
}

/// Completes until `check` accepts the result or `APPLY` passes; returns the last result.
async fn until(
    client: &AsyncClient,
    check: impl Fn(&Result<String, (ErrorCode, String)>) -> bool,
) -> Result<String, (ErrorCode, String)> {
    let deadline = Instant::now() + APPLY;
    loop {
        let result = complete(client).await;
        if check(&result) || Instant::now() > deadline {
            return result;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn script(text: &str) -> Script {
    Script {
        pieces: vec![text.to_owned()],
        delay: Duration::ZERO,
    }
}

/// Writes `text` to `path` the way editors do: a new file renamed over the old one, mode 0600.
fn save(path: &Path, text: &str) {
    let temporary = path.with_extension("tmp~");
    std::fs::write(&temporary, text).unwrap();
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// `ai-engine serve --config FILE` with its log (at debug level) in a file, killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(sandbox: &Sandbox, config: &Path) -> Self {
        let log = sandbox.dir.path().join("engine.log");
        let child = sandbox
            .command()
            .env("LAPCE_AI_LOG", "debug")
            .arg("--config")
            .arg(config)
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        lapce_ai_transport::wait_for_engine(&sandbox.endpoint, Duration::from_secs(20))
            .expect("engine did not start");
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(sandbox: &Sandbox) -> AsyncClient {
    AsyncClient::connect(&sandbox.endpoint, ClientOptions::default())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_missing_then_fixed_broken_and_changed_applies_live() {
    let first = FakeOpenAi::start(script("a + b")).await;
    let second = FakeOpenAi::start(script("b + a")).await;
    let sandbox = Sandbox::new("recover-config");
    let file = sandbox.dir.path().join("engine.toml");
    let daemon = Daemon::start(&sandbox, &file);
    let client = connect(&sandbox).await;

    // No file: every request says which file is missing.
    let (code, message) = complete(&client).await.unwrap_err();
    assert_eq!(code, ErrorCode::Config, "{message}");
    assert!(message.contains(&file.display().to_string()), "{message}");

    // The file appears: the next requests use it.
    save(&file, &fake_config(&first.base_url()));
    assert_eq!(until(&client, Result::is_ok).await, Ok("a + b".into()));

    // A broken edit keeps the last good configuration and is reported with the file and line.
    save(
        &file,
        &fake_config(&second.base_url()).replace("model = \"fake-coder\"", "model = fake-coder"),
    );
    let deadline = Instant::now() + APPLY;
    let status = loop {
        let status: StatusReply = client.call(&StatusRequest {}).await.unwrap();
        if !status.config_error.is_empty() || Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let line = format!("{}:7", file.display());
    assert!(status.config_error.contains(&line), "{status:?}");
    assert_eq!(complete(&client).await, Ok("a + b".into()));
    assert_eq!(daemon.log().matches(&line).count(), 1, "{}", daemon.log());

    // The fixed edit applies (a new server, so a cached answer cannot pass for it).
    save(&file, &fake_config(&second.base_url()));
    assert_eq!(
        until(&client, |r| r.as_deref() == Ok("b + a")).await,
        Ok("b + a".into())
    );
    let status: StatusReply = client.call(&StatusRequest {}).await.unwrap();
    assert_eq!(status.config_error, "", "{status:?}");
    assert_eq!(second.requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    drop(client);
    daemon.stop();
    sandbox.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_broken_at_start_serves_once_fixed() {
    let fake = FakeOpenAi::start(script("a + b")).await;
    let sandbox = Sandbox::new("recover-broken");
    let file = sandbox.config("completion_profile = \"fake\"\n[profiles.fake]\nkind = \"openai-completions\"\nmodel = [\n");
    let daemon = Daemon::start(&sandbox, &file);
    let client = connect(&sandbox).await;

    let (code, message) = complete(&client).await.unwrap_err();
    assert_eq!(code, ErrorCode::Config, "{message}");
    assert!(
        message.contains(&format!("{}:", file.display())),
        "names the file and line: {message}"
    );

    save(&file, &fake_config(&fake.base_url()));
    assert_eq!(until(&client, Result::is_ok).await, Ok("a + b".into()));

    drop(client);
    daemon.stop();
    sandbox.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_written_later_is_used_and_never_shown() {
    const KEY: &str = "sk-recovery-SECRET-9876543210";
    let fake = FakeOpenAi::start_with_key(script("a + b"), Some(KEY.into())).await;
    let sandbox = Sandbox::new("recover-key");
    let key_file = sandbox.dir.path().join("openai.key");
    let config = sandbox.config(&format!(
        "completion_profile = \"keyed\"\n\n[profiles.keyed]\nkind = \"openai-completions\"\n\
         base_url = \"{}\"\nmodel = \"fake-coder\"\napi_key_file = \"openai.key\"\n",
        fake.base_url()
    ));
    let daemon = Daemon::start(&sandbox, &config);
    let client = connect(&sandbox).await;

    // No key yet: the provider refuses, and the error says so.
    let (code, message) = complete(&client).await.unwrap_err();
    assert_eq!(code, ErrorCode::ProviderAuth, "{message}");

    // The user writes the key file: the next request sends it, no restart.
    save(&key_file, &format!("{KEY}\n"));
    assert_eq!(complete(&client).await, Ok("a + b".into()));

    // A wrong key replaced later is used at once too, and no error or log line shows either key.
    save(&key_file, "sk-wrong-SECRET-0000000000\n");
    let (code, message) = complete_after(&client, "def sub(a, b):\n    return ")
        .await
        .unwrap_err();
    assert_eq!(code, ErrorCode::ProviderAuth, "{message}");
    assert!(!message.contains("SECRET"), "{message}");
    let status: StatusReply = client.call(&StatusRequest {}).await.unwrap();
    assert!(!format!("{status:?}").contains("SECRET"));
    assert!(!sandbox.status_json().to_string().contains("SECRET"));

    drop(client);
    let log = daemon.log();
    daemon.stop();
    assert!(log.contains("DEBUG"), "the log ran at debug level");
    assert!(!log.contains("SECRET"), "a key reached the log");
    assert_eq!(
        fake.unauthorized.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    sandbox.assert_clean();
}

/// The test model (scripts/fetch-test-model.sh), or `None` when it was not fetched.
fn test_model() -> Option<PathBuf> {
    let path = match std::env::var_os("LAPCE_AI_TEST_MODEL").filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache/lapce-ai/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    };
    path.is_file().then_some(path)
}

#[cfg(feature = "embedded")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_file_that_appears_later_serves_the_next_request() {
    let Some(model) = test_model() else {
        panic!("test model missing: run scripts/fetch-test-model.sh (or set LAPCE_AI_TEST_MODEL)");
    };
    let sandbox = Sandbox::new("recover-model");
    let late = sandbox.dir.path().join("models").join("late.gguf");
    let config = sandbox.config(&format!(
        "completion_profile = \"local\"\n\n[profiles.local]\nkind = \"embedded\"\nmodel_path = \"{}\"\n\
         context_tokens = 512\nmax_tokens = 4\n",
        late.display()
    ));
    let daemon = Daemon::start(&sandbox, &config);
    let client = connect(&sandbox).await;

    let (code, message) = complete(&client).await.unwrap_err();
    assert_eq!(code, ErrorCode::ModelMissing, "{message}");
    assert!(message.contains("late.gguf"), "{message}");

    std::fs::create_dir_all(late.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&model, &late).unwrap();
    let result = complete(&client).await;
    assert!(result.is_ok(), "{result:?}");

    drop(client);
    daemon.stop();
    sandbox.assert_clean();
}
